//! A function under Docker's default seccomp profile, through `fnvm run`, in each sandbox the
//! level runs (the vm sandbox at the nested level): `/proc/self/status` says `Seccomp: 2` for
//! the function and what it starts, without `no_new_privs` (setuid programs work as under
//! Docker); calls the profile refuses fail although no capability would be needed for them
//! (a user namespace from busybox's `unshare -U`, a keyring look-up from python3), clone3 says
//! ENOSYS so that glibc falls back to clone (threads and fork work), sockets of AF_ALG and
//! AF_VSOCK are refused; and the function serves as before. Needs root.

use std::time::Duration;

use fnvm_testkit::{
    assert_nothing_left, busybox_image_with, python_image, rootfs_image_of, sandboxes, serial,
    FnvmRun, Here,
};

const HERE: Here = fnvm_testkit::here!();
/// Generous: a vm start at the nested level is emulated.
const START_LIMIT: Duration = Duration::from_secs(120);

/// The busybox function's checks, then its web server.
const BUSYBOX_SCRIPT: &str = r#"grep -E '^(Seccomp|Seccomp_filters|NoNewPrivs):' /proc/self/status
    if busybox unshare -U true 2>/tmp/unshare.err; then echo "UNSHARE WORKED"; else echo "unshare refused: $(cat /tmp/unshare.err)"; fi
    sh -c 'grep "^Seccomp:" /proc/self/status' | while read -r line; do echo "child $line"; done
    echo "checks done"
    exec httpd -f -p 0.0.0.0:9000 -h /www"#;

/// The python3 function's checks, then the test image's python server (exec'd: it inherits
/// the filter).
const PYTHON_SCRIPT: &str = r#"
import ctypes, errno, os, socket, threading
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    rc = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return "ok" if rc >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
# keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0): any process may, Docker refuses.
print("keyctl:", call(250, 0, -3, 0))
# clone3(NULL, 0): EINVAL from the kernel; ENOSYS from the profile.
print("clone3:", call(435, 0, 0))
ran = []
t = threading.Thread(target=lambda: ran.append(1))
t.start(); t.join()
print("thread:", "ran" if ran else "did not run")
pid = os.fork()
if pid == 0:
    os._exit(7)
print("fork: exit", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
for name, family, kind in (("AF_ALG", 38, socket.SOCK_SEQPACKET), ("AF_VSOCK", 40, socket.SOCK_STREAM)):
    try:
        socket.socket(family, kind).close()
        print(name + ": opened")
    except OSError as e:
        print(name + ":", errno.errorcode.get(e.errno, "?"))
print("checks done", flush=True)
os.execvp("python3", ["python3", "-u", "/srv/server.py"])
"#;

/// The function's stdout lines once it printed "checks done".
fn said(run: &FnvmRun) -> Vec<String> {
    run.stdout
        .wait_for(Duration::from_secs(60), |l| l.ends_with("checks done"));
    run.log_lines()
        .into_iter()
        .filter(|(stream, _)| stream == "stdout")
        .map(|(_, line)| line)
        .collect()
}

fn get(run: &FnvmRun, path: &str) -> String {
    fnvm_testkit::http()
        .get(run.url(path))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

fn stop_and_check(mut run: FnvmRun) {
    let id = run.instance_id.clone().expect("an instance id");
    let rootfs = rootfs_image_of(&run);
    let status = run.interrupt(Duration::from_secs(30));
    assert!(status.success(), "fnvm run exited with {status}");
    assert_nothing_left(&run.home, &id, rootfs.as_deref());
}

#[test]
fn a_busybox_function_runs_filtered_cannot_make_a_user_namespace_and_still_serves() {
    let image = busybox_image_with(
        &HERE.layouts(),
        "seccomp-busybox",
        &[],
        Some(vec!["/bin/sh".into(), "-c".into(), BUSYBOX_SCRIPT.into()]),
    );
    for sandbox in sandboxes("seccomp (busybox)") {
        let _serial = serial();
        let home = HERE.fresh_home(&format!("seccomp-busybox-{sandbox}"));
        let args = ["--sandbox", sandbox, "--type", "web"];
        let run = FnvmRun::start(HERE.fnvm(), &home, HERE.agent(), &image, &args, START_LIMIT);
        run.expect_serving();
        let said = said(&run);
        let text = said.join("\n");
        for line in [
            "Seccomp:\t2",
            "Seccomp_filters:\t2",
            "NoNewPrivs:\t0",
            "child Seccomp:\t2",
        ] {
            assert!(
                said.contains(&line.to_string()),
                "{sandbox}: no {line:?}:\n{text}"
            );
        }
        assert!(
            said.iter().any(
                |l| l.starts_with("unshare refused: ") && l.contains("Operation not permitted")
            ),
            "{sandbox}: unshare -U was not refused with EPERM:\n{text}"
        );
        assert!(!text.contains("UNSHARE WORKED"), "{sandbox}: {text}");
        // Its web server, and a CGI script it forks and execs per request.
        assert!(get(&run, "/index.html").contains("busybox says hello"));
        let cgi = get(&run, "/cgi-bin/echo?seccomp=1");
        assert!(cgi.contains("query=seccomp=1"), "{sandbox}: {cgi}");
        stop_and_check(run);
    }
}

#[test]
fn a_python_function_gets_enosys_for_clone3_eperm_for_keyrings_and_still_serves() {
    let image = python_image(&HERE.layouts());
    for sandbox in sandboxes("seccomp (python3)") {
        let _serial = serial();
        let home = HERE.fresh_home(&format!("seccomp-python-{sandbox}"));
        let args = [
            "--sandbox",
            sandbox,
            "--type",
            "web",
            "--memory",
            "256",
            "--command",
            "python3",
            "--arg",
            "-c",
            "--arg",
            PYTHON_SCRIPT,
        ];
        let run = FnvmRun::start(HERE.fnvm(), &home, HERE.agent(), &image, &args, START_LIMIT);
        run.expect_serving();
        let said = said(&run);
        let text = said.join("\n");
        for line in [
            "keyctl: EPERM",
            "clone3: ENOSYS",
            "thread: ran",
            "fork: exit 7",
            "AF_ALG: EPERM",
            "AF_VSOCK: EPERM",
        ] {
            assert!(
                said.contains(&line.to_string()),
                "{sandbox}: no {line:?}:\n{text}"
            );
        }
        // The server python exec'd is filtered too, and serves (threads per request).
        let status = get(&run, "/file?path=/proc/self/status");
        assert!(status.contains(r"Seccomp:\t2"), "{sandbox}: {status}");
        assert!(get(&run, "/random").contains("hex"), "{sandbox}");
        stop_and_check(run);
    }
}
