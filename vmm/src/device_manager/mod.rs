//! Where the VM's devices are placed and wired: the port-I/O and MMIO buses the vCPUs
//! dispatch to, the legacy devices ([`legacy`]), the virtio-mmio slots ([`virtio`]), the
//! interrupt lines (irqfds) and queue notifications (ioeventfds) KVM delivers, and the event
//! sources that move guest-visible state (silenced while the VM is paused).

pub mod legacy;
pub mod virtio;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{VIRTIO_IRQ_END, VIRTIO_IRQ_START};
use crate::devices::bus::{Bus, BusError, SharedDevice};
use crate::devices::i8042::{I8042RestoreError, I8042};
use crate::devices::serial::{SerialDevice, SerialRestoreError};
use crate::devices::virtio::block::BlockError;
use crate::devices::virtio::mmio::TransportError;
use crate::devices::virtio::net::NetError;
use crate::devices::virtio::vsock::VsockError;
use crate::devices::virtio::DeviceRestoreError;
use crate::event_loop::{EventLoop, Flow, Token};
use virtio::VirtioSlot;

/// Why a device could not be created, placed or wired.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A KVM ioctl that wires a device (irqfd, ioeventfd) failed.
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// An eventfd, timer or epoll registration for a device failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// Two devices claim overlapping bus ranges.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// Every virtio-mmio window and IRQ is taken.
    #[error("no room for another virtio-mmio device (IRQs {VIRTIO_IRQ_START}-{VIRTIO_IRQ_END} are taken)")]
    TooManyVirtioDevices,
    /// The virtio-mmio transport refused the device model.
    #[error("virtio device: {0}")]
    Transport(TransportError),
    /// The disk image could not be opened as a virtio-blk device.
    #[error("virtio device: disk {}: {source}", .path.display())]
    Disk {
        path: std::path::PathBuf,
        source: BlockError,
    },
    /// The vsock device's Unix socket could not be set up.
    #[error("virtio device: vsock {}: {source}", .path.display())]
    Vsock {
        path: std::path::PathBuf,
        source: VsockError,
    },
    /// The network device could not connect to its passt socket.
    #[error("virtio device: net {}: {source}", .path.display())]
    Net {
        path: std::path::PathBuf,
        source: NetError,
    },
    /// The saved serial port state does not fit the device model.
    #[error("cannot restore the snapshot: {0}")]
    RestoreSerial(#[from] SerialRestoreError),
    /// The saved i8042 state does not fit the device model.
    #[error("cannot restore the snapshot: {0}")]
    RestoreI8042(#[from] I8042RestoreError),
    /// A saved virtio device model could not be rebuilt.
    #[error("cannot restore the snapshot: {0}")]
    RestoreVirtio(#[from] DeviceRestoreError),
    /// A saved virtio transport does not fit its device.
    #[error("cannot restore the snapshot: virtio device {index}: {source}")]
    RestoreTransport {
        index: usize,
        source: TransportError,
    },
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> DeviceError {
    move |source| DeviceError::Io { what, source }
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> DeviceError {
    move |source| DeviceError::Kvm { what, source }
}

pub(crate) fn new_eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(io_err(what))
}

/// The VM's devices and how they are reached.
pub struct DeviceManager {
    /// Port-I/O bus, handed to the vCPU threads when the VM runs.
    pub(crate) pio: Bus,
    /// MMIO bus, likewise.
    pub(crate) mmio: Bus,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) virtio: Vec<VirtioSlot>,
    /// Interrupt lines kept alive for the VM's lifetime.
    irq_lines: Vec<Arc<EventFd>>,
    /// Event sources that move guest-visible state (queue notifications, host sockets,
    /// console input): silenced while the VM is paused.
    pub(crate) sources: Vec<Token>,
}

impl DeviceManager {
    /// Maps a device on the port-I/O bus.
    pub fn add_pio_device(
        &mut self,
        base: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), DeviceError> {
        Ok(self.pio.insert(base, len, dev)?)
    }

    /// Maps a device on the MMIO bus.
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), DeviceError> {
        Ok(self.mmio.insert(base, len, dev)?)
    }

    /// An interrupt line to the guest: an eventfd registered as KVM irqfd for `gsi`.
    pub fn irq_line(&mut self, fd: &VmFd, gsi: u32) -> Result<Arc<EventFd>, DeviceError> {
        let evt = Arc::new(new_eventfd("irq eventfd")?);
        fd.register_irqfd(&evt, gsi).map_err(kvm_err("KVM_IRQFD"))?;
        self.irq_lines.push(evt.clone());
        Ok(evt)
    }

    /// Calls `handler` in the event loop whenever the guest writes to `addr` (with a 4-byte
    /// value equal to `datamatch`, if given). KVM completes such writes in the kernel: the
    /// vCPU does not exit to the VMM.
    pub fn add_ioevent<C>(
        &mut self,
        fd: &VmFd,
        event_loop: &mut EventLoop<C>,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        mut handler: Box<dyn FnMut() + Send>,
    ) -> Result<(), DeviceError> {
        let evt = new_eventfd("ioeventfd")?;
        match datamatch {
            Some(value) => fd.register_ioevent(&evt, &addr, value),
            None => fd.register_ioevent(&evt, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
        let raw = evt.as_raw_fd();
        let token = event_loop
            .add(
                raw,
                Box::new(move |_, _, _| {
                    if evt.read().is_ok() {
                        handler();
                    }
                    Flow::Continue
                }),
            )
            .map_err(io_err("epoll_ctl"))?;
        self.sources.push(token);
        Ok(())
    }
}
