//! The server's control-protocol state machine (§5): no I/O, one guest message in, answers out.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use core::fmt;

use zerocopy::byteorder::little_endian::{U16, U64};

use super::channel::{
    ChannelStatus, ChannelSummary, MAX_RELID, MONITOR_ID_COUNT, OfferSpec, OpenChannelInfo, ServerGpadl,
};
use super::config::ServerConfig;
use super::mapping::{GpadlAccess, MapGpadlError, MapGpadlFlags, MappedGpadl};
use super::status::{self, GpadlRefusal, ModifyRefusal, OpenRefusal};
use crate::hv::hypercall::HvError;
use crate::protocol::{
    AllOffersDelivered, ConnectionState, ControlMessage, GpadlAssembler, GpadlBody, GpadlCreated, GpadlHeader,
    GpadlTorndown, InitiateContact, Message, MessageBuffer, ModifyChannelResponse, OfferChannel, OpenChannel,
    OpenChannelResult, RescindChannelOffer, UnloadResponse, VMBUS_MESSAGE_SINT, VersionResponse, VmbusVersion, parse,
};

/// Most GPADL descriptions the server assembles at once; a further GPADL_HEADER is refused with
/// [`GpadlRefusal::TooManyPending`]. Each costs at most 64 KiB (`range_buflen` is a u16).
pub const MAX_PENDING_GPADLS: usize = 64;

/// Most undrained [`ServerEvent`]s kept; older ones are dropped (and counted) beyond this.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// The negotiated connection, as the server keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The accepted version.
    pub version: VmbusVersion,
    /// The connection id INITIATE_CONTACT arrived on.
    pub contact_connection_id: u32,
    /// The VP the guest wants control messages on.
    pub target_vcpu: u32,
    /// The interrupt page GPA (versions below 5.0 carry it; Linux sends it even when unused).
    pub interrupt_page: Option<u64>,
    /// The monitor pages (parent → child, child → parent), when the guest gave them.
    pub monitor_pages: Option<(u64, u64)>,
    /// The connection id handed out in VERSION_RESPONSE (versions ≥ 5.0).
    pub msg_conn_id: Option<u32>,
    /// Whether REQUESTOFFERS was answered on this connection (later offers go out at once).
    pub offers_sent: bool,
}

/// Why the connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The guest sent UNLOAD.
    Unload,
    /// The guest sent INITIATE_CONTACT again (a new connection replaces the old one, as in QEMU and OpenVMM).
    Reconnect,
}

/// Something the channel owners (device models, the ring layer) must act on. Drained with
/// [`Server::pop_event`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerEvent {
    /// A version was negotiated.
    Connected {
        /// The version.
        version: VmbusVersion,
    },
    /// The connection ended: every channel was closed and every GPADL dropped.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// REQUESTOFFERS was answered with this many offers and ALLOFFERS_DELIVERED.
    OffersSent {
        /// Offers sent.
        count: usize,
    },
    /// A GPADL was accepted.
    GpadlCreated {
        /// Its channel.
        relid: u32,
        /// Its handle.
        gpadl: u32,
    },
    /// A GPADL description was refused with a failure status.
    GpadlRefused {
        /// The channel the header named.
        relid: u32,
        /// The handle.
        gpadl: u32,
        /// Why.
        reason: GpadlRefusal,
    },
    /// A GPADL was torn down (GPADL_TORNDOWN sent); its pages must no longer be touched.
    GpadlTornDown {
        /// Its channel.
        relid: u32,
        /// Its handle.
        gpadl: u32,
    },
    /// A valid OPENCHANNEL waits for [`Server::complete_open`].
    OpenRequested {
        /// The channel.
        relid: u32,
    },
    /// The channel is open; [`Server::open_channel_info`] has its rings.
    ChannelOpened {
        /// The channel.
        relid: u32,
    },
    /// OPENCHANNEL was answered with a failure status.
    OpenRefused {
        /// The relid the request named.
        relid: u32,
        /// Why.
        reason: OpenRefusal,
    },
    /// The channel closed (CLOSECHANNEL, rescind, UNLOAD or reconnect); stop using its rings.
    ChannelClosed {
        /// The channel.
        relid: u32,
    },
    /// MODIFYCHANNEL moved the channel's interrupts to another VP.
    ChannelModified {
        /// The channel.
        relid: u32,
        /// The new VP.
        target_vp: u32,
    },
    /// A rescinded channel was released by the guest (or by a reset); its relid is free again.
    ChannelReleased {
        /// The relid.
        relid: u32,
    },
}

/// Counters of what the server received; malformed and out-of-state messages are counted, never fatal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// Messages admitted and read.
    pub received: u64,
    /// Messages refused at PostMessage time by [`ServerConfig::check_post`] (when posted through
    /// [`Server::handle_message`]).
    pub refused_posts: u64,
    /// Messages that did not parse (size, unknown type).
    pub malformed: u64,
    /// Well-formed messages a guest must not send (host → guest types, TL_CONNECT_REQUEST).
    pub unexpected: u64,
    /// Messages that make no sense in the current state (before INITIATE_CONTACT, a second REQUESTOFFERS, …).
    pub out_of_state: u64,
    /// Messages naming a relid that is not offered to the guest.
    pub unknown_channel: u64,
    /// GPADL_BODY or GPADL_TEARDOWN naming no known GPADL.
    pub unknown_gpadl: u64,
    /// INITIATE_CONTACT answered with `version_supported = 0` or a failed connection state.
    pub versions_refused: u64,
    /// GPADL descriptions refused.
    pub gpadl_failures: u64,
    /// OPENCHANNEL requests refused.
    pub open_failures: u64,
    /// GPADL_TEARDOWNs held: of an open channel's ring until CLOSECHANNEL, of a mapped GPADL until it is unmapped.
    pub deferred_teardowns: u64,
    /// Events dropped because nobody drained them.
    pub events_dropped: u64,
}

/// A host API call that cannot be done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerError {
    /// All relids 1..=2047 are taken (rescinded channels keep theirs until released).
    NoFreeRelid,
    /// All 128 monitor ids are taken.
    NoFreeMonitorId,
    /// No channel has this relid.
    UnknownChannel(u32),
    /// The channel was already rescinded.
    AlreadyRescinded(u32),
    /// The channel has no open request waiting for [`Server::complete_open`].
    NotOpening(u32),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::NoFreeRelid => write!(f, "all relids 1..={MAX_RELID} are in use"),
            ServerError::NoFreeMonitorId => write!(f, "all {MONITOR_ID_COUNT} monitor ids are in use"),
            ServerError::UnknownChannel(relid) => write!(f, "no channel with relid {relid}"),
            ServerError::AlreadyRescinded(relid) => write!(f, "channel {relid} is already rescinded"),
            ServerError::NotOpening(relid) => write!(f, "channel {relid} has no pending open"),
        }
    }
}

impl core::error::Error for ServerError {}

/// Where a channel stands; the open states carry what OPENCHANNEL established.
#[derive(Clone, Debug)]
enum OpenState {
    Closed,
    Opening(OpenChannelInfo),
    Open(OpenChannelInfo),
}

impl OpenState {
    fn status(&self) -> ChannelStatus {
        match self {
            OpenState::Closed => ChannelStatus::Closed,
            OpenState::Opening(_) => ChannelStatus::Opening,
            OpenState::Open(_) => ChannelStatus::Open,
        }
    }

    fn ring_gpadl(&self) -> Option<u32> {
        match self {
            OpenState::Closed => None,
            OpenState::Opening(info) | OpenState::Open(info) => Some(info.ring_gpadl),
        }
    }
}

#[derive(Clone, Debug)]
struct Channel {
    spec: OfferSpec,
    connection_id: u32,
    monitor_id: Option<u8>,
    /// Order of `offer` calls: offers go out in this order (sub-channels after their primary).
    sequence: u64,
    offered_to_guest: bool,
    rescinded: bool,
    state: OpenState,
}

/// A GPADL description still arriving, with a refusal already decided from its header.
#[derive(Clone, Debug)]
struct PendingGpadl {
    assembler: GpadlAssembler,
    refusal: Option<GpadlRefusal>,
}

/// The VMBus server (host side of §5) for one guest connection, free of I/O.
///
/// Feed it each message the guest posted with [`handle_message`](Self::handle_message); send what
/// [`pop_outgoing`](Self::pop_outgoing) yields to the guest's SINT 2, in order; drain
/// [`pop_event`](Self::pop_event) for what channel owners must do. Offer and rescind channels at any time with
/// [`offer`](Self::offer) and [`rescind`](Self::rescind).
///
/// Rules it follows where the reference leaves a choice (each checked against QEMU, OpenVMM and Linux):
/// - A new INITIATE_CONTACT resets the connection first (QEMU and OpenVMM both do): open channels close, GPADLs
///   are dropped, rescinded channels are released, offers are sent again after the next REQUESTOFFERS, and host
///   messages not yet delivered are discarded. UNLOAD does the same and is always answered with UNLOAD_RESPONSE.
/// - Before a version is negotiated only INITIATE_CONTACT and UNLOAD are handled. A second REQUESTOFFERS is
///   ignored (OpenVMM refuses it too).
/// - GPADL_CREATED and OPENCHANNEL_RESULT carry a failure status for bad requests (see [`super::status`]) rather
///   than silence, so the guest's wait ends. Requests about an unknown GPADL handle, a CLOSECHANNEL of a closed
///   channel and MODIFYCHANNEL before 5.3 have no answer in the protocol and are only counted.
/// - GPADL_TEARDOWN of the ring GPADL of an open channel: from 4.0 on (the version from which the guest must
///   close first, §5) the GPADL_TORNDOWN is held until CLOSECHANNEL — OpenVMM likewise lets the device keep the
///   GPADL mapped and answers when it lets go; below 4.0 it is answered at once and the open channel keeps its
///   copy of the ring pages until closed, as QEMU's reference count does. Linux always closes first.
/// - A rescind closes the host's end of an open channel at once. The relid stays taken until RELID_RELEASED,
///   which also drops the channel's remaining GPADLs without GPADL_TORNDOWN (OpenVMM does the same). A
///   GPADL_TEARDOWN for a rescinded channel is answered at once; OPENCHANNEL and CLOSECHANNEL for it are ignored.
/// - GPADL_TEARDOWN of a GPADL the host mapped ([`Server::map_gpadl`]) is held until [`Server::unmap_gpadl`], at
///   any version (KMCL's `VmbChannelDeleteGpadl` blocks while the server has it mapped).
#[derive(Clone, Debug)]
pub struct Server {
    config: ServerConfig,
    connection: Option<ConnectionInfo>,
    channels: BTreeMap<u32, Channel>,
    next_sequence: u64,
    gpadls: BTreeMap<u32, ServerGpadl>,
    pending_gpadls: BTreeMap<u32, PendingGpadl>,
    /// Creation access and mapping state of accepted GPADLs, by handle; absent means writable and not mapped.
    gpadl_access: BTreeMap<u32, GpadlAccess>,
    monitor_ids_in_use: u128,
    outbox: VecDeque<MessageBuffer>,
    events: VecDeque<ServerEvent>,
    stats: ServerStats,
}

impl Server {
    /// A server with no channels, waiting for INITIATE_CONTACT.
    pub fn new(config: ServerConfig) -> Server {
        Server {
            config,
            connection: None,
            channels: BTreeMap::new(),
            next_sequence: 0,
            gpadls: BTreeMap::new(),
            pending_gpadls: BTreeMap::new(),
            gpadl_access: BTreeMap::new(),
            monitor_ids_in_use: 0,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            stats: ServerStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The negotiated connection, if any.
    pub fn connection(&self) -> Option<&ConnectionInfo> {
        self.connection.as_ref()
    }

    /// The counters.
    pub fn stats(&self) -> ServerStats {
        self.stats
    }

    // ---- host API ----

    /// Offers a channel: assigns the lowest free relid (and a monitor id if asked), and sends OFFERCHANNEL now if
    /// the guest has already asked for offers (hot add), else with the answer to REQUESTOFFERS.
    pub fn offer(&mut self, spec: OfferSpec) -> Result<u32, ServerError> {
        let relid = (1..=MAX_RELID).find(|relid| !self.channels.contains_key(relid)).ok_or(ServerError::NoFreeRelid)?;
        let monitor_id = if spec.monitored {
            let free = (!self.monitor_ids_in_use).trailing_zeros();
            let id = u8::try_from(free).ok().filter(|&id| id < MONITOR_ID_COUNT).ok_or(ServerError::NoFreeMonitorId)?;
            self.monitor_ids_in_use |= 1u128 << id;
            Some(id)
        } else {
            None
        };
        let channel = Channel {
            spec,
            connection_id: self.config.event_connection_id_base.wrapping_add(relid),
            monitor_id,
            sequence: self.next_sequence,
            offered_to_guest: false,
            rescinded: false,
            state: OpenState::Closed,
        };
        self.next_sequence += 1;
        self.channels.insert(relid, channel);
        if self.connection.is_some_and(|c| c.offers_sent) {
            self.send_offer(relid);
        }
        Ok(relid)
    }

    /// Withdraws a channel. One the guest never saw is removed at once; otherwise RESCIND_CHANNELOFFER is sent,
    /// the host's end of an open channel closes, and the relid stays taken until the guest's RELID_RELEASED.
    pub fn rescind(&mut self, relid: u32) -> Result<(), ServerError> {
        let channel = self.channels.get_mut(&relid).ok_or(ServerError::UnknownChannel(relid))?;
        if channel.rescinded {
            return Err(ServerError::AlreadyRescinded(relid));
        }
        if !channel.offered_to_guest {
            self.release(relid);
            return Ok(());
        }
        channel.rescinded = true;
        let was_open = !matches!(channel.state, OpenState::Closed);
        channel.state = OpenState::Closed;
        self.pending_gpadls.retain(|_, pending| pending.assembler.child_relid() != relid);
        self.send(&RescindChannelOffer::new(relid));
        if was_open {
            self.push_event(ServerEvent::ChannelClosed { relid });
        }
        self.flush_deferred_teardowns(relid);
        Ok(())
    }

    /// Answers an OPENCHANNEL held for the owner ([`OfferSpec::confirm_opens`]): `status` 0 opens the channel,
    /// anything else refuses the open with that status.
    pub fn complete_open(&mut self, relid: u32, status: u32) -> Result<(), ServerError> {
        let channel = self.channels.get_mut(&relid).ok_or(ServerError::UnknownChannel(relid))?;
        let OpenState::Opening(info) = core::mem::replace(&mut channel.state, OpenState::Closed) else {
            return Err(ServerError::NotOpening(relid));
        };
        if status == status::SUCCESS {
            let open_id = info.open_id;
            channel.state = OpenState::Open(info);
            self.send(&OpenChannelResult::new(relid, open_id, status::SUCCESS));
            self.push_event(ServerEvent::ChannelOpened { relid });
        } else {
            self.refuse_open(relid, info.open_id, OpenRefusal::Device(status));
            self.flush_deferred_teardowns(relid);
        }
        Ok(())
    }

    // ---- server-only GPADL mapping (kmcl-api.md §Server-only methods; see `super::mapping`) ----

    /// Records that GPADL `handle` was created read-only (`VMBUS_CHANNEL_GPADL_READ_ONLY`), so that mapping it for
    /// writing fails. The wire protocol carries no such flag: an in-process client (a loopback KMCL channel) says so
    /// through this call; GPADLs a guest describes over VMBus stay writable.
    pub fn set_gpadl_read_only(&mut self, handle: u32) -> Result<(), MapGpadlError> {
        if !self.gpadls.contains_key(&handle) {
            return Err(MapGpadlError::UnknownGpadl(handle));
        }
        self.gpadl_access.entry(handle).or_default().read_only = true;
        Ok(())
    }

    /// `VmbChannelMapGpadl`: maps GPADL `handle` of channel `relid` for the server. Without
    /// [`MapGpadlFlags::READ_ONLY`] it asks for write access, which a read-only GPADL refuses; a GPADL is mapped at
    /// most once at a time, and not once its teardown was asked for. Pair with [`unmap_gpadl`](Self::unmap_gpadl):
    /// until then the GPADL's GPADL_TORNDOWN is held.
    pub fn map_gpadl(&mut self, relid: u32, flags: MapGpadlFlags, handle: u32) -> Result<MappedGpadl, MapGpadlError> {
        if flags.0 & !MapGpadlFlags::READ_ONLY.0 != 0 {
            return Err(MapGpadlError::InvalidFlags(flags.0));
        }
        if !self.channel_visible(relid) {
            return Err(MapGpadlError::UnknownChannel(relid));
        }
        let gpadl = self.gpadls.get(&handle).ok_or(MapGpadlError::UnknownGpadl(handle))?;
        if gpadl.relid() != relid {
            return Err(MapGpadlError::ForeignGpadl(handle));
        }
        if gpadl.teardown_pending {
            return Err(MapGpadlError::TeardownPending(handle));
        }
        let access = self.gpadl_access.get(&handle).copied().unwrap_or_default();
        if access.mapped.is_some() {
            return Err(MapGpadlError::AlreadyMapped(handle));
        }
        let writable = !flags.read_only();
        if writable && access.read_only {
            return Err(MapGpadlError::NotWritable(handle));
        }
        let mapped = MappedGpadl { relid, handle, ranges: gpadl.gpadl.ranges.clone(), writable };
        self.gpadl_access.insert(handle, GpadlAccess { mapped: Some(writable), ..access });
        Ok(mapped)
    }

    /// `VmbChannelUnmapGpadl`: ends the mapping of GPADL `handle` of channel `relid`. A GPADL_TEARDOWN held for the
    /// mapping is answered now, unless the GPADL is still the ring of an open channel (then at close, §5).
    pub fn unmap_gpadl(&mut self, relid: u32, handle: u32) -> Result<(), MapGpadlError> {
        let gpadl = self.gpadls.get(&handle).ok_or(MapGpadlError::UnknownGpadl(handle))?;
        if gpadl.relid() != relid {
            return Err(MapGpadlError::ForeignGpadl(handle));
        }
        let teardown_pending = gpadl.teardown_pending;
        let access = self.gpadl_access.get_mut(&handle).filter(|access| access.mapped.is_some());
        let access = access.ok_or(MapGpadlError::NotMapped(handle))?;
        access.mapped = None;
        if teardown_pending && !self.ring_held_open(relid, handle) {
            self.tear_down(relid, handle);
        }
        Ok(())
    }

    /// Whether GPADL `handle` is mapped now.
    pub fn is_gpadl_mapped(&self, handle: u32) -> bool {
        self.gpadl_access.get(&handle).is_some_and(|access| access.mapped.is_some())
    }

    /// Whether GPADL `handle` is the ring of open channel `relid` on a version whose guests close before tearing
    /// down (§5), so its GPADL_TORNDOWN waits for the close.
    fn ring_held_open(&self, relid: u32, handle: u32) -> bool {
        let ring_in_use = self.channels.get(&relid).is_some_and(|channel| channel.state.ring_gpadl() == Some(handle));
        ring_in_use && self.connection.is_some_and(|c| c.version.requires_gpadl_teardown_after_close())
    }

    // ---- observation ----

    /// What a held OPENCHANNEL asks for ([`OfferSpec::confirm_opens`]), for the owner to check (for instance map the
    /// rings) before [`complete_open`](Self::complete_open).
    pub fn opening_channel_info(&self, relid: u32) -> Option<&OpenChannelInfo> {
        match &self.channels.get(&relid)?.state {
            OpenState::Opening(info) => Some(info),
            _ => None,
        }
    }

    /// The next message for the guest (in order), without taking it.
    pub fn peek_outgoing(&self) -> Option<&MessageBuffer> {
        self.outbox.front()
    }

    /// Takes the next message for the guest.
    pub fn pop_outgoing(&mut self) -> Option<MessageBuffer> {
        self.outbox.pop_front()
    }

    /// How many messages wait to be sent to the guest.
    pub fn outgoing_len(&self) -> usize {
        self.outbox.len()
    }

    /// Takes the oldest event.
    pub fn pop_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// The channel with this relid, if it exists (offered or not, rescinded or not).
    pub fn channel(&self, relid: u32) -> Option<ChannelSummary> {
        self.channels.get(&relid).map(|channel| ChannelSummary {
            relid,
            connection_id: channel.connection_id,
            monitor_id: channel.monitor_id,
            offered_to_guest: channel.offered_to_guest,
            rescinded: channel.rescinded,
            status: channel.state.status(),
        })
    }

    /// The offer contents of a channel.
    pub fn offer_spec(&self, relid: u32) -> Option<&OfferSpec> {
        self.channels.get(&relid).map(|channel| &channel.spec)
    }

    /// The relids of every channel, ascending.
    pub fn relids(&self) -> impl Iterator<Item = u32> + '_ {
        self.channels.keys().copied()
    }

    /// What OPENCHANNEL established for an open channel: its ring pages and their split.
    pub fn open_channel_info(&self, relid: u32) -> Option<&OpenChannelInfo> {
        match &self.channels.get(&relid)?.state {
            OpenState::Open(info) => Some(info),
            _ => None,
        }
    }

    /// The accepted GPADL with this handle.
    pub fn gpadl(&self, handle: u32) -> Option<&ServerGpadl> {
        self.gpadls.get(&handle)
    }

    /// Handles of every accepted GPADL, ascending.
    pub fn gpadl_handles(&self) -> impl Iterator<Item = u32> + '_ {
        self.gpadls.keys().copied()
    }

    /// How many GPADL descriptions are still being assembled.
    pub fn pending_gpadl_count(&self) -> usize {
        self.pending_gpadls.len()
    }

    // ---- guest messages ----

    /// Handles one message the guest posted to `connection_id`.
    ///
    /// `Err` is the PostMessage status the host returns without reading the message
    /// ([`ServerConfig::check_post`]); when the guest's messages come through a simulated hypervisor whose ports
    /// carry that check, this never fails. Every other outcome, malformed input included, is `Ok`: the message is
    /// answered, or ignored and counted in [`stats`](Self::stats).
    pub fn handle_message(&mut self, connection_id: u32, payload: &[u8]) -> Result<(), HvError> {
        if let Err(error) = self.config.check_post(connection_id, payload) {
            self.stats.refused_posts += 1;
            return Err(error);
        }
        self.stats.received += 1;
        let message = match parse(payload) {
            Ok(message) => message,
            Err(error) => {
                self.stats.malformed += 1;
                log::warn!("vmbus server: dropped a malformed message: {error}");
                return Ok(());
            }
        };
        match message {
            Message::InitiateContact(contact) => self.on_initiate_contact(connection_id, contact),
            Message::Unload => self.on_unload(),
            _ if self.connection.is_none() => {
                self.stats.out_of_state += 1;
                log::debug!("vmbus server: {} before INITIATE_CONTACT ignored", message.message_type());
            }
            Message::RequestOffers => self.on_request_offers(),
            Message::GpadlHeader { header, range_words } => self.on_gpadl_header(header, range_words),
            Message::GpadlBody { body, range_words } => self.on_gpadl_body(body, range_words),
            Message::GpadlTeardown(teardown) => {
                self.on_gpadl_teardown(teardown.child_relid.get(), teardown.gpadl.get())
            }
            Message::OpenChannel(open) => self.on_open_channel(open),
            Message::CloseChannel(close) => self.on_close_channel(close.child_relid.get()),
            Message::RelIdReleased(released) => self.on_relid_released(released.child_relid.get()),
            Message::ModifyChannel(modify) => self.on_modify_channel(modify.child_relid.get(), modify.target_vp.get()),
            other => {
                self.stats.unexpected += 1;
                log::warn!("vmbus server: the guest sent {}; ignored", other.message_type());
            }
        }
        Ok(())
    }

    fn on_initiate_contact(&mut self, connection_id: u32, contact: &InitiateContact) {
        self.reset(DisconnectReason::Reconnect);
        let version = contact.version();
        if !self.config.accepts(version) {
            log::debug!("vmbus server: version {version} refused");
            self.refuse_version();
            return;
        }
        if version.uses_msg_sint() && (contact.msg_sint() != VMBUS_MESSAGE_SINT || contact.msg_vtl() != 0) {
            // Only SINT 2 of VTL 0 is served (OpenVMM answers "unsupported" for another SINT as well).
            log::debug!("vmbus server: SINT {} VTL {} refused", contact.msg_sint(), contact.msg_vtl());
            self.refuse_version();
            return;
        }
        let (page1, page2) = (contact.monitor_page1.get(), contact.monitor_page2.get());
        if (page1 == 0) != (page2 == 0) {
            // One monitor page without the other (OpenVMM's rule). Before 2.4 a failure cannot be reported.
            self.stats.versions_refused += 1;
            let supported = version >= VmbusVersion::V2_4;
            self.send_version_response(supported, ConnectionState::FAILED_UNKNOWN_FAILURE, 0);
            return;
        }
        let msg_conn_id = version.has_msg_conn_id().then_some(self.config.msg_conn_id);
        self.connection = Some(ConnectionInfo {
            version,
            contact_connection_id: connection_id,
            target_vcpu: contact.target_vcpu.get(),
            interrupt_page: (!version.uses_msg_sint()).then(|| contact.interrupt_page()),
            monitor_pages: (page1 != 0).then_some((page1, page2)),
            msg_conn_id,
            offers_sent: false,
        });
        // Below 5.0 the last field carries the accepted version, as OpenVMM sends it; guests ignore it there.
        self.send_version_response(true, ConnectionState::SUCCESSFUL, msg_conn_id.unwrap_or(version.0));
        self.push_event(ServerEvent::Connected { version });
    }

    fn refuse_version(&mut self) {
        self.stats.versions_refused += 1;
        self.send_version_response(false, ConnectionState::SUCCESSFUL, 0);
    }

    fn send_version_response(&mut self, supported: bool, state: ConnectionState, last_field: u32) {
        let response = VersionResponse::new(supported, state, last_field);
        let bytes = zerocopy::IntoBytes::as_bytes(&response);
        let bytes = if self.config.short_version_response {
            bytes.get(..VersionResponse::SHORT_SIZE).unwrap_or(bytes)
        } else {
            bytes
        };
        self.send_bytes(bytes);
    }

    fn on_unload(&mut self) {
        self.reset(DisconnectReason::Unload);
        self.send(&UnloadResponse::new());
    }

    /// Ends the connection: channels close, GPADLs go, rescinded channels are released, undelivered host
    /// messages are dropped.
    fn reset(&mut self, reason: DisconnectReason) {
        let was_connected = self.connection.take().is_some();
        self.outbox.clear();
        self.gpadls.clear();
        self.pending_gpadls.clear();
        self.gpadl_access.clear();
        let mut closed = Vec::new();
        let mut rescinded = Vec::new();
        for (&relid, channel) in &mut self.channels {
            if !matches!(channel.state, OpenState::Closed) {
                channel.state = OpenState::Closed;
                closed.push(relid);
            }
            channel.offered_to_guest = false;
            if channel.rescinded {
                rescinded.push(relid);
            }
        }
        for relid in closed {
            self.push_event(ServerEvent::ChannelClosed { relid });
        }
        for relid in rescinded {
            self.release(relid);
        }
        if was_connected {
            self.push_event(ServerEvent::Disconnected { reason });
        }
    }

    fn on_request_offers(&mut self) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        if connection.offers_sent {
            self.stats.out_of_state += 1;
            return;
        }
        connection.offers_sent = true;
        let mut order: Vec<(u64, u32)> = self
            .channels
            .iter()
            .filter(|(_, channel)| !channel.rescinded)
            .map(|(&relid, channel)| (channel.sequence, relid))
            .collect();
        order.sort_unstable();
        for &(_, relid) in &order {
            self.send_offer(relid);
        }
        self.send(&AllOffersDelivered::new());
        self.push_event(ServerEvent::OffersSent { count: order.len() });
    }

    fn send_offer(&mut self, relid: u32) {
        let Some(channel) = self.channels.get_mut(&relid) else {
            return;
        };
        channel.offered_to_guest = true;
        let spec = &channel.spec;
        let mut offer = OfferChannel::new(spec.interface_type, spec.interface_instance, relid, channel.connection_id);
        offer.flags = U16::new(spec.flags.bits());
        offer.mmio_megabytes = U16::new(spec.mmio_megabytes);
        offer.user_defined = spec.user_defined;
        offer.sub_channel_index = U16::new(spec.sub_channel_index);
        if let Some(id) = channel.monitor_id {
            offer.monitor_id = id;
            offer.monitor_flags = 1;
        }
        offer.interrupt_flags = U16::new(u16::from(spec.dedicated_interrupt));
        self.send(&offer);
    }

    /// Whether the guest may address this relid: offered on this connection and not rescinded.
    fn channel_visible(&self, relid: u32) -> bool {
        self.channels.get(&relid).is_some_and(|channel| channel.offered_to_guest && !channel.rescinded)
    }

    fn on_gpadl_header(&mut self, header: &GpadlHeader, range_words: &[U64]) {
        let relid = header.child_relid.get();
        let handle = header.gpadl.get();
        if self.pending_gpadls.contains_key(&handle) {
            // Its bodies cannot be told apart from the first description's: refuse this one at once.
            self.refuse_gpadl(relid, handle, GpadlRefusal::DuplicateHandle);
            return;
        }
        if self.pending_gpadls.len() >= MAX_PENDING_GPADLS {
            self.refuse_gpadl(relid, handle, GpadlRefusal::TooManyPending);
            return;
        }
        let assembler = match GpadlAssembler::new(header, range_words) {
            Ok(assembler) => assembler,
            Err(error) => {
                self.refuse_gpadl(relid, handle, GpadlRefusal::Malformed(error));
                return;
            }
        };
        // Decided now, answered once the bodies are in, so they do not arrive as strays.
        let refusal = if self.gpadls.contains_key(&handle) {
            Some(GpadlRefusal::DuplicateHandle)
        } else if !self.channel_visible(relid) {
            Some(GpadlRefusal::UnknownChannel)
        } else {
            None
        };
        let pending = PendingGpadl { assembler, refusal };
        if pending.assembler.is_complete() {
            self.finish_gpadl(pending);
        } else {
            self.pending_gpadls.insert(handle, pending);
        }
    }

    fn on_gpadl_body(&mut self, body: &GpadlBody, range_words: &[U64]) {
        let handle = body.gpadl.get();
        let Some(mut pending) = self.pending_gpadls.remove(&handle) else {
            self.stats.unknown_gpadl += 1;
            return;
        };
        match pending.assembler.add_body(body, range_words) {
            Ok(true) => self.finish_gpadl(pending),
            Ok(false) => {
                self.pending_gpadls.insert(handle, pending);
            }
            Err(error) => {
                let relid = pending.assembler.child_relid();
                self.refuse_gpadl(relid, handle, GpadlRefusal::Malformed(error));
            }
        }
    }

    fn finish_gpadl(&mut self, pending: PendingGpadl) {
        let relid = pending.assembler.child_relid();
        let handle = pending.assembler.gpadl();
        if let Some(refusal) = pending.refusal {
            self.refuse_gpadl(relid, handle, refusal);
            return;
        }
        let gpadl = match pending.assembler.finish() {
            Ok(gpadl) => gpadl,
            Err(error) => {
                self.refuse_gpadl(relid, handle, GpadlRefusal::Malformed(error));
                return;
            }
        };
        if let Some(limit) = self.config.guest_pfn_limit
            && let Some(pfn) = gpadl.pfns().find(|&pfn| pfn >= limit)
        {
            self.refuse_gpadl(relid, handle, GpadlRefusal::PfnOutOfRange { pfn });
            return;
        }
        // The channel may have been rescinded while the bodies arrived.
        if !self.channel_visible(relid) {
            self.refuse_gpadl(relid, handle, GpadlRefusal::UnknownChannel);
            return;
        }
        self.gpadls.insert(handle, ServerGpadl { gpadl, teardown_pending: false });
        self.send(&GpadlCreated::new(relid, handle, status::SUCCESS));
        self.push_event(ServerEvent::GpadlCreated { relid, gpadl: handle });
    }

    fn refuse_gpadl(&mut self, relid: u32, handle: u32, reason: GpadlRefusal) {
        self.stats.gpadl_failures += 1;
        log::debug!("vmbus server: GPADL {handle:#x} for relid {relid} refused: {reason}");
        self.send(&GpadlCreated::new(relid, handle, reason.status()));
        self.push_event(ServerEvent::GpadlRefused { relid, gpadl: handle, reason });
    }

    fn on_gpadl_teardown(&mut self, relid: u32, handle: u32) {
        if self.pending_gpadls.contains_key(&handle) {
            self.stats.out_of_state += 1;
            return;
        }
        let Some(gpadl) = self.gpadls.get_mut(&handle) else {
            self.stats.unknown_gpadl += 1;
            return;
        };
        if gpadl.relid() != relid {
            self.stats.unknown_gpadl += 1;
            return;
        }
        if gpadl.teardown_pending {
            self.stats.out_of_state += 1;
            return;
        }
        let mapped = self.gpadl_access.get(&handle).is_some_and(|access| access.mapped.is_some());
        if mapped || self.ring_held_open(relid, handle) {
            if let Some(gpadl) = self.gpadls.get_mut(&handle) {
                gpadl.teardown_pending = true;
            }
            self.stats.deferred_teardowns += 1;
            return;
        }
        self.tear_down(relid, handle);
    }

    fn tear_down(&mut self, relid: u32, handle: u32) {
        self.gpadls.remove(&handle);
        self.gpadl_access.remove(&handle);
        self.send(&GpadlTorndown::new(handle));
        self.push_event(ServerEvent::GpadlTornDown { relid, gpadl: handle });
    }

    fn on_open_channel(&mut self, open: &OpenChannel) {
        let relid = open.child_relid.get();
        let open_id = open.open_id.get();
        let Some(channel) = self.channels.get(&relid).filter(|channel| channel.offered_to_guest) else {
            self.stats.unknown_channel += 1;
            self.refuse_open(relid, open_id, OpenRefusal::UnknownChannel);
            return;
        };
        let (rescinded, closed, confirm) =
            (channel.rescinded, matches!(channel.state, OpenState::Closed), channel.spec.confirm_opens);
        if rescinded {
            // The guest learns from the rescind; OpenVMM ignores the request too.
            self.stats.out_of_state += 1;
            return;
        }
        if !closed {
            self.refuse_open(relid, open_id, OpenRefusal::AlreadyOpen);
            return;
        }
        let ring_gpadl = open.ring_buffer_gpadl.get();
        let downstream_page_offset = open.downstream_ring_buffer_page_offset.get();
        let pfns = match self.ring_pages(relid, ring_gpadl, downstream_page_offset) {
            Ok(pfns) => pfns,
            Err(reason) => {
                self.refuse_open(relid, open_id, reason);
                return;
            }
        };
        let info = OpenChannelInfo {
            relid,
            open_id,
            ring_gpadl,
            target_vp: open.target_vp.get(),
            downstream_page_offset,
            user_data: open.user_data,
            ring_pfns: pfns,
        };
        let Some(channel) = self.channels.get_mut(&relid) else {
            return;
        };
        if confirm {
            channel.state = OpenState::Opening(info);
            self.push_event(ServerEvent::OpenRequested { relid });
        } else {
            channel.state = OpenState::Open(info);
            self.send(&OpenChannelResult::new(relid, open_id, status::SUCCESS));
            self.push_event(ServerEvent::ChannelOpened { relid });
        }
    }

    /// The ring GPADL's pages, if it exists, belongs to `relid`, is whole pages and splits at `offset` into two
    /// rings of at least the configured size.
    fn ring_pages(&self, relid: u32, handle: u32, offset: u32) -> Result<Vec<u64>, OpenRefusal> {
        let gpadl = self.gpadls.get(&handle).ok_or(OpenRefusal::UnknownGpadl)?;
        if gpadl.relid() != relid {
            return Err(OpenRefusal::ForeignGpadl);
        }
        if gpadl.teardown_pending {
            return Err(OpenRefusal::UnknownGpadl);
        }
        let pfns = gpadl.whole_pages().ok_or(OpenRefusal::RingNotWholePages)?;
        let pages = pfns.len() as u64;
        let offset = u64::from(offset);
        let minimum = u64::from(self.config.min_ring_pages.max(1));
        if offset < minimum || pages < offset || pages - offset < minimum {
            return Err(OpenRefusal::BadDownstreamOffset);
        }
        Ok(pfns.to_vec())
    }

    fn refuse_open(&mut self, relid: u32, open_id: u32, reason: OpenRefusal) {
        self.stats.open_failures += 1;
        log::debug!("vmbus server: open of relid {relid} refused: {reason:?}");
        self.send(&OpenChannelResult::new(relid, open_id, reason.status()));
        self.push_event(ServerEvent::OpenRefused { relid, reason });
    }

    fn on_close_channel(&mut self, relid: u32) {
        let Some(channel) = self.channels.get_mut(&relid).filter(|channel| channel.offered_to_guest) else {
            self.stats.unknown_channel += 1;
            return;
        };
        if channel.rescinded {
            // The host's end closed with the rescind; the guest's CLOSECHANNEL is accepted silently.
            return;
        }
        if matches!(channel.state, OpenState::Closed) {
            self.stats.out_of_state += 1;
            return;
        }
        channel.state = OpenState::Closed;
        self.push_event(ServerEvent::ChannelClosed { relid });
        self.flush_deferred_teardowns(relid);
    }

    /// Sends the GPADL_TORNDOWN held for a channel's ring now that the channel no longer uses it.
    fn flush_deferred_teardowns(&mut self, relid: u32) {
        let deferred: Vec<u32> = self
            .gpadls
            .iter()
            .filter(|(_, gpadl)| gpadl.teardown_pending && gpadl.relid() == relid)
            .filter(|(handle, _)| !self.gpadl_access.get(handle).is_some_and(|access| access.mapped.is_some()))
            .map(|(&handle, _)| handle)
            .collect();
        for handle in deferred {
            self.tear_down(relid, handle);
        }
    }

    fn on_relid_released(&mut self, relid: u32) {
        let Some(channel) = self.channels.get(&relid) else {
            self.stats.unknown_channel += 1;
            return;
        };
        if !channel.rescinded {
            self.stats.out_of_state += 1;
            return;
        }
        self.release(relid);
    }

    /// Forgets a channel and everything of it; its relid and monitor id become free.
    fn release(&mut self, relid: u32) {
        let Some(channel) = self.channels.remove(&relid) else {
            return;
        };
        if let Some(id) = channel.monitor_id {
            self.monitor_ids_in_use &= !(1u128 << id);
        }
        self.gpadls.retain(|_, gpadl| gpadl.relid() != relid);
        self.pending_gpadls.retain(|_, pending| pending.assembler.child_relid() != relid);
        let gpadls = &self.gpadls;
        self.gpadl_access.retain(|handle, _| gpadls.contains_key(handle));
        // Only a channel the guest saw is released by it (rescinded ones); one it never saw just goes.
        if channel.rescinded {
            self.push_event(ServerEvent::ChannelReleased { relid });
        }
    }

    fn on_modify_channel(&mut self, relid: u32, target_vp: u32) {
        let Some(version) = self.connection.map(|c| c.version) else {
            return;
        };
        if !version.supports_modify_channel() {
            self.stats.out_of_state += 1;
            return;
        }
        let outcome = match self.channels.get_mut(&relid).filter(|channel| channel.offered_to_guest) {
            None => {
                self.stats.unknown_channel += 1;
                Err(ModifyRefusal::UnknownChannel)
            }
            Some(channel) => match &mut channel.state {
                OpenState::Open(info) if !channel.rescinded => {
                    info.target_vp = target_vp;
                    Ok(())
                }
                _ => {
                    self.stats.out_of_state += 1;
                    Err(ModifyRefusal::NotOpen)
                }
            },
        };
        if outcome.is_ok() {
            self.push_event(ServerEvent::ChannelModified { relid, target_vp });
        }
        if version.has_modify_channel_response() {
            let status = outcome.err().map_or(status::SUCCESS, ModifyRefusal::status);
            self.send(&ModifyChannelResponse::new(relid, status));
        }
    }

    fn send<M: ControlMessage>(&mut self, message: &M) {
        self.outbox.push_back(MessageBuffer::from_message(message));
    }

    fn send_bytes(&mut self, bytes: &[u8]) {
        if let Some(buffer) = MessageBuffer::from_bytes(bytes) {
            self.outbox.push_back(buffer);
        }
    }

    fn push_event(&mut self, event: ServerEvent) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(event);
    }
}
