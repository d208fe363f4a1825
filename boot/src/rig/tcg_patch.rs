//! The workaround for the outer QEMU's TCG abort (boot/rig/README.md, "The outer QEMU's TCG abort").
//!
//! Under TCG with an SVM guest, QEMU's CR8-write helper raises an interrupt from a vCPU thread that does not hold
//! the global lock, and `tcg_handle_interrupt` (in the module `accel-tcg-x86_64.so`) asserts that it does: the
//! outer QEMU aborts (SIGABRT, shell status 134) in about half the runs. On the one build listed in
//! [`KNOWN_BUILDS`] the function is, in order: assert the lock is held; `cpu->interrupt_request |= mask`
//! (`or %ebp, 0xd8(%rbx)`); kick the vCPU. The patch overwrites the assertion's test-and-branch with a locked
//! (atomic) form of that OR followed by a short jump to the kick, so the unlocked caller is served safely.
//!
//! The patch is written only to a private copy, which QEMU loads through `QEMU_MODULE_DIR`, and only when the
//! module's SHA-256 is one it was derived for and every byte it touches or relies on is as expected.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::host::sha256_hex;

/// The module's file name, as QEMU looks it up in its module directories.
pub const MODULE_NAME: &str = "accel-tcg-x86_64.so";

/// Where Debian installs QEMU's modules on x86-64.
pub const HOST_MODULE_DIR: &str = "/usr/lib/x86_64-linux-gnu/qemu";

/// One module build the patch was derived for (by reading its disassembly of `tcg_handle_interrupt`).
#[derive(Debug)]
pub struct KnownBuild {
    /// SHA-256 of the unmodified module, lower-case hex.
    pub sha256: &'static str,
    /// Which package build this is, for messages.
    pub package: &'static str,
    /// Byte ranges that must hold exactly these bytes before patching (file offsets).
    pub expected: &'static [(usize, &'static [u8])],
    /// The bytes written, at this file offset.
    pub patch: (usize, &'static [u8]),
}

/// The builds the patch is known for.
pub const KNOWN_BUILDS: &[KnownBuild] = &[KnownBuild {
    sha256: "e113de9d435e9b4cb118e2a9dbd0f0954d24ded7034e5ec0ed1baa6111dfeb5b",
    package: "Debian bookworm qemu-system-common 1:7.2+dfsg-7+deb12u18+b3",
    expected: &[
        // tcg_handle_interrupt+0x10: test %al,%al ; jne +0x24 (lock held: skip the assertion call)
        // then the start of the assertion's argument set-up (lea 0x17ee(%rip),%r8), dead after the patch.
        (0x2840, &[0x84, 0xc0, 0x75, 0x24, 0x4c, 0x8d, 0x05, 0xee, 0x17]),
        // tcg_handle_interrupt+0x38: or %ebp,0xd8(%rbx) -- the update the patch makes atomic; the kick follows at 0x286e.
        (0x2868, &[0x09, 0xab, 0xd8, 0x00, 0x00, 0x00]),
    ],
    // lock or %ebp,0xd8(%rbx) ; jmp short 0x286e (0x2849 + 0x25)
    patch: (0x2840, &[0xf0, 0x09, 0xab, 0xd8, 0x00, 0x00, 0x00, 0xeb, 0x25]),
}];

/// What the rig runs the outer QEMU with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TcgModule {
    /// A patched private copy, loaded by setting `QEMU_MODULE_DIR` to `dir`.
    Patched {
        /// Directory holding the patched [`MODULE_NAME`].
        dir: PathBuf,
        /// The build it was derived for.
        package: &'static str,
    },
    /// The host's own module, unpatched; aborts are retried.
    Unpatched {
        /// Why no patch was applied.
        reason: String,
    },
}

impl TcgModule {
    /// A one-line description for logs.
    pub fn describe(&self) -> String {
        match self {
            TcgModule::Patched { dir, package } => {
                format!("patched private copy of {MODULE_NAME} ({package}) in {}", dir.display())
            }
            TcgModule::Unpatched { reason } => {
                format!("unpatched host QEMU ({reason}); TCG aborts will be retried")
            }
        }
    }
}

/// Applies the patch for `build` to `module` (the unmodified bytes), or says why it does not fit.
pub fn patch_bytes(module: &[u8], build: &KnownBuild) -> Result<Vec<u8>, String> {
    for &(offset, bytes) in build.expected {
        match module.get(offset..offset + bytes.len()) {
            Some(found) if found == bytes => {}
            Some(found) => {
                return Err(format!("bytes at {offset:#x} are {found:02x?}, expected {bytes:02x?}"));
            }
            None => return Err(format!("module too short for offset {offset:#x}")),
        }
    }
    let (offset, bytes) = build.patch;
    let mut patched = module.to_vec();
    let target = patched.get_mut(offset..offset + bytes.len()).ok_or("patch range outside the module")?;
    target.copy_from_slice(bytes);
    Ok(patched)
}

/// Prepares the module for the outer QEMU: reads `source` (normally [`HOST_MODULE_DIR`]/[`MODULE_NAME`]), and
/// when its checksum is in `known` writes the patched copy into `private_dir` (replacing any earlier one).
/// Returns the source module's SHA-256 (or `None` if it is missing) and what to run with.
pub fn prepare_module(
    source: &Path,
    private_dir: &Path,
    known: &[KnownBuild],
) -> io::Result<(Option<String>, TcgModule)> {
    let module = match fs::read(source) {
        Ok(module) => module,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let reason = format!("{} not found", source.display());
            return Ok((None, TcgModule::Unpatched { reason }));
        }
        Err(error) => return Err(error),
    };
    let sha256 = sha256_hex(&module)?;
    let Some(build) = known.iter().find(|build| build.sha256 == sha256) else {
        let reason = format!("{} has sha256 {sha256}, which the patch was not derived for", source.display());
        return Ok((Some(sha256), TcgModule::Unpatched { reason }));
    };
    let patched = match patch_bytes(&module, build) {
        Ok(patched) => patched,
        Err(reason) => return Ok((Some(sha256), TcgModule::Unpatched { reason })),
    };
    fs::create_dir_all(private_dir)?;
    // Write beside and rename, so a QEMU that has the old copy mapped keeps a consistent file.
    let temporary = private_dir.join(format!(".{MODULE_NAME}.new"));
    fs::write(&temporary, &patched)?;
    fs::rename(&temporary, private_dir.join(MODULE_NAME))?;
    Ok((Some(sha256), TcgModule::Patched { dir: private_dir.to_owned(), package: build.package }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAKE_EXPECTED: &[(usize, &[u8])] = &[(2, &[0xaa, 0xbb]), (6, &[0xcc])];

    fn fake_build(sha256: &'static str) -> KnownBuild {
        KnownBuild { sha256, package: "fake", expected: FAKE_EXPECTED, patch: (2, &[0x11, 0x22, 0x33]) }
    }

    #[test]
    fn patches_only_when_every_expected_byte_matches() {
        let module = [0, 1, 0xaa, 0xbb, 4, 5, 0xcc, 7];
        let build = fake_build("unused");
        assert_eq!(patch_bytes(&module, &build).unwrap(), [0, 1, 0x11, 0x22, 0x33, 5, 0xcc, 7]);
        let mut wrong = module;
        wrong[6] = 0xcd;
        assert!(patch_bytes(&wrong, &build).unwrap_err().contains("0x6"));
        assert!(patch_bytes(&module[..5], &build).unwrap_err().contains("too short"));
    }

    #[test]
    fn the_known_patch_stays_inside_the_checked_bytes() {
        for build in KNOWN_BUILDS {
            let (offset, bytes) = build.patch;
            let covered = build
                .expected
                .iter()
                .any(|&(start, expected)| start <= offset && offset + bytes.len() <= start + expected.len());
            assert!(covered, "{}: the patch overwrites bytes it did not check", build.package);
            assert_eq!(build.sha256.len(), 64);
            // The short jump lands on the instruction after the OR it makes atomic (0x2868 + 6).
            let jump_end = offset + bytes.len();
            assert_eq!(jump_end + usize::from(bytes[bytes.len() - 1]), 0x286e);
        }
    }

    #[test]
    fn writes_a_private_copy_only_for_a_known_checksum() {
        let dir = std::env::temp_dir().join(format!("rig-tcg-patch-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let source = dir.join("module.so");
        let module = [0u8, 1, 0xaa, 0xbb, 4, 5, 0xcc, 7];
        fs::write(&source, module).unwrap();
        let private = dir.join("private");

        let (sha, outcome) = prepare_module(&source, &private, &[fake_build("0000")]).unwrap();
        assert!(matches!(outcome, TcgModule::Unpatched { .. }), "{outcome:?}");
        assert!(!private.exists());

        let sha = sha.unwrap();
        let known: &'static str = Box::leak(sha.clone().into_boxed_str());
        let (_, outcome) = prepare_module(&source, &private, &[fake_build(known)]).unwrap();
        assert_eq!(outcome, TcgModule::Patched { dir: private.clone(), package: "fake" });
        assert_eq!(fs::read(private.join(MODULE_NAME)).unwrap(), [0, 1, 0x11, 0x22, 0x33, 5, 0xcc, 7]);
        assert_eq!(fs::read(&source).unwrap(), module, "the source must stay untouched");

        let (sha, outcome) = prepare_module(&dir.join("absent.so"), &private, KNOWN_BUILDS).unwrap();
        assert!(sha.is_none() && matches!(outcome, TcgModule::Unpatched { .. }));
        fs::remove_dir_all(&dir).unwrap();
    }
}
