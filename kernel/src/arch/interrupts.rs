//! The Interrupt Descriptor Table: CPU exceptions and device vectors.
//!
//! Every architecturally defined exception (vectors 0–21 and 28–30; 15, 22–27 and 31 are reserved and never
//! raised by the CPU) has a handler. All of them except `#BP` print the vector's name and number, the error code,
//! RIP (and CR2 for a page fault) through the emergency console path, which takes no lock the interrupted code may
//! hold, and end the run with [`ExitCode::Failure`]. `#BP` counts and returns, so `int3` can serve as a probe.
//!
//! Vectors 32–254 are device vectors: each has a small stub that looks its vector up in a fixed table of `fn()`
//! handlers which later code fills with [`register`] (the SynIC's VMBus and timer-message interrupts, a self-IPI
//! for a loopback bus). After the handler the stub signals end-of-interrupt to the local APIC when the vector is in
//! service there (an `int n` or an auto-EOI interrupt is not, and gets no EOI). Vector 255 is the APIC's spurious
//! vector: counted, never acknowledged.

use crate::arch::{apic, gdt};
use crate::exit::{ExitCode, exit};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use spin::Once;
use x86_64::registers::control::Cr2;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

/// The first vector that is neither a CPU exception nor used by the legacy PICs (which [`super::pic`] remaps to
/// 0x20–0x2F and masks). Device vectors for [`register`] should be taken from here up.
pub const FIRST_DEVICE_VECTOR: u8 = 0x30;
/// The local APIC's spurious-interrupt vector (its low four bits must be set on old APICs; 0xFF satisfies all).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// Why [`register`] refused a handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// Vectors 0–31 are CPU exceptions.
    ExceptionVector(u8),
    /// The spurious vector has its own fixed handler.
    SpuriousVector,
    /// Another handler is registered for this vector; [`unregister`] it first.
    AlreadyRegistered(u8),
}

impl core::fmt::Display for RegisterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RegisterError::ExceptionVector(v) => write!(f, "vector {v} is a CPU exception"),
            RegisterError::SpuriousVector => {
                write!(f, "vector {SPURIOUS_VECTOR:#x} is the spurious vector")
            }
            RegisterError::AlreadyRegistered(v) => write!(f, "vector {v:#x} already has a handler"),
        }
    }
}

/// The device-vector handlers: 0 for none, else a `fn()` stored as its address.
static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];

static BREAKPOINTS: AtomicU64 = AtomicU64::new(0);
static SPURIOUS: AtomicU64 = AtomicU64::new(0);
static UNHANDLED: AtomicU64 = AtomicU64::new(0);
/// Set by the first exception report; a fault inside the report itself must not report again.
static REPORTING: AtomicBool = AtomicBool::new(false);

static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Installs `handler` for device vector `vector` (32–254). It runs with interrupts disabled, on the interrupted
/// stack, and must not take locks that non-interrupt code holds with interrupts enabled. The local APIC's EOI is
/// sent by the caller of `handler`.
pub fn register(vector: u8, handler: fn()) -> Result<(), RegisterError> {
    if vector < 32 {
        return Err(RegisterError::ExceptionVector(vector));
    }
    if vector == SPURIOUS_VECTOR {
        return Err(RegisterError::SpuriousVector);
    }
    HANDLERS[usize::from(vector)]
        .compare_exchange(0, handler as usize, Ordering::AcqRel, Ordering::Acquire)
        .map(|_| ())
        .map_err(|_| RegisterError::AlreadyRegistered(vector))
}

/// Removes the handler of `vector`; returns whether there was one. An interrupt on the vector afterwards is counted
/// in [`unhandled_count`].
pub fn unregister(vector: u8) -> bool {
    HANDLERS[usize::from(vector)].swap(0, Ordering::AcqRel) != 0
}

/// How many `#BP` (int3) exceptions have returned.
pub fn breakpoint_count() -> u64 {
    BREAKPOINTS.load(Ordering::Relaxed)
}

/// How many interrupts arrived on the spurious vector.
pub fn spurious_count() -> u64 {
    SPURIOUS.load(Ordering::Relaxed)
}

/// How many interrupts arrived on a device vector without a registered handler.
pub fn unhandled_count() -> u64 {
    UNHANDLED.load(Ordering::Relaxed)
}

/// Enables maskable interrupts on this CPU.
pub fn enable() {
    x86_64::instructions::interrupts::enable();
}

/// Calls the registered handler of `vector` and acknowledges the interrupt.
fn dispatch(vector: u8) {
    let raw = HANDLERS[usize::from(vector)].load(Ordering::Acquire);
    if raw == 0 {
        UNHANDLED.fetch_add(1, Ordering::Relaxed);
    } else {
        // SAFETY: `HANDLERS` entries are only ever 0 or the address of a `fn()` stored by `register`, and function
        // pointers and `usize` have the same size on x86_64.
        let handler: fn() = unsafe { core::mem::transmute::<usize, fn()>(raw) };
        handler();
    }
    apic::end_of_interrupt_if_in_service(vector);
}

/// The stub of device vector `VECTOR`.
extern "x86-interrupt" fn device_interrupt<const VECTOR: u8>(_frame: InterruptStackFrame) {
    dispatch(VECTOR);
}

extern "x86-interrupt" fn spurious_interrupt(_frame: InterruptStackFrame) {
    SPURIOUS.fetch_add(1, Ordering::Relaxed);
    // A true spurious interrupt leaves the in-service register alone; a fixed interrupt someone sent to 0xFF does
    // not, and would block every lower-priority vector without an EOI.
    apic::end_of_interrupt_if_in_service(SPURIOUS_VECTOR);
}

/// Installs the stubs of the sixteen vectors `row * 16 ..= row * 16 + 15`.
macro_rules! install_device_row {
    ($idt:ident, $row:literal) => {
        install_device_row!(@ $idt, $row, [0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15]);
    };
    (@ $idt:ident, $row:literal, [$($col:literal)*]) => {
        $( $idt[$row * 16 + $col].set_handler_fn(device_interrupt::<{ $row * 16 + $col }>); )*
    };
}

/// Builds and loads the IDT. Call after [`gdt::init`] (the double-fault and NMI entries use its IST stacks).
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        idt.divide_error.set_handler_fn(divide_error);
        idt.debug.set_handler_fn(debug);
        // SAFETY: `gdt::init` put a dedicated stack into this IST slot; nothing else uses it.
        unsafe { idt.non_maskable_interrupt.set_handler_fn(nmi).set_stack_index(gdt::NMI_IST_INDEX) };
        idt.breakpoint.set_handler_fn(breakpoint);
        idt.overflow.set_handler_fn(overflow);
        idt.bound_range_exceeded.set_handler_fn(bound_range_exceeded);
        idt.invalid_opcode.set_handler_fn(invalid_opcode);
        idt.device_not_available.set_handler_fn(device_not_available);
        // SAFETY: as for the NMI: a dedicated IST stack, used by this handler only.
        unsafe { idt.double_fault.set_handler_fn(double_fault).set_stack_index(gdt::DOUBLE_FAULT_IST_INDEX) };
        idt[9].set_handler_fn(coprocessor_segment_overrun);
        idt.invalid_tss.set_handler_fn(invalid_tss);
        idt.segment_not_present.set_handler_fn(segment_not_present);
        idt.stack_segment_fault.set_handler_fn(stack_segment_fault);
        idt.general_protection_fault.set_handler_fn(general_protection_fault);
        idt.page_fault.set_handler_fn(page_fault);
        idt.x87_floating_point.set_handler_fn(x87_floating_point);
        idt.alignment_check.set_handler_fn(alignment_check);
        idt.machine_check.set_handler_fn(machine_check);
        idt.simd_floating_point.set_handler_fn(simd_floating_point);
        idt.virtualization.set_handler_fn(virtualization);
        idt.cp_protection_exception.set_handler_fn(control_protection);
        idt.hv_injection_exception.set_handler_fn(hypervisor_injection);
        idt.vmm_communication_exception.set_handler_fn(vmm_communication);
        idt.security_exception.set_handler_fn(security_exception);
        install_device_row!(idt, 2);
        install_device_row!(idt, 3);
        install_device_row!(idt, 4);
        install_device_row!(idt, 5);
        install_device_row!(idt, 6);
        install_device_row!(idt, 7);
        install_device_row!(idt, 8);
        install_device_row!(idt, 9);
        install_device_row!(idt, 10);
        install_device_row!(idt, 11);
        install_device_row!(idt, 12);
        install_device_row!(idt, 13);
        install_device_row!(idt, 14);
        install_device_row!(idt, 15);
        idt[SPURIOUS_VECTOR].set_handler_fn(spurious_interrupt);
        idt
    });
    idt.load();
}

/// Mnemonic and name of exception `vector`.
pub fn exception_name(vector: u8) -> (&'static str, &'static str) {
    match vector {
        0 => ("#DE", "divide error"),
        1 => ("#DB", "debug"),
        2 => ("NMI", "non-maskable interrupt"),
        3 => ("#BP", "breakpoint"),
        4 => ("#OF", "overflow"),
        5 => ("#BR", "bound range exceeded"),
        6 => ("#UD", "invalid opcode"),
        7 => ("#NM", "device not available"),
        8 => ("#DF", "double fault"),
        9 => ("#CSO", "coprocessor segment overrun"),
        10 => ("#TS", "invalid TSS"),
        11 => ("#NP", "segment not present"),
        12 => ("#SS", "stack-segment fault"),
        13 => ("#GP", "general protection fault"),
        14 => ("#PF", "page fault"),
        16 => ("#MF", "x87 floating-point error"),
        17 => ("#AC", "alignment check"),
        18 => ("#MC", "machine check"),
        19 => ("#XM", "SIMD floating-point exception"),
        20 => ("#VE", "virtualization exception"),
        21 => ("#CP", "control protection exception"),
        28 => ("#HV", "hypervisor injection exception"),
        29 => ("#VC", "VMM communication exception"),
        30 => ("#SX", "security exception"),
        _ => ("#??", "reserved"),
    }
}

/// What an exception report says besides the vector and the frame.
enum Detail {
    None,
    ErrorCode(u64),
    PageFault(PageFaultErrorCode),
}

/// Prints the exception report and ends the run. Takes no lock (the faulting code may hold any of them).
fn report_exception(vector: u8, detail: Detail, frame: &InterruptStackFrame) -> ! {
    if REPORTING.swap(true, Ordering::AcqRel) {
        // A fault while reporting a fault: say so on serial only (the framebuffer may be what faulted) and stop.
        crate::console::serial::write_str_emergency("\nCPU EXCEPTION while reporting an exception\n");
        exit(ExitCode::Failure);
    }
    let (mnemonic, name) = exception_name(vector);
    let emergency = crate::console::write_fmt_emergency;
    emergency(format_args!("\nCPU EXCEPTION: vector {vector} {mnemonic} {name}\n"));
    match detail {
        Detail::None => emergency(format_args!("  error code: none\n")),
        Detail::ErrorCode(code) => emergency(format_args!("  error code: {code:#x}\n")),
        Detail::PageFault(code) => {
            emergency(format_args!("  error code: {:#x} (", code.bits()));
            if code.is_empty() {
                emergency(format_args!("read of a non-present page"));
            }
            for (i, (name, _)) in code.iter_names().enumerate() {
                emergency(format_args!("{}{name}", if i == 0 { "" } else { " | " }));
            }
            emergency(format_args!(")\n"));
        }
    }
    emergency(format_args!("  RIP: {:#018x}\n", frame.instruction_pointer.as_u64()));
    if matches!(detail, Detail::PageFault(_)) {
        emergency(format_args!("  CR2: {:#018x}\n", Cr2::read_raw()));
    }
    emergency(format_args!(
        "  RSP: {:#018x}  RFLAGS: {:#x}  CS: {:#x}  SS: {:#x}\n",
        frame.stack_pointer.as_u64(),
        frame.cpu_flags.bits(),
        frame.code_segment.0,
        frame.stack_segment.0,
    ));
    exit(ExitCode::Failure)
}

/// Defines handlers of exceptions without an error code, which report and end the run.
macro_rules! fatal_exception {
    ($($handler:ident = $vector:literal;)*) => {$(
        extern "x86-interrupt" fn $handler(frame: InterruptStackFrame) {
            report_exception($vector, Detail::None, &frame)
        }
    )*};
}

/// Defines handlers of exceptions that push an error code, which report and end the run.
macro_rules! fatal_exception_with_code {
    ($($handler:ident = $vector:literal;)*) => {$(
        extern "x86-interrupt" fn $handler(frame: InterruptStackFrame, code: u64) {
            report_exception($vector, Detail::ErrorCode(code), &frame)
        }
    )*};
}

fatal_exception! {
    divide_error = 0;
    debug = 1;
    nmi = 2;
    overflow = 4;
    bound_range_exceeded = 5;
    invalid_opcode = 6;
    device_not_available = 7;
    coprocessor_segment_overrun = 9;
    x87_floating_point = 16;
    simd_floating_point = 19;
    virtualization = 20;
    hypervisor_injection = 28;
}

fatal_exception_with_code! {
    invalid_tss = 10;
    segment_not_present = 11;
    stack_segment_fault = 12;
    general_protection_fault = 13;
    alignment_check = 17;
    control_protection = 21;
    vmm_communication = 29;
    security_exception = 30;
}

extern "x86-interrupt" fn breakpoint(_frame: InterruptStackFrame) {
    BREAKPOINTS.fetch_add(1, Ordering::Relaxed);
}

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    report_exception(14, Detail::PageFault(code), &frame)
}

extern "x86-interrupt" fn double_fault(frame: InterruptStackFrame, code: u64) -> ! {
    report_exception(8, Detail::ErrorCode(code), &frame)
}

extern "x86-interrupt" fn machine_check(frame: InterruptStackFrame) -> ! {
    report_exception(18, Detail::None, &frame)
}

use crate::ktest::{KTest, TestResult};
use crate::{kassert, kassert_eq};

/// In-kernel tests of exceptions and device-vector dispatch.
pub const KTESTS: &[KTest] = &[
    KTest { name: "arch::interrupts::breakpoint_returns", run: breakpoint_returns },
    KTest {
        name: "arch::interrupts::software_interrupt_runs_registered_handler",
        run: software_interrupt_runs_handler,
    },
    KTest { name: "arch::interrupts::register_refuses_bad_vectors", run: register_refuses_bad_vectors },
    KTest { name: "arch::interrupts::spurious_vector_is_counted", run: spurious_vector_is_counted },
    KTest { name: "arch::interrupts::unregistered_vector_is_counted", run: unregistered_vector_is_counted },
];

fn breakpoint_returns() -> TestResult {
    let before = breakpoint_count();
    // SAFETY: the #BP handler only counts and returns. No `nomem`: the handler writes the counter read below.
    unsafe { core::arch::asm!("int3", "int3") };
    kassert_eq!(breakpoint_count(), before + 2);
    Ok(())
}

/// Vector used by the software-interrupt test.
const TEST_SOFTWARE_VECTOR: u8 = FIRST_DEVICE_VECTOR + 0x11;
static SOFTWARE_HITS: AtomicU64 = AtomicU64::new(0);

fn count_software_hit() {
    SOFTWARE_HITS.fetch_add(1, Ordering::Relaxed);
}

fn software_interrupt_runs_handler() -> TestResult {
    register(TEST_SOFTWARE_VECTOR, count_software_hit).map_err(|e| alloc::format!("register: {e}"))?;
    let before = SOFTWARE_HITS.load(Ordering::Relaxed);
    // SAFETY: the vector is a device vector whose stub and handler were just installed; `int` to it runs the
    // handler and returns like a call.
    unsafe { core::arch::asm!("int {vector}", vector = const TEST_SOFTWARE_VECTOR) };
    let after = SOFTWARE_HITS.load(Ordering::Relaxed);
    kassert!(unregister(TEST_SOFTWARE_VECTOR));
    kassert_eq!(after, before + 1);
    Ok(())
}

fn nothing() {}

fn register_refuses_bad_vectors() -> TestResult {
    kassert_eq!(register(14, nothing), Err(RegisterError::ExceptionVector(14)));
    kassert_eq!(register(SPURIOUS_VECTOR, nothing), Err(RegisterError::SpuriousVector));
    kassert_eq!(register(0x42, nothing), Ok(()));
    kassert_eq!(register(0x42, count_software_hit), Err(RegisterError::AlreadyRegistered(0x42)));
    kassert!(unregister(0x42));
    kassert!(!unregister(0x42));
    Ok(())
}

fn spurious_vector_is_counted() -> TestResult {
    let before = spurious_count();
    // SAFETY: vector 0xFF's handler only counts and returns.
    unsafe { core::arch::asm!("int 0xff") };
    kassert_eq!(spurious_count(), before + 1);
    Ok(())
}

fn unregistered_vector_is_counted() -> TestResult {
    kassert!(HANDLERS[0x43].load(Ordering::Relaxed) == 0, "vector 0x43 is in use");
    let before = unhandled_count();
    // SAFETY: vector 0x43 has the stub that counts an interrupt without a handler and returns.
    unsafe { core::arch::asm!("int 0x43") };
    kassert_eq!(unhandled_count(), before + 1);
    Ok(())
}
