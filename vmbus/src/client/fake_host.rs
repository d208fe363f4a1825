//! A scripted fake VMBus host for the client's and the channel's unit tests: it answers each control message the
//! way a well-behaved host would, unless told to misbehave, and records everything the guest posted or signalled.
#![allow(missing_docs)]

use super::{ConnectOptions, Connection, ClientError, VmbusTransport};
use crate::hv::hypercall::{Delay, HvError, Hypercalls};
use crate::protocol::{
    AllOffersDelivered, ConnectionState, ControlMessage, MessageType, Guid, GpadlAssembler, GpadlCreated, GpadlTorndown, Message,
    ModifyChannelResponse, OfferChannel, OpenChannelResult, RescindChannelOffer, UnloadResponse,
    VersionResponse, VmbusVersion, device_class, parse,
};
use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

/// One message the guest posted.
#[derive(Clone, Debug)]
pub(crate) struct Posted {
    pub(crate) connection_id: u32,
    pub(crate) bytes: Vec<u8>,
}

impl Posted {
    pub(crate) fn message(&self) -> Message<'_> {
        parse(&self.bytes).expect("the client posts well-formed messages")
    }
}

/// How the fake host behaves. The defaults are a well-behaved host that speaks 5.3 down to 2.4.
pub(crate) struct HostBehaviour {
    pub(crate) accepted: Vec<VmbusVersion>,
    /// Whether the host knows connection id 4 (≥ 5.0 hosts); otherwise PostMessage to it fails.
    pub(crate) knows_connection_4: bool,
    pub(crate) msg_conn_id: u32,
    pub(crate) short_version_response: bool,
    pub(crate) connection_state: ConnectionState,
    pub(crate) offers: Vec<OfferChannel>,
    pub(crate) gpadl_status: u32,
    pub(crate) open_status: u32,
    /// Transient PostMessage failures to return before accepting each message.
    pub(crate) busy_posts: u32,
    /// Answer nothing at all.
    pub(crate) silent: bool,
    /// Rescind the channel instead of answering OPENCHANNEL.
    pub(crate) rescind_on_open: bool,
}

impl Default for HostBehaviour {
    fn default() -> Self {
        HostBehaviour {
            accepted: VmbusVersion::CLIENT_NEGOTIATION_ORDER.to_vec(),
            knows_connection_4: true,
            msg_conn_id: 1,
            short_version_response: false,
            connection_state: ConnectionState::SUCCESSFUL,
            offers: vec![offer(5, device_class::HEARTBEAT), offer(6, device_class::DYNAMIC_MEMORY)],
            gpadl_status: 0,
            open_status: 0,
            busy_posts: 0,
            silent: false,
            rescind_on_open: false,
        }
    }
}

#[derive(Default)]
pub(crate) struct HostState {
    pub(crate) inbox: VecDeque<Vec<u8>>,
    pub(crate) posted: Vec<Posted>,
    pub(crate) now_ns: u64,
    pub(crate) busy_left: u32,
    pub(crate) gpadl: Option<GpadlAssembler>,
    pub(crate) gpadl_pfns: Vec<Vec<u64>>,
    pub(crate) delays_us: Vec<u64>,
    pub(crate) signals: Vec<(u32, u16)>,
}

pub(crate) struct FakeHost {
    pub(crate) behaviour: RefCell<HostBehaviour>,
    pub(crate) state: RefCell<HostState>,
}

pub(crate) fn offer(relid: u32, class: Guid) -> OfferChannel {
    let instance = Guid::from_fields(relid, 0x1234, 0x5678, [1, 2, 3, 4, 5, 6, 7, relid as u8]);
    OfferChannel::new(class, instance, relid, 0x1000 + relid)
}

pub(crate) fn bytes_of<M: ControlMessage>(message: &M) -> Vec<u8> {
    zerocopy::IntoBytes::as_bytes(message).to_vec()
}

impl FakeHost {
    pub(crate) fn new(behaviour: HostBehaviour) -> FakeHost {
        let busy_left = behaviour.busy_posts;
        FakeHost { behaviour: RefCell::new(behaviour), state: RefCell::new(HostState { busy_left, ..HostState::default() }) }
    }

    pub(crate) fn send(&self, bytes: Vec<u8>) {
        self.state.borrow_mut().inbox.push_back(bytes);
    }

    pub(crate) fn posted(&self) -> Vec<Posted> {
        self.state.borrow().posted.clone()
    }

    pub(crate) fn posted_types(&self) -> Vec<MessageType> {
        self.posted().iter().map(|p| p.message().message_type()).collect()
    }

    /// The host's reaction to a message it accepted.
    fn respond(&self, state: &mut HostState, message: &Message<'_>) {
        let b = &*self.behaviour.borrow();
        if b.silent {
            return;
        }
        match message {
            Message::InitiateContact(contact) => {
                let ok = b.accepted.contains(&contact.version());
                let mut response = VersionResponse::new(ok, b.connection_state, b.msg_conn_id);
                if !ok {
                    response.msg_conn_id = 0.into();
                }
                let mut bytes = bytes_of(&response);
                if b.short_version_response {
                    bytes.truncate(VersionResponse::SHORT_SIZE);
                }
                state.inbox.push_back(bytes);
            }
            Message::RequestOffers => {
                for offer in &b.offers {
                    state.inbox.push_back(bytes_of(offer));
                }
                state.inbox.push_back(bytes_of(&AllOffersDelivered::new()));
            }
            Message::GpadlHeader { .. } | Message::GpadlBody { .. } => {
                let done = match (&mut state.gpadl, message) {
                    (None, _) => {
                        let asm = GpadlAssembler::from_message(message).expect("valid header");
                        let done = asm.is_complete();
                        state.gpadl = Some(asm);
                        done
                    }
                    (Some(asm), _) => asm.add_message(message).expect("valid body"),
                };
                if done {
                    let asm = state.gpadl.take().expect("assembling");
                    let (relid, handle) = (asm.child_relid(), asm.gpadl());
                    let gpadl = asm.finish().expect("complete");
                    state.gpadl_pfns.push(gpadl.pfns().collect());
                    state.inbox.push_back(bytes_of(&GpadlCreated::new(relid, handle, b.gpadl_status)));
                }
            }
            Message::OpenChannel(open) => {
                let relid = open.child_relid.get();
                if b.rescind_on_open {
                    state.inbox.push_back(bytes_of(&RescindChannelOffer::new(relid)));
                } else {
                    let result = OpenChannelResult::new(relid, open.open_id.get(), b.open_status);
                    state.inbox.push_back(bytes_of(&result));
                }
            }
            Message::GpadlTeardown(teardown) => {
                state.inbox.push_back(bytes_of(&GpadlTorndown::new(teardown.gpadl.get())));
            }
            Message::ModifyChannel(modify) => {
                state.inbox.push_back(bytes_of(&ModifyChannelResponse::new(modify.child_relid.get(), 0)));
            }
            Message::Unload => state.inbox.push_back(bytes_of(&UnloadResponse::new())),
            _ => {}
        }
    }
}

impl Hypercalls for FakeHost {
    fn post_message(&self, connection_id: u32, message_type: u32, payload: &[u8]) -> Result<(), HvError> {
        assert_eq!(message_type, 1, "VMBus posts message type 1");
        assert!(payload.len() <= 240);
        let mut state = self.state.borrow_mut();
        if state.busy_left > 0 {
            state.busy_left -= 1;
            return Err(HvError::INSUFFICIENT_BUFFERS);
        }
        state.busy_left = self.behaviour.borrow().busy_posts;
        if connection_id == 4 && !self.behaviour.borrow().knows_connection_4 {
            return Err(HvError::INVALID_CONNECTION_ID);
        }
        let posted = Posted { connection_id, bytes: payload.to_vec() };
        let message = parse(&posted.bytes).expect("well-formed");
        self.respond(&mut state, &message);
        state.posted.push(posted);
        Ok(())
    }

    fn signal_event(&self, connection_id: u32, flag: u16) -> Result<(), HvError> {
        self.state.borrow_mut().signals.push((connection_id, flag));
        Ok(())
    }
}

impl Delay for FakeHost {
    fn delay_us(&self, us: u64) {
        let mut state = self.state.borrow_mut();
        state.delays_us.push(us);
        state.now_ns += us * 1000;
    }
}

impl VmbusTransport for FakeHost {
    fn poll_message(&self, buf: &mut [u8; 240]) -> Option<usize> {
        let bytes = self.state.borrow_mut().inbox.pop_front()?;
        buf[..bytes.len()].copy_from_slice(&bytes);
        Some(bytes.len())
    }

    fn now_ns(&self) -> u64 {
        self.state.borrow().now_ns
    }

    fn wait(&self) {
        self.state.borrow_mut().now_ns += 1_000_000;
    }
}

pub(crate) fn options() -> ConnectOptions {
    ConnectOptions::new(0x10_0000, (0x10_1000, 0x10_2000))
}

pub(crate) fn connect(behaviour: HostBehaviour) -> Result<Connection<FakeHost>, ClientError> {
    Connection::connect(FakeHost::new(behaviour), options())
}
