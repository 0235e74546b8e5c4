//! The [`Plan`] of a start: every step the clone(2)d child takes before exec, written down in
//! order with its paths and arguments already C strings, and the candidates it tries to exec.
//! [`Plan::new`] reads as the order itself: a fresh mount namespace, the function's file
//! systems, its root, its working directory, its user, its stdio, then exec.

use std::ffi::CString;
use std::io;
use std::os::fd::RawFd;
use std::path::Path;

use super::seccomp::Filters;
use super::steps::{cstring, Op, Step, Steps};
use super::{env, filesystems, image, LaunchError};
use crate::user::ResolvedUser;

/// The hostname inside the function's UTS namespace.
const HOSTNAME: &str = "localhost";

/// Everything about the command to start, as the host asked and the rootfs resolved it.
pub struct Command<'a> {
    /// The overlay root, as the agent sees it (a mount point).
    pub root: &'a Path,
    pub argv: &'a [String],
    /// Final `KEY=VALUE` list (see [`super::final_env`]).
    pub env: &'a [String],
    pub working_dir: &'a str,
    pub user: &'a ResolvedUser,
    /// Write ends of the stdout/stderr pipes.
    pub stdout: RawFd,
    pub stderr: RawFd,
}

/// What the child execs once every step is done.
pub(super) struct Exec {
    /// The paths tried in order: argv[0] itself when it holds a '/', else argv[0] in each
    /// `PATH` directory.
    pub(super) candidates: Vec<CString>,
    pub(super) argv: Vec<CString>,
    pub(super) envp: Vec<CString>,
    /// argv[0], for the error message.
    program: String,
    /// The `PATH` argv[0] was looked up in (None when it holds a '/').
    search_path: Option<String>,
}

impl Exec {
    fn new(program: String, argv: &[String], env: &[String]) -> Result<Exec, LaunchError> {
        let (candidates, search_path) = if program.contains('/') {
            (vec![cstring(&program)?], None)
        } else {
            let path = env::search_path(env).to_string();
            let candidates = path
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstring(&format!("{}/{program}", d.trim_end_matches('/'))))
                .collect::<Result<Vec<_>, _>>()?;
            (candidates, Some(path))
        };
        Ok(Exec {
            candidates,
            argv: argv.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?,
            envp: env.iter().map(|e| cstring(e)).collect::<Result<_, _>>()?,
            program,
            search_path,
        })
    }
}

/// The whole start, prepared before clone(2).
pub struct Plan {
    pub(super) steps: Vec<Step>,
    pub(super) exec: Exec,
}

impl Plan {
    /// Prepares every step of `cmd`'s start; Err when the command cannot start at all.
    pub fn new(cmd: &Command) -> Result<Plan, LaunchError> {
        let program = cmd
            .argv
            .first()
            .filter(|a| !a.is_empty())
            .ok_or(LaunchError::EmptyCommand)?
            .clone();
        let mut steps = Steps::default();
        fresh_namespace(&mut steps);
        filesystems::proc(&mut steps, cmd.root)?;
        filesystems::dev(&mut steps, cmd.root)?;
        filesystems::sys(&mut steps, cmd.root)?;
        enter_root(&mut steps, cmd.root)?;
        enter_working_dir(&mut steps, cmd.working_dir)?;
        become_user(&mut steps, cmd.user, Filters::for_function()?);
        connect_stdio(&mut steps, cmd.stdout, cmd.stderr)?;
        clean_process(&mut steps);
        Ok(Plan {
            steps: steps.into_steps(),
            exec: Exec::new(program, cmd.argv, cmd.env)?,
        })
    }

    /// What failed, from the child's report: step `index` (the index past the last step is
    /// exec) with `errno`.
    pub(super) fn failure(&self, index: usize, errno: i32, root: &Path) -> LaunchError {
        match self.steps.get(index) {
            Some(step) => LaunchError::Step {
                what: step.what.clone(),
                cause: io::Error::from_raw_os_error(errno),
            },
            None => exec_failure(
                &self.exec.program,
                self.exec.search_path.as_deref(),
                errno,
                |p| image::exists_in_root(root, p),
            ),
        }
    }
}

/// No umask while the file systems are made; mounts that stay in this namespace.
fn fresh_namespace(steps: &mut Steps) {
    steps.required(Op::Umask(0), "set the umask");
    steps.required(
        Op::MakeMountsPrivate,
        "make the new mount namespace private",
    );
}

/// pivot_root into the function's root; then /tmp and the hostname. Paths of later steps
/// are inside that root.
fn enter_root(steps: &mut Steps, root: &Path) -> Result<(), LaunchError> {
    steps.required(
        Op::PivotRoot {
            new_root: cstring(&root.display().to_string())?,
        },
        "switch to the function's root (pivot_root)",
    );
    steps.required(
        Op::Mkdir {
            path: cstring("/tmp")?,
            mode: 0o1777,
        },
        "create /tmp",
    );
    steps.required(
        Op::SetHostname {
            name: cstring(HOSTNAME)?,
        },
        "set the hostname",
    );
    Ok(())
}

/// Like runc: a working directory the image lacks is created, one component at a time.
fn enter_working_dir(steps: &mut Steps, working_dir: &str) -> Result<(), LaunchError> {
    let working_dir = if working_dir.is_empty() {
        "/"
    } else {
        working_dir
    };
    if !working_dir.starts_with('/') {
        return Err(LaunchError::RelativeWorkingDir(working_dir.into()));
    }
    let mut prefix = String::new();
    for part in working_dir.split('/').filter(|p| !p.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        steps.required(
            Op::Mkdir {
                path: cstring(&prefix)?,
                mode: 0o755,
            },
            format!("create the working directory {working_dir}"),
        );
    }
    steps.required(
        Op::Chdir {
            path: cstring(working_dir)?,
        },
        format!("enter the working directory {working_dir}"),
    );
    Ok(())
}

/// The seccomp filter while the child still has CAP_SYS_ADMIN (it goes on without
/// `no_new_privs`, as under Docker: see [`super::seccomp`]), only the kept capabilities, then
/// the user's groups, gid and uid (in that order: after setuid nothing else could be changed).
fn become_user(steps: &mut Steps, user: &ResolvedUser, filters: Filters) {
    steps.required(
        Op::Seccomp(filters),
        "install Docker's default seccomp filter",
    );
    steps.required(Op::DropCapabilities, "drop capabilities");
    steps.required(
        Op::SetGroups {
            groups: user.groups.clone(),
        },
        format!("set the supplementary groups {:?}", user.groups),
    );
    steps.required(Op::SetGid(user.gid), format!("set gid {}", user.gid));
    steps.required(Op::SetUid(user.uid), format!("set uid {}", user.uid));
}

/// stdin from the new root's /dev/null, stdout and stderr to the agent's pipes.
fn connect_stdio(steps: &mut Steps, stdout: RawFd, stderr: RawFd) -> Result<(), LaunchError> {
    steps.required(
        Op::Stdio {
            null: cstring("/dev/null")?,
            stdout,
            stderr,
        },
        "connect stdin/stdout/stderr",
    );
    Ok(())
}

/// The usual umask, default signals, and no descriptor of the agent's across exec.
fn clean_process(steps: &mut Steps) {
    steps.required(Op::Umask(0o022), "set the umask");
    steps.required(Op::CleanProcess, "reset signals and descriptors");
}

/// A failed exec, told apart the ways users hit it (as an OCI runtime would say it).
fn exec_failure(
    program: &str,
    search_path: Option<&str>,
    errno: i32,
    exists: impl Fn(&str) -> bool,
) -> LaunchError {
    let program = program.to_string();
    match (search_path, errno) {
        (Some(path), libc::ENOENT) => LaunchError::NotInPath {
            program,
            path: path.into(),
        },
        (None, libc::ENOENT) if exists(&program) => LaunchError::NoInterpreter { program },
        (None, libc::ENOENT) => LaunchError::NotInImage { program },
        _ => LaunchError::Exec {
            program,
            cause: io::Error::from_raw_os_error(errno),
        },
    }
}

#[cfg(test)]
mod tests;
