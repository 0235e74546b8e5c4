//! The host end of the agent's control stream, shared by both sandboxes: connect (retrying
//! until the agent answers), Hello, Start, then one reader thread that forwards log lines,
//! reports the start's outcome and records the function's exit, and once the function is
//! ready a pinger that keeps measuring the guest's clock ([`GuestClock`]), so log stamps are
//! given on the host's time line.

pub mod clock;

use std::collections::VecDeque;
use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fnvm_agent::protocol::{
    self, AgentMessage, HostMessage, StartSpec, CONTROL_PORT, NOT_LISTENING_MESSAGE,
    PROTOCOL_VERSION,
};

use clock::{host_now_us, ClockSource, GuestClock, PING_INTERVAL};
use crate::sandbox::instance::child::describe_signal;
use crate::sandbox::transport::HostTransport;
use crate::sandbox::{ExitReport, LogLine, SandboxError};

/// How many of the function's last log lines errors and exit reports carry.
pub const LAST_LINES: usize = 20;
/// How long the agent may take to answer after its stream accepted: it answers at once.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an Exited may take to follow a StartFailed.
const EXIT_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// Slack the host gives the agent beyond the ready timeout before it stops waiting itself.
const READY_SLACK: Duration = Duration::from_secs(10);

/// What the host knows about how an instance ended, and the function's last lines.
pub struct ExitState {
    inner: Mutex<ExitInner>,
    ended: Condvar,
    /// The host is stopping the instance: whatever ends it now is reported as "stopped".
    stopping: std::sync::atomic::AtomicBool,
    /// Extra words for an exit (e.g. "the function ran out of memory"), asked when it happens.
    explain: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

#[derive(Default)]
struct ExitInner {
    report: Option<ExitReport>,
    last_lines: VecDeque<String>,
}

impl ExitState {
    pub fn new(explain: impl Fn() -> Option<String> + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(ExitState {
            inner: Mutex::new(ExitInner::default()),
            ended: Condvar::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            explain: Box::new(explain),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExitInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_line(&self, line: &str) {
        let mut inner = self.lock();
        if inner.last_lines.len() == LAST_LINES {
            inner.last_lines.pop_front();
        }
        inner.last_lines.push_back(line.to_string());
    }

    pub fn last_lines(&self) -> Vec<String> {
        self.lock().last_lines.iter().cloned().collect()
    }

    /// From now on the instance ends because the host stops it.
    pub fn mark_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Records how the instance ended, unless an earlier record exists; returns the record.
    pub fn record(&self, code: Option<i32>, signal: Option<i32>, reason: String) -> ExitReport {
        let extra = (self.explain)();
        let mut inner = self.lock();
        if let Some(report) = &inner.report {
            return report.clone();
        }
        let reason = match extra {
            Some(extra) => format!("{reason}; {extra}"),
            None => reason,
        };
        let reason =
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) && reason != "stopped" {
                format!("stopped ({reason})")
            } else {
                reason
            };
        let report = ExitReport {
            code,
            signal,
            last_lines: inner.last_lines.iter().cloned().collect(),
            reason,
        };
        inner.report = Some(report.clone());
        self.ended.notify_all();
        report
    }

    pub fn get(&self) -> Option<ExitReport> {
        self.lock().report.clone()
    }

    pub fn wait(&self) -> ExitReport {
        let mut inner = self.lock();
        loop {
            if let Some(report) = &inner.report {
                return report.clone();
            }
            inner = self.ended.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReport> {
        let inner = self.lock();
        let (inner, _) = self
            .ended
            .wait_timeout_while(inner, timeout, |i| i.report.is_none())
            .unwrap_or_else(|p| p.into_inner());
        inner.report.clone()
    }
}

/// How a start ended, as the reader thread saw it.
enum Startup {
    /// With the agent's `after_ms` (a start; none for a resume's Refreshed).
    Ready(Option<u64>),
    Failed(SandboxError),
    /// The control stream ended or broke before any outcome.
    Lost(String),
}

/// When the agent answered, as its start or resume saw it: the phases of a cold start.
#[derive(Debug, Clone, Copy)]
pub struct AgentTimes {
    /// The host's time when the agent's Hello arrived.
    pub hello_at: Instant,
    /// The guest's uptime when the agent answered it (a VM: kernel boot → agent; a process
    /// sandbox: the host's uptime, meaningless).
    pub uptime_ms: u64,
    /// Agent's start of the function → something listening on port 9000 (a start only).
    pub listening_after_ms: Option<u64>,
}

/// A started instance's control stream.
pub struct Control {
    stream: UnixStream,
    agent: AgentTimes,
    /// Every message to the agent goes through this lock: whole lines, never interleaved.
    writer: Arc<Mutex<UnixStream>>,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// Dropping the sender stops the pinger.
    pinger: Mutex<Option<(mpsc::Sender<()>, JoinHandle<()>)>>,
}

/// Whether the sandbox is still alive: `Some(why not)` once it has died.
pub type Liveness<'a> = &'a dyn Fn() -> Option<(Option<i32>, Option<i32>, String)>;

/// How long a restored agent may take to answer Refresh: it is running already.
const REFRESH_TIMEOUT: Duration = Duration::from_secs(10);
/// Host entropy sent to a restored guest.
const REFRESH_ENTROPY_BYTES: usize = 64;

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
) -> Result<Control, SandboxError> {
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
) -> Result<Control, SandboxError> {
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
) -> Result<Control, SandboxError> {
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
            Ok((writer, reader, uptime_ms)) => {
                let agent = AgentTimes {
                    hello_at: Instant::now(),
                    uptime_ms,
                    listening_after_ms: None,
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
    let control = Control {
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
        Ok(Startup::Ready(after_ms)) => {
            if source == ClockSource::Own {
                control.start_pinger(clock);
            }
            Ok(control.with_listening(after_ms))
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

/// Why a greeting did not complete.
enum Greeting {
    /// The stream ended or was reset: worth another connection while the sandbox lives.
    Lost(String),
    Failed(SandboxError),
}

/// Hello both ways on a fresh control stream; returns the writing half and the (buffered)
/// reading half.
/// Says Hello on `stream` and reads the agent's: the writer, the reader, and the guest's
/// uptime the agent reported.
fn greet(stream: &UnixStream) -> Result<(UnixStream, BufReader<UnixStream>, u64), Greeting> {
    let setup = |e: std::io::Error| {
        Greeting::Failed(SandboxError::Agent(format!(
            "cannot set up the control stream: {e}"
        )))
    };
    stream
        .set_read_timeout(Some(HELLO_TIMEOUT))
        .map_err(setup)?;
    let mut writer = stream.try_clone().map_err(setup)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(setup)?);
    let lost = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        )
    };
    let hello = HostMessage::Hello {
        version: PROTOCOL_VERSION,
    };
    match protocol::write_message(&mut writer, &hello) {
        Ok(()) => {}
        Err(protocol::ProtocolError::Io(e)) if lost(&e) => {
            return Err(Greeting::Lost(e.to_string()))
        }
        Err(e) => {
            return Err(Greeting::Failed(SandboxError::Agent(format!(
                "cannot greet the agent: {e}"
            ))))
        }
    }
    let uptime_ms = match protocol::read_message::<_, AgentMessage>(&mut reader) {
        Ok(Some(AgentMessage::Hello {
            version,
            agent,
            uptime_ms,
        })) => {
            protocol::check_version(version).map_err(|e| {
                Greeting::Failed(SandboxError::Agent(format!("incompatible agent: {e}")))
            })?;
            tracing::debug!("agent {agent} speaks protocol {version}");
            uptime_ms
        }
        Ok(Some(other)) => {
            return Err(Greeting::Failed(SandboxError::Agent(format!(
                "the agent answered Hello with {other:?}"
            ))))
        }
        Ok(None) => return Err(Greeting::Lost("closed".into())),
        Err(protocol::ProtocolError::Io(e)) if lost(&e) => {
            return Err(Greeting::Lost(e.to_string()))
        }
        Err(e) => {
            return Err(Greeting::Failed(SandboxError::Agent(format!(
                "no Hello from the agent: {e}"
            ))))
        }
    };
    // The reader goes on to the read loop: the agent may send queued messages (log lines)
    // right after its Hello, and they may sit in this buffer already.
    Ok((writer, reader, uptime_ms))
}

/// Connects to the control port, retrying while the agent comes up; fails early if the sandbox
/// dies first.
fn connect_control(
    transport: &HostTransport,
    exit: &ExitState,
    dead: Liveness<'_>,
    timeout: Duration,
) -> Result<UnixStream, SandboxError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        match transport.connect(CONTROL_PORT) {
            Ok(stream) => return Ok(stream),
            Err(e) => {
                if dead().is_some() {
                    return Err(ended_before_ready(
                        exit,
                        dead,
                        "the sandbox ended before the agent answered",
                    ));
                }
                if Instant::now() >= deadline {
                    return Err(SandboxError::Agent(format!(
                        "the agent did not answer on its control port within {} ms: {e}",
                        timeout.as_millis()
                    )));
                }
            }
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// The error for a sandbox that ended before Ready, with the best reason we can get: the
/// agent's Exited record, else the sandbox process's status (waiting briefly for it).
fn ended_before_ready(exit: &ExitState, dead: Liveness<'_>, fallback: &str) -> SandboxError {
    if let Some(report) = exit.get() {
        return SandboxError::Exited(report);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some((code, signal, reason)) = dead() {
            return SandboxError::Exited(exit.record(code, signal, reason));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    SandboxError::Exited(exit.record(None, None, fallback.to_string()))
}

fn read_loop(
    mut reader: BufReader<UnixStream>,
    on_log: Arc<dyn Fn(LogLine) + Send + Sync>,
    exit: Arc<ExitState>,
    clock: Arc<GuestClock>,
    startup: SyncSender<Startup>,
) {
    let mut startup = Some(startup);
    let mut outcome = |o: Startup| {
        if let Some(tx) = startup.take() {
            let _ = tx.send(o);
        }
    };
    // The latest request the agent said reaches the function: the one each line was read under.
    let mut request: Option<Arc<str>> = None;
    loop {
        let message = match protocol::read_message::<_, AgentMessage>(&mut reader) {
            Ok(Some(m)) => m,
            Ok(None) => {
                outcome(Startup::Lost("the agent closed the control stream".into()));
                break;
            }
            Err(e) => {
                tracing::warn!("control stream: {e}");
                outcome(Startup::Lost(e.to_string()));
                break;
            }
        };
        match message {
            AgentMessage::Log {
                stream,
                unix_time_us,
                line,
            } => {
                exit.push_line(&line);
                on_log(LogLine {
                    stream,
                    unix_time_us: clock.to_host_us(unix_time_us, host_now_us()),
                    line,
                    after_request: request.clone(),
                });
            }
            AgentMessage::Request { id } => request = Some(id.into()),
            AgentMessage::Pong { seq, unix_time_us } => {
                clock.pong(seq, unix_time_us, host_now_us());
            }
            AgentMessage::Ready { after_ms } => {
                tracing::debug!("function ready after {after_ms} ms");
                outcome(Startup::Ready(Some(after_ms)));
            }
            AgentMessage::StartFailed {
                message,
                last_lines,
            } => {
                let err = if message == NOT_LISTENING_MESSAGE {
                    SandboxError::NotListening {
                        message,
                        last_lines,
                    }
                } else {
                    SandboxError::StartFailed {
                        message,
                        last_lines,
                    }
                };
                outcome(Startup::Failed(err));
            }
            AgentMessage::Exited { code, signal } => {
                let reason = match (code, signal) {
                    (Some(c), _) => format!("the function exited with code {c}"),
                    (None, Some(s)) => {
                        format!("the function was {}", describe_signal(s))
                    }
                    (None, None) => "the function ended".to_string(),
                };
                let report = exit.record(code, signal, reason);
                outcome(Startup::Failed(SandboxError::Exited(report)));
            }
            AgentMessage::Error { message } => {
                tracing::warn!("agent error: {message}");
                outcome(Startup::Failed(SandboxError::Agent(message)));
            }
            // A restored instance is ready again once its agent applied the Refresh.
            AgentMessage::Refreshed => outcome(Startup::Ready(None)),
            AgentMessage::Hello { .. } => {
                tracing::debug!("control message {message:?}");
            }
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.close();
    }
}

impl AgentTimes {
    /// Where a start's time went, `began` being when the sandbox started: up to the agent's
    /// answer (named `up_to_agent`), of that the guest's boot (a VM), then the function's start
    /// to its listening.
    pub fn phases(
        &self,
        began: Instant,
        up_to_agent: &'static str,
        guest_boot: bool,
    ) -> Vec<(&'static str, Duration)> {
        let mut phases = vec![(up_to_agent, self.hello_at.saturating_duration_since(began))];
        if guest_boot {
            phases.push((
                "of which guest boot → agent",
                Duration::from_millis(self.uptime_ms),
            ));
        }
        if let Some(ms) = self.listening_after_ms {
            phases.push(("agent → function listening", Duration::from_millis(ms)));
        }
        phases
    }
}

impl Control {
    /// When the agent answered this start or resume.
    pub fn agent_times(&self) -> AgentTimes {
        self.agent
    }

    fn with_listening(mut self, after_ms: Option<u64>) -> Self {
        self.agent.listening_after_ms = after_ms;
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
                *self.pinger.lock().unwrap_or_else(|p| p.into_inner()) = Some((stop_tx, thread))
            }
            Err(e) => tracing::warn!(
                "cannot start the clock pinger; log stamps stay on the guest's clock: {e}"
            ),
        }
    }

    /// Closes the stream and joins the reader.
    pub fn close(&self) {
        if let Some((stop, thread)) = self.pinger.lock().unwrap_or_else(|p| p.into_inner()).take() {
            drop(stop);
            let _ = thread.join();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// The other end of a control stream, speaking the protocol by hand with a clock `ahead_us`
    /// ahead of the host's (a VM whose clock drifted). It prints "printed now" after answering
    /// `log_after_pongs` pings (0: right after Ready, before any ping).
    fn scripted_agent(
        listener: UnixListener,
        ahead_us: u64,
        log_after_pongs: usize,
    ) -> JoinHandle<()> {
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            let guest_now = || host_now_us() + ahead_us;
            let mut answered = 0;
            while let Ok(Some(message)) = protocol::read_message::<_, HostMessage>(&mut reader) {
                let reply = match message {
                    HostMessage::Hello { version } => AgentMessage::Hello {
                        version,
                        agent: "scripted".into(),
                        uptime_ms: 1,
                    },
                    HostMessage::Start(_) => AgentMessage::Ready { after_ms: 1 },
                    HostMessage::Ping { seq } => AgentMessage::Pong {
                        seq,
                        unix_time_us: guest_now(),
                    },
                    other => panic!("unexpected {other:?}"),
                };
                // The host closes the stream once it has the line: a ping answered after
                // that has nobody to go to, which ends the script.
                if protocol::write_message(&mut writer, &reply).is_err() {
                    break;
                }
                let now_is_the_time = match reply {
                    AgentMessage::Ready { .. } => log_after_pongs == 0,
                    AgentMessage::Pong { .. } => {
                        answered += 1;
                        answered == log_after_pongs
                    }
                    _ => false,
                };
                if now_is_the_time {
                    protocol::write_message(
                        &mut writer,
                        &AgentMessage::Log {
                            stream: protocol::LogStream::Stdout,
                            unix_time_us: guest_now(),
                            line: "printed now".into(),
                        },
                    )
                    .expect("the host reads until it has the line");
                }
            }
        })
    }

    /// How much earlier than its arrival a line of an agent 5 s ahead is stamped on the host's
    /// time line, printed after `log_after_pongs` clock answers.
    fn early_by_of_a_line_from_an_agent_5_s_ahead(log_after_pongs: usize) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(crate::sandbox::transport::unix_port_path(
            dir.path(),
            CONTROL_PORT,
        ))
        .unwrap();
        let agent = scripted_agent(listener, 5_000_000, log_after_pongs);
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let on_log: Arc<dyn Fn(LogLine) + Send + Sync> = Arc::new(move |line: LogLine| {
            let _ = tx.lock().unwrap().send((line, host_now_us()));
        });
        let control = start(
            &HostTransport::Unix {
                dir: dir.path().to_path_buf(),
            },
            // A VM's agent, reached through a Unix socket here.
            ClockSource::Own,
            &StartSpec {
                argv: vec!["/f".into()],
                env: vec![],
                working_dir: "/".into(),
                user: None,
                ready_timeout_ms: 1000,
            },
            on_log,
            ExitState::new(|| None),
            &|| None,
            Duration::from_secs(5),
            &|| Ok(()),
        )
        .expect("the scripted agent starts");
        let (line, received_us) = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the scripted agent's line");
        assert_eq!(line.line, "printed now");
        control.close();
        agent.join().unwrap();
        received_us as i64 - line.unix_time_us as i64
    }

    #[test]
    fn log_stamps_of_an_agent_whose_clock_is_off_arrive_on_the_hosts_time_line() {
        // Stamped 5 s ahead by the guest; on the host's line it was printed just before it
        // arrived. The estimate is good to half a round trip either way; the test allows a
        // generous margin for a loaded machine, far inside the 5 s it corrects.
        let early_by = early_by_of_a_line_from_an_agent_5_s_ahead(2);
        assert!((-100_000..500_000).contains(&early_by), "{early_by} µs");
    }

    #[test]
    fn a_line_printed_before_the_first_clock_answer_is_not_placed_in_the_future() {
        // Right after Ready, before the host measured the clock: the raw stamp is 5 s ahead,
        // which would give the line to a request not yet made. It is placed at its arrival.
        let early_by = early_by_of_a_line_from_an_agent_5_s_ahead(0);
        assert!((0..500_000).contains(&early_by), "{early_by} µs");
    }
}
