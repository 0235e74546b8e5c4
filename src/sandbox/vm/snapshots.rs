//! The snapshot store: one snapshot per function version and platform, under
//! `<home>/snapshots/<key>/`.
//!
//! A snapshot belongs to exactly what was running when it was taken, so its key hashes:
//! - the function version: the rootfs image (path and file identity, the image cache names it by
//!   manifest digest), the agent's start spec (command, args, env, working dir, user) and the
//!   memory size;
//! - the platform: the guest kernel, the agent's initramfs and the `fnvm-vmm` binary (file
//!   identities) plus the snapshot format's vmm version.
//!
//! Anything else is a different key, so a stale snapshot is never found, let alone loaded. When
//! the platform changes (a rebuilt kernel, agent or vmm), snapshots of the old platform can never
//! be used again and are pruned when the store opens.
//!
//! Layout of one entry: `<key>/about.json` says what it belongs to (for people and for pruning;
//! written first) and `<key>/vm/` is the `fnvm-vmm` snapshot directory (written under a
//! temporary name and renamed by the vmm, so it is complete or absent).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::home::Home;
use crate::sandbox::{InstanceSpec, SandboxError, StartSpec};

/// The `fnvm-vmm` snapshot directory inside an entry.
const VM_DIR: &str = "vm";
/// What an entry belongs to.
const ABOUT_FILE: &str = "about.json";

/// The files a snapshot's platform is made of.
#[derive(Debug, Clone)]
pub struct Platform {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
}

impl Platform {
    /// A digest of the platform: file identities (a rebuild changes them) and the format's
    /// vmm version.
    fn digest(&self) -> Result<String, SandboxError> {
        let mut h = Sha256::new();
        h.update(fnvm_vmm::snapshot::format::VMM_VERSION.as_bytes());
        for path in [&self.kernel, &self.initramfs, &self.vmm] {
            h.update(file_identity(path)?.as_bytes());
        }
        Ok(hex::encode(h.finalize()))
    }
}

/// Path, device, inode, size and modification time: cheap, and any rebuild changes it.
fn file_identity(path: &Path) -> Result<String, SandboxError> {
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| SandboxError::setup(format!("cannot identify {}", path.display()), e))?;
    let meta = std::fs::metadata(&canonical)
        .map_err(|e| SandboxError::setup(format!("cannot identify {}", canonical.display()), e))?;
    Ok(format!(
        "{}\0{}:{}:{}:{}.{}\n",
        canonical.display(),
        meta.dev(),
        meta.ino(),
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

/// What an entry was made for, kept next to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct About {
    pub platform: String,
    pub rootfs_image: PathBuf,
    pub argv: Vec<String>,
    pub memory_mib: u32,
}

/// The key of one function version on one platform.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotKey {
    hex: String,
    about: About,
}

impl SnapshotKey {
    pub fn as_str(&self) -> &str {
        &self.hex
    }
}

/// How much disk the store may use before the least recently used snapshots go, unless
/// `FNVM_SNAPSHOT_BUDGET_MIB` says otherwise.
pub const DEFAULT_BUDGET_BYTES: u64 = 10 << 30;

/// Snapshots of one home and platform.
pub struct SnapshotStore {
    root: PathBuf,
    platform: String,
    /// Disk (allocated blocks) all snapshots may use together.
    budget_bytes: u64,
    /// Keys whose snapshot this process is writing right now: one writer per key.
    writing: Mutex<HashSet<String>>,
}

impl SnapshotStore {
    /// Opens the store of `home` for `platform` and removes entries of other platforms.
    pub fn open(home: &Home, platform: &Platform) -> Result<Self, SandboxError> {
        let root = home
            .dir("snapshots")
            .map_err(|e| SandboxError::setup("cannot create the snapshot store", e))?;
        let budget_bytes = match std::env::var("FNVM_SNAPSHOT_BUDGET_MIB") {
            Ok(v) => v.trim().parse::<u64>().map(|mib| mib << 20).map_err(|_| {
                SandboxError::BadSpec(format!(
                    "FNVM_SNAPSHOT_BUDGET_MIB={v:?} is not a whole number of MiB"
                ))
            })?,
            Err(_) => DEFAULT_BUDGET_BYTES,
        };
        let store = SnapshotStore {
            root,
            platform: platform.digest()?,
            budget_bytes,
            writing: Mutex::new(HashSet::new()),
        };
        store.prune_other_platforms();
        Ok(store)
    }

    /// The key of the function version `spec` starts.
    pub fn key(&self, spec: &InstanceSpec) -> Result<SnapshotKey, SandboxError> {
        self.key_of(&spec.rootfs_image, &spec.start, spec.memory_mib)
    }

    /// The key of a function version: its rootfs image, start spec and memory.
    pub fn key_of(
        &self,
        rootfs_image: &Path,
        start: &StartSpec,
        memory_mib: u32,
    ) -> Result<SnapshotKey, SandboxError> {
        let mut h = Sha256::new();
        h.update(self.platform.as_bytes());
        h.update(file_identity(rootfs_image)?.as_bytes());
        let encoded = serde_json::to_vec(start)
            .map_err(|e| SandboxError::setup("cannot encode the start spec", e))?;
        h.update((encoded.len() as u64).to_le_bytes());
        h.update(&encoded);
        h.update(memory_mib.to_le_bytes());
        Ok(SnapshotKey {
            hex: hex::encode(h.finalize()),
            about: About {
                platform: self.platform.clone(),
                rootfs_image: rootfs_image.to_path_buf(),
                argv: start.argv.clone(),
                memory_mib,
            },
        })
    }

    fn entry(&self, key: &SnapshotKey) -> PathBuf {
        self.root.join(&key.hex)
    }

    /// The `fnvm-vmm` snapshot directory for `key`, if a complete one exists.
    pub fn find(&self, key: &SnapshotKey) -> Option<PathBuf> {
        let dir = self.entry(key).join(VM_DIR);
        dir.join(fnvm_vmm::snapshot::STATE_FILE)
            .is_file()
            .then_some(dir)
    }

    /// [`SnapshotStore::find`] for a start that will use it: marks the entry used now, for
    /// the least-recently-used pruning.
    pub fn use_snapshot(&self, key: &SnapshotKey) -> Option<PathBuf> {
        let dir = self.find(key)?;
        let about = self.entry(key).join(ABOUT_FILE);
        if let Ok(f) = std::fs::File::options().write(true).open(&about) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
        Some(dir)
    }

    /// After `kept` was written: while all snapshots together use more disk than the budget,
    /// the least recently used ones (never `kept`, never one being written) are removed.
    pub fn enforce_budget(&self, kept: &SnapshotKey) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut all: Vec<(std::time::SystemTime, u64, String)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    return None;
                }
                let used = std::fs::metadata(e.path().join(ABOUT_FILE))
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                Some((used, allocated_bytes(&e.path()), name))
            })
            .collect();
        let mut total: u64 = all.iter().map(|(_, bytes, _)| bytes).sum();
        all.sort();
        for (_, bytes, name) in all {
            if total <= self.budget_bytes {
                break;
            }
            if name == kept.hex || lock(&self.writing).contains(&name) {
                continue;
            }
            tracing::info!(
                "removing the least recently used snapshot {name} ({} MiB): the snapshots \
                 use more than {} MiB",
                bytes >> 20,
                self.budget_bytes >> 20
            );
            if self.remove_entry(&name) {
                total = total.saturating_sub(bytes);
            }
        }
    }

    /// Claims the right to write `key`'s snapshot: `None` when it exists already or another
    /// start of this process is writing it. The claim ends when the [`Writing`] is dropped.
    pub fn begin_write(self: &Arc<Self>, key: &SnapshotKey) -> Option<Writing> {
        if self.find(key).is_some() {
            return None;
        }
        if !lock(&self.writing).insert(key.hex.clone()) {
            return None;
        }
        let writing = Writing {
            store: Arc::clone(self),
            key: key.clone(),
        };
        let entry = self.entry(key);
        if let Err(e) =
            std::fs::create_dir_all(&entry).and_then(|()| write_about(&entry, &key.about))
        {
            tracing::warn!("cannot prepare the snapshot {}: {e}", entry.display());
            return None;
        }
        Some(writing)
    }

    /// Forgets `key`'s snapshot (it failed to restore): the next boot start writes a new one.
    pub fn invalidate(&self, key: &SnapshotKey, why: &str) {
        tracing::warn!(snapshot = %key.hex, "removing an unusable snapshot: {why}");
        self.remove(key);
    }

    /// Deletes `key`'s snapshot, if there is one.
    pub fn remove(&self, key: &SnapshotKey) {
        self.remove_entry(&key.hex);
    }

    /// Removes the entry `name`; false if it was not there. Renamed away first, so a
    /// concurrent start never finds half of it.
    fn remove_entry(&self, name: &str) -> bool {
        let doomed = self
            .root
            .join(format!(".{name}.removed-{}", std::process::id()));
        let moved = std::fs::rename(self.root.join(name), &doomed).is_ok();
        if moved {
            let _ = std::fs::remove_dir_all(&doomed);
        }
        moved
    }

    fn prune_other_platforms(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = if name.starts_with('.') {
                // Leftovers of a crashed removal or write.
                true
            } else {
                std::fs::read(path.join(ABOUT_FILE))
                    .ok()
                    .and_then(|b| serde_json::from_slice::<About>(&b).ok())
                    .is_none_or(|about| about.platform != self.platform)
            };
            if stale && self.find_dir_is_not_being_written(&name) {
                tracing::info!("removing the snapshot {name} of another platform");
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }

    fn find_dir_is_not_being_written(&self, name: &str) -> bool {
        !lock(&self.writing).contains(name)
    }
}

/// The disk blocks a directory tree holds (sparse files count what they really use).
fn allocated_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => allocated_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.blocks() * 512),
            _ => 0,
        })
        .sum()
}

/// Writes `about.json` whole (temp file + rename), before the vmm writes the snapshot, so an
/// entry always says which platform it belongs to.
fn write_about(entry: &Path, about: &About) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(about).map_err(std::io::Error::other)?;
    let tmp = entry.join(format!(".{ABOUT_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, entry.join(ABOUT_FILE)))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The claim to write one key's snapshot.
pub struct Writing {
    store: Arc<SnapshotStore>,
    key: SnapshotKey,
}

impl Writing {
    /// Where `fnvm-vmm` must write the snapshot (the directory must not exist).
    pub fn vm_dir(&self) -> PathBuf {
        self.store.entry(&self.key).join(VM_DIR)
    }

    /// The directory [`Writing::vm_dir`] is made in (it exists): the writing VMM's jail holds it.
    pub fn entry_dir(&self) -> PathBuf {
        self.store.entry(&self.key)
    }

    /// The snapshot is written: older ones go if the store is over its budget.
    pub fn written(&self) {
        self.store.enforce_budget(&self.key);
    }
}

impl Drop for Writing {
    fn drop(&mut self) {
        lock(&self.store.writing).remove(&self.key.hex);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::LogLine;

    struct Fixture {
        _dir: tempfile::TempDir,
        home: Home,
        platform: Platform,
        rootfs: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().join("home"))).unwrap();
        let file = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, name).unwrap();
            p
        };
        let platform = Platform {
            kernel: file("vmlinux"),
            initramfs: file("agent.cpio"),
            vmm: file("fnvm-vmm"),
        };
        let rootfs = file("rootfs.img");
        Fixture {
            _dir: dir,
            home,
            platform,
            rootfs,
        }
    }

    fn spec(rootfs: &Path, argv: &[&str], memory_mib: u32) -> InstanceSpec {
        InstanceSpec {
            id: "i".into(),
            rootfs_image: rootfs.to_path_buf(),
            start: StartSpec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                env: vec!["A=1".into()],
                working_dir: "/".into(),
                user: None,
                ready_timeout_ms: 30_000,
                resolv_conf: None,
            },
            memory_mib,
            instance_dir: PathBuf::from("/nonexistent"),
            snapshot: true,
            network: crate::network::NetworkPolicy::none(),
            on_log: Arc::new(|_: LogLine| {}),
        }
    }

    /// Pretends to be fnvm-vmm writing a snapshot into the claimed directory.
    fn write_fake_vm_dir(dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(fnvm_vmm::snapshot::STATE_FILE), b"state").unwrap();
    }

    #[test]
    fn every_part_of_a_function_version_changes_the_key() {
        let f = fixture();
        let store = SnapshotStore::open(&f.home, &f.platform).unwrap();
        let base = store.key(&spec(&f.rootfs, &["srv"], 128)).unwrap();
        assert_eq!(base, store.key(&spec(&f.rootfs, &["srv"], 128)).unwrap());
        assert_ne!(
            base,
            store.key(&spec(&f.rootfs, &["srv", "-v"], 128)).unwrap()
        );
        assert_ne!(base, store.key(&spec(&f.rootfs, &["srv"], 256)).unwrap());
        let mut env = spec(&f.rootfs, &["srv"], 128);
        env.start.env.push("B=2".into());
        assert_ne!(base, store.key(&env).unwrap());
        // A rebuilt rootfs image (same path, new file) is another version.
        std::fs::remove_file(&f.rootfs).unwrap();
        std::fs::write(&f.rootfs, b"rebuilt rootfs").unwrap();
        assert_ne!(base, store.key(&spec(&f.rootfs, &["srv"], 128)).unwrap());
        // The instance's own id and directory are not part of the version.
        let mut other = spec(&f.rootfs, &["srv"], 128);
        other.id = "j".into();
        other.instance_dir = PathBuf::from("/elsewhere");
        assert_eq!(
            store.key(&spec(&f.rootfs, &["srv"], 128)).unwrap(),
            store.key(&other).unwrap()
        );
    }

    #[test]
    fn a_written_snapshot_is_found_and_one_writer_per_key_at_a_time() {
        let f = fixture();
        let store = Arc::new(SnapshotStore::open(&f.home, &f.platform).unwrap());
        let key = store.key(&spec(&f.rootfs, &["srv"], 128)).unwrap();
        assert!(store.find(&key).is_none());
        let writing = store.begin_write(&key).expect("first writer");
        assert!(
            store.begin_write(&key).is_none(),
            "a second writer is refused"
        );
        write_fake_vm_dir(&writing.vm_dir());
        let found = store.find(&key).expect("found after writing");
        assert!(found.ends_with("vm"));
        assert!(
            store.begin_write(&key).is_none(),
            "never rewritten while valid"
        );
        // A writer that gives up (the vmm failed) releases the key.
        let other = store.key(&spec(&f.rootfs, &["other"], 128)).unwrap();
        drop(store.begin_write(&other).unwrap());
        assert!(store.begin_write(&other).is_some());
    }

    #[test]
    fn an_invalid_snapshot_is_removed_and_written_again() {
        let f = fixture();
        let store = Arc::new(SnapshotStore::open(&f.home, &f.platform).unwrap());
        let key = store.key(&spec(&f.rootfs, &["srv"], 128)).unwrap();
        let w = store.begin_write(&key).unwrap();
        write_fake_vm_dir(&w.vm_dir());
        drop(w);
        assert!(store.find(&key).is_some());
        store.invalidate(&key, "test");
        assert!(store.find(&key).is_none());
        assert!(store.begin_write(&key).is_some());
    }

    #[test]
    fn beyond_the_budget_the_least_recently_used_snapshots_go() {
        let f = fixture();
        let store = Arc::new(SnapshotStore::open(&f.home, &f.platform).unwrap());
        let keys: Vec<SnapshotKey> = ["a", "b", "c"]
            .iter()
            .map(|name| {
                let key = store.key(&spec(&f.rootfs, &[name], 128)).unwrap();
                let w = store.begin_write(&key).unwrap();
                write_fake_vm_dir(&w.vm_dir());
                // 1 MiB of real data each.
                std::fs::write(w.vm_dir().join("memory"), vec![1u8; 1 << 20]).unwrap();
                key
            })
            .collect();
        // Used in the order b, a, c (c last): b is the least recently used.
        for (key, secs) in [(&keys[1], 100), (&keys[0], 200), (&keys[2], 300)] {
            let about = store.entry(key).join(ABOUT_FILE);
            let f = std::fs::File::options().write(true).open(about).unwrap();
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
                .unwrap();
        }
        let budget = SnapshotStore {
            root: store.root.clone(),
            platform: store.platform.clone(),
            budget_bytes: (2 << 20) + (256 << 10),
            writing: Mutex::new(HashSet::new()),
        };
        // Within budget after removing one: b goes, a and c stay.
        budget.enforce_budget(&keys[2]);
        assert!(budget.find(&keys[1]).is_none());
        assert!(budget.find(&keys[0]).is_some());
        assert!(budget.find(&keys[2]).is_some());
        // The key just written is never removed, even when it is the least recently used.
        assert!(budget.use_snapshot(&keys[0]).is_some());
        let smaller = SnapshotStore {
            budget_bytes: 1 << 20,
            ..budget
        };
        smaller.enforce_budget(&keys[2]);
        assert!(
            smaller.find(&keys[2]).is_some(),
            "the kept key is never removed"
        );
        assert!(smaller.find(&keys[0]).is_none());
    }

    #[test]
    fn a_new_platform_prunes_the_old_platforms_snapshots() {
        let f = fixture();
        let store = Arc::new(SnapshotStore::open(&f.home, &f.platform).unwrap());
        let key = store.key(&spec(&f.rootfs, &["srv"], 128)).unwrap();
        let w = store.begin_write(&key).unwrap();
        write_fake_vm_dir(&w.vm_dir());
        // Reopening on the same platform keeps it.
        let again = SnapshotStore::open(&f.home, &f.platform).unwrap();
        assert!(again.find(&key).is_some());
        // A rebuilt kernel: the old snapshot can never be used, so it goes.
        std::fs::remove_file(&f.platform.kernel).unwrap();
        std::fs::write(&f.platform.kernel, b"another kernel").unwrap();
        let rebuilt = SnapshotStore::open(&f.home, &f.platform).unwrap();
        let new_key = rebuilt.key(&spec(&f.rootfs, &["srv"], 128)).unwrap();
        assert_ne!(new_key, key);
        assert!(rebuilt.find(&new_key).is_none());
        assert!(!f.home.root().join("snapshots").join(key.as_str()).exists());
    }
}
