//! The Dynamic Memory driver against the crate's own host model (`vmbus::server::dm_host::DmHost`) on the loopback
//! bus (issue 9 §7): negotiation, capabilities, status reports, a balloon and an unballoon, and the model's checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;
use vmbus::channel::InterruptPages;
use vmbus::client::{ConnectOptions, Connection};
use vmbus::dm::{FramePool, PageRange};
use vmbus::drivers::Driver;
use vmbus::drivers::dm::{DmChannelConfig, DmChannelDriver};
use vmbus::kmcl::Bus;
use vmbus::memory::{ArenaRingAllocator, PageArena};
use vmbus::server::dm_host::DmHost;
use vmbus::server::{LoopbackBus, ServerConfig};

struct NoPages;

impl InterruptPages for NoPages {
    fn set_send_interrupt(&self, _: u32) {}
    fn set_monitor_pending(&self, _: u8) {}
}

/// A pool of frames 0x1000.. with every other run of 7 used by the "kernel", so ranges come out fragmented.
struct Pool {
    free: Vec<bool>,
    held: u64,
}

impl FramePool for Pool {
    fn free_pages(&self) -> u64 {
        self.free.iter().filter(|&&f| f).count() as u64
    }

    fn committed_pages(&self) -> u64 {
        self.free.len() as u64 - self.free_pages() - self.held
    }

    fn take_free_run(&mut self, max_pages: u64) -> Option<PageRange> {
        let start = self.free.iter().position(|&f| f)?;
        let mut count = 0;
        while (count as u64) < max_pages && self.free.get(start + count) == Some(&true) {
            self.free[start + count] = false;
            count += 1;
        }
        self.held += count as u64;
        Some(PageRange::new(0x1000 + start as u64, count as u64))
    }

    fn give_back(&mut self, range: PageRange) {
        for pfn in range.start..range.start + range.count {
            let index = (pfn - 0x1000) as usize;
            assert!(!self.free[index], "frame {pfn:#x} given back twice");
            self.free[index] = true;
            self.held -= 1;
        }
    }
}

#[test]
fn the_driver_balloons_and_unballoons_against_the_host_model() {
    let arena = PageArena::new(0x8_0000, 256);
    let host: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::with_memory(ServerConfig::new(), arena.clone())));
    let mut model = DmHost::new();
    model.offer(host).unwrap();
    let mut connection = Connection::connect(host, ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))).unwrap();
    connection.request_offers().unwrap();
    let mut bus = Bus::new(connection, NoPages, ArenaRingAllocator::new(arena));
    let pool = Arc::new(Mutex::new(Pool { free: (0..16384).map(|i| (i / 7) % 2 == 0).collect(), held: 0 }));
    let clock = Arc::new(AtomicU64::new(1_000_000_000));
    let time = clock.clone();
    let now: Box<dyn Fn() -> u64 + Send + Sync> = Box::new(move || time.load(Ordering::SeqCst));
    let mut driver = DmChannelDriver::new(DmChannelConfig::for_total_pages(16384), pool.clone(), now);
    driver.start(&mut bus).unwrap();

    // Runs host turns, guest dispatch and driver ticks, 100 ms of fake time per round.
    let rounds = |count: usize, model: &mut DmHost, bus: &mut Bus<_, _, _>, driver: &mut DmChannelDriver<_, _>| {
        for _ in 0..count {
            host.run_host();
            model.run(host);
            host.run_host();
            let relids = host.take_guest_event_flags();
            bus.process_interrupt(&relids);
            bus.poll();
            driver.tick(bus, clock.load(Ordering::SeqCst));
            clock.fetch_add(100_000_000, Ordering::SeqCst);
        }
    };
    rounds(30, &mut model, &mut bus, &mut driver);
    let report = model.report().clone();
    assert_eq!(report.version, Some(0x2_0000), "{}", model.summary());
    assert!(report.capabilities.is_some_and(|caps| caps.balloon), "{report:?}");
    assert!(report.status_reports >= 2, "status reports about once a second: {report:?}");
    let free_before = pool.lock().free_pages();
    assert_eq!(report.last_status.map(|(available, _)| available), Some(free_before));

    model.request_balloon(700);
    rounds(20, &mut model, &mut bus, &mut driver);
    assert_eq!(model.report().pages_taken, 700, "{}", model.summary());
    assert_eq!(model.report().balloons_done, 1);
    assert_eq!(pool.lock().held, 700);
    assert_eq!(model.held_pages(), 700);

    model.request_unballoon();
    rounds(20, &mut model, &mut bus, &mut driver);
    assert_eq!(model.report().pages_returned, 700, "{}", model.summary());
    assert_eq!(model.report().unballoons_done, 1);
    assert_eq!(pool.lock().held, 0);
    assert_eq!(pool.lock().free_pages(), free_before);
    assert_eq!(model.report().errors, 0, "{}", model.summary());

    driver.stop(&mut bus).unwrap();
    rounds(3, &mut model, &mut bus, &mut driver);
}
