//! Instance directories and the record that lets a later fnvm clean up after a crashed one.
//!
//! Each instance directory holds `instance.json`: which fnvm process owns it, the sandbox's
//! process and cgroup. Processes are named by pid *and* start time, so a recycled pid is never
//! mistaken for them. [`cleanup_orphans`] removes whatever a dead owner left: its sandbox
//! processes, cgroups, loop devices and files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::sandbox::process::{cgroup, loopdev};
use crate::sandbox::SandboxError;
use crate::home::Home;

const RECORD: &str = "instance.json";
/// An instance directory without a record this old is an orphan (the record is written right
/// after the directory is made; a younger one may be an instance being created).
const UNRECORDED_GRACE: Duration = Duration::from_secs(60);

/// The directory that holds this home's instance directories.
pub fn instances_root(home: &Home) -> Result<PathBuf, SandboxError> {
    home.dir("instances")
        .map_err(|e| SandboxError::setup("cannot create the instances directory", e))
}

/// A fresh instance id, unique in this home: time, pid and a counter.
pub fn new_instance_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!(
        "{ms:x}-{:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A process named so that a recycled pid does not match: pid + start time (clock ticks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<Self> {
        start_time(pid).map(|start_time| ProcessId { pid, start_time })
    }

    pub fn current() -> Self {
        let pid = std::process::id() as i32;
        ProcessId::of(pid).unwrap_or(ProcessId { pid, start_time: 0 })
    }

    pub fn is_alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 of /proc/<pid>/stat (after the parenthesised command, which may hold anything).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields after ")" start at field 3 (state); start time is field 22.
    let state = after.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None; // a zombie is gone for our purposes
    }
    after.split_whitespace().nth(19)?.parse().ok()
}

/// What an instance directory says about its resources.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub owner: Option<ProcessId>,
    pub sandbox: Option<ProcessId>,
    pub cgroup: Option<PathBuf>,
    pub cgroup_v2: bool,
    /// cgroup v1 only: the instance's cgroups in the pids and devices hierarchies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub v1_cgroups: Vec<PathBuf>,
}

impl InstanceRecord {
    /// Writes the record into `dir` (temp file + rename: never half a record).
    pub fn save(&self, dir: &Path) -> Result<(), SandboxError> {
        let tmp = dir.join(".instance.json.tmp");
        let text = serde_json::to_vec_pretty(self)
            .map_err(|e| SandboxError::setup("cannot encode the instance record", e))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, dir.join(RECORD)))
            .map_err(|e| {
                SandboxError::setup(
                    format!("cannot write the instance record in {}", dir.display()),
                    e,
                )
            })
    }

    pub fn load(dir: &Path) -> Option<Self> {
        let text = std::fs::read(dir.join(RECORD)).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

/// The prefix of this home's cgroup names: two homes never touch each other's cgroups.
pub fn cgroup_prefix(home: &Home) -> String {
    let canonical =
        std::fs::canonicalize(home.root()).unwrap_or_else(|_| home.root().to_path_buf());
    let digest = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    hex::encode(&digest[..4])
}

/// What [`cleanup_orphans`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub instances: usize,
    pub processes: usize,
    pub cgroups: usize,
    pub loop_devices: usize,
}

/// Removes what crashed fnvm processes left in this home: instance directories whose owner is
/// dead, their sandbox processes (killed), cgroups, loop devices and files. Instances of live
/// fnvm processes are left alone. Safe to call at any time, e.g. when the host service starts.
pub fn cleanup_orphans(home: &Home) -> Result<CleanupReport, SandboxError> {
    let root = instances_root(home)?;
    let mut report = CleanupReport::default();
    let entries = std::fs::read_dir(&root)
        .map_err(|e| SandboxError::setup(format!("cannot list {}", root.display()), e))?;
    let mut live_cgroups = Vec::new();
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.is_dir() {
            continue;
        }
        let record = InstanceRecord::load(&dir);
        let orphan = match &record {
            Some(r) => !r.owner.is_some_and(|o| o.is_alive()),
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > UNRECORDED_GRACE),
        };
        if !orphan {
            if let Some(r) = record {
                live_cgroups.extend(r.cgroup);
                live_cgroups.extend(r.v1_cgroups);
            }
            continue;
        }
        let record = record.unwrap_or_default();
        if let Some(sandbox) = record.sandbox.filter(|s| s.is_alive()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(sandbox.pid),
                nix::sys::signal::SIGKILL,
            );
            wait_gone(sandbox);
            report.processes += 1;
        }
        if let Some(cg) = &record.cgroup {
            if cg.exists() {
                cgroup::kill_all(cg, record.cgroup_v2);
                cgroup::remove(cg)?;
                report.cgroups += 1;
            }
        }
        for cg in record.v1_cgroups.iter().filter(|cg| cg.exists()) {
            cgroup::kill_all(cg, false);
            cgroup::remove(cg)?;
            report.cgroups += 1;
        }
        report.loop_devices += detach_loops_under(&dir);
        std::fs::remove_dir_all(&dir)
            .map_err(|e| SandboxError::setup(format!("cannot remove {}", dir.display()), e))?;
        report.instances += 1;
    }
    // Cgroups of this home with no live instance (e.g. the directory was removed by hand).
    if let Ok(hierarchy) = cgroup::Hierarchy::probe() {
        let prefix = format!("{}-", cgroup_prefix(home));
        let v2 = matches!(hierarchy, cgroup::Hierarchy::V2 { .. });
        let extras = if v2 {
            cgroup::V1Extras::default()
        } else {
            cgroup::V1Extras::probe().0
        };
        let parents = std::iter::once(hierarchy.parent()).chain(extras.parents());
        for entries in parents.filter_map(|parent| std::fs::read_dir(parent).ok()) {
            for entry in entries.flatten() {
                let path = entry.path();
                let ours = entry
                    .file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with(&prefix));
                if ours && path.is_dir() && !live_cgroups.contains(&path) {
                    cgroup::kill_all(&path, v2);
                    cgroup::remove(&path)?;
                    report.cgroups += 1;
                }
            }
        }
    }
    if report != CleanupReport::default() {
        tracing::info!("removed orphaned sandbox resources: {report:?}");
    }
    Ok(report)
}

/// Detaches loop devices whose backing file lies in `dir` (normally autoclear already did).
fn detach_loops_under(dir: &Path) -> usize {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut count = 0;
    for (number, backing) in loopdev::attached() {
        if backing.starts_with(&canonical) || backing.starts_with(dir) {
            loopdev::detach(number);
            count += 1;
        }
    }
    count
}

fn wait_gone(process: ProcessId) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while process.is_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ids_survive_only_as_long_as_the_process() {
        let me = ProcessId::current();
        assert!(me.is_alive());
        assert!(!ProcessId {
            start_time: me.start_time + 1,
            ..me
        }
        .is_alive());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let id = ProcessId::of(pid);
        child.wait().unwrap();
        if let Some(id) = id {
            assert!(!id.is_alive());
        }
    }

    #[test]
    fn ids_are_unique_and_valid_names() {
        let a = new_instance_id();
        let b = new_instance_id();
        assert_ne!(a, b);
        assert!(
            a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'),
            "{a}"
        );
    }

    #[test]
    fn orphans_are_removed_and_live_instances_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(tmp.path().to_path_buf())).unwrap();
        let root = instances_root(&home).unwrap();

        // A dead owner whose sandbox process is still running.
        let dead_dir = root.join("dead");
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(dead_dir.join("writable.ext4"), b"x").unwrap();
        let mut stray = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_id = ProcessId::of(gone.id() as i32).unwrap_or(ProcessId {
            pid: gone.id() as i32,
            start_time: 1,
        });
        gone.wait().unwrap();
        InstanceRecord {
            owner: Some(gone_id),
            sandbox: ProcessId::of(stray.id() as i32),
            ..Default::default()
        }
        .save(&dead_dir)
        .unwrap();

        // A live owner (this test).
        let live_dir = root.join("live");
        std::fs::create_dir(&live_dir).unwrap();
        InstanceRecord {
            owner: Some(ProcessId::current()),
            ..Default::default()
        }
        .save(&live_dir)
        .unwrap();

        let report = cleanup_orphans(&home).unwrap();
        assert_eq!(report.instances, 1);
        assert_eq!(report.processes, 1);
        assert!(!dead_dir.exists());
        assert!(live_dir.join(RECORD).exists());
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(stray.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
