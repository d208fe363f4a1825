//! Time: a monotonic nanosecond clock, busy-wait sleeping, the calibration of the TSC and the local APIC timer, and
//! the kernel timer.
//!
//! Neither the TSC rate nor the APIC timer's input rate is architectural, so both are learnt at boot from a
//! [`FrequencySource`], tried in this order:
//! 1. the hypervisor's own report, [`HypervisorTime::frequencies`] (Hyper-V: the TSC and APIC frequency MSRs of TLFS
//!    §12.3, HV_X64_MSR_TSC_FREQUENCY and HV_X64_MSR_APIC_FREQUENCY, from [`crate::hyperv`]; a Gen2 VM has no PIT, and
//!    its port 0x61 never signals);
//! 2. a hypervisor counter of known rate, [`HypervisorTime::reference_counter`] (Hyper-V: the 10 MHz partition
//!    reference counter), measured against;
//! 3. the ACPI PM timer ([`AcpiPmTimerSource`], 3.579545 MHz, found through the FADT);
//! 4. PIT channel 2 gated through port 0x61 ([`PitSource`], 1.193182 MHz).
//!
//! The measuring sources watch the TSC and a free-running APIC countdown across a fixed number of reference ticks,
//! three times, and keep the median. The source used is logged.
//!
//! The clock ([`now`]) is the hypervisor's [`ClockSource`] when it offers one (Hyper-V: the reference TSC page),
//! otherwise the calibrated TSC. The kernel timer ([`start_timer`]) is the hypervisor's [`TimerDevice`] when it
//! offers one (Hyper-V: synthetic timer 0), otherwise the local APIC timer. Both choices are logged at boot.

use crate::arch::{acpi, apic, interrupts, pit};
use core::sync::atomic::{AtomicU64, Ordering, compiler_fence};
use core::time::Duration;
use spin::{Mutex, Once};

pub use crate::arch::apic::TimerMode;

/// What calibration learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frequencies {
    /// TSC increments per second.
    pub tsc_hz: u64,
    /// The local APIC timer's input ("bus") frequency before its divider, in Hz; 0 without a local APIC.
    pub apic_bus_hz: u64,
}

/// Why a source could not calibrate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CalibrationError {
    /// The reference is absent on this machine.
    Unavailable(&'static str),
    /// The reference did not advance within the time limit.
    Stuck,
    /// The result is outside the range any real machine has.
    Implausible(Frequencies),
    /// No source worked.
    NoSource,
}

impl core::fmt::Display for CalibrationError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CalibrationError::Unavailable(why) => write!(f, "unavailable: {why}"),
            CalibrationError::Stuck => f.write_str("the reference counter does not advance"),
            CalibrationError::Implausible(fr) => {
                write!(f, "implausible result: TSC {} Hz, APIC bus {} Hz", fr.tsc_hz, fr.apic_bus_hz)
            }
            CalibrationError::NoSource => f.write_str("no frequency source works"),
        }
    }
}

/// A way to learn the TSC and APIC timer frequencies: a hypervisor interface that reports them, or a reference
/// counter of known rate to measure them against.
pub trait FrequencySource {
    /// A short name for the log ("ACPI PM timer", "Hyper-V frequency MSRs").
    fn name(&self) -> &'static str;
    /// Reports or measures the frequencies. Called with interrupts disabled, before [`init`] returns.
    fn frequencies(&self) -> Result<Frequencies, CalibrationError>;
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // Keep the compiler from moving memory accesses across the read.
    compiler_fence(Ordering::SeqCst);
    // SAFETY: RDTSC has no side effects; CR4.TSD is clear in ring 0 either way.
    let tsc = unsafe { core::arch::x86_64::_rdtsc() };
    compiler_fence(Ordering::SeqCst);
    tsc
}

/// The TSC and APIC countdown at one instant.
#[derive(Clone, Copy)]
struct Snapshot {
    tsc: u64,
    apic_count: u32,
}

fn snapshot() -> Snapshot {
    Snapshot { tsc: rdtsc(), apic_count: apic::timer_current_count() }
}

/// Length of one measuring round, in milliseconds.
const ROUND_MS: u64 = 20;
/// Measuring rounds per source; the median is kept.
const ROUNDS: usize = 3;
/// A round that takes more TSC cycles than this has a stuck reference (2^34: seconds on any real TSC).
const ROUND_TSC_LIMIT: u64 = 1 << 34;
/// A round that polls the reference more often than this has a stuck reference (or a stuck TSC).
const ROUND_POLL_LIMIT: u64 = 100_000_000;

/// Turns one round (`reference_ticks` of a `reference_hz` counter between two snapshots) into frequencies.
fn frequencies_from(start: Snapshot, end: Snapshot, reference_ticks: u64, reference_hz: u64) -> Frequencies {
    let scale = |delta: u64| (u128::from(delta) * u128::from(reference_hz) / u128::from(reference_ticks.max(1))) as u64;
    let apic_ticks = u64::from(start.apic_count.saturating_sub(end.apic_count));
    Frequencies { tsc_hz: scale(end.tsc - start.tsc), apic_bus_hz: scale(apic_ticks) * apic::TIMER_DIVISOR }
}

/// Runs `round` [`ROUNDS`] times with a free-running APIC countdown and returns the median by TSC rate.
fn measure(mut round: impl FnMut() -> Result<Frequencies, CalibrationError>) -> Result<Frequencies, CalibrationError> {
    let have_apic = apic::start_free_running_count().is_ok();
    let mut results = [Frequencies { tsc_hz: 0, apic_bus_hz: 0 }; ROUNDS];
    for slot in &mut results {
        *slot = round()?;
    }
    apic::stop_timer();
    results.sort_unstable_by_key(|f| f.tsc_hz);
    let median = results[ROUNDS / 2];
    let tsc_ok = (50_000_000..=50_000_000_000).contains(&median.tsc_hz);
    let apic_ok = if have_apic { (1_000_000..=50_000_000_000).contains(&median.apic_bus_hz) } else { true };
    if tsc_ok && apic_ok { Ok(median) } else { Err(CalibrationError::Implausible(median)) }
}

/// Calibration against the ACPI PM timer.
pub struct AcpiPmTimerSource(pub acpi::PmTimer);

impl AcpiPmTimerSource {
    /// One round: from a tick edge across [`ROUND_MS`] worth of PM timer ticks.
    fn round(&self) -> Result<Frequencies, CalibrationError> {
        let timer = &self.0;
        let wanted = acpi::PM_TIMER_HZ * ROUND_MS / 1000;
        let mut polls = 0u64;
        let first = timer.read();
        let mut edge = first;
        while edge == first {
            polls += 1;
            if polls > ROUND_POLL_LIMIT {
                return Err(CalibrationError::Stuck);
            }
            edge = timer.read();
        }
        let start = snapshot();
        loop {
            let now = timer.read();
            let end = snapshot();
            let elapsed = u64::from(timer.elapsed(edge, now));
            if elapsed >= wanted {
                return Ok(frequencies_from(start, end, elapsed, acpi::PM_TIMER_HZ));
            }
            polls += 1;
            if polls > ROUND_POLL_LIMIT || end.tsc - start.tsc > ROUND_TSC_LIMIT {
                return Err(CalibrationError::Stuck);
            }
        }
    }
}

impl FrequencySource for AcpiPmTimerSource {
    fn name(&self) -> &'static str {
        "ACPI PM timer"
    }

    fn frequencies(&self) -> Result<Frequencies, CalibrationError> {
        measure(|| self.round())
    }
}

/// Calibration against PIT channel 2 (port 0x61 gate method).
pub struct PitSource;

impl PitSource {
    fn round() -> Result<Frequencies, CalibrationError> {
        let count = pit::PIT_HZ * ROUND_MS / 1000;
        let one_shot = pit::OneShot::start(count as u16).map_err(|_| CalibrationError::Unavailable("no PIT"))?;
        let start = snapshot();
        let mut polls = 0u64;
        loop {
            let expired = one_shot.expired();
            let end = snapshot();
            if expired {
                return Ok(frequencies_from(start, end, count, pit::PIT_HZ));
            }
            polls += 1;
            if polls > ROUND_POLL_LIMIT || end.tsc - start.tsc > ROUND_TSC_LIMIT {
                return Err(CalibrationError::Stuck);
            }
        }
    }
}

impl FrequencySource for PitSource {
    fn name(&self) -> &'static str {
        "PIT channel 2"
    }

    fn frequencies(&self) -> Result<Frequencies, CalibrationError> {
        measure(Self::round)
    }
}

/// Calibration against a free-running counter of known rate that a hypervisor provides (Hyper-V: the partition
/// reference counter, 10 MHz).
#[derive(Clone, Copy)]
pub struct CounterSource {
    /// The counter's name, for the log.
    pub name: &'static str,
    /// Its rate in Hz.
    pub hz: u64,
    /// Reads it; `None` when it cannot be read.
    pub read: fn() -> Option<u64>,
}

impl CounterSource {
    /// One round: from a counter edge across [`ROUND_MS`] worth of counter ticks.
    fn round(&self) -> Result<Frequencies, CalibrationError> {
        let read = || (self.read)().ok_or(CalibrationError::Unavailable("the counter cannot be read"));
        let wanted = self.hz * ROUND_MS / 1000;
        let mut polls = 0u64;
        let first = read()?;
        let mut edge = first;
        while edge == first {
            polls += 1;
            if polls > ROUND_POLL_LIMIT {
                return Err(CalibrationError::Stuck);
            }
            edge = read()?;
        }
        let start = snapshot();
        loop {
            let now = read()?;
            let end = snapshot();
            let elapsed = now.wrapping_sub(edge);
            if elapsed >= wanted {
                return Ok(frequencies_from(start, end, elapsed, self.hz));
            }
            polls += 1;
            if polls > ROUND_POLL_LIMIT || end.tsc - start.tsc > ROUND_TSC_LIMIT {
                return Err(CalibrationError::Stuck);
            }
        }
    }
}

impl FrequencySource for CounterSource {
    fn name(&self) -> &'static str {
        self.name
    }

    fn frequencies(&self) -> Result<Frequencies, CalibrationError> {
        measure(|| self.round())
    }
}

/// A clock a hypervisor provides, used by [`now`] instead of the calibrated TSC (Hyper-V: the reference TSC page).
pub trait ClockSource: Sync {
    /// A short name for the log.
    fn name(&self) -> &'static str;
    /// Nanoseconds since some fixed point; never goes backwards.
    fn now_ns(&self) -> u64;
}

/// A device that raises the kernel timer's interrupt: the local APIC timer, or a hypervisor's timer (Hyper-V:
/// synthetic timer 0). On expiry its interrupt handler calls [`timer_expired`].
pub trait TimerDevice: Sync {
    /// A short name for the log.
    fn name(&self) -> &'static str;
    /// Fires after `interval` (and every `interval` after that in periodic mode); replaces a running timer.
    fn start(&self, mode: TimerMode, interval: Duration) -> Result<(), TimerError>;
    /// Stops the timer.
    fn stop(&self);
}

/// Why the kernel timer could not be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerError {
    /// No timer device: neither the hypervisor's nor a calibrated local APIC timer.
    NoTimer,
    /// The local APIC timer refused.
    Apic(apic::TimerError),
    /// The hypervisor's timer refused, for the reason given.
    Device(&'static str),
}

impl core::fmt::Display for TimerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TimerError::NoTimer => f.write_str("no kernel timer device"),
            TimerError::Apic(e) => write!(f, "APIC timer: {e}"),
            TimerError::Device(why) => f.write_str(why),
        }
    }
}

/// What a hypervisor adds to the kernel's time keeping, each part optional; passed to [`init`].
#[derive(Clone, Copy, Default)]
pub struct HypervisorTime {
    /// A source that reports the TSC and APIC timer frequencies.
    pub frequencies: Option<&'static dyn FrequencySource>,
    /// A counter of known rate to measure the frequencies against.
    pub reference_counter: Option<CounterSource>,
    /// A clock to use instead of the calibrated TSC.
    pub clock: Option<&'static dyn ClockSource>,
    /// A timer device to use instead of the local APIC timer.
    pub timer: Option<&'static dyn TimerDevice>,
}

/// The vector of the kernel timer when the local APIC timer drives it.
pub const KERNEL_TIMER_VECTOR: u8 = 0x40;

/// The local APIC timer as the kernel timer device.
struct ApicTimer;

impl TimerDevice for ApicTimer {
    fn name(&self) -> &'static str {
        "local APIC timer"
    }

    fn start(&self, mode: TimerMode, interval: Duration) -> Result<(), TimerError> {
        apic::start_timer(mode, KERNEL_TIMER_VECTOR, interval).map_err(TimerError::Apic)
    }

    fn stop(&self) {
        apic::stop_timer();
    }
}

fn apic_timer_interrupt() {
    timer_expired();
}

/// The kernel timer's device, chosen by [`init`].
static TIMER: Once<&'static dyn TimerDevice> = Once::new();
/// What an expiry calls; written with interrupts disabled, so the handler never finds it locked.
static TIMER_CALLBACK: Mutex<Option<fn()>> = Mutex::new(None);
/// Expiries reported by the timer device since boot.
static TIMER_EXPIRIES: AtomicU64 = AtomicU64::new(0);

/// Starts the kernel timer: `on_expiry` runs in interrupt context after `interval` (and every `interval` after that
/// in periodic mode). Replaces a running timer and its callback.
pub fn start_timer(mode: TimerMode, interval: Duration, on_expiry: fn()) -> Result<(), TimerError> {
    let device = TIMER.get().ok_or(TimerError::NoTimer)?;
    x86_64::instructions::interrupts::without_interrupts(|| {
        *TIMER_CALLBACK.lock() = Some(on_expiry);
        device.start(mode, interval)
    })
}

/// Stops the kernel timer and forgets its callback.
pub fn stop_timer() {
    x86_64::instructions::interrupts::without_interrupts(|| {
        if let Some(device) = TIMER.get() {
            device.stop();
        }
        *TIMER_CALLBACK.lock() = None;
    });
}

/// Called by the timer device's interrupt handler on each expiry: counts it and runs the callback.
pub fn timer_expired() {
    TIMER_EXPIRIES.fetch_add(1, Ordering::Relaxed);
    let callback = *TIMER_CALLBACK.lock();
    if let Some(callback) = callback {
        callback();
    }
}

/// Expiries of the kernel timer since boot.
pub fn timer_expiries() -> u64 {
    TIMER_EXPIRIES.load(Ordering::Relaxed)
}

/// The kernel timer device's name, or `None` when there is none.
pub fn timer_name() -> Option<&'static str> {
    TIMER.get().map(|device| device.name())
}

/// The kernel clock.
struct Clock {
    /// TSC value at time 0.
    tsc_at_zero: u64,
    /// Nanoseconds per TSC tick, as a 32.32 fixed-point number (0 when the TSC is not calibrated).
    ns_per_tick_fp32: u64,
    /// What calibration learnt, and from which source.
    calibration: Option<(Frequencies, &'static str)>,
    /// The hypervisor's clock and its reading at time 0, when it is the clock.
    hypervisor: Option<(&'static dyn ClockSource, u64)>,
}

static CLOCK: Once<Clock> = Once::new();

/// Whether the CPU says its TSC runs at a constant rate in every power state (CPUID.80000007H:EDX bit 8).
pub fn invariant_tsc() -> bool {
    use core::arch::x86_64::__cpuid;
    __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

/// Tries the frequency sources in order; returns the first result and the source's name.
fn calibrate(hypervisor: &HypervisorTime) -> Result<(Frequencies, &'static str), CalibrationError> {
    let pm_timer = match acpi::PmTimer::find(acpi::rsdp()) {
        Ok(timer) => Some(AcpiPmTimerSource(timer)),
        Err(e) => {
            log::info!("time: no ACPI PM timer ({e})");
            None
        }
    };
    let candidates: [Option<&dyn FrequencySource>; 4] = [
        hypervisor.frequencies,
        hypervisor.reference_counter.as_ref().map(|s| s as &dyn FrequencySource),
        pm_timer.as_ref().map(|s| s as &dyn FrequencySource),
        Some(&PitSource),
    ];
    for source in candidates.into_iter().flatten() {
        match source.frequencies() {
            Ok(frequencies) => return Ok((frequencies, source.name())),
            Err(e) => log::warn!("time: {} cannot calibrate: {e}", source.name()),
        }
    }
    Err(CalibrationError::NoSource)
}

/// Calibrates the TSC and the APIC timer (from `hypervisor`'s report or counter, then the ACPI PM timer found through
/// [`acpi::rsdp`], then the PIT), and chooses the clock (`hypervisor.clock`, else the TSC) and the kernel timer
/// (`hypervisor.timer`, else the local APIC timer). Call once, after [`apic::init`], with interrupts disabled.
/// Returns the frequencies and the calibration source's name; with a hypervisor clock the kernel has a clock even when
/// calibration fails.
pub fn init(hypervisor: HypervisorTime) -> Result<(Frequencies, &'static str), CalibrationError> {
    // Firmware (OVMF) leaves the APIC timer counting with its own period; `apic::init` masks it but does not stop the
    // count, and a later one-shot that unmasks the LVT first then sees that count expire too (seen under KVM, where
    // the frequency MSRs spare the measuring sources' own stop). Stop it before anything uses the timer.
    apic::stop_timer();
    let calibration = calibrate(&hypervisor);
    if calibration.is_err() && hypervisor.clock.is_none() {
        return Err(CalibrationError::NoSource);
    }
    let clock = CLOCK.call_once(|| Clock {
        tsc_at_zero: rdtsc(),
        ns_per_tick_fp32: calibration
            .as_ref()
            .map_or(0, |(f, _)| ((1_000_000_000u128 << 32) / u128::from(f.tsc_hz)) as u64),
        calibration: calibration.ok(),
        hypervisor: hypervisor.clock.map(|source| (source, source.now_ns())),
    });
    if let Some((frequencies, source)) = clock.calibration {
        apic::set_bus_frequency(frequencies.apic_bus_hz);
        log::info!(
            "time: calibrated with {}: TSC {}.{:03} MHz{}, APIC bus {}.{:03} MHz",
            source,
            frequencies.tsc_hz / 1_000_000,
            frequencies.tsc_hz / 1000 % 1000,
            if invariant_tsc() { " (invariant)" } else { "" },
            frequencies.apic_bus_hz / 1_000_000,
            frequencies.apic_bus_hz / 1000 % 1000,
        );
    }
    let timer: Option<&'static dyn TimerDevice> = match hypervisor.timer {
        Some(device) => Some(device),
        None if apic::timer_tick_hz() > 0 => match interrupts::register(KERNEL_TIMER_VECTOR, apic_timer_interrupt) {
            Ok(()) => Some(&ApicTimer),
            Err(e) => {
                log::warn!("time: kernel timer vector: {e}");
                None
            }
        },
        None => None,
    };
    if let Some(device) = timer {
        TIMER.call_once(|| device);
    }
    log::info!(
        "time: clock {}; kernel timer {}{}",
        clock_name().unwrap_or("none"),
        timer_name().unwrap_or("none"),
        if hypervisor.clock.is_none() && hypervisor.timer.is_none() { " (no hypervisor clock or timer)" } else { "" }
    );
    clock.calibration.ok_or(CalibrationError::NoSource)
}

/// Nanoseconds since [`init`], from the hypervisor's clock or the TSC; 0 before [`init`] succeeded. Never goes
/// backwards on one CPU.
pub fn now() -> u64 {
    let Some(clock) = CLOCK.get() else { return 0 };
    if let Some((source, at_zero)) = clock.hypervisor {
        return source.now_ns().saturating_sub(at_zero);
    }
    let ticks = rdtsc().saturating_sub(clock.tsc_at_zero);
    ((u128::from(ticks) * u128::from(clock.ns_per_tick_fp32)) >> 32) as u64
}

/// The wall clock: UNIX time in nanoseconds at [`now`] = 0, once a time source (the timesync integration service)
/// set it.
static WALL_CLOCK_AT_ZERO: spin::Mutex<Option<i128>> = spin::Mutex::new(None);

/// Sets the wall clock: at monotonic time `at_ns` ([`now`]'s scale), UNIX time was `unix_time_ns`. Returns the
/// correction against the previous setting in nanoseconds (`None` the first time).
pub fn set_wall_clock(unix_time_ns: i128, at_ns: u64) -> Option<i128> {
    let at_zero = unix_time_ns - i128::from(at_ns);
    WALL_CLOCK_AT_ZERO.lock().replace(at_zero).map(|previous| at_zero - previous)
}

/// UNIX time in nanoseconds now, or `None` while no time source has set the wall clock.
pub fn wall_clock_ns() -> Option<i128> {
    WALL_CLOCK_AT_ZERO.lock().map(|at_zero| at_zero + i128::from(now()))
}

/// The calibrated frequencies, or `None` before [`init`] succeeded.
pub fn frequencies() -> Option<Frequencies> {
    CLOCK.get().and_then(|c| c.calibration).map(|(frequencies, _)| frequencies)
}

/// The name of the source calibration used.
pub fn source_name() -> Option<&'static str> {
    CLOCK.get().and_then(|c| c.calibration).map(|(_, source)| source)
}

/// The name of the clock [`now`] reads: the hypervisor's clock, or "TSC".
pub fn clock_name() -> Option<&'static str> {
    CLOCK.get().map(|c| c.hypervisor.map_or("TSC", |(source, _)| source.name()))
}

/// Busy-waits for `duration` (spinning on [`now`]; interrupts stay as they are and are handled meanwhile).
///
/// Panics if the clock is not calibrated: a wait of unknown length is a bug in the caller's bring-up order.
pub fn sleep(duration: Duration) {
    assert!(CLOCK.get().is_some(), "time::sleep before calibration");
    let deadline = now().saturating_add(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    while now() < deadline {
        core::hint::spin_loop();
    }
}

use crate::ktest::{KTest, TestResult};
use crate::{kassert, kassert_eq};

/// In-kernel tests of the clock and its calibration.
pub const KTESTS: &[KTest] = &[
    KTest { name: "time::now_is_monotonic", run: now_is_monotonic },
    KTest { name: "time::sleep_waits_at_least_its_duration", run: sleep_waits_at_least_its_duration },
    KTest { name: "time::sources_agree", run: sources_agree },
    KTest { name: "time::clock_matches_reference", run: clock_matches_reference },
    KTest { name: "time::kernel_timer_one_shot_fires_once", run: kernel_timer_one_shot_fires_once },
    KTest { name: "time::kernel_timer_periodic_tick_count", run: kernel_timer_periodic_tick_count },
    KTest { name: "time::wall_clock_follows_the_monotonic_clock", run: wall_clock_follows_the_monotonic_clock },
];

fn wall_clock_follows_the_monotonic_clock() -> TestResult {
    let saved = *WALL_CLOCK_AT_ZERO.lock();
    // 2026-11-22 00:00:00 UTC, set as of a moment 1 ms ago.
    let unix = 1_795_305_600i128 * 1_000_000_000;
    let at = now().saturating_sub(1_000_000);
    set_wall_clock(unix, at);
    let read = wall_clock_ns().ok_or("the wall clock is not set")?;
    let correction = set_wall_clock(unix + 500, at);
    *WALL_CLOCK_AT_ZERO.lock() = saved;
    kassert!(read >= unix + 1_000_000 && read < unix + 1_000_000_000, "wall clock {read} vs {unix}");
    kassert_eq!(correction, Some(500));
    Ok(())
}

fn now_is_monotonic() -> TestResult {
    let first = now();
    let mut last = first;
    for _ in 0..10_000 {
        let t = now();
        kassert!(t >= last, "time went back from {last} to {t}");
        last = t;
    }
    kassert!(last > first, "the clock does not advance");
    Ok(())
}

fn sleep_waits_at_least_its_duration() -> TestResult {
    let start = now();
    sleep(Duration::from_millis(25));
    let slept = now() - start;
    kassert!(slept >= 25_000_000, "slept only {slept} ns");
    kassert!(slept < 500_000_000, "a 25 ms sleep took {slept} ns");
    Ok(())
}

/// Whether `a` is within `percent` % of `b`.
fn close(a: u64, b: u64, percent: u64) -> bool {
    a.abs_diff(b) * 100 <= b * percent
}

/// Every reference present must agree with the calibration that was kept (TCG timing is noisy: within 10 %).
fn sources_agree() -> TestResult {
    let kept = frequencies().ok_or("not calibrated")?;
    let mut checked = 0;
    let pm_timer = acpi::PmTimer::find(acpi::rsdp()).ok().map(AcpiPmTimerSource);
    let sources: [Option<&dyn FrequencySource>; 2] = [pm_timer.as_ref().map(|s| s as _), Some(&PitSource)];
    for source in sources.into_iter().flatten() {
        let measured = x86_64::instructions::interrupts::without_interrupts(|| source.frequencies());
        let Ok(measured) = measured else {
            log::info!("time: {} not measurable here", source.name());
            continue;
        };
        log::info!(
            "time: {} measures TSC {} kHz, APIC bus {} kHz",
            source.name(),
            measured.tsc_hz / 1000,
            measured.apic_bus_hz / 1000
        );
        kassert!(
            close(measured.tsc_hz, kept.tsc_hz, 10) && close(measured.apic_bus_hz, kept.apic_bus_hz, 10),
            "{} measured {measured:?}, calibration kept {kept:?}",
            source.name()
        );
        checked += 1;
    }
    kassert!(checked >= 1, "no reference source could be measured");
    Ok(())
}

/// A 50 ms interval of the ACPI PM timer (or the PIT) must read as 50 ms on the clock.
fn clock_matches_reference() -> TestResult {
    let reference = match acpi::PmTimer::find(acpi::rsdp()) {
        Ok(timer) => {
            let wanted = acpi::PM_TIMER_HZ / 20;
            let t0 = timer.read();
            let start = now();
            while u64::from(timer.elapsed(t0, timer.read())) < wanted {
                kassert!(now() - start < 1_000_000_000, "PM timer stuck");
            }
            now() - start
        }
        Err(_) => {
            let one_shot = pit::OneShot::start((pit::PIT_HZ / 20) as u16).map_err(|_| "neither PM timer nor PIT")?;
            let start = now();
            while !one_shot.expired() {
                kassert!(now() - start < 1_000_000_000, "PIT stuck");
            }
            now() - start
        }
    };
    kassert!(close(reference, 50_000_000, 10), "50 ms of the reference read as {reference} ns");
    kassert_eq!(source_name().is_some(), true);
    log::info!("time: 50 ms of the reference read as {}.{:03} ms", reference / 1_000_000, reference / 1000 % 1000);
    Ok(())
}

static KERNEL_TIMER_HITS: AtomicU64 = AtomicU64::new(0);
static KERNEL_TIMER_LAST_NS: AtomicU64 = AtomicU64::new(0);

fn count_kernel_timer() {
    KERNEL_TIMER_HITS.fetch_add(1, Ordering::Relaxed);
    KERNEL_TIMER_LAST_NS.store(now(), Ordering::Relaxed);
}

/// Spins until `done()` or `limit` passes; returns whether `done()` became true.
fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = now().saturating_add(limit.as_nanos() as u64);
    while now() < deadline {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// The kernel timer (whichever device drives it) fires a 20 ms one-shot once, on time.
fn kernel_timer_one_shot_fires_once() -> TestResult {
    let device = timer_name().ok_or("no kernel timer device")?;
    KERNEL_TIMER_HITS.store(0, Ordering::Relaxed);
    let expiries_before = timer_expiries();
    let start = now();
    let started = start_timer(TimerMode::OneShot, Duration::from_millis(20), count_kernel_timer);
    let fired = wait_until(Duration::from_secs(1), || KERNEL_TIMER_HITS.load(Ordering::Relaxed) > 0);
    sleep(Duration::from_millis(60));
    stop_timer();
    kassert_eq!(started, Ok(()));
    kassert!(fired, "{device}: a 20 ms one-shot did not fire within 1 s");
    kassert_eq!(KERNEL_TIMER_HITS.load(Ordering::Relaxed), 1);
    kassert_eq!(timer_expiries(), expiries_before + 1);
    let after_ms = KERNEL_TIMER_LAST_NS.load(Ordering::Relaxed).saturating_sub(start) / 1_000_000;
    // TCG and nested virtualization are noisy: accept from half the interval to a quarter second of host delay.
    kassert!((10..=270).contains(&after_ms), "{device}: a 20 ms one-shot fired after {after_ms} ms");
    log::info!("time: kernel timer ({device}) one-shot of 20 ms fired after {after_ms} ms");
    Ok(())
}

/// The kernel timer (whichever device drives it) ticks about 30 times in 300 ms at a 10 ms period, and stops.
fn kernel_timer_periodic_tick_count() -> TestResult {
    let device = timer_name().ok_or("no kernel timer device")?;
    KERNEL_TIMER_HITS.store(0, Ordering::Relaxed);
    let started = start_timer(TimerMode::Periodic, Duration::from_millis(10), count_kernel_timer);
    let start = now();
    sleep(Duration::from_millis(300));
    let ticks = KERNEL_TIMER_HITS.load(Ordering::Relaxed);
    let elapsed_ms = (now() - start) / 1_000_000;
    stop_timer();
    sleep(Duration::from_millis(30));
    let after_stop = KERNEL_TIMER_HITS.load(Ordering::Relaxed);
    kassert_eq!(started, Ok(()));
    let expected = elapsed_ms / 10;
    kassert!(
        ticks * 2 >= expected && ticks <= expected * 3 / 2 + 1,
        "{device}: {ticks} ticks of a 10 ms periodic timer in {elapsed_ms} ms (expected about {expected})"
    );
    kassert!(after_stop <= ticks + 1, "{device}: the timer kept firing after stop: {ticks} then {after_stop}");
    log::info!("time: kernel timer ({device}): {ticks} periodic ticks of 10 ms in {elapsed_ms} ms");
    Ok(())
}
