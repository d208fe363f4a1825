//! The VMBus control protocol, guest side (§5): version negotiation, offers, GPADLs, open/close, modify, unload.

use super::offer::{Offer, OfferError};
use super::{ClientError, VmbusTransport};
use crate::hv::hypercall::{HvStatus, PostMessageRetry, post_message_with_retry};
use crate::protocol::{
    CloseChannel, ConnectionState, ControlMessage, GpadlMessages, GpadlTeardown, InitiateContact, MAX_MESSAGE_SIZE,
    MESSAGE_CONNECTION_ID, Message, MessageBuffer, MessageType, ModifyChannel, OpenChannel, POST_MESSAGE_TYPE,
    RelIdReleased, RequestOffers, USER_DEFINED_SIZE, Unload, VmbusVersion, parse,
};
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Versions to propose, in order (default: 5.3 down to 2.4, §5).
    pub versions: Vec<VmbusVersion>,
    /// The VP that receives the host's messages (its VP_INDEX).
    pub target_vp: u32,
    /// GPA of the interrupt page (sent for versions below 5.0): its first half is the host → guest page, its
    /// second half the guest → host page.
    pub interrupt_page_gpa: u64,
    /// GPAs of monitor pages 1 (host → guest) and 2 (guest → host) (§9).
    pub monitor_page_gpas: (u64, u64),
    /// Time limit for each answer from the host, in nanoseconds.
    pub timeout_ns: u64,
}

impl ConnectOptions {
    /// The defaults for the given shared pages: every client version newest first, VP 0, 5 s per answer.
    pub fn new(interrupt_page_gpa: u64, monitor_page_gpas: (u64, u64)) -> ConnectOptions {
        ConnectOptions {
            versions: VmbusVersion::CLIENT_NEGOTIATION_ORDER.to_vec(),
            target_vp: 0,
            interrupt_page_gpa,
            monitor_page_gpas,
            timeout_ns: 5_000_000_000,
        }
    }
}

/// Something the host did on its own, reported by [`Connection::poll`] and the requests that saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A new channel was offered after ALLOFFERS_DELIVERED (hot add).
    Offered(u32),
    /// The host rescinded a channel. If it was open, its owner must close it and call
    /// [`Connection::release_channel`]; an unopened one is released at once.
    Rescinded(u32),
}

/// A GPADL handle, chosen by the guest and unique within the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpadlId(pub u32);

/// How the host answered one INITIATE_CONTACT while connecting (§5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionAttempt {
    /// VERSION_RESPONSE with `version_supported = 0`.
    Refused,
    /// The PostMessage hypercall failed with INVALID_CONNECTION_ID: the host does not listen on the connection id
    /// this version uses (4 from 5.0 on).
    ConnectionIdUnknown,
    /// Accepted: the connection runs this version.
    Accepted,
}

impl core::fmt::Display for VersionAttempt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            VersionAttempt::Refused => "refused",
            VersionAttempt::ConnectionIdUnknown => "refused (connection id unknown to the host)",
            VersionAttempt::Accepted => "accepted",
        })
    }
}

/// Counters of what the connection saw; malformed or unexpected host messages are counted and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Messages received and parsed.
    pub messages: u64,
    /// Messages that did not parse (wrong size, unknown type).
    pub malformed: u64,
    /// Well-formed messages that made no sense now (for example an answer nobody waits for).
    pub unexpected: u64,
    /// Offers refused (relid or monitor id out of range, duplicate relid).
    pub refused_offers: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChannelState {
    /// Offered, not open.
    Offered,
    /// OPENCHANNEL sent and answered with success.
    Open,
}

#[derive(Debug)]
struct ChannelEntry {
    offer: Offer,
    state: ChannelState,
    rescinded: bool,
    /// GPADLs created for this channel and not yet torn down.
    gpadls: Vec<GpadlId>,
}

/// A live connection to the VMBus host.
pub struct Connection<T: VmbusTransport> {
    transport: T,
    options: ConnectOptions,
    version: VmbusVersion,
    msg_conn_id: u32,
    channels: BTreeMap<u32, ChannelEntry>,
    /// Relids in the order they were offered.
    offer_order: Vec<u32>,
    events: VecDeque<Event>,
    next_gpadl: u32,
    all_offers_delivered: bool,
    unloaded: bool,
    stats: ConnectionStats,
    /// The versions proposed while connecting and the answers.
    attempts: Vec<(VmbusVersion, VersionAttempt)>,
}

/// First guest-chosen GPADL handle; any non-zero value works, a recognisable one helps when reading host logs.
const FIRST_GPADL: u32 = 0x000E_1E10;

/// What a pending request waits for, decided per received message.
enum Wait<R> {
    /// Not this message.
    No,
    /// The answer.
    Done(R),
}

impl<T: VmbusTransport> Connection<T> {
    /// Connects: proposes each version in turn until the host accepts one (§5).
    ///
    /// A version is skipped when the host answers `version_supported = 0`, or when it refuses the message with
    /// INVALID_CONNECTION_ID (an old host that does not know connection id 4, used from 5.0 on).
    pub fn connect(transport: T, options: ConnectOptions) -> Result<Connection<T>, ClientError> {
        let mut connection = Connection {
            transport,
            options,
            version: VmbusVersion(0),
            msg_conn_id: MESSAGE_CONNECTION_ID,
            channels: BTreeMap::new(),
            offer_order: Vec::new(),
            events: VecDeque::new(),
            next_gpadl: FIRST_GPADL,
            all_offers_delivered: false,
            unloaded: false,
            stats: ConnectionStats::default(),
            attempts: Vec::new(),
        };
        let versions = connection.options.versions.clone();
        for version in versions {
            let (monitor1, monitor2) = connection.options.monitor_page_gpas;
            let contact = InitiateContact::new(
                version,
                connection.options.target_vp,
                connection.options.interrupt_page_gpa,
                monitor1,
                monitor2,
            );
            let conn_id = version.initiate_contact_connection_id();
            let buf = MessageBuffer::from_message(&contact);
            match post_message_with_retry(
                &connection.transport,
                &connection.transport,
                conn_id,
                POST_MESSAGE_TYPE,
                buf.as_bytes(),
                PostMessageRetry::for_initiate_contact(),
            ) {
                Ok(()) => {}
                Err(e) if e.status() == HvStatus::INVALID_CONNECTION_ID => {
                    log::debug!("vmbus: version {version} refused: connection id {conn_id} unknown to the host");
                    connection.attempts.push((version, VersionAttempt::ConnectionIdUnknown));
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let response = connection.wait_for(MessageType::VERSION_RESPONSE, None, |m| match m {
                Message::VersionResponse(info) => Wait::Done(*info),
                _ => Wait::No,
            })?;
            if !response.version_supported {
                log::debug!("vmbus: version {version} refused by the host");
                connection.attempts.push((version, VersionAttempt::Refused));
                continue;
            }
            if response.connection_state != ConnectionState::SUCCESSFUL {
                return Err(ClientError::ConnectionRefused(response.connection_state));
            }
            connection.version = version;
            connection.attempts.push((version, VersionAttempt::Accepted));
            connection.msg_conn_id = if version.has_msg_conn_id() {
                match response.msg_conn_id {
                    Some(id) if id != 0 => id,
                    _ => return Err(ClientError::MissingMessageConnectionId),
                }
            } else {
                MESSAGE_CONNECTION_ID
            };
            return Ok(connection);
        }
        Err(ClientError::NoVersionAccepted)
    }

    /// Every version proposed while connecting, newest first, with the host's answer (the last one accepted).
    pub fn version_attempts(&self) -> &[(VmbusVersion, VersionAttempt)] {
        &self.attempts
    }

    /// The negotiated version.
    pub fn version(&self) -> VmbusVersion {
        self.version
    }

    /// The connection id used for control messages after INITIATE_CONTACT.
    pub fn message_connection_id(&self) -> u32 {
        self.msg_conn_id
    }

    /// The platform transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// Counters of received messages.
    pub fn stats(&self) -> ConnectionStats {
        self.stats
    }

    /// Asks for the host's offers and waits for ALLOFFERS_DELIVERED; returns the offers in the order received.
    pub fn request_offers(&mut self) -> Result<Vec<Offer>, ClientError> {
        self.post(&RequestOffers::new())?;
        self.wait_for(MessageType::ALLOFFERS_DELIVERED, None, |m| match m {
            Message::AllOffersDelivered => Wait::Done(()),
            _ => Wait::No,
        })?;
        self.all_offers_delivered = true;
        // Offers seen before ALLOFFERS_DELIVERED are the initial set, not hot adds.
        self.events.retain(|e| !matches!(e, Event::Offered(_)));
        Ok(self.offers().cloned().collect())
    }

    /// The current (not rescinded) offers, in the order received.
    pub fn offers(&self) -> impl Iterator<Item = &Offer> {
        self.offer_order
            .iter()
            .filter_map(|relid| self.channels.get(relid))
            .filter(|entry| !entry.rescinded)
            .map(|entry| &entry.offer)
    }

    /// The offer with this relid, if it is current.
    pub fn offer(&self, relid: u32) -> Option<&Offer> {
        self.channels.get(&relid).filter(|e| !e.rescinded).map(|e| &e.offer)
    }

    /// Processes whatever the host sent without waiting, and returns the next event, if any.
    pub fn poll(&mut self) -> Option<Event> {
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        while let Some(len) = self.transport.poll_message(&mut buf) {
            self.receive(&buf[..len.min(MAX_MESSAGE_SIZE)], |_| Wait::<()>::No);
        }
        self.events.pop_front()
    }

    /// Describes guest memory to the host: one range of `byte_count` bytes starting `byte_offset` bytes into the
    /// first of `pfns`, for channel `relid`. Returns when the host has confirmed it (GPADL_CREATED).
    pub fn create_gpadl(
        &mut self,
        relid: u32,
        pfns: &[u64],
        byte_offset: u32,
        byte_count: u32,
    ) -> Result<GpadlId, ClientError> {
        self.usable_channel(relid)?;
        let handle = self.next_gpadl;
        let messages = GpadlMessages::new(relid, handle, byte_offset, byte_count, pfns)?;
        self.next_gpadl = self.next_gpadl.wrapping_add(1).max(1);
        for message in messages {
            self.post_bytes(message.as_bytes())?;
        }
        let status = self.wait_for(MessageType::GPADL_CREATED, Some(relid), |m| match m {
            Message::GpadlCreated(c) if c.gpadl.get() == handle && c.child_relid.get() == relid => {
                Wait::Done(c.creation_status.get())
            }
            _ => Wait::No,
        })?;
        if status != 0 {
            return Err(ClientError::GpadlCreationFailed(status));
        }
        let id = GpadlId(handle);
        if let Some(entry) = self.channels.get_mut(&relid) {
            entry.gpadls.push(id);
        }
        Ok(id)
    }

    /// Tears a GPADL down and waits for GPADL_TORNDOWN. For a rescinded channel the host answers nothing; the
    /// handle is only forgotten.
    pub fn teardown_gpadl(&mut self, relid: u32, gpadl: GpadlId) -> Result<(), ClientError> {
        let entry = self.channels.get_mut(&relid).ok_or(ClientError::UnknownChannel(relid))?;
        let index = entry.gpadls.iter().position(|g| *g == gpadl).ok_or(ClientError::UnknownGpadl(gpadl.0))?;
        if entry.rescinded {
            entry.gpadls.remove(index);
            return Ok(());
        }
        self.post(&GpadlTeardown::new(relid, gpadl.0))?;
        self.wait_for(MessageType::GPADL_TORNDOWN, None, |m| match m {
            Message::GpadlTorndown(t) if t.gpadl.get() == gpadl.0 => Wait::Done(()),
            _ => Wait::No,
        })?;
        if let Some(entry) = self.channels.get_mut(&relid) {
            entry.gpadls.retain(|g| *g != gpadl);
        }
        Ok(())
    }

    /// Opens a channel whose two rings are described by `ring_gpadl`: the first `downstream_page_offset` pages are
    /// the outgoing (guest → host) ring, the rest the incoming ring (§6). `user_data` (at most 120 bytes) is the
    /// device-specific open data. Waits for OPENCHANNEL_RESULT.
    pub fn open_channel(
        &mut self,
        relid: u32,
        ring_gpadl: GpadlId,
        downstream_page_offset: u32,
        target_vp: u32,
        user_data: &[u8],
    ) -> Result<(), ClientError> {
        let entry = self.usable_channel(relid)?;
        if entry.state != ChannelState::Offered {
            return Err(ClientError::InvalidState(relid));
        }
        if !entry.gpadls.contains(&ring_gpadl) {
            return Err(ClientError::UnknownGpadl(ring_gpadl.0));
        }
        let mut data = [0u8; USER_DEFINED_SIZE];
        let Some(dst) = data.get_mut(..user_data.len()) else {
            return Err(ClientError::UserDataTooLong(user_data.len()));
        };
        dst.copy_from_slice(user_data);
        // The open id only has to match between request and answer; the relid serves.
        let open_id = relid;
        let mut open = OpenChannel::new(relid, open_id, ring_gpadl.0, target_vp, downstream_page_offset);
        open.user_data = data;
        self.post(&open)?;
        let status = self.wait_for(MessageType::OPENCHANNEL_RESULT, Some(relid), |m| match m {
            Message::OpenChannelResult(r) if r.child_relid.get() == relid && r.open_id.get() == open_id => {
                Wait::Done(r.status.get())
            }
            _ => Wait::No,
        })?;
        if status != 0 {
            return Err(ClientError::OpenFailed(status));
        }
        if let Some(entry) = self.channels.get_mut(&relid) {
            entry.state = ChannelState::Open;
        }
        Ok(())
    }

    /// Closes an open channel (CLOSECHANNEL has no answer). The channel's GPADLs stay; tear them down after this
    /// (versions ≥ 4.0 require that order). A rescinded channel is closed locally without a message.
    pub fn close_channel(&mut self, relid: u32) -> Result<(), ClientError> {
        let entry = self.channels.get_mut(&relid).ok_or(ClientError::UnknownChannel(relid))?;
        if entry.state != ChannelState::Open {
            return Err(ClientError::InvalidState(relid));
        }
        entry.state = ChannelState::Offered;
        if entry.rescinded {
            return Ok(());
        }
        self.post(&CloseChannel::new(relid))
    }

    /// Releases a rescinded channel after its owner closed it and tore its GPADLs down: sends RELID_RELEASED and
    /// forgets the offer.
    pub fn release_channel(&mut self, relid: u32) -> Result<(), ClientError> {
        let entry = self.channels.get(&relid).ok_or(ClientError::UnknownChannel(relid))?;
        if !entry.rescinded || entry.state == ChannelState::Open {
            return Err(ClientError::InvalidState(relid));
        }
        self.forget_and_release(relid)
    }

    /// Forgets a rescinded channel and tells the host its relid is free (RELID_RELEASED).
    fn forget_and_release(&mut self, relid: u32) -> Result<(), ClientError> {
        self.channels.remove(&relid);
        self.offer_order.retain(|r| *r != relid);
        self.post(&RelIdReleased::new(relid))
    }

    /// Retargets a channel's host → guest interrupts to another VP (MODIFYCHANNEL, ≥ 4.1). From 5.3 on the host
    /// answers and its status is checked.
    pub fn modify_channel(&mut self, relid: u32, target_vp: u32) -> Result<(), ClientError> {
        if !self.version.supports_modify_channel() {
            return Err(ClientError::NotSupported { version: self.version });
        }
        let entry = self.usable_channel(relid)?;
        if entry.state != ChannelState::Open {
            return Err(ClientError::InvalidState(relid));
        }
        self.post(&ModifyChannel::new(relid, target_vp))?;
        if self.version.has_modify_channel_response() {
            let status = self.wait_for(MessageType::MODIFYCHANNEL_RESPONSE, Some(relid), |m| match m {
                Message::ModifyChannelResponse(r) if r.child_relid.get() == relid => Wait::Done(r.status.get()),
                _ => Wait::No,
            })?;
            if status != 0 {
                return Err(ClientError::ModifyFailed(status));
            }
        }
        Ok(())
    }

    /// Disconnects (UNLOAD → UNLOAD_RESPONSE), as a guest must before reboot or power-off. Channels should be
    /// closed first; the host drops whatever is left.
    pub fn unload(&mut self) -> Result<(), ClientError> {
        self.post(&Unload::new())?;
        self.wait_for(MessageType::UNLOAD_RESPONSE, None, |m| match m {
            Message::UnloadResponse => Wait::Done(()),
            _ => Wait::No,
        })?;
        self.unloaded = true;
        Ok(())
    }

    /// Whether [`unload`](Self::unload) completed.
    pub fn is_unloaded(&self) -> bool {
        self.unloaded
    }

    fn usable_channel(&self, relid: u32) -> Result<&ChannelEntry, ClientError> {
        if self.unloaded {
            return Err(ClientError::Unloaded);
        }
        let entry = self.channels.get(&relid).ok_or(ClientError::UnknownChannel(relid))?;
        if entry.rescinded {
            return Err(ClientError::Rescinded(relid));
        }
        Ok(entry)
    }

    fn post<M: ControlMessage>(&self, message: &M) -> Result<(), ClientError> {
        self.post_bytes(MessageBuffer::from_message(message).as_bytes())
    }

    fn post_bytes(&self, bytes: &[u8]) -> Result<(), ClientError> {
        if self.unloaded {
            return Err(ClientError::Unloaded);
        }
        post_message_with_retry(
            &self.transport,
            &self.transport,
            self.msg_conn_id,
            POST_MESSAGE_TYPE,
            bytes,
            PostMessageRetry::new(),
        )
        .map_err(ClientError::from)
    }

    /// Waits for the message `matcher` accepts, handling everything else on the way. When `relid` is given, a
    /// rescind of that channel ends the wait with [`ClientError::Rescinded`].
    fn wait_for<R>(
        &mut self,
        waiting_for: MessageType,
        relid: Option<u32>,
        mut matcher: impl FnMut(&Message<'_>) -> Wait<R>,
    ) -> Result<R, ClientError> {
        let deadline = self.transport.now_ns().saturating_add(self.options.timeout_ns);
        let mut buf = [0u8; MAX_MESSAGE_SIZE];
        loop {
            while let Some(len) = self.transport.poll_message(&mut buf) {
                if let Some(result) = self.receive(&buf[..len.min(MAX_MESSAGE_SIZE)], &mut matcher) {
                    return Ok(result);
                }
                if let Some(relid) = relid
                    && self.channels.get(&relid).is_none_or(|e| e.rescinded)
                {
                    return Err(ClientError::Rescinded(relid));
                }
            }
            if self.transport.now_ns() >= deadline {
                return Err(ClientError::Timeout { waiting_for });
            }
            self.transport.wait();
        }
    }

    /// Handles one received message: the awaited answer is returned, anything else updates the connection.
    fn receive<R>(&mut self, bytes: &[u8], matcher: impl FnOnce(&Message<'_>) -> Wait<R>) -> Option<R> {
        let message = match parse(bytes) {
            Ok(message) => message,
            Err(e) => {
                self.stats.malformed += 1;
                log::warn!("vmbus: dropped a malformed message from the host: {e}");
                return None;
            }
        };
        self.stats.messages += 1;
        if let Wait::Done(result) = matcher(&message) {
            return Some(result);
        }
        match message {
            Message::OfferChannel(wire) => self.add_offer(Offer::from_wire(wire)),
            Message::RescindChannelOffer(rescind) => self.rescind(rescind.child_relid.get()),
            _ => {
                self.stats.unexpected += 1;
                log::warn!("vmbus: unexpected {} from the host", message.message_type());
            }
        }
        None
    }

    fn add_offer(&mut self, offer: Result<Offer, OfferError>) {
        let offer = match offer {
            Ok(offer) => offer,
            Err(e) => {
                self.stats.refused_offers += 1;
                log::warn!("vmbus: refused an offer: {e:?}");
                return;
            }
        };
        let relid = offer.child_relid;
        if self.channels.contains_key(&relid) {
            self.stats.refused_offers += 1;
            log::warn!("vmbus: refused a second offer for relid {relid}");
            return;
        }
        self.channels
            .insert(relid, ChannelEntry { offer, state: ChannelState::Offered, rescinded: false, gpadls: Vec::new() });
        self.offer_order.push(relid);
        self.events.push_back(Event::Offered(relid));
    }

    fn rescind(&mut self, relid: u32) {
        let Some(entry) = self.channels.get_mut(&relid) else {
            self.stats.unexpected += 1;
            log::warn!("vmbus: rescind of unknown relid {relid}");
            return;
        };
        if entry.rescinded {
            self.stats.unexpected += 1;
            return;
        }
        entry.rescinded = true;
        self.events.retain(|e| *e != Event::Offered(relid));
        self.events.push_back(Event::Rescinded(relid));
        // Nothing of ours holds an unopened channel without GPADLs: release it now.
        if entry.state == ChannelState::Offered
            && entry.gpadls.is_empty()
            && let Err(e) = self.forget_and_release(relid)
        {
            log::warn!("vmbus: RELID_RELEASED for {relid} failed: {e}");
        }
    }
}
