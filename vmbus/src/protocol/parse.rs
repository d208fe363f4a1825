//! Parsing received control messages and holding outgoing ones.
//!
//! Reference: `hyperv-vmbus.md` §5 (types and layouts) and §4 (a SynIC message carries at most 240 payload bytes).
//!
//! Size policy: a message shorter than its struct is rejected ([`ProtocolError::TooShort`]); a longer one is
//! accepted and the extra bytes are ignored, because newer protocol versions extend several messages at the end
//! (OpenVMM's 6.0 INITIATE_CONTACT, VERSION_RESPONSE and OPENCHANNEL, the ≥ 5.2 TL_CONNECT_REQUEST) and a host may
//! post a padded payload. The one documented shorter form, the 10-byte VERSION_RESPONSE of pre-5.0 hosts (QEMU), is
//! accepted. For GPADL_HEADER/BODY the bytes after the fixed part are the range data; a trailing partial 8-byte word
//! is ignored (whole words are checked against `range_buflen` by [`super::gpadl::GpadlAssembler`]).

use core::fmt;
use core::mem::size_of;

use zerocopy::FromBytes;
use zerocopy::byteorder::little_endian::U64;

use super::MAX_MESSAGE_SIZE;
use super::messages::*;

/// Why a received payload is not a valid control message.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// The payload is longer than a SynIC message can carry (240 bytes).
    TooLong {
        /// The payload length.
        len: usize,
    },
    /// The payload is shorter than the 8-byte header.
    NoHeader {
        /// The payload length.
        len: usize,
    },
    /// The payload is shorter than the smallest valid message of its type.
    TooShort {
        /// The announced type.
        message_type: MessageType,
        /// The payload length.
        len: usize,
        /// The smallest accepted length for this type.
        min: usize,
    },
    /// A type outside 0..=24.
    UnknownType(MessageType),
    /// A named type this crate has no wire struct for: INVALID (0) and the reserved-channel messages 18–20.
    UnsupportedType(MessageType),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::TooLong { len } => {
                write!(
                    f,
                    "control message of {len} bytes exceeds the {MAX_MESSAGE_SIZE}-byte SynIC payload"
                )
            }
            ProtocolError::NoHeader { len } => {
                write!(f, "control message of {len} bytes has no 8-byte header")
            }
            ProtocolError::TooShort {
                message_type,
                len,
                min,
            } => {
                write!(
                    f,
                    "{message_type} of {len} bytes is shorter than its minimum of {min}"
                )
            }
            ProtocolError::UnknownType(message_type) => {
                write!(f, "unknown control message type {}", message_type.0)
            }
            ProtocolError::UnsupportedType(message_type) => {
                write!(f, "unsupported control message {message_type}")
            }
        }
    }
}

impl core::error::Error for ProtocolError {}

/// The fields of a VERSION_RESPONSE, from either its full or its short form.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct VersionResponseInfo {
    /// Whether the proposed version was accepted.
    pub version_supported: bool,
    /// The host's connection state.
    pub connection_state: ConnectionState,
    /// The connection id for later messages, present only in the full 16-byte form. Meaningful only
    /// when the accepted version is ≥ 5.0; older hosts send zero or nothing here.
    pub msg_conn_id: Option<u32>,
}

/// A parsed control message, borrowing from the received payload.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// OFFERCHANNEL.
    OfferChannel(&'a OfferChannel),
    /// RESCIND_CHANNELOFFER.
    RescindChannelOffer(&'a RescindChannelOffer),
    /// REQUESTOFFERS.
    RequestOffers,
    /// ALLOFFERS_DELIVERED.
    AllOffersDelivered,
    /// OPENCHANNEL.
    OpenChannel(&'a OpenChannel),
    /// OPENCHANNEL_RESULT.
    OpenChannelResult(&'a OpenChannelResult),
    /// CLOSECHANNEL.
    CloseChannel(&'a CloseChannel),
    /// GPADL_HEADER: the fixed part and the whole 8-byte words of range data that follow it.
    GpadlHeader {
        /// The fixed part.
        header: &'a GpadlHeader,
        /// Range-buffer words carried by this message (range headers and PFNs, little-endian).
        range_words: &'a [U64],
    },
    /// GPADL_BODY: the fixed part and the whole 8-byte words of range data that follow it.
    GpadlBody {
        /// The fixed part.
        body: &'a GpadlBody,
        /// Range-buffer words carried by this message.
        range_words: &'a [U64],
    },
    /// GPADL_CREATED.
    GpadlCreated(&'a GpadlCreated),
    /// GPADL_TEARDOWN.
    GpadlTeardown(&'a GpadlTeardown),
    /// GPADL_TORNDOWN.
    GpadlTorndown(&'a GpadlTorndown),
    /// RELID_RELEASED.
    RelIdReleased(&'a RelIdReleased),
    /// INITIATE_CONTACT.
    InitiateContact(&'a InitiateContact),
    /// VERSION_RESPONSE (full or short form).
    VersionResponse(VersionResponseInfo),
    /// UNLOAD.
    Unload,
    /// UNLOAD_RESPONSE.
    UnloadResponse,
    /// TL_CONNECT_REQUEST.
    TlConnectRequest(&'a TlConnectRequest),
    /// MODIFYCHANNEL.
    ModifyChannel(&'a ModifyChannel),
    /// TL_CONNECT_RESULT.
    TlConnectResult(&'a TlConnectResult),
    /// MODIFYCHANNEL_RESPONSE.
    ModifyChannelResponse(&'a ModifyChannelResponse),
}

impl Message<'_> {
    /// The message's type.
    pub fn message_type(&self) -> MessageType {
        match self {
            Message::OfferChannel(_) => MessageType::OFFERCHANNEL,
            Message::RescindChannelOffer(_) => MessageType::RESCIND_CHANNELOFFER,
            Message::RequestOffers => MessageType::REQUESTOFFERS,
            Message::AllOffersDelivered => MessageType::ALLOFFERS_DELIVERED,
            Message::OpenChannel(_) => MessageType::OPENCHANNEL,
            Message::OpenChannelResult(_) => MessageType::OPENCHANNEL_RESULT,
            Message::CloseChannel(_) => MessageType::CLOSECHANNEL,
            Message::GpadlHeader { .. } => MessageType::GPADL_HEADER,
            Message::GpadlBody { .. } => MessageType::GPADL_BODY,
            Message::GpadlCreated(_) => MessageType::GPADL_CREATED,
            Message::GpadlTeardown(_) => MessageType::GPADL_TEARDOWN,
            Message::GpadlTorndown(_) => MessageType::GPADL_TORNDOWN,
            Message::RelIdReleased(_) => MessageType::RELID_RELEASED,
            Message::InitiateContact(_) => MessageType::INITIATE_CONTACT,
            Message::VersionResponse(_) => MessageType::VERSION_RESPONSE,
            Message::Unload => MessageType::UNLOAD,
            Message::UnloadResponse => MessageType::UNLOAD_RESPONSE,
            Message::TlConnectRequest(_) => MessageType::TL_CONNECT_REQUEST,
            Message::ModifyChannel(_) => MessageType::MODIFYCHANNEL,
            Message::TlConnectResult(_) => MessageType::TL_CONNECT_RESULT,
            Message::ModifyChannelResponse(_) => MessageType::MODIFYCHANNEL_RESPONSE,
        }
    }
}

/// Reads the message type from the first 8 bytes, or fails with [`ProtocolError::NoHeader`] / `TooLong`.
pub fn peek_type(payload: &[u8]) -> Result<MessageType, ProtocolError> {
    if payload.len() > MAX_MESSAGE_SIZE {
        return Err(ProtocolError::TooLong { len: payload.len() });
    }
    let (header, _) = MessageHeader::ref_from_prefix(payload)
        .map_err(|_| ProtocolError::NoHeader { len: payload.len() })?;
    Ok(header.message_type())
}

/// Borrows `payload` as a `T`, accepting trailing bytes, or fails with [`ProtocolError::TooShort`].
fn fixed<T: ControlMessage>(payload: &[u8]) -> Result<&T, ProtocolError> {
    T::ref_from_prefix(payload)
        .map(|(message, _)| message)
        .map_err(|_| ProtocolError::TooShort {
            message_type: T::MESSAGE_TYPE,
            len: payload.len(),
            min: T::SIZE,
        })
}

/// The whole 8-byte words in `bytes` (a trailing partial word is ignored).
fn whole_words(bytes: &[u8]) -> &[U64] {
    let usable = bytes.len() - bytes.len() % 8;
    // `U64` has alignment 1 and `usable` is a multiple of its size, so this cannot fail; an empty slice is the
    // harmless fallback rather than a panic.
    bytes
        .get(..usable)
        .and_then(|b| <[U64]>::ref_from_bytes(b).ok())
        .unwrap_or(&[])
}

/// Parses one received control message (the SynIC payload, at most 240 bytes) under the size policy of this module.
///
/// Never panics: every failure is a [`ProtocolError`].
pub fn parse(payload: &[u8]) -> Result<Message<'_>, ProtocolError> {
    let message_type = peek_type(payload)?;
    let message = match message_type {
        MessageType::OFFERCHANNEL => Message::OfferChannel(fixed(payload)?),
        MessageType::RESCIND_CHANNELOFFER => Message::RescindChannelOffer(fixed(payload)?),
        MessageType::REQUESTOFFERS => {
            fixed::<RequestOffers>(payload)?;
            Message::RequestOffers
        }
        MessageType::ALLOFFERS_DELIVERED => {
            fixed::<AllOffersDelivered>(payload)?;
            Message::AllOffersDelivered
        }
        MessageType::OPENCHANNEL => Message::OpenChannel(fixed(payload)?),
        MessageType::OPENCHANNEL_RESULT => Message::OpenChannelResult(fixed(payload)?),
        MessageType::CLOSECHANNEL => Message::CloseChannel(fixed(payload)?),
        MessageType::GPADL_HEADER => {
            let header = fixed::<GpadlHeader>(payload)?;
            let rest = payload.get(size_of::<GpadlHeader>()..).unwrap_or(&[]);
            Message::GpadlHeader {
                header,
                range_words: whole_words(rest),
            }
        }
        MessageType::GPADL_BODY => {
            let body = fixed::<GpadlBody>(payload)?;
            let rest = payload.get(size_of::<GpadlBody>()..).unwrap_or(&[]);
            Message::GpadlBody {
                body,
                range_words: whole_words(rest),
            }
        }
        MessageType::GPADL_CREATED => Message::GpadlCreated(fixed(payload)?),
        MessageType::GPADL_TEARDOWN => Message::GpadlTeardown(fixed(payload)?),
        MessageType::GPADL_TORNDOWN => Message::GpadlTorndown(fixed(payload)?),
        MessageType::RELID_RELEASED => Message::RelIdReleased(fixed(payload)?),
        MessageType::INITIATE_CONTACT => Message::InitiateContact(fixed(payload)?),
        MessageType::VERSION_RESPONSE => Message::VersionResponse(parse_version_response(payload)?),
        MessageType::UNLOAD => {
            fixed::<Unload>(payload)?;
            Message::Unload
        }
        MessageType::UNLOAD_RESPONSE => {
            fixed::<UnloadResponse>(payload)?;
            Message::UnloadResponse
        }
        MessageType::TL_CONNECT_REQUEST => Message::TlConnectRequest(fixed(payload)?),
        MessageType::MODIFYCHANNEL => Message::ModifyChannel(fixed(payload)?),
        MessageType::TL_CONNECT_RESULT => Message::TlConnectResult(fixed(payload)?),
        MessageType::MODIFYCHANNEL_RESPONSE => Message::ModifyChannelResponse(fixed(payload)?),
        other if other.name().is_some() => return Err(ProtocolError::UnsupportedType(other)),
        other => return Err(ProtocolError::UnknownType(other)),
    };
    Ok(message)
}

/// VERSION_RESPONSE: the full 16-byte form, or the 10-byte short form without `msg_conn_id`.
fn parse_version_response(payload: &[u8]) -> Result<VersionResponseInfo, ProtocolError> {
    if let Ok((full, _)) = VersionResponse::ref_from_prefix(payload) {
        return Ok(VersionResponseInfo {
            version_supported: full.version_supported != 0,
            connection_state: ConnectionState(full.connection_state),
            msg_conn_id: Some(full.msg_conn_id.get()),
        });
    }
    match payload.get(8..VersionResponse::SHORT_SIZE) {
        Some(&[version_supported, connection_state]) => Ok(VersionResponseInfo {
            version_supported: version_supported != 0,
            connection_state: ConnectionState(connection_state),
            msg_conn_id: None,
        }),
        _ => Err(ProtocolError::TooShort {
            message_type: MessageType::VERSION_RESPONSE,
            len: payload.len(),
            min: VersionResponse::SHORT_SIZE,
        }),
    }
}

/// An outgoing control message in a fixed 240-byte stack buffer: what a PostMessage hypercall carries.
#[derive(Clone)]
pub struct MessageBuffer {
    bytes: [u8; MAX_MESSAGE_SIZE],
    len: usize,
}

impl MessageBuffer {
    /// An empty buffer.
    pub const fn new() -> MessageBuffer {
        MessageBuffer {
            bytes: [0; MAX_MESSAGE_SIZE],
            len: 0,
        }
    }

    /// A buffer holding one fixed-size message.
    pub fn from_message<T: ControlMessage>(message: &T) -> MessageBuffer {
        let mut buffer = MessageBuffer::new();
        // Every control message struct is at most 196 bytes (pinned by the layout tests), so this always fits.
        let fits = buffer.push(message.as_bytes());
        debug_assert!(fits);
        buffer
    }

    /// A buffer holding a copy of `bytes`, or `None` if they exceed 240 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<MessageBuffer> {
        let mut buffer = MessageBuffer::new();
        buffer.push(bytes).then_some(buffer)
    }

    /// Appends `bytes`; returns `false` (and appends nothing) if they would not fit in 240 bytes.
    pub fn push(&mut self, bytes: &[u8]) -> bool {
        let end = self.len + bytes.len();
        match self.bytes.get_mut(self.len..end) {
            Some(slot) => {
                slot.copy_from_slice(bytes);
                self.len = end;
                true
            }
            None => false,
        }
    }

    /// The message bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }

    /// The message length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Parses the held bytes back (useful to a scripted host or for logging).
    pub fn parse(&self) -> Result<Message<'_>, ProtocolError> {
        parse(self.as_bytes())
    }
}

impl Default for MessageBuffer {
    fn default() -> MessageBuffer {
        MessageBuffer::new()
    }
}

impl fmt::Debug for MessageBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageBuffer")
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

impl PartialEq for MessageBuffer {
    fn eq(&self, other: &MessageBuffer) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for MessageBuffer {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::guid::{Guid, device_class};
    use crate::protocol::version::VmbusVersion;
    use alloc::vec::Vec;
    use proptest::prelude::*;
    use zerocopy::IntoBytes;

    fn round_trip<T: ControlMessage + PartialEq + fmt::Debug>(message: T) -> Vec<u8> {
        let buffer = MessageBuffer::from_message(&message);
        assert_eq!(buffer.len(), T::SIZE);
        assert_eq!(peek_type(buffer.as_bytes()), Ok(T::MESSAGE_TYPE));
        buffer.as_bytes().to_vec()
    }

    #[test]
    fn every_message_round_trips() {
        let offer = OfferChannel::new(device_class::NETWORK, device_class::SCSI, 5, 0x2005);
        let bytes = round_trip(offer);
        assert_eq!(parse(&bytes), Ok(Message::OfferChannel(&offer)));

        let m = RescindChannelOffer::new(5);
        assert_eq!(parse(&round_trip(m)), Ok(Message::RescindChannelOffer(&m)));
        assert_eq!(
            parse(&round_trip(RequestOffers::new())),
            Ok(Message::RequestOffers)
        );
        assert_eq!(
            parse(&round_trip(AllOffersDelivered::new())),
            Ok(Message::AllOffersDelivered)
        );
        let m = OpenChannel::new(5, 1, 0xe1e10, 0, 3);
        assert_eq!(parse(&round_trip(m)), Ok(Message::OpenChannel(&m)));
        let m = OpenChannelResult::new(5, 1, 0);
        assert_eq!(parse(&round_trip(m)), Ok(Message::OpenChannelResult(&m)));
        let m = CloseChannel::new(5);
        assert_eq!(parse(&round_trip(m)), Ok(Message::CloseChannel(&m)));
        let m = GpadlCreated::new(5, 9, 0xc000_0001);
        assert_eq!(parse(&round_trip(m)), Ok(Message::GpadlCreated(&m)));
        let m = GpadlTeardown::new(5, 9);
        assert_eq!(parse(&round_trip(m)), Ok(Message::GpadlTeardown(&m)));
        let m = GpadlTorndown::new(9);
        assert_eq!(parse(&round_trip(m)), Ok(Message::GpadlTorndown(&m)));
        let m = RelIdReleased::new(5);
        assert_eq!(parse(&round_trip(m)), Ok(Message::RelIdReleased(&m)));
        let m = InitiateContact::new(VmbusVersion::V5_3, 0, 0, 0x1000, 0x2000);
        assert_eq!(parse(&round_trip(m)), Ok(Message::InitiateContact(&m)));
        let m = VersionResponse::new(true, ConnectionState::SUCCESSFUL, 4);
        assert_eq!(
            parse(&round_trip(m)),
            Ok(Message::VersionResponse(VersionResponseInfo {
                version_supported: true,
                connection_state: ConnectionState::SUCCESSFUL,
                msg_conn_id: Some(4),
            }))
        );
        assert_eq!(parse(&round_trip(Unload::new())), Ok(Message::Unload));
        assert_eq!(
            parse(&round_trip(UnloadResponse::new())),
            Ok(Message::UnloadResponse)
        );
        let m = TlConnectRequest::new(device_class::KVP, device_class::VSS);
        assert_eq!(parse(&round_trip(m)), Ok(Message::TlConnectRequest(&m)));
        let m = ModifyChannel::new(5, 1);
        assert_eq!(parse(&round_trip(m)), Ok(Message::ModifyChannel(&m)));
        let m = TlConnectResult::new(device_class::KVP, Guid::ZERO, 1);
        assert_eq!(parse(&round_trip(m)), Ok(Message::TlConnectResult(&m)));
        let m = ModifyChannelResponse::new(5, 0);
        let bytes = round_trip(m);
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed, Message::ModifyChannelResponse(&m));
        assert_eq!(parsed.message_type(), MessageType::MODIFYCHANNEL_RESPONSE);
    }

    #[test]
    fn wire_bytes_of_outgoing_messages() {
        // INITIATE_CONTACT for 4.0 with an interrupt page, as posted to a pre-5.0 host.
        let contact =
            InitiateContact::new(VmbusVersion::V4_0, 0, 0x0000_0001_2345_6000, 0x7000, 0x8000);
        let mut expected = Vec::new();
        expected.extend_from_slice(&[14, 0, 0, 0, 0, 0, 0, 0]);
        expected.extend_from_slice(&[0, 0, 4, 0]); // 4.0
        expected.extend_from_slice(&[0, 0, 0, 0]); // vcpu 0
        expected.extend_from_slice(&0x0000_0001_2345_6000u64.to_le_bytes());
        expected.extend_from_slice(&0x7000u64.to_le_bytes());
        expected.extend_from_slice(&0x8000u64.to_le_bytes());
        assert_eq!(contact.as_bytes(), expected.as_slice());

        let open = OpenChannel::new(0x11, 0x22, 0x33, 0x44, 0x55);
        let bytes = open.as_bytes();
        assert_eq!(
            &bytes[..28],
            &[
                5, 0, 0, 0, 0, 0, 0, 0, 0x11, 0, 0, 0, 0x22, 0, 0, 0, 0x33, 0, 0, 0, 0x44, 0, 0, 0,
                0x55, 0, 0, 0
            ]
        );
        assert!(bytes[28..].iter().all(|&b| b == 0));
    }

    #[test]
    fn short_and_padded_messages() {
        // QEMU's short VERSION_RESPONSE: header + version_supported + status.
        let short = [15, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        assert_eq!(
            parse(&short),
            Ok(Message::VersionResponse(VersionResponseInfo {
                version_supported: true,
                connection_state: ConnectionState::SUCCESSFUL,
                msg_conn_id: None,
            }))
        );
        assert_eq!(
            parse(&short[..9]),
            Err(ProtocolError::TooShort {
                message_type: MessageType::VERSION_RESPONSE,
                len: 9,
                min: 10
            })
        );
        // A 6.0-style VERSION_RESPONSE with trailing feature flags is accepted.
        let mut long = VersionResponse::new(false, ConnectionState(7), 0)
            .as_bytes()
            .to_vec();
        long.extend_from_slice(&[0xff; 4]);
        let Ok(Message::VersionResponse(info)) = parse(&long) else {
            panic!("long VERSION_RESPONSE rejected")
        };
        assert!(!info.version_supported);
        assert_eq!(info.connection_state, ConnectionState(7));

        // A truncated offer is rejected with its sizes; a padded one is accepted.
        let offer = OfferChannel::new(device_class::HEARTBEAT, Guid::ZERO, 3, 3);
        let bytes = offer.as_bytes();
        assert_eq!(
            parse(&bytes[..195]),
            Err(ProtocolError::TooShort {
                message_type: MessageType::OFFERCHANNEL,
                len: 195,
                min: 196
            })
        );
        let mut padded = bytes.to_vec();
        padded.extend_from_slice(&[0; 4]);
        assert_eq!(parse(&padded), Ok(Message::OfferChannel(&offer)));
        padded.resize(241, 0);
        assert_eq!(parse(&padded), Err(ProtocolError::TooLong { len: 241 }));
    }

    #[test]
    fn header_and_type_errors() {
        assert_eq!(parse(&[]), Err(ProtocolError::NoHeader { len: 0 }));
        assert_eq!(
            parse(&[1, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::NoHeader { len: 7 })
        );
        assert_eq!(
            parse(&[25, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::UnknownType(MessageType(25)))
        );
        assert_eq!(
            parse(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]),
            Err(ProtocolError::UnknownType(MessageType(u32::MAX)))
        );
        assert_eq!(
            parse(&[0; 8]),
            Err(ProtocolError::UnsupportedType(MessageType::INVALID))
        );
        assert_eq!(
            parse(&[19, 0, 0, 0, 0, 0, 0, 0]),
            Err(ProtocolError::UnsupportedType(MessageType(19)))
        );
        assert_eq!(parse(&[3, 0, 0, 0, 0, 0, 0, 0]), Ok(Message::RequestOffers));
        assert_eq!(
            parse(&[7, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0]),
            Err(ProtocolError::TooShort {
                message_type: MessageType::CLOSECHANNEL,
                len: 11,
                min: 12
            })
        );
        // The padding word of the header is ignored.
        assert_eq!(
            parse(&[4, 0, 0, 0, 9, 9, 9, 9]),
            Ok(Message::AllOffersDelivered)
        );
    }

    #[test]
    fn gpadl_range_words() {
        let mut bytes = GpadlHeader::new(1, 2, 16, 1).as_bytes().to_vec();
        bytes.extend_from_slice(&0x1000u64.to_le_bytes()); // byte_count 4096, offset 0
        bytes.extend_from_slice(&0xabcdu64.to_le_bytes());
        bytes.extend_from_slice(&[1, 2, 3]); // partial trailing word: ignored
        let Ok(Message::GpadlHeader {
            header,
            range_words,
        }) = parse(&bytes)
        else {
            panic!("not a header")
        };
        assert_eq!(header.gpadl.get(), 2);
        assert_eq!(range_words.len(), 2);
        assert_eq!(range_words[1].get(), 0xabcd);

        let body = GpadlBody::new(1, 2).as_bytes().to_vec();
        let Ok(Message::GpadlBody { body, range_words }) = parse(&body) else {
            panic!("not a body")
        };
        assert_eq!(body.msgnumber.get(), 1);
        assert!(range_words.is_empty());
        assert_eq!(
            parse(&[9, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]),
            Err(ProtocolError::TooShort {
                message_type: MessageType::GPADL_BODY,
                len: 12,
                min: 16
            })
        );
    }

    #[test]
    fn message_buffer_limits() {
        let mut buffer = MessageBuffer::new();
        assert!(buffer.is_empty());
        assert!(buffer.push(&[1; 200]));
        assert!(!buffer.push(&[2; 41]));
        assert_eq!(buffer.len(), 200);
        assert!(buffer.push(&[3; 40]));
        assert_eq!(buffer.len(), 240);
        assert!(!buffer.push(&[4]));
        assert!(MessageBuffer::from_bytes(&[0; 241]).is_none());
        assert_eq!(
            MessageBuffer::from_bytes(&[3, 0, 0, 0, 0, 0, 0, 0])
                .unwrap()
                .parse(),
            Ok(Message::RequestOffers)
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let result = parse(&bytes);
            if bytes.len() > MAX_MESSAGE_SIZE {
                prop_assert_eq!(result, Err(ProtocolError::TooLong { len: bytes.len() }));
            } else if bytes.len() < 8 {
                prop_assert_eq!(result, Err(ProtocolError::NoHeader { len: bytes.len() }));
            } else if let Ok(message) = result {
                let announced = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                prop_assert_eq!(message.message_type().0, announced);
            }
        }

        #[test]
        fn parse_never_panics_on_known_types(
            message_type in 0u32..=26,
            body in proptest::collection::vec(any::<u8>(), 0..240),
        ) {
            let mut bytes = message_type.to_le_bytes().to_vec();
            bytes.extend_from_slice(&[0; 4]);
            bytes.extend_from_slice(&body);
            match parse(&bytes) {
                Ok(message) => prop_assert_eq!(message.message_type(), MessageType(message_type)),
                Err(ProtocolError::TooShort { message_type: reported, len, min }) => {
                    prop_assert_eq!(reported, MessageType(message_type));
                    prop_assert!(len < min);
                }
                Err(ProtocolError::TooLong { len }) => prop_assert!(len > MAX_MESSAGE_SIZE),
                Err(ProtocolError::UnknownType(t)) => prop_assert!(t.0 > 24),
                Err(ProtocolError::UnsupportedType(t)) => prop_assert!(matches!(t.0, 0 | 18..=20)),
                Err(ProtocolError::NoHeader { .. }) => prop_assert!(false, "header was present"),
            }
        }
    }
}
