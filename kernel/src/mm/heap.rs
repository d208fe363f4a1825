//! The kernel heap: one physically contiguous range of RAM, reached through the physical-memory window, managed by
//! `linked_list_allocator`. Because it is contiguous, a heap buffer's physical address is its virtual address minus
//! the window's offset ([`super::virt_to_phys`]): VMBus ring buffers and GPADLs built from heap memory need that.

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// The heap's size: a quarter of usable memory, between 4 and 64 MiB.
fn heap_size(usable: u64) -> u64 {
    (usable / 4).clamp(4 << 20, 64 << 20) & !0xFFF
}

/// Picks the heap's physical range from the memory map and hands it to the allocator. Returns the range, which the
/// frame allocator must leave out.
pub fn init(regions: &MemoryRegions) -> Result<core::ops::Range<u64>, &'static str> {
    let usable: u64 = regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable).map(|r| r.end - r.start).sum();
    let size = heap_size(usable);
    let region = regions
        .iter()
        .filter(|r| r.kind == MemoryRegionKind::Usable)
        .map(|r| (r.start.max(0x1000).next_multiple_of(0x1000), r.end))
        .find(|(start, end)| end.saturating_sub(*start) >= size)
        .ok_or("no usable memory region is large enough for the heap")?;
    let start = region.0;
    let virt = super::phys_to_virt(x86_64::PhysAddr::new(start));
    // SAFETY: `[start, start + size)` is usable RAM from the boot memory map that nothing else uses (the frame
    // allocator is told to leave it out), mapped writable through the physical-memory window; `init` runs once.
    unsafe { HEAP.lock().init(virt.as_mut_ptr::<u8>(), size as usize) };
    Ok(start..start + size)
}

/// Bytes in use and free in the heap.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
