//! The default guest kernel: built from Debian's linux-source-6.1 with fnvm's config fragment and
//! cached in `<home>/kernels/<key>/vmlinux`.
//!
//! The build script and the fragment are compiled into this binary, so an installed `fnvm` needs
//! no source tree. The script does the caching (the key is the sha256 of fragment, script and the
//! source package's version), installs its build tools when missing, and never leaves a
//! half-built kernel in the cache; a cached kernel costs one short script run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::home::Home;

/// `guest-kernel/build.sh`, compiled in.
const BUILD_SCRIPT: &str = include_str!("../guest-kernel/build.sh");
/// `guest-kernel/fnvm.config`, compiled in; the script finds it next to itself.
const CONFIG_FRAGMENT: &str = include_str!("../guest-kernel/fnvm.config");

/// The path of fnvm's guest kernel (`vmlinux`), building it first if this home has none yet.
/// The build's progress goes to stderr; it takes minutes, once per kernel config.
pub fn default_kernel(home: &Home) -> Result<PathBuf> {
    let cache = home.dir("kernels")?;
    let scripts = ScratchDir::create(&cache)?;
    let script = write_build_files(scripts.path())?;

    let mut child = Command::new("bash")
        .arg(&script)
        .arg(&cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot start bash to build the guest kernel")?;
    // The script prints only the vmlinux path on stdout (last line); pass anything else through.
    let mut last_line = None;
    let stdout = child
        .stdout
        .take()
        .context("no stdout from the kernel build")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("cannot read the kernel build's output")?;
        if let Some(previous) = last_line.replace(line) {
            eprintln!("{previous}");
        }
    }
    let status = child.wait().context("cannot wait for the kernel build")?;
    if !status.success() {
        bail!("the guest kernel build failed ({status}); its messages are above");
    }
    let vmlinux = last_line
        .map(PathBuf::from)
        .context("the guest kernel build printed no vmlinux path")?;
    if !vmlinux.is_file() {
        bail!(
            "the guest kernel build reported {} but there is no such file",
            vmlinux.display()
        );
    }
    Ok(vmlinux)
}

/// Writes the build script and its config fragment into `dir`; returns the script's path.
fn write_build_files(dir: &Path) -> Result<PathBuf> {
    let script = dir.join("build.sh");
    for (path, text) in [
        (script.clone(), BUILD_SCRIPT),
        (dir.join("fnvm.config"), CONFIG_FRAGMENT),
    ] {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(script)
}

/// A private directory for the embedded build files, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create(parent: &Path) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = parent.join(format!(".scripts-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded files are exactly the ones in guest-kernel/, so the cache key the script
    /// computes from them is the same whether it runs from the tree or from this binary.
    #[test]
    fn embedded_build_files_are_written_verbatim_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let script = write_build_files(dir.path()).unwrap();
        let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-kernel");
        assert_eq!(
            std::fs::read(&script).unwrap(),
            std::fs::read(tree.join("build.sh")).unwrap()
        );
        assert_eq!(
            std::fs::read(dir.path().join("fnvm.config")).unwrap(),
            std::fs::read(tree.join("fnvm.config")).unwrap()
        );
    }

    #[test]
    fn scratch_dir_is_removed_when_dropped() {
        let parent = tempfile::tempdir().unwrap();
        let scratch = ScratchDir::create(parent.path()).unwrap();
        let path = scratch.path().to_path_buf();
        write_build_files(&path).unwrap();
        drop(scratch);
        assert!(!path.exists());
    }
}
