//! An Intel MultiProcessor Specification 1.4 table in the EBDA: without ACPI it is how a Linux
//! guest learns about its vCPUs (one processor entry per LAPIC), the IOAPIC, and how the 24
//! legacy IRQ lines (the ones virtio-mmio devices use) reach it.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::memory::GuestMemory;

/// The most vCPUs whose entries fit in the 1 KiB EBDA next to the rest of the table.
pub const MAX_VCPUS: u8 = 32;
/// IOAPIC input pins (and so legacy IRQ lines) described to the guest.
pub const IOAPIC_PINS: u8 = 24;

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOT_PROCESSOR: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = 0x201; // FPU, on-chip APIC
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// The VM has more vCPUs than the MP table can describe.
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyVcpus(u8),
    /// The MP table cannot be written to guest memory.
    #[error("cannot write the MP table to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the table's bytes for a table placed at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::TooManyVcpus(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOT_PROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // Every ISA IRQ, the timer's IRQ 0 included, is a plain vectored interrupt on the IOAPIC
    // pin of the same number. An ExtINT entry for IRQ 0 would tell Linux the timer comes
    // through an 8259 PIC that is not there: it then never routes the timer through the IOAPIC
    // and panics in setup_IO_APIC ("ExtINT not setup in hardware but reported by MP table").
    for irq in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 = ExtINT, LINT1 = NMI on every LAPIC.
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"FNVM    ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(16);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    Ok(floating)
}

/// Writes the MP table for `vcpus` vCPUs at the start of the EBDA.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_checksums_and_counts() {
        let t = build(2, EBDA_START).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 1 + 1 + 24 + 2);
    }

    /// The table's entries after the 44-byte header, as (type, bytes) pairs.
    fn entries(table: &[u8]) -> Vec<(u8, &[u8])> {
        let mut rest = &table[16 + 44..];
        let mut out = Vec::new();
        while let Some(&kind) = rest.first() {
            let len = if kind == 0 { 20 } else { 8 };
            out.push((kind, &rest[..len]));
            rest = &rest[len..];
        }
        out
    }

    #[test]
    fn every_isa_irq_timer_included_is_a_vectored_interrupt_on_its_own_ioapic_pin() {
        let table = build(2, EBDA_START).unwrap();
        let io: Vec<&[u8]> = entries(&table)
            .into_iter()
            .filter(|(kind, _)| *kind == 3)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(io.len(), IOAPIC_PINS as usize);
        for (irq, entry) in io.iter().enumerate() {
            assert_eq!(
                entry[1], INT_TYPE_INT,
                "IRQ {irq} must not be ExtINT or NMI"
            );
            assert_eq!(
                (entry[5], entry[7]),
                (irq as u8, irq as u8),
                "IRQ {irq}'s pin"
            );
        }
        // ExtINT stays only where the PIC would be wired: LINT0 of the local APICs.
        let local: Vec<&[u8]> = entries(&table)
            .into_iter()
            .filter(|(kind, _)| *kind == 4)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(local.len(), 2);
        assert_eq!((local[0][1], local[0][7]), (INT_TYPE_EXTINT, 0));
        assert_eq!((local[1][1], local[1][7]), (INT_TYPE_NMI, 1));
    }

    #[test]
    fn largest_table_fits_in_the_ebda() {
        assert!(build(MAX_VCPUS, EBDA_START).unwrap().len() <= 0x400);
        assert!(build(MAX_VCPUS + 1, EBDA_START).is_err());
        assert!(build(0, EBDA_START).is_err());
    }
}
