//! How an instance ended, as the host learns it: from the agent over the link (the function's
//! exit) or from the sandbox's own process dying first, whichever comes first; and the words
//! for an ending ("exited with code 3", "killed by signal 9 (SIGKILL)").

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::sandbox::{ExitReport, SandboxError};

/// How many of the function's last log lines errors and exit reports carry.
pub const LAST_LINES: usize = 20;

/// What the host knows about how an instance ended, and the function's last lines.
pub struct ExitState {
    inner: Mutex<ExitInner>,
    ended: Condvar,
    /// The host is stopping the instance: whatever ends it now is reported as "stopped".
    stopping: std::sync::atomic::AtomicBool,
    /// Extra words for an exit (e.g. "the function ran out of memory"), asked when it happens.
    explain: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

#[derive(Default)]
struct ExitInner {
    report: Option<ExitReport>,
    last_lines: VecDeque<String>,
}

impl ExitState {
    pub fn new(explain: impl Fn() -> Option<String> + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(ExitState {
            inner: Mutex::new(ExitInner::default()),
            ended: Condvar::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            explain: Box::new(explain),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ExitInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `line` among the function's last lines.
    pub fn push_line(&self, line: &str) {
        let mut inner = self.lock();
        if inner.last_lines.len() == LAST_LINES {
            inner.last_lines.pop_front();
        }
        inner.last_lines.push_back(line.to_string());
    }

    pub fn last_lines(&self) -> Vec<String> {
        self.lock().last_lines.iter().cloned().collect()
    }

    /// From now on the instance ends because the host stops it.
    pub fn mark_stopping(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Records how the instance ended, unless an earlier record exists; returns the record.
    pub fn record(&self, code: Option<i32>, signal: Option<i32>, reason: String) -> ExitReport {
        let extra = (self.explain)();
        let mut inner = self.lock();
        if let Some(report) = &inner.report {
            return report.clone();
        }
        let reason = match extra {
            Some(extra) => format!("{reason}; {extra}"),
            None => reason,
        };
        let reason =
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) && reason != "stopped" {
                format!("stopped ({reason})")
            } else {
                reason
            };
        let report = ExitReport {
            code,
            signal,
            last_lines: inner.last_lines.iter().cloned().collect(),
            reason,
        };
        inner.report = Some(report.clone());
        self.ended.notify_all();
        report
    }

    pub fn get(&self) -> Option<ExitReport> {
        self.lock().report.clone()
    }

    pub fn wait(&self) -> ExitReport {
        let mut inner = self.lock();
        loop {
            if let Some(report) = &inner.report {
                return report.clone();
            }
            inner = self.ended.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReport> {
        let inner = self.lock();
        let (inner, _) = self
            .ended
            .wait_timeout_while(inner, timeout, |i| i.report.is_none())
            .unwrap_or_else(|p| p.into_inner());
        inner.report.clone()
    }
}

/// Whether the sandbox's own process is still alive: `Some(how it ended)` once it has died
/// (a sentence for the exit report; the function's code and signal are the agent's to say).
pub type Liveness<'a> = &'a dyn Fn() -> Option<String>;

/// The error for a sandbox that ended before Ready, with the best reason we can get: the
/// agent's Exited record, else the sandbox process's status (waiting briefly for it).
pub fn ended_before_ready(exit: &ExitState, dead: Liveness<'_>, fallback: &str) -> SandboxError {
    if let Some(report) = exit.get() {
        return SandboxError::Exited(report);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Some(reason) = dead() {
            return SandboxError::Exited(exit.record(None, None, reason));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    SandboxError::Exited(exit.record(None, None, fallback.to_string()))
}

/// "<what> exited with code 1; it said:\n<tail>".
pub fn ended_reason(what: &str, status: ExitStatus, tail: &[String]) -> String {
    let mut reason = format!("{what} {}", describe_status(status));
    // Blank lines alone say nothing: no "it said:" with nothing after it.
    let end = tail
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .map_or(0, |i| i + 1);
    let tail = &tail[..end];
    if !tail.is_empty() {
        reason.push_str("; it said:\n");
        reason.push_str(&tail.join("\n"));
    }
    reason
}

/// "exited with code 3" / "killed by signal 9 (SIGKILL)".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => describe_signal(sig),
        _ => format!("ended ({status})"),
    }
}

pub fn describe_signal(sig: i32) -> String {
    match nix::sys::signal::Signal::try_from(sig) {
        Ok(s) => format!("killed by signal {sig} ({})", s.as_str()),
        Err(_) => format!("killed by signal {sig}"),
    }
}
