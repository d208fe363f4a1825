//! Chooses QEMU's accelerator.
//!
//! KVM is used only where it can really run a guest *and* offers Hyper-V SynIC (`KVM_CAP_HYPERV_SYNIC2`); then QEMU
//! gets the Hyper-V enlightenments and its VMBus host. The probe runs a one-instruction guest rather than trusting
//! that `/dev/kvm` exists: some machines (this project's CI among them) have a paravirtual `/dev/kvm` that opens and
//! creates VMs but fails on the first instruction of an ordinary guest.
//!
//! UNSAFETY: registering guest memory with KVM is `unsafe` (KVM writes through the host pointer); it is confined to
//! [`run_probe_guest`].

use kvm_ioctls::{Cap, Kvm, VcpuExit};
use std::sync::mpsc;
use std::time::Duration;

/// The `-cpu` flags that expose the Hyper-V interface under KVM.
pub const HYPERV_CPU_FLAGS: &str = "hv-relaxed,hv-vpindex,hv-synic,hv-time,hv-stimer,hv-runtime,hv-frequencies";

/// The accelerator a run uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM with Hyper-V enlightenments and `-device vmbus-bridge`.
    Kvm,
    /// QEMU's TCG emulator; `reason` says why KVM was not used.
    Tcg {
        /// One line for the user.
        reason: String,
    },
}

impl Accel {
    /// Probes this machine's `/dev/kvm`.
    pub fn probe() -> Accel {
        match probe_kvm() {
            Ok(()) => Accel::Kvm,
            Err(reason) => Accel::Tcg { reason },
        }
    }

    /// TCG by request.
    pub fn tcg(reason: &str) -> Accel {
        Accel::Tcg { reason: reason.to_string() }
    }

    /// The QEMU arguments for this accelerator (`-accel`, `-cpu` and, under KVM, the VMBus host).
    pub fn qemu_args(&self) -> Vec<String> {
        match self {
            Accel::Kvm => vec![
                "-accel".into(),
                "kvm".into(),
                "-cpu".into(),
                format!("host,{HYPERV_CPU_FLAGS}"),
                "-device".into(),
                "vmbus-bridge".into(),
            ],
            Accel::Tcg { .. } => vec!["-accel".into(), "tcg".into(), "-cpu".into(), "max".into()],
        }
    }
}

/// Checks that KVM can run a guest and offers Hyper-V SynIC; the error says why not, in one line.
pub fn probe_kvm() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm cannot be opened ({e})"))?;
    // A broken KVM may also hang rather than fail: give the probe guest a few seconds.
    let (tx, rx) = mpsc::channel();
    let has_synic = kvm.check_extension(Cap::HypervSynic2);
    std::thread::spawn(move || {
        let _ = tx.send(run_probe_guest(&kvm));
    });
    match rx.recv_timeout(Duration::from_secs(5)) {
        Ok(result) => result?,
        Err(_) => return Err("a KVM probe guest did not halt within 5 s".into()),
    }
    if !has_synic {
        return Err("KVM runs guests but lacks Hyper-V SynIC (KVM_CAP_HYPERV_SYNIC2)".into());
    }
    Ok(())
}

/// Runs a guest whose first instruction (at the reset vector) is `hlt` and expects it to halt.
fn run_probe_guest(kvm: &Kvm) -> Result<(), String> {
    const PAGE: usize = 4096;
    // The reset vector is 0xFFFF_FFF0: the last 16 bytes of the page at 0xFFFF_F000.
    const PAGE_GPA: u64 = 0xFFFF_F000;
    const HLT: u8 = 0xF4;
    const PROBE_CODE: [u8; 9] = [
        0x9B, 0xDB, 0xE3, // fninit (with fwait)
        0x0F, 0xA2, // cpuid
        0x0F, 0x20, 0xC0, // mov eax, cr0
        HLT,
    ];
    let vm = kvm.create_vm().map_err(|e| format!("KVM cannot create a VM ({e})"))?;
    let mut page = Box::new(AlignedPage([HLT; PAGE]));
    // At the reset vector: what every firmware does first (`fninit`, `cpuid`, read CR0), then `hlt`. A KVM that can
    // only run trivial code fails here the way it fails on OVMF's first instructions.
    page.0[PAGE - 16..PAGE - 16 + PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: PAGE_GPA,
        memory_size: PAGE as u64,
        userspace_addr: page.0.as_mut_ptr() as u64,
    };
    // SAFETY: `page` is a page-aligned, 4 KiB host allocation owned by this function; it outlives `vm` (declared
    // earlier, dropped later), so KVM never accesses it after it is freed.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| format!("KVM rejects guest memory ({e})"))?;
    let mut vcpu = vm.create_vcpu(0).map_err(|e| format!("KVM cannot create a vCPU ({e})"))?;
    let exit = match vcpu.run() {
        Ok(VcpuExit::Hlt) => Ok(()),
        Ok(other) => Err(format!("/dev/kvm cannot run a guest (probe guest exit: {other:?})")),
        Err(e) => Err(format!("/dev/kvm cannot run a guest (KVM_RUN: {e})")),
    };
    drop(vcpu);
    drop(vm);
    drop(page);
    exit
}

#[repr(C, align(4096))]
struct AlignedPage([u8; 4096]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_args_name_the_accelerator() {
        let args = Accel::tcg("test").qemu_args();
        assert_eq!(args[..2], ["-accel", "tcg"]);
        assert!(!args.iter().any(|a| a.contains("vmbus")));
    }

    #[test]
    fn kvm_args_carry_hyperv_and_vmbus() {
        let args = Accel::Kvm.qemu_args();
        assert!(args.iter().any(|a| a.contains("hv-synic")));
        assert!(args.iter().any(|a| a == "vmbus-bridge"));
    }

    /// The probe must give a definite answer on any machine; where /dev/kvm is missing or cannot run a guest it must
    /// say so (this machine's paravirtual /dev/kvm is the case the probe exists for).
    #[test]
    fn probe_gives_a_reason_when_it_refuses() {
        match Accel::probe() {
            Accel::Kvm => assert!(std::path::Path::new("/dev/kvm").exists()),
            Accel::Tcg { reason } => {
                assert!(!reason.is_empty());
                assert!(!reason.contains('\n'), "one line: {reason}");
            }
        }
    }
}
