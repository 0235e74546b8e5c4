//! What the tests look at on disk: unfinished writes, a built rootfs image's files, a tree as
//! a comparable listing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fnvm_rootfs_builder::digest::Digest;

/// Every file under `dir` whose name marks an unfinished write.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".ingest-") || name.starts_with(".staging-") {
                out.push(e.path());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            }
        }
    }
    out
}

/// Extracts a built rootfs image (ext4 via debugfs, or EROFS via fsck.erofs) into `dest`.
pub fn extract_rootfs_image(image: &Path, dest: &Path) {
    let mut head = vec![0u8; 2048];
    std::fs::File::open(image)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    std::fs::create_dir_all(dest).unwrap();
    let status = if head[1080..1082] == [0x53, 0xEF] {
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump / {}", dest.display()))
            .arg(image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    } else if head[1024..1028] == 0xE0F5_E1E2u32.to_le_bytes() {
        Command::new("fsck.erofs")
            .arg(format!("--extract={}", dest.display()))
            .arg("--overwrite")
            .arg(image)
            .stdout(Stdio::null())
            .status()
    } else {
        panic!("{} is neither ext4 nor EROFS", image.display());
    }
    .unwrap();
    assert!(status.success(), "extracting {}", image.display());
}

/// Every path under `root` with its kind, permission bits and contents, for comparisons.
pub fn tree_listing(root: &Path) -> Vec<(String, String)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode() & 0o7777;
            let what = if m.is_dir() {
                stack.push(p.clone());
                format!("dir {mode:o}")
            } else if m.file_type().is_symlink() {
                format!("link {}", std::fs::read_link(&p).unwrap().display())
            } else {
                format!("file {mode:o} {}", Digest::of(&std::fs::read(&p).unwrap()))
            };
            out.push((rel, what));
        }
    }
    out.sort();
    out
}
