//! The KMCL client layer end to end: the control plane through the crate's own VMBus server over the simulated
//! hypervisor ([`LoopbackBus`]), the data plane with the test playing the host's end of both rings through shared
//! [`OwnedRingMemory`].

use super::*;
use crate::channel::{ChannelRings, InterruptPages, RING_PAGE_SIZE};
use crate::client::{ConnectOptions, Connection};
use crate::protocol::{Guid, OfferFlags, device_class};
use crate::ring::{
    ControlField, OutgoingGpaRange, OutgoingKind, OutgoingPacket, OwnedRingMemory, PacketFlags, PacketType, RingMemory,
    RingReader, RingWriter,
};
use crate::server::{ChannelStatus, LoopbackBus, OfferSpec, ServerConfig};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use spin::Mutex;

type Mem = Arc<OwnedRingMemory>;

/// Rings in host memory; the test keeps the host's ends.
#[derive(Clone, Default)]
struct TestAllocator {
    state: Arc<Mutex<AllocState>>,
}

#[derive(Default)]
struct AllocState {
    /// (outgoing, incoming) of every allocation, in order.
    rings: Vec<(Mem, Mem)>,
    next_pfn: u64,
    /// `host_released` of every release, in order.
    released: Vec<bool>,
    /// Refuse allocations with this status.
    refuse: Option<NtStatus>,
}

impl RingAllocator for TestAllocator {
    type Memory = Mem;
    type Lease = usize;

    fn allocate(&self, outgoing_pages: u32, incoming_pages: u32) -> Result<(ChannelRings<Mem>, usize)> {
        let mut state = self.state.lock();
        if let Some(status) = state.refuse {
            return Err(status);
        }
        let ring = |pages: u32| Arc::new(OwnedRingMemory::new((pages as usize - 1) * RING_PAGE_SIZE as usize).unwrap());
        let (outgoing, incoming) = (ring(outgoing_pages), ring(incoming_pages));
        let total = u64::from(outgoing_pages + incoming_pages);
        let pfns = (0..total).map(|i| 0x5_0000 + state.next_pfn + i).collect();
        state.next_pfn += total + 16;
        state.rings.push((Arc::clone(&outgoing), Arc::clone(&incoming)));
        Ok((ChannelRings { outgoing, incoming, pfns, outgoing_pages }, state.rings.len() - 1))
    }

    fn release(&self, _lease: usize, host_released: bool) {
        self.state.lock().released.push(host_released);
    }
}

/// Interrupt pages that only count, and a monitor page 2 reduced to its latency fields.
#[derive(Default)]
struct Pages {
    interrupts: Mutex<u32>,
    latencies: Mutex<BTreeMap<u8, u16>>,
}

impl InterruptPages for Pages {
    fn set_send_interrupt(&self, _relid: u32) {
        *self.interrupts.lock() += 1;
    }
    fn set_monitor_pending(&self, _monitor_id: u8) {}
    fn exchange_monitor_latency(&self, monitor_id: u8, latency: u16) -> Option<u16> {
        Some(self.latencies.lock().insert(monitor_id, latency).unwrap_or(0))
    }
}

type TestBus = Bus<&'static LoopbackBus, Pages, TestAllocator>;

/// The host's ends of one channel's rings.
struct HostEnd {
    reader: RingReader<Mem>,
    writer: RingWriter<Mem>,
}

/// A packet as the host read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HostPacket {
    packet_type: PacketType,
    transaction_id: u64,
    completion_requested: bool,
    payload: Vec<u8>,
    /// GPA-direct ranges as (offset, count, pfns).
    ranges: Vec<(u32, u32, Vec<u64>)>,
}

impl HostEnd {
    fn new(allocator: &TestAllocator, index: usize) -> HostEnd {
        let state = allocator.state.lock();
        let (outgoing, incoming) = state.rings[index].clone();
        HostEnd { reader: RingReader::new(outgoing).unwrap(), writer: RingWriter::new(incoming).unwrap() }
    }

    fn read_all(&mut self) -> Vec<HostPacket> {
        let mut packets = Vec::new();
        let mut batch = self.reader.batch();
        while let Some(packet) = batch.next_packet().unwrap() {
            let mut payload = vec![0; packet.payload_len()];
            packet.read_payload(&mut payload).unwrap();
            let mut ranges = Vec::new();
            if packet.packet_type() == PacketType::DATA_USING_GPA_DIRECT {
                let mut scratch = vec![0; packet.header_extension_len()];
                for range in packet.gpa_direct(&mut scratch).unwrap().iter() {
                    ranges.push((range.byte_offset, range.byte_count, range.pfns.iter().collect()));
                }
            }
            packets.push(HostPacket {
                packet_type: packet.packet_type(),
                transaction_id: packet.transaction_id(),
                completion_requested: packet.completion_requested(),
                payload,
                ranges,
            });
        }
        let _ = batch.commit().unwrap();
        packets
    }

    fn send(&mut self, transaction_id: u64, payload: &[u8], completion_requested: bool) {
        let mut packet = OutgoingPacket::in_band(transaction_id, payload);
        if completion_requested {
            packet = packet.with_completion_requested();
        }
        let _ = self.writer.write(&packet).unwrap();
    }

    fn complete(&mut self, transaction_id: u64, payload: &[u8]) {
        let _ = self.writer.write(&OutgoingPacket::completion(transaction_id, payload)).unwrap();
    }
}

/// What the callbacks saw, in order.
type Log = Arc<Mutex<Vec<String>>>;

type PacketHook = Box<dyn FnMut(&mut dyn Kmcl, PacketCompletion, &[u8]) + Send>;
type ChannelHook = Box<dyn FnMut(&mut dyn Kmcl, ChannelHandle) + Send>;

/// Callbacks that log every call; `process_packet` completes at once with the payload echoed unless a hook or
/// `hold` says otherwise.
struct Recorder {
    log: Log,
    hold: Option<Arc<Mutex<Vec<PacketCompletion>>>>,
    on_packet: Option<PacketHook>,
    on_post_started: Option<ChannelHook>,
    on_closed: Option<ChannelHook>,
    refuse_open: Option<NtStatus>,
}

impl Recorder {
    fn new(log: &Log) -> Recorder {
        Recorder {
            log: Arc::clone(log),
            hold: None,
            on_packet: None,
            on_post_started: None,
            on_closed: None,
            refuse_open: None,
        }
    }
}

impl ChannelCallbacks for Recorder {
    fn opened(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) -> Result<()> {
        self.log.lock().push("opened".into());
        let Some(status) = self.refuse_open else { return Ok(()) };
        // A driver that gets half way: a GPADL, then an error. The rollback must delete the GPADL.
        kmcl.channel_create_gpadl_from_pfn_list(channel, GpadlFlags::NONE, &[0x321], 0, 4096)?;
        Err(status)
    }
    fn started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.log.lock().push("started".into());
    }
    fn post_started(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        self.log.lock().push("post_started".into());
        if let Some(hook) = self.on_post_started.as_mut() {
            hook(kmcl, channel);
        }
    }
    fn suspend(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.log.lock().push("suspend".into());
    }
    fn closed(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        self.log.lock().push("closed".into());
        if let Some(hook) = self.on_closed.as_mut() {
            hook(kmcl, channel);
        }
    }
    fn pnp_failure(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle, status: NtStatus) {
        self.log.lock().push(format!("pnp_failure {status}"));
    }
    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        _channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        flags: ProcessPacketFlags,
    ) {
        let text = String::from_utf8_lossy(buffer).trim_end_matches('\0').to_string();
        self.log.lock().push(format!("packet {text} flags {}", flags.0));
        if let Some(hook) = self.on_packet.as_mut() {
            hook(kmcl, packet, buffer);
        } else if let Some(held) = &self.hold {
            held.lock().push(packet);
        } else {
            kmcl.packet_complete(packet, buffer).unwrap();
        }
    }
    fn processing_complete(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle, packets_processed: u32) {
        self.log.lock().push(format!("processing_complete {packets_processed}"));
    }
}

const INSTANCE: Guid = Guid::from_fields(0xEC0, 1, 2, [3, 4, 5, 6, 7, 8, 9, 10]);

struct World {
    host: &'static LoopbackBus,
    allocator: TestAllocator,
    bus: TestBus,
    log: Log,
}

/// A loopback host offering one heartbeat-class channel (relid 1) and a bus connected to it.
fn world_with(offers: &[OfferSpec]) -> World {
    let host: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::new(ServerConfig::new())));
    for spec in offers {
        host.offer(spec.clone()).unwrap();
    }
    let mut connection = Connection::connect(host, ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))).unwrap();
    connection.request_offers().unwrap();
    let allocator = TestAllocator::default();
    let bus = Bus::new(connection, Pages::default(), allocator.clone());
    World { host, allocator, bus, log: Log::default() }
}

fn world() -> World {
    world_with(&[OfferSpec::new(device_class::HEARTBEAT, INSTANCE)])
}

impl World {
    /// A channel set up as the real guest sequence does, not yet enabled.
    fn channel(&mut self, recorder: Recorder) -> ChannelHandle {
        let channel = self.bus.channel_allocate().unwrap();
        self.bus.channel_init_set_maximum_packet_size(channel, 256).unwrap();
        self.bus.channel_init_set_ring_buffer_page_count(channel, 2, 2).unwrap();
        self.bus.channel_init_set_callbacks(channel, Box::new(recorder)).unwrap();
        self.bus.channel_init_set_target(channel, device_class::HEARTBEAT, Some(INSTANCE)).unwrap();
        self.bus.channel_init_set_friendly_name(channel, "test channel").unwrap();
        channel
    }

    /// An enabled, started channel and the host's ends of its rings.
    fn started(&mut self, recorder: Recorder) -> (ChannelHandle, HostEnd) {
        let channel = self.channel(recorder);
        self.bus.channel_enable(channel).unwrap();
        assert_eq!(self.bus.channel_state(channel), Ok(ChannelState::Active));
        let index = self.allocator.state.lock().rings.len() - 1;
        (channel, HostEnd::new(&self.allocator, index))
    }

    fn take_log(&self) -> Vec<String> {
        core::mem::take(&mut *self.log.lock())
    }

    fn server_status(&self, relid: u32) -> Option<ChannelStatus> {
        self.host.with_server(|server| server.channel(relid).map(|c| c.status))
    }
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| String::from(*s)).collect()
}

#[test]
fn lifecycle_callbacks_run_in_the_documented_order_and_packets_echo() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, mut host) = w.started(Recorder::new(&log));
    assert_eq!(w.take_log(), strings(&["opened", "started", "post_started"]));
    assert_eq!(w.server_status(1), Some(ChannelStatus::Open));
    assert_eq!(w.bus.channel_relid(channel), Ok(1));
    assert_eq!(w.bus.channel_interface_instance(channel), Ok(INSTANCE));
    assert_eq!(w.bus.channel_offer(channel).unwrap().interface_type, device_class::HEARTBEAT);

    host.send(7, b"ping", true);
    host.send(8, b"pong", false);
    assert_eq!(w.bus.process_interrupt(&[1]), 2);
    assert_eq!(w.take_log(), strings(&["packet ping flags 0", "packet pong flags 0", "processing_complete 2"]));
    let answers = host.read_all();
    assert_eq!(answers.len(), 1, "only the packet that asked gets a completion");
    assert_eq!(answers[0].packet_type, PacketType::COMPLETION);
    assert_eq!(answers[0].transaction_id, 7);
    assert_eq!(&answers[0].payload[..4], b"ping");

    w.bus.channel_disable(channel).unwrap();
    assert_eq!(w.take_log(), strings(&["suspend", "closed"]));
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Disabled));
    w.host.run_host();
    assert_eq!(w.server_status(1), Some(ChannelStatus::Closed));
    assert_eq!(w.host.with_server(|s| s.gpadl_handles().count()), 0, "the ring GPADL was torn down");
    assert_eq!(w.allocator.state.lock().released, [true]);

    // Enable again: the same offer binds again.
    w.bus.channel_enable(channel).unwrap();
    assert_eq!(w.take_log(), strings(&["opened", "started", "post_started"]));
    w.bus.channel_disable(channel).unwrap();
    w.bus.channel_cleanup(channel).unwrap();
    assert_eq!(w.bus.channel_state(channel), Err(NtStatus::INVALID_PARAMETER_1), "stale after cleanup");
    assert_eq!(w.bus.channel_count(), 0);
    let again = w.bus.channel_allocate().unwrap();
    assert_ne!(again, channel, "the slot is reused with a new generation");
    assert_eq!(w.bus.channel_state(channel), Err(NtStatus::INVALID_PARAMETER_1));
}

#[test]
fn an_enabled_channel_waits_for_its_offer_and_binds_on_hot_add() {
    let mut w = world_with(&[]);
    let log = Arc::clone(&w.log);
    let channel = w.channel(Recorder::new(&log));
    w.bus.channel_enable(channel).unwrap();
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Enabled));
    assert_eq!(w.bus.poll(), 0);
    assert!(w.take_log().is_empty());
    // Another class, and the right class with another instance, do not match.
    w.host.offer(OfferSpec::new(device_class::KVP, INSTANCE)).unwrap();
    w.host.offer(OfferSpec::new(device_class::HEARTBEAT, Guid::from_fields(1, 1, 1, [1; 8]))).unwrap();
    w.bus.poll();
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Enabled));
    let relid = w.host.offer(OfferSpec::new(device_class::HEARTBEAT, INSTANCE)).unwrap();
    w.bus.poll();
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Active));
    assert_eq!(w.bus.channel_relid(channel), Ok(relid));
    assert_eq!(w.take_log(), strings(&["opened", "started", "post_started"]));
    // Disabling an enabled-but-unbound channel needs no callbacks.
    let waiting = w.channel(Recorder::new(&log));
    w.bus.channel_enable(waiting).unwrap();
    assert_eq!(w.bus.channel_state(waiting), Ok(ChannelState::Enabled), "the only matching offer is taken");
    w.bus.channel_disable(waiting).unwrap();
    assert_eq!(w.bus.channel_state(waiting), Ok(ChannelState::Disabled));
    assert_eq!(w.take_log(), strings(&["opened", "started", "post_started"]).split_off(3));
}

#[test]
fn a_pipe_channel_binds_only_to_a_pipe_offer_and_no_channel_to_a_sub_channel() {
    let mut pipe = OfferSpec::new(device_class::HEARTBEAT, INSTANCE);
    pipe.flags = OfferFlags::NAMED_PIPE_MODE;
    let mut sub = OfferSpec::new(device_class::HEARTBEAT, INSTANCE);
    sub.sub_channel_index = 1;
    let mut w = world_with(&[sub, OfferSpec::new(device_class::HEARTBEAT, INSTANCE), pipe]);
    let log = Arc::clone(&w.log);
    let channel = w.channel(Recorder::new(&log));
    w.bus.channel_init_set_flags(channel, ChannelInitFlags::IS_PIPE).unwrap();
    w.bus.channel_init_set_target_vp(channel, 0).unwrap();
    w.bus.channel_enable(channel).unwrap();
    assert_eq!(w.bus.channel_relid(channel), Ok(3));
    assert_eq!(w.bus.channel_init_set_target_vp(channel, 1), Err(NtStatus::INVALID_PARAMETER_1));
    let plain = w.channel(Recorder::new(&log));
    w.bus.channel_init_set_target_vp(plain, 3).unwrap();
    w.bus.channel_enable(plain).unwrap();
    assert_eq!(w.bus.channel_relid(plain), Ok(2), "the primary channel, not the sub-channel at relid 1");
    assert_eq!(w.host.with_server(|s| s.open_channel_info(2).map(|info| info.target_vp)), Some(3));
}

#[test]
fn sub_channels_bind_to_their_primarys_sub_channel_offers_once_it_is_open() {
    let other = Guid::from_fields(0xEC2, 1, 2, [3, 4, 5, 6, 7, 8, 9, 10]);
    let sub = |instance: Guid, index: u16| {
        let mut spec = OfferSpec::new(device_class::HEARTBEAT, instance);
        spec.sub_channel_index = index;
        spec
    };
    // relid 1: another device's sub-channel; 2: the primary; 3, 4: its sub-channels.
    let offers = [sub(other, 1), sub(INSTANCE, 0), sub(INSTANCE, 1), sub(INSTANCE, 2)];
    let mut w = world_with(&offers);
    let log = Arc::clone(&w.log);
    let primary = w.channel(Recorder::new(&log));
    let subs: Vec<ChannelHandle> = (0..3)
        .map(|_| {
            let channel = w.bus.channel_allocate().unwrap();
            w.bus.channel_init_set_callbacks(channel, Box::new(Recorder::new(&log))).unwrap();
            w.bus.channel_init_set_primary_channel(channel, primary).unwrap();
            channel
        })
        .collect();
    // Statuses: the channel itself, a sub-channel as primary, a stale primary, and too late.
    assert_eq!(w.bus.channel_init_set_primary_channel(primary, primary), Err(NtStatus::INVALID_PARAMETER_2));
    assert_eq!(w.bus.channel_init_set_primary_channel(primary, subs[0]), Err(NtStatus::INVALID_PARAMETER_2));
    let gone = w.bus.channel_allocate().unwrap();
    w.bus.channel_cleanup(gone).unwrap();
    assert_eq!(w.bus.channel_init_set_primary_channel(subs[2], gone), Err(NtStatus::INVALID_PARAMETER_2));

    // A sub-channel enabled before its primary waits for it.
    w.bus.channel_enable(subs[0]).unwrap();
    w.bus.poll();
    assert_eq!(w.bus.channel_state(subs[0]), Ok(ChannelState::Enabled));
    w.bus.channel_enable(primary).unwrap();
    assert_eq!(w.bus.channel_relid(primary), Ok(2), "the primary offer, not a sub-channel");
    w.bus.poll();
    assert_eq!(w.bus.channel_state(subs[0]), Ok(ChannelState::Active));
    w.bus.channel_enable(subs[1]).unwrap();
    w.bus.channel_enable(subs[2]).unwrap();
    w.bus.poll();
    let mut bound = vec![w.bus.channel_relid(subs[0]).unwrap(), w.bus.channel_relid(subs[1]).unwrap()];
    bound.sort_unstable();
    assert_eq!(bound, [3, 4], "the primary's two sub-channel offers, never the other device's");
    assert_eq!(w.bus.channel_state(subs[2]), Ok(ChannelState::Enabled), "no sub-channel offer is left");
    assert_eq!(w.bus.channel_init_set_primary_channel(subs[0], primary), Err(NtStatus::INVALID_PARAMETER_1));
    // A sub-channel reports the device it belongs to.
    assert_eq!(w.bus.channel_offer(subs[0]).map(|offer| offer.interface_instance), Ok(INSTANCE));
}

#[test]
fn mmio_space_is_carved_at_open_and_given_back_at_close() {
    let wants = |instance: Guid, megabytes: u16| {
        let mut spec = OfferSpec::new(device_class::HEARTBEAT, instance);
        spec.mmio_megabytes = megabytes;
        spec
    };
    let (first, second, none) =
        (INSTANCE, Guid::from_fields(0xEC3, 0, 0, [0; 8]), Guid::from_fields(0xEC4, 0, 0, [0; 8]));
    let mut w = world_with(&[wants(first, 4), wants(second, 2), wants(none, 0)]);
    let window = MmioRange { base: 0xf800_0000, size: 5 * mmio::MIB };
    w.bus.set_mmio_allocator(Some(Box::new(MmioWindow::new(window))));
    let log = Arc::clone(&w.log);
    let open = |w: &mut World, instance: Guid| {
        let channel = w.channel(Recorder::new(&log));
        w.bus.channel_init_set_target(channel, device_class::HEARTBEAT, Some(instance)).unwrap();
        assert_eq!(w.bus.channel_mmio_space(channel), Err(NtStatus::INVALID_PARAMETER_1), "not open");
        w.bus.channel_enable(channel).unwrap();
        assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Active));
        channel
    };
    let a = open(&mut w, first);
    assert_eq!(w.bus.channel_mmio_space(a), Ok(MmioRange { base: 0xf800_0000, size: 4 * mmio::MIB }));
    let b = open(&mut w, second);
    assert_eq!(w.bus.channel_mmio_space(b), Err(NtStatus::INSUFFICIENT_RESOURCES), "1 MiB left for 2");
    let c = open(&mut w, none);
    assert_eq!(w.bus.channel_mmio_space(c), Err(NtStatus::NOT_FOUND), "the offer asks for none");
    // Closing gives the space back: the next open gets it.
    w.bus.channel_disable(a).unwrap();
    assert_eq!(w.bus.channel_mmio_space(a), Err(NtStatus::INVALID_PARAMETER_1));
    w.bus.channel_disable(b).unwrap();
    w.bus.channel_enable(b).unwrap();
    assert_eq!(w.bus.channel_mmio_space(b), Ok(MmioRange { base: 0xf800_0000, size: 2 * mmio::MIB }));
}

#[test]
fn interrupt_latency_is_set_for_a_monitored_open_channel_only() {
    let mut monitored = OfferSpec::new(device_class::HEARTBEAT, INSTANCE);
    monitored.monitored = true;
    let plain_instance = Guid::from_fields(0xEC1, 1, 2, [3, 4, 5, 6, 7, 8, 9, 10]);
    let mut w = world_with(&[monitored, OfferSpec::new(device_class::HEARTBEAT, plain_instance)]);
    let log = Arc::clone(&w.log);
    let channel = w.channel(Recorder::new(&log));
    assert_eq!(w.bus.channel_set_interrupt_latency(channel, 50), Err(NtStatus::INVALID_PARAMETER_1), "no rings yet");
    w.bus.channel_enable(channel).unwrap();
    let monitor_id = w.bus.channel_offer(channel).unwrap().monitor_id.expect("the offer is monitored");
    assert_eq!(w.bus.channel_set_interrupt_latency(channel, 50), Ok(0), "the page starts zeroed");
    assert_eq!(w.bus.channel_set_interrupt_latency(channel, 1000), Ok(50), "the previous latency comes back");
    assert_eq!(w.bus.pages().latencies.lock().get(&monitor_id), Some(&1000));

    let plain = w.channel(Recorder::new(&log));
    w.bus.channel_init_set_target(plain, device_class::HEARTBEAT, Some(plain_instance)).unwrap();
    w.bus.channel_enable(plain).unwrap();
    assert_eq!(w.bus.channel_state(plain), Ok(ChannelState::Active));
    assert_eq!(
        w.bus.channel_set_interrupt_latency(plain, 50),
        Err(NtStatus::NOT_SUPPORTED),
        "an event-signalled channel has no MNF latency"
    );
    w.bus.channel_disable(channel).unwrap();
    assert_eq!(w.bus.channel_set_interrupt_latency(channel, 50), Err(NtStatus::INVALID_PARAMETER_1), "closed");
}

#[test]
fn every_init_set_and_state_rule_returns_its_documented_status() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let b = &mut w.bus;
    let ch = b.channel_allocate().unwrap();
    const P1: NtStatus = NtStatus::INVALID_PARAMETER_1;
    const P2: NtStatus = NtStatus::INVALID_PARAMETER_2;
    const P3: NtStatus = NtStatus::INVALID_PARAMETER_3;
    // Bad arguments while disabled.
    assert_eq!(b.channel_init_set_maximum_packet_size(ch, 0), Err(P2));
    assert_eq!(b.channel_init_set_maximum_packet_size(ch, channel::MAX_PACKET_SIZE_LIMIT + 1), Err(P2));
    assert_eq!(b.channel_init_set_maximum_external_data(ch, 0, 4), Err(P2));
    assert_eq!(b.channel_init_set_maximum_external_data(ch, 8192, 0), Err(P3));
    assert_eq!(b.channel_init_set_maximum_external_data(ch, 8192, 1), Err(P3), "two pages cannot be one PFN");
    assert_eq!(b.channel_init_set_maximum_external_data(ch, 8192, channel::MAX_EXTERNAL_CHAIN_LENGTH + 1), Err(P3));
    assert_eq!(b.channel_init_set_client_context_size(ch, channel::MAX_CLIENT_CONTEXT_SIZE + 1), Err(P2));
    assert_eq!(b.channel_init_set_flags(ch, ChannelInitFlags(0x2)), Err(P2));
    assert_eq!(b.channel_init_set_friendly_name(ch, &"x".repeat(bus::MAX_FRIENDLY_NAME_LEN + 1)), Err(P2));
    assert_eq!(b.channel_init_set_ring_buffer_page_count(ch, 1, 4), Err(P2));
    assert_eq!(b.channel_init_set_ring_buffer_page_count(ch, 4, 1), Err(P3));
    assert_eq!(b.channel_init_set_ring_buffer_page_count(ch, 4, channel::MAX_RING_PAGES + 1), Err(P3));
    assert_eq!(b.channel_init_set_maximum_packet_count(ch, 0), Err(P2));
    assert_eq!(b.channel_set_transaction_quota(ch, 0), Err(P2));
    // Wrong state while disabled.
    assert_eq!(b.channel_enable(ch), Err(P1), "no callbacks, no target");
    b.channel_init_set_target(ch, device_class::HEARTBEAT, None).unwrap();
    assert_eq!(b.channel_enable(ch), Err(P1), "no callbacks");
    assert_eq!(b.channel_pause(ch), Err(P1));
    assert_eq!(b.channel_start(ch), Err(P1));
    assert_eq!(b.channel_interface_instance(ch), Err(P1), "no instance known yet");
    assert_eq!(b.channel_offer(ch).err(), Some(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(b.channel_send_synchronous_request(ch, b"x", None, SendFlags::NONE, None, None), Err(P1));
    assert_eq!(b.channel_create_gpadl_from_pfn_list(ch, GpadlFlags::NONE, &[1], 0, 4096).err(), Some(P1));
    let packet = b.packet_allocate(ch).unwrap();
    assert_eq!(b.packet_send(packet, b"x", None, SendFlags::NONE), Err(NtStatus::INVALID_DEVICE_STATE));
    b.packet_free(packet).unwrap();
    // Good values, then enable: every InitSet* is now _1.
    b.channel_init_set_maximum_external_data(ch, 8192, 3).unwrap();
    b.channel_init_set_client_context_size(ch, 16).unwrap();
    b.channel_init_set_flags(ch, ChannelInitFlags::NONE).unwrap();
    b.channel_init_set_maximum_packet_count(ch, 4).unwrap();
    b.channel_init_set_callbacks(ch, Box::new(Recorder::new(&log))).unwrap();
    b.channel_enable(ch).unwrap();
    assert_eq!(b.channel_state(ch), Ok(ChannelState::Active));
    assert_eq!(b.channel_enable(ch), Err(P1));
    assert_eq!(b.channel_init_set_maximum_packet_size(ch, 128), Err(P1));
    assert_eq!(b.channel_init_set_maximum_external_data(ch, 4096, 2), Err(P1));
    assert_eq!(b.channel_init_set_client_context_size(ch, 8), Err(P1));
    assert_eq!(b.channel_init_set_flags(ch, ChannelInitFlags::NONE), Err(P1));
    assert_eq!(b.channel_init_set_friendly_name(ch, "late"), Err(P1));
    assert_eq!(b.channel_init_set_callbacks(ch, Box::new(Recorder::new(&log))), Err(P1));
    assert_eq!(b.channel_init_set_ring_buffer_page_count(ch, 4, 4), Err(P1));
    assert_eq!(b.channel_init_set_target(ch, device_class::KVP, None), Err(P1));
    assert_eq!(b.channel_init_set_maximum_packet_count(ch, 8), Err(P1));
    assert_eq!(b.channel_cleanup(ch), Err(P1), "cleanup needs a disabled channel");
    // Any-state functions keep working.
    b.channel_set_transaction_quota(ch, 3).unwrap();
    let context: Context = Arc::new(42u32);
    b.channel_set_pointer(ch, Some(context)).unwrap();
    let back = b.channel_pointer(ch).unwrap().unwrap();
    assert_eq!(back.downcast_ref::<u32>(), Some(&42));
    // Sync request argument checks on an open channel.
    assert_eq!(b.channel_send_synchronous_request(ch, &[0; 4097], None, SendFlags::NONE, None, None), Err(P3));
    let bad_external = [ExternalRange { byte_offset: 0, byte_count: 3 * 4096, pfns: vec![1, 2, 3] }];
    assert_eq!(
        b.channel_send_synchronous_request(ch, b"x", Some(&bad_external), SendFlags::NONE, None, None),
        Err(NtStatus::INVALID_PARAMETER_4),
        "above the maximum external data"
    );
    assert_eq!(
        b.channel_send_synchronous_request(ch, b"x", None, SendFlags(0x8), None, None),
        Err(NtStatus::INVALID_PARAMETER_5)
    );
    let mut odd = [0u8; 12];
    assert_eq!(
        b.channel_send_synchronous_request(ch, b"x", None, SendFlags::WAIT_FOR_COMPLETION, Some(&mut odd), None),
        Err(NtStatus::INVALID_PARAMETER_7)
    );
    // Pause and start.
    assert_eq!(b.channel_start(ch), Ok(()), "start on a started channel changes nothing");
    b.channel_pause(ch).unwrap();
    assert_eq!(b.channel_pause(ch), Err(P1));
    b.channel_start(ch).unwrap();
    // Stale and forged handles.
    let forged = ChannelHandle::from_raw(ch.to_raw().0, ch.to_raw().1 + 1);
    assert_eq!(b.channel_state(forged), Err(P1));
    assert_eq!(b.channel_state(ChannelHandle::from_raw(99, 1)), Err(P1));
    assert_eq!(b.channel_disable(forged), Err(P1));
    b.channel_disable(ch).unwrap();
    assert_eq!(b.channel_disable(ch), Ok(()), "disabling a disabled channel is harmless");
    b.channel_cleanup(ch).unwrap();
    assert_eq!(b.channel_cleanup(ch), Err(P1));
    assert_eq!(b.channel_init_set_maximum_packet_size(ch, 64), Err(P1));
    assert_eq!(
        w.take_log(),
        strings(&["opened", "started", "post_started", "suspend", "started", "post_started", "suspend", "closed"])
    );
}

#[test]
fn packet_initialize_follows_the_seed_page_and_needs_a_completion_routine() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, mut host) = w.started(Recorder::new(&log));
    let size = w.bus.channel_sizeof_packet(channel).unwrap();
    assert_eq!(size, packet::sizeof_packet(256));
    let pointer = size_of::<usize>() as u32;
    for short in [0, 256, 256 + pointer, size - 1] {
        assert_eq!(
            w.bus.packet_initialize(channel, vec![0u8; short as usize].into_boxed_slice()),
            Err(NtStatus::INVALID_PARAMETER_3),
            "{short} bytes"
        );
    }
    let packet = w.bus.packet_initialize(channel, vec![0u8; size as usize + 5].into_boxed_slice()).unwrap();
    assert_eq!(w.bus.packet_channel(packet), Ok(channel));
    assert_eq!(w.bus.packet_send(packet, b"early", None, SendFlags::NONE), Err(NtStatus::INVALID_PARAMETER_1));
    assert!(host.read_all().is_empty(), "nothing was sent");

    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    w.bus
        .packet_set_completion_routine(
            packet,
            Box::new(move |_kmcl, packet, status, payload| record.lock().push((packet, status, payload.to_vec()))),
        )
        .unwrap();
    w.bus.packet_set_pointer(packet, Some(Arc::new("mine"))).unwrap();
    w.bus.packet_send(packet, b"hello", None, SendFlags::NONE).unwrap();
    assert_eq!(*seen.lock(), [(packet, NtStatus::SUCCESS, vec![])], "no WAIT: complete once in the ring");
    let sent = host.read_all();
    assert_eq!((sent[0].packet_type, sent[0].completion_requested), (PacketType::DATA_IN_BAND, false));
    assert_eq!(&sent[0].payload[..5], b"hello");
    assert_eq!(w.bus.packet_pointer(packet).unwrap().unwrap().downcast_ref::<&str>(), Some(&"mine"));
    // The caller's memory comes back whole.
    let memory = w.bus.packet_free(packet).unwrap().unwrap();
    assert_eq!(memory.len(), size as usize + 5);
    // An inline packet context makes the packet larger.
    let second = w.bus.channel_allocate().unwrap();
    w.bus.channel_init_set_maximum_packet_size(second, 256).unwrap();
    assert_eq!(w.bus.channel_init_set_inline_packet_context_size(second, 1 << 20), Err(NtStatus::INVALID_PARAMETER_2));
    w.bus.channel_init_set_inline_packet_context_size(second, 24).unwrap();
    assert_eq!(w.bus.channel_sizeof_packet(second), Ok(size + 24));
    assert_eq!(
        w.bus.packet_initialize(second, vec![0u8; size as usize].into_boxed_slice()),
        Err(NtStatus::INVALID_PARAMETER_3)
    );
    let with_context = w.bus.packet_initialize(second, vec![0u8; size as usize + 24].into_boxed_slice()).unwrap();
    let area = w.bus.packet_inline_context(with_context).unwrap();
    assert_eq!(area.len(), 24);
    area[0] = 9;
    assert_eq!(w.bus.packet_inline_context(with_context).unwrap()[0], 9);
    assert_eq!(w.bus.packet_allocate(second).map(|p| w.bus.packet_inline_context(p).map(|a| a.len())), Ok(Ok(24)));
    assert_eq!(w.bus.packet_free(packet), Err(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(w.bus.packet_pointer(packet).err(), Some(NtStatus::INVALID_PARAMETER_1));
}

#[test]
fn the_packet_pool_is_bounded_and_the_default_routine_frees() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let channel = w.channel(Recorder::new(&log));
    w.bus.channel_init_set_maximum_packet_count(channel, 2).unwrap();
    w.bus.channel_enable(channel).unwrap();
    let mut host = HostEnd::new(&w.allocator, 0);
    let a = w.bus.packet_allocate(channel).unwrap();
    let b = w.bus.packet_allocate(channel).unwrap();
    assert_eq!(w.bus.packet_allocate(channel), Err(NtStatus::INSUFFICIENT_RESOURCES));
    assert_eq!(w.bus.packet_free(a), Ok(None));
    let c = w.bus.packet_allocate(channel).unwrap();
    assert_ne!(a, c, "a freed packet's handle is not reused as is");
    // Sent without WAIT, the default routine frees it once it is in the ring.
    w.bus.packet_send(b, b"fire and forget", None, SendFlags::NONE).unwrap();
    assert_eq!(w.bus.packet_channel(b), Err(NtStatus::INVALID_PARAMETER_1));
    w.bus.packet_allocate(channel).unwrap();
    assert_eq!(w.bus.packet_allocate(channel), Err(NtStatus::INSUFFICIENT_RESOURCES));
    // Sent with WAIT, it stays in flight (cannot be freed) until the host completes it.
    w.bus.packet_send(c, b"wait", None, SendFlags::WAIT_FOR_COMPLETION).unwrap();
    assert_eq!(w.bus.packet_free(c), Err(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(w.bus.packet_send(c, b"again", None, SendFlags::NONE), Err(NtStatus::INVALID_PARAMETER_1));
    let sent = host.read_all();
    assert_eq!(sent.len(), 2);
    assert!(sent[1].completion_requested);
    host.complete(sent[1].transaction_id, b"done");
    w.bus.poll();
    assert_eq!(w.bus.packet_channel(c), Err(NtStatus::INVALID_PARAMETER_1), "freed by the default routine");
    w.bus.packet_allocate(channel).unwrap();
}

#[test]
fn completions_are_matched_by_transaction_id_and_a_lying_host_is_counted() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, mut host) = w.started(Recorder::new(&log));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut packets = Vec::new();
    for name in ["first", "second", "third"] {
        let packet = w.bus.packet_allocate(channel).unwrap();
        let record = Arc::clone(&seen);
        w.bus
            .packet_set_completion_routine(
                packet,
                Box::new(move |kmcl, packet, status, payload| {
                    record.lock().push((name, status, payload.to_vec()));
                    kmcl.packet_free(packet).unwrap();
                }),
            )
            .unwrap();
        w.bus.packet_send(packet, name.as_bytes(), None, SendFlags::WAIT_FOR_COMPLETION).unwrap();
        packets.push(packet);
    }
    let sent = host.read_all();
    let ids: Vec<u64> = sent.iter().map(|p| p.transaction_id).collect();
    assert!(ids[0] != ids[1] && ids[1] != ids[2]);
    // Out of order, one forged id, one duplicate, one far too long.
    host.complete(ids[2], b"3!");
    host.complete(0xDEAD_BEEF, b"forged");
    host.complete(ids[0], b"1!");
    host.complete(ids[0], b"1 again");
    host.complete(ids[1], &[0xAB; 400]);
    w.bus.poll();
    let seen = seen.lock().clone();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0], ("third", NtStatus::SUCCESS, b"3!\0\0\0\0\0\0".to_vec()));
    assert_eq!(seen[1], ("first", NtStatus::SUCCESS, b"1!\0\0\0\0\0\0".to_vec()));
    assert_eq!(seen[2].0, "second");
    assert_eq!(seen[2].1, NtStatus::BUFFER_OVERFLOW);
    assert_eq!(seen[2].2.len(), 256, "cut at the maximum packet size");
    let stats = w.bus.stats();
    assert_eq!((stats.unknown_completions, stats.oversized_completions), (2, 1));
    for packet in packets {
        assert_eq!(w.bus.packet_channel(packet), Err(NtStatus::INVALID_PARAMETER_1));
    }
}

#[test]
fn a_synchronous_request_waits_for_its_completion_and_queues_other_packets() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, host) = w.started(Recorder::new(&log));
    w.take_log();
    let host = Arc::new(Mutex::new(host));
    let player = Arc::clone(&host);
    // The host answers the request with a data packet first, then the completion.
    w.bus.set_idle_hook(Some(Box::new(move || {
        let mut host = player.lock();
        for request in host.read_all() {
            host.send(100, b"unrelated", false);
            let mut answer = request.payload.clone();
            answer.reverse();
            host.complete(request.transaction_id, &answer);
        }
    })));
    let mut completion = [0u8; 16];
    let n = w
        .bus
        .channel_send_synchronous_request(
            channel,
            b"12345678",
            None,
            SendFlags::WAIT_FOR_COMPLETION,
            Some(&mut completion),
            Some(1_000_000_000),
        )
        .unwrap();
    assert_eq!(&completion[..n], b"87654321");
    assert!(w.take_log().is_empty(), "the data packet waits: no callback ran inside the request");
    w.bus.poll();
    assert_eq!(w.take_log(), strings(&["packet unrelated flags 0", "processing_complete 1"]));

    // Without WAIT_FOR_COMPLETION it returns once the packet is in the ring.
    w.bus.set_idle_hook(None);
    assert_eq!(w.bus.channel_send_synchronous_request(channel, b"note", None, SendFlags::NONE, None, Some(0)), Ok(0));
    assert!(!host.lock().read_all()[0].completion_requested);
}

#[test]
fn a_synchronous_request_from_post_started_negotiates_before_traffic() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let allocator = w.allocator.clone();
    let answer = Arc::new(Mutex::new(None));
    let result = Arc::clone(&answer);
    let mut recorder = Recorder::new(&log);
    recorder.on_post_started = Some(Box::new(move |kmcl, channel| {
        let mut reply = [0u8; 8];
        let status = kmcl.channel_send_synchronous_request(
            channel,
            b"version?",
            None,
            SendFlags::WAIT_FOR_COMPLETION,
            Some(&mut reply),
            Some(50_000_000),
        );
        *result.lock() = Some((status, reply));
    }));
    w.bus.set_idle_hook(Some(Box::new(move || {
        let Some(rings) = allocator.state.lock().rings.last().cloned() else { return };
        let mut reader = RingReader::new(rings.0).unwrap();
        let mut writer = RingWriter::new(rings.1).unwrap();
        let mut batch = reader.batch();
        let mut ids = Vec::new();
        while let Some(packet) = batch.next_packet().unwrap() {
            ids.push(packet.transaction_id());
        }
        let _ = batch.commit().unwrap();
        for id in ids {
            let _ = writer.write(&OutgoingPacket::in_band(5, b"early")).unwrap();
            let _ = writer.write(&OutgoingPacket::completion(id, b"v4")).unwrap();
        }
    })));
    let channel = w.channel(recorder);
    w.bus.channel_enable(channel).unwrap();
    let (status, reply) = answer.lock().take().unwrap();
    assert_eq!(status, Ok(8));
    assert_eq!(&reply[..2], b"v4");
    assert_eq!(
        w.take_log(),
        strings(&["opened", "started", "post_started", "packet early flags 0", "processing_complete 1"]),
        "the packet that came during PostStarted is delivered after it returns"
    );
}

#[test]
fn synchronous_request_timeout_overflow_and_removal() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, mut host) = w.started(Recorder::new(&log));
    w.take_log();
    // Nobody answers: cancelled at the timeout (Windows cancels the packet when the time is up).
    let start = w.host.now_ns();
    let timeout = 20_000_000;
    let mut reply = [0u8; 8];
    assert_eq!(
        w.bus.channel_send_synchronous_request(
            channel,
            b"hello?",
            None,
            SendFlags::WAIT_FOR_COMPLETION,
            Some(&mut reply),
            Some(timeout)
        ),
        Err(NtStatus::CANCELLED)
    );
    let waited = w.host.now_ns() - start;
    assert!((timeout..timeout + 2 * crate::server::loopback::WAIT_NS).contains(&waited), "{waited}");
    // Its completion arrives late and is dropped.
    let request = host.read_all();
    host.complete(request[0].transaction_id, b"late");
    w.bus.poll();
    assert_eq!(w.bus.stats().late_completions, 1);
    assert_eq!(w.bus.stats().unknown_completions, 0);

    // Fill the outgoing ring (the host does not read): with timeout 0 the request is not queued.
    let big = [0x55u8; 256];
    let mut sent = 0;
    while w.bus.channel_send_synchronous_request(channel, &big, None, SendFlags::NONE, None, Some(0)).is_ok() {
        sent += 1;
    }
    assert!(sent > 5, "{sent}");
    assert_eq!(
        w.bus.channel_send_synchronous_request(channel, &big, None, SendFlags::NONE, None, Some(0)),
        Err(NtStatus::BUFFER_OVERFLOW)
    );
    assert_eq!(host.read_all().len(), sent, "the refused request is not in the ring");

    // The host rescinds the channel while a request waits: DEVICE_REMOVED, then Suspend and Closed.
    let loopback = w.host;
    let relid = w.bus.channel_relid(channel).unwrap();
    w.bus.set_idle_hook(Some(Box::new(move || {
        let _ = loopback.rescind(relid);
    })));
    assert_eq!(
        w.bus.channel_send_synchronous_request(channel, b"bye", None, SendFlags::WAIT_FOR_COMPLETION, None, None),
        Err(NtStatus::DEVICE_REMOVED)
    );
    w.bus.set_idle_hook(None);
    assert_eq!(
        w.bus.channel_send_synchronous_request(channel, b"bye", None, SendFlags::NONE, None, None),
        Err(NtStatus::DEVICE_REMOVED),
        "known rescinded before the callbacks ran"
    );
    w.bus.poll();
    assert_eq!(w.take_log(), strings(&["suspend", "closed"]));
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Closed));
    assert_eq!(
        w.bus.channel_send_synchronous_request(channel, b"bye", None, SendFlags::NONE, None, None),
        Err(NtStatus::DEVICE_REMOVED)
    );
}

#[test]
fn the_transaction_quota_blocks_the_queue_until_packets_complete() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let held = Arc::new(Mutex::new(Vec::new()));
    let mut recorder = Recorder::new(&log);
    recorder.hold = Some(Arc::clone(&held));
    let (channel, mut host) = w.started(recorder);
    w.take_log();
    w.bus.channel_set_transaction_quota(channel, 2).unwrap();
    for (id, name) in [b"p1", b"p2", b"p3", b"p4", b"p5"].iter().enumerate() {
        host.send(id as u64 + 1, *name, true);
    }
    assert_eq!(w.bus.poll(), 2);
    assert_eq!(w.take_log(), strings(&["packet p1 flags 0", "packet p2 flags 0"]));
    let first = held.lock().remove(0);
    assert_eq!(w.bus.packet_transaction_id(first), Ok(1));
    w.bus.packet_complete(first, b"ok").unwrap();
    assert_eq!(w.take_log(), strings(&["packet p3 flags 0"]), "the blocked queue restarted on completion");
    assert_eq!(w.bus.packet_complete(first, b"ok"), Err(NtStatus::INVALID_PARAMETER_1), "completed twice");
    assert_eq!(w.bus.packet_complete(held.lock()[0], &[0; 257]), Err(NtStatus::INVALID_PARAMETER_2));
    // Raising the quota lets the rest through.
    w.bus.channel_set_transaction_quota(channel, 10).unwrap();
    assert_eq!(w.take_log(), strings(&["packet p4 flags 0", "packet p5 flags 0", "processing_complete 2"]));
    for packet in held.lock().drain(..) {
        w.bus.packet_complete(packet, b"ok").unwrap();
    }
    let completions = host.read_all();
    let mut ids: Vec<u64> = completions.iter().map(|c| c.transaction_id).collect();
    ids.sort();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    assert!(completions.iter().all(|c| c.packet_type == PacketType::COMPLETION));
}

#[test]
fn packet_fail_stops_the_queue_and_pause_holds_it() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let mut recorder = Recorder::new(&log);
    recorder.on_packet = Some(Box::new(|kmcl, packet, buffer| {
        if buffer.starts_with(b"bad") {
            kmcl.packet_fail(packet).unwrap();
        } else {
            kmcl.packet_complete(packet, &[]).unwrap();
        }
    }));
    let (channel, mut host) = w.started(recorder);
    w.take_log();
    // Paused: nothing is delivered until start.
    w.bus.channel_pause(channel).unwrap();
    host.send(1, b"good", false);
    w.bus.poll();
    assert_eq!(w.take_log(), strings(&["suspend"]));
    w.bus.channel_start(channel).unwrap();
    assert_eq!(w.take_log(), strings(&["started", "packet good flags 0", "processing_complete 1", "post_started"]));
    // A failed packet stops the queue.
    host.send(2, b"bad", true);
    host.send(3, b"after", false);
    w.bus.poll();
    assert_eq!(w.take_log(), strings(&["packet bad flags 0"]));
    assert!(host.read_all().is_empty(), "a failed packet gets no completion");
    host.send(4, b"later", false);
    assert_eq!(w.bus.poll(), 0);
    // Completions of the driver's own requests are still matched.
    let player = Arc::new(Mutex::new(HostEnd::new(&w.allocator, 0)));
    w.bus.set_idle_hook(Some(Box::new(move || {
        let mut host = player.lock();
        for request in host.read_all() {
            host.complete(request.transaction_id, b"still here");
        }
    })));
    let mut reply = [0u8; 16];
    assert_eq!(
        w.bus.channel_send_synchronous_request(
            channel,
            b"ping",
            None,
            SendFlags::WAIT_FOR_COMPLETION,
            Some(&mut reply),
            Some(10_000_000)
        ),
        Ok(16)
    );
    w.bus.set_idle_hook(None);
    // Disable and enable again: the queue runs again.
    w.bus.channel_disable(channel).unwrap();
    w.bus.channel_enable(channel).unwrap();
    let mut host = HostEnd::new(&w.allocator, 1);
    host.send(5, b"fresh", false);
    w.bus.poll();
    assert_eq!(
        w.take_log(),
        strings(&[
            "suspend",
            "closed",
            "opened",
            "started",
            "post_started",
            "packet fresh flags 0",
            "processing_complete 1"
        ])
    );
}

#[test]
fn rescind_mid_traffic_suspends_cancels_and_closes_then_releases_the_relid() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let held = Arc::new(Mutex::new(Vec::new()));
    let mut recorder = Recorder::new(&log);
    recorder.hold = Some(Arc::clone(&held));
    recorder.on_closed = Some(Box::new(|kmcl, channel| {
        // The driver's duty at Closed: delete its GPADLs (it kept one in the pointer).
        let gpadl = kmcl.channel_pointer(channel).unwrap().unwrap();
        let gpadl = *gpadl.downcast_ref::<GpadlHandle>().unwrap();
        kmcl.channel_delete_gpadl(channel, gpadl).unwrap();
    }));
    let (channel, mut host) = w.started(recorder);
    w.take_log();
    let gpadl = w.bus.channel_create_gpadl_from_pfn_list(channel, GpadlFlags::NONE, &[0x900, 0x901], 0, 8192).unwrap();
    w.bus.channel_set_pointer(channel, Some(Arc::new(gpadl))).unwrap();
    // Traffic both ways: one incoming packet held, one outgoing waiting for its completion.
    host.send(1, b"in flight", true);
    w.bus.poll();
    let outgoing = w.bus.packet_allocate(channel).unwrap();
    let cancelled = Arc::new(Mutex::new(None));
    let record = Arc::clone(&cancelled);
    w.bus
        .packet_set_completion_routine(outgoing, Box::new(move |_, _, status, _| *record.lock() = Some(status)))
        .unwrap();
    w.bus.packet_send(outgoing, b"request", None, SendFlags::WAIT_FOR_COMPLETION).unwrap();

    w.host.rescind(1).unwrap();
    w.bus.poll();
    assert_eq!(w.take_log(), strings(&["packet in flight flags 0", "processing_complete 1", "suspend", "closed"]));
    assert_eq!(*cancelled.lock(), Some(NtStatus::CANCELLED));
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Closed));
    assert_eq!(w.bus.packet_complete(held.lock()[0], b""), Err(NtStatus::INVALID_PARAMETER_1), "gone with the channel");
    assert_eq!(w.bus.stats().leaked_gpadls, 0);
    w.host.run_host();
    assert_eq!(w.server_status(1), None, "RELID_RELEASED reached the host");
    assert_eq!(w.allocator.state.lock().released, [true]);
    // The driver frees its packet; the closed channel is re-enabled and binds when the device comes back.
    w.bus.packet_free(outgoing).unwrap();
    w.bus.channel_enable(channel).unwrap();
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Enabled));
    let relid = w.host.offer(OfferSpec::new(device_class::HEARTBEAT, INSTANCE)).unwrap();
    w.bus.poll();
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Active));
    assert_eq!(w.bus.channel_relid(channel), Ok(relid));
    assert_eq!(w.take_log(), strings(&["opened", "started", "post_started"]));
}

#[test]
fn gpadls_left_at_closed_are_deleted_and_counted() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, _host) = w.started(Recorder::new(&log));
    let gpadl = w.bus.channel_create_gpadl_from_pfn_list(channel, GpadlFlags::READ_ONLY, &[0x700], 16, 100).unwrap();
    assert_eq!(w.bus.gpadl_is_read_only(gpadl), Ok(true));
    assert!(w.host.with_server(|s| s.gpadl(gpadl.id()).is_some()));
    w.bus.channel_disable(channel).unwrap();
    assert_eq!(w.bus.stats().leaked_gpadls, 1);
    w.host.run_host();
    assert!(w.host.with_server(|s| s.gpadl(gpadl.id()).is_none()));
    assert_eq!(w.bus.gpadl_is_read_only(gpadl), Err(NtStatus::INVALID_PARAMETER_1));
}

/// A buffer whose pages the test knows.
struct Buffer {
    pfns: Vec<u64>,
    offset: u32,
    len: u32,
}

impl PhysicalBuffer for Buffer {
    fn pfns(&self) -> &[u64] {
        &self.pfns
    }
    fn byte_offset(&self) -> u32 {
        self.offset
    }
    fn byte_count(&self) -> u32 {
        self.len
    }
}

#[test]
fn gpadl_create_and_delete_with_their_statuses() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, _host) = w.started(Recorder::new(&log));
    let b = &mut w.bus;
    let none = GpadlFlags::NONE;
    assert_eq!(
        b.channel_create_gpadl_from_pfn_list(channel, GpadlFlags(2), &[1], 0, 10).err(),
        Some(NtStatus::INVALID_PARAMETER_2)
    );
    assert_eq!(
        b.channel_create_gpadl_from_pfn_list(channel, none, &[], 0, 10).err(),
        Some(NtStatus::INVALID_PARAMETER_3)
    );
    assert_eq!(
        b.channel_create_gpadl_from_pfn_list(channel, none, &[1], 4096, 10).err(),
        Some(NtStatus::INVALID_PARAMETER_4)
    );
    assert_eq!(
        b.channel_create_gpadl_from_pfn_list(channel, none, &[1], 0, 0).err(),
        Some(NtStatus::INVALID_PARAMETER_5)
    );
    assert_eq!(
        b.channel_create_gpadl_from_pfn_list(channel, none, &[1], 4000, 200).err(),
        Some(NtStatus::INVALID_PARAMETER_5)
    );
    let bad = Buffer { pfns: vec![1], offset: 0, len: 8192 };
    assert_eq!(b.channel_create_gpadl_from_buffer(channel, none, &bad).err(), Some(NtStatus::INVALID_PARAMETER_3));
    let good = Buffer { pfns: vec![0x800, 0x801], offset: 4000, len: 200 };
    let gpadl = b.channel_create_gpadl_from_buffer(channel, none, &good).unwrap();
    assert_eq!(b.gpadl_is_read_only(gpadl), Ok(false));
    assert_eq!(gpadl.channel(), channel);
    let pages = w.host.with_server(|s| s.gpadl(gpadl.id()).map(|g| g.gpadl.ranges.clone()));
    assert!(pages.is_some());
    let b = &mut w.bus;
    let other = b.channel_allocate().unwrap();
    assert_eq!(b.channel_delete_gpadl(other, gpadl), Err(NtStatus::INVALID_PARAMETER_2));
    b.channel_delete_gpadl(channel, gpadl).unwrap();
    assert_eq!(b.channel_delete_gpadl(channel, gpadl), Err(NtStatus::INVALID_PARAMETER_2));
    w.host.run_host();
    assert!(w.host.with_server(|s| s.gpadl(gpadl.id()).is_none()));
}

#[test]
fn external_data_goes_out_and_comes_in_as_gpa_direct_ranges() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&ranges);
    let mut recorder = Recorder::new(&log);
    recorder.on_packet = Some(Box::new(move |kmcl, packet, _| {
        record.lock().push(kmcl.packet_external_data(packet));
        kmcl.packet_client_context(packet).unwrap()[0] = 1;
        kmcl.packet_complete(packet, &[]).unwrap();
    }));
    let channel = w.channel(recorder);
    w.bus.channel_init_set_maximum_external_data(channel, 3 * 4096, 4).unwrap();
    w.bus.channel_init_set_client_context_size(channel, 8).unwrap();
    w.bus.channel_enable(channel).unwrap();
    let mut host = HostEnd::new(&w.allocator, 0);

    let packet = w.bus.packet_allocate(channel).unwrap();
    assert_eq!(
        w.bus.packet_send_with_external_pfns(packet, b"hdr", &[1, 2], SendFlags::NONE),
        Err(NtStatus::INVALID_PARAMETER_6),
        "WAIT_FOR_COMPLETION must be set"
    );
    assert_eq!(
        w.bus.packet_send_with_external_pfns(packet, b"hdr", &[1, 2, 3, 4, 5], SendFlags::WAIT_FOR_COMPLETION),
        Err(NtStatus::INVALID_PARAMETER_4)
    );
    w.bus.packet_send_with_external_pfns(packet, b"hdr", &[0xA1, 0xA2], SendFlags::WAIT_FOR_COMPLETION).unwrap();
    let bad = [ExternalRange { byte_offset: 0, byte_count: 4097, pfns: vec![1] }];
    let other = w.bus.packet_allocate(channel).unwrap();
    assert_eq!(w.bus.packet_send(other, b"x", Some(&bad), SendFlags::NONE), Err(NtStatus::INVALID_PARAMETER_4));
    let sent = host.read_all();
    assert_eq!(sent[0].packet_type, PacketType::DATA_USING_GPA_DIRECT);
    assert_eq!(sent[0].ranges, [(0, 8192, vec![0xA1, 0xA2])]);

    // The host sends a GPA-direct packet and an in-band one.
    let pfns = [0xB1u64, 0xB2];
    let range = [OutgoingGpaRange { byte_count: 5000, byte_offset: 100, pfns: &pfns }];
    let incoming = OutgoingPacket {
        kind: OutgoingKind::GpaDirect(&range),
        flags: PacketFlags::NONE,
        transaction_id: 9,
        payload: b"ext",
    };
    let _ = host.writer.write(&incoming).unwrap();
    host.send(10, b"plain", false);
    w.bus.poll();
    assert_eq!(
        *ranges.lock(),
        [Ok(vec![ExternalRange { byte_offset: 100, byte_count: 5000, pfns: pfns.to_vec() }]), Err(NtStatus::NOT_FOUND)]
    );
    assert_eq!(w.take_log()[3..5], strings(&["packet ext flags 1", "packet plain flags 0"]));
}

#[test]
fn a_lying_host_gets_errors_not_panics() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, mut host) = w.started(Recorder::new(&log));
    w.take_log();
    // A packet above the maximum packet size is dropped; the next one still arrives.
    host.send(1, &[b'x'; 300], true);
    host.send(2, b"fine", false);
    w.bus.poll();
    assert_eq!(w.take_log(), strings(&["packet fine flags 0", "processing_complete 1"]));
    assert_eq!(w.bus.stats().oversized_packets, 1);
    // A GPA-direct packet on a channel that takes no external data is dropped too.
    let pfns = [1u64];
    let range = [OutgoingGpaRange { byte_count: 10, byte_offset: 0, pfns: &pfns }];
    let _ = host
        .writer
        .write(&OutgoingPacket {
            kind: OutgoingKind::GpaDirect(&range),
            flags: PacketFlags::NONE,
            transaction_id: 3,
            payload: b"",
        })
        .unwrap();
    // A packet type a client does not take.
    let _ = host
        .writer
        .write(&OutgoingPacket {
            kind: OutgoingKind::Other(PacketType::CANCEL_REQUEST),
            flags: PacketFlags::NONE,
            transaction_id: 4,
            payload: b"",
        })
        .unwrap();
    w.bus.poll();
    assert_eq!((w.bus.stats().oversized_packets, w.bus.stats().unexpected_packets), (2, 1));
    // A corrupt write index stops the queue; nothing panics and the channel can still be torn down.
    let incoming = w.allocator.state.lock().rings[0].1.clone();
    incoming.store_control(ControlField::WriteIndex, 12345);
    w.bus.poll();
    w.bus.process_interrupt(&[1, 99, 2047]);
    assert_eq!(w.bus.stats().ring_errors, 1);
    assert!(w.take_log().is_empty());
    w.bus.channel_disable(channel).unwrap();
    assert_eq!(w.take_log(), strings(&["suspend", "closed"]));
}

#[test]
fn a_failed_open_rolls_back_and_a_refused_allocation_reports_pnp_failure() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let mut refusing = Recorder::new(&log);
    refusing.refuse_open = Some(NtStatus::NOT_SUPPORTED);
    let channel = w.channel(refusing);
    w.bus.channel_enable(channel).unwrap();
    assert_eq!(w.take_log(), strings(&["opened"]));
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Closed));
    w.host.run_host();
    assert_eq!(w.server_status(1), Some(ChannelStatus::Closed));
    assert_eq!(w.host.with_server(|s| s.gpadl_handles().count()), 0, "ring and driver GPADLs torn down");
    assert_eq!(w.bus.stats().leaked_gpadls, 1);
    assert_eq!(w.allocator.state.lock().released, [true]);
    w.bus.channel_disable(channel).unwrap();
    assert_eq!(w.bus.channel_state(channel), Ok(ChannelState::Disabled));
    assert!(w.take_log().is_empty(), "a channel that never started is not suspended or closed");

    w.allocator.state.lock().refuse = Some(NtStatus::INSUFFICIENT_RESOURCES);
    let second = w.channel(Recorder::new(&log));
    w.bus.channel_enable(second).unwrap();
    assert_eq!(w.take_log(), [format!("pnp_failure {}", NtStatus::INSUFFICIENT_RESOURCES)]);
    assert_eq!(w.bus.channel_state(second), Ok(ChannelState::Closed));
}

#[test]
fn a_full_ring_queues_sends_and_flushes_them_when_the_host_reads() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, mut host) = w.started(Recorder::new(&log));
    let placed = Arc::new(Mutex::new(0u32));
    let mut packets = Vec::new();
    for _ in 0..40 {
        let packet = w.bus.packet_allocate(channel).unwrap();
        let count = Arc::clone(&placed);
        w.bus
            .packet_set_completion_routine(
                packet,
                Box::new(move |kmcl, packet, status, _| {
                    assert_eq!(status, NtStatus::SUCCESS);
                    *count.lock() += 1;
                    kmcl.packet_free(packet).unwrap();
                }),
            )
            .unwrap();
        packets.push(packet);
    }
    for packet in &packets {
        w.bus.packet_send(*packet, &[7u8; 200], None, SendFlags::NONE).unwrap();
    }
    let in_ring = *placed.lock();
    assert!(in_ring < 40, "a 4 KiB ring holds fewer than 40 packets of 224 bytes");
    let mut seen = host.read_all().len();
    assert_eq!(seen as u32, in_ring);
    assert!(w.allocator.state.lock().rings[0].0.load_control(ControlField::PendingSendSize) > 0, "space asked for");
    while seen < 40 {
        w.bus.process_interrupt(&[1]);
        let more = host.read_all().len();
        assert!(more > 0);
        seen += more;
    }
    w.bus.poll();
    assert_eq!(*placed.lock(), 40);
}

#[test]
fn handles_of_every_kind_are_checked() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let (channel, mut host) = w.started(Recorder::new(&log));
    let packet = w.bus.packet_allocate(channel).unwrap();
    let forged = PacketHandle { channel, index: packet.index, generation: packet.generation + 1 };
    assert_eq!(w.bus.packet_channel(forged), Err(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(w.bus.packet_send(forged, b"x", None, SendFlags::NONE), Err(NtStatus::INVALID_PARAMETER_1));
    let stray = PacketCompletion { channel, index: 5, generation: 1 };
    assert_eq!(w.bus.packet_complete(stray, b""), Err(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(w.bus.packet_fail(stray), Err(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(w.bus.packet_external_data(stray), Err(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(w.bus.packet_client_context(stray).err(), Some(NtStatus::INVALID_PARAMETER_1));
    let gone = ChannelHandle::from_raw(40, 1);
    let in_gone = PacketHandle { channel: gone, index: 0, generation: 1 };
    assert_eq!(w.bus.packet_free(in_gone), Err(NtStatus::INVALID_PARAMETER_1));
    assert_eq!(w.bus.packet_allocate(gone).err(), Some(NtStatus::INVALID_PARAMETER_1));
    // Bad arguments to a valid packet: nothing is sent and the packet stays usable.
    assert_eq!(w.bus.packet_send(packet, &[0; 257], None, SendFlags::NONE), Err(NtStatus::INVALID_PARAMETER_3));
    assert_eq!(w.bus.packet_send(packet, b"x", None, SendFlags(0x10)), Err(NtStatus::INVALID_PARAMETER_5));
    let external = [ExternalRange::whole_pages(&[1])];
    assert_eq!(
        w.bus.packet_send(packet, b"x", Some(&external), SendFlags::NONE),
        Err(NtStatus::INVALID_PARAMETER_4),
        "this channel takes no external data"
    );
    // A valid packet keeps working.
    w.bus.packet_send(packet, b"ok", None, SendFlags::NONE).unwrap();
    assert_eq!(host.read_all().len(), 1);
}

#[test]
fn deferred_packets_and_task_only_channels_are_delivered_from_poll() {
    let mut w = world();
    let log = Arc::clone(&w.log);
    let mut recorder = Recorder::new(&log);
    recorder.on_packet = Some(Box::new(|kmcl, packet, buffer| {
        if buffer.starts_with(b"defer") && kmcl.packet_defer_to_task(packet).is_ok() {
            return;
        }
        kmcl.packet_complete(packet, b"done").unwrap();
    }));
    let (channel, mut host) = w.started(recorder);
    w.take_log();
    host.send(1, b"defer me", true);
    host.send(2, b"plain", false);
    assert_eq!(w.bus.process_interrupt(&[1]), 0, "the deferred packet is not counted as delivered");
    assert_eq!(w.take_log(), strings(&["packet defer me flags 0"]), "later packets keep their place behind it");
    assert!(host.read_all().is_empty());
    // Task context: the same packet again (deferring is refused there), then the next one.
    assert_eq!(w.bus.poll(), 2);
    assert_eq!(w.take_log(), strings(&["packet defer me flags 0", "packet plain flags 0", "processing_complete 2"]));
    let completions = host.read_all();
    assert_eq!((completions.len(), completions[0].transaction_id), (1, 1));
    assert_eq!(
        w.bus.packet_defer_to_task(PacketCompletion { channel, index: 0, generation: 1 }),
        Err(NtStatus::INVALID_PARAMETER_1)
    );

    w.bus.channel_set_incoming_processing_in_task(channel, true).unwrap();
    host.send(3, b"at passive", false);
    assert_eq!(w.bus.process_interrupt(&[1]), 0);
    assert!(w.take_log().is_empty());
    assert_eq!(w.bus.poll(), 1);
    assert_eq!(w.take_log(), strings(&["packet at passive flags 0", "processing_complete 1"]));
}

/// The echo device's host end (created once the channel is open) and the echoes it collected.
type EchoDevice = (Option<HostEnd>, Vec<Vec<u8>>);

/// The example echo device's side: answers the hello with version 1 and pings with the payload reversed, and
/// collects the driver's echoes.
fn echo_device_turn(host: &mut HostEnd, echoes: &mut Vec<Vec<u8>>) {
    for packet in host.read_all() {
        if packet.payload.starts_with(b"ECHO") {
            host.complete(packet.transaction_id, &1u32.to_le_bytes());
        } else if packet.completion_requested {
            let mut answer = packet.payload.clone();
            answer.reverse();
            host.complete(packet.transaction_id, &answer);
        } else {
            echoes.push(packet.payload);
        }
    }
}

#[test]
fn the_example_echo_driver_end_to_end() {
    let mut w = world_with(&[OfferSpec::new(echo::ECHO_INTERFACE_TYPE, INSTANCE)]);
    let device: Arc<Mutex<EchoDevice>> = Arc::default();
    let (player, allocator) = (Arc::clone(&device), w.allocator.clone());
    w.bus.set_idle_hook(Some(Box::new(move || {
        let mut device = player.lock();
        let (host, echoes) = &mut *device;
        let host = host.get_or_insert_with(|| HostEnd::new(&allocator, 0));
        echo_device_turn(host, echoes);
    })));
    let (channel, state) = echo::EchoDriver::start(&mut w.bus, None, 0x4242).unwrap();
    assert_eq!(state.lock().version, Some(1));
    assert_eq!(state.lock().events, ["opened", "started", "post_started"]);
    let gpadl = state.lock().shared_gpadl.unwrap();
    assert!(w.host.with_server(|s| s.gpadl(gpadl.id()).is_some()), "the shared page is described to the host");
    let pointer = w.bus.channel_pointer(channel).unwrap().unwrap();
    assert!(pointer.downcast_ref::<Mutex<echo::EchoState>>().is_some(), "the state is the channel's pointer");

    // The driver pings the device.
    let mut answer = [0u8; 16];
    let len = echo::EchoDriver::ping(&mut w.bus, channel, b"abcdefgh", &mut answer).unwrap();
    assert_eq!(&answer[..len], b"hgfedcba");

    // The device sends: one packet asking for a completion (echoed in it), one not (echoed as a packet).
    {
        let mut device = device.lock();
        let host = device.0.as_mut().unwrap();
        host.send(1, b"with completion", true);
        host.send(2, b"without", false);
    }
    w.bus.process_interrupt(&[w.bus.channel_relid(channel).unwrap()]);
    let mut device = device.lock();
    let (host, echoes) = &mut *device;
    let host = host.as_mut().unwrap();
    let back = host.read_all();
    assert_eq!(back.len(), 2);
    assert_eq!((back[0].packet_type, back[0].transaction_id), (PacketType::COMPLETION, 1));
    assert_eq!(&back[0].payload[..15], b"with completion");
    assert_eq!(back[1].packet_type, PacketType::DATA_IN_BAND);
    assert_eq!(&back[1].payload[..7], b"without");
    assert!(echoes.is_empty());
    drop(device);
    assert_eq!(state.lock().echoed, 2);

    echo::EchoDriver::stop(&mut w.bus, channel).unwrap();
    assert_eq!(state.lock().events, ["opened", "started", "post_started", "suspend", "closed"]);
    assert_eq!(w.bus.stats().leaked_gpadls, 0, "the driver deleted its GPADL at closed");
    w.host.run_host();
    assert_eq!(w.host.with_server(|s| s.gpadl_handles().count()), 0);
    assert_eq!(w.bus.channel_count(), 0);
}

/// A kernel keeps its bus in a static mutex, so the bus must be `Send` (checked at compile time).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<TestBus>();
};
