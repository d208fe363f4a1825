//! A text console on the UEFI GOP framebuffer the bootloader hands over, so a VM without a serial port (a Hyper-V
//! Gen2 VM without `Set-VMComPort`) still shows the log.
//!
//! Glyphs come from `noto-sans-mono-bitmap` (regular weight, 16-pixel raster, basic Latin plus the replacement
//! character for anything else), drawn as grey levels, white on black. Text wraps at the right edge, and at the
//! bottom everything moves up one line.

use bootloader_api::info::{FrameBuffer, FrameBufferInfo, PixelFormat};
use noto_sans_mono_bitmap::{FontWeight, RasterHeight, RasterizedChar, get_raster, get_raster_width};
use spin::Mutex;

const WEIGHT: FontWeight = FontWeight::Regular;
const HEIGHT: RasterHeight = RasterHeight::Size16;
/// Width of one character cell in pixels.
pub const CELL_WIDTH: usize = get_raster_width(WEIGHT, HEIGHT);
/// Height of one character cell in pixels.
pub const CELL_HEIGHT: usize = HEIGHT.val();
/// Columns per tab stop.
const TAB: usize = 8;

/// The glyph drawn for `c`: its own, or U+FFFD for characters the font lacks.
fn glyph(c: char) -> RasterizedChar {
    get_raster(c, WEIGHT, HEIGHT)
        .or_else(|| get_raster('\u{FFFD}', WEIGHT, HEIGHT))
        .or_else(|| get_raster('?', WEIGHT, HEIGHT))
        .expect("the font has '?'")
}

/// A text console over a pixel buffer.
pub struct TextConsole<'a> {
    buffer: &'a mut [u8],
    info: FrameBufferInfo,
    columns: usize,
    rows: usize,
    column: usize,
    row: usize,
}

impl<'a> TextConsole<'a> {
    /// Wraps `buffer`, laid out as `info` says. Returns `None` if the layout does not fit the buffer, has an
    /// unusable pixel size, or has room for less than one character.
    pub fn new(buffer: &'a mut [u8], info: FrameBufferInfo) -> Option<TextConsole<'a>> {
        let bpp = info.bytes_per_pixel;
        if !(1..=4).contains(&bpp) || info.stride < info.width || info.height == 0 {
            return None;
        }
        let needed = info.stride.checked_mul(info.height)?.checked_mul(bpp)?;
        if needed > buffer.len() {
            return None;
        }
        let (columns, rows) = (info.width / CELL_WIDTH, info.height / CELL_HEIGHT);
        if columns == 0 || rows == 0 {
            return None;
        }
        Some(TextConsole { buffer, info, columns, rows, column: 0, row: 0 })
    }

    /// Columns and rows of text.
    pub fn size(&self) -> (usize, usize) {
        (self.columns, self.rows)
    }

    /// The cell the next character goes to: (column, row).
    pub fn cursor(&self) -> (usize, usize) {
        (self.column, self.row)
    }

    /// Blanks the screen and puts the cursor at the top left.
    pub fn clear(&mut self) {
        self.buffer.fill(0);
        self.column = 0;
        self.row = 0;
    }

    /// Writes text: `\n` starts a new line, `\r` returns to its start, `\t` moves to the next tab stop, other
    /// control characters are dropped.
    pub fn write_str(&mut self, s: &str) {
        for c in s.chars() {
            match c {
                '\n' => self.new_line(),
                '\r' => self.column = 0,
                '\t' => {
                    for _ in 0..TAB - self.column % TAB {
                        self.put_char(' ');
                    }
                }
                c if c.is_control() => {}
                c => self.put_char(c),
            }
        }
    }

    fn put_char(&mut self, c: char) {
        if self.column >= self.columns {
            self.new_line();
        }
        self.draw_char_at(self.column, self.row, c);
        self.column += 1;
    }

    fn new_line(&mut self) {
        self.column = 0;
        if self.row + 1 < self.rows {
            self.row += 1;
        } else {
            self.scroll_up();
        }
    }

    /// Moves every text line up by one and blanks the last.
    fn scroll_up(&mut self) {
        let line_bytes = self.info.stride * self.info.bytes_per_pixel * CELL_HEIGHT;
        let text_bytes = line_bytes * self.rows;
        self.buffer.copy_within(line_bytes..text_bytes, 0);
        self.buffer[text_bytes - line_bytes..text_bytes].fill(0);
    }

    /// Draws `c` into the cell at (`column`, `row`) without moving the cursor; out-of-range cells are ignored.
    pub fn draw_char_at(&mut self, column: usize, row: usize, c: char) {
        if column >= self.columns || row >= self.rows {
            return;
        }
        let raster = glyph(c);
        for (dy, line) in raster.raster().iter().enumerate() {
            for (dx, &intensity) in line.iter().enumerate() {
                self.put_pixel(column * CELL_WIDTH + dx, row * CELL_HEIGHT + dy, intensity);
            }
        }
    }

    /// The byte range of pixel (x, y).
    fn pixel_range(&self, x: usize, y: usize) -> Option<core::ops::Range<usize>> {
        if x >= self.info.width || y >= self.info.height {
            return None;
        }
        let start = (y * self.info.stride + x) * self.info.bytes_per_pixel;
        Some(start..start + self.info.bytes_per_pixel)
    }

    /// Sets pixel (x, y) to grey level `intensity`.
    fn put_pixel(&mut self, x: usize, y: usize, intensity: u8) {
        let Some(range) = self.pixel_range(x, y) else {
            return;
        };
        let format = self.info.pixel_format;
        let Some(pixel) = self.buffer.get_mut(range) else {
            return;
        };
        match format {
            PixelFormat::Unknown { red_position, green_position, blue_position } => {
                let shift = |position: u8| {
                    if position < 25 { u32::from(intensity) << position } else { 0 }
                };
                let value = shift(red_position) | shift(green_position) | shift(blue_position);
                let bytes = value.to_le_bytes();
                pixel.copy_from_slice(&bytes[..pixel.len()]);
            }
            PixelFormat::Rgb | PixelFormat::Bgr => {
                // Grey has the same bytes in either order; the fourth byte (if any) is padding.
                for (i, byte) in pixel.iter_mut().enumerate() {
                    *byte = if i < 3 { intensity } else { 0 };
                }
            }
            _ => pixel.fill(intensity),
        }
    }

    /// The grey level of pixel (x, y) as [`Self::put_pixel`] wrote it (the first colour byte), for tests.
    pub fn pixel_intensity(&self, x: usize, y: usize) -> Option<u8> {
        let range = self.pixel_range(x, y)?;
        let pixel = self.buffer.get(range)?;
        match self.info.pixel_format {
            PixelFormat::Unknown { red_position, .. } if red_position < 25 => {
                let mut bytes = [0u8; 4];
                bytes[..pixel.len()].copy_from_slice(pixel);
                Some((u32::from_le_bytes(bytes) >> red_position) as u8)
            }
            _ => pixel.first().copied(),
        }
    }
}

/// The screen's console, once [`init`] found a framebuffer.
static CONSOLE: Mutex<Option<TextConsole<'static>>> = Mutex::new(None);

/// Takes over the bootloader's framebuffer as the screen console; returns its size in columns and rows, or `None`
/// when its layout is unusable.
pub fn init(framebuffer: FrameBuffer) -> Option<(usize, usize)> {
    let info = framebuffer.info();
    let mut console = TextConsole::new(framebuffer.into_buffer(), info)?;
    console.clear();
    let size = console.size();
    *CONSOLE.lock() = Some(console);
    Some(size)
}

/// Writes to the screen console (nothing before [`init`]).
pub fn write_str(s: &str) {
    if let Some(console) = CONSOLE.lock().as_mut() {
        console.write_str(s);
    }
}

/// Writes from a context that may have interrupted a writer holding the lock (panic, exception handlers): the lock
/// is taken over rather than waited for.
pub fn write_str_emergency(s: &str) {
    // SAFETY: only called when the kernel is about to stop; the interrupted writer never resumes, so there are
    // not two live users of the console afterwards.
    unsafe { CONSOLE.force_unlock() };
    write_str(s);
}

/// Runs `f` on the screen console, if there is one (for tests).
pub fn with_console<R>(f: impl FnOnce(&mut TextConsole<'static>) -> R) -> Option<R> {
    CONSOLE.lock().as_mut().map(f)
}

use crate::ktest::{KTest, TestResult};
use crate::{kassert, kassert_eq};
use alloc::vec;

/// In-kernel tests of the framebuffer console.
pub const KTESTS: &[KTest] = &[
    KTest { name: "console::framebuffer::screen_shows_glyphs", run: screen_shows_glyphs },
    KTest { name: "console::framebuffer::wraps_and_scrolls", run: wraps_and_scrolls },
    KTest { name: "console::framebuffer::rejects_bad_layouts", run: rejects_bad_layouts },
];

/// Whether cell (`column`, `row`) shows exactly `c`'s glyph.
fn cell_shows(console: &TextConsole<'_>, column: usize, row: usize, c: char) -> bool {
    let raster = glyph(c);
    raster.raster().iter().enumerate().all(|(dy, line)| {
        line.iter().enumerate().all(|(dx, &intensity)| {
            console.pixel_intensity(column * CELL_WIDTH + dx, row * CELL_HEIGHT + dy) == Some(intensity)
        })
    })
}

/// The real screen: drawing a glyph changes the pixels to exactly the font's raster, and a blank erases it.
fn screen_shows_glyphs() -> TestResult {
    let checked = with_console(|console| {
        let (column, row) = console.cursor();
        console.draw_char_at(column, row, 'H');
        let drawn = cell_shows(console, column, row, 'H');
        let lit = (0..CELL_HEIGHT)
            .flat_map(|dy| (0..CELL_WIDTH).map(move |dx| (dx, dy)))
            .filter(|&(dx, dy)| {
                console.pixel_intensity(column * CELL_WIDTH + dx, row * CELL_HEIGHT + dy).unwrap_or(0) > 0
            })
            .count();
        console.draw_char_at(column, row, ' ');
        let erased = cell_shows(console, column, row, ' ');
        (drawn, lit, erased)
    });
    let (drawn, lit, erased) = checked.ok_or("no framebuffer console")?;
    kassert!(drawn, "the cell does not show the glyph of 'H'");
    kassert!(lit >= 10, "only {lit} pixels lit for 'H'");
    kassert!(erased, "the cell was not blanked");
    Ok(())
}

/// An in-memory 10-column, 3-row console with padded lines: wrapping, tabs and scrolling put text where expected.
fn wraps_and_scrolls() -> TestResult {
    let info = FrameBufferInfo {
        byte_len: 0,
        width: 10 * CELL_WIDTH + 3,
        height: 3 * CELL_HEIGHT + 5,
        pixel_format: PixelFormat::Bgr,
        bytes_per_pixel: 4,
        stride: 10 * CELL_WIDTH + 7,
    };
    let mut memory = vec![0u8; info.stride * info.height * info.bytes_per_pixel];
    let mut console = TextConsole::new(&mut memory, info).ok_or("layout refused")?;
    kassert_eq!(console.size(), (10, 3));
    console.write_str("abcdefghijK");
    kassert!(cell_shows(&console, 9, 0, 'j') && cell_shows(&console, 0, 1, 'K'), "no wrap after ten columns");
    console.write_str("\n\tq");
    kassert!(cell_shows(&console, 8, 2, 'q') && cell_shows(&console, 7, 2, ' '), "tab did not reach column 8");
    kassert_eq!(console.cursor(), (9, 2));
    console.write_str("\nZ");
    kassert!(cell_shows(&console, 0, 0, 'K'), "row 1 did not move up to row 0");
    kassert!(cell_shows(&console, 8, 1, 'q'), "row 2 did not move up to row 1");
    kassert!(cell_shows(&console, 0, 2, 'Z') && cell_shows(&console, 1, 2, ' '), "the new last line is wrong");
    kassert_eq!(console.cursor(), (1, 2));
    Ok(())
}

fn rejects_bad_layouts() -> TestResult {
    let good = FrameBufferInfo {
        byte_len: 0,
        width: 64,
        height: 32,
        pixel_format: PixelFormat::Rgb,
        bytes_per_pixel: 4,
        stride: 64,
    };
    let mut memory = vec![0u8; 64 * 32 * 4];
    kassert!(TextConsole::new(&mut memory, good).is_some());
    kassert!(TextConsole::new(&mut memory[..64 * 32 * 4 - 1], good).is_none(), "short buffer accepted");
    kassert!(TextConsole::new(&mut memory, FrameBufferInfo { stride: 63, ..good }).is_none(), "stride < width");
    kassert!(TextConsole::new(&mut memory, FrameBufferInfo { bytes_per_pixel: 5, ..good }).is_none());
    kassert!(TextConsole::new(&mut memory, FrameBufferInfo { width: CELL_WIDTH - 1, ..good }).is_none());
    Ok(())
}
