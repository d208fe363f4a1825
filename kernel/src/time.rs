//! Time: a monotonic nanosecond clock from the TSC, busy-wait sleeping, and the calibration of the TSC and the
//! local APIC timer.
//!
//! Neither the TSC rate nor the APIC timer's input rate is architectural, so both are learnt at boot from a
//! [`FrequencySource`], tried in this order:
//! 1. the hypervisor's own report, passed to [`init`] as `hypervisor_source` (Hyper-V: the TSC and APIC frequency
//!    MSRs of TLFS §12.3, HV_X64_MSR_TSC_FREQUENCY and HV_X64_MSR_APIC_FREQUENCY, provided by the Hyper-V layer
//!    once it exists; a Gen2 VM has no PIT, and its port 0x61 never signals);
//! 2. the ACPI PM timer ([`AcpiPmTimerSource`], 3.579545 MHz, found through the FADT);
//! 3. PIT channel 2 gated through port 0x61 ([`PitSource`], 1.193182 MHz).
//!
//! The measuring sources watch the TSC and a free-running APIC countdown across a fixed number of reference ticks,
//! three times, and keep the median. The source used is logged.

use crate::arch::{acpi, apic, pit};
use core::sync::atomic::{Ordering, compiler_fence};
use core::time::Duration;
use spin::Once;

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
                write!(
                    f,
                    "implausible result: TSC {} Hz, APIC bus {} Hz",
                    fr.tsc_hz, fr.apic_bus_hz
                )
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
    Snapshot {
        tsc: rdtsc(),
        apic_count: apic::timer_current_count(),
    }
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
fn frequencies_from(
    start: Snapshot,
    end: Snapshot,
    reference_ticks: u64,
    reference_hz: u64,
) -> Frequencies {
    let scale = |delta: u64| {
        (u128::from(delta) * u128::from(reference_hz) / u128::from(reference_ticks.max(1))) as u64
    };
    let apic_ticks = u64::from(start.apic_count.saturating_sub(end.apic_count));
    Frequencies {
        tsc_hz: scale(end.tsc - start.tsc),
        apic_bus_hz: scale(apic_ticks) * apic::TIMER_DIVISOR,
    }
}

/// Runs `round` [`ROUNDS`] times with a free-running APIC countdown and returns the median by TSC rate.
fn measure(
    mut round: impl FnMut() -> Result<Frequencies, CalibrationError>,
) -> Result<Frequencies, CalibrationError> {
    let have_apic = apic::start_free_running_count().is_ok();
    let mut results = [Frequencies {
        tsc_hz: 0,
        apic_bus_hz: 0,
    }; ROUNDS];
    for slot in &mut results {
        *slot = round()?;
    }
    apic::stop_timer();
    results.sort_unstable_by_key(|f| f.tsc_hz);
    let median = results[ROUNDS / 2];
    let tsc_ok = (50_000_000..=50_000_000_000).contains(&median.tsc_hz);
    let apic_ok = if have_apic {
        (1_000_000..=50_000_000_000).contains(&median.apic_bus_hz)
    } else {
        true
    };
    if tsc_ok && apic_ok {
        Ok(median)
    } else {
        Err(CalibrationError::Implausible(median))
    }
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
        let one_shot = pit::OneShot::start(count as u16)
            .map_err(|_| CalibrationError::Unavailable("no PIT"))?;
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

/// The calibrated clock.
struct Clock {
    /// TSC value at time 0.
    tsc_at_zero: u64,
    /// Nanoseconds per TSC tick, as a 32.32 fixed-point number.
    ns_per_tick_fp32: u64,
    frequencies: Frequencies,
    source: &'static str,
}

static CLOCK: Once<Clock> = Once::new();

/// Whether the CPU says its TSC runs at a constant rate in every power state (CPUID.80000007H:EDX bit 8).
pub fn invariant_tsc() -> bool {
    use core::arch::x86_64::__cpuid;
    __cpuid(0x8000_0000).eax >= 0x8000_0007 && __cpuid(0x8000_0007).edx & (1 << 8) != 0
}

/// Calibrates the clock and the APIC timer: tries `hypervisor_source` (the hook for a hypervisor that reports the
/// frequencies), then the ACPI PM timer (found through [`acpi::rsdp`]), then the PIT. Call once, after
/// [`apic::init`], with interrupts disabled. Returns the frequencies and the source's name.
pub fn init(
    hypervisor_source: Option<&dyn FrequencySource>,
) -> Result<(Frequencies, &'static str), CalibrationError> {
    let pm_timer = match acpi::PmTimer::find(acpi::rsdp()) {
        Ok(timer) => Some(AcpiPmTimerSource(timer)),
        Err(e) => {
            log::info!("time: no ACPI PM timer ({e})");
            None
        }
    };
    let candidates: [Option<&dyn FrequencySource>; 3] = [
        hypervisor_source,
        pm_timer.as_ref().map(|s| s as &dyn FrequencySource),
        Some(&PitSource),
    ];
    for source in candidates.into_iter().flatten() {
        match source.frequencies() {
            Ok(frequencies) => {
                let clock = CLOCK.call_once(|| Clock {
                    tsc_at_zero: rdtsc(),
                    ns_per_tick_fp32: ((1_000_000_000u128 << 32) / u128::from(frequencies.tsc_hz))
                        as u64,
                    frequencies,
                    source: source.name(),
                });
                apic::set_bus_frequency(clock.frequencies.apic_bus_hz);
                log::info!(
                    "time: calibrated with {}: TSC {}.{:03} MHz{}, APIC bus {}.{:03} MHz",
                    clock.source,
                    clock.frequencies.tsc_hz / 1_000_000,
                    clock.frequencies.tsc_hz / 1000 % 1000,
                    if invariant_tsc() { " (invariant)" } else { "" },
                    clock.frequencies.apic_bus_hz / 1_000_000,
                    clock.frequencies.apic_bus_hz / 1000 % 1000,
                );
                return Ok((clock.frequencies, clock.source));
            }
            Err(e) => log::warn!("time: {} cannot calibrate: {e}", source.name()),
        }
    }
    Err(CalibrationError::NoSource)
}

/// Nanoseconds since calibration, from the TSC; 0 before [`init`] succeeded. Never goes backwards on one CPU.
pub fn now() -> u64 {
    let Some(clock) = CLOCK.get() else { return 0 };
    let ticks = rdtsc().saturating_sub(clock.tsc_at_zero);
    ((u128::from(ticks) * u128::from(clock.ns_per_tick_fp32)) >> 32) as u64
}

/// The calibrated frequencies, or `None` before [`init`] succeeded.
pub fn frequencies() -> Option<Frequencies> {
    CLOCK.get().map(|c| c.frequencies)
}

/// The name of the source calibration used.
pub fn source_name() -> Option<&'static str> {
    CLOCK.get().map(|c| c.source)
}

/// Busy-waits for `duration` (spinning on the TSC; interrupts stay as they are and are handled meanwhile).
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
    KTest {
        name: "time::now_is_monotonic",
        run: now_is_monotonic,
    },
    KTest {
        name: "time::sleep_waits_at_least_its_duration",
        run: sleep_waits_at_least_its_duration,
    },
    KTest {
        name: "time::sources_agree",
        run: sources_agree,
    },
    KTest {
        name: "time::clock_matches_reference",
        run: clock_matches_reference,
    },
];

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
    let pm_timer = acpi::PmTimer::find(acpi::rsdp())
        .ok()
        .map(AcpiPmTimerSource);
    let sources: [Option<&dyn FrequencySource>; 2] =
        [pm_timer.as_ref().map(|s| s as _), Some(&PitSource)];
    for source in sources.into_iter().flatten() {
        let measured =
            x86_64::instructions::interrupts::without_interrupts(|| source.frequencies());
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
            close(measured.tsc_hz, kept.tsc_hz, 10)
                && close(measured.apic_bus_hz, kept.apic_bus_hz, 10),
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
            let one_shot = pit::OneShot::start((pit::PIT_HZ / 20) as u16)
                .map_err(|_| "neither PM timer nor PIT")?;
            let start = now();
            while !one_shot.expired() {
                kassert!(now() - start < 1_000_000_000, "PIT stuck");
            }
            now() - start
        }
    };
    kassert!(
        close(reference, 50_000_000, 10),
        "50 ms of the reference read as {reference} ns"
    );
    kassert_eq!(source_name().is_some(), true);
    log::info!(
        "time: 50 ms of the reference read as {}.{:03} ms",
        reference / 1_000_000,
        reference / 1000 % 1000
    );
    Ok(())
}
