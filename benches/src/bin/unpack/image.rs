//! The benchmark's image: Debian bookworm minbase + python3 made once with mmdebstrap, split
//! into three gzip layers and written as an OCI layout, both cached under `~/.cache/fnvm/bench/`.

use std::fs::{self, File};
use std::io::{self, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest as _, Sha256};

use super::{remove, BASE_TAR};

/// Where the base tarball and the layout are cached.
pub(crate) fn cache_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context("neither XDG_CACHE_HOME nor HOME is set")?;
    let dir = base.join("fnvm/bench");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// The Debian rootfs tarball, made once with mmdebstrap.
pub(crate) fn ensure_base_tar(cache: &Path) -> Result<PathBuf> {
    let tar = cache.join(BASE_TAR);
    if tar.exists() {
        return Ok(tar);
    }
    eprintln!("building {} with mmdebstrap (once) ...", tar.display());
    let tmp = cache.join(format!("{BASE_TAR}.partial"));
    let status = Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--format=tar",
            "--variant=minbase",
            "--include=python3",
            "bookworm",
        ])
        .arg(&tmp)
        .arg("http://deb.debian.org/debian")
        .status()
        .context("cannot run mmdebstrap (Debian package mmdebstrap)")?;
    if !status.success() {
        bail!("mmdebstrap failed ({status})");
    }
    fs::rename(&tmp, &tar)?;
    Ok(tar)
}

/// Which of the three layers an entry of the base tarball goes to.
pub(crate) fn layer_of(path: &str, kind: tar::EntryType) -> usize {
    let path = path.trim_start_matches("./");
    if kind == tar::EntryType::Link {
        2
    } else if kind.is_dir() {
        0
    } else if path.starts_with("usr/share/") || path.starts_with("usr/lib/python3") {
        1
    } else {
        0
    }
}

pub(crate) struct LayerBlob {
    pub(crate) path: PathBuf,
}

/// Splits the base tarball into three gzip layers and writes an OCI layout (tag `latest`).
pub(crate) fn ensure_layout(base: &Path, layout: &Path) -> Result<Vec<LayerBlob>> {
    let blobs = layout.join("blobs/sha256");
    let index_path = layout.join("index.json");
    if !index_path.exists() {
        eprintln!("writing the OCI layout {} (once) ...", layout.display());
        let partial = layout.with_extension("partial");
        remove(&partial);
        fs::create_dir_all(partial.join("blobs/sha256"))?;
        let mut builders: Vec<tar::Builder<Vec<u8>>> =
            (0..3).map(|_| tar::Builder::new(Vec::new())).collect();
        let mut archive = tar::Archive::new(BufReader::new(File::open(base)?));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = entry.path()?.into_owned();
            let kind = entry.header().entry_type();
            let mut header = entry.header().clone();
            let b = &mut builders[layer_of(&path.to_string_lossy(), kind)];
            if kind == tar::EntryType::Link || kind == tar::EntryType::Symlink {
                let target = entry
                    .link_name()?
                    .context("link without target")?
                    .into_owned();
                b.append_link(&mut header, &path, &target)?;
            } else {
                b.append_data(&mut header, &path, &mut entry)?;
            }
        }
        // The top layer also deletes something the lower ones made.
        let mut wh = tar::Header::new_gnu();
        wh.set_entry_type(tar::EntryType::Regular);
        wh.set_size(0);
        wh.set_mode(0o600);
        builders[2].append_data(&mut wh, "usr/share/.wh.doc", io::empty())?;
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for b in builders {
            let tar = b.into_inner()?;
            diff_ids.push(format!("sha256:{}", hex::encode(Sha256::digest(&tar))));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&tar)?;
            let gz = gz.finish()?;
            let digest = hex::encode(Sha256::digest(&gz));
            fs::write(partial.join("blobs/sha256").join(&digest), &gz)?;
            layer_descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": format!("sha256:{digest}"),
                "size": gz.len(),
            }));
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/usr/bin/python3", "-m", "http.server", "9000"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))?;
        let config_digest = put(&partial, &config)?;
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": layer_descs,
        }))?;
        let manifest_digest = put(&partial, &manifest)?;
        fs::write(
            partial.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        fs::write(
            partial.join("index.json"),
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": manifest_digest,
                    "size": manifest.len(),
                    "annotations": {"org.opencontainers.image.ref.name": "latest"},
                }],
            }))?,
        )?;
        remove(layout);
        fs::rename(&partial, layout)?;
    }
    // The layers in order, from the manifest.
    let index: serde_json::Value = serde_json::from_slice(&fs::read(&index_path)?)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json")?;
    let hex = manifest_digest.trim_start_matches("sha256:");
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(blobs.join(hex))?)?;
    manifest["layers"]
        .as_array()
        .context("manifest layers")?
        .iter()
        .map(|l| {
            let d = l["digest"].as_str().context("layer digest")?;
            Ok(LayerBlob {
                path: blobs.join(d.trim_start_matches("sha256:")),
            })
        })
        .collect()
}

pub(crate) fn put(layout: &Path, bytes: &[u8]) -> Result<String> {
    let digest = hex::encode(Sha256::digest(bytes));
    fs::write(layout.join("blobs/sha256").join(&digest), bytes)?;
    Ok(format!("sha256:{digest}"))
}
