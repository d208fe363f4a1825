//! The status words the server puts in GPADL_CREATED, OPENCHANNEL_RESULT and MODIFYCHANNEL_RESPONSE (§5).
//!
//! The protocol only says 0 is success. Hyper-V and OpenVMM answer with NTSTATUS values (OpenVMM sends
//! STATUS_UNSUCCESSFUL for a GPADL it refuses; QEMU sends 1 for a failed open); guests only test for non-zero.
//! This server picks a distinct NTSTATUS per reason so a guest's log says what was wrong; the reasons themselves
//! are [`GpadlRefusal`], [`OpenRefusal`] and [`ModifyRefusal`].

use crate::protocol::GpadlError;
use core::fmt;

/// STATUS_SUCCESS.
pub const SUCCESS: u32 = 0;
/// STATUS_UNSUCCESSFUL: a failure with no more specific code.
pub const UNSUCCESSFUL: u32 = 0xC000_0001;
/// STATUS_INVALID_PARAMETER: a malformed GPADL description, or ring pages and offsets that do not fit.
pub const INVALID_PARAMETER: u32 = 0xC000_000D;
/// STATUS_NO_SUCH_DEVICE: the relid names no channel offered to the guest.
pub const NO_SUCH_DEVICE: u32 = 0xC000_000E;
/// STATUS_ACCESS_DENIED: the ring GPADL belongs to another channel.
pub const ACCESS_DENIED: u32 = 0xC000_0022;
/// STATUS_OBJECT_NAME_COLLISION: the GPADL handle is already in use on this connection.
pub const OBJECT_NAME_COLLISION: u32 = 0xC000_0035;
/// STATUS_INSUFFICIENT_RESOURCES: too many GPADL descriptions are being assembled at once.
pub const INSUFFICIENT_RESOURCES: u32 = 0xC000_009A;
/// STATUS_INVALID_DEVICE_STATE: the channel is not in a state that allows the request (already open, not open).
pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
/// STATUS_NOT_FOUND: no complete GPADL has this handle.
pub const NOT_FOUND: u32 = 0xC000_0225;

/// Why the server answered a GPADL description with a failure status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpadlRefusal {
    /// The header names no channel currently offered to the guest.
    UnknownChannel,
    /// The handle is already used by a GPADL of this connection (complete or being assembled).
    DuplicateHandle,
    /// The header or a body is malformed, or the ranges do not add up.
    Malformed(GpadlError),
    /// A page lies at or above the configured guest PFN limit.
    PfnOutOfRange {
        /// The first offending page frame number.
        pfn: u64,
    },
    /// Too many descriptions are being assembled at once.
    TooManyPending,
}

impl GpadlRefusal {
    /// The `creation_status` sent in GPADL_CREATED.
    pub const fn status(self) -> u32 {
        match self {
            GpadlRefusal::UnknownChannel => NO_SUCH_DEVICE,
            GpadlRefusal::DuplicateHandle => OBJECT_NAME_COLLISION,
            GpadlRefusal::Malformed(_) | GpadlRefusal::PfnOutOfRange { .. } => INVALID_PARAMETER,
            GpadlRefusal::TooManyPending => INSUFFICIENT_RESOURCES,
        }
    }
}

impl fmt::Display for GpadlRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpadlRefusal::UnknownChannel => f.write_str("no such channel"),
            GpadlRefusal::DuplicateHandle => f.write_str("handle already in use"),
            GpadlRefusal::Malformed(e) => write!(f, "malformed description: {e}"),
            GpadlRefusal::PfnOutOfRange { pfn } => write!(f, "page {pfn:#x} is outside guest memory"),
            GpadlRefusal::TooManyPending => f.write_str("too many descriptions in progress"),
        }
    }
}

/// Why the server answered OPENCHANNEL with a failure status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenRefusal {
    /// The relid names no channel currently offered to the guest.
    UnknownChannel,
    /// The channel is already open (or being opened).
    AlreadyOpen,
    /// No complete GPADL has the ring handle (never created, still being assembled, or torn down).
    UnknownGpadl,
    /// The ring GPADL was created for another channel.
    ForeignGpadl,
    /// The ring GPADL is not one range of whole pages starting at offset 0.
    RingNotWholePages,
    /// The downstream offset leaves one of the two rings fewer pages than the configured minimum.
    BadDownstreamOffset,
    /// The channel's owner refused the open (see [`super::Server::complete_open`]) with this status.
    Device(u32),
}

impl OpenRefusal {
    /// The `status` sent in OPENCHANNEL_RESULT.
    pub const fn status(self) -> u32 {
        match self {
            OpenRefusal::UnknownChannel => NO_SUCH_DEVICE,
            OpenRefusal::AlreadyOpen => INVALID_DEVICE_STATE,
            OpenRefusal::UnknownGpadl => NOT_FOUND,
            OpenRefusal::ForeignGpadl => ACCESS_DENIED,
            OpenRefusal::RingNotWholePages | OpenRefusal::BadDownstreamOffset => INVALID_PARAMETER,
            OpenRefusal::Device(status) => status,
        }
    }
}

/// Why the server answered MODIFYCHANNEL with a failure status (≥ 5.3 only; older versions get no answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModifyRefusal {
    /// The relid names no channel currently offered to the guest.
    UnknownChannel,
    /// The channel is not open (or was rescinded).
    NotOpen,
}

impl ModifyRefusal {
    /// The `status` sent in MODIFYCHANNEL_RESPONSE.
    pub const fn status(self) -> u32 {
        match self {
            ModifyRefusal::UnknownChannel => NO_SUCH_DEVICE,
            ModifyRefusal::NotOpen => INVALID_DEVICE_STATE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_maps_to_a_non_zero_status() {
        let gpadl = [
            GpadlRefusal::UnknownChannel,
            GpadlRefusal::DuplicateHandle,
            GpadlRefusal::Malformed(GpadlError::NoRanges),
            GpadlRefusal::PfnOutOfRange { pfn: 1 },
            GpadlRefusal::TooManyPending,
        ];
        assert!(gpadl.iter().all(|r| r.status() != SUCCESS));
        let open = [
            OpenRefusal::UnknownChannel,
            OpenRefusal::AlreadyOpen,
            OpenRefusal::UnknownGpadl,
            OpenRefusal::ForeignGpadl,
            OpenRefusal::RingNotWholePages,
            OpenRefusal::BadDownstreamOffset,
        ];
        assert!(open.iter().all(|r| r.status() != SUCCESS));
        assert_eq!(OpenRefusal::Device(0xC000_00A3).status(), 0xC000_00A3);
        assert_eq!(ModifyRefusal::UnknownChannel.status(), NO_SUCH_DEVICE);
        assert_eq!(ModifyRefusal::NotOpen.status(), INVALID_DEVICE_STATE);
        assert_eq!(
            alloc::format!("{}", GpadlRefusal::PfnOutOfRange { pfn: 0x10 }),
            "page 0x10 is outside guest memory"
        );
    }
}
