//! The read-only rootfs image built from an unpacked tree.
//!
//! Format: ext4, made by e2fsprogs' `mkfs.ext4 -d` (no journal, no reserved blocks, sized
//! from the tree), then a `debugfs -w -f` pass applying the unpacker's side table: true
//! uid/gid/mode, device nodes and xattrs the builder could not put on disk without root. The
//! image comes out the same whether the builder ran as root or not.
//!
//! Why ext4 and not EROFS — measured with `cargo run --release -p fnvm-benches --bin unpack`
//! (Debian bookworm minbase + python3: 9.6k entries, 202.6 MB of files; four runs of the
//! bench on a shared 2-core machine, so timings are noisy — ranges given):
//!
//! | format              | build       | image size (allocated) | cold read of every file |
//! |---------------------|-------------|------------------------|-------------------------|
//! | ext4, mkfs.ext4 -d  | 540–770 ms  | 253 MB (225 MB)        | 175–510 MB/s            |
//! | EROFS, uncompressed | 420–1670 ms | 200 MB (200 MB)        | 70–450 MB/s             |
//! | EROFS, lz4hc        | 2.9–4.9 s   | 111 MB (111 MB)        | 55–510 MB/s             |
//!
//! - build time: ext4 and uncompressed EROFS are on par; lz4hc is 5–9x slower to build,
//!   and the build is on the path of every first deploy;
//! - size: EROFS is smaller, but the ext4 image is a sparse file and images are cached once
//!   per manifest; read speed is within the noise of this machine;
//! - ownership without root decides it: Debian's erofs-utils (1.5) can only force one uid
//!   for all files and cannot make device nodes from a table, while debugfs sets any inode
//!   field, so only ext4 gives the right owners, modes and devices from an unprivileged
//!   build (the bench's Debian image comes out identical to `umoci unpack` as root both
//!   ways);
//! - the guest kernel, the process sandbox and the test tooling read ext4 already.
//!
//! [`RootfsFormat::Erofs`] stays available for trees unpacked as root (it refuses a tree
//! whose side table would need applying).
//!
//! Deterministic: fixed UUID and directory hash seed, fixed superblock times
//! (`E2FSPROGS_FAKE_TIME`), file times from the layers.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::io::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::unpack::state::{InodeMeta, TreeState};

/// The fixed file system UUID and hash seed of every image (determinism).
const IMAGE_UUID: &str = "6f6e766d-726f-6f74-6673-000000000001";
const HASH_SEED: &str = "6f6e766d-6861-7368-7365-000000000001";
/// Superblock timestamps (2020-01-01): the image bytes do not depend on when it was built.
const FAKE_TIME: &str = "1577836800";

/// Which file system the image uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum RootfsFormat {
    #[default]
    Ext4,
    /// EROFS via `mkfs.erofs` (uncompressed, or lz4hc with `compress`).
    Erofs,
}

/// How to build the image.
#[derive(Debug, Clone, Default)]
pub struct RootfsOptions {
    pub format: RootfsFormat,
    /// EROFS only: compress with lz4hc.
    pub compress: bool,
}

/// What was built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsImageInfo {
    pub path: PathBuf,
    pub format: RootfsFormat,
    /// The image file's length.
    pub size_bytes: u64,
    /// Blocks actually allocated on the host (the file is sparse).
    pub allocated_bytes: u64,
    /// Distinct inodes in the tree.
    pub inodes: u64,
    /// Regular file bytes in the tree.
    pub file_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// The unpacked tree cannot be read.
    #[error("reading the unpacked tree at {path}: {source}")]
    Tree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A tool needed to build the image cannot be run (its Debian package may be missing).
    #[error("cannot run {tool} (Debian package {package}): {source}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    /// A tool building the image exited with an error.
    #[error("{tool} failed ({status}) building {image}: {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: String,
        image: PathBuf,
        stderr: String,
    },
    /// The image file cannot be written.
    #[error("writing the image {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A path in the tree contains a newline, which a debugfs command cannot name.
    #[error("path {0:?} in the tree cannot be named in a debugfs command (newline)")]
    UnrepresentablePath(String),
    /// The tree needs ownership or device fixes that only an ext4 image can carry.
    #[error("the tree at {0} has ownership/device records that only the ext4 format can apply (unpack as root for EROFS)")]
    NeedsExt4(PathBuf),
}

/// Builds the read-only rootfs image of `tree` at `out_image` (ext4; see the module docs).
pub fn build_rootfs_image(tree: &Path, out_image: &Path) -> Result<RootfsImageInfo, RootfsError> {
    build_rootfs_image_with(tree, out_image, &RootfsOptions::default())
}

/// Builds the image in the given format. Written to a temp file beside `out_image` and
/// renamed into place, so `out_image` is either complete or untouched.
pub fn build_rootfs_image_with(
    tree: &Path,
    out_image: &Path,
    opts: &RootfsOptions,
) -> Result<RootfsImageInfo, RootfsError> {
    let tree_err = |source| RootfsError::Tree {
        path: tree.to_owned(),
        source,
    };
    let state = TreeState::load(tree).map_err(tree_err)?;
    let survey = Survey::of(tree, &state)?;
    if opts.format == RootfsFormat::Erofs && !survey.fixes.is_empty() {
        return Err(RootfsError::NeedsExt4(tree.to_owned()));
    }
    let file_name = out_image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rootfs.img".into());
    let tmp = out_image.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = match opts.format {
        RootfsFormat::Ext4 => make_ext4(tree, &tmp, &survey),
        RootfsFormat::Erofs => make_erofs(tree, &tmp, opts.compress),
    }
    .and_then(|()| {
        fs::rename(&tmp, out_image).map_err(|source| RootfsError::Output {
            path: out_image.to_owned(),
            source,
        })
    });
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = fs::metadata(out_image).map_err(|source| RootfsError::Output {
        path: out_image.to_owned(),
        source,
    })?;
    let info = RootfsImageInfo {
        path: out_image.to_owned(),
        format: opts.format,
        size_bytes: meta.len(),
        allocated_bytes: meta.blocks() * 512,
        inodes: survey.inodes,
        file_bytes: survey.file_bytes,
    };
    tracing::debug!(?info, "built rootfs image");
    Ok(info)
}

/// What the image must hold: counts for sizing it, and the inodes whose recorded owner,
/// mode, device or xattrs `mkfs.ext4 -d` cannot copy from the tree.
struct Survey {
    inodes: u64,
    file_bytes: u64,
    /// 4 KiB blocks for file data, long symlinks and directories.
    blocks: u64,
    /// mtime of the tree's root directory (mkfs gives the image root the build time).
    root_mtime: i64,
    fixes: Vec<Fix>,
}

/// One inode to correct with debugfs, named by its path in the image (raw bytes).
struct Fix {
    path: Vec<u8>,
    record: InodeMeta,
    disk_uid: u32,
    disk_gid: u32,
    disk_mode: u32,
    mtime: i64,
}

impl Fix {
    fn fresh_node(&self) -> bool {
        self.record.rdev.is_some()
    }

    fn needed(&self) -> bool {
        self.fresh_node()
            || self.record.uid != self.disk_uid
            || self.record.gid != self.disk_gid
            || self.record.mode != self.disk_mode
            || !self.record.xattrs.is_empty()
    }
}

/// The hard-linked inodes met so far, to count each inode once.
///
/// Only a non-directory with more than one link can be another name of an inode already seen,
/// and inode numbers are unique only per device: on overlayfs (the tree unpacked on a
/// container's root) a directory's st_ino can equal a file's, and layers on different
/// devices share numbers.
#[derive(Default)]
struct HardLinks {
    seen: HashSet<(u64, u64)>,
}

impl HardLinks {
    /// True when `meta` is a further name of a hard-linked inode met before.
    fn is_another_name(&mut self, meta: &fs::Metadata) -> bool {
        self.check(meta.is_dir(), meta.nlink(), meta.dev(), meta.ino())
    }

    fn check(&mut self, is_dir: bool, nlink: u64, dev: u64, ino: u64) -> bool {
        if is_dir || nlink <= 1 {
            return false;
        }
        !self.seen.insert((dev, ino))
    }
}

/// `"path"` for a debugfs command: inside quotes debugfs reads `""` as one `"`.
fn quoted(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + 2);
    out.push(b'"');
    for &b in path {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

impl Survey {
    fn of(tree: &Path, state: &TreeState) -> Result<Self, RootfsError> {
        let tree_err = |source| RootfsError::Tree {
            path: tree.to_owned(),
            source,
        };
        let root = fs::symlink_metadata(tree).map_err(tree_err)?;
        let mut survey = Survey {
            inodes: 0,
            file_bytes: 0,
            blocks: 0,
            root_mtime: root.mtime(),
            fixes: Vec::new(),
        };
        let mut seen = HardLinks::default();
        survey.visit(b"/".to_vec(), &root, state, &mut seen)?;
        survey.walk(tree, b"", state, &mut seen)?;
        Ok(survey)
    }

    fn walk(
        &mut self,
        dir: &Path,
        image_dir: &[u8],
        state: &TreeState,
        seen: &mut HardLinks,
    ) -> Result<(), RootfsError> {
        let tree_err = |source| RootfsError::Tree {
            path: dir.to_owned(),
            source,
        };
        let mut entries = 0u64;
        for entry in fs::read_dir(dir).map_err(tree_err)? {
            let entry = entry.map_err(tree_err)?;
            entries += 1;
            let mut image_path = image_dir.to_vec();
            image_path.push(b'/');
            image_path.extend_from_slice(entry.file_name().as_bytes());
            let meta = entry.metadata().map_err(tree_err)?; // lstat: entries are not followed
            let is_dir = meta.is_dir();
            self.visit(image_path.clone(), &meta, state, seen)?;
            if is_dir {
                self.walk(&entry.path(), &image_path, state, seen)?;
            }
        }
        // A 4 KiB directory block holds roughly 100 typical entries.
        self.blocks += 1 + entries / 100;
        Ok(())
    }

    fn visit(
        &mut self,
        image_path: Vec<u8>,
        meta: &fs::Metadata,
        state: &TreeState,
        seen: &mut HardLinks,
    ) -> Result<(), RootfsError> {
        if seen.is_another_name(meta) {
            return Ok(());
        }
        self.inodes += 1;
        if meta.is_file() {
            self.file_bytes += meta.len();
            self.blocks += meta.len().div_ceil(4096);
        } else if meta.file_type().is_symlink() && meta.len() >= 60 {
            self.blocks += 1;
        }
        if let Some(record) = state.inodes.get(&meta.ino()) {
            let fix = Fix {
                path: image_path,
                record: record.clone(),
                disk_uid: meta.uid(),
                disk_gid: meta.gid(),
                disk_mode: meta.mode(),
                mtime: meta.mtime(),
            };
            if fix.needed() {
                if fix.path.contains(&b'\n') {
                    return Err(RootfsError::UnrepresentablePath(
                        String::from_utf8_lossy(&fix.path).into_owned(),
                    ));
                }
                self.fixes.push(fix);
            }
        }
        Ok(())
    }

    /// The debugfs script applying every fix; xattr values are written into `scratch`.
    fn script(&self, scratch: &Path) -> Result<Vec<u8>, RootfsError> {
        let mut c = Vec::new();
        let _ = writeln!(c, "sif / mtime @{}", self.root_mtime);
        let mut values = 0usize;
        for fix in &self.fixes {
            let path = quoted(&fix.path);
            let r = &fix.record;
            let mut line = |cmd: &str, rest: String| {
                c.extend_from_slice(cmd.as_bytes());
                c.extend_from_slice(&path);
                c.extend_from_slice(rest.as_bytes());
                c.push(b'\n');
            };
            let fresh = fix.fresh_node();
            if let Some((major, minor)) = r.rdev {
                let kind = if r.mode & libc::S_IFMT == libc::S_IFBLK {
                    'b'
                } else {
                    'c'
                };
                // debugfs's mknod takes a name in the current directory.
                let split = fix.path.iter().rposition(|b| *b == b'/').unwrap_or(0);
                let parent = if split == 0 {
                    b"/".to_vec()
                } else {
                    fix.path[..split].to_vec()
                };
                let base = &fix.path[split + 1..];
                line("rm ", String::new());
                c.extend_from_slice(b"cd ");
                c.extend_from_slice(&quoted(&parent));
                c.extend_from_slice(b"\nmknod ");
                c.extend_from_slice(&quoted(base));
                let _ = writeln!(c, " {kind} {major} {minor}\ncd /");
            }
            let mut line = |cmd: &str, rest: String| {
                c.extend_from_slice(cmd.as_bytes());
                c.extend_from_slice(&path);
                c.extend_from_slice(rest.as_bytes());
                c.push(b'\n');
            };
            if fresh || r.uid != fix.disk_uid {
                line("sif ", format!(" uid {}", r.uid));
            }
            if fresh || r.gid != fix.disk_gid {
                line("sif ", format!(" gid {}", r.gid));
            }
            if fresh || r.mode != fix.disk_mode {
                line("sif ", format!(" mode 0{:o}", r.mode));
            }
            if fresh {
                line("sif ", format!(" mtime @{}", fix.mtime));
            }
            for (key, value) in &r.xattrs {
                if key.contains(['"', '\n', ' ']) {
                    return Err(RootfsError::UnrepresentablePath(format!(
                        "{} (xattr {key:?})",
                        String::from_utf8_lossy(&fix.path)
                    )));
                }
                let file = scratch.join(format!("xattr{values}"));
                values += 1;
                fs::write(&file, value).map_err(|source| RootfsError::Output {
                    path: file.clone(),
                    source,
                })?;
                let mut cmd = b"ea_set -f ".to_vec();
                cmd.extend_from_slice(&quoted(file.as_os_str().as_bytes()));
                cmd.push(b' ');
                c.extend_from_slice(&cmd);
                c.extend_from_slice(&path);
                let _ = writeln!(c, " {key}");
            }
        }
        Ok(c)
    }
}

fn run(
    tool: &'static str,
    package: &'static str,
    cmd: &mut Command,
    image: &Path,
) -> Result<String, RootfsError> {
    let out = crate::tool::die_with_parent(cmd)
        .output()
        .map_err(|source| RootfsError::ToolMissing {
            tool,
            package,
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(RootfsError::ToolFailed {
            tool,
            status: out.status.to_string(),
            image: image.to_owned(),
            stderr: stderr.trim().to_owned(),
        });
    }
    Ok(stderr)
}

fn make_ext4(tree: &Path, image: &Path, survey: &Survey) -> Result<(), RootfsError> {
    // Room for the data plus ext4's own metadata: inode tables (256 B per inode), block
    // bitmaps and group descriptors, extent blocks; a little slack so mke2fs -d never runs
    // out. The file is sparse: unused space costs nothing on the host.
    let inodes = survey.inodes + survey.inodes / 10 + 64;
    let data = survey.blocks * 4096;
    let bytes = data + data / 20 + inodes * 256 + (16 << 20);
    let size_kib = bytes.div_ceil(1024).div_ceil(4) * 4;
    run(
        "mkfs.ext4",
        "e2fsprogs",
        Command::new("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", FAKE_TIME)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-I",
                "256",
                "-m",
                "0",
                "-L",
                "fnvm-rootfs",
            ])
            .args(["-O", "^has_journal,^resize_inode"])
            .arg("-N")
            .arg(inodes.to_string())
            .arg("-U")
            .arg(IMAGE_UUID)
            .arg("-E")
            .arg(format!(
                "hash_seed={HASH_SEED},lazy_itable_init=0,nodiscard"
            ))
            .arg("-d")
            .arg(tree)
            .arg(image)
            .arg(format!("{size_kib}k")),
        image,
    )?;
    // The side table (true ownership/modes, device nodes, refused xattrs) and the root
    // directory's mtime.
    let scratch = tempfile::Builder::new()
        .prefix(".fnvm-debugfs-")
        .tempdir_in(image.parent().unwrap_or(Path::new(".")))
        .map_err(|source| RootfsError::Output {
            path: image.to_owned(),
            source,
        })?;
    let commands = survey.script(scratch.path())?;
    let cmd_file = scratch.path().join("commands");
    fs::write(&cmd_file, commands).map_err(|source| RootfsError::Output {
        path: cmd_file.clone(),
        source,
    })?;
    let stderr = run(
        "debugfs",
        "e2fsprogs",
        Command::new("debugfs")
            .env("E2FSPROGS_FAKE_TIME", FAKE_TIME)
            .arg("-w")
            .arg("-f")
            .arg(&cmd_file)
            .arg(image),
        image,
    )?;
    // debugfs reports failed commands on stderr but still exits 0.
    let failures: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
        .collect();
    if !failures.is_empty() {
        return Err(RootfsError::ToolFailed {
            tool: "debugfs",
            status: "command errors".into(),
            image: image.to_owned(),
            stderr: failures
                .iter()
                .take(10)
                .copied()
                .collect::<Vec<_>>()
                .join("\n"),
        });
    }
    Ok(())
}

fn make_erofs(tree: &Path, image: &Path, compress: bool) -> Result<(), RootfsError> {
    let mut cmd = Command::new("mkfs.erofs");
    cmd.arg("--quiet").arg(format!("-U{IMAGE_UUID}"));
    if compress {
        cmd.arg("-zlz4hc");
    }
    cmd.arg(image).arg(tree);
    run("mkfs.erofs", "erofs-utils", &mut cmd, image).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_further_names_of_multiply_linked_non_directories_are_hard_links() {
        let mut links = HardLinks::default();
        // overlayfs: a directory with the same st_ino as a file is not a link, either way round.
        assert!(!links.check(true, 2, 1, 42));
        assert!(!links.check(false, 1, 1, 42));
        assert!(!links.check(true, 3, 1, 42));
        // A file with two names: the second name is a link, a third too.
        assert!(!links.check(false, 2, 1, 7));
        assert!(links.check(false, 2, 1, 7));
        assert!(links.check(false, 2, 1, 7));
        // The same number on another device is another inode.
        assert!(!links.check(false, 2, 2, 7));
        // A single-link file never matches, even with a number seen before.
        assert!(!links.check(false, 1, 1, 7));
    }

    #[test]
    fn a_real_tree_counts_each_hard_linked_file_once_and_every_directory() {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/file"), b"x").unwrap();
        fs::hard_link(tree.join("a/file"), tree.join("a/b/link")).unwrap();
        fs::write(tree.join("single"), b"y").unwrap();
        let survey = Survey::of(&tree, &TreeState::default()).unwrap();
        // root, a, a/b, the linked file once, single.
        assert_eq!(survey.inodes, 5);
    }
}
