//! Everything the agent tells the host, in order, through whichever control connection is
//! current. Messages queue while no host is connected (or while it is slow); log lines are
//! bounded by [`MAX_QUEUED_LOG_BYTES`] — past that the oldest lines are dropped and counted, so
//! the function never waits on the host and the agent's memory stays bounded. Other messages
//! (Ready, Exited, ...) are never dropped.

use std::collections::VecDeque;
use std::io::Write;
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use fnvm_agent::protocol::{AgentMessage, LogStream};

use crate::transport::Stream;

/// Queued log text beyond this drops the oldest lines.
pub const MAX_QUEUED_LOG_BYTES: usize = 4 << 20;
/// How many of the function's last lines start failures carry.
pub const LAST_LINES: usize = 20;
/// Each remembered last line is cut to this, so a failure message stays far below the
/// protocol's message limit.
const LAST_LINE_BYTES: usize = 2048;
/// One write to the host carries at most about this much.
const BATCH_BYTES: usize = 64 * 1024;

struct Entry {
    bytes: Vec<u8>,
    is_log: bool,
}

struct Connection {
    id: u64,
    stream: Arc<Stream>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Entry>,
    queued_log_bytes: usize,
    dropped_lines: u64,
    /// Taken off the queue and being written; put back if the write fails.
    in_flight: Vec<Entry>,
    conn: Option<Connection>,
    next_id: u64,
    last_lines: VecDeque<String>,
    /// The request the function serves now, not told to the host yet: see
    /// [`Outbox::announce_request`].
    unannounced: Option<Vec<u8>>,
}

pub struct Outbox {
    state: Mutex<State>,
    changed: Condvar,
}

impl Outbox {
    pub fn new() -> Arc<Self> {
        Arc::new(Outbox {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a message that must reach the host.
    pub fn push(&self, message: &AgentMessage) {
        let bytes = encode(message);
        self.lock().queue.push_back(Entry {
            bytes,
            is_log: false,
        });
        self.changed.notify_all();
    }

    /// Notes that the function is about to serve request `id`. The host attributes each line
    /// to the request announced last, so the announcement only has to precede the first line
    /// printed after it: it is queued then ([`Outbox::push_log`]), and a request that prints
    /// nothing costs no message, no wake-up here and none on the host — the warm path of most
    /// calls. The caller drains the function's output first, so every earlier line is queued
    /// (under the earlier announcement) before this one is noted.
    pub fn announce_request(&self, id: String) {
        let bytes = encode(&AgentMessage::Request { id });
        self.lock().unannounced = Some(bytes);
    }

    /// Queues one line of the function's output, stamped now (after the announcement of the
    /// request it belongs to, if that is still to be sent).
    pub fn push_log(&self, stream: LogStream, line: String) {
        let remembered = truncate(&line, LAST_LINE_BYTES);
        let bytes = encode(&AgentMessage::Log {
            stream,
            unix_time_us: unix_time_us(),
            line,
        });
        let mut state = self.lock();
        if let Some(request) = state.unannounced.take() {
            state.queue.push_back(Entry {
                bytes: request,
                is_log: false,
            });
        }
        if state.last_lines.len() == LAST_LINES {
            state.last_lines.pop_front();
        }
        state.last_lines.push_back(remembered);
        state.queued_log_bytes += bytes.len();
        state.queue.push_back(Entry {
            bytes,
            is_log: true,
        });
        while state.queued_log_bytes > MAX_QUEUED_LOG_BYTES {
            let Some(oldest) = state.queue.iter().position(|e| e.is_log) else {
                break;
            };
            if let Some(dropped) = state.queue.remove(oldest) {
                state.queued_log_bytes -= dropped.bytes.len();
                state.dropped_lines += 1;
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    /// The function's last lines (both streams, in order).
    pub fn last_lines(&self) -> Vec<String> {
        self.lock().last_lines.iter().cloned().collect()
    }

    /// A connection's place in line, taken when its Hello is answered: of two connections the
    /// later Hello wins, whichever thread gets to [`Self::attach`] first.
    pub fn ticket(&self) -> u64 {
        let mut state = self.lock();
        state.next_id += 1;
        state.next_id
    }

    /// Makes `stream` (holding `ticket`) the host connection, closing the one it replaces. A
    /// connection whose Hello came before the current one's is closed instead: false.
    pub fn attach(&self, ticket: u64, stream: Arc<Stream>) -> bool {
        let mut state = self.lock();
        if state.conn.as_ref().is_some_and(|c| c.id > ticket) {
            drop(state);
            let _ = stream.shutdown(Shutdown::Both);
            return false;
        }
        if let Some(old) = state.conn.replace(Connection { id: ticket, stream }) {
            let _ = old.stream.shutdown(Shutdown::Both);
        }
        drop(state);
        self.changed.notify_all();
        true
    }

    /// Forgets connection `id` (it ended); a newer one is left alone.
    pub fn detach(&self, id: u64) {
        let mut state = self.lock();
        if state.conn.as_ref().is_some_and(|c| c.id == id) {
            if let Some(old) = state.conn.take() {
                let _ = old.stream.shutdown(Shutdown::Both);
            }
        }
        drop(state);
        self.changed.notify_all();
    }

    /// The sender thread: writes queued messages to the current connection, forever.
    pub fn run_sender(&self) {
        loop {
            let mut state = self.lock();
            while state.conn.is_none() || state.queue.is_empty() {
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            let (id, stream) = match &state.conn {
                Some(c) => (c.id, c.stream.clone()),
                None => continue,
            };
            let mut batch = Vec::with_capacity(BATCH_BYTES);
            if state.dropped_lines > 0 {
                let note = format!(
                    "fnvm-agent: {} log lines dropped: the host did not read them in time",
                    state.dropped_lines
                );
                state.dropped_lines = 0;
                batch.extend_from_slice(&encode(&AgentMessage::Log {
                    stream: LogStream::Stderr,
                    unix_time_us: unix_time_us(),
                    line: note,
                }));
            }
            while batch.len() < BATCH_BYTES {
                let Some(entry) = state.queue.pop_front() else {
                    break;
                };
                if entry.is_log {
                    state.queued_log_bytes -= entry.bytes.len();
                }
                batch.extend_from_slice(&entry.bytes);
                state.in_flight.push(entry);
            }
            drop(state);

            let written = (&*stream).write_all(&batch);

            let mut state = self.lock();
            let in_flight = std::mem::take(&mut state.in_flight);
            if written.is_err() {
                // The host went away mid-write: the next host gets these messages again.
                for entry in in_flight.into_iter().rev() {
                    if entry.is_log {
                        state.queued_log_bytes += entry.bytes.len();
                    }
                    state.queue.push_front(entry);
                }
                if state.conn.as_ref().is_some_and(|c| c.id == id) {
                    state.conn = None;
                }
                let _ = stream.shutdown(Shutdown::Both);
            }
            drop(state);
            self.changed.notify_all();
        }
    }

    /// Waits until every queued message has been written to a host, or `timeout` passes.
    pub fn drain(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if state.queue.is_empty() && state.in_flight.is_empty() && state.dropped_lines == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Ends the conversation: half-closes the current connection and waits (up to `timeout`)
    /// for the host to close its end, so everything sent has been read before the agent exits
    /// or the VM resets (a vsock packet still queued in the guest would be lost).
    pub fn close(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        let Some(id) = state.conn.as_ref().map(|c| c.id) else {
            return;
        };
        if let Some(c) = &state.conn {
            let _ = c.stream.shutdown(Shutdown::Write);
        }
        while state.conn.as_ref().is_some_and(|c| c.id == id) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn encode(message: &AgentMessage) -> Vec<u8> {
    // Serializing these plain enums cannot fail; fall back to an empty Error just in case.
    let mut bytes = serde_json::to_vec(message)
        .unwrap_or_else(|_| br#"{"type":"error","message":""}"#.to_vec());
    bytes.push(b'\n');
    bytes
}

fn truncate(line: &str, max: usize) -> String {
    if line.len() <= max {
        return line.to_string();
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_string()
}

pub fn unix_time_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fnvm_agent::protocol::read_message;
    use std::io::BufReader;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Arc<Stream>, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Arc::new(Stream::from_fd(a.into())), b)
    }

    fn read_all(host: UnixStream) -> Vec<AgentMessage> {
        let mut reader = BufReader::new(host);
        let mut out = Vec::new();
        while let Ok(Some(m)) = read_message::<_, AgentMessage>(&mut reader) {
            out.push(m);
        }
        out
    }

    #[test]
    fn messages_queued_before_a_host_arrive_in_order_after_it_connects() {
        let outbox = Outbox::new();
        let sender = outbox.clone();
        std::thread::spawn(move || sender.run_sender());
        outbox.push_log(LogStream::Stdout, "one".into());
        outbox.push(&AgentMessage::Ready {
            after_ms: 5,
            after_us: None,
        });
        outbox.push_log(LogStream::Stderr, "two".into());
        let (agent_end, host) = pair();
        outbox.attach(outbox.ticket(), agent_end);
        assert!(outbox.drain(Duration::from_secs(5)));
        outbox.close(Duration::from_millis(10));
        let got = read_all(host);
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            matches!(&got[0], AgentMessage::Log { line, stream: LogStream::Stdout, .. } if line == "one")
        );
        assert_eq!(
            got[1],
            AgentMessage::Ready {
                after_ms: 5,
                after_us: None
            }
        );
        assert!(matches!(&got[2], AgentMessage::Log { line, .. } if line == "two"));
        assert_eq!(outbox.last_lines(), ["one", "two"]);
    }

    /// The host hears of a request just before its first line, and not at all of requests
    /// that printed nothing: it attributes every line exactly as if each had been announced.
    #[test]
    fn a_request_is_announced_before_its_first_line_and_a_silent_one_not_at_all() {
        let outbox = Outbox::new();
        let sender = outbox.clone();
        std::thread::spawn(move || sender.run_sender());
        outbox.announce_request("silent".into());
        outbox.announce_request("r1".into());
        outbox.push_log(LogStream::Stdout, "one of r1".into());
        outbox.push_log(LogStream::Stderr, "two of r1".into());
        outbox.announce_request("also-silent".into());
        outbox.announce_request("r2".into());
        outbox.push_log(LogStream::Stdout, "one of r2".into());
        let (agent_end, host) = pair();
        outbox.attach(outbox.ticket(), agent_end);
        assert!(outbox.drain(Duration::from_secs(5)));
        outbox.close(Duration::from_millis(10));
        let got: Vec<String> = read_all(host)
            .into_iter()
            .map(|m| match m {
                AgentMessage::Request { id } => format!("request {id}"),
                AgentMessage::Log { line, .. } => line,
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                "request r1",
                "one of r1",
                "two of r1",
                "request r2",
                "one of r2"
            ]
        );
    }

    #[test]
    fn without_a_host_old_log_lines_are_dropped_but_never_other_messages() {
        let outbox = Outbox::new();
        outbox.push(&AgentMessage::Exited {
            code: Some(0),
            signal: None,
        });
        let line = "x".repeat(1000);
        for _ in 0..(MAX_QUEUED_LOG_BYTES / 1000 + 500) {
            outbox.push_log(LogStream::Stdout, line.clone());
        }
        {
            let state = outbox.lock();
            assert!(state.queued_log_bytes <= MAX_QUEUED_LOG_BYTES);
            assert!(state.dropped_lines >= 500);
            assert!(!state.queue[0].is_log, "the Exited message was dropped");
        }
        let sender = outbox.clone();
        std::thread::spawn(move || sender.run_sender());
        let (agent_end, host) = pair();
        let reader = std::thread::spawn(move || read_all(host));
        outbox.attach(outbox.ticket(), agent_end);
        assert!(outbox.drain(Duration::from_secs(10)));
        outbox.close(Duration::from_millis(10));
        let got = reader.join().unwrap();
        assert!(
            matches!(&got[0], AgentMessage::Log { line, stream: LogStream::Stderr, .. }
            if line.contains("log lines dropped"))
        );
        assert!(matches!(got[1], AgentMessage::Exited { .. }));
    }

    #[test]
    fn a_new_connection_replaces_the_old_one() {
        let outbox = Outbox::new();
        let sender = outbox.clone();
        std::thread::spawn(move || sender.run_sender());
        let (first, first_host) = pair();
        assert!(outbox.attach(outbox.ticket(), first));
        let (second, second_host) = pair();
        assert!(outbox.attach(outbox.ticket(), second));
        // The first host sees its stream closed.
        assert!(read_all(first_host).is_empty());
        outbox.push(&AgentMessage::Refreshed);
        assert!(outbox.drain(Duration::from_secs(5)));
        outbox.close(Duration::from_millis(10));
        assert_eq!(read_all(second_host), [AgentMessage::Refreshed]);
    }

    #[test]
    fn of_two_connections_the_later_hello_wins_whichever_attaches_first() {
        let outbox = Outbox::new();
        let sender = outbox.clone();
        std::thread::spawn(move || sender.run_sender());
        // The first Hello was answered, then its thread was not scheduled until after the
        // second connection's Hello was answered and attached.
        let (first, first_host) = pair();
        let first_ticket = outbox.ticket();
        let (second, second_host) = pair();
        assert!(outbox.attach(outbox.ticket(), second));
        assert!(!outbox.attach(first_ticket, first), "the older Hello lost");
        assert!(read_all(first_host).is_empty(), "and its stream was closed");
        outbox.push(&AgentMessage::Refreshed);
        assert!(outbox.drain(Duration::from_secs(5)));
        outbox.close(Duration::from_millis(10));
        assert_eq!(read_all(second_host), [AgentMessage::Refreshed]);
    }
}
