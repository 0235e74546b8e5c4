//! The first-I/O probe of a restored VM: when the guest first did port or MMIO I/O after
//! resuming, and how many page faults it took to get there (the restore benchmark's figure).
//! Each vCPU thread checks it once: after its first I/O exit the thread drops its handle, so
//! later exits pay nothing for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::devices::bus::lock;

/// Page faults of this process so far, from getrusage (KVM's faults on guest memory are the
/// vCPU threads' own and count here).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageFaults {
    /// Faults served without I/O (page cache, zero pages).
    pub minor: u64,
    /// Faults that had to read from disk.
    pub major: u64,
}

impl PageFaults {
    /// This process's faults until now.
    pub fn now() -> Self {
        // SAFETY: getrusage writes into the zeroed struct we own.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
        Self {
            minor: usage.ru_minflt as u64,
            major: usage.ru_majflt as u64,
        }
    }
}

/// When a restored guest first did I/O, and what it had faulted in until then.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FirstIoRecord {
    /// Since [`FirstIo::new`]'s reference instant (the VMM process start).
    pub at_us: u64,
    pub minor_faults: u64,
    pub major_faults: u64,
}

/// Records the first I/O exit of a restored VM, once for the whole VM. A vCPU thread calls
/// [`FirstIo::hit`] on its own first I/O exit only (see [`super::run::RunContext`]).
pub struct FirstIo {
    since: Instant,
    baseline: Mutex<PageFaults>,
    done: AtomicBool,
    record: OnceLock<FirstIoRecord>,
}

impl FirstIo {
    pub fn new(since: Instant) -> Self {
        Self {
            since,
            baseline: Mutex::new(PageFaults::now()),
            done: AtomicBool::new(false),
            record: OnceLock::new(),
        }
    }

    /// Counts faults from now on (call when the vCPUs are about to run).
    pub fn rebase(&self) {
        *lock(&self.baseline) = PageFaults::now();
    }

    /// Notes an I/O exit; only the VM's first one is recorded.
    pub(crate) fn hit(&self) {
        if self.done.load(Ordering::Relaxed) || self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let now = PageFaults::now();
        let base = *lock(&self.baseline);
        let _ = self.record.set(FirstIoRecord {
            at_us: self.since.elapsed().as_micros() as u64,
            minor_faults: now.minor.saturating_sub(base.minor),
            major_faults: now.major.saturating_sub(base.major),
        });
    }

    pub fn get(&self) -> Option<FirstIoRecord> {
        self.record.get().copied()
    }
}
