//! The shutdown driver: answers the host's shutdown request, then asks the kernel to power off or restart.
//!
//! Reference: `hyperv-vmbus.md` §7 "Shutdown" (flags bit 0 force, 1 restart, 2 hibernate → reply S_OK then act);
//! the service is [`crate::ic::ShutdownService`] (hibernate and unknown flag combinations are answered E_FAIL and
//! not acted on), the KMCL channel [`super::ic::IcDriver`]. The [`DriverRequest::PowerOff`] or
//! [`DriverRequest::Restart`] reaches [`super::Driver::take_requests`] only once the S_OK answer is in the ring.

use super::DriverRequest;
use super::ic::{IcDriver, IcKind};
use crate::ic::ShutdownService;
use crate::ic::shutdown::{ShutdownKind, ShutdownRequest};
use alloc::format;
use alloc::string::String;

/// The shutdown part of [`ShutdownDriver`]: the last request accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shutdown {
    /// The last shutdown request accepted.
    pub last: Option<ShutdownRequest>,
}

impl IcKind for Shutdown {
    type Service = ShutdownService;
    const NAME: &'static str = "shutdown";

    fn on_action(&mut self, action: &ShutdownRequest) -> Option<DriverRequest> {
        self.last = Some(*action);
        Some(match action.kind {
            ShutdownKind::PowerOff => DriverRequest::PowerOff { forced: action.forced },
            ShutdownKind::Restart => DriverRequest::Restart { forced: action.forced },
        })
    }

    fn status(&self) -> String {
        match self.last {
            Some(request) => format!(
                "{:?} requested (forced: {}, reason {:#x}, {} s)",
                request.kind, request.forced, request.reason_code, request.timeout_seconds
            ),
            None => String::from("no shutdown requested"),
        }
    }
}

/// The shutdown driver (a [`super::Driver`]).
pub type ShutdownDriver = IcDriver<Shutdown>;

impl IcDriver<Shutdown> {
    /// A shutdown driver binding to any shutdown offer.
    pub fn new() -> ShutdownDriver {
        IcDriver::with_parts(ShutdownService::new(), Shutdown::default())
    }

    /// The last shutdown request accepted.
    pub fn last_request(&self) -> Option<ShutdownRequest> {
        self.inspect(|state| state.kind.last)
    }
}

impl Default for IcDriver<Shutdown> {
    fn default() -> Self {
        ShutdownDriver::new()
    }
}
