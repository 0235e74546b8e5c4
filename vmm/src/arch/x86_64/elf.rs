//! ELF kernel images: the headers and program headers fnvm needs (either class, read from
//! hostile bytes), the notes that tell a Linux vmlinux and a PVH entry apart, and the loading
//! of an ELF32's segments into guest RAM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use vm_memory::{Bytes, GuestAddress};

use super::layout::HIMEM_START;
use crate::memory::{low_ram_end, GuestMemory};

pub(crate) const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
pub(crate) const ELFCLASS32: u8 = 1;
pub(crate) const ELFCLASS64: u8 = 2;
pub(crate) const EM_386: u16 = 3;
pub(crate) const PT_LOAD: u32 = 1;
pub(crate) const ELFDATA2LSB: u8 = 1;
pub(crate) const EM_X86_64: u16 = 62;
pub(crate) const PT_NOTE: u32 = 4;
pub(crate) const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
pub(crate) const MAX_PHDRS: u16 = 256;
pub(crate) const MAX_NOTE_SEGMENT: u64 = 64 * 1024;

/// Why a file is not an ELF image fnvm can boot.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The ELF header ends before its fields do.
    #[error("truncated ELF header: {0}")]
    TruncatedHeader(std::io::Error),
    /// Only little-endian x86 ELFs boot here.
    #[error("big-endian ELF")]
    BigEndian,
    /// A 64-bit ELF for another machine.
    #[error("64-bit ELF machine is not x86-64")]
    Not64BitX86,
    /// A 32-bit ELF for another machine.
    #[error("32-bit ELF machine is not x86")]
    Not32BitX86,
    /// Neither ELFCLASS32 nor ELFCLASS64.
    #[error("unknown ELF class")]
    UnknownClass,
    /// Program headers of the wrong size, none, or too many.
    #[error("bad ELF program headers")]
    BadProgramHeaders,
    /// A program header ends past the file.
    #[error("truncated program header: {0}")]
    TruncatedProgramHeader(std::io::Error),
    /// A note segment ends past the file.
    #[error("truncated ELF note segment")]
    TruncatedNotes,
    /// A loadable segment cannot be placed in guest RAM.
    #[error("segment {index} at {paddr:#x}: {why}")]
    Segment {
        index: usize,
        paddr: u64,
        why: SegmentError,
    },
    /// An ELF32 with nothing to load.
    #[error("no loadable segment")]
    NoLoadableSegment,
}

/// Why one loadable segment cannot be placed in guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// Its file part is larger than its memory image.
    #[error("file size exceeds memory size")]
    FileLargerThanMemory,
    /// Its end wraps past the address space.
    #[error("wraps around")]
    Wraps,
    /// It lies (partly) outside the RAM below the MMIO hole.
    #[error("outside guest RAM [{start:#x}, {end:#x})")]
    OutsideRam { start: u64, end: u64 },
    /// Its data could not be read from the file into guest memory.
    #[error("cannot read its data from the file")]
    Read,
    /// Its zero-filled tail could not be written.
    #[error("cannot zero its bss: {0}")]
    Zero(vm_memory::GuestMemoryError),
}

pub(crate) fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default())
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default())
}

/// One program header, widened to 64 bits.
#[derive(Debug, Clone, Copy)]
struct Phdr {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The ELF header fields fnvm needs, for either class.
struct ElfInfo {
    class: u8,
    entry: u64,
    phdrs: Vec<Phdr>,
}

fn read_elf_info(file: &mut File) -> Result<ElfInfo, ElfError> {
    let mut ehdr = [0u8; 64];
    read_at(file, 0, &mut ehdr[..52]).map_err(ElfError::TruncatedHeader)?;
    let class = ehdr[4];
    if ehdr[5] != ELFDATA2LSB {
        return Err(ElfError::BigEndian);
    }
    let machine = le16(&ehdr, 18);
    let (entry, phoff, phentsize, phnum) = match class {
        ELFCLASS64 => {
            read_at(file, 0, &mut ehdr).map_err(ElfError::TruncatedHeader)?;
            if machine != EM_X86_64 {
                return Err(ElfError::Not64BitX86);
            }
            (
                le64(&ehdr, 24),
                le64(&ehdr, 32),
                le16(&ehdr, 54),
                le16(&ehdr, 56),
            )
        }
        ELFCLASS32 => {
            if machine != EM_386 && machine != EM_X86_64 {
                return Err(ElfError::Not32BitX86);
            }
            (
                le32(&ehdr, 24) as u64,
                le32(&ehdr, 28) as u64,
                le16(&ehdr, 42),
                le16(&ehdr, 44),
            )
        }
        _ => return Err(ElfError::UnknownClass),
    };
    let expected = if class == ELFCLASS64 { 56 } else { 32 };
    if phentsize != expected || phnum == 0 || phnum > MAX_PHDRS {
        return Err(ElfError::BadProgramHeaders);
    }
    let mut phdrs = Vec::with_capacity(phnum as usize);
    for i in 0..phnum as u64 {
        let mut raw = [0u8; 56];
        let raw = &mut raw[..expected as usize];
        read_at(file, phoff.saturating_add(i * expected as u64), raw)
            .map_err(ElfError::TruncatedProgramHeader)?;
        phdrs.push(if class == ELFCLASS64 {
            Phdr {
                kind: le32(raw, 0),
                offset: le64(raw, 8),
                paddr: le64(raw, 24),
                filesz: le64(raw, 32),
                memsz: le64(raw, 40),
            }
        } else {
            Phdr {
                kind: le32(raw, 0),
                offset: le32(raw, 4) as u64,
                paddr: le32(raw, 12) as u64,
                filesz: le32(raw, 16) as u64,
                memsz: le32(raw, 20) as u64,
            }
        });
    }
    Ok(ElfInfo {
        class,
        entry,
        phdrs,
    })
}

/// An ELF kernel image as its headers and notes describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ElfKernel {
    /// An x86-64 ELF; `linux` when it carries a "Linux" note (a vmlinux).
    Elf64 { linux: bool, pvh_entry: Option<u64> },
    /// A 32-bit x86 ELF entered at `entry` (or its PVH entry).
    Elf32 { entry: u64, pvh_entry: Option<u64> },
}

/// What kind of ELF kernel `file` is, from its headers and notes.
pub(crate) fn detect_elf(file: &mut File) -> Result<ElfKernel, ElfError> {
    let info = read_elf_info(file)?;
    let mut linux = false;
    let mut pvh_entry = None;
    for phdr in info.phdrs.iter().filter(|p| p.kind == PT_NOTE) {
        let size = phdr.filesz.min(MAX_NOTE_SEGMENT);
        let mut notes = vec![0u8; size as usize];
        if read_at(file, phdr.offset, &mut notes).is_err() {
            return Err(ElfError::TruncatedNotes);
        }
        scan_notes(&notes, &mut linux, &mut pvh_entry);
    }
    if info.class == ELFCLASS32 {
        return Ok(ElfKernel::Elf32 {
            entry: info.entry,
            pvh_entry,
        });
    }
    Ok(ElfKernel::Elf64 { linux, pvh_entry })
}

/// Loads an ELF32's PT_LOAD segments at their physical addresses (the file part copied, the
/// rest zeroed), each checked to lie inside guest RAM. Returns the end of the loaded image.
pub(crate) fn load_elf32(mem: &GuestMemory, file: &mut File) -> Result<u64, ElfError> {
    let info = read_elf_info(file)?;
    let mut end = 0u64;
    for (index, p) in info.phdrs.iter().enumerate() {
        if p.kind != PT_LOAD || p.memsz == 0 {
            continue;
        }
        let bad = |why| ElfError::Segment {
            index,
            paddr: p.paddr,
            why,
        };
        if p.filesz > p.memsz {
            return Err(bad(SegmentError::FileLargerThanMemory));
        }
        let seg_end = p
            .paddr
            .checked_add(p.memsz)
            .ok_or_else(|| bad(SegmentError::Wraps))?;
        if p.paddr < HIMEM_START || seg_end > low_ram_end(mem) {
            return Err(bad(SegmentError::OutsideRam {
                start: HIMEM_START,
                end: low_ram_end(mem),
            }));
        }
        file.seek(SeekFrom::Start(p.offset))
            .map_err(|_| bad(SegmentError::Read))?;
        mem.read_exact_volatile_from(GuestAddress(p.paddr), file, p.filesz as usize)
            .map_err(|_| bad(SegmentError::Read))?;
        // Zero the bss part in bounded chunks (it was range-checked above).
        let zeroes = [0u8; 4096];
        let mut at = p.paddr + p.filesz;
        while at < seg_end {
            let n = (seg_end - at).min(zeroes.len() as u64) as usize;
            mem.write_slice(&zeroes[..n], GuestAddress(at))
                .map_err(|e| bad(SegmentError::Zero(e)))?;
            at += n as u64;
        }
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(ElfError::NoLoadableSegment);
    }
    Ok(end)
}

/// Walks one note segment (hostile bytes: every length is checked).
fn scan_notes(notes: &[u8], linux: &mut bool, pvh_entry: &mut Option<u64>) {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut pos = 0usize;
    while pos + 12 <= notes.len() {
        let namesz = le32(notes, pos) as usize;
        let descsz = le32(notes, pos + 4) as usize;
        let kind = le32(notes, pos + 8);
        let name_start = pos + 12;
        let Some(desc_start) = align4(namesz).and_then(|n| name_start.checked_add(n)) else {
            return;
        };
        let Some(next) = align4(descsz).and_then(|n| desc_start.checked_add(n)) else {
            return;
        };
        if desc_start > notes.len() || desc_start + descsz > notes.len() {
            return;
        }
        let name = &notes[name_start..name_start + namesz];
        let desc = &notes[desc_start..desc_start + descsz];
        if name == b"Linux\0" {
            *linux = true;
        }
        if name == b"Xen\0" && kind == XEN_ELFNOTE_PHYS32_ENTRY {
            *pvh_entry = match descsz {
                4 => Some(le32(desc, 0) as u64),
                8 => Some(le64(desc, 0)),
                _ => *pvh_entry,
            };
        }
        pos = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n.extend_from_slice(desc);
        while n.len() % 4 != 0 {
            n.push(0);
        }
        n
    }

    #[test]
    fn notes_reveal_linux_and_pvh() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 18, &0x10_0000u32.to_le_bytes()));
        notes.extend(note(b"Linux\0", 0x100, &[0; 4]));
        let (mut linux, mut pvh) = (false, None);
        scan_notes(&notes, &mut linux, &mut pvh);
        assert!(linux);
        assert_eq!(pvh, Some(0x10_0000));
    }

    #[test]
    fn hostile_notes_do_not_panic() {
        let mut notes = vec![0xffu8; 12];
        notes.extend_from_slice(&[0; 8]);
        let (mut linux, mut pvh) = (false, None);
        scan_notes(&notes, &mut linux, &mut pvh);
        scan_notes(&[1, 2, 3], &mut linux, &mut pvh);
        let mut huge = note(b"Xen\0", 18, &[0; 4]);
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        scan_notes(&huge, &mut linux, &mut pvh);
        assert!(!linux);
        assert_eq!(pvh, None);
    }
}
