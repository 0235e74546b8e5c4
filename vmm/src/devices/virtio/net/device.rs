//! virtio-net as a virtio device: its queues, config space and activation, the run of both
//! directions after a queue notification or a socket event, and interrupt suppression.
//!
//! Both directions run on every event, tx first (it frees guest memory and may be all a
//! notification is about), then rx. The guest is interrupted only if a used ring changed on
//! a queue whose driver has not asked for quiet (VRING_AVAIL_F_NO_INTERRUPT, which Linux sets
//! while its NAPI poll is draining the queue anyway): under load that saves an interrupt per
//! frame.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{EpollEvent, EventSet};

use super::{Net, FEATURES, QUEUE_SIZE, RX_QUEUE, TOKEN_BACKEND, TX_QUEUE};
use crate::devices::virtio::{read_config_bytes, ActivateError, VirtioDevice, VirtioDeviceState};
use crate::devices::Persist;
use crate::memory::GuestMemory;

impl Net {
    /// Moves frames both ways; returns whether the guest should be interrupted.
    fn run(&mut self, mem: &GuestMemory, queues: &mut [Queue]) -> bool {
        let [rx, tx] = queues else {
            return false;
        };
        let tx_used = self.process_tx(mem, tx);
        let rx_used = self.process_rx(mem, rx);
        // Both flag reads must see the driver's latest word after our used-index stores.
        fence(Ordering::SeqCst);
        (tx_used && wants_interrupt(mem, tx)) || (rx_used && wants_interrupt(mem, rx))
    }

    /// Notes what the backend socket's edges say: readable, writable, or gone (a hang-up or
    /// error makes both true, so the next read or write finds out and closes it).
    fn handle_epoll_events(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(error = %e, "virtio-net: epoll_wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let Some(backend) = self.backend.as_mut() else {
                    continue;
                };
                if ev.data() != TOKEN_BACKEND {
                    continue;
                }
                let set = ev.event_set();
                let gone = EventSet::HANG_UP | EventSet::ERROR;
                if set.intersects(EventSet::IN | EventSet::READ_HANG_UP | gone) {
                    backend.readable = true;
                }
                if set.intersects(EventSet::OUT | gone) {
                    backend.writable = true;
                }
            }
            if n < events.len() {
                return;
            }
        }
    }
}

/// Whether the driver wants an interrupt for `queue` (it has not set
/// VRING_AVAIL_F_NO_INTERRUPT). Without EVENT_IDX this flag is the driver's only say.
fn wants_interrupt(mem: &GuestMemory, queue: &Queue) -> bool {
    match mem.load::<u16>(GuestAddress(queue.avail_ring()), Ordering::Acquire) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(
        &mut self,
        mem: &GuestMemory,
        queues: &mut [Queue],
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::QueueCount {
                expected: 2,
                actual: queues.len(),
            });
        }
        // Rx buffers a restored device kept from its snapshot must still be guest memory.
        if let Some(bad) = self.rx_chains.iter().find(|c| !c.is_inside(mem)) {
            return Err(ActivateError::Device(
                super::NetError::SavedBuffer { head: bad.head }.to_string(),
            ));
        }
        self.acked_features = acked_features;
        self.activated = true;
        Ok(())
    }

    fn process_queue(&mut self, mem: &GuestMemory, queues: &mut [Queue], index: u16) -> bool {
        match usize::from(index) {
            RX_QUEUE | TX_QUEUE => self.run(mem, queues),
            _ => false,
        }
    }

    fn host_event_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_host_events(&mut self, mem: &GuestMemory, queues: &mut [Queue]) -> bool {
        self.handle_epoll_events();
        if !self.activated {
            // Frames wait in the socket until the driver is up.
            return false;
        }
        self.run(mem, queues)
    }

    fn reset(&mut self) {
        // The backend and its buffers stay: they are host state, and a frame half read or
        // half written must be finished for the stream to stay in step.
        self.rx_chains.clear();
        self.handshakes.clear();
        self.activated = false;
        self.acked_features = 0;
    }

    fn device_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.save())
    }
}
