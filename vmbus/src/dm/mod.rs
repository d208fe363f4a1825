//! Hyper-V Dynamic Memory (hv_balloon): the guest driver's protocol and logic, with no I/O.
//!
//! Reference: `dynamic-memory.md` (all of it). Sources checked a second time for this module: QEMU
//! `include/hw/hyperv/dynmem-proto.h` and `hw/hyperv/hv-balloon.c` (the host this driver must work against,
//! QEMU ≥ 8.2), Linux `drivers/hv/hv_balloon.c` (the reference guest).
//!
//! - [`wire`]: the message structs, [`DmMessageType`], [`DmVersion`], and [`parse_host_message`].
//! - [`range`]: [`PageRange`] and [`PageRangeSet`], the record of frames the host holds.
//! - [`pool`]: [`FramePool`], what the kernel's frame allocator must offer.
//! - [`driver`]: [`DmDriver`], the state machine.
//!
//! # Driving it (the KMCL glue)
//!
//! ```text
//! on channel opened:      driver.start(now)
//! on packet received:     driver.receive(payload, now, &mut pool)      // in-band payload, VMBus header stripped
//! after each receive and when now >= driver.next_wakeup():
//!     while ring has room for 4096 bytes { match driver.poll_transmit(now, &mut pool) { Some(m) => send(m), None => break } }
//! on channel closed:      driver.channel_closed()  (then, on QEMU, driver.return_all_ballooned(&mut pool))
//! ```
//!
//! Channel parameters: class `525074dc-8985-46e2-8057-a307dc18a502`, one channel, no user-defined open data.
//! Rings: 16 KiB of data per direction plus the 4 KiB ring header page (Linux's `VMBUS_RING_SIZE(16 * 1024)`);
//! a 4 KiB data ring would not hold one full balloon response. Every message both ways is a VMBus in-band packet
//! (type 6) with flags 0: no completions requested, none sent. The largest guest → host payload is
//! [`MAX_GUEST_MESSAGE_SIZE`] (4096 bytes: a BALLOON_RESPONSE with 510 ranges, 4120 bytes as a packet with
//! descriptor and trailer); the receive buffer should also take 4096-byte payloads (Linux receives into one
//! page; QEMU's own messages are at most 24 bytes). The packet's transaction id is not interpreted by QEMU (it
//! puts the DM trans_id there); the glue may use the DM header's `trans_id` or 0.
//!
//! # What QEMU's hv-balloon host requires and does (hw/hyperv/hv-balloon.c, QEMU 8.2–10.x)
//!
//! - Strict order: it handles VERSION_REQUEST only in its version state and CAPABILITIES_REPORT only after a
//!   version was accepted; anything else out of order is logged ("unexpected ... in %d state") and dropped.
//!   It accepts any version 0x3 ≤ v ≤ 0x20000, so 2.0 is accepted at the first attempt, and echoes the request's
//!   trans_id in the response. Messages shorter than their struct are dropped with a warning, never answered.
//! - Capabilities: always accepted; the response sets hot_remove = 1 and suppress_pressure_reports = 1 unless
//!   the device has `status-report=on`. This driver honours the suppress bit (it sends no status reports then).
//!   If the report offers hot add and the device has a `memdev`, QEMU hot-adds that backend (chunks of ≤ 2 GiB,
//!   aligned to the reported 2^n MiB, 24-byte request with range = region); a response with fewer pages than
//!   offered, or result 0, makes it stop hot-adding for good.
//! - It then waits 50 s of guest virtual time (`HV_BALLOON_POST_INIT_WAIT`, copied from Hyper-V) before acting on
//!   any target: a `balloon` command given earlier is served once that wait is over.
//! - Status reports: accepted in any state once the channel is open, when at least 48 bytes; with
//!   `status-report=on` each one updates `query-hv-balloon-status-report` (committed and available, in bytes =
//!   pages × 4096) and emits HV_BALLOON_STATUS_REPORT (rate-limited to 1/s by the monitor); it never replies.
//! - Balloon: one BALLOON_REQUEST of at most 585 728 pages at a time, numbered by its own trans_id counter
//!   (0 after a reset, +1 per finished transaction); it takes any number of BALLOON_RESPONSEs until more_pages =
//!   0 and ignores their trans_ids. A response with range_count 0 means "at the floor": it ends the transaction
//!   and QEMU stops trying for this target. A last response with pages but fewer than asked makes it send another
//!   BALLOON_REQUEST for the rest (this driver answers it with range_count 0 when at the floor). Only pages in
//!   ordinary RAM count toward `query-balloon`'s `actual`; others are recorded but not discarded.
//! - Unballoon: one range per UNBALLOON_REQUEST (≤ 2 GiB), sent back to back with more_pages = 1 on all but the
//!   last, without waiting; it expects exactly one UNBALLOON_RESPONSE, after the last (an extra one is logged as
//!   unexpected). It only returns ranges the guest gave.
//! - It never times out a reply and never closes the channel; after the last close the device resets, clearing
//!   its record of removed pages (which is why [`DmDriver::return_all_ballooned`] is safe on QEMU after a close).
//!
//! # Floor and figures
//!
//! The driver never takes a frame while the pool has [`DmConfig::floor_pages`] free frames or fewer
//! ([`DmConfig::for_total_pages`]: 1/8 of memory, at least 16 MiB). Status reports carry the pool's free frames as
//! `num_available` and its committed frames as `num_committed`, plus, once anything was ballooned or hot-added,
//! the ballooned frames and the floor (Linux's rule, which the host's pressure logic expects).

pub mod driver;
pub mod pool;
pub mod range;
pub mod wire;

#[cfg(test)]
mod tests;

pub use driver::{DmConfig, DmDriver, DmEvent, DmFailure, DmState, DmStats, IgnoredReason, MIN_FLOOR_PAGES};
pub use pool::{FramePool, HotAddAlignment};
pub use range::{PageRange, PageRangeSet};
pub use wire::{
    DmMessageType, DmParseError, DmVersion, HostMessage, MAX_GUEST_MESSAGE_SIZE, MAX_RANGES_PER_BALLOON_RESPONSE,
    parse_host_message,
};
