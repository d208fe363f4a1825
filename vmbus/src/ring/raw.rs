//! Ring memory given by a raw pointer, and the bulk word copy (reference `hyperv-vmbus.md` §6).
//!
//! UNSAFETY: this is the only module of the `vmbus` crate allowed to use `unsafe`, for two things.
//! 1. [`RawRingMemory::new`] turns a pointer to pages shared with the host into references to atomics (the control
//!    page as `AtomicU32`s, the data area as `AtomicU64`s). Atomics permit concurrent writes by others, so the host's
//!    writes cannot invalidate them; no `&[u8]`/`&mut [u8]` to shared memory is ever created.
//! 2. [`bulk_load`]/[`bulk_store`] copy long runs of aligned ring words with `rep movsq`. Each quadword the instruction
//!    moves is an aligned 8-byte access, which x86-64 performs atomically; the stores of a string instruction are not
//!    reordered with later stores (Intel SDM vol. 3A §8.2.4). So the instruction does exactly what a loop of relaxed
//!    `AtomicU64` loads or stores does, in some order, only much faster than such a loop for long copies.

#![allow(unsafe_code)]

use core::ptr::NonNull;
use core::sync::atomic::AtomicU64;

use super::memory::{AtomicRingData, ControlField, ControlPageWords, RingMemory};
use super::{CONTROL_PAGE_SIZE, RingError, checked_data_len};

/// Below this many words a plain loop of atomic word copies beats `rep movsq`'s start-up cost (measured with the
/// ring benchmark on an AMD EPYC). Callers check it, so the short-copy path stays small enough to inline.
pub(super) const BULK_MIN_WORDS: usize = 64;

/// Copies `source` into `dst` word for word with `rep movsq` when that pays off; returns `false`, having done nothing,
/// when the caller should copy with a loop instead. Panics when the lengths differ.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
pub(super) fn bulk_load(source: &[AtomicU64], dst: &mut [[u8; 8]]) -> bool {
    if source.len() < BULK_MIN_WORDS {
        return false;
    }
    assert_eq!(source.len(), dst.len());
    // SAFETY: `source` is valid for reading `source.len()` aligned quadwords and `dst` for writing as many (they are
    // live slices of that length); `dst` is exclusively borrowed so it cannot overlap `source`. Each quadword is read
    // by one aligned 8-byte access, which x86-64 makes atomic, so racing with the peer's writes is the same as a
    // sequence of relaxed atomic loads. The direction flag is clear on entry to inline assembly, so the copy ascends;
    // rcx, rsi and rdi are declared clobbered and no stack or flags are touched.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            inout("rcx") source.len() => _,
            inout("rsi") source.as_ptr() => _,
            inout("rdi") dst.as_mut_ptr() => _,
            options(nostack, preserves_flags),
        );
    }
    true
}

/// Copies `src` into `target` word for word with `rep movsq` when that pays off; returns `false`, having done
/// nothing, when the caller should copy with a loop instead. Panics when the lengths differ.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
pub(super) fn bulk_store(target: &[AtomicU64], src: &[[u8; 8]]) -> bool {
    if target.len() < BULK_MIN_WORDS {
        return false;
    }
    assert_eq!(target.len(), src.len());
    // SAFETY: `target` is a live slice of atomics, whose interior mutability permits writes through a shared
    // reference, valid for `target.len()` aligned quadwords; `src` is valid for reading as many and, being ordinary
    // memory borrowed immutably, cannot overlap the atomics. Each quadword is written by one aligned 8-byte access,
    // which x86-64 makes atomic, so racing with the peer is the same as a sequence of relaxed atomic stores, and the
    // stores are not reordered with the later release store of the write index. The direction flag is clear on
    // entry; rcx, rsi and rdi are declared clobbered and no stack or flags are touched.
    unsafe {
        core::arch::asm!(
            "rep movsq",
            inout("rcx") target.len() => _,
            inout("rsi") src.as_ptr() => _,
            inout("rdi") target.as_ptr() => _,
            options(nostack, preserves_flags),
        );
    }
    true
}

/// Other architectures copy with the atomic word loop.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub(super) fn bulk_load(_source: &[AtomicU64], _dst: &mut [[u8; 8]]) -> bool {
    false
}

/// Other architectures copy with the atomic word loop.
#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub(super) fn bulk_store(_target: &[AtomicU64], _src: &[[u8; 8]]) -> bool {
    false
}

/// Ring memory at a raw address: the kernel's ring pages, shared with the host (§6 layout: a 4096-byte control page,
/// then the data area).
#[derive(Clone, Copy)]
pub struct RawRingMemory<'a> {
    control: &'a ControlPageWords,
    data: &'a [AtomicU64],
}

impl<'a> RawRingMemory<'a> {
    /// Views the `len` bytes at `base` as a ring: the control page, then a data area of `len - 4096` bytes (a multiple
    /// of 8 between [`super::MIN_DATA_LEN`] and [`super::MAX_DATA_LEN`]). `base` must be page-aligned, as ring pages
    /// are.
    ///
    /// # Safety
    /// For all of `'a`, the `len` bytes at `base` must stay allocated, readable and writable, and this program must
    /// access them only through atomic operations (for example this view or other `RawRingMemory` views of them).
    /// The peer outside the program (the host) may write them at any time.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Result<Self, RingError> {
        if !base.as_ptr().addr().is_multiple_of(CONTROL_PAGE_SIZE) {
            return Err(RingError::MisalignedMemory);
        }
        let data_len = len.checked_sub(CONTROL_PAGE_SIZE).ok_or(RingError::InvalidDataLength { len: 0 })?;
        checked_data_len(data_len)?;
        // SAFETY: by the caller's promise the first 4096 bytes at `base` are allocated for `'a` and only accessed
        // atomically; `base` is page-aligned as `ControlPageWords` requires, which is 4096 `AtomicU32`s, each with the
        // size and layout of a `u32`, for which every bit pattern is valid. A shared reference to atomics allows the
        // peer's concurrent writes.
        let control = unsafe { &*base.as_ptr().cast::<ControlPageWords>() };
        // SAFETY: `base + 4096` is within the region (len > 4096) and page-aligned; the `data_len` bytes from there
        // are the rest of the region, allocated for `'a` and only accessed atomically, and `data_len` is a multiple
        // of 8, so they are exactly `data_len / 8` valid `AtomicU64`s, shared as above.
        let data = unsafe {
            core::slice::from_raw_parts(base.as_ptr().add(CONTROL_PAGE_SIZE).cast::<AtomicU64>(), data_len / 8)
        };
        Ok(Self { control, data })
    }
}

impl<'a> RingMemory for RawRingMemory<'a> {
    type Data<'b>
        = AtomicRingData<'a>
    where
        Self: 'b;

    #[inline(always)]
    fn data(&self) -> AtomicRingData<'a> {
        AtomicRingData::new(self.data)
    }
    #[inline(always)]
    fn load_control(&self, field: ControlField) -> u32 {
        self.control.load(field)
    }
    #[inline(always)]
    fn store_control(&self, field: ControlField, value: u32) {
        self.control.store(field, value)
    }
}

#[cfg(test)]
mod tests {
    use super::super::RingData;
    use super::*;
    use alloc::boxed::Box;
    use alloc::vec::Vec;
    use core::sync::atomic::Ordering;

    /// Page-aligned backing store of atomics standing in for pages shared with a host.
    #[repr(C, align(4096))]
    struct Page([AtomicU64; 512]);

    fn pages(count: usize) -> Box<[Page]> {
        (0..count).map(|_| Page([const { AtomicU64::new(0) }; 512])).collect()
    }

    #[test]
    fn raw_memory_sees_the_wire_layout() {
        let backing = pages(3);
        let base = NonNull::from(&backing[0]).cast::<u8>();
        // SAFETY: `backing` (3 pages) outlives `memory` and is only accessed through atomics.
        let memory = unsafe { RawRingMemory::new(base, 3 * 4096) }.unwrap();
        assert_eq!(memory.data().len(), 8192);
        memory.store_control(ControlField::WriteIndex, 0x11);
        memory.store_control(ControlField::ReadIndex, 0x22);
        memory.store_control(ControlField::InterruptMask, 0x33);
        memory.store_control(ControlField::PendingSendSize, 0x44);
        memory.store_control(ControlField::FeatureBits, 0x55);
        let control = backing[0].0[0].load(Ordering::Relaxed).to_le_bytes();
        assert_eq!(control, [0x11, 0, 0, 0, 0x22, 0, 0, 0]);
        assert_eq!(backing[0].0[1].load(Ordering::Relaxed), 0x44_0000_0033);
        assert_eq!(backing[0].0[8].load(Ordering::Relaxed), 0x55);
        // Data starts at the second page; long copies use the bulk path.
        let payload: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
        memory.data().write(8, &payload);
        assert_eq!(backing[1].0[1].load(Ordering::Relaxed), u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]));
        let mut back = alloc::vec![0u8; 2000];
        memory.data().read(8, &mut back);
        assert_eq!(back, payload);
    }

    #[test]
    fn raw_memory_rejects_bad_regions() {
        let backing = pages(2);
        let base = NonNull::from(&backing[0]).cast::<u8>();
        // SAFETY: the region lies within `backing`, which outlives the (unused) views.
        unsafe {
            assert!(matches!(RawRingMemory::new(base, 4096), Err(RingError::InvalidDataLength { .. })));
            assert!(matches!(RawRingMemory::new(base, 4096 + 12), Err(RingError::InvalidDataLength { .. })));
            assert!(matches!(RawRingMemory::new(base.add(4), 4096 + 64), Err(RingError::MisalignedMemory)));
        }
    }

    #[test]
    fn bulk_and_loop_copies_agree() {
        let words: Vec<AtomicU64> = (0..200).map(|_| AtomicU64::new(0)).collect();
        let source: Vec<[u8; 8]> = (0..200u64).map(|i| (i * 0x0101_0101_0101_0101).to_ne_bytes()).collect();
        // Short runs are left to the caller's loop.
        assert!(!bulk_store(&words[..10], &source[..10]));
        let bulk = bulk_store(&words, &source);
        assert_eq!(bulk, cfg!(target_arch = "x86_64"));
        if bulk {
            for (atomic, chunk) in words.iter().zip(&source) {
                assert_eq!(atomic.load(Ordering::Relaxed), u64::from_ne_bytes(*chunk));
            }
            let mut back = alloc::vec![[0u8; 8]; 200];
            assert!(bulk_load(&words, &mut back));
            assert_eq!(back, source);
        }
    }
}
