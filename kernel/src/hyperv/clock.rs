//! Partition reference time and the frequency MSRs (reference `hyperv-vmbus.md` §2).
//!
//! [`ReferenceClock`] reads the reference TSC page (a frame of ours named in the REFERENCE_TSC MSR, which the
//! hypervisor fills with scale and offset) with the sequence-retry rule of `vmbus::hv::time`, falling back to the
//! TIME_REF_COUNT MSR when the page is invalid. It is the kernel clock ([`crate::time::ClockSource`]) when the page is
//! valid at boot and TIME_REF_COUNT backs it; the synthetic timers' deadlines are in the same 100 ns time base.
//!
//! [`FrequencyMsrs`] reports the TSC and APIC timer frequencies for [`crate::time`]'s calibration hook, only where
//! both the access privilege and the feature bit say the MSRs exist.

use super::cpu::{SyntheticMsrs, ordered_rdtsc};
use super::shared_page::{OutOfFrames, SharedPage};
use crate::time::{CalibrationError, ClockSource, Frequencies, FrequencySource};
use core::sync::atomic::Ordering;
use vmbus::hv::HvReport;
use vmbus::hv::msr::{self, MsrAccess, ReferenceTscMsr};
use vmbus::hv::time::{
    ReferenceTime, ReferenceTscPage, TimeRefCounter, is_sequence_invalid, read_reference_time, read_tsc_page,
};
use x86_64::PhysAddr;

/// The reference TSC page of the real hypervisor, read with volatile (atomic) loads and an ordered `rdtsc`.
struct TscPage<'a>(&'a SharedPage);

impl ReferenceTscPage for TscPage<'_> {
    fn sequence(&self) -> u32 {
        self.0.words()[0].load(Ordering::Acquire) as u32
    }

    fn scale(&self) -> u64 {
        self.0.words()[1].load(Ordering::Acquire)
    }

    fn offset(&self) -> i64 {
        self.0.words()[2].load(Ordering::Acquire) as i64
    }

    fn read_tsc(&self) -> u64 {
        ordered_rdtsc()
    }
}

/// The TIME_REF_COUNT MSR.
struct TimeRefCountMsr<'a>(&'a SyntheticMsrs);

impl TimeRefCounter for TimeRefCountMsr<'_> {
    fn time_ref_count(&self) -> u64 {
        self.0.read_msr(msr::TIME_REF_COUNT)
    }
}

/// Partition reference time: the reference TSC page where offered, with TIME_REF_COUNT as the fallback.
pub struct ReferenceClock {
    msrs: SyntheticMsrs,
    /// The page named in REFERENCE_TSC, when the partition may use one.
    tsc_page: Option<SharedPage>,
    /// Whether TIME_REF_COUNT may be read.
    time_ref_count: bool,
}

impl ReferenceClock {
    /// Enables the reference TSC page where `report` allows it; `None` if neither the page nor TIME_REF_COUNT is
    /// available.
    pub fn enable(report: &HvReport) -> Result<Option<ReferenceClock>, OutOfFrames> {
        let clock = ReferenceClock {
            msrs: SyntheticMsrs::new(),
            tsc_page: if report.reference_tsc_usable() { Some(SharedPage::allocate()?) } else { None },
            time_ref_count: report.time_ref_count_usable(),
        };
        if clock.tsc_page.is_none() && !clock.time_ref_count {
            return Ok(None);
        }
        clock.reenable();
        Ok(Some(clock))
    }

    /// Names the page in REFERENCE_TSC (again, after [`ReferenceClock::disable`]).
    pub fn reenable(&self) {
        if let Some(page) = &self.tsc_page {
            let current = ReferenceTscMsr::from_bits(self.msrs.read_msr(msr::REFERENCE_TSC));
            self.msrs.write_msr(msr::REFERENCE_TSC, current.enabled_at(page.gpfn()).bits());
        }
    }

    /// Disables the reference TSC page (teardown). The page stays allocated; reads fall back to TIME_REF_COUNT.
    pub fn disable(&self) {
        if self.tsc_page.is_some() {
            let current = ReferenceTscMsr::from_bits(self.msrs.read_msr(msr::REFERENCE_TSC));
            self.msrs.write_msr(msr::REFERENCE_TSC, current.with_enabled(false).bits());
        }
    }

    /// Reads the REFERENCE_TSC MSR, when the page is in use.
    pub fn tsc_msr(&self) -> Option<ReferenceTscMsr> {
        self.tsc_page.as_ref().map(|_| ReferenceTscMsr::from_bits(self.msrs.read_msr(msr::REFERENCE_TSC)))
    }

    /// The page's guest physical address, when the page is in use.
    pub fn tsc_page_phys(&self) -> Option<PhysAddr> {
        self.tsc_page.as_ref().map(SharedPage::phys)
    }

    /// Whether the page is in use and its sequence number currently marks it valid.
    pub fn tsc_page_valid(&self) -> bool {
        self.tsc_page.as_ref().is_some_and(|page| !is_sequence_invalid(TscPage(page).sequence()))
    }

    /// The page's sequence, scale and offset, when the page is in use (for the boot log).
    pub fn tsc_page_fields(&self) -> Option<(u32, u64, i64)> {
        self.tsc_page.as_ref().map(|page| {
            let page = TscPage(page);
            (page.sequence(), page.scale(), page.offset())
        })
    }

    /// Reference time from the TSC page only (`None` when it is absent or invalid).
    pub fn read_tsc_page(&self) -> Option<u64> {
        self.tsc_page.as_ref().and_then(|page| read_tsc_page(&TscPage(page)))
    }

    /// Reference time from TIME_REF_COUNT only (`None` when the partition may not read it).
    pub fn read_time_ref_count(&self) -> Option<u64> {
        self.time_ref_count.then(|| TimeRefCountMsr(&self.msrs).time_ref_count())
    }

    /// Reads reference time: the TSC page if valid, else TIME_REF_COUNT; `None` when neither can be read.
    pub fn read(&self) -> Option<ReferenceTime> {
        if self.time_ref_count {
            let page = self.tsc_page.as_ref().map(TscPage);
            return Some(read_reference_time(page.as_ref(), &TimeRefCountMsr(&self.msrs)));
        }
        self.read_tsc_page()
            .map(|ticks_100ns| ReferenceTime { ticks_100ns, source: vmbus::hv::time::ClockSource::ReferenceTscPage })
    }

    /// Whether this clock should be the kernel clock: the page is valid now and TIME_REF_COUNT backs it.
    pub fn suits_kernel_clock(&self) -> bool {
        self.tsc_page_valid() && self.time_ref_count
    }
}

impl ClockSource for ReferenceClock {
    fn name(&self) -> &'static str {
        "Hyper-V reference TSC page"
    }

    fn now_ns(&self) -> u64 {
        self.read().map_or(0, |time| time.ticks_100ns.saturating_mul(100))
    }
}

/// The TSC_FREQUENCY and APIC_FREQUENCY MSRs as a [`FrequencySource`].
pub struct FrequencyMsrs {
    msrs: SyntheticMsrs,
}

impl FrequencyMsrs {
    /// The source, where `report` says both MSRs exist (access privilege and feature bit).
    pub fn new(report: &HvReport) -> Option<FrequencyMsrs> {
        report.frequency_msrs_usable().then(|| FrequencyMsrs { msrs: SyntheticMsrs::new() })
    }

    /// The raw values: (TSC Hz, APIC timer Hz).
    pub fn read(&self) -> (u64, u64) {
        (self.msrs.read_msr(msr::TSC_FREQUENCY), self.msrs.read_msr(msr::APIC_FREQUENCY))
    }
}

impl FrequencySource for FrequencyMsrs {
    fn name(&self) -> &'static str {
        "Hyper-V frequency MSRs"
    }

    fn frequencies(&self) -> Result<Frequencies, CalibrationError> {
        let (tsc_hz, apic_bus_hz) = self.read();
        let frequencies = Frequencies { tsc_hz, apic_bus_hz };
        // The same plausibility range the measuring sources apply.
        if (50_000_000..=50_000_000_000).contains(&tsc_hz) && (1_000_000..=50_000_000_000).contains(&apic_bus_hz) {
            Ok(frequencies)
        } else {
            Err(CalibrationError::Implausible(frequencies))
        }
    }
}
