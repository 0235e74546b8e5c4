//! File operations confined to a root directory.
//!
//! Every path is resolved relative to the root's directory fd with `openat2(2)` and
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV`: the kernel treats the root as
//! `/`, so `..` and absolute symlinks planted by an earlier layer resolve inside it, never out.
//! The last component of a path is never followed: it is handled with the `*at` calls on its
//! parent's fd and `AT_SYMLINK_NOFOLLOW` / `O_NOFOLLOW`.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How paths below the root are resolved: the root acts as `/` for every symlink and `..`.
const RESOLVE_FLAGS: u64 =
    libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a path"))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// The kernel's `struct open_how` (libc's is non-exhaustive, so it cannot be built here).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// `openat2(dirfd, path, flags, mode, resolve)`.
pub(crate) fn openat2(
    dirfd: RawFd,
    path: &CStr,
    flags: libc::c_int,
    mode: u32,
    resolve: u64,
) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & (libc::O_CREAT | libc::O_TMPFILE) != 0 {
            u64::from(mode)
        } else {
            0
        },
        resolve,
    };
    loop {
        // SAFETY: `path` is a valid NUL-terminated string and `how` a properly initialised
        // open_how whose size we pass; the kernel only reads both.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret >= 0 {
            // SAFETY: the kernel returned a fresh fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
        }
        let err = io::Error::last_os_error();
        // RESOLVE_IN_ROOT asks for a retry when a concurrent rename raced the lookup.
        if err.raw_os_error() != Some(libc::EAGAIN) && err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Opens `path` (a directory on the host) as a root.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_bytes())?;
    openat2(libc::AT_FDCWD, &c, libc::O_RDONLY | libc::O_DIRECTORY, 0, 0)
}

/// Opens `rel` below `root` (resolved inside it), e.g. as a directory or O_PATH handle.
pub(crate) fn open_in_root(root: RawFd, rel: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { &b"."[..] } else { rel };
    openat2(root, &cstring(rel)?, flags, 0, RESOLVE_FLAGS)
}

/// Opens `rel` strictly beneath `dir`: no `..` out, no absolute symlinks, no magic links.
/// Used for reading OCI layouts, whose symlinks must not lead outside the layout.
pub(crate) fn open_beneath(dir: RawFd, rel: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    openat2(
        dir,
        &cstring(rel)?,
        flags,
        0,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    )
}

/// The file type and inode of `name` in `dir`, without following a symlink there.
pub(crate) fn lstat_at(dir: RawFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated and `st` points to writable memory of the right size.
    let ret = unsafe {
        libc::fstatat(
            dir,
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return if err.raw_os_error() == Some(libc::ENOENT) {
            Ok(None)
        } else {
            Err(err)
        };
    }
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(Some(unsafe { st.assume_init() }))
}

/// `fstat` of an open fd.
pub(crate) fn fstat(fd: RawFd) -> io::Result<libc::stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` points to writable memory of the right size.
    check(unsafe { libc::fstat(fd, st.as_mut_ptr()) })?;
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

pub(crate) fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

pub(crate) fn mkdirat(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; mkdirat only reads it.
    check(unsafe { libc::mkdirat(dir, name.as_ptr(), mode) }).map(drop)
}

pub(crate) fn unlinkat(dir: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; unlinkat only reads it.
    check(unsafe { libc::unlinkat(dir, name.as_ptr(), flags) }).map(drop)
}

pub(crate) fn symlinkat(target: &CStr, dir: RawFd, name: &CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated; symlinkat only reads them.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir, name.as_ptr()) }).map(drop)
}

/// A hard link `new_dir/new_name` to `old_dir/old_name`, never following a symlink there.
pub(crate) fn linkat(
    old_dir: RawFd,
    old_name: &CStr,
    new_dir: RawFd,
    new_name: &CStr,
) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated; flags 0 means a symlink is linked, not followed.
    check(unsafe { libc::linkat(old_dir, old_name.as_ptr(), new_dir, new_name.as_ptr(), 0) })
        .map(drop)
}

pub(crate) fn mknodat(dir: RawFd, name: &CStr, mode: u32, dev: libc::dev_t) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; mknodat only reads it.
    check(unsafe { libc::mknodat(dir, name.as_ptr(), mode, dev) }).map(drop)
}

/// Changes owner of `name` in `dir` (or of `dir` itself when `name` is empty), never
/// following a symlink.
pub(crate) fn chown_at(dir: RawFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: `name` is NUL-terminated; fchownat only reads it.
    check(unsafe { libc::fchownat(dir, name.as_ptr(), uid, gid, flags) }).map(drop)
}

/// chmod of an open (non-O_PATH) fd.
pub(crate) fn fchmod(fd: RawFd, mode: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own.
    check(unsafe { libc::fchmod(fd, mode) }).map(drop)
}

/// chmod of `name` in `dir`. Only called for names we just created as a non-symlink
/// (fifos, device nodes), since fchmodat follows a symlink in the last component.
pub(crate) fn chmod_at(dir: RawFd, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated; fchmodat only reads it.
    check(unsafe { libc::fchmodat(dir, name.as_ptr(), mode, 0) }).map(drop)
}

/// Sets atime and mtime of `name` in `dir` (of `dir` itself when `name` is empty) to `secs`.
pub(crate) fn set_mtime_at(dir: RawFd, name: &CStr, secs: i64) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    if name.is_empty() {
        // SAFETY: `times` is an array of two timespecs, as futimens requires.
        return check(unsafe { libc::futimens(dir, times.as_ptr()) }).map(drop);
    }
    // SAFETY: `name` is NUL-terminated and `times` holds two timespecs.
    check(unsafe {
        libc::utimensat(
            dir,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Sets an extended attribute on an open fd.
pub(crate) fn fsetxattr(fd: RawFd, key: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: `key` is NUL-terminated and `value` a valid slice of the given length.
    check(unsafe { libc::fsetxattr(fd, key.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
        .map(drop)
}

/// Removes `name` from `dir` whatever it is; a directory goes with everything below it.
/// Nothing is followed: subdirectories are opened with `O_NOFOLLOW` relative to their parent.
pub(crate) fn remove_all_at(dir: RawFd, name: &CStr) -> io::Result<()> {
    match unlinkat(dir, name, 0) {
        Ok(()) => return Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e)
            if e.raw_os_error() == Some(libc::EISDIR) || e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => return Err(e),
    }
    let child = openat2(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    )?;
    clear_dir(child.as_raw_fd(), &mut |_| false)?;
    drop(child);
    unlinkat(dir, name, libc::AT_REMOVEDIR)
}

/// Removes every entry of the open directory `dir` for which `keep(stat)` is false; for
/// kept directories, `keep` decides again for each of their children (opaque whiteouts).
pub(crate) fn clear_dir(dir: RawFd, keep: &mut dyn FnMut(&libc::stat) -> bool) -> io::Result<()> {
    for name in list_dir(dir)? {
        let Some(st) = lstat_at(dir, &name)? else {
            continue;
        };
        if keep(&st) {
            if is_dir(&st) {
                let child = openat2(
                    dir,
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
                )?;
                clear_dir(child.as_raw_fd(), keep)?;
            }
        } else {
            remove_all_at(dir, &name)?;
        }
    }
    Ok(())
}

/// The names in an open directory (without `.` and `..`).
pub(crate) fn list_dir(dir: RawFd) -> io::Result<Vec<CString>> {
    // fdopendir takes ownership of its fd, so give it a duplicate.
    // SAFETY: plain syscall; the result is checked.
    let dup = check(unsafe { libc::fcntl(dir, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `dup` is an open directory fd we own; fdopendir takes it over.
    let stream = unsafe { libc::fdopendir(dup) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `dup` is still ours to close.
        unsafe { libc::close(dup) };
        return Err(err);
    }
    // SAFETY: rewinding a freshly opened stream; the shared file offset may have moved.
    unsafe { libc::rewinddir(stream) };
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; clearing it tells end-of-directory from an error.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is a valid DIR*.
        let ent = unsafe { libc::readdir64(stream) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            break if err.raw_os_error().unwrap_or(0) == 0 {
                Ok(())
            } else {
                Err(err)
            };
        }
        // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            names.push(name.to_owned());
        }
    };
    // SAFETY: `stream` is valid and closed exactly once (this also closes `dup`).
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

/// Opens the directory `name` in `dir` for reading, never following a symlink.
pub(crate) fn openat_dir(dir: RawFd, name: &CStr) -> io::Result<OwnedFd> {
    openat2(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    )
}

/// Creates the new regular file `name` in `dir` (it must not exist; never follows a link).
pub(crate) fn openat_new_file(dir: RawFd, name: &CStr, mode: u32) -> io::Result<OwnedFd> {
    openat2(
        dir,
        name,
        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
        mode,
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
    )
}
