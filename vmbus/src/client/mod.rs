//! The guest (client) side of VMBus: connect to the host, learn its channel offers, describe memory to it (GPADLs)
//! and open and close channels.
//!
//! Reference: `hyperv-vmbus.md` §5 (control protocol), §6 (rings), §9 (monitor pages); issue 5.
//!
//! - [`VmbusTransport`] is everything the client needs from the platform: post a message, take the next message the
//!   host sent, signal an event, read a clock and wait. The kernel implements it with hypercalls and the SynIC; the
//!   host tests implement it with a scripted host or the simulated hypervisor.
//! - [`Connection`] runs the control protocol. Its requests are synchronous: each posts a message and waits for the
//!   host's answer with a time limit, handling offers and rescinds that arrive in between. A host that never answers
//!   gives [`ClientError::Timeout`], never a hang.
//! - [`Offer`] is a validated copy of an OFFERCHANNEL message.

mod connection;
mod offer;

#[cfg(test)]
pub(crate) mod fake_host;
#[cfg(test)]
mod tests;

pub use connection::{ConnectOptions, Connection, ConnectionStats, Event, GpadlId, VersionAttempt};
pub use offer::Offer;

use crate::hv::hypercall::{Delay, HvError, Hypercalls};
use crate::protocol::{ConnectionState, GpadlError, MAX_MESSAGE_SIZE, MessageType, VmbusVersion};
use core::fmt;

/// What the VMBus client needs from the platform, on top of the hypercalls and a delay for the PostMessage retry
/// policy.
pub trait VmbusTransport: Hypercalls + Delay {
    /// Takes the next VMBus message the host sent (SINT 2), copying its payload into `buf`; returns its length.
    /// Returns `None` when no message is waiting. The implementation completes the SynIC end-of-message protocol.
    fn poll_message(&self, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize>;

    /// A monotonic clock in nanoseconds, for time limits.
    fn now_ns(&self) -> u64;

    /// Waits until something may have happened (the next interrupt in a kernel; in tests, the fake host's turn).
    fn wait(&self);
}

/// Why a client request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientError {
    /// A hypercall failed for good (after the retry policy).
    Hypercall(HvError),
    /// The host did not send the awaited message within the time limit.
    Timeout {
        /// What the client was waiting for.
        waiting_for: MessageType,
    },
    /// The host accepted none of the versions offered.
    NoVersionAccepted,
    /// The host accepted a version but reported a failed connection.
    ConnectionRefused(ConnectionState),
    /// The host's VERSION_RESPONSE for a version ≥ 5.0 lacked a usable message connection id.
    MissingMessageConnectionId,
    /// The request needs a newer protocol version than the one negotiated.
    NotSupported {
        /// The negotiated version.
        version: VmbusVersion,
    },
    /// No offer has this relid.
    UnknownChannel(u32),
    /// The channel is in the wrong state for the request (for example opening an open channel).
    InvalidState(u32),
    /// The host rescinded the channel.
    Rescinded(u32),
    /// The host refused to create the GPADL (`creation_status`).
    GpadlCreationFailed(u32),
    /// The GPADL request is malformed (page count, offsets).
    Gpadl(GpadlError),
    /// The GPADL handle is not one this connection created (or it was torn down).
    UnknownGpadl(u32),
    /// OPENCHANNEL user data longer than 120 bytes.
    UserDataTooLong(usize),
    /// The host refused to open the channel (OPENCHANNEL_RESULT status).
    OpenFailed(u32),
    /// The host refused MODIFYCHANNEL (MODIFYCHANNEL_RESPONSE status).
    ModifyFailed(u32),
    /// The connection was unloaded.
    Unloaded,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Hypercall(e) => write!(f, "hypercall failed: {e:?}"),
            Self::Timeout { waiting_for } => write!(f, "timed out waiting for {waiting_for}"),
            Self::NoVersionAccepted => write!(f, "the host accepted no VMBus version"),
            Self::ConnectionRefused(state) => write!(f, "the host refused the connection (state {})", state.0),
            Self::MissingMessageConnectionId => write!(f, "VERSION_RESPONSE lacks the message connection id"),
            Self::NotSupported { version } => write!(f, "not supported by VMBus {version}"),
            Self::UnknownChannel(relid) => write!(f, "no channel with relid {relid}"),
            Self::InvalidState(relid) => write!(f, "channel {relid} is in the wrong state"),
            Self::Rescinded(relid) => write!(f, "channel {relid} was rescinded"),
            Self::GpadlCreationFailed(status) => write!(f, "the host refused the GPADL (status {status:#x})"),
            Self::Gpadl(e) => write!(f, "invalid GPADL: {e}"),
            Self::UnknownGpadl(handle) => write!(f, "unknown GPADL {handle:#x}"),
            Self::UserDataTooLong(len) => write!(f, "{len} bytes of open user data; at most 120"),
            Self::OpenFailed(status) => write!(f, "the host refused to open the channel (status {status:#x})"),
            Self::ModifyFailed(status) => write!(f, "the host refused MODIFYCHANNEL (status {status:#x})"),
            Self::Unloaded => write!(f, "the VMBus connection was unloaded"),
        }
    }
}

impl core::error::Error for ClientError {}

impl From<HvError> for ClientError {
    fn from(e: HvError) -> Self {
        ClientError::Hypercall(e)
    }
}

impl From<GpadlError> for ClientError {
    fn from(e: GpadlError) -> Self {
        ClientError::Gpadl(e)
    }
}
