//! Ring benchmark: exactly the workload of `shared/bench/ring-workload.md`, one output line per configuration.
//!
//! One ring (4 KiB control page + 64 KiB data area) in host memory, writer and reader on one thread. For each payload
//! size S and batch size B, for at least one second: write B in-band packets (type 6, no completion requested,
//! incrementing transaction id, S bytes of a fixed pattern) and publish them, then read all B, copying each payload
//! into a caller buffer, and publish the read. Signals are counted exactly as the ring's rules decide them.
//!
//! When B packets do not fit in the ring (S=4096, B=32: 32 × 4120 bytes > 64 KiB) the writer behaves like a blocked
//! writer: it publishes what fits, sets `pending_send_sz`, the reader drains and publishes its read (which signals the
//! writer when free space crosses the pending size), the writer clears `pending_send_sz` and goes on.
//!
//! The machine is shared, so the second of work is timed in slices of about 10 ms and `ns_per_packet` (and `gbps`) is
//! the median slice; `signals_per_1000` counts over the whole run. After the required lines come reference lines,
//! labelled as such: two plain `memcpy`s of the payload (into a 64 KiB buffer at the ring's stride and out again),
//! timed the same way, and the ring's ratio to them. `two_memcpy` restarts at offset 0 whenever the next payload would
//! not fit, so it uses few offsets and its figure depends on where the allocator put its buffers (at S=4096 about 140
//! or about 320 ns on the same machine); `two_memcpy_at_ring_offsets` copies at every offset the ring uses, wrapping
//! like the ring, and does not.
//!
//! Run with `cargo bench -p vmbus --bench ring`. Arguments not starting with `-` select configurations: only those
//! whose `S=<S> B=<B>` label contains one of them run (`cargo bench -p vmbus --bench ring -- "S=64 B=32"`), with the
//! reference lines of their sizes.

use std::hint::black_box;
use std::time::{Duration, Instant};

use vmbus::ring::{
    OutgoingPacket, OwnedRingMemory, RingError, RingReader, RingWriter, SpaceRequest, initialize_control_page,
};

/// Data area of the benchmark ring.
const DATA_LEN: usize = 64 * 1024;
/// Minimum measured time per configuration.
const MEASURE: Duration = Duration::from_millis(if option_env!("RING_SHORT").is_some() { 100 } else { 1000 });
/// Unmeasured warm-up per configuration.
const WARM_UP: Duration = Duration::from_millis(if option_env!("RING_SHORT").is_some() { 1 } else { 200 });
/// Target length of one timed slice.
const SLICE: Duration = Duration::from_millis(10);

/// Counts of one run of the workload.
#[derive(Default)]
struct Counts {
    packets: u64,
    signals: u64,
}

/// The benchmark ring, its two sides and the workload's state.
struct Workload<'a> {
    writer: RingWriter<&'a OwnedRingMemory>,
    reader: RingReader<&'a OwnedRingMemory>,
    payload: Vec<u8>,
    buffer: Vec<u8>,
    batch_size: u64,
    transaction_id: u64,
}

impl Workload<'_> {
    /// Reads every published packet, copying payloads into the buffer, and publishes the read.
    #[inline(always)]
    fn read_all(&mut self, counts: &mut Counts) -> Result<(), RingError> {
        let mut batch = self.reader.batch();
        while let Some(packet) = batch.next_packet()? {
            packet.read_payload(&mut self.buffer)?;
            black_box(&mut self.buffer);
            counts.packets += 1;
        }
        counts.signals += u64::from(batch.commit()?.signal_peer);
        Ok(())
    }

    /// One round: write B packets (waiting for space like a blocked writer when they do not fit), then read them.
    #[inline(always)]
    fn round(&mut self, counts: &mut Counts) -> Result<(), RingError> {
        let mut left = self.batch_size;
        while left > 0 {
            let mut batch = self.writer.batch();
            let mut full = None;
            while left > 0 {
                match batch.push(&OutgoingPacket::in_band(self.transaction_id, &self.payload)) {
                    Ok(()) => {
                        self.transaction_id += 1;
                        left -= 1;
                    }
                    Err(RingError::Full { needed, .. }) => {
                        full = Some(needed);
                        break;
                    }
                    Err(error) => return Err(error),
                }
            }
            counts.signals += u64::from(batch.commit().signal_peer);
            if let Some(needed) = full {
                if self.writer.request_space_signal(needed)? == SpaceRequest::Armed {
                    self.read_all(counts)?;
                }
                self.writer.clear_space_signal();
            }
        }
        self.read_all(counts)
    }

    /// Runs rounds for at least `duration`; returns the counts and the ns per packet of every slice.
    fn run(&mut self, duration: Duration) -> Result<(Counts, Vec<f64>), RingError> {
        let mut total = Counts::default();
        let mut slices = Vec::new();
        let mut rounds_per_slice = 16u64;
        let start = Instant::now();
        while start.elapsed() < duration {
            let mut counts = Counts::default();
            let slice_start = Instant::now();
            for _ in 0..rounds_per_slice {
                self.round(&mut counts)?;
            }
            let elapsed = slice_start.elapsed();
            slices.push(elapsed.as_nanos() as f64 / counts.packets as f64);
            if elapsed < SLICE {
                rounds_per_slice *= 2;
            }
            total.packets += counts.packets;
            total.signals += counts.signals;
        }
        Ok((total, slices))
    }
}

/// Two plain copies of the payload per packet: into a 64 KiB buffer at the ring's stride (payload + 24 bytes of
/// descriptor and trailer), `group` packets at a time, then out again in the same order; returns the ns per packet
/// of every slice. With `group` 1 each payload is copied out while still hot; with the ring's batch size the access
/// pattern is the ring's.
fn two_memcpys(payload: &[u8], group: usize, duration: Duration) -> Vec<f64> {
    let mut ring = vec![0u8; DATA_LEN];
    let mut out = vec![0u8; payload.len()];
    let stride = payload.len() + 24;
    let mut offsets = Vec::with_capacity(group);
    let mut offset = 0;
    let mut slices = Vec::new();
    let mut rounds_per_slice = 16u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let slice_start = Instant::now();
        for _ in 0..rounds_per_slice {
            offsets.clear();
            for _ in 0..group {
                if offset + payload.len() > DATA_LEN {
                    offset = 0;
                }
                ring[offset..offset + payload.len()].copy_from_slice(black_box(payload));
                offsets.push(offset);
                offset += stride;
            }
            for &at in &offsets {
                out.copy_from_slice(black_box(&ring[at..at + payload.len()]));
                black_box(&mut out);
            }
        }
        let elapsed = slice_start.elapsed();
        slices.push(elapsed.as_nanos() as f64 / (rounds_per_slice * group as u64) as f64);
        if elapsed < SLICE {
            rounds_per_slice *= 2;
        }
    }
    slices
}

/// Two plain copies of the payload per packet at exactly the places the ring uses: packets of payload + 24 bytes back
/// to back in a 64 KiB buffer, the payload 16 bytes into each (after the descriptor), wrapping at the end (a payload
/// that crosses the end is copied in two pieces), `group` packets at a time. Unlike [`two_memcpys`], which restarts at
/// offset 0 and so uses only a few offsets, this visits every offset the ring visits, so its figure does not depend on
/// where the allocator happens to put the buffers (copies whose source and destination are a few bytes apart modulo
/// 4 KiB are much slower on x86, and `two_memcpys` either always or never hits such a pair).
fn two_memcpys_at_ring_offsets(payload: &[u8], group: usize, duration: Duration) -> Vec<f64> {
    let mut ring = vec![0u8; DATA_LEN];
    let mut out = vec![0u8; payload.len()];
    let size = payload.len();
    let mut offsets = Vec::with_capacity(group);
    let mut cursor = 0;
    let mut slices = Vec::new();
    let mut rounds_per_slice = 16u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        let slice_start = Instant::now();
        for _ in 0..rounds_per_slice {
            offsets.clear();
            for _ in 0..group {
                let at = (cursor + 16) % DATA_LEN;
                let first = size.min(DATA_LEN - at);
                let source = black_box(payload);
                ring[at..at + first].copy_from_slice(&source[..first]);
                ring[..size - first].copy_from_slice(&source[first..]);
                offsets.push(at);
                cursor = (cursor + size + 24) % DATA_LEN;
            }
            for &at in &offsets {
                let first = size.min(DATA_LEN - at);
                let ring = black_box(&ring);
                out[..first].copy_from_slice(&ring[at..at + first]);
                out[first..].copy_from_slice(&ring[..size - first]);
                black_box(&mut out);
            }
        }
        let elapsed = slice_start.elapsed();
        slices.push(elapsed.as_nanos() as f64 / (rounds_per_slice * group as u64) as f64);
        if elapsed < SLICE {
            rounds_per_slice *= 2;
        }
    }
    slices
}

/// Packets of `size` payload bytes the benchmark ring holds at once: a packet needs `size + 24` bytes, and the ring is
/// full when free space is not more than that.
fn ring_capacity(size: usize) -> usize {
    (DATA_LEN - 1) / (size + 24)
}

/// The median of `values`.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Formats a count per 1000 packets without trailing zeros.
fn per_thousand(count: u64, packets: u64) -> String {
    let value = count as f64 * 1000.0 / packets as f64;
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A payload of `size` bytes of a fixed pattern.
fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i * 13 + 5) as u8).collect()
}

fn main() -> Result<(), RingError> {
    let filters: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with('-')).collect();
    let sizes = [64usize, 256, 1024, 4096];
    let mut ring_ns = Vec::new();
    for size in sizes {
        for batch_size in [1u64, 32] {
            let label = format!("S={size} B={batch_size}");
            if !filters.is_empty() && !filters.iter().any(|filter| label.contains(filter.as_str())) {
                continue;
            }
            let memory = OwnedRingMemory::new(DATA_LEN)?;
            initialize_control_page(&memory);
            let mut workload = Workload {
                writer: RingWriter::new(&memory)?,
                reader: RingReader::new(&memory)?,
                payload: pattern(size),
                buffer: vec![0u8; size],
                batch_size,
                transaction_id: 0,
            };
            workload.run(WARM_UP)?;
            let (counts, slices) = workload.run(MEASURE)?;
            let ns_per_packet = median(slices);
            if std::env::var("RING_COUNT").is_ok() {
                eprintln!("packets {}", counts.packets);
            }
            let gbps = size as f64 / ns_per_packet;
            println!(
                "ring {label} ns_per_packet={ns_per_packet:.2} gbps={gbps:.2} signals_per_1000={}",
                per_thousand(counts.signals, counts.packets)
            );
            ring_ns.push((size, batch_size, ns_per_packet));
        }
    }
    for size in sizes {
        if !ring_ns.iter().any(|(s, _, _)| *s == size) {
            continue;
        }
        let payload = pattern(size);
        let mut references = Vec::new();
        for (name, copies) in [
            ("two_memcpy", two_memcpys as fn(&[u8], usize, Duration) -> Vec<f64>),
            ("two_memcpy_at_ring_offsets", two_memcpys_at_ring_offsets),
        ] {
            for group in [1usize, 32] {
                // Copy out no later than the ring can: it holds `ring_capacity` packets.
                let group = group.min(ring_capacity(size));
                copies(&payload, group, WARM_UP);
                references.push((name, group, median(copies(&payload, group, MEASURE))));
            }
        }
        for (name, group, reference) in references {
            let ratios: Vec<String> = ring_ns
                .iter()
                .filter(|(s, _, _)| *s == size)
                .map(|(_, batch_size, ns)| format!("B={batch_size}:{:.2}x", ns / reference))
                .collect();
            println!(
                "reference (not a ring figure) {name} S={size} group={group} ns_per_packet={reference:.2} \
                 ring_over_{name} {}",
                ratios.join(" ")
            );
        }
    }
    Ok(())
}
