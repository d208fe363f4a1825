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
    /// Boot the kernel as L2 under QEMU's VMBus host, in a nested-KVM L1 guest built once into target/rig
    /// (the real-host rig; see boot/rig/README.md). Needs root the first time (it builds L1 with debootstrap).
    Rig {
        /// Boot this raw image instead of building the kernel.
        #[arg(long, conflicts_with = "cmdline")]
        image: Option<PathBuf>,
        /// Kernel command line to bake into the image.
        #[arg(long)]
        cmdline: Option<String>,
        /// Stop the whole run (L1 and L2) after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// L2's memory in MiB.
        #[arg(long, default_value_t = 512)]
        memory: u32,
        /// Another flag for L2's `-cpu host,...` (repeatable), e.g. `--cpu-flag hv-vapic`.
        #[arg(long = "cpu-flag")]
        cpu_flags: Vec<String>,
        /// Leave out L2's hv-balloon device.
        #[arg(long, conflicts_with = "hot_add")]
        no_balloon: bool,
        /// Let hv-balloon hot-add up to this many MiB to L2.
        #[arg(long)]
        hot_add: Option<u32>,
        /// Only build (or check) L1; boot nothing.
        #[arg(long)]
        prepare_only: bool,
    },
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
        Cmd::Rig { image, cmdline, timeout, memory, cpu_flags, no_balloon, hot_add, prepare_only } => {
            if prepare_only {
                return Ok(boot::rig::run_cli(None, &boot::rig::RunOptions::default()));
            }
            let image = match image {
                Some(image) => image,
                None => {
                    let kernel = build_kernel(Profile::Release)?;
                    let disk = work_dir().join("images").join("rig.raw");
                    image::create_uefi_image(&kernel, cmdline.as_deref(), &disk)?;
                    disk
                }
            };
            let mut options =
                boot::rig::RunOptions { time_limit: Duration::from_secs(timeout), ..boot::rig::RunOptions::default() };
            options.l2.memory_mib = memory;
            options.l2.cpu_flags.extend(cpu_flags);
            if no_balloon {
                options.l2.balloon = boot::rig::Balloon::Off;
            } else if let Some(mib) = hot_add {
                options.l2.balloon = boot::rig::Balloon::On { status_report: true, hot_add_mib: Some(mib) };
            }
            Ok(boot::rig::run_cli(Some(&image), &options))
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
