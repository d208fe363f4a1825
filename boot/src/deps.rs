//! Finds QEMU and the OVMF firmware, installing them with apt-get when they are missing and we are root.

use crate::{Result, err};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's `ovmf` package puts the firmware code and its variable store template.
const OVMF_CANDIDATES: &[(&str, &str)] = &[
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
];

/// The firmware files a run needs.
#[derive(Clone, Debug)]
pub struct Ovmf {
    /// Firmware code, mapped read-only as the first pflash device.
    pub code: PathBuf,
    /// Variable-store template; each run gets a private copy.
    pub vars: PathBuf,
}

/// What a QEMU run needs from the host.
#[derive(Clone, Debug)]
pub struct Tools {
    /// The `qemu-system-x86_64` binary.
    pub qemu: PathBuf,
    /// The UEFI firmware.
    pub ovmf: Ovmf,
}

/// The shell command that installs what is missing, as printed to a user who is not root.
pub const INSTALL_HINT: &str = "sudo apt-get update && sudo apt-get install -y qemu-system-x86 ovmf qemu-utils";

/// Finds QEMU and OVMF; when either is missing, installs them (as root) or says how to.
pub fn ensure_tools() -> Result<Tools> {
    if let Some(tools) = find_tools() {
        return Ok(tools);
    }
    if !is_root() {
        return Err(err!("QEMU or OVMF is missing; install them with:\n    {INSTALL_HINT}"));
    }
    eprintln!("boot: QEMU or OVMF is missing; installing them with apt-get");
    install_with_apt()?;
    find_tools().ok_or_else(|| err!("apt-get finished but QEMU or OVMF is still missing"))
}

/// Finds QEMU and OVMF without installing anything.
pub fn find_tools() -> Option<Tools> {
    let qemu = find_in_path("qemu-system-x86_64")?;
    let (code, vars) =
        OVMF_CANDIDATES.iter().find(|(code, vars)| Path::new(code).is_file() && Path::new(vars).is_file())?;
    Some(Tools { qemu, ovmf: Ovmf { code: code.into(), vars: vars.into() } })
}

/// Looks a program up in `PATH`.
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Whether this process runs as root (and so may use apt-get).
pub fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// Installs QEMU, OVMF and qemu-utils from Debian.
///
/// Some machines carry a newer `qemu-utils` from backports whose package conflicts with the release's
/// `qemu-system-x86`; then `qemu-utils` is pinned to the version `qemu-system-x86` would install, so that the two match.
pub fn install_with_apt() -> Result<()> {
    apt(&["update", "-q"])?;
    if apt(&["install", "-y", "-q", "qemu-system-x86", "ovmf", "qemu-utils"]).is_ok() {
        return Ok(());
    }
    let policy = Command::new("apt-cache").args(["policy", "qemu-system-x86"]).output()?;
    let candidate = String::from_utf8_lossy(&policy.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:").map(|v| v.trim().to_string()))
        .filter(|v| v != "(none)")
        .ok_or_else(|| err!("apt has no candidate for qemu-system-x86"))?;
    let utils = format!("qemu-utils={candidate}");
    apt(&["install", "-y", "-q", "--allow-downgrades", "qemu-system-x86", "ovmf", &utils])
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| err!("cannot run apt-get: {e}"))?;
    if status.success() { Ok(()) } else { Err(err!("apt-get {} failed ({status})", args.join(" "))) }
}
