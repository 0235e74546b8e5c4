//! Loading a guest kernel and writing what it finds at its entry point.
//!
//! Three kinds of kernel image are recognised from their headers:
//! - a Linux bzImage: loaded with linux-loader, entered at its 64-bit entry with boot_params;
//! - an ELF64 that carries a "Linux" ELF note (vmlinux): the same 64-bit Linux boot protocol;
//! - any other ELF64: the PVH boot protocol when it has a `XEN_ELFNOTE_PHYS32_ENTRY` note
//!   (32-bit protected mode, EBX = `hvm_start_info`), else its ELF entry in 64-bit mode;
//! - an ELF32 (i386): loaded by [`load_elf32`], entered in 32-bit protected mode at its PVH
//!   entry (or ELF entry) with EBX = `hvm_start_info`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::layout::*;
use super::regs::{BootEntry, EntryMode};
use crate::memory::{high_ram, low_ram_end, GuestMemory};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS32: u8 = 1;
const ELFCLASS64: u8 = 2;
const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const MAX_PHDRS: u16 = 256;
const MAX_NOTE_SEGMENT: u64 = 64 * 1024;

const BZIMAGE_BOOT_FLAG_OFFSET: u64 = 0x1fe;
const BZIMAGE_HEADER_MAGIC_OFFSET: u64 = 0x202;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const LINUX_64BIT_ENTRY_OFFSET: u64 = 0x200;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const HVM_START_MAGIC: u32 = 0x336e_c578;
/// Linux's default initrd ceiling when the kernel does not state one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// What kind of kernel image a file is, decided from its headers alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A Linux bzImage.
    BzImage,
    /// An x86-64 ELF. `linux` when it carries a "Linux" ELF note (a vmlinux); `pvh_entry` when
    /// it has a PVH 32-bit entry note.
    Elf { linux: bool, pvh_entry: Option<u64> },
    /// A 32-bit x86 ELF (tiny PVH guests are often linked this way): entered in 32-bit
    /// protected mode at its PVH entry, or at its ELF entry without one.
    Elf32 { entry: u64, pvh_entry: Option<u64> },
}

impl KernelFormat {
    /// Whether this is a Linux kernel (and so needs a hardware-virtualization host to boot).
    pub fn is_linux(&self) -> bool {
        matches!(
            self,
            KernelFormat::BzImage | KernelFormat::Elf { linux: true, .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a kernel fnvm can boot (expected a Linux bzImage or an x86-64 ELF): {why}"
    )]
    NotAKernel { path: PathBuf, why: String },
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("invalid kernel command line {cmdline:?}: {why}")]
    Cmdline { cmdline: String, why: String },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {max:#x}")]
    InitrdTooBig { path: PathBuf, size: u64, max: u64 },
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    InitrdCopy {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot write boot structures to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("guest memory of {0} MiB is too small to boot a kernel")]
    TooLittleMemory(u64),
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

/// Decides what kind of kernel `path` is, reading only its headers and ELF notes.
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let not_a_kernel = |why: &str| BootError::NotAKernel {
        path: path.to_path_buf(),
        why: why.to_string(),
    };
    let mut ident = [0u8; 64];
    let len = file.read(&mut ident).unwrap_or(0);
    if len >= 4 && &ident[..4] == ELF_MAGIC {
        return detect_elf(&mut file).map_err(|why| not_a_kernel(&why));
    }
    let mut flag = [0u8; 2];
    let mut magic = [0u8; 4];
    if read_at(&mut file, BZIMAGE_BOOT_FLAG_OFFSET, &mut flag).is_ok()
        && read_at(&mut file, BZIMAGE_HEADER_MAGIC_OFFSET, &mut magic).is_ok()
        && u16::from_le_bytes(flag) == BOOT_FLAG
        && u32::from_le_bytes(magic) == HDRS_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(not_a_kernel("no ELF magic and no bzImage boot header"))
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

fn read_elf_info(file: &mut File) -> Result<ElfInfo, String> {
    let mut ehdr = [0u8; 64];
    read_at(file, 0, &mut ehdr[..52]).map_err(|e| format!("truncated ELF header: {e}"))?;
    let class = ehdr[4];
    if ehdr[5] != ELFDATA2LSB {
        return Err("big-endian ELF".into());
    }
    let machine = le16(&ehdr, 18);
    let (entry, phoff, phentsize, phnum) = match class {
        ELFCLASS64 => {
            read_at(file, 0, &mut ehdr).map_err(|e| format!("truncated ELF header: {e}"))?;
            if machine != EM_X86_64 {
                return Err("64-bit ELF machine is not x86-64".into());
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
                return Err("32-bit ELF machine is not x86".into());
            }
            (
                le32(&ehdr, 24) as u64,
                le32(&ehdr, 28) as u64,
                le16(&ehdr, 42),
                le16(&ehdr, 44),
            )
        }
        _ => return Err("unknown ELF class".into()),
    };
    let expected = if class == ELFCLASS64 { 56 } else { 32 };
    if phentsize != expected || phnum == 0 || phnum > MAX_PHDRS {
        return Err("bad ELF program headers".into());
    }
    let mut phdrs = Vec::with_capacity(phnum as usize);
    for i in 0..phnum as u64 {
        let mut raw = [0u8; 56];
        let raw = &mut raw[..expected as usize];
        read_at(file, phoff.saturating_add(i * expected as u64), raw)
            .map_err(|e| format!("truncated program header: {e}"))?;
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

fn detect_elf(file: &mut File) -> Result<KernelFormat, String> {
    let info = read_elf_info(file)?;
    let mut linux = false;
    let mut pvh_entry = None;
    for phdr in info.phdrs.iter().filter(|p| p.kind == PT_NOTE) {
        let size = phdr.filesz.min(MAX_NOTE_SEGMENT);
        let mut notes = vec![0u8; size as usize];
        if read_at(file, phdr.offset, &mut notes).is_err() {
            return Err("truncated ELF note segment".into());
        }
        scan_notes(&notes, &mut linux, &mut pvh_entry);
    }
    if info.class == ELFCLASS32 {
        return Ok(KernelFormat::Elf32 {
            entry: info.entry,
            pvh_entry,
        });
    }
    Ok(KernelFormat::Elf { linux, pvh_entry })
}

/// Loads an ELF32's PT_LOAD segments at their physical addresses (the file part copied, the
/// rest zeroed), each checked to lie inside guest RAM. Returns the end of the loaded image.
fn load_elf32(mem: &GuestMemory, file: &mut File, path: &Path) -> Result<u64, BootError> {
    let not_a_kernel = |why: String| BootError::NotAKernel {
        path: path.to_path_buf(),
        why,
    };
    let info = read_elf_info(file).map_err(not_a_kernel)?;
    let mut end = 0u64;
    for (i, p) in info.phdrs.iter().enumerate() {
        if p.kind != PT_LOAD || p.memsz == 0 {
            continue;
        }
        let bad = |why: &str| not_a_kernel(format!("segment {i} at {:#x}: {why}", p.paddr));
        if p.filesz > p.memsz {
            return Err(bad("file size exceeds memory size"));
        }
        let seg_end = p
            .paddr
            .checked_add(p.memsz)
            .ok_or_else(|| bad("wraps around"))?;
        if p.paddr < HIMEM_START || seg_end > low_ram_end(mem) {
            return Err(bad(&format!(
                "outside guest RAM [{HIMEM_START:#x}, {:#x})",
                low_ram_end(mem)
            )));
        }
        file.seek(SeekFrom::Start(p.offset))
            .map_err(|_| bad("cannot seek to its data"))?;
        mem.read_exact_volatile_from(GuestAddress(p.paddr), file, p.filesz as usize)
            .map_err(|_| bad("cannot read its data from the file"))?;
        // Zero the bss part in bounded chunks (it was range-checked above).
        let zeroes = [0u8; 4096];
        let mut at = p.paddr + p.filesz;
        while at < seg_end {
            let n = (seg_end - at).min(zeroes.len() as u64) as usize;
            mem.write_slice(&zeroes[..n], GuestAddress(at))?;
            at += n as u64;
        }
        end = end.max(seg_end);
    }
    if end == 0 {
        return Err(not_a_kernel("no loadable segment".into()));
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

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

/// Builds the command line, checking it fits Linux's limit.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, BootError> {
    let joined = parts
        .iter()
        .filter(|p| !p.trim().is_empty())
        .map(|p| p.trim())
        .collect::<Vec<_>>()
        .join(" ");
    let err = |why: String| BootError::Cmdline {
        cmdline: joined.clone(),
        why,
    };
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| err(e.to_string()))?;
    if !joined.is_empty() {
        cmdline
            .insert_str(&joined)
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(cmdline)
}

/// The guest's RAM as e820 ranges: below the EBDA, 1 MiB up to the MMIO hole, above 4 GiB.
pub fn e820_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_START, E820_RAM)];
    map.push((EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED));
    let low_end = low_ram_end(mem);
    if low_end > HIMEM_START {
        map.push((HIMEM_START, low_end - HIMEM_START, E820_RAM));
    }
    if let Some((start, len)) = high_ram(mem) {
        map.push((start, len, E820_RAM));
    }
    map
}

struct LoadedInitrd {
    addr: u64,
    size: u64,
}

fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    addr_max: u64,
) -> Result<LoadedInitrd, BootError> {
    let open_err = |source| BootError::OpenInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_err)?;
    let size = file.metadata().map_err(open_err)?.len();
    let ceiling = low_ram_end(mem).min(addr_max.saturating_add(1));
    let too_big = || BootError::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        max: ceiling,
    };
    let addr = ceiling.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::InitrdCopy {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(LoadedInitrd { addr, size })
}

/// Loads the kernel (and initrd, command line, boot information) into guest memory and says
/// how the boot vCPU must be entered. `vcpus` sizes the MP table.
pub fn load_kernel(
    mem: &GuestMemory,
    config: &KernelConfig,
    vcpus: u8,
) -> Result<BootEntry, BootError> {
    let format = detect_kernel_format(&config.kernel)?;
    if low_ram_end(mem) < 2 * HIMEM_START {
        return Err(BootError::TooLittleMemory(low_ram_end(mem) >> 20));
    }
    let mut file = File::open(&config.kernel).map_err(|source| BootError::OpenKernel {
        path: config.kernel.clone(),
        source,
    })?;
    let load_err = |source| BootError::Load {
        path: config.kernel.clone(),
        source,
    };
    let cmdline = build_cmdline(&[&config.cmdline])?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(load_err)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    if vcpus > 0 {
        if let Err(e) = super::mptable::write(mem, vcpus) {
            tracing::warn!("no MP table for the guest: {e}");
        }
    }

    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let hdr = loaded.setup_header.unwrap_or_default();
            let initrd_max = if hdr.initrd_addr_max != 0 {
                hdr.initrd_addr_max as u64
            } else {
                DEFAULT_INITRD_ADDR_MAX
            };
            let initrd = match &config.initrd {
                Some(p) => Some(load_initrd(mem, p, loaded.kernel_end, initrd_max)?),
                None => None,
            };
            write_zero_page(mem, hdr, cmdline_len, initrd.as_ref())?;
            Ok(BootEntry {
                mode: EntryMode::Long64,
                entry: loaded.kernel_load.0 + LINUX_64BIT_ENTRY_OFFSET,
                boot_info: ZERO_PAGE_START,
            })
        }
        KernelFormat::Elf32 { entry, pvh_entry } => {
            let kernel_end = load_elf32(mem, &mut file, &config.kernel)?;
            let initrd = match &config.initrd {
                Some(p) => Some(load_initrd(mem, p, kernel_end, DEFAULT_INITRD_ADDR_MAX)?),
                None => None,
            };
            write_pvh_start_info(mem, initrd.as_ref())?;
            Ok(BootEntry {
                mode: EntryMode::Protected32,
                entry: pvh_entry.unwrap_or(entry),
                boot_info: PVH_INFO_START,
            })
        }
        KernelFormat::Elf { linux, pvh_entry } => {
            let loaded = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let initrd = match &config.initrd {
                Some(p) => Some(load_initrd(
                    mem,
                    p,
                    loaded.kernel_end,
                    DEFAULT_INITRD_ADDR_MAX,
                )?),
                None => None,
            };
            match (linux, pvh_entry) {
                (false, Some(entry)) => {
                    write_pvh_start_info(mem, initrd.as_ref())?;
                    Ok(BootEntry {
                        mode: EntryMode::Protected32,
                        entry,
                        boot_info: PVH_INFO_START,
                    })
                }
                _ => {
                    let hdr = setup_header {
                        boot_flag: BOOT_FLAG,
                        header: HDRS_MAGIC,
                        kernel_alignment: KERNEL_ALIGNMENT,
                        ..Default::default()
                    };
                    write_zero_page(mem, hdr, cmdline_len, initrd.as_ref())?;
                    Ok(BootEntry {
                        mode: EntryMode::Long64,
                        entry: loaded.kernel_load.0,
                        boot_info: ZERO_PAGE_START,
                    })
                }
            }
        }
    }
}

fn write_zero_page(
    mem: &GuestMemory,
    mut hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<&LoadedInitrd>,
) -> Result<(), BootError> {
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if hdr.kernel_alignment == 0 {
        hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
    }
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820_map(mem);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// Writes `hvm_start_info` with its memory map (and the initrd as module 0) for a PVH entry.
fn write_pvh_start_info(mem: &GuestMemory, initrd: Option<&LoadedInitrd>) -> Result<(), BootError> {
    let map = e820_map(mem);
    let memmap_addr = PVH_INFO_START + 64;
    let modlist_addr = memmap_addr + 24 * map.len() as u64;
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&HVM_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&(initrd.is_some() as u32).to_le_bytes()); // nr_modules
    let modlist = if initrd.is_some() { modlist_addr } else { 0 };
    info.extend_from_slice(&modlist.to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp_paddr: no ACPI
    info.extend_from_slice(&memmap_addr.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(PVH_INFO_START))?;
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let mut e = Vec::with_capacity(24);
        e.extend_from_slice(&addr.to_le_bytes());
        e.extend_from_slice(&size.to_le_bytes());
        e.extend_from_slice(&type_.to_le_bytes());
        e.extend_from_slice(&0u32.to_le_bytes());
        mem.write_slice(&e, GuestAddress(memmap_addr + 24 * i as u64))?;
    }
    if let Some(initrd) = initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&initrd.addr.to_le_bytes());
        m.extend_from_slice(&initrd.size.to_le_bytes());
        m.extend_from_slice(&[0u8; 16]);
        mem.write_slice(&m, GuestAddress(modlist_addr))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

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

    #[test]
    fn text_file_is_not_a_kernel() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"hello, I am not a kernel\n").unwrap();
        let err = detect_kernel_format(f.path()).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }));
        assert!(err.to_string().contains("not a kernel"), "{err}");
        let missing = detect_kernel_format(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(matches!(missing, BootError::OpenKernel { .. }));
    }

    #[test]
    fn bzimage_header_is_recognised() {
        let mut image = vec![0u8; 0x400];
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&image).unwrap();
        let format = detect_kernel_format(f.path()).unwrap();
        assert_eq!(format, KernelFormat::BzImage);
        assert!(format.is_linux());
    }

    /// A one-segment ELF32 with the segment at `paddr` of `memsz` bytes.
    fn elf32(paddr: u32, memsz: u32) -> tempfile::NamedTempFile {
        let mut e = vec![0u8; 52 + 32 + 16];
        e[0..4].copy_from_slice(ELF_MAGIC);
        e[4] = ELFCLASS32;
        e[5] = ELFDATA2LSB;
        e[18..20].copy_from_slice(&EM_386.to_le_bytes());
        e[24..28].copy_from_slice(&paddr.to_le_bytes());
        e[28..32].copy_from_slice(&52u32.to_le_bytes());
        e[42..44].copy_from_slice(&32u16.to_le_bytes());
        e[44..46].copy_from_slice(&1u16.to_le_bytes());
        for (i, v) in [PT_LOAD, 84, paddr, paddr, 16, memsz, 5, 4]
            .iter()
            .enumerate()
        {
            e[52 + 4 * i..56 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        e[84..100].copy_from_slice(&[0x90; 16]);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&e).unwrap();
        f
    }

    #[test]
    fn elf32_segments_must_lie_in_guest_ram() {
        let mem = crate::memory::create_guest_memory(8).unwrap();
        let load = |f: &tempfile::NamedTempFile| {
            let cfg = KernelConfig {
                kernel: f.path().to_path_buf(),
                initrd: None,
                cmdline: String::new(),
            };
            load_kernel(&mem, &cfg, 1)
        };
        let ok = elf32(0x10_0000, 0x2000);
        let entry = load(&ok).unwrap();
        assert_eq!(
            (entry.mode, entry.entry),
            (EntryMode::Protected32, 0x10_0000)
        );
        let low = load(&elf32(0x1000, 0x100)).unwrap_err();
        assert!(low.to_string().contains("outside guest RAM"), "{low}");
        let huge = load(&elf32(0x10_0000, u32::MAX)).unwrap_err();
        assert!(huge.to_string().contains("outside guest RAM"), "{huge}");
        let bss = elf32(0x10_0000, 8);
        assert!(load(&bss)
            .unwrap_err()
            .to_string()
            .contains("file size exceeds"));
    }

    /// A minimal bzImage: one setup sector after the boot sector, then a 512-byte "kernel".
    fn fake_bzimage() -> tempfile::NamedTempFile {
        let mut image = vec![0u8; 3 * 512];
        image[0x1f1] = 1; // setup_sects
        image[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        image[0x211] = 1; // LOADED_HIGH
        image[0x214..0x218].copy_from_slice(&(HIMEM_START as u32).to_le_bytes());
        image[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        image[0x400..0x600].fill(0xcc);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&image).unwrap();
        f
    }

    #[test]
    fn bzimage_boot_fills_the_zero_page() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let kernel = fake_bzimage();
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[0x5a; 3000]).unwrap();
        let cfg = KernelConfig {
            kernel: kernel.path().to_path_buf(),
            initrd: Some(initrd.path().to_path_buf()),
            cmdline: "console=ttyS0 panic=1".into(),
        };
        let entry = load_kernel(&mem, &cfg, 2).unwrap();
        assert_eq!(
            entry,
            BootEntry {
                mode: EntryMode::Long64,
                entry: HIMEM_START + 0x200,
                boot_info: ZERO_PAGE_START,
            }
        );
        let kernel_byte: u8 = mem.read_obj(GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(kernel_byte, 0xcc, "protected-mode kernel loaded at 1 MiB");
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = params.hdr;
        assert_eq!(hdr.type_of_loader, LOADER_TYPE_UNDEFINED);
        assert_eq!(hdr.cmd_line_ptr as u64, CMDLINE_START);
        assert_eq!(hdr.cmdline_size as usize, "console=ttyS0 panic=1".len());
        let mut cmdline = vec![0u8; hdr.cmdline_size as usize + 1];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 panic=1\0");
        assert_eq!({ hdr.ramdisk_size }, 3000);
        let rd = hdr.ramdisk_image as u64;
        assert_eq!(rd % 4096, 0);
        assert!(rd + 3000 <= 64 << 20 && rd >= HIMEM_START);
        let rd_byte: u8 = mem.read_obj(GuestAddress(rd + 2999)).unwrap();
        assert_eq!(rd_byte, 0x5a);
        assert_eq!(params.e820_entries, 3);
        let last = params.e820_table[2];
        assert_eq!(
            (last.addr, last.size),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
        let mut mp = [0u8; 4];
        mem.read_slice(&mut mp, GuestAddress(EBDA_START)).unwrap();
        assert_eq!(&mp, b"_MP_");
    }

    #[test]
    fn initrd_too_big_for_guest_memory_is_refused() {
        let mem = crate::memory::create_guest_memory(4).unwrap();
        let kernel = fake_bzimage();
        let initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.as_file().set_len(8 << 20).unwrap();
        let cfg = KernelConfig {
            kernel: kernel.path().to_path_buf(),
            initrd: Some(initrd.path().to_path_buf()),
            cmdline: String::new(),
        };
        let err = load_kernel(&mem, &cfg, 1).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }), "{err}");
    }

    #[test]
    fn e820_leaves_out_the_mmio_hole() {
        let mem = crate::memory::create_guest_memory(64).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn cmdline_over_the_limit_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE + 1);
        assert!(matches!(
            build_cmdline(&[&long]),
            Err(BootError::Cmdline { .. })
        ));
        let ok = build_cmdline(&["console=ttyS0", " ", "panic=1"]).unwrap();
        assert_eq!(
            ok.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 panic=1"
        );
    }
}
