//! VMBus protocol versions and what each one allows.
//!
//! Reference: `hyperv-vmbus.md` §5 ("Versions", "Connection ids") and §4 (event flags from 2.4 on).

use core::fmt;

use super::{MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_V5};

/// A VMBus protocol version as carried in INITIATE_CONTACT: `major << 16 | minor` (§5).
///
/// Open: any `u32` is representable, so a version a host reports that this crate does not name still round-trips.
/// Ordering compares the raw value, which orders by major then minor.
#[derive(Copy, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmbusVersion(pub u32);

impl VmbusVersion {
    /// 0.13, Windows Server 2008.
    pub const V0_13: VmbusVersion = VmbusVersion::new(0, 13);
    /// 1.1, Windows 7 / Server 2008 R2.
    pub const V1_1: VmbusVersion = VmbusVersion::new(1, 1);
    /// 2.4, Windows 8 / Server 2012 (per-channel event flags).
    pub const V2_4: VmbusVersion = VmbusVersion::new(2, 4);
    /// 3.0, Windows 8.1 / Server 2012 R2.
    pub const V3_0: VmbusVersion = VmbusVersion::new(3, 0);
    /// 4.0, Windows 10 (the newest QEMU's host accepts).
    pub const V4_0: VmbusVersion = VmbusVersion::new(4, 0);
    /// 4.1, Windows 10 RS3 (MODIFYCHANNEL).
    pub const V4_1: VmbusVersion = VmbusVersion::new(4, 1);
    /// 5.0, Windows 10 RS3 update (connection id 4, message SINT, `msg_conn_id`).
    pub const V5_0: VmbusVersion = VmbusVersion::new(5, 0);
    /// 5.1, Windows 10 RS4.
    pub const V5_1: VmbusVersion = VmbusVersion::new(5, 1);
    /// 5.2, Windows Server 2019 (RS5).
    pub const V5_2: VmbusVersion = VmbusVersion::new(5, 2);
    /// 5.3, Windows Server 2022 (MODIFYCHANNEL_RESPONSE).
    pub const V5_3: VmbusVersion = VmbusVersion::new(5, 3);
    /// 6.0, OpenVMM's "Copper" (feature flags in the version exchange); the Gen2 firmware negotiates it.
    pub const V6_0: VmbusVersion = VmbusVersion::new(6, 0);

    /// The versions a client offers in INITIATE_CONTACT, newest first (§5); it moves to the next one when the host
    /// answers `version_supported = 0` or refuses the message with INVALID_CONNECTION_ID.
    pub const CLIENT_NEGOTIATION_ORDER: [VmbusVersion; 8] = [
        VmbusVersion::V5_3,
        VmbusVersion::V5_2,
        VmbusVersion::V5_1,
        VmbusVersion::V5_0,
        VmbusVersion::V4_1,
        VmbusVersion::V4_0,
        VmbusVersion::V3_0,
        VmbusVersion::V2_4,
    ];

    /// Every version named above, oldest first.
    pub const KNOWN: [VmbusVersion; 11] = [
        VmbusVersion::V0_13,
        VmbusVersion::V1_1,
        VmbusVersion::V2_4,
        VmbusVersion::V3_0,
        VmbusVersion::V4_0,
        VmbusVersion::V4_1,
        VmbusVersion::V5_0,
        VmbusVersion::V5_1,
        VmbusVersion::V5_2,
        VmbusVersion::V5_3,
        VmbusVersion::V6_0,
    ];

    /// Builds `major << 16 | minor`.
    pub const fn new(major: u16, minor: u16) -> VmbusVersion {
        VmbusVersion(((major as u32) << 16) | minor as u32)
    }

    /// The major number (high 16 bits).
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// The minor number (low 16 bits).
    pub const fn minor(self) -> u16 {
        self.0 as u16
    }

    /// Whether this is one of the versions named in §5.
    pub fn is_known(self) -> bool {
        VmbusVersion::KNOWN.contains(&self)
    }

    /// The version to try after `self` was refused, following [`Self::CLIENT_NEGOTIATION_ORDER`]; `None` when the
    /// list is exhausted (or `self` is not in it).
    pub fn next_older_to_try(self) -> Option<VmbusVersion> {
        let position = VmbusVersion::CLIENT_NEGOTIATION_ORDER
            .iter()
            .position(|&v| v == self)?;
        VmbusVersion::CLIENT_NEGOTIATION_ORDER
            .get(position + 1)
            .copied()
    }

    /// The SynIC connection id INITIATE_CONTACT must be posted to when requesting this version (§5): 4 for ≥ 5.0,
    /// else 1. A host older than 5.0 refuses connection id 4 with INVALID_CONNECTION_ID.
    pub const fn initiate_contact_connection_id(self) -> u32 {
        if self.0 >= VmbusVersion::V5_0.0 {
            MESSAGE_CONNECTION_ID_V5
        } else {
            MESSAGE_CONNECTION_ID
        }
    }

    /// ≥ 5.0: the host's VERSION_RESPONSE carries `msg_conn_id`, the connection id for all later messages (§5).
    pub const fn has_msg_conn_id(self) -> bool {
        self.0 >= VmbusVersion::V5_0.0
    }

    /// ≥ 5.0: INITIATE_CONTACT carries `msg_sint`/`msg_vtl` where older versions carry the interrupt page (§5).
    pub const fn uses_msg_sint(self) -> bool {
        self.0 >= VmbusVersion::V5_0.0
    }

    /// ≥ 2.4: the host signals a channel by setting bit `child_relid` in the SINT's event flags; older versions
    /// use bit 0 plus the shared interrupt page (§4).
    pub const fn has_per_channel_event_flags(self) -> bool {
        self.0 >= VmbusVersion::V2_4.0
    }

    /// ≥ 4.1: MODIFYCHANNEL (retarget a channel's interrupt VP) may be sent (§5).
    pub const fn supports_modify_channel(self) -> bool {
        self.0 >= VmbusVersion::V4_1.0
    }

    /// ≥ 5.3: the host acknowledges MODIFYCHANNEL with MODIFYCHANNEL_RESPONSE (§5).
    pub const fn has_modify_channel_response(self) -> bool {
        self.0 >= VmbusVersion::V5_3.0
    }

    /// ≥ 4.0: a channel's GPADLs must be torn down only after its CLOSECHANNEL (§5, illumos note).
    pub const fn requires_gpadl_teardown_after_close(self) -> bool {
        self.0 >= VmbusVersion::V4_0.0
    }
}

impl fmt::Display for VmbusVersion {
    /// `major.minor`, e.g. `5.3` or `0.13`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major(), self.minor())
    }
}

impl fmt::Debug for VmbusVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VmbusVersion({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn raw_values() {
        assert_eq!(VmbusVersion::V0_13.0, 0x0000_000d);
        assert_eq!(VmbusVersion::V1_1.0, 0x0001_0001);
        assert_eq!(VmbusVersion::V2_4.0, 0x0002_0004);
        assert_eq!(VmbusVersion::V3_0.0, 0x0003_0000);
        assert_eq!(VmbusVersion::V4_0.0, 0x0004_0000);
        assert_eq!(VmbusVersion::V4_1.0, 0x0004_0001);
        assert_eq!(VmbusVersion::V5_0.0, 0x0005_0000);
        assert_eq!(VmbusVersion::V5_3.0, 0x0005_0003);
        assert_eq!(VmbusVersion::V6_0.0, 0x0006_0000);
        assert_eq!(VmbusVersion(0x0005_0002), VmbusVersion::V5_2);
    }

    #[test]
    fn display_and_parts() {
        assert_eq!(VmbusVersion::V0_13.to_string(), "0.13");
        assert_eq!(VmbusVersion::V5_3.to_string(), "5.3");
        assert_eq!(VmbusVersion(0xffff_ffff).to_string(), "65535.65535");
        assert_eq!(VmbusVersion::V2_4.major(), 2);
        assert_eq!(VmbusVersion::V2_4.minor(), 4);
    }

    #[test]
    fn negotiation_order_is_newest_first_and_walks_down() {
        let order = VmbusVersion::CLIENT_NEGOTIATION_ORDER;
        assert!(order.windows(2).all(|pair| pair[0] > pair[1]));
        assert_eq!(order[0], VmbusVersion::V5_3);
        assert_eq!(order[7], VmbusVersion::V2_4);
        let mut walked = alloc::vec![order[0]];
        while let Some(next) = walked.last().unwrap().next_older_to_try() {
            walked.push(next);
        }
        assert_eq!(walked, order);
        assert_eq!(VmbusVersion::V6_0.next_older_to_try(), None);
        assert!(VmbusVersion::KNOWN.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(VmbusVersion::V4_1.is_known());
        assert!(!VmbusVersion::new(4, 2).is_known());
    }

    #[test]
    fn per_version_rules() {
        for version in VmbusVersion::KNOWN {
            let v5 = version >= VmbusVersion::V5_0;
            assert_eq!(
                version.initiate_contact_connection_id(),
                if v5 { 4 } else { 1 },
                "{version}"
            );
            assert_eq!(version.has_msg_conn_id(), v5);
            assert_eq!(version.uses_msg_sint(), v5);
        }
        assert!(!VmbusVersion::V1_1.has_per_channel_event_flags());
        assert!(VmbusVersion::V2_4.has_per_channel_event_flags());
        assert!(!VmbusVersion::V4_0.supports_modify_channel());
        assert!(VmbusVersion::V4_1.supports_modify_channel());
        assert!(!VmbusVersion::V5_2.has_modify_channel_response());
        assert!(VmbusVersion::V5_3.has_modify_channel_response());
        assert!(!VmbusVersion::V3_0.requires_gpadl_teardown_after_close());
        assert!(VmbusVersion::V4_0.requires_gpadl_teardown_after_close());
        assert_eq!(VmbusVersion::V4_1.initiate_contact_connection_id(), 1);
        assert_eq!(VmbusVersion::V5_0.initiate_contact_connection_id(), 4);
    }
}
