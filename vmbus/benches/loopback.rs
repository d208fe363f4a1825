//! Loopback round-trip benchmark: the stack figure of `shared/bench/ring-workload.md`.
//!
//! A 64-byte in-band request (completion requested) and its 64-byte completion, through the guest's
//! `channel::Channel` → ring in guest memory (`memory::PageArena`) → the server's `ServerEndpoint` → completion →
//! ring → the guest, over the simulated hypervisor of `server::LoopbackBus`, on one thread. Each round the guest
//! writes B requests (publishing them at once for B > 1), signals the host as the ring rules say (HvSignalEvent);
//! the host looks at the channels that were signalled, drains the request ring, writes the B completions and signals
//! the guest (its SINT 2 event flag) as the rules say; the guest takes its event flags and drains the completions,
//! copying each payload out.
//!
//! Printed per B: round trips per second and ns per round trip (median of ~10 ms slices over at least a second, the
//! machine being shared), guest hypercalls (PostMessage + SignalEvent) per 1000 round trips, and host → guest
//! signals per 1000 round trips.
//!
//! Run with `cargo bench -p vmbus --bench loopback`.

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use vmbus::channel::{Channel, InterruptPages};
use vmbus::client::{ConnectOptions, Connection};
use vmbus::memory::{ArenaRing, PageArena};
use vmbus::protocol::{Guid, device_class};
use vmbus::ring::{OutgoingPacket, PacketType};
use vmbus::server::{LoopbackBus, OfferSpec, ServerConfig, ServerEndpoint};

/// Minimum measured time per configuration.
const MEASURE: Duration = Duration::from_secs(1);
/// Unmeasured warm-up per configuration.
const WARM_UP: Duration = Duration::from_millis(200);
/// Target length of one timed slice.
const SLICE: Duration = Duration::from_millis(10);
/// Request and completion payload size.
const PAYLOAD: usize = 64;
/// Pages of each ring (control page included).
const RING_PAGES: u32 = 4;

/// The guest's interrupt page: counts the relid bits set before each signal.
#[derive(Default)]
struct Pages {
    bits: Cell<u64>,
}

impl InterruptPages for Pages {
    fn set_send_interrupt(&self, _relid: u32) {
        self.bits.set(self.bits.get() + 1);
    }
    fn set_monitor_pending(&self, _monitor_id: u8) {}
}

struct Bench {
    bus: &'static LoopbackBus,
    conn: Connection<&'static LoopbackBus>,
    pages: Pages,
    channel: Channel<ArenaRing>,
    endpoint: ServerEndpoint<PageArena>,
    batch: usize,
    next_id: u64,
    payload: Vec<u8>,
    buffer: Vec<u8>,
    /// Transaction ids the host read this round.
    ids: Vec<u64>,
}

impl Bench {
    fn new(batch: usize) -> Bench {
        let arena = PageArena::new(0x10_0000, 64);
        let bus: &'static LoopbackBus =
            Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
        let relid = bus.offer(OfferSpec::new(device_class::HEARTBEAT, Guid::from_fields(1, 2, 3, [4; 8]))).unwrap();
        let mut conn = Connection::connect(bus, ConnectOptions::new(0x1000, (0x2000, 0x3000))).unwrap();
        conn.request_offers().unwrap();
        let rings = arena.channel_rings(RING_PAGES, RING_PAGES).unwrap();
        let channel = Channel::open(&mut conn, relid, rings, 0, &[]).unwrap();
        let endpoint = bus.take_endpoint(relid).unwrap();
        Bench {
            bus,
            conn,
            pages: Pages::default(),
            channel,
            endpoint,
            batch,
            next_id: 0,
            payload: (0..PAYLOAD).map(|i| (i * 13 + 5) as u8).collect(),
            buffer: vec![0u8; PAYLOAD],
            ids: Vec::with_capacity(batch),
        }
    }

    /// One round of B round trips; returns the completions the guest read.
    #[inline(always)]
    fn round(&mut self) -> usize {
        // Guest: B requests, published together.
        let transport = self.conn.transport();
        if self.batch == 1 {
            let request = OutgoingPacket::in_band(self.next_id, &self.payload).with_completion_requested();
            let _ = self.channel.send(&request, transport, &self.pages).unwrap();
        } else {
            let requests: Vec<OutgoingPacket<'_>> = (0..self.batch as u64)
                .map(|i| OutgoingPacket::in_band(self.next_id + i, &self.payload).with_completion_requested())
                .collect();
            assert_eq!(self.channel.send_batch(&requests, transport, &self.pages).unwrap(), self.batch);
        }
        self.next_id += self.batch as u64;

        // Host: serve the signalled channel.
        for _relid in self.bus.take_signalled_channels() {
            self.ids.clear();
            let ids = &mut self.ids;
            let buffer = &mut self.buffer;
            self.endpoint
                .receive(self.bus, |packet, _| {
                    packet.read_payload(buffer).unwrap();
                    black_box(&buffer);
                    ids.push(packet.transaction_id());
                })
                .unwrap();
            if self.ids.len() == 1 {
                let _ = self.endpoint.send_completion(self.ids[0], &self.payload, self.bus).unwrap();
            } else {
                let completions: Vec<OutgoingPacket<'_>> =
                    self.ids.iter().map(|&id| OutgoingPacket::completion(id, &self.payload)).collect();
                assert_eq!(self.endpoint.send_batch(&completions, self.bus).unwrap(), completions.len());
            }
        }

        // Guest: take the event flags, drain the completions.
        let mut completed = 0;
        if !self.bus.take_guest_event_flags().is_empty() {
            let buffer = &mut self.buffer;
            self.channel
                .receive(self.conn.transport(), &self.pages, |packet| {
                    debug_assert_eq!(packet.packet_type(), PacketType::COMPLETION);
                    packet.read_payload(buffer).unwrap();
                    black_box(&buffer);
                    completed += 1;
                })
                .unwrap();
        }
        assert_eq!(completed, self.batch, "every request completed in its round");
        completed
    }

    /// Runs rounds for at least `duration`; returns (round trips, ns per round trip of every slice).
    fn run(&mut self, duration: Duration) -> (u64, Vec<f64>) {
        let mut total = 0u64;
        let mut slices = Vec::new();
        let mut rounds_per_slice = 16u64;
        let start = Instant::now();
        while start.elapsed() < duration {
            let slice_start = Instant::now();
            let mut trips = 0u64;
            for _ in 0..rounds_per_slice {
                trips += self.round() as u64;
            }
            let elapsed = slice_start.elapsed();
            slices.push(elapsed.as_nanos() as f64 / trips as f64);
            if elapsed < SLICE {
                rounds_per_slice *= 2;
            }
            total += trips;
        }
        (total, slices)
    }
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A count per 1000 round trips.
fn per_thousand(count: u64, trips: u64) -> String {
    let text = format!("{:.2}", count as f64 * 1000.0 / trips as f64);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn main() {
    let filters: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with('-')).collect();
    for batch in [1usize, 32] {
        let label = format!("S={PAYLOAD} B={batch}");
        if !filters.is_empty() && !filters.iter().any(|filter| label.contains(filter.as_str())) {
            continue;
        }
        let mut bench = Bench::new(batch);
        let connection_id = bench.conn.offer(bench.channel.relid()).unwrap().connection_id;
        bench.run(WARM_UP);
        let signals_before = bench.bus.hypervisor().host_signal_count(connection_id);
        let guest_signals_before = bench.bus.stats().guest_signals;
        let _ = bench.bus.take_received_log();
        let (trips, slices) = bench.run(MEASURE);
        let signal_events = bench.bus.hypervisor().host_signal_count(connection_id) - signals_before;
        let posts = bench.bus.take_received_log().len() as u64;
        let guest_signals = bench.bus.stats().guest_signals - guest_signals_before;
        let ns = median(slices);
        println!(
            "loopback {label} round_trips_per_s={:.0} ns_per_round_trip={ns:.1} hypercalls_per_1000={} \
             host_signals_per_1000={}",
            1e9 / ns,
            per_thousand(signal_events + posts, trips),
            per_thousand(guest_signals, trips),
        );
    }
}
