//! The Windows VMBus Kernel Mode Client Library (KMCL) model in Rust: the API a driver is written against.
//!
//! Implements issue 6 over the reference `kmcl-api.md` (client interface, server-only methods, callbacks, lifecycle)
//! and the two seed pages (`VmbPacketInitialize`, `VmbConvertVmbusHandleToKernelHandle`). A Windows driver author
//! should find every KMCL function here under a recognisable name; the table below says where.
//!
//! What is here:
//! - [`status`]: [`NtStatus`], the NTSTATUS value every KMCL function reports, and the [`Result`] convention of
//!   this layer (`Ok` = `STATUS_SUCCESS`; `Err` = the status the Windows page documents for that failure).
//! - [`handle`]: handle tables (per context and the kernel's) with generation-checked handles, and
//!   [`Handles::vmb_convert_vmbus_handle_to_kernel_handle`].
//! - The client side: [`Kmcl`] ([`api`]) is `KMCL_CLIENT_INTERFACE_V1` as one object-safe trait; [`Bus`] ([`bus`])
//!   implements it over the guest's [`Connection`](crate::client::Connection) and
//!   [`Channel`](crate::channel::Channel), with rings from a [`RingAllocator`], and dispatches interrupts and control
//!   messages ([`Bus::process_interrupt`], [`Bus::poll`]) to the driver's [`ChannelCallbacks`] ([`channel`]).
//!   Packets and their flags are in [`packet`], GPADLs in [`gpadl`].
//! - [`echo`]: an example driver written only against [`Kmcl`], the starting point for a new driver.
//! - The server side ([`server`]): [`ServerBus`] is the same packet engine ([`Engine`]) over the crate's VMBus host
//!   ([`crate::server`], through a [`ServerTransport`]), with server channels (`VmbChannelAllocate(IsServer =
//!   TRUE)`), the server lifecycle (enable offers, the guest's open and close drive the callbacks, disable
//!   rescinds) and the server-only methods ([`KmclServer`]).
//! - [`echo_server`]: the example device's end of [`echo`], written only against [`Kmcl`] and [`KmclServer`], the
//!   starting point for a new server driver.
//!
//! # Conventions
//! - A `VMBCHANNEL` is a [`ChannelHandle`], a `VMBPACKET` a [`PacketHandle`], a `VMBPACKETCOMPLETION` a
//!   [`PacketCompletion`], a GPADL handle a [`GpadlHandle`]: generation-checked handles into the [`Bus`]'s tables, so
//!   a stale or forged one is refused ([`NtStatus::INVALID_PARAMETER_1`]) and never reaches a newer object.
//! - `VmbChannelX(Channel, …)` is `kmcl.channel_x(channel, …)`, `VmbPacketX(Packet, …)` is
//!   `kmcl.packet_x(packet, …)`, `VmbChannelPacketX(PacketCompletion, …)` is `kmcl.packet_x(completion, …)`;
//!   the server-only methods are [`KmclServer`] methods of a [`ServerBus`] (`VmbServerChannelInitSetX` is
//!   `server.server_channel_init_set_x(channel, …)`, `VmbChannelMapGpadl` is `server.channel_map_gpadl(…)`); a
//!   callback, which gets `&mut dyn Kmcl`, reaches them through [`Kmcl::as_server`].
//! - "set/get pointer" is a typed [`Context`] (`Arc<dyn Any + Send + Sync>`) instead of a `void *`; callback function
//!   pointers and their context are a [`ChannelCallbacks`] trait object and [`CompletionRoutine`] closures.
//! - Windows notions without a counterpart: an **MDL** becomes a PFN list with offset and length
//!   ([`ExternalRange`], GPA-direct ranges on the wire, or a [`PhysicalBuffer`]); **IRQL** (DISPATCH vs PASSIVE)
//!   becomes interrupt context ([`Bus::process_interrupt`]) vs task context ([`Bus::poll`]); **PnP** arrival
//!   becomes offer matching (interface type and instance of a primary offer); the parent `DEVICE_OBJECT` becomes the
//!   [`Bus`]; **waiting** (KeWaitForSingleObject in synchronous requests) becomes polling the channel's ring and the
//!   transport with a deadline from `VmbusTransport::now_ns`.
//! - Invalid arguments and calls in the wrong state return the status the Windows page names
//!   ([`NtStatus::INVALID_PARAMETER_1`] for a channel that is invalid or in the wrong state, `_n` for the n-th
//!   parameter of the Windows function); nothing panics. Each method's documentation lists its statuses.
//!
//! # Mapping of the Windows API
//! Status: **done** (built and covered by tests in `kmcl::tests`; the server side by `vmbus/tests/kmcl_server.rs`)
//! or **no counterpart: …** (why, and what a unikernel driver uses instead). No row is left planned.
//!
//! ## Client interface (`KMCL_CLIENT_INTERFACE_V1`, 41 entries in interface order)
//! | # | Windows | Rust ([`Kmcl`] methods) | status |
//! |---|---|---|---|
//! | 1 | `VmbChannelAllocate` | [`Kmcl::channel_allocate`] | **done**: on a [`Bus`] a client channel, on a [`ServerBus`] a server channel (`IsServer = TRUE`; the bus the channel is allocated on decides, as the parent device object does on Windows). Every other function of this table works on server channels too, with the rings in the host's orientation, except rows 3, 4, 30, 31, V4 `CreateGpadlFromPfnList` and V5 `ClientChannelInitSetTargetProcessorIndex`, which are `_1` there (client-only; a server maps the guest's GPADLs instead of creating its own) |
//! | 2 | `VmbChannelCleanup` | [`Kmcl::channel_cleanup`] | **done** |
//! | 3 | `VmbChannelCreateGpadlFromBuffer` | [`Kmcl::channel_create_gpadl_from_buffer`] | **done** (the buffer is a [`PhysicalBuffer`]: a `no_std` library cannot look up the pages of a virtual address) |
//! | 4 | `VmbChannelCreateGpadlFromMdl` | [`Kmcl::channel_create_gpadl_from_pfn_list`] | **done**, no MDL: a PFN list with offset and length describes the same memory |
//! | 5 | `VmbChannelDeleteGpadl` | [`Kmcl::channel_delete_gpadl`] | **done** (GPADLs left at `closed` are deleted by the bus and counted in [`BusStats::leaked_gpadls`]) |
//! | 6 | `VmbChannelDisable` | [`Kmcl::channel_disable`] | **done** (on a server channel: teardown, then the offer is rescinded and RELID_RELEASED awaited) |
//! | 7 | `VmbChannelEnable` | [`Kmcl::channel_enable`] | **done** (binds to a matching offer now or when one is offered; on a server channel: offers it, and the guest's open runs the callbacks) |
//! | 8 | `VmbChannelGetInterfaceInstance` | [`Kmcl::channel_interface_instance`] | **done** |
//! | 9 | `VmbChannelGetMmioSpace` | [`Kmcl::channel_mmio_space`] | **done**: the range ([`MmioRange`]) carved at open from the bus's [`MmioAllocator`] for an offer that asks for `mmio_megabytes`; the kernel gives its bus no window yet (it would come from the VMBus ACPI node's `_CRS`, and no driver here needs MMIO), so there the call reports `INSUFFICIENT_RESOURCES`; on a server channel `NOT_SUPPORTED` (the guest places the MMIO, the server is not told where) |
//! | 10 | `VmbChannelGetPointer` | [`Kmcl::channel_pointer`] | **done** (typed context) |
//! | 11 | `VmbChannelInitSetClientContextSize` | [`Kmcl::channel_init_set_client_context_size`] | **done** (the area: [`Kmcl::packet_client_context`]) |
//! | 12 | `VmbChannelInitSetFlags` | [`Kmcl::channel_init_set_flags`] | **done** (`IS_PIPE`: binds only to named-pipe offers) |
//! | 13 | `VmbChannelInitSetFriendlyName` | [`Kmcl::channel_init_set_friendly_name`] | **done** (used in logs) |
//! | 14 | `VmbChannelInitSetMaximumExternalData` | [`Kmcl::channel_init_set_maximum_external_data`] | **done** (rings sized to fit; both directions checked) |
//! | 15 | `VmbChannelInitSetMaximumPacketSize` | [`Kmcl::channel_init_set_maximum_packet_size`] | **done** (drives ring sizing and `SizeofPacket`; larger incoming packets are dropped and counted) |
//! | 16 | `VmbChannelInitSetProcessPacketCallbacks` | [`Kmcl::channel_init_set_callbacks`] | **done**: one [`ChannelCallbacks`] trait holds the packet and the state-change callbacks |
//! | 17 | `VmbChannelInitSetStateChangeCallbacks` | [`Kmcl::channel_init_set_callbacks`] | **done**; the version/size check (`_2`) has no counterpart: the trait type is checked by the compiler |
//! | 18 | `VmbChannelPacketComplete` | [`Kmcl::packet_complete`] | **done** |
//! | 19 | `VmbChannelPacketDeferToPassive` | [`Kmcl::packet_defer_to_task`] | **done** (PASSIVE_LEVEL becomes task context) |
//! | 20 | `VmbChannelPacketFail` | [`Kmcl::packet_fail`] | **done** (stops the queue until the channel is disabled) |
//! | 21 | `VmbChannelPacketGetExternalData` | [`Kmcl::packet_external_data`] | **done**: the GPA-direct ranges as [`ExternalRange`]s instead of an MDL; never pending (the ranges arrive with the packet); a server reads and writes the bytes with [`KmclServer::packet_read_external_data`]/[`KmclServer::packet_write_external_data`], as it would through the MDL |
//! | 22 | `VmbChannelPause` | [`Kmcl::channel_pause`] | **done**; it does not wait for outstanding incoming packets (one thread: the driver completes them in `suspend`) |
//! | 23 | `VmbChannelSendSynchronousRequest` | [`Kmcl::channel_send_synchronous_request`] | **done** (timeout → `CANCELLED`, as Windows cancels the packet at its timeout) |
//! | 24 | `VmbChannelSetIncomingProcessingAtPassive` | [`Kmcl::channel_set_incoming_processing_in_task`] | **done** (IRQL becomes interrupt vs task context) |
//! | 25 | `VmbChannelSetInterruptLatency` | [`Kmcl::channel_set_interrupt_latency`] | **done**: the monitored channel's latency (100 ns units) in the guest → host monitor page, the previous value returned; `NOT_SUPPORTED` for an event-signalled channel and for server channels (the host end has no monitor page of its own to write) |
//! | 26 | `VmbChannelSetPointer` | [`Kmcl::channel_set_pointer`] | **done** |
//! | 27 | `VmbChannelSetTransactionQuota` | [`Kmcl::channel_set_transaction_quota`] | **done** (a blocked queue restarts on completion) |
//! | 28 | `VmbChannelSizeofPacket` | [`Kmcl::channel_sizeof_packet`] | **done** ([`packet::sizeof_packet`]) |
//! | 29 | `VmbChannelStart` | [`Kmcl::channel_start`] | **done** |
//! | 30 | `VmbClientChannelInitSetRingBufferPageCount` | [`Kmcl::channel_init_set_ring_buffer_page_count`] | **done** (control page included; the pages come from the [`RingAllocator`]) |
//! | 31 | `VmbClientChannelInitSetTargetPnp` | [`Kmcl::channel_init_set_target`] | **done**: PnP becomes offer matching; the PnP failure callback is [`ChannelCallbacks::pnp_failure`] |
//! | 32 | `VmbPacketAllocate` | [`Kmcl::packet_allocate`] | **done** (bounded per-channel pool; `INSUFFICIENT_RESOURCES` instead of NULL) |
//! | 33 | `VmbPacketFree` | [`Kmcl::packet_free`] | **done** |
//! | 34 | `VmbPacketGetChannel` | [`Kmcl::packet_channel`], [`PacketHandle::channel`] | **done** |
//! | 35 | `VmbPacketGetPointer` | [`Kmcl::packet_pointer`] | **done** |
//! | 36 | `VmbPacketInitialize` | [`Kmcl::packet_initialize`] | **done** (caller's memory; [`NtStatus::INVALID_PARAMETER_3`] when smaller than `SizeofPacket`; unsendable until a completion routine is set) |
//! | 37 | `VmbPacketSend` | [`Kmcl::packet_send`] | **done** (`WAIT_FOR_COMPLETION`; external data as GPA-direct ranges; a full ring queues) |
//! | 38 | `VmbPacketSendWithExternalMdl` | [`Kmcl::packet_send`] with [`ExternalRange`]s | **done**, no MDL: a range carries the offset and length an MDL would |
//! | 39 | `VmbPacketSendWithExternalPfns` | [`Kmcl::packet_send_with_external_pfns`] | **done** |
//! | 40 | `VmbPacketSetCompletionRoutine` | [`Kmcl::packet_set_completion_routine`] | **done** |
//! | 41 | `VmbPacketSetPointer` | [`Kmcl::packet_set_pointer`] | **done** |
//!
//! ## Server-only methods (`KMCL_SERVER_ONLY_METHODS`, 14)
//! [`KmclServer`] methods of a [`ServerBus`]; covered by `vmbus/tests/kmcl_server.rs`. Lifecycle of a server channel:
//! `channel_enable` offers it, the guest's open runs Opened (an error refuses the open with that status) → Started →
//! PostStarted, the guest's close runs Suspend → Closed and keeps the offer, `channel_disable` tears down, rescinds
//! and waits for RELID_RELEASED ([`server`] documents each step).
//!
//! | Windows | Rust | status |
//! |---|---|---|
//! | `VmbChannelMapGpadl` | [`KmclServer::channel_map_gpadl`] | **done**: the ranges ([`crate::server::MappedGpadl`]) instead of an MDL, bytes through [`KmclServer::channel_read_mapped_gpadl`]/[`KmclServer::channel_write_mapped_gpadl`]; `READ_ONLY`, a writable mapping of a read-only GPADL is `ACCESS_DENIED`, one mapping at a time, and the guest's `channel_delete_gpadl` waits until unmapped (GPADLs left mapped at `closed` are unmapped by the bus and counted) |
//! | `VmbChannelUnmapGpadl` | [`KmclServer::channel_unmap_gpadl`] | **done** (`_3` when not mapped) |
//! | `VmbChannelSaveBegin` | [`KmclServer::channel_save_begin`] | **done** ([`server::save`]): a snapshot of an offered-and-closed or paused channel — settings, offer, open, packets read and not delivered, and delivered ones not completed (the driver adds its part through [`PacketSaveRestore`]); sends in flight are not saved (their routines are code) |
//! | `VmbChannelSaveContinue` | [`KmclServer::channel_save_continue`] | **done**: chunks into caller buffers; "more to save" is [`SaveProgress::More`] ([`NtStatus::BUFFER_OVERFLOW`] on Windows), `BUFFER_TOO_SMALL` under [`server::save::SAVE_MIN_CHUNK`] bytes |
//! | `VmbChannelSaveEnd` | [`KmclServer::channel_save_end`] | **done**: after a complete save, `channel_disable` releases the channel without rescinding it, so the guest keeps its channel |
//! | `VmbChannelRestoreFromBuffer` | [`KmclServer::channel_restore_from_buffer`] | **done**: chunks of any size into a new disabled channel (on a new [`ServerBus`] over the same host); "more chunks" is [`RestoreProgress::MoreChunks`] ([`NtStatus::MORE_PROCESSING_REQUIRED`] on Windows); malformed bytes `_2`; `channel_enable` then takes the saved offer and open over (rings mapped again, undelivered packets queued, outstanding ones restored, Started → PostStarted) |
//! | `VmbPacketRestore` | [`KmclServer::packet_restore`] | **done**: inside [`PacketSaveRestore::restore_packet`], the outstanding packet back as a [`PacketCompletion`] to complete |
//! | `VmbConvertVmbusHandleToKernelHandle` | [`Handles::vmb_convert_vmbus_handle_to_kernel_handle`] | **done**: [`handle`] (the calling context is an explicit argument; the kernel handle is closed with [`Handles::close_kernel_handle`]) |
//! | `VmbServerChannelInitSetVmbusHandle` | [`KmclServer::server_channel_init_set_vmbus_handle`] | **done**: resolved with [`Handles::resolve_partition`] in the [`Handles`] the bus was made with (`INVALID_HANDLE` closed/forged, `OBJECT_TYPE_MISMATCH` not a partition); the partition is recorded ([`KmclServer::server_channel_partition`]); one transport serves one guest, so it does not route the offer |
//! | `VmbServerChannelInitSetFlags` | [`KmclServer::server_channel_init_set_flags`] ([`ServerChannelFlags`]) | **done**: `_2` for unknown bits; `LOOPBACK_OFFER`, `ENUMERATE_DEVICE_INTERFACE`, `OFFER_AS_PIPE` (named-pipe offer, pipe mode first in the user data), `TLNPI_PROVIDER_OFFER` become offer flags; `FORCE_NEW_CHANNEL` is recorded and changes nothing (every enable is a new offer) |
//! | `VmbServerChannelInitSetMmioMegabytes` | [`KmclServer::server_channel_init_set_mmio_megabytes`] | **done** (`INVALID_PARAMETER` when both 0; the offer carries the required amount, the optional one is recorded: the crate's OFFERCHANNEL keeps that field reserved) |
//! | `VmbServerChannelInitSetSaveRestorePacketCallbacks` | [`KmclServer::server_channel_init_set_save_restore_packet_callbacks`] | **done** ([`PacketSaveRestore`]: `save_packet`, `restore_packet`) |
//! | `VmbServerChannelInitSetTargetInterfaceId` | [`KmclServer::server_channel_init_set_target_interface_id`] | **done** (required before `channel_enable`) |
//! | `VmbServerChannelInitSetTargetVtl` | [`KmclServer::server_channel_init_set_target_vtl`] | **done** for VTL 0; other VTLs `_2`: the crate's server has one guest connection, VTL 0's |
//! | (offer user data, 120 bytes) | [`KmclServer::server_channel_init_set_offer_user_data`], [`KmclServer::server_channel_init_set_pipe_mode`] | **done**, additions (Windows has no function of its own for them) |
//!
//! ## Later interface versions (names as `kmcl-api.md` lists them; Windows documents no signatures)
//! | version | Windows | Rust | status |
//! |---|---|---|---|
//! | V2 | `PacketGetClientContext` | [`Kmcl::packet_client_context`] | **done** (the area sized by row 11) |
//! | V2 | `GetTargetDeviceObject` | [`Kmcl::channel_offer`] | **done**, no device objects: the bound offer identifies the device |
//! | V2 | `GetParentDeviceObject` | — | no counterpart: no device objects; the parent is the [`Bus`] the channel was allocated on |
//! | V3 | `InitSetBounceBufferSizes` | — | no counterpart: bounce buffers exist for isolated VMs (SNP, TDX), where the host cannot read private guest memory and packets' external data must be copied through shared pages; this kernel runs in ordinary partitions, where the host reaches every page a GPADL or GPA-direct range names |
//! | V3 | `AllocateBounceBuffer` | — | no counterpart, as above: external data is sent in place ([`Kmcl::packet_send`] with [`ExternalRange`]s) |
//! | V4 | `InitSetMaximumPacketCount` | [`Kmcl::channel_init_set_maximum_packet_count`] | **done** (bounds the per-channel packet pool) |
//! | V4 | `CreateGpadlFromPfnList` | [`Kmcl::channel_create_gpadl_from_pfn_list`] | **done** (`READ_ONLY` recorded, [`Kmcl::gpadl_is_read_only`]: GPADL_HEADER has no read-only bit, so the host is not told) |
//! | V5 | `InitSetPrimaryChannel` | [`Kmcl::channel_init_set_primary_channel`] | **done**: a sub-channel binds, once its primary is open, to a free sub-channel offer (index > 0) of the primary's interface type and instance; asking the host for sub-channels is the device protocol's business |
//! | V5 | `ChannelInitialize` | — | no counterpart: a channel in caller-supplied memory; the [`Bus`] owns channel objects and hands out handles, so [`Kmcl::channel_allocate`] covers it |
//! | V5 | `SetAllowableDpcCpuUsage` | — | no counterpart: no DPCs and no DPC watchdog; the kernel decides how long it stays in [`Bus::process_interrupt`] |
//! | V5 | `ClientChannelInitSetTargetProcessorIndex` | [`Kmcl::channel_init_set_target_vp`] | **done** (the VP_INDEX sent in OPENCHANNEL) |
//! | V5 | `SizeofChannel` | — | no counterpart: pairs with `ChannelInitialize` |
//! | V5 | `InitSetInlinePacketContextSize` | [`Kmcl::channel_init_set_inline_packet_context_size`] | **done** (added to `SizeofPacket`) |
//! | V5 | `PacketGetInlinePacketContextPointer` | [`Kmcl::packet_inline_context`] | **done** |
//! | V5 | `InitSetProcessPacketCallbacksEx` | [`Kmcl::channel_init_set_callbacks`] | **done** (the extended parameters are part of the one callback trait) |
//! | V5 | `PacketSetCompletionRoutineEx` | [`Kmcl::packet_set_completion_routine`] | **done** (a closure carries the extra context) |
//!
//! ## Types, statuses and additions
//! | Windows | Rust | status |
//! |---|---|---|
//! | `NTSTATUS`, `NT_SUCCESS`, `STATUS_*` | [`NtStatus`], [`NtStatus::is_success`], the `NtStatus` constants | **done**: [`status`] |
//! | `HANDLE` (user mode, per process) | [`Handle<T>`], [`RawHandle`]; the process is a [`ContextId`] | **done**: [`handle`] |
//! | `HANDLE` (kernel) | [`KernelHandle`] | **done**: [`handle`] |
//! | `VMBCHANNEL`, `VMBPACKET`, `VMBPACKETCOMPLETION` | [`ChannelHandle`], [`PacketHandle`], [`PacketCompletion`] | **done** (generation-checked) |
//! | `VMBUS_CHANNEL_INIT_FLAG_*`, `VMBUS_CHANNEL_FORMAT_FLAG_*`, `VMBUS_GPADL_FLAG_*` | [`ChannelInitFlags`], [`SendFlags`], [`GpadlFlags`] | **done** (unknown bits → `_2`/`_5`/`_6` as documented per method) |
//! | `EvtChannel*`, `EvtPacketCompletion` | [`ChannelCallbacks`], [`CompletionRoutine`] | **done** |
//! | — | [`Kmcl::channel_state`], [`Kmcl::packet_transaction_id`], [`Kmcl::packet_completion_requested`], [`Bus::stats`] | additions for diagnostics, tests and device protocols that echo ids |
//! | — | [`Kmcl::as_server`], [`KmclServer::server_channel_settings`], [`ServerBus::server_stats`] | additions: server-only methods from callbacks, diagnostics |

pub mod api;
pub mod bus;
pub mod channel;
pub mod echo;
pub mod echo_server;
pub mod gpadl;
pub mod handle;
pub mod mmio;
pub mod packet;
pub mod server;
mod slots;
pub mod status;

#[cfg(test)]
mod tests;

pub use api::Kmcl;
pub use bus::{Backend, Bus, BusStats, ClientBackend, EndError, Engine, ExecutionContext, RingAllocator};
pub use channel::{
    ChannelCallbacks, ChannelHandle, ChannelInitFlags, ChannelSettings, ChannelState, Context, TargetInterface,
};
pub use gpadl::{GpadlFlags, GpadlHandle, PhysicalBuffer};
pub use mmio::{MmioAllocator, MmioRange, MmioWindow};
pub use handle::{
    ContextId, Handle, HandleTable, Handles, KernelHandle, KernelObject, PartitionId, RawHandle, VmbusPartition,
};
pub use packet::{CompletionRoutine, ExternalRange, PacketCompletion, PacketHandle, ProcessPacketFlags, SendFlags};
pub use server::save::{PacketSaveRestore, RestoreProgress, SaveProgress};
pub use server::{
    KmclServer, ServerBackend, ServerBus, ServerBusStats, ServerChannelFlags, ServerChannelSettings, ServerChannelState,
    ServerTransport,
};
pub use status::{NtStatus, Result, Severity};
