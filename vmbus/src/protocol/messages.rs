//! Wire structs of the VMBus control messages.
//!
//! Reference: `hyperv-vmbus.md` §5 ("Header", "Types", "Layouts"). Every struct here is the whole message including
//! its 8-byte header, built from little-endian, alignment-1 fields so that its Rust layout is exactly the packed C
//! layout; the tests at the bottom pin every size and field offset to the reference. Checked against Linux
//! `include/linux/hyperv.h`, QEMU `include/hw/hyperv/vmbus-proto.h`, FreeBSD `vmbus_reg.h` and OpenVMM
//! `vmbus_core/src/protocol.rs`; where they disagree the field carries a ⚠ note.

use core::fmt;
use core::mem::size_of;

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::guid::Guid;
use super::version::VmbusVersion;
use super::{MAX_MESSAGE_SIZE, VMBUS_MESSAGE_SINT};

/// The control message type in a message header (§5 "Types").
///
/// Open: any `u32` is representable; [`MessageType::name`] tells the named ones apart.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageType(pub u32);

impl MessageType {
    /// 0: never valid on the wire.
    pub const INVALID: MessageType = MessageType(0);
    /// 1: host → guest, one channel offer ([`OfferChannel`]).
    pub const OFFERCHANNEL: MessageType = MessageType(1);
    /// 2: host → guest, an offer is withdrawn ([`RescindChannelOffer`]).
    pub const RESCIND_CHANNELOFFER: MessageType = MessageType(2);
    /// 3: guest → host, send all offers ([`RequestOffers`]).
    pub const REQUESTOFFERS: MessageType = MessageType(3);
    /// 4: host → guest, the initial offers are all sent ([`AllOffersDelivered`]).
    pub const ALLOFFERS_DELIVERED: MessageType = MessageType(4);
    /// 5: guest → host, open a channel ([`OpenChannel`]).
    pub const OPENCHANNEL: MessageType = MessageType(5);
    /// 6: host → guest, outcome of an open ([`OpenChannelResult`]).
    pub const OPENCHANNEL_RESULT: MessageType = MessageType(6);
    /// 7: guest → host, close a channel ([`CloseChannel`]).
    pub const CLOSECHANNEL: MessageType = MessageType(7);
    /// 8: guest → host, first message of a GPADL description ([`GpadlHeader`]).
    pub const GPADL_HEADER: MessageType = MessageType(8);
    /// 9: guest → host, continuation of a GPADL description ([`GpadlBody`]).
    pub const GPADL_BODY: MessageType = MessageType(9);
    /// 10: host → guest, outcome of a GPADL creation ([`GpadlCreated`]).
    pub const GPADL_CREATED: MessageType = MessageType(10);
    /// 11: guest → host, release a GPADL ([`GpadlTeardown`]).
    pub const GPADL_TEARDOWN: MessageType = MessageType(11);
    /// 12: host → guest, a GPADL is released ([`GpadlTorndown`]).
    pub const GPADL_TORNDOWN: MessageType = MessageType(12);
    /// 13: guest → host, a rescinded relid may be reused ([`RelIdReleased`]).
    pub const RELID_RELEASED: MessageType = MessageType(13);
    /// 14: guest → host, connect and propose a version ([`InitiateContact`]).
    pub const INITIATE_CONTACT: MessageType = MessageType(14);
    /// 15: host → guest, answer to INITIATE_CONTACT ([`VersionResponse`]).
    pub const VERSION_RESPONSE: MessageType = MessageType(15);
    /// 16: guest → host, disconnect ([`Unload`]).
    pub const UNLOAD: MessageType = MessageType(16);
    /// 17: host → guest, disconnect acknowledged ([`UnloadResponse`]).
    pub const UNLOAD_RESPONSE: MessageType = MessageType(17);
    /// 18: reserved-channel message. ⚠ OpenVMM names it OPEN_RESERVED_CHANNEL; Linux leaves 18–20 unnamed.
    pub const OPEN_RESERVED_CHANNEL: MessageType = MessageType(18);
    /// 19: reserved-channel message. ⚠ OpenVMM names it CLOSE_RESERVED_CHANNEL.
    pub const CLOSE_RESERVED_CHANNEL: MessageType = MessageType(19);
    /// 20: reserved-channel message. ⚠ OpenVMM names it CLOSE_RESERVED_RESPONSE.
    pub const CLOSE_RESERVED_RESPONSE: MessageType = MessageType(20);
    /// 21: guest → host, hv_sock connect ([`TlConnectRequest`]).
    pub const TL_CONNECT_REQUEST: MessageType = MessageType(21);
    /// 22: guest → host, retarget a channel's interrupt (≥ 4.1, [`ModifyChannel`]).
    pub const MODIFYCHANNEL: MessageType = MessageType(22);
    /// 23: host → guest, hv_sock connect outcome ([`TlConnectResult`]).
    pub const TL_CONNECT_RESULT: MessageType = MessageType(23);
    /// 24: host → guest, MODIFYCHANNEL acknowledged (≥ 5.3, [`ModifyChannelResponse`]).
    pub const MODIFYCHANNEL_RESPONSE: MessageType = MessageType(24);

    /// The reference's name for a known type (0..=24), `None` for anything else.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "INVALID",
            1 => "OFFERCHANNEL",
            2 => "RESCIND_CHANNELOFFER",
            3 => "REQUESTOFFERS",
            4 => "ALLOFFERS_DELIVERED",
            5 => "OPENCHANNEL",
            6 => "OPENCHANNEL_RESULT",
            7 => "CLOSECHANNEL",
            8 => "GPADL_HEADER",
            9 => "GPADL_BODY",
            10 => "GPADL_CREATED",
            11 => "GPADL_TEARDOWN",
            12 => "GPADL_TORNDOWN",
            13 => "RELID_RELEASED",
            14 => "INITIATE_CONTACT",
            15 => "VERSION_RESPONSE",
            16 => "UNLOAD",
            17 => "UNLOAD_RESPONSE",
            18 => "OPEN_RESERVED_CHANNEL",
            19 => "CLOSE_RESERVED_CHANNEL",
            20 => "CLOSE_RESERVED_RESPONSE",
            21 => "TL_CONNECT_REQUEST",
            22 => "MODIFYCHANNEL",
            23 => "TL_CONNECT_RESULT",
            24 => "MODIFYCHANNEL_RESPONSE",
            _ => return None,
        })
    }
}

impl fmt::Debug for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "MessageType({})", self.0),
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The 8-byte header that starts every control message (§5 "Header"): message type, then 4 bytes of padding.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct MessageHeader {
    /// The [`MessageType`] value.
    pub message_type: U32,
    /// Padding, sent as zero and ignored on receipt.
    pub padding: U32,
}

impl MessageHeader {
    /// A header for `message_type` with zero padding.
    pub const fn new(message_type: MessageType) -> MessageHeader {
        MessageHeader {
            message_type: U32::new(message_type.0),
            padding: U32::new(0),
        }
    }

    /// The message type this header announces.
    pub const fn message_type(&self) -> MessageType {
        MessageType(self.message_type.get())
    }
}

/// Implemented by every fixed-size control message struct: ties the struct to its [`MessageType`] (§5).
pub trait ControlMessage:
    FromBytes + IntoBytes + KnownLayout + Immutable + Unaligned + Sized
{
    /// The header type this struct is sent with.
    const MESSAGE_TYPE: MessageType;
    /// The struct's size in bytes, header included; also the smallest accepted message of this type unless
    /// the parser documents a shorter legacy form.
    const SIZE: usize = size_of::<Self>();
}

macro_rules! control_message {
    ($struct:ty, $type:ident) => {
        impl ControlMessage for $struct {
            const MESSAGE_TYPE: MessageType = MessageType::$type;
        }
    };
}

bitflags! {
    /// `chn_flags` of an offer (§5 "Offer flags"): only the bits Linux, QEMU and OpenVMM agree on are named.
    ///
    /// ⚠ 0x2 and 0x4 mean "server supports transfer pages / GPADLs" in Linux and QEMU but "confidential ring
    /// buffer / confidential external memory" in OpenVMM; they (and any other bit) are kept unnamed but preserved
    /// by [`OfferChannel::flags`].
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct OfferFlags: u16 {
        /// 0x1: the guest should enumerate a device interface for this offer.
        const ENUMERATE_DEVICE_INTERFACE = 0x1;
        /// 0x10: the channel is a named pipe; `user_defined` starts with the pipe mode.
        const NAMED_PIPE_MODE = 0x10;
        /// 0x100: a loopback offer.
        const LOOPBACK = 0x100;
        /// 0x200: a parent offer.
        const PARENT = 0x200;
        /// 0x400: the host asks for monitored notification.
        const REQUEST_MONITORED_NOTIFICATION = 0x400;
        /// 0x2000: an hv_sock (transport-layer named pipe interface) offer.
        const TLNPI_PROVIDER = 0x2000;
    }
}

/// Size of the user-defined area of an offer and of OPENCHANNEL (§5).
pub const USER_DEFINED_SIZE: usize = 120;

/// `pipe_mode` value (first u32 of `user_defined` in named-pipe offers): byte stream (§5).
pub const PIPE_MODE_BYTE: u32 = 0;
/// `pipe_mode` value: message mode (§5).
pub const PIPE_MODE_MESSAGE: u32 = 4;

/// OFFERCHANNEL (type 1, 196 bytes, §5): the host offers one channel.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct OfferChannel {
    /// Header, type OFFERCHANNEL.
    pub header: MessageHeader,
    /// The device class (`if_type`, §8).
    pub interface_type: Guid,
    /// This device's instance (`if_instance`).
    pub interface_instance: Guid,
    /// Reserved. ⚠ FreeBSD reads it as channel latency u64, revision u32, server context size u32.
    pub reserved: [u8; 16],
    /// `chn_flags`, see [`OfferFlags`].
    pub flags: U16,
    /// MMIO space the device needs, in MiB.
    pub mmio_megabytes: U16,
    /// Device-defined data (pipe mode first for named-pipe offers).
    pub user_defined: [u8; USER_DEFINED_SIZE],
    /// 0 for a primary channel, else the sub-channel index.
    pub sub_channel_index: U16,
    /// Reserved. ⚠ OpenVMM: `mmio_megabytes_optional`.
    pub reserved2: U16,
    /// The channel's relid, used in every later message about it and as its event-flag bit.
    pub child_relid: U32,
    /// Monitor id (trigger group = id / 32, bit = id % 32), valid when `monitor_flags` bit 0 is set.
    pub monitor_id: u8,
    /// Bit 0: a monitor id is allocated.
    pub monitor_flags: u8,
    /// Bit 0: the channel has a dedicated interrupt (do not set its bit in the shared interrupt page).
    pub interrupt_flags: U16,
    /// Connection id for signalling the host about this channel (≥ Win7 hosts).
    pub connection_id: U32,
}
control_message!(OfferChannel, OFFERCHANNEL);

impl OfferChannel {
    /// An offer with the given ids and every other field zero (for a host or a scripted host in tests).
    pub fn new(
        interface_type: Guid,
        interface_instance: Guid,
        child_relid: u32,
        connection_id: u32,
    ) -> OfferChannel {
        OfferChannel {
            header: MessageHeader::new(MessageType::OFFERCHANNEL),
            interface_type,
            interface_instance,
            reserved: [0; 16],
            flags: U16::new(0),
            mmio_megabytes: U16::new(0),
            user_defined: [0; USER_DEFINED_SIZE],
            sub_channel_index: U16::new(0),
            reserved2: U16::new(0),
            child_relid: U32::new(child_relid),
            monitor_id: 0,
            monitor_flags: 0,
            interrupt_flags: U16::new(0),
            connection_id: U32::new(connection_id),
        }
    }

    /// The offer flags, unknown bits preserved.
    pub fn flags(&self) -> OfferFlags {
        OfferFlags::from_bits_retain(self.flags.get())
    }

    /// Whether `monitor_id` is valid (monitor_flags bit 0).
    pub fn monitor_allocated(&self) -> bool {
        self.monitor_flags & 1 != 0
    }

    /// Whether the channel has a dedicated interrupt (interrupt_flags bit 0).
    pub fn is_dedicated_interrupt(&self) -> bool {
        self.interrupt_flags.get() & 1 != 0
    }

    /// The pipe mode ([`PIPE_MODE_BYTE`] / [`PIPE_MODE_MESSAGE`]) of a named-pipe offer, `None` for other offers.
    pub fn pipe_mode(&self) -> Option<u32> {
        if !self.flags().contains(OfferFlags::NAMED_PIPE_MODE) {
            return None;
        }
        let [a, b, c, d, ..] = self.user_defined;
        Some(u32::from_le_bytes([a, b, c, d]))
    }
}

/// RESCIND_CHANNELOFFER (type 2, 12 bytes, §5): the host withdraws an offer.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct RescindChannelOffer {
    /// Header, type RESCIND_CHANNELOFFER.
    pub header: MessageHeader,
    /// The withdrawn channel.
    pub child_relid: U32,
}
control_message!(RescindChannelOffer, RESCIND_CHANNELOFFER);

impl RescindChannelOffer {
    /// A rescind of `child_relid`.
    pub fn new(child_relid: u32) -> RescindChannelOffer {
        RescindChannelOffer {
            header: MessageHeader::new(MessageType::RESCIND_CHANNELOFFER),
            child_relid: U32::new(child_relid),
        }
    }
}

/// REQUESTOFFERS (type 3, header only, §5): the guest asks for all offers.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct RequestOffers {
    /// Header, type REQUESTOFFERS.
    pub header: MessageHeader,
}
control_message!(RequestOffers, REQUESTOFFERS);

/// ALLOFFERS_DELIVERED (type 4, header only, §5): the host has sent every initial offer.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct AllOffersDelivered {
    /// Header, type ALLOFFERS_DELIVERED.
    pub header: MessageHeader,
}
control_message!(AllOffersDelivered, ALLOFFERS_DELIVERED);

/// UNLOAD (type 16, header only, §5): the guest disconnects from VMBus.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct Unload {
    /// Header, type UNLOAD.
    pub header: MessageHeader,
}
control_message!(Unload, UNLOAD);

/// UNLOAD_RESPONSE (type 17, header only, §5): the host confirms the disconnect.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct UnloadResponse {
    /// Header, type UNLOAD_RESPONSE.
    pub header: MessageHeader,
}
control_message!(UnloadResponse, UNLOAD_RESPONSE);

macro_rules! header_only_new {
    ($struct:ident, $type:ident) => {
        impl $struct {
            #[doc = concat!("The ", stringify!($type), " message.")]
            pub const fn new() -> $struct {
                $struct {
                    header: MessageHeader::new(MessageType::$type),
                }
            }
        }

        impl Default for $struct {
            fn default() -> $struct {
                $struct::new()
            }
        }
    };
}
header_only_new!(RequestOffers, REQUESTOFFERS);
header_only_new!(AllOffersDelivered, ALLOFFERS_DELIVERED);
header_only_new!(Unload, UNLOAD);
header_only_new!(UnloadResponse, UNLOAD_RESPONSE);

/// OPENCHANNEL (type 5, 148 bytes, §5): the guest opens an offered channel over a ring GPADL.
///
/// ⚠ OpenVMM's 6.0 form appends connection_id u32, event_flag u16, flags u16 (156 bytes); not sent by this crate.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct OpenChannel {
    /// Header, type OPENCHANNEL.
    pub header: MessageHeader,
    /// The channel to open.
    pub child_relid: U32,
    /// Guest-chosen id echoed in OPENCHANNEL_RESULT.
    pub open_id: U32,
    /// The GPADL covering the send ring then the receive ring.
    pub ring_buffer_gpadl: U32,
    /// VP that receives this channel's interrupts.
    pub target_vp: U32,
    /// Page offset of the host→guest ring inside the GPADL (= send-ring pages including its header page).
    pub downstream_ring_buffer_page_offset: U32,
    /// Device-defined data passed to the host's endpoint.
    pub user_data: [u8; USER_DEFINED_SIZE],
}
control_message!(OpenChannel, OPENCHANNEL);

impl OpenChannel {
    /// An open request; `user_data` is zero-filled and may be set afterwards.
    pub fn new(
        child_relid: u32,
        open_id: u32,
        ring_buffer_gpadl: u32,
        target_vp: u32,
        downstream_ring_buffer_page_offset: u32,
    ) -> OpenChannel {
        OpenChannel {
            header: MessageHeader::new(MessageType::OPENCHANNEL),
            child_relid: U32::new(child_relid),
            open_id: U32::new(open_id),
            ring_buffer_gpadl: U32::new(ring_buffer_gpadl),
            target_vp: U32::new(target_vp),
            downstream_ring_buffer_page_offset: U32::new(downstream_ring_buffer_page_offset),
            user_data: [0; USER_DEFINED_SIZE],
        }
    }
}

/// OPENCHANNEL_RESULT (type 6, 20 bytes, §5): the host's answer to OPENCHANNEL.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct OpenChannelResult {
    /// Header, type OPENCHANNEL_RESULT.
    pub header: MessageHeader,
    /// The channel the open was for.
    pub child_relid: U32,
    /// The `open_id` of the request.
    pub open_id: U32,
    /// 0 = success, anything else is a failure status.
    pub status: U32,
}
control_message!(OpenChannelResult, OPENCHANNEL_RESULT);

impl OpenChannelResult {
    /// A result for (`child_relid`, `open_id`).
    pub fn new(child_relid: u32, open_id: u32, status: u32) -> OpenChannelResult {
        OpenChannelResult {
            header: MessageHeader::new(MessageType::OPENCHANNEL_RESULT),
            child_relid: U32::new(child_relid),
            open_id: U32::new(open_id),
            status: U32::new(status),
        }
    }

    /// Whether the open succeeded (status 0).
    pub fn is_success(&self) -> bool {
        self.status.get() == 0
    }
}

/// CLOSECHANNEL (type 7, 12 bytes, §5): the guest closes a channel.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct CloseChannel {
    /// Header, type CLOSECHANNEL.
    pub header: MessageHeader,
    /// The channel to close.
    pub child_relid: U32,
}
control_message!(CloseChannel, CLOSECHANNEL);

impl CloseChannel {
    /// A close of `child_relid`.
    pub fn new(child_relid: u32) -> CloseChannel {
        CloseChannel {
            header: MessageHeader::new(MessageType::CLOSECHANNEL),
            child_relid: U32::new(child_relid),
        }
    }
}

/// RELID_RELEASED (type 13, 12 bytes, §5): the guest is done with a rescinded channel.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct RelIdReleased {
    /// Header, type RELID_RELEASED.
    pub header: MessageHeader,
    /// The released channel.
    pub child_relid: U32,
}
control_message!(RelIdReleased, RELID_RELEASED);

impl RelIdReleased {
    /// A release of `child_relid`.
    pub fn new(child_relid: u32) -> RelIdReleased {
        RelIdReleased {
            header: MessageHeader::new(MessageType::RELID_RELEASED),
            child_relid: U32::new(child_relid),
        }
    }
}

/// Fixed part of GPADL_HEADER (type 8, 20 bytes, §5); the range buffer (`rangecount` × [`GpaRangeHeader`] each
/// followed by its PFNs, `range_buflen` bytes in all) follows at offset 20 and continues in GPADL_BODY messages.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct GpadlHeader {
    /// Header, type GPADL_HEADER.
    pub header: MessageHeader,
    /// The channel the GPADL belongs to.
    pub child_relid: U32,
    /// Guest-chosen GPADL handle.
    pub gpadl: U32,
    /// Total bytes of the range buffer (single range: 8 + 8·npages).
    pub range_buflen: U16,
    /// Number of ranges in the range buffer.
    pub rangecount: U16,
}
control_message!(GpadlHeader, GPADL_HEADER);

impl GpadlHeader {
    /// Most PFNs a single-range GPADL_HEADER can carry: (240 − 20 − 8) / 8 = 26 (§5).
    pub const MAX_PFNS: usize =
        (MAX_MESSAGE_SIZE - size_of::<GpadlHeader>() - size_of::<GpaRangeHeader>()) / 8;
    /// Most 8-byte words of range buffer a GPADL_HEADER can carry: (240 − 20) / 8 = 27.
    pub const MAX_RANGE_WORDS: usize = (MAX_MESSAGE_SIZE - size_of::<GpadlHeader>()) / 8;

    /// The fixed part for (`child_relid`, `gpadl`) with the given range buffer length and range count.
    pub fn new(child_relid: u32, gpadl: u32, range_buflen: u16, rangecount: u16) -> GpadlHeader {
        GpadlHeader {
            header: MessageHeader::new(MessageType::GPADL_HEADER),
            child_relid: U32::new(child_relid),
            gpadl: U32::new(gpadl),
            range_buflen: U16::new(range_buflen),
            rangecount: U16::new(rangecount),
        }
    }
}

/// Start of one GPA range in a GPADL range buffer (§5): `byte_count`, `byte_offset` (into the first page), then
/// `(byte_offset + byte_count + 4095) / 4096` PFNs.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct GpaRangeHeader {
    /// Bytes described by the range.
    pub byte_count: U32,
    /// Offset of the first byte inside the first page.
    pub byte_offset: U32,
}

impl GpaRangeHeader {
    /// A range header for `byte_count` bytes starting `byte_offset` bytes into the first page.
    pub fn new(byte_count: u32, byte_offset: u32) -> GpaRangeHeader {
        GpaRangeHeader {
            byte_count: U32::new(byte_count),
            byte_offset: U32::new(byte_offset),
        }
    }

    /// Reads a range header from its 8-byte word of the range buffer (`byte_count` low, `byte_offset` high).
    pub fn from_word(word: u64) -> GpaRangeHeader {
        zerocopy::transmute!(word.to_le_bytes())
    }

    /// The 8-byte range-buffer word for this range header.
    pub fn to_word(&self) -> u64 {
        u64::from(self.byte_count.get()) | (u64::from(self.byte_offset.get()) << 32)
    }
}

/// Fixed part of GPADL_BODY (type 9, 16 bytes, §5); up to 28 further 8-byte words of the range buffer follow.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct GpadlBody {
    /// Header, type GPADL_BODY.
    pub header: MessageHeader,
    /// Sequence number of this body message. ⚠ OpenVMM calls it reserved and ignores it, as does QEMU; this crate
    /// sends 1, 2, 3… (the header being message 0).
    pub msgnumber: U32,
    /// The GPADL handle from the header.
    pub gpadl: U32,
}
control_message!(GpadlBody, GPADL_BODY);

impl GpadlBody {
    /// Most PFNs (range-buffer words) a GPADL_BODY can carry: (240 − 16) / 8 = 28 (§5).
    pub const MAX_PFNS: usize = (MAX_MESSAGE_SIZE - size_of::<GpadlBody>()) / 8;

    /// The fixed part of body message `msgnumber` of `gpadl`.
    pub fn new(msgnumber: u32, gpadl: u32) -> GpadlBody {
        GpadlBody {
            header: MessageHeader::new(MessageType::GPADL_BODY),
            msgnumber: U32::new(msgnumber),
            gpadl: U32::new(gpadl),
        }
    }
}

/// GPADL_CREATED (type 10, 20 bytes, §5): the host's answer to a complete GPADL description.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct GpadlCreated {
    /// Header, type GPADL_CREATED.
    pub header: MessageHeader,
    /// The channel of the GPADL.
    pub child_relid: U32,
    /// The GPADL handle.
    pub gpadl: U32,
    /// 0 = created, anything else is a failure status.
    pub creation_status: U32,
}
control_message!(GpadlCreated, GPADL_CREATED);

impl GpadlCreated {
    /// The answer for (`child_relid`, `gpadl`).
    pub fn new(child_relid: u32, gpadl: u32, creation_status: u32) -> GpadlCreated {
        GpadlCreated {
            header: MessageHeader::new(MessageType::GPADL_CREATED),
            child_relid: U32::new(child_relid),
            gpadl: U32::new(gpadl),
            creation_status: U32::new(creation_status),
        }
    }

    /// Whether the GPADL was created (status 0).
    pub fn is_success(&self) -> bool {
        self.creation_status.get() == 0
    }
}

/// GPADL_TEARDOWN (type 11, 16 bytes, §5): the guest releases a GPADL.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct GpadlTeardown {
    /// Header, type GPADL_TEARDOWN.
    pub header: MessageHeader,
    /// The channel of the GPADL.
    pub child_relid: U32,
    /// The GPADL handle.
    pub gpadl: U32,
}
control_message!(GpadlTeardown, GPADL_TEARDOWN);

impl GpadlTeardown {
    /// A teardown of (`child_relid`, `gpadl`).
    pub fn new(child_relid: u32, gpadl: u32) -> GpadlTeardown {
        GpadlTeardown {
            header: MessageHeader::new(MessageType::GPADL_TEARDOWN),
            child_relid: U32::new(child_relid),
            gpadl: U32::new(gpadl),
        }
    }
}

/// GPADL_TORNDOWN (type 12, 12 bytes, §5): the host has released a GPADL.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct GpadlTorndown {
    /// Header, type GPADL_TORNDOWN.
    pub header: MessageHeader,
    /// The GPADL handle.
    pub gpadl: U32,
}
control_message!(GpadlTorndown, GPADL_TORNDOWN);

impl GpadlTorndown {
    /// The confirmation for `gpadl`.
    pub fn new(gpadl: u32) -> GpadlTorndown {
        GpadlTorndown {
            header: MessageHeader::new(MessageType::GPADL_TORNDOWN),
            gpadl: U32::new(gpadl),
        }
    }
}

/// INITIATE_CONTACT (type 14, 40 bytes, §5): the guest connects, proposing one version.
///
/// Offset 16 is a union: the interrupt page GPA for versions < 5.0, or `msg_sint` u8, `msg_vtl` u8 and 6 reserved
/// bytes for ≥ 5.0 (use the accessors). ⚠ OpenVMM's 6.0 puts feature flags in the union's upper half (message
/// bytes 20..24) and may append a client-id GUID (56 bytes); this crate does not send either.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct InitiateContact {
    /// Header, type INITIATE_CONTACT.
    pub header: MessageHeader,
    /// The proposed [`VmbusVersion`].
    pub version_requested: U32,
    /// VP that should receive the host's control messages.
    pub target_vcpu: U32,
    /// The interrupt page (< 5.0) or message SINT/VTL (≥ 5.0) union.
    pub interrupt_page_or_target_info: U64,
    /// GPA of monitor page 1 (parent → child).
    pub monitor_page1: U64,
    /// GPA of monitor page 2 (child → parent).
    pub monitor_page2: U64,
}
control_message!(InitiateContact, INITIATE_CONTACT);

impl InitiateContact {
    /// A contact request for `version`, filling the union as that version expects: `interrupt_page_gpa` below 5.0,
    /// else `msg_sint` = 2 (the VMBus SINT) and `msg_vtl` = 0 (the interrupt page is then not sent).
    pub fn new(
        version: VmbusVersion,
        target_vcpu: u32,
        interrupt_page_gpa: u64,
        monitor_page1_gpa: u64,
        monitor_page2_gpa: u64,
    ) -> InitiateContact {
        let union = if version.uses_msg_sint() {
            u64::from(VMBUS_MESSAGE_SINT)
        } else {
            interrupt_page_gpa
        };
        InitiateContact {
            header: MessageHeader::new(MessageType::INITIATE_CONTACT),
            version_requested: U32::new(version.0),
            target_vcpu: U32::new(target_vcpu),
            interrupt_page_or_target_info: U64::new(union),
            monitor_page1: U64::new(monitor_page1_gpa),
            monitor_page2: U64::new(monitor_page2_gpa),
        }
    }

    /// The proposed version.
    pub fn version(&self) -> VmbusVersion {
        VmbusVersion(self.version_requested.get())
    }

    /// The union read as the interrupt page GPA (meaningful for versions < 5.0).
    pub fn interrupt_page(&self) -> u64 {
        self.interrupt_page_or_target_info.get()
    }

    /// The union's `msg_sint` byte (meaningful for versions ≥ 5.0).
    pub fn msg_sint(&self) -> u8 {
        self.interrupt_page_or_target_info.get().to_le_bytes()[0]
    }

    /// The union's `msg_vtl` byte (meaningful for versions ≥ 5.0).
    pub fn msg_vtl(&self) -> u8 {
        self.interrupt_page_or_target_info.get().to_le_bytes()[1]
    }

    /// Sets the union to `msg_sint`, `msg_vtl` and zero reserved bytes (≥ 5.0 form).
    pub fn set_msg_target(&mut self, msg_sint: u8, msg_vtl: u8) {
        self.interrupt_page_or_target_info =
            U64::new(u64::from(msg_sint) | (u64::from(msg_vtl) << 8));
    }
}

/// `connection_state` of VERSION_RESPONSE (§5). Open: unknown values are representable.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnectionState(pub u8);

impl ConnectionState {
    /// 0: connected.
    pub const SUCCESSFUL: ConnectionState = ConnectionState(0);
    /// 1: refused for lack of resources.
    pub const FAILED_LOW_RESOURCES: ConnectionState = ConnectionState(1);
    /// 2: refused for another reason.
    pub const FAILED_UNKNOWN_FAILURE: ConnectionState = ConnectionState(2);
}

/// VERSION_RESPONSE (type 15, 16 bytes in its full form, §5): the host's answer to INITIATE_CONTACT.
///
/// Older hosts send a shorter message: QEMU sends only `version_supported` and `connection_state` (10 bytes).
/// `msg_conn_id` is meaningful only in answers to versions ≥ 5.0. ⚠ OpenVMM's 6.0 appends supported feature flags
/// u32 (20 bytes).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct VersionResponse {
    /// Header, type VERSION_RESPONSE.
    pub header: MessageHeader,
    /// Non-zero if the proposed version is accepted.
    pub version_supported: u8,
    /// A [`ConnectionState`].
    pub connection_state: u8,
    /// Padding.
    pub padding: U16,
    /// Connection id for all later guest → host messages (≥ 5.0).
    pub msg_conn_id: U32,
}
control_message!(VersionResponse, VERSION_RESPONSE);

impl VersionResponse {
    /// Length of the short form older hosts send: header, `version_supported`, `connection_state`.
    pub const SHORT_SIZE: usize = 10;

    /// A full-form answer.
    pub fn new(
        version_supported: bool,
        connection_state: ConnectionState,
        msg_conn_id: u32,
    ) -> VersionResponse {
        VersionResponse {
            header: MessageHeader::new(MessageType::VERSION_RESPONSE),
            version_supported: u8::from(version_supported),
            connection_state: connection_state.0,
            padding: U16::new(0),
            msg_conn_id: U32::new(msg_conn_id),
        }
    }
}

/// MODIFYCHANNEL (type 22, 16 bytes, ≥ 4.1, §5): the guest retargets a channel's interrupt to another VP.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct ModifyChannel {
    /// Header, type MODIFYCHANNEL.
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: U32,
    /// The new target VP.
    pub target_vp: U32,
}
control_message!(ModifyChannel, MODIFYCHANNEL);

impl ModifyChannel {
    /// Retarget `child_relid` to `target_vp`.
    pub fn new(child_relid: u32, target_vp: u32) -> ModifyChannel {
        ModifyChannel {
            header: MessageHeader::new(MessageType::MODIFYCHANNEL),
            child_relid: U32::new(child_relid),
            target_vp: U32::new(target_vp),
        }
    }
}

/// MODIFYCHANNEL_RESPONSE (type 24, 16 bytes, ≥ 5.3, §5; layout from Linux and OpenVMM).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct ModifyChannelResponse {
    /// Header, type MODIFYCHANNEL_RESPONSE.
    pub header: MessageHeader,
    /// The channel.
    pub child_relid: U32,
    /// 0 = success.
    pub status: U32,
}
control_message!(ModifyChannelResponse, MODIFYCHANNEL_RESPONSE);

impl ModifyChannelResponse {
    /// The acknowledgement for `child_relid`.
    pub fn new(child_relid: u32, status: u32) -> ModifyChannelResponse {
        ModifyChannelResponse {
            header: MessageHeader::new(MessageType::MODIFYCHANNEL_RESPONSE),
            child_relid: U32::new(child_relid),
            status: U32::new(status),
        }
    }
}

/// TL_CONNECT_REQUEST (type 21, 40 bytes, §5): the guest asks the host for an hv_sock connection.
///
/// ⚠ OpenVMM accepts a ≥ 5.2 form with a trailing silo-id GUID (56 bytes); Linux sends this 40-byte form.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct TlConnectRequest {
    /// Header, type TL_CONNECT_REQUEST.
    pub header: MessageHeader,
    /// The guest's endpoint id.
    pub guest_endpoint_id: Guid,
    /// The host service to connect to.
    pub host_service_id: Guid,
}
control_message!(TlConnectRequest, TL_CONNECT_REQUEST);

impl TlConnectRequest {
    /// A connect request from `guest_endpoint_id` to `host_service_id`.
    pub fn new(guest_endpoint_id: Guid, host_service_id: Guid) -> TlConnectRequest {
        TlConnectRequest {
            header: MessageHeader::new(MessageType::TL_CONNECT_REQUEST),
            guest_endpoint_id,
            host_service_id,
        }
    }
}

/// TL_CONNECT_RESULT (type 23, 44 bytes): the host's answer to TL_CONNECT_REQUEST.
///
/// ⚠ Single source (OpenVMM): Linux never parses it. Endpoint id, service id, then a status (0 = success).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct TlConnectResult {
    /// Header, type TL_CONNECT_RESULT.
    pub header: MessageHeader,
    /// The guest endpoint id from the request.
    pub guest_endpoint_id: Guid,
    /// The host service id from the request.
    pub host_service_id: Guid,
    /// 0 = connected, else a failure status.
    pub status: U32,
}
control_message!(TlConnectResult, TL_CONNECT_RESULT);

impl TlConnectResult {
    /// The answer for a request.
    pub fn new(guest_endpoint_id: Guid, host_service_id: Guid, status: u32) -> TlConnectResult {
        TlConnectResult {
            header: MessageHeader::new(MessageType::TL_CONNECT_RESULT),
            guest_endpoint_id,
            host_service_id,
            status: U32::new(status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of};

    /// Every message struct: size and type binding.
    #[test]
    fn sizes() {
        fn check<T: ControlMessage>(size: usize, message_type: u32) {
            assert_eq!(size_of::<T>(), size);
            assert_eq!(T::SIZE, size);
            assert_eq!(align_of::<T>(), 1);
            assert_eq!(T::MESSAGE_TYPE.0, message_type);
            assert!(size <= MAX_MESSAGE_SIZE);
        }
        assert_eq!(size_of::<MessageHeader>(), 8);
        check::<OfferChannel>(196, 1);
        check::<RescindChannelOffer>(12, 2);
        check::<RequestOffers>(8, 3);
        check::<AllOffersDelivered>(8, 4);
        check::<OpenChannel>(148, 5);
        check::<OpenChannelResult>(20, 6);
        check::<CloseChannel>(12, 7);
        check::<GpadlHeader>(20, 8);
        check::<GpadlBody>(16, 9);
        check::<GpadlCreated>(20, 10);
        check::<GpadlTeardown>(16, 11);
        check::<GpadlTorndown>(12, 12);
        check::<RelIdReleased>(12, 13);
        check::<InitiateContact>(40, 14);
        check::<VersionResponse>(16, 15);
        check::<Unload>(8, 16);
        check::<UnloadResponse>(8, 17);
        check::<TlConnectRequest>(40, 21);
        check::<ModifyChannel>(16, 22);
        check::<TlConnectResult>(44, 23);
        check::<ModifyChannelResponse>(16, 24);
        assert_eq!(size_of::<GpaRangeHeader>(), 8);
    }

    #[test]
    fn header_offsets() {
        assert_eq!(offset_of!(MessageHeader, message_type), 0);
        assert_eq!(offset_of!(MessageHeader, padding), 4);
    }

    #[test]
    fn offer_channel_offsets() {
        assert_eq!(offset_of!(OfferChannel, header), 0);
        assert_eq!(offset_of!(OfferChannel, interface_type), 8);
        assert_eq!(offset_of!(OfferChannel, interface_instance), 24);
        assert_eq!(offset_of!(OfferChannel, reserved), 40);
        assert_eq!(offset_of!(OfferChannel, flags), 56);
        assert_eq!(offset_of!(OfferChannel, mmio_megabytes), 58);
        assert_eq!(offset_of!(OfferChannel, user_defined), 60);
        assert_eq!(offset_of!(OfferChannel, sub_channel_index), 180);
        assert_eq!(offset_of!(OfferChannel, reserved2), 182);
        assert_eq!(offset_of!(OfferChannel, child_relid), 184);
        assert_eq!(offset_of!(OfferChannel, monitor_id), 188);
        assert_eq!(offset_of!(OfferChannel, monitor_flags), 189);
        assert_eq!(offset_of!(OfferChannel, interrupt_flags), 190);
        assert_eq!(offset_of!(OfferChannel, connection_id), 192);
    }

    #[test]
    fn relid_only_message_offsets() {
        assert_eq!(offset_of!(RescindChannelOffer, child_relid), 8);
        assert_eq!(offset_of!(CloseChannel, child_relid), 8);
        assert_eq!(offset_of!(RelIdReleased, child_relid), 8);
    }

    #[test]
    fn open_channel_offsets() {
        assert_eq!(offset_of!(OpenChannel, child_relid), 8);
        assert_eq!(offset_of!(OpenChannel, open_id), 12);
        assert_eq!(offset_of!(OpenChannel, ring_buffer_gpadl), 16);
        assert_eq!(offset_of!(OpenChannel, target_vp), 20);
        assert_eq!(
            offset_of!(OpenChannel, downstream_ring_buffer_page_offset),
            24
        );
        assert_eq!(offset_of!(OpenChannel, user_data), 28);
        assert_eq!(offset_of!(OpenChannelResult, child_relid), 8);
        assert_eq!(offset_of!(OpenChannelResult, open_id), 12);
        assert_eq!(offset_of!(OpenChannelResult, status), 16);
    }

    #[test]
    fn gpadl_message_offsets() {
        assert_eq!(offset_of!(GpadlHeader, child_relid), 8);
        assert_eq!(offset_of!(GpadlHeader, gpadl), 12);
        assert_eq!(offset_of!(GpadlHeader, range_buflen), 16);
        assert_eq!(offset_of!(GpadlHeader, rangecount), 18);
        assert_eq!(offset_of!(GpaRangeHeader, byte_count), 0);
        assert_eq!(offset_of!(GpaRangeHeader, byte_offset), 4);
        assert_eq!(offset_of!(GpadlBody, msgnumber), 8);
        assert_eq!(offset_of!(GpadlBody, gpadl), 12);
        assert_eq!(offset_of!(GpadlCreated, child_relid), 8);
        assert_eq!(offset_of!(GpadlCreated, gpadl), 12);
        assert_eq!(offset_of!(GpadlCreated, creation_status), 16);
        assert_eq!(offset_of!(GpadlTeardown, child_relid), 8);
        assert_eq!(offset_of!(GpadlTeardown, gpadl), 12);
        assert_eq!(offset_of!(GpadlTorndown, gpadl), 8);
        assert_eq!(GpadlHeader::MAX_PFNS, 26);
        assert_eq!(GpadlHeader::MAX_RANGE_WORDS, 27);
        assert_eq!(GpadlBody::MAX_PFNS, 28);
    }

    #[test]
    fn connection_message_offsets() {
        assert_eq!(offset_of!(InitiateContact, version_requested), 8);
        assert_eq!(offset_of!(InitiateContact, target_vcpu), 12);
        assert_eq!(
            offset_of!(InitiateContact, interrupt_page_or_target_info),
            16
        );
        assert_eq!(offset_of!(InitiateContact, monitor_page1), 24);
        assert_eq!(offset_of!(InitiateContact, monitor_page2), 32);
        assert_eq!(offset_of!(VersionResponse, version_supported), 8);
        assert_eq!(offset_of!(VersionResponse, connection_state), 9);
        assert_eq!(offset_of!(VersionResponse, padding), 10);
        assert_eq!(offset_of!(VersionResponse, msg_conn_id), 12);
    }

    #[test]
    fn modify_and_tl_offsets() {
        assert_eq!(offset_of!(ModifyChannel, child_relid), 8);
        assert_eq!(offset_of!(ModifyChannel, target_vp), 12);
        assert_eq!(offset_of!(ModifyChannelResponse, child_relid), 8);
        assert_eq!(offset_of!(ModifyChannelResponse, status), 12);
        assert_eq!(offset_of!(TlConnectRequest, guest_endpoint_id), 8);
        assert_eq!(offset_of!(TlConnectRequest, host_service_id), 24);
        assert_eq!(offset_of!(TlConnectResult, guest_endpoint_id), 8);
        assert_eq!(offset_of!(TlConnectResult, host_service_id), 24);
        assert_eq!(offset_of!(TlConnectResult, status), 40);
    }

    #[test]
    fn initiate_contact_union_per_version() {
        let old = InitiateContact::new(VmbusVersion::V4_0, 0, 0x1234_5000, 0xa000, 0xb000);
        assert_eq!(old.interrupt_page(), 0x1234_5000);
        assert_eq!(old.version(), VmbusVersion::V4_0);
        let new = InitiateContact::new(VmbusVersion::V5_3, 1, 0x1234_5000, 0xa000, 0xb000);
        assert_eq!(new.msg_sint(), 2);
        assert_eq!(new.msg_vtl(), 0);
        // Bytes 16..24 on the wire: sint, vtl, six reserved zero bytes.
        assert_eq!(&new.as_bytes()[16..24], &[2, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&new.as_bytes()[24..32], &0xa000u64.to_le_bytes());
        let mut retargeted = new;
        retargeted.set_msg_target(5, 1);
        assert_eq!((retargeted.msg_sint(), retargeted.msg_vtl()), (5, 1));
        assert_eq!(&retargeted.as_bytes()[16..18], &[5, 1]);
    }

    #[test]
    fn offer_accessors_and_wire_bytes() {
        let mut offer =
            OfferChannel::new(super::super::guid::device_class::KVP, Guid::ZERO, 7, 0x2007);
        offer.flags = U16::new(0x2012); // TLNPI | NAMED_PIPE | an unnamed ⚠ bit
        offer.user_defined[0] = 4;
        offer.monitor_flags = 1;
        offer.monitor_id = 33;
        offer.interrupt_flags = U16::new(1);
        let flags = offer.flags();
        assert!(flags.contains(OfferFlags::TLNPI_PROVIDER | OfferFlags::NAMED_PIPE_MODE));
        assert_eq!(flags.bits(), 0x2012);
        assert_eq!(offer.pipe_mode(), Some(PIPE_MODE_MESSAGE));
        assert!(offer.monitor_allocated());
        assert!(offer.is_dedicated_interrupt());
        let bytes = offer.as_bytes();
        assert_eq!(&bytes[0..8], &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&bytes[56..58], &[0x12, 0x20]);
        assert_eq!(&bytes[184..188], &[7, 0, 0, 0]);
        assert_eq!(bytes[188], 33);
        assert_eq!(&bytes[192..196], &[0x07, 0x20, 0, 0]);
        offer.flags = U16::new(0);
        assert_eq!(offer.pipe_mode(), None);
    }

    #[test]
    fn message_type_names() {
        assert_eq!(MessageType::OFFERCHANNEL.name(), Some("OFFERCHANNEL"));
        assert_eq!(
            MessageType::MODIFYCHANNEL_RESPONSE.name(),
            Some("MODIFYCHANNEL_RESPONSE")
        );
        assert_eq!(MessageType(25).name(), None);
        assert_eq!(
            alloc::format!("{:?}", MessageType(15)),
            "VERSION_RESPONSE(15)"
        );
        assert_eq!(alloc::format!("{:?}", MessageType(99)), "MessageType(99)");
        for raw in 0..=24 {
            assert!(MessageType(raw).name().is_some());
        }
    }
}
