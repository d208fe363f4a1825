//! The loopback VMBus: where no Hyper-V host exists (QEMU under TCG), the kernel runs the `vmbus` crate's own VMBus
//! server inside itself, over its simulated hypervisor, and its drivers talk to that server exactly as they would to
//! a real host (issue 7 §5).
//!
//! - Guest memory is a [`PageArena`] (guest page numbers of its own, far above RAM): the guest's interrupt and
//!   monitor pages and every channel's rings come from it, and the server maps rings from it.
//! - The guest side is the ordinary KMCL [`Bus`] over a [`LoopbackTransport`]: PostMessage and SignalEvent are the
//!   simulated hypercalls, messages come from the simulated SynIC's SINT 2 slot.
//! - Real interrupts drive it. The host runs its turns (the server's control protocol, then the device models given
//!   to [`start`]) whenever the guest waits; when the simulated hypervisor raised SINT 2 for the guest, the host's
//!   turn sends a self-IPI to [`LOOPBACK_VECTOR`], whose handler marks the bus pending, and [`dispatch`] then hands
//!   the signalled relids (the simulated event flags) to [`Bus::process_interrupt`]. Between turns the CPU halts
//!   until the next interrupt: that IPI, or the kernel timer the caller keeps running.
//! - Host-side drivers can be KMCL server drivers: a [`LoopbackServerBus`] (the `vmbus` crate's
//!   [`vmbus::kmcl::ServerBus`] over the same host) runs in the host's turn through [`server_turn`], so both ends of
//!   a channel are KMCL drivers.

use super::BusError;
use crate::arch::{apic, interrupts};
use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use spin::Mutex;
use vmbus::client::{ConnectOptions, Connection, VmbusTransport};
use vmbus::hv::hypercall::{Delay, HvError, Hypercalls};
use vmbus::kmcl::{Bus, ServerBus};
use vmbus::memory::{ArenaInterruptPages, ArenaRingAllocator, PAGE_SIZE, PageArena};
use vmbus::protocol::{MAX_MESSAGE_SIZE, VMBUS_MESSAGE_SINT};
use vmbus::server::ServerConfig;
use vmbus::server::loopback::LoopbackBus;
use x86_64::instructions::interrupts as cpu_interrupts;

/// The vector the loopback host's guest notifications arrive on.
pub const LOOPBACK_VECTOR: u8 = 0x52;

/// The arena's first guest page number: 4 GiB up, where no RAM of a test VM lives, so the numbers are told apart
/// from real frames in logs.
pub const ARENA_BASE_PFN: u64 = 0x10_0000;

/// Pages of loopback guest memory (2 MiB: rings of a dozen channels and the interrupt and monitor pages).
pub const ARENA_PAGES: usize = 512;

/// Interrupts taken on [`LOOPBACK_VECTOR`].
static INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// Set by the interrupt, cleared by [`dispatch`].
static PENDING: AtomicBool = AtomicBool::new(false);
/// Self-IPIs that could not be sent (no local APIC): the host's turn then marks the bus pending itself.
static IPI_FAILURES: AtomicU64 = AtomicU64::new(0);

fn loopback_interrupt() {
    INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    PENDING.store(true, Ordering::Release);
}

/// Interrupts taken on [`LOOPBACK_VECTOR`] so far.
pub fn interrupt_count() -> u64 {
    INTERRUPTS.load(Ordering::Relaxed)
}

/// What the host does in its turn besides the control protocol: the device models.
pub type HostTurn = Box<dyn FnMut(&'static LoopbackBus) + Send>;

/// The guest's transport to the in-kernel host.
pub struct LoopbackTransport {
    bus: &'static LoopbackBus,
    devices: Mutex<Option<HostTurn>>,
}

impl LoopbackTransport {
    /// The host's turn: control protocol, device models, control protocol again (for what the devices queued), then
    /// a self-IPI if the guest has something to look at.
    pub fn host_turn(&self) {
        self.bus.run_host();
        // A device model that waits for the guest would re-enter here through the guest's wait: skip it then.
        if let Some(mut devices) = self.devices.try_lock()
            && let Some(turn) = devices.as_mut()
        {
            turn(self.bus);
        }
        self.bus.run_host();
        if self.bus.hypervisor().take_interrupts(VMBUS_MESSAGE_SINT) > 0
            && apic::send_self_ipi(LOOPBACK_VECTOR).is_err()
        {
            IPI_FAILURES.fetch_add(1, Ordering::Relaxed);
            PENDING.store(true, Ordering::Release);
        }
    }

    /// The server side.
    pub fn host(&self) -> &'static LoopbackBus {
        self.bus
    }
}

impl Hypercalls for LoopbackTransport {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> Result<(), HvError> {
        self.bus.post_message(connection_id, message_type, payload)
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        self.bus.signal_event(connection_id, flag)
    }
}

impl Delay for LoopbackTransport {
    fn delay_us(&self, us: u64) {
        crate::time::sleep(core::time::Duration::from_micros(us));
        self.host_turn();
    }
}

impl VmbusTransport for LoopbackTransport {
    fn poll_message(&self, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        self.bus.poll_message(buf)
    }

    fn now_ns(&self) -> u64 {
        crate::time::now()
    }

    fn wait(&self) {
        self.host_turn();
        if !cpu_interrupts::are_enabled() {
            return;
        }
        cpu_interrupts::disable();
        if PENDING.load(Ordering::Acquire) || self.bus.hypervisor().queued_for_guest(VMBUS_MESSAGE_SINT) > 0 {
            cpu_interrupts::enable();
        } else {
            // STI's shadow makes "enable, then halt" atomic: an IPI or timer interrupt pending now ends the halt.
            cpu_interrupts::enable_and_hlt();
        }
    }
}

/// The KMCL bus on the loopback host.
pub type LoopbackKmclBus = Bus<LoopbackTransport, ArenaInterruptPages, ArenaRingAllocator>;

/// The KMCL server bus on the loopback host: the host's end of the channels its server drivers offer.
pub type LoopbackServerBus = ServerBus<&'static LoopbackBus>;

/// The server bus's part of a host turn (call it from the [`HostTurn`]): the channels the guest signalled, then the
/// control side (the guest's opens and closes) and every open channel's rings. Skipped while the server bus is busy
/// (a host turn that runs inside one of its own waits).
///
/// [`LoopbackBus::take_signalled_channels`] drains the guest's signals of every channel, the device models' too:
/// that is safe because the device models ([`vmbus::server::devices::DeviceHost`],
/// [`vmbus::server::dm_host::DmHost`]) never look at signals — they read their rings in every turn — and the server
/// bus ignores relids that are not its own.
pub fn server_turn(server: &Mutex<Option<LoopbackServerBus>>, host: &'static LoopbackBus) -> u64 {
    let Some(mut slot) = server.try_lock() else { return 0 };
    let Some(server) = slot.as_mut() else { return 0 };
    let signalled = host.take_signalled_channels();
    let delivered = if signalled.is_empty() { 0 } else { server.process_interrupt(&signalled) };
    delivered + server.poll()
}

/// Builds the in-kernel host with `config`, lets `offer` make its offers (before the guest connects, as a host's
/// devices exist at boot), connects the guest side, takes the offers and returns the KMCL bus. `devices` runs in
/// every host turn.
pub fn start(
    config: ServerConfig,
    offer: impl FnOnce(&'static LoopbackBus),
    devices: Option<HostTurn>,
) -> Result<LoopbackKmclBus, BusError> {
    match interrupts::register(LOOPBACK_VECTOR, loopback_interrupt) {
        Ok(()) | Err(interrupts::RegisterError::AlreadyRegistered(_)) => {}
        Err(e) => log::warn!("loopback: vector {LOOPBACK_VECTOR:#x}: {e:?}; the bus polls instead"),
    }
    let arena = PageArena::new(ARENA_BASE_PFN, ARENA_PAGES);
    let host: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::with_memory(config, arena.clone())));
    offer(host);
    let page = |count| arena.allocate(count).map(|pfn| pfn * PAGE_SIZE).map_err(|_| BusError::OutOfFrames);
    let interrupt_page = page(1)?;
    let monitor_pages = page(2)?;
    let mut options = ConnectOptions::new(interrupt_page, (monitor_pages, monitor_pages + PAGE_SIZE));
    options.timeout_ns = super::CONTROL_TIMEOUT_NS;
    let transport = LoopbackTransport { bus: host, devices: Mutex::new(devices) };
    let mut connection = Connection::connect(transport, options)?;
    connection.request_offers()?;
    let pages = ArenaInterruptPages::new(arena.clone(), Some(interrupt_page), Some(monitor_pages + PAGE_SIZE));
    Ok(Bus::new(connection, pages, ArenaRingAllocator::new(arena)))
}

/// Hands the relids the host signalled (if its interrupt came) to the bus, then gives the host a turn and polls.
/// Returns the packets delivered to drivers.
pub fn dispatch(bus: &mut LoopbackKmclBus) -> u64 {
    let mut delivered = 0;
    if PENDING.swap(false, Ordering::AcqRel) {
        let relids = bus.connection().transport().host().take_guest_event_flags();
        if !relids.is_empty() {
            delivered += bus.process_interrupt(&relids);
        }
    }
    bus.connection().transport().host_turn();
    delivered + bus.poll()
}

/// Self-IPIs that could not be sent.
pub fn ipi_failures() -> u64 {
    IPI_FAILURES.load(Ordering::Relaxed)
}
