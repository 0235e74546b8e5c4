//! Sandboxes: where a function instance runs. One interface, two implementations:
//! - [`SandboxKind::Vm`]: a KVM micro-VM per instance (`fnvm-vmm`), streams over virtio-vsock;
//! - [`SandboxKind::Process`]: the same agent as PID 1 of fresh Linux namespaces with a memory
//!   cgroup, streams over Unix sockets; weaker isolation (shared host kernel).
//!
//! Both use the same host-side artifacts (rootfs image, a per-instance writable-layer file, the
//! agent and its protocol) and the same conversation with the agent ([`link`]), so everything
//! above this module (run, serve, pool, logs) is identical for both.
//!
//! Where things are: this file holds the interface ([`Sandbox`], [`Instance`], [`InstanceSpec`],
//! [`SandboxError`]); [`vm`] and [`process`] each hold one sandbox and everything only it uses;
//! the rest is shared by both: [`instance`] (the handle on a running agent, instance records,
//! the sandbox's process, the writable layer), [`spawn`] (starting a sandbox's first process in
//! its own pid namespace), [`link`] (the host end of the agent's link and
//! the guest clock measured over it), [`transport`] (streams to guest ports), [`exit`] (how an
//! instance ended) and [`orphans`] (clean-up after a crashed fnvm).

// Parts of the API serve callers that are wired step by step (run, serve, the pool).

pub mod cgroup;
pub mod exit;
pub mod instance;
pub mod link;
pub mod orphans;
pub mod process;
pub mod spawn;
pub mod transport;
pub mod vm;

use std::path::PathBuf;
use std::sync::Arc;

// Re-exported for the host service and `fnvm run` (start-up cleanup, instance naming).
pub use fnvm_agent::protocol::{LogStream, StartSpec};
#[allow(unused_imports)]
pub use instance::record::{instances_root, new_instance_id};
pub use orphans::cleanup_orphans;

use crate::home::Home;
use crate::network::{HostNetwork, NetworkPolicy};

/// Which sandbox runs instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum SandboxKind {
    /// A KVM micro-VM per instance (needs VMX/SVM).
    Vm,
    /// Fresh Linux namespaces and a memory cgroup per instance (shared host kernel).
    Process,
}

impl std::fmt::Display for SandboxKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SandboxKind::Vm => "vm",
            SandboxKind::Process => "process",
        })
    }
}

/// `Vm` where the host has hardware virtualization (VMX/SVM and /dev/kvm), else `Process`.
pub fn default_kind() -> SandboxKind {
    let host = fnvm_vmm::host::HostCapabilities::probe();
    if host.kvm && host.hardware_virtualization {
        SandboxKind::Vm
    } else {
        SandboxKind::Process
    }
}

/// The smallest and largest memory a function may have, in MiB.
pub const MEMORY_MIB_RANGE: std::ops::RangeInclusive<u32> = 64..=3072;

/// Everything one instance needs.
#[derive(Clone)]
pub struct InstanceSpec {
    /// Unique instance id (used in names, logs, cgroups); `[A-Za-z0-9_.-]`, at most 64 bytes.
    pub id: String,
    /// The read-only rootfs image from the image pipeline.
    pub rootfs_image: PathBuf,
    /// What the agent starts.
    pub start: StartSpec,
    /// 64..=3072: the VM's memory / the process sandbox's cgroup limit.
    pub memory_mib: u32,
    /// Per-instance scratch directory: created by the sandbox, removed on stop. Put it under
    /// [`instances_root`] so [`cleanup_orphans`] finds it after a crash.
    pub instance_dir: PathBuf,
    /// VM sandbox: start from this function version's snapshot when there is one; otherwise
    /// boot, and snapshot the instance once its server is ready (before it serves anything),
    /// so later starts restore. Ignored by the process sandbox, which has no snapshots.
    pub snapshot: bool,
    /// The function's network: loopback only, or egress as its policy allows.
    pub network: NetworkPolicy,
    /// Every stdout/stderr line of the function, in order per stream.
    pub on_log: Arc<dyn Fn(LogLine) + Send + Sync>,
}

impl std::fmt::Debug for InstanceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSpec")
            .field("id", &self.id)
            .field("rootfs_image", &self.rootfs_image)
            .field("start", &self.start)
            .field("memory_mib", &self.memory_mib)
            .field("instance_dir", &self.instance_dir)
            .field("snapshot", &self.snapshot)
            .field("network", &self.network)
            .finish_non_exhaustive()
    }
}

/// One line the function printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: LogStream,
    /// When the guest read it (microseconds since the epoch).
    pub unix_time_us: u64,
    pub line: String,
    /// The `X-Scf-Request-Id` of the latest request that reached the function before the agent
    /// read this line (None before the first on this control stream). The agent says so in
    /// order with the lines, so this needs no clock; the id is as the bytes said, and only the
    /// host's own records can confirm it is one of its requests.
    pub after_request: Option<Arc<str>>,
}

/// How a cold start got its instance running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ColdStart {
    /// The sandbox booted and the function started from scratch.
    Boot,
    /// The VM was restored from a snapshot of an instance whose server was already listening.
    Snapshot,
}

impl ColdStart {
    pub fn as_str(self) -> &'static str {
        match self {
            ColdStart::Boot => "boot",
            ColdStart::Snapshot => "snapshot",
        }
    }
}

/// What a start did, for logs and for people.
#[derive(Debug, Clone, PartialEq)]
pub struct StartInfo {
    pub kind: ColdStart,
    /// About the snapshot, when one was involved: "snapshot written in 41 ms", "restore failed
    /// (...); booted instead", ...
    pub note: Option<String>,
    /// Where a boot start's time went, in order, as far as the sandbox can tell (`fnvm bench`
    /// shows them): the sandbox or VMM coming up to the agent's answer, and the function's
    /// start to its listening. Empty for a snapshot start (its restore report has the figures).
    pub phases: Vec<(&'static str, std::time::Duration)>,
}

/// How a snapshot start went, measured at the instance's first reply.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestoreReport {
    /// VMM process start (for a standby VMM: its restore request) → guest vCPUs running again.
    pub resume_ms: f64,
    /// The snapshot went into a standby VMM made ahead of the start.
    pub standby: bool,
    /// Pages of guest memory faulted in from the snapshot's memory file so far.
    pub pages_faulted: u64,
    /// Of the VMM process's page faults so far, those that had to read from disk.
    pub major_faults: u64,
}

impl std::fmt::Display for RestoreReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let since = match self.standby {
            true => "the standby VMM was asked to restore",
            false => "the VMM started",
        };
        write!(
            f,
            "resumed {:.2} ms after {since}; {} guest pages faulted in before the first reply \
             ({} major faults)",
            self.resume_ms, self.pages_faulted, self.major_faults
        )
    }
}

/// Starts instances of one kind.
pub trait Sandbox: Send + Sync {
    fn kind(&self) -> SandboxKind;
    /// Starts an instance and returns once its server listens on port 9000 (Ready), or fails with
    /// [`SandboxError::NotListening`] after the timeout (sandbox already torn down), or another
    /// [`SandboxError`] (exit before ready, bad spec, ...). Nothing is left behind on failure.
    fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, SandboxError>;
    /// The function version (rootfs image, start spec, memory) will not start again (removed,
    /// or replaced by a new version): its snapshot, if any, is deleted. A no-op for sandboxes
    /// without snapshots.
    fn discard_snapshot(
        &self,
        _rootfs_image: &std::path::Path,
        _start: &StartSpec,
        _memory_mib: u32,
    ) {
    }
    /// How many standby sandboxes are ready for cold starts now (0 for sandboxes without).
    fn standbys_ready(&self) -> usize {
        0
    }
}

/// A running instance.
pub trait Instance: Send + Sync {
    fn id(&self) -> &str;
    /// A fresh byte stream to the function's port 9000 (the caller speaks HTTP/1.1 on it).
    fn connect(&self) -> std::io::Result<std::os::unix::net::UnixStream>;
    /// The Unix socket that is itself the function's port 9000, when a stream needs no
    /// handshake (the process sandbox's agent listens on it): the host then connects from its
    /// async workers instead of handing [`Instance::connect`] to a blocking thread, which cost
    /// two thread wake-ups per new stream.
    fn port_socket(&self) -> Option<std::path::PathBuf> {
        None
    }
    /// Blocks until the function's process exits or the sandbox dies (may be called from
    /// another thread than the one that stops the instance).
    fn wait_exit(&self) -> ExitReport;
    /// Non-blocking: Some(report) once the function has exited or the sandbox has died.
    fn exited(&self) -> Option<ExitReport>;
    /// Stops everything and removes every trace: processes, mounts, loop devices, cgroup,
    /// files. Idempotent; dropping the instance stops it too.
    fn stop(&self) -> Result<(), SandboxError>;
    /// As [`Instance::stop`], giving the function `grace` between SIGTERM and SIGKILL (a
    /// container runtime's SIGTERM: the kubelet sends its SIGKILL itself after its own grace).
    fn stop_within(&self, grace: std::time::Duration) -> Result<(), SandboxError> {
        let _ = grace;
        self.stop()
    }
    /// Kills the sandbox's process at once (SIGKILL, through a pidfd), even while a stop waits
    /// out its grace; the instance then ends as killed and [`Instance::stop`] removes the rest.
    fn kill(&self) {
        let _ = self.stop();
    }
    /// How this instance was started.
    fn start_info(&self) -> StartInfo;
    /// The host pid of the process that embodies the sandbox (the process sandbox's agent, the
    /// VM's `fnvm-vmm`) while it runs: what a container runtime reports as the task's pid.
    fn sandbox_pid(&self) -> Option<i32> {
        None
    }
    /// For a snapshot start: call after the first reply; measures the restore (once, later
    /// calls return the same) and logs it. `None` for boot starts.
    fn restore_report(&self) -> Option<RestoreReport>;
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitReport {
    /// The function's exit code, if it exited normally.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Its last log lines (both streams, in arrival order).
    pub last_lines: Vec<String>,
    /// One human sentence: "exited with code 3", "killed by signal 9", "stopped", ...
    pub reason: String,
}

impl std::fmt::Display for ExitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)?;
        if !self.last_lines.is_empty() {
            write!(f, "; last lines:\n{}", self.last_lines.join("\n"))?;
        }
        Ok(())
    }
}

/// Why a sandbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The server never listened on port 9000; `message` is the contract's exact text.
    #[error("{message}")]
    NotListening {
        message: String,
        last_lines: Vec<String>,
    },
    /// The agent could not start the function (e.g. its command does not exist).
    #[error("{message}")]
    StartFailed {
        message: String,
        last_lines: Vec<String>,
    },
    /// The function (or the sandbox) ended before it was ready.
    #[error("the function ended before it was ready: {0}")]
    Exited(ExitReport),
    /// The spec cannot be run (memory out of range, bad id, missing rootfs, ...).
    #[error("invalid instance spec: {0}")]
    BadSpec(String),
    /// This host cannot run this kind of sandbox.
    #[error(transparent)]
    Host(#[from] fnvm_vmm::host::HostError),
    /// Setting up or tearing down a host resource failed.
    #[error("{what}")]
    Setup {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The agent broke the protocol, reported an error, or did not answer in time.
    #[error("agent: {0}")]
    Agent(String),
}

impl SandboxError {
    /// A [`SandboxError::Setup`] saying what was being done.
    pub fn setup(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        SandboxError::Setup {
            what: what.into(),
            source: source.into(),
        }
    }

    /// The function's last log lines, when the error carries them.
    pub fn last_lines(&self) -> &[String] {
        match self {
            SandboxError::NotListening { last_lines, .. }
            | SandboxError::StartFailed { last_lines, .. } => last_lines,
            SandboxError::Exited(report) => &report.last_lines,
            _ => &[],
        }
    }
}

/// The sandbox of `kind` for this home. Checks the host first: a VM sandbox on a host without
/// VMX/SVM fails here with the host's message. The process sandbox prints its one-line warning
/// that isolation is weaker.
/// `network` says how functions with egress reach the network.
pub fn create(
    kind: SandboxKind,
    home: &Home,
    network: &HostNetwork,
) -> Result<Box<dyn Sandbox>, SandboxError> {
    match kind {
        SandboxKind::Vm => Ok(Box::new(
            vm::VmSandbox::new(home)?.with_host_network(network.clone()),
        )),
        SandboxKind::Process => Ok(Box::new(
            process::ProcessSandbox::new(home)?.with_host_network(network.clone()),
        )),
    }
}

/// The sandbox of the long-running service: as [`create`]; a VM sandbox also keeps standby
/// VMMs warm for snapshot starts (`FNVM_STANDBY_VMMS` per VM shape, default 1).
pub fn create_for_service(
    kind: SandboxKind,
    home: &Home,
    network: &HostNetwork,
) -> Result<Box<dyn Sandbox>, SandboxError> {
    match kind {
        SandboxKind::Vm => {
            let per_shape = vm::standby::per_shape_from_env()?;
            Ok(Box::new(
                vm::VmSandbox::new(home)?
                    .with_host_network(network.clone())
                    .with_standby_vmms(per_shape)?,
            ))
        }
        SandboxKind::Process => Ok(Box::new(
            process::ProcessSandbox::new(home)?
                .with_host_network(network.clone())
                .keeping_rootfs_devices(process::KEPT_ROOTFS_DEVICES)
                .with_standby_sandboxes(process::standby_count_from_env()?)?,
        )),
    }
}

/// A number of standbys from the environment variable `var` (unset: `default`), at most 16;
/// a bad value is an error naming the variable and saying what it counts.
pub(crate) fn standby_count(var: &str, what: &str, default: usize) -> Result<usize, SandboxError> {
    const MAX: usize = 16;
    let Ok(text) = std::env::var(var) else {
        return Ok(default);
    };
    parse_standby_count(var, what, &text, MAX)
}

pub(crate) fn parse_standby_count(
    var: &str,
    what: &str,
    text: &str,
    max: usize,
) -> Result<usize, SandboxError> {
    text.trim()
        .parse::<usize>()
        .ok()
        .filter(|n| *n <= max)
        .ok_or_else(|| {
            SandboxError::BadSpec(format!(
                "{var}={text:?} is not a number of {what} (0 to {max})"
            ))
        })
}

/// Checks what both sandboxes need from a spec before touching the host.
pub(crate) fn validate_spec(spec: &InstanceSpec) -> Result<(), SandboxError> {
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= 64
        && spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !spec.id.starts_with('.');
    if !id_ok {
        return Err(SandboxError::BadSpec(format!(
            "instance id {:?} must be 1-64 characters of A-Z a-z 0-9 - _ . (not starting with .)",
            spec.id
        )));
    }
    if !MEMORY_MIB_RANGE.contains(&spec.memory_mib) {
        return Err(SandboxError::BadSpec(format!(
            "memory {} MiB is outside {}..={} MiB",
            spec.memory_mib,
            MEMORY_MIB_RANGE.start(),
            MEMORY_MIB_RANGE.end()
        )));
    }
    if spec.start.argv.is_empty() {
        return Err(SandboxError::BadSpec(
            "no command to run (the image has no Entrypoint/Cmd and the function names no command)"
                .into(),
        ));
    }
    if !spec.rootfs_image.is_file() {
        return Err(SandboxError::BadSpec(format!(
            "the rootfs image {} does not exist",
            spec.rootfs_image.display()
        )));
    }
    if spec.instance_dir.exists() {
        return Err(SandboxError::BadSpec(format!(
            "the instance directory {} already exists (instance ids must be unique)",
            spec.instance_dir.display()
        )));
    }
    Ok(())
}
