//! Server-side device runners for the loopback host: the integration services (heartbeat, shutdown, timesync, KVP)
//! and the example echo device, played by the host over the channels the guest opens on a [`LoopbackBus`].
//!
//! Reference: `hyperv-vmbus.md` §7 (framing, negotiation, the four services; the host sends a heartbeat every ~2 s)
//! and §8 (class GUIDs); issue 7 §4. The protocol logic is the sans-I/O host models of [`crate::ic::host`]; this
//! module adds the I/O: offers, the host's [`ServerEndpoint`] of each opened channel, timers, and the checks of the
//! guest's answers, whose results it keeps as [`DeviceReport`]s for tests and for the kernel to print.
//!
//! [`DeviceHost`] is driven from outside, like everything on the loopback bus: each [`DeviceHost::run`] (the kernel
//! calls it in every host turn, a test in its pump loop) takes the endpoints of newly opened channels and sends
//! NEGOTIATE on them, reads what the guest wrote, checks it, and sends what is due — heartbeats every
//! [`DeviceHostConfig::heartbeat_period_ns`], one timesync SYNC sample of the host's [`HostClock`] (then SAMPLEs if
//! [`DeviceHostConfig::timesync_period_ns`] says so), one query of the KVP AUTO pool, an asked-for shutdown, and pings
//! on the echo device. Writes signal the guest through the bus ([`GuestSignal`] of [`LoopbackBus`]), as the data path
//! does. A channel the guest closes, or the host rescinds, loses its endpoint; a reopened one is negotiated again.
//!
//! Guest answers are untrusted: a wrong one is counted in [`DeviceReport::errors`] with its reason, never a panic.

use super::endpoint::{EndpointError, ServerEndpoint};
use super::{GuestSignal, LoopbackBus, OfferSpec, ServerError};
use crate::ic::host::{
    HeartbeatHost, HeartbeatObservation, HostClock, HostModelError, KvpHost, PoolQueryStep, ShutdownHost, ShutdownSpec,
    TimeSyncHost,
};
use crate::ic::kvp::KvpEntry;
use crate::ic::negotiate::{NegotiatedVersions, VersionPreferences};
use crate::ic::timesync::{TimeSampleKind, WindowsTime};
use crate::ic::wire::{IcStatus, KvpPool, ShutdownFlags};
use crate::kmcl::echo::{ECHO_INTERFACE_TYPE, ECHO_VERSION};
use crate::memory::PageArena;
use crate::protocol::{Guid, device_class};
use crate::ring::{PacketType, RingError};
use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Answers to messages the host did not expect kept per device ([`DeviceReport::unexpected`]), newest last.
pub const KEPT_UNEXPECTED_ANSWERS: usize = 8;

/// The devices the host can play.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// Heartbeat integration service.
    Heartbeat,
    /// Shutdown integration service.
    Shutdown,
    /// Time synchronisation integration service.
    TimeSync,
    /// Key-value pair exchange integration service.
    Kvp,
    /// The example echo device of [`crate::kmcl::echo`].
    Echo,
}

impl DeviceKind {
    /// The four integration services, in the order the host offers them.
    pub const INTEGRATION_SERVICES: [DeviceKind; 4] =
        [DeviceKind::Heartbeat, DeviceKind::Shutdown, DeviceKind::TimeSync, DeviceKind::Kvp];

    /// The device class GUID (§8; the echo device's own for [`DeviceKind::Echo`]).
    pub const fn interface_type(self) -> Guid {
        match self {
            DeviceKind::Heartbeat => device_class::HEARTBEAT,
            DeviceKind::Shutdown => device_class::SHUTDOWN,
            DeviceKind::TimeSync => device_class::TIMESYNC,
            DeviceKind::Kvp => device_class::KVP,
            DeviceKind::Echo => ECHO_INTERFACE_TYPE,
        }
    }

    /// The instance GUID the loopback host gives its one device of this kind (made up; `4c4f4f50` is "LOOP").
    pub const fn default_instance(self) -> Guid {
        let index = match self {
            DeviceKind::Heartbeat => 1,
            DeviceKind::Shutdown => 2,
            DeviceKind::TimeSync => 3,
            DeviceKind::Kvp => 4,
            DeviceKind::Echo => 5,
        };
        Guid::from_fields(0x4c4f_4f50, 0x4943, 0x0001, [0, 0, 0, 0, 0, 0, 0, index])
    }

    /// A short name for logs.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceKind::Heartbeat => "heartbeat",
            DeviceKind::Shutdown => "shutdown",
            DeviceKind::TimeSync => "timesync",
            DeviceKind::Kvp => "kvp",
            DeviceKind::Echo => "echo",
        }
    }
}

/// One device to offer and play.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// What it is.
    pub kind: DeviceKind,
    /// Its instance GUID.
    pub instance: Guid,
    /// The versions offered in NEGOTIATE (`None`: the §7 lists of the host model). Ignored for the echo device.
    pub versions: Option<VersionPreferences>,
}

impl DeviceSpec {
    /// `kind` with its default instance and the §7 versions.
    pub const fn new(kind: DeviceKind) -> DeviceSpec {
        DeviceSpec { kind, instance: kind.default_instance(), versions: None }
    }

    /// The offer the host makes for this device: a plain offer (no pipe flags, not monitored), opens accepted by the
    /// bus once it has mapped the rings.
    pub fn offer_spec(&self) -> OfferSpec {
        OfferSpec::new(self.kind.interface_type(), self.instance)
    }
}

/// How the host paces its devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHostConfig {
    /// Time between heartbeats (Hyper-V: ~2 s, §7). The first goes right after negotiation.
    pub heartbeat_period_ns: u64,
    /// Time between timesync SAMPLEs after the first SYNC sample; `None`: only the SYNC sample.
    pub timesync_period_ns: Option<u64>,
    /// Send time samples with TRANSACTION | REQUEST and check the guest's answer (OpenVMM's host sends them without
    /// and reads none).
    pub timesync_expects_answer: bool,
    /// The KVP pool the host reads once negotiated.
    pub kvp_pool: KvpPool,
    /// Time between pings on the echo device.
    pub echo_period_ns: u64,
}

impl Default for DeviceHostConfig {
    fn default() -> Self {
        DeviceHostConfig {
            heartbeat_period_ns: 1_000_000_000,
            timesync_period_ns: None,
            timesync_expects_answer: false,
            kvp_pool: KvpPool::AUTO,
            echo_period_ns: 1_000_000_000,
        }
    }
}

/// What the host learnt from one device's service traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceDetail {
    /// Heartbeat.
    Heartbeat {
        /// Answers that checked out (sequence + 1).
        answered: u64,
        /// The last good answer.
        last: Option<HeartbeatObservation>,
        /// Periods that came while the previous heartbeat was still unanswered (no heartbeat sent then).
        late: u64,
    },
    /// Shutdown.
    Shutdown {
        /// The flags of the request sent, once sent.
        requested: Option<ShutdownFlags>,
        /// The guest's answer status.
        answer: Option<IcStatus>,
    },
    /// Timesync.
    TimeSync {
        /// Samples sent.
        samples_sent: u64,
        /// The wall time of the last sample sent.
        last_sent: Option<WindowsTime>,
        /// Answers checked (with [`DeviceHostConfig::timesync_expects_answer`]).
        answers: u64,
    },
    /// KVP.
    Kvp {
        /// Pool queries started.
        queries: u64,
        /// The entries of the last finished pool query, in index order.
        entries: Option<Vec<KvpEntry>>,
    },
    /// Echo device.
    Echo {
        /// Whether the guest's hello was answered with [`ECHO_VERSION`].
        hello_answered: bool,
        /// Pings sent.
        pings_sent: u64,
        /// Pings that came back unchanged.
        echoes: u64,
        /// Guest requests (pings of [`crate::kmcl::echo::EchoDriver::ping`]) completed with their payload.
        requests_completed: u64,
    },
}

impl DeviceDetail {
    fn new(kind: DeviceKind) -> DeviceDetail {
        match kind {
            DeviceKind::Heartbeat => DeviceDetail::Heartbeat { answered: 0, last: None, late: 0 },
            DeviceKind::Shutdown => DeviceDetail::Shutdown { requested: None, answer: None },
            DeviceKind::TimeSync => DeviceDetail::TimeSync { samples_sent: 0, last_sent: None, answers: 0 },
            DeviceKind::Kvp => DeviceDetail::Kvp { queries: 0, entries: None },
            DeviceKind::Echo => {
                DeviceDetail::Echo { hello_answered: false, pings_sent: 0, echoes: 0, requests_completed: 0 }
            }
        }
    }
}

/// A wrong guest answer or a failed host operation, as a device records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceError {
    /// The guest's answer failed the host model's checks.
    Model(HostModelError),
    /// The endpoint failed (a broken ring, a failed signal).
    Endpoint(EndpointError),
    /// A packet of a type the device does not take (only in-band data, and completions on the echo device).
    PacketType(PacketType),
}

/// What the host knows about one device, for tests and the kernel's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceReport {
    /// What it is.
    pub kind: DeviceKind,
    /// Its relid.
    pub relid: u32,
    /// Times the guest opened the channel (endpoints taken).
    pub opens: u64,
    /// Times the channel closed under the device (guest close, rescind, unload).
    pub closes: u64,
    /// Whether the host rescinded the device.
    pub rescinded: bool,
    /// The versions agreed in the last negotiation.
    pub negotiated: Option<NegotiatedVersions>,
    /// Why the last negotiation failed, if it did.
    pub negotiation_error: Option<HostModelError>,
    /// Packets sent.
    pub sent: u64,
    /// Packets received.
    pub received: u64,
    /// Times a send found the ring full (the packet waits for the next run).
    pub send_stalls: u64,
    /// Wrong answers and failed operations.
    pub errors: u64,
    /// The last of them.
    pub last_error: Option<DeviceError>,
    /// The last answers that matched no outstanding request (e.g. the answers to [`DeviceHost::inject`]), payloads
    /// as received (padded to 8 bytes), at most [`KEPT_UNEXPECTED_ANSWERS`].
    pub unexpected: VecDeque<Vec<u8>>,
    /// The service part.
    pub detail: DeviceDetail,
}

impl DeviceReport {
    /// One line for a log: kind, relid, versions, traffic and the service part.
    pub fn summary(&self) -> String {
        let versions = match (self.negotiated, self.negotiation_error) {
            (Some(v), _) => format!("framework {} message {}", v.framework, v.message),
            (None, Some(e)) => format!("negotiation failed: {e:?}"),
            (None, None) if self.kind == DeviceKind::Echo => String::from("no negotiation"),
            (None, None) => String::from("not negotiated"),
        };
        let detail = match &self.detail {
            DeviceDetail::Heartbeat { answered, last, late } => format!(
                "{answered} heartbeats answered (last seq {}), {late} late",
                last.map_or(String::from("-"), |o| format!("{}", o.sequence))
            ),
            DeviceDetail::Shutdown { requested, answer } => match (requested, answer) {
                (None, _) => String::from("no shutdown requested"),
                (Some(flags), None) => format!("shutdown {:#x} sent, no answer yet", flags.bits()),
                (Some(flags), Some(status)) => format!("shutdown {:#x} answered {:#x}", flags.bits(), status.0),
            },
            DeviceDetail::TimeSync { samples_sent, last_sent, .. } => format!(
                "{samples_sent} samples sent (last UNIX {} s)",
                last_sent.map_or(String::from("-"), |t| format!("{}", t.to_unix().seconds))
            ),
            DeviceDetail::Kvp { queries, entries } => match entries {
                Some(entries) => format!(
                    "{queries} pool queries, {} entries: {}",
                    entries.len(),
                    entries.iter().map(|e| format!("{}={}", e.key, e.value)).collect::<Vec<_>>().join(", ")
                ),
                None => format!("{queries} pool queries, none finished"),
            },
            DeviceDetail::Echo { hello_answered, pings_sent, echoes, requests_completed } => format!(
                "hello {}, {echoes}/{pings_sent} pings echoed, {requests_completed} requests completed",
                if *hello_answered { "answered" } else { "not seen" }
            ),
        };
        format!(
            "{} (relid {}): {versions}; {} sent, {} received, {} errors; {detail}",
            self.kind.name(),
            self.relid,
            self.sent,
            self.received,
            self.errors
        )
    }
}

/// The host model of an integration service.
enum Model {
    Heartbeat(HeartbeatHost),
    Shutdown(ShutdownHost),
    TimeSync(TimeSyncHost),
    Kvp(KvpHost),
    Echo,
}

impl Model {
    fn new(spec: &DeviceSpec) -> Model {
        match (spec.kind, spec.versions) {
            (DeviceKind::Heartbeat, Some(v)) => Model::Heartbeat(HeartbeatHost::with_versions(v)),
            (DeviceKind::Heartbeat, None) => Model::Heartbeat(HeartbeatHost::new()),
            (DeviceKind::Shutdown, Some(v)) => Model::Shutdown(ShutdownHost::with_versions(v)),
            (DeviceKind::Shutdown, None) => Model::Shutdown(ShutdownHost::new()),
            (DeviceKind::TimeSync, Some(v)) => Model::TimeSync(TimeSyncHost::with_versions(v)),
            (DeviceKind::TimeSync, None) => Model::TimeSync(TimeSyncHost::new()),
            (DeviceKind::Kvp, Some(v)) => Model::Kvp(KvpHost::with_versions(v)),
            (DeviceKind::Kvp, None) => Model::Kvp(KvpHost::new()),
            (DeviceKind::Echo, _) => Model::Echo,
        }
    }

    fn negotiate_request(&mut self) -> Option<Vec<u8>> {
        let ic = match self {
            Model::Heartbeat(m) => &mut m.ic,
            Model::Shutdown(m) => &mut m.ic,
            Model::TimeSync(m) => &mut m.ic,
            Model::Kvp(m) => &mut m.ic,
            Model::Echo => return None,
        };
        Some(ic.negotiate_request())
    }

    fn accept_negotiate_response(&mut self, payload: &[u8]) -> Result<NegotiatedVersions, HostModelError> {
        let ic = match self {
            Model::Heartbeat(m) => &mut m.ic,
            Model::Shutdown(m) => &mut m.ic,
            Model::TimeSync(m) => &mut m.ic,
            Model::Kvp(m) => &mut m.ic,
            Model::Echo => return Err(HostModelError::NothingPending),
        };
        ic.accept_negotiate_response(payload)
    }
}

/// Where a device's channel stands.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No open channel.
    Closed,
    /// NEGOTIATE sent, no answer yet.
    Negotiating,
    /// Negotiated (or, for the echo device, open).
    Ready,
    /// The guest refused every version, or answered NEGOTIATE wrongly: no more traffic until it reopens.
    Failed,
}

/// The answer a device waits for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Awaiting {
    Negotiate,
    Heartbeat,
    Shutdown,
    TimeSync,
    KvpQuery,
}

/// One packet to send.
enum Outgoing {
    /// In band, with a new transaction id.
    InBand(Vec<u8>),
    /// The completion of the guest's packet `transaction_id`.
    Completion(u64, Vec<u8>),
}

struct Device {
    spec: DeviceSpec,
    endpoint: Option<ServerEndpoint<PageArena>>,
    phase: Phase,
    model: Model,
    awaiting: Option<Awaiting>,
    outbox: VecDeque<Outgoing>,
    next_transaction: u64,
    /// Next heartbeat, timesync SAMPLE or echo ping; `None` until the device is ready.
    next_due: Option<u64>,
    /// Pings sent and not yet echoed.
    pings: VecDeque<Vec<u8>>,
    report: DeviceReport,
}

impl Device {
    fn record(&mut self, error: DeviceError) {
        log::debug!("vmbus device host: {} (relid {}): {error:?}", self.spec.kind.name(), self.report.relid);
        self.report.errors += 1;
        self.report.last_error = Some(error);
    }

    fn keep_unexpected(&mut self, payload: Vec<u8>) {
        if self.report.unexpected.len() >= KEPT_UNEXPECTED_ANSWERS {
            self.report.unexpected.pop_front();
        }
        self.report.unexpected.push_back(payload);
    }

    /// A new open: a fresh model, NEGOTIATE queued (or, for the echo device, ready at once).
    fn opened(&mut self, endpoint: ServerEndpoint<PageArena>) {
        self.endpoint = Some(endpoint);
        self.report.opens += 1;
        self.report.negotiated = None;
        self.report.negotiation_error = None;
        self.model = Model::new(&self.spec);
        self.outbox.clear();
        self.pings.clear();
        self.next_due = None;
        match self.model.negotiate_request() {
            Some(request) => {
                self.outbox.push_back(Outgoing::InBand(request));
                self.phase = Phase::Negotiating;
                self.awaiting = Some(Awaiting::Negotiate);
            }
            None => {
                self.phase = Phase::Ready;
                self.awaiting = None;
            }
        }
    }

    fn closed(&mut self) {
        self.endpoint = None;
        self.phase = Phase::Closed;
        self.awaiting = None;
        self.outbox.clear();
        self.report.closes += 1;
    }

    /// Sends what waits in the outbox, until the ring is full.
    fn flush(&mut self, signal: &dyn GuestSignal) {
        while let Some(packet) = self.outbox.front() {
            let Some(endpoint) = self.endpoint.as_mut() else { return };
            let result = match packet {
                Outgoing::InBand(payload) => endpoint.send_in_band(self.next_transaction, payload, false, signal),
                Outgoing::Completion(id, payload) => endpoint.send_completion(*id, payload, signal),
            };
            match result {
                Ok(_) => {
                    if matches!(packet, Outgoing::InBand(_)) {
                        self.next_transaction = self.next_transaction.wrapping_add(1);
                    }
                    self.outbox.pop_front();
                    self.report.sent += 1;
                }
                Err(EndpointError::Ring(RingError::Full { .. })) => {
                    self.report.send_stalls += 1;
                    return;
                }
                Err(EndpointError::Closed) => return,
                Err(error) => {
                    self.outbox.pop_front();
                    self.record(DeviceError::Endpoint(error));
                }
            }
        }
    }

    /// One received packet.
    fn handle_packet(
        &mut self,
        packet_type: PacketType,
        transaction_id: u64,
        completion_requested: bool,
        data: Vec<u8>,
    ) {
        self.report.received += 1;
        if self.spec.kind == DeviceKind::Echo {
            self.handle_echo(packet_type, transaction_id, completion_requested, data);
            return;
        }
        if packet_type != PacketType::DATA_IN_BAND {
            self.record(DeviceError::PacketType(packet_type));
            return;
        }
        let Some(awaiting) = self.awaiting else {
            self.keep_unexpected(data);
            return;
        };
        let result = match (awaiting, &mut self.model) {
            (Awaiting::Negotiate, model) => match model.accept_negotiate_response(&data) {
                Ok(versions) => {
                    self.report.negotiated = Some(versions);
                    self.report.negotiation_error = None;
                    self.phase = Phase::Ready;
                    self.awaiting = None;
                    Ok(())
                }
                // A frame that is no answer to NEGOTIATE (an answer to an injected message) leaves it outstanding.
                Err(error @ (HostModelError::WrongTransaction { .. } | HostModelError::WrongType { .. })) => {
                    self.keep_unexpected(data);
                    Err(error)
                }
                Err(error) => {
                    self.report.negotiation_error = Some(error);
                    self.phase = Phase::Failed;
                    self.awaiting = None;
                    Err(error)
                }
            },
            (Awaiting::Heartbeat, Model::Heartbeat(model)) => match model.check_response(&data) {
                Ok(observation) => {
                    if let DeviceDetail::Heartbeat { answered, last, .. } = &mut self.report.detail {
                        *answered += 1;
                        *last = Some(observation);
                    }
                    self.awaiting = None;
                    Ok(())
                }
                Err(error) => self.wrong_answer(error, data),
            },
            (Awaiting::Shutdown, Model::Shutdown(model)) => match model.check_response(&data) {
                Ok(status) => {
                    if let DeviceDetail::Shutdown { answer, .. } = &mut self.report.detail {
                        *answer = Some(status);
                    }
                    self.awaiting = None;
                    Ok(())
                }
                Err(error) => self.wrong_answer(error, data),
            },
            (Awaiting::TimeSync, Model::TimeSync(model)) => match model.check_response(&data) {
                Ok(status) if status == IcStatus::OK => {
                    if let DeviceDetail::TimeSync { answers, .. } = &mut self.report.detail {
                        *answers += 1;
                    }
                    self.awaiting = None;
                    Ok(())
                }
                Ok(status) => {
                    self.awaiting = None;
                    Err(HostModelError::Status(status))
                }
                Err(error) => self.wrong_answer(error, data),
            },
            (Awaiting::KvpQuery, Model::Kvp(model)) => match model.continue_pool_query(&data) {
                Ok(PoolQueryStep::Next(request)) => {
                    self.outbox.push_back(Outgoing::InBand(request));
                    Ok(())
                }
                Ok(PoolQueryStep::Done(found)) => {
                    if let DeviceDetail::Kvp { entries, .. } = &mut self.report.detail {
                        *entries = Some(found);
                    }
                    self.awaiting = None;
                    Ok(())
                }
                Err(error) => self.wrong_answer(error, data),
            },
            // The model and what it awaits always belong together; nothing to check otherwise.
            _ => Ok(()),
        };
        if let Err(error) = result {
            self.record(DeviceError::Model(error));
        }
    }

    /// A service answer that failed its check: one that answers something else is kept as unexpected and the
    /// request stays outstanding; a wrong answer to the request ends it.
    fn wrong_answer(&mut self, error: HostModelError, data: Vec<u8>) -> Result<(), HostModelError> {
        match error {
            HostModelError::WrongTransaction { .. }
            | HostModelError::WrongType { .. }
            | HostModelError::NotAResponse => self.keep_unexpected(data),
            _ => self.awaiting = None,
        }
        Err(error)
    }

    fn handle_echo(&mut self, packet_type: PacketType, transaction_id: u64, completion_requested: bool, data: Vec<u8>) {
        let DeviceDetail::Echo { hello_answered, echoes, requests_completed, .. } = &mut self.report.detail else {
            return;
        };
        match packet_type {
            PacketType::DATA_IN_BAND if completion_requested => {
                if data.len() >= 8 && data.starts_with(b"ECHO") {
                    *hello_answered = true;
                    let mut answer = [0u8; 8];
                    answer[..4].copy_from_slice(&ECHO_VERSION.to_le_bytes());
                    self.outbox.push_back(Outgoing::Completion(transaction_id, answer.to_vec()));
                } else {
                    *requests_completed += 1;
                    self.outbox.push_back(Outgoing::Completion(transaction_id, data));
                }
            }
            PacketType::DATA_IN_BAND => match self.pings.pop_front() {
                // The ring pads the echo to 8 bytes.
                Some(ping) if data.get(..ping.len()) == Some(ping.as_slice()) => *echoes += 1,
                Some(_) | None => self.keep_unexpected(data),
            },
            other => self.record(DeviceError::PacketType(other)),
        }
    }

    /// What is due at `now_ns` on a ready device.
    fn send_due(
        &mut self,
        now_ns: u64,
        config: &DeviceHostConfig,
        clock: &dyn HostClock,
        shutdown: &mut Option<ShutdownSpec>,
    ) {
        if self.phase != Phase::Ready {
            return;
        }
        let first = self.next_due.is_none();
        let due = self.next_due.is_none_or(|at| now_ns >= at);
        let result = match &mut self.model {
            Model::Heartbeat(model) if due => {
                self.next_due = Some(now_ns.saturating_add(config.heartbeat_period_ns.max(1)));
                if self.awaiting.is_some() {
                    if let DeviceDetail::Heartbeat { late, .. } = &mut self.report.detail {
                        *late += 1;
                    }
                    Ok(())
                } else {
                    model.next_request().map(|request| {
                        self.outbox.push_back(Outgoing::InBand(request));
                        self.awaiting = Some(Awaiting::Heartbeat);
                    })
                }
            }
            Model::Shutdown(model) if self.awaiting.is_none() => match shutdown.take() {
                Some(spec) => model.request(&spec).map(|request| {
                    self.outbox.push_back(Outgoing::InBand(request));
                    self.awaiting = Some(Awaiting::Shutdown);
                    if let DeviceDetail::Shutdown { requested, answer } = &mut self.report.detail {
                        *requested = Some(spec.flags);
                        *answer = None;
                    }
                }),
                None => Ok(()),
            },
            Model::TimeSync(model) if due && (first || config.timesync_period_ns.is_some()) => {
                self.next_due = Some(match config.timesync_period_ns {
                    Some(period) => now_ns.saturating_add(period.max(1)),
                    None => u64::MAX,
                });
                let kind = if first { TimeSampleKind::Sync } else { TimeSampleKind::Sample };
                let expect = config.timesync_expects_answer && self.awaiting.is_none();
                model.sample(clock, kind, expect).map(|request| {
                    self.outbox.push_back(Outgoing::InBand(request));
                    if expect {
                        self.awaiting = Some(Awaiting::TimeSync);
                    }
                    if let DeviceDetail::TimeSync { samples_sent, last_sent, .. } = &mut self.report.detail {
                        *samples_sent += 1;
                        *last_sent = Some(clock.wall_time());
                    }
                })
            }
            Model::Kvp(model) if first && self.awaiting.is_none() => {
                self.next_due = Some(u64::MAX);
                model.start_pool_query(config.kvp_pool).map(|request| {
                    self.outbox.push_back(Outgoing::InBand(request));
                    self.awaiting = Some(Awaiting::KvpQuery);
                    if let DeviceDetail::Kvp { queries, .. } = &mut self.report.detail {
                        *queries += 1;
                    }
                })
            }
            Model::Echo if due => {
                self.next_due = Some(now_ns.saturating_add(config.echo_period_ns.max(1)));
                if let DeviceDetail::Echo { hello_answered: true, pings_sent, .. } = &mut self.report.detail {
                    let ping = format!("ping {pings_sent}").into_bytes();
                    *pings_sent += 1;
                    self.pings.push_back(ping.clone());
                    self.outbox.push_back(Outgoing::InBand(ping));
                }
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(error) = result {
            self.record(DeviceError::Model(error));
        }
    }
}

/// The loopback host's devices (see the module documentation). `Send`, so a kernel can run it from its host turn.
pub struct DeviceHost {
    devices: Vec<Device>,
    clock: Box<dyn HostClock + Send>,
    config: DeviceHostConfig,
    /// The shutdown to request, and from when.
    shutdown: Option<(u64, ShutdownSpec)>,
}

impl DeviceHost {
    /// A host with no devices yet, reading `clock` for time samples, paced by the default configuration.
    pub fn new(clock: Box<dyn HostClock + Send>) -> DeviceHost {
        DeviceHost::with_config(clock, DeviceHostConfig::default())
    }

    /// A host paced by `config`.
    pub fn with_config(clock: Box<dyn HostClock + Send>, config: DeviceHostConfig) -> DeviceHost {
        DeviceHost { devices: Vec::new(), clock, config, shutdown: None }
    }

    /// Offers the device `spec` on `bus` and plays it from now on. Returns its relid.
    pub fn offer(&mut self, bus: &LoopbackBus, spec: DeviceSpec) -> Result<u32, ServerError> {
        let relid = bus.offer(spec.offer_spec())?;
        self.devices.push(Device {
            spec,
            endpoint: None,
            phase: Phase::Closed,
            model: Model::new(&spec),
            awaiting: None,
            outbox: VecDeque::new(),
            next_transaction: 1,
            next_due: None,
            pings: VecDeque::new(),
            report: DeviceReport {
                kind: spec.kind,
                relid,
                opens: 0,
                closes: 0,
                rescinded: false,
                negotiated: None,
                negotiation_error: None,
                sent: 0,
                received: 0,
                send_stalls: 0,
                errors: 0,
                last_error: None,
                unexpected: VecDeque::new(),
                detail: DeviceDetail::new(spec.kind),
            },
        });
        Ok(relid)
    }

    /// Offers the four integration services with their default instances and versions. Returns their relids in
    /// [`DeviceKind::INTEGRATION_SERVICES`] order.
    pub fn offer_integration_services(&mut self, bus: &LoopbackBus) -> Result<Vec<u32>, ServerError> {
        DeviceKind::INTEGRATION_SERVICES.iter().map(|&kind| self.offer(bus, DeviceSpec::new(kind))).collect()
    }

    /// Asks the shutdown device to request a shutdown with `flags` (bit 0 force, 1 restart, 2 hibernate) as soon as
    /// its channel is negotiated.
    pub fn request_shutdown(&mut self, flags: ShutdownFlags) {
        self.schedule_shutdown(0, flags);
    }

    /// Asks the shutdown device to request a shutdown with `flags` once `run`'s time reaches `at_ns`.
    pub fn schedule_shutdown(&mut self, at_ns: u64, flags: ShutdownFlags) {
        let spec = ShutdownSpec {
            flags,
            reason_code: 0,
            timeout_seconds: 0,
            message: String::from("shutdown requested by the loopback host"),
        };
        self.shutdown = Some((at_ns, spec));
    }

    /// One turn at time `now_ns`: take new endpoints (NEGOTIATE), drop closed ones, read and check the guest's
    /// packets, send what is due. Returns the packets read.
    pub fn run(&mut self, bus: &LoopbackBus, now_ns: u64) -> usize {
        let mut read = 0;
        let mut shutdown = match &self.shutdown {
            Some((at, _)) if now_ns >= *at => self.shutdown.take().map(|(_, spec)| spec),
            _ => None,
        };
        for device in &mut self.devices {
            if device.report.rescinded {
                continue;
            }
            if device.endpoint.as_ref().is_some_and(ServerEndpoint::is_closed) {
                device.closed();
            }
            if device.endpoint.is_none()
                && let Some(endpoint) = bus.take_endpoint(device.report.relid)
            {
                device.opened(endpoint);
            }
            let Some(endpoint) = device.endpoint.as_mut() else { continue };
            let mut packets = Vec::new();
            let received = endpoint.receive_owned(bus, &mut packets);
            if let Err(error) = received
                && error != EndpointError::Closed
            {
                device.record(DeviceError::Endpoint(error));
            }
            for packet in packets {
                read += 1;
                device.handle_packet(
                    packet.packet_type,
                    packet.transaction_id,
                    packet.completion_requested,
                    packet.payload,
                );
            }
            device.send_due(now_ns, &self.config, self.clock.as_ref(), &mut shutdown);
            device.flush(bus);
        }
        // No shutdown device ready yet: ask again next turn.
        if let Some(spec) = shutdown {
            self.shutdown = Some((0, spec));
        }
        read
    }

    /// Sends `payload` in band on device `relid`'s channel as the host would send an IC message — for tests of a
    /// guest's handling of malformed, unknown or oversized messages. Its answer, if any, lands in
    /// [`DeviceReport::unexpected`]. Returns whether it is in the ring now (`false`: the ring is full and it goes on
    /// a later [`DeviceHost::run`]); [`EndpointError::Closed`] when the device has no open channel.
    pub fn inject(&mut self, bus: &LoopbackBus, relid: u32, payload: &[u8]) -> Result<bool, EndpointError> {
        let device = self.devices.iter_mut().find(|d| d.report.relid == relid).ok_or(EndpointError::Closed)?;
        if device.endpoint.is_none() {
            return Err(EndpointError::Closed);
        }
        device.outbox.push_back(Outgoing::InBand(payload.to_vec()));
        device.flush(bus);
        Ok(device.outbox.is_empty())
    }

    /// Rescinds device `relid` (the guest sees RESCINDCHANNEL); the device is no longer played.
    pub fn rescind(&mut self, bus: &LoopbackBus, relid: u32) -> Result<(), ServerError> {
        bus.rescind(relid)?;
        if let Some(device) = self.devices.iter_mut().find(|d| d.report.relid == relid) {
            if device.endpoint.is_some() {
                device.closed();
            }
            device.report.rescinded = true;
        }
        Ok(())
    }

    /// The reports of every device, in offer order.
    pub fn reports(&self) -> Vec<DeviceReport> {
        self.devices.iter().map(|d| d.report.clone()).collect()
    }

    /// The report of the first device of `kind`.
    pub fn report(&self, kind: DeviceKind) -> Option<&DeviceReport> {
        self.devices.iter().find(|d| d.spec.kind == kind).map(|d| &d.report)
    }

    /// One [`DeviceReport::summary`] line per device.
    pub fn summary_lines(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.report.summary()).collect()
    }
}

/// The kernel keeps the host in a `Send` closure (its loopback host turn).
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<DeviceHost>();
};
