//! The hypercall page and the calls made through it (reference `hyperv-vmbus.md` §2–3).
//!
//! Bring-up: a zeroed frame is named in the HYPERCALL MSR (after GUEST_OS_ID, which `vmbus::hv` writes first), the MSR
//! is read back, and the frame is then mapped executable and not writable; the hypervisor has filled it with the call
//! stub (`vmcall; ret` or `vmmcall; ret`). Calls go through the stub with RCX = control, RDX/R8 = input/output GPA
//! (memory form) or the parameters themselves (fast form); RAX returns the result.
//!
//! Memory-form calls copy their input into a page-aligned input page and read their output from a page-aligned output
//! page, one pair per CPU (the kernel runs on one), used under a lock with interrupts disabled so that an interrupt
//! handler's call cannot interleave with the interrupted one.
//!
//! UNSAFETY: the `call` into the stub.

use super::cpu::SyntheticMsrs;
use super::shared_page::{OutOfFrames, SharedPage};
use crate::mm::paging::{self, PagingError};
use core::sync::atomic::{AtomicBool, Ordering};
use spin::Mutex;
use vmbus::hv::hypercall::{
    FastHypercall, HypercallCode, HypercallControl, HypercallPageError, HypercallResult, PostMessageInput,
    SignalEventInput, disable_hypercall_page, enable_hypercall_page,
};
use vmbus::hv::msr::{GuestOsId, HypercallMsr};
use vmbus::hv::synic::HvMessageType;
use vmbus::hv::{HvError, Hypercalls};
use x86_64::instructions::interrupts::without_interrupts;
use x86_64::structures::paging::{PageTableFlags, PhysFrame};
use x86_64::{PhysAddr, VirtAddr};
use zerocopy::IntoBytes;

/// Why the hypercall page could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallSetupError {
    /// No frame for the page or the input/output pages.
    OutOfFrames,
    /// The HYPERCALL MSR did not take the page (or the guest OS id was zero).
    Msr(HypercallPageError),
    /// The page could not be mapped.
    Map(PagingError),
    /// The mapping came out writable or not executable (the flags it has).
    WrongMapping(PageTableFlags),
    /// The physical-memory window's alias of the page stayed writable or executable (the flags it has).
    WritableAlias(PageTableFlags),
    /// The hypervisor left the page empty: its first 16 bytes are zero.
    EmptyStub,
}

impl From<OutOfFrames> for HypercallSetupError {
    fn from(_: OutOfFrames) -> HypercallSetupError {
        HypercallSetupError::OutOfFrames
    }
}

impl core::fmt::Display for HypercallSetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            HypercallSetupError::OutOfFrames => OutOfFrames.fmt(f),
            HypercallSetupError::Msr(e) => write!(f, "HYPERCALL MSR: {e}"),
            HypercallSetupError::Map(e) => write!(f, "mapping the hypercall page: {e}"),
            HypercallSetupError::WrongMapping(flags) => {
                write!(f, "the hypercall page is mapped with {flags:?}, not executable and read-only")
            }
            HypercallSetupError::WritableAlias(flags) => {
                write!(f, "the physical-memory window still maps the hypercall page with {flags:?}")
            }
            HypercallSetupError::EmptyStub => f.write_str("the hypervisor did not fill the hypercall page"),
        }
    }
}

/// The memory-form input and output pages (one pair: the kernel runs on one CPU).
struct IoPages {
    input: SharedPage,
    output: SharedPage,
}

/// The hypercall page, its executable mapping, and the input/output pages: the kernel's way to make hypercalls.
pub struct HypercallInterface {
    /// The frame the HYPERCALL MSR names (also readable through the physical-memory window).
    page: SharedPage,
    /// The executable, read-only mapping of `page`.
    stub: VirtAddr,
    io: Mutex<IoPages>,
    /// Whether the HYPERCALL MSR currently enables the page; calls are refused otherwise (a disabled page may read
    /// as zeros, which must never be executed).
    enabled: AtomicBool,
}

impl HypercallInterface {
    /// Writes `guest_os_id` (replacing whatever firmware left), enables the hypercall page on a fresh frame, checks
    /// the MSR, maps the page executable and read-only, and checks the hypervisor filled it.
    pub fn enable(msrs: &SyntheticMsrs, guest_os_id: GuestOsId) -> Result<HypercallInterface, HypercallSetupError> {
        let page = SharedPage::allocate()?;
        let io = IoPages { input: SharedPage::allocate()?, output: SharedPage::allocate()? };
        enable_hypercall_page(msrs, guest_os_id, page.gpfn()).map_err(HypercallSetupError::Msr)?;
        let frame = PhysFrame::containing_address(page.phys());
        let stub = paging::map_executable_readonly(frame).map_err(HypercallSetupError::Map)?;
        // The physical-memory window maps every frame writable: take that away from this one, so the page the
        // hypervisor fills can be neither written nor executed through any other address.
        paging::write_protect_physical_alias(frame).map_err(HypercallSetupError::Map)?;
        let interface = HypercallInterface { page, stub, io: Mutex::new(io), enabled: AtomicBool::new(false) };
        interface.check()?;
        interface.enabled.store(true, Ordering::Release);
        Ok(interface)
    }

    /// Checks the mapping (executable, not writable, of the page's frame) and the stub (not all zero).
    fn check(&self) -> Result<(), HypercallSetupError> {
        let (phys, flags) = paging::translate(self.stub).ok_or(HypercallSetupError::Map(PagingError::NotMapped))?;
        let executable_readonly = flags.contains(PageTableFlags::PRESENT)
            && !flags.contains(PageTableFlags::WRITABLE)
            && !flags.contains(PageTableFlags::NO_EXECUTE);
        if phys != self.page.phys() || !executable_readonly {
            return Err(HypercallSetupError::WrongMapping(flags));
        }
        let alias = crate::mm::phys_to_virt(self.page.phys());
        let (_, alias_flags) = paging::translate(alias).ok_or(HypercallSetupError::Map(PagingError::NotMapped))?;
        if alias_flags.contains(PageTableFlags::WRITABLE) || !alias_flags.contains(PageTableFlags::NO_EXECUTE) {
            return Err(HypercallSetupError::WritableAlias(alias_flags));
        }
        let words = self.page.words();
        if words[0].load(Ordering::Acquire) == 0 && words[1].load(Ordering::Acquire) == 0 {
            return Err(HypercallSetupError::EmptyStub);
        }
        Ok(())
    }

    /// Enables the page again after [`HypercallInterface::disable`] (same frame, same mapping), writing the guest OS
    /// id first.
    pub fn reenable(&self, msrs: &SyntheticMsrs, guest_os_id: GuestOsId) -> Result<(), HypercallSetupError> {
        enable_hypercall_page(msrs, guest_os_id, self.page.gpfn()).map_err(HypercallSetupError::Msr)?;
        self.check()?;
        self.enabled.store(true, Ordering::Release);
        Ok(())
    }

    /// Disables the hypercall page and clears the guest OS id (teardown before reboot or shutdown). Calls fail with
    /// HV_STATUS_INVALID_PARTITION_STATE without reaching the hypervisor until [`HypercallInterface::reenable`].
    pub fn disable(&self, msrs: &SyntheticMsrs) {
        self.enabled.store(false, Ordering::Release);
        disable_hypercall_page(msrs);
    }

    /// Whether calls are currently possible.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// The hypercall page's guest physical address.
    pub fn page_phys(&self) -> PhysAddr {
        self.page.phys()
    }

    /// Where the page is mapped for execution.
    pub fn stub_address(&self) -> VirtAddr {
        self.stub
    }

    /// The guest physical addresses of the input and output pages.
    pub fn io_pages_phys(&self) -> (PhysAddr, PhysAddr) {
        let io = self.io.lock();
        (io.input.phys(), io.output.phys())
    }

    /// Reads the HYPERCALL MSR (for reports and tests).
    pub fn msr(&self, msrs: &SyntheticMsrs) -> HypercallMsr {
        use vmbus::hv::msr::MsrAccess;
        HypercallMsr::from_bits(msrs.read_msr(vmbus::hv::msr::HYPERCALL))
    }

    /// Executes the stub with the three parameter registers; returns RAX.
    fn raw_call(&self, control: u64, rdx: u64, r8: u64) -> Result<HypercallResult, HvError> {
        if !self.is_enabled() {
            return Err(HvError::INVALID_PARTITION_STATE);
        }
        let rax: u64;
        // SAFETY: `stub` maps the hypercall page, which the HYPERCALL MSR enables (checked just above; teardown clears
        // the flag before disabling the page) and the hypervisor filled with a call stub that returns with `ret`. The
        // x64 hypercall convention returns in RAX and may change RCX, RDX and R8–R11, all declared. The hypervisor
        // reads or writes guest memory only at the GPAs given, which for memory-form calls are this interface's own
        // input and output pages, and the operands leave the stack pointer and the red zone alone (the kernel's
        // target has no red zone; `call` pushes the return address below RSP).
        unsafe {
            core::arch::asm!(
                "call {stub}",
                stub = in(reg) self.stub.as_u64(),
                inout("rcx") control => _,
                inout("rdx") rdx => _,
                inout("r8") r8 => _,
                out("rax") rax,
                out("r9") _,
                out("r10") _,
                out("r11") _,
            );
        }
        Ok(HypercallResult::from_bits(rax))
    }

    /// A memory-form hypercall: `input` is copied to the input page, the call made with both page addresses, and
    /// `output.len()` bytes copied back from the output page. Inputs or outputs larger than a page are refused with
    /// HV_STATUS_INVALID_PARAMETER. A fast control bit is cleared.
    pub fn call(&self, control: HypercallControl, input: &[u8], output: &mut [u8]) -> Result<HypercallResult, HvError> {
        without_interrupts(|| {
            let io = self.io.lock();
            io.input.write_from_start(input).ok_or(HvError::INVALID_PARAMETER)?;
            if output.len() > vmbus::hv::HV_PAGE_SIZE {
                return Err(HvError::INVALID_PARAMETER);
            }
            let control = control.with_fast(false);
            let result = self.raw_call(control.bits(), io.input.phys().as_u64(), io.output.phys().as_u64())?;
            io.output.read_into(0, output).ok_or(HvError::INVALID_PARAMETER)?;
            Ok(result)
        })
    }

    /// A fast hypercall: the parameters travel in RDX and R8.
    pub fn call_fast(&self, call: FastHypercall) -> Result<HypercallResult, HvError> {
        self.raw_call(call.control.with_fast(true).bits(), call.rdx, call.r8)
    }
}

impl Hypercalls for HypercallInterface {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> Result<(), HvError> {
        let input = PostMessageInput::new(connection_id, HvMessageType(message_type), payload)?;
        let control = HypercallControl::new(HypercallCode::POST_MESSAGE);
        self.call(control, input.as_bytes(), &mut [])?.status().into_result()
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        let registers = SignalEventInput::new(connection_id, flag).fast_registers();
        self.call_fast(registers)?.status().into_result()
    }
}
