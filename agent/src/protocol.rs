//! The host ↔ agent control protocol, version [`PROTOCOL_VERSION`].
//!
//! One control stream per instance (vsock port [`CONTROL_PORT`] in a VM, a Unix socket in the
//! process sandbox) carries newline-delimited JSON messages: small, debuggable with `socat`, and
//! versioned by the first message each side sends ([`HostMessage::Hello`] /
//! [`AgentMessage::Hello`]). Function traffic never goes through it: each request is its own
//! stream to port [`FUNCTION_PORT`], bridged by the agent to 127.0.0.1:9000 in the guest.
//! Unknown fields and message types are refused, so a mismatched peer fails loudly.

use std::io::{self, BufRead, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Bumped on any incompatible change of the messages below.
pub const PROTOCOL_VERSION: u32 = 3;
/// The agent listens for the host's control connection on this port.
pub const CONTROL_PORT: u32 = 1024;
/// The function's HTTP port: host streams to it are bridged to 127.0.0.1:9000 in the guest.
pub const FUNCTION_PORT: u32 = 9000;
/// How long the user's server has to listen on [`FUNCTION_PORT`].
pub const READY_TIMEOUT_MS: u64 = 30_000;
/// The exact message of a start that never listened (the cloud function contract).
pub const NOT_LISTENING_MESSAGE: &str = "The request timed out in 30000ms.Please confirm your http server have enabled listening on port 9000.";
/// No single message may exceed this; a longer line is a protocol error, not an allocation.
pub const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// From the host to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// First message on a control stream.
    Hello { version: u32 },
    /// Start the user's function.
    Start(StartSpec),
    /// Stop the function: SIGTERM, then SIGKILL after `grace_ms`.
    Stop { grace_ms: u64 },
    /// After a snapshot restore: reseed the guest RNG and step the clock.
    Refresh {
        /// Host entropy, hex encoded, to credit to the guest RNG.
        entropy_hex: String,
        /// Host wall-clock time.
        unix_time_ns: u64,
    },
    /// Asks for the agent's clock ([`AgentMessage::Pong`]): the host measures how far the
    /// guest's clock is from its own, to place log stamps on its own time line.
    Ping { seq: u64 },
}

/// What to run and how: the image config merged with the function's settings by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartSpec {
    /// argv\[0\] and its arguments (function command/args override Entrypoint/Cmd).
    pub argv: Vec<String>,
    /// `KEY=VALUE`, in order: image Env, built-in variables, function env (last wins).
    pub env: Vec<String>,
    /// Working directory inside the rootfs ("/" if the image names none).
    pub working_dir: String,
    /// The image's `User` (`name`, `uid`, `uid:gid`, `name:group`), resolved in the rootfs.
    pub user: Option<String>,
    /// How long the server has to listen on port 9000.
    pub ready_timeout_ms: u64,
    /// The function's /etc/resolv.conf, written into its root before it starts (functions
    /// with a network); the image's own stays when None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolv_conf: Option<String>,
}

/// A process-sandbox agent's disks: one JSON line the host writes on the agent's standard
/// input, then closes. The agent binds its ports and waits for it before it mounts the rootfs,
/// so the host can start the agent first and pick the disks while it comes up (or keep a
/// standby sandbox whose function is not known yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// The read-only rootfs image's block device (ext4 or erofs).
    pub rootfs: String,
    /// The writable layer's block device (ext4), unless the agent's command line named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable: Option<String>,
}

/// Which output stream a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// From the agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentMessage {
    /// First message on a control stream.
    Hello {
        version: u32,
        /// The agent's own version string.
        agent: String,
        /// Guest uptime when the agent answered, in milliseconds.
        uptime_ms: u64,
    },
    /// One line the function printed (without its newline), stamped in the guest when the
    /// agent read it, in microseconds (the time users see; attribution goes by
    /// [`AgentMessage::Request`], which needs no clock).
    Log {
        stream: LogStream,
        unix_time_us: u64,
        line: String,
    },
    /// Something accepts connections on port 9000: the instance can serve, `after_ms` after the
    /// function was started, and the same in `after_us` (a start phase of a few milliseconds
    /// wants more than whole milliseconds; an older agent, such as one in an older snapshot,
    /// sends none).
    Ready {
        after_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after_us: Option<u64>,
    },
    /// A request carrying this `X-Scf-Request-Id` is about to reach the function. Everything
    /// the function printed before is sent ahead of this message; every line after it, until
    /// the next one, was read while this was the latest request. With requests one at a time
    /// that places each line exactly, on any clock.
    Request { id: String },
    /// The function could not start or never listened; `message` is what the caller sees.
    StartFailed {
        message: String,
        last_lines: Vec<String>,
    },
    /// The function's main process ended.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
    },
    /// Acknowledges [`HostMessage::Refresh`].
    Refreshed,
    /// Answers [`HostMessage::Ping`] with the guest's wall-clock time when it was read.
    Pong { seq: u64, unix_time_us: u64 },
    /// A request the agent could not carry out (bad spec, wrong state); the stream stays usable.
    Error { message: String },
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Reading or writing the control stream failed.
    #[error("control stream I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A control message is longer than the protocol allows.
    #[error("control message longer than {MAX_MESSAGE_BYTES} bytes")]
    TooLong,
    /// A control message does not parse as a message of the protocol.
    #[error("malformed control message {line:?}: {source}")]
    Malformed {
        line: String,
        source: serde_json::Error,
    },
    /// The other side speaks a different protocol version.
    #[error("peer speaks protocol version {peer}, this side speaks {PROTOCOL_VERSION}")]
    Version { peer: u32 },
}

/// Writes one message as a JSON line and flushes it.
pub fn write_message<W: Write, M: Serialize>(
    out: &mut W,
    message: &M,
) -> Result<(), ProtocolError> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::from)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()?;
    Ok(())
}

/// Reads the next message; `Ok(None)` at a clean end of stream. Memory is bounded by
/// [`MAX_MESSAGE_BYTES`] whatever the peer sends.
pub fn read_message<R: BufRead, M: DeserializeOwned>(
    input: &mut R,
) -> Result<Option<M>, ProtocolError> {
    let mut line = Vec::new();
    loop {
        let available = match input.fill_buf() {
            Ok(a) => a,
            // A signal arrived during the read (a handler without SA_RESTART): nothing was
            // read; the message goes on.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if available.is_empty() {
            return if line.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "control stream ended mid-message",
                )
                .into())
            };
        }
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..end], Some(end + 1)),
            None => (available, None),
        };
        if line.len() + chunk.len() > MAX_MESSAGE_BYTES {
            return Err(ProtocolError::TooLong);
        }
        line.extend_from_slice(chunk);
        let consumed = done.unwrap_or(chunk.len());
        input.consume(consumed);
        if done.is_some() {
            break;
        }
    }
    serde_json::from_slice(&line)
        .map(Some)
        .map_err(|source| ProtocolError::Malformed {
            line: String::from_utf8_lossy(&line).chars().take(200).collect(),
            source,
        })
}

/// Checks the version a peer announced in its Hello.
pub fn check_version(peer: u32) -> Result<(), ProtocolError> {
    if peer == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(ProtocolError::Version { peer })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn messages_round_trip_as_json_lines() {
        let start = HostMessage::Start(StartSpec {
            argv: vec!["/bin/httpd".into(), "-f".into()],
            env: vec!["USER=qcloud".into()],
            working_dir: "/".into(),
            user: None,
            ready_timeout_ms: READY_TIMEOUT_MS,
            resolv_conf: None,
        });
        let mut wire = Vec::new();
        write_message(
            &mut wire,
            &HostMessage::Hello {
                version: PROTOCOL_VERSION,
            },
        )
        .unwrap();
        write_message(&mut wire, &start).unwrap();
        let mut input = Cursor::new(wire);
        let first: HostMessage = read_message(&mut input).unwrap().unwrap();
        assert_eq!(
            first,
            HostMessage::Hello {
                version: PROTOCOL_VERSION
            }
        );
        let second: HostMessage = read_message(&mut input).unwrap().unwrap();
        assert_eq!(second, start);
        assert!(read_message::<_, HostMessage>(&mut input)
            .unwrap()
            .is_none());
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        let mut unknown = Cursor::new(b"{\"type\":\"format_disk\"}\n".to_vec());
        assert!(matches!(
            read_message::<_, HostMessage>(&mut unknown),
            Err(ProtocolError::Malformed { .. })
        ));
        let mut extra = Cursor::new(b"{\"type\":\"hello\",\"version\":1,\"x\":2}\n".to_vec());
        assert!(read_message::<_, HostMessage>(&mut extra).is_err());
        let mut long = Cursor::new(vec![b'a'; MAX_MESSAGE_BYTES + 10]);
        assert!(matches!(
            read_message::<_, AgentMessage>(&mut long),
            Err(ProtocolError::TooLong)
        ));
        let mut cut = Cursor::new(b"{\"type\":\"ready\"".to_vec());
        assert!(read_message::<_, AgentMessage>(&mut cut).is_err());
        // Agents of earlier protocols (millisecond log stamps; no Request messages, so the
        // host would attribute nothing) are refused by name.
        for old in [1, 2] {
            assert!(matches!(
                check_version(old),
                Err(ProtocolError::Version { peer }) if peer == old
            ));
        }
    }

    #[test]
    fn a_read_interrupted_by_a_signal_goes_on() {
        /// Fails every other read with EINTR, as a read does when a signal handler without
        /// SA_RESTART runs meanwhile.
        struct Interrupting {
            data: Cursor<Vec<u8>>,
            interrupt: bool,
        }
        impl io::Read for Interrupting {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.interrupt = !self.interrupt;
                if self.interrupt {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let n = buf.len().min(3);
                self.data.read(&mut buf[..n])
            }
        }
        let mut wire = Vec::new();
        write_message(
            &mut wire,
            &AgentMessage::Ready {
                after_ms: 7,
                after_us: Some(7_250),
            },
        )
        .unwrap();
        let mut input = io::BufReader::with_capacity(
            4,
            Interrupting {
                data: Cursor::new(wire),
                interrupt: false,
            },
        );
        assert_eq!(
            read_message::<_, AgentMessage>(&mut input).unwrap(),
            Some(AgentMessage::Ready {
                after_ms: 7,
                after_us: Some(7_250)
            })
        );
        assert!(read_message::<_, AgentMessage>(&mut input)
            .unwrap()
            .is_none());
    }
}
