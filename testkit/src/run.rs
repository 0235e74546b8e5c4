//! Shared by the `fnvm run` whole-system tests (and the run benchmarks): the real `fnvm` binary
//! as a child process, images built from Debian packages, leak checks.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

#[path = "../level_support/mod.rs"]
pub mod level;
#[path = "../../src/example_image.rs"]
pub mod oci;

#[allow(unused_imports)] // each test binary uses some of them
pub use level::{host_has_vmx_or_svm, linux_guests_run_here, sandboxes};

use oci::{Entry, Layer, RunConfigSpec};

/// The workspace root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo's target directory (the parent of the profile directory holding `fnvm`).
pub fn target_dir(fnvm: &Path) -> PathBuf {
    fnvm.parent()
        .and_then(Path::parent)
        .expect("fnvm lives in target/<profile>/")
        .to_path_buf()
}

/// Builds a workspace binary statically (like scripts/setup.sh builds the agent) unless
/// `env_override` names one; returns its path.
pub fn static_binary(fnvm: &Path, package: &str, env_override: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(env_override) {
        return PathBuf::from(bin);
    }
    let release = fnvm.parent().and_then(Path::file_name) == Some("release".as_ref());
    let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cargo
        .args([
            "build",
            "-p",
            package,
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace());
    if release {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("cannot run cargo");
    assert!(status.success(), "building the static {package} failed");
    target_dir(fnvm)
        .join("x86_64-unknown-linux-gnu")
        .join(if release { "release" } else { "debug" })
        .join(package)
}

/// Serializes tests that share the test home and check for leftovers.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The user's cache for test inputs that are slow to make (`~/.cache/fnvm/test-images`).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = base.join("fnvm/test-images");
    std::fs::create_dir_all(&dir).expect("cannot create the test image cache");
    dir
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data))
}

fn dir_entry(path: &str) -> Entry {
    Entry::Dir {
        path: path.into(),
        mode: 0o755,
    }
}

fn script(path: &str, text: &str) -> Entry {
    Entry::File {
        path: path.into(),
        mode: 0o755,
        data: text.as_bytes().to_vec(),
    }
}

/// busybox httpd CGI: echoes the request (method, URI, query, headers as HTTP_*, body).
const BUSYBOX_ECHO_CGI: &str = r#"#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "method=$REQUEST_METHOD"
echo "uri=$REQUEST_URI"
echo "query=$QUERY_STRING"
env | grep '^HTTP_' | sort
echo "body:"
if [ -n "$CONTENT_LENGTH" ]; then head -c "$CONTENT_LENGTH"; fi
"#;

const BUSYBOX_ENV_CGI: &str = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nenv\n";
const BUSYBOX_PS_CGI: &str =
    "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\nps -o pid,args\n";

/// A busybox-static image serving /www with httpd on :9000 (CGI under /www/cgi-bin).
pub fn busybox_image(layouts: &Path) -> String {
    busybox_image_with(layouts, "busybox", &[], None)
}

/// The busybox image with `extra` layers on top and, if given, its own entrypoint. `name` names
/// the variant; its layout is cached under a key of everything that goes into it.
pub fn busybox_image_with(
    layouts: &Path,
    name: &str,
    extra: &[Layer],
    entrypoint: Option<Vec<String>>,
) -> String {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian's busybox-static) is needed for the busybox image");
    let mut keyed = vec![
        busybox.clone(),
        BUSYBOX_ECHO_CGI.as_bytes().to_vec(),
        b"v2".to_vec(),
    ];
    for layer in extra {
        keyed.push(match layer {
            Layer::Entries(entries) => format!("{entries:?}").into_bytes(),
            Layer::TarFile(path) => std::fs::read(path).expect("the extra layer's tar file"),
        });
    }
    keyed.push(format!("{entrypoint:?}").into_bytes());
    let key = sha256_hex(&keyed.concat());
    let mut entries = oci::base_dirs();
    entries.extend([dir_entry("bin"), dir_entry("www"), dir_entry("www/cgi-bin")]);
    entries.push(Entry::File {
        path: "bin/busybox".into(),
        mode: 0o755,
        data: busybox,
    });
    for applet in [
        "sh", "httpd", "ps", "env", "cat", "head", "sleep", "echo", "printf", "grep", "sort", "dd",
        "ls", "id", "kill", "seq", "true", "false", "mknod", "wc", "sync",
    ] {
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".into(),
        });
    }
    entries.push(Entry::File {
        path: "www/index.html".into(),
        mode: 0o644,
        data: b"<h1>busybox says hello</h1>\n".to_vec(),
    });
    entries.push(script("www/cgi-bin/echo", BUSYBOX_ECHO_CGI));
    entries.push(script("www/cgi-bin/env", BUSYBOX_ENV_CGI));
    entries.push(script("www/cgi-bin/ps", BUSYBOX_PS_CGI));
    let httpd = ["/bin/httpd", "-f", "-p", "0.0.0.0:9000", "-h", "/www"];
    let config = RunConfigSpec {
        entrypoint: entrypoint.unwrap_or_else(|| httpd.iter().map(|s| s.to_string()).collect()),
        cmd: vec![],
        env: vec!["PATH=/bin".into(), "IMAGE_VAR=from-image".into()],
        working_dir: Some("/www".into()),
        user: None,
    };
    let mut layers = vec![Layer::Entries(entries)];
    layers.extend_from_slice(extra);
    oci::ensure_layout(
        &layouts.join(format!("{name}-{}", &key[..16])),
        &layers,
        &config,
    )
    .expect("cannot write the busybox image layout")
}

/// The python3 test server: echo, env, ps, fill /tmp, big responses, log bursts, exit, crash.
pub const PYTHON_SERVER: &str = r#"
import base64, ctypes, errno, json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit, parse_qs

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def reply(self, obj, status=200):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_any(self):
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        body = self.read_body()
        p = url.path
        if p == "/env":
            return self.reply(dict(os.environ))
        if p == "/ps":
            procs = {}
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            procs[pid] = f.read().replace(b"\0", b" ").decode().strip()
                    except OSError:
                        pass
            return self.reply(procs)
        if p == "/fill":
            mb, written, err = int(q.get("mb", "600")), 0, None
            chunk = b"x" * (1 << 20)
            try:
                with open("/tmp/fill", "wb") as f:
                    for _ in range(mb):
                        f.write(chunk)
                        written += 1
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                err = e.errno
            try:
                os.remove("/tmp/fill")
            except OSError:
                pass
            return self.reply({"written_mib": written, "errno": err})
        if p == "/big":
            mb = int(q.get("mb", "100"))
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(mb << 20))
            self.end_headers()
            chunk = b"z" * (1 << 20)
            for _ in range(mb):
                self.wfile.write(chunk)
            return
        if p == "/log":
            n, rate = int(q.get("n", "1000")), int(q.get("rate", "10000"))
            start = time.monotonic()
            for i in range(n):
                sys.stdout.write(f"out-{i}\n")
                sys.stderr.write(f"err-{i}\n")
                if i % 100 == 99:
                    ahead = (i + 1) / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            return self.reply({"lines": n, "seconds": time.monotonic() - start})
        if p == "/random":
            return self.reply({"hex": os.urandom(32).hex(), "time": time.time()})
        if p == "/file":
            path = q["path"]
            if self.command == "PUT":
                with open(path, "wb") as f:
                    f.write(body)
                return self.reply({"written": len(body)})
            try:
                with open(path, "rb") as f:
                    return self.reply({"data": f.read().decode()})
            except FileNotFoundError:
                return self.reply({"missing": path}, 404)
        if p == "/exit":
            print("about to exit with code", q.get("code", "3"))
            print("last words on stderr", file=sys.stderr)
            os._exit(int(q.get("code", "3")))
        if p == "/crash":
            print("about to crash")
            ctypes.string_at(0)
        self.reply({
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body_b64": base64.b64encode(body).decode(),
        })

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = handle_any

# Written before the server listens: a snapshot taken once it listens holds this file. (The
# start benchmark's floor runs this server on a read-only root: no token there.)
try:
    with open("/tmp/boot-token", "w") as f:
        f.write(os.urandom(16).hex())
except OSError:
    pass
port = int(os.environ.get("PORT", "9000"))
ThreadingHTTPServer.request_queue_size = 128
server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
server.daemon_threads = True
print(f"python server listening on 0.0.0.0:{port}", flush=True)
server.serve_forever()
"#;

/// The recipe of the Debian rootfs tarball (the cache key).
const DEBIAN_RECIPE: &[&str] = &["--variant=minbase", "--include=python3", "bookworm"];
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// A Debian bookworm minbase + python3 rootfs tarball, made by mmdebstrap once and cached under
/// ~/.cache/fnvm/test-images keyed by the recipe.
pub fn debian_python_tarball() -> PathBuf {
    static TARBALL: OnceLock<PathBuf> = OnceLock::new();
    TARBALL
        .get_or_init(|| {
            let key = sha256_hex(format!("{DEBIAN_RECIPE:?} {DEBIAN_MIRROR} v1").as_bytes());
            let path = cache_dir().join(format!("debian-python3-{}.tar", &key[..16]));
            if path.is_file() {
                return path;
            }
            let tmp = path.with_extension(format!("tmp-{}.tar", std::process::id()));
            eprintln!(
                "building {} with mmdebstrap (cached for later runs)",
                path.display()
            );
            let status = Command::new("mmdebstrap")
                .arg("--quiet")
                .args(DEBIAN_RECIPE)
                .arg(&tmp)
                .arg(DEBIAN_MIRROR)
                .status()
                .expect("cannot run mmdebstrap (Debian package mmdebstrap)");
            assert!(
                status.success(),
                "mmdebstrap failed making {}: it needs {DEBIAN_MIRROR}; the nested level has no \
                 network, so there the host level's run (scripts/test.sh without \
                 FNVM_TEST_HOST=0) must have cached it first",
                path.display()
            );
            std::fs::rename(&tmp, &path).unwrap();
            path
        })
        .clone()
}

/// Debian minbase + python3 with [`PYTHON_SERVER`] as /srv/server.py.
pub fn python_image(layouts: &Path) -> String {
    let tarball = debian_python_tarball();
    let name = tarball.file_stem().unwrap().to_string_lossy().to_string();
    let key = sha256_hex(format!("{name} {PYTHON_SERVER} v1").as_bytes());
    let server = vec![
        dir_entry("srv"),
        Entry::File {
            path: "srv/server.py".into(),
            mode: 0o644,
            data: PYTHON_SERVER.as_bytes().to_vec(),
        },
    ];
    let config = RunConfigSpec {
        entrypoint: vec![],
        cmd: vec!["python3".into(), "-u".into(), "/srv/server.py".into()],
        env: vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            "IMAGE_VAR=from-image".into(),
        ],
        working_dir: Some("/srv".into()),
        user: None,
    };
    oci::ensure_layout(
        &layouts.join(format!("python-{}", &key[..16])),
        &[Layer::TarFile(tarball), Layer::Entries(server)],
        &config,
    )
    .expect("cannot write the python image layout")
}

/// Lines a child printed, shared with the thread that reads them.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    closed: Mutex<bool>,
}

impl Lines {
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until some line satisfies `f`; returns it.
    pub fn wait_for(&self, limit: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut guard = self.lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| f(l)) {
                return Some(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = self.changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}

fn pump(stream: impl std::io::Read + Send + 'static, lines: Arc<Lines>) {
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            lines.lines.lock().unwrap().push(line);
            lines.changed.notify_all();
        }
        *lines.closed.lock().unwrap() = true;
        lines.changed.notify_all();
    });
}

/// A running `fnvm run`.
pub struct FnvmRun {
    pub child: Child,
    pub stdout: Arc<Lines>,
    pub stderr: Arc<Lines>,
    pub addr: Option<SocketAddr>,
    pub instance_id: Option<String>,
    pub home: PathBuf,
}

/// Environment for every fnvm child: the static agent.
pub fn fnvm_command(fnvm: &Path, home: &Path, agent: &Path) -> Command {
    let mut cmd = Command::new(fnvm);
    cmd.env("FNVM_AGENT_BIN", agent)
        .arg("--home")
        .arg(home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl FnvmRun {
    /// Starts `fnvm run IMAGE --listen 127.0.0.1:0 ARGS...` and waits until it serves (or
    /// ends, or `limit` passes).
    pub fn start(
        fnvm: &Path,
        home: &Path,
        agent: &Path,
        image: &str,
        args: &[&str],
        limit: Duration,
    ) -> FnvmRun {
        let mut cmd = fnvm_command(fnvm, home, agent);
        cmd.arg("run")
            .arg(image)
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        let mut child = cmd.spawn().expect("cannot start fnvm");
        let stdout = Arc::new(Lines::default());
        let stderr = Arc::new(Lines::default());
        pump(child.stdout.take().unwrap(), Arc::clone(&stdout));
        pump(child.stderr.take().unwrap(), Arc::clone(&stderr));
        let mut run = FnvmRun {
            child,
            stdout,
            stderr,
            addr: None,
            instance_id: None,
            home: home.to_path_buf(),
        };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(line) = run.stderr.wait_for(Duration::from_millis(100), |l| {
                l.contains("fnvm: serving the")
            }) {
                let url = line
                    .split("http://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .expect("the serving line names the address");
                run.addr = Some(url.parse().expect("a socket address"));
                let started = run
                    .stderr
                    .wait_for(Duration::from_secs(1), |l| l.contains("fnvm: started in"))
                    .expect("a started line comes before the serving line");
                run.instance_id = started
                    .split("instance ")
                    .nth(1)
                    .map(|s| s.trim().to_string());
                break;
            }
            if run.child.try_wait().unwrap().is_some() {
                // Let the readers drain.
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
        }
        run
    }

    /// Panics with everything fnvm printed unless it serves.
    pub fn expect_serving(&self) -> SocketAddr {
        self.addr.unwrap_or_else(|| {
            panic!(
                "fnvm run did not serve.\nstderr:\n{}\nstdout:\n{}",
                self.stderr.snapshot().join("\n"),
                self.stdout.snapshot().join("\n")
            )
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.expect_serving())
    }

    /// Sends SIGINT (like Ctrl-C) and waits for the exit.
    pub fn interrupt(&mut self, limit: Duration) -> ExitStatus {
        // SAFETY: kill(2) with a pid we own (our child, not yet reaped) has no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        self.wait(limit)
    }

    /// Waits for fnvm to exit (killing it after `limit`).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "fnvm did not exit within {limit:?}.\nstderr:\n{}",
                    self.stderr.snapshot().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// fnvm's own peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// `(stream, line)` of every function log line fnvm printed (`<time> <stream> <line>`).
    pub fn log_lines(&self) -> Vec<(String, String)> {
        self.stdout
            .snapshot()
            .iter()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                let _time = parts.next()?;
                let stream = parts.next()?;
                let line = parts.next().unwrap_or("");
                Some((stream.to_string(), line.to_string()))
            })
            .collect()
    }
}

impl Drop for FnvmRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: as in `interrupt`.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// An HTTP client that reports every status instead of erroring on 4xx/5xx.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .allow_non_standard_methods(true)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// Asserts nothing of an instance is left: its directory, processes naming it, mounts naming
/// it, loop devices backed by files in it (or by `rootfs_image`), cgroups named after it.
pub fn assert_nothing_left(home: &Path, instance_id: &str, rootfs_image: Option<&Path>) {
    let instances = home.join("instances");
    if let Ok(entries) = std::fs::read_dir(&instances) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            assert!(
                !name.contains(instance_id),
                "the instance directory {} is left behind",
                e.path().display()
            );
        }
    }
    for proc_entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = proc_entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(proc_entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(instance_id),
            "process {pid} of the instance is left behind: {cmdline}"
        );
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo.lines() {
        assert!(
            !line.contains(instance_id),
            "a mount is left behind: {line}"
        );
    }
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim();
        assert!(
            !backing.contains(instance_id),
            "loop device {name} is left attached to {backing}"
        );
        if let Some(image) = rootfs_image {
            assert!(
                Path::new(backing) != image,
                "loop device {name} is left attached to the rootfs image {backing}"
            );
        }
    }
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            assert!(
                !name.contains(instance_id),
                "the cgroup {} is left behind",
                e.path().display()
            );
            if depth < 4 {
                stack.push((e.path(), depth + 1));
            }
        }
    }
}

/// The rootfs image the pipeline built for the image fnvm reported (`fnvm: image REF (DIGEST)`).
pub fn rootfs_image_of(run: &FnvmRun) -> Option<PathBuf> {
    let line = run
        .stderr
        .snapshot()
        .into_iter()
        .find(|l| l.starts_with("fnvm: image "))?;
    let digest = line
        .split("(sha256:")
        .nth(1)?
        .split(')')
        .next()?
        .to_string();
    std::fs::canonicalize(run.home.join("rootfs").join(digest).join("rootfs.img")).ok()
}
