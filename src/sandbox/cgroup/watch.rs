//! What an instance's limits did, read from its cgroup's counters: processes the OOM killer
//! killed, forks the pids limit refused. Said in the report of an instance's end or failed
//! start, so a function killed by its limits is told so.

use std::path::{Path, PathBuf};

use super::{Cgroup, Limits, PIDS_MAX_ENV};

/// How an exit's reason says the function's memory cgroup OOM-killed it (a container runtime
/// reports that as an OOM event).
pub const OUT_OF_MEMORY: &str = "the function ran out of memory";

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
                "{OUT_OF_MEMORY} (limit {} MiB): the kernel's OOM killer killed {kills} of its \
                 processes",
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
