//! The function's life: Start (once), its output, the wait for port 9000, Stop, and its end.
//!
//! Threads: the control connection calls [`Supervisor::handle`]; one reader per output pipe
//! turns output into log messages; one prober waits for the port; the main thread (PID 1)
//! reaps the function in [`Supervisor::run`] and sends the final messages. Every decision that
//! could race (ready vs. timeout vs. exit) is made under one lock, so the host sees exactly one
//! of Ready / StartFailed, always before Exited.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fnvm_agent::protocol::{
    AgentMessage, HostMessage, LogStream, StartSpec, NOT_LISTENING_MESSAGE, READY_TIMEOUT_MS,
};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::Pid;

use crate::launch::{self, Command, LaunchError, Plan, Spawned};
use crate::link::outbox::Outbox;
use crate::output_drain::LogPipe;
use crate::{bridge, console, refresh, user};

/// How long the prober waits between connection attempts during the first
/// [`STEADY_PROBING`] of a start (then twice as long each time, up to [`MAX_PROBE_INTERVAL`]).
/// busybox httpd listens about a millisecond after its start: with a first wait of 1 ms,
/// doubling, it was seen at 1.31–1.32 ms; with 0.25 ms, doubling, at 1.12–1.14 ms (`fnvm bench`,
/// p50 of 10, twice each) — doubling from the start lets a server that listens just after a
/// probe wait up to one interval more. A refused loopback connect costs ~10 µs, so 80 probes in
/// the first 20 ms cost under a millisecond of CPU.
const FIRST_PROBE_INTERVAL: Duration = Duration::from_micros(250);
/// How long the prober keeps probing every [`FIRST_PROBE_INTERVAL`]: most servers that start
/// fast listen within it.
const STEADY_PROBING: Duration = Duration::from_millis(20);
/// How long the prober waits at most between two connection attempts.
const MAX_PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// How long one probe connection may take (loopback: refused or accepted at once).
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// At the end, how long the agent waits for a host to take its last messages.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// ... and then for the host to close the control stream.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// /etc/passwd or /etc/group larger than this is refused.
const MAX_ACCOUNT_FILE: u64 = 4 << 20;

#[derive(Default)]
struct State {
    started: bool,
    pid: Option<i32>,
    started_at: Option<Instant>,
    ready: bool,
    /// A StartFailed was sent.
    failed: bool,
    exited: bool,
    /// End without a function process (Stop before Start, or a start that never cloned).
    finish_without_process: bool,
    /// A Stop (its grace in ms) that came while the process was being created.
    stop_pending: Option<u64>,
    log_threads: Vec<JoinHandle<()>>,
}

/// Runs one function and reports on it through the [`Outbox`].
pub struct Supervisor {
    outbox: Arc<Outbox>,
    /// The overlay root in the agent's view.
    root: PathBuf,
    /// Why the guest could not be set up (reported at Start).
    setup_error: Option<String>,
    /// VM: Refresh sets the RNG and clock. Process sandbox: they are the host's, untouched.
    in_vm: bool,
    agent_start: Instant,
    state: Mutex<State>,
    changed: Condvar,
}

impl Supervisor {
    pub fn new(
        outbox: Arc<Outbox>,
        root: PathBuf,
        setup_error: Option<String>,
        in_vm: bool,
    ) -> Arc<Self> {
        Arc::new(Supervisor {
            outbox,
            root,
            setup_error,
            in_vm,
            agent_start: Instant::now(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The guest's uptime for Hello: the VM's boot clock, or the process sandbox's age.
    pub fn uptime_ms(&self) -> u64 {
        if self.in_vm {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes one timespec, which lives on this frame.
            if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) } == 0 {
                return t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000;
            }
        }
        self.agent_start.elapsed().as_millis() as u64
    }

    /// One message from the host (after Hello).
    pub fn handle(self: &Arc<Self>, message: HostMessage) {
        match message {
            HostMessage::Hello { .. } => self.outbox.push(&AgentMessage::Error {
                message: "hello was already exchanged on this stream".into(),
            }),
            HostMessage::Start(spec) => self.start(spec),
            HostMessage::Stop { grace_ms } => self.stop(grace_ms),
            HostMessage::Refresh {
                entropy_hex,
                unix_time_ns,
            } => {
                let result = if self.in_vm {
                    refresh::apply(&entropy_hex, unix_time_ns)
                } else {
                    // Validate anyway, so a bad request fails the same way in both sandboxes.
                    refresh::decode_hex(&entropy_hex).map(|_| ())
                };
                self.outbox.push(&match result {
                    Ok(()) => AgentMessage::Refreshed,
                    Err(message) => AgentMessage::Error {
                        message: format!("refresh failed: {message}"),
                    },
                });
            }
            HostMessage::Ping { seq } => self.outbox.push(&AgentMessage::Pong {
                seq,
                unix_time_us: crate::link::outbox::unix_time_us(),
            }),
        }
    }

    fn start(self: &Arc<Self>, spec: StartSpec) {
        {
            let mut state = self.lock();
            if state.started {
                self.outbox.push(&AgentMessage::Error {
                    message: "the function was already started".into(),
                });
                return;
            }
            state.started = true;
        }
        let launched = match &self.setup_error {
            Some(e) => Err(format!("the sandbox could not be set up: {e}")),
            None => self.launch(&spec).map_err(|e| e.to_string()),
        };
        if let Err(message) = launched {
            console::line(&format!("error: {message}"));
            let mut state = self.lock();
            state.failed = true;
            state.finish_without_process = true;
            self.outbox.push(&AgentMessage::StartFailed {
                message,
                last_lines: Vec::new(),
            });
            drop(state);
            self.changed.notify_all();
        }
    }

    /// Starts the process; Err only when none was created.
    fn launch(self: &Arc<Self>, spec: &StartSpec) -> Result<(), LaunchError> {
        if let Some(text) = &spec.resolv_conf {
            launch::write_in_root(&self.root, "etc", "resolv.conf", text)?;
        }
        let passwd = launch::read_in_root(&self.root, "/etc/passwd", MAX_ACCOUNT_FILE)?;
        let group = launch::read_in_root(&self.root, "/etc/group", MAX_ACCOUNT_FILE)?;
        let user = user::resolve(spec.user.as_deref(), passwd.as_deref(), group.as_deref())?;
        let env = launch::final_env(&spec.env, &user.home)?;
        let pipe = |stream| {
            launch::output_pipe().map_err(|cause| LaunchError::OutputPipe { stream, cause })
        };
        let (out_read, out_write) = pipe("stdout")?;
        let (err_read, err_write) = pipe("stderr")?;
        let plan = Plan::new(&Command {
            root: &self.root,
            argv: &spec.argv,
            env: &env,
            working_dir: &spec.working_dir,
            user: &user,
            stdout: std::os::fd::AsRawFd::as_raw_fd(&out_write),
            stderr: std::os::fd::AsRawFd::as_raw_fd(&err_write),
        })?;
        let Spawned { pid, exec_error } = launch::spawn(&plan, &self.root)?;
        // Only the function holds the write ends now: its exit is the pipes' EOF.
        drop(out_write);
        drop(err_write);
        let log_threads = [
            self.forward_output(out_read, LogStream::Stdout),
            self.forward_output(err_read, LogStream::Stderr),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut state = self.lock();
        state.pid = Some(pid);
        state.started_at = Some(Instant::now());
        state.log_threads = log_threads;
        match exec_error {
            Some(error) => {
                console::line(&format!("error: {error}"));
                state.failed = true;
                self.outbox.push(&AgentMessage::StartFailed {
                    message: error.to_string(),
                    last_lines: Vec::new(),
                });
            }
            None => {
                console::line(&format!("function started (pid {pid}): {:?}", spec.argv));
                let timeout = match spec.ready_timeout_ms {
                    0 => READY_TIMEOUT_MS,
                    ms => ms,
                };
                let me = self.clone();
                let _ = std::thread::Builder::new()
                    .name("ready".into())
                    .spawn(move || me.wait_until_ready(pid, host_duration(timeout)));
            }
        }
        let stop_pending = state.stop_pending.take();
        drop(state);
        self.changed.notify_all();
        if let Some(grace_ms) = stop_pending {
            self.stop(grace_ms);
        }
        Ok(())
    }

    /// Reads one output pipe until EOF, line by line into the outbox (see [`LogPipe`]: the
    /// bridge drains it too, so lines are queued ahead of the response and the request after
    /// them).
    /// None when the reader cannot be set up: then the pipe is closed and the function's
    /// writes fail (EPIPE) instead of blocking forever.
    fn forward_output(&self, pipe: OwnedFd, stream: LogStream) -> Option<JoinHandle<()>> {
        let log_pipe = match LogPipe::open(pipe, stream, self.outbox.clone()) {
            Ok(p) => p,
            Err(e) => {
                console::line(&format!(
                    "error: cannot read the function's {stream:?}: {e}"
                ));
                return None;
            }
        };
        let reader = log_pipe.clone();
        match std::thread::Builder::new()
            .name(format!("{stream:?}"))
            .spawn(move || reader.forward())
        {
            Ok(t) => Some(t),
            Err(e) => {
                console::line(&format!(
                    "error: cannot start the {stream:?} reader thread: {e}"
                ));
                log_pipe.unregister();
                None
            }
        }
    }

    /// Polls 127.0.0.1:9000 (every 0.25 ms for 20 ms, then doubling to 10 ms between tries)
    /// until it accepts, the function exits, or `timeout` passes — then the start has failed
    /// and the function's whole pid namespace is killed.
    fn wait_until_ready(&self, pid: i32, timeout: Duration) {
        let started = self.lock().started_at.unwrap_or_else(Instant::now);
        let deadline = started + timeout;
        let addr = SocketAddr::from(bridge::FUNCTION_ADDR);
        let mut interval = FIRST_PROBE_INTERVAL;
        loop {
            {
                let state = self.lock();
                if state.exited || state.failed {
                    return;
                }
            }
            if TcpStream::connect_timeout(&addr, PROBE_TIMEOUT).is_ok() {
                // Whatever the function printed before it listened goes out before Ready: a
                // start's log is complete when the start is.
                crate::output_drain::drain_output();
                let mut state = self.lock();
                if !state.exited && !state.failed {
                    state.ready = true;
                    let after = started.elapsed();
                    let after_ms = after.as_millis() as u64;
                    self.outbox.push(&AgentMessage::Ready {
                        after_ms,
                        after_us: Some(after.as_micros() as u64),
                    });
                    console::line(&format!("function ready after {after_ms} ms"));
                }
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                let mut state = self.lock();
                if !state.exited && !state.failed {
                    state.failed = true;
                    self.outbox.push(&AgentMessage::StartFailed {
                        message: NOT_LISTENING_MESSAGE.to_string(),
                        last_lines: self.outbox.last_lines(),
                    });
                    console::line(&format!(
                        "function did not listen on port 9000 within {} ms; stopping it",
                        timeout.as_millis()
                    ));
                    // SIGKILL to the namespace's init ends every process in it.
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                return;
            }
            let state = self.lock();
            let _ = self
                .changed
                .wait_timeout(state, interval.min(deadline - now))
                .unwrap_or_else(|p| p.into_inner());
            if started.elapsed() > STEADY_PROBING {
                interval = (interval * 2).min(MAX_PROBE_INTERVAL);
            }
        }
    }

    /// SIGTERM now, SIGKILL after `grace_ms`. (Like `docker stop`: a function that runs as its
    /// namespace's init without a SIGTERM handler ignores SIGTERM and is killed after the
    /// grace.) Before Start, Stop just ends the instance.
    fn stop(self: &Arc<Self>, grace_ms: u64) {
        let mut state = self.lock();
        match state.pid {
            Some(pid) if !state.exited => {
                console::line(&format!("stopping the function (grace {grace_ms} ms)"));
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                drop(state);
                let me = self.clone();
                let _ = std::thread::Builder::new()
                    .name("stop".into())
                    .spawn(move || {
                        let deadline = Instant::now() + host_duration(grace_ms);
                        let mut state = me.lock();
                        while !state.exited {
                            let now = Instant::now();
                            if now >= deadline {
                                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                                return;
                            }
                            state = me
                                .changed
                                .wait_timeout(state, deadline - now)
                                .unwrap_or_else(|p| p.into_inner())
                                .0;
                        }
                    });
            }
            Some(_) => {} // already ended; the final messages are on their way
            None if state.started && !state.finish_without_process => {
                // Start is creating the process right now; it stops it once it exists.
                state.stop_pending = Some(grace_ms);
            }
            None => {
                state.finish_without_process = true;
                drop(state);
                self.changed.notify_all();
            }
        }
    }

    /// The main thread: waits for the function to start and end (or for a reason to end
    /// without one), reaps it, sends the final messages and hands them to the host.
    pub fn run(&self) {
        let pid = {
            let mut state = self.lock();
            loop {
                if let Some(pid) = state.pid {
                    break Some(pid);
                }
                if state.finish_without_process {
                    break None;
                }
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
        };
        if let Some(pid) = pid {
            let FunctionExit { code, signal } = reap(pid);
            let threads = {
                let mut state = self.lock();
                state.exited = true;
                std::mem::take(&mut state.log_threads)
            };
            self.changed.notify_all();
            // Every line the function wrote goes out before its exit.
            for t in threads {
                let _ = t.join();
            }
            let how = describe_exit(code, signal);
            console::line(&format!("function exited: {how}"));
            let mut state = self.lock();
            if !state.ready && !state.failed {
                state.failed = true;
                self.outbox.push(&AgentMessage::StartFailed {
                    message: format!("the function exited ({how}) before it listened on port 9000"),
                    last_lines: self.outbox.last_lines(),
                });
            }
            self.outbox.push(&AgentMessage::Exited { code, signal });
        }
        if !self.outbox.drain(DRAIN_TIMEOUT) {
            console::line("error: no host took the last messages");
        }
        self.outbox.close(CLOSE_TIMEOUT);
    }
}

/// The longest timeout the agent honours: the host's numbers are capped, never overflowed.
const MAX_HOST_DURATION: Duration = Duration::from_secs(24 * 3600);

/// A duration the host asked for, in milliseconds, capped at [`MAX_HOST_DURATION`].
fn host_duration(ms: u64) -> Duration {
    Duration::from_millis(ms).min(MAX_HOST_DURATION)
}

/// How the function's process ended: an exit code, a signal, or neither when waiting failed.
struct FunctionExit {
    code: Option<i32>,
    signal: Option<i32>,
}

/// Waits for `pid` (reaping anything else that ends meanwhile).
fn reap(pid: i32) -> FunctionExit {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => {
                return FunctionExit {
                    code: Some(code),
                    signal: None,
                }
            }
            Ok(WaitStatus::Signaled(p, sig, _)) if p.as_raw() == pid => {
                return FunctionExit {
                    code: None,
                    signal: Some(sig as i32),
                }
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                console::line(&format!("error: waiting for the function failed: {e}"));
                return FunctionExit {
                    code: None,
                    signal: None,
                };
            }
        }
    }
}

/// "exit code 3", "killed by signal 9 (SIGKILL)".
pub fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by signal {sig} ({})", s.as_str()),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => "unknown exit".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_host_durations_are_capped() {
        assert_eq!(host_duration(1500), Duration::from_millis(1500));
        assert_eq!(host_duration(u64::MAX), MAX_HOST_DURATION);
        let _ = Instant::now() + host_duration(u64::MAX); // no overflow
    }

    #[test]
    fn exits_are_described_for_people() {
        assert_eq!(describe_exit(Some(3), None), "exit code 3");
        assert_eq!(describe_exit(None, Some(9)), "killed by signal 9 (SIGKILL)");
        assert_eq!(describe_exit(None, Some(200)), "killed by signal 200");
    }
}
