//! The VM sandbox's tests: its launch arguments, the refusal without VMX/SVM, restore
//! measurements, and (with KVM) the VMM client and standby VMMs on a tiny guest.

use std::process::{Command, Stdio};

use fnvm_vmm::vmm::DEFAULT_CMDLINE;

use super::launch::vmm_binary;
use super::restore_report::{major_faults, resident_kib_of_file};
use super::standby::{Devices, VmShape};
use super::*;

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
    let err = crate::sandbox::create(SandboxKind::Vm, &home, &Default::default())
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
    pid: i32,
    /// Kills and reaps the VMM.
    stop: Option<Box<dyn FnOnce()>>,
    out: std::sync::mpsc::Receiver<u8>,
}

impl TinyVm {
    fn spawn(vmm: &Path, args: &[&std::ffi::OsStr]) -> Self {
        let mut child = Command::new(vmm)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("fnvm-vmm starts");
        let stdout = child.stdout.take().unwrap();
        let pid = child.id() as i32;
        let stop = move || {
            let _ = child.kill();
            let _ = child.wait();
        };
        Self::watch(pid, Box::new(stop), stdout)
    }

    /// A VMM the sandbox spawned, its stdout piped.
    fn adopt(child: crate::sandbox::instance::child::Spawned) -> Self {
        let stdout = child.stdout.try_clone().unwrap();
        let pid = child.pid;
        let stop = move || {
            child.kill();
            let _ = child.wait();
        };
        Self::watch(pid, Box::new(stop), stdout)
    }

    fn watch(
        pid: i32,
        stop: Box<dyn FnOnce()>,
        mut stdout: impl std::io::Read + Send + 'static,
    ) -> Self {
        let (tx, out) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            while stdout.read_exact(&mut b).is_ok() && tx.send(b[0]).is_ok() {}
        });
        TinyVm {
            pid,
            stop: Some(stop),
            out,
        }
    }

    fn expect_running(&self) {
        let byte = self.out.recv_timeout(Duration::from_secs(30));
        assert_eq!(byte, Ok(b'x'), "the tiny guest writes to its serial port");
    }
}

impl Drop for TinyVm {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            stop();
        }
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
        booted.pid,
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
        restored.pid,
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

/// A tiny guest's snapshot (128 MiB) and a warm standby VMM of `memory_mib` for it, in a cgroup
/// of its own where this host's cgroups are writable.
struct StandbyWorld {
    _dir: tempfile::TempDir,
    cgroups: Option<Arc<VmmCgroups>>,
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
    let home = Home::resolve(Some(dir.path().join("home"))).unwrap();
    let root = crate::sandbox::instances_root(&home).unwrap();
    let shape = VmShape {
        memory_mib,
        vcpus: 1,
    };
    let cgroups = VmmCgroups::probe(&home).map(Arc::new);
    let standbys = StandbyVmms::new(&vmm, &root, 1, cgroups.clone());
    assert!(
        standbys.take(shape).is_none(),
        "nothing is warm before it is wanted"
    );
    standbys.want(shape);
    wait_for("a warm standby", || standbys.warm(shape) == 1);
    StandbyWorld {
        _dir: dir,
        cgroups,
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
        cgroups,
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
    let standby_pid = record.sandbox.unwrap().pid;
    let cgroup = if cgroups.is_some() {
        let cgroup = record
            .cgroup
            .clone()
            .expect("the record names the VMM's cgroup");
        assert_vmm_limited(&record, standby_pid, shape);
        Some(cgroup)
    } else {
        eprintln!("!!! the standby VMM's cgroup NOT tested: this host's cgroups are not writable");
        None
    };

    let standby = standbys.take(shape).expect("the warm standby");
    let pid = standby.pid();
    let instance = root.join("instance");
    std::fs::create_dir(&instance).unwrap();
    let mut record = InstanceRecord {
        owner: Some(ProcessId::current()),
        ..Default::default()
    };
    let api = VmmApi::new(&instance.join(API_SOCKET));
    let (child, vmm_cgroup) = restore_in_standby(
        standby,
        &mut record,
        &instance,
        &api,
        &snapshot,
        &Devices {
            disks: &[],
            vsock: &instance.join("vsock.sock"),
            net: None,
        },
    )
    .expect("the standby restores the snapshot");
    assert_eq!(child.pid, pid);
    assert_eq!(
        InstanceRecord::load(&instance).unwrap().cgroup,
        cgroup,
        "the instance record names the standby's cgroup"
    );
    assert_eq!(vmm_cgroup.as_ref().map(|c| c.path()), cgroup);
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap();
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        [pid.to_string().as_str(), "1"],
        "the VMM is PID 1 of its own pid namespace"
    );
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    let vmm_uid = super::identity::VMM_UID.to_string();
    assert!(
        uid.split_whitespace().all(|id| id == vmm_uid),
        "the restored standby runs as the VMM's uid: {uid}"
    );
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
    drop(vmm_cgroup);
    if let Some(cgroup) = cgroup {
        assert!(!cgroup.exists(), "the VMM's cgroup went with it");
    }
}

/// The VMM `pid` of `record` is in the cgroup the record names, limited to its VM's memory
/// plus the allowance, [`limits::PIDS_MAX`] threads and its vCPUs + 1 of CPU.
fn assert_vmm_limited(
    record: &crate::sandbox::instance::record::InstanceRecord,
    pid: i32,
    shape: VmShape,
) {
    let memory = record.cgroup.as_ref().unwrap();
    let read = |dir: &Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
    };
    let bytes = u64::from(shape.memory_mib + limits::MEMORY_ALLOWANCE_MIB) << 20;
    let (procs, limit) = if record.cgroup_v2 {
        ("cgroup.procs", "memory.max")
    } else {
        ("tasks", "memory.limit_in_bytes")
    };
    let members = |dir: &Path| -> Vec<i32> {
        read(dir, procs)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    assert!(
        members(memory).contains(&pid),
        "the VMM is in {}",
        memory.display()
    );
    assert_eq!(read(memory, limit).trim(), bytes.to_string());
    let quota = (u64::from(shape.vcpus) + 1) * 100_000;
    if record.cgroup_v2 {
        assert_eq!(
            read(memory, "pids.max").trim(),
            limits::PIDS_MAX.to_string()
        );
        if memory.join("cpu.max").exists() {
            assert_eq!(read(memory, "cpu.max").trim(), format!("{quota} 100000"));
        }
    }
    for dir in &record.v1_cgroups {
        assert!(
            members(dir).contains(&pid),
            "the VMM is in {}",
            dir.display()
        );
        if dir.join("pids.max").exists() {
            assert_eq!(read(dir, "pids.max").trim(), limits::PIDS_MAX.to_string());
        }
        if dir.join("cpu.cfs_quota_us").exists() {
            assert_eq!(read(dir, "cpu.cfs_quota_us").trim(), quota.to_string());
        }
    }
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
    let standbys = StandbyVmms::new(&vmm, &root, 1, VmmCgroups::probe(&home).map(Arc::new));
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
    for cgroup in record.cgroup.iter().chain(&record.v1_cgroups) {
        assert!(
            !cgroup.exists(),
            "the standby's cgroup {} went",
            cgroup.display()
        );
    }
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
        ..
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
        &Devices {
            disks: &[],
            vsock: &instance.join("vsock.sock"),
            net: None,
        },
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
    let standbys = StandbyVmms::new(Path::new("/bin/false"), dir.path(), 1, None);
    standbys.want(shape);
    wait_for("the failed standby's cleanup", || {
        std::fs::read_dir(dir.path()).unwrap().count() == 0 && standbys.spawning(shape) == 0
    });
    assert_eq!(standbys.warm(shape), 0);
    standbys.want(shape);
    assert_eq!(standbys.spawning(shape), 0, "retried at once");
}
