//! COM1, the first place every log line goes.
//!
//! A Hyper-V Generation 2 VM has COM1 only when the user configures it (`Set-VMComPort`); writes to a missing UART
//! are harmless port writes, so the kernel always writes here and also mirrors to the framebuffer.

use spin::Mutex;
use uart_16550::SerialPort;

/// The standard I/O base of COM1.
const COM1: u16 = 0x3F8;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Programs the UART (115200 8N1, FIFOs on).
pub fn init() {
    // SAFETY: 0x3F8 is COM1's standard I/O base on PC-compatible machines (QEMU q35 and Hyper-V); the UART's
    // registers are only ever touched through this `SerialPort`, which lives behind `PORT`'s lock.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *PORT.lock() = Some(port);
}

/// Writes a string (with `\n` sent as `\r\n`, which `SerialPort` does itself).
pub fn write_str(s: &str) {
    use core::fmt::Write;
    if let Some(port) = PORT.lock().as_mut() {
        let _ = port.write_str(s);
    }
}

/// Writes from a context that may have interrupted a writer holding the lock (panic, exception handlers): the lock
/// is taken over rather than waited for.
pub fn write_str_emergency(s: &str) {
    // SAFETY: only called when the kernel is about to stop; a writer we interrupted will never resume, so forcing the
    // lock open cannot lead to two live users of the UART.
    unsafe { PORT.force_unlock() };
    write_str(s);
}
