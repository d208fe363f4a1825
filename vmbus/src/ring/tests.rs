//! Tests of the ring (reference `hyperv-vmbus.md` §6): encoding, wrap-around, the full condition, the signalling
//! rules, batches, a model-based property test, corruption by a lying peer, and a writer and reader on two threads.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::Cell;

use proptest::prelude::*;
use zerocopy::IntoBytes;

use super::*;

/// Bytes a packet with `extension` header bytes and `payload` bytes occupies, trailer included.
fn packet_bytes(extension: usize, payload: usize) -> u32 {
    (16 + extension + round_up8(payload) + 8) as u32
}

/// A recognisable payload for a transaction id.
fn payload_for(transaction_id: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (transaction_id as usize * 31 + i * 7) as u8).collect()
}

/// A packet as the tests compare it: type, flags, transaction id, payload.
type Drained = (PacketType, PacketFlags, u64, Vec<u8>);

/// Reads every available packet as (type, flags, transaction id, payload) and commits.
fn drain(reader: &mut RingReader<&OwnedRingMemory>) -> (Vec<Drained>, ReadOutcome) {
    let mut batch = reader.batch();
    let mut packets = Vec::new();
    while let Some(packet) = batch.next_packet().unwrap() {
        let mut payload = vec![0u8; packet.payload_len()];
        packet.read_payload(&mut payload).unwrap();
        packets.push((packet.packet_type(), packet.flags(), packet.transaction_id(), payload));
    }
    (packets, batch.commit().unwrap())
}

fn new_ring(data_len: usize) -> OwnedRingMemory {
    let memory = OwnedRingMemory::new(data_len).unwrap();
    initialize_control_page(&memory);
    memory
}

#[test]
fn in_band_packet_encoding() {
    let memory = new_ring(4096);
    let mut writer = RingWriter::new(&memory).unwrap();
    let outcome = writer.write(&OutgoingPacket::in_band(0x1234, b"hello").with_completion_requested()).unwrap();
    assert!(outcome.signal_peer);
    // Descriptor, 8 bytes of padded payload, trailer.
    assert_eq!(memory.load_control(ControlField::WriteIndex), 32);
    let mut bytes = [0u8; 32];
    memory.data().read(0, &mut bytes);
    let descriptor = PacketDescriptor {
        packet_type: PacketType::DATA_IN_BAND,
        offset8: 2,
        len8: 3,
        flags: PacketFlags::COMPLETION_REQUESTED,
        transaction_id: 0x1234,
    };
    assert_eq!(&bytes[..16], descriptor.as_bytes());
    assert_eq!(&bytes[16..24], b"hello\0\0\0");
    assert_eq!(&bytes[24..], &0u64.to_le_bytes());
    // The second packet's trailer holds its start offset in the upper half.
    let _ = writer.write(&OutgoingPacket::completion(7, &[])).unwrap();
    memory.data().read(48, &mut bytes[..8]);
    assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()), 32 << 32);

    let mut reader = RingReader::new(&memory).unwrap();
    let (packets, _) = drain(&mut reader);
    assert_eq!(packets.len(), 2);
    assert_eq!(
        packets[0],
        (PacketType::DATA_IN_BAND, PacketFlags::COMPLETION_REQUESTED, 0x1234, b"hello\0\0\0".to_vec())
    );
    assert_eq!(packets[1], (PacketType::COMPLETION, PacketFlags::NONE, 7, Vec::new()));
    assert_eq!(memory.load_control(ControlField::ReadIndex), 56);
}

#[test]
fn packets_wrap_around_the_end() {
    let memory = new_ring(128);
    let mut writer = RingWriter::new(&memory).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    // An empty packet first (24 bytes), then packets of 48 to 72 bytes, so starts and payloads land everywhere,
    // including across the end of the 128-byte data area.
    let _ = writer.write(&OutgoingPacket::in_band(0, &[])).unwrap();
    assert_eq!(drain(&mut reader).0.len(), 1);
    for id in 1..40u64 {
        let payload = payload_for(id, 17 + (id as usize % 24));
        let _ = writer.write(&OutgoingPacket::in_band(id, &payload)).unwrap();
        let (packets, _) = drain(&mut reader);
        assert_eq!(packets.len(), 1);
        assert_eq!(packets[0].2, id);
        assert_eq!(&packets[0].3[..payload.len()], &payload[..]);
        assert!(packets[0].3[payload.len()..].iter().all(|&b| b == 0));
    }
}

#[test]
fn descriptor_split_by_the_end_of_the_ring() {
    let memory = new_ring(64);
    let mut writer = RingWriter::new(&memory).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    // 56 bytes: the next packet starts at 56, so its descriptor straddles the end.
    let _ = writer.write(&OutgoingPacket::in_band(1, &[1; 32])).unwrap();
    assert_eq!(drain(&mut reader).0.len(), 1);
    let _ = writer.write(&OutgoingPacket::in_band(2, &[2; 8])).unwrap();
    assert_eq!(memory.load_control(ControlField::WriteIndex), 24);
    let (packets, _) = drain(&mut reader);
    assert_eq!(packets, vec![(PacketType::DATA_IN_BAND, PacketFlags::NONE, 2, vec![2; 8])]);
}

#[test]
fn full_when_free_space_is_not_more_than_needed() {
    let memory = new_ring(128);
    let mut writer = RingWriter::new(&memory).unwrap();
    // 128 free; a packet needing exactly 128 can never fit.
    assert_eq!(writer.write(&OutgoingPacket::in_band(0, &[0; 104])), Err(RingError::PacketTooLarge { needed: 128 }));
    // 120 needed < 128 free: fits, leaving 8.
    let _ = writer.write(&OutgoingPacket::in_band(0, &[0; 96])).unwrap();
    assert_eq!(writer.free_space().unwrap(), 8);
    let mut reader = RingReader::new(&memory).unwrap();
    let _ = drain(&mut reader);
    // 64 used by one packet, 64 free: a second 64-byte packet would make write_index catch read_index.
    let _ = writer.write(&OutgoingPacket::in_band(1, &[0; 40])).unwrap();
    assert_eq!(writer.write(&OutgoingPacket::in_band(2, &[0; 40])), Err(RingError::Full { needed: 64, free: 64 }));
    // 56 bytes fit in 64 free.
    let _ = writer.write(&OutgoingPacket::in_band(2, &[0; 32])).unwrap();
    assert_eq!(writer.free_space().unwrap(), 8);
}

#[test]
fn writer_signals_only_when_the_ring_goes_from_empty_to_non_empty() {
    let memory = new_ring(4096);
    let mut writer = RingWriter::new(&memory).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    assert!(writer.write(&OutgoingPacket::in_band(1, &[1; 8])).unwrap().signal_peer);
    assert!(!writer.write(&OutgoingPacket::in_band(2, &[1; 8])).unwrap().signal_peer);
    // A reader that has read but not committed has not emptied the ring.
    {
        let mut batch = reader.batch();
        while batch.next_packet().unwrap().is_some() {}
    }
    assert!(!writer.write(&OutgoingPacket::in_band(3, &[1; 8])).unwrap().signal_peer);
    assert_eq!(drain(&mut reader).0.len(), 3);
    assert!(writer.write(&OutgoingPacket::in_band(4, &[1; 8])).unwrap().signal_peer);
    // A masked reader is never signalled.
    let _ = drain(&mut reader);
    reader.begin_drain();
    assert!(!writer.write(&OutgoingPacket::in_band(5, &[1; 8])).unwrap().signal_peer);
    assert_eq!(reader.end_drain().unwrap(), DrainEnd::MoreData);
    assert_eq!(drain(&mut reader).0.len(), 1);
    assert_eq!(reader.end_drain().unwrap(), DrainEnd::Empty);
    // An empty commit publishes nothing and signals nothing.
    assert!(!writer.batch().commit().signal_peer);
}

#[test]
fn reader_signals_when_free_space_crosses_pending_send_size() {
    let memory = new_ring(256);
    let mut writer = RingWriter::new(&memory).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    // Four 56-byte packets use 224 of 256 bytes.
    for id in 0..4 {
        let _ = writer.write(&OutgoingPacket::in_band(id, &[0; 32])).unwrap();
    }
    let needed = packet_bytes(0, 96);
    let Err(RingError::Full { needed: reported, free }) = writer.write(&OutgoingPacket::in_band(9, &[0; 96])) else {
        panic!("ring should be full");
    };
    assert_eq!((reported, free), (needed, 32));
    assert_eq!(writer.request_space_signal(needed).unwrap(), SpaceRequest::Armed);
    assert_eq!(memory.load_control(ControlField::PendingSendSize), needed + 8);
    let read_one = |reader: &mut RingReader<&OwnedRingMemory>| {
        let mut batch = reader.batch();
        assert!(batch.next_packet().unwrap().is_some());
        batch.commit().unwrap()
    };
    // Free 32 → 88 → 144: the writer needs free > 120, i.e. ≥ 128 = pending.
    assert!(!read_one(&mut reader).signal_peer);
    assert!(read_one(&mut reader).signal_peer);
    // Already above the pending size: no second signal.
    assert!(!read_one(&mut reader).signal_peer);
    let _ = writer.write(&OutgoingPacket::in_band(9, &[0; 96])).unwrap();
    writer.clear_space_signal();
    assert!(!read_one(&mut reader).signal_peer);
    // Without the feature bit the pending size is ignored.
    memory.store_control(ControlField::FeatureBits, 0);
    let Err(RingError::Full { needed, .. }) = writer.write(&OutgoingPacket::in_band(10, &[0; 200])) else {
        panic!("ring should be full");
    };
    assert_eq!(writer.request_space_signal(needed).unwrap(), SpaceRequest::Armed);
    let (packets, outcome) = drain(&mut reader);
    assert_eq!(packets.len(), 1);
    assert!(!outcome.signal_peer);
}

#[test]
fn space_request_sees_space_freed_meanwhile() {
    let memory = new_ring(128);
    let mut writer = RingWriter::new(&memory).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    let _ = writer.write(&OutgoingPacket::in_band(0, &[0; 64])).unwrap();
    let Err(RingError::Full { needed, .. }) = writer.write(&OutgoingPacket::in_band(1, &[0; 64])) else {
        panic!("ring should be full");
    };
    let _ = drain(&mut reader);
    assert_eq!(writer.request_space_signal(needed).unwrap(), SpaceRequest::Available);
    assert_eq!(writer.request_space_signal(128), Err(RingError::PacketTooLarge { needed: 128 }));
}

/// Ring memory that counts control stores and fences, to check that batches publish once.
struct Counting<'a> {
    inner: &'a OwnedRingMemory,
    stores: Cell<[usize; 5]>,
    fences: Cell<usize>,
}

impl<'a> Counting<'a> {
    fn new(inner: &'a OwnedRingMemory) -> Self {
        Self { inner, stores: Cell::new([0; 5]), fences: Cell::new(0) }
    }
    fn stores_of(&self, field: ControlField) -> usize {
        self.stores.get()[field as usize]
    }
}

impl<'m> RingMemory for Counting<'m> {
    type Data<'a>
        = AtomicRingData<'m>
    where
        Self: 'a;
    fn data(&self) -> AtomicRingData<'m> {
        self.inner.data()
    }
    fn load_control(&self, field: ControlField) -> u32 {
        self.inner.load_control(field)
    }
    fn store_control(&self, field: ControlField, value: u32) {
        let mut stores = self.stores.get();
        stores[field as usize] += 1;
        self.stores.set(stores);
        self.inner.store_control(field, value)
    }
    fn full_fence(&self) {
        self.fences.set(self.fences.get() + 1);
        self.inner.full_fence()
    }
}

/// Memory whose data area implements only the required `RingData` methods, so the provided ones (word access,
/// descriptor pairs, whole packets) run in their default form.
struct MinimalMemory<'a>(&'a OwnedRingMemory);

/// The data area of [`MinimalMemory`].
#[derive(Clone, Copy)]
struct MinimalData<'a>(AtomicRingData<'a>);

impl RingData for MinimalData<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn read(&self, offset: usize, dst: &mut [u8]) {
        self.0.read(offset, dst)
    }
    fn write(&self, offset: usize, src: &[u8]) {
        self.0.write(offset, src)
    }
}

impl<'m> RingMemory for MinimalMemory<'m> {
    type Data<'a>
        = MinimalData<'m>
    where
        Self: 'a;
    fn data(&self) -> MinimalData<'m> {
        MinimalData(self.0.data())
    }
    fn load_control(&self, field: ControlField) -> u32 {
        self.0.load_control(field)
    }
    fn store_control(&self, field: ControlField, value: u32) {
        self.0.store_control(field, value)
    }
}

#[test]
fn default_data_methods_agree_with_the_atomic_ones() {
    // The same traffic through the default methods and through the atomic data area leaves the same bytes.
    let plain = new_ring(256);
    let minimal = new_ring(256);
    let mut plain_writer = RingWriter::new(&plain).unwrap();
    let mut minimal_writer = RingWriter::new(MinimalMemory(&minimal)).unwrap();
    let mut plain_reader = RingReader::new(&plain).unwrap();
    let mut minimal_reader = RingReader::new(MinimalMemory(&minimal)).unwrap();
    for id in 0..40u64 {
        let payload = payload_for(id, (id as usize * 5) % 60);
        let packet = OutgoingPacket::in_band(id, &payload);
        let _ = plain_writer.write(&packet).unwrap();
        let _ = minimal_writer.write(&packet).unwrap();
        let mut plain_bytes = [0u8; 256];
        let mut minimal_bytes = [0u8; 256];
        plain.data().read(0, &mut plain_bytes);
        minimal.data().read(0, &mut minimal_bytes);
        assert_eq!(plain_bytes, minimal_bytes, "packet {id}");
        let _ = drain(&mut plain_reader);
        let mut batch = minimal_reader.batch();
        let incoming = batch.next_packet().unwrap().unwrap();
        assert_eq!(incoming.transaction_id(), id);
        let mut back = vec![0u8; incoming.payload_len()];
        incoming.read_payload(&mut back).unwrap();
        assert_eq!(&back[..payload.len()], &payload[..]);
        assert!(batch.next_packet().unwrap().is_none());
        let _ = batch.commit().unwrap();
    }
}

#[test]
fn batches_publish_each_index_once() {
    let memory = new_ring(4096);
    let writer_side = Counting::new(&memory);
    let reader_side = Counting::new(&memory);
    let mut writer = RingWriter::new(&writer_side).unwrap();
    let mut reader = RingReader::new(&reader_side).unwrap();
    let mut batch = writer.batch();
    for id in 0..10 {
        batch.push(&OutgoingPacket::in_band(id, &payload_for(id, 50))).unwrap();
    }
    // Nothing is visible before the commit.
    assert_eq!(reader.available().unwrap(), 0);
    assert!(batch.commit().signal_peer);
    assert_eq!(writer_side.stores_of(ControlField::WriteIndex), 1);
    assert_eq!(writer_side.fences.get(), 1);

    let mut batch = reader.batch();
    let mut buffer = [0u8; 56];
    let mut id = 0;
    while let Some(packet) = batch.next_packet().unwrap() {
        assert_eq!(packet.read_payload(&mut buffer).unwrap(), 56);
        assert_eq!(&buffer[..50], &payload_for(id, 50)[..]);
        id += 1;
    }
    assert_eq!(id, 10);
    assert!(!batch.commit().unwrap().signal_peer);
    assert_eq!(reader_side.stores_of(ControlField::ReadIndex), 1);
    // The feature bit is set, so the commit fenced once before reading the pending size.
    assert_eq!(reader_side.fences.get(), 1);
    // A dropped batch publishes nothing.
    let mut batch = writer.batch();
    batch.push(&OutgoingPacket::in_band(99, &[1])).unwrap();
    drop(batch);
    assert_eq!(writer_side.stores_of(ControlField::WriteIndex), 1);
    assert_eq!(reader.available().unwrap(), 0);
}

#[test]
fn gpa_direct_round_trip() {
    let memory = new_ring(4096);
    let mut writer = RingWriter::new(&memory).unwrap();
    let ranges = [
        OutgoingGpaRange { byte_count: 200, byte_offset: 0xF80, pfns: &[10, 11] },
        OutgoingGpaRange { byte_count: 8192, byte_offset: 0, pfns: &[20, 21] },
        OutgoingGpaRange { byte_count: 1, byte_offset: 0xFFF, pfns: &[30] },
    ];
    let packet = OutgoingPacket {
        kind: OutgoingKind::GpaDirect(&ranges),
        flags: PacketFlags::COMPLETION_REQUESTED,
        transaction_id: 77,
        payload: b"request",
    };
    let _ = writer.write(&packet).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    let mut batch = reader.batch();
    let incoming = batch.next_packet().unwrap().unwrap();
    assert_eq!(incoming.packet_type(), PacketType::DATA_USING_GPA_DIRECT);
    assert!(incoming.completion_requested());
    assert_eq!(incoming.header_extension_len(), 8 + 24 + 24 + 16);
    let mut scratch = [0u8; 128];
    let parsed = incoming.gpa_direct(&mut scratch).unwrap();
    assert_eq!(parsed.len(), 3);
    let got: Vec<(u32, u32, Vec<u64>)> =
        parsed.iter().map(|range| (range.byte_count, range.byte_offset, range.pfns.iter().collect())).collect();
    let want: Vec<(u32, u32, Vec<u64>)> =
        ranges.iter().map(|range| (range.byte_count, range.byte_offset, range.pfns.to_vec())).collect();
    assert_eq!(got, want);
    assert_eq!(parsed.iter().next().unwrap().pfns.get(1), Some(11));
    let mut payload = [0u8; 8];
    incoming.read_payload(&mut payload).unwrap();
    assert_eq!(&payload, b"request\0");
    assert!(matches!(incoming.transfer_pages(&mut scratch), Err(RingError::WrongPacketType { .. })));
    assert_eq!(incoming.gpa_direct(&mut [0u8; 8]).err(), Some(RingError::BufferTooSmall { needed: 72, actual: 8 }));
}

#[test]
fn transfer_pages_round_trip() {
    let memory = new_ring(4096);
    let mut writer = RingWriter::new(&memory).unwrap();
    let ranges = [
        TransferPageRange { byte_count: 1500, byte_offset: 0 },
        TransferPageRange { byte_count: 60, byte_offset: 4096 },
    ];
    let packet = OutgoingPacket {
        kind: OutgoingKind::TransferPages { transfer_page_set_id: 0xCAFE, sender_owns: true, ranges: &ranges },
        flags: PacketFlags::NONE,
        transaction_id: 5,
        payload: &[9; 12],
    };
    let _ = writer.write(&packet).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    let mut batch = reader.batch();
    let incoming = batch.next_packet().unwrap().unwrap();
    assert_eq!(incoming.packet_type(), PacketType::DATA_USING_TRANSFER_PAGES);
    let mut scratch = [0u8; 64];
    let parsed = incoming.transfer_pages(&mut scratch).unwrap();
    assert_eq!((parsed.transfer_page_set_id, parsed.sender_owns, parsed.len()), (0xCAFE, true, 2));
    assert_eq!(parsed.ranges().collect::<Vec<_>>(), ranges.to_vec());
    let mut payload = [0u8; 4];
    incoming.read_payload_at(8, &mut payload).unwrap();
    assert_eq!(payload, [9, 9, 9, 9]);
    assert_eq!(incoming.read_payload_at(13, &mut payload), Err(RingError::OutOfPacket));
    assert_eq!(incoming.read_payload(&mut payload), Err(RingError::BufferTooSmall { needed: 16, actual: 4 }));
}

#[test]
fn outgoing_gpa_ranges_are_checked() {
    let memory = new_ring(4096);
    let mut writer = RingWriter::new(&memory).unwrap();
    for range in [
        OutgoingGpaRange { byte_count: 0, byte_offset: 0, pfns: &[] },
        OutgoingGpaRange { byte_count: 1, byte_offset: 0x1000, pfns: &[1, 2] },
        OutgoingGpaRange { byte_count: 4096, byte_offset: 1, pfns: &[1] },
        OutgoingGpaRange { byte_count: 10, byte_offset: 0, pfns: &[1, 2] },
    ] {
        let ranges = [range];
        let packet = OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&ranges),
            flags: PacketFlags::NONE,
            transaction_id: 0,
            payload: &[],
        };
        assert_eq!(writer.write(&packet), Err(RingError::InvalidOutgoingRange), "{range:?}");
    }
    assert_eq!(memory.load_control(ControlField::WriteIndex), 0);
}

/// Writes `descriptor` (and `extension`) as the only packet of a fresh ring, publishing `published` bytes.
fn ring_with_raw_packet(descriptor: PacketDescriptor, extension: &[u8], published: u32) -> OwnedRingMemory {
    let memory = new_ring(256);
    memory.data().write(0, descriptor.as_bytes());
    memory.data().write(16, extension);
    memory.store_control(ControlField::WriteIndex, published);
    memory
}

fn first_packet_error(memory: &OwnedRingMemory) -> RingError {
    let mut reader = RingReader::new(memory).unwrap();
    let mut batch = reader.batch();
    match batch.next_packet() {
        Ok(Some(_)) => panic!("a packet was accepted"),
        Ok(None) => panic!("no packet seen"),
        Err(error) => error,
    }
}

fn descriptor(packet_type: PacketType, offset8: u16, len8: u16) -> PacketDescriptor {
    PacketDescriptor { packet_type, offset8, len8, flags: PacketFlags::NONE, transaction_id: 0 }
}

#[test]
fn lying_descriptors_are_errors() {
    let in_band = PacketType::DATA_IN_BAND;
    // Header shorter than a descriptor.
    let memory = ring_with_raw_packet(descriptor(in_band, 1, 4), &[], 40);
    assert_eq!(first_packet_error(&memory), RingError::InvalidDescriptor { offset8: 1, len8: 4 });
    // Total shorter than the header.
    let memory = ring_with_raw_packet(descriptor(in_band, 4, 3), &[], 40);
    assert_eq!(first_packet_error(&memory), RingError::InvalidDescriptor { offset8: 4, len8: 3 });
    // Longer than what was published.
    let memory = ring_with_raw_packet(descriptor(in_band, 2, 4), &[], 32);
    assert_eq!(first_packet_error(&memory), RingError::Truncated { needed: 40, available: 32 });
    // Longer than the whole ring.
    let memory = ring_with_raw_packet(descriptor(in_band, 2, u16::MAX), &[], 248);
    assert_eq!(first_packet_error(&memory), RingError::Truncated { needed: 524_288, available: 248 });
    // Fewer bytes published than the smallest packet.
    let memory = ring_with_raw_packet(descriptor(in_band, 2, 2), &[], 16);
    assert_eq!(first_packet_error(&memory), RingError::Truncated { needed: 24, available: 16 });
    // GPA-direct and transfer-page packets without room for their header.
    for packet_type in [PacketType::DATA_USING_GPA_DIRECT, PacketType::DATA_USING_TRANSFER_PAGES] {
        let memory = ring_with_raw_packet(descriptor(packet_type, 2, 2), &[], 24);
        assert_eq!(first_packet_error(&memory), RingError::InvalidDescriptor { offset8: 2, len8: 2 });
    }
}

#[test]
fn lying_range_headers_are_errors() {
    let gpa = PacketType::DATA_USING_GPA_DIRECT;
    let cases: [(&[u8], RingError); 5] = [
        // Two ranges announced, one present.
        (
            [0u32.to_le_bytes(), 2u32.to_le_bytes(), 8u32.to_le_bytes(), 0u32.to_le_bytes()]
                .as_flattened()
                .iter()
                .chain(&5u64.to_le_bytes())
                .copied()
                .collect::<Vec<u8>>()
                .leak(),
            RingError::InvalidGpaDirect,
        ),
        // A range of zero bytes.
        (
            [0u32, 1, 0, 0].as_bytes().iter().chain(&5u64.to_le_bytes()).copied().collect::<Vec<u8>>().leak(),
            RingError::InvalidGpaDirect,
        ),
        // An offset beyond the page.
        (
            [0u32, 1, 8, 0x1000].as_bytes().iter().chain(&[0; 16]).copied().collect::<Vec<u8>>().leak(),
            RingError::InvalidGpaDirect,
        ),
        // A range spanning two pages with one PFN.
        (
            [0u32, 1, 8, 0xFFC].as_bytes().iter().chain(&5u64.to_le_bytes()).copied().collect::<Vec<u8>>().leak(),
            RingError::InvalidGpaDirect,
        ),
        // A huge range count.
        (
            [0u32, u32::MAX, 8, 0].as_bytes().iter().chain(&5u64.to_le_bytes()).copied().collect::<Vec<u8>>().leak(),
            RingError::InvalidGpaDirect,
        ),
    ];
    for (extension, error) in cases {
        let offset8 = (2 + extension.len() / 8) as u16;
        let memory = ring_with_raw_packet(descriptor(gpa, offset8, offset8), extension, u32::from(offset8) * 8 + 8);
        let mut reader = RingReader::new(&memory).unwrap();
        let mut batch = reader.batch();
        let packet = batch.next_packet().unwrap().unwrap();
        assert_eq!(packet.gpa_direct(&mut [0u8; 64]).err(), Some(error), "{extension:?}");
    }
    // Transfer pages: three ranges announced, two present.
    let extension = [0u32, 3, 1, 2, 3, 4];
    let memory =
        ring_with_raw_packet(descriptor(PacketType::DATA_USING_TRANSFER_PAGES, 5, 5), extension.as_bytes(), 48);
    let mut reader = RingReader::new(&memory).unwrap();
    let mut batch = reader.batch();
    let packet = batch.next_packet().unwrap().unwrap();
    assert_eq!(packet.transfer_pages(&mut [0u8; 64]).err(), Some(RingError::InvalidTransferPages));
}

#[test]
fn lying_indices_are_errors() {
    let memory = new_ring(256);
    for (field, value) in
        [(ControlField::WriteIndex, 256), (ControlField::WriteIndex, 12), (ControlField::ReadIndex, 4)]
    {
        memory.store_control(field, value);
        let error = RingError::InvalidIndex { field, value };
        if field == ControlField::WriteIndex {
            assert_eq!(RingReader::new(&memory).err(), Some(error));
        } else {
            assert_eq!(RingWriter::new(&memory).err(), Some(error));
        }
        memory.store_control(field, 0);
    }
    // Indices changed after the sides were created are checked on every load.
    let mut writer = RingWriter::new(&memory).unwrap();
    let mut reader = RingReader::new(&memory).unwrap();
    memory.store_control(ControlField::WriteIndex, 0xFFFF_FFF8);
    assert!(matches!(reader.batch().next_packet(), Err(RingError::InvalidIndex { .. })));
    assert!(matches!(reader.end_drain(), Err(RingError::InvalidIndex { .. })));
    memory.store_control(ControlField::ReadIndex, 3);
    let mut batch = writer.batch();
    let mut result = Ok(());
    for _ in 0..10 {
        result = batch.push(&OutgoingPacket::in_band(0, &[0; 40]));
        if result.is_err() {
            break;
        }
    }
    assert_eq!(result, Err(RingError::InvalidIndex { field: ControlField::ReadIndex, value: 3 }));
}

/// A packet in the model test.
#[derive(Debug, Clone)]
enum SpecKind {
    InBand,
    Completion,
    GpaDirect(Vec<(u32, u32)>),
    TransferPages(u16, bool, Vec<(u32, u32)>),
}

#[derive(Debug, Clone)]
struct PacketSpec {
    kind: SpecKind,
    payload_len: usize,
    completion_requested: bool,
}

impl PacketSpec {
    fn extension_len(&self) -> usize {
        match &self.kind {
            SpecKind::InBand | SpecKind::Completion => 0,
            SpecKind::GpaDirect(ranges) => {
                8 + ranges
                    .iter()
                    .map(|&(count, offset)| 8 + 8 * (count + offset).div_ceil(4096) as usize)
                    .sum::<usize>()
            }
            SpecKind::TransferPages(_, _, ranges) => 8 + 8 * ranges.len(),
        }
    }

    fn needed(&self) -> u32 {
        packet_bytes(self.extension_len(), self.payload_len)
    }

    /// Writes the packet with `transaction_id` into `batch`.
    fn push(&self, batch: &mut WriteBatch<'_, &OwnedRingMemory>, transaction_id: u64) -> Result<(), RingError> {
        let payload = payload_for(transaction_id, self.payload_len);
        let pfns: Vec<Vec<u64>> = match &self.kind {
            SpecKind::GpaDirect(ranges) => ranges
                .iter()
                .map(|&(count, offset)| {
                    (0..(count + offset).div_ceil(4096) as u64).map(|i| transaction_id * 100 + i).collect()
                })
                .collect(),
            _ => Vec::new(),
        };
        let gpa: Vec<OutgoingGpaRange<'_>> = match &self.kind {
            SpecKind::GpaDirect(ranges) => ranges
                .iter()
                .zip(&pfns)
                .map(|(&(byte_count, byte_offset), pfns)| OutgoingGpaRange { byte_count, byte_offset, pfns })
                .collect(),
            _ => Vec::new(),
        };
        let transfer: Vec<TransferPageRange> = match &self.kind {
            SpecKind::TransferPages(_, _, ranges) => {
                ranges.iter().map(|&(byte_count, byte_offset)| TransferPageRange { byte_count, byte_offset }).collect()
            }
            _ => Vec::new(),
        };
        let kind = match &self.kind {
            SpecKind::InBand => OutgoingKind::InBand,
            SpecKind::Completion => OutgoingKind::Completion,
            SpecKind::GpaDirect(_) => OutgoingKind::GpaDirect(&gpa),
            SpecKind::TransferPages(id, owns, _) => {
                OutgoingKind::TransferPages { transfer_page_set_id: *id, sender_owns: *owns, ranges: &transfer }
            }
        };
        let flags = if self.completion_requested { PacketFlags::COMPLETION_REQUESTED } else { PacketFlags::NONE };
        batch.push(&OutgoingPacket { kind, flags, transaction_id, payload: &payload })
    }

    /// Checks that `packet` is this packet with `transaction_id`.
    fn check(&self, packet: &IncomingPacket<'_, &OwnedRingMemory>, transaction_id: u64) {
        assert_eq!(packet.transaction_id(), transaction_id);
        assert_eq!(packet.completion_requested(), self.completion_requested);
        assert_eq!(packet.header_extension_len(), self.extension_len());
        let mut payload = vec![0xEEu8; packet.payload_len()];
        packet.read_payload(&mut payload).unwrap();
        assert_eq!(payload.len(), round_up8(self.payload_len));
        assert_eq!(&payload[..self.payload_len], &payload_for(transaction_id, self.payload_len)[..]);
        assert!(payload[self.payload_len..].iter().all(|&b| b == 0));
        let mut scratch = vec![0u8; packet.header_extension_len()];
        match &self.kind {
            SpecKind::InBand => assert_eq!(packet.packet_type(), PacketType::DATA_IN_BAND),
            SpecKind::Completion => assert_eq!(packet.packet_type(), PacketType::COMPLETION),
            SpecKind::GpaDirect(ranges) => {
                let parsed = packet.gpa_direct(&mut scratch).unwrap();
                assert_eq!(parsed.len(), ranges.len());
                for (range, &(count, offset)) in parsed.iter().zip(ranges) {
                    assert_eq!((range.byte_count, range.byte_offset), (count, offset));
                    let want: Vec<u64> =
                        (0..(count + offset).div_ceil(4096) as u64).map(|i| transaction_id * 100 + i).collect();
                    assert_eq!(range.pfns.iter().collect::<Vec<_>>(), want);
                }
            }
            SpecKind::TransferPages(id, owns, ranges) => {
                let parsed = packet.transfer_pages(&mut scratch).unwrap();
                assert_eq!((parsed.transfer_page_set_id, parsed.sender_owns), (*id, *owns));
                let got: Vec<(u32, u32)> = parsed.ranges().map(|r| (r.byte_count, r.byte_offset)).collect();
                assert_eq!(&got, ranges);
            }
        }
    }
}

fn packet_spec() -> impl Strategy<Value = PacketSpec> {
    let kind = prop_oneof![
        4 => Just(SpecKind::InBand),
        2 => Just(SpecKind::Completion),
        1 => proptest::collection::vec((1u32..9000, 0u32..0x1000), 0..3).prop_map(SpecKind::GpaDirect),
        1 => (any::<u16>(), any::<bool>(), proptest::collection::vec((any::<u32>(), any::<u32>()), 0..4))
            .prop_map(|(id, owns, ranges)| SpecKind::TransferPages(id, owns, ranges)),
    ];
    (kind, prop_oneof![3 => 0usize..48, 1 => 0usize..400], any::<bool>())
        .prop_map(|(kind, payload_len, completion_requested)| PacketSpec { kind, payload_len, completion_requested })
}

#[derive(Debug, Clone)]
enum Op {
    /// Push packets in one batch (stopping at the first that does not fit), then commit or drop the batch.
    Write {
        packets: Vec<PacketSpec>,
        commit: bool,
        request_space: bool,
    },
    /// Read up to `max` packets in one batch, then commit or drop it.
    Read {
        max: usize,
        commit: bool,
    },
    /// Push packets, drain the ring from the reader and commit that, then commit the writes.
    WriteAcrossRead {
        packets: Vec<PacketSpec>,
    },
    BeginDrain,
    EndDrain,
    ClearSpaceRequest,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (proptest::collection::vec(packet_spec(), 1..5), prop::bool::weighted(0.9), any::<bool>())
            .prop_map(|(packets, commit, request_space)| Op::Write { packets, commit, request_space }),
        4 => (1usize..6, prop::bool::weighted(0.9)).prop_map(|(max, commit)| Op::Read { max, commit }),
        1 => proptest::collection::vec(packet_spec(), 1..4).prop_map(|packets| Op::WriteAcrossRead { packets }),
        1 => Just(Op::BeginDrain),
        1 => Just(Op::EndDrain),
        1 => Just(Op::ClearSpaceRequest),
    ]
}

/// The model: the packets in the ring, their sizes, and the control fields that drive signalling.
struct Model {
    data_len: u32,
    queue: VecDeque<(PacketSpec, u64)>,
    used: u32,
    masked: bool,
    pending_send_size: u32,
    next_transaction_id: u64,
    write_index: u32,
    read_index: u32,
}

impl Model {
    fn free(&self) -> u32 {
        self.data_len - self.used
    }

    /// Runs `ops` against the ring and the model and compares them after every step.
    fn run(data_len: u32, ops: Vec<Op>) {
        let memory = new_ring(data_len as usize);
        let mut writer = RingWriter::new(&memory).unwrap();
        let mut reader = RingReader::new(&memory).unwrap();
        let mut model = Model {
            data_len,
            queue: VecDeque::new(),
            used: 0,
            masked: false,
            pending_send_size: 0,
            next_transaction_id: 1,
            write_index: 0,
            read_index: 0,
        };
        for op in ops {
            match op {
                Op::Write { packets, commit, request_space } => {
                    let mut batch = writer.batch();
                    let (pushed, full) = model.push_all(&mut batch, &packets);
                    if commit {
                        let signal = batch.commit().signal_peer;
                        model.publish(pushed, signal);
                        if let (Some(needed), true) = (full, request_space) {
                            let request = writer.request_space_signal(needed).unwrap();
                            model.pending_send_size = needed + 8;
                            let want =
                                if needed < model.free() { SpaceRequest::Available } else { SpaceRequest::Armed };
                            assert_eq!(request, want);
                        }
                    } else {
                        drop(batch);
                        model.next_transaction_id -= pushed.len() as u64;
                    }
                }
                Op::Read { max, commit } => {
                    let mut batch = reader.batch();
                    let mut count = 0;
                    while count < max {
                        let Some(packet) = batch.next_packet().unwrap() else {
                            break;
                        };
                        let (spec, id) = &model.queue[count];
                        spec.check(&packet, *id);
                        count += 1;
                    }
                    assert_eq!(count, max.min(model.queue.len()));
                    if commit {
                        let signal = batch.commit().unwrap().signal_peer;
                        model.consume(count, signal);
                    }
                }
                Op::WriteAcrossRead { packets } => {
                    let mut batch = writer.batch();
                    let (pushed, _) = model.push_all(&mut batch, &packets);
                    // The reader sees only what was published before.
                    let mut read = reader.batch();
                    let mut count = 0;
                    while let Some(packet) = read.next_packet().unwrap() {
                        let (spec, id) = &model.queue[count];
                        spec.check(&packet, *id);
                        count += 1;
                    }
                    assert_eq!(count, model.queue.len());
                    let signal = read.commit().unwrap().signal_peer;
                    model.consume(count, signal);
                    let signal = batch.commit().signal_peer;
                    model.publish(pushed, signal);
                }
                Op::BeginDrain => {
                    reader.begin_drain();
                    model.masked = true;
                }
                Op::EndDrain => {
                    let want = if model.queue.is_empty() { DrainEnd::Empty } else { DrainEnd::MoreData };
                    assert_eq!(reader.end_drain().unwrap(), want);
                    model.masked = false;
                }
                Op::ClearSpaceRequest => {
                    writer.clear_space_signal();
                    model.pending_send_size = 0;
                }
            }
            assert_eq!(memory.load_control(ControlField::WriteIndex), model.write_index);
            assert_eq!(memory.load_control(ControlField::ReadIndex), model.read_index);
            assert_eq!(memory.load_control(ControlField::InterruptMask), u32::from(model.masked));
            assert_eq!(memory.load_control(ControlField::PendingSendSize), model.pending_send_size);
            assert_eq!(reader.available().unwrap(), model.used);
            assert_eq!(writer.free_space().unwrap(), model.free());
        }
    }

    /// Pushes packets until one does not fit; returns those pushed and the size of the one that did not fit.
    fn push_all(
        &mut self,
        batch: &mut WriteBatch<'_, &OwnedRingMemory>,
        packets: &[PacketSpec],
    ) -> (Vec<(PacketSpec, u64)>, Option<u32>) {
        let mut pushed = Vec::new();
        let mut batch_used = 0;
        for spec in packets {
            let needed = spec.needed();
            let id = self.next_transaction_id;
            let result = spec.push(batch, id);
            if needed >= self.data_len {
                assert_eq!(result, Err(RingError::PacketTooLarge { needed: needed as usize }));
                continue;
            }
            let free = self.free() - batch_used;
            if needed < free {
                result.unwrap();
                batch_used += needed;
                self.next_transaction_id += 1;
                pushed.push((spec.clone(), id));
            } else {
                assert_eq!(result, Err(RingError::Full { needed, free }));
                return (pushed, Some(needed));
            }
        }
        (pushed, None)
    }

    /// Publishes `pushed` and checks the writer's signal: only when unmasked and the ring was empty.
    fn publish(&mut self, pushed: Vec<(PacketSpec, u64)>, signal: bool) {
        let want = !pushed.is_empty() && !self.masked && self.used == 0;
        assert_eq!(signal, want, "writer signal");
        for (spec, id) in pushed {
            let needed = spec.needed();
            self.used += needed;
            self.write_index = (self.write_index + needed) % self.data_len;
            self.queue.push_back((spec, id));
        }
    }

    /// Removes `count` read packets and checks the reader's signal: only when free space crossed the pending size.
    fn consume(&mut self, count: usize, signal: bool) {
        let free_before = self.free();
        for (spec, _) in self.queue.drain(..count) {
            let needed = spec.needed();
            self.used -= needed;
            self.read_index = (self.read_index + needed) % self.data_len;
        }
        let pending = self.pending_send_size & !7;
        let want = count > 0 && pending != 0 && free_before < pending && self.free() >= pending;
        assert_eq!(signal, want, "reader signal");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn ring_matches_model(
        data_len in prop_oneof![Just(64u32), Just(136), Just(256), Just(1024), Just(4096)],
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        Model::run(data_len, ops);
    }
}

/// A change a lying peer makes to the ring.
#[derive(Debug, Clone)]
enum Corruption {
    Control(ControlField, u32),
    /// A word somewhere in the data area.
    Word(usize, u64),
    /// A plausible descriptor somewhere in the data area.
    Descriptor(usize, u16, u16, u16),
    /// A plausible range header somewhere in the data area.
    RangeHeader(usize, u32, u32),
}

fn corruption() -> impl Strategy<Value = Corruption> {
    let field = prop_oneof![
        Just(ControlField::WriteIndex),
        Just(ControlField::ReadIndex),
        Just(ControlField::InterruptMask),
        Just(ControlField::PendingSendSize),
        Just(ControlField::FeatureBits),
    ];
    let value = prop_oneof![any::<u32>(), (0u32..300).prop_map(|v| v * 8), 0u32..2400];
    prop_oneof![
        2 => (field, value).prop_map(|(field, value)| Corruption::Control(field, value)),
        2 => (any::<usize>(), any::<u64>()).prop_map(|(at, word)| Corruption::Word(at, word)),
        3 => (any::<usize>(), prop_oneof![Just(6u16), Just(7), Just(9), Just(11), any::<u16>()], 0u16..12, 0u16..80)
            .prop_map(|(at, kind, offset8, len8)| Corruption::Descriptor(at, kind, offset8, len8)),
        2 => (any::<usize>(), prop_oneof![0u32..10, 0u32..20000, any::<u32>()], prop_oneof![0u32..0x1100, any::<u32>()])
            .prop_map(|(at, a, b)| Corruption::RangeHeader(at, a, b)),
    ]
}

#[derive(Debug, Clone)]
enum Step {
    Corrupt(Corruption),
    Write(PacketSpec),
    ReadAll,
    ReadSome(usize),
    Drain,
    RequestSpace(u32),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => corruption().prop_map(Step::Corrupt),
        3 => packet_spec().prop_map(Step::Write),
        2 => Just(Step::ReadAll),
        1 => (1usize..4).prop_map(Step::ReadSome),
        1 => Just(Step::Drain),
        1 => (0u32..5000).prop_map(Step::RequestSpace),
    ]
}

/// Reads up to `max` packets, touching every accessor, and commits. Errors are fine; panics are not.
fn read_everything(reader: &mut RingReader<&OwnedRingMemory>, max: usize) -> Result<(), RingError> {
    let data_len = reader.data_len() as usize;
    let mut batch = reader.batch();
    for _ in 0..max {
        let Some(packet) = batch.next_packet()? else {
            break;
        };
        assert!(packet.header_extension_len() + 16 + packet.payload_len() + 8 <= data_len);
        let mut payload = vec![0u8; packet.payload_len()];
        packet.read_payload(&mut payload)?;
        let _ = packet.read_payload_at(3, &mut payload[..packet.payload_len().saturating_sub(5)]);
        let mut scratch = vec![0u8; packet.header_extension_len()];
        if let Ok(ranges) = packet.gpa_direct(&mut scratch) {
            for range in ranges {
                assert!(range.byte_count != 0 && range.byte_offset <= 0xFFF);
                assert_eq!(
                    range.pfns.len() as u64,
                    (u64::from(range.byte_count) + u64::from(range.byte_offset)).div_ceil(4096)
                );
                assert_eq!(range.pfns.iter().count(), range.pfns.len());
            }
        }
        if let Ok(pages) = packet.transfer_pages(&mut scratch) {
            assert_eq!(pages.ranges().count(), pages.len());
        }
    }
    batch.commit().map(|_| ())
}

fn apply(memory: &OwnedRingMemory, corruption: &Corruption) {
    let words = memory.data().len() / 8;
    match *corruption {
        Corruption::Control(field, value) => memory.store_control(field, value),
        Corruption::Word(at, word) => memory.data().write(at % words * 8, &word.to_le_bytes()),
        Corruption::Descriptor(at, kind, offset8, len8) => {
            let at = at % words * 8;
            let bytes = descriptor(PacketType(kind), offset8, len8);
            memory.data().write(at, &bytes.as_bytes()[..8]);
        }
        Corruption::RangeHeader(at, a, b) => {
            memory.data().write(at % words * 8, [a, b].as_bytes());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// Whatever a lying peer writes, both sides return errors (or plausible packets) and never panic.
    #[test]
    fn corruption_yields_errors_not_panics(
        data_len in prop_oneof![Just(64usize), Just(256), Just(1024)],
        steps in proptest::collection::vec(step(), 1..50),
    ) {
        let memory = new_ring(data_len);
        let mut writer = RingWriter::new(&memory).unwrap();
        let mut reader = RingReader::new(&memory).unwrap();
        let mut transaction_id = 0;
        for step in &steps {
            match step {
                Step::Corrupt(corruption) => apply(&memory, corruption),
                Step::Write(spec) => {
                    let mut batch = writer.batch();
                    transaction_id += 1;
                    let _ = spec.push(&mut batch, transaction_id);
                    let _ = batch.commit();
                }
                Step::ReadAll => { let _ = read_everything(&mut reader, 64); }
                Step::ReadSome(count) => { let _ = read_everything(&mut reader, *count); }
                Step::Drain => {
                    reader.begin_drain();
                    let _ = read_everything(&mut reader, 64);
                    let _ = reader.end_drain();
                }
                Step::RequestSpace(needed) => {
                    let _ = writer.request_space_signal(*needed);
                    let _ = writer.free_space();
                }
            }
            // Fresh sides over the corrupted ring either refuse it or work.
            if let Ok(mut fresh) = RingReader::new(&memory) {
                let _ = read_everything(&mut fresh, 8);
            }
        }
        // The indices this side published are always valid.
        let read_index = memory.load_control(ControlField::ReadIndex);
        let write_index = memory.load_control(ControlField::WriteIndex);
        let own_writes_valid = !steps.iter().any(|s| matches!(s, Step::Corrupt(Corruption::Control(..))));
        if own_writes_valid {
            prop_assert!(read_index < data_len as u32 && read_index.is_multiple_of(8));
            prop_assert!(write_index < data_len as u32 && write_index.is_multiple_of(8));
        }
    }
}

#[cfg(feature = "std")]
#[test]
fn writer_and_reader_on_two_threads() {
    extern crate std;
    use alloc::sync::Arc;
    use std::thread;

    const PACKETS: u64 = 20_000;
    let memory = Arc::new(OwnedRingMemory::new(4096).unwrap());
    initialize_control_page(&*memory);
    let writer_memory = Arc::clone(&memory);
    let writer = thread::spawn(move || {
        let mut writer = RingWriter::new(writer_memory).unwrap();
        let mut id = 0;
        while id < PACKETS {
            let payload = payload_for(id, (id % 700) as usize);
            match writer.write(&OutgoingPacket::in_band(id, &payload)) {
                Ok(_) => id += 1,
                Err(RingError::Full { needed, .. }) => {
                    if writer.request_space_signal(needed).unwrap() == SpaceRequest::Armed {
                        thread::yield_now();
                    }
                    writer.clear_space_signal();
                }
                Err(error) => panic!("{error}"),
            }
        }
    });
    let mut reader = RingReader::new(Arc::clone(&memory)).unwrap();
    let mut expected = 0;
    let mut buffer = vec![0u8; 1024];
    while expected < PACKETS {
        reader.begin_drain();
        let mut batch = reader.batch();
        while let Some(packet) = batch.next_packet().unwrap() {
            let len = (expected % 700) as usize;
            assert_eq!(packet.transaction_id(), expected);
            assert_eq!(packet.payload_len(), round_up8(len));
            packet.read_payload(&mut buffer).unwrap();
            assert_eq!(&buffer[..len], &payload_for(expected, len)[..]);
            expected += 1;
        }
        let _ = batch.commit().unwrap();
        if reader.end_drain().unwrap() == DrainEnd::Empty {
            thread::yield_now();
        }
    }
    writer.join().unwrap();
    assert_eq!(reader.available().unwrap(), 0);
}
