//! Test harness: a real `docker-registry` (distribution 2.8) on 127.0.0.1, images built by
//! the test itself (tar + gzip layers, OCI manifests and indexes), a small pusher speaking
//! the distribution API, and a loopback TCP proxy that can cut connections mid-stream.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fnvm_rootfs_builder::digest::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub const USER: &str = "alice";
pub const PASSWORD: &str = "s3cret-pass";

/// One running registry process; killed and its storage removed on drop.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    pub tls: Option<Tls>,
    pub auth: bool,
    pub token: Option<TokenServer>,
}

/// The CA a TLS registry's certificate chains to.
pub struct Tls {
    pub ca_file: PathBuf,
    pub ca_der: Vec<u8>,
}

pub struct RegistryConfig {
    /// htpasswd (Basic) auth.
    pub auth: bool,
    pub tls: bool,
    /// Bearer-token auth through a token server run by the test (instead of htpasswd).
    pub token: bool,
}

impl Registry {
    /// Plain HTTP with htpasswd auth (distribution accepts basic auth without TLS).
    pub fn start_with_auth() -> Self {
        Self::start(RegistryConfig {
            auth: true,
            tls: false,
            token: false,
        })
    }

    pub fn start(cfg: RegistryConfig) -> Self {
        assert!(
            Path::new("/usr/bin/docker-registry").exists(),
            "these tests need Debian's docker-registry package (/usr/bin/docker-registry)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: fnvm-test-secret\n",
            dir.path().join("storage").display()
        );
        let mut tls = None;
        if cfg.tls {
            let t = make_tls(dir.path());
            yaml.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("server.pem").display(),
                dir.path().join("server.key").display()
            ));
            tls = Some(t);
        }
        if cfg.auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", USER, PASSWORD])
                .output()
                .expect("htpasswd (apache2-utils) must be installed");
            assert!(out.status.success(), "htpasswd failed");
            std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
            yaml.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: fnvm-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        let mut token = None;
        if cfg.token {
            let server = TokenServer::start(dir.path());
            yaml.push_str(&format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    \
                 issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                server.port,
                server.bundle.display()
            ));
            token = Some(server);
        }
        std::fs::write(dir.path().join("config.yml"), yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        let reg = Registry {
            child,
            dir,
            port,
            tls,
            auth: cfg.auth,
            token,
        };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "docker-registry did not listen on port {} within 15 s; log:\n{}",
            self.port,
            self.log()
        );
    }

    /// `127.0.0.1:PORT`, the registry part of references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Access-log lines of blob GETs for `repo` (what the cache-hit test counts).
    pub fn blob_gets(&self, repo: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Access-log lines answering a ranged blob GET with 206.
    pub fn partial_blob_responses(&self, repo: &str) -> usize {
        let needle = format!("\"GET /v2/{repo}/blobs/");
        self.log()
            .lines()
            .filter(|l| l.contains(&needle) && l.contains("HTTP/1.1\" 206"))
            .count()
    }

    /// The file the filesystem driver serves blob `d` from.
    pub fn blob_data_path(&self, d: &Digest) -> PathBuf {
        self.storage().join(format!(
            "docker/registry/v2/blobs/sha256/{}/{}/data",
            &d.hex()[..2],
            d.hex()
        ))
    }

    fn base(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    fn agent(&self) -> ureq::Agent {
        let mut cfg = ureq::Agent::config_builder().http_status_as_error(false);
        if let Some(t) = &self.tls {
            let cert = ureq::tls::Certificate::from_der(&t.ca_der).to_owned();
            cfg = cfg.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![cert])))
                    .build(),
            );
        }
        cfg.build().new_agent()
    }

    fn auth_header(&self, repo: &str) -> Option<String> {
        if let Some(t) = &self.token {
            return Some(format!("Bearer {}", t.mint_push(repo)));
        }
        self.auth.then(|| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
            )
        })
    }

    /// Monolithic blob upload: POST a session, PUT the bytes with `?digest=`.
    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let agent = self.agent();
        let mut post = agent.post(format!("{}/v2/{repo}/blobs/uploads/", self.base()));
        if let Some(a) = self.auth_header(repo) {
            post = post.header("Authorization", a);
        }
        let resp = post.send_empty().unwrap();
        assert_eq!(resp.status().as_u16(), 202, "blob upload POST");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base())
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut put = agent
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream");
        if let Some(a) = self.auth_header(repo) {
            put = put.header("Authorization", a);
        }
        let resp = put.send(bytes).unwrap();
        assert_eq!(resp.status().as_u16(), 201, "blob upload PUT {digest}");
        digest
    }

    /// PUTs a manifest or index under `reference` (a tag or its digest).
    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let mut put = self
            .agent()
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.base()))
            .header("Content-Type", media_type);
        if let Some(a) = self.auth_header(repo) {
            put = put.header("Authorization", a);
        }
        let mut resp = put.send(bytes).unwrap();
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 201, "manifest PUT {repo}:{reference}: {body}");
    }

    /// Pushes an image's blobs and manifest, tagging it `tag`.
    pub fn push_image(&self, repo: &str, tag: &str, image: &TestImage) {
        self.push_blob(repo, &image.config);
        for l in &image.layers {
            self.push_blob(repo, l);
        }
        self.push_manifest(repo, tag, OCI_MANIFEST, &image.manifest);
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn make_tls(dir: &Path) -> Tls {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fnvm test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    Tls {
        ca_file,
        ca_der: ca_cert.der().to_vec(),
    }
}

/// An image made by the test: gzip'd tar layers, an OCI config and manifest.
#[derive(Clone)]
pub struct TestImage {
    pub layers: Vec<Vec<u8>>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

/// One file in a test layer.
pub struct FileSpec<'a> {
    pub path: &'a str,
    pub contents: &'a [u8],
    pub mode: u32,
}

pub fn file<'a>(path: &'a str, contents: &'a [u8]) -> FileSpec<'a> {
    FileSpec {
        path,
        contents,
        mode: 0o644,
    }
}

/// A gzip'd tar layer holding `files` (parent directories added as needed).
pub fn layer(files: &[FileSpec<'_>]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut dirs_done = std::collections::BTreeSet::new();
    for f in files {
        let mut parent = String::new();
        for comp in f
            .path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .unwrap()
            .1
        {
            parent.push_str(comp);
            parent.push('/');
            if dirs_done.insert(parent.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_mtime(1_700_000_000);
                h.set_uid(0);
                h.set_gid(0);
                tar.append_data(&mut h, &parent, std::io::empty()).unwrap();
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(f.mode);
        h.set_size(f.contents.len() as u64);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        tar.append_data(&mut h, f.path, f.contents).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// Deterministic incompressible bytes (so a gzip'd layer is about this big).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub fn config_json(arch: &str, cmd: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Entrypoint": ["/bin/app"],
            "Cmd": cmd,
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
            "WorkingDir": "/srv",
            "ExposedPorts": {"9000/tcp": {}}
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .unwrap()
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({
        "mediaType": media_type,
        "digest": Digest::of(bytes).to_string(),
        "size": bytes.len(),
    })
}

impl TestImage {
    pub fn new(arch: &str, layers: Vec<Vec<u8>>) -> Self {
        let config = config_json(arch, &["--port", "9000"]);
        let manifest = manifest_json(&config, &layers);
        Self {
            layers,
            config,
            manifest,
        }
    }

    pub fn digest(&self) -> Digest {
        Digest::of(&self.manifest)
    }
}

pub fn manifest_json(config: &[u8], layers: &[Vec<u8>]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": layers.iter().map(|l| descriptor(OCI_LAYER_GZIP, l)).collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// An OCI index over `(manifest bytes, architecture)` entries.
pub fn index_json(entries: &[(&[u8], &str)]) -> Vec<u8> {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(m, arch)| {
            let mut d = descriptor(OCI_MANIFEST, m);
            d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
            d
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .unwrap()
}

/// A loopback TCP proxy in front of the registry. Each connection whose server→client
/// stream passes `cut_after` bytes is cut there, for the first `cuts` such connections.
pub struct CuttingProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    pub cut_count: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CuttingProxy {
    pub fn start(upstream_port: u16, cut_after: u64, cuts: usize) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let cut_count = Arc::new(AtomicUsize::new(0));
        let (stop2, cut2) = (stop.clone(), cut_count.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        let cut2 = cut2.clone();
                        std::thread::spawn(move || {
                            proxy_connection(client, upstream_port, cut_after, cuts, &cut2)
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            stop,
            cut_count,
            thread: Some(thread),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn proxy_connection(
    client: TcpStream,
    upstream_port: u16,
    cut_after: u64,
    cuts: usize,
    cut_count: &AtomicUsize,
) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
        return;
    };
    let (mut c_read, mut s_write) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server.try_clone().unwrap(), client.try_clone().unwrap());
    let mut sent = 0u64;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match s_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if sent + n as u64 > cut_after
            && cut_count
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                    (c < cuts).then_some(c + 1)
                })
                .is_ok()
        {
            let keep = cut_after.saturating_sub(sent) as usize;
            let _ = c_write.write_all(&buf[..keep]);
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            break;
        }
        if c_write.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = client.shutdown(Shutdown::Both);
    let _ = server.shutdown(Shutdown::Both);
    let _ = up.join();
}

/// Every file under `dir` whose name marks an unfinished write.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".ingest-") || name.starts_with(".staging-") {
                out.push(e.path());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    out
}

pub const TOKEN_SERVICE: &str = "fnvm-test-registry";
pub const TOKEN_ISSUER: &str = "fnvm-test-issuer";

/// A minimal token service for the registry's `auth: token` mode: checks Basic
/// credentials and returns an ES256 JWT granting the requested repository scope, signed by
/// a key whose self-signed certificate is the registry's `rootcertbundle`.
pub struct TokenServer {
    pub port: u16,
    pub bundle: PathBuf,
    key_pem: String,
    cert_der: Vec<u8>,
    /// Every query string the token endpoint was asked with.
    pub requests: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    fn start(dir: &Path) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["token-signer".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fnvm token signer");
        let cert = params.self_signed(&key).unwrap();
        let bundle = dir.join("token-bundle.pem");
        std::fs::write(&bundle, cert.pem()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let key_pem = key.serialize_pem();
        let cert_der = cert.der().to_vec();
        let (stop2, req2, pem2, der2) = (
            stop.clone(),
            requests.clone(),
            key_pem.clone(),
            cert_der.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        serve_token(conn, &pem2, &der2, &req2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            bundle,
            key_pem,
            cert_der,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// A token with push and pull on `repo` (for the test's own pusher).
    fn mint_push(&self, repo: &str) -> String {
        mint_token(
            &self.key_pem,
            &self.cert_der,
            &[format!("repository:{repo}:pull,push")],
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_token(
    mut conn: TcpStream,
    key_pem: &str,
    cert_der: &[u8],
    requests: &std::sync::Mutex<Vec<String>>,
) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let query = target
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    requests.lock().unwrap().push(query.clone());
    let expected = format!(
        "authorization: basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    )
    .to_ascii_lowercase();
    let authorized = head
        .lines()
        .any(|l| l.trim().to_ascii_lowercase() == expected);
    let response = if authorized {
        let scopes: Vec<String> = query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("scope="))
            .map(percent_decode)
            .collect();
        let body = serde_json::json!({
            "token": mint_token(key_pem, cert_der, &scopes),
            "expires_in": 300,
        })
        .to_string();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    };
    let _ = conn.write_all(response.as_bytes());
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An ES256 JWT in distribution's format: `x5c` names the signing certificate, `access`
/// lists the granted repository actions.
fn mint_token(key_pem: &str, cert_der: &[u8], scopes: &[String]) -> String {
    use rcgen::SigningKey as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let std_b64 = base64::engine::general_purpose::STANDARD;
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (t, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": t, "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header =
        serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [std_b64.encode(cert_der)]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now - 10,
        "jti": format!("{now}-{}", noise(4, now)[0]),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let der_sig = key.sign(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64(&ecdsa_der_to_raw(&der_sig)))
}

/// ASN.1 `SEQUENCE { INTEGER r, INTEGER s }` → 64-byte `r || s` (what JWS ES256 uses).
fn ecdsa_der_to_raw(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30);
    let mut i = 2;
    if der[1] & 0x80 != 0 {
        i += (der[1] & 0x7f) as usize;
    }
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(der[i], 0x02);
        let len = der[i + 1] as usize;
        let mut int = &der[i + 2..i + 2 + len];
        while int.len() > 32 && int[0] == 0 {
            int = &int[1..];
        }
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}

/// Writes `image` as an OCI image layout directory with its manifest tagged `tag`.
pub fn write_oci_layout(dir: &Path, image: &TestImage, tag: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for b in std::iter::once(&image.config)
        .chain(image.layers.iter())
        .chain(std::iter::once(&image.manifest))
    {
        std::fs::write(blobs.join(Digest::of(b).hex()), b).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut d = descriptor(OCI_MANIFEST, &image.manifest);
    d["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d]});
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
}

/// Writes `image` as a `docker save` tarball (uncompressed layer tars, legacy layout).
pub fn write_docker_archive(path: &Path, image: &TestImage, repo_tag: &str) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        tar.append_data(&mut h, name, bytes).unwrap();
    };
    let config_name = format!("{}.json", Digest::of(&image.config).hex());
    add(&config_name, &image.config);
    let mut layer_names = Vec::new();
    for l in &image.layers {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&l[..])
            .read_to_end(&mut raw)
            .unwrap();
        let name = format!("{}/layer.tar", Digest::of(&raw).hex());
        add(&name, &raw);
        layer_names.push(name);
    }
    let manifest = serde_json::json!([{
        "Config": config_name, "RepoTags": [repo_tag], "Layers": layer_names,
    }]);
    add("manifest.json", manifest.to_string().as_bytes());
    tar.into_inner().unwrap();
}

/// Extracts a built rootfs image (ext4 via debugfs, or EROFS via fsck.erofs) into `dest`.
pub fn extract_rootfs_image(image: &Path, dest: &Path) {
    let mut head = vec![0u8; 2048];
    std::fs::File::open(image)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    std::fs::create_dir_all(dest).unwrap();
    let status = if head[1080..1082] == [0x53, 0xEF] {
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", dest.display()))
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    } else if head[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes() {
        Command::new("fsck.erofs")
            .arg(format!("--extract={}", dest.display()))
            .arg("--overwrite")
            .arg(image)
            .stdout(Stdio::null())
            .status()
    } else {
        panic!("{} is neither ext4 nor EROFS", image.display());
    }
    .unwrap();
    assert!(status.success(), "extracting {}", image.display());
}

/// Every path under `root` with its kind, permission bits and contents, for comparisons.
pub fn tree_listing(root: &Path) -> Vec<(String, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let what = if m.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else {
                format!("file {mode:o} {}", Digest::of(&std::fs::read(&p).unwrap()))
            };
            out.push((rel, what));
        }
    }
    out.sort();
    out
}

/// A request as a [`TinyHttp`] handler sees it.
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    /// Header lines, lower-cased names.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What a handler answers: status, extra headers, body.
pub type Reply = (u16, Vec<(String, String)>, Vec<u8>);

/// A one-response-per-connection HTTP/1.1 server on loopback, for behaviour the real
/// registry cannot be made to show (it never redirects blob reads from its filesystem
/// driver). Every request is recorded.
pub struct TinyHttp {
    pub port: u16,
    pub seen: Arc<std::sync::Mutex<Vec<SeenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TinyHttp {
    pub fn start(handler: impl Fn(&SeenRequest) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
                    match conn.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let mut lines = text.lines();
                let mut first = lines.next().unwrap_or("").split_whitespace();
                let req = SeenRequest {
                    method: first.next().unwrap_or("").to_owned(),
                    path: first.next().unwrap_or("").to_owned(),
                    headers: lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect(),
                };
                let (status, headers, body) = handler(&req);
                let mut out = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                    body.len()
                );
                for (n, v) in headers {
                    out.push_str(&format!("{n}: {v}\r\n"));
                }
                out.push_str("\r\n");
                let _ = conn.write_all(out.as_bytes());
                if req.method != "HEAD" {
                    let _ = conn.write_all(&body);
                }
                seen2.lock().unwrap().push(req);
            }
        });
        Self {
            port,
            seen,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for TinyHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
