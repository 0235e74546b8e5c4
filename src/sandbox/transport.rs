//! Host-side streams to a guest port: "a byte stream to guest port P", whatever the sandbox.
//!
//! - VM: the vsock device's Unix socket; the host writes `CONNECT <P>\n` and reads
//!   `OK <hostport>\n` (Firecracker's convention), then raw bytes follow.
//! - Process sandbox: the agent listens on `<dir>/<P>.sock`; no handshake.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the VMM may take to answer `CONNECT`: it answers once the guest accepted or refused.
pub const VSOCK_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest handshake reply we accept ("OK 4294967295\n" is 14 bytes).
const MAX_REPLY_BYTES: usize = 32;

/// Where the host reaches an instance's guest ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTransport {
    /// The vsock device's host Unix socket (`<instance_dir>/vsock.sock`).
    Vsock { uds: PathBuf },
    /// The directory in which the agent listens on `<port>.sock`.
    Unix { dir: PathBuf },
}

impl HostTransport {
    /// A fresh stream to guest port `port`, ready for raw bytes.
    pub fn connect(&self, port: u32) -> io::Result<UnixStream> {
        match self {
            HostTransport::Unix { dir } => {
                let path = unix_port_path(dir, port);
                UnixStream::connect(&path).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot connect to guest port {port} at {}: {e}",
                            path.display()
                        ),
                    )
                })
            }
            HostTransport::Vsock { uds } => {
                let mut stream = UnixStream::connect(uds).map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot connect to the VM's vsock socket {}: {e}",
                            uds.display()
                        ),
                    )
                })?;
                vsock_handshake(&mut stream, port)?;
                Ok(stream)
            }
        }
    }
}

impl HostTransport {
    /// The Unix socket that is guest port `port` with no handshake (process sandbox), if any.
    pub fn port_socket(&self, port: u32) -> Option<PathBuf> {
        match self {
            HostTransport::Unix { dir } => Some(unix_port_path(dir, port)),
            HostTransport::Vsock { .. } => None,
        }
    }
}

/// The socket on which the agent of a process sandbox listens for guest port `port`.
pub fn unix_port_path(dir: &Path, port: u32) -> PathBuf {
    dir.join(format!("{port}.sock"))
}

/// Sends `CONNECT <port>\n` and waits (bounded) for `OK <hostport>\n`. Reads byte by byte so
/// not one byte of the stream after the reply is consumed.
fn vsock_handshake(stream: &mut UnixStream, port: u32) -> io::Result<()> {
    stream.set_read_timeout(Some(VSOCK_HANDSHAKE_TIMEOUT))?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut reply = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!(
                        "guest port {port} refused the vsock connection (the VMM closed the \
                         stream{})",
                        if reply.is_empty() {
                            String::new()
                        } else {
                            format!(" after {:?}", String::from_utf8_lossy(&reply))
                        }
                    ),
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                reply.push(byte[0]);
                if reply.len() > MAX_REPLY_BYTES {
                    return Err(bad_reply(port, &reply));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the VMM did not answer CONNECT {port} within {} s",
                        VSOCK_HANDSHAKE_TIMEOUT.as_secs()
                    ),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    parse_ok_reply(&reply).ok_or_else(|| bad_reply(port, &reply))?;
    stream.set_read_timeout(None)?;
    Ok(())
}

fn bad_reply(port: u32, reply: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "unexpected vsock handshake reply to CONNECT {port}: {:?} (expected \"OK <port>\")",
            String::from_utf8_lossy(reply)
        ),
    )
}

/// The host port of an `OK <hostport>` reply line (without its newline).
fn parse_ok_reply(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text.strip_prefix("OK ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    #[test]
    fn ok_replies_are_parsed_strictly() {
        assert_eq!(parse_ok_reply(b"OK 1073741824"), Some(1_073_741_824));
        assert_eq!(parse_ok_reply(b"OK 0"), Some(0));
        for bad in [
            &b"OK"[..],
            b"OK ",
            b"ok 5",
            b"OK -1",
            b"OK 5 6",
            b"OK 99999999999",
            b"\xffOK 1",
            b"ERR 5",
        ] {
            assert_eq!(parse_ok_reply(bad), None, "{bad:?}");
        }
    }

    /// A fake VMM: reads one CONNECT line, answers `reply`, then echoes.
    fn fake_vmm(
        reply: &'static [u8],
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = io::BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut out = stream;
            if reply.is_empty() {
                return line; // refuse: close without a reply
            }
            out.write_all(reply).unwrap();
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
            let _ = out.write_all(&rest);
            line
        });
        (dir, uds, server)
    }

    #[test]
    fn vsock_connect_sends_connect_and_keeps_following_bytes() {
        // The reply and the first payload byte arrive together: nothing may be swallowed.
        let (_dir, uds, server) = fake_vmm(b"OK 1073741824\nX");
        let mut stream = HostTransport::Vsock { uds }.connect(9000).unwrap();
        stream.write_all(b"hello").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"Xhello");
        assert_eq!(server.join().unwrap(), "CONNECT 9000\n");
    }

    #[test]
    fn vsock_refusal_and_garbage_are_clear_errors() {
        let (_dir, uds, server) = fake_vmm(b"");
        let err = HostTransport::Vsock { uds }.connect(1024).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("guest port 1024 refused"), "{err}");
        server.join().unwrap();

        let (_dir, uds, server) = fake_vmm(b"HELLO THERE\n");
        let err = HostTransport::Vsock { uds }.connect(1024).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("HELLO THERE"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn unix_transport_connects_to_port_sockets_and_names_missing_ones() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("9000.sock")).unwrap();
        let transport = HostTransport::Unix {
            dir: dir.path().to_path_buf(),
        };
        let mut stream = transport.connect(9000).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        stream.write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        let err = transport.connect(1024).unwrap_err();
        assert!(err.to_string().contains("1024.sock"), "{err}");
    }
}
