//! The guest's `client::Connection` against the crate's own `server::Server`, through the simulated hypervisor
//! (`server::LoopbackBus`): every control sequence end to end, the hosts the client must cope with, and the
//! 16-buffer limits in both directions.

use vmbus::client::{ClientError, ConnectOptions, Connection, Event, GpadlId, VersionAttempt};
use vmbus::hv::hypercall::{HvError, Hypercalls};
use vmbus::hv::synic::consume_message;
use vmbus::protocol::{
    GpadlBody, GpadlMessages, Guid, InitiateContact, Message, MessageBuffer, MessageType, OpenChannel,
    VMBUS_MESSAGE_SINT, VmbusVersion, device_class, parse,
};
use vmbus::server::loopback::ReceivedMessage;
use vmbus::server::{
    ChannelStatus, DisconnectReason, LoopbackBus, OfferSpec, OpenRefusal, ServerConfig, ServerEvent, status,
};

fn options() -> ConnectOptions {
    ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))
}

fn spec(index: u32) -> OfferSpec {
    let class = [device_class::HEARTBEAT, device_class::SHUTDOWN, device_class::TIMESYNC, device_class::KVP]
        [index as usize % 4];
    OfferSpec::new(class, Guid::from_fields(index, 0x1234, 0x5678, [1, 2, 3, 4, 5, 6, 7, index as u8]))
}

/// A bus playing `config` with `channels` offers made before the guest connects.
fn bus(config: ServerConfig, channels: u32) -> LoopbackBus {
    let bus = LoopbackBus::new(config);
    for index in 0..channels {
        bus.offer(spec(index)).unwrap();
    }
    bus
}

fn connect(bus: &LoopbackBus) -> Connection<&LoopbackBus> {
    Connection::connect(bus, options()).expect("the client connects to the loopback server")
}

/// Where the host saw INITIATE_CONTACT arrive, in order.
fn contacts(log: &[ReceivedMessage]) -> Vec<u32> {
    log.iter().filter(|m| m.message_type == MessageType::INITIATE_CONTACT).map(|m| m.connection_id).collect()
}

fn events(bus: &LoopbackBus) -> Vec<ServerEvent> {
    bus.with_server(|server| core::iter::from_fn(|| server.pop_event()).collect())
}

/// Distinct, scattered page numbers (with high bits set, to catch truncation).
fn pfns(seed: u64, count: u64) -> Vec<u64> {
    (0..count).map(|i| 0x7_0000_0000 + seed * 0x10_0000 + i * 3 + (i % 5) * 0x1000).collect()
}

/// Takes every message waiting in SINT 2 (as a guest without the client would).
fn host_messages(bus: &LoopbackBus) -> Vec<MessageBuffer> {
    let slot = bus.hypervisor().message_slot(VMBUS_MESSAGE_SINT).unwrap();
    core::iter::from_fn(|| consume_message(&slot))
        .map(|m| MessageBuffer::from_bytes(m.payload().unwrap()).unwrap())
        .collect()
}

#[test]
fn a_ws2022_like_host_negotiates_5_3_and_the_guest_moves_to_its_msg_conn_id() {
    let bus = bus(ServerConfig { msg_conn_id: 7, ..ServerConfig::new() }, 2);
    let mut conn = connect(&bus);
    assert_eq!(conn.version(), VmbusVersion::V5_3);
    assert_eq!(conn.message_connection_id(), 7);
    let offers = conn.request_offers().unwrap();
    assert_eq!(offers.iter().map(|o| o.child_relid).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(offers[0].class_name(), Some("heartbeat"));
    assert_eq!(offers[1].connection_id, ServerConfig::DEFAULT_EVENT_CONNECTION_ID_BASE + 2);
    assert_eq!(
        bus.take_received_log(),
        [
            ReceivedMessage { connection_id: 4, message_type: MessageType::INITIATE_CONTACT },
            ReceivedMessage { connection_id: 7, message_type: MessageType::REQUESTOFFERS },
        ]
    );
    let connection = bus.with_server(|server| *server.connection().unwrap());
    assert_eq!(connection.msg_conn_id, Some(7));
    assert_eq!(connection.monitor_pages, Some((0x10_1000, 0x10_2000)));
    assert!(connection.offers_sent);
    // Each offer's connection id is a live event port.
    assert_eq!((&bus).signal_event(offers[0].connection_id, 0), Ok(()));
    assert_eq!(bus.hypervisor().host_take_events(offers[0].connection_id), [0]);
}

/// QEMU's host: ≥ 5.0 cannot even be posted (no connection id 4), 4.1 is answered "unsupported" in the short
/// form, 4.0 is accepted, and everything stays on connection id 1.
#[test]
fn a_qemu_like_host_leaves_the_guest_at_4_0_on_connection_id_1() {
    let bus = bus(ServerConfig::qemu(), 1);
    let mut conn = connect(&bus);
    assert_eq!(conn.version(), VmbusVersion::V4_0);
    assert_eq!(conn.message_connection_id(), 1);
    assert_eq!(conn.request_offers().unwrap().len(), 1);
    let log = bus.take_received_log();
    assert_eq!(contacts(&log), [1, 1], "4.1 then 4.0; the 5.x attempts never reached the host");
    assert!(log.iter().all(|m| m.connection_id == 1));
    assert_eq!(bus.with_server(|server| server.stats().versions_refused), 1);
    let unknown = VersionAttempt::ConnectionIdUnknown;
    assert_eq!(
        conn.version_attempts(),
        [
            (VmbusVersion::V5_3, unknown),
            (VmbusVersion::V5_2, unknown),
            (VmbusVersion::V5_1, unknown),
            (VmbusVersion::V5_0, unknown),
            (VmbusVersion::V4_1, VersionAttempt::Refused),
            (VmbusVersion::V4_0, VersionAttempt::Accepted),
        ]
    );
}

#[test]
fn an_old_host_refuses_connection_id_4_inside_the_hypercall() {
    let bus = bus(ServerConfig::old_host(VmbusVersion::V4_1), 1);
    let contact = MessageBuffer::from_message(&InitiateContact::new(VmbusVersion::V5_3, 0, 0, 0, 0));
    assert_eq!((&bus).post_message(4, 1, contact.as_bytes()), Err(HvError::INVALID_CONNECTION_ID));
    let conn = connect(&bus);
    assert_eq!(conn.version(), VmbusVersion::V4_1);
    assert_eq!(contacts(&bus.take_received_log()), [1], "only the 4.1 request got through");
}

#[test]
fn a_5_x_contact_on_connection_id_1_is_refused_inside_the_hypercall() {
    let bus = bus(ServerConfig::new(), 0);
    for version in [VmbusVersion::V5_0, VmbusVersion::V5_3] {
        let contact = MessageBuffer::from_message(&InitiateContact::new(version, 0, 0, 0, 0));
        assert_eq!((&bus).post_message(1, 1, contact.as_bytes()), Err(HvError::INVALID_CONNECTION_ID));
    }
    bus.run_host();
    assert!(bus.take_received_log().is_empty());
    assert_eq!(bus.hypervisor().host_pending(1), 0);
}

#[test]
fn no_common_version_fails_cleanly_after_every_step() {
    let bus = bus(ServerConfig { versions: vec![VmbusVersion::V6_0], ..ServerConfig::new() }, 0);
    let error = Connection::connect(&bus, options()).err();
    assert_eq!(error, Some(ClientError::NoVersionAccepted));
    assert_eq!(contacts(&bus.take_received_log()), [4, 4, 4, 4, 1, 1, 1, 1]);
    assert_eq!(bus.with_server(|server| server.stats().versions_refused), 8);
}

#[test]
fn a_hundred_channels_offered_opened_together_and_closed() {
    const CHANNELS: u32 = 100;
    let bus = bus(ServerConfig::new(), CHANNELS);
    let mut conn = connect(&bus);
    let offers = conn.request_offers().unwrap();
    assert_eq!(offers.iter().map(|o| o.child_relid).collect::<Vec<_>>(), (1..=CHANNELS).collect::<Vec<_>>());
    assert!(bus.stats().delivery_stalls > 0, "101 messages do not fit SINT 2's slot and 16 buffers at once");

    let mut rings = Vec::new();
    for relid in 1..=CHANNELS {
        let pages = pfns(u64::from(relid), 8);
        let gpadl = conn.create_gpadl(relid, &pages, 0, 8 * 4096).unwrap();
        conn.open_channel(relid, gpadl, 4, 0, &relid.to_le_bytes()).unwrap();
        rings.push((relid, gpadl, pages));
    }
    bus.with_server(|server| {
        for (relid, gpadl, pages) in &rings {
            let info = server.open_channel_info(*relid).expect("open");
            assert_eq!(info.ring_gpadl, gpadl.0);
            assert_eq!(info.guest_to_host_ring_pfns(), &pages[..4]);
            assert_eq!(info.host_to_guest_ring_pfns(), &pages[4..]);
            assert_eq!(&info.user_data[..4], &relid.to_le_bytes());
        }
    });
    let opened = events(&bus).iter().filter(|e| matches!(e, ServerEvent::ChannelOpened { .. })).count();
    assert_eq!(opened, CHANNELS as usize);

    for (relid, gpadl, _) in &rings {
        conn.close_channel(*relid).unwrap();
        conn.teardown_gpadl(*relid, *gpadl).unwrap();
    }
    bus.with_server(|server| {
        assert_eq!(server.gpadl_handles().count(), 0);
        assert!((1..=CHANNELS).all(|relid| server.channel(relid).unwrap().status == ChannelStatus::Closed));
    });
    assert_eq!(conn.stats().unexpected + conn.stats().malformed, 0);
}

#[test]
fn hot_add_and_rescind_of_an_unopened_channel_and_relid_reuse_after_release() {
    let bus = bus(ServerConfig::new(), 2);
    let mut conn = connect(&bus);
    conn.request_offers().unwrap();

    let hot = bus.offer(spec(2)).unwrap();
    assert_eq!(hot, 3);
    assert_eq!(conn.poll(), Some(Event::Offered(3)));
    assert_eq!(conn.offer(3).unwrap().class_name(), Some("timesync"));

    bus.rescind(2).unwrap();
    assert_eq!(conn.poll(), Some(Event::Rescinded(2)));
    assert!(conn.offer(2).is_none());
    // The client posted RELID_RELEASED, but the host has not read it yet: relid 2 is still taken.
    assert_eq!(bus.offer(spec(4)), Ok(4));
    assert_eq!(conn.poll(), Some(Event::Offered(4)));
    bus.run_host();
    assert!(events(&bus).contains(&ServerEvent::ChannelReleased { relid: 2 }));
    assert_eq!(bus.offer(spec(5)), Ok(2), "reused after RELID_RELEASED");
    assert_eq!(conn.poll(), Some(Event::Offered(2)));
    assert_eq!(conn.offers().map(|o| o.child_relid).collect::<Vec<_>>(), [1, 3, 4, 2]);
}

#[test]
fn rescind_of_an_open_channel_then_close_teardown_and_release() {
    let bus = bus(ServerConfig::new(), 1);
    let mut conn = connect(&bus);
    conn.request_offers().unwrap();
    let gpadl = conn.create_gpadl(1, &pfns(1, 4), 0, 4 * 4096).unwrap();
    conn.open_channel(1, gpadl, 2, 0, &[]).unwrap();
    events(&bus);

    bus.rescind(1).unwrap();
    assert_eq!(events(&bus), [ServerEvent::ChannelClosed { relid: 1 }], "the host's end closes at once");
    assert_eq!(conn.poll(), Some(Event::Rescinded(1)));
    assert_eq!(conn.release_channel(1), Err(ClientError::InvalidState(1)), "the guest must close first");
    conn.close_channel(1).unwrap();
    conn.teardown_gpadl(1, gpadl).unwrap();
    conn.release_channel(1).unwrap();
    bus.run_host();
    bus.with_server(|server| {
        assert!(server.channel(1).is_none());
        assert!(server.gpadl(gpadl.0).is_none(), "RELID_RELEASED dropped the ring GPADL");
    });
    assert_eq!(events(&bus), [ServerEvent::ChannelReleased { relid: 1 }]);
    assert_eq!(bus.offer(spec(1)), Ok(1));
}

#[test]
fn gpadls_of_1_to_1000_pages_arrive_page_for_page() {
    let bus = bus(ServerConfig::new(), 1);
    let mut conn = connect(&bus);
    conn.request_offers().unwrap();
    let counts: Vec<u64> = (1..=60).chain((61..1000).step_by(37)).chain([999, 1000]).collect();
    for count in counts {
        let pages = pfns(count, count);
        let gpadl = conn.create_gpadl(1, &pages, 0, u32::try_from(count * 4096).unwrap()).unwrap();
        bus.with_server(|server| {
            let stored = server.gpadl(gpadl.0).expect("accepted");
            assert_eq!(stored.whole_pages(), Some(pages.as_slice()), "{count} pages");
        });
        conn.teardown_gpadl(1, gpadl).unwrap();
    }
    // A byte range that starts inside its first page.
    let gpadl = conn.create_gpadl(1, &pfns(7, 3), 0x123, 2 * 4096).unwrap();
    bus.with_server(|server| {
        let range = &server.gpadl(gpadl.0).unwrap().gpadl.ranges[0];
        assert_eq!((range.byte_offset, range.byte_count, range.pfns.clone()), (0x123, 8192, pfns(7, 3)));
    });
}

#[test]
fn a_burst_meets_the_16_buffer_limit_and_the_retry_policy_gets_through() {
    let bus = bus(ServerConfig::new(), 1);
    let mut conn = connect(&bus);
    conn.request_offers().unwrap();
    let before = bus.stats().delays;
    // 1000 pages: a header and 35 bodies posted back to back.
    let pages = pfns(3, 1000);
    let gpadl = conn.create_gpadl(1, &pages, 0, 1000 * 4096).unwrap();
    assert!(bus.stats().delays > before, "INSUFFICIENT_BUFFERS was met and retried");
    bus.with_server(|server| assert_eq!(server.gpadl(gpadl.0).unwrap().whole_pages(), Some(pages.as_slice())));

    // The limit itself, posted by hand: 16 buffers, then INSUFFICIENT_BUFFERS until the host reads the port.
    let body = MessageBuffer::from_message(&GpadlBody::new(1, 0xDEAD));
    for _ in 0..16 {
        assert_eq!((&bus).post_message(4, 1, body.as_bytes()), Ok(()));
    }
    assert_eq!((&bus).post_message(4, 1, body.as_bytes()), Err(HvError::INSUFFICIENT_BUFFERS));
    assert_eq!(bus.run_host(), 16);
    assert_eq!((&bus).post_message(4, 1, body.as_bytes()), Ok(()));
    bus.run_host();
    assert_eq!(bus.with_server(|server| server.stats().unknown_gpadl), 17, "stray bodies are counted");
}

#[test]
fn open_failure_statuses_reach_the_guest() {
    let bus = bus(ServerConfig::new(), 1);
    let mut conn = connect(&bus);
    conn.request_offers().unwrap();
    let ring = conn.create_gpadl(1, &pfns(1, 4), 0, 4 * 4096).unwrap();
    for offset in [0, 1, 3, 4, 9] {
        assert_eq!(
            conn.open_channel(1, ring, offset, 0, &[]),
            Err(ClientError::OpenFailed(status::INVALID_PARAMETER)),
            "offset {offset}"
        );
    }
    let unaligned = conn.create_gpadl(1, &pfns(2, 4), 0x80, 3 * 4096).unwrap();
    assert_eq!(
        conn.open_channel(1, unaligned, 2, 0, &[]),
        Err(ClientError::OpenFailed(status::INVALID_PARAMETER)),
        "a ring must be whole pages"
    );
    conn.open_channel(1, ring, 2, 0, &[]).unwrap();
    let refusals: Vec<OpenRefusal> = events(&bus)
        .into_iter()
        .filter_map(|e| match e {
            ServerEvent::OpenRefused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        refusals,
        [[OpenRefusal::BadDownstreamOffset; 5].as_slice(), &[OpenRefusal::RingNotWholePages]].concat()
    );
}

/// What the client never sends, posted by hand: the server's answers arrive in SINT 2 with their statuses.
#[test]
fn the_servers_own_failure_paths_over_the_simulated_hypervisor() {
    let bus = bus(ServerConfig::new(), 2);
    let mut conn = connect(&bus);
    conn.request_offers().unwrap();
    let gpadl = conn.create_gpadl(1, &pfns(1, 4), 0, 4 * 4096).unwrap();
    let id = conn.message_connection_id();
    let post = |bytes: &[u8]| (&bus).post_message(id, 1, bytes).unwrap();

    // A GPADL for an unknown relid, one reusing the client's handle, a body out of sequence, and opens naming
    // an unknown GPADL, another channel's GPADL, and an unknown relid.
    for message in GpadlMessages::for_pages(77, 0x500, &[1, 2]).unwrap() {
        post(message.as_bytes());
    }
    for message in GpadlMessages::for_pages(2, gpadl.0, &[3]).unwrap() {
        post(message.as_bytes());
    }
    let long_pages = pfns(9, 40);
    let mut long = GpadlMessages::for_pages(2, 0x501, &long_pages).unwrap();
    post(long.next().unwrap().as_bytes());
    let mut body = MessageBuffer::from_message(&GpadlBody::new(9, 0x501));
    body.push(&[0; 8]);
    post(body.as_bytes());
    post(MessageBuffer::from_message(&OpenChannel::new(1, 1, 0x999, 0, 2)).as_bytes());
    post(MessageBuffer::from_message(&OpenChannel::new(2, 2, gpadl.0, 0, 2)).as_bytes());
    post(MessageBuffer::from_message(&OpenChannel::new(55, 3, gpadl.0, 0, 2)).as_bytes());
    post(&[8, 0, 0, 0]);
    bus.run_host();

    let answers: Vec<(MessageType, u32, u32)> = host_messages(&bus)
        .iter()
        .map(|m| match parse(m.as_bytes()).unwrap() {
            Message::GpadlCreated(c) => (MessageType::GPADL_CREATED, c.gpadl.get(), c.creation_status.get()),
            Message::OpenChannelResult(r) => (MessageType::OPENCHANNEL_RESULT, r.child_relid.get(), r.status.get()),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        answers,
        [
            (MessageType::GPADL_CREATED, 0x500, status::NO_SUCH_DEVICE),
            (MessageType::GPADL_CREATED, gpadl.0, status::OBJECT_NAME_COLLISION),
            (MessageType::GPADL_CREATED, 0x501, status::INVALID_PARAMETER),
            (MessageType::OPENCHANNEL_RESULT, 1, status::NOT_FOUND),
            (MessageType::OPENCHANNEL_RESULT, 2, status::ACCESS_DENIED),
            (MessageType::OPENCHANNEL_RESULT, 55, status::NO_SUCH_DEVICE),
        ]
    );
    let stats = bus.with_server(|server| server.stats());
    assert_eq!((stats.gpadl_failures, stats.open_failures, stats.malformed), (3, 3, 1));
    // The client's own GPADL survived the impostor.
    conn.open_channel(1, gpadl, 2, 0, &[]).unwrap();
}

#[test]
fn close_before_teardown_and_a_teardown_held_until_close() {
    let bus = bus(ServerConfig::new(), 1);
    let mut conn = connect(&bus);
    conn.request_offers().unwrap();
    let ring = conn.create_gpadl(1, &pfns(1, 4), 0, 4 * 4096).unwrap();
    conn.open_channel(1, ring, 2, 0, &[]).unwrap();
    // Tearing the ring down first (wrong from 4.0 on): the host holds the answer and the client times out.
    let started = bus.now_ns();
    assert_eq!(conn.teardown_gpadl(1, ring), Err(ClientError::Timeout { waiting_for: MessageType::GPADL_TORNDOWN }));
    assert!(bus.now_ns() - started >= options().timeout_ns);
    assert!(bus.with_server(|server| server.gpadl(ring.0).unwrap().teardown_pending));
    events(&bus);
    conn.close_channel(1).unwrap();
    bus.run_host();
    assert_eq!(
        events(&bus),
        [ServerEvent::ChannelClosed { relid: 1 }, ServerEvent::GpadlTornDown { relid: 1, gpadl: ring.0 }]
    );
    assert_eq!(conn.poll(), None);
    assert_eq!(conn.stats().unexpected, 1, "the late GPADL_TORNDOWN");

    // The right order: close, then tear down.
    let ring = conn.create_gpadl(1, &pfns(2, 4), 0, 4 * 4096).unwrap();
    conn.open_channel(1, ring, 2, 0, &[]).unwrap();
    conn.close_channel(1).unwrap();
    conn.teardown_gpadl(1, ring).unwrap();
    assert_eq!(conn.teardown_gpadl(1, ring), Err(ClientError::UnknownGpadl(ring.0)));
}

fn open_one(bus: &LoopbackBus) -> (Connection<&LoopbackBus>, GpadlId) {
    let mut conn = connect(bus);
    conn.request_offers().unwrap();
    let ring = conn.create_gpadl(1, &pfns(1, 4), 0, 4 * 4096).unwrap();
    conn.open_channel(1, ring, 2, 0, &[]).unwrap();
    (conn, ring)
}

#[test]
fn modify_channel_at_5_3_4_1_and_4_0() {
    let ws2022 = bus(ServerConfig::new(), 1);
    let (mut conn, _) = open_one(&ws2022);
    conn.modify_channel(1, 3).unwrap();
    assert_eq!(ws2022.with_server(|server| server.open_channel_info(1).unwrap().target_vp), 3);

    let rs3 = bus(ServerConfig::old_host(VmbusVersion::V4_1), 1);
    let (mut conn, _) = open_one(&rs3);
    events(&rs3);
    conn.modify_channel(1, 2).unwrap();
    rs3.run_host();
    assert_eq!(events(&rs3), [ServerEvent::ChannelModified { relid: 1, target_vp: 2 }]);

    let win10 = bus(ServerConfig::old_host(VmbusVersion::V4_0), 1);
    let (mut conn, _) = open_one(&win10);
    assert_eq!(conn.modify_channel(1, 2), Err(ClientError::NotSupported { version: VmbusVersion::V4_0 }));
}

#[test]
fn unload_resets_the_host_and_a_new_connection_starts_afresh() {
    let bus = bus(ServerConfig::new(), 3);
    let (mut conn, _) = open_one(&bus);
    events(&bus);
    conn.unload().unwrap();
    assert_eq!(
        events(&bus),
        [ServerEvent::ChannelClosed { relid: 1 }, ServerEvent::Disconnected { reason: DisconnectReason::Unload }]
    );
    bus.with_server(|server| {
        assert!(server.connection().is_none());
        assert_eq!(server.gpadl_handles().count(), 0);
    });
    drop(conn);

    let mut again = connect(&bus);
    assert_eq!(again.request_offers().unwrap().len(), 3);
    let ring = again.create_gpadl(1, &pfns(5, 4), 0, 4 * 4096).unwrap();
    again.open_channel(1, ring, 2, 0, &[]).unwrap();
}
