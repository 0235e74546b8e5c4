//! The default guest kernel: built from Debian's linux-source-6.1 with fnvm's config fragment and
//! cached once per machine (`/var/cache/fnvm/kernel` for root, `$FNVM_KERNEL_CACHE` to move it),
//! shared by every home, the tests and the benches.
//!
//! Why per machine and not per home: a kernel is a pure function of its inputs (fragment, recipe,
//! source package version; the cache key is their sha256), minutes to build, and read-only once
//! built, so a fresh home must never pay for it again. The build script, its recipe and the
//! fragment are compiled into this binary, so an installed `fnvm` needs no source tree; the
//! script does the caching and never leaves a half-built kernel in the cache.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// `guest-kernel/build.sh`, compiled in: cache lookup, lock, progress, publication.
const BUILD_SCRIPT: &str = include_str!("../guest-kernel/build.sh");
/// `guest-kernel/recipe.sh`, compiled in: the build steps (one of the kernel's inputs).
const RECIPE: &str = include_str!("../guest-kernel/recipe.sh");
/// `guest-kernel/fnvm.config`, compiled in; the script finds it next to itself.
const CONFIG_FRAGMENT: &str = include_str!("../guest-kernel/fnvm.config");

/// The exit status of `build.sh --cached` when the kernel is not in the cache.
const NOT_CACHED: i32 = 3;

/// Why the guest kernel cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The build files cannot be written into a scratch directory.
    #[error("cannot write the kernel build files into {path}: {source}")]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The build script cannot be run or its output read.
    #[error("cannot {what} the guest kernel build: {source}")]
    Script {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The build script failed; its messages went to stderr.
    #[error("the guest kernel build failed ({0}); its messages are above")]
    Failed(std::process::ExitStatus),
    /// The build script ended without printing where the kernel is.
    #[error("the guest kernel build printed no vmlinux path")]
    NoPath,
    /// The build script printed a path that is not a file.
    #[error("the guest kernel build reported {0} but there is no such file")]
    Missing(PathBuf),
}

/// The path of fnvm's guest kernel (`vmlinux`), building it first if this machine has none yet.
/// A build is announced up front (it takes minutes, once per machine and kernel config) with
/// how to prebuild it; its progress goes to stderr.
pub fn default_kernel() -> Result<PathBuf, KernelError> {
    let scripts = ScratchDir::create()?;
    let script = write_build_files(scripts.path())?;
    if let Some(cached) = run_script(&script, true)? {
        return Ok(cached);
    }
    eprintln!(
        "fnvm: the guest kernel is not built on this machine yet; building it now (once per \
         machine and kernel config; `fnvm vm kernel` or guest-kernel/build.sh prebuilds it)"
    );
    run_script(&script, false)?.ok_or(KernelError::NoPath)
}

/// Runs the build script (`--cached`: only look). Returns the vmlinux path it printed, or None
/// when only looking and the kernel is not cached.
fn run_script(script: &Path, only_look: bool) -> Result<Option<PathBuf>, KernelError> {
    let mut command = Command::new("bash");
    command.arg(script);
    if only_look {
        command.arg("--cached");
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| KernelError::Script {
            what: "start bash for",
            source,
        })?;
    // The script prints only the vmlinux path on stdout (last line); pass anything else through.
    let mut last_line = None;
    let stdout = child.stdout.take().ok_or(KernelError::NoPath)?;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|source| KernelError::Script {
            what: "read the output of",
            source,
        })?;
        if let Some(previous) = last_line.replace(line) {
            eprintln!("{previous}");
        }
    }
    let status = child.wait().map_err(|source| KernelError::Script {
        what: "wait for",
        source,
    })?;
    if only_look && status.code() == Some(NOT_CACHED) {
        return Ok(None);
    }
    if !status.success() {
        return Err(KernelError::Failed(status));
    }
    let vmlinux = last_line.map(PathBuf::from).ok_or(KernelError::NoPath)?;
    if !vmlinux.is_file() {
        return Err(KernelError::Missing(vmlinux));
    }
    Ok(Some(vmlinux))
}

/// Writes the build script, its recipe and config fragment into `dir`; returns the script's path.
fn write_build_files(dir: &Path) -> Result<PathBuf, KernelError> {
    let script = dir.join("build.sh");
    for (path, text) in [
        (script.clone(), BUILD_SCRIPT),
        (dir.join("recipe.sh"), RECIPE),
        (dir.join("fnvm.config"), CONFIG_FRAGMENT),
    ] {
        std::fs::write(&path, text).map_err(|source| KernelError::Scratch { path, source })?;
    }
    Ok(script)
}

/// A private directory for the embedded build files, removed when dropped.
struct ScratchDir(tempfile::TempDir);

impl ScratchDir {
    fn create() -> Result<Self, KernelError> {
        tempfile::Builder::new()
            .prefix("fnvm-kernel-build-")
            .tempdir()
            .map(Self)
            .map_err(|source| KernelError::Scratch {
                path: std::env::temp_dir(),
                source,
            })
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded files are exactly the ones in guest-kernel/, so the cache key the script
    /// computes from them is the same whether it runs from the tree or from this binary: fnvm,
    /// the tests and the benches share one cached kernel.
    #[test]
    fn embedded_build_files_are_written_verbatim_side_by_side() {
        let dir = tempfile::tempdir().unwrap();
        let script = write_build_files(dir.path()).unwrap();
        let tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest-kernel");
        for name in ["build.sh", "recipe.sh", "fnvm.config"] {
            assert_eq!(
                std::fs::read(dir.path().join(name)).unwrap(),
                std::fs::read(tree.join(name)).unwrap(),
                "{name}"
            );
        }
        assert_eq!(script, dir.path().join("build.sh"));
    }

    /// `--cached` only looks: in an empty cache it says "not cached" and builds nothing.
    #[test]
    fn only_looking_in_an_empty_cache_builds_nothing() {
        let scripts = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let script = write_build_files(scripts.path()).unwrap();
        let status = Command::new("bash")
            .arg(&script)
            .arg("--cached")
            .arg(cache.path())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(NOT_CACHED));
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0);
    }

    #[test]
    fn scratch_dir_is_removed_when_dropped() {
        let scratch = ScratchDir::create().unwrap();
        let path = scratch.path().to_path_buf();
        write_build_files(&path).unwrap();
        drop(scratch);
        assert!(!path.exists());
    }
}
