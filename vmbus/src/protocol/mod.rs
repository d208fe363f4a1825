//! The VMBus control protocol: the messages a guest and the host exchange over SynIC messages to connect,
//! enumerate channel offers, describe memory (GPADLs) and open and close channels.
//!
//! Reference: `hyperv-vmbus.md` §5 (control protocol), §8 (device class GUIDs), §9 (monitor page layout). This
//! module is the wire layer only: layouts, parsing, serialisation and GPADL message splitting, with no I/O.
//!
//! - [`guid`]: [`Guid`] in its on-wire layout and the device class table.
//! - [`version`]: [`VmbusVersion`], the negotiation order and what each version allows.
//! - [`messages`]: [`MessageType`], [`MessageHeader`] and one wire struct per control message.
//! - [`parse`](mod@parse): [`parse()`] for received payloads, [`MessageBuffer`] for outgoing ones.
//! - [`gpadl`]: [`GpadlMessages`] (PFN list → GPADL_HEADER + GPADL_BODY…) and [`GpadlAssembler`] (the reverse).
//! - [`monitor`]: the monitor page layout.

pub mod gpadl;
pub mod guid;
pub mod messages;
pub mod monitor;
pub mod parse;
pub mod version;

pub use gpadl::{AssembledGpadl, GpadlAssembler, GpadlError, GpadlMessages, GpadlRange, PfnRange};
pub use guid::{Guid, class_name, device_class};
pub use messages::*;
pub use monitor::{MonitorBit, MonitorPage};
pub use parse::{Message, MessageBuffer, ProtocolError, VersionResponseInfo, parse};
pub use version::VmbusVersion;

/// Most payload bytes in one SynIC message, and so the largest control message (§3, §4).
pub const MAX_MESSAGE_SIZE: usize = 240;

/// SynIC connection id for control messages (§5); also for INITIATE_CONTACT below version 5.0.
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// SynIC connection id for INITIATE_CONTACT at version ≥ 5.0 (§5); later messages use the host's `msg_conn_id`.
pub const MESSAGE_CONNECTION_ID_V5: u32 = 4;
/// SynIC connection id for guest → host channel events on WS2008 hosts (§5); newer offers carry their own.
pub const EVENT_CONNECTION_ID: u32 = 2;
/// SynIC connection id of the monitor facility (§5).
pub const MONITOR_CONNECTION_ID: u32 = 3;
/// The `MessageType` field of the HvCallPostMessage input for VMBus messages (§3, §5).
pub const POST_MESSAGE_TYPE: u32 = 1;
/// The SINT VMBus messages and events arrive on (§4, §5).
pub const VMBUS_MESSAGE_SINT: u8 = 2;
