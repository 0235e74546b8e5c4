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
//! Driving it from the VMM event loop: poll [`Vsock::host_event_fd`] (an internal epoll over
//! the listener and every stream, edge-triggered) for readability and call
//! `MmioTransport::process_host_events()`; queue notifications go through
//! `MmioTransport::notify_queue()` as for any device.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Reader, Writer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{read_config_bytes, ActivateError, VirtioDevice, FEATURE_VERSION_1};
use crate::memory::GuestMemory;
use crate::state::Persist;
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
/// Control packets waiting for guest rx buffers; past this, the tx queue is left alone until
/// the guest gives us rx buffers (so a guest cannot make us queue without bound).
const MAX_PENDING_CONTROL: usize = 1024;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// First local port handed to host-initiated streams.
const FIRST_HOST_PORT: u32 = 1 << 30;

const TOKEN_LISTENER: u64 = 0;

/// Why the vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved (CIDs 0-2 and u32::MAX are not usable by a guest)")]
    InvalidCid(u64),
    #[error("cannot listen on vsock Unix socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set up the vsock epoll: {0}")]
    Epoll(io::Error),
}

/// Saved state of a [`Vsock`]. Streams are not saved: a restored guest gets a
/// TRANSPORT_RESET event and sees its connections reset, as the spec intends for migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub acked_features: u64,
}

/// What restoring a [`Vsock`] needs: optionally a new listener path for the new VMM process.
#[derive(Clone, Debug, Default)]
pub struct VsockRestoreArgs {
    pub uds_path: Option<PathBuf>,
}

/// A stream is keyed by (host-side port, guest-side port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ConnKey {
    local_port: u32,
    peer_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: REQUEST sent to the guest, waiting for its RESPONSE.
    Connecting,
    Established,
}

struct Connection {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    /// Guest data not yet written to the Unix stream (bounded by CONN_BUF_SIZE).
    to_host: VecDeque<u8>,
    /// Guest bytes written to the Unix stream (our fwd_cnt).
    fwd_cnt: u32,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_sent: u32,
    /// Host bytes sent to the guest.
    rx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Edge-triggered epoll said readable and we have not seen EAGAIN since.
    host_readable: bool,
    credit_requested: bool,
    /// The guest sent SHUTDOWN(SEND): shut the Unix stream's write side once drained.
    guest_done_sending: bool,
    /// The guest closed: drop the stream (and reset) once `to_host` is drained.
    close_after_drain: bool,
    /// We told the guest the host side is gone; waiting for its RST.
    host_closed: bool,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, state: ConnState) -> Self {
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
    fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Writes buffered guest data to the Unix stream. Err means the stream is dead.
    fn flush_to_host(&mut self) -> io::Result<()> {
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
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
}

/// A control packet waiting for an rx buffer; its credit fields are filled in when sent.
#[derive(Clone, Copy, Debug)]
struct Control {
    key: ConnKey,
    op: u16,
    flags: u32,
}

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
    control: VecDeque<Control>,
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
            control: VecDeque::new(),
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

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        if self.control.len() >= MAX_PENDING_CONTROL && op == OP_RST {
            tracing::warn!("vsock control backlog full: reset dropped");
            return;
        }
        self.control.push_back(Control { key, op, flags });
    }

    /// Resets a stream: tell the guest and forget it.
    fn reset_conn(&mut self, key: ConnKey) {
        self.remove_conn(key);
        self.queue_control(key, OP_RST, 0);
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

    // ---- guest -> host -------------------------------------------------------------------

    /// Processes the tx queue while there is room for the replies it may cause.
    fn process_tx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        for _ in 0..queue.size() {
            if self.control.len() >= MAX_PENDING_CONTROL {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match Reader::new(mem, chain) {
                Ok(mut reader) => self.handle_tx_packet(&mut reader),
                Err(e) => tracing::warn!(error = %e, "vsock tx chain outside guest memory dropped"),
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::error!(error = %e, "vsock: cannot write the tx used ring");
                break;
            }
            used = true;
        }
        used
    }

    fn handle_tx_packet(&mut self, reader: &mut Reader<'_>) {
        let mut raw = [0u8; HDR_LEN];
        if reader.available_bytes() < HDR_LEN || reader.read_exact(&mut raw).is_err() {
            tracing::warn!("vsock tx packet shorter than its header dropped");
            return;
        }
        let hdr = Header::from_bytes(&raw);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            tracing::warn!(
                src = hdr.src_cid,
                dst = hdr.dst_cid,
                "vsock packet with a wrong CID dropped"
            );
            return;
        }
        let key = ConnKey {
            local_port: hdr.dst_port,
            peer_port: hdr.src_port,
        };
        if hdr.type_ != TYPE_STREAM {
            tracing::warn!(
                type_ = hdr.type_,
                "vsock packet of an unsupported socket type"
            );
            if hdr.op != OP_RST {
                self.reset_conn(key);
            }
            return;
        }
        let len = hdr.len as usize;
        if len > MAX_PKT_PAYLOAD || len > reader.available_bytes() {
            tracing::warn!(
                len,
                available = reader.available_bytes(),
                "vsock packet length invalid"
            );
            self.reset_conn(key);
            return;
        }
        if hdr.op == OP_REQUEST {
            self.guest_connect(key, &hdr);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return;
        };
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        match hdr.op {
            OP_RESPONSE if conn.state == ConnState::Connecting => {
                conn.state = ConnState::Established;
                let ok = format!("OK {}\n", key.local_port);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset_conn(key);
                }
            }
            OP_RW if conn.state == ConnState::Established && !conn.guest_done_sending => {
                if conn.to_host.len() + len > CONN_BUF_SIZE as usize {
                    tracing::warn!(?key, "guest sent beyond its credit: stream reset");
                    self.reset_conn(key);
                    return;
                }
                let start = conn.to_host.len();
                conn.to_host.resize(start + len, 0);
                let (a, b) = conn.to_host.as_mut_slices();
                // The payload lands at the end of the deque, possibly wrapping.
                let read = copy_into_tail(reader, a, b, start, len);
                if read.is_err() {
                    self.reset_conn(key);
                    return;
                }
                if conn.flush_to_host().is_err() {
                    self.reset_conn(key);
                    return;
                }
                self.maybe_credit_update(key);
            }
            OP_CREDIT_UPDATE => conn.credit_requested = false,
            OP_CREDIT_REQUEST => self.queue_control(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                let done_receiving = hdr.flags & SHUTDOWN_RCV != 0;
                let done_sending = hdr.flags & SHUTDOWN_SEND != 0;
                if done_sending {
                    conn.guest_done_sending = true;
                }
                if done_receiving && done_sending || conn.host_closed {
                    conn.close_after_drain = true;
                }
                self.after_flush(key);
            }
            OP_RST => self.remove_conn(key),
            op => {
                tracing::warn!(op, ?key, "unexpected vsock op: stream reset");
                self.reset_conn(key);
            }
        }
    }

    /// A guest REQUEST: connect to `<uds_path>_<port>`.
    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                ?key,
                "vsock request refused (duplicate or too many streams)"
            );
            self.queue_control(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path, error = %e, "guest vsock connect refused");
                self.queue_control(key, OP_RST, 0);
                return;
            }
        };
        let token = match self.register(stream.as_raw_fd(), Token::Conn(key)) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "vsock epoll registration failed");
                self.queue_control(key, OP_RST, 0);
                return;
            }
        };
        let mut conn = Connection::new(stream, token, ConnState::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        self.conns.insert(key, conn);
        self.queue_control(key, OP_RESPONSE, 0);
    }

    /// Tells the guest about freed buffer space once a quarter of it was consumed, so a sender
    /// never stalls waiting for credit.
    fn maybe_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= CONN_BUF_SIZE / 4 {
                conn.fwd_cnt_sent = conn.fwd_cnt;
                self.queue_control(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    /// Finishes a guest-side close once everything it sent reached the host.
    fn after_flush(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.flush_to_host().is_err() {
            self.reset_conn(key);
            return;
        }
        if conn.close_after_drain && conn.to_host.is_empty() {
            self.reset_conn(key);
        }
    }

    // ---- host -> guest -------------------------------------------------------------------

    /// Fills rx buffers with pending control packets, then with stream data within credit.
    fn fill_rx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(ctrl) = self.control.front().copied() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return used;
            };
            self.control.pop_front();
            let head = chain.head_index();
            if ctrl.op == OP_CREDIT_UPDATE {
                if let Some(c) = self.conns.get_mut(&ctrl.key) {
                    c.fwd_cnt_sent = c.fwd_cnt;
                }
            }
            let hdr = self.header_for(ctrl.key, ctrl.op, 0, ctrl.flags);
            let len = write_chain(mem, chain, &[&hdr.to_bytes()]);
            if queue.add_used(mem, head, len).is_err() {
                return used;
            }
            used = true;
        }

        let mut buf = std::mem::take(&mut self.scratch);
        buf.resize(MAX_PKT_PAYLOAD, 0);
        let used = self.fill_rx_streams(mem, queue, &mut buf, used);
        self.scratch = buf;
        used
    }

    /// The stream part of [`Vsock::fill_rx`], with a reusable bounce buffer.
    fn fill_rx_streams(
        &mut self,
        mem: &GuestMemory,
        queue: &mut Queue,
        buf: &mut [u8],
        mut used: bool,
    ) -> bool {
        let mut keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        keys.sort_unstable();
        // Round-robin one packet per stream per pass, so one busy stream cannot starve others.
        loop {
            let mut progress = false;
            for &key in &keys {
                let Some(conn) = self.conns.get_mut(&key) else {
                    continue;
                };
                if conn.state != ConnState::Established || !conn.host_readable || conn.host_closed {
                    continue;
                }
                let credit = conn.peer_credit() as usize;
                if credit == 0 {
                    if !conn.credit_requested {
                        conn.credit_requested = true;
                        self.queue_control(key, OP_CREDIT_REQUEST, 0);
                    }
                    continue;
                }
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    return used;
                };
                let head = chain.head_index();
                let mut writer = match Writer::new(mem, chain) {
                    Ok(w) if w.available_bytes() > HDR_LEN => w,
                    _ => {
                        tracing::warn!("vsock rx buffer too small or outside guest memory");
                        if queue.add_used(mem, head, 0).is_err() {
                            return used;
                        }
                        used = true;
                        continue;
                    }
                };
                let want = credit
                    .min(writer.available_bytes() - HDR_LEN)
                    .min(MAX_PKT_PAYLOAD);
                let read = conn.stream.read(&mut buf[..want]);
                let n = match read {
                    Ok(0) => {
                        // The host finished sending: tell the guest (it sees EOF).
                        conn.host_readable = false;
                        conn.host_closed = true;
                        queue.go_to_previous_position();
                        // Only SEND: a half-closed host (request sent, waiting for the reply) still
                        // receives; a fully closed one fails the next write and gets reset.
                        self.queue_control(key, OP_SHUTDOWN, SHUTDOWN_SEND);
                        progress = true;
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.host_readable = false;
                        queue.go_to_previous_position();
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        queue.go_to_previous_position();
                        continue;
                    }
                    Err(_) => {
                        queue.go_to_previous_position();
                        self.reset_conn(key);
                        progress = true;
                        continue;
                    }
                };
                conn.rx_cnt = conn.rx_cnt.wrapping_add(n as u32);
                let hdr = self.header_for(key, OP_RW, n as u32, 0);
                if let Some(c) = self.conns.get_mut(&key) {
                    c.fwd_cnt_sent = c.fwd_cnt;
                }
                let ok = writer.write_all(&hdr.to_bytes()).is_ok()
                    && writer.write_all(&buf[..n]).is_ok();
                let len = if ok { (HDR_LEN + n) as u32 } else { 0 };
                if queue.add_used(mem, head, len).is_err() {
                    return used;
                }
                used = true;
                progress = true;
            }
            // Control packets produced by this pass (SHUTDOWN, RST, CREDIT_REQUEST) go first.
            if !self.control.is_empty() {
                return self.fill_rx(mem, queue) || used;
            }
            if !progress {
                return used;
            }
        }
    }

    // ---- host events ---------------------------------------------------------------------

    fn accept_host_connections(&mut self) {
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
    fn read_connect_line(&mut self, token: u64) {
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
        self.queue_control(key, OP_REQUEST, 0);
    }

    fn allocate_host_port(&mut self, peer_port: u32) -> u32 {
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

    fn handle_epoll_events(&mut self) {
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

    /// Everything that may move data: tx packets (bounded by the control backlog), rx buffers.
    fn run(&mut self, mem: &GuestMemory, queues: &mut [Queue]) -> bool {
        let [rx, tx, event] = queues else {
            return false;
        };
        let mut used = false;
        if self.transport_reset_pending {
            if let Some(chain) = event.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = write_chain(mem, chain, &[&EVENT_TRANSPORT_RESET.to_le_bytes()]);
                if event.add_used(mem, head, len).is_ok() {
                    used = true;
                }
                self.transport_reset_pending = false;
            }
        }
        // Replies need rx buffers; alternate until neither side makes progress.
        for _ in 0..4 {
            let tx_used = self.process_tx(mem, tx);
            let rx_used = self.fill_rx(mem, rx);
            used |= tx_used | rx_used;
            if !tx_used {
                break;
            }
        }
        used
    }
}

/// Writes `parts` into the device-writable buffers of `chain`; returns the used length, 0 if
/// the chain is too small or not inside guest memory (the buffer is then returned empty).
fn write_chain(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>, parts: &[&[u8]]) -> u32 {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let Ok(mut writer) = Writer::new(mem, chain) else {
        tracing::warn!("vsock rx buffer outside guest memory");
        return 0;
    };
    if writer.available_bytes() < total {
        tracing::warn!(total, "vsock rx buffer too small");
        return 0;
    }
    for part in parts {
        if writer.write_all(part).is_err() {
            return 0;
        }
    }
    total as u32
}

/// Copies `len` bytes from the guest into the tail of a VecDeque's two slices, starting at
/// logical index `start`.
fn copy_into_tail(
    reader: &mut Reader<'_>,
    a: &mut [u8],
    b: &mut [u8],
    start: usize,
    len: usize,
) -> io::Result<()> {
    let end = start + len;
    if start < a.len() {
        let a_end = end.min(a.len());
        reader.read_exact(&mut a[start..a_end])?;
        let rest = end - a_end;
        reader.read_exact(&mut b[..rest])?;
    } else {
        let s = start - a.len();
        reader.read_exact(&mut b[s..s + len])?;
    }
    Ok(())
}

/// Connects to a Unix socket without blocking: a listener with a full backlog is a refusal,
/// not a stall of the VMM thread.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
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

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        _mem: &GuestMemory,
        queues: &mut [Queue],
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                actual: queues.len(),
            });
        }
        self.acked_features = acked_features;
        self.activated = true;
        Ok(())
    }

    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: u16) -> bool {
        match usize::from(index) {
            RX_QUEUE | TX_QUEUE | EVENT_QUEUE => self.run(mem, queues),
            _ => false,
        }
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self, mem: &GuestMemory, queues: &mut [Queue]) -> bool {
        self.handle_epoll_events();
        if !self.activated {
            return false;
        }
        self.run(mem, queues)
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        for (token, p) in self.pending.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.tokens.remove(&token);
        }
        self.control.clear();
        self.activated = false;
        self.acked_features = 0;
        self.transport_reset_pending = false;
    }

    fn device_state(&self) -> super::VirtioDeviceState {
        super::VirtioDeviceState::Vsock(self.save())
    }
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockRestoreArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
            acked_features: self.acked_features,
        }
    }

    fn restore(args: VsockRestoreArgs, state: &VsockState) -> Result<Vsock, VsockError> {
        let path = args.uds_path.unwrap_or_else(|| state.uds_path.clone());
        let mut vsock = Vsock::new(state.guest_cid, path)?;
        vsock.acked_features = state.acked_features;
        vsock.transport_reset_pending = true;
        Ok(vsock)
    }
}

#[cfg(test)]
mod tests;
