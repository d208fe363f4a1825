//! What kind of VMBus host the server plays: accepted versions, connection ids, response form, limits.
//!
//! Reference: `hyperv-vmbus.md` §5 ("Connection ids", "Versions", VERSION_RESPONSE) and §3 (INVALID_CONNECTION_ID).

use alloc::vec::Vec;

use crate::hv::hypercall::HvError;
use crate::protocol::{MESSAGE_CONNECTION_ID, MESSAGE_CONNECTION_ID_V5, Message, VmbusVersion, parse};

/// How the server behaves as a host. The presets model the hosts the client meets: [`ServerConfig::new`] a
/// Windows Server 2022-like Hyper-V, [`ServerConfig::qemu`] QEMU's VMBus host, [`ServerConfig::old_host`] a host
/// that predates protocol 5.0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// The versions INITIATE_CONTACT may request; any other is answered with `version_supported = 0` (§5).
    pub versions: Vec<VmbusVersion>,
    /// The connection id returned in VERSION_RESPONSE for versions ≥ 5.0; the guest posts every later message
    /// there. The server accepts messages on it (besides 1 and, if enabled, 4).
    pub msg_conn_id: u32,
    /// Whether the host has connection id 4, which ≥ 5.0 guests post INITIATE_CONTACT to. An older host has no
    /// such connection, so the guest's PostMessage fails with INVALID_CONNECTION_ID (§3, §5).
    pub accepts_connection_id_4: bool,
    /// Whether an INITIATE_CONTACT requesting a version ≥ 5.0 is refused with INVALID_CONNECTION_ID at PostMessage
    /// time when it arrives on any connection id but 4. ⚠ OpenVMM instead accepts such a request and uses SINT 2;
    /// this rule makes a guest that posts to the wrong id fail visibly.
    pub refuse_v5_contact_off_connection_id_4: bool,
    /// Send the 10-byte VERSION_RESPONSE of QEMU (header, `version_supported`, `connection_state`) instead of the
    /// 16-byte form with `msg_conn_id`.
    pub short_version_response: bool,
    /// Offers carry `connection_id = event_connection_id_base + relid`, the id the guest signals the channel on.
    /// It must not collide with the message connection ids. (QEMU uses 16 + relid.)
    pub event_connection_id_base: u32,
    /// Fewest pages each ring of an opened channel may have, header page included (§6). The default 2 (a header
    /// and one data page) is QEMU's rule: it refuses a downstream offset ≤ 1 or ≥ pages − 1.
    pub min_ring_pages: u32,
    /// If set, a GPADL naming a page frame at or above this limit is refused (guest memory ends there).
    pub guest_pfn_limit: Option<u64>,
}

impl ServerConfig {
    /// The versions a Hyper-V host of the Windows Server 2022 era accepts, newest first: 5.3 down to 2.4 as the
    /// client proposes them, and the WS2008 / Win7 versions 0.13 and 1.1 (§5). 6.0 is left out: it adds feature
    /// flags to the version exchange that this server does not implement.
    pub const DEFAULT_VERSIONS: [VmbusVersion; 10] = {
        let client = VmbusVersion::CLIENT_NEGOTIATION_ORDER;
        let mut all = [VmbusVersion::V0_13; 10];
        let mut i = 0;
        while i < client.len() {
            all[i] = client[i];
            i += 1;
        }
        all[client.len()] = VmbusVersion::V1_1;
        all
    };
    /// Default `msg_conn_id`: connection id 4 again (the host's choice; any non-zero id works).
    pub const DEFAULT_MSG_CONN_ID: u32 = MESSAGE_CONNECTION_ID_V5;
    /// Default first event connection id (relid 1 signals on 0x2001).
    pub const DEFAULT_EVENT_CONNECTION_ID_BASE: u32 = 0x2000;
    /// Default [`min_ring_pages`](Self::min_ring_pages).
    pub const DEFAULT_MIN_RING_PAGES: u32 = 2;

    /// A Windows Server 2022-like Hyper-V: [`Self::DEFAULT_VERSIONS`], connection id 4 present, the full
    /// VERSION_RESPONSE with `msg_conn_id` 4.
    pub fn new() -> ServerConfig {
        ServerConfig {
            versions: ServerConfig::DEFAULT_VERSIONS.to_vec(),
            msg_conn_id: ServerConfig::DEFAULT_MSG_CONN_ID,
            accepts_connection_id_4: true,
            refuse_v5_contact_off_connection_id_4: true,
            short_version_response: false,
            event_connection_id_base: ServerConfig::DEFAULT_EVENT_CONNECTION_ID_BASE,
            min_ring_pages: ServerConfig::DEFAULT_MIN_RING_PAGES,
            guest_pfn_limit: None,
        }
    }

    /// Like QEMU's VMBus host (§5): versions up to 4.0 only, no connection id 4, everything on connection id 1,
    /// and the short VERSION_RESPONSE.
    pub fn qemu() -> ServerConfig {
        ServerConfig {
            msg_conn_id: MESSAGE_CONNECTION_ID,
            accepts_connection_id_4: false,
            short_version_response: true,
            ..ServerConfig::old_host(VmbusVersion::V4_0)
        }
    }

    /// A host whose newest version is `newest`: it accepts the known versions up to it, and has connection id 4
    /// only if `newest` ≥ 5.0.
    pub fn old_host(newest: VmbusVersion) -> ServerConfig {
        let versions = ServerConfig::DEFAULT_VERSIONS.iter().copied().filter(|&v| v <= newest).collect();
        ServerConfig { versions, accepts_connection_id_4: newest >= VmbusVersion::V5_0, ..ServerConfig::new() }
    }

    /// Whether INITIATE_CONTACT for `version` is accepted.
    pub fn accepts(&self, version: VmbusVersion) -> bool {
        self.versions.contains(&version)
    }

    /// Whether any accepted version is ≥ 5.0 (and so `msg_conn_id` is handed out).
    pub fn speaks_v5(&self) -> bool {
        self.versions.iter().any(|v| v.has_msg_conn_id())
    }

    /// The connection ids the guest may post control messages to, ascending: 1, 4 if
    /// [`accepts_connection_id_4`](Self::accepts_connection_id_4), and `msg_conn_id` if a ≥ 5.0 version is
    /// accepted.
    pub fn message_connection_ids(&self) -> Vec<u32> {
        let mut ids = alloc::vec![MESSAGE_CONNECTION_ID];
        ids.extend(
            [MESSAGE_CONNECTION_ID_V5, self.msg_conn_id].into_iter().filter(|&id| self.has_message_connection_id(id)),
        );
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Whether the guest may post control messages to `connection_id` (see
    /// [`message_connection_ids`](Self::message_connection_ids)).
    pub fn has_message_connection_id(&self, connection_id: u32) -> bool {
        connection_id == MESSAGE_CONNECTION_ID
            || (connection_id == MESSAGE_CONNECTION_ID_V5 && self.accepts_connection_id_4)
            || (connection_id == self.msg_conn_id && connection_id != 0 && self.speaks_v5())
    }

    /// The host's decision at PostMessage time, before the message takes one of the port's buffers (§3):
    /// INVALID_CONNECTION_ID for a connection id the host does not have, and for an INITIATE_CONTACT requesting a
    /// version ≥ 5.0 posted anywhere but connection id 4 (when
    /// [`refuse_v5_contact_off_connection_id_4`](Self::refuse_v5_contact_off_connection_id_4) is set).
    /// Everything else is accepted here, malformed payloads included: the server counts those when it reads them.
    pub fn check_post(&self, connection_id: u32, payload: &[u8]) -> Result<(), HvError> {
        if !self.has_message_connection_id(connection_id) {
            return Err(HvError::INVALID_CONNECTION_ID);
        }
        if let Ok(Message::InitiateContact(contact)) = parse(payload)
            && contact.version().has_msg_conn_id()
            && connection_id != MESSAGE_CONNECTION_ID_V5
            && self.refuse_v5_contact_off_connection_id_4
        {
            return Err(HvError::INVALID_CONNECTION_ID);
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{InitiateContact, MessageBuffer, RequestOffers};

    fn contact(version: VmbusVersion) -> MessageBuffer {
        MessageBuffer::from_message(&InitiateContact::new(version, 0, 0, 0, 0))
    }

    #[test]
    fn presets() {
        let ws2022 = ServerConfig::new();
        assert!(ws2022.accepts(VmbusVersion::V5_3) && ws2022.accepts(VmbusVersion::V0_13));
        assert!(!ws2022.accepts(VmbusVersion::V6_0));
        assert_eq!(ws2022.message_connection_ids(), [1, 4]);

        let qemu = ServerConfig::qemu();
        assert_eq!(
            qemu.versions,
            [VmbusVersion::V4_0, VmbusVersion::V3_0, VmbusVersion::V2_4, VmbusVersion::V1_1, VmbusVersion::V0_13]
        );
        assert_eq!(qemu.message_connection_ids(), [1]);
        assert!(qemu.short_version_response);

        let rs3 = ServerConfig::old_host(VmbusVersion::V4_1);
        assert!(!rs3.accepts_connection_id_4 && rs3.accepts(VmbusVersion::V4_1) && !rs3.accepts(VmbusVersion::V5_0));
        assert_eq!(rs3.message_connection_ids(), [1], "no msg_conn_id without a 5.x version");

        let custom = ServerConfig { msg_conn_id: 0x0080_0074, ..ServerConfig::new() };
        assert_eq!(custom.message_connection_ids(), [1, 4, 0x0080_0074]);
        assert_eq!(ServerConfig::default(), ServerConfig::new());
    }

    #[test]
    fn connection_id_rules_at_post_time() {
        let ws2022 = ServerConfig::new();
        assert_eq!(ws2022.check_post(4, contact(VmbusVersion::V5_3).as_bytes()), Ok(()));
        assert_eq!(
            ws2022.check_post(1, contact(VmbusVersion::V5_0).as_bytes()),
            Err(HvError::INVALID_CONNECTION_ID),
            "≥ 5.0 must come on connection id 4"
        );
        assert_eq!(ws2022.check_post(1, contact(VmbusVersion::V4_1).as_bytes()), Ok(()));
        assert_eq!(ws2022.check_post(4, contact(VmbusVersion::V4_0).as_bytes()), Ok(()), "as OpenVMM");
        assert_eq!(ws2022.check_post(7, contact(VmbusVersion::V4_0).as_bytes()), Err(HvError::INVALID_CONNECTION_ID));
        assert_eq!(ws2022.check_post(1, &[1, 2, 3]), Ok(()), "malformed payloads are the server's to count");
        let requests = MessageBuffer::from_message(&RequestOffers::new());
        assert_eq!(ws2022.check_post(4, requests.as_bytes()), Ok(()));

        let lenient = ServerConfig { refuse_v5_contact_off_connection_id_4: false, ..ServerConfig::new() };
        assert_eq!(lenient.check_post(1, contact(VmbusVersion::V5_0).as_bytes()), Ok(()));

        let old = ServerConfig::old_host(VmbusVersion::V4_0);
        assert_eq!(old.check_post(4, contact(VmbusVersion::V5_3).as_bytes()), Err(HvError::INVALID_CONNECTION_ID));
        assert_eq!(old.check_post(4, requests.as_bytes()), Err(HvError::INVALID_CONNECTION_ID));
    }
}
