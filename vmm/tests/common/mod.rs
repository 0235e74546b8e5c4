//! Shared support for the tiny-guest tests that drive virtio-mmio devices from inside a guest:
//! the loud skip without /dev/kvm, a console that records the guest's serial bytes, the guest
//! side of a virtio-mmio driver (status handshake, queue setup, notify, bounded waits) as
//! iced-x86 code, and the host side of a split virtqueue in guest memory (descriptors, avail
//! ring, used ring).
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use fnvm_vmm::memory::GuestMemory;
use fnvm_vmm::vmm::VmConfig;
use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};

pub const COM1: u16 = 0x3f8;
const I8042_COMMAND: u16 = 0x64;

/// The first virtio-mmio window (the device added first); the next ones follow every 4 KiB.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;

// virtio-mmio registers and status bits: the transport's own table.
pub use fnvm_vmm::devices::virtio::mmio::regs::*;

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Prints a skip notice straight to the process's stderr: libtest captures `eprintln!` of
/// passing tests, and a skip must never be silent.
pub fn loud_skip(message: &str) {
    let _ = writeln!(io::stderr(), "!!! SKIPPED {message} !!!");
}

/// True if /dev/kvm exists; otherwise prints the loud skip line for `test`.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    loud_skip(&format!(
        "{test}: /dev/kvm is missing, this tiny-guest test did NOT run"
    ));
    false
}

/// The guest's serial output, shared with the VM's console.
#[derive(Clone, Default)]
pub struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Console {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A VM config with `memory_mib` of RAM, `vcpus` vCPUs, the in-kernel irqchip and a recorded
/// console.
pub fn config(memory_mib: u64, vcpus: u8) -> (VmConfig, Console) {
    let console = Console::default();
    let mut c = VmConfig::new(memory_mib, vcpus);
    c.console = Box::new(console.clone());
    c.irqchip = true;
    (c, console)
}

/// Writes each byte of `text` to COM1 (clobbers AL and DX).
pub fn print(a: &mut CodeAssembler, text: &str) {
    a.mov(dx, COM1 as u32).unwrap();
    for b in text.bytes() {
        a.mov(al, b as u32).unwrap();
        a.out(dx, al).unwrap();
    }
}

/// Asks the i8042 for a CPU reset, then spins (the VMM ends the VM).
pub fn reset(a: &mut CodeAssembler) {
    a.mov(dx, I8042_COMMAND as u32).unwrap();
    a.mov(al, 0xfe).unwrap();
    a.out(dx, al).unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
}

/// The guest side of a virtio-mmio driver for the device whose window is at `base`. Its code
/// keeps the window's address in RSI.
pub struct Driver {
    pub base: u64,
}

impl Driver {
    pub fn new(a: &mut CodeAssembler, base: u64) -> Driver {
        a.mov(rsi, base).unwrap();
        Driver { base }
    }

    /// Points RSI at this driver's window again (after code that used RSI).
    pub fn select(&self, a: &mut CodeAssembler) {
        a.mov(rsi, self.base).unwrap();
    }

    /// A 32-bit register write.
    pub fn write(&self, a: &mut CodeAssembler, reg: u64, value: u32) {
        a.mov(dword_ptr(rsi + reg as i32), value).unwrap();
    }

    /// Loads a 32-bit register into EAX.
    pub fn read(&self, a: &mut CodeAssembler, reg: u64) {
        a.mov(eax, dword_ptr(rsi + reg as i32)).unwrap();
    }

    /// Reset, ACKNOWLEDGE, DRIVER, accept VERSION_1 (bit 32) and `low_features`, FEATURES_OK;
    /// jumps to `fail` if the device refused FEATURES_OK.
    pub fn negotiate(&self, a: &mut CodeAssembler, low_features: u32, fail: CodeLabel) {
        self.write(a, REG_STATUS, 0);
        self.write(a, REG_STATUS, S_ACK);
        self.write(a, REG_STATUS, S_ACK | S_DRIVER);
        self.write(a, REG_DRIVER_FEATURES_SEL, 1);
        self.write(a, REG_DRIVER_FEATURES, 1);
        self.write(a, REG_DRIVER_FEATURES_SEL, 0);
        self.write(a, REG_DRIVER_FEATURES, low_features);
        self.write(a, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
        self.read(a, REG_STATUS);
        a.test(eax, S_FEATURES_OK as i32).unwrap();
        a.jz(fail).unwrap();
    }

    /// Selects queue `index`, gives it `size` entries and the rings of `ring`, and enables it.
    pub fn setup_queue(&self, a: &mut CodeAssembler, index: u32, size: u32, ring: &Ring) {
        self.write(a, REG_QUEUE_SEL, index);
        self.write(a, REG_QUEUE_NUM, size);
        self.write(a, REG_QUEUE_DESC_LOW, ring.desc as u32);
        self.write(a, REG_QUEUE_DESC_HIGH, (ring.desc >> 32) as u32);
        self.write(a, REG_QUEUE_DRIVER_LOW, ring.avail as u32);
        self.write(a, REG_QUEUE_DRIVER_HIGH, (ring.avail >> 32) as u32);
        self.write(a, REG_QUEUE_DEVICE_LOW, ring.used as u32);
        self.write(a, REG_QUEUE_DEVICE_HIGH, (ring.used >> 32) as u32);
        self.write(a, REG_QUEUE_READY, 1);
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self, a: &mut CodeAssembler) {
        self.write(
            a,
            REG_STATUS,
            S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
        );
    }

    /// Jumps to `target` if the status register has DEVICE_NEEDS_RESET set.
    pub fn jump_if_needs_reset(&self, a: &mut CodeAssembler, target: CodeLabel) {
        self.read(a, REG_STATUS);
        a.test(eax, S_NEEDS_RESET as i32).unwrap();
        a.jnz(target).unwrap();
    }

    /// Jumps to `target` unless the status register has DEVICE_NEEDS_RESET set.
    pub fn jump_unless_needs_reset(&self, a: &mut CodeAssembler, target: CodeLabel) {
        self.read(a, REG_STATUS);
        a.test(eax, S_NEEDS_RESET as i32).unwrap();
        a.jz(target).unwrap();
    }

    /// Writes QueueNotify(`index`).
    pub fn notify(&self, a: &mut CodeAssembler, index: u32) {
        self.write(a, REG_QUEUE_NOTIFY, index);
    }
}

/// Writes `value` to the 16-bit word at guest-physical `addr` (guest code; clobbers RDI).
pub fn store_u16(a: &mut CodeAssembler, addr: u64, value: u16) {
    a.mov(rdi, addr).unwrap();
    a.mov(word_ptr(rdi), value as u32).unwrap();
}

/// Spins (PAUSE) until the 16-bit word at `addr` equals `value`; after `spins` tries jumps to
/// `timeout` (clobbers EAX, ECX, RDI). PAUSE exits to the host under KVM-PVM (a few µs), so
/// 100_000 spins are a fraction of a second.
pub fn wait_u16(a: &mut CodeAssembler, addr: u64, value: u16, spins: u32, timeout: CodeLabel) {
    let mut again = a.create_label();
    let mut done = a.create_label();
    a.mov(rdi, addr).unwrap();
    a.mov(ecx, spins).unwrap();
    a.set_label(&mut again).unwrap();
    a.movzx(eax, word_ptr(rdi)).unwrap();
    a.cmp(eax, value as i32).unwrap();
    a.je(done).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(again).unwrap();
    a.jmp(timeout).unwrap();
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// Spins (PAUSE) until the byte at `addr` differs from `value`; after `spins` tries jumps to
/// `timeout` (clobbers EAX, ECX, RDI).
pub fn wait_u8_changes(
    a: &mut CodeAssembler,
    addr: u64,
    value: u8,
    spins: u32,
    timeout: CodeLabel,
) {
    let mut again = a.create_label();
    let mut done = a.create_label();
    a.mov(rdi, addr).unwrap();
    a.mov(ecx, spins).unwrap();
    a.set_label(&mut again).unwrap();
    a.movzx(eax, byte_ptr(rdi)).unwrap();
    a.cmp(eax, value as i32).unwrap();
    a.jne(done).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(again).unwrap();
    a.jmp(timeout).unwrap();
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

/// Spins `count` PAUSEs (clobbers ECX): time for an asynchronous notification to be served
/// when nothing observable is expected to change.
pub fn pause_loop(a: &mut CodeAssembler, count: u32) {
    let mut again = a.create_label();
    a.mov(ecx, count).unwrap();
    a.set_label(&mut again).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(again).unwrap();
}

/// A split virtqueue's three areas in guest memory (16-byte descriptors, the avail ring, the
/// used ring), written and read by the host test as the guest's driver would.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Ring {
    /// The three areas in consecutive 4 KiB pages from `base` (room for 256 entries each).
    pub fn at(base: u64) -> Ring {
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    /// Writes descriptor `i` of the table at `table` (the ring's own, or an indirect table).
    pub fn write_desc_at(
        mem: &GuestMemory,
        table: u64,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(table + 16 * u64::from(i)))
            .unwrap();
    }

    /// Writes descriptor `i` of this ring's table.
    pub fn desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        Ring::write_desc_at(mem, self.desc, i, addr, len, flags, next);
    }

    /// Puts `head` in avail ring slot `slot` (the index is left to the guest or `set_avail_idx`).
    pub fn offer(&self, mem: &GuestMemory, slot: u16, head: u16) {
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * u64::from(slot)))
            .unwrap();
    }

    /// Guest-physical address of the avail ring's index.
    pub fn avail_idx_addr(&self) -> u64 {
        self.avail + 2
    }

    /// Guest-physical address of the used ring's index.
    pub fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }

    /// The used ring's index as the device left it.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used_idx_addr())).unwrap()
    }

    /// Used ring element `slot`: (descriptor head, length written).
    pub fn used_elem(&self, mem: &GuestMemory, slot: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(slot);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// The VMM process's resident set size in KiB (from /proc/self/status), if it can be read.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}
