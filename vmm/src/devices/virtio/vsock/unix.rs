//! The host side of the vsock: the Unix listener host programs connect to (each sends
//! `CONNECT <port>\n` first), the per-stream Unix sockets in the device's own epoll, and
//! connecting to `<uds_path>_<port>` for a guest's connection request.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::connection::{ConnKey, ConnState, Connection, PendingHost};
use super::packet::*;
use super::{Token, Vsock, FIRST_HOST_PORT, MAX_CONNECTIONS, MAX_CONNECT_LINE, TOKEN_LISTENER};

impl Vsock {
    pub(super) fn accept_host_connections(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if !self.activated || self.pending.len() + self.conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(
                            "host vsock connection refused (driver not ready or too many streams)"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    match self.register(stream.as_raw_fd(), Token::Pending) {
                        Ok(token) => {
                            self.pending.insert(
                                token,
                                PendingHost {
                                    stream,
                                    line: Vec::new(),
                                },
                            );
                            self.read_connect_line(token);
                        }
                        Err(e) => tracing::error!(error = %e, "vsock epoll registration failed"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(error = %e, "vsock accept failed");
                    return;
                }
            }
        }
    }

    /// Reads what arrived of `CONNECT <port>\n`; on a full line, asks the guest to accept.
    pub(super) fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        // Byte by byte so nothing after the newline (early payload) is consumed here.
        let outcome = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err("closed before CONNECT"),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Err("CONNECT line too long"),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let port = match outcome {
            Ok(false) => return,
            Ok(true) => std::str::from_utf8(&p.line)
                .ok()
                .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
                .and_then(|port| port.trim().parse::<u32>().ok())
                .ok_or("malformed CONNECT line"),
            Err(e) => Err(e),
        };
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let port = match port {
            Ok(port) => port,
            Err(reason) => {
                tracing::warn!(reason, "host vsock connection dropped");
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    p.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                self.tokens.remove(&token);
                return;
            }
        };
        let key = ConnKey {
            local_port: self.allocate_host_port(port),
            peer_port: port,
        };
        self.tokens.insert(token, Token::Conn(key));
        let mut conn = Connection::new(p.stream, token, ConnState::Connecting);
        // Data the host sends before OK waits in the socket until the stream is established.
        conn.host_readable = true;
        self.conns.insert(key, conn);
        self.queue_op(key, OP_REQUEST, 0);
    }

    pub(super) fn allocate_host_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_host_port;
            self.next_host_port = self
                .next_host_port
                .checked_add(1)
                .unwrap_or(FIRST_HOST_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.conns.contains_key(&key) {
                return port;
            }
        }
    }

    pub(super) fn handle_epoll_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "vsock epoll_wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                let set = ev.event_set();
                if token == TOKEN_LISTENER {
                    self.accept_host_connections();
                    continue;
                }
                match self.tokens.get(&token).copied() {
                    Some(Token::Pending) => self.read_connect_line(token),
                    Some(Token::Conn(key)) => {
                        if let Some(conn) = self.conns.get_mut(&key) {
                            if set.intersects(
                                EventSet::IN
                                    | EventSet::READ_HANG_UP
                                    | EventSet::HANG_UP
                                    | EventSet::ERROR,
                            ) {
                                conn.host_readable = true;
                            }
                        }
                        if set.contains(EventSet::OUT) {
                            self.after_flush(key);
                            self.maybe_credit_update(key);
                        }
                    }
                    None => {}
                }
            }
            if n < events.len() {
                return;
            }
        }
    }
}

/// Connects to a Unix socket without blocking: a listener with a full backlog is a refusal,
/// not a stall of the VMM thread.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own; OwnedFd closes it on every path.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un and `len` does not exceed its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}
