//! The Global Descriptor Table and the Task State Segment.
//!
//! Long mode ignores most of segmentation, but the CPU still needs a code segment, a data segment for SS and a TSS:
//! the TSS's Interrupt Stack Table (IST) gives the double-fault and NMI handlers stacks of their own, so a kernel
//! stack overflow (which faults while pushing the exception frame) still ends in a readable report instead of a
//! triple fault and a silent reset.
//!
//! Only the bootstrap processor is brought up, so there is one GDT and one TSS.

use spin::Once;
use x86_64::VirtAddr;
use x86_64::instructions::segmentation::{CS, DS, ES, SS, Segment};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;

/// IST slot (0-based, as the `x86_64` crate counts) of the double-fault handler's stack.
pub const DOUBLE_FAULT_IST_INDEX: u16 = 0;
/// IST slot of the NMI handler's stack.
pub const NMI_IST_INDEX: u16 = 1;

/// Size of each IST stack: room for the exception report's formatting.
const IST_STACK_SIZE: usize = 20 * 1024;

/// Memory for one IST stack. The CPU writes it through the TSS pointer; Rust code never touches it.
#[repr(C, align(16))]
struct IstStack([u8; IST_STACK_SIZE]);

static mut DOUBLE_FAULT_STACK: IstStack = IstStack([0; IST_STACK_SIZE]);
static mut NMI_STACK: IstStack = IstStack([0; IST_STACK_SIZE]);

/// The selectors `init` loads.
#[derive(Clone, Copy, Debug)]
struct Selectors {
    code: SegmentSelector,
    data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, Selectors)> = Once::new();

/// The top (highest address, 16-byte aligned) of an IST stack.
fn stack_top(stack: *const IstStack) -> VirtAddr {
    VirtAddr::from_ptr(stack) + IST_STACK_SIZE as u64
}

/// Builds the TSS and GDT, loads the GDT, reloads the segment registers and loads the task register.
///
/// Call once, early at boot, before the IDT refers to the IST slots.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.interrupt_stack_table[DOUBLE_FAULT_IST_INDEX as usize] = stack_top(&raw const DOUBLE_FAULT_STACK);
        tss.interrupt_stack_table[NMI_IST_INDEX as usize] = stack_top(&raw const NMI_STACK);
        tss
    });
    let (gdt, selectors) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        (gdt, Selectors { code, data, tss })
    });
    gdt.load();
    // SAFETY: the selectors index descriptors of the GDT just loaded, which lives in a static for the kernel's
    // lifetime: a 64-bit ring-0 code segment for CS, a ring-0 data segment for the data registers, and a TSS whose
    // IST stacks are statics nobody else uses. The TSS is loaded once (loading marks its descriptor busy).
    unsafe {
        CS::set_reg(selectors.code);
        SS::set_reg(selectors.data);
        DS::set_reg(selectors.data);
        ES::set_reg(selectors.data);
        load_tss(selectors.tss);
    }
}

use crate::kassert_eq;
use crate::ktest::{KTest, TestResult};

/// In-kernel tests of the GDT and TSS.
pub const KTESTS: &[KTest] = &[KTest { name: "arch::gdt::tables_are_loaded", run: tables_are_loaded }];

fn tables_are_loaded() -> TestResult {
    let (gdt, selectors) = GDT.get().ok_or_else(|| alloc::string::String::from("GDT not initialised"))?;
    // Copies out of the packed descriptor-table structures before comparing.
    let loaded_base = { x86_64::instructions::tables::sgdt().base };
    kassert_eq!(loaded_base, VirtAddr::from_ptr(gdt));
    kassert_eq!(CS::get_reg(), selectors.code);
    kassert_eq!(SS::get_reg(), selectors.data);
    let tss = TSS.get().ok_or_else(|| alloc::string::String::from("TSS not initialised"))?;
    let ist = { tss.interrupt_stack_table };
    kassert_eq!(ist[DOUBLE_FAULT_IST_INDEX as usize], stack_top(&raw const DOUBLE_FAULT_STACK));
    kassert_eq!(ist[NMI_IST_INDEX as usize], stack_top(&raw const NMI_STACK));
    kassert_eq!(ist[NMI_IST_INDEX as usize].as_u64() % 16, 0);
    Ok(())
}
