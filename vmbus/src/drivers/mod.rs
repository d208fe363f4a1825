//! Device drivers written against the KMCL API alone ([`crate::kmcl::Kmcl`]), as a new driver author would write
//! them: the integration services (issue 8) and Dynamic Memory (issue 9). Each wraps a sans-I/O protocol module
//! ([`crate::ic`], [`crate::dm`]) in a KMCL channel.
//!
//! The kernel holds its drivers as [`Driver`]s: it starts each on its KMCL bus, calls [`Driver::tick`] from its
//! steady loop (timers such as the Dynamic Memory status report), and carries out what the drivers ask of the
//! machine ([`DriverRequest`]: power off, restart, set the wall clock), which the drivers cannot do themselves.
//!
//! The integration services: [`HeartbeatDriver`], [`ShutdownDriver`], [`TimeSyncDriver`] and [`KvpDriver`], one
//! [`ic::IcDriver`] each around the guest service of [`crate::ic`]. Their host side, for tests and the loopback bus,
//! is [`crate::server::devices::DeviceHost`].

pub mod dm;

pub mod heartbeat;
pub mod ic;
pub mod kvp;
pub mod shutdown;
pub mod timesync;

pub use heartbeat::HeartbeatDriver;
pub use kvp::KvpDriver;
pub use shutdown::ShutdownDriver;
pub use timesync::{MonotonicClock, TimeSyncDriver};

use crate::kmcl::{ChannelHandle, Kmcl, Result};
use crate::protocol::Guid;
use alloc::vec::Vec;

/// Something a driver needs the kernel to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverRequest {
    /// Power the machine off (the host's shutdown request). `forced`: the host does not wait for a clean stop.
    PowerOff {
        /// The request's force flag.
        forced: bool,
    },
    /// Restart the machine.
    Restart {
        /// The request's force flag.
        forced: bool,
    },
    /// Set the wall clock: at monotonic time `at_ns` (the clock [`Driver::tick`] gets), UNIX time was
    /// `unix_time_ns` nanoseconds.
    SetWallClock {
        /// Nanoseconds since 1970-01-01 00:00 UTC.
        unix_time_ns: i128,
        /// The kernel's monotonic time the value belongs to.
        at_ns: u64,
    },
}

/// A device driver the kernel runs (see the module documentation).
pub trait Driver: Send {
    /// A short name for the device table (for example `"heartbeat"`).
    fn name(&self) -> &'static str;

    /// The device class (offer interface type) the driver binds to.
    fn interface_type(&self) -> Guid;

    /// Allocates, initializes and enables the driver's channel: bound now if the host offers the device, or when
    /// the offer arrives. Returns the channel.
    fn start(&mut self, kmcl: &mut dyn Kmcl) -> Result<ChannelHandle>;

    /// Periodic work at the kernel's monotonic time `now_ns`; returns when the driver next wants to run (`None`:
    /// only when packets arrive).
    fn tick(&mut self, kmcl: &mut dyn Kmcl, now_ns: u64) -> Option<u64> {
        let _ = (kmcl, now_ns);
        None
    }

    /// Takes what the driver asks of the kernel since the last call.
    fn take_requests(&mut self) -> Vec<DriverRequest> {
        Vec::new()
    }

    /// One line of state for the device table and logs (for example the negotiated versions).
    fn status(&self) -> alloc::string::String {
        alloc::string::String::new()
    }

    /// The driver's channel while started (`None` before [`Driver::start`] and after [`Driver::stop`]).
    fn channel(&self) -> Option<ChannelHandle> {
        None
    }

    /// Disables and cleans up the channel (before power-off or restart).
    fn stop(&mut self, kmcl: &mut dyn Kmcl) -> Result<()>;
}
