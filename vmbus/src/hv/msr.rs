//! Synthetic MSRs: their numbers and their bit layouts as typed values (reference §2).
//!
//! Each register type wraps the raw `u64` and offers `from_bits`/`bits`, accessors and `with_*` builders that
//! leave every other bit untouched, so a read-modify-write keeps the bits the TLFS says to preserve. The MSRs
//! themselves are reached through [`MsrAccess`], which the kernel implements with `rdmsr`/`wrmsr` and
//! [`crate::hv::sim::SimHypervisor`] implements on the host.

/// Guest OS identity (§2); must be non-zero before the hypercall page can be enabled. See [`GuestOsId`].
pub const GUEST_OS_ID: u32 = 0x4000_0000;
/// Hypercall page control (§2). See [`HypercallMsr`].
pub const HYPERCALL: u32 = 0x4000_0001;
/// Read-only index of the current virtual processor, the value used as `target_vp` (§2).
pub const VP_INDEX: u32 = 0x4000_0002;
/// Partition reset (§2); writing 1 resets the partition.
pub const RESET: u32 = 0x4000_0003;
/// Time the current virtual processor has run, in 100 ns units.
pub const VP_RUNTIME: u32 = 0x4000_0010;
/// Partition reference counter in 100 ns units (§2): the clock of last resort.
pub const TIME_REF_COUNT: u32 = 0x4000_0020;
/// Reference TSC page control (§2). See [`ReferenceTscMsr`].
pub const REFERENCE_TSC: u32 = 0x4000_0021;
/// TSC frequency in Hz (§2); readable when [`crate::hv::HvReport::frequency_msrs_usable`].
pub const TSC_FREQUENCY: u32 = 0x4000_0022;
/// Local APIC timer frequency in Hz (§2); readable when [`crate::hv::HvReport::frequency_msrs_usable`].
pub const APIC_FREQUENCY: u32 = 0x4000_0023;
/// Synthetic APIC end-of-interrupt register.
pub const APIC_EOI: u32 = 0x4000_0070;
/// Synthetic APIC interrupt command register.
pub const APIC_ICR: u32 = 0x4000_0071;
/// Synthetic APIC task priority register.
pub const APIC_TPR: u32 = 0x4000_0072;
/// SynIC global enable (§2). See [`SControl`].
pub const SCONTROL: u32 = 0x4000_0080;
/// SynIC version; reads [`SYNIC_VERSION`] (§2).
pub const SVERSION: u32 = 0x4000_0081;
/// SynIC event flags page (§2, §4). See [`SiefpMsr`].
pub const SIEFP: u32 = 0x4000_0082;
/// SynIC message page (§2, §4). See [`SimpMsr`].
pub const SIMP: u32 = 0x4000_0083;
/// End of message: writing 0 asks the hypervisor to redeliver a pending message (§2, §4).
pub const EOM: u32 = 0x4000_0084;
/// Synthetic interrupt source 0; SINTn is `SINT0 + n` (§2). See [`Sint`] and [`sint`].
pub const SINT0: u32 = 0x4000_0090;
/// Configuration of synthetic timer 0; timer n is `STIMER0_CONFIG + 2n` (§2). See [`StimerConfig`].
pub const STIMER0_CONFIG: u32 = 0x4000_00B0;
/// Count of synthetic timer 0 in 100 ns units; timer n is `STIMER0_COUNT + 2n` (§2).
pub const STIMER0_COUNT: u32 = 0x4000_00B1;
/// First guest crash parameter register (P0..P4 are consecutive).
pub const CRASH_P0: u32 = 0x4000_0100;
/// Guest crash control register: setting bit 63 reports the crash parameters to the host.
pub const CRASH_CTL: u32 = 0x4000_0105;

/// Number of synthetic interrupt sources per virtual processor (§4).
pub const SINT_COUNT: u8 = 16;
/// Number of synthetic timers per virtual processor (§2).
pub const STIMER_COUNT: u8 = 4;
/// The value [`SVERSION`] reads (§2).
pub const SYNIC_VERSION: u64 = 1;

/// The MSR number of SINT `index` (§2), or `None` when `index` is not below [`SINT_COUNT`].
pub const fn sint(index: u8) -> Option<u32> {
    if index < SINT_COUNT {
        Some(SINT0 + index as u32)
    } else {
        None
    }
}

/// The configuration MSR of synthetic timer `index` (§2), or `None` when `index` is not below [`STIMER_COUNT`].
pub const fn stimer_config(index: u8) -> Option<u32> {
    if index < STIMER_COUNT {
        Some(STIMER0_CONFIG + 2 * index as u32)
    } else {
        None
    }
}

/// The count MSR of synthetic timer `index` (§2), or `None` when `index` is not below [`STIMER_COUNT`].
pub const fn stimer_count(index: u8) -> Option<u32> {
    if index < STIMER_COUNT {
        Some(STIMER0_COUNT + 2 * index as u32)
    } else {
        None
    }
}

/// Reads and writes model-specific registers. The kernel implements it with `rdmsr`/`wrmsr` (and should only
/// let the synthetic range 0x4000_0000..=0x4000_01FF through); the simulator implements the Hyper-V subset.
pub trait MsrAccess {
    /// Reads MSR `msr`.
    fn read_msr(&self, msr: u32) -> u64;
    /// Writes `value` to MSR `msr`.
    fn write_msr(&self, msr: u32, value: u64);
}

/// Extracts `width` bits of `bits` starting at bit `shift`.
const fn field(bits: u64, shift: u32, width: u32) -> u64 {
    (bits >> shift) & ((1u64 << width) - 1)
}

/// Replaces `width` bits of `bits` starting at bit `shift` with `value` (extra high bits of `value` are dropped).
const fn with_field(bits: u64, shift: u32, width: u32, value: u64) -> u64 {
    let mask = ((1u64 << width) - 1) << shift;
    (bits & !mask) | ((value << shift) & mask)
}

/// Sets or clears the single bit `bit` of `bits`.
const fn with_bit(bits: u64, bit: u32, set: bool) -> u64 {
    if set {
        bits | (1 << bit)
    } else {
        bits & !(1 << bit)
    }
}

/// The GUEST_OS_ID register in the open-source encoding (§2): bit 63 set, OsType in 62:56, OsId in 55:48,
/// version in 47:16, build in 15:0.
///
/// # The value this kernel writes
/// The TLFS allocates open-source OsType values only to Linux (1), FreeBSD (2), Xen (3) and Illumos (4); there
/// is none for a unikernel. This project uses [`GuestOsId::OS_TYPE_THIS_KERNEL`] = 0x7F, the highest 7-bit
/// value: it cannot be mistaken for an allocated OS, it is as far from the next value Microsoft would hand out
/// as possible, and it makes the register non-zero, which is all the hypervisor requires before the hypercall
/// page is enabled. OsId is 0 (there is no distribution), the version packs the kernel's semver as
/// `major << 16 | minor << 8 | patch`, and the build is 0. [`GuestOsId::for_this_kernel`] builds it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct GuestOsId(u64);

impl GuestOsId {
    /// Bit 63: the guest is an open-source OS and uses this encoding.
    pub const OPEN_SOURCE: u64 = 1 << 63;
    /// OsType allocated to Linux.
    pub const OS_TYPE_LINUX: u8 = 1;
    /// OsType allocated to FreeBSD.
    pub const OS_TYPE_FREEBSD: u8 = 2;
    /// OsType allocated to Xen.
    pub const OS_TYPE_XEN: u8 = 3;
    /// OsType allocated to Illumos.
    pub const OS_TYPE_ILLUMOS: u8 = 4;
    /// OsType this kernel reports: 0x7F, "other"; see the type's documentation for the reasoning.
    pub const OS_TYPE_THIS_KERNEL: u8 = 0x7F;
    /// OsId this kernel reports (no distribution).
    pub const OS_ID_THIS_KERNEL: u8 = 0;

    /// Builds an open-source guest OS id. `os_type` has 7 bits; a higher bit is dropped.
    pub const fn open_source(os_type: u8, os_id: u8, version: u32, build: u16) -> Self {
        let mut bits = Self::OPEN_SOURCE;
        bits = with_field(bits, 56, 7, os_type as u64);
        bits = with_field(bits, 48, 8, os_id as u64);
        bits = with_field(bits, 16, 32, version as u64);
        bits = with_field(bits, 0, 16, build as u64);
        Self(bits)
    }

    /// The id this kernel writes at boot for kernel version `major.minor.patch`.
    pub const fn for_this_kernel(major: u8, minor: u8, patch: u8) -> Self {
        let version = (major as u32) << 16 | (minor as u32) << 8 | patch as u32;
        Self::open_source(
            Self::OS_TYPE_THIS_KERNEL,
            Self::OS_ID_THIS_KERNEL,
            version,
            0,
        )
    }

    /// Wraps a raw register value (e.g. one the firmware left behind).
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw register value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether bit 63 (open-source encoding) is set.
    pub const fn is_open_source(self) -> bool {
        self.0 & Self::OPEN_SOURCE != 0
    }

    /// OsType, bits 62:56.
    pub const fn os_type(self) -> u8 {
        field(self.0, 56, 7) as u8
    }

    /// OsId, bits 55:48.
    pub const fn os_id(self) -> u8 {
        field(self.0, 48, 8) as u8
    }

    /// Version, bits 47:16.
    pub const fn version(self) -> u32 {
        field(self.0, 16, 32) as u32
    }

    /// Build, bits 15:0.
    pub const fn build(self) -> u16 {
        field(self.0, 0, 16) as u16
    }
}

/// Defines a register of the "enable bit 0, bits 11:1 preserved, GPFN in 63:12" shape shared by the hypercall,
/// SIMP, SIEFP and reference TSC MSRs (§2).
macro_rules! page_msr {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
        pub struct $name(u64);

        impl $name {
            /// Bit 0: the page is enabled.
            pub const ENABLE: u64 = 1;
            /// Bits 11:1, which software must preserve on writes.
            pub const PRESERVED_MASK: u64 = 0xFFE;

            /// Wraps a raw register value.
            pub const fn from_bits(bits: u64) -> Self {
                Self(bits)
            }

            /// The raw register value.
            pub const fn bits(self) -> u64 {
                self.0
            }

            /// Whether the page is enabled (bit 0).
            pub const fn enabled(self) -> bool {
                self.0 & Self::ENABLE != 0
            }

            /// The guest physical frame number of the page (bits 63:12).
            pub const fn gpfn(self) -> u64 {
                self.0 >> 12
            }

            /// The guest physical address of the page.
            pub const fn page_address(self) -> u64 {
                self.0 & !0xFFF
            }

            /// The bits 11:1 the guest must write back unchanged.
            pub const fn preserved_bits(self) -> u64 {
                self.0 & Self::PRESERVED_MASK
            }

            /// This value with bit 0 set or cleared; every other bit is kept.
            pub const fn with_enabled(self, enabled: bool) -> Self {
                Self(with_bit(self.0, 0, enabled))
            }

            /// This value pointing at frame `gpfn` (52 bits; higher bits are dropped); every other bit is kept.
            pub const fn with_gpfn(self, gpfn: u64) -> Self {
                Self(with_field(self.0, 12, 52, gpfn))
            }

            /// The value to write to enable the page at `gpfn`, given the value `self` read from the register:
            /// the preserved bits 11:1 are kept.
            pub const fn enabled_at(self, gpfn: u64) -> Self {
                self.with_gpfn(gpfn).with_enabled(true)
            }
        }
    };
}

page_msr! {
    /// The HYPERCALL MSR (§2): bit 0 enables the hypercall page at GPFN 63:12, whose contents the hypervisor
    /// then overlays with the call stub (map it executable, not writable).
    ///
    /// ⚠ OpenVMM names bit 1 "locked" (the page can no longer be moved); Linux and the TLFS call 11:1 reserved.
    /// [`HypercallMsr::locked`] reads it for the boot report; writes keep it as read.
    HypercallMsr
}

impl HypercallMsr {
    /// Bit 1, "locked" in OpenVMM only (⚠ reference §2).
    pub const fn locked(self) -> bool {
        self.0 & 0b10 != 0
    }
}

page_msr! {
    /// The SIMP MSR (§2, §4): enable and GPFN of the SynIC message page (16 slots of 256 bytes).
    SimpMsr
}

page_msr! {
    /// The SIEFP MSR (§2, §4): enable and GPFN of the SynIC event flags page (16 × 2048 flag bits).
    SiefpMsr
}

page_msr! {
    /// The REFERENCE_TSC MSR (§2): enable and GPFN of the reference TSC page read by [`crate::hv::time`].
    ReferenceTscMsr
}

/// The SCONTROL MSR (§2): bit 0 enables the SynIC as a whole; the other bits are kept as read.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct SControl(u64);

impl SControl {
    /// Bit 0: the SynIC is enabled.
    pub const ENABLE: u64 = 1;

    /// Wraps a raw register value.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw register value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether the SynIC is enabled.
    pub const fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }

    /// This value with the enable bit set or cleared.
    pub const fn with_enabled(self, enabled: bool) -> Self {
        Self(with_bit(self.0, 0, enabled))
    }
}

/// A SINTx MSR (§2): routes synthetic interrupt source x to an APIC vector.
///
/// Vector in 7:0 (valid from [`Sint::MIN_VECTOR`]), masked 16, auto-EOI 17, polling 18, proxy 20. The reset
/// value is [`Sint::RESET`]: masked, vector 0.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Sint(u64);

impl Default for Sint {
    fn default() -> Self {
        Self::RESET
    }
}

impl Sint {
    /// Bit 16: the source is masked (no interrupt is raised).
    pub const MASKED: u64 = 1 << 16;
    /// Bit 17: the hypervisor performs the EOI itself (only where the recommendations allow it).
    pub const AUTO_EOI: u64 = 1 << 17;
    /// Bit 18: polling mode (no interrupt; the guest polls the slot).
    pub const POLLING: u64 = 1 << 18;
    /// Bit 20: proxy the interrupt to a paravisor.
    pub const PROXY: u64 = 1 << 20;
    /// The value after reset: masked, vector 0.
    pub const RESET: Sint = Sint(Self::MASKED);
    /// Vectors below 16 are architecturally reserved and rejected.
    pub const MIN_VECTOR: u8 = 16;

    /// An unmasked source delivering `vector` without auto-EOI, or `None` if `vector` is below [`Self::MIN_VECTOR`].
    pub const fn for_vector(vector: u8) -> Option<Self> {
        if vector < Self::MIN_VECTOR {
            None
        } else {
            Some(Self(vector as u64))
        }
    }

    /// Wraps a raw register value.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw register value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The APIC vector, bits 7:0.
    pub const fn vector(self) -> u8 {
        self.0 as u8
    }

    /// Whether the source is masked.
    pub const fn masked(self) -> bool {
        self.0 & Self::MASKED != 0
    }

    /// Whether the hypervisor EOIs the interrupt itself.
    pub const fn auto_eoi(self) -> bool {
        self.0 & Self::AUTO_EOI != 0
    }

    /// Whether polling mode is selected.
    pub const fn polling(self) -> bool {
        self.0 & Self::POLLING != 0
    }

    /// Whether the interrupt is proxied.
    pub const fn proxy(self) -> bool {
        self.0 & Self::PROXY != 0
    }

    /// This value with vector `vector`.
    pub const fn with_vector(self, vector: u8) -> Self {
        Self(with_field(self.0, 0, 8, vector as u64))
    }

    /// This value masked or unmasked.
    pub const fn with_masked(self, masked: bool) -> Self {
        Self(with_bit(self.0, 16, masked))
    }

    /// This value with auto-EOI on or off.
    pub const fn with_auto_eoi(self, auto_eoi: bool) -> Self {
        Self(with_bit(self.0, 17, auto_eoi))
    }

    /// This value with polling on or off.
    pub const fn with_polling(self, polling: bool) -> Self {
        Self(with_bit(self.0, 18, polling))
    }
}

/// A STIMERn_CONFIG MSR (§2): enable 0, periodic 1, lazy 2, auto-enable 3, APIC vector 11:4 (direct mode),
/// direct mode 12, SINT 19:16 (message mode).
///
/// In message mode an expiry posts a [`crate::hv::synic::TimerMessagePayload`] of type
/// [`crate::hv::synic::HvMessageType::TIMER_EXPIRED`] to SINT `sintx`; in direct mode it raises `apic_vector`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct StimerConfig(u64);

impl StimerConfig {
    /// Bit 0: the timer is enabled.
    pub const ENABLE: u64 = 1 << 0;
    /// Bit 1: periodic (the count is the period) rather than one-shot (the count is an absolute time).
    pub const PERIODIC: u64 = 1 << 1;
    /// Bit 2: lazy expiry (the hypervisor may coalesce late expiries).
    pub const LAZY: u64 = 1 << 2;
    /// Bit 3: writing the count register enables the timer.
    pub const AUTO_ENABLE: u64 = 1 << 3;
    /// Bit 12: direct mode (raise `apic_vector` instead of posting a message).
    pub const DIRECT_MODE: u64 = 1 << 12;

    /// An enabled one-shot timer that posts its expiry message to SINT `sint` (4 bits; higher bits dropped).
    pub const fn message_mode(sint: u8) -> Self {
        Self(Self::ENABLE).with_sintx(sint)
    }

    /// An enabled one-shot timer that raises `vector` directly (only where direct mode is offered).
    pub const fn direct(vector: u8) -> Self {
        Self(Self::ENABLE | Self::DIRECT_MODE).with_apic_vector(vector)
    }

    /// Wraps a raw register value.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }

    /// The raw register value.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// Whether the timer is enabled.
    pub const fn enabled(self) -> bool {
        self.0 & Self::ENABLE != 0
    }

    /// Whether the timer is periodic.
    pub const fn periodic(self) -> bool {
        self.0 & Self::PERIODIC != 0
    }

    /// Whether lazy expiry is selected.
    pub const fn lazy(self) -> bool {
        self.0 & Self::LAZY != 0
    }

    /// Whether writing the count enables the timer.
    pub const fn auto_enable(self) -> bool {
        self.0 & Self::AUTO_ENABLE != 0
    }

    /// The APIC vector used in direct mode, bits 11:4.
    pub const fn apic_vector(self) -> u8 {
        field(self.0, 4, 8) as u8
    }

    /// Whether direct mode is selected.
    pub const fn direct_mode(self) -> bool {
        self.0 & Self::DIRECT_MODE != 0
    }

    /// The SINT receiving expiry messages, bits 19:16.
    pub const fn sintx(self) -> u8 {
        field(self.0, 16, 4) as u8
    }

    /// This value enabled or disabled.
    pub const fn with_enabled(self, enabled: bool) -> Self {
        Self(with_bit(self.0, 0, enabled))
    }

    /// This value periodic or one-shot.
    pub const fn with_periodic(self, periodic: bool) -> Self {
        Self(with_bit(self.0, 1, periodic))
    }

    /// This value with lazy expiry on or off.
    pub const fn with_lazy(self, lazy: bool) -> Self {
        Self(with_bit(self.0, 2, lazy))
    }

    /// This value with auto-enable on or off.
    pub const fn with_auto_enable(self, auto_enable: bool) -> Self {
        Self(with_bit(self.0, 3, auto_enable))
    }

    /// This value with direct-mode vector `vector`.
    pub const fn with_apic_vector(self, vector: u8) -> Self {
        Self(with_field(self.0, 4, 8, vector as u64))
    }

    /// This value in direct mode or message mode.
    pub const fn with_direct_mode(self, direct: bool) -> Self {
        Self(with_bit(self.0, 12, direct))
    }

    /// This value posting to SINT `sint` (4 bits; higher bits dropped).
    pub const fn with_sintx(self, sint: u8) -> Self {
        Self(with_field(self.0, 16, 4, sint as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MSR numbers. Sources: [HVGDK] Linux include/hyperv/hvgdk_mini.h (HV_X64_MSR_*) and QEMU
    /// target/i386/kvm/hyperv-proto.h (same names); [OVD] OpenVMM hvdef agrees for every one it defines.
    #[test]
    fn msr_numbers_match_linux_and_qemu() {
        assert_eq!(GUEST_OS_ID, 0x4000_0000);
        assert_eq!(HYPERCALL, 0x4000_0001);
        assert_eq!(VP_INDEX, 0x4000_0002);
        assert_eq!(RESET, 0x4000_0003);
        assert_eq!(VP_RUNTIME, 0x4000_0010);
        assert_eq!(TIME_REF_COUNT, 0x4000_0020);
        assert_eq!(REFERENCE_TSC, 0x4000_0021);
        assert_eq!(TSC_FREQUENCY, 0x4000_0022);
        assert_eq!(APIC_FREQUENCY, 0x4000_0023);
        assert_eq!(
            (APIC_EOI, APIC_ICR, APIC_TPR),
            (0x4000_0070, 0x4000_0071, 0x4000_0072)
        );
        assert_eq!(SCONTROL, 0x4000_0080);
        assert_eq!(SVERSION, 0x4000_0081);
        assert_eq!(SIEFP, 0x4000_0082);
        assert_eq!(SIMP, 0x4000_0083);
        assert_eq!(EOM, 0x4000_0084);
        assert_eq!(sint(0), Some(0x4000_0090));
        assert_eq!(sint(2), Some(0x4000_0092));
        assert_eq!(sint(15), Some(0x4000_009F));
        assert_eq!(sint(16), None);
        assert_eq!(stimer_config(0), Some(0x4000_00B0));
        assert_eq!(stimer_count(0), Some(0x4000_00B1));
        assert_eq!(stimer_config(3), Some(0x4000_00B6));
        assert_eq!(stimer_count(3), Some(0x4000_00B7));
        assert_eq!(stimer_config(4), None);
        assert_eq!((CRASH_P0, CRASH_CTL), (0x4000_0100, 0x4000_0105));
        assert_eq!(SYNIC_VERSION, 1);
    }

    /// Linux writes 0x8100 << 48 for itself (HV_LINUX_VENDOR_ID in Linux include/hyperv/hvgdk.h, and the KVM
    /// selftests' LINUX_OS_ID): OsType 1. OsType 1..4 = Linux/FreeBSD/Xen/Illumos also in windows-sys
    /// GUEST_OS_OPENSOURCE_IDS. Field positions: hvgdk.h comment and reference §2.
    #[test]
    fn guest_os_id_open_source_encoding() {
        let linux = GuestOsId::open_source(GuestOsId::OS_TYPE_LINUX, 0, 0, 0);
        assert_eq!(linux.bits(), 0x8100 << 48);
        assert_eq!(
            (
                GuestOsId::OS_TYPE_FREEBSD,
                GuestOsId::OS_TYPE_XEN,
                GuestOsId::OS_TYPE_ILLUMOS
            ),
            (2, 3, 4)
        );

        let id = GuestOsId::open_source(0x7F, 0xAB, 0x1234_5678, 0x9ABC);
        assert_eq!(id.bits(), 0xFFAB_1234_5678_9ABC);
        assert!(id.is_open_source());
        assert_eq!(
            (id.os_type(), id.os_id(), id.version(), id.build()),
            (0x7F, 0xAB, 0x1234_5678, 0x9ABC)
        );

        let ours = GuestOsId::for_this_kernel(0, 1, 2);
        assert_eq!(ours.bits(), 0xFF00_0000_0102_0000);
        assert_ne!(
            ours.bits(),
            0,
            "the hypercall page needs a non-zero guest OS id"
        );
        // OsType is 7 bits: a stray eighth bit must not leak into bit 63's neighbour fields.
        assert_eq!(GuestOsId::open_source(0xFF, 0, 0, 0).os_type(), 0x7F);
    }

    /// Hypercall/SIMP/SIEFP/reference TSC: bit 0 enable, 11:1 preserved, 63:12 GPFN. Sources: Linux
    /// hv_x64_msr_hypercall_contents / hv_synic_simp / hv_reference_tsc_msr, and the MSDN
    /// HV_X64_MSR_REFERENCE_TSC_CONTENTS page (ReservedP 11:1); OpenVMM MsrHypercallContents.
    #[test]
    fn page_msrs_keep_preserved_bits() {
        let read = SimpMsr::from_bits(0x0000_0000_0000_0AA4);
        let written = read.enabled_at(0x12_3456);
        assert_eq!(written.bits(), 0x1_2345_6AA5);
        assert!(written.enabled());
        assert_eq!(written.gpfn(), 0x12_3456);
        assert_eq!(written.page_address(), 0x1_2345_6000);
        assert_eq!(written.preserved_bits(), 0xAA4);
        assert_eq!(written.with_enabled(false).bits(), 0x1_2345_6AA4);

        let hypercall = HypercallMsr::from_bits(0).enabled_at(0x000F_FFFF_FFFF_FFFF);
        assert_eq!(hypercall.bits(), 0xFFFF_FFFF_FFFF_F001);
        assert!(!hypercall.locked());
        assert!(HypercallMsr::from_bits(0b11).locked());
        assert_eq!(SiefpMsr::from_bits(0).enabled_at(1).bits(), 0x1001);
        assert_eq!(ReferenceTscMsr::from_bits(0).enabled_at(2).bits(), 0x2001);
    }

    /// SINT: vector 7:0, masked 16, auto-EOI 17, polling 18, proxy 20; reset 0x10000. Sources: Linux
    /// hv_synic_sint and HV_SYNIC_SINT_MASKED/AUTO_EOI; QEMU HV_SINT_MASKED (1<<16), HV_SINT_AUTO_EOI (1<<17).
    #[test]
    fn sint_encoding() {
        assert_eq!(Sint::RESET.bits(), 0x1_0000);
        assert!(Sint::RESET.masked());
        assert_eq!(Sint::for_vector(15), None);
        let sint = Sint::for_vector(0x90).unwrap();
        assert_eq!(sint.bits(), 0x90);
        assert!(!sint.masked());
        let all = sint
            .with_masked(true)
            .with_auto_eoi(true)
            .with_polling(true);
        assert_eq!(all.bits(), 0x7_0090);
        assert!(all.auto_eoi() && all.polling() && all.masked());
        assert!(Sint::from_bits(1 << 20).proxy());
        assert_eq!(all.with_vector(0x31).vector(), 0x31);
        assert_eq!(all.with_masked(false).bits(), 0x6_0090);
    }

    /// SCONTROL bit 0: Linux HV_SYNIC_CONTROL_ENABLE, QEMU HV_SYNIC_ENABLE.
    #[test]
    fn scontrol_encoding() {
        let value = SControl::from_bits(0xF0).with_enabled(true);
        assert_eq!(value.bits(), 0xF1);
        assert!(value.enabled());
        assert_eq!(value.with_enabled(false).bits(), 0xF0);
    }

    /// STIMER config: enable 0, periodic 1, lazy 2, auto_enable 3, apic_vector 11:4, direct_mode 12,
    /// sintx 19:16. Sources: Linux union hv_stimer_config; a second, independent Rust guest's TimerConfiguration
    /// flags (1<<0..1<<3, DIRECT_MODE 1<<12, vector at bit 4) found via the code search.
    #[test]
    fn stimer_config_encoding() {
        assert_eq!(StimerConfig::message_mode(2).bits(), 0x2_0001);
        let direct = StimerConfig::direct(0xEF).with_periodic(true);
        assert_eq!(direct.bits(), 0x1EF3);
        assert!(direct.direct_mode() && direct.periodic() && direct.enabled());
        assert_eq!(direct.apic_vector(), 0xEF);
        let all = StimerConfig::default()
            .with_enabled(true)
            .with_periodic(true)
            .with_lazy(true)
            .with_auto_enable(true)
            .with_apic_vector(0xFF)
            .with_direct_mode(true)
            .with_sintx(0xF);
        assert_eq!(all.bits(), 0xF_1FFF);
        assert!(all.lazy() && all.auto_enable());
        assert_eq!(all.sintx(), 0xF);
        assert_eq!(all.with_sintx(0x13).sintx(), 0x3, "sintx is 4 bits");
    }
}
