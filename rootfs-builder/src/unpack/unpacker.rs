//! The [`Unpacker`]: applies one layer's entries to the destination tree, each resolved
//! inside it, with parent directories cached between entries and directory mtimes set at
//! the end. Ownership and modes are in [`metadata`], whiteouts in [`whiteout`].

mod metadata;
mod whiteout;

use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::rooted::{self, lstat_at, openat_dir, openat_new_file};
use super::state::{InodeMeta, TreeState};
use super::stream::Capped;
use super::{clean_path, cstr, entry_err, refused, EntryMeta, LayerStats, UnpackError};

pub(super) struct Unpacker {
    pub(super) root: OwnedFd,
    /// chown/chmod/mknod on disk (root), else record in `state`.
    pub(super) apply: bool,
    pub(super) state: TreeState,
    /// Inodes this layer created or updated: an opaque directory keeps them.
    pub(super) touched: HashSet<u64>,
    /// Directory mtimes, set at the end of the layer (creating children changes them).
    pub(super) dir_times: Vec<(Vec<u8>, i64)>,
    /// Mtimes of directories this layer changes without naming them: put back at the end,
    /// as the layer's diff did not change them.
    pub(super) dir_restore: HashMap<Vec<u8>, i64>,
    /// The last parent directory: most entries share their predecessor's.
    pub(super) parent_cache: Option<CachedParent>,
    /// Set when a directory was removed: the cached parent may be inside it. Its fd stays
    /// open until the next lookup replaces it (the current entry may still be using it).
    pub(super) cache_stale: bool,
    pub(super) stats: LayerStats,
    pub(super) buf: Vec<u8>,
    /// File bytes that may still be written (sparse entries expand on disk).
    pub(super) disk_budget: u64,
}

/// The last parent directory looked up, open.
pub(super) struct CachedParent {
    /// Its path below the destination, components joined by `/`.
    path: Vec<u8>,
    fd: OwnedFd,
}

impl Unpacker {
    /// Applies every entry of the decoded layer, then the directory mtimes. Returns the
    /// layer's uncompressed size.
    pub(super) fn apply_all<R: Read>(
        &mut self,
        stream: Capped<R>,
        limit: u64,
    ) -> Result<u64, UnpackError> {
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
        if let Some(CachedParent { path: cached, fd }) = &self.parent_cache {
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
        self.parent_cache = Some(CachedParent {
            path: path.to_vec(),
            fd,
        });
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
