//! virtio-vsock stream sockets in user space, bridged to host Unix sockets.
//!
//! Host side (Firecracker's convention, so host tools carry over):
//! - the VM has one Unix listener at `uds_path`. A host process connects, writes
//!   `CONNECT <port>\n`, and once the guest accepted gets `OK <hostport>\n`; from then on the
//!   bytes flow to and from guest port `<port>`. If nobody listens there, the Unix stream is
//!   closed.
//! - a guest connection to host port `P` is connected to the Unix socket `<uds_path>_P`; if that
//!   fails the guest gets a reset (ECONNRESET / ECONNREFUSED).
//!
//! Flow control is the spec's credit scheme per stream: the guest may have at most
//! [`CONN_BUF_SIZE`] bytes in flight towards the host (our `buf_alloc`); data beyond that resets
//! the stream. Host data goes to the guest only within the credit the guest advertised.
//!
//! The device is split by direction and side: [`tx`] (guest → host packets), [`rx`]
//! (host → guest), [`unix`] (the host's Unix sockets and the `CONNECT` line), [`connection`]
//! (one stream's state and credit), [`device`] (the virtio device), [`persist`] (its
//! snapshot state); [`packet`] is the wire header.
//!
//! Driving it from the VMM event loop: poll [`Vsock::host_event_fd`] (an internal epoll over
//! the listener and every stream, edge-triggered) for readability and call
//! `MmioTransport::process_host_events()`; queue notifications go through
//! `MmioTransport::notify_queue()` as for any device.

pub mod connection;
pub mod device;
pub mod packet;
pub mod persist;
pub mod rx;
pub mod tx;
pub mod unix;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use connection::{ConnKey, Connection, PendingHost, QueuedOp};
use packet::*;

pub const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// Bytes the guest may send on one stream before the host side read them (our buf_alloc).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Largest payload of one packet in either direction (Linux uses at most 64 KiB).
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// Streams per VM; requests beyond it are reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Op packets waiting for guest rx buffers; past this, the tx queue is left alone until
/// the guest gives us rx buffers (so a guest cannot make us queue without bound).
const MAX_QUEUED_OPS: usize = 1024;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First local port handed to host-initiated streams.
const FIRST_HOST_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = 0;

/// Why the vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is one a guest cannot have.
    #[error("guest CID {0} is reserved (CIDs 0-2 and u32::MAX are not usable by a guest)")]
    InvalidCid(u64),
    /// The host listener could not be created.
    #[error("cannot listen on vsock Unix socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    /// The device's own epoll over its sockets could not be set up.
    #[error("cannot set up the vsock epoll: {0}")]
    Epoll(io::Error),
}

/// What an epoll token of the device's own epoll stands for.
#[derive(Clone, Copy, Debug)]
enum Token {
    Pending,
    Conn(ConnKey),
}

/// The virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    pending: HashMap<u64, PendingHost>,
    tokens: HashMap<u64, Token>,
    next_token: u64,
    next_host_port: u32,
    /// Op packets waiting for rx buffers.
    queued_ops: VecDeque<QueuedOp>,
    activated: bool,
    acked_features: u64,
    /// Set by a restore: tell the guest its streams are gone.
    transport_reset_pending: bool,
    config: [u8; 8],
    /// Bounce buffer for host-to-guest data, kept to avoid an allocation per pass.
    scratch: Vec<u8>,
}

impl Vsock {
    /// A vsock device for a guest with CID `guest_cid`, listening for host connections on the
    /// Unix socket `uds_path` (which must not exist yet; it is removed when the device drops).
    pub fn new(guest_cid: u64, uds_path: impl AsRef<Path>) -> Result<Vsock, VsockError> {
        if guest_cid <= HOST_CID || guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let uds_path = uds_path.as_ref().to_path_buf();
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        let listener_setup = listener.set_nonblocking(true).and_then(|_| Epoll::new());
        let epoll = match listener_setup {
            Ok(epoll) => epoll,
            Err(e) => {
                let _ = std::fs::remove_file(&uds_path);
                return Err(VsockError::Epoll(e));
            }
        };
        let device = Vsock {
            guest_cid,
            uds_path,
            listener,
            epoll,
            conns: HashMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: TOKEN_LISTENER + 1,
            next_host_port: FIRST_HOST_PORT,
            queued_ops: VecDeque::new(),
            activated: false,
            acked_features: 0,
            transport_reset_pending: false,
            config: guest_cid.to_le_bytes(),
            scratch: Vec::new(),
        };
        device
            .epoll
            .ctl(
                ControlOperation::Add,
                device.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, TOKEN_LISTENER),
            )
            .map_err(VsockError::Epoll)?;
        Ok(device)
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Number of open streams (for tests and metrics).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    fn register(&mut self, fd: RawFd, token: Token) -> io::Result<u64> {
        let id = self.next_token;
        self.next_token += 1;
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, id))?;
        self.tokens.insert(id, token);
        Ok(id)
    }

    fn remove_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.tokens.remove(&conn.token);
        }
    }

    fn queue_op(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.queued_ops.len() >= MAX_QUEUED_OPS && op == OP_RST {
            tracing::warn!("vsock op backlog full: reset dropped");
            return;
        }
        self.queued_ops.push_back(QueuedOp { key, op, flags });
    }

    /// Resets a stream: tell the guest and forget it.
    fn reset_conn(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.queue_op(key, OP_RST, 0);
    }

    fn header_for(&self, key: ConnKey, op: u16, len: u32, flags: u32) -> Header {
        let (buf_alloc, fwd_cnt) = self
            .conns
            .get(&key)
            .map_or((0, 0), |c| (CONN_BUF_SIZE, c.fwd_cnt));
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.local_port,
            dst_port: key.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc,
            fwd_cnt,
        }
    }
}

#[cfg(test)]
mod tests;
