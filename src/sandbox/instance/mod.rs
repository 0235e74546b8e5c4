//! The host's handle on a running agent, the same for every sandbox: the function's port through
//! the sandbox's transport, the exit state fed by the agent's link, and a stop that asks the
//! agent first and then tears down whatever the sandbox set up (`Teardown`).

pub mod child;
pub mod record;
pub mod writable_layer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fnvm_agent::protocol::FUNCTION_PORT;

use crate::home::Home;
use crate::sandbox::exit::ExitState;
use crate::sandbox::link::Link;
use crate::sandbox::transport::HostTransport;
use crate::sandbox::{ExitReport, Instance, RestoreReport, SandboxError, StartInfo};
use record::{InstanceRecord, ProcessId};
use writable_layer::WritableLayer;

/// Creates an instance's private directory (mode 0700; its parent as needed). It must not exist
/// yet: an instance id is used once, and a leftover directory is another instance's.
pub(crate) fn create_instance_dir(dir: &std::path::Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| SandboxError::setup(format!("cannot create {}", parent.display()), e))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| {
            SandboxError::setup(
                format!("cannot create the instance directory {}", dir.display()),
                e,
            )
        })
}

/// How long the function gets between the agent's SIGTERM and SIGKILL on stop.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// An instance directory ready for its sandbox: the record (for the sandbox to complete) and
/// the instance's writable layer.
pub(super) struct PreparedDir {
    pub record: InstanceRecord,
    pub layer: WritableLayer,
}

/// The first steps of every start: the instance directory records its owner (so orphan
/// clean-up can tell a live instance from one left by a crashed fnvm), then the instance's
/// writable layer is created in it: a fresh one, or a copy of `layer_from` (a snapshot's). The
/// record is returned for the sandbox to complete (its processes and cgroup) as it starts them.
pub(super) fn prepare_instance_dir(
    home: &Home,
    dir: &std::path::Path,
    layer_from: Option<&std::path::Path>,
) -> Result<PreparedDir, SandboxError> {
    let record = InstanceRecord {
        owner: Some(ProcessId::current()),
        ..Default::default()
    };
    record.save(dir)?;
    let path = dir.join("writable.ext4");
    let layer = match layer_from {
        Some(source) => WritableLayer::copy_of(source, &path)?,
        None => WritableLayer::create(home, &path)?,
    };
    Ok(PreparedDir { record, layer })
}

/// What a sandbox removes when its instance stops: processes, mounts, devices, files.
pub(super) trait Teardown: Send {
    /// True once `teardown` has run: stopping again is a no-op.
    fn is_torn_down(&self) -> bool;
    fn teardown(&mut self) -> Result<(), SandboxError>;
    /// The host pid of the sandbox's process (agent or VMM) while it runs.
    fn sandbox_pid(&self) -> Option<i32>;
}

/// Measures a snapshot start once its first reply is in.
pub(super) type RestoreProbe = Box<dyn Fn() -> Option<RestoreReport> + Send + Sync>;

/// An instance whose agent is reached over `transport`, whatever runs it.
pub(super) struct AgentInstance<P: Teardown> {
    pub id: String,
    pub transport: HostTransport,
    pub exit: Arc<ExitState>,
    pub link: Option<Link>,
    pub parts: Mutex<P>,
    pub start: StartInfo,
    /// Snapshot starts only.
    pub restore_probe: Option<RestoreProbe>,
    pub restore_report: std::sync::OnceLock<Option<RestoreReport>>,
    /// The sandbox process's pidfd, for [`Instance::kill`] (which must not wait behind a stop
    /// in progress, holding `parts`).
    pub kill_switch: Option<std::os::fd::OwnedFd>,
}

impl<P: Teardown> Instance for AgentInstance<P> {
    fn id(&self) -> &str {
        &self.id
    }

    fn connect(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
        self.transport.connect(FUNCTION_PORT)
    }

    fn port_socket(&self) -> Option<std::path::PathBuf> {
        self.transport.port_socket(FUNCTION_PORT)
    }

    fn wait_exit(&self) -> ExitReport {
        self.exit.wait()
    }

    fn exited(&self) -> Option<ExitReport> {
        self.exit.get()
    }

    fn stop(&self) -> Result<(), SandboxError> {
        self.stop_within(STOP_GRACE)
    }

    fn stop_within(&self, grace: Duration) -> Result<(), SandboxError> {
        let mut parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        if parts.is_torn_down() {
            return Ok(());
        }
        self.exit.mark_stopping();
        if let Some(link) = &self.link {
            link.stop(&self.exit, grace);
        }
        // Recorded before the kill, so waiters learn "stopped", not "killed by signal 9".
        self.exit.record(None, None, "stopped".to_string());
        parts.teardown()
    }

    fn start_info(&self) -> StartInfo {
        self.start.clone()
    }

    fn kill(&self) {
        use std::os::fd::AsFd as _;
        if let Some(pidfd) = &self.kill_switch {
            child::signal_through(pidfd.as_fd(), libc::SIGKILL);
        }
    }

    fn sandbox_pid(&self) -> Option<i32> {
        let parts = self.parts.lock().unwrap_or_else(|p| p.into_inner());
        parts.sandbox_pid()
    }

    fn restore_report(&self) -> Option<RestoreReport> {
        let probe = self.restore_probe.as_ref()?;
        *self.restore_report.get_or_init(|| {
            let report = probe();
            if let Some(r) = &report {
                tracing::info!(instance = %self.id, "snapshot start: {r}");
            }
            report
        })
    }
}

impl<P: Teardown> Drop for AgentInstance<P> {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("stopping instance {}: {e}", self.id);
        }
    }
}
