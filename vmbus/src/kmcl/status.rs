//! NTSTATUS: the status type of the KMCL layer, and the [`Result`] convention its functions follow.
//!
//! Implements issue 6 §6 and the statuses named in `kmcl-api.md` (client interface, server-only methods). Every KMCL
//! function on Windows returns an NTSTATUS; the Rust functions return [`Result<T>`], whose error is the same 32-bit
//! value, so a driver author can compare against the statuses the Windows pages document (for example
//! `NtStatus::INVALID_PARAMETER_3 == NtStatus(0xC00000F1)` from `VmbPacketInitialize`).
//!
//! # Layout of the value
//! An NTSTATUS is 32 bits (MS-ERREF §2.3): bits 31–30 are the severity ([`Severity`]), bit 29 the customer bit (set
//! for values defined outside Microsoft), bit 28 is reserved (zero; it marks an NTSTATUS mapped into an HRESULT), bits
//! 27–16 the facility and bits 15–0 the code. Windows' `NT_SUCCESS` is "severity success or informational", which
//! [`NtStatus::is_success`] mirrors; `NT_ERROR` is "severity error" ([`NtStatus::is_error`]). Warnings such as
//! [`NtStatus::BUFFER_OVERFLOW`] are neither.
//!
//! The type is open: any `u32` is a valid [`NtStatus`], unknown values are kept and printed as numbers, so a status
//! that crosses a boundary (a peer's completion status, a value from a C caller) never has to be rejected to be
//! represented. Every named constant was checked against ReactOS `sdk/include/psdk/ntstatus.h`; the tests pin them.

use core::fmt;

/// The result of a KMCL-layer function.
///
/// The convention, for every function under [`crate::kmcl`]:
/// - `Ok(value)` is Windows' `STATUS_SUCCESS`. Where the Windows function has other *successful* outcomes that
///   the caller must tell apart (`STATUS_PENDING` from `VmbChannelPacketGetExternalData`, "more to save" from
///   `VmbChannelSaveContinue`, "more chunks" from `VmbChannelRestoreFromBuffer`), the Rust function returns them
///   inside `value` as an enum, and the enum converts into the Windows status.
/// - `Err(status)` always carries a status for which [`NtStatus::is_success`] is false: an error, or a warning that
///   the Windows page documents as a failure (for example [`NtStatus::BUFFER_OVERFLOW`] from
///   `VmbChannelSendSynchronousRequest`: the request did not fit and was not queued). The status is exactly the one
///   the Windows page names for the same failure, so tests and callers can match on the constants.
/// - Nothing panics on bad input: a wrong argument, state or handle is an `Err`.
///
/// [`NtStatus::into_result`] and [`NtStatus::from_result`] convert between the two forms at a boundary that speaks raw
/// NTSTATUS values.
pub type Result<T> = core::result::Result<T, NtStatus>;

/// An NTSTATUS value (MS-ERREF §2.3): the status every KMCL function reports.
///
/// Open: every `u32` is representable; the associated constants name the statuses the KMCL pages and this project use.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(transparent)]
pub struct NtStatus(pub u32);

/// The severity of an NTSTATUS: its two top bits (MS-ERREF §2.3).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Severity {
    /// `STATUS_SEVERITY_SUCCESS` (0): the operation succeeded.
    Success = 0,
    /// `STATUS_SEVERITY_INFORMATIONAL` (1): success, with something to report.
    Informational = 1,
    /// `STATUS_SEVERITY_WARNING` (2): not a success; often partial (for example data that did not fit).
    Warning = 2,
    /// `STATUS_SEVERITY_ERROR` (3): the operation failed.
    Error = 3,
}

impl NtStatus {
    /// The severity (bits 31–30).
    pub const fn severity(self) -> Severity {
        match self.0 >> 30 {
            0 => Severity::Success,
            1 => Severity::Informational,
            2 => Severity::Warning,
            _ => Severity::Error,
        }
    }

    /// Windows' `NT_SUCCESS`: severity success or informational (the value is non-negative as an `i32`).
    pub const fn is_success(self) -> bool {
        (self.0 as i32) >= 0
    }

    /// Windows' `NT_INFORMATION`: severity informational.
    pub const fn is_informational(self) -> bool {
        matches!(self.severity(), Severity::Informational)
    }

    /// Windows' `NT_WARNING`: severity warning.
    pub const fn is_warning(self) -> bool {
        matches!(self.severity(), Severity::Warning)
    }

    /// Windows' `NT_ERROR`: severity error.
    pub const fn is_error(self) -> bool {
        matches!(self.severity(), Severity::Error)
    }

    /// Whether the customer bit (29) is set: a value defined outside Microsoft's numbering space.
    pub const fn is_customer(self) -> bool {
        self.0 & (1 << 29) != 0
    }

    /// The facility (bits 27–16), which selects the numbering space of [`NtStatus::code`].
    pub const fn facility(self) -> u16 {
        ((self.0 >> 16) & 0x0FFF) as u16
    }

    /// The code within the facility (bits 15–0).
    pub const fn code(self) -> u16 {
        self.0 as u16
    }

    /// The value as Windows declares it: `NTSTATUS` is a signed 32-bit `LONG`.
    pub const fn as_i32(self) -> i32 {
        self.0 as i32
    }

    /// `Ok(())` if [`NtStatus::is_success`], else `Err(self)`: the bridge from a raw status into [`Result`].
    ///
    /// An informational or success status other than `STATUS_SUCCESS` (for example [`NtStatus::PENDING`]) becomes
    /// `Ok(())`: a caller that must tell it apart looks at the status itself.
    pub const fn into_result(self) -> Result<()> {
        if self.is_success() { Ok(()) } else { Err(self) }
    }

    /// The raw status of a [`Result`]: [`NtStatus::SUCCESS`] for `Ok`, the error for `Err`.
    pub const fn from_result<T>(result: &Result<T>) -> NtStatus {
        match result {
            Ok(_) => NtStatus::SUCCESS,
            Err(status) => *status,
        }
    }

    /// `STATUS_INVALID_PARAMETER_<n>` for `n` in 1..=12: the status KMCL functions return for their `n`th argument
    /// (`_1` being the channel). `None` for any other `n`.
    pub const fn invalid_parameter(n: u32) -> Option<NtStatus> {
        if n >= 1 && n <= 12 {
            Some(NtStatus(NtStatus::INVALID_PARAMETER_1.0 + (n - 1)))
        } else {
            None
        }
    }
}

/// Defines the named statuses once: the constants, [`NtStatus::name`], [`NtStatus::description`] and
/// [`NtStatus::KNOWN`], from one list of `NAME = value, "what it means"`.
macro_rules! named_statuses {
    ($($name:ident = $value:literal, $meaning:literal;)*) => {
        impl NtStatus {
            $(
                #[doc = concat!("`STATUS_", stringify!($name), "` (", stringify!($value), "): ", $meaning, ".")]
                pub const $name: NtStatus = NtStatus($value);
            )*

            /// Every named status, in numeric order within each severity.
            pub const KNOWN: &'static [NtStatus] = &[$(NtStatus::$name),*];

            /// The Windows name of a named status (`"STATUS_INVALID_PARAMETER_3"`), or `None` for other values.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some(concat!("STATUS_", stringify!($name))),)*
                    _ => None,
                }
            }

            /// A short explanation of a named status, or `None` for other values.
            pub const fn description(self) -> Option<&'static str> {
                match self.0 {
                    $($value => Some($meaning),)*
                    _ => None,
                }
            }
        }
    };
}

named_statuses! {
    // Severity success.
    SUCCESS = 0x00000000, "the operation succeeded";
    TIMEOUT = 0x00000102, "a wait ended because its time limit passed (a success status)";
    PENDING = 0x00000103, "the operation was started and completes later";
    // Severity warning.
    BUFFER_OVERFLOW = 0x80000005, "the data did not fit in the buffer";
    NO_MORE_ENTRIES = 0x8000001A, "there are no more entries to return";
    // Severity error.
    UNSUCCESSFUL = 0xC0000001, "the operation failed";
    NOT_IMPLEMENTED = 0xC0000002, "the operation is not implemented";
    INVALID_HANDLE = 0xC0000008, "the handle is not valid in the calling context (closed, stale, forged or another context's)";
    INVALID_PARAMETER = 0xC000000D, "a parameter is invalid";
    NO_SUCH_DEVICE = 0xC000000E, "the device does not exist";
    INVALID_DEVICE_REQUEST = 0xC0000010, "the request is not valid for this device";
    MORE_PROCESSING_REQUIRED = 0xC0000016, "more data is needed before the operation can finish";
    NO_MEMORY = 0xC0000017, "not enough memory";
    ACCESS_DENIED = 0xC0000022, "access was denied";
    BUFFER_TOO_SMALL = 0xC0000023, "the buffer is too small for the result";
    OBJECT_TYPE_MISMATCH = 0xC0000024, "the object is of the wrong type for the operation";
    INVALID_PARAMETER_MIX = 0xC0000030, "the parameters are invalid in combination";
    OBJECT_NAME_NOT_FOUND = 0xC0000034, "no object has this name";
    OBJECT_NAME_COLLISION = 0xC0000035, "an object with this name already exists";
    QUOTA_EXCEEDED = 0xC0000044, "a quota was exceeded";
    REVISION_MISMATCH = 0xC0000059, "the structure's revision (version) is not the expected one";
    INSUFFICIENT_RESOURCES = 0xC000009A, "not enough resources (memory, table slots) to finish the operation";
    DEVICE_NOT_CONNECTED = 0xC000009D, "the device is not connected";
    DEVICE_NOT_READY = 0xC00000A3, "the device is not ready";
    IO_TIMEOUT = 0xC00000B5, "the I/O operation did not finish within its time limit";
    NOT_SUPPORTED = 0xC00000BB, "the request is not supported";
    INTERNAL_ERROR = 0xC00000E5, "an internal error occurred";
    INVALID_USER_BUFFER = 0xC00000E8, "a caller's buffer is unusable (misaligned or of a bad size)";
    INVALID_PARAMETER_1 = 0xC00000EF, "the first parameter is invalid (for KMCL: the channel, or its state)";
    INVALID_PARAMETER_2 = 0xC00000F0, "the second parameter is invalid";
    INVALID_PARAMETER_3 = 0xC00000F1, "the third parameter is invalid";
    INVALID_PARAMETER_4 = 0xC00000F2, "the fourth parameter is invalid";
    INVALID_PARAMETER_5 = 0xC00000F3, "the fifth parameter is invalid";
    INVALID_PARAMETER_6 = 0xC00000F4, "the sixth parameter is invalid";
    INVALID_PARAMETER_7 = 0xC00000F5, "the seventh parameter is invalid";
    INVALID_PARAMETER_8 = 0xC00000F6, "the eighth parameter is invalid";
    INVALID_PARAMETER_9 = 0xC00000F7, "the ninth parameter is invalid";
    INVALID_PARAMETER_10 = 0xC00000F8, "the tenth parameter is invalid";
    INVALID_PARAMETER_11 = 0xC00000F9, "the eleventh parameter is invalid";
    INVALID_PARAMETER_12 = 0xC00000FA, "the twelfth parameter is invalid";
    PROCESS_IS_TERMINATING = 0xC000010A, "the context (the unikernel's process) is gone or being destroyed";
    CANCELLED = 0xC0000120, "the operation was cancelled";
    INVALID_DEVICE_STATE = 0xC0000184, "the device (channel) is not in a state that allows the request";
    INVALID_BUFFER_SIZE = 0xC0000206, "the buffer size is invalid";
    NOT_FOUND = 0xC0000225, "the object was not found";
    DEVICE_REMOVED = 0xC00002B6, "the device was removed (the channel is shutting down or was rescinded)";
}

impl fmt::Display for NtStatus {
    /// `STATUS_INVALID_PARAMETER_3 (0xC00000F1)` for a named status; `unknown error status (0xE0001234)` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} (0x{:08X})", self.0),
            None => {
                let severity = match self.severity() {
                    Severity::Success => "success",
                    Severity::Informational => "informational",
                    Severity::Warning => "warning",
                    Severity::Error => "error",
                };
                write!(f, "unknown {severity} status (0x{:08X})", self.0)
            }
        }
    }
}

impl fmt::Debug for NtStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NtStatus({self})")
    }
}

impl core::error::Error for NtStatus {}

impl From<u32> for NtStatus {
    fn from(value: u32) -> Self {
        NtStatus(value)
    }
}

impl From<NtStatus> for u32 {
    fn from(status: NtStatus) -> Self {
        status.0
    }
}

impl From<i32> for NtStatus {
    /// The value as Windows declares it (`NTSTATUS` is a signed `LONG`).
    fn from(value: i32) -> Self {
        NtStatus(value as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;

    /// Every named status, its value and name, as listed in ReactOS `sdk/include/psdk/ntstatus.h` (the second
    /// source; the first is the brief/`kmcl-api.md`).
    const PINNED: &[(NtStatus, u32, &str)] = &[
        (NtStatus::SUCCESS, 0x0000_0000, "STATUS_SUCCESS"),
        (NtStatus::TIMEOUT, 0x0000_0102, "STATUS_TIMEOUT"),
        (NtStatus::PENDING, 0x0000_0103, "STATUS_PENDING"),
        (
            NtStatus::BUFFER_OVERFLOW,
            0x8000_0005,
            "STATUS_BUFFER_OVERFLOW",
        ),
        (
            NtStatus::NO_MORE_ENTRIES,
            0x8000_001A,
            "STATUS_NO_MORE_ENTRIES",
        ),
        (NtStatus::UNSUCCESSFUL, 0xC000_0001, "STATUS_UNSUCCESSFUL"),
        (
            NtStatus::NOT_IMPLEMENTED,
            0xC000_0002,
            "STATUS_NOT_IMPLEMENTED",
        ),
        (
            NtStatus::INVALID_HANDLE,
            0xC000_0008,
            "STATUS_INVALID_HANDLE",
        ),
        (
            NtStatus::INVALID_PARAMETER,
            0xC000_000D,
            "STATUS_INVALID_PARAMETER",
        ),
        (
            NtStatus::NO_SUCH_DEVICE,
            0xC000_000E,
            "STATUS_NO_SUCH_DEVICE",
        ),
        (
            NtStatus::INVALID_DEVICE_REQUEST,
            0xC000_0010,
            "STATUS_INVALID_DEVICE_REQUEST",
        ),
        (
            NtStatus::MORE_PROCESSING_REQUIRED,
            0xC000_0016,
            "STATUS_MORE_PROCESSING_REQUIRED",
        ),
        (NtStatus::NO_MEMORY, 0xC000_0017, "STATUS_NO_MEMORY"),
        (NtStatus::ACCESS_DENIED, 0xC000_0022, "STATUS_ACCESS_DENIED"),
        (
            NtStatus::BUFFER_TOO_SMALL,
            0xC000_0023,
            "STATUS_BUFFER_TOO_SMALL",
        ),
        (
            NtStatus::OBJECT_TYPE_MISMATCH,
            0xC000_0024,
            "STATUS_OBJECT_TYPE_MISMATCH",
        ),
        (
            NtStatus::INVALID_PARAMETER_MIX,
            0xC000_0030,
            "STATUS_INVALID_PARAMETER_MIX",
        ),
        (
            NtStatus::OBJECT_NAME_NOT_FOUND,
            0xC000_0034,
            "STATUS_OBJECT_NAME_NOT_FOUND",
        ),
        (
            NtStatus::OBJECT_NAME_COLLISION,
            0xC000_0035,
            "STATUS_OBJECT_NAME_COLLISION",
        ),
        (
            NtStatus::QUOTA_EXCEEDED,
            0xC000_0044,
            "STATUS_QUOTA_EXCEEDED",
        ),
        (
            NtStatus::REVISION_MISMATCH,
            0xC000_0059,
            "STATUS_REVISION_MISMATCH",
        ),
        (
            NtStatus::INSUFFICIENT_RESOURCES,
            0xC000_009A,
            "STATUS_INSUFFICIENT_RESOURCES",
        ),
        (
            NtStatus::DEVICE_NOT_CONNECTED,
            0xC000_009D,
            "STATUS_DEVICE_NOT_CONNECTED",
        ),
        (
            NtStatus::DEVICE_NOT_READY,
            0xC000_00A3,
            "STATUS_DEVICE_NOT_READY",
        ),
        (NtStatus::IO_TIMEOUT, 0xC000_00B5, "STATUS_IO_TIMEOUT"),
        (NtStatus::NOT_SUPPORTED, 0xC000_00BB, "STATUS_NOT_SUPPORTED"),
        (
            NtStatus::INTERNAL_ERROR,
            0xC000_00E5,
            "STATUS_INTERNAL_ERROR",
        ),
        (
            NtStatus::INVALID_USER_BUFFER,
            0xC000_00E8,
            "STATUS_INVALID_USER_BUFFER",
        ),
        (
            NtStatus::INVALID_PARAMETER_1,
            0xC000_00EF,
            "STATUS_INVALID_PARAMETER_1",
        ),
        (
            NtStatus::INVALID_PARAMETER_2,
            0xC000_00F0,
            "STATUS_INVALID_PARAMETER_2",
        ),
        (
            NtStatus::INVALID_PARAMETER_3,
            0xC000_00F1,
            "STATUS_INVALID_PARAMETER_3",
        ),
        (
            NtStatus::INVALID_PARAMETER_4,
            0xC000_00F2,
            "STATUS_INVALID_PARAMETER_4",
        ),
        (
            NtStatus::INVALID_PARAMETER_5,
            0xC000_00F3,
            "STATUS_INVALID_PARAMETER_5",
        ),
        (
            NtStatus::INVALID_PARAMETER_6,
            0xC000_00F4,
            "STATUS_INVALID_PARAMETER_6",
        ),
        (
            NtStatus::INVALID_PARAMETER_7,
            0xC000_00F5,
            "STATUS_INVALID_PARAMETER_7",
        ),
        (
            NtStatus::INVALID_PARAMETER_8,
            0xC000_00F6,
            "STATUS_INVALID_PARAMETER_8",
        ),
        (
            NtStatus::INVALID_PARAMETER_9,
            0xC000_00F7,
            "STATUS_INVALID_PARAMETER_9",
        ),
        (
            NtStatus::INVALID_PARAMETER_10,
            0xC000_00F8,
            "STATUS_INVALID_PARAMETER_10",
        ),
        (
            NtStatus::INVALID_PARAMETER_11,
            0xC000_00F9,
            "STATUS_INVALID_PARAMETER_11",
        ),
        (
            NtStatus::INVALID_PARAMETER_12,
            0xC000_00FA,
            "STATUS_INVALID_PARAMETER_12",
        ),
        (
            NtStatus::PROCESS_IS_TERMINATING,
            0xC000_010A,
            "STATUS_PROCESS_IS_TERMINATING",
        ),
        (NtStatus::CANCELLED, 0xC000_0120, "STATUS_CANCELLED"),
        (
            NtStatus::INVALID_DEVICE_STATE,
            0xC000_0184,
            "STATUS_INVALID_DEVICE_STATE",
        ),
        (
            NtStatus::INVALID_BUFFER_SIZE,
            0xC000_0206,
            "STATUS_INVALID_BUFFER_SIZE",
        ),
        (NtStatus::NOT_FOUND, 0xC000_0225, "STATUS_NOT_FOUND"),
        (
            NtStatus::DEVICE_REMOVED,
            0xC000_02B6,
            "STATUS_DEVICE_REMOVED",
        ),
    ];

    #[test]
    fn every_named_status_has_its_windows_value_and_name() {
        for &(status, value, name) in PINNED {
            assert_eq!(status.0, value, "{name}");
            assert_eq!(status.name(), Some(name), "{value:#x}");
            assert!(
                status.description().is_some_and(|d| !d.is_empty()),
                "{name}"
            );
        }
        // The pinned list and the named list are the same set, with no value named twice.
        assert_eq!(PINNED.len(), NtStatus::KNOWN.len());
        for (i, a) in NtStatus::KNOWN.iter().enumerate() {
            assert!(PINNED.iter().any(|p| p.0 == *a), "{a} is not pinned");
            assert!(
                NtStatus::KNOWN[i + 1..].iter().all(|b| b != a),
                "{a} named twice"
            );
        }
    }

    #[test]
    fn the_statuses_the_kmcl_pages_name() {
        // kmcl-api.md: VmbPacketInitialize, SendSynchronousRequest, SaveContinue, RestoreFromBuffer, MmioMegabytes.
        assert_eq!(NtStatus::INVALID_PARAMETER_3, NtStatus(0xC00000F1));
        assert_eq!(NtStatus::BUFFER_OVERFLOW, NtStatus(0x80000005));
        assert_eq!(NtStatus::CANCELLED, NtStatus(0xC0000120));
        assert_eq!(NtStatus::DEVICE_REMOVED, NtStatus(0xC00002B6));
        assert_eq!(NtStatus::BUFFER_TOO_SMALL, NtStatus(0xC0000023));
        assert_eq!(NtStatus::MORE_PROCESSING_REQUIRED, NtStatus(0xC0000016));
        assert_eq!(NtStatus::INVALID_PARAMETER, NtStatus(0xC000000D));
    }

    #[test]
    fn invalid_parameter_n_covers_1_to_12() {
        let expected = [
            NtStatus::INVALID_PARAMETER_1,
            NtStatus::INVALID_PARAMETER_2,
            NtStatus::INVALID_PARAMETER_3,
            NtStatus::INVALID_PARAMETER_4,
            NtStatus::INVALID_PARAMETER_5,
            NtStatus::INVALID_PARAMETER_6,
            NtStatus::INVALID_PARAMETER_7,
            NtStatus::INVALID_PARAMETER_8,
            NtStatus::INVALID_PARAMETER_9,
            NtStatus::INVALID_PARAMETER_10,
            NtStatus::INVALID_PARAMETER_11,
            NtStatus::INVALID_PARAMETER_12,
        ];
        for (i, status) in expected.iter().enumerate() {
            assert_eq!(NtStatus::invalid_parameter(i as u32 + 1), Some(*status));
        }
        assert_eq!(NtStatus::invalid_parameter(0), None);
        assert_eq!(NtStatus::invalid_parameter(13), None);
        assert_eq!(NtStatus::invalid_parameter(u32::MAX), None);
    }

    #[test]
    fn display_is_the_name_and_the_value() {
        assert_eq!(
            NtStatus::INVALID_PARAMETER_3.to_string(),
            "STATUS_INVALID_PARAMETER_3 (0xC00000F1)"
        );
        assert_eq!(NtStatus::SUCCESS.to_string(), "STATUS_SUCCESS (0x00000000)");
        assert_eq!(NtStatus::PENDING.to_string(), "STATUS_PENDING (0x00000103)");
        assert_eq!(
            NtStatus(0xE000_1234).to_string(),
            "unknown error status (0xE0001234)"
        );
        assert_eq!(
            NtStatus(0x8000_7777).to_string(),
            "unknown warning status (0x80007777)"
        );
        assert_eq!(
            NtStatus(0x4000_0000).to_string(),
            "unknown informational status (0x40000000)"
        );
        assert_eq!(
            NtStatus(0x0000_0001).to_string(),
            "unknown success status (0x00000001)"
        );
        assert_eq!(
            format!("{:?}", NtStatus::INVALID_HANDLE),
            "NtStatus(STATUS_INVALID_HANDLE (0xC0000008))"
        );
    }

    #[test]
    fn severity_follows_nt_success_and_nt_error() {
        // Success severity, including TIMEOUT and PENDING: NT_SUCCESS holds.
        for status in [NtStatus::SUCCESS, NtStatus::TIMEOUT, NtStatus::PENDING] {
            assert_eq!(status.severity(), Severity::Success);
            assert!(status.is_success() && !status.is_error() && !status.is_warning());
        }
        // Informational: STATUS_CTX_CDM_CONNECT (0x400A0004, facility TERMINAL_SERVER 0xA) counts as success.
        let info = NtStatus(0x400A_0004);
        assert_eq!(info.severity(), Severity::Informational);
        assert!(info.is_success() && info.is_informational() && !info.is_error());
        assert_eq!(info.facility(), 0xA);
        assert_eq!(info.code(), 4);
        // Warning: neither success nor error.
        let warning = NtStatus::BUFFER_OVERFLOW;
        assert_eq!(warning.severity(), Severity::Warning);
        assert!(!warning.is_success() && warning.is_warning() && !warning.is_error());
        // DBG_EXCEPTION_NOT_HANDLED 0x80010001: warning, facility DEBUGGER (1).
        assert_eq!(NtStatus(0x8001_0001).facility(), 1);
        // Error.
        let error = NtStatus::INVALID_PARAMETER_3;
        assert_eq!(error.severity(), Severity::Error);
        assert!(!error.is_success() && error.is_error());
        assert_eq!(error.facility(), 0);
        assert_eq!(error.code(), 0x00F1);
        assert!(!error.is_customer());
        assert!(NtStatus(0xE000_0001).is_customer());
        assert_eq!(error.as_i32(), 0xC00000F1_u32 as i32);
        assert!(error.as_i32() < 0);
    }

    #[test]
    fn every_named_status_has_a_severity_consistent_with_its_value() {
        for status in NtStatus::KNOWN {
            assert_eq!(status.is_success(), status.0 < 0x8000_0000, "{status}");
            assert_eq!(status.is_error(), status.0 >= 0xC000_0000, "{status}");
        }
    }

    #[test]
    fn result_conversions() {
        assert_eq!(NtStatus::SUCCESS.into_result(), Ok(()));
        assert_eq!(NtStatus::PENDING.into_result(), Ok(()));
        assert_eq!(
            NtStatus::BUFFER_OVERFLOW.into_result(),
            Err(NtStatus::BUFFER_OVERFLOW)
        );
        assert_eq!(
            NtStatus::DEVICE_REMOVED.into_result(),
            Err(NtStatus::DEVICE_REMOVED)
        );
        assert_eq!(
            NtStatus::from_result(&Ok::<u8, NtStatus>(7)),
            NtStatus::SUCCESS
        );
        assert_eq!(
            NtStatus::from_result(&Err::<u8, _>(NtStatus::CANCELLED)),
            NtStatus::CANCELLED
        );
        assert_eq!(NtStatus::from(0xC000_0008_u32), NtStatus::INVALID_HANDLE);
        assert_eq!(u32::from(NtStatus::NOT_FOUND), 0xC000_0225);
        assert_eq!(NtStatus::from(-1073741811_i32), NtStatus::INVALID_PARAMETER); // 0xC000000D as a LONG
    }

    #[test]
    fn is_a_core_error() {
        fn fails() -> core::result::Result<(), alloc::boxed::Box<dyn core::error::Error>> {
            Err(NtStatus::OBJECT_TYPE_MISMATCH)?;
            Ok(())
        }
        let error = fails().unwrap_err();
        assert_eq!(
            error.to_string(),
            "STATUS_OBJECT_TYPE_MISMATCH (0xC0000024)"
        );
    }

    proptest::proptest! {
        #[test]
        fn any_value_is_representable_and_printable(value: u32) {
            let status = NtStatus(value);
            proptest::prop_assert_eq!(u32::from(status), value);
            let text = status.to_string();
            let hex = format!("0x{value:08X}");
            proptest::prop_assert!(text.contains(&hex));
            proptest::prop_assert_eq!(status.name().is_some(), NtStatus::KNOWN.contains(&status));
            proptest::prop_assert_eq!(status.is_success(), status.as_i32() >= 0);
            proptest::prop_assert_eq!(
                u32::from(status.severity() as u8) << 30
                    | u32::from(status.is_customer()) << 29
                    | (value & (1 << 28))
                    | u32::from(status.facility()) << 16
                    | u32::from(status.code()),
                value
            );
        }
    }
}
