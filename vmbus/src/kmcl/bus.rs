//! The KMCL bus: the [`Engine`] that keeps the table of KMCL channels, implements [`Kmcl`] and dispatches
//! interrupts and control messages to the drivers' callbacks, over one end of VMBus (a [`Backend`]). [`Bus`] is the
//! guest's: the engine over a [`ClientBackend`], which owns the VMBus [`Connection`], the platform's
//! [`InterruptPages`] and a [`RingAllocator`]. The host's is [`super::server::ServerBus`].
//!
//! Implements `kmcl-api.md` §Client interface, §Callbacks and §Lifecycle over the guest's control protocol
//! (`hyperv-vmbus.md` §5) and rings (§6).
//!
//! # One engine, two ends
//! Everything a driver sees of packets — allocation, sends with and without `WAIT_FOR_COMPLETION`, the send queue
//! when a ring is full, completions matched by transaction id, synchronous requests, the incoming backlog,
//! transaction quota, deferral to task context, pause and start — is the engine's and the same on both ends. A
//! [`Backend`] supplies only what differs: the rings of an open channel in its orientation (the guest's
//! [`Channel`], the host's [`crate::server::ServerEndpoint`]), time and waiting, and the control side (binding and
//! opening on the guest; offering, accepting opens and rescinding on the host).
//!
//! # Dispatch
//! The kernel calls [`Bus::process_interrupt`] from its VMBus interrupt with the relids whose event flags were set,
//! and [`Bus::poll`] whenever it wants control messages (offers, rescinds) handled. Both drain the rings of the
//! channels concerned: completions are matched to sent packets by transaction id and run their completion routines;
//! data packets go to `process_packet` in order, as long as the channel is started, its transaction quota allows and
//! no callback of the same channel is running (packets are queued meanwhile and delivered when it returns); when a
//! ring went from non-empty to empty, `processing_complete` follows.
//!
//! # Waiting
//! The unikernel has one thread per VP and no scheduler under this layer, so a synchronous request (or a blocking
//! control request such as a GPADL) waits by polling: it drains the channel's incoming ring (completions are matched,
//! other packets queued), looks at control messages, runs the idle hook ([`Bus::set_idle_hook`]) and calls
//! [`VmbusTransport::wait`]. Time limits use [`VmbusTransport::now_ns`].
//!
//! # What the other end may do
//! Everything that comes from the other end (the host; for a [`super::server::ServerBus`], the guest) is checked: a completion whose transaction id matches nothing, a packet larger
//! than the channel's maximum, a completion larger than the maximum packet size, a corrupt ring — each is counted in
//! [`BusStats`] (and a corrupt ring stops the channel's queue); none panics.

use super::api::Kmcl;
use super::channel::{
    ChannelCallbacks, ChannelHandle, ChannelInitFlags, ChannelSettings, ChannelState, Context, MAX_CLIENT_CONTEXT_SIZE,
    MAX_EXTERNAL_CHAIN_LENGTH, MAX_PACKET_SIZE_LIMIT, MAX_RING_PAGES, TargetInterface,
};
use super::gpadl::{GpadlFlags, GpadlHandle, PhysicalBuffer};
use super::mmio::{MIB, MmioAllocator, MmioRange};
use super::packet::{
    CompletionRoutine, ExternalRange, PacketCompletion, PacketHandle, ProcessPacketFlags, SendFlags, sizeof_packet,
};
use super::slots::Slots;
use super::status::{NtStatus, Result};
use crate::channel::{Channel, ChannelError, ChannelRings, InterruptPages};
use crate::client::{ClientError, Connection, Event, Offer, VmbusTransport};
use crate::protocol::{Guid, OfferFlags};
use crate::ring::{
    OutgoingGpaRange, OutgoingKind, OutgoingPacket, PacketFlags, PacketType, RingError, RingMemory, SpaceRequest,
};
use crate::server::ReceivedPacket;
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

/// Where channel rings come from: the kernel implements it over its contiguous heap, tests over shared
/// [`crate::ring::OwnedRingMemory`] so they can play the host's end of both rings.
pub trait RingAllocator {
    /// The memory of one ring.
    type Memory: RingMemory;
    /// What keeps the pages allocated until [`RingAllocator::release`] (the kernel's lease of heap pages).
    type Lease;

    /// Allocates a channel's two rings of `outgoing_pages` and `incoming_pages` pages (control page included).
    /// [`NtStatus::INSUFFICIENT_RESOURCES`] (or another status) when it cannot.
    fn allocate(&self, outgoing_pages: u32, incoming_pages: u32) -> Result<(ChannelRings<Self::Memory>, Self::Lease)>;

    /// Gives the pages back. `host_released` is false when the host did not confirm the ring GPADL's teardown: it
    /// may still write the pages, so they must never be reused.
    fn release(&self, lease: Self::Lease, host_released: bool);
}

/// Data packets held per channel (read from the ring, not yet delivered) before the bus stops reading that ring; the
/// rest waits in the ring, where it holds back the host.
pub const BACKLOG_LIMIT: usize = 1024;

/// Longest friendly name accepted, in bytes.
pub const MAX_FRIENDLY_NAME_LEN: usize = 256;

/// What the bus saw go wrong (or delivered); every host misbehaviour is counted here instead of panicking.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BusStats {
    /// Data packets handed to `process_packet`.
    pub delivered: u64,
    /// Completions whose transaction id matched nothing outstanding (a lying or confused host), dropped.
    pub unknown_completions: u64,
    /// Completions of synchronous requests that had been cancelled (timed out), dropped.
    pub late_completions: u64,
    /// Data packets above the channel's maximum packet size or external-data limits, dropped.
    pub oversized_packets: u64,
    /// Completions above the maximum packet size, cut (their routine saw [`NtStatus::BUFFER_OVERFLOW`]).
    pub oversized_completions: u64,
    /// Packets of a type a client does not take, or with a malformed header, dropped.
    pub unexpected_packets: u64,
    /// Ring errors (a corrupt ring stops the channel's incoming queue).
    pub ring_errors: u64,
    /// GPADLs the driver left at its `closed` callback, deleted by the bus.
    pub leaked_gpadls: u64,
    /// Signals to the host that failed (the packet was in the ring).
    pub signal_errors: u64,
}

/// A packet copied out of the ring.
struct Received {
    /// Deferred by `packet_defer_to_task`: delivered again only in task context.
    task_only: bool,
    transaction_id: u64,
    completion_requested: bool,
    payload: Vec<u8>,
    external: Vec<ExternalRange>,
}

/// What the ring held.
enum Copied {
    Completion { transaction_id: u64, payload: Vec<u8> },
    Data(Received),
    Dropped,
}

/// Who waits for a transaction id's completion.
enum Waiter {
    /// A sent packet with `WAIT_FOR_COMPLETION`.
    Packet { index: u32, generation: u32 },
    /// A synchronous request still waiting.
    SyncWaiting,
    /// A synchronous request whose completion arrived.
    SyncDone(Vec<u8>),
    /// A synchronous request given up (timed out): its completion is dropped when it comes.
    SyncAbandoned,
}

/// A packet's completion routine slot.
enum Routine {
    /// `packet_initialize`: must be set before sending.
    Unset,
    /// `packet_allocate`'s default: free the packet.
    FreeOnCompletion,
    /// The driver's routine.
    Custom(CompletionRoutine),
    /// Taken out while it runs.
    Running,
}

/// An outgoing packet object.
struct SentPacket {
    memory: Option<Box<[u8]>>,
    inline_context: Vec<u8>,
    from_pool: bool,
    routine: Routine,
    pointer: Option<Context>,
    in_flight: bool,
}

/// An incoming packet as a server channel's save keeps it (`kmcl::server`): its header facts, payload and external
/// ranges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SavedPacket {
    pub(super) transaction_id: u64,
    pub(super) completion_requested: bool,
    pub(super) payload: Vec<u8>,
    pub(super) external: Vec<ExternalRange>,
}

/// What a save takes of a channel's packets: the read and undelivered ones, the delivered and uncompleted ones
/// (with their handles), and the next transaction id.
pub(super) type PacketsToSave = (Vec<SavedPacket>, Vec<(PacketCompletion, SavedPacket)>, u64);

/// An incoming packet delivered and not yet completed.
struct IncomingRecord {
    transaction_id: u64,
    completion_requested: bool,
    external: Vec<ExternalRange>,
    client_context: Vec<u8>,
}

/// A packet waiting for ring space.
struct QueuedSend {
    transaction_id: u64,
    payload: Vec<u8>,
    external: Vec<ExternalRange>,
    completion_requested: bool,
    is_completion: bool,
    /// The packet whose routine runs once this is in the ring (sends without `WAIT_FOR_COMPLETION`).
    notify: Option<(u32, u32)>,
}

/// A client channel's open rings and what keeps their pages.
pub struct OpenRings<M: RingMemory, L> {
    channel: Channel<M>,
    lease: L,
}

/// Why a ring operation of a [`Backend`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndError {
    /// The outgoing ring has no room; `needed` bytes must be free (0 if unknown).
    Full {
        /// Bytes the packet needs.
        needed: u32,
    },
    /// The packet is in the ring but signalling the other end failed.
    Signal,
    /// Anything else (a corrupt ring, a closed end), as the status the caller sees.
    Failed(NtStatus),
}

pub(super) mod sealed {
    /// Only this crate's buses implement [`super::Backend`].
    pub trait Sealed {}
}

/// What one end of VMBus gives the KMCL engine ([`Engine`]): the rings of an open channel in that end's orientation,
/// time and waiting, and the control side (binding and opening on the guest, offering and accepting opens on the
/// host). [`ClientBackend`] is the guest's ([`Bus`]); [`super::server::ServerBackend`] the host's
/// ([`super::server::ServerBus`]). The packet engine — packets, completions, queues, quotas, callbacks — is the
/// [`Engine`]'s alone, so both ends behave the same. Sealed: only this crate implements it.
pub trait Backend: Sized + sealed::Sealed {
    /// What an open channel holds: its rings (and what keeps their memory).
    type Open;
    /// Per-channel settings only this end has (the server's `ServerChannelInitSet*` values).
    type Extra: Default;
    /// Whether channels of this end are server channels (`VmbChannelAllocate(IsServer = TRUE)`): the client-only
    /// `InitSet*` functions and GPADL creation refuse them with `_1`.
    const IS_SERVER: bool;

    /// A monotonic clock in nanoseconds.
    fn now_ns(&self) -> u64;
    /// Waits until something may have happened (one step of a synchronous wait).
    fn wait(&self);
    /// Writes one packet to the outgoing ring, signalling the other end if the ring rules say so.
    fn write(&self, open: &mut Self::Open, packet: &OutgoingPacket<'_>) -> core::result::Result<(), EndError>;
    /// Drains the incoming ring, each packet copied (or the reason it could not be).
    fn receive(
        &self,
        open: &mut Self::Open,
        out: &mut Vec<core::result::Result<ReceivedPacket, RingError>>,
    ) -> core::result::Result<(), EndError>;
    /// Asks the other end to signal when `needed` bytes are free; true if they already are.
    fn request_space_signal(&self, open: &mut Self::Open, needed: u32) -> bool;

    /// Takes control messages (or events) without acting on them, marking channels whose peer went away at once so
    /// waits end.
    fn pump_control(engine: &mut Engine<Self>);
    /// Acts on what [`Backend::pump_control`] took; runs outside any callback.
    fn handle_events(engine: &mut Engine<Self>);
    /// Called for each channel when the engine polls: binds an enabled client channel to a matching offer.
    fn bind(engine: &mut Engine<Self>, channel: ChannelHandle);
    /// `VmbChannelEnable` after the generic checks (the channel is disabled and has callbacks).
    fn enable(engine: &mut Engine<Self>, channel: ChannelHandle) -> Result<()>;
    /// `VmbChannelDisable` of a channel that is not disabled.
    fn disable(engine: &mut Engine<Self>, channel: ChannelHandle) -> Result<()>;
    /// Closes the open channel's rings (end of a teardown).
    fn close_rings(engine: &mut Engine<Self>, channel: ChannelHandle);
    /// Releases the GPADLs a driver left at its `closed` callback (deleted on the guest, unmapped on the host).
    fn release_leftover_gpadls(engine: &mut Engine<Self>, channel: ChannelHandle);
    /// Creates a GPADL (arguments checked).
    fn create_gpadl(
        engine: &mut Engine<Self>,
        channel: ChannelHandle,
        flags: GpadlFlags,
        pfns: &[u64],
        byte_offset: u32,
        byte_count: u32,
    ) -> Result<GpadlHandle>;
    /// Deletes a GPADL the channel created.
    fn delete_gpadl(engine: &mut Engine<Self>, channel: ChannelHandle, gpadl: GpadlHandle) -> Result<()>;
    /// Writes a monitored channel's MNF latency and returns the previous one (`VmbChannelSetInterruptLatency`);
    /// `None` where this end has no monitor page to write it in (the default; the host's end, whose monitor scan
    /// is the loopback's own).
    fn exchange_monitor_latency(&self, monitor_id: u8, latency: u16) -> Option<u16> {
        let _ = (monitor_id, latency);
        None
    }
    /// The server interface of this engine, when it is a server's ([`Kmcl::as_server`]).
    fn as_server(engine: &mut Engine<Self>) -> Option<&mut dyn super::server::KmclServer> {
        let _ = engine;
        None
    }
}

/// One KMCL channel.
pub(super) struct KmclChannel<B: Backend> {
    pub(super) state: ChannelState,
    pub(super) settings: ChannelSettings,
    pub(super) callbacks: Option<Box<dyn ChannelCallbacks>>,
    pointer: Option<Context>,
    /// The offer the channel is bound to (client) or made (server).
    pub(super) offer: Option<Offer>,
    pub(super) open: Option<B::Open>,
    /// What only one end keeps ([`Backend::Extra`]).
    pub(super) extra: B::Extra,
    next_transaction_id: u64,
    outstanding: BTreeMap<u64, Waiter>,
    send_queue: VecDeque<QueuedSend>,
    backlog: VecDeque<Received>,
    incoming: Slots<IncomingRecord>,
    packets: Slots<SentPacket>,
    pool: Vec<Box<[u8]>>,
    pool_in_use: u32,
    gpadls: Vec<(u32, GpadlFlags)>,
    queue_stopped: bool,
    /// The incoming ring failed validation: it is not read again until the channel is reopened.
    ring_broken: bool,
    /// A save took the incoming queue's snapshot (`kmcl::server`): the ring is left alone until the channel closes,
    /// so nothing read after the snapshot is lost.
    pub(super) ring_held: bool,
    /// The other end went away (a rescind on the guest, the guest's close on the host): sends fail, waits end.
    pub(super) rescinded: bool,
    closing: bool,
    needs_run: bool,
    /// `channel_set_incoming_processing_in_task`: deliver only from task context.
    task_only: bool,
    /// The incoming packet whose `process_packet` runs now, and whether it asked to be deferred.
    inline: Option<((u32, u32), bool)>,
    /// The MMIO space carved for the open client channel (`None` when its offer asks for none or none was free).
    mmio: Option<MmioRange>,
}

impl<B: Backend> KmclChannel<B> {
    fn new() -> Self {
        KmclChannel {
            state: ChannelState::Disabled,
            settings: ChannelSettings::default(),
            callbacks: None,
            pointer: None,
            offer: None,
            open: None,
            extra: B::Extra::default(),
            next_transaction_id: 1,
            outstanding: BTreeMap::new(),
            send_queue: VecDeque::new(),
            backlog: VecDeque::new(),
            incoming: Slots::new(),
            packets: Slots::new(),
            pool: Vec::new(),
            pool_in_use: 0,
            gpadls: Vec::new(),
            queue_stopped: false,
            ring_broken: false,
            ring_held: false,
            rescinded: false,
            closing: false,
            needs_run: false,
            task_only: false,
            inline: None,
            mmio: None,
        }
    }

    fn take_transaction_id(&mut self) -> u64 {
        let id = self.next_transaction_id;
        self.next_transaction_id = self.next_transaction_id.wrapping_add(1).max(1);
        id
    }

    /// `VmbChannelSizeofPacket`: the packet object with its staging area, plus the inline packet context.
    fn packet_size(&self) -> u32 {
        sizeof_packet(self.settings.maximum_packet_size) + self.settings.inline_packet_context_size
    }

    pub(super) fn relid(&self) -> Option<u32> {
        self.offer.as_ref().map(|offer| offer.child_relid)
    }

    /// Open and not going away: packets may be sent.
    fn removed(&self) -> bool {
        self.rescinded || self.closing || self.state == ChannelState::Closed
    }

    fn external_fits(&self, external: &[ExternalRange]) -> bool {
        if external.is_empty() {
            return true;
        }
        let (max_bytes, max_chain) = self.settings.maximum_external_data;
        let bytes: u64 = external.iter().map(|r| u64::from(r.byte_count)).sum();
        let pages: u64 = external.iter().map(|r| r.pfns.len() as u64).sum();
        external.iter().all(ExternalRange::is_well_formed)
            && bytes <= u64::from(max_bytes)
            && pages <= u64::from(max_chain)
    }
}

/// The offers a client channel may bind to.
#[derive(Clone, Copy)]
enum Wanted {
    /// A primary offer (sub-channel index 0) matching the channel's target.
    Primary(TargetInterface),
    /// A sub-channel offer (index > 0) of the device with this interface type and instance.
    SubChannelOf(Guid, Guid),
}

/// The KMCL engine over one end of VMBus: the channel table, the packet engine and the dispatch to the drivers'
/// callbacks (see the module documentation). [`Bus`] is the guest's, [`super::server::ServerBus`] the host's.
pub struct Engine<B: Backend> {
    pub(super) backend: B,
    channels: Slots<KmclChannel<B>>,
    stats: BusStats,
    idle_hook: Option<Box<dyn FnMut() + Send>>,
    pub(super) depth: u32,
    context: ExecutionContext,
}

/// The KMCL bus of one VMBus connection: the guest's [`Engine`] (see the module documentation).
pub type Bus<T, P, A> = Engine<ClientBackend<T, P, A>>;

/// The guest's end: the VMBus [`Connection`], the platform's [`InterruptPages`] and a [`RingAllocator`].
pub struct ClientBackend<T: VmbusTransport, P: InterruptPages, A: RingAllocator> {
    connection: Connection<T>,
    pages: P,
    allocator: A,
    pending_events: VecDeque<Event>,
    mmio: Option<Box<dyn MmioAllocator + Send>>,
}

/// Where the bus was entered from: the unikernel's counterpart of IRQL (DISPATCH_LEVEL vs PASSIVE_LEVEL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutionContext {
    /// The VMBus interrupt ([`Bus::process_interrupt`]): Windows' DISPATCH_LEVEL.
    Interrupt,
    /// Task context ([`Bus::poll`], and any KMCL call made outside a callback): Windows' PASSIVE_LEVEL.
    Task,
}

/// The status a failed control request becomes.
fn client_status(error: &ClientError) -> NtStatus {
    match error {
        ClientError::Timeout { .. } => NtStatus::IO_TIMEOUT,
        ClientError::Rescinded(_) | ClientError::UnknownChannel(_) => NtStatus::DEVICE_REMOVED,
        ClientError::Unloaded => NtStatus::DEVICE_NOT_CONNECTED,
        ClientError::Gpadl(_) | ClientError::UserDataTooLong(_) => NtStatus::INVALID_PARAMETER,
        ClientError::InvalidState(_) | ClientError::UnknownGpadl(_) => NtStatus::INVALID_DEVICE_STATE,
        ClientError::NotSupported { .. } => NtStatus::NOT_SUPPORTED,
        _ => NtStatus::UNSUCCESSFUL,
    }
}

/// The status a failed channel operation becomes.
fn channel_status(error: &ChannelError) -> NtStatus {
    match error {
        ChannelError::Client(e) => client_status(e),
        ChannelError::RingLayout => NtStatus::INVALID_PARAMETER,
        ChannelError::Ring(RingError::PacketTooLarge { .. }) => NtStatus::INVALID_BUFFER_SIZE,
        ChannelError::Ring(_) | ChannelError::Signal(_) => NtStatus::UNSUCCESSFUL,
    }
}

/// Sorts one packet copied out of a ring (by either end, [`Backend::receive`]).
fn sort_packet(packet: core::result::Result<ReceivedPacket, RingError>) -> Copied {
    let Ok(packet) = packet else { return Copied::Dropped };
    let transaction_id = packet.transaction_id;
    let completion_requested = packet.completion_requested;
    match packet.packet_type {
        PacketType::COMPLETION => Copied::Completion { transaction_id, payload: packet.payload },
        PacketType::DATA_IN_BAND | PacketType::DATA_USING_TRANSFER_PAGES => Copied::Data(Received {
            task_only: false,
            transaction_id,
            completion_requested,
            payload: packet.payload,
            external: Vec::new(),
        }),
        PacketType::DATA_USING_GPA_DIRECT => {
            let Ok(ranges) = packet.gpa_direct() else {
                return Copied::Dropped;
            };
            let external = ranges
                .iter()
                .map(|r| ExternalRange {
                    byte_offset: r.byte_offset,
                    byte_count: r.byte_count,
                    pfns: r.pfns.iter().collect(),
                })
                .collect();
            Copied::Data(Received {
                task_only: false,
                transaction_id,
                completion_requested,
                payload: packet.payload,
                external,
            })
        }
        _ => Copied::Dropped,
    }
}

/// Writes one packet into an open channel's outgoing ring through its backend.
#[allow(clippy::too_many_arguments)]
fn write_packet<B: Backend>(
    backend: &B,
    open: &mut B::Open,
    transaction_id: u64,
    payload: &[u8],
    external: &[ExternalRange],
    completion_requested: bool,
    is_completion: bool,
) -> core::result::Result<(), EndError> {
    let ranges: Vec<OutgoingGpaRange<'_>> = external
        .iter()
        .map(|r| OutgoingGpaRange { byte_count: r.byte_count, byte_offset: r.byte_offset, pfns: &r.pfns })
        .collect();
    let kind = if is_completion {
        OutgoingKind::Completion
    } else if ranges.is_empty() {
        OutgoingKind::InBand
    } else {
        OutgoingKind::GpaDirect(&ranges)
    };
    let flags = if completion_requested { PacketFlags::COMPLETION_REQUESTED } else { PacketFlags::NONE };
    let packet = OutgoingPacket { kind, flags, transaction_id, payload };
    backend.write(open, &packet)
}

/// What an attempt to write now gave.
enum Written {
    Now,
    Full { needed: u32 },
}

impl<T: VmbusTransport, P: InterruptPages, A: RingAllocator> Bus<T, P, A> {
    /// A bus over a connected `connection` (whose offers were requested: channels bind to the offers it knows and to
    /// those that arrive later), the platform's interrupt pages and a ring allocator.
    pub fn new(connection: Connection<T>, pages: P, allocator: A) -> Self {
        Engine::with_backend(ClientBackend {
            connection,
            pages,
            allocator,
            pending_events: VecDeque::new(),
            mmio: None,
        })
    }

    /// The VMBus connection.
    pub fn connection(&self) -> &Connection<T> {
        &self.backend.connection
    }

    /// The VMBus connection, mutably (for requests outside KMCL, such as unload).
    pub fn connection_mut(&mut self) -> &mut Connection<T> {
        &mut self.backend.connection
    }

    /// The platform's interrupt pages.
    pub fn pages(&self) -> &P {
        &self.backend.pages
    }

    /// Where channels whose offer asks for MMIO space get it (`VmbChannelGetMmioSpace`); without one, such
    /// channels open without MMIO and `channel_mmio_space` reports `INSUFFICIENT_RESOURCES`.
    pub fn set_mmio_allocator(&mut self, allocator: Option<Box<dyn MmioAllocator + Send>>) {
        self.backend.mmio = allocator;
    }

    /// The ring allocator.
    pub fn allocator(&self) -> &A {
        &self.backend.allocator
    }
}

impl<B: Backend> Engine<B> {
    /// An engine over `backend`, with no channels.
    pub(super) fn with_backend(backend: B) -> Self {
        Engine {
            backend,
            channels: Slots::new(),
            stats: BusStats::default(),
            idle_hook: None,
            depth: 0,
            context: ExecutionContext::Task,
        }
    }

    /// What the bus counted.
    pub fn stats(&self) -> BusStats {
        self.stats
    }

    /// Number of KMCL channels allocated and not cleaned up.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The relid of the offer a channel is bound to.
    pub fn channel_relid(&self, channel: ChannelHandle) -> Result<u32> {
        self.chan(channel)?.relid().ok_or(NtStatus::INVALID_PARAMETER_1)
    }

    /// Runs `hook` each time a synchronous wait finds nothing to do, before [`VmbusTransport::wait`] (tests play the
    /// host there; a kernel could run deferred work).
    pub fn set_idle_hook(&mut self, hook: Option<Box<dyn FnMut() + Send>>) {
        self.idle_hook = hook;
    }

    /// Handles control messages (offers bind enabled channels, rescinds close channels) and drains every open
    /// channel's rings. Returns the packets delivered to `process_packet`.
    pub fn poll(&mut self) -> u64 {
        let before = self.stats.delivered;
        let outer = core::mem::replace(&mut self.context, ExecutionContext::Task);
        B::pump_control(self);
        if self.depth == 0 {
            B::handle_events(self);
            for (index, generation) in self.channels.keys() {
                B::bind(self, ChannelHandle { index, generation });
            }
        }
        for (index, generation) in self.channels.keys() {
            self.run_channel(ChannelHandle { index, generation });
        }
        self.run_pending();
        self.context = outer;
        self.stats.delivered - before
    }

    /// The VMBus interrupt: drains the rings of the channels whose relids had their event flag set, then handles
    /// control messages. Returns the packets delivered to `process_packet`.
    pub fn process_interrupt(&mut self, relids: &[u32]) -> u64 {
        let before = self.stats.delivered;
        let outer = core::mem::replace(&mut self.context, ExecutionContext::Interrupt);
        for &relid in relids {
            if let Some(channel) = self.find_relid(relid) {
                self.run_channel(channel);
            }
        }
        B::pump_control(self);
        if self.depth == 0 {
            B::handle_events(self);
        }
        self.run_pending();
        self.context = outer;
        self.stats.delivered - before
    }

    /// The context the bus runs callbacks in now.
    pub fn execution_context(&self) -> ExecutionContext {
        self.context
    }

    /// The open channel with this relid.
    pub(super) fn find_relid(&self, relid: u32) -> Option<ChannelHandle> {
        self.find_offered(relid).filter(|&handle| self.chan(handle).is_ok_and(|c| c.open.is_some()))
    }

    pub(super) fn chan(&self, channel: ChannelHandle) -> Result<&KmclChannel<B>> {
        self.channels.get(channel.index, channel.generation).ok_or(NtStatus::INVALID_PARAMETER_1)
    }

    pub(super) fn chan_mut(&mut self, channel: ChannelHandle) -> Result<&mut KmclChannel<B>> {
        self.channels.get_mut(channel.index, channel.generation).ok_or(NtStatus::INVALID_PARAMETER_1)
    }

    /// The channel, if it is disabled (the only state the `InitSet*` functions accept).
    pub(super) fn disabled_mut(&mut self, channel: ChannelHandle) -> Result<&mut KmclChannel<B>> {
        let c = self.chan_mut(channel)?;
        // A closed channel (rescinded, or its open rolled back) has no rings left and counts as disabled.
        let disabled = c.state == ChannelState::Disabled || (c.state == ChannelState::Closed && c.open.is_none());
        if disabled { Ok(c) } else { Err(NtStatus::INVALID_PARAMETER_1) }
    }

    /// The channel whose offer has this relid, open or not.
    pub(super) fn find_offered(&self, relid: u32) -> Option<ChannelHandle> {
        self.channels
            .keys()
            .into_iter()
            .map(|(index, generation)| ChannelHandle { index, generation })
            .find(|handle| self.channels.get(handle.index, handle.generation).is_some_and(|c| c.relid() == Some(relid)))
    }

    /// Runs the idle hook (one step of a wait with nothing to do).
    pub(super) fn run_idle_hook(&mut self) {
        if let Some(hook) = self.idle_hook.as_mut() {
            hook();
        }
    }

    /// The counters, to add to.
    pub(super) fn stats_mut(&mut self) -> &mut BusStats {
        &mut self.stats
    }

    /// The channel's packets as a save sees them: the incoming packets read and not yet delivered (in order), the
    /// delivered ones not yet completed (their handles), and the next transaction id.
    pub(super) fn packets_to_save(&self, channel: ChannelHandle) -> Result<PacketsToSave> {
        let c = self.chan(channel)?;
        let backlog = c
            .backlog
            .iter()
            .map(|r| SavedPacket {
                transaction_id: r.transaction_id,
                completion_requested: r.completion_requested,
                payload: r.payload.clone(),
                external: r.external.clone(),
            })
            .collect();
        let delivered = c
            .incoming
            .keys()
            .into_iter()
            .filter_map(|(index, generation)| {
                let r = c.incoming.get(index, generation)?;
                let saved = SavedPacket {
                    transaction_id: r.transaction_id,
                    completion_requested: r.completion_requested,
                    payload: Vec::new(),
                    external: r.external.clone(),
                };
                Some((PacketCompletion { channel, index, generation }, saved))
            })
            .collect();
        Ok((backlog, delivered, c.next_transaction_id))
    }

    /// Puts saved packets back: `backlog` at the end of the channel's incoming queue (delivered again through
    /// `process_packet`), and the transaction ids continue from `next_transaction_id`.
    pub(super) fn restore_backlog(
        &mut self,
        channel: ChannelHandle,
        backlog: Vec<SavedPacket>,
        next_transaction_id: u64,
    ) -> Result<()> {
        let c = self.chan_mut(channel)?;
        c.next_transaction_id = next_transaction_id.max(1);
        c.backlog.extend(backlog.into_iter().map(|p| Received {
            task_only: false,
            transaction_id: p.transaction_id,
            completion_requested: p.completion_requested,
            payload: p.payload,
            external: p.external,
        }));
        Ok(())
    }

    /// Recreates a delivered, not yet completed incoming packet (`VmbPacketRestore`).
    pub(super) fn restore_incoming(&mut self, channel: ChannelHandle, packet: SavedPacket) -> Result<PacketCompletion> {
        let c = self.chan_mut(channel)?;
        let record = IncomingRecord {
            transaction_id: packet.transaction_id,
            completion_requested: packet.completion_requested,
            external: packet.external,
            client_context: vec![0; c.settings.client_context_size as usize],
        };
        let (index, generation) = c.incoming.insert(record).ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        Ok(PacketCompletion { channel, index, generation })
    }

    /// The channel, for a function only client channels take: `_1` for a server channel.
    fn client_chan(&self, channel: ChannelHandle) -> Result<&KmclChannel<B>> {
        let c = self.chan(channel)?;
        if B::IS_SERVER { Err(NtStatus::INVALID_PARAMETER_1) } else { Ok(c) }
    }

    /// The channel, if it is a disabled client channel: `_1` otherwise (a server channel included).
    fn client_disabled_mut(&mut self, channel: ChannelHandle) -> Result<&mut KmclChannel<B>> {
        self.client_chan(channel)?;
        self.disabled_mut(channel)
    }

    /// Calls one of the channel's callbacks with the bus as its [`Kmcl`]; `None` when the channel has no callbacks
    /// or one of them is already running.
    pub(super) fn call<R>(
        &mut self,
        channel: ChannelHandle,
        f: impl FnOnce(&mut dyn ChannelCallbacks, &mut dyn Kmcl) -> R,
    ) -> Option<R> {
        let mut callbacks = self.chan_mut(channel).ok()?.callbacks.take()?;
        self.depth += 1;
        let result = f(&mut *callbacks, self);
        self.depth -= 1;
        if let Ok(c) = self.chan_mut(channel) {
            c.callbacks = Some(callbacks);
        }
        Some(result)
    }

    pub(super) fn fail_open(&mut self, channel: ChannelHandle, status: NtStatus) {
        if let Ok(c) = self.chan_mut(channel) {
            c.state = ChannelState::Closed;
        }
        log::warn!("kmcl: channel {channel:?} could not be opened: {status}");
        self.call(channel, |cb, kmcl| cb.pnp_failure(kmcl, channel, status));
    }

    /// Started → the queue runs → PostStarted → the queue runs again (packets that came during PostStarted).
    pub(super) fn start_sequence(&mut self, channel: ChannelHandle) {
        if let Ok(c) = self.chan_mut(channel) {
            c.state = ChannelState::Active;
        }
        self.call(channel, |cb, kmcl| cb.started(kmcl, channel));
        self.run_channel(channel);
        self.call(channel, |cb, kmcl| cb.post_started(kmcl, channel));
        self.run_channel(channel);
    }

    /// Suspend (if `suspend`) → sends cancelled → Closed → leftover GPADLs deleted → CLOSECHANNEL and ring teardown
    /// → `final_state`.
    pub(super) fn teardown(&mut self, channel: ChannelHandle, suspend: bool, final_state: ChannelState) {
        if suspend {
            self.call(channel, |cb, kmcl| cb.suspend(kmcl, channel));
        }
        let Ok(c) = self.chan_mut(channel) else { return };
        c.closing = true;
        let outstanding = core::mem::take(&mut c.outstanding);
        let queued = core::mem::take(&mut c.send_queue);
        c.backlog.clear();
        c.incoming.drain();
        for waiter in outstanding.into_values() {
            if let Waiter::Packet { index, generation } = waiter {
                self.complete_sent(channel, index, generation, NtStatus::CANCELLED, &[]);
            }
        }
        for send in queued {
            if let Some((index, generation)) = send.notify {
                self.complete_sent(channel, index, generation, NtStatus::CANCELLED, &[]);
            }
        }
        self.call(channel, |cb, kmcl| cb.closed(kmcl, channel));
        B::release_leftover_gpadls(self, channel);
        B::close_rings(self, channel);
        if let Ok(c) = self.chan_mut(channel) {
            c.closing = false;
            c.queue_stopped = false;
            c.ring_broken = false;
            c.ring_held = false;
            c.state = final_state;
        }
    }

    /// Whether the next backlog packet may go to `process_packet` now.
    fn can_deliver(&self, channel: ChannelHandle) -> bool {
        self.chan(channel).is_ok_and(|c| {
            c.state == ChannelState::Active
                && !c.queue_stopped
                && !c.removed()
                && c.callbacks.is_some()
                && c.backlog
                    .front()
                    .is_some_and(|r| self.context == ExecutionContext::Task || !(c.task_only || r.task_only))
                && (c.settings.transaction_quota == 0 || c.incoming.len() < c.settings.transaction_quota as usize)
        })
    }

    /// Runs a channel's queues: pending sends, the incoming ring, delivery; `processing_complete` when the ring was
    /// emptied after deliveries.
    pub(super) fn run_channel(&mut self, channel: ChannelHandle) {
        let mut delivered = 0u32;
        loop {
            let Ok(c) = self.chan_mut(channel) else { return };
            c.needs_run = false;
            if c.open.is_none() {
                return;
            }
            self.flush_send_queue(channel);
            let read = self.read_ring(channel);
            let mut progressed = false;
            while self.can_deliver(channel) {
                let Some(received) = self.chan_mut(channel).ok().and_then(|c| c.backlog.pop_front()) else { break };
                self.deliver(channel, received);
                delivered += 1;
                progressed = true;
            }
            if !progressed && read == 0 {
                break;
            }
        }
        let emptied = self.chan(channel).is_ok_and(|c| c.backlog.is_empty() && c.state == ChannelState::Active);
        if delivered > 0 && emptied {
            self.call(channel, |cb, kmcl| cb.processing_complete(kmcl, channel, delivered));
        }
    }

    /// Runs the channels whose queues were restarted from inside a callback.
    pub(super) fn run_pending(&mut self) {
        if self.depth != 0 {
            return;
        }
        for _ in 0..64 {
            let pending: Vec<ChannelHandle> = self
                .channels
                .keys()
                .into_iter()
                .map(|(index, generation)| ChannelHandle { index, generation })
                .filter(|h| self.chan(*h).is_ok_and(|c| c.needs_run))
                .collect();
            if pending.is_empty() {
                return;
            }
            for channel in pending {
                self.run_channel(channel);
            }
        }
    }

    /// Drains the channel's incoming ring (unless its backlog is full): completions are matched at once, data packets
    /// join the backlog. Returns the packets read.
    fn read_ring(&mut self, channel: ChannelHandle) -> usize {
        let Engine { backend, channels, stats, .. } = self;
        let Some(c) = channels.get_mut(channel.index, channel.generation) else { return 0 };
        if c.backlog.len() >= BACKLOG_LIMIT || c.ring_broken || c.ring_held {
            return 0;
        }
        let Some(open) = c.open.as_mut() else { return 0 };
        let mut copied = Vec::new();
        if let Err(error) = backend.receive(open, &mut copied) {
            match error {
                EndError::Signal => stats.signal_errors += 1,
                _ => {
                    stats.ring_errors += 1;
                    c.ring_broken = true;
                    c.queue_stopped = true;
                    log::warn!("kmcl: {channel:?}: incoming ring failed ({error:?}); its queue is stopped");
                }
            }
        }
        let count = copied.len();
        for packet in copied {
            self.take_packet(channel, sort_packet(packet));
        }
        count
    }

    fn take_packet(&mut self, channel: ChannelHandle, packet: Copied) {
        let Ok(c) = self.chan_mut(channel) else { return };
        match packet {
            Copied::Dropped => self.stats.unexpected_packets += 1,
            Copied::Data(received) => {
                let too_big = received.payload.len() > c.settings.maximum_packet_size as usize;
                if too_big || !c.external_fits(&received.external) {
                    self.stats.oversized_packets += 1;
                    log::warn!("kmcl: {channel:?}: dropped an oversized packet ({} bytes)", received.payload.len());
                } else {
                    c.backlog.push_back(received);
                }
            }
            Copied::Completion { transaction_id, payload } => match c.outstanding.remove(&transaction_id) {
                None => {
                    self.stats.unknown_completions += 1;
                    log::warn!("kmcl: {channel:?}: completion for unknown transaction {transaction_id:#x}");
                }
                Some(Waiter::Packet { index, generation }) => {
                    self.complete_sent(channel, index, generation, NtStatus::SUCCESS, &payload);
                }
                Some(Waiter::SyncWaiting) => {
                    c.outstanding.insert(transaction_id, Waiter::SyncDone(payload));
                }
                Some(done @ Waiter::SyncDone(_)) => {
                    c.outstanding.insert(transaction_id, done);
                    self.stats.unknown_completions += 1;
                }
                Some(Waiter::SyncAbandoned) => self.stats.late_completions += 1,
            },
        }
    }

    /// Hands one packet to `process_packet`.
    fn deliver(&mut self, channel: ChannelHandle, received: Received) {
        let Ok(c) = self.chan_mut(channel) else { return };
        let record = IncomingRecord {
            transaction_id: received.transaction_id,
            completion_requested: received.completion_requested,
            external: received.external,
            client_context: vec![0; c.settings.client_context_size as usize],
        };
        let flags =
            if record.external.is_empty() { ProcessPacketFlags::NONE } else { ProcessPacketFlags::EXTERNAL_DATA };
        let Some((index, generation)) = c.incoming.insert(record) else {
            self.stats.unexpected_packets += 1;
            return;
        };
        c.inline = Some(((index, generation), false));
        self.stats.delivered += 1;
        let packet = PacketCompletion { channel, index, generation };
        let payload = received.payload;
        self.call(channel, |cb, kmcl| cb.process_packet(kmcl, channel, packet, &payload, flags));
        let Engine { channels, stats, .. } = &mut *self;
        let Some(c) = channels.get_mut(channel.index, channel.generation) else { return };
        if let Some((_, true)) = c.inline.take()
            && let Some(record) = c.incoming.remove(index, generation)
        {
            // Deferred: parsed again later, in task context, as the same packet.
            stats.delivered -= 1;
            c.backlog.push_front(Received {
                task_only: true,
                transaction_id: record.transaction_id,
                completion_requested: record.completion_requested,
                payload,
                external: record.external,
            });
        }
    }

    /// Runs a sent packet's completion routine (or frees a pool packet with the default routine).
    fn complete_sent(&mut self, channel: ChannelHandle, index: u32, generation: u32, status: NtStatus, payload: &[u8]) {
        let Engine { channels, stats, .. } = &mut *self;
        let Some(c) = channels.get_mut(channel.index, channel.generation) else { return };
        let capacity = c.settings.maximum_packet_size as usize;
        let Some(packet) = c.packets.get_mut(index, generation) else { return };
        packet.in_flight = false;
        let (status, payload) = if payload.len() > capacity {
            stats.oversized_completions += 1;
            (NtStatus::BUFFER_OVERFLOW, &payload[..capacity])
        } else {
            (status, payload)
        };
        let handle = PacketHandle { channel, index, generation };
        match core::mem::replace(&mut packet.routine, Routine::Running) {
            Routine::FreeOnCompletion => {
                packet.routine = Routine::FreeOnCompletion;
                let _ = self.packet_free(handle);
            }
            Routine::Custom(mut routine) => {
                let from_pool = packet.from_pool;
                let mut memory = packet.memory.take();
                // The completion is staged in the packet's own memory, as the Windows packet object holds it.
                let staged: &[u8] = match memory.as_deref_mut() {
                    Some(area) if area.len() >= payload.len() => {
                        area[..payload.len()].copy_from_slice(payload);
                        &area[..payload.len()]
                    }
                    _ => payload,
                };
                self.depth += 1;
                routine(self, handle, status, staged);
                self.depth -= 1;
                let Ok(c) = self.chan_mut(channel) else { return };
                match c.packets.get_mut(index, generation) {
                    Some(packet) => {
                        if matches!(packet.routine, Routine::Running) {
                            packet.routine = Routine::Custom(routine);
                        }
                        packet.memory = memory;
                    }
                    // Freed by its own routine: a pool packet's memory goes back to the pool.
                    None => {
                        if from_pool && let Some(area) = memory {
                            c.pool.push(area);
                        }
                    }
                }
            }
            other => {
                packet.routine = other;
                log::warn!("kmcl: {handle:?} completed without a completion routine");
            }
        }
    }

    /// Tries to put a packet in the ring now (behind anything already queued).
    #[allow(clippy::too_many_arguments)]
    fn write_now(
        &mut self,
        channel: ChannelHandle,
        transaction_id: u64,
        payload: &[u8],
        external: &[ExternalRange],
        completion_requested: bool,
        is_completion: bool,
    ) -> Result<Written> {
        self.flush_send_queue(channel);
        let Engine { backend, channels, stats, .. } = self;
        let c = channels.get_mut(channel.index, channel.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        if !c.send_queue.is_empty() {
            return Ok(Written::Full { needed: 0 });
        }
        let open = c.open.as_mut().ok_or(NtStatus::DEVICE_REMOVED)?;
        match write_packet(backend, open, transaction_id, payload, external, completion_requested, is_completion) {
            Ok(()) => Ok(Written::Now),
            Err(EndError::Signal) => {
                stats.signal_errors += 1;
                Ok(Written::Now)
            }
            Err(EndError::Full { needed }) => Ok(Written::Full { needed }),
            Err(EndError::Failed(status)) => Err(status),
        }
    }

    /// Asks the host to signal when `needed` bytes are free; true if they already are.
    fn arm_space_signal(&mut self, channel: ChannelHandle, needed: u32) -> bool {
        let Engine { backend, channels, .. } = self;
        let Some(c) = channels.get_mut(channel.index, channel.generation) else { return false };
        let Some(open) = c.open.as_mut() else { return false };
        backend.request_space_signal(open, needed)
    }

    /// Writes queued packets while they fit; runs the routines of those that only waited for the ring.
    fn flush_send_queue(&mut self, channel: ChannelHandle) {
        let mut placed = Vec::new();
        loop {
            let Engine { backend, channels, stats, .. } = &mut *self;
            let Some(c) = channels.get_mut(channel.index, channel.generation) else { return };
            let Some(open) = c.open.as_mut() else { break };
            let Some(front) = c.send_queue.front() else { break };
            let result = write_packet(
                &*backend,
                open,
                front.transaction_id,
                &front.payload,
                &front.external,
                front.completion_requested,
                front.is_completion,
            );
            match result {
                Ok(()) | Err(EndError::Signal) => {
                    if result.is_err() {
                        stats.signal_errors += 1;
                    }
                    if let Some(send) = c.send_queue.pop_front()
                        && let Some(notify) = send.notify
                    {
                        placed.push((notify, NtStatus::SUCCESS));
                    }
                }
                Err(EndError::Full { needed }) => {
                    if !self.arm_space_signal(channel, needed) {
                        break;
                    }
                }
                Err(EndError::Failed(error)) => {
                    stats.ring_errors += 1;
                    log::warn!("kmcl: {channel:?}: a queued packet could not be written: {error}");
                    if let Some(send) = c.send_queue.pop_front()
                        && let Some(notify) = send.notify
                    {
                        placed.push((notify, NtStatus::UNSUCCESSFUL));
                    }
                }
            }
        }
        for ((index, generation), status) in placed {
            self.complete_sent(channel, index, generation, status, &[]);
        }
    }

    /// Sends a data packet now or queues it. `notify`: the packet whose routine runs once it is in the ring.
    #[allow(clippy::too_many_arguments)]
    fn send_or_queue(
        &mut self,
        channel: ChannelHandle,
        transaction_id: u64,
        payload: &[u8],
        external: &[ExternalRange],
        completion_requested: bool,
        is_completion: bool,
        notify: Option<(u32, u32)>,
    ) -> Result<()> {
        match self.write_now(channel, transaction_id, payload, external, completion_requested, is_completion)? {
            Written::Now => {
                if let Some((index, generation)) = notify {
                    self.complete_sent(channel, index, generation, NtStatus::SUCCESS, &[]);
                }
            }
            Written::Full { needed } => {
                let c = self.chan_mut(channel)?;
                c.send_queue.push_back(QueuedSend {
                    transaction_id,
                    payload: payload.to_vec(),
                    external: external.to_vec(),
                    completion_requested,
                    is_completion,
                    notify,
                });
                if needed != 0 && self.arm_space_signal(channel, needed) {
                    self.flush_send_queue(channel);
                }
            }
        }
        Ok(())
    }

    /// One step of a synchronous wait: control messages, the channel's ring, else the idle hook and a transport
    /// wait. [`NtStatus::DEVICE_REMOVED`] once the channel is going away, [`NtStatus::CANCELLED`] past `deadline`.
    pub(super) fn wait_step(&mut self, channel: ChannelHandle, deadline: Option<u64>) -> Result<()> {
        B::pump_control(self);
        let c = self.chan(channel).map_err(|_| NtStatus::DEVICE_REMOVED)?;
        if c.removed() || c.open.is_none() || c.ring_broken {
            return Err(NtStatus::DEVICE_REMOVED);
        }
        if self.read_ring(channel) > 0 {
            return Ok(());
        }
        if deadline.is_some_and(|d| self.backend.now_ns() >= d) {
            return Err(NtStatus::CANCELLED);
        }
        if let Some(hook) = self.idle_hook.as_mut() {
            hook();
        }
        self.backend.wait();
        Ok(())
    }

    /// Checks a sent packet for `packet_send`; returns the channel's maximum packet size.
    fn check_sendable(&self, packet: PacketHandle) -> Result<()> {
        let c = self.chan(packet.channel)?;
        let p = c.packets.get(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        if p.in_flight || matches!(p.routine, Routine::Unset) {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        if c.removed() {
            return Err(NtStatus::DEVICE_REMOVED);
        }
        if c.open.is_none() {
            return Err(NtStatus::INVALID_DEVICE_STATE);
        }
        Ok(())
    }

    fn incoming(&self, packet: PacketCompletion) -> Result<&IncomingRecord> {
        self.chan(packet.channel)?.incoming.get(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)
    }

    /// After an incoming packet left the quota: restart the queue now, or after the running callback.
    fn restart_queue(&mut self, channel: ChannelHandle) {
        if self.depth == 0 {
            self.run_channel(channel);
            self.run_pending();
        } else if let Ok(c) = self.chan_mut(channel) {
            c.needs_run = true;
        }
    }
}

impl<T: VmbusTransport, P: InterruptPages, A: RingAllocator> sealed::Sealed for ClientBackend<T, P, A> {}

impl<T: VmbusTransport, P: InterruptPages, A: RingAllocator> Backend for ClientBackend<T, P, A> {
    type Open = OpenRings<A::Memory, A::Lease>;
    type Extra = ();
    const IS_SERVER: bool = false;

    fn now_ns(&self) -> u64 {
        self.connection.transport().now_ns()
    }

    fn wait(&self) {
        self.connection.transport().wait();
    }

    fn write(&self, open: &mut Self::Open, packet: &OutgoingPacket<'_>) -> core::result::Result<(), EndError> {
        match open.channel.send(packet, self.connection.transport(), &self.pages) {
            Ok(_) => Ok(()),
            Err(ChannelError::Signal(_)) => Err(EndError::Signal),
            Err(ChannelError::Ring(RingError::Full { needed, .. })) => Err(EndError::Full { needed }),
            Err(error) => Err(EndError::Failed(channel_status(&error))),
        }
    }

    fn receive(
        &self,
        open: &mut Self::Open,
        out: &mut Vec<core::result::Result<ReceivedPacket, RingError>>,
    ) -> core::result::Result<(), EndError> {
        match open
            .channel
            .receive(self.connection.transport(), &self.pages, |packet| out.push(ReceivedPacket::copy_of(packet)))
        {
            Ok(_) => Ok(()),
            Err(ChannelError::Signal(_)) => Err(EndError::Signal),
            Err(error) => Err(EndError::Failed(channel_status(&error))),
        }
    }

    fn request_space_signal(&self, open: &mut Self::Open, needed: u32) -> bool {
        matches!(open.channel.request_space_signal(needed), Ok(SpaceRequest::Available))
    }

    fn exchange_monitor_latency(&self, monitor_id: u8, latency: u16) -> Option<u16> {
        self.pages.exchange_monitor_latency(monitor_id, latency)
    }

    /// Takes the host's control messages; marks rescinded channels at once (so waits end) and keeps the events for
    /// [`Self::handle_events`].
    fn pump_control(engine: &mut Engine<Self>) {
        while let Some(event) = engine.backend.connection.poll() {
            if let Event::Rescinded(relid) = event
                && let Some(channel) = engine.find_relid(relid)
                && let Ok(c) = engine.chan_mut(channel)
            {
                c.rescinded = true;
            }
            engine.backend.pending_events.push_back(event);
        }
    }

    /// Acts on control events (outside any callback).
    fn handle_events(engine: &mut Engine<Self>) {
        while let Some(event) = engine.backend.pending_events.pop_front() {
            match event {
                Event::Offered(_) => {
                    for (index, generation) in engine.channels.keys() {
                        Self::bind(engine, ChannelHandle { index, generation });
                    }
                }
                Event::Rescinded(relid) => {
                    if let Some(channel) = engine.find_relid(relid) {
                        let was_active = engine.chan(channel).is_ok_and(|c| c.state == ChannelState::Active);
                        engine.teardown(channel, was_active, ChannelState::Closed);
                    }
                }
            }
        }
    }

    /// Binds an enabled channel to a matching free offer and runs the open sequence.
    fn bind(engine: &mut Engine<Self>, channel: ChannelHandle) {
        let Ok(c) = engine.chan(channel) else { return };
        if c.state != ChannelState::Enabled {
            return;
        }
        // A primary binds to a primary offer of its target; a sub-channel, once its primary is open, to a
        // sub-channel offer of the same device.
        let wanted = match c.settings.primary {
            None => match c.settings.target {
                Some(target) => Wanted::Primary(target),
                None => return,
            },
            Some(primary) => match engine.chan(primary) {
                Ok(p) if p.open.is_some() => match p.offer.as_ref() {
                    Some(offer) => Wanted::SubChannelOf(offer.interface_type, offer.interface_instance),
                    None => return,
                },
                _ => return,
            },
        };
        let pipe = c.settings.flags.contains(ChannelInitFlags::IS_PIPE);
        let (outgoing_pages, incoming_pages) = c.settings.ring_page_counts();
        let target_vp = c.settings.target_vp;
        let claimed: Vec<u32> =
            engine.channels.keys().iter().filter_map(|&(i, g)| engine.channels.get(i, g)?.relid()).collect();
        let offer = engine
            .backend
            .connection
            .offers()
            .find(|o| {
                let device = match wanted {
                    Wanted::Primary(target) => {
                        target.matches(&o.interface_type, &o.interface_instance) && o.sub_channel_index == 0
                    }
                    Wanted::SubChannelOf(interface_type, instance) => {
                        o.interface_type == interface_type
                            && o.interface_instance == instance
                            && o.sub_channel_index > 0
                    }
                };
                device && !claimed.contains(&o.child_relid) && (!pipe || o.flags.contains(OfferFlags::NAMED_PIPE_MODE))
            })
            .cloned();
        let Some(offer) = offer else { return };
        let relid = offer.child_relid;
        let (rings, lease) = match engine.backend.allocator.allocate(outgoing_pages, incoming_pages) {
            Ok(allocated) => allocated,
            Err(status) => return engine.fail_open(channel, status),
        };
        let open = match Channel::open(&mut engine.backend.connection, relid, rings, target_vp, &[]) {
            Ok(open) => open,
            Err(error) => {
                // Channel::open tears its GPADL down on failure; only then are the pages surely the guest's again.
                let released = matches!(
                    error,
                    ChannelError::RingLayout | ChannelError::Client(ClientError::GpadlCreationFailed(_))
                );
                engine.backend.allocator.release(lease, released);
                return engine.fail_open(channel, channel_status(&error));
            }
        };
        let megabytes = u64::from(offer.mmio_megabytes);
        let mmio = match engine.backend.mmio.as_mut() {
            Some(allocator) if megabytes > 0 => allocator.allocate(megabytes * MIB, MIB),
            _ => None,
        };
        if megabytes > 0 && mmio.is_none() {
            log::warn!("kmcl: {channel:?}: relid {relid} asks for {megabytes} MiB of MMIO; none available");
        }
        let name = match engine.chan_mut(channel) {
            Ok(c) => {
                c.open = Some(OpenRings { channel: open, lease });
                c.offer = Some(offer);
                c.mmio = mmio;
                c.state = ChannelState::Opened;
                c.settings.friendly_name.clone()
            }
            Err(_) => return,
        };
        log::debug!("kmcl: channel {channel:?} '{name}' bound to relid {relid}");
        if let Some(Err(status)) = engine.call(channel, |cb, kmcl| cb.opened(kmcl, channel)) {
            log::warn!("kmcl: channel {channel:?} '{name}' refused to open: {status}");
            Self::release_leftover_gpadls(engine, channel);
            Self::close_rings(engine, channel);
            if let Ok(c) = engine.chan_mut(channel) {
                c.state = ChannelState::Closed;
            }
            return;
        }
        engine.start_sequence(channel);
    }

    /// Deletes the GPADLs a driver left on a closing channel (counted in [`BusStats::leaked_gpadls`]).
    fn release_leftover_gpadls(engine: &mut Engine<Self>, channel: ChannelHandle) {
        let Ok(c) = engine.chan_mut(channel) else { return };
        let leftover = core::mem::take(&mut c.gpadls);
        let relid = c.relid();
        for (id, _) in leftover {
            engine.stats.leaked_gpadls += 1;
            log::warn!("kmcl: {channel:?} left GPADL {id:#x} open at close; deleting it");
            if let Some(relid) = relid
                && let Err(error) = engine.backend.connection.teardown_gpadl(relid, crate::client::GpadlId(id))
            {
                log::warn!("kmcl: deleting GPADL {id:#x}: {error}");
            }
        }
    }

    /// Closes the VMBus channel and gives the ring pages back.
    fn close_rings(engine: &mut Engine<Self>, channel: ChannelHandle) {
        let Ok(c) = engine.chan_mut(channel) else { return };
        let rescinded = c.rescinded;
        let relid = c.relid();
        let Some(open) = c.open.take() else { return };
        if let (Some(range), Some(allocator)) = (c.mmio.take(), engine.backend.mmio.as_mut()) {
            allocator.free(range);
        }
        let closed = open.channel.close(&mut engine.backend.connection);
        if let Err(error) = &closed {
            log::warn!("kmcl: closing {channel:?}: {error}");
        }
        engine.backend.allocator.release(open.lease, closed.is_ok());
        if rescinded
            && let Some(relid) = relid
            && let Err(error) = engine.backend.connection.release_channel(relid)
        {
            log::warn!("kmcl: releasing rescinded relid {relid}: {error}");
        }
        if let Ok(c) = engine.chan_mut(channel) {
            c.offer = None;
            c.rescinded = false;
        }
    }

    /// Creates a GPADL after the arguments were checked.
    fn create_gpadl(
        engine: &mut Engine<Self>,
        channel: ChannelHandle,
        flags: GpadlFlags,
        pfns: &[u64],
        byte_offset: u32,
        byte_count: u32,
    ) -> Result<GpadlHandle> {
        let c = engine.chan(channel)?;
        if c.removed() {
            return Err(NtStatus::DEVICE_REMOVED);
        }
        let relid = match (&c.open, c.relid()) {
            (Some(_), Some(relid)) => relid,
            _ => return Err(NtStatus::INVALID_PARAMETER_1),
        };
        let id = engine
            .backend
            .connection
            .create_gpadl(relid, pfns, byte_offset, byte_count)
            .map_err(|e| client_status(&e))?;
        engine.chan_mut(channel)?.gpadls.push((id.0, flags));
        Ok(GpadlHandle { channel, id: id.0 })
    }

    fn enable(engine: &mut Engine<Self>, channel: ChannelHandle) -> Result<()> {
        let c = engine.chan_mut(channel)?;
        if c.settings.target.is_none() && c.settings.primary.is_none() {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        c.state = ChannelState::Enabled;
        c.queue_stopped = false;
        Self::bind(engine, channel);
        engine.run_pending();
        Ok(())
    }

    fn disable(engine: &mut Engine<Self>, channel: ChannelHandle) -> Result<()> {
        let c = engine.chan_mut(channel)?;
        match c.state {
            ChannelState::Disabled => Ok(()),
            ChannelState::Enabled | ChannelState::Closed if c.open.is_none() => {
                c.state = ChannelState::Disabled;
                Ok(())
            }
            _ if c.callbacks.is_none() => Err(NtStatus::INVALID_DEVICE_STATE),
            state => {
                engine.teardown(channel, state == ChannelState::Active, ChannelState::Disabled);
                Ok(())
            }
        }
    }

    fn delete_gpadl(engine: &mut Engine<Self>, channel: ChannelHandle, gpadl: GpadlHandle) -> Result<()> {
        let c = engine.chan(channel)?;
        if gpadl.channel != channel || !c.gpadls.iter().any(|(id, _)| *id == gpadl.id) {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        let relid = c.relid().ok_or(NtStatus::INVALID_PARAMETER_2)?;
        let result = engine.backend.connection.teardown_gpadl(relid, crate::client::GpadlId(gpadl.id));
        if let Ok(c) = engine.chan_mut(channel) {
            c.gpadls.retain(|(id, _)| *id != gpadl.id);
        }
        result.map_err(|e| client_status(&e))
    }
}

/// Checks the arguments shared by the two GPADL create functions; `_3`/`_4`/`_5` as in
/// [`Kmcl::channel_create_gpadl_from_pfn_list`].
fn check_gpadl_arguments(flags: GpadlFlags, pfns: &[u64], byte_offset: u32, byte_count: u32) -> Result<()> {
    if flags.0 & !GpadlFlags::ALL.0 != 0 {
        return Err(NtStatus::INVALID_PARAMETER_2);
    }
    if pfns.is_empty() {
        return Err(NtStatus::INVALID_PARAMETER_3);
    }
    if byte_offset >= 4096 {
        return Err(NtStatus::INVALID_PARAMETER_4);
    }
    let end = u64::from(byte_offset) + u64::from(byte_count);
    if byte_count == 0 || end.div_ceil(4096) != pfns.len() as u64 {
        return Err(NtStatus::INVALID_PARAMETER_5);
    }
    Ok(())
}

impl<B: Backend> Kmcl for Engine<B> {
    fn channel_allocate(&mut self) -> Result<ChannelHandle> {
        let (index, generation) = self.channels.insert(KmclChannel::new()).ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        Ok(ChannelHandle { index, generation })
    }

    fn channel_cleanup(&mut self, channel: ChannelHandle) -> Result<()> {
        self.disabled_mut(channel)?;
        self.channels.remove(channel.index, channel.generation);
        Ok(())
    }

    fn channel_enable(&mut self, channel: ChannelHandle) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if c.callbacks.is_none() {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        B::enable(self, channel)
    }

    fn channel_disable(&mut self, channel: ChannelHandle) -> Result<()> {
        if self.chan(channel)?.state == ChannelState::Disabled {
            return Ok(());
        }
        B::disable(self, channel)
    }

    fn channel_pause(&mut self, channel: ChannelHandle) -> Result<()> {
        let c = self.chan(channel)?;
        if c.state != ChannelState::Active || c.callbacks.is_none() {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        self.call(channel, |cb, kmcl| cb.suspend(kmcl, channel));
        self.chan_mut(channel)?.state = ChannelState::Paused;
        Ok(())
    }

    fn channel_start(&mut self, channel: ChannelHandle) -> Result<()> {
        let c = self.chan(channel)?;
        match c.state {
            ChannelState::Active => Ok(()),
            ChannelState::Paused if c.callbacks.is_some() && !c.removed() => {
                self.start_sequence(channel);
                self.run_pending();
                Ok(())
            }
            _ => Err(NtStatus::INVALID_PARAMETER_1),
        }
    }

    fn channel_state(&self, channel: ChannelHandle) -> Result<ChannelState> {
        Ok(self.chan(channel)?.state)
    }

    fn channel_init_set_maximum_packet_size(&mut self, channel: ChannelHandle, packet_size: u32) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if packet_size == 0 || packet_size > MAX_PACKET_SIZE_LIMIT {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.settings.maximum_packet_size = packet_size;
        c.pool.clear();
        Ok(())
    }

    fn channel_init_set_maximum_external_data(
        &mut self,
        channel: ChannelHandle,
        data_size: u32,
        chain_length: u32,
    ) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if data_size == 0 {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        // Even page-aligned, `data_size` bytes span this many pages.
        let least_chain = u64::from(data_size).div_ceil(4096);
        if chain_length == 0 || chain_length > MAX_EXTERNAL_CHAIN_LENGTH || u64::from(chain_length) < least_chain {
            return Err(NtStatus::INVALID_PARAMETER_3);
        }
        c.settings.maximum_external_data = (data_size, chain_length);
        Ok(())
    }

    fn channel_init_set_client_context_size(&mut self, channel: ChannelHandle, size: u32) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if size > MAX_CLIENT_CONTEXT_SIZE {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.settings.client_context_size = size;
        Ok(())
    }

    fn channel_init_set_flags(&mut self, channel: ChannelHandle, flags: ChannelInitFlags) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if flags.0 & !ChannelInitFlags::ALL.0 != 0 {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.settings.flags = flags;
        Ok(())
    }

    fn channel_init_set_friendly_name(&mut self, channel: ChannelHandle, name: &str) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if name.len() > MAX_FRIENDLY_NAME_LEN {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.settings.friendly_name = String::from(name);
        Ok(())
    }

    fn channel_init_set_callbacks(
        &mut self,
        channel: ChannelHandle,
        callbacks: Box<dyn ChannelCallbacks>,
    ) -> Result<()> {
        self.disabled_mut(channel)?.callbacks = Some(callbacks);
        Ok(())
    }

    fn channel_init_set_ring_buffer_page_count(
        &mut self,
        channel: ChannelHandle,
        incoming_pages: u32,
        outgoing_pages: u32,
    ) -> Result<()> {
        let c = self.client_disabled_mut(channel)?;
        let valid = |pages: u32| (2..=MAX_RING_PAGES).contains(&pages);
        if !valid(incoming_pages) {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        if !valid(outgoing_pages) {
            return Err(NtStatus::INVALID_PARAMETER_3);
        }
        c.settings.ring_pages = Some((incoming_pages, outgoing_pages));
        Ok(())
    }

    fn channel_init_set_target(
        &mut self,
        channel: ChannelHandle,
        interface_type: Guid,
        interface_instance: Option<Guid>,
    ) -> Result<()> {
        self.client_disabled_mut(channel)?.settings.target =
            Some(TargetInterface { interface_type, interface_instance });
        Ok(())
    }

    fn channel_init_set_maximum_packet_count(&mut self, channel: ChannelHandle, count: u32) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if count == 0 {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.settings.maximum_packet_count = count;
        Ok(())
    }

    fn channel_init_set_target_vp(&mut self, channel: ChannelHandle, vp_index: u32) -> Result<()> {
        self.client_disabled_mut(channel)?.settings.target_vp = vp_index;
        Ok(())
    }

    fn channel_init_set_primary_channel(&mut self, channel: ChannelHandle, primary: ChannelHandle) -> Result<()> {
        self.client_disabled_mut(channel)?;
        let p = self.chan(primary).map_err(|_| NtStatus::INVALID_PARAMETER_2)?;
        if primary == channel || p.settings.primary.is_some() {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        self.client_disabled_mut(channel)?.settings.primary = Some(primary);
        Ok(())
    }

    fn channel_init_set_inline_packet_context_size(&mut self, channel: ChannelHandle, size: u32) -> Result<()> {
        let c = self.disabled_mut(channel)?;
        if size > MAX_CLIENT_CONTEXT_SIZE {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.settings.inline_packet_context_size = size;
        c.pool.clear();
        Ok(())
    }

    fn packet_inline_context(&mut self, packet: PacketHandle) -> Result<&mut [u8]> {
        let c = self.chan_mut(packet.channel)?;
        let p = c.packets.get_mut(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        Ok(&mut p.inline_context)
    }

    fn channel_set_pointer(&mut self, channel: ChannelHandle, context: Option<Context>) -> Result<()> {
        self.chan_mut(channel)?.pointer = context;
        Ok(())
    }

    fn channel_pointer(&self, channel: ChannelHandle) -> Result<Option<Context>> {
        Ok(self.chan(channel)?.pointer.clone())
    }

    fn channel_set_transaction_quota(&mut self, channel: ChannelHandle, quota: u32) -> Result<()> {
        let c = self.chan_mut(channel)?;
        if quota == 0 {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        c.settings.transaction_quota = quota;
        self.restart_queue(channel);
        Ok(())
    }

    fn channel_interface_instance(&self, channel: ChannelHandle) -> Result<Guid> {
        let c = self.chan(channel)?;
        c.offer
            .as_ref()
            .map(|offer| offer.interface_instance)
            .or(c.settings.target.and_then(|t| t.interface_instance))
            .ok_or(NtStatus::INVALID_PARAMETER_1)
    }

    fn channel_offer(&self, channel: ChannelHandle) -> Result<Offer> {
        self.chan(channel)?.offer.clone().ok_or(NtStatus::INVALID_PARAMETER_1)
    }

    fn channel_set_interrupt_latency(&mut self, channel: ChannelHandle, latency: u16) -> Result<u16> {
        let c = self.chan(channel)?;
        if c.open.is_none() {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        let monitor_id = c.offer.as_ref().and_then(|offer| offer.monitor_id).ok_or(NtStatus::NOT_SUPPORTED)?;
        self.backend.exchange_monitor_latency(monitor_id, latency).ok_or(NtStatus::NOT_SUPPORTED)
    }

    fn channel_mmio_space(&self, channel: ChannelHandle) -> Result<MmioRange> {
        let c = self.chan(channel)?;
        if B::IS_SERVER {
            // The guest places a server channel's MMIO; the server is not told where.
            return Err(NtStatus::NOT_SUPPORTED);
        }
        let offer = c.offer.as_ref().filter(|_| c.open.is_some()).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        if offer.mmio_megabytes == 0 {
            return Err(NtStatus::NOT_FOUND);
        }
        c.mmio.ok_or(NtStatus::INSUFFICIENT_RESOURCES)
    }

    fn channel_sizeof_packet(&self, channel: ChannelHandle) -> Result<u32> {
        Ok(self.chan(channel)?.packet_size())
    }

    fn channel_send_synchronous_request(
        &mut self,
        channel: ChannelHandle,
        buffer: &[u8],
        external: Option<&[ExternalRange]>,
        flags: SendFlags,
        completion: Option<&mut [u8]>,
        timeout_ns: Option<u64>,
    ) -> Result<usize> {
        let c = self.chan(channel)?;
        if c.removed() {
            return Err(NtStatus::DEVICE_REMOVED);
        }
        if c.open.is_none() {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        if buffer.len() > c.settings.maximum_packet_size as usize {
            return Err(NtStatus::INVALID_PARAMETER_3);
        }
        let external = external.unwrap_or(&[]);
        if !c.external_fits(external) {
            return Err(NtStatus::INVALID_PARAMETER_4);
        }
        if flags.0 & !SendFlags::ALL.0 != 0 {
            return Err(NtStatus::INVALID_PARAMETER_5);
        }
        if completion.as_ref().is_some_and(|buf| !buf.len().is_multiple_of(8)) {
            return Err(NtStatus::INVALID_PARAMETER_7);
        }
        let wait_for_completion = flags.contains(SendFlags::WAIT_FOR_COMPLETION);
        let deadline = timeout_ns.map(|t| self.backend.now_ns().saturating_add(t));
        let c = self.chan_mut(channel)?;
        let transaction_id = c.take_transaction_id();
        if wait_for_completion {
            c.outstanding.insert(transaction_id, Waiter::SyncWaiting);
        }
        let forget = |bus: &mut Self| {
            if let Ok(c) = bus.chan_mut(channel) {
                c.outstanding.remove(&transaction_id);
            }
        };
        loop {
            match self.write_now(channel, transaction_id, buffer, external, wait_for_completion, false) {
                Ok(Written::Now) => break,
                Ok(Written::Full { needed }) => {
                    if timeout_ns == Some(0) {
                        forget(self);
                        return Err(NtStatus::BUFFER_OVERFLOW);
                    }
                    if needed != 0 {
                        self.arm_space_signal(channel, needed);
                    }
                }
                Err(status) => {
                    forget(self);
                    return Err(status);
                }
            }
            if let Err(status) = self.wait_step(channel, deadline) {
                forget(self);
                return Err(status);
            }
        }
        if !wait_for_completion {
            return Ok(0);
        }
        loop {
            let c = self.chan_mut(channel).map_err(|_| NtStatus::DEVICE_REMOVED)?;
            if let Some(Waiter::SyncDone(_)) = c.outstanding.get(&transaction_id)
                && let Some(Waiter::SyncDone(payload)) = c.outstanding.remove(&transaction_id)
            {
                let Some(out) = completion else { return Ok(0) };
                let len = payload.len().min(out.len());
                out[..len].copy_from_slice(&payload[..len]);
                return Ok(len);
            }
            if let Err(status) = self.wait_step(channel, deadline) {
                if let Ok(c) = self.chan_mut(channel)
                    && c.outstanding.contains_key(&transaction_id)
                {
                    c.outstanding.insert(transaction_id, Waiter::SyncAbandoned);
                }
                return Err(status);
            }
        }
    }

    fn channel_create_gpadl_from_buffer(
        &mut self,
        channel: ChannelHandle,
        flags: GpadlFlags,
        buffer: &dyn PhysicalBuffer,
    ) -> Result<GpadlHandle> {
        self.client_chan(channel)?;
        check_gpadl_arguments(flags, buffer.pfns(), buffer.byte_offset(), buffer.byte_count()).map_err(|status| {
            if status == NtStatus::INVALID_PARAMETER_2 { status } else { NtStatus::INVALID_PARAMETER_3 }
        })?;
        B::create_gpadl(self, channel, flags, buffer.pfns(), buffer.byte_offset(), buffer.byte_count())
    }

    fn channel_create_gpadl_from_pfn_list(
        &mut self,
        channel: ChannelHandle,
        flags: GpadlFlags,
        pfns: &[u64],
        byte_offset: u32,
        byte_count: u32,
    ) -> Result<GpadlHandle> {
        self.client_chan(channel)?;
        check_gpadl_arguments(flags, pfns, byte_offset, byte_count)?;
        B::create_gpadl(self, channel, flags, pfns, byte_offset, byte_count)
    }

    fn channel_delete_gpadl(&mut self, channel: ChannelHandle, gpadl: GpadlHandle) -> Result<()> {
        self.chan(channel)?;
        B::delete_gpadl(self, channel, gpadl)
    }

    fn gpadl_is_read_only(&self, gpadl: GpadlHandle) -> Result<bool> {
        let c = self.chan(gpadl.channel)?;
        let (_, flags) = c.gpadls.iter().find(|(id, _)| *id == gpadl.id).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        Ok(flags.contains(GpadlFlags::READ_ONLY))
    }

    fn packet_allocate(&mut self, channel: ChannelHandle) -> Result<PacketHandle> {
        let c = self.chan_mut(channel)?;
        if c.pool_in_use >= c.settings.maximum_packet_count {
            return Err(NtStatus::INSUFFICIENT_RESOURCES);
        }
        let size = c.packet_size() as usize;
        let memory = match c.pool.pop() {
            Some(memory) if memory.len() == size => memory,
            _ => vec![0u8; size].into_boxed_slice(),
        };
        let packet = SentPacket {
            memory: Some(memory),
            inline_context: vec![0; c.settings.inline_packet_context_size as usize],
            from_pool: true,
            routine: Routine::FreeOnCompletion,
            pointer: None,
            in_flight: false,
        };
        let (index, generation) = c.packets.insert(packet).ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        c.pool_in_use += 1;
        Ok(PacketHandle { channel, index, generation })
    }

    fn packet_initialize(&mut self, channel: ChannelHandle, memory: Box<[u8]>) -> Result<PacketHandle> {
        let c = self.chan_mut(channel)?;
        if memory.len() < c.packet_size() as usize {
            return Err(NtStatus::INVALID_PARAMETER_3);
        }
        let packet = SentPacket {
            memory: Some(memory),
            inline_context: vec![0; c.settings.inline_packet_context_size as usize],
            from_pool: false,
            routine: Routine::Unset,
            pointer: None,
            in_flight: false,
        };
        let (index, generation) = c.packets.insert(packet).ok_or(NtStatus::INSUFFICIENT_RESOURCES)?;
        Ok(PacketHandle { channel, index, generation })
    }

    fn packet_free(&mut self, packet: PacketHandle) -> Result<Option<Box<[u8]>>> {
        let c = self.chan_mut(packet.channel)?;
        let p = c.packets.get(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        if p.in_flight {
            return Err(NtStatus::INVALID_PARAMETER_1);
        }
        let Some(p) = c.packets.remove(packet.index, packet.generation) else {
            return Err(NtStatus::INVALID_PARAMETER_1);
        };
        if !p.from_pool {
            return Ok(p.memory);
        }
        c.pool_in_use = c.pool_in_use.saturating_sub(1);
        if let Some(memory) = p.memory {
            c.pool.push(memory);
        }
        Ok(None)
    }

    fn packet_set_completion_routine(&mut self, packet: PacketHandle, routine: CompletionRoutine) -> Result<()> {
        let c = self.chan_mut(packet.channel)?;
        let p = c.packets.get_mut(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        p.routine = Routine::Custom(routine);
        Ok(())
    }

    fn packet_set_pointer(&mut self, packet: PacketHandle, context: Option<Context>) -> Result<()> {
        let c = self.chan_mut(packet.channel)?;
        c.packets.get_mut(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?.pointer = context;
        Ok(())
    }

    fn packet_pointer(&self, packet: PacketHandle) -> Result<Option<Context>> {
        let c = self.chan(packet.channel)?;
        Ok(c.packets.get(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?.pointer.clone())
    }

    fn packet_channel(&self, packet: PacketHandle) -> Result<ChannelHandle> {
        let c = self.chan(packet.channel)?;
        c.packets.get(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        Ok(packet.channel)
    }

    fn packet_send(
        &mut self,
        packet: PacketHandle,
        buffer: &[u8],
        external: Option<&[ExternalRange]>,
        flags: SendFlags,
    ) -> Result<()> {
        self.check_sendable(packet)?;
        let channel = packet.channel;
        let c = self.chan_mut(channel)?;
        if buffer.len() > c.settings.maximum_packet_size as usize {
            return Err(NtStatus::INVALID_PARAMETER_3);
        }
        let external = external.unwrap_or(&[]);
        if !c.external_fits(external) {
            return Err(NtStatus::INVALID_PARAMETER_4);
        }
        if flags.0 & !SendFlags::ALL.0 != 0 {
            return Err(NtStatus::INVALID_PARAMETER_5);
        }
        let wait = flags.contains(SendFlags::WAIT_FOR_COMPLETION);
        let transaction_id = c.take_transaction_id();
        if let Some(p) = c.packets.get_mut(packet.index, packet.generation) {
            p.in_flight = true;
        }
        if wait {
            c.outstanding.insert(transaction_id, Waiter::Packet { index: packet.index, generation: packet.generation });
        }
        let notify = (!wait).then_some((packet.index, packet.generation));
        let result = self.send_or_queue(channel, transaction_id, buffer, external, wait, false, notify);
        if result.is_err()
            && let Ok(c) = self.chan_mut(channel)
        {
            c.outstanding.remove(&transaction_id);
            if let Some(p) = c.packets.get_mut(packet.index, packet.generation) {
                p.in_flight = false;
            }
        }
        result
    }

    fn packet_send_with_external_pfns(
        &mut self,
        packet: PacketHandle,
        buffer: &[u8],
        pfns: &[u64],
        flags: SendFlags,
    ) -> Result<()> {
        self.check_sendable(packet)?;
        if !flags.contains(SendFlags::WAIT_FOR_COMPLETION) || flags.0 & !SendFlags::ALL.0 != 0 {
            return Err(NtStatus::INVALID_PARAMETER_6);
        }
        let range = ExternalRange::whole_pages(pfns);
        if !range.is_well_formed() || !self.chan(packet.channel)?.external_fits(core::slice::from_ref(&range)) {
            return Err(NtStatus::INVALID_PARAMETER_4);
        }
        self.packet_send(packet, buffer, Some(core::slice::from_ref(&range)), flags)
    }

    fn packet_complete(&mut self, packet: PacketCompletion, completion: &[u8]) -> Result<()> {
        let c = self.chan(packet.channel)?;
        let record = c.incoming.get(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        if completion.len() > c.settings.maximum_packet_size as usize {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        let (transaction_id, requested) = (record.transaction_id, record.completion_requested);
        let channel = packet.channel;
        self.chan_mut(channel)?.incoming.remove(packet.index, packet.generation);
        let sendable = self.chan(channel).is_ok_and(|c| c.open.is_some() && !c.removed());
        if requested && sendable {
            self.send_or_queue(channel, transaction_id, completion, &[], false, true, None)?;
        }
        self.restart_queue(channel);
        Ok(())
    }

    fn packet_fail(&mut self, packet: PacketCompletion) -> Result<()> {
        let c = self.chan_mut(packet.channel)?;
        c.incoming.remove(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        c.queue_stopped = true;
        log::warn!("kmcl: {:?}: a packet failed; the incoming queue is stopped", packet.channel);
        Ok(())
    }

    fn packet_external_data(&self, packet: PacketCompletion) -> Result<Vec<ExternalRange>> {
        let record = self.incoming(packet)?;
        if record.external.is_empty() {
            return Err(NtStatus::NOT_FOUND);
        }
        Ok(record.external.clone())
    }

    fn packet_client_context(&mut self, packet: PacketCompletion) -> Result<&mut [u8]> {
        let c = self.chan_mut(packet.channel)?;
        let record = c.incoming.get_mut(packet.index, packet.generation).ok_or(NtStatus::INVALID_PARAMETER_1)?;
        Ok(&mut record.client_context)
    }

    fn packet_defer_to_task(&mut self, packet: PacketCompletion) -> Result<()> {
        let interrupt = self.context == ExecutionContext::Interrupt;
        let c = self.chan_mut(packet.channel)?;
        match c.inline.as_mut() {
            Some((current, deferred)) if *current == (packet.index, packet.generation) && interrupt => {
                *deferred = true;
                Ok(())
            }
            _ => Err(NtStatus::INVALID_PARAMETER_1),
        }
    }

    fn channel_set_incoming_processing_in_task(&mut self, channel: ChannelHandle, require: bool) -> Result<()> {
        self.chan_mut(channel)?.task_only = require;
        Ok(())
    }

    fn packet_completion_requested(&self, packet: PacketCompletion) -> Result<bool> {
        Ok(self.incoming(packet)?.completion_requested)
    }

    fn packet_transaction_id(&self, packet: PacketCompletion) -> Result<u64> {
        Ok(self.incoming(packet)?.transaction_id)
    }

    fn as_server(&mut self) -> Option<&mut dyn super::server::KmclServer> {
        B::as_server(self)
    }
}
