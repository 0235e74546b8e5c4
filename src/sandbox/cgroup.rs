//! The process sandbox's memory limit: one cgroup per instance under a `fnvm` cgroup, with
//! memory.max = the function's memory and no swap.
//!
//! cgroup v2 is the normal case. Hosts still on the hybrid layout with the memory controller on
//! cgroup v1 (like our CI machines) get the v1 equivalent (memory.limit_in_bytes and
//! memory.memsw.limit_in_bytes) rather than no limit at all. Where neither is writable the
//! sandbox runs without a limit and says so once.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::SandboxError;

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
    Ok(parent)
}

/// One instance's cgroup.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    v2: bool,
    removed: bool,
}

impl Cgroup {
    /// Creates cgroup `name` under the hierarchy's fnvm parent with a `memory_mib` limit and no swap.
    pub fn create(
        hierarchy: &Hierarchy,
        name: &str,
        memory_mib: u32,
    ) -> Result<Self, SandboxError> {
        let path = hierarchy.parent().join(name);
        std::fs::create_dir(&path).map_err(|e| {
            SandboxError::setup(format!("cannot create the cgroup {}", path.display()), e)
        })?;
        let cgroup = Cgroup {
            path,
            v2: matches!(hierarchy, Hierarchy::V2 { .. }),
            removed: false,
        };
        let bytes = (u64::from(memory_mib) << 20).to_string();
        if cgroup.v2 {
            cgroup.write("memory.max", &bytes, true)?;
            cgroup.write("memory.swap.max", "0", false)?;
        } else {
            cgroup.write("memory.limit_in_bytes", &bytes, true)?;
            cgroup.write("memory.memsw.limit_in_bytes", &bytes, false)?;
        }
        Ok(cgroup)
    }

    /// Writes a control file; a missing optional one (no swap accounting) is fine.
    fn write(&self, file: &str, value: &str, required: bool) -> Result<(), SandboxError> {
        let path = self.path.join(file);
        match std::fs::write(&path, value) {
            Ok(()) => Ok(()),
            Err(e) if !required && e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SandboxError::setup(
                format!("cannot write {value} to {}", path.display()),
                e,
            )),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file a process writes "0" into to move itself into this cgroup.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// Kills every process in the cgroup and removes it.
    pub fn kill_and_remove(&mut self) -> Result<(), SandboxError> {
        if self.removed {
            return Ok(());
        }
        kill_all(&self.path, self.v2);
        remove(&self.path)?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.kill_and_remove() {
            tracing::warn!("{e}");
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_limits_memory_and_is_removed() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP: cgroup test needs root");
            return;
        }
        let hierarchy = match Hierarchy::probe() {
            Ok(h) => h,
            Err(why) => {
                eprintln!("SKIP: no writable memory cgroup on this host: {why}");
                return;
            }
        };
        let name = format!("test-{}", std::process::id());
        let mut cgroup = Cgroup::create(&hierarchy, &name, 64).unwrap();
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
        std::fs::write(cgroup.procs_file(), child.id().to_string()).unwrap();
        assert_eq!(pids(cgroup.path()), vec![child.id() as i32]);
        let path = cgroup.path().to_path_buf();
        cgroup.kill_and_remove().unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!path.exists());
    }
}
