//! On-wire structures of a VMBus ring (reference `hyperv-vmbus.md` §6): the control page, the packet descriptor, and
//! the headers of GPA-direct and transfer-page packets. All fields are little-endian; the crate refuses to build
//! big-endian, so native integers are the wire integers.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Bit 0 of `feature_bits`: the side that set it honours `pending_send_sz` (§6).
pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;

/// The control page at the start of every ring (§6): 4096 bytes, the data area follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RingControlPage {
    /// Byte offset in the data area where the writer puts the next packet; written only by the writer.
    pub write_index: u32,
    /// Byte offset in the data area of the next unread packet; written only by the reader.
    pub read_index: u32,
    /// Non-zero while the reader does not want to be signalled (it is draining the ring); written by the reader.
    pub interrupt_mask: u32,
    /// Free bytes the blocked writer waits for, or 0; written by the writer, honoured by the reader.
    pub pending_send_size: u32,
    /// Reserved, zero.
    pub reserved: [u32; 12],
    /// Feature bits; bit 0 is [`FEATURE_PENDING_SEND_SIZE`].
    pub feature_bits: u32,
    /// Reserved up to the end of the page.
    pub reserved_tail: [u8; 4096 - 68],
}

/// Type of a ring packet (§6): an open set, so any value the peer sends can be represented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(transparent)]
pub struct PacketType(pub u16);

impl PacketType {
    /// Synchronisation packet (1).
    pub const SYNCH: Self = Self(1);
    /// Adds a transfer page set (2).
    pub const ADD_TRANSFER_PAGE_SET: Self = Self(2);
    /// Removes a transfer page set (3).
    pub const REMOVE_TRANSFER_PAGE_SET: Self = Self(3);
    /// Establishes a GPADL (4).
    pub const ESTABLISH_GPADL: Self = Self(4);
    /// Tears a GPADL down (5).
    pub const TEARDOWN_GPADL: Self = Self(5);
    /// Data carried in the packet itself (6).
    pub const DATA_IN_BAND: Self = Self(6);
    /// Data in ranges of a transfer page set (7).
    pub const DATA_USING_TRANSFER_PAGES: Self = Self(7);
    /// Data in a GPADL (8).
    pub const DATA_USING_GPADL: Self = Self(8);
    /// Data in guest pages named by PFN ranges (9).
    pub const DATA_USING_GPA_DIRECT: Self = Self(9);
    /// Cancels a request (0xA).
    pub const CANCEL_REQUEST: Self = Self(0xA);
    /// Completion of an earlier packet, matched by transaction id (0xB).
    pub const COMPLETION: Self = Self(0xB);
    /// Data split over additional packets (0xC).
    pub const DATA_USING_ADDITIONAL_PACKETS: Self = Self(0xC);
    /// Continuation of a split packet (0xD).
    pub const ADDITIONAL_DATA: Self = Self(0xD);
}

/// Packet flags (§6): an open set of bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(transparent)]
pub struct PacketFlags(pub u16);

impl PacketFlags {
    /// No flags.
    pub const NONE: Self = Self(0);
    /// The sender wants a completion packet with the same transaction id (bit 0).
    pub const COMPLETION_REQUESTED: Self = Self(1);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The 16-byte descriptor at the start of every packet (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PacketDescriptor {
    /// What the packet carries.
    pub packet_type: PacketType,
    /// Length of descriptor plus type-specific header, in 8-byte units: the payload starts at `offset8 * 8`.
    pub offset8: u16,
    /// Length of the whole packet without its trailer, in 8-byte units.
    pub len8: u16,
    /// Packet flags.
    pub flags: PacketFlags,
    /// Transaction id, echoed by the completion.
    pub transaction_id: u64,
}

impl PacketDescriptor {
    /// The descriptor as the two little-endian words it occupies in the ring. Computed with shifts rather than
    /// through memory, which keeps the ring's hot path free of narrow-store/wide-load stalls; a test pins it to the
    /// byte layout.
    #[inline(always)]
    pub fn to_words(&self) -> [u64; 2] {
        let first = u64::from(self.packet_type.0)
            | u64::from(self.offset8) << 16
            | u64::from(self.len8) << 32
            | u64::from(self.flags.0) << 48;
        [first, self.transaction_id]
    }

    /// The descriptor held by the two little-endian words of the ring; the inverse of [`Self::to_words`].
    #[inline(always)]
    pub fn from_words([first, second]: [u64; 2]) -> Self {
        Self {
            packet_type: PacketType(first as u16),
            offset8: (first >> 16) as u16,
            len8: (first >> 32) as u16,
            flags: PacketFlags((first >> 48) as u16),
            transaction_id: second,
        }
    }
}

/// The header that follows the descriptor of a GPA-direct packet (type 9, §6); `range_count` ranges follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct GpaDirectHeader {
    /// Reserved, zero.
    pub reserved: u32,
    /// Number of ranges that follow.
    pub range_count: u32,
}

/// The start of one GPA-direct range (§6); `(byte_offset + byte_count).div_ceil(4096)` page numbers (`u64`) follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct GpaRangeHeader {
    /// Bytes in the range; never zero.
    pub byte_count: u32,
    /// Offset of the first byte in the first page; at most 0xFFF.
    pub byte_offset: u32,
}

/// The header that follows the descriptor of a transfer-page packet (type 7, §6); `range_count`
/// [`TransferPageRange`]s follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TransferPageHeader {
    /// Which transfer page set the ranges refer to.
    pub transfer_page_set_id: u16,
    /// Non-zero when the sender keeps ownership of the pages.
    pub sender_owns: u8,
    /// Reserved, zero.
    pub reserved: u8,
    /// Number of ranges that follow.
    pub range_count: u32,
}

/// One range of a transfer page set (§6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct TransferPageRange {
    /// Bytes in the range.
    pub byte_count: u32,
    /// Offset of the range in the transfer page set.
    pub byte_offset: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn control_page_layout() {
        assert_eq!(size_of::<RingControlPage>(), 4096);
        assert_eq!(offset_of!(RingControlPage, write_index), 0);
        assert_eq!(offset_of!(RingControlPage, read_index), 4);
        assert_eq!(offset_of!(RingControlPage, interrupt_mask), 8);
        assert_eq!(offset_of!(RingControlPage, pending_send_size), 12);
        assert_eq!(offset_of!(RingControlPage, reserved), 16);
        assert_eq!(offset_of!(RingControlPage, feature_bits), 64);
        assert_eq!(offset_of!(RingControlPage, reserved_tail), 68);
    }

    #[test]
    fn descriptor_layout() {
        assert_eq!(size_of::<PacketDescriptor>(), 16);
        assert_eq!(offset_of!(PacketDescriptor, packet_type), 0);
        assert_eq!(offset_of!(PacketDescriptor, offset8), 2);
        assert_eq!(offset_of!(PacketDescriptor, len8), 4);
        assert_eq!(offset_of!(PacketDescriptor, flags), 6);
        assert_eq!(offset_of!(PacketDescriptor, transaction_id), 8);
    }

    #[test]
    fn descriptor_bytes_are_little_endian() {
        let descriptor = PacketDescriptor {
            packet_type: PacketType::COMPLETION,
            offset8: 2,
            len8: 0x0103,
            flags: PacketFlags::COMPLETION_REQUESTED,
            transaction_id: 0x1122_3344_5566_7788,
        };
        assert_eq!(descriptor.as_bytes(), &[0x0B, 0, 2, 0, 3, 1, 1, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]);
    }

    #[test]
    fn descriptor_words_match_the_byte_layout() {
        let descriptor = PacketDescriptor {
            packet_type: PacketType(0xA1B2),
            offset8: 0xC3D4,
            len8: 0xE5F6,
            flags: PacketFlags(0x1728),
            transaction_id: 0x0102_0304_0506_0708,
        };
        let words = descriptor.to_words();
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&words[0].to_le_bytes());
        bytes[8..].copy_from_slice(&words[1].to_le_bytes());
        assert_eq!(&bytes, descriptor.as_bytes());
        assert_eq!(PacketDescriptor::from_words(words), descriptor);
        assert_eq!(PacketDescriptor::read_from_bytes(&bytes).unwrap(), descriptor);
    }

    #[test]
    fn gpa_direct_layout() {
        assert_eq!(size_of::<GpaDirectHeader>(), 8);
        assert_eq!(offset_of!(GpaDirectHeader, reserved), 0);
        assert_eq!(offset_of!(GpaDirectHeader, range_count), 4);
        assert_eq!(size_of::<GpaRangeHeader>(), 8);
        assert_eq!(offset_of!(GpaRangeHeader, byte_count), 0);
        assert_eq!(offset_of!(GpaRangeHeader, byte_offset), 4);
    }

    #[test]
    fn transfer_page_layout() {
        assert_eq!(size_of::<TransferPageHeader>(), 8);
        assert_eq!(offset_of!(TransferPageHeader, transfer_page_set_id), 0);
        assert_eq!(offset_of!(TransferPageHeader, sender_owns), 2);
        assert_eq!(offset_of!(TransferPageHeader, reserved), 3);
        assert_eq!(offset_of!(TransferPageHeader, range_count), 4);
        assert_eq!(size_of::<TransferPageRange>(), 8);
        assert_eq!(offset_of!(TransferPageRange, byte_count), 0);
        assert_eq!(offset_of!(TransferPageRange, byte_offset), 4);
    }

    #[test]
    fn packet_type_values() {
        assert_eq!(PacketType::DATA_IN_BAND.0, 6);
        assert_eq!(PacketType::DATA_USING_TRANSFER_PAGES.0, 7);
        assert_eq!(PacketType::DATA_USING_GPA_DIRECT.0, 9);
        assert_eq!(PacketType::COMPLETION.0, 0xB);
        assert_eq!(PacketType::ADDITIONAL_DATA.0, 0xD);
        // Open: an unknown value survives a round trip.
        assert_eq!(PacketType::read_from_bytes(&[0x34, 0x12]).unwrap(), PacketType(0x1234));
    }
}
