//! The kernel's [`VmbusTransport`]: what `vmbus::client::Connection` needs from the platform (reference
//! `hyperv-vmbus.md` §3–5), built from the hypercall page, the SynIC and the clock.
//!
//! - PostMessage and SignalEvent go through [`super::hypercall::HypercallInterface`]; the PostMessage retry policy's
//!   back-off waits with [`KernelDelay`].
//! - [`VmbusTransport::poll_message`] takes the next message from SINT 2's slot with `vmbus::hv::consume_message`
//!   (copy, clear type, barrier, EOM if MessagePending). Hypervisor-generated types and malformed sizes are counted
//!   and dropped, never trusted.
//! - [`VmbusTransport::wait`] halts until the next interrupt, bounded by a one-shot synthetic timer 1 so that the
//!   client's time limits still run when the host stays silent; where that timer is not available, or interrupts are
//!   off, it spins briefly instead.

use super::HyperV;
use super::synic::{MessageSlot, VMBUS_SINT};
use core::sync::atomic::{AtomicU64, Ordering};
use core::time::Duration;
use vmbus::client::VmbusTransport;
use vmbus::hv::hypercall::Delay;
use vmbus::hv::synic::{HvMessageType, SynicMessageSlot, consume_message};
use vmbus::hv::{HvError, Hypercalls};
use vmbus::protocol::MAX_MESSAGE_SIZE;
use x86_64::instructions::interrupts;

/// How long one [`VmbusTransport::wait`] halts at most.
pub const WAIT_LIMIT: Duration = Duration::from_millis(1);
/// How long one [`VmbusTransport::wait`] spins when it cannot halt.
const WAIT_SPIN: Duration = Duration::from_micros(50);

/// Messages dropped by [`VmbusTransport::poll_message`] because they were not VMBus messages or claimed an
/// impossible size.
static DROPPED_MESSAGES: AtomicU64 = AtomicU64::new(0);

/// Busy-waits on the kernel clock (the PostMessage back-off).
pub struct KernelDelay;

impl Delay for KernelDelay {
    fn delay_us(&self, us: u64) {
        if crate::time::clock_name().is_some() {
            crate::time::sleep(Duration::from_micros(us));
        } else {
            // No clock yet (bring-up order): spin roughly; a PAUSE takes at least some nanoseconds everywhere.
            for _ in 0..us.saturating_mul(100) {
                core::hint::spin_loop();
            }
        }
    }
}

/// The platform side of a VMBus connection in this kernel.
pub struct KernelTransport {
    hv: &'static HyperV,
}

impl KernelTransport {
    /// The transport, once the Hyper-V layer has the hypercall page and the SynIC up; `None` otherwise.
    pub fn new() -> Option<KernelTransport> {
        let hv = super::get()?;
        (hv.hypercalls.is_some() && hv.synic.is_some()).then_some(KernelTransport { hv })
    }

    fn slot(&self) -> Option<MessageSlot<'static>> {
        self.hv.synic.as_ref()?.slot(&self.hv.msrs, VMBUS_SINT)
    }

    fn message_waiting(&self) -> bool {
        self.slot().is_some_and(|slot| slot.message_type() != HvMessageType::NONE)
    }

    /// Spins until a message waits or [`WAIT_SPIN`] passes.
    fn spin(&self) {
        let deadline = crate::time::now().saturating_add(WAIT_SPIN.as_nanos() as u64);
        while !self.message_waiting() && crate::time::now() < deadline {
            core::hint::spin_loop();
        }
    }

    /// The VP_INDEX of the processor that receives the host's messages.
    pub fn vp_index(&self) -> u32 {
        self.hv.vp_index
    }
}

/// Messages [`VmbusTransport::poll_message`] dropped so far.
pub fn dropped_messages() -> u64 {
    DROPPED_MESSAGES.load(Ordering::Relaxed)
}

impl Hypercalls for KernelTransport {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> Result<(), HvError> {
        let hypercalls = self.hv.hypercalls.as_ref().ok_or(HvError::INVALID_PARTITION_STATE)?;
        hypercalls.post_message(connection_id, message_type, payload)
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        let hypercalls = self.hv.hypercalls.as_ref().ok_or(HvError::INVALID_PARTITION_STATE)?;
        hypercalls.signal_event(connection_id, flag)
    }
}

impl Delay for KernelTransport {
    fn delay_us(&self, us: u64) {
        KernelDelay.delay_us(us);
    }
}

impl VmbusTransport for KernelTransport {
    fn poll_message(&self, buf: &mut [u8; MAX_MESSAGE_SIZE]) -> Option<usize> {
        let slot = self.slot()?;
        loop {
            let message = consume_message(&slot)?;
            if message.message_type().is_hypervisor_message() {
                DROPPED_MESSAGES.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let Ok(payload) = message.payload() else {
                DROPPED_MESSAGES.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(destination) = buf.get_mut(..payload.len()) else {
                DROPPED_MESSAGES.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            destination.copy_from_slice(payload);
            return Some(payload.len());
        }
    }

    fn now_ns(&self) -> u64 {
        crate::time::now()
    }

    fn wait(&self) {
        if !interrupts::are_enabled() {
            self.spin();
            return;
        }
        interrupts::disable();
        if self.message_waiting() {
            interrupts::enable();
            return;
        }
        let armed = match (&self.hv.timers, &self.hv.clock) {
            (Some(timers), Some(clock)) => timers.arm_wakeup(clock, WAIT_LIMIT).is_ok(),
            _ => false,
        };
        if armed {
            // STI's one-instruction shadow makes "enable, then halt" atomic: a SINT 2 interrupt that became pending
            // after the check above still ends the halt.
            interrupts::enable_and_hlt();
        } else {
            interrupts::enable();
            self.spin();
        }
    }
}
