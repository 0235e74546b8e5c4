//! The fnvm home: the one directory that holds everything fnvm keeps. Two homes never share
//! anything, so tests and users can run side by side.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};

/// The lock file `fnvm serve` holds in its home for as long as it runs.
const SERVICE_LOCK: &str = "serve.lock";

/// A resolved, existing home directory and the layout inside it.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `--home`/`FNVM_HOME` if given; else `/var/lib/fnvm` for root, else `$XDG_DATA_HOME/fnvm`
    /// (`~/.local/share/fnvm`). Created if missing.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self> {
        let root = match explicit {
            Some(p) => p,
            None if nix::unistd::geteuid().is_root() => PathBuf::from("/var/lib/fnvm"),
            None => {
                let data = std::env::var_os("XDG_DATA_HOME")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share"))
                    })
                    .context("neither XDG_DATA_HOME nor HOME is set; pass --home DIR")?;
                data.join("fnvm")
            }
        };
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create the fnvm home {}", root.display()))?;
        // Absolute from here on: paths under the home are handed to sandboxes and VMMs that run
        // in other working directories.
        let root = std::fs::canonicalize(&root)
            .with_context(|| format!("cannot resolve the fnvm home {}", root.display()))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the home's service lock: one `fnvm serve` per home, since two would adopt, clean
    /// up and stop each other's instances. The lock (flock) goes with the process however it
    /// ends, so a crashed serve never blocks the next; the file names the holder's pid for the
    /// error a second serve gets.
    pub fn lock_for_service(&self) -> Result<ServiceLock> {
        let path = self.root.join(SERVICE_LOCK);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open the service lock {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "a process that has not written its pid yet".to_string(),
                    pid => format!("pid {pid}"),
                };
                anyhow::bail!(
                    "another fnvm serve ({holder}) is using the home {}: stop it, or give this \
                     one another --home/FNVM_HOME",
                    self.root.display()
                );
            }
            Err((_, e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        };
        lock.set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .and_then(|()| lock.sync_data())
            .with_context(|| format!("cannot write this pid into {}", path.display()))?;
        Ok(ServiceLock { _lock: lock })
    }

    /// A subdirectory of the home, created on first use.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}

/// Held by the one `fnvm serve` of a home; released when dropped or when the process ends.
#[derive(Debug)]
pub struct ServiceLock {
    _lock: Flock<std::fs::File>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_service_lock_fails_naming_the_holder_and_a_released_one_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().join("home"))).unwrap();
        let first = home.lock_for_service().unwrap();
        // flock locks belong to the open file: a second open, as another process makes, is
        // refused while the first is held.
        let err = home.lock_for_service().unwrap_err().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id()))
                && err.contains(&home.root().display().to_string()),
            "{err}"
        );
        drop(first);
        let again = home.lock_for_service().unwrap();
        let text = std::fs::read_to_string(home.root().join(SERVICE_LOCK)).unwrap();
        assert_eq!(text.trim(), std::process::id().to_string());
        drop(again);
    }
}
