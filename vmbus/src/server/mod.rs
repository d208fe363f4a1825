//! The host (server) side of VMBus: answer a guest's control messages, offer and rescind channels, accept GPADLs
//! and channel opens — so that this crate can be the VMBus host in tests, for loopback channels inside the
//! unikernel, and later for a paravisor or VMM.
//!
//! Reference: `hyperv-vmbus.md` §5 (control protocol), §3 (PostMessage statuses and the 16 buffers per port),
//! §4 (SynIC message slot), §6 (ring GPADL split); issue 7 §1 and §3.
//!
//! - [`Server`] is the control-protocol state machine, free of I/O: each guest message in through
//!   [`Server::handle_message`], answers out through [`Server::pop_outgoing`], work for channel owners through
//!   [`Server::pop_event`]. Its rules where the protocol leaves a choice are listed on the type.
//! - [`ServerConfig`] says which host it plays (Windows Server 2022-like, QEMU-like, pre-5.0), including the
//!   PostMessage-time refusals of INITIATE_CONTACT on the wrong connection id ([`ServerConfig::check_post`]).
//! - [`OfferSpec`] describes a channel to offer; [`OpenChannelInfo`] is what an accepted OPENCHANNEL established
//!   (the ring GPADL's pages and their split), for the ring layer to map.
//! - [`status`] holds the failure statuses and their reasons.
//! - [`endpoint`]: [`ServerEndpoint`], the host's end of an open channel — the rings in the host's orientation over
//!   [`crate::memory::GuestMemory`], send and receive with the §6 signalling rules, the guest signalled through
//!   [`GuestSignal`].
//! - The server-only GPADL mapping of the KMCL ([`Server::map_gpadl`], [`Server::unmap_gpadl`], [`MappedGpadl`]):
//!   read-only rule, one mapping at a time, teardown held until unmapped.
//! - [`loopback`] wires a server and the simulated hypervisor into the client's [`crate::client::VmbusTransport`],
//!   so the guest's [`crate::client::Connection`] runs against this server.

mod channel;
mod config;
mod control;
pub mod devices;
pub mod dm_host;
pub mod endpoint;
pub mod loopback;
mod mapping;
pub mod status;

#[cfg(test)]
mod tests;

pub use channel::{
    ChannelStatus, ChannelSummary, MAX_RELID, MONITOR_ID_COUNT, OfferSpec, OpenChannelInfo, ServerGpadl,
};
pub use config::ServerConfig;
pub use control::{
    ConnectionInfo, DisconnectReason, MAX_PENDING_GPADLS, MAX_QUEUED_EVENTS, Server, ServerError, ServerEvent,
    ServerStats,
};
pub use endpoint::{EndpointCloser, EndpointError, EndpointStats, GuestSignal, ReceivedPacket, ServerEndpoint};
pub use loopback::{FaultPlan, FaultStats, LoopbackBus};
pub use mapping::{MapGpadlError, MapGpadlFlags, MappedGpadl};
pub use status::{GpadlRefusal, ModifyRefusal, OpenRefusal};
