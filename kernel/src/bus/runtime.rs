//! The KMCL bus on the real host: the kernel's ring allocator and the dispatch of VMBus interrupts to the drivers
//! (reference `kmcl-api.md` §Callbacks; issue 6 over issue 5's client core).
//!
//! The VMBus interrupt (SINT 2) only records which relids signalled (`hyperv::synic::take_channel_events`); the
//! kernel's loop calls [`dispatch`] in task context, which hands those relids to
//! [`vmbus::kmcl::Bus::process_interrupt`] and then polls the control protocol.

use super::rings::{HeapRing, RingLease, allocate_channel_rings};
use super::{BusError, BusPages, connect, pages};
use crate::hyperv::synic::take_channel_events;
use crate::hyperv::transport::KernelTransport;
use alloc::vec::Vec;
use vmbus::channel::ChannelRings;
use vmbus::kmcl::{Bus, NtStatus, RingAllocator};

/// Channel rings from the kernel heap ([`super::rings`]).
pub struct KernelRings;

impl RingAllocator for KernelRings {
    type Memory = HeapRing;
    type Lease = RingLease;

    fn allocate(
        &self,
        outgoing_pages: u32,
        incoming_pages: u32,
    ) -> vmbus::kmcl::Result<(ChannelRings<HeapRing>, RingLease)> {
        allocate_channel_rings(outgoing_pages, incoming_pages).map_err(|error| match error {
            super::rings::RingAllocError::TooFewPages => NtStatus::INVALID_PARAMETER,
            _ => NtStatus::INSUFFICIENT_RESOURCES,
        })
    }

    fn release(&self, lease: RingLease, host_released: bool) {
        if host_released {
            drop(lease);
        } else {
            lease.abandon();
        }
    }
}

/// The kernel's KMCL bus on the real host.
pub type KernelBus = Bus<KernelTransport, &'static BusPages, KernelRings>;

/// Connects to the host and makes the KMCL bus over the connection.
pub fn start() -> Result<KernelBus, BusError> {
    let connection = connect()?;
    Ok(Bus::new(connection, pages()?, KernelRings))
}

/// Hands the relids the VMBus interrupt recorded to the bus, then polls control messages and rings. Returns the
/// packets delivered to drivers.
pub fn dispatch(bus: &mut KernelBus) -> u64 {
    let relids: Vec<u32> = take_channel_events().collect();
    let mut delivered = 0;
    if !relids.is_empty() {
        delivered += bus.process_interrupt(&relids);
    }
    delivered + bus.poll()
}
