//! The platform report printed at boot: CPU, memory and hypervisor (the latter is `vmbus::hv::HvReport`, decoded from
//! the hypervisor CPUID leaves by [`crate::hyperv::detect`]).

use bootloader_api::info::{MemoryRegionKind, MemoryRegions};
use core::arch::x86_64::__cpuid;
use core::fmt;
use vmbus::hv::HvReport;

/// What the kernel found about the machine it runs on.
pub struct Report {
    vendor: [u8; 12],
    brand: [u8; 48],
    usable_bytes: u64,
    hypervisor: HvReport,
}

impl Report {
    /// Reads CPUID, the memory map and the hypervisor detection.
    pub fn gather(regions: &MemoryRegions) -> Report {
        let leaf0 = __cpuid(0);
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&leaf0.ecx.to_le_bytes());
        let mut brand = [0u8; 48];
        if __cpuid(0x8000_0000).eax >= 0x8000_0004 {
            for (i, leaf) in (0x8000_0002u32..=0x8000_0004).enumerate() {
                let r = __cpuid(leaf);
                for (j, reg) in [r.eax, r.ebx, r.ecx, r.edx].into_iter().enumerate() {
                    brand[i * 16 + j * 4..][..4].copy_from_slice(&reg.to_le_bytes());
                }
            }
        }
        let hypervisor = *crate::hyperv::detect();
        let usable_bytes = regions.iter().filter(|r| r.kind == MemoryRegionKind::Usable).map(|r| r.end - r.start).sum();
        Report { vendor, brand, usable_bytes, hypervisor }
    }
}

fn text(bytes: &[u8]) -> &str {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    core::str::from_utf8(&bytes[..end]).unwrap_or("?").trim()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "platform report:")?;
        writeln!(f, "  cpu: {} ({})", text(&self.brand), text(&self.vendor))?;
        writeln!(f, "  memory: {} MiB usable", self.usable_bytes >> 20)?;
        writeln!(f, "  hypervisor: {}", crate::hyperv::summary(&self.hypervisor))?;
        // The detailed report, indented under the summary line.
        let detail = alloc::format!("{}", self.hypervisor);
        let mut lines = detail.lines().peekable();
        while let Some(line) = lines.next() {
            write!(f, "    {line}")?;
            if lines.peek().is_some() {
                writeln!(f)?;
            }
        }
        Ok(())
    }
}
