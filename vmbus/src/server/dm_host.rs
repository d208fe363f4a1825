//! The host's side of Dynamic Memory (hv_balloon) for the loopback bus: a device model that plays what QEMU's
//! hv-balloon does (reference `dynamic-memory.md` "QEMU's host"), so that the guest driver runs against the
//! project's own server in host tests and in the unikernel under QEMU TCG (issue 9 §7).
//!
//! The model accepts versions 0.3 to 2.0 (echoing the request's trans_id), always accepts the capabilities with
//! status reports on, records every status report, and on request sends one BALLOON_REQUEST (collecting
//! BALLOON_RESPONSEs until `more_pages` is clear) or gives everything it holds back as UNBALLOON_REQUESTs of one
//! range each, `more_pages` on all but the last, expecting one UNBALLOON_RESPONSE. Every guest message is checked
//! (size, type, state); what does not fit is counted as an error, as QEMU logs and drops it.

use alloc::vec::Vec;
use zerocopy::{FromBytes, IntoBytes};

use super::ServerError;
use super::channel::OfferSpec;
use super::endpoint::ServerEndpoint;
use super::loopback::LoopbackBus;
use crate::dm::PageRange;
use crate::dm::wire::{
    BalloonRequest, BalloonResponseHeader, Capabilities, CapabilitiesReport, CapabilitiesResponse, DmHeader,
    DmMessageType, StatusReport, UnballoonRequestHeader, VersionRequest, VersionResponse, WirePageRange,
};
use crate::memory::PageArena;
use crate::protocol::{Guid, device_class};
use crate::ring::PacketType;
use zerocopy::little_endian::{U32, U64};

/// The instance GUID the model offers.
pub const DM_HOST_INSTANCE: Guid = Guid::from_canonical("4c4f4f50-444d-0001-0000-000000000001");

/// Lowest and highest version the model accepts (QEMU's bounds).
const VERSIONS: core::ops::RangeInclusive<u32> = 0x0000_0003..=0x0002_0000;

/// What the model saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DmHostReport {
    /// The relid offered.
    pub relid: Option<u32>,
    /// The version accepted.
    pub version: Option<u32>,
    /// The capabilities the guest reported.
    pub capabilities: Option<Capabilities>,
    /// Status reports received, and the last one's (available, committed) pages.
    pub status_reports: u64,
    /// The last status report's figures.
    pub last_status: Option<(u64, u64)>,
    /// Pages the guest gave in all balloon transactions, and pages returned to it.
    pub pages_taken: u64,
    /// Pages given back with UNBALLOON_REQUESTs and confirmed by an UNBALLOON_RESPONSE.
    pub pages_returned: u64,
    /// Balloon transactions finished (a response with `more_pages` clear).
    pub balloons_done: u64,
    /// Unballoon transactions confirmed.
    pub unballoons_done: u64,
    /// Guest messages refused (short, unknown, out of state).
    pub errors: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for VERSION_REQUEST.
    Version,
    /// Waiting for CAPABILITIES_REPORT.
    Capabilities,
    /// Ready for balloon work.
    Ready,
    /// A BALLOON_REQUEST is out.
    Ballooning,
    /// UNBALLOON_REQUESTs are out.
    Unballooning,
}

/// The Dynamic Memory host model (see the module documentation).
pub struct DmHost {
    endpoint: Option<ServerEndpoint<PageArena>>,
    phase: Phase,
    trans_id: u32,
    held: Vec<PageRange>,
    returning: u64,
    wanted_balloon: Option<u32>,
    wanted_unballoon: bool,
    report: DmHostReport,
}

impl Default for DmHost {
    fn default() -> Self {
        DmHost::new()
    }
}

impl DmHost {
    /// A model with no device offered yet.
    pub fn new() -> DmHost {
        DmHost {
            endpoint: None,
            phase: Phase::Version,
            trans_id: 0,
            held: Vec::new(),
            returning: 0,
            wanted_balloon: None,
            wanted_unballoon: false,
            report: DmHostReport::default(),
        }
    }

    /// Offers the Dynamic Memory device on `bus`. Returns its relid.
    pub fn offer(&mut self, bus: &LoopbackBus) -> Result<u32, ServerError> {
        let relid = bus.offer(OfferSpec::new(device_class::DYNAMIC_MEMORY, DM_HOST_INSTANCE))?;
        self.report.relid = Some(relid);
        Ok(relid)
    }

    /// Asks the guest for `pages` pages as soon as the protocol is ready and no transaction is running.
    pub fn request_balloon(&mut self, pages: u32) {
        self.wanted_balloon = Some(pages);
    }

    /// Gives every page the model holds back to the guest as soon as no transaction is running.
    pub fn request_unballoon(&mut self) {
        self.wanted_unballoon = true;
    }

    /// Pages the model holds now.
    pub fn held_pages(&self) -> u64 {
        self.held.iter().map(|range| range.count).sum()
    }

    /// What the model saw.
    pub fn report(&self) -> &DmHostReport {
        &self.report
    }

    /// One line for logs.
    pub fn summary(&self) -> alloc::string::String {
        let r = &self.report;
        alloc::format!(
            "dynamic memory (relid {}): version {}, {} status reports (last available/committed {:?}), \
             {} pages taken in {} balloon(s), {} returned in {} unballoon(s), {} held, {} errors",
            r.relid.unwrap_or(0),
            r.version.map_or(alloc::string::String::from("none"), |v| alloc::format!("{}.{}", v >> 16, v & 0xFFFF)),
            r.status_reports,
            r.last_status,
            r.pages_taken,
            r.balloons_done,
            r.pages_returned,
            r.unballoons_done,
            self.held_pages(),
            r.errors,
        )
    }

    /// The host's turn: takes the endpoint once the guest opened the channel, handles what the guest sent, and
    /// starts requested work. Returns the messages handled.
    pub fn run(&mut self, bus: &LoopbackBus) -> usize {
        if self.endpoint.as_ref().is_some_and(ServerEndpoint::is_closed) {
            // The device resets after a close, as QEMU's does.
            *self = DmHost { report: core::mem::take(&mut self.report), ..DmHost::new() };
        }
        if self.endpoint.is_none() {
            self.endpoint = self.report.relid.and_then(|relid| bus.take_endpoint(relid));
        }
        let Some(endpoint) = self.endpoint.as_mut() else { return 0 };
        let mut packets = Vec::new();
        if endpoint.receive_owned(bus, &mut packets).is_err() {
            self.report.errors += 1;
        }
        let mut outgoing: Vec<Vec<u8>> = Vec::new();
        for packet in &packets {
            if packet.packet_type != PacketType::DATA_IN_BAND {
                self.report.errors += 1;
                continue;
            }
            self.handle(&packet.payload, &mut outgoing);
        }
        self.start_work(&mut outgoing);
        if let Some(endpoint) = self.endpoint.as_mut() {
            for message in &outgoing {
                if endpoint.send_in_band(0, message, false, bus).is_err() {
                    self.report.errors += 1;
                }
            }
        }
        packets.len()
    }

    fn next_trans_id(&mut self) -> u32 {
        self.trans_id = self.trans_id.wrapping_add(1);
        self.trans_id
    }

    fn handle(&mut self, payload: &[u8], outgoing: &mut Vec<Vec<u8>>) {
        let Ok((header, _)) = DmHeader::read_from_prefix(payload) else {
            self.report.errors += 1;
            return;
        };
        let size = usize::from(header.size.get());
        if size > payload.len() || size < core::mem::size_of::<DmHeader>() {
            self.report.errors += 1;
            return;
        }
        let message = &payload[..size];
        match (header.message_type(), self.phase) {
            (DmMessageType::VERSION_REQUEST, Phase::Version) => {
                let Ok((request, _)) = VersionRequest::read_from_prefix(message) else {
                    self.report.errors += 1;
                    return;
                };
                let accepted = VERSIONS.contains(&request.version.get());
                if accepted {
                    self.report.version = Some(request.version.get());
                    self.phase = Phase::Capabilities;
                }
                let response = VersionResponse {
                    header: DmHeader::new(DmMessageType::VERSION_RESPONSE, 16, header.trans_id.get()),
                    flags: U64::new(u64::from(accepted)),
                };
                outgoing.push(response.as_bytes().to_vec());
            }
            (DmMessageType::CAPABILITIES_REPORT, Phase::Capabilities) => {
                let Ok((report, _)) = CapabilitiesReport::read_from_prefix(message) else {
                    self.report.errors += 1;
                    return;
                };
                self.report.capabilities = Some(Capabilities::from_bits(report.caps.get()));
                self.phase = Phase::Ready;
                let response = CapabilitiesResponse {
                    header: DmHeader::new(DmMessageType::CAPABILITIES_RESPONSE, 16, header.trans_id.get()),
                    flags: U64::new(1),
                };
                outgoing.push(response.as_bytes().to_vec());
            }
            (DmMessageType::STATUS_REPORT, phase) if phase != Phase::Version => {
                let Ok((status, _)) = StatusReport::read_from_prefix(message) else {
                    self.report.errors += 1;
                    return;
                };
                self.report.status_reports += 1;
                self.report.last_status = Some((status.num_available.get(), status.num_committed.get()));
            }
            (DmMessageType::BALLOON_RESPONSE, Phase::Ballooning) => {
                let Ok((head, rest)) = BalloonResponseHeader::read_from_prefix(message) else {
                    self.report.errors += 1;
                    return;
                };
                let count = head.range_count() as usize;
                let Ok((ranges, _)) = <[WirePageRange]>::ref_from_prefix_with_elems(rest, count) else {
                    self.report.errors += 1;
                    return;
                };
                for range in ranges {
                    self.report.pages_taken += range.page_count();
                    self.held.push(range.range());
                }
                if !head.more_pages() {
                    self.report.balloons_done += 1;
                    self.phase = Phase::Ready;
                }
            }
            (DmMessageType::UNBALLOON_RESPONSE, Phase::Unballooning) => {
                self.report.pages_returned += self.returning;
                self.report.unballoons_done += 1;
                self.returning = 0;
                self.phase = Phase::Ready;
            }
            _ => self.report.errors += 1,
        }
    }

    fn start_work(&mut self, outgoing: &mut Vec<Vec<u8>>) {
        if self.phase != Phase::Ready {
            return;
        }
        if let Some(pages) = self.wanted_balloon.take() {
            let trans_id = self.next_trans_id();
            let request = BalloonRequest {
                header: DmHeader::new(DmMessageType::BALLOON_REQUEST, 16, trans_id),
                num_pages: U32::new(pages),
                reserved: U32::new(0),
            };
            outgoing.push(request.as_bytes().to_vec());
            self.phase = Phase::Ballooning;
        } else if core::mem::take(&mut self.wanted_unballoon) && !self.held.is_empty() {
            let ranges = core::mem::take(&mut self.held);
            self.returning = ranges.iter().map(|range| range.count).sum();
            let last = ranges.len() - 1;
            for (index, range) in ranges.into_iter().enumerate() {
                let Some(wire) = WirePageRange::new(range) else {
                    self.report.errors += 1;
                    continue;
                };
                let trans_id = self.next_trans_id();
                let head = UnballoonRequestHeader {
                    header: DmHeader::new(DmMessageType::UNBALLOON_REQUEST, 24, trans_id),
                    flags: U32::new(u32::from(index != last)),
                    range_count: U32::new(1),
                };
                let mut message = head.as_bytes().to_vec();
                message.extend_from_slice(wire.as_bytes());
                outgoing.push(message);
            }
            self.phase = Phase::Unballooning;
        }
    }
}
