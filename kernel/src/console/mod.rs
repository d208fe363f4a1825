//! The kernel's console: every line goes to COM1 and, once it is set up, to the UEFI GOP framebuffer.
//!
//! The [`log`] facade is backed by [`Logger`], so the rest of the kernel uses `log::info!` and friends.

pub mod framebuffer;
pub mod serial;

use core::fmt::{self, Write};

/// Sets up COM1 and installs the logger. Call first thing at boot.
pub fn init_early() {
    serial::init();
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// What [`init_framebuffer`] found, for the boot log.
pub enum ScreenStatus {
    /// The bootloader found no framebuffer.
    Absent,
    /// The framebuffer's layout is unusable.
    Unusable(bootloader_api::info::FrameBufferInfo),
    /// The screen console runs.
    Ready {
        /// Pixel layout.
        info: bootloader_api::info::FrameBufferInfo,
        /// Text columns.
        columns: usize,
        /// Text rows.
        rows: usize,
    },
}

impl fmt::Display for ScreenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScreenStatus::Absent => f.write_str("no framebuffer"),
            ScreenStatus::Unusable(info) => {
                write!(f, "framebuffer with an unusable layout: {info:?}")
            }
            ScreenStatus::Ready { info, columns, rows } => write!(
                f,
                "framebuffer {}x{} {:?}, {} bytes/pixel, stride {}: {columns}x{rows} text",
                info.width, info.height, info.pixel_format, info.bytes_per_pixel, info.stride
            ),
        }
    }
}

/// Mirrors the console onto the UEFI GOP framebuffer, if the bootloader found one. Serial stays first: a line
/// reaches COM1 before the screen.
pub fn init_framebuffer(framebuffer: Option<bootloader_api::info::FrameBuffer>) -> ScreenStatus {
    let Some(framebuffer) = framebuffer else {
        return ScreenStatus::Absent;
    };
    let info = framebuffer.info();
    match framebuffer::init(framebuffer) {
        Some((columns, rows)) => ScreenStatus::Ready { info, columns, rows },
        None => ScreenStatus::Unusable(info),
    }
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
        framebuffer::write_str(s);
        Ok(())
    }
}

struct EmergencySink;

impl Write for EmergencySink {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        serial::write_str_emergency(s);
        framebuffer::write_str_emergency(s);
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
