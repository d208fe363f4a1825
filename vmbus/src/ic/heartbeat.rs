//! Guest heartbeat service: answers each heartbeat with the sequence number plus one and the guest's state.
//!
//! Reference: `hyperv-vmbus.md` §7 "Heartbeat" (host every ~2 s: seq_num u64 → reply seq_num + 1); the state field
//! is OpenVMM's `application_state` (see the ⚠ on [`HeartbeatMessage`]).

use alloc::vec::Vec;

use zerocopy::byteorder::little_endian::{U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::framing::build_response;
use super::guest::{GuestChannel, IcAction, IcReply, IcResult, Received, negotiation_reply, require_body};
use super::negotiate::{FRAMEWORK_VERSIONS, HEARTBEAT_VERSIONS, NegotiatedVersions, VersionPreferences};
use super::wire::{ApplicationState, HeartbeatMessage, IcMessageType, IcStatus};

/// The heartbeat versions the guest supports (§7 "Versions").
pub const HEARTBEAT_PREFERENCES: VersionPreferences =
    VersionPreferences { framework: FRAMEWORK_VERSIONS, message: HEARTBEAT_VERSIONS };

/// Size of the heartbeat body the host models send (OpenVMM's [`HeartbeatMessage`]).
pub const HEARTBEAT_BODY_SIZE: usize = core::mem::size_of::<HeartbeatMessage>();

/// Body bytes the guest needs from a heartbeat request: the sequence number.
const HEARTBEAT_NEEDED: usize = 8;
/// Body bytes that hold the application state after the sequence number.
const WITH_STATE: usize = 12;

/// What a heartbeat asks of the kernel: nothing but bookkeeping.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatAnswered {
    /// The host's sequence number.
    pub received: u64,
    /// The number sent back (received + 1, wrapping).
    pub answered: u64,
}

/// The guest heartbeat service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeartbeatService {
    channel: GuestChannel,
    state: ApplicationState,
    answered: u64,
}

impl Default for HeartbeatService {
    fn default() -> Self {
        HeartbeatService::new()
    }
}

super::guest::impl_guest_service!(HeartbeatService, HeartbeatAnswered, HEARTBEAT);

impl HeartbeatService {
    /// A service reporting [`ApplicationState::HEALTHY`].
    pub const fn new() -> HeartbeatService {
        HeartbeatService {
            channel: GuestChannel::new(IcMessageType::HEARTBEAT, HEARTBEAT_PREFERENCES),
            state: ApplicationState::HEALTHY,
            answered: 0,
        }
    }

    /// Change the state reported in later answers.
    pub fn set_state(&mut self, state: ApplicationState) {
        self.state = state;
    }

    /// The versions in force, once negotiated.
    pub fn negotiated(&self) -> Option<NegotiatedVersions> {
        self.channel.negotiated()
    }

    /// How many heartbeats were answered.
    pub fn answered_count(&self) -> u64 {
        self.answered
    }

    /// Handle one received in-band payload.
    pub fn handle(&mut self, payload: &[u8]) -> IcResult<HeartbeatAnswered> {
        let (frame, _versions) = match self.channel.receive(payload)? {
            Received::Message { frame, versions } => (frame, versions),
            Received::Negotiation { outcome, response } => return Ok(negotiation_reply(outcome, response)),
        };
        let body = require_body(&frame, HEARTBEAT_NEEDED)?;
        let mut answer: Vec<u8> = body.to_vec();
        let received = U64::read_from_prefix(body).map(|(v, _)| v.get()).unwrap_or(0);
        let answered = received.wrapping_add(1);
        answer[..8].copy_from_slice(U64::new(answered).as_bytes());
        if answer.len() >= WITH_STATE {
            answer[8..WITH_STATE].copy_from_slice(U32::new(self.state.0).as_bytes());
        }
        self.answered += 1;
        Ok(IcReply {
            action: IcAction::Service(HeartbeatAnswered { received, answered }),
            response: Some(build_response(&frame.header, IcStatus::OK, &answer)),
        })
    }
}

/// Decode a heartbeat body (host side of the tests): sequence number and, when present, the state.
pub fn decode_heartbeat(body: &[u8]) -> Option<(u64, Option<ApplicationState>)> {
    let (seq, rest) = U64::read_from_prefix(body).ok()?;
    let state = U32::read_from_prefix(rest).ok().map(|(s, _)| ApplicationState(s.get()));
    Some((seq.get(), state))
}
