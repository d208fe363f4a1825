//! Ending a run: QEMU's `isa-debug-exit` device for tests, otherwise halting.
//!
//! The values match `boot::qemu::GUEST_SUCCESS` / `GUEST_FAILURE`: QEMU exits with `(value << 1) | 1`, 33 or 35.
//! On a machine without the device (Hyper-V), the port write does nothing and the CPU halts.

use x86_64::instructions::port::Port;

/// I/O port of QEMU's `isa-debug-exit` device, as `boot` configures it.
const DEBUG_EXIT_PORT: u16 = 0xF4;

/// How the kernel's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// The job (or every in-kernel test) finished.
    Success = 0x10,
    /// A test failed or the kernel panicked.
    Failure = 0x11,
}

/// Ends the run with `code`: exits QEMU when its debug-exit device is present, else halts for good.
pub fn exit(code: ExitCode) -> ! {
    let mut port = Port::<u32>::new(DEBUG_EXIT_PORT);
    // SAFETY: port 0xF4 is unused on PC platforms other than QEMU's isa-debug-exit; a write to an absent device is
    // ignored, and this is the last thing the kernel does.
    unsafe { port.write(code as u32) };
    halt_forever()
}

/// Stops this CPU: interrupts off, `hlt` in a loop.
pub fn halt_forever() -> ! {
    x86_64::instructions::interrupts::disable();
    loop {
        x86_64::instructions::hlt();
    }
}
