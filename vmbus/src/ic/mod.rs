//! Integration components (IC): heartbeat, shutdown, timesync and KVP, both ends, as sans-I/O code.
//!
//! Reference: `hyperv-vmbus.md` §7 (framing, negotiation, the four services) and §8 (their class GUIDs, in
//! [`crate::protocol::guid::device_class`]). Every piece takes the payload of a received in-band packet and returns
//! a typed action plus the bytes to send back, so a KMCL driver wraps a service in a few lines:
//!
//! ```text
//! match service.handle(payload) {
//!     Ok(reply) => { if let Some(r) = reply.response { send_inband(r, request_trans_id) } act(reply.action) }
//!     Err(failure) => { log(failure.error); if let Some(r) = failure.response { send_inband(r, request_trans_id) } }
//! }
//! ```
//!
//! - [`wire`]: the wire structs (pipe header, IC header, negotiate, heartbeat, shutdown, timesync v1/v4, KVP).
//! - [`framing`]: splitting a payload into header and body, building messages and responses.
//! - [`negotiate`]: the version lists and the choice of versions.
//! - [`guest`]: what the guest services share (results, errors, the negotiation state of a channel).
//! - [`heartbeat`], [`shutdown`], [`timesync`], [`kvp`]: the guest services.
//! - [`host`]: the host-side device models, for tests and the loopback bus.

pub mod framing;
pub mod guest;
pub mod heartbeat;
pub mod host;
pub mod kvp;
pub mod negotiate;
pub mod shutdown;
pub mod timesync;
pub mod wire;

#[cfg(test)]
mod tests;

pub use guest::{IcAction, IcError, IcFailure, IcReply, IcResult};
pub use heartbeat::HeartbeatService;
pub use kvp::KvpService;
pub use shutdown::ShutdownService;
pub use timesync::TimeSyncService;
