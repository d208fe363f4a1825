//! The PC's CMOS real-time clock (MC146818 registers at I/O ports 0x70/0x71): the wall time the firmware keeps.
//!
//! The kernel reads it once for the loopback VMBus host, which plays Hyper-V's timesync service and needs a host
//! wall clock (under QEMU the RTC follows the host's clock). Registers: 0 seconds, 2 minutes, 4 hours, 7 day of
//! month, 8 month, 9 year (two digits), 0x0A status A (bit 7: update in progress), 0x0B status B (bit 1: 24-hour
//! mode, bit 2: binary instead of BCD), 0x32 century (BCD, where present).

use x86_64::instructions::port::Port;

const INDEX_PORT: u16 = 0x70;
const DATA_PORT: u16 = 0x71;

fn read_register(register: u8) -> u8 {
    // SAFETY: ports 0x70/0x71 are the CMOS index and data ports on every PC-compatible machine (q35, Hyper-V Gen2);
    // writing an index below 0x80 selects a register and leaves NMIs enabled, and reading the data port has no side
    // effect for the time and status registers read here. Interrupt handlers never touch these ports.
    unsafe {
        Port::<u8>::new(INDEX_PORT).write(register);
        Port::<u8>::new(DATA_PORT).read()
    }
}

/// A wall-clock reading: UTC as the RTC keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RtcTime {
    /// Full year.
    pub year: i64,
    /// 1–12.
    pub month: u8,
    /// 1–31.
    pub day: u8,
    /// 0–23.
    pub hour: u8,
    /// 0–59.
    pub minute: u8,
    /// 0–59.
    pub second: u8,
}

impl RtcTime {
    /// Seconds since 1970-01-01 00:00 UTC.
    pub fn unix_seconds(&self) -> i64 {
        // Days from civil (proleptic Gregorian), Howard Hinnant's algorithm.
        let (year, month) = (self.year - i64::from(self.month <= 2), i64::from(self.month));
        let era = year.div_euclid(400);
        let yoe = year.rem_euclid(400);
        let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(self.day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        days * 86_400 + i64::from(self.hour) * 3600 + i64::from(self.minute) * 60 + i64::from(self.second)
    }
}

fn snapshot() -> [u8; 7] {
    [0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32].map(read_register)
}

/// Reads the RTC, waiting out an update in progress and reading until two readings agree. `None` when the values
/// make no sense (no RTC, or a register the firmware left garbage in).
pub fn read() -> Option<RtcTime> {
    let mut previous = None;
    for _ in 0..1000 {
        while read_register(0x0A) & 0x80 != 0 {
            core::hint::spin_loop();
        }
        let now = snapshot();
        if previous == Some(now) {
            return decode(now, read_register(0x0B));
        }
        previous = Some(now);
    }
    None
}

fn decode(raw: [u8; 7], status_b: u8) -> Option<RtcTime> {
    let binary = status_b & 0x04 != 0;
    let value = |byte: u8| if binary { Some(byte) } else { bcd(byte) };
    let [second, minute, hour_raw, day, month, year, century] = raw;
    let pm = hour_raw & 0x80 != 0;
    let mut hour = value(hour_raw & 0x7F)?;
    if status_b & 0x02 == 0 {
        // 12-hour mode: 12 AM is 0, 12 PM is 12.
        hour = (hour % 12) + if pm { 12 } else { 0 };
    }
    let century = bcd(century).filter(|c| (19..=21).contains(c)).unwrap_or(20);
    let time = RtcTime {
        year: i64::from(century) * 100 + i64::from(value(year)?),
        month: value(month)?,
        day: value(day)?,
        hour,
        minute: value(minute)?,
        second: value(second)?,
    };
    let sane = (1..=12).contains(&time.month)
        && (1..=31).contains(&time.day)
        && time.hour < 24
        && time.minute < 60
        && time.second < 60;
    sane.then_some(time)
}

fn bcd(byte: u8) -> Option<u8> {
    let (high, low) = (byte >> 4, byte & 0x0F);
    (high < 10 && low < 10).then_some(high * 10 + low)
}

use crate::kassert_eq;
use crate::ktest::{KTest, TestResult};

/// In-kernel tests of the RTC.
pub const KTESTS: &[KTest] = &[
    KTest { name: "arch::rtc::decoding_and_unix_time", run: decoding_and_unix_time },
    KTest { name: "arch::rtc::reads_a_sane_time", run: reads_a_sane_time },
];

fn decoding_and_unix_time() -> TestResult {
    // 2026-11-22 07:39:36 in BCD, 24-hour mode, century register 0x20.
    let time = decode([0x36, 0x39, 0x07, 0x22, 0x11, 0x26, 0x20], 0x02).ok_or("valid BCD refused")?;
    kassert_eq!(time.unix_seconds(), 1_795_333_176);
    // 12-hour mode: 12 PM is noon, 12 AM midnight; binary mode.
    kassert_eq!(decode([0, 0, 0x92, 1, 1, 0x26, 0x20], 0x00).map(|t| t.hour), Some(12));
    kassert_eq!(decode([0, 0, 0x12, 1, 1, 0x26, 0x20], 0x00).map(|t| t.hour), Some(0));
    kassert_eq!(decode([5, 6, 7, 8, 9, 26, 0x20], 0x06).map(|t| (t.hour, t.day)), Some((7, 8)));
    kassert_eq!(decode([0x99, 0, 0, 1, 1, 0, 0x20], 0x02), None);
    kassert_eq!(RtcTime { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0 }.unix_seconds(), 0);
    kassert_eq!(RtcTime { year: 2000, month: 3, day: 1, hour: 0, minute: 0, second: 0 }.unix_seconds(), 951_868_800);
    Ok(())
}

fn reads_a_sane_time() -> TestResult {
    let time = read().ok_or("the RTC gave no sane time")?;
    log::info!("rtc: {time:?} ({} s since 1970)", time.unix_seconds());
    crate::kassert!(time.year >= 2024, "the RTC says {}", time.year);
    Ok(())
}
