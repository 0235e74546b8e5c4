//! Loading a guest kernel and writing what it finds at its entry point.
//!
//! Three kinds of kernel image are recognised from their headers:
//! - a Linux bzImage: loaded with linux-loader, entered at its 64-bit entry with boot_params;
//! - an ELF64 that carries a "Linux" ELF note (vmlinux): the same 64-bit Linux boot protocol;
//! - any other ELF64: the PVH boot protocol when it has a `XEN_ELFNOTE_PHYS32_ENTRY` note
//!   (32-bit protected mode, EBX = `hvm_start_info`), else its ELF entry in 64-bit mode;
//! - an ELF32 (i386): loaded by [`super::elf`], entered in 32-bit protected mode at its PVH
//!   entry (or ELF entry) with EBX = `hvm_start_info`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::elf::{detect_elf, load_elf32, read_at, ElfError, ElfKernel, ELF_MAGIC};
use super::layout::*;
use super::regs::{BootEntry, EntryMode};
use crate::memory::{high_ram, low_ram_end, GuestMemory};

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

/// Why a file is not a kernel image fnvm can boot.
#[derive(Debug, thiserror::Error)]
pub enum NotAKernel {
    /// An ELF, but not one fnvm boots.
    #[error(transparent)]
    Elf(#[from] ElfError),
    /// Neither an ELF nor a bzImage.
    #[error("no ELF magic and no bzImage boot header")]
    NoHeader,
}

/// Why a kernel could not be recognised or loaded.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a kernel image fnvm boots.
    #[error(
        "{path} is not a kernel fnvm can boot (expected a Linux bzImage or an x86-64 ELF): {why}"
    )]
    NotAKernel { path: PathBuf, why: NotAKernel },
    /// linux-loader refused the image.
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    /// The command line is too long or malformed.
    #[error("invalid kernel command line {cmdline:?}: {why}")]
    Cmdline { cmdline: String, why: String },
    /// The initrd file cannot be opened.
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The initrd does not fit below the kernel's initrd ceiling.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {max:#x}")]
    InitrdTooBig { path: PathBuf, size: u64, max: u64 },
    /// The initrd could not be copied into guest memory.
    #[error("cannot copy initrd {path} into guest memory: {source}")]
    InitrdCopy {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    /// boot_params, the MP table or the PVH start info could not be written.
    #[error("cannot write boot structures to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// Guest RAM too small for the boot layout.
    #[error("guest memory of {0} MiB is too small to boot a kernel")]
    TooLittleMemory(u64),
}

/// Decides what kind of kernel `path` is, reading only its headers and ELF notes.
pub fn detect_kernel_format(path: &Path) -> Result<KernelFormat, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let not_a_kernel = |why: NotAKernel| BootError::NotAKernel {
        path: path.to_path_buf(),
        why,
    };
    let mut ident = [0u8; 64];
    let len = file.read(&mut ident).unwrap_or(0);
    if len >= 4 && &ident[..4] == ELF_MAGIC {
        return match detect_elf(&mut file).map_err(|e| not_a_kernel(e.into()))? {
            ElfKernel::Elf64 { linux, pvh_entry } => Ok(KernelFormat::Elf { linux, pvh_entry }),
            ElfKernel::Elf32 { entry, pvh_entry } => Ok(KernelFormat::Elf32 { entry, pvh_entry }),
        };
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
    Err(not_a_kernel(NotAKernel::NoHeader))
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
            let kernel_end = load_elf32(mem, &mut file).map_err(|e| BootError::NotAKernel {
                path: config.kernel.clone(),
                why: e.into(),
            })?;
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
    use crate::arch::x86_64::elf::{ELFCLASS32, ELFDATA2LSB, ELF_MAGIC, EM_386, PT_LOAD};
    use std::io::Write;

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
