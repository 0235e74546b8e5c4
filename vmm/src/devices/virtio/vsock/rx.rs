//! The guest's rx queue: packets from the host to the guest, queued op packets first, then
//! stream data within the credit the guest advertised, round-robin over the streams.

use std::io::{self, Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT, Writer};

use super::connection::{ConnKey, ConnState};
use super::packet::*;
use super::{Vsock, MAX_PKT_PAYLOAD};
use crate::memory::GuestMemory;

impl Vsock {
    /// Fills rx buffers with queued op packets, then with stream data within credit.
    pub(super) fn fill_rx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(ctrl) = self.queued_ops.front().copied() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return used;
            };
            self.queued_ops.pop_front();
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
    pub(super) fn fill_rx_streams(
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
                        self.queue_op(key, OP_CREDIT_REQUEST, 0);
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
                        self.queue_op(key, OP_SHUTDOWN, SHUTDOWN_SEND);
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
            // Op packets produced by this pass (SHUTDOWN, RST, CREDIT_REQUEST) go first.
            if !self.queued_ops.is_empty() {
                return self.fill_rx(mem, queue) || used;
            }
            if !progress {
                return used;
            }
        }
    }
}

/// Writes `parts` into the device-writable buffers of `chain`; returns the used length, 0 if
/// the chain is too small or not inside guest memory (the buffer is then returned empty).
pub(super) fn write_chain(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    parts: &[&[u8]],
) -> u32 {
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
