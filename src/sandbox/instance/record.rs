//! Instance names and directories, and the record that lets a later fnvm clean up after a
//! crashed one.
//!
//! Each instance directory holds `instance.json`: which fnvm process owns it, the sandbox's
//! process and cgroup. Processes are named by pid *and* start time, so a recycled pid is never
//! mistaken for them. [`crate::sandbox::orphans`] reads the records to remove whatever a dead
//! owner left.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::home::Home;
use crate::sandbox::SandboxError;

/// The record's file name in an instance directory.
pub(crate) const RECORD: &str = "instance.json";

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
    /// VM sandbox with egress: the instance's passt, killed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_helper: Option<ProcessId>,
    /// VM sandbox with egress: the instance's uid, whose host rules go with it
    /// ([`crate::network::host_filter`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_uid: Option<u32>,
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
}
