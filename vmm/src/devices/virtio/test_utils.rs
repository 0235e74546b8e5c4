//! A minimal guest-side virtio driver for tests: it talks to an [`MmioTransport`] only through
//! `BusDevice` register accesses and guest memory, like the Linux driver would.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::mmio::MmioTransport;
use super::VirtioDevice;
use crate::devices::{BusDevice, InterruptTrigger};
use crate::memory::GuestMemory;

pub const MEM_SIZE: usize = 16 << 20;
/// Guest buffers are allocated from here up.
pub const BUFFERS_START: u64 = 0x40_0000;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

#[derive(Default)]
pub struct CountingInterrupt {
    pub count: AtomicUsize,
}

impl CountingInterrupt {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

impl InterruptTrigger for CountingInterrupt {
    fn trigger(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub fn guest_memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

pub fn transport<D: VirtioDevice>(
    device: D,
    mem: &GuestMemory,
) -> (MmioTransport<D>, Arc<CountingInterrupt>) {
    let irq = Arc::new(CountingInterrupt::default());
    let t = MmioTransport::new(device, mem.clone(), irq.clone()).unwrap();
    (t, irq)
}

pub fn read_reg(t: &mut impl BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

pub fn write_reg(t: &mut impl BusDevice, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// The driver's view of one split virtqueue.
pub struct GuestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: Vec<u16>,
    in_flight: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl GuestQueue {
    /// Lays a queue of `size` entries out at `base` (4 KiB aligned, 64 KiB reserved).
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        GuestQueue {
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            in_flight: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    pub fn write_desc(
        mem: &GuestMemory,
        table: u64,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(table + 16 * u64::from(index));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Writes a chain into free descriptors and makes it available. Returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        assert!(
            self.free.len() >= bufs.len(),
            "test queue out of descriptors"
        );
        let ids: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, b) in bufs.iter().enumerate() {
            let mut flags = if b.write { VRING_DESC_F_WRITE } else { 0 };
            let next = if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
                ids[i + 1]
            } else {
                0
            };
            Self::write_desc(mem, self.desc, ids[i], b.addr, b.len, flags, next);
        }
        let head = ids[0];
        self.in_flight.insert(head, ids);
        self.publish(mem, head);
        head
    }

    /// Puts `head` on the available ring (for hand-written, possibly hostile, chains).
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Takes the next used element: (head, len).
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        if self.used_idx(mem) == self.last_used {
            return None;
        }
        let elem = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let id: u32 = mem.read_obj(GuestAddress(elem)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(elem + 4)).unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        if let Some(ids) = self.in_flight.remove(&(id as u16)) {
            self.free.extend(ids);
        }
        Some((id as u16, len))
    }
}

/// Bump allocator for guest buffers.
pub struct Alloc {
    next: u64,
}

impl Default for Alloc {
    fn default() -> Self {
        Alloc {
            next: BUFFERS_START,
        }
    }
}

impl Alloc {
    pub fn take(&mut self, len: u64) -> u64 {
        let addr = self.next;
        self.next = (self.next + len + 15) & !15;
        assert!(self.next <= MEM_SIZE as u64, "test guest memory exhausted");
        addr
    }
}

// Register offsets and status bits, as a driver spells them: the transport's own table.
pub use super::mmio::regs::*;
pub const CONFIG: u64 = super::mmio::CONFIG_SPACE_OFFSET;

pub fn device_features(t: &mut impl BusDevice) -> u64 {
    write_reg(t, REG_DEVICE_FEATURES_SEL, 0);
    let low = read_reg(t, REG_DEVICE_FEATURES);
    write_reg(t, REG_DEVICE_FEATURES_SEL, 1);
    let high = read_reg(t, REG_DEVICE_FEATURES);
    u64::from(low) | u64::from(high) << 32
}

pub fn write_driver_features(t: &mut impl BusDevice, features: u64) {
    write_reg(t, REG_DRIVER_FEATURES_SEL, 0);
    write_reg(t, REG_DRIVER_FEATURES, features as u32);
    write_reg(t, REG_DRIVER_FEATURES_SEL, 1);
    write_reg(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
}

/// Adds one status bit the way Linux does (read, or, write) and returns the status read back.
pub fn add_status(t: &mut impl BusDevice, bit: u32) -> u32 {
    let s = read_reg(t, REG_STATUS);
    write_reg(t, REG_STATUS, s | bit);
    read_reg(t, REG_STATUS)
}

pub fn setup_queue(t: &mut impl BusDevice, index: u32, q: &GuestQueue) {
    write_reg(t, REG_QUEUE_SEL, index);
    assert!(read_reg(t, REG_QUEUE_NUM_MAX) >= u32::from(q.size));
    write_reg(t, REG_QUEUE_NUM, u32::from(q.size));
    write_reg(t, REG_QUEUE_DESC_LOW, q.desc as u32);
    write_reg(t, REG_QUEUE_DESC_HIGH, (q.desc >> 32) as u32);
    write_reg(t, REG_QUEUE_DRIVER_LOW, q.avail as u32);
    write_reg(t, REG_QUEUE_DRIVER_HIGH, (q.avail >> 32) as u32);
    write_reg(t, REG_QUEUE_DEVICE_LOW, q.used as u32);
    write_reg(t, REG_QUEUE_DEVICE_HIGH, (q.used >> 32) as u32);
    write_reg(t, REG_QUEUE_READY, 1);
}

/// The whole init handshake (virtio 1.2, 3.1.1) accepting every offered feature. Returns the
/// final status.
pub fn init_device(t: &mut impl BusDevice, queues: &[&GuestQueue]) -> u32 {
    assert_eq!(read_reg(t, REG_MAGIC), 0x7472_6976);
    assert_eq!(read_reg(t, REG_VERSION), 2);
    write_reg(t, REG_STATUS, 0);
    assert_eq!(add_status(t, S_ACK), S_ACK);
    assert_eq!(add_status(t, S_DRIVER), S_ACK | S_DRIVER);
    let features = device_features(t);
    write_driver_features(t, features);
    assert_eq!(
        add_status(t, S_FEATURES_OK),
        S_ACK | S_DRIVER | S_FEATURES_OK,
        "device refused FEATURES_OK"
    );
    for (i, q) in queues.iter().enumerate() {
        setup_queue(t, i as u32, q);
    }
    add_status(t, S_DRIVER_OK)
}
