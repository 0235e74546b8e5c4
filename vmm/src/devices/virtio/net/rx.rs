//! The rx queue: frames from passt into the guest's receive buffers.
//!
//! Each frame gets a `virtio_net_hdr_v1` (no flags, no GSO: complete frames with complete
//! checksums) followed by the frame. With VIRTIO_NET_F_MRG_RXBUF it is spread over as many
//! descriptor chains as it needs (Linux posts page-sized ones) and `num_buffers` in the header
//! says how many; without, one chain must hold all of it.
//!
//! Chains are taken off the queue into [`Net::rx_chains`] as parsed, bounds-checked lists of
//! guest buffers, and only returned to the guest (used ring) once a whole frame is in them: a
//! frame never half-arrives, and a frame bigger than the buffers the guest has posted so far
//! waits for more (with its chains kept) instead of being split or lost. A malformed chain
//! (a read-only descriptor, a buffer outside guest memory, too small for the header) goes
//! straight back with length 0, which Linux counts as a length error and frees; the used ring
//! need not follow the available ring's order, so that never disturbs a frame being built.

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::{Net, HDR_LEN, MAX_RX_FRAME};
use crate::memory::GuestMemory;

/// A receive buffer of the guest: one descriptor chain, taken off the rx queue and not yet
/// used. Plain data (guest addresses), so it can be saved in a snapshot as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxChain {
    /// The chain's head descriptor index (what the used ring names).
    pub head: u16,
    /// Its device-writable buffers in order: (guest address, length).
    pub segments: Vec<(u64, u32)>,
}

impl RxChain {
    /// Bytes the chain holds.
    pub fn capacity(&self) -> usize {
        self.segments.iter().map(|&(_, len)| len as usize).sum()
    }

    /// Whether every buffer lies inside guest memory.
    pub fn is_inside(&self, mem: &GuestMemory) -> bool {
        self.segments
            .iter()
            .all(|&(addr, len)| mem.check_range(GuestAddress(addr), len as usize))
    }

    /// Writes `parts` (one after the other) into the chain's buffers; returns the bytes
    /// written, at most the chain's capacity.
    fn write(&self, mem: &GuestMemory, parts: &[&[u8]]) -> usize {
        let mut segments = self.segments.iter().copied();
        let mut current: Option<(u64, u32)> = segments.next();
        let mut written = 0;
        for part in parts {
            let mut part: &[u8] = part;
            while !part.is_empty() {
                let Some((addr, len)) = current else {
                    return written;
                };
                if len == 0 {
                    current = segments.next();
                    continue;
                }
                let n = part.len().min(len as usize);
                if let Err(e) = mem.write_slice(&part[..n], GuestAddress(addr)) {
                    // Checked when the chain was taken; guest memory does not shrink.
                    tracing::error!(error = %e, addr, "virtio-net: rx buffer write failed");
                    return written;
                }
                written += n;
                part = &part[n..];
                current = Some((addr + n as u64, len - n as u32));
            }
        }
        written
    }
}

/// What became of the frame at the front of the backend's buffer.
enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Not for the guest (too short or too long): dropped.
    Dropped,
    /// Waiting for more rx buffers.
    NoBuffers,
}

impl Net {
    /// Moves frames from passt into the guest's rx buffers until either runs out. Returns
    /// whether the used ring changed.
    ///
    /// At most one queue's worth of chains is taken per call: a guest vCPU can keep refilling
    /// the avail ring (with buffers the device must return unused, say) while this runs on the
    /// VMM's event loop thread. A frame that ran out of that budget waits with the chains it
    /// has; the driver's notification for the chains it adds later resumes it.
    pub(super) fn process_rx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        let mut budget = queue.size();
        let mergeable = self.mergeable();
        loop {
            let Some(backend) = self.backend.as_mut() else {
                return used;
            };
            let frame = match backend.peek_frame_mut() {
                Ok(Some(frame)) => frame,
                Ok(None) => match backend.fill() {
                    Ok(true) => continue,
                    Ok(false) => return used,
                    Err(e) => {
                        self.close_backend(&e);
                        return used;
                    }
                },
                Err(e) => {
                    self.close_backend(&e);
                    return used;
                }
            };
            if self.handshakes.on_passt_frame(frame) {
                self.counters.refusals += 1;
            }
            let (delivery, any_used) = deliver(
                mem,
                queue,
                &mut self.rx_chains,
                &mut self.counters,
                frame,
                mergeable,
                &mut budget,
            );
            used |= any_used;
            match delivery {
                Delivery::Delivered => self.counters.rx_frames += 1,
                Delivery::Dropped => self.counters.rx_dropped += 1,
                Delivery::NoBuffers => return used,
            }
            if let Some(backend) = self.backend.as_mut() {
                backend.consume_frame();
            }
        }
    }
}

/// Puts one frame into the guest's rx buffers, taking more chains off `queue` as needed (at
/// most `budget` of them, which it counts down). Returns what became of it and whether any
/// chain was returned to the guest.
fn deliver(
    mem: &GuestMemory,
    queue: &mut Queue,
    chains: &mut std::collections::VecDeque<RxChain>,
    counters: &mut super::NetCounters,
    frame: &[u8],
    mergeable: bool,
    budget: &mut u16,
) -> (Delivery, bool) {
    let mut used = false;
    if frame.len() < super::ETH_HLEN || frame.len() > MAX_RX_FRAME {
        tracing::debug!(len = frame.len(), "virtio-net: frame from passt dropped");
        return (Delivery::Dropped, used);
    }
    let need = HDR_LEN + frame.len();
    loop {
        // The first chain holds the header: one too small for it is of no use.
        while let Some(first) = chains.front() {
            if first.capacity() >= HDR_LEN {
                break;
            }
            let head = first.head;
            chains.pop_front();
            tracing::warn!(
                head,
                "virtio-net: rx buffer smaller than the header returned"
            );
            counters.bad_chains += 1;
            used |= queue.add_used(mem, head, 0).is_ok();
        }
        let have: usize = if mergeable {
            chains.iter().map(RxChain::capacity).sum()
        } else {
            chains.front().map_or(0, RxChain::capacity)
        };
        if have >= need {
            break;
        }
        if !mergeable && !chains.is_empty() {
            tracing::debug!(
                len = frame.len(),
                "virtio-net: frame larger than the rx buffer"
            );
            return (Delivery::Dropped, used);
        }
        if chains.len() >= usize::from(queue.size()) {
            // As many buffers as the queue can hold are here and still too small (a driver
            // never has more outstanding: more would be heads offered twice).
            tracing::warn!(
                len = frame.len(),
                "virtio-net: frame larger than all rx buffers"
            );
            return (Delivery::Dropped, used);
        }
        if *budget == 0 {
            return (Delivery::NoBuffers, used);
        }
        match take_chain(mem, queue) {
            Some(Ok(chain)) => chains.push_back(chain),
            Some(Err(head)) => {
                counters.bad_chains += 1;
                used |= queue.add_used(mem, head, 0).is_ok();
            }
            None => return (Delivery::NoBuffers, used),
        }
        *budget -= 1;
    }

    // How many chains the frame takes (their capacities cover `need`).
    let mut count = 0;
    let mut covered = 0;
    for chain in chains.iter() {
        count += 1;
        covered += chain.capacity();
        if covered >= need {
            break;
        }
    }
    let mut hdr = [0u8; HDR_LEN];
    hdr[10..12].copy_from_slice(&(count as u16).to_le_bytes());
    let mut rest = frame;
    for index in 0..count {
        let Some(chain) = chains.pop_front() else {
            break;
        };
        let written = if index == 0 {
            let n = chain.write(mem, &[&hdr, rest]);
            rest = &rest[n.saturating_sub(HDR_LEN).min(rest.len())..];
            n
        } else {
            let n = chain.write(mem, &[rest]);
            rest = &rest[n.min(rest.len())..];
            n
        };
        if let Err(e) = queue.add_used(mem, chain.head, written as u32) {
            tracing::error!(error = %e, "virtio-net: cannot write the rx used ring");
        } else {
            used = true;
        }
    }
    (Delivery::Delivered, used)
}

/// Takes the next chain off the rx queue: its writable buffers if it is a well-formed receive
/// buffer, else `Err(head)` so the caller returns it unused.
fn take_chain(mem: &GuestMemory, queue: &mut Queue) -> Option<Result<RxChain, u16>> {
    let chain: DescriptorChain<&GuestMemory> = queue.iter(mem).ok()?.next()?;
    let head = chain.head_index();
    let mut segments = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            tracing::warn!(
                head,
                "virtio-net: rx chain with a read-only descriptor returned"
            );
            return Some(Err(head));
        }
        if !mem.check_range(desc.addr(), desc.len() as usize) {
            tracing::warn!(
                head,
                addr = desc.addr().0,
                len = desc.len(),
                "virtio-net: rx buffer outside guest memory returned"
            );
            return Some(Err(head));
        }
        if desc.len() > 0 {
            segments.push((desc.addr().0, desc.len()));
        }
    }
    Some(Ok(RxChain { head, segments }))
}
