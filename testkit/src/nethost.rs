//! A test host in a network namespace of the test's own making: the peer a function's network
//! egress reaches in the egress tests (issue 15). Each [`TestHost`] is a namespace `fnvm-t-<n>`
//! joined to the init namespace by a veth pair on a /30 of its own, so tests in concurrent
//! processes never share addresses, and the servers in it ([`crate::servers`]) are real servers
//! behind a real link, reached the way a function's traffic leaves the host.
//!
//! `n` is a slot taken with a non-blocking `flock` on `/run/fnvm-test/nets/<n>.lock` (cargo
//! nextest runs every test in a process of its own, so a process-local counter would collide).

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Gid, Pid, Uid};

/// Where the slot locks live (each file is removed by the host holding it, see `lock_slot`).
const LOCKS: &str = "/run/fnvm-test/nets";
/// How many test hosts may exist at once: 64 in each of 10.200/16 to 10.215/16, 10.200.0.0/30 to
/// 10.215.252.0/30 (one /30 at the start of every fourth /24).
const SLOTS: u32 = 1024;
/// How long the processes left in a namespace get to die after SIGKILL.
const KILL_DEADLINE: Duration = Duration::from_secs(10);

/// A network namespace with a veth link to the init namespace, removed (with every process in
/// it) on drop.
#[derive(Debug)]
pub struct TestHost {
    n: u32,
    name: String,
    /// `/run/netns/<name>`, open: what threads and children `setns` into, and the namespace's
    /// identity (its nsfs inode) when looking for the processes in it.
    netns: File,
    /// The slot's lock, held until drop (an `Option` so drop can unlink it before releasing).
    lock: Option<Flock<File>>,
}

/// A namespace's identity: the device and inode of its nsfs file.
type NsId = (u64, u64);

impl TestHost {
    /// Makes a fresh namespace in the first free slot: veth `fvt<n>h` (init namespace,
    /// `10.<200+n/64>.<(n%64)*4>.1/30`) and `fvt<n>n` (inside, `.2/30`), `lo` up inside and a
    /// default route inside via `.1`. Panics, saying what failed, where that is not possible
    /// (not root, no iproute2, every slot taken).
    pub fn new() -> TestHost {
        std::fs::create_dir_all(LOCKS)
            .unwrap_or_else(|e| panic!("cannot create {LOCKS} for the test host slots: {e}"));
        for n in 0..SLOTS {
            if let Some(lock) = lock_slot(n) {
                return TestHost::create(n, lock);
            }
        }
        panic!("all {SLOTS} test host slots in {LOCKS} are taken: are that many tests running?")
    }

    fn create(n: u32, lock: Flock<File>) -> TestHost {
        let name = format!("fnvm-t-{n}");
        // A namespace or veth of this slot that exists now is a crashed test's: its lock died
        // with it. Remove it (and whatever still runs in it) before reusing the slot.
        if netns_path(&name).exists() || Path::new("/sys/class/net").join(host_if(n)).exists() {
            crate::level::loud(&format!(
                "test host {name}: removing what a crashed test left (namespace, veth, processes, \
                 directories)"
            ));
            if let Err(e) = teardown(n, &name) {
                panic!("cannot remove the leftover test host {name}: {e}");
            }
        }
        let (gateway, addr) = (host_ip(n, 1), host_ip(n, 2));
        let (outside, inside) = (host_if(n), ns_if(n));
        ip(&format!("netns add {name}"));
        let netns = File::open(netns_path(&name))
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", netns_path(&name).display()));
        // From here on a failure still removes the namespace: the TestHost's drop does.
        let host = TestHost {
            n,
            name,
            netns,
            lock: Some(lock),
        };
        let name = &host.name;
        ip(&format!(
            "link add {outside} type veth peer name {inside} netns {name}"
        ));
        ip(&format!("addr add {gateway}/30 dev {outside}"));
        ip(&format!("link set {outside} up"));
        ip(&format!("-n {name} addr add {addr}/30 dev {inside}"));
        ip(&format!("-n {name} link set {inside} up"));
        ip(&format!("-n {name} link set lo up"));
        ip(&format!("-n {name} route add default via {gateway}"));
        host
    }

    /// The namespace's name (`fnvm-t-<n>`, as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address inside the namespace (`.2` of its /30): where its servers listen.
    pub fn addr(&self) -> Ipv4Addr {
        host_ip(self.n, 2)
    }

    /// The init namespace's end of the link (`.1`): the namespace's default route.
    pub fn gateway(&self) -> Ipv4Addr {
        host_ip(self.n, 1)
    }

    /// The link's /30, e.g. `10.200.4.0/30`.
    pub fn subnet(&self) -> String {
        format!("{}/30", host_ip(self.n, 0))
    }

    /// The veth end in the init namespace (`fvt<n>h`), e.g. for firewall rules naming it.
    pub fn host_interface(&self) -> String {
        host_if(self.n)
    }

    /// The veth end inside the namespace (`fvt<n>n`, holding [`addr`](Self::addr)).
    pub fn interface(&self) -> String {
        ns_if(self.n)
    }

    /// The namespace's file, `/run/netns/<name>`: what `ctr run --with-ns network:PATH` (or an
    /// OCI spec's network namespace path) joins.
    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// A command that runs inside the namespace (its child `setns`es before exec). The
    /// command holds the namespace open until it is dropped.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        let netns = self.reopen();
        // SAFETY: the hook runs in the forked child before exec and only makes the setns(2)
        // system call: no allocation, no locks, async-signal-safe.
        unsafe {
            cmd.pre_exec(move || Ok(setns(netns.as_fd(), CloneFlags::CLONE_NEWNET)?));
        }
        cmd
    }

    /// [`command`](Self::command) as user `uid`/`gid` with no supplementary groups: what
    /// `Command::uid` would do, but after the `setns`, which an unprivileged user may not make
    /// (std drops privileges before the pre-exec hooks run).
    pub fn command_as(&self, program: impl AsRef<OsStr>, uid: Uid, gid: Gid) -> Command {
        let mut cmd = self.command(program);
        // SAFETY: runs in the forked child after the setns hook, before exec; setgroups(2),
        // setgid(2) and setuid(2) are plain system calls there (the child has one thread, so
        // glibc's all-threads set*id broadcast has nothing to signal).
        unsafe {
            cmd.pre_exec(move || {
                nix::unistd::setgroups(&[])?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread that has joined the namespace, and returns what it returns: sockets
    /// made there stay in the namespace after the thread ends (e.g. a listener bound to
    /// [`addr`](Self::addr)). Panics of `f` reach the caller.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                setns(self.netns.as_fd(), CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("cannot enter the test host {}: {e}", self.name));
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The processes running in the namespace (other than this one), by pid.
    pub fn processes(&self) -> Vec<Pid> {
        processes_in(ns_id(&self.netns))
    }

    /// A fresh, empty directory `/tmp/fnvm-t-<n>-<what>-XXXXXX` for a server's files. The
    /// host's drop removes what is left of it (and a crashed test's, when the slot is reused).
    pub fn temp_dir(&self, what: &str) -> PathBuf {
        let template = Path::new(TEMP).join(format!("{}{what}-XXXXXX", temp_prefix(self.n)));
        nix::unistd::mkdtemp(&template)
            .unwrap_or_else(|e| panic!("cannot make a directory {}: {e}", template.display()))
    }

    fn reopen(&self) -> File {
        File::open(netns_path(&self.name))
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", netns_path(&self.name).display()))
    }
}

impl Default for TestHost {
    fn default() -> Self {
        TestHost::new()
    }
}

impl Drop for TestHost {
    /// Kills every process in the namespace, deletes the veth pair, the namespace and the
    /// temporary directories, and frees the slot. Nothing may be left behind: a failure panics
    /// (or, when already panicking, says so on stderr).
    fn drop(&mut self) {
        let result = teardown(self.n, &self.name);
        if let Some(lock) = self.lock.take() {
            // Unlinked while held: a process that opened the old file re-checks the path after
            // locking and takes the new file instead (see lock_slot).
            let _ = std::fs::remove_file(lock_path(self.n));
            drop(lock);
        }
        if let Err(e) = result {
            if std::thread::panicking() {
                crate::level::loud(&format!("test host {}: {e}", self.name));
            } else {
                panic!("test host {}: {e}", self.name);
            }
        }
    }
}

/// Takes slot `n`'s lock without waiting; None when another test holds it.
fn lock_slot(n: u32) -> Option<Flock<File>> {
    let path = lock_path(n);
    loop {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return None,
            Err((_, e)) => panic!("cannot lock {}: {e}", path.display()),
        };
        // A holder unlinks its file before unlocking it, so the lock just taken may be on a
        // file no longer at the path: it guards nothing then, take the path's current file.
        let held = lock.metadata().expect("fstat of a lock file");
        match std::fs::metadata(&path) {
            Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => return Some(lock),
            _ => continue,
        }
    }
}

/// Kills what runs in the namespace `name`, deletes slot `n`'s veth, the namespace and its
/// temporary directories.
fn teardown(n: u32, name: &str) -> Result<(), String> {
    let path = netns_path(name);
    if let Ok(netns) = File::open(&path) {
        kill_all_in(ns_id(&netns))?;
    }
    // Deleting one end deletes the pair at once; the namespace's own cleanup would do it too,
    // but asynchronously, after `ip netns del` returned.
    let outside = host_if(n);
    if Path::new("/sys/class/net").join(&outside).exists() {
        try_ip(&format!("link del {outside}"))?;
    }
    if path.exists() {
        try_ip(&format!("netns del {name}"))?;
    }
    if path.exists() {
        return Err(format!(
            "{} is still there after `ip netns del`",
            path.display()
        ));
    }
    let prefix = temp_prefix(n);
    for entry in std::fs::read_dir(TEMP).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_dir_all(entry.path())
                .map_err(|e| format!("cannot remove {}: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Where [`TestHost::temp_dir`] makes directories (the postgres user must reach them).
const TEMP: &str = "/tmp";

/// What the names of slot `n`'s temporary directories start with (the dash keeps slot 1 off
/// slot 10's).
fn temp_prefix(n: u32) -> String {
    format!("fnvm-t-{n}-")
}

/// SIGKILLs every process in the namespace until none is left (new children included).
fn kill_all_in(ns: NsId) -> Result<(), String> {
    let deadline = Instant::now() + KILL_DEADLINE;
    loop {
        let left = processes_in(ns);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let described: Vec<String> = left
                .iter()
                .map(|pid| format!("{pid} ({})", cmdline(*pid)))
                .collect();
            return Err(format!(
                "processes still in the namespace {KILL_DEADLINE:?} after SIGKILL: {}",
                described.join(", ")
            ));
        }
        for pid in left {
            // ESRCH: it died between the scan and now, which is what we want.
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The processes with any thread in the namespace `ns`, other than this process (whose
/// [`TestHost::enter`] threads leave with their thread). Zombies hold no namespace.
fn processes_in(ns: NsId) -> Vec<Pid> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("cannot read /proc")
        .flatten()
    {
        let pid = entry.file_name().to_string_lossy().to_string();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) else {
            continue;
        };
        let inside = tasks.flatten().any(|task| {
            std::fs::metadata(task.path().join("ns/net")).is_ok_and(|m| (m.dev(), m.ino()) == ns)
        });
        if inside {
            found.push(Pid::from_raw(pid.parse().expect("a numeric /proc entry")));
        }
    }
    found
}

fn cmdline(pid: Pid) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|_| "gone".into())
}

fn ns_id(netns: &File) -> NsId {
    let m = netns.metadata().expect("fstat of a network namespace file");
    (m.dev(), m.ino())
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn lock_path(n: u32) -> PathBuf {
    Path::new(LOCKS).join(format!("{n}.lock"))
}

fn host_if(n: u32) -> String {
    format!("fvt{n}h")
}

fn ns_if(n: u32) -> String {
    format!("fvt{n}n")
}

/// Address `last` of slot `n`'s /30: 0 the network, 1 the init namespace's end, 2 the inside.
fn host_ip(n: u32, last: u8) -> Ipv4Addr {
    assert!(n < SLOTS && last < 4);
    Ipv4Addr::new(10, 200 + (n / 64) as u8, ((n % 64) * 4) as u8, last)
}

/// Runs `ip ARGS` (split at whitespace), panicking with its stderr when it fails.
fn ip(args: &str) {
    try_ip(args).unwrap_or_else(|e| panic!("{e}"));
}

fn try_ip(args: &str) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .map_err(|e| {
            format!("cannot run `ip` (Debian's iproute2; scripts/setup.sh tests installs it): {e}")
        })?;
    if out.status.success() {
        return Ok(());
    }
    let hint = if nix::unistd::geteuid().is_root() {
        ""
    } else {
        " (test hosts need root)"
    };
    Err(format!(
        "`ip {args}` failed ({}){hint}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}
