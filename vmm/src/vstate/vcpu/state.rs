//! A vCPU's architectural state as plain data, and its capture and restore through KVM: the
//! vCPU part of a snapshot ([`crate::persist`] saves and restores the whole VM).

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use serde::{Deserialize, Serialize};

use super::{Vcpu, VcpuError};
use crate::arch::x86_64::msr;
use crate::snapshot::kvm_hex;

/// A vCPU's architectural state as plain data (for snapshots).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    #[serde(with = "kvm_hex")]
    pub regs: kvm_regs,
    #[serde(with = "kvm_hex")]
    pub sregs: kvm_sregs,
    /// Legacy FPU/SSE state (KVM_GET_FPU) as raw bytes of `kvm_fpu`; `xsave` supersedes it
    /// and is restored after it.
    #[serde(default, with = "kvm_hex::bytes")]
    pub fpu: Vec<u8>,
    /// FPU/SSE/AVX state (XSAVE area; a superset of KVM_GET_FPU).
    #[serde(with = "kvm_hex")]
    pub xsave: kvm_xsave,
    #[serde(default, with = "kvm_hex::option")]
    pub xcrs: Option<kvm_xcrs>,
    #[serde(default, with = "kvm_hex::option")]
    pub debug_regs: Option<kvm_debugregs>,
    #[serde(with = "kvm_hex")]
    pub lapic: kvm_lapic_state,
    #[serde(with = "kvm_hex")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "kvm_hex")]
    pub vcpu_events: kvm_vcpu_events,
    /// `(index, value)` of every MSR KVM lists (KVM_GET_MSR_INDEX_LIST) that it would read
    /// for this vCPU, TSC and kvm-clock included.
    pub msrs: Vec<(u32, u64)>,
    /// The CPUID the vCPU ran with (KVM_GET_CPUID2).
    #[serde(default, with = "kvm_hex::vec")]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency, where KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// The MSRs KVM lists as saveable (KVM_GET_MSR_INDEX_LIST), read once per process (it opens
/// /dev/kvm: a confined VMM reads it before its vCPU threads are confined, see
/// [`crate::vmm::Vm::run`]).
pub(crate) fn msr_index_list() -> &'static [u32] {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    LIST.get_or_init(|| {
        kvm_ioctls::Kvm::new()
            .and_then(|k| k.get_msr_index_list())
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_else(|_| msr::boot_msr_values().into_iter().map(|(i, _)| i).collect())
    })
}

/// x2APIC MSRs live in the LAPIC state; TSC_DEADLINE must follow TSC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

impl Vcpu {
    /// Reads every listed MSR KVM will read for this vCPU: a batch read stops at the first
    /// MSR it refuses (e.g. one the guest's CPUID does not offer), which is dropped.
    fn read_msrs(&self) -> Result<Vec<(u32, u64)>, VcpuError> {
        let mut pending: Vec<u32> = msr_index_list().to_vec();
        let mut out = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let chunk: Vec<kvm_msr_entry> = pending
                .iter()
                .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&chunk).map_err(|_| VcpuError::InvalidState {
                id: self.id,
                what: "MSR list too long".into(),
            })?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.kvm("KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // Skip the refused one (if any) and go on after it.
            let skip = if n < chunk.len() { n + 1 } else { n };
            pending.drain(..skip);
        }
        // TSC first, TSC_DEADLINE last: KVM interprets the deadline against the TSC.
        out.sort_by_key(|&(i, _)| match i {
            msr::MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        Ok(out)
    }

    /// Captures the vCPU's state. The vCPU must not be running (and any port/MMIO exit must
    /// have been completed by re-entering KVM_RUN, as the pause does).
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let fpu = self.fd.get_fpu().map_err(self.kvm("KVM_GET_FPU"))?;
        // SAFETY: kvm_fpu is plain old data; the slice covers exactly its bytes.
        let fpu_bytes = unsafe {
            std::slice::from_raw_parts(
                &fpu as *const kvm_fpu as *const u8,
                std::mem::size_of::<kvm_fpu>(),
            )
        }
        .to_vec();
        Ok(VcpuState {
            id: self.id,
            regs: self.fd.get_regs().map_err(self.kvm("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?,
            fpu: fpu_bytes,
            xsave: self.fd.get_xsave().map_err(self.kvm("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().ok().filter(holds_xcrs),
            debug_regs: self.fd.get_debug_regs().ok(),
            lapic: self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.kvm("KVM_GET_MP_STATE"))?,
            vcpu_events: self
                .fd
                .get_vcpu_events()
                .map_err(self.kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs: self.read_msrs()?,
            cpuid: self
                .fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(self.kvm("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Puts a saved state back, in the order KVM needs: CPUID, special registers before
    /// general ones, FPU then XSAVE, XCRs, debug registers, LAPIC, MSRs (TSC first), pending
    /// events, then the MP state.
    pub fn restore_state(&self, state: &VcpuState, irqchip: bool) -> Result<(), VcpuError> {
        let invalid = |what: &str| VcpuError::InvalidState {
            id: self.id,
            what: what.into(),
        };
        if state.id != self.id {
            return Err(invalid("state belongs to another vCPU"));
        }
        if !state.cpuid.is_empty() {
            let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| invalid("CPUID too long"))?;
            self.fd
                .set_cpuid2(&cpuid)
                .map_err(self.kvm("KVM_SET_CPUID2"))?;
        }
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.fd
                    .set_tsc_khz(khz)
                    .map_err(self.kvm("KVM_SET_TSC_KHZ (the host TSC frequency differs)"))?;
            }
        }
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.kvm("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.kvm("KVM_SET_REGS"))?;
        if state.fpu.len() == std::mem::size_of::<kvm_fpu>() {
            // SAFETY: kvm_fpu is plain old data and the byte count matches exactly.
            let fpu: kvm_fpu = unsafe { std::ptr::read_unaligned(state.fpu.as_ptr().cast()) };
            self.fd.set_fpu(&fpu).map_err(self.kvm("KVM_SET_FPU"))?;
        } else if !state.fpu.is_empty() {
            return Err(invalid("FPU state has the wrong size"));
        }
        // SAFETY: the XSAVE area came from KVM_GET_XSAVE of the same CPU model (the snapshot
        // header's host check) and is as large as the kernel's copy.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.kvm("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = state.xcrs.as_ref().filter(|x| holds_xcrs(x)) {
            self.fd.set_xcrs(xcrs).map_err(self.kvm("KVM_SET_XCRS"))?;
        }
        if let Some(debug) = &state.debug_regs {
            self.fd
                .set_debug_regs(debug)
                .map_err(self.kvm("KVM_SET_DEBUGREGS"))?;
        }
        if irqchip {
            self.fd
                .set_lapic(&state.lapic)
                .map_err(self.kvm("KVM_SET_LAPIC"))?;
        }
        for chunk in state.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| invalid("MSR list too long"))?;
            let set = self.fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
            if set != entries.len() {
                return Err(VcpuError::RestoreMsrs {
                    id: self.id,
                    index: entries[set].index,
                    set,
                    total: entries.len(),
                });
            }
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(self.kvm("KVM_SET_VCPU_EVENTS"))?;
        if irqchip {
            self.fd
                .set_mp_state(state.mp_state)
                .map_err(self.kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }
}

/// Whether KVM_GET_XCRS gave any register. On a host CPU without XSAVE it succeeds with none,
/// and KVM_SET_XCRS then refuses even that empty list (EINVAL): such a vCPU has no XCRs to
/// save or restore.
fn holds_xcrs(xcrs: &kvm_xcrs) -> bool {
    xcrs.nr_xcrs > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_xcr_list_from_a_cpu_without_xsave_is_neither_saved_nor_restored() {
        let mut xcrs = kvm_xcrs::default();
        assert!(!holds_xcrs(&xcrs), "KVM_SET_XCRS would fail with EINVAL");
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].value = 0x7; // XCR0: x87, SSE, AVX
        assert!(holds_xcrs(&xcrs));
    }
}
