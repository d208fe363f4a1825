//! What the server knows about each channel it offers and each GPADL the guest described (§5, §6).

use alloc::vec::Vec;

use crate::protocol::gpadl::GPADL_PAGE_SIZE;
use crate::protocol::{AssembledGpadl, Guid, OfferFlags, USER_DEFINED_SIZE};

/// Highest relid the server hands out: a relid is the channel's bit in SINT 2's 2048 event flags (§4), and bit 0
/// is reserved, so relids run from 1 to 2047.
pub const MAX_RELID: u32 = 2047;

/// Monitor ids available for monitored channels: the monitor page has 4 trigger groups of 32 (§9).
pub const MONITOR_ID_COUNT: u8 = 128;

/// A channel to offer: the OFFERCHANNEL contents the host chooses (§5). The relid, connection id and monitor id
/// are assigned by [`super::Server::offer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OfferSpec {
    /// The device class (§8).
    pub interface_type: Guid,
    /// This device's instance.
    pub interface_instance: Guid,
    /// Offer flags (§5 "Offer flags").
    pub flags: OfferFlags,
    /// MMIO space the device needs, in MiB.
    pub mmio_megabytes: u16,
    /// Device-defined data (for named pipes, the pipe mode first).
    pub user_defined: [u8; USER_DEFINED_SIZE],
    /// 0 for a primary channel, else the sub-channel index.
    pub sub_channel_index: u16,
    /// Allocate a monitor id, so the guest signals through the monitor page (§9).
    pub monitored: bool,
    /// Mark the offer as having a dedicated interrupt.
    pub dedicated_interrupt: bool,
    /// Hold a valid OPENCHANNEL for the channel's owner to accept or refuse with
    /// [`super::Server::complete_open`], instead of accepting it at once.
    pub confirm_opens: bool,
}

impl OfferSpec {
    /// A plain offer: no flags, no MMIO, zero user data, primary channel, signalled through event flags, opens
    /// accepted at once.
    pub fn new(interface_type: Guid, interface_instance: Guid) -> OfferSpec {
        OfferSpec {
            interface_type,
            interface_instance,
            flags: OfferFlags::empty(),
            mmio_megabytes: 0,
            user_defined: [0; USER_DEFINED_SIZE],
            sub_channel_index: 0,
            monitored: false,
            dedicated_interrupt: false,
            confirm_opens: false,
        }
    }
}

/// Where a channel stands in its open/close cycle, as the server sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelStatus {
    /// Not open.
    Closed,
    /// A valid OPENCHANNEL waits for its owner's decision ([`OfferSpec::confirm_opens`]).
    Opening,
    /// Open: OPENCHANNEL_RESULT with status 0 was sent.
    Open,
}

/// A snapshot of one offered channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelSummary {
    /// The relid.
    pub relid: u32,
    /// The connection id in its offer (guest → host signals).
    pub connection_id: u32,
    /// Its monitor id, if monitored.
    pub monitor_id: Option<u8>,
    /// Whether OFFERCHANNEL was sent on the current connection.
    pub offered_to_guest: bool,
    /// Whether the host rescinded it (the relid stays taken until the guest's RELID_RELEASED).
    pub rescinded: bool,
    /// The open state.
    pub status: ChannelStatus,
}

/// What OPENCHANNEL established, for whoever maps the rings: the ring GPADL's pages and how they split (§6).
///
/// The guest → host ring (the guest's outgoing ring) is the first `downstream_page_offset` pages, header page
/// first; the host → guest ring is the rest. The server has checked that both have at least the configured
/// minimum of pages, and that the GPADL is one range of whole pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenChannelInfo {
    /// The channel.
    pub relid: u32,
    /// The guest's open id (echoed in OPENCHANNEL_RESULT).
    pub open_id: u32,
    /// The ring GPADL's handle.
    pub ring_gpadl: u32,
    /// The VP the guest wants this channel's interrupts on (updated by MODIFYCHANNEL).
    pub target_vp: u32,
    /// Pages of the guest → host ring, its header page included.
    pub downstream_page_offset: u32,
    /// The 120 bytes of open data.
    pub user_data: [u8; USER_DEFINED_SIZE],
    /// Every page of the ring GPADL, in order.
    pub ring_pfns: Vec<u64>,
}

impl OpenChannelInfo {
    /// The pages of the ring the guest writes and the host reads (header page first).
    pub fn guest_to_host_ring_pfns(&self) -> &[u64] {
        let split = usize::try_from(self.downstream_page_offset).unwrap_or(usize::MAX);
        self.ring_pfns.get(..split).unwrap_or(&[])
    }

    /// The pages of the ring the host writes and the guest reads (header page first).
    pub fn host_to_guest_ring_pfns(&self) -> &[u64] {
        let split = usize::try_from(self.downstream_page_offset).unwrap_or(usize::MAX);
        self.ring_pfns.get(split..).unwrap_or(&[])
    }
}

/// A GPADL the server accepted (GPADL_CREATED with status 0 was sent).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerGpadl {
    /// The description as the guest sent it.
    pub gpadl: AssembledGpadl,
    /// GPADL_TEARDOWN arrived while the GPADL was an open channel's ring; GPADL_TORNDOWN follows the close.
    pub teardown_pending: bool,
}

impl ServerGpadl {
    /// The channel it was created for.
    pub fn relid(&self) -> u32 {
        self.gpadl.child_relid
    }

    /// Its pages, when it is a single range of whole pages starting at offset 0 (the form rings need).
    pub fn whole_pages(&self) -> Option<&[u64]> {
        let [range] = self.gpadl.ranges.as_slice() else {
            return None;
        };
        let bytes = (range.pfns.len() as u64).checked_mul(GPADL_PAGE_SIZE)?;
        (range.byte_offset == 0 && u64::from(range.byte_count) == bytes).then_some(range.pfns.as_slice())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::GpadlRange;

    fn gpadl(ranges: Vec<GpadlRange>) -> ServerGpadl {
        ServerGpadl { gpadl: AssembledGpadl { child_relid: 3, gpadl: 9, ranges }, teardown_pending: false }
    }

    #[test]
    fn ring_split() {
        let info = OpenChannelInfo {
            relid: 1,
            open_id: 1,
            ring_gpadl: 2,
            target_vp: 0,
            downstream_page_offset: 3,
            user_data: [0; USER_DEFINED_SIZE],
            ring_pfns: alloc::vec![10, 11, 12, 20, 21],
        };
        assert_eq!(info.guest_to_host_ring_pfns(), [10, 11, 12]);
        assert_eq!(info.host_to_guest_ring_pfns(), [20, 21]);
        let odd = OpenChannelInfo { downstream_page_offset: 9, ..info };
        assert_eq!(odd.guest_to_host_ring_pfns(), [] as [u64; 0], "no panic on an inconsistent value");
        assert_eq!(odd.host_to_guest_ring_pfns(), [] as [u64; 0]);
    }

    #[test]
    fn whole_pages_only_for_one_page_aligned_range() {
        let whole = gpadl(alloc::vec![GpadlRange { byte_offset: 0, byte_count: 8192, pfns: alloc::vec![5, 6] }]);
        assert_eq!(whole.whole_pages(), Some(&[5u64, 6][..]));
        assert_eq!(whole.relid(), 3);
        let offset = gpadl(alloc::vec![GpadlRange { byte_offset: 8, byte_count: 4000, pfns: alloc::vec![5] }]);
        assert_eq!(offset.whole_pages(), None);
        let partial = gpadl(alloc::vec![GpadlRange { byte_offset: 0, byte_count: 4097, pfns: alloc::vec![5, 6] }]);
        assert_eq!(partial.whole_pages(), None);
        let two = gpadl(alloc::vec![
            GpadlRange { byte_offset: 0, byte_count: 4096, pfns: alloc::vec![5] },
            GpadlRange { byte_offset: 0, byte_count: 4096, pfns: alloc::vec![6] },
        ]);
        assert_eq!(two.whole_pages(), None);
    }
}
