//! Whole-system tests of the process sandbox: the real static agent, a busybox rootfs image made
//! here, real loop devices, namespaces and cgroups, HTTP through the sandbox's port 9000.
//! They need root (skipped loudly otherwise) and build the agent when FNVM_AGENT_BIN is unset.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fnvm_agent::protocol::{StartSpec, NOT_LISTENING_MESSAGE};

use super::{cgroup, loopdev, ProcessSandbox};
use crate::home::Home;
use crate::sandbox::instance::writable_layer::WRITABLE_LAYER_BYTES;
use crate::sandbox::{
    instances_root, Instance, InstanceSpec, LogLine, LogStream, Sandbox, SandboxError,
};

pub(crate) fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIP: process sandbox tests need root (namespaces, loop devices, cgroups)");
    false
}

pub(crate) fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The static agent: $FNVM_AGENT_BIN, else built here (a no-op when it is fresh). Shared by
/// every test of this package that starts a process sandbox.
pub(crate) fn agent() -> PathBuf {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT
        .get_or_init(|| {
            if let Some(explicit) = std::env::var_os("FNVM_AGENT_BIN") {
                return PathBuf::from(explicit);
            }
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--release",
                    "-p",
                    "fnvm-agent",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                ])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .current_dir(workspace())
                .status()
                .expect("cargo runs");
            assert!(status.success(), "building the static agent failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace().join("target"));
            target.join("x86_64-unknown-linux-gnu/release/fnvm-agent")
        })
        .clone()
}

/// A busybox rootfs image (ext4, made with mkfs.ext4 -d), built once per test run.
pub(super) fn busybox_rootfs() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let scratch = workspace().join("target/sandbox-tests");
            std::fs::create_dir_all(&scratch).unwrap();
            let tree = tempfile::tempdir_in(&scratch).unwrap();
            let root = tree.path();
            for dir in [
                "bin", "sbin", "etc", "tmp", "proc", "sys", "dev", "www", "root", "usr/bin",
            ] {
                std::fs::create_dir_all(root.join(dir)).unwrap();
            }
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
                .unwrap();
            std::fs::copy("/bin/busybox", root.join("bin/busybox"))
                .expect("busybox-static is installed (/bin/busybox)");
            for applet in [
                "sh", "httpd", "dd", "echo", "sleep", "cat", "ls", "ps", "id", "env", "sync", "rm",
                "mknod", "head", "wc", "grep",
            ] {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
            std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
            std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
            std::fs::write(root.join("www/index.html"), "hello from busybox\n").unwrap();
            let image = scratch.join(format!("busybox-{}.ext4", std::process::id()));
            let out = Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-d"])
                .arg(root)
                .arg(&image)
                .arg("32M")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stable = scratch.join("busybox.ext4");
            std::fs::rename(&image, &stable).unwrap();
            stable
        })
        .clone()
}

/// One test's world: its own home and its own copy of the rootfs image (so loop devices on it
/// can be checked without other tests' instances in the way).
pub(super) struct World {
    pub(super) _tmp: tempfile::TempDir,
    pub(super) home: Home,
    pub(super) rootfs: PathBuf,
    pub(super) sandbox: ProcessSandbox,
}

impl World {
    pub(super) fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(tmp.path().join("home"))).unwrap();
        let rootfs = tmp.path().join("rootfs.ext4");
        std::fs::copy(busybox_rootfs(), &rootfs).unwrap();
        let sandbox = ProcessSandbox::with_agent(&home, agent()).unwrap();
        World {
            _tmp: tmp,
            home,
            rootfs,
            sandbox,
        }
    }

    pub(super) fn spec(
        &self,
        id: &str,
        script: &str,
        ready_timeout_ms: u64,
    ) -> (InstanceSpec, Logs) {
        let logs = Logs::default();
        let sink = logs.clone();
        let spec = InstanceSpec {
            id: id.to_string(),
            rootfs_image: self.rootfs.clone(),
            start: StartSpec {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                env: vec!["PATH=/bin".into()],
                working_dir: "/".into(),
                user: None,
                ready_timeout_ms,
                resolv_conf: None,
            },
            memory_mib: 256,
            instance_dir: instances_root(&self.home).unwrap().join(id),
            snapshot: false,
            network: crate::network::NetworkPolicy::none(),
            on_log: Arc::new(move |line| sink.0.lock().unwrap().push(line)),
        };
        (spec, logs)
    }

    /// No process, loop device, cgroup, mount or file of the instance is left.
    pub(super) fn assert_nothing_left(&self, spec: &InstanceSpec) {
        let dir = &spec.instance_dir;
        assert!(!dir.exists(), "{} is left", dir.display());
        let loops: Vec<_> = loopdev::attached()
            .into_iter()
            .filter(|(_, b)| b.starts_with(dir) || b == &self.rootfs)
            .collect();
        assert!(loops.is_empty(), "loop devices left: {loops:?}");
        let needle = dir.to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(!cmdline.contains(&needle), "process left: {cmdline}");
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&needle), "mount left: {mounts}");
        if let Ok(h) = cgroup::Hierarchy::probe() {
            let left: Vec<_> = std::fs::read_dir(h.parent())
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(&spec.id))
                .map(|e| e.path())
                .collect();
            assert!(left.is_empty(), "cgroups left: {left:?}");
        }
    }
}

#[derive(Clone, Default)]
pub(super) struct Logs(Arc<Mutex<Vec<LogLine>>>);

impl Logs {
    pub(super) fn lines(&self, stream: LogStream) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.line.clone())
            .collect()
    }
}

pub(super) fn http_get(instance: &dyn Instance, path: &str) -> String {
    let mut stream = instance.connect().expect("connect to port 9000");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: function\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    reply
}

#[test]
fn process_sandbox_serves_busybox_httpd_and_forwards_its_logs() {
    if !is_root() {
        return;
    }
    let world = World::new();
    let (spec, logs) = world.spec(
        "serve",
        "echo to-stdout; echo to-stderr >&2; exec httpd -f -p 9000 -h /www",
        30_000,
    );
    let instance = world
        .sandbox
        .start(spec.clone())
        .expect("the instance starts");
    let reply = http_get(instance.as_ref(), "/index.html");
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.ends_with("hello from busybox\n"), "{reply}");
    assert!(instance.exited().is_none());
    assert!(logs
        .lines(LogStream::Stdout)
        .contains(&"to-stdout".to_string()));
    assert!(logs
        .lines(LogStream::Stderr)
        .contains(&"to-stderr".to_string()));
    instance.stop().unwrap();
    instance.stop().unwrap(); // idempotent
    let report = instance.wait_exit();
    assert!(report.reason.starts_with("stopped"), "{report}");
    world.assert_nothing_left(&spec);
}

/// Two instances of one image mount one loop device (one ext4 superblock, so the second finds
/// the files the first read in the kernel's caches); it goes when the last of them stops.
#[test]
fn instances_of_one_image_share_its_loop_device_until_the_last_stops() {
    if !is_root() {
        return;
    }
    let world = World::new();
    let rootfs_loops = || {
        loopdev::attached()
            .into_iter()
            .filter(|(_, backing)| backing == &world.rootfs)
            .count()
    };
    let (first_spec, _) = world.spec("first", "exec httpd -f -p 9000 -h /www", 30_000);
    let (second_spec, _) = world.spec("second", "exec httpd -f -p 9000 -h /www", 30_000);
    let first = world
        .sandbox
        .start(first_spec.clone())
        .expect("the first starts");
    let second = world
        .sandbox
        .start(second_spec.clone())
        .expect("the second starts");
    assert_eq!(rootfs_loops(), 1, "one loop device for the image");
    for instance in [&first, &second] {
        let reply = http_get(instance.as_ref(), "/index.html");
        assert!(reply.ends_with("hello from busybox\n"), "{reply}");
    }
    first.stop().unwrap();
    first.wait_exit();
    assert_eq!(rootfs_loops(), 1, "still there for the second instance");
    let reply = http_get(second.as_ref(), "/index.html");
    assert!(reply.ends_with("hello from busybox\n"), "{reply}");
    second.stop().unwrap();
    second.wait_exit();
    world.assert_nothing_left(&first_spec);
    world.assert_nothing_left(&second_spec);
}

/// What the host does after a snapshot restore (whose vsock reset dropped its streams): a new
/// link connection, Hello, Refresh. The agent answers Refreshed, its messages (the function's
/// later log lines) follow the new connection, and the function keeps serving. In the process
/// sandbox Refresh leaves the clock and RNG alone (they are the host's).
#[test]
fn a_reconnecting_host_refreshes_the_agent_and_gets_the_functions_later_lines() {
    if !is_root() {
        return;
    }
    let world = World::new();
    let (spec, old_logs) = world.spec(
        "reconnect",
        "(i=0; while :; do i=$((i+1)); echo tick-$i; sleep 0.05; done) & \
         exec httpd -f -p 9000 -h /www",
        30_000,
    );
    let instance = world
        .sandbox
        .start(spec.clone())
        .expect("the instance starts");
    let new_logs = Logs::default();
    let sink = new_logs.clone();
    let transport = crate::sandbox::transport::HostTransport::Unix {
        dir: spec.instance_dir.join("sock"),
    };
    let link = crate::sandbox::link::resume(
        &transport,
        Arc::new(move |line| sink.0.lock().unwrap().push(line)),
        crate::sandbox::exit::ExitState::new(|| None),
        &|| None,
        Duration::from_secs(10),
    )
    .expect("the agent answers Refresh on a new connection");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while new_logs.lines(LogStream::Stdout).len() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = new_logs.lines(LogStream::Stdout);
    assert!(
        after.len() >= 3 && after.iter().all(|l| l.starts_with("tick-")),
        "the new connection gets the function's lines: {after:?}"
    );
    // Numbers go on from where the old connection's lines stopped: nothing is replayed.
    let last_old: u64 = old_logs
        .lines(LogStream::Stdout)
        .iter()
        .filter_map(|l| l.strip_prefix("tick-")?.parse().ok())
        .max()
        .unwrap_or(0);
    let first_new: u64 = after[0].strip_prefix("tick-").unwrap().parse().unwrap();
    assert!(first_new > last_old, "{first_new} after {last_old}");
    let reply = http_get(instance.as_ref(), "/index.html");
    assert!(reply.ends_with("hello from busybox\n"), "{reply}");
    link.close();
    instance.stop().unwrap();
    world.assert_nothing_left(&spec);
}

/// The writable layer holds 512 MiB and not a byte more, inside the sandbox and on the host.
#[test]
fn process_sandbox_writes_stop_at_512_mib_and_the_server_keeps_serving() {
    if !is_root() {
        return;
    }
    let world = World::new();
    let (spec, logs) = world.spec(
        "fill",
        "dd if=/dev/zero of=/tmp/fill bs=1048576 count=600; echo dd-exit=$?; \
         sync; exec httpd -f -p 9000 -h /www",
        60_000,
    );
    let instance = world
        .sandbox
        .start(spec.clone())
        .expect("the instance starts");
    let stderr = logs.lines(LogStream::Stderr).join("\n");
    let stdout = logs.lines(LogStream::Stdout).join("\n");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(stdout.contains("dd-exit=1"), "{stdout}");
    // "N+0 records out": how many MiB made it, near 512 (ext4 keeps a little for itself).
    let written: u64 = stderr
        .lines()
        .find_map(|l| {
            l.strip_suffix(" records out")?
                .split('+')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no dd summary in {stderr}"));
    assert!((400..=512).contains(&written), "{written} MiB written");
    let layer = spec.instance_dir.join("writable.ext4");
    let meta = std::fs::metadata(&layer).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), WRITABLE_LAYER_BYTES);
    assert!(
        meta.blocks() * 512 <= WRITABLE_LAYER_BYTES,
        "host file holds {} bytes",
        meta.blocks() * 512
    );
    assert!(
        meta.blocks() * 512 >= written << 20,
        "the writes are on the layer"
    );
    let reply = http_get(instance.as_ref(), "/");
    assert!(reply.contains("hello from busybox"), "{reply}");
    instance.stop().unwrap();
    world.assert_nothing_left(&spec);
}

#[test]
fn process_sandbox_reports_a_server_that_never_listens_with_the_exact_message() {
    if !is_root() {
        return;
    }
    let world = World::new();
    let (spec, _logs) = world.spec("deaf", "echo starting up; exec sleep 1000", 1_500);
    let err = world
        .sandbox
        .start(spec.clone())
        .err()
        .expect("start fails");
    match &err {
        SandboxError::NotListening {
            message,
            last_lines,
        } => {
            assert_eq!(message, NOT_LISTENING_MESSAGE);
            assert!(
                last_lines.contains(&"starting up".to_string()),
                "{last_lines:?}"
            );
        }
        other => panic!("expected NotListening, got {other}"),
    }
    assert_eq!(err.to_string(), NOT_LISTENING_MESSAGE);
    world.assert_nothing_left(&spec);
}

#[test]
fn process_sandbox_reports_exits_with_code_and_last_lines() {
    if !is_root() {
        return;
    }
    let world = World::new();
    // Before ready: start fails with the exit.
    let (spec, _logs) = world.spec("early", "echo giving up; exit 3", 30_000);
    match world.sandbox.start(spec.clone()) {
        Err(SandboxError::Exited(report)) => {
            assert_eq!(report.code, Some(3), "{report}");
            assert!(
                report.last_lines.contains(&"giving up".to_string()),
                "{report}"
            );
        }
        Err(other) => panic!("expected Exited, got {other}"),
        Ok(_) => panic!("a function that exits at once must not start"),
    }
    world.assert_nothing_left(&spec);

    // After ready: wait_exit reports it (httpd daemonizes; the main process exits later).
    let (spec, _logs) = world.spec(
        "late",
        "httpd -p 9000 -h /www; sleep 2; echo done serving; exit 7",
        30_000,
    );
    let instance = world
        .sandbox
        .start(spec.clone())
        .expect("the instance starts");
    let report = instance.wait_exit();
    assert_eq!(report.code, Some(7), "{report}");
    assert!(
        report.last_lines.contains(&"done serving".to_string()),
        "{report}"
    );
    assert_eq!(instance.exited(), Some(report));
    instance.stop().unwrap();
    world.assert_nothing_left(&spec);
}

#[test]
fn process_sandbox_has_its_own_namespaces_and_memory_limit() {
    if !is_root() {
        return;
    }
    let world = World::new();
    let (spec, logs) = world.spec(
        "inside",
        "echo host=$(cat /proc/sys/kernel/hostname); ls /sys/class/net; exec httpd -f -p 9000 -h /www",
        30_000,
    );
    let instance = world
        .sandbox
        .start(spec.clone())
        .expect("the instance starts");
    let stdout = logs.lines(LogStream::Stdout);
    // Only loopback: no host interface is visible.
    assert!(stdout.contains(&"lo".to_string()), "{stdout:?}");
    assert!(
        !stdout
            .iter()
            .any(|l| l.starts_with("eth") || l.starts_with("en")),
        "{stdout:?}"
    );
    if let Ok(h) = cgroup::Hierarchy::probe() {
        let dir = std::fs::read_dir(h.parent())
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with("-inside"))
            .expect("the instance has a cgroup")
            .path();
        let limit = ["memory.max", "memory.limit_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .unwrap();
        assert_eq!(limit.trim(), (256u64 << 20).to_string());
        assert!(
            !cgroup::pids(&dir).is_empty(),
            "the sandbox runs in its cgroup"
        );
    }
    instance.stop().unwrap();
    world.assert_nothing_left(&spec);
}

mod isolation;
mod standby;
