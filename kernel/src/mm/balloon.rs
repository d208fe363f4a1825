//! The kernel's frame pool for the Dynamic Memory driver: [`KernelFramePool`], `vmbus::dm::FramePool` over the frame
//! allocator ([`super::frames`]).
//!
//! Reference: `dynamic-memory.md` "Guest sequence" steps 4–7 (status figures, balloon, unballoon, hot add) and the
//! pool contract in `vmbus::dm::pool`.
//!
//! - Figures: `num_available` is the allocator's free frames; `num_committed` the frames in use by the kernel: the
//!   allocator's handed-out frames (minus those the host holds, which the driver counts itself) plus the heap,
//!   which is carved out of RAM before the allocator sees it.
//! - Taking frames: frames leave the allocator one at a time ([`super::frames::alloc_frame`], which zeroes them, so
//!   the host never sees old kernel data) and are coalesced into one run while each next frame is adjacent to the
//!   run. The free list hands frames out in the order they were freed, so after boot (ranges added in ascending
//!   order) runs come out descending and long. The first frame that does not extend the run goes straight back to
//!   the head of the list, where the next call finds it.
//! - Ownership: a frame taken is off the free list, so no allocation can return it, and this pool writes to it only
//!   once the host gave it back ([`FramePool::give_back`] puts it on the free list, writing the list link into it).
//! - Hot add: not offered ([`FramePool::hot_add_alignment`] stays `None`, so the driver answers a hot add with
//!   "success, 0 pages"). QEMU places hv-balloon's hot-add region at a 32 GiB-aligned guest address, beyond the
//!   physical-memory window the bootloader mapped (up to the highest boot region, at least 4 GiB): the allocator
//!   reaches its frames only through that window, so it cannot take them without mapping them first.

use super::frames::{self, FRAME_SIZE};
use vmbus::dm::{FramePool, PageRange};
use x86_64::PhysAddr;

/// The frame allocator as the Dynamic Memory driver's pool (see the module documentation).
#[derive(Debug, Default)]
pub struct KernelFramePool {
    /// Frames taken and not yet given back.
    held: u64,
}

impl KernelFramePool {
    /// A pool holding no frames.
    pub const fn new() -> KernelFramePool {
        KernelFramePool { held: 0 }
    }

    /// Frames taken out of the allocator and not yet given back.
    pub fn held_pages(&self) -> u64 {
        self.held
    }

    /// Every frame the kernel has: the allocator's and the heap's (the total for `DmConfig::for_total_pages`).
    pub fn total_pages() -> u64 {
        frames::stats().total + heap_pages()
    }
}

/// Frames of the heap.
fn heap_pages() -> u64 {
    let (used, free) = super::heap::usage();
    (used + free) as u64 / FRAME_SIZE
}

impl FramePool for KernelFramePool {
    fn free_pages(&self) -> u64 {
        frames::stats().free
    }

    fn committed_pages(&self) -> u64 {
        let stats = frames::stats();
        (stats.total - stats.free).saturating_sub(self.held) + heap_pages()
    }

    fn take_free_run(&mut self, max_pages: u64) -> Option<PageRange> {
        if max_pages == 0 {
            return None;
        }
        let first = frames::alloc_frame()?.as_u64() / FRAME_SIZE;
        let (mut start, mut count) = (first, 1u64);
        while count < max_pages {
            let Some(next) = frames::alloc_frame() else { break };
            let pfn = next.as_u64() / FRAME_SIZE;
            if pfn + 1 == start {
                start = pfn;
            } else if pfn == start + count {
                // Ascending runs grow at the end.
            } else {
                // Not adjacent: back to the head of the free list for the next run.
                frames::free_frame(next);
                break;
            }
            count += 1;
        }
        self.held += count;
        Some(PageRange::new(start, count))
    }

    fn give_back(&mut self, range: PageRange) {
        for pfn in range.start..range.start.saturating_add(range.count) {
            frames::free_frame(PhysAddr::new(pfn * FRAME_SIZE));
        }
        self.held = self.held.saturating_sub(range.count);
    }
}

// In-kernel tests of the pool, listed in `mm::KTESTS`.

use crate::ktest::TestResult;
use crate::{kassert, kassert_eq};
use alloc::vec::Vec;

/// Takes 1024 frames in runs of at most 128, checks the runs are disjoint, inside the allocator's memory and mostly
/// longer than one frame, that no allocation meanwhile returns a held frame, then gives them back.
pub(super) fn runs_are_disjoint_and_given_back_whole() -> TestResult {
    let before = frames::stats();
    let mut pool = KernelFramePool::new();
    let mut runs: Vec<PageRange> = Vec::new();
    let mut taken = 0;
    while taken < 1024 {
        let run = pool.take_free_run(128.min(1024 - taken)).ok_or("the allocator ran out")?;
        kassert!(run.count >= 1 && run.count <= 128, "run {run:?}");
        taken += run.count;
        runs.push(run);
    }
    kassert_eq!(pool.held_pages(), 1024);
    kassert_eq!(frames::stats().free, before.free - 1024);
    let mut sorted = runs.clone();
    sorted.sort_by_key(|run| run.start);
    kassert!(sorted.windows(2).all(|w| w[0].start + w[0].count <= w[1].start), "runs overlap: {sorted:?}");
    kassert!(runs.len() < 1024 / 2, "frames were not coalesced: {} runs for 1024 frames", runs.len());
    // The allocator never hands out a frame the pool holds.
    let other = frames::alloc_frame().ok_or("no frame left for the kernel")?;
    let other_pfn = other.as_u64() / FRAME_SIZE;
    kassert!(
        !runs.iter().any(|run| other_pfn >= run.start && other_pfn < run.start + run.count),
        "frame {other_pfn:#x} is held by the pool but was allocated"
    );
    frames::free_frame(other);
    for run in runs {
        pool.give_back(run);
    }
    kassert_eq!(pool.held_pages(), 0);
    kassert_eq!(frames::stats(), before);
    Ok(())
}

/// Held frames are neither available nor committed (the driver reports them itself); giving back restores both.
pub(super) fn figures_leave_held_frames_out() -> TestResult {
    let mut pool = KernelFramePool::new();
    let (free, committed) = (pool.free_pages(), pool.committed_pages());
    kassert!(committed >= heap_pages(), "committed {committed} leaves out the heap");
    let run = pool.take_free_run(16).ok_or("the allocator ran out")?;
    kassert_eq!(pool.free_pages(), free - run.count);
    kassert_eq!(pool.committed_pages(), committed);
    kassert_eq!(pool.take_free_run(0), None);
    pool.give_back(run);
    kassert_eq!((pool.free_pages(), pool.committed_pages()), (free, committed));
    Ok(())
}
