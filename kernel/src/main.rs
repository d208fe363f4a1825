//! The unikernel: boots as a Hyper-V Generation 2 VM (or under QEMU), brings up the CPU and memory, and runs its job.
//!
//! `kmain` only sequences bring-up; each step lives in its module. What the kernel does after bring-up is chosen by
//! the command line (see [`cmdline`]): `mode=test` runs the in-kernel tests, `mode=panic` panics on purpose (the boot
//! tests check that a panic fails a run), and no mode runs the main job.
#![no_std]
#![no_main]

extern crate alloc;

mod cmdline;
mod console;
mod exit;
mod ktest;
mod mm;
mod platform;

use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::{BootInfo, entry_point};
use exit::{ExitCode, exit};

/// The kernel's version, printed in the banner.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Asks the bootloader to map all physical memory (the kernel reaches frames, the heap and shared pages through it).
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

entry_point!(kmain, config = &BOOTLOADER_CONFIG);

fn kmain(boot_info: &'static mut BootInfo) -> ! {
    console::init_early();
    kprintln!("hv-unikernel {} booting", VERSION);
    let cmdline = cmdline::Cmdline::from_boot_info(boot_info);
    if !cmdline.as_str().is_empty() {
        log::info!("command line: {}", cmdline.as_str());
    }

    let Some(phys_offset) = boot_info.physical_memory_offset.into_option() else {
        panic!("the bootloader did not map physical memory");
    };
    mm::set_phys_offset(phys_offset);
    let heap = mm::heap::init(&boot_info.memory_regions).unwrap_or_else(|e| panic!("heap: {e}"));
    mm::frames::init(&boot_info.memory_regions, heap.clone());
    log::info!("heap: {} MiB at {:#x}; {} free frames", (heap.end - heap.start) >> 20, heap.start, mm::frames::stats().free);

    match cmdline.get("mode") {
        Some("test") => ktest::run_all(&[mm::KTESTS], cmdline.get("filter")),
        Some("panic") => panic!("panic requested by the command line"),
        Some(other) => {
            log::error!("unknown mode {other:?}");
            exit(ExitCode::Failure)
        }
        None => {}
    }

    kprintln!("{}", platform::Report::gather(&boot_info.memory_regions));
    log::info!("main job finished");
    exit(ExitCode::Success)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::write_fmt_emergency(format_args!("\nKERNEL PANIC: {}\n", info));
    exit(ExitCode::Failure)
}
