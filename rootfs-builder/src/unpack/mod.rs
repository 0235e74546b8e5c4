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

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

pub(crate) use rooted::{list_dir, lstat_at, open_beneath, open_dir};
use state::{InodeMeta, TreeState};

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
    #[error("unsupported layer media type {0:?} (expected an OCI or Docker tar, tar+gzip or tar+zstd layer)")]
    UnsupportedMediaType(String),
    #[error("unpack destination {path}: {source}")]
    Destination {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the layer (corrupt or truncated?): {0}")]
    Read(#[source] io::Error),
    #[error("the image expands past the {limit}-byte limit on uncompressed layer data")]
    TooLarge { limit: u64 },
    #[error("entry {entry:?} refused: {reason}")]
    Refused { entry: String, reason: String },
    #[error("entry {entry:?}: unsupported tar entry type {kind}")]
    UnsupportedEntry { entry: String, kind: String },
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

/// Decoded chunks queued between the decompressing and the applying thread.
const IN_FLIGHT_CHUNKS: usize = 4;

/// The decompressor for a layer.
fn decode<'a>(
    layer: impl Read + 'a,
    compression: Compression,
) -> Result<Box<dyn Read + 'a>, UnpackError> {
    Ok(match compression {
        Compression::None => Box::new(layer),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(
            io::BufReader::with_capacity(COPY_BUF / 4, layer),
        )),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(layer).map_err(UnpackError::Read)?)
        }
    })
}

/// Reads until `buf` is full or the stream ends.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// The decoded layer as a stream, from the decompressing thread's chunks.
struct ChunkReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    chunk: Vec<u8>,
    pos: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.chunk.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0), // decoding finished
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
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

/// Counts decoded bytes read through it and fails once they pass `limit`.
struct Capped<R> {
    inner: R,
    count: u64,
    limit: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other("uncompressed size limit exceeded"));
        }
        Ok(n)
    }
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

struct Unpacker {
    root: OwnedFd,
    /// chown/chmod/mknod on disk (root), else record in `state`.
    apply: bool,
    state: TreeState,
    /// Inodes this layer created or updated: an opaque directory keeps them.
    touched: HashSet<u64>,
    /// Directory mtimes, set at the end of the layer (creating children changes them).
    dir_times: Vec<(Vec<u8>, i64)>,
    /// Mtimes of directories this layer changes without naming them: put back at the end,
    /// as the layer's diff did not change them.
    dir_restore: HashMap<Vec<u8>, i64>,
    /// The last parent directory: most entries share their predecessor's.
    parent_cache: Option<(Vec<u8>, OwnedFd)>,
    /// Set when a directory was removed: the cached parent may be inside it. Its fd stays
    /// open until the next lookup replaces it (the current entry may still be using it).
    cache_stale: bool,
    stats: LayerStats,
    buf: Vec<u8>,
    /// File bytes that may still be written (sparse entries expand on disk).
    disk_budget: u64,
}

impl Unpacker {
    /// Applies every entry of the decoded layer, then the directory mtimes. Returns the
    /// layer's uncompressed size.
    fn apply_all<R: Read>(&mut self, stream: Capped<R>, limit: u64) -> Result<u64, UnpackError> {
        let mut archive = tar::Archive::new(stream);
        let mut failure = None;
        {
            match archive.entries() {
                Err(e) => failure = Some(UnpackError::Read(e)),
                Ok(entries) => {
                    for entry in entries {
                        let result = entry
                            .map_err(UnpackError::Read)
                            .and_then(|mut entry| self.apply(&mut entry));
                        if let Err(e) = result {
                            failure = Some(e);
                            break;
                        }
                    }
                }
            }
        }
        let mut stream = archive.into_inner();
        if failure.is_none() {
            // Read to the end so a gzip/zstd trailer (checksum) is verified and truncation
            // noticed.
            if let Err(e) = io::copy(&mut stream, &mut io::sink()) {
                failure = Some(UnpackError::Read(e));
            }
        }
        match failure {
            Some(UnpackError::Read(_)) if stream.count > stream.limit => {
                Err(UnpackError::TooLarge { limit })
            }
            Some(e) => Err(e),
            None => {
                self.finish_layer()?;
                Ok(stream.count)
            }
        }
    }

    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let comps = clean_path(&raw).map_err(|r| refused(&shown, r))?;
        self.stats.entries += 1;
        let Some((name, parent)) = comps.split_last() else {
            if !kind.is_dir() {
                return Err(refused(&shown, "it would replace the root directory"));
            }
            let meta = EntryMeta::read(entry, &shown)?;
            let root = self.root.as_raw_fd();
            self.dir_meta(root, &meta, &shown)?;
            self.dir_times.push((Vec::new(), meta.mtime));
            return Ok(());
        };
        let parent_path = parent.join(&b'/');
        if let Some(target) = name.strip_prefix(b".wh.") {
            return self.whiteout(&parent_path, target, &shown);
        }
        let meta = EntryMeta::read(entry, &shown)?;
        let dir = self.parent(&parent_path, &shown)?;
        let cname = cstr(name, &shown)?;
        let exists = |e: &io::Error| e.raw_os_error() == Some(libc::EEXIST);
        let existing = || lstat_at(dir, &cname).map_err(entry_err(&shown, "stat"));
        match kind {
            T::Directory => {
                self.stats.directories += 1;
                // Create first, look only when something is there (most entries are new).
                match rooted::mkdirat(dir, &cname, 0o700) {
                    Ok(()) => {}
                    Err(e) if exists(&e) => match existing()? {
                        Some(st) if rooted::is_dir(&st) => {}
                        other => {
                            self.clear(dir, &cname, other.as_ref(), &shown)?;
                            rooted::mkdirat(dir, &cname, 0o700)
                                .map_err(entry_err(&shown, "mkdir"))?;
                        }
                    },
                    Err(e) => return Err(entry_err(&shown, "mkdir")(e)),
                }
                let fd = openat_dir(dir, &cname).map_err(entry_err(&shown, "open directory"))?;
                self.dir_meta(fd.as_raw_fd(), &meta, &shown)?;
                self.dir_times.push((comps.join(&b'/'), meta.mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.stats.files += 1;
                // Created with its permission bits (less the umask; fixed up after if need be).
                let mode = if self.apply {
                    meta.perm & 0o777
                } else {
                    (meta.perm | 0o600) & 0o777
                };
                let file = match openat_new_file(dir, &cname, mode) {
                    Err(e) if exists(&e) => {
                        self.clear(dir, &cname, existing()?.as_ref(), &shown)?;
                        openat_new_file(dir, &cname, mode)
                    }
                    other => other,
                }
                .map_err(entry_err(&shown, "create"))?;
                self.write_data(entry, &file, &shown)?;
                self.inode_meta(file.as_raw_fd(), libc::S_IFREG, &meta, &shown)?;
                rooted::set_mtime_at(file.as_raw_fd(), c"", meta.mtime)
                    .map_err(entry_err(&shown, "set mtime"))?;
            }
            T::Symlink => {
                self.stats.symlinks += 1;
                let target = entry
                    .link_name_bytes()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| refused(&shown, "a symlink without a target"))?;
                let target = cstr(&target, &shown)?;
                match rooted::symlinkat(&target, dir, &cname) {
                    Err(e) if exists(&e) => {
                        self.clear(dir, &cname, existing()?.as_ref(), &shown)?;
                        rooted::symlinkat(&target, dir, &cname)
                    }
                    other => other,
                }
                .map_err(entry_err(&shown, "symlink"))?;
                let ino = self.ino_at(dir, &cname, &shown)?;
                if self.apply {
                    rooted::chown_at(dir, &cname, meta.uid, meta.gid)
                        .map_err(entry_err(&shown, "chown"))?;
                }
                self.note(ino, libc::S_IFLNK, 0o777, &meta, None);
                rooted::set_mtime_at(dir, &cname, meta.mtime)
                    .map_err(entry_err(&shown, "set mtime"))?;
            }
            T::Link => {
                self.stats.hardlinks += 1;
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(&shown, "a hard link without a target"))?
                    .into_owned();
                self.hardlink(dir, &cname, existing()?.as_ref(), &target, &shown)?;
            }
            T::Char | T::Block | T::Fifo => {
                self.stats.special += 1;
                self.clear(dir, &cname, existing()?.as_ref(), &shown)?;
                self.special(entry, kind, dir, &cname, &meta, &shown)?;
            }
            other => {
                return Err(UnpackError::UnsupportedEntry {
                    entry: shown,
                    kind: format!("{other:?}"),
                })
            }
        }
        Ok(())
    }

    /// The fd of directory `path` (components joined by `/`), created (0755, root) where
    /// missing. Resolved inside the root: symlinks on the way are confined to it.
    fn parent(&mut self, path: &[u8], shown: &str) -> Result<RawFd, UnpackError> {
        if let Some((cached, fd)) = &self.parent_cache {
            if cached == path && !self.cache_stale {
                return Ok(fd.as_raw_fd());
            }
        }
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        let root = self.root.as_raw_fd();
        let fd = match rooted::open_in_root(root, path, flags) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // Create the missing directories one by one.
                let comps: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
                let mut fd = rooted::open_in_root(root, b"", flags)
                    .map_err(entry_err(shown, "open the root"))?;
                for i in 0..comps.len() {
                    let prefix = comps[..=i].join(&b'/');
                    match rooted::open_in_root(root, &prefix, flags) {
                        Ok(next) => fd = next,
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                            let name = cstr(comps[i], shown)?;
                            rooted::mkdirat(fd.as_raw_fd(), &name, 0o755).map_err(|e| {
                                if e.raw_os_error() == Some(libc::EEXIST) {
                                    refused(
                                        shown,
                                        format!(
                                            "parent {:?} is a symlink to a missing directory",
                                            String::from_utf8_lossy(&prefix)
                                        ),
                                    )
                                } else {
                                    entry_err(shown, "create a parent directory")(e)
                                }
                            })?;
                            fd = rooted::open_in_root(root, &prefix, flags)
                                .map_err(entry_err(shown, "open a parent directory"))?;
                            let ino = rooted::fstat(fd.as_raw_fd())
                                .map_err(entry_err(shown, "stat"))?
                                .st_ino;
                            let meta = EntryMeta {
                                uid: 0,
                                gid: 0,
                                perm: 0o755,
                                mtime: 0,
                                xattrs: Vec::new(),
                            };
                            self.note(ino, libc::S_IFDIR, 0o755, &meta, None);
                        }
                        Err(e) => return Err(self.resolve_err(shown, &prefix, e)),
                    }
                }
                fd
            }
            Err(e) => return Err(self.resolve_err(shown, path, e)),
        };
        let st = rooted::fstat(fd.as_raw_fd()).map_err(entry_err(shown, "stat"))?;
        self.touched.insert(st.st_ino);
        self.dir_restore.entry(path.to_vec()).or_insert(st.st_mtime);
        let raw = fd.as_raw_fd();
        self.parent_cache = Some((path.to_vec(), fd));
        self.cache_stale = false;
        Ok(raw)
    }

    fn resolve_err(&self, shown: &str, path: &[u8], e: io::Error) -> UnpackError {
        let path = String::from_utf8_lossy(path);
        match e.raw_os_error() {
            Some(libc::ELOOP) => refused(
                shown,
                format!("parent {path:?} is a symlink loop or leads out of the rootfs"),
            ),
            Some(libc::ENOTDIR) => refused(shown, format!("parent {path:?} is not a directory")),
            Some(libc::EXDEV) => refused(shown, format!("parent {path:?} leads out of the rootfs")),
            _ => entry_err(shown, "resolve the parent directory")(e),
        }
    }

    /// Removes whatever is at `dir/name` so a non-directory can take its place.
    fn clear(
        &mut self,
        dir: RawFd,
        name: &CStr,
        existing: Option<&libc::stat>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        if let Some(st) = existing {
            if rooted::is_dir(st) {
                self.cache_stale = true;
            }
            rooted::remove_all_at(dir, name).map_err(entry_err(shown, "remove what was there"))?;
        }
        Ok(())
    }

    fn ino_at(&self, dir: RawFd, name: &CStr, shown: &str) -> Result<u64, UnpackError> {
        lstat_at(dir, name)
            .map_err(entry_err(shown, "stat"))?
            .map(|st| st.st_ino)
            .ok_or_else(|| refused(shown, "vanished right after it was created"))
    }

    /// Records what inode `ino` must look like in the image (when not applied on disk),
    /// and that this layer touched it.
    fn note(&mut self, ino: u64, kind: u32, perm: u32, meta: &EntryMeta, rdev: Option<(u32, u32)>) {
        self.touched.insert(ino);
        if self.apply && rdev.is_none() {
            // Applied on disk; drop any record of an earlier inode with this number.
            if !self.state.inodes.is_empty() {
                self.state.inodes.remove(&ino);
            }
            return;
        }
        self.state.inodes.insert(
            ino,
            InodeMeta {
                uid: meta.uid,
                gid: meta.gid,
                mode: kind | perm,
                rdev,
                xattrs: Vec::new(),
            },
        );
    }

    /// Ownership, mode and xattrs of a regular file or directory through its open fd.
    fn inode_meta(
        &mut self,
        fd: RawFd,
        kind: u32,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let st = rooted::fstat(fd).map_err(entry_err(shown, "stat"))?;
        let ino = st.st_ino;
        if self.apply {
            // New inodes mostly have the right owner already (the builder's, or the
            // directory's group under a setgid directory): chown only when it differs.
            let chown = (st.st_uid, st.st_gid) != (meta.uid, meta.gid);
            if chown {
                rooted::chown_at(fd, c"", meta.uid, meta.gid).map_err(entry_err(shown, "chown"))?;
            }
            // After chown, which clears setuid/setgid.
            if chown || st.st_mode & 0o7777 != meta.perm {
                rooted::fchmod(fd, meta.perm).map_err(entry_err(shown, "chmod"))?;
            }
        } else {
            // Keep it readable and writable (and searchable) by the builder; the true mode
            // is recorded.
            let keep = if kind == libc::S_IFDIR { 0o700 } else { 0o600 };
            let mode = (meta.perm | keep) & 0o777;
            if st.st_mode & 0o7777 != mode {
                rooted::fchmod(fd, mode).map_err(entry_err(shown, "chmod"))?;
            }
        }
        self.note(ino, kind, meta.perm, meta, None);
        let mut refused_xattrs = Vec::new();
        for (key, value) in &meta.xattrs {
            let result = if self.apply {
                rooted::fsetxattr(fd, key, value)
            } else {
                Err(io::Error::from_raw_os_error(libc::EPERM))
            };
            match result {
                Ok(()) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EPERM | libc::ENOTSUP | libc::EACCES)
                    ) =>
                {
                    refused_xattrs.push((key.to_string_lossy().into_owned(), value.clone()));
                }
                Err(e) => return Err(entry_err(shown, "set an xattr")(e)),
            }
        }
        if !refused_xattrs.is_empty() {
            let record = self.state.inodes.entry(ino).or_insert_with(|| InodeMeta {
                uid: meta.uid,
                gid: meta.gid,
                mode: kind | meta.perm,
                rdev: None,
                xattrs: Vec::new(),
            });
            record.xattrs = refused_xattrs;
        }
        Ok(())
    }

    fn dir_meta(&mut self, fd: RawFd, meta: &EntryMeta, shown: &str) -> Result<(), UnpackError> {
        self.inode_meta(fd, libc::S_IFDIR, meta, shown)
    }

    fn write_data<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        fd: &OwnedFd,
        shown: &str,
    ) -> Result<(), UnpackError> {
        // SAFETY: `fd` stays open for the lifetime of `file`, which is forgotten below
        // instead of closing it.
        let mut file = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd.as_raw_fd()) });
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UnpackError::Read(e)),
            };
            if n as u64 > self.disk_budget {
                return Err(UnpackError::Read(io::Error::other(format!(
                    "{shown}: file data exceeds the uncompressed size limit"
                ))));
            }
            self.disk_budget -= n as u64;
            file.write_all(&self.buf[..n])
                .map_err(entry_err(shown, "write"))?;
        }
        Ok(())
    }

    fn hardlink(
        &mut self,
        dir: RawFd,
        name: &CStr,
        existing: Option<&libc::stat>,
        target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
        let comps =
            clean_path(target).map_err(|r| refused(shown, format!("hard link target: {r}")))?;
        let Some((tname, tparent)) = comps.split_last() else {
            return Err(refused(shown, "a hard link to the root directory"));
        };
        let tparent = tparent.join(&b'/');
        let tdir = rooted::open_in_root(
            self.root.as_raw_fd(),
            &tparent,
            libc::O_PATH | libc::O_DIRECTORY,
        )
        .map_err(|e| self.resolve_err(shown, &tparent, e))?;
        let tname = cstr(tname, shown)?;
        let tstat = lstat_at(tdir.as_raw_fd(), &tname)
            .map_err(entry_err(shown, "stat the hard link target"))?
            .ok_or_else(|| {
                refused(
                    shown,
                    format!(
                        "hard link target {:?} does not exist in this or a lower layer",
                        String::from_utf8_lossy(target)
                    ),
                )
            })?;
        if rooted::is_dir(&tstat) {
            return Err(refused(shown, "a hard link to a directory"));
        }
        if existing.is_some_and(|st| st.st_ino == tstat.st_ino && st.st_dev == tstat.st_dev) {
            return Ok(());
        }
        self.clear(dir, name, existing, shown)?;
        rooted::linkat(tdir.as_raw_fd(), &tname, dir, name).map_err(entry_err(shown, "link"))?;
        self.touched.insert(tstat.st_ino);
        Ok(())
    }

    fn special<R: Read>(
        &mut self,
        entry: &mut tar::Entry<R>,
        kind: tar::EntryType,
        dir: RawFd,
        name: &CStr,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let h = entry.header();
        let type_bits = match kind {
            tar::EntryType::Char => libc::S_IFCHR,
            tar::EntryType::Block => libc::S_IFBLK,
            _ => libc::S_IFIFO,
        };
        let dev = if type_bits == libc::S_IFIFO {
            None
        } else {
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            Some((major, minor))
        };
        let mut placeholder = false;
        let node = match dev {
            Some((major, minor)) if self.apply => rooted::mknodat(
                dir,
                name,
                type_bits | meta.perm,
                libc::makedev(major, minor),
            ),
            Some(_) => Err(io::Error::from_raw_os_error(libc::EPERM)),
            None => rooted::mknodat(dir, name, type_bits | meta.perm, 0),
        };
        match node {
            Ok(()) => {}
            Err(e) if dev.is_some() && e.raw_os_error() == Some(libc::EPERM) => {
                // Not allowed to make device nodes: an empty placeholder, made a device in
                // the image build.
                drop(
                    openat_new_file(dir, name, 0o600)
                        .map_err(entry_err(shown, "create a placeholder"))?,
                );
                placeholder = true;
            }
            Err(e) => return Err(entry_err(shown, "mknod")(e)),
        }
        let ino = self.ino_at(dir, name, shown)?;
        if self.apply {
            rooted::chown_at(dir, name, meta.uid, meta.gid).map_err(entry_err(shown, "chown"))?;
            rooted::chmod_at(dir, name, if placeholder { 0o600 } else { meta.perm })
                .map_err(entry_err(shown, "chmod"))?;
        } else if !placeholder {
            rooted::chmod_at(dir, name, (meta.perm | 0o600) & 0o777)
                .map_err(entry_err(shown, "chmod"))?;
        }
        let rdev = if placeholder { dev } else { None };
        if rdev.is_some() || !self.apply {
            self.touched.insert(ino);
            self.state.inodes.insert(
                ino,
                InodeMeta {
                    uid: meta.uid,
                    gid: meta.gid,
                    mode: type_bits | meta.perm,
                    rdev,
                    xattrs: Vec::new(),
                },
            );
        } else {
            self.note(ino, type_bits, meta.perm, meta, None);
        }
        rooted::set_mtime_at(dir, name, meta.mtime).map_err(entry_err(shown, "set mtime"))?;
        Ok(())
    }

    /// `.wh.NAME` removes NAME; `.wh..wh..opq` hides what lower layers put in its directory.
    fn whiteout(&mut self, parent: &[u8], target: &[u8], shown: &str) -> Result<(), UnpackError> {
        self.stats.whiteouts += 1;
        if target == b".wh..opq" {
            let dir = self.parent(parent, shown)?;
            let fd = rooted::openat2(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0, 0)
                .map_err(entry_err(shown, "open the opaque directory"))?;
            self.cache_stale = true;
            opaque_clear(fd.as_raw_fd(), &self.touched)
                .map_err(entry_err(shown, "hide lower-layer entries"))?;
            return Ok(());
        }
        if target.starts_with(b".wh.") {
            // Other AUFS metadata (.wh..wh.plnk, ...): nothing to apply.
            return Ok(());
        }
        if matches!(target, b"" | b"." | b"..") {
            return Err(refused(
                shown,
                "a whiteout naming the directory itself, its parent or the root",
            ));
        }
        let dir = match rooted::open_in_root(
            self.root.as_raw_fd(),
            parent,
            libc::O_PATH | libc::O_DIRECTORY,
        ) {
            Ok(fd) => fd,
            // Nothing below a missing or non-directory parent to remove.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(())
            }
            Err(e) => return Err(self.resolve_err(shown, parent, e)),
        };
        if let Ok(st) = rooted::fstat(dir.as_raw_fd()) {
            self.dir_restore
                .entry(parent.to_vec())
                .or_insert(st.st_mtime);
        }
        let name = cstr(target, shown)?;
        self.cache_stale = true;
        rooted::remove_all_at(dir.as_raw_fd(), &name)
            .map_err(entry_err(shown, "apply the whiteout"))
    }

    /// Sets the directory mtimes collected during the layer.
    fn finish_layer(&mut self) -> Result<(), UnpackError> {
        self.parent_cache = None;
        let root = self.root.as_raw_fd();
        let restore = std::mem::take(&mut self.dir_restore).into_iter();
        for (path, mtime) in restore.chain(std::mem::take(&mut self.dir_times)) {
            let shown = String::from_utf8_lossy(&path).into_owned();
            match rooted::open_in_root(
                root,
                &path,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            ) {
                Ok(fd) => rooted::set_mtime_at(fd.as_raw_fd(), c"", mtime)
                    .map_err(entry_err(&shown, "set mtime"))?,
                // Removed or replaced later in the same layer.
                Err(_) => continue,
            }
        }
        Ok(())
    }
}

/// Removes from `dir` everything this layer did not touch; directories holding something
/// this layer touched stay (they exist in this layer too), with their own lower content
/// cleared the same way.
fn opaque_clear(dir: RawFd, touched: &HashSet<u64>) -> io::Result<()> {
    for name in list_dir(dir)? {
        let Some(st) = lstat_at(dir, &name)? else {
            continue;
        };
        if !rooted::is_dir(&st) {
            if !touched.contains(&st.st_ino) {
                rooted::unlinkat(dir, &name, 0)?;
            }
            continue;
        }
        let child = openat_dir(dir, &name)?;
        opaque_clear(child.as_raw_fd(), touched)?;
        let empty = list_dir(child.as_raw_fd())?.is_empty();
        drop(child);
        if !touched.contains(&st.st_ino) && empty {
            rooted::unlinkat(dir, &name, libc::AT_REMOVEDIR)?;
        }
    }
    Ok(())
}

/// Opens the directory `name` in `dir` for reading, never following a symlink.
fn openat_dir(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    rooted::openat2(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    )
}

/// Creates the new regular file `name` in `dir` (it must not exist; never follows a link).
fn openat_new_file(dir: RawFd, name: &CStr, mode: u32) -> io::Result<OwnedFd> {
    rooted::openat2(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        mode,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    )
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
