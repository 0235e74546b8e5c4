//! The steps of a start as the child takes them: each an [`Op`] with every path and argument
//! already a C string, what it does (for the error message), and whether a missing path skips
//! it. [`Steps`] is how the plan and the file systems write them down.

use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::Path;

use libc::{c_ulong, gid_t, mode_t};

use super::seccomp::Filters;
use super::LaunchError;

/// One thing the child does before exec.
pub(super) enum Op {
    Umask(mode_t),
    MakeMountsPrivate,
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: c_ulong,
        data: Option<CString>,
    },
    /// mkdir, then chmod to exactly `mode` when it was created; an existing entry is fine.
    Mkdir {
        path: CString,
        mode: mode_t,
    },
    /// Creates an empty file to bind a device node over.
    CreateFile {
        path: CString,
    },
    Symlink {
        target: CString,
        link: CString,
    },
    /// chdir(new_root); pivot_root(".", "."); detach the old root: nothing of the agent stays
    /// reachable.
    PivotRoot {
        new_root: CString,
    },
    Chdir {
        path: CString,
    },
    SetHostname {
        name: CString,
    },
    /// Docker's default seccomp filter, installed while the child is still privileged.
    Seccomp(Filters),
    DropCapabilities,
    SetGroups {
        groups: Vec<gid_t>,
    },
    SetGid(gid_t),
    SetUid(libc::uid_t),
    /// stdin from /dev/null (of the new root), stdout/stderr to the pipes.
    Stdio {
        null: CString,
        stdout: RawFd,
        stderr: RawFd,
    },
    /// Marks every fd above 2 close-on-exec and restores default signal handling.
    CleanProcess,
}

/// One step of the plan.
pub(super) struct Step {
    pub(super) op: Op,
    /// For the error message: "mount proc on /proc".
    pub(super) what: String,
    /// A missing path (ENOENT) skips the step.
    pub(super) optional: bool,
}

/// The steps as they are written down, in the order the child takes them.
#[derive(Default)]
pub(super) struct Steps(Vec<Step>);

impl Steps {
    /// A step whose failure stops the start.
    pub(super) fn required(&mut self, op: Op, what: impl Into<String>) {
        self.push(op, what.into(), false);
    }

    /// A step skipped when its path or file system is missing (ENOENT, ENODEV).
    pub(super) fn optional(&mut self, op: Op, what: impl Into<String>) {
        self.push(op, what.into(), true);
    }

    fn push(&mut self, op: Op, what: String, optional: bool) {
        self.0.push(Step { op, what, optional });
    }

    /// The steps, in order.
    pub(super) fn into_steps(self) -> Vec<Step> {
        self.0
    }
}

/// A C string of `s`, or why it cannot be one.
pub(super) fn cstring(s: &str) -> Result<CString, LaunchError> {
    CString::new(s).map_err(|_| LaunchError::NulByte(s.into()))
}

/// `inner` under `root`, as the agent sees it before pivot_root.
pub(super) fn path_in(root: &Path, inner: &str) -> Result<CString, LaunchError> {
    let joined = format!("{}/{}", root.display(), inner.trim_start_matches('/'));
    cstring(&joined)
}
