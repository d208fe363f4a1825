//! The Windows VMBus Kernel Mode Client Library (KMCL) model in Rust: the API a driver is written against.
//!
//! Implements issue 6 over the reference `kmcl-api.md` (client interface, server-only methods, callbacks, lifecycle)
//! and the two seed pages (`VmbPacketInitialize`, `VmbConvertVmbusHandleToKernelHandle`). A Windows driver author
//! should find every KMCL function here under a recognisable name; the table below says where.
//!
//! Built so far:
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
//!
//! # Conventions
//! - A `VMBCHANNEL` is a [`ChannelHandle`], a `VMBPACKET` a [`PacketHandle`], a `VMBPACKETCOMPLETION` a
//!   [`PacketCompletion`], a GPADL handle a [`GpadlHandle`]: generation-checked handles into the [`Bus`]'s tables, so
//!   a stale or forged one is refused ([`NtStatus::INVALID_PARAMETER_1`]) and never reaches a newer object.
//! - `VmbChannelX(Channel, …)` is `kmcl.channel_x(channel, …)`, `VmbPacketX(Packet, …)` is
//!   `kmcl.packet_x(packet, …)`, `VmbChannelPacketX(PacketCompletion, …)` is `kmcl.packet_x(completion, …)`;
//!   server-only methods are planned on a `ServerChannel` (`kmcl::server`, over `vmbus::server`).
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
//! Status: **done** (built and covered by tests in `kmcl::tests`), **planned: `<where>`** (the intended Rust name and
//! module, to be built), or **no counterpart: …** (what a unikernel driver uses instead).
//!
//! ## Client interface (`KMCL_CLIENT_INTERFACE_V1`, 41 entries in interface order)
//! | # | Windows | Rust ([`Kmcl`] methods) | status |
//! |---|---|---|---|
//! | 1 | `VmbChannelAllocate` | [`Kmcl::channel_allocate`] | **done** (client channels; the parent device object is the [`Bus`]; `IsServer` channels are planned in `kmcl::server`) |
//! | 2 | `VmbChannelCleanup` | [`Kmcl::channel_cleanup`] | **done** |
//! | 3 | `VmbChannelCreateGpadlFromBuffer` | [`Kmcl::channel_create_gpadl_from_buffer`] | **done** (the buffer is a [`PhysicalBuffer`]: a `no_std` library cannot look up the pages of a virtual address) |
//! | 4 | `VmbChannelCreateGpadlFromMdl` | [`Kmcl::channel_create_gpadl_from_pfn_list`] | **done**, no MDL: a PFN list with offset and length describes the same memory |
//! | 5 | `VmbChannelDeleteGpadl` | [`Kmcl::channel_delete_gpadl`] | **done** (GPADLs left at `closed` are deleted by the bus and counted in [`BusStats::leaked_gpadls`]) |
//! | 6 | `VmbChannelDisable` | [`Kmcl::channel_disable`] | **done** |
//! | 7 | `VmbChannelEnable` | [`Kmcl::channel_enable`] | **done** (binds to a matching offer now or when one is offered) |
//! | 8 | `VmbChannelGetInterfaceInstance` | [`Kmcl::channel_interface_instance`] | **done** |
//! | 9 | `VmbChannelGetMmioSpace` | `Kmcl::channel_mmio_space` | planned: needs an MMIO range allocator for VMBus devices in the kernel (none yet); the size the device wants is `channel_offer(..).mmio_megabytes` |
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
//! | 21 | `VmbChannelPacketGetExternalData` | [`Kmcl::packet_external_data`] | **done**: the GPA-direct ranges as [`ExternalRange`]s instead of an MDL; never pending (the ranges arrive with the packet) |
//! | 22 | `VmbChannelPause` | [`Kmcl::channel_pause`] | **done**; it does not wait for outstanding incoming packets (one thread: the driver completes them in `suspend`) |
//! | 23 | `VmbChannelSendSynchronousRequest` | [`Kmcl::channel_send_synchronous_request`] | **done** (timeout → `CANCELLED`, as Windows cancels the packet at its timeout) |
//! | 24 | `VmbChannelSetIncomingProcessingAtPassive` | [`Kmcl::channel_set_incoming_processing_in_task`] | **done** (IRQL becomes interrupt vs task context) |
//! | 25 | `VmbChannelSetInterruptLatency` | `Kmcl::channel_set_interrupt_latency` | planned: the monitored-notification latency lives in the monitor page, which `vmbus::channel::InterruptPages` does not expose yet |
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
//! | Windows | Rust | status |
//! |---|---|---|
//! | `VmbChannelMapGpadl` | `ServerChannel::map_gpadl` | planned: `kmcl::server` (a PFN list instead of an MDL) |
//! | `VmbChannelUnmapGpadl` | `ServerChannel::unmap_gpadl` | planned: `kmcl::server` |
//! | `VmbChannelSaveBegin` | `ServerChannel::save_begin` | planned: `kmcl::server` (state kept across a server restart) |
//! | `VmbChannelSaveContinue` | `ServerChannel::save_continue` | planned: `kmcl::server` ("more to save" is an `Ok` variant, [`NtStatus::BUFFER_OVERFLOW`] on Windows) |
//! | `VmbChannelSaveEnd` | `ServerChannel::save_end` | planned: `kmcl::server` |
//! | `VmbChannelRestoreFromBuffer` | `ServerChannel::restore_from_buffer` | planned: `kmcl::server` ("more chunks" is an `Ok` variant, [`NtStatus::MORE_PROCESSING_REQUIRED`] on Windows) |
//! | `VmbPacketRestore` | `Packet::restore` | planned: `kmcl::server` |
//! | `VmbConvertVmbusHandleToKernelHandle` | [`Handles::vmb_convert_vmbus_handle_to_kernel_handle`] | **done**: [`handle`] (the calling context is an explicit argument; the kernel handle is closed with [`Handles::close_kernel_handle`]) |
//! | `VmbServerChannelInitSetVmbusHandle` | `ServerChannel::init_set_vmbus_handle(KernelHandle)` | planned: `kmcl::server`; the look-up it needs, [`Handles::resolve_partition`], is **done** |
//! | `VmbServerChannelInitSetFlags` | `ServerChannel::init_set_flags(ServerChannelFlags)` | planned: `kmcl::server` |
//! | `VmbServerChannelInitSetMmioMegabytes` | `ServerChannel::init_set_mmio_megabytes` | planned: `kmcl::server` |
//! | `VmbServerChannelInitSetSaveRestorePacketCallbacks` | `ServerChannel::init_set_save_restore_packet_callbacks` | planned: `kmcl::server` |
//! | `VmbServerChannelInitSetTargetInterfaceId` | `ServerChannel::init_set_target_interface_id` | planned: `kmcl::server` |
//! | `VmbServerChannelInitSetTargetVtl` | `ServerChannel::init_set_target_vtl` | planned: `kmcl::server` |
//!
//! ## Later interface versions (names as `kmcl-api.md` lists them; Windows documents no signatures)
//! | version | Windows | Rust | status |
//! |---|---|---|---|
//! | V2 | `PacketGetClientContext` | [`Kmcl::packet_client_context`] | **done** (the area sized by row 11) |
//! | V2 | `GetTargetDeviceObject` | [`Kmcl::channel_offer`] | **done**, no device objects: the bound offer identifies the device |
//! | V2 | `GetParentDeviceObject` | — | no counterpart: no device objects; the parent is the [`Bus`] the channel was allocated on |
//! | V3 | `InitSetBounceBufferSizes` | `Kmcl::channel_init_set_bounce_buffer_sizes` | planned: `kmcl::channel` (only meaningful in an isolated VM, where the host cannot reach private memory) |
//! | V3 | `AllocateBounceBuffer` | `Kmcl::channel_allocate_bounce_buffer` | planned: `kmcl::channel` (isolated VMs, as above) |
//! | V4 | `InitSetMaximumPacketCount` | [`Kmcl::channel_init_set_maximum_packet_count`] | **done** (bounds the per-channel packet pool) |
//! | V4 | `CreateGpadlFromPfnList` | [`Kmcl::channel_create_gpadl_from_pfn_list`] | **done** (`READ_ONLY` recorded, [`Kmcl::gpadl_is_read_only`]: GPADL_HEADER has no read-only bit, so the host is not told) |
//! | V5 | `InitSetPrimaryChannel` | `Kmcl::channel_init_set_primary_channel` | planned: sub-channels (the client connection has no sub-channel request yet; channels bind to primary offers only) |
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

pub mod api;
pub mod bus;
pub mod channel;
pub mod echo;
pub mod gpadl;
pub mod handle;
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
pub use handle::{
    ContextId, Handle, HandleTable, Handles, KernelHandle, KernelObject, PartitionId, RawHandle, VmbusPartition,
};
pub use packet::{CompletionRoutine, ExternalRange, PacketCompletion, PacketHandle, ProcessPacketFlags, SendFlags};
pub use server::{
    KmclServer, ServerBackend, ServerBus, ServerBusStats, ServerChannelFlags, ServerChannelSettings, ServerTransport,
};
pub use status::{NtStatus, Result, Severity};
