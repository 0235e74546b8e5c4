//! One vsock stream's state: its key, where it is in its life (connecting, established,
//! closing), the guest data not yet written to its Unix stream, and the spec's credit
//! counters in both directions. Also a host connection still sending its `CONNECT` line, and
//! an op packet waiting for an rx buffer.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::unix::net::UnixStream;

/// A stream is keyed by (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct ConnKey {
    pub(super) local_port: u32,
    pub(super) peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    Connecting,
    Established,
}

pub(super) struct Connection {
    pub(super) stream: UnixStream,
    pub(super) token: u64,
    pub(super) state: ConnState,
    /// Guest data not yet written to the Unix stream (bounded by CONN_BUF_SIZE).
    pub(super) to_host: VecDeque<u8>,
    /// Guest bytes written to the Unix stream (our fwd_cnt).
    pub(super) fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    pub(super) fwd_cnt_sent: u32,
    /// Host bytes sent to the guest.
    pub(super) rx_cnt: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
    /// Edge-triggered epoll said readable and we have not seen EAGAIN since.
    pub(super) host_readable: bool,
    pub(super) credit_requested: bool,
    /// The guest sent SHUTDOWN(SEND): shut the Unix stream's write side once drained.
    pub(super) guest_done_sending: bool,
    /// The guest closed: drop the stream (and reset) once `to_host` is drained.
    pub(super) close_after_drain: bool,
    /// We told the guest the host side is gone; waiting for its RST.
    pub(super) host_closed: bool,
}

impl Connection {
    pub(super) fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
        Connection {
            stream,
            token,
            state,
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_readable: true,
            credit_requested: false,
            guest_done_sending: false,
            close_after_drain: false,
            host_closed: false,
        }
    }

    /// Bytes the guest can still take on this stream.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered guest data to the Unix stream. Err means the stream is dead.
    pub(super) fn flush_to_host(&mut self) -> io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.guest_done_sending {
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }
}

/// A host connection that has not sent its `CONNECT <port>\n` line yet.
pub(super) struct PendingHost {
    pub(super) stream: UnixStream,
    pub(super) line: Vec<u8>,
}

/// An op packet without payload (RESPONSE, RST, SHUTDOWN, CREDIT_*) waiting for an rx
/// buffer; its credit fields are filled in when it is sent.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueuedOp {
    pub(super) key: ConnKey,
    pub(super) op: u16,
    pub(super) flags: u32,
}
