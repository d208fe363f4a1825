//! Disk images: the GPT UEFI raw image, the dynamic VHDX for Hyper-V Generation 2, and the fixed VHD for Azure.
//!
//! The kernel's command line travels in the bootloader's ramdisk: a short UTF-8 text of `key=value` words that the
//! kernel reads at boot (an image without one runs the kernel's default job). The boot tests use it to choose what
//! the kernel does, so one kernel build serves every test.

use crate::{Result, err};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The largest command line the kernel accepts (it reads no more than this from the ramdisk).
pub const MAX_CMDLINE: usize = 4096;

/// Makes a GPT disk image that UEFI firmware boots (`\EFI\BOOT\BOOTX64.EFI` on the EFI system partition).
///
/// `cmdline`, when given, is stored as the ramdisk and becomes the kernel's command line.
pub fn create_uefi_image(kernel: &Path, cmdline: Option<&str>, out: &Path) -> Result<()> {
    let mut boot = bootloader::UefiBoot::new(kernel);
    // The bootloader's own log (ELF segments, page tables) drowns the kernel's; keep its warnings and errors only.
    let mut config = bootloader::BootConfig::default();
    config.log_level = bootloader_boot_config::LevelFilter::Warn;
    boot.set_boot_config(&config);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ramdisk;
    if let Some(cmdline) = cmdline {
        if cmdline.len() > MAX_CMDLINE {
            return Err(err!("command line is {} bytes; at most {MAX_CMDLINE}", cmdline.len()));
        }
        ramdisk = with_extension_suffix(out, "cmdline");
        std::fs::write(&ramdisk, cmdline)?;
        boot.set_ramdisk(&ramdisk);
    }
    boot.create_disk_image(out).map_err(|e| err!("making the UEFI disk image {}: {e:#}", out.display()))
}

/// Converts a raw image to a dynamic VHDX (the only disk format a Hyper-V Generation 2 VM boots from).
pub fn raw_to_vhdx(raw: &Path, out: &Path) -> Result<()> {
    qemu_img(&["convert", "-f", "raw", "-O", "vhdx", "-o", "subformat=dynamic"], raw, out)
}

/// Converts a raw image to a fixed VHD whose virtual size is a whole number of MiB, as Azure requires.
pub fn raw_to_fixed_vhd(raw: &Path, out: &Path) -> Result<()> {
    const MIB: u64 = 1 << 20;
    let len = std::fs::metadata(raw)?.len();
    let rounded = len.div_ceil(MIB).max(1) * MIB;
    // Pad a copy, so the raw image the caller keeps is untouched.
    let padded = with_extension_suffix(out, "padded.raw");
    std::fs::copy(raw, &padded)?;
    std::fs::OpenOptions::new().write(true).open(&padded)?.set_len(rounded)?;
    let result = qemu_img(&["convert", "-f", "raw", "-O", "vpc", "-o", "subformat=fixed,force_size=on"], &padded, out);
    std::fs::remove_file(&padded)?;
    result
}

/// Runs `qemu-img check` on an image and returns its report.
pub fn check(image: &Path) -> Result<String> {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(image)
        .output()
        .map_err(|e| err!("cannot run qemu-img (apt-get install qemu-utils): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if out.status.success() { Ok(text) } else { Err(err!("qemu-img check {} failed: {text}", image.display())) }
}

fn qemu_img(args: &[&str], input: &Path, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let output = Command::new("qemu-img")
        .args(args)
        .arg(input)
        .arg(out)
        .output()
        .map_err(|e| err!("cannot run qemu-img (apt-get install qemu-utils): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(err!("qemu-img {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn with_extension_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}
