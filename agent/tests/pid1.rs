//! The agent as a real PID 1, on this host: the init of fresh pid/mount/net/uts/ipc namespaces,
//! chrooted into a directory that holds only the agent (and the shared libraries of this test
//! build). That is what the process sandbox does, and the closest a host without VMX/SVM gets to
//! a Linux guest. In a non-initial PID namespace, reboot() ends the namespace's init with
//! SIGHUP instead of rebooting anything, so the test sees the clean shutdown as that signal.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

const AGENT: &str = env!("CARGO_BIN_EXE_fnvm-agent");

/// One line straight to stderr (not captured by the test harness): a skip is never silent.
fn skip(why: &str, test: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED ({why}): {test}");
}

/// Copies `binary` to `root/sbin/init` with every shared library it needs at the same paths.
fn install_as_init(binary: &Path, root: &Path) {
    let init = root.join("sbin/init");
    std::fs::create_dir_all(init.parent().unwrap()).unwrap();
    std::fs::copy(binary, &init).unwrap();
    let ldd = Command::new("ldd")
        .arg(binary)
        .output()
        .expect("cannot run ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dest).unwrap_or_else(|e| panic!("cannot copy {lib}: {e}"));
    }
}

#[test]
fn agent_as_pid1_mounts_reports_uptime_and_reboots() {
    let test = "agent_as_pid1_mounts_reports_uptime_and_reboots";
    if !nix_is_root() {
        skip("needs root for namespaces and mounts", test);
        return;
    }
    let root = tempfile::tempdir().unwrap();
    install_as_init(Path::new(AGENT), root.path());
    // Empty mount points: the agent must mount proc, sysfs and devtmpfs itself.
    for dir in ["proc", "sys", "dev"] {
        std::fs::create_dir_all(root.path().join(dir)).unwrap();
    }

    // --fork makes the agent PID 1 of the new PID namespace (without it the agent refuses).
    let out = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--net",
            "--uts",
            "--ipc",
            "--propagation",
            "private",
        ])
        .arg("chroot")
        .arg(root.path())
        .arg("/sbin/init")
        .output()
        .expect("cannot run unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    assert!(
        !stdout.contains("error"),
        "the agent reported an error:\n{stdout}{stderr}"
    );
    let up = stdout
        .lines()
        .find(|l| l.starts_with("fnvm-agent: up after "))
        .unwrap_or_else(|| panic!("no agent line:\n{stdout}{stderr}"));
    let seconds: f64 = up
        .trim_start_matches("fnvm-agent: up after ")
        .trim_end_matches(" s")
        .parse()
        .unwrap_or_else(|_| panic!("the uptime in {up:?} is not a number"));
    assert!(seconds > 0.0, "{up}");
    // reboot(RB_AUTOBOOT) in a child PID namespace: its init dies of SIGHUP, and unshare passes
    // that signal on.
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGHUP),
        "the agent did not end through reboot ({}):\n{stdout}{stderr}",
        out.status
    );
}

#[test]
fn agent_refuses_to_run_as_anything_but_pid1() {
    let out = Command::new(AGENT).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not PID 1"), "{stderr}");
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
