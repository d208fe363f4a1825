//! What the rig needs from the machine it runs on, and the small host commands it uses: free disk, the Debian
//! mirror the host's apt uses, installing missing tools with apt, reaching the mirror, SHA-256 of a byte string.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// SHA-256 of `bytes` as lower-case hex, computed by coreutils' `sha256sum`.
pub fn sha256_hex(bytes: &[u8]) -> io::Result<String> {
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // Write from a thread so a large input cannot deadlock against sha256sum's output.
    let input = bytes.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output()?;
    writer.join().map_err(|_| io::Error::other("sha256sum writer panicked"))??;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.split_whitespace().next() {
        Some(hex) if output.status.success() && hex.len() == 64 => Ok(hex.to_owned()),
        _ => Err(io::Error::other(format!("sha256sum failed: {}", output.status))),
    }
}

/// Free bytes on the file system holding `path` (or its nearest existing ancestor), from `df`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let mut existing = path;
    while !existing.exists() {
        existing = existing.parent().ok_or_else(|| io::Error::other("no existing ancestor"))?;
    }
    let output = Command::new("df").args(["-Pk", "--"]).arg(existing).output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_df_available_kib(&text)
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other(format!("cannot read df's output: {text:?}")))
}

/// The "Available" column (KiB) of `df -Pk` output's data line.
fn parse_df_available_kib(text: &str) -> Option<u64> {
    text.lines().nth(1)?.split_whitespace().nth(3)?.parse().ok()
}

/// Whether `program` is an executable on `PATH` (or in the sbin directories, which a non-login root shell
/// may lack on PATH).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The Debian mirror URL the host's apt is configured with: the first `URIs:` (deb822) or `deb` line whose URL
/// ends in `/debian` (so not the security archive).
pub fn host_debian_mirror() -> Option<String> {
    let mut texts = Vec::new();
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = entries.filter_map(|entry| entry.ok().map(|entry| entry.path())).collect();
        paths.sort();
        texts.extend(paths.iter().filter_map(|path| fs::read_to_string(path).ok()));
    }
    texts.extend(fs::read_to_string("/etc/apt/sources.list").ok());
    texts.iter().find_map(|text| mirror_from_sources(text))
}

/// The first Debian archive URL in one apt sources file (either format).
fn mirror_from_sources(text: &str) -> Option<String> {
    text.lines().map(str::trim).filter(|line| !line.starts_with('#')).find_map(|line| {
        let urls: Vec<&str> = if let Some(rest) = line.strip_prefix("URIs:") {
            rest.split_whitespace().collect()
        } else if let Some(rest) = line.strip_prefix("deb ") {
            // Skip an options block "[key=value ...]".
            let rest = rest.trim_start();
            let rest = match rest.strip_prefix('[') {
                Some(options) => options.split_once(']').map_or("", |(_, after)| after),
                None => rest,
            };
            rest.split_whitespace().take(1).collect()
        } else {
            Vec::new()
        };
        urls.into_iter()
            .find(|url| url.trim_end_matches('/').ends_with("/debian"))
            .map(|url| url.trim_end_matches('/').to_owned())
    })
}

/// Installs the Debian packages that provide the missing `programs` (pairs of program and package) with
/// apt-get, refreshing the package lists once if the first attempt fails. Returns why when it cannot.
pub fn ensure_programs(programs: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> =
        programs.iter().filter(|(program, _)| find_program(program).is_none()).map(|&(_, package)| package).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if find_program("apt-get").is_none() {
        return Err(format!("{} missing and there is no apt-get to install it", missing.join(", ")));
    }
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
    };
    let describe = |output: io::Result<std::process::Output>| match output {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(last_line(&output.stderr).unwrap_or_else(|| output.status.to_string())),
        Err(error) => Err(error.to_string()),
    };
    if describe(install()).is_ok() {
        return Ok(());
    }
    let update = Command::new("apt-get").args(["update", "-q"]).stdin(Stdio::null()).output();
    describe(update).map_err(|why| format!("apt-get update failed: {why}"))?;
    describe(install()).map_err(|why| format!("apt-get install {} failed: {why}", missing.join(" ")))
}

/// The last non-empty line of a command's output, for error messages.
pub fn last_line(output: &[u8]) -> Option<String> {
    String::from_utf8_lossy(output).lines().rev().map(str::trim).find(|line| !line.is_empty()).map(str::to_owned)
}

/// Whether `url` answers, checked with wget (debootstrap's own downloader) with a short timeout.
pub fn url_reachable(url: &str) -> Result<(), String> {
    let output = Command::new("wget")
        .args(["-q", "--spider", "--tries=2", "--timeout=20", url])
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("cannot run wget: {error}"))?;
    if output.status.success() { Ok(()) } else { Err(format!("{url} did not answer (wget: {})", output.status)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_like_the_standard_test_vectors() {
        assert_eq!(sha256_hex(b"abc").unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(sha256_hex(b"").unwrap(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    #[test]
    fn reads_dfs_available_column() {
        let text = "Filesystem     1024-blocks      Used Available Capacity Mounted on\n/dev/vda  263174212 13000000 82000000  15% /\n";
        assert_eq!(parse_df_available_kib(text), Some(82_000_000));
        assert!(free_bytes(Path::new("/definitely/not/here")).unwrap() > 0);
    }

    #[test]
    fn finds_the_debian_archive_in_both_source_formats() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\n";
        assert_eq!(mirror_from_sources(deb822).as_deref(), Some("http://mirror.example/debian"));
        let classic = "# deb http://old.example/debian bookworm main\n\
                       deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ bookworm main\n";
        assert_eq!(mirror_from_sources(classic).as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(mirror_from_sources("URIs: http://mirror.example/debian-security\n"), None);
    }

    #[test]
    fn takes_the_last_nonempty_line() {
        assert_eq!(last_line(b"a\nE: broken\n\n").as_deref(), Some("E: broken"));
        assert_eq!(last_line(b"\n \n"), None);
    }
}
