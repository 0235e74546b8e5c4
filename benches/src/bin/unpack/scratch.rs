//! Where the contenders write: a fresh ext4 file system made for the run (mkfs defaults, so
//! with a journal, as on most hosts), loop-mounted, when the bench runs as root.
//!
//! Why not the temp directory itself: on an ext4 *without* a journal (this CI host's root
//! file system) the kernel skips, for every inode it allocates, each inode freed in the last
//! minutes (`recently_deleted()`), scanning its group from the start. Each contender removes a
//! 9,600-entry tree before the next one runs, so every unpack then paid 1.5–2 s in that scan
//! (perf: ~40 % of all samples): the medians measured the host's file system, not the
//! unpackers. Without root the temp directory is used, and the report says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

/// A scratch directory, on its own file system when one could be made.
pub struct Scratch {
    pub dir: PathBuf,
    /// The backing file of the mounted file system, if any.
    image: Option<PathBuf>,
    /// What the report says about where the trees were written.
    pub about: String,
}

impl Scratch {
    pub fn new(root: bool) -> Result<Self> {
        let base = std::env::temp_dir().join(format!("fnvm-bench-unpack-{}", std::process::id()));
        std::fs::create_dir_all(&base)?;
        if !root {
            return Ok(Scratch {
                about: format!(
                    "scratch: {} (not root: no file system of its own; the host's file system \
                     state weighs on every figure)",
                    base.display()
                ),
                dir: base,
                image: None,
            });
        }
        let image = base.with_extension("ext4");
        let file = std::fs::File::create(&image)?;
        // Sparse: only what the contenders write is allocated.
        file.set_len(16 << 30)?;
        drop(file);
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .status()
            .context("cannot run mkfs.ext4")?;
        // Direct I/O on the loop device: the file system's writes go to the backing file's
        // disk once, not through a second page cache.
        let device = if made.success() {
            let out = Command::new("losetup")
                .args(["--direct-io=on", "--find", "--show"])
                .arg(&image)
                .output()
                .context("cannot run losetup")?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            None
        };
        let mounted = match &device {
            Some(device) => {
                let ok = Command::new("mount")
                    .arg(device)
                    .arg(&base)
                    .status()
                    .context("cannot run mount")?
                    .success();
                // Detached by the kernel when the file system is unmounted.
                let _ = Command::new("losetup").args(["-d", device]).status();
                ok
            }
            None => false,
        };
        if !mounted {
            let _ = std::fs::remove_file(&image);
            anyhow::bail!(
                "cannot make the scratch file system ({} on {})",
                image.display(),
                base.display()
            );
        }
        Ok(Scratch {
            about: format!(
                "scratch: a fresh ext4 made for this run (mkfs.ext4 defaults: with a journal) \
                 on a direct-I/O loop device, mounted at {}",
                base.display()
            ),
            dir: base,
            image: Some(image),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(image) = &self.image {
            let _ = Command::new("umount").arg(&self.dir).status();
            let _ = std::fs::remove_file(image);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
