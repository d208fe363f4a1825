//! The real-host rig: runs a project image as the L2 guest of QEMU's VMBus host (`vmbus-bridge`, `hv-balloon`)
//! under KVM with Hyper-V enlightenments, on a machine without hardware virtualization (boot/rig/README.md).
//!
//! The host's QEMU runs, under TCG with `-cpu max` (which emulates AMD SVM with nested paging), an L1 Debian guest
//! whose kernel loads `kvm_amd`; L1's QEMU then runs the image as L2. [`prepare`] builds L1 once into a cache
//! directory (`<target>/rig`) and reuses it while its inputs are unchanged; [`Rig::run`] and [`Rig::run_with`] boot
//! one image, stream L2's serial log live, and return L2's exit status, or say which layer failed and why.
//!
//! Wiring of one run (the outer QEMU's devices, as L1 sees them; boot/rig/l1-init.sh is L1's side):
//!
//! | L1 device   | host side                     | carries                                              |
//! |-------------|-------------------------------|------------------------------------------------------|
//! | `/dev/vda`  | the cached L1 root image (ro) | L1's Debian userspace, QEMU, OVMF                    |
//! | `/dev/vdb`  | the project image (ro)        | L2's disk                                            |
//! | `/dev/vdc`  | this run's argument file (ro) | L2's QEMU arguments, one per line                    |
//! | `ttyS0`     | a log file, tailed            | L1's console: kernel and `rig-l1:` lines             |
//! | `ttyS1`     | the outer QEMU's stdout       | L2's serial port (COM1), streamed and captured       |
//! | `ttyS2`     | a unix socket                 | L2's QMP monitor, driven by [`Session::qmp`]         |
//! | port 0xf4   | isa-debug-exit                | L1 ends the outer QEMU with L2's exit status         |

pub mod host;
pub mod json;
pub mod qmp;
pub mod tcg_patch;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::qemu::Exit;
use qmp::{Qmp, QmpError};
use tcg_patch::TcgModule;

/// The L1 build recipe (boot/rig/build-l1.sh); its content is an input of the cache stamp.
pub const L1_BUILD_SCRIPT: &str = include_str!("../../rig/build-l1.sh");
/// L1's PID 1 (boot/rig/l1-init.sh); its content is an input of the cache stamp.
pub const L1_INIT_SCRIPT: &str = include_str!("../../rig/l1-init.sh");
/// The Debian suite L1 is built from: its QEMU (10.0) has `vmbus-bridge` and `hv-balloon` (QEMU >= 8.2).
pub const DEFAULT_SUITE: &str = "trixie";
/// Changes when the Rust side expects something different of an L1 build (part of the cache stamp).
const STAMP_FORMAT: &str = "hv-rig L1 stamp, format 1";
/// Free space a build needs in the cache directory's file system (the root image is 1 GiB; the tree it is made
/// from, about 600 MB, exists at the same time).
pub const BUILD_FREE_BYTES: u64 = 2 << 30;
/// Set (to anything) to skip the real-host tier: [`prepare`] then reports it unavailable.
pub const SKIP_ENV: &str = "HV_RIG_SKIP";

/// L1's kernel command line. `quiet` keeps L1's console to its `rig-l1:` lines and real problems; `panic=-1`
/// with `-no-reboot` turns an L1 kernel panic into an outer QEMU exit instead of a hang.
const L1_CMDLINE: &str = "console=ttyS0 root=/dev/vda ro init=/sbin/rig-l1-init quiet panic=-1";
/// Where l1-init.sh puts the private copies it gives L2 (it copies the OVMF variable store and /dev/vdb there).
const L1_L2_IMAGE: &str = "/tmp/l2.img";
const L1_L2_VARS: &str = "/tmp/l2-vars.fd";
const L1_OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";

/// Why the rig cannot be prepared.
#[derive(Debug)]
pub enum RigError {
    /// The machine lacks something the rig needs (root, apt, disk space, the Debian mirror, ...): the real-host
    /// tier is skipped with this reason.
    Unavailable(String),
    /// Building L1 was possible but failed; `log` holds the whole build output.
    BuildFailed {
        /// What failed (the end of the build output).
        reason: String,
        /// The build log.
        log: PathBuf,
    },
    /// A file operation in the cache directory failed.
    Io {
        /// What was being done.
        context: String,
        /// The error.
        error: io::Error,
    },
}

impl fmt::Display for RigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RigError::Unavailable(reason) => write!(f, "unavailable: {reason}"),
            RigError::BuildFailed { reason, log } => {
                write!(f, "building L1 failed: {reason} (whole log: {})", log.display())
            }
            RigError::Io { context, error } => write!(f, "rig: {context}: {error}"),
        }
    }
}

impl std::error::Error for RigError {}

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> RigError {
    let context = context.into();
    move |error| RigError::Io { context, error }
}

/// How [`prepare`] finds or builds L1.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// The cache directory (L1's files, the patched TCG module, the lock, the last run's logs).
    pub cache_dir: PathBuf,
    /// The Debian suite of L1.
    pub suite: String,
    /// The Debian mirror to build from; `None` takes the one the host's apt uses.
    pub mirror: Option<String>,
    /// Patch a private copy of the outer QEMU's TCG module when its checksum is known (see [`tcg_patch`]);
    /// `false` runs the host's module as it is (aborts are then retried).
    pub patch_tcg: bool,
    /// Print progress (build steps) to stderr.
    pub echo: bool,
}

impl PrepareOptions {
    /// The defaults, overridden by the environment: `HV_RIG_DIR` (cache directory, default `<target>/rig`),
    /// `HV_RIG_SUITE` (default [`DEFAULT_SUITE`]), `HV_RIG_MIRROR` (default: the host's apt mirror),
    /// `HV_RIG_TCG_PATCH=off` (run the host's TCG module unpatched).
    pub fn from_env() -> PrepareOptions {
        let var = |name| std::env::var(name).ok().filter(|value: &String| !value.is_empty());
        PrepareOptions {
            cache_dir: var("HV_RIG_DIR").map(PathBuf::from).unwrap_or_else(default_cache_dir),
            suite: var("HV_RIG_SUITE").unwrap_or_else(|| DEFAULT_SUITE.to_owned()),
            mirror: var("HV_RIG_MIRROR"),
            patch_tcg: var("HV_RIG_TCG_PATCH").is_none_or(|value| value != "off"),
            echo: true,
        }
    }
}

/// `<target>/rig`, beside `boot`'s own work directory (`<target>/boot`).
pub fn default_cache_dir() -> PathBuf {
    let work = crate::work_dir();
    work.parent().map(|target| target.join("rig")).unwrap_or_else(|| work.join("rig"))
}

/// The files of a built L1.
#[derive(Clone, Debug)]
pub struct L1Files {
    /// L1's kernel.
    pub kernel: PathBuf,
    /// L1's initramfs.
    pub initrd: PathBuf,
    /// L1's root file system image (ext4, used read-only).
    pub root: PathBuf,
}

impl L1Files {
    fn in_dir(dir: &Path) -> L1Files {
        L1Files { kernel: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), root: dir.join("root.img") }
    }

    fn all_exist(&self) -> bool {
        [&self.kernel, &self.initrd, &self.root].iter().all(|path| path.is_file())
    }
}

/// What [`prepare`] did to get L1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum L1Origin {
    /// The cached build matched the stamp.
    Cached,
    /// L1 was built now, taking this long.
    Built(Duration),
}

/// A prepared rig: L1 is built and the outer QEMU's TCG module is chosen.
#[derive(Debug)]
pub struct Rig {
    cache_dir: PathBuf,
    qemu: PathBuf,
    /// L1's files.
    pub l1: L1Files,
    /// How L1 was obtained.
    pub origin: L1Origin,
    /// The TCG module the outer QEMU runs with.
    pub tcg: TcgModule,
    echo: bool,
}

/// An exclusive lock on the cache directory, held while building L1 and for the whole of each run, so that
/// parallel tests (threads or processes) neither build twice nor run two outer QEMUs at once.
struct CacheLock {
    _file: File,
}

impl CacheLock {
    fn acquire(cache_dir: &Path) -> Result<CacheLock, RigError> {
        fs::create_dir_all(cache_dir).map_err(io_context(format!("creating {}", cache_dir.display())))?;
        let path = cache_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_context(format!("opening {}", path.display())))?;
        file.lock().map_err(io_context(format!("locking {}", path.display())))?;
        Ok(CacheLock { _file: file })
    }
}

/// The stamp text of an L1 build: every input that changes what the build produces.
pub fn l1_stamp(suite: &str) -> io::Result<String> {
    Ok(format!(
        "{STAMP_FORMAT}\nsuite: {suite}\nbuild-l1.sh sha256: {}\nl1-init.sh sha256: {}\n",
        host::sha256_hex(L1_BUILD_SCRIPT.as_bytes())?,
        host::sha256_hex(L1_INIT_SCRIPT.as_bytes())?,
    ))
}

/// Finds or builds L1 and chooses the outer QEMU's TCG module. A build needs root, apt (to install QEMU,
/// debootstrap, e2fsprogs and wget when missing), the host's Debian mirror and [`BUILD_FREE_BYTES`] of disk;
/// lacking any of them it returns [`RigError::Unavailable`] with the reason. A build takes about 80 s and leaves
/// about 480 MB; a current build is reused (then only QEMU is needed).
pub fn prepare(options: &PrepareOptions) -> Result<Rig, RigError> {
    if let Some(value) = std::env::var_os(SKIP_ENV) {
        return Err(RigError::Unavailable(format!("{SKIP_ENV} is set (to {value:?})")));
    }
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        return Err(RigError::Unavailable("the rig runs on x86-64 Linux hosts only".into()));
    }
    let tools = crate::deps::ensure_tools().map_err(|error| RigError::Unavailable(format!("host QEMU: {error}")))?;
    host::ensure_programs(&[("sha256sum", "coreutils"), ("df", "coreutils")]).map_err(RigError::Unavailable)?;

    let _lock = CacheLock::acquire(&options.cache_dir)?;
    let say = |message: &str| {
        if options.echo {
            let _ = writeln!(io::stderr(), "rig: {message}");
        }
    };

    let tcg = if options.patch_tcg {
        let module_source = Path::new(tcg_patch::HOST_MODULE_DIR).join(tcg_patch::MODULE_NAME);
        let private_dir = options.cache_dir.join("tcg-module");
        tcg_patch::prepare_module(&module_source, &private_dir, tcg_patch::KNOWN_BUILDS)
            .map_err(io_context("preparing the TCG module copy"))?
            .1
    } else {
        TcgModule::Unpatched { reason: "patching turned off (HV_RIG_TCG_PATCH=off)".into() }
    };

    let l1_dir = options.cache_dir.join("l1");
    let l1 = L1Files::in_dir(&l1_dir);
    let stamp_path = l1_dir.join("stamp");
    let stamp = l1_stamp(&options.suite).map_err(io_context("hashing the L1 recipe"))?;
    if l1.all_exist() && fs::read_to_string(&stamp_path).is_ok_and(|old| old == stamp) {
        return Ok(Rig {
            cache_dir: options.cache_dir.clone(),
            qemu: tools.qemu,
            l1,
            origin: L1Origin::Cached,
            tcg,
            echo: options.echo,
        });
    }

    if !crate::deps::is_root() {
        return Err(RigError::Unavailable(format!(
            "not root, and there is no current L1 build in {}: building L1 needs root (debootstrap, chroot, apt-get)",
            l1_dir.display()
        )));
    }
    host::ensure_programs(&[
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("wget", "wget"),
        ("chroot", "coreutils"),
    ])
    .map_err(RigError::Unavailable)?;
    let free = host::free_bytes(&options.cache_dir).map_err(io_context("reading free disk space"))?;
    if free < BUILD_FREE_BYTES {
        return Err(RigError::Unavailable(format!(
            "{} MiB free in {}; building L1 needs {} MiB",
            free >> 20,
            options.cache_dir.display(),
            BUILD_FREE_BYTES >> 20
        )));
    }
    let mirror = match &options.mirror {
        Some(mirror) => mirror.trim_end_matches('/').to_owned(),
        None => host::host_debian_mirror().ok_or_else(|| {
            RigError::Unavailable("no Debian mirror in the host's apt sources (set HV_RIG_MIRROR)".into())
        })?,
    };
    host::url_reachable(&format!("{mirror}/dists/{}/Release", options.suite))
        .map_err(|why| RigError::Unavailable(format!("the Debian mirror is not reachable: {why}")))?;

    say(&format!(
        "building L1 (Debian {} from the host's mirror; about 80 s) into {}",
        options.suite,
        l1_dir.display()
    ));
    let started = Instant::now();
    build_l1(options, &mirror, &l1_dir)?;
    fs::write(&stamp_path, &stamp).map_err(io_context(format!("writing {}", stamp_path.display())))?;
    let took = started.elapsed();
    say(&format!("L1 built in {:.0} s", took.as_secs_f64()));
    Ok(Rig {
        cache_dir: options.cache_dir.clone(),
        qemu: tools.qemu,
        l1,
        origin: L1Origin::Built(took),
        tcg,
        echo: options.echo,
    })
}

/// Runs build-l1.sh into a fresh directory, then moves the result to `l1_dir`.
fn build_l1(options: &PrepareOptions, mirror: &str, l1_dir: &Path) -> Result<(), RigError> {
    let cache = &options.cache_dir;
    let recipe = cache.join("recipe");
    let partial = cache.join("l1.partial");
    for dir in [l1_dir, &partial] {
        if dir.exists() {
            fs::remove_dir_all(dir).map_err(io_context(format!("removing {}", dir.display())))?;
        }
    }
    fs::create_dir_all(&recipe).map_err(io_context(format!("creating {}", recipe.display())))?;
    let script = recipe.join("build-l1.sh");
    let init = recipe.join("l1-init.sh");
    fs::write(&script, L1_BUILD_SCRIPT).map_err(io_context("writing build-l1.sh"))?;
    fs::write(&init, L1_INIT_SCRIPT).map_err(io_context("writing l1-init.sh"))?;

    let log_path = cache.join("build.log");
    let log = File::create(&log_path).map_err(io_context(format!("creating {}", log_path.display())))?;
    let mut child = Command::new("sh")
        .arg(&script)
        .arg(&partial)
        .arg(&options.suite)
        .arg(mirror)
        .arg(&init)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone().map_err(io_context("duplicating the log handle"))?)
        .spawn()
        .map_err(io_context("starting build-l1.sh"))?;
    // Copy stdout to the log, echoing the recipe's own progress lines.
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut text = Vec::new();
    let _ = stdout.read_to_end(&mut text);
    let status = child.wait().map_err(io_context("waiting for build-l1.sh"))?;
    let mut log = log;
    let _ = log.write_all(&text);
    if options.echo {
        for line in String::from_utf8_lossy(&text).lines().filter(|line| line.starts_with("build-l1:")) {
            let _ = writeln!(io::stderr(), "rig: {line}");
        }
    }
    if !status.success() {
        let _ = fs::remove_dir_all(&partial);
        let whole = fs::read(&log_path).unwrap_or_default();
        let text = String::from_utf8_lossy(&whole);
        let tail: Vec<&str> = text.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(RigError::BuildFailed {
            reason: format!("build-l1.sh exited with {status}: {}", tail.join(" | ")),
            log: log_path,
        });
    }
    fs::rename(&partial, l1_dir).map_err(io_context(format!("moving the build to {}", l1_dir.display())))?;
    Ok(())
}

/// hv-balloon, QEMU's Dynamic Memory host device, in L2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Balloon {
    /// No hv-balloon device.
    Off,
    /// `-device hv-balloon`.
    On {
        /// `status-report=on`: QEMU emits `HV_BALLOON_STATUS_REPORT` QMP events from the guest's reports.
        status_report: bool,
        /// Memory the device may hot-add, in MiB: a memory backend of this size as its `memdev`, with `maxmem`
        /// raised to match (plus [`HV_BALLOON_ALIGNMENT_MIB`] of address space).
        hot_add_mib: Option<u32>,
    },
}

/// Guest-physical address space added to `maxmem` when hv-balloon hot-adds: QEMU places the device's memory
/// region at a 32 GiB-aligned address, which must fall inside the device memory area `maxmem` sizes (without it,
/// L2's QEMU refuses to start: "could not find position in guest address space for memory device"). Address space
/// only: no memory is allocated for it.
pub const HV_BALLOON_ALIGNMENT_MIB: u32 = 32 << 10;

/// L2's QEMU options, chosen per run by the test.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L2Options {
    /// Boot memory in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Flags appended to `-cpu host`: by default [`crate::accel::HYPERV_CPU_FLAGS`]; add e.g. `hv-vapic` or
    /// `kvm=off`.
    pub cpu_flags: Vec<String>,
    /// `-device vmbus-bridge` (QEMU's VMBus host).
    pub vmbus_bridge: bool,
    /// The hv-balloon device.
    pub balloon: Balloon,
    /// Give L2's QEMU a QMP monitor on L1's ttyS2, reachable through [`Session::qmp`].
    pub qmp: bool,
    /// More arguments for L2's QEMU, appended last (no newlines).
    pub extra_args: Vec<String>,
}

impl Default for L2Options {
    /// 512 MiB, one vCPU, the Hyper-V flags, vmbus-bridge, hv-balloon with status reports, QMP on.
    fn default() -> L2Options {
        L2Options {
            memory_mib: 512,
            cpus: 1,
            cpu_flags: crate::accel::HYPERV_CPU_FLAGS.split(',').map(str::to_owned).collect(),
            vmbus_bridge: true,
            balloon: Balloon::On { status_report: true, hot_add_mib: None },
            qmp: true,
            extra_args: Vec::new(),
        }
    }
}

impl L2Options {
    /// The most memory L2 can have (boot memory plus what hv-balloon may hot-add), in MiB.
    pub fn max_memory_mib(&self) -> u32 {
        match self.balloon {
            Balloon::On { hot_add_mib: Some(extra), .. } => self.memory_mib.saturating_add(extra),
            _ => self.memory_mib,
        }
    }

    /// L2's QEMU command line (without the program name), as l1-init.sh runs it inside L1.
    pub fn qemu_args(&self) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(|item| (*item).to_owned()));
        push(&["-nodefaults", "-machine", "q35", "-accel", "kvm", "-display", "none", "-vga", "std", "-no-reboot"]);
        let memory = match self.balloon {
            Balloon::On { hot_add_mib: Some(_), .. } => {
                format!("{}M,maxmem={}M", self.memory_mib, self.max_memory_mib() + HV_BALLOON_ALIGNMENT_MIB)
            }
            _ => format!("{}M", self.memory_mib),
        };
        let cpu =
            std::iter::once("host").chain(self.cpu_flags.iter().map(String::as_str)).collect::<Vec<_>>().join(",");
        let cpus = self.cpus.to_string();
        push(&["-m", &memory, "-smp", &cpus, "-cpu", &cpu]);
        push(&["-drive", &format!("if=pflash,format=raw,readonly=on,file={L1_OVMF_CODE}")]);
        push(&["-drive", &format!("if=pflash,format=raw,file={L1_L2_VARS}")]);
        push(&[
            "-drive",
            &format!("format=raw,file={L1_L2_IMAGE},if=none,id=boot"),
            "-device",
            "virtio-blk-pci,drive=boot",
        ]);
        push(&["-serial", "/dev/ttyS1", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
        if self.vmbus_bridge {
            push(&["-device", "vmbus-bridge"]);
        }
        if let Balloon::On { status_report, hot_add_mib } = self.balloon {
            let mut device = String::from("hv-balloon,id=balloon0");
            if status_report {
                device.push_str(",status-report=on");
            }
            if let Some(extra) = hot_add_mib {
                push(&["-object", &format!("memory-backend-ram,id=balloon-mem,size={extra}M")]);
                device.push_str(",memdev=balloon-mem");
            }
            push(&["-device", &device]);
        }
        if self.qmp {
            push(&["-chardev", "serial,id=rig-qmp,path=/dev/ttyS2", "-mon", "chardev=rig-qmp,mode=control"]);
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

/// One run's options.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// L2's QEMU options.
    pub l2: L2Options,
    /// The whole run (L1 boot, L2, L1 shutdown) is stopped after this long.
    pub time_limit: Duration,
    /// Copy L2's serial output to stdout and L1's console to stderr as they arrive.
    pub echo: bool,
    /// How many times to start the outer QEMU when it aborts; `None` chooses: 2 with the patched TCG module, 5
    /// without (about half of the unpatched runs abort).
    pub max_attempts: Option<u32>,
}

impl Default for RunOptions {
    /// Default L2 options, 300 s, echo on, attempts chosen by the TCG module.
    fn default() -> RunOptions {
        RunOptions { l2: L2Options::default(), time_limit: Duration::from_secs(300), echo: true, max_attempts: None }
    }
}

/// Why a run did not produce L2's exit status (or the test's steps failed).
#[derive(Debug)]
pub enum RunError {
    /// The run could not be started (image missing, files not writable, QEMU not startable).
    Setup(String),
    /// The outer QEMU aborted (its TCG assertion) on every attempt.
    OuterAbort {
        /// How many times it was started.
        attempts: u32,
        /// The outer QEMU's message.
        detail: String,
    },
    /// The time limit passed; `phase` says where the run was.
    Timeout {
        /// The limit.
        limit: Duration,
        /// Which phase had been reached (from L1's console).
        phase: String,
        /// The end of L2's serial log.
        l2_tail: String,
    },
    /// L1 could not run L2 (e.g. kvm_amd did not load), or ended without saying how L2 ended.
    L1Failure {
        /// L1's reason.
        reason: String,
        /// The end of L1's console.
        l1_tail: String,
    },
    /// L2 ended with another status than the test expected.
    L2Status {
        /// What the test expected.
        expected: Exit,
        /// How L2 ended.
        actual: Exit,
        /// The end of L2's serial log.
        l2_tail: String,
    },
    /// L2 reset inside its firmware, before OVMF started the image's boot loader.
    L2FirmwareReset {
        /// The end of L2's serial log.
        l2_tail: String,
    },
    /// A QMP exchange failed.
    Qmp(QmpError),
    /// A step of the test failed (e.g. a line never appeared on L2's serial port).
    Step(String),
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Setup(why) => write!(f, "rig run could not start: {why}"),
            RunError::OuterAbort { attempts, detail } => {
                write!(f, "outer QEMU aborted (TCG assertion) on all {attempts} attempts: {detail}")
            }
            RunError::Timeout { limit, phase, l2_tail } => {
                write!(
                    f,
                    "rig run timed out after {} s while {phase}; L2's serial log ended with:\n{l2_tail}",
                    limit.as_secs()
                )
            }
            RunError::L1Failure { reason, l1_tail } => {
                write!(f, "L1 failure: {reason}; L1's console ended with:\n{l1_tail}")
            }
            RunError::L2Status { expected, actual, l2_tail } => {
                write!(f, "L2 ended with {actual:?}, expected {expected:?}; its serial log ended with:\n{l2_tail}")
            }
            RunError::L2FirmwareReset { l2_tail } => write!(
                f,
                "L2 reset inside its firmware before OVMF started the image (no {OVMF_STARTS_IMAGE:?} on its serial \
                 port); L2's serial log ended with:\n{l2_tail}"
            ),
            RunError::Qmp(error) => write!(f, "{error}"),
            RunError::Step(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for RunError {}

impl From<QmpError> for RunError {
    fn from(error: QmpError) -> RunError {
        RunError::Qmp(error)
    }
}

/// What a successful run (L2 started and ended) produced.
#[derive(Debug)]
pub struct RunReport<T> {
    /// What the test's closure returned.
    pub value: T,
    /// How L2 ended, decoded as [`crate::qemu::run`] decodes a direct run.
    pub l2_exit: Exit,
    /// L2's QEMU exit status as L1 reported it.
    pub l2_status: i32,
    /// L2's serial log (carriage returns removed).
    pub l2_serial: String,
    /// L1's console.
    pub l1_console: String,
    /// Every QMP line sent (`-> `) and received (`<- `).
    pub qmp_transcript: Vec<String>,
    /// How many times the outer QEMU was started (more than 1 after aborts).
    pub attempts: u32,
    /// Wall time of the last attempt.
    pub duration: Duration,
    /// From the outer QEMU's start until L1 started L2.
    pub l1_boot: Option<Duration>,
    /// From the outer QEMU's start until L2's first serial output.
    pub l2_first_output: Option<Duration>,
}

impl<T> RunReport<T> {
    /// `Ok` if L2 ended as `expected`, else [`RunError::L2Status`].
    pub fn expect_exit(&self, expected: Exit) -> Result<(), RunError> {
        if self.l2_exit == expected {
            Ok(())
        } else {
            Err(RunError::L2Status { expected, actual: self.l2_exit.clone(), l2_tail: tail(&self.l2_serial, 20) })
        }
    }
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A growing byte log shared between a reader thread and the test, with a wake-up on each change.
#[derive(Default)]
struct SharedLog {
    state: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    bytes: Vec<u8>,
    closed: bool,
    first_output: Option<Instant>,
}

impl SharedLog {
    fn append(&self, chunk: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.first_output.get_or_insert_with(Instant::now);
        state.bytes.extend_from_slice(chunk);
        self.changed.notify_all();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).closed = true;
        self.changed.notify_all();
    }

    fn text(&self) -> String {
        let state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        String::from_utf8_lossy(&state.bytes).replace('\r', "")
    }

    fn first_output(&self) -> Option<Instant> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).first_output
    }

    /// Waits until `needle` is in the log (returns the line holding it), the log closes, or `deadline`.
    fn wait_for(&self, needle: &str, deadline: Instant) -> Result<String, &'static str> {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            let text = String::from_utf8_lossy(&state.bytes);
            if let Some(line) = text.lines().find(|line| line.contains(needle)) {
                return Ok(line.trim_end_matches('\r').to_owned());
            }
            if state.closed {
                return Err("the log ended");
            }
            let now = Instant::now();
            if now >= deadline {
                return Err("timed out");
            }
            state = self.changed.wait_timeout(state, deadline - now).unwrap_or_else(|poisoned| poisoned.into_inner()).0;
        }
    }
}

/// The test's handle on a running L2: its serial log so far and its QMP monitor.
pub struct Session {
    l2_serial: Arc<SharedLog>,
    qmp_stream: Option<UnixStream>,
    qmp: Option<Qmp>,
    transcript: Arc<Mutex<Vec<String>>>,
    deadline: Instant,
}

impl Session {
    /// L2's serial output so far.
    pub fn serial(&self) -> String {
        self.l2_serial.text()
    }

    /// Time left before the run's time limit.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// Waits up to `timeout` (and at most until the run's time limit) for a serial line containing `needle`;
    /// returns that line.
    pub fn wait_for_serial(&self, needle: &str, timeout: Duration) -> Result<String, RunError> {
        let deadline = (Instant::now() + timeout).min(self.deadline);
        self.l2_serial
            .wait_for(needle, deadline)
            .map_err(|why| RunError::Step(format!("waiting for {needle:?} on L2's serial port: {why}")))
    }

    /// L2's QMP monitor, in command mode (the first call waits for L2's QEMU to greet, up to the time limit).
    /// Fails if the run's [`L2Options::qmp`] is off.
    pub fn qmp(&mut self) -> Result<&mut Qmp, RunError> {
        if self.qmp.is_none() {
            let stream = self
                .qmp_stream
                .take()
                .ok_or_else(|| RunError::Step("this run has no QMP monitor (L2Options::qmp is off)".into()))?;
            let mut qmp = Qmp::new(stream, Arc::clone(&self.transcript))
                .map_err(|error| RunError::Setup(format!("QMP socket: {error}")))?;
            qmp.handshake(self.remaining())?;
            self.qmp = Some(qmp);
        }
        Ok(self.qmp.as_mut().expect("set above"))
    }
}

/// Kills the outer QEMU if a run is abandoned (a panicking test), so no QEMU outlives its test.
struct OuterGuard {
    child: Child,
}

impl Drop for OuterGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How one start of the outer QEMU ended.
enum AttemptEnd {
    Aborted(String),
    TimedOut,
    L1Failed(String),
    L2Exited(i32),
}

const ARGUMENT_FILE_BLOCK: usize = 64 << 10;

/// A per-run scratch directory (short, for unix socket paths), removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> io::Result<ScratchDir> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hv-rig-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        fs::create_dir_all(&dir)?;
        Ok(ScratchDir(dir))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The argument file L1 reads from /dev/vdc: one argument per line, padded with newlines to whole 64 KiB (at
/// least 16 KiB keeps L1's partition scan from reading past the end of the disk).
pub fn l2_argument_file(args: &[String]) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    for arg in args {
        if arg.is_empty() || arg.contains(['\n', '\r', '\0']) {
            return Err(format!("L2 argument {arg:?} is empty or has a line break"));
        }
        bytes.extend_from_slice(arg.as_bytes());
        bytes.push(b'\n');
    }
    let padded = bytes.len().div_ceil(ARGUMENT_FILE_BLOCK).max(1) * ARGUMENT_FILE_BLOCK;
    bytes.resize(padded, b'\n');
    Ok(bytes)
}

impl Rig {
    /// The cache directory in use.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Boots `image` as L2 and waits for it to end; see [`Rig::run_with`].
    pub fn run(&self, image: &Path, options: &RunOptions) -> Result<RunReport<()>, RunError> {
        self.run_with(image, options, |_| Ok(()))
    }

    /// Boots `image` as L2 and, while it runs, calls `steps` with a [`Session`] (serial log, QMP); then waits
    /// for L2 to end. If the outer QEMU aborts, the whole attempt, `steps` included, is repeated (up to
    /// [`RunOptions::max_attempts`]), saying so on stderr. Returns L2's exit and logs, or why the run failed:
    /// an outer abort, the time limit, an L1 failure, or the first error `steps` returned.
    pub fn run_with<T>(
        &self,
        image: &Path,
        options: &RunOptions,
        mut steps: impl FnMut(&mut Session) -> Result<T, RunError>,
    ) -> Result<RunReport<T>, RunError> {
        if !image.is_file() {
            return Err(RunError::Setup(format!("no image at {}", image.display())));
        }
        let image = image.canonicalize().map_err(|error| RunError::Setup(format!("{}: {error}", image.display())))?;
        let args = l2_argument_file(&options.l2.qemu_args()).map_err(RunError::Setup)?;
        let max_attempts = options.max_attempts.unwrap_or(match self.tcg {
            TcgModule::Patched { .. } => 2,
            TcgModule::Unpatched { .. } => 5,
        });
        let _lock = CacheLock::acquire(&self.cache_dir).map_err(|error| RunError::Setup(error.to_string()))?;
        self.note(&format!("outer QEMU uses the {}", self.tcg.describe()));
        let mut aborts = Vec::new();
        for attempt in 1..=max_attempts.max(1) {
            let scratch =
                ScratchDir::create().map_err(|error| RunError::Setup(format!("scratch directory: {error}")))?;
            let outcome = self.attempt(&image, &args, options, &scratch.0, &mut steps)?;
            match outcome {
                AttemptOutcome::Aborted(detail) => {
                    self.note(&format!("the outer QEMU aborted on attempt {attempt} of {max_attempts} ({detail})"));
                    aborts.push(detail);
                    if attempt < max_attempts {
                        self.note("retrying the whole run");
                    }
                }
                AttemptOutcome::Retryable(error) => {
                    self.note(&format!("attempt {attempt} of {max_attempts} failed in the emulation layer: {error}"));
                    if attempt == max_attempts.max(1) {
                        return Err(error);
                    }
                    self.note("retrying the whole run");
                }
                AttemptOutcome::Done(report) => {
                    let mut report = *report;
                    report.attempts = attempt;
                    return Ok(report);
                }
            }
        }
        Err(RunError::OuterAbort { attempts: max_attempts.max(1), detail: aborts.pop().unwrap_or_default() })
    }

    fn note(&self, message: &str) {
        if self.echo {
            let _ = writeln!(io::stderr(), "rig: {message}");
        }
    }

    /// The outer QEMU's arguments for one attempt.
    fn outer_args(
        &self,
        image: &Path,
        args_file: &Path,
        l1_log: &Path,
        qmp_socket: &Path,
        l2: &L2Options,
    ) -> Vec<String> {
        let path = |path: &Path| path.display().to_string();
        // L1 holds L2's memory, a copy of L2's image in tmpfs, and its own ~300 MB; TCG allocates lazily.
        let l1_memory = (u64::from(l2.max_memory_mib()) + 1536).max(4096);
        let mut args: Vec<String> = [
            "-nodefaults",
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-display",
            "none",
            "-no-reboot",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(["-m".into(), format!("{l1_memory}M")]);
        args.extend(["-kernel".into(), path(&self.l1.kernel), "-initrd".into(), path(&self.l1.initrd)]);
        args.extend(["-append".into(), L1_CMDLINE.into()]);
        // In this order they become L1's /dev/vda, /dev/vdb and /dev/vdc.
        for file in [self.l1.root.as_path(), image, args_file] {
            args.extend(["-drive".into(), format!("file={},format=raw,if=virtio,readonly=on", path(file))]);
        }
        args.extend([
            "-chardev".into(),
            format!("file,id=l1-console,path={}", path(l1_log)),
            "-serial".into(),
            "chardev:l1-console".into(),
            "-chardev".into(),
            "stdio,id=l2-serial,signal=off".into(),
            "-serial".into(),
            "chardev:l2-serial".into(),
            "-chardev".into(),
            format!("socket,id=l2-qmp,path={},server=on,wait=off", path(qmp_socket)),
            "-serial".into(),
            "chardev:l2-qmp".into(),
            "-device".into(),
            "isa-debug-exit,iobase=0xf4,iosize=0x04".into(),
        ]);
        args
    }

    fn attempt<T>(
        &self,
        image: &Path,
        args: &[u8],
        options: &RunOptions,
        scratch: &Path,
        steps: &mut impl FnMut(&mut Session) -> Result<T, RunError>,
    ) -> Result<AttemptOutcome<T>, RunError> {
        let args_file = scratch.join("l2-args");
        let l1_log = scratch.join("l1-console.log");
        let qmp_socket = scratch.join("qmp.sock");
        fs::write(&args_file, args).map_err(setup_error("writing L2's argument file"))?;
        File::create(&l1_log).map_err(setup_error("creating L1's console log"))?;

        let mut command = Command::new(&self.qemu);
        command
            .args(self.outer_args(image, &args_file, &l1_log, &qmp_socket, &options.l2))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        match &self.tcg {
            TcgModule::Patched { dir, .. } => command.env("QEMU_MODULE_DIR", dir),
            TcgModule::Unpatched { .. } => command.env_remove("QEMU_MODULE_DIR"),
        };
        let started = Instant::now();
        let deadline = started + options.time_limit;
        let child = command.spawn().map_err(setup_error(format!("starting {}", self.qemu.display())))?;
        let mut outer = OuterGuard { child };

        // L2's serial port: the outer QEMU's stdout.
        let l2_serial = Arc::new(SharedLog::default());
        let serial_thread = {
            let log = Arc::clone(&l2_serial);
            let mut stdout = outer.child.stdout.take().expect("stdout is piped");
            let echo = options.echo;
            thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(count) = stdout.read(&mut buffer) {
                    if count == 0 {
                        break;
                    }
                    if echo {
                        let mut out = io::stdout().lock();
                        let _ = out.write_all(&buffer[..count]);
                        let _ = out.flush();
                    }
                    log.append(&buffer[..count]);
                }
                log.close();
            })
        };
        let stderr_thread = {
            let mut stderr = outer.child.stderr.take().expect("stderr is piped");
            thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                text
            })
        };
        let exited = Arc::new(AtomicBool::new(false));
        let l1_console = Arc::new(SharedLog::default());
        let console_thread =
            tail_l1_console(l1_log.clone(), Arc::clone(&l1_console), Arc::clone(&exited), options.echo);
        // Stops the console thread however this function is left (an error, a panicking step).
        let _stop_console = SetOnDrop(Arc::clone(&exited));

        // The QMP socket appears as soon as the outer QEMU has parsed its options; connect before L2 starts so
        // that its greeting is not lost.
        let qmp_stream =
            if options.l2.qmp { Some(connect_qmp(&qmp_socket, &mut outer.child, deadline)?) } else { None };
        let transcript = Arc::new(Mutex::new(Vec::new()));
        let mut session = Session {
            l2_serial: Arc::clone(&l2_serial),
            qmp_stream,
            qmp: None,
            transcript: Arc::clone(&transcript),
            deadline,
        };
        let step_result = steps(&mut session);
        drop(session);

        // Wait for the outer QEMU to end (L1 powers off after L2 exits), or the time limit; after a failed step,
        // only for a short grace.
        let wait_until =
            if step_result.is_err() { deadline.min(Instant::now() + STEP_FAILURE_GRACE) } else { deadline };
        let status = loop {
            match outer.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= wait_until => {
                    let _ = outer.child.kill();
                    let _ = outer.child.wait();
                    break None;
                }
                Ok(None) => thread::sleep(Duration::from_millis(50)),
                Err(error) => {
                    return Err(RunError::Setup(format!("waiting for the outer QEMU: {error}")));
                }
            }
        };
        let duration = started.elapsed();
        exited.store(true, Ordering::SeqCst);
        let _ = serial_thread.join();
        let stderr = stderr_thread.join().unwrap_or_default();
        let l2_started = console_thread.join().ok().flatten();
        let console = l1_console.text();
        let serial = l2_serial.text();
        self.keep_last_run(&console, &serial, &stderr, &transcript.lock().unwrap_or_else(|p| p.into_inner()));

        let end = classify_attempt(status, &stderr, &console);
        match end {
            AttemptEnd::Aborted(detail) => Ok(AttemptOutcome::Aborted(detail)),
            AttemptEnd::TimedOut => match step_result {
                // The run was stopped because a step failed: that failure is the reason.
                Err(step_error) if Instant::now() < deadline => Err(step_error),
                Err(step_error) => Err(RunError::Timeout {
                    limit: options.time_limit,
                    phase: format!("{} (a step had failed: {step_error})", phase_reached(&console, &serial)),
                    l2_tail: tail(&serial, 20),
                }),
                Ok(_) => Err(RunError::Timeout {
                    limit: options.time_limit,
                    phase: phase_reached(&console, &serial),
                    l2_tail: tail(&serial, 20),
                }),
            },
            // L1's Linux dying in the middle of a run is the emulation layer failing (the outer TCG runs L1's
            // interrupts by software), like the outer abort: worth another attempt. A crash before L1 started
            // L2 (a broken L1 image) is not.
            AttemptEnd::L1Failed(reason)
                if reason.starts_with(L1_PANIC_PREFIX) && console.contains("rig-l1: starting L2") =>
            {
                Ok(AttemptOutcome::Retryable(RunError::L1Failure { reason, l1_tail: tail(&console, 20) }))
            }
            AttemptEnd::L1Failed(reason) => Err(RunError::L1Failure { reason, l1_tail: tail(&console, 20) }),
            // L2's QEMU ends with status 0 when its guest resets (`-no-reboot`). Before OVMF started the boot
            // option the image has not run a single instruction, so such a reset is the nested emulation failing
            // (seen once in about forty runs), not the image: worth another attempt.
            AttemptEnd::L2Exited(l2_status) if reset_in_firmware(l2_status, &serial) => {
                Ok(AttemptOutcome::Retryable(RunError::L2FirmwareReset { l2_tail: tail(&serial, 20) }))
            }
            AttemptEnd::L2Exited(l2_status) => {
                let value = step_result?;
                let l2_exit = Exit::from_status(ExitStatus::from_raw((l2_status & 0xff) << 8));
                let since_start = |at: Option<Instant>| at.map(|at| at.duration_since(started));
                let l1_boot = since_start(l2_started);
                let l2_first_output = since_start(l2_serial.first_output());
                self.note(&format!(
                    "L2 ended with {l2_exit:?} (status {l2_status}); the run took {:.1} s \
                     (L1 started L2 at {}, L2's first output at {})",
                    duration.as_secs_f64(),
                    seconds(l1_boot),
                    seconds(l2_first_output),
                ));
                Ok(AttemptOutcome::Done(Box::new(RunReport {
                    value,
                    l2_exit,
                    l2_status,
                    l2_serial: serial,
                    l1_console: console,
                    qmp_transcript: transcript.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                    attempts: 1,
                    duration,
                    l1_boot,
                    l2_first_output,
                })))
            }
        }
    }

    /// Keeps the last run's logs in `<cache>/last-run/` for inspection after a failure.
    fn keep_last_run(&self, console: &str, serial: &str, stderr: &str, transcript: &[String]) {
        let dir = self.cache_dir.join("last-run");
        if fs::create_dir_all(&dir).is_ok() {
            let _ = fs::write(dir.join("l1-console.log"), console);
            let _ = fs::write(dir.join("l2-serial.log"), serial);
            let _ = fs::write(dir.join("outer-qemu-stderr.log"), stderr);
            let _ = fs::write(dir.join("qmp-transcript.log"), transcript.join("\n") + "\n");
        }
    }
}

fn setup_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> RunError {
    let what = what.into();
    move |error| RunError::Setup(format!("{what}: {error}"))
}

/// Sets a flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// After a step of the test fails, how long the outer QEMU may take to end by itself (an abort that caused the
/// failure is then still seen and retried) before the run is stopped.
const STEP_FAILURE_GRACE: Duration = Duration::from_secs(15);

enum AttemptOutcome<T> {
    Aborted(String),
    /// The emulation layer failed (L1's kernel panicked while L2 ran, or L2 reset inside its firmware); retried,
    /// and reported as the run's error if it was the last attempt.
    Retryable(RunError),
    Done(Box<RunReport<T>>),
}

/// Connects to the outer QEMU's QMP socket server, waiting for it to appear.
fn connect_qmp(socket: &Path, child: &mut Child, deadline: Instant) -> Result<UnixStream, RunError> {
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(error) => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(RunError::Setup(format!("the outer QEMU exited at start ({status})")));
                }
                if Instant::now() >= deadline {
                    return Err(RunError::Setup(format!("QMP socket {}: {error}", socket.display())));
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Follows L1's console log file until the outer QEMU has exited and the file is drained; echoes its lines to
/// stderr (prefixed `[L1] `) and returns when L1 reported starting L2.
fn tail_l1_console(
    path: PathBuf,
    log: Arc<SharedLog>,
    exited: Arc<AtomicBool>,
    echo: bool,
) -> JoinHandle<Option<Instant>> {
    thread::spawn(move || {
        let mut l2_started = None;
        let Ok(mut file) = File::open(&path) else {
            log.close();
            return None;
        };
        let mut pending = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let done = exited.load(Ordering::SeqCst);
            let count = file.read(&mut buffer).unwrap_or(0);
            if count == 0 {
                if done {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            log.append(&buffer[..count]);
            pending.extend_from_slice(&buffer[..count]);
            while let Some(end) = pending.iter().position(|&byte| byte == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim_end();
                if l2_started.is_none() && line.starts_with("rig-l1: starting L2") {
                    l2_started = Some(Instant::now());
                }
                if echo {
                    let _ = writeln!(io::stderr(), "[L1] {line}");
                }
            }
        }
        log.close();
        l2_started
    })
}

/// What OVMF prints on the serial port as it hands over to a boot option (the image's UEFI boot loader).
const OVMF_STARTS_IMAGE: &str = "BdsDxe: starting ";

/// Whether L2 ended by a reset (status 0 under `-no-reboot`) before OVMF handed over to the image.
fn reset_in_firmware(l2_status: i32, serial: &str) -> bool {
    l2_status == 0 && !serial.contains(OVMF_STARTS_IMAGE)
}

/// Decides how an attempt ended, from the outer QEMU's status (`None`: killed at the time limit), its stderr
/// and L1's console.
/// How [`classify_attempt`] starts the reason of an L1 whose Linux kernel panicked.
const L1_PANIC_PREFIX: &str = "L1's kernel panicked: ";

fn classify_attempt(status: Option<ExitStatus>, stderr: &str, console: &str) -> AttemptEnd {
    let Some(status) = status else {
        return AttemptEnd::TimedOut;
    };
    let assertion = stderr.lines().find(|line| line.contains("assertion failed")).map(str::trim);
    if status.signal() == Some(6) || status.code() == Some(134) {
        return AttemptEnd::Aborted(assertion.unwrap_or("SIGABRT").to_owned());
    }
    let marker =
        |prefix: &str| console.lines().find_map(|line| line.trim_end().strip_prefix(prefix).map(str::to_owned));
    if let Some(reason) = marker("rig-l1: fail: ") {
        return AttemptEnd::L1Failed(reason);
    }
    if let Some(status) = marker("rig-l1: l2-exit=").and_then(|value| value.trim().parse().ok()) {
        return AttemptEnd::L2Exited(status);
    }
    let last_stderr = stderr.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or("").trim();
    let l1_panic = console.lines().find(|line| line.contains("Kernel panic")).map(str::trim);
    let reason = match (l1_panic, last_stderr) {
        (Some(panic), _) => format!("{L1_PANIC_PREFIX}{panic}"),
        (None, "") => format!("L1 ended without reporting L2's exit (outer QEMU {status})"),
        (None, message) => {
            format!("L1 ended without reporting L2's exit (outer QEMU {status}: {message})")
        }
    };
    AttemptEnd::L1Failed(reason)
}

/// Where a run had got to, from L1's console and L2's serial log, for timeout messages.
fn phase_reached(console: &str, serial: &str) -> String {
    if console.contains("rig-l1: starting L2") {
        if serial.is_empty() { "L2 was starting (no serial output yet)".into() } else { "L2 was running".into() }
    } else if console.contains("rig-l1: kvm ready") {
        "L1 was preparing L2".into()
    } else if console.contains("rig-l1: init started") {
        "L1 was loading kvm_amd".into()
    } else {
        "L1 was booting".into()
    }
}

/// What `cargo vm rig` does: prepares the rig (building L1 if needed), then, given an `image`, boots it as L2 with
/// `options`. Exit code: 0 when L2 ended with the kernel's success status or a clean power-off (or, without an
/// image, when the rig is ready), 1 when L2 ended otherwise, 2 when the rig failed (build, outer abort, timeout,
/// L1 failure), 77 when the rig is unavailable here.
pub fn run_cli(image: Option<&Path>, options: &RunOptions) -> std::process::ExitCode {
    use std::process::ExitCode;
    let rig = match prepare(&PrepareOptions::from_env()) {
        Ok(rig) => rig,
        Err(error @ RigError::Unavailable(_)) => {
            eprintln!("rig: {error}");
            return ExitCode::from(77);
        }
        Err(error) => {
            eprintln!("rig: {error}");
            return ExitCode::from(2);
        }
    };
    match &rig.origin {
        L1Origin::Cached => {
            eprintln!("rig: L1 is cached in {}", rig.l1.root.parent().unwrap_or(Path::new("")).display())
        }
        // prepare() has said so.
        L1Origin::Built(_) => {}
    }
    let Some(image) = image else {
        eprintln!("rig: ready; the outer QEMU will use the {}", rig.tcg.describe());
        return ExitCode::SUCCESS;
    };
    match rig.run(image, options) {
        Ok(report) => {
            eprintln!("rig: {} attempt(s)", report.attempts);
            match report.l2_exit {
                Exit::GuestSuccess | Exit::Qemu(0) => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            }
        }
        Err(error) => {
            eprintln!("rig: {error}");
            ExitCode::from(2)
        }
    }
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(|| "-".to_owned(), |duration| format!("{:.1} s", duration.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32) -> Option<ExitStatus> {
        Some(ExitStatus::from_raw(code << 8))
    }

    #[test]
    fn default_l2_arguments_have_the_vmbus_host_and_hyperv_cpu() {
        let args = L2Options::default().qemu_args().join(" ");
        assert!(args.contains("-accel kvm"));
        assert!(args.contains(&format!("-cpu host,{}", crate::accel::HYPERV_CPU_FLAGS)));
        assert!(args.contains("-device vmbus-bridge"));
        assert!(args.contains("-device hv-balloon,id=balloon0,status-report=on"));
        assert!(args.contains("-m 512M "));
        assert!(args.contains("-serial /dev/ttyS1"));
        assert!(args.contains("-chardev serial,id=rig-qmp,path=/dev/ttyS2 -mon chardev=rig-qmp,mode=control"));
        assert!(args.contains("isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(args.contains(&format!("file={L1_L2_IMAGE}")));
    }

    #[test]
    fn l2_options_change_the_arguments() {
        let mut options = L2Options {
            memory_mib: 1024,
            balloon: Balloon::On { status_report: false, hot_add_mib: Some(2048) },
            qmp: false,
            vmbus_bridge: false,
            extra_args: vec!["-trace".into(), "vmbus*".into()],
            ..L2Options::default()
        };
        options.cpu_flags.push("hv-vapic".into());
        options.cpu_flags.push("kvm=off".into());
        let args = options.qemu_args();
        let text = args.join(" ");
        assert!(text.contains("-m 1024M,maxmem=35840M"), "{text}");
        assert!(text.contains("-object memory-backend-ram,id=balloon-mem,size=2048M"));
        assert!(text.contains("-device hv-balloon,id=balloon0,memdev=balloon-mem"));
        assert!(text.contains(",hv-vapic,kvm=off"));
        assert!(!text.contains("vmbus-bridge") && !text.contains("status-report") && !text.contains("-mon"));
        assert_eq!(args[args.len() - 2..], ["-trace".to_owned(), "vmbus*".to_owned()]);
        assert_eq!(options.max_memory_mib(), 3072);

        let off = L2Options { balloon: Balloon::Off, ..L2Options::default() }.qemu_args().join(" ");
        assert!(!off.contains("hv-balloon"));
    }

    #[test]
    fn argument_file_is_line_per_argument_and_padded() {
        let file = l2_argument_file(&["-m".into(), "512M".into()]).unwrap();
        assert_eq!(file.len(), ARGUMENT_FILE_BLOCK);
        assert!(file.starts_with(b"-m\n512M\n\n"));
        assert!(file[8..].iter().all(|&byte| byte == b'\n'));
        let long: Vec<String> = (0..1000).map(|index| format!("arg{index}")).collect();
        assert_eq!(l2_argument_file(&long).unwrap().len() % ARGUMENT_FILE_BLOCK, 0);
        assert!(l2_argument_file(&["a\nb".into()]).is_err());
        assert!(l2_argument_file(&[String::new()]).is_err());
    }

    #[test]
    fn attempts_are_classified_by_layer() {
        let abort = classify_attempt(
            Some(ExitStatus::from_raw(6)),
            "**\nERROR:../../accel/tcg/tcg-accel-ops.c:81:tcg_handle_interrupt: assertion failed: (x)\n",
            "rig-l1: starting L2",
        );
        assert!(matches!(abort, AttemptEnd::Aborted(detail) if detail.contains("tcg_handle_interrupt")));
        assert!(matches!(classify_attempt(status(134), "", ""), AttemptEnd::Aborted(_)));
        assert!(matches!(classify_attempt(None, "", ""), AttemptEnd::TimedOut));
        let no_kvm = classify_attempt(status(255), "", "rig-l1: init\nrig-l1: fail: modprobe kvm_amd failed\n");
        assert!(matches!(no_kvm, AttemptEnd::L1Failed(reason) if reason == "modprobe kvm_amd failed"));
        let l2 = classify_attempt(status(33), "", "rig-l1: L2 exited (at 30s)\nrig-l1: l2-exit=33\n");
        assert!(matches!(l2, AttemptEnd::L2Exited(33)));
        let even = classify_attempt(status(255), "", "rig-l1: l2-exit=0\n");
        assert!(matches!(even, AttemptEnd::L2Exited(0)));
        let panic = classify_attempt(status(0), "", "[ 3.1] Kernel panic - not syncing: VFS: Unable to mount root\n");
        assert!(matches!(panic, AttemptEnd::L1Failed(reason) if reason.contains("Unable to mount root")));
        let silent = classify_attempt(status(1), "qemu: could not open file\n", "");
        assert!(matches!(silent, AttemptEnd::L1Failed(reason) if reason.contains("could not open file")));
    }

    #[test]
    fn only_a_reset_before_the_image_started_is_a_firmware_reset() {
        // L2's serial log of the CI run that reset in OVMF: screen clears, no boot option started.
        let firmware = "\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J\x1b[01;01H\x1b[2J\x1b[01;01H";
        assert!(reset_in_firmware(0, firmware));
        let started = "BdsDxe: loading Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0)\n\
                       BdsDxe: starting Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x2,0x0)\n";
        assert!(!reset_in_firmware(0, started), "a reset once the image ran is the image's");
        assert!(!reset_in_firmware(33, firmware), "an isa-debug-exit status is the image's");
        assert!(!reset_in_firmware(35, ""));
    }

    #[test]
    fn timeouts_name_the_phase() {
        assert_eq!(phase_reached("", ""), "L1 was booting");
        assert_eq!(phase_reached("rig-l1: init started", ""), "L1 was loading kvm_amd");
        assert_eq!(
            phase_reached("rig-l1: kvm ready\nrig-l1: starting L2", ""),
            "L2 was starting (no serial output yet)"
        );
        assert_eq!(phase_reached("rig-l1: starting L2", "hv-unikernel"), "L2 was running");
    }

    #[test]
    fn the_stamp_changes_with_suite_and_recipe() {
        let trixie = l1_stamp("trixie").unwrap();
        assert_ne!(trixie, l1_stamp("forky").unwrap());
        assert!(trixie.contains(&host::sha256_hex(L1_INIT_SCRIPT.as_bytes()).unwrap()));
        assert!(trixie.contains(&host::sha256_hex(L1_BUILD_SCRIPT.as_bytes()).unwrap()));
    }

    #[test]
    fn shared_log_waits_for_a_line_or_its_end() {
        let log = Arc::new(SharedLog::default());
        let writer = {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                log.append(b"first li");
                thread::sleep(Duration::from_millis(20));
                log.append(b"ne\r\nhypervisor: \"Microsoft Hv\"\r\n");
                log.close();
            })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(log.wait_for("Microsoft Hv", deadline).unwrap(), "hypervisor: \"Microsoft Hv\"");
        writer.join().unwrap();
        assert_eq!(log.wait_for("never", deadline), Err("the log ended"));
        assert_eq!(log.text(), "first line\nhypervisor: \"Microsoft Hv\"\n");
        let open = SharedLog::default();
        assert_eq!(open.wait_for("x", Instant::now() + Duration::from_millis(10)), Err("timed out"));
    }
}
