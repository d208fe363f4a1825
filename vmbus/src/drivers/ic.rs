//! What the four integration-service drivers share: one KMCL channel around a sans-I/O guest service
//! ([`GuestIcService`]), written against [`Kmcl`] alone.
//!
//! Reference: `hyperv-vmbus.md` §7 (every request answered in band, then acted on; Linux opens IC channels with
//! 16 KiB rings per direction) and `kmcl-api.md` §Lifecycle (allocate, InitSet*, enable; disable, cleanup).
//!
//! Each received in-band packet goes to the service's `handle`; the answer (or the error answer the service chose)
//! goes back as a new in-band packet from the channel's pool, and what the message asks of the machine
//! ([`DriverRequest`]) is released to the kernel only from that packet's completion routine, i.e. once the answer is
//! in the ring — so a shutdown is answered before the machine goes down. A message without an answer releases its
//! request at once. Malformed, unknown or early messages are counted and answered or ignored as the service decides;
//! nothing here panics on host input.
//!
//! ⚠ The reference says the answer carries the request's VMBus transaction id (as Linux sends it). The KMCL API has
//! no way to choose the id of a new packet (`VmbPacketSend` numbers its own), so the answer carries the bus's id and
//! echoes the request's id only in the IC header. Hosts are observed to go by the IC header's id (MacHyperVSupport's
//! IC header notes that the ICs disregard the VMBus transaction id; OpenVMM's IC devices read messages through a
//! pipe, where packet ids play no part); a host that matched on the VMBus id would need a KMCL call that sends with
//! a chosen id.

use super::DriverRequest;
use crate::ic::guest::{GuestIcService, IcAction, IcError};
use crate::ic::negotiate::{NegotiatedVersions, NegotiationFailure};
use crate::kmcl::{
    ChannelCallbacks, ChannelHandle, Kmcl, NtStatus, PacketCompletion, PacketHandle, ProcessPacketFlags, Result,
    SendFlags,
};
use crate::protocol::Guid;
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use spin::Mutex;

/// Pages of each IC ring, control page included: 16 KiB per direction, as Linux opens IC channels (§7).
pub const IC_RING_PAGES: u32 = 4;

/// Largest IC packet the drivers accept or send: two pages. The largest IC message of §7 is a KVP IP-info exchange
/// (a 7430-byte body and 28 bytes of headers), which the KVP service refuses but must still be able to answer with
/// its body echoed; every other message is under 2.7 KiB. A host packet above this is dropped by the bus and counted
/// there.
pub const IC_MAX_PACKET_SIZE: u32 = 8192;

/// Most requests kept for the kernel between two [`super::Driver::take_requests`] calls; older ones are dropped
/// (and counted) so a host cannot grow the list without bound.
pub const MAX_QUEUED_REQUESTS: usize = 16;

/// Traffic counters of one IC driver.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcCounters {
    /// In-band packets received.
    pub received: u64,
    /// NEGOTIATE messages answered with versions.
    pub negotiations: u64,
    /// NEGOTIATE messages answered with the empty answer (no common version).
    pub negotiation_failures: u64,
    /// Service messages handled.
    pub handled: u64,
    /// Messages refused (malformed, unknown type, before negotiation, unsupported): answered with an error status
    /// when the host asked for an answer, else ignored.
    pub refused: u64,
    /// Answers handed to the bus.
    pub answers_sent: u64,
    /// Answers that could not be sent (pool exhausted, channel closing).
    pub answer_failures: u64,
    /// Requests to the kernel dropped because [`MAX_QUEUED_REQUESTS`] were already waiting.
    pub requests_dropped: u64,
}

/// A service-specific driver part: what a handled message means for the kernel, and its share of the status line.
pub trait IcKind: Send + 'static {
    /// The guest service the driver wraps.
    type Service: GuestIcService + Send + 'static;

    /// The driver's name for the device table.
    const NAME: &'static str;

    /// Called for each service message the service handled, at receipt; the returned request is released to the
    /// kernel once the answer is in the ring (at once when the message has no answer).
    fn on_action(&mut self, action: &<Self::Service as GuestIcService>::Action) -> Option<DriverRequest>;

    /// The service-specific part of the status line (may be empty).
    fn status(&self) -> String;
}

/// The state an IC driver shares between its channel callbacks and the kernel.
pub struct IcState<K: IcKind> {
    /// The guest service.
    pub service: K::Service,
    /// The service-specific part.
    pub kind: K,
    /// Traffic counters.
    pub counters: IcCounters,
    /// The last refused message's reason.
    pub last_error: Option<IcError>,
    /// The last failed negotiation.
    pub last_negotiation_failure: Option<NegotiationFailure>,
    /// Whether the channel is open (between `opened` and `closed`).
    pub open: bool,
    /// Times the channel was opened.
    pub opens: u64,
    requests: Vec<DriverRequest>,
}

impl<K: IcKind> IcState<K> {
    fn push_request(&mut self, request: DriverRequest) {
        if self.requests.len() >= MAX_QUEUED_REQUESTS {
            self.requests.remove(0);
            self.counters.requests_dropped += 1;
        }
        self.requests.push(request);
    }
}

/// A KMCL driver for one integration service (see the module documentation). The four drivers are this type with
/// their [`IcKind`]: [`super::heartbeat::HeartbeatDriver`], [`super::shutdown::ShutdownDriver`],
/// [`super::timesync::TimeSyncDriver`], [`super::kvp::KvpDriver`].
pub struct IcDriver<K: IcKind> {
    state: Arc<Mutex<IcState<K>>>,
    channel: Option<ChannelHandle>,
    instance: Option<Guid>,
}

impl<K: IcKind> IcDriver<K> {
    /// A driver around `service` and `kind`, binding to any instance of the service's class.
    pub fn with_parts(service: K::Service, kind: K) -> IcDriver<K> {
        let state = IcState {
            service,
            kind,
            counters: IcCounters::default(),
            last_error: None,
            last_negotiation_failure: None,
            open: false,
            opens: 0,
            requests: Vec::new(),
        };
        IcDriver { state: Arc::new(Mutex::new(state)), channel: None, instance: None }
    }

    /// Binds only to the offer with this instance (before [`super::Driver::start`]).
    pub fn bind_instance(&mut self, instance: Guid) {
        self.instance = Some(instance);
    }

    /// The versions negotiated with the host, once negotiated.
    pub fn negotiated(&self) -> Option<NegotiatedVersions> {
        self.state.lock().service.negotiated()
    }

    /// The traffic counters.
    pub fn counters(&self) -> IcCounters {
        self.state.lock().counters
    }

    /// The last refused message's reason.
    pub fn last_error(&self) -> Option<IcError> {
        self.state.lock().last_error
    }

    /// Whether the channel is open.
    pub fn is_open(&self) -> bool {
        self.state.lock().open
    }

    /// Runs `f` on the shared state (for the kernel and tests; do not call the bus from inside `f`).
    pub fn inspect<R>(&self, f: impl FnOnce(&IcState<K>) -> R) -> R {
        f(&self.state.lock())
    }

    /// Runs `f` on the shared state, mutably (construction-time settings of the service-specific part).
    pub(crate) fn state_mut<R>(&self, f: impl FnOnce(&mut IcState<K>) -> R) -> R {
        f(&mut self.state.lock())
    }

    fn start_channel(&mut self, kmcl: &mut dyn Kmcl) -> Result<ChannelHandle> {
        if let Some(channel) = self.channel {
            return Ok(channel);
        }
        let channel = kmcl.channel_allocate()?;
        let callbacks = IcCallbacks { state: Arc::clone(&self.state) };
        let state: crate::kmcl::Context = self.state.clone();
        let instance = self.instance;
        let setup = (|| {
            kmcl.channel_init_set_maximum_packet_size(channel, IC_MAX_PACKET_SIZE)?;
            kmcl.channel_init_set_ring_buffer_page_count(channel, IC_RING_PAGES, IC_RING_PAGES)?;
            kmcl.channel_init_set_callbacks(channel, Box::new(callbacks))?;
            kmcl.channel_set_pointer(channel, Some(state))?;
            kmcl.channel_init_set_target(channel, K::Service::INTERFACE_ID, instance)?;
            kmcl.channel_init_set_friendly_name(channel, K::NAME)?;
            kmcl.channel_enable(channel)
        })();
        if let Err(status) = setup {
            let _ = kmcl.channel_cleanup(channel);
            return Err(status);
        }
        self.channel = Some(channel);
        Ok(channel)
    }
}

impl<K: IcKind> super::Driver for IcDriver<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn interface_type(&self) -> Guid {
        K::Service::INTERFACE_ID
    }

    fn start(&mut self, kmcl: &mut dyn Kmcl) -> Result<ChannelHandle> {
        self.start_channel(kmcl)
    }

    fn channel(&self) -> Option<ChannelHandle> {
        self.channel
    }

    fn take_requests(&mut self) -> Vec<DriverRequest> {
        core::mem::take(&mut self.state.lock().requests)
    }

    fn status(&self) -> String {
        let state = self.state.lock();
        let versions = match (state.service.negotiated(), state.last_negotiation_failure) {
            (Some(v), _) => format!("framework {} message {}", v.framework, v.message),
            (None, Some(failure)) => format!("negotiation failed ({failure:?})"),
            (None, None) if state.open => String::from("open, not negotiated"),
            (None, None) => String::from("not bound"),
        };
        let c = state.counters;
        let kind = state.kind.status();
        let mut line = format!(
            "{versions}; {} received, {} handled, {} answers sent, {} refused",
            c.received, c.handled, c.answers_sent, c.refused
        );
        if c.answer_failures > 0 {
            line.push_str(&format!(", {} answers failed", c.answer_failures));
        }
        if !kind.is_empty() {
            line.push_str("; ");
            line.push_str(&kind);
        }
        line
    }

    fn stop(&mut self, kmcl: &mut dyn Kmcl) -> Result<()> {
        let Some(channel) = self.channel.take() else { return Ok(()) };
        kmcl.channel_disable(channel)?;
        kmcl.channel_cleanup(channel)
    }
}

/// The channel callbacks of an [`IcDriver`].
struct IcCallbacks<K: IcKind> {
    state: Arc<Mutex<IcState<K>>>,
}

impl<K: IcKind> IcCallbacks<K> {
    /// Sends `answer` in band from the channel's pool; `request` is released to the kernel from the completion
    /// routine (once the answer is in the ring, or the channel closed first). Returns whether the send was accepted.
    fn send_answer(
        &self,
        kmcl: &mut dyn Kmcl,
        channel: ChannelHandle,
        answer: &[u8],
        request: Option<DriverRequest>,
    ) -> bool {
        let packet = match kmcl.packet_allocate(channel) {
            Ok(packet) => packet,
            Err(status) => {
                self.answer_failed(status, request);
                return false;
            }
        };
        let state = Arc::clone(&self.state);
        let mut pending = request.clone();
        let routine = Box::new(move |kmcl: &mut dyn Kmcl, packet: PacketHandle, status: NtStatus, _: &[u8]| {
            let mut state = state.lock();
            if status != NtStatus::SUCCESS {
                log::warn!("{}: answer not delivered: {status}", K::NAME);
                state.counters.answer_failures += 1;
            }
            // The host asked for it whether or not the answer reached it (a channel closing under a shutdown
            // request is no reason to stay up).
            if let Some(request) = pending.take() {
                state.push_request(request);
            }
            drop(state);
            let _ = kmcl.packet_free(packet);
        });
        if let Err(status) = kmcl.packet_set_completion_routine(packet, routine) {
            let _ = kmcl.packet_free(packet);
            self.answer_failed(status, request);
            return false;
        }
        if let Err(status) = kmcl.packet_send(packet, answer, None, SendFlags::NONE) {
            let _ = kmcl.packet_free(packet);
            self.answer_failed(status, request);
            return false;
        }
        self.state.lock().counters.answers_sent += 1;
        true
    }

    fn answer_failed(&self, status: NtStatus, request: Option<DriverRequest>) {
        log::warn!("{}: could not send an answer: {status}", K::NAME);
        let mut state = self.state.lock();
        state.counters.answer_failures += 1;
        if let Some(request) = request {
            state.push_request(request);
        }
    }
}

impl<K: IcKind> ChannelCallbacks for IcCallbacks<K> {
    fn opened(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) -> Result<()> {
        let mut state = self.state.lock();
        state.open = true;
        state.opens += 1;
        Ok(())
    }

    fn closed(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.state.lock().open = false;
    }

    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        _flags: ProcessPacketFlags,
    ) {
        // The lock is released before the bus is called: the answer's completion routine may run inside the send.
        let (answer, request) = {
            let mut state = self.state.lock();
            let state = &mut *state;
            state.counters.received += 1;
            match state.service.handle(buffer) {
                Ok(reply) => {
                    let request = match &reply.action {
                        IcAction::Negotiated(_) => {
                            state.counters.negotiations += 1;
                            state.last_negotiation_failure = None;
                            None
                        }
                        IcAction::NegotiationFailed(failure) => {
                            state.counters.negotiation_failures += 1;
                            state.last_negotiation_failure = Some(*failure);
                            None
                        }
                        IcAction::Service(action) => {
                            state.counters.handled += 1;
                            state.kind.on_action(action)
                        }
                    };
                    (reply.response, request)
                }
                Err(failure) => {
                    log::debug!("{}: {failure}", K::NAME);
                    state.counters.refused += 1;
                    state.last_error = Some(failure.error);
                    (failure.response, None)
                }
            }
        };
        match answer {
            Some(answer) => {
                self.send_answer(kmcl, channel, &answer, request);
            }
            None => {
                if let Some(request) = request {
                    self.state.lock().push_request(request);
                }
            }
        }
        // The answer went in band; a completion (sent only if the host asked for one) carries nothing.
        let _ = kmcl.packet_complete(packet, &[]);
    }
}
