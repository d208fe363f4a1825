//! In-kernel tests: run inside the booted image when the command line says `mode=test`.
//!
//! Each test prints `ktest <name> ... ok` or `ktest <name> ... FAILED: <why>` on the console, and the run ends with
//! `ktest result: N passed, M failed` and the exit status (success only if nothing failed). The boot tests on the host
//! read these lines. A test returns `Err` to fail; a panic fails the whole run through the panic handler.

use crate::exit::{ExitCode, exit};
use crate::kprintln;

/// What a test returns: `Err` carries the reason it failed.
pub type TestResult = Result<(), alloc::string::String>;

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
            return Err(alloc::format!("assertion failed: {} ({}:{})", stringify!($cond), file!(), line!()));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(alloc::format!("{} ({}:{})", format_args!($($arg)+), file!(), line!()));
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
                stringify!($left), stringify!($right), l, r, file!(), line!()
            ));
        }
    }};
}

/// Runs `tests` (those whose name contains `filter`, if given), prints the verdicts and ends the run.
pub fn run_all(tests: &[&[KTest]], filter: Option<&str>) -> ! {
    let mut passed = 0usize;
    let mut failed = 0usize;
    for test in tests.iter().flat_map(|group| group.iter()) {
        if filter.is_some_and(|f| !test.name.contains(f)) {
            continue;
        }
        match (test.run)() {
            Ok(()) => {
                passed += 1;
                kprintln!("ktest {} ... ok", test.name);
            }
            Err(why) => {
                failed += 1;
                kprintln!("ktest {} ... FAILED: {}", test.name, why);
            }
        }
    }
    kprintln!("ktest result: {} passed, {} failed", passed, failed);
    exit(if failed == 0 && passed > 0 { ExitCode::Success } else { ExitCode::Failure })
}
