//! The function port: every host stream accepted on [`FUNCTION_PORT`] is joined to a fresh TCP
//! connection to 127.0.0.1:9000 in the guest and copied both ways until each side is done,
//! half-close included (an EOF from one side becomes shutdown(SHUT_WR) on the other).
//!
//! Two small threads per stream, each moving data with splice(2) through its own pipe: bytes go
//! kernel to kernel, and memory per stream is fixed (one pipe buffer) however large the body.
//! A transport that cannot splice falls back to a fixed 64 KiB buffer.
//!
//! Function → host, each chunk waits for [`drain_output`] before it goes on: whatever the
//! function printed before its response is then stamped before the host gets the response,
//! so the host attributes those lines to the right request.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use fnvm_agent::protocol::FUNCTION_PORT;

use crate::output_drain::drain_output;
use crate::transport::{Listener, Stream};

/// Where the function's server listens inside the guest.
pub const FUNCTION_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], FUNCTION_PORT as u16);
/// Each bridging thread's stack: they only shuffle fds.
const THREAD_STACK: usize = 64 * 1024;
const CHUNK: usize = 64 * 1024;

/// Accepts host streams forever, one bridge per stream.
pub fn serve(listener: Box<dyn Listener>) {
    loop {
        match listener.accept() {
            Ok(host) => {
                let spawned = std::thread::Builder::new()
                    .name("bridge".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || bridge(host));
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

/// One host stream ⇄ one guest TCP connection.
fn bridge(host: Stream) {
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
    let (h, g) = (host.clone(), guest.clone());
    let upstream = std::thread::Builder::new()
        .name("bridge-up".into())
        .stack_size(THREAD_STACK)
        .spawn(move || {
            pump(h.as_fd(), g.as_fd(), || {});
            finish(&*g);
        });
    pump(guest.as_fd(), host.as_fd(), drain_output);
    finish(&*host);
    if let Ok(t) = upstream {
        let _ = t.join();
    }
}

/// After `src` → `dst` ended: the peer of `dst` sees EOF, the other direction goes on.
fn finish(dst: &impl AsRawFd) {
    shutdown(dst.as_raw_fd(), libc::SHUT_WR);
}

fn shutdown(fd: i32, how: i32) {
    // SAFETY: shutdown on a socket fd that the caller keeps open; no memory involved.
    unsafe { libc::shutdown(fd, how) };
}

/// Copies `src` to `dst` until EOF or an error, calling `before_write` after each chunk is
/// read and before it is written. On an error both sockets are shut down completely, so the
/// opposite direction's thread ends too.
pub(crate) fn pump(src: BorrowedFd, dst: BorrowedFd, before_write: fn()) {
    if splice_copy(src, dst, before_write).is_err() {
        shutdown(src.as_raw_fd(), libc::SHUT_RDWR);
        shutdown(dst.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// splice(2) through a pipe; where a socket cannot splice (EINVAL), the rest goes through a
/// fixed buffer, starting with whatever already sits in the pipe.
fn splice_copy(src: BorrowedFd, dst: BorrowedFd, before_write: fn()) -> io::Result<u64> {
    let (pipe_read, pipe_write) = pipe()?;
    let mut total = 0u64;
    loop {
        let n = match splice(src.as_raw_fd(), pipe_write.as_raw_fd(), CHUNK) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return buffered_copy(src, dst, before_write).map(|n| total + n)
            }
            Err(e) => return Err(e),
        };
        before_write();
        let mut left = n;
        while left > 0 {
            match splice(pipe_read.as_raw_fd(), dst.as_raw_fd(), left) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => left -= m,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    copy_exact(pipe_read.as_fd(), dst, left)?;
                    let rest = buffered_copy(src, dst, before_write)?;
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

fn buffered_copy(src: BorrowedFd, dst: BorrowedFd, before_write: fn()) -> io::Result<u64> {
    let src = std::fs::File::from(src.try_clone_to_owned()?);
    let dst = std::fs::File::from(dst.try_clone_to_owned()?);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = (&src).read(&mut buf)?;
        if n == 0 {
            return Ok(total);
        }
        before_write();
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
    fn what_cannot_splice_is_copied_through_a_buffer() {
        // The fallback for transports that cannot splice, on its own.
        let (mut a, b) = UnixStream::pair().unwrap();
        let (c, mut d) = UnixStream::pair().unwrap();
        a.write_all(b"through a buffer").unwrap();
        drop(a);
        assert_eq!(buffered_copy(b.as_fd(), c.as_fd(), || {}).unwrap(), 16);
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
            let n = splice_copy(b.as_fd(), c.as_fd(), || {}).unwrap();
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
