//! The physical frame allocator.
//!
//! Free 4 KiB frames are kept on a list threaded through the frames themselves (each free frame's first 8 bytes hold
//! the physical address of the next), reached through the physical-memory window. Allocation and freeing are O(1),
//! single frames can be taken out and given back in any order (the Dynamic Memory balloon needs exactly that), and
//! new ranges can be added at any time (memory hot add). Frames handed out are zeroed.

use super::phys_to_virt;
use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use spin::Mutex;
use x86_64::PhysAddr;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, PhysFrame, Size4KiB};

/// Size of a frame.
pub const FRAME_SIZE: u64 = 4096;

/// Sentinel for the end of the free list (no frame lives at physical address 0 on the list: frame 0 is never added).
const END: u64 = 0;

/// Counters of the frame allocator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames the allocator manages (free + handed out).
    pub total: u64,
    /// Frames on the free list.
    pub free: u64,
}

struct FreeList {
    head: u64,
    stats: FrameStats,
}

static FRAMES: Mutex<FreeList> = Mutex::new(FreeList { head: END, stats: FrameStats { total: 0, free: 0 } });

/// Adds every usable region of the boot memory map, except `reserved` (the heap's physical range).
pub fn init(regions: &MemoryRegions, reserved: core::ops::Range<u64>) {
    for region in regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable) {
        let start = region.start.max(FRAME_SIZE);
        // Add the parts of the region outside the reserved range.
        add_range(start, region.end.min(reserved.start));
        add_range(start.max(reserved.end), region.end);
    }
}

/// Adds the whole frames in `[start, end)` to the allocator; returns how many were added.
pub fn add_range(start: u64, end: u64) -> u64 {
    let first = start.div_ceil(FRAME_SIZE).max(1);
    let last = end / FRAME_SIZE;
    let mut added = 0;
    for pfn in first..last {
        free_frame(PhysAddr::new(pfn * FRAME_SIZE));
        added += 1;
    }
    FRAMES.lock().stats.total += added;
    added
}

/// Takes one zeroed frame, or `None` when memory is exhausted.
pub fn alloc_frame() -> Option<PhysAddr> {
    let mut list = FRAMES.lock();
    if list.head == END {
        return None;
    }
    let frame = PhysAddr::new(list.head);
    let link = phys_to_virt(frame).as_mut_ptr::<u64>();
    // SAFETY: `frame` is on the free list, so it is a usable RAM frame nobody else owns, mapped through the
    // physical-memory window; its first 8 bytes hold the link written by `free_frame`.
    list.head = unsafe { link.read() };
    list.stats.free -= 1;
    drop(list);
    // SAFETY: the frame now belongs to the caller alone; zeroing its 4 KiB through the window is in bounds.
    unsafe { core::ptr::write_bytes(phys_to_virt(frame).as_mut_ptr::<u8>(), 0, FRAME_SIZE as usize) };
    Some(frame)
}

/// Gives a frame back to the allocator. The caller must own it and never touch it again.
pub fn free_frame(frame: PhysAddr) {
    debug_assert!(frame.is_aligned(FRAME_SIZE) && frame.as_u64() != END);
    let mut list = FRAMES.lock();
    let link = phys_to_virt(frame).as_mut_ptr::<u64>();
    // SAFETY: the caller hands over ownership of this usable RAM frame; writing the link into its first 8 bytes
    // through the physical-memory window is in bounds.
    unsafe { link.write(list.head) };
    list.head = frame.as_u64();
    list.stats.free += 1;
}

/// Current counters.
pub fn stats() -> FrameStats {
    FRAMES.lock().stats
}

/// Adapter for the `x86_64` crate's page-table code.
pub struct GlobalFrameAllocator;

// SAFETY: `alloc_frame` returns frames that are unused and owned by the caller from then on.
unsafe impl FrameAllocator<Size4KiB> for GlobalFrameAllocator {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        alloc_frame().map(PhysFrame::containing_address)
    }
}

impl FrameDeallocator<Size4KiB> for GlobalFrameAllocator {
    unsafe fn deallocate_frame(&mut self, frame: PhysFrame<Size4KiB>) {
        free_frame(frame.start_address());
    }
}
