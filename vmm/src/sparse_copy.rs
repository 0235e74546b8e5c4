//! Copies of disk images that stay sparse: a reflink where the file system can share extents,
//! otherwise only the data ranges (SEEK_DATA/SEEK_HOLE with copy_file_range, or a buffer where
//! the kernel cannot). Used for a snapshot's copies of writable disks, every restored instance's
//! own copy of them, and the per-instance writable layer: never a byte-for-byte copy of a
//! mostly empty 512 MiB file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Copies `from` to a new file `to` keeping holes: a reflink where the file system supports one,
/// else only the data extents (SEEK_DATA/SEEK_HOLE) with copy_file_range.
pub fn copy_sparse(from: &Path, to: &Path) -> io::Result<()> {
    copy(from, to, true)
}

/// [`copy_sparse`] without the final fsync, for a scratch copy that dies with the instance it
/// is made for (a writable layer): a crash loses nothing of value, the loop device or the VMM
/// reads it through the page cache all the same, and the fsync was ~1.1 ms of every process
/// sandbox start here (its template's ~300 KB of metadata written out).
pub fn copy_sparse_unsynced(from: &Path, to: &Path) -> io::Result<()> {
    copy(from, to, false)
}

/// [`copy_sparse`] from a file already open (for reading), synced.
pub fn copy_sparse_from(src: &File, to: &Path) -> io::Result<()> {
    copy_file(src, to, true)
}

fn copy(from: &Path, to: &Path, synced: bool) -> io::Result<()> {
    copy_file(&File::open(from)?, to, synced)
}

fn copy_file(src: &File, to: &Path, synced: bool) -> io::Result<()> {
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    let result = (|| {
        // SAFETY: FICLONE takes the source fd as its argument; both fds are open for the call.
        let cloned = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0;
        if !cloned {
            copy_data_extents(src, &dst, len)?;
        }
        dst.set_len(len)?;
        if synced {
            dst.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(to);
    }
    result
}

fn copy_data_extents(src: &File, dst: &File, len: u64) -> io::Result<()> {
    let mut offset: u64 = 0;
    while offset < len {
        let data = match seek(src, offset, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e),
        };
        let hole = seek(src, data, libc::SEEK_HOLE)?.min(len);
        copy_range(src, dst, data, hole - data)?;
        offset = hole;
    }
    Ok(())
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: lseek on an open fd; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Copies `len` bytes at `offset` (same offset in both files), in the kernel where it can.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut off_in = (offset + done) as libc::loff_t;
        let mut off_out = off_in;
        let chunk = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both fds are open; the offsets are locals the kernel updates.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(
                err.raw_os_error(),
                Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)
            ) {
                return copy_range_userspace(src, dst, offset + done, len - done);
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "template ended early",
            ));
        }
        done += n as u64;
    }
    Ok(())
}

fn copy_range_userspace(src: &File, dst: &File, offset: u64, len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    while done < len {
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        src.read_exact_at(&mut buf[..want], offset + done)?;
        dst.write_all_at(&buf[..want], offset + done)?;
        done += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let f = File::create(&a).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"abc", 10 << 20).unwrap();
        let b = dir.path().join("b");
        copy_sparse(&a, &b).unwrap();
        let back = std::fs::read(&b).unwrap();
        assert_eq!(back.len(), 64 << 20);
        assert_eq!(&back[10 << 20..(10 << 20) + 3], b"abc");
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 < 4 << 20);
    }
}
