//! Hostile tiny guests: guest programs that drive the VMM's virtio-mmio devices (virtio-blk on
//! a real disk file, virtio-vsock, virtio-net on a stand-in for passt) the way a malicious
//! driver would: descriptor loops, chains longer than the queue, self-referencing and nested
//! indirect tables, addresses outside guest memory, u32::MAX lengths, buffers of the wrong
//! direction, an avail index far ahead of the queue, invalid queue sizes and ring addresses,
//! queue registers rewritten while running, notification storms, and a guest that keeps the
//! avail ring topped up forever.
//!
//! Each test proves what a user of the VMM would notice: the bad request fails the way the
//! spec says (used with an error status, dropped with used length 0, or DEVICE_NEEDS_RESET),
//! nothing panics, the VMM thread serving the device comes back (the VM still stops on its
//! host timer), memory stays bounded, and a good request afterwards is served correctly (a
//! virtio-blk read returns the disk's bytes, a vsock connect is answered, a network frame
//! reaches passt). The guest reports through COM1 bytes; the test then reads the rings.
//!
//! Without /dev/kvm each test prints one loud "!!! SKIPPED" line to stderr and returns.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use fnvm_vmm::arch::x86_64::regs::EntryMode;
use fnvm_vmm::exit::VmExit;
use fnvm_vmm::memory::GuestMemory;
use fnvm_vmm::vmm::Vm;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

/// Where the guest code is loaded and entered (64-bit, identity mapped).
const CODE: u64 = 0x10_0000;
/// The rings of queue `n` live at `RINGS + n * 0x4000` (see [`Ring::at`]).
const RINGS: u64 = 0x20_0000;
/// Request headers, data buffers and status bytes.
const BUFS: u64 = 0x40_0000;
/// Indirect descriptor tables.
const TABLES: u64 = 0x80_0000;
/// Far outside the VM's 32 MiB of RAM (and still a canonical address).
const OUTSIDE: u64 = 0x7fff_ffff_f000;
/// A hang guard for every VM, never a speed target.
const TIMEOUT: Duration = Duration::from_secs(60);
/// Spins of a guest wait for something that must happen (each PAUSE exits to the host).
const SPINS: u32 = 5_000_000;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_S_OK: u8 = 0;
const VIRTIO_BLK_S_IOERR: u8 = 1;
/// What a status byte holds until the device writes it.
const UNTOUCHED: u8 = 0xff;

fn ring(queue: u64) -> Ring {
    Ring::at(RINGS + queue * 0x4000)
}

fn run(mut vm: Vm) -> (VmExit, Duration) {
    let start = Instant::now();
    vm.stop_after(TIMEOUT).unwrap();
    let exit = vm.run().expect("VM ran");
    (exit, start.elapsed())
}

/// A 64 KiB disk whose sector `n` is filled with byte `n + 1`, in a fresh tempdir.
fn disk() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let content: Vec<u8> = (0..128u32)
        .flat_map(|s| std::iter::repeat_n(s as u8 + 1, 512))
        .collect();
    std::fs::write(&path, &content).unwrap();
    (dir, path, content)
}

/// One virtio-blk request's buffers: a header at `BUFS + 0x1000 * n`, data 512 bytes after it
/// (up to 2 KiB), the status byte at the page's end.
#[derive(Clone, Copy)]
struct Req {
    header: u64,
    data: u64,
    status: u64,
}

impl Req {
    fn new(n: u64) -> Req {
        let page = BUFS + 0x1000 * n;
        Req {
            header: page,
            data: page + 0x200,
            status: page + 0xfff,
        }
    }

    /// Writes the header (`kind`, `sector`), clears the data and marks the status untouched.
    fn prepare(&self, mem: &GuestMemory, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(self.header)).unwrap();
        mem.write_slice(&[0u8; 2048], GuestAddress(self.data))
            .unwrap();
        mem.write_obj(UNTOUCHED, GuestAddress(self.status)).unwrap();
    }

    fn status(&self, mem: &GuestMemory) -> u8 {
        mem.read_obj(GuestAddress(self.status)).unwrap()
    }

    fn data(&self, mem: &GuestMemory) -> Vec<u8> {
        let mut d = vec![0u8; 512];
        mem.read_slice(&mut d, GuestAddress(self.data)).unwrap();
        d
    }
}

/// The good request every blk test ends with: read sector [`GOOD_SECTOR`] through
/// descriptors `GOOD_HEAD..GOOD_HEAD + 3`, offered in avail slot `slot`.
const GOOD_HEAD: u16 = 12;
const GOOD_SECTOR: u64 = 3;
const GOOD_REQ: u64 = 31;

fn prepare_good_read(mem: &GuestMemory, ring: &Ring, slot: u16) {
    let r = Req::new(GOOD_REQ);
    r.prepare(mem, VIRTIO_BLK_T_IN, GOOD_SECTOR);
    let h = GOOD_HEAD;
    ring.desc(mem, h, r.header, 16, VRING_DESC_F_NEXT, h + 1);
    ring.desc(
        mem,
        h + 1,
        r.data,
        512,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        h + 2,
    );
    ring.desc(mem, h + 2, r.status, 1, VRING_DESC_F_WRITE, 0);
    ring.offer(mem, slot, h);
}

/// Guest code: publish avail index `slot + 1`, notify queue 0, wait for the good request's
/// status byte, print `G` (OK), `E` (an error status) or `T` (it never came).
fn good_read(a: &mut CodeAssembler, drv: &Driver, ring: &Ring, slot: u16) {
    let mut timeout = a.create_label();
    let mut bad = a.create_label();
    let mut done = a.create_label();
    store_u16(a, ring.avail_idx_addr(), slot + 1);
    drv.notify(a, 0);
    let status = Req::new(GOOD_REQ).status;
    wait_u8_changes(a, status, UNTOUCHED, SPINS, timeout);
    a.mov(rdi, status).unwrap();
    a.cmp(byte_ptr(rdi), VIRTIO_BLK_S_OK as i32).unwrap();
    a.jne(bad).unwrap();
    print(a, "G");
    a.jmp(done).unwrap();
    a.set_label(&mut bad).unwrap();
    print(a, "E");
    a.jmp(done).unwrap();
    a.set_label(&mut timeout).unwrap();
    print(a, "T");
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// Guest code: publish avail index `idx`, notify queue 0, wait until the used index is
/// `used`; print `U` when it is, `t` if it never got there.
fn offer_and_wait_used(a: &mut CodeAssembler, drv: &Driver, ring: &Ring, idx: u16, used: u16) {
    let mut timeout = a.create_label();
    let mut done = a.create_label();
    store_u16(a, ring.avail_idx_addr(), idx);
    drv.notify(a, 0);
    wait_u16(a, ring.used_idx_addr(), used, SPINS, timeout);
    print(a, "U");
    a.jmp(done).unwrap();
    a.set_label(&mut timeout).unwrap();
    print(a, "t");
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// Guest code: the usual driver start for a one-queue device with `size` entries on
/// `ring(0)`; prints `F` and resets if FEATURES_OK is refused or the device needs a reset.
fn start_one_queue(a: &mut CodeAssembler, size: u32) -> Driver {
    let mut fail = a.create_label();
    let mut ok = a.create_label();
    let drv = Driver::new(a, VIRTIO_MMIO_START);
    drv.negotiate(a, 0, fail);
    drv.setup_queue(a, 0, size, &ring(0));
    drv.driver_ok(a);
    drv.jump_if_needs_reset(a, fail);
    a.jmp(ok).unwrap();
    a.set_label(&mut fail).unwrap();
    print(a, "F");
    reset(a);
    a.set_label(&mut ok).unwrap();
    a.nop().unwrap();
    drv
}

/// A VM with the disk as its first virtio device, the guest `code` and what the test wrote
/// into guest memory; returns the console text, the exit, its time and the memory.
fn run_blk(
    path: &std::path::Path,
    code: &[u8],
    fill: impl FnOnce(&GuestMemory),
) -> (String, VmExit, Duration, GuestMemory) {
    let (c, console) = config(32, 1);
    let mut vm = Vm::new(c).unwrap();
    vm.add_disk(path, false).unwrap();
    let mem = vm.memory().clone();
    fill(&mem);
    vm.load_program(code, CODE, EntryMode::Long64, false)
        .unwrap();
    let (exit, took) = run(vm);
    (console.text(), exit, took, mem)
}

fn assert_good_read(mem: &GuestMemory, content: &[u8]) {
    let r = Req::new(GOOD_REQ);
    assert_eq!(r.status(mem), VIRTIO_BLK_S_OK);
    let sector = GOOD_SECTOR as usize * 512;
    assert_eq!(r.data(mem), content[sector..sector + 512]);
}

#[test]
fn blk_looping_overlong_and_indirect_chains_fail_and_the_next_read_works() {
    if !kvm_available("blk_loops") {
        return;
    }
    let (_dir, path, content) = disk();
    let q = ring(0);
    let mut a = CodeAssembler::new(64).unwrap();
    let drv = start_one_queue(&mut a, 16);
    offer_and_wait_used(&mut a, &drv, &q, 6, 6);
    good_read(&mut a, &drv, &q, 6);
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let reqs: Vec<Req> = (0..6).map(Req::new).collect();
    let (text, exit, took, mem) = run_blk(&path, &code, |mem| {
        for r in &reqs {
            r.prepare(mem, VIRTIO_BLK_T_IN, 0);
        }
        // 0: a loop, 0 -> 1 -> 0 -> ...: the queue-size bound ends it (16 descriptors), and
        // its last one (the 512-byte data buffer) is no 1-byte status: IOERR in its last byte.
        q.desc(mem, 0, reqs[0].header, 16, VRING_DESC_F_NEXT, 1);
        let wn = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        q.desc(mem, 1, reqs[0].data, 512, wn, 0);
        // 1: an indirect table of 300 descriptors, longer than the queue and than SEG_MAX.
        let t1 = TABLES;
        Ring::write_desc_at(mem, t1, 0, reqs[1].header, 16, VRING_DESC_F_NEXT, 1);
        for i in 1..299 {
            Ring::write_desc_at(mem, t1, i, reqs[1].data, 512, wn, i + 1);
        }
        Ring::write_desc_at(mem, t1, 299, reqs[1].status, 1, VRING_DESC_F_WRITE, 0);
        q.desc(mem, 2, t1, 300 * 16, VRING_DESC_F_INDIRECT, 0);
        // 2: an indirect table whose second entry is an indirect descriptor to itself.
        let t2 = TABLES + 0x1_0000;
        Ring::write_desc_at(mem, t2, 0, reqs[2].header, 16, VRING_DESC_F_NEXT, 1);
        Ring::write_desc_at(mem, t2, 1, t2, 32, VRING_DESC_F_INDIRECT, 0);
        q.desc(mem, 3, t2, 32, VRING_DESC_F_INDIRECT, 0);
        // 3: an indirect table that loops inside itself.
        let t3 = TABLES + 0x2_0000;
        Ring::write_desc_at(mem, t3, 0, reqs[3].header, 16, VRING_DESC_F_NEXT, 1);
        Ring::write_desc_at(mem, t3, 1, reqs[3].data, 512, wn, 0);
        Ring::write_desc_at(mem, t3, 2, 0, 0, 0, 0);
        Ring::write_desc_at(mem, t3, 3, 0, 0, 0, 0);
        q.desc(mem, 4, t3, 64, VRING_DESC_F_INDIRECT, 0);
        // 4: an indirect descriptor whose length is no multiple of 16.
        q.desc(mem, 5, t3, 17, VRING_DESC_F_INDIRECT, 0);
        // 5: a header whose next descriptor is past the queue's end: the chain ends there.
        q.desc(mem, 6, reqs[5].header, 16, VRING_DESC_F_NEXT, 999);
        for (slot, head) in [0u16, 2, 3, 4, 5, 6].into_iter().enumerate() {
            q.offer(mem, slot as u16, head);
        }
        prepare_good_read(mem, &q, 6);
    });
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(text, "UG", "every bad chain used, then the good read");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let last = |r: &Req| mem.read_obj::<u8>(GuestAddress(r.data + 511)).unwrap();
    // The loop and the overlong table: IOERR in the last byte of their last descriptor.
    assert_eq!(q.used_elem(&mem, 0), (0, 1));
    assert_eq!(last(&reqs[0]), VIRTIO_BLK_S_IOERR);
    assert_eq!(q.used_elem(&mem, 1), (2, 1));
    assert_eq!(last(&reqs[1]), VIRTIO_BLK_S_IOERR);
    assert_eq!(reqs[1].status(&mem), UNTOUCHED);
    // Nested indirect: the chain ends at the header, there is no writable status: dropped.
    assert_eq!(q.used_elem(&mem, 2), (3, 0));
    assert_eq!(reqs[2].status(&mem), UNTOUCHED);
    // The looping table is cut at its 4 entries: IOERR, nothing read from the disk.
    assert_eq!(q.used_elem(&mem, 3), (4, 1));
    assert_eq!(last(&reqs[3]), VIRTIO_BLK_S_IOERR);
    assert!(reqs[3].data(&mem)[..511].iter().all(|&b| b == 0));
    // A malformed indirect descriptor: an empty chain, used with length 0.
    assert_eq!(q.used_elem(&mem, 4), (5, 0));
    // A next pointer past the queue: the chain is its header alone, dropped.
    assert_eq!(q.used_elem(&mem, 5), (6, 0));
    assert_eq!(reqs[5].status(&mem), UNTOUCHED);
    assert_eq!(q.used_elem(&mem, 6), (u32::from(GOOD_HEAD), 513));
    assert_good_read(&mem, &content);
    assert_eq!(std::fs::read(&path).unwrap(), content, "disk unchanged");
}

/// One malformed three-descriptor request: (header, data, status) as (addr, len, flags), what
/// the device must write to the used ring's length and to the status byte.
struct Malformed {
    what: &'static str,
    kind: u32,
    sector: u64,
    header: (u64, u32, u16),
    data: (u64, u32, u16),
    status: (u64, u32, u16),
    used_len: u32,
    status_byte: u8,
}

#[test]
fn blk_requests_outside_memory_huge_or_of_the_wrong_direction_fail() {
    if !kvm_available("blk_malformed") {
        return;
    }
    let (_dir, path, content) = disk();
    let q = ring(0);
    const W: u16 = VRING_DESC_F_WRITE;
    const N: u16 = VRING_DESC_F_NEXT;
    let r: Vec<Req> = (0..12).map(Req::new).collect();
    let in_ = VIRTIO_BLK_T_IN;
    let out = VIRTIO_BLK_T_OUT;
    let ioerr = |what, kind, header, data, status| Malformed {
        what,
        kind,
        sector: 0,
        header,
        data,
        status,
        used_len: 1,
        status_byte: VIRTIO_BLK_S_IOERR,
    };
    let mut cases = vec![
        ioerr(
            "data outside guest memory",
            in_,
            (r[0].header, 16, N),
            (OUTSIDE, 512, W | N),
            (r[0].status, 1, W),
        ),
        ioerr(
            "header outside guest memory",
            in_,
            (OUTSIDE, 16, N),
            (r[3].data, 512, W | N),
            (r[3].status, 1, W),
        ),
        ioerr(
            "write-only header",
            in_,
            (r[4].header, 16, W | N),
            (r[4].data, 512, W | N),
            (r[4].status, 1, W),
        ),
        ioerr(
            "read with a device-readable data buffer",
            in_,
            (r[5].header, 16, N),
            (r[5].data, 512, N),
            (r[5].status, 1, W),
        ),
        ioerr(
            "write with a device-writable data buffer",
            out,
            (r[6].header, 16, N),
            (r[6].data, 512, W | N),
            (r[6].status, 1, W),
        ),
        ioerr(
            "write from outside guest memory",
            out,
            (r[7].header, 16, N),
            (OUTSIDE, 512, N),
            (r[7].status, 1, W),
        ),
        ioerr(
            "a partial sector",
            in_,
            (r[8].header, 16, N),
            (r[8].data, 100, W | N),
            (r[8].status, 1, W),
        ),
    ];
    cases.push(Malformed {
        sector: u64::MAX / 512,
        ..ioerr(
            "a sector far beyond the disk's end",
            in_,
            (r[9].header, 16, N),
            (r[9].data, 512, W | N),
            (r[9].status, 1, W),
        )
    });
    // No writable status byte at all: nothing to report into, the chain is used with 0.
    let dropped = |what, header, data, status| Malformed {
        used_len: 0,
        status_byte: UNTOUCHED,
        ..ioerr(what, in_, header, data, status)
    };
    // A chain of more than 2^32 bytes is illegal (virtio 1.2, 2.7.5.2): virtio-queue ends it
    // before the descriptor that overflows, so these chains stop at their header (no status
    // byte: dropped) ...
    cases.push(dropped(
        "data of u32::MAX bytes",
        (r[1].header, 16, N),
        (r[1].data, u32::MAX, W | N),
        (r[1].status, 1, W),
    ));
    cases.push(dropped(
        "header of u32::MAX bytes",
        (r[2].header, u32::MAX, N),
        (r[2].data, 512, W | N),
        (r[2].status, 1, W),
    ));
    // ... and this one at its data buffer, which is no 1-byte status: IOERR in its last byte.
    cases.push(Malformed {
        status_byte: UNTOUCHED,
        ..ioerr(
            "status descriptor of u32::MAX bytes",
            in_,
            (r[11].header, 16, N),
            (r[11].data, 512, W | N),
            (r[11].status, u32::MAX, W),
        )
    });
    cases.push(dropped(
        "read-only status descriptor",
        (r[10].header, 16, N),
        (r[10].data, 512, W | N),
        (r[10].status, 1, 0),
    ));
    let n = cases.len() as u16;
    assert!(3 * n + 3 <= 64);

    let mut a = CodeAssembler::new(64).unwrap();
    let drv = start_one_queue(&mut a, 64);
    offer_and_wait_used(&mut a, &drv, &q, n, n);
    good_read(&mut a, &drv, &q, n);
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let (text, exit, took, mem) = run_blk(&path, &code, |mem| {
        for req in &r {
            req.prepare(mem, VIRTIO_BLK_T_IN, 0);
            // The write requests carry a pattern that must not reach the disk.
            mem.write_slice(&[0xee; 512], GuestAddress(req.data))
                .unwrap();
        }
        for (i, c) in cases.iter().enumerate() {
            if c.header.0 != OUTSIDE {
                let mut h = [0u8; 16];
                h[0..4].copy_from_slice(&c.kind.to_le_bytes());
                h[8..16].copy_from_slice(&c.sector.to_le_bytes());
                mem.write_slice(&h, GuestAddress(c.header.0)).unwrap();
            }
            let h = 16 + 3 * i as u16;
            q.desc(mem, h, c.header.0, c.header.1, c.header.2, h + 1);
            q.desc(mem, h + 1, c.data.0, c.data.1, c.data.2, h + 2);
            q.desc(mem, h + 2, c.status.0, c.status.1, c.status.2, 0);
            q.offer(mem, i as u16, h);
        }
        prepare_good_read(mem, &q, n);
    });
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(text, "UG");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    for (i, c) in cases.iter().enumerate() {
        let head = 16 + 3 * i as u32;
        assert_eq!(
            q.used_elem(&mem, i as u16),
            (head, c.used_len),
            "{}",
            c.what
        );
        let status: u8 = mem.read_obj(GuestAddress(c.status.0)).unwrap();
        assert_eq!(status, c.status_byte, "{}", c.what);
    }
    assert_eq!(
        q.used_elem(&mem, n),
        (u32::from(GOOD_HEAD), 513),
        "the good read after them"
    );
    assert_good_read(&mem, &content);
    assert_eq!(std::fs::read(&path).unwrap(), content, "disk unchanged");
}

#[test]
fn blk_avail_index_far_ahead_or_a_head_past_the_queue_is_ignored_and_later_reads_work() {
    if !kvm_available("blk_avail_ahead") {
        return;
    }
    let (_dir, path, content) = disk();
    let q = ring(0);
    let mut a = CodeAssembler::new(64).unwrap();
    let drv = start_one_queue(&mut a, 16);
    // 1000 entries offered on a 16-entry queue: the device must not walk 1000 heads (nor
    // wrap around and serve stale ones); it leaves the queue alone.
    store_u16(&mut a, q.avail_idx_addr(), 1000);
    drv.notify(&mut a, 0);
    pause_loop(&mut a, 20_000);
    // Back to a sane index: slot 0 holds a head past the queue's end (consumed, unusable),
    // slot 1 the good read.
    store_u16(&mut a, q.avail_idx_addr(), 1);
    drv.notify(&mut a, 0);
    pause_loop(&mut a, 20_000);
    good_read(&mut a, &drv, &q, 1);
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let (text, exit, _, mem) = run_blk(&path, &code, |mem| {
        q.offer(mem, 0, 300);
        prepare_good_read(mem, &q, 1);
    });
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(text, "G");
    assert_eq!(q.used_idx(&mem), 1, "only the good read was used");
    assert_eq!(q.used_elem(&mem, 0), (u32::from(GOOD_HEAD), 513));
    assert_good_read(&mem, &content);
}

#[test]
fn blk_invalid_queue_sizes_and_rings_need_reset_and_a_reset_device_works_again() {
    if !kvm_available("blk_bad_queues") {
        return;
    }
    let (_dir, path, content) = disk();
    let good = ring(0);
    let bad_rings = [
        ("not a power of two", 6, good),
        ("larger than QueueNumMax", 512, good),
        ("zero", 0, good),
        ("past u16", 0x1_0000, good),
        (
            "descriptor table outside memory",
            16,
            Ring {
                desc: OUTSIDE,
                ..good
            },
        ),
        (
            "misaligned used ring",
            16,
            Ring {
                used: good.used + 2,
                ..good
            },
        ),
        (
            "avail ring across the end of RAM",
            16,
            Ring {
                avail: (32 << 20) - 8,
                ..good
            },
        ),
    ];
    let mut a = CodeAssembler::new(64).unwrap();
    let mut fail = a.create_label();
    let drv = Driver::new(&mut a, VIRTIO_MMIO_START);
    for (_, size, r) in &bad_rings {
        let mut next = a.create_label();
        let mut not_reset = a.create_label();
        drv.negotiate(&mut a, 0, fail);
        drv.setup_queue(&mut a, 0, *size, r);
        drv.driver_ok(&mut a);
        drv.jump_unless_needs_reset(&mut a, not_reset);
        print(&mut a, "R");
        // A notification to a device that needs a reset is ignored.
        drv.notify(&mut a, 0);
        a.jmp(next).unwrap();
        a.set_label(&mut not_reset).unwrap();
        print(&mut a, "r");
        a.set_label(&mut next).unwrap();
        a.nop().unwrap();
    }
    // The same device, reset and set up properly, serves a read.
    drv.negotiate(&mut a, 0, fail);
    drv.setup_queue(&mut a, 0, 16, &good);
    drv.driver_ok(&mut a);
    drv.jump_if_needs_reset(&mut a, fail);
    good_read(&mut a, &drv, &good, 0);
    reset(&mut a);
    a.set_label(&mut fail).unwrap();
    print(&mut a, "F");
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let (text, exit, _, mem) = run_blk(&path, &code, |mem| {
        prepare_good_read(mem, &good, 0);
        // Were a bad queue ever served, this slot-0 entry would already have been used.
    });
    assert_eq!(exit, VmExit::GuestReset);
    let expected = "R".repeat(bad_rings.len()) + "G";
    assert_eq!(text, expected, "{:?}", bad_rings.map(|b| b.0));
    assert_eq!(good.used_idx(&mem), 1);
    assert_good_read(&mem, &content);
}

#[test]
fn blk_queue_registers_rewritten_while_running_are_ignored() {
    if !kvm_available("blk_rewrite_running") {
        return;
    }
    let (_dir, path, content) = disk();
    let q = ring(0);
    let elsewhere = ring(1);
    let mut a = CodeAssembler::new(64).unwrap();
    let mut fail = a.create_label();
    let drv = start_one_queue(&mut a, 16);
    // After DRIVER_OK: another size, other ring addresses, the queue disabled, and a status
    // write that goes backwards. None of it may take effect.
    drv.write(&mut a, REG_QUEUE_NUM, 4);
    drv.write(&mut a, REG_QUEUE_DESC_LOW, elsewhere.desc as u32);
    drv.write(&mut a, REG_QUEUE_DRIVER_LOW, elsewhere.avail as u32);
    drv.write(&mut a, REG_QUEUE_DEVICE_LOW, OUTSIDE as u32);
    drv.write(&mut a, REG_QUEUE_DEVICE_HIGH, (OUTSIDE >> 32) as u32);
    drv.write(&mut a, REG_QUEUE_READY, 0);
    drv.write(&mut a, REG_STATUS, S_ACK);
    drv.read(&mut a, REG_QUEUE_NUM);
    a.cmp(eax, 16).unwrap();
    a.jne(fail).unwrap();
    drv.read(&mut a, REG_QUEUE_DESC_LOW);
    a.cmp(eax, q.desc as i32).unwrap();
    a.jne(fail).unwrap();
    drv.read(&mut a, REG_QUEUE_READY);
    a.cmp(eax, 1).unwrap();
    a.jne(fail).unwrap();
    drv.read(&mut a, REG_STATUS);
    a.cmp(eax, (S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK) as i32)
        .unwrap();
    a.jne(fail).unwrap();
    print(&mut a, "S");
    good_read(&mut a, &drv, &q, 0);
    reset(&mut a);
    a.set_label(&mut fail).unwrap();
    print(&mut a, "F");
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let (text, exit, _, mem) = run_blk(&path, &code, |mem| {
        prepare_good_read(mem, &q, 0);
        // A decoy at the other ring: if the device followed the rewrite it would serve this.
        prepare_good_read(mem, &elsewhere, 0);
    });
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(text, "SG");
    assert_eq!(q.used_idx(&mem), 1);
    assert_eq!(
        elsewhere.used_idx(&mem),
        0,
        "the rewritten ring was never used"
    );
    assert_good_read(&mem, &content);
}

#[test]
fn blk_notification_storm_keeps_the_vmm_responsive_and_its_memory_bounded() {
    if !kvm_available("blk_storm") {
        return;
    }
    const STORM: u32 = 400_000;
    const BAD_STORM: u32 = 25_000;
    let (_dir, path, content) = disk();
    let q = ring(0);
    let mut a = CodeAssembler::new(64).unwrap();
    let drv = start_one_queue(&mut a, 16);
    // QueueNotify(0) 400 000 times with nothing new on the ring (the ioeventfd path, the
    // event loop thread wakes for them), then notifications for a queue that does not exist
    // (each a VM exit into the transport), then an avail index far ahead and as many again (~10 µs each under KVM-PVM here).
    let mut storm = a.create_label();
    a.mov(ebx, STORM).unwrap();
    a.set_label(&mut storm).unwrap();
    drv.notify(&mut a, 0);
    a.dec(ebx).unwrap();
    a.jnz(storm).unwrap();
    let mut bad_storm = a.create_label();
    a.mov(ebx, BAD_STORM).unwrap();
    a.set_label(&mut bad_storm).unwrap();
    drv.notify(&mut a, 7);
    drv.notify(&mut a, 0x1_0000);
    a.dec(ebx).unwrap();
    a.jnz(bad_storm).unwrap();
    store_u16(&mut a, q.avail_idx_addr(), 40_000);
    let mut ahead_storm = a.create_label();
    a.mov(ebx, STORM).unwrap();
    a.set_label(&mut ahead_storm).unwrap();
    drv.notify(&mut a, 0);
    a.dec(ebx).unwrap();
    a.jnz(ahead_storm).unwrap();
    print(&mut a, "S");
    good_read(&mut a, &drv, &q, 0);
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let before = rss_kib();
    let (text, exit, took, mem) = run_blk(&path, &code, |mem| prepare_good_read(mem, &q, 0));
    let after = rss_kib();
    eprintln!("notification storm: {took:?}, RSS {before:?} -> {after:?} KiB");
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(text, "SG");
    assert_eq!(q.used_idx(&mem), 1);
    assert_good_read(&mem, &content);
    assert!(took < Duration::from_secs(45), "storm took {took:?}");
    if let (Some(b), Some(a)) = (before, after) {
        // Guest RAM the guest touched counts too; 32 MiB is all it has.
        assert!(a < b + 64 * 1024, "RSS grew from {b} to {a} KiB");
    }
}

/// A stand-in for passt: the Unix listener `Vm::add_net` connects to, and the accepted stream
/// (QEMU's stream protocol: each frame behind its 32-bit big-endian length).
struct FakePasst {
    _dir: tempfile::TempDir,
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
}

impl FakePasst {
    fn new() -> FakePasst {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passt.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        FakePasst {
            _dir: dir,
            path,
            listener,
        }
    }

    /// Adds the network device to `vm` and returns passt's end of its connection.
    fn attach(&self, vm: &mut Vm) -> std::os::unix::net::UnixStream {
        vm.add_net(&self.path, fnvm_vmm::devices::virtio::net::DEFAULT_MAC)
            .unwrap();
        let (stream, _) = self.listener.accept().unwrap();
        stream
    }
}

/// Runs `vm` on a thread with a host stop timer of `stop_after`; fails the test (instead of
/// hanging it) if the VMM has not ended the VM `grace` later.
fn run_guarded(mut vm: Vm, stop_after: Duration, grace: Duration) -> (VmExit, Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        vm.stop_after(stop_after).unwrap();
        let exit = vm.run().expect("VM ran");
        let _ = tx.send(exit);
    });
    match rx.recv_timeout(stop_after + grace) {
        Ok(exit) => (exit, start.elapsed()),
        Err(_) => panic!(
            "the VMM did not end the VM {:?} after its {stop_after:?} stop timer: its event loop \
             is stuck",
            grace
        ),
    }
}

/// Runs a VM whose vCPUs chase a ring forever under a 2 s stop timer: the VMM must still end
/// it on time (its event loop is not captured), with its RSS within 64 MiB of where it was.
fn survive_chase(vm: Vm, what: &str) {
    let before = rss_kib();
    let (exit, took) = run_guarded(vm, Duration::from_secs(2), Duration::from_secs(20));
    let after = rss_kib();
    if let (Some(b), Some(a)) = (before, after) {
        assert!(a < b + 64 * 1024, "{what}: RSS grew from {b} to {a} KiB");
    }
    assert_eq!(exit, VmExit::Stopped, "{what}");
    assert!(took < Duration::from_secs(15), "{what} took {took:?}");
}

/// Guest code: forever keep the avail index of `ring` 8 entries ahead of its used index, so
/// a device that serves "until the ring is empty" never finds it empty, and notify queue
/// `queue` of the device at RSI every 4096 rounds (a device that stopped early resumes).
fn chase_forever(a: &mut CodeAssembler, ring: &Ring, queue: u32) {
    let mut again = a.create_label();
    let mut no_kick = a.create_label();
    a.mov(rdi, ring.used_idx_addr()).unwrap();
    a.mov(rbx, ring.avail_idx_addr()).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.set_label(&mut again).unwrap();
    a.movzx(eax, word_ptr(rdi)).unwrap();
    a.add(eax, 8).unwrap();
    a.mov(word_ptr(rbx), ax).unwrap();
    a.inc(ecx).unwrap();
    a.test(ecx, 0xfff).unwrap();
    a.jnz(no_kick).unwrap();
    a.mov(dword_ptr(rsi + REG_QUEUE_NOTIFY as i32), queue)
        .unwrap();
    a.set_label(&mut no_kick).unwrap();
    a.jmp(again).unwrap();
}

/// Where vCPU 0 tells the others the device is set up.
const READY_FLAG: u64 = 0x3000;

/// Guest code for every vCPU: vCPU 0 runs `setup` and raises [`READY_FLAG`]; the others wait
/// for it; then all of them [`chase_forever`] on `ring` and `queue`. Two chasing vCPUs keep the ring full
/// even while one of them is out of the guest (host timer ticks, preemption).
fn all_vcpus_chase(ring: &Ring, queue: u32, setup: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut others = a.create_label();
    let mut chase = a.create_label();
    a.mov(eax, 1).unwrap();
    a.cpuid().unwrap();
    a.shr(ebx, 24).unwrap(); // APIC ID
    a.test(ebx, ebx).unwrap();
    a.jnz(others).unwrap();
    setup(&mut a);
    a.mov(rdi, READY_FLAG).unwrap();
    a.mov(byte_ptr(rdi), 1).unwrap();
    a.jmp(chase).unwrap();
    a.set_label(&mut others).unwrap();
    a.mov(rdi, READY_FLAG).unwrap();
    a.pause().unwrap();
    a.cmp(byte_ptr(rdi), 1).unwrap();
    a.jne(others).unwrap();
    a.set_label(&mut chase).unwrap();
    a.mov(rsi, VIRTIO_MMIO_START).unwrap();
    chase_forever(&mut a, ring, queue);
    a.assemble(CODE).unwrap()
}

/// The guest start for virtio-net: VERSION_1 only, rx on `ring(0)`, tx on `ring(1)`, 16
/// entries each.
fn start_net(a: &mut CodeAssembler) -> Driver {
    let mut fail = a.create_label();
    let mut ok = a.create_label();
    let drv = Driver::new(a, VIRTIO_MMIO_START);
    drv.negotiate(a, 0, fail);
    drv.setup_queue(a, 0, 16, &ring(0));
    drv.setup_queue(a, 1, 16, &ring(1));
    drv.driver_ok(a);
    drv.jump_if_needs_reset(a, fail);
    a.jmp(ok).unwrap();
    a.set_label(&mut fail).unwrap();
    print(a, "F");
    reset(a);
    a.set_label(&mut ok).unwrap();
    a.nop().unwrap();
    drv
}

#[test]
fn net_tx_ring_kept_topped_up_forever_does_not_capture_the_vmm() {
    if !kvm_available("net_tx_chase") {
        return;
    }
    let passt = FakePasst::new();
    let tx = ring(1);
    let code = all_vcpus_chase(&tx, 1, |a| {
        start_net(a);
        print(a, "N");
    });

    let (c, console) = config(32, 2);
    let mut vm = Vm::new(c).unwrap();
    let _stream = passt.attach(&mut vm);
    let mem = vm.memory().clone();
    // Every slot offers head 0: a bare 12-byte header, no frame (dropped, used with 0).
    tx.desc(&mem, 0, BUFS, 12, 0, 0);
    for slot in 0..16 {
        tx.offer(&mem, slot, 0);
    }
    vm.load_program(&code, CODE, EntryMode::Long64, true)
        .unwrap();
    survive_chase(vm, "net");
    assert_eq!(console.text(), "N");
    assert_ne!(tx.used_idx(&mem), 0, "the device served the tx queue");
}

#[test]
fn net_rx_ring_of_bad_buffers_kept_topped_up_forever_does_not_capture_the_vmm() {
    if !kvm_available("net_rx_chase") {
        return;
    }
    use std::io::Write as _;
    let passt = FakePasst::new();
    let rx = ring(0);
    let code = all_vcpus_chase(&rx, 0, |a| {
        start_net(a);
        print(a, "N");
    });

    let (c, console) = config(32, 2);
    let mut vm = Vm::new(c).unwrap();
    let mut stream = passt.attach(&mut vm);
    // A frame waits for the guest, which only ever offers device-readable "rx buffers".
    let frame = [0x5au8; 60];
    stream
        .write_all(&(frame.len() as u32).to_be_bytes())
        .unwrap();
    stream.write_all(&frame).unwrap();
    let mem = vm.memory().clone();
    rx.desc(&mem, 0, BUFS, 4096, 0, 0);
    for slot in 0..16 {
        rx.offer(&mem, slot, 0);
    }
    vm.load_program(&code, CODE, EntryMode::Long64, true)
        .unwrap();
    survive_chase(vm, "net");
    assert_eq!(console.text(), "N");
    assert_ne!(rx.used_idx(&mem), 0, "the device returned the bad buffers");
}

#[test]
fn net_malformed_frames_and_rx_buffers_are_returned_and_good_ones_still_flow() {
    if !kvm_available("net_malformed") {
        return;
    }
    use std::io::{Read as _, Write as _};
    let passt = FakePasst::new();
    let (rx, tx) = (ring(0), ring(1));
    let mut a = CodeAssembler::new(64).unwrap();
    let drv = start_net(&mut a);
    store_u16(&mut a, tx.avail_idx_addr(), 8);
    drv.notify(&mut a, 1);
    let mut tx_timeout = a.create_label();
    let mut rx_phase = a.create_label();
    wait_u16(&mut a, tx.used_idx_addr(), 8, SPINS, tx_timeout);
    print(&mut a, "U");
    a.jmp(rx_phase).unwrap();
    a.set_label(&mut tx_timeout).unwrap();
    print(&mut a, "t");
    a.set_label(&mut rx_phase).unwrap();
    drv.select(&mut a);
    store_u16(&mut a, rx.avail_idx_addr(), 3);
    drv.notify(&mut a, 0);
    let mut rx_timeout = a.create_label();
    let mut done = a.create_label();
    wait_u16(&mut a, rx.used_idx_addr(), 3, SPINS, rx_timeout);
    print(&mut a, "R");
    a.jmp(done).unwrap();
    a.set_label(&mut rx_timeout).unwrap();
    print(&mut a, "r");
    a.set_label(&mut done).unwrap();
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let (c, console) = config(32, 1);
    let mut vm = Vm::new(c).unwrap();
    let mut stream = passt.attach(&mut vm);
    let incoming: Vec<u8> = (0..60u8).map(|i| i ^ 0xa5).collect();
    stream
        .write_all(&(incoming.len() as u32).to_be_bytes())
        .unwrap();
    stream.write_all(&incoming).unwrap();
    let mem = vm.memory().clone();
    let b = |n: u64| BUFS + 0x1000 * n;
    let good_frame: Vec<u8> = (0..60u8).collect();
    let mut gso = [0u8; 12];
    gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4, never offered
    let mut csum = [0u8; 12];
    csum[0] = 1; // NEEDS_CSUM ...
    csum[6..8].copy_from_slice(&1000u16.to_le_bytes()); // ... starting past the frame
    mem.write_slice(&gso, GuestAddress(b(5))).unwrap();
    mem.write_slice(&csum, GuestAddress(b(6))).unwrap();
    for n in [5, 6, 8] {
        mem.write_slice(&good_frame, GuestAddress(b(n) + 12))
            .unwrap();
    }
    mem.write_slice(&[0u8; 12], GuestAddress(b(8))).unwrap();
    const N: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_WRITE;
    // tx: a device-writable buffer, one outside memory, one of u32::MAX bytes, a loop of
    // 8 KiB descriptors (cut at 16 of them: longer than any frame), a bare header, a GSO
    // frame, a checksum request outside its frame; then a good frame (heads 8 -> 9).
    tx.desc(&mem, 0, b(0), 72, W, 0);
    tx.desc(&mem, 1, OUTSIDE, 72, 0, 0);
    tx.desc(&mem, 2, b(2), u32::MAX, 0, 0);
    tx.desc(&mem, 3, b(3), 8192, N, 3);
    tx.desc(&mem, 4, b(4), 12, 0, 0);
    tx.desc(&mem, 5, b(5), 72, 0, 0);
    tx.desc(&mem, 6, b(6), 72, 0, 0);
    tx.desc(&mem, 8, b(8), 12, N, 9);
    tx.desc(&mem, 9, b(8) + 12, 60, 0, 0);
    for (slot, head) in [0u16, 1, 2, 3, 4, 5, 6, 8].into_iter().enumerate() {
        tx.offer(&mem, slot as u16, head);
    }
    // rx: a device-readable buffer, a writable one outside memory, then a good one.
    rx.desc(&mem, 0, b(10), 4096, 0, 0);
    rx.desc(&mem, 1, OUTSIDE, 4096, W, 0);
    rx.desc(&mem, 2, b(12), 4096, W, 0);
    for slot in 0..3 {
        rx.offer(&mem, slot, slot);
    }
    vm.load_program(&code, CODE, EntryMode::Long64, false)
        .unwrap();
    let (exit, _) = run(vm);
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(console.text(), "UR");
    for slot in 0..8u16 {
        let (_, len) = tx.used_elem(&mem, slot);
        assert_eq!(len, 0, "tx chains are used with length 0");
    }
    // passt got the good frame and nothing else.
    stream.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let mut expected = 60u32.to_be_bytes().to_vec();
    expected.extend_from_slice(&good_frame);
    assert_eq!(got, expected, "only the good frame reached passt");
    // The bad rx buffers came back empty, the frame landed in the good one.
    assert_eq!(rx.used_elem(&mem, 0), (0, 0));
    assert_eq!(rx.used_elem(&mem, 1), (1, 0));
    assert_eq!(rx.used_elem(&mem, 2), (2, 12 + 60));
    let mut landed = vec![0u8; 60];
    mem.read_slice(&mut landed, GuestAddress(b(12) + 12))
        .unwrap();
    assert_eq!(landed, incoming);
}

/// A virtio-vsock packet header (virtio 1.2, 5.10.6).
#[allow(clippy::too_many_arguments)]
fn vsock_header(
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
) -> [u8; 44] {
    let mut h = [0u8; 44];
    h[0..8].copy_from_slice(&src_cid.to_le_bytes());
    h[8..16].copy_from_slice(&dst_cid.to_le_bytes());
    h[16..20].copy_from_slice(&src_port.to_le_bytes());
    h[20..24].copy_from_slice(&dst_port.to_le_bytes());
    h[24..28].copy_from_slice(&len.to_le_bytes());
    h[28..30].copy_from_slice(&type_.to_le_bytes());
    h[30..32].copy_from_slice(&op.to_le_bytes());
    h[36..40].copy_from_slice(&65536u32.to_le_bytes()); // buf_alloc
    h
}

#[test]
fn vsock_malformed_packets_are_dropped_or_reset_and_a_connect_is_still_answered() {
    if !kvm_available("vsock_malformed") {
        return;
    }
    const GUEST_CID: u64 = 3;
    const HOST_PORT: u32 = 5000;
    const OP_REQUEST: u16 = 1;
    const OP_RESPONSE: u16 = 2;
    const OP_RW: u16 = 5;
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let host =
        std::os::unix::net::UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    host.set_nonblocking(true).unwrap();
    let (rx, tx, event) = (ring(0), ring(1), ring(2));

    let mut a = CodeAssembler::new(64).unwrap();
    let mut fail = a.create_label();
    let mut timeout = a.create_label();
    let mut done = a.create_label();
    let drv = Driver::new(&mut a, VIRTIO_MMIO_START);
    drv.negotiate(&mut a, 0, fail);
    drv.setup_queue(&mut a, 0, 16, &rx);
    drv.setup_queue(&mut a, 1, 16, &tx);
    drv.setup_queue(&mut a, 2, 16, &event);
    drv.driver_ok(&mut a);
    drv.jump_if_needs_reset(&mut a, fail);
    store_u16(&mut a, rx.avail_idx_addr(), 3);
    store_u16(&mut a, tx.avail_idx_addr(), 7);
    drv.notify(&mut a, 1);
    wait_u16(&mut a, rx.used_idx_addr(), 3, SPINS, timeout);
    // The third rx buffer holds the answer to the good REQUEST: a RESPONSE.
    a.mov(rdi, BUFS + 0x1000 * 12 + 30).unwrap();
    a.movzx(eax, word_ptr(rdi)).unwrap();
    a.cmp(eax, OP_RESPONSE as i32).unwrap();
    a.jne(fail).unwrap();
    print(&mut a, "V");
    a.jmp(done).unwrap();
    a.set_label(&mut timeout).unwrap();
    print(&mut a, "T");
    a.jmp(done).unwrap();
    a.set_label(&mut fail).unwrap();
    print(&mut a, "F");
    a.set_label(&mut done).unwrap();
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let (c, console) = config(32, 1);
    let mut vm = Vm::new(c).unwrap();
    vm.add_vsock(GUEST_CID, &uds).unwrap();
    let mem = vm.memory().clone();
    let b = |n: u64| BUFS + 0x1000 * n;
    let put = |n: u64, h: [u8; 44]| mem.write_slice(&h, GuestAddress(b(n))).unwrap();
    const N: u16 = VRING_DESC_F_NEXT;
    const W: u16 = VRING_DESC_F_WRITE;
    // tx 0: a descriptor looping on itself (16 copies of a header with CID 0: dropped).
    tx.desc(&mem, 0, b(0), 44, N, 0);
    // tx 1 and 2: outside guest memory, u32::MAX bytes long: dropped.
    tx.desc(&mem, 1, OUTSIDE, 44, 0, 0);
    tx.desc(&mem, 2, b(2), u32::MAX, 0, 0);
    // tx 3: a data packet claiming u32::MAX bytes of payload: that stream is reset.
    put(
        3,
        vsock_header(GUEST_CID, 2, 1111, HOST_PORT, u32::MAX, 1, OP_RW),
    );
    tx.desc(&mem, 3, b(3), 44, 0, 0);
    // tx 4: only a device-writable buffer: no header at all, dropped.
    tx.desc(&mem, 4, b(4), 44, W, 0);
    // tx 5: a socket type that is not offered: reset.
    put(
        5,
        vsock_header(GUEST_CID, 2, 2222, HOST_PORT, 0, 2, OP_REQUEST),
    );
    tx.desc(&mem, 5, b(5), 44, 0, 0);
    // tx 6: a good REQUEST to the host's port.
    put(
        6,
        vsock_header(GUEST_CID, 2, 1234, HOST_PORT, 0, 1, OP_REQUEST),
    );
    tx.desc(&mem, 6, b(6), 44, 0, 0);
    for slot in 0..7 {
        tx.offer(&mem, slot, slot);
    }
    // rx: a device-readable buffer and one outside memory (the two RSTs are lost in them,
    // returned with length 0), then a good one for the RESPONSE.
    rx.desc(&mem, 0, b(10), 4096, 0, 0);
    rx.desc(&mem, 1, OUTSIDE, 4096, W, 0);
    rx.desc(&mem, 2, b(12), 4096, W, 0);
    for slot in 0..3 {
        rx.offer(&mem, slot, slot);
    }
    vm.load_program(&code, CODE, EntryMode::Long64, false)
        .unwrap();
    let (exit, _) = run(vm);
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(console.text(), "V");
    assert_eq!(tx.used_idx(&mem), 7, "every tx packet was consumed");
    assert_eq!(rx.used_elem(&mem, 0), (0, 0));
    assert_eq!(rx.used_elem(&mem, 1), (1, 0));
    assert_eq!(rx.used_elem(&mem, 2), (2, 44));
    let mut h = [0u8; 44];
    mem.read_slice(&mut h, GuestAddress(b(12))).unwrap();
    assert_eq!(h, {
        let mut want = vsock_header(2, GUEST_CID, HOST_PORT, 1234, 0, 1, OP_RESPONSE);
        want[36..40].copy_from_slice(&h[36..40]); // our buf_alloc
        want
    });
    assert!(host.accept().is_ok(), "the good REQUEST reached the host");
    assert!(host.accept().is_err(), "and only that one");
}

#[test]
fn blk_read_over_its_own_rings_then_a_reset_device_on_fresh_rings_works() {
    if !kvm_available("blk_self_overwrite") {
        return;
    }
    let (_dir, path, content) = disk();
    let (q, fresh) = (ring(0), ring(1));
    let mut a = CodeAssembler::new(64).unwrap();
    let mut fail = a.create_label();
    let drv = start_one_queue(&mut a, 16);
    // One read whose data buffers are the queue's own descriptor table and avail ring: the
    // disk's bytes replace them while the device walks the batch (then a second offered
    // request, whose descriptors are gone).
    offer_and_wait_used(&mut a, &drv, &q, 2, 1);
    pause_loop(&mut a, 20_000);
    // What a driver does with a wrecked queue: reset the device and start again elsewhere.
    drv.negotiate(&mut a, 0, fail);
    drv.setup_queue(&mut a, 0, 16, &fresh);
    drv.driver_ok(&mut a);
    drv.jump_if_needs_reset(&mut a, fail);
    good_read(&mut a, &drv, &fresh, 0);
    reset(&mut a);
    a.set_label(&mut fail).unwrap();
    print(&mut a, "F");
    reset(&mut a);
    let code = a.assemble(CODE).unwrap();

    let r = Req::new(0);
    let (text, exit, _, mem) = run_blk(&path, &code, |mem| {
        r.prepare(mem, VIRTIO_BLK_T_IN, 0);
        let wn = VRING_DESC_F_WRITE | VRING_DESC_F_NEXT;
        q.desc(mem, 0, r.header, 16, VRING_DESC_F_NEXT, 1);
        q.desc(mem, 1, q.desc, 4096, wn, 2);
        q.desc(mem, 2, q.avail, 4096, wn, 3);
        q.desc(mem, 3, r.status, 1, VRING_DESC_F_WRITE, 0);
        q.offer(mem, 0, 0);
        q.offer(mem, 1, 0);
        prepare_good_read(mem, &fresh, 0);
    });
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(text, "UG");
    assert_eq!(
        r.status(&mem),
        VIRTIO_BLK_S_OK,
        "the wrecking read itself was valid"
    );
    let mut table = vec![0u8; 8192];
    mem.read_slice(&mut table[..4096], GuestAddress(q.desc))
        .unwrap();
    mem.read_slice(&mut table[4096..], GuestAddress(q.avail))
        .unwrap();
    assert_eq!(table, content[..8192]);
    assert_good_read(&mem, &content);
}

#[test]
fn blk_and_vsock_rings_kept_topped_up_forever_do_not_capture_the_vmm() {
    if !kvm_available("blk_vsock_chase") {
        return;
    }
    // virtio-blk: queue 0, every slot a request without a writable status (used with 0).
    let (_dir, path, _) = disk();
    let q = ring(0);
    let code = all_vcpus_chase(&q, 0, |a| {
        start_one_queue(a, 16);
        print(a, "B");
    });
    let (c, console) = config(32, 2);
    let mut vm = Vm::new(c).unwrap();
    vm.add_disk(&path, false).unwrap();
    let mem = vm.memory().clone();
    let r = Req::new(0);
    r.prepare(&mem, VIRTIO_BLK_T_IN, 0);
    q.desc(&mem, 0, r.header, 16, VRING_DESC_F_NEXT, 1);
    q.desc(&mem, 1, r.status, 1, 0, 0);
    for slot in 0..16 {
        q.offer(&mem, slot, 0);
    }
    vm.load_program(&code, CODE, EntryMode::Long64, true)
        .unwrap();
    survive_chase(vm, "blk");
    assert_eq!(console.text(), "B");
    assert_ne!(q.used_idx(&mem), 0);

    // virtio-vsock: the tx queue, every slot a header with the wrong CID (dropped).
    let dir = tempfile::tempdir().unwrap();
    let (rx, tx, event) = (ring(0), ring(1), ring(2));
    let code = all_vcpus_chase(&tx, 1, |a| {
        let mut fail = a.create_label();
        let mut ok = a.create_label();
        let drv = Driver::new(a, VIRTIO_MMIO_START);
        drv.negotiate(a, 0, fail);
        drv.setup_queue(a, 0, 16, &rx);
        drv.setup_queue(a, 1, 16, &tx);
        drv.setup_queue(a, 2, 16, &event);
        drv.driver_ok(a);
        drv.jump_if_needs_reset(a, fail);
        print(a, "V");
        a.jmp(ok).unwrap();
        a.set_label(&mut fail).unwrap();
        print(a, "F");
        reset(a);
        a.set_label(&mut ok).unwrap();
        a.nop().unwrap();
    });
    let (c, console) = config(32, 2);
    let mut vm = Vm::new(c).unwrap();
    vm.add_vsock(3, &dir.path().join("v.sock")).unwrap();
    let mem = vm.memory().clone();
    mem.write_slice(&[0u8; 44], GuestAddress(BUFS)).unwrap();
    tx.desc(&mem, 0, BUFS, 44, 0, 0);
    for slot in 0..16 {
        tx.offer(&mem, slot, 0);
    }
    vm.load_program(&code, CODE, EntryMode::Long64, true)
        .unwrap();
    survive_chase(vm, "vsock");
    assert_eq!(console.text(), "V");
    assert_ne!(tx.used_idx(&mem), 0);
}
