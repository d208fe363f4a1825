//! The server side of the KMCL (`vmbus::kmcl::server`) against the guest's KMCL on the two ends of one
//! `LoopbackBus` with guest memory: a server echo driver written only against `Kmcl`/`KmclServer`, and the example
//! client driver `kmcl::echo` in the guest; then the crate's own server driver `kmcl::echo_server::EchoServer`
//! against the same client (negotiation, round trips, counts, a refused version). Packets and completions both
//! ways, synchronous requests from the server, the callback order on both ends, guest close and reopen, server
//! disable (rescind), the server-only statuses, and 64 server channels at once.
//!
//! One thread plays both ends: each end's waits give the other end a turn (the guest's transport runs the server
//! bus in `wait`, the server's idle hook runs the guest bus), through `try_lock`, so an end never re-enters itself.

use std::sync::Arc;

use spin::Mutex;
use vmbus::client::{ConnectOptions, Connection, VmbusTransport};
use vmbus::hv::hypercall::{Delay, HvError, Hypercalls};
use vmbus::kmcl::echo::{ECHO_INTERFACE_TYPE, ECHO_VERSION, EchoDriver, EchoState};
use vmbus::kmcl::echo_server::EchoServer;
use vmbus::kmcl::{
    Bus, ChannelCallbacks, ChannelHandle, ChannelState, ContextId, GpadlFlags, Handles, KernelHandle, KernelObject,
    Kmcl, KmclServer, NtStatus, PacketCompletion, PacketSaveRestore, PartitionId, ProcessPacketFlags, RestoreProgress,
    SaveProgress, SendFlags, ServerBus, ServerChannelFlags, VmbusPartition,
};
use vmbus::memory::{ArenaInterruptPages, ArenaRingAllocator, GuestMemory, PAGE_SIZE, PageArena};
use vmbus::protocol::{Guid, MAX_MESSAGE_SIZE, OfferFlags, PIPE_MODE_MESSAGE};
use vmbus::server::{ChannelStatus, LoopbackBus, MapGpadlFlags, ServerConfig};

const BASE_PFN: u64 = 0x30_0000;

type Server = ServerBus<&'static LoopbackBus>;
type Guest = Bus<GuestTransport, ArenaInterruptPages, ArenaRingAllocator>;

/// The guest's transport: the loopback bus, whose waits also give the server bus a turn.
#[derive(Clone)]
struct GuestTransport {
    bus: &'static LoopbackBus,
    server: Arc<Mutex<Option<Server>>>,
}

impl GuestTransport {
    fn server_turn(&self) {
        if let Some(mut guard) = self.server.try_lock()
            && let Some(server) = guard.as_mut()
        {
            server.process_interrupt(&self.bus.take_signalled_channels());
            server.poll();
        }
    }
}

impl Hypercalls for GuestTransport {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> Result<(), HvError> {
        self.bus.post_message(connection_id, message_type, payload)
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        self.bus.signal_event(connection_id, flag)
    }
}

impl Delay for GuestTransport {
    fn delay_us(&self, us: u64) {
        self.bus.delay_us(us);
        self.server_turn();
    }
}

impl VmbusTransport for GuestTransport {
    fn poll_message(&self, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        self.bus.poll_message(buf)
    }

    fn now_ns(&self) -> u64 {
        self.bus.now_ns()
    }

    fn wait(&self) {
        VmbusTransport::wait(&self.bus);
        self.server_turn();
    }
}

/// Both ends on one loopback bus.
struct Rig {
    loopback: &'static LoopbackBus,
    arena: PageArena,
    handles: Arc<Handles>,
    server: Arc<Mutex<Option<Server>>>,
    guest: Arc<Mutex<Guest>>,
}

fn guest_turn(loopback: &LoopbackBus, guest: &Mutex<Guest>) {
    if let Some(mut guest) = guest.try_lock() {
        let relids = loopback.take_guest_event_flags();
        guest.process_interrupt(&relids);
        guest.poll();
    }
}

impl Rig {
    fn new() -> Rig {
        let arena = PageArena::new(BASE_PFN, 4096);
        let loopback: &'static LoopbackBus =
            Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
        let handles = Arc::new(Handles::new());
        let server = Arc::new(Mutex::new(Some(ServerBus::new(loopback, Arc::clone(&handles)))));
        let transport = GuestTransport { bus: loopback, server: Arc::clone(&server) };
        let interrupt_page = arena.allocate(1).unwrap() * PAGE_SIZE;
        let monitor_pages = arena.allocate(2).unwrap() * PAGE_SIZE;
        let mut connection = Connection::connect(
            transport,
            ConnectOptions::new(interrupt_page, (monitor_pages, monitor_pages + PAGE_SIZE)),
        )
        .unwrap();
        connection.request_offers().unwrap();
        let pages = ArenaInterruptPages::new(arena.clone(), Some(interrupt_page), Some(monitor_pages + PAGE_SIZE));
        let guest = Arc::new(Mutex::new(Bus::new(connection, pages, ArenaRingAllocator::new(arena.clone()))));
        let hook_guest = Arc::clone(&guest);
        server.lock().as_mut().unwrap().set_idle_hook(Some(Box::new(move || guest_turn(loopback, &hook_guest))));
        Rig { loopback, arena, handles, server, guest }
    }

    fn server<R>(&self, f: impl FnOnce(&mut Server) -> R) -> R {
        f(self.server.lock().as_mut().unwrap())
    }

    fn guest<R>(&self, f: impl FnOnce(&mut Guest) -> R) -> R {
        f(&mut self.guest.lock())
    }

    /// Rounds of: the host handles messages, the server bus runs, the guest bus runs.
    fn pump(&self, rounds: usize) {
        for _ in 0..rounds {
            self.loopback.run_host();
            self.server(|server| {
                server.process_interrupt(&self.loopback.take_signalled_channels());
                server.poll();
            });
            guest_turn(self.loopback, &self.guest);
        }
    }

    /// Starts the client echo driver for `instance` in the guest (it negotiates in `post_started`).
    fn start_echo(&self, instance: Guid) -> (ChannelHandle, Arc<spin::Mutex<EchoState>>) {
        let page = self.arena.allocate(1).unwrap();
        self.guest(|guest| EchoDriver::start(guest, Some(instance), page)).unwrap()
    }
}

/// What the server echo driver saw.
#[derive(Default)]
struct ServerLog {
    events: Vec<String>,
    /// Payloads of packets that asked for no completion.
    received: Vec<Vec<u8>>,
    /// Completions of the server's own packets.
    completions: Vec<(NtStatus, Vec<u8>)>,
    /// Whether `opened` saw the server interface through `Kmcl::as_server`.
    saw_server_interface: bool,
}

/// A server driver for the echo device, written against `Kmcl` and `KmclServer` only: it accepts the client's
/// hello with [`ECHO_VERSION`], echoes requests as their completions and records the rest.
struct ServerEcho {
    log: Arc<Mutex<ServerLog>>,
    refuse_open: Option<NtStatus>,
}

impl ServerEcho {
    fn event(&self, name: &str) {
        self.log.lock().events.push(name.into());
    }
}

impl ChannelCallbacks for ServerEcho {
    fn opened(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) -> vmbus::kmcl::Result<()> {
        self.event("opened");
        let server = kmcl.as_server().is_some_and(|server| server.server_channel_partition(channel).is_ok());
        self.log.lock().saw_server_interface = server;
        match self.refuse_open {
            Some(status) => Err(status),
            None => Ok(()),
        }
    }

    fn started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.event("started");
    }

    fn post_started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.event("post_started");
    }

    fn suspend(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.event("suspend");
    }

    fn closed(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.event("closed");
    }

    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        _channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        _flags: ProcessPacketFlags,
    ) {
        let answer = if buffer.starts_with(b"ECHO") {
            let mut version = [0u8; 8];
            version[..4].copy_from_slice(&ECHO_VERSION.to_le_bytes());
            version.to_vec()
        } else if kmcl.packet_completion_requested(packet).unwrap() {
            buffer.to_vec()
        } else {
            self.log.lock().received.push(buffer.to_vec());
            Vec::new()
        };
        kmcl.packet_complete(packet, &answer).unwrap();
    }
}

fn instance(n: u16) -> Guid {
    Guid::from_fields(0x5345_5256, n, 0x4543, [0x48, 0x4f, 0, 0, 0, 0, 0, 1])
}

/// Allocates, sets up and enables a server echo channel for `instance`.
fn server_echo(
    server: &mut Server,
    instance: Guid,
    refuse_open: Option<NtStatus>,
) -> (ChannelHandle, Arc<Mutex<ServerLog>>) {
    let log = Arc::new(Mutex::new(ServerLog::default()));
    let channel = server.channel_allocate().unwrap();
    assert_eq!(server.channel_state(channel), Ok(ChannelState::Disabled));
    server.channel_init_set_maximum_packet_size(channel, 512).unwrap();
    server.channel_init_set_callbacks(channel, Box::new(ServerEcho { log: Arc::clone(&log), refuse_open })).unwrap();
    server.server_channel_init_set_target_interface_id(channel, ECHO_INTERFACE_TYPE, instance).unwrap();
    server.channel_init_set_friendly_name(channel, "server echo").unwrap();
    server.channel_enable(channel).unwrap();
    assert_eq!(server.channel_state(channel), Ok(ChannelState::Enabled));
    (channel, log)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| String::from(*s)).collect()
}

#[test]
fn packets_completions_and_synchronous_requests_flow_both_ways() {
    let rig = Rig::new();
    let (channel, log) = rig.server(|server| server_echo(server, instance(1), None));
    rig.pump(3);
    let (guest_channel, echo) = rig.start_echo(instance(1));
    rig.pump(3);

    // The open, negotiation and callback order on both ends.
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Active));
    assert_eq!(log.lock().events, strings(&["opened", "started", "post_started"]));
    assert!(log.lock().saw_server_interface, "callbacks reach the server-only methods");
    assert_eq!(echo.lock().version, Some(ECHO_VERSION), "the client's hello was completed by the server");
    assert_eq!(echo.lock().events, ["opened", "started", "post_started"]);
    assert_eq!(rig.guest(|g| g.channel_state(guest_channel)), Ok(ChannelState::Active));
    let relid = rig.server(|s| s.channel_relid(channel)).unwrap();
    assert_eq!(rig.guest(|g| g.channel_relid(guest_channel)), Ok(relid));
    assert_eq!(rig.server(|s| s.channel_offer(channel)).unwrap().interface_instance, instance(1));

    // Guest → server: a ping (synchronous request) is echoed as the server's completion.
    let mut answer = [0u8; 16];
    let len = rig.guest(|g| EchoDriver::ping(g, guest_channel, b"ping from guest!", &mut answer)).unwrap();
    assert_eq!(&answer[..len], b"ping from guest!");

    // Server → guest with WAIT_FOR_COMPLETION: the guest's echo comes back as the completion.
    rig.server(|server| {
        let packet = server.packet_allocate(channel).unwrap();
        let completions = Arc::clone(&log);
        server
            .packet_set_completion_routine(
                packet,
                Box::new(move |kmcl, packet, status, payload| {
                    completions.lock().completions.push((status, payload.to_vec()));
                    kmcl.packet_free(packet).unwrap();
                }),
            )
            .unwrap();
        server.packet_send(packet, b"server says hello", None, SendFlags::WAIT_FOR_COMPLETION).unwrap();
    });
    rig.pump(3);
    let completions = core::mem::take(&mut log.lock().completions);
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0].0, NtStatus::SUCCESS);
    assert_eq!(&completions[0].1[..17], b"server says hello");

    // Server → guest without a completion: the guest echoes it as a new packet, which the server receives.
    rig.server(|server| {
        let packet = server.packet_allocate(channel).unwrap();
        server.packet_send(packet, b"no completion", None, SendFlags::NONE).unwrap();
    });
    rig.pump(3);
    assert_eq!(log.lock().received.len(), 1);
    assert_eq!(&log.lock().received[0][..13], b"no completion");

    // A synchronous request from the server side.
    let mut answer = [0u8; 24];
    let len = rig
        .server(|server| {
            server.channel_send_synchronous_request(
                channel,
                b"synchronous from host",
                None,
                SendFlags::WAIT_FOR_COMPLETION,
                Some(&mut answer),
                Some(50_000_000),
            )
        })
        .unwrap();
    assert_eq!(&answer[..21], b"synchronous from host");
    assert_eq!(len, 24);
    assert_eq!(echo.lock().echoed, 3, "two requests echoed as completions and one as a packet");
    assert_eq!(echo.lock().echo_failures, 0);
    let stats = rig.server(|s| s.stats());
    assert_eq!((stats.unknown_completions, stats.ring_errors, stats.oversized_packets), (0, 0, 0));
    assert!(stats.delivered >= 3, "hello, ping and the echoed packet: {stats:?}");
}

/// The crate's own server echo driver (`kmcl::echo_server::EchoServer`) against the client `EchoDriver`: the hello
/// negotiates `ECHO_VERSION`, pings of every size come back byte for byte, one-way packets are counted and not
/// answered, and the counts, the close and the reopen are what the two ends did.
#[test]
fn the_echo_server_driver_answers_the_echo_client_driver() {
    const ROUND_TRIPS: usize = 200;
    let rig = Rig::new();
    let (channel, state) = rig.server(|server| EchoServer::start(server, instance(9))).unwrap();
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Enabled));
    rig.pump(2);
    let (guest_channel, echo) = rig.start_echo(instance(9));
    rig.pump(2);
    assert_eq!(echo.lock().version, Some(ECHO_VERSION), "the hello was answered: {:?}", echo.lock());
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Active));
    {
        let state = state.lock();
        assert_eq!((state.opens, state.hellos, state.refused_hellos), (1, 1, 0));
        assert_eq!(state.version, Some(ECHO_VERSION));
        assert_eq!(state.events, ["opened", "started", "post_started"]);
    }

    // Round trips of 8..=512 bytes (multiples of 8: the ring pads payloads to 8 bytes), each answered in full.
    let mut bytes = 0u64;
    for i in 0..ROUND_TRIPS {
        let len = 8 * (1 + i % 64);
        let payload: Vec<u8> = (0..len).map(|b| (b + i) as u8).collect();
        let mut answer = [0u8; 512];
        let got = rig.guest(|g| EchoDriver::ping(g, guest_channel, &payload, &mut answer)).unwrap();
        assert_eq!(&answer[..got], &payload[..], "round trip {i}");
        bytes += len as u64;
    }
    // A payload that looks like a hello after negotiation is echoed, not taken for a hello.
    let hello_like = *b"ECHO\x07\0\0\0";
    let mut answer = [0u8; 8];
    let got = rig.guest(|g| EchoDriver::ping(g, guest_channel, &hello_like, &mut answer)).unwrap();
    assert_eq!(&answer[..got], &hello_like);
    // A packet asking for no completion is counted, not answered.
    rig.guest(|g| {
        let packet = g.packet_allocate(guest_channel)?;
        g.packet_send(packet, b"one way!", None, SendFlags::NONE)
    })
    .unwrap();
    rig.pump(3);
    {
        let state = state.lock();
        assert_eq!(state.packets, ROUND_TRIPS as u64 + 1);
        assert_eq!(state.bytes, bytes + 8);
        assert_eq!((state.one_way, state.failures, state.hellos), (1, 0, 1));
        assert!(state.summary().contains(&format!("{} packets, {} bytes echoed", ROUND_TRIPS + 1, bytes + 8)));
    }
    assert_eq!(echo.lock().echoed, 0, "the server sent no packet of its own");

    // The guest closes and reopens: the server counts both and negotiates again.
    rig.guest(|g| EchoDriver::stop(g, guest_channel)).unwrap();
    rig.pump(3);
    assert_eq!(state.lock().closes, 1);
    assert_eq!(state.lock().version, None);
    let (guest_channel, echo) = rig.start_echo(instance(9));
    rig.pump(2);
    assert_eq!(echo.lock().version, Some(ECHO_VERSION));
    let seen = state.lock().clone();
    assert_eq!((seen.opens, seen.hellos), (2, 2));

    // The server takes the device away: the guest's channel closes, the offer is rescinded.
    rig.server(|s| EchoServer::stop(s, channel)).unwrap();
    assert_eq!(state.lock().closes, 2);
    let events = state.lock().events.clone();
    assert_eq!(events[events.len() - 2..], ["suspend", "closed"]);
    assert_eq!(rig.guest(|g| g.channel_state(guest_channel)), Ok(ChannelState::Closed));
    assert_eq!(rig.server(|s| s.channel_state(channel)), Err(NtStatus::INVALID_PARAMETER_1), "cleaned up");
}

/// A hello asking for another version is refused with 0, and `EchoServer::start` needs a server's KMCL.
#[test]
fn the_echo_server_refuses_other_versions_and_needs_a_server_bus() {
    let rig = Rig::new();
    let (_channel, state) = rig.server(|server| EchoServer::start(server, instance(10))).unwrap();
    rig.pump(2);
    // A bare guest channel (no negotiation of its own) sends a hello for version 2.
    let guest_channel = rig.guest(|g| {
        let channel = g.channel_allocate()?;
        g.channel_init_set_maximum_packet_size(channel, 512)?;
        g.channel_init_set_callbacks(channel, Box::new(Silent))?;
        g.channel_init_set_target(channel, ECHO_INTERFACE_TYPE, Some(instance(10)))?;
        g.channel_enable(channel)?;
        Ok::<_, NtStatus>(channel)
    });
    let guest_channel = guest_channel.unwrap();
    rig.pump(2);
    let mut hello = [0u8; 8];
    hello[..4].copy_from_slice(b"ECHO");
    hello[4..].copy_from_slice(&2u32.to_le_bytes());
    let mut answer = [0xffu8; 8];
    let got = rig
        .guest(|g| {
            g.channel_send_synchronous_request(
                guest_channel,
                &hello,
                None,
                SendFlags::WAIT_FOR_COMPLETION,
                Some(&mut answer),
                Some(50_000_000),
            )
        })
        .unwrap();
    assert!(got >= 4);
    assert_eq!(&answer[..4], &0u32.to_le_bytes(), "version 2 refused");
    let seen = state.lock().clone();
    assert_eq!((seen.hellos, seen.refused_hellos, seen.version), (0, 1, None));
    // Not negotiated: a packet that is no hello is still echoed.
    let mut answer = [0u8; 8];
    let got = rig
        .guest(|g| {
            g.channel_send_synchronous_request(
                guest_channel,
                b"PING1234",
                None,
                SendFlags::WAIT_FOR_COMPLETION,
                Some(&mut answer),
                Some(50_000_000),
            )
        })
        .unwrap();
    assert_eq!(&answer[..got], b"PING1234");
    let seen = state.lock().clone();
    assert_eq!((seen.packets, seen.version), (1, None));

    // On a client bus there are no server channels to offer.
    assert_eq!(rig.guest(|g| EchoServer::start(g, instance(11)).map(|_| ())), Err(NtStatus::NOT_SUPPORTED));
}

/// A guest driver that completes what it gets and does nothing else.
struct Silent;

impl ChannelCallbacks for Silent {
    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        _channel: ChannelHandle,
        packet: PacketCompletion,
        _buffer: &[u8],
        _flags: ProcessPacketFlags,
    ) {
        let _ = kmcl.packet_complete(packet, &[]);
    }
}

#[test]
fn the_guest_closes_and_reopens_and_the_server_disable_rescinds() {
    let rig = Rig::new();
    let (channel, log) = rig.server(|server| server_echo(server, instance(2), None));
    rig.pump(2);
    let (guest_channel, echo) = rig.start_echo(instance(2));
    rig.pump(2);
    assert_eq!(echo.lock().version, Some(ECHO_VERSION));

    // The guest closes: the server suspends and closes, and the channel stays offered.
    rig.guest(|g| EchoDriver::stop(g, guest_channel)).unwrap();
    rig.pump(3);
    assert_eq!(log.lock().events, strings(&["opened", "started", "post_started", "suspend", "closed"]));
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Enabled));
    let relid = rig.server(|s| s.channel_relid(channel)).unwrap();
    assert_eq!(rig.loopback.with_server(|s| s.channel(relid).map(|c| c.status)), Some(ChannelStatus::Closed));
    assert_eq!(rig.server(|s| s.server_stats().guest_closes), 1);

    // And opens it again.
    let (guest_channel, echo) = rig.start_echo(instance(2));
    rig.pump(2);
    assert_eq!(echo.lock().version, Some(ECHO_VERSION), "negotiated again on the reopened channel");
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Active));
    assert_eq!(log.lock().events[5..], strings(&["opened", "started", "post_started"]));
    assert_eq!(rig.server(|s| s.server_stats().opens_accepted), 2);

    // Pause and start on the server as on the client: no packets are processed while paused.
    rig.server(|s| s.channel_pause(channel)).unwrap();
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Paused));
    let pinged = {
        let mut answer = [0u8; 8];
        rig.guest(|g| {
            g.channel_send_synchronous_request(
                guest_channel,
                b"paused?",
                None,
                SendFlags::WAIT_FOR_COMPLETION,
                Some(&mut answer),
                Some(5_000_000),
            )
        })
    };
    assert_eq!(pinged, Err(NtStatus::CANCELLED), "the paused server does not answer");
    rig.server(|s| s.channel_start(channel)).unwrap();
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Active));

    // The server disables: suspend, closed, rescind; the guest sees the rescind and releases the relid.
    let before = log.lock().events.len();
    rig.server(|s| s.channel_disable(channel)).unwrap();
    assert_eq!(log.lock().events[before..], strings(&["suspend", "closed"]));
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Disabled));
    assert_eq!(rig.server(|s| s.server_stats().unreleased_rescinds), 0, "the guest released the relid in time");
    assert!(rig.loopback.with_server(|s| s.channel(relid)).is_none(), "the relid is free again");
    assert_eq!(rig.guest(|g| g.channel_state(guest_channel)), Ok(ChannelState::Closed));
    assert_eq!(echo.lock().events[3..], ["suspend", "closed"]);
    let sent = rig.guest(|g| {
        let packet = g.packet_allocate(guest_channel)?;
        let result = g.packet_send(packet, b"anyone?", None, SendFlags::NONE);
        g.packet_free(packet)?;
        result
    });
    assert_eq!(sent, Err(NtStatus::DEVICE_REMOVED));
    rig.server(|s| s.channel_cleanup(channel)).unwrap();
    assert_eq!(rig.server(|s| s.channel_state(channel)), Err(NtStatus::INVALID_PARAMETER_1));
}

#[test]
fn an_opened_failure_refuses_the_open_and_the_channel_stays_offered() {
    let rig = Rig::new();
    let (channel, log) = rig.server(|server| server_echo(server, instance(3), Some(NtStatus::INSUFFICIENT_RESOURCES)));
    rig.pump(2);
    let (guest_channel, echo) = rig.start_echo(instance(3));
    rig.pump(2);
    assert_eq!(log.lock().events, strings(&["opened"]));
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Enabled));
    assert_eq!(rig.server(|s| s.server_stats().opens_refused), 1);
    assert_eq!(rig.guest(|g| g.channel_state(guest_channel)), Ok(ChannelState::Closed));
    assert_eq!(echo.lock().version, None);
    let relid = rig.server(|s| s.channel_relid(channel)).unwrap();
    let summary = rig.loopback.with_server(|s| s.channel(relid)).unwrap();
    assert_eq!((summary.status, summary.rescinded), (ChannelStatus::Closed, false));
}

#[derive(Debug)]
struct NotAPartition;

impl KernelObject for NotAPartition {
    const TYPE_NAME: &'static str = "NotAPartition";
}

#[test]
fn every_server_only_rule_returns_its_documented_status() {
    let rig = Rig::new();
    let handles = Arc::clone(&rig.handles);
    rig.server(|server| {
        let channel = server.channel_allocate().unwrap();
        // Flags: known bits map to offer flags, unknown bits are `_2`.
        assert_eq!(
            server.server_channel_init_set_flags(channel, ServerChannelFlags(0x20)),
            Err(NtStatus::INVALID_PARAMETER_2)
        );
        let flags = ServerChannelFlags(
            ServerChannelFlags::ENUMERATE_DEVICE_INTERFACE.0
                | ServerChannelFlags::OFFER_AS_PIPE.0
                | ServerChannelFlags::FORCE_NEW_CHANNEL.0,
        );
        server.server_channel_init_set_flags(channel, flags).unwrap();
        assert_eq!(flags.offer_flags(), OfferFlags::ENUMERATE_DEVICE_INTERFACE | OfferFlags::NAMED_PIPE_MODE);
        // MMIO: both 0 is INVALID_PARAMETER, more than 16 bits `_2`/`_3`.
        assert_eq!(server.server_channel_init_set_mmio_megabytes(channel, 0, 0), Err(NtStatus::INVALID_PARAMETER));
        assert_eq!(
            server.server_channel_init_set_mmio_megabytes(channel, 70_000, 0),
            Err(NtStatus::INVALID_PARAMETER_2)
        );
        assert_eq!(
            server.server_channel_init_set_mmio_megabytes(channel, 0, 70_000),
            Err(NtStatus::INVALID_PARAMETER_3)
        );
        server.server_channel_init_set_mmio_megabytes(channel, 16, 32).unwrap();
        // VTL 0 only; user data at most 120 bytes; pipe modes byte or message.
        assert_eq!(server.server_channel_init_set_target_vtl(channel, 2), Err(NtStatus::INVALID_PARAMETER_2));
        server.server_channel_init_set_target_vtl(channel, 0).unwrap();
        assert_eq!(
            server.server_channel_init_set_offer_user_data(channel, &[0; 121]),
            Err(NtStatus::INVALID_PARAMETER_2)
        );
        assert_eq!(server.server_channel_init_set_pipe_mode(channel, 7), Err(NtStatus::INVALID_PARAMETER_2));
        server.server_channel_init_set_pipe_mode(channel, PIPE_MODE_MESSAGE).unwrap();

        // The VMBus handle: a partition's kernel handle resolves and is recorded; a closed one and one of another
        // type fail with the handle module's statuses.
        let context = handles.create_context().unwrap();
        let partition = handles.insert(context, Arc::new(VmbusPartition::new(PartitionId(7), "guest"))).unwrap();
        let kernel = handles.vmb_convert_vmbus_handle_to_kernel_handle(context, partition.raw()).unwrap();
        server.server_channel_init_set_vmbus_handle(channel, kernel).unwrap();
        assert_eq!(server.server_channel_partition(channel), Ok(Some(PartitionId(7))));
        handles.close_kernel_handle(kernel).unwrap();
        assert_eq!(server.server_channel_init_set_vmbus_handle(channel, kernel), Err(NtStatus::INVALID_HANDLE));
        let other = handles.insert(ContextId::KERNEL, Arc::new(NotAPartition)).unwrap();
        let other = KernelHandle::from_raw(other.raw()).unwrap();
        assert_eq!(server.server_channel_init_set_vmbus_handle(channel, other), Err(NtStatus::OBJECT_TYPE_MISMATCH));
        assert_eq!(server.server_channel_partition(channel), Ok(Some(PartitionId(7))), "a failure changes nothing");

        // Client-only functions on a server channel, and wrong states, are `_1`.
        assert_eq!(server.channel_init_set_ring_buffer_page_count(channel, 4, 4), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(
            server.channel_init_set_target(channel, ECHO_INTERFACE_TYPE, None),
            Err(NtStatus::INVALID_PARAMETER_1)
        );
        assert_eq!(server.channel_init_set_target_vp(channel, 0), Err(NtStatus::INVALID_PARAMETER_1));
        let primary = server.channel_allocate().unwrap();
        assert_eq!(server.channel_init_set_primary_channel(channel, primary), Err(NtStatus::INVALID_PARAMETER_1));
        server.channel_cleanup(primary).unwrap();
        // The guest places a server channel's MMIO, and the host end has no monitor page of its own.
        assert_eq!(server.channel_mmio_space(channel), Err(NtStatus::NOT_SUPPORTED));
        assert_eq!(server.channel_enable(channel), Err(NtStatus::INVALID_PARAMETER_1), "no callbacks yet");
        let log = Arc::new(Mutex::new(ServerLog::default()));
        server.channel_init_set_callbacks(channel, Box::new(ServerEcho { log, refuse_open: None })).unwrap();
        assert_eq!(server.channel_enable(channel), Err(NtStatus::INVALID_PARAMETER_1), "no interface id yet");
        server.server_channel_init_set_target_interface_id(channel, ECHO_INTERFACE_TYPE, instance(4)).unwrap();
        server.server_channel_init_set_offer_user_data(channel, &[0xAB; 120]).unwrap();
        assert_eq!(server.channel_enable(channel), Err(NtStatus::INVALID_BUFFER_SIZE), "120 bytes after a pipe mode");
        server.server_channel_init_set_offer_user_data(channel, b"user").unwrap();
        server.channel_enable(channel).unwrap();
        assert_eq!(
            server.server_channel_init_set_flags(channel, ServerChannelFlags::NONE),
            Err(NtStatus::INVALID_PARAMETER_1)
        );
        assert_eq!(server.server_channel_init_set_target_vtl(channel, 0), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(server.channel_init_set_maximum_packet_size(channel, 64), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(server.channel_start(channel), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(server.channel_pause(channel), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(server.channel_cleanup(channel), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(
            server.channel_create_gpadl_from_pfn_list(channel, GpadlFlags::NONE, &[BASE_PFN], 0, 4096),
            Err(NtStatus::INVALID_PARAMETER_1)
        );

        // The offer as the host made it.
        let offer = server.channel_offer(channel).unwrap();
        assert_eq!(offer.flags, OfferFlags::ENUMERATE_DEVICE_INTERFACE | OfferFlags::NAMED_PIPE_MODE);
        assert_eq!(offer.mmio_megabytes, 16);
        assert_eq!(offer.user_defined[..8], [4, 0, 0, 0, b'u', b's', b'e', b'r'], "pipe mode, then the user data");
        let spec = rig.loopback.with_server(|s| s.offer_spec(offer.child_relid).cloned()).unwrap();
        assert!(spec.confirm_opens, "the bus answers opens itself");
        assert_eq!(server.server_channel_settings(channel).unwrap().mmio_megabytes, (16, 32));

        // Save and restore: the state rules (the round trip has its own test).
        assert_eq!(server.channel_save_continue(channel, &mut [0; 64]), Err(NtStatus::INVALID_PARAMETER_1), "no save");
        assert_eq!(server.channel_save_end(channel), Err(NtStatus::INVALID_PARAMETER_1));
        server.channel_save_begin(channel).unwrap();
        assert_eq!(server.channel_save_begin(channel), Err(NtStatus::INVALID_PARAMETER_1), "one save at a time");
        assert_eq!(server.channel_save_continue(channel, &mut [0; 63]), Err(NtStatus::BUFFER_TOO_SMALL));
        server.channel_save_end(channel).unwrap();
        assert_eq!(server.packet_restore(channel, &[0; 16]), Err(NtStatus::INVALID_PARAMETER_1), "outside a restore");
        assert_eq!(server.channel_restore_from_buffer(channel, b"KMCLSAV1"), Err(NtStatus::INVALID_PARAMETER_1));
        let fresh = server.channel_allocate().unwrap();
        assert_eq!(
            server.channel_restore_from_buffer(fresh, b"not a saved channel"),
            Err(NtStatus::INVALID_PARAMETER_2)
        );
        assert_eq!(server.channel_restore_from_buffer(fresh, &[]), Err(NtStatus::INVALID_PARAMETER_2));
        assert_eq!(server.channel_save_begin(fresh), Err(NtStatus::INVALID_PARAMETER_1), "nothing offered to save");
        server.channel_cleanup(fresh).unwrap();

        // A stale channel handle is `_1` everywhere.
        server.channel_disable(channel).unwrap();
        server.channel_cleanup(channel).unwrap();
        assert_eq!(server.channel_save_begin(channel), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(server.server_channel_init_set_target_vtl(channel, 0), Err(NtStatus::INVALID_PARAMETER_1));
        assert_eq!(
            server.channel_map_gpadl(channel, MapGpadlFlags::NONE, 1).err(),
            Some(NtStatus::INVALID_PARAMETER_1)
        );
    });
}

#[test]
fn map_gpadl_rules_read_only_one_mapping_and_unmap() {
    let rig = Rig::new();
    let (channel, _log) = rig.server(|server| server_echo(server, instance(5), None));
    rig.pump(2);
    let (guest_channel, echo) = rig.start_echo(instance(5));
    rig.pump(2);
    // The echo driver's shared page GPADL, and a second, read-only one.
    let shared = echo.lock().shared_gpadl.unwrap();
    let shared_handle = shared.id();
    let page = rig.arena.allocate(1).unwrap();
    let read_only = rig
        .guest(|g| g.channel_create_gpadl_from_pfn_list(guest_channel, GpadlFlags::READ_ONLY, &[page], 0, 4096))
        .unwrap();
    // GPADL_HEADER carries no read-only bit: an in-process client tells the server (see `Server::set_gpadl_read_only`).
    rig.loopback.with_server(|s| s.set_gpadl_read_only(read_only.id())).unwrap();

    rig.server(|server| {
        assert_eq!(
            server.channel_map_gpadl(channel, MapGpadlFlags(0x2), shared_handle).err(),
            Some(NtStatus::INVALID_PARAMETER_2)
        );
        assert_eq!(
            server.channel_map_gpadl(channel, MapGpadlFlags::NONE, 0xdead).err(),
            Some(NtStatus::INVALID_PARAMETER_3)
        );
        assert_eq!(
            server.channel_unmap_gpadl(channel, shared_handle),
            Err(NtStatus::INVALID_PARAMETER_3),
            "not mapped"
        );
        // Writable mapping of a read-only GPADL fails; read-only works, once.
        assert_eq!(
            server.channel_map_gpadl(channel, MapGpadlFlags::NONE, read_only.id()).err(),
            Some(NtStatus::ACCESS_DENIED)
        );
        let mapped = server.channel_map_gpadl(channel, MapGpadlFlags::READ_ONLY, read_only.id()).unwrap();
        assert!(!mapped.writable);
        assert_eq!(mapped.len(), 4096);
        assert_eq!(
            server.channel_map_gpadl(channel, MapGpadlFlags::READ_ONLY, read_only.id()).err(),
            Some(NtStatus::INVALID_DEVICE_STATE)
        );
        assert_eq!(server.channel_write_mapped_gpadl(channel, read_only.id(), 0, b"no"), Err(NtStatus::ACCESS_DENIED));
        server.channel_unmap_gpadl(channel, read_only.id()).unwrap();
        assert_eq!(server.channel_unmap_gpadl(channel, read_only.id()), Err(NtStatus::INVALID_PARAMETER_3));

        // The shared page, writable: the server's bytes land in the guest's page.
        server.channel_map_gpadl(channel, MapGpadlFlags::NONE, shared_handle).unwrap();
        server.channel_write_mapped_gpadl(channel, shared_handle, 100, b"from the host").unwrap();
        let mut back = [0u8; 13];
        server.channel_read_mapped_gpadl(channel, shared_handle, 100, &mut back).unwrap();
        assert_eq!(&back, b"from the host");
        assert_eq!(
            server.channel_read_mapped_gpadl(channel, shared_handle, 4090, &mut back),
            Err(NtStatus::INVALID_PARAMETER_3),
            "past the GPADL's end"
        );
        assert_eq!(
            server.channel_read_mapped_gpadl(channel, read_only.id(), 0, &mut back),
            Err(NtStatus::INVALID_PARAMETER_2)
        );
        server.channel_unmap_gpadl(channel, shared_handle).unwrap();
    });
    let shared_pfn =
        rig.loopback.with_server(|s| s.gpadl(shared_handle).and_then(|g| g.whole_pages().map(|p| p[0]))).unwrap();
    let mut seen = [0u8; 13];
    rig.arena.read(shared_pfn * PAGE_SIZE + 100, &mut seen).unwrap();
    assert_eq!(&seen, b"from the host");

    // The guest deletes the read-only GPADL; a GPADL left mapped at close is unmapped by the bus and counted.
    rig.guest(|g| g.channel_delete_gpadl(guest_channel, read_only)).unwrap();
    rig.server(|server| server.channel_map_gpadl(channel, MapGpadlFlags::READ_ONLY, shared_handle)).unwrap();
    assert!(rig.loopback.with_server(|s| s.is_gpadl_mapped(shared_handle)));
    rig.server(|server| server.channel_disable(channel)).unwrap();
    assert!(!rig.loopback.with_server(|s| s.is_gpadl_mapped(shared_handle)));
    assert_eq!(rig.server(|s| s.stats().leaked_gpadls), 1);
}

#[test]
fn sixty_four_server_channels_at_once() {
    let rig = Rig::new();
    let servers: Vec<_> = (0..64).map(|n| rig.server(|server| server_echo(server, instance(100 + n), None))).collect();
    rig.pump(2);
    let guests: Vec<_> = (0..64).map(|n| rig.start_echo(instance(100 + n))).collect();
    rig.pump(3);
    for (n, ((server_channel, log), (guest_channel, echo))) in servers.iter().zip(&guests).enumerate() {
        assert_eq!(echo.lock().version, Some(ECHO_VERSION), "channel {n}");
        assert_eq!(log.lock().events, strings(&["opened", "started", "post_started"]));
        assert_eq!(rig.server(|s| s.channel_state(*server_channel)), Ok(ChannelState::Active));
        let payload = format!("channel {n:02} says hi");
        let mut answer = [0u8; 24];
        let len = rig.guest(|g| EchoDriver::ping(g, *guest_channel, payload.as_bytes(), &mut answer)).unwrap();
        assert_eq!(&answer[..payload.len()], payload.as_bytes());
        assert_eq!(len, 24);
    }
    let relids: std::collections::BTreeSet<u32> =
        servers.iter().map(|(channel, _)| rig.server(|s| s.channel_relid(*channel)).unwrap()).collect();
    assert_eq!(relids.len(), 64, "each channel its own offer");
    assert_eq!(rig.server(|s| s.server_stats().opens_accepted), 64);
    for (channel, _) in &servers {
        rig.server(|s| s.channel_disable(*channel)).unwrap();
    }
    assert_eq!(rig.server(|s| s.server_stats().unreleased_rescinds), 0);
    for (guest_channel, _) in &guests {
        assert_eq!(rig.guest(|g| g.channel_state(*guest_channel)), Ok(ChannelState::Closed));
    }
}

/// A server driver that answers through the guest's external buffer: it reads the request there, writes its answer
/// 50 bytes further in, and completes with `b"done"`.
struct ServerDma {
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl ChannelCallbacks for ServerDma {
    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        _channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        flags: ProcessPacketFlags,
    ) {
        assert_eq!(flags, ProcessPacketFlags::EXTERNAL_DATA);
        let server = kmcl.as_server().unwrap();
        let mut request = vec![0u8; 13];
        server.packet_read_external_data(packet, 0, &mut request).unwrap();
        assert_eq!(server.packet_read_external_data(packet, 95, &mut [0; 8]), Err(NtStatus::INVALID_PARAMETER_2));
        server.packet_write_external_data(packet, 50, b"answer in place").unwrap();
        self.requests.lock().push([&buffer[..6], &request[..]].concat());
        kmcl.packet_complete(packet, b"done").unwrap();
    }
}

/// A guest driver that only takes completions (it sends; nothing comes in unasked).
struct GuestSender;

impl ChannelCallbacks for GuestSender {
    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        _channel: ChannelHandle,
        packet: PacketCompletion,
        _buffer: &[u8],
        _flags: ProcessPacketFlags,
    ) {
        kmcl.packet_complete(packet, &[]).unwrap();
    }
}

#[test]
fn the_server_reads_and_writes_a_guest_packets_external_data() {
    let rig = Rig::new();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let channel = rig.server(|server| {
        let channel = server.channel_allocate().unwrap();
        server.channel_init_set_maximum_external_data(channel, 4096, 2).unwrap();
        server.channel_init_set_callbacks(channel, Box::new(ServerDma { requests: Arc::clone(&requests) })).unwrap();
        server.server_channel_init_set_target_interface_id(channel, ECHO_INTERFACE_TYPE, instance(6)).unwrap();
        server.channel_enable(channel).unwrap();
        channel
    });
    rig.pump(2);
    let page = rig.arena.allocate(1).unwrap();
    rig.arena.write(page * PAGE_SIZE + 16, b"read me, host").unwrap();
    let completion = Arc::new(Mutex::new(None));
    rig.guest(|guest| {
        let channel = guest.channel_allocate().unwrap();
        guest.channel_init_set_maximum_external_data(channel, 4096, 2).unwrap();
        guest.channel_init_set_ring_buffer_page_count(channel, 4, 4).unwrap();
        guest.channel_init_set_callbacks(channel, Box::new(GuestSender)).unwrap();
        guest.channel_init_set_target(channel, ECHO_INTERFACE_TYPE, Some(instance(6))).unwrap();
        guest.channel_enable(channel).unwrap();
        assert_eq!(guest.channel_state(channel), Ok(ChannelState::Active));
        let packet = guest.packet_allocate(channel).unwrap();
        let seen = Arc::clone(&completion);
        guest
            .packet_set_completion_routine(
                packet,
                Box::new(move |kmcl, packet, status, payload| {
                    *seen.lock() = Some((status, payload[..4].to_vec()));
                    kmcl.packet_free(packet).unwrap();
                }),
            )
            .unwrap();
        let range = vmbus::kmcl::ExternalRange { byte_offset: 16, byte_count: 100, pfns: vec![page] };
        guest.packet_send(packet, b"header", Some(&[range]), SendFlags::WAIT_FOR_COMPLETION).unwrap();
    });
    rig.pump(3);
    assert_eq!(*requests.lock(), [b"headerread me, host".to_vec()]);
    assert_eq!(*completion.lock(), Some((NtStatus::SUCCESS, b"done".to_vec())));
    let mut answer = [0u8; 15];
    rig.arena.read(page * PAGE_SIZE + 16 + 50, &mut answer).unwrap();
    assert_eq!(&answer, b"answer in place");
    assert_eq!(rig.server(|s| s.channel_state(channel)), Ok(ChannelState::Active));
}

/// What the holding server driver saw and holds.
#[derive(Default)]
struct HoldState {
    events: Vec<String>,
    /// Packets it holds uncompleted, with their payloads.
    held: Vec<(PacketCompletion, Vec<u8>)>,
}

/// A server driver that answers the echo hello, holds packets starting with `"hold"` and echoes the rest as their
/// completions.
struct Holder {
    state: Arc<Mutex<HoldState>>,
}

impl ChannelCallbacks for Holder {
    fn opened(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) -> vmbus::kmcl::Result<()> {
        self.state.lock().events.push("opened".into());
        Ok(())
    }

    fn started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.state.lock().events.push("started".into());
    }

    fn post_started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.state.lock().events.push("post_started".into());
    }

    fn suspend(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.state.lock().events.push("suspend".into());
    }

    fn closed(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.state.lock().events.push("closed".into());
    }

    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        _channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        _flags: ProcessPacketFlags,
    ) {
        if buffer.starts_with(b"hold") {
            self.state.lock().held.push((packet, buffer.to_vec()));
        } else if buffer.starts_with(b"ECHO") {
            kmcl.packet_complete(packet, &u64::from(ECHO_VERSION).to_le_bytes()).unwrap();
        } else {
            kmcl.packet_complete(packet, buffer).unwrap();
        }
    }
}

/// The holding driver's part of a save: the payload of each held packet.
struct HolderSaves {
    state: Arc<Mutex<HoldState>>,
}

impl PacketSaveRestore for HolderSaves {
    fn save_packet(&mut self, _channel: ChannelHandle, packet: PacketCompletion) -> Vec<u8> {
        let state = self.state.lock();
        state.held.iter().find(|(held, _)| *held == packet).map(|(_, payload)| payload.clone()).unwrap()
    }

    fn restore_packet(
        &mut self,
        server: &mut dyn KmclServer,
        channel: ChannelHandle,
        library_data: &[u8],
        driver_data: &[u8],
    ) {
        let packet = server.packet_restore(channel, library_data).unwrap();
        let mut state = self.state.lock();
        state.events.push("restore_packet".into());
        state.held.push((packet, driver_data.to_vec()));
    }
}

fn holding_channel(server: &mut Server, state: &Arc<Mutex<HoldState>>) -> ChannelHandle {
    let channel = server.channel_allocate().unwrap();
    server.channel_init_set_callbacks(channel, Box::new(Holder { state: Arc::clone(state) })).unwrap();
    server
        .server_channel_init_set_save_restore_packet_callbacks(
            channel,
            Box::new(HolderSaves { state: Arc::clone(state) }),
        )
        .unwrap();
    channel
}

/// A guest send with `WAIT_FOR_COMPLETION` whose completion lands in `done`.
fn guest_send(guest: &mut Guest, channel: ChannelHandle, payload: &[u8], done: &Arc<Mutex<Vec<Vec<u8>>>>) {
    let packet = guest.packet_allocate(channel).unwrap();
    let done = Arc::clone(done);
    guest
        .packet_set_completion_routine(
            packet,
            Box::new(move |kmcl, packet, status, payload| {
                assert_eq!(status, NtStatus::SUCCESS);
                done.lock().push(payload.to_vec());
                kmcl.packet_free(packet).unwrap();
            }),
        )
        .unwrap();
    guest.packet_send(packet, payload, None, SendFlags::WAIT_FOR_COMPLETION).unwrap();
}

#[test]
fn a_saved_channel_is_restored_on_a_new_server_bus_while_the_guest_keeps_it_open() {
    let rig = Rig::new();
    let before = Arc::new(Mutex::new(HoldState::default()));
    let channel = rig.server(|server| {
        let channel = holding_channel(server, &before);
        server.server_channel_init_set_target_interface_id(channel, ECHO_INTERFACE_TYPE, instance(7)).unwrap();
        server.server_channel_init_set_mmio_megabytes(channel, 4, 8).unwrap();
        server.channel_init_set_friendly_name(channel, "saved holder").unwrap();
        server.channel_enable(channel).unwrap();
        channel
    });
    rig.pump(2);
    let (guest_channel, echo) = rig.start_echo(instance(7));
    rig.pump(2);
    assert_eq!(echo.lock().version, Some(ECHO_VERSION));
    let relid = rig.server(|s| s.channel_relid(channel)).unwrap();

    // One packet held by the driver, then (paused) one waiting in the backlog.
    let done = Arc::new(Mutex::new(Vec::new()));
    rig.guest(|g| guest_send(g, guest_channel, b"hold me", &done));
    rig.pump(2);
    assert_eq!(before.lock().held.len(), 1);
    rig.server(|s| s.channel_pause(channel)).unwrap();
    rig.guest(|g| guest_send(g, guest_channel, b"queued while paused", &done));
    rig.pump(2);
    assert!(done.lock().is_empty(), "nothing completed yet");

    // Save in 64-byte chunks, end, release the channel without rescinding it.
    let mut saved = Vec::new();
    rig.server(|server| server.channel_save_begin(channel)).unwrap();
    // What arrives after the snapshot stays in the ring for the restored channel.
    rig.guest(|g| guest_send(g, guest_channel, b"after the snapshot", &done));
    rig.pump(2);
    let chunks = rig.server(|server| {
        let mut chunks = 0;
        loop {
            let mut buffer = [0u8; 64];
            chunks += 1;
            match server.channel_save_continue(channel, &mut buffer).unwrap() {
                SaveProgress::More(n) => saved.extend_from_slice(&buffer[..n]),
                SaveProgress::Done(n) => {
                    saved.extend_from_slice(&buffer[..n]);
                    break;
                }
            }
        }
        server.channel_save_end(channel).unwrap();
        server.channel_disable(channel).unwrap();
        server.channel_cleanup(channel).unwrap();
        chunks
    });
    assert!(chunks > 2, "{} bytes in {chunks} chunks", saved.len());
    assert_eq!(before.lock().events.last().map(String::as_str), Some("closed"));
    let summary = rig.loopback.with_server(|s| s.channel(relid)).unwrap();
    assert_eq!((summary.status, summary.rescinded), (ChannelStatus::Open, false), "the guest keeps its channel");
    assert_eq!(rig.guest(|g| g.channel_state(guest_channel)), Ok(ChannelState::Active));

    // A new server bus (the driver restarted) takes the channel over from the saved bytes, fed in other pieces.
    let server = ServerBus::new(rig.loopback, Arc::clone(&rig.handles));
    *rig.server.lock() = Some(server);
    let hook_guest = Arc::clone(&rig.guest);
    let loopback = rig.loopback;
    rig.server(|s| s.set_idle_hook(Some(Box::new(move || guest_turn(loopback, &hook_guest)))));
    let after = Arc::new(Mutex::new(HoldState::default()));
    let restored = rig.server(|server| {
        let channel = holding_channel(server, &after);
        let pieces: Vec<&[u8]> = saved.chunks(50).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let progress = server.channel_restore_from_buffer(channel, piece).unwrap();
            let last = i + 1 == pieces.len();
            assert_eq!(progress, if last { RestoreProgress::Done } else { RestoreProgress::MoreChunks });
        }
        let settings = server.server_channel_settings(channel).unwrap();
        assert_eq!(settings.mmio_megabytes, (4, 8));
        server.channel_enable(channel).unwrap();
        channel
    });
    assert_eq!(after.lock().events, strings(&["restore_packet", "started", "post_started"]), "no second Opened");
    assert_eq!(rig.server(|s| s.channel_relid(restored)), Ok(relid), "the same offer, not a new one");
    assert_eq!(rig.server(|s| s.channel_state(restored)), Ok(ChannelState::Active));
    assert_eq!(rig.server(|s| s.server_stats().restored_opens), 1);
    rig.pump(2);
    assert_eq!(done.lock().len(), 2);
    assert!(done.lock()[0].starts_with(b"queued while paused"), "the backlog was delivered again and echoed");
    assert!(done.lock()[1].starts_with(b"after the snapshot"), "then what waited in the ring");

    // The restored driver finishes the packet it held before the restart.
    let (held, payload) = after.lock().held.pop().unwrap();
    assert!(payload.starts_with(b"hold me"));
    rig.server(|s| s.packet_complete(held, b"finally")).unwrap();
    rig.pump(2);
    assert_eq!(done.lock().len(), 3);
    assert!(done.lock()[2].starts_with(b"finally"));

    // Traffic goes on both ways.
    let mut answer = [0u8; 8];
    let len = rig.guest(|g| EchoDriver::ping(g, guest_channel, b"still?", &mut answer)).unwrap();
    assert_eq!(&answer[..len.min(6)], b"still?");
    let mut answer = [0u8; 8];
    rig.server(|s| {
        s.channel_send_synchronous_request(
            restored,
            b"and you",
            None,
            SendFlags::WAIT_FOR_COMPLETION,
            Some(&mut answer),
            Some(50_000_000),
        )
    })
    .unwrap();
    assert_eq!(&answer[..7], b"and you");
    assert_eq!(rig.server(|s| s.stats().unknown_completions), 0);

    // A second restore of the same bytes finds the offer taken.
    rig.server(|server| {
        let state = Arc::new(Mutex::new(HoldState::default()));
        let channel = holding_channel(server, &state);
        assert_eq!(server.channel_restore_from_buffer(channel, &saved), Ok(RestoreProgress::Done));
        assert_eq!(server.channel_enable(channel), Err(NtStatus::NOT_FOUND));
    });
}

/// Interrupt pages that record nothing (the memory-less bus has none to set).
struct NoPages;

impl vmbus::channel::InterruptPages for NoPages {
    fn set_send_interrupt(&self, _relid: u32) {}
    fn set_monitor_pending(&self, _monitor_id: u8) {}
}

/// Rings from host memory the loopback bus cannot see.
struct HeapRings;

impl vmbus::kmcl::RingAllocator for HeapRings {
    type Memory = Arc<vmbus::ring::OwnedRingMemory>;
    type Lease = ();

    fn allocate(
        &self,
        outgoing: u32,
        incoming: u32,
    ) -> vmbus::kmcl::Result<(vmbus::channel::ChannelRings<Self::Memory>, ())> {
        let ring = |pages: u32| Arc::new(vmbus::ring::OwnedRingMemory::new((pages as usize - 1) * 4096).unwrap());
        let pfns = (0..u64::from(outgoing + incoming)).map(|i| 0x8000 + i).collect();
        let rings = vmbus::channel::ChannelRings {
            outgoing: ring(outgoing),
            incoming: ring(incoming),
            pfns,
            outgoing_pages: outgoing,
        };
        Ok((rings, ()))
    }

    fn release(&self, _lease: (), _host_released: bool) {}
}

#[test]
fn a_host_without_guest_memory_refuses_the_open_and_the_opened_callback_is_rolled_back() {
    let loopback: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::new(ServerConfig::new())));
    let server = Arc::new(Mutex::new(Some(ServerBus::new(loopback, Arc::new(Handles::new())))));
    let (channel, log) = server.lock().as_mut().map(|s| server_echo(s, instance(8), None)).unwrap();
    let transport = GuestTransport { bus: loopback, server: Arc::clone(&server) };
    let mut connection =
        Connection::connect(transport, ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))).unwrap();
    connection.request_offers().unwrap();
    let mut guest = Bus::new(connection, NoPages, HeapRings);
    let (guest_channel, echo) = EchoDriver::start(&mut guest, Some(instance(8)), 0x9000).unwrap();
    assert_eq!(guest.channel_state(guest_channel), Ok(ChannelState::Closed), "the open was refused");
    assert_eq!(echo.lock().version, None);
    assert_eq!(log.lock().events, strings(&["opened", "closed"]), "Closed rolls Opened back");
    let mut server = server.lock();
    let server = server.as_mut().unwrap();
    assert_eq!(server.channel_state(channel), Ok(ChannelState::Enabled), "still offered");
    assert_eq!(server.server_stats().rings_refused, 1);
    assert_eq!(server.server_stats().opens_accepted, 0);
}
