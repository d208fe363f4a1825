//! Wire structs of the Dynamic Memory protocol and the parser for the messages a host sends.
//!
//! Reference: `dynamic-memory.md` "Wire format". Every message starts with the 8-byte [`DmHeader`] whose `size`
//! counts the whole message, header included. All structs are packed and little-endian; the C bitfields are
//! LSB-first, so each is one little-endian integer here with accessor methods. Checked against QEMU
//! `include/hw/hyperv/dynmem-proto.h` and the structures of Linux `drivers/hv/hv_balloon.c`; the one place they
//! differ (the optional `region` of MEM_HOT_ADD_REQUEST) is noted at [`HotAddRequest`].
//!
//! Size policy for received messages ([`parse_host_message`]): the header's `size` must lie between the header
//! size and the payload length (a VMBus packet may carry padding after it); the message is then the first `size`
//! bytes, and it must be at least as long as the struct of its type, plus the ranges or info bytes it announces.
//! Longer messages are accepted and the extra bytes ignored, as QEMU's host does for the guest's messages.

use core::fmt;
use core::mem::size_of;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use super::range::PageRange;

/// The type field of a [`DmHeader`] ("Wire format" table, column #).
///
/// Open: any `u16` is representable; [`DmMessageType::name`] tells the named ones apart.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmMessageType(pub u16);

impl DmMessageType {
    /// 0: error; neither side sends or handles it.
    pub const ERROR: DmMessageType = DmMessageType(0);
    /// 1: guest → host, propose a protocol version ([`VersionRequest`]).
    pub const VERSION_REQUEST: DmMessageType = DmMessageType(1);
    /// 2: host → guest, answer to a version proposal ([`VersionResponse`]).
    pub const VERSION_RESPONSE: DmMessageType = DmMessageType(2);
    /// 3: guest → host, what the guest can do ([`CapabilitiesReport`]).
    pub const CAPABILITIES_REPORT: DmMessageType = DmMessageType(3);
    /// 4: host → guest, answer to the capabilities ([`CapabilitiesResponse`]).
    pub const CAPABILITIES_RESPONSE: DmMessageType = DmMessageType(4);
    /// 5: guest → host, memory pressure figures, no reply ([`StatusReport`]).
    pub const STATUS_REPORT: DmMessageType = DmMessageType(5);
    /// 6: host → guest, give pages to the host ([`BalloonRequest`]).
    pub const BALLOON_REQUEST: DmMessageType = DmMessageType(6);
    /// 7: guest → host, pages given ([`BalloonResponseHeader`] + ranges).
    pub const BALLOON_RESPONSE: DmMessageType = DmMessageType(7);
    /// 8: host → guest, pages given back ([`UnballoonRequestHeader`] + ranges).
    pub const UNBALLOON_REQUEST: DmMessageType = DmMessageType(8);
    /// 9: guest → host, end of an unballoon transaction ([`UnballoonResponse`]).
    pub const UNBALLOON_RESPONSE: DmMessageType = DmMessageType(9);
    /// 10: host → guest, new memory ([`HotAddRequest`], optionally with a region).
    pub const MEM_HOT_ADD_REQUEST: DmMessageType = DmMessageType(10);
    /// 11: guest → host, how much of the new memory was taken ([`HotAddResponse`]).
    pub const MEM_HOT_ADD_RESPONSE: DmMessageType = DmMessageType(11);
    /// 12: host → guest, information items (protocol ≥ 1.0, [`InfoMessageHeader`]).
    pub const INFO_MESSAGE: DmMessageType = DmMessageType(12);
    /// 13: host → guest, hot remove (protocol 2.0, QEMU header only, [`HotRemoveRequest`]).
    pub const MEM_HOT_REMOVE_REQUEST: DmMessageType = DmMessageType(13);
    /// 14: guest → host, hot remove answer (protocol 2.0, QEMU header only, [`HotRemoveResponseHeader`]).
    pub const MEM_HOT_REMOVE_RESPONSE: DmMessageType = DmMessageType(14);

    /// The reference's name for a known type (0..=14), `None` for anything else.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "ERROR",
            1 => "VERSION_REQUEST",
            2 => "VERSION_RESPONSE",
            3 => "CAPABILITIES_REPORT",
            4 => "CAPABILITIES_RESPONSE",
            5 => "STATUS_REPORT",
            6 => "BALLOON_REQUEST",
            7 => "BALLOON_RESPONSE",
            8 => "UNBALLOON_REQUEST",
            9 => "UNBALLOON_RESPONSE",
            10 => "MEM_HOT_ADD_REQUEST",
            11 => "MEM_HOT_ADD_RESPONSE",
            12 => "INFO_MESSAGE",
            13 => "MEM_HOT_REMOVE_REQUEST",
            14 => "MEM_HOT_REMOVE_RESPONSE",
            _ => return None,
        })
    }
}

impl fmt::Debug for DmMessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "DmMessageType({})", self.0),
        }
    }
}

impl fmt::Display for DmMessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A protocol version: major in the high 16 bits, minor in the low 16 ("Versions").
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DmVersion(pub u32);

impl DmVersion {
    /// 0.3 (0x3), Windows 7 hosts; the oldest version QEMU accepts.
    pub const V0_3: DmVersion = DmVersion(0x0000_0003);
    /// 1.0 (0x10000), Windows 8 hosts; adds INFO_MESSAGE.
    pub const V1_0: DmVersion = DmVersion(0x0001_0000);
    /// 2.0 (0x20000), Windows 10 hosts; adds hot remove; the newest version QEMU accepts.
    pub const V2_0: DmVersion = DmVersion(0x0002_0000);

    /// The versions a guest proposes, newest first (Linux's order; "Guest sequence" step 2).
    pub const NEGOTIATION_ORDER: [DmVersion; 3] = [DmVersion::V2_0, DmVersion::V1_0, DmVersion::V0_3];

    /// The major number (high 16 bits).
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The minor number (low 16 bits).
    pub const fn minor(self) -> u16 {
        self.0 as u16
    }
}

impl fmt::Debug for DmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

impl fmt::Display for DmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Most bytes in one guest → host message: Linux sends from one 4 KiB page and receives into one
/// ("Guest sequence" steps 1 and 5); the driver never builds a bigger message.
pub const MAX_GUEST_MESSAGE_SIZE: usize = 4096;

/// Most page ranges in one BALLOON_RESPONSE: (4096 − 16) / 8 = 510, so the message fits [`MAX_GUEST_MESSAGE_SIZE`].
pub const MAX_RANGES_PER_BALLOON_RESPONSE: usize =
    (MAX_GUEST_MESSAGE_SIZE - size_of::<BalloonResponseHeader>()) / size_of::<WirePageRange>();

/// The 8-byte header that starts every DM message ("Wire format": Header).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct DmHeader {
    /// The [`DmMessageType`] value.
    pub message_type: U16,
    /// Size of the whole message in bytes, header included.
    pub size: U16,
    /// Transaction id, manufactured by the guest for its messages; QEMU echoes it in VERSION_RESPONSE and
    /// CAPABILITIES_RESPONSE and numbers its own requests from 0 after a reset.
    pub trans_id: U32,
}

impl DmHeader {
    /// A header for a message of `message_type` and `size` bytes.
    pub const fn new(message_type: DmMessageType, size: u16, trans_id: u32) -> DmHeader {
        DmHeader { message_type: U16::new(message_type.0), size: U16::new(size), trans_id: U32::new(trans_id) }
    }

    /// The message type this header announces.
    pub const fn message_type(&self) -> DmMessageType {
        DmMessageType(self.message_type.get())
    }
}

/// One range of 4 KiB guest pages as the wire packs it: bits 0–39 first PFN, bits 40–63 page count.
#[repr(transparent)]
#[derive(Copy, Clone, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct WirePageRange(pub U64);

/// Largest first PFN a [`WirePageRange`] can carry (40 bits).
pub const WIRE_MAX_START_PAGE: u64 = (1 << 40) - 1;
/// Largest page count a [`WirePageRange`] can carry (24 bits).
pub const WIRE_MAX_PAGE_COUNT: u64 = (1 << 24) - 1;

impl WirePageRange {
    /// Packs `range`, or `None` when its start or count does not fit the 40/24-bit fields.
    pub fn new(range: PageRange) -> Option<WirePageRange> {
        if range.start > WIRE_MAX_START_PAGE || range.count > WIRE_MAX_PAGE_COUNT {
            return None;
        }
        Some(WirePageRange(U64::new(range.start | (range.count << 40))))
    }

    /// The first PFN (bits 0–39).
    pub fn start_page(self) -> u64 {
        self.0.get() & WIRE_MAX_START_PAGE
    }

    /// The page count (bits 40–63).
    pub fn page_count(self) -> u64 {
        self.0.get() >> 40
    }

    /// The range as a [`PageRange`].
    pub fn range(self) -> PageRange {
        PageRange { start: self.start_page(), count: self.page_count() }
    }
}

impl fmt::Debug for WirePageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.range(), f)
    }
}

/// VERSION_REQUEST (1), guest → host, 16 bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct VersionRequest {
    /// Header; type 1.
    pub header: DmHeader,
    /// The proposed [`DmVersion`] (minor u16 at 8, major u16 at 10).
    pub version: U32,
    /// Bit 0: is_last_attempt (the guest proposes nothing after this one); the rest reserved zero.
    pub flags: U32,
}

/// VERSION_RESPONSE (2), host → guest, 16 bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct VersionResponse {
    /// Header; type 2.
    pub header: DmHeader,
    /// Bit 0: is_accepted; the rest reserved.
    pub flags: U64,
}

impl VersionResponse {
    /// Whether the host accepted the proposed version.
    pub fn is_accepted(&self) -> bool {
        self.flags.get() & 1 != 0
    }
}

/// The capability bits of a [`CapabilitiesReport`] (bit 0 balloon, bit 1 hot add, bits 2–5 hot-add alignment as
/// 2^n MiB, bit 6 hot remove (QEMU header)).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// The guest can give pages back (balloon).
    pub balloon: bool,
    /// The guest can take hot-added memory.
    pub hot_add: bool,
    /// Hot-added ranges must be aligned to 2^`hot_add_alignment_log2_mib` MiB (0..=15).
    pub hot_add_alignment_log2_mib: u8,
    /// The guest supports hot remove (protocol 2.0).
    pub hot_remove: bool,
}

impl Capabilities {
    /// The packed `caps` field.
    pub fn to_bits(self) -> u64 {
        u64::from(self.balloon)
            | u64::from(self.hot_add) << 1
            | u64::from(self.hot_add_alignment_log2_mib & 0xF) << 2
            | u64::from(self.hot_remove) << 6
    }

    /// Unpacks a `caps` field; reserved bits are dropped.
    pub fn from_bits(bits: u64) -> Capabilities {
        Capabilities {
            balloon: bits & 1 != 0,
            hot_add: bits & 2 != 0,
            hot_add_alignment_log2_mib: ((bits >> 2) & 0xF) as u8,
            hot_remove: bits & 0x40 != 0,
        }
    }
}

/// CAPABILITIES_REPORT (3), guest → host, 32 bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct CapabilitiesReport {
    /// Header; type 3.
    pub header: DmHeader,
    /// [`Capabilities`] bits.
    pub caps: U64,
    /// Smallest size the guest wants to be kept at, in pages (Linux: 0).
    pub min_page_count: U64,
    /// Highest page number the guest can use (Linux: all ones).
    pub max_page_number: U64,
}

/// CAPABILITIES_RESPONSE (4), host → guest, 16 bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct CapabilitiesResponse {
    /// Header; type 4.
    pub header: DmHeader,
    /// Bit 0 is_accepted, bit 1 hot_remove, bit 2 suppress_pressure_reports (QEMU header); the rest reserved.
    pub flags: U64,
}

impl CapabilitiesResponse {
    /// Whether the host accepted the capabilities (if not, the guest must stop the service).
    pub fn is_accepted(&self) -> bool {
        self.flags.get() & 1 != 0
    }

    /// The host supports hot remove.
    pub fn hot_remove(&self) -> bool {
        self.flags.get() & 2 != 0
    }

    /// The host does not want STATUS_REPORTs (QEMU: set when `status-report=off`).
    pub fn suppress_pressure_reports(&self) -> bool {
        self.flags.get() & 4 != 0
    }
}

/// STATUS_REPORT (5), guest → host, 48 bytes, no reply. Counts are pages.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct StatusReport {
    /// Header; type 5.
    pub header: DmHeader,
    /// Pages available to the guest.
    pub num_available: U64,
    /// Pages committed (the figure the host's pressure logic uses).
    pub num_committed: U64,
    /// Page file size (Windows-specific; 0 here).
    pub page_file_size: U64,
    /// Zero and free pages (Windows-specific; 0 here).
    pub zero_free: U64,
    /// Page-file writes (Windows-specific; 0 here).
    pub page_file_writes: U32,
    /// File-cache efficiency indicator (Windows-specific; 0 here).
    pub io_diff: U32,
}

/// BALLOON_REQUEST (6), host → guest, 16 bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct BalloonRequest {
    /// Header; type 6.
    pub header: DmHeader,
    /// Pages the host asks for (QEMU: at most 585 728 per request).
    pub num_pages: U32,
    /// Reserved.
    pub reserved: U32,
}

/// BALLOON_RESPONSE (7), guest → host: this 16-byte head, then `range_count` [`WirePageRange`]s.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct BalloonResponseHeader {
    /// Header; type 7.
    pub header: DmHeader,
    /// Reserved zero.
    pub reserved: U32,
    /// Bit 0 more_pages (another response of this transaction follows), bits 1–31 range_count.
    pub flags: U32,
}

impl BalloonResponseHeader {
    /// Packs `more_pages` and `range_count` (which must be < 2^31) into `flags`.
    pub fn pack_flags(more_pages: bool, range_count: u32) -> u32 {
        u32::from(more_pages) | (range_count << 1)
    }

    /// Bit 0 of `flags`.
    pub fn more_pages(&self) -> bool {
        self.flags.get() & 1 != 0
    }

    /// Bits 1–31 of `flags`.
    pub fn range_count(&self) -> u32 {
        self.flags.get() >> 1
    }
}

/// UNBALLOON_REQUEST (8), host → guest: this 16-byte head, then `range_count` [`WirePageRange`]s.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct UnballoonRequestHeader {
    /// Header; type 8.
    pub header: DmHeader,
    /// Bit 0 more_pages (another request of this transaction follows); the rest reserved.
    pub flags: U32,
    /// Number of ranges after this head.
    pub range_count: U32,
}

/// UNBALLOON_RESPONSE (9), guest → host, header only (8 bytes).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct UnballoonResponse {
    /// Header; type 9.
    pub header: DmHeader,
}

/// MEM_HOT_ADD_REQUEST (10), host → guest, 16 bytes; followed by a `region` [`WirePageRange`] when the message is
/// 24 bytes. ⚠ QEMU's header declares only `range`, but QEMU's host sends the 24-byte form (range and region
/// equal); Linux reads the region when present.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HotAddRequest {
    /// Header; type 10.
    pub header: DmHeader,
    /// The pages to add.
    pub range: WirePageRange,
}

/// MEM_HOT_ADD_REQUEST with its region, 24 bytes (the form QEMU sends).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HotAddRequestWithRegion {
    /// Header; type 10.
    pub header: DmHeader,
    /// The pages to add.
    pub range: WirePageRange,
    /// The region the pages belong to.
    pub region: WirePageRange,
}

/// MEM_HOT_ADD_RESPONSE (11), guest → host, 16 bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HotAddResponse {
    /// Header; type 11.
    pub header: DmHeader,
    /// Pages taken. Fewer than offered tells the host not to try further hot adds.
    pub page_count: U32,
    /// [`HOT_ADD_RESULT_SUCCESS`] or [`HOT_ADD_RESULT_TRANSIENT_FAILURE`].
    pub result: U32,
}

/// `result` of a [`HotAddResponse`]: success (possibly with fewer pages than offered).
pub const HOT_ADD_RESULT_SUCCESS: u32 = 1;
/// `result` of a [`HotAddResponse`]: transient failure (the host may retry).
pub const HOT_ADD_RESULT_TRANSIENT_FAILURE: u32 = 0;

/// INFO_MESSAGE (12), host → guest: this 16-byte head, then `info_size` bytes of [`InfoItemHeader`] + data items.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct InfoMessageHeader {
    /// Header; type 12.
    pub header: DmHeader,
    /// Reserved.
    pub reserved: U32,
    /// Bytes of items after this head.
    pub info_size: U32,
}

/// One item of an INFO_MESSAGE: type, data size, then `data_size` bytes.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct InfoItemHeader {
    /// [`INFO_TYPE_MAX_PAGE_COUNT`] or another (unknown) type.
    pub info_type: U32,
    /// Bytes of data after this item head.
    pub data_size: U32,
}

/// Info item type 0: the most pages the VM may have, a u64.
pub const INFO_TYPE_MAX_PAGE_COUNT: u32 = 0;

/// MEM_HOT_REMOVE_REQUEST (13), host → guest, 24 bytes (QEMU header). Only sent to guests that report hot remove.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HotRemoveRequest {
    /// Header; type 13.
    pub header: DmHeader,
    /// NUMA node.
    pub virtual_node: U32,
    /// Pages to remove.
    pub page_count: U32,
    /// Quality-of-service flags (bit 0 large, bit 1 local).
    pub qos_flags: U32,
    /// Reserved.
    pub reserved: U32,
}

/// MEM_HOT_REMOVE_RESPONSE (14), guest → host: this 24-byte head, then ranges (QEMU header). Defined for completeness;
/// this driver never reports hot remove and so never sends it.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HotRemoveResponseHeader {
    /// Header; type 14.
    pub header: DmHeader,
    /// Result.
    pub result: U32,
    /// Number of ranges after this head.
    pub range_count: U32,
    /// Bit 0 more_pages.
    pub flags: U64,
}

/// Why a received payload is not a valid DM message ([`parse_host_message`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DmParseError {
    /// Shorter than the 8-byte header.
    NoHeader {
        /// Payload length.
        len: usize,
    },
    /// The header's `size` is below 8 or beyond the payload.
    BadSize {
        /// The message type.
        message_type: DmMessageType,
        /// The header's `size`.
        size: u16,
        /// Payload length.
        len: usize,
    },
    /// The message is shorter than its type's struct plus the ranges or info it announces.
    TooShort {
        /// The message type.
        message_type: DmMessageType,
        /// The header's `size`.
        size: usize,
        /// The length needed.
        needed: u64,
    },
}

impl fmt::Display for DmParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmParseError::NoHeader { len } => write!(f, "DM message of {len} bytes has no 8-byte header"),
            DmParseError::BadSize { message_type, size, len } => {
                write!(f, "{message_type} announces {size} bytes in a payload of {len}")
            }
            DmParseError::TooShort { message_type, size, needed } => {
                write!(f, "{message_type} of {size} bytes is shorter than the {needed} it needs")
            }
        }
    }
}

/// The ranges carried by an UNBALLOON_REQUEST, borrowed from the received bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct WireRanges<'a>(pub &'a [WirePageRange]);

impl<'a> WireRanges<'a> {
    /// The ranges, unpacked.
    pub fn iter(&self) -> impl Iterator<Item = PageRange> + 'a {
        self.0.iter().map(|range| range.range())
    }

    /// How many ranges there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A validated message from the host, or a type the guest does not expect from a host.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HostMessage<'a> {
    /// VERSION_RESPONSE.
    VersionResponse {
        /// The header's transaction id (QEMU echoes the request's).
        trans_id: u32,
        /// is_accepted.
        accepted: bool,
    },
    /// CAPABILITIES_RESPONSE.
    CapabilitiesResponse {
        /// The header's transaction id.
        trans_id: u32,
        /// is_accepted.
        accepted: bool,
        /// The host supports hot remove.
        hot_remove: bool,
        /// The host does not want status reports.
        suppress_pressure_reports: bool,
    },
    /// BALLOON_REQUEST.
    BalloonRequest {
        /// The host's transaction id.
        trans_id: u32,
        /// Pages asked for.
        num_pages: u32,
    },
    /// UNBALLOON_REQUEST.
    UnballoonRequest {
        /// The host's transaction id.
        trans_id: u32,
        /// Another request of this transaction follows.
        more_pages: bool,
        /// The pages given back.
        ranges: WireRanges<'a>,
    },
    /// MEM_HOT_ADD_REQUEST.
    HotAddRequest {
        /// The host's transaction id.
        trans_id: u32,
        /// The pages offered.
        range: PageRange,
        /// The region, when the 24-byte form was sent.
        region: Option<PageRange>,
    },
    /// INFO_MESSAGE; `max_page_count` is the value of its first well-formed type-0 item, if any.
    Info {
        /// The host's transaction id.
        trans_id: u32,
        /// The most pages the VM may have.
        max_page_count: Option<u64>,
        /// Items that were not a well-formed max-page-count item (unknown types, wrong sizes, truncated).
        other_items: u32,
    },
    /// MEM_HOT_REMOVE_REQUEST.
    HotRemoveRequest {
        /// The host's transaction id.
        trans_id: u32,
        /// Pages the host wants removed.
        page_count: u32,
    },
    /// ERROR, a guest → host type, or an unknown type: nothing a guest acts on.
    Unexpected {
        /// The type.
        message_type: DmMessageType,
        /// The header's transaction id.
        trans_id: u32,
    },
}

fn read_prefix<T: FromBytes + KnownLayout + Immutable>(
    message: &[u8],
    message_type: DmMessageType,
) -> Result<T, DmParseError> {
    T::read_from_prefix(message).map(|(value, _)| value).map_err(|_| DmParseError::TooShort {
        message_type,
        size: message.len(),
        needed: size_of::<T>() as u64,
    })
}

/// Validates a received in-band packet payload as a DM message from the host (size policy in the module docs).
pub fn parse_host_message(payload: &[u8]) -> Result<HostMessage<'_>, DmParseError> {
    let (header, _) = DmHeader::read_from_prefix(payload).map_err(|_| DmParseError::NoHeader { len: payload.len() })?;
    let message_type = header.message_type();
    let size = header.size.get();
    if usize::from(size) < size_of::<DmHeader>() || usize::from(size) > payload.len() {
        return Err(DmParseError::BadSize { message_type, size, len: payload.len() });
    }
    let message = &payload[..usize::from(size)];
    let trans_id = header.trans_id.get();
    Ok(match message_type {
        DmMessageType::VERSION_RESPONSE => {
            let response: VersionResponse = read_prefix(message, message_type)?;
            HostMessage::VersionResponse { trans_id, accepted: response.is_accepted() }
        }
        DmMessageType::CAPABILITIES_RESPONSE => {
            let response: CapabilitiesResponse = read_prefix(message, message_type)?;
            HostMessage::CapabilitiesResponse {
                trans_id,
                accepted: response.is_accepted(),
                hot_remove: response.hot_remove(),
                suppress_pressure_reports: response.suppress_pressure_reports(),
            }
        }
        DmMessageType::BALLOON_REQUEST => {
            let request: BalloonRequest = read_prefix(message, message_type)?;
            HostMessage::BalloonRequest { trans_id, num_pages: request.num_pages.get() }
        }
        DmMessageType::UNBALLOON_REQUEST => {
            let head: UnballoonRequestHeader = read_prefix(message, message_type)?;
            let count = head.range_count.get();
            let needed = size_of::<UnballoonRequestHeader>() as u64 + 8 * u64::from(count);
            let too_short = DmParseError::TooShort { message_type, size: message.len(), needed };
            if (message.len() as u64) < needed {
                return Err(too_short);
            }
            let body = &message[size_of::<UnballoonRequestHeader>()..];
            let (ranges, _) =
                <[WirePageRange]>::ref_from_prefix_with_elems(body, count as usize).map_err(|_| too_short)?;
            HostMessage::UnballoonRequest {
                trans_id,
                more_pages: head.flags.get() & 1 != 0,
                ranges: WireRanges(ranges),
            }
        }
        DmMessageType::MEM_HOT_ADD_REQUEST => {
            let request: HotAddRequest = read_prefix(message, message_type)?;
            let region = HotAddRequestWithRegion::read_from_prefix(message).ok().map(|(full, _)| full.region.range());
            HostMessage::HotAddRequest { trans_id, range: request.range.range(), region }
        }
        DmMessageType::INFO_MESSAGE => {
            let head: InfoMessageHeader = read_prefix(message, message_type)?;
            let needed = size_of::<InfoMessageHeader>() as u64 + u64::from(head.info_size.get());
            if (message.len() as u64) < needed {
                return Err(DmParseError::TooShort { message_type, size: message.len(), needed });
            }
            let end = size_of::<InfoMessageHeader>() + head.info_size.get() as usize;
            let (max_page_count, other_items) = parse_info_items(&message[size_of::<InfoMessageHeader>()..end]);
            HostMessage::Info { trans_id, max_page_count, other_items }
        }
        DmMessageType::MEM_HOT_REMOVE_REQUEST => {
            let request: HotRemoveRequest = read_prefix(message, message_type)?;
            HostMessage::HotRemoveRequest { trans_id, page_count: request.page_count.get() }
        }
        _ => HostMessage::Unexpected { message_type, trans_id },
    })
}

/// Walks the items of an INFO_MESSAGE: the first well-formed max-page-count item and the number of other items
/// (a truncated trailing item counts as one other item).
fn parse_info_items(mut items: &[u8]) -> (Option<u64>, u32) {
    let mut max_page_count = None;
    let mut other_items = 0u32;
    while !items.is_empty() {
        let Ok((item, rest)) = InfoItemHeader::read_from_prefix(items) else {
            other_items = other_items.saturating_add(1);
            break;
        };
        let data_size = item.data_size.get() as usize;
        let Some(data) = rest.get(..data_size) else {
            other_items = other_items.saturating_add(1);
            break;
        };
        match (item.info_type.get(), U64::read_from_bytes(data)) {
            (INFO_TYPE_MAX_PAGE_COUNT, Ok(value)) if max_page_count.is_none() => max_page_count = Some(value.get()),
            _ => other_items = other_items.saturating_add(1),
        }
        items = &rest[data_size..];
    }
    (max_page_count, other_items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn header_layout() {
        assert_eq!(size_of::<DmHeader>(), 8);
        assert_eq!(offset_of!(DmHeader, message_type), 0);
        assert_eq!(offset_of!(DmHeader, size), 2);
        assert_eq!(offset_of!(DmHeader, trans_id), 4);
    }

    #[test]
    fn version_layouts() {
        assert_eq!(size_of::<VersionRequest>(), 16);
        assert_eq!(offset_of!(VersionRequest, header), 0);
        assert_eq!(offset_of!(VersionRequest, version), 8);
        assert_eq!(offset_of!(VersionRequest, flags), 12);
        assert_eq!(size_of::<VersionResponse>(), 16);
        assert_eq!(offset_of!(VersionResponse, header), 0);
        assert_eq!(offset_of!(VersionResponse, flags), 8);
        // minor u16 at 8, major u16 at 10.
        let request = VersionRequest {
            header: DmHeader::new(DmMessageType::VERSION_REQUEST, 16, 1),
            version: U32::new(DmVersion::V2_0.0),
            flags: U32::new(1),
        };
        assert_eq!(&request.as_bytes()[8..16], &[0, 0, 2, 0, 1, 0, 0, 0]);
        assert_eq!((DmVersion::V0_3.major(), DmVersion::V0_3.minor()), (0, 3));
        assert_eq!(DmVersion::V1_0.0, 0x10000);
        assert_eq!(format!("{}", DmVersion::V2_0), "2.0");
    }

    #[test]
    fn capabilities_layouts() {
        assert_eq!(size_of::<CapabilitiesReport>(), 32);
        assert_eq!(offset_of!(CapabilitiesReport, header), 0);
        assert_eq!(offset_of!(CapabilitiesReport, caps), 8);
        assert_eq!(offset_of!(CapabilitiesReport, min_page_count), 16);
        assert_eq!(offset_of!(CapabilitiesReport, max_page_number), 24);
        assert_eq!(size_of::<CapabilitiesResponse>(), 16);
        assert_eq!(offset_of!(CapabilitiesResponse, header), 0);
        assert_eq!(offset_of!(CapabilitiesResponse, flags), 8);
    }

    #[test]
    fn capability_bits() {
        let caps = Capabilities { balloon: true, hot_add: true, hot_add_alignment_log2_mib: 7, hot_remove: false };
        assert_eq!(caps.to_bits(), 1 | 2 | 7 << 2);
        assert_eq!(Capabilities::from_bits(caps.to_bits()), caps);
        let all = Capabilities::from_bits(u64::MAX);
        assert_eq!(
            all,
            Capabilities { balloon: true, hot_add: true, hot_add_alignment_log2_mib: 15, hot_remove: true }
        );
        assert_eq!(all.to_bits(), 0x7F);
    }

    #[test]
    fn status_report_layout() {
        assert_eq!(size_of::<StatusReport>(), 48);
        assert_eq!(offset_of!(StatusReport, header), 0);
        assert_eq!(offset_of!(StatusReport, num_available), 8);
        assert_eq!(offset_of!(StatusReport, num_committed), 16);
        assert_eq!(offset_of!(StatusReport, page_file_size), 24);
        assert_eq!(offset_of!(StatusReport, zero_free), 32);
        assert_eq!(offset_of!(StatusReport, page_file_writes), 40);
        assert_eq!(offset_of!(StatusReport, io_diff), 44);
    }

    #[test]
    fn balloon_layouts() {
        assert_eq!(size_of::<BalloonRequest>(), 16);
        assert_eq!(offset_of!(BalloonRequest, header), 0);
        assert_eq!(offset_of!(BalloonRequest, num_pages), 8);
        assert_eq!(offset_of!(BalloonRequest, reserved), 12);
        assert_eq!(size_of::<BalloonResponseHeader>(), 16);
        assert_eq!(offset_of!(BalloonResponseHeader, header), 0);
        assert_eq!(offset_of!(BalloonResponseHeader, reserved), 8);
        assert_eq!(offset_of!(BalloonResponseHeader, flags), 12);
        assert_eq!(BalloonResponseHeader::pack_flags(true, 510), 1021);
        assert_eq!(MAX_RANGES_PER_BALLOON_RESPONSE, 510);
        assert_eq!(16 + 8 * MAX_RANGES_PER_BALLOON_RESPONSE, MAX_GUEST_MESSAGE_SIZE);
    }

    #[test]
    fn unballoon_layouts() {
        assert_eq!(size_of::<UnballoonRequestHeader>(), 16);
        assert_eq!(offset_of!(UnballoonRequestHeader, header), 0);
        assert_eq!(offset_of!(UnballoonRequestHeader, flags), 8);
        assert_eq!(offset_of!(UnballoonRequestHeader, range_count), 12);
        assert_eq!(size_of::<UnballoonResponse>(), 8);
        assert_eq!(offset_of!(UnballoonResponse, header), 0);
    }

    #[test]
    fn hot_add_layouts() {
        assert_eq!(size_of::<HotAddRequest>(), 16);
        assert_eq!(offset_of!(HotAddRequest, header), 0);
        assert_eq!(offset_of!(HotAddRequest, range), 8);
        assert_eq!(size_of::<HotAddRequestWithRegion>(), 24);
        assert_eq!(offset_of!(HotAddRequestWithRegion, range), 8);
        assert_eq!(offset_of!(HotAddRequestWithRegion, region), 16);
        assert_eq!(size_of::<HotAddResponse>(), 16);
        assert_eq!(offset_of!(HotAddResponse, header), 0);
        assert_eq!(offset_of!(HotAddResponse, page_count), 8);
        assert_eq!(offset_of!(HotAddResponse, result), 12);
    }

    #[test]
    fn info_and_hot_remove_layouts() {
        assert_eq!(size_of::<InfoMessageHeader>(), 16);
        assert_eq!(offset_of!(InfoMessageHeader, reserved), 8);
        assert_eq!(offset_of!(InfoMessageHeader, info_size), 12);
        assert_eq!(size_of::<InfoItemHeader>(), 8);
        assert_eq!(offset_of!(InfoItemHeader, info_type), 0);
        assert_eq!(offset_of!(InfoItemHeader, data_size), 4);
        assert_eq!(size_of::<HotRemoveRequest>(), 24);
        assert_eq!(offset_of!(HotRemoveRequest, virtual_node), 8);
        assert_eq!(offset_of!(HotRemoveRequest, page_count), 12);
        assert_eq!(offset_of!(HotRemoveRequest, qos_flags), 16);
        assert_eq!(offset_of!(HotRemoveRequest, reserved), 20);
        assert_eq!(size_of::<HotRemoveResponseHeader>(), 24);
        assert_eq!(offset_of!(HotRemoveResponseHeader, result), 8);
        assert_eq!(offset_of!(HotRemoveResponseHeader, range_count), 12);
        assert_eq!(offset_of!(HotRemoveResponseHeader, flags), 16);
    }

    #[test]
    fn page_range_packing() {
        assert_eq!(size_of::<WirePageRange>(), 8);
        let wire = WirePageRange::new(PageRange { start: 0x12_3456_789A, count: 0xAB_CDEF }).unwrap();
        assert_eq!(wire.0.get(), 0xABCD_EF12_3456_789A);
        assert_eq!(wire.start_page(), 0x12_3456_789A);
        assert_eq!(wire.page_count(), 0xAB_CDEF);
        assert!(WirePageRange::new(PageRange { start: 1 << 40, count: 1 }).is_none());
        assert!(WirePageRange::new(PageRange { start: 0, count: 1 << 24 }).is_none());
    }

    #[test]
    fn message_type_names_are_open() {
        assert_eq!(DmMessageType(12).name(), Some("INFO_MESSAGE"));
        assert_eq!(DmMessageType(15).name(), None);
        assert_eq!(format!("{:?}", DmMessageType(999)), "DmMessageType(999)");
    }

    fn message(message_type: DmMessageType, trans_id: u32, body: &[u8]) -> Vec<u8> {
        let mut bytes = DmHeader::new(message_type, (8 + body.len()) as u16, trans_id).as_bytes().to_vec();
        bytes.extend_from_slice(body);
        bytes
    }

    #[test]
    fn parses_each_host_message() {
        let bytes = message(DmMessageType::VERSION_RESPONSE, 5, &1u64.to_le_bytes());
        assert_eq!(parse_host_message(&bytes), Ok(HostMessage::VersionResponse { trans_id: 5, accepted: true }));

        let bytes = message(DmMessageType::CAPABILITIES_RESPONSE, 6, &7u64.to_le_bytes());
        assert_eq!(
            parse_host_message(&bytes),
            Ok(HostMessage::CapabilitiesResponse {
                trans_id: 6,
                accepted: true,
                hot_remove: true,
                suppress_pressure_reports: true
            })
        );

        let mut body = 300u32.to_le_bytes().to_vec();
        body.extend_from_slice(&[0; 4]);
        let bytes = message(DmMessageType::BALLOON_REQUEST, 0, &body);
        assert_eq!(parse_host_message(&bytes), Ok(HostMessage::BalloonRequest { trans_id: 0, num_pages: 300 }));

        let range = WirePageRange::new(PageRange { start: 100, count: 3 }).unwrap();
        let mut body = 1u32.to_le_bytes().to_vec();
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(range.as_bytes());
        let bytes = message(DmMessageType::UNBALLOON_REQUEST, 2, &body);
        match parse_host_message(&bytes) {
            Ok(HostMessage::UnballoonRequest { trans_id: 2, more_pages: true, ranges }) => {
                assert_eq!(ranges.iter().collect::<Vec<_>>(), vec![PageRange { start: 100, count: 3 }]);
            }
            other => panic!("unexpected {other:?}"),
        }

        let region = WirePageRange::new(PageRange { start: 0x100000, count: 0x80000 }).unwrap();
        let bytes = message(DmMessageType::MEM_HOT_ADD_REQUEST, 3, region.as_bytes());
        assert_eq!(
            parse_host_message(&bytes),
            Ok(HostMessage::HotAddRequest { trans_id: 3, range: region.range(), region: None })
        );
        let mut body = region.as_bytes().to_vec();
        body.extend_from_slice(region.as_bytes());
        let bytes = message(DmMessageType::MEM_HOT_ADD_REQUEST, 3, &body);
        assert_eq!(
            parse_host_message(&bytes),
            Ok(HostMessage::HotAddRequest { trans_id: 3, range: region.range(), region: Some(region.range()) })
        );

        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&(16u32 + 9).to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&8u32.to_le_bytes());
        body.extend_from_slice(&262144u64.to_le_bytes());
        body.extend_from_slice(&[9, 0, 0, 0, 1, 0, 0, 0, 0xAA]);
        let bytes = message(DmMessageType::INFO_MESSAGE, 4, &body);
        assert_eq!(
            parse_host_message(&bytes),
            Ok(HostMessage::Info { trans_id: 4, max_page_count: Some(262144), other_items: 1 })
        );

        let bytes =
            message(DmMessageType::MEM_HOT_REMOVE_REQUEST, 9, &[0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_host_message(&bytes), Ok(HostMessage::HotRemoveRequest { trans_id: 9, page_count: 10 }));

        for unexpected in [0u16, 1, 3, 5, 7, 9, 11, 14, 15, 0xFFFF] {
            let bytes = message(DmMessageType(unexpected), 1, &[]);
            assert_eq!(
                parse_host_message(&bytes),
                Ok(HostMessage::Unexpected { message_type: DmMessageType(unexpected), trans_id: 1 })
            );
        }
    }

    #[test]
    fn rejects_malformed_messages() {
        assert_eq!(parse_host_message(&[1, 0, 8]), Err(DmParseError::NoHeader { len: 3 }));
        // size below the header, size beyond the payload
        let mut bytes = message(DmMessageType::VERSION_RESPONSE, 0, &1u64.to_le_bytes());
        bytes[2] = 4;
        assert!(matches!(parse_host_message(&bytes), Err(DmParseError::BadSize { size: 4, .. })));
        bytes[2] = 17;
        assert!(matches!(parse_host_message(&bytes), Err(DmParseError::BadSize { size: 17, .. })));
        // each fixed-size type one byte short
        for (message_type, full) in [(2u16, 16usize), (4, 16), (6, 16), (8, 16), (10, 16), (12, 16), (13, 24)] {
            let bytes = message(DmMessageType(message_type), 0, &vec![0; full - 9]);
            assert!(
                matches!(parse_host_message(&bytes), Err(DmParseError::TooShort { needed, .. }) if needed == full as u64),
                "type {message_type}"
            );
        }
        // padding after `size` is ignored: a 16-byte message in a 24-byte payload
        let mut padded = message(DmMessageType::VERSION_RESPONSE, 0, &1u64.to_le_bytes());
        padded.extend_from_slice(&[0xFF; 8]);
        assert_eq!(parse_host_message(&padded), Ok(HostMessage::VersionResponse { trans_id: 0, accepted: true }));
        // an unballoon request announcing more ranges than it carries
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        body.extend_from_slice(&[0; 8]);
        let bytes = message(DmMessageType::UNBALLOON_REQUEST, 0, &body);
        assert!(matches!(
            parse_host_message(&bytes),
            Err(DmParseError::TooShort { needed, .. }) if needed == 16 + 8 * u64::from(u32::MAX)
        ));
        // an info message announcing more bytes than it carries
        let mut body = 0u32.to_le_bytes().to_vec();
        body.extend_from_slice(&100u32.to_le_bytes());
        let bytes = message(DmMessageType::INFO_MESSAGE, 0, &body);
        assert!(matches!(parse_host_message(&bytes), Err(DmParseError::TooShort { needed: 116, .. })));
    }
}
