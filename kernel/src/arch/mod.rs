//! x86_64 CPU bring-up: descriptor tables, exceptions and interrupt dispatch, the local APIC, the legacy PICs, and
//! the reference timers (ACPI PM timer, PIT) that calibrate the clock, and power-off and restart.
//!
//! Only the bootstrap processor is brought up. The unsafe code here is confined to register access: MSRs, port I/O,
//! the xAPIC page, descriptor-table loads, and firmware-table reads.

pub mod acpi;
pub mod apic;
pub mod gdt;
pub mod interrupts;
pub mod pic;
pub mod pit;
pub mod power;
pub mod rtc;

/// Loads the GDT/TSS and the IDT. Call first thing at boot so every later fault is reported.
pub fn init_cpu_tables() {
    gdt::init();
    interrupts::init();
}
