//! The KVM VM: created with guest memory registered, TSS, in-kernel irqchip and PIT, and its
//! vCPUs; and the VM-wide KVM state a snapshot holds besides the vCPUs (irqchip, PIT, clock).

use std::io;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::vcpu::Vcpu;
use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::memory::GuestMemory;

/// Why the KVM VM could not be created, or its state not be read or put back.
#[derive(Debug, thiserror::Error)]
pub enum KvmVmError {
    /// A KVM VM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// A guest memory region has no host mapping to register.
    #[error("guest memory host address: {0}")]
    HostAddress(io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmVmError {
    move |source| KvmVmError::Kvm { what, source }
}

/// The host-kernel half of a VM: the KVM VM with guest memory registered, TSS, in-kernel
/// irqchip and PIT, and its vCPUs. It holds every step of a VM set-up that can wait on the
/// host kernel, which is why a standby VMM ([`crate::standby`]) creates it ahead of demand.
pub(crate) struct KvmVm {
    pub(crate) kvm: Kvm,
    pub(crate) fd: VmFd,
    pub(crate) vcpus: Vec<Vcpu>,
}

impl KvmVm {
    /// Creates the VM for guest RAM `mem` (which must outlive it) with `vcpus` vCPUs.
    pub(crate) fn create(
        kvm: Kvm,
        mem: &GuestMemory,
        irqchip: bool,
        vcpus: u8,
    ) -> Result<Self, KvmVmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Memory slots go in first, before anything else touches the VM's SRCU: each slot
        // change waits for an SRCU grace period, which is immediate on a fresh VM but, once
        // KVM_CREATE_IRQCHIP has queued its own (non-expedited, one-jiffy-delayed) grace
        // period, waits for that one too: 4-8 ms at HZ=250, measured. The TSS address (a
        // private memory slot on VMX) likewise.
        register_memory(&fd, mem)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        let mut vcpu_list = Vec::with_capacity(vcpus as usize);
        for id in 0..vcpus {
            let vcpu_fd = fd
                .create_vcpu(id as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu_list.push(Vcpu::new(id, vcpu_fd));
        }
        Ok(Self {
            kvm,
            fd,
            vcpus: vcpu_list,
        })
    }
}

/// Registers every guest memory region as a KVM memory slot.
fn register_memory(fd: &VmFd, mem: &GuestMemory) -> Result<(), KvmVmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|e| KvmVmError::HostAddress(io::Error::other(e.to_string())))?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps for as long as
        // the VM (and so the memory slot) exists.
        unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// The VM-wide KVM state of a paused VM: the in-kernel irqchip (both PICs and the IOAPIC)
/// and PIT, absent without an irqchip, and the kvmclock where KVM reports it.
pub struct ChipState {
    pub pic_master: Option<kvm_irqchip>,
    pub pic_slave: Option<kvm_irqchip>,
    pub ioapic: Option<kvm_irqchip>,
    pub pit: Option<kvm_pit_state2>,
    pub clock: Option<kvm_clock_data>,
}

impl ChipState {
    /// Reads the state of a paused VM.
    pub fn save(fd: &VmFd, irqchip: bool) -> Result<Self, KvmVmError> {
        let chip = |chip_id: u32| -> Result<Option<kvm_irqchip>, KvmVmError> {
            if !irqchip {
                return Ok(None);
            }
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c).map_err(kvm_err(match chip_id {
                KVM_IRQCHIP_PIC_MASTER => "KVM_GET_IRQCHIP(PIC master)",
                KVM_IRQCHIP_PIC_SLAVE => "KVM_GET_IRQCHIP(PIC slave)",
                _ => "KVM_GET_IRQCHIP(IOAPIC)",
            }))?;
            Ok(Some(c))
        };
        Ok(Self {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: if irqchip {
                Some(fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?)
            } else {
                None
            },
            clock: fd.get_clock().ok(),
        })
    }

    /// Puts the state back into a fresh VM (irqchip and PIT only where the VM has them).
    pub fn restore(&self, fd: &VmFd, irqchip: bool) -> Result<(), KvmVmError> {
        if irqchip {
            for chip in [&self.pic_master, &self.pic_slave, &self.ioapic]
                .into_iter()
                .flatten()
            {
                fd.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
            }
            if let Some(pit) = &self.pit {
                fd.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?;
            }
        }
        if let Some(clock) = &self.clock {
            // Continue the guest clock from its saved value (no REALTIME catch-up: the agent
            // steps guest time itself after a restore).
            let mut clock = *clock;
            clock.flags = 0;
            fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }
}
