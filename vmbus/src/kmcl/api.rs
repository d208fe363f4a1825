//! The KMCL client interface as one object-safe trait: what `KMCL_CLIENT_INTERFACE_V1` is to a Windows driver,
//! [`Kmcl`] is to a unikernel driver.
//!
//! Implements `kmcl-api.md` §Client interface (41 entries) and the later-version rows this layer supports; the
//! mapping table in [`crate::kmcl`] names the method for every Windows function. [`super::Bus`] implements it;
//! callbacks receive `&mut dyn Kmcl`, so a driver is written against this trait alone.
//!
//! Statuses follow the Windows pages: `_n` is `STATUS_INVALID_PARAMETER_n`, counting the Windows function's
//! parameters from 1. A handle that is stale, forged or of another bus is `_1` (the object parameter); a channel in
//! the wrong state is `_1` too, as `kmcl-api.md` says for every channel function.

use super::channel::{ChannelCallbacks, ChannelHandle, ChannelInitFlags, ChannelState, Context};
use super::gpadl::{GpadlFlags, GpadlHandle, PhysicalBuffer};
use super::packet::{CompletionRoutine, ExternalRange, PacketCompletion, PacketHandle, SendFlags};
use super::status::Result;
use crate::client::Offer;
use crate::protocol::Guid;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// The KMCL client interface: every function a client driver calls (see the module documentation).
pub trait Kmcl {
    // ----- channel lifecycle -----

    /// `VmbChannelAllocate` (client): a new channel with default settings, in [`ChannelState::Disabled`].
    /// [`NtStatus::INSUFFICIENT_RESOURCES`](super::NtStatus::INSUFFICIENT_RESOURCES) when no slot is left.
    fn channel_allocate(&mut self) -> Result<ChannelHandle>;

    /// `VmbChannelCleanup`: frees a disabled (or closed) channel; its handle and every packet handle of it become
    /// stale. `_1` in any other state.
    fn channel_cleanup(&mut self, channel: ChannelHandle) -> Result<()>;

    /// `VmbChannelEnable` (client): binds to a matching offer (now, or when one arrives) and runs
    /// Opened → Started → queue → PostStarted. Returns at once when no offer matches yet. `_1` unless disabled or
    /// closed, or without callbacks, or without a target (or a primary channel, for a sub-channel).
    fn channel_enable(&mut self, channel: ChannelHandle) -> Result<()>;

    /// `VmbChannelDisable` (client): Suspend → outstanding sends cancelled → Closed → CLOSECHANNEL and ring teardown;
    /// returns when torn down, in [`ChannelState::Disabled`]. `_1` for a bad handle;
    /// [`NtStatus::INVALID_DEVICE_STATE`](super::NtStatus::INVALID_DEVICE_STATE) from a callback of the same
    /// channel (Windows would deadlock there).
    fn channel_disable(&mut self, channel: ChannelHandle) -> Result<()>;

    /// `VmbChannelPause`: Suspend; no ProcessPacket until [`Kmcl::channel_start`]. `_1` unless started.
    fn channel_pause(&mut self, channel: ChannelHandle) -> Result<()>;

    /// `VmbChannelStart`: leaves the paused state (Started → queue → PostStarted); a started channel stays as it is.
    /// `_1` in any other state.
    fn channel_start(&mut self, channel: ChannelHandle) -> Result<()>;

    /// The channel's state (no Windows counterpart; for diagnostics and tests).
    fn channel_state(&self, channel: ChannelHandle) -> Result<ChannelState>;

    // ----- InitSet* (only while disabled or closed: `_1` otherwise) -----

    /// `VmbChannelInitSetMaximumPacketSize`: `_2` if 0 or above [`super::channel::MAX_PACKET_SIZE_LIMIT`].
    fn channel_init_set_maximum_packet_size(&mut self, channel: ChannelHandle, packet_size: u32) -> Result<()>;

    /// `VmbChannelInitSetMaximumExternalData`: `_2` if `data_size` is 0, `_3` if `chain_length` is 0 or above
    /// [`super::channel::MAX_EXTERNAL_CHAIN_LENGTH`] or too short for `data_size`.
    fn channel_init_set_maximum_external_data(
        &mut self,
        channel: ChannelHandle,
        data_size: u32,
        chain_length: u32,
    ) -> Result<()>;

    /// `VmbChannelInitSetClientContextSize`: `_2` above [`super::channel::MAX_CLIENT_CONTEXT_SIZE`].
    fn channel_init_set_client_context_size(&mut self, channel: ChannelHandle, size: u32) -> Result<()>;

    /// `VmbChannelInitSetFlags`: `_2` for unknown bits.
    fn channel_init_set_flags(&mut self, channel: ChannelHandle, flags: ChannelInitFlags) -> Result<()>;

    /// `VmbChannelInitSetFriendlyName`: `_2` if longer than 256 bytes.
    fn channel_init_set_friendly_name(&mut self, channel: ChannelHandle, name: &str) -> Result<()>;

    /// `VmbChannelInitSetStateChangeCallbacks` and `VmbChannelInitSetProcessPacketCallbacks` in one: the driver's
    /// [`ChannelCallbacks`].
    fn channel_init_set_callbacks(
        &mut self,
        channel: ChannelHandle,
        callbacks: Box<dyn ChannelCallbacks>,
    ) -> Result<()>;

    /// `VmbClientChannelInitSetRingBufferPageCount`: pages of each ring, control page included; `_2`/`_3` for an
    /// incoming/outgoing count below 2 or above [`super::channel::MAX_RING_PAGES`].
    fn channel_init_set_ring_buffer_page_count(
        &mut self,
        channel: ChannelHandle,
        incoming_pages: u32,
        outgoing_pages: u32,
    ) -> Result<()>;

    /// `VmbClientChannelInitSetTargetPnp`: the offer to bind to (`None` instance = any). The PnP failure callback is
    /// [`ChannelCallbacks::pnp_failure`].
    fn channel_init_set_target(
        &mut self,
        channel: ChannelHandle,
        interface_type: Guid,
        interface_instance: Option<Guid>,
    ) -> Result<()>;

    /// V4 `InitSetMaximumPacketCount`: bounds the channel's packet pool; `_2` if 0.
    fn channel_init_set_maximum_packet_count(&mut self, channel: ChannelHandle, count: u32) -> Result<()>;

    /// V5 `ClientChannelInitSetTargetProcessorIndex`: the VP (VP_INDEX) that takes the channel's interrupts, sent in
    /// OPENCHANNEL. Which VPs exist is the kernel's knowledge; the host refuses an open naming a VP it does not have.
    fn channel_init_set_target_vp(&mut self, channel: ChannelHandle, vp_index: u32) -> Result<()>;

    /// V5 `InitSetPrimaryChannel`: makes `channel` a sub-channel of `primary`. Once the primary is open, enabling
    /// the channel binds it to a free sub-channel offer (`sub_channel_index` > 0) with the primary's interface type
    /// and instance — the host makes those offers when the device protocol asks for sub-channels — and no target
    /// is needed. `_1` unless `channel` is disabled; `_2` if `primary` is stale, is `channel`, or is itself a
    /// sub-channel.
    fn channel_init_set_primary_channel(&mut self, channel: ChannelHandle, primary: ChannelHandle) -> Result<()>;

    /// V5 `InitSetInlinePacketContextSize`: bytes of driver context inside every outgoing packet object (added to
    /// `channel_sizeof_packet`); `_2` above [`super::channel::MAX_CLIENT_CONTEXT_SIZE`].
    fn channel_init_set_inline_packet_context_size(&mut self, channel: ChannelHandle, size: u32) -> Result<()>;

    // ----- channel, any state -----

    /// `VmbChannelSetPointer`.
    fn channel_set_pointer(&mut self, channel: ChannelHandle, context: Option<Context>) -> Result<()>;

    /// `VmbChannelGetPointer`.
    fn channel_pointer(&self, channel: ChannelHandle) -> Result<Option<Context>>;

    /// `VmbChannelSetTransactionQuota`: most incoming packets delivered and not yet completed; `_2` if 0. A queue
    /// blocked by the quota restarts when a packet is completed.
    fn channel_set_transaction_quota(&mut self, channel: ChannelHandle, quota: u32) -> Result<()>;

    /// `VmbChannelGetInterfaceInstance`: the bound offer's instance, else the target's. `_1` if neither is known.
    fn channel_interface_instance(&self, channel: ChannelHandle) -> Result<Guid>;

    /// V2 `GetTargetDeviceObject`'s counterpart: the offer the channel is bound to. `_1` when not bound.
    fn channel_offer(&self, channel: ChannelHandle) -> Result<Offer>;

    /// `VmbChannelSetInterruptLatency`: the latency (100 ns units) the host may take before it acts on this
    /// channel's monitored notifications (MNF), written in the guest → host monitor page; returns the previous
    /// value. Valid while the channel has its rings (from `opened` to `closed`); `_1` otherwise.
    /// [`NtStatus::NOT_SUPPORTED`](super::NtStatus::NOT_SUPPORTED) when the offer is not monitored (the channel
    /// signals with HvSignalEvent, which has no latency) or the bus has no monitor page.
    fn channel_set_interrupt_latency(&mut self, channel: ChannelHandle, latency: u16) -> Result<u16>;

    /// `VmbChannelGetMmioSpace`: the MMIO range given to the channel when it opened, `mmio_megabytes` of its
    /// offer aligned to 1 MiB. `_1` unless the channel has its rings (from `opened` to `closed`);
    /// [`NtStatus::NOT_FOUND`](super::NtStatus::NOT_FOUND) when the offer asks for no MMIO;
    /// [`NtStatus::INSUFFICIENT_RESOURCES`](super::NtStatus::INSUFFICIENT_RESOURCES) when the bus has no
    /// [`MmioAllocator`](super::MmioAllocator) or it had no room.
    fn channel_mmio_space(&self, channel: ChannelHandle) -> Result<super::MmioRange>;

    /// `VmbChannelSizeofPacket`: bytes `packet_initialize` needs.
    fn channel_sizeof_packet(&self, channel: ChannelHandle) -> Result<u32>;

    /// `VmbChannelSendSynchronousRequest`: sends `buffer` (and `external` ranges as a GPA-direct packet), waits for
    /// the completion and copies it into `completion` (its length a multiple of 8); returns the bytes copied.
    /// `timeout_ns`: `None` waits for ever; `Some(0)` does not queue a packet that does not fit
    /// ([`NtStatus::BUFFER_OVERFLOW`](super::NtStatus::BUFFER_OVERFLOW)); otherwise the request is cancelled when the
    /// time is up ([`NtStatus::CANCELLED`](super::NtStatus::CANCELLED), as Windows cancels the packet at its
    /// timeout). [`NtStatus::DEVICE_REMOVED`](super::NtStatus::DEVICE_REMOVED) when the channel is closing or was
    /// rescinded. `_1` channel not started; `_3` buffer above the maximum packet size; `_4` external data malformed
    /// or above the maximum; `_5` unknown flags; `_7` completion length not a multiple of 8.
    fn channel_send_synchronous_request(
        &mut self,
        channel: ChannelHandle,
        buffer: &[u8],
        external: Option<&[ExternalRange]>,
        flags: SendFlags,
        completion: Option<&mut [u8]>,
        timeout_ns: Option<u64>,
    ) -> Result<usize>;

    // ----- GPADLs -----

    /// `VmbChannelCreateGpadlFromBuffer`: describes `buffer` to the host; returns once the host confirmed. `_1` unless
    /// the channel is open; `_2` unknown flags; `_3` empty or malformed buffer;
    /// [`NtStatus::UNSUCCESSFUL`](super::NtStatus::UNSUCCESSFUL) when the host refused.
    fn channel_create_gpadl_from_buffer(
        &mut self,
        channel: ChannelHandle,
        flags: GpadlFlags,
        buffer: &dyn PhysicalBuffer,
    ) -> Result<GpadlHandle>;

    /// V4 `CreateGpadlFromPfnList` (and row 4, `CreateGpadlFromMdl`: an MDL is a PFN list with offset and length):
    /// `byte_count` bytes starting `byte_offset` bytes into the first of `pfns`. Statuses as
    /// [`Kmcl::channel_create_gpadl_from_buffer`], `_3` for bad PFNs, `_4`/`_5` for a bad offset/length.
    fn channel_create_gpadl_from_pfn_list(
        &mut self,
        channel: ChannelHandle,
        flags: GpadlFlags,
        pfns: &[u64],
        byte_offset: u32,
        byte_count: u32,
    ) -> Result<GpadlHandle>;

    /// `VmbChannelDeleteGpadl`: tears the GPADL down and waits for the host. `_2` for an unknown GPADL.
    fn channel_delete_gpadl(&mut self, channel: ChannelHandle, gpadl: GpadlHandle) -> Result<()>;

    /// Whether the GPADL was created `READ_ONLY` (no Windows counterpart; see [`GpadlFlags::READ_ONLY`]).
    fn gpadl_is_read_only(&self, gpadl: GpadlHandle) -> Result<bool>;

    // ----- outgoing packets -----

    /// `VmbPacketAllocate`: a packet from the channel's pool, whose default completion routine frees it.
    /// [`NtStatus::INSUFFICIENT_RESOURCES`](super::NtStatus::INSUFFICIENT_RESOURCES) when the pool is exhausted
    /// (Windows returns NULL).
    fn packet_allocate(&mut self, channel: ChannelHandle) -> Result<PacketHandle>;

    /// `VmbPacketInitialize`: a packet in caller memory (`memory.len()` is `ByteCount`). `_3` if smaller than
    /// `channel_sizeof_packet`. Its completion routine is unset: it cannot be sent before
    /// [`Kmcl::packet_set_completion_routine`].
    fn packet_initialize(&mut self, channel: ChannelHandle, memory: Box<[u8]>) -> Result<PacketHandle>;

    /// `VmbPacketFree`: frees an unsent or completed packet; an initialized packet's memory is handed back (`None`
    /// when freed from inside its own completion routine, or for a pool packet). `_1` while the packet is in flight.
    fn packet_free(&mut self, packet: PacketHandle) -> Result<Option<Box<[u8]>>>;

    /// `VmbPacketSetCompletionRoutine` (and V5 `...Ex`).
    fn packet_set_completion_routine(&mut self, packet: PacketHandle, routine: CompletionRoutine) -> Result<()>;

    /// `VmbPacketSetPointer`.
    fn packet_set_pointer(&mut self, packet: PacketHandle, context: Option<Context>) -> Result<()>;

    /// `VmbPacketGetPointer`.
    fn packet_pointer(&self, packet: PacketHandle) -> Result<Option<Context>>;

    /// V5 `PacketGetInlinePacketContextPointer`: the packet's inline context (zeroed when the packet is made; it
    /// keeps its contents across sends until the packet is freed).
    fn packet_inline_context(&mut self, packet: PacketHandle) -> Result<&mut [u8]>;

    /// `VmbPacketGetChannel`, checked: `_1` for a stale packet.
    fn packet_channel(&self, packet: PacketHandle) -> Result<ChannelHandle>;

    /// `VmbPacketSend`: `buffer` in band, `external` ranges as a GPA-direct packet. With `WAIT_FOR_COMPLETION` the
    /// completion routine runs when the other end's completion arrives; without, once the packet is in the ring. A
    /// full ring queues the packet. `_1` stale packet, packet in flight or without a completion routine; `_3`
    /// buffer above the maximum packet size; `_4` external data malformed or above the maximum; `_5` unknown flags;
    /// [`NtStatus::DEVICE_REMOVED`](super::NtStatus::DEVICE_REMOVED) channel closing or rescinded;
    /// [`NtStatus::INVALID_DEVICE_STATE`](super::NtStatus::INVALID_DEVICE_STATE) channel not open.
    fn packet_send(
        &mut self,
        packet: PacketHandle,
        buffer: &[u8],
        external: Option<&[ExternalRange]>,
        flags: SendFlags,
    ) -> Result<()>;

    /// `VmbPacketSendWithExternalPfns` (and row 38, `...WithExternalMdl`): `pfns` as whole pages. `_6` unless `flags`
    /// has `WAIT_FOR_COMPLETION`; otherwise as [`Kmcl::packet_send`] (`_4` for the PFNs).
    fn packet_send_with_external_pfns(
        &mut self,
        packet: PacketHandle,
        buffer: &[u8],
        pfns: &[u64],
        flags: SendFlags,
    ) -> Result<()>;

    // ----- incoming packets -----

    /// `VmbChannelPacketComplete`: sends `completion` back if the other end asked, and releases the packet (and its
    /// quota slot). `_1` stale packet; `_2` completion above the maximum packet size.
    fn packet_complete(&mut self, packet: PacketCompletion, completion: &[u8]) -> Result<()>;

    /// `VmbChannelPacketFail`: the packet is dropped without a completion and the channel's incoming queue stops
    /// (until the channel is disabled and enabled again). `_1` stale packet.
    fn packet_fail(&mut self, packet: PacketCompletion) -> Result<()>;

    /// `VmbChannelPacketGetExternalData`: the packet's GPA-direct ranges (a PFN list instead of an MDL); never
    /// pending. `_1` stale packet; [`NtStatus::NOT_FOUND`](super::NtStatus::NOT_FOUND) when it has none.
    fn packet_external_data(&self, packet: PacketCompletion) -> Result<Vec<ExternalRange>>;

    /// V2 `PacketGetClientContext`: the packet's client context area (`channel_init_set_client_context_size`
    /// bytes, zeroed on arrival).
    fn packet_client_context(&mut self, packet: PacketCompletion) -> Result<&mut [u8]>;

    /// `VmbChannelPacketDeferToPassive`: only from inside `process_packet` for that packet, in interrupt context
    /// (`_1` otherwise); after
    /// the callback returns, the packet is delivered again (the same packet, parsed again) from task context
    /// ([`super::Bus::poll`]) instead of the interrupt.
    fn packet_defer_to_task(&mut self, packet: PacketCompletion) -> Result<()>;

    /// `VmbChannelSetIncomingProcessingAtPassive`: with `require`, `process_packet` runs only in task context
    /// ([`super::Bus::poll`]); [`super::Bus::process_interrupt`] then only drains the ring and matches completions.
    fn channel_set_incoming_processing_in_task(&mut self, channel: ChannelHandle, require: bool) -> Result<()>;

    /// Whether the other end asked for a completion packet (no Windows counterpart: `packet_complete` decides alone
    /// there; a driver may want to answer differently).
    fn packet_completion_requested(&self, packet: PacketCompletion) -> Result<bool>;

    /// The transaction id of an incoming packet (no Windows counterpart; for logs and device protocols that echo
    /// it).
    fn packet_transaction_id(&self, packet: PacketCompletion) -> Result<u64>;

    // ----- server channels -----

    /// The server-only methods (`KMCL_SERVER_ONLY_METHODS`) when this is a server's KMCL
    /// ([`super::server::ServerBus`]), else `None` (no Windows counterpart: a Windows driver calls them by name; here
    /// a callback, which gets `&mut dyn Kmcl`, reaches them through this).
    fn as_server(&mut self) -> Option<&mut dyn super::server::KmclServer> {
        None
    }
}
