//! The instructions that reach the hypervisor directly: `cpuid`, `rdmsr`/`wrmsr` on the synthetic MSRs (reference
//! `hyperv-vmbus.md` §1–2), and an ordered `rdtsc` for the reference TSC page (§2).
//!
//! UNSAFETY: MSR access and inline assembly. This module, [`super::shared_page`] and [`super::hypercall`] hold the
//! Hyper-V layer's only `unsafe` blocks.

use core::arch::x86_64::__cpuid_count;
use core::ops::RangeInclusive;
use vmbus::hv::cpuid::CpuidSource;
use vmbus::hv::msr::MsrAccess;
use x86_64::registers::model_specific::Msr;

/// The `cpuid` instruction as a [`CpuidSource`] for [`vmbus::hv::HvReport::detect`].
pub struct NativeCpuid;

impl CpuidSource for NativeCpuid {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let registers = __cpuid_count(leaf, subleaf);
        [registers.eax, registers.ebx, registers.ecx, registers.edx]
    }
}

/// The synthetic MSRs the hypervisor defines (§2: GUEST_OS_ID 0x40000000 up to the crash MSRs at 0x40000105).
pub const SYNTHETIC_MSRS: RangeInclusive<u32> = 0x4000_0000..=0x4000_01FF;

/// `rdmsr`/`wrmsr` restricted to [`SYNTHETIC_MSRS`], as the [`MsrAccess`] the `vmbus::hv` helpers drive.
///
/// Only the Hyper-V layer can make one ([`SyntheticMsrs::new`] is private to it), and only after detection found the
/// "Hv#1" interface. Its users keep one rule on which the memory safety of the writes rests: a page MSR (HYPERCALL,
/// SIMP, SIEFP, REFERENCE_TSC) is only ever pointed at a frame the layer owns for the kernel's lifetime
/// ([`super::shared_page::SharedPage`]), because the hypervisor writes to the page it names.
pub struct SyntheticMsrs {
    _private: (),
}

impl SyntheticMsrs {
    /// The accessor; the caller has seen the "Hv#1" interface in CPUID.
    pub(super) const fn new() -> SyntheticMsrs {
        SyntheticMsrs { _private: () }
    }

    /// Panics unless `msr` is synthetic: reaching an architectural MSR through this type is a bug in the caller.
    fn check(msr: u32) {
        assert!(SYNTHETIC_MSRS.contains(&msr), "MSR {msr:#x} is not a Hyper-V synthetic MSR");
    }
}

impl MsrAccess for SyntheticMsrs {
    fn read_msr(&self, msr: u32) -> u64 {
        Self::check(msr);
        // SAFETY: reading a synthetic MSR has no effect on memory. One the hypervisor does not implement raises #GP,
        // whose handler reports it and ends the run; the callers read only MSRs whose feature bit detection found.
        unsafe { Msr::new(msr).read() }
    }

    fn write_msr(&self, msr: u32, value: u64) {
        Self::check(msr);
        // SAFETY: a synthetic MSR changes hypervisor state only. The writes that make the hypervisor touch guest
        // memory (the page MSRs) name frames the Hyper-V layer owns forever (the type's rule above), and the SINT and
        // timer MSRs route only to vectors with registered handlers.
        unsafe { Msr::new(msr).write(value) }
    }
}

/// Reads the time-stamp counter after all earlier loads have completed (`lfence; rdtsc`), so that the reference
/// TSC page reader's TSC sample lies between its two reads of the page's sequence number (§2).
pub fn ordered_rdtsc() -> u64 {
    let low: u32;
    let high: u32;
    // SAFETY: LFENCE and RDTSC only read the TSC into EDX:EAX (CR4.TSD does not restrict ring 0). No `nomem`: the
    // block must also stop the compiler from moving the page reads across it.
    unsafe {
        core::arch::asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nostack, preserves_flags));
    }
    u64::from(high) << 32 | u64::from(low)
}
