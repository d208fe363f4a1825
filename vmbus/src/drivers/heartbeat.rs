//! The heartbeat driver: answers every host heartbeat with the sequence number plus one and the state "healthy".
//!
//! Reference: `hyperv-vmbus.md` §7 "Heartbeat" (host every ~2 s: seq_num u64 → reply seq_num + 1); the service is
//! [`crate::ic::HeartbeatService`], the KMCL channel [`super::ic::IcDriver`].
//!
//! ```text
//! let mut heartbeat = HeartbeatDriver::new();
//! heartbeat.start(&mut bus)?;          // binds to the heartbeat offer now or when it arrives
//! // ... the kernel's loop: bus interrupts and polls; heartbeat.status() for the device table
//! ```

use super::ic::{IcDriver, IcKind};
use crate::ic::HeartbeatService;
use crate::ic::heartbeat::HeartbeatAnswered;
use alloc::format;
use alloc::string::String;

/// The heartbeat part of [`HeartbeatDriver`]: the last sequence numbers seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// The last heartbeat answered: the host's number and the one sent back.
    pub last: Option<HeartbeatAnswered>,
    /// Heartbeats answered.
    pub answered: u64,
}

impl IcKind for Heartbeat {
    type Service = HeartbeatService;
    const NAME: &'static str = "heartbeat";

    fn on_action(&mut self, action: &HeartbeatAnswered) -> Option<super::DriverRequest> {
        self.last = Some(*action);
        self.answered += 1;
        None
    }

    fn status(&self) -> String {
        match self.last {
            Some(last) => {
                format!("{} heartbeats answered, last seq {} -> {}", self.answered, last.received, last.answered)
            }
            None => String::from("no heartbeat yet"),
        }
    }
}

/// The heartbeat driver (a [`super::Driver`]).
pub type HeartbeatDriver = IcDriver<Heartbeat>;

impl IcDriver<Heartbeat> {
    /// A heartbeat driver reporting the state "healthy", binding to any heartbeat offer.
    pub fn new() -> HeartbeatDriver {
        IcDriver::with_parts(HeartbeatService::new(), Heartbeat::default())
    }

    /// Heartbeats answered so far.
    pub fn answered(&self) -> u64 {
        self.inspect(|state| state.kind.answered)
    }

    /// The last heartbeat answered.
    pub fn last_heartbeat(&self) -> Option<HeartbeatAnswered> {
        self.inspect(|state| state.kind.last)
    }
}

impl Default for IcDriver<Heartbeat> {
    fn default() -> Self {
        HeartbeatDriver::new()
    }
}
