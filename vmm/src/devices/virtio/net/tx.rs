//! The tx queue: frames from the guest to passt.
//!
//! Each chain is a `virtio_net_hdr_v1` and a frame in device-readable buffers. The frame is
//! copied once, straight into the backend's out buffer behind its length prefix, and checked
//! there: passt takes only complete frames of 14..=65535 bytes, so a partial checksum
//! (VIRTIO_NET_HDR_F_NEEDS_CSUM: the guest summed the pseudo header into the checksum field
//! and left the rest to the device) is completed here, and a frame passt would refuse (and
//! reset the connection over) is dropped here. Every chain is consumed (used length 0) whatever
//! became of its frame, so a guest can never wedge its own tx queue.

use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::backend::{PREFIX_LEN, TX_HIGH_WATER};
use super::{Net, ETH_HLEN, HDR_LEN, MAX_TX_FRAME};
use crate::memory::GuestMemory;

/// Why a guest frame was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// The chain has a device-writable descriptor, which a tx chain must not have.
    #[error("tx chain with a device-writable descriptor")]
    WriteOnlyDescriptor,
    /// A buffer of the chain lies outside guest memory.
    #[error("tx buffer {addr:#x}+{len} outside guest memory")]
    OutOfBounds { addr: u64, len: u32 },
    /// The chain is shorter than the virtio-net header.
    #[error("tx chain of {0} bytes, shorter than the {HDR_LEN}-byte virtio-net header")]
    ShortHeader(usize),
    /// The frame is shorter than an Ethernet header or longer than passt takes.
    #[error("tx frame of {0} bytes (passt takes {ETH_HLEN}..={MAX_TX_FRAME})")]
    FrameLength(usize),
    /// The header asks for segmentation, which was not offered.
    #[error("tx frame with GSO type {0}, and no segmentation offload was offered")]
    Gso(u8),
    /// The partial checksum's position is not inside the frame.
    #[error("partial checksum at {start}+{offset} outside the {len}-byte frame")]
    ChecksumOffset { start: u16, offset: u16, len: usize },
}

impl Net {
    /// Takes the guest's frames off the tx queue into the backend's out buffer (and writes it)
    /// until the queue is empty, the socket is full, or one queue's worth of chains was taken.
    /// Returns whether the used ring changed.
    ///
    /// The bound matters: a guest vCPU can keep refilling the avail ring while this runs (on
    /// the VMM's event loop thread), and "until the queue is empty" would then never end. A
    /// driver never has more than a queue's worth outstanding, and it notifies again for
    /// chains it adds later, so nothing is left behind.
    pub(super) fn process_tx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        for _ in 0..queue.size() {
            if let Some(backend) = self.backend.as_mut() {
                if backend.tx_pending() >= TX_HIGH_WATER {
                    if let Err(e) = backend.flush() {
                        self.close_backend(&e);
                        continue;
                    }
                    if backend.tx_pending() >= TX_HIGH_WATER {
                        // Resumed on EPOLLOUT (process_host_events).
                        break;
                    }
                }
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match self.backend.as_mut() {
                Some(backend) => match read_frame(mem, chain, backend.tx_buffer()) {
                    Ok(frame) => {
                        self.handshakes.on_guest_frame(&backend.tx_buffer()[frame]);
                        self.counters.tx_frames += 1;
                    }
                    Err(e) => {
                        tracing::warn!(head, error = %e, "virtio-net: guest frame dropped");
                        self.counters.tx_dropped += 1;
                        if matches!(
                            e,
                            TxError::WriteOnlyDescriptor | TxError::OutOfBounds { .. }
                        ) {
                            self.counters.bad_chains += 1;
                        }
                    }
                },
                None => self.counters.tx_dropped += 1,
            }
            if let Err(e) = queue.add_used(mem, head, 0) {
                tracing::error!(error = %e, "virtio-net: cannot write the tx used ring");
                break;
            }
            used = true;
        }
        if let Some(backend) = self.backend.as_mut() {
            if let Err(e) = backend.flush() {
                self.close_backend(&e);
            }
        }
        used
    }
}

/// Appends the chain's frame to `out` behind its big-endian length, with its checksum
/// completed if the guest asked for that; returns where the frame lies in `out`. On error
/// `out` is left as it was.
pub(super) fn read_frame(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    out: &mut Vec<u8>,
) -> Result<std::ops::Range<usize>, TxError> {
    let start = out.len();
    match copy_frame(mem, chain, out, start) {
        Ok(()) => Ok(start + PREFIX_LEN..out.len()),
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn copy_frame(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    out: &mut Vec<u8>,
    start: usize,
) -> Result<(), TxError> {
    out.extend_from_slice(&[0; PREFIX_LEN]);
    let mut hdr = [0u8; HDR_LEN];
    let mut total = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err(TxError::WriteOnlyDescriptor);
        }
        let (addr, len) = (desc.addr(), desc.len() as usize);
        let out_of_bounds = TxError::OutOfBounds {
            addr: addr.0,
            len: desc.len(),
        };
        if !mem.check_range(addr, len) {
            return Err(out_of_bounds);
        }
        if total + len > HDR_LEN + MAX_TX_FRAME {
            return Err(TxError::FrameLength((total + len).saturating_sub(HDR_LEN)));
        }
        let in_header = HDR_LEN.saturating_sub(total).min(len);
        if in_header > 0 {
            mem.read_slice(&mut hdr[total..total + in_header], addr)
                .map_err(|_| out_of_bounds.clone())?;
        }
        let rest = len - in_header;
        if rest > 0 {
            let at = out.len();
            out.resize(at + rest, 0);
            let from = GuestAddress(addr.0 + in_header as u64);
            mem.read_slice(&mut out[at..], from)
                .map_err(|_| out_of_bounds.clone())?;
        }
        total += len;
    }
    if total < HDR_LEN {
        return Err(TxError::ShortHeader(total));
    }
    let frame = &mut out[start + PREFIX_LEN..];
    if frame.len() < ETH_HLEN {
        return Err(TxError::FrameLength(frame.len()));
    }
    let (flags, gso_type) = (hdr[0], hdr[1]);
    if u32::from(gso_type) != VIRTIO_NET_HDR_GSO_NONE {
        return Err(TxError::Gso(gso_type));
    }
    if u32::from(flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        let csum_start = u16::from_le_bytes([hdr[6], hdr[7]]);
        let csum_offset = u16::from_le_bytes([hdr[8], hdr[9]]);
        complete_checksum(frame, csum_start, csum_offset)?;
    }
    let len = frame.len() as u32;
    out[start..start + PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Completes a partial checksum: the Internet checksum of `frame[csum_start..]` (the field at
/// `csum_start + csum_offset` already holds the pseudo header's sum) is stored in that field,
/// 0 as 0xffff (as Linux does: for UDP 0 means "no checksum").
pub fn complete_checksum(
    frame: &mut [u8],
    csum_start: u16,
    csum_offset: u16,
) -> Result<(), TxError> {
    let bad = TxError::ChecksumOffset {
        start: csum_start,
        offset: csum_offset,
        len: frame.len(),
    };
    let start = usize::from(csum_start);
    let field = start + usize::from(csum_offset);
    if field + 2 > frame.len() {
        return Err(bad);
    }
    let sum = !ones_complement_sum(&frame[start..]);
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    Ok(())
}

/// The 16-bit ones' complement sum of `data` as big-endian words (RFC 1071), folded.
///
/// Summed as native-endian 32-bit words into a 64-bit accumulator (no carry can be lost for
/// any frame size here) and byte-swapped at the end, which RFC 1071 shows gives the same sum.
pub fn ones_complement_sum(data: &[u8]) -> u16 {
    let mut acc: u64 = 0;
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let tail = words.remainder();
    let mut last = [0u8; 4];
    last[..tail.len()].copy_from_slice(tail);
    acc += u64::from(u32::from_ne_bytes(last));
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    let folded = acc as u16;
    if cfg!(target_endian = "little") {
        folded.swap_bytes()
    } else {
        folded
    }
}
