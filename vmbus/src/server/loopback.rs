//! Both ends of VMBus in one address space: the guest's [`Connection`](crate::client::Connection) talks to a
//! [`Server`] through a [`SimHypervisor`], deterministically and on one thread.
//!
//! Reference: `hyperv-vmbus.md` §3 (PostMessage, 16 buffers per port), §4 (one SINT 2 slot with MessagePending
//! and EOM), §5 (connection ids).
//!
//! [`LoopbackBus`] owns the simulated hypervisor and the server. It registers the server's message connection
//! ids as message ports whose [`PostFilter`] is [`ServerConfig::check_post`], so a refused INITIATE_CONTACT fails
//! inside the guest's PostMessage hypercall as it would on the real host, and it registers one event port per
//! offered channel. `&LoopbackBus` is the guest's [`VmbusTransport`]:
//! - `post_message` / `signal_event` are the simulated hypercalls (16 buffers per port, INSUFFICIENT_BUFFERS
//!   beyond);
//! - `poll_message` takes SINT 2's slot with the end-of-message protocol;
//! - `wait` and the retry policy's `delay_us` advance the simulated reference clock and give the host a turn
//!   ([`LoopbackBus::run_host`]): it reads the ports, lets the server answer, and delivers the answers to SINT 2
//!   until the SynIC queue is full; what does not fit waits in the server's outbox for the next turn.
//!
//! With guest memory ([`LoopbackBus::with_memory`], a [`PageArena`] the guest allocates its rings from) the bus also
//! runs the data path: it maps the rings of every OPENCHANNEL before answering (a guest naming pages outside memory,
//! pages that are not contiguous or rings that share a page gets OPENCHANNEL_RESULT with STATUS_INVALID_PARAMETER),
//! keeps a [`ServerEndpoint`] per open channel for the test to take ([`LoopbackBus::take_endpoint`]), closes it when
//! the server processes CLOSECHANNEL, a rescind, UNLOAD or a reconnect, signals the guest through SINT 2's event
//! flags ([`GuestSignal`]), and tells which channels the guest signalled
//! ([`LoopbackBus::take_signalled_channels`]).
//!
//! Nothing runs behind the guest's back: the host only acts in `wait`, `delay_us`, `run_host` and the host API
//! calls ([`offer`](LoopbackBus::offer), [`rescind`](LoopbackBus::rescind),
//! [`complete_open`](LoopbackBus::complete_open)), so every test replays exactly.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use spin::Mutex;

use super::channel::ChannelStatus;
use super::channel::OfferSpec;
use super::config::ServerConfig;
use super::control::{Server, ServerError};
use super::endpoint::{EndpointCloser, GuestSignal, ServerEndpoint};
use super::status;
use crate::client::VmbusTransport;
use crate::hv::hypercall::{Delay, HvError, Hypercalls};
use crate::hv::sim::{PostFilter, SimHypervisor};
use crate::hv::synic::{HvMessageType, consume_message};
use crate::memory::{MONITOR_TRIGGER_GROUP_OFFSET, PageArena};
use crate::protocol::parse::peek_type;
use crate::protocol::{MAX_MESSAGE_SIZE, MessageType, VMBUS_MESSAGE_SINT};

/// The host stops reading guest messages while this many of its own wait for the guest: the guest then meets
/// full ports (INSUFFICIENT_BUFFERS), as it would with a real host that is busy.
pub const OUTBOX_HIGH_WATER: usize = 32;

/// Simulated time one [`VmbusTransport::wait`] lasts, in nanoseconds.
pub const WAIT_NS: u64 = 1_000_000;

/// Entries kept by the received-message log.
pub const RECEIVED_LOG_CAPACITY: usize = 4096;

/// Flags registered on each channel's event port (the guest signals flag 0 of the offer's connection id).
const EVENT_PORT_FLAGS: u16 = 1;

/// One message the host took from a port, for tests to check where the guest posted what.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The connection id it was posted to.
    pub connection_id: u32,
    /// Its VMBus message type (`MessageType::INVALID` if it had no header).
    pub message_type: MessageType,
}

/// Counters of the glue's own work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopbackStats {
    /// Host turns run.
    pub host_turns: u64,
    /// Guest `wait` calls.
    pub waits: u64,
    /// Guest `delay_us` calls (PostMessage retries after INSUFFICIENT_BUFFERS).
    pub delays: u64,
    /// Guest messages handed to the server.
    pub processed: u64,
    /// Host messages delivered to SINT 2.
    pub delivered: u64,
    /// Times the SynIC refused a host message because SINT 2's queue was full (it was kept for later).
    pub delivery_stalls: u64,
    /// Guest messages with a PostMessage type other than 1, dropped unread.
    pub foreign_messages: u64,
    /// OPENCHANNELs refused because their rings could not be mapped from guest memory.
    pub rings_refused: u64,
    /// Host → guest channel signals (event flag set, whether or not it was already set).
    pub guest_signals: u64,
}

/// Faults the bus injects into what the host sends the guest (issue 7 §3), each with a probability in 1/65536
/// units, drawn from a seeded generator so that a failing run replays exactly.
///
/// - `delay`: a control message waits for a later host turn (everything behind it waits too: the protocol's
///   messages stay in order, as the real host's do).
/// - `duplicate`: a control message is delivered twice (the guest must count and drop the copy).
/// - `drop_signal`: a host → guest channel signal sets the event flag but raises no interrupt — the one loss the
///   protocol tolerates (the data is in the ring; a guest that polls or takes the next interrupt still finds it).
///   Control messages are never dropped: VMBus has no retransmission, a real host never loses them.
/// - `corrupt`: one byte of a control message is replaced (the guest must refuse or ignore it, never panic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Seed of the generator.
    pub seed: u64,
    /// Probability of delaying a control message.
    pub delay: u16,
    /// Probability of duplicating a control message.
    pub duplicate: u16,
    /// Probability of dropping a channel signal's interrupt (any other interrupt pending on SINT 2 then is lost with
    /// it; the guest still finds messages and ring data when it next looks).
    pub drop_signal: u16,
    /// Probability of corrupting a control message.
    pub corrupt: u16,
}

/// What the injector did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Control messages held for a later turn.
    pub delayed: u64,
    /// Control messages delivered twice.
    pub duplicated: u64,
    /// Channel signals whose interrupt was dropped.
    pub dropped_signals: u64,
    /// Control messages with a byte replaced.
    pub corrupted: u64,
}

/// The injector's state: the plan and a xorshift64* generator.
#[derive(Debug, Default)]
struct Faults {
    plan: FaultPlan,
    state: u64,
    stats: FaultStats,
}

impl Faults {
    fn next(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Draws with probability `p` / 65536.
    fn hit(&mut self, p: u16) -> bool {
        p != 0 && (self.next() & 0xFFFF) < u64::from(p)
    }
}

/// The host's end of an open channel, as the bus keeps it.
struct EndpointSlot {
    /// The endpoint, until the test takes it.
    endpoint: Option<ServerEndpoint<PageArena>>,
    closer: EndpointCloser,
    open_id: u32,
    ring_gpadl: u32,
}

struct GlueState {
    stats: LoopbackStats,
    log: VecDeque<ReceivedMessage>,
    /// relid → connection id of the event ports registered for offered channels.
    event_ports: BTreeMap<u32, u32>,
    /// Channels whose opens the bus answers itself after mapping their rings (offered without
    /// [`OfferSpec::confirm_opens`] on a bus with memory).
    auto_open: BTreeSet<u32>,
    /// The host's ends of open channels, by relid.
    endpoints: BTreeMap<u32, EndpointSlot>,
    /// monitor id → relid of the monitored channels.
    monitored: BTreeMap<u8, u32>,
    /// The guest's monitor page 2 (child → parent), from INITIATE_CONTACT.
    monitor_page2: Option<u64>,
    /// Fault injection ([`LoopbackBus::set_faults`]).
    faults: Faults,
}

/// A VMBus host ([`Server`]) and a simulated hypervisor wired together for a guest [`Connection`]: see the
/// module documentation.
///
/// [`Connection`]: crate::client::Connection
pub struct LoopbackBus {
    hypervisor: SimHypervisor,
    server: Mutex<Server>,
    message_ports: Vec<u32>,
    memory: Option<PageArena>,
    glue: Mutex<GlueState>,
}

impl LoopbackBus {
    /// A bus with a ready simulated hypervisor (hypercall page and SynIC enabled) and a server configured by
    /// `config`.
    pub fn new(config: ServerConfig) -> LoopbackBus {
        LoopbackBus::with_hypervisor(SimHypervisor::default(), config)
    }

    /// A bus over an existing simulated hypervisor (for instance one started from reset, which the guest must
    /// bring up itself). The server's message connection ids are registered on it.
    pub fn with_hypervisor(hypervisor: SimHypervisor, config: ServerConfig) -> LoopbackBus {
        LoopbackBus::build(hypervisor, config, None)
    }

    /// A bus that also runs the data path over `memory` (see the module documentation): the guest allocates its
    /// rings there ([`PageArena::channel_rings`]) and the host maps them from the PFNs OPENCHANNEL names.
    pub fn with_memory(config: ServerConfig, memory: PageArena) -> LoopbackBus {
        LoopbackBus::build(SimHypervisor::default(), config, Some(memory))
    }

    /// A bus with the data path over `memory` and an existing simulated hypervisor (for a guest that brings the
    /// SynIC up itself).
    pub fn with_hypervisor_and_memory(
        hypervisor: SimHypervisor,
        config: ServerConfig,
        memory: PageArena,
    ) -> LoopbackBus {
        LoopbackBus::build(hypervisor, config, Some(memory))
    }

    fn build(hypervisor: SimHypervisor, config: ServerConfig, memory: Option<PageArena>) -> LoopbackBus {
        let message_ports = config.message_connection_ids();
        for &connection_id in &message_ports {
            let rules = config.clone();
            let filter = PostFilter::new(move |payload| rules.check_post(connection_id, payload));
            hypervisor.register_filtered_message_port(connection_id, filter);
        }
        LoopbackBus {
            hypervisor,
            server: Mutex::new(Server::new(config)),
            message_ports,
            memory,
            glue: Mutex::new(GlueState {
                stats: LoopbackStats::default(),
                log: VecDeque::new(),
                event_ports: BTreeMap::new(),
                auto_open: BTreeSet::new(),
                endpoints: BTreeMap::new(),
                monitored: BTreeMap::new(),
                monitor_page2: None,
                faults: Faults::default(),
            }),
        }
    }

    /// The simulated hypervisor (to post raw messages, look at SINT 2, signal events).
    pub fn hypervisor(&self) -> &SimHypervisor {
        &self.hypervisor
    }

    /// Runs `f` on the server. Do not call the guest's connection from inside `f`: the server is locked.
    pub fn with_server<R>(&self, f: impl FnOnce(&mut Server) -> R) -> R {
        f(&mut self.server.lock())
    }

    /// The guest memory of the data path, if the bus has one.
    pub fn memory(&self) -> Option<&PageArena> {
        self.memory.as_ref()
    }

    /// Offers a channel ([`Server::offer`]), registers its event port, and delivers the offer at once if the
    /// guest already asked for offers. On a bus with memory an offer without [`OfferSpec::confirm_opens`] is made
    /// with it, and the bus answers each open itself once it has mapped the rings.
    pub fn offer(&self, mut spec: OfferSpec) -> Result<u32, ServerError> {
        let mut server = self.server.lock();
        let auto_open = self.memory.is_some() && !spec.confirm_opens;
        spec.confirm_opens |= auto_open;
        let relid = server.offer(spec)?;
        {
            let mut glue = self.glue.lock();
            if auto_open {
                glue.auto_open.insert(relid);
            } else {
                glue.auto_open.remove(&relid);
            }
        }
        self.sync_event_ports(&server);
        self.deliver(&mut server);
        Ok(relid)
    }

    /// Rescinds a channel ([`Server::rescind`]) and delivers the rescind.
    pub fn rescind(&self, relid: u32) -> Result<(), ServerError> {
        let mut server = self.server.lock();
        server.rescind(relid)?;
        self.sync_event_ports(&server);
        self.sync_endpoints(&mut server);
        self.deliver(&mut server);
        Ok(())
    }

    /// Answers a held OPENCHANNEL ([`Server::complete_open`]) and delivers the result. On a bus with memory a
    /// success first maps the rings; when that fails the open is refused with STATUS_INVALID_PARAMETER instead.
    pub fn complete_open(&self, relid: u32, status: u32) -> Result<(), ServerError> {
        let mut server = self.server.lock();
        if status == status::SUCCESS && self.memory.is_some() {
            if server.opening_channel_info(relid).is_none() {
                return Err(ServerError::NotOpening(relid));
            }
            self.accept_open(&mut server, relid);
        } else {
            server.complete_open(relid, status)?;
        }
        self.deliver(&mut server);
        Ok(())
    }

    /// Takes the host's end of open channel `relid` (once per open; the bus still closes it when the channel
    /// closes). `None` without memory, for a channel that is not open, or when it was already taken.
    pub fn take_endpoint(&self, relid: u32) -> Option<ServerEndpoint<PageArena>> {
        self.glue.lock().endpoints.get_mut(&relid)?.endpoint.take()
    }

    /// A new host end of open channel `relid` over its rings as they stand (the indices are read back from the
    /// control pages), for an owner that dropped its endpoint and starts again — a restored KMCL server channel
    /// (`vmbus::kmcl::server`). The bus closes it when the channel closes, and closes the previous end if one is
    /// still held. `None` without memory, for a channel that is not open, or when the rings no longer map.
    pub fn remap_endpoint(&self, relid: u32) -> Option<ServerEndpoint<PageArena>> {
        let server = self.server.lock();
        let info = server.open_channel_info(relid)?;
        let endpoint = ServerEndpoint::new(info, self.memory.as_ref()?.clone()).ok()?;
        let slot = EndpointSlot {
            closer: endpoint.closer(),
            endpoint: None,
            open_id: info.open_id,
            ring_gpadl: info.ring_gpadl,
        };
        if let Some(old) = self.glue.lock().endpoints.insert(relid, slot) {
            old.closer.close();
        }
        Some(endpoint)
    }

    /// The channels the guest signalled since the last call, in ascending relid order: which rings the host should
    /// look at. A channel counts as signalled when the guest called HvSignalEvent on its offer's connection id, or
    /// — for a monitored channel on a bus with memory — set its pending bit in monitor page 2 (§9), which this
    /// test-and-clears as the host's monitor scan does.
    pub fn take_signalled_channels(&self) -> Vec<u32> {
        let glue = self.glue.lock();
        let mut relids: Vec<u32> = glue
            .event_ports
            .iter()
            .filter(|&(_, &connection_id)| !self.hypervisor.host_take_events(connection_id).is_empty())
            .map(|(&relid, _)| relid)
            .collect();
        if let (Some(memory), Some(page2)) = (self.memory.as_ref(), glue.monitor_page2)
            && !glue.monitored.is_empty()
        {
            let mut groups = 0u8;
            for &monitor_id in glue.monitored.keys() {
                groups |= 1 << (monitor_id / 32);
            }
            for group in (0..4u8).filter(|group| groups & (1 << group) != 0) {
                let gpa = page2 + MONITOR_TRIGGER_GROUP_OFFSET + u64::from(group) * 8;
                // `pending` is the low half of the group's word, `armed` the high half.
                let Ok(word) = memory.fetch_clear_word(gpa, u64::from(u32::MAX)) else {
                    continue;
                };
                let mut pending = word as u32;
                while pending != 0 {
                    let monitor_id = group * 32 + pending.trailing_zeros() as u8;
                    pending &= pending - 1;
                    if let Some(&relid) = glue.monitored.get(&monitor_id) {
                        relids.push(relid);
                    }
                }
            }
            relids.sort_unstable();
            relids.dedup();
        }
        relids
    }

    /// The guest's side of a host signal, for tests: test-and-clears every flag set in SINT 2's event flags (as the
    /// guest's interrupt handler does, §4) and returns their numbers — the relids the host signalled.
    pub fn take_guest_event_flags(&self) -> Vec<u32> {
        let mut relids = Vec::new();
        let Some(words) = self.hypervisor.guest_event_flags(VMBUS_MESSAGE_SINT) else {
            return relids;
        };
        for (index, word) in words.iter().enumerate() {
            if word.load(core::sync::atomic::Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = word.swap(0, core::sync::atomic::Ordering::AcqRel);
            while bits != 0 {
                relids.push(index as u32 * 64 + bits.trailing_zeros());
                bits &= bits - 1;
            }
        }
        relids
    }

    /// Maps the rings of the held open of `relid` and answers it: success with a new endpoint, or
    /// STATUS_INVALID_PARAMETER when the rings cannot be mapped.
    fn accept_open(&self, server: &mut Server, relid: u32) {
        let (Some(memory), Some(info)) = (self.memory.as_ref(), server.opening_channel_info(relid)) else {
            return;
        };
        let (open_id, ring_gpadl) = (info.open_id, info.ring_gpadl);
        let outcome = match ServerEndpoint::new(info, memory.clone()) {
            Ok(endpoint) => {
                let slot = EndpointSlot { closer: endpoint.closer(), endpoint: Some(endpoint), open_id, ring_gpadl };
                if let Some(old) = self.glue.lock().endpoints.insert(relid, slot) {
                    old.closer.close();
                }
                status::SUCCESS
            }
            Err(error) => {
                log::debug!("vmbus loopback: rings of relid {relid} refused: {error}");
                self.glue.lock().stats.rings_refused += 1;
                status::INVALID_PARAMETER
            }
        };
        if let Err(error) = server.complete_open(relid, outcome) {
            log::warn!("vmbus loopback: answering the open of relid {relid}: {error}");
        }
    }

    /// Answers the held opens the bus owns, and closes the endpoints of channels that are no longer open (or were
    /// reopened over other rings).
    fn sync_endpoints(&self, server: &mut Server) {
        if self.memory.is_none() {
            return;
        }
        let auto_open: Vec<u32> = {
            let mut glue = self.glue.lock();
            glue.auto_open.retain(|&relid| server.channel(relid).is_some());
            glue.auto_open.iter().copied().collect()
        };
        for relid in auto_open {
            if server.channel(relid).is_some_and(|channel| channel.status == ChannelStatus::Opening) {
                self.accept_open(server, relid);
            }
        }
        self.glue.lock().endpoints.retain(|&relid, slot| {
            let current = server
                .open_channel_info(relid)
                .is_some_and(|info| info.open_id == slot.open_id && info.ring_gpadl == slot.ring_gpadl);
            if !current {
                slot.closer.close();
            }
            current
        });
    }

    /// One host turn: hand the guest's posted messages (ports in ascending connection id) to the server while
    /// fewer than [`OUTBOX_HIGH_WATER`] answers wait, delivering answers to SINT 2 as they come. Returns how many
    /// guest messages were handled.
    pub fn run_host(&self) -> usize {
        let mut server = self.server.lock();
        let mut processed = 0;
        loop {
            self.deliver(&mut server);
            if server.outgoing_len() >= OUTBOX_HIGH_WATER {
                break;
            }
            let Some(posted) = self.message_ports.iter().find_map(|&id| self.hypervisor.host_receive(id)) else {
                break;
            };
            let mut glue = self.glue.lock();
            if glue.log.len() >= RECEIVED_LOG_CAPACITY {
                glue.log.pop_front();
            }
            glue.log.push_back(ReceivedMessage {
                connection_id: posted.connection_id,
                message_type: peek_type(&posted.payload).unwrap_or(MessageType::INVALID),
            });
            if posted.message_type != HvMessageType::VMBUS {
                glue.stats.foreign_messages += 1;
                continue;
            }
            glue.stats.processed += 1;
            drop(glue);
            // The port's filter already applied the server's PostMessage check, so this cannot be refused.
            if let Err(error) = server.handle_message(posted.connection_id, &posted.payload) {
                log::warn!("vmbus loopback: a message the port admitted was refused: {error}");
            }
            self.sync_endpoints(&mut server);
            processed += 1;
        }
        self.sync_event_ports(&server);
        self.glue.lock().stats.host_turns += 1;
        processed
    }

    /// Takes the log of messages the host read (connection id and type), oldest first.
    pub fn take_received_log(&self) -> Vec<ReceivedMessage> {
        self.glue.lock().log.drain(..).collect()
    }

    /// The glue's counters.
    pub fn stats(&self) -> LoopbackStats {
        self.glue.lock().stats
    }

    /// The simulated clock (partition reference time), in nanoseconds.
    pub fn now_ns(&self) -> u64 {
        crate::hv::time::TimeRefCounter::time_ref_count(&self.hypervisor).saturating_mul(100)
    }

    fn advance_ns(&self, ns: u64) {
        self.hypervisor.advance_time(ns.div_ceil(100));
    }

    /// Moves the server's outgoing messages into SINT 2 until the SynIC queue refuses one (or the fault injector
    /// holds one back for a later turn).
    fn deliver(&self, server: &mut Server) {
        let mut delivered = 0;
        let mut stalled = false;
        while let Some(message) = server.peek_outgoing() {
            let mut bytes = alloc::vec::Vec::from(message.as_bytes());
            let (delay, duplicate) = {
                let mut glue = self.glue.lock();
                let plan = glue.faults.plan;
                let delay = glue.faults.hit(plan.delay);
                let duplicate = !delay && glue.faults.hit(plan.duplicate);
                if !delay && glue.faults.hit(plan.corrupt) && !bytes.is_empty() {
                    let at = (glue.faults.next() % bytes.len() as u64) as usize;
                    bytes[at] ^= (glue.faults.next() as u8) | 1;
                    glue.faults.stats.corrupted += 1;
                }
                glue.faults.stats.delayed += u64::from(delay);
                (delay, duplicate)
            };
            if delay {
                break;
            }
            match self.hypervisor.send_to_guest(VMBUS_MESSAGE_SINT, HvMessageType::VMBUS, &bytes) {
                Ok(()) => {
                    server.pop_outgoing();
                    delivered += 1;
                    if duplicate && self.hypervisor.send_to_guest(VMBUS_MESSAGE_SINT, HvMessageType::VMBUS, &bytes).is_ok()
                    {
                        self.glue.lock().faults.stats.duplicated += 1;
                    }
                }
                Err(error) => {
                    if error != HvError::INSUFFICIENT_BUFFERS {
                        log::warn!("vmbus loopback: SINT 2 delivery failed: {error}");
                    }
                    stalled = true;
                    break;
                }
            }
        }
        let mut glue = self.glue.lock();
        glue.stats.delivered += delivered;
        glue.stats.delivery_stalls += u64::from(stalled);
    }

    /// Injects `plan`'s faults from now on (a default plan injects none).
    pub fn set_faults(&self, plan: FaultPlan) {
        let mut glue = self.glue.lock();
        // xorshift needs a non-zero state.
        glue.faults = Faults { plan, state: plan.seed | 1, stats: FaultStats::default() };
    }

    /// What the fault injector did so far.
    pub fn fault_stats(&self) -> FaultStats {
        self.glue.lock().faults.stats
    }

    /// Registers an event port for every channel that has none, and drops those of released channels.
    fn sync_event_ports(&self, server: &Server) {
        let mut glue = self.glue.lock();
        glue.event_ports.retain(|&relid, &mut connection_id| {
            let current = server.channel(relid).is_some_and(|channel| channel.connection_id == connection_id);
            if !current {
                self.hypervisor.unregister_port(connection_id);
            }
            current
        });
        for relid in server.relids() {
            if let Some(channel) = server.channel(relid)
                && !glue.event_ports.contains_key(&relid)
            {
                self.hypervisor.register_event_port(channel.connection_id, EVENT_PORT_FLAGS);
                glue.event_ports.insert(relid, channel.connection_id);
            }
        }
        glue.monitored =
            server.relids().filter_map(|relid| Some((server.channel(relid)?.monitor_id?, relid))).collect();
        glue.monitor_page2 = server.connection().and_then(|connection| connection.monitor_pages).map(|pages| pages.1);
    }
}

impl GuestSignal for LoopbackBus {
    /// Sets event flag `relid` of SINT 2 with the simulated hypervisor (raising the interrupt if it was clear).
    fn signal_guest(&self, relid: u32) -> Result<(), HvError> {
        let flag = u16::try_from(relid).map_err(|_| HvError::INVALID_PARAMETER)?;
        self.hypervisor.signal_guest(VMBUS_MESSAGE_SINT, flag)?;
        let mut glue = self.glue.lock();
        glue.stats.guest_signals += 1;
        let drop_signal = glue.faults.plan.drop_signal;
        if glue.faults.hit(drop_signal) {
            // The flag stays set; only the interrupt is lost.
            drop(glue);
            self.hypervisor.take_interrupts(VMBUS_MESSAGE_SINT);
            self.glue.lock().faults.stats.dropped_signals += 1;
        }
        Ok(())
    }
}

impl Hypercalls for &LoopbackBus {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> Result<(), HvError> {
        self.hypervisor.post_message(connection_id, message_type, payload)
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        self.hypervisor.signal_event(connection_id, flag)
    }
}

impl Delay for &LoopbackBus {
    /// The back-off between PostMessage attempts: time passes and the host gets a turn to drain its ports.
    fn delay_us(&self, us: u64) {
        self.glue.lock().stats.delays += 1;
        self.advance_ns(us.saturating_mul(1000));
        self.run_host();
    }
}

impl VmbusTransport for &LoopbackBus {
    fn poll_message(&self, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        let slot = self.hypervisor.message_slot(VMBUS_MESSAGE_SINT)?;
        while let Some(message) = consume_message(&slot) {
            if message.message_type() != HvMessageType::VMBUS {
                continue;
            }
            let Ok(payload) = message.payload() else {
                continue;
            };
            let Some(destination) = buf.get_mut(..payload.len()) else {
                continue;
            };
            destination.copy_from_slice(payload);
            return Some(payload.len());
        }
        None
    }

    fn now_ns(&self) -> u64 {
        LoopbackBus::now_ns(self)
    }

    fn wait(&self) {
        self.glue.lock().stats.waits += 1;
        self.advance_ns(WAIT_NS);
        self.run_host();
    }
}
