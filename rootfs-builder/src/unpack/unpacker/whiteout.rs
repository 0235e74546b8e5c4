//! Whiteouts (`.wh.NAME` removes NAME) and opaque directories (`.wh..wh..opq` hides what
//! lower layers put in its directory), per the OCI image spec.

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use super::Unpacker;
use crate::unpack::rooted::{self, list_dir, lstat_at, openat_dir};
use crate::unpack::{cstr, entry_err, refused, UnpackError};

impl Unpacker {
    /// `.wh.NAME` removes NAME; `.wh..wh..opq` hides what lower layers put in its directory.
    pub(super) fn whiteout(
        &mut self,
        parent: &[u8],
        target: &[u8],
        shown: &str,
    ) -> Result<(), UnpackError> {
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
