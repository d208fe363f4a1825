//! Hyper-V Top-Level Functional Specification (TLFS) definitions: the guest's view of the hypervisor.
//!
//! Everything here is pure data and logic; the registers themselves are reached through small traits that the
//! kernel implements with `cpuid`, `rdmsr`/`wrmsr`, the hypercall page and the SynIC pages, and that the
//! [`sim`] module implements on the host for tests. Reference: `hyperv-vmbus.md` §1–4.
//!
//! - [`cpuid`]: detection (§1): decode the hypervisor CPUID leaves into an [`HvReport`] that decides, from the
//!   feature bits, what may be used.
//! - [`msr`]: the synthetic MSR numbers and their bit layouts as typed values (§2).
//! - [`hypercall`]: the hypercall control/result encoding, status codes, PostMessage/SignalEvent inputs, the
//!   PostMessage retry policy and the [`Hypercalls`] trait the rest of the crate posts through (§3).
//! - [`synic`]: the SynIC message page, the end-of-message protocol and event-flag scanning (§4).
//! - [`time`]: the reference TSC page clock with its TIME_REF_COUNT fallback (§2).
//! - [`sim`]: a deterministic simulated hypervisor enforcing the TLFS rules above, for host tests (it needs only
//!   `alloc`, so it is built everywhere and in-kernel tests may use it too).
//!
//! All multi-byte fields are little-endian; the wire structs use native integers because the only target is
//! x86-64 (and the host tests run on little-endian machines).

pub mod cpuid;
pub mod hypercall;
pub mod msr;
pub mod sim;
pub mod synic;
pub mod time;

pub use cpuid::{CpuidSource, HvReport, Platform};
pub use hypercall::{
    Delay, HvError, HvStatus, Hypercalls, PostMessageRetry, post_message_with_retry,
};
pub use synic::{HvMessage, HvMessageType, SynicMessageSlot, consume_message};

/// Size of a hypervisor page (hypercall page, SynIC pages, reference TSC page), in bytes (§2, §4).
pub const HV_PAGE_SIZE: usize = 4096;

/// log2 of [`HV_PAGE_SIZE`]: the shift between a guest physical address and its frame number (GPFN).
pub const HV_PAGE_SHIFT: u32 = 12;
