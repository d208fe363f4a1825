//! The local APIC of the bootstrap processor: enable, end-of-interrupt, self-IPI and the APIC timer.
//!
//! Where CPUID.1:ECX bit 21 reports x2APIC, the APIC is switched to x2APIC mode and its registers are MSRs
//! (0x800 + register offset / 16); otherwise it stays in xAPIC mode and its 4 KiB register page is mapped uncached
//! through [`crate::mm::paging::map_mmio`]. Register offsets and bits follow the Intel SDM vol. 3A, chapter 11
//! ("Advanced Programmable Interrupt Controller"), and the x2APIC MSR map (table 11-6).
//!
//! The timer counts down from an initial count at the APIC bus (timer input) frequency divided by 16. That
//! frequency is not architectural: [`crate::time`] measures it, or takes it from the hypervisor, and hands it to
//! [`set_bus_frequency`].

use crate::arch::interrupts::{self, SPURIOUS_VECTOR};
use core::arch::x86_64::__cpuid;
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use spin::Once;
use x86_64::registers::model_specific::Msr;
use x86_64::{PhysAddr, VirtAddr};

/// The vector of the APIC's own error interrupt (LVT Error).
pub const ERROR_VECTOR: u8 = 0xFE;

/// IA32_APIC_BASE MSR.
const IA32_APIC_BASE: u32 = 0x1B;
/// IA32_APIC_BASE: x2APIC mode (EXTD).
const APIC_BASE_X2APIC_ENABLE: u64 = 1 << 10;
/// IA32_APIC_BASE: APIC global enable (EN).
const APIC_BASE_GLOBAL_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: the register page's physical address.
const APIC_BASE_ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// The first x2APIC register MSR.
const X2APIC_MSR_BASE: u32 = 0x800;
/// x2APIC SELF IPI register (MSR 0x83F; write-only, x2APIC mode only).
const X2APIC_SELF_IPI: u32 = 0x83F;

/// Register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16).
mod reg {
    pub const ID: u32 = 0x020;
    pub const VERSION: u32 = 0x030;
    pub const TASK_PRIORITY: u32 = 0x080;
    pub const EOI: u32 = 0x0B0;
    pub const SPURIOUS: u32 = 0x0F0;
    pub const IN_SERVICE: u32 = 0x100;
    pub const ERROR_STATUS: u32 = 0x280;
    pub const INTERRUPT_COMMAND_LOW: u32 = 0x300;
    pub const LVT_TIMER: u32 = 0x320;
    pub const LVT_LINT0: u32 = 0x350;
    pub const LVT_ERROR: u32 = 0x370;
    pub const TIMER_INITIAL_COUNT: u32 = 0x380;
    pub const TIMER_CURRENT_COUNT: u32 = 0x390;
    pub const TIMER_DIVIDE: u32 = 0x3E0;
}

/// Spurious-interrupt vector register: APIC software enable.
const SPURIOUS_APIC_ENABLE: u32 = 1 << 8;
/// LVT entries: masked.
const LVT_MASKED: u32 = 1 << 16;
/// LVT timer mode field: periodic (bits 18:17 = 01; 00 is one-shot).
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// ICR: level assert (must be set for fixed IPIs).
const ICR_ASSERT: u32 = 1 << 14;
/// ICR destination shorthand: self.
const ICR_SHORTHAND_SELF: u32 = 0b01 << 18;
/// ICR (xAPIC): delivery status, 1 while the IPI is being sent.
const ICR_SEND_PENDING: u32 = 1 << 12;
/// Divide configuration value for "divide by 16" (bits 3,1:0 = 0,11).
const TIMER_DIVIDE_BY_16: u32 = 0b0011;
/// The timer's divider, as configured.
pub const TIMER_DIVISOR: u64 = 16;

/// How the registers are reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// x2APIC: registers are MSRs.
    X2Apic,
    /// xAPIC: registers are a 4 KiB MMIO page, mapped at this address.
    XApic(VirtAddr),
}

impl core::fmt::Display for Mode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Mode::X2Apic => f.write_str("x2APIC mode"),
            Mode::XApic(base) => write!(f, "xAPIC mode, registers mapped uncached at {:#x}", base.as_u64()),
        }
    }
}

/// Why the local APIC could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApicError {
    /// CPUID.1:EDX bit 9 is clear.
    NotPresent,
    /// The xAPIC page could not be mapped.
    Map(crate::mm::paging::PagingError),
}

impl core::fmt::Display for ApicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ApicError::NotPresent => f.write_str("the CPU has no local APIC"),
            ApicError::Map(e) => write!(f, "mapping the xAPIC page: {e}"),
        }
    }
}

/// Why a timer could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerError {
    /// The APIC is not initialised.
    NoApic,
    /// [`set_bus_frequency`] has not been called.
    NotCalibrated,
    /// The interval does not fit the 32-bit initial count.
    TooLong,
    /// The vector is an exception vector.
    BadVector,
}

impl core::fmt::Display for TimerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            TimerError::NoApic => "the local APIC is not initialised",
            TimerError::NotCalibrated => "the APIC timer frequency is unknown",
            TimerError::TooLong => "interval too long for the APIC timer",
            TimerError::BadVector => "timer vector is a CPU exception vector",
        })
    }
}

/// Whether the timer fires once or repeatedly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// Fires once after the interval.
    OneShot,
    /// Fires every interval until [`stop_timer`].
    Periodic,
}

static MODE: Once<Mode> = Once::new();
/// Timer ticks per second after the divider; 0 until calibrated.
static TIMER_TICK_HZ: AtomicU64 = AtomicU64::new(0);
static ERRORS: AtomicU64 = AtomicU64::new(0);

fn read(mode: Mode, offset: u32) -> u32 {
    match mode {
        // SAFETY: in x2APIC mode, 0x800 + offset/16 is the architectural MSR of a readable APIC register; reading
        // it has no side effect for the registers this module reads.
        Mode::X2Apic => unsafe { Msr::new(X2APIC_MSR_BASE + (offset >> 4)).read() as u32 },
        // SAFETY: `base` maps the xAPIC register page (uncached, from `init`) for the kernel's lifetime; `offset`
        // is a 16-byte-aligned register offset inside it, read as the 32-bit access the APIC requires.
        Mode::XApic(base) => unsafe { (base + u64::from(offset)).as_ptr::<u32>().read_volatile() },
    }
}

fn write(mode: Mode, offset: u32, value: u32) {
    match mode {
        // SAFETY: as in `read`; the callers write only values the SDM allows for each register.
        Mode::X2Apic => unsafe { Msr::new(X2APIC_MSR_BASE + (offset >> 4)).write(u64::from(value)) },
        // SAFETY: as in `read`, a 32-bit volatile store to a register of the mapped page.
        Mode::XApic(base) => unsafe { (base + u64::from(offset)).as_mut_ptr::<u32>().write_volatile(value) },
    }
}

/// Whether the CPU supports x2APIC mode (CPUID.1:ECX bit 21).
pub fn x2apic_supported() -> bool {
    __cpuid(1).ecx & (1 << 21) != 0
}

/// Enables the local APIC (x2APIC where supported), sets the spurious and error vectors, masks LINT0 and the
/// timer, and programs the timer divider. Call after the IDT and paging are set up.
pub fn init() -> Result<Mode, ApicError> {
    if __cpuid(1).edx & (1 << 9) == 0 {
        return Err(ApicError::NotPresent);
    }
    let mut base_msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC (checked above); reading it has no side effect.
    let base = unsafe { base_msr.read() };
    // Firmware may already have chosen x2APIC mode, which cannot be left without disabling the APIC.
    let mode = if x2apic_supported() || base & APIC_BASE_X2APIC_ENABLE != 0 {
        // SAFETY: setting EN and EXTD together moves an enabled (or disabled) xAPIC to x2APIC mode, a transition the
        // SDM allows (§11.12.5); the base address bits are kept.
        unsafe { base_msr.write(base | APIC_BASE_GLOBAL_ENABLE | APIC_BASE_X2APIC_ENABLE) };
        Mode::X2Apic
    } else {
        // SAFETY: setting EN keeps (or puts) the APIC in xAPIC mode at the same base address.
        unsafe { base_msr.write(base | APIC_BASE_GLOBAL_ENABLE) };
        let page = PhysAddr::new(base & APIC_BASE_ADDRESS_MASK);
        Mode::XApic(crate::mm::paging::map_mmio(page, 4096).map_err(ApicError::Map)?)
    };
    let mode = *MODE.call_once(|| mode);
    write(mode, reg::TASK_PRIORITY, 0);
    write(mode, reg::LVT_LINT0, LVT_MASKED);
    write(mode, reg::LVT_TIMER, LVT_MASKED);
    // The firmware may have left the timer counting: stop it, or a later one-shot fires twice.
    write(mode, reg::TIMER_INITIAL_COUNT, 0);
    write(mode, reg::TIMER_DIVIDE, TIMER_DIVIDE_BY_16);
    // Clear errors latched before (the write arms the register, x2APIC requires the value 0).
    write(mode, reg::ERROR_STATUS, 0);
    if let Err(e) = interrupts::register(ERROR_VECTOR, count_apic_error) {
        log::warn!("apic: error vector: {e}");
    }
    write(mode, reg::LVT_ERROR, u32::from(ERROR_VECTOR));
    write(mode, reg::SPURIOUS, SPURIOUS_APIC_ENABLE | u32::from(SPURIOUS_VECTOR));
    // Acknowledge anything firmware left in service.
    write(mode, reg::EOI, 0);
    Ok(mode)
}

/// The mode chosen by [`init`], or `None` before it ran.
pub fn mode() -> Option<Mode> {
    MODE.get().copied()
}

/// This CPU's APIC ID (x2APIC: the full 32 bits; xAPIC: bits 31:24 of the ID register).
pub fn id() -> Option<u32> {
    let mode = mode()?;
    let raw = read(mode, reg::ID);
    Some(if mode == Mode::X2Apic { raw } else { raw >> 24 })
}

/// The version register: version in bits 7:0, highest LVT entry in bits 23:16.
pub fn version() -> Option<u32> {
    mode().map(|m| read(m, reg::VERSION))
}

fn count_apic_error() {
    if let Some(mode) = mode() {
        write(mode, reg::ERROR_STATUS, 0);
    }
    ERRORS.fetch_add(1, Ordering::Relaxed);
}

/// How many APIC error interrupts arrived.
pub fn error_count() -> u64 {
    ERRORS.load(Ordering::Relaxed)
}

/// Whether `vector` is marked in service (its interrupt was accepted and not yet acknowledged).
pub fn in_service(vector: u8) -> bool {
    let Some(mode) = mode() else { return false };
    let word = read(mode, reg::IN_SERVICE + u32::from(vector / 32) * 0x10);
    word & (1 << (vector % 32)) != 0
}

/// Signals end-of-interrupt if `vector` is in service. Safe to call from interrupt handlers (no locks).
pub fn end_of_interrupt_if_in_service(vector: u8) {
    if in_service(vector) {
        end_of_interrupt();
    }
}

/// Signals end-of-interrupt for the highest-priority vector in service.
pub fn end_of_interrupt() {
    if let Some(mode) = mode() {
        write(mode, reg::EOI, 0);
    }
}

/// Sends a fixed interrupt with `vector` to this CPU. It arrives as soon as interrupts are enabled.
pub fn send_self_ipi(vector: u8) -> Result<(), TimerError> {
    if vector < 32 {
        return Err(TimerError::BadVector);
    }
    match mode().ok_or(TimerError::NoApic)? {
        // SAFETY: SELF IPI (MSR 0x83F) exists in x2APIC mode; writing a vector sends a fixed, edge-triggered
        // interrupt to this CPU only.
        Mode::X2Apic => unsafe { Msr::new(X2APIC_SELF_IPI).write(u64::from(vector)) },
        mode @ Mode::XApic(_) => {
            // The destination field (ICR high) is ignored with the "self" shorthand.
            write(mode, reg::INTERRUPT_COMMAND_LOW, ICR_SHORTHAND_SELF | ICR_ASSERT | u32::from(vector));
            for _ in 0..1_000_000 {
                if read(mode, reg::INTERRUPT_COMMAND_LOW) & ICR_SEND_PENDING == 0 {
                    break;
                }
                core::hint::spin_loop();
            }
        }
    }
    Ok(())
}

/// Records the APIC bus (timer input) frequency, before the divider; called by [`crate::time`] calibration.
pub fn set_bus_frequency(bus_hz: u64) {
    TIMER_TICK_HZ.store(bus_hz / TIMER_DIVISOR, Ordering::Relaxed);
}

/// Timer ticks per second (after the divider), or 0 before calibration.
pub fn timer_tick_hz() -> u64 {
    TIMER_TICK_HZ.load(Ordering::Relaxed)
}

/// Starts the timer: interrupt `vector` after `interval` (and every `interval` after that in periodic mode).
/// Replaces a running timer.
pub fn start_timer(mode: TimerMode, vector: u8, interval: Duration) -> Result<(), TimerError> {
    if vector < 32 {
        return Err(TimerError::BadVector);
    }
    let apic = self::mode().ok_or(TimerError::NoApic)?;
    let hz = timer_tick_hz();
    if hz == 0 {
        return Err(TimerError::NotCalibrated);
    }
    let ticks = (interval.as_nanos() * u128::from(hz)).div_ceil(1_000_000_000).max(1);
    let ticks = u32::try_from(ticks).map_err(|_| TimerError::TooLong)?;
    let lvt = u32::from(vector) | if mode == TimerMode::Periodic { LVT_TIMER_PERIODIC } else { 0 };
    // Order per the SDM: LVT (mode, vector) first, then the initial count, which starts the countdown.
    write(apic, reg::LVT_TIMER, lvt);
    write(apic, reg::TIMER_INITIAL_COUNT, ticks);
    Ok(())
}

/// Stops the timer and masks its interrupt.
pub fn stop_timer() {
    if let Some(apic) = mode() {
        write(apic, reg::LVT_TIMER, LVT_MASKED);
        write(apic, reg::TIMER_INITIAL_COUNT, 0);
    }
}

/// Starts a masked one-shot countdown from `u32::MAX`, for calibration: [`timer_current_count`] then falls at the
/// timer rate for about a minute (at 1 GHz / 16) without raising an interrupt.
pub fn start_free_running_count() -> Result<(), TimerError> {
    let apic = mode().ok_or(TimerError::NoApic)?;
    write(apic, reg::LVT_TIMER, LVT_MASKED);
    write(apic, reg::TIMER_INITIAL_COUNT, u32::MAX);
    Ok(())
}

/// The timer's current count (0 when it is stopped or has expired).
pub fn timer_current_count() -> u32 {
    mode().map_or(0, |m| read(m, reg::TIMER_CURRENT_COUNT))
}

use crate::ktest::{KTest, TestResult};
use crate::{kassert, kassert_eq};
use alloc::format;

/// In-kernel tests of the local APIC: self-IPIs and the timer.
pub const KTESTS: &[KTest] = &[
    KTest { name: "arch::apic::is_enabled", run: is_enabled },
    KTest { name: "arch::apic::self_ipi_runs_registered_handler", run: self_ipi_runs_registered_handler },
    KTest { name: "arch::apic::self_ipi_waits_for_interrupts_enabled", run: self_ipi_waits_for_interrupts_enabled },
    KTest { name: "arch::apic::timer_one_shot_fires_once", run: timer_one_shot_fires_once },
    KTest { name: "arch::apic::timer_periodic_tick_count", run: timer_periodic_tick_count },
];

fn is_enabled() -> TestResult {
    let apic = mode().ok_or("APIC not initialised")?;
    kassert_eq!(apic == Mode::X2Apic, x2apic_supported());
    let spurious = read(apic, reg::SPURIOUS);
    kassert!(spurious & SPURIOUS_APIC_ENABLE != 0, "APIC software-disabled: {spurious:#x}");
    kassert_eq!(spurious & 0xFF, u32::from(SPURIOUS_VECTOR));
    kassert_eq!(read(apic, reg::TIMER_DIVIDE) & 0b1011, TIMER_DIVIDE_BY_16);
    kassert!(timer_tick_hz() > 0, "timer not calibrated");
    kassert_eq!(error_count(), 0);
    Ok(())
}

/// Spins until `done()` or `limit` passes; returns whether `done()` became true.
fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = crate::time::now() + limit.as_nanos() as u64;
    while crate::time::now() < deadline {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

const TEST_IPI_VECTOR: u8 = 0x44;
static IPI_HITS: AtomicU64 = AtomicU64::new(0);

fn count_ipi() {
    IPI_HITS.fetch_add(1, Ordering::Relaxed);
}

fn self_ipi_runs_registered_handler() -> TestResult {
    interrupts::register(TEST_IPI_VECTOR, count_ipi).map_err(|e| format!("register: {e}"))?;
    let before = IPI_HITS.load(Ordering::Relaxed);
    let sent = send_self_ipi(TEST_IPI_VECTOR);
    let arrived = wait_until(Duration::from_millis(100), || IPI_HITS.load(Ordering::Relaxed) > before);
    interrupts::unregister(TEST_IPI_VECTOR);
    kassert_eq!(sent, Ok(()));
    kassert!(arrived, "self-IPI on {TEST_IPI_VECTOR:#x} did not arrive within 100 ms");
    kassert_eq!(IPI_HITS.load(Ordering::Relaxed), before + 1);
    kassert!(!in_service(TEST_IPI_VECTOR), "the IPI was not acknowledged");
    Ok(())
}

fn self_ipi_waits_for_interrupts_enabled() -> TestResult {
    interrupts::register(TEST_IPI_VECTOR, count_ipi).map_err(|e| format!("register: {e}"))?;
    let before = IPI_HITS.load(Ordering::Relaxed);
    let while_disabled = x86_64::instructions::interrupts::without_interrupts(|| {
        let sent = send_self_ipi(TEST_IPI_VECTOR);
        crate::time::sleep(Duration::from_millis(5));
        (sent, IPI_HITS.load(Ordering::Relaxed))
    });
    let arrived = wait_until(Duration::from_millis(100), || IPI_HITS.load(Ordering::Relaxed) > before);
    interrupts::unregister(TEST_IPI_VECTOR);
    kassert_eq!(while_disabled, (Ok(()), before));
    kassert!(arrived, "the pending IPI was not delivered once interrupts were enabled");
    Ok(())
}

const TEST_TIMER_VECTOR: u8 = 0x45;
static TIMER_HITS: AtomicU64 = AtomicU64::new(0);
static TIMER_LAST_NS: AtomicU64 = AtomicU64::new(0);

fn count_timer() {
    TIMER_HITS.fetch_add(1, Ordering::Relaxed);
    TIMER_LAST_NS.store(crate::time::now(), Ordering::Relaxed);
}

fn timer_one_shot_fires_once() -> TestResult {
    interrupts::register(TEST_TIMER_VECTOR, count_timer).map_err(|e| format!("register: {e}"))?;
    TIMER_HITS.store(0, Ordering::Relaxed);
    let interval = Duration::from_millis(20);
    let start = crate::time::now();
    let started = start_timer(TimerMode::OneShot, TEST_TIMER_VECTOR, interval);
    let fired = wait_until(Duration::from_secs(1), || TIMER_HITS.load(Ordering::Relaxed) > 0);
    // A one-shot timer must stay quiet afterwards.
    crate::time::sleep(Duration::from_millis(60));
    stop_timer();
    interrupts::unregister(TEST_TIMER_VECTOR);
    kassert_eq!(started, Ok(()));
    kassert!(fired, "one-shot timer did not fire within 1 s");
    kassert_eq!(TIMER_HITS.load(Ordering::Relaxed), 1);
    let after_ms = TIMER_LAST_NS.load(Ordering::Relaxed).saturating_sub(start) / 1_000_000;
    // TCG timing is noisy: accept half the interval up to the interval plus a quarter second of host delay.
    kassert!((10..=270).contains(&after_ms), "a 20 ms one-shot fired after {after_ms} ms");
    Ok(())
}

fn timer_periodic_tick_count() -> TestResult {
    interrupts::register(TEST_TIMER_VECTOR, count_timer).map_err(|e| format!("register: {e}"))?;
    TIMER_HITS.store(0, Ordering::Relaxed);
    let started = start_timer(TimerMode::Periodic, TEST_TIMER_VECTOR, Duration::from_millis(10));
    let start = crate::time::now();
    crate::time::sleep(Duration::from_millis(300));
    let ticks = TIMER_HITS.load(Ordering::Relaxed);
    let elapsed_ms = (crate::time::now() - start) / 1_000_000;
    stop_timer();
    crate::time::sleep(Duration::from_millis(30));
    let after_stop = TIMER_HITS.load(Ordering::Relaxed);
    interrupts::unregister(TEST_TIMER_VECTOR);
    kassert_eq!(started, Ok(()));
    let expected = elapsed_ms / 10;
    kassert!(
        ticks * 2 >= expected && ticks <= expected * 3 / 2 + 1,
        "{ticks} ticks of a 10 ms periodic timer in {elapsed_ms} ms (expected about {expected})"
    );
    kassert!(after_stop <= ticks + 1, "the timer kept firing after stop: {ticks} then {after_stop}");
    log::info!("apic timer: {ticks} periodic ticks of 10 ms in {elapsed_ms} ms");
    Ok(())
}
