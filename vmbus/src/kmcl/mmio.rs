//! MMIO space for VMBus devices (`VmbChannelGetMmioSpace`, row 9).
//!
//! Some devices (virtual PCI, synthetic video) ask in their offer for MMIO space (`mmio_megabytes`). The guest
//! chooses where: it carves the space out of the physical-address ranges the firmware reserves for the VMBus device
//! (the `_CRS` of its ACPI node), and the device protocol then tells the host the address. The [`Bus`](super::Bus)
//! does the carving when such a channel opens, from an [`MmioAllocator`] the kernel hands it
//! ([`Bus::set_mmio_allocator`](super::Bus::set_mmio_allocator)); [`MmioWindow`] is one over a single range.

use alloc::vec::Vec;

/// One MiB, the unit of an offer's `mmio_megabytes`.
pub const MIB: u64 = 1 << 20;

/// A range of guest physical address space given to a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioRange {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl MmioRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }
}

/// Where the bus gets MMIO space for the devices that ask for it.
pub trait MmioAllocator {
    /// `size` bytes aligned to `align` (a power of two), or `None` when no such range is free.
    fn allocate(&mut self, size: u64, align: u64) -> Option<MmioRange>;
    /// Gives back a range [`MmioAllocator::allocate`] returned.
    fn free(&mut self, range: MmioRange);
}

/// First-fit allocator over one range of address space (the unikernel has at most a few devices, so a sorted list
/// of the ranges handed out is enough).
#[derive(Clone, Debug)]
pub struct MmioWindow {
    window: MmioRange,
    /// Ranges in use, sorted by base.
    used: Vec<MmioRange>,
}

impl MmioWindow {
    /// An allocator over `window`.
    pub fn new(window: MmioRange) -> MmioWindow {
        MmioWindow { window, used: Vec::new() }
    }

    /// The ranges handed out and not yet freed, by address.
    pub fn used(&self) -> &[MmioRange] {
        &self.used
    }
}

impl MmioAllocator for MmioWindow {
    fn allocate(&mut self, size: u64, align: u64) -> Option<MmioRange> {
        if size == 0 || !align.is_power_of_two() {
            return None;
        }
        let mut cursor = self.window.base;
        // Each gap: from the cursor to the next used range (or the window's end).
        for index in 0..=self.used.len() {
            let gap_end = self.used.get(index).map_or(self.window.end(), |next| next.base);
            let base = cursor.checked_next_multiple_of(align)?;
            if base.checked_add(size).is_some_and(|end| end <= gap_end) {
                let range = MmioRange { base, size };
                self.used.insert(index, range);
                return Some(range);
            }
            if let Some(next) = self.used.get(index) {
                cursor = next.end();
            }
        }
        None
    }

    fn free(&mut self, range: MmioRange) {
        if let Some(index) = self.used.iter().position(|used| *used == range) {
            self.used.remove(index);
        } else {
            log::warn!("kmcl: MMIO range {:#x}+{:#x} freed but not in use", range.base, range.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_with_alignment_and_reuse_of_freed_space() {
        let mut window = MmioWindow::new(MmioRange { base: 0xf800_0000 + 0x1000, size: 8 * MIB });
        let a = window.allocate(2 * MIB, MIB).unwrap();
        assert_eq!(a, MmioRange { base: 0xf810_0000, size: 2 * MIB }, "aligned up past the window's odd start");
        let b = window.allocate(3 * MIB, MIB).unwrap();
        assert_eq!(b.base, a.end());
        assert_eq!(window.allocate(3 * MIB, MIB), None, "only 2 MiB and a page are left at the end");
        window.free(a);
        let c = window.allocate(MIB, MIB).unwrap();
        assert_eq!(c.base, 0xf810_0000, "the freed space is used first");
        assert_eq!(window.used(), &[c, b]);
        assert_eq!(window.allocate(0, MIB), None);
        assert_eq!(window.allocate(MIB, 3), None, "alignment must be a power of two");
    }

    #[test]
    fn a_window_at_the_top_of_the_address_space_does_not_overflow() {
        let mut window = MmioWindow::new(MmioRange { base: u64::MAX - 4 * MIB + 1, size: 4 * MIB - 1 });
        assert_eq!(window.allocate(MIB, 1 << 40), None);
        assert_eq!(window.allocate(8 * MIB, MIB), None);
    }
}
