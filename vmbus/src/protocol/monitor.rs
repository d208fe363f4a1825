//! The monitor page (Monitor Notification Facility) shared with the host for monitored channels.
//!
//! Reference: `hyperv-vmbus.md` §9. The guest allocates two zeroed pages and passes them in INITIATE_CONTACT;
//! page 2 (child → parent) is where the guest raises a monitored channel's pending bit. The page is concurrently
//! read by the host, so the code that touches the live page must use atomic operations at the offsets this struct
//! pins (see [`MonitorBit`]); the struct itself describes the layout and serves copies and tests.

use core::sync::atomic::{AtomicU64, Ordering};
use zerocopy::byteorder::little_endian::{I32, U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Number of trigger groups in a monitor page (§9).
pub const MONITOR_TRIGGER_GROUPS: usize = 4;
/// Monitor ids per trigger group (§9).
pub const MONITORS_PER_GROUP: usize = 32;

/// One trigger group (§9): a pending bit and an armed bit per monitor id in the group.
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct MonitorTriggerGroup {
    /// Bit n set: monitor id `group * 32 + n` has a pending notification.
    pub pending: U32,
    /// Bit n set: monitor id `group * 32 + n` is armed.
    pub armed: U32,
}

/// The host's signalling parameters for one monitor id (§9).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct MonitorParameter {
    /// Connection id the host signals.
    pub connection_id: U32,
    /// Event flag number within that connection.
    pub flag_number: U16,
    /// Reserved.
    pub reserved: U16,
}

/// A whole monitor page (4096 bytes, §9).
#[repr(C)]
#[derive(
    Copy, Clone, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
pub struct MonitorPage {
    /// Trigger state, maintained by the host.
    pub trigger_state: U32,
    /// Reserved.
    pub reserved1: U32,
    /// The four trigger groups.
    pub trigger_group: [MonitorTriggerGroup; MONITOR_TRIGGER_GROUPS],
    /// Reserved.
    pub reserved2: [u8; 24],
    /// Per-monitor next check time.
    pub next_checktime: [[I32; MONITORS_PER_GROUP]; MONITOR_TRIGGER_GROUPS],
    /// Per-monitor notification latency.
    pub latency: [[U16; MONITORS_PER_GROUP]; MONITOR_TRIGGER_GROUPS],
    /// Reserved.
    pub reserved3: [u8; 256],
    /// Per-monitor signalling parameters.
    pub parameter: [[MonitorParameter; MONITORS_PER_GROUP]; MONITOR_TRIGGER_GROUPS],
    /// Reserved, to the end of the page.
    pub reserved4: [u8; 1984],
}

/// Where a monitored channel's pending bit lives in monitor page 2 (§9).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MonitorBit {
    /// Trigger group: `monitor_id / 32`.
    pub group: usize,
    /// Bit within the group's `pending` word: `monitor_id % 32`.
    pub bit: u32,
    /// Byte offset of the group's `pending` u32 inside the page (for an atomic OR on the live page).
    pub pending_offset: usize,
    /// Byte offset of the id's `latency` u16 (100 ns units) inside the page.
    pub latency_offset: usize,
}

impl MonitorBit {
    /// The pending bit of `monitor_id`, or `None` if the id is beyond the 128 a page holds (a host may send any
    /// byte in an offer).
    pub fn for_monitor_id(monitor_id: u8) -> Option<MonitorBit> {
        let id = usize::from(monitor_id);
        let group = id / MONITORS_PER_GROUP;
        if group >= MONITOR_TRIGGER_GROUPS {
            return None;
        }
        let pending_offset = core::mem::offset_of!(MonitorPage, trigger_group)
            + group * size_of::<MonitorTriggerGroup>()
            + core::mem::offset_of!(MonitorTriggerGroup, pending);
        Some(MonitorBit {
            group,
            bit: (id % MONITORS_PER_GROUP) as u32,
            pending_offset,
            latency_offset: core::mem::offset_of!(MonitorPage, latency) + id * size_of::<U16>(),
        })
    }

    /// The mask to OR into the `pending` word.
    pub fn mask(&self) -> u32 {
        1 << self.bit
    }

    /// Writes `latency` into this id's latency field inside `word`, the live page's 8-byte word that holds it
    /// (`latency_offset / 8`), and returns the value it replaces. Atomic with respect to the other fields of the
    /// word, which the host may be updating at the same time.
    pub fn exchange_latency(&self, word: &AtomicU64, latency: u16) -> u16 {
        let shift = (self.latency_offset % 8) * 8;
        let mask = 0xffffu64 << shift;
        let mut previous = word.load(Ordering::Acquire);
        loop {
            let new = (previous & !mask) | (u64::from(latency) << shift);
            match word.compare_exchange_weak(previous, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return ((previous & mask) >> shift) as u16,
                Err(current) => previous = current,
            }
        }
    }
}

impl MonitorPage {
    /// Sets `monitor_id`'s pending bit in this (non-shared) copy; `false` if the id is out of range.
    pub fn set_pending(&mut self, monitor_id: u8) -> bool {
        let Some(location) = MonitorBit::for_monitor_id(monitor_id) else {
            return false;
        };
        let Some(group) = self.trigger_group.get_mut(location.group) else {
            return false;
        };
        group.pending = U32::new(group.pending.get() | location.mask());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};
    use zerocopy::FromZeros;

    #[test]
    fn layout() {
        assert_eq!(size_of::<MonitorPage>(), 4096);
        assert_eq!(size_of::<MonitorTriggerGroup>(), 8);
        assert_eq!(size_of::<MonitorParameter>(), 8);
        assert_eq!(offset_of!(MonitorPage, trigger_state), 0x000);
        assert_eq!(offset_of!(MonitorPage, reserved1), 0x004);
        assert_eq!(offset_of!(MonitorPage, trigger_group), 0x008);
        assert_eq!(offset_of!(MonitorPage, reserved2), 0x028);
        assert_eq!(offset_of!(MonitorPage, next_checktime), 0x040);
        assert_eq!(offset_of!(MonitorPage, latency), 0x240);
        assert_eq!(offset_of!(MonitorPage, reserved3), 0x340);
        assert_eq!(offset_of!(MonitorPage, parameter), 0x440);
        assert_eq!(offset_of!(MonitorPage, reserved4), 0x840);
        assert_eq!(offset_of!(MonitorTriggerGroup, pending), 0);
        assert_eq!(offset_of!(MonitorTriggerGroup, armed), 4);
        assert_eq!(offset_of!(MonitorParameter, connection_id), 0);
        assert_eq!(offset_of!(MonitorParameter, flag_number), 4);
        assert_eq!(offset_of!(MonitorParameter, reserved), 6);
    }

    #[test]
    fn monitor_bits() {
        assert_eq!(
            MonitorBit::for_monitor_id(0),
            Some(MonitorBit {
                group: 0,
                bit: 0,
                pending_offset: 0x08,
                latency_offset: 0x240
            })
        );
        assert_eq!(
            MonitorBit::for_monitor_id(33),
            Some(MonitorBit {
                group: 1,
                bit: 1,
                pending_offset: 0x10,
                latency_offset: 0x240 + 2 * 33
            })
        );
        let last = MonitorBit::for_monitor_id(127).unwrap();
        assert_eq!(
            (last.group, last.bit, last.pending_offset, last.mask()),
            (3, 31, 0x20, 0x8000_0000)
        );
        assert_eq!(MonitorBit::for_monitor_id(128), None);
        assert_eq!(MonitorBit::for_monitor_id(255), None);

        assert_eq!(last.latency_offset, 0x33e);

        let mut page = MonitorPage::new_zeroed();
        assert!(page.set_pending(33));
        assert!(!page.set_pending(200));
        assert_eq!(page.trigger_group[1].pending.get(), 0b10);
        assert_eq!(&page.as_bytes()[0x10..0x14], &[2, 0, 0, 0]);
    }

    #[test]
    fn latency_is_exchanged_in_place_leaving_its_neighbours() {
        // Ids 32..36 share the word at 0x280; id 33's u16 is bytes 2..4 of it.
        let bit = MonitorBit::for_monitor_id(33).unwrap();
        assert_eq!((bit.latency_offset / 8, bit.latency_offset % 8), (0x280 / 8, 2));
        let word = AtomicU64::new(0x1111_2222_3333_4444);
        assert_eq!(bit.exchange_latency(&word, 0xabcd), 0x3333);
        assert_eq!(word.load(Ordering::Relaxed), 0x1111_2222_abcd_4444);
        assert_eq!(bit.exchange_latency(&word, 7), 0xabcd);

        // The same offset in a page copy is the id's `latency` element.
        let mut page = MonitorPage::new_zeroed();
        page.latency[1][1] = U16::new(0xbeef);
        let at = bit.latency_offset;
        assert_eq!(&page.as_bytes()[at..at + 2], &[0xef, 0xbe]);
    }
}
