//! Just enough ACPI to find the power-management timer: RSDP → XSDT (or RSDT) → FADT.
//!
//! The PM timer is a free-running counter at 3.579545 MHz in I/O space (ACPI 6.5 §4.8.3.3), present on QEMU's q35
//! and on Hyper-V; the kernel uses it as a calibration reference. Layouts follow ACPI 6.5 §5.2.5.3 (RSDP), §5.2.6
//! (table header), §5.2.8 (XSDT), §5.2.9 (FADT) and §5.2.3.2 (Generic Address Structure).
//!
//! Firmware tables are read by copying bytes out of the physical-memory window; every length, signature and checksum
//! is checked before a field is believed, and a missing or malformed table just means "no PM timer".

use crate::mm::{phys_to_virt, phys_window_end};
use core::mem::{offset_of, size_of};
use x86_64::PhysAddr;
use x86_64::instructions::port::Port;
use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The PM timer's rate, in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// Root System Description Pointer (ACPI 6.5 §5.2.5.3), revision 2 layout.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Rsdp {
    signature: [u8; 8],
    checksum: u8,
    oem_id: [u8; 6],
    revision: u8,
    rsdt_address: U32,
    length: U32,
    xsdt_address: U64,
    extended_checksum: u8,
    reserved: [u8; 3],
}

const _: () = {
    assert!(size_of::<Rsdp>() == 36);
    assert!(offset_of!(Rsdp, signature) == 0);
    assert!(offset_of!(Rsdp, checksum) == 8);
    assert!(offset_of!(Rsdp, oem_id) == 9);
    assert!(offset_of!(Rsdp, revision) == 15);
    assert!(offset_of!(Rsdp, rsdt_address) == 16);
    assert!(offset_of!(Rsdp, length) == 20);
    assert!(offset_of!(Rsdp, xsdt_address) == 24);
    assert!(offset_of!(Rsdp, extended_checksum) == 32);
    assert!(offset_of!(Rsdp, reserved) == 33);
};

/// The header every system description table starts with (ACPI 6.5 §5.2.6).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct SdtHeader {
    signature: [u8; 4],
    length: U32,
    revision: u8,
    checksum: u8,
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: U32,
    creator_id: U32,
    creator_revision: U32,
}

const _: () = {
    assert!(size_of::<SdtHeader>() == 36);
    assert!(offset_of!(SdtHeader, signature) == 0);
    assert!(offset_of!(SdtHeader, length) == 4);
    assert!(offset_of!(SdtHeader, revision) == 8);
    assert!(offset_of!(SdtHeader, checksum) == 9);
    assert!(offset_of!(SdtHeader, oem_id) == 10);
    assert!(offset_of!(SdtHeader, oem_table_id) == 16);
    assert!(offset_of!(SdtHeader, oem_revision) == 24);
    assert!(offset_of!(SdtHeader, creator_id) == 28);
    assert!(offset_of!(SdtHeader, creator_revision) == 32);
};

/// Generic Address Structure (ACPI 6.5 §5.2.3.2).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct GenericAddress {
    address_space: u8,
    bit_width: u8,
    bit_offset: u8,
    access_size: u8,
    address: U64,
}

const _: () = {
    assert!(size_of::<GenericAddress>() == 12);
    assert!(offset_of!(GenericAddress, address_space) == 0);
    assert!(offset_of!(GenericAddress, bit_width) == 1);
    assert!(offset_of!(GenericAddress, bit_offset) == 2);
    assert!(offset_of!(GenericAddress, access_size) == 3);
    assert!(offset_of!(GenericAddress, address) == 4);
};

/// Generic Address Structure address space: system I/O.
const ADDRESS_SPACE_SYSTEM_IO: u8 = 1;

/// The Fixed ACPI Description Table up to `X_PM_TMR_BLK` (ACPI 6.5 §5.2.9, table 5.9); the fields after it are of
/// no use here. A shorter (older) FADT is read with the missing tail as zeros.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Fadt {
    header: SdtHeader,
    firmware_ctrl: U32,
    dsdt: U32,
    reserved0: u8,
    preferred_pm_profile: u8,
    sci_int: [u8; 2],
    smi_cmd: U32,
    acpi_enable: u8,
    acpi_disable: u8,
    s4bios_req: u8,
    pstate_cnt: u8,
    pm1a_evt_blk: U32,
    pm1b_evt_blk: U32,
    pm1a_cnt_blk: U32,
    pm1b_cnt_blk: U32,
    pm2_cnt_blk: U32,
    pm_tmr_blk: U32,
    gpe0_blk: U32,
    gpe1_blk: U32,
    pm1_evt_len: u8,
    pm1_cnt_len: u8,
    pm2_cnt_len: u8,
    pm_tmr_len: u8,
    gpe0_blk_len: u8,
    gpe1_blk_len: u8,
    gpe1_base: u8,
    cst_cnt: u8,
    p_lvl2_lat: [u8; 2],
    p_lvl3_lat: [u8; 2],
    flush_size: [u8; 2],
    flush_stride: [u8; 2],
    duty_offset: u8,
    duty_width: u8,
    day_alrm: u8,
    mon_alrm: u8,
    century: u8,
    iapc_boot_arch: [u8; 2],
    reserved1: u8,
    flags: U32,
    reset_reg: GenericAddress,
    reset_value: u8,
    arm_boot_arch: [u8; 2],
    fadt_minor_version: u8,
    x_firmware_ctrl: U64,
    x_dsdt: U64,
    x_pm1a_evt_blk: GenericAddress,
    x_pm1b_evt_blk: GenericAddress,
    x_pm1a_cnt_blk: GenericAddress,
    x_pm1b_cnt_blk: GenericAddress,
    x_pm2_cnt_blk: GenericAddress,
    x_pm_tmr_blk: GenericAddress,
}

const _: () = {
    assert!(size_of::<Fadt>() == 220);
    assert!(offset_of!(Fadt, firmware_ctrl) == 36);
    assert!(offset_of!(Fadt, dsdt) == 40);
    assert!(offset_of!(Fadt, reserved0) == 44);
    assert!(offset_of!(Fadt, preferred_pm_profile) == 45);
    assert!(offset_of!(Fadt, sci_int) == 46);
    assert!(offset_of!(Fadt, smi_cmd) == 48);
    assert!(offset_of!(Fadt, acpi_enable) == 52);
    assert!(offset_of!(Fadt, acpi_disable) == 53);
    assert!(offset_of!(Fadt, s4bios_req) == 54);
    assert!(offset_of!(Fadt, pstate_cnt) == 55);
    assert!(offset_of!(Fadt, pm1a_evt_blk) == 56);
    assert!(offset_of!(Fadt, pm1b_evt_blk) == 60);
    assert!(offset_of!(Fadt, pm1a_cnt_blk) == 64);
    assert!(offset_of!(Fadt, pm1b_cnt_blk) == 68);
    assert!(offset_of!(Fadt, pm2_cnt_blk) == 72);
    assert!(offset_of!(Fadt, pm_tmr_blk) == 76);
    assert!(offset_of!(Fadt, gpe0_blk) == 80);
    assert!(offset_of!(Fadt, gpe1_blk) == 84);
    assert!(offset_of!(Fadt, pm1_evt_len) == 88);
    assert!(offset_of!(Fadt, pm1_cnt_len) == 89);
    assert!(offset_of!(Fadt, pm2_cnt_len) == 90);
    assert!(offset_of!(Fadt, pm_tmr_len) == 91);
    assert!(offset_of!(Fadt, gpe0_blk_len) == 92);
    assert!(offset_of!(Fadt, gpe1_blk_len) == 93);
    assert!(offset_of!(Fadt, gpe1_base) == 94);
    assert!(offset_of!(Fadt, cst_cnt) == 95);
    assert!(offset_of!(Fadt, p_lvl2_lat) == 96);
    assert!(offset_of!(Fadt, p_lvl3_lat) == 98);
    assert!(offset_of!(Fadt, flush_size) == 100);
    assert!(offset_of!(Fadt, flush_stride) == 102);
    assert!(offset_of!(Fadt, duty_offset) == 104);
    assert!(offset_of!(Fadt, duty_width) == 105);
    assert!(offset_of!(Fadt, day_alrm) == 106);
    assert!(offset_of!(Fadt, mon_alrm) == 107);
    assert!(offset_of!(Fadt, century) == 108);
    assert!(offset_of!(Fadt, iapc_boot_arch) == 109);
    assert!(offset_of!(Fadt, reserved1) == 111);
    assert!(offset_of!(Fadt, flags) == 112);
    assert!(offset_of!(Fadt, reset_reg) == 116);
    assert!(offset_of!(Fadt, reset_value) == 128);
    assert!(offset_of!(Fadt, arm_boot_arch) == 129);
    assert!(offset_of!(Fadt, fadt_minor_version) == 131);
    assert!(offset_of!(Fadt, x_firmware_ctrl) == 132);
    assert!(offset_of!(Fadt, x_dsdt) == 140);
    assert!(offset_of!(Fadt, x_pm1a_evt_blk) == 148);
    assert!(offset_of!(Fadt, x_pm1b_evt_blk) == 160);
    assert!(offset_of!(Fadt, x_pm1a_cnt_blk) == 172);
    assert!(offset_of!(Fadt, x_pm1b_cnt_blk) == 184);
    assert!(offset_of!(Fadt, x_pm2_cnt_blk) == 196);
    assert!(offset_of!(Fadt, x_pm_tmr_blk) == 208);
};

/// FADT flag TMR_VAL_EXT: the PM timer has 32 bits (else 24).
const FADT_TMR_VAL_EXT: u32 = 1 << 8;
/// FADT flag HW_REDUCED_ACPI: fixed hardware such as the PM timer is absent.
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// Tables larger than this are not believed.
const MAX_TABLE_LEN: u32 = 1 << 20;

/// The RSDP's physical address, as the bootloader reported it.
static RSDP: spin::Once<Option<u64>> = spin::Once::new();

/// Records the RSDP address from `BootInfo::rsdp_addr`; called once at boot.
pub fn set_rsdp(rsdp_phys: Option<u64>) {
    RSDP.call_once(|| rsdp_phys);
}

/// The RSDP address recorded by [`set_rsdp`].
pub fn rsdp() -> Option<u64> {
    RSDP.get().copied().flatten()
}

/// Why no PM timer was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// The bootloader passed no RSDP address.
    NoRsdp,
    /// A structure lies outside the physical-memory window.
    OutOfWindow,
    /// A signature, length or checksum is wrong.
    Malformed(&'static str),
    /// The root table lists no FADT.
    NoFadt,
    /// The FADT describes no usable PM timer.
    NoPmTimer,
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiError::NoRsdp => f.write_str("no RSDP"),
            AcpiError::OutOfWindow => f.write_str("table outside the physical-memory window"),
            AcpiError::Malformed(what) => write!(f, "malformed {what}"),
            AcpiError::NoFadt => f.write_str("no FADT"),
            AcpiError::NoPmTimer => f.write_str("the FADT lists no PM timer"),
        }
    }
}

/// Copies `out.len()` bytes of physical memory at `phys` out of the physical-memory window.
fn read_phys(phys: u64, out: &mut [u8]) -> Result<(), AcpiError> {
    let end = phys.checked_add(out.len() as u64).ok_or(AcpiError::OutOfWindow)?;
    if end > phys_window_end() {
        return Err(AcpiError::OutOfWindow);
    }
    let src = phys_to_virt(PhysAddr::new(phys)).as_ptr::<u8>();
    for (i, byte) in out.iter_mut().enumerate() {
        // SAFETY: `[phys, end)` lies inside the physical-memory window (checked above), which the bootloader maps
        // readable. The bytes are firmware ACPI tables, which the kernel never writes and owns no Rust object in;
        // volatile byte reads make no assumption about their contents.
        *byte = unsafe { src.add(i).read_volatile() };
    }
    Ok(())
}

/// Reads a `T` from physical memory.
fn read_struct<T: FromBytes + IntoBytes>(phys: u64) -> Result<T, AcpiError> {
    let mut value = T::new_zeroed();
    read_phys(phys, value.as_mut_bytes())?;
    Ok(value)
}

/// The byte sum of `len` bytes of physical memory (ACPI checksums make it 0).
fn checksum(phys: u64, len: u32) -> Result<u8, AcpiError> {
    let mut sum = 0u8;
    let mut chunk = [0u8; 64];
    let mut offset = 0u64;
    while offset < u64::from(len) {
        let n = (u64::from(len) - offset).min(chunk.len() as u64) as usize;
        read_phys(phys + offset, &mut chunk[..n])?;
        sum = chunk[..n].iter().fold(sum, |s, &b| s.wrapping_add(b));
        offset += n as u64;
    }
    Ok(sum)
}

/// Reads and checks the header of the table at `phys`; returns it when its checksum holds.
fn read_table_header(phys: u64) -> Result<SdtHeader, AcpiError> {
    let header: SdtHeader = read_struct(phys)?;
    let len = header.length.get();
    if !(size_of::<SdtHeader>() as u32..=MAX_TABLE_LEN).contains(&len) {
        return Err(AcpiError::Malformed("table length"));
    }
    if checksum(phys, len)? != 0 {
        return Err(AcpiError::Malformed("table checksum"));
    }
    Ok(header)
}

/// Finds the FADT's physical address through the RSDP at `rsdp_phys`.
fn find_fadt(rsdp_phys: u64) -> Result<u64, AcpiError> {
    let rsdp: Rsdp = read_struct(rsdp_phys)?;
    if &rsdp.signature != b"RSD PTR " {
        return Err(AcpiError::Malformed("RSDP signature"));
    }
    if checksum(rsdp_phys, 20)? != 0 {
        return Err(AcpiError::Malformed("RSDP checksum"));
    }
    // Revision 2+ has the XSDT with 64-bit entries; revision 0 only the RSDT with 32-bit ones.
    let use_xsdt = rsdp.revision >= 2 && rsdp.xsdt_address.get() != 0;
    let (root, entry_size) = if use_xsdt {
        if !(36..=4096).contains(&rsdp.length.get()) || checksum(rsdp_phys, rsdp.length.get())? != 0 {
            return Err(AcpiError::Malformed("RSDP extended checksum"));
        }
        (rsdp.xsdt_address.get(), 8u64)
    } else {
        (u64::from(rsdp.rsdt_address.get()), 4u64)
    };
    let header = read_table_header(root)?;
    let expected: &[u8; 4] = if use_xsdt { b"XSDT" } else { b"RSDT" };
    if &header.signature != expected {
        return Err(AcpiError::Malformed("root table signature"));
    }
    let entries = (u64::from(header.length.get()) - size_of::<SdtHeader>() as u64) / entry_size;
    for i in 0..entries {
        let at = root + size_of::<SdtHeader>() as u64 + i * entry_size;
        let table = if use_xsdt { read_struct::<U64>(at)?.get() } else { u64::from(read_struct::<U32>(at)?.get()) };
        // A bad entry is skipped; another entry may still be the FADT.
        if let Ok(entry) = read_table_header(table)
            && &entry.signature == b"FACP"
        {
            return Ok(table);
        }
    }
    Err(AcpiError::NoFadt)
}

/// The ACPI power-management timer: an I/O port counting at [`PM_TIMER_HZ`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmTimer {
    /// Its I/O port.
    pub port: u16,
    /// Its width: 24 or 32 bits (it wraps at `1 << bits`).
    pub bits: u32,
}

impl PmTimer {
    /// Finds the PM timer through the RSDP at `rsdp_phys` (usually [`rsdp`]).
    pub fn find(rsdp_phys: Option<u64>) -> Result<PmTimer, AcpiError> {
        let fadt_phys = find_fadt(rsdp_phys.ok_or(AcpiError::NoRsdp)?)?;
        let header: SdtHeader = read_struct(fadt_phys)?;
        // Read what the table has; fields past its end stay zero ("absent").
        let mut fadt = Fadt::new_zeroed();
        let len = (header.length.get() as usize).min(size_of::<Fadt>());
        read_phys(fadt_phys, &mut fadt.as_mut_bytes()[..len])?;
        let flags = fadt.flags.get();
        if flags & FADT_HW_REDUCED_ACPI != 0 {
            return Err(AcpiError::NoPmTimer);
        }
        let bits = if flags & FADT_TMR_VAL_EXT != 0 { 32 } else { 24 };
        let extended = &fadt.x_pm_tmr_blk;
        let port = if extended.address_space == ADDRESS_SPACE_SYSTEM_IO && extended.address.get() != 0 {
            extended.address.get()
        } else if fadt.pm_tmr_len == 4 {
            u64::from(fadt.pm_tmr_blk.get())
        } else {
            0
        };
        match u16::try_from(port) {
            Ok(port) if port != 0 => Ok(PmTimer { port, bits }),
            _ => Err(AcpiError::NoPmTimer),
        }
    }

    /// The current count.
    pub fn read(&self) -> u32 {
        // SAFETY: the FADT names this port as the PM timer, a read-only counter; reading it has no side effects.
        let raw = unsafe { Port::<u32>::new(self.port).read() };
        if self.bits == 32 { raw } else { raw & 0x00FF_FFFF }
    }

    /// Ticks from `earlier` to `later`, across at most one wrap.
    pub fn elapsed(&self, earlier: u32, later: u32) -> u32 {
        let mask = if self.bits == 32 { u32::MAX } else { 0x00FF_FFFF };
        later.wrapping_sub(earlier) & mask
    }
}
