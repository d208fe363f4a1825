//! `cargo vm`: build the unikernel, make its disk images, boot it under QEMU.

use boot::accel::Accel;
use boot::build::{Profile, build_kernel};
use boot::qemu::{Exit, RunConfig};
use boot::{deps, image, work_dir};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "cargo vm", about = "Build and boot the Hyper-V unikernel")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the kernel and boot it under QEMU, showing its serial log.
    Run {
        /// Build the kernel with the dev profile instead of release.
        #[arg(long)]
        debug: bool,
        /// Kernel command line (for example `mode=test`).
        #[arg(long)]
        cmdline: Option<String>,
        /// Stop the run after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Guest memory in MiB.
        #[arg(long, default_value_t = 256)]
        memory: u32,
        /// Use TCG even where KVM could run the guest.
        #[arg(long)]
        tcg: bool,
    },
    /// Check that QEMU and OVMF are installed, installing them with apt-get as root.
    Deps,
    /// Build the kernel and write the raw UEFI image and the Hyper-V Gen2 VHDX (and, with --vhd, Azure's fixed VHD).
    Image {
        /// Output directory (default: target/boot/images).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also write a fixed VHD whose size is a whole number of MiB (Azure).
        #[arg(long)]
        vhd: bool,
        /// Kernel command line to bake into the image.
        #[arg(long)]
        cmdline: Option<String>,
    },
}

fn main() -> ExitCode {
    match real_main(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cargo vm: {e}");
            ExitCode::from(2)
        }
    }
}

fn profile(debug: bool) -> Profile {
    if debug { Profile::Debug } else { Profile::Release }
}

fn real_main(cli: Cli) -> boot::Result<ExitCode> {
    match cli.command {
        Cmd::Run { debug, cmdline, timeout, memory, tcg } => {
            let tools = deps::ensure_tools()?;
            let kernel = build_kernel(profile(debug))?;
            let disk = work_dir().join("images").join("run.raw");
            image::create_uefi_image(&kernel, cmdline.as_deref(), &disk)?;
            let mut config = RunConfig::new(&disk);
            if tcg {
                config.accel = Accel::tcg("--tcg was given");
            }
            config.memory_mib = memory;
            config.timeout = Duration::from_secs(timeout);
            config.echo = true;
            let outcome = boot::qemu::run(&tools, &config)?;
            if !outcome.qemu_stderr.trim().is_empty() {
                eprintln!("{}", outcome.qemu_stderr.trim_end());
            }
            eprintln!("cargo vm: QEMU ended after {:.1} s: {:?}", outcome.duration.as_secs_f64(), outcome.exit);
            Ok(match outcome.exit {
                Exit::GuestSuccess | Exit::Qemu(0) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            })
        }
        Cmd::Deps => {
            let tools = deps::ensure_tools()?;
            println!("qemu: {}", tools.qemu.display());
            println!("ovmf: {} + {}", tools.ovmf.code.display(), tools.ovmf.vars.display());
            match Accel::probe() {
                Accel::Kvm => println!("accelerator: KVM with Hyper-V SynIC"),
                Accel::Tcg { reason } => println!("accelerator: TCG ({reason})"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Image { out, vhd, cmdline } => {
            let kernel = build_kernel(Profile::Release)?;
            let dir = out.unwrap_or_else(|| work_dir().join("images"));
            let raw = dir.join("hv-unikernel.raw");
            let vhdx = dir.join("hv-unikernel.vhdx");
            image::create_uefi_image(&kernel, cmdline.as_deref(), &raw)?;
            image::raw_to_vhdx(&raw, &vhdx)?;
            println!("{}", raw.display());
            println!("{}", vhdx.display());
            if vhd {
                let fixed = dir.join("hv-unikernel.vhd");
                image::raw_to_fixed_vhd(&raw, &fixed)?;
                println!("{}", fixed.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
