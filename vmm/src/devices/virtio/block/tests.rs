//! virtio-blk through the mmio transport, driven like a guest driver would.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportArgs, MmioTransportState};
use crate::devices::virtio::test_utils::*;
use crate::devices::BusDevice;

const DISK_SECTORS: u64 = 64;

struct Rig {
    file: tempfile::NamedTempFile,
    mem: GuestMemory,
    t: MmioTransport<Block>,
    irq: Arc<CountingInterrupt>,
    q: GuestQueue,
    alloc: Alloc,
}

fn disk_file() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let content: Vec<u8> = (0..DISK_SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE) as u8)
        .collect();
    f.write_all(&content).unwrap();
    f.flush().unwrap();
    f
}

fn rig(read_only: bool) -> Rig {
    let file = disk_file();
    let mem = guest_memory();
    let (mut t, irq) = transport(Block::new(file.path(), read_only).unwrap(), &mem);
    let q = GuestQueue::new(0x10000, QUEUE_SIZE);
    assert_eq!(
        init_device(&mut t, &[&q]),
        S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK
    );
    Rig {
        file,
        mem,
        t,
        irq,
        q,
        alloc: Alloc::default(),
    }
}

impl Rig {
    fn header(&mut self, request_type: u32, sector: u64) -> Buf {
        let addr = self.alloc.take(16);
        self.mem
            .write_obj(request_type, GuestAddress(addr))
            .unwrap();
        self.mem.write_obj(0u32, GuestAddress(addr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
        Buf {
            addr,
            len: 16,
            write: false,
        }
    }

    fn status(&mut self) -> Buf {
        let addr = self.alloc.take(1);
        self.mem.write_obj(0xaau8, GuestAddress(addr)).unwrap();
        Buf {
            addr,
            len: 1,
            write: true,
        }
    }

    fn buffer(&mut self, len: u32, write: bool, fill: u8) -> Buf {
        let addr = self.alloc.take(u64::from(len));
        self.mem
            .write_slice(&vec![fill; len as usize], GuestAddress(addr))
            .unwrap();
        Buf { addr, len, write }
    }

    /// Submits a chain, notifies through QueueNotify and returns the used length.
    fn submit(&mut self, chain: &[Buf]) -> u32 {
        let head = self.q.add_chain(&self.mem, chain);
        write_reg(&mut self.t, REG_QUEUE_NOTIFY, 0);
        let (id, len) = self.q.pop_used(&self.mem).expect("request not completed");
        assert_eq!(id, head);
        len
    }

    fn status_of(&self, status: Buf) -> u8 {
        self.mem.read_obj(GuestAddress(status.addr)).unwrap()
    }

    fn read_guest(&self, b: Buf) -> Vec<u8> {
        let mut v = vec![0u8; b.len as usize];
        self.mem.read_slice(&mut v, GuestAddress(b.addr)).unwrap();
        v
    }

    fn file_bytes(&self) -> Vec<u8> {
        let mut f = self.file.reopen().unwrap();
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    /// A request of `request_type` at `sector` with data buffers of `lens`; returns (status, used len).
    fn simple(&mut self, request_type: u32, sector: u64, lens: &[u32], write: bool) -> (u8, u32) {
        let h = self.header(request_type, sector);
        let mut chain = vec![h];
        for &l in lens {
            let b = self.buffer(l, write, 0x5a);
            chain.push(b);
        }
        let s = self.status();
        chain.push(s);
        let len = self.submit(&chain);
        (self.status_of(s), len)
    }
}

#[test]
fn init_handshake_exposes_block_device_and_capacity() {
    let mut r = rig(false);
    assert_eq!(read_reg(&mut r.t, REG_DEVICE_ID), 2);
    let features = device_features(&mut r.t);
    assert_ne!(features & FEATURE_VERSION_1, 0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    // Capacity as one 8-byte access and as two 4-byte halves.
    let mut cap = [0u8; 8];
    r.t.read(CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    assert_eq!(read_reg(&mut r.t, CONFIG), DISK_SECTORS as u32);
    assert_eq!(read_reg(&mut r.t, CONFIG + 4), 0);
    assert_eq!(read_reg(&mut r.t, CONFIG + 12), SEG_MAX);
    // 1-byte config access works too.
    let mut b = [0u8; 1];
    r.t.read(CONFIG, &mut b);
    assert_eq!(b[0], DISK_SECTORS as u8);
    assert_eq!(read_reg(&mut r.t, REG_CONFIG_GENERATION), 0);
    // No shared memory regions.
    assert_eq!(read_reg(&mut r.t, REG_SHM_LEN_LOW), u32::MAX);
    assert!(r.t.is_running());
}

#[test]
fn write_then_read_round_trips_through_the_file_and_interrupts() {
    let mut r = rig(false);
    // Write sectors 3..5 from two data descriptors.
    let h = r.header(VIRTIO_BLK_T_OUT, 3);
    let d1 = r.buffer(512, false, 0x11);
    let d2 = r.buffer(512, false, 0x22);
    let s = r.status();
    let irq_before = r.irq.count();
    let used = r.submit(&[h, d1, d2, s]);
    assert_eq!(r.status_of(s), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 1);
    assert_eq!(r.irq.count(), irq_before + 1);
    assert_eq!(read_reg(&mut r.t, REG_INTERRUPT_STATUS), 1);
    write_reg(&mut r.t, REG_INTERRUPT_ACK, 1);
    assert_eq!(read_reg(&mut r.t, REG_INTERRUPT_STATUS), 0);

    let file = r.file_bytes();
    assert!(file[3 * 512..4 * 512].iter().all(|&b| b == 0x11));
    assert!(file[4 * 512..5 * 512].iter().all(|&b| b == 0x22));
    assert!(
        file[5 * 512..6 * 512].iter().all(|&b| b == 5),
        "neighbour sector untouched"
    );

    // Read sectors 2..6 back in one 2 KiB buffer.
    let h = r.header(VIRTIO_BLK_T_IN, 2);
    let d = r.buffer(2048, true, 0);
    let s = r.status();
    let used = r.submit(&[h, d, s]);
    assert_eq!(r.status_of(s), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 2048 + 1);
    let data = r.read_guest(d);
    assert!(data[..512].iter().all(|&b| b == 2));
    assert!(data[512..1024].iter().all(|&b| b == 0x11));
    assert!(data[1024..1536].iter().all(|&b| b == 0x22));
    assert!(data[1536..].iter().all(|&b| b == 5));

    // The last sector is reachable.
    let (status, _) = r.simple(VIRTIO_BLK_T_IN, DISK_SECTORS - 1, &[512], true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn flush_and_get_id() {
    let mut r = rig(false);
    let (status, used) = r.simple(VIRTIO_BLK_T_FLUSH, 0, &[], false);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 1));

    let h = r.header(VIRTIO_BLK_T_GET_ID, 0);
    let d = r.buffer(20, true, 0xff);
    let s = r.status();
    let used = r.submit(&[h, d, s]);
    assert_eq!(r.status_of(s), VIRTIO_BLK_S_OK as u8);
    assert_eq!(used, 21);
    let id = r.read_guest(d);
    assert_eq!(&id[..], r.t.device().disk_id());
    assert!(id.starts_with(b"fnvm"));
    // Stable: the same file opened again has the same serial.
    let again = Block::new(r.file.path(), true).unwrap();
    assert_eq!(again.disk_id(), &id[..]);
}

#[test]
fn read_only_disk_refuses_writes_and_serves_reads() {
    let mut r = rig(true);
    assert_ne!(device_features(&mut r.t) & (1 << VIRTIO_BLK_F_RO), 0);
    let before = r.file_bytes();
    let (status, used) = r.simple(VIRTIO_BLK_T_OUT, 0, &[512], false);
    assert_eq!(status, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(used, 1);
    assert_eq!(r.file_bytes(), before);
    let (status, used) = r.simple(VIRTIO_BLK_T_IN, 1, &[512], true);
    assert_eq!((status, used), (VIRTIO_BLK_S_OK as u8, 513));
}

#[test]
fn missing_disk_is_a_clear_error() {
    let err = Block::new("/nonexistent/disk.img", true).err().unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("/nonexistent/disk.img") && msg.contains("read-only"),
        "{msg}"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = Block::new(dir.path(), true).err().unwrap();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

#[test]
fn hostile_requests_fail_with_an_error_status() {
    let mut r = rig(false);
    let before = r.file_bytes();
    let ioerr = VIRTIO_BLK_S_IOERR as u8;
    // Past the end, straddling the end, and a sector number that overflows when scaled.
    assert_eq!(
        r.simple(VIRTIO_BLK_T_IN, DISK_SECTORS, &[512], true).0,
        ioerr
    );
    assert_eq!(
        r.simple(VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, &[1024], false)
            .0,
        ioerr
    );
    assert_eq!(r.simple(VIRTIO_BLK_T_IN, u64::MAX, &[512], true).0, ioerr);
    assert_eq!(
        r.simple(VIRTIO_BLK_T_IN, u64::MAX / 512, &[512], true).0,
        ioerr
    );
    // Not a multiple of the sector size.
    assert_eq!(r.simple(VIRTIO_BLK_T_OUT, 0, &[100], false).0, ioerr);
    // Unknown type and a type we do not offer.
    assert_eq!(r.simple(0x7777, 0, &[], false).0, VIRTIO_BLK_S_UNSUPP as u8);
    assert_eq!(
        r.simple(11 /* DISCARD */, 0, &[16], false).0,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    // Wrong data directions: a read into device-read-only buffers, a write from writable ones.
    assert_eq!(r.simple(VIRTIO_BLK_T_IN, 0, &[512], false).0, ioerr);
    assert_eq!(r.simple(VIRTIO_BLK_T_OUT, 0, &[512], true).0, ioerr);
    // Flush with data.
    assert_eq!(r.simple(VIRTIO_BLK_T_FLUSH, 0, &[512], false).0, ioerr);

    // Header that is writable, or not 16 bytes.
    let mut h = r.header(VIRTIO_BLK_T_IN, 0);
    h.write = true;
    let s = r.status();
    assert_eq!(r.submit(&[h, s]), 1);
    assert_eq!(r.status_of(s), ioerr);
    let mut h = r.header(VIRTIO_BLK_T_IN, 0);
    h.len = 8;
    let s = r.status();
    r.submit(&[h, s]);
    assert_eq!(r.status_of(s), ioerr);

    // Data buffer outside guest memory, and a huge length running off its end.
    let h = r.header(VIRTIO_BLK_T_IN, 0);
    let s = r.status();
    let outside = Buf {
        addr: (MEM_SIZE as u64) + 0x1000,
        len: 512,
        write: true,
    };
    r.submit(&[h, outside, s]);
    assert_eq!(r.status_of(s), ioerr);
    let h = r.header(VIRTIO_BLK_T_IN, 0);
    let s = r.status();
    let huge = Buf {
        addr: BUFFERS_START,
        len: 0xffff_fe00,
        write: true,
    };
    r.submit(&[h, huge, s]);
    assert_eq!(r.status_of(s), ioerr);
    let h = r.header(VIRTIO_BLK_T_OUT, 0);
    let s = r.status();
    let wrap = Buf {
        addr: u64::MAX - 100,
        len: 512,
        write: false,
    };
    r.submit(&[h, wrap, s]);
    assert_eq!(r.status_of(s), ioerr);

    // Status descriptor longer than one byte: error written into its last byte.
    let h = r.header(VIRTIO_BLK_T_FLUSH, 0);
    let s = r.buffer(4, true, 0xaa);
    r.submit(&[h, s]);
    assert_eq!(r.read_guest(s)[3], ioerr);

    assert_eq!(
        r.file_bytes(),
        before,
        "no hostile request touched the disk"
    );
    // The device still works.
    assert_eq!(
        r.simple(VIRTIO_BLK_T_IN, 0, &[512], true).0,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn requests_without_a_status_byte_are_dropped() {
    let mut r = rig(false);
    let before = r.file_bytes();
    // Status descriptor read-only: nothing to write, completed with length 0, disk untouched.
    let h = r.header(VIRTIO_BLK_T_OUT, 0);
    let d = r.buffer(512, false, 0x77);
    let mut s = r.status();
    s.write = false;
    assert_eq!(r.submit(&[h, d, s]), 0);
    assert_eq!(r.status_of(s), 0xaa);
    // Status byte outside guest memory.
    let h = r.header(VIRTIO_BLK_T_FLUSH, 0);
    let s = Buf {
        addr: MEM_SIZE as u64,
        len: 1,
        write: true,
    };
    assert_eq!(r.submit(&[h, s]), 0);
    // A lone header.
    let h = r.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(r.submit(&[h]), 0);
    assert_eq!(r.file_bytes(), before);
}

#[test]
fn descriptor_loops_and_bad_indirect_tables_do_not_hang() {
    let mut r = rig(false);
    let h = r.header(VIRTIO_BLK_T_IN, 0);
    let d = r.buffer(512, true, 0);
    // 200 -> 201 -> 200 -> ... : virtio-queue stops after queue-size descriptors.
    GuestQueue::write_desc(&r.mem, r.q.desc, 200, h.addr, 16, VRING_DESC_F_NEXT, 201);
    GuestQueue::write_desc(
        &r.mem,
        r.q.desc,
        201,
        d.addr,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        200,
    );
    r.q.publish(&r.mem, 200);
    // A chain whose next index is out of the table.
    GuestQueue::write_desc(&r.mem, r.q.desc, 202, h.addr, 16, VRING_DESC_F_NEXT, 9999);
    r.q.publish(&r.mem, 202);
    // An indirect descriptor pointing outside guest memory, and one with a bad length.
    GuestQueue::write_desc(&r.mem, r.q.desc, 203, MEM_SIZE as u64, 64, 4, 0);
    r.q.publish(&r.mem, 203);
    GuestQueue::write_desc(&r.mem, r.q.desc, 204, BUFFERS_START, 17, 4, 0);
    r.q.publish(&r.mem, 204);
    // An avail entry naming a descriptor index beyond the queue.
    r.q.publish(&r.mem, 4000);
    write_reg(&mut r.t, REG_QUEUE_NOTIFY, 0);
    let mut completed = 0;
    while r.q.pop_used(&r.mem).is_some() {
        completed += 1;
    }
    assert!(
        completed >= 4,
        "hostile chains are returned to the guest, got {completed}"
    );
    // And a good request afterwards still completes.
    let (status, _) = r.simple(VIRTIO_BLK_T_IN, 0, &[512], true);
    assert_eq!(status, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn indirect_descriptors_are_served() {
    let mut r = rig(false);
    let h = r.header(VIRTIO_BLK_T_IN, 7);
    let d = r.buffer(512, true, 0);
    let s = r.status();
    let table = r.alloc.take(48);
    GuestQueue::write_desc(&r.mem, table, 0, h.addr, 16, VRING_DESC_F_NEXT, 1);
    GuestQueue::write_desc(
        &r.mem,
        table,
        1,
        d.addr,
        512,
        VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
        2,
    );
    GuestQueue::write_desc(&r.mem, table, 2, s.addr, 1, VRING_DESC_F_WRITE, 0);
    GuestQueue::write_desc(&r.mem, r.q.desc, 100, table, 48, 4, 0);
    r.q.publish(&r.mem, 100);
    write_reg(&mut r.t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(r.q.pop_used(&r.mem), Some((100, 513)));
    assert_eq!(r.status_of(s), VIRTIO_BLK_S_OK as u8);
    assert!(r.read_guest(d).iter().all(|&b| b == 7));
}

/// Drives the handshake up to FEATURES_OK on a fresh transport.
fn fresh(read_only: bool) -> (tempfile::NamedTempFile, GuestMemory, MmioTransport<Block>) {
    let file = disk_file();
    let mem = guest_memory();
    let (t, _irq) = transport(Block::new(file.path(), read_only).unwrap(), &mem);
    (file, mem, t)
}

#[test]
fn feature_negotiation_requires_version_1_and_order() {
    let (_f, _mem, mut t) = fresh(false);
    // DRIVER_OK before anything else, and before FEATURES_OK, is ignored.
    write_reg(&mut t, REG_STATUS, S_DRIVER_OK);
    assert_eq!(read_reg(&mut t, REG_STATUS), 0);
    add_status(&mut t, S_ACK);
    add_status(&mut t, S_DRIVER);
    assert_eq!(add_status(&mut t, S_DRIVER_OK), S_ACK | S_DRIVER);
    assert!(!t.is_running());
    // Driver features without VERSION_1: FEATURES_OK refused.
    let features = device_features(&mut t) & !FEATURE_VERSION_1;
    write_driver_features(&mut t, features);
    assert_eq!(add_status(&mut t, S_FEATURES_OK), S_ACK | S_DRIVER);
    // Features the device does not offer: refused too.
    write_driver_features(&mut t, FEATURE_VERSION_1 | 1 << 50);
    assert_eq!(add_status(&mut t, S_FEATURES_OK), S_ACK | S_DRIVER);
    // Proper features: accepted; then driver features are frozen.
    write_driver_features(&mut t, FEATURE_VERSION_1);
    assert_eq!(
        add_status(&mut t, S_FEATURES_OK),
        S_ACK | S_DRIVER | S_FEATURES_OK
    );
    write_driver_features(&mut t, 0);
    assert_eq!(t.save().acked_features, FEATURE_VERSION_1);
    // Reset on 0.
    write_reg(&mut t, REG_STATUS, 0);
    assert_eq!(read_reg(&mut t, REG_STATUS), 0);
    assert_eq!(t.save().acked_features, 0);
}

#[test]
fn invalid_queue_configurations_need_reset() {
    // Queue size not a power of two.
    let (_f, mem, mut t) = fresh(false);
    let q = GuestQueue::new(0x10000, 256);
    add_status(&mut t, S_ACK);
    add_status(&mut t, S_DRIVER);
    let features = device_features(&mut t);
    write_driver_features(&mut t, features);
    add_status(&mut t, S_FEATURES_OK);
    setup_queue(&mut t, 0, &q);
    // setup_queue set ready; a ready queue cannot be resized, so un-ready it first.
    write_reg(&mut t, REG_QUEUE_READY, 0);
    write_reg(&mut t, REG_QUEUE_NUM, 100);
    write_reg(&mut t, REG_QUEUE_READY, 1);
    let status = add_status(&mut t, S_DRIVER_OK);
    assert_ne!(status & S_NEEDS_RESET, 0);
    assert!(!t.is_running());
    // Notifications are ignored, nothing is written to the used ring.
    write_reg(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(q.used_idx(&mem), 0);
    assert_ne!(
        read_reg(&mut t, REG_INTERRUPT_STATUS) & 2,
        0,
        "config-change interrupt"
    );
    // Reset recovers.
    write_reg(&mut t, REG_STATUS, 0);
    assert_eq!(init_device(&mut t, &[&q]) & S_NEEDS_RESET, 0);
    assert!(t.is_running());

    // Rings outside guest memory.
    let (_f, _mem, mut t) = fresh(false);
    let far = GuestQueue::new(MEM_SIZE as u64 - 0x100, 256);
    assert_ne!(init_device(&mut t, &[&far]) & S_NEEDS_RESET, 0);
    assert!(!t.is_running());

    // Queue never made ready.
    let (_f, _mem, mut t) = fresh(false);
    add_status(&mut t, S_ACK);
    add_status(&mut t, S_DRIVER);
    let features = device_features(&mut t);
    write_driver_features(&mut t, features);
    add_status(&mut t, S_FEATURES_OK);
    assert_ne!(add_status(&mut t, S_DRIVER_OK) & S_NEEDS_RESET, 0);

    // Misaligned descriptor table.
    let (_f, _mem, mut t) = fresh(false);
    let mut q = GuestQueue::new(0x10000, 256);
    q.desc += 8;
    assert_ne!(init_device(&mut t, &[&q]) & S_NEEDS_RESET, 0);
}

#[test]
fn queue_registers_before_features_ok_are_ignored() {
    let (_f, _mem, mut t) = fresh(false);
    write_reg(&mut t, REG_QUEUE_SEL, 0);
    write_reg(&mut t, REG_QUEUE_NUM, 16);
    write_reg(&mut t, REG_QUEUE_READY, 1);
    assert_eq!(read_reg(&mut t, REG_QUEUE_NUM), u32::from(QUEUE_SIZE));
    assert_eq!(read_reg(&mut t, REG_QUEUE_READY), 0);
    // A nonexistent queue has no size.
    write_reg(&mut t, REG_QUEUE_SEL, 7);
    assert_eq!(read_reg(&mut t, REG_QUEUE_NUM_MAX), 0);
}

#[test]
fn notifications_for_nonexistent_or_unready_queues_are_ignored() {
    let (_f, mem, mut t) = fresh(false);
    // Before DRIVER_OK.
    write_reg(&mut t, REG_QUEUE_NOTIFY, 0);
    t.notify_queue(0);
    let mut r = rig(false);
    let irq = r.irq.count();
    write_reg(&mut r.t, REG_QUEUE_NOTIFY, 3);
    write_reg(&mut r.t, REG_QUEUE_NOTIFY, 0x1_0000);
    r.t.notify_queue(u16::MAX);
    // Empty queue: no interrupt.
    r.t.notify_queue(0);
    assert_eq!(r.irq.count(), irq);
    drop(mem);
}

#[test]
fn bad_mmio_offsets_and_sizes_are_harmless() {
    let mut r = rig(false);
    for size in [1usize, 2, 3, 8] {
        let mut buf = vec![0xffu8; size];
        r.t.read(REG_MAGIC, &mut buf);
        assert!(
            buf.iter().all(|&b| b == 0),
            "size {size} register read returns zeros"
        );
        r.t.write(REG_STATUS, &vec![0u8; size]);
    }
    // A 1-byte write of 0 to Status did not reset the device.
    assert!(r.t.is_running());
    let mut b = [0xffu8; 4];
    r.t.read(0x2, &mut b);
    assert_eq!(b, [0; 4]);
    r.t.read(0x0f0, &mut b);
    assert_eq!(b, [0; 4]);
    r.t.read(0x1000, &mut b);
    assert_eq!(b, [0; 4]);
    r.t.read(u64::MAX - 2, &mut b);
    r.t.write(u64::MAX - 2, &[1, 2, 3, 4]);
    r.t.write(0x072, &[0, 0, 0, 0]);
    r.t.read(CONFIG + 0xefc, &mut b);
    assert_eq!(b, [0; 4]);
    let mut odd = [0xffu8; 3];
    r.t.read(CONFIG, &mut odd);
    assert_eq!(odd, [0; 3]);
    // Writes to read-only registers and config space are ignored.
    write_reg(&mut r.t, REG_MAGIC, 0);
    write_reg(&mut r.t, REG_DEVICE_ID, 0);
    write_reg(&mut r.t, CONFIG, 0);
    assert_eq!(read_reg(&mut r.t, REG_MAGIC), 0x7472_6976);
    assert_eq!(read_reg(&mut r.t, CONFIG), DISK_SECTORS as u32);
    assert!(r.t.is_running());
    assert_eq!(
        r.simple(VIRTIO_BLK_T_IN, 0, &[512], true).0,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn save_and_restore_round_trip_through_json() {
    let mut r = rig(false);
    assert_eq!(
        r.simple(VIRTIO_BLK_T_OUT, 9, &[512], false).0,
        VIRTIO_BLK_S_OK as u8
    );
    write_reg(&mut r.t, REG_INTERRUPT_ACK, 1);
    let transport_json = serde_json::to_string(&r.t.save()).unwrap();
    let block_json = serde_json::to_string(&r.t.device().save()).unwrap();

    let block_state: BlockState = serde_json::from_str(&block_json).unwrap();
    let transport_state: MmioTransportState = serde_json::from_str(&transport_json).unwrap();
    assert_eq!(transport_state, r.t.save());
    let block = Block::restore(BlockRestoreArgs::default(), &block_state).unwrap();
    assert_eq!(block.disk_id(), r.t.device().disk_id());
    let irq = Arc::new(CountingInterrupt::default());
    let restored = MmioTransport::restore(
        MmioTransportArgs {
            device: block,
            mem: r.mem.clone(),
            interrupt: irq.clone(),
        },
        &transport_state,
    )
    .unwrap();
    assert!(restored.is_running());
    assert_eq!(restored.save(), transport_state);
    // The guest keeps using its queue where it left off.
    r.t = restored;
    r.irq = irq;
    let h = r.header(VIRTIO_BLK_T_IN, 9);
    let d = r.buffer(512, true, 0);
    let s = r.status();
    assert_eq!(r.submit(&[h, d, s]), 513);
    assert!(r.read_guest(d).iter().all(|&b| b == 0x5a));
    assert_eq!(r.irq.count(), 1);

    // A disk whose size changed is refused.
    r.file.as_file().set_len(DISK_SECTORS * 512 * 2).unwrap();
    let err = Block::restore(BlockRestoreArgs::default(), &block_state)
        .err()
        .unwrap();
    assert!(err.to_string().contains("snapshot expects"), "{err}");
    // A transport state for another device type is refused.
    let mut other = transport_state.clone();
    other.device_type = 19;
    let block = Block::new(r.file.path(), false).unwrap();
    let err = MmioTransport::restore(
        MmioTransportArgs {
            device: block,
            mem: r.mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
        },
        &other,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("device type"), "{err}");
}

#[test]
fn boxed_device_state_round_trips_through_json() {
    let mut r = rig(false);
    assert_eq!(
        r.simple(VIRTIO_BLK_T_OUT, 4, &[512], false).0,
        VIRTIO_BLK_S_OK as u8
    );
    let boxed: Box<dyn VirtioDevice> = Box::new(Block::new(r.file.path(), false).unwrap());
    let json = serde_json::to_string(&boxed.device_state()).unwrap();
    let state: crate::devices::virtio::VirtioDeviceState = serde_json::from_str(&json).unwrap();
    let device = crate::devices::virtio::restore_device(&state, None).unwrap();
    assert_eq!(device.device_type(), 2);
    assert_eq!(device.device_state(), state);
    let transport_state = r.t.save();
    let mut t = MmioTransport::restore(
        MmioTransportArgs {
            device,
            mem: r.mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
        },
        &transport_state,
    )
    .unwrap();
    assert!(t.is_running());
    let mut cap = [0u8; 8];
    t.read(CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
}
