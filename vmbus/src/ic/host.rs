//! Host-side (server) device models of the integration services: they produce what a Hyper-V host sends — the
//! NEGOTIATE request, then heartbeats, time samples, shutdown requests, KVP pool queries — and check the guest's
//! answers. For tests and for the in-kernel loopback bus; no I/O, bytes in and out like the guest services.
//!
//! Reference: `hyperv-vmbus.md` §7; message shapes as OpenVMM's `hyperv_ic` devices send them (NEGOTIATE with
//! flags TRANSACTION | REQUEST and zero header versions, later messages carrying the negotiated versions). Guest
//! answers are untrusted: every check returns an error, never panics.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use super::framing::{FrameError, IcFrame, MessageFields, build_message};
use super::heartbeat::{HEARTBEAT_BODY_SIZE, decode_heartbeat};
use super::kvp::{KvpEntry, read_utf16_field, write_utf16_field};
use super::negotiate::{
    FRAMEWORK_VERSIONS, HEARTBEAT_VERSIONS, KVP_VERSIONS, NegotiatedVersions, SHUTDOWN_VERSIONS, TIMESYNC_VERSIONS,
    VersionPreferences, negotiate_request, parse_negotiate_response,
};
use super::timesync::{TIMESYNC_VERSION_4, TimeSampleKind, WindowsTime};
use super::wire::{
    ApplicationState, HeartbeatMessage, IcFlags, IcMessageType, IcStatus, KvpDeleteMessage, KvpEnumerateMessage,
    KvpGetSetMessage, KvpHeader, KvpOperation, KvpPool, KvpValueType, SHUTDOWN_MESSAGE_TEXT_SIZE, ShutdownFlags,
    ShutdownMessage, TimeSyncFlags, TimeSyncMessageV1, TimeSyncMessageV4,
};

/// Why a guest's answer (or a request the model was asked to make) is wrong.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum HostModelError {
    /// Not a well-formed IC message.
    Frame(FrameError),
    /// A request other than NEGOTIATE before negotiation succeeded.
    NotNegotiated,
    /// An answer with no request outstanding.
    NothingPending,
    /// The answer lacks the RESPONSE flag.
    NotAResponse,
    /// The answer's type is not the request's.
    WrongType {
        /// The request's type.
        expected: IcMessageType,
        /// The answer's.
        got: IcMessageType,
    },
    /// The answer's transaction id is not the request's.
    WrongTransaction {
        /// The request's id.
        expected: u8,
        /// The answer's.
        got: u8,
    },
    /// The guest gave the empty NEGOTIATE answer (or a malformed one).
    NegotiationRejected,
    /// The guest chose a version the host did not offer.
    VersionNotOffered(NegotiatedVersions),
    /// The answer's body is too short or inconsistent.
    BadBody,
    /// A heartbeat answer whose sequence number is not the request's plus one.
    WrongSequence {
        /// Request's sequence number plus one.
        expected: u64,
        /// The answer's.
        got: u64,
    },
    /// The answer carries a failure status where success was required.
    Status(IcStatus),
}

impl fmt::Display for HostModelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IC host model: {self:?}")
    }
}

impl core::error::Error for HostModelError {}

impl From<FrameError> for HostModelError {
    fn from(e: FrameError) -> Self {
        HostModelError::Frame(e)
    }
}

/// A request the model sent and waits to see answered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Pending {
    message_type: IcMessageType,
    transaction_id: u8,
}

/// The host's end of one IC channel: negotiation, transaction ids, and the checks every answer goes through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostIcChannel {
    service_type: IcMessageType,
    offered: VersionPreferences,
    negotiated: Option<NegotiatedVersions>,
    next_transaction: u8,
    pending: Option<Pending>,
}

impl HostIcChannel {
    /// A channel of the service whose messages have type `service_type`, offering `offered` in NEGOTIATE.
    pub const fn new(service_type: IcMessageType, offered: VersionPreferences) -> HostIcChannel {
        HostIcChannel { service_type, offered, negotiated: None, next_transaction: 0, pending: None }
    }

    /// The versions agreed, once negotiated.
    pub fn negotiated(&self) -> Option<NegotiatedVersions> {
        self.negotiated
    }

    fn take_transaction(&mut self) -> u8 {
        let id = self.next_transaction;
        self.next_transaction = self.next_transaction.wrapping_add(1);
        id
    }

    /// The NEGOTIATE request (starts over: versions in force are forgotten).
    pub fn negotiate_request(&mut self) -> Vec<u8> {
        self.negotiated = None;
        let transaction_id = self.take_transaction();
        self.pending = Some(Pending { message_type: IcMessageType::NEGOTIATE, transaction_id });
        negotiate_request(self.offered.framework, self.offered.message, transaction_id)
    }

    /// Check the guest's NEGOTIATE answer; on success the channel is ready.
    pub fn accept_negotiate_response(&mut self, payload: &[u8]) -> Result<NegotiatedVersions, HostModelError> {
        let frame = self.accept_response(payload)?;
        let versions = parse_negotiate_response(frame.body).ok_or(HostModelError::NegotiationRejected)?;
        if !self.offered.framework.contains(&versions.framework) || !self.offered.message.contains(&versions.message) {
            return Err(HostModelError::VersionNotOffered(versions));
        }
        self.negotiated = Some(versions);
        Ok(versions)
    }

    /// A service request with `body`; flags TRANSACTION | REQUEST when `expect_response`, else none (as OpenVMM's
    /// timesync sends samples).
    pub fn request(&mut self, body: &[u8], expect_response: bool) -> Result<Vec<u8>, HostModelError> {
        let versions = self.negotiated.ok_or(HostModelError::NotNegotiated)?;
        let transaction_id = self.take_transaction();
        let flags = if expect_response { IcFlags::TRANSACTION | IcFlags::REQUEST } else { IcFlags::empty() };
        if expect_response {
            self.pending = Some(Pending { message_type: self.service_type, transaction_id });
        }
        let fields = MessageFields {
            framework_version: versions.framework,
            message_type: self.service_type,
            message_version: versions.message,
            status: IcStatus::OK,
            transaction_id,
            flags,
        };
        Ok(build_message(&fields, body))
    }

    /// Check that `payload` answers the outstanding request (RESPONSE flag, type, transaction id); it is then no
    /// longer outstanding.
    pub fn accept_response<'a>(&mut self, payload: &'a [u8]) -> Result<IcFrame<'a>, HostModelError> {
        let frame = IcFrame::parse(payload)?;
        let pending = self.pending.ok_or(HostModelError::NothingPending)?;
        if !frame.header.flags().contains(IcFlags::RESPONSE) {
            return Err(HostModelError::NotAResponse);
        }
        if frame.header.message_type() != pending.message_type {
            return Err(HostModelError::WrongType { expected: pending.message_type, got: frame.header.message_type() });
        }
        if frame.header.transaction_id != pending.transaction_id {
            return Err(HostModelError::WrongTransaction {
                expected: pending.transaction_id,
                got: frame.header.transaction_id,
            });
        }
        self.pending = None;
        Ok(frame)
    }
}

/// How often the heartbeat model is meant to be polled, in milliseconds (§7: the host sends one every ~2 s).
pub const HEARTBEAT_INTERVAL_MS: u64 = 2_000;
/// How often the timesync model is meant to send a SAMPLE, in milliseconds (OpenVMM's timesync device: 5 s).
pub const TIMESYNC_SAMPLE_INTERVAL_MS: u64 = 5_000;

/// A sans-I/O periodic timer for driving the models: the caller passes its own monotonic time.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Interval {
    period: u64,
    next_due: u64,
}

impl Interval {
    /// A timer firing first at `start`, then every `period` (a period of 0 is taken as 1).
    pub const fn new(start: u64, period: u64) -> Interval {
        Interval { period: if period == 0 { 1 } else { period }, next_due: start }
    }

    /// Whether the timer fired by `now`; if so the next deadline is one period after `now`'s slot (missed slots are
    /// dropped, not replayed).
    pub fn poll(&mut self, now: u64) -> bool {
        if now < self.next_due {
            return false;
        }
        let missed = (now - self.next_due) / self.period;
        self.next_due = self.next_due.saturating_add((missed + 1).saturating_mul(self.period));
        true
    }

    /// The next deadline.
    pub fn next_due(&self) -> u64 {
        self.next_due
    }
}

/// What the host learnt from a heartbeat answer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatObservation {
    /// The sequence number answered (request + 1).
    pub sequence: u64,
    /// The state reported, when the body had room for it.
    pub state: Option<ApplicationState>,
}

/// Host model of the heartbeat service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatHost {
    /// The channel (negotiation and checks).
    pub ic: HostIcChannel,
    next_sequence: u64,
    outstanding: Option<u64>,
}

impl Default for HeartbeatHost {
    fn default() -> Self {
        HeartbeatHost::new()
    }
}

impl HeartbeatHost {
    /// A model offering the §7 heartbeat versions, starting at sequence 0.
    pub const fn new() -> HeartbeatHost {
        HeartbeatHost::with_versions(VersionPreferences { framework: FRAMEWORK_VERSIONS, message: HEARTBEAT_VERSIONS })
    }

    /// A model offering `offered`.
    pub const fn with_versions(offered: VersionPreferences) -> HeartbeatHost {
        HeartbeatHost { ic: HostIcChannel::new(IcMessageType::HEARTBEAT, offered), next_sequence: 0, outstanding: None }
    }

    /// The next heartbeat (16-byte body, OpenVMM's layout).
    pub fn next_request(&mut self) -> Result<Vec<u8>, HostModelError> {
        let message = HeartbeatMessage {
            sequence_number: U64::new(self.next_sequence),
            application_state: U32::ZERO,
            reserved: [0; 4],
        };
        let request = self.ic.request(message.as_bytes(), true)?;
        self.outstanding = Some(self.next_sequence);
        self.next_sequence = self.next_sequence.wrapping_add(1);
        Ok(request)
    }

    /// Check the answer to the last heartbeat.
    pub fn check_response(&mut self, payload: &[u8]) -> Result<HeartbeatObservation, HostModelError> {
        let frame = self.ic.accept_response(payload)?;
        let sent = self.outstanding.take().ok_or(HostModelError::NothingPending)?;
        if frame.header.status() != IcStatus::OK {
            return Err(HostModelError::Status(frame.header.status()));
        }
        if frame.body.len() < HEARTBEAT_BODY_SIZE {
            return Err(HostModelError::BadBody);
        }
        let (sequence, state) = decode_heartbeat(frame.body).ok_or(HostModelError::BadBody)?;
        let expected = sent.wrapping_add(1);
        if sequence != expected {
            return Err(HostModelError::WrongSequence { expected, got: sequence });
        }
        Ok(HeartbeatObservation { sequence, state })
    }
}

/// A shutdown request as the host models it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownSpec {
    /// Flags (force, restart, hibernate).
    pub flags: ShutdownFlags,
    /// Reason code.
    pub reason_code: u32,
    /// Seconds granted.
    pub timeout_seconds: u32,
    /// Display text (stored as bytes, cut to fit with a NUL).
    pub message: String,
}

/// Host model of the shutdown service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownHost {
    /// The channel (negotiation and checks).
    pub ic: HostIcChannel,
}

impl Default for ShutdownHost {
    fn default() -> Self {
        ShutdownHost::new()
    }
}

impl ShutdownHost {
    /// A model offering the §7 shutdown versions.
    pub const fn new() -> ShutdownHost {
        ShutdownHost::with_versions(VersionPreferences { framework: FRAMEWORK_VERSIONS, message: SHUTDOWN_VERSIONS })
    }

    /// A model offering `offered`.
    pub const fn with_versions(offered: VersionPreferences) -> ShutdownHost {
        ShutdownHost { ic: HostIcChannel::new(IcMessageType::SHUTDOWN, offered) }
    }

    /// The shutdown request (full 2060-byte body).
    pub fn request(&mut self, spec: &ShutdownSpec) -> Result<Vec<u8>, HostModelError> {
        let mut message = ShutdownMessage::new_zeroed();
        message.reason_code = U32::new(spec.reason_code);
        message.timeout_seconds = U32::new(spec.timeout_seconds);
        message.flags = U32::new(spec.flags.bits());
        let text = spec.message.as_bytes();
        let n = text.len().min(SHUTDOWN_MESSAGE_TEXT_SIZE - 1);
        message.display_message[..n].copy_from_slice(&text[..n]);
        self.ic.request(message.as_bytes(), true)
    }

    /// Check the answer; returns its status (S_OK: the guest will act; a failure: it refused).
    pub fn check_response(&mut self, payload: &[u8]) -> Result<IcStatus, HostModelError> {
        Ok(self.ic.accept_response(payload)?.header.status())
    }
}

/// The clocks a timesync host reads.
pub trait HostClock {
    /// Wall-clock time now.
    fn wall_time(&self) -> WindowsTime;
    /// Partition reference time now (100 ns ticks).
    fn reference_time(&self) -> u64;
}

/// A fixed clock, for tests and for a loopback bus without a real-time source.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct FixedClock {
    /// The wall time returned.
    pub wall: WindowsTime,
    /// The reference time returned.
    pub reference: u64,
}

impl HostClock for FixedClock {
    fn wall_time(&self) -> WindowsTime {
        self.wall
    }
    fn reference_time(&self) -> u64 {
        self.reference
    }
}

/// Host model of the timesync service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeSyncHost {
    /// The channel (negotiation and checks).
    pub ic: HostIcChannel,
}

impl Default for TimeSyncHost {
    fn default() -> Self {
        TimeSyncHost::new()
    }
}

impl TimeSyncHost {
    /// A model offering the §7 timesync versions.
    pub const fn new() -> TimeSyncHost {
        TimeSyncHost::with_versions(VersionPreferences { framework: FRAMEWORK_VERSIONS, message: TIMESYNC_VERSIONS })
    }

    /// A model offering `offered`.
    pub const fn with_versions(offered: VersionPreferences) -> TimeSyncHost {
        TimeSyncHost { ic: HostIcChannel::new(IcMessageType::TIMESYNC, offered) }
    }

    /// A sample of `clock` in the negotiated layout (v4 with the reference time, else v1), flagged as `kind`;
    /// `expect_response` sets TRANSACTION | REQUEST.
    pub fn sample(
        &mut self,
        clock: &dyn HostClock,
        kind: TimeSampleKind,
        expect_response: bool,
    ) -> Result<Vec<u8>, HostModelError> {
        let versions = self.ic.negotiated().ok_or(HostModelError::NotNegotiated)?;
        let flags = match kind {
            TimeSampleKind::Sync => TimeSyncFlags::SYNC,
            TimeSampleKind::Sample => TimeSyncFlags::SAMPLE,
            TimeSampleKind::Probe => TimeSyncFlags::empty(),
        };
        let wall = clock.wall_time().0;
        if versions.message >= TIMESYNC_VERSION_4 {
            let message = TimeSyncMessageV4 {
                parent_time: U64::new(wall),
                vm_reference_time: U64::new(clock.reference_time()),
                flags: flags.bits(),
                leap_flags: 0,
                stratum: 0,
                reserved: [0; 5],
            };
            self.ic.request(message.as_bytes(), expect_response)
        } else {
            let message = TimeSyncMessageV1 {
                parent_time: U64::new(wall),
                child_time: U64::ZERO,
                round_trip_time: U64::ZERO,
                flags: flags.bits(),
            };
            self.ic.request(message.as_bytes(), expect_response)
        }
    }

    /// Check the answer to a sample sent with `expect_response`.
    pub fn check_response(&mut self, payload: &[u8]) -> Result<IcStatus, HostModelError> {
        Ok(self.ic.accept_response(payload)?.header.status())
    }
}

/// The guest's answer to a KVP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvpAnswer {
    /// Status: S_OK, S_CONT (no such entry) or a failure.
    pub status: IcStatus,
    /// For ENUMERATE and GET with S_OK: the entry (GET answers carry the key asked for).
    pub entry: Option<KvpEntry>,
}

/// One step of a pool query ([`KvpHost::start_pool_query`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolQueryStep {
    /// Send this next ENUMERATE.
    Next(Vec<u8>),
    /// The guest reported the end: every entry of the pool, in index order.
    Done(Vec<KvpEntry>),
}

/// Most entries a pool query collects before it stops asking (a guest that never says "end" cannot keep the host
/// busy forever).
pub const MAX_QUERY_ENTRIES: usize = 256;

/// Host model of the KVP service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvpHost {
    /// The channel (negotiation and checks).
    pub ic: HostIcChannel,
    pending: Option<(KvpOperation, Option<String>)>,
    query: Option<(KvpPool, u32, Vec<KvpEntry>)>,
}

impl Default for KvpHost {
    fn default() -> Self {
        KvpHost::new()
    }
}

impl KvpHost {
    /// A model offering the §7 KVP versions.
    pub const fn new() -> KvpHost {
        KvpHost::with_versions(VersionPreferences { framework: FRAMEWORK_VERSIONS, message: KVP_VERSIONS })
    }

    /// A model offering `offered`.
    pub const fn with_versions(offered: VersionPreferences) -> KvpHost {
        KvpHost { ic: HostIcChannel::new(IcMessageType::KVP, offered), pending: None, query: None }
    }

    fn header(operation: KvpOperation, pool: KvpPool) -> KvpHeader {
        KvpHeader { operation: operation.0, pool: pool.0, pad: U16::ZERO }
    }

    /// ENUMERATE `index` of `pool` (full 2580-byte body, as Hyper-V sends).
    pub fn enumerate(&mut self, pool: KvpPool, index: u32) -> Result<Vec<u8>, HostModelError> {
        let mut message = KvpEnumerateMessage::new_zeroed();
        message.header = KvpHost::header(KvpOperation::ENUMERATE, pool);
        message.index = U32::new(index);
        let request = self.ic.request(message.as_bytes(), true)?;
        self.pending = Some((KvpOperation::ENUMERATE, None));
        Ok(request)
    }

    /// GET `key` from `pool`.
    pub fn get(&mut self, pool: KvpPool, key: &str) -> Result<Vec<u8>, HostModelError> {
        let mut message = KvpGetSetMessage::new_zeroed();
        message.header = KvpHost::header(KvpOperation::GET, pool);
        message.data.key_size = U32::new(write_utf16_field(key, &mut message.data.key));
        let request = self.ic.request(message.as_bytes(), true)?;
        self.pending = Some((KvpOperation::GET, Some(key.into())));
        Ok(request)
    }

    /// SET `key` = `value` (string) in `pool`.
    pub fn set(&mut self, pool: KvpPool, key: &str, value: &str) -> Result<Vec<u8>, HostModelError> {
        let mut message = KvpGetSetMessage::new_zeroed();
        message.header = KvpHost::header(KvpOperation::SET, pool);
        message.data.value_type = U32::new(KvpValueType::STRING.0);
        message.data.key_size = U32::new(write_utf16_field(key, &mut message.data.key));
        message.data.value_size = U32::new(write_utf16_field(value, &mut message.data.value));
        let request = self.ic.request(message.as_bytes(), true)?;
        self.pending = Some((KvpOperation::SET, None));
        Ok(request)
    }

    /// DELETE `key` from `pool`.
    pub fn delete(&mut self, pool: KvpPool, key: &str) -> Result<Vec<u8>, HostModelError> {
        let mut message = KvpDeleteMessage::new_zeroed();
        message.header = KvpHost::header(KvpOperation::DELETE, pool);
        message.key_size = U32::new(write_utf16_field(key, &mut message.key));
        let request = self.ic.request(message.as_bytes(), true)?;
        self.pending = Some((KvpOperation::DELETE, None));
        Ok(request)
    }

    /// Check and decode the answer to the last request.
    pub fn check_response(&mut self, payload: &[u8]) -> Result<KvpAnswer, HostModelError> {
        let frame = self.ic.accept_response(payload)?;
        let (operation, asked_key) = self.pending.take().ok_or(HostModelError::NothingPending)?;
        let status = frame.header.status();
        if status != IcStatus::OK {
            return Ok(KvpAnswer { status, entry: None });
        }
        let entry = match operation {
            KvpOperation::ENUMERATE => {
                let (m, _) = KvpEnumerateMessage::read_from_prefix(frame.body).map_err(|_| HostModelError::BadBody)?;
                Some(KvpEntry {
                    key: read_utf16_field(&m.data.key, m.data.key_size.get()),
                    value: read_utf16_field(&m.data.value, m.data.value_size.get()),
                })
            }
            KvpOperation::GET => {
                let (m, _) = KvpGetSetMessage::read_from_prefix(frame.body).map_err(|_| HostModelError::BadBody)?;
                Some(KvpEntry {
                    key: asked_key.unwrap_or_default(),
                    value: read_utf16_field(&m.data.value, m.data.value_size.get()),
                })
            }
            _ => None,
        };
        Ok(KvpAnswer { status, entry })
    }

    /// Start reading every entry of `pool`: the first ENUMERATE. Feed each answer to [`KvpHost::continue_pool_query`].
    pub fn start_pool_query(&mut self, pool: KvpPool) -> Result<Vec<u8>, HostModelError> {
        let request = self.enumerate(pool, 0)?;
        self.query = Some((pool, 0, Vec::new()));
        Ok(request)
    }

    /// Take the answer to the query's last ENUMERATE: the next request, or every entry once the guest answers
    /// S_CONT (or [`MAX_QUERY_ENTRIES`] is reached). Any other failure status is an error.
    pub fn continue_pool_query(&mut self, payload: &[u8]) -> Result<PoolQueryStep, HostModelError> {
        let answer = self.check_response(payload)?;
        let (pool, index, mut entries) = self.query.take().ok_or(HostModelError::NothingPending)?;
        match (answer.status, answer.entry) {
            (IcStatus::CONTINUE, _) => return Ok(PoolQueryStep::Done(entries)),
            (IcStatus::OK, Some(entry)) => entries.push(entry),
            (IcStatus::OK, None) => return Err(HostModelError::BadBody),
            (status, _) => return Err(HostModelError::Status(status)),
        }
        if entries.len() >= MAX_QUERY_ENTRIES {
            return Ok(PoolQueryStep::Done(entries));
        }
        let next = index.wrapping_add(1);
        let request = self.enumerate(pool, next)?;
        self.query = Some((pool, next, entries));
        Ok(PoolQueryStep::Next(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_fires_once_per_period_and_drops_missed_slots() {
        let mut timer = Interval::new(100, HEARTBEAT_INTERVAL_MS);
        assert!(!timer.poll(99));
        assert!(timer.poll(100));
        assert!(!timer.poll(2_099));
        assert!(timer.poll(2_100));
        assert_eq!(timer.next_due(), 4_100);
        assert!(timer.poll(9_000));
        assert_eq!(timer.next_due(), 10_100);
        let mut zero = Interval::new(0, 0);
        assert!(zero.poll(0) && zero.poll(1) && !zero.poll(1));
        let mut far = Interval::new(u64::MAX - 1, TIMESYNC_SAMPLE_INTERVAL_MS);
        assert!(far.poll(u64::MAX));
        assert_eq!(far.next_due(), u64::MAX);
    }

    #[test]
    fn requests_need_negotiation_first() {
        let mut host = ShutdownHost::new();
        let spec =
            ShutdownSpec { flags: ShutdownFlags::empty(), reason_code: 0, timeout_seconds: 0, message: String::new() };
        assert_eq!(host.request(&spec), Err(HostModelError::NotNegotiated));
        let mut kvp = KvpHost::new();
        assert_eq!(kvp.start_pool_query(KvpPool::AUTO), Err(HostModelError::NotNegotiated));
        let clock = FixedClock { wall: WindowsTime(0), reference: 0 };
        assert_eq!(TimeSyncHost::new().sample(&clock, TimeSampleKind::Sync, false), Err(HostModelError::NotNegotiated));
        assert_eq!(
            HeartbeatHost::new().check_response(&[]),
            Err(HostModelError::Frame(FrameError::Truncated { len: 0 }))
        );
    }
}
