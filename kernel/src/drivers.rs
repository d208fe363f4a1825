//! The drivers the main job runs, and the device models of the loopback host (issue 8 §6–7, issue 9).
//!
//! Drivers live in `vmbus::drivers`, written against the KMCL API only; this module constructs them with what the
//! kernel provides: its monotonic clock (timesync pairs each sample with it), its frame allocator (Dynamic Memory),
//! and the guest's identity (KVP).
//!
//! The loopback host ([`start_loopback`]) offers the four integration services and plays Hyper-V's side of them
//! (`vmbus::server::devices::DeviceHost`): heartbeats every second, a timesync sample from the machine's RTC, a KVP
//! pool query, and — after `shutdown-after=N` seconds (default [`DEFAULT_LOOPBACK_SHUTDOWN_S`]; 0 = never) — a
//! shutdown request, which the shutdown driver turns into an ACPI power-off. It also offers Dynamic Memory
//! (`vmbus::server::dm_host::DmHost`): it balloons [`LOOPBACK_BALLOON_PAGES`] out of the kernel once the driver is
//! ready and gives them back a second later.

use crate::bus::{BusError, loopback};
use crate::cmdline::Cmdline;
use crate::mm::balloon::KernelFramePool;
use crate::{arch, time};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use spin::Mutex;
use vmbus::drivers::Driver;
use vmbus::drivers::dm::{DmChannelConfig, DmChannelDriver};
use vmbus::drivers::heartbeat::HeartbeatDriver;
use vmbus::drivers::kvp::KvpDriver;
use vmbus::drivers::shutdown::ShutdownDriver;
use vmbus::drivers::timesync::TimeSyncDriver;
use vmbus::ic::host::HostClock;
use vmbus::ic::kvp::GuestIntrinsics;
use vmbus::ic::timesync::{UnixTime, WindowsTime};
use vmbus::ic::wire::ShutdownFlags;
use vmbus::server::ServerConfig;
use vmbus::server::devices::DeviceHost;
use vmbus::server::dm_host::DmHost;

/// Seconds after which the loopback host asks for a shutdown, unless the command line says otherwise.
pub const DEFAULT_LOOPBACK_SHUTDOWN_S: u64 = 3;

/// The guest's identity as KVP reports it to the host.
fn intrinsics() -> GuestIntrinsics {
    GuestIntrinsics {
        fully_qualified_domain_name: String::from("hv-unikernel"),
        integration_services_version: String::from(crate::VERSION),
        network_address_ipv4: String::new(),
        network_address_ipv6: String::new(),
        os_build_number: format!("{} ({})", crate::VERSION, env!("CARGO_PKG_NAME")),
        os_name: String::from("hv-unikernel"),
        os_major_version: String::from(env!("CARGO_PKG_VERSION_MAJOR")),
        os_minor_version: String::from(env!("CARGO_PKG_VERSION_MINOR")),
        os_version: String::from(crate::VERSION),
        // Hyper-V shows the Windows PROCESSOR_ARCHITECTURE number as text: 9 is AMD64.
        processor_architecture: String::from("9"),
    }
}

/// The integration-service drivers, for any host.
fn integration_services() -> Vec<Box<dyn Driver>> {
    vec![
        Box::new(HeartbeatDriver::new()),
        Box::new(ShutdownDriver::new()),
        Box::new(TimeSyncDriver::new(Arc::new(time::now))),
        Box::new(KvpDriver::new(&intrinsics())),
    ]
}

/// The drivers for a real host: the integration services and Dynamic Memory.
pub fn for_host() -> Vec<Box<dyn Driver>> {
    let mut drivers = integration_services();
    let pool = Arc::new(Mutex::new(KernelFramePool::new()));
    let config = DmChannelConfig::for_total_pages(KernelFramePool::total_pages());
    drivers.push(Box::new(DmChannelDriver::new(config, pool, time::now)));
    drivers
}

/// The drivers for the loopback host: the same as for a real host.
pub fn for_loopback() -> Vec<Box<dyn Driver>> {
    for_host()
}

/// The loopback host's clock: the RTC's time when the host started, carried forward by the kernel's clock.
struct RtcClock {
    unix_at_zero_ns: i128,
}

impl HostClock for RtcClock {
    fn wall_time(&self) -> WindowsTime {
        let unix_ns = self.unix_at_zero_ns + i128::from(time::now());
        let time = UnixTime {
            seconds: unix_ns.div_euclid(1_000_000_000) as i64,
            nanoseconds: unix_ns.rem_euclid(1_000_000_000) as u32,
        };
        WindowsTime::from_unix(time).unwrap_or(WindowsTime(0))
    }

    fn reference_time(&self) -> u64 {
        time::now() / 100
    }
}

/// The loopback host's device models, once [`start_loopback`] made them.
static LOOPBACK_DEVICES: spin::Once<Arc<Mutex<DeviceHost>>> = spin::Once::new();
/// The loopback host's Dynamic Memory model.
static LOOPBACK_BALLOON: spin::Once<Arc<Mutex<DmHost>>> = spin::Once::new();

/// Pages the loopback host balloons out of the guest and later gives back (8 MiB).
pub const LOOPBACK_BALLOON_PAGES: u32 = 2048;

/// What the loopback host saw of each device (one line each), if it runs.
pub fn loopback_host_report() -> Vec<String> {
    let mut lines = LOOPBACK_DEVICES.get().map(|devices| devices.lock().summary_lines()).unwrap_or_default();
    if let Some(balloon) = LOOPBACK_BALLOON.get() {
        lines.push(balloon.lock().summary());
    }
    lines
}

/// Starts the loopback host with the integration-service device models (see the module documentation).
pub fn start_loopback(cmdline: &Cmdline) -> Result<loopback::LoopbackKmclBus, BusError> {
    let rtc = arch::rtc::read();
    let unix_now_ns = rtc.map_or(0, |t| i128::from(t.unix_seconds()) * 1_000_000_000);
    match rtc {
        Some(_) => log::info!("loopback: host clock from the RTC: {}", crate::job::format_unix_ns(unix_now_ns)),
        None => log::warn!("loopback: no RTC; the host clock starts at 1970-01-01"),
    }
    let clock = RtcClock { unix_at_zero_ns: unix_now_ns - i128::from(time::now()) };
    let devices = Arc::new(Mutex::new(DeviceHost::new(Box::new(clock))));
    let shutdown_after = cmdline
        .get("shutdown-after")
        .and_then(|value| value.parse::<u64>().ok())
        .unwrap_or(DEFAULT_LOOPBACK_SHUTDOWN_S);
    if shutdown_after > 0 {
        let at = time::now().saturating_add(shutdown_after.saturating_mul(1_000_000_000));
        devices.lock().schedule_shutdown(at, ShutdownFlags::empty());
        log::info!("loopback: the host will ask for a shutdown in {shutdown_after} s");
    }
    LOOPBACK_DEVICES.call_once(|| devices.clone());
    // Dynamic Memory: balloon LOOPBACK_BALLOON_PAGES out as soon as the driver is ready, give them back a second
    // later.
    let balloon = Arc::new(Mutex::new(DmHost::new()));
    balloon.lock().request_balloon(LOOPBACK_BALLOON_PAGES);
    LOOPBACK_BALLOON.call_once(|| balloon.clone());
    let offering = (devices.clone(), balloon.clone());
    let running = devices.clone();
    let mut unballoon_at = None;
    loopback::start(
        ServerConfig::new(),
        move |host| {
            if let Err(e) = offering.0.lock().offer_integration_services(host) {
                log::warn!("loopback: offering the integration services: {e}");
            }
            if let Err(e) = offering.1.lock().offer(host) {
                log::warn!("loopback: offering Dynamic Memory: {e}");
            }
        },
        Some(Box::new(move |host| {
            let now = time::now();
            if let Some(mut devices) = running.try_lock() {
                devices.run(host, now);
            }
            if let Some(mut model) = balloon.try_lock() {
                model.run(host);
                if model.report().balloons_done == 1 && unballoon_at.is_none() {
                    log::info!("loopback: the host took {} pages; gives them back in 1 s", model.held_pages());
                    unballoon_at = Some(now + 1_000_000_000);
                }
                if unballoon_at.is_some_and(|at| now >= at) {
                    unballoon_at = Some(u64::MAX);
                    model.request_unballoon();
                }
            }
        })),
    )
}
