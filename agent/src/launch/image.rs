//! The image's own files (its /etc/passwd, the program about to be exec'd), opened with every
//! symlink resolved inside the function's root, so an image's absolute symlinks never reach the
//! agent's own files.

use std::io::{self, Read};
use std::path::Path;

/// Why a small file of the image cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageFileError {
    /// The file exists but cannot be opened.
    #[error("cannot open the image's {path}: {cause}")]
    Open { path: String, cause: io::Error },
    /// Reading the opened file failed.
    #[error("cannot read the image's {path}: {cause}")]
    Read { path: String, cause: io::Error },
    /// The file is larger than such a file may be.
    #[error("the image's {path} is larger than {max} bytes")]
    TooLarge { path: String, max: u64 },
    /// A file the platform provides cannot be written into the function's root.
    #[error("cannot write {path} into the function's root: {cause}")]
    Write { path: String, cause: io::Error },
}

/// Whether `path` exists inside `root`, symlinks resolved within it.
pub(super) fn exists_in_root(root: &Path, path: &str) -> bool {
    open_in_root(root, path).is_ok()
}

/// Opens `path` inside `root` with every symlink resolved inside `root` (openat2
/// RESOLVE_IN_ROOT).
fn open_in_root(root: &Path, path: &str) -> io::Result<std::fs::File> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let dir = std::fs::File::open(root)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let fd = openat2(&dir, path, how).map_err(io::Error::from)?;
    Ok(std::fs::File::from(fd))
}

/// Replaces `/<dir>/<name>` inside `root` with `text` (a file the platform provides, such as
/// /etc/resolv.conf): `dir` is resolved inside `root` (made if missing), the new file written
/// beside the old one and renamed over it, so a symlink there is replaced, never followed.
pub fn write_in_root(root: &Path, dir: &str, name: &str, text: &str) -> Result<(), ImageFileError> {
    use nix::fcntl::{openat, openat2, renameat, OFlag, OpenHow, ResolveFlag};
    use nix::sys::stat::{mkdirat, Mode};
    use std::io::Write as _;
    let path = format!("/{dir}/{name}");
    let fail = |cause: io::Error| ImageFileError::Write {
        path: path.clone(),
        cause,
    };
    let root_dir = std::fs::File::open(root).map_err(fail)?;
    let how = || {
        OpenHow::new()
            .flags(OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT)
    };
    let dir_fd = match openat2(&root_dir, dir, how()) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => {
            mkdirat(&root_dir, dir, Mode::from_bits_truncate(0o755)).map_err(|e| fail(e.into()))?;
            openat2(&root_dir, dir, how()).map_err(|e| fail(e.into()))?
        }
        Err(e) => return Err(fail(e.into())),
    };
    let tmp = format!(".{name}.fnvm-new");
    let fd = openat(
        &dir_fd,
        tmp.as_str(),
        OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o644),
    )
    .map_err(|e| fail(e.into()))?;
    std::fs::File::from(fd)
        .write_all(text.as_bytes())
        .map_err(fail)?;
    renameat(&dir_fd, tmp.as_str(), &dir_fd, name).map_err(|e| fail(e.into()))
}

/// Reads a small text file of the image (at most `max` bytes); None when it does not exist.
pub fn read_in_root(root: &Path, path: &str, max: u64) -> Result<Option<String>, ImageFileError> {
    let file = match open_in_root(root, path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(cause) => {
            return Err(ImageFileError::Open {
                path: path.into(),
                cause,
            })
        }
    };
    let mut text = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut text)
        .map_err(|cause| ImageFileError::Read {
            path: path.into(),
            cause,
        })?;
    if text.len() as u64 > max {
        return Err(ImageFileError::TooLarge {
            path: path.into(),
            max,
        });
    }
    Ok(Some(String::from_utf8_lossy(&text).into_owned()))
}
