//! Shared by the `fnvm serve` whole-system tests: a real `docker-registry` with htpasswd auth
//! on 127.0.0.1 (trimmed from rootfs-builder's registry harness), pushing OCI layouts and
//! hand-made images to it, and `fnvm serve` as a child process.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fnvm_rootfs_builder::credentials::Credentials;
use fnvm_rootfs_builder::digest::Digest;

pub const USER: &str = "alice";
pub const PASSWORD: &str = "s3cret-pass-never-shown";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's docker-registry with htpasswd auth, plain HTTP on loopback.
pub struct Registry {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
}

impl Registry {
    pub fn start() -> Self {
        assert!(
            Path::new("/usr/bin/docker-registry").exists(),
            "these tests need Debian's docker-registry package (/usr/bin/docker-registry)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let out = Command::new("htpasswd")
            .args(["-Bbn", USER, PASSWORD])
            .output()
            .expect("htpasswd (apache2-utils) must be installed");
        assert!(out.status.success(), "htpasswd failed");
        std::fs::write(dir.path().join("htpasswd"), &out.stdout).unwrap();
        let yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: fnvm-test-secret\n\
             auth:\n  htpasswd:\n    realm: fnvm-test\n    path: {}\n",
            dir.path().join("storage").display(),
            dir.path().join("htpasswd").display()
        );
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
        let reg = Registry { child, dir, port };
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        reg
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn auth(&self) -> String {
        Credentials::new(USER, PASSWORD).basic_header()
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent()
    }

    pub fn push_blob(&self, repo: &str, bytes: &[u8]) -> Digest {
        let digest = Digest::of(bytes);
        let agent = self.agent();
        let resp = agent
            .post(format!("http://{}/v2/{repo}/blobs/uploads/", self.host()))
            .header("Authorization", self.auth())
            .send_empty()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202, "blob upload POST");
        let location = resp.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with('/') {
            format!("http://{}{location}", self.host())
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let resp = agent
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .header("Authorization", self.auth())
            .send(bytes)
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "blob upload PUT {digest}");
        digest
    }

    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, bytes: &[u8]) {
        let mut resp = self
            .agent()
            .put(format!(
                "http://{}/v2/{repo}/manifests/{reference}",
                self.host()
            ))
            .header("Content-Type", media_type)
            .header("Authorization", self.auth())
            .send(bytes)
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        assert_eq!(status, 201, "manifest PUT {repo}:{reference}: {body}");
    }

    /// Pushes the single image of an OCI layout (`oci:DIR[:TAG]`); returns its manifest digest.
    pub fn push_layout(&self, repo: &str, reference: &str) -> Digest {
        let dir = reference.strip_prefix("oci:").expect("an oci: reference");
        let dir = PathBuf::from(dir.rsplit_once(':').map_or(dir, |(d, _)| d));
        let blob = |d: &str| {
            let hex = d.strip_prefix("sha256:").unwrap();
            std::fs::read(dir.join("blobs/sha256").join(hex)).unwrap()
        };
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
        let mdesc = &index["manifests"][0];
        let manifest_bytes = blob(mdesc["digest"].as_str().unwrap());
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
        self.push_blob(repo, &blob(manifest["config"]["digest"].as_str().unwrap()));
        for l in manifest["layers"].as_array().unwrap() {
            self.push_blob(repo, &blob(l["digest"].as_str().unwrap()));
        }
        let media = manifest["mediaType"].as_str().unwrap_or(OCI_MANIFEST);
        self.push_manifest(repo, "v1", media, &manifest_bytes);
        Digest::of(&manifest_bytes)
    }

    /// A one-layer image of `arch`; `declared_layer_size` lies about the layer's size.
    pub fn push_small(&self, repo: &str, arch: &str, declared_layer_size: Option<u64>) -> Digest {
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Entrypoint": ["/bin/app"]},
            "rootfs": {"type": "layers", "diff_ids": []}
        }))
        .unwrap();
        let layer = small_layer();
        self.push_blob(repo, &config);
        let d = self.push_blob(repo, &layer);
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": Digest::of(&config).to_string(), "size": config.len()},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": d.to_string(),
                        "size": declared_layer_size.unwrap_or(layer.len() as u64)}],
        }))
        .unwrap();
        self.push_manifest(repo, "v1", OCI_MANIFEST, &manifest);
        Digest::of(&manifest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gzip'd tar holding `bin/app`.
fn small_layer() -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_size(3);
    h.set_mtime(1_700_000_000);
    tar.append_data(&mut h, "bin/app", &b"app"[..]).unwrap();
    tar.into_inner().unwrap().finish().unwrap()
}

/// `fnvm serve` as a child process; its stderr goes to a file the test reads.
pub struct Serve {
    pub child: Child,
    pub stderr_path: PathBuf,
    pub addr: SocketAddr,
}

impl Serve {
    /// Starts `fnvm serve --listen 127.0.0.1:0 --sandbox process ARGS` and waits for it to serve.
    pub fn start(fnvm: &Path, home: &Path, agent: &Path, args: &[&str]) -> Serve {
        Self::start_in("process", fnvm, home, agent, args)
    }

    /// Starts `fnvm serve --listen 127.0.0.1:0 --sandbox SANDBOX ARGS` and waits for it to serve.
    pub fn start_in(sandbox: &str, fnvm: &Path, home: &Path, agent: &Path, args: &[&str]) -> Serve {
        let stderr_path = home.join(format!("serve-stderr-{}.log", free_port()));
        let err = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = crate::run_support::fnvm_command(fnvm, home, agent);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--sandbox", sandbox])
            .args(args)
            .env("FNVM_LOG", "fnvm=info")
            .stdout(Stdio::null())
            .stderr(err);
        let mut child = cmd.spawn().expect("cannot start fnvm serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("fnvm: serving the API on"))
            {
                break line
                    .split("http://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap()
                    .parse()
                    .unwrap();
            }
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("fnvm serve did not serve; stderr:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Serve {
            child,
            stderr_path,
            addr,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("fnvm serve did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
