//! Starting a sandbox's first process (the agent, or a VMM) with one `clone3`: the child is
//! created in its new pid namespace, with a pidfd for the host, and — on cgroup v2 — already
//! inside its cgroup (`CLONE_INTO_CGROUP`). Migrating a process into a cgroup after the fact
//! takes the kernel's threadgroup lock for writing, which waits for an RCU grace period (6–10 ms
//! on the CI host, ~40 % of a process-sandbox start); a child born in its cgroup never migrates.
//! On cgroup v1 (no `CLONE_INTO_CGROUP`) the single-threaded child moves itself through each
//! hierarchy's `tasks` file, which skips that lock (see [`crate::sandbox::cgroup::Cgroup::join_files`]).
//!
//! Both sandboxes start this way, as the jailer starts Firecracker: the process sandbox's agent
//! gets every namespace here ([`Namespaces::Sandbox`]); a VMM gets its pid namespace here (a
//! process cannot enter a new one itself) and makes the rest of its jail on its own
//! ([`Namespaces::Pid`]), so it sees no host process and is PID 1 of its own.
//!
//! Between `clone3` and `execve` the child is a copy of a multi-threaded process: it makes
//! system calls on memory prepared before the clone and nothing else (no allocation, no locks).

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sandbox::cgroup::Cgroup;
use crate::sandbox::instance::child::Spawned;
use crate::sandbox::SandboxError;

/// `CLONE_INTO_CGROUP` (Linux 5.7; not in the libc crate for glibc targets).
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` as of Linux 5.7 (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Where the child goes in the cgroup tree.
enum Placement<'a> {
    /// Born in this cgroup v2 directory.
    Into(BorrowedFd<'a>),
    /// Moves itself by writing "0" into each of these files before exec (v1 `tasks`, or
    /// `cgroup.procs` where the kernel cannot clone into a cgroup).
    Join(&'a [PathBuf]),
}

/// The namespaces a spawned process starts in (always a new pid namespace, as its PID 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespaces {
    /// New pid, mount (private), uts (hostname "fnvm"), ipc and network (loopback up)
    /// namespaces: the process sandbox's agent.
    Sandbox,
    /// A new pid namespace only: a VMM, which makes its own jail (mount, network, ipc and uts
    /// namespaces, pivot_root) as it starts.
    Pid,
}

/// What to start: `program` with `args` and the environment `env` (nothing else of fnvm's) as
/// PID 1 of new `namespaces`, in `cgroup` (if any), in its own session, working in `/`, with
/// stdin from `stdin` (None: /dev/null), stdout and stderr piped, and the descriptors in `keep`
/// (at most [`MAX_KEPT`]) inherited under their own numbers.
pub struct Spawn<'a> {
    pub program: &'a Path,
    pub args: &'a [OsString],
    pub env: &'a [(&'a str, OsString)],
    pub namespaces: Namespaces,
    pub cgroup: Option<&'a Cgroup>,
    pub keep: &'a [BorrowedFd<'a>],
    pub stdin: Option<BorrowedFd<'a>>,
}

impl Spawn<'_> {
    /// Starts it; an error is the reason its set-up or exec failed.
    pub fn spawn(&self) -> io::Result<Spawned> {
        if self.keep.len() > MAX_KEPT {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("at most {MAX_KEPT} descriptors can be kept"),
            ));
        }
        let stdin = match self.stdin {
            Some(fd) => above_stdio(fd.try_clone_to_owned()?)?,
            None => above_stdio(open_dev_null()?)?,
        };
        let Some(cgroup) = self.cgroup else {
            return self.spawn_once(&Placement::Join(&[]), &stdin);
        };
        if !cgroup.is_v2() {
            let join = cgroup.join_files();
            return self.spawn_once(&Placement::Join(&join), &stdin);
        }
        let dir = File::open(cgroup.path())?;
        match self.spawn_once(&Placement::Into(dir.as_fd()), &stdin) {
            // A kernel before 5.7 (EINVAL: unknown flag; E2BIG: struct too big) cannot clone
            // into a cgroup: the child moves itself instead, through cgroup.procs.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)) => {
                let join = cgroup.join_files();
                self.spawn_once(&Placement::Join(&join), &stdin)
            }
            other => other,
        }
    }

    fn spawn_once(&self, placement: &Placement<'_>, stdin: &OwnedFd) -> io::Result<Spawned> {
        let Spawn {
            program,
            args,
            env,
            namespaces,
            keep,
            ..
        } = *self;
        let nul = |_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in an argument");
        let program_c = CString::new(program.as_os_str().as_bytes()).map_err(nul)?;
        let argv_c = std::iter::once(Ok(program_c.clone()))
            .chain(args.iter().map(|a| CString::new(a.as_bytes()).map_err(nul)))
            .collect::<io::Result<Vec<CString>>>()?;
        let argv: Vec<*const libc::c_char> = argv_c
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let env_c = env
            .iter()
            .map(|(name, value)| {
                let mut pair = format!("{name}=").into_bytes();
                pair.extend_from_slice(value.as_bytes());
                CString::new(pair).map_err(nul)
            })
            .collect::<io::Result<Vec<CString>>>()?;
        let envp: Vec<*const libc::c_char> = env_c
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let join: Vec<CString> = match placement {
            Placement::Join(files) => files
                .iter()
                .map(|p| CString::new(p.as_os_str().as_bytes()).map_err(nul))
                .collect::<io::Result<_>>()?,
            Placement::Into(_) => Vec::new(),
        };

        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        // The child reports a failed set-up or exec as its errno here; exec closes it (CLOEXEC),
        // so end of file means the agent is running.
        let (report_r, report_w) = pipe()?;

        let mut pidfd: RawFd = -1;
        let mut clone = CloneArgs {
            flags: (libc::CLONE_NEWPID | libc::CLONE_PIDFD) as u64,
            pidfd: &mut pidfd as *mut RawFd as u64,
            exit_signal: libc::SIGCHLD as u64,
            ..CloneArgs::default()
        };
        if let Placement::Into(dir) = placement {
            clone.flags |= CLONE_INTO_CGROUP;
            clone.cgroup = dir.as_raw_fd() as u64;
        }
        let child_fds = ChildFds {
            stdin: stdin.as_raw_fd(),
            stdout: out_w.as_raw_fd(),
            stderr: err_w.as_raw_fd(),
            report: report_w.as_raw_fd(),
            keep: kept_numbers(keep),
        };
        // SAFETY: clone3 reads `size_of::<CloneArgs>()` bytes of `clone`, which lives across the
        // call, and writes the pidfd into `pidfd`. Without CLONE_VM the child runs on a copy of
        // this address space like after fork(); it only runs `child_main`, which makes system
        // calls on memory prepared above and never returns.
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &mut clone as *mut CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if pid == 0 {
            // SAFETY: in the child; every pointer refers to memory built before the clone.
            unsafe { child_main(&program_c, &argv, &envp, &join, namespaces, &child_fds) }
        }
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        let pid = pid as i32;
        // SAFETY: CLONE_PIDFD stored a new descriptor for the child in `pidfd`; nothing else owns it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        drop((out_w, err_w, report_w));

        let mut errno = [0u8; 4];
        let got = read_full(report_r.as_raw_fd(), &mut errno);
        if got != 0 {
            // The child failed before exec (or its report was cut short): reap it, say why.
            reap(pid);
            return Err(if got == errno.len() {
                io::Error::from_raw_os_error(i32::from_ne_bytes(errno))
            } else {
                io::Error::other("the sandbox's first process failed before exec")
            });
        }
        Ok(Spawned {
            pid,
            pidfd,
            stdout: File::from(out_r),
            stderr: File::from(err_r),
        })
    }
}

/// The child's descriptors, as numbers fixed before the clone.
struct ChildFds {
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    report: RawFd,
    /// The kept descriptors in ascending order, -1 for none.
    keep: [RawFd; MAX_KEPT],
}

/// How many descriptors a spawn can keep (the control socket, a directory).
pub const MAX_KEPT: usize = 2;

/// `keep`'s numbers, ascending, padded with -1 (built before the clone: no allocation after).
fn kept_numbers(keep: &[BorrowedFd<'_>]) -> [RawFd; MAX_KEPT] {
    let mut numbers = [-1; MAX_KEPT];
    for (slot, fd) in numbers.iter_mut().zip(keep) {
        *slot = fd.as_raw_fd();
    }
    numbers.sort_unstable_by_key(|n| if *n < 0 { RawFd::MAX } else { *n });
    numbers
}

/// In the child: stdio, the sandbox, exec; on any failure the errno goes to the report pipe.
///
/// # Safety
/// Only in the child of `clone3`; the arguments point to memory prepared before it.
unsafe fn child_main(
    program: &CStr,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
    join: &[CString],
    namespaces: Namespaces,
    fds: &ChildFds,
) -> ! {
    let result = (|| -> io::Result<()> {
        // SAFETY: dup2 on descriptor numbers (all of ours are above 2, see `above_stdio`);
        // sigprocmask and signal with a sigset on the stack. As std's spawn does, the agent
        // starts with no signal blocked and SIGPIPE at its default, whatever fnvm's thread had.
        unsafe {
            for (fd, target) in [(fds.stdin, 0), (fds.stdout, 1), (fds.stderr, 2)] {
                if libc::dup2(fd, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
        enter_sandbox(join, namespaces)?;
        // As std's spawn did with current_dir("/"): no working directory in fnvm's tree.
        // SAFETY: chdir with a static NUL-terminated path.
        if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        close_others(&fds.keep);
        for fd in fds.keep.iter().filter(|fd| **fd >= 0) {
            keep_across_exec(*fd)?;
        }
        // SAFETY: NUL-terminated program and argument strings and null-terminated pointer
        // arrays, all alive (this process only ends by exec or _exit).
        unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Err(io::Error::last_os_error())
    })();
    let errno = match result {
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
        Ok(()) => libc::EIO,
    };
    // SAFETY: a write of 4 bytes from the stack, then _exit, which never returns.
    unsafe {
        libc::write(fds.report, errno.to_ne_bytes().as_ptr().cast(), 4);
        libc::_exit(127)
    }
}

/// In the child, before exec: join the cgroups (when not born in one), new session and, for
/// [`Namespaces::Sandbox`], new mount, uts, ipc and network namespaces, private mounts,
/// hostname, loopback up.
fn enter_sandbox(join: &[CString], namespaces: Namespaces) -> io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: (the whole block) plain system calls on NUL-terminated static or pre-built strings
    // and stack buffers; nothing here allocates or takes locks.
    unsafe {
        for file in join {
            let fd = check(libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        check(libc::setsid())?;
        if namespaces == Namespaces::Pid {
            return Ok(());
        }
        check(libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET,
        ))?;
        // Nothing mounted in here propagates to the host, and nothing from the host comes in.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        let hostname = b"fnvm";
        check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
        loopback_up()?;
    }
    Ok(())
}

/// Sets IFF_UP on "lo" in the (new) network namespace.
///
/// # Safety
/// Async-signal-safe system calls only; callable between clone and exec.
unsafe fn loopback_up() -> io::Result<()> {
    // SAFETY: a socket, an ifreq zeroed on the stack (all-zero is a valid ifreq) naming "lo",
    // and two ioctls on it; the union field written is the one SIOCGIFFLAGS filled in.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut result = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if result == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            result = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = io::Error::last_os_error();
        libc::close(sock);
        if result < 0 {
            return Err(err);
        }
        Ok(())
    }
}

/// In the child, before exec: closes every descriptor above stdio but those in `keep`
/// (ascending, -1 for none) and the report pipe's (close-on-exec) end — fnvm may hold
/// descriptors it inherited without close-on-exec (a jobserver, a socket from its own parent),
/// and none of them belongs in a sandbox.
fn close_others(keep: &[RawFd]) {
    // SAFETY: close_range on descriptor numbers of this (child) process; no memory involved.
    // CLOSE_RANGE_CLOEXEC marks rather than closes, so the report pipe still works until exec.
    // On kernels before 5.11 (no CLOSE_RANGE_CLOEXEC) nothing is marked: the descriptors fnvm
    // opened itself are close-on-exec anyway.
    unsafe {
        let cloexec = libc::CLOSE_RANGE_CLOEXEC as libc::c_int;
        let mut from: RawFd = 3;
        for &fd in keep {
            if fd < from {
                continue;
            }
            if fd > from {
                libc::syscall(libc::SYS_close_range, from as u32, (fd - 1) as u32, cloexec);
            }
            from = fd + 1;
        }
        libc::syscall(libc::SYS_close_range, from as u32, u32::MAX, cloexec);
    }
}

/// In the child, before exec: lets `fd` survive exec (its number is the child's too: the
/// parent holds it open across the clone, so nothing else in the child has that number).
fn keep_across_exec(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor number; no memory involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A listening Unix socket at `path` for the agent to inherit, on a descriptor above stdio
/// (the child's stdio set-up overwrites 0–2), close-on-exec in this process.
pub fn listen_for_agent(path: &Path) -> Result<OwnedFd, SandboxError> {
    let cannot = |e| SandboxError::setup(format!("cannot listen on {}", path.display()), e);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(cannot)?;
    above_stdio(OwnedFd::from(listener)).map_err(cannot)
}

/// `fd` itself if it is above 2, else a close-on-exec duplicate that is: a descriptor the child
/// dup2s onto 0–2 must not be one of those numbers already.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one (≥ 3) owned by nothing
    // else, or -1.
    let raw = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by fcntl and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn open_dev_null() -> io::Result<OwnedFd> {
    Ok(OwnedFd::from(File::open("/dev/null")?))
}

/// The directory at `path` as an `O_PATH` descriptor above stdio, close-on-exec here.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in a path"))?;
    // SAFETY: open with a NUL-terminated path; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    above_stdio(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A close-on-exec pipe, both ends above stdio: (read end, write end).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nothing else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// Reads until `buf` is full or end of file; the count read (errors count as end of file).
fn read_full(fd: RawFd, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: read into the unfilled tail of `buf`, within its bounds.
        let n = unsafe { libc::read(fd, buf[got..].as_mut_ptr().cast(), buf.len() - got) };
        match n {
            n if n > 0 => got += n as usize,
            n if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => break,
        }
    }
    got
}

/// Waits for the child `pid` to end (it failed before exec).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing its status into a stack int.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sandbox::process::tests::is_root;
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;

    /// The agent's spawn of `program` with `args`.
    fn agent<'a>(
        program: &'a Path,
        args: &'a [OsString],
        cgroup: Option<&'a Cgroup>,
        keep: &'a [BorrowedFd<'a>],
    ) -> Spawn<'a> {
        Spawn {
            program,
            args,
            env: &[],
            namespaces: Namespaces::Sandbox,
            cgroup,
            keep,
            stdin: None,
        }
    }

    /// Runs `program args` through [`Spawn`] to its end (as the agent would be
    /// started, in `cgroup`): its output and exit status. `keep` is the descriptor it inherits.
    pub(crate) fn run(
        program: &str,
        args: &[&str],
        cgroup: Option<&Cgroup>,
        keep: BorrowedFd<'_>,
    ) -> std::process::Output {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        let Spawned {
            pid,
            pidfd: _pidfd,
            mut stdout,
            mut stderr,
        } = agent(Path::new(program), &args, cgroup, &[keep])
            .spawn()
            .expect("spawns");
        let errors = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = stderr.read_to_end(&mut buf);
            buf
        });
        let mut out = Vec::new();
        stdout.read_to_end(&mut out).unwrap();
        let mut status = 0;
        // SAFETY: waitpid on our own child, writing its status into a stack int.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        std::process::Output {
            status: std::process::ExitStatus::from_raw(status),
            stdout: out,
            stderr: errors.join().unwrap(),
        }
    }

    #[test]
    fn a_program_that_cannot_run_is_an_error_with_the_reason_of_its_exec() {
        if !is_root() {
            return;
        }
        let keep = File::open("/dev/null").unwrap();
        let missing = agent(Path::new("/nonexistent/agent"), &[], None, &[keep.as_fd()]).spawn();
        assert_eq!(
            missing.err().map(|e| e.kind()),
            Some(io::ErrorKind::NotFound)
        );
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("agent");
        std::fs::write(&plain, "not a program").unwrap();
        let not_executable = agent(&plain, &[], None, &[keep.as_fd()]).spawn();
        assert_eq!(
            not_executable.err().map(|e| e.kind()),
            Some(io::ErrorKind::PermissionDenied)
        );
    }

    #[test]
    fn the_first_process_is_pid_1_in_slash_with_an_empty_environment_and_only_stdio_and_the_kept_descriptor(
    ) {
        if !is_root() {
            return;
        }
        let keep = File::open("/dev/null").unwrap();
        let script = "echo pid=$$ host=$(hostname) env=$(env | wc -l); ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; pwd";
        let out = run("/bin/sh", &["-c", script], None, keep.as_fd());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{out:?}");
        // dash exports PWD (and nothing else) from an empty environment.
        let first = text.lines().next().unwrap_or_default();
        assert!(first.starts_with("pid=1 host=fnvm env="), "{text}");
        let env_count: usize = first.rsplit('=').next().unwrap().trim().parse().unwrap();
        assert!(env_count <= 1, "environment not empty: {text}");
        // ls's own directory descriptor is the one extra number.
        let fds: Vec<i32> = text
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        let kept = keep.as_raw_fd();
        assert!(fds.starts_with(&[0, 1, 2]), "{fds:?}");
        assert!(
            fds.contains(&kept),
            "the kept descriptor {kept} is missing: {fds:?}"
        );
        assert!(
            fds.len() <= 5,
            "descriptors leaked into the sandbox: {fds:?}"
        );
        assert_eq!(text.lines().nth(2), Some("/"), "not working in /: {text}");
    }

    #[test]
    fn a_vmm_spawn_is_pid_1_of_its_own_pid_namespace_with_only_the_given_environment_and_the_host_network(
    ) {
        if !is_root() {
            return;
        }
        let script = "echo pid=$$ env=$FNVM_X net=$(readlink /proc/self/ns/net) pidns=$(readlink /proc/self/ns/pid) host=$(hostname)";
        let args: Vec<OsString> = ["-c", script].iter().map(OsString::from).collect();
        let env = [("FNVM_X", OsString::from("kept"))];
        let Spawned {
            pid,
            pidfd: _pidfd,
            mut stdout,
            stderr: _stderr,
        } = Spawn {
            program: Path::new("/bin/sh"),
            args: &args,
            env: &env,
            namespaces: Namespaces::Pid,
            cgroup: None,
            keep: &[],
            stdin: None,
        }
        .spawn()
        .expect("spawns");
        let mut text = String::new();
        stdout.read_to_string(&mut text).unwrap();
        reap(pid);
        let ours = |ns: &str| {
            std::fs::read_link(format!("/proc/self/ns/{ns}"))
                .unwrap()
                .display()
                .to_string()
        };
        let host = nix::unistd::gethostname().unwrap();
        let fields: Vec<&str> = text.split_whitespace().collect();
        assert_eq!(
            fields,
            [
                "pid=1",
                "env=kept",
                &format!("net={}", ours("net")),
                fields.get(3).copied().unwrap_or("pidns missing"),
                &format!("host={}", host.to_string_lossy()),
            ],
            "PID 1 with the given environment, in the host's network and uts namespaces"
        );
        assert!(fields[3].starts_with("pidns=pid:["), "{text}");
        assert_ne!(
            fields[3],
            format!("pidns={}", ours("pid")),
            "a new pid namespace"
        );
    }
}
