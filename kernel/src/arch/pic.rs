//! The legacy 8259 interrupt controllers: moved off the exception vectors and masked.
//!
//! The local APIC delivers every interrupt the kernel uses. QEMU's q35 still has the two 8259s (Hyper-V Gen2 has
//! none, and writes to their ports are then ignored); firmware may leave them unmasked and, in real mode fashion,
//! on vectors that overlap CPU exceptions. Reinitialising them onto 0x20–0x2F means that even a spurious 8259
//! interrupt (IRQ 7 or 15 can fire while masked) lands on a device vector, not on an exception.

use x86_64::instructions::port::Port;

/// Vector of the primary controller's IRQ 0 after [`remap_and_mask`]; the secondary follows at +8.
pub const PIC_VECTOR_BASE: u8 = 0x20;

const PRIMARY_COMMAND: u16 = 0x20;
const PRIMARY_DATA: u16 = 0x21;
const SECONDARY_COMMAND: u16 = 0xA0;
const SECONDARY_DATA: u16 = 0xA1;
/// ICW1: initialisation, ICW4 follows (edge-triggered, cascaded).
const ICW1_INIT_WITH_ICW4: u8 = 0x11;
/// ICW4: 8086 mode.
const ICW4_8086: u8 = 0x01;
/// Port 0x80 (the POST diagnostic port) is the customary short delay between 8259 writes.
const DELAY_PORT: u16 = 0x80;

/// Reprograms both 8259s to vectors 0x20–0x2F and masks every IRQ line.
pub fn remap_and_mask() {
    let sequence: [(u16, u8); 10] = [
        (PRIMARY_COMMAND, ICW1_INIT_WITH_ICW4),
        (SECONDARY_COMMAND, ICW1_INIT_WITH_ICW4),
        (PRIMARY_DATA, PIC_VECTOR_BASE),
        (SECONDARY_DATA, PIC_VECTOR_BASE + 8),
        // ICW3: the secondary hangs off the primary's IRQ 2 (bit mask), and has cascade identity 2.
        (PRIMARY_DATA, 1 << 2),
        (SECONDARY_DATA, 2),
        (PRIMARY_DATA, ICW4_8086),
        (SECONDARY_DATA, ICW4_8086),
        // OCW1: mask all lines.
        (PRIMARY_DATA, 0xFF),
        (SECONDARY_DATA, 0xFF),
    ];
    for (port, value) in sequence {
        // SAFETY: these are the 8259s' standard ports (nothing else decodes them on a PC), written in the
        // documented initialisation order; the delay port write has no effect besides taking time.
        unsafe {
            Port::<u8>::new(port).write(value);
            Port::<u8>::new(DELAY_PORT).write(0);
        }
    }
}
