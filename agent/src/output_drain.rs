//! The function's output pipes, read only under one lock per pipe, so the bridge can queue
//! everything the function printed so far ahead of what it sends next.
//!
//! The host attributes each log line to the request the agent last announced
//! (`AgentMessage::Request`). A line the function printed while serving one request has been
//! written to its pipe before the next request reaches it, so if the bridge drains the pipes
//! ([`drain_output`]) before announcing a request, every earlier line is queued ahead of the
//! announcement — however late the reader thread is scheduled. Every read of a pipe happens
//! under its lock, so once the bridge holds the lock no byte is "read but not yet queued"
//! anywhere. The bridge drains before passing on response bytes too, so a response is never
//! sent ahead of the lines printed before it.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fnvm_agent::protocol::LogStream;

use crate::lines::LineSplitter;
use crate::link::outbox::Outbox;

/// One read takes at most this much (a default pipe holds 64 KiB).
const READ_CHUNK: usize = 64 * 1024;

/// The function's output pipes that have not ended yet.
static PIPES: Mutex<Vec<Arc<LogPipe>>> = Mutex::new(Vec::new());

/// One of the function's output streams: a non-blocking pipe and its partial line.
pub struct LogPipe {
    stream: LogStream,
    outbox: Arc<Outbox>,
    reader: Mutex<Reader>,
}

struct Reader {
    pipe: File,
    splitter: LineSplitter,
    buf: Vec<u8>,
    /// EOF was read and the last partial line sent: nothing more will come.
    ended: bool,
}

/// What one read brought.
enum Read1 {
    Data(usize),
    Empty,
    Ended,
}

impl LogPipe {
    /// Takes the read end of an output pipe (made non-blocking here; the function's write
    /// end stays blocking) and registers it for [`drain_output`].
    pub fn open(pipe: OwnedFd, stream: LogStream, outbox: Arc<Outbox>) -> io::Result<Arc<Self>> {
        set_nonblocking(&pipe)?;
        let log_pipe = Arc::new(LogPipe {
            stream,
            outbox,
            reader: Mutex::new(Reader {
                pipe: File::from(pipe),
                splitter: LineSplitter::new(),
                buf: vec![0u8; READ_CHUNK],
                ended: false,
            }),
        });
        lock(&PIPES).push(log_pipe.clone());
        Ok(log_pipe)
    }

    fn lock(&self) -> MutexGuard<'_, Reader> {
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reader thread: waits for output without the lock, reads it under the lock, until
    /// EOF (the last writer closed the pipe); then sends the last partial line and leaves the
    /// registry.
    pub fn forward(self: Arc<Self>) {
        let fd = self.lock().pipe.as_raw_fd();
        // SAFETY: the pipe belongs to this drain's reader, which lives as long as `self`.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        loop {
            if crate::transport::wait_readable(fd).is_err() {
                // Out of memory or the like: look again shortly instead of spinning.
                std::thread::sleep(Duration::from_millis(10));
            }
            let mut reader = self.lock();
            if reader.ended {
                break;
            }
            // One read per turn: a function that never stops printing cannot keep the
            // bridge from the lock.
            if let Read1::Ended = self.read_once(&mut reader, READ_CHUNK) {
                break;
            }
        }
        self.unregister();
    }

    /// Leaves the registry; the pipe closes when the last reference goes.
    pub fn unregister(self: &Arc<Self>) {
        lock(&PIPES).retain(|p| !Arc::ptr_eq(p, self));
    }

    /// Reads and sends (as complete lines) everything in the pipe now — no more, so a
    /// function printing without pause cannot hold the caller here.
    fn drain(&self) {
        let mut reader = self.lock();
        if reader.ended {
            return;
        }
        let mut left = match bytes_in_pipe(&reader.pipe) {
            Ok(n) => n,
            // Cannot happen on a pipe; one read is still better than none.
            Err(_) => READ_CHUNK,
        };
        while left > 0 {
            let want = left.min(READ_CHUNK);
            match self.read_once(&mut reader, want) {
                Read1::Data(n) => left = left.saturating_sub(n),
                Read1::Empty | Read1::Ended => break,
            }
        }
    }

    /// One non-blocking read of at most `max` bytes, its complete lines pushed to the outbox;
    /// at EOF the last partial line too.
    fn read_once(&self, reader: &mut Reader, max: usize) -> Read1 {
        let Reader {
            pipe,
            splitter,
            buf,
            ended,
        } = reader;
        let mut emit = |line: String| self.outbox.push_log(self.stream, line);
        let max = max.min(buf.len());
        loop {
            return match pipe.read(&mut buf[..max]) {
                Ok(0) => {
                    splitter.finish(&mut emit);
                    *ended = true;
                    Read1::Ended
                }
                Ok(n) => {
                    splitter.push(&buf[..n], &mut emit);
                    Read1::Data(n)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read1::Empty,
                // Not expected on a pipe: end the stream as at EOF rather than spin.
                Err(_) => {
                    splitter.finish(&mut emit);
                    *ended = true;
                    Read1::Ended
                }
            };
        }
    }
}

/// Sends every complete line now in the function's output pipes to the outbox, stamped now.
/// The bridge calls this after reading bytes from the function and before writing them to
/// the host. Costs one lock and one FIONREAD per pipe when they are empty.
pub fn drain_output() {
    // Lock order: registry, then a pipe (the reader thread never holds both).
    let pipes = lock(&PIPES);
    for pipe in pipes.iter() {
        pipe.drain();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl on an fd the caller owns; no memory involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How many bytes wait in the pipe.
fn bytes_in_pipe(pipe: &File) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int, which lives on this frame; the fd is open.
    if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    use std::process::{Command, Stdio};

    fn registered(pipe: &Arc<LogPipe>) -> bool {
        lock(&PIPES).iter().any(|p| Arc::ptr_eq(p, pipe))
    }

    #[test]
    fn a_line_printed_before_a_response_is_stamped_by_the_drain_without_the_reader_thread() {
        // The reader thread never runs here (as if starved): only drain_output can read.
        let outbox = Outbox::new();
        let (read_end, write_end) = crate::launch::output_pipe().unwrap();
        let pipe = LogPipe::open(read_end, LogStream::Stderr, outbox.clone()).unwrap();
        let (function_side, mut agent_side) = UnixStream::pair().unwrap();
        let mut child = Command::new("sh")
            .args(["-c", "echo line-7 >&2; printf 'partial' >&2; echo response"])
            .stdin(Stdio::null())
            .stdout(Stdio::from(OwnedFd::from(function_side)))
            .stderr(Stdio::from(write_end))
            .spawn()
            .unwrap();
        let mut response = String::new();
        BufReader::new(&mut agent_side)
            .read_line(&mut response)
            .unwrap();
        assert_eq!(response, "response\n");
        assert!(outbox.last_lines().is_empty(), "nothing read the pipe yet");
        drain_output();
        // The complete line is stamped; the unfinished one waits for its end.
        assert_eq!(outbox.last_lines(), ["line-7"]);
        child.wait().unwrap();
        pipe.clone().forward(); // EOF: the partial line goes out, the pipe leaves the registry
        assert_eq!(outbox.last_lines(), ["line-7", "partial"]);
        assert!(!registered(&pipe));
        drain_output(); // an ended pipe is left alone
        assert_eq!(outbox.last_lines(), ["line-7", "partial"]);
    }

    #[test]
    fn through_the_bridge_every_response_follows_its_lines_while_the_reader_races() {
        // A function answering requests on a socket, printing one line before each answer;
        // the bridge's function → host pump carries the answers, the reader thread runs too.
        let outbox = Outbox::new();
        let (read_end, write_end) = crate::launch::output_pipe().unwrap();
        let pipe = LogPipe::open(read_end, LogStream::Stdout, outbox.clone()).unwrap();
        let reader = std::thread::spawn({
            let pipe = pipe.clone();
            move || pipe.forward()
        });
        let (function_side, agent_side) = UnixStream::pair().unwrap();
        let stdin = OwnedFd::from(function_side.try_clone().unwrap());
        let mut child = Command::new("sh")
            .args([
                "-c",
                "while read n; do echo \"line-$n\" >&2; echo \"done-$n\"; done",
            ])
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(OwnedFd::from(function_side)))
            .stderr(Stdio::from(write_end))
            .spawn()
            .unwrap();
        let (bridge_host_side, host) = UnixStream::pair().unwrap();
        let from_function = agent_side.try_clone().unwrap();
        let bridge = std::thread::spawn(move || {
            use std::os::fd::AsFd;
            crate::bridge::pump(
                from_function.as_fd(),
                bridge_host_side.as_fd(),
                &mut drain_output,
            )
        });
        let mut to_function = agent_side;
        let mut host = BufReader::new(host);
        const REQUESTS: usize = crate::link::outbox::LAST_LINES;
        for n in 1..=REQUESTS {
            writeln!(to_function, "{n}").unwrap();
            let mut response = String::new();
            host.read_line(&mut response).unwrap();
            assert_eq!(response, format!("done-{n}\n"));
            assert_eq!(
                outbox.last_lines().last().map(String::as_str),
                Some(format!("line-{n}").as_str()),
                "request {n}: its line was not stamped before its response"
            );
        }
        // EOF for the function (the bridge's clone of this socket stays open).
        to_function.shutdown(std::net::Shutdown::Write).unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        bridge.join().unwrap();
        let want: Vec<String> = (1..=REQUESTS).map(|n| format!("line-{n}")).collect();
        assert_eq!(outbox.last_lines(), want, "lines lost or doubled");
        assert!(!registered(&pipe));
    }

    #[test]
    fn a_function_that_never_stops_printing_cannot_hold_the_drain() {
        let outbox = Outbox::new();
        let (read_end, write_end) = crate::launch::output_pipe().unwrap();
        let pipe = LogPipe::open(read_end, LogStream::Stdout, outbox.clone()).unwrap();
        let reader = std::thread::spawn({
            let pipe = pipe.clone();
            move || pipe.forward()
        });
        let mut child = Command::new("yes")
            .stdout(Stdio::from(write_end))
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while outbox.last_lines().len() < crate::link::outbox::LAST_LINES {
            assert!(std::time::Instant::now() < deadline, "yes printed nothing");
            drain_output();
        }
        for _ in 0..200 {
            drain_output(); // each call reads at most what was in the pipe when it began
        }
        child.kill().unwrap();
        child.wait().unwrap();
        reader.join().unwrap();
        let last = outbox.last_lines();
        assert_eq!(last.len(), crate::link::outbox::LAST_LINES);
        assert!(last.iter().all(|l| l == "y"), "{last:?}");
        assert!(!registered(&pipe));
    }
}
