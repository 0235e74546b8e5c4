//! The function images the whole-system tests and benchmarks run, written as OCI layouts by
//! fnvm's own layout writer ([`fnvm::oci_layout`]): busybox httpd with CGI scripts, and a
//! Debian + python3 test server. Each layout is cached under a key of everything in it.

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
