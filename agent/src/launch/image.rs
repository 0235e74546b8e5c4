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
