//! KMCL packets: outgoing packets (`VMBPACKET`), incoming packets (`VMBPACKETCOMPLETION`), their flags, external data
//! as PFN lists and the size rule of `VmbPacketInitialize`.
//!
//! Implements `kmcl-api.md` §Client interface rows 18–21, 23, 28, 32–41 (the types; the functions are methods of
//! [`super::Kmcl`]) and the seed page `VmbPacketInitialize`: a packet initialized on caller memory needs at least
//! [`sizeof_packet`] bytes, which is more than the maximum packet size plus the size of a pointer; a smaller buffer
//! is [`NtStatus::INVALID_PARAMETER_3`](super::NtStatus::INVALID_PARAMETER_3).

use super::Kmcl;
use super::channel::ChannelHandle;
use super::status::NtStatus;
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

/// Bytes of bookkeeping every packet object carries besides its pointer-sized context slot and its staging area.
pub const PACKET_HEADER_SIZE: u32 = 8;

/// `VmbChannelSizeofPacket` for a channel whose maximum packet size is `maximum_packet_size`: the staging area (one
/// maximum-size completion), a pointer, and [`PACKET_HEADER_SIZE`]. Always strictly greater than the maximum packet
/// size plus the size of a pointer, as the seed page requires of `ByteCount`.
pub const fn sizeof_packet(maximum_packet_size: u32) -> u32 {
    maximum_packet_size + size_of::<usize>() as u32 + PACKET_HEADER_SIZE
}

/// An outgoing packet object (`VMBPACKET`): from `packet_allocate` (the channel's pool) or `packet_initialize`
/// (caller memory). Names its channel, a slot and the slot's generation; a freed packet's handle is stale.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacketHandle {
    pub(crate) channel: ChannelHandle,
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl PacketHandle {
    /// `VmbPacketGetChannel` without a look-up: the channel the packet was made for (whether that channel still
    /// exists is checked by the functions that take it).
    pub const fn channel(self) -> ChannelHandle {
        self.channel
    }
}

impl fmt::Debug for PacketHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Packet({:?}/{}#{})", self.channel, self.index, self.generation)
    }
}

/// An incoming packet handed to `process_packet` (`VMBPACKETCOMPLETION`), valid until it is completed or failed.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PacketCompletion {
    pub(crate) channel: ChannelHandle,
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl PacketCompletion {
    /// The channel the packet arrived on.
    pub const fn channel(self) -> ChannelHandle {
        self.channel
    }
}

impl fmt::Debug for PacketCompletion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PacketCompletion({:?}/{}#{})", self.channel, self.index, self.generation)
    }
}

/// `VMBUS_CHANNEL_FORMAT_FLAG_*` for `VmbPacketSend` and `VmbChannelSendSynchronousRequest` (row 37).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SendFlags(pub u32);

impl SendFlags {
    /// No flags: the completion routine runs once the packet is in the ring.
    pub const NONE: SendFlags = SendFlags(0);
    /// 0x1: ask the other end for a completion packet; the completion routine runs when it arrives.
    pub const WAIT_FOR_COMPLETION: SendFlags = SendFlags(0x1);
    /// 0x2: on Windows, send the MDL's whole length; accepted and without effect (external data is a PFN list here,
    /// whose byte count is always explicit).
    pub const FORCE_MDL_LENGTH: SendFlags = SendFlags(0x2);
    /// 0x4: on Windows, the buffer is pageable; accepted and without effect (nothing pages in the unikernel).
    pub const PAGED_BUFFER: SendFlags = SendFlags(0x4);
    /// Every flag this layer knows.
    pub const ALL: SendFlags = SendFlags(0x7);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: SendFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Flags passed to `process_packet` (§Callbacks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ProcessPacketFlags(pub u32);

impl ProcessPacketFlags {
    /// No flags.
    pub const NONE: ProcessPacketFlags = ProcessPacketFlags(0);
    /// 0x1: the packet carries external data (a GPA-direct packet); read it with `packet_external_data`.
    pub const EXTERNAL_DATA: ProcessPacketFlags = ProcessPacketFlags(0x1);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: ProcessPacketFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One range of external data: the unikernel's replacement of an MDL (`byte_count` bytes starting `byte_offset` bytes
/// into the first of `pfns`), sent and received as a GPA-direct range (§6).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalRange {
    /// Offset of the first byte in the first page (below 4096).
    pub byte_offset: u32,
    /// Bytes in the range (not zero).
    pub byte_count: u32,
    /// The guest page numbers; exactly `(byte_offset + byte_count).div_ceil(4096)` of them.
    pub pfns: Vec<u64>,
}

impl ExternalRange {
    /// A range covering whole pages: `pfns.len() * 4096` bytes from offset 0 (`VmbPacketSendWithExternalPfns`).
    pub fn whole_pages(pfns: &[u64]) -> ExternalRange {
        ExternalRange { byte_offset: 0, byte_count: (pfns.len() as u32).saturating_mul(4096), pfns: pfns.to_vec() }
    }

    /// Whether the range obeys the GPA-direct rules: non-empty, offset within the page, the right PFN count.
    pub fn is_well_formed(&self) -> bool {
        let end = u64::from(self.byte_offset) + u64::from(self.byte_count);
        self.byte_count != 0 && self.byte_offset < 4096 && self.pfns.len() as u64 == end.div_ceil(4096)
    }
}

/// A packet completion routine (`EvtPacketCompletion`, and `PacketSetCompletionRoutineEx`: the closure carries any
/// extra context). Called with the packet, the status ([`NtStatus::SUCCESS`], or [`NtStatus::CANCELLED`] when the
/// channel closed first, or [`NtStatus::BUFFER_OVERFLOW`] when the peer's completion was larger than the maximum
/// packet size and was cut) and the peer's completion payload (empty without `WAIT_FOR_COMPLETION`).
pub type CompletionRoutine = Box<dyn FnMut(&mut dyn Kmcl, PacketHandle, NtStatus, &[u8]) + Send>;

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn sizeof_packet_is_greater_than_the_maximum_packet_size_plus_a_pointer() {
        for size in [1, 8, 4096, 200_000] {
            assert!(sizeof_packet(size) > size + size_of::<*const u8>() as u32);
        }
        assert_eq!(sizeof_packet(4096), 4096 + 8 + 8);
    }

    #[test]
    fn external_ranges_follow_the_gpa_direct_rules() {
        assert!(ExternalRange::whole_pages(&[1, 2]).is_well_formed());
        assert_eq!(ExternalRange::whole_pages(&[1, 2]).byte_count, 8192);
        assert!(ExternalRange { byte_offset: 4000, byte_count: 200, pfns: vec![1, 2] }.is_well_formed());
        assert!(!ExternalRange { byte_offset: 4000, byte_count: 200, pfns: vec![1] }.is_well_formed());
        assert!(!ExternalRange { byte_offset: 4096, byte_count: 1, pfns: vec![1, 2] }.is_well_formed());
        assert!(!ExternalRange { byte_offset: 0, byte_count: 0, pfns: vec![] }.is_well_formed());
        assert!(!ExternalRange::whole_pages(&[]).is_well_formed());
    }

    #[test]
    fn flags_values() {
        assert_eq!(SendFlags::WAIT_FOR_COMPLETION.0, 1);
        assert_eq!(SendFlags::FORCE_MDL_LENGTH.0, 2);
        assert_eq!(SendFlags::PAGED_BUFFER.0, 4);
        assert_eq!(ProcessPacketFlags::EXTERNAL_DATA.0, 1);
        assert!(SendFlags(3).contains(SendFlags::WAIT_FOR_COMPLETION));
    }
}
