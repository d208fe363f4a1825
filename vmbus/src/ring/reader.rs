//! The reading side of a ring (reference `hyperv-vmbus.md` §6): validation of everything the peer wrote, batched
//! reads with one publication of `read_index`, the `pending_send_sz` rule and the interrupt mask while draining.

use zerocopy::FromBytes;

use super::memory::{ControlField, RingData, RingMemory};
use super::wire::{
    FEATURE_PENDING_SEND_SIZE, GpaDirectHeader, GpaRangeHeader, PacketDescriptor, PacketFlags, PacketType,
    TransferPageHeader, TransferPageRange,
};
use super::{
    PACKET_TRAILER_SIZE, RING_ALIGNMENT, RingError, advance, checked_data_len, checked_index, next_word, read_wrapped,
    read_wrapped_words, used_bytes,
};

/// Size of the packet descriptor.
const DESCRIPTOR_LEN: u32 = size_of::<PacketDescriptor>() as u32;

/// Smallest header of a GPA-direct or transfer-page packet: descriptor plus the 8-byte type header.
const EXTENDED_HEADER_MIN: u32 = DESCRIPTOR_LEN + 8;

/// Page size GPA-direct ranges count in (§6).
const GPA_PAGE_SIZE: u64 = 4096;

/// Result of publishing a read (§6 `pending_send_sz` rule): whether the writer must be signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "the peer must be signalled when `signal_peer` is set"]
pub struct ReadOutcome {
    /// True when the writer asked for space and this read made free space cross its `pending_send_sz`.
    pub signal_peer: bool,
}

/// What [`RingReader::end_drain`] found after unmasking interrupts (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "data that arrived while draining is not signalled again"]
pub enum DrainEnd {
    /// The ring is empty; the writer will signal the next packet.
    Empty,
    /// Packets arrived while interrupts were masked: drain again.
    MoreData,
}

/// The reader of a ring: the guest's incoming ring, or the host side of an outgoing one (§6).
///
/// The reader keeps its own copy of `read_index` and never trusts the one in shared memory; the peer's
/// `write_index` and every descriptor are checked before use.
pub struct RingReader<M: RingMemory> {
    memory: M,
    data_len: u32,
    /// The published read index.
    read_index: u32,
    /// The peer's write index as last loaded and checked.
    write_index: u32,
}

impl<M: RingMemory> RingReader<M> {
    /// Takes over the reading side of the ring in `memory`, starting at the read index found there.
    pub fn new(memory: M) -> Result<Self, RingError> {
        let data_len = checked_data_len(memory.data().len())?;
        let read_index =
            checked_index(ControlField::ReadIndex, memory.load_control(ControlField::ReadIndex), data_len)?;
        let write_index =
            checked_index(ControlField::WriteIndex, memory.load_control(ControlField::WriteIndex), data_len)?;
        Ok(Self { memory, data_len, read_index, write_index })
    }

    /// The ring memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// Length of the data area in bytes.
    pub fn data_len(&self) -> u32 {
        self.data_len
    }

    /// Loads and checks the peer's write index.
    #[inline]
    fn refresh_write_index(&mut self) -> Result<u32, RingError> {
        let value = self.memory.load_control(ControlField::WriteIndex);
        self.write_index = checked_index(ControlField::WriteIndex, value, self.data_len)?;
        Ok(self.write_index)
    }

    /// Bytes the writer has published and this reader has not consumed.
    pub fn available(&mut self) -> Result<u32, RingError> {
        let write = self.refresh_write_index()?;
        Ok(used_bytes(write, self.read_index, self.data_len))
    }

    /// Starts a batch of reads; [`ReadBatch::commit`] publishes them with one store of `read_index`.
    #[inline]
    pub fn batch(&mut self) -> ReadBatch<'_, M> {
        let cursor = self.read_index;
        let remaining = used_bytes(self.write_index, cursor, self.data_len);
        ReadBatch { reader: self, cursor, remaining }
    }

    /// Sets this reader's `interrupt_mask`: the writer stops signalling while the reader drains the ring (§6).
    pub fn begin_drain(&self) {
        self.memory.store_control(ControlField::InterruptMask, 1);
    }

    /// Clears the `interrupt_mask` after draining, then looks again for packets that arrived while it was set: the
    /// writer did not signal those, so the caller must drain again on [`DrainEnd::MoreData`] (§6).
    pub fn end_drain(&mut self) -> Result<DrainEnd, RingError> {
        self.memory.store_control(ControlField::InterruptMask, 0);
        self.memory.full_fence();
        let write = self.refresh_write_index()?;
        Ok(if write == self.read_index { DrainEnd::Empty } else { DrainEnd::MoreData })
    }
}

/// Packets read from the ring but not yet released to the writer (§6 batched reads).
///
/// Dropping the batch without [`commit`](Self::commit) releases nothing: the next batch sees the same packets.
#[must_use = "a read batch releases nothing until it is committed"]
pub struct ReadBatch<'a, M: RingMemory> {
    reader: &'a mut RingReader<M>,
    /// Start of the next packet.
    cursor: u32,
    /// Bytes published after `cursor`, by the write index last loaded.
    remaining: u32,
}

impl<M: RingMemory> ReadBatch<'_, M> {
    /// The next packet, `None` when the writer has published nothing more, or an error when the ring's contents are
    /// inconsistent (a lying peer; the ring should be abandoned).
    #[inline(always)]
    pub fn next_packet(&mut self) -> Result<Option<IncomingPacket<'_, M>>, RingError> {
        if self.remaining == 0 && self.refresh()? == 0 {
            return Ok(None);
        }
        let reader = &*self.reader;
        let data_len = reader.data_len;
        let available = self.remaining;
        let data = reader.memory.data();
        // Both words lie in the data area whatever the peer wrote; whether they were published is checked below.
        let cursor = self.cursor as usize;
        let [first, second] = if self.cursor + DESCRIPTOR_LEN <= data_len {
            data.load_word_pair(cursor)
        } else {
            [data.load_word(cursor), data.load_word(next_word(self.cursor, data_len) as usize)]
        };
        let header_len = u32::from((first >> 16) as u16) * RING_ALIGNMENT;
        let packet_len = u32::from((first >> 32) as u16) * RING_ALIGNMENT;
        let total = packet_len + PACKET_TRAILER_SIZE;
        if header_len < DESCRIPTOR_LEN || packet_len < header_len || total > available {
            return Err(descriptor_error(first, available));
        }
        let packet_type = PacketType(first as u16);
        if header_len < EXTENDED_HEADER_MIN && has_type_specific_header(packet_type) {
            return Err(descriptor_error(first, available));
        }
        let start = self.cursor;
        let end = start + total;
        let contiguous = end < data_len;
        let payload_at = if contiguous {
            // The packet does not reach the end of the data area: no wrapping.
            self.cursor = end;
            start + header_len
        } else {
            self.cursor = end - data_len;
            advance(start, header_len, data_len)
        };
        self.remaining -= total;
        Ok(Some(IncomingPacket {
            data,
            data_len,
            start,
            payload_at,
            payload_len: packet_len - header_len,
            contiguous,
            descriptor: [first, second],
        }))
    }

    /// Loads the peer's write index again and returns the bytes published after the cursor.
    #[inline(never)]
    fn refresh(&mut self) -> Result<u32, RingError> {
        let reader = &mut *self.reader;
        let write = reader.refresh_write_index()?;
        self.remaining = used_bytes(write, self.cursor, reader.data_len);
        Ok(self.remaining)
    }

    /// Publishes the new read index once for every packet returned, then applies the `pending_send_sz` rule (§6):
    /// if the writer supports it, signal when this read made free space cross from below its pending size to at least
    /// it.
    #[inline]
    pub fn commit(self) -> Result<ReadOutcome, RingError> {
        let reader = self.reader;
        let previous = reader.read_index;
        let current = self.cursor;
        if current == previous {
            return Ok(ReadOutcome { signal_peer: false });
        }
        reader.read_index = current;
        reader.memory.store_control(ControlField::ReadIndex, current);
        if reader.memory.load_control(ControlField::FeatureBits) & FEATURE_PENDING_SEND_SIZE == 0 {
            return Ok(ReadOutcome { signal_peer: false });
        }
        // Order the index store before the load of the writer's pending size.
        reader.memory.full_fence();
        let pending = reader.memory.load_control(ControlField::PendingSendSize) & !(RING_ALIGNMENT - 1);
        if pending == 0 {
            return Ok(ReadOutcome { signal_peer: false });
        }
        let data_len = reader.data_len;
        let write = reader.refresh_write_index()?;
        let free_before = data_len - used_bytes(write, previous, data_len);
        let free_after = data_len - used_bytes(write, current, data_len);
        Ok(ReadOutcome { signal_peer: free_before < pending && free_after >= pending })
    }
}

/// Whether packets of `packet_type` carry a type-specific header (GPA-direct, 9, and transfer-page, 7, packets; §6).
#[inline(always)]
fn has_type_specific_header(packet_type: PacketType) -> bool {
    const { assert!(PacketType::DATA_USING_TRANSFER_PAGES.0 == 7 && PacketType::DATA_USING_GPA_DIRECT.0 == 9) };
    // `type - 7` is 0 or 2 exactly for those two types: one subtraction and one test instead of two comparisons.
    packet_type.0.wrapping_sub(7) & !2 == 0
}

/// The error for a descriptor (first word `first`) that failed the checks of [`ReadBatch::next_packet`].
#[cold]
fn descriptor_error(first: u64, available: u32) -> RingError {
    let descriptor = PacketDescriptor::from_words([first, 0]);
    let header_len = u32::from(descriptor.offset8) * RING_ALIGNMENT;
    let packet_len = u32::from(descriptor.len8) * RING_ALIGNMENT;
    let header_min = match descriptor.packet_type {
        PacketType::DATA_USING_GPA_DIRECT | PacketType::DATA_USING_TRANSFER_PAGES => EXTENDED_HEADER_MIN,
        _ => DESCRIPTOR_LEN,
    };
    if header_len < header_min || packet_len < header_len {
        RingError::InvalidDescriptor { offset8: descriptor.offset8, len8: descriptor.len8 }
    } else {
        RingError::Truncated { needed: packet_len + PACKET_TRAILER_SIZE, available }
    }
}

/// One packet in the incoming ring, its descriptor checked (§6). Its bytes stay in the ring until the batch commits;
/// the accessors copy them out, so a peer that rewrites the packet meanwhile can only change what is copied, never
/// what was checked.
pub struct IncomingPacket<'a, M: RingMemory + 'a> {
    data: M::Data<'a>,
    data_len: u32,
    /// Offset of the descriptor in the data area.
    start: u32,
    /// Offset of the payload in the data area.
    payload_at: u32,
    /// Length of the payload, padding included.
    payload_len: u32,
    /// Whether the packet ends before the end of the data area, so that none of it wraps.
    contiguous: bool,
    /// The checked descriptor, as the two words read from the ring.
    descriptor: [u64; 2],
}

impl<M: RingMemory> IncomingPacket<'_, M> {
    /// The packet's descriptor, as copied out of the ring.
    pub fn descriptor(&self) -> PacketDescriptor {
        PacketDescriptor::from_words(self.descriptor)
    }

    /// The packet type.
    #[inline(always)]
    pub fn packet_type(&self) -> PacketType {
        PacketType(self.descriptor[0] as u16)
    }

    /// The packet flags.
    pub fn flags(&self) -> PacketFlags {
        PacketFlags((self.descriptor[0] >> 48) as u16)
    }

    /// Whether the sender wants a completion.
    pub fn completion_requested(&self) -> bool {
        self.flags().contains(PacketFlags::COMPLETION_REQUESTED)
    }

    /// The transaction id.
    #[inline(always)]
    pub fn transaction_id(&self) -> u64 {
        self.descriptor[1]
    }

    /// Header length (descriptor plus type-specific header) in bytes: where the payload starts.
    #[inline(always)]
    fn header_len(&self) -> usize {
        usize::from((self.descriptor[0] >> 16) as u16) * 8
    }

    /// Length of the payload in bytes, including the sender's padding to 8.
    #[inline(always)]
    pub fn payload_len(&self) -> usize {
        self.payload_len as usize
    }

    /// Length of the type-specific header between the descriptor and the payload.
    pub fn header_extension_len(&self) -> usize {
        self.header_len() - DESCRIPTOR_LEN as usize
    }

    /// Copies `dst.len()` bytes starting `offset` bytes into the packet.
    #[inline(always)]
    fn read_at(&self, offset: usize, dst: &mut [u8]) {
        // `offset` is below the packet length, which is below the data length.
        let at = advance(self.start, offset as u32, self.data_len);
        read_wrapped(self.data, self.data_len, at, dst);
    }

    /// Copies the whole payload into the start of `dst` and returns its length.
    #[inline(always)]
    pub fn read_payload(&self, dst: &mut [u8]) -> Result<usize, RingError> {
        let len = self.payload_len();
        let actual = dst.len();
        let target = dst.get_mut(..len).ok_or(RingError::BufferTooSmall { needed: len, actual })?;
        // The payload starts on a word and its length, padding included, is whole words: nothing is left over.
        let (words, _) = target.as_chunks_mut::<8>();
        if self.contiguous {
            self.data.read_words(self.payload_at as usize, words);
        } else {
            read_wrapped_words(self.data, self.data_len, self.payload_at, words);
        }
        Ok(len)
    }

    /// Copies `dst.len()` payload bytes starting at byte `offset` of the payload.
    pub fn read_payload_at(&self, offset: usize, dst: &mut [u8]) -> Result<(), RingError> {
        let end = offset.checked_add(dst.len()).ok_or(RingError::OutOfPacket)?;
        if end > self.payload_len() {
            return Err(RingError::OutOfPacket);
        }
        self.read_at(self.header_len() + offset, dst);
        Ok(())
    }

    /// Copies the type-specific header into the start of `dst` and returns its length.
    pub fn read_header_extension(&self, dst: &mut [u8]) -> Result<usize, RingError> {
        let len = self.header_extension_len();
        let actual = dst.len();
        let target = dst.get_mut(..len).ok_or(RingError::BufferTooSmall { needed: len, actual })?;
        self.read_at(DESCRIPTOR_LEN as usize, target);
        Ok(len)
    }

    /// Copies the header of a GPA-direct packet (type 9) into `scratch` and checks it against §6: the ranges fit the
    /// header length, each has a non-zero byte count, an offset within the page and the right number of PFNs.
    pub fn gpa_direct<'b>(&self, scratch: &'b mut [u8]) -> Result<GpaDirectRanges<'b>, RingError> {
        self.expect_type(PacketType::DATA_USING_GPA_DIRECT)?;
        let len = self.read_header_extension(scratch)?;
        GpaDirectRanges::parse(&scratch[..len])
    }

    /// Copies the header of a transfer-page packet (type 7) into `scratch` and checks that its ranges fit the header
    /// length (§6).
    pub fn transfer_pages<'b>(&self, scratch: &'b mut [u8]) -> Result<TransferPages<'b>, RingError> {
        self.expect_type(PacketType::DATA_USING_TRANSFER_PAGES)?;
        let len = self.read_header_extension(scratch)?;
        TransferPages::parse(&scratch[..len])
    }

    fn expect_type(&self, expected: PacketType) -> Result<(), RingError> {
        if self.packet_type() == expected {
            Ok(())
        } else {
            Err(RingError::WrongPacketType { actual: self.packet_type() })
        }
    }
}

/// The checked ranges of a GPA-direct packet (§6), parsed from a private copy of its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaDirectRanges<'b> {
    range_count: u32,
    /// The encoded ranges, all checked.
    ranges: &'b [u8],
}

impl<'b> GpaDirectRanges<'b> {
    /// Parses and checks a GPA-direct header (the bytes after the descriptor, up to the payload).
    pub fn parse(header: &'b [u8]) -> Result<Self, RingError> {
        let (direct, ranges) = GpaDirectHeader::read_from_prefix(header).map_err(|_| RingError::InvalidGpaDirect)?;
        let mut rest = ranges;
        // Every range takes at least 16 bytes, so a huge count fails after a few steps.
        for _ in 0..direct.range_count {
            let (_, tail) = split_gpa_range(rest).ok_or(RingError::InvalidGpaDirect)?;
            rest = tail;
        }
        let used = ranges.len() - rest.len();
        Ok(Self { range_count: direct.range_count, ranges: &ranges[..used] })
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.range_count as usize
    }

    /// Whether there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.range_count == 0
    }

    /// The ranges in order.
    pub fn iter(&self) -> GpaRangeIter<'b> {
        GpaRangeIter { rest: self.ranges }
    }
}

/// Splits one checked GPA range off the front of `bytes`.
fn split_gpa_range(bytes: &[u8]) -> Option<(GpaRange<'_>, &[u8])> {
    let (header, after) = GpaRangeHeader::read_from_prefix(bytes).ok()?;
    if header.byte_count == 0 || header.byte_offset > 0xFFF {
        return None;
    }
    let end = u64::from(header.byte_offset) + u64::from(header.byte_count);
    let pfn_bytes = end.div_ceil(GPA_PAGE_SIZE) * 8;
    if pfn_bytes > after.len() as u64 {
        return None;
    }
    let (pfns, tail) = after.split_at(pfn_bytes as usize);
    Some((GpaRange { byte_count: header.byte_count, byte_offset: header.byte_offset, pfns: PfnList(pfns) }, tail))
}

impl<'b> IntoIterator for GpaDirectRanges<'b> {
    type Item = GpaRange<'b>;
    type IntoIter = GpaRangeIter<'b>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Iterator over the checked ranges of a GPA-direct packet.
#[derive(Debug, Clone)]
pub struct GpaRangeIter<'b> {
    rest: &'b [u8],
}

impl<'b> Iterator for GpaRangeIter<'b> {
    type Item = GpaRange<'b>;
    fn next(&mut self) -> Option<GpaRange<'b>> {
        let (range, tail) = split_gpa_range(self.rest)?;
        self.rest = tail;
        Some(range)
    }
}

/// One range of a GPA-direct packet (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaRange<'b> {
    /// Bytes in the range; not zero.
    pub byte_count: u32,
    /// Offset of the first byte in the first page; at most 0xFFF.
    pub byte_offset: u32,
    /// The page numbers; exactly as many as the range covers.
    pub pfns: PfnList<'b>,
}

/// Page numbers of a GPA range, read from the private copy of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfnList<'b>(&'b [u8]);

impl<'b> PfnList<'b> {
    /// Number of page numbers.
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    /// Whether the list is empty (never, for a checked range).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `index`-th page number.
    pub fn get(&self, index: usize) -> Option<u64> {
        let bytes = self.0.get(index * 8..index * 8 + 8)?;
        u64::read_from_bytes(bytes).ok()
    }

    /// The page numbers in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + 'b {
        self.0.as_chunks::<8>().0.iter().map(|chunk| u64::from_le_bytes(*chunk))
    }
}

/// The checked header of a transfer-page packet (§6), parsed from a private copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferPages<'b> {
    /// The transfer page set the ranges refer to.
    pub transfer_page_set_id: u16,
    /// Whether the sender keeps ownership of the pages.
    pub sender_owns: bool,
    /// The encoded ranges, exactly `range_count` of them.
    ranges: &'b [u8],
}

impl<'b> TransferPages<'b> {
    /// Parses and checks a transfer-page header (the bytes after the descriptor, up to the payload).
    pub fn parse(header: &'b [u8]) -> Result<Self, RingError> {
        let (pages, ranges) =
            TransferPageHeader::read_from_prefix(header).map_err(|_| RingError::InvalidTransferPages)?;
        let range_bytes = u64::from(pages.range_count) * size_of::<TransferPageRange>() as u64;
        if range_bytes > ranges.len() as u64 {
            return Err(RingError::InvalidTransferPages);
        }
        Ok(Self {
            transfer_page_set_id: pages.transfer_page_set_id,
            sender_owns: pages.sender_owns != 0,
            ranges: &ranges[..range_bytes as usize],
        })
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.ranges.len() / size_of::<TransferPageRange>()
    }

    /// Whether there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The ranges in order.
    pub fn ranges(&self) -> TransferPageRangeIter<'b> {
        TransferPageRangeIter { rest: self.ranges }
    }
}

/// Iterator over the ranges of a transfer-page packet.
#[derive(Debug, Clone)]
pub struct TransferPageRangeIter<'b> {
    rest: &'b [u8],
}

impl Iterator for TransferPageRangeIter<'_> {
    type Item = TransferPageRange;
    fn next(&mut self) -> Option<TransferPageRange> {
        let (range, tail) = TransferPageRange::read_from_prefix(self.rest).ok()?;
        self.rest = tail;
        Some(range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_gpa_direct_and_transfer_page_packets_have_a_type_specific_header() {
        for value in 0..=u16::MAX {
            let expected = matches!(value, 7 | 9);
            assert_eq!(has_type_specific_header(PacketType(value)), expected, "type {value}");
        }
    }
}
