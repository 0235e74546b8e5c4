//! The process sandbox: the agent as PID 1 of fresh pid, mount, uts, ipc and network
//! namespaces (loopback only), in a cgroup limiting its memory, processes and (cgroup v1)
//! devices, with the rootfs image and the writable layer as loop devices. For hosts without hardware virtualization; the host kernel is shared, so
//! isolation is weaker than a VM's, and creating the sandbox says so.

pub mod cgroup;
pub mod loopdev;
#[cfg(test)]
pub(crate) mod tests;

use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fnvm_agent::protocol::{CONTROL_PORT, FUNCTION_PORT};

use cgroup::watch::LimitWatch;
use cgroup::{cgroup_prefix, AgentDisk, Cgroup, Hierarchy, Limits, V1Extras};
use loopdev::LoopDevice;

use crate::home::Home;
use crate::sandbox::exit::{ended_reason, ExitState};
use crate::sandbox::instance::child::SandboxChild;
use crate::sandbox::instance::record::ProcessId;
use crate::sandbox::instance::writable_layer::WritableLayer;
use crate::sandbox::instance::{
    create_instance_dir, prepare_instance_dir, AgentInstance, PreparedDir, Teardown,
};
use crate::sandbox::link::clock::ClockSource;
use crate::sandbox::link::{self, Link};
use crate::sandbox::transport::{unix_port_path, HostTransport};
use crate::sandbox::{
    validate_spec, ColdStart, Instance, InstanceSpec, Sandbox, SandboxError, SandboxKind, StartInfo,
};

/// The one line said when a process sandbox is created.
pub const ISOLATION_WARNING: &str = "fnvm: warning: the process sandbox shares the host kernel \
     (namespaces and a cgroup, no VM): isolation is weaker than --sandbox vm";

/// How long the agent may take to listen on its control socket.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct ProcessSandbox {
    home: Home,
    agent: PathBuf,
    cgroups: Option<Hierarchy>,
    /// The pids and devices controllers where they are on cgroup v1.
    extras: V1Extras,
    /// Processes and threads per instance ([`cgroup::PIDS_MAX_ENV`]).
    pids_max: u32,
}

impl ProcessSandbox {
    pub fn new(home: &Home) -> Result<Self, SandboxError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SandboxError::setup(
                "the process sandbox needs root (namespaces, loop devices, cgroups)",
                "not running as root",
            ));
        }
        let agent = crate::agent_binary::agent_binary()
            .map_err(|e| SandboxError::setup("cannot find the agent", e))?;
        Self::with_agent(home, agent)
    }

    /// A process sandbox running the given agent binary (tests pass a freshly built one).
    pub fn with_agent(home: &Home, agent: PathBuf) -> Result<Self, SandboxError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(SandboxError::setup(
                "the process sandbox needs root (namespaces, loop devices, cgroups)",
                "not running as root",
            ));
        }
        eprintln!("{ISOLATION_WARNING}");
        let pids_max = cgroup::pids_max_from_env()?;
        let cgroups = match Hierarchy::probe() {
            Ok(h) => Some(h),
            Err(why) => {
                eprintln!("fnvm: warning: no memory limit for functions: cgroups are not writable here ({})", why.sentence());
                None
            }
        };
        let extras = match &cgroups {
            Some(Hierarchy::V1Memory { .. }) => {
                let (extras, why) = V1Extras::probe();
                for why in why {
                    eprintln!("fnvm: warning: functions run with one limit less: {why}");
                }
                extras
            }
            _ => V1Extras::default(),
        };
        Ok(ProcessSandbox {
            home: home.clone(),
            agent,
            cgroups,
            extras,
            pids_max,
        })
    }
}

impl Sandbox for ProcessSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Process
    }

    fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, SandboxError> {
        validate_spec(&spec)?;
        let socket_dir = spec.instance_dir.join("sock");
        let longest = unix_port_path(&socket_dir, FUNCTION_PORT);
        if longest.as_os_str().len() >= 108 {
            return Err(SandboxError::BadSpec(format!(
                "the instance directory {} is too long for Unix socket paths (108 bytes)",
                spec.instance_dir.display()
            )));
        }
        let began = std::time::Instant::now();
        let mut parts = Parts::new(spec.instance_dir.clone())?;
        let result = self.start_in(&spec, &socket_dir, &mut parts);
        let exit = match result {
            Ok(exit) => exit,
            Err(err) => {
                if let Err(cleanup) = parts.teardown() {
                    tracing::warn!("after a failed start of {}: {cleanup}", spec.id);
                }
                return Err(err);
            }
        };
        let link = parts.link.take();
        let phases = link.as_ref().map_or_else(Vec::new, |c| {
            c.agent_times()
                .phases(began, "sandbox set-up → agent answered", false)
        });
        Ok(Box::new(AgentInstance {
            id: spec.id,
            transport: HostTransport::Unix { dir: socket_dir },
            exit,
            link,
            parts: Mutex::new(parts),
            start: StartInfo {
                kind: ColdStart::Boot,
                note: None,
                phases,
            },
            restore_probe: None,
            restore_report: Default::default(),
        }))
    }
}

impl ProcessSandbox {
    fn start_in(
        &self,
        spec: &InstanceSpec,
        socket_dir: &Path,
        parts: &mut Parts,
    ) -> Result<Arc<ExitState>, SandboxError> {
        let dir = &spec.instance_dir;
        let PreparedDir { mut record, layer } = prepare_instance_dir(&self.home, dir, None)?;
        let layer = parts.layer.insert(layer);
        let writable_path = layer.path().to_path_buf();
        let rootfs = parts
            .loops
            .push_get(LoopDevice::attach(&spec.rootfs_image, true)?);
        let rootfs_dev = rootfs.path().to_path_buf();
        let writable_dev = parts
            .loops
            .push_get(LoopDevice::attach(&writable_path, false)?)
            .path()
            .to_path_buf();

        let limits = Limits {
            memory_mib: spec.memory_mib,
            pids_max: self.pids_max,
            agent_disks: vec![
                device_numbers(&rootfs_dev, "r")?,
                device_numbers(&writable_dev, "rw")?,
            ],
        };
        let mut watch = None;
        if let Some(hierarchy) = &self.cgroups {
            let name = format!("{}-{}", cgroup_prefix(&self.home), spec.id);
            let cgroup =
                parts
                    .cgroup
                    .insert(Cgroup::create(hierarchy, &self.extras, &name, &limits)?);
            record.cgroup = Some(cgroup.path().to_path_buf());
            record.cgroup_v2 = cgroup.is_v2();
            record.v1_cgroups = cgroup.v1_extras();
            record.save(dir)?;
            watch = Some(LimitWatch::of(cgroup, &limits));
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(socket_dir)
            .map_err(|e| {
                SandboxError::setup(format!("cannot create {}", socket_dir.display()), e)
            })?;

        // Socket activation: the control port listens before the agent exists, so the link's
        // connection is queued at once instead of retried at growing intervals while the agent
        // comes up (each retry interval was time lost after the agent was ready). The host
        // keeps no copy: if the agent dies, the queued connection is reset, not left hanging.
        let control = listen_for_agent(&unix_port_path(socket_dir, CONTROL_PORT))?;

        let explain = watch.clone();
        let exit = ExitState::new(move || explain.as_ref()?.hits());

        let args: Vec<OsString> = vec![
            "--sandbox".into(),
            "process".into(),
            "--socket-dir".into(),
            socket_dir.into(),
            "--rootfs".into(),
            rootfs_dev.into(),
            "--writable".into(),
            writable_dev.into(),
            "--control-fd".into(),
            control.as_raw_fd().to_string().into(),
        ];
        let procs = parts
            .cgroup
            .as_ref()
            .map(|c| c.join_files())
            .unwrap_or_default();
        let child = spawn_in_namespaces(&self.agent, &args, &procs, control).map_err(|e| {
            SandboxError::setup(
                format!(
                    "cannot start the agent {} in new namespaces",
                    self.agent.display()
                ),
                e,
            )
        })?;
        let exit_for_child = exit.clone();
        let child = parts.child.insert(
            SandboxChild::adopt("agent", child, move |status, tail| {
                exit_for_child.record(
                    None,
                    None,
                    ended_reason("the sandbox ended: its agent", status, &tail),
                );
            })
            .map_err(|e| SandboxError::setup("cannot watch the agent process", e))?,
        );
        record.sandbox = ProcessId::of(child.pid());
        record.save(dir)?;

        let transport = HostTransport::Unix {
            dir: socket_dir.to_path_buf(),
        };
        let child_ref: &SandboxChild = child;
        // The waiter records the ending (with the process's last words) before the status is
        // visible, so the link finds that record first.
        let dead = || {
            child_ref
                .status()
                .map(|s| ended_reason("the sandbox ended: its agent", s, &child_ref.tail()))
        };
        let cgroup_ref = parts.cgroup.as_ref();
        let revoke_disks = || cgroup_ref.map_or(Ok(()), |c| c.revoke_agent_disks());
        let link = link::start(
            &transport,
            ClockSource::Host,
            &spec.start,
            spec.on_log.clone(),
            exit.clone(),
            &dead,
            AGENT_CONNECT_TIMEOUT,
            &revoke_disks,
        )
        .map_err(|e| match &watch {
            Some(watch) => with_limit_hits(e, watch),
            None => e,
        })?;
        parts.link = Some(link);
        parts.exit = Some(exit.clone());
        Ok(exit)
    }
}

/// Everything an instance holds, released in reverse order by [`Parts::teardown`].
struct Parts {
    dir: PathBuf,
    layer: Option<WritableLayer>,
    loops: Vec<LoopDevice>,
    cgroup: Option<Cgroup>,
    child: Option<SandboxChild>,
    link: Option<Link>,
    exit: Option<Arc<ExitState>>,
    torn_down: bool,
}

trait PushGet<T> {
    fn push_get(&mut self, item: T) -> &mut T;
}

impl<T> PushGet<T> for Vec<T> {
    fn push_get(&mut self, item: T) -> &mut T {
        self.push(item);
        self.last_mut().expect("just pushed")
    }
}

impl Parts {
    fn new(dir: PathBuf) -> Result<Self, SandboxError> {
        create_instance_dir(&dir)?;
        Ok(Parts {
            dir,
            layer: None,
            loops: Vec::new(),
            cgroup: None,
            child: None,
            link: None,
            exit: None,
            torn_down: false,
        })
    }
}

impl Teardown for Parts {
    fn is_torn_down(&self) -> bool {
        self.torn_down
    }

    /// Kills the sandbox and removes every trace; the first error is returned after trying all.
    fn teardown(&mut self) -> Result<(), SandboxError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut first_err = None;
        if let Some(link) = self.link.take() {
            link.close();
        }
        if let Some(child) = self.child.take() {
            // SIGKILL to the pid namespace's init kills every process in it; the kernel reaps
            // them all before init's own exit is reported.
            child.kill_and_reap();
        }
        if let Some(mut cgroup) = self.cgroup.take() {
            if let Err(e) = cgroup.kill_and_remove() {
                first_err.get_or_insert(e);
            }
        }
        for mut device in self.loops.drain(..).rev() {
            if let Err(e) = device.release() {
                first_err.get_or_insert(e);
            }
        }
        self.layer.take();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                first_err.get_or_insert(SandboxError::setup(
                    format!("cannot remove {}", self.dir.display()),
                    e,
                ));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The block device at `path` with `access`, for the devices allow-list.
fn device_numbers(path: &Path, access: &'static str) -> Result<AgentDisk, SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path)
        .map_err(|e| SandboxError::setup(format!("cannot stat {}", path.display()), e))?
        .rdev();
    Ok(AgentDisk {
        major: nix::sys::stat::major(rdev) as u32,
        minor: nix::sys::stat::minor(rdev) as u32,
        access,
    })
}

/// A failed start with the limits it hit said, unless its report says so already: a fork bomb
/// or an allocation past the memory limit reads as such, not as a bare SIGKILL or timeout.
fn with_limit_hits(err: SandboxError, watch: &LimitWatch) -> SandboxError {
    let Some(hits) = watch.hits() else {
        return err;
    };
    match err {
        SandboxError::Exited(mut report) if !report.reason.contains(&hits) => {
            report.reason = format!("{}; {hits}", report.reason);
            SandboxError::Exited(report)
        }
        SandboxError::StartFailed {
            message,
            last_lines,
        } if !message.contains(&hits) => SandboxError::StartFailed {
            message: format!("{message}; {hits}"),
            last_lines,
        },
        // The contract's exact text first; the cause after it.
        SandboxError::NotListening {
            message,
            last_lines,
        } if !message.contains(&hits) => SandboxError::NotListening {
            message: format!("{message}; {hits}"),
            last_lines,
        },
        SandboxError::Agent(message) if !message.contains(&hits) => {
            SandboxError::Agent(format!("{message}; {hits}"))
        }
        other => other,
    }
}

/// Starts `program` as PID 1 of new pid, mount, uts, ipc and network namespaces, in the cgroups
/// whose join files are given, in its own session, stdout/stderr piped, `control` inherited
/// under its own number (closed here once the child has it).
///
/// A new pid namespace applies to the *children* of whoever unshares it, so a short-lived thread
/// unshares CLONE_NEWPID and spawns; the other namespaces are unshared by the child itself
/// before exec, where only async-signal-safe system calls run (no allocation).
fn spawn_in_namespaces(
    program: &Path,
    args: &[OsString],
    cgroup_procs: &[PathBuf],
    control: std::os::fd::OwnedFd,
) -> std::io::Result<std::process::Child> {
    let control_fd = control.as_raw_fd();
    let procs = cgroup_procs
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in cgroup path"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only makes system calls on
    // memory prepared before the fork (`procs`, static strings); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            enter_sandbox(&procs)?;
            keep_across_exec(control_fd)
        });
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare only changes this thread's namespace for its future children.
                if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                command.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the spawning thread panicked")))
    })
}

/// In the child, before exec: lets `fd` survive exec (its number is the child's too: the
/// parent holds it open across the fork, so nothing else in the child can have that number).
fn keep_across_exec(fd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor number; no memory involved.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A listening Unix socket at `path` for the agent to inherit, on a descriptor above stdio
/// (the child's stdio set-up would overwrite 0–2), close-on-exec in this process.
fn listen_for_agent(path: &Path) -> Result<std::os::fd::OwnedFd, SandboxError> {
    let cannot = |e| SandboxError::setup(format!("cannot listen on {}", path.display()), e);
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(cannot)?;
    // SAFETY: F_DUPFD_CLOEXEC on the descriptor `listener` owns returns a new descriptor
    // (≥ 3) owned by nothing else, or fails with -1.
    let raw = unsafe { libc::fcntl(listener.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 3) };
    if raw < 0 {
        return Err(cannot(std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` was just returned by fcntl and is owned by nothing else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) })
}

/// In the child, before exec: join the cgroup, new session, new namespaces, private mounts,
/// hostname, loopback up.
fn enter_sandbox(cgroup_procs: &[CString]) -> std::io::Result<()> {
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: (the whole block) plain system calls on NUL-terminated static or pre-built strings
    // and stack buffers; nothing here allocates or takes locks.
    unsafe {
        for procs in cgroup_procs {
            let fd = check(libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
        check(libc::setsid())?;
        check(libc::unshare(
            libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWNET,
        ))?;
        // Nothing mounted in here propagates to the host, and nothing from the host comes in.
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        let hostname = b"fnvm";
        check(libc::sethostname(hostname.as_ptr().cast(), hostname.len()))?;
        loopback_up()?;
    }
    Ok(())
}

/// Sets IFF_UP on "lo" in the (new) network namespace.
///
/// # Safety
/// Async-signal-safe system calls only; callable between fork and exec.
unsafe fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a socket, an ifreq zeroed on the stack (all-zero is a valid ifreq) naming "lo",
    // and two ioctls on it; the union field written is the one SIOCGIFFLAGS filled in.
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let mut result = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req);
        if result == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            result = libc::ioctl(sock, libc::SIOCSIFFLAGS, &req);
        }
        let err = std::io::Error::last_os_error();
        libc::close(sock);
        if result < 0 {
            return Err(err);
        }
        Ok(())
    }
}
