//! GUIDs as VMBus puts them on the wire, and the table of well-known device classes.
//!
//! Reference: `hyperv-vmbus.md` §8 (device class GUIDs and their on-wire byte order).

use core::fmt;
use core::str::FromStr;

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A GUID in its on-wire layout (§8): `Data1` u32 LE, `Data2` u16 LE, `Data3` u16 LE, `Data4` 8 bytes in order.
///
/// The canonical text form `aabbccdd-eeff-gghh-iijj-kkllmmnnoopp` reads `Data1`, `Data2` and `Data3` as big-endian
/// hex numbers, so the first three groups appear byte-reversed in memory; the last two groups are `Data4` verbatim.
#[repr(C)]
#[derive(
    Copy,
    Clone,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct Guid {
    data1: U32,
    data2: U16,
    data3: U16,
    data4: [u8; 8],
}

/// Why a text GUID could not be parsed ([`Guid::parse`] / [`FromStr`]).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GuidParseError;

impl fmt::Display for GuidParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("malformed GUID: expected the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")
    }
}

impl core::error::Error for GuidParseError {}

/// Value of one ASCII hex digit, or `None`.
const fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Guid {
    /// The all-zero GUID (the "null" interface or instance id).
    pub const ZERO: Guid = Guid::from_fields(0, 0, 0, [0; 8]);

    /// Builds a GUID from its four fields, as written in C initialisers (`GUID_INIT(d1, d2, d3, d4...)`).
    pub const fn from_fields(data1: u32, data2: u16, data3: u16, data4: [u8; 8]) -> Guid {
        Guid {
            data1: U32::new(data1),
            data2: U16::new(data2),
            data3: U16::new(data3),
            data4,
        }
    }

    /// Parses the canonical 36-character text form (hex digits of either case, dashes at 8, 13, 18, 23).
    ///
    /// Usable in `const` context; returns `None` for anything else (no braces, no surrounding whitespace).
    pub const fn parse(text: &str) -> Option<Guid> {
        let text = text.as_bytes();
        if text.len() != 36 {
            return None;
        }
        // The 16 bytes in text order (i.e. Data1..Data3 big-endian).
        let mut bytes = [0u8; 16];
        let mut pos = 0;
        let mut filled = 0;
        while pos < 36 {
            if pos == 8 || pos == 13 || pos == 18 || pos == 23 {
                if text[pos] != b'-' {
                    return None;
                }
                pos += 1;
                continue;
            }
            // Every group has an even number of digits, so `pos + 1` is inside the same group (< 36).
            let (Some(high), Some(low)) = (hex_digit(text[pos]), hex_digit(text[pos + 1])) else {
                return None;
            };
            bytes[filled] = (high << 4) | low;
            filled += 1;
            pos += 2;
        }
        Some(Guid::from_fields(
            u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
            u16::from_be_bytes([bytes[4], bytes[5]]),
            u16::from_be_bytes([bytes[6], bytes[7]]),
            [
                bytes[8], bytes[9], bytes[10], bytes[11], bytes[12], bytes[13], bytes[14],
                bytes[15],
            ],
        ))
    }

    /// Builds a GUID constant from its canonical text form.
    ///
    /// Meant for `const` items only: a malformed literal stops compilation (it panics during const evaluation).
    /// Use [`Guid::parse`] for text that comes from anywhere else.
    pub const fn from_canonical(text: &str) -> Guid {
        match Guid::parse(text) {
            Some(guid) => guid,
            None => panic!("malformed GUID literal"),
        }
    }

    /// `Data1`, the first text group.
    pub const fn data1(&self) -> u32 {
        self.data1.get()
    }

    /// `Data2`, the second text group.
    pub const fn data2(&self) -> u16 {
        self.data2.get()
    }

    /// `Data3`, the third text group.
    pub const fn data3(&self) -> u16 {
        self.data3.get()
    }

    /// `Data4`, the last two text groups, in order.
    pub const fn data4(&self) -> [u8; 8] {
        self.data4
    }

    /// The 16 bytes exactly as they appear on the wire (§8).
    pub fn to_wire_bytes(&self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(self.as_bytes());
        bytes
    }

    /// Reads a GUID from its 16 on-wire bytes (§8).
    pub fn from_wire_bytes(bytes: [u8; 16]) -> Guid {
        zerocopy::transmute!(bytes)
    }
}

impl fmt::Display for Guid {
    /// The canonical lower-case text form, e.g. `f8615163-df3e-46c5-913f-f2d2f965ed0e`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d4 = self.data4;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.data1(),
            self.data2(),
            self.data3(),
            d4[0],
            d4[1],
            d4[2],
            d4[3],
            d4[4],
            d4[5],
            d4[6],
            d4[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

impl FromStr for Guid {
    type Err = GuidParseError;

    fn from_str(text: &str) -> Result<Guid, GuidParseError> {
        Guid::parse(text).ok_or(GuidParseError)
    }
}

/// Interface-type GUIDs (`if_type` of an offer) of the device classes in §8.
pub mod device_class {
    use super::Guid;

    /// Synthetic network adapter (netvsc).
    pub const NETWORK: Guid = Guid::from_canonical("f8615163-df3e-46c5-913f-f2d2f965ed0e");
    /// Synthetic SCSI controller (storvsc).
    pub const SCSI: Guid = Guid::from_canonical("ba6163d9-04a1-4d29-b605-72e2ffb1dc7f");
    /// Synthetic IDE accelerator (storvsc on the IDE path).
    pub const IDE: Guid = Guid::from_canonical("32412632-86cb-44a2-9b5c-50d1417354f5");
    /// Synthetic keyboard.
    pub const KEYBOARD: Guid = Guid::from_canonical("f912ad6d-2b17-48ea-bd65-f927a61c7684");
    /// Synthetic mouse (HID).
    pub const MOUSE: Guid = Guid::from_canonical("cfa8b69e-5b4a-4cc0-b98b-8ba1a1f3f95a");
    /// Synthetic video (synthvid framebuffer).
    pub const SYNTHVID: Guid = Guid::from_canonical("da0a7802-e377-4aac-8e77-0558eb1073f8");
    /// Dynamic memory (balloon / hot add).
    pub const DYNAMIC_MEMORY: Guid = Guid::from_canonical("525074dc-8985-46e2-8057-a307dc18a502");
    /// Virtual PCI bus (device passthrough).
    pub const VPCI: Guid = Guid::from_canonical("44c4f61d-4444-4400-9d52-802e27ede19f");
    /// Shutdown integration component.
    pub const SHUTDOWN: Guid = Guid::from_canonical("0e0b6031-5213-4934-818b-38d90ced39db");
    /// Time synchronisation integration component.
    pub const TIMESYNC: Guid = Guid::from_canonical("9527e630-d0ae-497b-adce-e80ab0175caf");
    /// Heartbeat integration component.
    pub const HEARTBEAT: Guid = Guid::from_canonical("57164f39-9115-4e78-ab55-382f3bd5422d");
    /// Key-value pair exchange integration component.
    pub const KVP: Guid = Guid::from_canonical("a9a0f4e7-5a45-4d96-b827-8a841e8c03e6");
    /// Volume shadow copy (backup) integration component.
    pub const VSS: Guid = Guid::from_canonical("35fa2e29-ea23-4236-96ae-3a6ebacba440");
    /// Guest file copy integration component.
    pub const FCOPY: Guid = Guid::from_canonical("34d14be3-dee4-41c8-9ae7-6b174977c192");

    /// Every class above with its short name, in the order of §8.
    pub const ALL: [(Guid, &str); 14] = [
        (NETWORK, "network"),
        (SCSI, "scsi"),
        (IDE, "ide"),
        (KEYBOARD, "keyboard"),
        (MOUSE, "mouse"),
        (SYNTHVID, "synthvid"),
        (DYNAMIC_MEMORY, "dynamic memory"),
        (VPCI, "vpci"),
        (SHUTDOWN, "shutdown"),
        (TIMESYNC, "timesync"),
        (HEARTBEAT, "heartbeat"),
        (KVP, "kvp"),
        (VSS, "vss"),
        (FCOPY, "fcopy"),
    ];
}

/// Short name of a well-known device class (§8) for an offer's interface type, e.g. `"network"`; `None` if unknown.
pub fn class_name(interface_type: &Guid) -> Option<&'static str> {
    device_class::ALL
        .iter()
        .find(|(guid, _)| guid == interface_type)
        .map(|&(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use core::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_the_wire() {
        assert_eq!(size_of::<Guid>(), 16);
        assert_eq!(core::mem::align_of::<Guid>(), 1);
        assert_eq!(offset_of!(Guid, data1), 0);
        assert_eq!(offset_of!(Guid, data2), 4);
        assert_eq!(offset_of!(Guid, data3), 6);
        assert_eq!(offset_of!(Guid, data4), 8);
    }

    #[test]
    fn network_class_wire_bytes() {
        // f8615163-df3e-46c5-913f-f2d2f965ed0e: Data1..Data3 little-endian, Data4 verbatim.
        let expected = [
            0x63, 0x51, 0x61, 0xf8, 0x3e, 0xdf, 0xc5, 0x46, 0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65,
            0xed, 0x0e,
        ];
        assert_eq!(device_class::NETWORK.to_wire_bytes(), expected);
        assert_eq!(Guid::from_wire_bytes(expected), device_class::NETWORK);
    }

    #[test]
    fn dynamic_memory_class_wire_bytes() {
        // 525074dc-8985-46e2-8057-a307dc18a502
        let expected = [
            0xdc, 0x74, 0x50, 0x52, 0x85, 0x89, 0xe2, 0x46, 0x80, 0x57, 0xa3, 0x07, 0xdc, 0x18,
            0xa5, 0x02,
        ];
        assert_eq!(device_class::DYNAMIC_MEMORY.as_bytes(), &expected);
    }

    #[test]
    fn fields_constructor_agrees_with_text() {
        let from_fields = Guid::from_fields(
            0x0e0b6031,
            0x5213,
            0x4934,
            [0x81, 0x8b, 0x38, 0xd9, 0x0c, 0xed, 0x39, 0xdb],
        );
        assert_eq!(from_fields, device_class::SHUTDOWN);
        assert_eq!(from_fields.data1(), 0x0e0b6031);
        assert_eq!(from_fields.data2(), 0x5213);
        assert_eq!(from_fields.data3(), 0x4934);
        assert_eq!(from_fields.data4()[7], 0xdb);
    }

    #[test]
    fn display_is_canonical_lower_case_and_round_trips() {
        for (guid, _) in device_class::ALL {
            let text = guid.to_string();
            assert_eq!(text.len(), 36);
            assert_eq!(text, text.to_lowercase());
            assert_eq!(text.parse::<Guid>(), Ok(guid));
        }
        assert_eq!(
            device_class::VPCI.to_string(),
            "44c4f61d-4444-4400-9d52-802e27ede19f"
        );
        assert_eq!(
            Guid::parse("44C4F61D-4444-4400-9D52-802E27EDE19F"),
            Some(device_class::VPCI)
        );
    }

    #[test]
    fn malformed_text_is_rejected() {
        for bad in [
            "",
            "44c4f61d-4444-4400-9d52-802e27ede19",
            "44c4f61d-4444-4400-9d52-802e27ede19ff",
            "44c4f61d+4444-4400-9d52-802e27ede19f",
            "44c4f61d-4444-4400-9d52-802e27ede1gf",
            "{4c4f61d-4444-4400-9d52-802e27ede19f}",
            "44c4f61d4444-4400-9d52-802e27ede19f-",
            "éc4f61d-4444-4400-9d52-802e27ede19f",
        ] {
            assert_eq!(Guid::parse(bad), None, "{bad:?}");
            assert_eq!(bad.parse::<Guid>(), Err(GuidParseError));
        }
    }

    #[test]
    fn class_lookup() {
        assert_eq!(class_name(&device_class::NETWORK), Some("network"));
        assert_eq!(
            class_name(&device_class::DYNAMIC_MEMORY),
            Some("dynamic memory")
        );
        assert_eq!(class_name(&device_class::FCOPY), Some("fcopy"));
        assert_eq!(class_name(&Guid::ZERO), None);
        // All fourteen entries are distinct.
        for (i, (a, _)) in device_class::ALL.iter().enumerate() {
            for (b, _) in &device_class::ALL[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }
}
