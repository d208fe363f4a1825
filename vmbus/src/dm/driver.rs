//! The guest side of the Dynamic Memory protocol as a sans-I/O state machine: [`DmDriver`].
//!
//! Reference: `dynamic-memory.md` "Guest sequence" (steps 2–7) and "QEMU's host". The driver never touches a
//! ring, a clock or the allocator by itself: the caller hands it each received payload with the current time
//! ([`DmDriver::receive`]), pulls the messages to send ([`DmDriver::poll_transmit`]) and wakes it at
//! [`DmDriver::next_wakeup`]; frames move through the [`FramePool`] the caller passes in.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::time::Duration;

use log::{debug, error, info, warn};
use zerocopy::IntoBytes;
use zerocopy::byteorder::little_endian::{U32, U64};

use super::pool::FramePool;
use super::range::{PageRange, PageRangeSet};
use super::wire::*;

/// Pages in 1 MiB.
const PAGES_PER_MIB: u64 = 256;

/// The smallest floor [`DmConfig::for_total_pages`] chooses: 16 MiB of free frames.
pub const MIN_FLOOR_PAGES: u64 = 16 * PAGES_PER_MIB;

/// The driver's settings.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DmConfig {
    /// The floor: the driver never takes a frame when the pool has this many free frames or fewer, so the kernel
    /// always keeps this much memory to allocate from ("Guest sequence" step 5: "keep a floor").
    pub floor_pages: u64,
    /// Time between status reports (Linux and the host expect about 1 s).
    pub status_interval: Duration,
    /// How long to wait for a VERSION_RESPONSE or CAPABILITIES_RESPONSE before giving up (Linux: 5 s).
    pub response_timeout: Duration,
}

impl DmConfig {
    /// The settings for a guest of `total_pages` 4 KiB frames: the floor is 1/8 of memory, at least
    /// [`MIN_FLOOR_PAGES`] (16 MiB) — what the unikernel's heap may still need to grow into while ballooned;
    /// status reports every second; 5 s response timeout.
    pub fn for_total_pages(total_pages: u64) -> DmConfig {
        DmConfig {
            floor_pages: (total_pages / 8).max(MIN_FLOOR_PAGES),
            status_interval: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
        }
    }
}

/// Why the driver stopped for good (until the channel is reopened and [`DmDriver::start`] called again).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DmFailure {
    /// The host rejected 2.0, 1.0 and 0.3.
    VersionsRejected,
    /// The host rejected the capabilities report (the guest must stop the service).
    CapabilitiesRejected,
    /// No VERSION_RESPONSE within [`DmConfig::response_timeout`].
    VersionResponseTimeout,
    /// No CAPABILITIES_RESPONSE within [`DmConfig::response_timeout`].
    CapabilitiesResponseTimeout,
}

/// Where the driver is in the protocol ("Guest sequence").
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DmState {
    /// Not started, or the channel was closed.
    Closed,
    /// A VERSION_REQUEST for this version is out (step 2).
    NegotiatingVersion(DmVersion),
    /// The CAPABILITIES_REPORT is out (step 3).
    AwaitingCapabilities,
    /// Capabilities accepted: status reports flow and host requests are served (steps 4–7).
    Ready,
    /// Stopped ([`DmFailure`]).
    Failed(DmFailure),
}

/// Why a received message was not acted on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IgnoredReason {
    /// The payload is not a valid DM message.
    Malformed(DmParseError),
    /// A valid message the current state does not expect (e.g. a BALLOON_REQUEST before the capabilities
    /// were accepted, a second VERSION_RESPONSE).
    OutOfState(DmMessageType),
    /// A BALLOON_REQUEST while the previous balloon transaction is still being answered.
    BalloonInProgress,
    /// ERROR, a guest → host type, or an unknown type.
    UnexpectedType(DmMessageType),
    /// MEM_HOT_REMOVE_REQUEST: this driver does not report hot remove, so the host must not send it.
    HotRemoveNotSupported,
}

/// What a received message did ([`DmDriver::receive`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DmEvent {
    /// The host rejected this version; the next one is proposed.
    VersionRejected(DmVersion),
    /// The host accepted this version; the capabilities report is queued.
    VersionAccepted(DmVersion),
    /// The driver stopped.
    Failed(DmFailure),
    /// The host accepted the capabilities; the first status report is due at once.
    CapabilitiesAccepted {
        /// The host asked for no status reports (QEMU without `status-report=on`); the driver sends none.
        suppress_pressure_reports: bool,
    },
    /// A balloon transaction started; [`DmDriver::poll_transmit`] takes the frames and answers.
    BalloonStarted {
        /// Pages the host asked for.
        requested: u32,
    },
    /// Frames came back from the host.
    Unballooned {
        /// Frames given back to the pool.
        returned: u64,
        /// Frames the host named that the driver had not given (ignored).
        not_ours: u64,
        /// This message ended the transaction (an UNBALLOON_RESPONSE is queued).
        last: bool,
    },
    /// A hot add was answered.
    HotAdded {
        /// Pages offered.
        offered: u64,
        /// Pages the pool took.
        accepted: u64,
    },
    /// An INFO_MESSAGE arrived.
    Info {
        /// The most pages the VM may have, if the message said.
        max_page_count: Option<u64>,
    },
    /// The message was logged and dropped.
    Ignored(IgnoredReason),
}

/// Counters of what the driver did, for logs and tests.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DmStats {
    /// BALLOON_REQUESTs served.
    pub balloon_requests: u64,
    /// BALLOON_RESPONSE messages sent.
    pub balloon_responses: u64,
    /// Frames given to the host, in total.
    pub pages_given: u64,
    /// Frames given back to the pool by unballoon, in total.
    pub pages_returned: u64,
    /// Frames an UNBALLOON_REQUEST named that the driver did not hold.
    pub pages_not_ours: u64,
    /// Frames hot-added into the pool, in total.
    pub pages_hot_added: u64,
    /// STATUS_REPORTs sent.
    pub status_reports: u64,
    /// Messages dropped ([`IgnoredReason`]).
    pub ignored_messages: u64,
    /// Runs the pool returned that the driver could not use (empty, beyond the 40-bit PFN field, or overlapping
    /// frames already given): a pool bug, logged, never sent to the host.
    pub pool_errors: u64,
}

/// A balloon transaction being answered.
#[derive(Copy, Clone, Debug)]
struct BalloonWork {
    requested: u32,
    remaining: u64,
}

/// The guest's Dynamic Memory driver (see the module docs of [`crate::dm`] for how to drive it).
#[derive(Debug)]
pub struct DmDriver {
    config: DmConfig,
    state: DmState,
    /// Index into [`DmVersion::NEGOTIATION_ORDER`] of the version proposed last.
    attempt: usize,
    /// trans_id of the outstanding VERSION_REQUEST or CAPABILITIES_REPORT.
    awaited_trans_id: u32,
    deadline: Option<Duration>,
    next_trans_id: u32,
    outbox: VecDeque<Vec<u8>>,
    balloon: Option<BalloonWork>,
    /// An UNBALLOON_REQUEST with more_pages was received and its transaction is not finished.
    unballoon_open: bool,
    ballooned: PageRangeSet,
    version: Option<DmVersion>,
    hot_add_reported: bool,
    suppress_status: bool,
    next_status_at: Option<Duration>,
    max_page_count: Option<u64>,
    stats: DmStats,
}

impl DmDriver {
    /// A driver in [`DmState::Closed`].
    pub fn new(config: DmConfig) -> DmDriver {
        DmDriver {
            config,
            state: DmState::Closed,
            attempt: 0,
            awaited_trans_id: 0,
            deadline: None,
            next_trans_id: 1,
            outbox: VecDeque::new(),
            balloon: None,
            unballoon_open: false,
            ballooned: PageRangeSet::new(),
            version: None,
            hot_add_reported: false,
            suppress_status: false,
            next_status_at: None,
            max_page_count: None,
            stats: DmStats::default(),
        }
    }

    /// The channel is open: queue the first VERSION_REQUEST (2.0). Restarts negotiation from any state; frames
    /// already given stay recorded.
    pub fn start(&mut self, now: Duration) {
        if self.state != DmState::Closed {
            warn!("dm: start in state {:?}, negotiating again", self.state);
        }
        self.outbox.clear();
        self.balloon = None;
        self.unballoon_open = false;
        self.version = None;
        self.next_status_at = None;
        self.attempt = 0;
        self.propose_version(now);
    }

    /// The channel was closed (by the guest or after a rescind): stop, drop queued messages and any unfinished
    /// transaction. Frames already given stay recorded (see [`DmDriver::return_all_ballooned`]).
    pub fn channel_closed(&mut self) {
        info!("dm: channel closed in state {:?}, {} pages ballooned", self.state, self.ballooned.pages());
        self.state = DmState::Closed;
        self.outbox.clear();
        self.balloon = None;
        self.unballoon_open = false;
        self.deadline = None;
        self.next_status_at = None;
    }

    /// Gives every frame the host holds back to the pool and forgets them; returns how many.
    ///
    /// Only call this when the host has forgotten them too: QEMU's hv-balloon clears its record of removed pages
    /// when the device resets after the last channel close, and pages it discarded read back as zero-filled
    /// fresh memory, so after [`DmDriver::channel_closed`] on QEMU this is safe.
    pub fn return_all_ballooned<P: FramePool + ?Sized>(&mut self, pool: &mut P) -> u64 {
        let mut total = 0;
        for range in self.ballooned.take_all() {
            pool.give_back(range);
            total += range.count;
        }
        self.stats.pages_returned += total;
        info!("dm: {total} ballooned pages returned to the pool");
        total
    }

    /// The current state.
    pub fn state(&self) -> DmState {
        self.state
    }

    /// The version the host accepted, once it has.
    pub fn version(&self) -> Option<DmVersion> {
        self.version
    }

    /// The settings.
    pub fn config(&self) -> &DmConfig {
        &self.config
    }

    /// Frames the host holds now.
    pub fn ballooned_pages(&self) -> u64 {
        self.ballooned.pages()
    }

    /// The record of frames the host holds.
    pub fn ballooned(&self) -> &PageRangeSet {
        &self.ballooned
    }

    /// The host's last INFO_MESSAGE max page count.
    pub fn max_page_count(&self) -> Option<u64> {
        self.max_page_count
    }

    /// Whether the capabilities report offered hot add.
    pub fn hot_add_reported(&self) -> bool {
        self.hot_add_reported
    }

    /// Counters.
    pub fn stats(&self) -> &DmStats {
        &self.stats
    }

    /// When to call [`DmDriver::poll_transmit`] next without a received message: `Some(ZERO)` when messages are
    /// waiting, else the next status report or response timeout, `None` if nothing is scheduled.
    pub fn next_wakeup(&self) -> Option<Duration> {
        if !self.outbox.is_empty() || self.balloon.is_some() {
            return Some(Duration::ZERO);
        }
        let status = if self.state == DmState::Ready && !self.suppress_status { self.next_status_at } else { None };
        match (status, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Handles one received in-band packet payload (untrusted). Never panics; anything it cannot use is logged
    /// and reported as [`DmEvent::Ignored`].
    pub fn receive<P: FramePool + ?Sized>(&mut self, payload: &[u8], now: Duration, pool: &mut P) -> DmEvent {
        let message = match parse_host_message(payload) {
            Ok(message) => message,
            Err(error) => return self.ignore(IgnoredReason::Malformed(error)),
        };
        match message {
            HostMessage::VersionResponse { trans_id, accepted } => {
                self.on_version_response(trans_id, accepted, now, pool)
            }
            HostMessage::CapabilitiesResponse { trans_id, accepted, suppress_pressure_reports, .. } => {
                self.on_capabilities_response(trans_id, accepted, suppress_pressure_reports, now)
            }
            HostMessage::BalloonRequest { trans_id, num_pages } => self.on_balloon_request(trans_id, num_pages, pool),
            HostMessage::UnballoonRequest { trans_id, more_pages, ranges } => {
                if self.state != DmState::Ready {
                    return self.ignore(IgnoredReason::OutOfState(DmMessageType::UNBALLOON_REQUEST));
                }
                self.on_unballoon_request(trans_id, more_pages, ranges.iter(), pool)
            }
            HostMessage::HotAddRequest { trans_id, range, region } => self.on_hot_add(trans_id, range, region, pool),
            HostMessage::Info { max_page_count, other_items, .. } => {
                if other_items > 0 {
                    debug!("dm: INFO_MESSAGE with {other_items} items of unknown type or size");
                }
                if let Some(pages) = max_page_count {
                    info!("dm: host's max page count {pages} ({} MiB)", pages / PAGES_PER_MIB);
                    self.max_page_count = Some(pages);
                }
                DmEvent::Info { max_page_count }
            }
            HostMessage::HotRemoveRequest { page_count, .. } => {
                warn!("dm: MEM_HOT_REMOVE_REQUEST for {page_count} pages, but hot remove was not offered");
                self.ignore(IgnoredReason::HotRemoveNotSupported)
            }
            HostMessage::Unexpected { message_type, .. } => self.ignore(IgnoredReason::UnexpectedType(message_type)),
        }
    }

    /// The next message to send, as the payload of an in-band packet, or `None`. Also checks the response
    /// timeout. Call it until `None` after every [`DmDriver::receive`] and when [`DmDriver::next_wakeup`] is
    /// reached, and only when the outgoing ring has room for a [`MAX_GUEST_MESSAGE_SIZE`]-byte payload: every
    /// message returned must be sent (balloon responses carry frames already recorded as given).
    pub fn poll_transmit<P: FramePool + ?Sized>(&mut self, now: Duration, pool: &mut P) -> Option<Vec<u8>> {
        self.check_deadline(now);
        if let Some(message) = self.outbox.pop_front() {
            return Some(message);
        }
        if self.balloon.is_some() {
            return Some(self.balloon_response(pool));
        }
        if self.state == DmState::Ready && !self.suppress_status && self.next_status_at.is_some_and(|due| now >= due) {
            self.next_status_at = Some(now.saturating_add(self.config.status_interval));
            return Some(self.status_report(pool));
        }
        None
    }

    fn ignore(&mut self, reason: IgnoredReason) -> DmEvent {
        warn!("dm: ignoring a message in state {:?}: {reason:?}", self.state);
        self.stats.ignored_messages += 1;
        DmEvent::Ignored(reason)
    }

    fn fresh_trans_id(&mut self) -> u32 {
        let id = self.next_trans_id;
        self.next_trans_id = self.next_trans_id.wrapping_add(1);
        id
    }

    fn check_deadline(&mut self, now: Duration) {
        let Some(deadline) = self.deadline else { return };
        if now < deadline {
            return;
        }
        let failure = match self.state {
            DmState::NegotiatingVersion(_) => DmFailure::VersionResponseTimeout,
            DmState::AwaitingCapabilities => DmFailure::CapabilitiesResponseTimeout,
            _ => {
                self.deadline = None;
                return;
            }
        };
        error!("dm: {failure:?}");
        self.fail(failure);
    }

    fn fail(&mut self, failure: DmFailure) -> DmEvent {
        self.state = DmState::Failed(failure);
        self.deadline = None;
        self.outbox.clear();
        DmEvent::Failed(failure)
    }

    fn propose_version(&mut self, now: Duration) {
        let order = DmVersion::NEGOTIATION_ORDER;
        let version = order[self.attempt.min(order.len() - 1)];
        let is_last_attempt = self.attempt + 1 >= order.len();
        let trans_id = self.fresh_trans_id();
        let request = VersionRequest {
            header: DmHeader::new(DmMessageType::VERSION_REQUEST, 16, trans_id),
            version: U32::new(version.0),
            flags: U32::new(u32::from(is_last_attempt)),
        };
        info!("dm: proposing version {version} (last attempt: {is_last_attempt})");
        self.outbox.push_back(request.as_bytes().to_vec());
        self.awaited_trans_id = trans_id;
        self.deadline = Some(now.saturating_add(self.config.response_timeout));
        self.state = DmState::NegotiatingVersion(version);
    }

    fn on_version_response<P: FramePool + ?Sized>(
        &mut self,
        trans_id: u32,
        accepted: bool,
        now: Duration,
        pool: &mut P,
    ) -> DmEvent {
        let DmState::NegotiatingVersion(version) = self.state else {
            return self.ignore(IgnoredReason::OutOfState(DmMessageType::VERSION_RESPONSE));
        };
        if trans_id != self.awaited_trans_id {
            warn!(
                "dm: VERSION_RESPONSE trans_id {trans_id}, request was {}; taken as its answer",
                self.awaited_trans_id
            );
        }
        if !accepted {
            info!("dm: host rejected version {version}");
            if self.attempt + 1 >= DmVersion::NEGOTIATION_ORDER.len() {
                error!("dm: host rejected every version");
                return self.fail(DmFailure::VersionsRejected);
            }
            self.attempt += 1;
            self.propose_version(now);
            return DmEvent::VersionRejected(version);
        }
        info!("dm: host accepted version {version}");
        self.version = Some(version);
        let alignment = pool.hot_add_alignment();
        self.hot_add_reported = alignment.is_some();
        let caps = Capabilities {
            balloon: true,
            hot_add: alignment.is_some(),
            hot_add_alignment_log2_mib: alignment.map_or(0, |alignment| alignment.log2_mib()),
            hot_remove: false,
        };
        let trans_id = self.fresh_trans_id();
        let report = CapabilitiesReport {
            header: DmHeader::new(DmMessageType::CAPABILITIES_REPORT, 32, trans_id),
            caps: U64::new(caps.to_bits()),
            min_page_count: U64::new(0),
            max_page_number: U64::new(u64::MAX),
        };
        info!("dm: reporting capabilities {caps:?}");
        self.outbox.push_back(report.as_bytes().to_vec());
        self.awaited_trans_id = trans_id;
        self.deadline = Some(now.saturating_add(self.config.response_timeout));
        self.state = DmState::AwaitingCapabilities;
        DmEvent::VersionAccepted(version)
    }

    fn on_capabilities_response(
        &mut self,
        trans_id: u32,
        accepted: bool,
        suppress_pressure_reports: bool,
        now: Duration,
    ) -> DmEvent {
        if self.state != DmState::AwaitingCapabilities {
            return self.ignore(IgnoredReason::OutOfState(DmMessageType::CAPABILITIES_RESPONSE));
        }
        if trans_id != self.awaited_trans_id {
            warn!("dm: CAPABILITIES_RESPONSE trans_id {trans_id}, report was {}", self.awaited_trans_id);
        }
        if !accepted {
            error!("dm: host rejected the capabilities");
            return self.fail(DmFailure::CapabilitiesRejected);
        }
        info!(
            "dm: capabilities accepted (status reports {})",
            if suppress_pressure_reports { "suppressed" } else { "on" }
        );
        self.state = DmState::Ready;
        self.deadline = None;
        self.suppress_status = suppress_pressure_reports;
        self.next_status_at = Some(now);
        DmEvent::CapabilitiesAccepted { suppress_pressure_reports }
    }

    fn on_balloon_request<P: FramePool + ?Sized>(&mut self, trans_id: u32, num_pages: u32, pool: &mut P) -> DmEvent {
        if self.state != DmState::Ready {
            return self.ignore(IgnoredReason::OutOfState(DmMessageType::BALLOON_REQUEST));
        }
        if self.balloon.is_some() {
            return self.ignore(IgnoredReason::BalloonInProgress);
        }
        if self.unballoon_open {
            warn!("dm: BALLOON_REQUEST {trans_id} inside an unfinished unballoon transaction");
        }
        let held = pool.free_pages().saturating_add(pool.committed_pages()).saturating_add(self.ballooned.pages());
        if u64::from(num_pages) > held {
            warn!("dm: host asks for {num_pages} pages, more than the {held} the guest has");
        }
        info!(
            "dm: BALLOON_REQUEST {trans_id}: {num_pages} pages (free {}, floor {})",
            pool.free_pages(),
            self.config.floor_pages
        );
        self.stats.balloon_requests += 1;
        self.balloon = Some(BalloonWork { requested: num_pages, remaining: u64::from(num_pages) });
        DmEvent::BalloonStarted { requested: num_pages }
    }

    /// Builds the next BALLOON_RESPONSE of the current transaction, taking frames from the pool.
    fn balloon_response<P: FramePool + ?Sized>(&mut self, pool: &mut P) -> Vec<u8> {
        let Some(mut work) = self.balloon else { return Vec::new() };
        let floor = self.config.floor_pages;
        let mut ranges: Vec<PageRange> = Vec::new();
        let mut exhausted = false;
        while work.remaining > 0 {
            let allowance = pool.free_pages().saturating_sub(floor);
            if allowance == 0 {
                exhausted = true;
                break;
            }
            let want = work.remaining.min(allowance).min(WIRE_MAX_PAGE_COUNT);
            if ranges.len() >= MAX_RANGES_PER_BALLOON_RESPONSE {
                break;
            }
            let Some(run) = pool.take_free_run(want) else {
                exhausted = true;
                break;
            };
            let Some(run) = self.checked_run(run, want, pool) else {
                exhausted = true;
                break;
            };
            match ranges.last_mut() {
                Some(last) if last.end() == Some(run.start) && last.count + run.count <= WIRE_MAX_PAGE_COUNT => {
                    last.count += run.count;
                }
                _ => ranges.push(run),
            }
            work.remaining -= run.count;
        }
        let given: u64 = ranges.iter().map(|range| range.count).sum();
        let more_pages = !ranges.is_empty() && work.remaining > 0 && !exhausted && pool.free_pages() > floor;
        self.stats.pages_given += given;
        self.stats.balloon_responses += 1;
        if more_pages {
            self.balloon = Some(work);
        } else {
            self.balloon = None;
            info!(
                "dm: balloon transaction done: {} of {} pages given, {} ballooned in all, {} free",
                u64::from(work.requested) - work.remaining,
                work.requested,
                self.ballooned.pages(),
                pool.free_pages()
            );
        }
        debug!("dm: BALLOON_RESPONSE {} ranges, {given} pages, more_pages {more_pages}", ranges.len());
        let size = 16 + 8 * ranges.len();
        let head = BalloonResponseHeader {
            header: DmHeader::new(DmMessageType::BALLOON_RESPONSE, size as u16, self.fresh_trans_id()),
            reserved: U32::new(0),
            flags: U32::new(BalloonResponseHeader::pack_flags(more_pages, ranges.len() as u32)),
        };
        let mut message = Vec::with_capacity(size);
        message.extend_from_slice(head.as_bytes());
        for range in ranges {
            // checked_run guarantees every run (and so every merged range) fits the wire fields.
            if let Some(wire) = WirePageRange::new(range) {
                message.extend_from_slice(wire.as_bytes());
            }
        }
        message
    }

    /// Validates a run the pool handed out and records it as given; `None` (logged) if it cannot be used.
    fn checked_run<P: FramePool + ?Sized>(&mut self, run: PageRange, want: u64, pool: &mut P) -> Option<PageRange> {
        if run.count == 0 {
            error!("dm: the pool returned an empty run");
            self.stats.pool_errors += 1;
            return None;
        }
        let mut run = run;
        if run.count > want {
            error!("dm: the pool returned {run:?} for at most {want} pages; giving back the excess");
            self.stats.pool_errors += 1;
            pool.give_back(PageRange { start: run.start.saturating_add(want), count: run.count - want });
            run.count = want;
        }
        if run.end().is_none_or(|end| end > WIRE_MAX_START_PAGE + 1) {
            error!("dm: the pool returned {run:?} beyond the protocol's 40-bit PFNs; giving it back");
            self.stats.pool_errors += 1;
            pool.give_back(run);
            return None;
        }
        if !self.ballooned.insert(run) {
            // The pool handed out frames the host already holds: never send them twice, and never give them
            // back to the pool either (the host still owns them); they stay out of use.
            error!("dm: the pool returned {run:?}, which overlaps frames the host holds; dropped");
            self.stats.pool_errors += 1;
            return None;
        }
        Some(run)
    }

    fn on_unballoon_request<P: FramePool + ?Sized>(
        &mut self,
        trans_id: u32,
        more_pages: bool,
        ranges: impl Iterator<Item = PageRange>,
        pool: &mut P,
    ) -> DmEvent {
        let mut returned = 0;
        let mut named = 0u64;
        for range in ranges {
            named = named.saturating_add(range.count);
            returned += self.ballooned.remove(range, |piece| pool.give_back(piece));
        }
        let not_ours = named.saturating_sub(returned);
        if not_ours > 0 {
            warn!("dm: UNBALLOON_REQUEST {trans_id} names {not_ours} pages the guest had not given; ignored");
        }
        self.stats.pages_returned += returned;
        self.stats.pages_not_ours += not_ours;
        info!(
            "dm: UNBALLOON_REQUEST {trans_id}: {returned} pages back, {} still ballooned, more_pages {more_pages}",
            self.ballooned.pages()
        );
        self.unballoon_open = more_pages;
        if !more_pages {
            let response = UnballoonResponse {
                header: DmHeader::new(DmMessageType::UNBALLOON_RESPONSE, 8, self.fresh_trans_id()),
            };
            self.outbox.push_back(response.as_bytes().to_vec());
        }
        DmEvent::Unballooned { returned, not_ours, last: !more_pages }
    }

    fn on_hot_add<P: FramePool + ?Sized>(
        &mut self,
        trans_id: u32,
        range: PageRange,
        region: Option<PageRange>,
        pool: &mut P,
    ) -> DmEvent {
        if self.state != DmState::Ready {
            return self.ignore(IgnoredReason::OutOfState(DmMessageType::MEM_HOT_ADD_REQUEST));
        }
        let accepted = if !self.hot_add_reported {
            warn!("dm: MEM_HOT_ADD_REQUEST {trans_id} for {range:?} but hot add was not offered; taking none");
            0
        } else if range.is_empty() || self.ballooned.overlaps(range) {
            warn!(
                "dm: MEM_HOT_ADD_REQUEST {trans_id} for {range:?} is empty or overlaps ballooned frames; taking none"
            );
            0
        } else {
            if let Some(alignment) = pool.hot_add_alignment()
                && !range.start.is_multiple_of(alignment.pages())
            {
                warn!("dm: hot-added {range:?} is not aligned to {} pages", alignment.pages());
            }
            let taken = pool.accept_hot_added(range);
            if taken > range.count {
                error!("dm: the pool says it took {taken} of {} hot-added pages", range.count);
                self.stats.pool_errors += 1;
            }
            taken.min(range.count)
        };
        info!("dm: MEM_HOT_ADD_REQUEST {trans_id}: {range:?} (region {region:?}), {accepted} pages taken");
        self.stats.pages_hot_added += accepted;
        let response = HotAddResponse {
            header: DmHeader::new(DmMessageType::MEM_HOT_ADD_RESPONSE, 16, self.fresh_trans_id()),
            // range.count comes from a 24-bit field, so `accepted` fits.
            page_count: U32::new(u32::try_from(accepted).unwrap_or(u32::MAX)),
            result: U32::new(HOT_ADD_RESULT_SUCCESS),
        };
        self.outbox.push_back(response.as_bytes().to_vec());
        DmEvent::HotAdded { offered: range.count, accepted }
    }

    /// A STATUS_REPORT from the pool's figures. `num_committed` follows Linux: the kernel's committed frames, plus
    /// — once anything was ballooned or hot-added — the ballooned frames and the floor, which is how the host's
    /// pressure logic expects ballooned memory to be counted.
    fn status_report<P: FramePool + ?Sized>(&mut self, pool: &mut P) -> Vec<u8> {
        let mut committed = pool.committed_pages();
        if self.ballooned.pages() > 0 || self.stats.pages_hot_added > 0 {
            committed = committed.saturating_add(self.ballooned.pages()).saturating_add(self.config.floor_pages);
        }
        let report = StatusReport {
            header: DmHeader::new(DmMessageType::STATUS_REPORT, 48, self.fresh_trans_id()),
            num_available: U64::new(pool.free_pages()),
            num_committed: U64::new(committed),
            page_file_size: U64::new(0),
            zero_free: U64::new(0),
            page_file_writes: U32::new(0),
            io_diff: U32::new(0),
        };
        self.stats.status_reports += 1;
        report.as_bytes().to_vec()
    }
}
