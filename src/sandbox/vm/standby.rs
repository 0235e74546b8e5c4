//! Standby VMMs for the service's snapshot starts.
//!
//! A snapshot start in a fresh `fnvm-vmm --restore` first pays for the process start, the VM's
//! creation and the host kernel's waits behind memory-slot changes; only then does the guest
//! run. A standby VMM (`fnvm-vmm --standby`) has done all that before the request comes: the
//! start only sends it the snapshot to map and continue. A long-running service keeps one
//! standby warm per VM shape its snapshots use, and replaces each one it takes in the
//! background. (`fnvm run` starts one instance and gains nothing from it.)
//!
//! A standby lives in its own directory under the instances root with an instance record, so
//! the standbys of a crashed service are cleaned up like its instances
//! ([`crate::sandbox::cleanup_orphans`]). When taken, its API socket moves into the instance's
//! directory (a rename: the VMM keeps listening on it) and the instance takes over its process.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::limits::{VmmCgroup, VmmCgroups};
use super::vmm_api::VmmApi;
use crate::sandbox::exit::describe_status;
use crate::sandbox::instance::child::Spawned;
use crate::sandbox::instance::record::{new_instance_id, InstanceRecord, ProcessId};
use crate::sandbox::spawn::{Namespaces, Spawn};
use crate::sandbox::SandboxError;

/// The API socket's name, in a standby's directory and in an instance's.
pub const API_SOCKET: &str = "api.sock";
/// How many standbys per shape a service keeps, unless `FNVM_STANDBY_VMMS` says otherwise
/// (0: none, every snapshot start spawns its VMM).
pub const DEFAULT_PER_SHAPE: usize = 1;
/// A standby must be waiting on its socket this soon after it was spawned.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// After a standby failed to come up, its shape gets no new one for this long: a host that
/// cannot make them (out of memory, a broken VMM) is not asked again at every start.
const FAILURE_BACKOFF: Duration = Duration::from_secs(30);
/// A shape no start has asked for this long gives its standbys back.
const IDLE_SHAPE: Duration = Duration::from_secs(10 * 60);

/// The VM shape a standby is made for: a snapshot restores only into the same guest RAM
/// layout and vCPU count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VmShape {
    pub memory_mib: u32,
    pub vcpus: u8,
}

/// How many standbys per shape `FNVM_STANDBY_VMMS` asks for.
pub fn per_shape_from_env() -> Result<usize, SandboxError> {
    crate::sandbox::standby_count(
        "FNVM_STANDBY_VMMS",
        "standby VMMs per VM shape",
        DEFAULT_PER_SHAPE,
    )
}

/// One standby VMM waiting for its restore request. Dropped untaken, it is killed and its
/// directory removed.
pub struct StandbyVmm {
    child: Option<Spawned>,
    dir: PathBuf,
    /// Its cgroup (after the process: dropped, it kills what is left in it).
    cgroup: Option<VmmCgroup>,
    /// Its record, whose cgroup names go into the instance's when it is taken (boxed: a
    /// standby travels by value in the start's `Launch`).
    record: Box<InstanceRecord>,
}

impl StandbyVmm {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.pid)
    }

    /// The process has not ended.
    fn is_waiting(&self) -> bool {
        self.child.as_ref().is_some_and(|c| !c.has_ended())
    }

    /// Names the standby's cgroup in an instance's `record` (before the record is saved
    /// with the standby's process: the two go together).
    pub fn adopt_cgroup(&self, record: &mut InstanceRecord) {
        record.cgroup = self.record.cgroup.clone();
        record.cgroup_v2 = self.record.cgroup_v2;
        record.v1_cgroups = self.record.v1_cgroups.clone();
    }

    /// Gives the standby to an instance whose record already names its process and cgroup:
    /// the API socket moves to `api` (same filesystem; the VMM keeps listening on it) and the
    /// standby's directory goes. On error the standby is killed.
    pub fn into_instance(mut self, api: &Path) -> std::io::Result<(Spawned, Option<VmmCgroup>)> {
        std::fs::rename(self.dir.join(API_SOCKET), api)?;
        let child = self
            .child
            .take()
            .expect("a standby has its process until taken");
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "cannot remove a taken standby's directory: {e}");
        }
        Ok((child, self.cgroup.take()))
    }
}

impl Drop for StandbyVmm {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The warm standbys of one service, by shape.
pub struct StandbyVmms {
    shared: Arc<Shared>,
}

struct Shared {
    vmm: PathBuf,
    /// Where each standby's cgroup goes (None: no limits on this host).
    cgroups: Option<Arc<VmmCgroups>>,
    /// The instances root: standby directories sit beside instance directories.
    root: PathBuf,
    per_shape: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    shapes: HashMap<VmShape, Shape>,
    closed: bool,
}

#[derive(Default)]
struct Shape {
    warm: Vec<StandbyVmm>,
    spawning: usize,
    last_wanted: Option<Instant>,
    no_spawn_until: Option<Instant>,
}

impl StandbyVmms {
    /// Standbys of `vmm` under `root`, `per_shape` of each shape once a start asks for it,
    /// each in a cgroup of its own under `cgroups`.
    pub fn new(
        vmm: &Path,
        root: &Path,
        per_shape: usize,
        cgroups: Option<Arc<VmmCgroups>>,
    ) -> Self {
        StandbyVmms {
            shared: Arc::new(Shared {
                vmm: vmm.to_path_buf(),
                cgroups,
                root: root.to_path_buf(),
                per_shape,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// A warm standby of `shape`, if one is ready. Its replacement comes with the next
    /// [`Self::want`]: the caller asks once its start is done, so the two do not compete.
    pub fn take(&self, shape: VmShape) -> Option<StandbyVmm> {
        let (taken, stale) = {
            let mut st = self.shared.lock();
            let entry = st.shapes.entry(shape).or_default();
            entry.last_wanted = Some(Instant::now());
            let mut stale = Vec::new();
            let mut taken = None;
            while let Some(standby) = entry.warm.pop() {
                if standby.is_waiting() {
                    taken = Some(standby);
                    break;
                }
                tracing::warn!(pid = standby.pid(), "a standby VMM ended while waiting");
                stale.push(standby);
            }
            (taken, stale)
        };
        drop(stale);
        taken
    }

    /// Keeps standbys of `shape` warm: spawns in the background what it lacks.
    pub fn want(&self, shape: VmShape) {
        let stale = {
            let mut st = self.shared.lock();
            st.shapes.entry(shape).or_default().last_wanted = Some(Instant::now());
            Shared::replenish(&self.shared, &mut st, shape)
        };
        drop(stale);
    }

    /// How many standbys of `shape` are coming up now.
    pub fn spawning(&self, shape: VmShape) -> usize {
        self.shared
            .lock()
            .shapes
            .get(&shape)
            .map_or(0, |s| s.spawning)
    }

    /// How many standbys of `shape` are warm now.
    pub fn warm(&self, shape: VmShape) -> usize {
        self.shared
            .lock()
            .shapes
            .get(&shape)
            .map_or(0, |s| s.warm.len())
    }
}

impl Drop for StandbyVmms {
    /// Stops every warm standby; ones still coming up stop themselves when they are ready.
    fn drop(&mut self) {
        let warm: Vec<StandbyVmm> = {
            let mut st = self.shared.lock();
            st.closed = true;
            st.shapes.drain().flat_map(|(_, s)| s.warm).collect()
        };
        drop(warm);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Spawns what `shape` lacks, in the background; returns the standbys of shapes nobody
    /// asked for in a while, for the caller to drop outside the lock.
    fn replenish(shared: &Arc<Shared>, st: &mut State, shape: VmShape) -> Vec<StandbyVmm> {
        let now = Instant::now();
        let mut idle = Vec::new();
        for s in st.shapes.values_mut() {
            if s.last_wanted
                .is_some_and(|t| now.duration_since(t) > IDLE_SHAPE)
            {
                idle.append(&mut s.warm);
            }
        }
        if st.closed {
            return idle;
        }
        let entry = st.shapes.entry(shape).or_default();
        if entry.no_spawn_until.is_some_and(|t| now < t) {
            return idle;
        }
        while entry.warm.len() + entry.spawning < shared.per_shape {
            entry.spawning += 1;
            let shared = Arc::clone(shared);
            let spawned = std::thread::Builder::new()
                .name("standby-vmm".into())
                .spawn(move || {
                    let result =
                        spawn_standby(&shared.vmm, &shared.root, shared.cgroups.as_deref(), shape);
                    let mut st = shared.lock();
                    let closed = st.closed;
                    let entry = st.shapes.entry(shape).or_default();
                    entry.spawning -= 1;
                    match result {
                        Ok(standby) if !closed => entry.warm.push(standby),
                        Ok(standby) => {
                            drop(st);
                            drop(standby);
                        }
                        Err(e) => {
                            entry.no_spawn_until = Some(Instant::now() + FAILURE_BACKOFF);
                            tracing::warn!(?shape, "cannot start a standby VMM: {e}");
                        }
                    }
                });
            if let Err(e) = spawned {
                entry.spawning -= 1;
                tracing::warn!("cannot start a thread for a standby VMM: {e}");
                break;
            }
        }
        idle
    }
}

/// Starts `fnvm-vmm` with `args` as the sandbox runs every VMM: PID 1 of its own pid
/// namespace (it makes the rest of its jail itself), born in its cgroup, its own session (a
/// Ctrl-C at fnvm's terminal is fnvm's to handle), no inherited environment or stdin, its
/// output piped (the console and its last words).
pub(super) fn spawn_vmm(
    vmm: &Path,
    args: &[OsString],
    cgroup: Option<&VmmCgroup>,
) -> Result<Spawned, SandboxError> {
    // Test only: the VMM's test trigger (a forbidden system call on request), for the tests
    // that check a seccomp violation is reported and the instance replaced.
    let env: Vec<(&str, OsString)> = std::env::var_os("FNVM_VMM_TEST_TRIGGERS")
        .map(|v| ("FNVM_VMM_TEST_TRIGGERS", v))
        .into_iter()
        .collect();
    Spawn {
        program: vmm,
        args,
        env: &env,
        namespaces: Namespaces::Pid,
        cgroup: cgroup.map(VmmCgroup::cgroup),
        keep: &[],
        stdin: None,
    }
    .spawn()
    .map_err(|e| SandboxError::setup(format!("cannot start {}", vmm.display()), e))
}

/// Spawns `fnvm-vmm --standby` for `shape` in a new directory under `root` and waits until it
/// listens on its API socket (the VM exists by then).
fn spawn_standby(
    vmm: &Path,
    root: &Path,
    cgroups: Option<&VmmCgroups>,
    shape: VmShape,
) -> Result<StandbyVmm, SandboxError> {
    let id = new_instance_id();
    let dir = root.join(format!("standby-{id}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| SandboxError::setup(format!("cannot create {}", dir.display()), e))?;
    let mut record = InstanceRecord {
        owner: Some(ProcessId::current()),
        ..Default::default()
    };
    let cgroup_name = cgroups.map(|c| c.reserve(&id, &mut record));
    if let Err(e) = record.save(&dir) {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    let cgroup = match (cgroups, &cgroup_name) {
        (Some(c), Some(name)) => match c.create(name, shape.memory_mib, shape.vcpus) {
            Ok(cg) => Some(cg),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        },
        _ => None,
    };
    let api = dir.join(API_SOCKET);
    let mut args: Vec<OsString> = vec!["--standby".into()];
    args.extend(super::identity::vmm_args().into_iter().map(OsString::from));
    args.extend([
        "--memory".into(),
        shape.memory_mib.to_string().into(),
        "--vcpus".into(),
        shape.vcpus.to_string().into(),
        "--api-sock".into(),
        api.clone().into(),
    ]);
    let child = match spawn_vmm(vmm, &args, cgroup.as_ref()) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let mut standby = StandbyVmm {
        child: Some(child),
        dir,
        cgroup,
        record: Box::new(record.clone()),
    };
    record.sandbox = ProcessId::of(standby.pid());
    record.save(&standby.dir)?;
    standby.record = Box::new(record);
    let deadline = Instant::now() + READY_TIMEOUT;
    while !api.exists() {
        if !standby.is_waiting() {
            let child = standby.child.take().expect("the standby's process");
            let status = child.wait().ok();
            let mut stderr = String::new();
            {
                use std::io::Read;
                let _ = (&child.stderr).take(4096).read_to_string(&mut stderr);
            }
            let _ = std::fs::remove_dir_all(&standby.dir);
            return Err(SandboxError::Agent(format!(
                "fnvm-vmm --standby ended ({}): {}",
                status.map_or("status unknown".into(), describe_status),
                stderr.trim()
            )));
        }
        if Instant::now() > deadline {
            return Err(SandboxError::Agent(format!(
                "fnvm-vmm --standby did not listen on {} within {READY_TIMEOUT:?}",
                api.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(standby)
}

/// The restored VM's devices: its disks' backing files in slot order, its vsock socket and,
/// with egress, its passt socket.
pub(super) struct Devices<'a> {
    pub disks: &'a [PathBuf],
    pub vsock: &'a Path,
    pub net: Option<&'a Path>,
}

/// Restores the snapshot into a warm standby VMM, which becomes the instance's VMM: its
/// process goes into the instance record first (a crash leaves nothing behind), then its API
/// socket moves to `api`, then the restore request. On error the standby is stopped.
pub(super) fn restore_in_standby(
    standby: StandbyVmm,
    record: &mut InstanceRecord,
    dir: &Path,
    api: &VmmApi,
    snapshot: &Path,
    devices: &Devices<'_>,
) -> Result<(Spawned, Option<VmmCgroup>), SandboxError> {
    record.sandbox = ProcessId::of(standby.pid());
    standby.adopt_cgroup(record);
    record.save(dir)?;
    let (child, cgroup) = standby.into_instance(api.path()).map_err(|e| {
        SandboxError::setup(
            format!(
                "cannot move the standby's API socket to {}",
                api.path().display()
            ),
            e,
        )
    })?;
    match api.restore(snapshot, devices.disks, devices.vsock, devices.net) {
        Ok(ms) => {
            tracing::debug!("restored into a standby VMM in {ms:.2} ms");
            Ok((child, cgroup))
        }
        Err(e) => {
            child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}
