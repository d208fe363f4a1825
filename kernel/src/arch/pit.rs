//! The 8254 programmable interval timer's channel 2, used as a stopwatch of known rate for calibration.
//!
//! Channel 2's gate and output are wired to port 0x61 (bit 0: gate, bit 1: speaker enable, bit 5: output). In
//! mode 0 ("interrupt on terminal count") the output goes low when the count is written and high when the count,
//! decremented at 1.193182 MHz while the gate is high, reaches zero. Hyper-V Gen2 has no PIT: its port 0x61 reads
//! back constant bits, which [`OneShot::start`] detects (the output must be low right after the count is loaded).

use x86_64::instructions::port::Port;

/// The PIT's input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const CHANNEL2_DATA: u16 = 0x42;
const MODE_COMMAND: u16 = 0x43;
const GATE_PORT: u16 = 0x61;
/// Mode/command: channel 2 (bits 7:6 = 10), access low then high byte (11), mode 0 (000), binary (0).
const CHANNEL2_MODE0_LOHI: u8 = 0b1011_0000;
const GATE_BIT: u8 = 1 << 0;
const SPEAKER_BIT: u8 = 1 << 1;
const OUTPUT_BIT: u8 = 1 << 5;

/// A running one-shot count on channel 2.
pub struct OneShot {
    _private: (),
}

/// Why the PIT cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoPit;

fn read_gate_port() -> u8 {
    // SAFETY: reading port 0x61 (system control port B) has no side effects.
    unsafe { Port::<u8>::new(GATE_PORT).read() }
}

fn write_gate_port(value: u8) {
    // SAFETY: port 0x61's low bits only gate PIT channel 2 and the PC speaker; the kernel uses neither otherwise.
    unsafe { Port::<u8>::new(GATE_PORT).write(value) }
}

impl OneShot {
    /// Loads `count` into channel 2 in mode 0 with the gate low, then raises the gate: counting starts now and
    /// ends `count / PIT_HZ` seconds later. Fails if the output does not read low after loading (no PIT).
    pub fn start(count: u16) -> Result<OneShot, NoPit> {
        let control = read_gate_port() & !(GATE_BIT | SPEAKER_BIT);
        write_gate_port(control);
        let [low, high] = count.to_le_bytes();
        // SAFETY: ports 0x43 and 0x42 are the PIT's mode register and channel 2's data port; channel 2 drives only
        // the speaker line (kept disabled above), so reprogramming it affects nothing else.
        unsafe {
            Port::<u8>::new(MODE_COMMAND).write(CHANNEL2_MODE0_LOHI);
            Port::<u8>::new(CHANNEL2_DATA).write(low);
            Port::<u8>::new(CHANNEL2_DATA).write(high);
        }
        if read_gate_port() & OUTPUT_BIT != 0 {
            return Err(NoPit);
        }
        write_gate_port(control | GATE_BIT);
        Ok(OneShot { _private: () })
    }

    /// Whether the count has reached zero.
    pub fn expired(&self) -> bool {
        read_gate_port() & OUTPUT_BIT != 0
    }
}

impl Drop for OneShot {
    fn drop(&mut self) {
        write_gate_port(read_gate_port() & !(GATE_BIT | SPEAKER_BIT));
    }
}
