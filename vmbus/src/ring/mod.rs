//! VMBus ring buffers: the byte layout, packet formats and signalling rules of a channel's two rings.
//!
//! Implements reference `hyperv-vmbus.md` §6 (and issue 5 §5). Every channel has two rings in memory shared with the
//! peer: one the guest writes (outgoing) and one it reads (incoming). Each ring is a 4096-byte control page followed
//! by a data area; the control page holds the byte offsets `write_index` and `read_index` into the data area, the
//! reader's `interrupt_mask`, the writer's `pending_send_sz` and the `feature_bits`. Packets are a 16-byte
//! [`PacketDescriptor`], an optional type-specific header (GPA-direct ranges, transfer-page ranges), the payload padded
//! to 8 bytes, and a trailer `u64` holding the packet's start offset in its upper half.
//!
//! The pieces:
//! - [`RingMemory`] is the only way the ring touches memory: atomic loads and stores of the control fields, a full
//!   fence, and (through its [`RingData`]) byte copies in and out of the data area. [`OwnedRingMemory`] is ordinary host memory (tests, benches,
//!   the in-process loopback); [`RawRingMemory`] is a pointer and a length (the kernel's pages shared with the host).
//! - [`RingWriter`] fills the outgoing ring: single packets or a [`WriteBatch`] that publishes `write_index` once.
//! - [`RingReader`] drains the incoming ring: a [`ReadBatch`] walks several packets, lets the caller copy them out, and
//!   publishes `read_index` once. Everything the peer wrote is validated; a lying peer gets a [`RingError`].
//! - Neither side signals anybody: commits return whether the peer must be signalled ([`WriteOutcome`],
//!   [`ReadOutcome`], [`DrainEnd`]) and the channel layer does the signalling.
//!
//! No packet costs a heap allocation: packets are written straight into the ring and read straight out of it.

#[cfg(target_endian = "big")]
compile_error!("VMBus rings are little-endian and the ring code stores integers in native byte order");

mod memory;
mod raw;
mod reader;
mod wire;
mod writer;

#[cfg(test)]
mod tests;

pub use memory::{AtomicRingData, ControlField, OwnedRingMemory, RingData, RingMemory};
pub use raw::RawRingMemory;
pub use reader::{
    DrainEnd, GpaDirectRanges, GpaRange, GpaRangeIter, IncomingPacket, PfnList, ReadBatch, ReadOutcome, RingReader,
    TransferPageRangeIter, TransferPages,
};
pub use wire::{
    FEATURE_PENDING_SEND_SIZE, GpaDirectHeader, GpaRangeHeader, PacketDescriptor, PacketFlags, PacketType,
    RingControlPage, TransferPageHeader, TransferPageRange,
};
pub use writer::{OutgoingGpaRange, OutgoingKind, OutgoingPacket, RingWriter, SpaceRequest, WriteBatch, WriteOutcome};

use core::fmt;

/// Size of the control page at the start of every ring; the data area follows it (§6).
pub const CONTROL_PAGE_SIZE: usize = 4096;

/// Size of the trailer that follows every packet: a `u64` whose upper half is the packet's start offset (§6).
pub const PACKET_TRAILER_SIZE: u32 = 8;

/// Every index, packet length and header length in a ring is a multiple of this many bytes (§6).
pub const RING_ALIGNMENT: u32 = 8;

/// Smallest data area this implementation accepts, in bytes. Real rings are whole pages; the tests use tiny rings to
/// make wrap-around and full rings frequent.
pub const MIN_DATA_LEN: usize = 64;

/// Largest data area this implementation accepts, in bytes: indices stay far from `u32` overflow.
pub const MAX_DATA_LEN: usize = 1 << 31;

/// Largest packet (descriptor, header, padded payload; trailer excluded) that `len8`, a `u16` count of 8-byte units,
/// can describe (§6).
pub const MAX_PACKET_LEN: u32 = u16::MAX as u32 * RING_ALIGNMENT;

/// Why a ring operation failed. Errors caused by the peer (`Invalid*`, `Truncated`) mean the ring can no longer be
/// trusted and the channel should be closed; the ring code itself never panics or reads outside the data area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// The memory's data area is not a multiple of 8 bytes between [`MIN_DATA_LEN`] and [`MAX_DATA_LEN`].
    InvalidDataLength {
        /// Length of the data area in bytes.
        len: usize,
    },
    /// The raw ring memory's base address is not 8-byte aligned.
    MisalignedMemory,
    /// An index in the control page lies outside the data area or is not a multiple of 8.
    InvalidIndex {
        /// Which control field held the value.
        field: ControlField,
        /// The value found there.
        value: u32,
    },
    /// The bytes between `read_index` and `write_index` are fewer than a packet needs.
    Truncated {
        /// Bytes the packet (or the smallest packet) needs, trailer included.
        needed: u32,
        /// Bytes the writer has published.
        available: u32,
    },
    /// A packet descriptor's `offset8`/`len8` are inconsistent with each other or with the packet type.
    InvalidDescriptor {
        /// The descriptor's header length in 8-byte units.
        offset8: u16,
        /// The descriptor's total length in 8-byte units.
        len8: u16,
    },
    /// A GPA-direct header disagrees with the packet's header length or breaks a range rule (§6).
    InvalidGpaDirect,
    /// A transfer-page header disagrees with the packet's header length (§6).
    InvalidTransferPages,
    /// The packet is not of the type the caller asked to parse it as.
    WrongPacketType {
        /// The type the packet has.
        actual: PacketType,
    },
    /// A read asked for bytes outside the packet's payload or header.
    OutOfPacket,
    /// The caller's buffer cannot hold the bytes asked for.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes the buffer holds.
        actual: usize,
    },
    /// The outgoing ring has no room for the packet now; see [`RingWriter::request_space_signal`].
    Full {
        /// Bytes the packet needs, trailer included.
        needed: u32,
        /// Bytes free in the ring (the packet fits only when `free > needed`).
        free: u32,
    },
    /// The packet can never be written: it exceeds [`MAX_PACKET_LEN`] or the ring's data area.
    PacketTooLarge {
        /// Bytes the packet needs, trailer included.
        needed: usize,
    },
    /// An outgoing GPA-direct range breaks a rule of §6 (zero byte count, offset beyond a page, wrong PFN count).
    InvalidOutgoingRange,
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::InvalidDataLength { len } => {
                write!(f, "ring data area of {len} bytes is not usable")
            }
            Self::MisalignedMemory => write!(f, "ring memory is not 8-byte aligned"),
            Self::InvalidIndex { field, value } => {
                write!(f, "ring {field:?} {value:#x} is out of range or misaligned")
            }
            Self::Truncated { needed, available } => {
                write!(f, "ring holds {available} bytes but the packet needs {needed}")
            }
            Self::InvalidDescriptor { offset8, len8 } => {
                write!(f, "invalid packet descriptor (offset8 {offset8}, len8 {len8})")
            }
            Self::InvalidGpaDirect => write!(f, "invalid GPA-direct packet header"),
            Self::InvalidTransferPages => write!(f, "invalid transfer-page packet header"),
            Self::WrongPacketType { actual } => write!(f, "unexpected packet type {:#x}", actual.0),
            Self::OutOfPacket => write!(f, "read outside the packet"),
            Self::BufferTooSmall { needed, actual } => {
                write!(f, "buffer of {actual} bytes, {needed} needed")
            }
            Self::Full { needed, free } => {
                write!(f, "ring full: {needed} bytes needed, {free} free")
            }
            Self::PacketTooLarge { needed } => write!(f, "packet of {needed} bytes can never fit"),
            Self::InvalidOutgoingRange => write!(f, "invalid outgoing GPA-direct range"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for RingError {}

/// Checks a data area length and returns it as `u32`.
fn checked_data_len(len: usize) -> Result<u32, RingError> {
    if (MIN_DATA_LEN..=MAX_DATA_LEN).contains(&len) && len.is_multiple_of(RING_ALIGNMENT as usize) {
        Ok(len as u32)
    } else {
        Err(RingError::InvalidDataLength { len })
    }
}

/// Checks an index read from the control page: inside the data area and 8-byte aligned.
#[inline]
fn checked_index(field: ControlField, value: u32, data_len: u32) -> Result<u32, RingError> {
    if value < data_len && value.is_multiple_of(RING_ALIGNMENT) {
        Ok(value)
    } else {
        Err(RingError::InvalidIndex { field, value })
    }
}

/// Bytes published but not yet consumed, for valid indices `write` and `read`.
#[inline]
fn used_bytes(write: u32, read: u32, data_len: u32) -> u32 {
    if write >= read { write - read } else { data_len - read + write }
}

/// Advances a valid index by `bytes` (less than `data_len`), wrapping at the end of the data area.
#[inline]
fn advance(index: u32, bytes: u32, data_len: u32) -> u32 {
    let next = index + bytes;
    if next >= data_len { next - data_len } else { next }
}

/// The index 8 bytes after the valid index `index`, wrapping at the end of the data area.
#[inline(always)]
fn next_word(index: u32, data_len: u32) -> u32 {
    let next = index + RING_ALIGNMENT;
    if next == data_len { 0 } else { next }
}

/// Rounds `len` up to the ring's 8-byte granule.
#[inline]
fn round_up8(len: usize) -> usize {
    (len + 7) & !7
}

/// Copies `dst.len()` bytes out of the data area starting at `offset`, continuing at the start when the end is
/// reached. `offset` must be below the data length and `dst` no longer than the data length.
#[inline(always)]
fn read_wrapped<D: RingData>(data: D, data_len: u32, offset: u32, dst: &mut [u8]) {
    let room = (data_len - offset) as usize;
    if dst.len() <= room {
        data.read(offset as usize, dst);
    } else {
        let (first, second) = dst.split_at_mut(room);
        data.read(offset as usize, first);
        data.read(0, second);
    }
}

/// Copies `dst.len()` words out of the data area starting at the 8-aligned `offset`, continuing at the start when the
/// end is reached. `offset` must be below the data length and `dst` no longer than the data area.
#[inline(always)]
fn read_wrapped_words<D: RingData>(data: D, data_len: u32, offset: u32, dst: &mut [[u8; 8]]) {
    let room = ((data_len - offset) / RING_ALIGNMENT) as usize;
    if dst.len() <= room {
        data.read_words(offset as usize, dst);
    } else {
        let (first, second) = dst.split_at_mut(room);
        data.read_words(offset as usize, first);
        data.read_words(0, second);
    }
}

/// Copies `src` into the data area at the 8-aligned `offset`, zero-padding to 8 bytes and continuing at the start when
/// the end is reached; returns the index just past the padded bytes. The padded length must be below the data length.
#[inline(always)]
fn write_wrapped<D: RingData>(data: D, data_len: u32, offset: u32, src: &[u8]) -> u32 {
    let room = (data_len - offset) as usize;
    if src.len() <= room {
        data.write(offset as usize, src);
    } else {
        // `room` is a multiple of 8, so the first part is whole words and the padding falls in the second part.
        let (first, second) = src.split_at(room);
        data.write(offset as usize, first);
        data.write(0, second);
    }
    advance(offset, round_up8(src.len()) as u32, data_len)
}

/// Resets a ring's control page for first use: both indices, the interrupt mask and the pending send size to zero,
/// and the feature bit saying this side honours `pending_send_sz` (§6). The guest does this to both rings before it
/// hands the pages to the host.
pub fn initialize_control_page<M: RingMemory + ?Sized>(memory: &M) {
    memory.store_control(ControlField::WriteIndex, 0);
    memory.store_control(ControlField::ReadIndex, 0);
    memory.store_control(ControlField::InterruptMask, 0);
    memory.store_control(ControlField::PendingSendSize, 0);
    memory.store_control(ControlField::FeatureBits, FEATURE_PENDING_SEND_SIZE);
}
