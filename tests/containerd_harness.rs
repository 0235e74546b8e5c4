//! The containerd harness (testkit's [`Containerd`]) proven with containerd's own runc runtime,
//! independent of fnvm: what the containerd shim's tests build on must work before fnvm's
//! runtime is put through it. A real containerd (Debian's 1.6) of the test's own imports the
//! busybox test image from an OCI archive, runs a container that prints and exits, and one
//! that serves HTTP on :9000 in a network namespace of the test's making, fetched with a real
//! HTTP request from inside that namespace; the killed container's exit status comes back
//! through containerd, and once the harness is stopped nothing of it is left. Needs root.

use std::os::unix::fs::MetadataExt as _;
use std::time::{Duration, Instant};

use fnvm_testkit::nethost::TestHost;
use fnvm_testkit::RUNC_RUNTIME;
use fnvm_testkit::{busybox_oci_archive, http, loud, Containerd, Here, BUSYBOX_ARCHIVE_IMAGE};

const HERE: Here = fnvm_testkit::here!();

fn runs_here(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        loud(&format!(
            "SKIPPED: {test}: needs root (containerd, runc, network namespaces)"
        ));
        return false;
    }
    true
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fetches `url` from inside `host`'s namespace until it answers (the server in the container
/// may still be starting); returns the body.
fn fetch_inside(host: &TestHost, url: &str, limit: Duration) -> String {
    host.enter(|| {
        let deadline = Instant::now() + limit;
        loop {
            match http().get(url).call() {
                Ok(mut response) => {
                    assert_eq!(response.status(), 200, "GET {url}");
                    return response.body_mut().read_to_string().unwrap();
                }
                Err(e) if Instant::now() > deadline => {
                    panic!("GET {url} inside {} failed for {limit:?}: {e}", host.name())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
}

#[test]
fn runc_containers_through_the_harness() {
    if !runs_here("runc_containers_through_the_harness") {
        return;
    }
    let started = Instant::now();
    let host = TestHost::new();
    let archive = busybox_oci_archive(&HERE.layouts());
    let containerd = Containerd::builder(HERE.tmp()).start();
    loud(&format!(
        "containerd {} answering after {:?} (snapshotter {}, log {})",
        containerd.dir().display(),
        started.elapsed(),
        containerd.snapshotter(),
        containerd.log().display()
    ));
    let image = containerd.import(&archive);
    assert_eq!(image, BUSYBOX_ARCHIVE_IMAGE);
    let netns = format!("network:{}", host.netns_path().display());

    // A container that prints and exits, in the test's namespace: it sees that namespace's
    // interfaces (loopback and the veth end), not the host's.
    let out = containerd.run(
        &["--rm", "--runtime", RUNC_RUNTIME, "--with-ns", &netns],
        &image,
        "hello",
        &["sh", "-c", "echo hello from runc; ls /sys/class/net"],
    );
    assert!(
        out.status.success(),
        "ctr run --rm failed ({}): {}\ncontainerd's log:\n{}",
        out.status,
        stderr(&out),
        containerd.log_tail(30)
    );
    let printed = stdout(&out);
    assert!(printed.contains("hello from runc"), "{printed}");
    let interfaces: Vec<&str> = printed.lines().skip(1).collect();
    assert!(
        interfaces.contains(&"lo") && interfaces.contains(&host.interface().as_str()),
        "the container is not in {}'s namespace: it sees {interfaces:?}",
        host.name()
    );
    assert!(
        !containerd.containers().contains(&"hello".to_string()),
        "--rm left the container"
    );

    // A container left running, serving HTTP on :9000 in the namespace.
    let out = containerd.run(
        &["-d", "--runtime", RUNC_RUNTIME, "--with-ns", &netns],
        &image,
        "web",
        &[],
    );
    assert!(
        out.status.success(),
        "ctr run -d failed ({}): {}",
        out.status,
        stderr(&out)
    );
    let task = containerd.wait_for_task("web", "RUNNING", Duration::from_secs(10));
    let task_netns = std::fs::metadata(format!("/proc/{}/ns/net", task.pid)).unwrap();
    let test_netns = std::fs::metadata(host.netns_path()).unwrap();
    assert_eq!(
        (task_netns.dev(), task_netns.ino()),
        (test_netns.dev(), test_netns.ino()),
        "the task's init ({}) is not in {}'s network namespace",
        task.pid,
        host.name()
    );
    let body = fetch_inside(&host, "http://127.0.0.1:9000/", Duration::from_secs(10));
    assert!(body.contains("busybox says hello"), "{body}");
    let echoed = fetch_inside(
        &host,
        &format!("http://{}:9000/cgi-bin/echo?from=netns", host.addr()),
        Duration::from_secs(5),
    );
    assert!(echoed.contains("query=from=netns"), "{echoed}");

    // Killed: httpd is PID 1 of its pid namespace, where SIGTERM without a handler does
    // nothing, so SIGKILL; its exit status (128 + 9) comes back through containerd.
    containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "web"]);
    let stopped = containerd.wait_for_task("web", "STOPPED", Duration::from_secs(10));
    assert_eq!(stopped.pid, task.pid, "{stopped:?}");
    let out = containerd.ctr(&["task", "delete", "web"]);
    assert!(out.status.success(), "ctr task delete: {}", stderr(&out));
    assert!(
        stderr(&out).contains("exit code 137"),
        "ctr task delete does not report SIGKILL's exit status 137: {}",
        stderr(&out)
    );
    assert_eq!(containerd.task("web"), None);
    containerd.ctr_ok(&["container", "delete", "web"]);
    assert_eq!(containerd.containers(), Vec::<String>::new());
    assert_eq!(host.processes(), vec![], "processes left in the namespace");

    let footprint = containerd.footprint();
    containerd.stop();
    footprint.assert_nothing_left();
    loud(&format!(
        "runc_containers_through_the_harness: {:?}",
        started.elapsed()
    ));
}

/// A test that fails halfway leaves containers running: the harness's drop removes them and
/// everything else.
#[test]
fn harness_drop_removes_running_containers() {
    if !runs_here("harness_drop_removes_running_containers") {
        return;
    }
    let host = TestHost::new();
    let archive = busybox_oci_archive(&HERE.layouts());
    let containerd = Containerd::builder(HERE.tmp()).start();
    let image = containerd.import(&archive);
    let netns = format!("network:{}", host.netns_path().display());
    for id in ["left-1", "left-2"] {
        let out = containerd.run(
            &["-d", "--runtime", RUNC_RUNTIME, "--with-ns", &netns],
            &image,
            id,
            &["sleep", "1000"],
        );
        assert!(out.status.success(), "ctr run -d {id}: {}", stderr(&out));
        containerd.wait_for_task(id, "RUNNING", Duration::from_secs(10));
    }
    // Created, never started: a container without a task.
    containerd.ctr_ok(&[
        "container",
        "create",
        "--runtime",
        RUNC_RUNTIME,
        &image,
        "created-only",
    ]);
    let footprint = containerd.footprint();
    drop(containerd);
    footprint.assert_nothing_left();
    assert_eq!(host.processes(), vec![], "processes left in the namespace");
}
