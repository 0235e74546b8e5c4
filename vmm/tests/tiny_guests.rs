//! Tiny guest programs run under /dev/kvm through the VMM's own API (and, for the PVH ELF, the
//! `fnvm-vmm` binary). Each guest is assembled here with iced-x86, so what it does is readable
//! next to what the test expects.
//!
//! Without /dev/kvm each test prints one loud line to stderr and returns.

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fnvm_vmm::arch::x86_64::boot::KernelConfig;
use fnvm_vmm::arch::x86_64::regs::EntryMode;
use fnvm_vmm::devices::BusDevice;
use fnvm_vmm::error::VmError;
use fnvm_vmm::exit::VmExit;
use fnvm_vmm::vmm::{Vm, VmConfig};
use iced_x86::code_asm::*;
use kvm_ioctls::IoEventAddress;

mod common;
use common::{kvm_available, loud_skip, Console};

const COM1: u16 = 0x3f8;
const I8042_COMMAND: u16 = 0x64;
const TEST_DEVICE: u64 = 0xe000_0000;
/// A hang guard, never a speed target (each wait ends when its condition holds): generous for a
/// loaded CI box and for the nested level's emulated CPU.
const TIMEOUT: Duration = Duration::from_secs(120);

fn config(vcpus: u8, irqchip: bool) -> (VmConfig, Console) {
    let console = Console::default();
    let mut c = VmConfig::new(32, vcpus);
    c.console = Box::new(console.clone());
    c.irqchip = irqchip;
    (c, console)
}

/// Writes each byte of `text` to COM1 (DX must hold COM1).
fn print(a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    for b in text.bytes() {
        a.mov(al, b as u32)?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Asks the i8042 for a CPU reset, then spins (the VMM ends the VM).
fn reset(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, I8042_COMMAND as u32)?;
    a.mov(al, 0xfe)?;
    a.out(dx, al)?;
    let mut spin = a.create_label();
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;
    Ok(())
}

/// Sleeps in HLT until an interrupt handler sets the byte at `flag` to 1. The flag is checked
/// with interrupts off and STI;HLT is atomic (STI's interrupt shadow), so an interrupt that
/// arrives before the HLT is never lost.
fn wait_for_flag(a: &mut CodeAssembler, flag: u64) {
    let mut check = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut check).unwrap();
    a.cli().unwrap();
    a.cmp(byte_ptr(flag), 1).unwrap();
    a.je(done).unwrap();
    a.sti().unwrap();
    a.hlt().unwrap();
    a.jmp(check).unwrap();
    a.set_label(&mut done).unwrap();
    a.nop().unwrap();
}

fn run(vm: Vm) -> VmExit {
    let mut vm = vm;
    vm.stop_after(TIMEOUT).unwrap();
    vm.run().expect("VM ran")
}

#[test]
fn real_mode_hello_then_i8042_reset_ends_cleanly() {
    if !kvm_available("real_mode_hello") {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "hello").unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x1000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    let exit = run(vm);
    assert_eq!(exit, VmExit::GuestReset);
    assert!(exit.is_clean());
    assert_eq!(console.text(), "hello");
}

/// Answers reads at offset 4 with a magic value and records writes.
#[derive(Default)]
struct TestDevice {
    writes: Vec<(u64, Vec<u8>)>,
    flag: Arc<AtomicBool>,
}

impl BusDevice for TestDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u32 = match offset {
            4 => 0xcafe_f00d,
            0x100 => self.flag.load(Ordering::SeqCst) as u32,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

#[test]
fn long_mode_guest_does_port_io_and_mmio() {
    if !kvm_available("long_mode_io") {
        return;
    }
    let mut a = CodeAssembler::new(64).unwrap();
    let mut fail = a.create_label();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "L").unwrap();
    a.mov(rax, TEST_DEVICE).unwrap();
    a.mov(dword_ptr(rax + 8), 0x1234_5678).unwrap();
    a.mov(ebx, dword_ptr(rax + 4)).unwrap();
    a.cmp(ebx, 0xcafe_f00du32 as i32).unwrap();
    a.jne(fail).unwrap();
    // Unmapped MMIO reads as all ones.
    a.mov(rax, TEST_DEVICE + 0x10_0000).unwrap();
    a.mov(ecx, dword_ptr(rax)).unwrap();
    a.cmp(ecx, -1).unwrap();
    a.jne(fail).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "K").unwrap();
    reset(&mut a).unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "F").unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    let dev = Arc::new(Mutex::new(TestDevice::default()));
    vm.add_mmio_device(TEST_DEVICE, 0x1000, dev.clone())
        .unwrap();
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    assert_eq!(run(vm), VmExit::GuestReset);
    assert_eq!(console.text(), "LK");
    assert_eq!(
        dev.lock().unwrap().writes,
        vec![(8, 0x1234_5678u32.to_le_bytes().to_vec())]
    );
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_available("triple_fault") {
        return;
    }
    // The boot IDT is empty: #UD cannot be delivered, nor #GP, nor #DF.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "T").unwrap();
    a.ud2().unwrap();
    let code = a.assemble(0x10_0000).unwrap();
    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    let exit = run(vm);
    assert_eq!(exit, VmExit::TripleFault { vcpu: 0 });
    assert_eq!(exit.exit_code(), fnvm_vmm::exit::code::TRIPLE_FAULT);
    assert_eq!(console.text(), "T");
}

#[test]
fn hlt_without_irqchip_ends_the_vm_as_halted() {
    if !kvm_available("hlt") {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "x").unwrap();
    a.cli().unwrap();
    a.hlt().unwrap();
    let code = a.assemble(0x1000).unwrap();
    let (c, console) = config(1, false);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    let exit = run(vm);
    assert_eq!(exit, VmExit::Halted { vcpu: 0 });
    assert_eq!(exit.exit_code(), fnvm_vmm::exit::code::HALTED);
    assert_eq!(console.text(), "x");
}

#[test]
fn irqfd_wakes_a_halted_guest_through_the_pic() {
    if !kvm_available("irqfd") {
        return;
    }
    const IRQ: u32 = 5;
    const VECTOR: u32 = 0x20 + IRQ;
    const HANDLER: u64 = 0x2000;
    const FLAG: u64 = 0x3000;
    let out = |a: &mut CodeAssembler, port: u32, value: u32| {
        a.mov(dx, port).unwrap();
        a.mov(al, value).unwrap();
        a.out(dx, al).unwrap();
    };

    // Interrupt handler: print 'I', set the flag, EOI the PIC.
    let mut h = CodeAssembler::new(16).unwrap();
    h.push(ax).unwrap();
    h.push(dx).unwrap();
    h.mov(dx, COM1 as u32).unwrap();
    print(&mut h, "I").unwrap();
    h.mov(byte_ptr(FLAG), 1).unwrap();
    out(&mut h, 0x20, 0x20);
    h.pop(dx).unwrap();
    h.pop(ax).unwrap();
    h.iret().unwrap();
    let handler = h.assemble(HANDLER).unwrap();

    // Main: IVT entry, PIC init (vectors 0x20-0x27, only IRQ 5 unmasked), 'R', wait in HLT.
    let mut a = CodeAssembler::new(16).unwrap();
    a.cli().unwrap();
    a.mov(word_ptr(VECTOR * 4), HANDLER as u32).unwrap();
    a.mov(word_ptr(VECTOR * 4 + 2), 0).unwrap();
    out(&mut a, 0x20, 0x11);
    out(&mut a, 0x21, 0x20);
    out(&mut a, 0x21, 0x04);
    out(&mut a, 0x21, 0x01);
    out(&mut a, 0x21, !(1u32 << IRQ) & 0xff);
    out(&mut a, 0xa1, 0xff);
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "R").unwrap();
    wait_for_flag(&mut a, FLAG);
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "D").unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x1000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    let line = vm.irq_line(IRQ).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    {
        use vm_memory::{Bytes, GuestAddress};
        vm.memory()
            .write_slice(&handler, GuestAddress(HANDLER))
            .unwrap();
    }
    let console2 = console.clone();
    let trigger = std::thread::spawn(move || {
        let deadline = Instant::now() + TIMEOUT;
        while !console2.text().contains('R') && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Give the guest time to reach HLT; the interrupt must wake it from there.
        std::thread::sleep(Duration::from_millis(20));
        line.write(1).unwrap();
    });
    let exit = run(vm);
    trigger.join().unwrap();
    assert_eq!(exit, VmExit::GuestReset);
    assert_eq!(console.text(), "RID");
}

#[test]
fn ioeventfd_write_is_signalled_without_a_vmm_exit() {
    if !kvm_available("ioeventfd") {
        return;
    }
    const NOTIFY: u64 = TEST_DEVICE + 0x50;
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rax, NOTIFY).unwrap();
    a.mov(dword_ptr(rax), 3).unwrap();
    // Wait until the host's handler ran (the test device reports it at offset 0x100).
    a.mov(rax, TEST_DEVICE + 0x100).unwrap();
    let mut wait = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.mov(ebx, dword_ptr(rax)).unwrap();
    a.test(ebx, ebx).unwrap();
    a.jz(wait).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "N").unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    let dev = Arc::new(Mutex::new(TestDevice {
        writes: Vec::new(),
        flag: flag.clone(),
    }));
    vm.add_mmio_device(TEST_DEVICE, 0x1000, dev.clone())
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let calls2 = calls.clone();
    vm.add_ioevent(
        IoEventAddress::Mmio(NOTIFY),
        Some(3),
        Box::new(move || {
            calls2.fetch_add(1, Ordering::SeqCst);
            flag.store(true, Ordering::SeqCst);
        }),
    )
    .unwrap();
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    assert_eq!(run(vm), VmExit::GuestReset);
    assert_eq!(console.text(), "N");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        dev.lock().unwrap().writes.is_empty(),
        "the notify write must not exit to the VMM's bus"
    );
}

#[test]
fn two_vcpus_both_run_with_their_own_apic_ids() {
    if !kvm_available("two_vcpus") {
        return;
    }
    // One host CPU is enough: vCPU 0's pause loop exits to KVM, and the scheduler runs vCPU 1
    // meanwhile (the nested level runs this pinned to one emulated CPU).
    const COUNTER: u64 = 0x3000;
    let mut a = CodeAssembler::new(64).unwrap();
    let mut boot_cpu = a.create_label();
    // APIC ID from CPUID leaf 1, EBX[31:24]; print '0' + id.
    a.mov(eax, 1).unwrap();
    a.cpuid().unwrap();
    a.shr(ebx, 24).unwrap();
    a.mov(eax, ebx).unwrap();
    a.add(eax, b'0' as i32).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.out(dx, al).unwrap();
    a.mov(rcx, COUNTER).unwrap();
    a.lock().inc(dword_ptr(rcx)).unwrap();
    a.test(ebx, ebx).unwrap();
    a.jz(boot_cpu).unwrap();
    let mut park = a.create_label();
    a.set_label(&mut park).unwrap();
    a.pause().unwrap();
    a.jmp(park).unwrap();
    // vCPU 0 waits for both increments, then resets.
    a.set_label(&mut boot_cpu).unwrap();
    a.pause().unwrap();
    a.cmp(dword_ptr(rcx), 2).unwrap();
    a.jne(boot_cpu).unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let (c, console) = config(2, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, true)
        .unwrap();
    assert_eq!(run(vm), VmExit::GuestReset);
    let mut ids: Vec<char> = console.text().chars().collect();
    ids.sort();
    assert_eq!(ids, vec!['0', '1']);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let (c, _) = config(0, true);
    let err = Vm::new(c).err().expect("0 vCPUs refused");
    assert!(matches!(err, VmError::NoVcpus), "{err}");
    assert!(err.to_string().contains("at least 1 vCPU"));

    let (c, _) = config(200, true);
    let err = Vm::new(c).err().expect("200 vCPUs refused");
    assert!(err.to_string().contains("vCPUs"), "{err}");

    let (mut c, _) = config(1, true);
    c.memory_mib = 0;
    let err = Vm::new(c).err().expect("0 MiB refused");
    assert!(err.to_string().contains("at least 1 MiB"), "{err}");

    let (mut c, _) = config(1, true);
    c.memory_mib = 1 << 40;
    let err = Vm::new(c).err().expect("1 EiB refused");
    assert!(err.to_string().contains("more than this host"), "{err}");

    if !kvm_available("bad_input (kernel part)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "this is not a kernel\n").unwrap();
    let (c, _) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    let err = vm
        .load_kernel(&KernelConfig {
            kernel: text.clone(),
            initrd: None,
            cmdline: String::new(),
        })
        .unwrap_err();
    assert!(err.to_string().contains("not a kernel"), "{err}");
    let (c, _) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    assert!(matches!(vm.run(), Err(VmError::NothingLoaded)));
}

/// An ELF64 image for a PVH guest: one PT_LOAD at 1 MiB holding everything, one PT_NOTE with
/// XEN_ELFNOTE_PHYS32_ENTRY, 32-bit code that prints and resets.
fn pvh_elf(message: &str) -> Vec<u8> {
    pvh_elf_with(message, true)
}

/// Like [`pvh_elf`], but the guest spins forever after printing.
fn pvh_elf_spinning(message: &str) -> Vec<u8> {
    pvh_elf_with(message, false)
}

fn pvh_elf_with(message: &str, then_reset: bool) -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let note_len = 12 + 4 + 4;
    let code_off = (note_off + note_len + 15) & !15;
    let entry = BASE + code_off as u64;

    let mut a = CodeAssembler::new(32).unwrap();
    let mut no_magic = a.create_label();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, message).unwrap();
    // EBX points at hvm_start_info, whose first field is its magic.
    a.cmp(dword_ptr(ebx), 0x336e_c578).unwrap();
    a.jne(no_magic).unwrap();
    print(&mut a, "M").unwrap();
    a.set_label(&mut no_magic).unwrap();
    if then_reset {
        reset(&mut a).unwrap();
    } else {
        // `no_magic` labels this PAUSE: spin on it.
        a.pause().unwrap();
        a.jmp(no_magic).unwrap();
    }
    let code = a.assemble(entry).unwrap();
    let total = code_off + code.len();

    let mut elf = vec![0u8; total];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&entry.to_le_bytes());
    elf[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    elf[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    elf[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    elf[56..58].copy_from_slice(&2u16.to_le_bytes());
    let phdr = |elf: &mut Vec<u8>, at: usize, kind: u32, off: u64, addr: u64, size: u64| {
        elf[at..at + 4].copy_from_slice(&kind.to_le_bytes());
        elf[at + 4..at + 8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        elf[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
        elf[at + 16..at + 24].copy_from_slice(&addr.to_le_bytes());
        elf[at + 24..at + 32].copy_from_slice(&addr.to_le_bytes());
        elf[at + 32..at + 40].copy_from_slice(&size.to_le_bytes());
        elf[at + 40..at + 48].copy_from_slice(&size.to_le_bytes());
        elf[at + 48..at + 56].copy_from_slice(&4u64.to_le_bytes());
    };
    phdr(&mut elf, EHDR, 1, 0, BASE, total as u64);
    phdr(
        &mut elf,
        EHDR + PHDR,
        4,
        note_off as u64,
        BASE + note_off as u64,
        note_len as u64,
    );
    let n = note_off;
    elf[n..n + 4].copy_from_slice(&4u32.to_le_bytes()); // namesz
    elf[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes()); // descsz
    elf[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    elf[n + 12..n + 16].copy_from_slice(b"Xen\0");
    elf[n + 16..n + 20].copy_from_slice(&(entry as u32).to_le_bytes());
    elf[code_off..].copy_from_slice(&code);
    elf
}

/// An i386 ELF32 PVH guest (how tiny PVH guests are often linked): same program as
/// [`pvh_elf`], with 32-bit headers.
fn pvh_elf32(message: &str) -> Vec<u8> {
    const BASE: u32 = 0x10_0000;
    const EHDR: usize = 52;
    const PHDR: usize = 32;
    let note_off = EHDR + 2 * PHDR;
    let note_len = 20;
    let code_off = (note_off + note_len + 15) & !15;
    let entry = BASE + code_off as u32;
    let mut a = CodeAssembler::new(32).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, message).unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(entry as u64).unwrap();
    // A bss of 8 KiB after the code, to check it is zeroed and in range.
    let total = code_off + code.len();
    let mut elf = vec![0u8; total];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 1; // 32-bit
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..28].copy_from_slice(&entry.to_le_bytes());
    elf[28..32].copy_from_slice(&(EHDR as u32).to_le_bytes());
    elf[40..42].copy_from_slice(&(EHDR as u16).to_le_bytes());
    elf[42..44].copy_from_slice(&(PHDR as u16).to_le_bytes());
    elf[44..46].copy_from_slice(&2u16.to_le_bytes());
    let phdr =
        |elf: &mut Vec<u8>, at: usize, kind: u32, off: u32, addr: u32, file: u32, mem: u32| {
            for (i, v) in [kind, off, addr, addr, file, mem, 5, 4].iter().enumerate() {
                elf[at + 4 * i..at + 4 * i + 4].copy_from_slice(&v.to_le_bytes());
            }
        };
    phdr(
        &mut elf,
        EHDR,
        1,
        0,
        BASE,
        total as u32,
        total as u32 + 8192,
    );
    let n = note_off;
    phdr(&mut elf, EHDR + PHDR, 4, n as u32, BASE + n as u32, 20, 20);
    elf[n..n + 4].copy_from_slice(&4u32.to_le_bytes());
    elf[n + 4..n + 8].copy_from_slice(&4u32.to_le_bytes());
    elf[n + 8..n + 12].copy_from_slice(&18u32.to_le_bytes());
    elf[n + 12..n + 16].copy_from_slice(b"Xen\0");
    elf[n + 16..n + 20].copy_from_slice(&entry.to_le_bytes());
    elf[code_off..].copy_from_slice(&code);
    elf
}

#[test]
fn elf32_pvh_guest_boots_through_the_api() {
    if !kvm_available("elf32_pvh") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny32.elf");
    std::fs::write(&kernel, pvh_elf32("32 ok")).unwrap();
    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    let entry = vm
        .load_kernel(&KernelConfig {
            kernel,
            initrd: None,
            cmdline: "console=ttyS0".into(),
        })
        .unwrap();
    assert_eq!(entry.mode, EntryMode::Protected32);
    assert_eq!(run(vm), VmExit::GuestReset);
    assert_eq!(console.text(), "32 ok");
}

#[test]
fn pvh_elf_boots_through_the_fnvm_vmm_process() {
    if !kvm_available("pvh_elf_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, pvh_elf("PVH ok\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "16"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "PVH ok\nM");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fnvm-vmm: guest reset (clean shutdown) after "),
        "{last}"
    );
}

#[test]
fn fnvm_vmm_refuses_bad_input_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("readme.txt");
    std::fs::write(&text, "not a kernel").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--kernel".into(), text.display().to_string()],
            "not a kernel",
        ),
        (
            vec!["--kernel".into(), "/nonexistent/vmlinux".into()],
            "/nonexistent/vmlinux",
        ),
        (vec![], "--kernel PATH is required"),
        (
            vec![
                "--kernel".into(),
                text.display().to_string(),
                "--vcpus".into(),
                "x".into(),
            ],
            "--vcpus",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(stderr.contains("fnvm-vmm: bad input"), "{stderr}");
    }
    if !kvm_available("fnvm_vmm bad memory/vcpus") {
        return;
    }
    let kernel = dir.path().join("tiny.elf");
    std::fs::write(&kernel, pvh_elf("x")).unwrap();
    for (flag, value, expected) in [
        ("--memory", "0", "at least 1 MiB"),
        ("--vcpus", "0", "at least 1 vCPU"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
            .arg("--kernel")
            .arg(&kernel)
            .args([flag, value])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn stdin_bytes_reach_the_guest_through_the_serial_port() {
    if !kvm_available("serial_input") {
        return;
    }
    // Echo every received byte until a newline, then reset.
    let mut a = CodeAssembler::new(16).unwrap();
    let mut poll = a.create_label();
    a.set_label(&mut poll).unwrap();
    a.mov(dx, (COM1 + 5) as u32).unwrap(); // line status register
    a.in_(al, dx).unwrap();
    a.test(al, 1).unwrap(); // data ready
    a.jz(poll).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.in_(al, dx).unwrap();
    a.out(dx, al).unwrap();
    a.cmp(al, b'\n' as i32).unwrap();
    a.jne(poll).unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x1000).unwrap();

    let mut fds = [0; 2];
    // SAFETY: pipe() fills the two-element array with fresh fds.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // More input than the 64-byte receive FIFO holds, to exercise the pause/resume path.
    let input: String = "x".repeat(200) + "done\n";
    // SAFETY: writes from a live buffer to the pipe's write end, then closes it.
    unsafe {
        assert_eq!(
            libc::write(fds[1], input.as_ptr().cast(), input.len()),
            input.len() as isize
        );
        libc::close(fds[1]);
    }
    let (mut c, console) = config(1, true);
    c.console_input = Some(fds[0]);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    assert_eq!(run(vm), VmExit::GuestReset);
    // SAFETY: the VM has ended; nothing else uses the read end.
    unsafe { libc::close(fds[0]) };
    assert_eq!(console.text(), input);
}

#[test]
fn panic_banner_then_reset_is_reported_as_a_guest_panic() {
    if !kvm_available("panic_then_reset") {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(
        &mut a,
        "[    0.5] Kernel panic - not syncing: VFS: Unable to mount root fs\n",
    )
    .unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x1000).unwrap();
    let (c, _) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    let exit = run(vm);
    assert_eq!(
        exit,
        VmExit::GuestPanic {
            message: "Kernel panic - not syncing: VFS: Unable to mount root fs".into()
        }
    );
    assert_eq!(exit.exit_code(), fnvm_vmm::exit::code::GUEST_PANIC);
}

#[test]
fn panic_without_reset_still_ends_the_vm() {
    if !kvm_available("panic_without_reset") {
        return;
    }
    // panic=0 style: the guest prints the banner and spins forever.
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(
        &mut a,
        "Kernel panic - not syncing: Attempted to kill init!\n",
    )
    .unwrap();
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
    let code = a.assemble(0x1000).unwrap();
    let (c, _) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    let started = Instant::now();
    let exit = run(vm);
    assert!(matches!(exit, VmExit::GuestPanic { ref message } if message.contains("kill init")));
    assert!(
        started.elapsed() < TIMEOUT,
        "ended by the panic timer, not the test timeout"
    );
}

#[test]
fn virtio_disk_is_visible_on_its_mmio_window() {
    if !kvm_available("virtio_mmio_window") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();

    let mut a = CodeAssembler::new(64).unwrap();
    let mut fail = a.create_label();
    a.mov(rax, 0xd000_0000u64).unwrap();
    a.mov(ebx, dword_ptr(rax)).unwrap(); // MagicValue
    a.cmp(ebx, 0x7472_6976).unwrap(); // "virt"
    a.jne(fail).unwrap();
    a.mov(ebx, dword_ptr(rax + 8)).unwrap(); // DeviceID
    a.cmp(ebx, 2).unwrap(); // block
    a.jne(fail).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "V").unwrap();
    reset(&mut a).unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "F").unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    let slot = vm.add_disk(&disk, true).unwrap();
    assert_eq!((slot.base, slot.irq), (0xd000_0000, 5));
    assert_eq!(vm.virtio_cmdline(), "virtio_mmio.device=4K@0xd0000000:5");
    let missing = vm.add_disk(&dir.path().join("absent.img"), false);
    assert!(missing.is_err());
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    assert_eq!(run(vm), VmExit::GuestReset);
    assert_eq!(console.text(), "V");
}

#[test]
fn vcpu_state_is_plain_serde_data() {
    if !kvm_available("vcpu_state") {
        return;
    }
    let (c, _) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&[0xf4], 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    let state = vm.vcpus()[0].save_state().unwrap();
    assert_eq!(state.regs.rip, 0x10_0000);
    assert_ne!(state.sregs.efer & 0x500, 0, "long mode active");
    let json = serde_json::to_string(&state).unwrap();
    let back: fnvm_vmm::vstate::vcpu::state::VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back.regs.rip, state.regs.rip);
    assert_eq!(back.msrs, state.msrs);
}

#[test]
fn sigterm_stops_fnvm_vmm_with_its_own_exit_code() {
    if !kvm_available("sigterm") {
        return;
    }
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("spin.elf");
    std::fs::write(&kernel, pvh_elf_spinning("S")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "16"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"S");
    // SAFETY: signals our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(fnvm_vmm::exit::code::STOPPED as i32),
        "{stderr}"
    );
    assert!(
        stderr.contains("fnvm-vmm: stopped by the host after "),
        "{stderr}"
    );
}

#[test]
fn guest_reads_a_virtio_blk_sector_through_ioeventfd_and_interrupt() {
    if !kvm_available("virtio_blk_read") {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    const MMIO: u64 = 0xd000_0000;
    const DESC: u64 = 0x20_0000;
    const AVAIL: u64 = 0x20_1000;
    const USED: u64 = 0x20_2000;
    const HEADER: u64 = 0x20_3000;
    const DATA: u64 = 0x20_4000;
    const STATUS: u64 = 0x20_5000;
    const VRING_DESC_F_NEXT: u16 = 1;
    const VRING_DESC_F_WRITE: u16 = 2;

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut content = vec![0u8; 4096];
    for (i, b) in content[512..1024].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    std::fs::write(&disk, &content).unwrap();

    // The driver side, as Linux's virtio-mmio driver does it: reset, ACKNOWLEDGE, DRIVER,
    // VERSION_1 only, FEATURES_OK, queue 0 (8 entries) at DESC/AVAIL/USED, DRIVER_OK, then
    // QueueNotify (an ioeventfd write) and poll the used ring.
    let mut a = CodeAssembler::new(64).unwrap();
    let mut fail = a.create_label();
    a.mov(rsi, MMIO).unwrap();
    let reg = |a: &mut CodeAssembler, off: u64, value: u32| {
        a.mov(dword_ptr(rsi + off as i32), value).unwrap();
    };
    reg(&mut a, 0x70, 0);
    reg(&mut a, 0x70, 1);
    reg(&mut a, 0x70, 3);
    reg(&mut a, 0x24, 1);
    reg(&mut a, 0x20, 1); // feature bit 32: VERSION_1
    reg(&mut a, 0x24, 0);
    reg(&mut a, 0x20, 0);
    reg(&mut a, 0x70, 0xb);
    a.mov(eax, dword_ptr(rsi + 0x70)).unwrap();
    a.test(eax, 8).unwrap(); // FEATURES_OK accepted
    a.jz(fail).unwrap();
    reg(&mut a, 0x30, 0);
    reg(&mut a, 0x38, 8);
    reg(&mut a, 0x80, DESC as u32);
    reg(&mut a, 0x84, 0);
    reg(&mut a, 0x90, AVAIL as u32);
    reg(&mut a, 0x94, 0);
    reg(&mut a, 0xa0, USED as u32);
    reg(&mut a, 0xa4, 0);
    reg(&mut a, 0x44, 1);
    reg(&mut a, 0x70, 0xf);
    reg(&mut a, 0x50, 0); // QueueNotify(0)
    a.mov(rdi, USED + 2).unwrap();
    let mut wait = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.pause().unwrap();
    a.movzx(eax, word_ptr(rdi)).unwrap();
    a.cmp(eax, 1).unwrap();
    a.jne(wait).unwrap();
    a.mov(eax, dword_ptr(rsi + 0x60)).unwrap(); // InterruptStatus
    a.test(eax, 1).unwrap(); // used buffer notification raised
    a.jz(fail).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "B").unwrap();
    reset(&mut a).unwrap();
    a.set_label(&mut fail).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "F").unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.add_disk(&disk, true).unwrap();
    let mem = vm.memory().clone();
    // Request: read sector 1 into DATA.
    let mut header = [0u8; 16];
    header[8..16].copy_from_slice(&1u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, GuestAddress(DESC + 16 * i)).unwrap();
    };
    desc(0, HEADER, 16, VRING_DESC_F_NEXT, 1);
    desc(1, DATA, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
    desc(2, STATUS, 1, VRING_DESC_F_WRITE, 0);
    mem.write_obj(0u16, GuestAddress(AVAIL)).unwrap();
    mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap(); // ring[0] = head 0
    mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap(); // idx = 1
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    assert_eq!(run(vm), VmExit::GuestReset);
    assert_eq!(console.text(), "B");
    let mut data = vec![0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, content[512..1024]);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0,
        "VIRTIO_BLK_S_OK"
    );
}

#[test]
fn instruction_kvm_cannot_emulate_is_an_internal_error() {
    if !kvm_available("internal_error") {
        return;
    }
    // CMPXCHG16B on MMIO must be emulated by KVM, whose emulator refuses 16-byte compares:
    // KVM_EXIT_INTERNAL_ERROR (emulation failure), on hardware KVM and KVM-PVM alike.
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "E").unwrap();
    a.mov(rsi, TEST_DEVICE).unwrap();
    a.lock().cmpxchg16b(xmmword_ptr(rsi)).unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x10_0000).unwrap();
    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    let exit = run(vm);
    assert!(
        matches!(
            exit,
            VmExit::InternalError {
                vcpu: 0,
                suberror: 1,
                ..
            }
        ),
        "{exit:?}"
    );
    assert_eq!(exit.exit_code(), fnvm_vmm::exit::code::INTERNAL_ERROR);
    assert_eq!(console.text(), "E");
}

#[test]
fn serial_transmit_interrupt_reaches_the_guest_through_its_irqfd() {
    if !kvm_available("serial_irq") {
        return;
    }
    const VECTOR: u32 = 0x20 + 4; // COM1 is IRQ 4
    const HANDLER: u64 = 0x2000;
    const FLAG: u64 = 0x3000;
    let out = |a: &mut CodeAssembler, port: u32, value: u32| {
        a.mov(dx, port).unwrap();
        a.mov(al, value).unwrap();
        a.out(dx, al).unwrap();
    };
    // Handler: read IIR (acknowledges the THR-empty interrupt), count, EOI.
    let mut h = CodeAssembler::new(16).unwrap();
    h.push(ax).unwrap();
    h.push(dx).unwrap();
    h.mov(dx, (COM1 + 2) as u32).unwrap();
    h.in_(al, dx).unwrap();
    h.mov(byte_ptr(FLAG + 1), al).unwrap();
    h.mov(byte_ptr(FLAG), 1).unwrap();
    out(&mut h, 0x20, 0x20);
    h.pop(dx).unwrap();
    h.pop(ax).unwrap();
    h.iret().unwrap();
    let handler = h.assemble(HANDLER).unwrap();

    let mut a = CodeAssembler::new(16).unwrap();
    a.cli().unwrap();
    a.mov(word_ptr(VECTOR * 4), HANDLER as u32).unwrap();
    a.mov(word_ptr(VECTOR * 4 + 2), 0).unwrap();
    out(&mut a, 0x20, 0x11);
    out(&mut a, 0x21, 0x20);
    out(&mut a, 0x21, 0x04);
    out(&mut a, 0x21, 0x01);
    out(&mut a, 0x21, !(1u32 << 4) & 0xff);
    out(&mut a, 0xa1, 0xff);
    // Enable the THR-empty interrupt: the UART is idle, so it fires at once.
    out(&mut a, (COM1 + 1) as u32, 0x02);
    wait_for_flag(&mut a, FLAG);
    out(&mut a, (COM1 + 1) as u32, 0x00);
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "S").unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x1000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    let mem = vm.memory().clone();
    {
        use vm_memory::{Bytes, GuestAddress};
        mem.write_slice(&handler, GuestAddress(HANDLER)).unwrap();
    }
    assert_eq!(run(vm), VmExit::GuestReset);
    assert_eq!(console.text(), "S");
    use vm_memory::{Bytes, GuestAddress};
    let iir: u8 = mem.read_obj(GuestAddress(FLAG + 1)).unwrap();
    assert_eq!(iir & 0x0f, 0x02, "IIR said THR empty");
}

/// Panics on any access: stands for a device-model bug.
struct PanickingDevice;

impl BusDevice for PanickingDevice {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {
        panic!("device model bug");
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        panic!("device model bug");
    }
}

#[test]
fn a_panicking_device_ends_the_vm_with_an_error_instead_of_hanging() {
    if !kvm_available("device_panic") {
        return;
    }
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, 0x510u32).unwrap();
    a.in_(al, dx).unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x1000).unwrap();
    let (c, _) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.add_pio_device(0x510, 1, Arc::new(Mutex::new(PanickingDevice)))
        .unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    let exit = run(vm);
    assert!(
        matches!(&exit, VmExit::VcpuError { vcpu: 0, error } if error.contains("device model bug")),
        "{exit:?}"
    );
}

/// A stock Linux guest: boots to the point of mounting its root, finds none, panics, and the
/// VMM reports the panic by name. Needs VMX/SVM (under KVM-PVM Linux guests do not run) and a
/// kernel in FNVM_TEST_KERNEL (e.g. the vmlinux fnvm builds).
#[test]
fn linux_guest_without_root_panics_and_the_vmm_names_it() {
    let caps = fnvm_vmm::host::HostCapabilities::probe();
    if !caps.kvm || !caps.hardware_virtualization {
        loud_skip(
            "linux_guest: this host has no /dev/kvm with VMX/SVM; Linux guest boot NOT tested",
        );
        return;
    }
    let Some(kernel) = std::env::var_os("FNVM_TEST_KERNEL") else {
        loud_skip(
            "linux_guest: set FNVM_TEST_KERNEL to a vmlinux/bzImage; Linux guest boot NOT tested",
        );
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .arg("--kernel")
        .arg(kernel)
        .args(["--memory", "256", "--vcpus", "2"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(console.contains("Linux version"), "{console}");
    assert_eq!(
        out.status.code(),
        Some(fnvm_vmm::exit::code::GUEST_PANIC as i32),
        "{stderr}"
    );
    assert!(
        stderr.contains("guest kernel panic: Kernel panic - not syncing"),
        "{stderr}"
    );
}

#[test]
fn disk_and_vsock_get_their_own_windows_irqs_and_cmdline_entries() {
    if !kvm_available("virtio_windows") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 4096]).unwrap();
    let sock = dir.path().join("vsock.sock");

    // Print the device IDs of the first two windows as letters ('A' + id).
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    for window in [0xd000_0000u64, 0xd000_1000] {
        a.mov(rsi, window).unwrap();
        a.mov(eax, dword_ptr(rsi + 8)).unwrap();
        a.add(eax, b'A' as i32).unwrap();
        a.out(dx, al).unwrap();
    }
    reset(&mut a).unwrap();
    let code = a.assemble(0x10_0000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.add_disk(&disk, false).unwrap();
    let slot = vm.add_vsock(3, &sock).unwrap();
    assert_eq!((slot.base, slot.irq), (0xd000_1000, 6));
    drop(slot); // the slot shares the device; the VM must be its last owner
    assert!(sock.exists(), "vsock socket bound");
    assert_eq!(
        vm.virtio_cmdline(),
        "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
    );
    assert!(
        vm.add_vsock(3, &sock).is_err(),
        "a second device on the same socket path is refused"
    );
    vm.load_program(&code, 0x10_0000, EntryMode::Long64, false)
        .unwrap();
    let exit = run(vm);
    assert_eq!(exit, VmExit::GuestReset);
    // Block is device 2 ('C'), vsock 19 ('T').
    assert_eq!(console.text(), "CT");
    assert!(!sock.exists(), "vsock socket removed with the VM");
}

/// Answers each byte read with the next value of a counter.
#[derive(Default)]
struct CountingPort(u8);

impl BusDevice for CountingPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        for b in data {
            self.0 += 1;
            *b = self.0;
        }
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[test]
fn string_port_io_reaches_devices_one_element_at_a_time() {
    if !kvm_available("string_io") {
        return;
    }
    const MSG: u64 = 0x3000;
    const BUF: u64 = 0x3100;
    let text = b"rep outsb works";
    let mut a = CodeAssembler::new(16).unwrap();
    a.cld().unwrap();
    a.mov(si, MSG as u32).unwrap();
    a.mov(cx, text.len() as u32).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    a.rep().outsb().unwrap();
    a.mov(di, BUF as u32).unwrap();
    a.mov(cx, 3u32).unwrap();
    a.mov(dx, 0x510u32).unwrap();
    a.rep().insb().unwrap();
    reset(&mut a).unwrap();
    let code = a.assemble(0x1000).unwrap();

    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.add_pio_device(0x510, 1, Arc::new(Mutex::new(CountingPort::default())))
        .unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    use vm_memory::{Bytes, GuestAddress};
    let mem = vm.memory().clone();
    mem.write_slice(text, GuestAddress(MSG)).unwrap();
    assert_eq!(run(vm), VmExit::GuestReset);
    assert_eq!(console.text().as_bytes(), text);
    let mut buf = [0u8; 3];
    mem.read_slice(&mut buf, GuestAddress(BUF)).unwrap();
    assert_eq!(buf, [1, 2, 3]);
}

#[test]
fn guest_power_off_ends_the_vm_cleanly_even_though_the_cpu_halts_forever() {
    if !kvm_available("power_off") {
        return;
    }
    // What Linux does on poweroff without ACPI: announce it, then halt with interrupts off
    // (with an in-kernel irqchip that HLT never returns).
    let mut a = CodeAssembler::new(16).unwrap();
    a.mov(dx, COM1 as u32).unwrap();
    print(&mut a, "[    3.2] reboot: Power down\r\n").unwrap();
    a.cli().unwrap();
    let mut halt = a.create_label();
    a.set_label(&mut halt).unwrap();
    a.hlt().unwrap();
    a.jmp(halt).unwrap();
    let code = a.assemble(0x1000).unwrap();
    let (c, console) = config(1, true);
    let mut vm = Vm::new(c).unwrap();
    vm.load_program(&code, 0x1000, EntryMode::Real, false)
        .unwrap();
    let exit = run(vm);
    assert_eq!(exit, VmExit::GuestShutdown);
    assert_eq!(exit.exit_code(), 0);
    assert!(console.text().contains("Power down"));
}
