//! The kernel's main job (issue 8 §6–7): boot → platform report → VMBus → the offer table → drivers bound to the
//! offers they know → a steady loop that serves the devices until the host asks for a shutdown.
//!
//! On Hyper-V (or QEMU's VMBus host) the bus is the real one ([`bus::runtime`]). Where there is none, the kernel
//! runs its own VMBus host in loopback ([`bus::loopback`]) with device models playing Hyper-V's integration
//! services, so the same drivers run under QEMU TCG: heartbeats flow, a timesync sample sets the wall clock, and a
//! shutdown request powers the machine off.
//!
//! Command line: `seconds=N` ends the steady loop after N seconds (the job then unloads VMBus, leaves the hypervisor
//! clean and exits with the success status) — for tests on hosts that never ask for a shutdown.

use crate::arch::power::{self, PowerAction, ResetMethod};
use crate::bus::{self, loopback, runtime};
use crate::cmdline::Cmdline;
use crate::{hyperv, kprintln, time};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::time::Duration;
use vmbus::client::Offer;
use vmbus::drivers::{Driver, DriverRequest};
use vmbus::kmcl::Kmcl;

/// The steady loop's tick: the longest the CPU halts before the loop looks at its timers again.
const TICK: Duration = Duration::from_millis(10);

/// What the job needs from a KMCL bus, real or loopback.
trait JobBus {
    fn kmcl(&mut self) -> &mut dyn Kmcl;
    fn dispatch(&mut self) -> u64;
    fn wait(&self);
    fn offers(&self) -> Vec<Offer>;
    fn describe(&self) -> String;
    fn unload(&mut self);
}

impl JobBus for runtime::KernelBus {
    fn kmcl(&mut self) -> &mut dyn Kmcl {
        self
    }

    fn dispatch(&mut self) -> u64 {
        runtime::dispatch(self)
    }

    fn wait(&self) {
        vmbus::client::VmbusTransport::wait(self.connection().transport());
    }

    fn offers(&self) -> Vec<Offer> {
        self.connection().offers().cloned().collect()
    }

    fn describe(&self) -> String {
        bus::negotiation_line(self.connection())
    }

    fn unload(&mut self) {
        if let Err(e) = self.connection_mut().unload() {
            log::warn!("vmbus: unload: {e}");
        }
    }
}

impl JobBus for loopback::LoopbackKmclBus {
    fn kmcl(&mut self) -> &mut dyn Kmcl {
        self
    }

    fn dispatch(&mut self) -> u64 {
        loopback::dispatch(self)
    }

    fn wait(&self) {
        vmbus::client::VmbusTransport::wait(self.connection().transport());
    }

    fn offers(&self) -> Vec<Offer> {
        self.connection().offers().cloned().collect()
    }

    fn describe(&self) -> String {
        alloc::format!(
            "VMBus {} with the kernel's own loopback host (no Hyper-V host here)",
            self.connection().version()
        )
    }

    fn unload(&mut self) {
        if let Err(e) = self.connection_mut().unload() {
            log::warn!("vmbus: unload: {e}");
        }
    }
}

/// Runs the main job; returns only when `seconds=` ran out (the caller then exits), else ends in a power-off or
/// restart the host asked for.
pub fn run(cmdline: &Cmdline) {
    let deadline = cmdline
        .get("seconds")
        .and_then(|value| value.parse::<u64>().ok())
        .map(|seconds| time::now().saturating_add(seconds.saturating_mul(1_000_000_000)));
    if let Err(e) = time::start_timer(time::TimerMode::Periodic, TICK, || {}) {
        log::warn!("job: no periodic kernel timer ({e:?}): the loop wakes on device interrupts only");
    }
    match runtime::start() {
        Ok(mut bus) => serve(&mut bus, crate::drivers::for_host(), deadline),
        Err(bus::BusError::NoHost) => {
            kprintln!("VMBus: no Hyper-V host here; running the kernel's own VMBus host in loopback");
            match crate::drivers::start_loopback(cmdline) {
                Ok(mut bus) => serve(&mut bus, crate::drivers::for_loopback(), deadline),
                Err(e) => kprintln!("VMBus: loopback host failed: {e}"),
            }
        }
        Err(e) => kprintln!("VMBus: not connected: {e}"),
    }
    time::stop_timer();
}

fn serve(bus: &mut dyn JobBus, mut drivers: Vec<Box<dyn Driver>>, deadline: Option<u64>) {
    kprintln!("{}", bus.describe());
    for driver in drivers.iter_mut() {
        if let Err(status) = driver.start(bus.kmcl()) {
            log::warn!("job: driver {} did not start: {status}", driver.name());
        }
    }
    // Let the drivers bind and negotiate before the table is drawn.
    let settle = time::now() + 200_000_000;
    while time::now() < settle {
        if bus.dispatch() == 0 {
            bus.wait();
        }
    }
    let offers = bus.offers();
    let bound = |offer: &Offer| drivers.iter().any(|driver| driver.interface_type() == offer.interface_type);
    kprintln!("{} offers:\n{}", offers.len(), bus::offer_table(offers.iter(), bound));
    for driver in &drivers {
        kprintln!("driver {}: {}", driver.name(), driver.status());
    }

    let mut next_wakeup: Option<u64> = None;
    let action = loop {
        bus.dispatch();
        let now = time::now();
        if next_wakeup.is_none_or(|at| at <= now) {
            next_wakeup = None;
            for driver in drivers.iter_mut() {
                if let Some(at) = driver.tick(bus.kmcl(), now) {
                    next_wakeup = Some(next_wakeup.map_or(at, |earliest| earliest.min(at)));
                }
            }
        }
        let mut action = None;
        for driver in drivers.iter_mut() {
            for request in driver.take_requests() {
                match request {
                    DriverRequest::SetWallClock { unix_time_ns, at_ns } => {
                        let correction = time::set_wall_clock(unix_time_ns, at_ns);
                        log::info!(
                            "job: wall clock set by {} to {} ({})",
                            driver.name(),
                            format_unix_ns(unix_time_ns),
                            correction.map_or(String::from("first setting"), |c| alloc::format!("corrected by {c} ns"))
                        );
                    }
                    DriverRequest::PowerOff { forced } => {
                        log::info!("job: {} asks to power off (forced: {forced})", driver.name());
                        action = Some(PowerAction::PowerOff);
                    }
                    DriverRequest::Restart { forced } => {
                        log::info!("job: {} asks to restart (forced: {forced})", driver.name());
                        action = Some(PowerAction::Restart(ResetMethod::first_from(None)));
                    }
                }
            }
        }
        if action.is_some() {
            break action;
        }
        if deadline.is_some_and(|at| time::now() >= at) {
            log::info!("job: seconds= ran out");
            break None;
        }
        bus.wait();
    };
    // Let the host take the last answers (the shutdown response) before the reports are printed.
    for _ in 0..3 {
        bus.dispatch();
    }

    for driver in &drivers {
        kprintln!("driver {}: {}", driver.name(), driver.status());
    }
    for line in crate::drivers::loopback_host_report() {
        kprintln!("loopback host: {line}");
    }
    for driver in drivers.iter_mut() {
        if let Err(status) = driver.stop(bus.kmcl()) {
            log::warn!("job: driver {} did not stop cleanly: {status}", driver.name());
        }
    }
    bus.unload();
    if let Some(action) = action {
        time::stop_timer();
        power::shutdown(action, hyperv::teardown);
    }
}

/// `YYYY-MM-DD hh:mm:ss UTC` for a UNIX time in nanoseconds.
pub fn format_unix_ns(unix_ns: i128) -> String {
    let seconds = unix_ns.div_euclid(1_000_000_000) as i64;
    let (days, secs) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm, proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    alloc::format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
