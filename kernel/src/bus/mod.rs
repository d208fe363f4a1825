//! The kernel's VMBus: the pages a connection needs, ring memory for channels, and the table of what the host
//! offers (reference `hyperv-vmbus.md` §4–6, 8–9; issue 5).
//!
//! [`connect`] makes the guest's interrupt page and the two monitor pages (kept for the kernel's lifetime: the
//! host may write them until the connection is unloaded, and nothing else ever reuses them), connects through
//! [`crate::hyperv::KernelTransport`] with the newest version the host accepts, and asks for the offers.
//! [`BusPages`] is the kernel's `vmbus::channel::InterruptPages`: how a channel tells the host its ring changed.
//! [`rings`] gives channels their ring pages.

pub mod loopback;
pub mod rings;
pub mod runtime;

use crate::hyperv::shared_page::SharedPage;
use crate::hyperv::transport::KernelTransport;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;
use spin::Once;
use vmbus::channel::InterruptPages;
use vmbus::client::{ClientError, ConnectOptions, Connection, Offer};
use vmbus::protocol::MonitorBit;

/// How long connecting and each control request may take before the host is deemed silent.
pub const CONTROL_TIMEOUT_NS: u64 = 20_000_000_000;

/// The guest's interrupt page and monitor pages (§4, §9), shared with the host for the kernel's lifetime.
pub struct BusPages {
    /// The interrupt page: host → guest half first, guest → host half second (used below VMBus 2.4 and by channels
    /// without a dedicated interrupt).
    interrupt: SharedPage,
    /// Monitor page 1, written by the host.
    monitor_host_to_guest: SharedPage,
    /// Monitor page 2, where the guest sets the pending bits of monitored channels.
    monitor_guest_to_host: SharedPage,
}

/// Bit offset of the guest → host half of the interrupt page.
const SEND_INTERRUPT_FIRST_BIT: u32 = 2048 * 8;

impl BusPages {
    fn allocate() -> Result<BusPages, BusError> {
        let page = || SharedPage::allocate().map_err(|_| BusError::OutOfFrames);
        Ok(BusPages { interrupt: page()?, monitor_host_to_guest: page()?, monitor_guest_to_host: page()? })
    }

    fn options(&self) -> ConnectOptions {
        ConnectOptions::new(
            self.interrupt.phys().as_u64(),
            (self.monitor_host_to_guest.phys().as_u64(), self.monitor_guest_to_host.phys().as_u64()),
        )
    }
}

impl InterruptPages for BusPages {
    fn set_send_interrupt(&self, relid: u32) {
        let bit = SEND_INTERRUPT_FIRST_BIT + relid;
        if let Some(word) = self.interrupt.words().get((bit / 64) as usize) {
            word.fetch_or(1 << (bit % 64), Ordering::SeqCst);
        }
    }

    fn set_monitor_pending(&self, monitor_id: u8) {
        let Some(bit) = MonitorBit::for_monitor_id(monitor_id) else { return };
        // The pending word is a u32 at an 8-aligned offset: the low half of that page word (little-endian).
        let shift = (bit.pending_offset % 8) * 8;
        if let Some(word) = self.monitor_guest_to_host.words().get(bit.pending_offset / 8) {
            word.fetch_or(u64::from(bit.mask()) << shift, Ordering::SeqCst);
        }
    }

    fn exchange_monitor_latency(&self, monitor_id: u8, latency: u16) -> Option<u16> {
        let bit = MonitorBit::for_monitor_id(monitor_id)?;
        let word = self.monitor_guest_to_host.words().get(bit.latency_offset / 8)?;
        Some(bit.exchange_latency(word, latency))
    }
}

/// The bus pages, made once.
static PAGES: Once<Result<BusPages, BusError>> = Once::new();

/// The kernel's bus pages (made on first use and kept).
pub fn pages() -> Result<&'static BusPages, BusError> {
    PAGES.call_once(BusPages::allocate).as_ref().map_err(|e| *e)
}

/// Why the kernel could not reach VMBus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BusError {
    /// No Hyper-V hypercalls or SynIC: there is no VMBus host to talk to.
    NoHost,
    /// No frame for the interrupt or monitor pages.
    OutOfFrames,
    /// The control protocol failed.
    Client(ClientError),
}

impl core::fmt::Display for BusError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BusError::NoHost => f.write_str("no Hyper-V hypercalls and SynIC, so no VMBus host"),
            BusError::OutOfFrames => f.write_str("no frame for the interrupt and monitor pages"),
            BusError::Client(e) => write!(f, "{e}"),
        }
    }
}

impl From<ClientError> for BusError {
    fn from(e: ClientError) -> BusError {
        BusError::Client(e)
    }
}

/// Connects to the host's VMBus (newest version first, interrupts to this VP) and takes its offers.
pub fn connect() -> Result<Connection<KernelTransport>, BusError> {
    let transport = KernelTransport::new().ok_or(BusError::NoHost)?;
    let mut options = pages()?.options();
    options.target_vp = transport.vp_index();
    options.timeout_ns = CONTROL_TIMEOUT_NS;
    let mut connection = Connection::connect(transport, options)?;
    connection.request_offers()?;
    Ok(connection)
}

/// The version negotiation as one line: each version proposed, newest first, and the host's answer.
pub fn negotiation_line(connection: &Connection<KernelTransport>) -> String {
    let mut line = String::from("VMBus versions:");
    for (version, answer) in connection.version_attempts() {
        let _ = write!(line, " {version} {answer};");
    }
    line.pop();
    let _ = write!(line, "; message connection id {}", connection.message_connection_id());
    line
}

/// The offers as a table: one line per channel with its class name (or "no driver"/unknown), instance GUID, relid,
/// connection id, flags and how it is signalled.
pub fn offer_table<'a>(offers: impl IntoIterator<Item = &'a Offer>, has_driver: impl Fn(&Offer) -> bool) -> String {
    let mut offers: Vec<&Offer> = offers.into_iter().collect();
    offers.sort_by_key(|offer| offer.child_relid);
    let mut table = String::from(
        "relid  class                 instance                              conn  flags   signalling           driver\n",
    );
    for offer in offers {
        let signalling = match (offer.monitor_id, offer.dedicated_interrupt) {
            (Some(id), _) => format!("monitored (id {id})"),
            (None, true) => String::from("dedicated interrupt"),
            (None, false) => String::from("event flags"),
        };
        let class = match offer.class_name() {
            Some(name) => String::from(name),
            // Not a Hyper-V class: the `vmbus` crate's example device (served by the loopback host).
            None if offer.interface_type == vmbus::kmcl::echo::ECHO_INTERFACE_TYPE => String::from("echo (example)"),
            None => format!("unknown {}", offer.interface_type),
        };
        let _ = writeln!(
            table,
            "{:>5}  {:<20}  {}  {:>4}  {:#06x}  {:<19}  {}",
            offer.child_relid,
            class,
            offer.interface_instance,
            offer.connection_id,
            offer.flags.bits(),
            signalling,
            if has_driver(offer) { "bound" } else { "none" },
        );
    }
    table
}

pub mod tests;
pub use tests::KTESTS;
