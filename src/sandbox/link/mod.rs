//! The host end of the agent's link (the control stream of the agent protocol), shared by both
//! sandboxes: connect (retrying until the agent answers), Hello, Start, then one reader thread
//! that forwards log lines, reports the start's outcome and records the function's exit, and
//! once the function is ready a pinger that keeps measuring the guest's clock ([`GuestClock`]),
//! so log stamps are given on the host's time line.

pub mod clock;
// Public only for the fuzz targets (fuzz/fuzz_targets/host_link.rs): the agent's side of the
// stream is hostile input, and these two read it.
#[doc(hidden)]
pub mod greeting;
#[doc(hidden)]
pub mod reader;

#[cfg(test)]
mod tests;

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fnvm_agent::protocol::{self, HostMessage, StartSpec};

use clock::{host_now_us, ClockSource, GuestClock, PING_INTERVAL};
use greeting::{connect_control, greet, Greeted, Greeting};
use reader::{read_loop, Startup};

use crate::sandbox::exit::{ended_before_ready, ExitState, Liveness};
use crate::sandbox::transport::HostTransport;
use crate::sandbox::{ExitReport, LogLine, SandboxError};

/// How long an Exited may take to follow a StartFailed.
const EXIT_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// Slack the host gives the agent beyond the ready timeout before it stops waiting itself.
const READY_SLACK: Duration = Duration::from_secs(10);

/// When the agent answered, as its start or resume saw it: the phases of a cold start.
#[derive(Debug, Clone, Copy)]
pub struct AgentTimes {
    /// The host's time when the agent's Hello arrived.
    pub hello_at: Instant,
    /// The guest's uptime when the agent answered it (a VM: kernel boot → agent; a process
    /// sandbox: the host's uptime, meaningless).
    pub uptime_ms: u64,
    /// Agent's start of the function → something listening on port 9000 (a start only).
    pub listening_after: Option<Duration>,
}

/// A started instance's link to its agent (the agent protocol's control stream).
pub struct Link {
    stream: UnixStream,
    agent: AgentTimes,
    /// Every message to the agent goes through this lock: whole lines, never interleaved.
    writer: Arc<Mutex<UnixStream>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// The clock pinger, once the function is ready (a VM's link only).
    pinger: Mutex<Option<Pinger>>,
}

/// How long a restored agent may take to answer Refresh: it is running already.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);
/// Host entropy sent to a restored guest.
const REFRESH_ENTROPY_BYTES: usize = 64;

/// The thread that keeps measuring the guest's clock.
struct Pinger {
    /// Dropping the sender stops the thread.
    stop: mpsc::Sender<()>,
    thread: JoinHandle<()>,
}

/// What the host does between the agent's Hello and its Start. The agent accepts the control
/// stream only once its set-up (mounting the disks) is done, so this runs after the agent's
/// last use of anything the function must not have and before the function exists.
pub type BeforeStart<'a> = &'a dyn Fn() -> Result<(), SandboxError>;

/// Connects to the agent, starts the function and waits until it is ready or has failed.
/// `connect_timeout` bounds how long the agent may take to come up (a VM boots first);
/// `clock` says whose clock the agent stamps its lines with.
// Each argument is one independent input of the start; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
pub fn start(
    transport: &HostTransport,
    clock: ClockSource,
    spec: &StartSpec,
    on_log: Arc<dyn Fn(LogLine) + Send + Sync>,
    exit: Arc<ExitState>,
    dead: Liveness<'_>,
    connect_timeout: Duration,
    before_start: BeforeStart<'_>,
) -> Result<Link, SandboxError> {
    let wait = Duration::from_millis(spec.ready_timeout_ms) + READY_SLACK;
    converse(
        transport,
        clock,
        &HostMessage::Start(spec.clone()),
        on_log,
        exit,
        dead,
        connect_timeout,
        wait,
        before_start,
    )
}

/// Reconnects to the agent of a VM restored from a snapshot (its function is running and was
/// ready when the snapshot was taken): Hello, then Refresh with fresh host entropy and the
/// host's time, so no two restored instances share RNG state or a stale clock. Returns once
/// the agent has applied it.
pub fn resume(
    transport: &HostTransport,
    on_log: Arc<dyn Fn(LogLine) + Send + Sync>,
    exit: Arc<ExitState>,
    dead: Liveness<'_>,
    connect_timeout: Duration,
) -> Result<Link, SandboxError> {
    converse(
        transport,
        ClockSource::Own,
        &refresh_message()?,
        on_log,
        exit,
        dead,
        connect_timeout,
        REFRESH_TIMEOUT,
        &|| Ok(()),
    )
}

/// A Refresh carrying host entropy (getrandom) and the host's wall-clock time.
pub fn refresh_message() -> Result<HostMessage, SandboxError> {
    let mut entropy = [0u8; REFRESH_ENTROPY_BYTES];
    let mut filled = 0;
    while filled < entropy.len() {
        // SAFETY: getrandom writes at most `len - filled` bytes into the array's tail.
        let n = unsafe {
            libc::getrandom(
                entropy[filled..].as_mut_ptr().cast(),
                entropy.len() - filled,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SandboxError::setup("cannot read host entropy", e));
        }
        filled += n as usize;
    }
    let unix_time_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    Ok(HostMessage::Refresh {
        entropy_hex: hex::encode(entropy),
        unix_time_ns,
    })
}

/// Connect, Hello, send `request` (Start or Refresh), then hand the stream to the reader thread
/// and wait up to `wait` for the request's outcome (Ready or Refreshed, or a failure).
// Each argument is one independent input of the conversation; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
fn converse(
    transport: &HostTransport,
    source: ClockSource,
    request: &HostMessage,
    on_log: Arc<dyn Fn(LogLine) + Send + Sync>,
    exit: Arc<ExitState>,
    dead: Liveness<'_>,
    connect_timeout: Duration,
    wait: Duration,
    before_request: BeforeStart<'_>,
) -> Result<Link, SandboxError> {
    let agent_error =
        |what: &str, e: &dyn std::fmt::Display| SandboxError::Agent(format!("{what}: {e}"));
    // A stream reset before the agent's Hello is retried until the deadline: after a restore
    // the guest may still be handling the vsock transport reset when the first connection
    // arrives, and that reset can take the new stream with it.
    let deadline = Instant::now() + connect_timeout;
    let (stream, mut writer, reader, agent) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let stream = connect_control(transport, &exit, dead, left)?;
        match greet(&stream) {
            Ok(Greeted {
                writer,
                reader,
                uptime_ms,
            }) => {
                let agent = AgentTimes {
                    hello_at: Instant::now(),
                    uptime_ms,
                    listening_after: None,
                };
                break (stream, writer, reader, agent);
            }
            Err(Greeting::Lost(why)) if Instant::now() < deadline && dead().is_none() => {
                tracing::debug!("control stream lost before the agent's Hello ({why}); retrying");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(Greeting::Lost(why)) => {
                return Err(ended_before_ready(
                    &exit,
                    dead,
                    &format!("the control stream ended before the agent's Hello ({why})"),
                ))
            }
            Err(Greeting::Failed(e)) => return Err(e),
        }
    };
    stream
        .set_read_timeout(None)
        .map_err(|e| agent_error("cannot set up the control stream", &e))?;
    before_request()?;
    protocol::write_message(&mut writer, request)
        .map_err(|e| agent_error("cannot send a request to the agent", &e))?;

    let (tx, rx) = mpsc::sync_channel(1);
    let reader_exit = exit.clone();
    let clock = Arc::new(GuestClock::new(source));
    let reader_clock = Arc::clone(&clock);
    let reader = std::thread::Builder::new()
        .name("fnvm-control".into())
        .spawn(move || read_loop(reader, on_log, reader_exit, reader_clock, tx))
        .map_err(|e| agent_error("cannot start the control reader", &e))?;
    let link = Link {
        stream,
        writer: Arc::new(Mutex::new(writer)),
        reader: Mutex::new(Some(reader)),
        pinger: Mutex::new(None),
        agent,
    };

    match rx.recv_timeout(wait) {
        // A VM's clock is measured in the background (the host's own needs no measuring):
        // stamps only place lines in time for the reader (which request a line belongs to goes
        // by the agent's Request messages), so the instance is handed out at once.
        Ok(Startup::Ready(after)) => {
            if source == ClockSource::Own {
                link.start_pinger(clock);
            }
            Ok(link.with_listening(after))
        }
        // The agent sends StartFailed before Exited: when the function itself ended, report
        // the exit (code, signal) with the agent's words.
        Ok(Startup::Failed(SandboxError::StartFailed {
            message,
            last_lines,
        })) => match exit.wait_timeout(EXIT_AFTER_FAILURE) {
            Some(report) if report.code.is_some() || report.signal.is_some() => {
                Err(SandboxError::Exited(ExitReport {
                    reason: message,
                    last_lines,
                    ..report
                }))
            }
            _ => Err(SandboxError::StartFailed {
                message,
                last_lines,
            }),
        },
        Ok(Startup::Failed(err)) => Err(err),
        Ok(Startup::Lost(why)) => Err(ended_before_ready(
            &exit,
            dead,
            &format!("the sandbox ended before the function was ready ({why})"),
        )),
        Err(RecvTimeoutError::Disconnected) => Err(ended_before_ready(
            &exit,
            dead,
            "the sandbox ended before the function was ready",
        )),
        Err(RecvTimeoutError::Timeout) => Err(SandboxError::Agent(format!(
            "the agent reported neither ready nor failure within {} ms",
            wait.as_millis()
        ))),
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

impl AgentTimes {
    /// Where a start's time went, `began` being when the sandbox started: up to the agent's
    /// answer (named `up_to_agent`), of that the VMM's set-up and the guest's boot (a VM), then
    /// the function's start to its listening.
    pub fn phases(
        &self,
        began: Instant,
        up_to_agent: &'static str,
        guest_boot: bool,
    ) -> Vec<(&'static str, Duration)> {
        let up = self.hello_at.saturating_duration_since(began);
        let mut phases = vec![(up_to_agent, up)];
        if guest_boot {
            // The guest's uptime counts from its clock's start, so what comes before it is the
            // VMM's own set-up (and the kernel's first steps before timekeeping).
            let boot = Duration::from_millis(self.uptime_ms);
            phases.push((
                "of which VMM set-up → guest clock start",
                up.saturating_sub(boot),
            ));
            phases.push(("of which guest boot → agent", boot));
        }
        if let Some(after) = self.listening_after {
            phases.push(("agent → function listening", after));
        }
        phases
    }
}

impl Link {
    /// When the agent answered this start or resume.
    pub fn agent_times(&self) -> AgentTimes {
        self.agent
    }

    fn with_listening(mut self, after: Option<Duration>) -> Self {
        self.agent.listening_after = after;
        self
    }

    /// Asks the agent to stop the function (SIGTERM, SIGKILL after `grace`) and waits a little
    /// longer than that for its exit; the caller kills the sandbox afterwards either way.
    pub fn stop(&self, exit: &ExitState, grace: Duration) {
        if exit.get().is_none() {
            let sent = send(
                &self.writer,
                &HostMessage::Stop {
                    grace_ms: grace.as_millis() as u64,
                },
            );
            if sent.is_ok() {
                exit.wait_timeout(grace + Duration::from_millis(200));
            }
        }
        self.close();
    }

    /// Pings the agent a few times at once (a first estimate before requests come), then
    /// every [`PING_INTERVAL`], until the stream is closed or breaks.
    fn start_pinger(&self, clock: Arc<GuestClock>) {
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let writer = Arc::clone(&self.writer);
        let spawned = std::thread::Builder::new()
            .name("fnvm-clock".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                let mut pings = 0u32;
                loop {
                    let seq = clock.ping_sent(host_now_us());
                    if send(&writer, &HostMessage::Ping { seq }).is_err() {
                        return;
                    }
                    pings += 1;
                    let pause = match pings {
                        1..=3 => Duration::from_millis(20),
                        _ => PING_INTERVAL,
                    };
                    match stop_rx.recv_timeout(pause) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                }
            });
        match spawned {
            Ok(thread) => {
                *self.pinger.lock().unwrap_or_else(|p| p.into_inner()) = Some(Pinger {
                    stop: stop_tx,
                    thread,
                })
            }
            Err(e) => tracing::warn!(
                "cannot start the clock pinger; log stamps stay on the guest's clock: {e}"
            ),
        }
    }

    /// Closes the stream and joins the reader.
    pub fn close(&self) {
        if let Some(pinger) = self.pinger.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(pinger.stop);
            let _ = pinger.thread.join();
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = reader.join();
        }
    }
}

/// Writes one whole message under the writer's lock.
fn send(writer: &Mutex<UnixStream>, message: &HostMessage) -> Result<(), protocol::ProtocolError> {
    let mut stream = writer.lock().unwrap_or_else(|p| p.into_inner());
    protocol::write_message(&mut *stream, message)
}
