//! The virtio-mmio slots: each virtio device gets the next 4 KiB window above the MMIO start
//! and its own IRQ, its queue notifications as ioeventfds and its host events in the event
//! loop, and a `virtio_mmio.device=` entry on the kernel command line.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::{io_err, kvm_err, new_eventfd, DeviceError, DeviceManager};
use crate::arch::x86_64::layout::{
    VIRTIO_IRQ_END, VIRTIO_IRQ_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::devices::bus::lock;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{MacAddr, Net};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::InterruptTrigger;
use crate::event_loop::{EventLoop, Flow};
use crate::memory::GuestMemory;

/// Where a virtio-mmio device was placed.
#[derive(Clone)]
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The next free window, its IRQ and that IRQ's line (an irqfd with an irqchip).
pub struct FreeSlot {
    pub base: u64,
    pub irq: u32,
    pub interrupt: Arc<EventFd>,
}

impl DeviceManager {
    /// Puts a virtio device on the next virtio-mmio window with its own IRQ and wires it.
    pub fn add_virtio_device<C>(
        &mut self,
        fd: &VmFd,
        irqchip: bool,
        mem: &GuestMemory,
        event_loop: &mut EventLoop<C>,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioSlot, DeviceError> {
        let slot = self.next_virtio_slot(fd, irqchip)?;
        let transport = MmioTransport::new(
            device,
            mem.clone(),
            slot.interrupt as Arc<dyn InterruptTrigger>,
        )
        .map_err(DeviceError::Transport)?;
        self.attach_transport(fd, event_loop, transport, slot.base, slot.irq)
    }

    /// Attaches a disk image as a virtio-blk device (the first one is /dev/vda in the guest).
    pub fn add_disk<C>(
        &mut self,
        fd: &VmFd,
        irqchip: bool,
        mem: &GuestMemory,
        event_loop: &mut EventLoop<C>,
        path: &Path,
        read_only: bool,
    ) -> Result<VirtioSlot, DeviceError> {
        let block = Block::new(path, read_only).map_err(|source| DeviceError::Disk {
            path: path.to_path_buf(),
            source,
        })?;
        self.add_virtio_device(fd, irqchip, mem, event_loop, Box::new(block))
    }

    /// Attaches a virtio-vsock device for guest CID `guest_cid` bridged to `uds_path`.
    pub fn add_vsock<C>(
        &mut self,
        fd: &VmFd,
        irqchip: bool,
        mem: &GuestMemory,
        event_loop: &mut EventLoop<C>,
        guest_cid: u64,
        uds_path: &Path,
    ) -> Result<VirtioSlot, DeviceError> {
        let vsock = Vsock::new(guest_cid, uds_path).map_err(|source| DeviceError::Vsock {
            path: uds_path.to_path_buf(),
            source,
        })?;
        self.add_virtio_device(fd, irqchip, mem, event_loop, Box::new(vsock))
    }

    /// Attaches a virtio-net device with MAC `mac`, connected to the passt socket `socket`.
    pub fn add_net<C>(
        &mut self,
        fd: &VmFd,
        irqchip: bool,
        mem: &GuestMemory,
        event_loop: &mut EventLoop<C>,
        socket: &Path,
        mac: MacAddr,
    ) -> Result<VirtioSlot, DeviceError> {
        let net = Net::connect(socket, mac).map_err(|source| DeviceError::Net {
            path: socket.to_path_buf(),
            source,
        })?;
        self.add_virtio_device(fd, irqchip, mem, event_loop, Box::new(net))
    }

    /// The next virtio-mmio window, its IRQ and that IRQ's line.
    pub fn next_virtio_slot(&mut self, fd: &VmFd, irqchip: bool) -> Result<FreeSlot, DeviceError> {
        let index = self.virtio.len() as u32;
        let irq = VIRTIO_IRQ_START + index;
        if irq > VIRTIO_IRQ_END {
            return Err(DeviceError::TooManyVirtioDevices);
        }
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let interrupt = Arc::new(new_eventfd("virtio irq eventfd")?);
        if irqchip {
            fd.register_irqfd(&interrupt, irq)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        }
        self.irq_lines.push(interrupt.clone());
        Ok(FreeSlot {
            base,
            irq,
            interrupt,
        })
    }

    /// Maps a transport on its window and wires its queue notifications (ioeventfds) and
    /// host events into the event loop.
    pub fn attach_transport<C>(
        &mut self,
        fd: &VmFd,
        event_loop: &mut EventLoop<C>,
        transport: MmioTransport,
        base: u64,
        irq: u32,
    ) -> Result<VirtioSlot, DeviceError> {
        let queues = transport.device().queue_max_sizes().len();
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
        for queue in 0..queues as u16 {
            let t = transport.clone();
            self.add_ioevent(
                fd,
                event_loop,
                IoEventAddress::Mmio(base + crate::devices::virtio::mmio::regs::REG_QUEUE_NOTIFY),
                Some(queue as u32),
                Box::new(move || lock(&t).notify_queue(queue)),
            )?;
        }
        if let Some(host_fd) = lock(&transport).host_event_fd() {
            let t = transport.clone();
            let token = event_loop
                .add(
                    host_fd,
                    Box::new(move |_, _, _| {
                        lock(&t).process_host_events();
                        Flow::Continue
                    }),
                )
                .map_err(io_err("epoll_ctl"))?;
            self.sources.push(token);
        }
        let slot = VirtioSlot {
            base,
            irq,
            transport,
        };
        self.virtio.push(slot.clone());
        Ok(slot)
    }

    /// The `virtio_mmio.device=` command-line entries of the devices added so far.
    pub fn virtio_cmdline(&self) -> String {
        self.virtio
            .iter()
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq))
            .collect::<Vec<_>>()
            .join(" ")
    }
}
