//! The integration-service drivers (`vmbus::drivers`) on a KMCL `Bus` against the crate's own VMBus host: a
//! `LoopbackBus` with guest memory, whose devices are played by `server::devices::DeviceHost`. Negotiation,
//! heartbeats (seq + 1), a timesync sample becoming a wall-clock setting, the KVP pool as the host reads it, shutdown
//! requests answered before the kernel is asked to act, and the hostile cases: no common version, unknown message
//! types, short, malformed and oversized packets, a rescind in the middle of traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use vmbus::client::{ConnectOptions, Connection};
use vmbus::drivers::ic::{IC_MAX_PACKET_SIZE, MAX_QUEUED_REQUESTS};
use vmbus::drivers::{Driver, DriverRequest, HeartbeatDriver, KvpDriver, ShutdownDriver, TimeSyncDriver};
use vmbus::ic::HeartbeatService;
use vmbus::ic::framing::{IcFrame, MessageFields, build_message};
use vmbus::ic::guest::IcError;
use vmbus::ic::host::{FixedClock, HostModelError};
use vmbus::ic::kvp::GuestIntrinsics;
use vmbus::ic::negotiate::{FRAMEWORK_VERSIONS, HEARTBEAT_VERSIONS, VersionPreferences};
use vmbus::ic::shutdown::ShutdownKind;
use vmbus::ic::timesync::{UnixTime, WindowsTime};
use vmbus::ic::wire::{ApplicationState, IcFlags, IcMessageType, IcStatus, IcVersion, ShutdownFlags};
use vmbus::kmcl::echo::EchoDriver;
use vmbus::kmcl::{Bus, ChannelState, Kmcl};
use vmbus::memory::{ArenaInterruptPages, ArenaRingAllocator, PAGE_SIZE, PageArena};
use vmbus::ring::{OutgoingPacket, PacketType};
use vmbus::server::devices::{DeviceDetail, DeviceError, DeviceHost, DeviceHostConfig, DeviceKind, DeviceSpec};
use vmbus::server::{LoopbackBus, ServerConfig};

/// First page of the loopback guest memory.
const BASE_PFN: u64 = 0x20_0000;

/// Simulated time per pump round.
const ROUND_NS: u64 = 10_000_000;

/// 2026-11-22 08:00:00 UTC in UNIX seconds.
const HOST_UNIX_SECONDS: i64 = 1_795_334_400;

type KmclBus = Bus<&'static LoopbackBus, ArenaInterruptPages, ArenaRingAllocator>;

/// The host's wall clock in these tests: 2026-11-22 08:00:00.25 UTC, read at partition reference time 1 s.
fn host_clock() -> FixedClock {
    let wall = WindowsTime::from_unix(UnixTime { seconds: HOST_UNIX_SECONDS, nanoseconds: 250_000_000 }).unwrap();
    FixedClock { wall, reference: 10_000_000 }
}

fn intrinsics() -> GuestIntrinsics {
    GuestIntrinsics {
        fully_qualified_domain_name: "unikernel".into(),
        integration_services_version: "0.1.0".into(),
        network_address_ipv4: String::new(),
        network_address_ipv6: String::new(),
        os_build_number: "build-42".into(),
        os_name: "hvkernel".into(),
        os_major_version: "0".into(),
        os_minor_version: "1".into(),
        os_version: "0.1.0".into(),
        processor_architecture: "9".into(),
    }
}

/// The loopback host with its devices, a connected KMCL bus, and the kernel's monotonic clock.
struct Rig {
    bus: &'static LoopbackBus,
    host: Arc<Mutex<DeviceHost>>,
    kmcl: KmclBus,
    now: Arc<AtomicU64>,
    relids: Vec<u32>,
}

impl Rig {
    /// The four integration services offered before the guest connects, offering the versions of `versions` where
    /// it names the device (the §7 lists otherwise).
    fn new(config: DeviceHostConfig, versions: &[(DeviceKind, VersionPreferences)]) -> Rig {
        Rig::with_devices(config, |host, bus| {
            let mut relids = Vec::new();
            for kind in DeviceKind::INTEGRATION_SERVICES {
                let mut spec = DeviceSpec::new(kind);
                spec.versions = versions.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v);
                relids.push(host.offer(bus, spec).unwrap());
            }
            relids
        })
    }

    fn with_devices(config: DeviceHostConfig, offer: impl FnOnce(&mut DeviceHost, &LoopbackBus) -> Vec<u32>) -> Rig {
        let arena = PageArena::new(BASE_PFN, 256);
        let bus: &'static LoopbackBus =
            Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
        let mut host = DeviceHost::with_config(Box::new(host_clock()), config);
        let relids = offer(&mut host, bus);
        let interrupt_page = arena.allocate(1).unwrap() * PAGE_SIZE;
        let monitor_pages = arena.allocate(2).unwrap() * PAGE_SIZE;
        let mut connection =
            Connection::connect(bus, ConnectOptions::new(interrupt_page, (monitor_pages, monitor_pages + PAGE_SIZE)))
                .unwrap();
        connection.request_offers().unwrap();
        let pages = ArenaInterruptPages::new(arena.clone(), Some(interrupt_page), Some(monitor_pages + PAGE_SIZE));
        let mut kmcl = Bus::new(connection, pages, ArenaRingAllocator::new(arena));
        let host = Arc::new(Mutex::new(host));
        let now = Arc::new(AtomicU64::new(1_000_000_000));
        // The host also gets its turns while the guest waits synchronously (the echo driver's hello).
        let (hook_host, hook_now) = (Arc::clone(&host), Arc::clone(&now));
        kmcl.set_idle_hook(Some(Box::new(move || {
            hook_host.lock().run(bus, hook_now.load(Ordering::Relaxed));
        })));
        Rig { bus, host, kmcl, now, relids }
    }

    /// The kernel's monotonic clock, for the timesync driver.
    fn clock(&self) -> Arc<dyn Fn() -> u64 + Send + Sync> {
        let now = Arc::clone(&self.now);
        Arc::new(move || now.load(Ordering::Relaxed))
    }

    fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    /// One round: time passes, the host's devices run, the server answers, the guest takes its interrupt and polls.
    fn round(&mut self) {
        let now = self.now.fetch_add(ROUND_NS, Ordering::Relaxed) + ROUND_NS;
        self.host.lock().run(self.bus, now);
        self.bus.run_host();
        let relids = self.bus.take_guest_event_flags();
        if !relids.is_empty() {
            self.kmcl.process_interrupt(&relids);
        }
        self.kmcl.poll();
    }

    fn rounds(&mut self, count: usize) {
        for _ in 0..count {
            self.round();
        }
    }

    fn report(&self, kind: DeviceKind) -> vmbus::server::devices::DeviceReport {
        self.host.lock().report(kind).unwrap().clone()
    }
}

/// The four drivers, started on the rig's bus.
struct Drivers {
    heartbeat: HeartbeatDriver,
    shutdown: ShutdownDriver,
    timesync: TimeSyncDriver,
    kvp: KvpDriver,
}

impl Drivers {
    fn start(rig: &mut Rig) -> Drivers {
        let mut drivers = Drivers {
            heartbeat: HeartbeatDriver::new(),
            shutdown: ShutdownDriver::new(),
            timesync: TimeSyncDriver::new(rig.clock()),
            kvp: KvpDriver::new(&intrinsics()),
        };
        for driver in drivers.all() {
            driver.start(&mut rig.kmcl).unwrap();
        }
        drivers
    }

    fn all(&mut self) -> [&mut dyn Driver; 4] {
        [&mut self.heartbeat, &mut self.shutdown, &mut self.timesync, &mut self.kvp]
    }
}

fn versions(major: u16, minor: u16) -> IcVersion {
    IcVersion::new(major, minor)
}

#[test]
fn the_four_services_negotiate_and_serve_the_host() {
    let mut rig = Rig::new(DeviceHostConfig::default(), &[]);
    let mut drivers = Drivers::start(&mut rig);
    for driver in drivers.all() {
        assert_eq!(rig.kmcl.channel_state(driver_channel(driver)), Ok(ChannelState::Active), "{}", driver.name());
    }
    // Three seconds of simulated time: negotiation, a heartbeat a second, one time sample, one KVP pool query.
    rig.rounds(300);

    // Negotiation: the newest common versions, seen alike by both ends.
    let expect = [
        (DeviceKind::Heartbeat, drivers.heartbeat.negotiated(), versions(3, 0)),
        (DeviceKind::Shutdown, drivers.shutdown.negotiated(), versions(3, 2)),
        (DeviceKind::TimeSync, drivers.timesync.negotiated(), versions(4, 0)),
        (DeviceKind::Kvp, drivers.kvp.negotiated(), versions(4, 0)),
    ];
    for (kind, guest, message) in expect {
        let host = rig.report(kind).negotiated;
        assert_eq!(guest, host, "{kind:?}");
        let guest = guest.unwrap_or_else(|| panic!("{kind:?} negotiated"));
        assert_eq!((guest.framework, guest.message), (versions(3, 0), message), "{kind:?}");
    }

    // Heartbeats: one a second, each answered with seq + 1 and the state "healthy".
    let heartbeat = rig.report(DeviceKind::Heartbeat);
    let DeviceDetail::Heartbeat { answered, last, late } = heartbeat.detail else { panic!("{heartbeat:?}") };
    assert!((3..=4).contains(&answered), "{answered} heartbeats in 3 s");
    assert_eq!(late, 0);
    let last = last.unwrap();
    assert_eq!(last.sequence, answered, "sequence numbers 0, 1, ... answered 1, 2, ...");
    assert_eq!(last.state, Some(ApplicationState::HEALTHY));
    assert_eq!(drivers.heartbeat.answered(), answered);
    let guest_last = drivers.heartbeat.last_heartbeat().unwrap();
    assert_eq!((guest_last.received, guest_last.answered), (answered - 1, answered));
    assert_eq!(heartbeat.errors, 0, "{heartbeat:?}");

    // KVP: the host read the AUTO pool, entry by entry, exactly as given.
    let kvp = rig.report(DeviceKind::Kvp);
    let DeviceDetail::Kvp { queries: 1, entries: Some(entries) } = &kvp.detail else { panic!("{kvp:?}") };
    assert_eq!(entries, &intrinsics().to_entries());
    assert_eq!(entries[5].key, "OSName");
    assert_eq!(entries[5].value, "hvkernel");
    let served = drivers.kvp.served();
    assert_eq!((served.enumerated, served.enumeration_ends), (10, 1));

    // Timesync: one SYNC sample, one wall-clock setting with the host's UNIX time.
    let requests = drivers.timesync.take_requests();
    let [DriverRequest::SetWallClock { unix_time_ns, at_ns }] = requests[..] else { panic!("{requests:?}") };
    assert_eq!(unix_time_ns, i128::from(HOST_UNIX_SECONDS) * 1_000_000_000 + 250_000_000);
    assert!(at_ns > 1_000_000_000 && at_ns < rig.now(), "the monotonic time of receipt: {at_ns}");
    assert_eq!(drivers.timesync.last_setting(), Some((unix_time_ns, at_ns)));
    assert!(drivers.timesync.take_requests().is_empty(), "taken once");
    let DeviceDetail::TimeSync { samples_sent: 1, .. } = rig.report(DeviceKind::TimeSync).detail else { panic!() };

    // Nothing asked of the machine by the others; statuses name versions and counters.
    assert!(drivers.heartbeat.take_requests().is_empty());
    assert!(drivers.shutdown.take_requests().is_empty());
    assert!(drivers.kvp.take_requests().is_empty());
    let status = drivers.heartbeat.status();
    assert!(status.starts_with("framework 3.0 message 3.0;"), "{status}");
    assert!(status.contains(&format!("{answered} heartbeats answered")), "{status}");
    assert!(
        drivers.timesync.status().contains("last UNIX time 1795334400.250000000 s"),
        "{}",
        drivers.timesync.status()
    );
    let lines = rig.host.lock().summary_lines();
    assert_eq!(lines.len(), 4);
    assert!(lines[3].contains("OSName=hvkernel"), "{}", lines[3]);
    for driver in drivers.all() {
        assert_eq!(rig.kmcl.channel_state(driver_channel(driver)), Ok(ChannelState::Active));
    }

    // Clean stop: every channel closed on both sides.
    for driver in drivers.all() {
        driver.stop(&mut rig.kmcl).unwrap();
        driver.stop(&mut rig.kmcl).unwrap();
    }
    rig.rounds(2);
    for kind in DeviceKind::INTEGRATION_SERVICES {
        let report = rig.report(kind);
        assert_eq!((report.opens, report.closes, report.errors), (1, 1, 0), "{report:?}");
    }
}

fn driver_channel(driver: &mut dyn Driver) -> vmbus::kmcl::ChannelHandle {
    driver.channel().expect("started")
}

/// An IC message as a host would send it, with `flags`, the given type and versions, transaction id 0x77.
fn ic_message(message_type: u16, flags: IcFlags, body: &[u8]) -> Vec<u8> {
    let fields = MessageFields {
        framework_version: versions(3, 0),
        message_type: IcMessageType(message_type),
        message_version: versions(3, 0),
        status: IcStatus::OK,
        transaction_id: 0x77,
        flags,
    };
    build_message(&fields, body)
}

#[test]
fn a_shutdown_is_answered_before_the_kernel_is_asked_to_power_off() {
    let mut rig = Rig::new(DeviceHostConfig::default(), &[]);
    let mut drivers = Drivers::start(&mut rig);
    rig.rounds(20);
    assert!(drivers.shutdown.negotiated().is_some());
    assert!(drivers.shutdown.take_requests().is_empty(), "nothing before the host asks");
    rig.host.lock().request_shutdown(ShutdownFlags::empty());
    let mut rounds = 0;
    let requests = loop {
        rig.round();
        rounds += 1;
        let requests = drivers.shutdown.take_requests();
        if !requests.is_empty() {
            break requests;
        }
        assert!(rounds < 10, "the shutdown request reached the driver");
    };
    assert_eq!(requests, [DriverRequest::PowerOff { forced: false }]);
    // The answer was already in the ring when the request was released: the host reads it without the guest doing
    // anything more.
    let DeviceDetail::Shutdown { answer: None, .. } = rig.report(DeviceKind::Shutdown).detail else { panic!() };
    let now = rig.now();
    rig.host.lock().run(rig.bus, now);
    let report = rig.report(DeviceKind::Shutdown);
    assert_eq!(
        report.detail,
        DeviceDetail::Shutdown { requested: Some(ShutdownFlags::empty()), answer: Some(IcStatus::OK) },
        "{report:?}"
    );
    let last = drivers.shutdown.last_request().unwrap();
    assert_eq!((last.kind, last.forced), (ShutdownKind::PowerOff, false));
    assert!(drivers.shutdown.status().contains("PowerOff requested"), "{}", drivers.shutdown.status());

    // A forced restart, then a hibernation this kernel cannot do: answered E_FAIL, nothing asked of the kernel.
    rig.host.lock().request_shutdown(ShutdownFlags::RESTART | ShutdownFlags::FORCE);
    rig.rounds(5);
    assert_eq!(drivers.shutdown.take_requests(), [DriverRequest::Restart { forced: true }]);
    rig.host.lock().request_shutdown(ShutdownFlags::HIBERNATE);
    rig.rounds(5);
    assert!(drivers.shutdown.take_requests().is_empty());
    let DeviceDetail::Shutdown { answer, .. } = rig.report(DeviceKind::Shutdown).detail else { panic!() };
    assert_eq!(answer, Some(IcStatus::FAIL));
    assert_eq!(drivers.shutdown.last_error(), Some(IcError::Unsupported(IcMessageType::SHUTDOWN)));
    assert_eq!(drivers.shutdown.counters().answers_sent, 4, "negotiation and three requests");
}

#[test]
fn a_sample_is_carried_forward_by_the_reference_time_and_older_versions_use_the_v1_layout() {
    // Guest reference clock 0.5 s ahead of the host's reading: the wall clock is half a second later.
    let mut rig = Rig::new(DeviceHostConfig::default(), &[]);
    let reference = Arc::new(|| 10_000_000 + 5_000_000);
    let mut timesync = TimeSyncDriver::with_reference_clock(rig.clock(), reference);
    timesync.start(&mut rig.kmcl).unwrap();
    rig.rounds(10);
    let requests = timesync.take_requests();
    let [DriverRequest::SetWallClock { unix_time_ns, .. }] = requests[..] else { panic!("{requests:?}") };
    assert_eq!(unix_time_ns, i128::from(HOST_UNIX_SECONDS) * 1_000_000_000 + 750_000_000);
    assert_eq!(timesync.last_sample().unwrap().reference_time, Some(10_000_000));

    // A host that speaks timesync 3.0 at most, sending a SAMPLE every second and asking for answers.
    const UP_TO_3: &[IcVersion] = &[IcVersion::new(3, 0), IcVersion::new(1, 0)];
    let config = DeviceHostConfig {
        timesync_period_ns: Some(1_000_000_000),
        timesync_expects_answer: true,
        ..DeviceHostConfig::default()
    };
    let preferences = VersionPreferences { framework: FRAMEWORK_VERSIONS, message: UP_TO_3 };
    let mut rig = Rig::new(config, &[(DeviceKind::TimeSync, preferences)]);
    let mut timesync = TimeSyncDriver::with_reference_clock(rig.clock(), Arc::new(|| 99));
    timesync.start(&mut rig.kmcl).unwrap();
    rig.rounds(250);
    assert_eq!(timesync.negotiated().unwrap().message, versions(3, 0));
    let requests = timesync.take_requests();
    assert!(requests.len() >= 3, "a SYNC and a SAMPLE a second: {requests:?}");
    for request in &requests {
        let DriverRequest::SetWallClock { unix_time_ns, .. } = request else { panic!("{request:?}") };
        assert_eq!(*unix_time_ns, i128::from(HOST_UNIX_SECONDS) * 1_000_000_000 + 250_000_000, "no reference time");
    }
    let report = rig.report(DeviceKind::TimeSync);
    let DeviceDetail::TimeSync { samples_sent, answers, .. } = report.detail else { panic!() };
    assert_eq!(samples_sent as usize, requests.len());
    assert_eq!(answers, samples_sent, "every sample answered S_OK: {report:?}");
    assert_eq!(report.errors, 0);
}

#[test]
fn no_common_version_gets_the_empty_answer_and_the_driver_stays_quiet() {
    const FUTURE_FRAMEWORK: &[IcVersion] = &[IcVersion::new(9, 0)];
    const FUTURE_MESSAGE: &[IcVersion] = &[IcVersion::new(7, 0)];
    let versions_offered = [
        (DeviceKind::Heartbeat, VersionPreferences { framework: FUTURE_FRAMEWORK, message: HEARTBEAT_VERSIONS }),
        (DeviceKind::Kvp, VersionPreferences { framework: FRAMEWORK_VERSIONS, message: FUTURE_MESSAGE }),
    ];
    let mut rig = Rig::new(DeviceHostConfig::default(), &versions_offered);
    let mut drivers = Drivers::start(&mut rig);
    rig.rounds(300);
    for (kind, driver) in
        [(DeviceKind::Heartbeat, &drivers.heartbeat as &dyn Driver), (DeviceKind::Kvp, &drivers.kvp as &dyn Driver)]
    {
        let report = rig.report(kind);
        assert_eq!(report.negotiated, None, "{report:?}");
        assert_eq!(report.negotiation_error, Some(HostModelError::NegotiationRejected), "{report:?}");
        assert_eq!(report.sent, 1, "nothing after the failed negotiation: {report:?}");
        let status = driver.status();
        assert!(status.starts_with("negotiation failed"), "{status}");
    }
    assert_eq!(drivers.heartbeat.negotiated(), None);
    assert_eq!(drivers.heartbeat.counters().negotiation_failures, 1);
    assert_eq!(drivers.heartbeat.answered(), 0);
    assert_eq!(drivers.kvp.counters().negotiation_failures, 1);
    // The others are unaffected.
    assert!(drivers.shutdown.negotiated().is_some());
    assert_eq!(drivers.timesync.take_requests().len(), 1);
    for driver in drivers.all() {
        driver.stop(&mut rig.kmcl).unwrap();
    }
}

#[test]
fn unknown_short_malformed_and_oversized_host_packets_are_answered_or_ignored_as_the_protocol_allows() {
    let config = DeviceHostConfig { heartbeat_period_ns: 2_000_000_000, ..DeviceHostConfig::default() };
    let mut rig = Rig::new(config, &[]);
    let mut drivers = Drivers::start(&mut rig);
    rig.rounds(10);
    assert_eq!(drivers.heartbeat.answered(), 1, "the first heartbeat right after negotiation");
    let relid = rig.relids[0];
    let before = drivers.heartbeat.counters();
    let ask = IcFlags::TRANSACTION | IcFlags::REQUEST;
    let cases: [(&str, Vec<u8>, Option<IcStatus>); 7] = [
        ("unknown type, answer asked", ic_message(9, ask, &[1, 2, 3, 4]), Some(IcStatus::NOT_SUPPORTED)),
        ("unknown type, no answer asked", ic_message(9, IcFlags::empty(), &[]), None),
        ("heartbeat with a 4-byte body", ic_message(1, ask, &[1, 2, 3, 4]), Some(IcStatus::FAIL)),
        ("a response from the host", ic_message(1, IcFlags::RESPONSE, &[0; 16]), None),
        ("ten bytes", vec![0xAB; 10], None),
        (
            "icmsgsize past the data",
            {
                let mut m = ic_message(1, ask, &[0; 16]);
                m[18..20].copy_from_slice(&200u16.to_le_bytes());
                m
            },
            None,
        ),
        (
            "NEGOTIATE with counts past the body",
            {
                let mut m = ic_message(0, ask, &[0; 8]);
                m[28..30].copy_from_slice(&50u16.to_le_bytes());
                m
            },
            Some(IcStatus::OK),
        ),
    ];
    let mut answers = 0;
    for (name, payload, answer) in &cases {
        assert!(rig.host.lock().inject(rig.bus, relid, payload).unwrap(), "{name}: in the ring");
        rig.rounds(2);
        let report = rig.report(DeviceKind::Heartbeat);
        match answer {
            Some(status) => {
                answers += 1;
                assert_eq!(report.unexpected.len(), answers, "{name}: answered");
                let frame = IcFrame::parse(report.unexpected.back().unwrap()).unwrap();
                assert_eq!(frame.header.status(), *status, "{name}");
                assert!(frame.header.flags().contains(IcFlags::RESPONSE), "{name}");
                assert_eq!(frame.header.transaction_id, 0x77, "{name}: the IC transaction id echoed");
            }
            None => assert_eq!(report.unexpected.len(), answers, "{name}: not answered"),
        }
    }
    let counters = drivers.heartbeat.counters();
    assert_eq!(counters.received - before.received, 7);
    assert_eq!(counters.refused - before.refused, 6, "all but the NEGOTIATE");
    assert_eq!(counters.negotiation_failures, 1, "the malformed NEGOTIATE got the empty answer");
    // The empty answer un-negotiated the guest: heartbeats are now refused until the host negotiates again.
    assert_eq!(drivers.heartbeat.negotiated(), None);

    // Oversized: the bus drops it before the driver sees it.
    let dropped = rig.kmcl.stats().oversized_packets;
    let big = ic_message(1, ask, &vec![0; IC_MAX_PACKET_SIZE as usize]);
    assert!(rig.host.lock().inject(rig.bus, relid, &big).unwrap());
    rig.rounds(2);
    assert_eq!(rig.kmcl.stats().oversized_packets, dropped + 1);
    assert_eq!(drivers.heartbeat.counters().received, counters.received);
    assert_eq!(rig.kmcl.channel_state(drivers.heartbeat.channel().unwrap()), Ok(ChannelState::Active));

    // The other services never noticed.
    rig.host.lock().request_shutdown(ShutdownFlags::empty());
    rig.rounds(5);
    assert_eq!(drivers.shutdown.take_requests(), [DriverRequest::PowerOff { forced: false }]);
}

#[test]
fn a_guest_speaking_after_the_empty_answer_refuses_service_messages() {
    // After the guest's empty answer the host's next heartbeat (sent anyway by a host that ignores it) is refused
    // with E_FAIL, which the host model reports as a wrong answer, not a panic on either side.
    let config = DeviceHostConfig { heartbeat_period_ns: 500_000_000, ..DeviceHostConfig::default() };
    let mut rig = Rig::new(config, &[]);
    let mut drivers = Drivers::start(&mut rig);
    rig.rounds(10);
    let relid = rig.relids[0];
    let mut malformed = ic_message(0, IcFlags::TRANSACTION | IcFlags::REQUEST, &[0; 8]);
    malformed[28..30].copy_from_slice(&50u16.to_le_bytes());
    assert!(rig.host.lock().inject(rig.bus, relid, &malformed).unwrap());
    rig.rounds(60);
    let report = rig.report(DeviceKind::Heartbeat);
    assert_eq!(report.last_error, Some(DeviceError::Model(HostModelError::Status(IcStatus::FAIL))), "{report:?}");
    assert_eq!(drivers.heartbeat.last_error(), Some(IcError::NotNegotiated(IcMessageType::HEARTBEAT)));
    for driver in drivers.all() {
        driver.stop(&mut rig.kmcl).unwrap();
    }
}

#[test]
fn a_rescind_in_the_middle_of_traffic_closes_the_channel_and_leaves_the_others_running() {
    let mut rig = Rig::new(DeviceHostConfig::default(), &[]);
    let mut drivers = Drivers::start(&mut rig);
    rig.rounds(150);
    let answered = drivers.heartbeat.answered();
    assert!(answered >= 2);
    // A heartbeat is in the guest's ring, unread, when the host rescinds the channel.
    rig.now.fetch_add(1_000_000_000, Ordering::Relaxed);
    let now = rig.now();
    rig.host.lock().run(rig.bus, now);
    let heartbeat_relid = rig.relids[0];
    rig.host.lock().rescind(rig.bus, heartbeat_relid).unwrap();
    rig.rounds(200);
    assert!(!drivers.heartbeat.is_open());
    let channel = drivers.heartbeat.channel().unwrap();
    assert_ne!(rig.kmcl.channel_state(channel), Ok(ChannelState::Active));
    assert!(drivers.heartbeat.answered() <= answered + 1, "at most the heartbeat already in the ring");
    let report = rig.report(DeviceKind::Heartbeat);
    assert!(report.rescinded && report.closes == 1, "{report:?}");
    assert!(drivers.heartbeat.status().contains("heartbeats answered"));

    // Everything else goes on.
    rig.host.lock().request_shutdown(ShutdownFlags::FORCE);
    rig.rounds(5);
    assert_eq!(drivers.shutdown.take_requests(), [DriverRequest::PowerOff { forced: true }]);
    for driver in drivers.all() {
        driver.stop(&mut rig.kmcl).unwrap();
    }
    assert_eq!(drivers.heartbeat.channel(), None);
}

#[test]
fn the_echo_device_answers_the_example_driver() {
    let mut rig = Rig::with_devices(DeviceHostConfig::default(), |host, bus| {
        vec![host.offer(bus, DeviceSpec::new(DeviceKind::Echo)).unwrap()]
    });
    let (channel, state) = EchoDriver::start(&mut rig.kmcl, None, BASE_PFN + 200).unwrap();
    assert_eq!(state.lock().version, Some(1), "{:?}", state.lock());
    rig.rounds(250);
    let mut answer = [0u8; 16];
    let len = EchoDriver::ping(&mut rig.kmcl, channel, b"are you there?", &mut answer).unwrap();
    assert_eq!(&answer[..14], b"are you there?");
    assert!(len >= 14);
    let report = rig.report(DeviceKind::Echo);
    let DeviceDetail::Echo { hello_answered: true, pings_sent, echoes, requests_completed: 1 } = report.detail else {
        panic!("{report:?}")
    };
    assert!(pings_sent >= 2 && echoes + 1 >= pings_sent, "{report:?}");
    assert_eq!(state.lock().echoed, echoes);
    assert_eq!(report.errors, 0, "{report:?}");
    EchoDriver::stop(&mut rig.kmcl, channel).unwrap();
    rig.rounds(2);
    assert_eq!(rig.report(DeviceKind::Echo).closes, 1);
}

#[test]
fn a_driver_started_before_the_offer_binds_when_it_arrives() {
    let mut rig = Rig::with_devices(DeviceHostConfig::default(), |_, _| Vec::new());
    let mut heartbeat = HeartbeatDriver::new();
    let channel = heartbeat.start(&mut rig.kmcl).unwrap();
    assert_eq!(heartbeat.status(), "not bound; 0 received, 0 handled, 0 answers sent, 0 refused; no heartbeat yet");
    assert_eq!(heartbeat.start(&mut rig.kmcl), Ok(channel), "starting twice keeps the channel");
    let relid = rig.host.lock().offer(rig.bus, DeviceSpec::new(DeviceKind::Heartbeat)).unwrap();
    rig.rounds(5);
    assert!(heartbeat.is_open());
    assert_eq!(rig.kmcl.channel_relid(channel), Ok(relid));
    assert_eq!(heartbeat.answered(), 1);
    assert_eq!(heartbeat.interface_type(), vmbus::protocol::device_class::HEARTBEAT);
    assert_eq!(heartbeat.name(), "heartbeat");
}

type RawChannel = vmbus::channel::Channel<vmbus::memory::ArenaRing>;

/// A raw guest (no KMCL): reads what the host sent on `channel`, lets the guest heartbeat service answer it, and
/// sends `tamper`'s version of each answer (`None`: nothing).
fn raw_guest_turn(
    bus: &'static LoopbackBus,
    pages: &ArenaInterruptPages,
    channel: &mut RawChannel,
    service: &mut HeartbeatService,
    tamper: impl Fn(Vec<u8>) -> Option<Vec<u8>>,
) -> usize {
    let mut received = Vec::new();
    channel
        .receive(&bus, pages, |packet| {
            let mut payload = vec![0u8; packet.payload_len()];
            packet.read_payload(&mut payload).unwrap();
            received.push(payload);
        })
        .unwrap();
    for payload in &received {
        let answer = service.handle(payload).map(|reply| reply.response).unwrap_or_else(|failure| failure.response);
        if let Some(answer) = answer.and_then(&tamper) {
            let _ = channel.send(&OutgoingPacket::in_band(1, &answer), &bus, pages).unwrap();
        }
    }
    received.len()
}

#[test]
fn a_lying_guest_gets_its_wrong_answers_counted_never_trusted() {
    let arena = PageArena::new(BASE_PFN, 64);
    let bus: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
    let mut host = DeviceHost::new(Box::new(host_clock()));
    let relid = host.offer(bus, DeviceSpec::new(DeviceKind::Heartbeat)).unwrap();
    let interrupt_page = arena.allocate(1).unwrap() * PAGE_SIZE;
    let monitor_pages = arena.allocate(2).unwrap() * PAGE_SIZE;
    let mut conn =
        Connection::connect(bus, ConnectOptions::new(interrupt_page, (monitor_pages, monitor_pages + PAGE_SIZE)))
            .unwrap();
    conn.request_offers().unwrap();
    let pages = ArenaInterruptPages::new(arena.clone(), Some(interrupt_page), Some(monitor_pages + PAGE_SIZE));
    let rings = arena.channel_rings(4, 4).unwrap();
    let mut channel = RawChannel::open(&mut conn, relid, rings, 0, &[]).unwrap();
    let mut service = HeartbeatService::new();
    let second = 1_000_000_000;
    let errors = |host: &DeviceHost| host.report(DeviceKind::Heartbeat).unwrap().errors;

    // NEGOTIATE answered truthfully; then heartbeat 0 answered with 5 instead of 1.
    host.run(bus, 0);
    assert_eq!(raw_guest_turn(bus, &pages, &mut channel, &mut service, Some), 1);
    host.run(bus, 1);
    assert!(host.report(DeviceKind::Heartbeat).unwrap().negotiated.is_some());
    raw_guest_turn(bus, &pages, &mut channel, &mut service, |mut answer| {
        answer[28..36].copy_from_slice(&5u64.to_le_bytes());
        Some(answer)
    });
    host.run(bus, 2);
    let report = host.report(DeviceKind::Heartbeat).unwrap().clone();
    assert_eq!(
        report.last_error,
        Some(DeviceError::Model(HostModelError::WrongSequence { expected: 1, got: 5 })),
        "{report:?}"
    );

    // Heartbeat 1 answered without the RESPONSE flag: not an answer, so the heartbeat stays outstanding and the next
    // period is late.
    host.run(bus, second + 2);
    raw_guest_turn(bus, &pages, &mut channel, &mut service, |mut answer| {
        answer[25] = IcFlags::TRANSACTION.bits();
        Some(answer)
    });
    host.run(bus, second + 3);
    assert_eq!(errors(&host), 2);
    assert_eq!(
        host.report(DeviceKind::Heartbeat).unwrap().last_error,
        Some(DeviceError::Model(HostModelError::NotAResponse))
    );
    host.run(bus, 2 * second + 3);
    let DeviceDetail::Heartbeat { answered: 0, late: 1, .. } = host.report(DeviceKind::Heartbeat).unwrap().detail
    else {
        panic!("{:?}", host.report(DeviceKind::Heartbeat))
    };

    // Garbage and a completion the host never asked for.
    let _ = channel.send(&OutgoingPacket::in_band(2, &[1, 2, 3]), &bus, &pages).unwrap();
    let _ = channel.send(&OutgoingPacket::completion(3, b"surprise"), &bus, &pages).unwrap();
    host.run(bus, 2 * second + 4);
    assert_eq!(errors(&host), 4);
    assert_eq!(
        host.report(DeviceKind::Heartbeat).unwrap().last_error,
        Some(DeviceError::PacketType(PacketType::COMPLETION))
    );

    // A truthful answer is still taken.
    host.run(bus, 3 * second + 4);
    assert_eq!(raw_guest_turn(bus, &pages, &mut channel, &mut service, Some), 1);
    host.run(bus, 3 * second + 5);
    let report = host.report(DeviceKind::Heartbeat).unwrap().clone();
    let DeviceDetail::Heartbeat { answered: 1, last: Some(last), .. } = report.detail else { panic!("{report:?}") };
    assert_eq!(last.sequence, 3, "heartbeat 2 answered with 3");
    assert_eq!(report.errors, 4);
    assert!(report.summary().starts_with("heartbeat (relid 1): framework 3.0 message 3.0;"), "{}", report.summary());

    // The guest closes: the host drops the endpoint and counts the close.
    channel.close(&mut conn).unwrap();
    host.run(bus, 4 * second);
    assert_eq!(host.report(DeviceKind::Heartbeat).unwrap().closes, 1);
}

#[test]
fn requests_the_kernel_does_not_take_are_bounded() {
    let config = DeviceHostConfig { timesync_period_ns: Some(50_000_000), ..DeviceHostConfig::default() };
    let mut rig = Rig::new(config, &[]);
    let mut timesync = TimeSyncDriver::new(rig.clock());
    timesync.start(&mut rig.kmcl).unwrap();
    rig.rounds(400);
    let counters = timesync.counters();
    assert!(counters.handled >= 40, "{counters:?}");
    let requests = timesync.take_requests();
    assert_eq!(requests.len(), MAX_QUEUED_REQUESTS, "the newest kept");
    assert_eq!(counters.requests_dropped, counters.handled - MAX_QUEUED_REQUESTS as u64);
    let DriverRequest::SetWallClock { at_ns, .. } = requests[MAX_QUEUED_REQUESTS - 1] else { panic!() };
    assert_eq!(Some(at_ns), timesync.last_setting().map(|(_, at)| at), "the last one is the newest");
}

#[test]
fn a_driver_stopped_and_started_again_is_negotiated_again() {
    let mut rig = Rig::new(DeviceHostConfig::default(), &[]);
    let mut heartbeat = HeartbeatDriver::new();
    let first = heartbeat.start(&mut rig.kmcl).unwrap();
    rig.rounds(120);
    let answered = heartbeat.answered();
    assert!(answered >= 2);
    heartbeat.stop(&mut rig.kmcl).unwrap();
    assert_eq!(heartbeat.channel(), None);
    assert_eq!(rig.kmcl.channel_state(first), Err(vmbus::kmcl::NtStatus::INVALID_PARAMETER_1), "cleaned up");
    rig.rounds(50);
    assert_eq!(heartbeat.answered(), answered, "no traffic while stopped");
    heartbeat.start(&mut rig.kmcl).unwrap();
    rig.rounds(120);
    assert!(heartbeat.answered() >= answered + 2, "heartbeats again after the new negotiation");
    assert_eq!(heartbeat.counters().negotiations, 2);
    assert_eq!(heartbeat.inspect(|state| state.opens), 2);
    let report = rig.report(DeviceKind::Heartbeat);
    assert_eq!((report.opens, report.closes, report.errors), (2, 1, 0), "{report:?}");
    let DeviceDetail::Heartbeat { answered: host_answered, .. } = report.detail else { panic!() };
    assert_eq!(host_answered, heartbeat.answered());
}
