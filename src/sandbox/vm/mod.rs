//! The VM sandbox: one `fnvm-vmm` process per instance, booting fnvm's guest kernel with the
//! agent as /init of a tiny initramfs, the rootfs image as read-only /dev/vda and the writable
//! layer as /dev/vdb, and talking to the agent over virtio-vsock (`<instance_dir>/vsock.sock`).
//! The control flow above the transport is the process sandbox's ([`crate::sandbox::link`]).
//!
//! Snapshot starts: the first boot start of a function version writes a snapshot of its VM as
//! soon as the server listens ([`snapshots`] keys and keeps it); later starts restore it
//! (`fnvm-vmm --restore`, memory mapped copy-on-write, the writable layer copied per instance),
//! reconnect to the agent (the vsock transport reset dropped the old streams) and refresh the
//! guest's RNG and clock. In the service, a restore goes into a warm standby VMM when one of
//! the right shape is ready ([`standby`]).

pub mod initramfs;
pub mod snapshots;
pub mod standby;
mod vmm_api;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fnvm_vmm::arch::x86_64::boot::KernelFormat;
use fnvm_vmm::host::HostCapabilities;
use fnvm_vmm::vm::DEFAULT_CMDLINE;

use snapshots::{Platform, SnapshotStore, Writing};
use standby::{vmm_command, StandbyVmm, StandbyVmms, VmShape, API_SOCKET};
use vmm_api::VmmApi;

use crate::sandbox::exit::{ended_reason, ExitState};
use crate::sandbox::instance::child::SandboxChild;
use crate::sandbox::instance::record::ProcessId;
use crate::sandbox::instance::writable_layer::WritableLayer;
use crate::sandbox::instance::{prepare_instance_dir, AgentInstance, RestoreProbe, Teardown};
use crate::sandbox::link::clock::ClockSource;
use crate::sandbox::link::{self as control, Control};
use crate::sandbox::transport::HostTransport;
use crate::sandbox::{
    validate_spec, ColdStart, Instance, InstanceSpec, RestoreReport, Sandbox, SandboxError,
    SandboxKind, StartInfo,
};
use crate::home::Home;

/// How long the guest may take to boot and answer on its control port.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// The kernel command line: fnvm's defaults plus where the agent finds its disks.
pub fn guest_cmdline() -> String {
    format!("{DEFAULT_CMDLINE} fnvm.rootfs=/dev/vda fnvm.writable=/dev/vdb")
}

/// One vCPU, two from 1536 MiB up (more memory buys more CPU, as in the cloud).
pub fn vcpus_for(memory_mib: u32) -> u8 {
    if memory_mib >= 1536 {
        2
    } else {
        1
    }
}

/// The shape of an instance's VM: what a standby VMM must match to restore its snapshot.
fn shape_of(spec: &InstanceSpec) -> VmShape {
    VmShape {
        memory_mib: spec.memory_mib,
        vcpus: vcpus_for(spec.memory_mib),
    }
}

pub struct VmSandbox {
    home: Home,
    vmm: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
    /// Warm standby VMMs for snapshot starts (the service only).
    standby: Option<StandbyVmms>,
    snapshots: Arc<SnapshotStore>,
}

/// How one attempt starts its VM.
enum Launch<'a> {
    /// Boot the kernel; snapshot the instance once ready when `write` holds the claim.
    Boot { write: Option<Writing> },
    /// Restore the snapshot in this `fnvm-vmm` snapshot directory, into `standby` if given
    /// (else, or if the standby cannot take it, in a new VMM).
    Restore {
        snapshot: &'a Path,
        standby: Option<StandbyVmm>,
    },
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
        })
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
            )),
        };
        Ok(self)
    }

    /// The `fnvm-vmm` arguments for one booted instance.
    pub fn vmm_args(&self, spec: &InstanceSpec, writable: &Path, vsock: &Path) -> Vec<String> {
        let mut args = vec![
            "--kernel".to_string(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            self.initramfs.display().to_string(),
            "--cmdline".into(),
            guest_cmdline(),
            "--memory".into(),
            spec.memory_mib.to_string(),
            "--vcpus".into(),
            vcpus_for(spec.memory_mib).to_string(),
        ];
        args.extend(disk_args(spec, writable, vsock));
        args
    }
}

/// The disks and vsock, in the slot order a snapshot records: rootfs, writable layer, vsock.
fn disk_args(spec: &InstanceSpec, writable: &Path, vsock: &Path) -> Vec<String> {
    vec![
        "--disk".into(),
        format!("{}:ro", spec.rootfs_image.display()),
        "--disk".into(),
        writable.display().to_string(),
        "--vsock".into(),
        vsock.display().to_string(),
    ]
}

/// The snapshot's copy of the writable layer (virtio slot 1, see [`disk_args`]).
fn snapshot_layer(snapshot: &Path) -> PathBuf {
    snapshot.join("disk-1.img")
}

/// `fnvm-vmm` next to the running executable (or next to `target/<profile>/` for test binaries
/// in `target/<profile>/deps/`).
fn vmm_binary() -> Result<PathBuf, SandboxError> {
    let exe = std::env::current_exe()
        .map_err(|e| SandboxError::setup("cannot find the running fnvm executable", e))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let mut candidates = vec![dir.join("fnvm-vmm")];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(profile) = dir.parent() {
            candidates.push(profile.join("fnvm-vmm"));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            SandboxError::setup(
                format!("fnvm-vmm not found at {}", candidates[0].display()),
                "it is installed next to fnvm; build it with `cargo build -p fnvm-vmm`",
            )
        })
}

impl Sandbox for VmSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Vm
    }

    fn discard_snapshot(&self, rootfs_image: &Path, start: &crate::sandbox::StartSpec, memory_mib: u32) {
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
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                SandboxError::setup(format!("cannot create {}", parent.display()), e)
            })?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                SandboxError::setup(
                    format!("cannot create the instance directory {}", dir.display()),
                    e,
                )
            })?;
        let mut parts = VmParts {
            dir,
            layer: None,
            child: None,
            control: None,
            torn_down: false,
        };
        match self.start_in(spec, &vsock, launch, &mut parts) {
            Ok((exit, start, restore_probe)) => {
                let control = parts.control.take();
                Ok(Box::new(AgentInstance {
                    id: spec.id.clone(),
                    transport: HostTransport::Vsock { uds: vsock },
                    exit,
                    control,
                    parts: Mutex::new(parts),
                    start,
                    restore_probe,
                    restore_report: Default::default(),
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
    ) -> Result<(Arc<ExitState>, StartInfo, Option<RestoreProbe>), SandboxError> {
        let dir = &spec.instance_dir;
        let api = VmmApi::new(&dir.join(API_SOCKET));
        let (layer_from, standby) = match &mut launch {
            Launch::Restore { snapshot, standby } => {
                (Some(snapshot_layer(snapshot)), standby.take())
            }
            Launch::Boot { .. } => (None, None),
        };
        let (mut record, layer) = prepare_instance_dir(&self.home, dir, layer_from.as_deref())?;
        let layer = parts.layer.insert(layer);
        let mut args = match &launch {
            Launch::Boot { .. } => self.vmm_args(spec, layer.path(), vsock),
            Launch::Restore { snapshot, .. } => {
                let mut args = vec!["--restore".to_string(), snapshot.display().to_string()];
                args.extend(disk_args(spec, layer.path(), vsock));
                args
            }
        };
        args.extend(["--api-sock".to_string(), api.path().display().to_string()]);

        let exit = ExitState::new(|| None);
        let restored_standby = match (standby, &launch) {
            (Some(standby), Launch::Restore { snapshot, .. }) => {
                let disks = [spec.rootfs_image.clone(), layer.path().to_path_buf()];
                match restore_in_standby(standby, &mut record, dir, &api, snapshot, &disks, vsock) {
                    Ok(child) => Some(child),
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
            None => vmm_command(&self.vmm).args(&args).spawn().map_err(|e| {
                SandboxError::setup(format!("cannot start {}", self.vmm.display()), e)
            })?,
        };
        let exit_for_child = exit.clone();
        let child = parts.child.insert(
            SandboxChild::adopt("vm", child, move |status, tail| {
                exit_for_child.record(
                    None,
                    None,
                    ended_reason("the VM ended: fnvm-vmm", status, &tail),
                );
            })
            .map_err(|e| SandboxError::setup("cannot watch the VMM process", e))?,
        );
        record.sandbox = ProcessId::of(child.pid());
        record.save(dir)?;
        let vmm_pid = child.pid();

        let child_ref: &SandboxChild = child;
        // The waiter records the ending (with the process's last words) before the status is
        // visible, so the control flow finds that record first.
        let dead = || {
            child_ref.status().map(|s| {
                (
                    None,
                    None,
                    ended_reason("the VM ended: fnvm-vmm", s, &child_ref.tail()),
                )
            })
        };
        let transport = HostTransport::Vsock {
            uds: vsock.to_path_buf(),
        };
        match launch {
            Launch::Restore { snapshot, .. } => {
                let control = control::resume(
                    &transport,
                    spec.on_log.clone(),
                    exit.clone(),
                    &dead,
                    RESTORE_TIMEOUT,
                )?;
                parts.control = Some(control);
                let memory = snapshot.join(fnvm_vmm::snapshot::MEMORY_FILE);
                let probe: RestoreProbe =
                    Box::new(move || restore_report(vmm_pid, &api, &memory, standby));
                let start = StartInfo {
                    kind: ColdStart::Snapshot,
                    note: None,
                    phases: Vec::new(),
                };
                Ok((exit, start, Some(probe)))
            }
            Launch::Boot { write } => {
                let control = control::start(
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
                    control
                        .agent_times()
                        .phases(vmm_started, "VMM start → agent answered", true);
                parts.control = Some(control);
                // Snapshot now, while the server is listening and before any request could
                // leave its data (or a caller's credentials) in guest memory.
                let note = write.map(|write| {
                    let started = Instant::now();
                    match api.snapshot(&write.vm_dir()) {
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
                Ok((exit, start, None))
            }
        }
    }
}

/// How long a restored VM may take until its agent answers Refresh.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);

/// Restores the snapshot into a warm standby VMM, which becomes the instance's VMM: its
/// process goes into the instance record first (a crash leaves nothing behind), then its API
/// socket moves to `api`, then the restore request. On error the standby is stopped.
fn restore_in_standby(
    standby: StandbyVmm,
    record: &mut crate::sandbox::instance::record::InstanceRecord,
    dir: &Path,
    api: &VmmApi,
    snapshot: &Path,
    disks: &[PathBuf],
    vsock: &Path,
) -> Result<std::process::Child, SandboxError> {
    record.sandbox = ProcessId::of(standby.pid());
    record.save(dir)?;
    let mut child = standby.into_instance(api.path()).map_err(|e| {
        SandboxError::setup(
            format!(
                "cannot move the standby's API socket to {}",
                api.path().display()
            ),
            e,
        )
    })?;
    match api.restore(snapshot, disks, vsock) {
        Ok(ms) => {
            tracing::debug!("restored into a standby VMM in {ms:.2} ms");
            Ok(child)
        }
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

/// Measures a restore at the instance's first reply: the VMM's resume time, the guest pages
/// mapped in from the snapshot's memory file, the VMM process's major faults.
fn restore_report(
    vmm_pid: i32,
    api: &VmmApi,
    memory: &Path,
    standby: bool,
) -> Option<RestoreReport> {
    let metrics = match api.metrics() {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("cannot read the restore's metrics: {e}");
            return None;
        }
    };
    let resumed_us = metrics.restore.map(|r| r.resumed_us)?;
    let smaps = std::fs::read_to_string(format!("/proc/{vmm_pid}/smaps")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{vmm_pid}/stat")).ok()?;
    let memory = std::fs::canonicalize(memory).unwrap_or_else(|_| memory.to_path_buf());
    Some(RestoreReport {
        resume_ms: resumed_us as f64 / 1000.0,
        standby,
        pages_faulted: resident_kib_of_file(&smaps, &memory) / 4,
        major_faults: major_faults(&stat).unwrap_or_default(),
    })
}

/// Sums `Rss:` (KiB) over the mappings of `file` in a `/proc/PID/smaps` text.
fn resident_kib_of_file(smaps: &str, file: &Path) -> u64 {
    let file = file.to_string_lossy();
    let mut in_file = false;
    let mut kib = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            // A mapping header: range perms offset dev inode [path]
            in_file = line.split_whitespace().nth(5) == Some(&*file);
        } else if in_file && first == "Rss:" {
            kib += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    kib
}

/// `majflt` from a `/proc/PID/stat` text (field 12; the name in field 2 may hold spaces).
fn major_faults(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(9)?.parse().ok()
}

struct VmParts {
    dir: PathBuf,
    layer: Option<WritableLayer>,
    child: Option<SandboxChild>,
    control: Option<Control>,
    torn_down: bool,
}

impl Teardown for VmParts {
    fn is_torn_down(&self) -> bool {
        self.torn_down
    }

    fn teardown(&mut self) -> Result<(), SandboxError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(control) = self.control.take() {
            control.close();
        }
        if let Some(child) = self.child.take() {
            child.kill_and_reap();
        }
        self.layer.take();
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SandboxError::setup(
                format!("cannot remove {}", self.dir.display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    #[test]
    fn the_guest_finds_its_disks_on_the_command_line() {
        let cmdline = guest_cmdline();
        assert!(cmdline.starts_with(DEFAULT_CMDLINE));
        assert!(cmdline.ends_with(" fnvm.rootfs=/dev/vda fnvm.writable=/dev/vdb"));
        assert_eq!(vcpus_for(128), 1);
        assert_eq!(vcpus_for(3072), 2);
    }

    #[test]
    fn without_vmx_or_svm_the_vm_sandbox_is_refused_with_the_hosts_message() {
        let host = HostCapabilities::probe();
        if host.kvm && host.hardware_virtualization {
            eprintln!("SKIP: this host has VMX/SVM; the refusal cannot be observed here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_path_buf())).unwrap();
        let err = crate::sandbox::create(SandboxKind::Vm, &home)
            .err()
            .expect("refused");
        assert!(matches!(err, SandboxError::Host(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("--sandbox process") || text.contains("/dev/kvm"),
            "{text}"
        );
        // Nothing was built or cached for a refused sandbox.
        assert!(!dir.path().join("kernels").exists());
    }

    /// The restore report counts the pages of the snapshot's memory file a process has mapped
    /// in: checked on this test process with a file mapped privately, as the VMM maps it.
    #[test]
    fn pages_faulted_from_a_privately_mapped_file_are_counted_from_smaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 * 4096).unwrap();
        drop(file);
        let file = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh private mapping of a file we own; unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                64 * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        for page in [0usize, 3, 10, 63] {
            // SAFETY: inside the 64-page mapping.
            unsafe { std::ptr::write_volatile((addr as *mut u8).add(page * 4096), 1) };
        }
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let canonical = std::fs::canonicalize(&path).unwrap();
        let kib = resident_kib_of_file(&smaps, &canonical);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(addr, 64 * 4096) };
        assert_eq!(kib / 4, 4, "four pages touched");
        assert_eq!(resident_kib_of_file(&smaps, Path::new("/no/such/file")), 0);
    }

    #[test]
    fn major_faults_are_read_past_a_process_name_with_spaces() {
        let stat = "42 (fnvm vmm) S 1 42 42 0 -1 4194560 150 0 7 0 12 3 0 0 20 0 1 0 100";
        assert_eq!(major_faults(stat), Some(7));
        assert_eq!(major_faults("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(major_faults(&own).is_some());
    }

    /// `fnvm-vmm` for tests: the one next to this test binary, built first if missing.
    fn test_vmm() -> PathBuf {
        if let Ok(p) = vmm_binary() {
            return p;
        }
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "--release", "-p", "fnvm-vmm"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building fnvm-vmm failed");
        vmm_binary().expect("fnvm-vmm after building it")
    }

    /// A running tiny guest whose serial bytes arrive on `out`.
    struct TinyVm {
        child: std::process::Child,
        out: std::sync::mpsc::Receiver<u8>,
    }

    impl TinyVm {
        fn spawn(vmm: &Path, args: &[&std::ffi::OsStr]) -> Self {
            let child = Command::new(vmm)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("fnvm-vmm starts");
            Self::adopt(child)
        }

        /// A VMM spawned elsewhere with its stdout piped.
        fn adopt(mut child: std::process::Child) -> Self {
            let mut stdout = child.stdout.take().unwrap();
            let (tx, out) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut b = [0u8; 1];
                while stdout.read_exact(&mut b).is_ok() && tx.send(b[0]).is_ok() {}
            });
            TinyVm { child, out }
        }

        fn expect_running(&self) {
            let byte = self.out.recv_timeout(Duration::from_secs(30));
            assert_eq!(byte, Ok(b'x'), "the tiny guest writes to its serial port");
        }
    }

    impl Drop for TinyVm {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// The host's side of snapshots against the real `fnvm-vmm` with a tiny guest under
    /// /dev/kvm: the API client snapshots a running VM, a VM restored from it runs, and the
    /// restore report reads its resume time and the guest pages it faulted in.
    #[test]
    fn the_vmm_client_snapshots_a_running_vm_and_measures_its_restore() {
        if !Path::new("/dev/kvm").exists() {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED (no /dev/kvm): the VMM client test did NOT run"
            );
            return;
        }
        let vmm = test_vmm();
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("guest.elf");
        std::fs::write(&kernel, fnvm_vmm::tiny_guest::serial_loop()).unwrap();
        let api1 = dir.path().join("api1.sock");
        let booted = TinyVm::spawn(
            &vmm,
            &[
                "--kernel".as_ref(),
                kernel.as_os_str(),
                "--api-sock".as_ref(),
                api1.as_os_str(),
            ],
        );
        booted.expect_running();
        let snapshot = dir.path().join("snap");
        let ms = VmmApi::new(&api1).snapshot(&snapshot).expect("snapshot");
        assert!(ms > 0.0);
        assert!(snapshot.join(fnvm_vmm::snapshot::MEMORY_FILE).is_file());
        // A refused request comes back as an error naming the socket and the VMM's reason.
        let err = VmmApi::new(&api1)
            .snapshot(&snapshot)
            .unwrap_err()
            .to_string();
        assert!(err.contains("api1.sock") && err.contains("exists"), "{err}");
        // Not restored: no restore report.
        assert!(restore_report(
            booted.child.id() as i32,
            &VmmApi::new(&api1),
            &snapshot.join("memory"),
            false
        )
        .is_none());
        drop(booted);

        let api2 = dir.path().join("api2.sock");
        let restored = TinyVm::spawn(
            &vmm,
            &[
                "--restore".as_ref(),
                snapshot.as_os_str(),
                "--api-sock".as_ref(),
                api2.as_os_str(),
            ],
        );
        restored.expect_running();
        let report = restore_report(
            restored.child.id() as i32,
            &VmmApi::new(&api2),
            &snapshot.join(fnvm_vmm::snapshot::MEMORY_FILE),
            false,
        )
        .expect("a restored VMM reports its restore");
        assert!(report.resume_ms > 0.0, "{report}");
        // At least the page of code the guest runs came from the snapshot's memory file, and
        // far from all of its 128 MiB.
        assert!(
            report.pages_faulted >= 1 && report.pages_faulted < 128 * 256 / 2,
            "{report}"
        );
    }

    fn kvm_or_skip(what: &str) -> bool {
        if Path::new("/dev/kvm").exists() {
            return true;
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED (no /dev/kvm): {what} did NOT run"
        );
        false
    }

    /// A snapshot of the running tiny guest (128 MiB, one vCPU: the VMM's defaults) in `dir`.
    fn tiny_guest_snapshot(vmm: &Path, dir: &Path) -> PathBuf {
        let kernel = dir.join("guest.elf");
        std::fs::write(&kernel, fnvm_vmm::tiny_guest::serial_loop()).unwrap();
        let api = dir.join("booted.sock");
        let booted = TinyVm::spawn(
            vmm,
            &[
                "--kernel".as_ref(),
                kernel.as_os_str(),
                "--api-sock".as_ref(),
                api.as_os_str(),
            ],
        );
        booted.expect_running();
        let snapshot = dir.join("snap");
        VmmApi::new(&api).snapshot(&snapshot).expect("snapshot");
        snapshot
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A tiny guest's snapshot (128 MiB) and a warm standby VMM of `memory_mib` for it.
    struct StandbyWorld {
        _dir: tempfile::TempDir,
        snapshot: PathBuf,
        /// Where the standbys' directories are (an instances root).
        root: PathBuf,
        shape: VmShape,
        standbys: StandbyVmms,
    }

    fn standby_world(memory_mib: u32) -> StandbyWorld {
        let vmm = test_vmm();
        let dir = tempfile::tempdir().unwrap();
        let snapshot = tiny_guest_snapshot(&vmm, dir.path());
        let root = dir.path().join("instances");
        std::fs::create_dir(&root).unwrap();
        let shape = VmShape {
            memory_mib,
            vcpus: 1,
        };
        let standbys = StandbyVmms::new(&vmm, &root, 1);
        assert!(
            standbys.take(shape).is_none(),
            "nothing is warm before it is wanted"
        );
        standbys.want(shape);
        wait_for("a warm standby", || standbys.warm(shape) == 1);
        StandbyWorld {
            _dir: dir,
            snapshot,
            root,
            shape,
            standbys,
        }
    }

    /// The service's standby VMMs against the real `fnvm-vmm` under /dev/kvm: one of the tiny
    /// guest's shape comes up in its own recorded directory (cleanup finds it after a crash),
    /// restores a snapshot on the host's path (instance record, API socket moved into the
    /// instance directory, restore request) and runs the guest; a replacement comes up in the
    /// background, and dropping the set stops it.
    #[test]
    fn a_standby_vmm_becomes_a_restored_instance_and_is_replaced() {
        use crate::sandbox::instance::record::{InstanceRecord, ProcessId};
        if !kvm_or_skip("the standby VMM test") {
            return;
        }
        let StandbyWorld {
            _dir,
            snapshot,
            root,
            shape,
            standbys,
        } = standby_world(128);
        let standby_dirs = || -> Vec<PathBuf> {
            std::fs::read_dir(&root)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .starts_with("standby-")
                })
                .collect()
        };
        let [standby_dir] = standby_dirs().try_into().expect("one standby directory");
        let record = InstanceRecord::load(&standby_dir).expect("a standby's record");
        assert_eq!(record.owner, Some(ProcessId::current()));
        assert!(record.sandbox.expect("its process").is_alive());

        let standby = standbys.take(shape).expect("the warm standby");
        let pid = standby.pid();
        let instance = root.join("instance");
        std::fs::create_dir(&instance).unwrap();
        let mut record = InstanceRecord {
            owner: Some(ProcessId::current()),
            ..Default::default()
        };
        let api = VmmApi::new(&instance.join(API_SOCKET));
        let child = restore_in_standby(
            standby,
            &mut record,
            &instance,
            &api,
            &snapshot,
            &[],
            &instance.join("vsock.sock"),
        )
        .expect("the standby restores the snapshot");
        assert_eq!(child.id() as i32, pid);
        assert_eq!(
            InstanceRecord::load(&instance)
                .unwrap()
                .sandbox
                .map(|p| p.pid),
            Some(pid),
            "the instance record names the standby's process"
        );
        assert!(!standby_dir.exists(), "the taken standby's directory went");
        let restored = TinyVm::adopt(child);
        restored.expect_running();
        let report = restore_report(
            pid,
            &api,
            &snapshot.join(fnvm_vmm::snapshot::MEMORY_FILE),
            true,
        )
        .expect("a restored standby reports its restore");
        assert!(report.resume_ms > 0.0, "{report}");
        assert!(
            report
                .to_string()
                .contains("after the standby VMM was asked to restore"),
            "{report}"
        );

        // Asked again after its start (as the sandbox does), the set replaces the taken
        // standby; dropping the set stops the replacement.
        assert_eq!(standbys.warm(shape), 0);
        standbys.want(shape);
        wait_for("a replacement standby", || standbys.warm(shape) == 1);
        let [replacement] = standby_dirs().try_into().expect("one standby directory");
        let replacement_pid = InstanceRecord::load(&replacement).unwrap().sandbox.unwrap();
        drop(standbys);
        assert!(!replacement_pid.is_alive(), "the replacement was stopped");
        assert!(!replacement.exists());
        drop(restored);
    }

    /// A standby whose service died (SIGKILL: no drop ran) is found and stopped by the next
    /// service's start-up cleanup, like an instance.
    #[test]
    fn the_standby_of_a_dead_service_is_cleaned_up_like_an_instance() {
        use crate::sandbox::instance::record::InstanceRecord;
        use crate::sandbox::orphans::cleanup_orphans;
        if !kvm_or_skip("the standby cleanup test") {
            return;
        }
        let vmm = test_vmm();
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(tmp.path().join("home"))).unwrap();
        let root = crate::sandbox::instances_root(&home).unwrap();
        let shape = VmShape {
            memory_mib: 128,
            vcpus: 1,
        };
        let standbys = StandbyVmms::new(&vmm, &root, 1);
        standbys.want(shape);
        wait_for("a warm standby", || standbys.warm(shape) == 1);
        let dir = std::fs::read_dir(&root)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut record = InstanceRecord::load(&dir).unwrap();
        let process = record.sandbox.unwrap();
        // Its owner is now a process that has ended.
        let mut gone = Command::new("true").spawn().unwrap();
        let gone_id = ProcessId::of(gone.id() as i32);
        gone.wait().unwrap();
        record.owner = gone_id.or(Some(ProcessId {
            pid: i32::MAX,
            start_time: 0,
        }));
        record.save(&dir).unwrap();
        let report = cleanup_orphans(&home).unwrap();
        assert_eq!((report.instances, report.processes), (1, 1), "{report:?}");
        assert!(!process.is_alive());
        assert!(!dir.exists());
        drop(standbys);
    }

    /// A standby that cannot take a snapshot (another guest RAM size) refuses it with the
    /// reason and is stopped: the start then restores in a new VMM instead.
    #[test]
    fn a_standby_of_another_shape_refuses_the_snapshot_and_is_stopped() {
        use crate::sandbox::instance::record::InstanceRecord;
        if !kvm_or_skip("the standby refusal test") {
            return;
        }
        let StandbyWorld {
            _dir,
            snapshot,
            root,
            shape,
            standbys,
        } = standby_world(256);
        let standby = standbys.take(shape).unwrap();
        let pid = ProcessId::of(standby.pid()).unwrap();
        let instance = root.join("instance");
        std::fs::create_dir(&instance).unwrap();
        let api = VmmApi::new(&instance.join(API_SOCKET));
        let err = restore_in_standby(
            standby,
            &mut InstanceRecord::default(),
            &instance,
            &api,
            &snapshot,
            &[],
            &instance.join("vsock.sock"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("guest RAM is 128 MiB") && err.contains("256 MiB"),
            "{err}"
        );
        assert!(!pid.is_alive(), "the refusing standby was stopped");
    }

    /// A VMM that cannot be a standby leaves no directory behind, and its shape is not
    /// retried at every start.
    #[test]
    fn a_standby_that_fails_to_come_up_leaves_nothing_and_backs_off() {
        let dir = tempfile::tempdir().unwrap();
        let shape = VmShape {
            memory_mib: 128,
            vcpus: 1,
        };
        let standbys = StandbyVmms::new(Path::new("/bin/false"), dir.path(), 1);
        standbys.want(shape);
        wait_for("the failed standby's cleanup", || {
            std::fs::read_dir(dir.path()).unwrap().count() == 0 && standbys.spawning(shape) == 0
        });
        assert_eq!(standbys.warm(shape), 0);
        standbys.want(shape);
        assert_eq!(standbys.spawning(shape), 0, "retried at once");
    }
}
