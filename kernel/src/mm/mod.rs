//! Memory: the physical-memory window the bootloader maps, the frame allocator, the kernel heap and the page-table
//! helpers.

pub mod balloon;
pub mod frames;
pub mod heap;
pub mod paging;

use spin::Once;
use x86_64::{PhysAddr, VirtAddr};

/// Where the bootloader mapped all of physical memory (virtual = physical + offset).
static PHYS_OFFSET: Once<u64> = Once::new();

/// Records the physical-memory offset; called once at boot.
pub fn set_phys_offset(offset: u64) {
    PHYS_OFFSET.call_once(|| offset);
}

/// One past the last physical address the window maps.
static PHYS_WINDOW_END: Once<u64> = Once::new();

/// Records how far the window reaches: the bootloader maps up to the end of the highest memory-map region, and at
/// least the first 4 GiB (where firmware tables and device registers live). Called once at boot.
pub fn set_phys_window_end(regions: &bootloader_api::info::MemoryRegions) {
    let highest = regions.iter().map(|r| r.end).max().unwrap_or(0);
    PHYS_WINDOW_END.call_once(|| highest.max(1 << 32));
}

/// One past the last physical address reachable through [`phys_to_virt`] (0 before boot set it).
pub fn phys_window_end() -> u64 {
    PHYS_WINDOW_END.get().copied().unwrap_or(0)
}

/// The virtual address through which the kernel reaches physical address `phys`.
pub fn phys_to_virt(phys: PhysAddr) -> VirtAddr {
    let offset = *PHYS_OFFSET.get().expect("physical memory offset is set at boot");
    VirtAddr::new(phys.as_u64() + offset)
}

/// The physical address behind a virtual address inside the physical-memory window (the heap lives there).
pub fn virt_to_phys(virt: VirtAddr) -> Option<PhysAddr> {
    let offset = *PHYS_OFFSET.get()?;
    virt.as_u64().checked_sub(offset).map(PhysAddr::new)
}

use crate::ktest::KTest;
use crate::{kassert, kassert_eq};
use alloc::{boxed::Box, vec::Vec};

/// In-kernel tests of the frame allocator and the heap.
pub const KTESTS: &[KTest] = &[
    KTest { name: "mm::heap_box_and_vec", run: heap_box_and_vec },
    KTest { name: "mm::heap_is_physically_contiguous", run: heap_is_physically_contiguous },
    KTest { name: "mm::frames_alloc_free_zeroed", run: frames_alloc_free_zeroed },
    KTest { name: "mm::balloon_runs_are_disjoint", run: balloon::runs_are_disjoint_and_given_back_whole },
    KTest { name: "mm::balloon_figures_leave_held_frames_out", run: balloon::figures_leave_held_frames_out },
];

fn heap_box_and_vec() -> crate::ktest::TestResult {
    let b = Box::new(0x1234_5678u64);
    kassert_eq!(*b, 0x1234_5678);
    let v: Vec<u32> = (0..100_000).collect();
    kassert_eq!(v.iter().map(|&x| x as u64).sum::<u64>(), 4_999_950_000);
    let (used, _) = heap::usage();
    kassert!(used >= 400_000, "heap usage {used} does not show the vector");
    drop(v);
    Ok(())
}

fn heap_is_physically_contiguous() -> crate::ktest::TestResult {
    let buf = alloc::vec![0u8; 3 * 4096];
    let start = VirtAddr::from_ptr(buf.as_ptr());
    let phys = virt_to_phys(start).ok_or_else(|| alloc::string::String::from("heap is outside the window"))?;
    kassert_eq!(phys_to_virt(phys), start);
    Ok(())
}

fn frames_alloc_free_zeroed() -> crate::ktest::TestResult {
    let before = frames::stats();
    let a = frames::alloc_frame().ok_or_else(|| alloc::string::String::from("no frame"))?;
    let b = frames::alloc_frame().ok_or_else(|| alloc::string::String::from("no frame"))?;
    kassert!(a != b);
    kassert!(a.is_aligned(frames::FRAME_SIZE));
    // SAFETY: `a` was just allocated to this test; it is mapped through the window.
    let first = unsafe { phys_to_virt(a).as_ptr::<u64>().read() };
    kassert_eq!(first, 0);
    kassert_eq!(frames::stats().free, before.free - 2);
    frames::free_frame(a);
    frames::free_frame(b);
    kassert_eq!(frames::stats(), before);
    Ok(())
}
