//! The synthetic interrupt controller (reference `hyperv-vmbus.md` §4): the message and event flags pages, the two
//! SINTs the kernel uses and their interrupt handlers, and the message slots as `vmbus::hv::SynicMessageSlot`s.
//!
//! - SINT 2 ([`VMBUS_SINT`]) carries VMBus: the host's control messages arrive in its message slot, where
//!   [`super::transport`] takes them with the end-of-message protocol, and its event flags name the channels (by
//!   relid) that have something to read. Its interrupt handler moves those flags, with atomic test-and-clear, into
//!   a kernel bitmap a channel layer drains with [`take_channel_events`].
//! - SINT 3 ([`TIMER_SINT`]) carries the synthetic timers' expiry messages; its handler consumes them and hands
//!   each to [`super::stimer`].
//!
//! Auto-EOI is used only where the hypervisor does not recommend against it (CPUID 0x40000004 EAX bit 9); otherwise
//! the device-vector stub EOIs the local APIC (it does so exactly when the vector is in service, which an auto-EOI
//! delivery never is).

use super::cpu::SyntheticMsrs;
use super::shared_page::{OutOfFrames, SharedPage};
use crate::arch::interrupts::{self, RegisterError};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use vmbus::hv::msr::{self, MsrAccess, SControl, SiefpMsr, SimpMsr, Sint};
use vmbus::hv::synic::{
    EVENT_FLAG_WORDS_PER_SINT, EventFlagScan, HvMessage, HvMessageType, MESSAGE_SIZE, SintRoute, SynicMessageSlot,
    SynicSetupError, consume_message, disable_synic, enable_synic, set_event_flag, sint_event_flags, take_event_flags,
};
use x86_64::PhysAddr;
use zerocopy::FromBytes;

pub use vmbus::hv::synic::VMBUS_SINT;

/// The SINT the synthetic timers post their expiry messages to (any SINT but 0 and VMBus's 2 would do).
pub const TIMER_SINT: u8 = 3;
/// The IDT vector of SINT 2 (VMBus messages and channel events).
pub const VMBUS_VECTOR: u8 = 0x50;
/// The IDT vector of SINT 3 (timer expiry messages).
pub const TIMER_MESSAGE_VECTOR: u8 = 0x51;
/// The most messages one timer interrupt consumes before returning (each EOM may deliver the next at once).
const MAX_MESSAGES_PER_INTERRUPT: usize = 16;

/// Why the SynIC could not be brought up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynicError {
    /// No frame for the message or event flags page.
    OutOfFrames,
    /// An interrupt vector was taken.
    Vector(RegisterError),
    /// `vmbus::hv` refused the configuration or the SynIC version.
    Setup(SynicSetupError),
}

impl core::fmt::Display for SynicError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SynicError::OutOfFrames => OutOfFrames.fmt(f),
            SynicError::Vector(e) => write!(f, "SINT vector: {e}"),
            SynicError::Setup(e) => write!(f, "SynIC: {e}"),
        }
    }
}

/// The SynIC of the (only) virtual processor: its two pages and the routing of SINTs 2 and 3.
pub struct Synic {
    message_page: SharedPage,
    event_page: SharedPage,
    auto_eoi: bool,
    enabled: AtomicBool,
}

/// Interrupts taken on [`VMBUS_VECTOR`].
static VMBUS_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// Interrupts taken on [`TIMER_MESSAGE_VECTOR`].
static TIMER_INTERRUPTS: AtomicU64 = AtomicU64::new(0);
/// Messages in the timer slot that were not well-formed timer expiries (counted and dropped).
static UNEXPECTED_TIMER_SLOT_MESSAGES: AtomicU64 = AtomicU64::new(0);
/// Channel event flags moved out of SINT 2's event flags by the interrupt handler, waiting for a channel layer.
static CHANNEL_EVENTS: [AtomicU64; EVENT_FLAG_WORDS_PER_SINT] =
    [const { AtomicU64::new(0) }; EVENT_FLAG_WORDS_PER_SINT];

impl Synic {
    /// Allocates the message and event flags pages, installs the interrupt handlers, and enables the SynIC with
    /// SINT 2 → [`VMBUS_VECTOR`] and SINT 3 → [`TIMER_MESSAGE_VECTOR`], using auto-EOI when `auto_eoi`.
    pub fn enable(msrs: &SyntheticMsrs, auto_eoi: bool) -> Result<Synic, SynicError> {
        let message_page = SharedPage::allocate().map_err(|_| SynicError::OutOfFrames)?;
        let event_page = SharedPage::allocate().map_err(|_| SynicError::OutOfFrames)?;
        let synic = Synic { message_page, event_page, auto_eoi, enabled: AtomicBool::new(false) };
        interrupts::register(VMBUS_VECTOR, vmbus_interrupt).map_err(SynicError::Vector)?;
        if let Err(e) = interrupts::register(TIMER_MESSAGE_VECTOR, timer_message_interrupt) {
            interrupts::unregister(VMBUS_VECTOR);
            return Err(SynicError::Vector(e));
        }
        if let Err(e) = synic.program(msrs) {
            interrupts::unregister(VMBUS_VECTOR);
            interrupts::unregister(TIMER_MESSAGE_VECTOR);
            return Err(e);
        }
        Ok(synic)
    }

    /// The two SINT routes.
    pub fn routes(&self) -> [SintRoute; 2] {
        let route = |index, vector| SintRoute {
            index,
            config: Sint::RESET.with_vector(vector).with_masked(false).with_auto_eoi(self.auto_eoi),
        };
        [route(VMBUS_SINT, VMBUS_VECTOR), route(TIMER_SINT, TIMER_MESSAGE_VECTOR)]
    }

    /// Writes SIMP, SIEFP, the SINTs and SCONTROL.
    fn program(&self, msrs: &SyntheticMsrs) -> Result<(), SynicError> {
        enable_synic(msrs, self.message_page.gpfn(), self.event_page.gpfn(), &self.routes())
            .map_err(SynicError::Setup)?;
        self.enabled.store(true, Ordering::Release);
        Ok(())
    }

    /// Enables the SynIC again after [`Synic::disable`], on the same pages.
    pub fn reenable(&self, msrs: &SyntheticMsrs) -> Result<(), SynicError> {
        self.program(msrs)
    }

    /// Teardown before reboot or shutdown (§4): masks SINTs 2 and 3, disables both pages and SCONTROL. The pages stay
    /// allocated (a late write by the hypervisor lands only there) and the handlers stay installed.
    pub fn disable(&self, msrs: &SyntheticMsrs) {
        self.enabled.store(false, Ordering::Release);
        disable_synic(msrs, &[VMBUS_SINT, TIMER_SINT]);
    }

    /// Whether the SynIC is enabled (by this module).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Whether the SINTs use auto-EOI.
    pub fn auto_eoi(&self) -> bool {
        self.auto_eoi
    }

    /// The guest physical addresses of the message page and the event flags page.
    pub fn pages_phys(&self) -> (PhysAddr, PhysAddr) {
        (self.message_page.phys(), self.event_page.phys())
    }

    /// The message slot of `sint` (0..16), with the EOM register reached through `msrs`.
    pub fn slot<'a>(&'a self, msrs: &'a SyntheticMsrs, sint: u8) -> Option<MessageSlot<'a>> {
        const SLOT_WORDS: usize = MESSAGE_SIZE / 8;
        let start = usize::from(sint).checked_mul(SLOT_WORDS)?;
        let words = self.message_page.words().get(start..start + SLOT_WORDS)?;
        Some(MessageSlot { words, msrs })
    }

    /// The whole message page as words (the tests plant messages in an unused slot).
    pub(super) fn message_page_words(&self) -> &'static [AtomicU64] {
        self.message_page.words()
    }

    /// The 2048 event flags of `sint` (0..16).
    pub fn event_flags(&self, sint: u8) -> Option<&'static [AtomicU64]> {
        sint_event_flags(self.event_page.words(), sint)
    }

    /// Reads back SCONTROL, SIMP, SIEFP and the two SINTs (for reports and tests).
    pub fn registers(&self, msrs: &SyntheticMsrs) -> SynicRegisters {
        let sint = |index| msr::sint(index).map_or(Sint::RESET, |number| Sint::from_bits(msrs.read_msr(number)));
        SynicRegisters {
            version: msrs.read_msr(msr::SVERSION),
            control: SControl::from_bits(msrs.read_msr(msr::SCONTROL)),
            simp: SimpMsr::from_bits(msrs.read_msr(msr::SIMP)),
            siefp: SiefpMsr::from_bits(msrs.read_msr(msr::SIEFP)),
            vmbus_sint: sint(VMBUS_SINT),
            timer_sint: sint(TIMER_SINT),
        }
    }
}

/// The SynIC registers as read back from the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SynicRegisters {
    /// SVERSION (1).
    pub version: u64,
    /// SCONTROL.
    pub control: SControl,
    /// SIMP.
    pub simp: SimpMsr,
    /// SIEFP.
    pub siefp: SiefpMsr,
    /// SINT 2.
    pub vmbus_sint: Sint,
    /// SINT 3.
    pub timer_sint: Sint,
}

/// One 256-byte slot of the real message page, plus the EOM MSR: what `vmbus::hv::consume_message` drives.
pub struct MessageSlot<'a> {
    /// The slot's 32 words; word 0 holds type (bits 31:0), payload size (39:32) and flags (47:40).
    words: &'a [AtomicU64],
    msrs: &'a SyntheticMsrs,
}

impl MessageSlot<'_> {
    /// Word 0 of the slot header.
    fn header_word(&self) -> u64 {
        self.words.first().map_or(0, |word| word.load(Ordering::Acquire))
    }
}

impl SynicMessageSlot for MessageSlot<'_> {
    fn message_type(&self) -> HvMessageType {
        HvMessageType(self.header_word() as u32)
    }

    fn read_message(&self) -> HvMessage {
        let mut bytes = [0u8; MESSAGE_SIZE];
        for (chunk, word) in bytes.as_chunks_mut::<8>().0.iter_mut().zip(self.words) {
            *chunk = word.load(Ordering::Acquire).to_le_bytes();
        }
        // The slot is exactly one `HvMessage`; a size mismatch would be caught by `read_from_bytes`.
        HvMessage::read_from_bytes(&bytes).unwrap_or(HvMessage::EMPTY)
    }

    fn clear_message_type(&self) {
        // An atomic update of word 0 that zeroes the type and leaves the flags byte as the hypervisor set it.
        if let Some(word) = self.words.first() {
            word.fetch_and(!0xFFFF_FFFF, Ordering::AcqRel);
        }
    }

    fn fence(&self) {
        fence(Ordering::SeqCst);
    }

    fn message_pending(&self) -> bool {
        (self.header_word() >> 40) & 1 != 0
    }

    fn write_eom(&self) {
        self.msrs.write_msr(msr::EOM, 0);
    }
}

/// Takes the channel events (relids whose flag the host set in SINT 2's event flags) collected so far, each once.
pub fn take_channel_events() -> EventFlagScan<'static> {
    take_event_flags(&CHANNEL_EVENTS)
}

/// Interrupt counts: (VMBus vector, timer message vector, dropped unexpected timer-slot messages).
pub fn interrupt_counts() -> (u64, u64, u64) {
    (
        VMBUS_INTERRUPTS.load(Ordering::Relaxed),
        TIMER_INTERRUPTS.load(Ordering::Relaxed),
        UNEXPECTED_TIMER_SLOT_MESSAGES.load(Ordering::Relaxed),
    )
}

/// SINT 2's handler: event flags first (§4), moved to [`CHANNEL_EVENTS`]; the message stays in its slot for
/// [`super::transport`] to take.
fn vmbus_interrupt() {
    VMBUS_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    let Some(synic) = super::get().and_then(|hv| hv.synic.as_ref()) else { return };
    if let Some(flags) = synic.event_flags(VMBUS_SINT) {
        for flag in take_event_flags(flags) {
            set_event_flag(&CHANNEL_EVENTS, flag);
        }
    }
}

/// SINT 3's handler: consumes the timer slot's messages with the EOM protocol and reports each expiry.
fn timer_message_interrupt() {
    TIMER_INTERRUPTS.fetch_add(1, Ordering::Relaxed);
    let Some(hv) = super::get() else { return };
    let Some(slot) = hv.synic.as_ref().and_then(|synic| synic.slot(&hv.msrs, TIMER_SINT)) else { return };
    for _ in 0..MAX_MESSAGES_PER_INTERRUPT {
        let Some(message) = consume_message(&slot) else { break };
        match message.timer_payload() {
            Some(expiry) => super::stimer::expired_by_message(&expiry),
            None => {
                UNEXPECTED_TIMER_SLOT_MESSAGES.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}
