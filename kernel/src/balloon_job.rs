//! `mode=balloon seconds=N`: the Dynamic Memory driver on the real host, for N seconds (issue 9).
//!
//! Connects the KMCL bus ([`crate::bus::runtime`]), starts `vmbus::drivers::dm::DmChannelDriver` over the frame
//! allocator ([`crate::mm::balloon::KernelFramePool`]), and runs the driver loop: dispatch the VMBus interrupts,
//! tick the driver, sleep until the next interrupt (a 50 ms periodic kernel timer bounds the sleep, so status
//! reports leave on time). It logs what the driver does — the version and capabilities (the `dm:` lines of the
//! protocol module), each balloon and unballoon with its frame counts, every [`STATUS_LOG_EVERY`]th status report
//! — then stops the driver, unloads the connection, and proves the frames the kernel kept are sound with a heap and
//! frame stress.

use crate::bus::runtime;
use crate::mm::balloon::KernelFramePool;
use crate::mm::frames;
use crate::time;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::time::Duration;
use spin::Mutex;
use vmbus::client::VmbusTransport;
use vmbus::dm::{DmEvent, DmState};
use vmbus::drivers::Driver;
use vmbus::drivers::dm::{DmChannelConfig, DmChannelDriver};
use vmbus::protocol::device_class;

/// One status report in this many is logged.
pub const STATUS_LOG_EVERY: u64 = 10;

/// The kernel timer's period while the job runs: the longest the loop sleeps.
const TICK: Duration = Duration::from_millis(50);

const NS_PER_S: u64 = 1_000_000_000;

/// Runs the Dynamic Memory driver for `seconds` (see the module documentation), then returns.
pub fn run(seconds: u64) {
    log::info!("balloon: running the Dynamic Memory driver for {seconds} s");
    let mut bus = match runtime::start() {
        Ok(bus) => bus,
        Err(error) => {
            log::error!("balloon: no VMBus: {error}");
            return;
        }
    };
    if !bus.connection().offers().any(|offer| offer.interface_type == device_class::DYNAMIC_MEMORY) {
        log::error!("balloon: the host offers no Dynamic Memory device");
        let _ = bus.connection_mut().unload();
        return;
    }
    let total = KernelFramePool::total_pages();
    let config = DmChannelConfig::for_total_pages(total);
    let pool = Arc::new(Mutex::new(KernelFramePool::new()));
    log::info!(
        "balloon: {total} pages ({} MiB) in the kernel, {} free; floor {} pages",
        total / 256,
        frames::stats().free,
        config.dm.floor_pages
    );
    let mut driver = DmChannelDriver::new(config, pool.clone(), time::now);
    if let Err(status) = driver.start(&mut bus) {
        log::error!("balloon: starting the driver: {status}");
        let _ = bus.connection_mut().unload();
        return;
    }
    if let Err(error) = time::start_timer(time::TimerMode::Periodic, TICK, || {}) {
        log::warn!("balloon: no kernel timer ({error:?}): the loop wakes only on VMBus interrupts");
    }

    let started = time::now();
    let end = started.saturating_add(seconds.saturating_mul(NS_PER_S));
    let mut state = DmState::Closed;
    let mut ballooned = 0u64;
    let mut reports_logged = 0u64;
    while time::now() < end {
        let delivered = runtime::dispatch(&mut bus);
        let now = time::now();
        let wakeup = driver.tick(&mut bus, now);
        for event in driver.take_events() {
            log_event(&event, (now - started) / 1_000_000);
        }
        if driver.state() != state {
            state = driver.state();
            log::info!(
                "balloon: driver {state:?}, version {:?} at {} ms",
                driver.version(),
                (now - started) / 1_000_000
            );
        }
        let held = driver.ballooned_pages();
        if held != ballooned {
            let free = frames::stats().free;
            if held > ballooned {
                log::info!("balloon: gave {} frames to the host (host holds {held}, {free} free)", held - ballooned);
            } else {
                log::info!(
                    "balloon: took back {} frames from the host (host holds {held}, {free} free)",
                    ballooned - held
                );
            }
            ballooned = held;
        }
        let reports = driver.protocol_stats().status_reports;
        if reports / STATUS_LOG_EVERY > reports_logged / STATUS_LOG_EVERY || (reports > 0 && reports_logged == 0) {
            let p = pool.lock();
            use vmbus::dm::FramePool;
            log::info!(
                "balloon: status report {reports} sent: available {} pages, committed {} pages",
                p.free_pages(),
                p.committed_pages()
            );
            reports_logged = reports;
        }
        if delivered == 0 && wakeup.is_none_or(|at| at > time::now()) {
            bus.connection().transport().wait();
        }
    }

    let protocol = driver.protocol_stats();
    log::info!("balloon: stopping: {}", driver.status());
    if let Err(status) = driver.stop(&mut bus) {
        log::error!("balloon: stopping the driver: {status}");
    }
    time::stop_timer();
    if let Err(error) = bus.connection_mut().unload() {
        log::warn!("balloon: unload: {error}");
    }
    log::info!(
        "balloon: done: {} balloon requests, {} pages given, {} returned (+{} at close), {} status reports, {} ignored",
        protocol.balloon_requests,
        protocol.pages_given,
        protocol.pages_returned,
        driver.channel_stats().returned_at_close,
        protocol.status_reports,
        protocol.ignored_messages
    );
    match stress() {
        Ok(line) => log::info!("balloon: stress after the balloon: {line}"),
        Err(error) => log::error!("balloon: stress after the balloon failed: {error}"),
    }
}

fn log_event(event: &DmEvent, at_ms: u64) {
    match event {
        DmEvent::BalloonStarted { requested } => {
            log::info!("balloon: host asks for {requested} pages at {at_ms} ms")
        }
        DmEvent::Unballooned { returned, not_ours, last } => log::info!(
            "balloon: host returns {returned} pages at {at_ms} ms ({not_ours} not ours, last of the request: {last})"
        ),
        DmEvent::HotAdded { offered, accepted } => {
            log::info!("balloon: hot add of {offered} pages: {accepted} accepted")
        }
        DmEvent::CapabilitiesAccepted { suppress_pressure_reports } => log::info!(
            "balloon: connected: capabilities accepted (status reports {})",
            if *suppress_pressure_reports { "suppressed by the host" } else { "on" }
        ),
        other => log::info!("balloon: {other:?}"),
    }
}

/// Writes and checks a pattern over 8 MiB of heap, and takes (zeroing) and frees 2048 frames: the memory the
/// kernel kept is sound.
fn stress() -> Result<alloc::string::String, alloc::string::String> {
    let words = 1 << 20;
    let mut heap: Vec<u64> = Vec::new();
    heap.try_reserve_exact(words).map_err(|_| "8 MiB of heap unavailable")?;
    heap.extend((0..words as u64).map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    if !heap.iter().enumerate().all(|(i, &w)| w == (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) {
        return Err("heap pattern mismatch".into());
    }
    drop(heap);
    // alloc_frame zeroes each frame it hands out: 2048 frames written through the physical-memory window.
    let before = frames::stats();
    let mut taken = Vec::new();
    while taken.len() < 2048 {
        let Some(frame) = frames::alloc_frame() else { break };
        taken.push(frame);
    }
    let count = taken.len();
    for frame in taken {
        frames::free_frame(frame);
    }
    if frames::stats() != before {
        return Err("the frame counters changed".into());
    }
    Ok(alloc::format!("8 MiB of heap written and checked, {count} frames zeroed and freed"))
}
