//! The client against a scripted fake host: every control sequence and its failure paths.

use super::fake_host::*;
use super::*;
use crate::protocol::{
    ConnectionState, Message, OpenChannelResult, RescindChannelOffer, VmbusVersion, device_class,
};
use alloc::vec;
use alloc::vec::Vec;

fn contacted_versions(host: &FakeHost) -> Vec<(VmbusVersion, u32)> {
    host.posted()
        .iter()
        .filter_map(|p| match p.message() {
            Message::InitiateContact(c) => Some((c.version(), p.connection_id)),
            _ => None,
        })
        .collect()
}

#[test]
fn connects_at_the_newest_version_and_uses_the_hosts_message_connection_id() {
    let conn = connect(HostBehaviour { msg_conn_id: 7, ..Default::default() }).unwrap();
    assert_eq!(conn.version(), VmbusVersion::V5_3);
    assert_eq!(conn.message_connection_id(), 7);
    let contacts = contacted_versions(conn.transport());
    assert_eq!(contacts, vec![(VmbusVersion::V5_3, 4)]);
    let posted = conn.transport().posted();
    let Message::InitiateContact(c) = posted[0].message() else { unreachable!() };
    assert_eq!(c.msg_sint(), 2, "≥ 5.0 names SINT 2 instead of the interrupt page");
    assert_eq!(c.monitor_page1.get(), 0x10_1000);
    assert_eq!(c.monitor_page2.get(), 0x10_2000);
}

/// QEMU's host: versions above 4.0 refused, message connection id 1 (the real-host tier sees the same).
#[test]
fn falls_back_version_by_version_to_what_the_host_accepts() {
    let behaviour = HostBehaviour { accepted: vec![VmbusVersion::V4_0], ..Default::default() };
    let mut conn = connect(behaviour).unwrap();
    assert_eq!(conn.version(), VmbusVersion::V4_0);
    assert_eq!(conn.message_connection_id(), 1);
    let contacts = contacted_versions(conn.transport());
    let expected = [
        (VmbusVersion::V5_3, 4),
        (VmbusVersion::V5_2, 4),
        (VmbusVersion::V5_1, 4),
        (VmbusVersion::V5_0, 4),
        (VmbusVersion::V4_1, 1),
        (VmbusVersion::V4_0, 1),
    ];
    assert_eq!(contacts, expected);
    let posted = conn.transport().posted();
    let Message::InitiateContact(c) = posted.last().unwrap().message() else { unreachable!() };
    assert_eq!(c.interrupt_page(), 0x10_0000, "< 5.0 passes the interrupt page");
    // Later messages go to connection id 1.
    conn.request_offers().unwrap();
    assert_eq!(conn.transport().posted().last().unwrap().connection_id, 1);
}

#[test]
fn an_old_host_that_does_not_know_connection_id_4_is_reached_on_id_1() {
    let behaviour = HostBehaviour {
        knows_connection_4: false,
        accepted: vec![VmbusVersion::V4_1, VmbusVersion::V4_0],
        ..Default::default()
    };
    let conn = connect(behaviour).unwrap();
    assert_eq!(conn.version(), VmbusVersion::V4_1);
    // The refused posts to id 4 never reached the host; the first one it saw is 4.1 on id 1.
    assert_eq!(contacted_versions(conn.transport()), vec![(VmbusVersion::V4_1, 1)]);
}

#[test]
fn version_rejected_at_every_step_fails_cleanly() {
    let behaviour = HostBehaviour { accepted: vec![VmbusVersion::V6_0], ..Default::default() };
    let host = FakeHost::new(behaviour);
    let err = Connection::connect(host, options()).err().unwrap();
    assert_eq!(err, ClientError::NoVersionAccepted);
}

#[test]
fn a_refused_connection_state_is_an_error() {
    let behaviour = HostBehaviour { connection_state: ConnectionState::FAILED_LOW_RESOURCES, ..Default::default() };
    assert_eq!(connect(behaviour).err(), Some(ClientError::ConnectionRefused(ConnectionState::FAILED_LOW_RESOURCES)));
}

#[test]
fn a_v5_answer_without_a_message_connection_id_is_refused() {
    let behaviour = HostBehaviour { short_version_response: true, ..Default::default() };
    assert_eq!(connect(behaviour).err(), Some(ClientError::MissingMessageConnectionId));
}

#[test]
fn the_short_version_response_of_old_hosts_is_accepted_below_5_0() {
    let behaviour =
        HostBehaviour { short_version_response: true, accepted: vec![VmbusVersion::V4_0], ..Default::default() };
    let conn = connect(behaviour).unwrap();
    assert_eq!((conn.version(), conn.message_connection_id()), (VmbusVersion::V4_0, 1));
}

#[test]
fn a_host_that_never_answers_times_out() {
    let behaviour = HostBehaviour { silent: true, ..Default::default() };
    assert_eq!(connect(behaviour).err(), Some(ClientError::Timeout { waiting_for: MessageType::VERSION_RESPONSE }));
}

#[test]
fn transient_post_failures_are_retried_with_backoff() {
    let conn = connect(HostBehaviour { busy_posts: 3, ..Default::default() }).unwrap();
    assert_eq!(conn.version(), VmbusVersion::V5_3);
    let delays = conn.transport().state.borrow().delays_us.clone();
    assert_eq!(delays, vec![1, 2, 4], "1 µs doubling");
}

#[test]
fn offers_are_collected_until_all_offers_delivered() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    let offers = conn.request_offers().unwrap();
    assert_eq!(offers.len(), 2);
    assert_eq!(offers[0].child_relid, 5);
    assert_eq!(offers[0].class_name(), Some("heartbeat"));
    assert_eq!(offers[1].connection_id, 0x1006);
    assert_eq!(conn.poll(), None, "the initial offers are not hot-add events");
}

#[test]
fn malformed_and_out_of_range_offers_are_dropped_not_fatal() {
    let mut behaviour = HostBehaviour::default();
    behaviour.offers.insert(0, offer(0, device_class::KVP)); // relid 0 is reserved
    behaviour.offers.push(offer(5, device_class::KVP)); // duplicate relid
    let mut conn = connect(behaviour).unwrap();
    // A truncated OPENCHANNEL_RESULT and an unknown message type arrive before the offers.
    conn.transport().send(vec![6, 0, 0, 0, 0, 0, 0, 0, 5]);
    conn.transport().send(vec![99, 0, 0, 0, 0, 0, 0, 0]);
    let offers = conn.request_offers().unwrap();
    assert_eq!(offers.iter().map(|o| o.child_relid).collect::<Vec<_>>(), vec![5, 6]);
    let stats = conn.stats();
    assert_eq!(stats.malformed, 2);
    assert_eq!(stats.refused_offers, 2);
}

#[test]
fn gpadl_of_many_pages_goes_out_in_header_and_body_messages() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    conn.request_offers().unwrap();
    let pfns: Vec<u64> = (0..1000).map(|i| 0x8000 + i * 3).collect();
    let gpadl = conn.create_gpadl(5, &pfns, 0, 1000 * 4096).unwrap();
    let state = conn.transport().state.borrow();
    assert_eq!(state.gpadl_pfns, vec![pfns.clone()]);
    drop(state);
    let types = conn.transport().posted_types();
    assert_eq!(types.iter().filter(|t| **t == MessageType::GPADL_BODY).count(), 35);
    // Handles are unique.
    let second = conn.create_gpadl(5, &pfns[..1], 0, 4096).unwrap();
    assert_ne!(gpadl, second);
}

#[test]
fn gpadl_creation_failure_is_reported() {
    let mut conn = connect(HostBehaviour { gpadl_status: 0xC000_0001, ..Default::default() }).unwrap();
    conn.request_offers().unwrap();
    assert_eq!(conn.create_gpadl(5, &[1, 2], 0, 8192), Err(ClientError::GpadlCreationFailed(0xC000_0001)));
}

#[test]
fn requests_for_unknown_channels_fail() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    conn.request_offers().unwrap();
    assert_eq!(conn.create_gpadl(42, &[1], 0, 4096), Err(ClientError::UnknownChannel(42)));
    assert_eq!(conn.open_channel(42, GpadlId(1), 1, 0, &[]), Err(ClientError::UnknownChannel(42)));
    assert_eq!(conn.close_channel(42), Err(ClientError::UnknownChannel(42)));
    assert_eq!(conn.open_channel(5, GpadlId(1), 1, 0, &[]), Err(ClientError::UnknownGpadl(1)));
}

fn open_relid_5(conn: &mut Connection<FakeHost>) -> GpadlId {
    conn.request_offers().unwrap();
    let gpadl = conn.create_gpadl(5, &[0x100, 0x101, 0x102, 0x103], 0, 4 * 4096).unwrap();
    conn.open_channel(5, gpadl, 2, 0, &[0xAB; 4]).unwrap();
    gpadl
}

#[test]
fn open_close_and_teardown_in_the_order_4_0_requires() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    let gpadl = open_relid_5(&mut conn);
    let open = conn.transport().posted().iter().find_map(|p| match p.message() {
        Message::OpenChannel(o) => Some(*o),
        _ => None,
    });
    let open = open.unwrap();
    assert_eq!(open.ring_buffer_gpadl.get(), gpadl.0);
    assert_eq!(open.downstream_ring_buffer_page_offset.get(), 2);
    assert_eq!(&open.user_data[..5], &[0xAB, 0xAB, 0xAB, 0xAB, 0]);
    assert_eq!(conn.open_channel(5, gpadl, 2, 0, &[]), Err(ClientError::InvalidState(5)), "already open");
    conn.close_channel(5).unwrap();
    conn.teardown_gpadl(5, gpadl).unwrap();
    let types = conn.transport().posted_types();
    let tail = &types[types.len() - 2..];
    assert_eq!(tail, [MessageType::CLOSECHANNEL, MessageType::GPADL_TEARDOWN]);
    assert_eq!(conn.teardown_gpadl(5, gpadl), Err(ClientError::UnknownGpadl(gpadl.0)));
}

#[test]
fn open_failure_status_is_reported() {
    let mut conn = connect(HostBehaviour { open_status: 0xC000_00A3, ..Default::default() }).unwrap();
    conn.request_offers().unwrap();
    let gpadl = conn.create_gpadl(5, &[1, 2], 0, 8192).unwrap();
    assert_eq!(conn.open_channel(5, gpadl, 1, 0, &[]), Err(ClientError::OpenFailed(0xC000_00A3)));
}

#[test]
fn user_data_longer_than_120_bytes_is_refused() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    conn.request_offers().unwrap();
    let gpadl = conn.create_gpadl(5, &[1, 2], 0, 8192).unwrap();
    assert_eq!(conn.open_channel(5, gpadl, 1, 0, &[0; 121]), Err(ClientError::UserDataTooLong(121)));
}

#[test]
fn rescind_during_open_ends_the_wait() {
    let mut conn = connect(HostBehaviour { rescind_on_open: true, ..Default::default() }).unwrap();
    conn.request_offers().unwrap();
    let gpadl = conn.create_gpadl(5, &[1, 2], 0, 8192).unwrap();
    assert_eq!(conn.open_channel(5, gpadl, 1, 0, &[]), Err(ClientError::Rescinded(5)));
    assert_eq!(conn.poll(), Some(Event::Rescinded(5)));
    // The GPADL is ours to drop; the host sends nothing for a rescinded channel, then the relid is released.
    conn.teardown_gpadl(5, gpadl).unwrap();
    conn.release_channel(5).unwrap();
    let last = conn.transport().posted().last().unwrap().clone();
    assert!(matches!(last.message(), Message::RelIdReleased(r) if r.child_relid.get() == 5));
    assert!(conn.offer(5).is_none());
}

#[test]
fn hot_added_offer_and_rescind_of_an_unopened_channel() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    conn.request_offers().unwrap();
    conn.transport().send(bytes_of(&offer(9, device_class::TIMESYNC)));
    assert_eq!(conn.poll(), Some(Event::Offered(9)));
    assert_eq!(conn.offer(9).unwrap().class_name(), Some("timesync"));
    conn.transport().send(bytes_of(&RescindChannelOffer::new(9)));
    assert_eq!(conn.poll(), Some(Event::Rescinded(9)));
    // Nobody held it: released at once.
    let last = conn.transport().posted().last().unwrap().clone();
    assert!(matches!(last.message(), Message::RelIdReleased(r) if r.child_relid.get() == 9));
    assert!(conn.offer(9).is_none());
    // A rescind of an unknown relid is counted, not fatal.
    conn.transport().send(bytes_of(&RescindChannelOffer::new(77)));
    assert_eq!(conn.poll(), None);
    assert_eq!(conn.stats().unexpected, 1);
}

#[test]
fn rescind_of_an_open_channel_waits_for_its_owner() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    let gpadl = open_relid_5(&mut conn);
    conn.transport().send(bytes_of(&RescindChannelOffer::new(5)));
    assert_eq!(conn.poll(), Some(Event::Rescinded(5)));
    assert_eq!(conn.release_channel(5), Err(ClientError::InvalidState(5)), "still open");
    let before = conn.transport().posted().len();
    conn.close_channel(5).unwrap();
    conn.teardown_gpadl(5, gpadl).unwrap();
    assert_eq!(conn.transport().posted().len(), before, "no messages about a rescinded channel");
    conn.release_channel(5).unwrap();
    assert_eq!(conn.transport().posted_types().last(), Some(&MessageType::RELID_RELEASED));
}

#[test]
fn modify_channel_needs_4_1_and_checks_the_5_3_answer() {
    let mut old = connect(HostBehaviour { accepted: vec![VmbusVersion::V4_0], ..Default::default() }).unwrap();
    open_relid_5(&mut old);
    assert_eq!(old.modify_channel(5, 1), Err(ClientError::NotSupported { version: VmbusVersion::V4_0 }));

    let mut new = connect(HostBehaviour::default()).unwrap();
    open_relid_5(&mut new);
    new.modify_channel(5, 1).unwrap();
    let modify = new.transport().posted().iter().find_map(|p| match p.message() {
        Message::ModifyChannel(m) => Some(*m),
        _ => None,
    });
    assert_eq!(modify.unwrap().target_vp.get(), 1);
}

#[test]
fn unload_then_everything_fails() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    conn.request_offers().unwrap();
    conn.unload().unwrap();
    assert!(conn.is_unloaded());
    assert_eq!(conn.create_gpadl(5, &[1], 0, 4096), Err(ClientError::Unloaded));
    assert_eq!(conn.transport().posted_types().last(), Some(&MessageType::UNLOAD));
}

#[test]
fn a_truncated_answer_is_dropped_and_the_request_times_out() {
    let mut conn = connect(HostBehaviour::default()).unwrap();
    conn.request_offers().unwrap();
    let gpadl = conn.create_gpadl(5, &[1, 2], 0, 8192).unwrap();
    // From now on the host answers only with a truncated OPENCHANNEL_RESULT.
    conn.transport().behaviour.borrow_mut().silent = true;
    let mut short = bytes_of(&OpenChannelResult::new(5, 5, 0));
    short.truncate(12);
    conn.transport().send(short);
    let result = conn.open_channel(5, gpadl, 1, 0, &[]);
    assert_eq!(result, Err(ClientError::Timeout { waiting_for: MessageType::OPENCHANNEL_RESULT }));
    assert_eq!(conn.stats().malformed, 1);
}

#[test]
fn an_offer_display_line_names_class_relid_and_signalling() {
    let offer = Offer::from_wire(&offer(6, device_class::DYNAMIC_MEMORY)).unwrap();
    let line = alloc::format!("{offer}");
    assert!(line.contains("relid   6"), "{line}");
    assert!(line.contains("dynamic memory"), "{line}");
    assert!(line.contains("event flags"), "{line}");
}
