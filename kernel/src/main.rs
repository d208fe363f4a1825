//! The unikernel: boots as a Hyper-V Generation 2 VM (or under QEMU), brings up the CPU and memory, and runs its job.
//!
//! `kmain` only sequences bring-up; each step lives in its module. What the kernel does after bring-up is chosen by
//! the command line (see [`cmdline`]): `mode=test` runs the in-kernel tests, `mode=panic` panics on purpose (the boot
//! tests check that a panic fails a run), `mode=fault` writes to an unmapped page on purpose (the boot tests check
//! the exception report), `mode=stack-overflow` overflows the kernel stack (the double-fault handler must report it
//! from its own IST stack), `mode=poweroff` and `mode=restart` leave the hypervisor clean and power off (ACPI S5) or
//! reset the machine (see [`arch::power`]), and no mode runs the main job.
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

extern crate alloc;

mod arch;
mod balloon_job;
mod bus;
mod cmdline;
mod drivers;
mod console;
mod exit;
mod hyperv;
mod job;
mod ktest;
mod mm;
mod platform;
mod time;

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
    arch::init_cpu_tables();
    let screen = console::init_framebuffer(boot_info.framebuffer.take());
    kprintln!("hv-unikernel {} booting", VERSION);
    log::info!("console: {screen}");
    let cmdline = cmdline::Cmdline::from_boot_info(boot_info);
    if !cmdline.as_str().is_empty() {
        log::info!("command line: {}", cmdline.as_str());
    }

    let Some(phys_offset) = boot_info.physical_memory_offset.into_option() else {
        panic!("the bootloader did not map physical memory");
    };
    mm::set_phys_offset(phys_offset);
    mm::set_phys_window_end(&boot_info.memory_regions);
    let heap = mm::heap::init(&boot_info.memory_regions).unwrap_or_else(|e| panic!("heap: {e}"));
    mm::frames::init(&boot_info.memory_regions, heap.clone());
    log::info!(
        "heap: {} MiB at {:#x}; {} free frames",
        (heap.end - heap.start) >> 20,
        heap.start,
        mm::frames::stats().free
    );
    mm::paging::init(phys_offset).unwrap_or_else(|e| panic!("paging: {e}"));

    arch::acpi::set_rsdp(boot_info.rsdp_addr.into_option());
    arch::pic::remap_and_mask();
    match arch::apic::init() {
        Ok(mode) => log::info!(
            "apic: local APIC id {} version {:#x}, {mode}",
            arch::apic::id().unwrap_or(0),
            arch::apic::version().unwrap_or(0)
        ),
        Err(e) => log::warn!("apic: {e}"),
    }
    // Detection, guest OS id, hypercall page, SynIC, reference clock and synthetic timers, where Hyper-V offers them.
    hyperv::init();
    // The hypervisor's frequency MSRs, reference clock and timer, if any, take precedence (a Gen2 VM has no PIT).
    if let Err(e) = time::init(hyperv::time_sources()) {
        log::warn!("time: {e}: the APIC timer is not calibrated");
    }
    arch::interrupts::enable();
    kprintln!("{}", platform::Report::gather(&boot_info.memory_regions));

    match cmdline.get("mode") {
        Some("test") => ktest::run_all(
            &[
                mm::KTESTS,
                mm::paging::KTESTS,
                arch::gdt::KTESTS,
                arch::interrupts::KTESTS,
                arch::apic::KTESTS,
                time::KTESTS,
                arch::acpi::KTESTS,
                arch::rtc::KTESTS,
                console::framebuffer::KTESTS,
                hyperv::KTESTS,
                bus::KTESTS,
            ],
            cmdline.get("filter"),
        ),
        Some("panic") => panic!("panic requested by the command line"),
        Some("poweroff") => arch::power::shutdown(arch::power::PowerAction::PowerOff, hyperv::teardown),
        Some("restart") => {
            let first = arch::power::ResetMethod::first_from(cmdline.get("reset"));
            arch::power::shutdown(arch::power::PowerAction::Restart(first), hyperv::teardown)
        }
        Some("balloon") => balloon_job::run(cmdline.get("seconds").and_then(|s| s.parse().ok()).unwrap_or(60)),
        Some("fault") => provoke_page_fault(),
        Some("stack-overflow") => {
            log::info!("mode=stack-overflow: recursing until the stack's guard page");
            let depth = overflow_stack(0);
            panic!("recursion returned at depth {depth} without overflowing the stack")
        }
        Some(other) => {
            log::error!("unknown mode {other:?}");
            exit(ExitCode::Failure)
        }
        None => {}
    }

    job::run(&cmdline);
    // Leave the hypervisor as firmware would expect to find it after a reboot.
    hyperv::teardown();
    log::info!("main job finished");
    exit(ExitCode::Success)
}

/// Recurses until the kernel stack overflows into its guard page: the page fault cannot push its frame there, so
/// the CPU raises a double fault, which runs on its IST stack and reports.
fn overflow_stack(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    if core::hint::black_box(depth) == u64::MAX {
        return depth;
    }
    // The addition after the call keeps it from becoming a loop.
    overflow_stack(frame[depth as usize % 64] + 1) + core::hint::black_box(1)
}

/// Writes to a page that is never mapped, so the page-fault handler reports and ends the run.
fn provoke_page_fault() -> ! {
    let target = mm::paging::never_mapped_address().expect("paging is initialised");
    log::info!("mode=fault: writing to unmapped address {:#018x}", target.as_u64());
    // SAFETY: the address is in the kernel's mapping window and never mapped, so the write cannot touch any memory:
    // it raises #PF, whose handler ends the run and never returns here.
    unsafe { target.as_mut_ptr::<u64>().write_volatile(0xBAD) };
    panic!("the write to an unmapped page did not fault")
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::write_fmt_emergency(format_args!("\nKERNEL PANIC: {}\n", info));
    exit(ExitCode::Failure)
}
