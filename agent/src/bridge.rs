//! The function port: every host stream accepted on [`FUNCTION_PORT`] is joined to a fresh TCP
//! connection to 127.0.0.1:9000 in the guest and copied both ways until each side is done,
//! half-close included (an EOF from one side becomes shutdown(SHUT_WR) on the other).
//!
//! Two small threads per stream (parked ones reused, see [`Threads`]), each moving data with
//! splice(2) through its own pipe: bytes go kernel to kernel, and memory per stream is fixed
//! (one pipe buffer) however large the body. A transport that cannot splice falls back to a
//! fixed 64 KiB buffer.
//!
//! Function → host, each chunk waits for [`drain_output`] before it goes on: whatever the
//! function printed before its response is then queued before the host gets the response.
//! Host → function, the head of each request (the first bytes of a stream, and the first after
//! the function answered) is copied out of the pipe and scanned for its `X-Scf-Request-Id`
//! ([`RequestHead`]); the agent drains the output and notes that request as the current one
//! before passing it on (the host hears of it just before its first line, see
//! [`Outbox::announce_request`]). So every line the host receives between two announcements
//! belongs to the first of them.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fnvm_agent::protocol::FUNCTION_PORT;

use crate::link::outbox::Outbox;
use crate::output_drain::drain_output;
use crate::request_head::RequestHead;
use crate::threads::Threads;
use crate::transport::{wait_readable, Listener, Stream};

/// Where the function's server listens inside the guest.
pub const FUNCTION_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], FUNCTION_PORT as u16);
/// Each bridging thread's stack: they only shuffle fds.
const THREAD_STACK: usize = 64 * 1024;
const CHUNK: usize = 64 * 1024;
/// A bridging thread parked this long with no stream to serve exits.
const THREAD_KEEP: Duration = Duration::from_secs(30);

/// Accepts host streams forever, one bridge per stream; `outbox` hears of each request.
pub fn serve(listener: Box<dyn Listener>, outbox: Arc<Outbox>) {
    let threads = Threads::new("bridge", THREAD_STACK, THREAD_KEEP);
    loop {
        match listener.accept() {
            Ok(host) => {
                let outbox = outbox.clone();
                let pumps = Arc::clone(&threads);
                let spawned = threads.run(Box::new(move || bridge(host, outbox, &pumps)));
                if let Err(e) = spawned {
                    crate::console::line(&format!("error: cannot start a bridge thread: {e}"));
                }
            }
            Err(e) => {
                // Out of fds or memory: back off instead of spinning; the host retries.
                crate::console::line(&format!(
                    "error: accept on {} failed: {e}",
                    listener.describe()
                ));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// What a pump does with each chunk between reading it and writing it on.
pub(crate) trait Relay {
    /// Whether the chunk just read must be shown to [`Relay::before_write`] (copied out of
    /// the pipe): asked once per chunk.
    fn wants_bytes(&mut self) -> bool {
        false
    }
    /// Runs before the chunk is written on; `bytes` is the chunk if it was wanted.
    fn before_write(&mut self, bytes: Option<&[u8]>);
}

/// Function → host: the output printed before a response goes ahead of it, and the next bytes
/// from the host start a new turn.
struct Responses<'a> {
    answered: Arc<AtomicBool>,
    /// The connection to the function, ACKed at once after every read (see [`quick_ack`]).
    guest: BorrowedFd<'a>,
}

impl Relay for Responses<'_> {
    fn before_write(&mut self, _: Option<&[u8]>) {
        quick_ack(self.guest);
        drain_output();
        // Before the write, not after: the host may send its next request as soon as it has
        // these bytes, and that request must be seen as a new turn.
        self.answered.store(true, Ordering::SeqCst);
    }
}

/// Host → function: each turn's request head names the request the function gets next.
struct Requests<'a> {
    answered: Arc<AtomicBool>,
    head: RequestHead,
    outbox: &'a Outbox,
}

impl Relay for Requests<'_> {
    fn wants_bytes(&mut self) -> bool {
        if self.answered.swap(false, Ordering::SeqCst) {
            self.head.next_turn();
        }
        self.head.scanning()
    }

    fn before_write(&mut self, bytes: Option<&[u8]>) {
        if let Some(id) = bytes.and_then(|b| self.head.feed(b)) {
            // What the function printed until now belongs to the requests before this one.
            drain_output();
            self.outbox.announce_request(id);
        }
    }
}

/// Moves data without looking at it (tests, and streams that carry no requests).
impl<F: FnMut()> Relay for F {
    fn before_write(&mut self, _: Option<&[u8]>) {
        self()
    }
}

/// One host stream ⇄ one guest TCP connection: function → host on this thread, host →
/// function on another of `threads`. The sockets close when both directions are done.
fn bridge(host: Stream, outbox: Arc<Outbox>, threads: &Arc<Threads>) {
    let guest = match TcpStream::connect(std::net::SocketAddr::from(FUNCTION_ADDR)) {
        Ok(g) => g,
        // Nothing listens (any more): closing the stream tells the host at once.
        Err(e) => {
            crate::console::line(&format!("cannot reach the function on 127.0.0.1:9000: {e}"));
            return;
        }
    };
    let _ = guest.set_nodelay(true);
    let host = Arc::new(host);
    let guest = Arc::new(guest);
    let answered = Arc::new(AtomicBool::new(false));
    let upstream = {
        let (host, guest, answered) = (host.clone(), guest.clone(), answered.clone());
        move || {
            let mut requests = Requests {
                answered,
                head: RequestHead::new(),
                outbox: &outbox,
            };
            pump(host.as_fd(), guest.as_fd(), &mut requests);
            finish(&*guest);
        }
    };
    if let Err(e) = threads.run(Box::new(upstream)) {
        // Dropping both sockets ends the stream: the host sees it closed.
        crate::console::line(&format!("error: cannot start a bridge thread: {e}"));
        return;
    }
    let mut responses = Responses {
        answered,
        guest: guest.as_fd(),
    };
    pump(guest.as_fd(), host.as_fd(), &mut responses);
    finish(&*host);
}

/// Sends the ACK for what was just read from the function now, not up to 40 ms later.
///
/// Why: a pooled connection is "interactive" to Linux (the agent sends a request, the function
/// answers), so its ACKs are delayed in the hope of riding on the agent's next data. A server
/// that writes its response head and body in two `write`s with Nagle on (Python's
/// `http.server`, and most servers users write) holds the body until the head is ACKed: every
/// warm call then waited for the delayed-ACK timer (measured: 42 ms instead of 1.5 ms). Setting
/// TCP_QUICKACK leaves that mode and flushes a pending ACK; Linux re-enters it on the next
/// exchange, so it is set after every read.
fn quick_ack(socket: BorrowedFd) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on a socket the caller keeps open, with a pointer to a live c_int and
    // its size; the kernel only reads it.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// After `src` → `dst` ended: the peer of `dst` sees EOF, the other direction goes on.
fn finish(dst: &impl AsRawFd) {
    shutdown(dst.as_raw_fd(), libc::SHUT_WR);
}

fn shutdown(fd: i32, how: i32) {
    // SAFETY: shutdown on a socket fd that the caller keeps open; no memory involved.
    unsafe { libc::shutdown(fd, how) };
}

/// Copies `src` to `dst` until EOF or an error, through `relay` between reading each chunk
/// and writing it. On an error both sockets are shut down completely, so the opposite
/// direction's thread ends too.
pub(crate) fn pump(src: BorrowedFd, dst: BorrowedFd, relay: &mut impl Relay) {
    if splice_copy(src, dst, relay).is_err() {
        shutdown(src.as_raw_fd(), libc::SHUT_RDWR);
        shutdown(dst.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// splice(2) through a pipe; where a socket cannot splice (EINVAL), the rest goes through a
/// fixed buffer, starting with whatever already sits in the pipe. A chunk the relay wants to
/// see is read out of the pipe and written from a buffer.
fn splice_copy(src: BorrowedFd, dst: BorrowedFd, relay: &mut impl Relay) -> io::Result<u64> {
    let (pipe_read, pipe_write) = pipe()?;
    let mut total = 0u64;
    let mut seen = Vec::new();
    loop {
        wait_readable(src)?;
        let n = match splice(src.as_raw_fd(), pipe_write.as_raw_fd(), CHUNK) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return buffered_copy(src, dst, relay).map(|n| total + n)
            }
            Err(e) => return Err(e),
        };
        if relay.wants_bytes() {
            seen.resize(n, 0);
            read_exact(pipe_read.as_fd(), &mut seen)?;
            relay.before_write(Some(&seen));
            write_all(dst, &seen)?;
            total += n as u64;
            continue;
        }
        relay.before_write(None);
        let mut left = n;
        while left > 0 {
            match splice(pipe_read.as_raw_fd(), dst.as_raw_fd(), left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    copy_exact(pipe_read.as_fd(), dst, left)?;
                    let rest = buffered_copy(src, dst, relay)?;
                    return Ok(total + n as u64 + rest);
                }
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Moves exactly `len` bytes from `src` to `dst` through a buffer.
fn copy_exact(src: BorrowedFd, dst: BorrowedFd, mut len: usize) -> io::Result<()> {
    let src = std::fs::File::from(src.try_clone_to_owned()?);
    let dst = std::fs::File::from(dst.try_clone_to_owned()?);
    let mut buf = vec![0u8; CHUNK];
    while len > 0 {
        let want = len.min(buf.len());
        let n = (&src).read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        (&dst).write_all(&buf[..n])?;
        len -= n;
    }
    Ok(())
}

/// Fills `buf` from `src` (a pipe that holds at least that much).
fn read_exact(src: BorrowedFd, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match nix::unistd::read(src, &mut buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn write_all(dst: BorrowedFd, buf: &[u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match nix::unistd::write(dst, &buf[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: splice between two fds the caller keeps open; null offsets (streams).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    Ok((r, w))
}

fn buffered_copy(src: BorrowedFd, dst: BorrowedFd, relay: &mut impl Relay) -> io::Result<u64> {
    let src = std::fs::File::from(src.try_clone_to_owned()?);
    let dst = std::fs::File::from(dst.try_clone_to_owned()?);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        wait_readable(src.as_fd())?;
        let n = (&src).read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        let seen = relay.wants_bytes().then_some(&buf[..n]);
        relay.before_write(seen);
        (&dst).write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;
    use std::os::unix::net::UnixStream;

    #[test]
    fn each_request_on_a_kept_alive_stream_is_announced_before_the_function_gets_it() {
        use crate::link::outbox::Outbox;
        use fnvm_agent::protocol::{read_message, AgentMessage, LogStream};
        use std::io::BufRead;

        let outbox = Outbox::new();
        let (host, bridge_host) = UnixStream::pair().unwrap();
        let (bridge_function, function) = UnixStream::pair().unwrap();
        let answered = Arc::new(AtomicBool::new(false));
        let mut requests = Requests {
            answered: answered.clone(),
            head: RequestHead::new(),
            outbox: &outbox,
        };
        // A Unix socket stands in for the function's TCP connection: TCP_QUICKACK fails on
        // it, harmlessly (the result is not looked at).
        let mut responses = Responses {
            answered,
            guest: bridge_function.as_fd(),
        };
        // The function: logs which request it is serving as soon as it has read its head
        // (after its 2-byte body), then answers.
        let function_outbox = outbox.clone();
        let server = std::thread::spawn(move || {
            let mut reader = std::io::BufReader::new(function.try_clone().unwrap());
            let mut out = function;
            for n in 1..=3 {
                let mut line = String::new();
                while line != "\r\n" {
                    line.clear();
                    reader.read_line(&mut line).unwrap();
                }
                let mut body = [0u8; 2];
                reader.read_exact(&mut body).unwrap();
                function_outbox.push_log(LogStream::Stdout, format!("serving {n}"));
                out.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .unwrap();
            }
        });
        std::thread::scope(|scope| {
            scope.spawn(|| pump(bridge_host.as_fd(), bridge_function.as_fd(), &mut requests));
            scope.spawn(|| pump(bridge_function.as_fd(), bridge_host.as_fd(), &mut responses));
            let mut host_reader = std::io::BufReader::new(host.try_clone().unwrap());
            let mut host_writer = host.try_clone().unwrap();
            for n in 1..=3 {
                let head = format!("POST /event-invoke HTTP/1.1\r\nX-Scf-Request-Id: r{n}\r\n");
                // The head in two writes (the id's line may arrive before its end), then the
                // rest with a body that names another id.
                host_writer.write_all(head.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                host_writer
                    .write_all(b"content-length: 2\r\n\r\n{}")
                    .unwrap();
                let mut response = [0u8; 40];
                host_reader.read_exact(&mut response).unwrap();
                assert!(response.ends_with(b"ok"));
            }
            server.join().unwrap();
            host.shutdown(Shutdown::Both).unwrap();
            bridge_function.shutdown(Shutdown::Both).unwrap();
        });
        let (agent_end, control) = UnixStream::pair().unwrap();
        let sender = outbox.clone();
        std::thread::spawn(move || sender.run_sender());
        outbox.attach(outbox.ticket(), Arc::new(Stream::from_fd(agent_end.into())));
        assert!(outbox.drain(Duration::from_secs(5)));
        outbox.close(Duration::from_millis(10));
        let mut reader = std::io::BufReader::new(control);
        let mut got = Vec::new();
        while let Ok(Some(m)) = read_message::<_, AgentMessage>(&mut reader) {
            got.push(match m {
                AgentMessage::Request { id } => format!("request {id}"),
                AgentMessage::Log { line, .. } => line,
                other => format!("{other:?}"),
            });
        }
        assert_eq!(
            got,
            [
                "request r1",
                "serving 1",
                "request r2",
                "serving 2",
                "request r3",
                "serving 3"
            ]
        );
    }

    #[test]
    fn what_cannot_splice_is_copied_through_a_buffer() {
        // The fallback for transports that cannot splice, on its own.
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        a.write_all(b"through a buffer").unwrap();
        drop(a);
        assert_eq!(buffered_copy(b.as_fd(), c.as_fd(), &mut || {}).unwrap(), 16);
        drop(c);
        let mut got = String::new();
        d.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through a buffer");
    }

    #[test]
    fn splice_copies_a_large_body_and_reports_eof() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let block = vec![0x5au8; 1 << 20];
            for _ in 0..20 {
                a.write_all(&block).unwrap();
            }
        });
        let copier = std::thread::spawn(move || {
            let n = splice_copy(b.as_fd(), c.as_fd(), &mut || {}).unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            n
        });
        let mut got = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = d.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            assert!(buf[..n].iter().all(|&x| x == 0x5a));
            got += n as u64;
        }
        writer.join().unwrap();
        assert_eq!(copier.join().unwrap(), 20 << 20);
        assert_eq!(got, 20 << 20);
    }
}
