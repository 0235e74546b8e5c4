//! The virtio-mmio transport, version 2 ("modern") register layout.
//!
//! One [`MmioTransport`] sits on a 4 KiB MMIO window: registers in the first 0x100 bytes, the
//! device's config space from 0x100. It implements the driver-facing protocol (status state
//! machine, feature negotiation, queue setup, interrupt status) and calls into its
//! [`VirtioDevice`] once the driver set DRIVER_OK on a valid configuration.
//!
//! Queues are kept as plain [`QueueConfig`] data while the driver sets them up and only turned
//! into live virtio-queue [`Queue`]s at DRIVER_OK, after validation (power-of-two size, ring
//! alignment, rings inside guest memory). A driver that gets any of that wrong sees
//! DEVICE_NEEDS_RESET, never a half-working device.

use std::os::fd::RawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState, QueueT};

use super::{QueueConfig, VirtioDevice, FEATURE_VERSION_1};
use crate::devices::Persist;
use crate::devices::{BusDevice, InterruptTrigger};
use crate::memory::GuestMemory;

/// Size of the MMIO window of one device (registers + config space).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version 2: the modern (virtio 1.x) register layout.
const MMIO_VERSION: u32 = 2;
/// No PCI-style vendor: the guest driver ignores it.
const VENDOR_ID: u32 = 0;

/// The transport's register offsets (virtio 1.2, 4.2.2) and device status bits, one table for
/// the transport, the device manager's ioeventfds, and the drivers of its tests, hostile
/// guests and fuzz targets.
pub mod regs {
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };

    pub const REG_MAGIC: u64 = 0x000;
    pub const REG_VERSION: u64 = 0x004;
    pub const REG_DEVICE_ID: u64 = 0x008;
    pub const REG_VENDOR_ID: u64 = 0x00c;
    pub const REG_DEVICE_FEATURES: u64 = 0x010;
    pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const REG_DRIVER_FEATURES: u64 = 0x020;
    pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const REG_QUEUE_SEL: u64 = 0x030;
    pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
    pub const REG_QUEUE_NUM: u64 = 0x038;
    pub const REG_QUEUE_READY: u64 = 0x044;
    pub const REG_QUEUE_NOTIFY: u64 = 0x050;
    pub const REG_INTERRUPT_STATUS: u64 = 0x060;
    pub const REG_INTERRUPT_ACK: u64 = 0x064;
    pub const REG_STATUS: u64 = 0x070;
    pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
    pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
    pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const REG_SHM_SEL: u64 = 0x0ac;
    pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
    pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
    pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
    pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
    pub const REG_CONFIG_GENERATION: u64 = 0x0fc;

    pub const S_ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    pub const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    pub const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    pub const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
    pub const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
}

use regs::*;

/// Start of the device-specific config space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Why a transport could not be built or restored.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device offers a queue whose maximum size is not a power of two up to 32768.
    #[error(
        "device offers queue {index} with maximum size {size}, not a power of two in 1..=32768"
    )]
    InvalidQueueMaxSize { index: usize, size: u16 },
    /// The device does not offer VIRTIO_F_VERSION_1, which the modern-only transport needs.
    #[error("device does not offer VIRTIO_F_VERSION_1, which this modern-only transport requires")]
    NoVersion1,
    /// The saved transport state belongs to a different device type.
    #[error("saved transport belongs to device type {saved}, not {actual}")]
    DeviceTypeMismatch { saved: u32, actual: u32 },
    /// The saved transport state has a different number of queues than the device.
    #[error("saved transport has {saved} queues, the device has {actual}")]
    QueueCountMismatch { saved: usize, actual: usize },
    /// A saved queue's state is not valid.
    #[error("saved queue {index} is invalid: {reason}")]
    InvalidSavedQueue { index: usize, reason: String },
    /// The restored device could not be re-activated.
    #[error("re-activating the restored device failed: {0}")]
    Activate(#[from] super::ActivateError),
}

/// Saved state of a transport (not of its device, which has its own [`Persist`] state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub queues: Vec<QueueConfig>,
}

/// What a restore needs besides [`MmioTransportState`]: the already restored device and the
/// VM's memory and interrupt line.
pub struct MmioTransportArgs<D> {
    pub device: D,
    pub mem: GuestMemory,
    pub interrupt: Arc<dyn InterruptTrigger>,
}

/// A virtio device on the virtio-mmio transport. `D` is the device model, either a concrete
/// type (typed access through [`MmioTransport::device`]) or `Box<dyn VirtioDevice>`.
pub struct MmioTransport<D: VirtioDevice = Box<dyn VirtioDevice>> {
    device: D,
    mem: GuestMemory,
    interrupt: Arc<dyn InterruptTrigger>,
    status: u32,
    acked_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// What the driver configured, queue by queue.
    queue_configs: Vec<QueueConfig>,
    /// The live queues, only while the device is activated.
    queues: Vec<Queue>,
    activated: bool,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` on a transport. Fails only if the device model itself is inconsistent.
    pub fn new(
        device: D,
        mem: GuestMemory,
        interrupt: Arc<dyn InterruptTrigger>,
    ) -> Result<Self, TransportError> {
        if device.features() & FEATURE_VERSION_1 == 0 {
            return Err(TransportError::NoVersion1);
        }
        let mut queue_configs = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(TransportError::InvalidQueueMaxSize { index, size });
            }
            queue_configs.push(QueueConfig::new(size));
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            status: 0,
            acked_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            interrupt_status: 0,
            config_generation: 0,
            queue_configs,
            queues: Vec::new(),
            activated: false,
        })
    }

    /// The device model.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device model, mutably (e.g. to save its state while the VM is paused).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The driver status register (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, ... bits).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// True once the driver set DRIVER_OK on a valid configuration and nothing failed since.
    pub fn is_running(&self) -> bool {
        self.activated && self.status & (S_FAILED | S_NEEDS_RESET) == 0
    }

    /// The driver notified queue `index` (QueueNotify written, or its ioeventfd fired).
    /// Ignored unless the device is running and the queue exists.
    pub fn notify_queue(&mut self, index: u16) {
        if !self.is_running() {
            tracing::debug!(index, "queue notification before DRIVER_OK ignored");
            return;
        }
        if usize::from(index) >= self.queues.len() {
            tracing::warn!(index, "notification for a nonexistent queue ignored");
            return;
        }
        if self
            .device
            .process_queue(&self.mem, &mut self.queues, index)
        {
            self.raise_interrupt(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// The fd the VMM event loop should poll for this device's host-side events, if any (the
    /// vsock device's sockets). When it is readable, call [`MmioTransport::process_host_events`].
    pub fn host_event_fd(&self) -> Option<RawFd> {
        self.device.host_event_fd()
    }

    /// Lets the device handle its host-side events (new connections, socket data) and
    /// interrupts the guest if that filled any used ring.
    pub fn process_host_events(&mut self) {
        if !self.is_running() {
            // Still drain host events so a level-triggered fd does not spin.
            let mut no_queues: [Queue; 0] = [];
            self.device.process_host_events(&self.mem, &mut no_queues);
            return;
        }
        if self.device.process_host_events(&self.mem, &mut self.queues) {
            self.raise_interrupt(VIRTIO_MMIO_INT_VRING);
        }
    }

    fn raise_interrupt(&mut self, bit: u32) {
        self.interrupt_status |= bit;
        if let Err(e) = self.interrupt.trigger() {
            tracing::error!(error = %e, "failed to raise the virtio interrupt");
        }
    }

    fn reset(&mut self) {
        if self.activated || self.status != 0 {
            self.device.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt_status = 0;
        self.activated = false;
        self.queues.clear();
        for q in &mut self.queue_configs {
            *q = QueueConfig::new(q.max_size);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queue_configs.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only be changed after feature negotiation and before DRIVER_OK, and
    /// not while that queue is enabled.
    fn selected_queue_writable(&mut self) -> Option<&mut QueueConfig> {
        if self.status & (S_FEATURES_OK | S_DRIVER_OK | S_FAILED) != S_FEATURES_OK {
            tracing::warn!(
                status = self.status,
                "queue register write in the wrong state"
            );
            return None;
        }
        match self.selected_queue() {
            Some(q) if !q.ready => Some(q),
            Some(_) => {
                tracing::warn!("queue register write while the queue is ready ignored");
                None
            }
            None => None,
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if value & S_FAILED != 0 {
            // The driver gave up on the device: stop processing until it resets.
            self.status |= S_FAILED;
            return;
        }
        let added = value & !old;
        if value & old != old || added.count_ones() != 1 {
            tracing::warn!(
                old,
                value,
                "status write that is not one step forward ignored"
            );
            return;
        }
        let base = old & !S_NEEDS_RESET;
        match added {
            S_ACK if base == 0 => self.status = value,
            S_DRIVER if base == S_ACK => self.status = value,
            S_FEATURES_OK if base == S_ACK | S_DRIVER => {
                let offered = self.device.features();
                if self.acked_features & !offered != 0 {
                    tracing::warn!(
                        acked = self.acked_features,
                        offered,
                        "driver accepted features the device does not offer: FEATURES_OK refused"
                    );
                } else if self.acked_features & FEATURE_VERSION_1 == 0 {
                    tracing::warn!("driver did not accept VIRTIO_F_VERSION_1: FEATURES_OK refused");
                } else {
                    self.status = value;
                }
            }
            S_DRIVER_OK if base == S_ACK | S_DRIVER | S_FEATURES_OK => {
                self.status = value;
                self.activate();
            }
            _ => tracing::warn!(old, value, "status write out of order ignored"),
        }
    }

    fn build_queues(&self) -> Result<Vec<Queue>, String> {
        let mut queues = Vec::with_capacity(self.queue_configs.len());
        for (index, cfg) in self.queue_configs.iter().enumerate() {
            let queue = Queue::try_from(QueueState::from(*cfg))
                .map_err(|e| format!("queue {index}: {e}"))?;
            if !queue.is_valid(&self.mem) {
                return Err(format!(
                    "queue {index} is not ready or its rings are not inside guest memory"
                ));
            }
            queues.push(queue);
        }
        Ok(queues)
    }

    fn activate(&mut self) {
        let result = self.build_queues().and_then(|mut queues| {
            self.device
                .activate(&self.mem, &mut queues, self.acked_features)
                .map_err(|e| e.to_string())?;
            Ok(queues)
        });
        match result {
            Ok(queues) => {
                self.queues = queues;
                self.activated = true;
            }
            Err(reason) => {
                tracing::warn!(%reason, "device not activated: DEVICE_NEEDS_RESET");
                self.status |= S_NEEDS_RESET;
                self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG);
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queue_configs.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size)),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            REG_QUEUE_DESC_LOW => queue.map_or(0, |q| q.desc_table as u32),
            REG_QUEUE_DESC_HIGH => queue.map_or(0, |q| (q.desc_table >> 32) as u32),
            REG_QUEUE_DRIVER_LOW => queue.map_or(0, |q| q.avail_ring as u32),
            REG_QUEUE_DRIVER_HIGH => queue.map_or(0, |q| (q.avail_ring >> 32) as u32),
            REG_QUEUE_DEVICE_LOW => queue.map_or(0, |q| q.used_ring as u32),
            REG_QUEUE_DEVICE_HIGH => queue.map_or(0, |q| (q.used_ring >> 32) as u32),
            REG_INTERRUPT_STATUS => self.interrupt_status,
            REG_STATUS => self.status,
            // No shared memory regions: every region reads as length -1 ("does not exist").
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(offset, "read of an unknown virtio-mmio register");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & (S_DRIVER | S_FEATURES_OK | S_FAILED) != S_DRIVER {
                    tracing::warn!(
                        status = self.status,
                        "driver features written in the wrong state"
                    );
                    return;
                }
                let value = u64::from(value);
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value,
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (value << 32),
                    sel => tracing::warn!(sel, "driver features written with a bad selector"),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue_writable() {
                    // Validated at DRIVER_OK: a bad size then means DEVICE_NEEDS_RESET.
                    q.size = value.try_into().unwrap_or(0);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue_writable() {
                    q.ready = value == 1;
                } else if value == 0 {
                    // Disabling an enabled queue is how a driver tears one down; honour it only
                    // while not running (per-queue reset is not offered).
                    if self.status & S_DRIVER_OK == 0 {
                        if let Some(q) = self.selected_queue() {
                            q.ready = false;
                        }
                    }
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue_writable() {
                    let field = match offset {
                        REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => &mut q.desc_table,
                        REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => &mut q.avail_ring,
                        _ => &mut q.used_ring,
                    };
                    let value = u64::from(value);
                    *field = if offset & 0x4 == 0 {
                        (*field & !0xffff_ffff) | value
                    } else {
                        (*field & 0xffff_ffff) | (value << 32)
                    };
                }
            }
            REG_QUEUE_NOTIFY => match u16::try_from(value) {
                Ok(index) => self.notify_queue(index),
                Err(_) => tracing::warn!(value, "QueueNotify with an out-of-range index"),
            },
            REG_INTERRUPT_ACK => self.interrupt_status &= !value,
            REG_STATUS => self.write_status(value),
            REG_SHM_SEL => {}
            _ => tracing::debug!(offset, value, "write to an unknown virtio-mmio register"),
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            data.fill(0);
            if offset < MMIO_WINDOW_SIZE && matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_register(offset).to_le_bytes(),
            _ => {
                tracing::debug!(offset, len = data.len(), "bad virtio-mmio register read");
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let writable = self.status & (S_DRIVER | S_FAILED) == S_DRIVER;
            if offset < MMIO_WINDOW_SIZE && matches!(data.len(), 1 | 2 | 4 | 8) && writable {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(word)),
            _ => tracing::debug!(offset, len = data.len(), "bad virtio-mmio register write"),
        }
    }
}

impl<D: VirtioDevice> Persist for MmioTransport<D> {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs<D>;
    type Error = TransportError;

    fn save(&self) -> MmioTransportState {
        let mut queues = self.queue_configs.clone();
        if self.activated {
            for (cfg, live) in queues.iter_mut().zip(&self.queues) {
                *cfg = QueueConfig::from(live.state());
            }
        }
        MmioTransportState {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            activated: self.activated,
            queues,
        }
    }

    fn restore(
        args: MmioTransportArgs<D>,
        state: &MmioTransportState,
    ) -> Result<Self, Self::Error> {
        let mut transport = MmioTransport::new(args.device, args.mem, args.interrupt)?;
        let actual = transport.device.device_type();
        if state.device_type != actual {
            return Err(TransportError::DeviceTypeMismatch {
                saved: state.device_type,
                actual,
            });
        }
        if state.queues.len() != transport.queue_configs.len() {
            return Err(TransportError::QueueCountMismatch {
                saved: state.queues.len(),
                actual: transport.queue_configs.len(),
            });
        }
        for (index, (saved, ours)) in state
            .queues
            .iter()
            .zip(&transport.queue_configs)
            .enumerate()
        {
            if saved.max_size != ours.max_size {
                return Err(TransportError::InvalidSavedQueue {
                    index,
                    reason: format!(
                        "maximum size {} differs from the device's {}",
                        saved.max_size, ours.max_size
                    ),
                });
            }
        }
        transport.status = state.status;
        transport.acked_features = state.acked_features;
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.queue_sel = state.queue_sel;
        transport.interrupt_status = state.interrupt_status;
        transport.config_generation = state.config_generation;
        transport.queue_configs = state.queues.clone();
        if state.activated {
            let mut queues = transport
                .build_queues()
                .map_err(|reason| TransportError::InvalidSavedQueue { index: 0, reason })?;
            transport
                .device
                .activate(&transport.mem, &mut queues, transport.acked_features)?;
            transport.queues = queues;
            transport.activated = true;
        }
        Ok(transport)
    }
}
