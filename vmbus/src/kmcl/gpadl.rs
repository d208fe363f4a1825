//! KMCL GPADLs: the handle and flags of `VmbChannelCreateGpadlFromBuffer`, `CreateGpadlFromPfnList` and
//! `VmbChannelDeleteGpadl`, and the buffer description that replaces a kernel virtual address.
//!
//! Implements `kmcl-api.md` §Client interface rows 3–5 and the V4 `CreateGpadlFromPfnList` (the functions are
//! methods of [`super::Kmcl`]). A GPADL describes guest memory to the host (§5); it must be deleted before or in the
//! channel's `closed` callback (whatever is left is deleted by the bus then, and counted).

use super::channel::ChannelHandle;
use core::fmt;

/// A GPADL created on a KMCL channel: its channel and the guest-chosen GPADL id the host knows it by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct GpadlHandle {
    pub(crate) channel: ChannelHandle,
    pub(crate) id: u32,
}

impl GpadlHandle {
    /// The GPADL id as the host sees it (GPADL_HEADER's `gpadl` field), for example to name it in a device
    /// protocol message.
    pub const fn id(self) -> u32 {
        self.id
    }

    /// The channel it was created on.
    pub const fn channel(self) -> ChannelHandle {
        self.channel
    }
}

impl fmt::Debug for GpadlHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gpadl({:?}/{:#x})", self.channel, self.id)
    }
}

/// `VMBUS_GPADL_FLAG_*` for the create functions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct GpadlFlags(pub u32);

impl GpadlFlags {
    /// Writable by the host.
    pub const NONE: GpadlFlags = GpadlFlags(0);
    /// `READ_ONLY` (0x1): the host may only read the memory. The VMBus wire has no read-only bit in GPADL_HEADER, so
    /// the guest cannot make the host enforce it; the flag is recorded ([`super::Kmcl::gpadl_is_read_only`]) and is
    /// what a server's `VmbChannelMapGpadl` checks on the host side.
    pub const READ_ONLY: GpadlFlags = GpadlFlags(0x1);
    /// Every flag this layer knows; any other bit is [`super::NtStatus::INVALID_PARAMETER_2`].
    pub const ALL: GpadlFlags = GpadlFlags(0x1);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: GpadlFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

/// A buffer whose guest-physical pages are known: the unikernel's stand-in for the `PVOID Buffer` of
/// `VmbChannelCreateGpadlFromBuffer` (the kernel's DMA-able allocations implement it; Windows looks the pages up
/// itself, a `no_std` library cannot).
pub trait PhysicalBuffer {
    /// The guest page numbers of the pages the buffer spans, in order.
    fn pfns(&self) -> &[u64];
    /// Offset of the buffer's first byte in its first page.
    fn byte_offset(&self) -> u32;
    /// Length of the buffer in bytes.
    fn byte_count(&self) -> u32;
}
