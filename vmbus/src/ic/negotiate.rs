//! IC version negotiation: the version lists of each service, choosing the pair to use from the host's NEGOTIATE,
//! the answer (chosen pair, or the empty answer), and the host's side (request and reading the answer).
//!
//! Reference: `hyperv-vmbus.md` §7 "Negotiate body" and "Versions". The choice follows Linux
//! `vmbus_prep_negotiate_resp`: walk our own list in preference order and take the first version the host also
//! lists, separately for the framework and the message version; a NEGOTIATE whose counts exceed 100 or the body is
//! answered like a mismatch. The answer always carries a 16-byte body (`icmsgsize` 0x10): counts 1/1 and the two
//! chosen versions, or counts 0/0 and zero versions (⚠ Linux leaves the host's counts in the version slots of a
//! failed answer; the counts are what a host reads).

use alloc::vec::Vec;

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use super::framing::{IcFrame, MessageFields, build_message, build_response};
use super::wire::{IcFlags, IcMessageType, IcStatus, IcVersion, MAX_NEGOTIATE_VERSION_COUNT, NegotiateMessage};

/// Framework 3.0 (§7 "Versions").
pub const FRAMEWORK_3_0: IcVersion = IcVersion::new(3, 0);
/// Framework 1.0 (Windows Server 2008).
pub const FRAMEWORK_1_0: IcVersion = IcVersion::new(1, 0);

/// Framework versions, newest first (§7 "Versions").
pub const FRAMEWORK_VERSIONS: &[IcVersion] = &[FRAMEWORK_3_0, FRAMEWORK_1_0];
/// Heartbeat message versions, newest first.
pub const HEARTBEAT_VERSIONS: &[IcVersion] = &[IcVersion::new(3, 0), IcVersion::new(1, 0)];
/// Shutdown message versions, newest first.
pub const SHUTDOWN_VERSIONS: &[IcVersion] =
    &[IcVersion::new(3, 2), IcVersion::new(3, 1), IcVersion::new(3, 0), IcVersion::new(1, 0)];
/// Timesync message versions, newest first (4.0 adds the reference time, [`super::wire::TimeSyncMessageV4`]).
pub const TIMESYNC_VERSIONS: &[IcVersion] = &[IcVersion::new(4, 0), IcVersion::new(3, 0), IcVersion::new(1, 0)];
/// KVP message versions, newest first.
pub const KVP_VERSIONS: &[IcVersion] = &[IcVersion::new(4, 0), IcVersion::new(3, 0), IcVersion::new(1, 0)];

/// Size of the body of a NEGOTIATE answer (§7: `icmsgsize` 0x10).
pub const NEGOTIATE_RESPONSE_BODY_SIZE: usize = 16;

/// The versions one side supports, each list in preference order (newest first).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VersionPreferences {
    /// Framework versions.
    pub framework: &'static [IcVersion],
    /// Message versions of the service.
    pub message: &'static [IcVersion],
}

/// The pair of versions both sides agreed on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct NegotiatedVersions {
    /// Framework version.
    pub framework: IcVersion,
    /// Message version.
    pub message: IcVersion,
}

/// Why a NEGOTIATE got the empty answer.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NegotiationFailure {
    /// The body is shorter than its counts say, or a count exceeds [`MAX_NEGOTIATE_VERSION_COUNT`].
    Malformed,
    /// No framework version in common.
    NoCommonFramework,
    /// No message version in common.
    NoCommonMessageVersion,
}

/// The version lists of a NEGOTIATE body, checked against its length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferedVersions {
    /// Framework versions as listed.
    pub framework: Vec<IcVersion>,
    /// Message versions as listed.
    pub message: Vec<IcVersion>,
}

impl OfferedVersions {
    /// Read the counts and lists of a NEGOTIATE body. `None` when malformed.
    pub fn parse(body: &[u8]) -> Option<OfferedVersions> {
        let (fixed, rest) = NegotiateMessage::read_from_prefix(body).ok()?;
        let framework_count = fixed.framework_version_count.get();
        let message_count = fixed.message_version_count.get();
        if framework_count > MAX_NEGOTIATE_VERSION_COUNT || message_count > MAX_NEGOTIATE_VERSION_COUNT {
            return None;
        }
        let (framework, rest) = <[IcVersion]>::ref_from_prefix_with_elems(rest, usize::from(framework_count)).ok()?;
        let (message, _) = <[IcVersion]>::ref_from_prefix_with_elems(rest, usize::from(message_count)).ok()?;
        Some(OfferedVersions { framework: framework.to_vec(), message: message.to_vec() })
    }
}

/// The first of `ours` (preference order) that `theirs` also lists.
pub fn first_common(ours: &[IcVersion], theirs: &[IcVersion]) -> Option<IcVersion> {
    ours.iter().copied().find(|v| theirs.contains(v))
}

/// Choose the versions to answer a NEGOTIATE body with.
pub fn choose_versions(
    preferences: &VersionPreferences,
    body: &[u8],
) -> Result<NegotiatedVersions, NegotiationFailure> {
    let offered = OfferedVersions::parse(body).ok_or(NegotiationFailure::Malformed)?;
    let framework =
        first_common(preferences.framework, &offered.framework).ok_or(NegotiationFailure::NoCommonFramework)?;
    let message =
        first_common(preferences.message, &offered.message).ok_or(NegotiationFailure::NoCommonMessageVersion)?;
    Ok(NegotiatedVersions { framework, message })
}

/// The 16-byte body of a NEGOTIATE answer: counts 1/1 and the chosen pair, or counts 0/0 and zeros.
pub fn negotiate_response_body(chosen: Option<NegotiatedVersions>) -> [u8; NEGOTIATE_RESPONSE_BODY_SIZE] {
    let (count, framework, message) = match chosen {
        Some(v) => (1, v.framework, v.message),
        None => (0, IcVersion::new(0, 0), IcVersion::new(0, 0)),
    };
    let fixed = NegotiateMessage {
        framework_version_count: U16::new(count),
        message_version_count: U16::new(count),
        reserved: U32::ZERO,
    };
    let mut body = [0u8; NEGOTIATE_RESPONSE_BODY_SIZE];
    body[..8].copy_from_slice(fixed.as_bytes());
    body[8..12].copy_from_slice(framework.as_bytes());
    body[12..16].copy_from_slice(message.as_bytes());
    body
}

/// Answer a host's NEGOTIATE frame: the outcome and the whole response message (status S_OK either way, as Linux).
pub fn answer_negotiate(
    preferences: &VersionPreferences,
    request: &IcFrame<'_>,
) -> (Result<NegotiatedVersions, NegotiationFailure>, Vec<u8>) {
    let outcome = choose_versions(preferences, request.body);
    let body = negotiate_response_body(outcome.ok());
    (outcome, build_response(&request.header, IcStatus::OK, &body))
}

/// The host's NEGOTIATE request listing `framework` then `message` versions, header versions zero, flags
/// TRANSACTION | REQUEST (as OpenVMM's IC devices send it).
pub fn negotiate_request(framework: &[IcVersion], message: &[IcVersion], transaction_id: u8) -> Vec<u8> {
    let fixed = NegotiateMessage {
        framework_version_count: U16::new(u16::try_from(framework.len()).unwrap_or(u16::MAX)),
        message_version_count: U16::new(u16::try_from(message.len()).unwrap_or(u16::MAX)),
        reserved: U32::ZERO,
    };
    let mut body = Vec::new();
    body.extend_from_slice(fixed.as_bytes());
    body.extend_from_slice(framework.as_bytes());
    body.extend_from_slice(message.as_bytes());
    let fields = MessageFields {
        framework_version: IcVersion::new(0, 0),
        message_type: IcMessageType::NEGOTIATE,
        message_version: IcVersion::new(0, 0),
        status: IcStatus::OK,
        transaction_id,
        flags: IcFlags::TRANSACTION | IcFlags::REQUEST,
    };
    build_message(&fields, &body)
}

/// Read a guest's NEGOTIATE answer body: `Some` pair for counts 1/1, `None` for the empty answer or a malformed one.
pub fn parse_negotiate_response(body: &[u8]) -> Option<NegotiatedVersions> {
    let offered = OfferedVersions::parse(body)?;
    match (offered.framework.as_slice(), offered.message.as_slice()) {
        ([framework], [message]) => Some(NegotiatedVersions { framework: *framework, message: *message }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEARTBEAT: VersionPreferences =
        VersionPreferences { framework: FRAMEWORK_VERSIONS, message: HEARTBEAT_VERSIONS };

    fn body(framework: &[IcVersion], message: &[IcVersion]) -> Vec<u8> {
        negotiate_request(framework, message, 0)[28..].to_vec()
    }

    #[test]
    fn newest_common_pair_is_chosen_whatever_the_host_order() {
        let b = body(&[FRAMEWORK_1_0, FRAMEWORK_3_0], &[IcVersion::new(1, 0), IcVersion::new(3, 0)]);
        assert_eq!(
            choose_versions(&HEARTBEAT, &b),
            Ok(NegotiatedVersions { framework: FRAMEWORK_3_0, message: IcVersion::new(3, 0) })
        );
        let old = body(&[FRAMEWORK_1_0], &[IcVersion::new(1, 0), IcVersion::new(2, 0)]);
        assert_eq!(
            choose_versions(&HEARTBEAT, &old),
            Ok(NegotiatedVersions { framework: FRAMEWORK_1_0, message: IcVersion::new(1, 0) })
        );
    }

    #[test]
    fn mismatches_and_malformed_bodies_fail() {
        let b = body(&[IcVersion::new(2, 0)], &[IcVersion::new(3, 0)]);
        assert_eq!(choose_versions(&HEARTBEAT, &b), Err(NegotiationFailure::NoCommonFramework));
        let b = body(&[FRAMEWORK_3_0], &[IcVersion::new(9, 9)]);
        assert_eq!(choose_versions(&HEARTBEAT, &b), Err(NegotiationFailure::NoCommonMessageVersion));
        let b = body(&[FRAMEWORK_3_0], &[IcVersion::new(3, 0)]);
        assert_eq!(choose_versions(&HEARTBEAT, &b[..b.len() - 1]), Err(NegotiationFailure::Malformed));
        let mut too_many = b.clone();
        too_many[0..2].copy_from_slice(&101u16.to_le_bytes());
        assert_eq!(choose_versions(&HEARTBEAT, &too_many), Err(NegotiationFailure::Malformed));
        assert_eq!(choose_versions(&HEARTBEAT, &[]), Err(NegotiationFailure::Malformed));
    }

    #[test]
    fn answer_body_layout() {
        let ok = negotiate_response_body(Some(NegotiatedVersions {
            framework: FRAMEWORK_3_0,
            message: IcVersion::new(3, 2),
        }));
        assert_eq!(ok, [1, 0, 1, 0, 0, 0, 0, 0, 3, 0, 0, 0, 3, 0, 2, 0]);
        assert_eq!(negotiate_response_body(None), [0; 16]);
        assert_eq!(
            parse_negotiate_response(&ok),
            Some(NegotiatedVersions { framework: FRAMEWORK_3_0, message: IcVersion::new(3, 2) })
        );
        assert_eq!(parse_negotiate_response(&[0; 16]), None);
    }

    #[test]
    fn answer_to_a_frame_is_a_response_with_icmsgsize_16() {
        let request = negotiate_request(FRAMEWORK_VERSIONS, HEARTBEAT_VERSIONS, 5);
        let frame = IcFrame::parse(&request).unwrap();
        let (outcome, response) = answer_negotiate(&HEARTBEAT, &frame);
        assert!(outcome.is_ok());
        let answer = IcFrame::parse(&response).unwrap();
        assert_eq!(answer.header.message_size.get(), 0x10);
        assert_eq!(answer.header.flags, 5);
        assert_eq!(answer.header.transaction_id, 5);
        assert_eq!(answer.header.message_type(), IcMessageType::NEGOTIATE);
    }
}
