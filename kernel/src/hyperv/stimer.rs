//! Synthetic timers (reference `hyperv-vmbus.md` §2): timer 0 is the kernel timer device, timer 1 wakes the CPU from
//! `hlt` when [`super::transport`] waits for the VMBus host with a time limit.
//!
//! A one-shot expiry time is absolute partition reference time (100 ns units, the time base of
//! [`super::clock::ReferenceClock`]); a periodic timer's count is its period. Each start writes the configuration
//! disabled, then the count, then the configuration enabled, so no stale count ever arms the timer.
//!
//! Delivery is by message to [`super::synic::TIMER_SINT`] (the SynIC handler consumes it and calls
//! [`expired_by_message`]), or — where CPUID 0x40000003 EDX bit 19 offers it — directly on [`DIRECT_VECTOR`]. The
//! kernel timer uses direct mode where offered (no message to consume), else message mode.

use super::clock::ReferenceClock;
use super::cpu::SyntheticMsrs;
use super::synic::TIMER_SINT;
use crate::arch::interrupts::{self, RegisterError};
use crate::time::{TimerDevice, TimerError, TimerMode};
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use vmbus::hv::HvReport;
use vmbus::hv::msr::{self, MsrAccess, StimerConfig};
use vmbus::hv::synic::TimerMessagePayload;

/// The IDT vector of synthetic timer 0 in direct mode.
pub const DIRECT_VECTOR: u8 = 0x52;
/// The timer that drives the kernel timer.
const KERNEL_TIMER_INDEX: u8 = 0;
/// The timer that bounds `hlt` in [`super::transport`]'s waits (message mode, one-shot).
const WAKEUP_TIMER_INDEX: u8 = 1;

/// How an expiry reaches the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A TIMER_EXPIRED message in the SynIC slot of [`TIMER_SINT`].
    Message,
    /// An interrupt on [`DIRECT_VECTOR`].
    Direct,
}

/// Counters and the last message, for the tests and the log.
static MESSAGE_EXPIRIES: AtomicU64 = AtomicU64::new(0);
static DIRECT_EXPIRIES: AtomicU64 = AtomicU64::new(0);
/// Expiry and delivery reference times (100 ns) of the last message-mode expiry.
static LAST_EXPIRATION_TIME: AtomicU64 = AtomicU64::new(0);
static LAST_DELIVERY_TIME: AtomicU64 = AtomicU64::new(0);
/// Expiries of the wake-up timer.
static WAKEUPS: AtomicU64 = AtomicU64::new(0);

/// Synthetic timers 0 (the kernel timer) and 1 (wake-ups).
pub struct SyntheticTimers {
    msrs: SyntheticMsrs,
    /// What the kernel timer uses.
    default_delivery: Delivery,
    /// Whether message mode works (synthetic timers, and the SynIC enabled).
    message_available: bool,
    /// Whether direct mode is offered (and its vector installed).
    direct_available: bool,
}

impl SyntheticTimers {
    /// The timer, where `report` offers synthetic timers with a way to deliver them (message mode needs the SynIC,
    /// which the caller has enabled when `synic_enabled`). Installs the direct-mode handler where offered.
    pub fn new(report: &HvReport, synic_enabled: bool) -> Result<Option<SyntheticTimers>, RegisterError> {
        let message = report.stimer_message_mode_usable() && synic_enabled;
        let direct = report.stimer_direct_mode_usable();
        if !message && !direct {
            return Ok(None);
        }
        if direct {
            interrupts::register(DIRECT_VECTOR, direct_interrupt)?;
        }
        let timers = SyntheticTimers {
            msrs: SyntheticMsrs::new(),
            default_delivery: if direct { Delivery::Direct } else { Delivery::Message },
            message_available: message,
            direct_available: direct,
        };
        timers.stop();
        if message {
            timers.stop_wakeup();
        }
        Ok(Some(timers))
    }

    /// The delivery the kernel timer uses.
    pub fn default_delivery(&self) -> Delivery {
        self.default_delivery
    }

    /// Whether direct mode is offered.
    pub fn direct_available(&self) -> bool {
        self.direct_available
    }

    /// Whether message mode works.
    pub fn message_available(&self) -> bool {
        self.message_available
    }

    /// Starts timer 0 with the given delivery: after `interval` (one-shot) or every `interval` (periodic).
    pub fn start_with(
        &self,
        clock: &ReferenceClock,
        delivery: Delivery,
        mode: TimerMode,
        interval: Duration,
    ) -> Result<(), TimerError> {
        match delivery {
            Delivery::Direct if !self.direct_available => {
                return Err(TimerError::Device("synthetic timer direct mode is not offered"));
            }
            Delivery::Message if !self.message_available => {
                return Err(TimerError::Device("synthetic timer message mode needs the SynIC"));
            }
            _ => {}
        }
        program(&self.msrs, KERNEL_TIMER_INDEX, clock, delivery, mode, interval)
    }

    /// Stops timer 0 (configuration and count zero).
    pub fn stop(&self) {
        let (config_msr, count_msr) = registers(KERNEL_TIMER_INDEX);
        self.msrs.write_msr(config_msr, 0);
        self.msrs.write_msr(count_msr, 0);
    }

    /// Reads STIMER0_CONFIG back.
    pub fn config(&self) -> StimerConfig {
        StimerConfig::from_bits(self.msrs.read_msr(registers(KERNEL_TIMER_INDEX).0))
    }

    /// Arms timer 1 to post a message (and so raise an interrupt) after `after`; replaces an armed wake-up.
    pub fn arm_wakeup(&self, clock: &ReferenceClock, after: Duration) -> Result<(), TimerError> {
        if !self.message_available {
            return Err(TimerError::Device("synthetic timer message mode needs the SynIC"));
        }
        program(&self.msrs, WAKEUP_TIMER_INDEX, clock, Delivery::Message, TimerMode::OneShot, after)
    }

    /// Stops timer 1.
    pub fn stop_wakeup(&self) {
        let (config_msr, count_msr) = registers(WAKEUP_TIMER_INDEX);
        self.msrs.write_msr(config_msr, 0);
        self.msrs.write_msr(count_msr, 0);
    }
}

/// Programs timer `index`: configuration disabled, count, configuration enabled.
fn program(
    msrs: &SyntheticMsrs,
    index: u8,
    clock: &ReferenceClock,
    delivery: Delivery,
    mode: TimerMode,
    interval: Duration,
) -> Result<(), TimerError> {
    let ticks = u64::try_from(interval.as_nanos().div_ceil(100))
        .map_err(|_| TimerError::Device("interval too long for a synthetic timer"))?
        .max(1);
    let config = match delivery {
        Delivery::Message => StimerConfig::message_mode(TIMER_SINT),
        Delivery::Direct => StimerConfig::direct(DIRECT_VECTOR),
    }
    .with_periodic(mode == TimerMode::Periodic);
    let count = match mode {
        TimerMode::Periodic => ticks,
        TimerMode::OneShot => {
            let now = clock.read().ok_or(TimerError::Device("no partition reference time"))?;
            now.ticks_100ns.saturating_add(ticks)
        }
    };
    let (config_msr, count_msr) = registers(index);
    msrs.write_msr(config_msr, config.with_enabled(false).bits());
    msrs.write_msr(count_msr, count);
    msrs.write_msr(config_msr, config.bits());
    Ok(())
}

impl TimerDevice for SyntheticTimers {
    fn name(&self) -> &'static str {
        match self.default_delivery {
            Delivery::Direct => "Hyper-V synthetic timer 0 (direct mode)",
            Delivery::Message => "Hyper-V synthetic timer 0 (message mode)",
        }
    }

    fn start(&self, mode: TimerMode, interval: Duration) -> Result<(), TimerError> {
        let clock = super::get().and_then(|hv| hv.clock.as_ref()).ok_or(TimerError::Device("no reference clock"))?;
        self.start_with(clock, self.default_delivery, mode, interval)
    }

    fn stop(&self) {
        SyntheticTimers::stop(self);
    }
}

/// STIMERn_CONFIG and STIMERn_COUNT (n is 0 or 1 here, both in range).
fn registers(index: u8) -> (u32, u32) {
    (msr::STIMER0_CONFIG + 2 * u32::from(index), msr::STIMER0_COUNT + 2 * u32::from(index))
}

/// Called by the SynIC's timer-message handler for each well-formed TIMER_EXPIRED message.
pub fn expired_by_message(expiry: &TimerMessagePayload) {
    if expiry.timer_index == u32::from(WAKEUP_TIMER_INDEX) {
        WAKEUPS.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if expiry.timer_index != u32::from(KERNEL_TIMER_INDEX) {
        return;
    }
    MESSAGE_EXPIRIES.fetch_add(1, Ordering::Relaxed);
    LAST_EXPIRATION_TIME.store(expiry.expiration_time, Ordering::Relaxed);
    LAST_DELIVERY_TIME.store(expiry.delivery_time, Ordering::Relaxed);
    crate::time::timer_expired();
}

fn direct_interrupt() {
    DIRECT_EXPIRIES.fetch_add(1, Ordering::Relaxed);
    crate::time::timer_expired();
}

/// Expiries seen so far: (by message, direct).
pub fn expiry_counts() -> (u64, u64) {
    (MESSAGE_EXPIRIES.load(Ordering::Relaxed), DIRECT_EXPIRIES.load(Ordering::Relaxed))
}

/// Expiries of the wake-up timer so far.
pub fn wakeup_count() -> u64 {
    WAKEUPS.load(Ordering::Relaxed)
}

/// The last message-mode expiry's (expiration time, delivery time), in 100 ns reference time.
pub fn last_message_times() -> (u64, u64) {
    (LAST_EXPIRATION_TIME.load(Ordering::Relaxed), LAST_DELIVERY_TIME.load(Ordering::Relaxed))
}
