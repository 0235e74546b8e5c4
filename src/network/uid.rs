//! Per-instance uids for a VM's passt: the host's firewall tells one VM's traffic from
//! another's by the uid of the process that made the socket (`meta skuid`, see
//! [`super::host_filter`]), so every passt runs as a uid of its own.
//!
//! The uids are [`UID_BASE`]` + n` for `n < `[`UID_SLOTS`], a range no distribution hands out
//! (Debian's dynamic and container ranges end far below it). Slot `n` belongs to whoever holds a
//! non-blocking `flock` on `/run/fnvm/egress-uids/<n>.lock`, for the instance's whole life:
//! several fnvm processes on one host (a service, `fnvm run`, parallel tests) never share a
//! uid, and a crashed fnvm's slots come free with its descriptors. Beside each lock,
//! `/run/fnvm/egress-uids/<n>/` (owned by the uid, mode 0700) holds the passt socket: passt
//! binds it after it has dropped to the uid, so it must be the uid's to write, and the instance
//! directory (root's, 0700) is not.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};

/// The first uid of the range.
pub const UID_BASE: u32 = 0x2f00_0000;
/// How many uids the range holds (instances with egress at once, host-wide).
pub const UID_SLOTS: u32 = 65536;
/// Where the slot locks and the passt directories live.
pub const LOCK_DIR: &str = "/run/fnvm/egress-uids";

/// Why no uid could be taken.
#[derive(Debug, thiserror::Error)]
pub enum UidError {
    /// The lock directory or a slot's file cannot be made or locked.
    #[error("cannot take an egress uid slot at {path}: {cause}")]
    Lock {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// Every slot is held.
    #[error("all {UID_SLOTS} egress uids ({LOCK_DIR}) are in use")]
    AllTaken,
}

/// One slot of the range, held until dropped (then its directory and lock file go).
#[derive(Debug)]
pub struct EgressUid {
    n: u32,
    lock: Option<Flock<File>>,
}

impl EgressUid {
    /// Takes the first free slot, with a fresh, empty directory owned by its uid. Whatever a
    /// crashed holder left of the slot (rules, processes, files) is for the caller to clear
    /// before use: see [`super::host_filter::install`], which replaces the slot's rules.
    pub fn take() -> Result<EgressUid, UidError> {
        let dir = Path::new(LOCK_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|cause| UidError::Lock {
                path: dir.to_path_buf(),
                cause,
            })?;
        for n in 0..UID_SLOTS {
            if let Some(lock) = try_lock(n)? {
                let slot = EgressUid {
                    n,
                    lock: Some(lock),
                };
                slot.fresh_dir()?;
                return Ok(slot);
            }
        }
        Err(UidError::AllTaken)
    }

    /// The uid (and gid) passt runs as.
    pub fn uid(&self) -> u32 {
        UID_BASE + self.n
    }

    /// The slot's directory, the uid's own: passt's socket and pid file.
    pub fn dir(&self) -> PathBuf {
        slot_dir(self.n)
    }

    fn fresh_dir(&self) -> Result<(), UidError> {
        let dir = self.dir();
        let failed = |cause| UidError::Lock {
            path: dir.clone(),
            cause,
        };
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
            _ => {}
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(failed)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(failed)?;
        let id = Some(nix::unistd::Uid::from_raw(self.uid()));
        let gid = Some(nix::unistd::Gid::from_raw(self.uid()));
        nix::unistd::chown(&dir, id, gid).map_err(|e| failed(e.into()))
    }
}

impl Drop for EgressUid {
    /// Removes the slot's directory, then unlinks the lock file while still holding it (a
    /// process that opened the old file re-checks the path after locking, see [`try_lock`]).
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(self.dir()) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %self.dir().display(), "cannot remove an egress uid's directory: {e}");
            }
        }
        if let Some(lock) = self.lock.take() {
            let _ = std::fs::remove_file(lock_path(self.n));
            drop(lock);
        }
    }
}

/// The slot of `uid`, if it is in the range.
pub fn slot_of(uid: u32) -> Option<u32> {
    uid.checked_sub(UID_BASE).filter(|n| *n < UID_SLOTS)
}

/// Takes slot `n`'s lock for a moment if nobody holds it: then its holder is gone (or there
/// never was one) and whatever the slot left may be removed while the returned lock is held.
/// None while an instance holds it.
pub fn claim_if_free(n: u32) -> Result<Option<Flock<File>>, UidError> {
    if !Path::new(LOCK_DIR).is_dir() {
        return Ok(None);
    }
    try_lock(n)
}

/// Removes a claimed slot's directory and lock file, then releases it.
pub fn release_claimed(n: u32, lock: Flock<File>) {
    let _ = std::fs::remove_dir_all(slot_dir(n));
    let _ = std::fs::remove_file(lock_path(n));
    drop(lock);
}

/// The slots that have a directory or lock file now (held or left behind).
pub fn slots_on_disk() -> Vec<u32> {
    let mut found: Vec<u32> = std::fs::read_dir(LOCK_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.strip_suffix(".lock")
                .unwrap_or(&name)
                .parse::<u32>()
                .ok()
        })
        .filter(|n| *n < UID_SLOTS)
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Slot `n`'s lock without waiting; None when it is held.
fn try_lock(n: u32) -> Result<Option<Flock<File>>, UidError> {
    let path = lock_path(n);
    let failed = |cause| UidError::Lock {
        path: path.clone(),
        cause,
    };
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(failed)?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Ok(None),
            Err((_, e)) => return Err(failed(e.into())),
        };
        // A holder unlinks its file before unlocking it, so the lock just taken may be on a
        // file no longer at the path: it guards nothing then; take the path's current file.
        let held = lock.metadata().map_err(failed)?;
        match std::fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => return Ok(Some(lock)),
            _ => continue,
        }
    }
}

fn lock_path(n: u32) -> PathBuf {
    Path::new(LOCK_DIR).join(format!("{n}.lock"))
}

fn slot_dir(n: u32) -> PathBuf {
    Path::new(LOCK_DIR).join(n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("skipped: needs root ({LOCK_DIR})");
        false
    }

    #[test]
    fn two_holders_never_share_a_uid_and_a_dropped_slot_is_free_again() {
        if !root() {
            return;
        }
        let a = EgressUid::take().unwrap();
        let b = EgressUid::take().unwrap();
        assert_ne!(a.uid(), b.uid());
        assert!(slot_of(a.uid()).is_some() && slot_of(UID_BASE - 1).is_none());
        // The directory is the uid's own and nobody else's.
        let meta = std::fs::metadata(a.dir()).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (a.uid(), 0o700));
        // A held slot cannot be claimed; a dropped one can, and has nothing left.
        let n = slot_of(a.uid()).unwrap();
        assert!(claim_if_free(n).unwrap().is_none());
        let dir = a.dir();
        drop(a);
        assert!(!dir.exists());
        let lock = claim_if_free(n).unwrap().expect("a dropped slot is free");
        release_claimed(n, lock);
    }
}
