//! The VM sandbox: one `fnvm-vmm` process per instance, booting fnvm's guest kernel with the
//! agent as /init of a tiny initramfs, the rootfs image as read-only /dev/vda and the writable
//! layer as /dev/vdb, and talking to the agent over virtio-vsock (`<instance_dir>/vsock.sock`).
//! Above the transport the conversation with the agent is the process sandbox's
//! ([`crate::sandbox::link`]). Here: the sandbox and its start policy; beside it how a VMM is
//! launched ([`launch`]), what an instance holds ([`teardown`]), the snapshot store, standby
//! VMMs, the VMM's API client, the initramfs and the restore's measurements.
//!
//! Snapshot starts: the first boot start of a function version writes a snapshot of its VM as
//! soon as the server listens ([`snapshots`] keys and keeps it); later starts restore it
//! (`fnvm-vmm --restore`, memory mapped copy-on-write, the writable layer copied per instance),
//! reconnect to the agent (the vsock transport reset dropped the old streams) and refresh the
//! guest's RNG and clock. In the service, a restore goes into a warm standby VMM when one of
//! the right shape is ready ([`standby`]).
//!
//! Network: a function with egress gets a virtio-net device (`--net`) on a passt of its own,
//! running as the instance's uid, with the policy as host rules under that uid ([`egress`]);
//! the guest kernel configures eth0 itself from the `ip=` argument. `--network none`: no device.

mod egress;
pub mod identity;
pub mod initramfs;
mod launch;
pub mod limits;
mod restore_report;
pub mod snapshots;
pub mod standby;
mod teardown;
#[cfg(test)]
mod tests;
mod vmm_api;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fnvm_vmm::arch::x86_64::boot::KernelFormat;
use fnvm_vmm::host::HostCapabilities;

use egress::VmEgress;
use launch::{disk_args, shape_of, snapshot_layer, vmm_binary, Launch};
pub use launch::{guest_cmdline, vcpus_for};
use limits::VmmCgroups;
use restore_report::restore_report;
use snapshots::{Platform, SnapshotStore};
use standby::{restore_in_standby, spawn_vmm, StandbyVmms, API_SOCKET};
use teardown::VmParts;
use vmm_api::VmmApi;

use crate::home::Home;
use crate::network::HostNetwork;
use crate::sandbox::exit::{ended_reason, ExitState};
use crate::sandbox::instance::child::SandboxChild;
use crate::sandbox::instance::record::ProcessId;
use crate::sandbox::instance::{
    create_instance_dir, prepare_instance_dir, AgentInstance, PreparedDir, RestoreProbe, Teardown,
};
use crate::sandbox::link;
use crate::sandbox::link::clock::ClockSource;
use crate::sandbox::transport::HostTransport;
use crate::sandbox::{
    validate_spec, ColdStart, Instance, InstanceSpec, Sandbox, SandboxError, SandboxKind, StartInfo,
};

/// How long the guest may take to boot and answer on its control port.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts VM instances of one home: the binaries and kernel they boot, the snapshot store and
/// (in the service) the standby VMMs.
pub struct VmSandbox {
    home: Home,
    vmm: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// Warm standby VMMs for snapshot starts (the service only).
    standby: Option<StandbyVmms>,
    snapshots: Arc<SnapshotStore>,
    /// How functions with egress reach the network (their resolvers).
    host_network: HostNetwork,
    /// Where each VMM's cgroup goes (None: this host's cgroups are not writable).
    cgroups: Option<Arc<VmmCgroups>>,
}

impl VmSandbox {
    /// Checks the host (VMX/SVM) before anything else, then finds `fnvm-vmm`, the guest kernel
    /// (built on first use) and the agent's initramfs, and opens the snapshot store.
    pub fn new(home: &Home) -> Result<Self, SandboxError> {
        HostCapabilities::probe().check_can_boot(KernelFormat::BzImage)?;
        let vmm = vmm_binary()?;
        let kernel = crate::kernel::default_kernel()
            .map_err(|e| SandboxError::setup("cannot get the guest kernel", e))?;
        let agent = crate::agent_binary::agent_binary()
            .map_err(|e| SandboxError::setup("cannot find the agent", e))?;
        let initramfs = initramfs::cached(home, &agent)?;
        let snapshots = Arc::new(SnapshotStore::open(
            home,
            &Platform {
                kernel: kernel.clone(),
                initramfs: initramfs.clone(),
                vmm: vmm.clone(),
            },
        )?);
        Ok(VmSandbox {
            home: home.clone(),
            vmm,
            kernel,
            initramfs,
            snapshots,
            standby: None,
            host_network: HostNetwork::default(),
            cgroups: VmmCgroups::probe(home).map(Arc::new),
        })
    }

    /// Functions with egress reach the network as `network` says (its resolvers).
    pub fn with_host_network(mut self, network: HostNetwork) -> Self {
        self.host_network = network;
        self
    }

    /// Keeps `per_shape` standby VMMs warm for each VM shape that snapshot starts use (0:
    /// none). For a long-running service: a one-off start gains nothing from them.
    pub fn with_standby_vmms(mut self, per_shape: usize) -> Result<Self, SandboxError> {
        self.standby = match per_shape {
            0 => None,
            n => Some(StandbyVmms::new(
                &self.vmm,
                &crate::sandbox::instances_root(&self.home)?,
                n,
                self.cgroups.clone(),
            )),
        };
        Ok(self)
    }

    /// The `fnvm-vmm` arguments for one booted instance; `net`: the passt socket of an
    /// instance with egress (a network device, and its address on the kernel command line).
    pub fn vmm_args(
        &self,
        spec: &InstanceSpec,
        writable: &Path,
        vsock: &Path,
        net: Option<&Path>,
    ) -> Vec<String> {
        let cmdline = match net {
            Some(_) => format!("{} {}", guest_cmdline(), egress::ip_argument()),
            None => guest_cmdline(),
        };
        let mut args = vec![
            "--kernel".to_string(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            self.initramfs.display().to_string(),
            "--cmdline".into(),
            cmdline,
            "--memory".into(),
            spec.memory_mib.to_string(),
            "--vcpus".into(),
            vcpus_for(spec.memory_mib).to_string(),
        ];
        args.extend(disk_args(spec, writable, vsock));
        args.extend(net_args(net));
        args
    }
}

/// `--net SOCKET` for an instance with egress (after the disks and vsock: the device's slot).
fn net_args(net: Option<&Path>) -> Vec<String> {
    match net {
        Some(socket) => vec!["--net".into(), socket.display().to_string()],
        None => Vec::new(),
    }
}

impl Sandbox for VmSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Vm
    }

    fn discard_snapshot(
        &self,
        rootfs_image: &Path,
        start: &crate::sandbox::StartSpec,
        memory_mib: u32,
    ) {
        match self.snapshots.key_of(rootfs_image, start, memory_mib) {
            Ok(key) if self.snapshots.find(&key).is_some() => {
                tracing::info!(
                    snapshot = key.as_str(),
                    "removing the snapshot of a retired function version"
                );
                self.snapshots.remove(&key);
            }
            Ok(_) => {}
            // The rootfs image is gone: the key cannot be computed; such snapshots can never
            // be found again either, and go with the next platform change.
            Err(e) => tracing::debug!("no snapshot to discard: {e}"),
        }
    }

    /// The start policy: a snapshot start when this function version has a snapshot; if the
    /// restore fails, the snapshot is dropped (logged) and the instance boots instead. A boot
    /// start of a snapshotting spec writes the version's snapshot once its server is ready.
    fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, SandboxError> {
        validate_spec(&spec)?;
        let key = match spec.snapshot {
            true => Some(self.snapshots.key(&spec)?),
            false => None,
        };
        let shape = shape_of(&spec);
        let started = self.start_with_snapshots(spec, key.as_ref());
        if let (Some(_), Some(standby)) = (&key, &self.standby) {
            // This version's next starts restore its snapshot: have a VMM of its shape ready
            // (made now, after this start, so the two do not compete for the CPU).
            standby.want(shape);
        }
        started
    }
}

impl VmSandbox {
    /// [`Sandbox::start`] once the snapshot key is known (None: no snapshots for this spec).
    fn start_with_snapshots(
        &self,
        spec: InstanceSpec,
        key: Option<&snapshots::SnapshotKey>,
    ) -> Result<Box<dyn Instance>, SandboxError> {
        let mut note = None;
        if let Some(snapshot) = key.and_then(|k| self.snapshots.use_snapshot(k)) {
            let standby = self.standby.as_ref().and_then(|s| s.take(shape_of(&spec)));
            match self.attempt(
                &spec,
                Launch::Restore {
                    snapshot: &snapshot,
                    standby,
                },
            ) {
                Ok(instance) => return Ok(instance),
                // The spec itself cannot run (a boot would fail the same way): not the
                // snapshot's fault.
                Err(e @ SandboxError::BadSpec(_)) => return Err(e),
                Err(e) => {
                    let why = e.to_string();
                    tracing::warn!(
                        instance = %spec.id,
                        "snapshot start failed, booting instead: {why}"
                    );
                    if let Some(key) = key {
                        self.snapshots.invalidate(key, &why);
                    }
                    note = Some(format!(
                        "the snapshot could not be restored ({why}); booted instead"
                    ));
                }
            }
        }
        let write = key.and_then(|k| self.snapshots.begin_write(k));
        let mut instance = self.attempt(&spec, Launch::Boot { write })?;
        if let Some(note) = note {
            instance.start.note = Some(match instance.start.note.take() {
                Some(more) => format!("{note}; {more}"),
                None => note,
            });
        }
        Ok(instance)
    }
}

/// What a start attempt hands its instance: how it will learn the instance's end, how it
/// started, and (a snapshot start) how to measure the restore.
struct Started {
    exit: Arc<ExitState>,
    start: StartInfo,
    restore_probe: Option<RestoreProbe>,
}

/// A started VM instance.
type VmInstance = AgentInstance<VmParts>;

impl VmSandbox {
    /// One start attempt in a fresh instance directory; on failure everything is torn down.
    fn attempt(
        &self,
        spec: &InstanceSpec,
        launch: Launch<'_>,
    ) -> Result<Box<VmInstance>, SandboxError> {
        let dir = spec.instance_dir.clone();
        let vsock = dir.join("vsock.sock");
        if vsock.as_os_str().len() + 6 >= 108 {
            return Err(SandboxError::BadSpec(format!(
                "the instance directory {} is too long for a Unix socket path (108 bytes)",
                dir.display()
            )));
        }
        create_instance_dir(&dir)?;
        let mut parts = VmParts {
            dir,
            layer: None,
            child: None,
            cgroup: None,
            link: None,
            egress: None,
            torn_down: false,
        };
        match self.start_in(spec, &vsock, launch, &mut parts) {
            Ok(Started {
                exit,
                start,
                restore_probe,
            }) => {
                let link = parts.link.take();
                let kill_switch = parts.child.as_ref().and_then(|c| c.kill_switch());
                Ok(Box::new(AgentInstance {
                    id: spec.id.clone(),
                    transport: HostTransport::Vsock { uds: vsock },
                    exit,
                    link,
                    parts: Mutex::new(parts),
                    start,
                    restore_probe,
                    restore_report: Default::default(),
                    kill_switch,
                }))
            }
            Err(err) => {
                let _ = parts.teardown();
                Err(err)
            }
        }
    }

    fn start_in(
        &self,
        spec: &InstanceSpec,
        vsock: &Path,
        mut launch: Launch<'_>,
        parts: &mut VmParts,
    ) -> Result<Started, SandboxError> {
        let dir = &spec.instance_dir;
        let api = VmmApi::new(&dir.join(API_SOCKET));
        let (layer_from, standby) = match &mut launch {
            Launch::Restore { snapshot, standby } => {
                (Some(snapshot_layer(snapshot)), standby.take())
            }
            Launch::Boot { .. } => (None, None),
        };
        let PreparedDir { mut record, layer } =
            prepare_instance_dir(&self.home, dir, layer_from.as_deref())?;
        parts.layer = Some(layer);
        // A restored VM gets a new passt, uid and rules like a booted one (its snapshot was
        // taken with the same network mode: the mode is part of the function version).
        let net = match spec.network.has_egress() {
            true => Some(
                parts
                    .egress
                    .insert(VmEgress::start(
                        &self.host_network,
                        &spec.network,
                        dir,
                        &mut record,
                    )?)
                    .socket(),
            ),
            false => None,
        };
        let layer = parts.layer.as_ref().expect("just inserted");
        let mut args = match &launch {
            Launch::Boot { .. } => self.vmm_args(spec, layer.path(), vsock, net.as_deref()),
            Launch::Restore { snapshot, .. } => {
                let mut args = vec!["--restore".to_string(), snapshot.display().to_string()];
                args.extend(disk_args(spec, layer.path(), vsock));
                args.extend(net_args(net.as_deref()));
                args
            }
        };
        args.extend(["--api-sock".to_string(), api.path().display().to_string()]);
        // The VMM's jail (fnvm-vmm --jail): the instance's directory, and where a boot that
        // snapshots writes its snapshot.
        args.extend(["--jail".to_string(), dir.display().to_string()]);
        // And who it becomes in there ([`identity`]): the snapshot's entry is lent to it.
        args.extend(identity::vmm_args());
        if let Launch::Boot { write } = &mut launch {
            // An entry that went meanwhile (another start removed the snapshot it could not
            // restore) is no place to write: this boot writes none, the next one will.
            if let Some(Err(e)) = write.as_ref().map(|w| identity::lend(&w.entry_dir())) {
                tracing::warn!(instance = %spec.id, "booting without writing a snapshot: {e}");
                *write = None;
            }
            if let Some(write) = write {
                args.extend([
                    "--jail".to_string(),
                    write.entry_dir().display().to_string(),
                ]);
            }
        }

        let exit = ExitState::new(|| None);
        let restored_standby = match (standby, &launch) {
            (Some(standby), Launch::Restore { snapshot, .. }) => {
                let disks = [spec.rootfs_image.clone(), layer.path().to_path_buf()];
                let devices = standby::Devices {
                    disks: &disks,
                    vsock,
                    net: net.as_deref(),
                };
                match restore_in_standby(standby, &mut record, dir, &api, snapshot, &devices) {
                    Ok((child, cgroup)) => {
                        parts.cgroup = cgroup;
                        Some(child)
                    }
                    Err(e) => {
                        tracing::warn!(
                            instance = %spec.id,
                            "a standby VMM could not restore the snapshot; restoring in a new VMM: {e}"
                        );
                        // What the standby may have bound before it was stopped.
                        let _ = std::fs::remove_file(api.path());
                        let _ = std::fs::remove_file(vsock);
                        None
                    }
                }
            }
            _ => None,
        };
        let standby = restored_standby.is_some();
        let vmm_started = Instant::now();
        let child = match restored_standby {
            Some(child) => child,
            None => {
                if let Some(cgroups) = &self.cgroups {
                    // Named in the record before it exists (see [`limits`]).
                    let name = cgroups.reserve(&spec.id, &mut record);
                    record.save(dir)?;
                    let shape = shape_of(spec);
                    parts.cgroup = Some(cgroups.create(&name, shape.memory_mib, shape.vcpus)?);
                }
                let args: Vec<OsString> = args.into_iter().map(OsString::from).collect();
                spawn_vmm(&self.vmm, &args, parts.cgroup.as_ref())?
            }
        };
        let exit_for_child = exit.clone();
        let child = parts.child.insert(SandboxChild::adopt_spawned(
            "vm",
            child,
            move |status, tail| {
                exit_for_child.record(
                    None,
                    None,
                    ended_reason("the VM ended: fnvm-vmm", status, &tail),
                );
            },
        ));
        record.sandbox = ProcessId::of(child.pid());
        record.save(dir)?;
        let vmm_pid = child.pid();

        let child_ref: &SandboxChild = child;
        // The waiter records the ending (with the process's last words) before the status is
        // visible, so the link finds that record first.
        let dead = || {
            child_ref
                .status()
                .map(|s| ended_reason("the VM ended: fnvm-vmm", s, &child_ref.tail()))
        };
        let transport = HostTransport::Vsock {
            uds: vsock.to_path_buf(),
        };
        match launch {
            Launch::Restore { snapshot, .. } => {
                let link = link::resume(
                    &transport,
                    spec.on_log.clone(),
                    exit.clone(),
                    &dead,
                    RESTORE_TIMEOUT,
                )?;
                parts.link = Some(link);
                let memory = snapshot.join(fnvm_vmm::snapshot::MEMORY_FILE);
                let probe: RestoreProbe =
                    Box::new(move || restore_report(vmm_pid, &api, &memory, standby));
                let start = StartInfo {
                    kind: ColdStart::Snapshot,
                    note: None,
                    phases: Vec::new(),
                };
                Ok(Started {
                    exit,
                    start,
                    restore_probe: Some(probe),
                })
            }
            Launch::Boot { write } => {
                let link = link::start(
                    &transport,
                    ClockSource::Own,
                    &spec.start,
                    spec.on_log.clone(),
                    exit.clone(),
                    &dead,
                    BOOT_TIMEOUT,
                    // No devices cgroup in a guest: the agent's nodev mounts and the dropped
                    // CAP_MKNOD keep the function off devices there.
                    &|| Ok(()),
                )?;
                let phases =
                    link.agent_times()
                        .phases(vmm_started, "VMM start → agent answered", true);
                parts.link = Some(link);
                // Snapshot now, while the server is listening and before any request could
                // leave its data (or a caller's credentials) in guest memory.
                let note = write.map(|write| {
                    let started = Instant::now();
                    let written = api.snapshot(&write.vm_dir());
                    // Root's again before anything restores from it (or the VMM could change it).
                    let reclaimed = identity::reclaim(&write.entry_dir());
                    let written = written.and_then(|ms| reclaimed.map(|()| ms));
                    match written {
                        Ok(vmm_ms) => {
                            write.written();
                            tracing::info!(
                                instance = %spec.id,
                                "snapshot written to {} in {vmm_ms:.1} ms (VM paused), {} ms in all",
                                write.vm_dir().display(),
                                started.elapsed().as_millis()
                            );
                            format!(
                                "snapshot written for later starts in {} ms",
                                started.elapsed().as_millis()
                            )
                        }
                        Err(e) => {
                            tracing::warn!(instance = %spec.id, "cannot snapshot: {e}");
                            format!("no snapshot written ({e})")
                        }
                    }
                });
                let start = StartInfo {
                    kind: ColdStart::Boot,
                    note,
                    phases,
                };
                Ok(Started {
                    exit,
                    start,
                    restore_probe: None,
                })
            }
        }
    }
}

/// How long a restored VM may take until its agent answers Refresh.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);
