//! In-kernel tests of the kernel's VMBus pieces: the interrupt and monitor pages, heap ring pages, and a channel
//! opened on the real host with a packet each way (skipped where there is no VMBus host).

use super::rings::allocate_channel_rings;
use super::{BusPages, connect, offer_table};
use crate::hyperv::transport::KernelTransport;
use crate::ktest::{KTest, TestError, TestResult};
use crate::{kassert, kassert_eq, time};
use alloc::format;
use core::sync::atomic::Ordering;
use vmbus::channel::{Channel, InterruptPages};
use vmbus::client::VmbusTransport;
use vmbus::protocol::device_class;
use vmbus::ring::{OutgoingPacket, PacketType, RingMemory};

/// The bus tests.
pub const KTESTS: &[KTest] = &[
    KTest { name: "bus::interrupt_and_monitor_bits", run: interrupt_and_monitor_bits },
    KTest { name: "bus::heap_rings_are_contiguous_pages", run: heap_rings_are_contiguous_pages },
    KTest { name: "bus::balloon_channel_packet_round_trip", run: balloon_channel_packet_round_trip },
    KTest { name: "bus::kmcl_channel_lifecycle_on_the_host", run: kmcl_channel_lifecycle_on_the_host },
    KTest { name: "bus::loopback_channel_driven_by_interrupts", run: loopback_channel_driven_by_interrupts },
    KTest { name: "bus::kmcl_server_echo_on_the_loopback", run: kmcl_server_echo_on_the_loopback },
];

/// Round trips of the KMCL server echo test.
const SERVER_ECHO_ROUND_TRIPS: u64 = 200;

/// KMCL at both ends of a loopback channel, driven by real interrupts: the host runs a KMCL server bus with the
/// example echo server driver (`vmbus::kmcl::echo_server::EchoServer`) in its turn, the guest binds the example
/// client driver (`vmbus::kmcl::echo::EchoDriver`); the hello negotiates the version, pings of 8..=256 bytes come
/// back byte for byte, and the server's counts match what the client sent. The guest's close reaches the server.
fn kmcl_server_echo_on_the_loopback() -> TestResult {
    use super::loopback;
    use vmbus::kmcl::echo::{ECHO_VERSION, EchoDriver};
    use vmbus::kmcl::echo_server::{EchoServer, EchoServerState};
    use vmbus::kmcl::{Handles, ServerBus};

    let instance = vmbus::protocol::Guid::from_canonical("6563686f-0001-4b4d-434c-0000000000ee");
    let interrupts_before = loopback::interrupt_count();
    let server: alloc::sync::Arc<spin::Mutex<Option<loopback::LoopbackServerBus>>> =
        alloc::sync::Arc::new(spin::Mutex::new(None));
    let server_state: alloc::sync::Arc<spin::Mutex<Option<alloc::sync::Arc<spin::Mutex<EchoServerState>>>>> =
        alloc::sync::Arc::new(spin::Mutex::new(None));
    let shared_page = alloc::sync::Arc::new(spin::Mutex::new(None));
    let serving = server.clone();
    time::start_timer(time::TimerMode::Periodic, core::time::Duration::from_millis(10), || {})
        .map_err(|e| format!("kernel timer: {e:?}"))?;
    let result = (|| -> TestResult {
        let mut bus = loopback::start(
            vmbus::server::ServerConfig::new(),
            |host| {
                let mut bus = ServerBus::new(host, alloc::sync::Arc::new(Handles::new()));
                *server_state.lock() = EchoServer::start(&mut bus, instance).ok().map(|(_, state)| state);
                *shared_page.lock() = host.memory().and_then(|memory| memory.allocate(1).ok());
                *server.lock() = Some(bus);
            },
            Some(alloc::boxed::Box::new(move |host| {
                loopback::server_turn(&serving, host);
            })),
        )
        .map_err(|e| format!("loopback bus: {e}"))?;
        let state = server_state.lock().clone().ok_or("the echo server did not start")?;
        let page = shared_page.lock().ok_or("no loopback guest page")?;
        let (channel, client) =
            EchoDriver::start(&mut bus, Some(instance), page).map_err(|e| format!("echo driver: {e}"))?;
        // The hello goes out in post_started and waits for the server's answer there.
        let deadline = time::now() + 2_000_000_000;
        let negotiating = || {
            let client = client.lock();
            client.version.is_none() && client.negotiation_error.is_none()
        };
        while negotiating() && time::now() < deadline {
            if loopback::dispatch(&mut bus) == 0 {
                bus.connection().transport().wait();
            }
        }
        kassert_eq!(client.lock().version, Some(ECHO_VERSION));
        let started = time::now();
        let mut bytes = 0u64;
        for i in 0..SERVER_ECHO_ROUND_TRIPS {
            let len = 8 * (1 + (i as usize % 32));
            let payload: alloc::vec::Vec<u8> = (0..len).map(|b| (b as u64 + i) as u8).collect();
            let mut answer = [0u8; 256];
            let got =
                EchoDriver::ping(&mut bus, channel, &payload, &mut answer).map_err(|e| format!("ping {i}: {e}"))?;
            kassert_eq!(&answer[..got], &payload[..]);
            bytes += len as u64;
            // Let the interrupt path run between pings, as the main loop does.
            loopback::dispatch(&mut bus);
        }
        let elapsed_us = (time::now() - started) / 1000;
        EchoDriver::stop(&mut bus, channel).map_err(|e| format!("stop: {e}"))?;
        // The close reaches the server in its next turn.
        let deadline = time::now() + 1_000_000_000;
        while state.lock().closes == 0 && time::now() < deadline {
            loopback::dispatch(&mut bus);
        }
        bus.connection_mut().unload().map_err(|e| format!("unload: {e}"))?;
        let interrupts = loopback::interrupt_count() - interrupts_before;
        let state = state.lock();
        log::info!(
            "bus: KMCL echo on both ends of the loopback: {SERVER_ECHO_ROUND_TRIPS} round trips in {elapsed_us} us; \
             server: {}; {interrupts} loopback interrupts",
            state.summary()
        );
        kassert_eq!((state.opens, state.hellos, state.refused_hellos), (1, 1, 0));
        kassert_eq!(state.packets, SERVER_ECHO_ROUND_TRIPS);
        kassert_eq!(state.bytes, bytes);
        kassert_eq!((state.one_way, state.failures, state.closes), (0, 0, 1));
        kassert_eq!(state.events, ["opened", "started", "post_started", "suspend", "closed"]);
        kassert_eq!(client.lock().events, ["opened", "started", "post_started", "suspend", "closed"]);
        kassert!(interrupts > 0, "no loopback interrupt was taken");
        Ok(())
    })();
    time::stop_timer();
    result
}

/// A made-up device class for the loopback test's echo device.
const LOOPBACK_ECHO_CLASS: vmbus::protocol::Guid =
    vmbus::protocol::Guid::from_canonical("6563686f-0002-4b4d-834c-000000000002");

/// The in-kernel loopback host (no Hyper-V needed): the same KMCL driver as on the real host binds an echo device
/// the kernel's own VMBus server offers; its packet goes through rings in loopback guest memory, the host's answer
/// comes back, and the host's notifications arrive as real interrupts (self-IPIs on the loopback vector).
fn loopback_channel_driven_by_interrupts() -> TestResult {
    use super::loopback;
    use vmbus::kmcl::{ChannelState, Kmcl};
    use vmbus::server::OfferSpec;
    use vmbus::server::loopback::LoopbackBus;

    let interrupts_before = loopback::interrupt_count();
    let endpoint = alloc::sync::Arc::new(spin::Mutex::new(None));
    let echoed = alloc::sync::Arc::new(core::sync::atomic::AtomicU64::new(0));
    let device_endpoint = endpoint.clone();
    let device_echoed = echoed.clone();
    // The echo device: once the guest opened the channel, send every in-band packet back.
    let echo: loopback::HostTurn = alloc::boxed::Box::new(move |host: &'static LoopbackBus| {
        let mut slot = device_endpoint.lock();
        if slot.is_none() {
            *slot = host.take_endpoint(1);
        }
        let Some(endpoint) = slot.as_mut() else { return };
        let mut packets = alloc::vec::Vec::new();
        if endpoint.receive_owned(host, &mut packets).is_err() {
            return;
        }
        for packet in packets.iter().filter(|p| p.packet_type == PacketType::DATA_IN_BAND) {
            if endpoint.send_in_band(packet.transaction_id, &packet.payload, false, host).is_ok() {
                device_echoed.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    time::start_timer(time::TimerMode::Periodic, core::time::Duration::from_millis(10), || {})
        .map_err(|e| format!("kernel timer: {e:?}"))?;
    let result = (|| -> TestResult {
        let mut bus = loopback::start(
            vmbus::server::ServerConfig::new(),
            |host| {
                let _ = host.offer(OfferSpec::new(LOOPBACK_ECHO_CLASS, LOOPBACK_ECHO_CLASS));
            },
            Some(echo),
        )
        .map_err(|e| format!("loopback bus: {e}"))?;
        let version = bus.connection().version();
        let seen = alloc::sync::Arc::new(spin::Mutex::new(Seen::default()));
        let channel = bus.channel_allocate().map_err(|e| format!("allocate: {e}"))?;
        bus.channel_init_set_maximum_packet_size(channel, 512).map_err(|e| format!("packet size: {e}"))?;
        bus.channel_init_set_ring_buffer_page_count(channel, 2, 2).map_err(|e| format!("ring pages: {e}"))?;
        bus.channel_init_set_target(channel, LOOPBACK_ECHO_CLASS, None).map_err(|e| format!("target: {e}"))?;
        bus.channel_init_set_callbacks(channel, alloc::boxed::Box::new(RecordingDriver(seen.clone())))
            .map_err(|e| format!("callbacks: {e}"))?;
        bus.channel_enable(channel).map_err(|e| format!("enable: {e}"))?;
        let deadline = time::now() + 2_000_000_000;
        while seen.lock().packets.is_empty() && time::now() < deadline {
            if loopback::dispatch(&mut bus) == 0 {
                bus.connection().transport().wait();
            }
        }
        bus.channel_disable(channel).map_err(|e| format!("disable: {e}"))?;
        kassert_eq!(bus.channel_state(channel).map_err(|e| format!("state: {e}"))?, ChannelState::Disabled);
        bus.channel_cleanup(channel).map_err(|e| format!("cleanup: {e}"))?;
        bus.connection_mut().unload().map_err(|e| format!("unload: {e}"))?;
        let seen = seen.lock();
        let interrupts = loopback::interrupt_count() - interrupts_before;
        log::info!(
            "bus: loopback VMBus {version}: callbacks {:?}, {} packet(s) echoed, {interrupts} loopback interrupts, \
             {} self-IPI failures",
            seen.events,
            echoed.load(Ordering::Relaxed),
            loopback::ipi_failures()
        );
        kassert_eq!(seen.events, ["opened", "started", "post_started", "suspend", "closed"]);
        let answer = seen.packets.first().ok_or("the echo never reached ProcessPacket")?;
        kassert_eq!(&answer[..16], &dm_version_request(9)[..]);
        kassert!(interrupts > 0, "no loopback interrupt was taken");
        Ok(())
    })();
    time::stop_timer();
    result
}

/// What the test driver saw, in order.
#[derive(Default)]
struct Seen {
    events: alloc::vec::Vec<&'static str>,
    packets: alloc::vec::Vec<alloc::vec::Vec<u8>>,
}

/// A KMCL driver for the test: records its callbacks and, once started, sends a Dynamic Memory version request.
struct RecordingDriver(alloc::sync::Arc<spin::Mutex<Seen>>);

impl vmbus::kmcl::ChannelCallbacks for RecordingDriver {
    fn opened(&mut self, _: &mut dyn vmbus::kmcl::Kmcl, _: vmbus::kmcl::ChannelHandle) -> vmbus::kmcl::Result<()> {
        self.0.lock().events.push("opened");
        Ok(())
    }

    fn started(&mut self, _: &mut dyn vmbus::kmcl::Kmcl, _: vmbus::kmcl::ChannelHandle) {
        self.0.lock().events.push("started");
    }

    fn post_started(&mut self, kmcl: &mut dyn vmbus::kmcl::Kmcl, channel: vmbus::kmcl::ChannelHandle) {
        self.0.lock().events.push("post_started");
        let sent = kmcl
            .packet_allocate(channel)
            .and_then(|packet| kmcl.packet_send(packet, &dm_version_request(9), None, vmbus::kmcl::SendFlags::NONE));
        if sent.is_err() {
            self.0.lock().events.push("send failed");
        }
    }

    fn suspend(&mut self, _: &mut dyn vmbus::kmcl::Kmcl, _: vmbus::kmcl::ChannelHandle) {
        self.0.lock().events.push("suspend");
    }

    fn closed(&mut self, _: &mut dyn vmbus::kmcl::Kmcl, _: vmbus::kmcl::ChannelHandle) {
        self.0.lock().events.push("closed");
    }

    fn process_packet(
        &mut self,
        kmcl: &mut dyn vmbus::kmcl::Kmcl,
        _: vmbus::kmcl::ChannelHandle,
        packet: vmbus::kmcl::PacketCompletion,
        buffer: &[u8],
        _: vmbus::kmcl::ProcessPacketFlags,
    ) {
        self.0.lock().packets.push(buffer.to_vec());
        let _ = kmcl.packet_complete(packet, &[]);
    }
}

/// The KMCL client API against QEMU's host: allocate → init → enable binds the hv-balloon offer and runs Opened →
/// Started → PostStarted (which sends through the pool), the interrupt path delivers QEMU's answer to
/// ProcessPacket, and disable runs Suspend → Closed and tears the channel down.
fn kmcl_channel_lifecycle_on_the_host() -> TestResult {
    use vmbus::kmcl::{ChannelState, Kmcl};
    if KernelTransport::new().is_none() {
        return Err(TestError::Skipped("no Hyper-V hypercalls and SynIC (no VMBus host)".into()));
    }
    let mut bus = super::runtime::start().map_err(|e| format!("bus: {e}"))?;
    if !bus.connection().offers().any(|offer| offer.interface_type == device_class::DYNAMIC_MEMORY) {
        return Err(TestError::Skipped("the host offers no Dynamic Memory channel".into()));
    }
    let seen = alloc::sync::Arc::new(spin::Mutex::new(Seen::default()));
    let channel = bus.channel_allocate().map_err(|e| format!("allocate: {e}"))?;
    bus.channel_init_set_maximum_packet_size(channel, 4096).map_err(|e| format!("max packet size: {e}"))?;
    bus.channel_init_set_ring_buffer_page_count(channel, 5, 5).map_err(|e| format!("ring pages: {e}"))?;
    bus.channel_init_set_target(channel, device_class::DYNAMIC_MEMORY, None).map_err(|e| format!("target: {e}"))?;
    bus.channel_init_set_friendly_name(channel, "ktest dm").map_err(|e| format!("name: {e}"))?;
    bus.channel_init_set_callbacks(channel, alloc::boxed::Box::new(RecordingDriver(seen.clone())))
        .map_err(|e| format!("callbacks: {e}"))?;
    bus.channel_enable(channel).map_err(|e| format!("enable: {e}"))?;
    let deadline = time::now() + 5_000_000_000;
    while seen.lock().packets.is_empty() && time::now() < deadline {
        if super::runtime::dispatch(&mut bus) == 0 {
            bus.connection().transport().wait();
        }
    }
    let state = bus.channel_state(channel).map_err(|e| format!("state: {e}"))?;
    bus.channel_disable(channel).map_err(|e| format!("disable: {e}"))?;
    let disabled = bus.channel_state(channel).map_err(|e| format!("state: {e}"))?;
    bus.channel_cleanup(channel).map_err(|e| format!("cleanup: {e}"))?;
    bus.connection_mut().unload().map_err(|e| format!("unload: {e}"))?;
    let seen = seen.lock();
    log::info!(
        "bus: KMCL channel on the host: callbacks {:?}, {} packet(s); state while open {state:?}",
        seen.events,
        seen.packets.len()
    );
    kassert_eq!(seen.events, ["opened", "started", "post_started", "suspend", "closed"]);
    kassert_eq!(disabled, ChannelState::Disabled);
    let answer = seen.packets.first().ok_or("QEMU's VERSION_RESPONSE never reached ProcessPacket")?;
    kassert!(
        answer.len() >= 16 && answer[0] == 2 && answer[8] & 1 == 1,
        "not an accepting VERSION_RESPONSE: {answer:?}"
    );
    kassert_eq!(&answer[4..8], &9u32.to_le_bytes());
    Ok(())
}

fn interrupt_and_monitor_bits() -> TestResult {
    let pages = BusPages::allocate().map_err(|e| format!("{e}"))?;
    pages.set_send_interrupt(5);
    pages.set_send_interrupt(2047);
    pages.set_monitor_pending(33);
    let interrupt = pages.interrupt.words();
    // The guest → host half starts at byte 2048 (word 256): relid 5 is its bit 5, relid 2047 bit 63 of word 287.
    kassert_eq!(interrupt[256].load(Ordering::Relaxed), 1 << 5);
    kassert_eq!(interrupt[287].load(Ordering::Relaxed), 1 << 63);
    kassert!(interrupt[..256].iter().all(|word| word.load(Ordering::Relaxed) == 0), "host → guest half touched");
    // Monitor id 33: trigger group 1 (pending word at byte 8 + 8), bit 1; nothing else set.
    let monitor = pages.monitor_guest_to_host.words();
    kassert_eq!(monitor[2].load(Ordering::Relaxed), 1 << 1);
    let set: usize = monitor.iter().map(|word| word.load(Ordering::Relaxed).count_ones() as usize).sum();
    kassert_eq!(set, 1);
    // Ids the page cannot hold are ignored, not a panic.
    pages.set_monitor_pending(200);
    let set: usize = monitor.iter().map(|word| word.load(Ordering::Relaxed).count_ones() as usize).sum();
    kassert_eq!(set, 1);
    Ok(())
}

fn heap_rings_are_contiguous_pages() -> TestResult {
    let (rings, lease) = allocate_channel_rings(3, 5).map_err(|e| format!("{e}"))?;
    kassert_eq!(rings.pfns.len(), 8);
    kassert_eq!(rings.outgoing_pages, 3);
    kassert!(rings.validate().is_ok(), "the ring layout does not validate");
    kassert!(rings.pfns[..3].windows(2).all(|w| w[1] == w[0] + 1), "outgoing pages not contiguous");
    kassert!(rings.pfns[3..].windows(2).all(|w| w[1] == w[0] + 1), "incoming pages not contiguous");
    use vmbus::ring::RingData;
    kassert_eq!(rings.outgoing.data().len(), 2 * 4096);
    kassert_eq!(rings.incoming.data().len(), 4 * 4096);
    drop(rings);
    drop(lease);
    kassert!(allocate_channel_rings(1, 2).is_err(), "a one-page ring was accepted");
    Ok(())
}

/// The Dynamic Memory VERSION_REQUEST for 2.0 (`dynamic-memory.md`: type 1, size 16, trans_id, version, flags).
fn dm_version_request(trans_id: u32) -> [u8; 16] {
    let mut message = [0u8; 16];
    message[0..2].copy_from_slice(&1u16.to_le_bytes());
    message[2..4].copy_from_slice(&16u16.to_le_bytes());
    message[4..8].copy_from_slice(&trans_id.to_le_bytes());
    message[8..12].copy_from_slice(&0x0002_0000u32.to_le_bytes());
    message
}

/// Opens QEMU's hv-balloon channel on kernel ring pages, sends a Dynamic Memory version request through the ring,
/// reads the host's answer from the other ring, closes, tears the GPADL down and unloads.
fn balloon_channel_packet_round_trip() -> TestResult {
    if KernelTransport::new().is_none() {
        return Err(TestError::Skipped("no Hyper-V hypercalls and SynIC (no VMBus host)".into()));
    }
    let mut connection = connect().map_err(|e| format!("connect: {e}"))?;
    kprintln_table(&connection);
    let Some(offer) = connection.offers().find(|offer| offer.interface_type == device_class::DYNAMIC_MEMORY).cloned()
    else {
        connection.unload().map_err(|e| format!("unload: {e}"))?;
        return Err(TestError::Skipped("the host offers no Dynamic Memory channel".into()));
    };
    let pages = super::pages().map_err(|e| format!("{e}"))?;
    let (rings, lease) = allocate_channel_rings(5, 5).map_err(|e| format!("{e}"))?;
    let target_vp = connection.transport().vp_index();
    let opened = time::now();
    let mut channel = Channel::open(&mut connection, offer.child_relid, rings, target_vp, &[])
        .map_err(|e| format!("open relid {}: {e}", offer.child_relid))?;
    let open_us = (time::now() - opened) / 1000;

    let request = dm_version_request(7);
    let sent = channel
        .send(&OutgoingPacket::in_band(7, &request), connection.transport(), pages)
        .map_err(|e| format!("send: {e}"))?;
    let deadline = time::now() + 5_000_000_000;
    let mut answer = None;
    let mut packets = 0;
    while answer.is_none() && time::now() < deadline {
        channel
            .receive(connection.transport(), pages, |packet| {
                packets += 1;
                let mut bytes = [0u8; 16];
                if packet.packet_type() == PacketType::DATA_IN_BAND
                    && packet.payload_len() >= 16
                    && packet.read_payload_at(0, &mut bytes).is_ok()
                {
                    answer = Some((packet.transaction_id(), bytes));
                }
            })
            .map_err(|e| format!("receive: {e}"))?;
        if answer.is_none() {
            connection.transport().wait();
        }
    }
    let round_trip_us = (time::now() - opened) / 1000 - open_us;
    let relid = channel.relid();
    if let Err(e) = channel.close(&mut connection) {
        lease.abandon();
        return Err(format!("close: {e}").into());
    }
    drop(lease); // The host confirmed the teardown: the pages may go back to the heap.
    connection.unload().map_err(|e| format!("unload: {e}"))?;

    let (transaction_id, bytes) = answer.ok_or(format!("no answer from the host in 5 s ({packets} packets)"))?;
    let field16 = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    kassert_eq!(field16(0), 2); // VERSION_RESPONSE
    kassert_eq!(field16(2), 16); // its size
    kassert_eq!(u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]), 7); // trans_id echoed
    kassert_eq!(bytes[8] & 1, 1); // QEMU accepts 2.0
    log::info!(
        "bus: relid {relid} (Dynamic Memory) opened in {open_us} us; version request sent (signalled: {}), \
         VERSION_RESPONSE accepted 2.0 after {round_trip_us} us (VMBus transaction id {transaction_id}); closed, \
         GPADL torn down, unloaded",
        sent.signal_peer
    );
    Ok(())
}

fn kprintln_table(connection: &vmbus::client::Connection<KernelTransport>) {
    crate::kprintln!("{}", super::negotiation_line(connection));
    crate::kprintln!("VMBus {} offers:\n{}", connection.version(), offer_table(connection.offers(), |_| false));
}
