//! The KVP driver: answers the host's pool queries from a table given at construction (OS name, version, kernel
//! build, integration services version... what Hyper-V Manager shows), and keeps what the host writes to its pools.
//!
//! Reference: `hyperv-vmbus.md` §7 (KVP, message type 2, versions 4.0/3.0/1.0); the service is
//! [`crate::ic::KvpService`] (layouts and key names there), the KMCL channel [`super::ic::IcDriver`].

use super::DriverRequest;
use super::ic::{IcDriver, IcKind};
use crate::ic::KvpService;
use crate::ic::kvp::{GuestIntrinsics, KvpAction, KvpEntry};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// The KVP part of [`KvpDriver`]: counters of the operations served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kvp {
    /// ENUMERATE requests answered with an entry.
    pub enumerated: u64,
    /// ENUMERATE requests answered "no more" (the end of a pool query).
    pub enumeration_ends: u64,
    /// GET requests answered.
    pub got: u64,
    /// SET and DELETE requests applied.
    pub written: u64,
}

impl IcKind for Kvp {
    type Service = KvpService;
    const NAME: &'static str = "kvp";

    fn on_action(&mut self, action: &KvpAction) -> Option<DriverRequest> {
        match action {
            KvpAction::Enumerated { found: true, .. } => self.enumerated += 1,
            KvpAction::Enumerated { found: false, .. } => self.enumeration_ends += 1,
            KvpAction::Got { .. } => self.got += 1,
            KvpAction::Set { .. } | KvpAction::Deleted { .. } => self.written += 1,
        }
        None
    }

    fn status(&self) -> String {
        format!(
            "{} entries enumerated, {} pool queries ended, {} gets, {} writes",
            self.enumerated, self.enumeration_ends, self.got, self.written
        )
    }
}

/// The KVP driver (a [`super::Driver`]).
pub type KvpDriver = IcDriver<Kvp>;

impl IcDriver<Kvp> {
    /// A KVP driver publishing `intrinsics` in the AUTO pool (index order of Linux's daemon), binding to any KVP
    /// offer.
    pub fn new(intrinsics: &GuestIntrinsics) -> KvpDriver {
        IcDriver::with_parts(KvpService::with_intrinsics(intrinsics), Kvp::default())
    }

    /// A KVP driver publishing `entries` in the AUTO pool, in this order.
    pub fn with_entries(entries: Vec<KvpEntry>) -> KvpDriver {
        IcDriver::with_parts(KvpService::new(entries), Kvp::default())
    }

    /// The operation counters.
    pub fn served(&self) -> Kvp {
        self.inspect(|state| state.kind)
    }
}
