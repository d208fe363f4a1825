//! The driver against a model of QEMU's hv-balloon host and a fragmented fake frame pool.
//!
//! `QemuHost` plays the host side by the facts in `dynamic-memory.md` "QEMU's host" and the module docs: version
//! window 0x3..=0x20000 (configurable here to force rejections), capabilities always accepted (configurable), a
//! 50 s post-init wait before acting on a target, balloon requests of ≤ 585 728 pages answered by any number of
//! responses, one-range unballoon requests sent back to back with one response expected, 24-byte hot-add
//! requests. It also checks everything the guest sends: sizes, ≤ 4096 bytes, range counts, pages in RAM and
//! never given twice.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::time::Duration;

use proptest::prelude::*;
use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::wire::*;
use super::*;

// ---------------------------------------------------------------------------------------------------------------
// Fake frame pool

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Frame {
    Free,
    Kernel,
    Driver,
    Absent,
}

/// Frames `base..base + frames.len()`; hot add appends.
struct FakePool {
    base: u64,
    frames: Vec<Frame>,
    free: u64,
    kernel: u64,
    /// Lowest index that may be free.
    hint: usize,
    hot_add: Option<HotAddAlignment>,
    /// Most hot-added pages the pool takes in all.
    hot_add_limit: u64,
    hot_added: u64,
}

impl FakePool {
    /// `total` frames from PFN `base`; frame i is kernel-used when `used(i)`.
    fn new(base: u64, total: usize, used: impl Fn(usize) -> bool) -> FakePool {
        let frames: Vec<Frame> = (0..total).map(|i| if used(i) { Frame::Kernel } else { Frame::Free }).collect();
        let kernel = frames.iter().filter(|&&frame| frame == Frame::Kernel).count() as u64;
        FakePool {
            base,
            free: total as u64 - kernel,
            frames,
            kernel,
            hint: 0,
            hot_add: None,
            hot_add_limit: u64::MAX,
            hot_added: 0,
        }
    }

    fn count(&self, state: Frame) -> u64 {
        self.frames.iter().filter(|&&frame| frame == state).count() as u64
    }

    fn state_of(&self, pfn: u64) -> Option<Frame> {
        pfn.checked_sub(self.base).and_then(|index| self.frames.get(index as usize)).copied()
    }

    /// The kernel allocates `pages` free frames (lowest first), as a running kernel would between messages.
    fn kernel_allocates(&mut self, pages: u64) {
        let mut left = pages;
        for frame in self.frames.iter_mut() {
            if left == 0 {
                break;
            }
            if *frame == Frame::Free {
                *frame = Frame::Kernel;
                left -= 1;
            }
        }
        self.free -= pages - left;
        self.kernel += pages - left;
    }
}

impl FramePool for FakePool {
    fn free_pages(&self) -> u64 {
        self.free
    }

    fn committed_pages(&self) -> u64 {
        self.kernel
    }

    fn take_free_run(&mut self, max_pages: u64) -> Option<PageRange> {
        assert!(max_pages >= 1, "the driver asked for an empty run");
        let start = (self.hint..self.frames.len()).find(|&i| self.frames[i] == Frame::Free)?;
        self.hint = start;
        let mut end = start;
        while end < self.frames.len() && self.frames[end] == Frame::Free && ((end - start) as u64) < max_pages {
            self.frames[end] = Frame::Driver;
            end += 1;
        }
        self.free -= (end - start) as u64;
        Some(PageRange::new(self.base + start as u64, (end - start) as u64))
    }

    fn give_back(&mut self, range: PageRange) {
        for pfn in range.start..range.start + range.count {
            let index = (pfn - self.base) as usize;
            assert_eq!(self.frames[index], Frame::Driver, "frame {pfn:#x} given back but the driver did not hold it");
            self.frames[index] = Frame::Free;
            self.hint = self.hint.min(index);
        }
        self.free += range.count;
    }

    fn hot_add_alignment(&self) -> Option<HotAddAlignment> {
        self.hot_add
    }

    fn accept_hot_added(&mut self, range: PageRange) -> u64 {
        assert!(self.hot_add.is_some(), "hot add offered to a pool that cannot take it");
        let end = self.base + self.frames.len() as u64;
        // Refuses overlaps and (to keep the fake small) ranges more than 4 GiB past its end.
        if range.start < end || range.start - end > 1 << 20 {
            return 0;
        }
        let take = range.count.min(self.hot_add_limit - self.hot_added);
        self.frames.resize((range.start - self.base) as usize, Frame::Absent);
        self.frames.extend((0..take).map(|_| Frame::Free));
        self.free += take;
        self.hot_added += take;
        take
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Model of QEMU's hv-balloon host

const POST_INIT_WAIT: Duration = Duration::from_secs(50);
const HOST_BALLOON_CHUNK: u64 = 585_728;
const HOST_UNBALLOON_CHUNK: u64 = 524_288;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum HostState {
    Version,
    Caps,
    PostInitWait(Duration),
    Idle,
    BalloonReplyWait,
    UnballoonReplyWait,
    HotAddReplyWait(PageRange),
}

struct QemuHost {
    state: HostState,
    accepted_versions: core::ops::RangeInclusive<u32>,
    accept_caps: bool,
    status_report_on: bool,
    trans_id: u32,
    /// Boot RAM: PFNs `ram_base..ram_base + boot_ram_pages`.
    ram_base: u64,
    boot_ram_pages: u64,
    /// Hot-added RAM.
    hot_added_ram: PageRangeSet,
    /// All RAM, in pages.
    ram_pages: u64,
    removed: PageRangeSet,
    target: Option<u64>,
    target_changed: bool,
    balloon_diff: u64,
    versions_seen: Vec<(DmVersion, bool, u32)>,
    caps: Option<Capabilities>,
    status_reports: Vec<(Duration, u64, u64)>,
    /// (range_count, more_pages, size) of each BALLOON_RESPONSE.
    balloon_responses: Vec<(u32, bool, usize)>,
    balloon_requests: u32,
    unballoon_responses: u32,
    hot_add_responses: Vec<(u32, u32)>,
    /// Guest protocol violations the model saw.
    violations: Vec<String>,
    /// trans_id of every guest message, in arrival order.
    guest_trans_ids: Vec<u32>,
    outgoing: VecDeque<Vec<u8>>,
}

impl QemuHost {
    fn new(ram_base: u64, ram_pages: u64) -> QemuHost {
        QemuHost {
            state: HostState::Version,
            accepted_versions: 0x3..=0x20000,
            accept_caps: true,
            status_report_on: true,
            trans_id: 0,
            ram_base,
            boot_ram_pages: ram_pages,
            hot_added_ram: PageRangeSet::new(),
            ram_pages,
            removed: PageRangeSet::new(),
            target: None,
            target_changed: false,
            balloon_diff: 0,
            versions_seen: Vec::new(),
            caps: None,
            status_reports: Vec::new(),
            balloon_responses: Vec::new(),
            balloon_requests: 0,
            unballoon_responses: 0,
            hot_add_responses: Vec::new(),
            violations: Vec::new(),
            guest_trans_ids: Vec::new(),
            outgoing: VecDeque::new(),
        }
    }

    fn violation(&mut self, text: String) {
        self.violations.push(text);
    }

    /// QMP `balloon`: target size in pages.
    fn set_target(&mut self, pages: u64) {
        self.target = Some(pages);
        self.target_changed = true;
    }

    /// `query-balloon`'s `actual`, in pages.
    fn actual(&self) -> u64 {
        self.ram_pages - self.removed.pages()
    }

    fn send<T: IntoBytes + zerocopy::Immutable>(&mut self, message: &T) {
        self.outgoing.push_back(message.as_bytes().to_vec());
    }

    fn receive(&mut self, bytes: &[u8], now: Duration) {
        let Ok((header, _)) = DmHeader::read_from_prefix(bytes) else {
            return self.violation(format!("message of {} bytes without a header", bytes.len()));
        };
        if usize::from(header.size.get()) != bytes.len() {
            self.violation(format!("size field {} for {} bytes", header.size.get(), bytes.len()));
        }
        if bytes.len() > MAX_GUEST_MESSAGE_SIZE {
            self.violation(format!("message of {} bytes", bytes.len()));
        }
        self.guest_trans_ids.push(header.trans_id.get());
        match header.message_type() {
            DmMessageType::VERSION_REQUEST => {
                let Ok(request) = VersionRequest::read_from_bytes(bytes) else {
                    return self.violation("short VERSION_REQUEST".into());
                };
                if self.state != HostState::Version {
                    return self.violation(format!("VERSION_REQUEST in {:?}", self.state));
                }
                let version = request.version.get();
                self.versions_seen.push((DmVersion(version), request.flags.get() & 1 != 0, header.trans_id.get()));
                let accepted = self.accepted_versions.contains(&version);
                self.send(&VersionResponse {
                    header: DmHeader::new(DmMessageType::VERSION_RESPONSE, 16, header.trans_id.get()),
                    flags: U64::new(u64::from(accepted)),
                });
                if accepted {
                    self.state = HostState::Caps;
                }
            }
            DmMessageType::CAPABILITIES_REPORT => {
                let Ok(report) = CapabilitiesReport::read_from_bytes(bytes) else {
                    return self.violation("bad CAPABILITIES_REPORT".into());
                };
                if self.state != HostState::Caps {
                    return self.violation(format!("CAPABILITIES_REPORT in {:?}", self.state));
                }
                self.caps = Some(Capabilities::from_bits(report.caps.get()));
                let flags = u64::from(self.accept_caps) | 2 | u64::from(!self.status_report_on) << 2;
                self.send(&CapabilitiesResponse {
                    header: DmHeader::new(DmMessageType::CAPABILITIES_RESPONSE, 16, header.trans_id.get()),
                    flags: U64::new(flags),
                });
                self.state = HostState::PostInitWait(now + POST_INIT_WAIT);
            }
            DmMessageType::STATUS_REPORT => {
                let Ok(report) = StatusReport::read_from_bytes(bytes) else {
                    return self.violation("bad STATUS_REPORT".into());
                };
                if !self.status_report_on {
                    return self.violation("STATUS_REPORT though the host suppressed them".into());
                }
                self.status_reports.push((now, report.num_available.get(), report.num_committed.get()));
            }
            DmMessageType::BALLOON_RESPONSE => self.on_balloon_response(bytes),
            DmMessageType::UNBALLOON_RESPONSE => {
                if self.state != HostState::UnballoonReplyWait {
                    return self.violation(format!("UNBALLOON_RESPONSE in {:?}", self.state));
                }
                self.unballoon_responses += 1;
                self.trans_id += 1;
                self.state = HostState::Idle;
            }
            DmMessageType::MEM_HOT_ADD_RESPONSE => {
                let Ok(response) = HotAddResponse::read_from_bytes(bytes) else {
                    return self.violation("bad MEM_HOT_ADD_RESPONSE".into());
                };
                let HostState::HotAddReplyWait(offered) = self.state else {
                    return self.violation(format!("MEM_HOT_ADD_RESPONSE in {:?}", self.state));
                };
                let added = u64::from(response.page_count.get());
                if added > offered.count {
                    self.violation(format!("{added} pages hot-added of {offered:?}"));
                }
                if response.result.get() == HOT_ADD_RESULT_SUCCESS && added > 0 {
                    self.hot_added_ram.insert(PageRange::new(offered.start, added.min(offered.count)));
                    self.ram_pages += added.min(offered.count);
                }
                self.hot_add_responses.push((response.page_count.get(), response.result.get()));
                self.trans_id += 1;
                self.state = HostState::Idle;
            }
            other => self.violation(format!("unexpected {other}")),
        }
    }

    fn on_balloon_response(&mut self, bytes: &[u8]) {
        let Ok((head, rest)) = BalloonResponseHeader::read_from_prefix(bytes) else {
            return self.violation("short BALLOON_RESPONSE".into());
        };
        if self.state != HostState::BalloonReplyWait {
            return self.violation(format!("BALLOON_RESPONSE in {:?}", self.state));
        }
        let count = head.range_count();
        self.balloon_responses.push((count, head.more_pages(), bytes.len()));
        if count as usize > MAX_RANGES_PER_BALLOON_RESPONSE {
            self.violation(format!("{count} ranges in one response"));
        }
        let Ok((ranges, _)) = <[WirePageRange]>::ref_from_prefix_with_elems(rest, count as usize) else {
            return self.violation("BALLOON_RESPONSE too short for its range count".into());
        };
        for range in ranges.iter().map(|range| range.range()) {
            if range.count == 0 {
                self.violation("empty range".into());
            }
            let boot_ram = PageRange::new(self.ram_base, self.boot_ram_pages);
            let in_boot_ram = range.start >= boot_ram.start && range.end() <= boot_ram.end();
            let mut hot_added = 0;
            self.hot_added_ram.clone().remove(range, |piece| hot_added += piece.count);
            if !in_boot_ram && hot_added != range.count {
                self.violation(format!("{range:?} outside RAM"));
            }
            if !self.removed.insert(range) {
                self.violation(format!("{range:?} given twice"));
            }
            self.balloon_diff = self.balloon_diff.saturating_sub(range.count);
        }
        if count == 0 {
            self.balloon_diff = 0;
        } else if head.more_pages() {
            return;
        }
        self.trans_id += 1;
        if self.balloon_diff > 0 {
            self.post_balloon_request();
        } else {
            self.state = HostState::Idle;
        }
    }

    fn post_balloon_request(&mut self) {
        let pages = self.balloon_diff.min(HOST_BALLOON_CHUNK) as u32;
        self.balloon_requests += 1;
        self.send(&BalloonRequest {
            header: DmHeader::new(DmMessageType::BALLOON_REQUEST, 16, self.trans_id),
            num_pages: U32::new(pages),
            reserved: U32::new(0),
        });
        self.state = HostState::BalloonReplyWait;
    }

    /// Offers a hot add (QEMU's memdev path) when idle.
    fn offer_hot_add(&mut self, range: PageRange) {
        assert_eq!(self.state, HostState::Idle);
        let wire = WirePageRange::new(range).unwrap();
        self.send(&HotAddRequestWithRegion {
            header: DmHeader::new(DmMessageType::MEM_HOT_ADD_REQUEST, 24, self.trans_id),
            range: wire,
            region: wire,
        });
        self.state = HostState::HotAddReplyWait(range);
    }

    /// Host-side progress: the post-init timer and targets.
    fn step(&mut self, now: Duration) {
        if let HostState::PostInitWait(until) = self.state
            && now >= until
        {
            self.state = HostState::Idle;
        }
        if self.state != HostState::Idle || !self.target_changed {
            return;
        }
        self.target_changed = false;
        let Some(target) = self.target else { return };
        let current = self.actual();
        if target < current {
            self.balloon_diff = current - target;
            self.post_balloon_request();
        } else if target > current && !self.removed.is_empty() {
            let mut diff = (target - current).min(self.removed.pages());
            while diff > 0 {
                let Some(first) = self.removed.iter().next() else { break };
                let take = PageRange::new(first.start, first.count.min(diff).min(HOST_UNBALLOON_CHUNK));
                self.removed.remove(take, |_| ());
                diff -= take.count;
                let mut message = UnballoonRequestHeader {
                    header: DmHeader::new(DmMessageType::UNBALLOON_REQUEST, 24, self.trans_id),
                    flags: U32::new(u32::from(diff > 0)),
                    range_count: U32::new(1),
                }
                .as_bytes()
                .to_vec();
                message.extend_from_slice(WirePageRange::new(take).unwrap().as_bytes());
                self.outgoing.push_back(message);
            }
            self.state = HostState::UnballoonReplyWait;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The rig: driver + host + pool + a fake clock

struct Rig {
    driver: DmDriver,
    host: QemuHost,
    pool: FakePool,
    now: Duration,
    events: Vec<DmEvent>,
}

const RAM_BASE: u64 = 0x100;

impl Rig {
    fn new(pool: FakePool, config: DmConfig) -> Rig {
        let host = QemuHost::new(pool.base, pool.frames.len() as u64);
        Rig { driver: DmDriver::new(config), host, pool, now: Duration::ZERO, events: Vec::new() }
    }

    /// A contiguous pool of `total` frames with the first `used` kernel-used.
    fn contiguous(total: usize, used: usize, floor: u64) -> Rig {
        let config = DmConfig { floor_pages: floor, ..DmConfig::for_total_pages(total as u64) };
        Rig::new(FakePool::new(RAM_BASE, total, |i| i < used), config)
    }

    fn start(&mut self) {
        self.driver.start(self.now);
        self.pump();
    }

    /// Exchanges messages until neither side has anything to say at the current time.
    fn pump(&mut self) {
        for _ in 0..100_000 {
            self.host.step(self.now);
            let mut moved = false;
            while let Some(message) = self.host.outgoing.pop_front() {
                let event = self.driver.receive(&message, self.now, &mut self.pool);
                self.events.push(event);
                moved = true;
            }
            while let Some(message) = self.driver.poll_transmit(self.now, &mut self.pool) {
                self.host.receive(&message, self.now);
                moved = true;
            }
            if !moved {
                self.check_invariants();
                return;
            }
        }
        panic!("the exchange did not settle");
    }

    /// Advances the clock by `total` in steps of `step`, pumping at each.
    fn advance(&mut self, total: Duration, step: Duration) {
        let end = self.now + total;
        while self.now < end {
            self.now = (self.now + step).min(end);
            self.pump();
        }
    }

    fn ready(&mut self) {
        self.start();
        assert_eq!(self.driver.state(), DmState::Ready);
        self.advance(POST_INIT_WAIT, Duration::from_secs(1));
        assert_eq!(self.host.state, HostState::Idle);
    }

    fn check_invariants(&self) {
        assert_eq!(self.host.violations, Vec::<String>::new(), "the host model saw protocol violations");
        assert_eq!(self.pool.count(Frame::Driver), self.driver.ballooned_pages(), "pool and record disagree");
        assert_eq!(self.pool.count(Frame::Free), self.pool.free);
        for range in self.driver.ballooned().iter() {
            for pfn in range.start..range.start + range.count {
                assert_eq!(self.pool.state_of(pfn), Some(Frame::Driver));
            }
        }
    }
}

fn message(message_type: DmMessageType, trans_id: u32, body: &[u8]) -> Vec<u8> {
    let mut bytes = DmHeader::new(message_type, (8 + body.len()) as u16, trans_id).as_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

fn balloon_request(num_pages: u32) -> Vec<u8> {
    let mut body = num_pages.to_le_bytes().to_vec();
    body.extend_from_slice(&[0; 4]);
    message(DmMessageType::BALLOON_REQUEST, 0, &body)
}

fn unballoon_request(more_pages: bool, ranges: &[PageRange]) -> Vec<u8> {
    let mut body = u32::from(more_pages).to_le_bytes().to_vec();
    body.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for range in ranges {
        body.extend_from_slice(WirePageRange::new(*range).unwrap().as_bytes());
    }
    message(DmMessageType::UNBALLOON_REQUEST, 0, &body)
}

fn hot_add_request(range: PageRange) -> Vec<u8> {
    message(DmMessageType::MEM_HOT_ADD_REQUEST, 0, WirePageRange::new(range).unwrap().as_bytes())
}

/// Ranges of a BALLOON_RESPONSE produced by the driver.
fn response_ranges(bytes: &[u8]) -> (bool, Vec<PageRange>) {
    let (head, rest) = BalloonResponseHeader::read_from_prefix(bytes).unwrap();
    assert_eq!(head.header.message_type(), DmMessageType::BALLOON_RESPONSE);
    let (ranges, _) = <[WirePageRange]>::ref_from_prefix_with_elems(rest, head.range_count() as usize).unwrap();
    (head.more_pages(), ranges.iter().map(|range| range.range()).collect())
}

fn drain(driver: &mut DmDriver, now: Duration, pool: &mut FakePool) -> Vec<Vec<u8>> {
    core::iter::from_fn(|| driver.poll_transmit(now, pool)).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Negotiation

#[test]
fn qemu_accepts_version_2_0_at_once_and_the_first_status_report_follows_the_capabilities() {
    let mut rig = Rig::contiguous(4096, 1024, 512);
    rig.start();
    assert_eq!(rig.host.versions_seen, vec![(DmVersion::V2_0, false, 1)]);
    assert_eq!(rig.driver.version(), Some(DmVersion::V2_0));
    assert_eq!(rig.driver.state(), DmState::Ready);
    assert_eq!(
        rig.host.caps,
        Some(Capabilities { balloon: true, hot_add: false, hot_add_alignment_log2_mib: 0, hot_remove: false })
    );
    // Prompt: the first status report went out in the same exchange, at time zero, with the pool's figures.
    assert_eq!(rig.host.status_reports, vec![(Duration::ZERO, 3072, 1024)]);
    assert_eq!(
        rig.events,
        vec![
            DmEvent::VersionAccepted(DmVersion::V2_0),
            DmEvent::CapabilitiesAccepted { suppress_pressure_reports: false }
        ]
    );
}

#[test]
fn rejected_versions_fall_back_to_1_0_then_0_3_with_is_last_attempt() {
    let mut rig = Rig::contiguous(4096, 1024, 512);
    rig.host.accepted_versions = 0x3..=0x3;
    rig.start();
    assert_eq!(
        rig.host.versions_seen,
        vec![(DmVersion::V2_0, false, 1), (DmVersion::V1_0, false, 2), (DmVersion::V0_3, true, 3)]
    );
    assert_eq!(rig.driver.version(), Some(DmVersion::V0_3));
    assert_eq!(rig.driver.state(), DmState::Ready);
    assert_eq!(
        &rig.events[..2],
        &[DmEvent::VersionRejected(DmVersion::V2_0), DmEvent::VersionRejected(DmVersion::V1_0)]
    );

    let mut rig = Rig::contiguous(4096, 1024, 512);
    rig.host.accepted_versions = 0x10000..=0x10000;
    rig.start();
    assert_eq!(rig.driver.version(), Some(DmVersion::V1_0));
}

#[test]
fn negotiation_fails_when_every_version_is_rejected() {
    let mut rig = Rig::contiguous(4096, 1024, 512);
    rig.host.accepted_versions = 0x30000..=0x30000;
    rig.start();
    assert_eq!(rig.host.versions_seen.len(), 3);
    assert_eq!(rig.driver.state(), DmState::Failed(DmFailure::VersionsRejected));
    assert_eq!(rig.host.caps, None);
    assert_eq!(rig.driver.next_wakeup(), None);
    rig.advance(Duration::from_secs(10), Duration::from_secs(1));
    assert!(rig.host.status_reports.is_empty());
}

#[test]
fn rejected_capabilities_stop_the_driver() {
    let mut rig = Rig::contiguous(4096, 1024, 512);
    rig.host.accept_caps = false;
    rig.start();
    assert_eq!(rig.driver.state(), DmState::Failed(DmFailure::CapabilitiesRejected));
    rig.advance(Duration::from_secs(60), Duration::from_secs(1));
    assert!(rig.host.status_reports.is_empty());
    // The host's later requests are out of state.
    let event = rig.driver.receive(&balloon_request(10), rig.now, &mut rig.pool);
    assert_eq!(event, DmEvent::Ignored(IgnoredReason::OutOfState(DmMessageType::BALLOON_REQUEST)));
}

#[test]
fn silent_host_times_out_version_then_capabilities() {
    let mut pool = FakePool::new(RAM_BASE, 1024, |_| false);
    let mut driver = DmDriver::new(DmConfig::for_total_pages(1024));
    driver.start(Duration::ZERO);
    assert_eq!(drain(&mut driver, Duration::ZERO, &mut pool).len(), 1);
    assert_eq!(driver.next_wakeup(), Some(Duration::from_secs(5)));
    assert!(drain(&mut driver, Duration::from_millis(4999), &mut pool).is_empty());
    assert_eq!(driver.state(), DmState::NegotiatingVersion(DmVersion::V2_0));
    assert!(drain(&mut driver, Duration::from_secs(5), &mut pool).is_empty());
    assert_eq!(driver.state(), DmState::Failed(DmFailure::VersionResponseTimeout));

    driver.start(Duration::from_secs(10));
    drain(&mut driver, Duration::from_secs(10), &mut pool);
    let accept = message(DmMessageType::VERSION_RESPONSE, 2, &1u64.to_le_bytes());
    assert_eq!(driver.receive(&accept, Duration::from_secs(11), &mut pool), DmEvent::VersionAccepted(DmVersion::V2_0));
    assert_eq!(drain(&mut driver, Duration::from_secs(11), &mut pool).len(), 1);
    assert!(drain(&mut driver, Duration::from_secs(16), &mut pool).is_empty());
    assert_eq!(driver.state(), DmState::Failed(DmFailure::CapabilitiesResponseTimeout));
}

// ---------------------------------------------------------------------------------------------------------------
// Status reports

#[test]
fn status_reports_about_once_a_second_with_the_pools_figures() {
    let mut rig = Rig::contiguous(8192, 2048, 1024);
    rig.start();
    rig.advance(Duration::from_secs(10), Duration::from_millis(100));
    let times: Vec<Duration> = rig.host.status_reports.iter().map(|&(time, _, _)| time).collect();
    assert_eq!(times.len(), 11, "{times:?}");
    assert_eq!(times[0], Duration::ZERO);
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_secs(1) && gap <= Duration::from_millis(1100), "{gap:?}");
    }
    // The kernel allocates; the next report shows it.
    rig.pool.kernel_allocates(100);
    rig.advance(Duration::from_secs(1), Duration::from_millis(100));
    assert_eq!(
        rig.host.status_reports.last().map(|&(_, available, committed)| (available, committed)),
        Some((6044, 2148))
    );
}

#[test]
fn suppressed_pressure_reports_are_not_sent() {
    let mut rig = Rig::contiguous(4096, 1024, 512);
    rig.host.status_report_on = false;
    rig.start();
    assert_eq!(rig.events.last(), Some(&DmEvent::CapabilitiesAccepted { suppress_pressure_reports: true }));
    rig.advance(Duration::from_secs(5), Duration::from_millis(100));
    assert_eq!(rig.driver.stats().status_reports, 0);
    assert_eq!(rig.driver.next_wakeup(), None);
}

// ---------------------------------------------------------------------------------------------------------------
// Ballooning against the host model

#[test]
fn host_acts_after_its_post_init_wait_and_a_contiguous_pool_gives_one_range() {
    let mut rig = Rig::contiguous(65536, 4096, 4096);
    rig.start();
    rig.host.set_target(65536 - 10_000);
    rig.advance(Duration::from_secs(49), Duration::from_secs(1));
    assert_eq!(rig.host.balloon_requests, 0, "QEMU waits 50 s before acting");
    rig.advance(Duration::from_secs(1), Duration::from_secs(1));
    assert_eq!(rig.host.balloon_requests, 1);
    assert_eq!(rig.host.balloon_responses, vec![(1, false, 24)]);
    assert_eq!(rig.host.actual(), 65536 - 10_000);
    assert_eq!(rig.driver.ballooned().iter().collect::<Vec<_>>(), vec![PageRange::new(RAM_BASE + 4096, 10_000)]);
    assert_eq!(rig.pool.free, 65536 - 4096 - 10_000);
    // Committed now counts the ballooned pages and the floor (Linux's rule).
    rig.advance(Duration::from_secs(1), Duration::from_secs(1));
    let &(_, available, committed) = rig.host.status_reports.last().unwrap();
    assert_eq!((available, committed), (65536 - 4096 - 10_000, 4096 + 10_000 + 4096));
}

#[test]
fn fragmented_pool_splits_into_responses_of_at_most_510_ranges() {
    // Every other frame is kernel-used: every run is one frame and nothing coalesces.
    let config = DmConfig { floor_pages: 100, ..DmConfig::for_total_pages(8192) };
    let mut rig = Rig::new(FakePool::new(RAM_BASE, 8192, |i| i % 2 == 1), config);
    rig.ready();
    rig.host.set_target(8192 - 2000);
    rig.pump();
    assert_eq!(
        rig.host.balloon_responses,
        vec![(510, true, 4096), (510, true, 4096), (510, true, 4096), (470, false, 16 + 8 * 470)]
    );
    assert_eq!(rig.driver.ballooned_pages(), 2000);
    assert_eq!(rig.driver.ballooned().range_count(), 2000);
    assert_eq!(rig.host.actual(), 8192 - 2000);
    assert_eq!(rig.driver.stats().balloon_responses, 4);
    // Every guest message, each balloon response included, carries a new trans_id (Linux's rule).
    let ids = &rig.host.guest_trans_ids;
    assert!(ids.windows(2).all(|pair| pair[1] == pair[0] + 1), "{ids:?}");
}

#[test]
fn adjacent_runs_are_coalesced_into_one_range() {
    // A pool that hands out one frame per call: the driver merges adjacent runs.
    struct OneAtATime(FakePool);
    impl FramePool for OneAtATime {
        fn free_pages(&self) -> u64 {
            self.0.free_pages()
        }
        fn committed_pages(&self) -> u64 {
            self.0.committed_pages()
        }
        fn take_free_run(&mut self, _max_pages: u64) -> Option<PageRange> {
            self.0.take_free_run(1)
        }
        fn give_back(&mut self, range: PageRange) {
            self.0.give_back(range)
        }
    }
    let mut pool = OneAtATime(FakePool::new(RAM_BASE, 4096, |i| i < 100 || (2000..2010).contains(&i)));
    let mut driver = ready_driver(&mut pool, 256);
    driver.receive(&balloon_request(3000), Duration::ZERO, &mut pool);
    let messages: Vec<Vec<u8>> = core::iter::from_fn(|| driver.poll_transmit(Duration::ZERO, &mut pool)).collect();
    let statuses = messages.iter().filter(|m| m[0] == 5).count();
    let responses: Vec<_> = messages.iter().filter(|m| m[0] == 7).map(|m| response_ranges(m)).collect();
    assert_eq!(statuses, 1);
    assert_eq!(
        responses,
        vec![(false, vec![PageRange::new(RAM_BASE + 100, 1900), PageRange::new(RAM_BASE + 2010, 1100)])]
    );
}

/// A driver that has negotiated with a scripted host and sent nothing else yet (status report pending).
fn ready_driver<P: FramePool>(pool: &mut P, floor: u64) -> DmDriver {
    let config = DmConfig { floor_pages: floor, ..DmConfig::for_total_pages(4096) };
    let mut driver = DmDriver::new(config);
    driver.start(Duration::ZERO);
    while driver.poll_transmit(Duration::ZERO, pool).is_some() {}
    driver.receive(&message(DmMessageType::VERSION_RESPONSE, 1, &1u64.to_le_bytes()), Duration::ZERO, pool);
    while driver.poll_transmit(Duration::ZERO, pool).is_some() {}
    driver.receive(&message(DmMessageType::CAPABILITIES_RESPONSE, 2, &1u64.to_le_bytes()), Duration::ZERO, pool);
    assert_eq!(driver.state(), DmState::Ready);
    driver
}

#[test]
fn the_floor_is_never_crossed_and_the_host_is_told_with_an_empty_response() {
    let mut rig = Rig::contiguous(16384, 4096, 2048);
    rig.ready();
    // Ask for more than free − floor = 10240.
    rig.host.set_target(16384 - 12_000);
    rig.pump();
    assert_eq!(rig.pool.free, 2048, "the driver stops exactly at the floor");
    assert_eq!(rig.driver.ballooned_pages(), 10_240);
    // First request: 12000 pages, answered with 10240 (more_pages 0); QEMU asks for the remaining 1760 and gets
    // an empty response, which ends the transaction.
    assert_eq!(rig.host.balloon_requests, 2);
    assert_eq!(rig.host.balloon_responses, vec![(1, false, 24), (0, false, 16)]);
    assert_eq!(rig.host.state, HostState::Idle);
    // A later request at the floor gets an empty response at once.
    rig.host.set_target(1000);
    rig.pump();
    assert_eq!(rig.host.balloon_responses.last(), Some(&(0, false, 16)));
    assert_eq!(rig.pool.free, 2048);
}

#[test]
fn the_floor_holds_when_the_kernel_allocates_between_responses() {
    let config = DmConfig { floor_pages: 1000, ..DmConfig::for_total_pages(8192) };
    let mut pool = FakePool::new(RAM_BASE, 8192, |i| i % 2 == 1);
    let mut driver = ready_driver(&mut pool, config.floor_pages);
    driver.poll_transmit(Duration::ZERO, &mut pool); // the first status report
    driver.receive(&balloon_request(3000), Duration::ZERO, &mut pool);
    let (more, first) = response_ranges(&driver.poll_transmit(Duration::ZERO, &mut pool).unwrap());
    assert!(more);
    assert_eq!(first.len(), 510);
    // The kernel takes all but 1100 free frames: only 100 more may go.
    let free = pool.free;
    pool.kernel_allocates(free - 1100);
    let (more, second) = response_ranges(&driver.poll_transmit(Duration::ZERO, &mut pool).unwrap());
    assert!(!more);
    assert_eq!(second.len(), 100);
    assert_eq!(pool.free, 1000);
    assert_eq!(driver.poll_transmit(Duration::ZERO, &mut pool), None);
}

#[test]
fn a_large_request_from_a_contiguous_pool_is_one_range() {
    // 8 GiB guest, QEMU's largest request (585 728 pages).
    const TOTAL: u64 = 2 * 1024 * 1024;
    let mut rig = Rig::contiguous(TOTAL as usize, 8192, 16384);
    rig.ready();
    rig.host.set_target(TOTAL - 585_728);
    rig.pump();
    assert_eq!(rig.host.balloon_responses, vec![(1, false, 24)]);
    assert_eq!(rig.host.actual(), TOTAL - 585_728);
    // A target needing two QEMU requests (585 728 + 14 272).
    rig.host.set_target(TOTAL - 585_728 - 600_000);
    rig.pump();
    assert_eq!(rig.host.balloon_requests, 3);
    assert_eq!(rig.host.actual(), TOTAL - 585_728 - 600_000);
    // Ranges stay coalesced: the record holds one range.
    assert_eq!(rig.driver.ballooned().range_count(), 1);
}

#[test]
fn unballoon_returns_every_frame_and_answers_once() {
    let config = DmConfig { floor_pages: 100, ..DmConfig::for_total_pages(8192) };
    let mut rig = Rig::new(FakePool::new(RAM_BASE, 8192, |i| i % 3 == 0), config);
    rig.ready();
    let free_before = rig.pool.free;
    rig.host.set_target(8192 - 3000);
    rig.pump();
    assert_eq!(rig.driver.ballooned_pages(), 3000);
    let ranges = rig.driver.ballooned().range_count();
    assert!(ranges > 510);
    // Back to the full size: QEMU sends one range per request, more_pages on all but the last.
    rig.host.set_target(8192);
    rig.pump();
    assert_eq!(rig.host.unballoon_responses, 1);
    assert_eq!(rig.driver.ballooned_pages(), 0);
    assert_eq!(rig.pool.free, free_before);
    assert_eq!(rig.host.actual(), 8192);
    let unballoons = rig.events.iter().filter(|event| matches!(event, DmEvent::Unballooned { .. })).count();
    assert_eq!(unballoons, ranges);
    assert_eq!(rig.driver.stats().pages_returned, 3000);
    // Half-way: a partial unballoon leaves the rest recorded.
    rig.host.set_target(8192 - 1000);
    rig.pump();
    rig.host.set_target(8192 - 400);
    rig.pump();
    assert_eq!(rig.driver.ballooned_pages(), 400);
    assert_eq!(rig.host.unballoon_responses, 2);
}

#[test]
fn unballoon_of_frames_never_given_is_ignored() {
    let mut pool = FakePool::new(RAM_BASE, 4096, |i| i < 1024);
    let mut driver = ready_driver(&mut pool, 512);
    driver.receive(&balloon_request(100), Duration::ZERO, &mut pool);
    drain(&mut driver, Duration::ZERO, &mut pool);
    let given = driver.ballooned().iter().next().unwrap();
    // Half of the range the host names was given; the other half is kernel memory the host never had.
    let named = PageRange::new(given.start - 50, 100);
    let event = driver.receive(&unballoon_request(false, &[named]), Duration::ZERO, &mut pool);
    assert_eq!(event, DmEvent::Unballooned { returned: 50, not_ours: 50, last: true });
    assert_eq!(pool.count(Frame::Driver), 50);
    assert_eq!(pool.count(Frame::Kernel), 1024);
    let out = drain(&mut driver, Duration::ZERO, &mut pool);
    assert_eq!(
        out,
        vec![UnballoonResponse { header: DmHeader::new(DmMessageType::UNBALLOON_RESPONSE, 8, 5) }.as_bytes().to_vec()]
    );
    // Returning the same frames again does nothing.
    let event = driver.receive(&unballoon_request(false, &[named]), Duration::ZERO, &mut pool);
    assert_eq!(event, DmEvent::Unballooned { returned: 0, not_ours: 100, last: true });
    assert_eq!(driver.stats().pages_not_ours, 150);
}

// ---------------------------------------------------------------------------------------------------------------
// Hot add

#[test]
fn hot_add_into_a_pool_that_takes_new_ranges() {
    let mut pool = FakePool::new(RAM_BASE, 4096, |i| i < 1024);
    pool.hot_add = HotAddAlignment::from_log2_mib(7);
    let config = DmConfig { floor_pages: 512, ..DmConfig::for_total_pages(4096) };
    let mut rig = Rig::new(pool, config);
    rig.ready();
    assert_eq!(
        rig.host.caps,
        Some(Capabilities { balloon: true, hot_add: true, hot_add_alignment_log2_mib: 7, hot_remove: false })
    );
    assert!(rig.driver.hot_add_reported());
    let range = PageRange::new(0x100000, 0x8000); // 4 GiB, 128 MiB
    rig.host.offer_hot_add(range);
    rig.pump();
    assert_eq!(rig.host.hot_add_responses, vec![(0x8000, HOT_ADD_RESULT_SUCCESS)]);
    assert_eq!(rig.pool.free, 3072 + 0x8000);
    assert_eq!(rig.events.last(), Some(&DmEvent::HotAdded { offered: 0x8000, accepted: 0x8000 }));
    // A pool at its limit takes part of the next one: the answer says how much.
    rig.pool.hot_add_limit = 0x8000 + 100;
    rig.host.offer_hot_add(PageRange::new(0x108000, 0x8000));
    rig.pump();
    assert_eq!(rig.host.hot_add_responses.last(), Some(&(100, HOT_ADD_RESULT_SUCCESS)));
    assert_eq!(rig.driver.stats().pages_hot_added, 0x8000 + 100);
    assert_eq!(rig.host.actual(), 4096 + 0x8000 + 100);
    // Hot-added frames are ballooned like any other once the boot RAM's free frames are gone.
    rig.host.set_target(rig.host.actual() - 10_000);
    rig.pump();
    assert_eq!(rig.driver.ballooned_pages(), 10_000);
    let in_hot_added: u64 =
        rig.driver.ballooned().iter().filter(|range| range.start >= 0x100000).map(|range| range.count).sum();
    // The pool hands out lowest frames first: all 3072 free boot frames, then hot-added ones.
    assert_eq!(in_hot_added, 10_000 - 3072);
}

#[test]
fn hot_add_without_pool_support_is_success_with_zero_pages() {
    let mut rig = Rig::contiguous(4096, 1024, 512);
    rig.ready();
    rig.host.offer_hot_add(PageRange::new(0x100000, 0x8000));
    rig.pump();
    assert_eq!(rig.host.hot_add_responses, vec![(0, HOT_ADD_RESULT_SUCCESS)]);
    assert_eq!(rig.pool.free, 3072);
}

#[test]
fn hot_add_overlapping_ballooned_frames_or_empty_is_refused() {
    let mut pool = FakePool::new(RAM_BASE, 4096, |i| i < 1024);
    pool.hot_add = Some(HotAddAlignment::ONE_MIB);
    let mut driver = ready_driver(&mut pool, 512);
    drain(&mut driver, Duration::ZERO, &mut pool);
    driver.receive(&balloon_request(100), Duration::ZERO, &mut pool);
    drain(&mut driver, Duration::ZERO, &mut pool);
    let given = driver.ballooned().iter().next().unwrap();
    let event = driver.receive(&hot_add_request(PageRange::new(given.start, 10)), Duration::ZERO, &mut pool);
    assert_eq!(event, DmEvent::HotAdded { offered: 10, accepted: 0 });
    let event = driver.receive(&hot_add_request(PageRange::new(0x100000, 0)), Duration::ZERO, &mut pool);
    assert_eq!(event, DmEvent::HotAdded { offered: 0, accepted: 0 });
    let answers = drain(&mut driver, Duration::ZERO, &mut pool);
    assert_eq!(answers.len(), 2);
    for answer in answers {
        let response = HotAddResponse::read_from_bytes(&answer).unwrap();
        assert_eq!((response.page_count.get(), response.result.get()), (0, 1));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Robustness

#[test]
fn malformed_unknown_and_out_of_state_messages_are_ignored() {
    let mut pool = FakePool::new(RAM_BASE, 4096, |i| i < 1024);
    let mut driver = DmDriver::new(DmConfig { floor_pages: 512, ..DmConfig::for_total_pages(4096) });
    let now = Duration::ZERO;
    // Before start: host requests are out of state.
    for (bytes, message_type) in [
        (balloon_request(10), DmMessageType::BALLOON_REQUEST),
        (unballoon_request(false, &[PageRange::new(RAM_BASE, 1)]), DmMessageType::UNBALLOON_REQUEST),
        (hot_add_request(PageRange::new(0x100000, 1)), DmMessageType::MEM_HOT_ADD_REQUEST),
        (message(DmMessageType::VERSION_RESPONSE, 1, &1u64.to_le_bytes()), DmMessageType::VERSION_RESPONSE),
        (message(DmMessageType::CAPABILITIES_RESPONSE, 1, &1u64.to_le_bytes()), DmMessageType::CAPABILITIES_RESPONSE),
    ] {
        assert_eq!(driver.receive(&bytes, now, &mut pool), DmEvent::Ignored(IgnoredReason::OutOfState(message_type)));
    }
    assert!(drain(&mut driver, now, &mut pool).is_empty());
    driver.start(now);
    drain(&mut driver, now, &mut pool);
    // Capabilities response while negotiating the version.
    let caps = message(DmMessageType::CAPABILITIES_RESPONSE, 1, &1u64.to_le_bytes());
    assert!(matches!(driver.receive(&caps, now, &mut pool), DmEvent::Ignored(IgnoredReason::OutOfState(_))));
    driver.receive(&message(DmMessageType::VERSION_RESPONSE, 1, &1u64.to_le_bytes()), now, &mut pool);
    drain(&mut driver, now, &mut pool);
    driver.receive(&caps, now, &mut pool);
    assert_eq!(driver.state(), DmState::Ready);
    // Second answers once ready.
    assert!(matches!(driver.receive(&caps, now, &mut pool), DmEvent::Ignored(IgnoredReason::OutOfState(_))));
    let version = message(DmMessageType::VERSION_RESPONSE, 1, &0u64.to_le_bytes());
    assert!(matches!(driver.receive(&version, now, &mut pool), DmEvent::Ignored(IgnoredReason::OutOfState(_))));
    // Guest → host types, ERROR and unknown types.
    for message_type in [0u16, 1, 3, 5, 7, 9, 11, 14, 15, 200, u16::MAX] {
        let bytes = message(DmMessageType(message_type), 0, &[0; 8]);
        assert_eq!(
            driver.receive(&bytes, now, &mut pool),
            DmEvent::Ignored(IgnoredReason::UnexpectedType(DmMessageType(message_type)))
        );
    }
    // Hot remove was not offered.
    let hot_remove = message(DmMessageType::MEM_HOT_REMOVE_REQUEST, 0, &[0; 16]);
    assert_eq!(driver.receive(&hot_remove, now, &mut pool), DmEvent::Ignored(IgnoredReason::HotRemoveNotSupported));
    // Every message truncated at every length, and with a lying size field.
    let full = [
        balloon_request(10),
        unballoon_request(false, &[PageRange::new(RAM_BASE, 1)]),
        hot_add_request(PageRange::new(0x100000, 1)),
        message(
            DmMessageType::INFO_MESSAGE,
            0,
            &[0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        ),
        hot_remove.clone(),
    ];
    for bytes in &full {
        for len in 0..bytes.len() {
            let mut short = bytes[..len].to_vec();
            if len >= 4 {
                short[2..4].copy_from_slice(&(len as u16).to_le_bytes());
            }
            assert!(
                matches!(driver.receive(&short, now, &mut pool), DmEvent::Ignored(IgnoredReason::Malformed(_))),
                "{bytes:?} cut to {len}"
            );
        }
        let mut lying = bytes.clone();
        lying[2..4].copy_from_slice(&(bytes.len() as u16 + 1).to_le_bytes());
        assert!(matches!(driver.receive(&lying, now, &mut pool), DmEvent::Ignored(IgnoredReason::Malformed(_))));
    }
    // Nothing was answered, no frame moved, and the info message was read.
    assert!(drain(&mut driver, now, &mut pool).iter().all(|m| m[0] == DmMessageType::STATUS_REPORT.0 as u8));
    assert_eq!(pool.count(Frame::Driver), 0);
    let info = &full[3];
    assert_eq!(driver.receive(info, now, &mut pool), DmEvent::Info { max_page_count: Some(1) });
    assert_eq!(driver.max_page_count(), Some(1));
}

#[test]
fn balloon_requests_of_zero_absurd_and_overlapping_kinds() {
    let mut pool = FakePool::new(RAM_BASE, 4096, |i| i < 1024);
    let mut driver = ready_driver(&mut pool, 512);
    drain(&mut driver, Duration::ZERO, &mut pool);
    // Zero pages: one empty final response.
    assert_eq!(
        driver.receive(&balloon_request(0), Duration::ZERO, &mut pool),
        DmEvent::BalloonStarted { requested: 0 }
    );
    let out = drain(&mut driver, Duration::ZERO, &mut pool);
    assert_eq!(out.iter().map(|m| response_ranges(m)).collect::<Vec<_>>(), vec![(false, vec![])]);
    // u32::MAX pages: everything above the floor, no more.
    driver.receive(&balloon_request(u32::MAX), Duration::ZERO, &mut pool);
    // A second request while the first is still being answered is ignored.
    assert_eq!(
        driver.receive(&balloon_request(5), Duration::ZERO, &mut pool),
        DmEvent::Ignored(IgnoredReason::BalloonInProgress)
    );
    let out = drain(&mut driver, Duration::ZERO, &mut pool);
    assert_eq!(
        out.iter().map(|m| response_ranges(m)).collect::<Vec<_>>(),
        vec![(false, vec![PageRange::new(RAM_BASE + 1024, 2560)])]
    );
    assert_eq!(pool.free, 512);
}

#[test]
fn a_buggy_pool_cannot_make_the_driver_give_a_frame_twice() {
    /// Hands out the same run forever, and an oversized one on request 3.
    struct Repeating {
        calls: u32,
        given_back: Vec<PageRange>,
    }
    impl FramePool for Repeating {
        fn free_pages(&self) -> u64 {
            1_000_000
        }
        fn committed_pages(&self) -> u64 {
            0
        }
        fn take_free_run(&mut self, _max_pages: u64) -> Option<PageRange> {
            self.calls += 1;
            Some(match self.calls {
                3 => PageRange::new(5000, 50),
                4 => PageRange::new(1 << 40, 1),
                5 => PageRange::new(7000, 0),
                _ => PageRange::new(100, 10),
            })
        }
        fn give_back(&mut self, range: PageRange) {
            self.given_back.push(range);
        }
    }
    let mut pool = Repeating { calls: 0, given_back: Vec::new() };
    let mut driver = ready_driver(&mut pool, 0);
    drain_any(&mut driver, &mut pool);
    // 1st run recorded; the 2nd (same frames) is dropped and ends the response.
    driver.receive(&balloon_request(20), Duration::ZERO, &mut pool);
    let out = drain_any(&mut driver, &mut pool);
    assert_eq!(
        out.iter().map(|m| response_ranges(m)).collect::<Vec<_>>(),
        vec![(false, vec![PageRange::new(100, 10)])]
    );
    assert_eq!(driver.stats().pool_errors, 1);
    assert!(pool.given_back.is_empty(), "frames the host holds are never given back to the pool");
    // 3rd run is longer than asked: the excess goes back.
    driver.receive(&balloon_request(20), Duration::ZERO, &mut pool);
    let out = drain_any(&mut driver, &mut pool);
    assert_eq!(
        out.iter().map(|m| response_ranges(m)).collect::<Vec<_>>(),
        vec![(false, vec![PageRange::new(5000, 20)])]
    );
    assert_eq!(pool.given_back, vec![PageRange::new(5020, 30)]);
    // 4th is beyond the 40-bit PFN field: back to the pool, and the response is empty; 5th is empty.
    for _ in 0..2 {
        driver.receive(&balloon_request(20), Duration::ZERO, &mut pool);
        let out = drain_any(&mut driver, &mut pool);
        assert_eq!(out.iter().map(|m| response_ranges(m)).collect::<Vec<_>>(), vec![(false, vec![])]);
    }
    assert_eq!(pool.given_back, vec![PageRange::new(5020, 30), PageRange::new(1 << 40, 1)]);
    assert_eq!(driver.stats().pool_errors, 4);
    assert_eq!(driver.ballooned_pages(), 30);
}

fn drain_any<P: FramePool>(driver: &mut DmDriver, pool: &mut P) -> Vec<Vec<u8>> {
    core::iter::from_fn(|| driver.poll_transmit(Duration::ZERO, pool)).filter(|m| m[0] != 5).collect()
}

#[test]
fn after_a_close_the_record_can_be_returned_and_the_driver_restarts() {
    let mut rig = Rig::contiguous(8192, 1024, 512);
    rig.ready();
    rig.host.set_target(8192 - 2000);
    rig.pump();
    assert_eq!(rig.driver.ballooned_pages(), 2000);
    rig.driver.channel_closed();
    assert_eq!(rig.driver.state(), DmState::Closed);
    assert_eq!(rig.driver.next_wakeup(), None);
    assert_eq!(rig.driver.return_all_ballooned(&mut rig.pool), 2000);
    assert_eq!(rig.pool.free, 8192 - 1024);
    // QEMU resets the device after the close; a new open negotiates again.
    rig.host = QemuHost::new(RAM_BASE, 8192);
    rig.start();
    assert_eq!(rig.driver.state(), DmState::Ready);
    assert_eq!(rig.host.versions_seen.len(), 1);
}

// ---------------------------------------------------------------------------------------------------------------
// Random input

/// A host message: structured (likely to be acted on) or random bytes.
fn host_message() -> impl Strategy<Value = Vec<u8>> {
    let range = (RAM_BASE - 16..RAM_BASE + 600, 0u64..80).prop_map(|(start, count)| PageRange::new(start, count));
    prop_oneof![
        (0u32..400).prop_map(balloon_request),
        Just(balloon_request(u32::MAX)),
        (any::<bool>(), proptest::collection::vec(range.clone(), 0..6))
            .prop_map(|(more, ranges)| unballoon_request(more, &ranges)),
        range.prop_map(hot_add_request),
        proptest::collection::vec(any::<u8>(), 0..64),
        (0u16..16, proptest::collection::vec(any::<u8>(), 0..40)).prop_map(|(message_type, body)| message(
            DmMessageType(message_type),
            7,
            &body
        )),
        (0u16..16, any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
            |(message_type, size, body)| {
                let mut bytes = message(DmMessageType(message_type), 7, &body);
                bytes[2..4].copy_from_slice(&size.to_le_bytes());
                bytes
            }
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random host messages never panic the driver, never make it give a frame the host already holds, never
    /// make it give back a frame it did not take (the fake pool asserts that), never cross the floor, and every
    /// message it sends is well-formed.
    #[test]
    fn random_host_messages_never_panic_or_double_give(
        messages in proptest::collection::vec((host_message(), 0u64..3000), 1..40),
        hot_add in any::<bool>(),
    ) {
        let mut pool = FakePool::new(RAM_BASE, 600, |i| i % 5 == 0 || (100..140).contains(&i));
        if hot_add {
            pool.hot_add = Some(HotAddAlignment::ONE_MIB);
        }
        let floor = 50;
        let mut driver = ready_driver(&mut pool, floor);
        let mut outstanding = PageRangeSet::new();
        let mut now = Duration::ZERO;
        for (bytes, millis) in messages {
            now += Duration::from_millis(millis);
            let free_before = pool.free;
            driver.receive(&bytes, now, &mut pool);
            prop_assert!(pool.free >= free_before.min(floor));
            // Mirror the unballoon the driver just did.
            if let Ok(HostMessage::UnballoonRequest { ranges, .. }) = parse_host_message(&bytes) {
                for range in ranges.iter() {
                    outstanding.remove(range, |_| ());
                }
            }
            while let Some(out) = driver.poll_transmit(now, &mut pool) {
                let (header, _) = DmHeader::read_from_prefix(&out).unwrap();
                prop_assert_eq!(usize::from(header.size.get()), out.len());
                prop_assert!(out.len() <= MAX_GUEST_MESSAGE_SIZE);
                if header.message_type() == DmMessageType::BALLOON_RESPONSE {
                    let (_, ranges) = response_ranges(&out);
                    for range in ranges {
                        prop_assert!(outstanding.insert(range), "{:?} given twice", range);
                    }
                }
                prop_assert!(pool.free >= floor.min(free_before));
            }
            prop_assert_eq!(&outstanding, driver.ballooned());
            prop_assert_eq!(pool.count(Frame::Driver), driver.ballooned_pages());
        }
    }

    /// The parser never panics on arbitrary bytes, and a parsed unballoon request's ranges lie inside the payload.
    #[test]
    fn the_parser_accepts_or_rejects_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(HostMessage::UnballoonRequest { ranges, .. }) = parse_host_message(&bytes) {
            prop_assert!(16 + 8 * ranges.len() <= bytes.len());
        }
    }
}
