//! The server's end of an open channel: the rings in the host's orientation, over guest memory.
//!
//! Reference: `hyperv-vmbus.md` §6 (ring layout, the ring GPADL's split at the downstream offset, packet types,
//! signalling rules), §4 (host → guest signals set the relid's bit in SINT 2's event flags, VMBus ≥ 2.4); issue 7 §2.
//!
//! OPENCHANNEL names one GPADL over both rings: the first `downstream_page_offset` pages are the ring the guest
//! writes, the rest the ring the guest reads. [`ServerEndpoint::new`] maps both through [`GuestMemory`] from the
//! [`OpenChannelInfo`] the server accepted and takes the other side of each: a [`RingReader`] on the guest → host
//! ring, a [`RingWriter`] on the host → guest ring. Everything in those pages comes from the guest and is checked by
//! the ring code; a lying guest gets an [`EndpointError`], never a panic.
//!
//! The ring decides *whether* to signal the guest; [`GuestSignal`] is *how* (the relid's event flag). Once the
//! server has processed CLOSECHANNEL (or the host rescinded the channel), whoever owns the endpoint marks it closed
//! through its [`EndpointCloser`] and every later call fails with [`EndpointError::Closed`]: the guest may reuse the
//! pages after that.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, Ordering};

use super::channel::OpenChannelInfo;
use crate::hv::hypercall::HvError;
use crate::memory::{GuestMemory, MemoryError};
use crate::ring::{
    DrainEnd, IncomingPacket, OutgoingPacket, ReadOutcome, RingError, RingReader, RingWriter, SpaceRequest,
    WriteOutcome,
};

/// How the host tells the guest that a channel's ring changed (§4): set bit `relid` of the guest's SINT 2 event
/// flags and raise the SINT 2 interrupt if the bit was clear.
pub trait GuestSignal {
    /// Signals channel `relid`.
    fn signal_guest(&self, relid: u32) -> Result<(), HvError>;
}

impl<T: GuestSignal + ?Sized> GuestSignal for &T {
    fn signal_guest(&self, relid: u32) -> Result<(), HvError> {
        (**self).signal_guest(relid)
    }
}

/// Why an endpoint operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointError {
    /// The ring pages could not be mapped (outside guest memory, not contiguous, too few).
    Memory(MemoryError),
    /// The two rings share page `pfn`.
    OverlappingRings {
        /// A page named twice in the ring GPADL.
        pfn: u64,
    },
    /// A ring operation failed; `Invalid*`/`Truncated` mean the guest broke the ring and the channel should be
    /// closed.
    Ring(RingError),
    /// Signalling the guest failed.
    Signal(HvError),
    /// The channel was closed (CLOSECHANNEL, rescind, UNLOAD or reconnect).
    Closed,
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory(e) => write!(f, "ring pages: {e}"),
            Self::OverlappingRings { pfn } => write!(f, "page {pfn:#x} is in both rings"),
            Self::Ring(e) => write!(f, "ring: {e}"),
            Self::Signal(e) => write!(f, "signalling the guest failed: {e:?}"),
            Self::Closed => write!(f, "the channel is closed"),
        }
    }
}

impl core::error::Error for EndpointError {}

impl From<RingError> for EndpointError {
    fn from(e: RingError) -> Self {
        EndpointError::Ring(e)
    }
}

impl From<MemoryError> for EndpointError {
    fn from(e: MemoryError) -> Self {
        EndpointError::Memory(e)
    }
}

/// Marks an endpoint closed from outside (the owner of the [`super::Server`] when it processes CLOSECHANNEL or a
/// rescind). Cheap to clone; shared with the endpoint.
#[derive(Clone, Debug, Default)]
pub struct EndpointCloser(Arc<AtomicBool>);

impl EndpointCloser {
    /// Closes the endpoint: its later calls fail with [`EndpointError::Closed`].
    pub fn close(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether the endpoint was closed.
    pub fn is_closed(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// What [`ServerEndpoint::receive`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Packets handed to the handler.
    pub packets: usize,
    /// Whether the guest was signalled because space it waited for became free (`pending_send_sz`, §6).
    pub signalled: bool,
}

/// Counters of an endpoint's traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    /// Packets written to the host → guest ring.
    pub sent: u64,
    /// Packets read from the guest → host ring.
    pub received: u64,
    /// Signals to the guest after writes (empty → non-empty with interrupts unmasked).
    pub write_signals: u64,
    /// Signals to the guest after reads (free space crossed its `pending_send_sz`).
    pub read_signals: u64,
}

/// The server's end of an open channel (see the module documentation).
pub struct ServerEndpoint<G: GuestMemory> {
    relid: u32,
    open_id: u32,
    ring_gpadl: u32,
    memory: G,
    /// The ring the guest writes.
    reader: RingReader<G::Ring>,
    /// The ring the guest reads.
    writer: RingWriter<G::Ring>,
    closer: EndpointCloser,
    stats: EndpointStats,
}

impl<G: GuestMemory> ServerEndpoint<G> {
    /// Maps the rings OPENCHANNEL described and takes the host's side of each. Fails when a page lies outside
    /// `memory` (or `memory` cannot map it), the two rings share a page, or a control page holds an index outside
    /// its data area.
    pub fn new(info: &OpenChannelInfo, memory: G) -> Result<ServerEndpoint<G>, EndpointError> {
        let mut sorted = info.ring_pfns.clone();
        sorted.sort_unstable();
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(EndpointError::OverlappingRings { pfn: pair[0] });
        }
        let guest_to_host = memory.ring(info.guest_to_host_ring_pfns())?;
        let host_to_guest = memory.ring(info.host_to_guest_ring_pfns())?;
        let reader = RingReader::new(guest_to_host)?;
        let writer = RingWriter::new(host_to_guest)?;
        Ok(ServerEndpoint {
            relid: info.relid,
            open_id: info.open_id,
            ring_gpadl: info.ring_gpadl,
            memory,
            reader,
            writer,
            closer: EndpointCloser::default(),
            stats: EndpointStats::default(),
        })
    }

    /// The channel's relid.
    pub fn relid(&self) -> u32 {
        self.relid
    }

    /// The guest's open id.
    pub fn open_id(&self) -> u32 {
        self.open_id
    }

    /// The ring GPADL's handle.
    pub fn ring_gpadl(&self) -> u32 {
        self.ring_gpadl
    }

    /// The guest memory the rings (and GPA-direct data) live in.
    pub fn memory(&self) -> &G {
        &self.memory
    }

    /// A handle that closes this endpoint.
    pub fn closer(&self) -> EndpointCloser {
        self.closer.clone()
    }

    /// Whether the endpoint was closed.
    pub fn is_closed(&self) -> bool {
        self.closer.is_closed()
    }

    /// The traffic counters.
    pub fn stats(&self) -> EndpointStats {
        self.stats
    }

    fn check_open(&self) -> Result<(), EndpointError> {
        if self.closer.is_closed() { Err(EndpointError::Closed) } else { Ok(()) }
    }

    /// Writes one packet to the host → guest ring and signals the guest if the ring rules say so (§6). A full ring
    /// gives [`RingError::Full`] (nothing written); see [`request_space_signal`](Self::request_space_signal).
    pub fn send(
        &mut self,
        packet: &OutgoingPacket<'_>,
        signal: &(impl GuestSignal + ?Sized),
    ) -> Result<WriteOutcome, EndpointError> {
        self.check_open()?;
        let outcome = self.writer.write(packet)?;
        self.stats.sent += 1;
        if outcome.signal_peer {
            self.stats.write_signals += 1;
            signal.signal_guest(self.relid).map_err(EndpointError::Signal)?;
        }
        Ok(outcome)
    }

    /// Sends an in-band data packet (type 6), asking for a completion if `completion_requested`.
    pub fn send_in_band(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
        completion_requested: bool,
        signal: &(impl GuestSignal + ?Sized),
    ) -> Result<WriteOutcome, EndpointError> {
        let packet = OutgoingPacket::in_band(transaction_id, payload);
        let packet = if completion_requested { packet.with_completion_requested() } else { packet };
        self.send(&packet, signal)
    }

    /// Sends the completion (type 0xB) of the guest's packet `transaction_id`.
    pub fn send_completion(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
        signal: &(impl GuestSignal + ?Sized),
    ) -> Result<WriteOutcome, EndpointError> {
        self.send(&OutgoingPacket::completion(transaction_id, payload), signal)
    }

    /// Writes as many of `packets` as fit and publishes them at once (one signal at most); returns how many were
    /// written.
    pub fn send_batch(
        &mut self,
        packets: &[OutgoingPacket<'_>],
        signal: &(impl GuestSignal + ?Sized),
    ) -> Result<usize, EndpointError> {
        self.check_open()?;
        let mut batch = self.writer.batch();
        let mut written = 0;
        for packet in packets {
            match batch.push(packet) {
                Ok(()) => written += 1,
                Err(RingError::Full { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        let outcome = batch.commit();
        self.stats.sent += written as u64;
        if outcome.signal_peer {
            self.stats.write_signals += 1;
            signal.signal_guest(self.relid).map_err(EndpointError::Signal)?;
        }
        Ok(written)
    }

    /// Free bytes in the host → guest ring; a packet needing `n` bytes (trailer included) fits when `n` is less.
    pub fn free_space(&mut self) -> Result<u32, EndpointError> {
        self.check_open()?;
        Ok(self.writer.free_space()?)
    }

    /// After [`RingError::Full`] for a packet needing `needed` bytes: asks the guest to signal once that much is
    /// free (`pending_send_sz`, §6).
    pub fn request_space_signal(&mut self, needed: u32) -> Result<SpaceRequest, EndpointError> {
        self.check_open()?;
        Ok(self.writer.request_space_signal(needed)?)
    }

    /// Withdraws a [`request_space_signal`](Self::request_space_signal).
    pub fn clear_space_signal(&mut self) {
        self.writer.clear_space_signal();
    }

    /// Bytes the guest has published in the guest → host ring and the host has not read.
    pub fn available(&mut self) -> Result<u32, EndpointError> {
        self.check_open()?;
        Ok(self.reader.available()?)
    }

    /// Drains the guest → host ring: `handler` sees each packet in order with the guest memory (to read GPA-direct
    /// ranges through [`GuestMemory::read_gpa_ranges`]); the packet's bytes stay valid only during the call. Reads
    /// are published once per batch, the guest is signalled if it waited for space, and the host's interrupt mask is
    /// set while draining and re-checked after (§6), so no packet is left without a signal.
    pub fn receive(
        &mut self,
        signal: &(impl GuestSignal + ?Sized),
        mut handler: impl FnMut(&IncomingPacket<'_, G::Ring>, &G),
    ) -> Result<ReceiveReport, EndpointError> {
        self.check_open()?;
        let mut report = ReceiveReport::default();
        loop {
            self.reader.begin_drain();
            loop {
                let mut batch = self.reader.batch();
                let mut seen = 0;
                while let Some(packet) = batch.next_packet()? {
                    handler(&packet, &self.memory);
                    seen += 1;
                }
                if seen == 0 {
                    break;
                }
                report.packets += seen;
                self.stats.received += seen as u64;
                let ReadOutcome { signal_peer } = batch.commit()?;
                if signal_peer {
                    self.stats.read_signals += 1;
                    report.signalled = true;
                    signal.signal_guest(self.relid).map_err(EndpointError::Signal)?;
                }
            }
            match self.reader.end_drain()? {
                DrainEnd::Empty => return Ok(report),
                DrainEnd::MoreData => continue,
            }
        }
    }

    /// Drains the guest → host ring like [`receive`](Self::receive), collecting each packet as an owned
    /// [`ReceivedPacket`] (payload copied out; GPA-direct ranges resolved as page numbers, not read).
    pub fn receive_owned(
        &mut self,
        signal: &(impl GuestSignal + ?Sized),
        out: &mut Vec<ReceivedPacket>,
    ) -> Result<ReceiveReport, EndpointError> {
        let mut failure = None;
        let report = self.receive(signal, |packet, _| match ReceivedPacket::copy_of(packet) {
            Ok(owned) => out.push(owned),
            Err(error) => {
                failure.get_or_insert(error);
            }
        })?;
        match failure {
            Some(error) => Err(error.into()),
            None => Ok(report),
        }
    }
}

/// A packet copied out of the guest → host ring by [`ServerEndpoint::receive_owned`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedPacket {
    /// The packet type.
    pub packet_type: crate::ring::PacketType,
    /// The transaction id.
    pub transaction_id: u64,
    /// Whether the guest asked for a completion.
    pub completion_requested: bool,
    /// The payload, with the guest's padding to 8 bytes.
    pub payload: Vec<u8>,
    /// For a GPA-direct packet (type 9), the type-specific header (the ranges); parse it with
    /// [`crate::ring::GpaDirectRanges::parse`].
    pub header_extension: Vec<u8>,
}

impl ReceivedPacket {
    /// Copies `packet` out of the ring; a GPA-direct header is checked.
    pub fn copy_of<M: crate::ring::RingMemory>(packet: &IncomingPacket<'_, M>) -> Result<ReceivedPacket, RingError> {
        let mut payload = alloc::vec![0u8; packet.payload_len()];
        packet.read_payload(&mut payload)?;
        let mut header_extension = alloc::vec![0u8; packet.header_extension_len()];
        packet.read_header_extension(&mut header_extension)?;
        if packet.packet_type() == crate::ring::PacketType::DATA_USING_GPA_DIRECT {
            crate::ring::GpaDirectRanges::parse(&header_extension)?;
        }
        Ok(ReceivedPacket {
            packet_type: packet.packet_type(),
            transaction_id: packet.transaction_id(),
            completion_requested: packet.completion_requested(),
            payload,
            header_extension,
        })
    }

    /// The checked GPA-direct ranges of a type 9 packet.
    pub fn gpa_direct(&self) -> Result<crate::ring::GpaDirectRanges<'_>, RingError> {
        if self.packet_type != crate::ring::PacketType::DATA_USING_GPA_DIRECT {
            return Err(RingError::WrongPacketType { actual: self.packet_type });
        }
        crate::ring::GpaDirectRanges::parse(&self.header_extension)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PageArena;
    use crate::protocol::USER_DEFINED_SIZE;
    use crate::ring::{ControlField, PacketType, RingMemory, initialize_control_page};
    use core::cell::RefCell;

    /// Records the relids signalled.
    #[derive(Default)]
    struct Signals(RefCell<Vec<u32>>);

    impl GuestSignal for Signals {
        fn signal_guest(&self, relid: u32) -> Result<(), HvError> {
            self.0.borrow_mut().push(relid);
            Ok(())
        }
    }

    fn info(pfns: Vec<u64>, split: u32) -> OpenChannelInfo {
        OpenChannelInfo {
            relid: 3,
            open_id: 4,
            ring_gpadl: 5,
            target_vp: 0,
            downstream_page_offset: split,
            user_data: [0; USER_DEFINED_SIZE],
            ring_pfns: pfns,
        }
    }

    /// An arena with both rings of a channel initialised as the guest does: pages 0x10..0x14, split at 2.
    fn arena() -> PageArena {
        let arena = PageArena::new(0x10, 8);
        initialize_control_page(&arena.ring(&[0x10, 0x11]).unwrap());
        initialize_control_page(&arena.ring(&[0x12, 0x13]).unwrap());
        arena
    }

    #[test]
    fn construction_refuses_what_cannot_be_a_pair_of_rings() {
        let arena = arena();
        let endpoint = ServerEndpoint::new(&info(alloc::vec![0x10, 0x11, 0x12, 0x13], 2), arena.clone()).unwrap();
        assert_eq!((endpoint.relid(), endpoint.open_id(), endpoint.ring_gpadl()), (3, 4, 5));
        let error = |pfns: Vec<u64>, split| ServerEndpoint::new(&info(pfns, split), arena.clone()).err();
        assert_eq!(error(alloc::vec![0x10, 0x11, 0x10, 0x13], 2), Some(EndpointError::OverlappingRings { pfn: 0x10 }));
        assert_eq!(
            error(alloc::vec![0x10, 0x11, 0x12, 0x13], 1),
            Some(EndpointError::Memory(MemoryError::BadRingLength { pages: 1 }))
        );
        assert_eq!(
            error(alloc::vec![0x10, 0x11, 0x12, 0x13], 9),
            Some(EndpointError::Memory(MemoryError::BadRingLength { pages: 0 })),
            "an inconsistent split is no panic"
        );
        assert!(matches!(error(alloc::vec![0x17, 0x18, 0x12, 0x13], 2), Some(EndpointError::Memory(_))));
        // A guest that left garbage in a control page before opening.
        arena.ring(&[0x12, 0x13]).unwrap().store_control(ControlField::ReadIndex, 4097);
        assert_eq!(
            error(alloc::vec![0x10, 0x11, 0x12, 0x13], 2),
            Some(EndpointError::Ring(RingError::InvalidIndex { field: ControlField::ReadIndex, value: 4097 }))
        );
    }

    #[test]
    fn the_host_side_is_the_reader_of_the_first_ring_and_the_writer_of_the_second() {
        let arena = arena();
        let signals = Signals::default();
        let mut endpoint = ServerEndpoint::new(&info(alloc::vec![0x10, 0x11, 0x12, 0x13], 2), arena.clone()).unwrap();
        let _ = endpoint.send_in_band(1, b"down", false, &signals).unwrap();
        assert_eq!(*signals.0.borrow(), [3]);
        let down = arena.ring(&[0x12, 0x13]).unwrap();
        assert_eq!(down.load_control(ControlField::WriteIndex), 32, "16 + 8 + trailer in the second ring");
        let mut guest = RingWriter::new(arena.ring(&[0x10, 0x11]).unwrap()).unwrap();
        let _ = guest.write(&OutgoingPacket::in_band(2, b"up")).unwrap();
        let mut packets = Vec::new();
        let report = endpoint.receive_owned(&signals, &mut packets).unwrap();
        assert_eq!(report, ReceiveReport { packets: 1, signalled: false });
        assert_eq!(packets[0].transaction_id, 2);
        assert_eq!(
            packets[0].gpa_direct().err(),
            Some(RingError::WrongPacketType { actual: PacketType::DATA_IN_BAND })
        );

        let closer = endpoint.closer();
        assert!(!endpoint.is_closed());
        closer.close();
        assert_eq!(endpoint.send_completion(2, &[], &signals), Err(EndpointError::Closed));
        assert_eq!(endpoint.available(), Err(EndpointError::Closed));
    }
}
