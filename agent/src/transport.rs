//! Byte streams between the host and the agent: one listener per guest port, AF_VSOCK in a VM
//! and a Unix socket `<socket-dir>/<port>.sock` in the process sandbox. Everything above this
//! module sees only [`Listener`] and [`Stream`], so both sandboxes run the same agent code.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// How many pending connections each listener queues (the function port sees bursts).
const BACKLOG: i32 = 1024;

/// A connected, bidirectional byte stream (a vsock or Unix stream socket).
#[derive(Debug)]
pub struct Stream {
    fd: OwnedFd,
}

impl Stream {
    pub fn from_fd(fd: OwnedFd) -> Self {
        Stream { fd }
    }

    /// Half- or fully closes the stream; the peer sees end-of-file for what was shut down.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        let how = match how {
            Shutdown::Read => libc::SHUT_RD,
            Shutdown::Write => libc::SHUT_WR,
            Shutdown::Both => libc::SHUT_RDWR,
        };
        // SAFETY: shutdown on a socket fd this value owns; no memory is passed.
        if unsafe { libc::shutdown(self.fd.as_raw_fd(), how) } == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        wait_readable(self.fd.as_fd())?;
        loop {
            // SAFETY: reads into `buf`, whose length bounds the write; the fd is owned by self.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: send reads at most buf.len() bytes from `buf`; MSG_NOSIGNAL turns a
            // closed peer into EPIPE instead of a signal.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
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

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Sleeps until `fd` has data, its end or an error to read.
///
/// Why not simply block in the read: a thread asleep in a read of a Unix (or vsock) stream is
/// woken by every wake-up of that socket, also the "room to write again" one that comes each
/// time the host takes bytes another thread sent on it. In the bridge every response woke the
/// request pump for nothing (measured: 2.95 context switches per request where 2 do the work;
/// waiting here: 2.0, and 18.6k → 23.0k requests/s); the link's reader was woken by each batch
/// of log lines the host took. poll(2)'s
/// wake-ups carry what changed and only POLLIN-ish ones wake it. One syscall is far cheaper
/// than a context switch.
pub fn wait_readable(fd: BorrowedFd) -> io::Result<()> {
    let mut entry = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    loop {
        // SAFETY: poll on one pollfd that lives on this stack for the call; no timeout.
        let n = unsafe { libc::poll(&mut entry, 1, -1) };
        if n >= 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Accepts host connections on one guest port.
pub trait Listener: Send + Sync {
    /// Blocks until the host connects.
    fn accept(&self) -> io::Result<Stream>;
    /// Where it listens, for messages ("vsock port 1024", "/run/x/1024.sock").
    fn describe(&self) -> String;
}

/// How this agent talks to its host, decided by how it was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// AF_VSOCK, any CID (the VM).
    Vsock,
    /// Unix sockets `<dir>/<port>.sock` (the process sandbox).
    Unix { dir: PathBuf },
}

impl Transport {
    pub fn listen(&self, port: u32) -> io::Result<Box<dyn Listener>> {
        match self {
            Transport::Vsock => Ok(Box::new(VsockListener::bind(port)?)),
            Transport::Unix { dir } => Ok(Box::new(UnixSocketListener::bind(dir, port)?)),
        }
    }
}

/// A listening AF_VSOCK stream socket on `VMADDR_CID_ANY:port`.
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

impl VsockListener {
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket() takes no pointers; a non-negative result is a new fd we own.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by socket() and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: bind reads exactly size_of::<sockaddr_vm>() bytes from `addr`, which lives
        // across the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on the fd we own; no memory involved.
        if unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(VsockListener { fd, port })
    }
}

impl Listener for VsockListener {
    fn accept(&self) -> io::Result<Stream> {
        loop {
            // SAFETY: accept4 with null address pointers writes no memory; a non-negative
            // result is a new fd that we take ownership of.
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: see above; the fd is new and unowned.
                return Ok(Stream::from_fd(unsafe { OwnedFd::from_raw_fd(raw) }));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }

    fn describe(&self) -> String {
        format!("vsock port {}", self.port)
    }
}

/// A listening Unix stream socket `<dir>/<port>.sock`.
#[derive(Debug)]
pub struct UnixSocketListener {
    inner: UnixListener,
    path: PathBuf,
}

impl UnixSocketListener {
    pub fn bind(dir: &Path, port: u32) -> io::Result<Self> {
        let path = socket_path(dir, port);
        // A stale socket from an earlier agent in the same directory would make bind fail.
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let inner = UnixListener::bind(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", path.display()),
            )
        })?;
        // SAFETY: listen on the fd `inner` owns; raises the backlog std chose (128).
        unsafe { libc::listen(inner.as_raw_fd(), BACKLOG) };
        Ok(UnixSocketListener { inner, path })
    }

    /// Takes over the listening socket the host bound for `port` and passed as `fd` (socket
    /// activation); anything but a listening Unix stream socket there is refused.
    pub fn inherit(fd: i32, dir: &Path, port: u32) -> io::Result<Self> {
        let path = socket_path(dir, port);
        let int_option = |level, name| {
            let mut value: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `value`, an int on the stack;
            // on a descriptor that is not a socket it fails with ENOTSOCK, writing nothing.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    level,
                    name,
                    (&mut value as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            if rc == 0 {
                Ok(value)
            } else {
                Err(io::Error::last_os_error())
            }
        };
        let not_ours = |what: String| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("descriptor {fd} passed for {}: {what}", path.display()),
            )
        };
        let domain = int_option(libc::SOL_SOCKET, libc::SO_DOMAIN)
            .map_err(|e| not_ours(format!("not a socket ({e})")))?;
        let kind =
            int_option(libc::SOL_SOCKET, libc::SO_TYPE).map_err(|e| not_ours(e.to_string()))?;
        let listening = int_option(libc::SOL_SOCKET, libc::SO_ACCEPTCONN)
            .map_err(|e| not_ours(e.to_string()))?;
        if domain != libc::AF_UNIX || kind != libc::SOCK_STREAM || listening != 1 {
            return Err(not_ours("not a listening Unix stream socket".into()));
        }
        // SAFETY: `fd` is a listening socket (checked above) the host passed to this process for
        // it alone; nothing else in the agent refers to it, so owning it here is sound.
        let inner = unsafe { UnixListener::from_raw_fd(fd) };
        // The host's copy is gone after exec; not inherited further by the function.
        // SAFETY: fcntl on the descriptor `inner` owns; no memory involved.
        unsafe { libc::fcntl(inner.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        Ok(UnixSocketListener { inner, path })
    }
}

impl Listener for UnixSocketListener {
    fn accept(&self) -> io::Result<Stream> {
        let (stream, _) = self.inner.accept()?;
        Ok(Stream::from_fd(OwnedFd::from(stream)))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// The socket for guest port `port` in the process sandbox's socket directory.
pub fn socket_path(dir: &Path, port: u32) -> PathBuf {
    dir.join(format!("{port}.sock"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::IntoRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn unix_listener_carries_bytes_both_ways_with_half_close() {
        let dir = tempfile::tempdir().unwrap();
        let listener = Transport::Unix {
            dir: dir.path().to_path_buf(),
        }
        .listen(9000)
        .unwrap();
        assert!(listener.describe().ends_with("/9000.sock"));
        let mut client = UnixStream::connect(dir.path().join("9000.sock")).unwrap();
        let server = listener.accept().unwrap();
        client.write_all(b"ping").unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        (&server).read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        (&server).write_all(b"pong").unwrap();
        server.shutdown(Shutdown::Write).unwrap();
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"pong");
    }

    #[test]
    fn a_socket_the_host_bound_is_taken_over_and_anything_else_refused() {
        let dir = tempfile::tempdir().unwrap();
        let host = UnixListener::bind(dir.path().join("1024.sock")).unwrap();
        // The connection is queued before the agent takes the listener over.
        let mut client = UnixStream::connect(dir.path().join("1024.sock")).unwrap();
        let fd = host.into_raw_fd();
        let listener = UnixSocketListener::inherit(fd, dir.path(), 1024).unwrap();
        let server = listener.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut got = [0u8; 2];
        (&server).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");

        let file = std::fs::File::open(dir.path()).unwrap();
        let err = UnixSocketListener::inherit(file.as_raw_fd(), dir.path(), 1024).unwrap_err();
        assert!(err.to_string().contains("not a socket"), "{err}");
        let (a, _b) = UnixStream::pair().unwrap();
        let err = UnixSocketListener::inherit(a.as_raw_fd(), dir.path(), 1024).unwrap_err();
        assert!(
            err.to_string()
                .contains("not a listening Unix stream socket"),
            "{err}"
        );
    }

    #[test]
    fn a_stale_socket_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let first = UnixSocketListener::bind(dir.path(), 1024).unwrap();
        drop(first);
        UnixSocketListener::bind(dir.path(), 1024).expect("rebinding over a stale socket");
    }

    #[test]
    fn vsock_listener_binds_where_the_host_has_vsock() {
        match VsockListener::bind(0x7f00_1234) {
            Ok(l) => assert_eq!(l.describe(), format!("vsock port {}", 0x7f00_1234u32)),
            Err(e) => {
                let _ = writeln!(
                    io::stderr().lock(),
                    "SKIPPED (no AF_VSOCK here: {e}): vsock_listener_binds_where_the_host_has_vsock"
                );
            }
        }
    }
}
