//! The process sandbox: the agent as PID 1 of fresh pid, mount, uts, ipc and network
//! namespaces (loopback only), in a cgroup limiting its memory, processes and (cgroup v1)
//! devices, with the rootfs image and the writable layer as loop devices. For hosts without
//! hardware virtualization; the host kernel is shared, so isolation is weaker than a VM's, and
//! creating the sandbox says so.
//!
//! A start has two halves. [`Setup::prepare`] does everything that does not depend on the
//! function — instance directory, writable layer, cgroup, control socket, the agent spawned in
//! its namespaces — and [`ProcessSandbox::place`] the rest: the rootfs device, the device
//! allow-list and memory limit, the disks written on the agent's standard input, the link. The
//! agent comes up while the host attaches the disks; and the service keeps [`standby`]
//! sandboxes prepared ahead of demand, so its cold starts pay only the second half.

mod egress;
pub mod loopdev;
mod parts;
mod standby;
#[cfg(test)]
pub(crate) mod tests;

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fnvm_agent::protocol::{self, Placement, CONTROL_PORT, FUNCTION_PORT};

use crate::sandbox::cgroup::watch::LimitWatch;
use crate::sandbox::cgroup::{self, cgroup_prefix, Cgroup, Hierarchy, Limits, V1Extras};
use crate::sandbox::spawn::{self, listen_for_agent, Namespaces, Spawn};
use egress::Egress;
use loopdev::LoopDevice;
use parts::{device_numbers, Parts, SharedRootfs};
use standby::Standbys;
pub use standby::{standby_count_from_env, DEFAULT_STANDBYS, FROM_STANDBY_NOTE, STANDBYS_ENV};

use crate::home::Home;
use crate::network::{HostNetwork, NetworkPolicy};
use crate::sandbox::exit::{ended_reason, ExitState};
use crate::sandbox::instance::child::SandboxChild;
use crate::sandbox::instance::record::ProcessId;
use crate::sandbox::instance::{prepare_instance_dir, AgentInstance, PreparedDir, Teardown};
use crate::sandbox::link::clock::ClockSource;
use crate::sandbox::link::{self, Link};
use crate::sandbox::transport::{unix_port_path, HostTransport};
use crate::sandbox::{
    instances_root, validate_spec, ColdStart, Instance, InstanceSpec, Sandbox, SandboxError,
    SandboxKind, StartInfo,
};

/// The one line said when a process sandbox is created.
pub const ISOLATION_WARNING: &str = "fnvm: warning: the process sandbox shares the host kernel \
     (namespaces and a cgroup, no VM): isolation is weaker than --sandbox vm";

/// How long the agent may take to listen on its control socket.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The socket directory's name in an instance directory.
const SOCKET_DIR: &str = "sock";
/// How many rootfs images' loop devices a service keeps attached beyond their instances.
pub const KEPT_ROOTFS_DEVICES: usize = 8;

pub struct ProcessSandbox {
    setup: Arc<Setup>,
    rootfs: SharedRootfs,
    /// The service's standby sandboxes (none for `fnvm run`).
    standbys: Option<Standbys>,
}

/// What every sandbox of this host is made with.
struct Setup {
    home: Home,
    agent: PathBuf,
    cgroups: Option<Hierarchy>,
    /// The pids and devices controllers where they are on cgroup v1.
    extras: V1Extras,
    /// Processes and threads per instance ([`cgroup::PIDS_MAX_ENV`]).
    pids_max: u32,
    /// This home's cgroup name prefix.
    cgroup_prefix: String,
    /// How functions with egress reach the network.
    network: HostNetwork,
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
            setup: Arc::new(Setup {
                home: home.clone(),
                agent,
                cgroups,
                extras,
                pids_max,
                cgroup_prefix: cgroup_prefix(home),
                network: HostNetwork::default(),
            }),
            rootfs: SharedRootfs::default(),
            standbys: None,
        })
    }

    /// Functions' DNS queries go to these resolvers (`--dns`) instead of the host's. Call before
    /// [`Self::with_standby_sandboxes`], whose standbys are made with it.
    pub fn with_host_network(mut self, network: HostNetwork) -> Self {
        Arc::get_mut(&mut self.setup)
            .expect("the host network is set before any standby")
            .network = network;
        self
    }

    /// Keeps `count` standby sandboxes prepared for cold starts (a long-running service; a
    /// one-shot `fnvm run` gains nothing): the first is prepared now, in the background.
    pub fn with_standby_sandboxes(mut self, count: usize) -> Result<Self, SandboxError> {
        if count > 0 {
            let root = instances_root(&self.setup.home)?;
            let standbys = Standbys::new(Arc::clone(&self.setup), root, count);
            standbys.want();
            self.standbys = Some(standbys);
        }
        Ok(self)
    }

    /// Keeps the loop devices of the `count` most recently started rootfs images attached
    /// after their last instance stops (a long-running service), for a while.
    pub fn keeping_rootfs_devices(mut self, count: usize) -> Self {
        self.rootfs = SharedRootfs::keeping(count);
        self
    }
}

impl Sandbox for ProcessSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Process
    }

    fn standbys_ready(&self) -> usize {
        self.standbys.as_ref().map_or(0, Standbys::ready)
    }

    fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, SandboxError> {
        validate_spec(&spec)?;
        let socket_dir = spec.instance_dir.join(SOCKET_DIR);
        let longest = unix_port_path(&socket_dir, FUNCTION_PORT);
        if longest.as_os_str().len() >= 108 {
            return Err(SandboxError::BadSpec(format!(
                "the instance directory {} is too long for Unix socket paths (108 bytes)",
                spec.instance_dir.display()
            )));
        }
        let began = std::time::Instant::now();
        let standby = self.standbys.as_ref().and_then(Standbys::take);
        let from_standby = standby.is_some();
        let mut prepared = match standby {
            Some(prepared) => prepared,
            None => self.setup.prepare(
                spec.instance_dir.clone(),
                &spec.id,
                spec.memory_mib,
                false,
                spec.network.has_egress().then_some(&spec.network),
            )?,
        };
        let result = self.place(&mut prepared, &spec);
        // The replacement comes after this start, so the two do not compete for the CPU.
        if let Some(standbys) = &self.standbys {
            standbys.want();
        }
        let Prepared {
            mut parts, exit, ..
        } = prepared;
        let socket_dir = parts.dir.join(SOCKET_DIR);
        if let Err(err) = result {
            if let Err(cleanup) = parts.teardown() {
                tracing::warn!("after a failed start of {}: {cleanup}", spec.id);
            }
            return Err(err);
        }
        let link = parts.link.take();
        let kill_switch = parts.child.as_ref().and_then(|c| c.kill_switch());
        let label = if from_standby {
            "standby placed → agent answered"
        } else {
            "sandbox set-up → agent answered"
        };
        let mut phases = link
            .as_ref()
            .map_or_else(Vec::new, |c| c.agent_times().phases(began, label, false));
        if let Some(took) = parts.egress.as_ref().and_then(|e| e.took) {
            // A standby's is made before the request; only a policy of the function's own (or
            // none) costs then.
            let name = match from_standby {
                true => "of which the function's network policy",
                false => "of which network (nft, pasta)",
            };
            phases.insert(phases.len().min(1), (name, took));
        }
        Ok(Box::new(AgentInstance {
            id: spec.id,
            transport: HostTransport::Unix { dir: socket_dir },
            exit,
            link,
            parts: Mutex::new(parts),
            start: StartInfo {
                kind: ColdStart::Boot,
                note: from_standby.then(|| FROM_STANDBY_NOTE.to_string()),
                phases,
            },
            restore_probe: None,
            restore_report: Default::default(),
            kill_switch,
        }))
    }
}

/// A sandbox whose agent is up (or coming up) and waiting for its disks: everything of a
/// start that does not depend on the function.
struct Prepared {
    parts: Parts,
    /// The write end of the agent's standard input, where its [`Placement`] goes.
    placement: Option<File>,
    exit: Arc<ExitState>,
    /// What the limits did, for the reports; known once the memory limit is.
    watch: Arc<OnceLock<LimitWatch>>,
}

impl Prepared {
    /// The agent has not ended.
    fn is_waiting(&self) -> bool {
        self.parts
            .child
            .as_ref()
            .is_some_and(|c| c.status().is_none())
    }
}

impl Setup {
    /// Prepares a sandbox in `dir` (which must not exist) named `id`, with a memory limit of
    /// `memory_mib`; `attach_writable` attaches the writable layer's loop device now (a
    /// standby's) instead of while the agent comes up; `network` gives it egress under that
    /// policy. On error nothing is left.
    fn prepare(
        &self,
        dir: PathBuf,
        id: &str,
        memory_mib: u32,
        attach_writable: bool,
        network: Option<&NetworkPolicy>,
    ) -> Result<Prepared, SandboxError> {
        // On an error below, dropping `parts` releases whatever was made.
        let mut parts = Parts::new(dir)?;
        let dir = parts.dir.clone();
        let PreparedDir { mut record, layer } = prepare_instance_dir(&self.home, &dir, None)?;
        let layer = parts.layer.insert(layer);
        // A standby's agent mounts its writable layer while it waits.
        let writable = if attach_writable {
            let device = LoopDevice::attach(layer.path(), false)?;
            let path = device.path().to_path_buf();
            parts.loops.push(device);
            Some(path)
        } else {
            None
        };
        if let Some(hierarchy) = &self.cgroups {
            let limits = Limits {
                memory_mib,
                pids_max: self.pids_max,
                agent_disks: Vec::new(),
                cpus: None,
            };
            let name = format!("{}-{id}", self.cgroup_prefix);
            let cgroup =
                parts
                    .cgroup
                    .insert(Cgroup::create(hierarchy, &self.extras, &name, &limits)?);
            record.cgroup = Some(cgroup.path().to_path_buf());
            record.cgroup_v2 = cgroup.is_v2();
            record.v1_cgroups = cgroup.v1_extras();
            record.save(&dir)?;
            if let Some(writable) = &writable {
                cgroup.allow_agent_disks(&[device_numbers(writable, "rw")?])?;
            }
        }
        let socket_dir = dir.join(SOCKET_DIR);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&socket_dir)
            .map_err(|e| {
                SandboxError::setup(format!("cannot create {}", socket_dir.display()), e)
            })?;

        // Socket activation: the control port listens before the agent exists, so the link's
        // connection is queued at once instead of retried at growing intervals while the agent
        // comes up (each retry interval was time lost after the agent was ready). The host
        // keeps no copy: if the agent dies, the queued connection is reset, not left hanging.
        let control = listen_for_agent(&unix_port_path(&socket_dir, CONTROL_PORT))?;
        // A standby's directory is renamed to its instance's when it is taken, at any moment of
        // its agent's set-up: the agent reaches its socket directory through a descriptor
        // (`/proc/self/fd/N`), which follows the rename, not through a path, which would not.
        let socket_dir_fd = match writable {
            Some(_) => Some(spawn::open_dir(&socket_dir).map_err(|e| {
                SandboxError::setup(format!("cannot open {}", socket_dir.display()), e)
            })?),
            None => None,
        };
        let (placement_r, placement_w) = spawn::pipe()
            .map_err(|e| SandboxError::setup("cannot make the agent's input pipe", e))?;

        let watch: Arc<OnceLock<LimitWatch>> = Arc::default();
        let explain = Arc::clone(&watch);
        let exit = ExitState::new(move || explain.get()?.hits());

        let agent_socket_dir: OsString = match &socket_dir_fd {
            Some(fd) => format!("/proc/self/fd/{}", fd.as_raw_fd()).into(),
            None => socket_dir.into(),
        };
        let mut args: Vec<OsString> = vec![
            "--sandbox".into(),
            "process".into(),
            "--socket-dir".into(),
            agent_socket_dir,
            "--control-fd".into(),
            control.as_raw_fd().to_string().into(),
        ];
        if let Some(writable) = &writable {
            args.extend(["--writable".into(), writable.into()]);
        }
        let keep: Vec<_> = [
            Some(control.as_fd()),
            socket_dir_fd.as_ref().map(|fd| fd.as_fd()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let child = Spawn {
            program: &self.agent,
            args: &args,
            env: &[],
            namespaces: Namespaces::Sandbox,
            cgroup: parts.cgroup.as_ref(),
            keep: &keep,
            stdin: Some(placement_r.as_fd()),
        }
        .spawn()
        .map_err(|e| {
            SandboxError::setup(
                format!(
                    "cannot start the agent {} in new namespaces",
                    self.agent.display()
                ),
                e,
            )
        })?;
        drop((control, placement_r, socket_dir_fd));
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
        let pid = child.pid();
        record.sandbox = ProcessId::of(pid);
        record.save(&dir)?;
        // pasta joins the cgroup, so it goes with the instance even after a crash. It comes up
        // while the agent does and the disks are placed (waited for in `place`).
        if let Some(policy) = network {
            parts.egress = Some(Egress::begin(
                pid,
                &self.network,
                policy,
                parts.cgroup.as_ref(),
                &dir,
            )?);
        }
        Ok(Prepared {
            parts,
            placement: Some(File::from(placement_w)),
            exit,
            watch,
        })
    }
}

impl Setup {
    /// Gives a standby the default egress ahead of its function, if it can: where it cannot
    /// (no pasta or nftables on the host), standbys are made without, said once, and a function
    /// with egress sets it up as it starts (failing with the reason), while functions with
    /// `--network none` still start from standbys.
    fn offer_egress(&self, prepared: &mut Prepared) {
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let Some(child) = prepared.parts.child.as_ref() else {
            return;
        };
        match Egress::attach(
            child.pid(),
            &self.network,
            &NetworkPolicy::default(),
            prepared.parts.cgroup.as_ref(),
            &prepared.parts.dir,
        ) {
            Ok(mut egress) => {
                // Made before any request: no start's time.
                egress.took = None;
                prepared.parts.egress = Some(egress);
            }
            Err(e) => {
                if !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        "standby sandboxes are made without a network ({e}); functions with \
                         egress set theirs up as they start"
                    );
                }
            }
        }
    }
}

impl ProcessSandbox {
    /// Gives a prepared sandbox its function: the rootfs and writable layer devices (allowed to the agent until it has mounted them), the memory
    /// limit, then the link's Hello and Start.
    fn place(&self, prepared: &mut Prepared, spec: &InstanceSpec) -> Result<(), SandboxError> {
        let parts = &mut prepared.parts;
        if parts.dir != spec.instance_dir {
            // A standby: one rename moves its sockets (the agent keeps listening on them), its
            // record and its writable layer to the instance's directory.
            rename_dir(&parts.dir, &spec.instance_dir)?;
            parts.dir = spec.instance_dir.clone();
        }
        let socket_dir = parts.dir.join(SOCKET_DIR);
        let rootfs_dev = parts
            .rootfs
            .insert(self.rootfs.device(&spec.rootfs_image)?)
            .path()
            .to_path_buf();
        // Attached now unless the agent has it already (a standby's).
        let attach_writable = parts.loops.is_empty();
        if attach_writable {
            let layer = parts
                .layer
                .as_ref()
                .expect("a prepared sandbox has its layer");
            parts.loops.push(LoopDevice::attach(layer.path(), false)?);
        }
        let writable_dev = parts.loops[0].path().to_path_buf();
        if parts.egress.is_none() && spec.network.has_egress() {
            // A standby made without a network (the host could not give it one then).
            let pid = parts
                .child
                .as_ref()
                .expect("a prepared sandbox has its agent")
                .pid();
            parts.egress = Some(Egress::begin(
                pid,
                &self.setup.network,
                &spec.network,
                parts.cgroup.as_ref(),
                &parts.dir,
            )?);
        }
        let mut disks = vec![device_numbers(&rootfs_dev, "r")?];
        if attach_writable {
            disks.push(device_numbers(&writable_dev, "rw")?);
        }
        if let Some(cgroup) = parts.cgroup.as_mut() {
            cgroup.allow_agent_disks(&disks)?;
            cgroup.set_memory_limit(spec.memory_mib)?;
            let limits = Limits {
                memory_mib: spec.memory_mib,
                pids_max: self.setup.pids_max,
                agent_disks: Vec::new(),
                cpus: None,
            };
            let _ = prepared.watch.set(LimitWatch::of(cgroup, &limits));
        }
        let placement = Placement {
            rootfs: rootfs_dev.display().to_string(),
            writable: attach_writable.then(|| writable_dev.display().to_string()),
        };
        let mut input = prepared.placement.take().expect("placed once");
        protocol::write_message(&mut input, &placement).map_err(|e| {
            SandboxError::setup("cannot give the agent its disks on its standard input", e)
        })?;
        drop(input);
        // The network is in place, as the function's policy says, before the function starts.
        if let Some(egress) = parts.egress.as_mut() {
            egress.ready()?;
            egress.apply(&spec.network)?;
        }

        let transport = HostTransport::Unix { dir: socket_dir };
        let child_ref: &SandboxChild = parts
            .child
            .as_ref()
            .expect("a prepared sandbox has its agent");
        // The waiter records the ending (with the process's last words) before the status is
        // visible, so the link finds that record first.
        let dead = || {
            child_ref
                .status()
                .map(|s| ended_reason("the sandbox ended: its agent", s, &child_ref.tail()))
        };
        let cgroup_ref = parts.cgroup.as_ref();
        let revoke_disks = || cgroup_ref.map_or(Ok(()), |c| c.revoke_agent_disks());
        let exit = &prepared.exit;
        let watch = prepared.watch.get();
        let link: Link = link::start(
            &transport,
            ClockSource::Host,
            &spec.start,
            spec.on_log.clone(),
            exit.clone(),
            &dead,
            AGENT_CONNECT_TIMEOUT,
            &revoke_disks,
        )
        .map_err(|e| match watch {
            Some(watch) => with_limit_hits(e, watch),
            None => e,
        })?;
        parts.link = Some(link);
        parts.exit = Some(exit.clone());
        Ok(())
    }
}

/// Renames a standby's directory to its instance's (creating the parent as needed).
fn rename_dir(from: &std::path::Path, to: &std::path::Path) -> Result<(), SandboxError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| SandboxError::setup(format!("cannot create {}", parent.display()), e))?;
    }
    std::fs::rename(from, to).map_err(|e| {
        SandboxError::setup(
            format!("cannot move {} to {}", from.display(), to.display()),
            e,
        )
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
