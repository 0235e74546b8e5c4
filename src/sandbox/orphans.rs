//! Clean-up after crashed fnvm processes: whatever instances (and standby VMMs) of a dead owner
//! left in this home, found through their records ([`InstanceRecord`]): sandbox processes,
//! cgroups, loop devices and files. Both sandboxes' leftovers are removed in one pass, so a
//! service that restarts with the other sandbox kind still cleans up after the first.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::home::Home;
use crate::sandbox::cgroup;
use crate::sandbox::instance::record::{instances_root, InstanceRecord, ProcessId};
use crate::sandbox::process::loopdev;
use crate::sandbox::SandboxError;

/// An instance directory without a record this old is an orphan (the record is written right
/// after the directory is made; a younger one may be an instance being created).
const UNRECORDED_GRACE: Duration = Duration::from_secs(60);

/// What [`cleanup_orphans`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    pub instances: usize,
    pub processes: usize,
    pub cgroups: usize,
    pub loop_devices: usize,
    /// VM egress uids whose host rules (and passt) a crashed fnvm left.
    pub egress_uids: usize,
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
        // The VM's passt (its rules go below, with every free egress uid's).
        if let Some(helper) = record.egress_helper.filter(|s| s.is_alive()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(helper.pid),
                nix::sys::signal::SIGKILL,
            );
            wait_gone(helper);
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
        let prefix = format!("{}-", cgroup::cgroup_prefix(home));
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
    // Host rules of VM egress uids no live fnvm holds (any home's: the uids are host-wide).
    match crate::network::host_filter::remove_stale() {
        Ok(n) => report.egress_uids = n,
        Err(e) => tracing::warn!("cannot remove stale VM egress rules: {e}"),
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
    use crate::sandbox::instance::record::RECORD;

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
