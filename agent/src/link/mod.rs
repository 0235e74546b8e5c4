//! The agent's end of the link, the host ↔ agent message stream on the control port (the
//! port's name in the protocol): the host connects (again after a restore or a reconnect: a new
//! connection replaces the old one), both sides say Hello with their protocol version, and the
//! host's messages go to the [`Supervisor`]. What the agent sends goes through the
//! [`Outbox`], which switches to the new connection after its Hello.

use std::io::BufReader;
use std::net::Shutdown;
use std::sync::Arc;
use std::time::Duration;

use fnvm_agent::protocol::{
    check_version, read_message, write_message, AgentMessage, HostMessage, ProtocolError,
    PROTOCOL_VERSION,
};

pub mod outbox;

use crate::console;
use crate::supervisor::Supervisor;
use crate::transport::{Listener, Stream};
use outbox::Outbox;

/// The agent's own version, sent in Hello.
pub const AGENT_VERSION: &str = concat!("fnvm-agent ", env!("CARGO_PKG_VERSION"));

/// Accepts link connections forever.
pub fn serve(listener: Box<dyn Listener>, supervisor: Arc<Supervisor>, outbox: Arc<Outbox>) {
    loop {
        match listener.accept() {
            Ok(stream) => {
                let (s, o) = (supervisor.clone(), outbox.clone());
                let _ = std::thread::Builder::new()
                    .name("control".into())
                    .spawn(move || converse(Arc::new(stream), &s, &o));
            }
            Err(e) => {
                console::line(&format!(
                    "error: accept on {} failed: {e}",
                    listener.describe()
                ));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// One link connection, from Hello to its end.
fn converse(stream: Arc<Stream>, supervisor: &Arc<Supervisor>, outbox: &Outbox) {
    let mut reader = BufReader::new(&*stream);
    let reply = |message: &AgentMessage| write_message(&mut &*stream, message);
    let ticket;
    match read_message::<_, HostMessage>(&mut reader) {
        Ok(Some(HostMessage::Hello { version })) => {
            // Taken before the answer: a host that saw this Hello answered and then connected
            // again must find the new connection in charge, however the threads run.
            ticket = outbox.ticket();
            let hello = AgentMessage::Hello {
                version: PROTOCOL_VERSION,
                agent: AGENT_VERSION.into(),
                uptime_ms: supervisor.uptime_ms(),
            };
            if reply(&hello).is_err() {
                return;
            }
            if let Err(e) = check_version(version) {
                let _ = reply(&AgentMessage::Error {
                    message: e.to_string(),
                });
                let _ = stream.shutdown(Shutdown::Both);
                return;
            }
        }
        Ok(Some(other)) => {
            let _ = reply(&AgentMessage::Error {
                message: format!("the first message must be hello, not {other:?}"),
            });
            return;
        }
        Ok(None) => return,
        Err(e) => {
            let _ = reply(&AgentMessage::Error {
                message: e.to_string(),
            });
            return;
        }
    }
    if !outbox.attach(ticket, stream.clone()) {
        return; // a later connection took over first; this one is closed
    }
    loop {
        match read_message::<_, HostMessage>(&mut reader) {
            Ok(Some(message)) => supervisor.handle(message),
            Ok(None) => break,
            // The bad line was consumed; the stream is still in step.
            Err(e @ ProtocolError::Malformed { .. }) => outbox.push(&AgentMessage::Error {
                message: e.to_string(),
            }),
            Err(_) => break,
        }
    }
    outbox.detach(ticket);
}
