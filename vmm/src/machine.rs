//! The machine a guest runs on, as one value: the KVM VM, guest memory, the devices and the
//! vCPU threads. [`crate::vmm::Vm`] builds it and runs its event loop with it, so the
//! handlers that serve the API ([`crate::api::server`]) pause, resume and snapshot this very
//! machine; the snapshot of it is [`crate::persist`]'s.

use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::VmFd;

use crate::api::RestoreMetrics;
use crate::device_manager::DeviceManager;
use crate::event_loop::Registry;
use crate::memory::GuestMemory;
use crate::vstate::vcpu::first_io::FirstIo;
use crate::vstate::vcpu::threads::{PauseError, VcpuThreads};

/// Everything a running VM's event loop and API work on.
pub struct Machine {
    pub(crate) fd: Arc<VmFd>,
    /// In-kernel LAPIC/IOAPIC/PIC and PIT.
    pub(crate) irqchip: bool,
    pub(crate) memory_mib: u64,
    pub(crate) mem: GuestMemory,
    pub(crate) devices: DeviceManager,
    pub(crate) threads: Arc<VcpuThreads>,
    pub(crate) vcpu_count: usize,
    /// Set on a VM restored from a snapshot.
    pub(crate) restored: Option<Restored>,
}

/// How a restored VM is coming back.
pub(crate) struct Restored {
    /// The instant restore times count from (the VMM process start, or a standby's request).
    pub(crate) since: Instant,
    /// Since `since`, when the vCPUs were about to run (None until the VM runs).
    pub(crate) resumed_us: Option<u64>,
    /// The guest's first I/O after resuming.
    pub(crate) first_io: Arc<FirstIo>,
}

impl Machine {
    /// How the restore went so far (None unless this VM was restored and has run).
    pub fn restore_metrics(&self) -> Option<RestoreMetrics> {
        let restored = self.restored.as_ref()?;
        Some(RestoreMetrics {
            resumed_us: restored.resumed_us?,
            first_io: restored.first_io.get(),
        })
    }

    pub fn is_paused(&self) -> bool {
        self.threads.is_paused()
    }

    /// Stops the vCPUs and silences the device event sources (no guest-visible state moves
    /// until [`Machine::resume`]).
    pub fn pause(&mut self, sources: &mut Registry<'_, Machine>) -> Result<(), PauseError> {
        if self.threads.is_paused() {
            return Ok(());
        }
        for t in &self.devices.sources {
            let _ = sources.pause(*t);
        }
        let r = self.threads.pause(self.vcpu_count);
        if r.is_err() {
            self.resume(sources);
        }
        r
    }

    pub fn resume(&mut self, sources: &mut Registry<'_, Machine>) {
        for t in &self.devices.sources {
            let _ = sources.resume(*t);
        }
        self.threads.resume();
    }
}
