//! The server alone, fed raw guest messages: every control sequence, every refusal, and random input.

use super::*;
use crate::hv::hypercall::HvError;
use crate::protocol::{
    CloseChannel, ConnectionState, ControlMessage, GpadlBody, GpadlError, GpadlHeader, GpadlMessages, GpadlTeardown,
    Guid, InitiateContact, Message, MessageBuffer, MessageType, ModifyChannel, OfferFlags, OpenChannel, PfnRange,
    RelIdReleased, RequestOffers, TlConnectRequest, Unload, VmbusVersion, device_class,
};
use alloc::vec;
use alloc::vec::Vec;
use proptest::prelude::*;
use zerocopy::IntoBytes;

const ID1: u32 = 1;
const ID4: u32 = 4;

fn contact(version: VmbusVersion) -> InitiateContact {
    InitiateContact::new(version, 0, 0x10_0000, 0x10_1000, 0x10_2000)
}

fn post<M: ControlMessage>(server: &mut Server, connection_id: u32, message: &M) -> Result<(), HvError> {
    server.handle_message(connection_id, message.as_bytes())
}

fn drain(server: &mut Server) -> Vec<MessageBuffer> {
    core::iter::from_fn(|| server.pop_outgoing()).collect()
}

fn types(buffers: &[MessageBuffer]) -> Vec<MessageType> {
    buffers.iter().map(|b| b.parse().expect("the server sends well-formed messages").message_type()).collect()
}

fn events(server: &mut Server) -> Vec<ServerEvent> {
    core::iter::from_fn(|| server.pop_event()).collect()
}

fn spec(index: u32) -> OfferSpec {
    OfferSpec::new(device_class::HEARTBEAT, Guid::from_fields(index, 1, 2, [3; 8]))
}

/// The connection id later messages go to.
fn message_id(server: &Server) -> u32 {
    server.connection().and_then(|c| c.msg_conn_id).unwrap_or(ID1)
}

/// A server with `channels` offered, connected at `version` and with offers delivered; outbox and events drained.
fn connected(config: ServerConfig, version: VmbusVersion, channels: u32) -> Server {
    let mut server = Server::new(config);
    for index in 0..channels {
        server.offer(spec(index)).unwrap();
    }
    post(&mut server, version.initiate_contact_connection_id(), &contact(version)).unwrap();
    let id = message_id(&server);
    post(&mut server, id, &RequestOffers::new()).unwrap();
    drain(&mut server);
    events(&mut server);
    server
}

/// Posts a whole-page GPADL; returns the statuses of the GPADL_CREATED answers it produced.
fn create_gpadl(server: &mut Server, relid: u32, handle: u32, pfns: &[u64]) -> Vec<u32> {
    let id = message_id(server);
    for message in GpadlMessages::for_pages(relid, handle, pfns).unwrap() {
        server.handle_message(id, message.as_bytes()).unwrap();
    }
    created_statuses(server)
}

fn created_statuses(server: &mut Server) -> Vec<u32> {
    drain(server)
        .iter()
        .filter_map(|b| match b.parse() {
            Ok(Message::GpadlCreated(c)) => Some(c.creation_status.get()),
            _ => None,
        })
        .collect()
}

/// Posts OPENCHANNEL; returns the OPENCHANNEL_RESULT statuses it produced.
fn open(server: &mut Server, relid: u32, gpadl: u32, offset: u32) -> Vec<u32> {
    let id = message_id(server);
    post(server, id, &OpenChannel::new(relid, relid + 100, gpadl, 0, offset)).unwrap();
    drain(server)
        .iter()
        .filter_map(|b| match b.parse() {
            Ok(Message::OpenChannelResult(r)) => {
                assert_eq!(r.child_relid.get(), relid);
                assert_eq!(r.open_id.get(), relid + 100, "the open id is echoed");
                Some(r.status.get())
            }
            _ => None,
        })
        .collect()
}

fn pages(first: u64, count: u64) -> Vec<u64> {
    (0..count).map(|i| first + i * 7).collect()
}

fn version_response(buffer: &MessageBuffer) -> crate::protocol::VersionResponseInfo {
    match buffer.parse() {
        Ok(Message::VersionResponse(info)) => info,
        other => panic!("not a VERSION_RESPONSE: {other:?}"),
    }
}

#[test]
fn version_negotiation_answers_and_refusals() {
    let mut server = Server::new(ServerConfig::new());
    post(&mut server, ID4, &contact(VmbusVersion::V5_3)).unwrap();
    let answer = drain(&mut server);
    assert_eq!(answer.len(), 1);
    assert_eq!(answer[0].len(), 16, "the full form");
    let info = version_response(&answer[0]);
    assert!(info.version_supported);
    assert_eq!(info.connection_state, ConnectionState::SUCCESSFUL);
    assert_eq!(info.msg_conn_id, Some(ServerConfig::DEFAULT_MSG_CONN_ID));
    let connection = *server.connection().unwrap();
    assert_eq!(connection.version, VmbusVersion::V5_3);
    assert_eq!(connection.contact_connection_id, ID4);
    assert_eq!(connection.interrupt_page, None, "≥ 5.0 carries the SINT instead");
    assert_eq!(connection.monitor_pages, Some((0x10_1000, 0x10_2000)));
    assert_eq!(events(&mut server), [ServerEvent::Connected { version: VmbusVersion::V5_3 }]);

    // A version the host does not speak: refused, and the old connection is gone.
    post(&mut server, ID4, &contact(VmbusVersion::V6_0)).unwrap();
    let info = version_response(&drain(&mut server)[0]);
    assert!(!info.version_supported);
    assert!(server.connection().is_none());
    assert_eq!(events(&mut server), [ServerEvent::Disconnected { reason: DisconnectReason::Reconnect }]);

    // Below 5.0: connection id 1, the interrupt page kept, the version in the last field (as OpenVMM).
    post(&mut server, ID1, &contact(VmbusVersion::V4_1)).unwrap();
    let info = version_response(&drain(&mut server)[0]);
    assert!(info.version_supported);
    assert_eq!(info.msg_conn_id, Some(VmbusVersion::V4_1.0));
    assert_eq!(server.connection().unwrap().interrupt_page, Some(0x10_0000));
    assert_eq!(server.connection().unwrap().msg_conn_id, None);

    // ≥ 5.0 on connection id 1 is refused before the server reads it: nothing changes.
    assert_eq!(post(&mut server, ID1, &contact(VmbusVersion::V5_0)), Err(HvError::INVALID_CONNECTION_ID));
    assert_eq!(server.connection().unwrap().version, VmbusVersion::V4_1);
    assert!(drain(&mut server).is_empty());
    assert_eq!(post(&mut server, 9, &RequestOffers::new()), Err(HvError::INVALID_CONNECTION_ID));
    assert_eq!(server.stats().refused_posts, 2);
    assert_eq!(server.stats().versions_refused, 1);
}

#[test]
fn qemu_like_host_sends_the_short_answer_and_has_no_connection_id_4() {
    let mut server = Server::new(ServerConfig::qemu());
    assert_eq!(post(&mut server, ID4, &contact(VmbusVersion::V5_3)), Err(HvError::INVALID_CONNECTION_ID));
    post(&mut server, ID1, &contact(VmbusVersion::V4_1)).unwrap();
    let refusal = drain(&mut server);
    assert_eq!(refusal[0].len(), 10);
    assert!(!version_response(&refusal[0]).version_supported);
    post(&mut server, ID1, &contact(VmbusVersion::V4_0)).unwrap();
    let answer = drain(&mut server);
    assert_eq!(answer[0].len(), 10);
    let info = version_response(&answer[0]);
    assert!(info.version_supported);
    assert_eq!(info.msg_conn_id, None);
    assert_eq!(server.connection().unwrap().version, VmbusVersion::V4_0);
}

#[test]
fn contact_with_another_sint_vtl_or_one_monitor_page_is_refused() {
    let mut server = Server::new(ServerConfig::new());
    let mut other_sint = contact(VmbusVersion::V5_2);
    other_sint.set_msg_target(3, 0);
    post(&mut server, ID4, &other_sint).unwrap();
    assert!(!version_response(&drain(&mut server)[0]).version_supported);
    let mut other_vtl = contact(VmbusVersion::V5_2);
    other_vtl.set_msg_target(2, 1);
    post(&mut server, ID4, &other_vtl).unwrap();
    assert!(!version_response(&drain(&mut server)[0]).version_supported);

    let one_page = InitiateContact::new(VmbusVersion::V5_2, 0, 0, 0x1000, 0);
    post(&mut server, ID4, &one_page).unwrap();
    let info = version_response(&drain(&mut server)[0]);
    assert!(info.version_supported);
    assert_eq!(info.connection_state, ConnectionState::FAILED_UNKNOWN_FAILURE);
    assert!(server.connection().is_none());
    // Before 2.4 a failure cannot be reported: "unsupported" instead.
    post(&mut server, ID1, &InitiateContact::new(VmbusVersion::V1_1, 0, 0, 0, 0x1000)).unwrap();
    assert!(!version_response(&drain(&mut server)[0]).version_supported);
    // No monitor pages at all is fine.
    post(&mut server, ID1, &InitiateContact::new(VmbusVersion::V3_0, 0, 0, 0, 0)).unwrap();
    assert!(version_response(&drain(&mut server)[0]).version_supported);
    assert_eq!(server.connection().unwrap().monitor_pages, None);
    assert_eq!(server.stats().versions_refused, 4);
}

#[test]
fn nothing_but_contact_and_unload_before_a_version_is_agreed() {
    let mut server = Server::new(ServerConfig::new());
    server.offer(spec(0)).unwrap();
    post(&mut server, ID1, &RequestOffers::new()).unwrap();
    post(&mut server, ID1, &OpenChannel::new(1, 1, 1, 0, 1)).unwrap();
    post(&mut server, ID1, &GpadlTeardown::new(1, 1)).unwrap();
    for message in GpadlMessages::for_pages(1, 5, &[1, 2]).unwrap() {
        server.handle_message(ID1, message.as_bytes()).unwrap();
    }
    assert!(drain(&mut server).is_empty());
    assert_eq!(server.stats().out_of_state, 4);
    post(&mut server, ID1, &Unload::new()).unwrap();
    assert_eq!(types(&drain(&mut server)), [MessageType::UNLOAD_RESPONSE]);
    assert!(events(&mut server).is_empty(), "nothing was connected");
}

#[test]
fn offers_go_out_in_offer_order_then_all_offers_delivered_and_later_ones_at_once() {
    let mut server = Server::new(ServerConfig::new());
    let plain = server.offer(spec(0)).unwrap();
    let mut rich = OfferSpec::new(device_class::NETWORK, Guid::from_fields(9, 9, 9, [9; 8]));
    rich.flags = OfferFlags::NAMED_PIPE_MODE | OfferFlags::LOOPBACK;
    rich.mmio_megabytes = 16;
    rich.user_defined[0] = 4;
    rich.sub_channel_index = 2;
    rich.monitored = true;
    rich.dedicated_interrupt = true;
    let rich_relid = server.offer(rich.clone()).unwrap();
    assert_eq!((plain, rich_relid), (1, 2));
    assert!(drain(&mut server).is_empty(), "nothing is sent before the guest asks");

    post(&mut server, ID4, &contact(VmbusVersion::V5_3)).unwrap();
    drain(&mut server);
    post(&mut server, ID4, &RequestOffers::new()).unwrap();
    let sent = drain(&mut server);
    assert_eq!(types(&sent), [MessageType::OFFERCHANNEL, MessageType::OFFERCHANNEL, MessageType::ALLOFFERS_DELIVERED]);
    let Ok(Message::OfferChannel(first)) = sent[0].parse() else { unreachable!() };
    assert_eq!(first.child_relid.get(), 1);
    assert_eq!(first.connection_id.get(), ServerConfig::DEFAULT_EVENT_CONNECTION_ID_BASE + 1);
    assert!(!first.monitor_allocated() && !first.is_dedicated_interrupt());
    let Ok(Message::OfferChannel(second)) = sent[1].parse() else { unreachable!() };
    assert_eq!(second.interface_type, device_class::NETWORK);
    assert_eq!(second.flags(), rich.flags);
    assert_eq!(second.pipe_mode(), Some(4));
    assert_eq!(second.mmio_megabytes.get(), 16);
    assert_eq!(second.sub_channel_index.get(), 2);
    assert!(second.monitor_allocated() && second.is_dedicated_interrupt());
    assert_eq!(second.monitor_id, 0);
    assert_eq!(server.channel(2).unwrap().monitor_id, Some(0));
    assert_eq!(events(&mut server).last(), Some(&ServerEvent::OffersSent { count: 2 }));

    post(&mut server, ID4, &RequestOffers::new()).unwrap();
    assert!(drain(&mut server).is_empty(), "a second REQUESTOFFERS is ignored");
    assert_eq!(server.stats().out_of_state, 1);

    let hot = server.offer(spec(7)).unwrap();
    let sent = drain(&mut server);
    assert_eq!(types(&sent), [MessageType::OFFERCHANNEL]);
    assert!(server.channel(hot).unwrap().offered_to_guest);
    assert_eq!(server.offer_spec(hot), Some(&spec(7)));
}

#[test]
fn seventy_channels_with_rings_open_at_once() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 70);
    assert_eq!(server.relids().collect::<Vec<_>>(), (1..=70).collect::<Vec<_>>());
    for relid in 1..=70u32 {
        let ring = pages(u64::from(relid) * 0x1000, 8);
        assert_eq!(create_gpadl(&mut server, relid, 0x100 + relid, &ring), [0]);
        assert_eq!(open(&mut server, relid, 0x100 + relid, 4), [0]);
    }
    for relid in 1..=70u32 {
        let info = server.open_channel_info(relid).unwrap();
        let ring = pages(u64::from(relid) * 0x1000, 8);
        assert_eq!(info.guest_to_host_ring_pfns(), &ring[..4]);
        assert_eq!(info.host_to_guest_ring_pfns(), &ring[4..]);
        assert_eq!(server.channel(relid).unwrap().status, ChannelStatus::Open);
    }
    let opened = events(&mut server).iter().filter(|e| matches!(e, ServerEvent::ChannelOpened { .. })).count();
    assert_eq!(opened, 70);
    for relid in 1..=70u32 {
        post(&mut server, ID4, &CloseChannel::new(relid)).unwrap();
        post(&mut server, ID4, &GpadlTeardown::new(relid, 0x100 + relid)).unwrap();
    }
    let sent = drain(&mut server);
    assert_eq!(sent.len(), 70);
    assert!(types(&sent).iter().all(|t| *t == MessageType::GPADL_TORNDOWN));
    assert_eq!(server.gpadl_handles().count(), 0);
}

#[test]
fn relids_are_reused_only_after_relid_released() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 3);
    server.rescind(2).unwrap();
    assert_eq!(types(&drain(&mut server)), [MessageType::RESCIND_CHANNELOFFER]);
    assert!(server.channel(2).unwrap().rescinded);
    assert_eq!(server.rescind(2), Err(ServerError::AlreadyRescinded(2)));
    assert_eq!(server.offer(spec(3)), Ok(4), "relid 2 is still the guest's");
    drain(&mut server);

    post(&mut server, ID4, &RelIdReleased::new(1)).unwrap();
    assert_eq!(server.stats().out_of_state, 1, "only a rescinded channel can be released");
    post(&mut server, ID4, &RelIdReleased::new(99)).unwrap();
    assert_eq!(server.stats().unknown_channel, 1);
    post(&mut server, ID4, &RelIdReleased::new(2)).unwrap();
    assert!(drain(&mut server).is_empty(), "RELID_RELEASED has no answer");
    assert!(events(&mut server).contains(&ServerEvent::ChannelReleased { relid: 2 }));
    assert_eq!(server.offer(spec(4)), Ok(2));

    // A channel the guest never saw goes at once, without a message.
    let mut unseen = Server::new(ServerConfig::new());
    let relid = unseen.offer(spec(0)).unwrap();
    unseen.rescind(relid).unwrap();
    assert!(unseen.channel(relid).is_none());
    assert!(drain(&mut unseen).is_empty() && events(&mut unseen).is_empty());
    assert_eq!(unseen.rescind(5), Err(ServerError::UnknownChannel(5)));
}

#[test]
fn relid_and_monitor_id_limits() {
    let mut server = Server::new(ServerConfig::new());
    for expected in 1..=MAX_RELID {
        let mut offer = spec(expected);
        offer.monitored = expected <= u32::from(MONITOR_ID_COUNT) + 1;
        match server.offer(offer) {
            Ok(relid) => assert_eq!(relid, expected),
            Err(error) => {
                assert_eq!(error, ServerError::NoFreeMonitorId);
                assert_eq!(expected, u32::from(MONITOR_ID_COUNT) + 1);
                assert_eq!(server.offer(spec(expected)), Ok(expected));
            }
        }
    }
    assert_eq!(server.offer(spec(0)), Err(ServerError::NoFreeRelid));
    assert_eq!(server.channel(128).unwrap().monitor_id, Some(127));
    server.rescind(5).unwrap();
    let mut monitored = spec(0);
    monitored.monitored = true;
    assert_eq!(server.offer(monitored), Ok(5));
    assert_eq!(server.channel(5).unwrap().monitor_id, Some(4), "the freed monitor id is reused");
    assert_eq!(alloc::format!("{}", ServerError::NoFreeRelid), "all relids 1..=2047 are in use");
}

#[test]
fn gpadls_of_every_size_are_reassembled_exactly() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 1);
    for (index, count) in [1u64, 2, 25, 26, 27, 28, 53, 54, 55, 56, 100, 999, 1000].into_iter().enumerate() {
        let pfns = pages(0x4_0000_0000 + count, count);
        let handle = 0xE1E10 + index as u32;
        assert_eq!(create_gpadl(&mut server, 1, handle, &pfns), [0], "{count} pages");
        let stored = server.gpadl(handle).unwrap();
        assert_eq!(stored.relid(), 1);
        assert_eq!(stored.whole_pages(), Some(pfns.as_slice()));
        assert!(events(&mut server).contains(&ServerEvent::GpadlCreated { relid: 1, gpadl: handle }));
    }
    // A byte range inside pages, and a multi-range description.
    let id = message_id(&server);
    for message in GpadlMessages::new(1, 0x77, 0x10, 3 * 4096, &[1, 2, 3, 4]).unwrap() {
        server.handle_message(id, message.as_bytes()).unwrap();
    }
    let (a, b) = ([10u64, 11], [20u64]);
    let ranges = [PfnRange::whole_pages(&a).unwrap(), PfnRange::new(8, 100, &b).unwrap()];
    for message in GpadlMessages::multi_range(1, 0x78, &ranges).unwrap() {
        server.handle_message(id, message.as_bytes()).unwrap();
    }
    assert_eq!(created_statuses(&mut server), [0, 0]);
    assert_eq!(server.gpadl(0x77).unwrap().gpadl.ranges[0].byte_offset, 0x10);
    assert_eq!(server.gpadl(0x78).unwrap().gpadl.pfns().collect::<Vec<_>>(), [10, 11, 20]);
    assert_eq!(server.gpadl(0x78).unwrap().whole_pages(), None);
}

#[test]
fn gpadl_refusals() {
    let config = ServerConfig { guest_pfn_limit: Some(0x1_0000), ..ServerConfig::new() };
    let mut server = connected(config, VmbusVersion::V5_3, 2);
    let id = message_id(&server);

    // Unknown relid: answered once the whole description is in, with the relid echoed.
    let messages: Vec<_> = GpadlMessages::for_pages(99, 0x10, &pages(1, 60)).unwrap().collect();
    for (index, message) in messages.iter().enumerate() {
        server.handle_message(id, message.as_bytes()).unwrap();
        assert_eq!(server.outgoing_len(), usize::from(index + 1 == messages.len()));
    }
    let answer = drain(&mut server);
    let Ok(Message::GpadlCreated(created)) = answer[0].parse() else { unreachable!() };
    assert_eq!((created.child_relid.get(), created.gpadl.get()), (99, 0x10));
    assert_eq!(created.creation_status.get(), status::NO_SUCH_DEVICE);

    // Duplicate handle: of an accepted GPADL, and of one still arriving.
    assert_eq!(create_gpadl(&mut server, 1, 0x20, &[5]), [0]);
    assert_eq!(create_gpadl(&mut server, 2, 0x20, &[6]), [status::OBJECT_NAME_COLLISION]);
    let pfns_21 = pages(1, 40);
    let mut long = GpadlMessages::for_pages(1, 0x21, &pfns_21).unwrap();
    server.handle_message(id, long.next().unwrap().as_bytes()).unwrap();
    let again = GpadlMessages::for_pages(1, 0x21, &[7]).unwrap().next().unwrap();
    server.handle_message(id, again.as_bytes()).unwrap();
    assert_eq!(created_statuses(&mut server), [status::OBJECT_NAME_COLLISION], "refused at once");
    server.handle_message(id, long.next().unwrap().as_bytes()).unwrap();
    assert_eq!(created_statuses(&mut server), [0], "the first description is unharmed");

    // A header whose range_buflen cannot hold a range and a page.
    let mut bad = GpadlHeader::new(1, 0x30, 12, 1).as_bytes().to_vec();
    bad.extend_from_slice(&4096u64.to_le_bytes());
    server.handle_message(id, &bad).unwrap();
    assert_eq!(created_statuses(&mut server), [status::INVALID_PARAMETER]);

    // A body out of sequence, and one carrying more than announced.
    let pfns_31 = pages(1, 30);
    let mut header = GpadlMessages::for_pages(1, 0x31, &pfns_31).unwrap();
    server.handle_message(id, header.next().unwrap().as_bytes()).unwrap();
    let mut body = GpadlBody::new(5, 0x31).as_bytes().to_vec();
    body.extend_from_slice(&[0; 16]);
    server.handle_message(id, &body).unwrap();
    assert_eq!(created_statuses(&mut server), [status::INVALID_PARAMETER]);
    let pfns_32 = pages(1, 27);
    let mut header = GpadlMessages::for_pages(1, 0x32, &pfns_32).unwrap();
    server.handle_message(id, header.next().unwrap().as_bytes()).unwrap();
    let mut body = GpadlBody::new(1, 0x32).as_bytes().to_vec();
    body.extend_from_slice(&[0; 24]);
    server.handle_message(id, &body).unwrap();
    assert_eq!(created_statuses(&mut server), [status::INVALID_PARAMETER]);

    // Ranges that do not add up: byte_count 0.
    let mut zero = GpadlHeader::new(1, 0x33, 16, 1).as_bytes().to_vec();
    zero.extend_from_slice(&0u64.to_le_bytes());
    zero.extend_from_slice(&5u64.to_le_bytes());
    server.handle_message(id, &zero).unwrap();
    assert_eq!(created_statuses(&mut server), [status::INVALID_PARAMETER]);

    // A page outside guest memory.
    assert_eq!(create_gpadl(&mut server, 1, 0x34, &[5, 0x1_0000]), [status::INVALID_PARAMETER]);

    // A stray body.
    server.handle_message(id, GpadlBody::new(1, 0x99).as_bytes()).unwrap();
    assert!(drain(&mut server).is_empty());

    let reasons: Vec<GpadlRefusal> = events(&mut server)
        .into_iter()
        .filter_map(|e| match e {
            ServerEvent::GpadlRefused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        reasons,
        [
            GpadlRefusal::UnknownChannel,
            GpadlRefusal::DuplicateHandle,
            GpadlRefusal::DuplicateHandle,
            GpadlRefusal::Malformed(GpadlError::BadRangeBufferLength { range_buflen: 12 }),
            GpadlRefusal::Malformed(GpadlError::MessageNumber { expected: 1, found: 5 }),
            GpadlRefusal::Malformed(GpadlError::ExcessData { expected_words: 1, received_words: 3 }),
            GpadlRefusal::Malformed(GpadlError::ByteCountZero),
            GpadlRefusal::PfnOutOfRange { pfn: 0x1_0000 },
        ]
    );
    let stats = server.stats();
    assert_eq!(stats.gpadl_failures, 8);
    assert_eq!(stats.unknown_gpadl, 1);
    assert_eq!(server.pending_gpadl_count(), 0);
}

#[test]
fn too_many_descriptions_in_flight_are_refused() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 1);
    let id = message_id(&server);
    for handle in 0..MAX_PENDING_GPADLS as u32 {
        let header = GpadlMessages::for_pages(1, handle + 1, &pages(1, 30)).unwrap().next().unwrap();
        server.handle_message(id, header.as_bytes()).unwrap();
    }
    assert_eq!(server.pending_gpadl_count(), MAX_PENDING_GPADLS);
    assert_eq!(create_gpadl(&mut server, 1, 0x1000, &[1]), [status::INSUFFICIENT_RESOURCES]);
}

#[test]
fn open_succeeds_or_answers_each_failure_status() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 3);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(0x100, 4)), [0]);
    assert_eq!(create_gpadl(&mut server, 2, 0x20, &pages(0x200, 4)), [0]);
    let id = message_id(&server);
    for message in GpadlMessages::new(1, 0x11, 0x20, 4096, &[0x300, 0x301]).unwrap() {
        server.handle_message(id, message.as_bytes()).unwrap();
    }
    drain(&mut server);
    let long_header = GpadlMessages::for_pages(1, 0x12, &pages(1, 40)).unwrap().next().unwrap();
    server.handle_message(id, long_header.as_bytes()).unwrap();

    assert_eq!(open(&mut server, 42, 0x10, 2), [status::NO_SUCH_DEVICE]);
    assert_eq!(open(&mut server, 1, 0x99, 2), [status::NOT_FOUND]);
    assert_eq!(open(&mut server, 1, 0x12, 2), [status::NOT_FOUND], "still being assembled");
    assert_eq!(open(&mut server, 1, 0x20, 2), [status::ACCESS_DENIED], "channel 2's GPADL");
    assert_eq!(open(&mut server, 1, 0x11, 1), [status::INVALID_PARAMETER], "not whole pages");
    for offset in [0, 1, 3, 4, 5, u32::MAX] {
        assert_eq!(open(&mut server, 1, 0x10, offset), [status::INVALID_PARAMETER], "offset {offset}");
    }
    assert_eq!(open(&mut server, 1, 0x10, 2), [0]);
    assert_eq!(open(&mut server, 1, 0x10, 2), [status::INVALID_DEVICE_STATE], "already open");
    let info = server.open_channel_info(1).unwrap();
    assert_eq!((info.open_id, info.ring_gpadl, info.downstream_page_offset), (101, 0x10, 2));

    let refusals: Vec<OpenRefusal> = events(&mut server)
        .into_iter()
        .filter_map(|e| match e {
            ServerEvent::OpenRefused { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(refusals.len(), 12);
    assert_eq!(
        refusals[..5],
        [
            OpenRefusal::UnknownChannel,
            OpenRefusal::UnknownGpadl,
            OpenRefusal::UnknownGpadl,
            OpenRefusal::ForeignGpadl,
            OpenRefusal::RingNotWholePages,
        ]
    );
    assert_eq!(refusals[11], OpenRefusal::AlreadyOpen);
    assert_eq!(server.stats().open_failures, 12);

    // A rescinded channel's open is ignored: the rescind is the answer.
    assert_eq!(create_gpadl(&mut server, 3, 0x30, &pages(0x400, 4)), [0]);
    server.rescind(3).unwrap();
    drain(&mut server);
    assert!(open(&mut server, 3, 0x30, 2).is_empty());
}

#[test]
fn a_smaller_ring_minimum_can_be_configured() {
    let config = ServerConfig { min_ring_pages: 1, ..ServerConfig::new() };
    let mut server = connected(config, VmbusVersion::V5_3, 1);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &[1, 2]), [0]);
    assert_eq!(open(&mut server, 1, 0x10, 1), [0]);
}

#[test]
fn an_owner_can_hold_an_open_and_decide() {
    let mut server = Server::new(ServerConfig::new());
    let mut held = spec(0);
    held.confirm_opens = true;
    server.offer(held.clone()).unwrap();
    server.offer(held).unwrap();
    post(&mut server, ID4, &contact(VmbusVersion::V5_3)).unwrap();
    post(&mut server, ID4, &RequestOffers::new()).unwrap();
    drain(&mut server);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(1, 4)), [0]);
    assert_eq!(create_gpadl(&mut server, 2, 0x20, &pages(9, 4)), [0]);
    events(&mut server);
    assert!(open(&mut server, 1, 0x10, 2).is_empty(), "held");
    assert_eq!(events(&mut server), [ServerEvent::OpenRequested { relid: 1 }]);
    assert_eq!(server.channel(1).unwrap().status, ChannelStatus::Opening);
    assert!(server.open_channel_info(1).is_none());
    assert_eq!(open(&mut server, 1, 0x10, 2), [status::INVALID_DEVICE_STATE], "a second open while held");
    server.complete_open(1, 0).unwrap();
    assert_eq!(created_or_open_results(&mut server), [(1, 0)]);
    assert!(server.open_channel_info(1).is_some());
    assert_eq!(server.complete_open(1, 0), Err(ServerError::NotOpening(1)));

    assert!(open(&mut server, 2, 0x20, 2).is_empty());
    server.complete_open(2, 0xC000_00A3).unwrap();
    assert_eq!(created_or_open_results(&mut server), [(2, 0xC000_00A3)]);
    assert_eq!(server.channel(2).unwrap().status, ChannelStatus::Closed);
    assert!(
        events(&mut server).contains(&ServerEvent::OpenRefused { relid: 2, reason: OpenRefusal::Device(0xC000_00A3) })
    );
    assert_eq!(server.complete_open(9, 0), Err(ServerError::UnknownChannel(9)));
}

fn created_or_open_results(server: &mut Server) -> Vec<(u32, u32)> {
    drain(server)
        .iter()
        .filter_map(|b| match b.parse() {
            Ok(Message::OpenChannelResult(r)) => Some((r.child_relid.get(), r.status.get())),
            _ => None,
        })
        .collect()
}

#[test]
fn teardown_of_an_open_ring_waits_for_close_from_4_0_on() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V4_0, 1);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(1, 4)), [0]);
    assert_eq!(create_gpadl(&mut server, 1, 0x11, &[50]), [0]);
    assert_eq!(open(&mut server, 1, 0x10, 2), [0]);
    post(&mut server, ID1, &GpadlTeardown::new(1, 0x10)).unwrap();
    assert!(drain(&mut server).is_empty(), "held while the ring is in use");
    assert!(server.gpadl(0x10).unwrap().teardown_pending);
    assert_eq!(server.stats().deferred_teardowns, 1);
    post(&mut server, ID1, &GpadlTeardown::new(1, 0x10)).unwrap();
    assert_eq!(server.stats().out_of_state, 1, "a second teardown of the same GPADL");
    // Another GPADL of the open channel goes at once.
    post(&mut server, ID1, &GpadlTeardown::new(1, 0x11)).unwrap();
    assert_eq!(types(&drain(&mut server)), [MessageType::GPADL_TORNDOWN]);
    events(&mut server);
    post(&mut server, ID1, &CloseChannel::new(1)).unwrap();
    let sent = drain(&mut server);
    assert_eq!(types(&sent), [MessageType::GPADL_TORNDOWN]);
    let Ok(Message::GpadlTorndown(torndown)) = sent[0].parse() else { unreachable!() };
    assert_eq!(torndown.gpadl.get(), 0x10);
    assert_eq!(
        events(&mut server),
        [ServerEvent::ChannelClosed { relid: 1 }, ServerEvent::GpadlTornDown { relid: 1, gpadl: 0x10 }]
    );
    post(&mut server, ID1, &CloseChannel::new(1)).unwrap();
    assert_eq!(server.stats().out_of_state, 2, "closing a closed channel");
}

#[test]
fn teardown_of_an_open_ring_is_answered_at_once_before_4_0() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V3_0, 1);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(1, 4)), [0]);
    assert_eq!(open(&mut server, 1, 0x10, 2), [0]);
    post(&mut server, ID1, &GpadlTeardown::new(1, 0x10)).unwrap();
    assert_eq!(types(&drain(&mut server)), [MessageType::GPADL_TORNDOWN]);
    assert!(server.gpadl(0x10).is_none());
    assert_eq!(
        server.open_channel_info(1).unwrap().ring_pfns,
        pages(1, 4),
        "the open channel keeps its pages until closed"
    );
    post(&mut server, ID1, &CloseChannel::new(1)).unwrap();
    assert!(drain(&mut server).is_empty());
}

#[test]
fn teardown_of_unknown_mismatched_or_unfinished_gpadls_is_ignored() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 2);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &[1]), [0]);
    post(&mut server, ID4, &GpadlTeardown::new(1, 0x99)).unwrap();
    post(&mut server, ID4, &GpadlTeardown::new(2, 0x10)).unwrap();
    let header = GpadlMessages::for_pages(1, 0x11, &pages(1, 40)).unwrap().next().unwrap();
    server.handle_message(ID4, header.as_bytes()).unwrap();
    post(&mut server, ID4, &GpadlTeardown::new(1, 0x11)).unwrap();
    assert!(drain(&mut server).is_empty());
    assert_eq!(server.stats().unknown_gpadl, 2);
    assert_eq!(server.stats().out_of_state, 1);
    assert!(server.gpadl(0x10).is_some());
}

#[test]
fn rescind_of_an_open_channel_then_release_drops_its_gpadls() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 1);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(1, 4)), [0]);
    assert_eq!(create_gpadl(&mut server, 1, 0x11, &[77]), [0]);
    assert_eq!(open(&mut server, 1, 0x10, 2), [0]);
    events(&mut server);
    server.rescind(1).unwrap();
    assert_eq!(types(&drain(&mut server)), [MessageType::RESCIND_CHANNELOFFER]);
    assert_eq!(events(&mut server), [ServerEvent::ChannelClosed { relid: 1 }]);
    assert!(server.open_channel_info(1).is_none());
    let before = server.stats();
    post(&mut server, ID4, &CloseChannel::new(1)).unwrap();
    assert_eq!(server.stats().out_of_state, before.out_of_state, "accepted silently");
    // A teardown for the rescinded channel is answered at once; the ring GPADL stays until release.
    post(&mut server, ID4, &GpadlTeardown::new(1, 0x11)).unwrap();
    assert_eq!(types(&drain(&mut server)), [MessageType::GPADL_TORNDOWN]);
    assert_eq!(create_gpadl(&mut server, 1, 0x12, &[5]), [status::NO_SUCH_DEVICE]);
    post(&mut server, ID4, &RelIdReleased::new(1)).unwrap();
    assert!(drain(&mut server).is_empty(), "no GPADL_TORNDOWN for what the release dropped");
    assert!(server.gpadl(0x10).is_none());
    assert!(server.channel(1).is_none());
    assert!(events(&mut server).contains(&ServerEvent::ChannelReleased { relid: 1 }));
}

#[test]
fn modify_channel_by_version() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 2);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(1, 4)), [0]);
    assert_eq!(open(&mut server, 1, 0x10, 2), [0]);
    events(&mut server);
    let modify_statuses = |server: &mut Server, relid: u32| {
        post(server, ID4, &ModifyChannel::new(relid, 3)).unwrap();
        drain(server)
            .iter()
            .filter_map(|b| match b.parse() {
                Ok(Message::ModifyChannelResponse(r)) => Some((r.child_relid.get(), r.status.get())),
                _ => None,
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(modify_statuses(&mut server, 1), [(1, 0)]);
    assert_eq!(server.open_channel_info(1).unwrap().target_vp, 3);
    assert_eq!(events(&mut server), [ServerEvent::ChannelModified { relid: 1, target_vp: 3 }]);
    assert_eq!(modify_statuses(&mut server, 2), [(2, status::INVALID_DEVICE_STATE)]);
    assert_eq!(modify_statuses(&mut server, 9), [(9, status::NO_SUCH_DEVICE)]);

    let mut rs3 = connected(ServerConfig::new(), VmbusVersion::V4_1, 1);
    assert_eq!(create_gpadl(&mut rs3, 1, 0x10, &pages(1, 4)), [0]);
    assert_eq!(open(&mut rs3, 1, 0x10, 2), [0]);
    events(&mut rs3);
    post(&mut rs3, ID1, &ModifyChannel::new(1, 2)).unwrap();
    assert!(drain(&mut rs3).is_empty(), "no answer before 5.3");
    assert_eq!(events(&mut rs3), [ServerEvent::ChannelModified { relid: 1, target_vp: 2 }]);

    let mut win10 = connected(ServerConfig::new(), VmbusVersion::V4_0, 1);
    post(&mut win10, ID1, &ModifyChannel::new(1, 2)).unwrap();
    assert!(drain(&mut win10).is_empty());
    assert_eq!(win10.stats().out_of_state, 1, "MODIFYCHANNEL needs 4.1");
}

#[test]
fn unload_and_reconnect_reset_the_connection() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 3);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(1, 4)), [0]);
    assert_eq!(open(&mut server, 1, 0x10, 2), [0]);
    server.rescind(3).unwrap();
    let header = GpadlMessages::for_pages(2, 0x20, &pages(1, 40)).unwrap().next().unwrap();
    server.handle_message(ID4, header.as_bytes()).unwrap();
    events(&mut server);
    post(&mut server, ID4, &Unload::new()).unwrap();
    assert_eq!(types(&drain(&mut server)), [MessageType::UNLOAD_RESPONSE], "the undelivered rescind is dropped");
    assert_eq!(
        events(&mut server),
        [
            ServerEvent::ChannelClosed { relid: 1 },
            ServerEvent::ChannelReleased { relid: 3 },
            ServerEvent::Disconnected { reason: DisconnectReason::Unload },
        ]
    );
    assert!(server.connection().is_none());
    assert_eq!((server.gpadl_handles().count(), server.pending_gpadl_count()), (0, 0));
    assert_eq!(server.relids().collect::<Vec<_>>(), [1, 2]);
    assert!(!server.channel(1).unwrap().offered_to_guest);

    // A new connection gets the offers again; a second INITIATE_CONTACT replaces it.
    post(&mut server, ID4, &contact(VmbusVersion::V5_3)).unwrap();
    post(&mut server, ID4, &RequestOffers::new()).unwrap();
    let sent = types(&drain(&mut server));
    assert_eq!(sent.iter().filter(|t| **t == MessageType::OFFERCHANNEL).count(), 2);
    assert_eq!(create_gpadl(&mut server, 1, 0x10, &pages(1, 4)), [0], "handles start afresh");
    assert_eq!(open(&mut server, 1, 0x10, 2), [0]);
    events(&mut server);
    post(&mut server, ID4, &contact(VmbusVersion::V5_2)).unwrap();
    assert_eq!(
        events(&mut server),
        [
            ServerEvent::ChannelClosed { relid: 1 },
            ServerEvent::Disconnected { reason: DisconnectReason::Reconnect },
            ServerEvent::Connected { version: VmbusVersion::V5_2 },
        ]
    );
}

#[test]
fn host_to_guest_types_malformed_and_unsupported_messages_are_counted() {
    let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 1);
    let offer = crate::protocol::OfferChannel::new(device_class::KVP, Guid::ZERO, 9, 9);
    post(&mut server, ID4, &offer).unwrap();
    post(&mut server, ID4, &crate::protocol::UnloadResponse::new()).unwrap();
    post(&mut server, ID4, &TlConnectRequest::new(Guid::ZERO, device_class::KVP)).unwrap();
    server.handle_message(ID4, &[5, 0, 0, 0, 0, 0, 0, 0, 1]).unwrap();
    server.handle_message(ID4, &[99, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    server.handle_message(ID4, &[]).unwrap();
    assert!(drain(&mut server).is_empty());
    let stats = server.stats();
    assert_eq!((stats.unexpected, stats.malformed), (3, 3));
    assert_eq!(stats.received, 2 + 6, "INITIATE_CONTACT and REQUESTOFFERS, then these six");
}

#[test]
fn undrained_events_are_bounded() {
    let mut server = Server::new(ServerConfig::new());
    for _ in 0..MAX_QUEUED_EVENTS + 10 {
        post(&mut server, ID4, &contact(VmbusVersion::V5_3)).unwrap();
        server.pop_outgoing();
    }
    assert_eq!(events(&mut server).len(), MAX_QUEUED_EVENTS);
    assert!(server.stats().events_dropped > 0);
}

/// One step of a random session: guest messages with fields drawn from small ranges (so they often hit real
/// relids and handles), host API calls, and raw bytes.
#[derive(Clone, Debug)]
enum Step {
    Contact(usize, bool),
    RequestOffers,
    Gpadl { relid: u32, handle: u32, pages: u64, offset: u32 },
    Header { relid: u32, handle: u32, buflen: u16, count: u16, words: Vec<u64> },
    Body { handle: u32, number: u32, words: Vec<u64> },
    Teardown { relid: u32, handle: u32 },
    Open { relid: u32, handle: u32, offset: u32 },
    Close(u32),
    Released(u32),
    Modify(u32),
    Unload,
    HostOffer(bool),
    HostRescind(u32),
    HostComplete(u32, u32),
    Raw(u32, Vec<u8>),
}

fn step() -> impl Strategy<Value = Step> {
    let relid = 0u32..6;
    let handle = 0u32..6;
    prop_oneof![
        (0usize..VmbusVersion::KNOWN.len(), any::<bool>()).prop_map(|(v, id4)| Step::Contact(v, id4)),
        Just(Step::RequestOffers),
        (relid.clone(), handle.clone(), 1u64..80, 0u32..4).prop_map(|(relid, handle, pages, offset)| Step::Gpadl {
            relid,
            handle,
            pages,
            offset
        }),
        (relid.clone(), handle.clone(), any::<u16>(), 0u16..3, proptest::collection::vec(any::<u64>(), 0..30))
            .prop_map(|(relid, handle, buflen, count, words)| Step::Header { relid, handle, buflen, count, words }),
        (handle.clone(), 0u32..4, proptest::collection::vec(0u64..4, 0..30))
            .prop_map(|(handle, number, words)| Step::Body { handle, number, words }),
        (relid.clone(), handle.clone()).prop_map(|(relid, handle)| Step::Teardown { relid, handle }),
        (relid.clone(), handle.clone(), 0u32..6).prop_map(|(relid, handle, offset)| Step::Open {
            relid,
            handle,
            offset
        }),
        relid.clone().prop_map(Step::Close),
        relid.clone().prop_map(Step::Released),
        relid.clone().prop_map(Step::Modify),
        Just(Step::Unload),
        any::<bool>().prop_map(Step::HostOffer),
        relid.clone().prop_map(Step::HostRescind),
        (relid, prop_oneof![Just(0u32), Just(status::UNSUCCESSFUL)]).prop_map(|(r, s)| Step::HostComplete(r, s)),
        (prop_oneof![Just(1u32), Just(4u32), Just(7u32)], proptest::collection::vec(any::<u8>(), 0..250))
            .prop_map(|(id, bytes)| Step::Raw(id, bytes)),
    ]
}

fn run(server: &mut Server, step: &Step) {
    let id = message_id(server);
    let message = |server: &mut Server, bytes: &[u8]| {
        let _ = server.handle_message(id, bytes);
    };
    match step {
        Step::Contact(index, id4) => {
            let version = VmbusVersion::KNOWN[*index];
            let _ = post(server, if *id4 { ID4 } else { ID1 }, &contact(version));
        }
        Step::RequestOffers => message(server, RequestOffers::new().as_bytes()),
        Step::Gpadl { relid, handle, pages: count, offset } => {
            let pfns = pages(1, *count);
            if let Ok(messages) = GpadlMessages::new(*relid, *handle, *offset, (*count as u32) * 4096 - offset, &pfns) {
                for m in messages {
                    message(server, m.as_bytes());
                }
            }
        }
        Step::Header { relid, handle, buflen, count, words } => {
            let mut bytes = GpadlHeader::new(*relid, *handle, *buflen, *count).as_bytes().to_vec();
            words.iter().take(27).for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
            message(server, &bytes);
        }
        Step::Body { handle, number, words } => {
            let mut bytes = GpadlBody::new(*number, *handle).as_bytes().to_vec();
            words.iter().take(28).for_each(|w| bytes.extend_from_slice(&w.to_le_bytes()));
            message(server, &bytes);
        }
        Step::Teardown { relid, handle } => message(server, GpadlTeardown::new(*relid, *handle).as_bytes()),
        Step::Open { relid, handle, offset } => {
            message(server, OpenChannel::new(*relid, 1, *handle, 0, *offset).as_bytes())
        }
        Step::Close(relid) => message(server, CloseChannel::new(*relid).as_bytes()),
        Step::Released(relid) => message(server, RelIdReleased::new(*relid).as_bytes()),
        Step::Modify(relid) => message(server, ModifyChannel::new(*relid, 1).as_bytes()),
        Step::Unload => message(server, Unload::new().as_bytes()),
        Step::HostOffer(confirm) => {
            let mut offer = spec(0);
            offer.confirm_opens = *confirm;
            let _ = server.offer(offer);
        }
        Step::HostRescind(relid) => {
            let _ = server.rescind(*relid);
        }
        Step::HostComplete(relid, status) => {
            let _ = server.complete_open(*relid, *status);
        }
        Step::Raw(id, bytes) => {
            let _ = server.handle_message(*id, bytes);
        }
    }
}

/// What must hold after any sequence of steps.
fn check_invariants(server: &mut Server) {
    while let Some(message) = server.pop_outgoing() {
        assert!(message.len() <= crate::protocol::MAX_MESSAGE_SIZE);
        assert!(message.parse().is_ok(), "the server sent an unparsable message: {message:?}");
    }
    assert!(server.pending_gpadl_count() <= MAX_PENDING_GPADLS);
    let close_first = server.connection().is_none_or(|c| c.version.requires_gpadl_teardown_after_close());
    for relid in server.relids().collect::<Vec<_>>() {
        assert!((1..=MAX_RELID).contains(&relid));
        let channel = server.channel(relid).unwrap();
        if channel.status != ChannelStatus::Closed {
            assert!(server.connection().is_some(), "an open channel outlived its connection");
            assert!(channel.offered_to_guest && !channel.rescinded);
        }
        if let Some(info) = server.open_channel_info(relid) {
            let minimum = server.config().min_ring_pages as usize;
            assert!(info.guest_to_host_ring_pfns().len() >= minimum);
            assert!(info.host_to_guest_ring_pfns().len() >= minimum);
            if close_first {
                let ring = server.gpadl(info.ring_gpadl).expect("an open ring's GPADL exists from 4.0 on");
                assert_eq!(ring.relid(), relid);
            }
        }
    }
    for handle in server.gpadl_handles().collect::<Vec<_>>() {
        let gpadl = server.gpadl(handle).unwrap();
        assert!(server.channel(gpadl.relid()).is_some(), "a GPADL outlived its channel");
    }
    if server.connection().is_none() {
        assert_eq!(server.gpadl_handles().count(), 0);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_bytes_never_panic(id in 0u32..8, bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut server = connected(ServerConfig::new(), VmbusVersion::V5_3, 2);
        let _ = server.handle_message(id, &bytes);
        check_invariants(&mut server);
    }

    #[test]
    fn random_sessions_keep_the_invariants(steps in proptest::collection::vec(step(), 1..60)) {
        let mut server = Server::new(ServerConfig::new());
        for _ in 0..3 {
            server.offer(spec(0)).unwrap();
        }
        for step in &steps {
            run(&mut server, step);
            check_invariants(&mut server);
            while server.pop_event().is_some() {}
        }
    }
}
