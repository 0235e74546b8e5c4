//! The file systems the function sees besides its image: its own /proc with the kernel-wide
//! knobs out of reach, a small /dev with only the standard nodes, and a read-only /sys. Each
//! function here writes down the steps that mount one of them under the new root, before
//! pivot_root.

use std::path::Path;

use libc::c_ulong;

use super::steps::{cstring, path_in, Op, Steps};
use super::LaunchError;

/// Device nodes the function gets, bound from the agent's /dev.
pub(super) const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// /proc files hidden from the function (bound over with /dev/null), as Docker does: kernel
/// memory, keyrings and timer internals are none of a function's business.
const MASKED_PROC_FILES: &[&str] = &["kcore", "keys", "timer_list", "sched_debug"];
/// /proc directories hidden (an empty read-only tmpfs over them).
const MASKED_PROC_DIRS: &[&str] = &["acpi", "scsi"];
/// /proc entries made read-only: sysctls and sysrq would reach the whole kernel (the host's,
/// in the process sandbox).
const READ_ONLY_PROC: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];

/// The flags of every file system that needs neither set-uid programs, device nodes nor exec.
const NOSUID_NODEV_NOEXEC: c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// /proc of the new pid namespace, with the kernel-wide knobs read-only or masked.
pub(super) fn proc(steps: &mut Steps, root: &Path) -> Result<(), LaunchError> {
    steps.required(
        Op::Mkdir {
            path: path_in(root, "proc")?,
            mode: 0o555,
        },
        "create /proc",
    );
    steps.required(
        Op::Mount {
            source: Some(cstring("proc")?),
            target: path_in(root, "proc")?,
            fstype: Some(cstring("proc")?),
            flags: NOSUID_NODEV_NOEXEC,
            data: None,
        },
        "mount proc on /proc",
    );
    for name in READ_ONLY_PROC {
        let p = path_in(root, &format!("proc/{name}"))?;
        steps.optional(
            Op::Mount {
                source: Some(p.clone()),
                target: p.clone(),
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REC,
                data: None,
            },
            format!("bind /proc/{name}"),
        );
        steps.optional(
            Op::Mount {
                source: None,
                target: p,
                fstype: None,
                flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | NOSUID_NODEV_NOEXEC,
                data: None,
            },
            format!("make /proc/{name} read-only"),
        );
    }
    for name in MASKED_PROC_FILES {
        steps.optional(
            Op::Mount {
                source: Some(cstring("/dev/null")?),
                target: path_in(root, &format!("proc/{name}"))?,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            },
            format!("mask /proc/{name}"),
        );
    }
    for name in MASKED_PROC_DIRS {
        steps.optional(
            Op::Mount {
                source: Some(cstring("tmpfs")?),
                target: path_in(root, &format!("proc/{name}"))?,
                fstype: Some(cstring("tmpfs")?),
                flags: libc::MS_RDONLY | NOSUID_NODEV_NOEXEC,
                data: Some(cstring("size=0,mode=555")?),
            },
            format!("mask /proc/{name}"),
        );
    }
    Ok(())
}

/// /dev: a small nodev tmpfs with the standard nodes bound from the agent's /dev (each bind is
/// its own mount, which keeps the source's device access; a node created in the tmpfs itself
/// opens nothing), then shm, ptys, mqueue and the usual links.
pub(super) fn dev(steps: &mut Steps, root: &Path) -> Result<(), LaunchError> {
    steps.required(
        Op::Mkdir {
            path: path_in(root, "dev")?,
            mode: 0o755,
        },
        "create /dev",
    );
    steps.required(
        Op::Mount {
            source: Some(cstring("tmpfs")?),
            target: path_in(root, "dev")?,
            fstype: Some(cstring("tmpfs")?),
            flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_STRICTATIME,
            data: Some(cstring("mode=755,size=65536k")?),
        },
        "mount a tmpfs on /dev",
    );
    for name in DEVICES {
        let target = path_in(root, &format!("dev/{name}"))?;
        steps.required(
            Op::CreateFile {
                path: target.clone(),
            },
            format!("create /dev/{name}"),
        );
        steps.required(
            Op::Mount {
                source: Some(cstring(&format!("/dev/{name}"))?),
                target,
                fstype: None,
                flags: libc::MS_BIND,
                data: None,
            },
            format!("bind /dev/{name}"),
        );
    }
    for special in DEV_FILE_SYSTEMS {
        steps.required(
            Op::Mkdir {
                path: path_in(root, special.dir)?,
                mode: special.mode,
            },
            format!("create /{}", special.dir),
        );
        let mount = Op::Mount {
            source: Some(cstring(special.fstype)?),
            target: path_in(root, special.dir)?,
            fstype: Some(cstring(special.fstype)?),
            flags: special.flags,
            data: if special.data.is_empty() {
                None
            } else {
                Some(cstring(special.data)?)
            },
        };
        let what = format!("mount {} on /{}", special.fstype, special.dir);
        if special.optional {
            steps.optional(mount, what);
        } else {
            steps.required(mount, what);
        }
    }
    for (target, link) in [
        ("pts/ptmx", "dev/ptmx"),
        ("/proc/self/fd", "dev/fd"),
        ("/proc/self/fd/0", "dev/stdin"),
        ("/proc/self/fd/1", "dev/stdout"),
        ("/proc/self/fd/2", "dev/stderr"),
        ("/proc/kcore", "dev/core"),
    ] {
        steps.required(
            Op::Symlink {
                target: cstring(target)?,
                link: path_in(root, link)?,
            },
            format!("link /{link}"),
        );
    }
    Ok(())
}

/// A file system mounted in a directory of /dev.
struct DevFileSystem {
    /// The directory, relative to the new root.
    dir: &'static str,
    mode: libc::mode_t,
    fstype: &'static str,
    flags: c_ulong,
    /// Mount options; empty for none.
    data: &'static str,
    /// A kernel without it still runs functions.
    optional: bool,
}

/// /dev/shm, /dev/pts (its own ptys) and /dev/mqueue.
const DEV_FILE_SYSTEMS: &[DevFileSystem] = &[
    DevFileSystem {
        dir: "dev/shm",
        mode: 0o1777,
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: "mode=1777,size=65536k",
        optional: false,
    },
    DevFileSystem {
        dir: "dev/pts",
        mode: 0o755,
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: "newinstance,ptmxmode=0666,mode=0620,gid=5",
        optional: false,
    },
    // mqueue is a nicety; a kernel without it still runs functions.
    DevFileSystem {
        dir: "dev/mqueue",
        mode: 0o755,
        fstype: "mqueue",
        flags: NOSUID_NODEV_NOEXEC,
        data: "",
        optional: true,
    },
];

/// /sys, read-only.
pub(super) fn sys(steps: &mut Steps, root: &Path) -> Result<(), LaunchError> {
    steps.required(
        Op::Mkdir {
            path: path_in(root, "sys")?,
            mode: 0o555,
        },
        "create /sys",
    );
    steps.required(
        Op::Mount {
            source: Some(cstring("sysfs")?),
            target: path_in(root, "sys")?,
            fstype: Some(cstring("sysfs")?),
            flags: libc::MS_RDONLY | NOSUID_NODEV_NOEXEC,
            data: None,
        },
        "mount sysfs read-only on /sys",
    );
    Ok(())
}
