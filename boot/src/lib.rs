//! Host side of the project: build the kernel, turn it into disk images, and run it.
//!
//! - [`build`] compiles the kernel for `x86_64-unknown-none`.
//! - [`image`] makes the GPT UEFI disk image (rust-osdev `bootloader`), the dynamic VHDX that Hyper-V Generation 2
//!   boots, and the fixed VHD that Azure takes.
//! - [`qemu`] runs an image under QEMU q35 + OVMF with a time limit and hands back the serial log and exit status.
//! - [`accel`] decides between KVM (with Hyper-V enlightenments and QEMU's VMBus host) and TCG.
//! - [`deps`] finds QEMU and OVMF, installing them with apt-get when run as root.
//! - [`rig`] runs an image as L2 under QEMU's VMBus host in a nested-KVM L1 guest (the real-host test tier).

pub mod accel;
pub mod build;
pub mod deps;
pub mod image;
pub mod qemu;
pub mod rig;

use std::path::PathBuf;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// The directory where `boot` keeps what it makes (kernel build, images, firmware variables).
pub fn work_dir() -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"));
    let target = if target.is_absolute() { target } else { workspace_root().join(target) };
    target.join("boot")
}

/// The error type of this crate: a message that says what failed and why.
#[derive(Debug)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(e.to_string())
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error`] from format arguments.
#[macro_export]
macro_rules! err {
    ($($arg:tt)*) => { $crate::Error(format!($($arg)*)) };
}
