//! An example KMCL client driver, written only against [`Kmcl`] and [`ChannelCallbacks`]: the starting point for a
//! new driver.
//!
//! Implements issue 6 §8. The device speaks a tiny protocol of the example's own (not a Hyper-V device):
//! - **Negotiation** (in `post_started`, the place `kmcl-api.md` §Callbacks gives synchronous sends): the driver
//!   sends [`EchoHello`] (`"ECHO"`, version) as a synchronous request; the device completes it with the version it
//!   accepts (a little-endian `u32`; 0 = refused).
//! - **Echo**: every packet the device sends is echoed. If the device asked for a completion, the echo is the
//!   completion's payload (`packet_complete`); otherwise the driver sends the payload back as a new in-band packet from
//!   the channel's pool (`packet_allocate` + `packet_send`; the pool's default completion routine frees it).
//! - **Ping**: [`EchoDriver::ping`] sends a request and waits for the device's answer (a synchronous request).
//! - **Shared page**: at `opened` the driver describes one page to the device in a GPADL, and deletes it at `closed`,
//!   as the KMCL rules require.
//!
//! # Writing a driver from this one
//! 1. Put the driver's state in a type shared between the callbacks and the rest of the kernel (here
//!    [`EchoState`] behind an `Arc<Mutex<_>>`), and hand it to the channel with `channel_set_pointer` if other code
//!    only holds the channel handle.
//! 2. Implement [`ChannelCallbacks`]: `process_packet` is the only required method.
//! 3. Follow the real guest sequence of `kmcl-api.md` §Lifecycle in a start function ([`EchoDriver::start`]):
//!    allocate, `InitSet*` (packet size, ring pages, callbacks, pointer, target, name), enable. Tear down with
//!    `channel_disable` then `channel_cleanup` ([`EchoDriver::stop`]).
//! 4. The kernel drives everything else through [`super::Bus::process_interrupt`] and [`super::Bus::poll`].
//!
//! # Wiring it up
//! The kernel builds one [`super::Bus`] over its VMBus connection, its interrupt pages and a ring allocator over its
//! contiguous heap. Here the crate's own VMBus host stands in for Hyper-V and host memory for the heap; nobody plays
//! the device, so negotiation is cancelled at its timeout, but the channel is up and torn down cleanly:
//! ```
//! use std::sync::Arc;
//! use vmbus::channel::{ChannelRings, InterruptPages};
//! use vmbus::client::{ConnectOptions, Connection};
//! use vmbus::kmcl::echo::{ECHO_INTERFACE_TYPE, EchoDriver};
//! use vmbus::kmcl::{Bus, ChannelState, Kmcl, NtStatus, RingAllocator};
//! use vmbus::protocol::Guid;
//! use vmbus::ring::OwnedRingMemory;
//! use vmbus::server::{LoopbackBus, OfferSpec, ServerConfig};
//!
//! struct Pages;
//! impl InterruptPages for Pages {
//!     fn set_send_interrupt(&self, _relid: u32) {}
//!     fn set_monitor_pending(&self, _monitor_id: u8) {}
//! }
//!
//! struct Heap;
//! impl RingAllocator for Heap {
//!     type Memory = Arc<OwnedRingMemory>;
//!     type Lease = ();
//!     fn allocate(&self, outgoing: u32, incoming: u32) -> vmbus::kmcl::Result<(ChannelRings<Self::Memory>, ())> {
//!         let ring = |pages: u32| Arc::new(OwnedRingMemory::new((pages as usize - 1) * 4096).unwrap());
//!         let pfns = (0..u64::from(outgoing + incoming)).map(|i| 0x8000 + i).collect();
//!         Ok((ChannelRings { outgoing: ring(outgoing), incoming: ring(incoming), pfns, outgoing_pages: outgoing }, ()))
//!     }
//!     fn release(&self, _lease: (), _host_released: bool) {}
//! }
//!
//! let host = LoopbackBus::new(ServerConfig::new());
//! host.offer(OfferSpec::new(ECHO_INTERFACE_TYPE, Guid::ZERO)).unwrap();
//! let mut connection = Connection::connect(&host, ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))).unwrap();
//! connection.request_offers().unwrap();
//! let mut bus = Bus::new(connection, Pages, Heap);
//!
//! let (channel, state) = EchoDriver::start(&mut bus, None, 0x4242).unwrap();
//! assert_eq!(bus.channel_state(channel), Ok(ChannelState::Active));
//! assert_eq!(state.lock().negotiation_error, Some(NtStatus::CANCELLED));
//! // The VMBus interrupt calls `bus.process_interrupt(&relids)`; the kernel's main loop calls `bus.poll()`.
//! bus.poll();
//! EchoDriver::stop(&mut bus, channel).unwrap();
//! assert_eq!(state.lock().events, ["opened", "started", "post_started", "suspend", "closed"]);
//! ```

use super::{
    ChannelCallbacks, ChannelHandle, GpadlFlags, GpadlHandle, Kmcl, NtStatus, PacketCompletion, ProcessPacketFlags,
    Result, SendFlags,
};
use crate::protocol::Guid;
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use spin::Mutex;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The device class of the example device (a made-up GUID, not a Hyper-V class).
pub const ECHO_INTERFACE_TYPE: Guid = Guid::from_fields(0x6563_686f, 0x0001, 0x4b4d, [0x43, 0x4c, 0, 0, 0, 0, 0, 1]);

/// The protocol version the driver asks for.
pub const ECHO_VERSION: u32 = 1;

/// Largest payload the driver sends or accepts.
pub const ECHO_MAX_PACKET: u32 = 512;

/// How long negotiation and pings wait for the device, in nanoseconds.
pub const ECHO_TIMEOUT_NS: u64 = 100_000_000;

/// The negotiation request (wire layout of the example protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct EchoHello {
    /// `b"ECHO"`.
    pub magic: [u8; 4],
    /// The version the driver asks for (little-endian).
    pub version: u32,
}

/// The driver's state, shared by its callbacks and its users.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EchoState {
    /// The version the device accepted, once negotiated.
    pub version: Option<u32>,
    /// Why negotiation failed, if it did.
    pub negotiation_error: Option<NtStatus>,
    /// Packets echoed.
    pub echoed: u64,
    /// Echoes that could not be sent (pool exhausted, channel going away).
    pub echo_failures: u64,
    /// The shared page's GPADL while the channel is open.
    pub shared_gpadl: Option<GpadlHandle>,
    /// Callbacks seen, in order (for the reader of this example and its test).
    pub events: Vec<&'static str>,
}

/// The example driver: its callbacks, and the functions its users call.
pub struct EchoDriver {
    state: Arc<Mutex<EchoState>>,
    shared_page_pfn: u64,
}

impl EchoDriver {
    /// Sets up and enables a channel for the echo device with this instance (`None` = any), sharing the page
    /// `shared_page_pfn` with it. Returns the channel and the driver's state.
    pub fn start(
        kmcl: &mut dyn Kmcl,
        instance: Option<Guid>,
        shared_page_pfn: u64,
    ) -> Result<(ChannelHandle, Arc<Mutex<EchoState>>)> {
        let state = Arc::new(Mutex::new(EchoState::default()));
        let channel = kmcl.channel_allocate()?;
        let driver = EchoDriver { state: Arc::clone(&state), shared_page_pfn };
        let setup = (|| {
            kmcl.channel_init_set_maximum_packet_size(channel, ECHO_MAX_PACKET)?;
            kmcl.channel_init_set_ring_buffer_page_count(channel, 4, 4)?;
            kmcl.channel_init_set_callbacks(channel, Box::new(driver))?;
            kmcl.channel_set_pointer(channel, Some(state.clone()))?;
            kmcl.channel_init_set_target(channel, ECHO_INTERFACE_TYPE, instance)?;
            kmcl.channel_init_set_friendly_name(channel, "example echo")?;
            kmcl.channel_enable(channel)
        })();
        if let Err(status) = setup {
            let _ = kmcl.channel_cleanup(channel);
            return Err(status);
        }
        Ok((channel, state))
    }

    /// Sends `payload` and waits for the device's answer, which is copied into `answer` (a multiple of 8 bytes);
    /// returns its length.
    pub fn ping(kmcl: &mut dyn Kmcl, channel: ChannelHandle, payload: &[u8], answer: &mut [u8]) -> Result<usize> {
        kmcl.channel_send_synchronous_request(
            channel,
            payload,
            None,
            SendFlags::WAIT_FOR_COMPLETION,
            Some(answer),
            Some(ECHO_TIMEOUT_NS),
        )
    }

    /// Disables and frees the channel.
    pub fn stop(kmcl: &mut dyn Kmcl, channel: ChannelHandle) -> Result<()> {
        kmcl.channel_disable(channel)?;
        kmcl.channel_cleanup(channel)
    }

    fn event(&self, name: &'static str) {
        self.state.lock().events.push(name);
    }
}

impl ChannelCallbacks for EchoDriver {
    fn opened(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) -> Result<()> {
        self.event("opened");
        let gpadl =
            kmcl.channel_create_gpadl_from_pfn_list(channel, GpadlFlags::NONE, &[self.shared_page_pfn], 0, 4096)?;
        self.state.lock().shared_gpadl = Some(gpadl);
        Ok(())
    }

    fn started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.event("started");
    }

    fn post_started(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        self.event("post_started");
        let hello = EchoHello { magic: *b"ECHO", version: ECHO_VERSION.to_le() };
        let mut answer = [0u8; 8];
        let result = kmcl.channel_send_synchronous_request(
            channel,
            hello.as_bytes(),
            None,
            SendFlags::WAIT_FOR_COMPLETION,
            Some(&mut answer),
            Some(ECHO_TIMEOUT_NS),
        );
        let mut state = self.state.lock();
        match result {
            Ok(len) if len >= 4 => {
                let version = u32::from_le_bytes([answer[0], answer[1], answer[2], answer[3]]);
                if version == 0 {
                    state.negotiation_error = Some(NtStatus::REVISION_MISMATCH);
                } else {
                    state.version = Some(version);
                }
            }
            Ok(_) => state.negotiation_error = Some(NtStatus::INVALID_BUFFER_SIZE),
            Err(status) => state.negotiation_error = Some(status),
        }
    }

    fn suspend(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        // Every packet is completed inside process_packet, so nothing is outstanding here.
        self.event("suspend");
    }

    fn closed(&mut self, kmcl: &mut dyn Kmcl, channel: ChannelHandle) {
        self.event("closed");
        let gpadl = self.state.lock().shared_gpadl.take();
        if let Some(gpadl) = gpadl
            && let Err(status) = kmcl.channel_delete_gpadl(channel, gpadl)
        {
            log::warn!("echo: deleting the shared page's GPADL: {status}");
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
        // The echo goes back as the completion when the device asked for one, else as a new packet from the pool
        // (and the incoming packet is completed without a payload, which sends nothing).
        let echoed = if kmcl.packet_completion_requested(packet).unwrap_or(false) {
            kmcl.packet_complete(packet, buffer).is_ok()
        } else {
            let sent = Self::echo_as_packet(kmcl, channel, buffer);
            kmcl.packet_complete(packet, &[]).is_ok() && sent
        };
        let mut state = self.state.lock();
        if echoed {
            state.echoed += 1;
        } else {
            state.echo_failures += 1;
        }
    }
}

impl EchoDriver {
    /// Sends `payload` back as a new in-band packet from the channel's pool.
    fn echo_as_packet(kmcl: &mut dyn Kmcl, channel: ChannelHandle, payload: &[u8]) -> bool {
        let Ok(packet) = kmcl.packet_allocate(channel) else { return false };
        if kmcl.packet_send(packet, payload, None, SendFlags::NONE).is_err() {
            let _ = kmcl.packet_free(packet);
            return false;
        }
        true
    }
}
