//! The writable layer: a 512 MiB sparse ext4 file per instance that holds every write of the
//! guest (the upper and work dirs of its overlay root). The same file serves both sandboxes: a
//! virtio-blk disk in the VM, a loop device in the process sandbox.
//!
//! Formatting costs a mkfs process (~6 ms here); copying a formatted template costs a few hole-aware
//! copies of ~400 KiB (well under a millisecond), or one reflink where the file system has them.
//! So mkfs runs once per home (and mkfs binary) into a cached template, and each instance gets a
//! sparse copy. Which mkfs binary is told by its file (path, size, change time), not by running
//! `mkfs.ext4 -V`: that was a process per start (~4 ms), paid by every `fnvm run`. The file's size is fixed at 512 MiB: the guest's file system cannot grow it, so the
//! host file never holds more than 512 MiB whatever the guest writes.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::home::Home;
use crate::sandbox::SandboxError;

/// The writable layer's size: the function's whole disk budget.
pub const WRITABLE_LAYER_BYTES: u64 = 512 * 1024 * 1024;

/// No journal (the layer dies with the instance, a crash loses nothing of value), lazy inode
/// tables, no reserved blocks (the function may run as root and still gets the full 512 MiB).
const MKFS_ARGS: &[&str] = &[
    "-q",
    "-F",
    "-t",
    "ext4",
    "-b",
    "4096",
    "-m",
    "0",
    "-O",
    "^has_journal",
    "-E",
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard",
    "-L",
    "fnvm-writable",
];

/// A per-instance writable-layer file; removed when dropped.
#[derive(Debug)]
pub struct WritableLayer {
    path: PathBuf,
}

impl WritableLayer {
    /// Creates `path` as a fresh, empty 512 MiB ext4 file system (sparse).
    pub fn create(home: &Home, path: &Path) -> Result<Self, SandboxError> {
        let template = template(home)?;
        fnvm_vmm::sparse_copy::copy_sparse_unsynced(&template, path).map_err(|e| {
            SandboxError::setup(
                format!("cannot create the writable layer {}", path.display()),
                e,
            )
        })?;
        Ok(WritableLayer {
            path: path.to_path_buf(),
        })
    }

    /// Creates `path` as this instance's own copy of `source`, the writable layer a snapshot
    /// was taken with (a reflink or a sparse copy of its data, never a full 512 MiB copy).
    pub fn copy_of(source: &Path, path: &Path) -> Result<Self, SandboxError> {
        fnvm_vmm::sparse_copy::copy_sparse_unsynced(source, path).map_err(|e| {
            SandboxError::setup(
                format!(
                    "cannot copy the snapshot's writable layer {} to {}",
                    source.display(),
                    path.display()
                ),
                e,
            )
        })?;
        Ok(WritableLayer {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WritableLayer {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot remove the writable layer {}: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// The cached, formatted template of this home; made (once) if missing.
fn template(home: &Home) -> Result<PathBuf, SandboxError> {
    let dir = home
        .dir("writable-layer")
        .map_err(|e| SandboxError::setup("cannot create the writable-layer cache", e))?;
    let mkfs = mkfs_identity()?;
    let mut key = Sha256::new();
    key.update(mkfs.as_bytes());
    key.update(MKFS_ARGS.join(" ").as_bytes());
    key.update(WRITABLE_LAYER_BYTES.to_le_bytes());
    let path = dir.join(format!(
        "template-{}.ext4",
        &hex::encode(key.finalize())[..16]
    ));
    if path.is_file() {
        return Ok(path);
    }
    // Format into a private name, then rename: a concurrent fnvm never sees half a template.
    // Unique per call, not only per process: a service starts several first instances at once.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".template-{}-{n}.tmp", std::process::id()));
    let result = format_file(&tmp).and_then(|()| {
        std::fs::rename(&tmp, &path).map_err(|e| {
            SandboxError::setup(format!("cannot rename {} into place", tmp.display()), e)
        })
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| path)
}

/// The `mkfs.ext4` that would run, as its resolved path, size and change time: a new
/// e2fsprogs (a new binary) makes a new template.
fn mkfs_identity() -> Result<String, SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let found = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("mkfs.ext4"))
        .find_map(|candidate| {
            let meta = std::fs::metadata(&candidate).ok()?;
            (meta.is_file() && meta.mode() & 0o111 != 0).then_some((candidate, meta))
        });
    let Some((path, meta)) = found else {
        return Err(SandboxError::setup(
            missing_mkfs(),
            io::Error::new(io::ErrorKind::NotFound, "mkfs.ext4 is not on the PATH"),
        ));
    };
    let resolved = std::fs::canonicalize(&path).unwrap_or(path);
    Ok(format!(
        "{} {} {}.{}",
        resolved.display(),
        meta.len(),
        meta.ctime(),
        meta.ctime_nsec()
    ))
}

fn missing_mkfs() -> String {
    "cannot run mkfs.ext4 to format the writable layer (install e2fsprogs)".to_string()
}

/// Makes `path` a sparse 512 MiB file and formats it.
fn format_file(path: &Path) -> Result<(), SandboxError> {
    let file = File::create(path)
        .map_err(|e| SandboxError::setup(format!("cannot create {}", path.display()), e))?;
    file.set_len(WRITABLE_LAYER_BYTES)
        .map_err(|e| SandboxError::setup(format!("cannot size {}", path.display()), e))?;
    drop(file);
    let out = fnvm_rootfs_builder::tool::die_with_parent(&mut Command::new("mkfs.ext4"))
        .args(MKFS_ARGS)
        .arg(path)
        .output()
        .map_err(|e| SandboxError::setup(missing_mkfs(), e))?;
    if !out.status.success() {
        return Err(SandboxError::setup(
            format!("mkfs.ext4 {} failed ({})", path.display(), out.status),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    fn home() -> (tempfile::TempDir, Home) {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_path_buf())).unwrap();
        (dir, home)
    }

    #[test]
    fn a_layer_is_a_sparse_512_mib_ext4_file_removed_on_drop() {
        let (dir, home) = home();
        let path = dir.path().join("writable.ext4");
        let layer = WritableLayer::create(&home, &path).unwrap();
        let meta = std::fs::metadata(layer.path()).unwrap();
        assert_eq!(meta.len(), WRITABLE_LAYER_BYTES);
        let allocated = meta.blocks() * 512;
        assert!(
            allocated < 8 << 20,
            "{allocated} bytes allocated: not sparse"
        );
        // ext4 superblock magic 0xEF53 at byte 1024 + 56.
        let mut magic = [0u8; 2];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut magic, 1024 + 56)
            .unwrap();
        assert_eq!(u16::from_le_bytes(magic), 0xEF53);
        let check = Command::new("e2fsck")
            .args(["-n", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        drop(layer);
        assert!(!path.exists());
    }

    #[test]
    fn the_template_is_made_once_and_copies_are_identical() {
        let (dir, home) = home();
        let a = WritableLayer::create(&home, &dir.path().join("a")).unwrap();
        let b = WritableLayer::create(&home, &dir.path().join("b")).unwrap();
        let templates: Vec<_> = std::fs::read_dir(home.root().join("writable-layer"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(templates.len(), 1, "{templates:?}");
        assert_eq!(
            std::fs::read(a.path()).unwrap(),
            std::fs::read(b.path()).unwrap()
        );
        // An existing file is never overwritten.
        assert!(WritableLayer::create(&home, a.path()).is_err());
        assert!(a.path().exists());
    }

    #[test]
    fn concurrent_first_layers_of_a_fresh_home_all_succeed() {
        let (dir, home) = home();
        let layers: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|i| {
                    let (home, path) = (&home, dir.path().join(format!("layer-{i}")));
                    scope.spawn(move || WritableLayer::create(home, &path))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for layer in &layers {
            assert!(layer.is_ok(), "{:?}", layer.as_ref().err());
        }
        let leftovers: Vec<_> = std::fs::read_dir(home.root().join("writable-layer"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|name| name.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}
