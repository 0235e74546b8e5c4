//! The process sandbox: the agent as PID 1 of fresh pid, mount, uts, ipc and network
//! namespaces (loopback only), in a cgroup limiting its memory, processes and (cgroup v1)
//! devices, with the rootfs image and the writable layer as loop devices. For hosts without hardware virtualization; the host kernel is shared, so
//! isolation is weaker than a VM's, and creating the sandbox says so.

pub mod cgroup;
pub mod loopdev;
pub mod spawn;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use fnvm_agent::protocol::{CONTROL_PORT, FUNCTION_PORT};

use cgroup::watch::LimitWatch;
use cgroup::{cgroup_prefix, AgentDisk, Cgroup, Hierarchy, Limits, V1Extras};
use loopdev::LoopDevice;
use spawn::{listen_for_agent, spawn_in_namespaces};

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
    rootfs: SharedRootfs,
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
            rootfs: SharedRootfs::default(),
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
        let rootfs = parts.rootfs.insert(self.rootfs.device(&spec.rootfs_image)?);
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
        let child = spawn_in_namespaces(&self.agent, &args, parts.cgroup.as_ref(), control.as_fd())
            .map_err(|e| {
                SandboxError::setup(
                    format!(
                        "cannot start the agent {} in new namespaces",
                        self.agent.display()
                    ),
                    e,
                )
            })?;
        drop(control);
        let exit_for_child = exit.clone();
        let child = parts.child.insert(SandboxChild::adopt_spawned(
            "agent",
            child,
            move |status, tail| {
                exit_for_child.record(
                    None,
                    None,
                    ended_reason("the sandbox ended: its agent", status, &tail),
                );
            },
        ));
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

/// One read-only loop device per rootfs image for all its running instances. Instances that
/// mount the same block device share one ext4 superblock, so the second and later instances of
/// a function find its files in the dentry, inode and page caches the first one filled: a
/// python3 start read 194 blocks through a fresh loop device and 31 through a shared one.
#[derive(Default)]
struct SharedRootfs {
    devices: Mutex<HashMap<(u64, u64), Weak<LoopDevice>>>,
}

impl SharedRootfs {
    /// The loop device of `image` (told by its device and inode: a file replaced at the same
    /// path gets a device of its own), attached if no running instance has it.
    fn device(&self, image: &Path) -> Result<Arc<LoopDevice>, SandboxError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(image).map_err(|e| {
            SandboxError::setup(
                format!("cannot read the rootfs image {}", image.display()),
                e,
            )
        })?;
        let key = (meta.dev(), meta.ino());
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        devices.retain(|_, device| device.strong_count() > 0);
        if let Some(device) = devices.get(&key).and_then(Weak::upgrade) {
            return Ok(device);
        }
        let device = Arc::new(LoopDevice::attach(image, true)?);
        devices.insert(key, Arc::downgrade(&device));
        Ok(device)
    }
}

/// Everything an instance holds, released in reverse order by [`Parts::teardown`].
struct Parts {
    dir: PathBuf,
    layer: Option<WritableLayer>,
    /// The rootfs image's read-only loop device, shared with the other instances of the image.
    rootfs: Option<Arc<LoopDevice>>,
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
            rootfs: None,
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
        // Detached (warned about if that fails) when the last instance of its image lets go.
        self.rootfs.take();
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
