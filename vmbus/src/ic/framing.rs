//! Framing of IC messages: splitting a received in-band payload into pipe header, IC header and body, and building
//! the bytes of a message or a response.
//!
//! Reference: `hyperv-vmbus.md` §7 "Frame". The payload handed in is the in-band packet's payload (after the VMBus
//! packet descriptor); the ring pads it to 8 bytes, so the pipe header's `data_size` and the IC header's
//! `icmsgsize` are what delimit the message, and both are checked against the bytes actually present.

use alloc::vec::Vec;
use core::fmt;

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use super::wire::{
    IC_BODY_OFFSET, IC_HEADER_SIZE, IcFlags, IcMessageHeader, IcMessageType, IcStatus, IcVersion,
    PIPE_PACKET_TYPE_DATA, PipeHeader,
};

/// Largest IC message accepted or built, pipe header included (OpenVMM `hyperv_ic_protocol::MAX_MESSAGE_SIZE`).
///
/// ⚠ Linux sizes its receive buffers per service (one page for heartbeat, shutdown and timesync, more for KVP); the
/// largest message of §7 (a KVP IP-info body, 7430 bytes, plus headers) fits well within this bound.
pub const MAX_MESSAGE_SIZE: usize = 13312;

/// Largest body a message may carry within [`MAX_MESSAGE_SIZE`].
pub const MAX_BODY_SIZE: usize = MAX_MESSAGE_SIZE - IC_BODY_OFFSET;

/// Why a received payload is not a well-formed IC message. Nothing can be answered to such a payload.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than pipe header plus IC header.
    Truncated {
        /// Bytes received.
        len: usize,
    },
    /// Longer than [`MAX_MESSAGE_SIZE`].
    Oversized {
        /// Bytes received.
        len: usize,
    },
    /// The pipe header's packet type is not [`PIPE_PACKET_TYPE_DATA`].
    PipePacketType(u32),
    /// The pipe header claims fewer bytes than an IC header or more than were received.
    PipeSize {
        /// `data_size` of the pipe header.
        declared: u32,
        /// Bytes after the pipe header.
        available: usize,
    },
    /// `icmsgsize` runs past the pipe's data.
    BodySize {
        /// `icmsgsize`.
        declared: u16,
        /// Bytes after the IC header within the pipe's data.
        available: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FrameError::Truncated { len } => write!(f, "IC message truncated: {len} bytes < {IC_BODY_OFFSET}"),
            FrameError::Oversized { len } => write!(f, "IC message of {len} bytes > {MAX_MESSAGE_SIZE}"),
            FrameError::PipePacketType(t) => write!(f, "pipe packet type {t} is not data (1)"),
            FrameError::PipeSize { declared, available } => {
                write!(f, "pipe header declares {declared} bytes, {available} present")
            }
            FrameError::BodySize { declared, available } => {
                write!(f, "icmsgsize {declared} exceeds the {available} bytes present")
            }
        }
    }
}

/// A received IC message: its header and its body (exactly `icmsgsize` bytes).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct IcFrame<'a> {
    /// The IC message header.
    pub header: IcMessageHeader,
    /// The body after the header.
    pub body: &'a [u8],
}

impl<'a> IcFrame<'a> {
    /// Split and check a received in-band payload (§7 "Frame"). Never panics.
    pub fn parse(payload: &'a [u8]) -> Result<IcFrame<'a>, FrameError> {
        if payload.len() > MAX_MESSAGE_SIZE {
            return Err(FrameError::Oversized { len: payload.len() });
        }
        let Ok((pipe, rest)) = PipeHeader::read_from_prefix(payload) else {
            return Err(FrameError::Truncated { len: payload.len() });
        };
        if rest.len() < IC_HEADER_SIZE {
            return Err(FrameError::Truncated { len: payload.len() });
        }
        if pipe.packet_type.get() != PIPE_PACKET_TYPE_DATA {
            return Err(FrameError::PipePacketType(pipe.packet_type.get()));
        }
        let declared = pipe.data_size.get();
        let data = usize::try_from(declared)
            .ok()
            .filter(|&n| (IC_HEADER_SIZE..=rest.len()).contains(&n))
            .and_then(|n| rest.get(..n))
            .ok_or(FrameError::PipeSize { declared, available: rest.len() })?;
        let Ok((header, after_header)) = IcMessageHeader::read_from_prefix(data) else {
            return Err(FrameError::Truncated { len: payload.len() });
        };
        let size = header.message_size.get();
        let body = after_header
            .get(..usize::from(size))
            .ok_or(FrameError::BodySize { declared: size, available: after_header.len() })?;
        Ok(IcFrame { header, body })
    }
}

/// The header fields a sender chooses for a new message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct MessageFields {
    /// Framework version to write.
    pub framework_version: IcVersion,
    /// Message type.
    pub message_type: IcMessageType,
    /// Message version to write.
    pub message_version: IcVersion,
    /// Status.
    pub status: IcStatus,
    /// Transaction id.
    pub transaction_id: u8,
    /// Flags.
    pub flags: IcFlags,
}

/// Build a whole message (pipe header, IC header, body). A body longer than [`MAX_BODY_SIZE`] is cut there.
pub fn build_message(fields: &MessageFields, body: &[u8]) -> Vec<u8> {
    let body = body.get(..MAX_BODY_SIZE).unwrap_or(body);
    let header = IcMessageHeader {
        framework_version: fields.framework_version,
        message_type: U16::new(fields.message_type.0),
        message_version: fields.message_version,
        // In range: MAX_BODY_SIZE < 65536.
        message_size: U16::new(u16::try_from(body.len()).unwrap_or(u16::MAX)),
        status: U32::new(fields.status.0),
        transaction_id: fields.transaction_id,
        flags: fields.flags.bits(),
        reserved: [0; 2],
    };
    let data_size = IC_HEADER_SIZE + body.len();
    let pipe = PipeHeader {
        packet_type: U32::new(PIPE_PACKET_TYPE_DATA),
        data_size: U32::new(u32::try_from(data_size).unwrap_or(u32::MAX)),
    };
    let mut out = Vec::with_capacity(IC_BODY_OFFSET + body.len());
    out.extend_from_slice(pipe.as_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Build the response to `request`: same type, versions and transaction id; flags TRANSACTION | RESPONSE (what Linux
/// answers with); the given status and body.
pub fn build_response(request: &IcMessageHeader, status: IcStatus, body: &[u8]) -> Vec<u8> {
    let fields = MessageFields {
        framework_version: request.framework_version,
        message_type: request.message_type(),
        message_version: request.message_version,
        status,
        transaction_id: request.transaction_id,
        flags: IcFlags::TRANSACTION | IcFlags::RESPONSE,
    };
    build_message(&fields, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> MessageFields {
        MessageFields {
            framework_version: IcVersion::new(3, 0),
            message_type: IcMessageType::HEARTBEAT,
            message_version: IcVersion::new(3, 0),
            status: IcStatus::OK,
            transaction_id: 7,
            flags: IcFlags::TRANSACTION | IcFlags::REQUEST,
        }
    }

    #[test]
    fn build_then_parse_round_trips_and_pins_offsets() {
        let bytes = build_message(&fields(), &[1, 2, 3]);
        assert_eq!(bytes.len(), 31);
        assert_eq!(&bytes[0..4], &1u32.to_le_bytes());
        assert_eq!(&bytes[4..8], &23u32.to_le_bytes());
        assert_eq!(&bytes[8..12], &[3, 0, 0, 0]);
        assert_eq!(&bytes[12..14], &1u16.to_le_bytes());
        assert_eq!(&bytes[18..20], &3u16.to_le_bytes());
        assert_eq!(bytes[24], 7);
        assert_eq!(bytes[25], 3);
        let frame = IcFrame::parse(&bytes).unwrap();
        assert_eq!(frame.body, &[1, 2, 3]);
        assert_eq!(frame.header.message_type(), IcMessageType::HEARTBEAT);
    }

    #[test]
    fn padding_after_the_message_is_ignored() {
        let mut bytes = build_message(&fields(), &[9; 5]);
        bytes.resize(40, 0xEE);
        assert_eq!(IcFrame::parse(&bytes).unwrap().body, &[9; 5]);
    }

    #[test]
    fn malformed_frames_are_rejected() {
        let good = build_message(&fields(), &[0; 8]);
        assert_eq!(IcFrame::parse(&good[..27]), Err(FrameError::Truncated { len: 27 }));
        assert_eq!(IcFrame::parse(&[]), Err(FrameError::Truncated { len: 0 }));
        let mut bad_type = good.clone();
        bad_type[0] = 2;
        assert_eq!(IcFrame::parse(&bad_type), Err(FrameError::PipePacketType(2)));
        let mut long_pipe = good.clone();
        long_pipe[4..8].copy_from_slice(&100u32.to_le_bytes());
        assert_eq!(IcFrame::parse(&long_pipe), Err(FrameError::PipeSize { declared: 100, available: 28 }));
        let mut short_pipe = good.clone();
        short_pipe[4..8].copy_from_slice(&19u32.to_le_bytes());
        assert!(matches!(IcFrame::parse(&short_pipe), Err(FrameError::PipeSize { declared: 19, .. })));
        let mut long_body = good.clone();
        long_body[18..20].copy_from_slice(&9u16.to_le_bytes());
        assert_eq!(IcFrame::parse(&long_body), Err(FrameError::BodySize { declared: 9, available: 8 }));
        let huge = vec![0u8; MAX_MESSAGE_SIZE + 1];
        assert_eq!(IcFrame::parse(&huge), Err(FrameError::Oversized { len: MAX_MESSAGE_SIZE + 1 }));
    }

    #[test]
    fn response_echoes_type_versions_and_transaction() {
        let request = IcFrame::parse(&build_message(&fields(), &[])).unwrap().header;
        let response = build_response(&request, IcStatus::FAIL, &[4; 4]);
        let frame = IcFrame::parse(&response).unwrap();
        assert_eq!(frame.header.transaction_id, 7);
        assert_eq!(frame.header.flags(), IcFlags::TRANSACTION | IcFlags::RESPONSE);
        assert_eq!(frame.header.status(), IcStatus::FAIL);
        assert_eq!(frame.header.message_version, IcVersion::new(3, 0));
        assert_eq!(frame.body, &[4; 4]);
    }
}
