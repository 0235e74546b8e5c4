//! The tiny PVH guest: an ELF64 image with one loadable segment at 1 MiB and a Xen
//! `PHYS32_ENTRY` note, so any PVH-capable VMM enters it in 32-bit protected mode, paging off.

use super::MARKER;

/// Where the code is loaded and run (1 MiB, the usual kernel load address).
const LOAD_ADDR: u32 = 0x10_0000;
const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// How the guest ends after writing its marker.
#[derive(Clone, Copy)]
pub enum End {
    /// i8042 reset (port 0x64 ← 0xfe); where that port does nothing, QEMU's isa-debug-exit
    /// (port 0xf4); where that does nothing either, a triple fault.
    Reset,
    /// Spin forever (for memory measurements of a running VM).
    Spin,
}

/// 32-bit machine code: write MARKER to COM1, then end.
fn code(end: End, code_addr: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &byte in MARKER {
        c.extend_from_slice(&[0xb0, byte, 0xee]); // mov al, byte; out dx, al
    }
    match end {
        End::Reset => {
            c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
                                                            // QEMU's microvm has no i8042: its isa-debug-exit device at 0xf4 ends it.
            c.extend_from_slice(&[0xb0, 0x00, 0xe6, 0xf4]); // mov al, 0; out 0xf4, al
                                                            // lidt [null_idtr]; int3 -> no IDT -> double fault -> triple fault.
            let lidt_at = c.len();
            c.extend_from_slice(&[0x0f, 0x01, 0x1d, 0, 0, 0, 0, 0xcc]);
            let null_idtr = code_addr + c.len() as u32;
            c[lidt_at + 3..lidt_at + 7].copy_from_slice(&null_idtr.to_le_bytes());
            c.extend_from_slice(&[0u8; 6]); // limit 0, base 0
        }
        End::Spin => c.extend_from_slice(&[0xf3, 0x90, 0xeb, 0xfc]), // pause; jmp back
    }
    c
}

fn note() -> Vec<u8> {
    let mut n = Vec::new();
    n.extend_from_slice(&4u32.to_le_bytes()); // namesz ("Xen\0")
    n.extend_from_slice(&4u32.to_le_bytes()); // descsz
    n.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes());
    n.extend_from_slice(b"Xen\0");
    n.extend_from_slice(&0u32.to_le_bytes()); // entry, patched below
    n
}

pub fn elf(end: End) -> Vec<u8> {
    let notes_off = EHDR_SIZE + 2 * PHDR_SIZE;
    let note_len = note().len();
    let code_off = (notes_off + note_len).next_multiple_of(16);
    // The loadable segment maps the whole file at LOAD_ADDR, so file offset = address - LOAD.
    let entry = LOAD_ADDR + code_off as u32;
    let code = code(end, entry);
    let file_len = code_off + code.len();

    let mut f = Vec::with_capacity(file_len);
    // ELF header
    f.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    f.extend_from_slice(&[0u8; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&u64::from(entry).to_le_bytes()); // e_entry
    f.extend_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // PT_LOAD: the whole file, RWX, at LOAD_ADDR.
    phdr(&mut f, 1, 7, 0, LOAD_ADDR as u64, file_len as u64, 0x1000);
    // PT_NOTE
    phdr(
        &mut f,
        4,
        4,
        notes_off as u64,
        LOAD_ADDR as u64 + notes_off as u64,
        note_len as u64,
        4,
    );
    let mut n = note();
    let len = n.len();
    n[len - 4..].copy_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&n);
    f.resize(code_off, 0);
    f.extend_from_slice(&code);
    f
}

fn phdr(f: &mut Vec<u8>, kind: u32, flags: u32, offset: u64, addr: u64, size: u64, align: u64) {
    f.extend_from_slice(&kind.to_le_bytes());
    f.extend_from_slice(&flags.to_le_bytes());
    f.extend_from_slice(&offset.to_le_bytes());
    f.extend_from_slice(&addr.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&addr.to_le_bytes()); // p_paddr
    f.extend_from_slice(&size.to_le_bytes()); // p_filesz
    f.extend_from_slice(&size.to_le_bytes()); // p_memsz
    f.extend_from_slice(&align.to_le_bytes());
}
