//! Guest KVP (key-value pair) service: answers the host's pool queries from a guest-supplied table (OS name,
//! version, kernel build, integration services version... what Hyper-V Manager shows), and keeps what the host
//! pushes into its own pools, within fixed bounds.
//!
//! Reference: `hyperv-vmbus.md` §7 (KVP message type 2, versions 4.0/3.0/1.0); the body layout, operations, pools,
//! the UTF-16 encoding with sizes in bytes including the NUL, and `HV_S_CONT` for "no such index/key" are from
//! Linux `include/uapi/linux/hyperv.h` and `drivers/hv/hv_kvp.c` / `tools/hv/hv_kvp_daemon.c`; the auto-pool key
//! names and their order from the same daemon and NetBSD `hvkvp.c`.

use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::mem::{offset_of, size_of};

use zerocopy::byteorder::little_endian::U32;
use zerocopy::{FromBytes, IntoBytes};

use super::framing::build_response;
use super::guest::{GuestChannel, IcAction, IcError, IcFailure, IcReply, IcResult, Received, negotiation_reply};
use super::negotiate::{FRAMEWORK_VERSIONS, KVP_VERSIONS, NegotiatedVersions, VersionPreferences};
use super::wire::{
    IcMessageType, IcStatus, KVP_MAX_KEY_SIZE, KVP_MAX_VALUE_SIZE, KvpDeleteMessage, KvpEnumerateMessage,
    KvpExchangeValue, KvpGetSetMessage, KvpHeader, KvpOperation, KvpPool, KvpValueType,
};

/// The KVP versions the guest supports (§7 "Versions").
pub const KVP_PREFERENCES: VersionPreferences =
    VersionPreferences { framework: FRAMEWORK_VERSIONS, message: KVP_VERSIONS };

/// Most entries kept per host-written pool; a SET beyond is answered with E_FAIL.
pub const MAX_ENTRIES_PER_POOL: usize = 64;

/// Highest pool number (AUTO_INTERNAL); higher pools are refused.
const LAST_POOL: KvpPool = KvpPool::AUTO_INTERNAL;

/// Offset of the exchange value in an ENUMERATE body.
const ENUMERATE_DATA: usize = offset_of!(KvpEnumerateMessage, data);
/// Offset of the exchange value in a GET/SET body.
const GET_SET_DATA: usize = offset_of!(KvpGetSetMessage, data);
/// Offset of the key within an exchange value.
const VALUE_KEY: usize = offset_of!(KvpExchangeValue, key);
/// Offset of the value within an exchange value.
const VALUE_VALUE: usize = offset_of!(KvpExchangeValue, value);

/// Write `text` as NUL-terminated UTF-16LE into `field` (zeroed first), cut at a character boundary so that the
/// NUL fits. Returns the size in bytes including the NUL, as the `key_size`/`value_size` fields want it. A field of
/// fewer than 2 bytes gets nothing and size 0.
pub fn write_utf16_field(text: &str, field: &mut [u8]) -> u32 {
    field.fill(0);
    let capacity_units = field.len() / 2;
    if capacity_units == 0 {
        return 0;
    }
    let mut used = 0;
    for ch in text.chars() {
        let mut units = [0u16; 2];
        let encoded = ch.encode_utf16(&mut units);
        if used + encoded.len() > capacity_units - 1 {
            break;
        }
        for unit in encoded.iter() {
            let at = used * 2;
            if let Some(slot) = field.get_mut(at..at + 2) {
                slot.copy_from_slice(&unit.to_le_bytes());
            }
            used += 1;
        }
    }
    u32::try_from((used + 1) * 2).unwrap_or(0)
}

/// Read a UTF-16LE string of `size` bytes (clamped to the field, NUL and anything after it dropped, bad surrogates
/// replaced) from `field`.
pub fn read_utf16_field(field: &[u8], size: u32) -> String {
    let len = usize::try_from(size).unwrap_or(usize::MAX).min(field.len());
    let units = field[..len].as_chunks::<2>().0.iter().map(|b| u16::from_le_bytes(*b)).take_while(|&u| u != 0);
    char::decode_utf16(units).map(|r| r.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
}

/// One key and its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvpEntry {
    /// The key.
    pub key: String,
    /// The value, as text.
    pub value: String,
}

impl KvpEntry {
    /// An entry.
    pub fn new(key: impl Into<String>, value: impl Into<String>) -> KvpEntry {
        KvpEntry { key: key.into(), value: value.into() }
    }
}

/// The guest's intrinsic data, published in the AUTO pool in the order Linux's daemon and NetBSD use (index 0
/// FullyQualifiedDomainName ... 9 ProcessorArchitecture).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestIntrinsics {
    /// Host name of the guest.
    pub fully_qualified_domain_name: String,
    /// Version of the integration services (this crate's).
    pub integration_services_version: String,
    /// IPv4 addresses, `;`-separated (empty without networking).
    pub network_address_ipv4: String,
    /// IPv6 addresses.
    pub network_address_ipv6: String,
    /// Kernel build (e.g. a commit or build number).
    pub os_build_number: String,
    /// OS name.
    pub os_name: String,
    /// OS major version.
    pub os_major_version: String,
    /// OS minor version.
    pub os_minor_version: String,
    /// OS version string.
    pub os_version: String,
    /// Windows `PROCESSOR_ARCHITECTURE_*` number as text: "9" for x86-64.
    pub processor_architecture: String,
}

impl GuestIntrinsics {
    /// The AUTO pool entries.
    pub fn to_entries(&self) -> Vec<KvpEntry> {
        [
            ("FullyQualifiedDomainName", &self.fully_qualified_domain_name),
            ("IntegrationServicesVersion", &self.integration_services_version),
            ("NetworkAddressIPv4", &self.network_address_ipv4),
            ("NetworkAddressIPv6", &self.network_address_ipv6),
            ("OSBuildNumber", &self.os_build_number),
            ("OSName", &self.os_name),
            ("OSMajorVersion", &self.os_major_version),
            ("OSMinorVersion", &self.os_minor_version),
            ("OSVersion", &self.os_version),
            ("ProcessorArchitecture", &self.processor_architecture),
        ]
        .into_iter()
        .map(|(k, v)| KvpEntry::new(k, v.as_str()))
        .collect()
    }
}

/// What a KVP request did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvpAction {
    /// ENUMERATE: the entry at `index` of `pool` was sent, or the end was reported (`found` false, status S_CONT).
    Enumerated {
        /// Pool.
        pool: KvpPool,
        /// Index asked for.
        index: u32,
        /// Whether an entry was there.
        found: bool,
    },
    /// GET: the value of `key` was sent, or S_CONT when absent.
    Got {
        /// Pool.
        pool: KvpPool,
        /// Key asked for.
        key: String,
        /// Whether it was there.
        found: bool,
    },
    /// SET: the host stored `key` = `value` in `pool`.
    Set {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: String,
        /// Value as text.
        value: String,
    },
    /// DELETE: `key` was removed from `pool` (S_CONT when absent).
    Deleted {
        /// Pool.
        pool: KvpPool,
        /// Key.
        key: String,
        /// Whether it was there.
        found: bool,
    },
}

/// The guest KVP service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvpService {
    channel: GuestChannel,
    auto_pool: Vec<KvpEntry>,
    host_pools: BTreeMap<KvpPool, Vec<KvpEntry>>,
}

super::guest::impl_guest_service!(KvpService, KvpAction, KVP);

impl KvpService {
    /// A service answering AUTO-pool queries from `auto_pool` (index order as given).
    pub fn new(auto_pool: Vec<KvpEntry>) -> KvpService {
        KvpService {
            channel: GuestChannel::new(IcMessageType::KVP, KVP_PREFERENCES),
            auto_pool,
            host_pools: BTreeMap::new(),
        }
    }

    /// A service publishing `intrinsics` in the AUTO pool.
    pub fn with_intrinsics(intrinsics: &GuestIntrinsics) -> KvpService {
        KvpService::new(intrinsics.to_entries())
    }

    /// The versions in force, once negotiated.
    pub fn negotiated(&self) -> Option<NegotiatedVersions> {
        self.channel.negotiated()
    }

    /// The entries of `pool` (the guest's table for AUTO, what the host stored otherwise).
    pub fn pool(&self, pool: KvpPool) -> &[KvpEntry] {
        if pool == KvpPool::AUTO {
            &self.auto_pool
        } else {
            self.host_pools.get(&pool).map(Vec::as_slice).unwrap_or(&[])
        }
    }

    /// Handle one received in-band payload.
    pub fn handle(&mut self, payload: &[u8]) -> IcResult<KvpAction> {
        let frame = match self.channel.receive(payload)? {
            Received::Message { frame, .. } => frame,
            Received::Negotiation { outcome, response } => return Ok(negotiation_reply(outcome, response)),
        };
        let too_short = |needed: usize| {
            let error = IcError::BodyTooShort { message_type: IcMessageType::KVP, len: frame.body.len(), needed };
            IcFailure::answered(error, &frame, IcStatus::FAIL)
        };
        let Ok((header, _)) = KvpHeader::read_from_prefix(frame.body) else {
            return Err(too_short(size_of::<KvpHeader>()));
        };
        let pool = KvpPool(header.pool);
        let operation = KvpOperation(header.operation);
        let refuse = |status| IcFailure::answered(IcError::Unsupported(IcMessageType::KVP), &frame, status);
        if pool > LAST_POOL {
            return Err(refuse(IcStatus::INVALID_ARGUMENT));
        }
        let mut body = frame.body.to_vec();
        let (action, status) = match operation {
            KvpOperation::ENUMERATE => {
                let index = U32::read_from_prefix(frame.body.get(size_of::<KvpHeader>()..).unwrap_or(&[]))
                    .map(|(i, _)| i.get())
                    .map_err(|_| too_short(ENUMERATE_DATA))?;
                let entry = usize::try_from(index).ok().and_then(|i| self.pool(pool).get(i));
                let found = entry.is_some();
                if let Some(entry) = entry {
                    body.resize(body.len().max(size_of::<KvpEnumerateMessage>()), 0);
                    write_exchange_value(&mut body[ENUMERATE_DATA..], Some(&entry.key), &entry.value);
                }
                (KvpAction::Enumerated { pool, index, found }, if found { IcStatus::OK } else { IcStatus::CONTINUE })
            }
            KvpOperation::GET => {
                let key = read_key(frame.body.get(GET_SET_DATA..).unwrap_or(&[]))
                    .ok_or_else(|| too_short(GET_SET_DATA + VALUE_VALUE))?;
                let value = self.pool(pool).iter().find(|e| e.key == key).map(|e| e.value.clone());
                let found = value.is_some();
                if let Some(value) = value {
                    body.resize(body.len().max(size_of::<KvpGetSetMessage>()), 0);
                    write_exchange_value(&mut body[GET_SET_DATA..], None, &value);
                }
                (KvpAction::Got { pool, key, found }, if found { IcStatus::OK } else { IcStatus::CONTINUE })
            }
            KvpOperation::SET => {
                if pool == KvpPool::AUTO {
                    return Err(refuse(IcStatus::FAIL));
                }
                let (key, value) = read_key_value(frame.body.get(GET_SET_DATA..).unwrap_or(&[]))
                    .ok_or_else(|| too_short(size_of::<KvpGetSetMessage>()))?;
                let entries = self.host_pools.entry(pool).or_default();
                if let Some(existing) = entries.iter_mut().find(|e| e.key == key) {
                    existing.value = value.clone();
                } else if entries.len() < MAX_ENTRIES_PER_POOL {
                    entries.push(KvpEntry::new(key.clone(), value.clone()));
                } else {
                    return Err(refuse(IcStatus::FAIL));
                }
                (KvpAction::Set { pool, key, value }, IcStatus::OK)
            }
            KvpOperation::DELETE => {
                if pool == KvpPool::AUTO {
                    return Err(refuse(IcStatus::FAIL));
                }
                let Ok((delete, _)) = KvpDeleteMessage::read_from_prefix(frame.body) else {
                    return Err(too_short(size_of::<KvpDeleteMessage>()));
                };
                let key = read_utf16_field(&delete.key, delete.key_size.get());
                let entries = self.host_pools.entry(pool).or_default();
                let before = entries.len();
                entries.retain(|e| e.key != key);
                let found = entries.len() != before;
                (KvpAction::Deleted { pool, key, found }, if found { IcStatus::OK } else { IcStatus::CONTINUE })
            }
            _ => return Err(refuse(IcStatus::NOT_SUPPORTED)),
        };
        Ok(IcReply { action: IcAction::Service(action), response: Some(build_response(&frame.header, status, &body)) })
    }
}

/// Fill an exchange value at the start of `data` (which holds at least a whole [`KvpExchangeValue`]): type string,
/// the key when given, the value.
fn write_exchange_value(data: &mut [u8], key: Option<&str>, value: &str) {
    let Some(data) = data.get_mut(..size_of::<KvpExchangeValue>()) else {
        return;
    };
    data[..4].copy_from_slice(U32::new(KvpValueType::STRING.0).as_bytes());
    if let Some(key) = key {
        let key_size = write_utf16_field(key, &mut data[VALUE_KEY..VALUE_KEY + KVP_MAX_KEY_SIZE]);
        data[4..8].copy_from_slice(U32::new(key_size).as_bytes());
    }
    let value_size = write_utf16_field(value, &mut data[VALUE_VALUE..VALUE_VALUE + KVP_MAX_VALUE_SIZE]);
    data[8..12].copy_from_slice(U32::new(value_size).as_bytes());
}

/// The key of an exchange value at the start of `data`; needs the sizes and `key_size` bytes of key.
fn read_key(data: &[u8]) -> Option<String> {
    let (sizes, _) = <[U32; 3]>::read_from_prefix(data).ok()?;
    let key_size = usize::try_from(sizes[1].get()).ok()?.min(KVP_MAX_KEY_SIZE);
    let key = data.get(VALUE_KEY..VALUE_KEY + key_size)?;
    Some(read_utf16_field(key, sizes[1].get()))
}

/// The key and value (as text) of a whole exchange value at the start of `data`.
fn read_key_value(data: &[u8]) -> Option<(String, String)> {
    let (value, _) = KvpExchangeValue::read_from_prefix(data).ok()?;
    let key = read_utf16_field(&value.key, value.key_size.get());
    let size = value.value_size.get();
    let text = match KvpValueType(value.value_type.get()) {
        KvpValueType::U32 => {
            u32::from_le_bytes([value.value[0], value.value[1], value.value[2], value.value[3]]).to_string()
        }
        KvpValueType::U64 => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&value.value[..8]);
            u64::from_le_bytes(raw).to_string()
        }
        _ => read_utf16_field(&value.value, size),
    };
    Some((key, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_fields_are_bounded_and_terminated() {
        let mut field = [0xFFu8; 16];
        assert_eq!(write_utf16_field("OSName", &mut field), 14);
        assert_eq!(&field[..4], &[b'O', 0, b'S', 0]);
        assert_eq!(&field[12..16], &[0, 0, 0, 0]);
        assert_eq!(read_utf16_field(&field, 14), "OSName");
        // 8 units of room: 7 characters and the NUL.
        assert_eq!(write_utf16_field("abcdefghij", &mut field), 16);
        assert_eq!(read_utf16_field(&field, 16), "abcdefg");
        // A surrogate pair is never split: 6 units used, the pair would need 7 and 8 (7 units + NUL = 8 max).
        assert_eq!(write_utf16_field("abcdef😀", &mut field), 14);
        assert_eq!(read_utf16_field(&field, 99), "abcdef");
        assert_eq!(write_utf16_field("abcde😀", &mut field), 16);
        assert_eq!(read_utf16_field(&field, 16), "abcde😀");
        assert_eq!(write_utf16_field("x", &mut [0u8; 1]), 0);
        // Odd sizes, lone surrogates: no panic, replacement character.
        assert_eq!(read_utf16_field(&[0x00, 0xD8, b'a', 0], 3), "\u{FFFD}");
    }

    #[test]
    fn intrinsics_keep_the_daemon_order() {
        let info = GuestIntrinsics {
            fully_qualified_domain_name: "h".into(),
            integration_services_version: "0.1".into(),
            network_address_ipv4: String::new(),
            network_address_ipv6: String::new(),
            os_build_number: "b".into(),
            os_name: "n".into(),
            os_major_version: "0".into(),
            os_minor_version: "1".into(),
            os_version: "0.1".into(),
            processor_architecture: "9".into(),
        };
        let keys: Vec<_> = info.to_entries().into_iter().map(|e| e.key).collect();
        assert_eq!(keys[0], "FullyQualifiedDomainName");
        assert_eq!(keys[5], "OSName");
        assert_eq!(keys[9], "ProcessorArchitecture");
    }
}
