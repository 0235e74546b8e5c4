//! What an unpacked tree cannot say about itself, kept beside it between layers and for the
//! image build: the running total of uncompressed bytes (the decompression-bomb cap covers a
//! whole image), and per inode the ownership, mode, device number and xattrs that the
//! builder could not apply on disk (not root, or the host refused).
//!
//! Stored as `<parent>/.<tree name>.fnvm-unpack.json`, next to the tree rather than inside
//! it, so it never ends up in the image. Keyed by inode number: every inode the unpacker
//! creates replaces any record left by an earlier, removed inode of the same number, and
//! paths reached through symlinked parents still find their record.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Ownership, mode and device numbers an inode must get in the image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InodeMeta {
    pub uid: u32,
    pub gid: u32,
    /// The full `st_mode`: file type and permission bits, including setuid/setgid/sticky.
    pub mode: u32,
    /// For character and block devices: (major, minor). On disk they are empty placeholder
    /// files; the image build turns them into device nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdev: Option<(u32, u32)>,
    /// Extended attributes the host refused (e.g. `security.capability` when not root).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// The side table of one unpacked tree.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct TreeState {
    /// Uncompressed layer bytes read into this tree so far, over all layers.
    pub total_bytes: u64,
    /// Metadata to apply in the image, by inode number in the tree.
    pub inodes: HashMap<u64, InodeMeta>,
}

/// Where the side table of `tree` lives.
pub fn state_path(tree: &Path) -> io::Result<PathBuf> {
    let tree = fs::canonicalize(tree)?;
    let (Some(parent), Some(name)) = (tree.parent(), tree.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the unpack destination cannot be the file system root",
        ));
    };
    let mut file = std::ffi::OsString::from(".");
    file.push(name);
    file.push(".fnvm-unpack.json");
    Ok(parent.join(file))
}

impl TreeState {
    /// The table of `tree`, or an empty one if there is none yet.
    pub fn load(tree: &Path) -> io::Result<Self> {
        let path = state_path(tree)?;
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e),
        }
    }

    /// Writes the table beside `tree` (temp file + rename: never half-written).
    pub fn save(&self, tree: &Path) -> io::Result<()> {
        let path = state_path(tree)?;
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec(self).map_err(io::Error::other)?;
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        drop(f);
        fs::rename(&tmp, &path)
    }
}
