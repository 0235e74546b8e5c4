//! The guest's unanswered TCP handshakes, so that a refused connection is refused in the guest.
//!
//! Why: when the host refuses a connection passt makes for the guest (the egress policy's
//! `reject with tcp reset`, or nothing listening), passt answers the guest's SYN with a RST.
//! The passt of Debian 12 (0.0~git20230309) sends that RST without the ACK flag, and a TCP in
//! SYN-SENT must drop a RST without an acceptable ACK (RFC 9293, 3.10.7.3; Linux does), so the
//! guest's `connect()` hangs until it times out instead of failing with "connection refused".
//! The device notes each SYN the guest sends (its sequence number) and turns passt's bare RST
//! for that flow into the RST+ACK a refusing host sends (`ack` = the SYN's sequence + 1), with
//! the TCP checksum redone. Nothing else is touched: a RST that already carries an ACK, a RST
//! for a flow without an unanswered SYN, and every other frame pass as they are.
//!
//! Both frames are hostile input (the guest's and passt's): they are parsed with bounds checks
//! only, and anything that is not a plain Ethernet + IPv4/IPv6 + TCP segment is left alone.
//! The table is bounded ([`MAX_PENDING`], oldest forgotten first): a guest opening more
//! connections at once than that only risks, for the forgotten ones, the old timeout.

use std::collections::VecDeque;

use super::tx::ones_complement_sum;
use super::ETH_HLEN;

/// Handshakes remembered at once (a SYN costs 40 bytes here).
pub const MAX_PENDING: usize = 256;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte, the acknowledgment number and the checksum in a TCP header.
const TCP_FLAGS: usize = 13;
const TCP_ACK_NUM: usize = 8;
const TCP_CHECKSUM: usize = 16;
const TCP_MIN_HLEN: usize = 20;

/// A connection as the guest sees it: its own port, and the remote address and port (IPv4
/// addresses mapped into IPv6 ones, so both families share one key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow {
    guest_port: u16,
    remote: [u8; 16],
    remote_port: u16,
}

/// The guest's SYNs that passt has not answered yet.
#[derive(Debug, Default)]
pub struct Handshakes {
    /// (flow, the SYN's sequence number), oldest first.
    pending: VecDeque<(Flow, u32)>,
}

impl Handshakes {
    /// Notes a frame the guest sent: a SYN opens a handshake (a retransmitted one replaces
    /// its earlier self), a RST or FIN from the guest ends it.
    pub fn on_guest_frame(&mut self, frame: &[u8]) {
        let Some(seg) = Segment::parse(frame) else {
            return;
        };
        if seg.flags & (TCP_SYN | TCP_RST | TCP_FIN) == 0 {
            return;
        }
        let flow = Flow {
            guest_port: seg.src_port,
            remote: seg.dst,
            remote_port: seg.dst_port,
        };
        self.forget(&flow);
        if seg.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN {
            if self.pending.len() == MAX_PENDING {
                self.pending.pop_front();
            }
            self.pending.push_back((flow, seg.seq));
        }
    }

    /// Looks at a frame from passt before the guest gets it: an answer to a pending SYN ends
    /// the handshake, and a bare RST answering it becomes RST+ACK. Returns whether the frame
    /// was rewritten.
    pub fn on_passt_frame(&mut self, frame: &mut [u8]) -> bool {
        let Some(seg) = Segment::parse(frame) else {
            return false;
        };
        let flow = Flow {
            guest_port: seg.dst_port,
            remote: seg.src,
            remote_port: seg.src_port,
        };
        if seg.flags & (TCP_SYN | TCP_RST) == 0 {
            return false;
        }
        let Some(syn_seq) = self.forget(&flow) else {
            return false;
        };
        if seg.flags & (TCP_RST | TCP_ACK) != TCP_RST {
            return false;
        }
        seg.acknowledge(frame, syn_seq.wrapping_add(1));
        tracing::debug!(
            guest_port = flow.guest_port,
            remote_port = flow.remote_port,
            "virtio-net: passt's refusal of a connection sent on as RST+ACK"
        );
        true
    }

    /// How many handshakes are pending.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Drops every handshake (a device reset: the guest's TCP starts over).
    pub fn clear(&mut self) {
        self.pending.clear();
    }

    /// Removes `flow`'s handshake, returning its SYN's sequence number.
    fn forget(&mut self, flow: &Flow) -> Option<u32> {
        let at = self.pending.iter().position(|(f, _)| f == flow)?;
        self.pending.remove(at).map(|(_, seq)| seq)
    }
}

/// A TCP segment inside an Ethernet frame, as far as this module needs it.
struct Segment {
    /// The pseudo header's sum (addresses, protocol, TCP length), for the checksum.
    pseudo_sum: u32,
    /// Where the TCP header starts in the frame, and how long header + payload are.
    tcp_start: usize,
    tcp_len: usize,
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    seq: u32,
    flags: u8,
}

impl Segment {
    /// Parses an Ethernet + IPv4 (unfragmented) or IPv6 (no extension headers) + TCP frame.
    fn parse(frame: &[u8]) -> Option<Segment> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        let ip = frame.get(ETH_HLEN..)?;
        let (src, dst, ip_hlen, ip_payload) = match ethertype {
            ETHERTYPE_IPV4 => {
                let hdr = ip.get(..20)?;
                let ihl = usize::from(hdr[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
                let fragment = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x3fff;
                if hdr[0] >> 4 != 4 || ihl < 20 || hdr[9] != PROTO_TCP || fragment != 0 {
                    return None;
                }
                let payload = total.checked_sub(ihl)?;
                ip.get(..total)?;
                (mapped(&hdr[12..16]), mapped(&hdr[16..20]), ihl, payload)
            }
            ETHERTYPE_IPV6 => {
                let hdr = ip.get(..40)?;
                if hdr[0] >> 4 != 6 || hdr[6] != PROTO_TCP {
                    return None;
                }
                let payload = usize::from(u16::from_be_bytes([hdr[4], hdr[5]]));
                ip.get(..40 + payload)?;
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src.copy_from_slice(&hdr[8..24]);
                dst.copy_from_slice(&hdr[24..40]);
                (src, dst, 40, payload)
            }
            _ => return None,
        };
        let tcp_start = ETH_HLEN + ip_hlen;
        let tcp = frame.get(tcp_start..tcp_start + ip_payload)?;
        let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
        if data_offset < TCP_MIN_HLEN || data_offset > tcp.len() {
            return None;
        }
        // The pseudo header: both addresses (4 or 16 bytes each), the protocol, the length.
        let addr_bytes = if ethertype == ETHERTYPE_IPV4 {
            &frame[ETH_HLEN + 12..ETH_HLEN + 20]
        } else {
            &frame[ETH_HLEN + 8..ETH_HLEN + 40]
        };
        let pseudo_sum = u32::from(ones_complement_sum(addr_bytes))
            + u32::from(PROTO_TCP)
            + (ip_payload as u32 >> 16)
            + (ip_payload as u32 & 0xffff);
        Some(Segment {
            pseudo_sum,
            tcp_start,
            tcp_len: ip_payload,
            src,
            dst,
            src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
            dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            flags: tcp[TCP_FLAGS],
        })
    }

    /// Sets the ACK flag and acknowledgment number `ack` in `frame` (the one parsed) and
    /// redoes the TCP checksum.
    fn acknowledge(&self, frame: &mut [u8], ack: u32) {
        let tcp = &mut frame[self.tcp_start..self.tcp_start + self.tcp_len];
        tcp[TCP_FLAGS] |= TCP_ACK;
        tcp[TCP_ACK_NUM..TCP_ACK_NUM + 4].copy_from_slice(&ack.to_be_bytes());
        self.redo_checksum(frame);
    }

    /// Stores the right TCP checksum in `frame` (the one parsed).
    fn redo_checksum(&self, frame: &mut [u8]) {
        let field = self.tcp_start + TCP_CHECKSUM;
        frame[field..field + 2].fill(0);
        let sum = !self.sum(frame);
        frame[field..field + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// The folded ones' complement sum of the pseudo header and the segment in `frame`.
    fn sum(&self, frame: &[u8]) -> u16 {
        let tcp = &frame[self.tcp_start..self.tcp_start + self.tcp_len];
        let mut sum = self.pseudo_sum + u32::from(ones_complement_sum(tcp));
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }
}

/// An IPv4 address as the IPv4-mapped IPv6 address `::ffff:a.b.c.d`.
fn mapped(v4: &[u8]) -> [u8; 16] {
    let mut addr = [0u8; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..16].copy_from_slice(v4);
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame with a correct checksum.
    fn tcp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, seq: u32, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HLEN];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[TCP_FLAGS] = flags;
        f.extend_from_slice(&tcp);
        let seg = Segment::parse(&f).unwrap();
        seg.redo_checksum(&mut f);
        f
    }

    /// Whether the frame's TCP checksum verifies (pseudo header and segment, checksum
    /// included, sum to 0xffff).
    fn checksum_ok(f: &[u8]) -> bool {
        Segment::parse(f).unwrap().sum(f) == 0xffff
    }

    const GUEST: [u8; 4] = [10, 0, 2, 15];
    const REMOTE: [u8; 4] = [10, 99, 0, 1];

    #[test]
    fn a_bare_rst_answering_the_guests_syn_becomes_rst_ack() {
        let mut h = Handshakes::default();
        h.on_guest_frame(&tcp4(GUEST, 40000, REMOTE, 5432, 0xffff_ffff, TCP_SYN));
        assert_eq!(h.len(), 1);
        let mut rst = tcp4(REMOTE, 5432, GUEST, 40000, 0, TCP_RST);
        assert!(checksum_ok(&rst));
        assert!(h.on_passt_frame(&mut rst));
        let tcp = &rst[ETH_HLEN + 20..];
        assert_eq!(tcp[TCP_FLAGS], TCP_RST | TCP_ACK);
        // The SYN's sequence + 1, wrapping.
        assert_eq!(&tcp[8..12], &0u32.to_be_bytes());
        assert!(
            checksum_ok(&rst),
            "the rewritten segment's checksum verifies"
        );
        assert!(h.is_empty());
        // Seen again (the frame waited for rx buffers): left as it is now.
        let again = rst.clone();
        assert!(!h.on_passt_frame(&mut rst));
        assert_eq!(rst, again);
    }

    #[test]
    fn other_frames_pass_untouched() {
        let mut h = Handshakes::default();
        h.on_guest_frame(&tcp4(GUEST, 40000, REMOTE, 5432, 7, TCP_SYN));
        // A RST for another flow, a RST that has its ACK, a SYN+ACK that answers.
        for mut frame in [
            tcp4(REMOTE, 5433, GUEST, 40000, 0, TCP_RST),
            tcp4(REMOTE, 5432, GUEST, 40001, 0, TCP_RST),
            tcp4([10, 99, 0, 2], 5432, GUEST, 40000, 0, TCP_RST),
        ] {
            let before = frame.clone();
            assert!(!h.on_passt_frame(&mut frame));
            assert_eq!(frame, before);
        }
        assert_eq!(h.len(), 1);
        let mut synack = tcp4(REMOTE, 5432, GUEST, 40000, 99, TCP_SYN | TCP_ACK);
        let before = synack.clone();
        assert!(!h.on_passt_frame(&mut synack));
        assert_eq!(synack, before);
        assert!(h.is_empty(), "an answered handshake is forgotten");
        // A later bare RST (an established connection's) is not made into anything else.
        let mut rst = tcp4(REMOTE, 5432, GUEST, 40000, 100, TCP_RST);
        assert!(!h.on_passt_frame(&mut rst));
    }

    #[test]
    fn the_guest_giving_up_or_retransmitting_updates_the_handshake() {
        let mut h = Handshakes::default();
        h.on_guest_frame(&tcp4(GUEST, 40000, REMOTE, 80, 1, TCP_SYN));
        h.on_guest_frame(&tcp4(GUEST, 40000, REMOTE, 80, 1, TCP_SYN));
        assert_eq!(h.len(), 1, "a retransmitted SYN is one handshake");
        h.on_guest_frame(&tcp4(GUEST, 40000, REMOTE, 80, 2, TCP_RST));
        assert!(h.is_empty());
        // A SYN+ACK from the guest (it accepts a connection) is no handshake of its own.
        h.on_guest_frame(&tcp4(GUEST, 9000, REMOTE, 5555, 3, TCP_SYN | TCP_ACK));
        assert!(h.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_oldest() {
        let mut h = Handshakes::default();
        for port in 0..(MAX_PENDING as u16 + 10) {
            h.on_guest_frame(&tcp4(GUEST, 30000 + port, REMOTE, 80, 5, TCP_SYN));
        }
        assert_eq!(h.len(), MAX_PENDING);
        let mut oldest = tcp4(REMOTE, 80, GUEST, 30000, 0, TCP_RST);
        assert!(!h.on_passt_frame(&mut oldest));
        let mut newest = tcp4(
            REMOTE,
            80,
            GUEST,
            30000 + MAX_PENDING as u16 + 9,
            0,
            TCP_RST,
        );
        assert!(h.on_passt_frame(&mut newest));
    }

    #[test]
    fn ipv6_refusals_are_mended_too() {
        let guest6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0f];
        let remote6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01];
        let frame6 = |src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, flags: u8| {
            let mut f = vec![0u8; ETH_HLEN];
            f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = PROTO_TCP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src);
            ip[24..40].copy_from_slice(&dst);
            f.extend_from_slice(&ip);
            let mut tcp = [0u8; 20];
            tcp[0..2].copy_from_slice(&sport.to_be_bytes());
            tcp[2..4].copy_from_slice(&dport.to_be_bytes());
            tcp[4..8].copy_from_slice(&41u32.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[TCP_FLAGS] = flags;
            f.extend_from_slice(&tcp);
            let seg = Segment::parse(&f).unwrap();
            seg.redo_checksum(&mut f);
            f
        };
        let mut h = Handshakes::default();
        h.on_guest_frame(&frame6(guest6, 50000, remote6, 443, TCP_SYN));
        let mut rst = frame6(remote6, 443, guest6, 50000, TCP_RST);
        assert!(h.on_passt_frame(&mut rst));
        let tcp = &rst[ETH_HLEN + 40..];
        assert_eq!(tcp[TCP_FLAGS], TCP_RST | TCP_ACK);
        assert_eq!(&tcp[8..12], &42u32.to_be_bytes());
        assert!(checksum_ok(&rst));
    }

    #[test]
    fn truncated_and_odd_frames_are_ignored_without_panic() {
        let mut h = Handshakes::default();
        let syn = tcp4(GUEST, 40000, REMOTE, 80, 1, TCP_SYN);
        h.on_guest_frame(&syn);
        let rst = tcp4(REMOTE, 80, GUEST, 40000, 0, TCP_RST);
        for cut in 0..rst.len() {
            let mut f = rst[..cut].to_vec();
            assert!(!h.on_passt_frame(&mut f), "cut at {cut}");
        }
        // A header length beyond the packet, a fragment, a data offset below 5.
        let mut bad_ihl = rst.clone();
        bad_ihl[ETH_HLEN] = 0x4f;
        let mut fragment = rst.clone();
        fragment[ETH_HLEN + 7] = 1;
        let mut short_offset = rst.clone();
        short_offset[ETH_HLEN + 20 + 12] = 4 << 4;
        for mut f in [bad_ihl, fragment, short_offset] {
            assert!(!h.on_passt_frame(&mut f));
        }
        assert_eq!(h.len(), 1);
        let mut f = rst.clone();
        assert!(h.on_passt_frame(&mut f));
    }
}
