//! The vsock as a virtio device: its queues, config space and activation, the run of both
//! queues after a notification or a host event, and the reset.

use std::os::fd::{AsRawFd, RawFd};

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent};

use super::connection::ConnKey;
use super::packet::*;
use super::rx::write_chain;
use super::{Vsock, EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, VirtioDevice, VirtioDeviceState, FEATURE_VERSION_1,
};
use crate::devices::Persist;
use crate::memory::GuestMemory;

impl Vsock {
    /// Everything that may move data: tx packets (bounded by the op backlog), rx buffers.
    fn run(&mut self, mem: &GuestMemory, queues: &mut [Queue]) -> bool {
        let [rx, tx, event] = queues else {
            return false;
        };
        let mut used = false;
        if self.transport_reset_pending {
            if let Some(chain) = event.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = write_chain(mem, chain, &[&EVENT_TRANSPORT_RESET.to_le_bytes()]);
                if event.add_used(mem, head, len).is_ok() {
                    used = true;
                }
                self.transport_reset_pending = false;
            }
        }
        // Replies need rx buffers; alternate until neither side makes progress.
        for _ in 0..4 {
            let tx_used = self.process_tx(mem, tx);
            let rx_used = self.fill_rx(mem, rx);
            used |= tx_used | rx_used;
            if !tx_used {
                break;
            }
        }
        used
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        FEATURE_VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        _mem: &GuestMemory,
        queues: &mut [Queue],
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 3 {
            return Err(ActivateError::QueueCount {
                expected: 3,
                actual: queues.len(),
            });
        }
        self.acked_features = acked_features;
        self.activated = true;
        Ok(())
    }

    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: u16) -> bool {
        match usize::from(index) {
            RX_QUEUE | TX_QUEUE | EVENT_QUEUE => self.run(mem, queues),
            _ => false,
        }
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self, mem: &GuestMemory, queues: &mut [Queue]) -> bool {
        self.handle_epoll_events();
        if !self.activated {
            return false;
        }
        self.run(mem, queues)
    }

    fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove_conn(key);
        }
        for (token, p) in self.pending.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.tokens.remove(&token);
        }
        self.queued_ops.clear();
        self.activated = false;
        self.acked_features = 0;
        self.transport_reset_pending = false;
    }

    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Vsock(self.save())
    }
}
