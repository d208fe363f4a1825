//! Guest timesync service: decodes the host's time samples into a wall-clock value the kernel can set or follow.
//!
//! Reference: `hyperv-vmbus.md` §7 "Timesync" (v4: parenttime, vmreferencetime, flags 0 probe / 1 sync /
//! 2 sample, leap, stratum; times in 100 ns since 1601, subtract 116444736000000000 for Unix). Below message
//! version 4 the body is Linux's `ictimesync_data` (parent, child and round-trip times, flags) with no reference
//! time; the kernel then stamps the sample with its own reference time on receipt, as Linux does.
//!
//! ⚠ Linux answers every timesync message; OpenVMM's host sends samples without the TRANSACTION flag and reads no
//! answer. This service answers (S_OK, body echoed) exactly when the TRANSACTION flag is set.

use zerocopy::FromBytes;

use super::framing::build_response;
use super::guest::{GuestChannel, IcAction, IcError, IcFailure, IcReply, IcResult, Received, negotiation_reply};
use super::negotiate::{FRAMEWORK_VERSIONS, NegotiatedVersions, TIMESYNC_VERSIONS, VersionPreferences};
use super::wire::{
    IcFlags, IcMessageType, IcStatus, IcVersion, TIMESYNC_V1_NEEDED, TIMESYNC_V4_NEEDED, TimeSyncFlags,
    TimeSyncMessageV1, TimeSyncMessageV4,
};

/// The timesync versions the guest supports (§7 "Versions").
pub const TIMESYNC_PREFERENCES: VersionPreferences =
    VersionPreferences { framework: FRAMEWORK_VERSIONS, message: TIMESYNC_VERSIONS };

/// First message version with the v4 body ([`TimeSyncMessageV4`]).
pub const TIMESYNC_VERSION_4: IcVersion = IcVersion::new(4, 0);

/// 100 ns intervals from 1601-01-01 to 1970-01-01 (§7 "Timesync").
pub const WINDOWS_TO_UNIX_EPOCH_100NS: u64 = 116_444_736_000_000_000;

/// 100 ns intervals per second.
const TICKS_PER_SECOND: u64 = 10_000_000;

/// A point in time as Windows counts it: 100 ns intervals since 1601-01-01 00:00 UTC.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowsTime(pub u64);

/// A point in time as UNIX counts it: seconds (negative before 1970) and nanoseconds since 1970-01-01 00:00 UTC.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixTime {
    /// Whole seconds; the nanoseconds are added to this (so -1 s + 500 ms is 1969-12-31 23:59:59.5).
    pub seconds: i64,
    /// Nanoseconds, 0..1_000_000_000.
    pub nanoseconds: u32,
}

impl WindowsTime {
    /// The same instant in UNIX time. Total for every `u64`.
    pub fn to_unix(self) -> UnixTime {
        let ticks = i128::from(self.0) - i128::from(WINDOWS_TO_UNIX_EPOCH_100NS);
        let per_second = i128::from(TICKS_PER_SECOND);
        // Fits: |ticks| < 2^64 / 10^7 seconds.
        let seconds = i64::try_from(ticks.div_euclid(per_second)).unwrap_or(i64::MAX);
        let nanoseconds = u32::try_from(ticks.rem_euclid(per_second) * 100).unwrap_or(0);
        UnixTime { seconds, nanoseconds }
    }

    /// The instant of a UNIX time, `None` before 1601 or beyond what 64 bits of 100 ns hold; sub-100 ns is dropped.
    pub fn from_unix(time: UnixTime) -> Option<WindowsTime> {
        let ticks = i128::from(time.seconds) * i128::from(TICKS_PER_SECOND)
            + i128::from(time.nanoseconds / 100)
            + i128::from(WINDOWS_TO_UNIX_EPOCH_100NS);
        u64::try_from(ticks).ok().map(WindowsTime)
    }

    /// Nanoseconds since the UNIX epoch (negative before 1970).
    pub fn unix_nanos(self) -> i128 {
        (i128::from(self.0) - i128::from(WINDOWS_TO_UNIX_EPOCH_100NS)) * 100
    }
}

/// What the host asks the guest to do with a sample.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TimeSampleKind {
    /// SYNC: set the clock now (after boot or resume). Wins if SAMPLE is also set.
    Sync,
    /// SAMPLE: a periodic sample to follow gradually.
    Sample,
    /// Neither bit: a probe; nothing to do.
    Probe,
}

/// A decoded host time sample.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TimeSample {
    /// The host's wall-clock time.
    pub host_time: WindowsTime,
    /// Partition reference time (100 ns ticks) when the host read its clock; `None` below version 4.
    pub reference_time: Option<u64>,
    /// The flags as sent.
    pub flags: TimeSyncFlags,
    /// Leap second indicator (version 4; 0 otherwise).
    pub leap_flags: u8,
    /// Stratum of the host clock (version 4; 0 otherwise).
    pub stratum: u8,
}

impl TimeSample {
    /// SYNC, SAMPLE or probe.
    pub fn kind(&self) -> TimeSampleKind {
        if self.flags.contains(TimeSyncFlags::SYNC) {
            TimeSampleKind::Sync
        } else if self.flags.contains(TimeSyncFlags::SAMPLE) {
            TimeSampleKind::Sample
        } else {
            TimeSampleKind::Probe
        }
    }

    /// The host's time carried forward to the partition reference time `reference_now`: host time plus the
    /// reference time elapsed since the sample (what Linux `adj_guesttime` computes). A sample without a reference
    /// time, or a `reference_now` before it, gives the host time unchanged or moved back accordingly.
    pub fn host_time_at(&self, reference_now: u64) -> WindowsTime {
        match self.reference_time {
            None => self.host_time,
            Some(sampled) if reference_now >= sampled => {
                WindowsTime(self.host_time.0.saturating_add(reference_now - sampled))
            }
            Some(sampled) => WindowsTime(self.host_time.0.saturating_sub(sampled - reference_now)),
        }
    }
}

/// The wall clock the kernel keeps from timesync samples: a host time anchored at a partition reference time, read
/// by carrying it forward with the reference counter (no I/O: the caller passes the counter's value).
///
/// Policy (this kernel has no other time source): SYNC and SAMPLE both re-anchor the clock; a PROBE is ignored.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct WallClock {
    anchor: Option<(WindowsTime, u64)>,
}

impl WallClock {
    /// A clock that has not been set.
    pub const fn new() -> WallClock {
        WallClock { anchor: None }
    }

    /// Apply `sample`, received when the partition reference time was `reference_now`. Returns whether the clock
    /// changed.
    pub fn apply(&mut self, sample: &TimeSample, reference_now: u64) -> bool {
        match sample.kind() {
            TimeSampleKind::Probe => false,
            TimeSampleKind::Sync | TimeSampleKind::Sample => {
                self.anchor = Some((sample.host_time_at(reference_now), reference_now));
                true
            }
        }
    }

    /// Whether a sample has set the clock.
    pub fn is_set(&self) -> bool {
        self.anchor.is_some()
    }

    /// The time at partition reference time `reference_now`, once set.
    pub fn now(&self, reference_now: u64) -> Option<WindowsTime> {
        let (time, at) = self.anchor?;
        Some(if reference_now >= at {
            WindowsTime(time.0.saturating_add(reference_now - at))
        } else {
            WindowsTime(time.0.saturating_sub(at - reference_now))
        })
    }

    /// [`WallClock::now`] in UNIX time.
    pub fn now_unix(&self, reference_now: u64) -> Option<UnixTime> {
        self.now(reference_now).map(WindowsTime::to_unix)
    }
}

/// Decode a timesync body under `message_version`. `None` when too short.
pub fn decode_time_sample(message_version: IcVersion, body: &[u8]) -> Option<TimeSample> {
    if message_version >= TIMESYNC_VERSION_4 {
        if body.len() < TIMESYNC_V4_NEEDED {
            return None;
        }
        let mut padded = [0u8; size_of::<TimeSyncMessageV4>()];
        let n = body.len().min(padded.len());
        padded[..n].copy_from_slice(&body[..n]);
        let m = TimeSyncMessageV4::read_from_bytes(&padded).ok()?;
        Some(TimeSample {
            host_time: WindowsTime(m.parent_time.get()),
            reference_time: Some(m.vm_reference_time.get()),
            flags: TimeSyncFlags::from_bits_retain(m.flags),
            leap_flags: m.leap_flags,
            stratum: m.stratum,
        })
    } else {
        let (m, _) = TimeSyncMessageV1::read_from_prefix(body).ok()?;
        Some(TimeSample {
            host_time: WindowsTime(m.parent_time.get()),
            reference_time: None,
            flags: TimeSyncFlags::from_bits_retain(m.flags),
            leap_flags: 0,
            stratum: 0,
        })
    }
}

/// Body bytes needed under `message_version`.
pub fn needed_body(message_version: IcVersion) -> usize {
    if message_version >= TIMESYNC_VERSION_4 { TIMESYNC_V4_NEEDED } else { TIMESYNC_V1_NEEDED }
}

/// The guest timesync service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeSyncService {
    channel: GuestChannel,
    last: Option<TimeSample>,
}

impl Default for TimeSyncService {
    fn default() -> Self {
        TimeSyncService::new()
    }
}

super::guest::impl_guest_service!(TimeSyncService, TimeSample, TIMESYNC);

impl TimeSyncService {
    /// A new service, not yet negotiated.
    pub const fn new() -> TimeSyncService {
        TimeSyncService { channel: GuestChannel::new(IcMessageType::TIMESYNC, TIMESYNC_PREFERENCES), last: None }
    }

    /// The versions in force, once negotiated.
    pub fn negotiated(&self) -> Option<NegotiatedVersions> {
        self.channel.negotiated()
    }

    /// The last sample decoded.
    pub fn last_sample(&self) -> Option<TimeSample> {
        self.last
    }

    /// Handle one received in-band payload. The body layout follows the negotiated message version.
    pub fn handle(&mut self, payload: &[u8]) -> IcResult<TimeSample> {
        let (frame, versions) = match self.channel.receive(payload)? {
            Received::Message { frame, versions } => (frame, versions),
            Received::Negotiation { outcome, response } => return Ok(negotiation_reply(outcome, response)),
        };
        let Some(sample) = decode_time_sample(versions.message, frame.body) else {
            let needed = needed_body(versions.message);
            let error = IcError::BodyTooShort { message_type: IcMessageType::TIMESYNC, len: frame.body.len(), needed };
            return Err(IcFailure::answered(error, &frame, IcStatus::FAIL));
        };
        self.last = Some(sample);
        let response = frame
            .header
            .flags()
            .contains(IcFlags::TRANSACTION)
            .then(|| build_response(&frame.header, IcStatus::OK, frame.body));
        Ok(IcReply { action: IcAction::Service(sample), response })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_conversions() {
        assert_eq!(WindowsTime(WINDOWS_TO_UNIX_EPOCH_100NS).to_unix(), UnixTime { seconds: 0, nanoseconds: 0 });
        // 2026-11-22 08:00:00 UTC = 1795334400 s.
        let t = WindowsTime(WINDOWS_TO_UNIX_EPOCH_100NS + 1_795_334_400 * TICKS_PER_SECOND + 1234567);
        assert_eq!(t.to_unix(), UnixTime { seconds: 1_795_334_400, nanoseconds: 123_456_700 });
        assert_eq!(WindowsTime::from_unix(t.to_unix()), Some(t));
        assert_eq!(t.unix_nanos(), 1_795_334_400_123_456_700);
        // Before 1970: 1969-12-31 23:59:59.5.
        let before = WindowsTime(WINDOWS_TO_UNIX_EPOCH_100NS - 5_000_000);
        assert_eq!(before.to_unix(), UnixTime { seconds: -1, nanoseconds: 500_000_000 });
        assert_eq!(WindowsTime(0).to_unix().seconds, -11_644_473_600);
        assert_eq!(WindowsTime::from_unix(UnixTime { seconds: -11_644_473_601, nanoseconds: 0 }), None);
        let _ = WindowsTime(u64::MAX).to_unix();
    }

    #[test]
    fn sample_is_carried_forward_by_reference_time() {
        let s = TimeSample {
            host_time: WindowsTime(1_000),
            reference_time: Some(500),
            flags: TimeSyncFlags::SAMPLE,
            leap_flags: 0,
            stratum: 0,
        };
        assert_eq!(s.host_time_at(800), WindowsTime(1_300));
        assert_eq!(s.host_time_at(400), WindowsTime(900));
        assert_eq!(s.kind(), TimeSampleKind::Sample);
        let old = TimeSample { reference_time: None, flags: TimeSyncFlags::SYNC | TimeSyncFlags::SAMPLE, ..s };
        assert_eq!(old.host_time_at(10_000), WindowsTime(1_000));
        assert_eq!(old.kind(), TimeSampleKind::Sync);
        assert_eq!(TimeSample { flags: TimeSyncFlags::empty(), ..s }.kind(), TimeSampleKind::Probe);
    }

    #[test]
    fn wall_clock_follows_sync_and_sample_and_ignores_probes() {
        let mut clock = WallClock::new();
        assert_eq!(clock.now(5), None);
        let sample = |flags, host, reference| TimeSample {
            host_time: WindowsTime(host),
            reference_time: Some(reference),
            flags,
            leap_flags: 0,
            stratum: 0,
        };
        assert!(!clock.apply(&sample(TimeSyncFlags::empty(), 1_000, 0), 0));
        assert!(!clock.is_set());
        // Sampled at reference 100, received at 150: the clock reads 1_050 at 150.
        assert!(clock.apply(&sample(TimeSyncFlags::SYNC, 1_000, 100), 150));
        assert_eq!(clock.now(150), Some(WindowsTime(1_050)));
        assert_eq!(clock.now(1_150), Some(WindowsTime(2_050)));
        assert_eq!(clock.now(50), Some(WindowsTime(950)));
        assert!(clock.apply(&sample(TimeSyncFlags::SAMPLE, 5_000, 200), 200));
        assert_eq!(clock.now(300), Some(WindowsTime(5_100)));
        assert_eq!(
            WallClock { anchor: Some((WindowsTime(WINDOWS_TO_UNIX_EPOCH_100NS), 0)) }.now_unix(10_000_000),
            Some(UnixTime { seconds: 1, nanoseconds: 0 })
        );
    }

    #[test]
    fn both_body_layouts_decode() {
        let mut v4 = [0u8; 22];
        v4[..8].copy_from_slice(&42u64.to_le_bytes());
        v4[8..16].copy_from_slice(&7u64.to_le_bytes());
        v4[16] = 1;
        v4[17] = 2;
        v4[18] = 3;
        let s = decode_time_sample(IcVersion::new(4, 0), &v4).unwrap();
        assert_eq!(
            (s.host_time, s.reference_time, s.flags, s.leap_flags, s.stratum),
            (WindowsTime(42), Some(7), TimeSyncFlags::SYNC, 2, 3)
        );
        assert_eq!(decode_time_sample(IcVersion::new(4, 0), &v4[..18]), None);
        let mut v1 = [0u8; 25];
        v1[..8].copy_from_slice(&99u64.to_le_bytes());
        v1[24] = 2;
        let s = decode_time_sample(IcVersion::new(3, 0), &v1).unwrap();
        assert_eq!((s.host_time, s.reference_time, s.flags), (WindowsTime(99), None, TimeSyncFlags::SAMPLE));
        assert_eq!(decode_time_sample(IcVersion::new(1, 0), &v1[..24]), None);
    }
}
