//! Builds the kernel ELF for `x86_64-unknown-none`.
//!
//! The kernel is built with its own target directory (`target/boot/kernel`), so that a build started from inside
//! `cargo test` never waits on the lock of the outer build, and host feature unification never leaks into it.

use crate::{Result, err, work_dir, workspace_root};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// Which cargo profile to build the kernel with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// `--release` (the default: the debug kernel is several times slower under TCG).
    Release,
    /// The dev profile.
    Debug,
}

/// Serializes kernel builds within one process (tests run in parallel threads).
static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds the kernel and returns the path of its ELF file.
pub fn build_kernel(profile: Profile) -> Result<PathBuf> {
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let target_dir = work_dir().join("kernel");
    // Inside `cargo test` or `cargo run`, CARGO names the toolchain's cargo; otherwise rely on PATH (rustup's proxy
    // then reads rust-toolchain.toml).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--package", "kernel", "--target", "x86_64-unknown-none", "--target-dir"])
        .arg(&target_dir);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    // Flags meant for host builds must not reach the kernel.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER"] {
        cmd.env_remove(var);
    }
    let status = cmd.status().map_err(|e| err!("cannot run cargo to build the kernel: {e}"))?;
    if !status.success() {
        return Err(err!("building the kernel failed ({status})"));
    }
    let dir = if profile == Profile::Release { "release" } else { "debug" };
    let elf = target_dir.join("x86_64-unknown-none").join(dir).join("kernel");
    if !elf.is_file() {
        return Err(err!("cargo succeeded but {} is missing", elf.display()));
    }
    Ok(elf)
}
