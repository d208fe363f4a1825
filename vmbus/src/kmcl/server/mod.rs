//! The server side of the KMCL: channels a host-side driver offers to a guest (`VmbChannelAllocate` with
//! `IsServer = TRUE`), with the same packet API as the client and the server-only methods
//! (`KMCL_SERVER_ONLY_METHODS`).
//!
//! Implements issue 7 §2 and the last sentence of issue 6 §7 over `kmcl-api.md` §Server-only methods and §Lifecycle
//! ("Server: Enable offers, Disable revokes the offer"), on the crate's VMBus host ([`crate::server`]).
//!
//! # Shape
//! [`ServerBus`] is the KMCL [`Engine`] over a [`ServerBackend`]: the packet engine (packets, completions, queues,
//! quotas, synchronous requests, callbacks) is the one the guest's [`super::Bus`] runs, only the rings are the host's
//! end of each channel ([`ServerEndpoint`]) and the control side is the [`Server`]'s. It implements [`Kmcl`] (so a
//! driver's callbacks get `&mut dyn Kmcl` exactly as on the client) and [`KmclServer`], the server-only methods;
//! inside a callback [`Kmcl::as_server`] gives the `&mut dyn KmclServer` of the same bus.
//!
//! The bus is generic over [`ServerTransport`], what it needs of the host: the [`Server`] state machine, offers and
//! rescinds delivered to the guest, open answers with the rings mapped, the host's endpoints, guest memory, time
//! and waiting. [`LoopbackBus`] implements it.
//!
//! # Lifecycle (server states of `kmcl-api.md`; the [`ChannelState`] names)
//! - `channel_allocate` → [`ChannelState::Disabled`]; the `InitSet*` functions (common and server-only) work here.
//! - `channel_enable` offers the channel ([`OfferSpec`] from the settings, opens held for the bus to answer) →
//!   [`ChannelState::Enabled`]. `_1` without callbacks or without `server_channel_init_set_target_interface_id`.
//! - The guest's OPENCHANNEL ([`ServerBus::poll`]): [`ChannelState::Opened`] and the `opened` callback (no rings
//!   yet: nothing can be sent from it). An error refuses the open: OPENCHANNEL_RESULT carries the callback's status
//!   (a success value becomes `STATUS_UNSUCCESSFUL`, so the guest always sees a failure) and the channel stays
//!   offered, [`ChannelState::Enabled`]. On success the open is accepted, the transport maps the rings (a guest
//!   whose rings cannot be mapped gets STATUS_INVALID_PARAMETER and the `closed` callback rolls `opened` back), and
//!   `started` → queue → `post_started` run as on the client ([`ChannelState::Active`]).
//! - The guest's CLOSECHANNEL (or its UNLOAD): `suspend` (if active) → sends cancelled → `closed` → GPADLs still
//!   mapped are unmapped (counted in [`super::BusStats::leaked_gpadls`]) → back to [`ChannelState::Enabled`]: the
//!   channel stays offered and the guest may open it again.
//! - `channel_disable`: the same teardown if open, then RESCIND_CHANNELOFFER; it waits up to
//!   [`RELEASE_WAIT_NS`] for the guest's RELID_RELEASED (the relid is only free then), running the idle hook and
//!   [`ServerTransport::wait`] meanwhile, and returns [`ChannelState::Disabled`] either way (an unreleased relid is
//!   counted in [`ServerBusStats::unreleased_rescinds`]; the server keeps it until the guest lets go).
//!   After a complete save ([`save`]) it skips the rescind: the offer and the guest's open wait for the restored
//!   channel.
//! - `channel_pause` / `channel_start` as on the client.
//!
//! `kmcl-api.md` names the server states Disabled/Enabled/Started/Stopped/Paused/Active; here Disabled and Enabled
//! (offered, not open) keep their names, Stopped (open, not started: the `opened` callback runs) is
//! [`ChannelState::Opened`], Started/Active is [`ChannelState::Active`] and Paused [`ChannelState::Paused`].
//!
//! # What a single thread cannot do
//! The bus runs only when called ([`ServerBus::poll`], [`ServerBus::process_interrupt`], a KMCL call). A synchronous
//! request waits by polling its ring, the idle hook ([`Engine::set_idle_hook`]) and [`ServerTransport::wait`]: when
//! guest and host share one thread (the loopback), the idle hook must give the guest its turn. For the same reason
//! a server's `post_started` should not wait for the guest: on one thread the guest is still inside its OPENCHANNEL
//! wait then (Windows would run both ends on different threads).
//!
//! # Statuses
//! As on the client (`_n` = the n-th parameter of the Windows function; a bad handle or the wrong state `_1`).
//! Client-only functions on a server channel (`channel_init_set_ring_buffer_page_count`, `channel_init_set_target`,
//! `channel_init_set_target_vp`, and GPADL creation: the guest owns the memory GPADLs describe) return `_1`.
//!
//! # Save and restore
//! [`save`]: a server channel's state into caller buffers in chunks, and back into a channel of a new bus that takes
//! the offer (and the guest's open) over — for a server driver that restarts while the guest keeps its channel.

use super::api::Kmcl;
use super::bus::{Backend, EndError, Engine};
use super::channel::{ChannelHandle, ChannelState, TargetInterface};
use super::gpadl::{GpadlFlags, GpadlHandle};
use super::handle::{Handles, KernelHandle, PartitionId};
use super::packet::PacketCompletion;
use super::status::{NtStatus, Result};
use crate::client::Offer;
use crate::memory::{GuestMemory, MemoryError, PageArena};
use crate::protocol::{GpadlRange, Guid, OfferFlags, PIPE_MODE_BYTE, PIPE_MODE_MESSAGE, USER_DEFINED_SIZE};
use crate::ring::{OutgoingPacket, RingError, SpaceRequest};
use crate::server::{
    EndpointError, GuestSignal, LoopbackBus, MapGpadlFlags, MappedGpadl, OfferSpec, ReceivedPacket, Server,
    ServerEndpoint, ServerError, ServerEvent,
};
use alloc::boxed::Box;
use alloc::collections::{BTreeSet, VecDeque};
use alloc::sync::Arc;
use alloc::vec::Vec;

/// How long `channel_disable` waits for the guest's RELID_RELEASED after the rescind (transport time).
pub const RELEASE_WAIT_NS: u64 = 100_000_000;

pub mod save;

use save::{PacketSaveRestore, RestoreProgress, SAVE_MIN_CHUNK, SaveProgress, SavedChannel};

/// What the server KMCL needs of the VMBus host it runs on (see the module documentation). The host signals the
/// guest through [`GuestSignal`].
///
/// The [`ServerBus`] takes every event of the [`Server`] ([`Server::pop_event`]) and acts on those of its own
/// channels; nothing else on the same server should rely on its events (the loopback's device models do not).
pub trait ServerTransport: GuestSignal {
    /// The guest memory the rings and GPADLs live in.
    type Memory: GuestMemory;

    /// Runs `f` on the control-protocol state machine (for events, GPADL mapping and observation).
    fn with_server<R>(&self, f: impl FnOnce(&mut Server) -> R) -> R;
    /// Offers a channel and delivers the offer; opens of it are held for [`ServerTransport::complete_open`]
    /// (`spec.confirm_opens` is set).
    fn offer(&self, spec: OfferSpec) -> core::result::Result<u32, ServerError>;
    /// Rescinds a channel and delivers the rescind.
    fn rescind(&self, relid: u32) -> core::result::Result<(), ServerError>;
    /// Answers a held open: status 0 maps the rings first (and refuses with STATUS_INVALID_PARAMETER when they
    /// cannot be mapped), anything else refuses with that status.
    fn complete_open(&self, relid: u32, status: u32) -> core::result::Result<(), ServerError>;
    /// The host's end of open channel `relid`, once per open.
    fn take_endpoint(&self, relid: u32) -> Option<ServerEndpoint<Self::Memory>>;
    /// A new host end of open channel `relid` over its rings as they stand, for a restored channel (the previous
    /// end was dropped with the saved channel).
    fn remap_endpoint(&self, relid: u32) -> Option<ServerEndpoint<Self::Memory>>;
    /// The guest memory (to read and write mapped GPADLs), if the transport has one.
    fn memory(&self) -> Option<&Self::Memory>;
    /// A monotonic clock in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Lets time pass and the guest's messages be handled (one step of a wait).
    fn wait(&self);
}

impl ServerTransport for LoopbackBus {
    type Memory = PageArena;

    fn with_server<R>(&self, f: impl FnOnce(&mut Server) -> R) -> R {
        LoopbackBus::with_server(self, f)
    }

    fn offer(&self, mut spec: OfferSpec) -> core::result::Result<u32, ServerError> {
        spec.confirm_opens = true;
        LoopbackBus::offer(self, spec)
    }

    fn rescind(&self, relid: u32) -> core::result::Result<(), ServerError> {
        LoopbackBus::rescind(self, relid)
    }

    /// Without guest memory the bus has no rings to map: an acceptance is refused with STATUS_INVALID_PARAMETER
    /// instead (the guest must never be told its channel is open when the host has no end of it).
    fn complete_open(&self, relid: u32, status: u32) -> core::result::Result<(), ServerError> {
        let status = if status == NtStatus::SUCCESS.0 && self.memory().is_none() {
            NtStatus::INVALID_PARAMETER.0
        } else {
            status
        };
        LoopbackBus::complete_open(self, relid, status)
    }

    fn take_endpoint(&self, relid: u32) -> Option<ServerEndpoint<PageArena>> {
        LoopbackBus::take_endpoint(self, relid)
    }

    fn remap_endpoint(&self, relid: u32) -> Option<ServerEndpoint<PageArena>> {
        LoopbackBus::remap_endpoint(self, relid)
    }

    fn memory(&self) -> Option<&PageArena> {
        LoopbackBus::memory(self)
    }

    fn now_ns(&self) -> u64 {
        LoopbackBus::now_ns(self)
    }

    fn wait(&self) {
        crate::client::VmbusTransport::wait(&self);
    }
}

impl<T: ServerTransport + ?Sized> ServerTransport for &T {
    type Memory = T::Memory;

    fn with_server<R>(&self, f: impl FnOnce(&mut Server) -> R) -> R {
        (**self).with_server(f)
    }

    fn offer(&self, spec: OfferSpec) -> core::result::Result<u32, ServerError> {
        (**self).offer(spec)
    }

    fn rescind(&self, relid: u32) -> core::result::Result<(), ServerError> {
        (**self).rescind(relid)
    }

    fn complete_open(&self, relid: u32, status: u32) -> core::result::Result<(), ServerError> {
        (**self).complete_open(relid, status)
    }

    fn take_endpoint(&self, relid: u32) -> Option<ServerEndpoint<T::Memory>> {
        (**self).take_endpoint(relid)
    }

    fn remap_endpoint(&self, relid: u32) -> Option<ServerEndpoint<T::Memory>> {
        (**self).remap_endpoint(relid)
    }

    fn memory(&self) -> Option<&T::Memory> {
        (**self).memory()
    }

    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }

    fn wait(&self) {
        (**self).wait()
    }
}

/// `VMBUS_SERVER_CHANNEL_INIT_FLAG_*` for `VmbServerChannelInitSetFlags`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServerChannelFlags(pub u32);

impl ServerChannelFlags {
    /// No flags.
    pub const NONE: ServerChannelFlags = ServerChannelFlags(0);
    /// 0x1: a loopback offer (the offer's `LOOPBACK` flag, 0x100).
    pub const LOOPBACK_OFFER: ServerChannelFlags = ServerChannelFlags(0x1);
    /// 0x2: the guest should enumerate a device interface (the offer's `ENUMERATE_DEVICE_INTERFACE`, 0x1).
    pub const ENUMERATE_DEVICE_INTERFACE: ServerChannelFlags = ServerChannelFlags(0x2);
    /// 0x4: offer a named pipe (the offer's `NAMED_PIPE_MODE`, 0x10; the user data starts with the pipe mode,
    /// [`KmclServer::server_channel_init_set_pipe_mode`]).
    pub const OFFER_AS_PIPE: ServerChannelFlags = ServerChannelFlags(0x4);
    /// 0x8: always a new channel. Every `channel_enable` of this bus makes a new offer with its own relid, so the
    /// flag is accepted and recorded but changes nothing (no offer is ever reused).
    pub const FORCE_NEW_CHANNEL: ServerChannelFlags = ServerChannelFlags(0x8);
    /// 0x10: an hv_sock provider offer (the offer's `TLNPI_PROVIDER`, 0x2000).
    pub const TLNPI_PROVIDER_OFFER: ServerChannelFlags = ServerChannelFlags(0x10);
    /// Every flag; any other bit is [`NtStatus::INVALID_PARAMETER_2`].
    pub const ALL: ServerChannelFlags = ServerChannelFlags(0x1F);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: ServerChannelFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The offer flags these become.
    pub fn offer_flags(self) -> OfferFlags {
        let mut flags = OfferFlags::empty();
        for (mine, wire) in [
            (Self::LOOPBACK_OFFER, OfferFlags::LOOPBACK),
            (Self::ENUMERATE_DEVICE_INTERFACE, OfferFlags::ENUMERATE_DEVICE_INTERFACE),
            (Self::OFFER_AS_PIPE, OfferFlags::NAMED_PIPE_MODE),
            (Self::TLNPI_PROVIDER_OFFER, OfferFlags::TLNPI_PROVIDER),
        ] {
            if self.contains(mine) {
                flags |= wire;
            }
        }
        flags
    }
}

/// The settings only a server channel has (the `VmbServerChannelInitSet*` values), fixed at `channel_enable`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerChannelSettings {
    /// `VmbServerChannelInitSetFlags`.
    pub flags: ServerChannelFlags,
    /// `VmbServerChannelInitSetMmioMegabytes`: (required, optional) MiB.
    pub mmio_megabytes: (u16, u16),
    /// `VmbServerChannelInitSetVmbusHandle`: the partition the channel is offered to.
    pub partition: Option<PartitionId>,
    /// `VmbServerChannelInitSetTargetVtl`.
    pub target_vtl: u8,
    /// The offer's user data (after the pipe mode for a pipe offer).
    pub user_data: Vec<u8>,
    /// The pipe mode of a pipe offer ([`PIPE_MODE_BYTE`] by default).
    pub pipe_mode: u32,
}

/// What a server channel keeps besides the common channel state ([`Backend::Extra`] of the [`ServerBackend`]):
/// its server-only settings, the GPADLs it mapped, and save/restore in progress. Opaque.
#[derive(Default)]
pub struct ServerChannelState {
    settings: ServerChannelSettings,
    /// GPADLs mapped through this channel now.
    mapped: Vec<MappedGpadl>,
    /// The driver's packet save/restore callbacks.
    packet_callbacks: Option<Box<dyn PacketSaveRestore>>,
    /// A save in progress: the saved bytes and how many were handed out.
    save: Option<(Vec<u8>, usize)>,
    /// The whole save was handed out and ended: `channel_disable` lets the channel go without rescinding it.
    saved: bool,
    /// Chunks of a restore, until complete.
    restore_buffer: Vec<u8>,
    /// A complete restore, for `channel_enable` to take over.
    restored: Option<SavedChannel>,
    /// `packet_restore` is allowed (inside `restore_packet` callbacks).
    restoring: bool,
}

impl ServerChannelSettings {
    /// The offer these settings make for `target`. [`NtStatus::INVALID_BUFFER_SIZE`] when the user data does not fit
    /// (116 bytes after a pipe mode).
    fn offer_spec(&self, target: &TargetInterface) -> Result<OfferSpec> {
        let mut spec = OfferSpec::new(target.interface_type, target.interface_instance.unwrap_or(Guid::ZERO));
        spec.flags = self.flags.offer_flags();
        spec.mmio_megabytes = self.mmio_megabytes.0;
        let start = if self.flags.contains(ServerChannelFlags::OFFER_AS_PIPE) {
            spec.user_defined[..4].copy_from_slice(&self.pipe_mode.to_le_bytes());
            4
        } else {
            0
        };
        let area =
            spec.user_defined.get_mut(start..start + self.user_data.len()).ok_or(NtStatus::INVALID_BUFFER_SIZE)?;
        area.copy_from_slice(&self.user_data);
        spec.confirm_opens = true;
        Ok(spec)
    }
}

/// What the server side of the bus counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerBusStats {
    /// Opens accepted (rings mapped, channel started).
    pub opens_accepted: u64,
    /// Opens refused by an `opened` callback.
    pub opens_refused: u64,
    /// Opens whose rings the transport could not map (refused with STATUS_INVALID_PARAMETER).
    pub rings_refused: u64,
    /// Closes by the guest (CLOSECHANNEL, UNLOAD or reconnect) of open channels.
    pub guest_closes: u64,
    /// Rescinds whose RELID_RELEASED did not come within [`RELEASE_WAIT_NS`].
    pub unreleased_rescinds: u64,
    /// Restored channels that took over an open channel.
    pub restored_opens: u64,
}

/// The host's end for the KMCL engine (see the module documentation).
pub struct ServerBackend<S: ServerTransport> {
    transport: S,
    handles: Arc<Handles>,
    events: VecDeque<ServerEvent>,
    released: BTreeSet<u32>,
    stats: ServerBusStats,
}

/// The server's KMCL bus: the [`Engine`] over a [`ServerBackend`] (see the module documentation).
pub type ServerBus<S> = Engine<ServerBackend<S>>;

impl<S: ServerTransport> ServerBus<S> {
    /// A server bus over `transport`. `handles` is the handle registry `server_channel_init_set_vmbus_handle`
    /// resolves kernel handles in.
    pub fn new(transport: S, handles: Arc<Handles>) -> Self {
        Engine::with_backend(ServerBackend {
            transport,
            handles,
            events: VecDeque::new(),
            released: BTreeSet::new(),
            stats: ServerBusStats::default(),
        })
    }

    /// The transport.
    pub fn transport(&self) -> &S {
        &self.backend.transport
    }

    /// What the server side counted.
    pub fn server_stats(&self) -> ServerBusStats {
        self.backend.stats
    }
}

/// The status a failed map or unmap becomes.
fn map_status(error: crate::server::MapGpadlError) -> NtStatus {
    error.status()
}

impl<S: ServerTransport> ServerBackend<S> {
    /// Answers the guest's OPENCHANNEL of `relid` (see the module documentation, §Lifecycle).
    fn accept_open(engine: &mut Engine<Self>, relid: u32) {
        let Some(channel) = engine.find_offered(relid) else {
            // Not a channel of this bus (another owner of the server answers it).
            return;
        };
        let Ok(c) = engine.chan_mut(channel) else { return };
        if c.state != ChannelState::Enabled || c.open.is_some() {
            log::warn!("kmcl server: {channel:?}: an open arrived in state {:?}; refused", c.state);
            if let Err(error) = engine.backend.transport.complete_open(relid, NtStatus::INVALID_DEVICE_STATE.0) {
                log::warn!("kmcl server: refusing the open of relid {relid}: {error}");
            }
            return;
        }
        c.state = ChannelState::Opened;
        c.rescinded = false;
        if let Some(Err(status)) = engine.call(channel, |cb, kmcl| cb.opened(kmcl, channel)) {
            let wire = if status.is_success() { NtStatus::UNSUCCESSFUL } else { status };
            log::debug!("kmcl server: {channel:?} refused the open of relid {relid}: {status}");
            engine.backend.stats.opens_refused += 1;
            if let Err(error) = engine.backend.transport.complete_open(relid, wire.0) {
                log::warn!("kmcl server: refusing the open of relid {relid}: {error}");
            }
            if let Ok(c) = engine.chan_mut(channel) {
                c.state = ChannelState::Enabled;
            }
            return;
        }
        let accepted = engine.backend.transport.complete_open(relid, NtStatus::SUCCESS.0);
        let endpoint = accepted.ok().and_then(|()| engine.backend.transport.take_endpoint(relid));
        let Some(endpoint) = endpoint else {
            engine.backend.stats.rings_refused += 1;
            log::warn!("kmcl server: {channel:?}: the rings of relid {relid} could not be mapped; open refused");
            engine.call(channel, |cb, kmcl| cb.closed(kmcl, channel));
            if let Ok(c) = engine.chan_mut(channel) {
                c.state = ChannelState::Enabled;
            }
            return;
        };
        engine.backend.stats.opens_accepted += 1;
        if let Ok(c) = engine.chan_mut(channel) {
            c.open = Some(endpoint);
        }
        engine.start_sequence(channel);
    }

    /// `channel_enable` of a restored channel: takes the saved offer over (and the open, if the guest still has it
    /// with the same rings) instead of offering anew.
    fn enable_restored(engine: &mut Engine<Self>, channel: ChannelHandle, saved: SavedChannel) -> Result<()> {
        let c = engine.chan(channel)?;
        if !saved.delivered.is_empty() && c.extra.packet_callbacks.is_none() {
            engine.chan_mut(channel)?.extra.restored = Some(saved);
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        let relid = saved.relid;
        let (summary, spec, open) = engine.backend.transport.with_server(|server| {
            let open = server.open_channel_info(relid).map(|info| (info.open_id, info.ring_gpadl));
            (server.channel(relid), server.offer_spec(relid).cloned(), open)
        });
        let (Some(summary), Some(spec)) = (summary, spec) else { return Err(NtStatus::NOT_FOUND) };
        if summary.rescinded
            || spec.interface_type != saved.interface_type
            || spec.interface_instance != saved.interface_instance
            || engine.find_offered(relid).is_some()
        {
            return Err(NtStatus::NOT_FOUND);
        }
        engine.backend.released.remove(&relid);
        let c = engine.chan_mut(channel)?;
        c.offer = Some(Offer {
            interface_type: spec.interface_type,
            interface_instance: spec.interface_instance,
            child_relid: relid,
            connection_id: summary.connection_id,
            flags: spec.flags,
            mmio_megabytes: spec.mmio_megabytes,
            user_defined: spec.user_defined,
            sub_channel_index: spec.sub_channel_index,
            monitor_id: summary.monitor_id,
            dedicated_interrupt: spec.dedicated_interrupt,
        });
        c.state = ChannelState::Enabled;
        c.rescinded = false;
        if saved.open.is_none() || saved.open != open {
            if saved.open.is_some() {
                log::debug!("kmcl server: {channel:?}: the guest closed relid {relid} after the save; offered only");
            }
            return Ok(());
        }
        let Some(endpoint) = engine.backend.transport.remap_endpoint(relid) else {
            engine.backend.stats.rings_refused += 1;
            log::warn!("kmcl server: {channel:?}: the rings of relid {relid} could not be mapped again");
            return Ok(());
        };
        let c = engine.chan_mut(channel)?;
        c.open = Some(endpoint);
        c.state = ChannelState::Opened;
        engine.restore_backlog(channel, saved.backlog, saved.next_transaction_id)?;
        let mut callbacks = engine.chan_mut(channel)?.extra.packet_callbacks.take();
        if let Some(callbacks) = callbacks.as_mut() {
            engine.chan_mut(channel)?.extra.restoring = true;
            engine.depth += 1;
            for (packet, driver) in &saved.delivered {
                callbacks.restore_packet(engine, channel, &save::encode_packet(packet), driver);
            }
            engine.depth -= 1;
        }
        if let Ok(c) = engine.chan_mut(channel) {
            c.extra.restoring = false;
            c.extra.packet_callbacks = callbacks;
        }
        engine.backend.stats.restored_opens += 1;
        engine.start_sequence(channel);
        engine.run_pending();
        Ok(())
    }

    /// Waits up to [`RELEASE_WAIT_NS`] for the guest's RELID_RELEASED of `relid`.
    fn wait_released(engine: &mut Engine<Self>, relid: u32) -> bool {
        let deadline = engine.backend.transport.now_ns().saturating_add(RELEASE_WAIT_NS);
        loop {
            Self::pump_control(engine);
            if engine.backend.released.remove(&relid) {
                return true;
            }
            if engine.backend.transport.now_ns() >= deadline {
                engine.backend.stats.unreleased_rescinds += 1;
                log::warn!("kmcl server: relid {relid} was not released by the guest in time");
                return false;
            }
            engine.run_idle_hook();
            engine.backend.transport.wait();
        }
    }
}

fn endpoint_error(error: EndpointError) -> EndError {
    match error {
        EndpointError::Ring(RingError::Full { needed, .. }) => EndError::Full { needed },
        EndpointError::Signal(_) => EndError::Signal,
        EndpointError::Closed => EndError::Failed(NtStatus::DEVICE_REMOVED),
        EndpointError::Ring(RingError::PacketTooLarge { .. }) => EndError::Failed(NtStatus::INVALID_BUFFER_SIZE),
        _ => EndError::Failed(NtStatus::UNSUCCESSFUL),
    }
}

impl<S: ServerTransport> super::bus::sealed::Sealed for ServerBackend<S> {}

impl<S: ServerTransport> Backend for ServerBackend<S> {
    type Open = ServerEndpoint<S::Memory>;
    type Extra = ServerChannelState;
    const IS_SERVER: bool = true;

    fn now_ns(&self) -> u64 {
        self.transport.now_ns()
    }

    fn wait(&self) {
        self.transport.wait();
    }

    fn write(&self, open: &mut Self::Open, packet: &OutgoingPacket<'_>) -> core::result::Result<(), EndError> {
        open.send(packet, &self.transport).map(|_| ()).map_err(endpoint_error)
    }

    fn receive(
        &self,
        open: &mut Self::Open,
        out: &mut Vec<core::result::Result<ReceivedPacket, RingError>>,
    ) -> core::result::Result<(), EndError> {
        match open.receive(&self.transport, |packet, _| out.push(ReceivedPacket::copy_of(packet))) {
            // The guest closed; the close event follows (nothing is wrong with the ring).
            Ok(_) | Err(EndpointError::Closed) => Ok(()),
            Err(error) => Err(endpoint_error(error)),
        }
    }

    fn request_space_signal(&self, open: &mut Self::Open, needed: u32) -> bool {
        matches!(open.request_space_signal(needed), Ok(SpaceRequest::Available))
    }

    fn pump_control(engine: &mut Engine<Self>) {
        let events = engine.backend.transport.with_server(|server| {
            let mut events = Vec::new();
            while let Some(event) = server.pop_event() {
                events.push(event);
            }
            events
        });
        for event in events {
            match event {
                ServerEvent::OpenRequested { .. } => engine.backend.events.push_back(event),
                ServerEvent::ChannelClosed { relid } => {
                    // The guest closed (or the connection went): sends fail and waits end at once.
                    if let Some(channel) = engine.find_relid(relid)
                        && let Ok(c) = engine.chan_mut(channel)
                    {
                        c.rescinded = true;
                    }
                    engine.backend.events.push_back(event);
                }
                ServerEvent::ChannelReleased { relid } => {
                    engine.backend.released.insert(relid);
                }
                _ => {}
            }
        }
    }

    fn handle_events(engine: &mut Engine<Self>) {
        while let Some(event) = engine.backend.events.pop_front() {
            match event {
                ServerEvent::OpenRequested { relid } => Self::accept_open(engine, relid),
                ServerEvent::ChannelClosed { relid } => {
                    if let Some(channel) = engine.find_relid(relid) {
                        engine.backend.stats.guest_closes += 1;
                        let was_active = engine.chan(channel).is_ok_and(|c| c.state == ChannelState::Active);
                        engine.teardown(channel, was_active, ChannelState::Enabled);
                    }
                }
                _ => {}
            }
        }
    }

    fn bind(_engine: &mut Engine<Self>, _channel: ChannelHandle) {}

    fn enable(engine: &mut Engine<Self>, channel: ChannelHandle) -> Result<()> {
        let c = engine.chan(channel)?;
        let target = c.settings.target.ok_or(NtStatus::INVALID_PARAMETER_1)?;
        if let Some(saved) = engine.chan_mut(channel)?.extra.restored.take() {
            return Self::enable_restored(engine, channel, saved);
        }
        let c = engine.chan(channel)?;
        let spec = c.extra.settings.offer_spec(&target)?;
        let relid = engine.backend.transport.offer(spec.clone()).map_err(|error| match error {
            ServerError::NoFreeRelid | ServerError::NoFreeMonitorId => NtStatus::INSUFFICIENT_RESOURCES,
            _ => NtStatus::UNSUCCESSFUL,
        })?;
        let summary = engine.backend.transport.with_server(|server| server.channel(relid));
        engine.backend.released.remove(&relid);
        let c = engine.chan_mut(channel)?;
        c.offer = Some(Offer {
            interface_type: spec.interface_type,
            interface_instance: spec.interface_instance,
            child_relid: relid,
            connection_id: summary.map_or(0, |s| s.connection_id),
            flags: spec.flags,
            mmio_megabytes: spec.mmio_megabytes,
            user_defined: spec.user_defined,
            sub_channel_index: 0,
            monitor_id: summary.and_then(|s| s.monitor_id),
            dedicated_interrupt: spec.dedicated_interrupt,
        });
        c.state = ChannelState::Enabled;
        c.rescinded = false;
        log::debug!("kmcl server: {channel:?} '{}' offered as relid {relid}", c.settings.friendly_name);
        Ok(())
    }

    fn disable(engine: &mut Engine<Self>, channel: ChannelHandle) -> Result<()> {
        let c = engine.chan(channel)?;
        let state = c.state;
        let relid = c.relid();
        if c.open.is_some() || matches!(state, ChannelState::Opened | ChannelState::Active | ChannelState::Paused) {
            if c.callbacks.is_none() {
                return Err(NtStatus::INVALID_DEVICE_STATE);
            }
            engine.teardown(channel, state == ChannelState::Active, ChannelState::Disabled);
        }
        let saved = core::mem::take(&mut engine.chan_mut(channel)?.extra.saved);
        if saved {
            // Saved: the offer (and the guest's open) stay for the restored channel to take over.
            log::debug!("kmcl server: {channel:?} released after its save; relid {relid:?} is not rescinded");
        } else if let Some(relid) = relid {
            match engine.backend.transport.rescind(relid) {
                Ok(()) => {
                    Self::wait_released(engine, relid);
                }
                Err(error) => log::warn!("kmcl server: rescinding relid {relid}: {error}"),
            }
        }
        let c = engine.chan_mut(channel)?;
        c.offer = None;
        c.rescinded = false;
        c.state = ChannelState::Disabled;
        Ok(())
    }

    fn close_rings(engine: &mut Engine<Self>, channel: ChannelHandle) {
        if let Ok(c) = engine.chan_mut(channel) {
            // Dropping the endpoint ends the host's use of the rings; the server closed its end already (guest close)
            // or does at the rescind that follows (disable).
            c.open = None;
            c.rescinded = false;
        }
    }

    fn release_leftover_gpadls(engine: &mut Engine<Self>, channel: ChannelHandle) {
        let Ok(c) = engine.chan_mut(channel) else { return };
        let leftover = core::mem::take(&mut c.extra.mapped);
        let Some(relid) = c.relid() else { return };
        for mapped in leftover {
            engine.stats_mut().leaked_gpadls += 1;
            log::warn!("kmcl server: {channel:?} left GPADL {:#x} mapped at close; unmapping it", mapped.handle);
            if let Err(error) = engine.backend.transport.with_server(|server| server.unmap_gpadl(relid, mapped.handle))
            {
                log::warn!("kmcl server: unmapping GPADL {:#x}: {error}", mapped.handle);
            }
        }
    }

    fn create_gpadl(
        _engine: &mut Engine<Self>,
        _channel: ChannelHandle,
        _flags: GpadlFlags,
        _pfns: &[u64],
        _byte_offset: u32,
        _byte_count: u32,
    ) -> Result<GpadlHandle> {
        // The guest owns the memory a GPADL describes: a server maps the guest's GPADLs instead.
        Err(NtStatus::INVALID_PARAMETER_1)
    }

    fn delete_gpadl(_engine: &mut Engine<Self>, _channel: ChannelHandle, _gpadl: GpadlHandle) -> Result<()> {
        Err(NtStatus::INVALID_PARAMETER_2)
    }

    fn as_server(engine: &mut Engine<Self>) -> Option<&mut dyn KmclServer> {
        Some(engine)
    }
}

/// The server-only methods (`KMCL_SERVER_ONLY_METHODS`) and the additions a server channel needs, on top of the
/// whole [`Kmcl`] interface. Object-safe; a callback reaches it through [`Kmcl::as_server`].
///
/// The `server_channel_init_set_*` functions work only while the channel is disabled (`_1` otherwise, and for a
/// stale handle).
pub trait KmclServer: Kmcl {
    /// `VmbServerChannelInitSetTargetInterfaceId`: the device class and instance to offer. Required before
    /// `channel_enable`.
    fn server_channel_init_set_target_interface_id(
        &mut self,
        channel: ChannelHandle,
        interface_type: Guid,
        interface_instance: Guid,
    ) -> Result<()>;

    /// `VmbServerChannelInitSetFlags`: `_2` for bits outside [`ServerChannelFlags::ALL`].
    fn server_channel_init_set_flags(&mut self, channel: ChannelHandle, flags: ServerChannelFlags) -> Result<()>;

    /// `VmbServerChannelInitSetMmioMegabytes`: [`NtStatus::INVALID_PARAMETER`] when both are 0; `_2`/`_3` above
    /// 65535 (the offer's field is 16 bits). The offer carries `megabytes`; `megabytes_optional` is recorded
    /// ([`KmclServer::server_channel_settings`]) but not sent: this crate's OFFERCHANNEL keeps that field reserved,
    /// as Linux and QEMU read it (only OpenVMM names it).
    fn server_channel_init_set_mmio_megabytes(
        &mut self,
        channel: ChannelHandle,
        megabytes: u32,
        megabytes_optional: u32,
    ) -> Result<()>;

    /// `VmbServerChannelInitSetVmbusHandle`: the partition to offer the channel to, as a kernel handle
    /// ([`Handles::vmb_convert_vmbus_handle_to_kernel_handle`]) resolved with [`Handles::resolve_partition`]: a
    /// closed or forged handle is [`NtStatus::INVALID_HANDLE`], a handle to another kind of object
    /// [`NtStatus::OBJECT_TYPE_MISMATCH`]. The partition is recorded ([`KmclServer::server_channel_partition`]);
    /// a [`ServerTransport`] serves one guest connection, so it does not route the offer.
    fn server_channel_init_set_vmbus_handle(&mut self, channel: ChannelHandle, handle: KernelHandle) -> Result<()>;

    /// `VmbServerChannelInitSetTargetVtl`: only VTL 0 (`_2` otherwise): the crate's server speaks to one guest
    /// connection, which is VTL 0's (no VTL 2 / paravisor connection exists).
    fn server_channel_init_set_target_vtl(&mut self, channel: ChannelHandle, vtl: u8) -> Result<()>;

    /// The offer's user data (no Windows function of its own; Windows servers fill it through the pipe and socket
    /// paths): at most 120 bytes (`_2`), 116 for a pipe offer, whose first 4 bytes are the pipe mode (checked at
    /// `channel_enable`: [`NtStatus::INVALID_BUFFER_SIZE`]).
    fn server_channel_init_set_offer_user_data(&mut self, channel: ChannelHandle, data: &[u8]) -> Result<()>;

    /// The pipe mode of an [`ServerChannelFlags::OFFER_AS_PIPE`] offer ([`PIPE_MODE_BYTE`] or
    /// [`PIPE_MODE_MESSAGE`]; `_2` otherwise). No Windows function of its own.
    fn server_channel_init_set_pipe_mode(&mut self, channel: ChannelHandle, mode: u32) -> Result<()>;

    /// `VmbServerChannelInitSetSaveRestorePacketCallbacks`: the driver's part of saving and restoring the packets
    /// it holds ([`PacketSaveRestore`]).
    fn server_channel_init_set_save_restore_packet_callbacks(
        &mut self,
        channel: ChannelHandle,
        callbacks: Box<dyn PacketSaveRestore>,
    ) -> Result<()>;

    /// The server-only settings as they stand (no Windows counterpart; for diagnostics and tests).
    fn server_channel_settings(&self, channel: ChannelHandle) -> Result<ServerChannelSettings>;

    /// The partition chosen with `server_channel_init_set_vmbus_handle`, if any.
    fn server_channel_partition(&self, channel: ChannelHandle) -> Result<Option<PartitionId>>;

    /// `VmbChannelMapGpadl`: maps the guest's GPADL `gpadl` (its handle in GPADL_HEADER) of this channel; the
    /// ranges come back instead of an MDL ([`MappedGpadl`]; bytes through
    /// [`KmclServer::channel_read_mapped_gpadl`] and [`KmclServer::channel_write_mapped_gpadl`]). Without
    /// [`MapGpadlFlags::READ_ONLY`] it asks for write access. `_1` channel not offered; `_2` unknown flags; `_3`
    /// unknown GPADL; [`NtStatus::ACCESS_DENIED`] a GPADL of another channel or write access to a read-only GPADL;
    /// [`NtStatus::INVALID_DEVICE_STATE`] already mapped (one mapping at a time) or being torn down. While mapped,
    /// the guest's `channel_delete_gpadl` waits: GPADL_TORNDOWN is held until unmapped (or until the channel
    /// closes and the bus unmaps what the driver left).
    fn channel_map_gpadl(&mut self, channel: ChannelHandle, flags: MapGpadlFlags, gpadl: u32) -> Result<MappedGpadl>;

    /// `VmbChannelUnmapGpadl`: `_1` channel not offered; `_3` not mapped (or unknown); a held GPADL_TORNDOWN goes
    /// out now.
    fn channel_unmap_gpadl(&mut self, channel: ChannelHandle, gpadl: u32) -> Result<()>;

    /// Reads `dst.len()` bytes at `offset` of a GPADL this channel mapped. `_2` not mapped here;
    /// `_3` outside the GPADL or guest memory.
    fn channel_read_mapped_gpadl(&self, channel: ChannelHandle, gpadl: u32, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Writes `src` at `offset` of a GPADL this channel mapped. As the read, and [`NtStatus::ACCESS_DENIED`] for a
    /// read-only mapping.
    fn channel_write_mapped_gpadl(&mut self, channel: ChannelHandle, gpadl: u32, offset: u64, src: &[u8])
    -> Result<()>;

    /// Reads `dst.len()` bytes at `offset` of an incoming packet's external data (its GPA-direct ranges, one after the
    /// other): what a Windows server does through the MDL of `VmbChannelPacketGetExternalData`. `_1` stale packet;
    /// [`NtStatus::NOT_FOUND`] the packet has no external data; `_2` outside the data;
    /// [`NtStatus::INVALID_USER_BUFFER`] the guest named pages outside its memory.
    fn packet_read_external_data(&self, packet: PacketCompletion, offset: u64, dst: &mut [u8]) -> Result<()>;

    /// Writes `src` at `offset` of an incoming packet's external data (the guest's buffer for the answer). Statuses
    /// as [`KmclServer::packet_read_external_data`].
    fn packet_write_external_data(&mut self, packet: PacketCompletion, offset: u64, src: &[u8]) -> Result<()>;

    /// `VmbChannelSaveBegin`: takes a snapshot of the channel for a restarted server driver to take over
    /// ([`save`] says what is saved and why sends in flight are not). Only while nothing is processed: the channel
    /// is offered and closed ([`ChannelState::Enabled`]) or paused; `_1` otherwise or while a save is in progress.
    /// [`NtStatus::INVALID_DEVICE_STATE`] when delivered packets are outstanding and the driver set no
    /// [`PacketSaveRestore`] callbacks (they could not be finished after the restore). The driver's
    /// `save_packet` runs for each outstanding packet now; from here on the driver must not complete those packets
    /// (the restored driver does), and the bus stops reading the channel's ring (what arrives stays there for the
    /// restored channel) until the save is abandoned or the channel closes.
    fn channel_save_begin(&mut self, channel: ChannelHandle) -> Result<()>;

    /// `VmbChannelSaveContinue`: copies the next bytes of the snapshot into `buffer`.
    /// [`SaveProgress::More`] (Windows: `STATUS_BUFFER_OVERFLOW`) means call again; [`SaveProgress::Done`] that it
    /// was the last chunk. [`NtStatus::BUFFER_TOO_SMALL`] for a buffer under [`save::SAVE_MIN_CHUNK`] bytes; `_1`
    /// without a save in progress.
    fn channel_save_continue(&mut self, channel: ChannelHandle, buffer: &mut [u8]) -> Result<SaveProgress>;

    /// `VmbChannelSaveEnd`: ends the save. When every chunk was handed out, the channel is released by its next
    /// `channel_disable` without rescinding the offer (the guest keeps its channel for the restored one); the
    /// callbacks still run (Suspend, Closed) and sends in flight are cancelled. `_1` without a save in progress.
    fn channel_save_end(&mut self, channel: ChannelHandle) -> Result<()>;

    /// `VmbChannelRestoreFromBuffer`: gives a new, disabled channel the saved bytes, one chunk per call (any split).
    /// [`RestoreProgress::MoreChunks`] (Windows: `STATUS_MORE_PROCESSING_REQUIRED`) until the last, then
    /// [`RestoreProgress::Done`]: the settings are the saved ones, and `channel_enable` takes over the saved offer
    /// instead of making a new one — and, if the guest still has it open with the same rings, the open: the rings
    /// are mapped again, the saved packets not yet delivered are queued, each outstanding one comes back through
    /// [`PacketSaveRestore::restore_packet`], and Started → queue → PostStarted run (not Opened: the guest's open
    /// was accepted before the save). That `channel_enable` fails with [`NtStatus::NOT_FOUND`] when the offer is
    /// gone (rescinded, or another interface), and [`NtStatus::INVALID_DEVICE_STATE`] when outstanding packets were
    /// saved but the channel has no [`PacketSaveRestore`]. `_1` channel not disabled or already restored; `_2` bytes
    /// that are not a saved channel or hold settings the `InitSet*` functions would refuse.
    fn channel_restore_from_buffer(&mut self, channel: ChannelHandle, buffer: &[u8]) -> Result<RestoreProgress>;

    /// `VmbPacketRestore`: the packet `library_data` describes (as [`PacketSaveRestore::restore_packet`] received it),
    /// to be completed as any incoming packet. Only inside `restore_packet` (`_1` otherwise); `_2` malformed data.
    fn packet_restore(&mut self, channel: ChannelHandle, library_data: &[u8]) -> Result<PacketCompletion>;
}

impl<S: ServerTransport> ServerBus<S> {
    fn mapped(&self, channel: ChannelHandle, gpadl: u32) -> Result<&MappedGpadl> {
        let c = self.chan(channel)?;
        c.extra.mapped.iter().find(|m| m.handle == gpadl).ok_or(NtStatus::INVALID_PARAMETER_2)
    }
}

/// The external data of an incoming packet as a mapping (its ranges one after the other), and the guest memory.
fn external_mapping<S: ServerTransport>(
    bus: &ServerBus<S>,
    packet: PacketCompletion,
) -> Result<(MappedGpadl, &S::Memory)> {
    let ranges = bus.packet_external_data(packet)?;
    let memory = bus.backend.transport.memory().ok_or(NtStatus::INVALID_DEVICE_STATE)?;
    let ranges = ranges
        .into_iter()
        .map(|r| GpadlRange { byte_offset: r.byte_offset, byte_count: r.byte_count, pfns: r.pfns })
        .collect();
    Ok((MappedGpadl { relid: 0, handle: 0, ranges, writable: true }, memory))
}

fn external_status(error: MemoryError) -> NtStatus {
    match error {
        MemoryError::OutsideBuffer { .. } => NtStatus::INVALID_PARAMETER_2,
        _ => NtStatus::INVALID_USER_BUFFER,
    }
}

impl<S: ServerTransport> ServerBus<S> {
    /// Takes a restored channel's settings through the `InitSet*` functions, so a saved value passes exactly the
    /// checks a driver's call would (`_2` for any refused, and then none is taken), and keeps the rest for
    /// `channel_enable`.
    fn apply_saved(&mut self, channel: ChannelHandle, saved: SavedChannel) -> Result<()> {
        let c = self.chan(channel)?;
        let before = (c.settings.clone(), c.extra.settings.clone());
        let applied = self.apply_saved_settings(channel, &saved);
        let c = self.chan_mut(channel)?;
        match applied {
            Ok(()) => {
                c.extra.restored = Some(saved);
                Ok(())
            }
            Err(_) => {
                (c.settings, c.extra.settings) = before;
                Err(NtStatus::INVALID_PARAMETER_2)
            }
        }
    }

    fn apply_saved_settings(&mut self, channel: ChannelHandle, saved: &SavedChannel) -> Result<()> {
        self.server_channel_init_set_target_interface_id(channel, saved.interface_type, saved.interface_instance)?;
        self.server_channel_init_set_flags(channel, ServerChannelFlags(saved.flags))?;
        self.server_channel_init_set_target_vtl(channel, saved.target_vtl)?;
        self.server_channel_init_set_pipe_mode(channel, saved.pipe_mode)?;
        self.server_channel_init_set_offer_user_data(channel, &saved.user_data)?;
        let (megabytes, optional) = saved.mmio_megabytes;
        if (megabytes, optional) != (0, 0) {
            self.server_channel_init_set_mmio_megabytes(channel, megabytes.into(), optional.into())?;
        }
        self.channel_init_set_maximum_packet_size(channel, saved.maximum_packet_size)?;
        let (data_size, chain_length) = saved.maximum_external_data;
        if (data_size, chain_length) != (0, 0) {
            self.channel_init_set_maximum_external_data(channel, data_size, chain_length)?;
        }
        self.channel_init_set_client_context_size(channel, saved.client_context_size)?;
        self.channel_init_set_maximum_packet_count(channel, saved.maximum_packet_count)?;
        self.channel_init_set_friendly_name(channel, &saved.friendly_name)?;
        // Values no `InitSet*` call refuses: a quota of 0 (no limit), and the partition the saved handle resolved to.
        let c = self.chan_mut(channel)?;
        c.settings.transaction_quota = saved.transaction_quota;
        c.extra.settings.partition = saved.partition.map(PartitionId);
        Ok(())
    }
}

fn memory_status(error: MemoryError) -> NtStatus {
    match error {
        MemoryError::ReadOnly => NtStatus::ACCESS_DENIED,
        _ => NtStatus::INVALID_PARAMETER_3,
    }
}

impl<S: ServerTransport> KmclServer for ServerBus<S> {
    fn server_channel_init_set_target_interface_id(
        &mut self,
        channel: ChannelHandle,
        interface_type: Guid,
        interface_instance: Guid,
    ) -> Result<()> {
        self.disabled_mut(channel)?.settings.target =
            Some(TargetInterface { interface_type, interface_instance: Some(interface_instance) });
        Ok(())
    }

    fn server_channel_init_set_flags(&mut self, channel: ChannelHandle, flags: ServerChannelFlags) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if flags.0 & !ServerChannelFlags::ALL.0 != 0 {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.extra.settings.flags = flags;
        Ok(())
    }

    fn server_channel_init_set_mmio_megabytes(
        &mut self,
        channel: ChannelHandle,
        megabytes: u32,
        megabytes_optional: u32,
    ) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if megabytes == 0 && megabytes_optional == 0 {
            return Err(NtStatus::INVALID_PARAMETER);
        }
        let megabytes = u16::try_from(megabytes).map_err(|_| NtStatus::INVALID_PARAMETER_2)?;
        let optional = u16::try_from(megabytes_optional).map_err(|_| NtStatus::INVALID_PARAMETER_3)?;
        c.extra.settings.mmio_megabytes = (megabytes, optional);
        Ok(())
    }

    fn server_channel_init_set_vmbus_handle(&mut self, channel: ChannelHandle, handle: KernelHandle) -> Result<()> {
        self.disabled_mut(channel)?;
        let partition = self.backend.handles.resolve_partition(handle)?;
        self.disabled_mut(channel)?.extra.settings.partition = Some(partition.id());
        Ok(())
    }

    fn server_channel_init_set_target_vtl(&mut self, channel: ChannelHandle, vtl: u8) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if vtl != 0 {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.extra.settings.target_vtl = vtl;
        Ok(())
    }

    fn server_channel_init_set_offer_user_data(&mut self, channel: ChannelHandle, data: &[u8]) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if data.len() > USER_DEFINED_SIZE {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.extra.settings.user_data = data.to_vec();
        Ok(())
    }

    fn server_channel_init_set_pipe_mode(&mut self, channel: ChannelHandle, mode: u32) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if mode != PIPE_MODE_BYTE && mode != PIPE_MODE_MESSAGE {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.extra.settings.pipe_mode = mode;
        Ok(())
    }

    fn server_channel_init_set_save_restore_packet_callbacks(
        &mut self,
        channel: ChannelHandle,
        callbacks: Box<dyn PacketSaveRestore>,
    ) -> Result<()> {
        self.disabled_mut(channel)?.extra.packet_callbacks = Some(callbacks);
        Ok(())
    }

    fn server_channel_settings(&self, channel: ChannelHandle) -> Result<ServerChannelSettings> {
        Ok(self.chan(channel)?.extra.settings.clone())
    }

    fn server_channel_partition(&self, channel: ChannelHandle) -> Result<Option<PartitionId>> {
        Ok(self.chan(channel)?.extra.settings.partition)
    }

    fn channel_map_gpadl(&mut self, channel: ChannelHandle, flags: MapGpadlFlags, gpadl: u32) -> Result<MappedGpadl> {
        let relid = self.chan(channel)?.relid().ok_or(NtStatus::INVALID_PARAMETER_1)?;
        let mapped =
            self.backend.transport.with_server(|server| server.map_gpadl(relid, flags, gpadl)).map_err(map_status)?;
        self.chan_mut(channel)?.extra.mapped.push(mapped.clone());
        Ok(mapped)
    }

    fn channel_unmap_gpadl(&mut self, channel: ChannelHandle, gpadl: u32) -> Result<()> {
        let relid = self.chan(channel)?.relid().ok_or(NtStatus::INVALID_PARAMETER_1)?;
        self.backend.transport.with_server(|server| server.unmap_gpadl(relid, gpadl)).map_err(map_status)?;
        self.chan_mut(channel)?.extra.mapped.retain(|m| m.handle != gpadl);
        Ok(())
    }

    fn channel_read_mapped_gpadl(&self, channel: ChannelHandle, gpadl: u32, offset: u64, dst: &mut [u8]) -> Result<()> {
        let mapped = self.mapped(channel, gpadl)?;
        let memory = self.backend.transport.memory().ok_or(NtStatus::INVALID_DEVICE_STATE)?;
        mapped.read(memory, offset, dst).map_err(memory_status)
    }

    fn channel_write_mapped_gpadl(
        &mut self,
        channel: ChannelHandle,
        gpadl: u32,
        offset: u64,
        src: &[u8],
    ) -> Result<()> {
        let mapped = self.mapped(channel, gpadl)?;
        let memory = self.backend.transport.memory().ok_or(NtStatus::INVALID_DEVICE_STATE)?;
        mapped.write(memory, offset, src).map_err(memory_status)
    }

    fn packet_read_external_data(&self, packet: PacketCompletion, offset: u64, dst: &mut [u8]) -> Result<()> {
        let (mapping, memory) = external_mapping(self, packet)?;
        mapping.read(memory, offset, dst).map_err(external_status)
    }

    fn packet_write_external_data(&mut self, packet: PacketCompletion, offset: u64, src: &[u8]) -> Result<()> {
        let (mapping, memory) = external_mapping(self, packet)?;
        mapping.write(memory, offset, src).map_err(external_status)
    }

    fn channel_save_begin(&mut self, channel: ChannelHandle) -> Result<()> {
        let c = self.chan(channel)?;
        if !matches!(c.state, ChannelState::Enabled | ChannelState::Paused) || c.extra.save.is_some() {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        let relid = c.relid().ok_or(NtStatus::INVALID_PARAMETER_1)?;
        let target = c.settings.target.ok_or(NtStatus::INVALID_PARAMETER_1)?;
        let is_open = c.open.is_some();
        let (backlog, delivered, next_transaction_id) = self.packets_to_save(channel)?;
        if !delivered.is_empty() && c.extra.packet_callbacks.is_none() {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        let open = if is_open {
            self.backend
                .transport
                .with_server(|server| server.open_channel_info(relid).map(|i| (i.open_id, i.ring_gpadl)))
        } else {
            None
        };
        let mut callbacks = self.chan_mut(channel)?.extra.packet_callbacks.take();
        let delivered: Vec<_> = delivered
            .into_iter()
            .map(|(packet, saved)| {
                let driver = callbacks.as_mut().map(|cb| cb.save_packet(channel, packet)).unwrap_or_default();
                (saved, driver)
            })
            .collect();
        let c = self.chan_mut(channel)?;
        c.extra.packet_callbacks = callbacks;
        let settings = &c.extra.settings;
        let saved = SavedChannel {
            interface_type: target.interface_type,
            interface_instance: target.interface_instance.unwrap_or(Guid::ZERO),
            flags: settings.flags.0,
            mmio_megabytes: settings.mmio_megabytes,
            target_vtl: settings.target_vtl,
            pipe_mode: settings.pipe_mode,
            partition: settings.partition.map(|p| p.0),
            maximum_packet_size: c.settings.maximum_packet_size,
            maximum_external_data: c.settings.maximum_external_data,
            client_context_size: c.settings.client_context_size,
            maximum_packet_count: c.settings.maximum_packet_count,
            transaction_quota: c.settings.transaction_quota,
            friendly_name: c.settings.friendly_name.clone(),
            user_data: settings.user_data.clone(),
            relid,
            open,
            next_transaction_id,
            backlog,
            delivered,
        };
        c.extra.save = Some((saved.encode(), 0));
        c.extra.saved = false;
        c.ring_held = true;
        Ok(())
    }

    fn channel_save_continue(&mut self, channel: ChannelHandle, buffer: &mut [u8]) -> Result<SaveProgress> {
        let c = self.chan_mut(channel)?;
        let (bytes, handed) = c.extra.save.as_mut().ok_or(NtStatus::INVALID_PARAMETER_1)?;
        if buffer.len() < SAVE_MIN_CHUNK {
            return Err(NtStatus::BUFFER_TOO_SMALL);
        }
        let rest = &bytes[*handed..];
        let n = rest.len().min(buffer.len());
        buffer[..n].copy_from_slice(&rest[..n]);
        *handed += n;
        Ok(if *handed == bytes.len() { SaveProgress::Done(n) } else { SaveProgress::More(n) })
    }

    fn channel_save_end(&mut self, channel: ChannelHandle) -> Result<()> {
        let c = self.chan_mut(channel)?;
        let (bytes, handed) = c.extra.save.take().ok_or(NtStatus::INVALID_PARAMETER_1)?;
        c.extra.saved = handed == bytes.len();
        // An abandoned save gives the ring back to the channel.
        c.ring_held = c.extra.saved;
        Ok(())
    }

    fn channel_restore_from_buffer(&mut self, channel: ChannelHandle, buffer: &[u8]) -> Result<RestoreProgress> {
        let c = self.disabled_mut(channel)?;
        if c.extra.restored.is_some() {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        if buffer.is_empty() {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.extra.restore_buffer.extend_from_slice(buffer);
        let decoded = match SavedChannel::announced_len(&c.extra.restore_buffer) {
            Ok(Some(total)) if c.extra.restore_buffer.len() == total => SavedChannel::decode(&c.extra.restore_buffer),
            Ok(Some(total)) if c.extra.restore_buffer.len() > total => Err(NtStatus::INVALID_PARAMETER_2),
            Ok(_) => return Ok(RestoreProgress::MoreChunks),
            Err(status) => Err(status),
        };
        c.extra.restore_buffer = Vec::new();
        self.apply_saved(channel, decoded?).map(|()| RestoreProgress::Done)
    }

    fn packet_restore(&mut self, channel: ChannelHandle, library_data: &[u8]) -> Result<PacketCompletion> {
        if !self.chan(channel)?.extra.restoring {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        let packet = save::decode_packet(library_data)?;
        self.restore_incoming(channel, packet)
    }
}
