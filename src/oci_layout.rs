//! Writes OCI image layouts from layers built in memory or tar files on disk: the bundled
//! example function's image (`fnvm demo`, [`crate::example_image`]) and the images the
//! whole-system tests and benchmarks build (through `fnvm-testkit`).
//!
//! The layout is written whole into a temporary directory beside its final place and renamed
//! into place, so a cached layout is complete or absent. Tar entries carry fixed owners and
//! times, so the same inputs give the same digests (and hit the rootfs cache).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

/// One entry of a layer built in memory.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// Where a layer's bytes come from.
#[derive(Debug, Clone)]
pub enum Layer {
    /// Entries packed into a gzip-compressed tar.
    Entries(Vec<Entry>),
    /// An existing uncompressed tar file, used as it is.
    TarFile(PathBuf),
}

/// The run config of the image (the fields a function runtime reads).
#[derive(Debug, Clone, Default)]
pub struct RunConfigSpec {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// The tag every layout written here carries.
pub const TAG: &str = "latest";

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const MEDIA_TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Why a layout could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The layout's directory has no parent directory to stage it in.
    #[error("{} has no parent directory to stage the layout in", dir.display())]
    NoParent { dir: PathBuf },
    /// The layout's directory has no name usable in a staging directory's name.
    #[error("{} has no usable name (not UTF-8)", dir.display())]
    NoName { dir: PathBuf },
    /// A layer's tar file could not be read.
    #[error("cannot read the layer tar file {}", path.display())]
    ReadLayer {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the layout (or staging it) failed.
    #[error("cannot write the OCI layout {}", dir.display())]
    Write {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes an OCI image layout at `dir` unless one is already there; returns the reference
/// (`oci:DIR:latest`) to pull it by.
pub fn ensure_layout(
    dir: &Path,
    layers: &[Layer],
    config: &RunConfigSpec,
) -> Result<String, LayoutError> {
    let reference = format!("oci:{}:{TAG}", dir.display());
    if dir.join("index.json").is_file() {
        return Ok(reference);
    }
    let write = |source| LayoutError::Write {
        dir: dir.to_path_buf(),
        source,
    };
    let parent = dir.parent().ok_or_else(|| LayoutError::NoParent {
        dir: dir.to_path_buf(),
    })?;
    fs::create_dir_all(parent).map_err(write)?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| LayoutError::NoName {
            dir: dir.to_path_buf(),
        })?;
    // Unique per call, not just per process: two threads of one test binary that write the
    // same layout at once must not remove each other's staging directory.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = parent.join(format!(".{name}.tmp-{}-{call}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    let result = write_layout(&staging, dir, layers, config).and_then(|()| {
        match fs::rename(&staging, dir) {
            Ok(()) => Ok(()),
            // Someone else finished the same layout first: theirs is as good as ours.
            Err(_) if dir.join("index.json").is_file() => Ok(()),
            Err(e) => Err(write(e)),
        }
    });
    let _ = fs::remove_dir_all(&staging);
    result.map(|()| reference)
}

/// Writes the layout into `staging` (errors name `dir`, where it is meant to end up).
fn write_layout(
    staging: &Path,
    dir: &Path,
    layers: &[Layer],
    config: &RunConfigSpec,
) -> Result<(), LayoutError> {
    let write = |source| LayoutError::Write {
        dir: dir.to_path_buf(),
        source,
    };
    let blobs = staging.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(write)?;
    let mut layer_descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in layers {
        let (descriptor, diff_id) = match layer {
            Layer::Entries(entries) => {
                let tar = pack_entries(entries).map_err(write)?;
                let diff_id = sha256_hex(&tar);
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                gz.write_all(&tar).map_err(write)?;
                let compressed = gz.finish().map_err(write)?;
                (
                    put_blob(&blobs, MEDIA_TAR_GZ, &compressed).map_err(write)?,
                    diff_id,
                )
            }
            Layer::TarFile(path) => {
                let (digest, size) = copy_blob(&blobs, path, dir)?;
                let descriptor = serde_json::json!({
                    "mediaType": MEDIA_TAR, "digest": format!("sha256:{digest}"), "size": size
                });
                (descriptor, digest)
            }
        };
        layer_descriptors.push(descriptor);
        diff_ids.push(format!("sha256:{diff_id}"));
    }
    let mut run_config = serde_json::Map::new();
    let strings = |v: &[String]| serde_json::Value::from(v.to_vec());
    if !config.entrypoint.is_empty() {
        run_config.insert("Entrypoint".into(), strings(&config.entrypoint));
    }
    if !config.cmd.is_empty() {
        run_config.insert("Cmd".into(), strings(&config.cmd));
    }
    if !config.env.is_empty() {
        run_config.insert("Env".into(), strings(&config.env));
    }
    if let Some(w) = &config.working_dir {
        run_config.insert("WorkingDir".into(), w.clone().into());
    }
    if let Some(u) = &config.user {
        run_config.insert("User".into(), u.clone().into());
    }
    let image_config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run_config,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    let config_descriptor =
        put_blob(&blobs, MEDIA_CONFIG, &to_json(&image_config)).map_err(write)?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": config_descriptor,
        "layers": layer_descriptors,
    });
    let mut manifest_descriptor =
        put_blob(&blobs, MEDIA_MANIFEST, &to_json(&manifest)).map_err(write)?;
    manifest_descriptor["annotations"] =
        serde_json::json!({ "org.opencontainers.image.ref.name": TAG });
    manifest_descriptor["platform"] = serde_json::json!({ "architecture": "amd64", "os": "linux" });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [manifest_descriptor],
    });
    fs::write(
        staging.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(write)?;
    fs::write(staging.join("index.json"), to_json(&index)).map_err(write)?;
    Ok(())
}

fn to_json(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("a JSON value serializes")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Stores `bytes` as a blob; returns its descriptor.
fn put_blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> io::Result<serde_json::Value> {
    let hex = sha256_hex(bytes);
    fs::write(blobs.join(&hex), bytes)?;
    Ok(serde_json::json!({
        "mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()
    }))
}

/// Copies a layer's tar file into the blobs while hashing it; returns (hex digest, size).
/// Errors name the tar file when reading fails, else the layout `dir`.
fn copy_blob(blobs: &Path, src: &Path, dir: &Path) -> Result<(String, u64), LayoutError> {
    let read = |source| LayoutError::ReadLayer {
        path: src.to_path_buf(),
        source,
    };
    let write = |source| LayoutError::Write {
        dir: dir.to_path_buf(),
        source,
    };
    let tmp = blobs.join(".incoming");
    let mut input = fs::File::open(src).map_err(read)?;
    let mut output = fs::File::create(&tmp).map_err(write)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf).map_err(read)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        output.write_all(&buf[..n]).map_err(write)?;
        size += n as u64;
    }
    output.sync_all().map_err(write)?;
    let hex = hex::encode(hasher.finalize());
    fs::rename(&tmp, blobs.join(&hex)).map_err(write)?;
    Ok((hex, size))
}

/// An uncompressed tar of `entries`, owned by root, dated at the epoch.
fn pack_entries(entries: &[Entry]) -> io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match entry {
            Entry::Dir { path, mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, path, io::empty())?;
            }
            Entry::File { path, mode, data } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    builder.into_inner()
}

/// The directories every function image needs (mount points and writable places).
pub fn base_dirs() -> Vec<Entry> {
    let dir = |path: &str, mode| Entry::Dir {
        path: path.to_string(),
        mode,
    };
    vec![
        dir("etc", 0o755),
        dir("proc", 0o555),
        dir("sys", 0o555),
        dir("dev", 0o755),
        dir("tmp", 0o1777),
        dir("var", 0o755),
        dir("var/user", 0o755),
        Entry::File {
            path: "etc/passwd".into(),
            mode: 0o644,
            data: b"root:x:0:0:root:/root:/sbin/nologin\nqcloud:x:1000:1000:qcloud:/var/user:/sbin/nologin\n".to_vec(),
        },
        Entry::File {
            path: "etc/group".into(),
            mode: 0o644,
            data: b"root:x:0:\nqcloud:x:1000:\n".to_vec(),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads of one test binary that need the same layout at once (the snapshot tests'
    /// python image) both get it: neither removes the other's staging directory.
    #[test]
    fn threads_writing_the_same_layout_at_once_both_succeed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("img");
        let config = RunConfigSpec::default();
        std::thread::scope(|s| {
            let writers: Vec<_> = (0..4)
                .map(|_| s.spawn(|| ensure_layout(&dir, &[Layer::Entries(base_dirs())], &config)))
                .collect();
            for w in writers {
                w.join().unwrap().expect("every writer gets the layout");
            }
        });
        assert!(dir.join("index.json").is_file());
    }

    #[test]
    fn a_layout_is_complete_and_content_addressed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("img");
        let mut entries = base_dirs();
        entries.push(Entry::Symlink {
            path: "bin".into(),
            target: "usr/bin".into(),
        });
        let config = RunConfigSpec {
            entrypoint: vec!["/x".into()],
            ..Default::default()
        };
        let reference = ensure_layout(&dir, &[Layer::Entries(entries.clone())], &config).unwrap();
        assert_eq!(reference, format!("oci:{}:latest", dir.display()));
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
        let manifest_digest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest_bytes =
            fs::read(dir.join("blobs/sha256").join(&manifest_digest[7..])).unwrap();
        assert_eq!(sha256_hex(&manifest_bytes), manifest_digest[7..]);
        let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
        for blob in manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .chain([&manifest["config"]])
        {
            let hex = &blob["digest"].as_str().unwrap()[7..];
            let bytes = fs::read(dir.join("blobs/sha256").join(hex)).unwrap();
            assert_eq!(sha256_hex(&bytes), hex);
            assert_eq!(bytes.len() as u64, blob["size"].as_u64().unwrap());
        }
        // Same inputs, same digests (reproducible tar entries).
        let again = tmp.path().join("again");
        ensure_layout(&again, &[Layer::Entries(entries)], &config).unwrap();
        assert_eq!(
            fs::read(dir.join("index.json")).unwrap(),
            fs::read(again.join("index.json")).unwrap()
        );
        // No staging directory is left behind.
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
