//! End-to-end tests: each guest service against its host model, byte level, no channel; negotiation failure,
//! unknown types, short and oversized messages, and random bytes.

use alloc::string::String;
use alloc::vec::Vec;

use proptest::prelude::*;

use super::framing::{FrameError, IcFrame, MAX_MESSAGE_SIZE, MessageFields, build_message};
use super::guest::{GuestIcService, IcAction, IcError, IcFailure, IcReply};
use super::heartbeat::{HeartbeatAnswered, HeartbeatService};
use super::host::{
    FixedClock, HeartbeatHost, HostModelError, KvpHost, PoolQueryStep, ShutdownHost, ShutdownSpec, TimeSyncHost,
};
use super::kvp::{GuestIntrinsics, KvpAction, KvpEntry, KvpService, MAX_ENTRIES_PER_POOL};
use super::negotiate::{
    FRAMEWORK_1_0, FRAMEWORK_3_0, FRAMEWORK_VERSIONS, HEARTBEAT_VERSIONS, NegotiatedVersions, NegotiationFailure,
    TIMESYNC_VERSIONS, VersionPreferences,
};
use super::shutdown::{ShutdownKind, ShutdownRequest, ShutdownService};
use super::timesync::{TimeSampleKind, TimeSyncService, UnixTime, WINDOWS_TO_UNIX_EPOCH_100NS, WallClock, WindowsTime};
use super::wire::{ApplicationState, IcFlags, IcMessageType, IcStatus, IcVersion, KvpPool, ShutdownFlags};

/// The response of a reply, which must be there.
fn response<A>(reply: &IcReply<A>) -> &[u8] {
    reply.response.as_deref().expect("a response")
}

/// The response of a failure, which must be there.
fn failure_response(failure: &IcFailure) -> &[u8] {
    failure.response.as_deref().expect("an error response")
}

fn negotiated_heartbeat() -> (HeartbeatHost, HeartbeatService) {
    let mut host = HeartbeatHost::new();
    let mut guest = HeartbeatService::new();
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    host.ic.accept_negotiate_response(response(&reply)).unwrap();
    (host, guest)
}

fn intrinsics() -> GuestIntrinsics {
    GuestIntrinsics {
        fully_qualified_domain_name: "unikernel".into(),
        integration_services_version: "0.1.0".into(),
        network_address_ipv4: String::new(),
        network_address_ipv6: String::new(),
        os_build_number: "abc1234".into(),
        os_name: "Rust VMBus unikernel".into(),
        os_major_version: "0".into(),
        os_minor_version: "1".into(),
        os_version: "0.1.0".into(),
        processor_architecture: "9".into(),
    }
}

fn negotiated_kvp() -> (KvpHost, KvpService) {
    let mut host = KvpHost::new();
    let mut guest = KvpService::with_intrinsics(&intrinsics());
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    host.ic.accept_negotiate_response(response(&reply)).unwrap();
    (host, guest)
}

#[test]
fn negotiate_exchange_bytes() {
    let mut host = HeartbeatHost::new();
    let mut guest = HeartbeatService::new();
    let request = host.ic.negotiate_request();
    // Header: pipe {1, 20 + 8 + 4·4}; type 0 at 12; icmsgsize 24 at 18; flags 3 at 25; counts 2/2 at 28/30.
    assert_eq!(&request[0..8], &[1, 0, 0, 0, 44, 0, 0, 0]);
    assert_eq!(&request[12..14], &[0, 0]);
    assert_eq!(&request[18..20], &[24, 0]);
    assert_eq!(request[25], 3);
    assert_eq!(&request[28..32], &[2, 0, 2, 0]);
    let reply = guest.handle(&request).unwrap();
    let expected = NegotiatedVersions { framework: FRAMEWORK_3_0, message: IcVersion::new(3, 0) };
    assert_eq!(reply.action, IcAction::Negotiated(expected));
    let answer = response(&reply);
    assert_eq!(answer.len(), 44);
    assert_eq!(&answer[0..8], &[1, 0, 0, 0, 36, 0, 0, 0]);
    assert_eq!(&answer[18..20], &[0x10, 0]);
    assert_eq!(answer[25], 5);
    assert_eq!(&answer[28..44], &[1, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0]);
    assert_eq!(host.ic.accept_negotiate_response(answer), Ok(expected));
    assert_eq!(guest.negotiated(), Some(expected));
}

#[test]
fn heartbeats_are_answered_with_seq_plus_one_and_healthy() {
    let (mut host, mut guest) = negotiated_heartbeat();
    for sequence in 0..5u64 {
        let request = host.next_request().unwrap();
        let reply = guest.handle(&request).unwrap();
        assert_eq!(reply.action, IcAction::Service(HeartbeatAnswered { received: sequence, answered: sequence + 1 }));
        let answer = response(&reply);
        assert_eq!(&answer[28..36], &(sequence + 1).to_le_bytes());
        assert_eq!(&answer[36..40], &1u32.to_le_bytes());
        let seen = host.check_response(answer).unwrap();
        assert_eq!(seen.sequence, sequence + 1);
        assert_eq!(seen.state, Some(ApplicationState::HEALTHY));
    }
    assert_eq!(guest.answered_count(), 5);
    guest.set_state(ApplicationState::CRITICAL);
    let reply = guest.handle(&host.next_request().unwrap()).unwrap();
    assert_eq!(host.check_response(response(&reply)).unwrap().state, Some(ApplicationState::CRITICAL));
}

#[test]
fn host_model_catches_a_wrong_heartbeat_answer() {
    let (mut host, mut guest) = negotiated_heartbeat();
    let reply = guest.handle(&host.next_request().unwrap()).unwrap();
    let mut answer = response(&reply).to_vec();
    answer[28] = 7;
    assert_eq!(host.check_response(&answer), Err(HostModelError::WrongSequence { expected: 1, got: 7 }));
    let reply = guest.handle(&host.next_request().unwrap()).unwrap();
    let mut answer = response(&reply).to_vec();
    answer[24] ^= 1;
    assert!(matches!(host.check_response(&answer), Err(HostModelError::WrongTransaction { .. })));
    assert_eq!(host.check_response(response(&reply)).map(|o| o.sequence), Ok(2));
    assert_eq!(host.check_response(response(&reply)), Err(HostModelError::NothingPending));
}

#[test]
fn old_host_gets_old_versions() {
    const OLD: VersionPreferences =
        VersionPreferences { framework: &[IcVersion::new(1, 0)], message: &[IcVersion::new(1, 0)] };
    let mut host = HeartbeatHost::with_versions(OLD);
    let mut guest = HeartbeatService::new();
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    let old = NegotiatedVersions { framework: FRAMEWORK_1_0, message: IcVersion::new(1, 0) };
    assert_eq!(host.ic.accept_negotiate_response(response(&reply)), Ok(old));
    let reply = guest.handle(&host.next_request().unwrap()).unwrap();
    assert_eq!(host.check_response(response(&reply)).unwrap().sequence, 1);
}

#[test]
fn negotiation_failure_gets_the_empty_answer_and_blocks_messages() {
    const ALIEN_FRAMEWORK: VersionPreferences =
        VersionPreferences { framework: &[IcVersion::new(2, 0)], message: HEARTBEAT_VERSIONS };
    const ALIEN_MESSAGE: VersionPreferences =
        VersionPreferences { framework: FRAMEWORK_VERSIONS, message: &[IcVersion::new(7, 7)] };
    for (offered, why) in [
        (ALIEN_FRAMEWORK, NegotiationFailure::NoCommonFramework),
        (ALIEN_MESSAGE, NegotiationFailure::NoCommonMessageVersion),
    ] {
        let mut host = HeartbeatHost::with_versions(offered);
        let mut guest = HeartbeatService::new();
        let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
        assert_eq!(reply.action, IcAction::NegotiationFailed(why));
        let answer = response(&reply);
        assert_eq!(&answer[28..44], &[0; 16]);
        assert_eq!(&answer[18..20], &[0x10, 0]);
        assert_eq!(host.ic.accept_negotiate_response(answer), Err(HostModelError::NegotiationRejected));
        assert_eq!(host.next_request(), Err(HostModelError::NotNegotiated));
        assert_eq!(guest.negotiated(), None);
    }
}

/// A heartbeat built by hand, for a host that does not play by the rules.
fn raw_message(message_type: IcMessageType, flags: IcFlags, body: &[u8]) -> Vec<u8> {
    let fields = MessageFields {
        framework_version: FRAMEWORK_3_0,
        message_type,
        message_version: IcVersion::new(3, 0),
        status: IcStatus::OK,
        transaction_id: 9,
        flags,
    };
    build_message(&fields, body)
}

#[test]
fn message_before_negotiation_is_answered_with_e_fail() {
    let mut guest = HeartbeatService::new();
    let request = raw_message(IcMessageType::HEARTBEAT, IcFlags::TRANSACTION | IcFlags::REQUEST, &[0; 16]);
    let failure = guest.handle(&request).unwrap_err();
    assert_eq!(failure.error, IcError::NotNegotiated(IcMessageType::HEARTBEAT));
    let answer = IcFrame::parse(failure_response(&failure)).unwrap();
    assert_eq!(answer.header.status(), IcStatus::FAIL);
    assert_eq!(answer.header.transaction_id, 9);
    assert_eq!(answer.header.flags(), IcFlags::TRANSACTION | IcFlags::RESPONSE);
}

#[test]
fn unknown_types_and_responses_are_refused() {
    let (_, mut guest) = negotiated_heartbeat();
    for unknown in [IcMessageType(9), IcMessageType::KVP, IcMessageType(0xFFFF)] {
        let failure =
            guest.handle(&raw_message(unknown, IcFlags::TRANSACTION | IcFlags::REQUEST, &[1, 2])).unwrap_err();
        assert_eq!(failure.error, IcError::UnknownMessageType(unknown));
        let answer = IcFrame::parse(failure_response(&failure)).unwrap();
        assert_eq!(answer.header.status(), IcStatus::NOT_SUPPORTED);
        assert_eq!(answer.body, &[1, 2]);
    }
    // Without the TRANSACTION flag nothing is answered, not even an error.
    let failure = guest.handle(&raw_message(IcMessageType(9), IcFlags::REQUEST, &[1, 2])).unwrap_err();
    assert_eq!(failure, IcFailure::silent(IcError::UnknownMessageType(IcMessageType(9))));
    let failure = guest.handle(&raw_message(IcMessageType::HEARTBEAT, IcFlags::RESPONSE, &[0; 16])).unwrap_err();
    assert_eq!(failure, IcFailure::silent(IcError::UnexpectedResponse(IcMessageType::HEARTBEAT)));
}

#[test]
fn short_and_oversized_messages_are_errors() {
    let (mut host, mut guest) = negotiated_heartbeat();
    let good = host.next_request().unwrap();
    for len in [0, 1, 8, 27] {
        let failure = guest.handle(&good[..len]).unwrap_err();
        assert_eq!(failure, IcFailure::silent(IcError::Frame(FrameError::Truncated { len })));
    }
    // The pipe and IC headers claim a 16-byte body that is cut off.
    let failure = guest.handle(&good[..40]).unwrap_err();
    assert!(matches!(failure.error, IcError::Frame(FrameError::PipeSize { .. })));
    assert_eq!(failure.response, None);
    // A well-framed heartbeat with a 4-byte body.
    let short = raw_message(IcMessageType::HEARTBEAT, IcFlags::TRANSACTION | IcFlags::REQUEST, &[1, 2, 3, 4]);
    let failure = guest.handle(&short).unwrap_err();
    assert_eq!(failure.error, IcError::BodyTooShort { message_type: IcMessageType::HEARTBEAT, len: 4, needed: 8 });
    assert_eq!(IcFrame::parse(failure_response(&failure)).unwrap().header.status(), IcStatus::FAIL);
    let mut huge = raw_message(IcMessageType::HEARTBEAT, IcFlags::TRANSACTION, &[0; 16]);
    huge.resize(MAX_MESSAGE_SIZE + 8, 0);
    assert_eq!(
        guest.handle(&huge).unwrap_err().error,
        IcError::Frame(FrameError::Oversized { len: MAX_MESSAGE_SIZE + 8 })
    );
    // An 8-byte-only heartbeat (Linux's minimum) is answered without a state field.
    let minimal = raw_message(IcMessageType::HEARTBEAT, IcFlags::TRANSACTION | IcFlags::REQUEST, &41u64.to_le_bytes());
    let reply = guest.handle(&minimal).unwrap();
    assert_eq!(IcFrame::parse(response(&reply)).unwrap().body, &42u64.to_le_bytes());
    // Linux's 40-byte body: state written after the sequence number, the rest echoed.
    let mut linux_body = [0xAAu8; 40];
    linux_body[..8].copy_from_slice(&1u64.to_le_bytes());
    let reply = guest.handle(&raw_message(IcMessageType::HEARTBEAT, IcFlags::TRANSACTION, &linux_body)).unwrap();
    let body = IcFrame::parse(response(&reply)).unwrap().body.to_vec();
    assert_eq!(&body[..12], &[2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    assert_eq!(&body[12..], &[0xAA; 28]);
}

#[test]
fn renegotiation_replaces_the_versions() {
    let (mut host, mut guest) = negotiated_heartbeat();
    const ALIEN: VersionPreferences =
        VersionPreferences { framework: &[IcVersion::new(2, 0)], message: HEARTBEAT_VERSIONS };
    let mut alien = HeartbeatHost::with_versions(ALIEN);
    guest.handle(&alien.ic.negotiate_request()).unwrap();
    assert_eq!(guest.negotiated(), None);
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    assert!(matches!(reply.action, IcAction::Negotiated(_)));
    host.ic.accept_negotiate_response(response(&reply)).unwrap();
    let reply = guest.handle(&host.next_request().unwrap()).unwrap();
    assert!(host.check_response(response(&reply)).is_ok());
}

fn negotiated_shutdown() -> (ShutdownHost, ShutdownService) {
    let mut host = ShutdownHost::new();
    let mut guest = ShutdownService::new();
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    assert_eq!(host.ic.accept_negotiate_response(response(&reply)).map(|v| v.message), Ok(IcVersion::new(3, 2)));
    (host, guest)
}

#[test]
fn shutdown_requests_become_actions() {
    let (mut host, mut guest) = negotiated_shutdown();
    let cases = [
        (ShutdownFlags::empty(), ShutdownKind::PowerOff, false),
        (ShutdownFlags::FORCE, ShutdownKind::PowerOff, true),
        (ShutdownFlags::RESTART, ShutdownKind::Restart, false),
        (ShutdownFlags::RESTART | ShutdownFlags::FORCE, ShutdownKind::Restart, true),
    ];
    for (flags, kind, forced) in cases {
        let spec = ShutdownSpec { flags, reason_code: 0x8000_0000, timeout_seconds: 30, message: "bye".into() };
        let request = host.request(&spec).unwrap();
        assert_eq!(request.len(), 28 + 2060);
        let reply = guest.handle(&request).unwrap();
        assert_eq!(
            reply.action,
            IcAction::Service(ShutdownRequest { kind, forced, reason_code: 0x8000_0000, timeout_seconds: 30 })
        );
        assert_eq!(host.check_response(response(&reply)), Ok(IcStatus::OK));
    }
}

#[test]
fn hibernate_and_unknown_shutdown_flags_are_refused_with_e_fail() {
    let (mut host, mut guest) = negotiated_shutdown();
    for flags in [
        ShutdownFlags::HIBERNATE,
        ShutdownFlags::HIBERNATE | ShutdownFlags::FORCE,
        ShutdownFlags::from_bits_retain(0x40),
    ] {
        let spec = ShutdownSpec { flags, reason_code: 0, timeout_seconds: 0, message: String::new() };
        let failure = guest.handle(&host.request(&spec).unwrap()).unwrap_err();
        assert_eq!(failure.error, IcError::Unsupported(IcMessageType::SHUTDOWN));
        assert_eq!(host.check_response(failure_response(&failure)), Ok(IcStatus::FAIL));
    }
    // The 12 fixed bytes are enough; fewer are not.
    let mut body = [0u8; 12];
    body[8] = 2;
    let reply = guest.handle(&raw_message(IcMessageType::SHUTDOWN, IcFlags::TRANSACTION, &body)).unwrap();
    assert!(matches!(reply.action, IcAction::Service(ShutdownRequest { kind: ShutdownKind::Restart, .. })));
    let failure = guest.handle(&raw_message(IcMessageType::SHUTDOWN, IcFlags::TRANSACTION, &body[..11])).unwrap_err();
    assert!(matches!(failure.error, IcError::BodyTooShort { needed: 12, .. }));
}

#[test]
fn timesync_v4_samples_decode_to_wall_clock() {
    let mut host = TimeSyncHost::new();
    let mut guest = TimeSyncService::new();
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    assert_eq!(host.ic.accept_negotiate_response(response(&reply)).map(|v| v.message), Ok(IcVersion::new(4, 0)));
    // 2026-11-22 08:00:00.5 UTC, sampled at reference time 1000 s.
    let unix = 1_795_334_400u64;
    let clock = FixedClock {
        wall: WindowsTime(WINDOWS_TO_UNIX_EPOCH_100NS + unix * 10_000_000 + 5_000_000),
        reference: 10_000_000_000,
    };
    let request = host.sample(&clock, TimeSampleKind::Sync, false).unwrap();
    assert_eq!(request[25], 0);
    let reply = guest.handle(&request).unwrap();
    assert_eq!(reply.response, None);
    let IcAction::Service(sample) = reply.action else { panic!("not a sample: {:?}", reply.action) };
    assert_eq!(sample.kind(), TimeSampleKind::Sync);
    assert_eq!(sample.reference_time, Some(10_000_000_000));
    assert_eq!(sample.host_time.to_unix(), UnixTime { seconds: unix as i64, nanoseconds: 500_000_000 });
    // Two seconds of reference time later.
    assert_eq!(
        sample.host_time_at(10_020_000_000).to_unix(),
        UnixTime { seconds: unix as i64 + 2, nanoseconds: 500_000_000 }
    );
    // A sample that asks for an answer gets one.
    let request = host.sample(&clock, TimeSampleKind::Sample, true).unwrap();
    let reply = guest.handle(&request).unwrap();
    assert!(matches!(reply.action, IcAction::Service(s) if s.kind() == TimeSampleKind::Sample));
    assert_eq!(host.check_response(response(&reply)), Ok(IcStatus::OK));
    assert_eq!(guest.last_sample().map(|s| s.kind()), Some(TimeSampleKind::Sample));
    // Linux's 22-byte v4 body is accepted too; 18 bytes are not.
    let mut linux = [0u8; 22];
    linux[..8].copy_from_slice(&clock.wall.0.to_le_bytes());
    linux[16] = 2;
    assert!(guest.handle(&raw_message(IcMessageType::TIMESYNC, IcFlags::empty(), &linux)).is_ok());
    let failure = guest.handle(&raw_message(IcMessageType::TIMESYNC, IcFlags::TRANSACTION, &linux[..18])).unwrap_err();
    assert!(matches!(failure.error, IcError::BodyTooShort { needed: 19, .. }));
}

#[test]
fn timesync_v3_uses_the_old_layout() {
    const V3: VersionPreferences =
        VersionPreferences { framework: FRAMEWORK_VERSIONS, message: &[IcVersion::new(3, 0), IcVersion::new(1, 0)] };
    let mut host = TimeSyncHost::with_versions(V3);
    let mut guest = TimeSyncService::new();
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    assert_eq!(host.ic.accept_negotiate_response(response(&reply)).map(|v| v.message), Ok(IcVersion::new(3, 0)));
    let clock = FixedClock { wall: WindowsTime(WINDOWS_TO_UNIX_EPOCH_100NS), reference: 77 };
    let request = host.sample(&clock, TimeSampleKind::Probe, true).unwrap();
    assert_eq!(request.len(), 28 + 25);
    let reply = guest.handle(&request).unwrap();
    let IcAction::Service(sample) = reply.action else { panic!("not a sample") };
    assert_eq!(sample.reference_time, None);
    assert_eq!(sample.kind(), TimeSampleKind::Probe);
    assert_eq!(sample.host_time.to_unix(), UnixTime { seconds: 0, nanoseconds: 0 });
    assert_eq!(host.check_response(response(&reply)), Ok(IcStatus::OK));
    assert_eq!(TIMESYNC_VERSIONS[0], IcVersion::new(4, 0));
}

/// Run a whole pool query between the models.
fn query_pool(host: &mut KvpHost, guest: &mut KvpService, pool: KvpPool) -> Vec<KvpEntry> {
    let mut request = host.start_pool_query(pool).unwrap();
    loop {
        let reply = guest.handle(&request).unwrap();
        match host.continue_pool_query(response(&reply)).unwrap() {
            PoolQueryStep::Next(next) => request = next,
            PoolQueryStep::Done(entries) => return entries,
        }
    }
}

#[test]
fn kvp_auto_pool_query_returns_the_guest_table() {
    let (mut host, mut guest) = negotiated_kvp();
    let entries = query_pool(&mut host, &mut guest, KvpPool::AUTO);
    assert_eq!(entries, intrinsics().to_entries());
    assert_eq!(entries[5], KvpEntry::new("OSName", "Rust VMBus unikernel"));
    // Byte level: the first entry's key and sizes.
    let reply = guest.handle(&host.enumerate(KvpPool::AUTO, 0).unwrap()).unwrap();
    let answer = response(&reply);
    assert_eq!(answer.len(), 28 + 2580);
    assert_eq!(&answer[36..40], &1u32.to_le_bytes()); // REG_SZ
    assert_eq!(&answer[40..44], &(2 * 25u32).to_le_bytes()); // "FullyQualifiedDomainName" + NUL
    assert_eq!(&answer[44..48], &(2 * 10u32).to_le_bytes()); // "unikernel" + NUL
    assert_eq!(&answer[48..52], &[b'F', 0, b'u', 0]);
    assert_eq!(&answer[560..564], &[b'u', 0, b'n', 0]);
    assert_eq!(host.check_response(answer).unwrap().status, IcStatus::OK);
}

#[test]
fn kvp_get_set_delete() {
    let (mut host, mut guest) = negotiated_kvp();
    let reply = guest.handle(&host.get(KvpPool::AUTO, "OSVersion").unwrap()).unwrap();
    assert_eq!(
        reply.action,
        IcAction::Service(KvpAction::Got { pool: KvpPool::AUTO, key: "OSVersion".into(), found: true })
    );
    let answer = host.check_response(response(&reply)).unwrap();
    assert_eq!(answer.entry, Some(KvpEntry::new("OSVersion", "0.1.0")));
    let reply = guest.handle(&host.get(KvpPool::AUTO, "NoSuchKey").unwrap()).unwrap();
    assert_eq!(host.check_response(response(&reply)).unwrap().status, IcStatus::CONTINUE);

    // The host pushes its own data into AUTO_EXTERNAL.
    for (key, value) in [("HostName", "hv-01"), ("VirtualMachineName", "test vm"), ("HostName", "hv-02")] {
        let reply = guest.handle(&host.set(KvpPool::AUTO_EXTERNAL, key, value).unwrap()).unwrap();
        assert_eq!(
            reply.action,
            IcAction::Service(KvpAction::Set { pool: KvpPool::AUTO_EXTERNAL, key: key.into(), value: value.into() })
        );
        assert_eq!(host.check_response(response(&reply)).unwrap().status, IcStatus::OK);
    }
    assert_eq!(
        query_pool(&mut host, &mut guest, KvpPool::AUTO_EXTERNAL),
        [KvpEntry::new("HostName", "hv-02"), KvpEntry::new("VirtualMachineName", "test vm")]
    );
    let reply = guest.handle(&host.delete(KvpPool::AUTO_EXTERNAL, "HostName").unwrap()).unwrap();
    assert_eq!(host.check_response(response(&reply)).unwrap().status, IcStatus::OK);
    let reply = guest.handle(&host.delete(KvpPool::AUTO_EXTERNAL, "HostName").unwrap()).unwrap();
    assert_eq!(host.check_response(response(&reply)).unwrap().status, IcStatus::CONTINUE);
    assert_eq!(guest.pool(KvpPool::AUTO_EXTERNAL).len(), 1);
    assert!(query_pool(&mut host, &mut guest, KvpPool::GUEST).is_empty());
}

#[test]
fn kvp_refusals() {
    let (mut host, mut guest) = negotiated_kvp();
    // The guest's own pool is read-only to the host.
    let failure = guest.handle(&host.set(KvpPool::AUTO, "OSName", "evil").unwrap()).unwrap_err();
    assert_eq!(host.check_response(failure_response(&failure)).unwrap().status, IcStatus::FAIL);
    assert_eq!(guest.pool(KvpPool::AUTO)[5].value, "Rust VMBus unikernel");
    let failure = guest.handle(&host.delete(KvpPool::AUTO, "OSName").unwrap()).unwrap_err();
    assert_eq!(host.check_response(failure_response(&failure)).unwrap().status, IcStatus::FAIL);
    // Pools past AUTO_INTERNAL.
    let failure = guest.handle(&host.enumerate(KvpPool(9), 0).unwrap()).unwrap_err();
    assert_eq!(host.check_response(failure_response(&failure)).unwrap().status, IcStatus::INVALID_ARGUMENT);
    // IP info and unknown operations.
    for op in [4u8, 5, 6, 0xFF] {
        let failure = guest.handle(&raw_message(IcMessageType::KVP, IcFlags::TRANSACTION, &[op, 0, 0, 0])).unwrap_err();
        assert_eq!(IcFrame::parse(failure_response(&failure)).unwrap().header.status(), IcStatus::NOT_SUPPORTED);
    }
    // Truncated bodies.
    for body in [&[][..], &[3u8, 2][..], &[3u8, 2, 0, 0, 1][..], &[0u8, 2, 0, 0, 0, 0, 0, 0][..], &[1u8, 0, 0, 0][..]] {
        let failure = guest.handle(&raw_message(IcMessageType::KVP, IcFlags::TRANSACTION, body)).unwrap_err();
        assert!(matches!(failure.error, IcError::BodyTooShort { .. }), "{body:?}: {failure:?}");
    }
    // The host's pools are bounded.
    for i in 0..MAX_ENTRIES_PER_POOL {
        let reply = guest.handle(&host.set(KvpPool::EXTERNAL, &format!("k{i}"), "v").unwrap()).unwrap();
        assert_eq!(host.check_response(response(&reply)).unwrap().status, IcStatus::OK);
    }
    let failure = guest.handle(&host.set(KvpPool::EXTERNAL, "one-too-many", "v").unwrap()).unwrap_err();
    assert_eq!(host.check_response(failure_response(&failure)).unwrap().status, IcStatus::FAIL);
}

#[test]
fn kvp_long_values_are_cut_to_the_field() {
    let mut info = intrinsics();
    info.os_name = "é".repeat(3000);
    let mut host = KvpHost::new();
    let mut guest = KvpService::with_intrinsics(&info);
    let reply = guest.handle(&host.ic.negotiate_request()).unwrap();
    host.ic.accept_negotiate_response(response(&reply)).unwrap();
    let reply = guest.handle(&host.enumerate(KvpPool::AUTO, 5).unwrap()).unwrap();
    let answer = response(&reply);
    assert_eq!(&answer[44..48], &2048u32.to_le_bytes());
    assert_eq!(&answer[28 + 8 + 524 + 2046..28 + 8 + 524 + 2048], &[0, 0]);
    assert_eq!(host.check_response(answer).unwrap().entry.unwrap().value.chars().count(), 1023);
}

/// A driver written once over the trait, as a KMCL driver would be: answers go out, actions are collected.
fn drive<S: GuestIcService>(service: &mut S, payloads: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<IcAction<S::Action>>) {
    let mut sent = Vec::new();
    let mut actions = Vec::new();
    for payload in payloads {
        match service.handle(payload) {
            Ok(reply) => {
                sent.extend(reply.response);
                actions.push(reply.action);
            }
            Err(failure) => sent.extend(failure.response),
        }
    }
    (sent, actions)
}

#[test]
fn generic_driver_over_the_service_trait() {
    assert_eq!(HeartbeatService::INTERFACE_ID, crate::protocol::guid::device_class::HEARTBEAT);
    assert_eq!(KvpService::INTERFACE_ID, crate::protocol::guid::device_class::KVP);
    let mut host = TimeSyncHost::new();
    let mut guest = TimeSyncService::new();
    let (sent, actions) = drive(&mut guest, &[host.ic.negotiate_request()]);
    host.ic.accept_negotiate_response(&sent[0]).unwrap();
    assert!(matches!(actions[0], IcAction::Negotiated(_)));
    let clock = FixedClock { wall: WindowsTime(WINDOWS_TO_UNIX_EPOCH_100NS + 42 * 10_000_000), reference: 1_000 };
    let samples = [
        host.sample(&clock, TimeSampleKind::Sync, false).unwrap(),
        host.sample(&clock, TimeSampleKind::Probe, false).unwrap(),
    ];
    let (sent, actions) = drive(&mut guest, &samples);
    assert!(sent.is_empty());
    let mut wall = WallClock::new();
    for action in &actions {
        if let IcAction::Service(sample) = action {
            wall.apply(sample, 1_000 + 10_000_000);
        }
    }
    assert_eq!(wall.now_unix(1_000 + 10_000_000), Some(UnixTime { seconds: 43, nanoseconds: 0 }));
    assert_eq!(GuestIcService::negotiated(&guest).map(|v| v.message), Some(IcVersion::new(4, 0)));
}

/// Every service, negotiated, behind one call.
fn all_services() -> (HeartbeatService, ShutdownService, TimeSyncService, KvpService) {
    let mut heartbeat = HeartbeatService::new();
    let mut shutdown = ShutdownService::new();
    let mut timesync = TimeSyncService::new();
    let mut kvp = KvpService::with_intrinsics(&intrinsics());
    heartbeat.handle(&HeartbeatHost::new().ic.negotiate_request()).unwrap();
    shutdown.handle(&ShutdownHost::new().ic.negotiate_request()).unwrap();
    timesync.handle(&TimeSyncHost::new().ic.negotiate_request()).unwrap();
    kvp.handle(&KvpHost::new().ic.negotiate_request()).unwrap();
    (heartbeat, shutdown, timesync, kvp)
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
        let (mut heartbeat, mut shutdown, mut timesync, mut kvp) = all_services();
        let _ = heartbeat.handle(&bytes);
        let _ = shutdown.handle(&bytes);
        let _ = timesync.handle(&bytes);
        let _ = kvp.handle(&bytes);
        let _ = HeartbeatHost::new().ic.accept_negotiate_response(&bytes);
        let mut host = KvpHost::new();
        let _ = host.check_response(&bytes);
    }

    #[test]
    fn framed_random_bodies_never_panic(
        message_type in 0u16..9,
        flags in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..2700),
    ) {
        let message = raw_message(IcMessageType(message_type), IcFlags::from_bits_retain(flags), &body);
        let (mut heartbeat, mut shutdown, mut timesync, mut kvp) = all_services();
        for result in [
            heartbeat.handle(&message).map(|r| r.response),
            shutdown.handle(&message).map(|r| r.response),
            timesync.handle(&message).map(|r| r.response),
            kvp.handle(&message).map(|r| r.response),
        ] {
            // Whatever goes back is itself a well-formed response.
            let sent = match result { Ok(r) => r, Err(f) => f.response };
            if let Some(sent) = sent {
                let frame = IcFrame::parse(&sent).unwrap();
                prop_assert!(frame.header.flags().contains(IcFlags::RESPONSE));
            }
        }
    }

    #[test]
    fn mutated_kvp_requests_never_panic(index in 0usize..2608, value in any::<u8>(), op in 0u8..4, pool in 0u8..6) {
        let (mut host, mut guest) = negotiated_kvp();
        let mut request = match op {
            0 => host.get(KvpPool(pool), "OSName").unwrap(),
            1 => host.set(KvpPool(pool), "Key", "Value").unwrap(),
            2 => host.delete(KvpPool(pool), "Key").unwrap(),
            _ => host.enumerate(KvpPool(pool), 3).unwrap(),
        };
        if let Some(byte) = request.get_mut(index) {
            *byte = value;
        }
        if let Some(sent) = match guest.handle(&request) { Ok(r) => r.response, Err(f) => f.response } {
            let _ = host.check_response(&sent);
        }
    }
}
