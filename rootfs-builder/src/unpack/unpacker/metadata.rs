//! Ownership, mode and xattrs of what a layer creates: applied on disk as root, otherwise
//! recorded in the tree's side table for the image.

use std::os::fd::RawFd;

use std::io;

use super::Unpacker;
use crate::unpack::rooted;
use crate::unpack::state::InodeMeta;
use crate::unpack::{entry_err, EntryMeta, UnpackError};

impl Unpacker {
    /// Records what inode `ino` must look like in the image (when not applied on disk),
    /// and that this layer touched it.
    pub(super) fn note(
        &mut self,
        ino: u64,
        kind: u32,
        perm: u32,
        meta: &EntryMeta,
        rdev: Option<(u32, u32)>,
    ) {
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
    pub(super) fn inode_meta(
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

    pub(super) fn dir_meta(
        &mut self,
        fd: RawFd,
        meta: &EntryMeta,
        shown: &str,
    ) -> Result<(), UnpackError> {
        self.inode_meta(fd, libc::S_IFDIR, meta, shown)
    }
}
