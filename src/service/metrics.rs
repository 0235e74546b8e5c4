//! The service's metrics in the Prometheus text format (`GET /metrics`): invocations, errors by
//! kind, instance starts by kind with a start-latency histogram, instances by state and the guest
//! memory committed. A handful of series, so plain counters under one mutex are enough: no
//! metrics framework.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// How an instance came to serve a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StartKind {
    /// A cold start that booted the sandbox.
    Boot,
    /// A cold start restored from a snapshot.
    Snapshot,
    /// An idle instance reused.
    Warm,
}

impl StartKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StartKind::Boot => "boot",
            StartKind::Snapshot => "snapshot",
            StartKind::Warm => "warm",
        }
    }
}

impl From<crate::sandbox::ColdStart> for StartKind {
    fn from(kind: crate::sandbox::ColdStart) -> Self {
        match kind {
            crate::sandbox::ColdStart::Boot => StartKind::Boot,
            crate::sandbox::ColdStart::Snapshot => StartKind::Snapshot,
        }
    }
}

/// Sums over the restores measured at their first reply.
#[derive(Default, Clone, Copy)]
struct Restores {
    count: u64,
    resume_seconds: f64,
    pages_faulted: u64,
    major_faults: u64,
}

/// Upper bounds (seconds) of the start-latency histogram's buckets.
const START_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default, Clone)]
struct Histogram {
    counts: [u64; START_BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Instances of all functions by state.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InstanceCounts {
    pub starting: u64,
    pub idle: u64,
    pub busy: u64,
}

#[derive(Default)]
struct Inner {
    /// function → invocations.
    invocations: BTreeMap<String, u64>,
    /// (function, kind) → errors.
    errors: BTreeMap<(String, &'static str), u64>,
    /// (function, kind) → starts.
    starts: BTreeMap<(String, StartKind), u64>,
    start_latency: BTreeMap<StartKind, Histogram>,
    restores: Restores,
    instances: InstanceCounts,
    committed_bytes: u64,
    budget_bytes: u64,
}

/// The service's counters and gauges.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn invocation(&self, function: &str) {
        *self.inner().invocations.entry(function.into()).or_default() += 1;
    }

    /// `kind` is an error code such as `FunctionTimeout`.
    pub fn error(&self, function: &str, kind: &'static str) {
        *self
            .inner()
            .errors
            .entry((function.into(), kind))
            .or_default() += 1;
    }

    /// An instance started (or was reused) for `function` in `latency`.
    pub fn start(&self, function: &str, kind: StartKind, latency: Duration) {
        let mut inner = self.inner();
        *inner.starts.entry((function.into(), kind)).or_default() += 1;
        let h = inner.start_latency.entry(kind).or_default();
        let secs = latency.as_secs_f64();
        for (i, bound) in START_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    /// A snapshot start's restore, measured at its first reply.
    pub fn restore(&self, report: &crate::sandbox::RestoreReport) {
        let mut inner = self.inner();
        let r = &mut inner.restores;
        r.count += 1;
        r.resume_seconds += report.resume_ms / 1000.0;
        r.pages_faulted += report.pages_faulted;
        r.major_faults += report.major_faults;
    }

    /// The pool's current instances and memory.
    pub fn set_instances(&self, counts: InstanceCounts, committed_bytes: u64, budget_bytes: u64) {
        let mut inner = self.inner();
        inner.instances = counts;
        inner.committed_bytes = committed_bytes;
        inner.budget_bytes = budget_bytes;
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self) -> String {
        let inner = self.inner();
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP fnvm_invocations_total Invocations received, per function.\n\
             # TYPE fnvm_invocations_total counter"
        );
        for (f, n) in &inner.invocations {
            let _ = writeln!(
                out,
                "fnvm_invocations_total{{function=\"{}\"}} {n}",
                escape(f)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fnvm_invocation_errors_total Failed invocations, per function and error kind.\n\
             # TYPE fnvm_invocation_errors_total counter"
        );
        for ((f, kind), n) in &inner.errors {
            let _ = writeln!(
                out,
                "fnvm_invocation_errors_total{{function=\"{}\",kind=\"{kind}\"}} {n}",
                escape(f)
            );
        }
        let _ = writeln!(
            out,
            "# HELP fnvm_instance_starts_total Instances that served a request, per function and \
             start kind (boot, snapshot, warm).\n# TYPE fnvm_instance_starts_total counter"
        );
        for ((f, kind), n) in &inner.starts {
            let _ = writeln!(
                out,
                "fnvm_instance_starts_total{{function=\"{}\",start_kind=\"{}\"}} {n}",
                escape(f),
                kind.as_str()
            );
        }
        let _ = writeln!(
            out,
            "# HELP fnvm_instance_start_seconds Time until an instance could take the request, per \
             start kind.\n# TYPE fnvm_instance_start_seconds histogram"
        );
        for (kind, h) in &inner.start_latency {
            let k = kind.as_str();
            for (bound, n) in START_BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "fnvm_instance_start_seconds_bucket{{start_kind=\"{k}\",le=\"{bound}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "fnvm_instance_start_seconds_bucket{{start_kind=\"{k}\",le=\"+Inf\"}} {}\n\
                 fnvm_instance_start_seconds_sum{{start_kind=\"{k}\"}} {}\n\
                 fnvm_instance_start_seconds_count{{start_kind=\"{k}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let r = inner.restores;
        let _ = writeln!(
            out,
            "# HELP fnvm_snapshot_resume_seconds Snapshot starts: VMM process start (a standby \
             VMM: its restore request) until the guest runs again.\n# TYPE fnvm_snapshot_resume_seconds summary\n\
             fnvm_snapshot_resume_seconds_sum {}\nfnvm_snapshot_resume_seconds_count {}\n\
             # HELP fnvm_snapshot_faulted_pages Snapshot starts: guest pages faulted in from the \
             snapshot before the first reply.\n# TYPE fnvm_snapshot_faulted_pages summary\n\
             fnvm_snapshot_faulted_pages_sum {}\nfnvm_snapshot_faulted_pages_count {}\n\
             # HELP fnvm_snapshot_major_faults Snapshot starts: VMM page faults that read the disk \
             before the first reply.\n# TYPE fnvm_snapshot_major_faults summary\n\
             fnvm_snapshot_major_faults_sum {}\nfnvm_snapshot_major_faults_count {}",
            r.resume_seconds, r.count, r.pages_faulted, r.count, r.major_faults, r.count
        );
        let c = inner.instances;
        let _ = writeln!(
            out,
            "# HELP fnvm_instances Instances by state.\n# TYPE fnvm_instances gauge\n\
             fnvm_instances{{state=\"starting\"}} {}\nfnvm_instances{{state=\"idle\"}} {}\n\
             fnvm_instances{{state=\"busy\"}} {}",
            c.starting, c.idle, c.busy
        );
        let _ = writeln!(
            out,
            "# HELP fnvm_guest_memory_committed_bytes Guest memory of all instances (starting or \
             running).\n# TYPE fnvm_guest_memory_committed_bytes gauge\n\
             fnvm_guest_memory_committed_bytes {}\n\
             # HELP fnvm_guest_memory_budget_bytes The host-wide budget for guest memory.\n\
             # TYPE fnvm_guest_memory_budget_bytes gauge\nfnvm_guest_memory_budget_bytes {}",
            inner.committed_bytes, inner.budget_bytes
        );
        out
    }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_has_every_series_in_the_text_format() {
        let m = Metrics::new();
        m.invocation("default/f");
        m.invocation("default/f");
        m.error("default/f", "FunctionTimeout");
        m.start("default/f", StartKind::Boot, Duration::from_millis(30));
        m.start("default/f", StartKind::Warm, Duration::from_micros(100));
        m.start(
            "default/f",
            crate::sandbox::ColdStart::Snapshot.into(),
            Duration::from_millis(9),
        );
        m.restore(&crate::sandbox::RestoreReport {
            resume_ms: 4.5,
            standby: false,
            pages_faulted: 300,
            major_faults: 2,
        });
        m.set_instances(
            InstanceCounts {
                starting: 0,
                idle: 1,
                busy: 2,
            },
            3 << 27,
            1 << 32,
        );
        let text = m.render();
        for want in [
            "fnvm_invocations_total{function=\"default/f\"} 2",
            "fnvm_invocation_errors_total{function=\"default/f\",kind=\"FunctionTimeout\"} 1",
            "fnvm_instance_starts_total{function=\"default/f\",start_kind=\"boot\"} 1",
            "fnvm_instance_starts_total{function=\"default/f\",start_kind=\"warm\"} 1",
            "fnvm_instance_start_seconds_bucket{start_kind=\"boot\",le=\"0.025\"} 0",
            "fnvm_instance_start_seconds_bucket{start_kind=\"boot\",le=\"0.05\"} 1",
            "fnvm_instance_start_seconds_count{start_kind=\"warm\"} 1",
            "fnvm_instance_starts_total{function=\"default/f\",start_kind=\"snapshot\"} 1",
            "fnvm_snapshot_resume_seconds_sum 0.0045",
            "fnvm_snapshot_resume_seconds_count 1",
            "fnvm_snapshot_faulted_pages_sum 300",
            "fnvm_snapshot_major_faults_sum 2",
            "fnvm_instances{state=\"busy\"} 2",
            "fnvm_guest_memory_committed_bytes 402653184",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }
}
