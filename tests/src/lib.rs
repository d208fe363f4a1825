//! Shared helpers for the integration tests: boot the real kernel image under QEMU and read what it printed.
//!
//! The kernel is built once per test process; each boot gets its own disk image whose ramdisk carries the kernel
//! command line (`mode=test`, `mode=panic`, …). At most [`MAX_PARALLEL_BOOTS`] QEMU instances run at once, so that
//! parallel test threads do not starve each other on a small machine.

use boot::accel::Accel;
use boot::build::{Profile, build_kernel};
use boot::deps::Tools;
use boot::qemu::{RunConfig, RunOutcome};
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How many QEMU instances the boot tests run at the same time.
pub const MAX_PARALLEL_BOOTS: usize = 2;

/// The time limit of one boot under TCG (a boot takes about 5 s alone on a 2-core machine).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The kernel ELF and the QEMU tools, found or made once per process.
pub struct Setup {
    /// The release kernel ELF.
    pub kernel: PathBuf,
    /// QEMU and OVMF.
    pub tools: Tools,
}

/// Builds the kernel and finds (or installs) QEMU, once.
pub fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let tools = boot::deps::ensure_tools().unwrap_or_else(|e| panic!("QEMU/OVMF: {e}"));
        let kernel = build_kernel(Profile::Release).unwrap_or_else(|e| panic!("kernel build: {e}"));
        Setup { kernel, tools }
    })
}

/// A counting semaphore (std has none).
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

static SLOTS: Slots = Slots { free: Mutex::new(MAX_PARALLEL_BOOTS), cv: Condvar::new() };

struct SlotGuard;

impl SlotGuard {
    fn acquire() -> SlotGuard {
        let mut free = SLOTS.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = SLOTS.cv.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        SlotGuard
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        *SLOTS.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        SLOTS.cv.notify_one();
    }
}

/// Makes an image named `name` with `cmdline` (if any) and returns its path.
pub fn make_image(name: &str, cmdline: Option<&str>) -> PathBuf {
    let setup = setup();
    let image = boot::work_dir().join("test-images").join(format!("{name}.raw"));
    boot::image::create_uefi_image(&setup.kernel, cmdline, &image).unwrap_or_else(|e| panic!("image {name}: {e}"));
    image
}

/// Boots the kernel with `cmdline` under QEMU (TCG unless KVM can really run it) and returns the outcome.
///
/// The serial log is printed after the run, so a failing test shows what the kernel said.
pub fn boot_kernel(name: &str, cmdline: Option<&str>) -> RunOutcome {
    boot_kernel_with(name, cmdline, Accel::probe())
}

/// Boots the kernel with `cmdline` under QEMU with the accelerator `accel` (e.g. TCG, to see the kernel without
/// Hyper-V enlightenments even where KVM could run it) and returns the outcome, printing the serial log.
pub fn boot_kernel_with(name: &str, cmdline: Option<&str>, accel: Accel) -> RunOutcome {
    boot_kernel_with_args(name, cmdline, accel, Vec::new())
}

/// Boots as [`boot_kernel_with`] does, with `extra_args` appended to QEMU's command line.
fn boot_kernel_with_args(name: &str, cmdline: Option<&str>, accel: Accel, extra_args: Vec<String>) -> RunOutcome {
    let image = make_image(name, cmdline);
    let mut config = RunConfig::new(&image);
    config.timeout = BOOT_TIMEOUT;
    config.accel = accel;
    config.extra_args = extra_args;
    let outcome = {
        let _slot = SlotGuard::acquire();
        boot::qemu::run(&setup().tools, &config).unwrap_or_else(|e| panic!("running QEMU for {name}: {e}"))
    };
    println!(
        "--- {name}: {:?} after {:.1} s; serial log:\n{}\n--- end of {name}",
        outcome.exit,
        outcome.duration.as_secs_f64(),
        outcome.serial
    );
    if !outcome.qemu_stderr.trim().is_empty() {
        println!("--- {name}: QEMU stderr:\n{}", outcome.qemu_stderr);
    }
    outcome
}

/// Boots as [`boot_kernel_with`] does, with a QMP monitor that QEMU connects to, and returns the outcome with the
/// reason of every `SHUTDOWN` event QEMU reported: `guest-shutdown` for an ACPI power-off, `guest-reset` for a reset
/// (which `-no-reboot` turns into an exit). A kernel that ends through `isa-debug-exit` makes QEMU exit at once,
/// with no event, and a power-off and a reset both exit with status 0: the events tell them apart.
pub fn boot_kernel_watching_shutdown(name: &str, cmdline: Option<&str>, accel: Accel) -> (RunOutcome, Vec<String>) {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    // In the temporary directory: a Unix socket's path has at most 107 bytes, which a deep work tree can exceed.
    let socket = std::env::temp_dir().join(format!("hv-qmp-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).unwrap_or_else(|e| panic!("QMP socket {}: {e}", socket.display()));
    listener.set_nonblocking(true).unwrap_or_else(|e| panic!("QMP socket: {e}"));
    let qemu_ended = Arc::new(AtomicBool::new(false));
    // QEMU connects as the client at start-up; the transcript ends when QEMU exits and closes the connection.
    let watcher = {
        let qemu_ended = Arc::clone(&qemu_ended);
        std::thread::spawn(move || -> String {
            let mut stream = loop {
                match listener.accept() {
                    Ok((stream, _)) => break stream,
                    Err(_) if qemu_ended.load(Ordering::Acquire) => return String::new(),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            let mut transcript = String::new();
            if stream.set_nonblocking(false).is_ok()
                && stream.set_read_timeout(Some(BOOT_TIMEOUT)).is_ok()
                && stream.write_all(b"{\"execute\": \"qmp_capabilities\"}\n").is_ok()
            {
                let _ = stream.read_to_string(&mut transcript);
            }
            transcript
        })
    };
    let args = ["-chardev", &format!("socket,id=qmp,path={}", socket.display()), "-mon", "chardev=qmp,mode=control"];
    let outcome = boot_kernel_with_args(name, cmdline, accel, args.iter().map(|a| a.to_string()).collect());
    qemu_ended.store(true, Ordering::Release);
    let transcript = watcher.join().unwrap_or_default();
    let _ = std::fs::remove_file(&socket);
    println!("--- {name}: QMP transcript:\n{transcript}--- end of QMP");
    assert!(transcript.contains("\"QMP\""), "{name}: QEMU's QMP monitor never greeted, so no event could be seen");
    (outcome, shutdown_reasons(&transcript))
}

/// The `reason` of each `SHUTDOWN` event in a QMP transcript (one JSON object per line).
pub fn shutdown_reasons(transcript: &str) -> Vec<String> {
    transcript
        .lines()
        .filter(|line| line.contains("\"event\": \"SHUTDOWN\"") || line.contains("\"event\":\"SHUTDOWN\""))
        .filter_map(|line| {
            let after = &line[line.find("\"reason\"")? + "\"reason\"".len()..];
            let value = after.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
            Some(value[..value.find('"')?].to_string())
        })
        .collect()
}

/// What one in-kernel test came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KtestOutcome {
    /// `ok`.
    Passed,
    /// `FAILED: <why>`; holds the whole verdict text.
    Failed(String),
    /// `skipped: <reason>` (the machine lacks what the test needs); holds the reason. Never a pass.
    Skipped(String),
}

/// One in-kernel test verdict read from the serial log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KtestVerdict {
    /// The test's name (`module::name`).
    pub name: String,
    /// How it ended.
    pub outcome: KtestOutcome,
}

impl KtestVerdict {
    /// Whether the test passed.
    pub fn passed(&self) -> bool {
        self.outcome == KtestOutcome::Passed
    }

    /// The failure text, if it failed.
    pub fn failure(&self) -> Option<&str> {
        match &self.outcome {
            KtestOutcome::Failed(why) => Some(why),
            _ => None,
        }
    }

    /// The skip reason, if it was skipped.
    pub fn skip_reason(&self) -> Option<&str> {
        match &self.outcome {
            KtestOutcome::Skipped(reason) => Some(reason),
            _ => None,
        }
    }
}

/// Reads the `ktest <name> ... ok|FAILED: <why>|skipped: <reason>` lines of a serial log. Any other verdict text
/// counts as a failure.
pub fn ktest_verdicts(serial: &str) -> Vec<KtestVerdict> {
    serial
        .lines()
        .filter_map(|line| line.strip_prefix("ktest "))
        .filter_map(|rest| rest.split_once(" ... "))
        .map(|(name, verdict)| KtestVerdict {
            name: name.to_string(),
            outcome: if verdict == "ok" {
                KtestOutcome::Passed
            } else if let Some(reason) = verdict.strip_prefix("skipped: ") {
                KtestOutcome::Skipped(reason.to_string())
            } else {
                KtestOutcome::Failed(verdict.to_string())
            },
        })
        .collect()
}

/// The counts of the summary line `ktest result: N passed, M failed, K skipped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KtestSummary {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests that were skipped.
    pub skipped: usize,
}

impl KtestSummary {
    /// Counts the verdicts.
    pub fn of(verdicts: &[KtestVerdict]) -> KtestSummary {
        let count = |f: fn(&KtestVerdict) -> bool| verdicts.iter().filter(|v| f(v)).count();
        KtestSummary {
            passed: count(KtestVerdict::passed),
            failed: count(|v| v.failure().is_some()),
            skipped: count(|v| v.skip_reason().is_some()),
        }
    }

    /// The summary line the kernel prints for these counts.
    pub fn line(&self) -> String {
        format!("ktest result: {} passed, {} failed, {} skipped", self.passed, self.failed, self.skipped)
    }
}

/// Reads the summary line of a serial log, if it has one.
pub fn ktest_summary(serial: &str) -> Option<KtestSummary> {
    let line = serial.lines().find_map(|line| line.strip_prefix("ktest result: "))?;
    let mut counts = line.split(", ").map(|part| part.split_once(' '));
    let mut next = |label: &str| match counts.next() {
        Some(Some((number, word))) if word == label => number.parse().ok(),
        _ => None,
    };
    Some(KtestSummary { passed: next("passed")?, failed: next("failed")?, skipped: next("skipped")? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_lines_are_parsed() {
        let log = "noise\nktest mm::a ... ok\nktest mm::b ... FAILED: 1 != 2\nktest hv::c ... skipped: no Hyper-V\n\
                   ktest result: 1 passed, 1 failed, 1 skipped\n";
        let v = ktest_verdicts(log);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], KtestVerdict { name: "mm::a".into(), outcome: KtestOutcome::Passed });
        assert_eq!(v[1].failure(), Some("FAILED: 1 != 2"));
        assert_eq!(v[2].skip_reason(), Some("no Hyper-V"));
        assert!(v[0].passed() && !v[1].passed() && !v[2].passed(), "a skip is not a pass");
        let summary = KtestSummary::of(&v);
        assert_eq!(summary, KtestSummary { passed: 1, failed: 1, skipped: 1 });
        assert_eq!(ktest_summary(log), Some(summary));
        assert!(log.contains(&summary.line()));
    }

    #[test]
    fn shutdown_events_are_read_from_a_qmp_transcript() {
        let transcript = "{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\n{\"return\": {}}\n\
            {\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"SHUTDOWN\", \
            \"data\": {\"guest\": true, \"reason\": \"guest-reset\"}}\n\
            {\"event\": \"STOP\", \"data\": {\"reason\": \"x\"}}\n";
        assert_eq!(shutdown_reasons(transcript), ["guest-reset"]);
        assert!(shutdown_reasons("{\"return\": {}}\n").is_empty());
    }

    #[test]
    fn unknown_verdicts_and_malformed_summaries() {
        let v = ktest_verdicts("ktest x::y ... SKIPPED somehow\n");
        assert_eq!(v[0].failure(), Some("SKIPPED somehow"), "an unknown verdict is a failure");
        assert_eq!(ktest_summary("ktest result: 3 passed, 0 failed\n"), None, "the skip count is required");
        assert_eq!(ktest_summary("ktest result: 3 passed, x failed, 0 skipped\n"), None);
        assert_eq!(ktest_summary("no summary"), None);
    }
}
