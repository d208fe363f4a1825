//! The drivers the main job runs, and the device models of the loopback host (issue 8 §6–7, issue 9).
//!
//! Drivers live in `vmbus::drivers`, written against the KMCL API only; this module constructs them with what the
//! kernel provides (its clock, its frame allocator, the guest's identity for KVP).

use crate::bus::{BusError, loopback};
use crate::cmdline::Cmdline;
use alloc::boxed::Box;
use alloc::vec::Vec;
use vmbus::drivers::Driver;
use vmbus::server::ServerConfig;

/// The drivers for a real host.
pub fn for_host() -> Vec<Box<dyn Driver>> {
    Vec::new()
}

/// The drivers for the loopback host.
pub fn for_loopback() -> Vec<Box<dyn Driver>> {
    Vec::new()
}

/// Starts the loopback host with its device models.
pub fn start_loopback(_cmdline: &Cmdline) -> Result<loopback::LoopbackKmclBus, BusError> {
    loopback::start(ServerConfig::new(), |_| {}, None)
}
