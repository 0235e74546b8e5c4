//! clone(2) of the function's process into its new namespaces, the child's walk through the
//! [`Plan`] (async-signal-safe calls only, no allocation), and its report back: (step index,
//! errno) through a close-on-exec pipe, or nothing when exec succeeded.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use libc::{c_char, c_ulong};

use super::capabilities::drop_capabilities;
use super::plan::Plan;
use super::steps::Op;
use super::sys::{check, check_syscall, errno, opt_ptr};
use super::LaunchError;

/// A function process that was created.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid in the agent's namespace.
    pub pid: i32,
    /// Why it did not get as far as exec; it has then exited and is left for the reaper.
    pub exec_error: Option<LaunchError>,
}

/// clone(2)s the function's process into new pid/mount/UTS/IPC namespaces and runs `plan` in
/// it. Returns once it has exec'd or failed; Err only when no process was created.
pub fn spawn(plan: &Plan, root: &Path) -> Result<Spawned, LaunchError> {
    let (report_read, report_write) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(LaunchError::ReportPipe)?;
    let argv_ptrs: Vec<*const c_char> = plan
        .exec
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const c_char> = plan
        .exec
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
        return Err(LaunchError::Clone(std::io::Error::last_os_error()));
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
        // exec succeeded: the pipe closed with nothing in it
        return Ok(Spawned {
            pid,
            exec_error: None,
        });
    }
    let index = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    Ok(Spawned {
        pid,
        exec_error: Some(plan.failure(index, errno, root)),
    })
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
    for candidate in &plan.exec.candidates {
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

/// Reports step `index` failed with `errno` and exits the child.
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

/// Runs one step in the child. Only async-signal-safe calls; no allocation.
fn run_op(op: &Op) -> Result<(), i32> {
    // SAFETY: (the whole block) each call is a plain system call on NUL-terminated strings and
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
            Op::Seccomp(filters) => filters.install(),
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
