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
//!
//! # Conventions for the rows still to build
//! - A `VMBCHANNEL` becomes a `Channel` (`kmcl::channel`), a `VMBPACKET` a `Packet` and a `VMBPACKETCOMPLETION` a
//!   `PacketCompletion` (`kmcl::packet`), a GPADL handle a `GpadlHandle` (`kmcl::gpadl`); server-only methods live on
//!   a `ServerChannel` (`kmcl::server`, over `vmbus::server`).
//! - `VmbChannelInitSetX` becomes `Channel::init_set_x`; "set/get pointer" becomes a typed context
//!   (`Arc<dyn Any + Send + Sync>`) instead of a `void *`.
//! - Windows notions without a counterpart: an **MDL** becomes a buffer or a PFN list (GPA-direct ranges); **IRQL**
//!   (DISPATCH vs PASSIVE) becomes interrupt context vs task context; **PnP** device objects become offer matching
//!   (interface type and instance of a channel offer); `DEVICE_OBJECT` parents become the bus connection.
//! - Invalid arguments and calls in the wrong state return the status the Windows page names
//!   ([`NtStatus::INVALID_PARAMETER_1`] for a channel that is invalid or in the wrong state, and so on); nothing
//!   panics.
//!
//! # Mapping of the Windows API
//! Status: **done** (built and covered by tests), **planned: `<where>`** (the intended Rust name and module, to be
//! built), or **no counterpart: …** (what a unikernel driver uses instead).
//!
//! ## Client interface (`KMCL_CLIENT_INTERFACE_V1`, 41 entries in interface order)
//! | # | Windows | Rust | status |
//! |---|---|---|---|
//! | 1 | `VmbChannelAllocate` | `Channel::allocate(connection, ChannelRole)` | planned: `kmcl::channel` (the parent device object is the bus connection) |
//! | 2 | `VmbChannelCleanup` | `Channel::cleanup(self)` | planned: `kmcl::channel` |
//! | 3 | `VmbChannelCreateGpadlFromBuffer` | `Channel::create_gpadl_from_buffer` | planned: `kmcl::gpadl` |
//! | 4 | `VmbChannelCreateGpadlFromMdl` | `Channel::create_gpadl_from_pfn_list` | no counterpart: no MDLs; a PFN list with offset and length describes the same memory (row V4 below) |
//! | 5 | `VmbChannelDeleteGpadl` | `Channel::delete_gpadl` | planned: `kmcl::gpadl` |
//! | 6 | `VmbChannelDisable` | `Channel::disable` | planned: `kmcl::channel` |
//! | 7 | `VmbChannelEnable` | `Channel::enable` | planned: `kmcl::channel` |
//! | 8 | `VmbChannelGetInterfaceInstance` | `Channel::interface_instance` | planned: `kmcl::channel` |
//! | 9 | `VmbChannelGetMmioSpace` | `Channel::mmio_space` | planned: `kmcl::channel` |
//! | 10 | `VmbChannelGetPointer` | `Channel::pointer` | planned: `kmcl::channel` (typed context, not `void *`) |
//! | 11 | `VmbChannelInitSetClientContextSize` | `Channel::init_set_client_context_size` | planned: `kmcl::channel` |
//! | 12 | `VmbChannelInitSetFlags` | `Channel::init_set_flags(ChannelInitFlags)` | planned: `kmcl::channel` (`IS_PIPE`) |
//! | 13 | `VmbChannelInitSetFriendlyName` | `Channel::init_set_friendly_name` | planned: `kmcl::channel` |
//! | 14 | `VmbChannelInitSetMaximumExternalData` | `Channel::init_set_maximum_external_data` | planned: `kmcl::channel` |
//! | 15 | `VmbChannelInitSetMaximumPacketSize` | `Channel::init_set_maximum_packet_size` | planned: `kmcl::channel` |
//! | 16 | `VmbChannelInitSetProcessPacketCallbacks` | `Channel::init_set_process_packet_callbacks` | planned: `kmcl::channel` |
//! | 17 | `VmbChannelInitSetStateChangeCallbacks` | `Channel::init_set_state_change_callbacks` | planned: `kmcl::channel` (the version/size check becomes a `StateChangeCallbacks` value with a version field) |
//! | 18 | `VmbChannelPacketComplete` | `PacketCompletion::complete` | planned: `kmcl::packet` |
//! | 19 | `VmbChannelPacketDeferToPassive` | `PacketCompletion::defer_to_task` | planned: `kmcl::packet` (PASSIVE_LEVEL becomes task context) |
//! | 20 | `VmbChannelPacketFail` | `PacketCompletion::fail` | planned: `kmcl::packet` |
//! | 21 | `VmbChannelPacketGetExternalData` | `PacketCompletion::external_data` | planned: `kmcl::packet` (a PFN list instead of an MDL; pending is an `Ok` variant) |
//! | 22 | `VmbChannelPause` | `Channel::pause` | planned: `kmcl::channel` |
//! | 23 | `VmbChannelSendSynchronousRequest` | `Channel::send_synchronous_request` | planned: `kmcl::packet` |
//! | 24 | `VmbChannelSetIncomingProcessingAtPassive` | `Channel::set_incoming_processing_in_task` | planned: `kmcl::channel` (IRQL becomes interrupt vs task context) |
//! | 25 | `VmbChannelSetInterruptLatency` | `Channel::set_interrupt_latency` | planned: `kmcl::channel` |
//! | 26 | `VmbChannelSetPointer` | `Channel::set_pointer` | planned: `kmcl::channel` |
//! | 27 | `VmbChannelSetTransactionQuota` | `Channel::set_transaction_quota` | planned: `kmcl::channel` |
//! | 28 | `VmbChannelSizeofPacket` | `Channel::sizeof_packet` | planned: `kmcl::packet` |
//! | 29 | `VmbChannelStart` | `Channel::start` | planned: `kmcl::channel` |
//! | 30 | `VmbClientChannelInitSetRingBufferPageCount` | `Channel::init_set_ring_buffer_page_count` | planned: `kmcl::channel` |
//! | 31 | `VmbClientChannelInitSetTargetPnp` | `Channel::init_set_target` | planned: `kmcl::channel` (PnP becomes offer matching by interface type and instance) |
//! | 32 | `VmbPacketAllocate` | `Packet::allocate` | planned: `kmcl::packet` (per-channel pool) |
//! | 33 | `VmbPacketFree` | `Packet::free` | planned: `kmcl::packet` |
//! | 34 | `VmbPacketGetChannel` | `Packet::channel` | planned: `kmcl::packet` |
//! | 35 | `VmbPacketGetPointer` | `Packet::pointer` | planned: `kmcl::packet` |
//! | 36 | `VmbPacketInitialize` | `Packet::initialize` | planned: `kmcl::packet` (caller's memory; [`NtStatus::INVALID_PARAMETER_3`] when too small) |
//! | 37 | `VmbPacketSend` | `Packet::send` | planned: `kmcl::packet` |
//! | 38 | `VmbPacketSendWithExternalMdl` | `Packet::send_with_external_pfns` | no counterpart: no MDLs; row 39 sends the same data from a PFN list |
//! | 39 | `VmbPacketSendWithExternalPfns` | `Packet::send_with_external_pfns` | planned: `kmcl::packet` |
//! | 40 | `VmbPacketSetCompletionRoutine` | `Packet::set_completion_routine` | planned: `kmcl::packet` |
//! | 41 | `VmbPacketSetPointer` | `Packet::set_pointer` | planned: `kmcl::packet` |
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
//! | V2 | `PacketGetClientContext` | `PacketCompletion::client_context` | planned: `kmcl::packet` (the area sized by row 11) |
//! | V2 | `GetTargetDeviceObject` | — | no counterpart: no device objects; the channel's offer (`Channel::offer`, planned) identifies the device |
//! | V2 | `GetParentDeviceObject` | — | no counterpart: no device objects; the parent is the bus connection the channel was allocated on |
//! | V3 | `InitSetBounceBufferSizes` | `Channel::init_set_bounce_buffer_sizes` | planned: `kmcl::channel` (only meaningful in an isolated VM, where the host cannot reach private memory) |
//! | V3 | `AllocateBounceBuffer` | `Channel::allocate_bounce_buffer` | planned: `kmcl::channel` (isolated VMs, as above) |
//! | V4 | `InitSetMaximumPacketCount` | `Channel::init_set_maximum_packet_count` | planned: `kmcl::packet` (bounds the per-channel packet pool) |
//! | V4 | `CreateGpadlFromPfnList` | `Channel::create_gpadl_from_pfn_list` | planned: `kmcl::gpadl` (read-only flag) |
//! | V5 | `InitSetPrimaryChannel` | `Channel::init_set_primary_channel` | planned: `kmcl::channel` (sub-channels) |
//! | V5 | `ChannelInitialize` | — | no counterpart: a channel in caller-supplied memory; in Rust the caller stores the `Channel` value where it wants, so `Channel::allocate` covers it |
//! | V5 | `SetAllowableDpcCpuUsage` | — | no counterpart: no DPCs and no DPC watchdog; the channel layer bounds each interrupt-context batch itself |
//! | V5 | `ClientChannelInitSetTargetProcessorIndex` | `Channel::init_set_target_vp` | planned: `kmcl::channel` (the VP that takes the channel's interrupts) |
//! | V5 | `SizeofChannel` | — | no counterpart: pairs with `ChannelInitialize`; `core::mem::size_of` answers it |
//! | V5 | `InitSetInlinePacketContextSize` | `Channel::init_set_inline_packet_context_size` | planned: `kmcl::packet` |
//! | V5 | `PacketGetInlinePacketContextPointer` | `Packet::inline_context` | planned: `kmcl::packet` |
//! | V5 | `InitSetProcessPacketCallbacksEx` | `Channel::init_set_process_packet_callbacks` | planned: `kmcl::channel` (the extended parameters are part of the one callback trait) |
//! | V5 | `PacketSetCompletionRoutineEx` | `Packet::set_completion_routine` | planned: `kmcl::packet` (a closure carries the extra context) |
//!
//! ## Types and statuses
//! | Windows | Rust | status |
//! |---|---|---|
//! | `NTSTATUS`, `NT_SUCCESS`, `STATUS_*` | [`NtStatus`], [`NtStatus::is_success`], the `NtStatus` constants | **done**: [`status`] |
//! | `HANDLE` (user mode, per process) | [`Handle<T>`], [`RawHandle`]; the process is a [`ContextId`] | **done**: [`handle`] |
//! | `HANDLE` (kernel) | [`KernelHandle`] | **done**: [`handle`] |

pub mod api;
pub mod bus;
pub mod channel;
pub mod echo;
pub mod gpadl;
pub mod handle;
pub mod packet;
mod slots;
pub mod status;

#[cfg(test)]
mod tests;

pub use handle::{
    ContextId, Handle, HandleTable, Handles, KernelHandle, KernelObject, PartitionId, RawHandle,
    VmbusPartition,
};
pub use api::Kmcl;
pub use bus::{Bus, BusStats, RingAllocator};
pub use channel::{ChannelCallbacks, ChannelHandle, ChannelInitFlags, ChannelSettings, ChannelState, Context, TargetInterface};
pub use gpadl::{GpadlFlags, GpadlHandle, PhysicalBuffer};
pub use packet::{CompletionRoutine, ExternalRange, PacketCompletion, PacketHandle, ProcessPacketFlags, SendFlags};
pub use status::{NtStatus, Result, Severity};
