//! An open VMBus channel, guest side: two rings in guest memory described to the host by one GPADL, and the
//! per-offer rules for telling the host that a ring changed.
//!
//! Reference: `hyperv-vmbus.md` §6 (ring layout, GPADL over both rings, signalling rules), §9 (monitor pages);
//! issue 5 §4 and §6.
//!
//! Opening: the caller provides the ring memory ([`ChannelRings`]: the outgoing ring's pages followed by the
//! incoming ring's pages, and the PFN of every page); [`Channel::open`] resets both control pages, creates one GPADL
//! over all pages, and sends OPENCHANNEL with the downstream offset (the outgoing ring's page count). Closing sends
//! CLOSECHANNEL and then tears the GPADL down (the order versions ≥ 4.0 require) and hands the memory back.
//!
//! Signalling the host after a write follows the offer: a monitored channel sets its bit in the guest → host
//! monitor page (no hypercall); otherwise the guest sets the channel's bit in the shared interrupt page (unless the
//! channel has a dedicated interrupt) and calls HvSignalEvent on the offer's connection id. The ring decides
//! *whether* to signal ([`WriteOutcome`], [`ReadOutcome`]); this module decides *how*.

use crate::client::{ClientError, Connection, GpadlId, Offer, VmbusTransport};
use crate::hv::hypercall::{HvError, Hypercalls};
use crate::ring::{
    DrainEnd, IncomingPacket, OutgoingPacket, ReadOutcome, RingData, RingError, RingMemory, RingReader, RingWriter,
    WriteOutcome, initialize_control_page,
};
use alloc::vec::Vec;
use core::fmt;

/// Size of a ring page (both rings are whole pages: a control page, then data pages).
pub const RING_PAGE_SIZE: u64 = 4096;

/// The guest's pages that the host reads to learn which channel signalled (§4, §9).
pub trait InterruptPages {
    /// Sets bit `relid` in the guest → host half of the shared interrupt page (atomically).
    fn set_send_interrupt(&self, relid: u32);
    /// Sets the pending bit of `monitor_id` in monitor page 2 (guest → host): trigger group `id / 32`, bit `id % 32`.
    fn set_monitor_pending(&self, monitor_id: u8);
    /// Writes `monitor_id`'s latency (100 ns units) in monitor page 2 — how long the host may wait before it acts
    /// on the pending bit (`VmbChannelSetInterruptLatency`) — and returns the previous value. `None` when these
    /// pages have no monitor page 2 (the default: a page set that only models the interrupt page) or the id is
    /// beyond the page's 128.
    fn exchange_monitor_latency(&self, monitor_id: u8, latency: u16) -> Option<u16> {
        let _ = (monitor_id, latency);
        None
    }
}

impl<T: InterruptPages + ?Sized> InterruptPages for &T {
    fn set_send_interrupt(&self, relid: u32) {
        (**self).set_send_interrupt(relid);
    }

    fn set_monitor_pending(&self, monitor_id: u8) {
        (**self).set_monitor_pending(monitor_id);
    }

    fn exchange_monitor_latency(&self, monitor_id: u8, latency: u16) -> Option<u16> {
        (**self).exchange_monitor_latency(monitor_id, latency)
    }
}

/// How the guest tells the host that a channel's ring changed, decided by the offer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SignalPath {
    /// Monitored channel: set the relid's interrupt-page bit (unless dedicated) and the monitor pending bit; the
    /// host polls the monitor page, so there is no hypercall.
    Monitored {
        /// The offer's monitor id (< 128).
        monitor_id: u8,
        /// Whether the channel has a dedicated interrupt.
        dedicated: bool,
    },
    /// HvSignalEvent on the offer's connection id, after setting the relid's interrupt-page bit unless the channel
    /// has a dedicated interrupt.
    Event {
        /// The connection id to signal.
        connection_id: u32,
        /// Whether the channel has a dedicated interrupt.
        dedicated: bool,
    },
}

impl SignalPath {
    /// The path an offer asks for.
    pub fn for_offer(offer: &Offer) -> SignalPath {
        match offer.monitor_id {
            Some(monitor_id) => SignalPath::Monitored { monitor_id, dedicated: offer.dedicated_interrupt },
            None => SignalPath::Event { connection_id: offer.connection_id, dedicated: offer.dedicated_interrupt },
        }
    }

    /// Signals the host about channel `relid` along this path.
    pub fn signal(
        &self,
        relid: u32,
        hypercalls: &(impl Hypercalls + ?Sized),
        pages: &(impl InterruptPages + ?Sized),
    ) -> Result<(), HvError> {
        match *self {
            SignalPath::Monitored { monitor_id, dedicated } => {
                if !dedicated {
                    pages.set_send_interrupt(relid);
                }
                pages.set_monitor_pending(monitor_id);
                Ok(())
            }
            SignalPath::Event { connection_id, dedicated } => {
                if !dedicated {
                    pages.set_send_interrupt(relid);
                }
                hypercalls.signal_event(connection_id, 0)
            }
        }
    }
}

/// The memory of a channel's two rings, supplied by the caller.
pub struct ChannelRings<M: RingMemory> {
    /// The outgoing (guest → host) ring: its control page and data pages.
    pub outgoing: M,
    /// The incoming (host → guest) ring.
    pub incoming: M,
    /// The PFN of every page: the outgoing ring's pages, then the incoming ring's. They need not be contiguous.
    pub pfns: Vec<u64>,
    /// How many of `pfns` belong to the outgoing ring (control page included).
    pub outgoing_pages: u32,
}

impl<M: RingMemory> ChannelRings<M> {
    /// Checks that the page counts agree with the two memories (each ring is a control page plus at least one data
    /// page, and its data area is exactly its remaining pages).
    pub fn validate(&self) -> Result<(), ChannelError> {
        let total = self.pfns.len() as u64;
        let out_pages = u64::from(self.outgoing_pages);
        let in_pages = total.checked_sub(out_pages).ok_or(ChannelError::RingLayout)?;
        let fits = |pages: u64, memory: &M| {
            let len = memory.data().len() as u64;
            pages >= 2 && len.is_multiple_of(RING_PAGE_SIZE) && len / RING_PAGE_SIZE == pages - 1
        };
        if fits(out_pages, &self.outgoing) && fits(in_pages, &self.incoming) {
            Ok(())
        } else {
            Err(ChannelError::RingLayout)
        }
    }
}

/// Why a channel operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChannelError {
    /// The control protocol failed (GPADL, OPENCHANNEL, CLOSECHANNEL).
    Client(ClientError),
    /// A ring operation failed; `Invalid*`/`Truncated` errors mean the host broke the ring and the channel should be
    /// closed.
    Ring(RingError),
    /// Signalling the host failed.
    Signal(HvError),
    /// The ring pages do not match the memory given (see [`ChannelRings::validate`]).
    RingLayout,
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Client(e) => write!(f, "{e}"),
            Self::Ring(e) => write!(f, "ring: {e}"),
            Self::Signal(e) => write!(f, "signalling the host failed: {e:?}"),
            Self::RingLayout => write!(f, "ring pages do not match the ring memory"),
        }
    }
}

impl core::error::Error for ChannelError {}

impl From<ClientError> for ChannelError {
    fn from(e: ClientError) -> Self {
        ChannelError::Client(e)
    }
}

impl From<RingError> for ChannelError {
    fn from(e: RingError) -> Self {
        ChannelError::Ring(e)
    }
}

/// What [`Channel::receive`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveReport {
    /// Packets handed to the handler.
    pub packets: usize,
    /// Whether the host was signalled because space it waited for became free.
    pub signalled: bool,
}

/// An open channel: the guest's ends of both rings and how to signal the host.
pub struct Channel<M: RingMemory> {
    relid: u32,
    gpadl: GpadlId,
    signal: SignalPath,
    writer: RingWriter<M>,
    reader: RingReader<M>,
}

impl<M: RingMemory> Channel<M> {
    /// Opens channel `relid` over `rings`: resets both control pages, creates the GPADL, sends OPENCHANNEL. On
    /// failure the GPADL (if created) is torn down again. The ring views are consumed either way; the caller keeps
    /// the pages themselves and may reuse them after an error.
    pub fn open<T: VmbusTransport>(
        connection: &mut Connection<T>,
        relid: u32,
        rings: ChannelRings<M>,
        target_vp: u32,
        user_data: &[u8],
    ) -> Result<Channel<M>, ChannelError> {
        let offer = connection.offer(relid).cloned().ok_or(ClientError::UnknownChannel(relid))?;
        rings.validate()?;
        let byte_count =
            u32::try_from(rings.pfns.len() as u64 * RING_PAGE_SIZE).map_err(|_| ChannelError::RingLayout)?;
        let ChannelRings { outgoing, incoming, pfns, outgoing_pages } = rings;
        initialize_control_page(&outgoing);
        initialize_control_page(&incoming);
        let writer = RingWriter::new(outgoing)?;
        let reader = RingReader::new(incoming)?;
        let gpadl = connection.create_gpadl(relid, &pfns, 0, byte_count)?;
        if let Err(e) = connection.open_channel(relid, gpadl, outgoing_pages, target_vp, user_data) {
            if let Err(teardown) = connection.teardown_gpadl(relid, gpadl) {
                log::warn!("vmbus: tearing down GPADL {:#x} of relid {relid} after a failed open: {teardown}", gpadl.0);
            }
            return Err(e.into());
        }
        Ok(Channel { relid, gpadl, signal: SignalPath::for_offer(&offer), writer, reader })
    }

    /// The channel's relid.
    pub fn relid(&self) -> u32 {
        self.relid
    }

    /// The GPADL that describes the rings.
    pub fn ring_gpadl(&self) -> GpadlId {
        self.gpadl
    }

    /// How this channel signals the host.
    pub fn signal_path(&self) -> SignalPath {
        self.signal
    }

    /// Writes one packet to the outgoing ring and signals the host if the ring rules say so. A full ring gives
    /// [`RingError::Full`] (nothing written); see [`Channel::request_space_signal`].
    pub fn send(
        &mut self,
        packet: &OutgoingPacket<'_>,
        hypercalls: &(impl Hypercalls + ?Sized),
        pages: &(impl InterruptPages + ?Sized),
    ) -> Result<WriteOutcome, ChannelError> {
        let outcome = self.writer.write(packet)?;
        if outcome.signal_peer {
            self.signal.signal(self.relid, hypercalls, pages).map_err(ChannelError::Signal)?;
        }
        Ok(outcome)
    }

    /// Writes several packets and publishes them at once (one signal at most). Packets that do not fit are not
    /// written: the count written is returned.
    pub fn send_batch(
        &mut self,
        packets: &[OutgoingPacket<'_>],
        hypercalls: &(impl Hypercalls + ?Sized),
        pages: &(impl InterruptPages + ?Sized),
    ) -> Result<usize, ChannelError> {
        let mut batch = self.writer.batch();
        let mut written = 0;
        for packet in packets {
            match batch.push(packet) {
                Ok(()) => written += 1,
                Err(RingError::Full { .. }) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if written == 0 {
            return Ok(0);
        }
        if batch.commit().signal_peer {
            self.signal.signal(self.relid, hypercalls, pages).map_err(ChannelError::Signal)?;
        }
        Ok(written)
    }

    /// Asks the host to signal when `needed` bytes are free in the outgoing ring (`pending_send_sz`, §6).
    pub fn request_space_signal(&mut self, needed: u32) -> Result<crate::ring::SpaceRequest, ChannelError> {
        Ok(self.writer.request_space_signal(needed)?)
    }

    /// Drains the incoming ring: `handler` sees each packet in order (its payload stays valid only during the call).
    /// Reads are published once per batch, the host is signalled if it waited for space, and interrupts are masked
    /// while draining and re-checked after (§6), so no packet is left without a signal.
    pub fn receive(
        &mut self,
        hypercalls: &(impl Hypercalls + ?Sized),
        pages: &(impl InterruptPages + ?Sized),
        mut handler: impl FnMut(&IncomingPacket<'_, M>),
    ) -> Result<ReceiveReport, ChannelError> {
        let mut report = ReceiveReport::default();
        loop {
            self.reader.begin_drain();
            loop {
                let mut batch = self.reader.batch();
                let mut seen = 0;
                while let Some(packet) = batch.next_packet()? {
                    handler(&packet);
                    seen += 1;
                }
                if seen == 0 {
                    break;
                }
                report.packets += seen;
                let ReadOutcome { signal_peer } = batch.commit()?;
                if signal_peer {
                    self.signal.signal(self.relid, hypercalls, pages).map_err(ChannelError::Signal)?;
                    report.signalled = true;
                }
            }
            match self.reader.end_drain()? {
                DrainEnd::Empty => return Ok(report),
                DrainEnd::MoreData => continue,
            }
        }
    }

    /// Closes the channel (CLOSECHANNEL), then tears the ring GPADL down. When the close fails the GPADL is still
    /// torn down; the first error is returned. The host no longer touches the ring pages once this returns `Ok`.
    pub fn close<T: VmbusTransport>(self, connection: &mut Connection<T>) -> Result<(), ChannelError> {
        let closed = connection.close_channel(self.relid);
        let torn = connection.teardown_gpadl(self.relid, self.gpadl);
        closed?;
        torn?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::fake_host::{FakeHost, HostBehaviour, connect, offer};
    use crate::protocol::{Message, MessageType, OfferChannel, device_class};
    use crate::ring::{ControlField, OwnedRingMemory};
    use alloc::sync::Arc;
    use alloc::vec;
    use core::cell::RefCell;

    /// Records the bits the guest sets in its interrupt and monitor pages.
    #[derive(Default)]
    struct Pages {
        interrupts: RefCell<Vec<u32>>,
        monitors: RefCell<Vec<u8>>,
    }

    impl InterruptPages for Pages {
        fn set_send_interrupt(&self, relid: u32) {
            self.interrupts.borrow_mut().push(relid);
        }
        fn set_monitor_pending(&self, monitor_id: u8) {
            self.monitors.borrow_mut().push(monitor_id);
        }
    }

    type Mem = Arc<OwnedRingMemory>;

    /// Two rings of `pages` pages each (control + data), shared with the test's "host" through `Arc`s.
    fn make_rings(pages: u32) -> (ChannelRings<Mem>, Mem, Mem) {
        let data = (pages as usize - 1) * RING_PAGE_SIZE as usize;
        let outgoing = Arc::new(OwnedRingMemory::new(data).unwrap());
        let incoming = Arc::new(OwnedRingMemory::new(data).unwrap());
        let pfns = (0..2 * u64::from(pages)).map(|i| 0x9000 + 7 * i).collect();
        let rings = ChannelRings {
            outgoing: Arc::clone(&outgoing),
            incoming: Arc::clone(&incoming),
            pfns,
            outgoing_pages: pages,
        };
        (rings, outgoing, incoming)
    }

    fn host_with(offers: Vec<OfferChannel>) -> crate::client::Connection<FakeHost> {
        let mut conn = connect(HostBehaviour { offers, ..Default::default() }).unwrap();
        conn.request_offers().unwrap();
        conn
    }

    #[test]
    fn open_describes_both_rings_in_one_gpadl_and_names_the_downstream_offset() {
        let mut conn = host_with(vec![offer(5, device_class::HEARTBEAT)]);
        let (rings, _, _) = make_rings(4);
        let expected_pfns = rings.pfns.clone();
        let channel = Channel::open(&mut conn, 5, rings, 0, &[]).unwrap();
        assert_eq!(conn.transport().state.borrow().gpadl_pfns, vec![expected_pfns]);
        let posted = conn.transport().posted();
        let open = posted.iter().find_map(|p| match p.message() {
            Message::OpenChannel(o) => Some(*o),
            _ => None,
        });
        let open = open.unwrap();
        assert_eq!(open.downstream_ring_buffer_page_offset.get(), 4);
        assert_eq!(open.ring_buffer_gpadl.get(), channel.ring_gpadl().0);
        assert_eq!(channel.signal_path(), SignalPath::Event { connection_id: 0x1005, dedicated: false });
    }

    #[test]
    fn mismatched_ring_layouts_are_refused_before_any_message() {
        let mut conn = host_with(vec![offer(5, device_class::HEARTBEAT)]);
        let before = conn.transport().posted().len();
        let (mut bad, _, _) = make_rings(4);
        bad.outgoing_pages = 3;
        assert_eq!(Channel::open(&mut conn, 5, bad, 0, &[]).err(), Some(ChannelError::RingLayout));
        let (mut short, _, _) = make_rings(4);
        short.pfns.pop();
        assert_eq!(Channel::open(&mut conn, 5, short, 0, &[]).err(), Some(ChannelError::RingLayout));
        let (one_page, _, _) = {
            let m = Arc::new(OwnedRingMemory::new(4096).unwrap());
            (ChannelRings { outgoing: Arc::clone(&m), incoming: m, pfns: vec![1, 2], outgoing_pages: 1 }, 0, 0)
        };
        assert_eq!(Channel::open(&mut conn, 5, one_page, 0, &[]).err(), Some(ChannelError::RingLayout));
        assert_eq!(conn.transport().posted().len(), before);
    }

    #[test]
    fn a_failed_open_tears_its_gpadl_down() {
        let mut conn = connect(HostBehaviour { open_status: 1, ..Default::default() }).unwrap();
        conn.request_offers().unwrap();
        let (rings, _, _) = make_rings(2);
        assert_eq!(
            Channel::open(&mut conn, 5, rings, 0, &[]).err(),
            Some(ChannelError::Client(ClientError::OpenFailed(1)))
        );
        assert_eq!(conn.transport().posted_types().last(), Some(&MessageType::GPADL_TEARDOWN));
    }

    #[test]
    fn sends_signal_once_per_empty_to_non_empty_transition() {
        let mut conn = host_with(vec![offer(5, device_class::HEARTBEAT)]);
        let (rings, outgoing, _) = make_rings(2);
        let mut channel = Channel::open(&mut conn, 5, rings, 0, &[]).unwrap();
        let pages = Pages::default();
        assert!(channel.send(&OutgoingPacket::in_band(1, b"ping"), conn.transport(), &pages).unwrap().signal_peer);
        assert!(!channel.send(&OutgoingPacket::in_band(2, b"ping"), conn.transport(), &pages).unwrap().signal_peer);
        assert_eq!(conn.transport().state.borrow().signals, vec![(0x1005, 0)]);
        assert_eq!(*pages.interrupts.borrow(), vec![5]);

        // The host drains the ring; the next packet signals again.
        let mut host_reader = RingReader::new(Arc::clone(&outgoing)).unwrap();
        let mut batch = host_reader.batch();
        let mut ids = Vec::new();
        while let Some(packet) = batch.next_packet().unwrap() {
            // The ring keeps lengths in 8-byte units: the payload comes back padded with zeros.
            let mut payload = [0u8; 8];
            packet.read_payload(&mut payload).unwrap();
            assert_eq!(&payload, b"ping\0\0\0\0");
            ids.push(packet.transaction_id());
        }
        let _ = batch.commit().unwrap();
        assert_eq!(ids, vec![1, 2]);
        assert!(channel.send(&OutgoingPacket::in_band(3, b"ping"), conn.transport(), &pages).unwrap().signal_peer);

        // A host that masks interrupts (it is draining) is not signalled, even on empty → non-empty.
        let mut host_reader = RingReader::new(Arc::clone(&outgoing)).unwrap();
        let mut batch = host_reader.batch();
        while batch.next_packet().unwrap().is_some() {}
        let _ = batch.commit().unwrap();
        host_reader.begin_drain();
        assert!(!channel.send(&OutgoingPacket::in_band(4, b"ping"), conn.transport(), &pages).unwrap().signal_peer);
        assert_eq!(conn.transport().state.borrow().signals.len(), 2);
    }

    #[test]
    fn batched_sends_signal_at_most_once() {
        let mut conn = host_with(vec![offer(5, device_class::HEARTBEAT)]);
        let (rings, _, _) = make_rings(2);
        let mut channel = Channel::open(&mut conn, 5, rings, 0, &[]).unwrap();
        let pages = Pages::default();
        let payload = [0u8; 64];
        let packets: Vec<_> = (0..200).map(|i| OutgoingPacket::in_band(i, &payload)).collect();
        // 4 KiB of data holds fewer than 200 packets of 88 bytes: the rest is not written.
        let written = channel.send_batch(&packets, conn.transport(), &pages).unwrap();
        assert!(written > 10 && written < 200, "{written}");
        assert_eq!(conn.transport().state.borrow().signals.len(), 1);
        assert_eq!(channel.send_batch(&packets, conn.transport(), &pages).unwrap(), 0);
        assert_eq!(conn.transport().state.borrow().signals.len(), 1);
    }

    #[test]
    fn monitored_channels_signal_through_the_monitor_page_without_a_hypercall() {
        let mut monitored = offer(7, device_class::SCSI);
        monitored.monitor_id = 42;
        monitored.monitor_flags = 1;
        let mut dedicated = offer(8, device_class::NETWORK);
        dedicated.interrupt_flags = 1.into();
        let mut conn = host_with(vec![monitored, dedicated]);
        let pages = Pages::default();

        let (rings7, _, _) = make_rings(2);
        let mut ch7 = Channel::open(&mut conn, 7, rings7, 0, &[]).unwrap();
        assert_eq!(ch7.signal_path(), SignalPath::Monitored { monitor_id: 42, dedicated: false });
        let _ = ch7.send(&OutgoingPacket::in_band(1, b"x"), conn.transport(), &pages).unwrap();
        assert!(conn.transport().state.borrow().signals.is_empty());
        assert_eq!(*pages.monitors.borrow(), vec![42]);
        assert_eq!(*pages.interrupts.borrow(), vec![7]);

        let (rings8, _, _) = make_rings(2);
        let mut ch8 = Channel::open(&mut conn, 8, rings8, 0, &[]).unwrap();
        let _ = ch8.send(&OutgoingPacket::in_band(1, b"x"), conn.transport(), &pages).unwrap();
        assert_eq!(conn.transport().state.borrow().signals, vec![(0x1008, 0)]);
        assert_eq!(*pages.interrupts.borrow(), vec![7], "a dedicated interrupt sets no interrupt-page bit");
    }

    #[test]
    fn receive_drains_in_order_and_leaves_interrupts_unmasked() {
        let mut conn = host_with(vec![offer(5, device_class::HEARTBEAT)]);
        let (rings, _, incoming) = make_rings(2);
        let mut channel = Channel::open(&mut conn, 5, rings, 0, &[]).unwrap();
        let pages = Pages::default();
        let mut host_writer = RingWriter::new(Arc::clone(&incoming)).unwrap();
        for id in 1..=3u64 {
            let payload = id.to_le_bytes();
            let _ = host_writer.write(&OutgoingPacket::in_band(id, &payload)).unwrap();
        }
        let mut seen = Vec::new();
        let report = channel
            .receive(conn.transport(), &pages, |packet| {
                let mut payload = [0u8; 8];
                packet.read_payload(&mut payload).unwrap();
                seen.push((packet.transaction_id(), u64::from_le_bytes(payload)));
            })
            .unwrap();
        assert_eq!(seen, vec![(1, 1), (2, 2), (3, 3)]);
        assert_eq!(report, ReceiveReport { packets: 3, signalled: false });
        assert_eq!(incoming.load_control(ControlField::InterruptMask), 0);
        assert_eq!(channel.receive(conn.transport(), &pages, |_| ()).unwrap().packets, 0);
    }

    #[test]
    fn a_corrupt_incoming_ring_is_an_error_not_a_panic() {
        let mut conn = host_with(vec![offer(5, device_class::HEARTBEAT)]);
        let (rings, _, incoming) = make_rings(2);
        let mut channel = Channel::open(&mut conn, 5, rings, 0, &[]).unwrap();
        incoming.store_control(ControlField::WriteIndex, 12345);
        let result = channel.receive(conn.transport(), &Pages::default(), |_| ());
        assert!(matches!(result, Err(ChannelError::Ring(_))), "{result:?}");
    }

    #[test]
    fn close_sends_closechannel_then_tears_the_gpadl_down() {
        let mut conn = host_with(vec![offer(5, device_class::HEARTBEAT)]);
        let (rings, _, _) = make_rings(2);
        let channel = Channel::open(&mut conn, 5, rings, 0, &[]).unwrap();
        channel.close(&mut conn).unwrap();
        let types = conn.transport().posted_types();
        assert_eq!(types[types.len() - 2..], [MessageType::CLOSECHANNEL, MessageType::GPADL_TEARDOWN]);
        // The relid can be opened again.
        let (rings, _, _) = make_rings(2);
        Channel::open(&mut conn, 5, rings, 0, &[]).unwrap();
    }
}
