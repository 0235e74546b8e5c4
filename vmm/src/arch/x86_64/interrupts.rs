//! Local APIC set-up: LINT0 delivers the legacy PIC's interrupts (ExtINT) and LINT1 delivers
//! NMIs, as a PC's firmware leaves them (the "virtual wire" mode Linux expects at boot).

use kvm_bindings::kvm_lapic_state;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// Sets the delivery mode and unmasks the entry (bit 16), as firmware leaves virtual-wire mode;
/// a masked LINT0 would keep PIC interrupts from reaching the vCPU.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x1_0700) | (mode << 8)
}

/// Puts LINT0 in ExtINT and LINT1 in NMI delivery mode, both unmasked.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        set_lint(&mut lapic);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x700);
        assert_eq!(get_reg(&lapic, APIC_LVT1), 0x400);
    }
}
