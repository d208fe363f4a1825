//! Boot tests: the real kernel image booted under QEMU + OVMF (q35), asserted from its serial log and exit status.

use boot::qemu::Exit;
use tests::{KtestSummary, boot_kernel, ktest_summary, ktest_verdicts};

/// The main job under QEMU TCG (issue 8 §6–7): no Hyper-V, so the kernel runs its own VMBus host in loopback with
/// the integration services' device models; the table lists the four offers bound to their drivers, heartbeats are
/// answered, a timesync sample from the RTC sets the wall clock, KVP answers the host's pool query, and the host's
/// shutdown request ends in an ACPI power-off (QEMU reports a guest shutdown, not a debug-exit status). The example
/// echo device runs with KMCL at both ends (the host's KMCL server, the guest's client): 1000 round trips and more.
#[test]
fn main_job_serves_the_loopback_services_until_the_host_shuts_it_down() {
    let tcg = boot::accel::Accel::Tcg { reason: "the boot test asks for TCG".into() };
    let (run, shutdowns) = tests::boot_kernel_watching_shutdown("main-job", None, tcg);
    let log = &run.serial;
    assert_eq!(shutdowns, ["guest-shutdown"], "the main job must end in an ACPI power-off:\n{log}");
    assert_eq!(run.exit, Exit::Qemu(0));
    assert!(log.contains("hv-unikernel"), "banner missing");
    let report = log.find("platform report:").expect("platform report missing");
    for field in ["cpu:", "memory:", "hypervisor:"] {
        assert!(log[report..].contains(field), "platform report lacks {field}");
    }
    assert!(log.contains("VMBus: no Hyper-V host here; running the kernel's own VMBus host in loopback"), "{log}");
    assert!(log.contains("VMBus 5.3 with the kernel's own loopback host"), "{log}");
    for class in ["heartbeat", "shutdown", "timesync", "kvp"] {
        let row = log
            .lines()
            .find(|line| line.split_whitespace().nth(1) == Some(class))
            .unwrap_or_else(|| panic!("no {class} row in the offer table:\n{log}"));
        assert!(row.trim_end().ends_with("bound"), "{class} has no driver: {row}");
    }
    let last = |prefix: &str| log.lines().rfind(|line| line.starts_with(prefix)).map(str::to_owned);
    let heartbeat = last("driver heartbeat:").expect("no heartbeat status");
    assert!(heartbeat.contains("heartbeats answered") && !heartbeat.contains(" 0 heartbeats answered"), "{heartbeat}");
    let timesync = last("driver timesync:").expect("no timesync status");
    assert!(timesync.contains("1 applied"), "{timesync}");
    assert!(log.contains("job: wall clock set by timesync to 20"), "{log}");
    let kvp = last("driver kvp:").expect("no kvp status");
    assert!(kvp.contains("pool queries ended") && !kvp.contains(" 0 pool queries"), "{kvp}");
    assert!(log.contains("job: shutdown asks to power off"), "{log}");
    assert!(log.contains("power: ACPI S5 with SLP_TYPa"), "{log}");
    // Dynamic Memory against the loopback host's model: 2048 frames ballooned out and given back.
    let balloon = last("loopback host: dynamic memory").expect("no Dynamic Memory report from the loopback host");
    assert!(balloon.contains("version 2.0"), "{balloon}");
    assert!(
        balloon.contains("2048 pages taken in 1 balloon(s), 2048 returned in 1 unballoon(s), 0 held, 0 errors"),
        "{balloon}"
    );
    let driver = last("driver dynamic memory:").expect("no Dynamic Memory driver status");
    assert!(driver.contains("given 2048, returned 2048"), "{driver}");
    // The example echo device with KMCL at both ends: the host's KMCL server offers it, the guest's client binds it,
    // negotiates version 1 and makes 1000 round trips of 64 bytes at once, then one a second.
    let row = log
        .lines()
        .find(|line| line.contains("6563686f-0001-4b4d-434c-00000000006b"))
        .unwrap_or_else(|| panic!("no echo row in the offer table:\n{log}"));
    assert!(row.trim_end().ends_with("bound"), "the echo device has no driver: {row}");
    assert!(row.contains("echo (example)"), "the echo class is named in the table: {row}");
    let echo = last("driver echo (KMCL both ends):").expect("no echo status");
    assert!(echo.contains("version 1 negotiated"), "{echo}");
    assert!(echo.contains("(first 1000 in ") && echo.contains(" 0 failed,"), "{echo}");
    let count = |after: &str| -> u64 {
        let start = echo.find(after).unwrap_or_else(|| panic!("no `{after}` in {echo}")) + after.len();
        echo[start..].split(|c: char| !c.is_ascii_digit()).next().and_then(|n| n.parse().ok()).expect(&echo)
    };
    let round_trips = count("negotiated, ");
    assert!(round_trips >= 1000, "{echo}");
    assert_eq!(count("server saw "), round_trips, "{echo}");
    assert_eq!(count("packets, "), 64 * round_trips, "{echo}");
    let server = last("loopback host: echo (KMCL server):").expect("no echo server report");
    assert!(server.contains("1 open(s), 1 hello(s) (0 refused)") && server.contains(" 0 failures"), "{server}");
}

#[test]
fn in_kernel_tests_all_pass() {
    let run = boot_kernel("ktests", Some("mode=test"));
    let verdicts = ktest_verdicts(&run.serial);
    let failed: Vec<_> = verdicts.iter().filter(|v| v.failure().is_some()).collect();
    assert!(failed.is_empty(), "in-kernel tests failed: {failed:#?}");
    let summary = KtestSummary::of(&verdicts);
    assert!(summary.passed >= 3, "expected the in-kernel test suite, saw {summary:?}");
    assert_eq!(ktest_summary(&run.serial), Some(summary), "summary line `{}` missing", summary.line());
    assert_eq!(run.exit, Exit::GuestSuccess);
}

/// A panicking kernel must fail the run, with its message on the console: the boot tests rely on it.
#[test]
fn a_kernel_panic_fails_the_run() {
    let run = boot_kernel("panic", Some("mode=panic"));
    assert_eq!(run.exit, Exit::GuestFailure);
    assert!(run.serial.contains("KERNEL PANIC"), "panic report missing");
    assert!(run.serial.contains("panic requested by the command line"), "panic message missing");
    assert!(run.serial.contains("kernel/src/main.rs:"), "panic location missing");
    assert!(!run.serial.contains("main job finished"));
}

/// The in-kernel test runner must report a failure as a failed run (checked with a filter that matches no test:
/// a run that executes no test is a failure, not a pass).
#[test]
fn a_ktest_run_that_tests_nothing_fails() {
    let run = boot_kernel("ktests-none", Some("mode=test filter=no-such-test"));
    assert!(run.serial.contains("ktest result: 0 passed, 0 failed, 0 skipped"));
    assert_eq!(run.exit, Exit::GuestFailure);
}

/// The text after `prefix` up to the end of its line, if the log has it.
fn logged_after<'a>(log: &'a str, prefix: &str) -> Option<&'a str> {
    let start = log.find(prefix)? + prefix.len();
    log[start..].lines().next()
}

/// A page fault is reported with its vector, error code, RIP and CR2 (the address the kernel said it would write),
/// and fails the run.
#[test]
fn a_page_fault_is_reported_and_fails_the_run() {
    let run = boot_kernel("fault", Some("mode=fault"));
    assert_eq!(run.exit, Exit::GuestFailure);
    let log = &run.serial;
    let target = logged_after(log, "mode=fault: writing to unmapped address ").expect("fault target not logged");
    assert!(log.contains("CPU EXCEPTION: vector 14 #PF page fault"), "no #PF report in:\n{log}");
    assert!(log.contains("  error code: 0x2 (CAUSED_BY_WRITE)"), "error code missing or wrong");
    let rip = logged_after(log, "  RIP: 0x").expect("RIP missing");
    assert!(u64::from_str_radix(rip.trim(), 16).is_ok_and(|rip| rip != 0), "RIP {rip:?} is not an address");
    assert_eq!(logged_after(log, "  CR2: "), Some(target), "CR2 is not the address written");
    assert!(!log.contains("main job finished"));
}

/// A kernel stack overflow faults on the stack's guard page while pushing the page fault's frame; the double-fault
/// handler runs on its own IST stack and reports instead of the machine resetting.
#[test]
fn a_stack_overflow_is_reported_as_a_double_fault() {
    let run = boot_kernel("stack-overflow", Some("mode=stack-overflow"));
    assert_eq!(run.exit, Exit::GuestFailure, "serial:\n{}", run.serial);
    assert!(run.serial.contains("CPU EXCEPTION: vector 8 #DF double fault"), "no #DF report in:\n{}", run.serial);
    assert!(run.serial.contains("  error code: 0x0"));
}

/// The main job's log shows the CPU bring-up: the local APIC's mode, the calibration source, and the framebuffer.
#[test]
fn boot_log_shows_apic_clock_and_screen() {
    let run = boot_kernel("bring-up-log", Some("seconds=1"));
    assert_eq!(run.exit, Exit::GuestSuccess);
    let log = &run.serial;
    let apic = logged_after(log, "apic: local APIC id ").expect("APIC line missing");
    assert!(apic.contains("xAPIC mode") || apic.contains("x2APIC mode"), "APIC mode missing: {apic}");
    let time = logged_after(log, "time: calibrated with ").expect("calibration line missing");
    assert!(time.contains("TSC") && time.contains("APIC bus"), "calibration line incomplete: {time}");
    assert!(logged_after(log, "console: framebuffer ").is_some_and(|l| l.contains("text")), "no framebuffer console");
}

/// Under QEMU TCG (no Hyper-V interface) the platform report says so, the Hyper-V layer stands aside, and the kernel
/// keeps its own clock (TSC calibrated against the ACPI PM timer or the PIT) and timer (local APIC timer).
#[test]
fn platform_report_says_no_hyperv_under_tcg() {
    let tcg = boot::accel::Accel::Tcg { reason: "the boot test asks for TCG".into() };
    let run = tests::boot_kernel_with("no-hyperv", Some("seconds=1"), tcg);
    assert_eq!(run.exit, Exit::GuestSuccess);
    let log = &run.serial;
    let report = &log[log.find("platform report:").expect("platform report missing")..];
    let summary = logged_after(report, "  hypervisor: ").expect("hypervisor line missing");
    assert!(summary.ends_with("; no Hyper-V enlightenments"), "hypervisor line: {summary}");
    assert!(!summary.contains("Hv#1"), "hypervisor line: {summary}");
    assert!(report.contains("\n    hypervisor: "), "the detailed hypervisor report is missing:\n{report}");
    assert!(
        report.contains("no Hyper-V enlightenments\n") || report.contains("not Hyper-V compatible"),
        "the detailed report does not say there is no Hyper-V:\n{report}"
    );
    let not_used = logged_after(log, "hyperv: not used: ").expect("the Hyper-V layer did not say it stands aside");
    assert!(not_used.contains("the kernel keeps its own clock and timer"), "{not_used}");
    assert!(!log.contains("hyperv: hypercall page enabled"), "a hypercall page under TCG?");
    let time = logged_after(log, "time: clock ").expect("clock choice not logged");
    assert_eq!(time, "TSC; kernel timer local APIC timer (no hypervisor clock or timer)");
    let calibration = logged_after(log, "time: calibrated with ").expect("calibration line missing");
    assert!(calibration.starts_with("ACPI PM timer") || calibration.starts_with("PIT"), "{calibration}");
}

/// Under TCG the Hyper-V in-kernel tests that need the hypervisor are reported as skipped, with the reason, and
/// counted apart; the detection and platform-choice tests still run and pass.
#[test]
fn hyperv_ktests_skip_under_tcg() {
    let tcg = boot::accel::Accel::Tcg { reason: "the boot test asks for TCG".into() };
    let run = tests::boot_kernel_with("hyperv-ktests-tcg", Some("mode=test filter=hyperv"), tcg);
    let verdicts = ktest_verdicts(&run.serial);
    let summary = KtestSummary::of(&verdicts);
    assert_eq!(summary.failed, 0, "failures: {verdicts:#?}");
    let passed: Vec<_> = verdicts.iter().filter(|v| v.passed()).map(|v| v.name.as_str()).collect();
    assert_eq!(passed, ["hyperv::detection_decides_by_feature_bits", "hyperv::clock_and_timer_follow_the_platform"]);
    assert!(summary.skipped >= 10, "expected the Hyper-V tests to skip: {summary:?}");
    for verdict in verdicts.iter().filter(|v| !v.passed()) {
        let reason = verdict.skip_reason().unwrap_or_default();
        assert!(reason.starts_with("no Hyper-V interface"), "{}: {:?}", verdict.name, verdict.outcome);
    }
    assert_eq!(ktest_summary(&run.serial), Some(summary), "summary line `{}` missing", summary.line());
    assert_eq!(run.exit, Exit::GuestSuccess);
}

/// `mode=poweroff` enters ACPI S5 with the `\_S5` values of QEMU's DSDT: QEMU reports a guest power-off (not a reset,
/// not an `isa-debug-exit` exit, which reports nothing) and exits with status 0, and the log shows the values used.
#[test]
fn poweroff_mode_powers_qemu_off_through_acpi_s5() {
    let tcg = boot::accel::Accel::Tcg { reason: "the boot test asks for TCG".into() };
    let (run, shutdowns) = tests::boot_kernel_watching_shutdown("poweroff", Some("mode=poweroff"), tcg);
    let log = &run.serial;
    assert_eq!(shutdowns, ["guest-shutdown"], "QEMU did not report one guest power-off; serial:\n{log}");
    assert_eq!(run.exit, Exit::Qemu(0));
    assert!(log.contains("power: power-off: leaving the hypervisor clean first"), "{log}");
    let s5 = logged_after(log, "power: ACPI S5 with SLP_TYPa ").expect("the S5 values are not logged");
    let (pm1a, rest) = s5.split_once(" / SLP_TYPb ").expect("SLP_TYPb missing");
    let (pm1b, port) = rest.split_once(" through PM1a_CNT 0x").expect("PM1a_CNT missing");
    // QEMU's q35 DSDT has `Name (_S5, Package {0, 0, 0, 0})`, and its ICH9 PM1a_CNT is at 0x604.
    assert_eq!((pm1a, pm1b), ("0", "0"), "{s5}");
    assert_eq!(port, "604", "{s5}");
    assert!(!log.contains("power-off failed") && !log.contains("KERNEL PANIC"), "{log}");
}

/// `mode=restart` resets through the FADT's reset register (q35: 0xF to I/O port 0xCF9): QEMU reports a guest
/// reset, which `-no-reboot` turns into an exit with status 0, and no fallback was needed.
#[test]
fn restart_mode_resets_through_the_acpi_reset_register() {
    let tcg = boot::accel::Accel::Tcg { reason: "the boot test asks for TCG".into() };
    let (run, shutdowns) = tests::boot_kernel_watching_shutdown("restart", Some("mode=restart"), tcg);
    let log = &run.serial;
    assert_eq!(shutdowns, ["guest-reset"], "QEMU did not report one guest reset; serial:\n{log}");
    assert_eq!(run.exit, Exit::Qemu(0));
    assert!(log.contains("power: restart: leaving the hypervisor clean first"), "{log}");
    assert_eq!(logged_after(log, "power: restart through the ACPI reset register: "), Some("0xf to I/O port 0xcf9"));
    assert!(!log.contains("still running") && !log.contains("keyboard controller"), "a fallback ran:\n{log}");
}

/// The shutdown watcher itself: a kernel that ends through `isa-debug-exit` produces no SHUTDOWN event, so the two
/// tests above cannot pass on a kernel that merely exits.
#[test]
fn isa_debug_exit_is_not_a_power_off() {
    let tcg = boot::accel::Accel::Tcg { reason: "the boot test asks for TCG".into() };
    let (run, shutdowns) = tests::boot_kernel_watching_shutdown("debug-exit", Some("mode=panic"), tcg);
    assert_eq!(run.exit, Exit::GuestFailure);
    assert!(shutdowns.is_empty(), "isa-debug-exit reported as {shutdowns:?}");
}

/// The restart fallbacks, each started on its own with `reset=`: the 8042 keyboard controller's reset line and a
/// triple fault both make QEMU report a guest reset, and the log shows the step taken.
#[test]
fn restart_fallbacks_keyboard_controller_and_triple_fault_reset() {
    let tcg = || boot::accel::Accel::Tcg { reason: "the boot test asks for TCG".into() };
    let (run, shutdowns) =
        tests::boot_kernel_watching_shutdown("restart-keyboard", Some("mode=restart reset=keyboard"), tcg());
    assert_eq!(shutdowns, ["guest-reset"], "the keyboard controller did not reset; serial:\n{}", run.serial);
    assert_eq!(run.exit, Exit::Qemu(0));
    assert!(run.serial.contains("power: restart through the keyboard controller (command 0xfe to port 0x64)"));
    assert!(!run.serial.contains("ACPI reset register") && !run.serial.contains("still running"), "{}", run.serial);

    let (run, shutdowns) =
        tests::boot_kernel_watching_shutdown("restart-triple-fault", Some("mode=restart reset=triple-fault"), tcg());
    assert_eq!(shutdowns, ["guest-reset"], "the triple fault did not reset; serial:\n{}", run.serial);
    assert_eq!(run.exit, Exit::Qemu(0));
    assert!(run.serial.contains("power: restart by triple fault (an empty IDT, then int3)"), "{}", run.serial);
    assert!(!run.serial.contains("keyboard controller") && !run.serial.contains("did not reset"), "{}", run.serial);
}

/// The in-kernel loopback VMBus under TCG (no Hyper-V): the kernel's own VMBus server offers an echo device, a KMCL
/// driver binds it, a packet goes out and comes back through rings in loopback guest memory, and the host's
/// notifications arrive as real interrupts (self-IPIs).
#[test]
fn loopback_vmbus_runs_a_kmcl_channel_on_real_interrupts() {
    let run = boot_kernel("loopback-bus", Some("mode=test filter=bus::loopback"));
    let log = &run.serial;
    let verdicts = ktest_verdicts(log);
    assert_eq!(verdicts.len(), 1, "expected the loopback test alone: {verdicts:#?}\n{log}");
    assert!(verdicts[0].passed(), "{verdicts:#?}\n{log}");
    let line = log.lines().find(|line| line.contains("bus: loopback VMBus")).expect("no loopback summary line");
    assert!(line.contains("loopback VMBus 5.3"), "the kernel's server speaks 5.3: {line}");
    assert!(line.contains(r#"callbacks ["opened", "started", "post_started", "suspend", "closed"]"#), "{line}");
    assert!(line.contains("1 packet(s) echoed"), "{line}");
    assert!(!line.contains(" 0 loopback interrupts"), "no interrupt drove the bus: {line}");
    assert_eq!(run.exit, Exit::GuestSuccess);
}
