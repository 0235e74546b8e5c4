//! containerd's rootfs mounts (what its snapshotter prepared: an overlay of the image's layers,
//! or a bind mount) at the bundle's `rootfs`, long enough to build the function's rootfs image.
//! Done here rather than with the shim crate's helper, which forks and waits for the crate's
//! reaper, and fnvm reaps its own children.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// the options are longer than the kernel takes
    #[error("the {fs_type} mount's options are {len} bytes, more than a page: too many layers")]
    TooLong { fs_type: String, len: usize },
    /// the kernel refused
    #[error("mount -t {fs_type} {device} {target}: {errno}")]
    Mount {
        fs_type: String,
        device: String,
        target: String,
        errno: nix::errno::Errno,
    },
}

/// One mount as containerd passes it.
pub struct Mount<'a> {
    pub fs_type: &'a str,
    pub source: &'a str,
    pub options: &'a [String],
}

/// Mounts each of `mounts` at `target`, in order; on failure, unmounts what was mounted.
pub fn mount_all(mounts: &[Mount<'_>], target: &Path) -> Result<(), MountError> {
    for m in mounts {
        if let Err(e) = mount_one(m, target) {
            unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

fn mount_one(m: &Mount<'_>, target: &Path) -> Result<(), MountError> {
    let (flags, data) = parse_options(m.options);
    let bind = flags.contains(MsFlags::MS_BIND);
    if data.len() >= 4096 {
        return Err(MountError::TooLong {
            fs_type: m.fs_type.to_string(),
            len: data.len(),
        });
    }
    let fail = |errno| MountError::Mount {
        fs_type: m.fs_type.to_string(),
        device: m.source.to_string(),
        target: target.display().to_string(),
        errno,
    };
    let fs_type = (!bind).then_some(m.fs_type);
    let data = (!data.is_empty()).then_some(data.as_str());
    // A read-only bind takes a remount: the first bind ignores MS_RDONLY.
    mount(Some(m.source), target, fs_type, flags, data).map_err(fail)?;
    if bind && flags.contains(MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(fail)?;
    }
    Ok(())
}

/// Mount flags and the filesystem's own options (everything that is not a flag).
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for option in options {
        let (set, clear) = match option.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "remount" => (MsFlags::MS_REMOUNT, MsFlags::empty()),
            "private" | "rprivate" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other);
                continue;
            }
        };
        flags = (flags | set) - clear;
    }
    (flags, data.join(","))
}

/// Unmounts everything at `target` (nothing mounted there is fine).
pub fn unmount(target: &Path) {
    while umount2(target, MntFlags::empty()).is_ok() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_are_taken_out_and_the_rest_is_the_filesystems() {
        let options: Vec<String> = ["ro", "index=off", "lowerdir=/a:/b", "nosuid", "rw"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (flags, data) = parse_options(&options);
        assert_eq!(flags, MsFlags::MS_NOSUID);
        assert_eq!(data, "index=off,lowerdir=/a:/b");
        let (flags, _) = parse_options(&["rbind".into(), "ro".into()]);
        assert_eq!(
            flags,
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY
        );
    }
}
