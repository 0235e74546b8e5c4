//! virtio 1.x devices over the virtio-mmio transport.
//!
//! The split is the one the spec draws: [`mmio::MmioTransport`] owns everything the driver
//! configures through registers (status, features, queue addresses, interrupt status) and the
//! virtqueues themselves; a [`VirtioDevice`] only knows its own config space and what to do
//! with the buffers on its queues. The transport hands the device its queues on every
//! notification, so a device never keeps a second copy of queue state and save/restore stays
//! in one place.

pub mod block;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::memory::GuestMemory;

pub use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Feature bit of VIRTIO_F_VERSION_1 as a mask: every device offers it and every driver must
/// accept it (this transport is modern-only).
pub const FEATURE_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

/// Why a device refused to start with the queues the driver configured.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport has a different number of queues than the device expects.
    #[error("device expects {expected} queues, the transport has {actual}")]
    QueueCount { expected: usize, actual: usize },
    /// The device failed to start.
    #[error("device activation failed: {0}")]
    Device(String),
}

/// The device side of a virtio device: what is specific to a block disk, a vsock, ...
///
/// All methods are called with the transport's lock held, from a vCPU thread (MMIO exit) or the
/// VMM event loop. Everything read from guest memory is hostile; methods must never panic on it.
pub trait VirtioDevice: Send {
    /// The virtio device ID (e.g. 2 for block, 19 for vsock).
    fn device_type(&self) -> u32;

    /// The feature bits the device offers. Must include [`FEATURE_VERSION_1`].
    fn features(&self) -> u64;

    /// Maximum size of each queue (powers of two); its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Reads `data.len()` bytes of the device config space at `offset`; bytes past its end read
    /// as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes to the device config space; most devices ignore this.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts the device with the negotiated features and valid, ready queues. Also called after
    /// a restore of an active device.
    fn activate(
        &mut self,
        mem: &GuestMemory,
        queues: &mut [Queue],
        acked_features: u64,
    ) -> Result<(), ActivateError>;

    /// Processes what the driver made available on queue `index`. Returns true if buffers were
    /// put on a used ring, i.e. the guest should be interrupted.
    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: u16) -> bool;

    /// A file descriptor the VMM event loop should watch for readability on behalf of this
    /// device (host-side sockets, timers). `None` for devices driven only by the guest.
    fn host_event_fd(&self) -> Option<RawFd> {
        None
    }

    /// Handles whatever made [`VirtioDevice::host_event_fd`] readable. Returns true if buffers
    /// were put on a used ring.
    fn process_host_events(&mut self, _mem: &GuestMemory, _queues: &mut [Queue]) -> bool {
        false
    }

    /// Returns the device to its initial state (driver wrote 0 to Status). Queues are reset by
    /// the transport.
    fn reset(&mut self);

    /// The file behind a disk device, already open: a snapshot copies a writable disk from it
    /// (the confined VMM may no longer be able to open the path). None for other devices.
    fn disk_file(&self) -> Option<&std::fs::File> {
        None
    }

    /// The device's saved state, tagged with its kind, so a snapshot can save a
    /// `Box<dyn VirtioDevice>` without knowing its type (see [`restore_device`]).
    fn device_state(&self) -> VirtioDeviceState;
}

/// Saved state of any virtio device model, for snapshots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    Block(block::BlockState),
    Vsock(vsock::persist::VsockState),
    Net(net::persist::NetState),
}

/// Why a device could not be rebuilt from a [`VirtioDeviceState`].
#[derive(Debug, thiserror::Error)]
pub enum DeviceRestoreError {
    /// The virtio-blk device could not be restored.
    #[error("restoring virtio-blk: {0}")]
    Block(#[from] block::BlockError),
    /// The virtio-vsock device could not be restored.
    #[error("restoring virtio-vsock: {0}")]
    Vsock(#[from] vsock::VsockError),
    /// The virtio-net device could not be restored.
    #[error("restoring virtio-net: {0}")]
    Net(#[from] net::NetError),
}

/// Rebuilds a device model from its saved state. `path` replaces the saved host path if given:
/// the backing file of a disk, the Unix listener of a vsock, the passt socket of a network
/// device.
pub fn restore_device(
    state: &VirtioDeviceState,
    path: Option<std::path::PathBuf>,
) -> Result<Box<dyn VirtioDevice>, DeviceRestoreError> {
    use crate::devices::Persist;
    Ok(match state {
        VirtioDeviceState::Block(s) => {
            Box::new(block::Block::restore(block::BlockRestoreArgs { path }, s)?)
        }
        VirtioDeviceState::Vsock(s) => Box::new(vsock::Vsock::restore(
            vsock::persist::VsockRestoreArgs { uds_path: path },
            s,
        )?),
        VirtioDeviceState::Net(s) => Box::new(net::Net::restore(
            net::persist::NetRestoreArgs { socket_path: path },
            s,
        )?),
    })
}

impl<D: VirtioDevice + ?Sized> VirtioDevice for Box<D> {
    fn device_type(&self) -> u32 {
        (**self).device_type()
    }
    fn features(&self) -> u64 {
        (**self).features()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        (**self).queue_max_sizes()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        (**self).read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        (**self).write_config(offset, data)
    }
    fn activate(
        &mut self,
        mem: &GuestMemory,
        queues: &mut [Queue],
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        (**self).activate(mem, queues, acked_features)
    }
    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: u16) -> bool {
        (**self).process_queue(mem, queues, index)
    }
    fn host_event_fd(&self) -> Option<RawFd> {
        (**self).host_event_fd()
    }
    fn process_host_events(&mut self, mem: &GuestMemory, queues: &mut [Queue]) -> bool {
        (**self).process_host_events(mem, queues)
    }
    fn reset(&mut self) {
        (**self).reset()
    }
    fn device_state(&self) -> VirtioDeviceState {
        (**self).device_state()
    }
}

/// Serialisable mirror of virtio-queue's [`QueueState`] (which has no serde support).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl QueueConfig {
    pub(crate) fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

impl From<QueueState> for QueueConfig {
    fn from(s: QueueState) -> Self {
        QueueConfig {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueConfig> for QueueState {
    fn from(c: QueueConfig) -> Self {
        QueueState {
            max_size: c.max_size,
            size: c.size,
            ready: c.ready,
            desc_table: c.desc_table,
            avail_ring: c.avail_ring,
            used_ring: c.used_ring,
            next_avail: c.next_avail,
            next_used: c.next_used,
            event_idx_enabled: c.event_idx_enabled,
        }
    }
}

/// Copies the part of `config` selected by `offset`/`data.len()` into `data`; anything outside
/// `config` reads as zero. Shared by the devices' `read_config`.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
pub(crate) mod test_utils;
