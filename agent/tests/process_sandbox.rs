//! The whole agent in the process sandbox, as fnvm runs it: PID 1 of fresh pid/mount/uts/ipc/net
//! namespaces, with a real ext4 rootfs image (busybox) and a 512 MiB writable layer on loop
//! devices, driven over its Unix sockets by a host written against the real protocol. Each
//! test also checks that nothing is left behind: no process, no mount, no busy loop device.

use std::io::{BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fnvm_agent::protocol::{
    read_message, write_message, AgentMessage, HostMessage, LogStream, StartSpec, CONTROL_PORT,
    FUNCTION_PORT, NOT_LISTENING_MESSAGE, PROTOCOL_VERSION,
};

const AGENT: &str = env!("CARGO_BIN_EXE_fnvm-agent");
/// Busybox applets linked into the test rootfs.
const APPLETS: &[&str] = &[
    "sh", "httpd", "echo", "ps", "sleep", "seq", "id", "pwd", "dd", "cat", "ls", "df", "touch",
    "hostname", "mount",
];

/// One line straight to stderr: a skip is never silent.
fn skip(why: &str, test: &str) -> bool {
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED ({why}): {test}");
    true
}

fn must_skip(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root for namespaces, mounts and loop devices", test);
    }
    for tool in ["unshare", "losetup", "mkfs.ext4"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return skip(&format!("{tool} is not installed"), test);
        }
    }
    if !Path::new("/bin/busybox").exists() {
        return skip("busybox-static is not installed (/bin/busybox)", test);
    }
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A busybox rootfs image (ext4) with accounts and a web root.
fn build_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        root.join("etc/group"),
        "root:x:0:\napp:x:1000:\nstaff:x:50:app\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::write(root.join("www/index.html"), "hello from the function\n").unwrap();
    // No /proc, /dev, /sys or /tmp: the agent must create them (on the writable layer).
    let image = dir.join("rootfs.ext4");
    run(Command::new("mkfs.ext4")
        .args(["-q", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("16M"));
    image
}

/// The per-instance writable layer, as the host makes it: a sparse 512 MiB ext4 file.
fn build_writable_layer(dir: &Path) -> PathBuf {
    let file = dir.join("writable.ext4");
    run(Command::new("truncate").args(["-s", "512M"]).arg(&file));
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-m",
            "0",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
        ])
        .arg(&file));
    file
}

/// One agent as PID 1 of fresh namespaces, and the test's view of it.
struct Sandbox {
    dir: tempfile::TempDir,
    socket_dir: PathBuf,
    loops: Vec<String>,
    agent: Option<Child>,
}

impl Sandbox {
    fn start() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = build_rootfs(dir.path());
        let writable = build_writable_layer(dir.path());
        let rootfs_loop = run(Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(&rootfs));
        let writable_loop = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&writable));
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).unwrap();
        let agent = Command::new("unshare")
            .args([
                "--fork",
                "--pid",
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--propagation",
                "private",
            ])
            .arg(AGENT)
            .args(["--sandbox", "process", "--socket-dir"])
            .arg(&socket_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a failed test can kill everything it started.
            .process_group(0)
            .spawn()
            .expect("cannot run unshare (util-linux)");
        // The disks come on standard input once the agent listens (what fnvm does too).
        let mut agent = agent;
        let placement = fnvm_agent::protocol::Placement {
            rootfs: rootfs_loop.clone(),
            writable: Some(writable_loop.clone()),
        };
        let mut stdin = agent.stdin.take().unwrap();
        fnvm_agent::protocol::write_message(&mut stdin, &placement).unwrap();
        drop(stdin);
        Sandbox {
            dir,
            socket_dir,
            loops: vec![rootfs_loop, writable_loop],
            agent: Some(agent),
        }
    }

    fn connect_port(&self, port: u32) -> UnixStream {
        let path = self.socket_dir.join(format!("{port}.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => return s,
                Err(e) if Instant::now() > deadline => {
                    panic!("the agent never listened on {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Connects the control stream and exchanges Hello.
    fn control(&self) -> Host {
        let stream = self.connect_port(CONTROL_PORT);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut host = Host {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        host.send(&HostMessage::Hello {
            version: PROTOCOL_VERSION,
        });
        match host.recv() {
            Some(AgentMessage::Hello { version, agent, .. }) => {
                assert_eq!(version, PROTOCOL_VERSION);
                assert!(agent.starts_with("fnvm-agent "), "{agent}");
            }
            other => panic!("expected the agent's hello, got {other:?}"),
        }
        host
    }

    /// An HTTP/1.0 GET through the function port, the request half-closed after sending.
    fn get(&self, path: &str) -> Vec<u8> {
        let mut s = self.connect_port(FUNCTION_PORT);
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let request = format!("GET {path} HTTP/1.0\r\nHost: function\r\n\r\n");
        s.write_all(request.as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).unwrap();
        reply
    }

    /// The agent's pid on this host (the child of unshare).
    fn agent_host_pid(&self) -> Option<u32> {
        let unshare = self.agent.as_ref()?.id();
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
        children.split_whitespace().next()?.parse().ok()
    }

    /// Waits for the agent to end; returns its exit code and its own output.
    fn wait_end(&mut self) -> (Option<i32>, String) {
        let mut agent = self.agent.take().expect("already waited");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if agent.try_wait().unwrap().is_some() {
                break;
            }
            assert!(Instant::now() < deadline, "the agent did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = agent.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    }

    /// After the agent ended: no process of its group, no mount of the test's files, and the
    /// loop devices free (nothing holds them: an exclusive open succeeds).
    fn assert_nothing_left(&self, pgid: u32) {
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(-(pgid as i32), 0) } == 0;
        assert!(!alive, "processes of the sandbox are still running");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let dir = self.dir.path().display().to_string();
        for l in &self.loops {
            assert!(
                !mountinfo.contains(l.as_str()) && !mountinfo.contains(&dir),
                "a mount is left on the host:\n{mountinfo}"
            );
        }
        for l in &self.loops {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_EXCL)
                    .open(l)
                {
                    Ok(_) => break,
                    Err(e) if Instant::now() > deadline => {
                        panic!("{l} is still in use after the agent ended: {e}")
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(agent) = self.agent.take() {
            // SAFETY: SIGKILL to the process group this test created.
            unsafe { libc::kill(-(agent.id() as i32), libc::SIGKILL) };
            if let Ok(out) = agent.wait_with_output() {
                if std::thread::panicking() {
                    eprintln!(
                        "the agent's own output:\n{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
            }
        }
        for l in &self.loops {
            let _ = Command::new("losetup").arg("-d").arg(l).status();
        }
    }
}

/// The host end of the control stream.
struct Host {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Host {
    fn send(&mut self, message: &HostMessage) {
        write_message(&mut self.writer, message).unwrap();
    }

    fn recv(&mut self) -> Option<AgentMessage> {
        read_message(&mut self.reader).expect("reading from the agent")
    }

    /// Collects messages until `stop` says so; returns everything seen.
    fn until(&mut self, mut stop: impl FnMut(&AgentMessage) -> bool) -> Vec<AgentMessage> {
        let mut seen = Vec::new();
        loop {
            let m = self
                .recv()
                .unwrap_or_else(|| panic!("the agent closed the stream; so far: {seen:?}"));
            let done = stop(&m);
            seen.push(m);
            if done {
                return seen;
            }
        }
    }
}

fn spec(argv: &[&str]) -> StartSpec {
    StartSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![
            "PATH=/bin".into(),
            "USER=qcloud".into(),
            "TENCENTCLOUD_RUNENV=SCF".into(),
        ],
        working_dir: "/".into(),
        user: None,
        ready_timeout_ms: 20_000,
        resolv_conf: None,
    }
}

fn lines_of(messages: &[AgentMessage], which: LogStream) -> Vec<String> {
    messages
        .iter()
        .filter_map(|m| match m {
            AgentMessage::Log { stream, line, .. } if *stream == which => Some(line.clone()),
            _ => None,
        })
        .collect()
}

fn is_exited(m: &AgentMessage) -> bool {
    matches!(m, AgentMessage::Exited { .. })
}

#[test]
fn serves_http_through_the_bridge_with_the_function_as_pid_1() {
    let test = "serves_http_through_the_bridge_with_the_function_as_pid_1";
    if must_skip(test) {
        return;
    }
    let mut sandbox = Sandbox::start();
    let pgid = sandbox.agent.as_ref().unwrap().id();
    let mut host = sandbox.control();
    let mut start = spec(&[
        "sh",
        "-c",
        "ps -o pid,user,args; echo uid=$(id -u) cwd=$(pwd) host=$(hostname) env=$TENCENTCLOUD_RUNENV; \
         ls /dev; echo to-stderr >&2; \
         dd if=/dev/zero of=/www/big bs=1M count=100 2>/dev/null; \
         exec httpd -f -p 9000 -h /www",
    ]);
    start.working_dir = "/srv/work".into();
    host.send(&HostMessage::Start(start));
    let seen = host.until(|m| {
        matches!(
            m,
            AgentMessage::Ready { .. } | AgentMessage::StartFailed { .. }
        )
    });
    assert!(
        matches!(seen.last(), Some(AgentMessage::Ready { .. })),
        "{seen:?}"
    );
    let out = lines_of(&seen, LogStream::Stdout);
    let err = lines_of(&seen, LogStream::Stderr);
    // ps inside: the function is PID 1 and nothing of the agent is visible.
    let ps: Vec<&String> = out.iter().take_while(|l| !l.starts_with("uid=")).collect();
    assert!(ps[0].contains("PID"), "{out:?}");
    assert!(
        ps.iter()
            .any(|l| l.trim_start().starts_with("1 ") && l.contains("sh -c")),
        "the function is not PID 1: {ps:?}"
    );
    assert_eq!(ps.len(), 3, "only sh and ps may be visible: {ps:?}");
    assert!(!out.iter().any(|l| l.contains("fnvm-agent")), "{out:?}");
    assert!(
        out.contains(&"uid=0 cwd=/srv/work host=localhost env=SCF".to_string()),
        "{out:?}"
    );
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "shm", "pts", "stdin", "stdout",
        "stderr", "fd",
    ] {
        assert!(out.iter().any(|l| l == dev), "/dev/{dev} missing: {out:?}");
    }
    assert!(
        !out.iter().any(|l| l.starts_with("loop")),
        "host devices visible: {out:?}"
    );
    assert_eq!(err, ["to-stderr"]);

    // HTTP through the bridge.
    let reply = String::from_utf8(sandbox.get("/index.html")).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.ends_with("hello from the function\n"), "{reply}");

    // 64 concurrent requests.
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|_| s.spawn(|| sandbox.get("/index.html")))
            .collect();
        let replies: Vec<String> = handles
            .into_iter()
            .map(|h| String::from_utf8(h.join().unwrap()).unwrap())
            .collect();
        let bad: Vec<&String> = replies
            .iter()
            .filter(|r| !r.starts_with("HTTP/1.1 200 OK"))
            .collect();
        assert!(bad.is_empty(), "{} of 64 failed: {:?}", bad.len(), bad);
    });

    // 100 MiB through fixed buffers: the agent's peak memory stays far below the body.
    let mut s = sandbox.connect_port(FUNCTION_PORT);
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /big HTTP/1.0\r\n\r\n").unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert!(total > 100 << 20, "only {total} bytes arrived");
    let agent_pid = sandbox.agent_host_pid().expect("agent pid");
    let status = std::fs::read_to_string(format!("/proc/{agent_pid}/status")).unwrap();
    let hwm_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap();
    assert!(hwm_kib < 48 * 1024, "the agent peaked at {hwm_kib} KiB");

    // Stop: SIGTERM, then SIGKILL after the grace; the exit is reported and the agent ends.
    host.send(&HostMessage::Stop { grace_ms: 300 });
    let seen = host.until(is_exited);
    assert!(
        matches!(
            seen.last(),
            Some(AgentMessage::Exited {
                signal: Some(_),
                ..
            })
        ),
        "{seen:?}"
    );
    drop(host);
    let (code, output) = sandbox.wait_end();
    assert_eq!(code, Some(0), "{output}");
    assert!(!output.contains("error"), "{output}");
    sandbox.assert_nothing_left(pgid);
}

#[test]
fn an_exit_before_listening_reports_every_line_the_exit_code_and_the_last_lines() {
    let test = "an_exit_before_listening_reports_every_line_the_exit_code_and_the_last_lines";
    if must_skip(test) {
        return;
    }
    let mut sandbox = Sandbox::start();
    let pgid = sandbox.agent.as_ref().unwrap().id();
    let mut host = sandbox.control();
    // 50 000 lines as fast as busybox can print them, interleaved with stderr.
    host.send(&HostMessage::Start(spec(&[
        "sh",
        "-c",
        "echo first; echo oops >&2; seq 1 50000; echo last-err >&2; exit 3",
    ])));
    let seen = host.until(is_exited);
    let out = lines_of(&seen, LogStream::Stdout);
    let expected: Vec<String> = std::iter::once("first".to_string())
        .chain((1..=50000).map(|i| i.to_string()))
        .collect();
    assert_eq!(out.len(), expected.len(), "lines were lost");
    assert!(out == expected, "stdout lines out of order");
    assert_eq!(lines_of(&seen, LogStream::Stderr), ["oops", "last-err"]);
    let failed = seen.iter().find_map(|m| match m {
        AgentMessage::StartFailed {
            message,
            last_lines,
        } => Some((message, last_lines)),
        _ => None,
    });
    let (message, last_lines) = failed.expect("no StartFailed");
    assert!(
        message.contains("exit code 3") && message.contains("port 9000"),
        "{message}"
    );
    assert!(last_lines.contains(&"50000".to_string()), "{last_lines:?}");
    assert!(last_lines.len() <= 20);
    assert_eq!(
        seen.last(),
        Some(&AgentMessage::Exited {
            code: Some(3),
            signal: None
        })
    );
    drop(host);
    let (code, output) = sandbox.wait_end();
    assert_eq!(code, Some(0), "{output}");
    sandbox.assert_nothing_left(pgid);
}

#[test]
fn a_server_that_never_listens_fails_with_the_exact_message_and_is_killed() {
    let test = "a_server_that_never_listens_fails_with_the_exact_message_and_is_killed";
    if must_skip(test) {
        return;
    }
    let mut sandbox = Sandbox::start();
    let pgid = sandbox.agent.as_ref().unwrap().id();
    let mut host = sandbox.control();
    let mut start = spec(&["sh", "-c", "echo starting; sleep 1000 & sleep 1000"]);
    start.ready_timeout_ms = 1500;
    let sent = Instant::now();
    host.send(&HostMessage::Start(start));
    let seen = host.until(is_exited);
    let failed = seen
        .iter()
        .find_map(|m| match m {
            AgentMessage::StartFailed {
                message,
                last_lines,
            } => Some((message.clone(), last_lines.clone())),
            _ => None,
        })
        .expect("no StartFailed");
    assert!(sent.elapsed() >= Duration::from_millis(1500));
    assert_eq!(failed.0, NOT_LISTENING_MESSAGE);
    assert_eq!(failed.1, ["starting"]);
    assert_eq!(
        seen.last(),
        Some(&AgentMessage::Exited {
            code: None,
            signal: Some(libc::SIGKILL)
        })
    );
    drop(host);
    let (code, output) = sandbox.wait_end();
    assert_eq!(code, Some(0), "{output}");
    sandbox.assert_nothing_left(pgid);
}

#[test]
fn a_full_writable_layer_fails_only_the_functions_write() {
    let test = "a_full_writable_layer_fails_only_the_functions_write";
    if must_skip(test) {
        return;
    }
    let mut sandbox = Sandbox::start();
    let pgid = sandbox.agent.as_ref().unwrap().id();
    let mut host = sandbox.control();
    host.send(&HostMessage::Start(spec(&[
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/big bs=1M count=600; echo dd-exit=$?; \
         ls -l /tmp/big; exec httpd -f -p 9000 -h /www",
    ])));
    let seen = host.until(|m| {
        matches!(
            m,
            AgentMessage::Ready { .. } | AgentMessage::StartFailed { .. }
        )
    });
    assert!(
        matches!(seen.last(), Some(AgentMessage::Ready { .. })),
        "{seen:?}"
    );
    let err = lines_of(&seen, LogStream::Stderr);
    assert!(
        err.iter().any(|l| l.contains("No space left on device")),
        "{err:?}"
    );
    let out = lines_of(&seen, LogStream::Stdout);
    assert!(out.contains(&"dd-exit=1".to_string()), "{out:?}");
    let size: u64 = out
        .iter()
        .find(|l| l.ends_with("/tmp/big"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size for /tmp/big: {out:?}"));
    assert!(
        size > 400 << 20 && size <= 512 << 20,
        "{size} bytes written"
    );
    // The agent and the function go on.
    let reply = String::from_utf8(sandbox.get("/index.html")).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    host.send(&HostMessage::Stop { grace_ms: 100 });
    host.until(is_exited);
    drop(host);
    let (code, output) = sandbox.wait_end();
    assert_eq!(code, Some(0), "{output}");
    sandbox.assert_nothing_left(pgid);
}

#[test]
fn the_images_user_and_bad_starts_are_handled() {
    let test = "the_images_user_and_bad_starts_are_handled";
    if must_skip(test) {
        return;
    }
    // A named user: ids, supplementary groups, HOME from /etc/passwd, /tmp writable.
    let mut sandbox = Sandbox::start();
    let pgid = sandbox.agent.as_ref().unwrap().id();
    // A host speaking another protocol version gets the agent's Hello, an error, and EOF.
    {
        let stream = sandbox.connect_port(CONTROL_PORT);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut old = Host {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        old.send(&HostMessage::Hello { version: 99 });
        assert!(matches!(
            old.recv(),
            Some(AgentMessage::Hello {
                version: PROTOCOL_VERSION,
                ..
            })
        ));
        match old.recv() {
            Some(AgentMessage::Error { message }) => assert!(message.contains("99"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(old.recv(), None);
    }
    // A new control connection replaces the current one, which the agent closes.
    let mut replaced = sandbox.control();
    let mut host = sandbox.control();
    assert_eq!(replaced.recv(), None);
    let mut start = spec(&[
        "sh",
        "-c",
        "id; echo HOME=$HOME; touch /tmp/mine && echo tmp-ok; touch /www/x || echo www-denied",
    ]);
    start.user = Some("app".into());
    host.send(&HostMessage::Start(start.clone()));
    // A second Start is refused, the stream stays usable.
    host.send(&HostMessage::Start(start));
    let seen = host.until(is_exited);
    let out = lines_of(&seen, LogStream::Stdout);
    assert!(
        out.iter()
            .any(|l| l.starts_with("uid=1000(app) gid=1000(app)") && l.contains("50(staff)")),
        "{out:?}"
    );
    assert!(out.contains(&"HOME=/home/app".to_string()), "{out:?}");
    assert!(out.contains(&"tmp-ok".to_string()), "{out:?}");
    assert!(out.contains(&"www-denied".to_string()), "{out:?}");
    assert!(seen
        .iter()
        .any(|m| matches!(m, AgentMessage::Error { message }
        if message.contains("already started"))));
    drop(host);
    assert_eq!(sandbox.wait_end().0, Some(0));
    sandbox.assert_nothing_left(pgid);
    drop(sandbox);

    // A user the image does not have, then a program it does not have.
    for (user, argv, expected) in [
        (
            Some("ghost"),
            "sh",
            "\"ghost\" not found in the image's /etc/passwd",
        ),
        (
            None,
            "no-such-server",
            "\"no-such-server\" not found in $PATH (/bin)",
        ),
    ] {
        let mut sandbox = Sandbox::start();
        let pgid = sandbox.agent.as_ref().unwrap().id();
        let mut host = sandbox.control();
        let mut start = spec(&[argv]);
        start.user = user.map(String::from);
        host.send(&HostMessage::Start(start));
        let seen = host.until(|m| matches!(m, AgentMessage::StartFailed { .. }));
        match seen.last() {
            Some(AgentMessage::StartFailed { message, .. }) => {
                assert!(message.contains(expected), "{message}")
            }
            other => panic!("{other:?}"),
        }
        drop(host);
        let (code, output) = sandbox.wait_end();
        assert_eq!(code, Some(0), "{output}");
        sandbox.assert_nothing_left(pgid);
    }
}
