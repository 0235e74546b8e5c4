//! The link's reader thread: everything the agent says after the start request, in order (log
//! lines, the request each line was read under, clock answers, the start's outcome, the
//! function's exit).

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::time::Duration;

use fnvm_agent::protocol::{self, AgentMessage, NOT_LISTENING_MESSAGE};

use super::clock::{host_now_us, GuestClock};
use crate::sandbox::exit::{describe_signal, ExitState};
use crate::sandbox::{LogLine, SandboxError};

/// How a start ended, as the reader thread saw it.
pub enum Startup {
    /// With the agent's start → listening time (a start; none for a resume's Refreshed).
    Ready(Option<Duration>),
    Failed(SandboxError),
    /// The control stream ended or broke before any outcome.
    Lost(String),
}

/// Reads the agent's messages until the link closes or breaks: the first outcome of the start
/// (or resume) goes to `startup`, log lines to `on_log` stamped on the host's time line, the
/// function's exit into `exit`.
pub fn read_loop(
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
            AgentMessage::Ready { after_ms, after_us } => {
                tracing::debug!("function ready after {after_ms} ms");
                let after = after_us.map_or(Duration::from_millis(after_ms), Duration::from_micros);
                outcome(Startup::Ready(Some(after)));
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
