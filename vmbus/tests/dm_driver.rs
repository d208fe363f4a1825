//! The Dynamic Memory driver (`vmbus::drivers::dm::DmChannelDriver`) end to end over the crate's own VMBus host:
//! the KMCL bus opens the hv_balloon channel on rings in loopback guest memory (`LoopbackBus::with_memory`), and
//! the test plays QEMU's hv-balloon on the host's end of the channel (`take_endpoint`): version negotiation with
//! fallback, capabilities, status reports with the pool's figures, balloon and unballoon through the bounded
//! packet pool, hot add without pool support, malformed and out-of-state messages, and teardown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use vmbus::channel::InterruptPages;
use vmbus::client::{ConnectOptions, Connection};
use vmbus::dm::wire::{
    BalloonRequest, BalloonResponseHeader, Capabilities, CapabilitiesReport, DmHeader, HotAddRequest, HotAddResponse,
    StatusReport, UnballoonRequestHeader, VersionRequest, WirePageRange,
};
use vmbus::dm::{DmEvent, DmFailure, DmMessageType, DmState, FramePool, IgnoredReason, PageRange};
use vmbus::drivers::Driver;
use vmbus::drivers::dm::{DM_MAXIMUM_PACKET_SIZE, DmChannelConfig, DmChannelDriver};
use vmbus::kmcl::{Bus, ChannelState, Kmcl};
use vmbus::memory::{ArenaRingAllocator, PageArena};
use vmbus::protocol::device_class;
use vmbus::ring::PacketType;
use vmbus::server::{LoopbackBus, OfferSpec, ServerConfig, ServerEndpoint};
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

/// First page of the loopback guest memory (rings live there).
const ARENA_BASE_PFN: u64 = 0x8_0000;

/// First frame of the fake pool.
const POOL_BASE_PFN: u64 = 0x1000;

/// The guest's interrupt pages: the loopback host looks at the rings on every turn, so nothing needs recording.
struct NoPages;

impl InterruptPages for NoPages {
    fn set_send_interrupt(&self, _relid: u32) {}
    fn set_monitor_pending(&self, _monitor_id: u8) {}
}

/// A frame pool of `frames.len()` frames from [`POOL_BASE_PFN`]; `true` = free. It checks the driver's contract:
/// only frames it handed out come back, each once.
struct TestPool {
    free: Vec<bool>,
    held: Vec<bool>,
}

impl TestPool {
    /// `total` frames, frame i used by the kernel when `used(i)`.
    fn new(total: usize, used: impl Fn(usize) -> bool) -> TestPool {
        TestPool { free: (0..total).map(|i| !used(i)).collect(), held: vec![false; total] }
    }

    fn held_pages(&self) -> u64 {
        self.held.iter().filter(|&&held| held).count() as u64
    }
}

impl FramePool for TestPool {
    fn free_pages(&self) -> u64 {
        self.free.iter().filter(|&&free| free).count() as u64
    }

    fn committed_pages(&self) -> u64 {
        self.free.len() as u64 - self.free_pages() - self.held_pages()
    }

    fn take_free_run(&mut self, max_pages: u64) -> Option<PageRange> {
        let start = self.free.iter().position(|&free| free)?;
        let mut count = 0;
        while count < max_pages as usize && self.free.get(start + count) == Some(&true) {
            self.free[start + count] = false;
            self.held[start + count] = true;
            count += 1;
        }
        Some(PageRange::new(POOL_BASE_PFN + start as u64, count as u64))
    }

    fn give_back(&mut self, range: PageRange) {
        for pfn in range.start..range.start + range.count {
            let index = (pfn - POOL_BASE_PFN) as usize;
            assert!(self.held[index], "frame {pfn:#x} came back but was not taken");
            self.held[index] = false;
            self.free[index] = true;
        }
    }
}

type TestBus = Bus<&'static LoopbackBus, NoPages, ArenaRingAllocator>;
type TestDriver = DmChannelDriver<TestPool, Box<dyn Fn() -> u64 + Send + Sync>>;

/// The guest (KMCL bus and driver) and the host (loopback server, the DM device's end of the channel).
struct Setup {
    host: &'static LoopbackBus,
    bus: TestBus,
    driver: TestDriver,
    pool: Arc<Mutex<TestPool>>,
    clock: Arc<AtomicU64>,
    device: Option<ServerEndpoint<PageArena>>,
    relid: u32,
    host_trans_id: u32,
}

const NS_PER_S: u64 = 1_000_000_000;

impl Setup {
    fn new(pool: TestPool) -> Setup {
        let arena = PageArena::new(ARENA_BASE_PFN, 256);
        let host: &'static LoopbackBus =
            Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
        let relid = host.offer(OfferSpec::new(device_class::DYNAMIC_MEMORY, device_class::DYNAMIC_MEMORY)).unwrap();
        let mut connection = Connection::connect(host, ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))).unwrap();
        connection.request_offers().unwrap();
        let bus = Bus::new(connection, NoPages, ArenaRingAllocator::new(arena));
        let clock = Arc::new(AtomicU64::new(NS_PER_S));
        let time = clock.clone();
        let total = pool.free.len() as u64;
        let pool = Arc::new(Mutex::new(pool));
        let mut config = DmChannelConfig::for_total_pages(total);
        config.dm.floor_pages = 64;
        let now: Box<dyn Fn() -> u64 + Send + Sync> = Box::new(move || time.load(Ordering::SeqCst));
        let driver = DmChannelDriver::new(config, pool.clone(), now);
        Setup { host, bus, driver, pool, clock, device: None, relid, host_trans_id: 0 }
    }

    /// Starts the driver and takes the host's end of the opened channel.
    fn start(&mut self) {
        let channel = self.driver.start(&mut self.bus).unwrap();
        assert_eq!(self.bus.channel_state(channel), Ok(ChannelState::Active));
        self.device = Some(self.host.take_endpoint(self.relid).expect("the channel is open"));
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::SeqCst)
    }

    fn advance(&mut self, ns: u64) {
        self.clock.fetch_add(ns, Ordering::SeqCst);
    }

    /// One turn of the guest: the channel's interrupt, control messages, and the driver's tick.
    fn guest_turn(&mut self) -> Option<u64> {
        self.bus.process_interrupt(&[self.relid]);
        self.bus.poll();
        let now = self.now();
        self.driver.tick(&mut self.bus, now)
    }

    /// What the guest sent (in-band payloads, cut to the DM header's size), after a guest turn.
    fn host_receive(&mut self) -> Vec<Vec<u8>> {
        self.guest_turn();
        let mut packets = Vec::new();
        self.device.as_mut().unwrap().receive_owned(self.host, &mut packets).unwrap();
        packets
            .into_iter()
            .map(|packet| {
                assert_eq!(packet.packet_type, PacketType::DATA_IN_BAND);
                assert!(!packet.completion_requested, "DM messages ask for no completion");
                let header = DmHeader::read_from_prefix(&packet.payload).unwrap().0;
                let size = usize::from(header.size.get());
                assert!(size <= DM_MAXIMUM_PACKET_SIZE as usize && size <= packet.payload.len());
                packet.payload[..size].to_vec()
            })
            .collect()
    }

    /// Sends a host message and lets the guest handle it.
    fn host_send(&mut self, message: &[u8]) {
        let _written = self.device.as_mut().unwrap().send_in_band(0, message, false, self.host).unwrap();
        self.guest_turn();
    }

    fn next_host_trans_id(&mut self) -> u32 {
        self.host_trans_id += 1;
        self.host_trans_id
    }

    /// Version 2.0 accepted, capabilities accepted with `response_flags`; returns the capabilities report.
    fn negotiate(&mut self, response_flags: u64) -> CapabilitiesReport {
        let request = self.host_receive();
        assert_eq!(request.len(), 1);
        let version = VersionRequest::read_from_bytes(&request[0]).unwrap();
        assert_eq!(version.header.message_type(), DmMessageType::VERSION_REQUEST);
        assert_eq!(version.version.get(), 0x2_0000);
        self.host_send(&response(DmMessageType::VERSION_RESPONSE, version.header.trans_id.get(), 1));
        let report = self.host_receive();
        assert_eq!(report.len(), 1);
        let report = CapabilitiesReport::read_from_bytes(&report[0]).unwrap();
        assert_eq!(report.header.message_type(), DmMessageType::CAPABILITIES_REPORT);
        self.host_send(&response(DmMessageType::CAPABILITIES_RESPONSE, report.header.trans_id.get(), response_flags));
        report
    }

    /// Sends a BALLOON_REQUEST and collects the answers until the last; returns (responses, ranges).
    fn balloon(&mut self, pages: u32) -> (usize, Vec<PageRange>) {
        let trans_id = self.next_host_trans_id();
        let request = BalloonRequest {
            header: DmHeader::new(DmMessageType::BALLOON_REQUEST, 16, trans_id),
            num_pages: U32::new(pages),
            reserved: U32::new(0),
        };
        self.host_send(request.as_bytes());
        let (mut responses, mut ranges) = (0, Vec::new());
        for _ in 0..1000 {
            for message in self.host_receive() {
                let header = DmHeader::read_from_prefix(&message).unwrap().0;
                if header.message_type() == DmMessageType::STATUS_REPORT {
                    continue;
                }
                assert_eq!(header.message_type(), DmMessageType::BALLOON_RESPONSE);
                let (response, body) = BalloonResponseHeader::read_from_prefix(&message).unwrap();
                responses += 1;
                let wire = <[WirePageRange]>::ref_from_bytes(body).unwrap();
                assert_eq!(wire.len(), response.range_count() as usize);
                ranges.extend(wire.iter().map(|range| range.range()));
                if !response.more_pages() {
                    return (responses, ranges);
                }
            }
        }
        panic!("the balloon transaction never ended ({responses} responses so far)");
    }

    /// Sends `ranges` back as UNBALLOON_REQUESTs, one range each, more_pages on all but the last (as QEMU does);
    /// returns the guest's answers.
    fn unballoon(&mut self, ranges: &[PageRange]) -> Vec<Vec<u8>> {
        for (index, range) in ranges.iter().enumerate() {
            let trans_id = self.next_host_trans_id();
            let header = UnballoonRequestHeader {
                header: DmHeader::new(DmMessageType::UNBALLOON_REQUEST, 24, trans_id),
                flags: U32::new(u32::from(index + 1 < ranges.len())),
                range_count: U32::new(1),
            };
            let mut message = header.as_bytes().to_vec();
            message.extend_from_slice(WirePageRange::new(*range).unwrap().as_bytes());
            let _written = self.device.as_mut().unwrap().send_in_band(0, &message, false, self.host).unwrap();
        }
        self.guest_turn();
        self.host_receive()
            .into_iter()
            .filter(|message| {
                DmHeader::read_from_prefix(message).unwrap().0.message_type() != DmMessageType::STATUS_REPORT
            })
            .collect()
    }

    fn stop(&mut self) {
        self.driver.stop(&mut self.bus).unwrap();
        self.bus.connection_mut().unload().unwrap();
    }
}

/// A 16-byte response with a 64-bit flags word (VERSION_RESPONSE, CAPABILITIES_RESPONSE).
fn response(message_type: DmMessageType, trans_id: u32, flags: u64) -> Vec<u8> {
    let mut message = DmHeader::new(message_type, 16, trans_id).as_bytes().to_vec();
    message.extend_from_slice(U64::new(flags).as_bytes());
    message
}

fn status_reports(messages: &[Vec<u8>]) -> Vec<StatusReport> {
    messages
        .iter()
        .filter_map(|message| StatusReport::read_from_prefix(message).ok().map(|(report, _)| report))
        .filter(|report| report.header.message_type() == DmMessageType::STATUS_REPORT)
        .collect()
}

#[test]
fn negotiates_reports_balloons_and_unballoons_over_the_loopback_bus() {
    let mut setup = Setup::new(TestPool::new(4096, |i| i < 1024));
    setup.start();
    let report = setup.negotiate(1);
    let caps = Capabilities::from_bits(report.caps.get());
    assert!(caps.balloon && !caps.hot_add && !caps.hot_remove, "{caps:?}");
    assert_eq!(setup.driver.state(), DmState::Ready);
    assert_eq!(setup.driver.version().map(|v| v.0), Some(0x2_0000));

    // The first status report follows the capabilities at once, with the pool's figures; then one a second.
    let first = status_reports(&setup.host_receive());
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].num_available.get(), 3072);
    assert_eq!(first[0].num_committed.get(), 1024);
    assert_eq!(status_reports(&setup.host_receive()).len(), 0, "a second report before a second passed");
    let wakeup = setup.guest_turn().expect("the status timer");
    assert!(wakeup > setup.now() && wakeup <= setup.now() + NS_PER_S, "next wakeup {wakeup}");
    setup.advance(NS_PER_S);
    assert_eq!(status_reports(&setup.host_receive()).len(), 1);

    // Balloon 1000 pages from the contiguous free part: one range; the pool lost exactly those frames.
    let (responses, ranges) = setup.balloon(1000);
    assert_eq!(responses, 1);
    assert_eq!(ranges, vec![PageRange::new(POOL_BASE_PFN + 1024, 1000)]);
    assert_eq!(setup.pool.lock().free_pages(), 2072);
    assert_eq!(setup.driver.ballooned_pages(), 1000);
    setup.advance(NS_PER_S);
    let report = status_reports(&setup.host_receive());
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].num_available.get(), 2072);

    // Unballoon in two ranges, as QEMU splits them: one UNBALLOON_RESPONSE after the last.
    let answers =
        setup.unballoon(&[PageRange::new(POOL_BASE_PFN + 1024, 600), PageRange::new(POOL_BASE_PFN + 1624, 400)]);
    assert_eq!(answers.len(), 1, "exactly one UNBALLOON_RESPONSE");
    assert_eq!(DmHeader::read_from_prefix(&answers[0]).unwrap().0.message_type(), DmMessageType::UNBALLOON_RESPONSE);
    assert_eq!(setup.pool.lock().free_pages(), 3072);
    assert_eq!(setup.driver.ballooned_pages(), 0);

    let events = setup.driver.take_events();
    assert!(events.contains(&DmEvent::BalloonStarted { requested: 1000 }), "{events:?}");
    assert!(events.contains(&DmEvent::Unballooned { returned: 400, not_ours: 0, last: true }), "{events:?}");
    let stats = setup.driver.protocol_stats();
    assert_eq!((stats.pages_given, stats.pages_returned, stats.balloon_requests), (1000, 1000, 1));
    assert!(setup.driver.status().contains("Ready"), "{}", setup.driver.status());
    setup.stop();
    assert_eq!(setup.driver.state(), DmState::Closed);
}

#[test]
fn a_fragmented_balloon_goes_out_through_the_bounded_packet_pool() {
    // Every other frame is the kernel's: 6000 pages are 6000 one-page ranges, twelve responses of ≤ 510 ranges,
    // four times what the 16 KiB ring holds: the driver waits for pool packets instead of queueing them all.
    let mut setup = Setup::new(TestPool::new(16384, |i| i % 2 == 1));
    setup.start();
    setup.negotiate(1);
    let (responses, ranges) = setup.balloon(6000);
    assert_eq!(responses, 12);
    assert_eq!(ranges.len(), 6000);
    assert_eq!(ranges.iter().map(|range| range.count).sum::<u64>(), 6000);
    assert!(ranges.iter().all(|range| (range.start - POOL_BASE_PFN).is_multiple_of(2)), "a kernel frame was given");
    assert_eq!(setup.pool.lock().held_pages(), 6000);
    let glue = setup.driver.channel_stats();
    assert_eq!(glue.send_failures, 0);
    assert!(glue.waits_for_packet > 0, "the packet pool never ran dry: {glue:?}");
    // Closing returns what the host held (QEMU forgets it when its device resets).
    setup.stop();
    assert_eq!(setup.pool.lock().held_pages(), 0);
    assert_eq!(setup.driver.channel_stats().returned_at_close, 6000);
}

#[test]
fn the_floor_is_kept_and_the_host_is_told_with_an_empty_response() {
    let mut setup = Setup::new(TestPool::new(1024, |i| i < 512));
    setup.start();
    setup.negotiate(1);
    let (_, ranges) = setup.balloon(10_000);
    let given: u64 = ranges.iter().map(|range| range.count).sum();
    assert_eq!(given, 512 - 64, "everything above the 64-frame floor");
    assert_eq!(setup.pool.lock().free_pages(), 64);
    let (responses, ranges) = setup.balloon(100);
    assert_eq!((responses, ranges.len()), (1, 0), "at the floor: one response with no ranges");
    setup.stop();
}

#[test]
fn versions_fall_back_and_rejected_capabilities_stop_the_driver() {
    let mut setup = Setup::new(TestPool::new(1024, |_| false));
    setup.start();
    let mut proposed = Vec::new();
    for _ in 0..2 {
        let request = setup.host_receive();
        let request = VersionRequest::read_from_bytes(&request[0]).unwrap();
        proposed.push((request.version.get(), request.flags.get()));
        setup.host_send(&response(DmMessageType::VERSION_RESPONSE, request.header.trans_id.get(), 0));
    }
    let last = setup.host_receive();
    let last = VersionRequest::read_from_bytes(&last[0]).unwrap();
    proposed.push((last.version.get(), last.flags.get()));
    assert_eq!(proposed, [(0x2_0000, 0), (0x1_0000, 0), (0x3, 1)], "2.0, 1.0, then 0.3 as the last attempt");
    setup.host_send(&response(DmMessageType::VERSION_RESPONSE, last.header.trans_id.get(), 1));
    let report = setup.host_receive();
    let report = CapabilitiesReport::read_from_bytes(&report[0]).unwrap();
    setup.host_send(&response(DmMessageType::CAPABILITIES_RESPONSE, report.header.trans_id.get(), 0));
    assert_eq!(setup.driver.state(), DmState::Failed(DmFailure::CapabilitiesRejected));
    setup.advance(5 * NS_PER_S);
    assert!(setup.host_receive().is_empty(), "a stopped driver sends nothing");
    setup.stop();
}

#[test]
fn malformed_unknown_and_out_of_state_messages_are_ignored_without_an_answer() {
    let mut setup = Setup::new(TestPool::new(1024, |_| false));
    setup.start();
    let _ = setup.host_receive(); // the version request, left unanswered for now
    // A balloon request before negotiation, a message shorter than its header, an unknown type, a lying size.
    let early = BalloonRequest {
        header: DmHeader::new(DmMessageType::BALLOON_REQUEST, 16, 1),
        num_pages: U32::new(100),
        reserved: U32::new(0),
    };
    setup.host_send(early.as_bytes());
    setup.host_send(&[1, 2, 3]);
    setup.host_send(DmHeader::new(DmMessageType(99), 8, 2).as_bytes());
    setup.host_send(DmHeader::new(DmMessageType::BALLOON_REQUEST, 4000, 3).as_bytes());
    assert!(setup.host_receive().is_empty());
    let events = setup.driver.take_events();
    assert_eq!(events.len(), 4, "{events:?}");
    assert!(events.iter().all(|event| matches!(event, DmEvent::Ignored(_))), "{events:?}");
    assert!(events.contains(&DmEvent::Ignored(IgnoredReason::UnexpectedType(DmMessageType(99)))), "{events:?}");
    assert_eq!(setup.pool.lock().free_pages(), 1024, "no frame moved");
    assert_eq!(setup.driver.channel_stats().packets_received, 4);
    setup.stop();
}

#[test]
fn hot_add_without_pool_support_is_success_with_zero_pages_and_suppressed_reports_stay_off() {
    let mut setup = Setup::new(TestPool::new(1024, |_| false));
    setup.start();
    setup.negotiate(1 | 4); // accepted, suppress pressure reports (QEMU without status-report=on)
    let hot_add = HotAddRequest {
        header: DmHeader::new(DmMessageType::MEM_HOT_ADD_REQUEST, 16, 7),
        range: WirePageRange::new(PageRange::new(0x10_0000, 0x8000)).unwrap(),
    };
    setup.host_send(hot_add.as_bytes());
    let answers = setup.host_receive();
    assert_eq!(answers.len(), 1, "one answer and no status report");
    let answer = HotAddResponse::read_from_bytes(&answers[0]).unwrap();
    assert_eq!(answer.header.message_type(), DmMessageType::MEM_HOT_ADD_RESPONSE);
    assert_eq!((answer.page_count.get(), answer.result.get()), (0, 1));
    setup.advance(3 * NS_PER_S);
    assert!(status_reports(&setup.host_receive()).is_empty());
    assert_eq!(setup.driver.protocol_stats().status_reports, 0);
    setup.stop();
}

#[test]
fn the_driver_starts_once_and_stop_without_start_is_harmless() {
    let mut setup = Setup::new(TestPool::new(256, |_| false));
    let mut idle = DmChannelDriver::new(
        DmChannelConfig::for_total_pages(256),
        Arc::new(Mutex::new(TestPool::new(1, |_| false))),
        || 0u64,
    );
    assert_eq!(idle.stop(&mut setup.bus), Ok(()));
    assert_eq!(idle.tick(&mut setup.bus, 0), None, "an unstarted driver has no work");
    assert_eq!(idle.interface_type(), device_class::DYNAMIC_MEMORY);
    setup.start();
    let channel = setup.driver.channel().unwrap();
    assert_eq!(setup.driver.start(&mut setup.bus), Ok(channel), "a second start returns the same channel");
    setup.stop();
    assert_eq!(setup.driver.channel(), None);
}
