//! Snapshot and restore with tiny guests under /dev/kvm, through the `fnvm-vmm` binary: a guest
//! that keeps counting (in a register, in memory and in a second register), prints the counter on
//! COM1, writes it to a virtio-blk disk and checks 4 MiB of memory it filled at start is
//! snapshotted mid-run through the API socket and restored in new `fnvm-vmm` processes; and a
//! guest with a virtio-vsock driver whose live host stream is reset by a restore (the guest
//! sees TRANSPORT_RESET) while a new host connection reaches it again; and a VM with a
//! virtio-net device whose snapshot keeps its MAC and place and whose restores (`--restore
//! --net`, a standby's `"net"`) connect to a new passt.
//!
//! Without /dev/kvm each test prints one loud line to stderr and returns.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;

const COM1: u32 = 0x3f8;
const BASE: u64 = 0x10_0000;
const MMIO: u64 = 0xd000_0000;
const DESC: u64 = 0x20_0000;
const AVAIL: u64 = 0x20_1000;
const USED: u64 = 0x20_2000;
const HEADER: u64 = 0x20_3000;
const DATA: u64 = 0x20_4000;
const STATUS: u64 = 0x20_5000;
const COUNTER: u64 = 0x20_6000;
const PATTERN_START: u64 = 0x100_0000;
const PATTERN_END: u64 = 0x140_0000;
const PATTERN_KEY: u64 = 0x5eed_f00d_dead_beef;
const SECTORS: u64 = 64;
/// A hang guard, never a speed target: each wait ends as soon as its condition holds. Generous
/// because a loaded 2-core CI box, or the nested level's emulated CPU, can stall a guest, a
/// snapshot write or a restore for many seconds (30 s once ran out for the standby restore).
const TIMEOUT: Duration = Duration::from_secs(180);

fn loud_skip(message: &str) {
    let _ = writeln!(io::stderr(), "!!! SKIPPED {message} !!!");
}

fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    loud_skip(&format!(
        "{test}: /dev/kvm is missing, this snapshot test did NOT run"
    ));
    false
}

fn print_byte(a: &mut CodeAssembler, b: u8) {
    a.mov(dx, COM1).unwrap();
    a.mov(al, b as u32).unwrap();
    a.out(dx, al).unwrap();
}

/// The counting guest (64-bit code, entered in long mode with the VMM's identity map).
fn counting_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut bad = a.create_label();
    let mut main_loop = a.create_label();
    // Fill the pattern region: qword at address A holds A ^ KEY.
    a.mov(r15, PATTERN_KEY).unwrap();
    a.mov(rdi, PATTERN_START).unwrap();
    let mut fill = a.create_label();
    a.set_label(&mut fill).unwrap();
    a.mov(rax, rdi).unwrap();
    a.xor(rax, r15).unwrap();
    a.mov(qword_ptr(rdi), rax).unwrap();
    a.add(rdi, 8).unwrap();
    a.mov(rcx, PATTERN_END).unwrap();
    a.cmp(rdi, rcx).unwrap();
    a.jb(fill).unwrap();

    // virtio-blk driver set-up: reset, ACK, DRIVER, VERSION_1, FEATURES_OK, queue 0 (8), OK.
    a.mov(rsi, MMIO).unwrap();
    let reg = |a: &mut CodeAssembler, off: i32, value: u32| {
        a.mov(dword_ptr(rsi + off), value).unwrap();
    };
    reg(&mut a, 0x70, 0);
    reg(&mut a, 0x70, 1);
    reg(&mut a, 0x70, 3);
    reg(&mut a, 0x24, 1);
    reg(&mut a, 0x20, 1);
    reg(&mut a, 0x24, 0);
    reg(&mut a, 0x20, 0);
    reg(&mut a, 0x70, 0xb);
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
    // Descriptors: header (device reads) -> data (device reads) -> status (device writes).
    let desc = |a: &mut CodeAssembler, i: u64, addr: u64, len: u32, flags: u32, next: u32| {
        a.mov(rax, addr).unwrap();
        a.mov(qword_ptr(DESC + 16 * i), rax).unwrap();
        a.mov(dword_ptr(DESC + 16 * i + 8), len).unwrap();
        a.mov(word_ptr(DESC + 16 * i + 12), flags).unwrap();
        a.mov(word_ptr(DESC + 16 * i + 14), next).unwrap();
    };
    desc(&mut a, 0, HEADER, 16, 1, 1);
    desc(&mut a, 1, DATA, 512, 1, 2);
    desc(&mut a, 2, STATUS, 1, 2, 0);
    a.mov(dword_ptr(HEADER), 1u32).unwrap(); // VIRTIO_BLK_T_OUT
    a.xor(r12, r12).unwrap(); // counter (register)
    a.xor(r13, r13).unwrap(); // avail index
    a.mov(qword_ptr(COUNTER), 0).unwrap(); // counter (memory)
    a.mov(r14, 0x1000_0000u64).unwrap(); // counter (a second register, offset)

    a.set_label(&mut main_loop).unwrap();
    a.inc(r12).unwrap();
    a.inc(qword_ptr(COUNTER)).unwrap();
    a.inc(r14).unwrap();
    a.cmp(r12, qword_ptr(COUNTER)).unwrap();
    a.jne(bad).unwrap();
    a.lea(rax, qword_ptr(r12 + 0x1000_0000)).unwrap();
    a.cmp(rax, r14).unwrap();
    a.jne(bad).unwrap();
    // Check 16 pages of the pattern, rotating through all 4 MiB.
    a.mov(rax, r12).unwrap();
    a.and(rax, 63).unwrap();
    a.shl(rax, 16).unwrap(); // * 64 KiB
    a.mov(rdi, PATTERN_START).unwrap();
    a.add(rdi, rax).unwrap();
    a.lea(rcx, qword_ptr(rdi + 0x1_0000)).unwrap();
    let mut check = a.create_label();
    a.set_label(&mut check).unwrap();
    a.mov(rax, rdi).unwrap();
    a.xor(rax, r15).unwrap();
    a.cmp(rax, qword_ptr(rdi)).unwrap();
    a.jne(bad).unwrap();
    a.add(rdi, 8).unwrap();
    a.cmp(rdi, rcx).unwrap();
    a.jb(check).unwrap();
    // Print "C<16 hex digits>\n".
    print_byte(&mut a, b'C');
    a.mov(rbx, r12).unwrap();
    a.mov(r8d, 16).unwrap();
    let mut digit = a.create_label();
    let mut letter = a.create_label();
    let mut emit = a.create_label();
    a.set_label(&mut digit).unwrap();
    a.rol(rbx, 4).unwrap();
    a.mov(eax, ebx).unwrap();
    a.and(eax, 0xf).unwrap();
    a.cmp(eax, 10).unwrap();
    a.jae(letter).unwrap();
    a.add(eax, b'0' as i32).unwrap();
    a.jmp(emit).unwrap();
    a.set_label(&mut letter).unwrap();
    a.add(eax, (b'a' - 10) as i32).unwrap();
    a.set_label(&mut emit).unwrap();
    a.mov(dx, COM1).unwrap();
    a.out(dx, al).unwrap();
    a.dec(r8d).unwrap();
    a.jnz(digit).unwrap();
    print_byte(&mut a, b'\n');
    // Write the counter to sector (counter % 64) and wait for the device.
    a.mov(rax, r12).unwrap();
    a.and(rax, (SECTORS - 1) as i32).unwrap();
    a.mov(qword_ptr(HEADER + 8), rax).unwrap();
    a.mov(qword_ptr(DATA), r12).unwrap();
    a.mov(byte_ptr(STATUS), 0xff).unwrap();
    a.mov(eax, r13d).unwrap();
    a.and(eax, 7).unwrap();
    a.mov(word_ptr(rax * 2 + (AVAIL + 4)), 0).unwrap();
    a.inc(r13d).unwrap();
    a.mov(word_ptr(AVAIL + 2), r13w).unwrap();
    a.mov(dword_ptr(rsi + 0x50), 0).unwrap(); // QueueNotify(0)
    a.mov(ecx, 50_000_000).unwrap();
    let mut wait = a.create_label();
    let mut done = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.movzx(eax, word_ptr(USED + 2)).unwrap();
    a.cmp(ax, r13w).unwrap();
    a.je(done).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(wait).unwrap();
    print_byte(&mut a, b'T');
    a.jmp(bad).unwrap();
    a.set_label(&mut done).unwrap();
    a.cmp(byte_ptr(STATUS), 0).unwrap();
    a.jne(bad).unwrap();
    // A short pause between lines.
    a.mov(ecx, 2000).unwrap();
    let mut delay = a.create_label();
    a.set_label(&mut delay).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(delay).unwrap();
    a.jmp(main_loop).unwrap();

    a.set_label(&mut bad).unwrap();
    for b in b"BAD\n" {
        print_byte(&mut a, *b);
    }
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
    a.assemble(BASE + 0x78).unwrap()
}

use fnvm_vmm::tiny_guest::elf64;

/// A running `fnvm-vmm` whose stdout is collected in the background.
struct Vmm {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Vmm {
    fn spawn(args: &[&std::ffi::OsStr]) -> Vmm {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Vmm {
            child,
            out,
            reader: Some(reader),
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// Waits until the console shows `n` complete lines (panics with the output otherwise).
    fn wait_lines(&mut self, n: usize) {
        self.wait_lines_for(n, TIMEOUT)
    }

    fn wait_lines_for(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            assert!(!text.contains("BAD"), "guest detected a fault:\n{text}");
            if text.matches('\n').count() >= n {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut err = String::new();
                let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("fnvm-vmm ended ({status}): {err}\nconsole:\n{text}");
            }
            assert!(Instant::now() < deadline, "timed out; console:\n{text}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then the console and stderr.
    fn stop(mut self) -> (String, String) {
        // SAFETY: signals our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        (self.text(), err)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn api(sock: &Path, request: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    s.write_all(b"\n").unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?}: {e}"))
}

fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while UnixStream::connect(path).is_err() {
        assert!(Instant::now() < deadline, "API socket never came up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The counter values of the complete lines of `text`.
fn counters(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            let hex = l
                .trim_end()
                .strip_prefix('C')
                .unwrap_or_else(|| panic!("line {l:?}"));
            u64::from_str_radix(hex, 16).unwrap_or_else(|_| panic!("line {l:?}"))
        })
        .collect()
}

fn assert_consecutive(values: &[u64], from: u64) {
    for (i, v) in values.iter().enumerate() {
        assert_eq!(*v, from + i as u64, "gap or repeat at line {i}: {values:?}");
    }
}

fn disk_counters(path: &Path) -> Vec<u64> {
    let disk = std::fs::read(path).unwrap();
    (0..SECTORS as usize)
        .map(|s| u64::from_le_bytes(disk[s * 512..s * 512 + 8].try_into().unwrap()))
        .collect()
}

struct Snapshotted {
    dir: tempfile::TempDir,
    snap: PathBuf,
    /// The console up to the pause (may end mid-line).
    before: String,
}

/// Boots the counting guest, lets it run, pauses and snapshots it, checks it resumes, stops it.
fn boot_and_snapshot(memory_mib: &str) -> Snapshotted {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("count.elf");
    std::fs::write(&kernel, elf64(&counting_guest())).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("api.sock");
    let mut vm = Vmm::spawn(&[
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--memory".as_ref(),
        memory_mib.as_ref(),
        "--disk".as_ref(),
        disk.as_os_str(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
    ]);
    wait_for_socket(&sock);
    vm.wait_lines(30);
    let r = api(&sock, r#"{"op":"pause"}"#);
    assert_eq!(r["ok"], true, "{r}");
    // Paused: the console stops growing.
    std::thread::sleep(Duration::from_millis(100));
    let before = vm.text();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(vm.text(), before, "console moved while paused");
    let snap = dir.path().join("snap");
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"snapshot","dir":{:?}}}"#,
            snap.display().to_string()
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["snapshot_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(api(&sock, r#"{"op":"metrics"}"#)["paused"], true);
    let r = api(&sock, r#"{"op":"resume"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let lines = before.matches('\n').count();
    vm.wait_lines(lines + 10);
    let (text, _) = vm.stop();
    let all = counters(&text);
    assert_consecutive(&all, 1);
    let bad = api_refuses_garbage(&sock);
    assert!(bad, "API socket should be gone after exit");
    Snapshotted { dir, snap, before }
}

fn api_refuses_garbage(sock: &Path) -> bool {
    UnixStream::connect(sock).is_err()
}

fn restore(s: &Snapshotted, name: &str) -> (Vmm, PathBuf) {
    let copy = s.dir.path().join(format!("{name}.img"));
    fnvm_vmm::sparse_copy::copy_sparse(&s.snap.join("disk-0.img"), &copy).unwrap();
    let vm = Vmm::spawn(&[
        "--restore".as_ref(),
        s.snap.as_os_str(),
        "--disk".as_ref(),
        copy.as_os_str(),
    ]);
    (vm, copy)
}

#[test]
fn counting_guest_continues_exactly_where_it_was_snapshotted() {
    if !kvm_available("snapshot_continue") {
        return;
    }
    let s = boot_and_snapshot("64");
    let snapshot_disk = disk_counters(&s.snap.join("disk-0.img"));
    let at_pause = counters(&s.before).last().copied().unwrap();

    let (mut vm, copy) = restore(&s, "restored");
    let lines_before = s.before.matches('\n').count();
    vm.wait_lines(60);
    let (after, stderr) = vm.stop();
    // The console before the pause plus the restored console is one unbroken sequence
    // (the pause may have cut a line in the middle: the restored guest finishes it).
    let joined = format!("{}{}", s.before, after);
    let values = counters(&joined);
    assert_consecutive(&values, 1);
    assert!(values.len() >= lines_before + 60, "{joined}");
    assert!(
        stderr.contains("fnvm-vmm: restored, resumed at") && stderr.contains("page faults"),
        "{stderr}"
    );

    // Every sector holds a counter that belongs there; the restored guest's writes went to
    // its own copy and went on past the snapshot; the snapshot's disk is untouched.
    let restored_disk = disk_counters(&copy);
    for (sector, v) in restored_disk.iter().enumerate() {
        assert_eq!(v % SECTORS, sector as u64, "sector {sector}: {v}");
    }
    assert!(*restored_disk.iter().max().unwrap() > at_pause + 30);
    assert_eq!(disk_counters(&s.snap.join("disk-0.img")), snapshot_disk);
    assert!(*snapshot_disk.iter().max().unwrap() <= at_pause + 1);
}

fn smaps_rollup(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap()
    };
    (field("Rss:"), field("Pss:"))
}

#[test]
fn twenty_restores_of_one_snapshot_run_at_once_and_share_its_memory() {
    if !kvm_available("snapshot_twenty") {
        return;
    }
    let s = boot_and_snapshot("64");
    let start_lines = s.before.matches('\n').count();
    let mut vms: Vec<Vmm> = (0..20).map(|i| restore(&s, &format!("r{i}")).0).collect();
    // 66 lines: the guest has re-read all 4 MiB of its pattern from the snapshot. Twenty
    // guests share two (busy) cores here, hence the generous time limit.
    for vm in &mut vms {
        vm.wait_lines_for(66, Duration::from_secs(180));
    }
    let mut rss_total = 0;
    let mut pss_total = 0;
    for vm in &vms {
        let (rss, pss) = smaps_rollup(vm.child.id());
        assert!(rss > 4 * 1024, "RSS {rss} KiB: the pattern is not mapped?");
        rss_total += rss;
        pss_total += pss;
    }
    eprintln!("20 restores: RSS {rss_total} KiB, PSS {pss_total} KiB in total");
    assert!(
        pss_total * 2 < rss_total,
        "snapshot pages are not shared: PSS {pss_total} KiB vs RSS {rss_total} KiB"
    );
    for vm in vms {
        let (after, _) = vm.stop();
        let values = counters(&format!("{}{}", s.before, after));
        assert_consecutive(&values, 1);
        assert!(values.len() >= start_lines + 60);
    }
}

fn restore_fails(snap: &Path, dir: &Path) -> String {
    let copy = dir.join("fail-copy.img");
    let _ = std::fs::remove_file(&copy);
    std::fs::File::create(&copy)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .arg("--restore")
        .arg(snap)
        .arg("--disk")
        .arg(&copy)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty(), "a refused snapshot ran the guest");
    stderr
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn a_memory_file_written_in_another_boot_is_checked_in_full_before_its_stamp_is_trusted() {
    if !kvm_available("snapshot_boot_id") {
        return;
    }
    use fnvm_vmm::snapshot::{format, VERIFIED_FILE};
    let s = boot_and_snapshot("32");
    // Written in this boot, untouched: the stamp is trusted, nothing is re-read.
    let (mut vm, _) = restore(&s, "same-boot");
    vm.wait_lines(2);
    drop(vm);
    assert!(!s.snap.join(VERIFIED_FILE).exists());
    // As if the host had rebooted (or crashed) since: the memory file was not fsynced, so its
    // stamp proves nothing; the whole hash is checked, then remembered for this boot.
    let state = std::fs::read(s.snap.join("snapshot")).unwrap();
    let (mut header, body) = format::decode(&state).unwrap();
    header.memory.boot_id = "a-boot-before-a-crash".into();
    let body = body.to_vec();
    std::fs::write(s.snap.join("snapshot"), format::encode(header, &body)).unwrap();
    let (mut vm, _) = restore(&s, "other-boot");
    vm.wait_lines(2);
    drop(vm);
    let verified = std::fs::read_to_string(s.snap.join(VERIFIED_FILE)).unwrap();
    assert!(verified.contains(&format::current_boot_id()), "{verified}");
}

#[test]
fn corrupted_truncated_or_foreign_snapshots_are_refused_with_exit_code_2() {
    if !kvm_available("snapshot_refusals") {
        return;
    }
    use fnvm_vmm::snapshot::format;
    let s = boot_and_snapshot("32");
    let d = s.dir.path();
    let state = std::fs::read(s.snap.join("snapshot")).unwrap();

    // A bit flip in the state.
    let flip = d.join("flip");
    copy_dir(&s.snap, &flip);
    let mut bad = state.clone();
    let n = bad.len();
    bad[n - 100] ^= 0x04;
    std::fs::write(flip.join("snapshot"), &bad).unwrap();
    let err = restore_fails(&flip, d);
    assert!(err.contains("state is corrupted"), "{err}");

    // A truncated state file.
    let cut = d.join("cut");
    copy_dir(&s.snap, &cut);
    std::fs::write(cut.join("snapshot"), &state[..state.len() / 2]).unwrap();
    let err = restore_fails(&cut, d);
    assert!(err.contains("bytes, its header says"), "{err}");

    // A bit flip in guest memory (a pattern page), and a truncated memory file.
    let mflip = d.join("mflip");
    copy_dir(&s.snap, &mflip);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(mflip.join("memory"))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, PATTERN_START + 4096 * 7 + 3)
            .unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, PATTERN_START + 4096 * 7 + 3).unwrap();
    }
    let err = restore_fails(&mflip, d);
    assert!(err.contains("memory file is corrupted"), "{err}");
    let mcut = d.join("mcut");
    copy_dir(&s.snap, &mcut);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mcut.join("memory"))
        .unwrap();
    f.set_len(16 << 20).unwrap();
    let err = restore_fails(&mcut, d);
    assert!(err.contains("truncated or replaced"), "{err}");

    // Another format version, another vmm version, another kernel.
    let (header, body) = format::decode(&state).unwrap();
    let v = d.join("version");
    copy_dir(&s.snap, &v);
    let text = format::encode(header.clone(), body);
    let mut other = b"fnvm-snapshot 7".to_vec();
    other.extend_from_slice(&text[format!("fnvm-snapshot {}", format::FORMAT_VERSION).len()..]);
    std::fs::write(v.join("snapshot"), other).unwrap();
    let err = restore_fails(&v, d);
    assert!(err.contains("snapshot format version 7"), "{err}");

    let vv = d.join("vmm-version");
    copy_dir(&s.snap, &vv);
    let mut h = header.clone();
    h.vmm_version = "0.0.0-other".into();
    std::fs::write(vv.join("snapshot"), format::encode(h, body)).unwrap();
    let err = restore_fails(&vv, d);
    assert!(err.contains("made by fnvm-vmm 0.0.0-other"), "{err}");

    let k = d.join("kernel");
    copy_dir(&s.snap, &k);
    let mut h = header;
    h.host.kernel_release = "2.6.32-elsewhere".into();
    std::fs::write(k.join("snapshot"), format::encode(h, body)).unwrap();
    let err = restore_fails(&k, d);
    assert!(
        err.contains("another host: kernel 2.6.32-elsewhere (snapshot)"),
        "{err}"
    );

    // And the intact snapshot still restores (the copies above did not touch it).
    let (mut vm, _) = restore(&s, "intact");
    vm.wait_lines(s.before.matches('\n').count() + 5);
    vm.stop();
}

// ---- vsock across a restore --------------------------------------------------------------

const VQ_RX: u64 = 0x20_0000;
const VQ_TX: u64 = 0x21_0000;
const VQ_EV: u64 = 0x22_0000;
const RX_BUFS: u64 = 0x30_0000;
const TX_BUF: u64 = 0x31_0000;
const EV_BUF: u64 = 0x32_0000;
const VSOCK_PORT: u32 = 5000;

/// A virtio-vsock driver in ~100 instructions (64-bit, polling, no interrupts): sets up the
/// rx (4 buffers), tx and event queues, prints `V`; then forever: an event-queue entry prints
/// `E` (after checking it is TRANSPORT_RESET, id 0) and forgets the stream; a REQUEST is
/// answered with RESPONSE and prints `Q`; stream data (RW) is echoed back and prints `D`; an
/// RST prints `X`. Each rx buffer is given back after use. Anything unexpected prints `BAD`.
fn vsock_guest() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    let mut bad = a.create_label();
    let line = |a: &mut CodeAssembler, b: u8| {
        print_byte(a, b);
        print_byte(a, b'\n');
    };
    // r10 = MMIO window, r12 = rx used seen, r13 = rx avail, r14 = tx avail, r15 = event used
    // seen, rbx = event avail, rbp = stream bytes received (our fwd_cnt).
    a.mov(r10, MMIO).unwrap();
    let reg = |a: &mut CodeAssembler, off: i32, value: u32| {
        a.mov(dword_ptr(r10 + off), value).unwrap();
    };
    reg(&mut a, 0x70, 0);
    reg(&mut a, 0x70, 1);
    reg(&mut a, 0x70, 3);
    reg(&mut a, 0x24, 1);
    reg(&mut a, 0x20, 1); // VIRTIO_F_VERSION_1
    reg(&mut a, 0x24, 0);
    reg(&mut a, 0x20, 0);
    reg(&mut a, 0x70, 0xb);
    for (q, base) in [(0u32, VQ_RX), (1, VQ_TX), (2, VQ_EV)] {
        reg(&mut a, 0x30, q);
        reg(&mut a, 0x38, 8);
        reg(&mut a, 0x80, base as u32);
        reg(&mut a, 0x84, 0);
        reg(&mut a, 0x90, (base + 0x1000) as u32);
        reg(&mut a, 0x94, 0);
        reg(&mut a, 0xa0, (base + 0x2000) as u32);
        reg(&mut a, 0xa4, 0);
        reg(&mut a, 0x44, 1);
    }
    let desc = |a: &mut CodeAssembler, q: u64, i: u64, addr: u64, len: u32, flags: u32| {
        a.mov(rax, addr).unwrap();
        a.mov(qword_ptr(q + 16 * i), rax).unwrap();
        a.mov(dword_ptr(q + 16 * i + 8), len).unwrap();
        a.mov(word_ptr(q + 16 * i + 12), flags).unwrap();
        a.mov(word_ptr(q + 16 * i + 14), 0u32).unwrap();
    };
    for i in 0..4u64 {
        desc(&mut a, VQ_RX, i, RX_BUFS + i * 0x1000, 0x1000, 2);
        a.mov(word_ptr(VQ_RX + 0x1000 + 4 + 2 * i), i as u32)
            .unwrap();
    }
    a.mov(word_ptr(VQ_RX + 0x1000 + 2), 4u32).unwrap();
    desc(&mut a, VQ_EV, 0, EV_BUF, 8, 2);
    a.mov(word_ptr(VQ_EV + 0x1000 + 4), 0u32).unwrap();
    a.mov(word_ptr(VQ_EV + 0x1000 + 2), 1u32).unwrap();
    desc(&mut a, VQ_TX, 0, TX_BUF, 44, 0);
    a.xor(r12, r12).unwrap();
    a.mov(r13d, 4).unwrap();
    a.xor(r14, r14).unwrap();
    a.xor(r15, r15).unwrap();
    a.mov(ebx, 1).unwrap();
    a.xor(ebp, ebp).unwrap();
    reg(&mut a, 0x70, 0xf); // DRIVER_OK
    reg(&mut a, 0x50, 0);
    reg(&mut a, 0x50, 2);
    line(&mut a, b'V');

    let mut main_loop = a.create_label();
    let mut no_event = a.create_label();
    let mut no_rx = a.create_label();
    let mut send = a.create_label();
    a.set_label(&mut main_loop).unwrap();
    // Event queue.
    a.movzx(eax, word_ptr(VQ_EV + 0x2000 + 2)).unwrap();
    a.cmp(ax, r15w).unwrap();
    a.je(no_event).unwrap();
    a.inc(r15d).unwrap();
    a.cmp(dword_ptr(EV_BUF), 0).unwrap(); // VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    a.jne(bad).unwrap();
    a.mov(dword_ptr(EV_BUF), 0xffff_ffffu32).unwrap();
    a.xor(ebp, ebp).unwrap();
    line(&mut a, b'E');
    a.mov(eax, ebx).unwrap();
    a.and(eax, 7).unwrap();
    a.mov(word_ptr(rax * 2 + (VQ_EV + 0x1000 + 4)), 0).unwrap();
    a.inc(ebx).unwrap();
    a.mov(word_ptr(VQ_EV + 0x1000 + 2), bx).unwrap();
    reg(&mut a, 0x50, 2);
    a.set_label(&mut no_event).unwrap();
    // Rx queue: one packet per pass.
    a.movzx(eax, word_ptr(VQ_RX + 0x2000 + 2)).unwrap();
    a.cmp(ax, r12w).unwrap();
    a.je(no_rx).unwrap();
    a.mov(eax, r12d).unwrap();
    a.and(eax, 7).unwrap();
    a.mov(r9d, dword_ptr(rax * 8 + (VQ_RX + 0x2000 + 4)))
        .unwrap(); // used id
    a.and(r9d, 3).unwrap();
    a.mov(r11, r9).unwrap();
    a.shl(r11, 12).unwrap();
    a.mov(rax, RX_BUFS).unwrap();
    a.add(r11, rax).unwrap(); // r11 = the packet
    a.inc(r12d).unwrap();
    let mut not_request = a.create_label();
    let mut not_rw = a.create_label();
    let mut repost = a.create_label();
    a.movzx(eax, word_ptr(r11 + 30)).unwrap();
    a.cmp(eax, 1).unwrap(); // OP_REQUEST
    a.jne(not_request).unwrap();
    a.xor(ebp, ebp).unwrap();
    a.mov(word_ptr(TX_BUF + 30), 2u32).unwrap(); // OP_RESPONSE
    a.xor(ecx, ecx).unwrap();
    a.call(send).unwrap();
    line(&mut a, b'Q');
    a.jmp(repost).unwrap();
    a.set_label(&mut not_request).unwrap();
    a.cmp(eax, 5).unwrap(); // OP_RW: echo the payload
    a.jne(not_rw).unwrap();
    a.mov(ecx, dword_ptr(r11 + 24)).unwrap();
    a.cmp(ecx, 0x1000 - 44).unwrap();
    a.ja(bad).unwrap();
    a.add(ebp, ecx).unwrap();
    a.lea(rsi, qword_ptr(r11 + 44)).unwrap();
    a.mov(rdi, TX_BUF + 44).unwrap();
    a.mov(r8d, ecx).unwrap();
    a.rep().movsb().unwrap();
    a.mov(ecx, r8d).unwrap();
    a.mov(word_ptr(TX_BUF + 30), 5u32).unwrap();
    a.call(send).unwrap();
    line(&mut a, b'D');
    a.jmp(repost).unwrap();
    a.set_label(&mut not_rw).unwrap();
    a.cmp(eax, 3).unwrap(); // OP_RST
    a.jne(repost).unwrap();
    line(&mut a, b'X');
    a.set_label(&mut repost).unwrap();
    a.mov(eax, r13d).unwrap();
    a.and(eax, 7).unwrap();
    a.mov(word_ptr(rax * 2 + (VQ_RX + 0x1000 + 4)), r9w)
        .unwrap();
    a.inc(r13d).unwrap();
    a.mov(word_ptr(VQ_RX + 0x1000 + 2), r13w).unwrap();
    reg(&mut a, 0x50, 0);
    a.set_label(&mut no_rx).unwrap();
    a.pause().unwrap();
    a.jmp(main_loop).unwrap();

    // send: a reply to the packet at r11, op already in TX_BUF+30, ecx payload bytes already
    // at TX_BUF+44. Waits until the device used it.
    a.set_label(&mut send).unwrap();
    a.mov(rax, qword_ptr(r11 + 8)).unwrap();
    a.mov(qword_ptr(TX_BUF), rax).unwrap(); // src_cid = their dst_cid
    a.mov(rax, qword_ptr(r11)).unwrap();
    a.mov(qword_ptr(TX_BUF + 8), rax).unwrap(); // dst_cid = their src_cid
    a.mov(eax, dword_ptr(r11 + 20)).unwrap();
    a.mov(dword_ptr(TX_BUF + 16), eax).unwrap(); // src_port = their dst_port
    a.mov(eax, dword_ptr(r11 + 16)).unwrap();
    a.mov(dword_ptr(TX_BUF + 20), eax).unwrap(); // dst_port = their src_port
    a.mov(dword_ptr(TX_BUF + 24), ecx).unwrap(); // len
    a.mov(word_ptr(TX_BUF + 28), 1u32).unwrap(); // TYPE_STREAM
    a.mov(dword_ptr(TX_BUF + 32), 0u32).unwrap(); // flags
    a.mov(dword_ptr(TX_BUF + 36), 0x1_0000u32).unwrap(); // buf_alloc
    a.mov(dword_ptr(TX_BUF + 40), ebp).unwrap(); // fwd_cnt
    a.lea(eax, dword_ptr(rcx + 44)).unwrap();
    a.mov(dword_ptr(VQ_TX + 8), eax).unwrap();
    a.mov(eax, r14d).unwrap();
    a.and(eax, 7).unwrap();
    a.mov(word_ptr(rax * 2 + (VQ_TX + 0x1000 + 4)), 0).unwrap();
    a.inc(r14d).unwrap();
    a.mov(word_ptr(VQ_TX + 0x1000 + 2), r14w).unwrap();
    reg(&mut a, 0x50, 1);
    a.mov(ecx, 50_000_000).unwrap();
    let mut wait = a.create_label();
    let mut sent = a.create_label();
    a.set_label(&mut wait).unwrap();
    a.movzx(eax, word_ptr(VQ_TX + 0x2000 + 2)).unwrap();
    a.cmp(ax, r14w).unwrap();
    a.je(sent).unwrap();
    a.pause().unwrap();
    a.dec(ecx).unwrap();
    a.jnz(wait).unwrap();
    print_byte(&mut a, b'T');
    a.jmp(bad).unwrap();
    a.set_label(&mut sent).unwrap();
    a.ret().unwrap();

    a.set_label(&mut bad).unwrap();
    for b in b"BAD\n" {
        print_byte(&mut a, *b);
    }
    let mut spin = a.create_label();
    a.set_label(&mut spin).unwrap();
    a.pause().unwrap();
    a.jmp(spin).unwrap();
    a.assemble(BASE + 0x78).unwrap()
}

/// Waits until the console shows `want` (panics with the console otherwise).
fn wait_console(vm: &mut Vmm, want: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = vm.text();
        assert!(!text.contains("BAD"), "guest detected a fault:\n{text}");
        if text.contains(want) {
            return;
        }
        if let Ok(Some(status)) = vm.child.try_wait() {
            let mut err = String::new();
            let _ = vm.child.stderr.take().unwrap().read_to_string(&mut err);
            panic!("fnvm-vmm ended ({status}): {err}\nconsole:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {want:?}; console:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A host stream to the guest's port through the vsock Unix socket; returns it after `OK`.
fn vsock_connect(uds: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + TIMEOUT;
    let mut s = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "vsock socket {uds:?}: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    };
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).expect("no OK from the guest");
        line.push(b[0]);
    }
    let line = String::from_utf8(line).unwrap();
    assert!(line.starts_with("OK "), "{line:?}");
    s
}

fn echo(s: &mut UnixStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).expect("the guest did not echo");
    assert_eq!(back, msg);
}

#[test]
fn vsock_stream_is_reset_by_a_restore_and_a_new_host_connection_reaches_the_guest() {
    if !kvm_available("snapshot_vsock") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vsock.elf");
    std::fs::write(&kernel, elf64(&vsock_guest())).unwrap();
    let sock = dir.path().join("api.sock");
    let uds1 = dir.path().join("v1.sock");
    let mut vm = Vmm::spawn(&[
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--memory".as_ref(),
        "32".as_ref(),
        "--vsock".as_ref(),
        uds1.as_os_str(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
    ]);
    wait_for_socket(&sock);
    wait_console(&mut vm, "V\n");
    // A live stream before the snapshot: request accepted, data echoed.
    let mut old = vsock_connect(&uds1, VSOCK_PORT);
    echo(&mut old, b"before the snapshot");
    wait_console(&mut vm, "Q\nD\n");
    let snap = dir.path().join("snap");
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"snapshot","dir":{:?}}}"#,
            snap.display().to_string()
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    // The stream still works after the snapshot, in the original VM.
    echo(&mut old, b"still here");
    let (before, _) = vm.stop();
    assert!(
        !before.contains('E'),
        "no reset before the restore:\n{before}"
    );
    // The original process is gone and with it the host side of the stream.
    let mut b = [0u8; 1];
    assert!(
        matches!(old.read(&mut b), Ok(0) | Err(_)),
        "the old host stream is still open"
    );
    assert!(!uds1.exists(), "the original vsock socket was left behind");

    let uds2 = dir.path().join("v2.sock");
    let mut restored = Vmm::spawn(&[
        "--restore".as_ref(),
        snap.as_os_str(),
        "--vsock".as_ref(),
        uds2.as_os_str(),
    ]);
    // The guest's event queue gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (the guest checks the
    // id) before anything else; the driver was not re-initialised.
    wait_console(&mut restored, "E\n");
    let text = restored.text();
    assert!(text.starts_with("E\n"), "{text}");
    assert!(!text.contains('V'), "{text}");
    // A new host connection reaches the restored guest, and a stream works end to end.
    let mut new = vsock_connect(&uds2, VSOCK_PORT);
    echo(&mut new, b"after the restore");
    echo(&mut new, b"and again");
    wait_console(&mut restored, "E\nQ\nD\n");
    let (after, _) = restored.stop();
    assert_eq!(after.matches('E').count(), 1, "{after}");
    assert_eq!(after.matches('Q').count(), 1, "{after}");
    assert!(!after.contains('X'), "{after}");
}

// ---- standby VMM -------------------------------------------------------------------------

#[test]
fn standby_vmm_restores_the_counting_guest_which_continues_exactly() {
    if !kvm_available("snapshot_standby") {
        return;
    }
    let s = boot_and_snapshot("64");
    let at_pause = counters(&s.before).last().copied().unwrap();
    let sock = s.dir.path().join("standby.sock");
    let mut vm = Vmm::spawn(&[
        "--standby".as_ref(),
        "--memory".as_ref(),
        "64".as_ref(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
    ]);
    wait_for_socket(&sock);
    // Requests that do not fit are refused and the standby keeps waiting.
    let r = api(&sock, r#"{"op":"pause"}"#);
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("standby"), "{r}");
    let small = s.dir.path().join("small");
    {
        // A 32 MiB snapshot of the same guest: the RAM layout differs.
        let t = boot_and_snapshot("32");
        copy_dir(&t.snap, &small);
    }
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"restore","dir":{:?}}}"#,
            small.display().to_string()
        ),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("32 MiB in 1 region(s), this VM's 64 MiB"),
        "{r}"
    );
    // Writable disk without its own copy, or a copy that does not exist: refused too,
    // before anything changes.
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"restore","dir":{:?}}}"#,
            s.snap.display().to_string()
        ),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("is writable"), "{r}");
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"restore","dir":{:?},"disks":["/nonexistent/copy.img"]}}"#,
            s.snap.display().to_string()
        ),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/copy.img"),
        "{r}"
    );

    let copy = s.dir.path().join("standby-copy.img");
    fnvm_vmm::sparse_copy::copy_sparse(&s.snap.join("disk-0.img"), &copy).unwrap();
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"restore","dir":{:?},"disks":[{:?}]}}"#,
            s.snap.display().to_string(),
            copy.display().to_string()
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["restore_ms"].as_f64().unwrap() > 0.0, "{r}");
    // The guest re-reads its 4 MiB pattern, which only the snapshot's memory file holds
    // (the standby's own RAM is zero): it continues counting from where it was paused.
    let lines_before = s.before.matches('\n').count();
    vm.wait_lines(66);
    let m = api(&sock, r#"{"op":"metrics"}"#);
    assert_eq!(m["ok"], true, "{m}");
    assert!(m["restore"]["first_io"]["at_us"].as_u64().is_some(), "{m}");
    // A running VM refuses another restore.
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"restore","dir":{:?}}}"#,
            s.snap.display().to_string()
        ),
    );
    assert_eq!(r["ok"], false, "{r}");
    let (after, stderr) = vm.stop();
    let values = counters(&format!("{}{}", s.before, after));
    assert_consecutive(&values, 1);
    assert!(values.len() >= lines_before + 60);
    assert!(
        stderr.contains("fnvm-vmm: restored, resumed at"),
        "{stderr}"
    );
    let disk = disk_counters(&copy);
    for (sector, v) in disk.iter().enumerate() {
        assert_eq!(v % SECTORS, sector as u64, "sector {sector}: {v}");
    }
    assert!(*disk.iter().max().unwrap() > at_pause + 30);
    assert!(!sock.exists(), "the API socket was left behind");
}

#[test]
fn standby_refuses_boot_and_restore_arguments() {
    for extra in [
        &["--kernel", "/nonexistent"][..],
        &["--restore", "/nonexistent"][..],
        &["--disk", "/nonexistent"][..],
        &["--net", "/nonexistent"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
            .args(["--standby", "--api-sock", "/nonexistent/api.sock"])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("cannot be used with --standby"), "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .arg("--standby")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--standby needs --api-sock"), "{stderr}");
}

/// A stand-in for passt: a listener whose connections are counted and held open.
struct FakePasst {
    path: PathBuf,
    listener: std::os::unix::net::UnixListener,
    held: Vec<UnixStream>,
}

impl FakePasst {
    fn new(path: PathBuf) -> FakePasst {
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        FakePasst {
            path,
            listener,
            held: Vec::new(),
        }
    }

    /// Waits for the VMM to connect.
    fn wait_connected(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok((s, _)) = self.listener.accept() {
                self.held.push(s);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nobody connected to {:?}",
                self.path
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[test]
fn a_network_device_is_snapshotted_with_its_mac_and_restores_onto_a_new_passt() {
    if !kvm_available("snapshot_net") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("count.elf");
    std::fs::write(&kernel, elf64(&counting_guest())).unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // Without a passt listening, the VM is not started.
    let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .args(["--kernel".as_ref(), kernel.as_os_str()])
        .args(["--net", "/nonexistent/passt.sock"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot connect to the passt socket"),
        "{stderr}"
    );

    let mut first = FakePasst::new(dir.path().join("passt-1.sock"));
    let sock = dir.path().join("api.sock");
    let net = format!("{},mac=02:00:00:00:00:42", first.path.display());
    let mut vm = Vmm::spawn(&[
        "--kernel".as_ref(),
        kernel.as_os_str(),
        "--memory".as_ref(),
        "64".as_ref(),
        "--disk".as_ref(),
        disk.as_os_str(),
        "--net".as_ref(),
        net.as_ref(),
        "--api-sock".as_ref(),
        sock.as_os_str(),
    ]);
    first.wait_connected();
    wait_for_socket(&sock);
    vm.wait_lines(10);
    let snap = dir.path().join("snap");
    let r = api(
        &sock,
        &format!(
            r#"{{"op":"snapshot","dir":{:?}}}"#,
            snap.display().to_string()
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    let (before, _) = vm.stop();
    let state =
        String::from_utf8_lossy(&std::fs::read(snap.join("snapshot")).unwrap()).into_owned();
    assert!(state.starts_with("fnvm-snapshot 4\n"), "format 4");
    assert!(
        state.contains(r#""Net":{"mac":"02:00:00:00:00:42""#),
        "{state}"
    );

    // --restore --net: the same guest, on a new passt.
    let mut second = FakePasst::new(dir.path().join("passt-2.sock"));
    let copy = dir.path().join("copy.img");
    fnvm_vmm::sparse_copy::copy_sparse(&snap.join("disk-0.img"), &copy).unwrap();
    let mut vm = Vmm::spawn(&[
        "--restore".as_ref(),
        snap.as_os_str(),
        "--disk".as_ref(),
        copy.as_os_str(),
        "--net".as_ref(),
        second.path.as_os_str(),
    ]);
    second.wait_connected();
    vm.wait_lines(10);
    let (after, _) = vm.stop();
    // It counts on (the first line may be the rest of one cut by the snapshot).
    let lines: Vec<&str> = after.lines().skip(1).collect();
    assert!(lines.iter().all(|l| l.starts_with('C')), "{after}");
    assert!(counters(&before).len() >= 10);

    // A standby's restore: a missing passt socket is refused before anything changes, then
    // the request with a live one connects to it.
    let standby_sock = dir.path().join("standby.sock");
    let mut vm = Vmm::spawn(&[
        "--standby".as_ref(),
        "--memory".as_ref(),
        "64".as_ref(),
        "--api-sock".as_ref(),
        standby_sock.as_os_str(),
    ]);
    wait_for_socket(&standby_sock);
    let copy2 = dir.path().join("copy2.img");
    fnvm_vmm::sparse_copy::copy_sparse(&snap.join("disk-0.img"), &copy2).unwrap();
    let request = |net: &Path| {
        format!(
            r#"{{"op":"restore","dir":{:?},"disks":[{:?}],"net":{:?}}}"#,
            snap.display().to_string(),
            copy2.display().to_string(),
            net.display().to_string()
        )
    };
    let r = api(
        &standby_sock,
        &request(Path::new("/nonexistent/passt.sock")),
    );
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("passt socket"), "{r}");
    let mut third = FakePasst::new(dir.path().join("passt-3.sock"));
    let r = api(&standby_sock, &request(&third.path));
    assert_eq!(r["ok"], true, "{r}");
    third.wait_connected();
    vm.wait_lines(10);
    vm.stop();
}
