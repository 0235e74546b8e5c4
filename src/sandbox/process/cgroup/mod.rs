//! The process sandbox's limits: one cgroup per instance under a `fnvm` cgroup, with the
//! function's memory and no swap, a cap on its processes, and (cgroup v1) a device allow-list.
//!
//! cgroup v2 is the normal case: memory and pids in one cgroup. Hosts still on the hybrid
//! layout with the controllers on cgroup v1 (like our CI machines) get the v1 equivalents
//! (memory.limit_in_bytes and memory.memsw.limit_in_bytes, pids.max and the devices
//! controller's allow-list in their own hierarchies, a cgroup of the same name in each) rather
//! than no limit at all. Where a controller is not writable the sandbox runs without that
//! limit and says so once. cgroup v2 has no devices file, only a BPF program, which fnvm does
//! not load: there (and in a VM, where the guest kernel has no devices controller) what keeps a
//! function off devices is the agent's side: no CAP_MKNOD and every mount it can write `nodev`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::home::Home;
use crate::sandbox::SandboxError;

/// The directory under a hierarchy's root that holds every fnvm instance cgroup.
pub const PARENT: &str = "fnvm";

/// A cgroup hierarchy with a usable memory controller, and fnvm's parent cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2; `parent` is `<mount>/fnvm` with +memory in its subtree_control.
    V2 { parent: PathBuf },
    /// cgroup v1 memory controller; `parent` is `<mount>/fnvm`.
    V1Memory { parent: PathBuf },
}

impl Hierarchy {
    /// Finds the memory controller and prepares fnvm's parent cgroup; Err says why there is
    /// none (one line, for the warning).
    pub fn probe() -> Result<Self, String> {
        let pure = Path::new("/sys/fs/cgroup");
        let unified = Path::new("/sys/fs/cgroup/unified");
        for root in [pure, unified] {
            let controllers = root.join("cgroup.controllers");
            if let Ok(list) = std::fs::read_to_string(&controllers) {
                if list.split_whitespace().any(|c| c == "memory") {
                    return prepare_v2(root).map(|parent| Hierarchy::V2 { parent });
                }
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").is_file() {
            let parent = v1.join(PARENT);
            return match std::fs::create_dir_all(&parent) {
                Ok(()) => Ok(Hierarchy::V1Memory { parent }),
                Err(e) => Err(format!("cannot create {}: {e}", parent.display())),
            };
        }
        Err("no cgroup memory controller found under /sys/fs/cgroup".into())
    }

    pub fn parent(&self) -> &Path {
        match self {
            Hierarchy::V2 { parent } | Hierarchy::V1Memory { parent } => parent,
        }
    }
}

/// Creates `<root>/fnvm` and delegates the memory controller to its children.
fn prepare_v2(root: &Path) -> Result<PathBuf, String> {
    let parent = root.join(PARENT);
    std::fs::create_dir_all(&parent)
        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    for dir in [root, parent.as_path()] {
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == "memory") {
            continue;
        }
        std::fs::write(&control, "+memory").map_err(|e| {
            format!(
                "cannot enable the memory controller in {}: {e}",
                control.display()
            )
        })?;
    }
    // Process limits where the kernel has the pids controller (best effort: the memory limit
    // is the one that must hold, and its absence is reported by the caller).
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    if available.split_whitespace().any(|c| c == "pids") {
        for dir in [root, parent.as_path()] {
            let control = dir.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "pids") {
                let _ = std::fs::write(&control, "+pids");
            }
        }
    }
    Ok(parent)
}

/// The v1 hierarchies of the other controllers fnvm uses, where the memory controller is on v1
/// too (hybrid layout); on v2 the pids controller sits in the memory cgroup itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V1Extras {
    /// `<pids mount>/fnvm`.
    pub pids: Option<PathBuf>,
    /// `<devices mount>/fnvm`.
    pub devices: Option<PathBuf>,
}

impl V1Extras {
    /// The pids and devices v1 hierarchies' fnvm parents that can be made here; each missing one
    /// comes with a line saying why (for the warning).
    pub fn probe() -> (Self, Vec<String>) {
        let mut why = Vec::new();
        let mut parent_of = |controller: &str, probe_file: &str| {
            let mount = Path::new("/sys/fs/cgroup").join(controller);
            if !mount.join(probe_file).is_file() && !mount.join("cgroup.procs").is_file() {
                why.push(format!(
                    "no cgroup v1 {controller} controller at {}",
                    mount.display()
                ));
                return None;
            }
            let parent = mount.join(PARENT);
            match std::fs::create_dir_all(&parent) {
                Ok(()) if parent.join(probe_file).is_file() => Some(parent),
                Ok(()) => {
                    why.push(format!("{} has no {probe_file}", parent.display()));
                    None
                }
                Err(e) => {
                    why.push(format!("cannot create {}: {e}", parent.display()));
                    None
                }
            }
        };
        let extras = V1Extras {
            pids: parent_of("pids", "pids.max"),
            devices: parent_of("devices", "devices.allow"),
        };
        (extras, why)
    }

    /// Every parent present, for clean-up.
    pub fn parents(&self) -> impl Iterator<Item = &Path> {
        self.pids
            .iter()
            .chain(self.devices.iter())
            .map(PathBuf::as_path)
    }
}

/// What one instance's cgroup enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_mib: u32,
    /// The most processes (and threads) the instance may have, agent included.
    pub pids_max: u32,
    /// Block devices the agent itself opens while it sets up (its rootfs and writable layer),
    /// allowed until [`Cgroup::revoke_agent_disks`]; (major, minor, access).
    pub agent_disks: Vec<(u32, u32, &'static str)>,
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

/// One instance's cgroup: the memory cgroup (on v2 also pids), and on v1 a cgroup of the same
/// name in the pids and devices hierarchies.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    pids: Option<PathBuf>,
    devices: Option<PathBuf>,
    v2: bool,
    removed: bool,
    agent_disks: Vec<(u32, u32)>,
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
            v2,
            removed: false,
            agent_disks: limits.agent_disks.iter().map(|d| (d.0, d.1)).collect(),
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
                for (major, minor, access) in &limits.agent_disks {
                    write(
                        dir,
                        "devices.allow",
                        &format!("b {major}:{minor} {access}"),
                        true,
                    )?;
                }
            }
        }
        Ok(cgroup)
    }

    /// Takes the agent's disks off the allow-list once it has mounted them: nothing in the
    /// instance needs to open a block device after that, so neither the function nor anything
    /// it execs can, even with a device node at hand.
    pub fn revoke_agent_disks(&self) -> Result<(), SandboxError> {
        let Some(dir) = &self.devices else {
            return Ok(());
        };
        for (major, minor) in &self.agent_disks {
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

    /// The v1 cgroups besides the memory one (pids, devices), for the instance record.
    pub fn v1_extras(&self) -> Vec<PathBuf> {
        if self.v2 {
            return Vec::new();
        }
        self.pids
            .iter()
            .chain(self.devices.iter())
            .cloned()
            .collect()
    }

    /// The files a process writes "0" into to move itself into every cgroup of the instance.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.path)
            .chain(self.v1_extras().iter())
            .map(|dir| dir.join("cgroup.procs"))
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

/// How many times the kernel's OOM killer killed a process of the cgroup at `path`
/// (`oom_kill` in v2's memory.events or v1's memory.oom_control).
pub fn oom_kills(path: &Path) -> u64 {
    ["memory.events", "memory.oom_control"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(path.join(f)).ok())
        .find_map(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How many forks the pids limit of the cgroup at `path` refused (`max` in pids.events).
pub fn forks_refused(path: &Path) -> u64 {
    std::fs::read_to_string(path.join("pids.events"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("max ")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Reads what an instance's limits did, for the report of its end or failed start: a function
/// or agent killed by the OOM killer, or a fork bomb held at its pids limit, is said to be so.
#[derive(Debug, Clone)]
pub struct LimitWatch {
    memory: PathBuf,
    memory_mib: u32,
    pids: Option<PathBuf>,
    pids_max: u32,
}

impl LimitWatch {
    pub fn of(cgroup: &Cgroup, limits: &Limits) -> Self {
        LimitWatch {
            memory: cgroup.path().to_path_buf(),
            memory_mib: limits.memory_mib,
            pids: cgroup.pids_path().map(Path::to_path_buf),
            pids_max: limits.pids_max,
        }
    }

    /// The limits hit so far, as one clause ("the function ran out of memory (limit 128 MiB)
    /// ..."), or None when none was.
    pub fn hits(&self) -> Option<String> {
        let mut said = Vec::new();
        let kills = oom_kills(&self.memory);
        if kills > 0 {
            said.push(format!(
                "the function ran out of memory (limit {} MiB): the kernel's OOM killer killed \
                 {kills} of its processes",
                self.memory_mib
            ));
        }
        let refused = self.pids.as_deref().map(forks_refused).unwrap_or(0);
        if refused > 0 {
            said.push(format!(
                "the function reached its process limit ({} processes and threads, \
                 {PIDS_MAX_ENV}): {refused} fork(s) refused",
                self.pids_max
            ));
        }
        (!said.is_empty()).then(|| said.join("; "))
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
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::process::CommandExt;

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

    fn limits(pids_max: u32, agent_disks: Vec<(u32, u32, &'static str)>) -> Limits {
        Limits {
            memory_mib: 64,
            pids_max,
            agent_disks,
        }
    }

    /// `sh -c script` started inside every cgroup of `cgroup` (it joins before exec).
    fn sh_in(cgroup: &Cgroup, script: &str, args: &[&str]) -> std::process::Output {
        let procs: Vec<std::ffi::CString> = cgroup
            .procs_files()
            .iter()
            .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap())
            .collect();
        let mut command = std::process::Command::new("sh");
        command.arg("-c").arg(script).arg("sh").args(args);
        // SAFETY: between fork and exec the closure only opens, writes and closes files whose
        // names were built before the fork; nothing allocates.
        unsafe {
            command.pre_exec(move || {
                for file in &procs {
                    let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                Ok(())
            });
        }
        command.output().expect("sh runs")
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
        let limits = limits(64, vec![(major, minor, "r")]);
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
    fn the_pids_limit_from_the_environment_is_checked() {
        assert_eq!(parse_pids_max(" 256 ").unwrap(), 256);
        for bad in ["0", "15", "65537", "many", "-3"] {
            let err = parse_pids_max(bad).unwrap_err().to_string();
            assert!(err.contains(PIDS_MAX_ENV) && err.contains(bad), "{err}");
        }
    }
}
