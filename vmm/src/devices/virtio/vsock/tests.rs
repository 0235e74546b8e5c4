//! virtio-vsock driven by a simulated guest driver through guest memory, against real host
//! Unix sockets.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::persist::{VsockRestoreArgs, VsockState};
use super::*;
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportArgs};
use crate::devices::virtio::test_utils::*;
use crate::devices::Persist;
use crate::memory::GuestMemory;

const GUEST_CID: u64 = 3;
const RX_BUFS: usize = 64;
const RX_PAYLOAD: u32 = 4096;
const GUEST_BUF_ALLOC: u32 = 64 * 1024;

struct Guest {
    mem: GuestMemory,
    t: MmioTransport<Vsock>,
    irq: Arc<CountingInterrupt>,
    rxq: GuestQueue,
    txq: GuestQueue,
    evq: GuestQueue,
    alloc: Alloc,
    /// rx chain head -> (header addr, payload addr)
    rx_bufs: HashMap<u16, (u64, u64)>,
    dir: tempfile::TempDir,
    /// Bytes the guest consumed per (guest port): its fwd_cnt.
    fwd_cnt: HashMap<u32, u32>,
}

impl Guest {
    fn new() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let mem = guest_memory();
        let (mut t, irq) = transport(Vsock::new(GUEST_CID, &uds).unwrap(), &mem);
        let rxq = GuestQueue::new(0x10000, QUEUE_SIZE);
        let txq = GuestQueue::new(0x20000, QUEUE_SIZE);
        let evq = GuestQueue::new(0x30000, QUEUE_SIZE);
        let status = init_device(&mut t, &[&rxq, &txq, &evq]);
        assert_eq!(status, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        let mut g = Guest {
            mem,
            t,
            irq,
            rxq,
            txq,
            evq,
            alloc: Alloc::default(),
            rx_bufs: HashMap::new(),
            dir,
            fwd_cnt: HashMap::new(),
        };
        for _ in 0..RX_BUFS {
            // Two descriptors per buffer, header and payload, as Linux 6.1 posts them.
            let h = g.alloc.take(HDR_LEN as u64);
            let p = g.alloc.take(u64::from(RX_PAYLOAD));
            g.post_rx(h, p);
        }
        let ev = g.alloc.take(4);
        g.evq.add_chain(
            &g.mem,
            &[Buf {
                addr: ev,
                len: 4,
                write: true,
            }],
        );
        write_reg(&mut g.t, REG_QUEUE_NOTIFY, 0);
        g
    }

    fn uds(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    fn post_rx(&mut self, h: u64, p: u64) {
        let head = self.rxq.add_chain(
            &self.mem,
            &[
                Buf {
                    addr: h,
                    len: HDR_LEN as u32,
                    write: true,
                },
                Buf {
                    addr: p,
                    len: RX_PAYLOAD,
                    write: true,
                },
            ],
        );
        self.rx_bufs.insert(head, (h, p));
    }

    fn hdr(&self, src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.get(&src_port).copied().unwrap_or(0),
        }
    }

    /// Puts one packet (header and payload in one descriptor) on the tx queue and notifies.
    fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        let addr = self.alloc.take((HDR_LEN + payload.len()) as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        let len = (HDR_LEN + payload.len()) as u32;
        self.send_chain(&[Buf {
            addr,
            len,
            write: false,
        }]);
    }

    fn send_chain(&mut self, chain: &[Buf]) {
        self.txq.add_chain(&self.mem, chain);
        write_reg(&mut self.t, REG_QUEUE_NOTIFY, 1);
        while self.txq.pop_used(&self.mem).is_some() {}
        // The bump allocator would run out in long tests: tx buffers are reused from here.
        if self.alloc_used() > 12 << 20 {
            panic!("test guest memory nearly exhausted");
        }
    }

    fn alloc_used(&mut self) -> u64 {
        self.alloc.take(0) - BUFFERS_START
    }

    fn send(&mut self, src_port: u32, dst_port: u32, op: u16, payload: &[u8]) {
        let hdr = self.hdr(src_port, dst_port, op, payload.len() as u32);
        self.send_raw(hdr, payload);
    }

    /// Collects every packet the device put on the rx queue, reposting the buffers.
    fn recv(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut reposted = false;
        while let Some((head, len)) = self.rxq.pop_used(&self.mem) {
            let (h, p) = self.rx_bufs.remove(&head).expect("unknown rx head");
            if len as usize >= HDR_LEN {
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
                let hdr = Header::from_bytes(&raw);
                assert_eq!(
                    len as usize,
                    HDR_LEN + hdr.len as usize,
                    "used len matches header"
                );
                let mut data = vec![0u8; hdr.len as usize];
                self.mem.read_slice(&mut data, GuestAddress(p)).unwrap();
                *self.fwd_cnt.entry(hdr.dst_port).or_default() += hdr.len;
                out.push((hdr, data));
            }
            self.post_rx(h, p);
            reposted = true;
        }
        if reposted {
            write_reg(&mut self.t, REG_QUEUE_NOTIFY, 0);
        }
        out
    }

    /// Lets the device handle host events and returns what reached the guest.
    fn pump(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut all = Vec::new();
        for _ in 0..20 {
            self.t.process_host_events();
            let got = self.recv();
            if got.is_empty() && !all.is_empty() {
                break;
            }
            all.extend(got);
            if all.is_empty() {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        all
    }

    /// Opens a guest stream from `guest_port` to host port `host_port`; returns the host side.
    fn connect_to_host(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        host_port: u32,
    ) -> UnixStream {
        self.send(guest_port, host_port, OP_REQUEST, &[]);
        let got = self.recv();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, OP_RESPONSE);
        assert_eq!(
            (got[0].0.src_port, got[0].0.dst_port),
            (host_port, guest_port)
        );
        assert_eq!(got[0].0.buf_alloc, CONN_BUF_SIZE);
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// A host process connects to the VM's socket and asks for `guest_port`; the guest accepts.
    fn host_connects(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(self.uds()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let got = self.pump();
        assert_eq!(got.len(), 1, "{got:?}");
        let req = got[0].0;
        assert_eq!(req.op, OP_REQUEST);
        assert_eq!(
            (req.src_cid, req.dst_cid, req.dst_port),
            (HOST_CID, GUEST_CID, guest_port)
        );
        assert!(req.src_port >= FIRST_HOST_PORT);
        self.send(guest_port, req.src_port, OP_RESPONSE, &[]);
        let ok = read_line(&mut s);
        assert_eq!(ok, format!("OK {}\n", req.src_port));
        (s, req.src_port)
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 {
        line.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_exactly(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn guest_stream_to_host_listener_exchanges_data_both_ways() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_5000", g.uds().display())).unwrap();
    let mut host = g.connect_to_host(&listener, 1025, 5000);
    let irq = g.irq.count();

    g.send(1025, 5000, OP_RW, b"hello host");
    assert_eq!(read_exactly(&mut host, 10), b"hello host");

    host.write_all(b"hello guest").unwrap();
    let got = g.pump();
    assert_eq!(got.len(), 1);
    let (h, data) = &got[0];
    assert_eq!(h.op, OP_RW);
    assert_eq!(
        (h.src_cid, h.dst_cid, h.src_port, h.dst_port),
        (HOST_CID, GUEST_CID, 5000, 1025)
    );
    assert_eq!(h.fwd_cnt, 10, "host acknowledges the 10 bytes it forwarded");
    assert_eq!(data, b"hello guest");
    assert!(g.irq.count() > irq, "guest interrupted");
    assert_ne!(read_reg(&mut g.t, REG_INTERRUPT_STATUS) & 1, 0);

    // Host closes: the guest hears SHUTDOWN, answers RST, the stream is gone.
    drop(host);
    let got = g.pump();
    assert!(got
        .iter()
        .any(|(h, _)| h.op == OP_SHUTDOWN && h.flags == SHUTDOWN_SEND));
    g.send(1025, 5000, OP_RST, &[]);
    assert_eq!(g.t.device().connection_count(), 0);

    // Guest closes first: SHUTDOWN both ways, the host sees EOF and the guest gets RST.
    let mut host = g.connect_to_host(&listener, 1026, 5000);
    g.send(1026, 5000, OP_RW, b"bye");
    let mut sh = g.hdr(1026, 5000, OP_SHUTDOWN, 0);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send_raw(sh, &[]);
    let got = g.recv();
    assert!(got
        .iter()
        .any(|(h, _)| h.op == OP_RST && h.dst_port == 1026));
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"bye");
    assert_eq!(g.t.device().connection_count(), 0);
}

#[test]
fn guest_connect_to_a_port_nobody_listens_on_is_reset() {
    let mut g = Guest::new();
    g.send(1025, 7777, OP_REQUEST, &[]);
    let got = g.recv();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.op, OP_RST);
    assert_eq!(g.t.device().connection_count(), 0);
}

#[test]
fn host_connect_reaches_a_guest_port() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connects(9000);
    host.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let got = g.pump();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.dst_port, 9000);
    assert_eq!(got[0].1, b"GET / HTTP/1.1\r\n\r\n");
    g.send(9000, host_port, OP_RW, b"HTTP/1.1 200 OK\r\n");
    assert_eq!(read_exactly(&mut host, 17), b"HTTP/1.1 200 OK\r\n");

    // The guest refuses a second one (nobody listening): the host stream is closed.
    let mut s = UnixStream::connect(g.uds()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"CONNECT 9001\n").unwrap();
    let got = g.pump();
    let req = got[0].0;
    assert_eq!(req.op, OP_REQUEST);
    g.send(9001, req.src_port, OP_RST, &[]);
    let mut buf = Vec::new();
    assert_eq!(s.read_to_end(&mut buf).unwrap(), 0);

    // Malformed CONNECT lines close the host stream without bothering the guest.
    for bad in [
        &b"HELLO 1\n"[..],
        b"CONNECT x\n",
        b"CONNECT 99999999999\n",
        &[b'A'; 100],
    ] {
        let mut s = UnixStream::connect(g.uds()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(bad).unwrap();
        assert!(g.pump().is_empty());
        let mut buf = Vec::new();
        assert_eq!(s.read_to_end(&mut buf).unwrap_or(0), 0, "{bad:?}");
    }
    assert_eq!(g.t.device().connection_count(), 1);
}

#[test]
fn many_concurrent_streams_in_both_directions() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_6000", g.uds().display())).unwrap();
    let mut guest_opened = Vec::new();
    for i in 0..16u32 {
        guest_opened.push((2000 + i, g.connect_to_host(&listener, 2000 + i, 6000)));
    }
    let mut host_opened = Vec::new();
    for i in 0..16u32 {
        let (s, hp) = g.host_connects(3000 + i);
        host_opened.push((3000 + i, hp, s));
    }
    assert_eq!(g.t.device().connection_count(), 32);
    // Every stream carries its own bytes, interleaved.
    for (port, _) in &guest_opened {
        g.send(*port, 6000, OP_RW, format!("from guest {port}").as_bytes());
    }
    for (port, hp, _) in &host_opened {
        g.send(*port, *hp, OP_RW, format!("to host {port}").as_bytes());
    }
    for (port, s) in &mut guest_opened {
        let want = format!("from guest {port}");
        assert_eq!(read_exactly(s, want.len()), want.as_bytes());
        s.write_all(format!("reply {port}").as_bytes()).unwrap();
    }
    for (port, _, s) in &mut host_opened {
        let want = format!("to host {port}");
        assert_eq!(read_exactly(s, want.len()), want.as_bytes());
        s.write_all(format!("reply {port}").as_bytes()).unwrap();
    }
    let got = g.pump();
    assert_eq!(got.len(), 32, "one packet per stream");
    for (h, data) in got {
        assert_eq!(h.op, OP_RW);
        assert_eq!(data, format!("reply {}", h.dst_port).as_bytes());
    }
}

#[test]
fn bulk_transfer_respects_credit_both_ways() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_7000", g.uds().display())).unwrap();
    let mut host = g.connect_to_host(&listener, 4000, 7000);
    host.set_nonblocking(true).unwrap();

    // Host -> guest: 1 MiB; the guest advertises 64 KiB and only acknowledges as it reads.
    let total = 1 << 20;
    let payload: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    let mut sent = 0;
    let mut received = Vec::new();
    let mut rounds = 0;
    while received.len() < total {
        rounds += 1;
        assert!(rounds < 10_000, "transfer stalled at {}", received.len());
        if sent < total {
            match host.write(&payload[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        // What the device knows the guest has consumed: the fwd_cnt of the last packet sent.
        let advertised = g.fwd_cnt.get(&4000).copied().unwrap_or(0);
        g.t.process_host_events();
        let got = g.recv();
        let mut in_flight_ok = true;
        for (h, data) in got {
            if h.op == OP_CREDIT_REQUEST {
                continue;
            }
            assert_eq!(h.op, OP_RW);
            received.extend_from_slice(&data);
            in_flight_ok &= received.len() as u32 - advertised <= GUEST_BUF_ALLOC;
        }
        assert!(in_flight_ok, "device sent beyond the guest's credit");
        // The guest application reads everything and tells the host.
        g.send(4000, 7000, OP_CREDIT_UPDATE, &[]);
    }
    assert_eq!(received, payload);

    // Guest -> host: 1 MiB in 32 KiB packets, never beyond the host's credit.
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut host_got = Vec::new();
    let mut guest_sent = 0usize;
    let mut host_fwd_cnt = 0u32;
    let mut rounds = 0;
    while host_got.len() < total {
        rounds += 1;
        assert!(rounds < 10_000, "guest->host transfer stalled");
        let credit = CONN_BUF_SIZE as usize - (guest_sent - host_fwd_cnt as usize);
        let n = credit.min(32 * 1024).min(total - guest_sent);
        if n > 0 {
            g.send(4000, 7000, OP_RW, &payload[guest_sent..guest_sent + n]);
            guest_sent += n;
        }
        let mut buf = vec![0u8; 256 * 1024];
        host.set_nonblocking(true).unwrap();
        while let Ok(k) = host.read(&mut buf) {
            if k == 0 {
                break;
            }
            host_got.extend_from_slice(&buf[..k]);
        }
        g.t.process_host_events();
        for (h, _) in g.recv() {
            host_fwd_cnt = host_fwd_cnt.max(h.fwd_cnt);
        }
        if n == 0 && credit == 0 {
            g.send(4000, 7000, OP_CREDIT_REQUEST, &[]);
        }
    }
    assert_eq!(host_got, payload);
    assert_eq!(g.t.device().connection_count(), 1);
}

#[test]
fn hostile_packets_are_reset_or_dropped() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_5000", g.uds().display())).unwrap();

    // Wrong CIDs: dropped without a reply.
    let mut h = g.hdr(1, 5000, OP_REQUEST, 0);
    h.src_cid = 7;
    g.send_raw(h, &[]);
    let mut h = g.hdr(1, 5000, OP_REQUEST, 0);
    h.dst_cid = 9;
    g.send_raw(h, &[]);
    assert!(g.recv().is_empty());
    assert_eq!(g.t.device().connection_count(), 0);

    // A header longer than the descriptor holding it: dropped.
    let addr = g.alloc.take(20);
    g.send_chain(&[Buf {
        addr,
        len: 20,
        write: false,
    }]);
    // A tx chain outside guest memory, and a device-writable one: dropped.
    g.send_chain(&[Buf {
        addr: MEM_SIZE as u64 - 10,
        len: 100,
        write: false,
    }]);
    let addr = g.alloc.take(64);
    g.send_chain(&[Buf {
        addr,
        len: 64,
        write: true,
    }]);
    assert!(g.recv().is_empty());

    // Unsupported socket type: reset.
    let mut h = g.hdr(1, 5000, OP_REQUEST, 0);
    h.type_ = 2;
    g.send_raw(h, &[]);
    assert_eq!(g.recv()[0].0.op, OP_RST);
    // RW on a stream that does not exist: reset.
    g.send(1, 5000, OP_RW, b"x");
    assert_eq!(g.recv()[0].0.op, OP_RST);

    // A len field larger than the payload that follows: reset, stream gone.
    let _h1 = g.connect_to_host(&listener, 10, 5000);
    let h = g.hdr(10, 5000, OP_RW, 1000);
    g.send_raw(h, b"short");
    assert_eq!(g.recv()[0].0.op, OP_RST);
    // A huge len field.
    let _h2 = g.connect_to_host(&listener, 11, 5000);
    let h = g.hdr(11, 5000, OP_RW, u32::MAX);
    g.send_raw(h, b"x");
    assert_eq!(g.recv()[0].0.op, OP_RST);
    // Unknown op on a live stream.
    let _h3 = g.connect_to_host(&listener, 12, 5000);
    g.send(12, 5000, 99, &[]);
    assert_eq!(g.recv()[0].0.op, OP_RST);
    // RESPONSE on an established stream is a protocol error.
    let _h4 = g.connect_to_host(&listener, 13, 5000);
    g.send(13, 5000, OP_RESPONSE, &[]);
    assert_eq!(g.recv()[0].0.op, OP_RST);
    // Duplicate REQUEST for a live stream.
    let _h5 = g.connect_to_host(&listener, 14, 5000);
    g.send(14, 5000, OP_REQUEST, &[]);
    assert_eq!(g.recv()[0].0.op, OP_RST);
    assert_eq!(
        g.t.device().connection_count(),
        1,
        "only the duplicate's original survives"
    );

    // Data beyond the credit the host gave: the host never reads, the guest keeps sending.
    let _h6 = g.connect_to_host(&listener, 15, 5000);
    let chunk = vec![7u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..((CONN_BUF_SIZE as usize) / chunk.len() + 8) {
        g.send(15, 5000, OP_RW, &chunk);
        if g.recv()
            .iter()
            .any(|(h, _)| h.op == OP_RST && h.dst_port == 15)
        {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit is reset");

    // Tiny rx buffers: returned empty, no panic; the device keeps working with proper ones.
    let tiny = g.alloc.take(10);
    g.rxq.add_chain(
        &g.mem,
        &[Buf {
            addr: tiny,
            len: 10,
            write: true,
        }],
    );
    g.send(16, 5999, OP_REQUEST, &[]);
    let got = g.recv();
    assert!(got.iter().all(|(h, _)| h.op == OP_RST));
    assert!(g.t.is_running());
}

#[test]
fn reset_closes_streams_and_restore_signals_transport_reset() {
    let mut g = Guest::new();
    let listener = UnixListener::bind(format!("{}_5000", g.uds().display())).unwrap();
    let mut host = g.connect_to_host(&listener, 10, 5000);

    // Save, then bring the device up in a "new process" at a new socket path.
    let vsock_state = g.t.device().save();
    let transport_state = g.t.save();
    let json = serde_json::to_string(&vsock_state).unwrap();
    let vsock_state: VsockState = serde_json::from_str(&json).unwrap();
    let new_path = g.dir.path().join("restored.sock");
    let vsock = Vsock::restore(
        VsockRestoreArgs {
            uds_path: Some(new_path.clone()),
        },
        &vsock_state,
    )
    .unwrap();
    assert_eq!(vsock.guest_cid(), GUEST_CID);
    let irq = Arc::new(CountingInterrupt::default());
    let mut restored = MmioTransport::restore(
        MmioTransportArgs {
            device: vsock,
            mem: g.mem.clone(),
            interrupt: irq.clone(),
        },
        &transport_state,
    )
    .unwrap();
    assert!(restored.is_running());
    // The guest learns its streams are gone through the event queue.
    restored.process_host_events();
    let (_, len) = g.evq.pop_used(&g.mem).expect("TRANSPORT_RESET event");
    assert_eq!(len, 4);
    assert!(irq.count() >= 1);
    assert!(new_path.exists());
    drop(restored);
    assert!(!new_path.exists(), "socket removed with the device");

    // Device reset by the driver closes every host stream.
    write_reg(&mut g.t, REG_STATUS, 0);
    assert_eq!(g.t.device().connection_count(), 0);
    let mut buf = Vec::new();
    assert_eq!(host.read_to_end(&mut buf).unwrap(), 0);
}

#[test]
fn bad_cid_and_busy_path_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = Vsock::new(2, dir.path().join("a")).err().unwrap();
    assert!(err.to_string().contains("reserved"), "{err}");
    let _first = Vsock::new(3, dir.path().join("b")).unwrap();
    let err = Vsock::new(4, dir.path().join("b")).err().unwrap();
    assert!(err.to_string().contains("cannot listen"), "{err}");
}

#[test]
fn host_half_close_still_receives_the_reply() {
    let mut g = Guest::new();
    let (mut host, host_port) = g.host_connects(9000);
    host.write_all(b"request").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let got = g.pump();
    assert_eq!(got[0].1, b"request");
    assert!(got
        .iter()
        .any(|(h, _)| h.op == OP_SHUTDOWN && h.flags == SHUTDOWN_SEND));
    g.send(9000, host_port, OP_RW, b"reply");
    assert_eq!(read_exactly(&mut host, 5), b"reply");
    // The guest closes its side: the host sees EOF, the guest gets RST.
    let mut sh = g.hdr(9000, host_port, OP_SHUTDOWN, 0);
    sh.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send_raw(sh, &[]);
    assert!(g.recv().iter().any(|(h, _)| h.op == OP_RST));
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(g.t.device().connection_count(), 0);
}
