//! KMCL channels (`VMBCHANNEL`): the handle, the client lifecycle states, the `VmbChannelInitSet*` settings and the
//! callbacks a driver implements.
//!
//! Implements `kmcl-api.md` §Client interface rows 1–17, 22, 24–31 (the channel half; the functions themselves are
//! methods of [`super::Kmcl`]), §Callbacks and §Lifecycle.

use super::Kmcl;
use super::packet::{PacketCompletion, ProcessPacketFlags};
use super::status::{NtStatus, Result};
use crate::protocol::Guid;
use alloc::string::String;
use alloc::sync::Arc;
use core::any::Any;
use core::fmt;

/// The typed replacement of the `void *` context of `VmbChannelSetPointer`/`VmbPacketSetPointer`.
pub type Context = Arc<dyn Any + Send + Sync>;

/// A KMCL channel (`VMBCHANNEL`): names a channel of one [`super::Bus`] and the generation of its slot, so a handle
/// kept after `channel_cleanup` is rejected with [`NtStatus::INVALID_PARAMETER_1`] instead of reaching a newer
/// channel.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelHandle {
    pub(crate) index: u32,
    pub(crate) generation: u32,
}

impl ChannelHandle {
    /// The handle as two numbers (slot, generation), as it crosses a boundary (a log, a C caller).
    pub const fn to_raw(self) -> (u32, u32) {
        (self.index, self.generation)
    }

    /// A handle from two numbers; whether it names a live channel is checked by every function that takes it.
    pub const fn from_raw(index: u32, generation: u32) -> ChannelHandle {
        ChannelHandle { index, generation }
    }
}

impl fmt::Debug for ChannelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Channel({}#{})", self.index, self.generation)
    }
}

/// Where a client channel stands (`kmcl-api.md` §Lifecycle, client states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelState {
    /// Allocated or disabled: the `InitSet*` functions work only here; `channel_enable` leaves it.
    Disabled,
    /// Enabled, waiting for a matching offer (the unikernel's "PnP arrival").
    Enabled,
    /// The VMBus channel is open and the Opened callback is running; no packets flow yet.
    Opened,
    /// Started: the incoming queue runs and packets flow both ways.
    Active,
    /// Paused by `channel_pause`: the Suspend callback ran, no ProcessPacket until `channel_start`.
    Paused,
    /// Closed by the other end (rescind) or by a failed open: no traffic, no rings. It counts as disabled
    /// (`kmcl-api.md`: "on the guest a closed channel becomes Disabled and must be re-enabled"): `InitSet*`,
    /// `channel_enable` and `channel_cleanup` work; `channel_disable` makes it [`ChannelState::Disabled`].
    Closed,
}

/// `VMBUS_CHANNEL_INIT_FLAG_*` for `VmbChannelInitSetFlags` (row 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ChannelInitFlags(pub u32);

impl ChannelInitFlags {
    /// No flags.
    pub const NONE: ChannelInitFlags = ChannelInitFlags(0);
    /// `VMBUS_CHANNEL_INIT_FLAG_IS_PIPE` (0x1): the channel is a pipe; only an offer in named-pipe mode
    /// (`OfferFlags::NAMED_PIPE_MODE`) matches it.
    pub const IS_PIPE: ChannelInitFlags = ChannelInitFlags(0x1);
    /// Every flag this layer knows; any other bit is [`NtStatus::INVALID_PARAMETER_2`].
    pub const ALL: ChannelInitFlags = ChannelInitFlags(0x1);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: ChannelInitFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// The offer a client channel binds to (`VmbClientChannelInitSetTargetPnp`, row 31): PnP becomes offer matching.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetInterface {
    /// The device class (`if_type` of the offer).
    pub interface_type: Guid,
    /// The instance; `None` matches any instance (Windows: a NULL `InterfaceInstance`).
    pub interface_instance: Option<Guid>,
}

impl TargetInterface {
    /// Whether an offer of this type and instance matches.
    pub fn matches(&self, interface_type: &Guid, interface_instance: &Guid) -> bool {
        self.interface_type == *interface_type && self.interface_instance.is_none_or(|i| i == *interface_instance)
    }
}

/// Largest `VmbChannelInitSetMaximumPacketSize` accepted: a packet's length is a `u16` count of 8-byte units (§6),
/// less the descriptor and a GPA-direct header of [`MAX_EXTERNAL_CHAIN_LENGTH`] ranges.
pub const MAX_PACKET_SIZE_LIMIT: u32 = 256 * 1024 - 4096;

/// Default maximum packet size (bytes of payload one packet carries) when the driver sets none.
pub const DEFAULT_MAXIMUM_PACKET_SIZE: u32 = 4096;

/// Default number of packets `packet_allocate` hands out at once per channel (V4 `InitSetMaximumPacketCount`).
pub const DEFAULT_MAXIMUM_PACKET_COUNT: u32 = 64;

/// Largest external-data chain length (number of PFNs an external buffer may span) accepted.
pub const MAX_EXTERNAL_CHAIN_LENGTH: u32 = 256;

/// Most pages one ring may have (control page included) through `VmbClientChannelInitSetRingBufferPageCount`.
pub const MAX_RING_PAGES: u32 = 4096;

/// Largest client context area per incoming packet (`VmbChannelInitSetClientContextSize`).
pub const MAX_CLIENT_CONTEXT_SIZE: u32 = 64 * 1024;

/// The settings of the `InitSet*` family, fixed when the channel is enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelSettings {
    /// Largest payload of one packet, either direction (row 15).
    pub maximum_packet_size: u32,
    /// Largest external buffer in bytes and its chain length in pages (row 14); `(0, 0)` = no external data.
    pub maximum_external_data: (u32, u32),
    /// Bytes of per-incoming-packet client context (row 11).
    pub client_context_size: u32,
    /// Channel flags (row 12).
    pub flags: ChannelInitFlags,
    /// A name for logs (row 13).
    pub friendly_name: String,
    /// Pages of the incoming and outgoing rings, control page included (row 30); `None` = sized from the packet
    /// sizes.
    pub ring_pages: Option<(u32, u32)>,
    /// The offer to bind to (row 31).
    pub target: Option<TargetInterface>,
    /// Most packets `packet_allocate` hands out at once (V4 row).
    pub maximum_packet_count: u32,
    /// Most incoming packets delivered and not yet completed (row 27); 0 = no limit.
    pub transaction_quota: u32,
    /// The VP (its VP_INDEX) the host interrupts for this channel, sent in OPENCHANNEL (V5
    /// `ClientChannelInitSetTargetProcessorIndex`).
    pub target_vp: u32,
    /// Bytes of inline context in every outgoing packet object (V5 `InitSetInlinePacketContextSize`).
    pub inline_packet_context_size: u32,
    /// The primary channel this one is a sub-channel of (V5 `InitSetPrimaryChannel`): it binds to a sub-channel
    /// offer (`sub_channel_index` > 0) of the primary's interface type and instance instead of to `target`.
    pub primary: Option<ChannelHandle>,
}

impl Default for ChannelSettings {
    fn default() -> ChannelSettings {
        ChannelSettings {
            maximum_packet_size: DEFAULT_MAXIMUM_PACKET_SIZE,
            maximum_external_data: (0, 0),
            client_context_size: 0,
            flags: ChannelInitFlags::NONE,
            friendly_name: String::new(),
            ring_pages: None,
            target: None,
            maximum_packet_count: DEFAULT_MAXIMUM_PACKET_COUNT,
            transaction_quota: 0,
            target_vp: 0,
            inline_packet_context_size: 0,
            primary: None,
        }
    }
}

impl ChannelSettings {
    /// Pages for (outgoing, incoming) ring: the driver's choice, else a control page plus enough data pages for four
    /// packets of the maximum size with their largest GPA-direct header (at least 4 data pages).
    pub fn ring_page_counts(&self) -> (u32, u32) {
        if let Some((incoming, outgoing)) = self.ring_pages {
            return (outgoing, incoming);
        }
        let external_header = 8 + 16 + 8 * u64::from(self.maximum_external_data.1);
        let packet = 16 + external_header + u64::from(self.maximum_packet_size) + 8;
        let data_pages = (4 * packet).div_ceil(4096).max(4) as u32;
        (data_pages + 1, data_pages + 1)
    }
}

/// The callbacks of a KMCL channel, implemented by the driver (`kmcl-api.md` §Callbacks): the state-change callbacks
/// of `VmbChannelInitSetStateChangeCallbacks` and the packet callbacks of `VmbChannelInitSetProcessPacketCallbacks`,
/// set together by [`Kmcl::channel_init_set_callbacks`].
///
/// Order (§Lifecycle): `opened` → `started` → (the incoming queue runs) → `post_started` → `process_packet`* /
/// `processing_complete`* → `suspend` → `closed`. Every callback gets the [`Kmcl`] it runs under, so it can send,
/// complete packets and make synchronous requests. While a callback of a channel runs, packets arriving for that
/// channel (for instance while a synchronous request waits) are queued and delivered after it returns.
pub trait ChannelCallbacks: Send {
    /// EvtChannelOpened: the VMBus channel is open. An error rolls back: the channel is closed again, no traffic
    /// flows, and it ends in [`ChannelState::Closed`].
    fn opened(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) -> Result<()> {
        let _ = (kmcl, channel);
        Ok(())
    }

    /// EvtChannelStarted: packets may be queued for sending; do not wait for incoming packets here.
    fn started(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        let _ = (kmcl, channel);
    }

    /// EvtChannelPostStarted: the incoming queue runs; the place for synchronous requests (protocol negotiation).
    fn post_started(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        let _ = (kmcl, channel);
    }

    /// EvtChannelSuspend: no more `process_packet` calls; complete every packet still outstanding.
    fn suspend(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        let _ = (kmcl, channel);
    }

    /// EvtChannelClosed: the channel is closing; delete every GPADL created on it here.
    fn closed(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        let _ = (kmcl, channel);
    }

    /// EvtChannelPnpFailure: a matching offer was found but the channel could not be opened (`status` says why).
    fn pnp_failure(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle, status: NtStatus) {
        let _ = (kmcl, channel, status);
    }

    /// EvtChannelProcessPacket: one incoming packet; `buffer` is its payload without VMBus headers. The packet must
    /// eventually be completed ([`Kmcl::packet_complete`] or [`Kmcl::packet_fail`]), now or later.
    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        flags: ProcessPacketFlags,
    );

    /// EvtChannelProcessingComplete: the incoming ring went from non-empty to empty after `packets_processed`
    /// packets.
    fn processing_complete(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle, packets_processed: u32) {
        let _ = (kmcl, channel, packets_processed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::device_class;

    #[test]
    fn target_matching_by_type_and_optional_instance() {
        let instance = Guid::from_fields(1, 2, 3, [4; 8]);
        let other = Guid::from_fields(9, 2, 3, [4; 8]);
        let any = TargetInterface { interface_type: device_class::HEARTBEAT, interface_instance: None };
        assert!(any.matches(&device_class::HEARTBEAT, &other));
        assert!(!any.matches(&device_class::KVP, &instance));
        let exact = TargetInterface { interface_instance: Some(instance), ..any };
        assert!(exact.matches(&device_class::HEARTBEAT, &instance));
        assert!(!exact.matches(&device_class::HEARTBEAT, &other));
    }

    #[test]
    fn default_rings_hold_four_maximum_packets() {
        let settings = ChannelSettings::default();
        assert_eq!(settings.ring_page_counts(), (6, 6));
        let big = ChannelSettings { maximum_packet_size: 64 * 1024, ..ChannelSettings::default() };
        let (outgoing, incoming) = big.ring_page_counts();
        assert!(u64::from(outgoing - 1) * 4096 >= 4 * (64 * 1024 + 56));
        assert_eq!(outgoing, incoming);
        let chosen = ChannelSettings { ring_pages: Some((3, 9)), ..ChannelSettings::default() };
        assert_eq!(chosen.ring_page_counts(), (9, 3), "(outgoing, incoming) from (incoming, outgoing)");
    }
}
