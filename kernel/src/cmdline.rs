//! The kernel command line: `key=value` words that `boot` stores in the bootloader's ramdisk.
//!
//! An image without a ramdisk (the one a user boots on Hyper-V) has an empty command line and runs the main job.

use bootloader_api::BootInfo;

/// The largest command line read (the same limit `boot::image::MAX_CMDLINE` enforces).
pub const MAX_LEN: usize = 4096;

/// The parsed command line; borrows the ramdisk, which the bootloader maps for the kernel's lifetime.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cmdline {
    text: &'static str,
}

impl Cmdline {
    /// Reads the command line from the ramdisk the bootloader loaded, if any.
    pub fn from_boot_info(boot_info: &BootInfo) -> Cmdline {
        let Some(addr) = boot_info.ramdisk_addr.into_option() else {
            return Cmdline::default();
        };
        let len = (boot_info.ramdisk_len as usize).min(MAX_LEN);
        // SAFETY: the bootloader maps the ramdisk at `ramdisk_addr` for `ramdisk_len` bytes, read-only data that lives
        // as long as the kernel and that nothing else writes.
        let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, len) };
        Cmdline::parse(bytes)
    }

    /// Takes the command line from raw bytes; bytes that are not UTF-8 end it.
    pub fn parse(bytes: &'static [u8]) -> Cmdline {
        let text = match core::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
        };
        Cmdline { text: text.trim() }
    }

    /// The value of `key=value`, if present (the last one wins).
    pub fn get(&self, key: &str) -> Option<&'static str> {
        self.text
            .split_ascii_whitespace()
            .filter_map(|word| word.split_once('='))
            .rfind(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    /// The whole text.
    pub fn as_str(&self) -> &'static str {
        self.text
    }
}
