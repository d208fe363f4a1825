//! Ending the machine's life cleanly: power-off through ACPI S5, restart through the ACPI reset register with the
//! keyboard controller and a triple fault as fallbacks.
//!
//! [`shutdown`] is the one entry point for the kernel's jobs: it first runs the caller's hook that leaves the
//! hypervisor clean (VMBus UNLOAD, then the Hyper-V teardown of SynIC, reference TSC and hypercall pages; the hook is
//! the caller's because this module knows neither), then powers off or restarts. Every step is logged on the console,
//! so a machine that keeps running says which step it was stuck on.
//!
//! - Power-off (ACPI 6.5 §16.1.6 and §4.8.3.2.1): the sleep-type values SLP_TYPa/SLP_TYPb of `\_S5` (read from the
//!   DSDT by [`acpi::s5_sleep_type`]) are written to PM1a_CNT/PM1b_CNT from the FADT, then again with SLP_EN set.
//!   If the firmware still owns the fixed hardware (SCI_EN clear), the FADT's ACPI_ENABLE value is written to its
//!   SMI_CMD port first (§4.8.3.1).
//! - Restart (§4.8.3.6): RESET_VALUE written to the FADT's reset register when its RESET_REG_SUP flag is set; else
//!   the 8042 keyboard controller's reset-line pulse (command 0xFE to port 0x64); else a triple fault (an empty IDT,
//!   then an interrupt).
//!
//! The unsafe code here is port I/O, the write of a memory-mapped reset register, and the IDT load of the last
//! fallback; each block says why it is sound.

use super::acpi::{self, AcpiError, ResetRegister, ResetTarget, SleepControl, SleepType};
use crate::exit::{ExitCode, exit, halt_forever};
use core::convert::Infallible;
use core::time::Duration;
use x86_64::instructions::interrupts;
use x86_64::instructions::port::Port;

/// PM1_CNT.SCI_EN: the fixed hardware raises SCIs, i.e. the OS (not SMM firmware) owns it (ACPI 6.5 table 4.13).
const PM1_CNT_SCI_EN: u16 = 1 << 0;
/// PM1_CNT.SLP_TYP: bits 12:10, the sleep type entered when SLP_EN is written.
const PM1_CNT_SLP_TYP_SHIFT: u16 = 10;
/// PM1_CNT.SLP_TYP's mask.
const PM1_CNT_SLP_TYP_MASK: u16 = 0b111 << PM1_CNT_SLP_TYP_SHIFT;
/// PM1_CNT.SLP_EN: write 1 to enter the sleep state in SLP_TYP (the bit reads as 0).
const PM1_CNT_SLP_EN: u16 = 1 << 13;

/// The 8042 keyboard controller's status (read) and command (write) port.
const KBC_STATUS_COMMAND_PORT: u16 = 0x64;
/// Status bit: the controller's input buffer is full (it has not taken the last command yet).
const KBC_INPUT_BUFFER_FULL: u8 = 1 << 1;
/// Command: pulse output line 0 (the CPU reset line) low.
const KBC_PULSE_RESET_LINE: u8 = 0xFE;

/// PCI configuration mechanism #1: the address port and the data window.
const PCI_CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// PCI configuration mechanism #1's data window (4 bytes).
const PCI_CONFIG_DATA_PORT: u16 = 0xCFC;

/// How long each step may take before the next is tried.
const STEP_TIMEOUT: Duration = Duration::from_millis(500);
/// How long firmware may take to hand over the fixed hardware after ACPI_ENABLE.
const ACPI_ENABLE_TIMEOUT: Duration = Duration::from_secs(1);

/// What [`shutdown`] does once the hypervisor is left clean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerAction {
    /// Enter ACPI S5 (soft off).
    PowerOff,
    /// Reset the machine, trying the reset methods in their order from the given one on.
    Restart(ResetMethod),
}

/// The ways [`restart`] resets the machine, in the order it tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ResetMethod {
    /// RESET_VALUE to the FADT's reset register (ACPI 6.5 §4.8.3.6), when the FADT says it is supported.
    AcpiResetRegister,
    /// Command 0xFE to the 8042 keyboard controller, which pulses the CPU reset line.
    KeyboardController,
    /// An empty IDT, then an interrupt: the CPU shuts down, and the chipset resets it.
    TripleFault,
}

impl ResetMethod {
    /// The method named `name` on the kernel command line (`reset=acpi|keyboard|triple-fault`, to start the
    /// sequence further down, e.g. to exercise a fallback); the whole sequence when there is no name. An unknown name
    /// is logged and means the whole sequence.
    pub fn first_from(name: Option<&str>) -> ResetMethod {
        match name {
            None | Some("acpi") => ResetMethod::AcpiResetRegister,
            Some("keyboard") => ResetMethod::KeyboardController,
            Some("triple-fault") => ResetMethod::TripleFault,
            Some(other) => {
                log::warn!("power: unknown reset method {other:?}; trying them all");
                ResetMethod::AcpiResetRegister
            }
        }
    }
}

impl core::fmt::Display for PowerAction {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PowerAction::PowerOff => "power-off",
            PowerAction::Restart(_) => "restart",
        })
    }
}

/// Why the machine did not power off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerError {
    /// The ACPI tables give no way to enter S5 (no PM1 control register, no `\_S5`, malformed tables).
    Acpi(AcpiError),
    /// SLP_TYP and SLP_EN were written, and the machine was still running afterwards.
    StillRunning(SleepType),
}

impl From<AcpiError> for PowerError {
    fn from(e: AcpiError) -> PowerError {
        PowerError::Acpi(e)
    }
}

impl core::fmt::Display for PowerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            PowerError::Acpi(e) => write!(f, "ACPI: {e}"),
            PowerError::StillRunning(s5) => write!(
                f,
                "still running {} ms after SLP_EN with SLP_TYPa {} / SLP_TYPb {}",
                STEP_TIMEOUT.as_millis(),
                s5.pm1a,
                s5.pm1b
            ),
        }
    }
}

/// Leaves the hypervisor clean with `leave_hypervisor` (the caller's VMBus UNLOAD and Hyper-V teardown), then
/// powers off or restarts as `action` says. A power-off that fails is reported and ends the run as a failure
/// ([`exit`]: QEMU's debug-exit device, else a halt), so it never passes for a clean shutdown.
pub fn shutdown(action: PowerAction, leave_hypervisor: impl FnOnce()) -> ! {
    log::info!("power: {action}: leaving the hypervisor clean first");
    leave_hypervisor();
    interrupts::disable();
    match action {
        PowerAction::PowerOff => {
            let Err(e) = power_off();
            log::error!("power: power-off failed: {e}");
            exit(ExitCode::Failure)
        }
        PowerAction::Restart(first) => restart(first),
    }
}

/// Enters ACPI S5 (soft off) with the `\_S5` values and the PM1 control registers of the firmware's tables. Returns
/// only when it could not: the tables give no way, or the machine kept running after SLP_EN.
pub fn power_off() -> Result<Infallible, PowerError> {
    let control = SleepControl::find(acpi::rsdp())?;
    let s5 = acpi::s5_sleep_type(acpi::rsdp())?;
    log::info!(
        "power: ACPI S5 with SLP_TYPa {} / SLP_TYPb {} through PM1a_CNT {:#x}{}",
        s5.pm1a,
        s5.pm1b,
        control.pm1a_port,
        match control.pm1b_port {
            Some(port) => alloc::format!(" and PM1b_CNT {port:#x}"),
            None => alloc::string::String::new(),
        }
    );
    enable_acpi_mode(&control);
    interrupts::disable();
    let registers = [(Some(control.pm1a_port), s5.pm1a), (control.pm1b_port, s5.pm1b)];
    let registers = registers.iter().filter_map(|&(port, sleep_type)| Some((port?, sleep_type)));
    // The sleep type first, then the same value with SLP_EN (which starts the transition), register a then b.
    let values: alloc::vec::Vec<(u16, u16)> = registers
        .map(|(port, sleep_type)| {
            let current = read_u16(port) & !(PM1_CNT_SLP_TYP_MASK | PM1_CNT_SLP_EN);
            (port, current | (u16::from(sleep_type) << PM1_CNT_SLP_TYP_SHIFT))
        })
        .collect();
    for &(port, value) in &values {
        write_u16(port, value);
    }
    for &(port, value) in &values {
        write_u16(port, value | PM1_CNT_SLP_EN);
    }
    wait(STEP_TIMEOUT);
    Err(PowerError::StillRunning(s5))
}

/// Hands the fixed hardware from firmware to the OS when it is not already (SCI_EN clear and the FADT names an
/// SMI command): writes ACPI_ENABLE to SMI_CMD and waits for SCI_EN. Logs and carries on when it does not come.
fn enable_acpi_mode(control: &SleepControl) {
    if read_u16(control.pm1a_port) & PM1_CNT_SCI_EN != 0 {
        return;
    }
    let Some((smi_port, enable)) = control.acpi_enable else {
        log::info!("power: SCI_EN is clear and the FADT names no SMI command; writing PM1 control anyway");
        return;
    };
    log::info!("power: handing the fixed hardware to the OS (ACPI_ENABLE {enable:#x} to SMI_CMD {smi_port:#x})");
    // SAFETY: the FADT names this port as SMI_CMD and this value as ACPI_ENABLE; writing it asks the firmware to
    // hand over the fixed hardware, which is what the kernel is about to use. No memory is involved.
    unsafe { Port::<u8>::new(smi_port).write(enable) };
    let enabled = wait_until(ACPI_ENABLE_TIMEOUT, || read_u16(control.pm1a_port) & PM1_CNT_SCI_EN != 0);
    if !enabled {
        log::warn!("power: SCI_EN still clear after ACPI_ENABLE; writing PM1 control anyway");
    }
}

/// Resets the machine: the FADT's ACPI reset register if it is supported, else the keyboard controller's reset
/// line, else a triple fault, starting at `first` ([`ResetMethod::AcpiResetRegister`] for the whole sequence). Logs
/// each step before taking it.
pub fn restart(first: ResetMethod) -> ! {
    interrupts::disable();
    if first <= ResetMethod::AcpiResetRegister {
        match ResetRegister::find(acpi::rsdp()) {
            Ok(reset) => {
                log::info!("power: restart through the ACPI reset register: {:#x} to {}", reset.value, reset.target);
                write_reset_register(&reset);
                wait(STEP_TIMEOUT);
                log::warn!("power: still running after the ACPI reset register");
            }
            Err(e) => log::info!("power: no ACPI reset register ({e})"),
        }
    }
    if first <= ResetMethod::KeyboardController {
        log::info!("power: restart through the keyboard controller (command {KBC_PULSE_RESET_LINE:#x} to port 0x64)");
        pulse_keyboard_controller_reset();
        wait(STEP_TIMEOUT);
        log::warn!("power: still running after the keyboard-controller reset");
    }

    log::info!("power: restart by triple fault (an empty IDT, then int3)");
    triple_fault()
}

/// Writes the reset value to the reset register, wherever it lives.
fn write_reset_register(reset: &ResetRegister) {
    match reset.target {
        ResetTarget::Io(port) => {
            // SAFETY: the FADT names this port as the reset register and this value as the one that resets the
            // machine (RESET_REG_SUP is set); resetting is what the caller asked for. No memory is involved.
            unsafe { Port::<u8>::new(port).write(reset.value) };
        }
        ResetTarget::Memory(address) => match crate::mm::paging::map_mmio(x86_64::PhysAddr::new(address), 1) {
            Ok(virt) => {
                // SAFETY: `virt` is a fresh uncached mapping of the one register byte the FADT names as the reset
                // register; no Rust object lives there, and resetting is what the caller asked for.
                unsafe { virt.as_mut_ptr::<u8>().write_volatile(reset.value) };
            }
            Err(e) => log::warn!("power: cannot map the reset register: {e:?}"),
        },
        ResetTarget::PciConfig { device, function, offset } => {
            let address = 1u32 << 31 | u32::from(device) << 11 | u32::from(function) << 8 | u32::from(offset) & 0xFC;
            // SAFETY: configuration mechanism #1 (ports 0xCF8/0xCFC) selects the byte of bus 0's configuration
            // space the FADT names as the reset register, then writes the reset value to it; resetting is what the
            // caller asked for. Interrupts are off, so nothing else uses the address port meanwhile.
            unsafe {
                Port::<u32>::new(PCI_CONFIG_ADDRESS_PORT).write(address);
                Port::<u8>::new(PCI_CONFIG_DATA_PORT + u16::from(offset & 3)).write(reset.value);
            }
        }
    }
}

/// Asks the 8042 keyboard controller to pulse the CPU reset line, after waiting (boundedly) for it to take
/// commands. On a machine without the controller the port reads as 0xFF and the write is ignored.
fn pulse_keyboard_controller_reset() {
    let ready = wait_until(STEP_TIMEOUT, || {
        // SAFETY: reading the 8042 status port has no side effect; without a controller it reads as 0xFF.
        let status = unsafe { Port::<u8>::new(KBC_STATUS_COMMAND_PORT).read() };
        status & KBC_INPUT_BUFFER_FULL == 0
    });
    if !ready {
        log::warn!("power: the keyboard controller's input buffer stays full; sending the command anyway");
    }
    // SAFETY: 0xFE to the 8042 command port pulses the CPU reset line, which is what the caller asked for; without
    // a controller the write is ignored. No memory is involved.
    unsafe { Port::<u8>::new(KBC_STATUS_COMMAND_PORT).write(KBC_PULSE_RESET_LINE) };
}

/// Loads an empty IDT and raises an interrupt: the CPU cannot deliver it, nor the double fault that follows, and
/// shuts down, which the chipset turns into a reset.
fn triple_fault() -> ! {
    let empty = x86_64::structures::DescriptorTablePointer { limit: 0, base: x86_64::VirtAddr::zero() };
    // SAFETY: interrupts are off and the kernel's last wish is a reset: from here no interrupt or exception handler
    // is meant to run again, so an IDT without entries is exactly what is wanted.
    unsafe { x86_64::instructions::tables::lidt(&empty) };
    x86_64::instructions::interrupts::int3();
    log::error!("power: the triple fault did not reset the machine");
    halt_forever()
}

/// Reads a 16-bit fixed-hardware register.
fn read_u16(port: u16) -> u16 {
    // SAFETY: only called with ports the FADT names as PM1 control registers, whose reads have no side effects.
    unsafe { Port::<u16>::new(port).read() }
}

/// Writes a 16-bit fixed-hardware register.
fn write_u16(port: u16, value: u16) {
    // SAFETY: only called with ports the FADT names as PM1 control registers, with the SLP_TYP/SLP_EN values this
    // module means to enter S5 with (the other bits as read). No memory is involved.
    unsafe { Port::<u16>::new(port).write(value) };
}

/// Waits about `duration`.
fn wait(duration: Duration) {
    wait_until(duration, || false);
}

/// Polls `done` until it holds or about `duration` passed; whether it held. Counts TSC ticks at the calibrated rate
/// (the hypervisor's clock may already be torn down), or a fixed number of polls before calibration.
fn wait_until(duration: Duration, mut done: impl FnMut() -> bool) -> bool {
    const POLLS_WITHOUT_CLOCK: u64 = 50_000_000;
    let ticks = crate::time::frequencies()
        .map(|f| u64::try_from(u128::from(f.tsc_hz) * duration.as_nanos() / 1_000_000_000).unwrap_or(u64::MAX));
    let start = crate::time::rdtsc();
    let mut polls = 0u64;
    loop {
        if done() {
            return true;
        }
        polls += 1;
        let over = match ticks {
            Some(ticks) => crate::time::rdtsc().wrapping_sub(start) >= ticks,
            None => polls >= POLLS_WITHOUT_CLOCK,
        };
        if over {
            return false;
        }
        core::hint::spin_loop();
    }
}
