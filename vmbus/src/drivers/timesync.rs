//! The timesync driver: turns the host's time samples into [`DriverRequest::SetWallClock`] for the kernel.
//!
//! Reference: `hyperv-vmbus.md` §7 "Timesync" (v4: parenttime, vmreferencetime, flags 0 probe / 1 sync / 2 sample;
//! 100 ns since 1601); the service is [`crate::ic::TimeSyncService`] (versions 4.0, 3.0, 1.0), the KMCL channel
//! [`super::ic::IcDriver`].
//!
//! The kernel's wall clock is "UNIX time `unix_time_ns` at monotonic time `at_ns`". The driver reads the kernel's
//! monotonic clock ([`MonotonicClock`], given at construction) when a sample arrives and pairs it with the host's
//! time at that moment:
//! - with a partition reference clock ([`TimeSyncDriver::with_reference_clock`], on Hyper-V) and a v4 sample, the
//!   host's time carried forward by the reference time elapsed since the host read its clock
//!   ([`crate::ic::timesync::TimeSample::host_time_at`], what Linux `adj_guesttime` does);
//! - otherwise (below v4, or no reference clock, as on the loopback host) the host's time as sent, taken as the
//!   time of receipt.
//!
//! SYNC and SAMPLE both set the clock (this kernel has no other time source); a PROBE is ignored.

use super::DriverRequest;
use super::ic::{IcDriver, IcKind};
use crate::ic::TimeSyncService;
use crate::ic::timesync::{TimeSample, TimeSampleKind};
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;

/// A clock read when a sample arrives: the kernel's monotonic nanoseconds (the scale of [`super::Driver::tick`]'s
/// `now_ns` and of [`DriverRequest::SetWallClock`]'s `at_ns`), or the partition reference time in 100 ns units.
pub type MonotonicClock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The timesync part of [`TimeSyncDriver`]: the clocks and what the samples said.
pub struct TimeSync {
    monotonic: MonotonicClock,
    reference: Option<MonotonicClock>,
    /// The last sample decoded (probes included).
    pub last_sample: Option<TimeSample>,
    /// The last wall-clock setting asked of the kernel: UNIX nanoseconds at monotonic `at_ns`.
    pub last_setting: Option<(i128, u64)>,
    /// Samples received (probes included).
    pub samples: u64,
    /// Samples that set the clock.
    pub applied: u64,
}

impl TimeSync {
    /// What `sample` asks of the kernel, read at receipt.
    fn setting(&self, sample: &TimeSample) -> Option<DriverRequest> {
        if sample.kind() == TimeSampleKind::Probe {
            return None;
        }
        let at_ns = (self.monotonic)();
        let host_time = match (&self.reference, sample.reference_time) {
            (Some(reference), Some(_)) => sample.host_time_at(reference()),
            _ => sample.host_time,
        };
        Some(DriverRequest::SetWallClock { unix_time_ns: host_time.unix_nanos(), at_ns })
    }
}

impl IcKind for TimeSync {
    type Service = TimeSyncService;
    const NAME: &'static str = "timesync";

    fn on_action(&mut self, sample: &TimeSample) -> Option<DriverRequest> {
        self.samples += 1;
        self.last_sample = Some(*sample);
        let request = self.setting(sample)?;
        if let DriverRequest::SetWallClock { unix_time_ns, at_ns } = request {
            self.last_setting = Some((unix_time_ns, at_ns));
        }
        self.applied += 1;
        Some(request)
    }

    fn status(&self) -> String {
        match self.last_setting {
            Some((unix_ns, _)) => format!(
                "{} samples, {} applied, last UNIX time {}.{:09} s",
                self.samples,
                self.applied,
                unix_ns.div_euclid(1_000_000_000),
                unix_ns.rem_euclid(1_000_000_000)
            ),
            None => format!("{} samples, none applied", self.samples),
        }
    }
}

/// The timesync driver (a [`super::Driver`]).
pub type TimeSyncDriver = IcDriver<TimeSync>;

impl IcDriver<TimeSync> {
    /// A timesync driver pairing each sample with `monotonic` read at receipt, binding to any timesync offer.
    pub fn new(monotonic: MonotonicClock) -> TimeSyncDriver {
        let kind =
            TimeSync { monotonic, reference: None, last_sample: None, last_setting: None, samples: 0, applied: 0 };
        IcDriver::with_parts(TimeSyncService::new(), kind)
    }

    /// Also reads the partition reference time (100 ns units, §2) at receipt, to carry v4 samples forward from
    /// the moment the host read its clock.
    pub fn with_reference_clock(monotonic: MonotonicClock, reference: MonotonicClock) -> TimeSyncDriver {
        let driver = TimeSyncDriver::new(monotonic);
        driver.state_mut(|state| state.kind.reference = Some(reference));
        driver
    }

    /// The last wall-clock setting asked of the kernel: (UNIX nanoseconds, monotonic nanoseconds).
    pub fn last_setting(&self) -> Option<(i128, u64)> {
        self.inspect(|state| state.kind.last_setting)
    }

    /// The last sample received.
    pub fn last_sample(&self) -> Option<TimeSample> {
        self.inspect(|state| state.kind.last_sample)
    }
}
