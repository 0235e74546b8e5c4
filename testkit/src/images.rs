//! The function images the whole-system tests and benchmarks run, written as OCI layouts by
//! fnvm's own layout writer ([`fnvm::oci_layout`]): busybox httpd with CGI scripts, and a
//! Debian + python3 test server. Each layout is cached under a key of everything in it. The
//! containerd tests get the busybox image as an OCI archive ([`busybox_oci_archive`]), the form
//! `ctr image import` takes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use fnvm::oci_layout::{self as oci, Entry, Layer, RunConfigSpec};

use crate::build::cache_dir;

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
    busybox_layout(layouts, name, extra, entrypoint, vec![])
}

/// The busybox image's layout with `extra` layers, the entrypoint (httpd's when None) and `cmd`.
fn busybox_layout(
    layouts: &Path,
    name: &str,
    extra: &[Layer],
    entrypoint: Option<Vec<String>>,
    cmd: Vec<String>,
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
    if !cmd.is_empty() {
        keyed.push(format!("{cmd:?}").into_bytes());
    }
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
        cmd,
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

/// The name `ctr image import` gives the image of [`busybox_oci_archive`].
pub const BUSYBOX_ARCHIVE_IMAGE: &str = "docker.io/fnvm-test/busybox:latest";

/// The busybox image ([`busybox_image`]: busybox-static, /www with its CGI scripts, `PATH=/bin`,
/// working directory /www) as an OCI archive for `ctr image import`, named
/// [`BUSYBOX_ARCHIVE_IMAGE`]. Unlike the function image it has no entrypoint: its command is
/// `/bin/httpd -f -p 0.0.0.0:9000 -h /www` (the page `/` says `busybox says hello`), which the
/// arguments of `ctr run IMAGE ID ARGS…` replace (ctr 1.6 has no `--entrypoint`). Applets: sh,
/// httpd, echo, cat, ls, sleep, ps and the others [`busybox_image`] links.
///
/// The archive is a tar of the OCI layout whose index.json names the manifest with
/// `io.containerd.image.name` (what containerd's importer names images by, before
/// `org.opencontainers.image.ref.name`, which carries the same name). Written once beside the
/// layout as `<layout>.oci.tar`; returns its path.
pub fn busybox_oci_archive(layouts: &Path) -> PathBuf {
    let httpd = ["/bin/httpd", "-f", "-p", "0.0.0.0:9000", "-h", "/www"];
    let reference = busybox_layout(
        layouts,
        "busybox-ctr",
        &[],
        Some(vec![]),
        httpd.iter().map(|s| s.to_string()).collect(),
    );
    let layout = layout_dir(&reference);
    let archive = layout.with_extension("oci.tar");
    if !archive.is_file() {
        write_oci_archive(&layout, BUSYBOX_ARCHIVE_IMAGE, &archive)
            .unwrap_or_else(|e| panic!("cannot write the OCI archive {}: {e}", archive.display()));
    }
    archive
}

/// The directory of a layout reference `oci:DIR:TAG` (what [`oci::ensure_layout`] returns).
fn layout_dir(reference: &str) -> PathBuf {
    let rest = reference
        .strip_prefix("oci:")
        .unwrap_or_else(|| panic!("not an oci: layout reference: {reference}"));
    let (dir, _tag) = rest
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no tag in the layout reference {reference}"));
    PathBuf::from(dir)
}

/// Tars the OCI layout `layout` into `archive` (through a temporary file beside it), its
/// index.json's manifest descriptors annotated with `name`.
fn write_oci_archive(layout: &Path, name: &str, archive: &Path) -> std::io::Result<()> {
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let manifests = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| std::io::Error::other(format!("{} has no manifests", layout.display())))?;
    for manifest in manifests {
        manifest["annotations"] = serde_json::json!({
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": name,
        });
    }
    let index = serde_json::to_vec(&index)?;
    let tmp = archive.with_extension(format!("tmp-{}", std::process::id()));
    let mut tar = tar::Builder::new(std::fs::File::create(&tmp)?);
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(index.len() as u64);
    tar.append_data(&mut header, "index.json", index.as_slice())?;
    tar.append_path_with_name(layout.join("oci-layout"), "oci-layout")?;
    tar.append_dir_all("blobs", layout.join("blobs"))?;
    tar.into_inner()?.sync_all()?;
    std::fs::rename(&tmp, archive)
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
        # Response habits of servers users write, each in small writes with Nagle on.
        if p == "/habit/chunked":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"hello ", b"chunked"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if p == "/habit/close":
            data = b"closing"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            return
        if p == "/habit/http10":
            # No length: the body ends where the connection does.
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            self.wfile.write(b"until close")
            self.close_connection = True
            return
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
        .get_or_init(|| mmdebstrap_tarball("debian-python3", DEBIAN_RECIPE))
        .clone()
}

/// Debian minbase + python3 with [`PYTHON_SERVER`] as /srv/server.py.
pub fn python_image(layouts: &Path) -> String {
    python_server_image(
        layouts,
        debian_python_tarball(),
        ("python", "server.py", PYTHON_SERVER),
        &["IMAGE_VAR=from-image"],
    )
}

/// An image of a Debian `tarball` plus `script` as /srv/`file`, run by python3 (`name` names
/// its layout), with `env` besides PATH.
fn python_server_image(
    layouts: &Path,
    tarball: PathBuf,
    (name, file, script): (&str, &str, &str),
    env: &[&str],
) -> String {
    let stem = tarball.file_stem().unwrap().to_string_lossy().to_string();
    let key = sha256_hex(format!("{stem} {script} v1").as_bytes());
    let server = vec![
        dir_entry("srv"),
        Entry::File {
            path: format!("srv/{file}"),
            mode: 0o644,
            data: script.as_bytes().to_vec(),
        },
    ];
    let config = RunConfigSpec {
        entrypoint: vec![],
        cmd: vec!["python3".into(), "-u".into(), format!("/srv/{file}")],
        env: std::iter::once("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .chain(env.iter().copied())
            .map(String::from)
            .collect(),
        working_dir: Some("/srv".into()),
        user: None,
    };
    oci::ensure_layout(
        &layouts.join(format!("{name}-{}", &key[..16])),
        &[Layer::TarFile(tarball), Layer::Entries(server)],
        &config,
    )
    .unwrap_or_else(|e| panic!("cannot write the {name} image layout: {e:?}"))
}

/// The network probe the egress tests run as a function: on `GET` it says `netprobe ready`; a
/// `POST` (event functions get `POST /event-invoke`) carries `{"op": ...}` and is answered with
/// what the function saw of the network, as JSON:
///
/// - `connect` (host, port, timeout_s=5): `{ok, ms}` or `{ok: false, error, errno, kind, ms}`,
///   kind `refused`, `timeout`, `unreachable` (EHOSTUNREACH, ENETUNREACH, EACCES) or `other`
/// - `resolve` (name): `{ok, addresses}` (IPv4, unique, sorted) or `{ok: false, error}`
/// - `psql` (host, port, user, dbname, sql): psql's `{ok, status, stdout, stderr}`
/// - `interfaces`: `{interfaces}` (the names in /sys/class/net, else /proc/net/dev)
/// - `file` (path): `{ok, text}` or `{ok: false, error}` (e.g. /etc/resolv.conf)
/// - `iperf3` (host, port, seconds, reverse): `{ok, sent_bps, received_bps}` or `{ok, error}`
/// - `connect_latency` (host, port, count): `{ok, median_ms, p90_ms, samples}`
///
/// Bad JSON, a missing field or an unknown op: HTTP 400 with `{ok: false, error}`.
/// `NETPROBE_PORT` moves it off :9000 (to try it on a development host).
pub const NETPROBE_SERVER: &str = r#"
import errno, json, math, os, socket, statistics, subprocess, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES}


class BadRequest(Exception):
    pass


def field(req, name, kind, default=None):
    value = req.get(name, default)
    if value is None:
        raise BadRequest(f"missing field {name!r}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"field {name!r} must be {kind.__name__}")
    return value


def connect_once(host, port, timeout):
    start = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
        return {"ok": True, "ms": (time.monotonic() - start) * 1000}
    except Exception as exc:
        ms = (time.monotonic() - start) * 1000
        code = getattr(exc, "errno", None)
        if isinstance(exc, ConnectionRefusedError):
            kind = "refused"
        elif isinstance(exc, socket.timeout):
            kind = "timeout"
        elif code in UNREACHABLE:
            kind = "unreachable"
        else:
            kind = "other"
        if not isinstance(code, int):
            code = None
        return {"ok": False, "error": str(exc) or type(exc).__name__, "errno": code,
                "kind": kind, "ms": ms}


def op_connect(req):
    timeout = field(req, "timeout_s", (int, float), 5)
    return connect_once(field(req, "host", str), field(req, "port", int), timeout)


def op_resolve(req):
    name = field(req, "name", str)
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except Exception as exc:
        return {"ok": False, "error": str(exc), "errno": getattr(exc, "errno", None)}
    addresses = sorted({info[4][0] for info in infos}, key=socket.inet_aton)
    return {"ok": True, "addresses": addresses}


def op_psql(req):
    argv = ["psql", "-X", "-A", "-t",
            "-h", field(req, "host", str), "-p", str(field(req, "port", int)),
            "-U", field(req, "user", str), "-d", field(req, "dbname", str),
            "-c", field(req, "sql", str)]
    env = dict(os.environ, PGCONNECT_TIMEOUT="5")
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        return {"ok": False, "status": None, "stdout": exc.stdout or "",
                "stderr": exc.stderr or "", "error": "psql timed out after 20 s"}
    except OSError as exc:
        return {"ok": False, "status": None, "stdout": "", "stderr": "", "error": str(exc)}
    return {"ok": done.returncode == 0, "status": done.returncode,
            "stdout": done.stdout, "stderr": done.stderr}


def op_interfaces(req):
    try:
        names = os.listdir("/sys/class/net")
    except OSError:
        with open("/proc/net/dev") as f:
            names = [line.split(":")[0].strip() for line in f.readlines()[2:] if ":" in line]
    return {"interfaces": sorted(names)}


def op_file(req):
    path = field(req, "path", str)
    try:
        with open(path) as f:
            return {"ok": True, "text": f.read()}
    except Exception as exc:
        return {"ok": False, "error": str(exc), "errno": getattr(exc, "errno", None)}


def op_iperf3(req):
    seconds = field(req, "seconds", int, 1)
    argv = ["iperf3", "-c", field(req, "host", str), "-p", str(field(req, "port", int, 5201)),
            "-t", str(seconds), "-J"]
    if field(req, "reverse", bool, False):
        argv.append("-R")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"iperf3 did not finish in {seconds + 30} s"}
    except OSError as exc:
        return {"ok": False, "error": str(exc)}
    try:
        report = json.loads(done.stdout)
    except ValueError:
        return {"ok": False, "error": (done.stderr or done.stdout).strip()
                or f"iperf3 exited with {done.returncode}"}
    if "error" in report or done.returncode != 0:
        error = report.get("error") or f"iperf3 exited with {done.returncode}"
        return {"ok": False, "error": error}
    end = report.get("end", {})
    return {"ok": True,
            "sent_bps": end.get("sum_sent", {}).get("bits_per_second"),
            "received_bps": end.get("sum_received", {}).get("bits_per_second")}


def op_connect_latency(req):
    host, port = field(req, "host", str), field(req, "port", int)
    count = field(req, "count", int, 10)
    if count < 1:
        raise BadRequest("count must be at least 1")
    samples = []
    for _ in range(count):
        one = connect_once(host, port, field(req, "timeout_s", (int, float), 5))
        if not one["ok"]:
            return dict(one, samples=len(samples))
        samples.append(one["ms"])
    ordered = sorted(samples)
    return {"ok": True, "median_ms": statistics.median(ordered),
            "p90_ms": ordered[math.ceil(0.9 * len(ordered)) - 1], "samples": len(samples)}


OPS = {
    "connect": op_connect,
    "resolve": op_resolve,
    "psql": op_psql,
    "interfaces": op_interfaces,
    "file": op_file,
    "iperf3": op_iperf3,
    "connect_latency": op_connect_latency,
}


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

    def send(self, status, data, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reply(self, obj, status=200):
        self.send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        self.read_body()
        self.send(200, b"netprobe ready\n", "text/plain")

    def do_POST(self):
        body = self.read_body()
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise BadRequest("the body must be a JSON object")
            op = req.get("op")
            if op not in OPS:
                raise BadRequest(f"unknown op {op!r} (known: {', '.join(sorted(OPS))})")
            result = OPS[op](req)
        except (ValueError, BadRequest) as exc:
            return self.reply({"ok": False, "error": f"bad request: {exc}"}, 400)
        except Exception as exc:
            return self.reply({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, 500)
        self.reply(result)


class Server(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that hangs up mid-request is no news; anything else gets its traceback.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


port = int(os.environ.get("NETPROBE_PORT", "9000"))
server = Server(("0.0.0.0", port), Handler)
print(f"netprobe listening on 0.0.0.0:{port}", flush=True)
server.serve_forever()
"#;

/// The recipe of the network probe's Debian rootfs tarball (the cache key).
const DEBIAN_NETPROBE_RECIPE: &[&str] = &[
    "--variant=minbase",
    "--include=python3,postgresql-client,iperf3",
    "bookworm",
];

/// A Debian bookworm minbase + python3, psql and iperf3 rootfs tarball, made by mmdebstrap once
/// and cached under ~/.cache/fnvm/test-images keyed by the recipe.
pub fn debian_netprobe_tarball() -> PathBuf {
    static TARBALL: OnceLock<PathBuf> = OnceLock::new();
    TARBALL
        .get_or_init(|| mmdebstrap_tarball("debian-netprobe", DEBIAN_NETPROBE_RECIPE))
        .clone()
}

/// Debian minbase + python3, psql and iperf3 with [`NETPROBE_SERVER`] as /srv/netprobe.py.
pub fn netprobe_image(layouts: &Path) -> String {
    python_server_image(
        layouts,
        debian_netprobe_tarball(),
        ("netprobe", "netprobe.py", NETPROBE_SERVER),
        &[],
    )
}

/// A Debian rootfs tarball `<stem>-<key>.tar` made by mmdebstrap from `recipe` once, cached in
/// [`cache_dir`] under a key of the recipe and the mirror.
fn mmdebstrap_tarball(stem: &str, recipe: &[&str]) -> PathBuf {
    let key = sha256_hex(format!("{recipe:?} {DEBIAN_MIRROR} v1").as_bytes());
    let path = cache_dir().join(format!("{stem}-{}.tar", &key[..16]));
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
        .args(recipe)
        .arg(&tmp)
        .arg(DEBIAN_MIRROR)
        .status()
        .expect("cannot run mmdebstrap (Debian package mmdebstrap)");
    assert!(
        status.success(),
        "mmdebstrap failed making {}: it needs {DEBIAN_MIRROR}; the nested level has no \
         network, so there the host level's run (scripts/test.sh without FNVM_TEST_HOST=0) \
         must have cached it first",
        path.display()
    );
    std::fs::rename(&tmp, &path).unwrap();
    path
}
