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
//! Nothing runs behind the guest's back: the host only acts in `wait`, `delay_us`, `run_host` and the host API
//! calls ([`offer`](LoopbackBus::offer), [`rescind`](LoopbackBus::rescind),
//! [`complete_open`](LoopbackBus::complete_open)), so every test replays exactly.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

use spin::Mutex;

use super::channel::OfferSpec;
use super::config::ServerConfig;
use super::control::{Server, ServerError};
use crate::client::VmbusTransport;
use crate::hv::hypercall::{Delay, HvError, Hypercalls};
use crate::hv::sim::{PostFilter, SimHypervisor};
use crate::hv::synic::{HvMessageType, consume_message};
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
}

struct GlueState {
    stats: LoopbackStats,
    log: VecDeque<ReceivedMessage>,
    /// relid → connection id of the event ports registered for offered channels.
    event_ports: BTreeMap<u32, u32>,
}

/// A VMBus host ([`Server`]) and a simulated hypervisor wired together for a guest [`Connection`]: see the
/// module documentation.
///
/// [`Connection`]: crate::client::Connection
pub struct LoopbackBus {
    hypervisor: SimHypervisor,
    server: Mutex<Server>,
    message_ports: Vec<u32>,
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
            glue: Mutex::new(GlueState {
                stats: LoopbackStats::default(),
                log: VecDeque::new(),
                event_ports: BTreeMap::new(),
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

    /// Offers a channel ([`Server::offer`]), registers its event port, and delivers the offer at once if the
    /// guest already asked for offers.
    pub fn offer(&self, spec: OfferSpec) -> Result<u32, ServerError> {
        let mut server = self.server.lock();
        let relid = server.offer(spec)?;
        self.sync_event_ports(&server);
        self.deliver(&mut server);
        Ok(relid)
    }

    /// Rescinds a channel ([`Server::rescind`]) and delivers the rescind.
    pub fn rescind(&self, relid: u32) -> Result<(), ServerError> {
        let mut server = self.server.lock();
        server.rescind(relid)?;
        self.sync_event_ports(&server);
        self.deliver(&mut server);
        Ok(())
    }

    /// Answers a held OPENCHANNEL ([`Server::complete_open`]) and delivers the result.
    pub fn complete_open(&self, relid: u32, status: u32) -> Result<(), ServerError> {
        let mut server = self.server.lock();
        server.complete_open(relid, status)?;
        self.deliver(&mut server);
        Ok(())
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

    /// Moves the server's outgoing messages into SINT 2 until the SynIC queue refuses one.
    fn deliver(&self, server: &mut Server) {
        let mut delivered = 0;
        let mut stalled = false;
        while let Some(message) = server.peek_outgoing() {
            match self.hypervisor.send_to_guest(VMBUS_MESSAGE_SINT, HvMessageType::VMBUS, message.as_bytes()) {
                Ok(()) => {
                    server.pop_outgoing();
                    delivered += 1;
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
