//! How a snapshot start went, measured at the instance's first reply: the VMM's resume time
//! (from its API), the guest pages mapped in from the snapshot's memory file (its smaps) and
//! the VMM process's major faults (its stat).

use std::path::Path;

use super::vmm_api::VmmApi;
use crate::sandbox::RestoreReport;

/// Measures a restore at the instance's first reply: the VMM's resume time, the guest pages
/// mapped in from the snapshot's memory file, the VMM process's major faults.
pub(super) fn restore_report(
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
pub(super) fn resident_kib_of_file(smaps: &str, file: &Path) -> u64 {
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
pub(super) fn major_faults(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(9)?.parse().ok()
}
