//! The server-only GPADL mapping of the KMCL (`kmcl-api.md` §Server-only methods: `VmbChannelMapGpadl`,
//! `VmbChannelUnmapGpadl`; §Client interface 3–5 for the read-only creation flag and the teardown that waits for the
//! server to unmap).
//!
//! The rules, enforced by [`Server::map_gpadl`](super::Server::map_gpadl) and
//! [`Server::unmap_gpadl`](super::Server::unmap_gpadl):
//! - a GPADL is mapped through the channel it was created for;
//! - mapping without [`MapGpadlFlags::READ_ONLY`] asks for write access and fails for a GPADL that was not created
//!   writable ([`Server::set_gpadl_read_only`](super::Server::set_gpadl_read_only) records that; the wire protocol
//!   carries no such flag, so GPADLs a guest describes over VMBus count as writable);
//! - one mapping per GPADL at a time;
//! - a GPADL_TEARDOWN of a mapped GPADL is held (GPADL_TORNDOWN is not sent) until it is unmapped.
//!
//! A [`MappedGpadl`] is the description a Windows server gets as an MDL: the GPADL's ranges. Its bytes are reached
//! through [`GuestMemory`], at offsets into the buffer the ranges describe, one range after the other.

use alloc::vec::Vec;
use core::fmt;

use crate::kmcl::status::NtStatus;
use crate::memory::{GuestMemory, MemoryError, PAGE_SIZE};
use crate::protocol::GpadlRange;

/// Flags of `VmbChannelMapGpadl`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MapGpadlFlags(pub u32);

impl MapGpadlFlags {
    /// Write access.
    pub const NONE: MapGpadlFlags = MapGpadlFlags(0);
    /// `VMBUS_CHANNEL_GPADL_FLAG_READ_ONLY`: map for reading only (allowed for every GPADL). The value 0x1 is the
    /// creation flag's (`VMBUS_CHANNEL_GPADL_READ_ONLY`); the mapping flag's value is not documented.
    pub const READ_ONLY: MapGpadlFlags = MapGpadlFlags(0x1);

    /// Whether [`READ_ONLY`](Self::READ_ONLY) is set.
    pub const fn read_only(self) -> bool {
        self.0 & Self::READ_ONLY.0 != 0
    }
}

/// Why `VmbChannelMapGpadl` or `VmbChannelUnmapGpadl` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapGpadlError {
    /// No channel offered to the guest has this relid (or it was rescinded).
    UnknownChannel(u32),
    /// No complete GPADL has this handle.
    UnknownGpadl(u32),
    /// The GPADL belongs to another channel.
    ForeignGpadl(u32),
    /// Write access was asked for a GPADL created read-only.
    NotWritable(u32),
    /// The GPADL is already mapped (one mapping at a time).
    AlreadyMapped(u32),
    /// The GPADL is not mapped (unmap).
    NotMapped(u32),
    /// The guest already asked to tear the GPADL down.
    TeardownPending(u32),
    /// The flags hold bits other than [`MapGpadlFlags::READ_ONLY`].
    InvalidFlags(u32),
}

impl MapGpadlError {
    /// The NTSTATUS a KMCL caller sees.
    pub const fn status(self) -> NtStatus {
        match self {
            MapGpadlError::UnknownChannel(_) => NtStatus::INVALID_PARAMETER_1,
            MapGpadlError::InvalidFlags(_) => NtStatus::INVALID_PARAMETER_2,
            MapGpadlError::UnknownGpadl(_) | MapGpadlError::NotMapped(_) => NtStatus::INVALID_PARAMETER_3,
            MapGpadlError::ForeignGpadl(_) | MapGpadlError::NotWritable(_) => NtStatus::ACCESS_DENIED,
            MapGpadlError::AlreadyMapped(_) | MapGpadlError::TeardownPending(_) => NtStatus::INVALID_DEVICE_STATE,
        }
    }
}

impl fmt::Display for MapGpadlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            MapGpadlError::UnknownChannel(relid) => write!(f, "no channel with relid {relid}"),
            MapGpadlError::UnknownGpadl(handle) => write!(f, "no GPADL {handle:#x}"),
            MapGpadlError::ForeignGpadl(handle) => write!(f, "GPADL {handle:#x} belongs to another channel"),
            MapGpadlError::NotWritable(handle) => write!(f, "GPADL {handle:#x} was created read-only"),
            MapGpadlError::AlreadyMapped(handle) => write!(f, "GPADL {handle:#x} is already mapped"),
            MapGpadlError::NotMapped(handle) => write!(f, "GPADL {handle:#x} is not mapped"),
            MapGpadlError::TeardownPending(handle) => write!(f, "GPADL {handle:#x} is being torn down"),
            MapGpadlError::InvalidFlags(flags) => write!(f, "unknown map flags {flags:#x}"),
        }
    }
}

impl core::error::Error for MapGpadlError {}

/// What the server keeps about a GPADL's access: how it was created and whether it is mapped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct GpadlAccess {
    /// Created read-only ([`super::Server::set_gpadl_read_only`]).
    pub(super) read_only: bool,
    /// Mapped now; `Some(true)` with write access.
    pub(super) mapped: Option<bool>,
}

/// A mapped GPADL: its ranges and the access granted (the MDL of `VmbChannelMapGpadl`). Valid until
/// [`Server::unmap_gpadl`](super::Server::unmap_gpadl); the GPADL's teardown waits for that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MappedGpadl {
    /// The channel it belongs to.
    pub relid: u32,
    /// Its handle.
    pub handle: u32,
    /// Its ranges, in order.
    pub ranges: Vec<GpadlRange>,
    /// Whether writes are allowed.
    pub writable: bool,
}

impl MappedGpadl {
    /// Bytes described: the sum of the ranges' byte counts.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|range| u64::from(range.byte_count)).sum()
    }

    /// Whether the GPADL describes no bytes (never, for an accepted one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies `dst.len()` bytes from byte `offset` of the described buffer.
    pub fn read(&self, memory: &impl GuestMemory, offset: u64, dst: &mut [u8]) -> Result<(), MemoryError> {
        self.for_each_piece(offset, dst.len(), |gpa, at, n| memory.read(gpa, &mut dst[at..at + n]))
    }

    /// Copies `src` to byte `offset` of the described buffer; [`MemoryError::ReadOnly`] for a read-only mapping.
    pub fn write(&self, memory: &impl GuestMemory, offset: u64, src: &[u8]) -> Result<(), MemoryError> {
        if !self.writable {
            return Err(MemoryError::ReadOnly);
        }
        self.for_each_piece(offset, src.len(), |gpa, at, n| memory.write(gpa, &src[at..at + n]))
    }

    /// Calls `copy(gpa, at, n)` for each page piece of the `len` bytes at `offset` (`at` counts from the first).
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut copy: impl FnMut(u64, usize, usize) -> Result<(), MemoryError>,
    ) -> Result<(), MemoryError> {
        let outside = MemoryError::OutsideBuffer { offset, len: len as u64 };
        let end = offset.checked_add(len as u64).ok_or(outside)?;
        if end > self.len() {
            return Err(outside);
        }
        let mut done = 0usize;
        // Offset of the current range's first byte in the buffer.
        let mut range_start = 0u64;
        for range in &self.ranges {
            let range_end = range_start + u64::from(range.byte_count);
            while done < len && offset + (done as u64) < range_end {
                let in_range = offset + done as u64 - range_start + u64::from(range.byte_offset);
                let page = usize::try_from(in_range / PAGE_SIZE).map_err(|_| outside)?;
                let in_page = in_range % PAGE_SIZE;
                let pfn = *range.pfns.get(page).ok_or(outside)?;
                let n = ((len - done) as u64).min(PAGE_SIZE - in_page).min(range_end - (offset + done as u64));
                let gpa = pfn.checked_mul(PAGE_SIZE).ok_or(MemoryError::OutOfRange { gpa: u64::MAX, len: n })?;
                copy(gpa + in_page, done, n as usize)?;
                done += n as usize;
            }
            range_start = range_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PageArena;

    fn mapped(ranges: Vec<GpadlRange>, writable: bool) -> MappedGpadl {
        MappedGpadl { relid: 1, handle: 2, ranges, writable }
    }

    #[test]
    fn reads_and_writes_follow_the_ranges_in_order() {
        let arena = PageArena::new(0x10, 8);
        let gpadl = mapped(
            alloc::vec![
                GpadlRange { byte_offset: 0xFF0, byte_count: 0x20, pfns: alloc::vec![0x13, 0x11] },
                GpadlRange { byte_offset: 0, byte_count: 0x1800, pfns: alloc::vec![0x15, 0x12] },
            ],
            true,
        );
        assert_eq!(gpadl.len(), 0x1820);
        let data: Vec<u8> = (0..0x1820u32).map(|i| (i * 7) as u8).collect();
        gpadl.write(&arena, 0, &data).unwrap();
        let mut page = [0u8; 16];
        arena.read(0x13 * PAGE_SIZE + 0xFF0, &mut page).unwrap();
        assert_eq!(page, data[..16]);
        arena.read(0x11 * PAGE_SIZE, &mut page).unwrap();
        assert_eq!(page, data[16..32]);
        arena.read(0x12 * PAGE_SIZE, &mut page).unwrap();
        assert_eq!(page, data[0x20 + 0x1000..0x20 + 0x1010]);
        for (offset, len) in [(0u64, 0x1820usize), (5, 40), (0x1F, 2), (0x1000, 0x820), (0x181F, 1)] {
            let mut back = alloc::vec![0u8; len];
            gpadl.read(&arena, offset, &mut back).unwrap();
            assert_eq!(back, data[offset as usize..offset as usize + len], "offset {offset:#x} len {len:#x}");
        }
        assert_eq!(
            gpadl.read(&arena, 0x1810, &mut [0; 17]),
            Err(MemoryError::OutsideBuffer { offset: 0x1810, len: 17 })
        );
        assert!(gpadl.read(&arena, u64::MAX, &mut [0; 2]).is_err());
        let read_only = MappedGpadl { writable: false, ..gpadl };
        assert_eq!(read_only.write(&arena, 0, &[1]), Err(MemoryError::ReadOnly));
        read_only.read(&arena, 0, &mut [0; 4]).unwrap();
    }

    #[test]
    fn pages_outside_memory_are_errors() {
        let arena = PageArena::new(0x10, 2);
        let gpadl =
            mapped(alloc::vec![GpadlRange { byte_offset: 0, byte_count: 8192, pfns: alloc::vec![0x11, 0x12] }], true);
        gpadl.read(&arena, 0, &mut [0; 4096]).unwrap();
        assert!(matches!(gpadl.read(&arena, 4000, &mut [0; 200]), Err(MemoryError::OutOfRange { .. })));
        let huge =
            mapped(alloc::vec![GpadlRange { byte_offset: 0, byte_count: 16, pfns: alloc::vec![u64::MAX] }], true);
        assert!(matches!(huge.write(&arena, 0, &[0; 16]), Err(MemoryError::OutOfRange { .. })));
    }

    mod server_rules {
        use super::super::super::{Server, ServerConfig, ServerEvent};
        use super::*;
        use crate::protocol::{
            CloseChannel, ControlMessage, GpadlMessages, GpadlTeardown, Guid, InitiateContact, Message, MessageType,
            OpenChannel, RequestOffers, Unload, VmbusVersion, device_class,
        };

        /// A server at `version` with two channels offered, ring GPADL 10 (4 pages) and data GPADL 20 (2 pages) of
        /// relid 1, channel 1 open over GPADL 10; outbox and events drained.
        fn server_at(version: VmbusVersion) -> Server {
            let mut server = Server::new(ServerConfig::new());
            for index in 0..2 {
                server
                    .offer(crate::server::OfferSpec::new(
                        device_class::HEARTBEAT,
                        Guid::from_fields(index, 1, 2, [3; 8]),
                    ))
                    .unwrap();
            }
            post(
                &mut server,
                version.initiate_contact_connection_id(),
                &InitiateContact::new(version, 0, 0x10_0000, 0x10_1000, 0x10_2000),
            );
            post_here(&mut server, &RequestOffers::new());
            for (handle, pfns) in [(10u32, &[0x100u64, 0x101, 0x102, 0x103][..]), (20, &[0x200, 0x201])] {
                for message in GpadlMessages::for_pages(1, handle, pfns).unwrap() {
                    let id = message_id(&server);
                    server.handle_message(id, message.as_bytes()).unwrap();
                }
            }
            post_here(&mut server, &OpenChannel::new(1, 7, 10, 0, 2));
            assert!(server.open_channel_info(1).is_some());
            drain(&mut server);
            server
        }

        fn message_id(server: &Server) -> u32 {
            server.connection().and_then(|c| c.msg_conn_id).unwrap_or(1)
        }

        fn post<M: ControlMessage>(server: &mut Server, id: u32, message: &M) {
            server.handle_message(id, message.as_bytes()).unwrap();
        }

        fn post_here<M: ControlMessage>(server: &mut Server, message: &M) {
            let id = message_id(server);
            post(server, id, message);
        }

        /// Takes the outbox as message types, and the events.
        fn drain(server: &mut Server) -> (Vec<MessageType>, Vec<ServerEvent>) {
            let types = core::iter::from_fn(|| server.pop_outgoing())
                .map(|b| b.parse().map(|m: Message<'_>| m.message_type()).unwrap())
                .collect();
            (types, core::iter::from_fn(|| server.pop_event()).collect())
        }

        #[test]
        fn map_checks_channel_handle_flags_access_and_one_mapping_at_a_time() {
            let mut server = server_at(VmbusVersion::V5_3);
            let mapped = server.map_gpadl(1, MapGpadlFlags::NONE, 20).unwrap();
            assert_eq!((mapped.relid, mapped.handle, mapped.writable, mapped.len()), (1, 20, true, 8192));
            assert_eq!(mapped.ranges[0].pfns, [0x200, 0x201]);
            assert!(server.is_gpadl_mapped(20));
            assert_eq!(server.map_gpadl(1, MapGpadlFlags::READ_ONLY, 20), Err(MapGpadlError::AlreadyMapped(20)));
            assert_eq!(server.unmap_gpadl(2, 20), Err(MapGpadlError::ForeignGpadl(20)));
            server.unmap_gpadl(1, 20).unwrap();
            assert_eq!(server.unmap_gpadl(1, 20), Err(MapGpadlError::NotMapped(20)));
            assert!(!server.is_gpadl_mapped(20));

            assert_eq!(server.map_gpadl(2, MapGpadlFlags::NONE, 20), Err(MapGpadlError::ForeignGpadl(20)));
            assert_eq!(server.map_gpadl(1, MapGpadlFlags::NONE, 99), Err(MapGpadlError::UnknownGpadl(99)));
            assert_eq!(server.map_gpadl(9, MapGpadlFlags::NONE, 20), Err(MapGpadlError::UnknownChannel(9)));
            assert_eq!(server.map_gpadl(1, MapGpadlFlags(0x6), 20), Err(MapGpadlError::InvalidFlags(6)));
            assert_eq!(server.set_gpadl_read_only(99), Err(MapGpadlError::UnknownGpadl(99)));

            // A GPADL created read-only maps only with READ_ONLY.
            server.set_gpadl_read_only(20).unwrap();
            assert_eq!(server.map_gpadl(1, MapGpadlFlags::NONE, 20), Err(MapGpadlError::NotWritable(20)));
            assert!(!server.is_gpadl_mapped(20), "a refused map leaves no mapping");
            let read_only = server.map_gpadl(1, MapGpadlFlags::READ_ONLY, 20).unwrap();
            assert!(!read_only.writable);
            server.unmap_gpadl(1, 20).unwrap();
            // The ring GPADL of the open channel may be mapped as well.
            assert!(server.map_gpadl(1, MapGpadlFlags::NONE, 10).unwrap().writable);
            assert_eq!(drain(&mut server).0, [], "mapping sends nothing to the guest");
        }

        #[test]
        fn teardown_of_a_mapped_gpadl_waits_for_unmap_at_every_version() {
            for version in [VmbusVersion::V5_3, VmbusVersion::V3_0] {
                let mut server = server_at(version);
                server.map_gpadl(1, MapGpadlFlags::READ_ONLY, 20).unwrap();
                post_here(&mut server, &GpadlTeardown::new(1, 20));
                assert_eq!(drain(&mut server), (alloc::vec![], alloc::vec![]), "{version}: held");
                assert_eq!(server.stats().deferred_teardowns, 1);
                assert!(server.gpadl(20).unwrap().teardown_pending);
                assert_eq!(server.map_gpadl(1, MapGpadlFlags::READ_ONLY, 20), Err(MapGpadlError::TeardownPending(20)));
                server.unmap_gpadl(1, 20).unwrap();
                assert_eq!(
                    drain(&mut server),
                    (
                        alloc::vec![MessageType::GPADL_TORNDOWN],
                        alloc::vec![ServerEvent::GpadlTornDown { relid: 1, gpadl: 20 }]
                    )
                );
                assert!(server.gpadl(20).is_none());
                assert_eq!(server.map_gpadl(1, MapGpadlFlags::READ_ONLY, 20), Err(MapGpadlError::UnknownGpadl(20)));
            }
        }

        #[test]
        fn a_mapped_ring_is_torn_down_after_both_close_and_unmap() {
            let mut server = server_at(VmbusVersion::V5_3);
            server.map_gpadl(1, MapGpadlFlags::NONE, 10).unwrap();
            post_here(&mut server, &GpadlTeardown::new(1, 10));
            assert_eq!(server.map_gpadl(1, MapGpadlFlags::NONE, 20).map(|m| m.handle), Ok(20));
            post_here(&mut server, &CloseChannel::new(1));
            assert_eq!(drain(&mut server), (alloc::vec![], alloc::vec![ServerEvent::ChannelClosed { relid: 1 }]));
            server.unmap_gpadl(1, 10).unwrap();
            assert_eq!(drain(&mut server).0, [MessageType::GPADL_TORNDOWN]);

            // Unmapped first, the ring's teardown still waits for the close.
            let mut server = server_at(VmbusVersion::V5_3);
            server.map_gpadl(1, MapGpadlFlags::NONE, 10).unwrap();
            post_here(&mut server, &GpadlTeardown::new(1, 10));
            server.unmap_gpadl(1, 10).unwrap();
            assert_eq!(drain(&mut server).0, []);
            assert_eq!(server.map_gpadl(1, MapGpadlFlags::NONE, 10), Err(MapGpadlError::TeardownPending(10)));
            post_here(&mut server, &CloseChannel::new(1));
            assert_eq!(drain(&mut server).0, [MessageType::GPADL_TORNDOWN]);
        }

        #[test]
        fn unload_and_release_forget_mappings() {
            let mut server = server_at(VmbusVersion::V5_3);
            server.map_gpadl(1, MapGpadlFlags::NONE, 20).unwrap();
            server.set_gpadl_read_only(10).unwrap();
            post_here(&mut server, &Unload::new());
            assert!(!server.is_gpadl_mapped(20));
            assert_eq!(server.unmap_gpadl(1, 20), Err(MapGpadlError::UnknownGpadl(20)));

            let mut server = server_at(VmbusVersion::V5_3);
            server.map_gpadl(1, MapGpadlFlags::NONE, 20).unwrap();
            server.rescind(1).unwrap();
            assert_eq!(server.map_gpadl(1, MapGpadlFlags::NONE, 10), Err(MapGpadlError::UnknownChannel(1)));
            // The rescinded channel's mapping can still be released.
            server.unmap_gpadl(1, 20).unwrap();
            server.map_gpadl(1, MapGpadlFlags::NONE, 20).unwrap_err();
            post_here(&mut server, &crate::protocol::RelIdReleased::new(1));
            assert!(server.gpadl(20).is_none() && !server.is_gpadl_mapped(20));
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(MapGpadlError::NotWritable(1).status(), NtStatus::ACCESS_DENIED);
        assert_eq!(MapGpadlError::AlreadyMapped(1).status(), NtStatus::INVALID_DEVICE_STATE);
        assert!(MapGpadlFlags::READ_ONLY.read_only());
        assert!(!MapGpadlFlags::NONE.read_only());
    }
}
