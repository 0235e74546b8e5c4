//! Snapshot capture and restore of a whole VM, in one place: what a paused [`Machine`] is
//! made of (vCPUs, irqchip, PIT, clock, legacy and virtio devices, memory) is written to a
//! snapshot directory ([`crate::snapshot`] holds the file format), and [`Vm::restore`] builds
//! a VM from one, with the same parts in the same places.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::Kvm;

use crate::device_manager::legacy::LegacyState;
use crate::device_manager::DeviceError;
use crate::devices::bus::lock;
use crate::devices::virtio::mmio::{MmioTransport, MmioTransportArgs};
use crate::devices::virtio::{restore_device, VirtioDeviceState};
use crate::devices::{InterruptTrigger, Persist};
use crate::error::{io_err, RestoreError, VmError};
use crate::machine::{Machine, Restored};
use crate::memory::GuestMemory;
use crate::snapshot::{self, Loaded, SnapshotError, VirtioSlotState, VmState};
use crate::vmm::{validate_vcpus, Start, Vm, VmConfig};
use crate::vstate::vcpu::first_io::FirstIo;
use crate::vstate::vcpu::threads::PauseError;
use crate::vstate::vm::{ChipState, KvmVm, KvmVmError};

/// Why a paused VM could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The vCPUs could not save their state.
    #[error(transparent)]
    Vcpus(#[from] PauseError),
    /// The irqchip, PIT or clock state could not be read.
    #[error(transparent)]
    Chips(#[from] KvmVmError),
    /// /dev/kvm could not be opened to describe this host in the header.
    #[error("/dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// The snapshot directory could not be written.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl Machine {
    /// Saves the paused VM into `dir` (which must not exist).
    pub fn capture(&self, dir: &Path) -> Result<(), CaptureError> {
        let vcpus = self.threads.save_all()?;
        let chips = ChipState::save(&self.fd, self.irqchip)?;
        let mut virtio = Vec::new();
        let mut writable = Vec::new();
        for (i, slot) in self.devices.virtio.iter().enumerate() {
            let t = lock(&slot.transport);
            let device = t.device().device_state();
            if let VirtioDeviceState::Block(b) = &device {
                if !b.read_only {
                    // Its open file (a duplicate): the confined VMM may not reopen the path.
                    let file = t.device().disk_file().map(std::fs::File::try_clone);
                    let file = file.transpose().map_err(|e| SnapshotError::Io {
                        path: b.path.clone(),
                        source: e,
                    })?;
                    writable.push(snapshot::WritableDisk {
                        index: i,
                        path: b.path.clone(),
                        file,
                    });
                }
            }
            virtio.push(VirtioSlotState {
                base: slot.base,
                irq: slot.irq,
                transport: t.save(),
                device,
                disk_copy: None,
            });
        }
        let state = VmState {
            memory_mib: self.memory_mib,
            regions: snapshot::memory::layout(&self.mem),
            irqchip: self.irqchip,
            vcpus,
            pic_master: chips.pic_master,
            pic_slave: chips.pic_slave,
            ioapic: chips.ioapic,
            pit: chips.pit,
            clock: chips.clock,
            serial: lock(&self.devices.serial).save(),
            i8042: lock(&self.devices.i8042).save(),
            virtio,
        };
        let host = snapshot::this_host()?;
        Ok(snapshot::write(dir, host, state, &self.mem, &writable)?)
    }
}

/// How to bring a snapshot back (see [`Vm::restore`]).
pub struct RestoreConfig {
    /// The snapshot directory.
    pub dir: PathBuf,
    pub console: Box<dyn Write + Send>,
    pub console_input: Option<RawFd>,
    /// Replacement backing files by virtio slot index (disks) — every writable disk needs one:
    /// each restored instance writes to its own copy of the snapshot's `disk-N.img`.
    pub disks: HashMap<usize, PathBuf>,
    /// A new Unix socket path for the vsock device (the saved one belongs to the original VM).
    pub vsock: Option<PathBuf>,
    /// The passt socket for the network device (each restored VM needs its own passt; the
    /// saved path is the original VM's).
    pub net: Option<PathBuf>,
    /// The instant restore metrics are measured from (the VMM process start).
    pub since: Instant,
}

impl Vm {
    /// Rebuilds a VM from a snapshot directory: memory mapped privately from its memory file,
    /// vCPU, irqchip, PIT and clock state, the legacy devices and every virtio device (on
    /// their saved windows and IRQs). [`Vm::run`] then continues the guest where it stopped.
    pub fn restore(config: RestoreConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let here = snapshot::host_identity(&kvm)?;
        let loaded = snapshot::load(&config.dir, &here)?;
        let vcpus = snapshot_vcpus(&loaded.state)?;
        let mem = snapshot::memory::map_private(&loaded.memory_path(), &loaded.state.regions)
            .map_err(io_err("mapping the snapshot memory file"))?;
        let kvm_vm = KvmVm::create(kvm, &mem, loaded.state.irqchip, vcpus)?;
        Self::finish_restore(kvm_vm, mem, None, &loaded, config)
    }

    /// The rest of a restore once the KVM VM exists and `mem` holds the snapshot's memory:
    /// devices, vCPU and irqchip state. `backing` is a standby VM's own RAM mapping that
    /// `mem` overlays (kept until the Vm is dropped).
    pub(crate) fn finish_restore(
        kvm_vm: KvmVm,
        mem: GuestMemory,
        backing: Option<GuestMemory>,
        loaded: &Loaded,
        config: RestoreConfig,
    ) -> Result<Self, VmError> {
        let state = &loaded.state;
        let vm_config = VmConfig {
            memory_mib: state.memory_mib,
            vcpus: kvm_vm.vcpus.len() as u8,
            console: config.console,
            console_input: config.console_input,
            irqchip: state.irqchip,
        };
        let legacy = LegacyState {
            serial: &state.serial,
            i8042: &state.i8042,
        };
        let mut vm = Self::build_with(kvm_vm, vm_config, mem, Some(legacy))?;
        vm.backing = backing;
        let backing = virtio_backing(
            state,
            &config.dir,
            &config.disks,
            config.vsock.as_ref(),
            config.net.as_ref(),
        )?;
        for ((index, slot), path) in state.virtio.iter().enumerate().zip(backing) {
            vm.restore_virtio_slot(index, slot, path)?;
        }
        for (vcpu, saved) in vm.vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(saved, state.irqchip)?;
        }
        let chips = ChipState {
            pic_master: state.pic_master,
            pic_slave: state.pic_slave,
            ioapic: state.ioapic,
            pit: state.pit,
            clock: state.clock,
        };
        chips.restore(&vm.machine.fd, state.irqchip)?;
        // Requests the guest queued just before the snapshot never reached the old process's
        // device (its queue notification was pending): look at every queue once. A restored
        // vsock posts its TRANSPORT_RESET event here too.
        for slot in &vm.machine.devices.virtio {
            let mut t = lock(&slot.transport);
            if t.is_running() {
                for q in 0..t.device().queue_max_sizes().len() as u16 {
                    t.notify_queue(q);
                }
                t.process_host_events();
            }
        }
        vm.machine.restored = Some(Restored {
            since: config.since,
            resumed_us: None,
            first_io: Arc::new(FirstIo::new(config.since)),
        });
        vm.start = Some(Start::Restore);
        Ok(vm)
    }

    /// Puts a saved virtio device back on its saved window and IRQ, which must be where the
    /// device manager's layout puts the `index`th device.
    fn restore_virtio_slot(
        &mut self,
        index: usize,
        slot: &VirtioSlotState,
        path: Option<PathBuf>,
    ) -> Result<(), VmError> {
        let m = &mut self.machine;
        let free = m.devices.next_virtio_slot(&m.fd, m.irqchip)?;
        if (free.base, free.irq) != (slot.base, slot.irq) {
            return Err(RestoreError::VirtioPlacement {
                index,
                saved_base: slot.base,
                saved_irq: slot.irq,
                base: free.base,
                irq: free.irq,
            }
            .into());
        }
        let device = restore_device(&slot.device, path).map_err(DeviceError::from)?;
        let transport = MmioTransport::restore(
            MmioTransportArgs {
                device,
                mem: m.mem.clone(),
                interrupt: free.interrupt as Arc<dyn InterruptTrigger>,
            },
            &slot.transport,
        )
        .map_err(|source| DeviceError::RestoreTransport { index, source })?;
        m.devices
            .attach_transport(&m.fd, &mut self.event_loop, transport, free.base, free.irq)?;
        Ok(())
    }
}

/// What each of the snapshot's virtio devices runs on in the restored VM: the given disk
/// backing file by slot index (a read-only disk may keep its saved path), the vsock's new
/// socket path, the network device's passt socket. A writable disk without its own copy is an
/// error.
pub(crate) fn virtio_backing(
    state: &VmState,
    dir: &Path,
    disks: &HashMap<usize, PathBuf>,
    vsock: Option<&PathBuf>,
    net: Option<&PathBuf>,
) -> Result<Vec<Option<PathBuf>>, RestoreError> {
    let mut out = Vec::with_capacity(state.virtio.len());
    for (index, slot) in state.virtio.iter().enumerate() {
        out.push(match &slot.device {
            VirtioDeviceState::Block(b) => match disks.get(&index) {
                Some(p) => Some(p.clone()),
                None if b.read_only => None,
                None => {
                    return Err(RestoreError::WritableDiskWithoutCopy {
                        index,
                        copy: dir.join(slot.disk_copy.as_deref().unwrap_or("disk-N.img")),
                    })
                }
            },
            VirtioDeviceState::Vsock(_) => vsock.cloned(),
            VirtioDeviceState::Net(_) => net.cloned(),
        });
    }
    Ok(out)
}

/// The snapshot's vCPU count, checked against this host.
fn snapshot_vcpus(state: &VmState) -> Result<u8, VmError> {
    let vcpus = u8::try_from(state.vcpus.len()).map_err(|_| RestoreError::TooManyVcpus)?;
    validate_vcpus(vcpus)?;
    Ok(vcpus)
}
