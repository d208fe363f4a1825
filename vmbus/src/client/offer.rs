//! A channel offer as the client keeps it: a validated copy of OFFERCHANNEL (§5).

use crate::protocol::{Guid, OfferChannel, OfferFlags, USER_DEFINED_SIZE, class_name};
use core::fmt;

/// Highest relid the client accepts: relids index the 2048 event-flag bits of SINT 2 (§4), and bit 0 is reserved.
pub const MAX_RELID: u32 = 2047;

/// A channel the host offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Offer {
    /// The device class (`if_type`).
    pub interface_type: Guid,
    /// This device's instance.
    pub interface_instance: Guid,
    /// The channel's relid.
    pub child_relid: u32,
    /// The connection id to signal the host on for this channel.
    pub connection_id: u32,
    /// Offer flags.
    pub flags: OfferFlags,
    /// MMIO space the device wants, in MiB.
    pub mmio_megabytes: u16,
    /// Device-defined data (120 bytes).
    pub user_defined: [u8; USER_DEFINED_SIZE],
    /// 0 for a primary channel.
    pub sub_channel_index: u16,
    /// The monitor id, if the host monitors this channel (guest → host signals through the monitor page).
    pub monitor_id: Option<u8>,
    /// Whether the channel has a dedicated interrupt (no bit in the shared interrupt page).
    pub dedicated_interrupt: bool,
}

/// Why an offer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfferError {
    /// Relid 0 or above [`MAX_RELID`].
    RelidOutOfRange(u32),
    /// A monitor id at or above 128 (the monitor page has 4 groups of 32).
    MonitorIdOutOfRange(u8),
}

impl Offer {
    /// Validates and copies an OFFERCHANNEL message.
    pub fn from_wire(wire: &OfferChannel) -> Result<Offer, OfferError> {
        let relid = wire.child_relid.get();
        if relid == 0 || relid > MAX_RELID {
            return Err(OfferError::RelidOutOfRange(relid));
        }
        let monitor_id = if wire.monitor_allocated() {
            if wire.monitor_id >= 128 {
                return Err(OfferError::MonitorIdOutOfRange(wire.monitor_id));
            }
            Some(wire.monitor_id)
        } else {
            None
        };
        Ok(Offer {
            interface_type: wire.interface_type,
            interface_instance: wire.interface_instance,
            child_relid: relid,
            connection_id: wire.connection_id.get(),
            flags: wire.flags(),
            mmio_megabytes: wire.mmio_megabytes.get(),
            user_defined: wire.user_defined,
            sub_channel_index: wire.sub_channel_index.get(),
            monitor_id,
            dedicated_interrupt: wire.is_dedicated_interrupt(),
        })
    }

    /// The device class's name from the GUID table (§8), if known.
    pub fn class_name(&self) -> Option<&'static str> {
        class_name(&self.interface_type)
    }
}

impl fmt::Display for Offer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "relid {:>3} {:<16} {} flags {:#06x} {}",
            self.child_relid,
            self.class_name().unwrap_or("(unknown class)"),
            self.interface_instance,
            self.flags.bits(),
            match (self.monitor_id, self.dedicated_interrupt) {
                (Some(id), _) => alloc::format!("monitored (id {id})"),
                (None, true) => alloc::string::String::from("dedicated interrupt"),
                (None, false) => alloc::string::String::from("event flags"),
            }
        )
    }
}
