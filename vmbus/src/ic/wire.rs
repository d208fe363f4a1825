//! Wire structs of the integration-component (IC) protocol: pipe header, IC message header, and the bodies of the
//! negotiate, heartbeat, shutdown, timesync and KVP messages.
//!
//! Reference: `hyperv-vmbus.md` §7. Every struct is built from little-endian, alignment-1 fields, so its Rust layout
//! is the packed C layout; the tests at the bottom pin every size and field offset. Checked against Linux
//! `include/linux/hyperv.h` and `include/uapi/linux/hyperv.h` (vmbuspipe_hdr, icmsg_hdr, icmsg_negotiate,
//! shutdown_msg_data, heartbeat_msg_data, ictimesync_data, ictimesync_ref_data, hv_kvp_msg) and OpenVMM
//! `hyperv_ic_protocol` / `vmbus_ring::PipeHeader`; where they disagree the item carries a ⚠ note.

use core::cmp::Ordering;
use core::fmt;

use bitflags::bitflags;
use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of [`PipeHeader`].
pub const PIPE_HEADER_SIZE: usize = 8;
/// Size of [`IcMessageHeader`].
pub const IC_HEADER_SIZE: usize = 20;
/// Offset of the message body in an IC packet: pipe header plus IC header (§7 "Frame": body at 28).
pub const IC_BODY_OFFSET: usize = PIPE_HEADER_SIZE + IC_HEADER_SIZE;

/// `packet_type` of a [`PipeHeader`] carrying a whole message (OpenVMM `PIPE_PACKET_TYPE_DATA`).
pub const PIPE_PACKET_TYPE_DATA: u32 = 1;

/// The pipe header in front of every IC message (§7 "Frame", offset 0).
///
/// Linux calls the fields `flags` and `msgsize` and echoes them untouched; OpenVMM's message pipe writes
/// `packet_type` = [`PIPE_PACKET_TYPE_DATA`] and `data_size` = the number of bytes after this header (the in-band
/// packet itself is padded to 8 bytes, so `data_size` is what tells the real message length).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct PipeHeader {
    /// Pipe packet type; [`PIPE_PACKET_TYPE_DATA`] for IC messages.
    pub packet_type: U32,
    /// Number of message bytes that follow this header.
    pub data_size: U32,
}

/// A major.minor version as the IC framework writes it (§7 "icverframe", "icvermsg", negotiate lists).
#[repr(C)]
#[derive(Copy, Clone, PartialEq, Eq, Hash, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct IcVersion {
    major: U16,
    minor: U16,
}

impl IcVersion {
    /// The version `major.minor`.
    pub const fn new(major: u16, minor: u16) -> IcVersion {
        IcVersion { major: U16::new(major), minor: U16::new(minor) }
    }

    /// The major number.
    pub const fn major(self) -> u16 {
        self.major.get()
    }

    /// The minor number.
    pub const fn minor(self) -> u16 {
        self.minor.get()
    }
}

impl PartialOrd for IcVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for IcVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major(), self.minor()).cmp(&(other.major(), other.minor()))
    }
}

impl fmt::Debug for IcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

impl fmt::Display for IcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// The IC message type (§7 "Types"). Open: any `u16` is representable.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IcMessageType(pub u16);

impl IcMessageType {
    /// 0: version negotiation.
    pub const NEGOTIATE: IcMessageType = IcMessageType(0);
    /// 1: heartbeat.
    pub const HEARTBEAT: IcMessageType = IcMessageType(1);
    /// 2: key-value pair exchange.
    pub const KVP: IcMessageType = IcMessageType(2);
    /// 3: shutdown request.
    pub const SHUTDOWN: IcMessageType = IcMessageType(3);
    /// 4: time synchronisation.
    pub const TIMESYNC: IcMessageType = IcMessageType(4);
    /// 5: volume shadow copy.
    pub const VSS: IcMessageType = IcMessageType(5);
    /// 7: ⚠ file copy in Linux, "guest interface" in OpenVMM.
    pub const FCOPY: IcMessageType = IcMessageType(7);

    /// The reference's name of a known type, `None` otherwise.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0 => "NEGOTIATE",
            1 => "HEARTBEAT",
            2 => "KVP",
            3 => "SHUTDOWN",
            4 => "TIMESYNC",
            5 => "VSS",
            7 => "FCOPY",
            _ => return None,
        })
    }
}

impl fmt::Debug for IcMessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}({})", self.0),
            None => write!(f, "IcMessageType({})", self.0),
        }
    }
}

/// An IC status code (HRESULT) in the message header (§7 "Status"). Open: any `u32` is representable.
#[derive(Copy, Clone, PartialEq, Eq, Hash)]
pub struct IcStatus(pub u32);

impl IcStatus {
    /// S_OK.
    pub const OK: IcStatus = IcStatus(0);
    /// E_FAIL.
    pub const FAIL: IcStatus = IcStatus(0x8000_4005);
    /// HRESULT of ERROR_NOT_SUPPORTED.
    pub const NOT_SUPPORTED: IcStatus = IcStatus(0x8007_0032);
    /// HRESULT of ERROR_MORE_DATA ("continue"), Linux `HV_S_CONT`: a KVP enumeration index past the end, a key
    /// that is not there (Linux uapi `hyperv.h`).
    pub const CONTINUE: IcStatus = IcStatus(0x8007_0103);
    /// E_INVALIDARG (Linux `HV_INVALIDARG`).
    pub const INVALID_ARGUMENT: IcStatus = IcStatus(0x8007_0057);

    /// Whether this is a success code (top bit clear).
    pub const fn is_success(self) -> bool {
        self.0 & 0x8000_0000 == 0
    }
}

impl fmt::Debug for IcStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            IcStatus::OK => "S_OK",
            IcStatus::FAIL => "E_FAIL",
            IcStatus::NOT_SUPPORTED => "NOT_SUPPORTED",
            IcStatus::CONTINUE => "S_CONT",
            IcStatus::INVALID_ARGUMENT => "INVALIDARG",
            _ => return write!(f, "IcStatus({:#010x})", self.0),
        };
        write!(f, "{name}({:#x})", self.0)
    }
}

bitflags! {
    /// `icflags` of the IC message header (§7 "Frame"). Unknown bits are kept.
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct IcFlags: u8 {
        /// 1: part of a request/response transaction.
        const TRANSACTION = 1;
        /// 2: a request.
        const REQUEST = 2;
        /// 4: a response.
        const RESPONSE = 4;
    }
}

/// The IC message header (§7 "Frame", offsets 8..28 of the packet; offsets here are relative to its start).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct IcMessageHeader {
    /// Framework version in use (`icverframe`).
    pub framework_version: IcVersion,
    /// Message type (`icmsgtype`), see [`IcMessageType`].
    pub message_type: U16,
    /// Message version in use (`icvermsg`).
    pub message_version: IcVersion,
    /// Size of the body after this header (`icmsgsize`).
    pub message_size: U16,
    /// Status of a response (`status`), see [`IcStatus`].
    pub status: U32,
    /// Transaction id echoed by the response (`ictransaction_id`).
    pub transaction_id: u8,
    /// [`IcFlags`] bits (`icflags`).
    pub flags: u8,
    /// Reserved, zero.
    pub reserved: [u8; 2],
}

impl IcMessageHeader {
    /// The message type as an open enum.
    pub fn message_type(&self) -> IcMessageType {
        IcMessageType(self.message_type.get())
    }

    /// The status as an open enum.
    pub fn status(&self) -> IcStatus {
        IcStatus(self.status.get())
    }

    /// The flags, unknown bits kept.
    pub fn flags(&self) -> IcFlags {
        IcFlags::from_bits_retain(self.flags)
    }
}

/// Most versions a negotiate message may list per kind (Linux `IC_VERSION_NEGOTIATION_MAX_VER_COUNT`).
pub const MAX_NEGOTIATE_VERSION_COUNT: u16 = 100;

/// The fixed part of a NEGOTIATE body (§7 "Negotiate body": offsets 28/30/32 of the packet); the framework
/// versions, then the message versions, follow as [`IcVersion`]s.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct NegotiateMessage {
    /// Number of framework versions listed first.
    pub framework_version_count: U16,
    /// Number of message versions listed after them.
    pub message_version_count: U16,
    /// Reserved, zero.
    pub reserved: U32,
}

/// The guest application state reported in a heartbeat answer (OpenVMM `ApplicationState`). Open.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ApplicationState(pub u32);

impl ApplicationState {
    /// 0: unknown.
    pub const UNKNOWN: ApplicationState = ApplicationState(0);
    /// 1: healthy.
    pub const HEALTHY: ApplicationState = ApplicationState(1);
    /// 2: critical error.
    pub const CRITICAL: ApplicationState = ApplicationState(2);
    /// 3: stopped.
    pub const STOPPED: ApplicationState = ApplicationState(3);
}

/// Heartbeat body (§7 "Heartbeat"): the host's sequence number, answered with `seq + 1`.
///
/// ⚠ OpenVMM: `application_state` u32 then 4 reserved bytes (16 bytes); Linux: `u32 reserved[8]` after the sequence
/// number (40 bytes) and never writes the state. The guest handler needs only the sequence number and writes the
/// state when the host's body has room for it.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct HeartbeatMessage {
    /// Sequence number.
    pub sequence_number: U64,
    /// [`ApplicationState`] of the guest (in answers).
    pub application_state: U32,
    /// Reserved.
    pub reserved: [u8; 4],
}

/// Size of the display message of a [`ShutdownMessage`].
pub const SHUTDOWN_MESSAGE_TEXT_SIZE: usize = 2048;

bitflags! {
    /// `flags` of a shutdown request (§7 "Shutdown"). Unknown bits are kept.
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct ShutdownFlags: u32 {
        /// Bit 0: forced (do not wait for applications).
        const FORCE = 1;
        /// Bit 1: restart instead of power off.
        const RESTART = 2;
        /// Bit 2: hibernate instead of power off.
        const HIBERNATE = 4;
    }
}

/// Shutdown body (§7 "Shutdown").
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ShutdownMessage {
    /// Reason code (Windows `SHTDN_REASON_*`).
    pub reason_code: U32,
    /// Seconds the guest has to comply.
    pub timeout_seconds: U32,
    /// [`ShutdownFlags`] bits.
    pub flags: U32,
    /// Text for the user; ⚠ its encoding is not documented by either source.
    pub display_message: [u8; SHUTDOWN_MESSAGE_TEXT_SIZE],
}

/// Bytes of a [`ShutdownMessage`] the guest needs (reason, timeout, flags).
pub const SHUTDOWN_FIXED_SIZE: usize = 12;

bitflags! {
    /// `flags` of a timesync message (§7 "Timesync"): no bit set is a probe. Unknown bits are kept.
    #[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
    pub struct TimeSyncFlags: u8 {
        /// 1: set the clock now (sent after boot/resume).
        const SYNC = 1;
        /// 2: a periodic sample for gradual adjustment.
        const SAMPLE = 2;
    }
}

/// Timesync body for message versions below 4 (Linux `ictimesync_data`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct TimeSyncMessageV1 {
    /// Host time, 100 ns units since 1601-01-01 UTC.
    pub parent_time: U64,
    /// Guest time (unused by the host in practice).
    pub child_time: U64,
    /// Round trip time.
    pub round_trip_time: U64,
    /// [`TimeSyncFlags`] bits.
    pub flags: u8,
}

/// Timesync body for message version 4 (§7 "Timesync v4", Linux `ictimesync_ref_data`): adds the partition
/// reference time at which the host sampled its clock, a leap indicator and a stratum.
///
/// ⚠ Linux has 3 reserved bytes (22 bytes in all), OpenVMM 5 (24); the guest handler needs only the first 19.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct TimeSyncMessageV4 {
    /// Host time, 100 ns units since 1601-01-01 UTC.
    pub parent_time: U64,
    /// Partition reference time (100 ns ticks) when `parent_time` was read.
    pub vm_reference_time: U64,
    /// [`TimeSyncFlags`] bits.
    pub flags: u8,
    /// Leap second indicator.
    pub leap_flags: u8,
    /// NTP-style stratum of the host clock.
    pub stratum: u8,
    /// Reserved.
    pub reserved: [u8; 5],
}

/// Bytes of a [`TimeSyncMessageV1`] the guest needs (through `flags`).
pub const TIMESYNC_V1_NEEDED: usize = 25;
/// Bytes of a [`TimeSyncMessageV4`] the guest needs (through `stratum`).
pub const TIMESYNC_V4_NEEDED: usize = 19;

/// KVP operation (Linux uapi `hv_kvp_exchg_op`). Open.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct KvpOperation(pub u8);

impl KvpOperation {
    /// 0: read the value of a key.
    pub const GET: KvpOperation = KvpOperation(0);
    /// 1: write a key.
    pub const SET: KvpOperation = KvpOperation(1);
    /// 2: delete a key.
    pub const DELETE: KvpOperation = KvpOperation(2);
    /// 3: read the entry at an index.
    pub const ENUMERATE: KvpOperation = KvpOperation(3);
    /// 4: read a network adapter's IP configuration.
    pub const GET_IP_INFO: KvpOperation = KvpOperation(4);
    /// 5: write a network adapter's IP configuration.
    pub const SET_IP_INFO: KvpOperation = KvpOperation(5);
}

/// KVP pool (Linux uapi `hv_kvp_exchg_pool`). Open.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvpPool(pub u8);

impl KvpPool {
    /// 0: data the host pushes to the guest.
    pub const EXTERNAL: KvpPool = KvpPool(0);
    /// 1: data the guest publishes.
    pub const GUEST: KvpPool = KvpPool(1);
    /// 2: intrinsic guest data generated by the guest (OS name, version...), what Hyper-V Manager shows.
    pub const AUTO: KvpPool = KvpPool(2);
    /// 3: intrinsic data the host pushes (host name, VM name...).
    pub const AUTO_EXTERNAL: KvpPool = KvpPool(3);
    /// 4: internal.
    pub const AUTO_INTERNAL: KvpPool = KvpPool(4);
}

/// KVP value type (Linux uapi `REG_SZ`, `REG_U32`, `REG_U64`). Open.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct KvpValueType(pub u32);

impl KvpValueType {
    /// 1: UTF-16 string.
    pub const STRING: KvpValueType = KvpValueType(1);
    /// 4: u32.
    pub const U32: KvpValueType = KvpValueType(4);
    /// 8: u64.
    pub const U64: KvpValueType = KvpValueType(8);
}

/// Size of a KVP key buffer in bytes (Linux `HV_KVP_EXCHANGE_MAX_KEY_SIZE`).
pub const KVP_MAX_KEY_SIZE: usize = 512;
/// Size of a KVP value buffer in bytes (Linux `HV_KVP_EXCHANGE_MAX_VALUE_SIZE`).
pub const KVP_MAX_VALUE_SIZE: usize = 2048;

/// The header of every KVP body (Linux `hv_kvp_hdr`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct KvpHeader {
    /// [`KvpOperation`].
    pub operation: u8,
    /// [`KvpPool`].
    pub pool: u8,
    /// Padding.
    pub pad: U16,
}

/// One key and value (Linux `hv_kvp_exchg_msg_value`). Strings are UTF-16LE; sizes are in bytes and include the
/// terminating NUL.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct KvpExchangeValue {
    /// [`KvpValueType`].
    pub value_type: U32,
    /// Bytes of `key` in use.
    pub key_size: U32,
    /// Bytes of `value` in use.
    pub value_size: U32,
    /// The key.
    pub key: [u8; KVP_MAX_KEY_SIZE],
    /// The value.
    pub value: [u8; KVP_MAX_VALUE_SIZE],
}

/// KVP ENUMERATE body (Linux `hv_kvp_msg` with `hv_kvp_msg_enumerate`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct KvpEnumerateMessage {
    /// Operation and pool.
    pub header: KvpHeader,
    /// Index of the entry asked for.
    pub index: U32,
    /// The entry (filled by the guest).
    pub data: KvpExchangeValue,
}

/// KVP GET or SET body (Linux `hv_kvp_msg` with `hv_kvp_msg_get` / `hv_kvp_msg_set`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct KvpGetSetMessage {
    /// Operation and pool.
    pub header: KvpHeader,
    /// Key (and for SET, or in a GET answer, the value).
    pub data: KvpExchangeValue,
}

/// KVP DELETE body (Linux `hv_kvp_msg` with `hv_kvp_msg_delete`).
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct KvpDeleteMessage {
    /// Operation and pool.
    pub header: KvpHeader,
    /// Bytes of `key` in use.
    pub key_size: U32,
    /// The key.
    pub key: [u8; KVP_MAX_KEY_SIZE],
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn pipe_and_ic_header_layout() {
        assert_eq!(size_of::<PipeHeader>(), PIPE_HEADER_SIZE);
        assert_eq!(offset_of!(PipeHeader, packet_type), 0);
        assert_eq!(offset_of!(PipeHeader, data_size), 4);
        assert_eq!(size_of::<IcVersion>(), 4);
        assert_eq!(offset_of!(IcVersion, major), 0);
        assert_eq!(offset_of!(IcVersion, minor), 2);
        // Packet offsets of §7 are 8 more than these.
        assert_eq!(size_of::<IcMessageHeader>(), IC_HEADER_SIZE);
        assert_eq!(offset_of!(IcMessageHeader, framework_version), 0);
        assert_eq!(offset_of!(IcMessageHeader, message_type), 4);
        assert_eq!(offset_of!(IcMessageHeader, message_version), 6);
        assert_eq!(offset_of!(IcMessageHeader, message_size), 10);
        assert_eq!(offset_of!(IcMessageHeader, status), 12);
        assert_eq!(offset_of!(IcMessageHeader, transaction_id), 16);
        assert_eq!(offset_of!(IcMessageHeader, flags), 17);
        assert_eq!(offset_of!(IcMessageHeader, reserved), 18);
        assert_eq!(IC_BODY_OFFSET, 28);
    }

    #[test]
    fn negotiate_and_heartbeat_layout() {
        assert_eq!(size_of::<NegotiateMessage>(), 8);
        assert_eq!(offset_of!(NegotiateMessage, framework_version_count), 0);
        assert_eq!(offset_of!(NegotiateMessage, message_version_count), 2);
        assert_eq!(offset_of!(NegotiateMessage, reserved), 4);
        assert_eq!(size_of::<HeartbeatMessage>(), 16);
        assert_eq!(offset_of!(HeartbeatMessage, sequence_number), 0);
        assert_eq!(offset_of!(HeartbeatMessage, application_state), 8);
        assert_eq!(offset_of!(HeartbeatMessage, reserved), 12);
    }

    #[test]
    fn shutdown_layout() {
        assert_eq!(size_of::<ShutdownMessage>(), 2060);
        assert_eq!(offset_of!(ShutdownMessage, reason_code), 0);
        assert_eq!(offset_of!(ShutdownMessage, timeout_seconds), 4);
        assert_eq!(offset_of!(ShutdownMessage, flags), 8);
        assert_eq!(offset_of!(ShutdownMessage, display_message), SHUTDOWN_FIXED_SIZE);
    }

    #[test]
    fn timesync_layout() {
        assert_eq!(size_of::<TimeSyncMessageV1>(), 25);
        assert_eq!(offset_of!(TimeSyncMessageV1, parent_time), 0);
        assert_eq!(offset_of!(TimeSyncMessageV1, child_time), 8);
        assert_eq!(offset_of!(TimeSyncMessageV1, round_trip_time), 16);
        assert_eq!(offset_of!(TimeSyncMessageV1, flags), 24);
        assert_eq!(size_of::<TimeSyncMessageV4>(), 24);
        assert_eq!(offset_of!(TimeSyncMessageV4, parent_time), 0);
        assert_eq!(offset_of!(TimeSyncMessageV4, vm_reference_time), 8);
        assert_eq!(offset_of!(TimeSyncMessageV4, flags), 16);
        assert_eq!(offset_of!(TimeSyncMessageV4, leap_flags), 17);
        assert_eq!(offset_of!(TimeSyncMessageV4, stratum), 18);
        assert_eq!(offset_of!(TimeSyncMessageV4, reserved), 19);
    }

    #[test]
    fn kvp_layout() {
        assert_eq!(size_of::<KvpHeader>(), 4);
        assert_eq!(offset_of!(KvpHeader, operation), 0);
        assert_eq!(offset_of!(KvpHeader, pool), 1);
        assert_eq!(offset_of!(KvpHeader, pad), 2);
        assert_eq!(size_of::<KvpExchangeValue>(), 12 + 512 + 2048);
        assert_eq!(offset_of!(KvpExchangeValue, value_type), 0);
        assert_eq!(offset_of!(KvpExchangeValue, key_size), 4);
        assert_eq!(offset_of!(KvpExchangeValue, value_size), 8);
        assert_eq!(offset_of!(KvpExchangeValue, key), 12);
        assert_eq!(offset_of!(KvpExchangeValue, value), 524);
        assert_eq!(size_of::<KvpEnumerateMessage>(), 2580);
        assert_eq!(offset_of!(KvpEnumerateMessage, header), 0);
        assert_eq!(offset_of!(KvpEnumerateMessage, index), 4);
        assert_eq!(offset_of!(KvpEnumerateMessage, data), 8);
        assert_eq!(size_of::<KvpGetSetMessage>(), 2576);
        assert_eq!(offset_of!(KvpGetSetMessage, header), 0);
        assert_eq!(offset_of!(KvpGetSetMessage, data), 4);
        assert_eq!(size_of::<KvpDeleteMessage>(), 520);
        assert_eq!(offset_of!(KvpDeleteMessage, header), 0);
        assert_eq!(offset_of!(KvpDeleteMessage, key_size), 4);
        assert_eq!(offset_of!(KvpDeleteMessage, key), 8);
    }

    #[test]
    fn versions_order_by_major_then_minor() {
        assert!(IcVersion::new(3, 2) > IcVersion::new(3, 1));
        assert!(IcVersion::new(4, 0) > IcVersion::new(3, 9));
        assert_eq!(IcVersion::new(3, 1).as_bytes(), &[3, 0, 1, 0]);
        assert_eq!(format!("{}", IcVersion::new(3, 2)), "3.2");
    }

    #[test]
    fn open_enums_keep_unknown_values() {
        assert_eq!(format!("{:?}", IcMessageType(9)), "IcMessageType(9)");
        assert_eq!(format!("{:?}", IcMessageType::TIMESYNC), "TIMESYNC(4)");
        assert_eq!(format!("{:?}", IcStatus(0x1234)), "IcStatus(0x00001234)");
        assert!(IcStatus::OK.is_success());
        assert!(!IcStatus::CONTINUE.is_success());
        assert_eq!(IcFlags::from_bits_retain(0x85).bits(), 0x85);
        assert_eq!(ShutdownFlags::from_bits_retain(0x10).bits(), 0x10);
    }
}
