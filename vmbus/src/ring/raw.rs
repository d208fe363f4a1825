//! Ring memory given by a raw pointer, and the word copies in and out of ring memory (reference `hyperv-vmbus.md`
//! §6).
//!
//! UNSAFETY: this is the only module of the `vmbus` crate allowed to use `unsafe`, for two things.
//! 1. [`RawRingMemory::new`] turns a pointer to pages shared with the host into references to atomics (the control
//!    page as `AtomicU32`s, the data area as `AtomicU64`s). Atomics permit concurrent writes by others, so the host's
//!    writes cannot invalidate them; no `&[u8]`/`&mut [u8]` to shared memory is ever created.
//! 2. [`load_words`]/[`store_words`] copy runs of aligned ring words with instructions that move several words at
//!    once: 16-byte `movdqa` on CPUs where that is one atomic access (the `sse` module), or `rep movsq` for long runs.
//!    Every access either makes to the ring is an aligned access of 8 or 16 bytes that x86-64 performs atomically,
//!    and stores are not reordered with later stores (Intel SDM vol. 3A §8.2.4; `rep movsq`'s fast-string stores may
//!    be reordered among themselves, never past a later store). So each copy does exactly what a loop of relaxed
//!    `AtomicU64` loads or stores does, in some order, only faster.

#![allow(unsafe_code)]

use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, Ordering};

use super::memory::{AtomicRingData, ControlField, ControlPageWords, RingMemory};
use super::{CONTROL_PAGE_SIZE, RingError, checked_data_len};

/// Runs shorter than this many words are copied with a loop of atomics: the loop starts fastest.
const MIN_WIDE_WORDS: usize = 16;

/// Runs of at least this many words are copied with `rep movsq` rather than 16-byte moves: from 2 KiB on its start-up
/// cost is paid back and it sustains a higher rate (measured with the ring benchmark on an AMD EPYC).
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
const MIN_REP_MOVSQ_WORDS_AFTER_SSE: usize = 256;

/// Without 16-byte moves, runs of at least this many words are copied with `rep movsq`: below it the loop of atomics
/// wins (measured as above).
const MIN_REP_MOVSQ_WORDS: usize = 64;

/// How [`load_words`] and [`store_words`] copy a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyMethod {
    /// Relaxed `AtomicU64` loads or stores one by one.
    Loop,
    /// 16-byte `movdqa` on the ring side (the `sse` module).
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    Sse,
    /// One `rep movsq`.
    #[cfg(target_arch = "x86_64")]
    RepMovsq,
}

/// The fastest method for a run of `words` words on this CPU.
#[inline(always)]
fn copy_method(words: usize) -> CopyMethod {
    if words < MIN_WIDE_WORDS {
        return CopyMethod::Loop;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    if sse::atomic_16_byte_moves() {
        return if words < MIN_REP_MOVSQ_WORDS_AFTER_SSE { CopyMethod::Sse } else { CopyMethod::RepMovsq };
    }
    #[cfg(target_arch = "x86_64")]
    if words >= MIN_REP_MOVSQ_WORDS {
        return CopyMethod::RepMovsq;
    }
    CopyMethod::Loop
}

/// Copies `source` into `dst` (the shorter length of the two; callers pass equal lengths) with accesses to the ring
/// that are each an aligned, single-copy atomic access of 8 or 16 bytes: by the [`CopyMethod`] that suits the run.
#[inline(always)]
pub(super) fn load_words(source: &[AtomicU64], dst: &mut [[u8; 8]]) {
    let len = source.len().min(dst.len());
    let (source, dst) = (&source[..len], &mut dst[..len]);
    match copy_method(len) {
        CopyMethod::Loop => load_loop(source, dst),
        #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
        CopyMethod::Sse => sse::load(source, dst),
        #[cfg(target_arch = "x86_64")]
        CopyMethod::RepMovsq => rep_movsq_load(source, dst),
    }
}

/// Copies one relaxed atomic load at a time.
#[inline(always)]
fn load_loop(source: &[AtomicU64], dst: &mut [[u8; 8]]) {
    for (out, word) in dst.iter_mut().zip(source) {
        *out = word.load(Ordering::Relaxed).to_ne_bytes();
    }
}

/// Copies `src` into `target` (the shorter length of the two; callers pass equal lengths), each access to the ring an
/// aligned, single-copy atomic access of 8 or 16 bytes, as [`load_words`] does.
#[inline(always)]
pub(super) fn store_words(target: &[AtomicU64], src: &[[u8; 8]]) {
    let len = target.len().min(src.len());
    let (target, src) = (&target[..len], &src[..len]);
    match copy_method(len) {
        CopyMethod::Loop => store_loop(target, src),
        #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
        CopyMethod::Sse => sse::store(target, src),
        #[cfg(target_arch = "x86_64")]
        CopyMethod::RepMovsq => rep_movsq_store(target, src),
    }
}

/// Copies one relaxed atomic store at a time.
#[inline(always)]
fn store_loop(target: &[AtomicU64], src: &[[u8; 8]]) {
    for (word, bytes) in target.iter().zip(src) {
        word.store(u64::from_ne_bytes(*bytes), Ordering::Relaxed);
    }
}

/// Copies `source` into `dst` (equal lengths) with `rep movsq`.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
fn rep_movsq_load(source: &[AtomicU64], dst: &mut [[u8; 8]]) {
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
}

/// Copies `src` into `target` (equal lengths) with `rep movsq`.
#[cfg(target_arch = "x86_64")]
#[inline(never)]
fn rep_movsq_store(target: &[AtomicU64], src: &[[u8; 8]]) {
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
}

/// Copies with 16-byte SSE moves (`movdqa` on the ring side), on CPUs where those are single atomic accesses.
///
/// Intel guarantees that processors enumerating AVX (CPUID.01H:ECX bit 28) carry out the 16-byte memory operations of
/// `movdqa` (and a few other moves) atomically when the address is 16-byte aligned (SDM vol. 3A, "Guaranteed Atomic
/// Operations"); AMD says the same of every naturally aligned 16-byte load or store on processors reporting that bit
/// (APM vol. 2, "Access Atomicity"). On such a CPU one aligned `movdqa` to or from the ring is exactly two relaxed
/// `AtomicU64` accesses that happen at once, which is one of the orders the atomic loop could produce. Only the
/// instruction set is needed, not the OS's AVX state: these are plain SSE2 instructions on `xmm` registers, which every
/// x86-64 build with SSE2 (the host target; not the kernel's soft-float target) may use. Other vendors document no
/// such guarantee and keep the other copies.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
mod sse {
    use core::arch::x86_64::__cpuid;
    use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};

    /// [`atomic_16_byte_moves`] has not looked at the CPU yet.
    const UNKNOWN: u8 = 0;
    /// Aligned 16-byte moves are not documented as atomic on this CPU.
    const ABSENT: u8 = 1;
    /// Aligned 16-byte moves are atomic on this CPU.
    const PRESENT: u8 = 2;

    /// The answer of [`atomic_16_byte_moves`], found once (CPUID is slow, and traps to the hypervisor in a VM).
    static STATE: AtomicU8 = AtomicU8::new(UNKNOWN);

    /// Whether aligned 16-byte SSE loads and stores are single atomic accesses on this CPU.
    #[inline(always)]
    pub(super) fn atomic_16_byte_moves() -> bool {
        match STATE.load(Ordering::Relaxed) {
            PRESENT => true,
            ABSENT => false,
            _ => detect(),
        }
    }

    /// Reads the vendor and the AVX bit with CPUID and records the answer.
    #[cold]
    #[inline(never)]
    fn detect() -> bool {
        let leaf0 = __cpuid(0);
        let avx = leaf0.eax >= 1 && __cpuid(1).ecx & (1 << 28) != 0;
        let present = avx && super::documented_vendor(leaf0.ebx, leaf0.edx, leaf0.ecx);
        STATE.store(if present { PRESENT } else { ABSENT }, Ordering::Relaxed);
        present
    }

    /// Copies `source` into `dst` (the shorter length): the ring's words one by one up to a 16-byte boundary, then
    /// 16 bytes at a time, 64 while at least that much is left. Memory-safe anywhere; the copy is the atomic copy the
    /// module comment describes only where [`atomic_16_byte_moves`] holds, so [`super::copy_method`] checks that first
    /// (the unit tests call it directly, with no concurrent peer).
    #[inline(always)]
    pub(super) fn load(source: &[AtomicU64], dst: &mut [[u8; 8]]) {
        let len = source.len().min(dst.len());
        let (source, dst) = (&source[..len], &mut dst[..len]);
        let head = usize::from(!source.as_ptr().addr().is_multiple_of(16)).min(len);
        let (head_words, source) = source.split_at(head);
        let (head_out, dst) = dst.split_at_mut(head);
        super::load_loop(head_words, head_out);
        let (lines, source) = source.as_chunks::<8>();
        let (out_lines, dst) = dst.as_chunks_mut::<8>();
        for (line, out) in lines.iter().zip(out_lines) {
            load_line(line, out);
        }
        let (pairs, tail) = source.as_chunks::<2>();
        let (out_pairs, out_tail) = dst.as_chunks_mut::<2>();
        for (pair, out) in pairs.iter().zip(out_pairs) {
            load_pair(pair, out);
        }
        super::load_loop(tail, out_tail);
    }

    /// Copies `src` into `target` (the shorter length), split as [`load`] splits.
    #[inline(always)]
    pub(super) fn store(target: &[AtomicU64], src: &[[u8; 8]]) {
        let len = target.len().min(src.len());
        let (target, src) = (&target[..len], &src[..len]);
        let head = usize::from(!target.as_ptr().addr().is_multiple_of(16)).min(len);
        let (head_words, target) = target.split_at(head);
        let (head_src, src) = src.split_at(head);
        super::store_loop(head_words, head_src);
        let (lines, target) = target.as_chunks::<8>();
        let (src_lines, src) = src.as_chunks::<8>();
        for (line, bytes) in lines.iter().zip(src_lines) {
            store_line(line, bytes);
        }
        let (pairs, tail) = target.as_chunks::<2>();
        let (src_pairs, src_tail) = src.as_chunks::<2>();
        for (pair, bytes) in pairs.iter().zip(src_pairs) {
            store_pair(pair, bytes);
        }
        super::store_loop(tail, src_tail);
    }

    /// Copies two ring words, 16-byte aligned, into `out` with one 16-byte load.
    #[inline(always)]
    fn load_pair(pair: &[AtomicU64; 2], out: &mut [[u8; 8]; 2]) {
        debug_assert!(pair.as_ptr().addr().is_multiple_of(16));
        // SAFETY: `pair` is 16 bytes of live atomics at a 16-byte aligned address (the callers split the ring's words
        // at a 16-byte boundary), so `movdqa` does not fault and, on the CPUs this module runs on, is one atomic load
        // (see the module comment). `out` is 16 bytes of exclusively borrowed ordinary memory, written with an
        // unaligned store; it cannot overlap the atomics. Only the declared xmm register is changed.
        unsafe {
            core::arch::asm!(
                "movdqa {value}, xmmword ptr [{pair}]",
                "movdqu xmmword ptr [{out}], {value}",
                pair = in(reg) pair.as_ptr(),
                out = in(reg) out.as_mut_ptr(),
                value = out(xmm_reg) _,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Copies eight ring words, 16-byte aligned, into `out` with four 16-byte loads.
    #[inline(always)]
    fn load_line(line: &[AtomicU64; 8], out: &mut [[u8; 8]; 8]) {
        debug_assert!(line.as_ptr().addr().is_multiple_of(16));
        // SAFETY: as in `load_pair`, for four consecutive 16-byte pieces of `line` and `out`.
        unsafe {
            core::arch::asm!(
                "movdqa {a}, xmmword ptr [{line}]",
                "movdqa {b}, xmmword ptr [{line} + 16]",
                "movdqa {c}, xmmword ptr [{line} + 32]",
                "movdqa {d}, xmmword ptr [{line} + 48]",
                "movdqu xmmword ptr [{out}], {a}",
                "movdqu xmmword ptr [{out} + 16], {b}",
                "movdqu xmmword ptr [{out} + 32], {c}",
                "movdqu xmmword ptr [{out} + 48], {d}",
                line = in(reg) line.as_ptr(),
                out = in(reg) out.as_mut_ptr(),
                a = out(xmm_reg) _,
                b = out(xmm_reg) _,
                c = out(xmm_reg) _,
                d = out(xmm_reg) _,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Copies `bytes` into two ring words, 16-byte aligned, with one 16-byte store.
    #[inline(always)]
    fn store_pair(pair: &[AtomicU64; 2], bytes: &[[u8; 8]; 2]) {
        debug_assert!(pair.as_ptr().addr().is_multiple_of(16));
        // SAFETY: `pair` is 16 bytes of live atomics at a 16-byte aligned address, whose interior mutability permits
        // writes through a shared reference; `movdqa` does not fault there and, on the CPUs this module runs on, is one
        // atomic store (see the module comment), ordered before later stores such as the release store of the write
        // index. `bytes` is 16 bytes of ordinary memory, borrowed immutably, so it cannot overlap the atomics. Only
        // the declared xmm register is changed.
        unsafe {
            core::arch::asm!(
                "movdqu {value}, xmmword ptr [{bytes}]",
                "movdqa xmmword ptr [{pair}], {value}",
                pair = in(reg) pair.as_ptr(),
                bytes = in(reg) bytes.as_ptr(),
                value = out(xmm_reg) _,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Copies `bytes` into eight ring words, 16-byte aligned, with four 16-byte stores.
    #[inline(always)]
    fn store_line(line: &[AtomicU64; 8], bytes: &[[u8; 8]; 8]) {
        debug_assert!(line.as_ptr().addr().is_multiple_of(16));
        // SAFETY: as in `store_pair`, for four consecutive 16-byte pieces of `line` and `bytes`.
        unsafe {
            core::arch::asm!(
                "movdqu {a}, xmmword ptr [{bytes}]",
                "movdqu {b}, xmmword ptr [{bytes} + 16]",
                "movdqu {c}, xmmword ptr [{bytes} + 32]",
                "movdqu {d}, xmmword ptr [{bytes} + 48]",
                "movdqa xmmword ptr [{line}], {a}",
                "movdqa xmmword ptr [{line} + 16], {b}",
                "movdqa xmmword ptr [{line} + 32], {c}",
                "movdqa xmmword ptr [{line} + 48], {d}",
                line = in(reg) line.as_ptr(),
                bytes = in(reg) bytes.as_ptr(),
                a = out(xmm_reg) _,
                b = out(xmm_reg) _,
                c = out(xmm_reg) _,
                d = out(xmm_reg) _,
                options(nostack, preserves_flags),
            );
        }
    }
}

/// Whether CPUID leaf 0's vendor string (in `ebx`, `edx`, `ecx` order) names a vendor that documents aligned 16-byte
/// SSE moves as atomic on CPUs with AVX: "GenuineIntel" or "AuthenticAMD".
#[cfg_attr(not(all(target_arch = "x86_64", target_feature = "sse2")), allow(dead_code))]
fn documented_vendor(ebx: u32, edx: u32, ecx: u32) -> bool {
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&edx.to_le_bytes());
    vendor[8..].copy_from_slice(&ecx.to_le_bytes());
    &vendor == b"GenuineIntel" || &vendor == b"AuthenticAMD"
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
        // Data starts at the second page; long copies use the wide moves.
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

    /// Runs `copy_in` then `copy_out` over every start and length near the interesting boundaries (16-byte alignment,
    /// 64-byte lines, the `rep movsq` threshold) and checks the words in between and the words around them.
    fn check_copy_path(copy_in: impl Fn(&[AtomicU64], &[[u8; 8]]), copy_out: impl Fn(&[AtomicU64], &mut [[u8; 8]])) {
        let source: Vec<[u8; 8]> = (1..=200u64).map(|i| (i * 0x0101_0101_0101_0101).to_ne_bytes()).collect();
        for start in 0..4 {
            for len in [0, 1, 2, 3, 7, 8, 9, 10, 15, 16, 17, 63, 64, 65, 66, 130, 195] {
                let words: Vec<AtomicU64> = (0..200).map(|_| AtomicU64::new(u64::MAX)).collect();
                copy_in(&words[start..start + len], &source[..len]);
                for (index, word) in words.iter().enumerate() {
                    let expected = if (start..start + len).contains(&index) {
                        u64::from_ne_bytes(source[index - start])
                    } else {
                        u64::MAX
                    };
                    assert_eq!(word.load(Ordering::Relaxed), expected, "start {start} len {len} word {index}");
                }
                let mut back = alloc::vec![[0xAAu8; 8]; len + 1];
                copy_out(&words[start..start + len], &mut back[..len]);
                assert_eq!(&back[..len], &source[..len], "start {start} len {len}");
                assert_eq!(back[len], [0xAA; 8], "start {start} len {len}: wrote past the end");
            }
        }
    }

    #[test]
    fn the_chosen_copy_agrees_with_the_model() {
        check_copy_path(store_words, load_words);
    }

    #[test]
    fn the_atomic_loop_agrees_with_the_model() {
        check_copy_path(store_loop, load_loop);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rep_movsq_agrees_with_the_model() {
        check_copy_path(rep_movsq_store, rep_movsq_load);
    }

    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    #[test]
    fn sse_moves_agree_with_the_model() {
        // The moves themselves work on any x86-64 CPU; only their atomicity needs the check.
        check_copy_path(sse::store, sse::load);
    }

    #[test]
    fn short_runs_use_the_loop_and_long_ones_a_wide_copy() {
        assert_eq!(copy_method(0), CopyMethod::Loop);
        assert_eq!(copy_method(MIN_WIDE_WORDS - 1), CopyMethod::Loop);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(copy_method(4096), CopyMethod::RepMovsq);
    }

    #[test]
    fn only_two_vendors_document_atomic_16_byte_moves() {
        let split = |name: &[u8; 12]| {
            let word = |at: usize| u32::from_le_bytes([name[at], name[at + 1], name[at + 2], name[at + 3]]);
            (word(0), word(4), word(8))
        };
        for (name, documented) in
            [(b"GenuineIntel", true), (b"AuthenticAMD", true), (b"HygonGenuine", false), (b"CentaurHauls", false)]
        {
            let (ebx, edx, ecx) = split(name);
            assert_eq!(documented_vendor(ebx, edx, ecx), documented, "{name:?}");
        }
    }
}
