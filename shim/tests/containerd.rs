//! fnvm as a containerd runtime: a real containerd (Debian's 1.6, the test's own, testkit's
//! [`Containerd`]) runs the busybox test image through `containerd-shim-fnvm-v2`
//! (`ctr run --runtime io.containerd.fnvm.v2`) in a network namespace the test made, as a
//! kubelet runs a pod's container: its port 9000 answers real HTTP requests inside that
//! namespace (through fnvm's front, with the `X-Scf-*` headers), its output reaches
//! containerd's log, SIGTERM ends it with its own exit status, SIGKILL with 137, and once it is
//! deleted nothing of it is left (process, mount, loop device, file). Bad bundles fail
//! `ctr run` with a sentence naming what is wrong. Runs in the sandbox the host has (the process
//! sandbox here, the VM sandbox where VMX/SVM exists). Needs root.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fnvm_testkit::nethost::TestHost;
use fnvm_testkit::{busybox_oci_archive, http, loud, serial, Containerd, Here, FNVM_RUNTIME};

/// The shim under test, built by cargo for this test in the same invocation as the rest (so
/// with the same features: no rebuild of the workspace in between).
const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-fnvm-v2");
/// The testkit's paths: the static agent and image layouts are found from the profile
/// directory the shim (like `fnvm`) is built in.
const HERE: Here = Here {
    fnvm: SHIM,
    tmp: env!("CARGO_TARGET_TMPDIR"),
};

fn runs_here(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        loud(&format!(
            "SKIPPED: {test}: needs root (containerd, mounts, network namespaces)"
        ));
        return false;
    }
    true
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// One test's node: a containerd whose `io.containerd.fnvm.v2` is the shim under test, with a
/// fresh fnvm home, the busybox test image imported, and a network namespace for its pods.
struct Node {
    containerd: Containerd,
    home: PathBuf,
    image: String,
    host: TestHost,
    /// `network:<the namespace's path>`, for `ctr run --with-ns`.
    netns: String,
}

impl Node {
    fn start(name: &str) -> Node {
        let host = TestHost::new();
        let archive = busybox_oci_archive(&HERE.layouts());
        let home = HERE.fresh_home(name);
        let shim_dir = Path::new(SHIM)
            .parent()
            .expect("the shim sits in a directory");
        let containerd = Containerd::builder(HERE.tmp())
            .shim_dir(shim_dir)
            .env("FNVM_HOME", &home)
            .env("FNVM_AGENT_BIN", HERE.agent())
            .start();
        let image = containerd.import(&archive);
        let netns = format!("network:{}", host.netns_path().display());
        Node {
            containerd,
            home,
            image,
            host,
            netns,
        }
    }

    /// Stops containerd and checks nothing of it or of fnvm's is left.
    fn stop(self) {
        let footprint = self.containerd.footprint();
        self.containerd.stop();
        footprint.assert_nothing_left();
        assert_home_empty(&self.home);
    }
}

/// Fetches `url` from inside `host`'s namespace; the body.
fn fetch_inside(host: &TestHost, url: &str) -> String {
    host.enter(|| {
        let mut response = http()
            .get(url)
            .call()
            .unwrap_or_else(|e| panic!("GET {url} inside {}: {e}", host.name()));
        assert_eq!(response.status(), 200, "GET {url}");
        response.body_mut().read_to_string().unwrap()
    })
}

/// Nothing of fnvm's is left in `home`: no instance, no rootfs image, no loop device or
/// process naming it.
fn assert_home_empty(home: &Path) {
    for dir in ["instances", "containerd"] {
        let left: Vec<_> = std::fs::read_dir(home.join(dir))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "left in {dir}: {left:?}");
    }
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    let home_text = home.display().to_string();
    assert!(
        !loops.contains(&home_text),
        "loop devices left on files of {home_text}:\n{loops}"
    );
    let left = fnvm_testkit::containerd::processes_mentioning(&home_text);
    assert!(left.is_empty(), "processes of the home are left: {left:?}");
}

/// The function of the test: prints a line on each stream, serves /www on :9000 and exits 7
/// on SIGTERM (its shell traps it; a program without a handler would ignore it as a pid
/// namespace's PID 1).
const SERVER: &str = "echo to stdout; echo to stderr >&2; trap 'echo got TERM; exit 7' TERM; \
                      httpd -f -p 0.0.0.0:9000 -h /www & wait";

#[test]
fn a_function_serves_its_port_in_the_pods_namespace_logs_and_ends_with_its_status() {
    if !runs_here("a_function_serves_its_port_in_the_pods_namespace") {
        return;
    }
    let _serial = serial();
    let node = Node::start("containerd-shim-serve");
    let (containerd, host, image, netns) = (&node.containerd, &node.host, &node.image, &node.netns);
    let log = containerd.dir().join("fn.log");
    let log_uri = format!("file://{}", log.display());

    let started = Instant::now();
    let out = containerd.run(
        &[
            "-d",
            "--runtime",
            FNVM_RUNTIME,
            "--with-ns",
            netns,
            "--log-uri",
            &log_uri,
            "--memory-limit",
            &(256u64 << 20).to_string(),
        ],
        image,
        "fn",
        &["sh", "-c", SERVER],
    );
    assert!(
        out.status.success(),
        "ctr run -d --runtime {FNVM_RUNTIME} failed ({}): {}\ncontainerd's log:\n{}",
        out.status,
        stderr(&out),
        containerd.log_tail(40)
    );
    loud(&format!(
        "ctr run -d returned after {:?} (the function listens by then)",
        started.elapsed()
    ));
    let task = containerd.wait_for_task("fn", "RUNNING", Duration::from_secs(5));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", task.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(
        cmdline.contains("fnvm-agent") || cmdline.contains("fnvm-vmm"),
        "the task's pid {} is not the sandbox's process: {cmdline}",
        task.pid
    );

    // Port 9000 in the pod's namespace, through fnvm's front (a web function: requests pass
    // through, with the X-Scf-* headers added).
    let body = fetch_inside(host, "http://127.0.0.1:9000/");
    assert!(body.contains("busybox says hello"), "{body}");
    let echoed = fetch_inside(
        host,
        &format!("http://{}:9000/cgi-bin/echo?from=pod", host.addr()),
    );
    assert!(echoed.contains("query=from=pod"), "{echoed}");
    assert!(
        echoed.contains("HTTP_X_SCF_REQUEST_ID="),
        "no X-Scf-Request-Id reached the function: {echoed}"
    );
    // Not on the host's loopback: the listener is the pod's.
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", 9000)).is_err(),
        "port 9000 answers on the host's loopback"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if (text.contains("to stdout") && text.contains("to stderr")) || Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        logged.contains("to stdout") && logged.contains("to stderr"),
        "the function's output is not in the task's log: {logged:?}"
    );

    let metrics = containerd.ctr_ok(&["task", "metrics", "fn"]);
    assert!(
        metrics.contains("memory.usage_in_bytes"),
        "no memory figure in ctr task metrics: {metrics}"
    );

    let exec = containerd.ctr(&["task", "exec", "--exec-id", "sh1", "fn", "sh"]);
    assert!(!exec.status.success(), "exec succeeded");
    assert!(
        stderr(&exec).contains("exec is not supported by fnvm"),
        "{}",
        stderr(&exec)
    );

    containerd.ctr_ok(&["task", "kill", "fn"]);
    let stopped = containerd.wait_for_task("fn", "STOPPED", Duration::from_secs(20));
    assert_eq!(stopped.pid, task.pid);
    let out = containerd.ctr(&["task", "delete", "fn"]);
    assert!(out.status.success(), "ctr task delete: {}", stderr(&out));
    assert!(
        stderr(&out).contains("exit code 7"),
        "the function's own exit status (7, from its SIGTERM trap) is not what containerd got: {}",
        stderr(&out)
    );
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("got TERM"), "{logged}");
    containerd.ctr_ok(&["container", "delete", "fn"]);

    // SIGKILL: 137, at once.
    let out = containerd.run(
        &["-d", "--runtime", FNVM_RUNTIME, "--with-ns", netns],
        image,
        "fn2",
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    containerd.wait_for_task("fn2", "RUNNING", Duration::from_secs(5));
    let killed = Instant::now();
    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "fn2"]);
    containerd.wait_for_task("fn2", "STOPPED", Duration::from_secs(10));
    loud(&format!(
        "SIGKILL stopped the task in {:?}",
        killed.elapsed()
    ));
    let out = containerd.ctr(&["task", "delete", "fn2"]);
    assert!(stderr(&out).contains("exit code 137"), "{}", stderr(&out));
    containerd.ctr_ok(&["container", "delete", "fn2"]);

    node.stop();
}

/// A fake arm64 program: an ELF header with e_machine = EM_AARCH64.
fn arm64_elf() -> Vec<u8> {
    let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
    elf.resize(16, 0);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0xb7u16.to_le_bytes()); // EM_AARCH64
    elf.resize(64, 0);
    elf
}

#[test]
fn bad_bundles_fail_ctr_run_with_a_sentence_naming_what_is_wrong() {
    if !runs_here("bad_bundles_fail_ctr_run") {
        return;
    }
    let _serial = serial();
    let node = Node::start("containerd-shim-bad");
    let (containerd, image) = (&node.containerd, &node.image);
    let fails = |opts: &[&str], image: &str, id: &str, args: &[&str], says: &[&str]| {
        let mut all = vec!["--rm", "--runtime", FNVM_RUNTIME];
        all.extend_from_slice(opts);
        let out = containerd.run(&all, image, id, args);
        let text = stderr(&out);
        assert!(!out.status.success(), "{id} ran: {text}");
        for words in says {
            assert!(text.contains(words), "{id}: {words:?} is not in: {text}");
        }
        loud(&format!("{id}: {}", text.trim()));
        assert!(
            !containerd.containers().contains(&id.to_string()),
            "--rm left {id}"
        );
    };
    fails(
        &[],
        image,
        "no-command",
        &["/bin/nosuch"],
        &["\"/bin/nosuch\" is not in the rootfs"],
    );
    fails(
        &[],
        image,
        "not-listening",
        &["sh", "-c", "echo bye; exit 3"],
        &["exit code 3", "before it listened on port 9000"],
    );

    // A rootfs of the test's own (`ctr run --rootfs`, no snapshotter) holding an arm64 program.
    let rootfs = containerd.dir().join("arm64-rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::write(rootfs.join("bin/server"), arm64_elf()).unwrap();
    fails(
        &["--rootfs"],
        &rootfs.display().to_string(),
        "arm64",
        &["/bin/server"],
        &["arm64 (aarch64) program", "x86-64 programs only"],
    );
    let missing = containerd.dir().join("no-such-rootfs");
    fails(
        &["--rootfs"],
        &missing.display().to_string(),
        "no-rootfs",
        &["/bin/server"],
        &["no rootfs", "does not exist"],
    );

    node.stop();
}

#[test]
fn a_pods_sandbox_container_holds_and_an_out_of_memory_function_is_an_oom_event_and_137() {
    if !runs_here("a_pods_sandbox_container_holds") {
        return;
    }
    let _serial = serial();
    let node = Node::start("containerd-shim-pod");
    let (containerd, image, netns) = (&node.containerd, &node.image, &node.netns);
    let events_log = containerd.dir().join("events.log");
    let mut events = std::process::Command::new("ctr")
        .arg("--address")
        .arg(containerd.address())
        .arg("events")
        .stdout(std::fs::File::create(&events_log).unwrap())
        .spawn()
        .expect("ctr events");

    // The CRI plugin's sandbox container (Kubernetes' pause): held by the shim, nothing runs.
    let out = containerd.run(
        &[
            "-d",
            "--runtime",
            FNVM_RUNTIME,
            "--with-ns",
            netns,
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
        ],
        image,
        "pod",
        &["/pause"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let pod = containerd.wait_for_task("pod", "RUNNING", Duration::from_secs(5));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pod.pid)).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("containerd-shim-fnvm-v2"),
        "the pod sandbox's pid is not its shim's"
    );

    // A function that outgrows its 128 MiB once it serves: its memory cgroup's OOM killer
    // ends it, containerd hears an OOM event and the exit status 137.
    let out = containerd.run(
        &[
            "-d",
            "--runtime",
            FNVM_RUNTIME,
            "--with-ns",
            netns,
            "--memory-limit",
            &(128u64 << 20).to_string(),
        ],
        image,
        "hungry",
        &[
            "sh",
            "-c",
            "httpd -f -p 0.0.0.0:9000 -h /www & sleep 1; \
             exec dd if=/dev/zero of=/dev/null bs=400M count=1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    containerd.wait_for_task("hungry", "STOPPED", Duration::from_secs(30));
    let out = containerd.ctr(&["task", "delete", "hungry"]);
    assert!(stderr(&out).contains("exit code 137"), "{}", stderr(&out));
    containerd.ctr_ok(&["container", "delete", "hungry"]);

    containerd.ctr_ok(&["task", "kill", "pod"]);
    containerd.wait_for_task("pod", "STOPPED", Duration::from_secs(5));
    let out = containerd.ctr(&["task", "delete", "pod"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        !stderr(&out).contains("exit code"),
        "SIGTERM ends a pod sandbox with 0: {}",
        stderr(&out)
    );
    containerd.ctr_ok(&["container", "delete", "pod"]);

    let _ = events.kill();
    let _ = events.wait();
    let events = std::fs::read_to_string(&events_log).unwrap();
    let oom = events
        .lines()
        .find(|l| l.contains("/tasks/oom"))
        .unwrap_or_else(|| panic!("no /tasks/oom event:\n{events}"));
    assert!(oom.contains("hungry"), "{oom}");
    for topic in [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ] {
        assert!(
            events
                .lines()
                .any(|l| l.contains(topic) && l.contains("hungry")),
            "no {topic} event of the function:\n{events}"
        );
    }

    node.stop();
}
