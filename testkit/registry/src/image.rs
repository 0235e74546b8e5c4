//! Images the tests build themselves: gzip'd tar layers, OCI configs, manifests and indexes,
//! written as OCI layouts or `docker save` archives too.

use std::io::Read;
use std::path::Path;

use fnvm_rootfs_builder::digest::Digest;

use crate::*;

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
