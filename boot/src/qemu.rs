//! Runs a disk image under QEMU q35 + OVMF, with the serial port on a pipe, a time limit and the guest's exit status.
//!
//! The kernel ends a run by writing to QEMU's `isa-debug-exit` device (I/O port 0xF4); QEMU then exits with
//! `(value << 1) | 1`. The kernel writes [`GUEST_SUCCESS`] or [`GUEST_FAILURE`].

use crate::accel::Accel;
use crate::deps::Tools;
use crate::{Result, err, work_dir};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The value the kernel writes to `isa-debug-exit` when it finished its job (QEMU exit status 33).
pub const GUEST_SUCCESS: u32 = 0x10;
/// The value the kernel writes when a test failed or it panicked (QEMU exit status 35).
pub const GUEST_FAILURE: u32 = 0x11;

/// How one run is set up.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The raw GPT disk image to boot.
    pub image: PathBuf,
    /// KVM or TCG.
    pub accel: Accel,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// The run is killed after this long.
    pub timeout: Duration,
    /// Copy the serial output to this process's stdout as it arrives.
    pub echo: bool,
    /// Extra QEMU arguments, appended last.
    pub extra_args: Vec<String>,
}

impl RunConfig {
    /// A run of `image` with the defaults: probed accelerator, 256 MiB, one vCPU, 120 s, no echo.
    pub fn new(image: &Path) -> RunConfig {
        RunConfig {
            image: image.to_path_buf(),
            accel: Accel::probe(),
            memory_mib: 256,
            cpus: 1,
            timeout: Duration::from_secs(120),
            echo: false,
            extra_args: Vec::new(),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The kernel wrote [`GUEST_SUCCESS`].
    GuestSuccess,
    /// The kernel wrote [`GUEST_FAILURE`].
    GuestFailure,
    /// QEMU exited with another status (0 is a guest power-off or reset under `-no-reboot`).
    Qemu(i32),
    /// QEMU was killed by a signal.
    Signal(i32),
    /// The time limit passed and the run was killed.
    Timeout,
}

impl Exit {
    /// Decodes a QEMU exit status.
    pub fn from_status(status: std::process::ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match status.code() {
            Some(code) if code == ((GUEST_SUCCESS << 1) | 1) as i32 => Exit::GuestSuccess,
            Some(code) if code == ((GUEST_FAILURE << 1) | 1) as i32 => Exit::GuestFailure,
            Some(code) => Exit::Qemu(code),
            None => Exit::Signal(status.signal().unwrap_or(0)),
        }
    }
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct RunOutcome {
    /// How it ended.
    pub exit: Exit,
    /// Everything the guest wrote to its serial port (carriage returns removed).
    pub serial: String,
    /// What QEMU itself wrote to stderr.
    pub qemu_stderr: String,
    /// Wall-clock time of the run.
    pub duration: Duration,
}

/// Builds the full QEMU command line for a run (without starting it); `vars` is the run's private variable store.
pub fn command_line(tools: &Tools, config: &RunConfig, vars: &Path) -> Vec<String> {
    let mut args: Vec<String> = vec!["-nodefaults".into(), "-machine".into(), "q35".into()];
    args.extend(config.accel.qemu_args());
    let s = |x: &str| x.to_string();
    args.extend([
        s("-m"),
        config.memory_mib.to_string(),
        s("-smp"),
        config.cpus.to_string(),
        s("-drive"),
        format!("if=pflash,format=raw,readonly=on,file={}", tools.ovmf.code.display()),
        s("-drive"),
        format!("if=pflash,format=raw,file={}", vars.display()),
        s("-drive"),
        format!("format=raw,file={},if=none,id=boot,readonly=on", config.image.display()),
        s("-device"),
        s("virtio-blk-pci,drive=boot"),
        s("-serial"),
        s("stdio"),
        s("-display"),
        s("none"),
        s("-vga"),
        s("std"),
        s("-nic"),
        s("none"),
        s("-no-reboot"),
        s("-device"),
        s("isa-debug-exit,iobase=0xf4,iosize=0x04"),
    ]);
    args.extend(config.extra_args.iter().cloned());
    args
}

/// Boots the image and waits for QEMU to exit or the time limit to pass.
pub fn run(tools: &Tools, config: &RunConfig) -> Result<RunOutcome> {
    static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);
    let dir = work_dir().join("runs");
    std::fs::create_dir_all(&dir)?;
    let vars = dir.join(format!("vars-{}-{}.fd", std::process::id(), RUN_COUNTER.fetch_add(1, Ordering::Relaxed)));
    std::fs::copy(&tools.ovmf.vars, &vars)
        .map_err(|e| err!("copying the OVMF variable store {}: {e}", tools.ovmf.vars.display()))?;

    if let Accel::Tcg { reason } = &config.accel {
        eprintln!("boot: using QEMU TCG, not KVM: {reason}");
    }
    let started = Instant::now();
    let mut child = Command::new(&tools.qemu)
        .args(command_line(tools, config, &vars))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err!("cannot start {}: {e}", tools.qemu.display()))?;

    let serial = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let serial = Arc::clone(&serial);
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let echo = config.echo;
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                if echo {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                }
                serial.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&buf[..n]);
            }
        })
    };
    let stderr_reader = {
        let mut stderr = child.stderr.take().expect("stderr is piped");
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        })
    };

    let exit = loop {
        if let Some(status) = child.try_wait()? {
            break Exit::from_status(status);
        }
        if started.elapsed() > config.timeout {
            let _ = child.kill();
            let _ = child.wait();
            break Exit::Timeout;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let duration = started.elapsed();
    let _ = reader.join();
    let qemu_stderr = stderr_reader.join().unwrap_or_default();
    let _ = std::fs::remove_file(&vars);
    let bytes = std::mem::take(&mut *serial.lock().unwrap_or_else(|p| p.into_inner()));
    let serial = String::from_utf8_lossy(&bytes).replace('\r', "");
    Ok(RunOutcome { exit, serial, qemu_stderr, duration })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deps::Ovmf;

    fn tools() -> Tools {
        Tools {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            ovmf: Ovmf { code: "/fw/CODE.fd".into(), vars: "/fw/VARS.fd".into() },
        }
    }

    #[test]
    fn command_line_has_firmware_disk_serial_and_exit_device() {
        let mut config = RunConfig::new(Path::new("/img/disk.raw"));
        config.accel = Accel::tcg("test");
        let args = command_line(&tools(), &config, Path::new("/tmp/vars.fd")).join(" ");
        assert!(args.contains("if=pflash,format=raw,readonly=on,file=/fw/CODE.fd"));
        assert!(args.contains("if=pflash,format=raw,file=/tmp/vars.fd"));
        assert!(args.contains("file=/img/disk.raw"));
        assert!(args.contains("-serial stdio"));
        assert!(args.contains("isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(args.contains("-accel tcg"));
        assert!(args.contains("-no-reboot"));
    }

    #[test]
    fn exit_status_decoding() {
        use std::os::unix::process::ExitStatusExt;
        let status = |code: i32| std::process::ExitStatus::from_raw(code << 8);
        assert_eq!(Exit::from_status(status(33)), Exit::GuestSuccess);
        assert_eq!(Exit::from_status(status(35)), Exit::GuestFailure);
        assert_eq!(Exit::from_status(status(0)), Exit::Qemu(0));
        assert_eq!(Exit::from_status(std::process::ExitStatus::from_raw(9)), Exit::Signal(9));
    }
}
