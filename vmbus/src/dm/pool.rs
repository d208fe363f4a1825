//! The frame pool: what the Dynamic Memory driver needs from the kernel's frame allocator.
//!
//! Reference: `dynamic-memory.md` "Guest sequence" steps 3–7 (capabilities, status figures, balloon, unballoon,
//! hot add). The kernel implements [`FramePool`] on its frame allocator; the tests use a fragmented fake.

use super::range::PageRange;

/// Alignment the pool needs for hot-added memory: 2^`log2_mib` MiB, `log2_mib` in 0..=15 (the 4-bit
/// `hot_add_alignment` field of the capabilities report).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HotAddAlignment {
    log2_mib: u8,
}

impl HotAddAlignment {
    /// 1 MiB, the finest alignment the field can express (a pool that takes any 4 KiB-aligned range).
    pub const ONE_MIB: HotAddAlignment = HotAddAlignment { log2_mib: 0 };

    /// 2^`log2_mib` MiB, or `None` beyond the field's 4 bits (> 32 GiB).
    pub const fn from_log2_mib(log2_mib: u8) -> Option<HotAddAlignment> {
        if log2_mib <= 15 { Some(HotAddAlignment { log2_mib }) } else { None }
    }

    /// The exponent sent in the capabilities report.
    pub const fn log2_mib(self) -> u8 {
        self.log2_mib
    }

    /// The alignment in 4 KiB pages (256 × 2^n).
    pub const fn pages(self) -> u64 {
        256 << self.log2_mib
    }
}

/// The kernel's frame allocator as the Dynamic Memory driver sees it.
///
/// Contract: a frame returned by [`FramePool::take_free_run`] belongs to the driver until the driver hands it to
/// [`FramePool::give_back`]; the kernel must not use, map for use or free it in between (the host may have
/// unmapped it). The driver only ever gives back frames it took and still holds.
pub trait FramePool {
    /// Frames free for allocation now (the status report's `num_available`).
    fn free_pages(&self) -> u64;

    /// Frames the kernel uses now (the base of the status report's `num_committed`); frames taken by the driver
    /// are counted by the driver, not here.
    fn committed_pages(&self) -> u64;

    /// Takes one run of at most `max_pages` (≥ 1) free frames out of the pool, or `None` when there is none. The
    /// pool chooses which; returning the longest or lowest run keeps the ranges few.
    fn take_free_run(&mut self, max_pages: u64) -> Option<PageRange>;

    /// Returns frames earlier taken with [`FramePool::take_free_run`] (any sub-range of them) to the pool.
    fn give_back(&mut self, range: PageRange);

    /// `Some(alignment)` if the pool can take new memory ranges (hot add), `None` if it cannot.
    fn hot_add_alignment(&self) -> Option<HotAddAlignment> {
        None
    }

    /// Adds a hot-added range (or its head) to the pool; returns how many frames from `range.start` it took
    /// (0 to `range.count`). Only called when [`FramePool::hot_add_alignment`] is `Some`.
    fn accept_hot_added(&mut self, range: PageRange) -> u64 {
        let _ = range;
        0
    }
}
