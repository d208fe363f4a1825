//! Pages shared with the hypervisor: the hypercall page, the hypercall input/output pages, the SynIC message and event
//! flags pages, and the reference TSC page (reference `hyperv-vmbus.md` §2–4).
//!
//! UNSAFETY: one block turns a frame's address in the physical-memory window into a reference. Everything else reaches
//! the page through that reference as 512 [`AtomicU64`] words, which is what memory another agent (the hypervisor)
//! writes at any time must be seen as: no plain Rust reference to its bytes ever exists.

use crate::mm::{frames, phys_to_virt};
use core::sync::atomic::{AtomicU64, Ordering};
use vmbus::hv::{HV_PAGE_SHIFT, HV_PAGE_SIZE};
use x86_64::PhysAddr;

/// 64-bit words in a page.
pub const WORDS: usize = HV_PAGE_SIZE / 8;

/// The frame allocator had no frame left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfFrames;

impl core::fmt::Display for OutOfFrames {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("no free frame for a page shared with the hypervisor")
    }
}

/// A zeroed, page-aligned frame owned by the Hyper-V layer for the kernel's lifetime and viewed as atomic words.
///
/// The frame is never given back to the allocator, even after the hypervisor has been told to stop using it: a late
/// write by the hypervisor can then only land in this page, never in memory reused for something else.
pub struct SharedPage {
    phys: PhysAddr,
    words: &'static [AtomicU64; WORDS],
}

impl SharedPage {
    /// Takes a zeroed frame from the allocator and keeps it for good.
    pub fn allocate() -> Result<SharedPage, OutOfFrames> {
        let phys = frames::alloc_frame().ok_or(OutOfFrames)?;
        let virt = phys_to_virt(phys);
        // SAFETY: `phys` is a 4 KiB-aligned frame the allocator just handed out (so nothing else refers to it) and is
        // never freed, mapped at `virt` through the physical-memory window for the kernel's lifetime; a page is the
        // size of `[AtomicU64; 512]` and aligned for it, and atomics tolerate the hypervisor's concurrent writes.
        let words = unsafe { &*virt.as_ptr::<[AtomicU64; WORDS]>() };
        Ok(SharedPage { phys, words })
    }

    /// The page's guest physical address.
    pub fn phys(&self) -> PhysAddr {
        self.phys
    }

    /// The page's guest physical frame number, as the page MSRs take it.
    pub fn gpfn(&self) -> u64 {
        self.phys.as_u64() >> HV_PAGE_SHIFT
    }

    /// The page as 512 words.
    pub fn words(&self) -> &'static [AtomicU64; WORDS] {
        self.words
    }

    /// Copies `bytes` into the page from byte 0, zero-filling the rest of the last word; returns `None` (writing
    /// nothing) if they do not fit.
    pub fn write_from_start(&self, bytes: &[u8]) -> Option<()> {
        if bytes.len() > HV_PAGE_SIZE {
            return None;
        }
        for (word, chunk) in self.words.iter().zip(bytes.chunks(8)) {
            let mut le = [0u8; 8];
            le[..chunk.len()].copy_from_slice(chunk);
            word.store(u64::from_le_bytes(le), Ordering::Relaxed);
        }
        Some(())
    }

    /// Copies `out.len()` bytes from the page, starting at byte `8 × first_word`, into `out`; returns `None`
    /// (copying nothing) if the range leaves the page.
    pub fn read_into(&self, first_word: usize, out: &mut [u8]) -> Option<()> {
        let words = self.words.get(first_word..first_word.checked_add(out.len().div_ceil(8))?)?;
        for (chunk, word) in out.chunks_mut(8).zip(words) {
            let le = word.load(Ordering::Relaxed).to_le_bytes();
            chunk.copy_from_slice(&le[..chunk.len()]);
        }
        Some(())
    }
}
