//! The on-disk snapshot format: one state file (`DIR/snapshot`) holding a versioned header and
//! the serialised VM state, next to the raw guest memory file (`DIR/memory`).
//!
//! ```text
//! fnvm-snapshot <format version>\n      magic and format version, readable by any version
//! <header JSON>\n                        Header: vmm version, host identity, memory, state length
//! <sha256 hex of the header JSON>\n      a flipped bit in the header is caught before use
//! <state bytes>                          JSON of the VM state, `state_len` bytes, `state_sha256`
//! ```
//!
//! Everything is checked before anything is used: a snapshot from another format or vmm
//! version, another CPU or kernel, or with a truncated or altered byte is refused with an error
//! that names what differs.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The first bytes of every snapshot state file.
pub const MAGIC: &str = "fnvm-snapshot";
/// Bumped whenever the layout or the meaning of the state changes.
/// (3: KVM's plain-data structs are hex strings, see [`super::kvm_hex`]; 4: virtio-net
/// devices, [`crate::devices::virtio::net::persist::NetState`].)
pub const FORMAT_VERSION: u32 = 4;
/// The vmm build that writes and accepts snapshots.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why a snapshot's state file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The state file is not an fnvm snapshot.
    #[error("not an fnvm snapshot (the state file does not start with {MAGIC:?})")]
    NotASnapshot,
    /// The snapshot uses a format version this fnvm-vmm does not read.
    #[error("snapshot format version {found}; this fnvm-vmm reads version {FORMAT_VERSION} only")]
    FormatVersion { found: String },
    /// The state file ends too early.
    #[error("snapshot state file is truncated ({0})")]
    Truncated(&'static str),
    /// The snapshot header is corrupted (its checksum does not match).
    #[error("snapshot header is corrupted (its checksum does not match)")]
    HeaderChecksum,
    /// The snapshot header does not parse.
    #[error("snapshot header is unreadable: {0}")]
    HeaderParse(String),
    /// The snapshot was made by another fnvm-vmm version, and only that version restores it.
    #[error(
        "snapshot was made by fnvm-vmm {found}; this is fnvm-vmm {VMM_VERSION} \
         (snapshots are only restored by the version that made them)"
    )]
    VmmVersion { found: String },
    /// The snapshot was made on a host that differs from this one.
    #[error("snapshot was made on another host: {0}")]
    HostMismatch(String),
    /// The snapshot state's length differs from the length its header says.
    #[error("snapshot state is {actual} bytes, its header says {expected}")]
    StateLength { expected: u64, actual: u64 },
    /// The snapshot state is corrupted (its sha256 differs from its header's).
    #[error("snapshot state is corrupted (sha256 {actual}, its header says {expected})")]
    StateChecksum { expected: String, actual: String },
}

/// What must be equal on the restoring host for the saved CPU and KVM state to mean the same
/// thing there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIdentity {
    /// CPUID leaf 0 vendor string, e.g. "GenuineIntel".
    pub cpu_vendor: String,
    /// CPUID leaf 1 display family, model and stepping.
    pub cpu_family: u32,
    pub cpu_model: u32,
    pub cpu_stepping: u32,
    /// KVM_GET_API_VERSION.
    pub kvm_api_version: i32,
    /// uname release of the host kernel (KVM's behaviour is the kernel's).
    pub kernel_release: String,
}

impl HostIdentity {
    /// Lists every field that differs from `other` (the host we are on), or None.
    pub fn differences(&self, here: &HostIdentity) -> Option<String> {
        let mut diffs = Vec::new();
        let mut cmp = |what: &str, saved: String, now: String| {
            if saved != now {
                diffs.push(format!("{what} {saved} (snapshot) vs {now} (this host)"));
            }
        };
        cmp(
            "CPU vendor",
            self.cpu_vendor.clone(),
            here.cpu_vendor.clone(),
        );
        cmp(
            "CPU family/model/stepping",
            format!(
                "{:#x}/{:#x}/{}",
                self.cpu_family, self.cpu_model, self.cpu_stepping
            ),
            format!(
                "{:#x}/{:#x}/{}",
                here.cpu_family, here.cpu_model, here.cpu_stepping
            ),
        );
        cmp(
            "KVM API version",
            self.kvm_api_version.to_string(),
            here.kvm_api_version.to_string(),
        );
        cmp(
            "kernel",
            self.kernel_release.clone(),
            here.kernel_release.clone(),
        );
        (!diffs.is_empty()).then(|| diffs.join("; "))
    }
}

/// Identity of a file's contents as the kernel sees it: any write, truncation or replacement
/// changes it (ctime cannot be set from user space).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            ctime_ns: meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
        }
    }
}

/// The guest memory file: its size, a content hash and the stamp it had when hashed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    pub size: u64,
    /// sha256 over (page index, page bytes) of every page that is not all zero, in order, so
    /// the hash does not depend on which zero ranges are holes in the file.
    pub sha256: String,
    /// The memory file's stamp right after it was written (and hashed).
    pub stamp: FileStamp,
    /// The host boot (`/proc/sys/kernel/random/boot_id`) that wrote the memory file. It is not
    /// fsynced (that would cost more than hashing it); the stamp is trusted only within the
    /// same boot, and the first load after a reboot (or a crash) checks the whole hash again.
    pub boot_id: String,
}

/// This host boot's id, or "" when the kernel does not say (then stamps are never trusted).
/// Read once per process (a jailed VMM reads it before its root is swapped, see
/// [`crate::confine::jail`]).
pub fn current_boot_id() -> String {
    static BOOT_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        })
        .clone()
}

/// Everything before the state bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub vmm_version: String,
    pub host: HostIdentity,
    pub memory: MemoryInfo,
    pub state_len: u64,
    pub state_sha256: String,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The whole state file for `header` (whose `state_len`/`state_sha256` are filled in here)
/// and `state`.
pub fn encode(mut header: Header, state: &[u8]) -> Vec<u8> {
    header.state_len = state.len() as u64;
    header.state_sha256 = sha256_hex(state);
    let json = serde_json::to_string(&header).expect("a header always serialises");
    let mut out = Vec::with_capacity(state.len() + json.len() + 128);
    out.extend_from_slice(format!("{MAGIC} {FORMAT_VERSION}\n").as_bytes());
    out.extend_from_slice(json.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(sha256_hex(json.as_bytes()).as_bytes());
    out.push(b'\n');
    out.extend_from_slice(state);
    out
}

fn take_line<'a>(bytes: &mut &'a [u8], what: &'static str) -> Result<&'a [u8], FormatError> {
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(FormatError::Truncated(what))?;
    let line = &bytes[..end];
    *bytes = &bytes[end + 1..];
    Ok(line)
}

/// Checks magic, format version and header checksum, and returns the header with the state
/// bytes (whose length and checksum are checked too). Host and vmm version are checked by
/// [`check_compatible`], so tools can still read an incompatible snapshot's header.
pub fn decode(file: &[u8]) -> Result<(Header, &[u8]), FormatError> {
    let mut rest = file;
    if !rest.starts_with(MAGIC.as_bytes()) {
        return Err(FormatError::NotASnapshot);
    }
    let first = take_line(&mut rest, "no end to the first line")?;
    let version = std::str::from_utf8(&first[MAGIC.len()..])
        .map(str::trim)
        .unwrap_or("?");
    if version != FORMAT_VERSION.to_string() {
        return Err(FormatError::FormatVersion {
            found: version.chars().take(32).collect(),
        });
    }
    let json = take_line(&mut rest, "header cut off")?;
    let sum = take_line(&mut rest, "header checksum cut off")?;
    if sum != sha256_hex(json).as_bytes() {
        return Err(FormatError::HeaderChecksum);
    }
    let header: Header =
        serde_json::from_slice(json).map_err(|e| FormatError::HeaderParse(e.to_string()))?;
    if rest.len() as u64 != header.state_len {
        return Err(FormatError::StateLength {
            expected: header.state_len,
            actual: rest.len() as u64,
        });
    }
    let actual = sha256_hex(rest);
    if actual != header.state_sha256 {
        return Err(FormatError::StateChecksum {
            expected: header.state_sha256.clone(),
            actual,
        });
    }
    Ok((header, rest))
}

/// Refuses a snapshot made by another vmm version or on a host that differs from `here`.
pub fn check_compatible(header: &Header, here: &HostIdentity) -> Result<(), FormatError> {
    if header.vmm_version != VMM_VERSION {
        return Err(FormatError::VmmVersion {
            found: header.vmm_version.clone(),
        });
    }
    if let Some(diff) = header.host.differences(here) {
        return Err(FormatError::HostMismatch(diff));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostIdentity {
        HostIdentity {
            cpu_vendor: "GenuineIntel".into(),
            cpu_family: 6,
            cpu_model: 0x55,
            cpu_stepping: 7,
            kvm_api_version: 12,
            kernel_release: "6.1.0".into(),
        }
    }

    fn header() -> Header {
        Header {
            vmm_version: VMM_VERSION.into(),
            host: host(),
            memory: MemoryInfo {
                size: 1 << 20,
                sha256: "00".repeat(32),
                boot_id: "b".into(),
                stamp: FileStamp {
                    dev: 1,
                    ino: 2,
                    size: 1 << 20,
                    mtime_ns: 3,
                    ctime_ns: 4,
                },
            },
            state_len: 0,
            state_sha256: String::new(),
        }
    }

    #[test]
    fn header_and_state_round_trip() {
        let file = encode(header(), b"{\"state\":1}");
        let (h, state) = decode(&file).unwrap();
        assert_eq!(state, b"{\"state\":1}");
        assert_eq!(h.state_len, 11);
        assert_eq!(h.memory, header().memory);
        check_compatible(&h, &host()).unwrap();
    }

    #[test]
    fn every_truncation_is_refused() {
        let file = encode(header(), b"some state bytes");
        for len in 0..file.len() {
            assert!(decode(&file[..len]).is_err(), "cut at {len} accepted");
        }
    }

    #[test]
    fn every_single_bit_flip_is_refused() {
        let file = encode(header(), b"some state bytes");
        for i in 0..file.len() {
            for bit in 0..8 {
                let mut bad = file.clone();
                bad[i] ^= 1 << bit;
                assert!(
                    decode(&bad).is_err(),
                    "flip of bit {bit} at byte {i} accepted"
                );
            }
        }
    }

    #[test]
    fn state_checksum_and_length_are_named() {
        let mut file = encode(header(), b"state");
        let n = file.len();
        file[n - 1] ^= 0x20;
        assert!(matches!(
            decode(&file),
            Err(FormatError::StateChecksum { .. })
        ));
        let file = encode(header(), b"state");
        let err = decode(&file[..file.len() - 2]).unwrap_err();
        assert_eq!(
            err,
            FormatError::StateLength {
                expected: 5,
                actual: 3
            }
        );
    }

    #[test]
    fn other_format_version_is_refused_by_number() {
        let file = encode(header(), b"x");
        let text = String::from_utf8(file).unwrap();
        let other = text.replacen(
            &format!("{MAGIC} {FORMAT_VERSION}"),
            &format!("{MAGIC} 99"),
            1,
        );
        let err = decode(other.as_bytes()).unwrap_err();
        assert_eq!(err, FormatError::FormatVersion { found: "99".into() });
        assert!(err.to_string().contains("version 99"), "{err}");
        assert_eq!(decode(b"ELF..."), Err(FormatError::NotASnapshot));
    }

    #[test]
    fn other_vmm_version_or_host_is_refused_naming_the_difference() {
        let mut h = header();
        h.vmm_version = "0.0.1-old".into();
        let err = check_compatible(&h, &host()).unwrap_err();
        assert!(err.to_string().contains("fnvm-vmm 0.0.1-old"), "{err}");
        let mut other = host();
        other.kernel_release = "6.9.0".into();
        other.cpu_model = 0x8f;
        let err = check_compatible(&header(), &other).unwrap_err().to_string();
        assert!(
            err.contains("kernel 6.1.0 (snapshot) vs 6.9.0 (this host)"),
            "{err}"
        );
        assert!(err.contains("CPU family/model/stepping"), "{err}");
    }
}
