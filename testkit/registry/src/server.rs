//! A real `docker-registry` (distribution 2.8) on 127.0.0.1: plain or TLS, open, htpasswd or
//! token auth, and the distribution API calls the tests push with.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fnvm_rootfs_builder::digest::Digest;

use crate::*;

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

    /// Pushes the single image of an OCI layout (`oci:DIR[:TAG]`) tagged `v1`; returns its
    /// manifest digest.
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

    /// Pushes a one-layer image of `arch` (its layer holds `bin/app`) tagged `v1`;
    /// `declared_layer_size` lies about the layer's size. Returns its manifest digest.
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

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free on 127.0.0.1 just now.
pub fn free_port() -> u16 {
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
