//! The Dynamic Memory (hv_balloon) device driver: [`crate::dm::DmDriver`] on a KMCL channel.
//!
//! Reference: `dynamic-memory.md` (the protocol, "Guest sequence", "QEMU's host") and `kmcl-api.md` §Lifecycle
//! (allocate, init, enable; disable, cleanup). The glue follows the recipe in the [`crate::dm`] module docs:
//!
//! - channel: class [`device_class::DYNAMIC_MEMORY`], rings of a control page plus 16 KiB of data each way
//!   ([`DM_RING_PAGES`]), maximum packet [`DM_MAXIMUM_PACKET_SIZE`] (a full 510-range BALLOON_RESPONSE is 4096
//!   bytes), every message an in-band packet without a completion request;
//! - `opened` → [`DmDriver::start`]; `post_started` and every `process_packet` → [`DmDriver::receive`] then send
//!   what [`DmDriver::poll_transmit`] gives; [`Driver::tick`] sends status reports and anything left waiting;
//!   `closed` → [`DmDriver::channel_closed`] (and, when configured, [`DmDriver::return_all_ballooned`]).
//!
//! Flow control: outgoing messages come from the channel's bounded packet pool ([`DM_PACKETS_IN_FLIGHT`]); a pool
//! packet is free again once its message is in the ring. A packet is taken before the protocol driver is polled, so
//! when none is free the message stays in the protocol driver (balloon responses carry frames recorded as given the
//! moment they are polled, so a polled message must go out) and [`Driver::tick`] asks to run again after
//! [`DM_RETRY_NS`]. So a large balloon request never queues more than a few pages of responses in memory.
//!
//! Frames move through a [`FramePool`] the kernel shares with the driver (`Arc<Mutex<P>>`); the time comes from a
//! [`DmClock`] (the same clock [`Driver::tick`] gets), because callbacks run without a time argument.

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::time::Duration;

use spin::Mutex;

use super::Driver;
use crate::dm::{DmConfig, DmDriver, DmEvent, DmState, DmStats, DmVersion, FramePool, MAX_GUEST_MESSAGE_SIZE};
use crate::kmcl::{
    ChannelCallbacks, ChannelHandle, Kmcl, NtStatus, PacketCompletion, ProcessPacketFlags, Result, SendFlags,
};
use crate::protocol::{Guid, device_class};

/// Largest packet payload either way: a full BALLOON_RESPONSE ([`MAX_GUEST_MESSAGE_SIZE`], 4096 bytes); the host's
/// messages are smaller (QEMU's are at most 24 bytes), Hyper-V's fit one page as Linux receives them.
pub const DM_MAXIMUM_PACKET_SIZE: u32 = MAX_GUEST_MESSAGE_SIZE as u32;

/// Pages of each ring, control page included: 1 + 4 (16 KiB of data, Linux's `VMBUS_RING_SIZE(16 * 1024)`).
pub const DM_RING_PAGES: u32 = 5;

/// Packets of the channel's pool: how many messages may wait in the outgoing ring or the bus's send queue.
pub const DM_PACKETS_IN_FLIGHT: u32 = 4;

/// How soon [`Driver::tick`] wants to run again while a message waits for a free packet (1 ms).
pub const DM_RETRY_NS: u64 = 1_000_000;

/// How many [`DmEvent`]s the driver keeps for [`DmChannelDriver::take_events`]; older ones are counted and dropped.
pub const DM_EVENT_BACKLOG: usize = 256;

/// The kernel's monotonic time in nanoseconds, for the callbacks (which get no time argument).
pub trait DmClock: Send + Sync {
    /// Nanoseconds since an arbitrary fixed point; never decreases.
    fn now_ns(&self) -> u64;
}

impl<F: Fn() -> u64 + Send + Sync> DmClock for F {
    fn now_ns(&self) -> u64 {
        self()
    }
}

/// How the driver behaves around the protocol module.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct DmChannelConfig {
    /// The protocol driver's settings (floor, status interval, response timeout).
    pub dm: DmConfig,
    /// Give every frame the host still holds back to the pool when the channel closes. Right on QEMU, whose device
    /// forgets the removed pages when it resets after the last close (see [`DmDriver::return_all_ballooned`]).
    pub return_ballooned_on_close: bool,
}

impl DmChannelConfig {
    /// The settings for a guest of `total_pages` frames ([`DmConfig::for_total_pages`]), returning held frames at
    /// close.
    pub fn for_total_pages(total_pages: u64) -> DmChannelConfig {
        DmChannelConfig { dm: DmConfig::for_total_pages(total_pages), return_ballooned_on_close: true }
    }
}

/// Counters of the channel glue (the protocol's own are [`DmStats`]).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct DmChannelStats {
    /// Packets received from the host.
    pub packets_received: u64,
    /// Messages sent to the host.
    pub messages_sent: u64,
    /// Times a message had to wait because every pool packet was in flight.
    pub waits_for_packet: u64,
    /// Sends the bus refused (the message was dropped; logged).
    pub send_failures: u64,
    /// Events dropped from the backlog because nobody took them.
    pub events_dropped: u64,
    /// Frames given back to the pool at close ([`DmChannelConfig::return_ballooned_on_close`]).
    pub returned_at_close: u64,
}

/// The state shared by the callbacks and the driver object.
struct Shared<P> {
    driver: DmDriver,
    pool: Arc<Mutex<P>>,
    /// The channel is open and started (between `post_started` and `suspend`): messages may be sent.
    sending: bool,
    events: VecDeque<DmEvent>,
    stats: DmChannelStats,
    return_on_close: bool,
}

impl<P: FramePool> Shared<P> {
    fn record(&mut self, event: DmEvent) {
        if self.events.len() >= DM_EVENT_BACKLOG {
            self.events.pop_front();
            self.stats.events_dropped += 1;
        }
        self.events.push_back(event);
    }

    /// The next message to send, from the protocol driver.
    fn next_message(&mut self, now_ns: u64) -> Option<Vec<u8>> {
        let mut pool = self.pool.lock();
        self.driver.poll_transmit(Duration::from_nanos(now_ns), &mut *pool)
    }
}

/// Sends what the protocol driver has to send, until it has nothing or no pool packet is free. The shared state
/// is never locked across a KMCL call.
fn transmit<P: FramePool>(shared: &Mutex<Shared<P>>, kmcl: &mut dyn Kmcl, channel: ChannelHandle, now_ns: u64) {
    loop {
        if !shared.lock().sending {
            return;
        }
        let packet = match kmcl.packet_allocate(channel) {
            Ok(packet) => packet,
            Err(status) => {
                // Nothing was polled yet: the protocol driver keeps the message, the next tick tries again.
                shared.lock().stats.waits_for_packet += 1;
                if status != NtStatus::INSUFFICIENT_RESOURCES {
                    log::warn!("dm: no packet to send with: {status}");
                }
                return;
            }
        };
        let message = shared.lock().next_message(now_ns);
        let Some(message) = message else {
            let _ = kmcl.packet_free(packet);
            return;
        };
        let result = kmcl.packet_send(packet, &message, None, SendFlags::NONE);
        let mut s = shared.lock();
        match result {
            Ok(()) => s.stats.messages_sent += 1,
            Err(status) => {
                let _ = kmcl.packet_free(packet);
                s.stats.send_failures += 1;
                log::warn!("dm: sending a {}-byte message failed: {status}; dropped", message.len());
            }
        }
    }
}

/// The channel callbacks: hand each event to the protocol driver.
struct DmCallbacks<P, C> {
    shared: Arc<Mutex<Shared<P>>>,
    clock: Arc<C>,
}

impl<P: FramePool + Send + 'static, C: DmClock + 'static> ChannelCallbacks for DmCallbacks<P, C> {
    fn opened(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) -> Result<()> {
        let now = Duration::from_nanos(self.clock.now_ns());
        let mut s = self.shared.lock();
        s.driver.start(now);
        Ok(())
    }

    fn post_started(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        self.shared.lock().sending = true;
        transmit(&self.shared, kmcl, channel, self.clock.now_ns());
    }

    fn suspend(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        // Every incoming packet is completed inside process_packet: nothing is outstanding.
        self.shared.lock().sending = false;
    }

    fn closed(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        let mut s = self.shared.lock();
        s.sending = false;
        s.driver.channel_closed();
        if s.return_on_close {
            let pool = s.pool.clone();
            let returned = s.driver.return_all_ballooned(&mut *pool.lock());
            s.stats.returned_at_close += returned;
        }
    }

    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        _flags: ProcessPacketFlags,
    ) {
        let now_ns = self.clock.now_ns();
        {
            let mut s = self.shared.lock();
            s.stats.packets_received += 1;
            let pool = s.pool.clone();
            let event = s.driver.receive(buffer, Duration::from_nanos(now_ns), &mut *pool.lock());
            s.record(event);
        }
        // The host asks for no completion (flags 0); completing frees the packet and sends nothing then.
        if let Err(status) = kmcl.packet_complete(packet, &[]) {
            log::warn!("dm: completing a received packet: {status}");
        }
        transmit(&self.shared, kmcl, channel, now_ns);
    }
}

/// The Dynamic Memory driver the kernel runs ([`Driver`]): binds the hv_balloon channel, gives the host frames
/// from the shared [`FramePool`] `P` and takes them back, and reports the pool's figures once a second.
pub struct DmChannelDriver<P, C> {
    shared: Arc<Mutex<Shared<P>>>,
    clock: Arc<C>,
    channel: Option<ChannelHandle>,
}

impl<P: FramePool + Send + 'static, C: DmClock + 'static> DmChannelDriver<P, C> {
    /// A driver over `pool` (shared with the kernel's allocator) and `clock`, not yet started.
    pub fn new(config: DmChannelConfig, pool: Arc<Mutex<P>>, clock: C) -> DmChannelDriver<P, C> {
        let shared = Shared {
            driver: DmDriver::new(config.dm),
            pool,
            sending: false,
            events: VecDeque::new(),
            stats: DmChannelStats::default(),
            return_on_close: config.return_ballooned_on_close,
        };
        DmChannelDriver { shared: Arc::new(Mutex::new(shared)), clock: Arc::new(clock), channel: None }
    }

    /// The channel while the driver is started.
    pub fn channel(&self) -> Option<ChannelHandle> {
        self.channel
    }

    /// The protocol state.
    pub fn state(&self) -> DmState {
        self.shared.lock().driver.state()
    }

    /// The version the host accepted.
    pub fn version(&self) -> Option<DmVersion> {
        self.shared.lock().driver.version()
    }

    /// Frames the host holds now.
    pub fn ballooned_pages(&self) -> u64 {
        self.shared.lock().driver.ballooned_pages()
    }

    /// The protocol driver's counters.
    pub fn protocol_stats(&self) -> DmStats {
        *self.shared.lock().driver.stats()
    }

    /// The glue's counters.
    pub fn channel_stats(&self) -> DmChannelStats {
        self.shared.lock().stats
    }

    /// What the received messages did since the last call, oldest first (for the kernel's log and tests).
    pub fn take_events(&mut self) -> Vec<DmEvent> {
        self.shared.lock().events.drain(..).collect()
    }
}

impl<P: FramePool + Send + 'static, C: DmClock + 'static> Driver for DmChannelDriver<P, C> {
    fn name(&self) -> &'static str {
        "dynamic memory"
    }

    fn interface_type(&self) -> Guid {
        device_class::DYNAMIC_MEMORY
    }

    fn start(&mut self, kmcl: &mut dyn Kmcl) -> Result<ChannelHandle> {
        if let Some(channel) = self.channel {
            return Ok(channel);
        }
        let channel = kmcl.channel_allocate()?;
        let callbacks = DmCallbacks { shared: Arc::clone(&self.shared), clock: Arc::clone(&self.clock) };
        let setup = (|| {
            kmcl.channel_init_set_maximum_packet_size(channel, DM_MAXIMUM_PACKET_SIZE)?;
            kmcl.channel_init_set_ring_buffer_page_count(channel, DM_RING_PAGES, DM_RING_PAGES)?;
            kmcl.channel_init_set_maximum_packet_count(channel, DM_PACKETS_IN_FLIGHT)?;
            kmcl.channel_init_set_callbacks(channel, Box::new(callbacks))?;
            kmcl.channel_init_set_target(channel, device_class::DYNAMIC_MEMORY, None)?;
            kmcl.channel_init_set_friendly_name(channel, "dynamic memory")?;
            kmcl.channel_enable(channel)
        })();
        if let Err(status) = setup {
            let _ = kmcl.channel_cleanup(channel);
            return Err(status);
        }
        self.channel = Some(channel);
        Ok(channel)
    }

    fn tick(&mut self, kmcl: &mut dyn Kmcl, now_ns: u64) -> Option<u64> {
        let channel = self.channel?;
        transmit(&self.shared, kmcl, channel, now_ns);
        let s = self.shared.lock();
        if !s.sending {
            return None;
        }
        s.driver.next_wakeup().map(|at| {
            let at = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
            // Work that is due now but found no packet is retried shortly, not in a busy loop.
            if at <= now_ns { now_ns.saturating_add(DM_RETRY_NS) } else { at }
        })
    }

    fn status(&self) -> String {
        let s = self.shared.lock();
        let stats = s.driver.stats();
        let version = s.driver.version().map(|v| format!("{v}")).unwrap_or_else(|| String::from("-"));
        format!(
            "{:?}, version {version}, {} pages ballooned (given {}, returned {}), {} status reports",
            s.driver.state(),
            s.driver.ballooned_pages(),
            stats.pages_given,
            stats.pages_returned,
            stats.status_reports
        )
    }

    fn stop(&mut self, kmcl: &mut dyn Kmcl) -> Result<()> {
        let Some(channel) = self.channel.take() else { return Ok(()) };
        kmcl.channel_disable(channel)?;
        kmcl.channel_cleanup(channel)
    }
}
