//! The start of every link: connect to the agent's control port (retrying while the agent comes
//! up, failing early if the sandbox dies first), then Hello both ways with the protocol version.

use std::io::BufReader;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use fnvm_agent::protocol::{self, AgentMessage, HostMessage, CONTROL_PORT, PROTOCOL_VERSION};

use crate::sandbox::exit::{ended_before_ready, ExitState, Liveness};
use crate::sandbox::transport::HostTransport;
use crate::sandbox::SandboxError;

/// How long the agent may take to answer after its stream accepted: it answers at once.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream the agent has said Hello on.
pub struct Greeted {
    /// The writing half.
    pub writer: UnixStream,
    /// The reading half, buffered: it may hold messages the agent sent right after its Hello.
    pub reader: BufReader<UnixStream>,
    /// The guest's uptime the agent reported in its Hello.
    pub uptime_ms: u64,
}

/// Why a greeting did not complete.
pub enum Greeting {
    /// The stream ended or was reset: worth another connection while the sandbox lives.
    Lost(String),
    Failed(SandboxError),
}

/// Hello both ways on a fresh control stream; returns the writing half and the (buffered)
/// reading half.
/// Says Hello on `stream` and reads the agent's: the writer, the reader, and the guest's
/// uptime the agent reported.
pub fn greet(stream: &UnixStream) -> Result<Greeted, Greeting> {
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
    Ok(Greeted {
        writer,
        reader,
        uptime_ms,
    })
}

/// Connects to the control port, retrying while the agent comes up; fails early if the sandbox
/// dies first.
pub(super) fn connect_control(
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
