//! One instance's life in the pool: its slot is added (memory committed) when a start is
//! decided, the sandbox starts it, a watcher retires it if it ends on its own, and a retired
//! instance stops in the background, its memory released only once it is gone.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use super::{Entry, Inner, InvokeError, Phase, Running, Slot, State};
use crate::invoke::connector;
use crate::sandbox::{
    instances_root, new_instance_id, Instance, InstanceSpec, LogStream, SandboxError,
};
use crate::service::logs::{Attribution, LogEntry};
use crate::service::metrics::StartKind;
use crate::service::model::{FunctionKey, FunctionVersion};

impl Inner {
    /// Adds a Starting instance (memory committed) with `in_flight` slots already taken.
    pub(super) fn new_slot(
        self: &Arc<Self>,
        st: &mut State,
        key: &FunctionKey,
        version: &Arc<FunctionVersion>,
        in_flight: u32,
    ) -> Arc<Slot> {
        let memory_mib = u64::from(version.spec.memory_mb);
        st.committed_mib += memory_mib;
        let slot = Arc::new(Slot {
            id: new_instance_id(),
            key: key.clone(),
            version: Arc::clone(version),
            memory_mib,
            started_at: SystemTime::now(),
            running: std::sync::OnceLock::new(),
            attribution: Arc::new(Mutex::new(Attribution::default())),
            first_reply: Default::default(),
        });
        if let Some(f) = st.functions.get_mut(key) {
            f.entries.push(Entry {
                slot: Arc::clone(&slot),
                phase: Phase::Starting,
                in_flight,
                last_used: Instant::now(),
            });
        }
        slot
    }

    /// A version that will not start again: its snapshot goes.
    pub(super) fn discard_snapshot(&self, version: &FunctionVersion) {
        self.sandbox.discard_snapshot(
            &version.rootfs_image,
            &version.start,
            version.spec.memory_mb,
        );
    }

    /// Starts the slot's instance (its memory is already committed) and says how it started.
    /// On failure the slot is gone and its memory released.
    pub(super) async fn start(self: &Arc<Self>, slot: Arc<Slot>) -> Result<StartKind, InvokeError> {
        let spec = match self.instance_spec(&slot) {
            Ok(spec) => spec,
            Err(e) => {
                self.forget_start(&slot);
                return Err(InvokeError::Internal(e.to_string()));
            }
        };
        let sandbox = Arc::clone(&self.sandbox);
        let mut gate = Some(self.first_start.lock().await);
        if gate.as_deref() == Some(&true) {
            gate = None;
        }
        let started = tokio::task::spawn_blocking(move || sandbox.start(spec)).await;
        if let (Some(done), Ok(Ok(_))) = (gate.as_mut(), &started) {
            **done = true;
        }
        drop(gate);
        let instance: Arc<dyn Instance> = match started {
            Ok(Ok(instance)) => Arc::from(instance),
            Ok(Err(e)) => {
                self.forget_start(&slot);
                tracing::warn!(function = %slot.key, error = %e, "an instance failed to start");
                return Err(start_error(e));
            }
            Err(e) => {
                self.forget_start(&slot);
                return Err(InvokeError::Internal(format!("the start task failed: {e}")));
            }
        };
        let client = connector::client(Arc::clone(&instance));
        let _ = slot.running.set(Running {
            instance: Arc::clone(&instance),
            client,
        });
        let mut st = self.lock();
        let shutting_down = st.shutting_down;
        let entry = st
            .functions
            .get_mut(&slot.key)
            .and_then(|f| f.entries.iter_mut().find(|e| e.slot.id == slot.id));
        match entry {
            Some(e) if !shutting_down => {
                e.phase = Phase::Ready;
                e.last_used = Instant::now();
            }
            _ => {
                // Removed (function deleted, pool shutting down) while it started.
                drop(st);
                self.stop_in_background(slot.memory_mib, instance);
                return Err(InvokeError::NotActive);
            }
        }
        self.publish(&st);
        drop(st);
        let start = instance.start_info();
        if let Some(note) = &start.note {
            tracing::info!(function = %slot.key, instance = %slot.id, "{note}");
        }
        self.watch(&slot, instance);
        self.changed.notify_waiters();
        Ok(start.kind.into())
    }

    fn instance_spec(&self, slot: &Arc<Slot>) -> Result<InstanceSpec, SandboxError> {
        let root: PathBuf = instances_root(&self.home)?;
        let logs = Arc::clone(&self.logs);
        let key = slot.key.clone();
        let instance_id = slot.id.clone();
        let attribution = Arc::clone(&slot.attribution);
        Ok(InstanceSpec {
            id: slot.id.clone(),
            rootfs_image: slot.version.rootfs_image.clone(),
            start: slot.version.start.clone(),
            memory_mib: slot.version.spec.memory_mb,
            instance_dir: root.join(&slot.id),
            // Every cold start after a function version's first comes from its snapshot
            // (vm sandbox; the process sandbox has none).
            snapshot: true,
            network: slot.version.settings.network.clone(),
            on_log: Arc::new(move |line| {
                let request_id = attribution
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .owner(line.after_request.as_deref());
                logs.append(
                    &key,
                    LogEntry {
                        time_ms: line.unix_time_us / 1000,
                        stream: match line.stream {
                            LogStream::Stdout => "stdout".into(),
                            LogStream::Stderr => "stderr".into(),
                        },
                        instance: instance_id.clone(),
                        request_id,
                        line: line.line,
                    },
                );
            }),
        })
    }

    /// A start that failed or was abandoned: its entry goes, its memory is released.
    pub(super) fn forget_start(&self, slot: &Slot) {
        let mut st = self.lock();
        if let Some(f) = st.functions.get_mut(&slot.key) {
            f.entries.retain(|e| e.slot.id != slot.id);
        }
        st.committed_mib = st.committed_mib.saturating_sub(slot.memory_mib);
        self.publish(&st);
        drop(st);
        self.changed.notify_waiters();
    }

    /// Takes the instance out of the pool and stops it in the background; its memory stays
    /// committed until it is stopped. A Starting instance is left to its starter, which sees
    /// the entry gone and stops it.
    pub(super) fn retire(self: &Arc<Self>, st: &mut State, key: &FunctionKey, id: &str) {
        let Some(f) = st.functions.get_mut(key) else {
            return;
        };
        let Some(i) = f.entries.iter().position(|e| e.slot.id == id) else {
            return;
        };
        let entry = f.entries.remove(i);
        match entry.slot.running.get() {
            Some(r) if entry.phase == Phase::Ready => {
                self.stop_in_background(entry.slot.memory_mib, Arc::clone(&r.instance));
            }
            _ => {
                // Starting: the starter finds its entry gone, stops the instance and releases
                // the memory then.
            }
        }
    }

    /// Stops `instance` on a thread of its own, then releases its memory and wakes waiters.
    pub(super) fn stop_in_background(
        self: &Arc<Self>,
        memory_mib: u64,
        instance: Arc<dyn Instance>,
    ) {
        let weak = Arc::downgrade(self);
        std::thread::spawn(move || {
            if let Err(e) = instance.stop() {
                tracing::warn!(instance = instance.id(), error = %e, "stopping an instance failed");
            }
            if let Some(inner) = weak.upgrade() {
                let mut st = inner.lock();
                st.committed_mib = st.committed_mib.saturating_sub(memory_mib);
                inner.publish(&st);
                drop(st);
                inner.changed.notify_waiters();
            }
        });
    }

    /// Retires the instance as soon as it exits on its own (crash, OOM kill, the function
    /// exiting), so no request is sent to a dead instance.
    fn watch(self: &Arc<Self>, slot: &Arc<Slot>, instance: Arc<dyn Instance>) {
        let weak = Arc::downgrade(self);
        let key = slot.key.clone();
        let id = slot.id.clone();
        std::thread::spawn(move || {
            let report = instance.wait_exit();
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let mut st = inner.lock();
            let present = st
                .functions
                .get(&key)
                .is_some_and(|f| f.entries.iter().any(|e| e.slot.id == id));
            if present {
                tracing::warn!(function = %key, instance = %id, reason = %report.reason, "an instance ended on its own");
                inner.retire(&mut st, &key, &id);
                inner.publish(&st);
                drop(st);
                inner.changed.notify_waiters();
            }
        });
    }
}

/// `reason`, then the function's last lines once each: a line the reason already quotes (a
/// sandbox child's "it said:" tail holds the function's output too) is not repeated.
pub(super) fn with_last_lines(reason: &str, last_lines: &[String]) -> String {
    let fresh: Vec<&str> = last_lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty() && !reason.lines().any(|r| r.trim_end().ends_with(l.trim_end())))
        .collect();
    if fresh.is_empty() {
        reason.to_string()
    } else {
        format!("{reason}; last lines:\n{}", fresh.join("\n"))
    }
}

fn start_error(e: SandboxError) -> InvokeError {
    match e {
        SandboxError::NotListening {
            message,
            last_lines,
        }
        | SandboxError::StartFailed {
            message,
            last_lines,
        } => InvokeError::StartFailed {
            message,
            last_lines,
        },
        SandboxError::Exited(report) => InvokeError::StartFailed {
            message: format!("the function ended before it was ready: {}", report.reason),
            last_lines: report.last_lines,
        },
        other => InvokeError::StartFailed {
            message: other.to_string(),
            last_lines: Vec::new(),
        },
    }
}
