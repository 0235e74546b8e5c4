//! Per-vCPU CPUID: what KVM supports on this host, with the topology (APIC IDs, logical CPU
//! counts, cache sharing, extended topology leaves) describing this VM's vCPUs, and the
//! hypervisor bit set. KVM's own signature leaves (0x4000_0000 and up) are kept as KVM
//! reports them so the guest finds kvm-clock and the other paravirtual features.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXTENDED_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXTENDED_TOPOLOGY: u32 = 0x1f;

const LEAF_AMD_ADDRESS_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_EXTENDED_APIC_ID: u32 = 0x8000_001e;
/// "Auth" of "AuthenticAMD" in leaf 0 EBX.
const AMD_VENDOR_EBX: u32 = 0x6874_7541;

const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Number of bits the APIC ID needs for `n` logical CPUs.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// AMD describes cores in extended leaves too; Intel keeps those registers reserved.
fn adjust_amd_entry(entry: &mut kvm_cpuid_entry2, vcpu_id: u32, vcpu_count: u32) {
    match entry.function {
        LEAF_AMD_ADDRESS_SIZES => {
            // ECX[15:12] APIC ID bits for cores, [7:0] cores per package - 1.
            entry.ecx = (bits_for(vcpu_count) << 12) | ((vcpu_count - 1) & 0xff);
        }
        LEAF_AMD_EXTENDED_APIC_ID => {
            entry.eax = vcpu_id;
            entry.ebx = vcpu_id & 0xff; // compute unit ID; one thread per unit
            entry.ecx = 0; // node 0, one node per package
        }
        _ => {}
    }
}

fn adjust_entry(entry: &mut kvm_cpuid_entry2, vcpu_id: u32, vcpu_count: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC ID, [23:16] logical processors per package,
            // [15:8] CLFLUSH line size in 8-byte units.
            entry.ebx = (vcpu_id << 24) | ((vcpu_count & 0xff) << 16) | (8 << 8);
            entry.ecx |= ECX_HYPERVISOR;
            if vcpu_count > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // One thread per core, all vCPUs are cores of one package; the last-level cache
            // (level 3, or level 2 if there is no L3) is shared by all of them.
            let level = (entry.eax >> 5) & 0x7;
            if entry.eax & 0x1f != 0 {
                let sharing = if level >= 3 { vcpu_count - 1 } else { 0 };
                entry.eax &= 0x3fff;
                entry.eax |= (sharing & 0xfff) << 14;
                entry.eax |= ((vcpu_count - 1) & 0x3f) << 26;
            }
        }
        LEAF_EXTENDED_TOPOLOGY | LEAF_V2_EXTENDED_TOPOLOGY => {
            entry.edx = vcpu_id; // x2APIC ID
            match entry.index {
                0 => {
                    entry.eax = 0; // no SMT: the core level starts at APIC ID bit 0
                    entry.ebx = 1;
                    entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                }
                1 => {
                    entry.eax = bits_for(vcpu_count);
                    entry.ebx = vcpu_count;
                    entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                }
                _ => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = entry.index;
                }
            }
        }
        _ => {}
    }
}

/// Offers the TSC-deadline mode of the LAPIC timer (leaf 1 ECX bit 24), which KVM emulates in
/// its in-kernel LAPIC but leaves out of KVM_GET_SUPPORTED_CPUID. Without it Linux programs
/// its timer through the LAPIC's MMIO registers: an emulated access per tick where a deadline
/// is one MSR write (Firecracker and Cloud Hypervisor offer it too).
pub fn offer_tsc_deadline(cpuid: &mut CpuId) {
    for entry in cpuid.as_mut_slice() {
        if entry.function == LEAF_FEATURES {
            entry.ecx |= ECX_TSC_DEADLINE;
        }
    }
}

/// CPUID for vCPU `vcpu_id` of `vcpu_count`, derived from KVM's supported set.
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u8, vcpu_count: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let amd = supported
        .as_slice()
        .iter()
        .any(|e| e.function == 0 && e.ebx == AMD_VENDOR_EBX);
    for entry in cpuid.as_mut_slice() {
        adjust_entry(entry, vcpu_id as u32, vcpu_count as u32);
        if amd {
            adjust_amd_entry(entry, vcpu_id as u32, vcpu_count as u32);
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let supported = CpuId::from_entries(&[entry(1, 0), entry(0x4000_0000, 0)]).unwrap();
        let mut kvm_leaf = entry(0x4000_0000, 0);
        kvm_leaf.ebx = 0x4b4d_564b; // "KVMK"
        let supported = {
            let mut s = supported;
            s.as_mut_slice()[1] = kvm_leaf;
            s
        };
        let c = vcpu_cpuid(&supported, 3, 4);
        let leaf1 = c.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
        assert_eq!(c.as_slice()[1], kvm_leaf, "KVM signature leaf untouched");
    }

    #[test]
    fn extended_topology_describes_the_vcpus() {
        let supported =
            CpuId::from_entries(&[entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)]).unwrap();
        let c = vcpu_cpuid(&supported, 2, 3);
        let l = c.as_slice();
        assert_eq!((l[0].ebx, l[0].ecx, l[0].edx), (1, 0x100, 2));
        assert_eq!((l[1].eax, l[1].ebx, l[1].ecx), (2, 3, 0x201));
        assert_eq!((l[2].ebx, l[2].ecx), (0, 2));
    }

    #[test]
    fn amd_core_leaves_only_on_amd() {
        let mut vendor = entry(0, 0);
        vendor.ebx = AMD_VENDOR_EBX;
        let mut sizes = entry(LEAF_AMD_ADDRESS_SIZES, 0);
        sizes.ecx = 0xdead;
        let amd =
            CpuId::from_entries(&[vendor, sizes, entry(LEAF_AMD_EXTENDED_APIC_ID, 0)]).unwrap();
        let c = vcpu_cpuid(&amd, 1, 2);
        assert_eq!(c.as_slice()[1].ecx, (1 << 12) | 1);
        assert_eq!(c.as_slice()[2].eax, 1);
        let intel = CpuId::from_entries(&[entry(0, 0), sizes]).unwrap();
        assert_eq!(vcpu_cpuid(&intel, 1, 2).as_slice()[1].ecx, 0xdead);
    }

    #[test]
    fn the_tsc_deadline_timer_is_offered_in_leaf_1_only() {
        let mut c = CpuId::from_entries(&[entry(0, 0), entry(1, 0), entry(7, 0)]).unwrap();
        offer_tsc_deadline(&mut c);
        let ecx: Vec<u32> = c.as_slice().iter().map(|e| e.ecx).collect();
        assert_eq!(ecx, vec![0, ECX_TSC_DEADLINE, 0]);
    }

    #[test]
    fn apic_id_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }
}
