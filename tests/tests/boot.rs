//! Boot tests: the real kernel image booted under QEMU + OVMF (q35), asserted from its serial log and exit status.

use boot::qemu::Exit;
use tests::{boot_kernel, ktest_verdicts};

#[test]
fn main_job_ends_with_platform_report_and_clean_exit() {
    let run = boot_kernel("main-job", None);
    assert_eq!(run.exit, Exit::GuestSuccess, "the main job must end with a clean exit");
    let log = &run.serial;
    assert!(log.contains("hv-unikernel"), "banner missing");
    let report = log.find("platform report:").expect("platform report missing");
    for field in ["cpu:", "memory:", "hypervisor:"] {
        assert!(log[report..].contains(field), "platform report lacks {field}");
    }
}

#[test]
fn in_kernel_tests_all_pass() {
    let run = boot_kernel("ktests", Some("mode=test"));
    let verdicts = ktest_verdicts(&run.serial);
    let failed: Vec<_> = verdicts.iter().filter(|v| v.failure.is_some()).collect();
    assert!(failed.is_empty(), "in-kernel tests failed: {failed:#?}");
    assert!(verdicts.len() >= 3, "expected the in-kernel test suite, saw {} verdicts", verdicts.len());
    let summary = format!("ktest result: {} passed, 0 failed", verdicts.len());
    assert!(run.serial.contains(&summary), "summary line `{summary}` missing");
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
    assert!(run.serial.contains("ktest result: 0 passed, 0 failed"));
    assert_eq!(run.exit, Exit::GuestFailure);
}
