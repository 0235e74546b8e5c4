//! Safe OCI layer unpacking: layers are applied in order into one destination tree, with
//! whiteouts and opaque directories handled per the OCI image spec.
//!
//! Safety: a layer is hostile input. Nothing is ever written outside the destination:
//! - entry names with a `..` component are refused; absolute names are taken relative to the
//!   destination (as `tar` does);
//! - parent directories are resolved with `openat2(RESOLVE_IN_ROOT)` on the destination's fd,
//!   so a symlink planted by an earlier layer (`etc -> /etc`) resolves inside the tree (or
//!   fails with ELOOP), never on the host; the last component is never followed;
//! - hard link targets are resolved the same way and must be existing non-directories;
//! - whiteouts naming ``, `.` or `..` are refused.
//!
//! Ownership: as root (or with [`Ownership::Apply`]) uid/gid, modes and device nodes are
//! applied on disk. Otherwise ([`Ownership::Record`]) files are owned by the builder and
//! kept readable/writable by it; the true uid/gid/mode, device numbers (devices become empty
//! placeholder files) and refused xattrs go into a side table beside the tree (see
//! [`state`]) which [`crate::rootfs::build_rootfs_image`] applies to the image. Either
//! way the image comes out the same.
//!
//! Speed: one streaming pass, 1 MiB copy buffer, the parent directory fd cached between
//! entries, no fsync (the tree is scratch until the image is built).

mod rooted;
pub mod state;
mod stream;
mod unpacker;

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

pub(crate) use rooted::{list_dir, open_beneath, open_dir};
use state::{InodeMeta, TreeState};
use stream::{decode, read_full, Capped, ChunkReader, IN_FLIGHT_CHUNKS};
use unpacker::Unpacker;

/// Default cap on the uncompressed bytes of all layers of one image (decompression bombs).
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 4 << 30;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression a layer media type declares (OCI and Docker v2 layer types).
    pub fn from_media_type(media_type: &str) -> Result<Self, UnpackError> {
        let base = media_type.split(';').next().unwrap_or("").trim();
        match base {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Ok(Self::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(Self::Gzip),
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(Self::Zstd),
            _ => Err(UnpackError::UnsupportedMediaType(media_type.to_owned())),
        }
    }

    /// Guesses from a blob's first bytes (for `docker save` archives, which declare nothing).
    pub fn sniff(head: &[u8]) -> Self {
        if head.starts_with(&[0x1f, 0x8b]) {
            Self::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Self::Zstd
        } else {
            Self::None
        }
    }

    /// The OCI media type of a layer compressed this way.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Self::None => "application/vnd.oci.image.layer.v1.tar",
            Self::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Self::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// Whether ownership, modes and device nodes are applied on disk or recorded for the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ownership {
    /// Apply when running as root, record otherwise.
    #[default]
    Auto,
    /// chown/chmod/mknod on disk (needs root; device nodes fall back to recording).
    Apply,
    /// Record in the side table; the image build applies it.
    Record,
}

/// Limits and choices for unpacking.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    /// Cap on uncompressed layer bytes, summed over every layer unpacked into the same
    /// destination (the running total is kept beside the tree, so it carries across calls).
    pub max_total_bytes: u64,
    pub ownership: Ownership,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self {
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            ownership: Ownership::Auto,
        }
    }
}

/// What one layer did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// Character/block devices and fifos.
    pub special: u64,
    /// Whiteouts and opaque-directory markers applied.
    pub whiteouts: u64,
    /// Uncompressed tar bytes of this layer.
    pub uncompressed_bytes: u64,
    /// Uncompressed bytes of all layers unpacked into this destination so far.
    pub total_uncompressed_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer's media type names no compression we read.
    #[error("unsupported layer media type {0:?} (expected an OCI or Docker tar, tar+gzip or tar+zstd layer)")]
    UnsupportedMediaType(String),
    /// The destination tree cannot be opened, read or its side table saved.
    #[error("unpack destination {path}: {source}")]
    Destination {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The layer's bytes cannot be decoded as a (compressed) tar stream.
    #[error("reading the layer (corrupt or truncated?): {0}")]
    Read(#[source] io::Error),
    /// The layers together expand past the size cap (a decompression bomb, say).
    #[error("the image expands past the {limit}-byte limit on uncompressed layer data")]
    TooLarge { limit: u64 },
    /// An entry that would reach outside the tree or break it.
    #[error("entry {entry:?} refused: {reason}")]
    Refused { entry: String, reason: String },
    /// A tar entry type no image needs (a FIFO is fine; a GNU volume header is not).
    #[error("entry {entry:?}: unsupported tar entry type {kind}")]
    UnsupportedEntry { entry: String, kind: String },
    /// Creating or updating an entry failed.
    #[error("entry {entry:?}: {op}: {source}")]
    Entry {
        entry: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Applies one layer (a tar stream, compressed as given) on top of `dest`.
pub fn unpack_layer(
    dest: &Path,
    layer: impl Read,
    compression: Compression,
    opts: &UnpackOptions,
) -> Result<LayerStats, UnpackError> {
    let dest_err = |source| UnpackError::Destination {
        path: dest.to_owned(),
        source,
    };
    let root = open_dir(dest).map_err(dest_err)?;
    let mut state = TreeState::load(dest).map_err(dest_err)?;
    if list_dir(root.as_raw_fd()).map_err(dest_err)?.is_empty() {
        // A fresh tree: whatever was recorded beside it belongs to an earlier one.
        state = TreeState::default();
    }
    let apply = match opts.ownership {
        Ownership::Apply => true,
        Ownership::Record => false,
        Ownership::Auto => is_root(),
    };
    if !apply {
        // The root directory is root's unless a layer says otherwise.
        let ino = rooted::fstat(root.as_raw_fd()).map_err(dest_err)?.st_ino;
        state.inodes.entry(ino).or_insert(InodeMeta {
            uid: 0,
            gid: 0,
            mode: libc::S_IFDIR | 0o755,
            rdev: None,
            xattrs: Vec::new(),
        });
    }
    let budget = opts.max_total_bytes.saturating_sub(state.total_bytes);
    let unpacker = Unpacker {
        root,
        apply,
        state,
        touched: HashSet::new(),
        dir_times: Vec::new(),
        dir_restore: HashMap::new(),
        parent_cache: None,
        cache_stale: false,
        stats: LayerStats::default(),
        buf: vec![0; COPY_BUF],
        disk_budget: budget,
    };
    let limit = opts.max_total_bytes;
    // Decompression runs on this thread and the tar entries are applied on another, so
    // inflating and writing files overlap. A few chunks in flight at most: when the
    // applying side stops (an error, the size cap), decoding stops too.
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(IN_FLIGHT_CHUNKS);
    let mut unpacker = std::thread::scope(|scope| {
        let worker = scope.spawn(move || {
            let mut unpacker = unpacker;
            let stream = Capped {
                inner: ChunkReader {
                    rx,
                    chunk: Vec::new(),
                    pos: 0,
                },
                count: 0,
                limit: budget,
            };
            let result = unpacker.apply_all(stream, limit);
            result.map(|layer_bytes| (unpacker, layer_bytes))
        });
        let decoded = decode(layer, compression).and_then(|mut decoded| {
            loop {
                let mut chunk = vec![0u8; COPY_BUF];
                let n = match read_full(&mut decoded, &mut chunk) {
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return Ok(());
                    }
                };
                if n == 0 {
                    return Ok(());
                }
                chunk.truncate(n);
                if tx.send(Ok(chunk)).is_err() {
                    return Ok(()); // the applying side stopped; it reports why
                }
            }
        });
        drop(tx);
        let applied = worker.join().unwrap_or_else(|_| {
            Err(UnpackError::Read(io::Error::other(
                "unpack thread panicked",
            )))
        });
        decoded.and(applied)
    })
    .map(|(unpacker, layer_bytes)| {
        let mut unpacker = unpacker;
        unpacker.state.total_bytes += layer_bytes;
        unpacker.stats.uncompressed_bytes = layer_bytes;
        unpacker
    })?;
    unpacker.stats.total_uncompressed_bytes = unpacker.state.total_bytes;
    unpacker.state.save(dest).map_err(dest_err)?;
    Ok(unpacker.stats)
}

/// Removes the side table kept beside `tree` (see [`state`]); call it when the tree itself
/// is discarded after the image is built.
pub fn forget_tree_state(tree: &Path) -> io::Result<()> {
    match std::fs::remove_file(state::state_path(tree)?) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

const COPY_BUF: usize = 1 << 20;

fn is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}

/// Normalized components of an entry name: empty and `.` dropped (so absolute names are
/// relative to the root), `..` refused.
fn clean_path(raw: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("the path has a `..` component"),
            c => out.push(c),
        }
    }
    Ok(out)
}

fn cstr(bytes: &[u8], entry: &str) -> Result<CString, UnpackError> {
    CString::new(bytes).map_err(|_| UnpackError::Refused {
        entry: entry.to_owned(),
        reason: "a NUL byte in a name".into(),
    })
}

fn refused(entry: &str, reason: impl Into<String>) -> UnpackError {
    UnpackError::Refused {
        entry: entry.to_owned(),
        reason: reason.into(),
    }
}

fn entry_err<'a>(entry: &'a str, op: &'static str) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Entry {
        entry: entry.to_owned(),
        op,
        source,
    }
}

/// Ownership, mode, mtime and xattrs from a tar header and its PAX records.
struct EntryMeta {
    uid: u32,
    gid: u32,
    /// Permission bits incl. setuid/setgid/sticky (no file type).
    perm: u32,
    mtime: i64,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<R>, shown: &str) -> Result<Self, UnpackError> {
        let h = entry.header();
        let bad =
            |what: &'static str| move |e: io::Error| refused(shown, format!("bad {what}: {e}"));
        // An empty numeric field (all NUL or spaces, as some writers leave it) means 0.
        let blank = |raw: &[u8]| raw.iter().all(|b| *b == 0 || *b == b' ');
        let old = h.as_old();
        let num = |v: io::Result<u64>, raw: &[u8], what: &'static str| match v {
            Ok(v) => Ok(v),
            Err(_) if blank(raw) => Ok(0),
            Err(e) => Err(bad(what)(e)),
        };
        let mut uid = num(h.uid(), &old.uid, "uid")?;
        let mut gid = num(h.gid(), &old.gid, "gid")?;
        let perm = num(h.mode().map(u64::from), &old.mode, "mode")? as u32 & 0o7777;
        let mut mtime = num(h.mtime(), &old.mtime, "mtime")? as i64;
        let mut xattrs = Vec::new();
        if let Some(pax) = entry.pax_extensions().map_err(UnpackError::Read)? {
            for ext in pax {
                let ext = ext.map_err(UnpackError::Read)?;
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                let number = || std::str::from_utf8(value).ok();
                match key {
                    "uid" => uid = number().and_then(|v| v.parse().ok()).unwrap_or(uid),
                    "gid" => gid = number().and_then(|v| v.parse().ok()).unwrap_or(gid),
                    "mtime" => {
                        mtime = number()
                            .and_then(|v| v.split('.').next())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(mtime)
                    }
                    _ => {
                        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                            xattrs.push((cstr(name.as_bytes(), shown)?, value.to_vec()));
                        }
                    }
                }
            }
        }
        let id = |v: u64, what: &str| {
            u32::try_from(v).map_err(|_| refused(shown, format!("{what} {v} is out of range")))
        };
        Ok(Self {
            uid: id(uid, "uid")?,
            gid: id(gid, "gid")?,
            perm,
            mtime,
            xattrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip").unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip")
                .unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar").unwrap(),
            Compression::None
        );
        let err = Compression::from_media_type("application/x-bzip2").unwrap_err();
        assert!(err.to_string().contains("application/x-bzip2"), "{err}");
    }

    #[test]
    fn clean_paths() {
        assert_eq!(
            clean_path(b"/etc//passwd").unwrap(),
            vec![&b"etc"[..], b"passwd"]
        );
        assert_eq!(clean_path(b"./a/./b/").unwrap(), vec![&b"a"[..], b"b"]);
        assert!(clean_path(b"a/../../etc").is_err());
        assert!(clean_path(b"..").is_err());
        assert!(clean_path(b"./").unwrap().is_empty());
    }
}
