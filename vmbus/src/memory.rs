//! Guest physical memory as the VMBus host sees it: the pages the guest names in GPADLs, ring opens and GPA-direct
//! packets.
//!
//! Reference: `hyperv-vmbus.md` §5 (GPADLs name guest pages by PFN), §6 (ring layout over the ring GPADL's pages,
//! GPA-direct ranges), issue 7 §2 (the server maps GPADLs).
//!
//! - [`GuestMemory`] is what the server needs from guest memory: a ring view over a list of page numbers and
//!   bounds-checked byte copies at a guest physical address. Every address comes from the untrusted guest, so every
//!   access is checked and a page outside memory is a [`MemoryError`], never a panic. The kernel implements it over
//!   its physical-memory window; the host tests use [`PageArena`].
//! - [`PageArena`] is guest memory in ordinary host memory: a run of pages with a base PFN, shared (an [`Arc`]) by
//!   the guest side of a test, which allocates its ring pages there ([`PageArena::channel_rings`]), and by the server,
//!   which maps the same pages from the PFNs that OPENCHANNEL carried. Like [`crate::ring::OwnedRingMemory`] it is
//!   made of atomics, so both ends may touch it at once, however they misbehave.
//!
//! The arena stores memory as little-endian 64-bit words. The ring's 32-bit control fields share words in pairs
//! (`write_index` with `read_index`, `interrupt_mask` with `pending_send_sz`), owned by different sides, so a
//! control store replaces its half of the word with a compare-and-swap loop and never clobbers the peer's half.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

use crate::channel::ChannelRings;
use crate::ring::{ControlField, GpaDirectRanges, GpaRange, MAX_DATA_LEN, RingData, RingMemory};

/// Size of a guest page: the unit of PFNs in GPADLs, ring pages and GPA-direct ranges (§5, §6).
pub const PAGE_SIZE: u64 = 4096;

/// 64-bit words in a page.
const WORDS_PER_PAGE: usize = PAGE_SIZE as usize / 8;

/// Why guest memory could not be accessed as asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MemoryError {
    /// The byte range (or page, with `len` 4096) lies outside guest memory, or its end overflows.
    OutOfRange {
        /// First guest physical address asked for.
        gpa: u64,
        /// Bytes asked for.
        len: u64,
    },
    /// The ring's pages are not consecutive page numbers; this memory maps only contiguous rings.
    NotContiguous {
        /// Index in the list of the first page that does not follow its predecessor.
        index: usize,
    },
    /// A ring needs a control page and at least one data page, and at most [`MAX_DATA_LEN`] bytes of data.
    BadRingLength {
        /// Pages given.
        pages: usize,
    },
    /// No run of this many free consecutive pages is left in the arena.
    Exhausted {
        /// Pages asked for.
        pages: usize,
    },
    /// A write through a read-only mapping of a GPADL.
    ReadOnly,
    /// Bytes outside the buffer a mapped GPADL describes.
    OutsideBuffer {
        /// Offset asked for in the buffer.
        offset: u64,
        /// Bytes asked for.
        len: u64,
    },
    /// An atomic word operation at an address that is not 8-byte aligned.
    Misaligned {
        /// The address.
        gpa: u64,
    },
    /// Pages to free were not all allocated (or lie outside the arena).
    NotAllocated {
        /// The first page of the run.
        pfn: u64,
        /// Pages in the run.
        pages: usize,
    },
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::OutOfRange { gpa, len } => write!(f, "{len} bytes at guest address {gpa:#x} are outside memory"),
            Self::NotContiguous { index } => write!(f, "ring page {index} does not follow the one before it"),
            Self::BadRingLength { pages } => write!(f, "a ring cannot have {pages} pages"),
            Self::Exhausted { pages } => write!(f, "no {pages} consecutive free pages"),
            Self::ReadOnly => write!(f, "the mapping is read-only"),
            Self::OutsideBuffer { offset, len } => {
                write!(f, "{len} bytes at offset {offset:#x} are outside the buffer")
            }
            Self::Misaligned { gpa } => write!(f, "guest address {gpa:#x} is not 8-byte aligned"),
            Self::NotAllocated { pfn, pages } => write!(f, "pages {pfn:#x}+{pages} were not allocated"),
        }
    }
}

impl core::error::Error for MemoryError {}

/// Guest physical memory as the host side of VMBus reaches it (see the module documentation).
///
/// Implementations check every address: a page or byte outside guest memory is [`MemoryError::OutOfRange`]. The guest
/// may change any byte at any time, so an implementation never hands out `&[u8]` to guest memory.
pub trait GuestMemory {
    /// A ring mapped from guest pages; it keeps what it needs of the memory alive.
    type Ring: RingMemory;

    /// Maps a ring (§6): `pfns[0]` is its control page, the rest its data area in order. An implementation may
    /// require the pages to be consecutive ([`MemoryError::NotContiguous`]); every page must lie in guest memory.
    fn ring(&self, pfns: &[u64]) -> Result<Self::Ring, MemoryError>;

    /// Copies `dst.len()` bytes from guest physical address `gpa`.
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError>;

    /// Copies `src` to guest physical address `gpa`.
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError>;

    /// Copies the bytes of a GPA-direct packet's ranges (§6), one range after the other, into the start of `dst`;
    /// returns how many were copied. `dst` must hold them all ([`MemoryError::OutOfRange`] names the first range
    /// byte that does not fit otherwise, with `gpa` 0).
    fn read_gpa_ranges(&self, ranges: &GpaDirectRanges<'_>, dst: &mut [u8]) -> Result<usize, MemoryError> {
        let mut done = 0usize;
        for range in ranges.iter() {
            let len = range.byte_count as usize;
            let target = dst.get_mut(done..).and_then(|rest| rest.get_mut(..len));
            let target = target.ok_or(MemoryError::OutOfRange { gpa: 0, len: (done + len) as u64 })?;
            copy_range(range, target.len(), |gpa, at, n| self.read(gpa, &mut target[at..at + n]))?;
            done += len;
        }
        Ok(done)
    }

    /// Copies `src` into the guest pages of a GPA-direct packet's ranges (§6), filling one range after the other;
    /// returns how many bytes were copied (all of `src`, or the total of the ranges if smaller).
    fn write_gpa_ranges(&self, ranges: &GpaDirectRanges<'_>, src: &[u8]) -> Result<usize, MemoryError> {
        let mut done = 0usize;
        for range in ranges.iter() {
            let Some(rest) = src.get(done..).filter(|rest| !rest.is_empty()) else {
                break;
            };
            let len = rest.len().min(range.byte_count as usize);
            copy_range(range, len, |gpa, at, n| self.write(gpa, &rest[at..at + n]))?;
            done += len;
        }
        Ok(done)
    }
}

/// Calls `copy(gpa, offset, len)` for each page piece of the first `len` bytes of `range` (`len` is at most the
/// range's byte count, so every piece has its page in the range's PFN list).
fn copy_range(
    range: GpaRange<'_>,
    len: usize,
    mut copy: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
) -> Result<(), MemoryError> {
    let mut offset = 0usize;
    while offset < len {
        let in_range = u64::from(range.byte_offset) + offset as u64;
        let page = usize::try_from(in_range / PAGE_SIZE).unwrap_or(usize::MAX);
        let in_page = in_range % PAGE_SIZE;
        let pfn = range.pfns.get(page).ok_or(MemoryError::OutOfRange { gpa: 0, len: len as u64 })?;
        let n = (len - offset).min((PAGE_SIZE - in_page) as usize);
        let gpa = pfn.checked_mul(PAGE_SIZE).ok_or(MemoryError::OutOfRange { gpa: u64::MAX, len: n as u64 })?;
        copy(gpa + in_page, offset, n)?;
        offset += n;
    }
    Ok(())
}

impl<T: GuestMemory + ?Sized> GuestMemory for &T {
    type Ring = T::Ring;
    fn ring(&self, pfns: &[u64]) -> Result<T::Ring, MemoryError> {
        (**self).ring(pfns)
    }
    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        (**self).read(gpa, dst)
    }
    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        (**self).write(gpa, src)
    }
}

/// The shared state of a [`PageArena`].
struct ArenaInner {
    base_pfn: u64,
    page_count: usize,
    /// Every page, as little-endian words.
    words: alloc::boxed::Box<[AtomicU64]>,
    /// One bit per page: allocated.
    allocated: Mutex<Vec<u64>>,
}

/// Guest memory in host memory for tests and the in-process loopback: `page_count` pages starting at guest page
/// `base_pfn`, with an allocator of contiguous page runs (see the module documentation).
///
/// Cloning is cheap and shares the memory. The allocator only tracks which pages are in use; every page is guest
/// memory whether allocated or not, as on a real machine.
#[derive(Clone)]
pub struct PageArena {
    inner: Arc<ArenaInner>,
}

impl fmt::Debug for PageArena {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageArena")
            .field("base_pfn", &self.inner.base_pfn)
            .field("page_count", &self.inner.page_count)
            .field("allocated_pages", &self.allocated_pages())
            .finish()
    }
}

impl PageArena {
    /// An arena of `page_count` zeroed pages, the first at guest page `base_pfn`. Panics if the pages would end
    /// beyond the 64-bit physical address space (a test's mistake, not guest input).
    pub fn new(base_pfn: u64, page_count: usize) -> PageArena {
        let end = base_pfn.checked_add(page_count as u64).and_then(|end| end.checked_mul(PAGE_SIZE));
        assert!(end.is_some(), "arena pages {base_pfn:#x}+{page_count} overflow the physical address space");
        let words = core::iter::repeat_with(|| AtomicU64::new(0)).take(page_count * WORDS_PER_PAGE).collect();
        let allocated = Mutex::new(alloc::vec![0u64; page_count.div_ceil(64)]);
        PageArena { inner: Arc::new(ArenaInner { base_pfn, page_count, words, allocated }) }
    }

    /// The first guest page of the arena.
    pub fn base_pfn(&self) -> u64 {
        self.inner.base_pfn
    }

    /// Pages in the arena.
    pub fn page_count(&self) -> usize {
        self.inner.page_count
    }

    /// Whether guest page `pfn` lies in the arena.
    pub fn contains_pfn(&self, pfn: u64) -> bool {
        pfn.checked_sub(self.inner.base_pfn).is_some_and(|index| index < self.inner.page_count as u64)
    }

    /// Allocates `pages` consecutive pages (the lowest free run), zeroes them and returns the first page number.
    pub fn allocate(&self, pages: usize) -> Result<u64, MemoryError> {
        let exhausted = MemoryError::Exhausted { pages };
        if pages == 0 {
            return Err(exhausted);
        }
        let mut bits = self.inner.allocated.lock();
        let is_set = |bits: &[u64], page: usize| bits[page / 64] & (1 << (page % 64)) != 0;
        let mut run_start = 0;
        let mut run = 0;
        let mut found = None;
        for page in 0..self.inner.page_count {
            if is_set(&bits, page) {
                run = 0;
                run_start = page + 1;
                continue;
            }
            run += 1;
            if run == pages {
                found = Some(run_start);
                break;
            }
        }
        let first = found.ok_or(exhausted)?;
        for page in first..first + pages {
            bits[page / 64] |= 1 << (page % 64);
        }
        drop(bits);
        for word in &self.inner.words[first * WORDS_PER_PAGE..(first + pages) * WORDS_PER_PAGE] {
            word.store(0, Ordering::Relaxed);
        }
        Ok(self.inner.base_pfn + first as u64)
    }

    /// Frees `pages` pages from `pfn`, all of which must be allocated (else nothing is freed).
    pub fn free(&self, pfn: u64, pages: usize) -> Result<(), MemoryError> {
        let not_allocated = MemoryError::NotAllocated { pfn, pages };
        let first = self.page_index(pfn).ok_or(not_allocated)?;
        if pages == 0 || first.checked_add(pages).is_none_or(|end| end > self.inner.page_count) {
            return Err(not_allocated);
        }
        let mut bits = self.inner.allocated.lock();
        if (first..first + pages).any(|page| bits[page / 64] & (1 << (page % 64)) == 0) {
            return Err(not_allocated);
        }
        for page in first..first + pages {
            bits[page / 64] &= !(1 << (page % 64));
        }
        Ok(())
    }

    /// Pages allocated and not freed.
    pub fn allocated_pages(&self) -> usize {
        self.inner.allocated.lock().iter().map(|word| word.count_ones() as usize).sum()
    }

    /// Guest side of a test: allocates one contiguous run for a channel's two rings (`outgoing_pages` for the
    /// guest → host ring, then `incoming_pages` for the host → guest ring, each a control page plus data pages) and
    /// returns them as the [`ChannelRings`] that [`crate::channel::Channel::open`] takes, with their real page
    /// numbers. Free them with [`free`](Self::free) from `pfns[0]` for `pfns.len()` pages once the channel is closed
    /// and its GPADL torn down.
    pub fn channel_rings(
        &self,
        outgoing_pages: u32,
        incoming_pages: u32,
    ) -> Result<ChannelRings<ArenaRing>, MemoryError> {
        let (out, inc) = (outgoing_pages as usize, incoming_pages as usize);
        if out < 2 || inc < 2 {
            return Err(MemoryError::BadRingLength { pages: out.min(inc) });
        }
        let first = self.allocate(out + inc)?;
        let pfns: Vec<u64> = (first..first + (out + inc) as u64).collect();
        let rings = self.ring(&pfns[..out]).and_then(|outgoing| Ok((outgoing, self.ring(&pfns[out..])?)));
        match rings {
            Ok((outgoing, incoming)) => Ok(ChannelRings { outgoing, incoming, pfns, outgoing_pages }),
            Err(error) => {
                // The run was just allocated whole, so freeing it cannot fail.
                let _ = self.free(first, out + inc);
                Err(error)
            }
        }
    }

    /// Atomically sets the bits of `mask` in the little-endian word at `gpa` (8-byte aligned) and returns the word
    /// as it was: how the interrupt and monitor pages are written (§4, §9).
    pub fn fetch_or_word(&self, gpa: u64, mask: u64) -> Result<u64, MemoryError> {
        Ok(self.word(gpa)?.fetch_or(mask, Ordering::AcqRel))
    }

    /// Atomically clears the bits of `mask` in the little-endian word at `gpa` (8-byte aligned) and returns the word
    /// as it was: test-and-clear of interrupt and monitor bits (§4, §9).
    pub fn fetch_clear_word(&self, gpa: u64, mask: u64) -> Result<u64, MemoryError> {
        Ok(self.word(gpa)?.fetch_and(!mask, Ordering::AcqRel))
    }

    /// The word at the 8-byte aligned `gpa`, for atomic updates of shared pages (interrupt and monitor pages).
    pub fn word(&self, gpa: u64) -> Result<&AtomicU64, MemoryError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemoryError::Misaligned { gpa });
        }
        let offset = self.byte_offset(gpa, 8)?;
        Ok(&self.inner.words[offset / 8])
    }

    /// Index in the arena of guest page `pfn`.
    fn page_index(&self, pfn: u64) -> Option<usize> {
        let index = pfn.checked_sub(self.inner.base_pfn)?;
        (index < self.inner.page_count as u64).then_some(index as usize)
    }

    /// Byte offset in the arena of the `len` bytes at `gpa`, if they all lie in it.
    fn byte_offset(&self, gpa: u64, len: usize) -> Result<usize, MemoryError> {
        let out_of_range = MemoryError::OutOfRange { gpa, len: len as u64 };
        let start = gpa.checked_sub(self.inner.base_pfn * PAGE_SIZE).ok_or(out_of_range)?;
        let size = self.inner.page_count as u64 * PAGE_SIZE;
        let end = start.checked_add(len as u64).ok_or(out_of_range)?;
        if end > size {
            return Err(out_of_range);
        }
        Ok(start as usize)
    }
}

impl GuestMemory for PageArena {
    type Ring = ArenaRing;

    fn ring(&self, pfns: &[u64]) -> Result<ArenaRing, MemoryError> {
        let pages = pfns.len();
        let data_pages = pages.checked_sub(1).filter(|&data| data >= 1);
        let data_len = data_pages.and_then(|data| data.checked_mul(PAGE_SIZE as usize)).filter(|&l| l <= MAX_DATA_LEN);
        let data_len = data_len.ok_or(MemoryError::BadRingLength { pages })?;
        let first = pfns[0];
        for (index, &pfn) in pfns.iter().enumerate() {
            if self.page_index(pfn).is_none() {
                return Err(MemoryError::OutOfRange { gpa: pfn.saturating_mul(PAGE_SIZE), len: PAGE_SIZE });
            }
            if first.checked_add(index as u64) != Some(pfn) {
                return Err(MemoryError::NotContiguous { index });
            }
        }
        // Every page is in the arena and they are consecutive, so the whole run is.
        let control_word = (first - self.inner.base_pfn) as usize * WORDS_PER_PAGE;
        Ok(ArenaRing { inner: Arc::clone(&self.inner), control_word, data_words: data_len / 8 })
    }

    fn read(&self, gpa: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        let offset = self.byte_offset(gpa, dst.len())?;
        copy_out(&self.inner.words, offset, dst);
        Ok(())
    }

    fn write(&self, gpa: u64, src: &[u8]) -> Result<(), MemoryError> {
        let offset = self.byte_offset(gpa, src.len())?;
        copy_in(&self.inner.words, offset, src);
        Ok(())
    }
}

/// The guest side of a test: its interrupt page and monitor page 2 in arena memory, where a guest channel sets its
/// bits before (or instead of) HvSignalEvent (§4, §9, [`crate::channel::SignalPath`]). Bits that would fall outside
/// the arena are dropped (and logged): a test's mistake, not something to panic over.
#[derive(Clone, Debug)]
pub struct ArenaInterruptPages {
    memory: PageArena,
    /// The guest's interrupt page (send half at +2048), if it has one.
    interrupt_page: Option<u64>,
    /// Monitor page 2 (child → parent), if the guest gave monitor pages.
    monitor_page2: Option<u64>,
}

/// Offset of the guest → host half of the interrupt page (§4: the first half is the host → guest one).
pub const SEND_INTERRUPT_OFFSET: u64 = 2048;

/// Offset of trigger group 0 in a monitor page; each group is `{pending u32, armed u32}` (§9).
pub const MONITOR_TRIGGER_GROUP_OFFSET: u64 = 8;

impl ArenaInterruptPages {
    /// The pages at guest physical addresses `interrupt_page` and `monitor_page2` of `memory`.
    pub fn new(memory: PageArena, interrupt_page: Option<u64>, monitor_page2: Option<u64>) -> ArenaInterruptPages {
        ArenaInterruptPages { memory, interrupt_page, monitor_page2 }
    }

    fn set_bit(&self, gpa: u64, bit: u32) {
        if let Err(error) = self.memory.fetch_or_word(gpa, 1 << bit) {
            log::warn!("vmbus test guest: interrupt bit at {gpa:#x}: {error}");
        }
    }
}

impl crate::channel::InterruptPages for ArenaInterruptPages {
    fn set_send_interrupt(&self, relid: u32) {
        if let Some(page) = self.interrupt_page {
            let word = SEND_INTERRUPT_OFFSET + u64::from(relid / 64) * 8;
            self.set_bit(page + word, relid % 64);
        }
    }

    fn set_monitor_pending(&self, monitor_id: u8) {
        if let Some(page) = self.monitor_page2 {
            // `pending` is the low half of the group's word.
            let group = MONITOR_TRIGGER_GROUP_OFFSET + u64::from(monitor_id / 32) * 8;
            self.set_bit(page + group, u32::from(monitor_id % 32));
        }
    }

    fn exchange_monitor_latency(&self, monitor_id: u8, latency: u16) -> Option<u16> {
        let bit = crate::protocol::MonitorBit::for_monitor_id(monitor_id)?;
        let gpa = self.monitor_page2? + (bit.latency_offset as u64 & !7);
        match self.memory.word(gpa) {
            Ok(word) => Some(bit.exchange_latency(word, latency)),
            Err(error) => {
                log::warn!("vmbus test guest: monitor latency at {gpa:#x}: {error}");
                None
            }
        }
    }
}

/// Copies bytes out of little-endian words from byte `offset`. The range lies within `words`.
fn copy_out(words: &[AtomicU64], offset: usize, dst: &mut [u8]) {
    let mut done = 0;
    while done < dst.len() {
        let at = offset + done;
        let skip = at % 8;
        let n = (8 - skip).min(dst.len() - done);
        let bytes = words[at / 8].load(Ordering::Relaxed).to_le_bytes();
        dst[done..done + n].copy_from_slice(&bytes[skip..skip + n]);
        done += n;
    }
}

/// Copies bytes into little-endian words from byte `offset`; a partly written word keeps its other bytes (an
/// atomic read-modify-write, so a peer's concurrent store to them is not lost). The range lies within `words`.
fn copy_in(words: &[AtomicU64], offset: usize, src: &[u8]) {
    let mut done = 0;
    while done < src.len() {
        let at = offset + done;
        let skip = at % 8;
        let n = (8 - skip).min(src.len() - done);
        let word = &words[at / 8];
        if n == 8 {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&src[done..done + 8]);
            word.store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        } else {
            let _ = word.try_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                let mut bytes = old.to_le_bytes();
                bytes[skip..skip + n].copy_from_slice(&src[done..done + n]);
                Some(u64::from_le_bytes(bytes))
            });
        }
        done += n;
    }
}

/// A ring over consecutive pages of a [`PageArena`] (§6 layout: the control page, then the data area). Both the
/// guest side of a test and the server use this type for the same pages.
pub struct ArenaRing {
    inner: Arc<ArenaInner>,
    /// Index of the control page's first word in the arena.
    control_word: usize,
    /// Words in the data area.
    data_words: usize,
}

impl ArenaRing {
    /// The word holding `field` and the shift of its 32 bits in it.
    #[inline(always)]
    fn control_slot(&self, field: ControlField) -> (&AtomicU64, u32) {
        let offset = field.offset();
        (&self.inner.words[self.control_word + offset / 8], (offset % 8) as u32 * 8)
    }
}

impl RingMemory for ArenaRing {
    type Data<'a> = ArenaRingData<'a>;

    #[inline(always)]
    fn data(&self) -> ArenaRingData<'_> {
        let start = self.control_word + WORDS_PER_PAGE;
        ArenaRingData { words: &self.inner.words[start..start + self.data_words] }
    }

    #[inline(always)]
    fn load_control(&self, field: ControlField) -> u32 {
        let (word, shift) = self.control_slot(field);
        (word.load(Ordering::Acquire) >> shift) as u32
    }

    #[inline(always)]
    fn store_control(&self, field: ControlField, value: u32) {
        let (word, shift) = self.control_slot(field);
        let mask = u64::from(u32::MAX) << shift;
        // Only this field's half changes; the other half belongs to the peer.
        let _ = word
            .try_update(Ordering::Release, Ordering::Relaxed, |old| Some((old & !mask) | (u64::from(value) << shift)));
    }
}

/// The data area of an [`ArenaRing`]: little-endian words copied one at a time with relaxed atomics.
#[derive(Clone, Copy)]
pub struct ArenaRingData<'a> {
    words: &'a [AtomicU64],
}

impl RingData for ArenaRingData<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.words.len() * 8
    }

    #[inline(always)]
    fn read(&self, offset: usize, dst: &mut [u8]) {
        copy_out(self.words, offset, dst)
    }

    #[inline(always)]
    fn write(&self, offset: usize, src: &[u8]) {
        // `offset` is a multiple of 8 (the RingData contract): whole words, the last one zero-padded.
        let (whole, tail) = src.as_chunks::<8>();
        let first = offset / 8;
        for (word, chunk) in self.words[first..first + whole.len()].iter().zip(whole) {
            word.store(u64::from_le_bytes(*chunk), Ordering::Relaxed);
        }
        if !tail.is_empty() {
            let mut bytes = [0u8; 8];
            bytes[..tail.len()].copy_from_slice(tail);
            self.words[first + whole.len()].store(u64::from_le_bytes(bytes), Ordering::Relaxed);
        }
    }

    #[inline(always)]
    fn load_word(&self, offset: usize) -> u64 {
        u64::from_le(self.words[offset / 8].load(Ordering::Relaxed))
    }

    #[inline(always)]
    fn store_word(&self, offset: usize, value: u64) {
        self.words[offset / 8].store(value.to_le(), Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{OutgoingGpaRange, OutgoingPacket, RingReader, RingWriter, initialize_control_page};

    #[test]
    fn allocation_finds_contiguous_runs_and_frees_them() {
        let arena = PageArena::new(0x100, 10);
        assert_eq!(arena.allocate(3), Ok(0x100));
        assert_eq!(arena.allocate(3), Ok(0x103));
        assert_eq!(arena.allocated_pages(), 6);
        arena.free(0x100, 3).unwrap();
        assert_eq!(arena.allocate(4), Ok(0x106), "the freed hole is too small for 4");
        assert_eq!(arena.allocate(2), Ok(0x100));
        assert_eq!(arena.allocate(2), Err(MemoryError::Exhausted { pages: 2 }));
        assert_eq!(arena.allocate(1), Ok(0x102));
        assert_eq!(arena.allocate(0), Err(MemoryError::Exhausted { pages: 0 }));
        // Freeing something not (wholly) allocated frees nothing.
        assert_eq!(arena.free(0x100, 11), Err(MemoryError::NotAllocated { pfn: 0x100, pages: 11 }));
        assert_eq!(arena.free(0xFF, 1), Err(MemoryError::NotAllocated { pfn: 0xFF, pages: 1 }));
        arena.free(0x103, 3).unwrap();
        assert_eq!(arena.free(0x103, 1), Err(MemoryError::NotAllocated { pfn: 0x103, pages: 1 }));
        assert_eq!(arena.allocated_pages(), 7);
    }

    #[test]
    fn allocation_zeroes_reused_pages() {
        let arena = PageArena::new(0, 2);
        let pfn = arena.allocate(1).unwrap();
        arena.write(pfn * PAGE_SIZE + 100, &[0xAB; 64]).unwrap();
        arena.free(pfn, 1).unwrap();
        let pfn = arena.allocate(1).unwrap();
        let mut back = [0xFFu8; 64];
        arena.read(pfn * PAGE_SIZE + 100, &mut back).unwrap();
        assert_eq!(back, [0; 64]);
    }

    #[test]
    fn byte_access_is_bounds_checked_and_exact_at_every_alignment() {
        let arena = PageArena::new(0x10, 2);
        let base = 0x10 * PAGE_SIZE;
        let source: Vec<u8> = (0..100u8).collect();
        for offset in 0..9u64 {
            for len in [0usize, 1, 7, 8, 9, 17, 100] {
                arena.write(base, &[0xEE; 128]).unwrap();
                arena.write(base + offset, &source[..len]).unwrap();
                let mut back = [0u8; 128];
                arena.read(base, &mut back).unwrap();
                let end = offset as usize + len;
                assert_eq!(&back[offset as usize..end], &source[..len], "offset {offset} len {len}");
                assert!(back[..offset as usize].iter().chain(&back[end..]).all(|&b| b == 0xEE), "neighbours kept");
            }
        }
        let end = base + 2 * PAGE_SIZE;
        assert_eq!(arena.read(end - 4, &mut [0; 4]), Ok(()));
        assert_eq!(arena.read(end - 4, &mut [0; 5]), Err(MemoryError::OutOfRange { gpa: end - 4, len: 5 }));
        assert_eq!(arena.write(base - 1, &[1]), Err(MemoryError::OutOfRange { gpa: base - 1, len: 1 }));
        assert!(arena.read(u64::MAX, &mut [0; 2]).is_err(), "no overflow");
        assert!(arena.write(0, &[]).is_err(), "below the arena even when empty");
    }

    #[test]
    fn rings_must_be_contiguous_pages_inside_memory() {
        let arena = PageArena::new(0x40, 8);
        assert!(arena.ring(&[0x40, 0x41, 0x42]).is_ok());
        assert_eq!(arena.ring(&[0x40]).err(), Some(MemoryError::BadRingLength { pages: 1 }));
        assert_eq!(arena.ring(&[]).err(), Some(MemoryError::BadRingLength { pages: 0 }));
        assert_eq!(arena.ring(&[0x40, 0x42]).err(), Some(MemoryError::NotContiguous { index: 1 }));
        assert_eq!(arena.ring(&[0x47, 0x48]).err(), Some(MemoryError::OutOfRange { gpa: 0x48 * PAGE_SIZE, len: 4096 }));
        assert!(matches!(arena.ring(&[u64::MAX, 0]), Err(MemoryError::OutOfRange { .. })));
    }

    #[test]
    fn control_fields_sharing_a_word_stay_separate_and_match_the_byte_layout() {
        let arena = PageArena::new(0, 4);
        let ring = arena.ring(&[1, 2]).unwrap();
        ring.store_control(ControlField::WriteIndex, 0x1122_3344);
        ring.store_control(ControlField::ReadIndex, 0x5566_7788);
        ring.store_control(ControlField::InterruptMask, 1);
        ring.store_control(ControlField::PendingSendSize, 0x200);
        ring.store_control(ControlField::FeatureBits, 1);
        assert_eq!(ring.load_control(ControlField::WriteIndex), 0x1122_3344);
        assert_eq!(ring.load_control(ControlField::ReadIndex), 0x5566_7788);
        assert_eq!(ring.load_control(ControlField::InterruptMask), 1);
        assert_eq!(ring.load_control(ControlField::PendingSendSize), 0x200);
        let mut header = [0u8; 72];
        arena.read(PAGE_SIZE, &mut header).unwrap();
        assert_eq!(header[0..4], 0x1122_3344u32.to_le_bytes());
        assert_eq!(header[4..8], 0x5566_7788u32.to_le_bytes());
        assert_eq!(header[8..12], 1u32.to_le_bytes());
        assert_eq!(header[12..16], 0x200u32.to_le_bytes());
        assert_eq!(header[64..68], 1u32.to_le_bytes());
    }

    #[test]
    fn two_views_of_the_same_pages_carry_packets_with_wrap_around() {
        let arena = PageArena::new(0x1000, 4);
        let writer_view = arena.ring(&[0x1000, 0x1001]).unwrap();
        initialize_control_page(&writer_view);
        let mut writer = RingWriter::new(writer_view).unwrap();
        let mut reader = RingReader::new(arena.ring(&[0x1000, 0x1001]).unwrap()).unwrap();
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        for id in 0..100u64 {
            let len = (id as usize * 37) % 300 + 1;
            let _ = writer.write(&OutgoingPacket::in_band(id, &payload[..len])).unwrap();
            let mut batch = reader.batch();
            let packet = batch.next_packet().unwrap().unwrap();
            assert_eq!(packet.transaction_id(), id);
            let mut back = [0u8; 304];
            let n = packet.read_payload(&mut back).unwrap();
            assert_eq!(n, len.next_multiple_of(8));
            assert_eq!(&back[..len], &payload[..len]);
            let _ = batch.commit().unwrap();
        }
    }

    #[test]
    fn gpa_direct_ranges_are_read_and_written_across_pages() {
        let arena = PageArena::new(0x200, 8);
        let ring_view = arena.ring(&[0x200, 0x201]).unwrap();
        initialize_control_page(&ring_view);
        let mut writer = RingWriter::new(ring_view).unwrap();
        let mut reader = RingReader::new(arena.ring(&[0x200, 0x201]).unwrap()).unwrap();
        // Range 1: 5000 bytes from offset 0xF00 of page 0x203 over three pages that are not consecutive.
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 13) as u8).collect();
        let pfns1 = [0x203, 0x206, 0x204];
        arena.write(0x203 * PAGE_SIZE + 0xF00, &data[..0x100]).unwrap();
        arena.write(0x206 * PAGE_SIZE, &data[0x100..0x1100]).unwrap();
        arena.write(0x204 * PAGE_SIZE, &data[0x1100..]).unwrap();
        let pfns2 = [0x207];
        arena.write(0x207 * PAGE_SIZE + 8, b"second").unwrap();
        let ranges = [
            OutgoingGpaRange { byte_count: 5000, byte_offset: 0xF00, pfns: &pfns1 },
            OutgoingGpaRange { byte_count: 6, byte_offset: 8, pfns: &pfns2 },
        ];
        let packet = OutgoingPacket {
            kind: crate::ring::OutgoingKind::GpaDirect(&ranges),
            ..OutgoingPacket::in_band(9, b"req")
        };
        let _ = writer.write(&packet).unwrap();
        let mut batch = reader.batch();
        let incoming = batch.next_packet().unwrap().unwrap();
        let mut scratch = [0u8; 128];
        let parsed = incoming.gpa_direct(&mut scratch).unwrap();
        let mut back = alloc::vec![0u8; 5006];
        assert_eq!(arena.read_gpa_ranges(&parsed, &mut back), Ok(5006));
        assert_eq!(&back[..5000], &data[..]);
        assert_eq!(&back[5000..], b"second");
        let mut short = [0u8; 100];
        assert!(arena.read_gpa_ranges(&parsed, &mut short).is_err(), "a short buffer is an error");
        // Writing fills the ranges in order and stops with the source.
        assert_eq!(arena.write_gpa_ranges(&parsed, &[0x5A; 5003]), Ok(5003));
        let mut page = [0u8; 8];
        arena.read(0x207 * PAGE_SIZE + 8, &mut page).unwrap();
        assert_eq!(&page, b"\x5A\x5A\x5Aond\0\0");
    }

    #[test]
    fn gpa_ranges_outside_memory_are_errors() {
        let arena = PageArena::new(0x10, 4);
        let ring_view = arena.ring(&[0x10, 0x11]).unwrap();
        initialize_control_page(&ring_view);
        let mut writer = RingWriter::new(ring_view).unwrap();
        let mut reader = RingReader::new(arena.ring(&[0x10, 0x11]).unwrap()).unwrap();
        for pfn in [0x14u64, 0x0F, u64::MAX / 4096, u64::MAX] {
            let pfns = [pfn];
            let ranges = [OutgoingGpaRange { byte_count: 16, byte_offset: 0, pfns: &pfns }];
            let packet = OutgoingPacket {
                kind: crate::ring::OutgoingKind::GpaDirect(&ranges),
                ..OutgoingPacket::in_band(1, &[])
            };
            let _ = writer.write(&packet).unwrap();
            let mut batch = reader.batch();
            let incoming = batch.next_packet().unwrap().unwrap();
            let mut scratch = [0u8; 64];
            let parsed = incoming.gpa_direct(&mut scratch).unwrap();
            assert!(matches!(arena.read_gpa_ranges(&parsed, &mut [0; 16]), Err(MemoryError::OutOfRange { .. })));
            assert!(matches!(arena.write_gpa_ranges(&parsed, &[0; 16]), Err(MemoryError::OutOfRange { .. })));
            let _ = batch.commit().unwrap();
        }
    }

    #[test]
    fn word_bit_operations_and_interrupt_pages() {
        use crate::channel::InterruptPages;
        let arena = PageArena::new(0x20, 3);
        let page = 0x20 * PAGE_SIZE;
        assert_eq!(arena.fetch_or_word(page + 8, 0b101), Ok(0));
        assert_eq!(arena.fetch_or_word(page + 8, 0b010), Ok(0b101));
        assert_eq!(arena.fetch_clear_word(page + 8, 0b001), Ok(0b111));
        assert_eq!(arena.fetch_clear_word(page + 8, u64::MAX), Ok(0b110));
        assert_eq!(arena.fetch_or_word(page + 4, 1), Err(MemoryError::Misaligned { gpa: page + 4 }));
        assert!(arena.fetch_or_word(page + 3 * PAGE_SIZE, 1).is_err());

        let pages = ArenaInterruptPages::new(arena.clone(), Some(page), Some(page + 2 * PAGE_SIZE));
        pages.set_send_interrupt(70);
        pages.set_monitor_pending(33);
        let mut word = [0u8; 8];
        arena.read(page + SEND_INTERRUPT_OFFSET + 8, &mut word).unwrap();
        assert_eq!(u64::from_le_bytes(word), 1 << 6, "relid 70: word 1, bit 6 of the send half");
        arena.read(page + 2 * PAGE_SIZE + MONITOR_TRIGGER_GROUP_OFFSET + 8, &mut word).unwrap();
        assert_eq!(u64::from_le_bytes(word), 1 << 1, "monitor id 33: group 1 pending, bit 1");
        // Pages outside the arena are ignored, not a panic.
        let outside = ArenaInterruptPages::new(arena.clone(), Some(0), None);
        outside.set_send_interrupt(1);
        outside.set_monitor_pending(1);
    }

    #[test]
    fn channel_rings_are_two_rings_over_one_run() {
        let arena = PageArena::new(0x300, 16);
        let rings = arena.channel_rings(3, 5).unwrap();
        assert_eq!(rings.pfns, (0x300..0x308).collect::<Vec<u64>>());
        assert_eq!(rings.outgoing_pages, 3);
        rings.validate().unwrap();
        assert_eq!(rings.outgoing.data().len(), 2 * 4096);
        assert_eq!(rings.incoming.data().len(), 4 * 4096);
        assert_eq!(arena.allocated_pages(), 8);
        assert_eq!(arena.channel_rings(1, 2).err(), Some(MemoryError::BadRingLength { pages: 1 }));
        assert_eq!(arena.channel_rings(4, 5).err(), Some(MemoryError::Exhausted { pages: 9 }));
        arena.free(rings.pfns[0], rings.pfns.len()).unwrap();
        assert_eq!(arena.allocated_pages(), 0);
    }
}

/// The KMCL bus's ring allocator over a [`PageArena`]: channel rings for a guest whose memory is the arena (the
/// in-process loopback, in tests and in the unikernel's demonstration bus).
#[derive(Clone, Debug)]
pub struct ArenaRingAllocator {
    arena: PageArena,
}

impl ArenaRingAllocator {
    /// Rings from `arena`.
    pub fn new(arena: PageArena) -> ArenaRingAllocator {
        ArenaRingAllocator { arena }
    }

    /// The arena the rings come from.
    pub fn arena(&self) -> &PageArena {
        &self.arena
    }
}

/// The pages of one channel's rings in a [`PageArena`]: the first page and how many.
#[derive(Debug, PartialEq, Eq)]
pub struct ArenaLease {
    first_pfn: u64,
    pages: usize,
}

impl crate::kmcl::RingAllocator for ArenaRingAllocator {
    type Memory = ArenaRing;
    type Lease = ArenaLease;

    fn allocate(
        &self,
        outgoing_pages: u32,
        incoming_pages: u32,
    ) -> crate::kmcl::Result<(ChannelRings<ArenaRing>, ArenaLease)> {
        let rings = self.arena.channel_rings(outgoing_pages, incoming_pages).map_err(|error| match error {
            MemoryError::BadRingLength { .. } => crate::kmcl::NtStatus::INVALID_PARAMETER,
            _ => crate::kmcl::NtStatus::INSUFFICIENT_RESOURCES,
        })?;
        let lease = ArenaLease { first_pfn: rings.pfns[0], pages: rings.pfns.len() };
        Ok((rings, lease))
    }

    fn release(&self, lease: ArenaLease, host_released: bool) {
        if host_released {
            // The run was allocated whole by `allocate`, so freeing it cannot fail.
            let _ = self.arena.free(lease.first_pfn, lease.pages);
        } else {
            log::warn!("vmbus: {} arena pages kept out of use: the host did not confirm their teardown", lease.pages);
        }
    }
}

#[cfg(test)]
mod ring_allocator_tests {
    use super::*;
    use crate::kmcl::{NtStatus, RingAllocator};

    #[test]
    fn rings_come_from_the_arena_and_go_back_only_when_released_by_the_host() {
        let allocator = ArenaRingAllocator::new(PageArena::new(0x100, 32));
        let (rings, lease) = allocator.allocate(3, 5).unwrap();
        assert_eq!(rings.pfns, (0x100..0x108).collect::<Vec<_>>());
        assert_eq!(allocator.arena().allocated_pages(), 8);
        drop(rings);
        allocator.release(lease, true);
        assert_eq!(allocator.arena().allocated_pages(), 0);
        let (_, kept) = allocator.allocate(2, 2).unwrap();
        allocator.release(kept, false);
        assert_eq!(allocator.arena().allocated_pages(), 4, "pages the host may still write stay allocated");
        assert_eq!(allocator.allocate(1, 2).err(), Some(NtStatus::INVALID_PARAMETER));
        assert_eq!(allocator.allocate(20, 20).err(), Some(NtStatus::INSUFFICIENT_RESOURCES));
    }
}
