//! Real servers inside a [`TestHost`], for the egress tests (issue 15) to reach from functions:
//! Debian's PostgreSQL, dnsmasq as the DNS server, iperf3 for throughput, and a plain TCP
//! listener that says hello. Each starts in the host's namespace on its address, is waited for
//! until it answers, and is stopped with everything it wrote on drop.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};

use crate::nethost::TestHost;

/// How long a stopped server gets to exit before SIGKILL.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

/// A log file for a server's stdout and stderr (both).
fn log_file(path: &Path) -> (Stdio, Stdio) {
    let log =
        File::create(path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
    let again = log.try_clone().expect("dup of a log file");
    (log.into(), again.into())
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// Polls `ready` every 50 ms until it is true; panics when `deadline` passes or `child` exits
/// first, with the server's log.
fn wait_ready(
    what: &str,
    child: &mut Child,
    log: &Path,
    deadline: Duration,
    mut ready: impl FnMut() -> bool,
) {
    let started = Instant::now();
    loop {
        if ready() {
            return;
        }
        if let Some(status) = child.try_wait().expect("waitpid of a server") {
            panic!(
                "{what} exited ({status}) before it was ready; its log:\n{}",
                read_log(log)
            );
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} was not ready within {deadline:?}; its log:\n{}",
                read_log(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops `child` with `signal`, SIGKILLs it after [`STOP_DEADLINE`], and reaps it.
fn stop(child: &mut Child, signal: Signal) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), signal);
    let deadline = Instant::now() + STOP_DEADLINE;
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether a process in the namespace of `pid` listens on TCP `addr` (its namespace's
/// `/proc/<pid>/net/tcp`): readiness without connecting, which would cost a one-client server
/// like iperf3 a test.
fn tcp_listening(pid: u32, addr: SocketAddrV4) -> bool {
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(addr.ip().octets()),
        addr.port()
    );
    std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; st 0A is LISTEN
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
        })
    })
}

/// Debian's PostgreSQL in a [`TestHost`]: trust authentication for everyone, database `fnvm`
/// with a table `greeting(id int primary key, text text)` holding `(1, 'hello from postgres')`.
#[derive(Debug)]
pub struct Postgres {
    child: Child,
    dir: PathBuf,
    bin: PathBuf,
    addr: Ipv4Addr,
}

impl Postgres {
    const PORT: u16 = 5432;

    /// initdb in a fresh directory under /tmp and postgres listening on `host.addr():5432`,
    /// both as the `postgres` user (initdb refuses root); waits up to 30 s for it to accept
    /// connections, then creates the database. Panics with the server's log when it cannot.
    pub fn start(host: &TestHost) -> Postgres {
        let bin = postgres_bin();
        let user = User::from_name("postgres")
            .expect("cannot look up the user postgres")
            .expect(
                "no user postgres: Debian's postgresql package creates it (scripts/setup.sh tests)",
            );
        let dir = host.temp_dir("pg");
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("cannot chown {} to postgres: {e}", dir.display()));
        let data = dir.join("data");
        let out = Command::new(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["--no-locale", "-E", "UTF8"])
            .uid(user.uid.as_raw())
            .gid(user.gid.as_raw())
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.join("initdb").display()));
        assert!(
            out.status.success(),
            "initdb of {} failed ({}): {}{}",
            data.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Truncated in place: the file stays the postgres user's.
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 0.0.0.0/0 trust\nhost all all ::/0 trust\n",
        )
        .expect("cannot write pg_hba.conf");
        let log = dir.join("postgres.log");
        let (stdout, stderr) = log_file(&log);
        let addr = host.addr();
        let mut child = host
            .command_as(bin.join("postgres"), user.uid, user.gid)
            .arg("-D")
            .arg(&data)
            .args(["-c", &format!("listen_addresses={addr}")])
            .args(["-c", &format!("port={}", Self::PORT)])
            .args(["-c", &format!("unix_socket_directories={}", dir.display())])
            // A throwaway cluster: nothing of it needs to survive a crash.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.join("postgres").display()));
        let isready = bin.join("pg_isready");
        let (ip, port) = (addr.to_string(), Self::PORT.to_string());
        let timeout = Duration::from_secs(30);
        wait_ready("postgres", &mut child, &log, timeout, || {
            let probe = Command::new(&isready)
                .args(["-q", "-t", "1", "-h", &ip, "-p", &port])
                .status();
            probe.is_ok_and(|s| s.success())
        });
        let pg = Postgres {
            child,
            dir,
            bin,
            addr,
        };
        pg.psql_in("postgres", "create database fnvm");
        pg.psql(
            "create table greeting(id int primary key, text text); \
             insert into greeting values (1, 'hello from postgres');",
        );
        pg
    }

    /// The address it listens on (the host's).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        Self::PORT
    }

    /// The user to connect as (trusted: no password).
    pub fn user(&self) -> &str {
        "postgres"
    }

    pub fn dbname(&self) -> &str {
        "fnvm"
    }

    /// The postmaster's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_log(&self.dir.join("postgres.log"))
    }

    /// Runs `sql` in database `fnvm` with psql from the init namespace, over the server's unix
    /// socket; returns its output (unaligned, tuples only) trimmed. Panics when psql fails.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_in(self.dbname(), sql)
    }

    fn psql_in(&self, dbname: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.dir)
            .args(["-p", &Self::PORT.to_string(), "-U", "postgres"])
            .args(["-d", dbname, "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.join("psql").display()));
        assert!(
            out.status.success(),
            "psql -d {dbname} -c {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    /// A fast shutdown (SIGINT: sessions still connected are ended, where SIGTERM would wait
    /// for them), SIGKILL after 10 s, and the directory removed.
    fn drop(&mut self) {
        stop(&mut self.child, Signal::SIGINT);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bin directory of the newest PostgreSQL installed (`/usr/lib/postgresql/<version>/bin`).
fn postgres_bin() -> PathBuf {
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| {
                    let version: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("postgres").is_file().then_some((version, bin))
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let newest = versions.into_iter().max().map(|(_, bin)| bin);
    newest.expect(
        "no /usr/lib/postgresql/<version>/bin/postgres: install Debian's postgresql \
         (scripts/setup.sh tests)",
    )
}

/// dnsmasq in a [`TestHost`] answering A queries for its records (and NXDOMAIN for every other
/// name: it forwards nothing).
#[derive(Debug)]
pub struct Dns {
    child: Child,
    dir: PathBuf,
    addr: Ipv4Addr,
}

impl Dns {
    /// dnsmasq on `host.addr():53` with `records` as host records (and query logging); waits
    /// up to 10 s until it answers a real query.
    pub fn start(host: &TestHost, records: &[(&str, Ipv4Addr)]) -> Dns {
        let dir = host.temp_dir("dns");
        let log = dir.join("dnsmasq.log");
        let (stdout, stderr) = log_file(&log);
        let addr = host.addr();
        let mut cmd = host.command("/usr/sbin/dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--bind-interfaces",
            "--log-facility=-",
            "--log-queries",
            // Every name without a record: NXDOMAIN, as a real resolver says, not REFUSED.
            "--address=/#/",
            "--port=53",
        ])
        .arg(format!("--listen-address={addr}"))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
        for (name, ip) in records {
            cmd.arg(format!("--host-record={name},{ip}"));
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("cannot start /usr/sbin/dnsmasq (Debian's dnsmasq-base)");
        let server = SocketAddrV4::new(addr, 53);
        let probe = records
            .first()
            .map_or("fnvm-ready.invalid", |(name, _)| name);
        wait_ready("dnsmasq", &mut child, &log, Duration::from_secs(10), || {
            dns_query_a(server, probe, Duration::from_millis(200)).is_ok()
        });
        Dns { child, dir, addr }
    }

    /// The address it answers on (port 53, UDP and TCP).
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An A query for `name` to this server, from the init namespace.
    pub fn query(&self, name: &str) -> std::io::Result<DnsReply> {
        dns_query_a(
            SocketAddrV4::new(self.addr, 53),
            name,
            Duration::from_secs(2),
        )
    }

    /// dnsmasq's log so far, one line per query it got (`query[A] NAME from ADDR`).
    pub fn log(&self) -> String {
        read_log(&self.dir.join("dnsmasq.log"))
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        stop(&mut self.child, Signal::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DNS server's answer to an A query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    /// 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED ...
    pub rcode: u8,
    /// The A records of the answer section, in order.
    pub addresses: Vec<Ipv4Addr>,
}

/// Sends one A query for `name` over UDP to `server` and reads its reply (hand-built: no
/// resolver library between the test and the server).
pub fn dns_query_a(
    server: SocketAddrV4,
    name: &str,
    timeout: Duration,
) -> std::io::Result<DnsReply> {
    use std::io::{Error, ErrorKind};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |t| t.subsec_nanos());
    let id = (std::process::id() as u16) ^ (nanos as u16);
    let mut query = Vec::with_capacity(32 + name.len());
    query.extend_from_slice(&id.to_be_bytes());
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; 1 question
    for label in name.trim_end_matches('.').split('.') {
        assert!(
            !label.is_empty() && label.len() < 64,
            "bad DNS name {name:?}"
        );
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]); // root; type A; class IN
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.send(&query)?;
    let mut buf = [0u8; 1500];
    let deadline = Instant::now() + timeout;
    loop {
        let n = socket.recv(&mut buf)?;
        let reply = &buf[..n];
        if n >= 12 && reply[..2] == id.to_be_bytes() && reply[2] & 0x80 != 0 {
            return parse_reply(reply)
                .ok_or_else(|| Error::new(ErrorKind::InvalidData, "malformed DNS reply"));
        }
        if Instant::now() > deadline {
            return Err(Error::new(ErrorKind::TimedOut, "no reply to the DNS query"));
        }
    }
}

fn parse_reply(msg: &[u8]) -> Option<DnsReply> {
    let u16_at = |i: usize| Some(u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]));
    // Past a (possibly compressed) name starting at `i`.
    let skip_name = |mut i: usize| -> Option<usize> {
        loop {
            let len = *msg.get(i)?;
            match len {
                0 => return Some(i + 1),
                l if l & 0xC0 == 0xC0 => return Some(i + 2),
                l => i += 1 + l as usize,
            }
        }
    };
    let rcode = msg[3] & 0x0F;
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let mut i = 12;
    for _ in 0..questions {
        i = skip_name(i)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..answers {
        i = skip_name(i)?;
        let (rtype, class, len) = (u16_at(i)?, u16_at(i + 2)?, u16_at(i + 8)? as usize);
        let data = msg.get(i + 10..i + 10 + len)?;
        if rtype == 1 && class == 1 && len == 4 {
            addresses.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Some(DnsReply { rcode, addresses })
}

/// An iperf3 server in a [`TestHost`] (`iperf3 -s`: one test at a time, one after another).
#[derive(Debug)]
pub struct Iperf3 {
    child: Child,
    dir: PathBuf,
    addr: Ipv4Addr,
}

impl Iperf3 {
    const PORT: u16 = 5201;

    /// `iperf3 -s -B <host.addr()> -p 5201`; waits up to 10 s until it listens.
    pub fn start(host: &TestHost) -> Iperf3 {
        let dir = host.temp_dir("iperf3");
        let log = dir.join("iperf3.log");
        let (stdout, stderr) = log_file(&log);
        let addr = host.addr();
        let mut child = host
            .command("iperf3")
            .args(["-s", "-B", &addr.to_string(), "-p", &Self::PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("cannot start iperf3 (Debian's iperf3)");
        let pid = child.id();
        wait_ready("iperf3", &mut child, &log, Duration::from_secs(10), || {
            tcp_listening(pid, SocketAddrV4::new(addr, Self::PORT))
        });
        Iperf3 { child, dir, addr }
    }

    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        Self::PORT
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's output so far (one report per test it served).
    pub fn log(&self) -> String {
        read_log(&self.dir.join("iperf3.log"))
    }
}

impl Drop for Iperf3 {
    fn drop(&mut self) {
        stop(&mut self.child, Signal::SIGTERM);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP listener on `host.addr():port` inside a [`TestHost`] that writes `hello\n` to every
/// connection and closes it: the far end of "is this connection allowed" checks.
#[derive(Debug)]
pub struct TcpListen {
    addr: SocketAddrV4,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpListen {
    /// Binds `host.addr():port` in the host's namespace (port 0: any free port, see
    /// [`port`](Self::port)) and serves it on a thread until dropped.
    pub fn start(host: &TestHost, port: u16) -> TcpListen {
        let ip = host.addr();
        let listener = host
            .enter(|| TcpListener::bind((ip, port)))
            .unwrap_or_else(|e| panic!("cannot listen on {ip}:{port} in {}: {e}", host.name()));
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("the listener's address")
        else {
            unreachable!("bound to an IPv4 address")
        };
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name(format!("tcp-listen-{addr}"))
            .spawn({
                let (accepted, stop) = (accepted.clone(), stop.clone());
                move || serve_hello(&listener, &accepted, &stop)
            })
            .expect("cannot spawn the listener's thread");
        TcpListen {
            addr,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> Ipv4Addr {
        *self.addr.ip()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many connections it has accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// Accepts until `stop`, polling so that a drop is seen within 50 ms.
fn serve_hello(listener: &TcpListener, accepted: &AtomicUsize, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, 50u16).unwrap_or(0) == 0 {
            continue;
        }
        while let Ok((mut stream, _)) = listener.accept() {
            accepted.fetch_add(1, Ordering::SeqCst);
            let _ = stream.set_nonblocking(false);
            let _ = stream.write_all(b"hello\n");
            let _ = stream.shutdown(std::net::Shutdown::Write);
            // Drain what the client sent, so the close is a FIN, not a reset.
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = stream.read(&mut [0u8; 512]);
        }
    }
}

impl Drop for TcpListen {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
