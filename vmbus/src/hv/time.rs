//! Partition reference time (reference §2): the reference TSC page, read with the sequence-retry rule, and the
//! TIME_REF_COUNT MSR as the fallback. Both count 100 ns units since the partition was created.
//!
//! The page holds `sequence`, `scale` and `offset`; reference time = ((TSC × scale) >> 64) + offset. The
//! hypervisor changes `sequence` whenever it rewrites the other fields (e.g. after migration), so a reader
//! reads the sequence, the fields and the TSC, re-reads the sequence and retries if it moved.
//!
//! ⚠ Which sequence value marks the page invalid differs between sources: 0 in Linux
//! (include/clocksource/hyperv_timer.h) and in the archived MSDN `HV_REFERENCE_TSC_PAGE` page
//! (`HV_REFERENCE_TSC_SEQUENCE_INVALID = 0`); 0xFFFFFFFF in an older TLFS text. This module treats both as
//! invalid. Falling back to TIME_REF_COUNT is always correct, only slower, so the cost of being wrong about
//! 0xFFFFFFFF is one slow read in four billion sequence updates.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Ticks per second of the partition reference time (100 ns units).
pub const REFERENCE_TIME_HZ: u64 = 10_000_000;

/// The sequence value that marks the reference TSC page invalid (Linux, MSDN).
pub const TSC_SEQUENCE_INVALID: u32 = 0;

/// The sequence value an older TLFS text uses to mark the page invalid; also treated as invalid (⚠ above).
pub const TSC_SEQUENCE_INVALID_LEGACY: u32 = 0xFFFF_FFFF;

/// How many times a read is retried while the sequence keeps changing before falling back to the MSR.
pub const MAX_TSC_PAGE_READ_ATTEMPTS: u32 = 64;

/// The used head of the 4 KiB reference TSC page (§2); the rest of the page is reserved.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct ReferenceTscPageHeader {
    /// Changes whenever the other fields change; see [`TSC_SEQUENCE_INVALID`].
    pub sequence: u32,
    /// Reserved.
    pub reserved: u32,
    /// 64.64 fixed-point multiplier from TSC ticks to 100 ns units.
    pub scale: u64,
    /// Signed offset added after scaling.
    pub offset: i64,
}

/// Reads the reference TSC page and the TSC. The kernel implements it with volatile reads of the mapped page
/// and an ordered `rdtsc` (`lfence; rdtsc`), so that neither the compiler nor the CPU moves the TSC read or the
/// field reads outside the two sequence reads.
pub trait ReferenceTscPage {
    /// Reads `sequence` (volatile).
    fn sequence(&self) -> u32;
    /// Reads `scale` (volatile).
    fn scale(&self) -> u64;
    /// Reads `offset` (volatile).
    fn offset(&self) -> i64;
    /// Reads the time-stamp counter, ordered after the preceding reads.
    fn read_tsc(&self) -> u64;
}

/// Reads the TIME_REF_COUNT MSR (§2), the fallback clock.
pub trait TimeRefCounter {
    /// The partition reference counter in 100 ns units.
    fn time_ref_count(&self) -> u64;
}

/// Converts a TSC reading with the page's `scale` and `offset`: ((tsc × scale) >> 64) + offset, in 100 ns.
pub const fn tsc_to_reference_time(tsc: u64, scale: u64, offset: i64) -> u64 {
    let scaled = ((tsc as u128 * scale as u128) >> 64) as u64;
    scaled.wrapping_add_signed(offset)
}

/// Whether `sequence` marks the page invalid (either convention, see the module documentation).
pub const fn is_sequence_invalid(sequence: u32) -> bool {
    sequence == TSC_SEQUENCE_INVALID || sequence == TSC_SEQUENCE_INVALID_LEGACY
}

/// Reads reference time from the TSC page with the sequence-retry rule. `None` means the page is invalid (or
/// kept changing for [`MAX_TSC_PAGE_READ_ATTEMPTS`] reads): use TIME_REF_COUNT instead.
pub fn read_tsc_page<P: ReferenceTscPage + ?Sized>(page: &P) -> Option<u64> {
    for _ in 0..MAX_TSC_PAGE_READ_ATTEMPTS {
        let sequence = page.sequence();
        if is_sequence_invalid(sequence) {
            return None;
        }
        let scale = page.scale();
        let offset = page.offset();
        let tsc = page.read_tsc();
        if page.sequence() == sequence {
            return Some(tsc_to_reference_time(tsc, scale, offset));
        }
    }
    None
}

/// Which clock produced a [`ReferenceTime`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ClockSource {
    /// The reference TSC page (fast: no exit to the hypervisor).
    ReferenceTscPage,
    /// The TIME_REF_COUNT MSR (each read exits to the hypervisor).
    TimeRefCountMsr,
}

/// A partition reference time reading.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReferenceTime {
    /// Time since partition creation in 100 ns units.
    pub ticks_100ns: u64,
    /// Where it came from.
    pub source: ClockSource,
}

/// Reads reference time from the TSC page if there is one and it is valid, else from TIME_REF_COUNT (§2).
pub fn read_reference_time<P, C>(page: Option<&P>, counter: &C) -> ReferenceTime
where
    P: ReferenceTscPage + ?Sized,
    C: TimeRefCounter + ?Sized,
{
    match page.and_then(read_tsc_page) {
        Some(ticks_100ns) => ReferenceTime {
            ticks_100ns,
            source: ClockSource::ReferenceTscPage,
        },
        None => ReferenceTime {
            ticks_100ns: counter.time_ref_count(),
            source: ClockSource::TimeRefCountMsr,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::Cell;
    use core::mem::{offset_of, size_of};

    /// Page head: +0 sequence u32, +8 scale u64, +16 offset i64. Sources: Linux struct ms_hyperv_tsc_page
    /// (hvgdk_mini.h) and the archived MSDN HV_REFERENCE_TSC_PAGE structure.
    #[test]
    fn page_layout() {
        assert_eq!(size_of::<ReferenceTscPageHeader>(), 24);
        assert_eq!(offset_of!(ReferenceTscPageHeader, sequence), 0);
        assert_eq!(offset_of!(ReferenceTscPageHeader, reserved), 4);
        assert_eq!(offset_of!(ReferenceTscPageHeader, scale), 8);
        assert_eq!(offset_of!(ReferenceTscPageHeader, offset), 16);
        assert_eq!(TSC_SEQUENCE_INVALID, 0);
        assert_eq!(REFERENCE_TIME_HZ, 10_000_000);
    }

    #[test]
    fn conversion_vectors() {
        // scale 1.0 (2^64 would overflow; the largest scale is just under 1.0).
        assert_eq!(tsc_to_reference_time(1 << 32, 1 << 32, 5), 1 + 5);
        assert_eq!(tsc_to_reference_time(1000, 1 << 63, 0), 500);
        assert_eq!(tsc_to_reference_time(1000, 1 << 63, -100), 400);
        assert_eq!(tsc_to_reference_time(u64::MAX, u64::MAX, 0), u64::MAX - 1);
        // A 2.5 GHz TSC: 2.5e9 ticks per second become 1e7 ticks of 100 ns (scale = 2^64 / 250, rounded down).
        let scale = u64::MAX / 250;
        let one_second = tsc_to_reference_time(2_500_000_000, scale, 0);
        assert!(
            (9_999_999..=10_000_000).contains(&one_second),
            "{one_second}"
        );
    }

    /// A page whose sequence moves `changes` times in the middle of a read.
    struct FakePage {
        sequence: Cell<u32>,
        changes: Cell<u32>,
        reads: Cell<u32>,
        tsc: u64,
    }

    impl ReferenceTscPage for FakePage {
        fn sequence(&self) -> u32 {
            self.reads.set(self.reads.get() + 1);
            let current = self.sequence.get();
            // Every second read is the re-check; move the sequence under it while changes remain.
            if self.reads.get().is_multiple_of(2) && self.changes.get() > 0 {
                self.changes.set(self.changes.get() - 1);
                self.sequence.set(current.wrapping_add(1));
                return current.wrapping_add(1);
            }
            current
        }
        fn scale(&self) -> u64 {
            1 << 63
        }
        fn offset(&self) -> i64 {
            10
        }
        fn read_tsc(&self) -> u64 {
            self.tsc
        }
    }

    struct FixedCounter(u64);

    impl TimeRefCounter for FixedCounter {
        fn time_ref_count(&self) -> u64 {
            self.0
        }
    }

    fn page(sequence: u32, changes: u32) -> FakePage {
        FakePage {
            sequence: Cell::new(sequence),
            changes: Cell::new(changes),
            reads: Cell::new(0),
            tsc: 200,
        }
    }

    #[test]
    fn sequence_change_forces_a_retry() {
        let page = page(7, 2);
        assert_eq!(read_tsc_page(&page), Some(110));
        assert_eq!(
            page.reads.get(),
            6,
            "three attempts of two sequence reads each"
        );
    }

    #[test]
    fn invalid_page_falls_back_to_the_msr() {
        let counter = FixedCounter(4242);
        for invalid in [TSC_SEQUENCE_INVALID, TSC_SEQUENCE_INVALID_LEGACY] {
            let time = read_reference_time(Some(&page(invalid, 0)), &counter);
            assert_eq!(
                time,
                ReferenceTime {
                    ticks_100ns: 4242,
                    source: ClockSource::TimeRefCountMsr
                }
            );
        }
        let time = read_reference_time(Some(&page(1, 0)), &counter);
        assert_eq!(
            time,
            ReferenceTime {
                ticks_100ns: 110,
                source: ClockSource::ReferenceTscPage
            }
        );
        let time = read_reference_time(None::<&FakePage>, &counter);
        assert_eq!(time.source, ClockSource::TimeRefCountMsr);
    }

    #[test]
    fn a_page_that_never_settles_falls_back() {
        let restless = page(1, u32::MAX);
        assert_eq!(read_tsc_page(&restless), None);
        assert_eq!(restless.reads.get(), 2 * MAX_TSC_PAGE_READ_ATTEMPTS);
    }
}
