//! The fnvm home: the one directory that holds everything fnvm keeps. Two homes never share
//! anything, so tests and users can run side by side.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// The lock file `fnvm serve` holds in its home for as long as it runs.
const SERVICE_LOCK: &str = "serve.lock";

/// Why the home cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    /// No home was given and there is no default: neither XDG_DATA_HOME nor HOME is set.
    #[error("neither XDG_DATA_HOME nor HOME is set; pass --home DIR")]
    NoDefault,
    /// A directory of the home (or the home itself) cannot be created.
    #[error("cannot create {what} {path}: {source}")]
    Create {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The home's path cannot be made absolute.
    #[error("cannot resolve the fnvm home {path}: {source}")]
    Resolve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The service lock file cannot be opened, locked or written.
    #[error("cannot {what} the service lock {path}: {source}")]
    Lock {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another `fnvm serve` holds this home.
    #[error(
        "another fnvm serve ({holder}) is using the home {home}: stop it, or give this one \
         another --home/FNVM_HOME"
    )]
    Busy { holder: String, home: PathBuf },
}

/// A resolved, existing home directory and the layout inside it.
#[derive(Debug, Clone)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// `--home`/`FNVM_HOME` if given; else `/var/lib/fnvm` for root, else `$XDG_DATA_HOME/fnvm`
    /// (`~/.local/share/fnvm`). Created if missing.
    pub fn resolve(explicit: Option<PathBuf>) -> Result<Self, HomeError> {
        let root = match explicit {
            Some(p) => p,
            None if nix::unistd::geteuid().is_root() => PathBuf::from("/var/lib/fnvm"),
            None => {
                let data = std::env::var_os("XDG_DATA_HOME")
                    .map(PathBuf::from)
                    .or_else(|| {
                        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share"))
                    })
                    .ok_or(HomeError::NoDefault)?;
                data.join("fnvm")
            }
        };
        std::fs::create_dir_all(&root).map_err(|source| HomeError::Create {
            what: "the fnvm home",
            path: root.clone(),
            source,
        })?;
        // Absolute from here on: paths under the home are handed to sandboxes and VMMs that run
        // in other working directories.
        let root = std::fs::canonicalize(&root).map_err(|source| HomeError::Resolve {
            path: root.clone(),
            source,
        })?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Takes the home's service lock: one `fnvm serve` per home, since two would adopt, clean
    /// up and stop each other's instances. The lock (flock) goes with the process however it
    /// ends, so a crashed serve never blocks the next; the file names the holder's pid for the
    /// error a second serve gets.
    pub fn lock_for_service(&self) -> Result<ServiceLock, HomeError> {
        let path = self.root.join(SERVICE_LOCK);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| HomeError::Lock {
                what: "open",
                path: path.clone(),
                source,
            })?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => "a process that has not written its pid yet".to_string(),
                    pid => format!("pid {pid}"),
                };
                return Err(HomeError::Busy {
                    holder,
                    home: self.root.clone(),
                });
            }
            Err((_, e)) => {
                return Err(HomeError::Lock {
                    what: "take",
                    path,
                    source: e.into(),
                });
            }
        };
        lock.set_len(0)
            .and_then(|()| lock.rewind())
            .and_then(|()| writeln!(lock, "{}", std::process::id()))
            .and_then(|()| lock.sync_data())
            .map_err(|source| HomeError::Lock {
                what: "write this pid into",
                path,
                source,
            })?;
        Ok(ServiceLock { _lock: lock })
    }

    /// A subdirectory of the home, created on first use.
    pub fn dir(&self, name: &str) -> Result<PathBuf, HomeError> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).map_err(|source| HomeError::Create {
            what: "the home's directory",
            path: dir.clone(),
            source,
        })?;
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
