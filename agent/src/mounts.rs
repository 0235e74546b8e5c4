//! The kernel file systems every Linux userland expects: /proc, /sys, /dev.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};

/// Why a file system could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A kernel file system's mount point is missing and cannot be made.
    #[error("cannot create mount point {path}: {cause}")]
    CreateMountPoint {
        path: &'static str,
        cause: std::io::Error,
    },
    /// A directory to mount on cannot be made.
    #[error("cannot create {path}: {cause}")]
    CreateDir { path: String, cause: std::io::Error },
    /// A mount point (or its parent) cannot be looked at.
    #[error("cannot stat {}: {cause}", path.display())]
    Stat {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    /// The kernel refused a kernel file system.
    #[error("cannot mount {fstype} on {target}: {cause}")]
    KernelFs {
        fstype: &'static str,
        target: &'static str,
        cause: nix::Error,
    },
    /// The kernel refused a block device.
    #[error("cannot mount {device} ({fstype}) on {target}: {cause}")]
    Device {
        device: String,
        fstype: String,
        target: String,
        cause: nix::Error,
    },
    /// The kernel refused to unmount.
    #[error("cannot unmount {target}: {cause}")]
    Unmount { target: String, cause: nix::Error },
}

struct KernelFs {
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
}

const KERNEL_FILESYSTEMS: &[KernelFs] = &[
    KernelFs {
        target: "/proc",
        fstype: "proc",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    KernelFs {
        target: "/sys",
        fstype: "sysfs",
        flags: MsFlags::MS_NOSUID
            .union(MsFlags::MS_NODEV)
            .union(MsFlags::MS_NOEXEC),
    },
    // The kernel may already have mounted devtmpfs on /dev (CONFIG_DEVTMPFS_MOUNT).
    KernelFs {
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
    },
];

/// Mounts /proc, /sys and /dev unless something is mounted there already.
pub fn mount_kernel_filesystems() -> Result<(), MountError> {
    for fs in KERNEL_FILESYSTEMS {
        let target = Path::new(fs.target);
        if !target.is_dir() {
            std::fs::create_dir_all(target).map_err(|cause| MountError::CreateMountPoint {
                path: fs.target,
                cause,
            })?;
        }
        if is_mount_point(target)? {
            continue;
        }
        mount(
            Some(fs.fstype),
            target,
            Some(fs.fstype),
            fs.flags,
            None::<&str>,
        )
        .map_err(|cause| MountError::KernelFs {
            fstype: fs.fstype,
            target: fs.target,
            cause,
        })?;
    }
    Ok(())
}

/// A directory is a mount point when it sits on another device than its parent.
fn is_mount_point(dir: &Path) -> Result<bool, MountError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|cause| MountError::Stat {
                path: p.to_owned(),
                cause,
            })
    };
    Ok(dev(dir)? != dev(parent)?)
}

/// Mounts `device` (file system type `fstype`) on `target`, creating the directory.
pub fn mount_device(
    device: &str,
    target: &str,
    fstype: &str,
    read_only: bool,
) -> Result<(), MountError> {
    std::fs::create_dir_all(target).map_err(|cause| MountError::CreateDir {
        path: target.into(),
        cause,
    })?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some(device), target, Some(fstype), flags, None::<&str>).map_err(|cause| {
        MountError::Device {
            device: device.into(),
            fstype: fstype.into(),
            target: target.into(),
            cause,
        }
    })
}

/// Unmounts `target`, writing back its data first.
pub fn unmount(target: &str) -> Result<(), MountError> {
    nix::mount::umount(target).map_err(|cause| MountError::Unmount {
        target: target.into(),
        cause,
    })
}
