//! Save and restore of a server channel (`VmbChannelSaveBegin`/`SaveContinue`/`SaveEnd`,
//! `VmbChannelRestoreFromBuffer`, `VmbPacketRestore`, `VmbServerChannelInitSetSaveRestorePacketCallbacks`): the
//! state that lets a restarted server driver — a new [`super::ServerBus`] over the same host — take a channel over
//! while the guest keeps it open.
//!
//! Reference: `kmcl-api.md` §Server-only methods (BUFFER_TOO_SMALL, BUFFER_OVERFLOW = more to save,
//! MORE_PROCESSING_REQUIRED = more chunks).
//!
//! # What is saved
//! The channel's settings (common and server-only), its offer (relid), whether it was open (open id and ring GPADL,
//! to check on restore that it is still the same open), the next transaction id, the incoming packets read and not
//! yet delivered (whole: header facts, payload, external ranges), and the delivered packets not yet completed: the
//! library's part (transaction id, completion request, external ranges) and the driver's part, which its
//! [`PacketSaveRestore::save_packet`] returns (the driver owns what it did with the payload). Sends in flight are
//! not saved: their completion routines are code, not data (the driver resends after the restore).
//!
//! # Format
//! Little-endian: `"KMCLSAV1"`, the total length (u32), then the fields in the order listed above (settings, offer, open, packets); strings
//! and byte strings are length-prefixed. The bytes come back from the caller on restore and are parsed as untrusted
//! input: any inconsistency is [`NtStatus::INVALID_PARAMETER_2`], never a panic.

use super::super::bus::SavedPacket;
use super::super::channel::ChannelHandle;
use super::super::packet::{ExternalRange, PacketCompletion};
use super::super::status::{NtStatus, Result};
use super::KmclServer;
use crate::protocol::Guid;
use alloc::string::String;
use alloc::vec::Vec;

/// Magic at the start of a saved channel.
pub const SAVE_MAGIC: [u8; 8] = *b"KMCLSAV1";

/// Smallest buffer `channel_save_continue` takes ([`NtStatus::BUFFER_TOO_SMALL`] below).
pub const SAVE_MIN_CHUNK: usize = 64;

/// Largest saved channel `channel_restore_from_buffer` accepts (the bytes are buffered until complete).
pub const MAX_SAVED_CHANNEL: usize = 16 * 1024 * 1024;

/// What `channel_save_continue` did (Windows reports "more to save" as `STATUS_BUFFER_OVERFLOW`, a warning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveProgress {
    /// This many bytes were written and more remain: call again with the next buffer.
    More(usize),
    /// This many bytes were written and the save is complete.
    Done(usize),
}

/// What `channel_restore_from_buffer` did (Windows reports "more chunks" as `STATUS_MORE_PROCESSING_REQUIRED`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreProgress {
    /// The chunk was taken; the saved channel is not complete yet.
    MoreChunks,
    /// The saved channel is complete and checked; `channel_enable` takes the channel over.
    Done,
}

/// The driver's part of saving and restoring its outstanding packets
/// (`VmbServerChannelInitSetSaveRestorePacketCallbacks`: `EvtChannelSavePacket`, `EvtChannelRestorePacket`).
pub trait PacketSaveRestore: Send {
    /// A delivered packet the driver has not completed is being saved: return what the driver needs to finish it
    /// after the restore (its own state for the packet; the library saves the rest).
    fn save_packet(&mut self, channel: ChannelHandle, packet: PacketCompletion) -> Vec<u8>;

    /// A saved packet comes back, while the restored channel is enabled: call
    /// [`KmclServer::packet_restore`] with `library_data` to get the packet (to complete it now or later), and use
    /// `driver_data`, what [`PacketSaveRestore::save_packet`] returned.
    fn restore_packet(
        &mut self,
        server: &mut dyn KmclServer,
        channel: ChannelHandle,
        library_data: &[u8],
        driver_data: &[u8],
    );
}

/// A server channel's saved state (see the module documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SavedChannel {
    pub(super) interface_type: Guid,
    pub(super) interface_instance: Guid,
    pub(super) flags: u32,
    pub(super) mmio_megabytes: (u16, u16),
    pub(super) target_vtl: u8,
    pub(super) pipe_mode: u32,
    pub(super) partition: Option<u64>,
    pub(super) maximum_packet_size: u32,
    pub(super) maximum_external_data: (u32, u32),
    pub(super) client_context_size: u32,
    pub(super) maximum_packet_count: u32,
    pub(super) transaction_quota: u32,
    pub(super) friendly_name: String,
    pub(super) user_data: Vec<u8>,
    pub(super) relid: u32,
    /// (open id, ring GPADL) when the channel was open.
    pub(super) open: Option<(u32, u32)>,
    pub(super) next_transaction_id: u64,
    pub(super) backlog: Vec<SavedPacket>,
    /// Delivered and not completed: the library's part (a packet without payload) and the driver's bytes.
    pub(super) delivered: Vec<(SavedPacket, Vec<u8>)>,
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn packet(&mut self, p: &SavedPacket) {
        self.u64(p.transaction_id);
        self.u8(u8::from(p.completion_requested));
        self.bytes(&p.payload);
        self.u16(p.external.len() as u16);
        for range in &p.external {
            self.u32(range.byte_offset);
            self.u32(range.byte_count);
            self.u16(range.pfns.len() as u16);
            for &pfn in &range.pfns {
                self.u64(pfn);
            }
        }
    }
}

/// A bounds-checked reader over untrusted bytes: every read is `None` past the end.
pub(super) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.u32()? as usize;
        self.take(len)
    }
    fn guid(&mut self) -> Option<Guid> {
        Some(Guid::from_wire_bytes(self.take(16)?.try_into().ok()?))
    }
    fn packet(&mut self) -> Option<SavedPacket> {
        let transaction_id = self.u64()?;
        let completion_requested = match self.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let payload = self.bytes()?.to_vec();
        let ranges = self.u16()?;
        let mut external = Vec::new();
        for _ in 0..ranges {
            let byte_offset = self.u32()?;
            let byte_count = self.u32()?;
            let count = self.u16()? as usize;
            let mut pfns = Vec::with_capacity(count.min(self.0.len() / 8));
            for _ in 0..count {
                pfns.push(self.u64()?);
            }
            let range = ExternalRange { byte_offset, byte_count, pfns };
            if !range.is_well_formed() {
                return None;
            }
            external.push(range);
        }
        Some(SavedPacket { transaction_id, completion_requested, payload, external })
    }
}

/// The library's part of one delivered packet, as [`PacketSaveRestore::restore_packet`] receives it.
pub(super) fn encode_packet(packet: &SavedPacket) -> Vec<u8> {
    let mut w = Writer(Vec::new());
    w.packet(packet);
    w.0
}

/// Parses the library's part of one delivered packet; `_2` when malformed.
pub(super) fn decode_packet(bytes: &[u8]) -> Result<SavedPacket> {
    let mut r = Reader(bytes);
    let packet = r.packet().ok_or(NtStatus::INVALID_PARAMETER_2)?;
    if !r.0.is_empty() {
        return Err(NtStatus::INVALID_PARAMETER_2);
    }
    Ok(packet)
}

impl SavedChannel {
    /// The saved bytes.
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.0.extend_from_slice(&SAVE_MAGIC);
        w.u32(0); // the total length, filled in below
        w.0.extend_from_slice(&self.interface_type.to_wire_bytes());
        w.0.extend_from_slice(&self.interface_instance.to_wire_bytes());
        w.u32(self.flags);
        w.u16(self.mmio_megabytes.0);
        w.u16(self.mmio_megabytes.1);
        w.u8(self.target_vtl);
        w.u32(self.pipe_mode);
        w.u8(u8::from(self.partition.is_some()));
        w.u64(self.partition.unwrap_or(0));
        w.u32(self.maximum_packet_size);
        w.u32(self.maximum_external_data.0);
        w.u32(self.maximum_external_data.1);
        w.u32(self.client_context_size);
        w.u32(self.maximum_packet_count);
        w.u32(self.transaction_quota);
        w.bytes(self.friendly_name.as_bytes());
        w.bytes(&self.user_data);
        w.u32(self.relid);
        w.u8(u8::from(self.open.is_some()));
        let (open_id, ring_gpadl) = self.open.unwrap_or((0, 0));
        w.u32(open_id);
        w.u32(ring_gpadl);
        w.u64(self.next_transaction_id);
        w.u32(self.backlog.len() as u32);
        for packet in &self.backlog {
            w.packet(packet);
        }
        w.u32(self.delivered.len() as u32);
        for (packet, driver) in &self.delivered {
            w.packet(packet);
            w.bytes(driver);
        }
        let total = w.0.len() as u32;
        w.0[8..12].copy_from_slice(&total.to_le_bytes());
        w.0
    }

    /// The total length a saved channel's first bytes announce, once at least 12 are there; `_2` for a wrong magic
    /// or an impossible length.
    pub(super) fn announced_len(bytes: &[u8]) -> Result<Option<usize>> {
        if bytes.len() < 12 {
            return if SAVE_MAGIC.starts_with(bytes) || bytes.starts_with(&SAVE_MAGIC) {
                Ok(None)
            } else {
                Err(NtStatus::INVALID_PARAMETER_2)
            };
        }
        if bytes[..8] != SAVE_MAGIC {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        let total = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if !(12..=MAX_SAVED_CHANNEL).contains(&total) {
            return Err(NtStatus::INVALID_PARAMETER_2);
        }
        Ok(Some(total))
    }

    /// Parses a complete saved channel; `_2` when anything is inconsistent.
    pub(super) fn decode(bytes: &[u8]) -> Result<SavedChannel> {
        let bad = NtStatus::INVALID_PARAMETER_2;
        if SavedChannel::announced_len(bytes)? != Some(bytes.len()) {
            return Err(bad);
        }
        let mut r = Reader(&bytes[12..]);
        let parsed = (|| {
            let interface_type = r.guid()?;
            let interface_instance = r.guid()?;
            let flags = r.u32()?;
            let mmio_megabytes = (r.u16()?, r.u16()?);
            let target_vtl = r.u8()?;
            let pipe_mode = r.u32()?;
            let has_partition = r.u8()?;
            let partition_id = r.u64()?;
            let partition = match has_partition {
                0 => None,
                1 => Some(partition_id),
                _ => return None,
            };
            let maximum_packet_size = r.u32()?;
            let maximum_external_data = (r.u32()?, r.u32()?);
            let client_context_size = r.u32()?;
            let maximum_packet_count = r.u32()?;
            let transaction_quota = r.u32()?;
            let friendly_name = String::from(core::str::from_utf8(r.bytes()?).ok()?);
            let user_data = r.bytes()?.to_vec();
            let relid = r.u32()?;
            let is_open = r.u8()?;
            let open_id = r.u32()?;
            let ring_gpadl = r.u32()?;
            let open = match is_open {
                0 => None,
                1 => Some((open_id, ring_gpadl)),
                _ => return None,
            };
            let next_transaction_id = r.u64()?;
            let backlog_count = r.u32()?;
            let mut backlog = Vec::new();
            for _ in 0..backlog_count {
                backlog.push(r.packet()?);
            }
            let delivered_count = r.u32()?;
            let mut delivered = Vec::new();
            for _ in 0..delivered_count {
                let packet = r.packet()?;
                delivered.push((packet, r.bytes()?.to_vec()));
            }
            Some(SavedChannel {
                interface_type,
                interface_instance,
                flags,
                mmio_megabytes,
                target_vtl,
                pipe_mode,
                partition,
                maximum_packet_size,
                maximum_external_data,
                client_context_size,
                maximum_packet_count,
                transaction_quota,
                friendly_name,
                user_data,
                relid,
                open,
                next_transaction_id,
                backlog,
                delivered,
            })
        })();
        match parsed {
            Some(saved) if r.0.is_empty() => Ok(saved),
            _ => Err(bad),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn sample() -> SavedChannel {
        let packet = |id: u64| SavedPacket {
            transaction_id: id,
            completion_requested: id.is_multiple_of(2),
            payload: vec![id as u8; 9],
            external: vec![ExternalRange { byte_offset: 8, byte_count: 4100, pfns: vec![0x10, 0x11] }],
        };
        SavedChannel {
            interface_type: Guid::from_fields(1, 2, 3, [4; 8]),
            interface_instance: Guid::from_fields(5, 6, 7, [8; 8]),
            flags: 0x4,
            mmio_megabytes: (16, 32),
            target_vtl: 0,
            pipe_mode: 4,
            partition: Some(7),
            maximum_packet_size: 512,
            maximum_external_data: (8192, 3),
            client_context_size: 16,
            maximum_packet_count: 10,
            transaction_quota: 3,
            friendly_name: "saved".into(),
            user_data: vec![1, 2, 3],
            relid: 9,
            open: Some((4, 0x1000)),
            next_transaction_id: 77,
            backlog: vec![packet(1), packet(2)],
            delivered: vec![(SavedPacket { payload: Vec::new(), ..packet(3) }, b"driver".to_vec())],
        }
    }

    #[test]
    fn a_saved_channel_round_trips() {
        let saved = sample();
        let bytes = saved.encode();
        assert_eq!(&bytes[..8], b"KMCLSAV1");
        assert_eq!(SavedChannel::announced_len(&bytes), Ok(Some(bytes.len())));
        assert_eq!(SavedChannel::decode(&bytes), Ok(saved.clone()));
        let (packet, _) = &saved.delivered[0];
        assert_eq!(decode_packet(&encode_packet(packet)), Ok(packet.clone()));
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(SavedChannel::decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        assert_eq!(SavedChannel::announced_len(&bytes[..5]), Ok(None), "a prefix of the magic waits for more");
        assert_eq!(SavedChannel::announced_len(b"KMCX"), Err(NtStatus::INVALID_PARAMETER_2));
        for at in 0..bytes.len() {
            let mut corrupt = bytes.clone();
            corrupt[at] ^= 0xFF;
            // Either refused or parsed into something; never a panic.
            let _ = SavedChannel::decode(&corrupt);
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(SavedChannel::decode(&longer), Err(NtStatus::INVALID_PARAMETER_2));
        assert_eq!(decode_packet(&[1, 2, 3]), Err(NtStatus::INVALID_PARAMETER_2));
    }
}
