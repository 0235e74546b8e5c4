//! The read-only rootfs image built from an unpacked tree.
//!
//! Format: ext4, made by e2fsprogs' `mkfs.ext4 -d` (no journal, no reserved blocks, sized
//! from the tree), then a `debugfs -w -f` pass applying the unpacker's side table: true
//! uid/gid/mode, device nodes and xattrs the builder could not put on disk without root. The
//! image comes out the same whether the builder ran as root or not.
//!
//! Why ext4 and not EROFS — measured with `cargo run --release -p fnvm-benches --bin unpack`
//! (Debian bookworm minbase + python3: 9.6k entries, 202.6 MB of files; three runs of the
//! bench on a shared 2-core machine, so timings are noisy — ranges given):
//!
//! | format              | build       | image size (allocated) | cold read of every file |
//! |---------------------|-------------|------------------------|-------------------------|
//! | ext4, mkfs.ext4 -d  | 540–770 ms  | 253 MB (225 MB)        | 175–290 MB/s            |
//! | EROFS, uncompressed | 610–1670 ms | 200 MB (200 MB)        | 70–400 MB/s             |
//! | EROFS, lz4hc        | 3.0–4.9 s   | 111 MB (111 MB)        | 55–390 MB/s             |
//!
//! - build time: ext4 and uncompressed EROFS are on par; lz4hc is 5–7x slower to build,
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
use std::fmt::Write as _;
use std::fs;
use std::io;
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
    #[error("reading the unpacked tree at {path}: {source}")]
    Tree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {tool} (Debian package {package}): {source}")]
    ToolMissing {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{tool} failed ({status}) building {image}: {stderr}")]
    ToolFailed {
        tool: &'static str,
        status: String,
        image: PathBuf,
        stderr: String,
    },
    #[error("writing the image {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("path {0:?} in the tree cannot be named in a debugfs command (quote or newline)")]
    UnrepresentablePath(String),
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
    let survey = Survey::of(tree, &state).map_err(tree_err)?;
    if opts.format == RootfsFormat::Erofs && survey.fixed_inodes > 0 {
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

/// What the image must hold: counts for sizing it, and the debugfs commands that apply the
/// side table.
struct Survey {
    inodes: u64,
    file_bytes: u64,
    /// 4 KiB blocks for file data, long symlinks and directories.
    blocks: u64,
    commands: String,
    /// Inodes whose recorded owner/mode/device differs from the tree on disk.
    fixed_inodes: u64,
    /// Values of xattrs set through debugfs `ea_set -f`, written next to the command file.
    xattr_values: Vec<Vec<u8>>,
}

impl Survey {
    fn of(tree: &Path, state: &TreeState) -> io::Result<Self> {
        let mut survey = Survey {
            inodes: 0,
            file_bytes: 0,
            blocks: 0,
            commands: String::new(),
            fixed_inodes: 0,
            xattr_values: Vec::new(),
        };
        let mut seen = HashSet::new();
        let root = fs::symlink_metadata(tree)?;
        survey.visit("/", &root, state, &mut seen)?;
        // mkfs.ext4 -d gives the root directory the build time; it gets the tree's.
        let _ = writeln!(survey.commands, "sif / mtime @{}", root.mtime());
        survey.walk(tree, "", state, &mut seen)?;
        Ok(survey)
    }

    fn walk(
        &mut self,
        dir: &Path,
        image_dir: &str,
        state: &TreeState,
        seen: &mut HashSet<u64>,
    ) -> io::Result<()> {
        let mut entries = 0u64;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            entries += 1;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let image_path = format!("{image_dir}/{name}");
            let meta = entry.metadata()?; // lstat: read_dir entries are not followed
            self.visit(&image_path, &meta, state, seen)?;
            if meta.is_dir() {
                self.walk(&entry.path(), &image_path, state, seen)?;
            }
        }
        // A 4 KiB directory block holds roughly 100 typical entries.
        self.blocks += 1 + entries / 100;
        Ok(())
    }

    fn visit(
        &mut self,
        image_path: &str,
        meta: &fs::Metadata,
        state: &TreeState,
        seen: &mut HashSet<u64>,
    ) -> io::Result<()> {
        if !seen.insert(meta.ino()) {
            return Ok(()); // another name of a hard-linked inode
        }
        self.inodes += 1;
        if meta.is_file() {
            self.file_bytes += meta.len();
            self.blocks += meta.len().div_ceil(4096);
        } else if meta.file_type().is_symlink() && meta.len() >= 60 {
            self.blocks += 1;
        }
        if let Some(record) = state.inodes.get(&meta.ino()) {
            let before = self.commands.len();
            self.commands_for(image_path, record, meta)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            if self.commands.len() > before {
                self.fixed_inodes += 1;
            }
        }
        Ok(())
    }

    /// debugfs commands that give `path` what its record says, skipping fields that
    /// `mkfs.ext4 -d` already copied right from the tree.
    fn commands_for(
        &mut self,
        path: &str,
        record: &InodeMeta,
        on_disk: &fs::Metadata,
    ) -> Result<(), RootfsError> {
        if path.contains(['"', '\n']) {
            return Err(RootfsError::UnrepresentablePath(path.to_owned()));
        }
        let c = &mut self.commands;
        if let Some((major, minor)) = record.rdev {
            let kind = if record.mode & libc::S_IFMT == libc::S_IFBLK {
                'b'
            } else {
                'c'
            };
            // debugfs's mknod takes a name in the current directory.
            let (parent, base) = path.rsplit_once('/').unwrap_or(("", path));
            let parent = if parent.is_empty() { "/" } else { parent };
            let _ = writeln!(
                c,
                "rm \"{path}\"\ncd \"{parent}\"\nmknod \"{base}\" {kind} {major} {minor}\ncd /"
            );
        }
        let fresh_node = record.rdev.is_some();
        if fresh_node || record.uid != on_disk.uid() {
            let _ = writeln!(c, "sif \"{path}\" uid {}", record.uid);
        }
        if fresh_node || record.gid != on_disk.gid() {
            let _ = writeln!(c, "sif \"{path}\" gid {}", record.gid);
        }
        if fresh_node {
            let _ = writeln!(c, "sif \"{path}\" mtime @{}", on_disk.mtime());
        }
        if fresh_node || record.mode != on_disk.mode() {
            let _ = writeln!(c, "sif \"{path}\" mode 0{:o}", record.mode);
        }
        for (key, value) in &record.xattrs {
            if key.contains(['"', '\n', ' ']) {
                return Err(RootfsError::UnrepresentablePath(format!(
                    "{path} (xattr {key})"
                )));
            }
            let _ = writeln!(
                c,
                "ea_set -f \"@VALUE{}@\" \"{path}\" {key}",
                self.xattr_values.len()
            );
            self.xattr_values.push(value.clone());
        }
        Ok(())
    }
}

fn run(
    tool: &'static str,
    package: &'static str,
    cmd: &mut Command,
    image: &Path,
) -> Result<String, RootfsError> {
    let out = cmd.output().map_err(|source| RootfsError::ToolMissing {
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
    if survey.commands.is_empty() {
        return Ok(());
    }
    // The side table: true ownership/modes, device nodes, refused xattrs.
    let scratch = tempfile::Builder::new()
        .prefix(".fnvm-debugfs-")
        .tempdir_in(image.parent().unwrap_or(Path::new(".")))
        .map_err(|source| RootfsError::Output {
            path: image.to_owned(),
            source,
        })?;
    let mut commands = survey.commands.clone();
    for (i, value) in survey.xattr_values.iter().enumerate() {
        let file = scratch.path().join(format!("xattr{i}"));
        fs::write(&file, value).map_err(|source| RootfsError::Output {
            path: file.clone(),
            source,
        })?;
        commands = commands.replace(&format!("@VALUE{i}@"), &file.to_string_lossy());
    }
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
