//! passt's side of the device: QEMU's stream protocol over a Unix socket, each Ethernet frame
//! preceded by its length as a 32-bit big-endian number, with nothing else on the wire.
//!
//! The socket is non-blocking and both directions are buffered and resumable, because neither
//! side may stall the VMM's event loop:
//! - in: bytes are read into a fixed buffer and cut into frames there; a frame the guest has
//!   no buffers for stays there, and reading stops while the buffer is full, so passt is slowed
//!   down by its socket filling up (backpressure), never by the VMM blocking. A length prefix
//!   above [`MAX_PREFIX_LEN`] is a protocol error: nothing of that size is ever allocated.
//! - out: guest frames are appended, with their prefix, to an out buffer that is written as far
//!   as the socket takes it; past [`TX_HIGH_WATER`] pending bytes the device stops taking guest
//!   frames until the socket is writable again (EPOLLOUT).
//!
//! Readiness comes from the device's edge-triggered epoll: [`PasstStream::readable`] and
//! [`PasstStream::writable`] remember an edge until a read or write meets EAGAIN.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use super::MAX_TX_FRAME;

/// Length of the big-endian length prefix of every frame.
pub const PREFIX_LEN: usize = 4;
/// Largest length prefix accepted from passt: its own limit (65535) plus a margin. Anything
/// above is not a frame passt would send: the stream is out of step or not passt's.
pub const MAX_PREFIX_LEN: usize = 65535 + 1024;
/// Size of the in buffer: many small frames per read, and always room for the largest frame.
pub const RX_BUF_LEN: usize = 256 * 1024;
/// Pending out bytes past which no more guest frames are taken.
pub const TX_HIGH_WATER: usize = 256 * 1024;

const _: () = assert!(RX_BUF_LEN >= PREFIX_LEN + MAX_PREFIX_LEN);

/// Why the backend was closed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// passt closed its end of the socket.
    #[error("passt closed the connection")]
    HungUp,
    /// Reading or writing the socket failed.
    #[error("passt socket I/O failed: {0}")]
    Io(io::Error),
    /// passt sent a frame length no frame can have.
    #[error("protocol error: frame length {0} in the stream (at most {MAX_PREFIX_LEN})")]
    OversizeFrame(usize),
}

/// One connection to passt, with its in and out buffers.
pub struct PasstStream {
    stream: UnixStream,
    rx: Box<[u8]>,
    /// Unconsumed bytes are `rx[rx_start..rx_end]`.
    rx_start: usize,
    rx_end: usize,
    /// Prefixed frames not yet written are `tx[tx_start..]`.
    tx: Vec<u8>,
    tx_start: usize,
    /// An edge said readable and no read has met EAGAIN since.
    pub readable: bool,
    /// Likewise for writes.
    pub writable: bool,
}

impl PasstStream {
    /// Takes over a connected stream and makes it non-blocking.
    pub fn new(stream: UnixStream) -> io::Result<PasstStream> {
        stream.set_nonblocking(true)?;
        Ok(PasstStream {
            stream,
            rx: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            tx: Vec::with_capacity(TX_HIGH_WATER + PREFIX_LEN + MAX_TX_FRAME),
            tx_start: 0,
            // Nothing is known yet: try both once.
            readable: true,
            writable: true,
        })
    }

    /// The next complete frame in the in buffer, without consuming it.
    pub fn peek_frame(&self) -> Result<Option<&[u8]>, BackendError> {
        Ok(self.next_frame()?.map(|range| &self.rx[range]))
    }

    /// [`PasstStream::peek_frame`], for a device that mends the frame before the guest sees it.
    pub fn peek_frame_mut(&mut self) -> Result<Option<&mut [u8]>, BackendError> {
        Ok(self.next_frame()?.map(|range| &mut self.rx[range]))
    }

    /// Where the next complete frame lies in the in buffer.
    fn next_frame(&self) -> Result<Option<std::ops::Range<usize>>, BackendError> {
        let pending = &self.rx[self.rx_start..self.rx_end];
        let Some(prefix) = pending.first_chunk::<PREFIX_LEN>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix) as usize;
        if len > MAX_PREFIX_LEN {
            return Err(BackendError::OversizeFrame(len));
        }
        if pending.len() < PREFIX_LEN + len {
            return Ok(None);
        }
        let start = self.rx_start + PREFIX_LEN;
        Ok(Some(start..start + len))
    }

    /// Consumes the frame [`PasstStream::peek_frame`] returned.
    pub fn consume_frame(&mut self) {
        if let Ok(Some(frame)) = self.peek_frame() {
            self.rx_start += PREFIX_LEN + frame.len();
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            }
        }
    }

    /// Reads what the socket has, as far as the in buffer has room. Returns whether anything
    /// was read; `false` when the socket had nothing (the edge is used up) or the buffer is
    /// full (a frame is waiting for guest buffers).
    pub fn fill(&mut self) -> Result<bool, BackendError> {
        if !self.readable {
            return Ok(false);
        }
        if self.rx_end == self.rx.len() && self.rx_start > 0 {
            // Only a partial frame is left at the end: move it to the front.
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        if self.rx_end == self.rx.len() {
            return Ok(false);
        }
        loop {
            match (&self.stream).read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(BackendError::HungUp),
                Ok(n) => {
                    self.rx_end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.readable = false;
                    return Ok(false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(BackendError::Io(e)),
            }
        }
    }

    /// Bytes waiting to be written.
    pub fn tx_pending(&self) -> usize {
        self.tx.len() - self.tx_start
    }

    /// The out buffer, for [`super::tx`] to append one prefixed frame to (and to truncate
    /// back to its old length if the frame turns out malformed).
    pub fn tx_buffer(&mut self) -> &mut Vec<u8> {
        // After partial writes (backpressure only) the written head is dropped once it is at
        // least half the buffer: amortised, every byte moves at most once.
        if self.tx_start > 0 && self.tx_start >= self.tx.len() / 2 {
            self.tx.drain(..self.tx_start);
            self.tx_start = 0;
        }
        &mut self.tx
    }

    /// Writes pending frames as far as the socket takes them.
    pub fn flush(&mut self) -> Result<(), BackendError> {
        while self.tx_pending() > 0 && self.writable {
            let pending = &self.tx[self.tx_start..];
            // SAFETY: send(2) reads at most `pending.len()` bytes from a live slice;
            // MSG_NOSIGNAL turns a closed peer into EPIPE instead of SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.stream.as_raw_fd(),
                    pending.as_ptr().cast(),
                    pending.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => self.writable = false,
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                        return Err(BackendError::HungUp)
                    }
                    _ => return Err(BackendError::Io(e)),
                }
                continue;
            }
            self.tx_start += n as usize;
        }
        if self.tx_pending() == 0 {
            self.tx.clear();
            self.tx_start = 0;
        }
        Ok(())
    }
}

impl AsRawFd for PasstStream {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}
