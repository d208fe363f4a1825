//! Page-table helpers over the bootloader's page tables.
//!
//! The bootloader leaves its four-level tables in place and maps all physical memory at a fixed offset, so the
//! tables are edited through [`OffsetPageTable`] with frames from [`GlobalFrameAllocator`]. New mappings go into one
//! level-4 slot (512 GiB of virtual space) that the bootloader left empty; addresses there are handed out upwards
//! and never reused, which keeps a stale pointer to an unmapped range faulting instead of aliasing something new.
//!
//! What the kernel needs: device registers mapped uncached (the xAPIC, later VMBus MMIO), a frame mapped executable
//! and read-only (the Hyper-V hypercall page: TLFS "Hypercall Page", the guest executes it but must not write it),
//! looking a mapping up, and unmapping.

use super::frames::{FRAME_SIZE, GlobalFrameAllocator};
use core::sync::atomic::{AtomicU64, Ordering};
use spin::{Mutex, Once};
use x86_64::registers::control::Cr3;
use x86_64::registers::model_specific::{Efer, EferFlags};
use x86_64::structures::paging::mapper::{MapToError, TranslateResult, UnmapError};
use x86_64::structures::paging::{
    Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PageTableIndex, PhysFrame, Size4KiB, Translate,
};
use x86_64::{PhysAddr, VirtAddr};

/// Why a mapping request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingError {
    /// [`init`] has not run.
    NotInitialised,
    /// The request covers no bytes, or its end overflows.
    BadRange,
    /// The kernel's mapping window is used up.
    WindowExhausted,
    /// No frame was free for a new page table.
    OutOfFrames,
    /// A page in the range was mapped already.
    AlreadyMapped,
    /// A page in the range was not mapped (or is part of a huge page).
    NotMapped,
}

impl core::fmt::Display for PagingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            PagingError::NotInitialised => "paging is not initialised",
            PagingError::BadRange => "empty or overflowing range",
            PagingError::WindowExhausted => "the mapping window is exhausted",
            PagingError::OutOfFrames => "no frame for a page table",
            PagingError::AlreadyMapped => "page already mapped",
            PagingError::NotMapped => "page not mapped",
        })
    }
}

/// The page tables, behind a lock (mapping happens outside interrupt handlers only).
static MAPPER: Mutex<Option<OffsetPageTable<'static>>> = Mutex::new(None);
/// The first address of the level-4 slot reserved for the kernel's own mappings (which spans [`LEVEL4_SPAN`]
/// bytes; the slot may be the last one, whose end is 2^64, so the window is kept as start and offsets).
static WINDOW_START: Once<u64> = Once::new();
/// Offset into the window of the next unused page.
static NEXT_OFFSET: AtomicU64 = AtomicU64::new(0);

/// Bytes covered by one level-4 entry.
const LEVEL4_SPAN: u64 = 1 << 39;

/// Takes over the active page tables and reserves an empty level-4 slot for new mappings. Call once, after
/// [`super::set_phys_offset`].
pub fn init(phys_offset: u64) -> Result<(), PagingError> {
    let (level4_frame, _) = Cr3::read();
    let level4_virt = VirtAddr::new(level4_frame.start_address().as_u64() + phys_offset);
    // SAFETY: CR3 names the active level-4 table, which the bootloader allocated and nothing else refers to as a
    // Rust reference; all physical memory is mapped at `phys_offset`, as `OffsetPageTable` requires. The table is
    // only reached through `MAPPER`'s lock from now on.
    let mapper =
        unsafe { OffsetPageTable::new(&mut *level4_virt.as_mut_ptr::<PageTable>(), VirtAddr::new(phys_offset)) };
    let table = mapper.level_4_table();
    // Prefer the higher half; any empty slot other than 0 will do.
    let slot =
        (256..512).rev().chain((1..256).rev()).find(|&i| table[i].is_unused()).ok_or(PagingError::WindowExhausted)?;
    let start = Page::<Size4KiB>::from_page_table_indices(
        PageTableIndex::new(slot as u16),
        PageTableIndex::new(0),
        PageTableIndex::new(0),
        PageTableIndex::new(0),
    )
    .start_address()
    .as_u64();
    WINDOW_START.call_once(|| start);
    *MAPPER.lock() = Some(mapper);
    log::info!("paging: mapping window at {start:#x} (level-4 slot {slot})");
    Ok(())
}

/// The no-execute bit, where EFER.NXE allows it (setting it otherwise makes the entry invalid).
fn no_execute() -> PageTableFlags {
    if Efer::read().contains(EferFlags::NO_EXECUTE_ENABLE) {
        PageTableFlags::NO_EXECUTE
    } else {
        PageTableFlags::empty()
    }
}

/// Takes `pages` pages of unused virtual space from the window.
fn reserve_virtual(pages: u64) -> Result<VirtAddr, PagingError> {
    let &start = WINDOW_START.get().ok_or(PagingError::NotInitialised)?;
    let bytes = pages.checked_mul(FRAME_SIZE).ok_or(PagingError::BadRange)?;
    let offset = NEXT_OFFSET
        .try_update(Ordering::Relaxed, Ordering::Relaxed, |next| {
            // Keep one unmapped guard page after each range, and the window's last page unmapped for good.
            let new = next.checked_add(bytes)?.checked_add(FRAME_SIZE)?;
            (new <= LEVEL4_SPAN - FRAME_SIZE).then_some(new)
        })
        .map_err(|_| PagingError::WindowExhausted)?;
    Ok(VirtAddr::new(start + offset))
}

/// Maps `pages` frames starting at `first` to fresh virtual space with `flags`; returns the first page's address.
fn map_frames(first: PhysFrame, pages: u64, flags: PageTableFlags) -> Result<VirtAddr, PagingError> {
    let virt = reserve_virtual(pages)?;
    let mut guard = MAPPER.lock();
    let mapper = guard.as_mut().ok_or(PagingError::NotInitialised)?;
    // Intermediate tables stay writable and executable: the leaf entries decide.
    let table_flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
    for i in 0..pages {
        let page = Page::<Size4KiB>::containing_address(virt + i * FRAME_SIZE);
        let frame = first + i;
        // SAFETY: `page` lies in the window reserved for this module and was just handed out, so no other mapping
        // or Rust reference covers it; the frame is what the caller asked for (device memory or a frame it owns),
        // and the caller receives the address only after the mapping exists.
        let result =
            unsafe { mapper.map_to_with_table_flags(page, frame, flags, table_flags, &mut GlobalFrameAllocator) };
        match result {
            Ok(flush) => flush.flush(),
            Err(MapToError::FrameAllocationFailed) => return Err(PagingError::OutOfFrames),
            Err(MapToError::PageAlreadyMapped(_) | MapToError::ParentEntryHugePage) => {
                return Err(PagingError::AlreadyMapped);
            }
        }
    }
    Ok(virt)
}

/// Maps the device registers at `[phys, phys + len)` uncached (PCD + PWT, which the power-on PAT makes UC),
/// writable and not executable. Returns the virtual address of `phys` (the same offset into its page).
pub fn map_mmio(phys: PhysAddr, len: u64) -> Result<VirtAddr, PagingError> {
    if len == 0 {
        return Err(PagingError::BadRange);
    }
    let end = phys.as_u64().checked_add(len).ok_or(PagingError::BadRange)?;
    let first = PhysFrame::<Size4KiB>::containing_address(phys);
    let pages = (end - first.start_address().as_u64()).div_ceil(FRAME_SIZE);
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::NO_CACHE
        | PageTableFlags::WRITE_THROUGH
        | no_execute();
    let virt = map_frames(first, pages, flags)?;
    Ok(virt + (phys.as_u64() - first.start_address().as_u64()))
}

/// Maps one frame executable and read-only (the hypercall page: the hypervisor fills it, the guest only calls into
/// it). Returns the page's virtual address.
pub fn map_executable_readonly(frame: PhysFrame) -> Result<VirtAddr, PagingError> {
    map_frames(frame, 1, PageTableFlags::PRESENT)
}

/// Makes the physical-memory window's alias of `frame` read-only and not executable, splitting the window's huge
/// page(s) around it into 4 KiB entries (new page tables from the frame allocator; every other address keeps its
/// translation and permissions). For frames the guest must never write, such as the hypercall page, which stays
/// readable through [`super::phys_to_virt`]. Returns the alias's new flags.
pub fn write_protect_physical_alias(frame: PhysFrame) -> Result<PageTableFlags, PagingError> {
    let mut guard = MAPPER.lock();
    let mapper = guard.as_mut().ok_or(PagingError::NotInitialised)?;
    let phys_offset = mapper.phys_offset().as_u64();
    let alias = VirtAddr::try_new(phys_offset + frame.start_address().as_u64()).map_err(|_| PagingError::BadRange)?;
    let page = Page::<Size4KiB>::containing_address(alias);
    let huge = PageTableFlags::HUGE_PAGE;
    let mut table: &mut PageTable = mapper.level_4_table_mut();
    // Level 4 → 3 → 2 → 1: index and size of the region one entry of the table maps.
    let levels = [(page.p4_index(), 1u64 << 39), (page.p3_index(), 1 << 30), (page.p2_index(), 1 << 21)];
    for (level, (index, entry_span)) in levels.into_iter().enumerate() {
        let entry = &mut table[index];
        if !entry.flags().contains(PageTableFlags::PRESENT) {
            return Err(PagingError::NotMapped);
        }
        if entry.flags().contains(huge) {
            if level == 0 {
                return Err(PagingError::NotMapped);
            }
            // Replace the huge entry by a table of 512 entries of the next size down, same frames and flags.
            let child_span = entry_span / 512;
            let child_flags = if child_span == FRAME_SIZE { entry.flags() - huge } else { entry.flags() };
            let first = entry.addr().as_u64();
            let new_frame = alloc_frame_for_table().ok_or(PagingError::OutOfFrames)?;
            // SAFETY: the frame is fresh from the allocator, so nothing else refers to it; it is reached through the
            // physical-memory window, which maps all physical memory writable.
            let child = unsafe { &mut *VirtAddr::new(phys_offset + new_frame.as_u64()).as_mut_ptr::<PageTable>() };
            for (i, child_entry) in child.iter_mut().enumerate() {
                child_entry.set_addr(PhysAddr::new(first + i as u64 * child_span), child_flags);
            }
            let table_flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE;
            entry.set_addr(new_frame, table_flags);
        }
        let next = entry.addr().as_u64();
        // SAFETY: `next` is the page table this present, non-huge entry points to (set just above, or by the
        // bootloader); page tables are only reached through `MAPPER`'s lock, which is held.
        table = unsafe { &mut *VirtAddr::new(phys_offset + next).as_mut_ptr::<PageTable>() };
    }
    let entry = &mut table[page.p1_index()];
    if !entry.flags().contains(PageTableFlags::PRESENT) || entry.addr() != frame.start_address() {
        return Err(PagingError::NotMapped);
    }
    let flags = (entry.flags() - PageTableFlags::WRITABLE) | no_execute();
    entry.set_flags(flags);
    // One INVLPG drops whatever TLB entry covered the alias, of any page size (SDM vol. 3 §4.10.4.1); every other
    // address kept its translation and permissions, so their cached entries are still right.
    x86_64::instructions::tlb::flush(alias);
    Ok(flags)
}

/// A zeroed-or-not frame for a page table (every entry is written by the caller).
fn alloc_frame_for_table() -> Option<PhysAddr> {
    use x86_64::structures::paging::FrameAllocator;
    GlobalFrameAllocator.allocate_frame().map(|frame| frame.start_address())
}

/// Removes the mappings of every page in `[virt, virt + len)` (made by this module) and flushes them from the TLB.
/// The frames behind them stay with their owner. Stops at the first page that is not mapped.
pub fn unmap(virt: VirtAddr, len: u64) -> Result<(), PagingError> {
    if len == 0 {
        return Err(PagingError::BadRange);
    }
    let &window_start = WINDOW_START.get().ok_or(PagingError::NotInitialised)?;
    let offset = virt.as_u64().wrapping_sub(window_start);
    if virt.as_u64() < window_start || offset.checked_add(len).is_none_or(|end| end > LEVEL4_SPAN) {
        // Only this module's mappings may be removed: the bootloader's (kernel image, stack, physical window) stay.
        return Err(PagingError::BadRange);
    }
    let mut guard = MAPPER.lock();
    let mapper = guard.as_mut().ok_or(PagingError::NotInitialised)?;
    let first = Page::<Size4KiB>::containing_address(virt);
    let last = Page::<Size4KiB>::containing_address(virt + (len - 1));
    for page in Page::range_inclusive(first, last) {
        match mapper.unmap(page) {
            Ok((_, flush)) => flush.flush(),
            Err(UnmapError::PageNotMapped | UnmapError::ParentEntryHugePage | UnmapError::InvalidFrameAddress(_)) => {
                return Err(PagingError::NotMapped);
            }
        }
    }
    Ok(())
}

/// The physical address behind `virt` and the leaf entry's flags, or `None` when it is not mapped.
pub fn translate(virt: VirtAddr) -> Option<(PhysAddr, PageTableFlags)> {
    let guard = MAPPER.lock();
    match guard.as_ref()?.translate(virt) {
        TranslateResult::Mapped { frame, offset, flags } => Some((frame.start_address() + offset, flags)),
        TranslateResult::NotMapped | TranslateResult::InvalidFrameAddress(_) => None,
    }
}

/// An address inside the kernel's mapping window that is never mapped (the window's last page, which the bump
/// allocator never hands out): a deliberate fault target.
pub fn never_mapped_address() -> Option<VirtAddr> {
    WINDOW_START.get().map(|&start| VirtAddr::new(start + (LEVEL4_SPAN - FRAME_SIZE)))
}

use crate::ktest::{KTest, TestResult};
use crate::{kassert, kassert_eq};
use alloc::format;

/// In-kernel tests of the paging helpers.
pub const KTESTS: &[KTest] = &[
    KTest { name: "mm::paging::mmio_mapping_is_uncached", run: mmio_mapping_is_uncached },
    KTest { name: "mm::paging::executable_readonly_mapping_runs", run: executable_readonly_mapping_runs },
    KTest { name: "mm::paging::bad_requests_are_refused", run: bad_requests_are_refused },
    KTest { name: "mm::paging::physical_alias_write_protected_alone", run: physical_alias_write_protected_alone },
];

fn physical_alias_write_protected_alone() -> TestResult {
    // The frame is protected for good, so it is never given back to the allocator.
    let frame = super::frames::alloc_frame().ok_or("no frame")?;
    let alias = super::phys_to_virt(frame);
    let before = translate(alias).ok_or("the window does not map the frame")?;
    kassert!(before.1.contains(PageTableFlags::WRITABLE), "the window maps {frame:?} with {:?}", before.1);
    let flags = write_protect_physical_alias(PhysFrame::containing_address(frame))
        .map_err(|e| format!("write_protect_physical_alias: {e}"))?;
    kassert!(!flags.contains(PageTableFlags::WRITABLE));
    let (phys, after) = translate(alias).ok_or("the alias lost its mapping")?;
    kassert_eq!(phys, frame);
    kassert_eq!(after, flags);
    kassert!(!after.contains(PageTableFlags::WRITABLE) && !after.contains(PageTableFlags::HUGE_PAGE));
    // Every other frame of the old huge page keeps its translation and write access.
    let two_mib = frame.align_down(1u64 << 21);
    for offset in (0..(1u64 << 21)).step_by(FRAME_SIZE as usize) {
        let other = two_mib + offset;
        if other == frame {
            continue;
        }
        let (phys, flags) = translate(super::phys_to_virt(other)).ok_or("a neighbour lost its mapping")?;
        kassert_eq!(phys, other);
        kassert!(flags.contains(PageTableFlags::WRITABLE), "{other:?} lost write access: {flags:?}");
    }
    // Protecting it again changes nothing.
    kassert_eq!(write_protect_physical_alias(PhysFrame::containing_address(frame)), Ok(flags));
    Ok(())
}

fn mmio_mapping_is_uncached() -> TestResult {
    // A RAM frame stands in for a device page: the test can check the data through both mappings.
    let frame = super::frames::alloc_frame().ok_or("no frame")?;
    let virt = map_mmio(frame + 0x10, 8).map_err(|e| format!("map_mmio: {e}"))?;
    kassert_eq!(virt.as_u64() & 0xFFF, 0x10);
    let (phys, flags) = translate(virt).ok_or("the new mapping does not translate")?;
    kassert_eq!(phys, frame + 0x10);
    let wanted =
        PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_CACHE | PageTableFlags::WRITE_THROUGH;
    kassert!(flags.contains(wanted), "flags {flags:?} lack {wanted:?}");
    kassert_eq!(flags.contains(PageTableFlags::NO_EXECUTE), !no_execute().is_empty());
    // SAFETY: `virt` maps 8 bytes of the frame this test owns; the window mapping of the same frame is read only
    // after the uncached write has completed.
    unsafe { virt.as_mut_ptr::<u64>().write_volatile(0x1122_3344_5566_7788) };
    // SAFETY: the same owned frame through the physical-memory window.
    let through_window = unsafe { super::phys_to_virt(frame + 0x10).as_ptr::<u64>().read_volatile() };
    kassert_eq!(through_window, 0x1122_3344_5566_7788);
    unmap(virt, 8).map_err(|e| format!("unmap: {e}"))?;
    kassert!(translate(virt).is_none(), "still mapped after unmap");
    super::frames::free_frame(frame);
    Ok(())
}

/// `mov eax, 0x600D; ret`.
const RETURN_0X600D: [u8; 6] = [0xB8, 0x0D, 0x60, 0x00, 0x00, 0xC3];

fn executable_readonly_mapping_runs() -> TestResult {
    let frame = super::frames::alloc_frame().ok_or("no frame")?;
    let code = super::phys_to_virt(frame).as_mut_ptr::<u8>();
    // SAFETY: the frame belongs to this test; six bytes at its start through the window are in bounds.
    unsafe { core::ptr::copy_nonoverlapping(RETURN_0X600D.as_ptr(), code, RETURN_0X600D.len()) };
    let virt = map_executable_readonly(PhysFrame::containing_address(frame)).map_err(|e| format!("map: {e}"))?;
    let (phys, flags) = translate(virt).ok_or("the new mapping does not translate")?;
    kassert_eq!(phys, frame);
    kassert!(flags.contains(PageTableFlags::PRESENT));
    kassert!(!flags.contains(PageTableFlags::WRITABLE), "executable page is writable: {flags:?}");
    kassert!(!flags.contains(PageTableFlags::NO_EXECUTE), "executable page is no-execute: {flags:?}");
    // SAFETY: the page holds a complete function (`mov eax, imm32; ret`, System V: result in eax) and is mapped
    // present and executable; the window's writes to it happened before, so instruction fetch sees them.
    let function = unsafe { core::mem::transmute::<*const u8, extern "sysv64" fn() -> u32>(virt.as_ptr::<u8>()) };
    kassert_eq!(function(), 0x600D);
    unmap(virt, FRAME_SIZE).map_err(|e| format!("unmap: {e}"))?;
    kassert!(translate(virt).is_none(), "still mapped after unmap");
    super::frames::free_frame(frame);
    Ok(())
}

fn bad_requests_are_refused() -> TestResult {
    kassert_eq!(map_mmio(PhysAddr::new(0x1000), 0), Err(PagingError::BadRange));
    kassert_eq!(map_mmio(PhysAddr::new(0x000F_FFFF_FFFF_F000), u64::MAX), Err(PagingError::BadRange));
    let probe = never_mapped_address().ok_or("no window")?;
    kassert!(translate(probe).is_none(), "the never-mapped page is mapped");
    kassert_eq!(unmap(probe, FRAME_SIZE), Err(PagingError::NotMapped));
    // The bootloader's mappings are not this module's to remove.
    let kernel_text = VirtAddr::new(bad_requests_are_refused as *const () as u64);
    kassert_eq!(unmap(kernel_text, FRAME_SIZE), Err(PagingError::BadRange));
    Ok(())
}
