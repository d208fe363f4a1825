//! Guest shutdown service: answers the host's shutdown request and tells the kernel whether to power off or
//! restart, forced or not.
//!
//! Reference: `hyperv-vmbus.md` §7 "Shutdown" (reason u32, timeout_s u32, flags u32: bit 0 force, 1 restart,
//! 2 hibernate → reply S_OK then act). As Linux `shutdown_onchannelcallback`, only the flag values 0/1 (power off),
//! 2/3 (restart) are accepted; hibernate (4/5) and any other combination are answered with E_FAIL, since this
//! kernel cannot hibernate.

use zerocopy::FromBytes;
use zerocopy::byteorder::little_endian::U32;

use super::framing::build_response;
use super::guest::{
    GuestChannel, IcAction, IcError, IcFailure, IcReply, IcResult, Received, negotiation_reply, require_body,
};
use super::negotiate::{FRAMEWORK_VERSIONS, NegotiatedVersions, SHUTDOWN_VERSIONS, VersionPreferences};
use super::wire::{IcMessageType, IcStatus, SHUTDOWN_FIXED_SIZE, ShutdownFlags};

/// The shutdown versions the guest supports (§7 "Versions").
pub const SHUTDOWN_PREFERENCES: VersionPreferences =
    VersionPreferences { framework: FRAMEWORK_VERSIONS, message: SHUTDOWN_VERSIONS };

/// What the machine must do.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ShutdownKind {
    /// Power off (ACPI S5).
    PowerOff,
    /// Restart.
    Restart,
}

/// A shutdown the kernel must carry out once the response is sent.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ShutdownRequest {
    /// Power off or restart.
    pub kind: ShutdownKind,
    /// Forced: do not wait for anything.
    pub forced: bool,
    /// The host's reason code.
    pub reason_code: u32,
    /// Seconds the host grants.
    pub timeout_seconds: u32,
}

/// Decode the fixed part of a shutdown body: reason, timeout, flags.
pub fn decode_shutdown(body: &[u8]) -> Option<(u32, u32, ShutdownFlags)> {
    let (fields, _) = <[U32; 3]>::read_from_prefix(body).ok()?;
    Some((fields[0].get(), fields[1].get(), ShutdownFlags::from_bits_retain(fields[2].get())))
}

/// The action for a flags value, `None` for what this kernel refuses.
pub fn shutdown_kind(flags: ShutdownFlags) -> Option<(ShutdownKind, bool)> {
    let forced = flags.contains(ShutdownFlags::FORCE);
    match flags.difference(ShutdownFlags::FORCE) {
        f if f.is_empty() => Some((ShutdownKind::PowerOff, forced)),
        f if f == ShutdownFlags::RESTART => Some((ShutdownKind::Restart, forced)),
        _ => None,
    }
}

/// The guest shutdown service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShutdownService {
    channel: GuestChannel,
}

impl Default for ShutdownService {
    fn default() -> Self {
        ShutdownService::new()
    }
}

super::guest::impl_guest_service!(ShutdownService, ShutdownRequest, SHUTDOWN);

impl ShutdownService {
    /// A new service, not yet negotiated.
    pub const fn new() -> ShutdownService {
        ShutdownService { channel: GuestChannel::new(IcMessageType::SHUTDOWN, SHUTDOWN_PREFERENCES) }
    }

    /// The versions in force, once negotiated.
    pub fn negotiated(&self) -> Option<NegotiatedVersions> {
        self.channel.negotiated()
    }

    /// Handle one received in-band payload. On success the response (S_OK, the request's body echoed) must be sent
    /// before the kernel acts on the [`ShutdownRequest`].
    pub fn handle(&mut self, payload: &[u8]) -> IcResult<ShutdownRequest> {
        let frame = match self.channel.receive(payload)? {
            Received::Message { frame, .. } => frame,
            Received::Negotiation { outcome, response } => return Ok(negotiation_reply(outcome, response)),
        };
        let body = require_body(&frame, SHUTDOWN_FIXED_SIZE)?;
        let Some((reason_code, timeout_seconds, flags)) = decode_shutdown(body) else {
            return Err(IcFailure::answered(
                IcError::BodyTooShort {
                    message_type: IcMessageType::SHUTDOWN,
                    len: body.len(),
                    needed: SHUTDOWN_FIXED_SIZE,
                },
                &frame,
                IcStatus::FAIL,
            ));
        };
        let Some((kind, forced)) = shutdown_kind(flags) else {
            return Err(IcFailure::answered(IcError::Unsupported(IcMessageType::SHUTDOWN), &frame, IcStatus::FAIL));
        };
        Ok(IcReply {
            action: IcAction::Service(ShutdownRequest { kind, forced, reason_code, timeout_seconds }),
            response: Some(build_response(&frame.header, IcStatus::OK, frame.body)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_map_to_actions() {
        assert_eq!(shutdown_kind(ShutdownFlags::empty()), Some((ShutdownKind::PowerOff, false)));
        assert_eq!(shutdown_kind(ShutdownFlags::FORCE), Some((ShutdownKind::PowerOff, true)));
        assert_eq!(shutdown_kind(ShutdownFlags::RESTART), Some((ShutdownKind::Restart, false)));
        assert_eq!(shutdown_kind(ShutdownFlags::RESTART | ShutdownFlags::FORCE), Some((ShutdownKind::Restart, true)));
        assert_eq!(shutdown_kind(ShutdownFlags::HIBERNATE), None);
        assert_eq!(shutdown_kind(ShutdownFlags::HIBERNATE | ShutdownFlags::RESTART), None);
        assert_eq!(shutdown_kind(ShutdownFlags::from_bits_retain(8)), None);
    }
}
