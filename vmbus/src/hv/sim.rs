//! A simulated Hyper-V for host tests: one partition with one virtual processor, its SynIC, its hypercalls,
//! and the host side of its connections. Deterministic and single-threaded friendly (a `spin::Mutex` guards
//! the state; event flags are atomics so the guest scans them exactly as it scans the real SIEFP page).
//!
//! It enforces the TLFS rules of reference §2–4 that the guest code depends on:
//! - PostMessage: the PostMessages privilege (ACCESS_DENIED), message type non-zero with bit 31 clear and a
//!   payload of at most 240 bytes (INVALID_PARAMETER), a registered connection (INVALID_CONNECTION_ID) to a
//!   message port (INVALID_PORT_ID), at most [`PORT_MESSAGE_BUFFERS`] undelivered messages per port
//!   (INSUFFICIENT_BUFFERS).
//!   A message port may carry a host-side [`PostFilter`] that refuses a payload at hypercall time (QEMU's VMBus
//!   host validates in its PostMessage handler the same way; the VMBus server uses it to refuse INITIATE_CONTACT
//!   on the wrong connection id).
//! - SignalEvent: the SignalEvents privilege, a registered event port, a flag below the port's flag count.
//! - Host → guest messages: one slot per SINT; while it is busy later messages queue (at most
//!   [`PORT_MESSAGE_BUFFERS`]) and MessagePending is set in the slot; only a write to EOM delivers the next one
//!   (so a guest that forgets EOM stalls, as it would on Hyper-V). Delivery needs SCONTROL and SIMP enabled
//!   (else INVALID_SYNIC_STATE); a masked SINT gets the message but its interrupt is held until unmasked.
//! - Host → guest events: setting a clear flag raises an interrupt, setting a set flag does not; SCONTROL and
//!   SIEFP must be enabled and the SINT unmasked (else INVALID_SYNIC_STATE).
//! - MSRs: the hypercall page cannot be enabled while GUEST_OS_ID is zero; read-only and unknown MSRs fault.
//!
//! A "fault" (what would be #GP or #UD on hardware: an unknown MSR, a hypercall with no hypercall page) is a
//! guest bug and panics with an explanation. Synthetic timers are stored but not run.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;
use core::sync::atomic::{self, AtomicU64, Ordering};

use spin::Mutex;

use super::cpuid::{CpuidSource, leaf};
use super::hypercall::{HvError, Hypercalls};
use super::msr::{self, GuestOsId, HypercallMsr, MsrAccess, SControl, SiefpMsr, SimpMsr, Sint};
use super::synic::{
    EVENT_FLAG_WORDS_PER_SINT, EVENT_FLAGS_PER_SINT, HvMessage, HvMessageType,
    MESSAGE_PAYLOAD_SIZE, MessageFlags, SINT_COUNT, SynicMessageSlot, set_event_flag,
    sint_event_flags,
};
use super::time::TimeRefCounter;

/// Message buffers per port: undelivered messages beyond this are refused with INSUFFICIENT_BUFFERS (§3).
pub const PORT_MESSAGE_BUFFERS: usize = 16;

/// A table of CPUID leaves answering [`CpuidSource`] queries, with presets for the platforms detection must
/// tell apart. Leaves not in the table read as zero.
#[derive(Clone, Debug, Default)]
pub struct SimCpuid {
    leaves: BTreeMap<u32, [u32; 4]>,
}

/// Packs a 12-byte signature into EBX, ECX, EDX.
fn signature_registers(signature: &[u8; 12]) -> [u32; 3] {
    let word = |i: usize| {
        u32::from_le_bytes([
            signature[i],
            signature[i + 1],
            signature[i + 2],
            signature[i + 3],
        ])
    };
    [word(0), word(4), word(8)]
}

impl SimCpuid {
    /// Bare metal, or QEMU TCG without a hypervisor signature: CPUID.1:ECX bit 31 clear.
    pub fn no_hypervisor() -> Self {
        let mut cpuid = Self::default();
        cpuid.set(
            leaf::VERSION_AND_FEATURES,
            [0x000A_0671, 0, 0x7FFA_FBFF, 0x0F8B_FBFF],
        );
        cpuid
    }

    /// Plain KVM: a hypervisor, but leaf 0x40000001 holds KVM's feature bits, not "Hv#1".
    pub fn kvm() -> Self {
        let mut cpuid = Self::no_hypervisor();
        cpuid.set_hypervisor_bit();
        let [ebx, ecx, edx] = signature_registers(b"KVMKVMKVM\0\0\0");
        cpuid.set(leaf::VENDOR_AND_MAX, [0x4000_0001, ebx, ecx, edx]);
        cpuid.set(leaf::INTERFACE, [0x0100_7AFB, 0, 0, 0]);
        cpuid
    }

    /// Hyper-V (Windows Server 2022-like) offering everything this kernel uses.
    pub fn hyperv() -> Self {
        let mut cpuid = Self::no_hypervisor();
        cpuid.set_hypervisor_bit();
        let [ebx, ecx, edx] = signature_registers(b"Microsoft Hv");
        cpuid.set(leaf::VENDOR_AND_MAX, [0x4000_000B, ebx, ecx, edx]);
        cpuid.set(leaf::INTERFACE, [0x3123_7648, 0, 0, 0]);
        cpuid.set(leaf::VERSION, [20348, 0x000A_0000, 0, 0x0000_0A2B]);
        // EAX: MSR bits 0-7, 9, 10, 11, 13; EBX: PostMessages, SignalEvents, extended hypercalls;
        // EDX: XMM input, frequency MSRs available, crash MSRs, stimer direct mode.
        cpuid.set(
            leaf::FEATURES,
            [0x0000_2EFF, 0x0010_0030, 0x0000_0002, 0x0008_0510],
        );
        // Recommendations: APIC MSRs, relaxed timing, deprecate auto-EOI; spin-wait never notifies.
        cpuid.set(leaf::RECOMMENDATIONS, [0x0000_0228, 0xFFFF_FFFF, 0, 0]);
        cpuid.set(leaf::LIMITS, [240, 2048, 0, 0]);
        cpuid.set(leaf::HARDWARE_FEATURES, [0x0000_000E, 0, 0, 0]);
        cpuid
    }

    /// KVM with Hyper-V enlightenments: the Hyper-V leaves, plus KVM's signature moved to 0x40000100.
    pub fn hyperv_on_kvm() -> Self {
        let mut cpuid = Self::hyperv();
        let [ebx, ecx, edx] = signature_registers(b"KVMKVMKVM\0\0\0");
        cpuid.set(leaf::KVM_WITH_HYPERV, [0x4000_0101, ebx, ecx, edx]);
        cpuid
    }

    /// Sets CPUID.1:ECX bit 31.
    fn set_hypervisor_bit(&mut self) {
        let [eax, ebx, ecx, edx] = self.get(leaf::VERSION_AND_FEATURES);
        self.set(
            leaf::VERSION_AND_FEATURES,
            [eax, ebx, ecx | super::cpuid::HYPERVISOR_PRESENT, edx],
        );
    }

    /// Replaces leaf `leaf` (sub-leaf 0).
    pub fn set(&mut self, leaf: u32, registers: [u32; 4]) {
        self.leaves.insert(leaf, registers);
    }

    /// Reads leaf `leaf` (zero if absent).
    pub fn get(&self, leaf: u32) -> [u32; 4] {
        self.leaves.get(&leaf).copied().unwrap_or_default()
    }
}

impl CpuidSource for SimCpuid {
    fn cpuid(&self, leaf: u32, _subleaf: u32) -> [u32; 4] {
        self.get(leaf)
    }
}

/// How a [`SimHypervisor`] starts.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SimConfig {
    /// Start as if the guest had already written GUEST_OS_ID, enabled the hypercall page, SIMP, SIEFP and
    /// SCONTROL, and unmasked every SINT (to vector 0x40 + n). When false, every MSR is at its reset value.
    pub guest_ready: bool,
    /// The partition holds the PostMessages privilege.
    pub post_messages: bool,
    /// The partition holds the SignalEvents privilege.
    pub signal_events: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            guest_ready: true,
            post_messages: true,
            signal_events: true,
        }
    }
}

impl SimConfig {
    /// Power-on state: the guest must bring the hypercall page and SynIC up itself.
    pub fn reset() -> Self {
        Self {
            guest_ready: false,
            ..Self::default()
        }
    }
}

/// A message the guest posted, as the host receives it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct PostedMessage {
    /// The connection the guest posted to.
    pub connection_id: u32,
    /// The message type the guest gave.
    pub message_type: HvMessageType,
    /// The payload (at most 240 bytes).
    pub payload: Vec<u8>,
}

/// A host-side admission check on a message port, run inside PostMessage before the message takes a buffer:
/// `Err(status)` refuses the payload and the guest's hypercall returns that status; nothing is queued.
///
/// It runs with the simulator's state locked, so it must not call back into the [`SimHypervisor`].
pub struct PostFilter(Box<PostCheck>);

/// The check a [`PostFilter`] runs on each payload.
type PostCheck = dyn Fn(&[u8]) -> Result<(), HvError> + Send;

impl PostFilter {
    /// Wraps `check`, which sees each payload posted to the port.
    pub fn new(check: impl Fn(&[u8]) -> Result<(), HvError> + Send + 'static) -> PostFilter {
        PostFilter(Box::new(check))
    }

    /// Runs the check on `payload`.
    pub fn check(&self, payload: &[u8]) -> Result<(), HvError> {
        (self.0)(payload)
    }
}

impl core::fmt::Debug for PostFilter {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("PostFilter(..)")
    }
}

/// The host end of a guest connection.
#[derive(Debug)]
enum HostPort {
    /// Receives the guest's PostMessage calls.
    Message { queue: VecDeque<PostedMessage> },
    /// Receives the guest's SignalEvent calls.
    Event {
        flag_count: u16,
        flags: BTreeSet<u16>,
        signals: u64,
    },
}

/// The guest-side state of one SINT.
#[derive(Debug)]
struct SintState {
    /// The message slot as it sits in the guest's SIMP page.
    slot: HvMessage,
    /// Messages waiting for the slot (delivered one per EOM).
    queue: VecDeque<HvMessage>,
    /// Interrupts raised and not yet taken by the test.
    interrupts: u32,
    /// An interrupt arrived while the SINT was masked.
    held_interrupt: bool,
}

/// The guest's synthetic MSRs.
#[derive(Debug)]
struct Registers {
    guest_os_id: u64,
    hypercall: u64,
    scontrol: u64,
    simp: u64,
    siefp: u64,
    sints: [u64; SINT_COUNT],
    stimers: [(u64, u64); msr::STIMER_COUNT as usize],
    reference_tsc: u64,
}

#[derive(Debug)]
struct State {
    config: SimConfig,
    registers: Registers,
    time_ref_count: u64,
    ports: BTreeMap<u32, HostPort>,
    /// Admission checks of message ports, by connection id.
    post_filters: BTreeMap<u32, PostFilter>,
    sints: [SintState; SINT_COUNT],
    eoms: u64,
}

/// The simulated hypervisor. The guest side uses it through [`Hypercalls`], [`MsrAccess`],
/// [`SimHypervisor::message_slot`], [`SimHypervisor::guest_event_flags`] and [`TimeRefCounter`]; the host side
/// (a test, later the VMBus server) through the `register_*`, `host_*`, `send_to_guest` and `signal_guest`
/// methods.
#[derive(Debug)]
pub struct SimHypervisor {
    state: Mutex<State>,
    /// The guest's SIEFP page: 16 SINTs × 32 words.
    event_flags: Vec<AtomicU64>,
}

impl Default for SimHypervisor {
    fn default() -> Self {
        Self::new(SimConfig::default())
    }
}

/// Panics for what would be a processor fault on real hardware: always a guest bug.
#[track_caller]
fn guest_fault(what: &str) -> ! {
    panic!("simulated #GP/#UD: {what}");
}

impl SimHypervisor {
    /// The hypercall page frame used by [`SimConfig::guest_ready`].
    pub const READY_HYPERCALL_GPFN: u64 = 0x100;
    /// The SIMP frame used by [`SimConfig::guest_ready`].
    pub const READY_SIMP_GPFN: u64 = 0x101;
    /// The SIEFP frame used by [`SimConfig::guest_ready`].
    pub const READY_SIEFP_GPFN: u64 = 0x102;
    /// SINT n is routed to vector `READY_VECTOR_BASE + n` by [`SimConfig::guest_ready`].
    pub const READY_VECTOR_BASE: u8 = 0x40;

    /// A hypervisor in the state `config` describes, with no connections registered.
    pub fn new(config: SimConfig) -> Self {
        let mut registers = Registers {
            guest_os_id: 0,
            hypercall: 0,
            scontrol: 0,
            simp: 0,
            siefp: 0,
            sints: [Sint::RESET.bits(); SINT_COUNT],
            stimers: [(0, 0); msr::STIMER_COUNT as usize],
            reference_tsc: 0,
        };
        if config.guest_ready {
            registers.guest_os_id = GuestOsId::for_this_kernel(0, 1, 0).bits();
            registers.hypercall = HypercallMsr::default()
                .enabled_at(Self::READY_HYPERCALL_GPFN)
                .bits();
            registers.scontrol = SControl::default().with_enabled(true).bits();
            registers.simp = SimpMsr::default().enabled_at(Self::READY_SIMP_GPFN).bits();
            registers.siefp = SiefpMsr::default()
                .enabled_at(Self::READY_SIEFP_GPFN)
                .bits();
            for (index, sint) in (0u8..).zip(registers.sints.iter_mut()) {
                *sint = Sint::RESET
                    .with_vector(Self::READY_VECTOR_BASE + index)
                    .with_masked(false)
                    .bits();
            }
        }
        let state = State {
            config,
            registers,
            time_ref_count: 0,
            ports: BTreeMap::new(),
            post_filters: BTreeMap::new(),
            sints: core::array::from_fn(|_| SintState {
                slot: HvMessage::EMPTY,
                queue: VecDeque::new(),
                interrupts: 0,
                held_interrupt: false,
            }),
            eoms: 0,
        };
        let event_flags = (0..SINT_COUNT * EVENT_FLAG_WORDS_PER_SINT)
            .map(|_| AtomicU64::new(0))
            .collect();
        Self {
            state: Mutex::new(state),
            event_flags,
        }
    }

    // ---- host side ----

    /// Lets the guest post messages to `connection_id` (replacing any earlier port with that id, and its filter).
    pub fn register_message_port(&self, connection_id: u32) {
        let mut state = self.state.lock();
        state.post_filters.remove(&connection_id);
        state.ports.insert(
            connection_id,
            HostPort::Message {
                queue: VecDeque::new(),
            },
        );
    }

    /// Like [`register_message_port`](Self::register_message_port), with `filter` deciding at PostMessage time
    /// whether each payload is accepted.
    pub fn register_filtered_message_port(&self, connection_id: u32, filter: PostFilter) {
        let mut state = self.state.lock();
        state.post_filters.insert(connection_id, filter);
        state.ports.insert(
            connection_id,
            HostPort::Message {
                queue: VecDeque::new(),
            },
        );
    }

    /// Lets the guest signal flags `0..flag_count` through `connection_id`.
    pub fn register_event_port(&self, connection_id: u32, flag_count: u16) {
        let port = HostPort::Event {
            flag_count,
            flags: BTreeSet::new(),
            signals: 0,
        };
        self.state.lock().ports.insert(connection_id, port);
    }

    /// Removes the port behind `connection_id`; the guest then gets INVALID_CONNECTION_ID.
    pub fn unregister_port(&self, connection_id: u32) {
        let mut state = self.state.lock();
        state.ports.remove(&connection_id);
        state.post_filters.remove(&connection_id);
    }

    /// Takes the oldest message the guest posted to `connection_id`, freeing its buffer.
    pub fn host_receive(&self, connection_id: u32) -> Option<PostedMessage> {
        match self.state.lock().ports.get_mut(&connection_id) {
            Some(HostPort::Message { queue }) => queue.pop_front(),
            _ => None,
        }
    }

    /// Takes every message the guest posted to `connection_id`, oldest first.
    pub fn host_drain(&self, connection_id: u32) -> Vec<PostedMessage> {
        match self.state.lock().ports.get_mut(&connection_id) {
            Some(HostPort::Message { queue }) => queue.drain(..).collect(),
            _ => Vec::new(),
        }
    }

    /// How many posted messages wait at `connection_id`.
    pub fn host_pending(&self, connection_id: u32) -> usize {
        match self.state.lock().ports.get(&connection_id) {
            Some(HostPort::Message { queue }) => queue.len(),
            _ => 0,
        }
    }

    /// Takes the flags the guest signalled through `connection_id` since the last call, lowest first.
    pub fn host_take_events(&self, connection_id: u32) -> Vec<u16> {
        match self.state.lock().ports.get_mut(&connection_id) {
            Some(HostPort::Event { flags, .. }) => core::mem::take(flags).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// How many SignalEvent calls succeeded on `connection_id` in total.
    pub fn host_signal_count(&self, connection_id: u32) -> u64 {
        match self.state.lock().ports.get(&connection_id) {
            Some(HostPort::Event { signals, .. }) => *signals,
            _ => 0,
        }
    }

    /// Sends a message to the guest's SINT `sint`, as the host (or the hypervisor itself, for types with bit 31
    /// set) would. The message lands in the slot if it is free and no earlier message waits, else it queues and
    /// the busy slot gets MessagePending.
    pub fn send_to_guest(
        &self,
        sint: u8,
        message_type: HvMessageType,
        payload: &[u8],
    ) -> Result<(), HvError> {
        if message_type == HvMessageType::NONE || payload.len() > MESSAGE_PAYLOAD_SIZE {
            return Err(HvError::INVALID_PARAMETER);
        }
        let message = HvMessage::new(message_type, 0, payload)?;
        let mut state = self.state.lock();
        let index = usize::from(sint);
        if index >= SINT_COUNT {
            return Err(HvError::INVALID_PARAMETER);
        }
        let registers = &state.registers;
        if !SControl::from_bits(registers.scontrol).enabled()
            || !SimpMsr::from_bits(registers.simp).enabled()
        {
            return Err(HvError::INVALID_SYNIC_STATE);
        }
        let sint_state = &mut state.sints[index];
        let slot_free =
            sint_state.slot.message_type() == HvMessageType::NONE && sint_state.queue.is_empty();
        if slot_free {
            sint_state.slot = message;
            state.raise_interrupt(index);
        } else {
            if sint_state.queue.len() >= PORT_MESSAGE_BUFFERS {
                return Err(HvError::INSUFFICIENT_BUFFERS);
            }
            sint_state.queue.push_back(message);
            if sint_state.slot.message_type() != HvMessageType::NONE {
                sint_state.slot.header.flags |= MessageFlags::MESSAGE_PENDING.bits();
            }
        }
        Ok(())
    }

    /// Sets event flag `flag` of the guest's SINT `sint`, as a host SignalEvent would. Returns whether the flag
    /// was clear (and so an interrupt was raised).
    pub fn signal_guest(&self, sint: u8, flag: u16) -> Result<bool, HvError> {
        let mut state = self.state.lock();
        let index = usize::from(sint);
        if index >= SINT_COUNT || usize::from(flag) >= EVENT_FLAGS_PER_SINT {
            return Err(HvError::INVALID_PARAMETER);
        }
        let registers = &state.registers;
        if !SControl::from_bits(registers.scontrol).enabled()
            || !SiefpMsr::from_bits(registers.siefp).enabled()
            || Sint::from_bits(registers.sints[index]).masked()
        {
            return Err(HvError::INVALID_SYNIC_STATE);
        }
        let words = sint_event_flags(&self.event_flags, sint).ok_or(HvError::INVALID_PARAMETER)?;
        let newly_set = set_event_flag(words, u32::from(flag)).ok_or(HvError::INVALID_PARAMETER)?;
        if newly_set {
            state.raise_interrupt(index);
        }
        Ok(newly_set)
    }

    /// Advances the partition reference time by `ticks` × 100 ns.
    pub fn advance_time(&self, ticks: u64) {
        let mut state = self.state.lock();
        state.time_ref_count = state.time_ref_count.saturating_add(ticks);
    }

    // ---- guest side and observation ----

    /// The guest's view of SINT `sint`'s message slot, or `None` if `sint` is out of range.
    pub fn message_slot(&self, sint: u8) -> Option<SimMessageSlot<'_>> {
        (usize::from(sint) < SINT_COUNT).then_some(SimMessageSlot {
            hypervisor: self,
            index: usize::from(sint),
        })
    }

    /// The guest's event flags of SINT `sint` (32 words), or `None` if `sint` is out of range.
    pub fn guest_event_flags(&self, sint: u8) -> Option<&[AtomicU64]> {
        sint_event_flags(&self.event_flags, sint)
    }

    /// Takes the count of interrupts raised on SINT `sint` since the last call.
    pub fn take_interrupts(&self, sint: u8) -> u32 {
        let mut state = self.state.lock();
        state
            .sints
            .get_mut(usize::from(sint))
            .map_or(0, |s| core::mem::take(&mut s.interrupts))
    }

    /// How many messages wait behind SINT `sint`'s slot.
    pub fn queued_for_guest(&self, sint: u8) -> usize {
        self.state
            .lock()
            .sints
            .get(usize::from(sint))
            .map_or(0, |s| s.queue.len())
    }

    /// How many times the guest wrote EOM.
    pub fn eom_count(&self) -> u64 {
        self.state.lock().eoms
    }
}

impl State {
    /// Raises SINT `index`'s interrupt, or holds it while the SINT is masked.
    fn raise_interrupt(&mut self, index: usize) {
        let masked = Sint::from_bits(self.registers.sints[index]).masked();
        let sint = &mut self.sints[index];
        if masked {
            sint.held_interrupt = true;
        } else {
            sint.interrupts += 1;
        }
    }

    /// EOM: every SINT whose slot is empty gets its next queued message (§4).
    fn end_of_message(&mut self) {
        self.eoms += 1;
        for index in 0..SINT_COUNT {
            let sint = &mut self.sints[index];
            if sint.slot.message_type() != HvMessageType::NONE {
                continue;
            }
            let Some(mut next) = sint.queue.pop_front() else {
                continue;
            };
            if !sint.queue.is_empty() {
                next.header.flags |= MessageFlags::MESSAGE_PENDING.bits();
            }
            sint.slot = next;
            self.raise_interrupt(index);
        }
    }

    /// Panics unless the guest has enabled the hypercall page.
    #[track_caller]
    fn require_hypercall_page(&self) {
        if !HypercallMsr::from_bits(self.registers.hypercall).enabled() {
            guest_fault("hypercall issued before the hypercall page was enabled");
        }
    }
}

impl Hypercalls for SimHypervisor {
    fn post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvError> {
        let mut state = self.state.lock();
        state.require_hypercall_page();
        if !state.config.post_messages {
            return Err(HvError::ACCESS_DENIED);
        }
        let message_type = HvMessageType(message_type);
        if !message_type.is_postable() || payload.len() > MESSAGE_PAYLOAD_SIZE {
            return Err(HvError::INVALID_PARAMETER);
        }
        let state = &mut *state;
        match state.ports.get_mut(&connection_id) {
            None => Err(HvError::INVALID_CONNECTION_ID),
            Some(HostPort::Event { .. }) => Err(HvError::INVALID_PORT_ID),
            Some(HostPort::Message { queue }) => {
                if let Some(filter) = state.post_filters.get(&connection_id) {
                    filter.check(payload)?;
                }
                if queue.len() >= PORT_MESSAGE_BUFFERS {
                    return Err(HvError::INSUFFICIENT_BUFFERS);
                }
                queue.push_back(PostedMessage {
                    connection_id,
                    message_type,
                    payload: payload.to_vec(),
                });
                Ok(())
            }
        }
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        let mut state = self.state.lock();
        state.require_hypercall_page();
        if !state.config.signal_events {
            return Err(HvError::ACCESS_DENIED);
        }
        match state.ports.get_mut(&connection_id) {
            None => Err(HvError::INVALID_CONNECTION_ID),
            Some(HostPort::Message { .. }) => Err(HvError::INVALID_PORT_ID),
            Some(HostPort::Event { flag_count, .. }) if flag >= *flag_count => {
                Err(HvError::INVALID_PARAMETER)
            }
            Some(HostPort::Event { flags, signals, .. }) => {
                flags.insert(flag);
                *signals += 1;
                Ok(())
            }
        }
    }
}

impl MsrAccess for SimHypervisor {
    fn read_msr(&self, number: u32) -> u64 {
        let state = self.state.lock();
        let registers = &state.registers;
        match number {
            msr::GUEST_OS_ID => registers.guest_os_id,
            msr::HYPERCALL => registers.hypercall,
            msr::VP_INDEX => 0,
            msr::TIME_REF_COUNT => state.time_ref_count,
            msr::REFERENCE_TSC => registers.reference_tsc,
            msr::SCONTROL => registers.scontrol,
            msr::SVERSION => msr::SYNIC_VERSION,
            msr::SIEFP => registers.siefp,
            msr::SIMP => registers.simp,
            msr::EOM => 0,
            n if (msr::SINT0..msr::SINT0 + SINT_COUNT as u32).contains(&n) => {
                registers.sints[(n - msr::SINT0) as usize]
            }
            n if (msr::STIMER0_CONFIG..msr::STIMER0_CONFIG + 2 * u32::from(msr::STIMER_COUNT))
                .contains(&n) =>
            {
                let (config, count) = registers.stimers[((n - msr::STIMER0_CONFIG) / 2) as usize];
                if (n - msr::STIMER0_CONFIG).is_multiple_of(2) {
                    config
                } else {
                    count
                }
            }
            _ => guest_fault("rdmsr of an MSR the simulator does not implement"),
        }
    }

    fn write_msr(&self, number: u32, value: u64) {
        let mut state = self.state.lock();
        match number {
            msr::GUEST_OS_ID => state.registers.guest_os_id = value,
            msr::HYPERCALL => {
                let mut requested = HypercallMsr::from_bits(value);
                if state.registers.guest_os_id == 0 {
                    // The enable bit does not stick until the guest has identified itself.
                    requested = requested.with_enabled(false);
                }
                state.registers.hypercall = requested.bits();
            }
            msr::REFERENCE_TSC => state.registers.reference_tsc = value,
            msr::SCONTROL => state.registers.scontrol = value,
            msr::SIEFP => state.registers.siefp = value,
            msr::SIMP => state.registers.simp = value,
            msr::EOM => state.end_of_message(),
            n if (msr::SINT0..msr::SINT0 + SINT_COUNT as u32).contains(&n) => {
                let index = (n - msr::SINT0) as usize;
                state.registers.sints[index] = value;
                if !Sint::from_bits(value).masked()
                    && core::mem::take(&mut state.sints[index].held_interrupt)
                {
                    state.sints[index].interrupts += 1;
                }
            }
            n if (msr::STIMER0_CONFIG..msr::STIMER0_CONFIG + 2 * u32::from(msr::STIMER_COUNT))
                .contains(&n) =>
            {
                let timer = &mut state.registers.stimers[((n - msr::STIMER0_CONFIG) / 2) as usize];
                if (n - msr::STIMER0_CONFIG).is_multiple_of(2) {
                    timer.0 = value;
                } else {
                    timer.1 = value;
                }
            }
            msr::VP_INDEX | msr::TIME_REF_COUNT | msr::SVERSION => {
                guest_fault("wrmsr to a read-only MSR")
            }
            _ => guest_fault("wrmsr of an MSR the simulator does not implement"),
        }
    }
}

impl TimeRefCounter for SimHypervisor {
    fn time_ref_count(&self) -> u64 {
        self.state.lock().time_ref_count
    }
}

/// The guest's view of one SINT's message slot in a [`SimHypervisor`]; see [`SynicMessageSlot`].
#[derive(Clone, Copy, Debug)]
pub struct SimMessageSlot<'a> {
    hypervisor: &'a SimHypervisor,
    index: usize,
}

impl SimMessageSlot<'_> {
    fn with_slot<R>(&self, f: impl FnOnce(&mut HvMessage) -> R) -> R {
        f(&mut self.hypervisor.state.lock().sints[self.index].slot)
    }
}

impl SynicMessageSlot for SimMessageSlot<'_> {
    fn message_type(&self) -> HvMessageType {
        self.with_slot(|slot| slot.message_type())
    }

    fn read_message(&self) -> HvMessage {
        self.with_slot(|slot| *slot)
    }

    fn clear_message_type(&self) {
        self.with_slot(|slot| slot.header.message_type = HvMessageType::NONE.0);
    }

    fn fence(&self) {
        atomic::fence(Ordering::SeqCst);
    }

    fn message_pending(&self) -> bool {
        self.with_slot(|slot| slot.message_pending())
    }

    fn write_eom(&self) {
        self.hypervisor.write_msr(msr::EOM, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hv::hypercall::{
        HypercallPageError, PostMessageRetry, disable_hypercall_page, enable_hypercall_page,
        post_message_with_retry,
    };
    use crate::hv::synic::{
        SintRoute, VMBUS_SINT, consume_message, enable_synic, take_event_flags,
    };
    use core::cell::{Cell, RefCell};

    const MESSAGE_CONNECTION: u32 = 1;
    const EVENT_CONNECTION: u32 = 0x2000;

    fn ready() -> SimHypervisor {
        let hv = SimHypervisor::default();
        hv.register_message_port(MESSAGE_CONNECTION);
        hv.register_event_port(EVENT_CONNECTION, 2048);
        hv
    }

    #[test]
    fn busy_slot_sets_pending_and_eom_redelivers() {
        let hv = ready();
        let slot = hv.message_slot(VMBUS_SINT).unwrap();
        for text in [&b"first"[..], b"second", b"third"] {
            hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, text)
                .unwrap();
        }
        assert_eq!(
            hv.take_interrupts(VMBUS_SINT),
            1,
            "only the delivery into an empty slot interrupts"
        );
        assert_eq!(hv.queued_for_guest(VMBUS_SINT), 2);
        assert!(
            slot.message_pending(),
            "the busy slot advertises queued messages"
        );

        let first = consume_message(&slot).unwrap();
        assert_eq!(first.payload(), Ok(&b"first"[..]));
        assert_eq!(hv.eom_count(), 1);
        assert_eq!(
            hv.take_interrupts(VMBUS_SINT),
            1,
            "EOM redelivers with a fresh interrupt"
        );

        let second = consume_message(&slot).unwrap();
        assert_eq!(second.payload(), Ok(&b"second"[..]));
        assert!(second.message_pending(), "one more was queued behind it");
        let third = consume_message(&slot).unwrap();
        assert_eq!(third.payload(), Ok(&b"third"[..]));
        assert!(!third.message_pending());
        assert_eq!(hv.eom_count(), 2, "no EOM once nothing is pending");
        assert_eq!(consume_message(&slot), None);
        assert_eq!(hv.take_interrupts(VMBUS_SINT), 1);
        assert_eq!(hv.take_interrupts(0), 0, "other SINTs are untouched");
    }

    #[test]
    fn forgetting_eom_stalls_the_sint() {
        let hv = ready();
        let slot = hv.message_slot(VMBUS_SINT).unwrap();
        hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"a")
            .unwrap();
        hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"b")
            .unwrap();
        // Empty the slot without the EOM step.
        slot.clear_message_type();
        hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"c")
            .unwrap();
        assert_eq!(
            slot.message_type(),
            HvMessageType::NONE,
            "nothing arrives until EOM"
        );
        slot.write_eom();
        assert_eq!(
            consume_message(&slot).unwrap().payload(),
            Ok(&b"b"[..]),
            "order is kept"
        );
        assert_eq!(consume_message(&slot).unwrap().payload(), Ok(&b"c"[..]));
    }

    #[test]
    fn guest_bound_queue_is_bounded() {
        let hv = ready();
        hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"in the slot")
            .unwrap();
        for _ in 0..PORT_MESSAGE_BUFFERS {
            hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"queued")
                .unwrap();
        }
        assert_eq!(
            hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"one too many"),
            Err(HvError::INSUFFICIENT_BUFFERS)
        );
        assert_eq!(
            hv.send_to_guest(16, HvMessageType::VMBUS, b""),
            Err(HvError::INVALID_PARAMETER)
        );
        assert_eq!(
            hv.send_to_guest(0, HvMessageType::VMBUS, &[0; 241]),
            Err(HvError::INVALID_PARAMETER)
        );
        assert_eq!(
            hv.send_to_guest(0, HvMessageType::NONE, b""),
            Err(HvError::INVALID_PARAMETER)
        );
    }

    #[test]
    fn event_flags_per_relid_are_taken_once() {
        let hv = ready();
        assert_eq!(hv.signal_guest(VMBUS_SINT, 5), Ok(true));
        assert_eq!(
            hv.signal_guest(VMBUS_SINT, 5),
            Ok(false),
            "a set flag is no new edge"
        );
        assert_eq!(hv.signal_guest(VMBUS_SINT, 130), Ok(true));
        assert_eq!(hv.take_interrupts(VMBUS_SINT), 2);

        let flags = hv.guest_event_flags(VMBUS_SINT).unwrap();
        let mut scan = take_event_flags(flags);
        assert_eq!(scan.next(), Some(5));
        // The host signals while the guest is mid-scan: nothing is lost. Relid 5 is in the word being scanned
        // and 2047 lies ahead, so this scan sees both.
        assert_eq!(hv.signal_guest(VMBUS_SINT, 5), Ok(true));
        assert_eq!(hv.signal_guest(VMBUS_SINT, 2047), Ok(true));
        assert_eq!(scan.next(), Some(5));
        assert_eq!(scan.next(), Some(130));
        // Relid 6 lies behind the scan now: it stays set for the next interrupt's scan.
        assert_eq!(hv.signal_guest(VMBUS_SINT, 6), Ok(true));
        assert_eq!(scan.collect::<Vec<_>>(), [2047]);
        assert_eq!(
            hv.take_interrupts(VMBUS_SINT),
            3,
            "each newly set flag raised its own interrupt"
        );
        assert_eq!(take_event_flags(flags).collect::<Vec<_>>(), [6]);
        assert_eq!(take_event_flags(flags).next(), None);

        assert!(
            take_event_flags(hv.guest_event_flags(3).unwrap())
                .next()
                .is_none(),
            "flags are per SINT"
        );
        assert_eq!(
            hv.signal_guest(VMBUS_SINT, 2048),
            Err(HvError::INVALID_PARAMETER)
        );
    }

    #[test]
    fn masked_sint_refuses_events_and_holds_message_interrupts() {
        let hv = ready();
        let sint_msr = msr::sint(VMBUS_SINT).unwrap();
        let routed = Sint::from_bits(hv.read_msr(sint_msr));
        hv.write_msr(sint_msr, routed.with_masked(true).bits());
        assert_eq!(
            hv.signal_guest(VMBUS_SINT, 1),
            Err(HvError::INVALID_SYNIC_STATE)
        );
        hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"x")
            .unwrap();
        assert_eq!(hv.take_interrupts(VMBUS_SINT), 0);
        hv.write_msr(sint_msr, routed.bits());
        assert_eq!(
            hv.take_interrupts(VMBUS_SINT),
            1,
            "the held interrupt fires on unmask"
        );
    }

    #[test]
    fn post_message_buffer_exhaustion() {
        let hv = ready();
        for i in 0..PORT_MESSAGE_BUFFERS {
            assert_eq!(hv.post_message(MESSAGE_CONNECTION, 1, &[i as u8]), Ok(()));
        }
        assert_eq!(
            hv.post_message(MESSAGE_CONNECTION, 1, b"17th"),
            Err(HvError::INSUFFICIENT_BUFFERS)
        );
        assert_eq!(hv.host_pending(MESSAGE_CONNECTION), 16);
        let first = hv.host_receive(MESSAGE_CONNECTION).unwrap();
        assert_eq!(
            first,
            PostedMessage {
                connection_id: 1,
                message_type: HvMessageType::VMBUS,
                payload: alloc::vec![0]
            }
        );
        assert_eq!(
            hv.post_message(MESSAGE_CONNECTION, 1, b"17th"),
            Ok(()),
            "one buffer was freed"
        );
        let rest = hv.host_drain(MESSAGE_CONNECTION);
        assert_eq!(rest.len(), 16);
        assert_eq!(rest.last().unwrap().payload, b"17th");
    }

    #[test]
    fn retry_helper_succeeds_once_the_host_drains() {
        let hv = ready();
        for _ in 0..PORT_MESSAGE_BUFFERS {
            hv.post_message(MESSAGE_CONNECTION, 1, b"filler").unwrap();
        }
        let waits = RefCell::new(Vec::new());
        let delay = |us: u64| {
            waits.borrow_mut().push(us);
            // The host gets round to its port after the third back-off.
            if waits.borrow().len() == 3 {
                hv.host_drain(MESSAGE_CONNECTION);
            }
        };
        let result = post_message_with_retry(
            &hv,
            &delay,
            MESSAGE_CONNECTION,
            1,
            b"late",
            PostMessageRetry::new(),
        );
        assert_eq!(result, Ok(()));
        assert_eq!(*waits.borrow(), [1, 2, 4]);
        assert_eq!(
            hv.host_drain(MESSAGE_CONNECTION)
                .iter()
                .map(|m| &m.payload[..])
                .collect::<Vec<_>>(),
            [b"late"]
        );
    }

    #[test]
    fn retry_helper_gives_up_on_a_host_that_never_drains() {
        let hv = ready();
        for _ in 0..PORT_MESSAGE_BUFFERS {
            hv.post_message(MESSAGE_CONNECTION, 1, b"filler").unwrap();
        }
        let waits = Cell::new(0u32);
        let result = post_message_with_retry(
            &hv,
            &|_| waits.set(waits.get() + 1),
            MESSAGE_CONNECTION,
            1,
            b"x",
            PostMessageRetry::new(),
        );
        assert_eq!(result, Err(HvError::INSUFFICIENT_BUFFERS));
        assert_eq!(waits.get(), PostMessageRetry::MAX_ATTEMPTS - 1);
    }

    #[test]
    fn post_message_parameter_checks() {
        let hv = ready();
        assert_eq!(hv.post_message(MESSAGE_CONNECTION, 1, &[0; 240]), Ok(()));
        assert_eq!(
            hv.post_message(MESSAGE_CONNECTION, 1, &[0; 241]),
            Err(HvError::INVALID_PARAMETER)
        );
        assert_eq!(
            hv.post_message(MESSAGE_CONNECTION, 0, b"x"),
            Err(HvError::INVALID_PARAMETER)
        );
        assert_eq!(
            hv.post_message(MESSAGE_CONNECTION, 0x8000_0010, b"x"),
            Err(HvError::INVALID_PARAMETER)
        );
        assert_eq!(
            hv.post_message(77, 1, b"x"),
            Err(HvError::INVALID_CONNECTION_ID)
        );
        assert_eq!(
            hv.post_message(EVENT_CONNECTION, 1, b"x"),
            Err(HvError::INVALID_PORT_ID)
        );
        hv.unregister_port(MESSAGE_CONNECTION);
        assert_eq!(
            hv.post_message(MESSAGE_CONNECTION, 1, b"x"),
            Err(HvError::INVALID_CONNECTION_ID)
        );
    }

    #[test]
    fn a_post_filter_refuses_at_hypercall_time_without_taking_a_buffer() {
        let hv = ready();
        hv.register_filtered_message_port(
            9,
            PostFilter::new(|payload| match payload.first() {
                Some(0xEE) => Err(HvError::INVALID_CONNECTION_ID),
                _ => Ok(()),
            }),
        );
        assert_eq!(hv.post_message(9, 1, &[0xEE]), Err(HvError::INVALID_CONNECTION_ID));
        assert_eq!(hv.host_pending(9), 0, "a refused payload is not queued");
        for _ in 0..PORT_MESSAGE_BUFFERS {
            hv.post_message(9, 1, &[1]).unwrap();
        }
        assert_eq!(
            hv.post_message(9, 1, &[0xEE]),
            Err(HvError::INVALID_CONNECTION_ID),
            "the filter decides before the buffer check"
        );
        assert_eq!(hv.post_message(9, 1, &[1]), Err(HvError::INSUFFICIENT_BUFFERS));
        // Re-registering without a filter, or unregistering, drops the filter.
        hv.register_message_port(9);
        assert_eq!(hv.post_message(9, 1, &[0xEE]), Ok(()));
        hv.register_filtered_message_port(9, PostFilter::new(|_| Err(HvError::OPERATION_DENIED)));
        hv.unregister_port(9);
        hv.register_message_port(9);
        assert_eq!(hv.post_message(9, 1, &[0xEE]), Ok(()));
        assert_eq!(alloc::format!("{:?}", PostFilter::new(|_| Ok(()))), "PostFilter(..)");
    }

    #[test]
    fn unknown_connection_for_initiate_contact_fails_at_once() {
        let hv = ready();
        let waits = Cell::new(0u32);
        let delay = |_| waits.set(waits.get() + 1);
        let result = post_message_with_retry(
            &hv,
            &delay,
            4,
            1,
            b"initiate",
            PostMessageRetry::for_initiate_contact(),
        );
        assert_eq!(result, Err(HvError::INVALID_CONNECTION_ID));
        assert_eq!(waits.get(), 0);
        // The same id for another message retries, and succeeds once the host opens the port.
        let delay = |_| {
            waits.set(waits.get() + 1);
            hv.register_message_port(4);
        };
        assert_eq!(
            post_message_with_retry(&hv, &delay, 4, 1, b"other", PostMessageRetry::new()),
            Ok(())
        );
        assert_eq!(waits.get(), 1);
    }

    #[test]
    fn signal_event_reaches_the_host_port() {
        let hv = ready();
        hv.register_event_port(0x30, 16);
        assert_eq!(hv.signal_event(0x30, 3), Ok(()));
        assert_eq!(hv.signal_event(0x30, 3), Ok(()));
        assert_eq!(hv.signal_event(0x30, 15), Ok(()));
        assert_eq!(hv.signal_event(0x30, 16), Err(HvError::INVALID_PARAMETER));
        assert_eq!(
            hv.signal_event(0x31, 0),
            Err(HvError::INVALID_CONNECTION_ID)
        );
        assert_eq!(
            hv.signal_event(MESSAGE_CONNECTION, 0),
            Err(HvError::INVALID_PORT_ID)
        );
        assert_eq!(hv.host_take_events(0x30), [3, 15]);
        assert_eq!(hv.host_signal_count(0x30), 3);
        assert!(hv.host_take_events(0x30).is_empty());
    }

    #[test]
    fn missing_privileges_are_access_denied() {
        let hv = SimHypervisor::new(SimConfig {
            post_messages: false,
            signal_events: false,
            ..SimConfig::default()
        });
        hv.register_message_port(1);
        hv.register_event_port(2, 1);
        assert_eq!(hv.post_message(1, 1, b"x"), Err(HvError::ACCESS_DENIED));
        assert_eq!(hv.signal_event(2, 0), Err(HvError::ACCESS_DENIED));
    }

    #[test]
    fn bring_up_from_reset_and_teardown() {
        let hv = SimHypervisor::new(SimConfig::reset());
        assert_eq!(
            hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"early"),
            Err(HvError::INVALID_SYNIC_STATE)
        );

        // The firmware's leftovers are overwritten; a zero id is refused before touching the MSRs.
        hv.write_msr(msr::GUEST_OS_ID, 0x1234);
        assert_eq!(
            enable_hypercall_page(&hv, GuestOsId::from_bits(0), 0x80),
            Err(HypercallPageError::ZeroGuestOsId)
        );
        let id = GuestOsId::for_this_kernel(0, 1, 0);
        let hypercall = enable_hypercall_page(&hv, id, 0x80).unwrap();
        assert!(hypercall.enabled());
        assert_eq!(hv.read_msr(msr::GUEST_OS_ID), id.bits());

        let route = SintRoute {
            index: VMBUS_SINT,
            config: Sint::for_vector(0x90).unwrap(),
        };
        enable_synic(&hv, 0x81, 0x82, &[route]).unwrap();
        assert!(SimpMsr::from_bits(hv.read_msr(msr::SIMP)).enabled());
        hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"hello")
            .unwrap();
        assert_eq!(hv.take_interrupts(VMBUS_SINT), 1);
        assert_eq!(
            hv.signal_guest(3, 0),
            Err(HvError::INVALID_SYNIC_STATE),
            "SINT 3 is still masked"
        );

        crate::hv::synic::disable_synic(&hv, &[VMBUS_SINT]);
        assert!(Sint::from_bits(hv.read_msr(msr::sint(VMBUS_SINT).unwrap())).masked());
        assert_eq!(
            hv.send_to_guest(VMBUS_SINT, HvMessageType::VMBUS, b"late"),
            Err(HvError::INVALID_SYNIC_STATE)
        );
        disable_hypercall_page(&hv);
        assert_eq!(hv.read_msr(msr::GUEST_OS_ID), 0);
        assert!(!HypercallMsr::from_bits(hv.read_msr(msr::HYPERCALL)).enabled());
    }

    #[test]
    fn hypercall_page_does_not_enable_without_a_guest_id() {
        let hv = SimHypervisor::new(SimConfig::reset());
        hv.write_msr(
            msr::HYPERCALL,
            HypercallMsr::default().enabled_at(0x80).bits(),
        );
        assert!(!HypercallMsr::from_bits(hv.read_msr(msr::HYPERCALL)).enabled());
    }

    #[test]
    #[should_panic(expected = "before the hypercall page was enabled")]
    fn hypercall_without_a_page_faults() {
        let hv = SimHypervisor::new(SimConfig::reset());
        let _ = hv.post_message(1, 1, b"x");
    }

    #[test]
    fn reference_counter_advances() {
        let hv = ready();
        hv.advance_time(1234);
        assert_eq!(hv.time_ref_count(), 1234);
        assert_eq!(hv.read_msr(msr::TIME_REF_COUNT), 1234);
        let time = crate::hv::time::read_reference_time(None::<&NoPage>, &hv);
        assert_eq!(time.ticks_100ns, 1234);
    }

    /// A stand-in type for "no reference TSC page".
    struct NoPage;

    impl crate::hv::time::ReferenceTscPage for NoPage {
        fn sequence(&self) -> u32 {
            0
        }
        fn scale(&self) -> u64 {
            0
        }
        fn offset(&self) -> i64 {
            0
        }
        fn read_tsc(&self) -> u64 {
            0
        }
    }
}
