//! The kernel file systems every Linux userland expects: /proc, /sys, /dev.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};

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
pub fn mount_kernel_filesystems() -> Result<(), String> {
    for fs in KERNEL_FILESYSTEMS {
        let target = Path::new(fs.target);
        if !target.is_dir() {
            std::fs::create_dir_all(target)
                .map_err(|e| format!("cannot create mount point {}: {e}", fs.target))?;
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
        .map_err(|e| format!("cannot mount {} on {}: {e}", fs.fstype, fs.target))?;
    }
    Ok(())
}

/// A directory is a mount point when it sits on another device than its parent.
fn is_mount_point(dir: &Path) -> Result<bool, String> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let dev = |p: &Path| {
        std::fs::metadata(p)
            .map(|m| m.dev())
            .map_err(|e| format!("cannot stat {}: {e}", p.display()))
    };
    Ok(dev(dir)? != dev(parent)?)
}

/// Mounts `device` (file system type `fstype`) on `target`, creating the directory.
pub fn mount_device(
    device: &str,
    target: &str,
    fstype: &str,
    read_only: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("cannot create {target}: {e}"))?;
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(Some(device), target, Some(fstype), flags, None::<&str>)
        .map_err(|e| format!("cannot mount {device} ({fstype}) on {target}: {e}"))
}

/// Unmounts `target`, writing back its data first.
pub fn unmount(target: &str) -> Result<(), String> {
    nix::mount::umount(target).map_err(|e| format!("cannot unmount {target}: {e}"))
}
