//! The guest's tx queue: packets from the guest to the host (connection requests, data,
//! credit, shutdown and reset), each applied to its stream.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;

use virtio_queue::{Queue, QueueT, Reader};

use super::connection::{ConnKey, ConnState, Connection};
use super::packet::*;
use super::unix::connect_nonblocking;
use super::{Token, Vsock, CONN_BUF_SIZE, MAX_CONNECTIONS, MAX_PKT_PAYLOAD, MAX_QUEUED_OPS};
use crate::memory::GuestMemory;

impl Vsock {
    /// Processes the tx queue while there is room for the replies it may cause.
    pub(super) fn process_tx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        for _ in 0..queue.size() {
            if self.queued_ops.len() >= MAX_QUEUED_OPS {
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

    pub(super) fn handle_tx_packet(&mut self, reader: &mut Reader<'_>) {
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
                self.queue_op(key, OP_RST, 0);
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
            OP_CREDIT_REQUEST => self.queue_op(key, OP_CREDIT_UPDATE, 0),
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
    pub(super) fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                ?key,
                "vsock request refused (duplicate or too many streams)"
            );
            self.queue_op(key, OP_RST, 0);
            return;
        }
        let path = format!("{}_{}", self.uds_path.display(), key.local_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path, error = %e, "guest vsock connect refused");
                self.queue_op(key, OP_RST, 0);
                return;
            }
        };
        let token = match self.register(stream.as_raw_fd(), Token::Conn(key)) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "vsock epoll registration failed");
                self.queue_op(key, OP_RST, 0);
                return;
            }
        };
        let mut conn = Connection::new(stream, token, ConnState::Established);
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        self.conns.insert(key, conn);
        self.queue_op(key, OP_RESPONSE, 0);
    }

    /// Tells the guest about freed buffer space once a quarter of it was consumed, so a sender
    /// never stalls waiting for credit.
    pub(super) fn maybe_credit_update(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent) >= CONN_BUF_SIZE / 4 {
                conn.fwd_cnt_sent = conn.fwd_cnt;
                self.queue_op(key, OP_CREDIT_UPDATE, 0);
            }
        }
    }

    /// Finishes a guest-side close once everything it sent reached the host.
    pub(super) fn after_flush(&mut self, key: ConnKey) {
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
