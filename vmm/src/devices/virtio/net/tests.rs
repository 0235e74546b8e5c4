//! virtio-net driven by a simulated guest driver through guest memory (no KVM), with the
//! other end of a socketpair standing in for passt.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::backend::{MAX_PREFIX_LEN, TX_HIGH_WATER};
use super::persist::NetState;
use super::tx::{complete_checksum, ones_complement_sum};
use super::*;
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportArgs};
use crate::devices::virtio::test_utils::*;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{BusDevice, Persist};
use crate::memory::GuestMemory;

const NEEDS_CSUM: u8 = 1;
/// passt's own MAC, as the source of the frames it sends.
const PASST_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

struct Guest {
    mem: GuestMemory,
    t: MmioTransport<Net>,
    irq: Arc<CountingInterrupt>,
    rxq: GuestQueue,
    txq: GuestQueue,
    alloc: Alloc,
    /// rx chain head -> (buffer address, buffer length)
    rx_bufs: HashMap<u16, (u64, u32)>,
    /// passt's end of the socket.
    peer: UnixStream,
}

/// The driver's handshake (as test_utils::init_device) accepting `wanted` of what is offered.
fn init_with(t: &mut MmioTransport<Net>, queues: &[&GuestQueue], wanted: u64) -> u32 {
    write_reg(t, REG_STATUS, 0);
    add_status(t, S_ACK);
    add_status(t, S_DRIVER);
    let offered = device_features(t);
    write_driver_features(t, offered & wanted);
    add_status(t, S_FEATURES_OK);
    for (i, q) in queues.iter().enumerate() {
        setup_queue(t, i as u32, q);
    }
    add_status(t, S_DRIVER_OK)
}

impl Guest {
    fn new() -> Guest {
        Guest::with_features(FEATURES)
    }

    fn with_features(wanted: u64) -> Guest {
        let (dev, peer) = UnixStream::pair().unwrap();
        let net = Net::with_stream(dev, "passt.sock".into(), DEFAULT_MAC).unwrap();
        Guest::on(net, peer, wanted)
    }

    fn on(net: Net, peer: UnixStream, wanted: u64) -> Guest {
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mem = guest_memory();
        let (mut t, irq) = transport(net, &mem);
        let rxq = GuestQueue::new(0x10000, QUEUE_SIZE);
        let txq = GuestQueue::new(0x20000, QUEUE_SIZE);
        let status = init_with(&mut t, &[&rxq, &txq], wanted);
        assert_eq!(status, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        Guest {
            mem,
            t,
            irq,
            rxq,
            txq,
            alloc: Alloc::default(),
            rx_bufs: HashMap::new(),
            peer,
        }
    }

    fn notify(&mut self, queue: u32) {
        write_reg(&mut self.t, REG_QUEUE_NOTIFY, queue);
    }

    /// Posts `n` receive buffers of `size` bytes (one descriptor each, as Linux's mergeable
    /// buffers) and notifies.
    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let addr = self.alloc.take(u64::from(size));
            let head = self.rxq.add_chain(
                &self.mem,
                &[Buf {
                    addr,
                    len: size,
                    write: true,
                }],
            );
            self.rx_bufs.insert(head, (addr, size));
        }
        self.notify(0);
    }

    /// Puts a header and a frame on the tx queue as two descriptors and notifies.
    fn send(&mut self, hdr: [u8; HDR_LEN], frame: &[u8]) {
        let h = self.alloc.take(HDR_LEN as u64);
        let f = self.alloc.take(frame.len() as u64);
        self.mem.write_slice(&hdr, GuestAddress(h)).unwrap();
        self.mem.write_slice(frame, GuestAddress(f)).unwrap();
        self.send_chain(&[
            Buf {
                addr: h,
                len: HDR_LEN as u32,
                write: false,
            },
            Buf {
                addr: f,
                len: frame.len() as u32,
                write: false,
            },
        ]);
    }

    fn send_chain(&mut self, bufs: &[Buf]) {
        self.txq.add_chain(&self.mem, bufs);
        self.notify(1);
    }

    fn tx_used(&mut self) -> Vec<(u16, u32)> {
        std::iter::from_fn(|| self.txq.pop_used(&self.mem)).collect()
    }

    /// Every frame the device put on the rx used ring: (header, frame), checking that each
    /// buffer's used length fits it and that merged frames hold together.
    fn rx_frames(&mut self) -> Vec<([u8; HDR_LEN], Vec<u8>)> {
        let mut out = Vec::new();
        while let Some((head, len)) = self.rxq.pop_used(&self.mem) {
            let (addr, size) = self.rx_bufs.remove(&head).expect("unknown rx head");
            assert!(
                len <= size,
                "used length {len} beyond the {size}-byte buffer"
            );
            assert!(
                len as usize >= HDR_LEN,
                "used length {len} without a header"
            );
            let mut data = vec![0u8; len as usize];
            self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
            let hdr: [u8; HDR_LEN] = data[..HDR_LEN].try_into().unwrap();
            let mut frame = data[HDR_LEN..].to_vec();
            let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]);
            for _ in 1..num_buffers {
                let (head, len) = self.rxq.pop_used(&self.mem).expect("merged buffer missing");
                let (addr, size) = self.rx_bufs.remove(&head).expect("unknown rx head");
                assert!(len <= size);
                let mut more = vec![0u8; len as usize];
                self.mem.read_slice(&mut more, GuestAddress(addr)).unwrap();
                frame.extend_from_slice(&more);
            }
            out.push((hdr, frame));
        }
        out
    }

    /// Raw used elements of the rx queue.
    fn rx_used(&mut self) -> Vec<(u16, u32)> {
        std::iter::from_fn(|| self.rxq.pop_used(&self.mem)).collect()
    }

    fn peer_send(&mut self, frame: &[u8]) {
        self.peer
            .write_all(&(frame.len() as u32).to_be_bytes())
            .unwrap();
        self.peer.write_all(frame).unwrap();
    }

    fn peer_recv(&mut self) -> Vec<u8> {
        let mut len = [0u8; 4];
        self.peer.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        self.peer.read_exact(&mut frame).unwrap();
        frame
    }

    /// Whether passt's end has nothing to read (without blocking).
    fn peer_idle(&mut self) -> bool {
        self.peer.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let idle = matches!(self.peer.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
        self.peer.set_nonblocking(false).unwrap();
        idle
    }

    fn pump(&mut self) {
        self.t.process_host_events();
    }

    fn net(&self) -> &Net {
        self.t.device()
    }
}

/// An Ethernet frame of `len` bytes from passt to the guest (or back), bytes seeded by `seed`.
fn eth_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&DEFAULT_MAC.0);
    f.extend_from_slice(&PASST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend((0..len.saturating_sub(14)).map(|i| (i as u8).wrapping_mul(31) ^ seed));
    f.truncate(len);
    f
}

fn plain_hdr() -> [u8; HDR_LEN] {
    [0; HDR_LEN]
}

fn csum_hdr(start: u16, offset: u16) -> [u8; HDR_LEN] {
    let mut h = [0u8; HDR_LEN];
    h[0] = NEEDS_CSUM;
    h[6..8].copy_from_slice(&start.to_le_bytes());
    h[8..10].copy_from_slice(&offset.to_le_bytes());
    h
}

/// RFC 1071 written the obvious way: big-endian words, carries folded at the end.
fn reference_sum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u64::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// A TCP/IPv4 frame as Linux hands it over with CHECKSUM_PARTIAL: the TCP checksum field holds
/// the folded pseudo-header sum. Returns the frame and the pseudo header.
fn tcp4_partial(payload_len: usize) -> (Vec<u8>, Vec<u8>) {
    let tcp_len = 20 + payload_len;
    let mut f = eth_frame(14, 0);
    let (src, dst) = ([10, 0, 2, 15], [93, 184, 216, 34]);
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0];
    ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let ip_sum = !reference_sum(&ip);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
    let mut tcp = vec![
        0x9c, 0x40, 0x00, 0x50, 1, 2, 3, 4, 5, 6, 7, 8, 0x50, 0x18, 0xff, 0xff,
    ];
    tcp.extend_from_slice(&reference_sum(&pseudo).to_be_bytes());
    tcp.extend_from_slice(&[0, 0]);
    tcp.extend((0..payload_len).map(|i| (i * 7 + 3) as u8));
    f.extend_from_slice(&tcp);
    (f, pseudo)
}

/// A UDP/IPv6 frame with a partial checksum, likewise.
fn udp6_partial(payload_len: usize) -> (Vec<u8>, Vec<u8>) {
    let udp_len = 8 + payload_len;
    let mut f = eth_frame(12, 0);
    f.extend_from_slice(&[0x86, 0xdd]);
    let src: Vec<u8> = (0..16u8).map(|i| 0xfd_u8.wrapping_add(i)).collect();
    let dst: Vec<u8> = (0..16).map(|i| 0x20 + i * 3).collect();
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(udp_len as u16).to_be_bytes());
    f.extend_from_slice(&[17, 64]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&(udp_len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    let mut udp = vec![0x13, 0x88, 0x00, 0x35];
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&reference_sum(&pseudo).to_be_bytes());
    udp.extend((0..payload_len).map(|i| (i * 13 + 1) as u8));
    f.extend_from_slice(&udp);
    (f, pseudo)
}

/// Whether the L4 checksum of `segment` (from the L4 header on) verifies with `pseudo`.
fn l4_checksum_ok(pseudo: &[u8], segment: &[u8]) -> bool {
    let mut all = pseudo.to_vec();
    all.extend_from_slice(segment);
    reference_sum(&all) == 0xffff
}

#[test]
fn offers_its_features_and_config_space() {
    let mut g = Guest::new();
    assert_eq!(read_reg(&mut g.t, REG_DEVICE_ID), 1);
    assert_eq!(device_features(&mut g.t), FEATURES);
    let mut config = [0u8; 12];
    for (i, b) in config.iter_mut().enumerate() {
        let mut byte = [0u8];
        g.t.read(CONFIG + i as u64, &mut byte);
        *b = byte[0];
    }
    assert_eq!(&config[0..6], &DEFAULT_MAC.0);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 65520, "MTU");
    // Nothing a driver could turn on that the device does not do.
    for bit in [1, 6, 7, 8, 10, 11, 12, 14, 17, 22, 28, 29] {
        assert_eq!(
            FEATURES & (1 << bit),
            0,
            "feature bit {bit} must not be offered"
        );
    }
}

#[test]
fn mac_addresses_parse_print_and_refuse_garbage() {
    let mac: MacAddr = "02:AB:cd:00:10:ff".parse().unwrap();
    assert_eq!(mac.0, [0x02, 0xab, 0xcd, 0x00, 0x10, 0xff]);
    assert_eq!(mac.to_string(), "02:ab:cd:00:10:ff");
    assert_eq!(DEFAULT_MAC.to_string(), "02:66:6e:76:6d:00");
    for bad in [
        "",
        "02:ab:cd:00:10",
        "02:ab:cd:00:10:ff:00",
        "2:ab:cd:00:10:ff",
        "zz:...",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad:?} parsed");
    }
    let json = serde_json::to_string(&mac).unwrap();
    assert_eq!(json, "\"02:ab:cd:00:10:ff\"");
    assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), mac);
}

#[test]
fn a_guest_frame_reaches_passt_length_prefixed() {
    let mut g = Guest::new();
    let frame = eth_frame(1514, 1);
    g.send(plain_hdr(), &frame);
    assert_eq!(g.peer_recv(), frame);
    assert_eq!(g.tx_used().len(), 1);
    // Header and frame in one descriptor, as a driver may also lay them out.
    let frame = eth_frame(60, 2);
    let addr = g.alloc.take((HDR_LEN + frame.len()) as u64);
    g.mem.write_slice(&plain_hdr(), GuestAddress(addr)).unwrap();
    g.mem
        .write_slice(&frame, GuestAddress(addr + HDR_LEN as u64))
        .unwrap();
    g.send_chain(&[Buf {
        addr,
        len: (HDR_LEN + frame.len()) as u32,
        write: false,
    }]);
    assert_eq!(g.peer_recv(), frame);
    assert!(g.irq.count() >= 2, "tx completions interrupt the guest");
    assert_eq!(g.net().counters().tx_frames, 2);
}

#[test]
fn partial_checksums_are_completed_before_passt_sees_the_frame() {
    let mut g = Guest::new();
    for payload in [0, 1, 1000, 1459, 65_000] {
        let (frame, pseudo) = tcp4_partial(payload);
        assert!(
            !l4_checksum_ok(&pseudo, &frame[34..]),
            "partial is not complete"
        );
        g.send(csum_hdr(34, 16), &frame);
        let got = g.peer_recv();
        assert_eq!(got.len(), frame.len());
        assert_eq!(
            &got[..50],
            &frame[..50],
            "nothing before the checksum changed"
        );
        assert_eq!(
            &got[52..],
            &frame[52..],
            "nothing after the checksum changed"
        );
        assert!(
            l4_checksum_ok(&pseudo, &got[34..]),
            "TCP checksum of {payload} bytes"
        );
    }
    for payload in [0, 7, 1232] {
        let (frame, pseudo) = udp6_partial(payload);
        g.send(csum_hdr(54, 6), &frame);
        let got = g.peer_recv();
        assert!(
            l4_checksum_ok(&pseudo, &got[54..]),
            "UDP checksum of {payload} bytes"
        );
        assert_ne!(&got[60..62], &[0, 0], "a UDP checksum is never sent as 0");
    }
    // Without NEEDS_CSUM the frame goes as it is, checksum field untouched.
    let (frame, _) = tcp4_partial(10);
    g.send(plain_hdr(), &frame);
    assert_eq!(g.peer_recv(), frame);
}

/// passt's answer to a refused connection (Debian 12's passt): a RST without ACK, its
/// checksum complete, from the remote end of [`tcp4_partial`]'s flow back to the guest.
fn tcp4_bare_rst() -> Vec<u8> {
    let mut f = eth_frame(14, 0);
    let (src, dst) = ([93, 184, 216, 34], [10, 0, 2, 15]);
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let ip_sum = !reference_sum(&ip);
    ip[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut tcp = vec![
        0x00, 0x50, 0x9c, 0x40, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x04, 0, 0,
    ];
    tcp.extend_from_slice(&[0, 0, 0, 0]);
    let mut all = [&src[..], &dst[..], &[0, 6, 0, 20]].concat();
    all.extend_from_slice(&tcp);
    let sum = !reference_sum(&all);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&tcp);
    f
}

#[test]
fn a_refused_connection_reaches_the_guest_as_rst_ack_answering_its_syn() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    // The guest's SYN, checksum left to the device as Linux leaves it; seq 0x01020304.
    let (mut syn, pseudo) = tcp4_partial(0);
    syn[ETH_HLEN + 20 + 13] = 0x02;
    g.send(csum_hdr(34, 16), &syn);
    assert!(l4_checksum_ok(&pseudo, &g.peer_recv()[34..]));
    // passt refuses it with a bare RST, which a TCP in SYN-SENT would drop.
    g.peer_send(&tcp4_bare_rst());
    g.pump();
    let got = g.rx_frames();
    assert_eq!(got.len(), 1);
    let rst = &got[0].1;
    let tcp = &rst[34..];
    assert_eq!(tcp[13], 0x14, "RST+ACK");
    assert_eq!(&tcp[8..12], &0x01020305u32.to_be_bytes(), "acks the SYN");
    let pseudo = [&[93, 184, 216, 34][..], &[10, 0, 2, 15], &[0, 6, 0, 20]].concat();
    assert!(l4_checksum_ok(&pseudo, tcp), "its checksum redone");
    assert_eq!(g.net().counters().refusals, 1);
    // A bare RST for no handshake of the guest's goes in as passt sent it.
    g.peer_send(&tcp4_bare_rst());
    g.pump();
    let got = g.rx_frames();
    assert_eq!(got[0].1, tcp4_bare_rst());
    assert_eq!(g.net().counters().refusals, 1);
}

#[test]
fn the_checksum_sum_matches_rfc_1071_for_every_length_and_alignment() {
    let mut x: u32 = 12345;
    let data: Vec<u8> = (0..4099)
        .map(|_| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (x >> 16) as u8
        })
        .collect();
    for start in 0..5 {
        for len in (0..200).chain([1499, 1500, 4094]) {
            let d = &data[start..start + len];
            assert_eq!(
                ones_complement_sum(d),
                reference_sum(d),
                "len {len} at {start}"
            );
        }
    }
    let all_ff = vec![0xffu8; 65_535];
    assert_eq!(ones_complement_sum(&all_ff), reference_sum(&all_ff));
    // A field that sums to zero is written as 0xffff.
    let mut f = vec![0u8; 20];
    complete_checksum(&mut f, 0, 4).unwrap();
    assert_eq!(&f[4..6], &[0xff, 0xff]);
    assert!(
        complete_checksum(&mut f, 10, 9).is_err(),
        "field past the end"
    );
    assert!(complete_checksum(&mut f, u16::MAX, u16::MAX).is_err());
}

#[test]
fn a_frame_from_passt_lands_in_one_rx_buffer_with_a_header() {
    let mut g = Guest::new();
    g.post_rx(8, 4096);
    let before = g.irq.count();
    let frame = eth_frame(100, 3);
    g.peer_send(&frame);
    g.pump();
    let got = g.rx_frames();
    assert_eq!(got.len(), 1);
    let (hdr, data) = &got[0];
    assert_eq!(
        hdr[0], 0,
        "no flags: no DATA_VALID (GUEST_CSUM is not offered)"
    );
    assert_eq!(hdr[1], 0, "GSO_NONE");
    assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
    assert_eq!(data, &frame);
    assert!(g.irq.count() > before, "the guest is interrupted");
    assert_eq!(g.net().counters().rx_frames, 1);
}

#[test]
fn a_large_frame_is_spread_over_several_buffers_with_num_buffers() {
    let mut g = Guest::new();
    g.post_rx(32, 2048);
    let frame = eth_frame(5000, 4);
    g.peer_send(&frame);
    g.pump();
    let used = g.rx_used_peek_lengths();
    assert_eq!(used, [2048, 2048, (HDR_LEN + 5000 - 4096) as u32]);
    // The largest frame the guest can get (MTU 65520 + Ethernet header), over page buffers.
    let mut g = Guest::new();
    g.post_rx(20, 4096);
    let frame = eth_frame(MAX_RX_FRAME, 5);
    g.peer_send(&frame);
    g.pump();
    let got = g.rx_frames();
    assert_eq!(got.len(), 1);
    assert_eq!(
        u16::from_le_bytes([got[0].0[10], got[0].0[11]]),
        (HDR_LEN + MAX_RX_FRAME).div_ceil(4096) as u16
    );
    assert_eq!(got[0].1, frame);
}

impl Guest {
    /// Pops the rx used elements, checks the merged frame, and returns the used lengths.
    fn rx_used_peek_lengths(&mut self) -> Vec<u32> {
        let used = self.rx_used();
        let lens = used.iter().map(|&(_, len)| len).collect();
        for (head, _) in used {
            self.rx_bufs.remove(&head);
        }
        lens
    }
}

#[test]
fn frames_wait_for_rx_buffers_and_follow_when_they_come() {
    let mut g = Guest::new();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| eth_frame(200 + i * 100, i as u8)).collect();
    for f in &frames {
        g.peer_send(f);
    }
    g.pump();
    let before = g.irq.count();
    assert!(g.rx_used().is_empty());
    assert_eq!(g.irq.count(), before, "no buffers, no interrupt");
    // One buffer: one frame; then the rest when more buffers come.
    g.post_rx(1, 2048);
    let got = g.rx_frames();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frames[0]);
    assert!(g.irq.count() > before);
    g.post_rx(4, 2048);
    let got: Vec<Vec<u8>> = g.rx_frames().into_iter().map(|(_, f)| f).collect();
    assert_eq!(got, &frames[1..]);
}

#[test]
fn a_frame_waits_until_enough_buffers_for_all_of_it_arrived() {
    let mut g = Guest::new();
    g.post_rx(1, 2048);
    let frame = eth_frame(5000, 9);
    g.peer_send(&frame);
    g.pump();
    assert!(g.rx_used().is_empty(), "never half a frame");
    g.post_rx(2, 2048);
    let got = g.rx_frames();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame);
}

#[test]
fn frames_split_anywhere_by_the_socket_are_put_together() {
    let mut g = Guest::new();
    g.post_rx(8, 4096);
    let frame = eth_frame(3000, 7);
    let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&frame);
    for chunk in [&wire[..2], &wire[2..5], &wire[5..2000], &wire[2000..]] {
        g.peer.write_all(chunk).unwrap();
        g.pump();
    }
    let got = g.rx_frames();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, frame);
}

#[test]
fn without_mergeable_buffers_a_frame_takes_one_chain_or_is_dropped() {
    let mut g = Guest::with_features(FEATURES & !(1 << VIRTIO_NET_F_MRG_RXBUF));
    g.post_rx(2, 1600);
    g.peer_send(&eth_frame(3000, 1));
    let small = eth_frame(1500, 2);
    g.peer_send(&small);
    g.pump();
    let got = g.rx_frames();
    assert_eq!(got.len(), 1, "the 3000-byte frame does not fit one buffer");
    assert_eq!(got[0].1, small);
    assert_eq!(u16::from_le_bytes([got[0].0[10], got[0].0[11]]), 1);
    assert_eq!(g.net().counters().rx_dropped, 1);
}

#[test]
fn frames_too_short_or_too_long_for_the_guest_are_dropped() {
    let mut g = Guest::new();
    g.post_rx(40, 4096);
    g.peer_send(&[0u8; 10]);
    g.peer_send(&eth_frame(MAX_RX_FRAME + 1, 1));
    let ok = eth_frame(64, 2);
    g.peer_send(&ok);
    g.pump();
    let got = g.rx_frames();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, ok);
    assert_eq!(g.net().counters().rx_dropped, 2);
    assert!(g.net().is_connected());
}

#[test]
fn hostile_tx_chains_are_consumed_and_dropped_without_harm() {
    let mut g = Guest::new();
    let frame = eth_frame(100, 1);
    let addr = g.alloc.take(256);
    g.mem.write_slice(&plain_hdr(), GuestAddress(addr)).unwrap();
    g.mem
        .write_slice(&frame, GuestAddress(addr + HDR_LEN as u64))
        .unwrap();
    let len = (HDR_LEN + frame.len()) as u32;
    // A device-writable descriptor in a tx chain.
    g.send_chain(&[
        Buf {
            addr,
            len: HDR_LEN as u32,
            write: false,
        },
        Buf {
            addr: addr + HDR_LEN as u64,
            len: frame.len() as u32,
            write: true,
        },
    ]);
    // A buffer outside guest memory, and one that wraps the address space.
    g.send_chain(&[Buf {
        addr: MEM_SIZE as u64 - 16,
        len,
        write: false,
    }]);
    g.send_chain(&[Buf {
        addr: u64::MAX - 4,
        len,
        write: false,
    }]);
    // Shorter than the header; header only; a frame shorter than an Ethernet header.
    g.send_chain(&[Buf {
        addr,
        len: 8,
        write: false,
    }]);
    g.send_chain(&[Buf {
        addr,
        len: HDR_LEN as u32,
        write: false,
    }]);
    g.send_chain(&[Buf {
        addr,
        len: HDR_LEN as u32 + 13,
        write: false,
    }]);
    // GSO (not offered) and a checksum position past the frame.
    let mut gso = plain_hdr();
    gso[1] = 1;
    g.send(gso, &frame);
    g.send(csum_hdr(90, 16), &frame);
    // Longer than passt takes.
    g.send(plain_hdr(), &eth_frame(MAX_TX_FRAME + 1, 0));
    // A descriptor that chains to itself: the walk ends, the frame is too long or dropped.
    let looping = 200;
    GuestQueue::write_desc(&g.mem, g.txq.desc, looping, addr, 4096, 1, looping);
    g.txq.publish(&g.mem, looping);
    g.notify(1);
    assert_eq!(g.tx_used().len(), 10, "every chain is given back");
    assert!(g.peer_idle(), "nothing reached passt");
    let c = g.net().counters();
    assert_eq!((c.tx_frames, c.tx_dropped), (0, 10));
    assert_eq!(c.bad_chains, 3);
    // The device goes on working.
    g.send(plain_hdr(), &frame);
    assert_eq!(g.peer_recv(), frame);
}

#[test]
fn hostile_rx_chains_are_returned_empty_and_the_frame_takes_the_next_good_one() {
    let mut g = Guest::new();
    let a = g.alloc.take(4096);
    // A read-only rx buffer, one outside guest memory, one too small for the header.
    for buf in [
        Buf {
            addr: a,
            len: 4096,
            write: false,
        },
        Buf {
            addr: MEM_SIZE as u64,
            len: 4096,
            write: true,
        },
        Buf {
            addr: a,
            len: 8,
            write: true,
        },
    ] {
        let head = g.rxq.add_chain(&g.mem, &[buf]);
        g.rx_bufs.insert(head, (a, buf.len));
    }
    g.post_rx(2, 2048);
    let frame = eth_frame(3000, 3);
    g.peer_send(&frame);
    g.pump();
    let used = g.rx_used();
    let lens: Vec<u32> = used.iter().map(|&(_, l)| l).collect();
    assert_eq!(lens, [0, 0, 0, 2048, (HDR_LEN + 3000 - 2048) as u32]);
    let mut data = Vec::new();
    for &(head, len) in &used[3..] {
        let (addr, _) = g.rx_bufs[&head];
        let mut d = vec![0u8; len as usize];
        g.mem.read_slice(&mut d, GuestAddress(addr)).unwrap();
        data.extend_from_slice(&d);
    }
    assert_eq!(u16::from_le_bytes([data[10], data[11]]), 2);
    assert_eq!(&data[HDR_LEN..], &frame[..]);
    assert_eq!(g.net().counters().bad_chains, 3);
}

#[test]
fn a_frame_larger_than_every_buffer_the_queue_can_hold_is_dropped() {
    let mut g = Guest::new();
    g.post_rx(usize::from(QUEUE_SIZE), 64);
    g.peer_send(&eth_frame(20_000, 1));
    let small = eth_frame(40, 2);
    g.peer_send(&small);
    g.pump();
    let got = g.rx_frames();
    assert_eq!(got.len(), 1, "the small frame still gets through");
    assert_eq!(got[0].1, small);
    assert_eq!(g.net().counters().rx_dropped, 1);
}

#[test]
fn an_oversize_length_prefix_closes_the_backend_and_the_device_goes_on() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    g.peer
        .write_all(&((MAX_PREFIX_LEN + 1) as u32).to_be_bytes())
        .unwrap();
    g.peer.write_all(&[0u8; 64]).unwrap();
    g.pump();
    assert!(!g.net().is_connected());
    let mut b = [0u8; 1];
    assert_eq!(
        g.peer.read(&mut b).unwrap(),
        0,
        "passt sees the connection end"
    );
    assert!(g.rx_used().is_empty());
    // Guest frames are consumed and dropped from now on.
    g.send(plain_hdr(), &eth_frame(100, 1));
    assert_eq!(g.tx_used().len(), 1);
    assert_eq!(g.net().counters().tx_dropped, 1);
}

#[test]
fn a_backend_that_hangs_up_leaves_a_device_that_drops_frames() {
    let mut g = Guest::new();
    g.post_rx(4, 4096);
    let (_, spare) = UnixStream::pair().unwrap();
    drop(std::mem::replace(&mut g.peer, spare));
    g.pump();
    assert!(!g.net().is_connected());
    for i in 0..3 {
        g.send(plain_hdr(), &eth_frame(100, i));
    }
    assert_eq!(g.tx_used().len(), 3);
    assert_eq!(g.net().counters().tx_dropped, 3);
    // The guest can still reset and reinitialise the device.
    let status = init_with(&mut g.t, &[&g.rxq, &g.txq], FEATURES);
    assert_eq!(status & S_DRIVER_OK, S_DRIVER_OK);
}

#[test]
fn tx_stops_while_the_socket_is_full_and_resumes_when_it_drains() {
    let mut g = Guest::new();
    let frames: Vec<Vec<u8>> = (0..40).map(|i| eth_frame(60_000, i as u8)).collect();
    for f in &frames {
        g.send(plain_hdr(), f);
    }
    let taken = g.tx_used().len();
    assert!(
        taken < frames.len(),
        "with nobody reading, the device stops taking frames ({taken} taken)"
    );
    let pending = g.net().backend.as_ref().unwrap().tx_pending();
    assert!((TX_HIGH_WATER..TX_HIGH_WATER + 70_000).contains(&pending));
    // passt reads (on its own thread); every EPOLLOUT lets the device take more.
    let mut reader = g.peer.try_clone().unwrap();
    let count = frames.len();
    let passt = std::thread::spawn(move || {
        (0..count)
            .map(|_| {
                let mut len = [0u8; 4];
                reader.read_exact(&mut len).unwrap();
                let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
                reader.read_exact(&mut frame).unwrap();
                frame
            })
            .collect::<Vec<_>>()
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut used = taken;
    while !passt.is_finished() {
        assert!(std::time::Instant::now() < deadline, "tx never resumed");
        g.pump();
        used += g.tx_used().len();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        passt.join().unwrap(),
        frames,
        "every frame, in order, intact"
    );
    assert_eq!(used + g.tx_used().len(), frames.len());
    assert!(g.peer_idle());
}

#[test]
fn the_guest_is_not_interrupted_while_it_asked_for_quiet() {
    let mut g = Guest::new();
    g.post_rx(8, 4096);
    // VRING_AVAIL_F_NO_INTERRUPT, as Linux sets it while polling.
    g.mem.write_obj(1u16, GuestAddress(g.rxq.avail)).unwrap();
    let before = g.irq.count();
    g.peer_send(&eth_frame(100, 1));
    g.pump();
    assert_eq!(g.irq.count(), before);
    assert_eq!(g.rx_frames().len(), 1, "the frame is there all the same");
    g.mem.write_obj(0u16, GuestAddress(g.rxq.avail)).unwrap();
    g.peer_send(&eth_frame(100, 2));
    g.pump();
    assert!(g.irq.count() > before);
}

#[test]
fn a_reset_returns_nothing_and_keeps_the_backend() {
    let mut g = Guest::new();
    g.post_rx(1, 2048);
    g.peer_send(&eth_frame(5000, 1));
    g.pump();
    assert_eq!(g.net().rx_chains.len(), 1, "a chain waits for the frame");
    write_reg(&mut g.t, REG_STATUS, 0);
    assert!(g.net().rx_chains.is_empty());
    assert!(g.net().is_connected());
    g.rxq = GuestQueue::new(0x10000, QUEUE_SIZE);
    g.txq = GuestQueue::new(0x20000, QUEUE_SIZE);
    g.rx_bufs.clear();
    init_with(&mut g.t, &[&g.rxq, &g.txq], FEATURES);
    g.post_rx(4, 2048);
    assert_eq!(
        g.rx_frames()[0].1,
        eth_frame(5000, 1),
        "the frame waited in the backend"
    );
}

#[test]
fn snapshot_state_round_trips_and_a_restored_device_runs_on_a_new_backend() {
    let mut g = Guest::with_features(FEATURES);
    g.post_rx(1, 2048);
    // A frame that does not fit leaves the one buffer taken, waiting.
    g.peer_send(&eth_frame(5000, 1));
    g.pump();
    let waiting = g.net().rx_chains.front().cloned().unwrap();
    let state = g.net().save();
    assert_eq!(state.mac, DEFAULT_MAC);
    assert_eq!(state.rx_chains, std::slice::from_ref(&waiting));
    let json = serde_json::to_string(&state).unwrap();
    assert!(json.contains("\"02:66:6e:76:6d:00\""), "{json}");
    let back: NetState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state);
    let wrapped = serde_json::to_string(&g.net().device_state()).unwrap();
    assert!(wrapped.starts_with("{\"Net\":"), "{wrapped}");
    let transport = g.t.save();

    // The new VMM: a new passt, the same guest memory and queues.
    let (dev, peer) = UnixStream::pair().unwrap();
    let net = Net::restore_with_stream(dev, "new.sock".into(), &back).unwrap();
    assert_eq!(net.mac(), DEFAULT_MAC);
    let irq = Arc::new(CountingInterrupt::default());
    let mut t = MmioTransport::restore(
        MmioTransportArgs {
            device: net,
            mem: g.mem.clone(),
            interrupt: irq.clone(),
        },
        &transport,
    )
    .unwrap();
    assert!(t.is_running());
    std::mem::swap(&mut g.t, &mut t);
    g.peer = peer;
    g.peer
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    g.irq = irq;
    // The frame in flight is gone with the old passt; the saved buffer takes the next one.
    let frame = eth_frame(1000, 2);
    g.peer_send(&frame);
    g.pump();
    let used = g.rx_used();
    assert_eq!(used.len(), 1);
    assert_eq!(
        used[0].0, waiting.head,
        "the buffer saved in the snapshot is used first"
    );
    let (addr, _) = g.rx_bufs[&waiting.head];
    let mut got = vec![0u8; frame.len()];
    g.mem
        .read_slice(&mut got, GuestAddress(addr + HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, frame);
    assert!(g.irq.count() > 0);
    // And tx reaches the new passt.
    let out = eth_frame(300, 3);
    g.send(plain_hdr(), &out);
    assert_eq!(g.peer_recv(), out);
}

#[test]
fn a_saved_rx_buffer_outside_guest_memory_refuses_the_restore() {
    let g = Guest::new();
    let mut state = g.net().save();
    state.rx_chains.push(rx::RxChain {
        head: 3,
        segments: vec![(MEM_SIZE as u64, 4096)],
    });
    let transport = g.t.save();
    let (dev, _peer) = UnixStream::pair().unwrap();
    let net = Net::restore_with_stream(dev, "x".into(), &state).unwrap();
    let err = MmioTransport::restore(
        MmioTransportArgs {
            device: net,
            mem: g.mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
        },
        &transport,
    )
    .err()
    .expect("restore must fail");
    assert!(err.to_string().contains("not inside guest memory"), "{err}");
}

#[test]
fn connecting_needs_a_passt_socket_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("none.sock");
    let err = Net::connect(&path, DEFAULT_MAC).err().unwrap();
    assert!(err.to_string().contains("none.sock"), "{err}");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let net = Net::connect(&path, DEFAULT_MAC).unwrap();
    assert_eq!(net.socket_path(), path);
    assert!(listener.accept().is_ok());
}

/// A hostile guest on another vCPU keeps `queue`'s avail index 8 ahead of its used index
/// (every slot offering `head`) for 1 s, while the device is notified on `index` again and
/// again; returns the longest one notification kept the device busy and the most chains it
/// used meanwhile. Without a bound per notification the device chases the guest for as long
/// as that vCPU runs (tens of thousands of chains here), starving the VMM's event loop.
fn notify_while_a_guest_keeps_the_ring_full(
    g: &mut Guest,
    index: u32,
    ring: (u64, u64),
    head: u16,
) -> (Duration, u16) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (avail, used) = ring;
    for slot in 0..u64::from(QUEUE_SIZE) {
        g.mem
            .write_obj(head, GuestAddress(avail + 4 + 2 * slot))
            .unwrap();
    }
    let started = Arc::new(AtomicBool::new(false));
    let mem = g.mem.clone();
    let flag = started.clone();
    let window = Duration::from_secs(1);
    let chaser = std::thread::spawn(move || {
        let until = std::time::Instant::now() + window;
        while std::time::Instant::now() < until {
            let u: u16 = mem.load(GuestAddress(used + 2), Ordering::Acquire).unwrap();
            mem.store(
                u.wrapping_add(8),
                GuestAddress(avail + 2),
                Ordering::Release,
            )
            .unwrap();
            flag.store(true, Ordering::Release);
        }
    });
    while !started.load(Ordering::Acquire) {
        std::thread::yield_now();
    }
    let (mut longest, mut most) = (Duration::ZERO, 0);
    while !chaser.is_finished() {
        let before = g.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        let t0 = std::time::Instant::now();
        g.notify(index);
        longest = longest.max(t0.elapsed());
        let after = g.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
        most = most.max(after.wrapping_sub(before));
    }
    chaser.join().unwrap();
    (longest, most)
}

#[test]
fn a_guest_that_keeps_the_tx_ring_full_gets_one_queue_per_notification() {
    let mut g = Guest::new();
    // Head 0: a bare virtio-net header, no frame: dropped and used, nothing reaches passt.
    let hdr = g.alloc.take(HDR_LEN as u64);
    GuestQueue::write_desc(&g.mem, g.txq.desc, 0, hdr, HDR_LEN as u32, 0, 0);
    let ring = (g.txq.avail, g.txq.used);
    let (took, served) = notify_while_a_guest_keeps_the_ring_full(&mut g, 1, ring, 0);
    assert!(
        served <= QUEUE_SIZE && took < Duration::from_millis(500),
        "one tx notification served {served} chains in {took:?}"
    );
}

#[test]
fn a_guest_that_keeps_the_rx_ring_full_of_bad_buffers_gets_one_queue_per_notification() {
    let mut g = Guest::new();
    // A frame from passt waits; head 0 is a device-readable "rx buffer": returned unused.
    let frame = [0x5au8; 60];
    g.peer
        .write_all(&(frame.len() as u32).to_be_bytes())
        .unwrap();
    g.peer.write_all(&frame).unwrap();
    let buf = g.alloc.take(4096);
    GuestQueue::write_desc(&g.mem, g.rxq.desc, 0, buf, 4096, 0, 0);
    g.t.process_host_events();
    let ring = (g.rxq.avail, g.rxq.used);
    let (took, served) = notify_while_a_guest_keeps_the_ring_full(&mut g, 0, ring, 0);
    assert!(
        served <= QUEUE_SIZE && took < Duration::from_millis(500),
        "one rx notification returned {served} chains in {took:?}"
    );
}

#[test]
fn rx_buffers_too_small_for_any_frame_are_never_held_beyond_one_queue() {
    let mut g = Guest::new();
    let frame = [0x5au8; 60];
    let hdr_buf = g.alloc.take(HDR_LEN as u64);
    for round in 0..20 {
        // Each round: one frame from passt, and a queue's worth of chains that cannot hold
        // it (a header-sized first buffer, then empty ones), offered one at a time.
        g.peer
            .write_all(&(frame.len() as u32).to_be_bytes())
            .unwrap();
        g.peer.write_all(&frame).unwrap();
        g.t.process_host_events();
        for i in 0..QUEUE_SIZE {
            let len = if i == 0 { HDR_LEN as u32 } else { 0 };
            GuestQueue::write_desc(&g.mem, g.rxq.desc, i, hdr_buf, len, VRING_DESC_F_WRITE, 0);
            g.rxq.publish(&g.mem, i);
        }
        g.notify(0);
        let held = g.t.device().rx_chains.len();
        assert!(
            held <= usize::from(QUEUE_SIZE),
            "round {round}: the device holds {held} rx chains"
        );
    }
}
