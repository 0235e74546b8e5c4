//! The VMM's API: JSON lines over a Unix stream socket (`fnvm-vmm --api-sock PATH`), one
//! request per line, one reply line each. This module is the wire format and its codec, shared
//! by the running VM's server ([`server`], in the event loop), the standby VMM
//! ([`crate::standby`]) and fnvm's client; [`handle`] is the in-process front end.
//!
//! ```text
//! → {"op":"pause"}                     ← {"ok":true}
//! → {"op":"snapshot","dir":"/x/snap"}  ← {"ok":true,"snapshot_ms":12.3}
//! → {"op":"resume"}                    ← {"ok":true}
//! → {"op":"metrics"}                   ← {"ok":true,"paused":false,"restore":{...}}
//! → {"op":"restore","dir":"/x/snap","disks":["/x/copy.img"],"vsock":"/x/v.sock",
//!    "net":"/x/passt.sock"}            ← {"ok":true,"restore_ms":0.4} (standby VMM only)
//! anything else                        ← {"ok":false,"error":"..."}
//! ```
//! `snapshot` on a running VM pauses it for the snapshot and resumes it afterwards.

pub mod handle;
pub mod server;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vstate::vcpu::first_io::FirstIoRecord;

/// Longest request line accepted.
pub const MAX_LINE: usize = 64 * 1024;

/// A request to the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Pause,
    Resume,
    Snapshot {
        dir: PathBuf,
    },
    Metrics,
    /// Only for a standby VMM (`fnvm-vmm --standby`, see [`crate::standby`]): become the VM
    /// saved in `dir`, with `disks` as the backing files of its disks in slot order and
    /// `vsock` as its vsock device's new socket path, `net` as its network device's new passt
    /// socket.
    Restore {
        dir: PathBuf,
        #[serde(default)]
        disks: Vec<PathBuf>,
        #[serde(default)]
        vsock: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        net: Option<PathBuf>,
        /// The directories its jail holds ([`crate::confine::Jail`]; empty: as the standby
        /// was started).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        jail: Vec<PathBuf>,
    },
    /// Test only, refused unless the VMM was started with `FNVM_VMM_TEST_TRIGGERS=1`: the
    /// VMM thread makes a system call no filter allows ([`crate::confine::violation`]).
    ForbiddenSyscall,
}

/// How a restored VM came back: when it resumed and its first I/O (times since the VMM
/// process started).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreMetrics {
    pub resumed_us: u64,
    pub first_io: Option<FirstIoRecord>,
}

impl std::fmt::Display for RestoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1000.0;
        write!(f, "restored, resumed at {:.2} ms", ms(self.resumed_us))?;
        match self.first_io {
            Some(io) => write!(
                f,
                "; first guest I/O at {:.2} ms after {} minor + {} major page faults",
                ms(io.at_us),
                io.minor_faults,
                io.major_faults
            ),
            None => write!(f, "; no guest I/O yet"),
        }
    }
}

/// The reply to a [`Request`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub paused: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub snapshot_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub restore: Option<RestoreMetrics>,
    /// A standby VMM's `restore`: request received → VM state restored, vCPUs about to run.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub restore_ms: Option<f64>,
}

impl Response {
    pub fn ok() -> Self {
        Response {
            ok: true,
            ..Default::default()
        }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        }
    }
}

/// One request line, trimmed: None for a blank line, else the request or why it does not
/// parse.
pub fn decode_request(line: &[u8]) -> Option<Result<Request, DecodeError>> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    Some(
        serde_json::from_str::<Request>(text).map_err(|source| DecodeError {
            line: text.to_string(),
            source,
        }),
    )
}

/// A request line that is not a request.
#[derive(Debug, thiserror::Error)]
#[error("bad request {line:?}: {source}")]
pub struct DecodeError {
    /// The line as received, trimmed.
    pub line: String,
    pub source: serde_json::Error,
}

/// A reply as it goes on the wire: one JSON line.
pub fn encode_response(response: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(response).unwrap_or_default();
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restore_line_may_name_the_passt_socket_and_the_jail() {
        let request = Request::Restore {
            dir: "/s".into(),
            disks: vec!["/d".into()],
            vsock: Some("/v".into()),
            net: Some("/n.sock".into()),
            jail: vec!["/i".into()],
        };
        let line = serde_json::to_string(&request).unwrap();
        assert!(line.contains(r#""net":"/n.sock""#), "{line}");
        assert!(line.contains(r#""jail":["/i"]"#), "{line}");
        assert_eq!(decode_request(line.as_bytes()).unwrap().unwrap(), request);
        let without = br#"{"op":"restore","dir":"/s"}"#;
        assert!(matches!(
            decode_request(without).unwrap().unwrap(),
            Request::Restore { net: None, ref jail, .. } if jail.is_empty()
        ));
        assert!(decode_request(br#"{"op":"restore","dir":"/s","net":5}"#)
            .unwrap()
            .is_err());
    }
}
