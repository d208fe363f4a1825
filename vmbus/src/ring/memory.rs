//! How the ring reaches its memory (reference `hyperv-vmbus.md` §6): the [`RingMemory`] trait and the owned host
//! implementation.
//!
//! The memory is shared with a peer that runs concurrently and is not trusted, so it is never seen through `&[u8]`
//! or `&mut [u8]`: control fields are atomics, the data area is a slice of `AtomicU64` words, and copies in and out go
//! word by word (or, for long copies on x86-64, through an instruction that moves whole aligned words; see `raw`).

use alloc::boxed::Box;
use alloc::sync::Arc;
use core::mem::offset_of;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use super::wire::RingControlPage;
use super::{CONTROL_PAGE_SIZE, RingError, checked_data_len, raw};

/// One of the fields of a ring's control page (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ControlField {
    /// `write_index` (offset 0), owned by the writer.
    WriteIndex,
    /// `read_index` (offset 4), owned by the reader.
    ReadIndex,
    /// `interrupt_mask` (offset 8), owned by the reader.
    InterruptMask,
    /// `pending_send_sz` (offset 12), owned by the writer.
    PendingSendSize,
    /// `feature_bits` (offset 64).
    FeatureBits,
}

impl ControlField {
    /// Byte offset of the field in the control page.
    pub const fn offset(self) -> usize {
        match self {
            Self::WriteIndex => offset_of!(RingControlPage, write_index),
            Self::ReadIndex => offset_of!(RingControlPage, read_index),
            Self::InterruptMask => offset_of!(RingControlPage, interrupt_mask),
            Self::PendingSendSize => offset_of!(RingControlPage, pending_send_size),
            Self::FeatureBits => offset_of!(RingControlPage, feature_bits),
        }
    }

    /// Index of the field among the control page's `u32` words.
    const fn word(self) -> usize {
        self.offset() / 4
    }
}

/// Access to one ring's memory: the control page and the data area (§6).
///
/// Implementations must tolerate a peer that changes any byte at any time. The ring code keeps to the contracts of
/// [`RingData`] even when the peer lies, so an implementation may panic when they are broken (a bug in this crate).
pub trait RingMemory {
    /// The data area accessor: small and `Copy`, so the ring fetches it once per packet and keeps it in registers.
    type Data<'a>: RingData
    where
        Self: 'a;

    /// The data area.
    fn data(&self) -> Self::Data<'_>;

    /// Loads a control field with acquire ordering: data the peer wrote before storing the field is visible after.
    fn load_control(&self, field: ControlField) -> u32;

    /// Stores a control field with release ordering: data accesses before the store complete before the peer can see
    /// the new value.
    fn store_control(&self, field: ControlField, value: u32);

    /// A full fence (loads and stores on both sides ordered), as the signalling rules need between publishing an index
    /// and reading the peer's mask or pending size.
    fn full_fence(&self) {
        fence(Ordering::SeqCst);
    }
}

/// A ring's data area (§6): byte copies in and out at an offset. Obtained from [`RingMemory::data`].
pub trait RingData: Copy {
    /// Length of the data area in bytes.
    fn len(&self) -> usize;

    /// Whether the data area is empty (never, for a usable ring).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes from byte `offset`. Contract: `offset + dst.len() <= len()`.
    fn read(&self, offset: usize, dst: &mut [u8]);

    /// Copies `src` to byte `offset`, zero-filling up to the next multiple of 8 bytes. Contract: `offset` is a multiple
    /// of 8 and `offset + src.len()` rounded up to 8 is at most `len()`.
    fn write(&self, offset: usize, src: &[u8]);

    /// Loads the 8 bytes at `offset` as a little-endian word (descriptors, trailers). Contract: `offset` is a multiple
    /// of 8 below `len()`.
    fn load_word(&self, offset: usize) -> u64 {
        let mut bytes = [0u8; 8];
        self.read(offset, &mut bytes);
        u64::from_le_bytes(bytes)
    }

    /// Stores `value` as 8 little-endian bytes at `offset`. Contract: `offset` is a multiple of 8 below `len()`.
    fn store_word(&self, offset: usize, value: u64) {
        self.write(offset, &value.to_le_bytes());
    }

    /// Loads the two words at `offset` (a descriptor). Contract: `offset` is a multiple of 8 and `offset + 16 <= len()`.
    fn load_word_pair(&self, offset: usize) -> [u64; 2] {
        [self.load_word(offset), self.load_word(offset + 8)]
    }

    /// Copies `dst.len()` words from byte `offset`, the bytes of each word in memory order. Contract: `offset` is a
    /// multiple of 8 and `offset + 8 * dst.len() <= len()`.
    fn read_words(&self, offset: usize, dst: &mut [[u8; 8]]) {
        self.read(offset, dst.as_flattened_mut());
    }

    /// Writes a whole packet that does not wrap: the two descriptor words, `payload` zero-padded to 8 bytes, then the
    /// trailer word. Contract: `offset` is a multiple of 8 and the 24 + padded payload bytes end within `len()`.
    fn write_simple_packet(&self, offset: usize, descriptor: [u64; 2], payload: &[u8], trailer: u64) {
        self.store_word(offset, descriptor[0]);
        self.store_word(offset + 8, descriptor[1]);
        self.write(offset + 16, payload);
        self.store_word(offset + 16 + payload.len().next_multiple_of(8), trailer);
    }
}

impl<T: RingMemory + ?Sized> RingMemory for &T {
    type Data<'a>
        = T::Data<'a>
    where
        Self: 'a;
    #[inline(always)]
    fn data(&self) -> Self::Data<'_> {
        (**self).data()
    }
    #[inline(always)]
    fn load_control(&self, field: ControlField) -> u32 {
        (**self).load_control(field)
    }
    #[inline(always)]
    fn store_control(&self, field: ControlField, value: u32) {
        (**self).store_control(field, value)
    }
    #[inline(always)]
    fn full_fence(&self) {
        (**self).full_fence()
    }
}

impl<T: RingMemory + ?Sized> RingMemory for Arc<T> {
    type Data<'a>
        = T::Data<'a>
    where
        Self: 'a;
    #[inline(always)]
    fn data(&self) -> Self::Data<'_> {
        (**self).data()
    }
    #[inline(always)]
    fn load_control(&self, field: ControlField) -> u32 {
        (**self).load_control(field)
    }
    #[inline(always)]
    fn store_control(&self, field: ControlField, value: u32) {
        (**self).store_control(field, value)
    }
    #[inline(always)]
    fn full_fence(&self) {
        (**self).full_fence()
    }
}

/// Number of control page words.
pub(super) const CONTROL_WORDS: usize = CONTROL_PAGE_SIZE / 4;

/// A control page of atomics, page-aligned like the real thing.
#[repr(C, align(4096))]
pub(super) struct ControlPageWords(pub(super) [AtomicU32; CONTROL_WORDS]);

impl ControlPageWords {
    #[inline(always)]
    pub(super) fn load(&self, field: ControlField) -> u32 {
        self.0[field.word()].load(Ordering::Acquire)
    }

    #[inline(always)]
    pub(super) fn store(&self, field: ControlField, value: u32) {
        self.0[field.word()].store(value, Ordering::Release)
    }
}

/// A data area of atomic words: the [`RingData`] of [`OwnedRingMemory`] and [`super::RawRingMemory`].
///
/// Copies go word by word with relaxed atomics, or for long runs on x86-64 through `rep movsq`, which moves the
/// same aligned words (see the `raw` module).
#[derive(Clone, Copy)]
pub struct AtomicRingData<'a> {
    words: &'a [AtomicU64],
}

impl<'a> AtomicRingData<'a> {
    /// The data area made of `words`.
    pub(super) fn new(words: &'a [AtomicU64]) -> Self {
        Self { words }
    }
}

impl RingData for AtomicRingData<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.words.len() * 8
    }

    #[inline(always)]
    fn read(&self, offset: usize, dst: &mut [u8]) {
        copy_from_words(self.words, offset, dst)
    }

    #[inline(always)]
    fn write(&self, offset: usize, src: &[u8]) {
        copy_to_words(self.words, offset, src)
    }

    #[inline(always)]
    fn load_word(&self, offset: usize) -> u64 {
        debug_assert_eq!(offset % 8, 0, "ring words start on an 8-byte boundary");
        u64::from_le(self.words[offset / 8].load(Ordering::Relaxed))
    }

    #[inline(always)]
    fn store_word(&self, offset: usize, value: u64) {
        debug_assert_eq!(offset % 8, 0, "ring words start on an 8-byte boundary");
        self.words[offset / 8].store(value.to_le(), Ordering::Relaxed)
    }

    #[inline(always)]
    fn read_words(&self, offset: usize, dst: &mut [[u8; 8]]) {
        debug_assert_eq!(offset % 8, 0, "ring words start on an 8-byte boundary");
        raw::load_words(&self.words[offset / 8..offset / 8 + dst.len()], dst);
    }

    #[inline(always)]
    fn load_word_pair(&self, offset: usize) -> [u64; 2] {
        debug_assert_eq!(offset % 8, 0, "ring words start on an 8-byte boundary");
        let pair = &self.words[offset / 8..offset / 8 + 2];
        [u64::from_le(pair[0].load(Ordering::Relaxed)), u64::from_le(pair[1].load(Ordering::Relaxed))]
    }

    #[inline(always)]
    fn write_simple_packet(&self, offset: usize, descriptor: [u64; 2], payload: &[u8], trailer: u64) {
        debug_assert_eq!(offset % 8, 0, "ring packets start on an 8-byte boundary");
        let payload_words = payload.len().div_ceil(8);
        // One bounds check for the whole packet; the pieces are indexed within it.
        let packet = &self.words[offset / 8..offset / 8 + payload_words + 3];
        let (head, rest) = packet.split_at(2);
        let (body, trailer_word) = rest.split_at(payload_words);
        head[0].store(descriptor[0].to_le(), Ordering::Relaxed);
        head[1].store(descriptor[1].to_le(), Ordering::Relaxed);
        let (whole, tail) = payload.as_chunks::<8>();
        let (body_whole, body_tail) = body.split_at(whole.len());
        raw::store_words(body_whole, whole);
        if let Some(atomic) = body_tail.first() {
            let mut bytes = [0u8; 8];
            bytes[..tail.len()].copy_from_slice(tail);
            atomic.store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
        }
        trailer_word[0].store(trailer.to_le(), Ordering::Relaxed);
    }
}

/// Copies `dst.len()` bytes starting at byte `offset` of `words` (bytes in memory order). Panics when the range is
/// outside `words`.
#[inline(always)]
fn copy_from_words(words: &[AtomicU64], offset: usize, mut dst: &mut [u8]) {
    let mut word = offset / 8;
    let skip = offset % 8;
    if skip != 0 && !dst.is_empty() {
        let bytes = words[word].load(Ordering::Relaxed).to_ne_bytes();
        let count = dst.len().min(8 - skip);
        let (head, rest) = dst.split_at_mut(count);
        head.copy_from_slice(&bytes[skip..skip + count]);
        dst = rest;
        word += 1;
    }
    let (whole, tail) = dst.as_chunks_mut::<8>();
    let source = &words[word..word + whole.len()];
    raw::load_words(source, whole);
    if !tail.is_empty() {
        let bytes = words[word + whole.len()].load(Ordering::Relaxed).to_ne_bytes();
        tail.copy_from_slice(&bytes[..tail.len()]);
    }
}

/// Copies `src` to byte `offset` (a multiple of 8) of `words`, zero-filling the last word. Panics when the range is
/// outside `words`.
#[inline(always)]
fn copy_to_words(words: &[AtomicU64], offset: usize, src: &[u8]) {
    debug_assert_eq!(offset % 8, 0, "ring writes start on an 8-byte boundary");
    let word = offset / 8;
    let (whole, tail) = src.as_chunks::<8>();
    let target = &words[word..word + whole.len()];
    raw::store_words(target, whole);
    if !tail.is_empty() {
        let mut bytes = [0u8; 8];
        bytes[..tail.len()].copy_from_slice(tail);
        words[word + whole.len()].store(u64::from_ne_bytes(bytes), Ordering::Relaxed);
    }
}

/// Ring memory in ordinary host memory, for tests, benchmarks and an in-process loopback (§6 layout).
///
/// Everything is an atomic, so a writer and a reader may share it (through `&` or [`Arc`]) from different threads
/// without a data race, however they misbehave.
pub struct OwnedRingMemory {
    control: Box<ControlPageWords>,
    data: Box<[AtomicU64]>,
}

impl OwnedRingMemory {
    /// Allocates a zeroed ring with a data area of `data_len` bytes (a multiple of 8, at least
    /// [`super::MIN_DATA_LEN`]; real rings use whole pages).
    pub fn new(data_len: usize) -> Result<Self, RingError> {
        checked_data_len(data_len)?;
        let control = Box::new(ControlPageWords([const { AtomicU32::new(0) }; CONTROL_WORDS]));
        let data = core::iter::repeat_with(|| AtomicU64::new(0)).take(data_len / 8).collect();
        Ok(Self { control, data })
    }
}

impl RingMemory for OwnedRingMemory {
    type Data<'a> = AtomicRingData<'a>;

    #[inline(always)]
    fn data(&self) -> AtomicRingData<'_> {
        AtomicRingData::new(&self.data)
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
    use super::*;

    #[test]
    fn control_offsets_match_the_wire_layout() {
        assert_eq!(ControlField::WriteIndex.offset(), 0);
        assert_eq!(ControlField::ReadIndex.offset(), 4);
        assert_eq!(ControlField::InterruptMask.offset(), 8);
        assert_eq!(ControlField::PendingSendSize.offset(), 12);
        assert_eq!(ControlField::FeatureBits.offset(), 64);
        assert_eq!(core::mem::size_of::<ControlPageWords>(), CONTROL_PAGE_SIZE);
        assert_eq!(core::mem::align_of::<ControlPageWords>(), 4096);
    }

    #[test]
    fn owned_memory_rejects_bad_lengths() {
        assert_eq!(OwnedRingMemory::new(60).err(), Some(RingError::InvalidDataLength { len: 60 }));
        assert_eq!(OwnedRingMemory::new(100).err(), Some(RingError::InvalidDataLength { len: 100 }));
        assert_eq!(OwnedRingMemory::new(4096).unwrap().data().len(), 4096);
    }

    #[test]
    fn copies_round_trip_at_every_alignment_and_length() {
        let owned = OwnedRingMemory::new(8192).unwrap();
        let memory = owned.data();
        let source: alloc::vec::Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0usize, 1, 7, 8, 9, 63, 64, 65, 255, 256, 1024, 4095, 5000] {
            memory.write(8, &source[..len]);
            // Zero padding up to the next word.
            let padded = len.div_ceil(8) * 8;
            let mut back = alloc::vec![0xAAu8; padded];
            memory.read(8, &mut back);
            assert_eq!(&back[..len], &source[..len], "len {len}");
            assert!(back[len..].iter().all(|&b| b == 0), "padding of len {len}");
            // Word reads see the same bytes, padding included.
            let mut words = alloc::vec![[0xAAu8; 8]; padded / 8];
            memory.read_words(8, &mut words);
            assert_eq!(words.as_flattened(), &back[..], "words of len {len}");
            // Unaligned reads of a sub-range.
            for skip in 1..8.min(len) {
                let mut part = alloc::vec![0u8; len - skip];
                memory.read(8 + skip, &mut part);
                assert_eq!(&part[..], &source[skip..len], "len {len} skip {skip}");
            }
        }
    }

    #[test]
    fn control_fields_are_separate() {
        let memory = OwnedRingMemory::new(64).unwrap();
        let fields = [
            ControlField::WriteIndex,
            ControlField::ReadIndex,
            ControlField::InterruptMask,
            ControlField::PendingSendSize,
            ControlField::FeatureBits,
        ];
        for (value, field) in fields.iter().enumerate() {
            memory.store_control(*field, value as u32 + 10);
        }
        for (value, field) in fields.iter().enumerate() {
            assert_eq!(memory.load_control(*field), value as u32 + 10);
        }
    }
}
