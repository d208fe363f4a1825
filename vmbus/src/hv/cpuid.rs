//! Hypervisor detection (reference §1): decode the CPUID leaves 0x40000000..=0x4000000A into an [`HvReport`].
//!
//! What may be used is decided from the feature and privilege bits, never from the vendor string: KVM with
//! Hyper-V enlightenments also answers "Microsoft Hv" and moves its own signature to 0x40000100, and other
//! hypervisors may implement the "Hv#1" interface too. The Hyper-V leaves are only decoded when leaf
//! 0x40000001 reports the "Hv#1" interface; on any other hypervisor they mean something else.

use core::fmt;

use bitflags::bitflags;

/// Reads a CPUID leaf. The kernel implements it with the `cpuid` instruction; tests use fixed tables.
pub trait CpuidSource {
    /// Returns `[eax, ebx, ecx, edx]` of leaf `leaf`, sub-leaf `subleaf`.
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4];
}

/// CPUID leaf numbers used for detection (§1).
pub mod leaf {
    /// Standard leaf 1: ECX bit 31 says a hypervisor is present.
    pub const VERSION_AND_FEATURES: u32 = 0x0000_0001;
    /// Vendor signature and highest hypervisor leaf.
    pub const VENDOR_AND_MAX: u32 = 0x4000_0000;
    /// Interface signature ("Hv#1").
    pub const INTERFACE: u32 = 0x4000_0001;
    /// Hypervisor version and build.
    pub const VERSION: u32 = 0x4000_0002;
    /// Partition privileges (EAX/EBX) and features (EDX).
    pub const FEATURES: u32 = 0x4000_0003;
    /// Implementation recommendations (EAX) and the spin-wait retry count (EBX).
    pub const RECOMMENDATIONS: u32 = 0x4000_0004;
    /// Implementation limits.
    pub const LIMITS: u32 = 0x4000_0005;
    /// Hardware features in use by the hypervisor.
    pub const HARDWARE_FEATURES: u32 = 0x4000_0006;
    /// The last leaf this decoder reads (nested virtualization features).
    pub const NESTED_FEATURES: u32 = 0x4000_000A;
    /// Where KVM puts its own signature when it presents Hyper-V enlightenments.
    pub const KVM_WITH_HYPERV: u32 = 0x4000_0100;
}

/// CPUID.1:ECX bit 31: a hypervisor is present (§1).
pub const HYPERVISOR_PRESENT: u32 = 1 << 31;
/// EAX of leaf 0x40000001 for the Hyper-V interface: "Hv#1" read as a little-endian u32 (§1).
pub const HV_INTERFACE_SIGNATURE: u32 = 0x3123_7648;
/// Microsoft hypervisors report at least this highest leaf (§1).
pub const MIN_HYPERV_MAX_LEAF: u32 = 0x4000_0005;
/// The vendor signature of Hyper-V (and of hypervisors imitating it).
pub const MICROSOFT_HV: VendorId = VendorId(*b"Microsoft Hv");
/// KVM's vendor signature.
pub const KVM_SIGNATURE: VendorId = VendorId(*b"KVMKVMKVM\0\0\0");

/// A 12-byte hypervisor vendor signature (EBX, ECX, EDX of a vendor leaf). Printed with trailing NULs dropped
/// and other non-printable bytes escaped, since it comes from outside the guest.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct VendorId(pub [u8; 12]);

impl VendorId {
    /// The signature spelt by `ebx`, `ecx`, `edx` in that order.
    pub fn from_registers(ebx: u32, ecx: u32, edx: u32) -> Self {
        let mut bytes = [0; 12];
        bytes[0..4].copy_from_slice(&ebx.to_le_bytes());
        bytes[4..8].copy_from_slice(&ecx.to_le_bytes());
        bytes[8..12].copy_from_slice(&edx.to_le_bytes());
        Self(bytes)
    }
}

impl fmt::Display for VendorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let used = self
            .0
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |last| last + 1);
        f.write_str("\"")?;
        for &byte in &self.0[..used] {
            if byte.is_ascii_graphic() || byte == b' ' {
                write!(f, "{}", char::from(byte))?;
            } else {
                write!(f, "\\x{byte:02x}")?;
            }
        }
        f.write_str("\"")
    }
}

bitflags! {
    /// Leaf 0x40000003 EAX: access to synthetic MSRs (partition privilege mask bits 31:0) (§1).
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
    pub struct MsrPrivileges: u32 {
        /// VP_RUNTIME MSR.
        const VP_RUNTIME = 1 << 0;
        /// TIME_REF_COUNT MSR.
        const TIME_REF_COUNT = 1 << 1;
        /// SynIC MSRs (SCONTROL, SVERSION, SIEFP, SIMP, EOM, SINTx).
        const SYNIC = 1 << 2;
        /// Synthetic timer MSRs.
        const SYNTHETIC_TIMERS = 1 << 3;
        /// Synthetic APIC MSRs (EOI, ICR, TPR).
        const APIC_MSRS = 1 << 4;
        /// GUEST_OS_ID and HYPERCALL MSRs.
        const HYPERCALL_MSRS = 1 << 5;
        /// VP_INDEX MSR.
        const VP_INDEX = 1 << 6;
        /// RESET MSR.
        const RESET = 1 << 7;
        /// Statistics pages.
        const STATS = 1 << 8;
        /// REFERENCE_TSC MSR (the reference TSC page).
        const REFERENCE_TSC = 1 << 9;
        /// Guest idle MSR.
        const GUEST_IDLE = 1 << 10;
        /// TSC_FREQUENCY and APIC_FREQUENCY MSRs (also needs [`FeatureFlags::FREQUENCY_MSRS_AVAILABLE`]).
        const FREQUENCY_MSRS = 1 << 11;
        /// Debug MSRs.
        const DEBUG_MSRS = 1 << 12;
        /// Reenlightenment controls.
        const REENLIGHTENMENT = 1 << 13;
        /// TSC invariant controls.
        const TSC_INVARIANT = 1 << 15;
    }
}

bitflags! {
    /// Leaf 0x40000003 EBX: hypercall privileges (partition privilege mask bits 63:32) (§1).
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
    pub struct HypercallPrivileges: u32 {
        /// Create partitions.
        const CREATE_PARTITIONS = 1 << 0;
        /// Read the partition id.
        const ACCESS_PARTITION_ID = 1 << 1;
        /// Access the memory pool.
        const ACCESS_MEMORY_POOL = 1 << 2;
        /// Adjust message buffers.
        const ADJUST_MESSAGE_BUFFERS = 1 << 3;
        /// HvCallPostMessage.
        const POST_MESSAGES = 1 << 4;
        /// HvCallSignalEvent.
        const SIGNAL_EVENTS = 1 << 5;
        /// Create ports.
        const CREATE_PORT = 1 << 6;
        /// Connect ports.
        const CONNECT_PORT = 1 << 7;
        /// Access statistics.
        const ACCESS_STATS = 1 << 8;
        /// Debugging hypercalls.
        const DEBUGGING = 1 << 11;
        /// CPU management.
        const CPU_MANAGEMENT = 1 << 12;
        /// Extended hypercalls.
        const ENABLE_EXTENDED_HYPERCALLS = 1 << 20;
        /// Isolation (confidential VM) hypercalls.
        const ISOLATION = 1 << 22;
    }
}

bitflags! {
    /// Leaf 0x40000003 EDX: miscellaneous features (§1).
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
    pub struct FeatureFlags: u32 {
        /// MWAIT is available (deprecated).
        const MWAIT = 1 << 0;
        /// Guest debugging support.
        const GUEST_DEBUGGING = 1 << 1;
        /// Performance monitor support.
        const PERF_MONITOR = 1 << 2;
        /// Dynamic partitioning events.
        const CPU_DYNAMIC_PARTITIONING = 1 << 3;
        /// Hypercall input may be passed in XMM registers.
        const XMM_HYPERCALL_INPUT = 1 << 4;
        /// A virtual guest idle state is available.
        const GUEST_IDLE_STATE = 1 << 5;
        /// The frequency MSRs are implemented (with [`MsrPrivileges::FREQUENCY_MSRS`]).
        const FREQUENCY_MSRS_AVAILABLE = 1 << 8;
        /// The guest crash MSRs are available.
        const GUEST_CRASH_MSRS = 1 << 10;
        /// Debug MSRs are available.
        const DEBUG_MSRS = 1 << 11;
        /// Extended GVA ranges for flushes.
        const EXT_GVA_RANGES_FLUSH = 1 << 14;
        /// Hypercall output may be returned in XMM registers.
        const XMM_HYPERCALL_OUTPUT = 1 << 15;
        /// Synthetic timers may raise an APIC vector directly.
        const STIMER_DIRECT_MODE = 1 << 19;
    }
}

bitflags! {
    /// Leaf 0x40000004 EAX: implementation recommendations (§1).
    #[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
    pub struct Recommendations: u32 {
        /// Use a hypercall for address space switches.
        const HYPERCALL_ADDRESS_SPACE_SWITCH = 1 << 0;
        /// Use a hypercall for local TLB flushes.
        const HYPERCALL_LOCAL_FLUSH = 1 << 1;
        /// Use a hypercall for remote TLB flushes.
        const HYPERCALL_REMOTE_FLUSH = 1 << 2;
        /// Use the synthetic APIC MSRs for EOI, ICR and TPR.
        const USE_APIC_MSRS = 1 << 3;
        /// Use the RESET MSR to reset the system.
        const USE_RESET_MSR = 1 << 4;
        /// Use relaxed timing (do not treat long delays as watchdog failures).
        const RELAXED_TIMING = 1 << 5;
        /// Auto-EOI is deprecated: EOI the APIC explicitly.
        const DEPRECATE_AUTO_EOI = 1 << 9;
        /// Use the synthetic cluster IPI hypercall.
        const SYNTHETIC_CLUSTER_IPI = 1 << 10;
        /// Use the extended processor masks.
        const EX_PROCESSOR_MASKS = 1 << 11;
        /// Running nested inside another Hyper-V.
        const NESTED = 1 << 12;
        /// Use enlightened VMCS.
        const ENLIGHTENED_VMCS = 1 << 14;
        /// No non-architectural core sharing.
        const NO_NONARCH_CORE_SHARING = 1 << 18;
    }
}

/// Leaf 0x40000002: the hypervisor version (zero until GUEST_OS_ID is written, §1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HvVersion {
    /// EAX: build number.
    pub build: u32,
    /// EBX 31:16.
    pub major: u16,
    /// EBX 15:0.
    pub minor: u16,
    /// ECX.
    pub service_pack: u32,
    /// EDX 31:24.
    pub service_branch: u8,
    /// EDX 23:0.
    pub service_number: u32,
}

impl HvVersion {
    /// Decodes leaf 0x40000002.
    pub fn from_registers([eax, ebx, ecx, edx]: [u32; 4]) -> Self {
        Self {
            build: eax,
            major: (ebx >> 16) as u16,
            minor: ebx as u16,
            service_pack: ecx,
            service_branch: (edx >> 24) as u8,
            service_number: edx & 0x00FF_FFFF,
        }
    }
}

/// Leaf 0x40000005: implementation limits (§1).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ImplementationLimits {
    /// EAX: the most virtual processors a partition may have.
    pub max_virtual_processors: u32,
    /// EBX: the most logical processors the hypervisor supports.
    pub max_logical_processors: u32,
    /// ECX: physical interrupt vectors available for interrupt remapping.
    pub max_interrupt_vectors: u32,
}

/// The decoded Hyper-V leaves 0x40000002..=0x4000000A (present only for an "Hv#1" interface).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HyperVLeaves {
    /// Leaf 0x40000002.
    pub version: HvVersion,
    /// Leaf 0x40000003 EAX.
    pub msr_privileges: MsrPrivileges,
    /// Leaf 0x40000003 EBX.
    pub hypercall_privileges: HypercallPrivileges,
    /// Leaf 0x40000003 ECX (power-management information, kept raw).
    pub power_management: u32,
    /// Leaf 0x40000003 EDX.
    pub features: FeatureFlags,
    /// Leaf 0x40000004 EAX.
    pub recommendations: Recommendations,
    /// Leaf 0x40000004 EBX: spin-lock retries before notifying the hypervisor (0xFFFFFFFF: never).
    pub spin_wait_retries: u32,
    /// Leaf 0x40000005.
    pub limits: ImplementationLimits,
    /// Leaves 0x40000006..=0x4000000A, raw (all zero beyond the highest leaf).
    pub further_leaves: [[u32; 4]; 5],
}

/// What kind of platform the guest runs on, derived from an [`HvReport`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Platform {
    /// CPUID.1:ECX bit 31 is clear: bare metal, or a hypervisor that hides itself (e.g. QEMU TCG by default).
    NoHypervisor,
    /// A hypervisor without the Hyper-V interface (plain KVM, TCG with a signature, Xen, VMware, ...).
    OtherHypervisor,
    /// A hypervisor presenting the "Hv#1" interface.
    HyperV,
    /// KVM presenting Hyper-V enlightenments ("Hv#1" plus KVM's signature at 0x40000100).
    HyperVOnKvm,
}

/// The result of hypervisor detection: the raw facts plus decisions on what may be used (§1).
///
/// The `*_usable` methods look only at feature and privilege bits of a decoded "Hv#1" interface; they answer
/// `false` on every other platform. [`fmt::Display`] prints the multi-line report shown at boot.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct HvReport {
    /// CPUID.1:ECX bit 31.
    pub hypervisor_present: bool,
    /// Leaf 0x40000000 EBX/ECX/EDX (zero when no hypervisor is present).
    pub vendor: VendorId,
    /// Leaf 0x40000000 EAX: the highest hypervisor leaf.
    pub max_leaf: u32,
    /// Leaf 0x40000001 EAX (zero when the leaf is absent).
    pub interface: u32,
    /// The decoded Hyper-V leaves, when the interface is "Hv#1" and the highest leaf reaches 0x40000005.
    pub hyperv: Option<HyperVLeaves>,
    /// The signature found at 0x40000100, when it is KVM's.
    pub kvm_signature: Option<VendorId>,
}

impl HvReport {
    /// Queries `source` and decodes what it finds (§1).
    pub fn detect<S: CpuidSource + ?Sized>(source: &S) -> Self {
        let [_, _, ecx, _] = source.cpuid(leaf::VERSION_AND_FEATURES, 0);
        if ecx & HYPERVISOR_PRESENT == 0 {
            return Self::default();
        }
        let [max_leaf, ebx, ecx, edx] = source.cpuid(leaf::VENDOR_AND_MAX, 0);
        let mut report = Self {
            hypervisor_present: true,
            vendor: VendorId::from_registers(ebx, ecx, edx),
            max_leaf,
            ..Self::default()
        };
        // A highest leaf outside the hypervisor range means the range is not implemented at all (Intel answers
        // unimplemented leaves with the highest basic leaf's data): the vendor registers are noise too.
        if !(leaf::VENDOR_AND_MAX..=0x4000_FFFF).contains(&max_leaf) {
            report.vendor = VendorId::default();
            report.max_leaf = 0;
            return report;
        }
        if max_leaf >= leaf::INTERFACE {
            report.interface = source.cpuid(leaf::INTERFACE, 0)[0];
        }
        if report.interface == HV_INTERFACE_SIGNATURE && max_leaf >= MIN_HYPERV_MAX_LEAF {
            report.hyperv = Some(Self::decode_hyperv_leaves(source, max_leaf));
            let [_, ebx, ecx, edx] = source.cpuid(leaf::KVM_WITH_HYPERV, 0);
            let signature = VendorId::from_registers(ebx, ecx, edx);
            report.kvm_signature = (signature == KVM_SIGNATURE).then_some(signature);
        }
        report
    }

    fn decode_hyperv_leaves<S: CpuidSource + ?Sized>(source: &S, max_leaf: u32) -> HyperVLeaves {
        let [features_eax, features_ebx, features_ecx, features_edx] =
            source.cpuid(leaf::FEATURES, 0);
        let [recommendations, spin_wait_retries, _, _] = source.cpuid(leaf::RECOMMENDATIONS, 0);
        let [max_vps, max_lps, max_vectors, _] = source.cpuid(leaf::LIMITS, 0);
        let mut further_leaves = [[0; 4]; 5];
        for (leaf, registers) in
            (leaf::HARDWARE_FEATURES..=leaf::NESTED_FEATURES).zip(&mut further_leaves)
        {
            if leaf <= max_leaf {
                *registers = source.cpuid(leaf, 0);
            }
        }
        HyperVLeaves {
            version: HvVersion::from_registers(source.cpuid(leaf::VERSION, 0)),
            msr_privileges: MsrPrivileges::from_bits_retain(features_eax),
            hypercall_privileges: HypercallPrivileges::from_bits_retain(features_ebx),
            power_management: features_ecx,
            features: FeatureFlags::from_bits_retain(features_edx),
            recommendations: Recommendations::from_bits_retain(recommendations),
            spin_wait_retries,
            limits: ImplementationLimits {
                max_virtual_processors: max_vps,
                max_logical_processors: max_lps,
                max_interrupt_vectors: max_vectors,
            },
            further_leaves,
        }
    }

    /// The kind of platform.
    pub fn platform(&self) -> Platform {
        match (
            self.hypervisor_present,
            self.hyperv.is_some(),
            self.kvm_signature.is_some(),
        ) {
            (false, _, _) => Platform::NoHypervisor,
            (true, false, _) => Platform::OtherHypervisor,
            (true, true, false) => Platform::HyperV,
            (true, true, true) => Platform::HyperVOnKvm,
        }
    }

    fn msr_privileges(&self) -> MsrPrivileges {
        self.hyperv
            .map(|leaves| leaves.msr_privileges)
            .unwrap_or_default()
    }

    fn hypercall_privileges(&self) -> HypercallPrivileges {
        self.hyperv
            .map(|leaves| leaves.hypercall_privileges)
            .unwrap_or_default()
    }

    fn features(&self) -> FeatureFlags {
        self.hyperv
            .map(|leaves| leaves.features)
            .unwrap_or_default()
    }

    /// GUEST_OS_ID and HYPERCALL MSRs are accessible, so a hypercall page can be set up.
    pub fn hypercalls_usable(&self) -> bool {
        self.msr_privileges()
            .contains(MsrPrivileges::HYPERCALL_MSRS)
    }

    /// The SynIC MSRs are accessible.
    pub fn synic_usable(&self) -> bool {
        self.msr_privileges().contains(MsrPrivileges::SYNIC)
    }

    /// HvCallPostMessage is allowed (and there is a hypercall page to make it through).
    pub fn post_messages_usable(&self) -> bool {
        self.hypercalls_usable()
            && self
                .hypercall_privileges()
                .contains(HypercallPrivileges::POST_MESSAGES)
    }

    /// HvCallSignalEvent is allowed (and there is a hypercall page to make it through).
    pub fn signal_events_usable(&self) -> bool {
        self.hypercalls_usable()
            && self
                .hypercall_privileges()
                .contains(HypercallPrivileges::SIGNAL_EVENTS)
    }

    /// Everything VMBus needs: hypercalls, SynIC, PostMessage and SignalEvent.
    pub fn vmbus_usable(&self) -> bool {
        self.synic_usable() && self.post_messages_usable() && self.signal_events_usable()
    }

    /// The TIME_REF_COUNT MSR is accessible.
    pub fn time_ref_count_usable(&self) -> bool {
        self.msr_privileges()
            .contains(MsrPrivileges::TIME_REF_COUNT)
    }

    /// The reference TSC page is accessible.
    pub fn reference_tsc_usable(&self) -> bool {
        self.msr_privileges().contains(MsrPrivileges::REFERENCE_TSC)
    }

    /// The synthetic timer MSRs are accessible.
    pub fn stimers_usable(&self) -> bool {
        self.msr_privileges()
            .contains(MsrPrivileges::SYNTHETIC_TIMERS)
    }

    /// Synthetic timers can post expiry messages (they need the SynIC too).
    pub fn stimer_message_mode_usable(&self) -> bool {
        self.stimers_usable() && self.synic_usable()
    }

    /// Synthetic timers can raise an APIC vector directly.
    pub fn stimer_direct_mode_usable(&self) -> bool {
        self.stimers_usable() && self.features().contains(FeatureFlags::STIMER_DIRECT_MODE)
    }

    /// TSC_FREQUENCY/APIC_FREQUENCY are readable: both the access privilege (EAX 11) and the feature
    /// (EDX 8) are needed, as Linux checks before trusting them for calibration.
    pub fn frequency_msrs_usable(&self) -> bool {
        self.msr_privileges()
            .contains(MsrPrivileges::FREQUENCY_MSRS)
            && self
                .features()
                .contains(FeatureFlags::FREQUENCY_MSRS_AVAILABLE)
    }

    /// The VP_INDEX MSR is accessible.
    pub fn vp_index_usable(&self) -> bool {
        self.msr_privileges().contains(MsrPrivileges::VP_INDEX)
    }

    /// The hypervisor asks guests not to use auto-EOI: EOI the local APIC explicitly.
    pub fn auto_eoi_deprecated(&self) -> bool {
        self.hyperv.is_some_and(|leaves| {
            leaves
                .recommendations
                .contains(Recommendations::DEPRECATE_AUTO_EOI)
        })
    }

    /// The guest crash MSRs can report a panic to the host.
    pub fn crash_msrs_usable(&self) -> bool {
        self.features().contains(FeatureFlags::GUEST_CRASH_MSRS)
    }
}

/// Writes "yes"/"no".
fn yes_no(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

impl fmt::Display for HvReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.hypervisor_present {
            return writeln!(
                f,
                "hypervisor: none (CPUID.1:ECX[31] clear); no Hyper-V enlightenments"
            );
        }
        write!(
            f,
            "hypervisor: vendor {}, max leaf {:#010x}, interface ",
            self.vendor, self.max_leaf
        )?;
        if self.interface == HV_INTERFACE_SIGNATURE {
            writeln!(f, "\"Hv#1\"")?;
        } else {
            writeln!(f, "{:#010x}", self.interface)?;
        }
        let Some(leaves) = &self.hyperv else {
            return writeln!(f, "  not Hyper-V compatible: no Hyper-V enlightenments");
        };
        let version = &leaves.version;
        writeln!(
            f,
            "  Hyper-V {}.{} build {} (service pack {}, branch {}, number {})",
            version.major,
            version.minor,
            version.build,
            version.service_pack,
            version.service_branch,
            version.service_number
        )?;
        if let Some(signature) = &self.kvm_signature {
            writeln!(
                f,
                "  KVM signature {signature} at 0x40000100: Hyper-V enlightenments provided by KVM"
            )?;
        }
        writeln!(
            f,
            "  privileges: msr {:#010x}, hypercall {:#010x}, features {:#010x}, recommendations {:#010x}",
            leaves.msr_privileges.bits(),
            leaves.hypercall_privileges.bits(),
            leaves.features.bits(),
            leaves.recommendations.bits()
        )?;
        writeln!(
            f,
            "  hypercalls {}, SynIC {}, PostMessage {}, SignalEvent {} => VMBus {}",
            yes_no(self.hypercalls_usable()),
            yes_no(self.synic_usable()),
            yes_no(self.post_messages_usable()),
            yes_no(self.signal_events_usable()),
            if self.vmbus_usable() {
                "usable"
            } else {
                "unusable"
            }
        )?;
        writeln!(
            f,
            "  clock: reference TSC {}, TIME_REF_COUNT {}, frequency MSRs {}; stimers {} (direct mode {})",
            yes_no(self.reference_tsc_usable()),
            yes_no(self.time_ref_count_usable()),
            yes_no(self.frequency_msrs_usable()),
            yes_no(self.stimers_usable()),
            yes_no(self.stimer_direct_mode_usable())
        )?;
        writeln!(
            f,
            "  auto-EOI deprecated {}, relaxed timing {}, APIC MSRs recommended {}",
            yes_no(self.auto_eoi_deprecated()),
            yes_no(
                leaves
                    .recommendations
                    .contains(Recommendations::RELAXED_TIMING)
            ),
            yes_no(
                leaves
                    .recommendations
                    .contains(Recommendations::USE_APIC_MSRS)
            )
        )?;
        writeln!(
            f,
            "  limits: {} virtual processors, {} logical processors, {} interrupt vectors",
            leaves.limits.max_virtual_processors,
            leaves.limits.max_logical_processors,
            leaves.limits.max_interrupt_vectors
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hv::sim::SimCpuid;
    use alloc::string::ToString;

    /// Leaf numbers and the "Hv#1" value: Linux HYPERV_CPUID_* (hvgdk_mini.h), QEMU HV_CPUID_* (hyperv-proto.h);
    /// HYPERVISOR_PRESENT 0x80000000 in both; "Hv#1" = 0x31237648 in the reference and as bytes 'H','v','#','1'.
    #[test]
    fn leaf_numbers_and_signatures() {
        assert_eq!(leaf::VENDOR_AND_MAX, 0x4000_0000);
        assert_eq!(leaf::INTERFACE, 0x4000_0001);
        assert_eq!(leaf::VERSION, 0x4000_0002);
        assert_eq!(leaf::FEATURES, 0x4000_0003);
        assert_eq!(leaf::RECOMMENDATIONS, 0x4000_0004);
        assert_eq!(leaf::LIMITS, 0x4000_0005);
        assert_eq!(leaf::NESTED_FEATURES, 0x4000_000A);
        assert_eq!(HYPERVISOR_PRESENT, 0x8000_0000);
        assert_eq!(HV_INTERFACE_SIGNATURE.to_le_bytes(), *b"Hv#1");
        assert_eq!(MIN_HYPERV_MAX_LEAF, 0x4000_0005);
    }

    /// Feature bits: Linux HV_MSR_*_AVAILABLE / HV_POST_MESSAGES / HV_STIMER_DIRECT_MODE_AVAILABLE /
    /// HV_DEPRECATING_AEOI_RECOMMENDED (hvgdk_mini.h) and QEMU target/i386/kvm/hyperv-proto.h (same values).
    #[test]
    fn feature_bit_positions() {
        assert_eq!(MsrPrivileges::VP_RUNTIME.bits(), 1 << 0);
        assert_eq!(MsrPrivileges::TIME_REF_COUNT.bits(), 1 << 1);
        assert_eq!(MsrPrivileges::SYNIC.bits(), 1 << 2);
        assert_eq!(MsrPrivileges::SYNTHETIC_TIMERS.bits(), 1 << 3);
        assert_eq!(MsrPrivileges::APIC_MSRS.bits(), 1 << 4);
        assert_eq!(MsrPrivileges::HYPERCALL_MSRS.bits(), 1 << 5);
        assert_eq!(MsrPrivileges::VP_INDEX.bits(), 1 << 6);
        assert_eq!(MsrPrivileges::RESET.bits(), 1 << 7);
        assert_eq!(MsrPrivileges::REFERENCE_TSC.bits(), 1 << 9);
        assert_eq!(MsrPrivileges::FREQUENCY_MSRS.bits(), 1 << 11);
        assert_eq!(MsrPrivileges::REENLIGHTENMENT.bits(), 1 << 13);
        assert_eq!(MsrPrivileges::TSC_INVARIANT.bits(), 1 << 15);
        assert_eq!(HypercallPrivileges::POST_MESSAGES.bits(), 1 << 4);
        assert_eq!(HypercallPrivileges::SIGNAL_EVENTS.bits(), 1 << 5);
        assert_eq!(FeatureFlags::XMM_HYPERCALL_INPUT.bits(), 1 << 4);
        assert_eq!(FeatureFlags::FREQUENCY_MSRS_AVAILABLE.bits(), 1 << 8);
        assert_eq!(FeatureFlags::GUEST_CRASH_MSRS.bits(), 1 << 10);
        assert_eq!(FeatureFlags::STIMER_DIRECT_MODE.bits(), 1 << 19);
        assert_eq!(Recommendations::USE_APIC_MSRS.bits(), 1 << 3);
        assert_eq!(Recommendations::RELAXED_TIMING.bits(), 1 << 5);
        assert_eq!(Recommendations::DEPRECATE_AUTO_EOI.bits(), 1 << 9);
    }

    /// Version layout: Linux union hv_hypervisor_version_info (build EAX; minor/major EBX 15:0/31:16;
    /// service pack ECX; number/branch EDX 23:0/31:24), OpenVMM agrees.
    #[test]
    fn version_decoding() {
        let version = HvVersion::from_registers([20348, 0x000A_0000, 3, 0x0500_1234]);
        assert_eq!(
            version,
            HvVersion {
                build: 20348,
                major: 10,
                minor: 0,
                service_pack: 3,
                service_branch: 5,
                service_number: 0x1234
            }
        );
    }

    #[test]
    fn vendor_strings_are_printed_safely() {
        assert_eq!(MICROSOFT_HV.to_string(), "\"Microsoft Hv\"");
        assert_eq!(KVM_SIGNATURE.to_string(), "\"KVMKVMKVM\"");
        assert_eq!(
            VendorId(*b"ab\ncd\x00\x00\x00\x00\x00\x00\x7f").to_string(),
            "\"ab\\x0acd\\x00\\x00\\x00\\x00\\x00\\x00\\x7f\""
        );
        assert_eq!(
            VendorId::from_registers(0x7263_694D, 0x666F_736F, 0x7648_2074),
            MICROSOFT_HV
        );
    }

    #[test]
    fn no_hypervisor() {
        let report = HvReport::detect(&SimCpuid::no_hypervisor());
        assert_eq!(report.platform(), Platform::NoHypervisor);
        assert!(!report.hypercalls_usable() && !report.synic_usable() && !report.vmbus_usable());
        assert!(!report.reference_tsc_usable() && !report.auto_eoi_deprecated());
        let text = report.to_string();
        assert!(text.contains("hypervisor: none"), "{text}");
    }

    #[test]
    fn plain_kvm_is_another_hypervisor() {
        let report = HvReport::detect(&SimCpuid::kvm());
        assert_eq!(report.platform(), Platform::OtherHypervisor);
        assert_eq!(report.vendor, KVM_SIGNATURE);
        assert_eq!(report.hyperv, None);
        assert!(!report.hypercalls_usable() && !report.vmbus_usable());
        let text = report.to_string();
        assert!(
            text.contains("\"KVMKVMKVM\"") && text.contains("not Hyper-V compatible"),
            "{text}"
        );
    }

    #[test]
    fn hyperv_with_everything() {
        let report = HvReport::detect(&SimCpuid::hyperv());
        assert_eq!(report.platform(), Platform::HyperV);
        assert_eq!(report.vendor, MICROSOFT_HV);
        assert!(report.vmbus_usable());
        assert!(report.reference_tsc_usable() && report.time_ref_count_usable());
        assert!(
            report.stimers_usable()
                && report.stimer_direct_mode_usable()
                && report.stimer_message_mode_usable()
        );
        assert!(
            report.frequency_msrs_usable()
                && report.auto_eoi_deprecated()
                && report.vp_index_usable()
        );
        let leaves = report.hyperv.unwrap();
        assert_eq!(
            (
                leaves.version.major,
                leaves.version.minor,
                leaves.version.build
            ),
            (10, 0, 20348)
        );
        let text = report.to_string();
        assert!(
            text.contains("\"Microsoft Hv\"") && text.contains("\"Hv#1\""),
            "{text}"
        );
        assert!(
            text.contains("VMBus usable") && text.contains("Hyper-V 10.0 build 20348"),
            "{text}"
        );
        assert!(!text.contains("KVM signature"), "{text}");
    }

    #[test]
    fn hyperv_on_kvm_is_reported() {
        let report = HvReport::detect(&SimCpuid::hyperv_on_kvm());
        assert_eq!(report.platform(), Platform::HyperVOnKvm);
        assert_eq!(report.kvm_signature, Some(KVM_SIGNATURE));
        assert!(report.vmbus_usable());
        assert!(
            report
                .to_string()
                .contains("Hyper-V enlightenments provided by KVM")
        );
    }

    /// The vendor string alone decides nothing: "Microsoft Hv" with the privilege bits cleared is not usable,
    /// and feature bits are not read at all behind a foreign interface signature.
    #[test]
    fn decisions_come_from_feature_bits() {
        let mut cpuid = SimCpuid::hyperv();
        cpuid.set(leaf::FEATURES, [0, 0, 0, 0]);
        let report = HvReport::detect(&cpuid);
        assert_eq!(report.platform(), Platform::HyperV);
        assert!(
            !report.hypercalls_usable() && !report.synic_usable() && !report.post_messages_usable()
        );
        assert!(report.to_string().contains("VMBus unusable"));

        let mut cpuid = SimCpuid::hyperv();
        let [eax, ebx, ecx, edx] = cpuid.get(leaf::FEATURES);
        cpuid.set(
            leaf::FEATURES,
            [eax & !MsrPrivileges::HYPERCALL_MSRS.bits(), ebx, ecx, edx],
        );
        let report = HvReport::detect(&cpuid);
        assert!(report.synic_usable() && !report.post_messages_usable() && !report.vmbus_usable());

        let mut cpuid = SimCpuid::hyperv();
        let [eax, ebx, ecx, edx] = cpuid.get(leaf::FEATURES);
        cpuid.set(
            leaf::FEATURES,
            [
                eax,
                ebx & !HypercallPrivileges::SIGNAL_EVENTS.bits(),
                ecx,
                edx,
            ],
        );
        assert!(!HvReport::detect(&cpuid).signal_events_usable());

        let mut cpuid = SimCpuid::hyperv();
        let [eax, ebx, ecx, edx] = cpuid.get(leaf::FEATURES);
        cpuid.set(
            leaf::FEATURES,
            [
                eax,
                ebx,
                ecx,
                edx & !FeatureFlags::FREQUENCY_MSRS_AVAILABLE.bits(),
            ],
        );
        assert!(
            !HvReport::detect(&cpuid).frequency_msrs_usable(),
            "EAX 11 alone is not enough"
        );

        let mut cpuid = SimCpuid::hyperv();
        cpuid.set(leaf::INTERFACE, [0x3123_5356, 0, 0, 0]); // "VS#1": not the Hyper-V interface
        let report = HvReport::detect(&cpuid);
        assert_eq!(report.platform(), Platform::OtherHypervisor);
        assert!(!report.vmbus_usable());
    }

    #[test]
    fn nonsense_max_leaf_is_not_trusted() {
        let mut cpuid = SimCpuid::hyperv();
        let [_, ebx, ecx, edx] = cpuid.get(leaf::VENDOR_AND_MAX);
        // Intel answers an unimplemented leaf with the highest basic leaf's data, e.g. a small max leaf.
        cpuid.set(leaf::VENDOR_AND_MAX, [0x0000_000D, ebx, ecx, edx]);
        let report = HvReport::detect(&cpuid);
        assert_eq!(report.platform(), Platform::OtherHypervisor);
        assert_eq!(
            (report.max_leaf, report.vendor, report.interface),
            (0, VendorId::default(), 0)
        );

        let mut cpuid = SimCpuid::hyperv();
        cpuid.set(leaf::VENDOR_AND_MAX, [0x4000_0004, ebx, ecx, edx]);
        assert_eq!(
            HvReport::detect(&cpuid).hyperv,
            None,
            "Hyper-V reports at least 0x40000005"
        );

        // Only the vendor leaf exists: the interface leaf is not read.
        cpuid.set(leaf::VENDOR_AND_MAX, [0x4000_0000, ebx, ecx, edx]);
        let report = HvReport::detect(&cpuid);
        assert_eq!(
            (report.max_leaf, report.vendor, report.interface),
            (0x4000_0000, MICROSOFT_HV, 0)
        );
        assert_eq!(report.platform(), Platform::OtherHypervisor);
    }
}
