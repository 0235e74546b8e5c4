//! Shared harness of the fuzz targets (`fuzz_targets/*.rs`, run by `scripts/fuzz.sh`).
//!
//! Why a harness at all: the virtio devices must be fuzzed the way a hostile guest reaches
//! them, through the virtio-mmio registers and guest memory only. [`Guest`] is that guest: it
//! maps a small guest memory, copies the fuzz input into it (so the input *is* the descriptor
//! tables, the available rings and the buffers), puts a real `fnvm_vmm` device on a real
//! `MmioTransport`, runs the driver's init handshake through register writes and then notifies
//! the queues. Nothing of the devices is re-implemented here; only the driver side is.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fnvm_vmm::devices::virtio::mmio::MmioTransport;
use fnvm_vmm::devices::virtio::VirtioDevice;
use fnvm_vmm::devices::{BusDevice, InterruptTrigger};
use fnvm_vmm::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of every virtio run: big enough for buffers anywhere in the input, small enough
/// to map per run (the pages are only touched where the input lands).
pub const MEM_SIZE: usize = 1 << 20;
/// Each queue's rings live in its own window: queue `q` at `q * QUEUE_STRIDE`.
pub const QUEUE_STRIDE: u64 = 0x400;
/// Offsets inside a queue's window: the descriptor table, the available ring, the used ring.
pub const DESC_OFF: u64 = 0x000;
pub const AVAIL_OFF: u64 = 0x100;
pub const USED_OFF: u64 = 0x200;
/// Queue size the harness configures: 16 descriptors fill the 0x100 bytes before the ring.
pub const QUEUE_SIZE: u32 = 16;
/// Where the seeds put buffers (any address is allowed; the fuzzer may move them).
pub const BUFFERS: u64 = 0x1000;

// virtio-mmio registers and status bits: the transport's own table.
use fnvm_vmm::devices::virtio::mmio::regs::*;

/// An interrupt line that only counts.
#[derive(Default)]
pub struct CountingInterrupt(AtomicUsize);

impl InterruptTrigger for CountingInterrupt {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// A hostile guest with one device.
pub struct Guest<D: VirtioDevice> {
    pub mem: GuestMemory,
    pub transport: MmioTransport<D>,
}

fn write_reg(t: &mut impl BusDevice, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read_reg(t: &mut impl BusDevice, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

impl<D: VirtioDevice> Guest<D> {
    /// Maps guest memory holding `image` from address 0, puts `device` on a transport and
    /// initialises it with `queues` queues at the harness's layout, accepting the offered
    /// features that `feature_mask` keeps (VERSION_1 always, or the device refuses).
    /// `None` if the device refused to start (not a bug: the input chose that).
    pub fn new(device: D, image: &[u8], queues: u32, feature_mask: u64) -> Option<Guest<D>> {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
        let n = image.len().min(MEM_SIZE);
        mem.write_slice(&image[..n], GuestAddress(0)).ok()?;
        let irq = Arc::new(CountingInterrupt::default());
        let mut t = MmioTransport::new(device, mem.clone(), irq).ok()?;
        write_reg(&mut t, REG_STATUS, 0);
        write_reg(&mut t, REG_STATUS, S_ACK);
        write_reg(&mut t, REG_STATUS, S_ACK | S_DRIVER);
        write_reg(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        let low = read_reg(&mut t, REG_DEVICE_FEATURES);
        write_reg(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        let high = read_reg(&mut t, REG_DEVICE_FEATURES);
        let features = (u64::from(low) | u64::from(high) << 32) & (feature_mask | 1 << 32);
        write_reg(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        write_reg(&mut t, REG_DRIVER_FEATURES, features as u32);
        write_reg(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        write_reg(&mut t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        write_reg(&mut t, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        for q in 0..queues {
            let base = u64::from(q) * QUEUE_STRIDE;
            write_reg(&mut t, REG_QUEUE_SEL, q);
            write_reg(&mut t, REG_QUEUE_NUM, QUEUE_SIZE);
            for (low, high, addr) in [
                (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, base + DESC_OFF),
                (
                    REG_QUEUE_DRIVER_LOW,
                    REG_QUEUE_DRIVER_HIGH,
                    base + AVAIL_OFF,
                ),
                (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, base + USED_OFF),
            ] {
                write_reg(&mut t, low, addr as u32);
                write_reg(&mut t, high, (addr >> 32) as u32);
            }
            write_reg(&mut t, REG_QUEUE_READY, 1);
        }
        write_reg(
            &mut t,
            REG_STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
        t.is_running().then_some(Guest { mem, transport: t })
    }

    /// QueueNotify for queue `q`, as a vCPU exit would deliver it; then acknowledges the
    /// interrupt.
    pub fn notify(&mut self, q: u32) {
        write_reg(&mut self.transport, REG_QUEUE_NOTIFY, q);
        write_reg(&mut self.transport, REG_INTERRUPT_ACK, 3);
    }

    /// The used ring's index of queue `q`: it may only count what the guest made available.
    pub fn used_idx(&self, q: u32) -> u16 {
        self.mem
            .read_obj(GuestAddress(u64::from(q) * QUEUE_STRIDE + USED_OFF + 2))
            .unwrap_or_default()
    }
}

/// Splits `data` at its first `n` bytes (the control bytes of a target), padding with zeroes.
pub fn split_control<const N: usize>(data: &[u8]) -> ([u8; N], &[u8]) {
    let mut control = [0u8; N];
    let n = data.len().min(N);
    control[..n].copy_from_slice(&data[..n]);
    (control, &data[n..])
}
