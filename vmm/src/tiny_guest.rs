//! Minimal guest programs for tests and benchmarks that need a real VM without a Linux kernel
//! (this crate's tests, the benchmarks, the host's VMM-client tests): an ELF64 wrapper that
//! `fnvm-vmm --kernel` enters in 64-bit mode, a guest that writes to the serial port forever,
//! and one that writes a line and then spins.

/// Where [`elf64`] loads its code (1 MiB, the lowest address fnvm-vmm loads segments at).
pub const LOAD_ADDR: u64 = 0x10_0000;
/// The code's offset in the file and so its address: `LOAD_ADDR + CODE_OFFSET`.
pub const CODE_OFFSET: u64 = 0x78; // 64-byte ELF header + one 56-byte program header

/// An ELF64 executable with one read/write/execute PT_LOAD at [`LOAD_ADDR`] holding `code`, no
/// PVH note: fnvm-vmm enters it in 64-bit mode at its first byte.
pub fn elf64(code: &[u8]) -> Vec<u8> {
    let code_off = CODE_OFFSET as usize;
    let total = code_off + code.len();
    let mut elf = vec![0u8; total];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&(LOAD_ADDR + CODE_OFFSET).to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers at 64
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let p = 64;
    elf[p..p + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf[p + 4..p + 8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    elf[p + 16..p + 24].copy_from_slice(&LOAD_ADDR.to_le_bytes());
    elf[p + 24..p + 32].copy_from_slice(&LOAD_ADDR.to_le_bytes());
    elf[p + 32..p + 40].copy_from_slice(&(total as u64).to_le_bytes());
    elf[p + 40..p + 48].copy_from_slice(&(total as u64).to_le_bytes());
    elf[p + 48..p + 56].copy_from_slice(&0x1000u64.to_le_bytes());
    elf[code_off..].copy_from_slice(code);
    elf
}

/// `mov dx,0x3f8; 1: mov al,'x'; out dx,al; mov ecx,1000; 2: pause; loop 2b; jmp 1b`
const SERIAL_LOOP: [u8; 18] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x78, 0xee, 0xb9, 0xe8, 0x03, 0x00, 0x00, 0xf3, 0x90, 0xe2, 0xfc,
    0xeb, 0xf2,
];

/// A guest that writes `x` to COM1 every ~1000 PAUSEs, forever: a VM that keeps running and
/// shows it is alive (also right after a restore: its next I/O is a serial byte).
pub fn serial_loop() -> Vec<u8> {
    elf64(&SERIAL_LOOP)
}

/// [`serial_loop`] writing every `pauses` PAUSEs instead. Where PAUSE exits to the host (KVM-PVM
/// emulates it: ~3.5 µs each here) 1000 of them take ~3.5 ms, so a restored guest's first byte
/// comes anywhere up to 3.5 ms after its vCPUs resumed, depending on where the snapshot caught
/// the loop; a timing of restore → first byte wants a short loop.
pub fn serial_loop_every(pauses: u32) -> Vec<u8> {
    let mut code = SERIAL_LOOP;
    code[8..12].copy_from_slice(&pauses.max(1).to_le_bytes());
    elf64(&code)
}

/// A guest that first writes a non-zero pattern to `bytes` of memory from guest-physical
/// `start` (`rep stosq`; both 8-byte aligned, inside RAM and the VMM's identity map), then runs
/// [`serial_loop`]'s code: a VM with that much touched memory for snapshot measurements.
pub fn fill_then_serial_loop(start: u64, bytes: u64) -> Vec<u8> {
    let mut code = Vec::with_capacity(33 + SERIAL_LOOP.len());
    code.extend_from_slice(&[0x48, 0xbf]); // mov rdi, imm64
    code.extend_from_slice(&start.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xb9]); // mov rcx, imm64
    code.extend_from_slice(&(bytes / 8).to_le_bytes());
    code.extend_from_slice(&[0x48, 0xb8]); // mov rax, imm64
    code.extend_from_slice(&0x5a5a_5a5a_5a5a_5a5au64.to_le_bytes());
    code.extend_from_slice(&[0xf3, 0x48, 0xab]); // rep stosq
    code.extend_from_slice(&SERIAL_LOOP);
    elf64(&code)
}

/// A guest that writes `text` to COM1 once, then spins on PAUSE forever: a Linux guest's
/// `panic=0` ending (the banner, then nothing), which the VMM must end on its own timer.
pub fn print_then_spin(text: &[u8]) -> Vec<u8> {
    // mov dx,0x3f8; lea rsi,[rip+13]; mov ecx,len; 1: lodsb; out dx,al; loop 1b;
    // 2: pause; jmp 2b; text
    let mut code = vec![0x66, 0xba, 0xf8, 0x03, 0x48, 0x8d, 0x35, 13, 0, 0, 0, 0xb9];
    code.extend_from_slice(&(text.len().max(1) as u32).to_le_bytes());
    code.extend_from_slice(&[0xac, 0xee, 0xe2, 0xfc, 0xf3, 0x90, 0xeb, 0xfc]);
    code.extend_from_slice(if text.is_empty() { b"\n" } else { text });
    elf64(&code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loop_count_is_the_one_asked_for() {
        assert_eq!(serial_loop_every(1000), serial_loop());
        let short = serial_loop_every(50);
        let code = &short[CODE_OFFSET as usize..];
        assert_eq!(&code[7..12], &[0xb9, 50, 0, 0, 0]); // mov ecx, 50
    }

    #[test]
    fn the_elf_entry_is_the_code() {
        let elf = serial_loop();
        assert_eq!(&elf[..4], b"\x7fELF");
        let entry = u64::from_le_bytes(elf[24..32].try_into().unwrap());
        assert_eq!(entry, LOAD_ADDR + CODE_OFFSET);
        assert_eq!(&elf[CODE_OFFSET as usize..], &SERIAL_LOOP);
    }
}
