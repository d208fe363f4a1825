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
//! ready and gives them back a second later. And it runs a KMCL server bus ([`loopback::LoopbackServerBus`]) with one
//! server driver, the example echo device (`vmbus::kmcl::echo_server::EchoServer`); the guest binds the example
//! client driver (`vmbus::kmcl::echo::EchoDriver`, through [`LoopbackEchoDriver`]), so both ends of that channel are
//! KMCL drivers: [`ECHO_BURST`] round trips once negotiated, then one a second.

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
use vmbus::kmcl::echo::{ECHO_INTERFACE_TYPE, EchoDriver, EchoState};
use vmbus::kmcl::echo_server::{EchoServer, EchoServerState};
use vmbus::kmcl::{ChannelHandle, Handles, Kmcl, ServerBus};
use vmbus::protocol::Guid;
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

/// The drivers for the loopback host: the same as for a real host, and the echo client when the host's KMCL server
/// offers the echo device.
pub fn for_loopback() -> Vec<Box<dyn Driver>> {
    let mut drivers = for_host();
    if let Some((server, page)) = LOOPBACK_ECHO.get() {
        drivers.push(Box::new(LoopbackEchoDriver::new(server.clone(), *page)));
    }
    drivers
}

/// The instance of the loopback host's echo device.
pub const LOOPBACK_ECHO_INSTANCE: Guid = Guid::from_canonical("6563686f-0001-4b4d-434c-00000000006b");

/// Round trips the echo client makes at once when negotiated; then one per [`ECHO_INTERVAL_NS`].
pub const ECHO_BURST: u64 = 1000;

/// Bytes of each echo round trip.
pub const ECHO_PAYLOAD: usize = 64;

/// Time between the echo client's round trips after the burst.
pub const ECHO_INTERVAL_NS: u64 = 1_000_000_000;

/// The example KMCL echo client (`vmbus::kmcl::echo::EchoDriver`) as a driver of the main job, against the loopback
/// host's KMCL echo server: after negotiation [`ECHO_BURST`] pings of [`ECHO_PAYLOAD`] bytes, then one per
/// [`ECHO_INTERVAL_NS`]; each answer must be the payload. Its status reports both ends.
pub struct LoopbackEchoDriver {
    server: Arc<Mutex<EchoServerState>>,
    shared_page_pfn: u64,
    channel: Option<ChannelHandle>,
    client: Option<Arc<Mutex<EchoState>>>,
    round_trips: u64,
    failures: u64,
    burst_ns: Option<u64>,
}

impl LoopbackEchoDriver {
    /// A driver reporting the server's counts from `server`, sharing the loopback guest page `shared_page_pfn`
    /// with the device (`EchoDriver`'s GPADL).
    pub fn new(server: Arc<Mutex<EchoServerState>>, shared_page_pfn: u64) -> LoopbackEchoDriver {
        LoopbackEchoDriver {
            server,
            shared_page_pfn,
            channel: None,
            client: None,
            round_trips: 0,
            failures: 0,
            burst_ns: None,
        }
    }

    /// One ping with a payload numbered by the round trip; true when the answer is the payload.
    fn ping(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) -> bool {
        let mut payload = [0u8; ECHO_PAYLOAD];
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte = (self.round_trips as u8).wrapping_add(i as u8);
        }
        let mut answer = [0u8; ECHO_PAYLOAD];
        let ok = matches!(EchoDriver::ping(kmcl, channel, &payload, &mut answer), Ok(len) if len == ECHO_PAYLOAD)
            && answer == payload;
        if ok {
            self.round_trips += 1;
        } else {
            self.failures += 1;
        }
        ok
    }
}

impl Driver for LoopbackEchoDriver {
    fn name(&self) -> &'static str {
        "echo (KMCL both ends)"
    }

    fn interface_type(&self) -> Guid {
        ECHO_INTERFACE_TYPE
    }

    fn start(&mut self, kmcl: &mut dyn Kmcl) -> vmbus::kmcl::Result<ChannelHandle> {
        let (channel, client) = EchoDriver::start(kmcl, Some(LOOPBACK_ECHO_INSTANCE), self.shared_page_pfn)?;
        self.channel = Some(channel);
        self.client = Some(client);
        Ok(channel)
    }

    fn tick(&mut self, kmcl: &mut dyn Kmcl, now_ns: u64) -> Option<u64> {
        let (channel, client) = (self.channel?, self.client.as_ref()?);
        let (version, refused) = {
            let client = client.lock();
            (client.version, client.negotiation_error)
        };
        if version.is_none() {
            // Not negotiated yet (look again soon), or refused (nothing more to do).
            return refused.is_none().then_some(now_ns + 100_000_000);
        }
        if self.burst_ns.is_none() {
            let started = time::now();
            for _ in 0..ECHO_BURST {
                if !self.ping(kmcl, channel) {
                    break;
                }
            }
            self.burst_ns = Some(time::now() - started);
        } else {
            self.ping(kmcl, channel);
        }
        (self.failures == 0).then(|| time::now() + ECHO_INTERVAL_NS)
    }

    fn status(&self) -> String {
        let version = self.client.as_ref().map(|client| client.lock().clone());
        let negotiated = match version {
            Some(EchoState { version: Some(version), .. }) => format!("version {version} negotiated"),
            Some(EchoState { negotiation_error: Some(status), .. }) => format!("negotiation failed: {status}"),
            _ => String::from("not negotiated"),
        };
        let burst = self.burst_ns.map_or(String::new(), |ns| format!(" (first {ECHO_BURST} in {} ms)", ns / 1_000_000));
        let server = self.server.lock();
        format!(
            "{negotiated}, {} round trips{burst}, {} failed, server saw {} packets, {} bytes",
            self.round_trips, self.failures, server.packets, server.bytes
        )
    }

    fn channel(&self) -> Option<ChannelHandle> {
        self.channel
    }

    fn stop(&mut self, kmcl: &mut dyn Kmcl) -> vmbus::kmcl::Result<()> {
        match self.channel.take() {
            Some(channel) => EchoDriver::stop(kmcl, channel),
            None => Ok(()),
        }
    }
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

/// What the loopback host's KMCL echo server saw, once [`start_loopback`] offered it, and the loopback guest page
/// the echo client shares with it.
static LOOPBACK_ECHO: spin::Once<(Arc<Mutex<EchoServerState>>, u64)> = spin::Once::new();

/// Pages the loopback host balloons out of the guest and later gives back (8 MiB).
pub const LOOPBACK_BALLOON_PAGES: u32 = 2048;

/// What the loopback host saw of each device (one line each), if it runs.
pub fn loopback_host_report() -> Vec<String> {
    let mut lines = LOOPBACK_DEVICES.get().map(|devices| devices.lock().summary_lines()).unwrap_or_default();
    if let Some(balloon) = LOOPBACK_BALLOON.get() {
        lines.push(balloon.lock().summary());
    }
    if let Some((echo, _)) = LOOPBACK_ECHO.get() {
        lines.push(format!("echo (KMCL server): {}", echo.lock().summary()));
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
    // The KMCL server bus: made once the host exists, run in every host turn.
    let server: Arc<Mutex<Option<loopback::LoopbackServerBus>>> = Arc::new(Mutex::new(None));
    let serving = server.clone();
    loopback::start(
        ServerConfig::new(),
        move |host| {
            if let Err(e) = offering.0.lock().offer_integration_services(host) {
                log::warn!("loopback: offering the integration services: {e}");
            }
            if let Err(e) = offering.1.lock().offer(host) {
                log::warn!("loopback: offering Dynamic Memory: {e}");
            }
            let mut bus = ServerBus::new(host, Arc::new(Handles::new()));
            // The page the guest's echo driver shares with the device lives in loopback guest memory.
            let page = host.memory().and_then(|memory| memory.allocate(1).ok());
            match (page, EchoServer::start(&mut bus, LOOPBACK_ECHO_INSTANCE)) {
                (Some(page), Ok((_, state))) => {
                    LOOPBACK_ECHO.call_once(|| (state, page));
                }
                (None, _) => log::warn!("loopback: no guest page for the KMCL echo device"),
                (_, Err(status)) => log::warn!("loopback: offering the KMCL echo device: {status}"),
            }
            *server.lock() = Some(bus);
        },
        Some(Box::new(move |host| {
            loopback::server_turn(&serving, host);
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
