//! The writing side of a ring (reference `hyperv-vmbus.md` §6): packet encoding, wrap-around, batched publication of
//! `write_index`, the "signal on empty → non-empty" rule and `pending_send_sz`.

use zerocopy::IntoBytes;

use super::memory::{ControlField, RingData, RingMemory};
use super::wire::{
    GpaDirectHeader, GpaRangeHeader, PacketDescriptor, PacketFlags, PacketType, TransferPageHeader, TransferPageRange,
};
use super::{
    MAX_PACKET_LEN, PACKET_TRAILER_SIZE, RING_ALIGNMENT, RingError, checked_data_len, checked_index, round_up8,
    used_bytes, write_wrapped,
};

/// Size of the packet descriptor.
const DESCRIPTOR_LEN: usize = size_of::<PacketDescriptor>();

/// Page size GPA-direct ranges count in (§6).
const GPA_PAGE_SIZE: u64 = 4096;

/// One range of a GPA-direct packet to send (§6): `pfns` must hold exactly
/// `(byte_offset + byte_count).div_ceil(4096)` page numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingGpaRange<'a> {
    /// Bytes in the range; not zero.
    pub byte_count: u32,
    /// Offset of the first byte in the first page; at most 0xFFF.
    pub byte_offset: u32,
    /// Guest page numbers of the pages the range covers.
    pub pfns: &'a [u64],
}

/// What kind of packet to send, with its type-specific header (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutgoingKind<'a> {
    /// Data in the packet itself (type 6).
    InBand,
    /// A completion (type 0xB) of the packet with the same transaction id.
    Completion,
    /// Data in guest pages (type 9), described by one or more ranges.
    GpaDirect(&'a [OutgoingGpaRange<'a>]),
    /// Data in ranges of a transfer page set (type 7).
    TransferPages {
        /// The transfer page set.
        transfer_page_set_id: u16,
        /// Whether the sender keeps ownership of the pages.
        sender_owns: bool,
        /// The ranges.
        ranges: &'a [TransferPageRange],
    },
    /// Any other type, with no type-specific header.
    Other(PacketType),
}

impl OutgoingKind<'_> {
    /// The wire type of this kind.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Self::InBand => PacketType::DATA_IN_BAND,
            Self::Completion => PacketType::COMPLETION,
            Self::GpaDirect(_) => PacketType::DATA_USING_GPA_DIRECT,
            Self::TransferPages { .. } => PacketType::DATA_USING_TRANSFER_PAGES,
            Self::Other(packet_type) => *packet_type,
        }
    }
}

/// A packet to write into the outgoing ring (§6). Borrowed pieces only: writing it allocates nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutgoingPacket<'a> {
    /// Type and type-specific header.
    pub kind: OutgoingKind<'a>,
    /// Packet flags.
    pub flags: PacketFlags,
    /// Transaction id; a completion carries the id of the packet it completes.
    pub transaction_id: u64,
    /// The payload; the ring pads it with zeros to a multiple of 8 bytes.
    pub payload: &'a [u8],
}

impl<'a> OutgoingPacket<'a> {
    /// An in-band data packet (type 6) that requests no completion.
    pub fn in_band(transaction_id: u64, payload: &'a [u8]) -> Self {
        Self { kind: OutgoingKind::InBand, flags: PacketFlags::NONE, transaction_id, payload }
    }

    /// A completion packet (type 0xB) for the packet with `transaction_id`.
    pub fn completion(transaction_id: u64, payload: &'a [u8]) -> Self {
        Self { kind: OutgoingKind::Completion, flags: PacketFlags::NONE, transaction_id, payload }
    }

    /// The same packet, asking the peer for a completion.
    pub fn with_completion_requested(mut self) -> Self {
        self.flags = PacketFlags(self.flags.0 | PacketFlags::COMPLETION_REQUESTED.0);
        self
    }

    /// Header and total lengths of the encoded packet (trailer excluded), after checking the ranges. The caller checks
    /// the total against the ring and [`MAX_PACKET_LEN`].
    #[inline]
    fn encoded_lengths(&self) -> Result<(usize, usize), RingError> {
        let too_large = |needed| RingError::PacketTooLarge { needed };
        let extension = match self.kind {
            OutgoingKind::GpaDirect(ranges) => {
                let mut len = size_of::<GpaDirectHeader>();
                for range in ranges {
                    let end = u64::from(range.byte_offset) + u64::from(range.byte_count);
                    if range.byte_count == 0
                        || range.byte_offset > 0xFFF
                        || range.pfns.len() as u64 != end.div_ceil(GPA_PAGE_SIZE)
                    {
                        return Err(RingError::InvalidOutgoingRange);
                    }
                    len = len
                        .checked_add(size_of::<GpaRangeHeader>() + range.pfns.len() * 8)
                        .ok_or(too_large(usize::MAX))?;
                }
                if u32::try_from(ranges.len()).is_err() {
                    return Err(too_large(len));
                }
                len
            }
            OutgoingKind::TransferPages { ranges, .. } => {
                if u32::try_from(ranges.len()).is_err() {
                    return Err(too_large(usize::MAX));
                }
                size_of::<TransferPageHeader>() + size_of_val(ranges)
            }
            OutgoingKind::InBand | OutgoingKind::Completion | OutgoingKind::Other(_) => 0,
        };
        let header_len = DESCRIPTOR_LEN + extension;
        let packet_len = header_len.checked_add(round_up8(self.payload.len())).ok_or(too_large(usize::MAX))?;
        Ok((header_len, packet_len))
    }
}

/// Result of publishing packets (§6 signalling rule): whether the reader must be signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "the peer must be signalled when `signal_peer` is set"]
pub struct WriteOutcome {
    /// True when the reader had unmasked interrupts and the ring went from empty to non-empty.
    pub signal_peer: bool,
}

/// Answer to [`RingWriter::request_space_signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpaceRequest {
    /// The reader freed enough space meanwhile: write now (and clear the request).
    Available,
    /// `pending_send_sz` is set; the reader signals once enough space is free.
    Armed,
}

/// The writer of a ring: the guest's outgoing ring, or the host side of an incoming one (§6).
///
/// The writer keeps its own copy of `write_index` and never trusts the one in shared memory; the peer's
/// `read_index` is checked every time it is loaded.
pub struct RingWriter<M: RingMemory> {
    memory: M,
    indices: WriterIndices,
}

/// The writer's own state, kept apart from the memory so that a batch can borrow both at once.
struct WriterIndices {
    data_len: u32,
    /// The published write index.
    write_index: u32,
    /// The peer's read index as last loaded and checked.
    read_index: u32,
    /// Longest packet (trailer excluded) that can ever be written: the wire limit, and the packet with its trailer
    /// must be shorter than the data area.
    max_packet_len: u32,
}

impl WriterIndices {
    /// Loads and checks the peer's read index.
    #[inline]
    fn refresh_read_index<M: RingMemory + ?Sized>(&mut self, memory: &M) -> Result<u32, RingError> {
        let value = memory.load_control(ControlField::ReadIndex);
        self.read_index = checked_index(ControlField::ReadIndex, value, self.data_len)?;
        Ok(self.read_index)
    }

    /// Free bytes after `cursor` by the read index last loaded.
    #[inline]
    fn free_after(&self, cursor: u32) -> u32 {
        self.data_len - used_bytes(cursor, self.read_index, self.data_len)
    }

    /// Publishes `cursor` as the new write index and applies the signalling rule.
    #[inline]
    fn publish<M: RingMemory + ?Sized>(&mut self, memory: &M, cursor: u32) -> WriteOutcome {
        if cursor == self.write_index {
            return WriteOutcome { signal_peer: false };
        }
        let previous = self.write_index;
        self.write_index = cursor;
        memory.store_control(ControlField::WriteIndex, cursor);
        // Order the index store before the loads of the reader's mask and index (§6: full barrier).
        memory.full_fence();
        if memory.load_control(ControlField::InterruptMask) != 0 {
            return WriteOutcome { signal_peer: false };
        }
        let read = memory.load_control(ControlField::ReadIndex);
        if let Ok(read) = checked_index(ControlField::ReadIndex, read, self.data_len) {
            self.read_index = read;
        }
        // The ring was empty before this publication exactly when the reader had caught up with the old index.
        WriteOutcome { signal_peer: read == previous }
    }
}

impl<M: RingMemory> RingWriter<M> {
    /// Takes over the writing side of the ring in `memory`, starting at the write index found there.
    pub fn new(memory: M) -> Result<Self, RingError> {
        let data_len = checked_data_len(memory.data().len())?;
        let write_index =
            checked_index(ControlField::WriteIndex, memory.load_control(ControlField::WriteIndex), data_len)?;
        let read_index =
            checked_index(ControlField::ReadIndex, memory.load_control(ControlField::ReadIndex), data_len)?;
        let max_packet_len = MAX_PACKET_LEN.min(data_len - PACKET_TRAILER_SIZE - RING_ALIGNMENT);
        Ok(Self { memory, indices: WriterIndices { data_len, write_index, read_index, max_packet_len } })
    }

    /// The ring memory.
    pub fn memory(&self) -> &M {
        &self.memory
    }

    /// Length of the data area in bytes.
    pub fn data_len(&self) -> u32 {
        self.indices.data_len
    }

    /// Free bytes in the ring now. A packet needing `n` bytes (trailer included) fits when `n` is less than this.
    pub fn free_space(&mut self) -> Result<u32, RingError> {
        self.indices.refresh_read_index(&self.memory)?;
        Ok(self.indices.free_after(self.indices.write_index))
    }

    /// Starts a batch: packets pushed to it are written at once but published together by
    /// [`WriteBatch::commit`].
    #[inline]
    pub fn batch(&mut self) -> WriteBatch<'_, M> {
        let Self { memory, indices } = self;
        let cursor = indices.write_index;
        let free = indices.free_after(cursor);
        WriteBatch { data: memory.data(), memory, indices, cursor, free }
    }

    /// Writes and publishes one packet.
    pub fn write(&mut self, packet: &OutgoingPacket<'_>) -> Result<WriteOutcome, RingError> {
        let mut batch = self.batch();
        batch.push(packet)?;
        Ok(batch.commit())
    }

    /// After a [`RingError::Full`] for a packet needing `needed` bytes, asks the reader to signal once it has freed
    /// enough space, by setting `pending_send_sz` (§6). The value stored is `needed + 8`: the packet fits when free
    /// space exceeds `needed`, and free space is a multiple of 8. Returns whether space became free meanwhile.
    pub fn request_space_signal(&mut self, needed: u32) -> Result<SpaceRequest, RingError> {
        if needed >= self.indices.data_len {
            return Err(RingError::PacketTooLarge { needed: needed as usize });
        }
        self.memory.store_control(ControlField::PendingSendSize, needed + RING_ALIGNMENT);
        // The reader may have freed space between our full check and the store above without seeing the request.
        self.memory.full_fence();
        let free = self.free_space()?;
        Ok(if needed < free { SpaceRequest::Available } else { SpaceRequest::Armed })
    }

    /// Clears `pending_send_sz` once the writer no longer waits for space.
    pub fn clear_space_signal(&mut self) {
        self.memory.store_control(ControlField::PendingSendSize, 0);
    }
}

/// Packets written into the ring but not yet published (§6 batched writes). Dropping the batch without
/// [`commit`](Self::commit) publishes nothing.
#[must_use = "a write batch publishes nothing until it is committed"]
pub struct WriteBatch<'a, M: RingMemory + 'a> {
    memory: &'a M,
    /// The data area, fetched once for the whole batch.
    data: M::Data<'a>,
    indices: &'a mut WriterIndices,
    /// Where the next packet goes.
    cursor: u32,
    /// Free bytes after `cursor`, by the read index last loaded.
    free: u32,
}

impl<M: RingMemory> WriteBatch<'_, M> {
    /// Free bytes after the packets pushed so far, by the read index last loaded.
    pub fn free_space(&self) -> u32 {
        self.free
    }

    /// Makes sure `needed` bytes fit after the cursor, reloading the peer's read index if the cached one says no.
    #[inline(always)]
    fn reserve(&mut self, needed: u32) -> Result<(), RingError> {
        if needed < self.free {
            return Ok(());
        }
        self.reserve_slow(needed)
    }

    #[inline(never)]
    fn reserve_slow(&mut self, needed: u32) -> Result<(), RingError> {
        self.indices.refresh_read_index(self.memory)?;
        self.free = self.indices.free_after(self.cursor);
        if needed < self.free { Ok(()) } else { Err(RingError::Full { needed, free: self.free }) }
    }

    /// Writes a packet after the ones already pushed. On error nothing changes.
    #[inline(always)]
    pub fn push(&mut self, packet: &OutgoingPacket<'_>) -> Result<(), RingError> {
        let data_len = self.indices.data_len;
        let (header_len, packet_len) = packet.encoded_lengths()?;
        if packet_len > self.indices.max_packet_len as usize {
            return Err(RingError::PacketTooLarge { needed: packet_len.saturating_add(PACKET_TRAILER_SIZE as usize) });
        }
        // Below 2^31: the packet fits the data area.
        let needed = packet_len as u32 + PACKET_TRAILER_SIZE;
        self.reserve(needed)?;

        let data = self.data;
        let start = self.cursor;
        let descriptor = PacketDescriptor {
            packet_type: packet.kind.packet_type(),
            // Both fit: `packet_len <= MAX_PACKET_LEN` was checked.
            offset8: (header_len / 8) as u16,
            len8: (packet_len / 8) as u16,
            flags: packet.flags,
            transaction_id: packet.transaction_id,
        };
        // Both are below 2^32: indices and `needed` are below the data length, at most 2^31.
        let end = start + needed;
        if end <= data_len
            && matches!(packet.kind, OutgoingKind::InBand | OutgoingKind::Completion | OutgoingKind::Other(_))
        {
            // No type-specific header and no wrapping: the common case, in one piece.
            data.write_simple_packet(start as usize, descriptor.to_words(), packet.payload, u64::from(start) << 32);
            self.cursor = if end == data_len { 0 } else { end };
        } else {
            let mut at = start;
            encode(packet, &descriptor, start, |bytes| {
                at = write_wrapped(data, data_len, at, bytes);
            });
            self.cursor = at;
        }
        self.free -= needed;
        Ok(())
    }

    /// Publishes every packet pushed, with one store of `write_index`, and says whether to signal the reader.
    #[inline]
    pub fn commit(self) -> WriteOutcome {
        self.indices.publish(self.memory, self.cursor)
    }
}

/// Hands the pieces of an encoded packet to `put` in order: descriptor, type-specific header, payload, trailer. Every
/// piece but the payload is a multiple of 8 bytes; `put` pads the payload.
#[inline(always)]
fn encode(packet: &OutgoingPacket<'_>, descriptor: &PacketDescriptor, start: u32, mut put: impl FnMut(&[u8])) {
    let [first, second] = descriptor.to_words();
    put([first.to_le_bytes(), second.to_le_bytes()].as_flattened());
    match packet.kind {
        OutgoingKind::GpaDirect(ranges) => {
            let header = GpaDirectHeader { reserved: 0, range_count: ranges.len() as u32 };
            put(header.as_bytes());
            for range in ranges {
                let range_header = GpaRangeHeader { byte_count: range.byte_count, byte_offset: range.byte_offset };
                put(range_header.as_bytes());
                put(range.pfns.as_bytes());
            }
        }
        OutgoingKind::TransferPages { transfer_page_set_id, sender_owns, ranges } => {
            let header = TransferPageHeader {
                transfer_page_set_id,
                sender_owns: u8::from(sender_owns),
                reserved: 0,
                range_count: ranges.len() as u32,
            };
            put(header.as_bytes());
            put(ranges.as_bytes());
        }
        OutgoingKind::InBand | OutgoingKind::Completion | OutgoingKind::Other(_) => {}
    }
    put(packet.payload);
    put(&(u64::from(start) << 32).to_le_bytes());
}
