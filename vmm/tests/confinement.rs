//! The `fnvm-vmm` process confines itself once its VM runs (a tiny guest under /dev/kvm, the
//! binary as fnvm starts it): every thread shows as seccomp-filtered with no_new_privs and no
//! capabilities in `/proc`, vCPU threads included; a thread that makes a call outside its
//! allow-list (the test-only trigger) stops the VMM with exit code 9 and one line naming the
//! thread and the call; `--no-confinement` leaves all of it off.
//!
//! Without /dev/kvm each test prints one loud line to stderr and returns.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A hang guard, never a speed target.
const TIMEOUT: Duration = Duration::from_secs(120);

fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("!!! SKIPPED {test}: /dev/kvm is not available here !!!");
    }
    ok
}

/// A running `fnvm-vmm` with the serial-loop guest and an API socket.
struct Vmm {
    child: Child,
    api: PathBuf,
    /// Kept until the VMM is gone (its kernel, API socket and jail live there).
    _dir: tempfile::TempDir,
}

impl Vmm {
    fn start(extra: &[&str]) -> Vmm {
        Vmm::start_in(tempfile::tempdir().unwrap(), extra, true)
    }

    /// The VMM in `dir`, with the test trigger on when `triggers`.
    fn start_in(dir: tempfile::TempDir, extra: &[&str], triggers: bool) -> Vmm {
        let kernel = dir.path().join("loop.elf");
        std::fs::write(&kernel, fnvm_vmm::tiny_guest::serial_loop()).unwrap();
        let api = dir.path().join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
            .arg("--kernel")
            .arg(&kernel)
            .arg("--api-sock")
            .arg(&api)
            .args(extra)
            .env("FNVM_VMM_TEST_TRIGGERS", if triggers { "1" } else { "0" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut vmm = Vmm {
            child,
            api,
            _dir: dir,
        };
        vmm.wait_running();
        vmm
    }

    /// Until the API answers (the VM runs: its threads are confined by then) and a vCPU
    /// thread exists.
    fn wait_running(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("fnvm-vmm ended ({status}): {}", self.stderr());
            }
            let answered = self.api.exists()
                && UnixStream::connect(&self.api).is_ok_and(|s| request(s, "metrics").is_some());
            if answered && self.threads().iter().any(|(name, _)| name == "vcpu0") {
                return;
            }
            assert!(Instant::now() < deadline, "fnvm-vmm did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// (thread name, its /proc status) for every thread of the VMM.
    fn threads(&self) -> Vec<(String, String)> {
        let task = format!("/proc/{}/task", self.child.id());
        let Ok(entries) = std::fs::read_dir(&task) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = std::fs::read_to_string(e.path().join("comm")).ok()?;
                let status = std::fs::read_to_string(e.path().join("status")).ok()?;
                Some((name.trim().to_string(), status))
            })
            .collect()
    }

    fn stderr(&mut self) -> String {
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        err
    }

    /// Sends `op` and waits for the process to end: its exit code and stderr.
    fn send_and_wait(&mut self, op: &str) -> (Option<i32>, Option<String>, String) {
        let reply = UnixStream::connect(&self.api)
            .ok()
            .and_then(|s| request(s, op));
        let err = self.stderr();
        let status = wait_exit(&mut self.child);
        (status.code(), reply, err)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "fnvm-vmm did not end");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One API request line; the reply line, or None when the connection closed first.
fn request(mut s: UnixStream, op: &str) -> Option<String> {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(format!("{{\"op\":\"{op}\"}}\n").as_bytes())
        .ok()?;
    let mut line = String::new();
    match BufReader::new(&s).read_line(&mut line) {
        Ok(n) if n > 0 => Some(line),
        _ => None,
    }
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
}

fn stop(vmm: &mut Vmm) {
    // SAFETY: signals our own child.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut vmm.child);
    assert_eq!(
        status.code(),
        Some(8),
        "stopped by SIGTERM: {}",
        vmm.stderr()
    );
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered_without_privileges() {
    if !kvm_available("every_thread_of_a_running_vmm_is_filtered_without_privileges") {
        return;
    }
    let mut vmm = Vmm::start(&["--vcpus", "1"]);
    let threads = vmm.threads();
    assert!(threads.len() >= 2, "the VMM thread and vcpu0: {threads:?}");
    for (name, status) in &threads {
        assert_eq!(field(status, "Seccomp:"), "2", "{name} is filtered");
        assert_eq!(field(status, "NoNewPrivs:"), "1", "{name}");
        assert_eq!(field(status, "CapEff:"), "0000000000000000", "{name}");
        assert_eq!(field(status, "CapPrm:"), "0000000000000000", "{name}");
        assert_eq!(field(status, "CapBnd:"), "0000000000000000", "{name}");
    }
    // Confined, it still serves its API and stops cleanly.
    assert!(UnixStream::connect(&vmm.api)
        .ok()
        .and_then(|s| request(s, "metrics"))
        .is_some_and(|r| r.contains("\"ok\":true")));
    stop(&mut vmm);
}

#[test]
fn a_forbidden_system_call_stops_the_vmm_naming_the_thread_and_call() {
    if !kvm_available("a_forbidden_system_call_stops_the_vmm_naming_the_thread_and_call") {
        return;
    }
    let mut vmm = Vmm::start(&[]);
    let (code, reply, err) = vmm.send_and_wait("forbidden_syscall");
    assert_eq!(code, Some(9), "exit code 9; reply {reply:?}; stderr: {err}");
    assert_eq!(reply, None, "the VMM stopped before it could answer");
    let setns = libc::SYS_setns.to_string();
    assert!(
        err.contains("seccomp violation: thread fnvm-vmm made system call")
            && err.contains(&format!("call {setns},")),
        "stderr names the thread and the call: {err}"
    );
}

#[test]
fn unconfined_nothing_is_confined_and_the_trigger_says_so() {
    if !kvm_available("unconfined_nothing_is_confined_and_the_trigger_says_so") {
        return;
    }
    let mut vmm = Vmm::start(&["--no-confinement"]);
    for (name, status) in vmm.threads() {
        assert_eq!(field(&status, "Seccomp:"), "0", "{name}");
    }
    let reply = UnixStream::connect(&vmm.api)
        .ok()
        .and_then(|s| request(s, "forbidden_syscall"))
        .expect("a reply");
    assert!(reply.contains("runs without seccomp"), "{reply}");
    stop(&mut vmm);
}

/// The trigger is refused (and changes nothing) unless the VMM was started with it on.
#[test]
fn the_trigger_is_refused_unless_enabled_at_start() {
    if !kvm_available("the_trigger_is_refused_unless_enabled_at_start") {
        return;
    }
    let mut vmm = Vmm::start_in(tempfile::tempdir().unwrap(), &[], false);
    let reply = UnixStream::connect(&vmm.api)
        .ok()
        .and_then(|s| request(s, "forbidden_syscall"))
        .expect("a reply");
    assert!(reply.contains("test triggers are off"), "{reply}");
    stop(&mut vmm);
}

/// What the VMM sees of the host's files once jailed: only its directory, at its own path.
#[test]
fn a_jailed_vmm_sees_only_its_own_directory_and_still_snapshots_into_it() {
    if !kvm_available("a_jailed_vmm_sees_only_its_own_directory_and_still_snapshots_into_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().canonicalize().unwrap();
    let real_str = real.display().to_string();
    let mut vmm = Vmm::start_in(dir, &["--jail", &real_str], true);
    let pid = vmm.child.id();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let first = real.components().nth(1).unwrap();
    assert_eq!(
        top,
        vec![first.as_os_str().to_string_lossy().into_owned()],
        "the jail's root holds only the way to its directory"
    );
    for host_path in ["etc", "usr", "proc", "dev/kvm", "var/run"] {
        assert!(!root.join(host_path).exists(), "/{host_path} is visible");
    }
    let inside = root.join(real.strip_prefix("/").unwrap());
    assert!(
        inside.join("api.sock").exists(),
        "its own directory is there"
    );
    for ns in ["mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "the VMM has a {ns} namespace of its own");
    }
    // Jailed and filtered, it still writes a snapshot into its directory.
    let snap = real.join("snap");
    let reply = UnixStream::connect(&vmm.api)
        .ok()
        .and_then(|s| {
            let mut s = s;
            s.write_all(
                format!("{{\"op\":\"snapshot\",\"dir\":\"{}\"}}\n", snap.display()).as_bytes(),
            )
            .ok()?;
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).ok()?;
            Some(line)
        })
        .expect("a reply");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(
        snap.join("memory").exists(),
        "the snapshot is in the host's directory"
    );
    stop(&mut vmm);
}

/// With `--uid`, the jailed VMM becomes that uid and gid on every thread (no capabilities
/// left, none to regain) and still writes a snapshot into the directory it was given, which
/// is the uid's; the files are the uid's too, and its writable disk, in a directory only root
/// may enter, is copied from the file the VMM opened before it left root.
#[test]
fn a_vmm_given_a_uid_runs_as_it_and_snapshots_into_its_directory() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    if !kvm_available("a_vmm_given_a_uid_runs_as_it_and_snapshots_into_its_directory") {
        return;
    }
    const ID: u32 = 0x2eff_0042;
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().canonicalize().unwrap();
    // Root's directory, traversable; the snapshot's parent is the uid's.
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o711)).unwrap();
    let out = real.join("out");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::chown(&out, Some(ID), Some(ID)).unwrap();
    let private = real.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let disk = private.join("disk.img");
    let content: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&disk, &content).unwrap();
    let real_str = real.display().to_string();
    let disk_str = disk.display().to_string();
    let identity = format!("{ID}:{ID}");
    let mut vmm = Vmm::start_in(
        dir,
        &["--jail", &real_str, "--uid", &identity, "--disk", &disk_str],
        true,
    );
    let threads = vmm.threads();
    assert!(threads.len() >= 2, "{threads:?}");
    for (name, status) in &threads {
        let ids = format!("{ID}\t{ID}\t{ID}\t{ID}");
        assert_eq!(field(status, "Uid:"), ids, "{name}");
        assert_eq!(field(status, "Gid:"), ids, "{name}");
        assert_eq!(field(status, "Groups:"), "", "{name}");
        assert_eq!(field(status, "CapPrm:"), "0000000000000000", "{name}");
        assert_eq!(field(status, "CapBnd:"), "0000000000000000", "{name}");
    }
    let snap = out.join("snap");
    let mut s = UnixStream::connect(&vmm.api).unwrap();
    s.write_all(format!("{{\"op\":\"snapshot\",\"dir\":\"{}\"}}\n", snap.display()).as_bytes())
        .unwrap();
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).unwrap();
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let memory = std::fs::metadata(snap.join("memory")).expect("the snapshot's memory");
    assert_eq!((memory.uid(), memory.gid()), (ID, ID));
    assert_eq!(std::fs::read(snap.join("disk-0.img")).unwrap(), content);
    stop(&mut vmm);
}

/// A guest's panic banner arms the VMM's grace timer on the confined VMM thread (timerfd
/// calls its filter must allow): the VMM ends with the guest-panic code, not a violation.
#[test]
fn a_guest_panic_under_confinement_ends_as_a_guest_panic() {
    if !kvm_available("confined_guest_panic") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("panic.elf");
    std::fs::write(
        &kernel,
        fnvm_vmm::tiny_guest::print_then_spin(
            b"Kernel panic - not syncing: Attempted to kill init!\n",
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--jail")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let mut console = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut console)
        .unwrap();
    assert!(console.contains("Kernel panic"), "console: {console}");
    assert!(!err.contains("seccomp violation"), "{err}");
    assert_eq!(
        status.code(),
        Some(fnvm_vmm::exit::code::GUEST_PANIC as i32),
        "{err}"
    );
    assert!(
        err.contains("guest kernel panic: Kernel panic - not syncing"),
        "{err}"
    );
}

#[test]
fn a_jail_directory_that_cannot_be_one_is_bad_input() {
    let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
        .args(["--kernel", "/nonexistent", "--jail", "relative/dir"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("jail directory relative/dir: not an absolute path"),
        "{err}"
    );
    for bad in ["0:0", "1000", "x:1", "1000:"] {
        let out = Command::new(env!("CARGO_BIN_EXE_fnvm-vmm"))
            .args(["--kernel", "/nonexistent", "--uid", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--uid {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("--uid {bad:?}: expected UID:GID")),
            "{err}"
        );
    }
}
