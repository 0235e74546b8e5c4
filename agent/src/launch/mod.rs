//! Starting the user's command as PID 1 of its own pid, mount, UTS and IPC namespaces, rooted at
//! the overlay, the way OCI runtimes set up a container.
//!
//! The agent is multi-threaded, so the child of clone(2) may only make async-signal-safe calls
//! until it execs: no allocation, no locks. Everything it needs is therefore prepared first as a
//! [`Plan`] — a list of simple steps with every path and argument already a C string — and the
//! child just walks it. A failing step sends (step index, errno) back through a close-on-exec
//! pipe; a successful exec closes that pipe with nothing written.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use libc::{c_char, c_ulong, gid_t, mode_t};

use crate::user::ResolvedUser;

/// What `PATH` is when the function's environment sets none (the OCI/Docker default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Device nodes the function gets, bound from the agent's /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];
/// /proc files hidden from the function (bound over with /dev/null), as Docker does: kernel
/// memory, keyrings and timer internals are none of a function's business.
const MASKED_PROC_FILES: &[&str] = &["kcore", "keys", "timer_list", "sched_debug"];
/// /proc directories hidden (an empty read-only tmpfs over them).
const MASKED_PROC_DIRS: &[&str] = &["acpi", "scsi"];
/// /proc entries made read-only: sysctls and sysrq would reach the whole kernel (the host's,
/// in the process sandbox).
const READ_ONLY_PROC: &[&str] = &["sys", "sysrq-trigger", "irq", "bus", "fs"];
/// The capabilities a root function keeps: Docker's default set without MKNOD (Docker keeps
/// it because its devices cgroup makes nodes harmless; a VM guest has no devices cgroup, and a
/// function has no business making device nodes). All others leave the bounding set, so
/// nothing it execs can regain them.
const KEPT_CAPABILITIES: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    29, // AUDIT_WRITE
    31, // SETFCAP
];
/// The hostname inside the function's UTS namespace.
const HOSTNAME: &str = "localhost";

/// Everything about the command to start, as the host asked and the rootfs resolved it.
pub struct Command<'a> {
    /// The overlay root, as the agent sees it (a mount point).
    pub root: &'a Path,
    pub argv: &'a [String],
    /// Final `KEY=VALUE` list (see [`final_env`]).
    pub env: &'a [String],
    pub working_dir: &'a str,
    pub user: &'a ResolvedUser,
    /// Write ends of the stdout/stderr pipes.
    pub stdout: RawFd,
    pub stderr: RawFd,
}

/// Why the command could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchError(pub String);

impl std::fmt::Display for LaunchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One thing the child does before exec.
enum Op {
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

struct Step {
    op: Op,
    /// For the error message: "mount proc on /proc".
    what: String,
    /// A missing path (ENOENT) skips the step.
    optional: bool,
}

/// The whole start, prepared before clone(2).
pub struct Plan {
    steps: Vec<Step>,
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// argv[0], and the PATH it was looked up in (None when it holds a '/').
    program: String,
    search_path: Option<String>,
}

fn cstring(s: &str) -> Result<CString, LaunchError> {
    CString::new(s).map_err(|_| LaunchError(format!("{s:?} contains a NUL byte")))
}

fn path_in(root: &Path, inner: &str) -> Result<CString, LaunchError> {
    let joined = format!("{}/{}", root.display(), inner.trim_start_matches('/'));
    cstring(&joined)
}

impl Plan {
    pub fn new(cmd: &Command) -> Result<Plan, LaunchError> {
        let program = cmd
            .argv
            .first()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| LaunchError("the command is empty (no argv[0])".into()))?
            .clone();
        let mut steps = Vec::new();
        let mut step = |op, what: String, optional| {
            steps.push(Step { op, what, optional });
        };
        let root = cmd.root;
        let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

        step(Op::Umask(0), "set the umask".into(), false);
        step(
            Op::MakeMountsPrivate,
            "make the new mount namespace private".into(),
            false,
        );
        // /proc of the new pid namespace, with the kernel-wide knobs out of reach.
        step(
            Op::Mkdir {
                path: path_in(root, "proc")?,
                mode: 0o555,
            },
            "create /proc".into(),
            false,
        );
        step(
            Op::Mount {
                source: Some(cstring("proc")?),
                target: path_in(root, "proc")?,
                fstype: Some(cstring("proc")?),
                flags: nosuid_nodev_noexec,
                data: None,
            },
            "mount proc on /proc".into(),
            false,
        );
        for name in READ_ONLY_PROC {
            let p = path_in(root, &format!("proc/{name}"))?;
            step(
                Op::Mount {
                    source: Some(p.clone()),
                    target: p.clone(),
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REC,
                    data: None,
                },
                format!("bind /proc/{name}"),
                true,
            );
            step(
                Op::Mount {
                    source: None,
                    target: p,
                    fstype: None,
                    flags: libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | nosuid_nodev_noexec,
                    data: None,
                },
                format!("make /proc/{name} read-only"),
                true,
            );
        }
        for name in MASKED_PROC_FILES {
            step(
                Op::Mount {
                    source: Some(cstring("/dev/null")?),
                    target: path_in(root, &format!("proc/{name}"))?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                },
                format!("mask /proc/{name}"),
                true,
            );
        }
        for name in MASKED_PROC_DIRS {
            step(
                Op::Mount {
                    source: Some(cstring("tmpfs")?),
                    target: path_in(root, &format!("proc/{name}"))?,
                    fstype: Some(cstring("tmpfs")?),
                    flags: libc::MS_RDONLY | nosuid_nodev_noexec,
                    data: Some(cstring("size=0,mode=555")?),
                },
                format!("mask /proc/{name}"),
                true,
            );
        }

        // /dev: a small nodev tmpfs with the standard nodes bound from the agent's /dev (each
        // bind is its own mount, which keeps the source's device access; a node created in the
        // tmpfs itself opens nothing).
        step(
            Op::Mkdir {
                path: path_in(root, "dev")?,
                mode: 0o755,
            },
            "create /dev".into(),
            false,
        );
        step(
            Op::Mount {
                source: Some(cstring("tmpfs")?),
                target: path_in(root, "dev")?,
                fstype: Some(cstring("tmpfs")?),
                flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_STRICTATIME,
                data: Some(cstring("mode=755,size=65536k")?),
            },
            "mount a tmpfs on /dev".into(),
            false,
        );
        for name in DEVICES {
            let target = path_in(root, &format!("dev/{name}"))?;
            step(
                Op::CreateFile {
                    path: target.clone(),
                },
                format!("create /dev/{name}"),
                false,
            );
            step(
                Op::Mount {
                    source: Some(cstring(&format!("/dev/{name}"))?),
                    target,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                },
                format!("bind /dev/{name}"),
                false,
            );
        }
        for (dir, mode, fstype, flags, data) in [
            (
                "dev/shm",
                0o1777,
                "tmpfs",
                nosuid_nodev_noexec,
                "mode=1777,size=65536k",
            ),
            (
                "dev/pts",
                0o755,
                "devpts",
                libc::MS_NOSUID | libc::MS_NOEXEC,
                "newinstance,ptmxmode=0666,mode=0620,gid=5",
            ),
            ("dev/mqueue", 0o755, "mqueue", nosuid_nodev_noexec, ""),
        ] {
            step(
                Op::Mkdir {
                    path: path_in(root, dir)?,
                    mode,
                },
                format!("create /{dir}"),
                false,
            );
            step(
                Op::Mount {
                    source: Some(cstring(fstype)?),
                    target: path_in(root, dir)?,
                    fstype: Some(cstring(fstype)?),
                    flags,
                    data: if data.is_empty() {
                        None
                    } else {
                        Some(cstring(data)?)
                    },
                },
                format!("mount {fstype} on /{dir}"),
                // mqueue is a nicety; a kernel without it still runs functions.
                fstype == "mqueue",
            );
        }
        for (target, link) in [
            ("pts/ptmx", "dev/ptmx"),
            ("/proc/self/fd", "dev/fd"),
            ("/proc/self/fd/0", "dev/stdin"),
            ("/proc/self/fd/1", "dev/stdout"),
            ("/proc/self/fd/2", "dev/stderr"),
            ("/proc/kcore", "dev/core"),
        ] {
            step(
                Op::Symlink {
                    target: cstring(target)?,
                    link: path_in(root, link)?,
                },
                format!("link /{link}"),
                false,
            );
        }
        // /sys, read-only.
        step(
            Op::Mkdir {
                path: path_in(root, "sys")?,
                mode: 0o555,
            },
            "create /sys".into(),
            false,
        );
        step(
            Op::Mount {
                source: Some(cstring("sysfs")?),
                target: path_in(root, "sys")?,
                fstype: Some(cstring("sysfs")?),
                flags: libc::MS_RDONLY | nosuid_nodev_noexec,
                data: None,
            },
            "mount sysfs read-only on /sys".into(),
            false,
        );

        step(
            Op::PivotRoot {
                new_root: cstring(&root.display().to_string())?,
            },
            "switch to the function's root (pivot_root)".into(),
            false,
        );
        // From here on paths are inside the function's root.
        step(
            Op::Mkdir {
                path: cstring("/tmp")?,
                mode: 0o1777,
            },
            "create /tmp".into(),
            false,
        );
        step(
            Op::SetHostname {
                name: cstring(HOSTNAME)?,
            },
            "set the hostname".into(),
            false,
        );
        let working_dir = if cmd.working_dir.is_empty() {
            "/"
        } else {
            cmd.working_dir
        };
        if !working_dir.starts_with('/') {
            return Err(LaunchError(format!(
                "the working directory {working_dir:?} is not an absolute path"
            )));
        }
        // Like runc: a working directory the image lacks is created.
        let mut prefix = String::new();
        for part in working_dir.split('/').filter(|p| !p.is_empty()) {
            prefix.push('/');
            prefix.push_str(part);
            step(
                Op::Mkdir {
                    path: cstring(&prefix)?,
                    mode: 0o755,
                },
                format!("create the working directory {working_dir}"),
                false,
            );
        }
        step(
            Op::Chdir {
                path: cstring(working_dir)?,
            },
            format!("enter the working directory {working_dir}"),
            false,
        );
        step(Op::DropCapabilities, "drop capabilities".into(), false);
        let user = cmd.user;
        step(
            Op::SetGroups {
                groups: user.groups.clone(),
            },
            format!("set the supplementary groups {:?}", user.groups),
            false,
        );
        step(Op::SetGid(user.gid), format!("set gid {}", user.gid), false);
        step(Op::SetUid(user.uid), format!("set uid {}", user.uid), false);
        step(
            Op::Stdio {
                null: cstring("/dev/null")?,
                stdout: cmd.stdout,
                stderr: cmd.stderr,
            },
            "connect stdin/stdout/stderr".into(),
            false,
        );
        step(Op::Umask(0o022), "set the umask".into(), false);
        step(
            Op::CleanProcess,
            "reset signals and descriptors".into(),
            false,
        );

        let (candidates, search_path) = if program.contains('/') {
            (vec![cstring(&program)?], None)
        } else {
            let path = env_value(cmd.env, "PATH")
                .unwrap_or(DEFAULT_PATH)
                .to_string();
            let candidates = path
                .split(':')
                .filter(|d| !d.is_empty())
                .map(|d| cstring(&format!("{}/{program}", d.trim_end_matches('/'))))
                .collect::<Result<Vec<_>, _>>()?;
            (candidates, Some(path))
        };
        Ok(Plan {
            steps,
            candidates,
            argv: cmd
                .argv
                .iter()
                .map(|a| cstring(a))
                .collect::<Result<_, _>>()?,
            envp: cmd
                .env
                .iter()
                .map(|e| cstring(e))
                .collect::<Result<_, _>>()?,
            program,
            search_path,
        })
    }

    /// What step `index` did, for an error message (the index past the last step is exec).
    fn describe_failure(&self, index: usize, errno: i32, root: &Path) -> String {
        let cause = std::io::Error::from_raw_os_error(errno);
        match self.steps.get(index) {
            Some(step) => format!("cannot start the function: cannot {}: {cause}", step.what),
            None => describe_exec_failure(&self.program, self.search_path.as_deref(), errno, |p| {
                exists_in_root(root, p)
            }),
        }
    }
}

/// A clear message for a failed exec, told apart the ways users hit it.
fn describe_exec_failure(
    program: &str,
    search_path: Option<&str>,
    errno: i32,
    exists: impl Fn(&str) -> bool,
) -> String {
    let cause = std::io::Error::from_raw_os_error(errno);
    match (search_path, errno) {
        (Some(path), libc::ENOENT) => format!(
            "cannot start the function: executable file {program:?} not found in $PATH ({path})"
        ),
        (None, libc::ENOENT) if exists(program) => format!(
            "cannot start the function: {program:?} exists but cannot be executed: its \
             interpreter (#! line) or dynamic loader is missing from the image"
        ),
        (None, libc::ENOENT) => {
            format!("cannot start the function: {program:?} does not exist in the image")
        }
        _ => format!("cannot start the function: cannot execute {program:?}: {cause}"),
    }
}

/// Whether `path` exists inside `root`, symlinks resolved within it.
fn exists_in_root(root: &Path, path: &str) -> bool {
    open_in_root(root, path).is_ok()
}

/// Opens `path` inside `root` with every symlink resolved inside `root` (openat2
/// RESOLVE_IN_ROOT), so an image's absolute symlinks never reach the agent's own files.
pub fn open_in_root(root: &Path, path: &str) -> std::io::Result<std::fs::File> {
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
    let dir = std::fs::File::open(root)?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT);
    let fd = openat2(&dir, path, how).map_err(std::io::Error::from)?;
    Ok(std::fs::File::from(fd))
}

/// Reads a small text file of the image (at most `max` bytes); None when it does not exist.
pub fn read_in_root(root: &Path, path: &str, max: u64) -> Result<Option<String>, String> {
    let file = match open_in_root(root, path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open the image's {path}: {e}")),
    };
    let mut text = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read the image's {path}: {e}"))?;
    if text.len() as u64 > max {
        return Err(format!("the image's {path} is larger than {max} bytes"));
    }
    Ok(Some(String::from_utf8_lossy(&text).into_owned()))
}

fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .filter_map(|e| e.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// The environment the function gets: `spec_env` with later entries replacing earlier ones of
/// the same name (in the first one's place), plus `PATH` and `HOME` when it sets neither.
pub fn final_env(spec_env: &[String], home: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::with_capacity(spec_env.len() + 2);
    for entry in spec_env {
        let Some((key, _)) = entry.split_once('=') else {
            return Err(format!("environment entry {entry:?} is not KEY=VALUE"));
        };
        if key.is_empty() {
            return Err(format!("environment entry {entry:?} has an empty name"));
        }
        match out
            .iter_mut()
            .find(|e| e.split_once('=').is_some_and(|(k, _)| k == key))
        {
            Some(existing) => *existing = entry.clone(),
            None => out.push(entry.clone()),
        }
    }
    let has = |out: &[String], key: &str| env_value(out, key).is_some();
    if !has(&out, "PATH") {
        out.push(format!("PATH={DEFAULT_PATH}"));
    }
    if !has(&out, "HOME") {
        out.push(format!("HOME={home}"));
    }
    Ok(out)
}

/// clone(2)s the function's process into new pid/mount/UTS/IPC namespaces and runs `plan` in
/// it. Returns its pid (in the agent's namespace) once it has exec'd, or why it could not; in
/// that case the child has exited and is left for the reaper.
pub fn spawn(plan: &Plan, root: &Path) -> Result<(i32, Option<LaunchError>), LaunchError> {
    let (report_read, report_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| LaunchError(format!("cannot start the function: pipe: {e}")))?;
    let argv_ptrs: Vec<*const c_char> = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const c_char> = plan
        .envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let flags = libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::SIGCHLD;
    // SAFETY: a fork-like clone (no new stack, no shared memory): the child gets a copy of
    // this address space and runs only `child_main`, which makes async-signal-safe calls on
    // data prepared above and never returns.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        let err = std::io::Error::last_os_error();
        return Err(LaunchError(format!(
            "cannot start the function: clone into new namespaces: {err}"
        )));
    }
    if pid == 0 {
        child_main(plan, &argv_ptrs, &envp_ptrs, report_write.as_raw_fd());
    }
    drop(report_write);
    let pid = pid as i32;
    let mut report = [0u8; 8];
    let mut got = 0;
    let mut pipe = std::fs::File::from(report_read);
    while got < report.len() {
        match pipe.read(&mut report[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok((pid, None)); // exec succeeded: the pipe closed with nothing in it
    }
    let index = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    Ok((
        pid,
        Some(LaunchError(plan.describe_failure(index, errno, root))),
    ))
}

/// The child: runs every step, then execs. Never returns.
fn child_main(plan: &Plan, argv: &[*const c_char], envp: &[*const c_char], report: RawFd) -> ! {
    for (index, step) in plan.steps.iter().enumerate() {
        if let Err(errno) = run_op(&step.op) {
            if step.optional && (errno == libc::ENOENT || errno == libc::ENODEV) {
                continue;
            }
            fail(report, index, errno);
        }
    }
    let mut denied = false;
    for candidate in &plan.candidates {
        // SAFETY: candidate, argv and envp are NUL-terminated strings / NULL-terminated
        // pointer arrays that live in this (copied) address space until exec replaces it.
        unsafe { libc::execve(candidate.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        match errno() {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => denied = true,
            other => fail(report, plan.steps.len(), other),
        }
    }
    fail(
        report,
        plan.steps.len(),
        if denied { libc::EACCES } else { libc::ENOENT },
    )
}

fn errno() -> i32 {
    // SAFETY: __errno_location returns this thread's errno slot; reading it is always valid.
    unsafe { *libc::__errno_location() }
}

fn fail(report: RawFd, index: usize, errno: i32) -> ! {
    let mut msg = [0u8; 8];
    msg[..4].copy_from_slice(&(index as u32).to_ne_bytes());
    msg[4..].copy_from_slice(&errno.to_ne_bytes());
    // SAFETY: write(2) of 8 bytes from a stack buffer, then _exit: both async-signal-safe.
    unsafe {
        libc::write(report, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

fn check(rc: libc::c_int) -> Result<(), i32> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn check_syscall(rc: libc::c_long) -> Result<(), i32> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn opt_ptr(s: &Option<CString>) -> *const c_char {
    s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr())
}

/// Runs one step in the child. Only async-signal-safe calls; no allocation.
fn run_op(op: &Op) -> Result<(), i32> {
    // SAFETY (whole function): each call is a plain system call on NUL-terminated strings and
    // fixed buffers owned by the plan, which outlives the child's use of it.
    unsafe {
        match op {
            Op::Umask(mask) => {
                libc::umask(*mask);
                Ok(())
            }
            Op::MakeMountsPrivate => check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )),
            Op::Mount {
                source,
                target,
                fstype,
                flags,
                data,
            } => check(libc::mount(
                opt_ptr(source),
                target.as_ptr(),
                opt_ptr(fstype),
                *flags,
                opt_ptr(data).cast(),
            )),
            Op::Mkdir { path, mode } => {
                if libc::mkdir(path.as_ptr(), *mode) == 0 {
                    check(libc::chmod(path.as_ptr(), *mode))
                } else if errno() == libc::EEXIST {
                    Ok(())
                } else {
                    Err(errno())
                }
            }
            Op::CreateFile { path } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o666,
                );
                check(fd)?;
                libc::close(fd);
                Ok(())
            }
            Op::Symlink { target, link } => check(libc::symlink(target.as_ptr(), link.as_ptr())),
            Op::PivotRoot { new_root } => {
                check(libc::chdir(new_root.as_ptr()))?;
                let dot = c".".as_ptr();
                if libc::syscall(libc::SYS_pivot_root, dot, dot) < 0 {
                    return Err(errno());
                }
                check(libc::umount2(dot, libc::MNT_DETACH))?;
                check(libc::chdir(c"/".as_ptr()))
            }
            Op::Chdir { path } => check(libc::chdir(path.as_ptr())),
            Op::SetHostname { name } => {
                check(libc::sethostname(name.as_ptr(), name.as_bytes().len()))
            }
            Op::DropCapabilities => drop_capabilities(),
            // Raw system calls: glibc's wrappers would try to change the credentials of every
            // thread of the agent, which this clone(2)d child does not have, and wait forever.
            Op::SetGroups { groups } => check_syscall(libc::syscall(
                libc::SYS_setgroups,
                groups.len(),
                groups.as_ptr(),
            )),
            Op::SetGid(gid) => check_syscall(libc::syscall(libc::SYS_setgid, *gid)),
            Op::SetUid(uid) => check_syscall(libc::syscall(libc::SYS_setuid, *uid)),
            Op::Stdio {
                null,
                stdout,
                stderr,
            } => {
                let fd = libc::open(null.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                check(fd)?;
                check(libc::dup2(fd, 0))?;
                check(libc::dup2(*stdout, 1))?;
                check(libc::dup2(*stderr, 2))
            }
            Op::CleanProcess => {
                // Rust ignores SIGPIPE in the agent; the function expects the default.
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                // Anything the agent opened without O_CLOEXEC still closes at exec.
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            }
        }
    }
}

/// Leaves only [`KEPT_CAPABILITIES`] in the bounding set and clears the inheritable and
/// ambient sets, so neither root nor a setuid/file-capability program gets more.
fn drop_capabilities() -> Result<(), i32> {
    let mut keep: u64 = 0;
    for cap in KEPT_CAPABILITIES {
        keep |= 1 << cap;
    }
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0) } < 0
            && errno() != libc::EINVAL
        {
            return Err(errno()); // EINVAL: past the kernel's last capability
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0,
            0,
            0,
        )
    };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget/capset read and write exactly a v3 header and two data structs, which
    // live on this stack frame.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) < 0 {
            return Err(errno());
        }
        for (i, d) in data.iter_mut().enumerate() {
            let mask = (keep >> (32 * i)) as u32;
            d.effective &= mask;
            d.permitted &= mask;
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) < 0 {
            return Err(errno());
        }
    }
    Ok(())
}

/// Pipe for one output stream: (read end for the agent, write end for the function).
pub fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into `fds`, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh from pipe2 and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The C string of a step target, for tests.
#[cfg(test)]
fn targets(plan: &Plan) -> Vec<&std::ffi::CStr> {
    plan.steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Mount { target, .. } => Some(target.as_c_str()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> ResolvedUser {
        ResolvedUser {
            uid: 1000,
            gid: 1000,
            groups: vec![4],
            home: "/home/app".into(),
        }
    }

    fn plan(argv: &[&str], env: &[&str], working_dir: &str) -> Result<Plan, LaunchError> {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
        let user = user();
        Plan::new(&Command {
            root: Path::new("/mnt/root"),
            argv: &argv,
            env: &env,
            working_dir,
            user: &user,
            stdout: 10,
            stderr: 11,
        })
    }

    #[test]
    fn a_bare_command_is_looked_up_in_the_functions_path() {
        let p = plan(&["httpd", "-f"], &["PATH=/usr/bin:/bin/"], "/").unwrap();
        assert_eq!(
            p.candidates,
            [c"/usr/bin/httpd".to_owned(), c"/bin/httpd".to_owned()]
        );
        let p = plan(&["httpd"], &[], "/").unwrap();
        assert_eq!(p.candidates.len(), DEFAULT_PATH.split(':').count());
        let p = plan(&["./run.sh"], &["PATH=/x"], "/").unwrap();
        assert_eq!(p.candidates, [c"./run.sh".to_owned()]);
    }

    #[test]
    fn mounts_target_the_new_root_and_nothing_of_the_agent() {
        let p = plan(&["/bin/sh"], &[], "/srv/app").unwrap();
        let targets = targets(&p);
        assert!(targets.contains(&c"/mnt/root/proc"));
        assert!(targets.contains(&c"/mnt/root/dev/null"));
        assert!(targets.contains(&c"/mnt/root/sys"));
        assert!(
            targets
                .iter()
                .all(|t| t.to_bytes().starts_with(b"/mnt/root/")),
            "{targets:?}"
        );
        // The working directory is created one component at a time after pivot_root.
        let pivot = p
            .steps
            .iter()
            .position(|s| matches!(s.op, Op::PivotRoot { .. }))
            .unwrap();
        let mkdirs: Vec<_> = p.steps[pivot..]
            .iter()
            .filter_map(|s| match &s.op {
                Op::Mkdir { path, .. } => Some(path.to_str().unwrap()),
                _ => None,
            })
            .collect();
        assert_eq!(mkdirs, ["/tmp", "/srv", "/srv/app"]);
    }

    #[test]
    fn no_file_system_the_function_gets_honours_device_nodes_but_devpts_and_it_cannot_make_any() {
        let p = plan(&["/bin/sh"], &[], "/").unwrap();
        let mut fresh = Vec::new();
        for step in &p.steps {
            if let Op::Mount {
                fstype: Some(fstype),
                flags,
                target,
                ..
            } = &step.op
            {
                // New file systems (not binds or remounts): only devpts serves device nodes,
                // its own ptys, and devpts has no mknod.
                if fstype.to_bytes() != b"devpts" {
                    assert!(
                        flags & libc::MS_NODEV != 0,
                        "{target:?} ({fstype:?}) lacks nodev"
                    );
                }
                fresh.push(target.to_str().unwrap().to_string());
            }
        }
        assert!(fresh.contains(&"/mnt/root/dev".to_string()), "{fresh:?}");
        // The bound nodes are exactly the standard ones.
        let binds: Vec<_> = p
            .steps
            .iter()
            .filter_map(|s| match &s.op {
                Op::Mount {
                    source: Some(source),
                    fstype: None,
                    ..
                } if source.to_bytes().starts_with(b"/dev/") => Some(source.to_str().unwrap()),
                _ => None,
            })
            .collect();
        for bind in &binds {
            let name = bind.trim_start_matches("/dev/");
            assert!(
                DEVICES.contains(&name),
                "{bind} is bound into the function's /dev"
            );
        }
        const CAP_MKNOD: u32 = 27;
        assert!(!KEPT_CAPABILITIES.contains(&CAP_MKNOD));
    }

    #[test]
    fn bad_commands_are_refused_before_clone() {
        let err = |argv: &[&str], dir| plan(argv, &[], dir).err().unwrap().0;
        assert!(err(&[], "/").contains("empty"));
        assert!(plan(&[""], &[], "/").is_err());
        assert!(err(&["a\0b"], "/").contains("NUL"));
        assert!(err(&["sh"], "relative").contains("absolute"));
    }

    #[test]
    fn exec_failures_read_like_an_oci_runtimes() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        let m = describe_exec_failure("httpd", Some("/bin"), libc::ENOENT, none);
        assert!(m.contains("\"httpd\" not found in $PATH (/bin)"), "{m}");
        let m = describe_exec_failure("/app/run", None, libc::ENOENT, all);
        assert!(m.contains("interpreter"), "{m}");
        let m = describe_exec_failure("/app/run", None, libc::ENOENT, none);
        assert!(m.contains("does not exist"), "{m}");
        let m = describe_exec_failure("/app/run", None, libc::EACCES, none);
        assert!(m.contains("Permission denied"), "{m}");
    }

    #[test]
    fn the_environment_is_deduplicated_last_wins_with_path_and_home_added() {
        let env: Vec<String> = ["A=1", "B=2", "A=3", "EMPTY="]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let out = final_env(&env, "/home/app").unwrap();
        assert_eq!(
            out,
            [
                "A=3".to_string(),
                "B=2".into(),
                "EMPTY=".into(),
                format!("PATH={DEFAULT_PATH}"),
                "HOME=/home/app".into()
            ]
        );
        let own: Vec<String> = vec!["PATH=/x".into(), "HOME=/h".into()];
        assert_eq!(final_env(&own, "/home/app").unwrap(), own);
        assert!(final_env(&["NOEQUALS".into()], "/")
            .unwrap_err()
            .contains("NOEQUALS"));
        assert!(final_env(&["=x".into()], "/").is_err());
    }
}
