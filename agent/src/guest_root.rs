//! The agent's own root and the function's root.
//!
//! The agent moves into a small private tmpfs (its mount points, /proc, and a bind of the /dev
//! it started with) so that nothing it needs lives on the function's writable layer — a full
//! layer (ENOSPC) hits only the function — and, in the process sandbox, so that no host path is
//! left in its mount namespace. In it, the rootfs image is mounted read-only, the writable layer
//! read-write, and an overlay of both at [`FUNCTION_ROOT`] becomes the function's `/`.

use std::io::{self, Read};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Mount points inside the agent's root.
pub const ROOTFS_MOUNT: &str = "/mnt/rootfs";
pub const WRITABLE_MOUNT: &str = "/mnt/writable";
pub const FUNCTION_ROOT: &str = "/mnt/root";
/// The agent's tmpfs root is small: it only holds empty mount points.
const AGENT_ROOT_OPTIONS: &str = "mode=755,size=1m";

const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const EXT4_MAGIC: u16 = 0xEF53;

/// Why the agent's root or the function's could not be set up (or taken down).
#[derive(Debug, thiserror::Error)]
pub enum GuestRootError {
    /// A disk cannot be opened.
    #[error("cannot open {device}: {cause}")]
    OpenDevice { device: String, cause: io::Error },
    /// A disk's superblock cannot be read.
    #[error("cannot read the superblock of {device}: {cause}")]
    ReadSuperblock { device: String, cause: io::Error },
    /// A disk holds no file system the agent mounts.
    #[error("{device} holds neither an ext4 nor an erofs file system")]
    UnknownFileSystem { device: String },
    /// A mount point cannot be made.
    #[error("cannot create {path}: {cause}")]
    CreateDir { path: String, cause: io::Error },
    /// The kernel refused a mount.
    #[error("cannot mount {source_name} ({fstype}) on {target}: {cause}")]
    Mount {
        /// What is mounted ("-" for none).
        source_name: String,
        /// Its type ("bind" for none).
        fstype: String,
        target: String,
        cause: nix::Error,
    },
    /// No mount namespace of the agent's own.
    #[error("cannot create a mount namespace: {0}")]
    Unshare(nix::Error),
    /// A disk's device node cannot be looked at.
    #[error("the {name} device {device}: {cause}")]
    Device {
        name: &'static str,
        device: String,
        cause: io::Error,
    },
    /// A disk's path is no block device.
    #[error("the {name} device {device} is not a block device")]
    NotBlockDevice { name: &'static str, device: String },
    /// The writable layer must be ext4 (overlayfs needs a writable upper layer).
    #[error("the writable layer {device} holds {found}, not ext4")]
    WritableNotExt4 { device: String, found: &'static str },
    /// A directory cannot be entered.
    #[error("cannot enter {path}: {cause}")]
    Enter { path: String, cause: io::Error },
    /// The old root stays attached.
    #[error("cannot detach the old root: {0}")]
    DetachOldRoot(nix::Error),
    /// chroot(2) into the agent root failed (VM).
    #[error("cannot chroot into the agent root: {0}")]
    Chroot(nix::Error),
    /// pivot_root(2) into the agent root failed (process sandbox).
    #[error("cannot pivot_root into the agent root: {0}")]
    PivotRoot(nix::Error),
    /// A mount of the function's could not be taken down at the end.
    #[error("cannot unmount {target}: {cause}")]
    Unmount {
        target: &'static str,
        cause: nix::Error,
    },
}

/// Which file system a block device holds, from its superblock magic.
pub fn detect_filesystem(device: &str) -> Result<&'static str, GuestRootError> {
    let mut file = std::fs::File::open(device).map_err(|cause| GuestRootError::OpenDevice {
        device: device.into(),
        cause,
    })?;
    let mut head = [0u8; 2048];
    file.read_exact(&mut head)
        .map_err(|cause| GuestRootError::ReadSuperblock {
            device: device.into(),
            cause,
        })?;
    filesystem_from_superblock(&head).ok_or_else(|| GuestRootError::UnknownFileSystem {
        device: device.into(),
    })
}

/// Both file systems keep their superblock at byte 1024.
fn filesystem_from_superblock(head: &[u8; 2048]) -> Option<&'static str> {
    let erofs = u32::from_le_bytes([head[1024], head[1025], head[1026], head[1027]]);
    if erofs == EROFS_MAGIC {
        return Some("erofs");
    }
    let ext = u16::from_le_bytes([head[1024 + 0x38], head[1024 + 0x39]]);
    (ext == EXT4_MAGIC).then_some("ext4")
}

fn mkdir(path: &str) -> Result<(), GuestRootError> {
    std::fs::create_dir_all(path).map_err(|cause| GuestRootError::CreateDir {
        path: path.into(),
        cause,
    })
}

fn do_mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), GuestRootError> {
    mount(source, target, fstype, flags, data).map_err(|cause| GuestRootError::Mount {
        source_name: source.unwrap_or("-").into(),
        fstype: fstype.unwrap_or("bind").into(),
        target: target.into(),
        cause,
    })
}

/// Process sandbox only, while the agent is still single-threaded: a mount namespace of its
/// own (even if the host forgot CLONE_NEWNS, nothing here can touch the host's), with every
/// mount private so nothing the agent mounts propagates back (a copied namespace keeps the
/// host's shared propagation).
pub fn make_mounts_private() -> Result<(), GuestRootError> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(GuestRootError::Unshare)?;
    do_mount(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
}

/// Mounts the agent's tmpfs root at `at`, the disks and the overlay inside it, then makes it
/// the agent's `/` and mounts a fresh /proc. `at` must be an existing directory (its content is
/// hidden, in this mount namespace only).
pub fn enter(at: &Path, rootfs: &str, writable: &str) -> Result<(), GuestRootError> {
    prepare(at, writable)?;
    finish(at, rootfs)
}

/// The first half of [`enter`], which needs no rootfs: the tmpfs root at `at`, its mount
/// points, /dev, and the writable layer mounted. A standby sandbox's agent does this before
/// the host has chosen its function.
pub fn prepare(at: &Path, writable: &str) -> Result<(), GuestRootError> {
    let at = at.display().to_string();
    do_mount(
        Some("tmpfs"),
        &at,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(AGENT_ROOT_OPTIONS),
    )?;
    for dir in ["dev", "proc", ROOTFS_MOUNT, WRITABLE_MOUNT, FUNCTION_ROOT] {
        mkdir(&format!("{at}/{}", dir.trim_start_matches('/')))?;
    }
    do_mount(
        Some("/dev"),
        &format!("{at}/dev"),
        None,
        MsFlags::MS_BIND,
        None,
    )?;
    mount_writable(&at, writable)
}

/// The second half of [`enter`]: the rootfs and the overlay in the root [`prepare`] made at
/// `at`, then the switch into it.
pub fn finish(at: &Path, rootfs: &str) -> Result<(), GuestRootError> {
    let at = at.display().to_string();
    mount_function_root(&at, rootfs)?;
    switch_root(&at)?;
    do_mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None,
    )
}

/// Checks that `dev` is a block device (`name` says which disk, for the error).
fn check_block_device(name: &'static str, dev: &str) -> Result<(), GuestRootError> {
    let meta = std::fs::metadata(dev).map_err(|cause| GuestRootError::Device {
        name,
        device: dev.into(),
        cause,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(GuestRootError::NotBlockDevice {
            name,
            device: dev.into(),
        });
    }
    Ok(())
}

/// The writable layer (ext4) at `<at>/mnt/writable`, with the overlay's upper and work dirs.
fn mount_writable(at: &str, writable: &str) -> Result<(), GuestRootError> {
    check_block_device("writable layer", writable)?;
    match detect_filesystem(writable)? {
        "ext4" => {}
        other => {
            return Err(GuestRootError::WritableNotExt4 {
                device: writable.into(),
                found: other,
            })
        }
    }
    let rw = format!("{at}{WRITABLE_MOUNT}");
    do_mount(Some(writable), &rw, Some("ext4"), MsFlags::MS_NODEV, None)?;
    mkdir(&format!("{rw}/upper"))?;
    mkdir(&format!("{rw}/work"))
}

/// rootfs (read-only, ext4 or erofs) + the mounted writable layer → overlay at `<at>/mnt/root`.
fn mount_function_root(at: &str, rootfs: &str) -> Result<(), GuestRootError> {
    check_block_device("rootfs", rootfs)?;
    let lower = format!("{at}{ROOTFS_MOUNT}");
    let rw = format!("{at}{WRITABLE_MOUNT}");
    let merged = format!("{at}{FUNCTION_ROOT}");
    let fstype = detect_filesystem(rootfs)?;
    do_mount(
        Some(rootfs),
        &lower,
        Some(fstype),
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None,
    )?;
    let options = format!("lowerdir={lower},upperdir={rw}/upper,workdir={rw}/work");
    // nodev: a device node in the image or made on the writable layer opens nothing; the
    // function's /dev is its own small tmpfs with the standard nodes (see launch).
    do_mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        MsFlags::MS_NODEV,
        Some(&options),
    )
}

/// Makes `at` the root. pivot_root detaches everything else (the process sandbox's host
/// mounts); an initramfs root cannot be pivoted away from, so the VM moves `at` over `/` and
/// chroots, as switch_root does — either way `at` then has a parent mount, which the
/// function's own pivot_root needs.
fn switch_root(at: &str) -> Result<(), GuestRootError> {
    let enter = |path: &str| {
        std::env::set_current_dir(path).map_err(|cause| GuestRootError::Enter {
            path: path.into(),
            cause,
        })
    };
    enter(at)?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).map_err(GuestRootError::DetachOldRoot)?;
        }
        Err(nix::errno::Errno::EINVAL) => {
            do_mount(Some("."), "/", None, MsFlags::MS_MOVE, None)?;
            nix::unistd::chroot(".").map_err(GuestRootError::Chroot)?;
        }
        Err(e) => return Err(GuestRootError::PivotRoot(e)),
    }
    enter("/")
}

/// Unmounts the function's root and disks (process sandbox, at the end), flushing the
/// writable layer; errors are reported, not fatal.
pub fn unmount_all() -> Vec<GuestRootError> {
    nix::unistd::sync();
    let mut errors = Vec::new();
    for target in [FUNCTION_ROOT, WRITABLE_MOUNT, ROOTFS_MOUNT] {
        if let Err(cause) = umount2(target, MntFlags::empty()) {
            // Busy only if something still uses it; detach so it goes once that ends.
            let _ = umount2(target, MntFlags::MNT_DETACH);
            errors.push(GuestRootError::Unmount { target, cause });
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_magic_tells_ext4_from_erofs() {
        let mut head = [0u8; 2048];
        assert_eq!(filesystem_from_superblock(&head), None);
        head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
        assert_eq!(filesystem_from_superblock(&head), Some("ext4"));
        head[1024..1028].copy_from_slice(&EROFS_MAGIC.to_le_bytes());
        assert_eq!(filesystem_from_superblock(&head), Some("erofs"));
    }

    #[test]
    fn real_images_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello"), "hi").unwrap();
        let ext4 = dir.path().join("ext4.img");
        let made = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-d"])
            .arg(&src)
            .arg(&ext4)
            .arg("4M")
            .status();
        match made {
            Ok(s) if s.success() => {
                assert_eq!(detect_filesystem(ext4.to_str().unwrap()).ok(), Some("ext4"))
            }
            _ => eprintln!("SKIPPED (no mkfs.ext4): real_images_are_recognised ext4"),
        }
        let erofs = dir.path().join("erofs.img");
        let made = std::process::Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg(&erofs)
            .arg(&src)
            .status();
        match made {
            Ok(s) if s.success() => {
                assert_eq!(
                    detect_filesystem(erofs.to_str().unwrap()).ok(),
                    Some("erofs")
                )
            }
            _ => eprintln!("SKIPPED (no mkfs.erofs): real_images_are_recognised erofs"),
        }
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![7u8; 4096]).unwrap();
        let err = detect_filesystem(junk.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither an ext4 nor an erofs"), "{err}");
        let err = detect_filesystem("/nonexistent/disk")
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/disk"), "{err}");
    }
}
