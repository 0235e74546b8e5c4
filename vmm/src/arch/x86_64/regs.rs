//! Segment, control and general-purpose registers for the three ways a guest can be entered:
//! 64-bit long mode (Linux boot protocol), 32-bit protected mode without paging (PVH), and real
//! mode (tests, firmware-like guests).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use crate::memory::GuestMemory;

/// How the vCPU is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryMode {
    /// 16-bit real mode, CS base 0: `entry` must be below 64 KiB.
    Real,
    /// 32-bit protected mode, paging off, flat segments; `boot_info` in EBX (PVH).
    Protected32,
    /// 64-bit long mode with the identity page tables; `boot_info` in RSI (Linux zero page).
    Long64,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry: u64,
    /// Guest-physical address of the boot information structure (zero page or PVH start info).
    pub boot_info: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// The boot GDT, IDT or page tables cannot be written to guest memory.
    #[error("cannot write the boot GDT/IDT or page tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// The kernel's real-mode entry point is not below 64 KiB.
    #[error("real-mode entry {0:#x} is not below 64 KiB")]
    RealModeEntry(u64),
    /// Guest memory is too small (under 64 KiB) for the boot page tables.
    #[error("the boot page tables need at least 64 KiB of guest memory")]
    TooLittleMemory,
}

// GDT descriptor flags: access byte in bits 0-7, granularity/size/long/avl nibble in 12-15.
const CODE64_FLAGS: u16 = 0xa09b;
const CODE32_FLAGS: u16 = 0xc09b;
const DATA_FLAGS: u16 = 0xc093;
const TSS_FLAGS: u16 = 0x808b;

const CODE_SELECTOR_INDEX: u16 = 1;
const DATA_SELECTOR_INDEX: u16 = 2;
const TSS_SELECTOR_INDEX: u16 = 3;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NE: u64 = 0x20;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Packs a GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM view of GDT descriptor `index`; the limit is in bytes, as KVM wants it.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write_gdt_and_idt(mem: &GuestMemory, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    Ok(())
}

/// Identity-maps the first [`IDENTITY_MAPPED_GIB`] GiB with 2 MiB pages.
pub fn write_identity_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    let end = PDE_START + IDENTITY_MAPPED_GIB * 0x1000;
    if mem.address_in_range_end(end) {
        return Err(RegsError::TooLittleMemory);
    }
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = PDE_START + gib * 0x1000;
        mem.write_obj(pd | 0x3, GuestAddress(PDPTE_START + gib * 8))?;
        for i in 0..512u64 {
            let page = ((gib * 512 + i) << 21) | 0x83; // present, writable, 2 MiB page
            mem.write_obj(page, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

/// `true` when guest memory does not reach `end`.
trait AddressRangeEnd {
    fn address_in_range_end(&self, end: u64) -> bool;
}

impl AddressRangeEnd for GuestMemory {
    fn address_in_range_end(&self, end: u64) -> bool {
        use vm_memory::GuestMemoryBackend;
        !self.address_in_range(GuestAddress(end - 1))
    }
}

/// Writes the boot GDT (and page tables for long mode) and fills `sregs` for `mode`.
pub fn setup_sregs(
    mem: &GuestMemory,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), RegsError> {
    match mode {
        EntryMode::Real => {
            // KVM's reset state is real mode with CS at the reset vector; run from CS base 0.
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            Ok(())
        }
        EntryMode::Protected32 | EntryMode::Long64 => {
            let code = if mode == EntryMode::Long64 {
                CODE64_FLAGS
            } else {
                CODE32_FLAGS
            };
            let gdt = [
                0,
                gdt_entry(code, 0, 0xfffff),
                gdt_entry(DATA_FLAGS, 0, 0xfffff),
                gdt_entry(TSS_FLAGS, 0, 0xfffff),
            ];
            write_gdt_and_idt(mem, &gdt)?;
            let code_seg = segment_from_gdt(gdt[1], CODE_SELECTOR_INDEX);
            let data_seg = segment_from_gdt(gdt[2], DATA_SELECTOR_INDEX);
            let tss_seg = segment_from_gdt(gdt[3], TSS_SELECTOR_INDEX);
            sregs.gdt.base = BOOT_GDT_START;
            sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
            sregs.idt.base = BOOT_IDT_START;
            sregs.idt.limit = 7;
            sregs.cs = code_seg;
            sregs.ds = data_seg;
            sregs.es = data_seg;
            sregs.fs = data_seg;
            sregs.gs = data_seg;
            sregs.ss = data_seg;
            sregs.tr = tss_seg;
            if mode == EntryMode::Long64 {
                write_identity_page_tables(mem)?;
                sregs.cr3 = PML4_START;
                sregs.cr4 = X86_CR4_PAE;
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
                sregs.efer = EFER_LME | EFER_LMA;
            } else {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
            }
            Ok(())
        }
    }
}

/// General-purpose registers at the entry point.
pub fn boot_regs(entry: &BootEntry) -> Result<kvm_regs, RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2, // bit 1 is reserved and always set
        rip: entry.entry,
        ..Default::default()
    };
    match entry.mode {
        EntryMode::Real => {
            if entry.entry >= 0x1_0000 {
                return Err(RegsError::RealModeEntry(entry.entry));
            }
        }
        EntryMode::Protected32 => regs.rbx = entry.boot_info,
        EntryMode::Long64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = entry.boot_info;
        }
    }
    Ok(regs)
}

/// The x87/SSE state a freshly reset CPU has (FNINIT control word, default MXCSR).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(
            (code.l, code.db, code.g, code.present, code.s),
            (1, 0, 1, 1, 1)
        );
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(gdt_entry(DATA_FLAGS, 0x1234_5678, 0xfffff), 2);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!((data.db, data.type_), (1, 3));
    }

    #[test]
    fn long_mode_setup_writes_identity_page_tables() {
        let mem = create_guest_memory(16).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, EntryMode::Long64, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // 3 GiB + 2 MiB maps to itself.
        let pd3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        let entry: u64 = mem.read_obj(GuestAddress((pd3 & !0xfff) + 8)).unwrap();
        assert_eq!(entry & !0xfff, (3 << 30) + (2 << 20));
    }

    #[test]
    fn real_mode_entry_must_be_below_64k() {
        let e = BootEntry {
            mode: EntryMode::Real,
            entry: 0x1_0000,
            boot_info: 0,
        };
        assert!(boot_regs(&e).is_err());
    }
}
