//! An example KMCL server driver, written only against [`Kmcl`], [`KmclServer`] and [`ChannelCallbacks`]: the
//! device end of the example echo device whose client driver is [`super::echo`], and the starting point for a new
//! server driver.
//!
//! It speaks the example protocol of [`super::echo`] from the device's side:
//! - **Offer**: [`EchoServer::start`] allocates a server channel, gives it the [`ECHO_INTERFACE_TYPE`] class and the
//!   caller's instance, and enables it, which offers it to the guest (`kmcl-api.md` §Lifecycle, "Server: Enable
//!   offers, Disable revokes the offer").
//! - **Negotiation**: the first packet of each open that is an [`EchoHello`] (`"ECHO"`, version) is answered in its
//!   completion with the version accepted: [`ECHO_VERSION`] when the guest asked for it, 0 (refused) otherwise.
//! - **Echo**: every other packet that asks for a completion is echoed as that completion's payload. A packet that
//!   asks for none is counted and not answered: the client echoes the device's packets, so answering with a packet
//!   would bounce between the two ends for ever.
//! - **Counts**: opens, hellos, echo requests and their bytes, one-way packets, closes — in [`EchoServerState`],
//!   shared with whoever reports on the device.
//!
//! # Writing a server driver from this one
//! 1. Keep the driver's state in a type shared between the callbacks and the rest of the host (here
//!    [`EchoServerState`] behind an `Arc<Mutex<_>>`).
//! 2. Implement [`ChannelCallbacks`] as a client driver does: `process_packet` completes every packet it is given
//!    (with the answer as the completion's payload when the guest asked for one). `opened` may refuse the guest's
//!    open by returning an error; nothing can be sent from it (the rings are mapped after it returns).
//! 3. Set the channel up in a start function ([`EchoServer::start`]): allocate, `InitSet*` (packet size,
//!    callbacks, pointer, name) and the server-only `server_channel_init_set_target_interface_id` (reached through
//!    [`Kmcl::as_server`]), then enable, which offers the channel. Do not wait for the guest in `post_started`: on
//!    one thread the guest is still inside its open then ([`super::server`] §What a single thread cannot do).
//! 4. The host drives the bus: [`super::ServerBus::process_interrupt`] with the channels the guest signalled and
//!    [`super::ServerBus::poll`] for the control side (the guest's opens and closes). [`EchoServer::stop`]
//!    (disable, which rescinds, then cleanup) takes the device away.
//!
//! # Wiring it up
//! A server bus over the crate's loopback host; the guest connects and sees the offer (a guest driver would then
//! bind it: `vmbus/tests/kmcl_server.rs` runs this server against [`super::echo::EchoDriver`] on one thread):
//! ```
//! use std::sync::Arc;
//! use vmbus::client::{ConnectOptions, Connection};
//! use vmbus::kmcl::echo::ECHO_INTERFACE_TYPE;
//! use vmbus::kmcl::echo_server::EchoServer;
//! use vmbus::kmcl::{ChannelState, Handles, Kmcl, ServerBus};
//! use vmbus::protocol::Guid;
//! use vmbus::server::{LoopbackBus, ServerConfig};
//!
//! let host: &'static LoopbackBus = Box::leak(Box::new(LoopbackBus::new(ServerConfig::new())));
//! let mut server = ServerBus::new(host, Arc::new(Handles::new()));
//! let instance = Guid::from_canonical("6563686f-0001-4b4d-434c-0000000000aa");
//! let (channel, state) = EchoServer::start(&mut server, instance).unwrap();
//! assert_eq!(server.channel_state(channel), Ok(ChannelState::Enabled));
//!
//! let mut guest = Connection::connect(host, ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))).unwrap();
//! guest.request_offers().unwrap();
//! let offer = guest.offers().find(|offer| offer.interface_type == ECHO_INTERFACE_TYPE).unwrap();
//! assert_eq!(offer.interface_instance, instance);
//!
//! // The host's interrupt handler calls `server.process_interrupt(&relids)`, its main loop `server.poll()`.
//! server.poll();
//! EchoServer::stop(&mut server, channel).unwrap();
//! assert_eq!(state.lock().opens, 0);
//! ```

use super::echo::{ECHO_INTERFACE_TYPE, ECHO_MAX_PACKET, ECHO_VERSION, EchoHello};
use super::{ChannelCallbacks, ChannelHandle, Kmcl, NtStatus, PacketCompletion, ProcessPacketFlags, Result};
use crate::protocol::Guid;
use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use spin::Mutex;
use zerocopy::FromBytes;

/// What the echo device saw, shared by its callbacks and its users.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EchoServerState {
    /// Guest opens accepted.
    pub opens: u64,
    /// Guest closes (or the server's own disable of an open channel).
    pub closes: u64,
    /// Hellos answered with [`ECHO_VERSION`].
    pub hellos: u64,
    /// Hellos refused (another version asked for): answered with 0.
    pub refused_hellos: u64,
    /// The version accepted on the current open, if negotiated.
    pub version: Option<u32>,
    /// Echo requests (packets asking for a completion, hellos not counted).
    pub packets: u64,
    /// Payload bytes of those requests, as received (the sender's padding to 8 bytes included).
    pub bytes: u64,
    /// Packets that asked for no completion: counted, not answered.
    pub one_way: u64,
    /// Completions that could not be sent (the channel going away).
    pub failures: u64,
    /// Callbacks seen, in order (for the reader of this example and its tests).
    pub events: Vec<&'static str>,
}

impl EchoServerState {
    /// One line for reports: opens, hellos, packets and bytes, closes.
    pub fn summary(&self) -> alloc::string::String {
        alloc::format!(
            "{} open(s), {} hello(s) ({} refused), {} packets, {} bytes echoed, {} one-way, {} failures, {} close(s)",
            self.opens,
            self.hellos,
            self.refused_hellos,
            self.packets,
            self.bytes,
            self.one_way,
            self.failures,
            self.closes
        )
    }
}

/// The example server driver: its callbacks, and the functions its users call.
pub struct EchoServer {
    state: Arc<Mutex<EchoServerState>>,
}

impl EchoServer {
    /// Allocates a server channel for the echo device with this instance and enables it, which offers it to the
    /// guest. Returns the channel and the driver's state. [`NtStatus::NOT_SUPPORTED`] when `kmcl` is not a
    /// server's KMCL ([`Kmcl::as_server`] is `None`); otherwise the status of the failing KMCL call (the channel is
    /// cleaned up then).
    pub fn start(kmcl: &mut dyn Kmcl, instance: Guid) -> Result<(ChannelHandle, Arc<Mutex<EchoServerState>>)> {
        if kmcl.as_server().is_none() {
            return Err(NtStatus::NOT_SUPPORTED);
        }
        let state = Arc::new(Mutex::new(EchoServerState::default()));
        let channel = kmcl.channel_allocate()?;
        let driver = EchoServer { state: Arc::clone(&state) };
        let setup = (|| {
            kmcl.channel_init_set_maximum_packet_size(channel, ECHO_MAX_PACKET)?;
            kmcl.channel_init_set_callbacks(channel, Box::new(driver))?;
            kmcl.channel_set_pointer(channel, Some(state.clone()))?;
            kmcl.channel_init_set_friendly_name(channel, "example echo device")?;
            let server = kmcl.as_server().ok_or(NtStatus::NOT_SUPPORTED)?;
            server.server_channel_init_set_target_interface_id(channel, ECHO_INTERFACE_TYPE, instance)?;
            kmcl.channel_enable(channel)
        })();
        if let Err(status) = setup {
            let _ = kmcl.channel_cleanup(channel);
            return Err(status);
        }
        Ok((channel, state))
    }

    /// Disables the channel (closing the guest's open and rescinding the offer) and frees it.
    pub fn stop(kmcl: &mut dyn Kmcl, channel: ChannelHandle) -> Result<()> {
        kmcl.channel_disable(channel)?;
        kmcl.channel_cleanup(channel)
    }

    fn event(&self, name: &'static str) {
        self.state.lock().events.push(name);
    }

    /// The completion payload for a hello: the accepted version (little-endian), padded to 8 bytes.
    fn hello_answer(&self, hello: &EchoHello) -> [u8; 8] {
        let asked = u32::from_le(hello.version);
        let mut state = self.state.lock();
        let accepted = if asked == ECHO_VERSION {
            state.hellos += 1;
            state.version = Some(ECHO_VERSION);
            ECHO_VERSION
        } else {
            state.refused_hellos += 1;
            0
        };
        let mut answer = [0u8; 8];
        answer[..4].copy_from_slice(&accepted.to_le_bytes());
        answer
    }
}

impl ChannelCallbacks for EchoServer {
    fn opened(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) -> Result<()> {
        let mut state = self.state.lock();
        state.events.push("opened");
        state.opens += 1;
        // Each open negotiates afresh.
        state.version = None;
        Ok(())
    }

    fn started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        self.event("started");
    }

    fn post_started(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        // Nothing to send first: the guest speaks first (its hello).
        self.event("post_started");
    }

    fn suspend(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        // Every packet is completed inside process_packet, so nothing is outstanding here.
        self.event("suspend");
    }

    fn closed(&mut self, _kmcl: &mut dyn Kmcl, _channel: ChannelHandle) {
        let mut state = self.state.lock();
        state.events.push("closed");
        state.closes += 1;
        state.version = None;
    }

    fn process_packet(
        &mut self,
        kmcl: &mut dyn Kmcl,
        _channel: ChannelHandle,
        packet: PacketCompletion,
        buffer: &[u8],
        _flags: ProcessPacketFlags,
    ) {
        // The guest's bytes are untrusted: the hello is parsed with a length check, anything else only copied.
        let wants_answer = kmcl.packet_completion_requested(packet).unwrap_or(false);
        let negotiated = self.state.lock().version.is_some();
        let hello = if negotiated {
            None
        } else {
            EchoHello::read_from_prefix(buffer).ok().map(|(hello, _)| hello).filter(|hello| hello.magic == *b"ECHO")
        };
        let result = match hello {
            Some(hello) if wants_answer => {
                let answer = self.hello_answer(&hello);
                kmcl.packet_complete(packet, &answer)
            }
            _ if wants_answer => {
                let result = kmcl.packet_complete(packet, buffer);
                if result.is_ok() {
                    let mut state = self.state.lock();
                    state.packets += 1;
                    state.bytes += buffer.len() as u64;
                }
                result
            }
            _ => {
                self.state.lock().one_way += 1;
                kmcl.packet_complete(packet, &[])
            }
        };
        if result.is_err() {
            self.state.lock().failures += 1;
        }
    }
}
