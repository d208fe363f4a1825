//! The disk images a user boots: the dynamic VHDX for Hyper-V Gen2 and the fixed VHD for Azure.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

/// Reads `\EFI\BOOT\BOOTX64.EFI` from the EFI system partition of a raw GPT image.
fn read_boot_loader(raw: &Path) -> Vec<u8> {
    let disk = gpt::GptConfig::new().writable(false).open(raw).expect("GPT");
    let esp_guid = gpt::partition_types::EFI;
    let (_, esp) = disk
        .partitions()
        .iter()
        .find(|(_, p)| p.part_type_guid == esp_guid)
        .expect("an EFI system partition");
    let lb = u64::from(*disk.logical_block_size());
    let start = esp.first_lba * lb;
    let len = (esp.last_lba - esp.first_lba + 1) * lb;
    let mut file = std::fs::File::open(raw).unwrap();
    file.seek(SeekFrom::Start(start)).unwrap();
    let mut part = vec![0u8; len as usize];
    file.read_exact(&mut part).unwrap();
    let fs = fatfs::FileSystem::new(std::io::Cursor::new(part), fatfs::FsOptions::new()).expect("FAT");
    let mut efi = fs.root_dir().open_file("EFI/BOOT/BOOTX64.EFI").expect("\\EFI\\BOOT\\BOOTX64.EFI");
    let mut bytes = Vec::new();
    efi.read_to_end(&mut bytes).unwrap();
    bytes
}

#[test]
fn vhdx_passes_qemu_img_check_and_holds_the_uefi_loader() {
    tests::setup();
    let dir = boot::work_dir().join("test-images");
    let raw = tests::make_image("vhdx-source", None);
    let vhdx = dir.join("check.vhdx");
    boot::image::raw_to_vhdx(&raw, &vhdx).expect("raw → VHDX");
    let report = boot::image::check(&vhdx).expect("qemu-img check");
    assert!(report.contains("No errors were found"), "qemu-img check: {report}");

    let info = Command::new("qemu-img").arg("info").arg(&vhdx).output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("file format: vhdx"));

    // Read the VHDX back to raw and find the loader on its ESP: what Hyper-V boots is what we made.
    let back = dir.join("check-back.raw");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "vhdx", "-O", "raw"])
        .arg(&vhdx)
        .arg(&back)
        .status()
        .unwrap();
    assert!(status.success());
    let loader = read_boot_loader(&back);
    assert_eq!(&loader[..2], b"MZ", "BOOTX64.EFI must be a PE image");
    assert_eq!(loader, read_boot_loader(&raw));
}

#[test]
fn fixed_vhd_is_a_whole_number_of_mib() {
    tests::setup();
    let raw = tests::make_image("vhd-source", None);
    let vhd = boot::work_dir().join("test-images").join("check.vhd");
    boot::image::raw_to_fixed_vhd(&raw, &vhd).expect("raw → fixed VHD");
    let len = std::fs::metadata(&vhd).unwrap().len();
    // A fixed VHD is the disk followed by a 512-byte footer; Azure wants the disk a whole number of MiB.
    assert_eq!((len - 512) % (1 << 20), 0, "VHD size {len}");
    let mut footer = [0u8; 512];
    let mut f = std::fs::File::open(&vhd).unwrap();
    f.seek(SeekFrom::End(-512)).unwrap();
    f.read_exact(&mut footer).unwrap();
    assert_eq!(&footer[..8], b"conectix", "VHD footer cookie");
    let disk_type = u32::from_be_bytes(footer[60..64].try_into().unwrap());
    assert_eq!(disk_type, 2, "disk type must be fixed (2)");
}
