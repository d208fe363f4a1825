//! Ring pages for the kernel's VMBus channels, from the heap (reference `hyperv-vmbus.md` §6).
//!
//! The heap is one physically contiguous block reached through the physical-memory window, so a page-aligned heap
//! allocation of N pages is N contiguous frames at contiguous virtual addresses: exactly what a ring needs (the
//! GPADL names every page, and the ring code wants its data area contiguous).
//!
//! UNSAFETY: one block makes a `vmbus::ring::RawRingMemory` over such an allocation. The allocation is owned by a
//! [`RingBlock`] behind an `Arc`; each ring view holds a clone, so the memory outlives every view, and the caller
//! keeps another clone in a [`RingLease`] so that it decides when the pages may go back to the heap: only after
//! the host has confirmed the GPADL's teardown (a page the host may still write must never be reused).

use alloc::alloc::{alloc_zeroed, dealloc};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::alloc::Layout;
use core::ptr::NonNull;
use vmbus::channel::{ChannelRings, RING_PAGE_SIZE};
use vmbus::ring::{AtomicRingData, ControlField, RawRingMemory, RingMemory};
use x86_64::VirtAddr;

/// Why ring pages could not be provided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingAllocError {
    /// A ring needs a control page and at least one data page.
    TooFewPages,
    /// The heap had no room.
    OutOfMemory,
    /// The ring code refused the memory (a size it does not support).
    Refused,
}

impl core::fmt::Display for RingAllocError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RingAllocError::TooFewPages => "a ring needs at least 2 pages",
            RingAllocError::OutOfMemory => "no heap memory for ring pages",
            RingAllocError::Refused => "ring size not supported",
        })
    }
}

/// One page-aligned, zeroed heap allocation holding a ring; freed when the last owner drops it.
pub struct RingBlock {
    base: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the block is plain memory reached only through atomics (the ring views); owning it from any thread is fine.
unsafe impl Send for RingBlock {}
// SAFETY: as above: `&RingBlock` gives no access to the bytes at all.
unsafe impl Sync for RingBlock {}

impl RingBlock {
    fn allocate(pages: u32) -> Result<RingBlock, RingAllocError> {
        if pages < 2 {
            return Err(RingAllocError::TooFewPages);
        }
        let size = (pages as usize).checked_mul(RING_PAGE_SIZE as usize).ok_or(RingAllocError::OutOfMemory)?;
        let layout = Layout::from_size_align(size, RING_PAGE_SIZE as usize).map_err(|_| RingAllocError::OutOfMemory)?;
        // SAFETY: `layout` has a non-zero size (at least two pages).
        let base = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or(RingAllocError::OutOfMemory)?;
        Ok(RingBlock { base, layout })
    }

    /// The guest physical frame numbers of the block's pages, in order.
    fn pfns(&self) -> Vec<u64> {
        let first = crate::mm::virt_to_phys(VirtAddr::from_ptr(self.base.as_ptr()))
            .expect("the heap lives in the physical-memory window")
            .as_u64()
            / RING_PAGE_SIZE;
        (0..self.layout.size() as u64 / RING_PAGE_SIZE).map(|page| first + page).collect()
    }
}

impl Drop for RingBlock {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc_zeroed` with `layout` and is freed once, here, when the last `Arc` goes.
        unsafe { dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// One ring of a kernel channel: a view of a [`RingBlock`] that keeps the block alive.
pub struct HeapRing {
    view: RawRingMemory<'static>,
    _block: Arc<RingBlock>,
}

impl HeapRing {
    fn new(block: &Arc<RingBlock>) -> Result<HeapRing, RingAllocError> {
        // SAFETY: the block's `layout.size()` bytes at `base` are allocated, readable and writable for as long as an
        // `Arc<RingBlock>` exists, and the view is stored next to such a clone in `HeapRing`, which never hands the
        // view itself out (only `data()` borrows of `&self`), so the `'static` never outlives the memory. The block
        // is reached only through `RawRingMemory` views, which use atomics alone; the host writes it concurrently.
        let view =
            unsafe { RawRingMemory::new(block.base, block.layout.size()) }.map_err(|_| RingAllocError::Refused)?;
        Ok(HeapRing { view, _block: Arc::clone(block) })
    }
}

impl RingMemory for HeapRing {
    type Data<'a>
        = AtomicRingData<'a>
    where
        Self: 'a;

    fn data(&self) -> AtomicRingData<'_> {
        self.view.data()
    }

    fn load_control(&self, field: ControlField) -> u32 {
        self.view.load_control(field)
    }

    fn store_control(&self, field: ControlField, value: u32) {
        self.view.store_control(field, value)
    }
}

/// The caller's hold on a channel's ring pages: dropping it returns them to the heap once the channel has dropped
/// its views too. Drop it only after the host confirmed the ring GPADL's teardown; otherwise [`RingLease::abandon`].
pub struct RingLease {
    blocks: [Arc<RingBlock>; 2],
}

impl RingLease {
    /// Keeps the pages out of the heap for good (the host may still write them: the teardown was not confirmed).
    pub fn abandon(self) {
        let pages: usize = self.blocks.iter().map(|block| block.layout.size() / RING_PAGE_SIZE as usize).sum();
        log::warn!("bus: {pages} ring pages abandoned (teardown not confirmed by the host)");
        core::mem::forget(self);
    }
}

/// Allocates a channel's two rings: `outgoing_pages` and `incoming_pages`, each a control page plus data pages.
pub fn allocate_channel_rings(
    outgoing_pages: u32,
    incoming_pages: u32,
) -> Result<(ChannelRings<HeapRing>, RingLease), RingAllocError> {
    let outgoing = Arc::new(RingBlock::allocate(outgoing_pages)?);
    let incoming = Arc::new(RingBlock::allocate(incoming_pages)?);
    let mut pfns = outgoing.pfns();
    pfns.extend(incoming.pfns());
    let rings =
        ChannelRings { outgoing: HeapRing::new(&outgoing)?, incoming: HeapRing::new(&incoming)?, pfns, outgoing_pages };
    Ok((rings, RingLease { blocks: [outgoing, incoming] }))
}
