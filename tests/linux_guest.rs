//! Whole-system tests of Linux micro-VMs: the real `fnvm vm boot`, fnvm's guest kernel, and a
//! rootfs image built here with the static agent as /sbin/init. The agent obeys `fnvm.test=`
//! actions on the kernel command line and prints `fnvm-agent: ...` lines on the console.
//!
//! A stock Linux guest needs hardware virtualization: where /proc/cpuinfo shows no vmx/svm (e.g.
//! KVM-PVM) each boot test prints one `SKIPPED (...)` line to stderr and returns, and
//! scripts/test.sh runs them at the nested level (FNVM_TEST_SANDBOXES, fnvm_testkit::level). The
//! refusal test runs exactly where they cannot.
//!
//! The kernel comes from guest-kernel/build.sh with its default cache (built once per machine,
//! minutes the first time); the agent from $FNVM_AGENT_BIN or a static cargo build (in the profile of `fnvm`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use fnvm_testkit::level::{self, host_has_vmx_or_svm, loud};
use fnvm_testkit::{workspace, Here};

/// A hang guard, not a speed target: a Linux boot to the agent takes well under a second.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Appended to fnvm's default command line (`fnvm vm boot --rootfs` adds `root=/dev/vda ro`).
const EXTRA_CMDLINE: &str = "rootfstype=ext4";

const HERE: Here = fnvm_testkit::here!();

/// True (after one loud line on stderr) when Linux guests do not run here.
fn skip_without_hardware_virtualization(test: &str) -> bool {
    !level::linux_guests_run_here(test)
}

/// fnvm's guest kernel, built (or found in the cache) once per test process.
fn kernel() -> &'static Path {
    static KERNEL: OnceLock<PathBuf> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let out = Command::new("bash")
            .arg(workspace().join("guest-kernel/build.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("cannot run guest-kernel/build.sh");
        assert!(
            out.status.success(),
            "guest kernel build failed ({})",
            out.status
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(stdout.lines().last().expect("build.sh printed no path"))
    })
}

/// `fnvm vm boot` runs the `fnvm-vmm` next to `fnvm`; `cargo test -p fnvm` alone builds only
/// fnvm's own binaries, so build the VMM in the same profile when it is missing.
fn ensure_vmm_beside_fnvm() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let fnvm = HERE.fnvm();
        if fnvm.with_file_name("fnvm-vmm").is_file() {
            return;
        }
        let release = fnvm.parent().and_then(Path::file_name) == Some("release".as_ref());
        let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
        cargo
            .args(["build", "-p", "fnvm-vmm"])
            .current_dir(workspace());
        if release {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cannot run cargo to build fnvm-vmm");
        assert!(status.success(), "building fnvm-vmm failed");
    });
}

fn mkfs_ext4(image: &Path, size: &str, content: Option<&Path>) {
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F"]);
    if let Some(dir) = content {
        cmd.arg("-d").arg(dir);
    }
    let out = cmd
        .arg(image)
        .arg(size)
        .output()
        .expect("cannot run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ext4 root file system holding the static agent as /sbin/init and its mount points.
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for sub in ["sbin", "proc", "sys", "dev", "tmp", "mnt/fnvm-test"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    std::fs::copy(HERE.agent(), root.join("sbin/init")).unwrap();
    let image = dir.join("rootfs.ext4");
    mkfs_ext4(&image, "32M", Some(&root));
    image
}

struct Boot {
    output: Output,
    console: String,
    stderr: String,
}

/// `fnvm vm boot` with the guest kernel, the rootfs as read-only /dev/vda and `disks` after it
/// (/dev/vdb, ...), and the given test actions on the command line.
fn boot(home: &Path, rootfs: &Path, disks: &[String], vcpus: u8, actions: &[&str]) -> Boot {
    let mut cmdline = EXTRA_CMDLINE.to_string();
    for action in actions {
        cmdline.push_str(" fnvm.test=");
        cmdline.push_str(action);
    }
    ensure_vmm_beside_fnvm();
    let mut cmd = Command::new(HERE.fnvm);
    cmd.arg("--home")
        .arg(home)
        .args(["vm", "boot", "--kernel"])
        .arg(kernel())
        .args(["--memory", "256", "--vcpus", &vcpus.to_string()])
        .args(["--cmdline", &cmdline])
        .arg("--rootfs")
        .arg(rootfs);
    for disk in disks {
        cmd.args(["--disk", disk]);
    }
    let output = run_with_timeout(cmd, BOOT_TIMEOUT);
    let console = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    Boot {
        output,
        console,
        stderr,
    }
}

fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    use std::os::unix::process::CommandExt as _;
    // Its own process group: on a timeout the whole group goes, the fnvm-vmm child included,
    // which holds the output pipes open (killing fnvm alone left the readers waiting forever).
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().expect("cannot start fnvm");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            let out = out_reader.join().unwrap();
            let err = err_reader.join().unwrap();
            panic!(
                "fnvm vm boot did not end within {timeout:?}; console so far:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&err)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    }
}

impl Boot {
    fn assert_clean(&self) {
        assert!(
            self.output.status.success(),
            "the VM did not end cleanly ({}):\nconsole:\n{}\nstderr:\n{}",
            self.output.status,
            self.console,
            self.stderr
        );
        assert!(
            self.console.contains("fnvm-agent: up after "),
            "no agent line on the console:\n{}",
            self.console
        );
    }

    /// The agent's line that starts with `prefix` (after `fnvm-agent: `).
    fn agent_line(&self, prefix: &str) -> &str {
        let wanted = format!("fnvm-agent: {prefix}");
        self.console
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .find(|l| l.starts_with(&wanted))
            .unwrap_or_else(|| panic!("no line {wanted:?} on the console:\n{}", self.console))
    }
}

#[test]
fn linux_boots_to_the_agent_and_ends_cleanly() {
    if skip_without_hardware_virtualization("linux_boots_to_the_agent_and_ends_cleanly") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs(dir.path());
    let boot = boot(&dir.path().join("home"), &rootfs, &[], 1, &[]);
    boot.assert_clean();
    let up = boot.agent_line("up after ");
    let seconds: f64 = up
        .trim_start_matches("fnvm-agent: up after ")
        .trim_end_matches(" s")
        .parse()
        .unwrap_or_else(|_| panic!("the uptime in {up:?} is not a number"));
    assert!(seconds > 0.0, "{up}");
}

#[test]
fn a_read_only_disk_cannot_be_written_and_a_writable_one_can() {
    if skip_without_hardware_virtualization(
        "a_read_only_disk_cannot_be_written_and_a_writable_one_can",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs(dir.path());
    let read_only = dir.path().join("ro.img");
    let writable = dir.path().join("rw.img");
    for disk in [&read_only, &writable] {
        std::fs::write(disk, vec![0u8; 1 << 20]).unwrap();
    }
    let boot = boot(
        &dir.path().join("home"),
        &rootfs,
        &[
            format!("{}:ro", read_only.display()),
            writable.display().to_string(),
        ],
        1,
        &["write:/dev/vdb", "write:/dev/vdc"],
    );
    boot.assert_clean();
    let ro_line = boot.agent_line("write /dev/vdb: ");
    assert!(ro_line.contains("failed"), "{ro_line}");
    assert!(
        std::fs::read(&read_only).unwrap().iter().all(|b| *b == 0),
        "the read-only disk's file changed"
    );
    assert_eq!(
        boot.agent_line("write /dev/vdc: "),
        "fnvm-agent: write /dev/vdc: ok"
    );
    let written = std::fs::read(&writable).unwrap();
    assert!(
        written.starts_with(b"fnvm-agent test write\n"),
        "the guest's write did not reach the writable disk's file"
    );
}

#[test]
fn a_writable_disk_keeps_a_file_across_boots() {
    if skip_without_hardware_virtualization("a_writable_disk_keeps_a_file_across_boots") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs(dir.path());
    let data = dir.path().join("data.ext4");
    mkfs_ext4(&data, "16M", None);
    let home = dir.path().join("home");
    let disks = [data.display().to_string()];
    let text = format!("kept-{}", std::process::id());

    let first = boot(
        &home,
        &rootfs,
        &disks,
        1,
        &[&format!("write-file:/dev/vdb:note:{text}")],
    );
    first.assert_clean();
    assert_eq!(
        first.agent_line("write-file /dev/vdb note: "),
        "fnvm-agent: write-file /dev/vdb note: ok"
    );

    let second = boot(&home, &rootfs, &disks, 1, &["read-file:/dev/vdb:note"]);
    second.assert_clean();
    assert_eq!(
        second.agent_line("read-file /dev/vdb note: "),
        format!("fnvm-agent: read-file /dev/vdb note: {text}")
    );
}

#[test]
fn a_guest_kernel_panic_ends_the_vm_with_an_error() {
    if skip_without_hardware_virtualization("a_guest_kernel_panic_ends_the_vm_with_an_error") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs(dir.path());
    let boot = boot(&dir.path().join("home"), &rootfs, &[], 1, &["panic"]);
    assert!(
        boot.console
            .contains("fnvm-agent: panicking the kernel on request"),
        "{}",
        boot.console
    );
    assert!(
        !boot.output.status.success(),
        "a kernel panic was reported as a clean exit:\n{}",
        boot.stderr
    );
    assert!(
        boot.stderr.to_lowercase().contains("panic"),
        "the error does not say the guest panicked:\n{}",
        boot.stderr
    );
}

#[test]
fn two_vcpus_boot() {
    if skip_without_hardware_virtualization("two_vcpus_boot") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rootfs = rootfs(dir.path());
    let boot = boot(&dir.path().join("home"), &rootfs, &[], 2, &["cpus"]);
    boot.assert_clean();
    assert_eq!(
        boot.agent_line("cpus online: "),
        "fnvm-agent: cpus online: 2"
    );
}

/// Where Linux guests cannot run, `fnvm vm boot` says so at once instead of hanging in a guest
/// that would take minutes to crash.
#[test]
fn linux_is_refused_at_once_without_hardware_virtualization() {
    if host_has_vmx_or_svm() {
        loud(
            "SKIPPED (this host has VMX/SVM, so Linux guests are not refused): \
             linux_is_refused_at_once_without_hardware_virtualization",
        );
        return;
    }
    if !Path::new("/dev/kvm").exists() {
        loud(
            "SKIPPED (no /dev/kvm on this host): \
             linux_is_refused_at_once_without_hardware_virtualization",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The start of a bzImage: the boot sector signature and the "HdrS" setup header magic.
    let mut bzimage = vec![0u8; 64 << 10];
    bzimage[0x1f1] = 4; // setup_sects
    bzimage[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
    bzimage[0x202..0x206].copy_from_slice(b"HdrS");
    bzimage[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    let kernel = dir.path().join("bzImage");
    std::fs::write(&kernel, bzimage).unwrap();

    let mut cmd = Command::new(HERE.fnvm);
    cmd.arg("--home")
        .arg(dir.path().join("home"))
        .args(["vm", "boot", "--kernel"])
        .arg(&kernel);
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a Linux kernel was booted: {stderr}");
    assert!(
        stderr.contains("no hardware virtualization"),
        "the refusal does not name the host's problem: {stderr}"
    );
    assert!(
        stderr.contains("process sandbox"),
        "the refusal does not say what to do instead: {stderr}"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).is_empty(),
        "something ran: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}
