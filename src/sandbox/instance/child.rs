//! The host process that embodies a sandbox (the agent as PID 1 of its namespaces, or the
//! `fnvm-vmm` of a VM): signalled through a pidfd so a recycled pid is never hit, reaped by one
//! waiter thread, its own output (agent or VM console) kept as a short tail for error messages.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How many lines of the child's own output are kept.
const TAIL_LINES: usize = 40;

/// The child's exit status once the waiter has reaped it, and the wake-up of its waits.
#[derive(Default)]
struct Reaped {
    status: Mutex<Option<ExitStatus>>,
    done: Condvar,
}

/// A process fnvm started itself (not through `std::process`), not yet reaped: its pid, a pidfd
/// for it and its piped stdout and stderr.
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub stdout: std::fs::File,
    pub stderr: std::fs::File,
}

impl Spawned {
    /// The process has ended (it is not reaped: its status stays for [`Self::wait`]).
    pub fn has_ended(&self) -> bool {
        // SAFETY: a zeroed siginfo_t is valid; waitid on our child's pidfd with WNOWAIT only
        // peeks at its state and writes into `info`.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `info` outlives the call.
        let r = unsafe {
            libc::waitid(
                libc::P_PIDFD,
                self.pidfd.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid filled in `info` (or left it zeroed: si_pid 0 when still running).
        r != 0 || unsafe { info.si_pid() } != 0
    }

    /// Sends SIGKILL (through the pidfd: never a recycled pid).
    pub fn kill(&self) {
        signal_through(self.pidfd.as_fd(), libc::SIGKILL);
    }

    /// Waits for the process to end and reaps it.
    pub fn wait(&self) -> std::io::Result<ExitStatus> {
        reap(self.pid)
    }
}

/// Sends `signal` to the process of `pidfd`: one already reaped makes the call fail (ESRCH),
/// and no other process, whatever its pid, is ever hit.
pub fn signal_through(pidfd: BorrowedFd<'_>, signal: i32) {
    // SAFETY: pidfd_send_signal on an open descriptor with a null siginfo ("as kill(2)");
    // no memory is passed.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Waits for our child `pid` to end and reaps it.
fn reap(pid: i32) -> std::io::Result<ExitStatus> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid on our own, not yet reaped child, writing its status into a stack int.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            return Ok(ExitStatus::from_raw(status));
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A running sandbox process.
pub struct SandboxChild {
    name: &'static str,
    pid: i32,
    pidfd: OwnedFd,
    reaped: Arc<Reaped>,
    tail: Arc<Mutex<VecDeque<String>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl SandboxChild {
    /// Takes over a process fnvm spawned (stdout/stderr piped). Once it has been reaped and
    /// its output read to the end, `on_exit` runs on the waiter thread with its status and its
    /// last output lines; only then do [`Self::status`] and the waits see the status.
    pub fn adopt_spawned(
        name: &'static str,
        spawned: Spawned,
        on_exit: impl FnOnce(ExitStatus, Vec<String>) + Send + 'static,
    ) -> Self {
        let Spawned {
            pid,
            pidfd,
            stdout,
            stderr,
        } = spawned;
        // Only this waiter reaps it.
        let wait = move || reap(pid);
        let outputs: Vec<Box<dyn Read + Send>> = vec![Box::new(stdout), Box::new(stderr)];
        Self::watch(name, pid, pidfd, outputs, wait, on_exit)
    }

    /// Starts the tail readers of `outputs` and the waiter thread that reaps through `wait`.
    fn watch(
        name: &'static str,
        pid: i32,
        pidfd: OwnedFd,
        outputs: Vec<Box<dyn Read + Send>>,
        wait: impl FnOnce() -> std::io::Result<ExitStatus> + Send + 'static,
        on_exit: impl FnOnce(ExitStatus, Vec<String>) + Send + 'static,
    ) -> Self {
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let readers: Vec<_> = outputs
            .into_iter()
            .map(|out| spawn_tail_reader(name, out, tail.clone()))
            .collect();
        let reaped = Arc::new(Reaped::default());
        let waiter_reaped = reaped.clone();
        let waiter_tail = tail.clone();
        let waiter = std::thread::spawn(move || {
            let result = wait();
            let exit = result.unwrap_or_else(|_| ExitStatus::from_raw(libc::SIGKILL));
            // The pipes close when the last process holding them is gone (the whole sandbox).
            for reader in readers {
                let _ = reader.join();
            }
            let lines = waiter_tail
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect();
            on_exit(exit, lines);
            *waiter_reaped
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(exit);
            waiter_reaped.done.notify_all();
        });
        SandboxChild {
            name,
            pid,
            pidfd,
            reaped,
            tail,
            threads: Mutex::new(vec![waiter]),
        }
    }

    /// The host pid.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// A pidfd of its own for it: signals through it never reach a recycled pid, and sending
    /// one takes no lock of the instance's.
    pub fn kill_switch(&self) -> Option<OwnedFd> {
        self.pidfd.try_clone().ok()
    }

    /// Sends `signal` unless the process has already ended.
    pub fn signal(&self, signal: i32) {
        signal_through(self.pidfd.as_fd(), signal);
    }

    /// The exit status once reaped.
    pub fn status(&self) -> Option<ExitStatus> {
        *self.reaped.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits up to `timeout` for the process to be reaped.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let guard = self.reaped.status.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = self
            .reaped
            .done
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *guard
    }

    /// SIGKILLs it and waits until it is reaped (and its output threads are done).
    pub fn kill_and_reap(&self) -> ExitStatus {
        loop {
            self.signal(libc::SIGKILL);
            if let Some(status) = self.wait_timeout(Duration::from_secs(5)) {
                let threads: Vec<_> = self
                    .threads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .drain(..)
                    .collect();
                for t in threads {
                    let _ = t.join();
                }
                return status;
            }
            tracing::warn!(
                "{} (pid {}) has not died 5 s after SIGKILL",
                self.name,
                self.pid
            );
        }
    }

    /// Its last output lines.
    pub fn tail(&self) -> Vec<String> {
        self.tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

fn spawn_tail_reader(
    name: &'static str,
    from: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            // Bounded: a line longer than 64 KiB is cut, never buffered whole.
            match (&mut reader).take(64 * 1024).read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
            tracing::debug!(target: "fnvm::sandbox::console", "{name}: {line}");
            let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    })
}
