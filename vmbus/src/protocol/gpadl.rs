//! GPADL description messages: splitting a PFN list into GPADL_HEADER + GPADL_BODY messages, and the reverse.
//!
//! Reference: `hyperv-vmbus.md` §5 (GPADL_HEADER / GPADL_BODY layouts, 26 PFNs in the header, 28 per body) and §6
//! (a GPA range covers `(byte_offset + byte_count + 4095) / 4096` pages, `byte_offset` ≤ 0xFFF, `byte_count` ≠ 0).
//!
//! A GPADL is described by a *range buffer* of `range_buflen` bytes: `rangecount` ranges, each an 8-byte
//! `{byte_count u32, byte_offset u32}` word followed by its PFNs as u64s. GPADL_HEADER carries the first 27 words
//! of it after its 20-byte fixed part (for one range: the range word plus 26 PFNs); each GPADL_BODY carries up to 28
//! more. Everything here is pure: no I/O, and the builder does not allocate.

use alloc::vec::Vec;
use core::fmt;

use zerocopy::byteorder::little_endian::U64;

use super::messages::{GpaRangeHeader, GpadlBody, GpadlHeader};
use super::parse::{Message, MessageBuffer};

/// Page size GPADL ranges are counted in (§6).
pub const GPADL_PAGE_SIZE: u64 = 4096;

/// Why a GPADL description could not be built or reassembled.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum GpadlError {
    /// No range was given, or the header announces `rangecount` 0.
    NoRanges,
    /// More than 65535 ranges (`rangecount` is a u16).
    TooManyRanges,
    /// A range with no PFNs.
    EmptyRange,
    /// A range's `byte_offset` is beyond the first page (must be ≤ 0xFFF).
    ByteOffsetTooLarge {
        /// The offending offset.
        byte_offset: u32,
    },
    /// A range's `byte_count` is 0.
    ByteCountZero,
    /// A range's PFN count differs from `(byte_offset + byte_count + 4095) / 4096`.
    PageCountMismatch {
        /// Pages implied by `byte_offset` and `byte_count`.
        expected: u64,
        /// PFNs supplied (or available in the buffer).
        actual: u64,
    },
    /// The description needs more than 65535 bytes of range buffer (`range_buflen` is a u16).
    TooLarge {
        /// The bytes it would need.
        range_buflen: usize,
    },
    /// A whole-page buffer's byte count does not fit the u32 `byte_count`.
    ByteCountOverflow,
    /// The header's `range_buflen` is not a multiple of 8 or too small to hold one range and one PFN.
    BadRangeBufferLength {
        /// The announced length.
        range_buflen: u16,
    },
    /// A message carries more range words than `range_buflen` leaves room for.
    ExcessData {
        /// Words still expected before this message.
        expected_words: usize,
        /// Words the message carried.
        received_words: usize,
    },
    /// A GPADL_BODY names another GPADL handle than the header.
    HandleMismatch {
        /// The header's handle.
        expected: u32,
        /// The body's handle.
        found: u32,
    },
    /// A GPADL_BODY's `msgnumber` is neither the next in sequence nor 0.
    MessageNumber {
        /// The next number in sequence.
        expected: u32,
        /// The body's number.
        found: u32,
    },
    /// A message other than GPADL_HEADER (to start) or GPADL_BODY (to continue) was fed in.
    UnexpectedMessage,
    /// [`GpadlAssembler::finish`] was called before `range_buflen` bytes arrived.
    Incomplete {
        /// Words still missing.
        missing_words: usize,
    },
    /// The range buffer holds words after the last of `rangecount` ranges.
    TrailingWords {
        /// Words left over.
        extra_words: usize,
    },
}

impl fmt::Display for GpadlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GpadlError::NoRanges => f.write_str("GPADL has no ranges"),
            GpadlError::TooManyRanges => f.write_str("GPADL has more than 65535 ranges"),
            GpadlError::EmptyRange => f.write_str("GPADL range has no pages"),
            GpadlError::ByteOffsetTooLarge { byte_offset } => {
                write!(
                    f,
                    "GPADL range byte_offset {byte_offset:#x} is beyond the first page"
                )
            }
            GpadlError::ByteCountZero => f.write_str("GPADL range byte_count is 0"),
            GpadlError::PageCountMismatch { expected, actual } => {
                write!(
                    f,
                    "GPADL range spans {expected} pages but has {actual} PFNs"
                )
            }
            GpadlError::TooLarge { range_buflen } => {
                write!(
                    f,
                    "GPADL needs {range_buflen} bytes of range buffer, more than 65535"
                )
            }
            GpadlError::ByteCountOverflow => {
                f.write_str("GPADL buffer is too large for a u32 byte_count")
            }
            GpadlError::BadRangeBufferLength { range_buflen } => {
                write!(f, "bad GPADL range_buflen {range_buflen}")
            }
            GpadlError::ExcessData {
                expected_words,
                received_words,
            } => write!(
                f,
                "GPADL message carries {received_words} range words but only {expected_words} remain"
            ),
            GpadlError::HandleMismatch { expected, found } => {
                write!(
                    f,
                    "GPADL_BODY for handle {found:#x} while assembling {expected:#x}"
                )
            }
            GpadlError::MessageNumber { expected, found } => {
                write!(
                    f,
                    "GPADL_BODY msgnumber {found}, expected {expected} (or 0)"
                )
            }
            GpadlError::UnexpectedMessage => f.write_str("not a GPADL_HEADER/GPADL_BODY message"),
            GpadlError::Incomplete { missing_words } => {
                write!(f, "GPADL description lacks {missing_words} words")
            }
            GpadlError::TrailingWords { extra_words } => {
                write!(
                    f,
                    "GPADL range buffer has {extra_words} words after its last range"
                )
            }
        }
    }
}

impl core::error::Error for GpadlError {}

/// Pages spanned by a range: `(byte_offset + byte_count + 4095) / 4096` (§6).
pub const fn pages_spanned(byte_offset: u32, byte_count: u32) -> u64 {
    (byte_offset as u64 + byte_count as u64).div_ceil(GPADL_PAGE_SIZE)
}

/// Checks a range's offset, count and PFN count against each other (§6).
fn check_range(byte_offset: u32, byte_count: u32, page_count: usize) -> Result<(), GpadlError> {
    if page_count == 0 {
        return Err(GpadlError::EmptyRange);
    }
    if u64::from(byte_offset) >= GPADL_PAGE_SIZE {
        return Err(GpadlError::ByteOffsetTooLarge { byte_offset });
    }
    if byte_count == 0 {
        return Err(GpadlError::ByteCountZero);
    }
    let expected = pages_spanned(byte_offset, byte_count);
    let actual = page_count as u64;
    if expected != actual {
        return Err(GpadlError::PageCountMismatch { expected, actual });
    }
    Ok(())
}

/// One GPA range to describe: the bytes `byte_offset .. byte_offset + byte_count` of the pages `pfns`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PfnRange<'a> {
    byte_offset: u32,
    byte_count: u32,
    pfns: &'a [u64],
}

impl<'a> PfnRange<'a> {
    /// A range, checked: `byte_offset` ≤ 0xFFF, `byte_count` ≠ 0 and exactly the pages they span (§6).
    pub fn new(
        byte_offset: u32,
        byte_count: u32,
        pfns: &'a [u64],
    ) -> Result<PfnRange<'a>, GpadlError> {
        check_range(byte_offset, byte_count, pfns.len())?;
        Ok(PfnRange {
            byte_offset,
            byte_count,
            pfns,
        })
    }

    /// A range covering the whole pages `pfns` (offset 0, count = pages × 4096).
    pub fn whole_pages(pfns: &'a [u64]) -> Result<PfnRange<'a>, GpadlError> {
        let bytes = (pfns.len() as u64)
            .checked_mul(GPADL_PAGE_SIZE)
            .ok_or(GpadlError::ByteCountOverflow)?;
        let byte_count = u32::try_from(bytes).map_err(|_| GpadlError::ByteCountOverflow)?;
        PfnRange::new(0, byte_count, pfns)
    }

    /// Offset of the first byte in the first page.
    pub fn byte_offset(&self) -> u32 {
        self.byte_offset
    }

    /// Bytes described.
    pub fn byte_count(&self) -> u32 {
        self.byte_count
    }

    /// The page frame numbers.
    pub fn pfns(&self) -> &'a [u64] {
        self.pfns
    }

    /// The range's leading word of the range buffer: `byte_count` then `byte_offset`, as one little-endian u64.
    fn header_word(&self) -> u64 {
        u64::from(self.byte_count) | (u64::from(self.byte_offset) << 32)
    }
}

/// The ranges a [`GpadlMessages`] walks: one held inline, or a borrowed list.
#[derive(Copy, Clone, Debug)]
enum Ranges<'a> {
    One(PfnRange<'a>),
    Many(&'a [PfnRange<'a>]),
}

impl<'a> Ranges<'a> {
    fn get(&self, index: usize) -> Option<&PfnRange<'a>> {
        match self {
            Ranges::One(range) => (index == 0).then_some(range),
            Ranges::Many(ranges) => ranges.get(index),
        }
    }
}

/// The GPADL_HEADER message followed by as many GPADL_BODY messages as needed for one GPADL, as an iterator of
/// [`MessageBuffer`]s (each ≤ 240 bytes, built on the stack; no allocation per message).
#[derive(Clone, Debug)]
pub struct GpadlMessages<'a> {
    child_relid: u32,
    gpadl: u32,
    ranges: Ranges<'a>,
    range_count: u16,
    range_buflen: u16,
    /// Range being walked.
    range_index: usize,
    /// Position in that range: 0 = its header word, k ≥ 1 = its PFN k − 1.
    word_in_range: usize,
    words_left: usize,
    header_sent: bool,
    next_msgnumber: u32,
}

impl<'a> GpadlMessages<'a> {
    /// The messages for one range over `pfns`, starting `byte_offset` bytes into the first page and `byte_count`
    /// bytes long, for channel `child_relid` under the guest-chosen handle `gpadl`.
    pub fn new(
        child_relid: u32,
        gpadl: u32,
        byte_offset: u32,
        byte_count: u32,
        pfns: &'a [u64],
    ) -> Result<GpadlMessages<'a>, GpadlError> {
        let range = PfnRange::new(byte_offset, byte_count, pfns)?;
        GpadlMessages::build(child_relid, gpadl, Ranges::One(range))
    }

    /// The messages for a buffer of whole pages `pfns` (offset 0, byte count = pages × 4096).
    pub fn for_pages(
        child_relid: u32,
        gpadl: u32,
        pfns: &'a [u64],
    ) -> Result<GpadlMessages<'a>, GpadlError> {
        let range = PfnRange::whole_pages(pfns)?;
        GpadlMessages::build(child_relid, gpadl, Ranges::One(range))
    }

    /// The messages for several ranges in one GPADL (multi-range form).
    pub fn multi_range(
        child_relid: u32,
        gpadl: u32,
        ranges: &'a [PfnRange<'a>],
    ) -> Result<GpadlMessages<'a>, GpadlError> {
        GpadlMessages::build(child_relid, gpadl, Ranges::Many(ranges))
    }

    fn build(
        child_relid: u32,
        gpadl: u32,
        ranges: Ranges<'a>,
    ) -> Result<GpadlMessages<'a>, GpadlError> {
        let (count, words) = match ranges {
            Ranges::One(range) => (1, 1 + range.pfns.len()),
            Ranges::Many(list) => (
                list.len(),
                list.iter().map(|range| 1 + range.pfns.len()).sum(),
            ),
        };
        if count == 0 {
            return Err(GpadlError::NoRanges);
        }
        let range_count = u16::try_from(count).map_err(|_| GpadlError::TooManyRanges)?;
        let bytes = words.saturating_mul(8);
        let range_buflen = u16::try_from(bytes).map_err(|_| GpadlError::TooLarge {
            range_buflen: bytes,
        })?;
        Ok(GpadlMessages {
            child_relid,
            gpadl,
            ranges,
            range_count,
            range_buflen,
            range_index: 0,
            word_in_range: 0,
            words_left: words,
            header_sent: false,
            next_msgnumber: 1,
        })
    }

    /// The header's `range_buflen`: 8 bytes per range word plus 8 per PFN.
    pub fn range_buflen(&self) -> u16 {
        self.range_buflen
    }

    /// The header's `rangecount`.
    pub fn range_count(&self) -> u16 {
        self.range_count
    }

    /// The next word of the range buffer.
    fn next_word(&mut self) -> Option<u64> {
        loop {
            let range = *self.ranges.get(self.range_index)?;
            if self.word_in_range == 0 {
                self.word_in_range = 1;
                return Some(range.header_word());
            }
            if let Some(&pfn) = range.pfns.get(self.word_in_range - 1) {
                self.word_in_range += 1;
                return Some(pfn);
            }
            self.range_index += 1;
            self.word_in_range = 0;
        }
    }

    /// Appends up to `max_words` range-buffer words to `buffer`.
    fn fill(&mut self, buffer: &mut MessageBuffer, max_words: usize) {
        for _ in 0..max_words.min(self.words_left) {
            let Some(word) = self.next_word() else { break };
            self.words_left -= 1;
            let fits = buffer.push(&word.to_le_bytes());
            debug_assert!(
                fits,
                "GPADL word counts keep every message within 240 bytes"
            );
        }
    }

    fn messages_left(&self) -> usize {
        let body_words = if self.header_sent {
            self.words_left
        } else {
            self.words_left.saturating_sub(GpadlHeader::MAX_RANGE_WORDS)
        };
        usize::from(!self.header_sent) + body_words.div_ceil(GpadlBody::MAX_PFNS)
    }
}

impl Iterator for GpadlMessages<'_> {
    type Item = MessageBuffer;

    fn next(&mut self) -> Option<MessageBuffer> {
        if !self.header_sent {
            self.header_sent = true;
            let fixed = GpadlHeader::new(
                self.child_relid,
                self.gpadl,
                self.range_buflen,
                self.range_count,
            );
            let mut buffer = MessageBuffer::from_message(&fixed);
            self.fill(&mut buffer, GpadlHeader::MAX_RANGE_WORDS);
            return Some(buffer);
        }
        if self.words_left == 0 {
            return None;
        }
        let mut buffer =
            MessageBuffer::from_message(&GpadlBody::new(self.next_msgnumber, self.gpadl));
        self.next_msgnumber = self.next_msgnumber.wrapping_add(1);
        self.fill(&mut buffer, GpadlBody::MAX_PFNS);
        Some(buffer)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.messages_left();
        (left, Some(left))
    }
}

impl ExactSizeIterator for GpadlMessages<'_> {}

/// One range of a reassembled GPADL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpadlRange {
    /// Offset of the first byte in the first page (≤ 0xFFF).
    pub byte_offset: u32,
    /// Bytes described (≠ 0).
    pub byte_count: u32,
    /// Exactly the pages the range spans.
    pub pfns: Vec<u64>,
}

/// A GPADL rebuilt from its messages by [`GpadlAssembler`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssembledGpadl {
    /// The channel from the header.
    pub child_relid: u32,
    /// The guest's handle.
    pub gpadl: u32,
    /// The ranges in order (at least one).
    pub ranges: Vec<GpadlRange>,
}

impl AssembledGpadl {
    /// Every PFN of every range, in order.
    pub fn pfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges
            .iter()
            .flat_map(|range| range.pfns.iter().copied())
    }
}

/// Rebuilds a GPADL from a GPADL_HEADER and its GPADL_BODY messages (server side), validating as it goes:
/// `range_buflen` (multiple of 8, room for a range and a page, never exceeded), `rangecount`, the body handle and
/// `msgnumber` (the next in sequence from 1, or 0 ⚠ since Linux leaves it unset and hosts ignore it), and on
/// [`finish`](Self::finish) each range's offset, count and page count. Memory is bounded by `range_buflen` ≤ 64 KiB.
#[derive(Clone, Debug)]
pub struct GpadlAssembler {
    child_relid: u32,
    gpadl: u32,
    range_count: u16,
    total_words: usize,
    words: Vec<u64>,
    next_msgnumber: u32,
}

impl GpadlAssembler {
    /// Starts from a parsed GPADL_HEADER: its fixed part and the range words it carried.
    pub fn new(header: &GpadlHeader, range_words: &[U64]) -> Result<GpadlAssembler, GpadlError> {
        let range_buflen = header.range_buflen.get();
        let min = 2 * core::mem::size_of::<GpaRangeHeader>();
        if !range_buflen.is_multiple_of(8) || usize::from(range_buflen) < min {
            return Err(GpadlError::BadRangeBufferLength { range_buflen });
        }
        let range_count = header.rangecount.get();
        if range_count == 0 {
            return Err(GpadlError::NoRanges);
        }
        let total_words = usize::from(range_buflen) / 8;
        let mut assembler = GpadlAssembler {
            child_relid: header.child_relid.get(),
            gpadl: header.gpadl.get(),
            range_count,
            total_words,
            words: Vec::with_capacity(total_words),
            next_msgnumber: 1,
        };
        assembler.append(range_words)?;
        Ok(assembler)
    }

    /// Starts from a parsed message, which must be a GPADL_HEADER.
    pub fn from_message(message: &Message<'_>) -> Result<GpadlAssembler, GpadlError> {
        match message {
            Message::GpadlHeader {
                header,
                range_words,
            } => GpadlAssembler::new(header, range_words),
            _ => Err(GpadlError::UnexpectedMessage),
        }
    }

    /// The GPADL handle being assembled (bodies must carry it).
    pub fn gpadl(&self) -> u32 {
        self.gpadl
    }

    /// The channel from the header.
    pub fn child_relid(&self) -> u32 {
        self.child_relid
    }

    /// Whether all `range_buflen` bytes have arrived.
    pub fn is_complete(&self) -> bool {
        self.words.len() == self.total_words
    }

    /// Adds one parsed GPADL_BODY (fixed part and range words); returns whether the description is now complete.
    pub fn add_body(&mut self, body: &GpadlBody, range_words: &[U64]) -> Result<bool, GpadlError> {
        let found = body.gpadl.get();
        if found != self.gpadl {
            return Err(GpadlError::HandleMismatch {
                expected: self.gpadl,
                found,
            });
        }
        let number = body.msgnumber.get();
        if number != self.next_msgnumber && number != 0 {
            return Err(GpadlError::MessageNumber {
                expected: self.next_msgnumber,
                found: number,
            });
        }
        self.append(range_words)?;
        self.next_msgnumber = self.next_msgnumber.wrapping_add(1);
        Ok(self.is_complete())
    }

    /// Adds a parsed message, which must be a GPADL_BODY; returns whether the description is now complete.
    pub fn add_message(&mut self, message: &Message<'_>) -> Result<bool, GpadlError> {
        match message {
            Message::GpadlBody { body, range_words } => self.add_body(body, range_words),
            _ => Err(GpadlError::UnexpectedMessage),
        }
    }

    fn append(&mut self, range_words: &[U64]) -> Result<(), GpadlError> {
        let expected_words = self.total_words - self.words.len();
        if range_words.len() > expected_words {
            return Err(GpadlError::ExcessData {
                expected_words,
                received_words: range_words.len(),
            });
        }
        self.words.extend(range_words.iter().map(|word| word.get()));
        Ok(())
    }

    /// Checks the complete range buffer and returns the GPADL.
    pub fn finish(self) -> Result<AssembledGpadl, GpadlError> {
        if !self.is_complete() {
            return Err(GpadlError::Incomplete {
                missing_words: self.total_words - self.words.len(),
            });
        }
        let mut ranges = Vec::with_capacity(usize::from(self.range_count).min(self.words.len()));
        let mut rest = self.words.as_slice();
        for _ in 0..self.range_count {
            let Some((&header_word, after)) = rest.split_first() else {
                // Ran out of words before `rangecount` ranges: the range buffer is too short for them.
                return Err(GpadlError::PageCountMismatch {
                    expected: 1,
                    actual: 0,
                });
            };
            let range_header = GpaRangeHeader::from_word(header_word);
            let byte_count = range_header.byte_count.get();
            let byte_offset = range_header.byte_offset.get();
            if u64::from(byte_offset) >= GPADL_PAGE_SIZE {
                return Err(GpadlError::ByteOffsetTooLarge { byte_offset });
            }
            if byte_count == 0 {
                return Err(GpadlError::ByteCountZero);
            }
            let pages = pages_spanned(byte_offset, byte_count);
            let available = after.len() as u64;
            let Some(pfns) = usize::try_from(pages)
                .ok()
                .and_then(|pages| after.get(..pages))
            else {
                return Err(GpadlError::PageCountMismatch {
                    expected: pages,
                    actual: available,
                });
            };
            ranges.push(GpadlRange {
                byte_offset,
                byte_count,
                pfns: pfns.to_vec(),
            });
            rest = after.get(pfns.len()..).unwrap_or(&[]);
        }
        if !rest.is_empty() {
            return Err(GpadlError::TrailingWords {
                extra_words: rest.len(),
            });
        }
        Ok(AssembledGpadl {
            child_relid: self.child_relid,
            gpadl: self.gpadl,
            ranges,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MAX_MESSAGE_SIZE;
    use crate::protocol::messages::MessageType;
    use crate::protocol::parse::parse;
    use alloc::vec;
    use proptest::prelude::*;
    use zerocopy::IntoBytes;

    fn pfn_list(count: usize) -> Vec<u64> {
        // Distinct, non-contiguous, with high bits set to catch truncation.
        (0..count as u64)
            .map(|i| 0x00ab_0000_0000 + i * 3 + (i % 7) * 0x1_0000)
            .collect()
    }

    /// Builds, checks every message, and reassembles through `parse` + `GpadlAssembler`.
    fn build_and_reassemble(messages: GpadlMessages<'_>) -> (usize, AssembledGpadl) {
        let expected_count = messages.len();
        let buffers: Vec<MessageBuffer> = messages.collect();
        assert_eq!(buffers.len(), expected_count);
        let mut assembler = None::<GpadlAssembler>;
        for (index, buffer) in buffers.iter().enumerate() {
            assert!(
                buffer.len() <= MAX_MESSAGE_SIZE,
                "message {index} is {} bytes",
                buffer.len()
            );
            let message = parse(buffer.as_bytes()).expect("own message parses");
            if index == 0 {
                assert_eq!(message.message_type(), MessageType::GPADL_HEADER);
                assembler = Some(GpadlAssembler::from_message(&message).unwrap());
            } else {
                assert_eq!(message.message_type(), MessageType::GPADL_BODY);
                let Message::GpadlBody { body, .. } = message else {
                    unreachable!()
                };
                assert_eq!(body.msgnumber.get(), index as u32);
                let complete = assembler.as_mut().unwrap().add_message(&message).unwrap();
                assert_eq!(complete, index == buffers.len() - 1);
            }
        }
        let assembler = assembler.unwrap();
        assert!(assembler.is_complete());
        (buffers.len(), assembler.finish().unwrap())
    }

    #[test]
    fn single_range_page_counts() {
        // (pages, messages): header holds 26 PFNs, each body 28.
        for (pages, expected_messages) in [(1, 1), (26, 1), (27, 2), (54, 2), (55, 3), (1000, 36)] {
            let pfns = pfn_list(pages);
            let messages = GpadlMessages::for_pages(7, 0xe1e10 + pages as u32, &pfns).unwrap();
            assert_eq!(usize::from(messages.range_buflen()), 8 + 8 * pages);
            assert_eq!(messages.range_count(), 1);
            let (count, gpadl) = build_and_reassemble(messages);
            assert_eq!(count, expected_messages, "{pages} pages");
            assert_eq!(gpadl.child_relid, 7);
            assert_eq!(gpadl.gpadl, 0xe1e10 + pages as u32);
            assert_eq!(gpadl.ranges.len(), 1);
            assert_eq!(gpadl.ranges[0].byte_offset, 0);
            assert_eq!(gpadl.ranges[0].byte_count as usize, pages * 4096);
            // Every PFN exactly once, in order.
            assert_eq!(gpadl.pfns().collect::<Vec<_>>(), pfns);
        }
    }

    #[test]
    fn header_and_body_wire_bytes() {
        let pfns = pfn_list(27);
        let buffers: Vec<_> = GpadlMessages::new(3, 0x10, 0x80, 27 * 4096 - 0x100, &pfns)
            .unwrap()
            .collect();
        assert_eq!(buffers.len(), 2);
        let header = buffers[0].as_bytes();
        assert_eq!(header.len(), 20 + 8 + 26 * 8);
        assert_eq!(&header[0..4], &[8, 0, 0, 0]);
        assert_eq!(&header[8..12], &[3, 0, 0, 0]);
        assert_eq!(&header[12..16], &[0x10, 0, 0, 0]);
        assert_eq!(&header[16..18], &(8u16 + 8 * 27).to_le_bytes());
        assert_eq!(&header[18..20], &[1, 0]);
        assert_eq!(&header[20..24], &(27u32 * 4096 - 0x100).to_le_bytes());
        assert_eq!(&header[24..28], &[0x80, 0, 0, 0]);
        assert_eq!(&header[28..36], &pfns[0].to_le_bytes());
        let body = buffers[1].as_bytes();
        assert_eq!(body.len(), 16 + 8);
        assert_eq!(&body[0..4], &[9, 0, 0, 0]);
        assert_eq!(&body[8..12], &[1, 0, 0, 0]);
        assert_eq!(&body[12..16], &[0x10, 0, 0, 0]);
        assert_eq!(&body[16..24], &pfns[26].to_le_bytes());
        // A full body message is exactly 240 bytes.
        let pfns = pfn_list(26 + 28);
        let buffers: Vec<_> = GpadlMessages::for_pages(1, 1, &pfns).unwrap().collect();
        assert_eq!(buffers[1].len(), 240);
    }

    #[test]
    fn multi_range() {
        let a = pfn_list(30);
        let b = [0x5555u64];
        let c = pfn_list(3);
        let ranges = [
            PfnRange::whole_pages(&a).unwrap(),
            PfnRange::new(0x10, 0x20, &b).unwrap(),
            PfnRange::new(0xfff, 2 * 4096, &c).unwrap(),
        ];
        let messages = GpadlMessages::multi_range(9, 77, &ranges).unwrap();
        assert_eq!(usize::from(messages.range_buflen()), 8 * (31 + 2 + 4));
        assert_eq!(messages.range_count(), 3);
        let (count, gpadl) = build_and_reassemble(messages);
        assert_eq!(count, 2);
        assert_eq!(gpadl.ranges.len(), 3);
        assert_eq!(gpadl.ranges[0].pfns, a);
        assert_eq!(
            gpadl.ranges[1],
            GpadlRange {
                byte_offset: 0x10,
                byte_count: 0x20,
                pfns: vec![0x5555]
            }
        );
        assert_eq!(gpadl.ranges[2].byte_offset, 0xfff);
        assert_eq!(gpadl.ranges[2].pfns, c);
        assert_eq!(
            GpadlMessages::multi_range(9, 77, &[]).unwrap_err(),
            GpadlError::NoRanges
        );
    }

    #[test]
    fn builder_rejects_bad_ranges() {
        let pfns = pfn_list(3);
        assert_eq!(
            GpadlMessages::for_pages(1, 1, &[]).unwrap_err(),
            GpadlError::EmptyRange
        );
        assert_eq!(
            GpadlMessages::new(1, 1, 4096, 1, &pfns[..1]).unwrap_err(),
            GpadlError::ByteOffsetTooLarge { byte_offset: 4096 }
        );
        assert_eq!(
            GpadlMessages::new(1, 1, 0, 0, &pfns[..1]).unwrap_err(),
            GpadlError::ByteCountZero
        );
        assert_eq!(
            GpadlMessages::new(1, 1, 1, 4096, &pfns[..1]).unwrap_err(),
            GpadlError::PageCountMismatch {
                expected: 2,
                actual: 1
            }
        );
        assert_eq!(
            GpadlMessages::new(1, 1, 0, 4096, &pfns).unwrap_err(),
            GpadlError::PageCountMismatch {
                expected: 1,
                actual: 3
            }
        );
        // 8190 pages is the most one range can describe (range_buflen 65528); 8191 overflows the u16.
        let many = pfn_list(8191);
        assert!(GpadlMessages::for_pages(1, 1, &many[..8190]).is_ok());
        assert_eq!(
            GpadlMessages::for_pages(1, 1, &many).unwrap_err(),
            GpadlError::TooLarge {
                range_buflen: 65536
            }
        );
    }

    /// Raw bytes of a GPADL_HEADER with the given fields and range words.
    fn header_bytes(range_buflen: u16, rangecount: u16, words: &[u64]) -> Vec<u8> {
        let mut bytes = GpadlHeader::new(1, 42, range_buflen, rangecount)
            .as_bytes()
            .to_vec();
        for word in words {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    fn body_bytes(msgnumber: u32, gpadl: u32, words: &[u64]) -> Vec<u8> {
        let mut bytes = GpadlBody::new(msgnumber, gpadl).as_bytes().to_vec();
        for word in words {
            bytes.extend_from_slice(&word.to_le_bytes());
        }
        bytes
    }

    fn add(assembler: &mut GpadlAssembler, bytes: &[u8]) -> Result<bool, GpadlError> {
        assembler.add_message(&parse(bytes).unwrap())
    }

    fn start(bytes: &[u8]) -> Result<GpadlAssembler, GpadlError> {
        GpadlAssembler::from_message(&parse(bytes).unwrap())
    }

    const ONE_PAGE: u64 = 4096; // byte_count 4096, byte_offset 0

    #[test]
    fn assembler_rejects_bad_headers() {
        assert_eq!(
            start(&header_bytes(8, 1, &[ONE_PAGE])).unwrap_err(),
            GpadlError::BadRangeBufferLength { range_buflen: 8 }
        );
        assert_eq!(
            start(&header_bytes(17, 1, &[ONE_PAGE])).unwrap_err(),
            GpadlError::BadRangeBufferLength { range_buflen: 17 }
        );
        assert_eq!(
            start(&header_bytes(16, 0, &[ONE_PAGE, 1])).unwrap_err(),
            GpadlError::NoRanges
        );
        assert_eq!(
            start(&header_bytes(16, 1, &[ONE_PAGE, 1, 2])).unwrap_err(),
            GpadlError::ExcessData {
                expected_words: 2,
                received_words: 3
            }
        );
        let body = body_bytes(1, 42, &[]);
        let not_header = parse(&body).unwrap();
        assert_eq!(
            GpadlAssembler::from_message(&not_header).unwrap_err(),
            GpadlError::UnexpectedMessage
        );
    }

    #[test]
    fn assembler_rejects_bad_bodies() {
        // Two pages announced, one in the header.
        let header = header_bytes(24, 1, &[2 * ONE_PAGE, 0x100]);
        let mut assembler = start(&header).unwrap();
        assert!(!assembler.is_complete());
        assert_eq!(assembler.gpadl(), 42);
        assert_eq!(assembler.child_relid(), 1);
        assert_eq!(
            add(&mut assembler, &body_bytes(1, 43, &[0x101])).unwrap_err(),
            GpadlError::HandleMismatch {
                expected: 42,
                found: 43
            }
        );
        assert_eq!(
            add(&mut assembler, &body_bytes(2, 42, &[0x101])).unwrap_err(),
            GpadlError::MessageNumber {
                expected: 1,
                found: 2
            }
        );
        assert_eq!(
            add(&mut assembler, &body_bytes(1, 42, &[0x101, 0x102])).unwrap_err(),
            GpadlError::ExcessData {
                expected_words: 1,
                received_words: 2
            }
        );
        assert_eq!(
            assembler.clone().finish().unwrap_err(),
            GpadlError::Incomplete { missing_words: 1 }
        );
        let header_again = parse(&header).unwrap();
        assert_eq!(
            assembler.add_message(&header_again).unwrap_err(),
            GpadlError::UnexpectedMessage
        );
        // msgnumber 0 (unset by some senders) is accepted.
        assert_eq!(add(&mut assembler, &body_bytes(0, 42, &[0x101])), Ok(true));
        let gpadl = assembler.clone().finish().unwrap();
        assert_eq!(gpadl.pfns().collect::<Vec<_>>(), [0x100, 0x101]);
        // Nothing more fits once complete.
        assert_eq!(
            add(&mut assembler, &body_bytes(2, 42, &[0x102])).unwrap_err(),
            GpadlError::ExcessData {
                expected_words: 0,
                received_words: 1
            }
        );
    }

    #[test]
    fn assembler_rejects_inconsistent_ranges() {
        let finish = |buflen: u16, count: u16, words: &[u64]| {
            start(&header_bytes(buflen, count, words))?.finish()
        };
        // byte_count says two pages, buffer holds one PFN.
        assert_eq!(
            finish(16, 1, &[2 * ONE_PAGE, 7]).unwrap_err(),
            GpadlError::PageCountMismatch {
                expected: 2,
                actual: 1
            }
        );
        // One page described, two PFNs present.
        assert_eq!(
            finish(24, 1, &[ONE_PAGE, 7, 8]).unwrap_err(),
            GpadlError::TrailingWords { extra_words: 1 }
        );
        // Zero byte count; offset beyond the page.
        assert_eq!(
            finish(16, 1, &[0, 7]).unwrap_err(),
            GpadlError::ByteCountZero
        );
        assert_eq!(
            finish(16, 1, &[(4096u64 << 32) | 1, 7]).unwrap_err(),
            GpadlError::ByteOffsetTooLarge { byte_offset: 4096 }
        );
        // Two ranges announced, words for one.
        assert_eq!(
            finish(16, 2, &[ONE_PAGE, 7]).unwrap_err(),
            GpadlError::PageCountMismatch {
                expected: 1,
                actual: 0
            }
        );
        // A huge byte_count cannot make the assembler read past its buffer.
        assert_eq!(
            finish(16, 1, &[u64::from(u32::MAX), 7]).unwrap_err(),
            GpadlError::PageCountMismatch {
                expected: 1_048_576,
                actual: 1
            }
        );
        // Offset + count crossing into a second page needs two PFNs.
        let ok = finish(24, 1, &[(0x800u64 << 32) | 0x1000, 7, 8]).unwrap();
        assert_eq!(ok.ranges[0].byte_offset, 0x800);
        assert_eq!(ok.ranges[0].pfns, [7, 8]);
    }

    #[test]
    fn range_header_word_round_trip() {
        let header = GpaRangeHeader::from_word((0x123u64 << 32) | 0x4567);
        assert_eq!(header.byte_count.get(), 0x4567);
        assert_eq!(header.byte_offset.get(), 0x123);
        assert_eq!(header.to_word(), (0x123u64 << 32) | 0x4567);
        assert_eq!(pages_spanned(0xfff, 2), 2);
        assert_eq!(pages_spanned(0, 4096), 1);
        assert_eq!(pages_spanned(0xfff, u32::MAX), 1_048_577);
    }

    proptest! {
        #[test]
        fn any_pfn_list_round_trips(pfns in proptest::collection::vec(any::<u64>(), 1..1200), offset in 0u32..4096) {
            let byte_count = (pfns.len() as u32) * 4096 - offset;
            let messages = GpadlMessages::new(2, 3, offset, byte_count, &pfns).unwrap();
            let (count, gpadl) = build_and_reassemble(messages);
            let extra = (pfns.len() + 1).saturating_sub(GpadlHeader::MAX_RANGE_WORDS);
            prop_assert_eq!(count, 1 + extra.div_ceil(GpadlBody::MAX_PFNS));
            prop_assert_eq!(gpadl.pfns().collect::<Vec<_>>(), pfns);
            prop_assert_eq!(gpadl.ranges[0].byte_offset, offset);
        }

        #[test]
        fn assembler_never_panics(
            header in proptest::collection::vec(any::<u8>(), 0..240),
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..240), 0..6),
        ) {
            // Force the types so the random bytes exercise the assembler rather than the type check.
            let mut header = header;
            if header.len() >= 8 { header[..4].copy_from_slice(&8u32.to_le_bytes()); }
            let Ok(message) = parse(&header) else { return Ok(()) };
            let Ok(mut assembler) = GpadlAssembler::from_message(&message) else { return Ok(()) };
            for mut body in bodies {
                if body.len() >= 8 { body[..4].copy_from_slice(&9u32.to_le_bytes()); }
                if let Ok(message) = parse(&body) {
                    let _ = assembler.add_message(&message);
                }
            }
            if let Ok(gpadl) = assembler.finish() {
                prop_assert!(!gpadl.ranges.is_empty());
                for range in &gpadl.ranges {
                    prop_assert_eq!(range.pfns.len() as u64, pages_spanned(range.byte_offset, range.byte_count));
                }
            }
        }
    }
}
