//! The fnvm home: the one directory that holds everything fnvm keeps. Two homes never share
//! anything, so tests and users can run side by side.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

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

    /// A subdirectory of the home, created on first use.
    pub fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}
