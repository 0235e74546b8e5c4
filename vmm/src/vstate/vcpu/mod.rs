//! One vCPU: the KVM vCPU fd and its boot configuration. The rest of a vCPU's life sits
//! beside it, one concern per file: the `KVM_RUN` loop and its exits ([`run`]), the kick that
//! interrupts `KVM_RUN` ([`kick`]), the pause/park/stop book of a VM's vCPU threads
//! ([`threads`]), snapshot state ([`state`]) and the first-I/O probe of a restored VM
//! ([`first_io`]).

pub mod first_io;
pub mod kick;
pub mod run;
pub mod state;
pub mod threads;

use kvm_bindings::{kvm_mp_state, CpuId, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::memory::GuestMemory;

/// Why a vCPU could not be configured, saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// KVM refused one of the MSRs a guest expects at boot.
    #[error("vCPU {id}: KVM accepted only {set} of {total} boot MSRs (first refused: {first:#x})")]
    Msrs {
        id: u8,
        set: usize,
        total: usize,
        first: u32,
    },
    /// The boot registers could not be set up for the entry mode.
    #[error("vCPU {id}: {source}")]
    Regs { id: u8, source: regs::RegsError },
    /// KVM refused one of the MSRs of a saved state.
    #[error("vCPU {id}: KVM refused saved MSR {index:#x} ({set} of {total} restored)")]
    RestoreMsrs {
        id: u8,
        index: u32,
        set: usize,
        total: usize,
    },
    /// A saved state cannot be put back as it is.
    #[error("vCPU {id}: saved state is invalid: {what}")]
    InvalidState { id: u8, what: String },
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd) -> Self {
        Self { id, fd }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// CPUID, boot MSRs, FPU and (with an irqchip) LAPIC virtual-wire set-up for any vCPU.
    pub fn configure_common(
        &self,
        supported_cpuid: &CpuId,
        vcpu_count: u8,
        irqchip: bool,
    ) -> Result<(), VcpuError> {
        let cpuid = cpuid::vcpu_cpuid(supported_cpuid, self.id, vcpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm("KVM_SET_CPUID2"))?;
        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
        let total = msrs.as_slice().len();
        if set != total {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                total,
                first: msrs.as_slice()[set].index,
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.kvm("KVM_SET_FPU"))?;
        if irqchip {
            let mut lapic = self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?;
            interrupts::set_lint(&mut lapic);
            self.fd
                .set_lapic(&lapic)
                .map_err(self.kvm("KVM_SET_LAPIC"))?;
        }
        Ok(())
    }

    /// Registers for entering the guest at `entry`.
    pub fn configure_entry(
        &self,
        mem: &GuestMemory,
        entry: &regs::BootEntry,
    ) -> Result<(), VcpuError> {
        let regs_err = |source| VcpuError::Regs {
            id: self.id,
            source,
        };
        let mut sregs = self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?;
        regs::setup_sregs(mem, entry.mode, &mut sregs).map_err(regs_err)?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.kvm("KVM_SET_SREGS"))?;
        let r = regs::boot_regs(entry).map_err(regs_err)?;
        self.fd.set_regs(&r).map_err(self.kvm("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Makes a secondary vCPU start at its registers right away instead of waiting for the
    /// boot vCPU's INIT/SIPI (used by guests that are not an OS, e.g. tests).
    pub fn make_runnable(&self) -> Result<(), VcpuError> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.kvm("KVM_SET_MP_STATE"))
    }
}
