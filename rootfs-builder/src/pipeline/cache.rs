//! The rootfs cache, `<home>/rootfs`: an entry per manifest digest, published by renaming a
//! complete staging directory (so it is whole or absent), alias symlinks for index digests,
//! and the clean-up of staging directories whose builder died.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{cache_err, ImageRecord, PullError, PulledImage};
use crate::digest::Digest;
use crate::store::process_alive;

pub(super) const ROOTFS_IMAGE: &str = "rootfs.img";
pub(super) const IMAGE_JSON: &str = "image.json";
const STAGING_PREFIX: &str = ".staging-";
static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

/// `<home>/rootfs`: finished entries by manifest hex, alias symlinks, staging dirs.
pub(super) struct RootfsCache {
    pub(super) dir: PathBuf,
}

pub(super) struct Staging {
    pub(super) path: PathBuf,
    published: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.published {
            let _ = remove_tree(&self.path);
        }
    }
}

impl RootfsCache {
    pub(super) fn open(dir: &Path) -> Result<Self, PullError> {
        fs::create_dir_all(dir).map_err(cache_err(dir))?;
        let cache = Self {
            dir: dir.to_owned(),
        };
        cache.remove_stale_staging();
        Ok(cache)
    }

    /// A complete entry for `digest` (directly or through an alias), if there is one.
    pub(super) fn lookup(&self, digest: &Digest) -> Result<Option<PulledImage>, PullError> {
        let entry = self.dir.join(digest.hex());
        let json_path = entry.join(IMAGE_JSON);
        let image_path = entry.join(ROOTFS_IMAGE);
        let bytes = match fs::read(&json_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(cache_err(&json_path)(e)),
        };
        let image: ImageRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(path = %json_path.display(), error = %e, "unreadable cache record; rebuilding");
                return Ok(None);
            }
        };
        if !image_path.is_file() {
            return Ok(None);
        }
        // Resolve an alias so callers get the canonical path.
        let rootfs_image = self
            .dir
            .join(image.manifest_digest.hex())
            .join(ROOTFS_IMAGE);
        Ok(Some(PulledImage {
            image,
            rootfs_image,
            cache_hit: true,
        }))
    }

    pub(super) fn staging(&self, digest: &Digest) -> Result<Staging, PullError> {
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!(
            "{STAGING_PREFIX}{}.{}.{n}",
            digest.hex(),
            std::process::id()
        ));
        fs::create_dir(&path).map_err(cache_err(&path))?;
        Ok(Staging {
            path,
            published: false,
        })
    }

    /// Renames a finished staging dir into place. If a concurrent pull published the same
    /// digest first, its entry is kept and ours discarded; a broken entry is replaced.
    pub(super) fn publish(&self, mut staging: Staging, digest: &Digest) -> Result<(), PullError> {
        let target = self.dir.join(digest.hex());
        sync_dir(&staging.path)?;
        match fs::rename(&staging.path, &target) {
            Ok(()) => staging.published = true,
            Err(_) if target.exists() => {
                if self.lookup(digest)?.is_none() {
                    remove_tree(&target).map_err(cache_err(&target))?;
                    fs::rename(&staging.path, &target).map_err(cache_err(&target))?;
                    staging.published = true;
                }
            }
            Err(e) => return Err(cache_err(&target)(e)),
        }
        sync_dir(&self.dir)
    }

    /// `<index-hex>` → `<manifest-hex>`, created atomically.
    pub(super) fn alias(&self, from: &Digest, to: &Digest) -> Result<(), PullError> {
        if from == to {
            return Ok(());
        }
        let link = self.dir.join(from.hex());
        let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            "{STAGING_PREFIX}link-{}.{}.{n}",
            from.hex(),
            std::process::id()
        ));
        std::os::unix::fs::symlink(to.hex(), &tmp).map_err(cache_err(&tmp))?;
        if let Err(e) = fs::rename(&tmp, &link) {
            let _ = fs::remove_file(&tmp);
            // A real directory there (the index digest pulled some other way) is fine too.
            if !link.exists() {
                return Err(cache_err(&link)(e));
            }
        }
        Ok(())
    }

    pub(super) fn remove_stale_staging(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
                continue;
            };
            let pid = rest.split('.').nth(1).and_then(|p| p.parse::<i32>().ok());
            if pid.is_some_and(|p| !process_alive(p)) {
                tracing::debug!(dir = name, "removing a stale rootfs staging dir");
                let _ = remove_tree(&entry.path());
            }
        }
    }
}

/// Removes a file, symlink or directory tree. Unpacked trees can contain read-only
/// directories; as root that does not matter, otherwise permissions are opened up first.
pub(super) fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(m) if !m.is_dir() => fs::remove_file(path),
        Ok(_) => match fs::remove_dir_all(path) {
            Ok(()) => Ok(()),
            Err(_) => {
                make_writable(path);
                fs::remove_dir_all(path)
            }
        },
    }
}

fn make_writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&e.path());
            }
        }
    }
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), PullError> {
    let mut f = fs::File::create(path).map_err(cache_err(path))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(cache_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), PullError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(cache_err(dir))
}
