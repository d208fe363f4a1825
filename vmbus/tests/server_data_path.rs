//! The data path of the crate's own VMBus host: the guest's `channel::Channel`, opened over rings it allocated from
//! guest memory (`memory::PageArena`), exchanging packets with the server's `ServerEndpoint` over the loopback bus —
//! both directions, wrap-around, completions, GPA-direct data, 64 channels at once, the signalling rules counted on
//! both sides, a guest that lies about its rings, and the server-only GPADL mapping.

use std::cell::RefCell;

use vmbus::channel::{Channel, ChannelError, InterruptPages};
use vmbus::client::{ClientError, ConnectOptions, Connection};
use vmbus::memory::{
    ArenaInterruptPages, GuestMemory, MONITOR_TRIGGER_GROUP_OFFSET, MemoryError, PAGE_SIZE, PageArena,
    SEND_INTERRUPT_OFFSET,
};
use vmbus::protocol::{Guid, MessageType, VMBUS_MESSAGE_SINT, device_class};
use vmbus::ring::{
    ControlField, OutgoingGpaRange, OutgoingKind, OutgoingPacket, PacketType, RingError, RingMemory, SpaceRequest,
};
use vmbus::server::{
    EndpointError, LoopbackBus, MapGpadlError, MapGpadlFlags, OfferSpec, ReceivedPacket, ServerConfig, ServerEndpoint,
    ServerEvent, status,
};

/// First page of guest memory in these tests (high enough to catch truncation to 32 bits).
const BASE_PFN: u64 = 0x1_2345_0000 >> 12 << 12;

/// Records the bits the guest sets in its interrupt and monitor pages.
#[derive(Default)]
struct Pages {
    interrupts: RefCell<Vec<u32>>,
    monitors: RefCell<Vec<u8>>,
}

impl InterruptPages for Pages {
    fn set_send_interrupt(&self, relid: u32) {
        self.interrupts.borrow_mut().push(relid);
    }
    fn set_monitor_pending(&self, monitor_id: u8) {
        self.monitors.borrow_mut().push(monitor_id);
    }
}

fn spec(index: u32) -> OfferSpec {
    OfferSpec::new(
        device_class::HEARTBEAT,
        Guid::from_fields(index, 0x1234, 0x5678, [9, 8, 7, 6, 5, 4, 3, index as u8]),
    )
}

/// A bus over `pages` pages of guest memory with `channels` offers, and a connected guest that has the offers.
fn setup(pages: usize, channels: u32) -> (&'static LoopbackBus, PageArena, Connection<&'static LoopbackBus>) {
    let arena = PageArena::new(BASE_PFN, pages);
    let bus: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
    for index in 0..channels {
        bus.offer(spec(index)).unwrap();
    }
    let mut conn = Connection::connect(bus, ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))).unwrap();
    conn.request_offers().unwrap();
    (bus, arena, conn)
}

type GuestChannel = Channel<vmbus::memory::ArenaRing>;

/// Opens `relid` over fresh arena rings of `pages` pages each and takes the host's end.
fn open(
    bus: &LoopbackBus,
    arena: &PageArena,
    conn: &mut Connection<&'static LoopbackBus>,
    relid: u32,
    pages: u32,
) -> (GuestChannel, ServerEndpoint<PageArena>) {
    let rings = arena.channel_rings(pages, pages).unwrap();
    let channel = Channel::open(conn, relid, rings, 0, &[]).unwrap();
    let endpoint = bus.take_endpoint(relid).expect("the bus keeps the host's end of an open channel");
    assert!(bus.take_endpoint(relid).is_none(), "taken once");
    (channel, endpoint)
}

/// Drains the host's end into owned packets.
fn host_receive(bus: &LoopbackBus, endpoint: &mut ServerEndpoint<PageArena>) -> Vec<ReceivedPacket> {
    let mut packets = Vec::new();
    endpoint.receive_owned(bus, &mut packets).unwrap();
    packets
}

/// Drains the guest's end: (type, transaction id, payload).
fn guest_receive(
    conn: &Connection<&'static LoopbackBus>,
    pages: &Pages,
    channel: &mut GuestChannel,
) -> Vec<(PacketType, u64, bool, Vec<u8>)> {
    let mut packets = Vec::new();
    channel
        .receive(conn.transport(), pages, |packet| {
            let mut payload = vec![0u8; packet.payload_len()];
            packet.read_payload(&mut payload).unwrap();
            packets.push((packet.packet_type(), packet.transaction_id(), packet.completion_requested(), payload));
        })
        .unwrap();
    packets
}

#[test]
fn packets_and_completions_flow_both_ways_with_a_signal_each_way() {
    let (bus, arena, mut conn) = setup(64, 1);
    let pages = Pages::default();
    let (mut channel, mut endpoint) = open(bus, &arena, &mut conn, 1, 2);
    assert_eq!((endpoint.relid(), endpoint.ring_gpadl()), (1, channel.ring_gpadl().0));
    let connection_id = conn.offer(1).unwrap().connection_id;
    let _ = bus.hypervisor().take_interrupts(VMBUS_MESSAGE_SINT);

    // Guest → host: a request that wants a completion.
    let request = OutgoingPacket::in_band(7, b"ping from the guest").with_completion_requested();
    assert!(channel.send(&request, conn.transport(), &pages).unwrap().signal_peer);
    assert_eq!(bus.take_signalled_channels(), [1]);
    assert_eq!(bus.take_signalled_channels(), [] as [u32; 0], "taken once");
    let received = host_receive(bus, &mut endpoint);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].packet_type, PacketType::DATA_IN_BAND);
    assert_eq!((received[0].transaction_id, received[0].completion_requested), (7, true));
    assert_eq!(&received[0].payload[..19], b"ping from the guest");

    // Host → guest: the completion, then a request of the host's own.
    assert!(endpoint.send_completion(7, b"pong", bus).unwrap().signal_peer);
    assert!(!endpoint.send_in_band(8, b"host asks", true, bus).unwrap().signal_peer, "the ring was not empty");
    assert_eq!(bus.take_guest_event_flags(), [1]);
    assert_eq!(bus.hypervisor().take_interrupts(VMBUS_MESSAGE_SINT), 1);
    let got = guest_receive(&conn, &pages, &mut channel);
    assert_eq!(
        got,
        [
            (PacketType::COMPLETION, 7, false, b"pong\0\0\0\0".to_vec()),
            (PacketType::DATA_IN_BAND, 8, true, b"host asks\0\0\0\0\0\0\0".to_vec()),
        ]
    );
    let _ = channel.send(&OutgoingPacket::completion(8, b"done"), conn.transport(), &pages).unwrap();
    let completion = host_receive(bus, &mut endpoint);
    assert_eq!((completion[0].packet_type, completion[0].transaction_id), (PacketType::COMPLETION, 8));

    let stats = endpoint.stats();
    assert_eq!((stats.sent, stats.received, stats.write_signals, stats.read_signals), (2, 2, 1, 0));
    assert_eq!(bus.hypervisor().host_signal_count(connection_id), 2);
    assert_eq!(bus.stats().guest_signals, 1);
}

#[test]
fn thousands_of_packets_wrap_both_rings_in_order() {
    let (bus, arena, mut conn) = setup(64, 1);
    let pages = Pages::default();
    let (mut channel, mut endpoint) = open(bus, &arena, &mut conn, 1, 2);
    let pattern: Vec<u8> = (0..1500u32).map(|i| (i * 31 + 7) as u8).collect();
    let size = |id: u64| (id as usize * 97) % 1500 + 1;
    let (mut next_up, mut next_down, mut seen_up, mut seen_down) = (0u64, 0u64, 0u64, 0u64);
    const COUNT: u64 = 5000;
    while seen_up < COUNT || seen_down < COUNT {
        // Each side writes until its ring is full.
        while next_up < COUNT {
            let payload = &pattern[..size(next_up)];
            match channel.send(&OutgoingPacket::in_band(next_up, payload), conn.transport(), &pages) {
                Ok(_) => next_up += 1,
                Err(ChannelError::Ring(RingError::Full { .. })) => break,
                Err(e) => panic!("guest send: {e}"),
            }
        }
        while next_down < COUNT {
            match endpoint.send_in_band(next_down, &pattern[..size(next_down)], false, bus) {
                Ok(_) => next_down += 1,
                Err(EndpointError::Ring(RingError::Full { .. })) => break,
                Err(e) => panic!("host send: {e}"),
            }
        }
        for packet in host_receive(bus, &mut endpoint) {
            assert_eq!(packet.transaction_id, seen_up);
            assert_eq!(&packet.payload[..size(seen_up)], &pattern[..size(seen_up)]);
            seen_up += 1;
        }
        for (_, id, _, payload) in guest_receive(&conn, &pages, &mut channel) {
            assert_eq!(id, seen_down);
            assert_eq!(&payload[..size(seen_down)], &pattern[..size(seen_down)]);
            seen_down += 1;
        }
    }
    // 5000 packets of ~750 bytes went through 4 KiB data areas: both wrapped hundreds of times.
    assert_eq!((endpoint.stats().sent, endpoint.stats().received), (COUNT, COUNT));
}

#[test]
fn the_host_reads_and_writes_gpa_direct_ranges_in_guest_memory() {
    let (bus, arena, mut conn) = setup(64, 1);
    let pages = Pages::default();
    let (mut channel, mut endpoint) = open(bus, &arena, &mut conn, 1, 2);
    // A 3-page buffer for the guest's data, and a 1-page buffer for the host's answer.
    let data_pfn = arena.allocate(3).unwrap();
    let data: Vec<u8> = (0..9000u32).map(|i| (i ^ (i >> 8)) as u8).collect();
    arena.write(data_pfn * PAGE_SIZE + 100, &data).unwrap();
    let answer_pfn = arena.allocate(1).unwrap();
    let data_pfns = [data_pfn, data_pfn + 1, data_pfn + 2];
    let answer_pfns = [answer_pfn];
    let ranges = [
        OutgoingGpaRange { byte_count: 9000, byte_offset: 100, pfns: &data_pfns },
        OutgoingGpaRange { byte_count: 64, byte_offset: 0x800, pfns: &answer_pfns },
    ];
    let packet = OutgoingPacket {
        kind: OutgoingKind::GpaDirect(&ranges),
        ..OutgoingPacket::in_band(99, b"write then read").with_completion_requested()
    };
    let _ = channel.send(&packet, conn.transport(), &pages).unwrap();

    let mut answered = 0;
    endpoint
        .receive(bus, |packet, memory| {
            let mut scratch = [0u8; 256];
            let ranges = packet.gpa_direct(&mut scratch).unwrap();
            assert_eq!(ranges.len(), 2);
            let mut copy = vec![0u8; 9064];
            assert_eq!(memory.read_gpa_ranges(&ranges, &mut copy), Ok(9064));
            assert_eq!(&copy[..9000], &data[..]);
            // The host answers into the second range only.
            let second = ranges.iter().nth(1).unwrap();
            let gpa = second.pfns.get(0).unwrap() * PAGE_SIZE + u64::from(second.byte_offset);
            memory.write(gpa, b"answer from the host").unwrap();
            answered += 1;
        })
        .unwrap();
    assert_eq!(answered, 1);
    let mut back = [0u8; 20];
    arena.read(answer_pfn * PAGE_SIZE + 0x800, &mut back).unwrap();
    assert_eq!(&back, b"answer from the host");
}

#[test]
fn sixty_four_channels_carry_traffic_at_once() {
    const CHANNELS: u32 = 64;
    let (bus, arena, mut conn) = setup(1024, CHANNELS);
    let pages = Pages::default();
    let mut guests = Vec::new();
    let mut hosts = Vec::new();
    for relid in 1..=CHANNELS {
        let (channel, endpoint) = open(bus, &arena, &mut conn, relid, 2 + relid % 3);
        guests.push(channel);
        hosts.push(endpoint);
    }
    assert_eq!(arena.allocated_pages(), (1..=CHANNELS).map(|r| 2 * (2 + r as usize % 3)).sum::<usize>());
    for round in 0..20u64 {
        // Every guest channel sends a request; the host serves the channels that signalled, echoing with a
        // completion; every guest reads its completion.
        for channel in guests.iter_mut() {
            let payload = [channel.relid() as u8; 40];
            let packet = OutgoingPacket::in_band(round, &payload).with_completion_requested();
            let _ = channel.send(&packet, conn.transport(), &pages).unwrap();
        }
        let signalled = bus.take_signalled_channels();
        assert_eq!(signalled, (1..=CHANNELS).collect::<Vec<_>>(), "round {round}");
        for relid in signalled {
            let endpoint = &mut hosts[relid as usize - 1];
            for packet in host_receive(bus, endpoint) {
                assert_eq!(packet.payload[..40], [relid as u8; 40]);
                let _ = endpoint.send_completion(packet.transaction_id, &packet.payload[..40], bus).unwrap();
            }
        }
        let mut flags = bus.take_guest_event_flags();
        flags.sort_unstable();
        assert_eq!(flags, (1..=CHANNELS).collect::<Vec<_>>());
        for channel in guests.iter_mut() {
            let got = guest_receive(&conn, &pages, channel);
            assert_eq!(got.len(), 1);
            assert_eq!((got[0].0, got[0].1), (PacketType::COMPLETION, round));
            assert_eq!(got[0].3, [channel.relid() as u8; 40]);
        }
    }
    // Closing every channel closes every host end and gives the pages back.
    for (channel, endpoint) in guests.into_iter().zip(hosts.iter()) {
        let first = channel.relid();
        channel.close(&mut conn).unwrap();
        assert!(endpoint.is_closed(), "relid {first}");
    }
    assert_eq!(bus.with_server(|server| server.gpadl_handles().count()), 0);
}

#[test]
fn interrupt_masks_and_pending_send_size_decide_the_signals_on_both_sides() {
    let (bus, arena, mut conn) = setup(64, 1);
    let pages = Pages::default();
    let (mut channel, mut endpoint) = open(bus, &arena, &mut conn, 1, 2);
    let connection_id = conn.offer(1).unwrap().connection_id;
    let host_ring = arena.ring(&conn_ring_pfns(bus, 1).0).unwrap();

    // While the host drains (its mask set), the guest does not signal; the drain's re-check finds the packet.
    host_ring.store_control(ControlField::InterruptMask, 1);
    assert!(!channel.send(&OutgoingPacket::in_band(1, b"masked"), conn.transport(), &pages).unwrap().signal_peer);
    assert_eq!(bus.hypervisor().host_signal_count(connection_id), 0);
    assert_eq!(host_receive(bus, &mut endpoint).len(), 1);
    assert_eq!(host_ring.load_control(ControlField::InterruptMask), 0, "receive leaves interrupts unmasked");
    assert!(channel.send(&OutgoingPacket::in_band(2, b"unmasked"), conn.transport(), &pages).unwrap().signal_peer);
    assert_eq!(bus.hypervisor().host_signal_count(connection_id), 1);
    assert_eq!(host_receive(bus, &mut endpoint).len(), 1);

    // The host fills the guest's ring, asks for space, and the guest's read signals exactly once.
    let payload = [0x33u8; 1000];
    let mut sent = 0u64;
    let needed = loop {
        match endpoint.send_in_band(sent, &payload, false, bus) {
            Ok(_) => sent += 1,
            Err(EndpointError::Ring(RingError::Full { needed, .. })) => break needed,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(sent, 3, "4 KiB holds three 1 KiB packets");
    assert_eq!(endpoint.request_space_signal(needed).unwrap(), SpaceRequest::Armed);
    assert_eq!(bus.take_guest_event_flags(), [1], "one signal for the empty → non-empty write");
    let _ = bus.take_signalled_channels();
    let mut count = 0;
    let got = channel.receive(conn.transport(), &pages, |_| count += 1).unwrap();
    assert_eq!(count, 3);
    assert_eq!((got.packets, got.signalled), (3, true));
    assert_eq!(bus.take_signalled_channels(), [1], "the host learns that space is free");
    assert_eq!(bus.hypervisor().host_signal_count(connection_id), 2);
    endpoint.clear_space_signal();
    assert!(endpoint.send_in_band(sent, &payload, false, bus).unwrap().signal_peer);
    assert_eq!(endpoint.stats().write_signals, 2);
    assert_eq!(*pages.interrupts.borrow(), [1, 1], "the relid bit is set before each HvSignalEvent");
    assert!(pages.monitors.borrow().is_empty());
}

/// The ring GPADL's pages of open channel `relid`: (guest → host ring, host → guest ring).
fn conn_ring_pfns(bus: &LoopbackBus, relid: u32) -> (Vec<u64>, Vec<u64>) {
    bus.with_server(|server| {
        let info = server.open_channel_info(relid).unwrap();
        (info.guest_to_host_ring_pfns().to_vec(), info.host_to_guest_ring_pfns().to_vec())
    })
}

/// A description of a way to lie, and the ring pages it names given the first page of a real allocation.
type RingLie = (&'static str, fn(u64) -> Vec<u64>);

#[test]
fn rings_outside_memory_overlapping_or_scattered_are_refused_at_open() {
    let (bus, arena, mut conn) = setup(64, 1);
    let cases: [RingLie; 4] = [
        ("above memory", |_| (0..4).map(|i| BASE_PFN + 64 + i).collect()),
        ("below memory", |_| (0..4).map(|i| BASE_PFN - 2 + i).collect()),
        ("the two rings share their pages", |first| vec![first, first + 1, first, first + 1]),
        ("a ring that is not contiguous", |first| vec![first, first + 2, first + 1, first + 3]),
    ];
    for (index, (what, pfns)) in cases.iter().enumerate() {
        let mut rings = arena.channel_rings(2, 2).unwrap();
        let first = rings.pfns[0];
        rings.pfns = pfns(first);
        let result = Channel::open(&mut conn, 1, rings, 0, &[]);
        assert_eq!(
            result.err(),
            Some(ChannelError::Client(ClientError::OpenFailed(status::INVALID_PARAMETER))),
            "{what}"
        );
        assert_eq!(bus.stats().rings_refused, index as u64 + 1);
        assert!(bus.take_endpoint(1).is_none());
        arena.free(first, 4).unwrap();
    }
    // The failed opens tore their GPADLs down; a truthful open still works.
    assert_eq!(bus.with_server(|server| server.gpadl_handles().count()), 0);
    let (_channel, _endpoint) = open(bus, &arena, &mut conn, 1, 2);
}

#[test]
fn a_guest_that_breaks_its_rings_gets_errors_not_panics() {
    let (bus, arena, mut conn) = setup(64, 1);
    let pages = Pages::default();
    let (mut channel, mut endpoint) = open(bus, &arena, &mut conn, 1, 2);
    let (up, down) = conn_ring_pfns(bus, 1);
    let guest_up = arena.ring(&up).unwrap();
    let guest_down = arena.ring(&down).unwrap();

    // A write index outside the data area, then a misaligned one.
    guest_up.store_control(ControlField::WriteIndex, 12345);
    let error = endpoint.receive(bus, |_, _| ()).unwrap_err();
    assert_eq!(error, EndpointError::Ring(RingError::InvalidIndex { field: ControlField::WriteIndex, value: 12345 }));
    guest_up.store_control(ControlField::WriteIndex, 12);
    assert!(matches!(endpoint.receive(bus, |_, _| ()), Err(EndpointError::Ring(RingError::InvalidIndex { .. }))));
    guest_up.store_control(ControlField::WriteIndex, 0);
    // A read index outside the guest's incoming ring.
    guest_down.store_control(ControlField::ReadIndex, 0xFFFF_FFF8);
    assert!(matches!(endpoint.free_space(), Err(EndpointError::Ring(RingError::InvalidIndex { .. }))));
    // Sends trust the read index they last checked until the ring looks full; then the lie is found.
    let failure = (0..100u64).find_map(|id| endpoint.send_in_band(id, &[0; 200], false, bus).err());
    assert_eq!(
        failure,
        Some(EndpointError::Ring(RingError::InvalidIndex { field: ControlField::ReadIndex, value: 0xFFFF_FFF8 }))
    );
    guest_down.store_control(ControlField::ReadIndex, 0);

    // Random bytes all over both rings, then every host operation: errors or (garbage) packets, never a panic.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut errors, mut packets) = (0, 0);
    for round in 0..2000 {
        let pfn = if round % 2 == 0 { up[0] } else { down[0] };
        let words = 1 + next() % 16;
        for _ in 0..words {
            let offset = next() % (2 * PAGE_SIZE - 8);
            // Control words most of the time: that is where the indices are.
            let offset = if next() % 2 == 0 { offset % 16 } else { offset };
            arena.write(pfn * PAGE_SIZE + offset, &next().to_le_bytes()).unwrap();
        }
        match endpoint.receive(bus, |packet, memory| {
            packets += 1;
            let mut scratch = [0u8; 4096];
            let mut payload = vec![0u8; packet.payload_len()];
            packet.read_payload(&mut payload).unwrap();
            if let Ok(ranges) = packet.gpa_direct(&mut scratch) {
                let mut data = vec![0u8; 1 << 16];
                let _ = memory.read_gpa_ranges(&ranges, &mut data);
            }
        }) {
            Ok(_) => {}
            Err(EndpointError::Ring(_)) => errors += 1,
            Err(other) => panic!("unexpected error {other}"),
        }
        match endpoint.send_in_band(round, &[1; 100], true, bus) {
            Ok(_) | Err(EndpointError::Ring(_)) => {}
            Err(other) => panic!("unexpected error {other}"),
        }
        let _ = endpoint.available();
        let _ = endpoint.free_space();
    }
    assert!(errors > 100, "the corruption was noticed ({errors} errors, {packets} packets)");
    // The guest side copes with the same ring too (it is the guest's own doing).
    let _ = channel.receive(conn.transport(), &pages, |_| ());
}

#[test]
fn close_rescind_and_reopen_end_or_replace_the_host_end() {
    let (bus, arena, mut conn) = setup(64, 2);
    let pages = Pages::default();
    let (channel, mut endpoint) = open(bus, &arena, &mut conn, 1, 2);
    let closer = endpoint.closer();
    let pfns = bus.with_server(|server| server.open_channel_info(1).unwrap().ring_pfns.clone());
    channel.close(&mut conn).unwrap();
    assert!(closer.is_closed());
    assert_eq!(endpoint.send_in_band(1, b"late", false, bus), Err(EndpointError::Closed));
    assert_eq!(endpoint.receive(bus, |_, _| ()).err(), Some(EndpointError::Closed));
    arena.free(pfns[0], pfns.len()).unwrap();

    // Reopening gives a new, working host end.
    let (mut channel, mut endpoint) = open(bus, &arena, &mut conn, 1, 2);
    let _ = channel.send(&OutgoingPacket::in_band(5, b"again"), conn.transport(), &pages).unwrap();
    assert_eq!(host_receive(bus, &mut endpoint)[0].transaction_id, 5);

    // A rescind closes the host's end at once.
    let (_other, other_endpoint) = open(bus, &arena, &mut conn, 2, 2);
    bus.rescind(2).unwrap();
    assert!(other_endpoint.is_closed());
    assert!(!endpoint.is_closed());

    // UNLOAD closes the rest.
    conn.unload().unwrap();
    assert!(endpoint.is_closed());
}

#[test]
fn the_host_maps_a_guest_gpadl_under_the_kmcl_rules() {
    let (bus, arena, mut conn) = setup(64, 1);
    let (_channel, _endpoint) = open(bus, &arena, &mut conn, 1, 2);
    let buffer = arena.allocate(2).unwrap();
    arena.write(buffer * PAGE_SIZE + 10, b"guest data for the host").unwrap();
    let gpadl = conn.create_gpadl(1, &[buffer, buffer + 1], 10, 5000).unwrap();

    let mapped = bus.with_server(|server| server.map_gpadl(1, MapGpadlFlags::NONE, gpadl.0)).unwrap();
    assert_eq!(mapped.len(), 5000);
    let mut back = [0u8; 23];
    mapped.read(&arena, 0, &mut back).unwrap();
    assert_eq!(&back, b"guest data for the host");
    mapped.write(&arena, 4990, b"0123456789").unwrap();
    let mut tail = [0u8; 10];
    arena.read(buffer * PAGE_SIZE + 5000, &mut tail).unwrap();
    assert_eq!(&tail, b"0123456789");
    assert_eq!(mapped.write(&arena, 4991, b"0123456789"), Err(MemoryError::OutsideBuffer { offset: 4991, len: 10 }));
    assert_eq!(
        bus.with_server(|server| server.map_gpadl(1, MapGpadlFlags::READ_ONLY, gpadl.0)),
        Err(MapGpadlError::AlreadyMapped(gpadl.0))
    );

    // The guest's teardown is held while the host has the GPADL mapped: its wait times out.
    let result = conn.teardown_gpadl(1, gpadl);
    assert_eq!(result, Err(ClientError::Timeout { waiting_for: MessageType::GPADL_TORNDOWN }));
    assert!(bus.with_server(|server| server.gpadl(gpadl.0).is_some_and(|g| g.teardown_pending)));
    bus.with_server(|server| server.unmap_gpadl(1, gpadl.0)).unwrap();
    let torn_down = bus.with_server(|server| {
        core::iter::from_fn(|| server.pop_event()).any(|e| e == ServerEvent::GpadlTornDown { relid: 1, gpadl: gpadl.0 })
    });
    assert!(torn_down, "unmapping answers the held teardown");
}

#[test]
fn a_monitored_channel_signals_through_monitor_page_2_without_a_hypercall() {
    let arena = PageArena::new(BASE_PFN, 64);
    let bus: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
    bus.offer(spec(0)).unwrap();
    let monitored = bus.offer(OfferSpec { monitored: true, ..spec(1) }).unwrap();
    let interrupt_page = arena.allocate(1).unwrap() * PAGE_SIZE;
    let monitor_pages = arena.allocate(2).unwrap() * PAGE_SIZE;
    let (page1, page2) = (monitor_pages, monitor_pages + PAGE_SIZE);
    let mut conn = Connection::connect(bus, ConnectOptions::new(interrupt_page, (page1, page2))).unwrap();
    conn.request_offers().unwrap();
    let offer = conn.offer(monitored).unwrap().clone();
    let monitor_id = offer.monitor_id.expect("the offer carries a monitor id");
    let guest_pages = ArenaInterruptPages::new(arena.clone(), Some(interrupt_page), Some(page2));

    let rings = arena.channel_rings(2, 2).unwrap();
    let mut channel = Channel::open(&mut conn, monitored, rings, 0, &[]).unwrap();
    let mut endpoint = bus.take_endpoint(monitored).unwrap();
    assert!(
        channel.send(&OutgoingPacket::in_band(1, b"monitored"), conn.transport(), &guest_pages).unwrap().signal_peer
    );
    assert_eq!(bus.hypervisor().host_signal_count(offer.connection_id), 0, "no HvSignalEvent");
    let group_word = page2 + MONITOR_TRIGGER_GROUP_OFFSET + u64::from(monitor_id / 32) * 8;
    let mut word = [0u8; 8];
    arena.read(group_word, &mut word).unwrap();
    assert_eq!(u64::from_le_bytes(word), 1 << (monitor_id % 32), "the pending bit of the monitor id");
    arena.read(interrupt_page + SEND_INTERRUPT_OFFSET, &mut word).unwrap();
    assert_eq!(u64::from_le_bytes(word), 1 << monitored, "the relid bit in the send half of the interrupt page");

    assert_eq!(bus.take_signalled_channels(), [monitored]);
    assert_eq!(bus.take_signalled_channels(), [] as [u32; 0], "the scan clears the pending bit");
    arena.read(group_word, &mut word).unwrap();
    assert_eq!(u64::from_le_bytes(word), 0);
    assert_eq!(host_receive(bus, &mut endpoint)[0].transaction_id, 1);
}

#[test]
fn a_soak_of_random_traffic_loses_nothing_duplicates_nothing_and_leaks_no_pages() {
    const CHANNELS: u32 = 4;
    // VMBUS_SOAK_ROUND_TRIPS=2000000 for a longer soak.
    let round_trips: u64 = std::env::var("VMBUS_SOAK_ROUND_TRIPS").ok().and_then(|v| v.parse().ok()).unwrap_or(100_000);
    let (bus, arena, mut conn) = setup(256, CHANNELS);
    let pages = Pages::default();
    let mut pairs: Vec<_> = (1..=CHANNELS).map(|relid| open(bus, &arena, &mut conn, relid, 2 + relid % 2)).collect();
    let pattern: Vec<u8> = (0..2048u32).map(|i| (i * 131 + 17) as u8).collect();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut random = move |bound: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % bound
    };
    // Per channel: next request id to send, next completion id expected.
    let mut next_send = vec![0u64; CHANNELS as usize];
    let mut next_done = vec![0u64; CHANNELS as usize];
    let size = |relid: u32, id: u64| ((id * 7 + u64::from(relid) * 13) % 2000) as usize + 1;
    let mut completed = 0u64;
    while completed < round_trips {
        // A random channel sends a random burst (until its ring is full).
        let index = random(u64::from(CHANNELS)) as usize;
        let relid = index as u32 + 1;
        for _ in 0..1 + random(8) {
            let id = next_send[index];
            let payload = &pattern[..size(relid, id)];
            let packet = OutgoingPacket::in_band(id, payload).with_completion_requested();
            match pairs[index].0.send(&packet, conn.transport(), &pages) {
                Ok(_) => next_send[index] += 1,
                Err(ChannelError::Ring(RingError::Full { .. })) => break,
                Err(e) => panic!("{e}"),
            }
        }
        // Now and then the host serves what was signalled, completing with the request's first 8 bytes.
        if random(3) == 0 {
            for relid in bus.take_signalled_channels() {
                let index = relid as usize - 1;
                let mut waiting = Vec::new();
                pairs[index].1.receive_owned(bus, &mut waiting).unwrap();
                for packet in waiting {
                    let want = size(relid, packet.transaction_id);
                    assert_eq!(&packet.payload[..want], &pattern[..want]);
                    loop {
                        let (channel, endpoint) = &mut pairs[index];
                        match endpoint.send_completion(packet.transaction_id, &packet.payload[..8], bus) {
                            Ok(_) => break,
                            // The guest drains its completions before the host goes on.
                            Err(EndpointError::Ring(RingError::Full { .. })) => {
                                completed += check_completions(&conn, &pages, channel, &mut next_done[index]);
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            }
        }
        // The guest reads completions on the channels the host signalled.
        for relid in bus.take_guest_event_flags() {
            let index = relid as usize - 1;
            completed += check_completions(&conn, &pages, &mut pairs[index].0, &mut next_done[index]);
        }
    }
    // Everything that completed was sent, in order; nothing is left over once both sides drain.
    for (index, (channel, endpoint)) in pairs.iter_mut().enumerate() {
        assert!(next_done[index] <= next_send[index]);
        let mut waiting = Vec::new();
        endpoint.receive_owned(bus, &mut waiting).unwrap();
        for packet in waiting {
            let _ = endpoint.send_completion(packet.transaction_id, &packet.payload[..8], bus).unwrap();
        }
        check_completions(&conn, &pages, channel, &mut next_done[index]);
        assert_eq!(next_done[index], next_send[index], "every request of relid {} completed once", index + 1);
    }
    for (channel, endpoint) in pairs {
        let relid = channel.relid();
        let pfns = bus.with_server(|server| server.open_channel_info(relid).unwrap().ring_pfns.clone());
        channel.close(&mut conn).unwrap();
        assert!(endpoint.is_closed());
        arena.free(pfns[0], pfns.len()).unwrap();
    }
    assert_eq!(arena.allocated_pages(), 0, "every ring page came back");
    assert_eq!(bus.with_server(|server| server.gpadl_handles().count()), 0, "no GPADL left on the host");
}

/// Reads the completions waiting on a guest channel, checking they come in order, once each; returns how many.
fn check_completions(
    conn: &Connection<&'static LoopbackBus>,
    pages: &Pages,
    channel: &mut GuestChannel,
    next_done: &mut u64,
) -> u64 {
    let mut count = 0;
    for (packet_type, id, _, _) in guest_receive(conn, pages, channel) {
        assert_eq!(packet_type, PacketType::COMPLETION);
        assert_eq!(id, *next_done, "completions in order, none lost or repeated");
        *next_done += 1;
        count += 1;
    }
    count
}
