//! Starting the user's command as PID 1 of its own pid, mount, UTS and IPC namespaces, rooted at
//! the overlay, the way OCI runtimes set up a container.
//!
//! The agent is multi-threaded, so the child of clone(2) may only make async-signal-safe calls
//! until it execs: no allocation, no locks. Everything it needs is therefore prepared first as a
//! [`Plan`] — a list of simple steps with every path and argument already a C string — and the
//! child just walks it. A failing step sends (step index, errno) back through a close-on-exec
//! pipe; a successful exec closes that pipe with nothing written.
//!
//! - [`plan`]: the steps in their order, and what a failed one means;
//! - [`steps`]: what one step is, and how they are written down;
//! - [`filesystems`]: the /proc, /dev and /sys the function sees;
//! - [`capabilities`]: what a root function keeps;
//! - [`seccomp`]: the system calls anyone in the function may make (Docker's default profile);
//! - [`env`]: the function's environment and where its command is looked up;
//! - [`image`]: the image's own files, read with every symlink kept inside its root;
//! - [`spawn`]: clone(2), the child's walk through the plan, and its report back;
//! - [`sys`]: errno and result checks for the child's system calls.
//!
//! **No user namespace (yet).** Root in a process-sandbox function is uid 0 of the host, held
//! in by its namespaces, capabilities and seccomp filter rather than by being unprivileged.
//! Mapping it to an unprivileged host range does not fit safely into today's start:
//! - the image's files belong to its own uids (0 for most); under a mapping they show up as
//!   `nobody`, and root could no longer write its own app directories (overlay copy-up needs
//!   DAC rights over a mapped owner), which breaks images that work under Docker. Idmapped
//!   mounts of the rootfs and writable layer fix that (erofs and ext4 accept them on the CI
//!   host's 6.18 kernel), but overlayfs refuses an idmapped upper layer to a host-root mounter
//!   (creating its workdir fails with EOVERFLOW and it falls back to read-only): the overlay
//!   would have to be mounted from inside the function's user namespace, a different order for
//!   [`crate::guest_root`] and for standby sandboxes, which mount before the function exists;
//! - each instance needs a host uid/gid range of its own (65536, allocated and released like
//!   the egress uids, crash-safe), written to the child's uid_map/gid_map by the agent between
//!   clone and the child's first step (a pipe handshake in [`spawn`]);
//! - the network namespace belongs to the host's user namespace (pasta joins it with the
//!   host's CAP_NET_ADMIN), so root in the function would lose CAP_NET_BIND_SERVICE there
//!   (ports below 1024; `ip_unprivileged_port_start=0` in the sandbox would restore them), and
//!   the child could no longer mount sysfs (a bind of the agent's would do);
//! - in a VM none of it is needed: the guest kernel has no CONFIG_USER_NS, and the VM is the
//!   boundary.

mod capabilities;
mod env;
mod filesystems;
mod image;
mod plan;
mod seccomp;
mod spawn;
mod steps;
mod sys;

use std::io;

pub use env::{final_env, EnvError};
pub use image::{read_in_root, write_in_root, ImageFileError};
pub use plan::{Command, Plan};
pub use seccomp::SeccompError;
pub use spawn::{output_pipe, spawn, Spawned};

use crate::user::UserError;

/// Why the command could not start (each message is what the host shows as StartFailed).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The command has no program to run.
    #[error("the command is empty (no argv[0])")]
    EmptyCommand,
    /// A path, argument or environment entry cannot be a C string.
    #[error("{0:?} contains a NUL byte")]
    NulByte(String),
    /// The working directory is relative.
    #[error("the working directory {0:?} is not an absolute path")]
    RelativeWorkingDir(String),
    /// The image's /etc/passwd or /etc/group cannot be read.
    #[error(transparent)]
    AccountFile(#[from] ImageFileError),
    /// The image's `User` names no account.
    #[error(transparent)]
    User(#[from] UserError),
    /// The function's environment is malformed.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The seccomp filter cannot be built.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// No pipe for the function's stdout or stderr.
    #[error("cannot create the {stream} pipe: {cause}")]
    OutputPipe {
        stream: &'static str,
        cause: io::Error,
    },
    /// No pipe for the child's report of a failed step.
    #[error("cannot start the function: pipe: {0}")]
    ReportPipe(nix::Error),
    /// clone(2) into the new namespaces failed.
    #[error("cannot start the function: clone into new namespaces: {0}")]
    Clone(io::Error),
    /// A step the child takes before exec failed.
    #[error("cannot start the function: cannot {what}: {cause}")]
    Step { what: String, cause: io::Error },
    /// A bare command name is in none of the `PATH` directories.
    #[error("cannot start the function: executable file {program:?} not found in $PATH ({path})")]
    NotInPath { program: String, path: String },
    /// The program is there, but the kernel cannot find what it needs to run it.
    #[error(
        "cannot start the function: {program:?} exists but cannot be executed: its \
         interpreter (#! line) or dynamic loader is missing from the image"
    )]
    NoInterpreter { program: String },
    /// The program's path is not in the image.
    #[error("cannot start the function: {program:?} does not exist in the image")]
    NotInImage { program: String },
    /// exec(2) refused the program for another reason.
    #[error("cannot start the function: cannot execute {program:?}: {cause}")]
    Exec { program: String, cause: io::Error },
}
