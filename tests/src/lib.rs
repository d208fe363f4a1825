//! Shared helpers for the integration tests: boot the real kernel image under QEMU and read what it printed.
//!
//! The kernel is built once per test process; each boot gets its own disk image whose ramdisk carries the kernel
//! command line (`mode=test`, `mode=panic`, …). At most [`MAX_PARALLEL_BOOTS`] QEMU instances run at once, so that
//! parallel test threads do not starve each other on a small machine.

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
    let image = make_image(name, cmdline);
    let mut config = RunConfig::new(&image);
    config.timeout = BOOT_TIMEOUT;
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

/// One in-kernel test verdict read from the serial log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KtestVerdict {
    /// The test's name (`module::name`).
    pub name: String,
    /// `None` if it passed, else the reason printed.
    pub failure: Option<String>,
}

/// Reads the `ktest <name> ... ok|FAILED: <why>` lines of a serial log.
pub fn ktest_verdicts(serial: &str) -> Vec<KtestVerdict> {
    serial
        .lines()
        .filter_map(|line| line.strip_prefix("ktest "))
        .filter_map(|rest| rest.split_once(" ... "))
        .map(|(name, verdict)| KtestVerdict {
            name: name.to_string(),
            failure: if verdict == "ok" { None } else { Some(verdict.to_string()) },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_lines_are_parsed() {
        let log = "noise\nktest mm::a ... ok\nktest mm::b ... FAILED: 1 != 2\nktest result: 1 passed, 1 failed\n";
        let v = ktest_verdicts(log);
        assert_eq!(v.len(), 2);
        assert_eq!(v[0], KtestVerdict { name: "mm::a".into(), failure: None });
        assert_eq!(v[1].failure.as_deref(), Some("FAILED: 1 != 2"));
    }
}
