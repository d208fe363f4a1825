//! In-kernel tests of the Hyper-V layer against the real hypervisor (`mode=test filter=hyperv`).
//!
//! Under a hypervisor without the Hyper-V interface (QEMU TCG) every test that needs it reports a skip with the
//! reason; the detection and platform-choice tests run everywhere. The real-host tier boots them under KVM's Hyper-V
//! enlightenments and requires that none is skipped or fails.

use super::clock::ReferenceClock;
use super::cpu::NativeCpuid;
use super::hypercall::HypercallInterface;
use super::shared_page::SharedPage;
use super::stimer::{self, Delivery, SyntheticTimers};
use super::synic::{self, Synic, TIMER_MESSAGE_VECTOR, VMBUS_SINT, VMBUS_VECTOR};
use super::transport::{KernelTransport, WAIT_LIMIT};
use super::{GUEST_OS_ID, HyperV, PROBE_CONNECTION_ID};
use crate::arch::{acpi, apic};
use crate::ktest::{KTest, TestResult, skip};
use crate::time::{self, TimerMode};
use crate::{kassert, kassert_eq};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::Cell;
use core::sync::atomic::Ordering;
use core::time::Duration;
use vmbus::client::{ConnectOptions, Connection, VmbusTransport};
use vmbus::hv::cpuid::{CpuidSource, KVM_SIGNATURE, VendorId, leaf};
use vmbus::hv::hypercall::{
    HypercallCode, HypercallControl, PostMessageRetry, SignalEventInput, post_message_with_retry,
};
use vmbus::hv::msr::{self, MsrAccess};
use vmbus::hv::synic::{HvMessage, HvMessageType, SynicMessageSlot, consume_message, set_event_flag};
use vmbus::hv::time::ClockSource as ReferenceSource;
use vmbus::hv::{HvError, HvReport, HvStatus, Hypercalls};
use x86_64::instructions::interrupts;
use zerocopy::IntoBytes;

/// The Hyper-V layer's tests; `filter=hyperv` selects them.
pub const KTESTS: &[KTest] = &[
    KTest { name: "hyperv::detection_decides_by_feature_bits", run: detection_decides_by_feature_bits },
    KTest { name: "hyperv::clock_and_timer_follow_the_platform", run: clock_and_timer_follow_the_platform },
    KTest { name: "hyperv::guest_os_id_written", run: guest_os_id_written },
    KTest { name: "hyperv::hypercall_page_enabled_executable_read_only", run: hypercall_page_enabled },
    KTest { name: "hyperv::hypercall_status_decoded_memory_and_fast_form", run: hypercall_status_decoded },
    KTest { name: "hyperv::post_message_to_unknown_connection_fails", run: post_message_to_unknown_connection },
    KTest { name: "hyperv::signal_event_to_unknown_connection_fails", run: signal_event_to_unknown_connection },
    KTest { name: "hyperv::synic_pages_and_sints_enabled", run: synic_pages_and_sints_enabled },
    KTest { name: "hyperv::synic_message_slot_end_of_message", run: synic_message_slot_end_of_message },
    KTest { name: "hyperv::synic_event_flags_reach_channel_events", run: synic_event_flags_reach_channel_events },
    KTest { name: "hyperv::reference_clock_in_step_with_tsc_and_pm_timer", run: reference_clock_in_step },
    KTest { name: "hyperv::frequency_msrs_calibrate_tsc_and_apic_timer", run: frequency_msrs_calibrate },
    KTest { name: "hyperv::reference_counter_calibration_agrees", run: reference_counter_calibration_agrees },
    KTest { name: "hyperv::stimer0_one_shot_message_mode", run: stimer0_one_shot_message_mode },
    KTest { name: "hyperv::stimer0_periodic_message_mode", run: stimer0_periodic_message_mode },
    KTest { name: "hyperv::stimer0_one_shot_direct_mode", run: stimer0_one_shot_direct_mode },
    KTest { name: "hyperv::stimer0_periodic_direct_mode", run: stimer0_periodic_direct_mode },
    KTest { name: "hyperv::transport_wait_is_bounded", run: transport_wait_is_bounded },
    KTest { name: "hyperv::vmbus_client_connects_through_kernel_transport", run: vmbus_client_connects },
    KTest { name: "hyperv::teardown_and_reenable", run: teardown_and_reenable },
];

/// The layer, or a skip saying why there is none.
fn layer() -> Result<&'static HyperV, crate::ktest::TestError> {
    match super::get() {
        Some(hv) => Ok(hv),
        None => Err(crate::ktest::TestError::Skipped(format!(
            "no Hyper-V interface (hypervisor {})",
            super::summary(super::detect())
        ))),
    }
}

/// The hypercall interface, or a skip.
fn hypercalls(hv: &HyperV) -> Result<&HypercallInterface, crate::ktest::TestError> {
    hv.hypercalls.as_ref().ok_or_else(|| crate::ktest::TestError::Skipped("no hypercall page".into()))
}

/// The SynIC, or a skip.
fn synic(hv: &HyperV) -> Result<&Synic, crate::ktest::TestError> {
    hv.synic.as_ref().ok_or_else(|| crate::ktest::TestError::Skipped("no SynIC".into()))
}

/// Spins until `done()` or `limit` passes on the kernel clock; returns whether `done()` became true.
fn wait_until(limit: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = time::now().saturating_add(limit.as_nanos() as u64);
    while time::now() < deadline {
        if done() {
            return true;
        }
        core::hint::spin_loop();
    }
    done()
}

/// Whether `a` is within `percent` % of `b`.
fn close(a: u64, b: u64, percent: u64) -> bool {
    a.abs_diff(b) * 100 <= b * percent
}

fn detection_decides_by_feature_bits() -> TestResult {
    let report = HvReport::detect(&NativeCpuid);
    kassert_eq!(&report, super::detect());
    let [_, _, ecx, _] = NativeCpuid.cpuid(leaf::VERSION_AND_FEATURES, 0);
    kassert_eq!(report.hypervisor_present, ecx & (1 << 31) != 0);
    let summary = super::summary(&report);
    match report.hyperv {
        Some(_) => {
            let [eax, ebx, _, _] = NativeCpuid.cpuid(leaf::FEATURES, 0);
            kassert_eq!(report.hypercalls_usable(), eax & (1 << 5) != 0);
            kassert_eq!(report.synic_usable(), eax & (1 << 2) != 0);
            kassert_eq!(report.post_messages_usable(), eax & (1 << 5) != 0 && ebx & (1 << 4) != 0);
            kassert_eq!(report.signal_events_usable(), eax & (1 << 5) != 0 && ebx & (1 << 5) != 0);
            kassert_eq!(report.reference_tsc_usable(), eax & (1 << 9) != 0);
            let [_, b, c, d] = NativeCpuid.cpuid(leaf::KVM_WITH_HYPERV, 0);
            let kvm = VendorId::from_registers(b, c, d) == KVM_SIGNATURE;
            kassert_eq!(report.kvm_signature.is_some(), kvm);
            kassert!(summary.contains("Hyper-V interface \"Hv#1\""), "summary: {summary}");
            kassert!(!kvm || summary.contains("provided by KVM"), "summary: {summary}");
            kassert!(super::get().is_some(), "Hyper-V interface present but the layer is not up");
            log::info!("hyperv: detected {summary}");
        }
        None => {
            kassert!(!report.vmbus_usable() && !report.hypercalls_usable() && !report.synic_usable());
            kassert!(summary.contains("no Hyper-V enlightenments"), "summary: {summary}");
            kassert!(super::get().is_none(), "no Hyper-V interface but the layer is up");
            kassert!(format!("{report}").contains("no Hyper-V enlightenments"));
        }
    }
    Ok(())
}

/// Without Hyper-V the kernel keeps its own clock (TSC) and timer (local APIC); with it, it uses the reference TSC
/// page where valid and synthetic timer 0 where offered.
fn clock_and_timer_follow_the_platform() -> TestResult {
    let clock = time::clock_name().ok_or("no kernel clock")?;
    let timer = time::timer_name().ok_or("no kernel timer")?;
    match super::get() {
        None => {
            kassert_eq!(clock, "TSC");
            kassert_eq!(timer, "local APIC timer");
            let source = time::source_name().ok_or("not calibrated")?;
            kassert!(source == "ACPI PM timer" || source == "PIT channel 2", "calibrated with {source}");
        }
        Some(hv) => {
            let page_clock = hv.clock.as_ref().is_some_and(ReferenceClock::suits_kernel_clock);
            kassert_eq!(clock == "Hyper-V reference TSC page", page_clock);
            kassert_eq!(timer.starts_with("Hyper-V synthetic timer 0"), hv.timers.is_some());
            if hv.frequency_msrs.is_some() {
                kassert_eq!(time::source_name(), Some("Hyper-V frequency MSRs"));
            }
        }
    }
    log::info!("hyperv: kernel clock {clock}, kernel timer {timer}");
    Ok(())
}

fn guest_os_id_written() -> TestResult {
    let hv = layer()?;
    hypercalls(hv)?;
    let written = hv.msrs.read_msr(msr::GUEST_OS_ID);
    kassert_eq!(written, GUEST_OS_ID.bits());
    kassert!(GUEST_OS_ID.is_open_source());
    kassert_eq!(GUEST_OS_ID.os_type(), 0x7F);
    let version = env!("CARGO_PKG_VERSION_MAJOR").parse::<u32>().unwrap_or(0) << 16
        | env!("CARGO_PKG_VERSION_MINOR").parse::<u32>().unwrap_or(0) << 8
        | env!("CARGO_PKG_VERSION_PATCH").parse::<u32>().unwrap_or(0);
    kassert_eq!(GUEST_OS_ID.version(), version);
    log::info!(
        "hyperv: guest OS id {written:#018x} (firmware left {:#x})",
        hv.firmware_guest_os_id.unwrap_or_default().bits()
    );
    Ok(())
}

fn hypercall_page_enabled() -> TestResult {
    let hv = layer()?;
    let interface = hypercalls(hv)?;
    let msr = interface.msr(&hv.msrs);
    kassert!(msr.enabled(), "HYPERCALL MSR {:#x} not enabled", msr.bits());
    kassert_eq!(msr.page_address(), interface.page_phys().as_u64());
    let (phys, flags) =
        crate::mm::paging::translate(interface.stub_address()).ok_or("the hypercall page is not mapped")?;
    kassert_eq!(phys, interface.page_phys());
    use x86_64::structures::paging::PageTableFlags;
    kassert!(!flags.contains(PageTableFlags::WRITABLE), "mapped writable: {flags:?}");
    kassert!(!flags.contains(PageTableFlags::NO_EXECUTE), "mapped not executable: {flags:?}");
    // No other way in: the physical-memory window's alias is read-only and not executable, and its neighbours
    // (split out of the same huge page) kept their translation and write access.
    let alias = crate::mm::phys_to_virt(interface.page_phys());
    let (alias_phys, alias_flags) = crate::mm::paging::translate(alias).ok_or("the alias is not mapped")?;
    kassert_eq!(alias_phys, interface.page_phys());
    kassert!(!alias_flags.contains(PageTableFlags::WRITABLE), "alias writable: {alias_flags:?}");
    kassert!(alias_flags.contains(PageTableFlags::NO_EXECUTE), "alias executable: {alias_flags:?}");
    for neighbour in [interface.page_phys() - 4096u64, interface.page_phys() + 4096u64] {
        let (phys, flags) =
            crate::mm::paging::translate(crate::mm::phys_to_virt(neighbour)).ok_or("a neighbour lost its mapping")?;
        kassert_eq!(phys, neighbour);
        kassert!(flags.contains(PageTableFlags::WRITABLE), "neighbour {neighbour:?} lost write access: {flags:?}");
    }
    let (input, output) = interface.io_pages_phys();
    kassert!(input.is_aligned(4096u64) && output.is_aligned(4096u64) && input != output);
    kassert!(interface.is_enabled());
    Ok(())
}

fn hypercall_status_decoded() -> TestResult {
    let hv = layer()?;
    let interface = hypercalls(hv)?;
    // Call code 0 is reserved: both forms must come back with HV_STATUS_INVALID_HYPERCALL_CODE (2).
    let control = HypercallControl::new(HypercallCode(0));
    let memory = interface.call(control, &[0u8; 16], &mut [0u8; 16]).map_err(|e| format!("memory form: {e}"))?;
    kassert_eq!(memory.status(), HvStatus::INVALID_HYPERCALL_CODE);
    kassert_eq!(memory.status().name(), Some("INVALID_HYPERCALL_CODE"));
    kassert_eq!(memory.reps_completed(), 0);
    kassert_eq!(memory.into_result(), Err(HvError::INVALID_HYPERCALL_CODE));
    let fast = interface
        .call_fast(vmbus::hv::hypercall::FastHypercall { control, rdx: 0, r8: 0 })
        .map_err(|e| format!("fast form: {e}"))?;
    kassert_eq!(fast.status(), HvStatus::INVALID_HYPERCALL_CODE);
    log::info!("hyperv: hypercall code 0: memory form {}, fast form {}", memory.status(), fast.status());
    Ok(())
}

/// A [`Hypercalls`] that counts the posts it forwards.
struct CountingHypercalls<'a> {
    inner: &'a HypercallInterface,
    posts: Cell<u32>,
}

impl Hypercalls for CountingHypercalls<'_> {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> Result<(), HvError> {
        self.posts.set(self.posts.get() + 1);
        self.inner.post_message(connection_id, message_type, payload)
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        self.inner.signal_event(connection_id, flag)
    }
}

fn post_message_to_unknown_connection() -> TestResult {
    let hv = layer()?;
    let interface = hypercalls(hv)?;
    if !hv.report.post_messages_usable() {
        return skip("the partition may not post messages");
    }
    let result = interface.post_message(PROBE_CONNECTION_ID, 1, b"hv-unikernel: nobody listens here");
    kassert_eq!(result, Err(HvError::INVALID_CONNECTION_ID));
    // The INITIATE_CONTACT policy gives up on INVALID_CONNECTION_ID after one attempt.
    let counting = CountingHypercalls { inner: interface, posts: Cell::new(0) };
    let no_delay = |_us: u64| {};
    let retried = post_message_with_retry(
        &counting,
        &no_delay,
        PROBE_CONNECTION_ID,
        1,
        &[1, 2, 3],
        PostMessageRetry::for_initiate_contact(),
    );
    kassert_eq!(retried, Err(HvError::INVALID_CONNECTION_ID));
    kassert_eq!(counting.posts.get(), 1);
    // A payload over 240 bytes never reaches the hypervisor.
    kassert_eq!(interface.post_message(PROBE_CONNECTION_ID, 1, &[0; 241]), Err(HvError::INVALID_PARAMETER));
    kassert_eq!(hv.probe, Some(Err(HvError::INVALID_CONNECTION_ID)));
    log::info!("hyperv: PostMessage to {PROBE_CONNECTION_ID:#x}: {}", HvStatus::INVALID_CONNECTION_ID);
    Ok(())
}

fn signal_event_to_unknown_connection() -> TestResult {
    let hv = layer()?;
    let interface = hypercalls(hv)?;
    if !hv.report.signal_events_usable() {
        return skip("the partition may not signal events");
    }
    let input = SignalEventInput::new(PROBE_CONNECTION_ID, 0);
    kassert_eq!(input.fast_registers().control.bits(), 0x1005D);
    let result = interface.signal_event(PROBE_CONNECTION_ID, 0);
    kassert_eq!(result, Err(HvError::INVALID_CONNECTION_ID));
    log::info!("hyperv: SignalEvent (fast form) to {PROBE_CONNECTION_ID:#x}: {}", HvStatus::INVALID_CONNECTION_ID);
    Ok(())
}

fn synic_pages_and_sints_enabled() -> TestResult {
    let hv = layer()?;
    let synic = synic(hv)?;
    let registers = synic.registers(&hv.msrs);
    let (message_page, event_page) = synic.pages_phys();
    kassert_eq!(registers.version, 1);
    kassert!(registers.control.enabled(), "SCONTROL {:#x}", registers.control.bits());
    kassert!(registers.simp.enabled() && registers.simp.page_address() == message_page.as_u64());
    kassert!(registers.siefp.enabled() && registers.siefp.page_address() == event_page.as_u64());
    let auto_eoi = !hv.report.auto_eoi_deprecated();
    for (sint, vector) in [(registers.vmbus_sint, VMBUS_VECTOR), (registers.timer_sint, TIMER_MESSAGE_VECTOR)] {
        kassert!(!sint.masked(), "SINT {:#x} masked", sint.bits());
        kassert_eq!(sint.vector(), vector);
        kassert_eq!(sint.auto_eoi(), auto_eoi);
    }
    kassert_eq!(synic.auto_eoi(), auto_eoi);
    log::info!(
        "hyperv: SIMP {:#x}, SIEFP {:#x}, SINT2 {:#x}, SINT3 {:#x}",
        registers.simp.bits(),
        registers.siefp.bits(),
        registers.vmbus_sint.bits(),
        registers.timer_sint.bits()
    );
    Ok(())
}

/// A message planted in an unused slot (SINT 5, masked) is taken with the EOM protocol through the real page.
fn synic_message_slot_end_of_message() -> TestResult {
    const SINT: u8 = 5;
    let hv = layer()?;
    let synic = synic(hv)?;
    let message = HvMessage::new(HvMessageType(0x4242), 7, b"planted").map_err(|e| format!("{e}"))?;
    let words = synic.message_page_words();
    let first = usize::from(SINT) * 32;
    for (word, chunk) in words[first..first + 32].iter().zip(message.as_bytes().as_chunks::<8>().0) {
        word.store(u64::from_le_bytes(*chunk), Ordering::Release);
    }
    // Set MessagePending (flags byte, bits 47:40 of word 0) so that the protocol writes EOM.
    words[first].fetch_or(1 << 40, Ordering::AcqRel);
    let slot = synic.slot(&hv.msrs, SINT).ok_or("no slot 5")?;
    kassert_eq!(slot.message_type(), HvMessageType(0x4242));
    kassert!(slot.message_pending());
    let taken = consume_message(&slot).ok_or("the planted message was not taken")?;
    kassert_eq!(taken.message_type(), HvMessageType(0x4242));
    kassert_eq!(taken.header.sender, 7);
    kassert_eq!(taken.payload().ok(), Some(&b"planted"[..]));
    kassert_eq!(slot.message_type(), HvMessageType::NONE);
    kassert!(consume_message(&slot).is_none(), "an empty slot gave a message");
    words[first].store(0, Ordering::Release);
    Ok(())
}

/// A flag set in SINT 2's event flags page is moved to the channel events by the VMBus vector's handler.
fn synic_event_flags_reach_channel_events() -> TestResult {
    const RELID: u32 = 77;
    let hv = layer()?;
    let synic = synic(hv)?;
    let flags = synic.event_flags(VMBUS_SINT).ok_or("no SINT 2 flags")?;
    let drained: Vec<u32> = synic::take_channel_events().collect();
    let (before, _, _) = synic::interrupt_counts();
    kassert_eq!(set_event_flag(flags, RELID), Some(true));
    apic::send_self_ipi(VMBUS_VECTOR).map_err(|e| format!("self-IPI: {e}"))?;
    let arrived = wait_until(Duration::from_millis(100), || synic::interrupt_counts().0 > before);
    let (after, _, _) = synic::interrupt_counts();
    let events: Vec<u32> = synic::take_channel_events().collect();
    kassert!(arrived, "the VMBus vector's self-IPI did not arrive within 100 ms");
    kassert_eq!(after, before + 1);
    kassert_eq!(events, alloc::vec![RELID]);
    kassert!(!apic::in_service(VMBUS_VECTOR), "the VMBus vector was not acknowledged");
    kassert_eq!(flags[1].load(Ordering::Acquire) & (1 << (RELID % 64)), 0);
    if !drained.is_empty() {
        log::info!("hyperv: channel events already pending before the test: {drained:?}");
    }
    Ok(())
}

/// Busy-waits `ms` milliseconds on the TSC alone at `tsc_hz`.
fn spin_tsc(tsc_hz: u64, ms: u64) {
    let start = time::rdtsc();
    let cycles = tsc_hz / 1000 * ms;
    while time::rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

fn reference_clock_in_step() -> TestResult {
    let hv = layer()?;
    let clock = hv.clock.as_ref().ok_or(crate::ktest::TestError::Skipped("no partition reference time".into()))?;
    let mut checks = Vec::new();
    // Against the TSC, at the frequency calibration found (the frequency MSRs under Hyper-V).
    if let Some(frequencies) = time::frequencies() {
        let before = clock.read().ok_or("reference time unreadable")?;
        spin_tsc(frequencies.tsc_hz, 100);
        let after = clock.read().ok_or("reference time unreadable")?;
        let elapsed_us = after.ticks_100ns.saturating_sub(before.ticks_100ns) / 10;
        kassert!(close(elapsed_us, 100_000, 5), "100 ms of TSC read as {elapsed_us} us of reference time");
        checks.push(format!("100 ms of TSC = {elapsed_us} us ({:?})", after.source));
    }
    // Against the ACPI PM timer, which the host's device model counts from the host clock.
    if let Ok(pm) = acpi::PmTimer::find(acpi::rsdp()) {
        let wanted = acpi::PM_TIMER_HZ / 10;
        let pm_start = pm.read();
        let before = clock.read().ok_or("reference time unreadable")?;
        while u64::from(pm.elapsed(pm_start, pm.read())) < wanted {
            core::hint::spin_loop();
        }
        let after = clock.read().ok_or("reference time unreadable")?;
        let elapsed_us = after.ticks_100ns.saturating_sub(before.ticks_100ns) / 10;
        kassert!(close(elapsed_us, 100_000, 10), "100 ms of the ACPI PM timer read as {elapsed_us} us");
        checks.push(format!("100 ms of PM timer = {elapsed_us} us"));
    }
    kassert!(!checks.is_empty(), "nothing to compare the reference clock with");
    // The page and the MSR agree (they are the same partition reference time).
    if let (Some(page), Some(counter)) = (clock.read_tsc_page(), clock.read_time_ref_count()) {
        let later = clock.read_tsc_page().unwrap_or(page);
        kassert!(counter >= page && counter <= later + 10_000, "TSC page {page}..{later}, TIME_REF_COUNT {counter}");
        checks.push(String::from("TSC page and TIME_REF_COUNT agree"));
    }
    let source = clock.read().map(|time| time.source);
    kassert_eq!(source == Some(ReferenceSource::ReferenceTscPage), clock.tsc_page_valid());
    log::info!("hyperv: reference clock from {source:?}: {}", checks.join("; "));
    Ok(())
}

fn frequency_msrs_calibrate() -> TestResult {
    let hv = layer()?;
    let Some(msrs) = &hv.frequency_msrs else { return skip("the frequency MSRs are not offered") };
    let (tsc_hz, apic_hz) = msrs.read();
    kassert_eq!(time::source_name(), Some("Hyper-V frequency MSRs"));
    let kept = time::frequencies().ok_or("not calibrated")?;
    kassert_eq!((kept.tsc_hz, kept.apic_bus_hz), (tsc_hz, apic_hz));
    kassert_eq!(apic::timer_tick_hz(), apic_hz / apic::TIMER_DIVISOR);
    // The APIC timer counts at the reported rate against reference time (a free-running masked countdown).
    let clock = hv.clock.as_ref().ok_or(crate::ktest::TestError::Skipped("no reference time".into()))?;
    let (start_ref, start_count, end_ref, end_count) = interrupts::without_interrupts(|| {
        apic::start_free_running_count().map_err(|e| format!("APIC: {e}"))?;
        let start_ref = clock.read().map_or(0, |t| t.ticks_100ns);
        let start_count = apic::timer_current_count();
        while clock.read().map_or(0, |t| t.ticks_100ns) < start_ref + 200_000 {
            core::hint::spin_loop();
        }
        let end_ref = clock.read().map_or(0, |t| t.ticks_100ns);
        let end_count = apic::timer_current_count();
        apic::stop_timer();
        Ok::<_, String>((start_ref, start_count, end_ref, end_count))
    })?;
    let counted = u64::from(start_count.saturating_sub(end_count));
    let expected = apic::timer_tick_hz() * (end_ref - start_ref) / 10_000_000;
    kassert!(
        close(counted, expected, 10),
        "APIC timer counted {counted} in {} x 100 ns, expected {expected}",
        end_ref - start_ref
    );
    log::info!("hyperv: frequency MSRs TSC {tsc_hz} Hz, APIC {apic_hz} Hz; APIC timer counted {counted} of {expected}");
    Ok(())
}

/// Measuring the TSC and the APIC timer against the 10 MHz reference counter (the calibration used where the frequency
/// MSRs are not offered) agrees with what calibration kept.
fn reference_counter_calibration_agrees() -> TestResult {
    layer()?;
    let Some(counter) = super::time_sources().reference_counter else {
        return skip("no partition reference time");
    };
    let measured = interrupts::without_interrupts(|| crate::time::FrequencySource::frequencies(&counter))
        .map_err(|e| format!("{}: {e}", counter.name))?;
    let kept = time::frequencies().ok_or("not calibrated")?;
    kassert!(
        close(measured.tsc_hz, kept.tsc_hz, 5) && close(measured.apic_bus_hz, kept.apic_bus_hz, 5),
        "{} measured {measured:?}, calibration kept {kept:?} from {:?}",
        counter.name,
        time::source_name()
    );
    log::info!(
        "hyperv: {} measures TSC {} kHz, APIC bus {} kHz (kept {} kHz, {} kHz)",
        counter.name,
        measured.tsc_hz / 1000,
        measured.apic_bus_hz / 1000,
        kept.tsc_hz / 1000,
        kept.apic_bus_hz / 1000
    );
    Ok(())
}

/// The timers and the clock, or a skip; `delivery` must be available.
fn timers_for(
    delivery: Delivery,
) -> Result<(&'static SyntheticTimers, &'static ReferenceClock), crate::ktest::TestError> {
    let hv = layer()?;
    let skipped = |why: &str| crate::ktest::TestError::Skipped(why.into());
    let timers = hv.timers.as_ref().ok_or_else(|| skipped("no synthetic timers"))?;
    let clock = hv.clock.as_ref().ok_or_else(|| skipped("no reference time"))?;
    match delivery {
        Delivery::Direct if !timers.direct_available() => {
            Err(skipped("direct mode not offered (CPUID 0x40000003 EDX bit 19)"))
        }
        Delivery::Message if !timers.message_available() => Err(skipped("message mode needs the SynIC")),
        _ => Ok((timers, clock)),
    }
}

/// Expiries of `delivery` so far.
fn expiries(delivery: Delivery) -> u64 {
    let (message, direct) = stimer::expiry_counts();
    if delivery == Delivery::Message { message } else { direct }
}

fn stimer0_one_shot(delivery: Delivery) -> TestResult {
    let (timers, clock) = timers_for(delivery)?;
    let other = if delivery == Delivery::Message { Delivery::Direct } else { Delivery::Message };
    let (before, before_other) = (expiries(delivery), expiries(other));
    let start_ref = clock.read().ok_or("no reference time")?.ticks_100ns;
    let start = time::now();
    let started = timers.start_with(clock, delivery, TimerMode::OneShot, Duration::from_millis(20));
    let fired = wait_until(Duration::from_secs(1), || expiries(delivery) > before);
    let fired_after_ms = (time::now() - start) / 1_000_000;
    time::sleep(Duration::from_millis(60));
    let config = timers.config();
    timers.stop();
    kassert_eq!(started, Ok(()));
    kassert!(fired, "a 20 ms one-shot did not fire within 1 s");
    kassert_eq!(expiries(delivery), before + 1);
    kassert_eq!(expiries(other), before_other);
    kassert!(!config.enabled(), "a one-shot timer stayed enabled after expiry: {:#x}", config.bits());
    kassert!((10..=270).contains(&fired_after_ms), "a 20 ms one-shot fired after {fired_after_ms} ms");
    if delivery == Delivery::Message {
        let (expiration, delivered) = stimer::last_message_times();
        kassert!(
            expiration >= start_ref + 200_000 && expiration <= start_ref + 210_000,
            "expiration time {expiration}, started at {start_ref} + 200000"
        );
        kassert!(delivered >= expiration, "delivered at {delivered} before expiring at {expiration}");
        log::info!(
            "hyperv: stimer0 one-shot (message): fired after {fired_after_ms} ms, delivery {} us after expiry",
            (delivered - expiration) / 10
        );
    } else {
        log::info!("hyperv: stimer0 one-shot (direct): fired after {fired_after_ms} ms");
    }
    Ok(())
}

fn stimer0_periodic(delivery: Delivery) -> TestResult {
    let (timers, clock) = timers_for(delivery)?;
    let before = expiries(delivery);
    let started = timers.start_with(clock, delivery, TimerMode::Periodic, Duration::from_millis(10));
    let start = time::now();
    time::sleep(Duration::from_millis(300));
    let ticks = expiries(delivery) - before;
    let elapsed_ms = (time::now() - start) / 1_000_000;
    let config = timers.config();
    timers.stop();
    time::sleep(Duration::from_millis(30));
    let after_stop = expiries(delivery) - before;
    kassert_eq!(started, Ok(()));
    kassert!(config.enabled() && config.periodic(), "periodic config {:#x}", config.bits());
    let expected = elapsed_ms / 10;
    kassert!(
        ticks * 2 >= expected && ticks <= expected * 3 / 2 + 1,
        "{ticks} ticks of a 10 ms periodic timer in {elapsed_ms} ms (expected about {expected})"
    );
    kassert!(after_stop <= ticks + 1, "the timer kept firing after stop: {ticks} then {after_stop}");
    log::info!("hyperv: stimer0 periodic ({delivery:?}): {ticks} ticks of 10 ms in {elapsed_ms} ms");
    Ok(())
}

fn stimer0_one_shot_message_mode() -> TestResult {
    stimer0_one_shot(Delivery::Message)
}

fn stimer0_periodic_message_mode() -> TestResult {
    stimer0_periodic(Delivery::Message)
}

fn stimer0_one_shot_direct_mode() -> TestResult {
    stimer0_one_shot(Delivery::Direct)
}

fn stimer0_periodic_direct_mode() -> TestResult {
    stimer0_periodic(Delivery::Direct)
}

/// With no message coming, `wait` halts until the wake-up timer (about [`WAIT_LIMIT`]) and returns.
fn transport_wait_is_bounded() -> TestResult {
    layer()?;
    let transport = KernelTransport::new().ok_or(crate::ktest::TestError::Skipped("no hypercalls or SynIC".into()))?;
    kassert!(interrupts::are_enabled(), "tests run with interrupts enabled");
    let wakeups = stimer::wakeup_count();
    let start = transport.now_ns();
    for _ in 0..10 {
        transport.wait();
    }
    let elapsed_ms = (transport.now_ns() - start) / 1_000_000;
    kassert!(elapsed_ms < 500, "10 waits of at most {WAIT_LIMIT:?} took {elapsed_ms} ms");
    kassert!(interrupts::are_enabled());
    let woken = stimer::wakeup_count() - wakeups;
    if super::get().and_then(|hv| hv.timers.as_ref()).is_some_and(SyntheticTimers::message_available) {
        kassert!(woken >= 1, "no wake-up timer expiry in 10 waits");
    }
    log::info!("hyperv: 10 transport waits took {elapsed_ms} ms, {woken} wake-up timer expiries");
    Ok(())
}

/// The VMBus client negotiates with the real host through the kernel transport, lists its offers and unloads.
fn vmbus_client_connects() -> TestResult {
    let hv = layer()?;
    if !hv.report.vmbus_usable() {
        return skip("the partition lacks what VMBus needs");
    }
    let transport = KernelTransport::new().ok_or(crate::ktest::TestError::Skipped("no hypercalls or SynIC".into()))?;
    let interrupt_page = SharedPage::allocate().map_err(|e| format!("{e}"))?;
    let monitor_pages =
        (SharedPage::allocate().map_err(|e| format!("{e}"))?, SharedPage::allocate().map_err(|e| format!("{e}"))?);
    let mut options = ConnectOptions::new(
        interrupt_page.phys().as_u64(),
        (monitor_pages.0.phys().as_u64(), monitor_pages.1.phys().as_u64()),
    );
    options.target_vp = transport.vp_index();
    options.timeout_ns = 20_000_000_000;
    let start = time::now();
    let mut connection = Connection::connect(transport, options).map_err(|e| format!("connect: {e}"))?;
    let version = connection.version();
    let offers = connection.request_offers().map_err(|e| format!("request offers: {e}"))?;
    connection.unload().map_err(|e| format!("unload: {e}"))?;
    let elapsed_ms = (time::now() - start) / 1_000_000;
    kassert!(version.0 != 0, "no version negotiated");
    kassert!(connection.is_unloaded());
    let classes: Vec<String> = offers.iter().map(|offer| format!("{}", offer.interface_type)).collect();
    log::info!(
        "hyperv: VMBus {version} negotiated with the host (message connection id {}), {} offers {classes:?}, \
         unloaded; {elapsed_ms} ms; {} messages dropped",
        connection.message_connection_id(),
        offers.len(),
        super::transport::dropped_messages()
    );
    Ok(())
}

/// Teardown masks and disables everything (hypercalls refused without reaching the hypervisor); re-enabling brings
/// it all back on the same pages.
fn teardown_and_reenable() -> TestResult {
    let hv = layer()?;
    let interface = hypercalls(hv)?;
    let clock_before = time::now();
    super::teardown();
    let hypercall_msr = interface.msr(&hv.msrs);
    let guest_os_id = hv.msrs.read_msr(msr::GUEST_OS_ID);
    let refused = interface.post_message(PROBE_CONNECTION_ID, 1, &[]);
    let synic_registers = hv.synic.as_ref().map(|synic| synic.registers(&hv.msrs));
    let tsc_msr = hv.clock.as_ref().and_then(ReferenceClock::tsc_msr);
    let clock_during = time::now();
    let reenabled = super::reenable();
    kassert_eq!(reenabled, Ok(()));
    kassert!(!hypercall_msr.enabled(), "HYPERCALL {:#x} still enabled", hypercall_msr.bits());
    kassert_eq!(guest_os_id, 0);
    kassert_eq!(refused, Err(HvError::INVALID_PARTITION_STATE));
    if let Some(registers) = synic_registers {
        kassert!(!registers.control.enabled() && !registers.simp.enabled() && !registers.siefp.enabled());
        kassert!(registers.vmbus_sint.masked() && registers.timer_sint.masked());
    }
    if let Some(tsc_msr) = tsc_msr {
        kassert!(!tsc_msr.enabled(), "REFERENCE_TSC {:#x} still enabled", tsc_msr.bits());
    }
    kassert!(clock_during >= clock_before, "the clock went back during teardown");
    kassert_eq!(hv.msrs.read_msr(msr::GUEST_OS_ID), GUEST_OS_ID.bits());
    kassert!(interface.msr(&hv.msrs).enabled());
    if hv.report.post_messages_usable() {
        kassert_eq!(interface.post_message(PROBE_CONNECTION_ID, 1, &[]), Err(HvError::INVALID_CONNECTION_ID));
    }
    if let Some(synic) = &hv.synic {
        let registers = synic.registers(&hv.msrs);
        kassert!(registers.control.enabled() && registers.simp.enabled() && !registers.vmbus_sint.masked());
    }
    if let Some(tsc_msr) = hv.clock.as_ref().and_then(ReferenceClock::tsc_msr) {
        kassert!(tsc_msr.enabled());
    }
    kassert!(time::now() >= clock_during, "the clock went back after re-enabling");
    Ok(())
}
