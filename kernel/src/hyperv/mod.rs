//! The Hyper-V platform layer: the kernel's implementations of the `vmbus::hv` traits over the real hypervisor
//! (reference `hyperv-vmbus.md` §1–4; issue 4).
//!
//! Bring-up, in [`init`], each step only where detection's feature bits allow it:
//! 1. detection ([`detect`]): `vmbus::hv::HvReport` over the `cpuid` instruction; what is usable is decided from the
//!    feature and privilege bits, never from the vendor string (KVM also says "Microsoft Hv" and keeps its own
//!    signature at 0x40000100, which the report notes);
//! 2. the guest OS id (this project's open-source encoding, `vmbus::hv::msr::GuestOsId::for_this_kernel`), written
//!    over whatever firmware left, then the hypercall page ([`hypercall`]), checked with a PostMessage to a
//!    connection id no host uses, which must fail with HV_STATUS_INVALID_CONNECTION_ID;
//! 3. the SynIC ([`synic`]): message and event flags pages, SINT 2 for VMBus and SINT 3 for timer messages;
//! 4. partition reference time and the frequency MSRs ([`clock`]), and the synthetic timers ([`stimer`]); these go
//!    to [`crate::time`] through [`time_sources`].
//!
//! [`teardown`] undoes it before reboot or shutdown. [`transport`] offers the result to the VMBus client.
//!
//! `unsafe` lives only in [`cpu`] (MSRs, CPUID, ordered TSC), [`shared_page`] (the view of a page the hypervisor
//! writes) and [`hypercall`] (the call into the hypercall page).

pub mod clock;
mod cpu;
pub mod hypercall;
pub mod shared_page;
pub mod stimer;
pub mod synic;
mod tests;
pub mod transport;

pub use tests::KTESTS;

use crate::time::{CounterSource, HypervisorTime};
use clock::{FrequencyMsrs, ReferenceClock};
use cpu::{NativeCpuid, SyntheticMsrs};
use hypercall::HypercallInterface;
use spin::Once;
use stimer::{Delivery, SyntheticTimers};
use synic::Synic;
use vmbus::hv::cpuid::Platform;
use vmbus::hv::msr::{self, GuestOsId, HypercallMsr, MsrAccess};
use vmbus::hv::time::REFERENCE_TIME_HZ;
use vmbus::hv::{HvError, HvReport, Hypercalls};

/// Parses a decimal version component at compile time (saturating at 255).
const fn version_component(text: &str) -> u8 {
    let bytes = text.as_bytes();
    let mut value: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        value = value * 10 + (bytes[i] - b'0') as u32;
        if value > 255 {
            return 255;
        }
        i += 1;
    }
    value as u8
}

/// The guest OS id this kernel writes: the open-source encoding with this project's OsType 0x7F and the crate version
/// (see `vmbus::hv::msr::GuestOsId` for the reasoning).
pub const GUEST_OS_ID: GuestOsId = GuestOsId::for_this_kernel(
    version_component(env!("CARGO_PKG_VERSION_MAJOR")),
    version_component(env!("CARGO_PKG_VERSION_MINOR")),
    version_component(env!("CARGO_PKG_VERSION_PATCH")),
);

/// The connection id of the boot-time hypercall check: 24 bits, far from any id a VMBus host hands out.
pub const PROBE_CONNECTION_ID: u32 = 0x00FE_DCBA;

/// Everything the Hyper-V layer brought up; each part is `None` where the hypervisor does not offer it or bring-up
/// failed (the failure is logged).
pub struct HyperV {
    /// What detection found.
    pub report: HvReport,
    msrs: SyntheticMsrs,
    /// GUEST_OS_ID as firmware left it, read before the kernel wrote its own.
    pub firmware_guest_os_id: Option<GuestOsId>,
    /// HYPERCALL as firmware left it.
    pub firmware_hypercall_msr: Option<HypercallMsr>,
    /// The hypercall page and its input/output pages.
    pub hypercalls: Option<HypercallInterface>,
    /// What the boot-time PostMessage to [`PROBE_CONNECTION_ID`] returned.
    pub probe: Option<Result<(), HvError>>,
    /// The SynIC.
    pub synic: Option<Synic>,
    /// Partition reference time.
    pub clock: Option<ReferenceClock>,
    /// The frequency MSRs.
    pub frequency_msrs: Option<FrequencyMsrs>,
    /// Synthetic timers 0 and 1.
    pub timers: Option<SyntheticTimers>,
    /// This processor's VP_INDEX (0 where the MSR is not offered).
    pub vp_index: u32,
}

static REPORT: Once<HvReport> = Once::new();
static HYPERV: Once<HyperV> = Once::new();

/// Detects the hypervisor (once) and returns the report.
pub fn detect() -> &'static HvReport {
    REPORT.call_once(|| HvReport::detect(&NativeCpuid))
}

/// The layer, once [`init`] brought it up on a Hyper-V interface.
pub fn get() -> Option<&'static HyperV> {
    HYPERV.get()
}

/// One line saying what the report means, for the boot log and the platform report.
pub fn summary(report: &HvReport) -> alloc::string::String {
    use alloc::format;
    match report.platform() {
        Platform::NoHypervisor => "none; no Hyper-V enlightenments".into(),
        Platform::OtherHypervisor => format!("{}; no Hyper-V enlightenments", report.vendor),
        Platform::HyperV => format!("{}; Hyper-V interface \"Hv#1\"", report.vendor),
        Platform::HyperVOnKvm => format!(
            "{}; Hyper-V interface \"Hv#1\" provided by KVM (signature {} at 0x40000100)",
            report.vendor,
            report.kvm_signature.unwrap_or_default()
        ),
    }
}

/// Brings the layer up where the CPU presents the Hyper-V interface. Call once, after paging, the frame allocator,
/// the IDT and the local APIC, before [`crate::time::init`] and with interrupts disabled. Logs every step.
pub fn init() -> Option<&'static HyperV> {
    let report = *detect();
    if report.hyperv.is_none() {
        log::info!("hyperv: not used: hypervisor {}; the kernel keeps its own clock and timer", summary(&report));
        return None;
    }
    let leaves = report.hyperv.unwrap_or_default();
    log::info!(
        "hyperv: interface Hv#1 chosen by feature bits (MSR privileges {:#x}, hypercall privileges {:#x}, features \
         {:#x}, recommendations {:#x}){}",
        leaves.msr_privileges.bits(),
        leaves.hypercall_privileges.bits(),
        leaves.features.bits(),
        leaves.recommendations.bits(),
        match report.kvm_signature {
            Some(signature) => alloc::format!("; KVM signature {signature} at 0x40000100"),
            None => alloc::string::String::new(),
        }
    );
    Some(HYPERV.call_once(|| bring_up(report)))
}

/// The bring-up steps after detection.
fn bring_up(report: HvReport) -> HyperV {
    let msrs = SyntheticMsrs::new();
    let mut hv = HyperV {
        report,
        msrs,
        firmware_guest_os_id: None,
        firmware_hypercall_msr: None,
        hypercalls: None,
        probe: None,
        synic: None,
        clock: None,
        frequency_msrs: None,
        timers: None,
        vp_index: 0,
    };
    if report.vp_index_usable() {
        hv.vp_index = hv.msrs.read_msr(msr::VP_INDEX) as u32;
    }
    if report.hypercalls_usable() {
        enable_hypercalls(&mut hv);
    } else {
        log::warn!("hyperv: no hypercall MSRs: no hypercalls, no VMBus");
    }
    if report.synic_usable() {
        match Synic::enable(&hv.msrs, !report.auto_eoi_deprecated()) {
            Ok(synic) => {
                let (message_page, event_page) = synic.pages_phys();
                log::info!(
                    "hyperv: SynIC enabled: message page {:#x}, event flags page {:#x}; SINT {} (VMBus) vector {:#x}, \
                     SINT {} (timers) vector {:#x}, {}",
                    message_page.as_u64(),
                    event_page.as_u64(),
                    synic::VMBUS_SINT,
                    synic::VMBUS_VECTOR,
                    synic::TIMER_SINT,
                    synic::TIMER_MESSAGE_VECTOR,
                    if synic.auto_eoi() { "auto-EOI" } else { "APIC EOI (auto-EOI deprecated by the hypervisor)" }
                );
                hv.synic = Some(synic);
            }
            Err(e) => log::warn!("hyperv: {e}"),
        }
    } else {
        log::warn!("hyperv: no SynIC MSRs: no VMBus, no timer messages");
    }
    enable_time(&mut hv);
    log::info!(
        "hyperv: VP index {}; VMBus {}",
        hv.vp_index,
        if hv.hypercalls.is_some() && hv.synic.is_some() && report.vmbus_usable() {
            "can run (hypercalls, SynIC, PostMessage, SignalEvent)"
        } else {
            "cannot run here"
        }
    );
    hv
}

/// Guest OS id, hypercall page, and the PostMessage check.
fn enable_hypercalls(hv: &mut HyperV) {
    hv.firmware_guest_os_id = Some(GuestOsId::from_bits(hv.msrs.read_msr(msr::GUEST_OS_ID)));
    hv.firmware_hypercall_msr = Some(HypercallMsr::from_bits(hv.msrs.read_msr(msr::HYPERCALL)));
    match HypercallInterface::enable(&hv.msrs, GUEST_OS_ID) {
        Ok(interface) => {
            log::info!(
                "hyperv: guest OS id {:#018x} written (firmware left {:#x})",
                hv.msrs.read_msr(msr::GUEST_OS_ID),
                hv.firmware_guest_os_id.unwrap_or_default().bits()
            );
            log::info!(
                "hyperv: hypercall page enabled at {:#x} (MSR {:#x}), mapped executable and read-only at {:#x}, its physical-window alias read-only",
                interface.page_phys().as_u64(),
                interface.msr(&hv.msrs).bits(),
                interface.stub_address().as_u64()
            );
            if hv.report.post_messages_usable() {
                let probe = interface.post_message(PROBE_CONNECTION_ID, 1, &[0; 8]);
                let status = probe.err().map_or(vmbus::hv::HvStatus::SUCCESS, |e| e.status());
                log::info!(
                    "hyperv: PostMessage to unknown connection id {PROBE_CONNECTION_ID:#x}: status {:#06x} {}",
                    status.0,
                    status.name().unwrap_or("(unknown status)")
                );
                hv.probe = Some(probe);
            }
            hv.hypercalls = Some(interface);
        }
        Err(e) => log::warn!("hyperv: hypercall page: {e}"),
    }
}

/// Reference time, frequency MSRs and synthetic timers.
fn enable_time(hv: &mut HyperV) {
    match ReferenceClock::enable(&hv.report) {
        Ok(Some(clock)) => {
            match (clock.tsc_page_phys(), clock.tsc_page_fields()) {
                (Some(phys), Some((sequence, scale, offset))) => log::info!(
                    "hyperv: reference TSC page at {:#x}: sequence {sequence}, scale {scale:#x}, offset {offset}: {}",
                    phys.as_u64(),
                    if clock.tsc_page_valid() { "valid" } else { "invalid (TIME_REF_COUNT is used instead)" }
                ),
                _ => log::info!("hyperv: no reference TSC page; TIME_REF_COUNT only"),
            }
            if let Some(time) = clock.read() {
                log::info!("hyperv: partition reference time {} x 100 ns from {:?}", time.ticks_100ns, time.source);
            }
            hv.clock = Some(clock);
        }
        Ok(None) => log::warn!("hyperv: neither the reference TSC page nor TIME_REF_COUNT is offered"),
        Err(e) => log::warn!("hyperv: reference TSC page: {e}"),
    }
    hv.frequency_msrs = FrequencyMsrs::new(&hv.report);
    match &hv.frequency_msrs {
        Some(msrs) => {
            let (tsc_hz, apic_hz) = msrs.read();
            log::info!("hyperv: frequency MSRs: TSC {tsc_hz} Hz, APIC timer {apic_hz} Hz");
        }
        None => log::info!("hyperv: frequency MSRs not offered"),
    }
    if hv.clock.is_none() {
        return;
    }
    let synic_enabled = hv.synic.as_ref().is_some_and(Synic::is_enabled);
    match SyntheticTimers::new(&hv.report, synic_enabled) {
        Ok(Some(timers)) => {
            log::info!(
                "hyperv: synthetic timers: timer 0 in {} mode (direct mode {}), timer 1 for wake-ups{}",
                if timers.default_delivery() == Delivery::Direct { "direct" } else { "message" },
                if timers.direct_available() { "offered" } else { "not offered" },
                if timers.message_available() { "" } else { " unavailable (no message mode)" }
            );
            hv.timers = Some(timers);
        }
        Ok(None) => log::info!("hyperv: synthetic timers not offered"),
        Err(e) => log::warn!("hyperv: synthetic timer vector: {e}"),
    }
}

/// Reads partition reference time (100 ns ticks), for [`crate::time`]'s counter calibration.
fn read_reference_ticks() -> Option<u64> {
    get()?.clock.as_ref()?.read().map(|time| time.ticks_100ns)
}

/// What the layer offers [`crate::time::init`]: the frequency MSRs, the reference counter to measure against, the
/// reference TSC page as the clock (when valid and backed by TIME_REF_COUNT), and synthetic timer 0 as the kernel
/// timer. Empty without Hyper-V.
pub fn time_sources() -> HypervisorTime {
    let Some(hv) = get() else { return HypervisorTime::default() };
    let clock = hv.clock.as_ref();
    HypervisorTime {
        frequencies: hv.frequency_msrs.as_ref().map(|source| source as _),
        reference_counter: clock.map(|_| CounterSource {
            name: "Hyper-V reference counter",
            hz: REFERENCE_TIME_HZ,
            read: read_reference_ticks,
        }),
        clock: clock.filter(|clock| clock.suits_kernel_clock()).map(|clock| clock as _),
        timer: hv.timers.as_ref().filter(|_| clock.is_some()).map(|timers| timers as _),
    }
}

/// Tears the layer down before reboot or shutdown (§4): stops the synthetic timers, masks the SINTs, disables the
/// SynIC pages, the reference TSC page and the hypercall page, and clears the guest OS id. Hypercalls fail afterwards
/// without reaching the hypervisor. Nothing to do without Hyper-V.
pub fn teardown() {
    let Some(hv) = get() else { return };
    x86_64::instructions::interrupts::without_interrupts(|| {
        if let Some(timers) = &hv.timers {
            timers.stop();
            if timers.message_available() {
                timers.stop_wakeup();
            }
        }
        if let Some(synic) = &hv.synic {
            synic.disable(&hv.msrs);
        }
        if let Some(clock) = &hv.clock {
            clock.disable();
        }
        if let Some(hypercalls) = &hv.hypercalls {
            hypercalls.disable(&hv.msrs);
        }
    });
    log::info!(
        "hyperv: torn down: synthetic timers stopped, SINTs masked, SynIC, reference TSC and hypercall pages \
         disabled, guest OS id cleared"
    );
}

/// Brings the layer back after [`teardown`], on the same pages (used by the tests of the teardown).
pub fn reenable() -> Result<(), alloc::string::String> {
    let hv = get().ok_or("no Hyper-V layer")?;
    if let Some(hypercalls) = &hv.hypercalls {
        hypercalls.reenable(&hv.msrs, GUEST_OS_ID).map_err(|e| alloc::format!("hypercall page: {e}"))?;
    }
    if let Some(clock) = &hv.clock {
        clock.reenable();
    }
    if let Some(synic) = &hv.synic {
        synic.reenable(&hv.msrs).map_err(|e| alloc::format!("{e}"))?;
    }
    Ok(())
}
