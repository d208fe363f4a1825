//! The kernel's console: every line goes to COM1 and, once it is set up, to the UEFI GOP framebuffer.
//!
//! The [`log`] facade is backed by [`Logger`], so the rest of the kernel uses `log::info!` and friends.

pub mod serial;

use core::fmt::{self, Write};

/// Sets up COM1 and installs the logger. Call first thing at boot.
pub fn init_early() {
    serial::init();
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Writes formatted text to every console.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    let _ = Sink.write_fmt(args);
}

/// Writes formatted text to every console from a path that must not wait for a lock (panic and fault handlers).
pub fn write_fmt_emergency(args: fmt::Arguments<'_>) {
    let _ = EmergencySink.write_fmt(args);
}

struct Sink;

impl Write for Sink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        serial::write_str(s);
        Ok(())
    }
}

struct EmergencySink;

impl Write for EmergencySink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        serial::write_str_emergency(s);
        Ok(())
    }
}

/// Prints to every console, like `print!`.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => { $crate::console::write_fmt(format_args!($($arg)*)) };
}

/// Prints a line to every console, like `println!`.
#[macro_export]
macro_rules! kprintln {
    () => { $crate::kprint!("\n") };
    ($($arg:tt)*) => { $crate::console::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

/// The `log` backend: `[LEVEL] target: message`.
struct Logger;

static LOGGER: Logger = Logger;

impl log::Log for Logger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            write_fmt(format_args!("[{:<5}] {}\n", record.level(), record.args()));
        }
    }

    fn flush(&self) {}
}
