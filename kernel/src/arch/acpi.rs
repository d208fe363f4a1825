//! Just enough ACPI for the PM timer and for powering off and resetting: RSDP → XSDT (or RSDT) → FADT → DSDT.
//!
//! The PM timer is a free-running counter at 3.579545 MHz in I/O space (ACPI 6.5 §4.8.3.3), present on QEMU's q35
//! and on Hyper-V; the kernel uses it as a calibration reference. Layouts follow ACPI 6.5 §5.2.5.3 (RSDP), §5.2.6
//! (table header), §5.2.8 (XSDT), §5.2.9 (FADT) and §5.2.3.2 (Generic Address Structure).
//!
//! For power-off ([`SleepControl`], [`s5_sleep_type`]) the FADT gives the PM1 control registers (§4.8.3.2.1) and
//! the DSDT the `\_S5` sleep-type values (§7.4.2); for restart ([`ResetRegister`]) the FADT gives the reset
//! register (§4.8.3.6). The `\_S5` values are read by a small decoder of one AML construct, `Name (_S5, Package
//! {...})` (§20.2.5.1 NameOp, §20.2.5.4 PackageOp, §20.2.4 PkgLength, §20.2.3 integer data), not by the `acpi`
//! crate: its 7.0 pre-release yields `\_S5` only through its `aml` feature, a whole interpreter that runs the
//! DSDT's module-level code (with its own port and memory accesses) and has panicking paths on malformed AML, and its
//! table walk maps firmware-given lengths through an infallible handler; the registers it would yield are three
//! fields of the FADT this module already checks. Firmware whose `\_S5` is a method rather than a package is
//! reported as unsupported.
//!
//! Firmware tables are read by copying bytes out of the physical-memory window; every length, signature and checksum
//! is checked before a field is believed, and a missing or malformed table is an error, never a panic.

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

/// Why a table or a register the kernel looked for was not found or not believed.
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
    /// The FADT describes no PM1a control register in I/O space (for example on hardware-reduced ACPI).
    NoPm1Control,
    /// The FADT does not say the reset register is supported, or describes one the kernel cannot write.
    NoResetRegister,
    /// The DSDT defines no `\_S5` package.
    NoS5,
}

impl core::fmt::Display for AcpiError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiError::NoRsdp => f.write_str("no RSDP"),
            AcpiError::OutOfWindow => f.write_str("table outside the physical-memory window"),
            AcpiError::Malformed(what) => write!(f, "malformed {what}"),
            AcpiError::NoFadt => f.write_str("no FADT"),
            AcpiError::NoPmTimer => f.write_str("the FADT lists no PM timer"),
            AcpiError::NoPm1Control => f.write_str("the FADT lists no PM1a control register in I/O space"),
            AcpiError::NoResetRegister => f.write_str("the FADT lists no supported reset register"),
            AcpiError::NoS5 => f.write_str("the DSDT defines no \\_S5 package"),
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

/// Finds and reads the FADT through the RSDP at `rsdp_phys`; returns it with its length (fields past the table's
/// end read as zero, "absent").
fn read_fadt(rsdp_phys: Option<u64>) -> Result<(Fadt, usize), AcpiError> {
    let fadt_phys = find_fadt(rsdp_phys.ok_or(AcpiError::NoRsdp)?)?;
    let header: SdtHeader = read_struct(fadt_phys)?;
    let mut fadt = Fadt::new_zeroed();
    let len = (header.length.get() as usize).min(size_of::<Fadt>());
    read_phys(fadt_phys, &mut fadt.as_mut_bytes()[..len])?;
    Ok((fadt, len))
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
        let (fadt, _) = read_fadt(rsdp_phys)?;
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

/// FADT flag RESET_REG_SUP: the reset register is supported (ACPI 6.5 §5.2.9, table 5.10).
const FADT_RESET_REG_SUP: u32 = 1 << 10;
/// Generic Address Structure address space: system memory.
const ADDRESS_SPACE_SYSTEM_MEMORY: u8 = 0;
/// Generic Address Structure address space: PCI configuration space (segment 0, bus 0).
const ADDRESS_SPACE_PCI_CONFIG: u8 = 2;

/// The I/O port of a fixed register block, from its `X_` Generic Address when that is non-zero, else from its
/// 32-bit field (whose length field must be at least `min_len`): `Ok(None)` when the FADT names no block,
/// `Err(())` when it names one outside 16-bit I/O space.
fn io_block(extended: &GenericAddress, legacy: u32, legacy_len: u8, min_len: u8) -> Result<Option<u16>, ()> {
    let address = extended.address.get();
    if address != 0 {
        if extended.address_space != ADDRESS_SPACE_SYSTEM_IO {
            return Err(());
        }
        return u16::try_from(address).map(Some).map_err(|_| ());
    }
    if legacy == 0 {
        return Ok(None);
    }
    if legacy_len < min_len {
        return Err(());
    }
    u16::try_from(legacy).map(Some).map_err(|_| ())
}

/// The registers that put the machine into a sleep state: PM1a_CNT and PM1b_CNT (ACPI 6.5 §4.8.3.2.1), and the
/// SMI command that hands the fixed hardware from firmware to the OS (§4.8.3.1, the FADT's SMI_CMD/ACPI_ENABLE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepControl {
    /// PM1a_CNT's I/O port.
    pub pm1a_port: u16,
    /// PM1b_CNT's I/O port, when the machine has a second block.
    pub pm1b_port: Option<u16>,
    /// SMI_CMD's I/O port and the ACPI_ENABLE value to write there, when the firmware offers the handover (a machine
    /// that is always in ACPI mode has none).
    pub acpi_enable: Option<(u16, u8)>,
}

impl SleepControl {
    /// Reads the PM1 control registers from the FADT through the RSDP at `rsdp_phys` (usually [`rsdp`]).
    pub fn find(rsdp_phys: Option<u64>) -> Result<SleepControl, AcpiError> {
        let (fadt, _) = read_fadt(rsdp_phys)?;
        if fadt.flags.get() & FADT_HW_REDUCED_ACPI != 0 {
            return Err(AcpiError::NoPm1Control);
        }
        let pm1_len = fadt.pm1_cnt_len;
        let pm1a = io_block(&fadt.x_pm1a_cnt_blk, fadt.pm1a_cnt_blk.get(), pm1_len, 2);
        let pm1b = io_block(&fadt.x_pm1b_cnt_blk, fadt.pm1b_cnt_blk.get(), pm1_len, 2);
        let (Ok(Some(pm1a_port)), Ok(pm1b_port)) = (pm1a, pm1b) else {
            return Err(AcpiError::NoPm1Control);
        };
        let acpi_enable = match (u16::try_from(fadt.smi_cmd.get()), fadt.acpi_enable) {
            (Ok(port), value) if port != 0 && value != 0 => Some((port, value)),
            _ => None,
        };
        Ok(SleepControl { pm1a_port, pm1b_port, acpi_enable })
    }
}

/// Where the ACPI reset register lives (ACPI 6.5 §4.8.3.6: a Generic Address in system I/O, system memory, or PCI
/// configuration space of segment 0, bus 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTarget {
    /// An I/O port.
    Io(u16),
    /// A byte of physical memory.
    Memory(u64),
    /// A byte of PCI configuration space on bus 0 (§5.2.3.2: device in bits 47:32, function in 31:16, offset in 15:0).
    PciConfig {
        /// The PCI device number (0–31).
        device: u8,
        /// The PCI function number (0–7).
        function: u8,
        /// The byte offset in the function's configuration space (0–255).
        offset: u8,
    },
}

impl core::fmt::Display for ResetTarget {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ResetTarget::Io(port) => write!(f, "I/O port {port:#x}"),
            ResetTarget::Memory(address) => write!(f, "memory {address:#x}"),
            ResetTarget::PciConfig { device, function, offset } => {
                write!(f, "PCI 00:{device:02x}.{function} offset {offset:#x}")
            }
        }
    }
}

/// The FADT's reset register and the value that resets the machine when written to it (ACPI 6.5 §4.8.3.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResetRegister {
    /// Where to write.
    pub target: ResetTarget,
    /// What to write (RESET_VALUE).
    pub value: u8,
}

impl ResetRegister {
    /// Reads the reset register from the FADT through the RSDP at `rsdp_phys`, when the FADT's RESET_REG_SUP flag
    /// says it is supported and it is the 8-bit register the specification requires.
    pub fn find(rsdp_phys: Option<u64>) -> Result<ResetRegister, AcpiError> {
        let (fadt, _) = read_fadt(rsdp_phys)?;
        Self::from_fadt(&fadt)
    }

    /// The reset register `fadt` describes (fields past a short FADT's end are zero, so "unsupported").
    fn from_fadt(fadt: &Fadt) -> Result<ResetRegister, AcpiError> {
        let reg = &fadt.reset_reg;
        if fadt.flags.get() & FADT_RESET_REG_SUP == 0 || reg.bit_width != 8 || reg.bit_offset != 0 {
            return Err(AcpiError::NoResetRegister);
        }
        let address = reg.address.get();
        let target = match reg.address_space {
            ADDRESS_SPACE_SYSTEM_IO => match u16::try_from(address) {
                Ok(port) if port != 0 => ResetTarget::Io(port),
                _ => return Err(AcpiError::NoResetRegister),
            },
            ADDRESS_SPACE_SYSTEM_MEMORY if address != 0 => ResetTarget::Memory(address),
            ADDRESS_SPACE_PCI_CONFIG => {
                let (device, function, offset) = (address >> 32, (address >> 16) & 0xFFFF, address & 0xFFFF);
                if address >> 48 != 0 || device > 31 || function > 7 || offset > 0xFF {
                    return Err(AcpiError::NoResetRegister);
                }
                ResetTarget::PciConfig { device: device as u8, function: function as u8, offset: offset as u8 }
            }
            _ => return Err(AcpiError::NoResetRegister),
        };
        Ok(ResetRegister { target, value: fadt.reset_value })
    }
}

/// The sleep-type values of the soft-off state S5, from the DSDT's `\_S5` package (ACPI 6.5 §7.4.2.5, §16.1.6):
/// written to PM1a_CNT.SLP_TYP and PM1b_CNT.SLP_TYP (3 bits each) together with SLP_EN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SleepType {
    /// SLP_TYPa, for PM1a_CNT.
    pub pm1a: u8,
    /// SLP_TYPb, for PM1b_CNT.
    pub pm1b: u8,
}

/// Reads the DSDT that the FADT names (through the RSDP at `rsdp_phys`) and decodes its `\_S5` package.
pub fn s5_sleep_type(rsdp_phys: Option<u64>) -> Result<SleepType, AcpiError> {
    let (fadt, _) = read_fadt(rsdp_phys)?;
    let dsdt_phys = match fadt.x_dsdt.get() {
        0 => u64::from(fadt.dsdt.get()),
        extended => extended,
    };
    if dsdt_phys == 0 {
        return Err(AcpiError::Malformed("FADT DSDT address"));
    }
    let header = read_table_header(dsdt_phys)?;
    if &header.signature != b"DSDT" {
        return Err(AcpiError::Malformed("DSDT signature"));
    }
    // read_table_header bounded the length to [header size, MAX_TABLE_LEN].
    let mut aml = alloc::vec![0u8; header.length.get() as usize - size_of::<SdtHeader>()];
    read_phys(dsdt_phys + size_of::<SdtHeader>() as u64, &mut aml)?;
    decode_s5(&aml)
}

/// AML NameOp (ACPI 6.5 §20.2.5.1).
const AML_NAME_OP: u8 = 0x08;
/// AML PackageOp (§20.2.5.4).
const AML_PACKAGE_OP: u8 = 0x12;
/// AML RootChar `\` (§20.2.2).
const AML_ROOT_CHAR: u8 = b'\\';
/// AML ZeroOp, OneOp and OnesOp (§20.2.3).
const AML_ZERO_OP: u8 = 0x00;
/// AML OneOp.
const AML_ONE_OP: u8 = 0x01;
/// AML BytePrefix, WordPrefix, DWordPrefix and QWordPrefix (§20.2.3): an integer of 1, 2, 4 or 8 bytes follows.
const AML_BYTE_PREFIX: u8 = 0x0A;
/// AML WordPrefix.
const AML_WORD_PREFIX: u8 = 0x0B;
/// AML DWordPrefix.
const AML_DWORD_PREFIX: u8 = 0x0C;
/// AML QWordPrefix.
const AML_QWORD_PREFIX: u8 = 0x0E;

/// Finds `Name (_S5, Package {SLP_TYPa, SLP_TYPb, ...})` (or `Name (\_S5, ...)`) in the AML byte code `aml` and
/// returns its first two elements. Candidates are `_S5_` preceded by NameOp (optionally with a root prefix) and
/// followed by PackageOp; the first one that decodes wins, and if none does, the first candidate's error is
/// returned (or [`AcpiError::NoS5`] when there is none, for example when `\_S5` is a method).
pub fn decode_s5(aml: &[u8]) -> Result<SleepType, AcpiError> {
    let mut first_error = None;
    let mut from = 0;
    while let Some(found) = aml.get(from..).and_then(|rest| rest.windows(4).position(|w| w == b"_S5_")) {
        let name = from + found;
        from = name + 1;
        let before = |back: usize| name.checked_sub(back).and_then(|i| aml.get(i)).copied();
        let named =
            before(1) == Some(AML_NAME_OP) || (before(1) == Some(AML_ROOT_CHAR) && before(2) == Some(AML_NAME_OP));
        if !named || aml.get(name + 4) != Some(&AML_PACKAGE_OP) {
            continue;
        }
        match decode_s5_package(aml.get(name + 5..).unwrap_or_default()) {
            Ok(sleep_type) => return Ok(sleep_type),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.unwrap_or(AcpiError::NoS5))
}

/// Decodes a PkgLength (ACPI 6.5 §20.2.4) at the start of `bytes`: the package's length (which counts the PkgLength
/// bytes themselves) and the number of bytes the encoding took.
fn decode_pkg_length(bytes: &[u8]) -> Result<(usize, usize), AcpiError> {
    let lead = *bytes.first().ok_or(AcpiError::Malformed("\\_S5 package length"))?;
    let follow = usize::from(lead >> 6);
    if follow == 0 {
        return Ok((usize::from(lead & 0x3F), 1));
    }
    // With following bytes, bits 5:4 of the lead byte are reserved zero and bits 3:0 are the length's low nibble.
    if lead & 0x30 != 0 {
        return Err(AcpiError::Malformed("\\_S5 package length"));
    }
    let extra = bytes.get(1..=follow).ok_or(AcpiError::Malformed("\\_S5 package length"))?;
    let length = extra
        .iter()
        .enumerate()
        .fold(usize::from(lead & 0x0F), |length, (i, &byte)| length | usize::from(byte) << (4 + 8 * i));
    Ok((length, 1 + follow))
}

/// Decodes one integer constant (ZeroOp, OneOp, or a Byte/Word/DWord/QWord prefix and its value, §20.2.3) at the
/// start of `bytes`: its value and its encoded size.
fn decode_aml_integer(bytes: &[u8]) -> Result<(u64, usize), AcpiError> {
    let not_integer = AcpiError::Malformed("\\_S5 element (not an integer constant)");
    let (&op, rest) = bytes.split_first().ok_or(not_integer)?;
    let width = match op {
        AML_ZERO_OP => return Ok((0, 1)),
        AML_ONE_OP => return Ok((1, 1)),
        AML_BYTE_PREFIX => 1,
        AML_WORD_PREFIX => 2,
        AML_DWORD_PREFIX => 4,
        AML_QWORD_PREFIX => 8,
        _ => return Err(not_integer),
    };
    let value = rest.get(..width).ok_or(AcpiError::Malformed("\\_S5 element (truncated)"))?;
    let value = value.iter().rev().fold(0u64, |value, &byte| value << 8 | u64::from(byte));
    Ok((value, 1 + width))
}

/// Decodes the package that follows `Name (_S5, PackageOp`: `bytes` starts at its PkgLength.
fn decode_s5_package(bytes: &[u8]) -> Result<SleepType, AcpiError> {
    let (length, length_size) = decode_pkg_length(bytes)?;
    let package = bytes.get(..length).ok_or(AcpiError::Malformed("\\_S5 package (runs past the DSDT)"))?;
    let body = package.get(length_size..).ok_or(AcpiError::Malformed("\\_S5 package length"))?;
    let (&count, elements) = body.split_first().ok_or(AcpiError::Malformed("\\_S5 package (no element count)"))?;
    if count < 2 {
        return Err(AcpiError::Malformed("\\_S5 package (fewer than two elements)"));
    }
    let (pm1a, used) = decode_aml_integer(elements)?;
    let (pm1b, _) = decode_aml_integer(elements.get(used..).unwrap_or_default())?;
    let sleep_type = |value: u64| {
        u8::try_from(value).ok().filter(|&v| v <= 7).ok_or(AcpiError::Malformed("\\_S5 value (wider than SLP_TYP)"))
    };
    Ok(SleepType { pm1a: sleep_type(pm1a)?, pm1b: sleep_type(pm1b)? })
}

use crate::ktest::{KTest, TestResult, skip};
use crate::{kassert, kassert_eq};

/// In-kernel tests of the `\_S5` decoder (on hand-made AML, including every truncation) and of the power registers
/// of the machine the kernel runs on.
pub const KTESTS: &[KTest] = &[
    KTest { name: "arch::acpi::s5_package_of_zero_ops", run: s5_package_of_zero_ops },
    KTest { name: "arch::acpi::s5_package_with_root_prefix_and_long_length", run: s5_package_with_root_prefix },
    KTest { name: "arch::acpi::s5_malformed_is_an_error", run: s5_malformed_is_an_error },
    KTest { name: "arch::acpi::s5_truncations_are_errors", run: s5_truncations_are_errors },
    KTest { name: "arch::acpi::power_registers_of_this_machine", run: power_registers_of_this_machine },
];

/// `Name (_S5, Package (4) {Zero, Zero, Zero, Zero})` after some unrelated AML, as QEMU writes it.
const S5_ZEROS: &[u8] =
    &[0x10, 0x05, b'_', b'S', b'B', b'_', 0x08, b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0];

fn s5_package_of_zero_ops() -> TestResult {
    kassert_eq!(decode_s5(S5_ZEROS), Ok(SleepType { pm1a: 0, pm1b: 0 }));
    Ok(())
}

fn s5_package_with_root_prefix() -> TestResult {
    // `Name (\_S5, Package (3) {0x05, One, 0x00})` with a two-byte PkgLength (2 + 1 + 2 + 1 + 2 = 8), after a
    // string that contains "_S5_" outside a Name.
    let aml = [
        0x0D, b'_', b'S', b'5', b'_', 0x00, // a String, not a Name: ignored
        0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x48, 0x00, 0x03, 0x0A, 0x05, 0x01, 0x0A, 0x00, 0xA5,
    ];
    kassert_eq!(decode_s5(&aml), Ok(SleepType { pm1a: 5, pm1b: 1 }));
    // Word and DWord encodings of small values are integers too.
    let wide = [0x08, b'_', b'S', b'5', b'_', 0x12, 0x0A, 0x02, 0x0B, 0x07, 0x00, 0x0C, 0x06, 0, 0, 0];
    kassert_eq!(decode_s5(&wide), Ok(SleepType { pm1a: 7, pm1b: 6 }));
    Ok(())
}

fn s5_malformed_is_an_error() -> TestResult {
    let bad = |aml: &[u8]| matches!(decode_s5(aml), Err(AcpiError::Malformed(_)));
    // A value wider than SLP_TYP's 3 bits, OnesOp, a single element, a package longer than the table, a reserved
    // PkgLength bit.
    kassert!(bad(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0A, 0x08, 0x00]));
    kassert!(bad(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x04, 0x02, 0xFF, 0x00]));
    kassert!(bad(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x03, 0x01, 0x00]));
    kassert!(bad(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x3F, 0x02, 0x00, 0x00]));
    kassert!(bad(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x70, 0x00, 0x02, 0x00, 0x00]));
    // A method `\_S5` (MethodOp, PkgLength, name, flags, ...) is not a package: no candidate at all.
    kassert_eq!(decode_s5(&[0x14, 0x09, b'_', b'S', b'5', b'_', 0x00, 0xA4, 0x0A, 0x05]), Err(AcpiError::NoS5));
    kassert_eq!(decode_s5(&[]), Err(AcpiError::NoS5));
    // A malformed candidate does not hide a good one after it.
    let mut two = alloc::vec![0x08, b'_', b'S', b'5', b'_', 0x12, 0x03, 0x01, 0x00];
    two.extend_from_slice(S5_ZEROS);
    kassert_eq!(decode_s5(&two), Ok(SleepType { pm1a: 0, pm1b: 0 }));
    Ok(())
}

fn s5_truncations_are_errors() -> TestResult {
    let full = [0x08, b'\\', b'_', b'S', b'5', b'_', 0x12, 0x4A, 0x00, 0x04, 0x0A, 0x05, 0x0B, 0x03, 0x00, 0x00, 0x00];
    kassert_eq!(decode_s5(&full), Ok(SleepType { pm1a: 5, pm1b: 3 }));
    for len in 0..full.len() {
        kassert!(decode_s5(&full[..len]).is_err(), "a DSDT cut to {len} bytes decoded");
    }
    Ok(())
}

fn power_registers_of_this_machine() -> TestResult {
    if rsdp().is_none() {
        return skip("no RSDP from the bootloader");
    }
    let sleep = SleepControl::find(rsdp()).map_err(|e| alloc::format!("PM1 control: {e}"))?;
    kassert!(sleep.pm1a_port != 0);
    let s5 = s5_sleep_type(rsdp()).map_err(|e| alloc::format!("\\_S5: {e}"))?;
    kassert!(s5.pm1a <= 7 && s5.pm1b <= 7);
    // Whatever the FADT says about the reset register, reading it twice gives the same answer.
    kassert_eq!(ResetRegister::find(rsdp()), ResetRegister::find(rsdp()));
    Ok(())
}
