//! Both sandboxes' limits: one cgroup per instance under a `fnvm` cgroup. The process sandbox's
//! holds the function, with its memory and no swap, a cap on its processes, (cgroup v1) a device
//! allow-list, and its own CPU scheduling group (fair shares between instances, and no
//! autogroup, see [`V1Extras::cpu`]). The VM sandbox's holds the `fnvm-vmm` process, so a
//! hostile guest (or an escape into the VMM) is held to the VM's memory, a few threads and its
//! vCPUs' worth of CPU (see [`crate::sandbox::vm::limits`]).
//!
//! cgroup v2 is the normal case: memory and pids in one cgroup. Hosts still on the hybrid
//! layout with the controllers on cgroup v1 (like our CI machines) get the v1 equivalents
//! (memory.limit_in_bytes and memory.memsw.limit_in_bytes, pids.max, the devices
//! controller's allow-list and the cpu controller in their own hierarchies, a cgroup of the
//! same name in each) rather
//! than no limit at all. Where a controller is not writable the sandbox runs without that
//! limit and says so once. cgroup v2 has no devices file, only a BPF program, which fnvm does
//! not load: there (and in a VM, where the guest kernel has no devices controller) what keeps a
//! function off devices is the agent's side: no CAP_MKNOD and every mount it can write `nodev`.

mod hierarchy;
pub mod watch;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub use hierarchy::{Hierarchy, V1Extras};

use crate::home::Home;
use crate::sandbox::SandboxError;

/// What one instance's cgroup enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_mib: u32,
    /// The most processes (and threads) the instance may have, agent included.
    pub pids_max: u32,
    /// Block devices the agent itself opens while it sets up (its rootfs and writable layer),
    /// allowed until [`Cgroup::revoke_agent_disks`].
    pub agent_disks: Vec<AgentDisk>,
    /// A CPU bandwidth cap in whole CPUs (cpu.max / cfs_quota_us per 100 ms period); None:
    /// fair shares only.
    pub cpus: Option<u32>,
}

/// The CFS period the CPU cap is written for.
const CPU_PERIOD_US: u64 = 100_000;

/// A block device the agent opens while it sets up, as the devices allow-list names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentDisk {
    pub major: u32,
    pub minor: u32,
    /// The access allowed: "r" or "rw".
    pub access: &'static str,
}

/// The character devices a function may open (Docker's default list, without mknod): null,
/// zero, full, random, urandom, tty, ptmx and the ptys of its own devpts.
pub const STANDARD_DEVICES: &[&str] = &[
    "c 1:3 rw",
    "c 1:5 rw",
    "c 1:7 rw",
    "c 1:8 rw",
    "c 1:9 rw",
    "c 5:0 rw",
    "c 5:2 rw",
    "c 136:* rw",
];

/// One instance's cgroup: the memory cgroup (on v2 also pids and cpu), and on v1 a cgroup of
/// the same name in the pids, devices and cpu hierarchies.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    pids: Option<PathBuf>,
    devices: Option<PathBuf>,
    cpu: Option<PathBuf>,
    v2: bool,
    removed: bool,
    agent_disks: Vec<AgentDisk>,
    /// The memory limit written last.
    memory_mib: u32,
}

impl Cgroup {
    /// Creates cgroup `name` under the hierarchies' fnvm parents with `limits`.
    pub fn create(
        hierarchy: &Hierarchy,
        extras: &V1Extras,
        name: &str,
        limits: &Limits,
    ) -> Result<Self, SandboxError> {
        let v2 = matches!(hierarchy, Hierarchy::V2 { .. });
        let path = make_dir(hierarchy.parent(), name)?;
        let mut cgroup = Cgroup {
            path,
            pids: None,
            devices: None,
            cpu: None,
            v2,
            removed: false,
            agent_disks: Vec::new(),
            memory_mib: limits.memory_mib,
        };
        let bytes = (u64::from(limits.memory_mib) << 20).to_string();
        let pids_max = limits.pids_max.to_string();
        if v2 {
            write(&cgroup.path, "memory.max", &bytes, true)?;
            write(&cgroup.path, "memory.swap.max", "0", false)?;
            if cgroup.path.join("pids.max").is_file() {
                write(&cgroup.path, "pids.max", &pids_max, true)?;
                cgroup.pids = Some(cgroup.path.clone());
            }
            if let Some(cpus) = limits.cpus {
                if cgroup.path.join("cpu.max").is_file() {
                    let quota = u64::from(cpus) * CPU_PERIOD_US;
                    write(
                        &cgroup.path,
                        "cpu.max",
                        &format!("{quota} {CPU_PERIOD_US}"),
                        true,
                    )?;
                }
            }
        } else {
            write(&cgroup.path, "memory.limit_in_bytes", &bytes, true)?;
            write(&cgroup.path, "memory.memsw.limit_in_bytes", &bytes, false)?;
            if let Some(parent) = &extras.pids {
                let dir = cgroup.pids.insert(make_dir(parent, name)?);
                write(dir, "pids.max", &pids_max, true)?;
            }
            if let Some(parent) = &extras.devices {
                let dir = cgroup.devices.insert(make_dir(parent, name)?);
                // Deny everything, then allow the standard devices and the agent's disks.
                write(dir, "devices.deny", "a", true)?;
                for rule in STANDARD_DEVICES {
                    write(dir, "devices.allow", rule, true)?;
                }
            }
            if let Some(parent) = &extras.cpu {
                // Default shares: the group is what matters, not its weight.
                let dir = cgroup.cpu.insert(make_dir(parent, name)?);
                if let Some(cpus) = limits.cpus {
                    let quota = u64::from(cpus) * CPU_PERIOD_US;
                    write(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string(), true)?;
                    write(dir, "cpu.cfs_quota_us", &quota.to_string(), true)?;
                }
            }
        }
        cgroup.allow_agent_disks(&limits.agent_disks)?;
        Ok(cgroup)
    }

    /// Adds `disks` to the devices allow-list (cgroup v1; v2 has none) until
    /// [`Self::revoke_agent_disks`]: a standby sandbox learns its rootfs only when it is taken.
    pub fn allow_agent_disks(&mut self, disks: &[AgentDisk]) -> Result<(), SandboxError> {
        if let Some(dir) = &self.devices {
            for AgentDisk {
                major,
                minor,
                access,
            } in disks
            {
                write(
                    dir,
                    "devices.allow",
                    &format!("b {major}:{minor} {access}"),
                    true,
                )?;
            }
        }
        self.agent_disks.extend_from_slice(disks);
        Ok(())
    }

    /// Changes the memory limit (and, on v1, the memory+swap limit beside it, which must never
    /// be below the memory limit: raised first when growing, lowered last when shrinking).
    pub fn set_memory_limit(&mut self, mib: u32) -> Result<(), SandboxError> {
        if mib == self.memory_mib {
            return Ok(());
        }
        let bytes = (u64::from(mib) << 20).to_string();
        if self.v2 {
            write(&self.path, "memory.max", &bytes, true)?;
        } else if mib > self.memory_mib {
            write(&self.path, "memory.memsw.limit_in_bytes", &bytes, false)?;
            write(&self.path, "memory.limit_in_bytes", &bytes, true)?;
        } else {
            write(&self.path, "memory.limit_in_bytes", &bytes, true)?;
            write(&self.path, "memory.memsw.limit_in_bytes", &bytes, false)?;
        }
        self.memory_mib = mib;
        Ok(())
    }

    /// Takes the agent's disks off the allow-list once it has mounted them: nothing in the
    /// instance needs to open a block device after that, so neither the function nor anything
    /// it execs can, even with a device node at hand.
    pub fn revoke_agent_disks(&self) -> Result<(), SandboxError> {
        let Some(dir) = &self.devices else {
            return Ok(());
        };
        for AgentDisk { major, minor, .. } in &self.agent_disks {
            write(dir, "devices.deny", &format!("b {major}:{minor} rwm"), true)?;
        }
        Ok(())
    }

    /// The memory cgroup (on v2, the only one).
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_v2(&self) -> bool {
        self.v2
    }

    /// The cgroup whose pids.max and pids.events apply, if the pids controller is there.
    pub fn pids_path(&self) -> Option<&Path> {
        self.pids.as_deref()
    }

    /// The v1 cgroups besides the memory one (pids, devices, cpu), for the instance record.
    pub fn v1_extras(&self) -> Vec<PathBuf> {
        if self.v2 {
            return Vec::new();
        }
        self.pids
            .iter()
            .chain(self.devices.iter())
            .chain(self.cpu.iter())
            .cloned()
            .collect()
    }

    /// The files a process writes "0" into, before it starts any thread, to move itself into
    /// every cgroup of the instance (where it cannot be born in it, see [`super::spawn`]).
    ///
    /// On cgroup v1 that is `tasks`, not `cgroup.procs`: both move a single-threaded process,
    /// but a write to `cgroup.procs` takes the kernel's threadgroup lock for writing, which waits
    /// for an RCU grace period — 6–10 ms on the CI host for the first migration after a quiet
    /// while, ~40 % of a process-sandbox start — while moving the calling thread alone
    /// (`tasks`, "0") skips that lock on current kernels: 0.1 ms. cgroup v2 moves threads only
    /// within a domain, so there it is `cgroup.procs`.
    pub fn join_files(&self) -> Vec<PathBuf> {
        let file = if self.v2 { "cgroup.procs" } else { "tasks" };
        std::iter::once(&self.path)
            .chain(self.v1_extras().iter())
            .map(|dir| dir.join(file))
            .collect()
    }

    /// [`Self::join_files`] for a host-side helper of the instance (its pasta): every cgroup
    /// but the v1 devices one, whose allow-list is the function's (pasta opens /dev/net/tun).
    pub fn helper_join_files(&self) -> Vec<PathBuf> {
        let devices = self.devices.as_ref().map(|d| d.join("tasks"));
        self.join_files()
            .into_iter()
            .filter(|f| Some(f) != devices.as_ref())
            .collect()
    }

    /// Kills every process in the cgroup and removes it (in every hierarchy).
    pub fn kill_and_remove(&mut self) -> Result<(), SandboxError> {
        if self.removed {
            return Ok(());
        }
        kill_all(&self.path, self.v2);
        let mut first_err = remove(&self.path).err();
        for dir in self.v1_extras() {
            kill_all(&dir, false);
            if let Err(e) = remove(&dir) {
                first_err.get_or_insert(e);
            }
        }
        self.removed = true;
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_remove() {
            tracing::warn!("{e}");
        }
    }
}

fn make_dir(parent: &Path, name: &str) -> Result<PathBuf, SandboxError> {
    let path = parent.join(name);
    std::fs::create_dir(&path).map_err(|e| {
        SandboxError::setup(format!("cannot create the cgroup {}", path.display()), e)
    })?;
    Ok(path)
}

/// Writes a control file; a missing optional one (no swap accounting) is fine.
fn write(dir: &Path, file: &str, value: &str, required: bool) -> Result<(), SandboxError> {
    let path = dir.join(file);
    match std::fs::write(&path, value) {
        Ok(()) => Ok(()),
        Err(e) if !required && e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SandboxError::setup(
            format!("cannot write {value} to {}", path.display()),
            e,
        )),
    }
}

/// The environment variable that sets the process sandbox's pids limit per instance.
pub const PIDS_MAX_ENV: &str = "FNVM_PIDS_MAX";
/// Processes and threads per instance when [`PIDS_MAX_ENV`] is unset: plenty for a server
/// with worker pools, far below a host's pid_max.
pub const DEFAULT_PIDS_MAX: u32 = 1024;
/// The range [`PIDS_MAX_ENV`] accepts (the agent alone takes a handful).
pub const PIDS_MAX_RANGE: std::ops::RangeInclusive<u32> = 16..=65_536;

/// The pids limit from [`PIDS_MAX_ENV`] (or the default); a bad value is an error naming it.
pub fn pids_max_from_env() -> Result<u32, SandboxError> {
    match std::env::var(PIDS_MAX_ENV) {
        Err(_) => Ok(DEFAULT_PIDS_MAX),
        Ok(text) => parse_pids_max(&text),
    }
}

fn parse_pids_max(text: &str) -> Result<u32, SandboxError> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|n| PIDS_MAX_RANGE.contains(n))
        .ok_or_else(|| {
            SandboxError::BadSpec(format!(
                "{PIDS_MAX_ENV}={text:?} is not a process limit: give a whole number from {} to {}",
                PIDS_MAX_RANGE.start(),
                PIDS_MAX_RANGE.end()
            ))
        })
}

/// SIGKILLs everything in the cgroup at `path` (cgroup.kill where the kernel has it).
pub fn kill_all(path: &Path, v2: bool) {
    if v2 && std::fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // No cgroup.kill: kill what is listed until nothing is (a fork may race one round).
    for _ in 0..50 {
        let pids = pids(path);
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The processes in the cgroup at `path`.
pub fn pids(path: &Path) -> Vec<i32> {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Removes the (emptied) cgroup at `path`, waiting briefly for dying processes to leave it.
pub fn remove(path: &Path) -> Result<(), SandboxError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(SandboxError::setup(
                    format!("cannot remove the cgroup {}", path.display()),
                    e,
                ))
            }
        }
    }
}

/// The prefix of this home's cgroup names: two homes never touch each other's cgroups.
pub fn cgroup_prefix(home: &Home) -> String {
    let canonical =
        std::fs::canonicalize(home.root()).unwrap_or_else(|_| home.root().to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    hex::encode(&digest[..4])
}

#[cfg(test)]
mod tests {
    use super::watch::LimitWatch;
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileTypeExt;

    /// The host's hierarchies, or None (said why) where this host cannot run the test.
    fn host() -> Option<(Hierarchy, V1Extras)> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: cgroup test needs root");
            return None;
        }
        match Hierarchy::probe() {
            Ok(h) => Some((h, V1Extras::probe().0)),
            Err(why) => {
                eprintln!("SKIP: no writable memory cgroup on this host: {why}");
                None
            }
        }
    }

    fn limits(pids_max: u32, agent_disks: Vec<AgentDisk>) -> Limits {
        Limits {
            memory_mib: 64,
            pids_max,
            agent_disks,
            cpus: None,
        }
    }

    /// `sh -c script` started in `cgroup` the way the agent is (born in it on cgroup v2, moved
    /// through `tasks` on v1), as PID 1 of its own namespaces.
    fn sh_in(cgroup: &Cgroup, script: &str, args: &[&str]) -> std::process::Output {
        let keep = std::fs::File::open("/dev/null").unwrap();
        let mut argv = vec!["-c", script, "sh"];
        argv.extend_from_slice(args);
        crate::sandbox::spawn::tests::run("/bin/sh", &argv, Some(cgroup), keep.as_fd())
    }

    /// A block device node of this host and its numbers.
    fn some_block_device() -> Option<(PathBuf, u32, u32)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::read_dir("/dev").ok()?.flatten().find_map(|e| {
            let meta = std::fs::metadata(e.path()).ok()?;
            meta.file_type().is_block_device().then(|| {
                let rdev = meta.rdev();
                (
                    e.path(),
                    nix::sys::stat::major(rdev) as u32,
                    nix::sys::stat::minor(rdev) as u32,
                )
            })
        })
    }

    const TRY_OPEN: &str = r#"for d in "$@"; do
        if head -c 1 "$d" >/dev/null 2>&1; then echo "opened $d"; else echo "refused $d"; fi
    done"#;

    #[test]
    fn a_cgroup_limits_memory_and_is_removed() {
        let Some((hierarchy, extras)) = host() else {
            return;
        };
        let name = format!("test-{}", std::process::id());
        let mut cgroup = Cgroup::create(&hierarchy, &extras, &name, &limits(64, vec![])).unwrap();
        let limit_file = if matches!(hierarchy, Hierarchy::V2 { .. }) {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        let limit = std::fs::read_to_string(cgroup.path().join(limit_file)).unwrap();
        assert_eq!(limit.trim(), (64u64 << 20).to_string());
        // A child that moves itself in, then gets killed with the cgroup.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::fs::write(cgroup.path().join("cgroup.procs"), child.id().to_string()).unwrap();
        assert_eq!(pids(cgroup.path()), vec![child.id() as i32]);
        let path = cgroup.path().to_path_buf();
        cgroup.kill_and_remove().unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!path.exists());
    }

    /// A standby's cgroup gets its function's memory limit when it is taken: raised or
    /// lowered, with v1's memory+swap limit (never below the memory limit) kept beside it.
    #[test]
    fn the_memory_limit_can_be_raised_and_lowered() {
        let Some((hierarchy, extras)) = host() else {
            return;
        };
        let name = format!("test-limit-{}", std::process::id());
        let mut cgroup = Cgroup::create(&hierarchy, &extras, &name, &limits(64, vec![])).unwrap();
        let v2 = matches!(hierarchy, Hierarchy::V2 { .. });
        let dir = cgroup.path().to_path_buf();
        let read = |file: &str| {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .map(|t| t.trim().to_string())
        };
        for mib in [512u32, 128, 1024, 64] {
            cgroup.set_memory_limit(mib).unwrap();
            let bytes = (u64::from(mib) << 20).to_string();
            let (memory, swap) = if v2 {
                ("memory.max", None)
            } else {
                ("memory.limit_in_bytes", Some("memory.memsw.limit_in_bytes"))
            };
            assert_eq!(read(memory).as_deref(), Some(bytes.as_str()), "{mib} MiB");
            if let Some(value) = swap.and_then(&read) {
                assert_eq!(value, bytes, "memory+swap at {mib} MiB");
            }
        }
        cgroup.kill_and_remove().unwrap();
    }

    #[test]
    fn in_the_cgroup_only_the_standard_devices_open_and_the_agents_disks_until_revoked() {
        let Some((hierarchy, extras)) = host() else {
            return;
        };
        if extras.devices.is_none() || matches!(hierarchy, Hierarchy::V2 { .. }) {
            eprintln!("SKIP: no cgroup v1 devices controller on this host");
            return;
        }
        let Some((disk, major, minor)) = some_block_device() else {
            eprintln!("SKIP: no block device node in /dev");
            return;
        };
        let disk = disk.to_str().unwrap().to_string();
        let name = format!("test-devices-{}", std::process::id());
        let limits = limits(
            64,
            vec![AgentDisk {
                major,
                minor,
                access: "r",
            }],
        );
        let mut cgroup = Cgroup::create(&hierarchy, &extras, &name, &limits).unwrap();
        let devices = [
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/urandom",
            "/dev/random",
            "/dev/mem",
            "/dev/kmsg",
            disk.as_str(),
        ];
        let out = sh_in(&cgroup, TRY_OPEN, &devices);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        for standard in &devices[..5] {
            assert!(said.contains(&format!("opened {standard}")), "{said}");
        }
        for other in ["/dev/mem", "/dev/kmsg"] {
            assert!(said.contains(&format!("refused {other}")), "{said}");
        }
        // The agent's disk opens until it is revoked, then never again.
        assert!(said.contains(&format!("opened {disk}")), "{said}");
        cgroup.revoke_agent_disks().unwrap();
        let out = sh_in(&cgroup, TRY_OPEN, &[disk.as_str(), "/dev/urandom"]);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(said.contains(&format!("refused {disk}")), "{said}");
        assert!(said.contains("opened /dev/urandom"), "{said}");
        cgroup.kill_and_remove().unwrap();
        for dir in std::iter::once(hierarchy.parent()).chain(extras.parents()) {
            assert!(!dir.join(&name).exists(), "{} is left", dir.display());
        }
    }

    #[test]
    fn forks_past_the_pids_limit_fail_and_are_reported_as_the_cause() {
        let Some((hierarchy, extras)) = host() else {
            return;
        };
        let name = format!("test-pids-{}", std::process::id());
        let limits = limits(16, vec![]);
        let mut cgroup = Cgroup::create(&hierarchy, &extras, &name, &limits).unwrap();
        if cgroup.pids_path().is_none() {
            eprintln!("SKIP: no pids controller on this host");
            return;
        }
        let watch = LimitWatch::of(&cgroup, &limits);
        assert_eq!(watch.hits(), None);
        let out = sh_in(
            &cgroup,
            // The sleeps let go of the output pipes, so the shell's end is not waited past.
            "for i in $(seq 40); do sleep 30 >/dev/null 2>&1 & done; echo all forked",
            &[],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("fork") || stderr.contains("Resource temporarily unavailable"),
            "the shell could fork 40 times under a limit of 16: {stderr}"
        );
        let said = watch.hits().expect("the refused forks are reported");
        assert!(
            said.contains("process limit (16 processes") && said.contains(PIDS_MAX_ENV),
            "{said}"
        );
        cgroup.kill_and_remove().unwrap();
    }

    #[test]
    fn each_instance_is_scheduled_as_its_own_cpu_group() {
        // Not the root cpu group: there each instance (its own session) would be an autogroup,
        // and a saturated host left its threads waiting for hundreds of milliseconds.
        let Some((hierarchy, extras)) = host() else {
            return;
        };
        let name = format!("test-cpu-{}", std::process::id());
        let mut cgroup = Cgroup::create(&hierarchy, &extras, &name, &limits(64, vec![])).unwrap();
        let out = sh_in(&cgroup, "cat /proc/self/cgroup", &[]);
        let membership = String::from_utf8_lossy(&out.stdout).into_owned();
        let cpu_group = if cgroup.is_v2() {
            let controllers =
                std::fs::read_to_string(cgroup.path().join("cgroup.controllers")).unwrap();
            if !controllers.split_whitespace().any(|c| c == "cpu") {
                eprintln!("SKIP: the cpu controller cannot be delegated here: {controllers}");
                return;
            }
            membership.lines().find(|l| l.starts_with("0::"))
        } else {
            if extras.cpu.is_none() {
                eprintln!("SKIP: no cgroup v1 cpu controller on this host");
                return;
            }
            membership.lines().find(|l| {
                l.split(':')
                    .nth(1)
                    .is_some_and(|list| list.split(',').any(|c| c == "cpu"))
            })
        };
        let cpu_group = cpu_group.unwrap_or_else(|| panic!("no cpu line in:\n{membership}"));
        assert!(
            cpu_group.ends_with(&format!("/fnvm/{name}")),
            "the shell runs in {cpu_group:?}, not in the instance's cpu group"
        );
        cgroup.kill_and_remove().unwrap();
        assert!(extras.cpu.iter().all(|parent| !parent.join(&name).exists()));
    }

    #[test]
    fn the_pids_limit_from_the_environment_is_checked() {
        assert_eq!(parse_pids_max(" 256 ").unwrap(), 256);
        for bad in ["0", "15", "65537", "many", "-3"] {
            let err = parse_pids_max(bad).unwrap_err().to_string();
            assert!(err.contains(PIDS_MAX_ENV) && err.contains(bad), "{err}");
        }
    }
}
