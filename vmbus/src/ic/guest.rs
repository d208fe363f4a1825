//! What every guest-side IC service shares: the result types of a handler ("bytes in → action, bytes out"), the
//! errors, and [`GuestChannel`], which frames a received payload, answers NEGOTIATE and checks that a message may
//! be handed to the service.
//!
//! Reference: `hyperv-vmbus.md` §7. A KMCL driver wraps a service in a few lines: on each in-band packet call the
//! service's `handle`, send `response` (if any) as an in-band packet carrying the request's VMBus transaction id
//! (§7: "as type 6 with the request's trans_id"), then carry out the action.

use alloc::vec::Vec;
use core::fmt;

use super::framing::{FrameError, IcFrame, build_response};
use super::negotiate::{NegotiatedVersions, NegotiationFailure, VersionPreferences, answer_negotiate};
use super::wire::{IcFlags, IcMessageType, IcStatus};
use crate::protocol::guid::Guid;

/// What a handled message asks of the kernel, common part and service part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IcAction<A> {
    /// A NEGOTIATE was answered with these versions; the service is now ready.
    Negotiated(NegotiatedVersions),
    /// A NEGOTIATE was answered with the empty answer; the service stays unusable until the host tries again.
    NegotiationFailed(NegotiationFailure),
    /// A service message was handled.
    Service(A),
}

/// The outcome of a message that was handled: the action, and the bytes to send back (if the message asks for an
/// answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcReply<A> {
    /// What the kernel should do.
    pub action: IcAction<A>,
    /// The whole response payload (pipe header, IC header, body) to send as an in-band packet.
    pub response: Option<Vec<u8>>,
}

/// Why a received message was not handled.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum IcError {
    /// Not a well-formed IC message.
    Frame(FrameError),
    /// The message is a response (RESPONSE flag set); a guest service only receives requests.
    UnexpectedResponse(IcMessageType),
    /// A service message arrived before a successful NEGOTIATE.
    NotNegotiated(IcMessageType),
    /// A message type this service does not handle.
    UnknownMessageType(IcMessageType),
    /// The body is shorter than the message type needs.
    BodyTooShort {
        /// The message type.
        message_type: IcMessageType,
        /// Body bytes present.
        len: usize,
        /// Body bytes needed.
        needed: usize,
    },
    /// A request the service understands but refuses (e.g. hibernate, an unknown KVP operation).
    Unsupported(IcMessageType),
}

impl fmt::Display for IcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            IcError::Frame(e) => write!(f, "{e}"),
            IcError::UnexpectedResponse(t) => write!(f, "unexpected IC response of type {t:?}"),
            IcError::NotNegotiated(t) => write!(f, "IC message {t:?} before version negotiation"),
            IcError::UnknownMessageType(t) => write!(f, "IC message type {t:?} not handled by this service"),
            IcError::BodyTooShort { message_type, len, needed } => {
                write!(f, "IC message {message_type:?}: body of {len} bytes, {needed} needed")
            }
            IcError::Unsupported(t) => write!(f, "IC request {t:?} not supported"),
        }
    }
}

impl core::error::Error for IcError {}

impl From<FrameError> for IcError {
    fn from(e: FrameError) -> IcError {
        IcError::Frame(e)
    }
}

/// A message that was not handled, and, when the message was well formed and asked for an answer, the error
/// response to send anyway (status E_FAIL or NOT_SUPPORTED) so the host does not wait for one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcFailure {
    /// Why.
    pub error: IcError,
    /// The error response to send, if any.
    pub response: Option<Vec<u8>>,
}

impl IcFailure {
    /// A failure with nothing to answer.
    pub fn silent(error: IcError) -> IcFailure {
        IcFailure { error, response: None }
    }

    /// A failure answered with `status`, echoing the request's body, when the request asked for an answer
    /// (TRANSACTION flag); silent otherwise.
    pub fn answered(error: IcError, frame: &IcFrame<'_>, status: IcStatus) -> IcFailure {
        let asked = frame.header.flags().contains(IcFlags::TRANSACTION);
        IcFailure { error, response: asked.then(|| build_response(&frame.header, status, frame.body)) }
    }
}

impl fmt::Display for IcFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.error)?;
        if self.response.is_some() {
            f.write_str(" (answered with an error status)")?;
        }
        Ok(())
    }
}

/// The result of a service's `handle`.
pub type IcResult<A> = Result<IcReply<A>, IcFailure>;

/// What every guest IC service offers a channel driver: the offer class it binds to (§8) and "bytes in → action,
/// bytes out". A KMCL driver can be written once, generic over this trait.
pub trait GuestIcService {
    /// The service-specific action of a handled message.
    type Action;
    /// The device class GUID of the offers this service serves (§8).
    const INTERFACE_ID: Guid;
    /// Handle one received in-band payload.
    fn handle(&mut self, payload: &[u8]) -> IcResult<Self::Action>;
    /// The versions in force, once negotiated.
    fn negotiated(&self) -> Option<NegotiatedVersions>;
}

/// Implement [`GuestIcService`] for a service whose inherent `handle`/`negotiated` have the trait's shape.
macro_rules! impl_guest_service {
    ($service:ty, $action:ty, $class:ident) => {
        impl $crate::ic::guest::GuestIcService for $service {
            type Action = $action;
            const INTERFACE_ID: $crate::protocol::guid::Guid = $crate::protocol::guid::device_class::$class;
            fn handle(&mut self, payload: &[u8]) -> $crate::ic::guest::IcResult<$action> {
                <$service>::handle(self, payload)
            }
            fn negotiated(&self) -> Option<$crate::ic::negotiate::NegotiatedVersions> {
                <$service>::negotiated(self)
            }
        }
    };
}
pub(crate) use impl_guest_service;

/// What [`GuestChannel::receive`] found in a payload.
#[derive(Debug)]
pub enum Received<'a> {
    /// A NEGOTIATE, already answered.
    Negotiation {
        /// The outcome.
        outcome: Result<NegotiatedVersions, NegotiationFailure>,
        /// The answer to send.
        response: Vec<u8>,
    },
    /// A request of the service's type, after negotiation, for the service to handle.
    Message {
        /// The request.
        frame: IcFrame<'a>,
        /// The versions in force.
        versions: NegotiatedVersions,
    },
}

/// The reply a service returns for an answered NEGOTIATE.
pub fn negotiation_reply<A>(outcome: Result<NegotiatedVersions, NegotiationFailure>, response: Vec<u8>) -> IcReply<A> {
    let action = match outcome {
        Ok(v) => IcAction::Negotiated(v),
        Err(e) => IcAction::NegotiationFailed(e),
    };
    IcReply { action, response: Some(response) }
}

/// The negotiation state of one guest IC channel, and the checks every service message goes through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestChannel {
    preferences: VersionPreferences,
    service_type: IcMessageType,
    negotiated: Option<NegotiatedVersions>,
}

impl GuestChannel {
    /// A channel for the service whose messages have type `service_type`, supporting `preferences`.
    pub const fn new(service_type: IcMessageType, preferences: VersionPreferences) -> GuestChannel {
        GuestChannel { preferences, service_type, negotiated: None }
    }

    /// The versions in force, once negotiated.
    pub fn negotiated(&self) -> Option<NegotiatedVersions> {
        self.negotiated
    }

    /// Frame `payload`, answer a NEGOTIATE (a new one replaces the versions in force; a failed one clears them), or
    /// check a service message: it must be a request, arrive after negotiation, and have the service's type.
    pub fn receive<'a>(&mut self, payload: &'a [u8]) -> Result<Received<'a>, IcFailure> {
        let frame = IcFrame::parse(payload).map_err(|e| IcFailure::silent(e.into()))?;
        let message_type = frame.header.message_type();
        if frame.header.flags().contains(IcFlags::RESPONSE) {
            return Err(IcFailure::silent(IcError::UnexpectedResponse(message_type)));
        }
        if message_type == IcMessageType::NEGOTIATE {
            let (outcome, response) = answer_negotiate(&self.preferences, &frame);
            self.negotiated = outcome.ok();
            return Ok(Received::Negotiation { outcome, response });
        }
        if message_type != self.service_type {
            return Err(IcFailure::answered(
                IcError::UnknownMessageType(message_type),
                &frame,
                IcStatus::NOT_SUPPORTED,
            ));
        }
        let Some(versions) = self.negotiated else {
            return Err(IcFailure::answered(IcError::NotNegotiated(message_type), &frame, IcStatus::FAIL));
        };
        Ok(Received::Message { frame, versions })
    }
}

/// The body of `frame` as at least `needed` bytes, or the E_FAIL failure.
pub(crate) fn require_body<'a>(frame: &IcFrame<'a>, needed: usize) -> Result<&'a [u8], IcFailure> {
    if frame.body.len() < needed {
        let error = IcError::BodyTooShort { message_type: frame.header.message_type(), len: frame.body.len(), needed };
        return Err(IcFailure::answered(error, frame, IcStatus::FAIL));
    }
    Ok(frame.body)
}
