//! In-kernel tests: run inside the booted image when the command line says `mode=test`.
//!
//! Each test prints one verdict line on the console: `ktest <name> ... ok`, `ktest <name> ... FAILED: <why>`, or
//! `ktest <name> ... skipped: <reason>` when the machine lacks what the test needs (for example the Hyper-V tests
//! under QEMU TCG). The run ends with `ktest result: N passed, M failed, K skipped` and the exit status: success only
//! if nothing failed and at least one test passed. A skip is never a pass: a run whose tests were all skipped fails.
//! The boot tests on the host read these lines (`tests::ktest_verdicts`). A test returns `Err` to fail or skip; a
//! panic fails the whole run through the panic handler.

use crate::exit::{ExitCode, exit};
use crate::kprintln;
use alloc::string::String;

/// Why a test did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TestError {
    /// The test ran and found a fault; the text says what.
    Failed(String),
    /// The test could not run on this machine; the text says what is missing.
    Skipped(String),
}

impl From<String> for TestError {
    fn from(why: String) -> TestError {
        TestError::Failed(why)
    }
}

impl From<&str> for TestError {
    fn from(why: &str) -> TestError {
        TestError::Failed(why.into())
    }
}

/// What a test returns: `Err` carries the reason it failed, or why it was skipped.
pub type TestResult = Result<(), TestError>;

/// Ends a test as skipped because this machine lacks what it needs: `return skip("no Hyper-V")`.
pub fn skip(reason: impl Into<String>) -> TestResult {
    Err(TestError::Skipped(reason.into()))
}

/// One in-kernel test.
pub struct KTest {
    /// `module::name`, as printed.
    pub name: &'static str,
    /// The test body.
    pub run: fn() -> TestResult,
}

/// Fails the current test with a formatted reason unless `cond` holds.
#[macro_export]
macro_rules! kassert {
    ($cond:expr) => {
        if !$cond {
            return Err(alloc::format!("assertion failed: {} ({}:{})", stringify!($cond), file!(), line!()).into());
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(alloc::format!("{} ({}:{})", format_args!($($arg)+), file!(), line!()).into());
        }
    };
}

/// Fails the current test unless the two values are equal.
#[macro_export]
macro_rules! kassert_eq {
    ($left:expr, $right:expr) => {{
        let (l, r) = (&$left, &$right);
        if l != r {
            return Err(alloc::format!(
                "{} == {} failed: {:?} != {:?} ({}:{})",
                stringify!($left),
                stringify!($right),
                l,
                r,
                file!(),
                line!()
            )
            .into());
        }
    }};
}

/// The counts printed in the summary line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Tests that passed.
    pub passed: usize,
    /// Tests that failed.
    pub failed: usize,
    /// Tests skipped because the machine lacks what they need.
    pub skipped: usize,
}

impl Tally {
    /// Whether the run succeeded: nothing failed and something passed (skips count for neither).
    pub fn success(&self) -> bool {
        self.failed == 0 && self.passed > 0
    }
}

/// Runs `tests` (those whose name contains `filter`, if given), prints the verdicts and ends the run.
pub fn run_all(tests: &[&[KTest]], filter: Option<&str>) -> ! {
    let mut tally = Tally::default();
    for test in tests.iter().flat_map(|group| group.iter()) {
        if filter.is_some_and(|f| !test.name.contains(f)) {
            continue;
        }
        match (test.run)() {
            Ok(()) => {
                tally.passed += 1;
                kprintln!("ktest {} ... ok", test.name);
            }
            Err(TestError::Failed(why)) => {
                tally.failed += 1;
                kprintln!("ktest {} ... FAILED: {}", test.name, why);
            }
            Err(TestError::Skipped(reason)) => {
                tally.skipped += 1;
                kprintln!("ktest {} ... skipped: {}", test.name, reason);
            }
        }
    }
    kprintln!("ktest result: {} passed, {} failed, {} skipped", tally.passed, tally.failed, tally.skipped);
    exit(if tally.success() { ExitCode::Success } else { ExitCode::Failure })
}
