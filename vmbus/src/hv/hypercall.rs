//! Hypercalls (reference §3): control and result encoding, status codes, the PostMessage and SignalEvent inputs,
//! the PostMessage retry policy, hypercall-page setup, and the [`Hypercalls`] trait through which the rest of
//! the crate reaches the hypervisor.
//!
//! On x64 a hypercall passes the [`HypercallControl`] in RCX, the input GPA (or, for a fast call, the input
//! itself) in RDX, the output GPA in R8, and returns a [`HypercallResult`] in RAX. The kernel executes the call
//! through the hypercall page; this module only encodes and decodes.

use core::fmt;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::msr::{self, GuestOsId, HypercallMsr, MsrAccess};
use super::synic::{HvMessageType, MESSAGE_PAYLOAD_SIZE};

/// A hypercall code (§3), open so that any 16-bit value is representable.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct HypercallCode(pub u16);

impl HypercallCode {
    /// HvCallPostMessage: post a message to a connection (memory form, [`PostMessageInput`]).
    pub const POST_MESSAGE: Self = Self(0x005C);
    /// HvCallSignalEvent: set an event flag through a connection (fast form, [`SignalEventInput`]).
    pub const SIGNAL_EVENT: Self = Self(0x005D);
}

/// The hypercall input value in RCX (§3): call code 15:0, fast 16, variable header size 26:17 (in 8-byte units),
/// nested 31, rep count 43:32, rep start index 59:48. Other bits are reserved and must be zero.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HypercallControl(u64);

impl HypercallControl {
    /// Bit 16: the input is passed in registers rather than through an input page.
    pub const FAST: u64 = 1 << 16;
    /// Bit 31: the call is meant for the L0 hypervisor when running nested.
    pub const NESTED: u64 = 1 << 31;
    /// Largest variable header size (10 bits, in 8-byte units).
    pub const MAX_VARIABLE_HEADER_QWORDS: u16 = (1 << 10) - 1;
    /// Largest rep count or rep start index (12 bits).
    pub const MAX_REP: u16 = (1 << 12) - 1;

    /// A simple (non-rep, memory-form) call of `code`.
    pub const fn new(code: HypercallCode) -> Self {
        Self(code.0 as u64)
    }

    /// Wraps a raw control value.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw value for RCX.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The call code.
    pub const fn code(self) -> HypercallCode {
        HypercallCode(self.0 as u16)
    }

    /// Whether this is a fast (register-input) call.
    pub const fn fast(self) -> bool {
        self.0 & Self::FAST != 0
    }

    /// The variable header size in 8-byte units.
    pub const fn variable_header_size(self) -> u16 {
        ((self.0 >> 17) & 0x3FF) as u16
    }

    /// Whether the call targets the L0 hypervisor.
    pub const fn nested(self) -> bool {
        self.0 & Self::NESTED != 0
    }

    /// The number of rep elements.
    pub const fn rep_count(self) -> u16 {
        ((self.0 >> 32) & 0xFFF) as u16
    }

    /// The index of the first rep element to process.
    pub const fn rep_start(self) -> u16 {
        ((self.0 >> 48) & 0xFFF) as u16
    }

    /// This control as a fast or memory-form call.
    pub const fn with_fast(self, fast: bool) -> Self {
        if fast {
            Self(self.0 | Self::FAST)
        } else {
            Self(self.0 & !Self::FAST)
        }
    }

    /// This control as a nested or ordinary call.
    pub const fn with_nested(self, nested: bool) -> Self {
        if nested {
            Self(self.0 | Self::NESTED)
        } else {
            Self(self.0 & !Self::NESTED)
        }
    }

    /// This control with a variable header of `qwords` 8-byte units, or `None` if it does not fit 10 bits.
    pub const fn with_variable_header_size(self, qwords: u16) -> Option<Self> {
        if qwords > Self::MAX_VARIABLE_HEADER_QWORDS {
            return None;
        }
        Some(Self((self.0 & !(0x3FF << 17)) | (qwords as u64) << 17))
    }

    /// This control with `count` rep elements, or `None` if it does not fit 12 bits.
    pub const fn with_rep_count(self, count: u16) -> Option<Self> {
        if count > Self::MAX_REP {
            return None;
        }
        Some(Self((self.0 & !(0xFFF << 32)) | (count as u64) << 32))
    }

    /// This control starting at rep element `start`, or `None` if it does not fit 12 bits.
    pub const fn with_rep_start(self, start: u16) -> Option<Self> {
        if start > Self::MAX_REP {
            return None;
        }
        Some(Self((self.0 & !(0xFFF << 48)) | (start as u64) << 48))
    }
}

/// The hypercall result value in RAX (§3): status 15:0, reps completed 43:32.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct HypercallResult(u64);

impl HypercallResult {
    /// Wraps the raw value returned in RAX.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The status code.
    pub const fn status(self) -> HvStatus {
        HvStatus(self.0 as u16)
    }

    /// How many rep elements were processed.
    pub const fn reps_completed(self) -> u16 {
        ((self.0 >> 32) & 0xFFF) as u16
    }

    /// `Ok(reps completed)` on success, else the error.
    pub const fn into_result(self) -> Result<u16, HvError> {
        match self.status().into_result() {
            Ok(()) => Ok(self.reps_completed()),
            Err(error) => Err(error),
        }
    }
}

/// A hypercall status code (§3), open: unknown values are kept and printed as numbers.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, PartialOrd, Ord)]
pub struct HvStatus(pub u16);

/// A failed hypercall: an [`HvStatus`] other than [`HvStatus::SUCCESS`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct HvError(HvStatus);

impl HvStatus {
    /// The call succeeded.
    pub const SUCCESS: Self = Self(0);

    /// Whether this is [`HvStatus::SUCCESS`].
    pub const fn is_success(self) -> bool {
        self.0 == 0
    }

    /// `Ok(())` for success, else the error.
    pub const fn into_result(self) -> Result<(), HvError> {
        if self.is_success() {
            Ok(())
        } else {
            Err(HvError(self))
        }
    }
}

impl HvError {
    /// The error for `status`, or `None` if `status` is success.
    pub const fn from_status(status: HvStatus) -> Option<Self> {
        if status.is_success() {
            None
        } else {
            Some(Self(status))
        }
    }

    /// The status code.
    pub const fn status(self) -> HvStatus {
        self.0
    }
}

/// Defines the known status codes once, as [`HvStatus`] and as [`HvError`] constants, with their TLFS names.
macro_rules! known_statuses {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        impl HvStatus {
            $($(#[$doc])* pub const $name: Self = Self($value);)*

            /// The TLFS name of a known status (without the `HV_STATUS_` prefix), or `None`.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    0 => Some("SUCCESS"),
                    $($value => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }

        impl HvError {
            $($(#[$doc])* pub const $name: Self = Self(HvStatus($value));)*
        }
    };
}

known_statuses! {
    /// The call code is not supported.
    INVALID_HYPERCALL_CODE = 0x0002,
    /// The control value's encoding is not supported (e.g. reserved bits set).
    INVALID_HYPERCALL_INPUT = 0x0003,
    /// An input or output block is misaligned, crosses a page or overlaps the other.
    INVALID_ALIGNMENT = 0x0004,
    /// A parameter is invalid (e.g. PostMessage payload over 240 bytes, message type 0 or with bit 31 set).
    INVALID_PARAMETER = 0x0005,
    /// The partition lacks the privilege for the call (e.g. PostMessages, SignalEvents).
    ACCESS_DENIED = 0x0006,
    /// The partition is not in a state that allows the call.
    INVALID_PARTITION_STATE = 0x0007,
    /// The operation is not allowed.
    OPERATION_DENIED = 0x0008,
    /// The property is unknown.
    UNKNOWN_PROPERTY = 0x0009,
    /// The property value is out of range.
    PROPERTY_VALUE_OUT_OF_RANGE = 0x000A,
    /// The hypervisor is out of memory: retry later.
    INSUFFICIENT_MEMORY = 0x000B,
    /// The partition nesting is too deep.
    PARTITION_TOO_DEEP = 0x000C,
    /// The partition id is invalid.
    INVALID_PARTITION_ID = 0x000D,
    /// The virtual processor index is invalid.
    INVALID_VP_INDEX = 0x000E,
    /// The object was not found.
    NOT_FOUND = 0x0010,
    /// The port of the connection is gone or of the wrong type.
    INVALID_PORT_ID = 0x0011,
    /// The connection id is unknown.
    INVALID_CONNECTION_ID = 0x0012,
    /// The destination port has no free message buffer: retry later.
    INSUFFICIENT_BUFFERS = 0x0013,
    /// The message was not acknowledged.
    NOT_ACKNOWLEDGED = 0x0014,
    /// The virtual processor is in the wrong state.
    INVALID_VP_STATE = 0x0015,
    /// A SynIC feature the operation needs is disabled (SynIC, SIMP/SIEFP page, or a masked target SINT).
    INVALID_SYNIC_STATE = 0x0018,
    /// No data is available.
    NO_DATA = 0x001B,
    /// The hypervisor has no resources for the operation.
    NO_RESOURCES = 0x001D,
    /// A processor feature the operation needs is unsupported.
    PROCESSOR_FEATURE_NOT_SUPPORTED = 0x0020,
    /// The logical processor index is invalid.
    INVALID_LP_INDEX = 0x0041,
    /// A register value is invalid.
    INVALID_REGISTER_VALUE = 0x0050,
    /// The operation failed.
    OPERATION_FAILED = 0x0071,
    /// The operation timed out.
    TIME_OUT = 0x0078,
}

impl fmt::Display for HvStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "HV_STATUS_{name} ({:#06x})", self.0),
            None => write!(f, "unknown hypervisor status {:#06x}", self.0),
        }
    }
}

impl fmt::Display for HvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "hypercall failed: {}", self.0)
    }
}

impl core::error::Error for HvError {}

/// The 256-byte input page of HvCallPostMessage (§3): connection id, reserved, message type, payload size
/// (at most [`MESSAGE_PAYLOAD_SIZE`]), payload. Build it with [`PostMessageInput::new`], which checks the size.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct PostMessageInput {
    /// The connection to post to.
    pub connection_id: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The message type the receiver sees; non-zero with bit 31 clear (VMBus uses 1).
    pub message_type: u32,
    /// How many payload bytes are meaningful.
    pub payload_size: u32,
    /// The payload; bytes past `payload_size` are zero.
    pub payload: [u8; MESSAGE_PAYLOAD_SIZE],
}

/// A payload that does not fit a SynIC message (more than [`MESSAGE_PAYLOAD_SIZE`] bytes).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PayloadTooLarge {
    /// The offending length.
    pub len: usize,
}

impl fmt::Display for PayloadTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "message payload of {} bytes exceeds {MESSAGE_PAYLOAD_SIZE}",
            self.len
        )
    }
}

impl core::error::Error for PayloadTooLarge {}

impl From<PayloadTooLarge> for HvError {
    /// The hypervisor answers an oversize payload with INVALID_PARAMETER; checking first gives the same error.
    fn from(_: PayloadTooLarge) -> Self {
        HvError::INVALID_PARAMETER
    }
}

impl PostMessageInput {
    /// The input for posting `payload` as `message_type` to `connection_id`, or an error if the payload is
    /// longer than [`MESSAGE_PAYLOAD_SIZE`].
    pub fn new(
        connection_id: u32,
        message_type: HvMessageType,
        payload: &[u8],
    ) -> Result<Self, PayloadTooLarge> {
        let mut input = Self {
            connection_id,
            reserved: 0,
            message_type: message_type.0,
            payload_size: 0,
            payload: [0; MESSAGE_PAYLOAD_SIZE],
        };
        let destination = input
            .payload
            .get_mut(..payload.len())
            .ok_or(PayloadTooLarge { len: payload.len() })?;
        destination.copy_from_slice(payload);
        // The length fits: it is at most MESSAGE_PAYLOAD_SIZE.
        input.payload_size = payload.len() as u32;
        Ok(input)
    }

    /// The meaningful payload bytes, or `None` if `payload_size` is out of range.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.get(..usize::try_from(self.payload_size).ok()?)
    }
}

/// The 8-byte input of HvCallSignalEvent (§3): connection id, flag number, reserved. It is passed by value in
/// RDX (the fast form); see [`SignalEventInput::fast_registers`].
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub struct SignalEventInput {
    /// The connection whose port receives the event.
    pub connection_id: u32,
    /// The event flag to set, relative to the port's base flag.
    pub flag_number: u16,
    /// Reserved, zero.
    pub reserved: u16,
}

/// The register values of a fast hypercall (§3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FastHypercall {
    /// RCX: the control value (with the fast bit set).
    pub control: HypercallControl,
    /// RDX: the first 8 bytes of input.
    pub rdx: u64,
    /// R8: the next 8 bytes of input (zero when unused).
    pub r8: u64,
}

impl SignalEventInput {
    /// The input for signalling `flag_number` through `connection_id`.
    pub const fn new(connection_id: u32, flag_number: u16) -> Self {
        Self {
            connection_id,
            flag_number,
            reserved: 0,
        }
    }

    /// The fast-form registers: RCX = 0x1005D, RDX = connection id | flag number << 32.
    pub const fn fast_registers(&self) -> FastHypercall {
        FastHypercall {
            control: HypercallControl::new(HypercallCode::SIGNAL_EVENT).with_fast(true),
            rdx: self.connection_id as u64 | (self.flag_number as u64) << 32,
            r8: 0,
        }
    }
}

/// The two hypercalls VMBus needs, as the rest of the crate sees them. The kernel implements it over the
/// hypercall page (PostMessage in the memory form from a per-CPU input page, SignalEvent in the fast form);
/// [`crate::hv::sim::SimHypervisor`] implements it on the host.
pub trait Hypercalls {
    /// HvCallPostMessage: post `payload` (at most 240 bytes) as `message_type` to `connection_id`. One attempt;
    /// see [`post_message_with_retry`] for the retry policy.
    fn post_message(
        &self,
        connection_id: u32,
        message_type: u32,
        payload: &[u8],
    ) -> Result<(), HvError>;

    /// HvCallSignalEvent: set event flag `flag` of the port behind `connection_id`.
    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError>;
}

/// A busy-wait (or sleep) used between PostMessage attempts.
pub trait Delay {
    /// Waits at least `us` microseconds.
    fn delay_us(&self, us: u64);
}

impl<F: Fn(u64)> Delay for F {
    fn delay_us(&self, us: u64) {
        self(us)
    }
}

/// What to do after a failed PostMessage attempt.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RetryDecision {
    /// Wait `delay_us` microseconds, then post again.
    RetryAfter {
        /// The back-off delay.
        delay_us: u64,
    },
    /// Stop and report the error.
    GiveUp(HvError),
}

/// The PostMessage retry policy (§3) as pure logic.
///
/// - INSUFFICIENT_MEMORY and INSUFFICIENT_BUFFERS are transient (the host has not drained its port yet): retry.
/// - INVALID_CONNECTION_ID: for INITIATE_CONTACT it means the host does not know the connection id (an old host
///   rejecting id 4, so the caller should fall back to an older version at once); for any other message it can
///   be a host that is still setting up: retry.
/// - Any other status is final.
///
/// At most [`Self::MAX_ATTEMPTS`] attempts are made. The delay before the second attempt is
/// [`Self::INITIAL_DELAY_US`] and doubles after every further failure up to [`Self::MAX_DELAY_US`] (2^21 µs,
/// about 2 s, reached after 21 doublings).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct PostMessageRetry {
    fail_fast_on_invalid_connection: bool,
    failed_attempts: u32,
    next_delay_us: u64,
}

impl Default for PostMessageRetry {
    fn default() -> Self {
        Self::new()
    }
}

impl PostMessageRetry {
    /// Attempts before giving up.
    pub const MAX_ATTEMPTS: u32 = 100;
    /// The first back-off delay, in microseconds.
    pub const INITIAL_DELAY_US: u64 = 1;
    /// The back-off cap, in microseconds (2^21 µs ≈ 2.1 s).
    pub const MAX_DELAY_US: u64 = 1 << 21;

    /// The policy for an ordinary message.
    pub const fn new() -> Self {
        Self {
            fail_fast_on_invalid_connection: false,
            failed_attempts: 0,
            next_delay_us: Self::INITIAL_DELAY_US,
        }
    }

    /// The policy for INITIATE_CONTACT: INVALID_CONNECTION_ID is final.
    pub const fn for_initiate_contact() -> Self {
        Self {
            fail_fast_on_invalid_connection: true,
            ..Self::new()
        }
    }

    /// How many attempts have failed so far.
    pub const fn failed_attempts(&self) -> u32 {
        self.failed_attempts
    }

    /// Whether `error` is worth another attempt under this policy.
    pub const fn is_transient(&self, error: HvError) -> bool {
        match error.status() {
            HvStatus::INSUFFICIENT_MEMORY | HvStatus::INSUFFICIENT_BUFFERS => true,
            HvStatus::INVALID_CONNECTION_ID => !self.fail_fast_on_invalid_connection,
            _ => false,
        }
    }

    /// Records a failed attempt and decides what comes next.
    pub fn after_failure(&mut self, error: HvError) -> RetryDecision {
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        if !self.is_transient(error) || self.failed_attempts >= Self::MAX_ATTEMPTS {
            return RetryDecision::GiveUp(error);
        }
        let delay_us = self.next_delay_us;
        self.next_delay_us = (delay_us * 2).min(Self::MAX_DELAY_US);
        RetryDecision::RetryAfter { delay_us }
    }
}

/// Posts a message, retrying transient failures under `retry` with `delay` between attempts (§3).
pub fn post_message_with_retry<H, D>(
    hypercalls: &H,
    delay: &D,
    connection_id: u32,
    message_type: u32,
    payload: &[u8],
    mut retry: PostMessageRetry,
) -> Result<(), HvError>
where
    H: Hypercalls + ?Sized,
    D: Delay + ?Sized,
{
    loop {
        let error = match hypercalls.post_message(connection_id, message_type, payload) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        match retry.after_failure(error) {
            RetryDecision::RetryAfter { delay_us } => delay.delay_us(delay_us),
            RetryDecision::GiveUp(error) => return Err(error),
        }
    }
}

/// Why the hypercall page could not be enabled.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum HypercallPageError {
    /// The guest OS id is zero; the hypervisor ignores the enable bit until it is set.
    ZeroGuestOsId,
    /// The register still reads disabled, or at another frame, after the write.
    NotEnabled {
        /// The value read back.
        read_back: HypercallMsr,
    },
}

impl fmt::Display for HypercallPageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroGuestOsId => {
                f.write_str("the guest OS id must be non-zero before the hypercall page")
            }
            Self::NotEnabled { read_back } => {
                write!(
                    f,
                    "hypercall MSR reads {:#x} after enabling",
                    read_back.bits()
                )
            }
        }
    }
}

/// Announces the guest and enables the hypercall page at `gpfn` (§2, §3).
///
/// Writes GUEST_OS_ID (overwriting whatever the firmware left), then sets the HYPERCALL MSR's enable bit and
/// GPFN keeping the preserved bits, and reads it back. The caller must have reserved the frame and must map it
/// executable and not writable once this returns `Ok`. Returns the value read back.
pub fn enable_hypercall_page<M: MsrAccess + ?Sized>(
    msrs: &M,
    guest_os_id: GuestOsId,
    gpfn: u64,
) -> Result<HypercallMsr, HypercallPageError> {
    if guest_os_id.bits() == 0 {
        return Err(HypercallPageError::ZeroGuestOsId);
    }
    msrs.write_msr(msr::GUEST_OS_ID, guest_os_id.bits());
    let current = HypercallMsr::from_bits(msrs.read_msr(msr::HYPERCALL));
    msrs.write_msr(msr::HYPERCALL, current.enabled_at(gpfn).bits());
    let read_back = HypercallMsr::from_bits(msrs.read_msr(msr::HYPERCALL));
    if read_back.enabled() && read_back.gpfn() == gpfn {
        Ok(read_back)
    } else {
        Err(HypercallPageError::NotEnabled { read_back })
    }
}

/// Disables the hypercall page and clears the guest OS id, before reboot or handing the machine on (§3).
pub fn disable_hypercall_page<M: MsrAccess + ?Sized>(msrs: &M) {
    let current = HypercallMsr::from_bits(msrs.read_msr(msr::HYPERCALL));
    msrs.write_msr(msr::HYPERCALL, current.with_enabled(false).bits());
    msrs.write_msr(msr::GUEST_OS_ID, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;
    use core::cell::{Cell, RefCell};
    use core::mem::{offset_of, size_of};

    /// Call codes 0x5C/0x5D: Linux HVCALL_POST_MESSAGE/HVCALL_SIGNAL_EVENT (hvgdk_mini.h), QEMU HV_POST_MESSAGE/
    /// HV_SIGNAL_EVENT, OpenVMM HypercallCode.
    #[test]
    fn call_codes() {
        assert_eq!(HypercallCode::POST_MESSAGE.0, 0x5C);
        assert_eq!(HypercallCode::SIGNAL_EVENT.0, 0x5D);
    }

    /// Control layout: Linux HV_HYPERCALL_FAST_BIT (16), VARHEAD 26:17, NESTED 31, REP_COMP 43:32,
    /// REP_START 59:48; OpenVMM hypercall::Control has the same fields and widths.
    #[test]
    fn control_encoding() {
        let control = HypercallControl::new(HypercallCode(0x1234))
            .with_fast(true)
            .with_nested(true)
            .with_variable_header_size(0x3FF)
            .and_then(|c| c.with_rep_count(0xFFF))
            .and_then(|c| c.with_rep_start(0xABC))
            .unwrap();
        assert_eq!(control.bits(), 0x0ABC_0FFF_87FF_1234);
        assert_eq!(control.code(), HypercallCode(0x1234));
        assert!(control.fast() && control.nested());
        assert_eq!(control.variable_header_size(), 0x3FF);
        assert_eq!(control.rep_count(), 0xFFF);
        assert_eq!(control.rep_start(), 0xABC);
        assert_eq!(
            control.with_fast(false).with_nested(false).bits(),
            0x0ABC_0FFF_07FE_1234
        );
        assert_eq!(
            HypercallControl::new(HypercallCode(1)).with_variable_header_size(0x400),
            None
        );
        assert_eq!(
            HypercallControl::new(HypercallCode(1)).with_rep_count(0x1000),
            None
        );
        assert_eq!(
            HypercallControl::new(HypercallCode(1)).with_rep_start(0x1000),
            None
        );
    }

    /// Result: status 15:0 (Linux HV_HYPERCALL_RESULT_MASK), reps completed 43:32 (OpenVMM HypercallOutput).
    #[test]
    fn result_decoding() {
        let ok = HypercallResult::from_bits(0x0000_0005_0000_0000);
        assert_eq!(ok.into_result(), Ok(5));
        let busy = HypercallResult::from_bits(0xFFFF_F003_FFFF_0013);
        assert_eq!(busy.status(), HvStatus::INSUFFICIENT_BUFFERS);
        assert_eq!(busy.reps_completed(), 3);
        assert_eq!(busy.into_result(), Err(HvError::INSUFFICIENT_BUFFERS));
    }

    /// Status values: Linux hvgdk_mini.h HV_STATUS_*, OpenVMM HvError, QEMU hw/hyperv/hyperv-proto.h for the
    /// SynIC ones; INVALID_SYNIC_STATE 0x18 from OpenVMM and VirtualBox GIM (GIM_HV_STATUS_INVALID_SYNIC_STATE).
    #[test]
    fn status_values() {
        let expected: [(HvStatus, u16); 28] = [
            (HvStatus::SUCCESS, 0x00),
            (HvStatus::INVALID_HYPERCALL_CODE, 0x02),
            (HvStatus::INVALID_HYPERCALL_INPUT, 0x03),
            (HvStatus::INVALID_ALIGNMENT, 0x04),
            (HvStatus::INVALID_PARAMETER, 0x05),
            (HvStatus::ACCESS_DENIED, 0x06),
            (HvStatus::INVALID_PARTITION_STATE, 0x07),
            (HvStatus::OPERATION_DENIED, 0x08),
            (HvStatus::UNKNOWN_PROPERTY, 0x09),
            (HvStatus::PROPERTY_VALUE_OUT_OF_RANGE, 0x0A),
            (HvStatus::INSUFFICIENT_MEMORY, 0x0B),
            (HvStatus::PARTITION_TOO_DEEP, 0x0C),
            (HvStatus::INVALID_PARTITION_ID, 0x0D),
            (HvStatus::INVALID_VP_INDEX, 0x0E),
            (HvStatus::NOT_FOUND, 0x10),
            (HvStatus::INVALID_PORT_ID, 0x11),
            (HvStatus::INVALID_CONNECTION_ID, 0x12),
            (HvStatus::INSUFFICIENT_BUFFERS, 0x13),
            (HvStatus::NOT_ACKNOWLEDGED, 0x14),
            (HvStatus::INVALID_VP_STATE, 0x15),
            (HvStatus::INVALID_SYNIC_STATE, 0x18),
            (HvStatus::NO_DATA, 0x1B),
            (HvStatus::NO_RESOURCES, 0x1D),
            (HvStatus::PROCESSOR_FEATURE_NOT_SUPPORTED, 0x20),
            (HvStatus::INVALID_LP_INDEX, 0x41),
            (HvStatus::INVALID_REGISTER_VALUE, 0x50),
            (HvStatus::OPERATION_FAILED, 0x71),
            (HvStatus::TIME_OUT, 0x78),
        ];
        for (status, value) in expected {
            assert_eq!(status.0, value, "{status}");
            assert!(status.name().is_some());
        }
        assert_eq!(
            HvError::INVALID_CONNECTION_ID.status(),
            HvStatus::INVALID_CONNECTION_ID
        );
        assert_eq!(HvError::from_status(HvStatus::SUCCESS), None);
        assert_eq!(HvStatus(0x1234).name(), None);
        assert_eq!(
            alloc::format!("{}", HvStatus(0x13)),
            "HV_STATUS_INSUFFICIENT_BUFFERS (0x0013)"
        );
        assert_eq!(
            alloc::format!("{}", HvError::from_status(HvStatus(0x1234)).unwrap()),
            "hypercall failed: unknown hypervisor status 0x1234"
        );
    }

    /// PostMessage input: 0 ConnectionId, 4 RsvdZ, 8 MessageType, 12 PayloadSize, 16 Message[240]. Sources: the
    /// TLFS HvCallPostMessage page and QEMU struct hyperv_post_message_input (OpenVMM hypercall::PostMessage).
    #[test]
    fn post_message_input_layout() {
        assert_eq!(size_of::<PostMessageInput>(), 256);
        assert_eq!(offset_of!(PostMessageInput, connection_id), 0);
        assert_eq!(offset_of!(PostMessageInput, reserved), 4);
        assert_eq!(offset_of!(PostMessageInput, message_type), 8);
        assert_eq!(offset_of!(PostMessageInput, payload_size), 12);
        assert_eq!(offset_of!(PostMessageInput, payload), 16);

        let input = PostMessageInput::new(4, HvMessageType::VMBUS, &[0xAA, 0xBB, 0xCC]).unwrap();
        let bytes = input.as_bytes();
        assert_eq!(
            &bytes[..19],
            &[
                4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0xAA, 0xBB, 0xCC
            ]
        );
        assert!(bytes[19..].iter().all(|&b| b == 0));
        assert_eq!(input.payload(), Some(&[0xAA, 0xBB, 0xCC][..]));

        assert!(PostMessageInput::new(1, HvMessageType::VMBUS, &[0; 240]).is_ok());
        let too_large = PostMessageInput::new(1, HvMessageType::VMBUS, &[0; 241]).unwrap_err();
        assert_eq!(too_large, PayloadTooLarge { len: 241 });
        assert_eq!(HvError::from(too_large), HvError::INVALID_PARAMETER);

        let mut hostile = input;
        hostile.payload_size = 241;
        assert_eq!(hostile.payload(), None);
    }

    /// SignalEvent: 0 ConnectionId u32, 4 FlagNumber u16, 6 RsvdZ (TLFS HvCallSignalEvent page, QEMU
    /// hyperv_signal_event_input); fast form RCX = 0x1005D (reference §3, Linux HV_HYPERCALL_FAST_BIT | 0x5D).
    #[test]
    fn signal_event_fast_form() {
        assert_eq!(size_of::<SignalEventInput>(), 8);
        assert_eq!(offset_of!(SignalEventInput, connection_id), 0);
        assert_eq!(offset_of!(SignalEventInput, flag_number), 4);
        assert_eq!(offset_of!(SignalEventInput, reserved), 6);

        let input = SignalEventInput::new(0x0012_3456, 0x0789);
        let registers = input.fast_registers();
        assert_eq!(registers.control.bits(), 0x1005D);
        assert_eq!(registers.rdx, 0x0000_0789_0012_3456);
        assert_eq!(registers.r8, 0);
        // The register form is the in-memory input read as a little-endian u64.
        assert_eq!(
            registers.rdx,
            u64::from_le_bytes(input.as_bytes().try_into().unwrap())
        );
    }

    /// Replays the policy on a sequence of failures and returns the delays it asked for.
    fn delays_until_give_up(mut retry: PostMessageRetry, error: HvError) -> (Vec<u64>, HvError) {
        let mut delays = Vec::new();
        loop {
            match retry.after_failure(error) {
                RetryDecision::RetryAfter { delay_us } => delays.push(delay_us),
                RetryDecision::GiveUp(error) => return (delays, error),
            }
        }
    }

    #[test]
    fn retry_policy_backs_off_and_gives_up_after_100_attempts() {
        let (delays, error) =
            delays_until_give_up(PostMessageRetry::new(), HvError::INSUFFICIENT_BUFFERS);
        assert_eq!(error, HvError::INSUFFICIENT_BUFFERS);
        assert_eq!(delays.len(), 99, "100 attempts means 99 waits");
        assert_eq!(&delays[..4], &[1, 2, 4, 8]);
        assert_eq!(delays[21], 1 << 21);
        assert!(
            delays[21..]
                .iter()
                .all(|&d| d == PostMessageRetry::MAX_DELAY_US)
        );
        assert!(delays.windows(2).all(|w| w[1] >= w[0]));

        let (delays, _) =
            delays_until_give_up(PostMessageRetry::new(), HvError::INSUFFICIENT_MEMORY);
        assert_eq!(delays.len(), 99);
    }

    #[test]
    fn retry_policy_for_invalid_connection_id_depends_on_the_message() {
        let (delays, error) = delays_until_give_up(
            PostMessageRetry::for_initiate_contact(),
            HvError::INVALID_CONNECTION_ID,
        );
        assert!(delays.is_empty(), "INITIATE_CONTACT must fail at once");
        assert_eq!(error, HvError::INVALID_CONNECTION_ID);

        let (delays, _) =
            delays_until_give_up(PostMessageRetry::new(), HvError::INVALID_CONNECTION_ID);
        assert_eq!(delays.len(), 99);

        // INITIATE_CONTACT still retries on buffer shortage.
        let (delays, _) = delays_until_give_up(
            PostMessageRetry::for_initiate_contact(),
            HvError::INSUFFICIENT_BUFFERS,
        );
        assert_eq!(delays.len(), 99);
    }

    #[test]
    fn retry_policy_fails_at_once_on_other_errors() {
        for error in [
            HvError::INVALID_PARAMETER,
            HvError::ACCESS_DENIED,
            HvError::from_status(HvStatus(0x7777)).unwrap(),
        ] {
            let mut retry = PostMessageRetry::new();
            assert_eq!(retry.after_failure(error), RetryDecision::GiveUp(error));
            assert_eq!(retry.failed_attempts(), 1);
        }
    }

    /// A hypervisor double that fails the first `failures` posts with `error`.
    struct FlakyHypervisor {
        failures: Cell<u32>,
        error: HvError,
        posts: Cell<u32>,
    }

    impl Hypercalls for FlakyHypervisor {
        fn post_message(&self, _: u32, _: u32, _: &[u8]) -> Result<(), HvError> {
            self.posts.set(self.posts.get() + 1);
            if self.failures.get() == 0 {
                return Ok(());
            }
            self.failures.set(self.failures.get() - 1);
            Err(self.error)
        }

        fn signal_event(&self, _: u32, _: u16) -> Result<(), HvError> {
            Ok(())
        }
    }

    #[test]
    fn post_with_retry_waits_between_attempts() {
        let hv = FlakyHypervisor {
            failures: Cell::new(3),
            error: HvError::INSUFFICIENT_MEMORY,
            posts: Cell::new(0),
        };
        let waits = RefCell::new(Vec::new());
        let delay = |us| waits.borrow_mut().push(us);
        assert_eq!(
            post_message_with_retry(&hv, &delay, 1, 1, b"hi", PostMessageRetry::new()),
            Ok(())
        );
        assert_eq!(hv.posts.get(), 4);
        assert_eq!(*waits.borrow(), [1, 2, 4]);

        let hv = FlakyHypervisor {
            failures: Cell::new(1000),
            error: HvError::INSUFFICIENT_BUFFERS,
            posts: Cell::new(0),
        };
        let result = post_message_with_retry(&hv, &|_| {}, 1, 1, b"hi", PostMessageRetry::new());
        assert_eq!(result, Err(HvError::INSUFFICIENT_BUFFERS));
        assert_eq!(hv.posts.get(), PostMessageRetry::MAX_ATTEMPTS);
    }
}
