//! The pool's capacity policy: which instance an invocation gets, or whether a new one may
//! start (the function's `max_instances`, the host's memory budget, each function's fair share
//! of it while others wait, reclaiming idle instances of others to make room), how long a
//! request waits for capacity, and the reaper that stops idle instances beyond the provisioned
//! ones and tops provisioned functions back up.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::lease::Lease;
use super::{Entry, Inner, InvokeError, Limit, Phase, Slot, State};
use crate::service::metrics::StartKind;
use crate::service::model::{FunctionKey, FunctionType};

/// A request counted in `State::memory_waiters` while it waits (also when its future is
/// dropped mid-wait).
struct MemoryWaiter {
    inner: Arc<Inner>,
    key: FunctionKey,
}

impl MemoryWaiter {
    fn new(inner: &Arc<Inner>, key: &FunctionKey) -> Self {
        *inner.lock().memory_waiters.entry(key.clone()).or_default() += 1;
        Self {
            inner: Arc::clone(inner),
            key: key.clone(),
        }
    }
}

impl Drop for MemoryWaiter {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        if let Some(n) = st.memory_waiters.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                st.memory_waiters.remove(&self.key);
            }
        }
    }
}

impl Inner {
    /// A free slot on a warm instance, or a newly started instance, or Overloaded after the
    /// queue timeout.
    pub(super) async fn acquire(
        self: &Arc<Self>,
        key: &FunctionKey,
        request_id: &str,
    ) -> Result<Lease, InvokeError> {
        let deadline = tokio::time::Instant::now() + self.cfg.queue_timeout;
        let function = key.to_string();
        let asked = Instant::now();
        loop {
            // Both registered before the state is looked at, so no wake-up falls in between.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let freed = self
                .lock()
                .functions
                .get(key)
                .map(|f| Arc::clone(&f.freed))
                .ok_or(InvokeError::NotActive)?;
            let slot_freed = freed.notified();
            tokio::pin!(slot_freed);
            slot_freed.as_mut().enable();
            let to_start = {
                let mut st = self.lock();
                if st.shutting_down {
                    return Err(InvokeError::NotActive);
                }
                let f = st.functions.get_mut(key).ok_or(InvokeError::NotActive)?;
                let version = Arc::clone(&f.version);
                let per_instance = match version.spec.r#type {
                    FunctionType::Event => 1,
                    FunctionType::Web => version.spec.concurrency.max(1),
                };
                // Warm: the most recently used instance with a free slot.
                let warm = f
                    .entries
                    .iter_mut()
                    .filter(|e| {
                        e.phase == Phase::Ready
                            && e.in_flight < per_instance
                            && e.slot.version.version == version.version
                            && e.slot
                                .running
                                .get()
                                .is_some_and(|r| r.instance.exited().is_none())
                    })
                    .max_by_key(|e| e.last_used);
                if let Some(e) = warm {
                    e.in_flight += 1;
                    let slot = Arc::clone(&e.slot);
                    self.publish(&st);
                    drop(st);
                    self.metrics
                        .start(&function, StartKind::Warm, asked.elapsed());
                    return Ok(self.lease(slot, version, request_id));
                }
                let memory = u64::from(version.spec.memory_mb);
                let count = f
                    .entries
                    .iter()
                    .filter(|e| e.slot.version.version == version.version)
                    .count();
                let below_cap = count < version.spec.max_instances.max(1) as usize;
                let budget_mib = self.cfg.memory_budget_mib;
                if !below_cap {
                    Err(Limit::MaxInstances(version.spec.max_instances))
                } else if self.over_fair_share(&st, key, memory) {
                    Err(Limit::FairShare { budget_mib })
                } else if !self.make_room(&mut st, key, memory) {
                    Err(Limit::MemoryBudget {
                        budget_mib,
                        needed_mib: memory,
                    })
                } else {
                    let slot = self.new_slot(&mut st, key, &version, 1);
                    self.publish(&st);
                    Ok(slot)
                }
            };
            let limit = match to_start {
                Ok(slot) => {
                    let kind = self.start(Arc::clone(&slot)).await?;
                    self.metrics.start(&function, kind, asked.elapsed());
                    return Ok(self.lease(
                        Arc::clone(&slot),
                        Arc::clone(&slot.version),
                        request_id,
                    ));
                }
                Err(limit) => limit,
            };
            // Blocked by the budget (not by its own cap): others releasing instances give way.
            let waiting_for_memory = !matches!(limit, Limit::MaxInstances(_));
            let _registered = waiting_for_memory.then(|| MemoryWaiter::new(self, key));
            let woken = async {
                tokio::select! {
                    () = notified => {}
                    () = slot_freed => {}
                }
            };
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Err(InvokeError::Overloaded {
                    limit,
                    queue_timeout: self.cfg.queue_timeout,
                });
            }
        }
    }

    /// Guest memory of the function's instances (all versions, starting or running).
    fn held_mib(st: &State, key: &FunctionKey) -> u64 {
        st.functions
            .get(key)
            .map_or(0, |f| f.entries.iter().map(|e| e.slot.memory_mib).sum())
    }

    /// True if other functions wait for budget and `key`, holding `extra` MiB more, would hold
    /// more than an equal share of the budget among the functions that want memory. This is
    /// what keeps one busy function from starving the others: over its share it reuses its
    /// instances but starts no new ones, and gives instances back as their requests end.
    pub(super) fn over_fair_share(&self, st: &State, key: &FunctionKey, extra: u64) -> bool {
        let others = st
            .memory_waiters
            .iter()
            .filter(|(k, n)| *k != key && **n > 0)
            .count();
        if others == 0 {
            return false;
        }
        let share = self.cfg.memory_budget_mib / (others as u64 + 1);
        Self::held_mib(st, key) + extra > share
    }

    /// True if `memory` MiB fit in the budget, after reclaiming idle instances of other
    /// functions (and drained versions) if needed. Reclaimed memory counts as committed until
    /// those instances are stopped, so this may still say no: the caller waits to be woken.
    pub(super) fn make_room(
        self: &Arc<Self>,
        st: &mut State,
        key: &FunctionKey,
        memory: u64,
    ) -> bool {
        let budget = self.cfg.memory_budget_mib;
        if st.committed_mib + memory <= budget {
            return true;
        }
        if memory > budget {
            return false;
        }
        // Idle instances anyone could spare, least recently used first; a function keeps its
        // provisioned ones, and the asking function's own idle instances are not candidates
        // (they would have been reused).
        let mut candidates: Vec<(Instant, FunctionKey, String, u64)> = Vec::new();
        for (k, f) in &st.functions {
            let mut spare_ready = f
                .entries
                .iter()
                .filter(|e| e.phase == Phase::Ready && e.slot.version.version == f.version.version)
                .count()
                .saturating_sub(f.version.spec.provisioned_concurrency as usize);
            let mut idle: Vec<&Entry> = f
                .entries
                .iter()
                .filter(|e| e.phase == Phase::Ready && e.in_flight == 0)
                .collect();
            idle.sort_by_key(|e| e.last_used);
            for e in idle {
                let stale = e.slot.version.version != f.version.version;
                if k == key && !stale {
                    continue;
                }
                if !stale {
                    if spare_ready == 0 {
                        continue;
                    }
                    spare_ready -= 1;
                }
                candidates.push((e.last_used, k.clone(), e.slot.id.clone(), e.slot.memory_mib));
            }
        }
        candidates.sort_by_key(|c| c.0);
        let mut freeing = 0;
        let need = st.committed_mib + memory - budget;
        let mut chosen = Vec::new();
        for (_, k, id, mib) in candidates {
            if freeing >= need {
                break;
            }
            freeing += mib;
            chosen.push((k, id));
        }
        if freeing >= need {
            for (k, id) in chosen {
                tracing::debug!(function = %k, instance = %id, "reclaiming an idle instance for another function");
                self.retire(st, &k, &id);
            }
        }
        false
    }
}

/// Starts provisioned instances of the function's active version until it has its
/// `provisioned_concurrency` (as far as the budget allows).
pub(super) fn top_up_provisioned(inner: &Arc<Inner>, key: &FunctionKey) {
    let slots: Vec<Arc<Slot>> = {
        let mut st = inner.lock();
        if st.shutting_down {
            return;
        }
        let Some(f) = st.functions.get(key) else {
            return;
        };
        let version = Arc::clone(&f.version);
        let have = f
            .entries
            .iter()
            .filter(|e| e.slot.version.version == version.version)
            .count();
        let want = (version.spec.provisioned_concurrency as usize)
            .min(version.spec.max_instances.max(1) as usize);
        let mut slots = Vec::new();
        for _ in have..want {
            let memory = u64::from(version.spec.memory_mb);
            if st.committed_mib + memory > inner.cfg.memory_budget_mib {
                tracing::warn!(function = %key, "the memory budget leaves no room for all provisioned instances");
                break;
            }
            slots.push(inner.new_slot(&mut st, key, &version, 0));
        }
        inner.publish(&st);
        slots
    };
    for slot in slots {
        let inner = Arc::clone(inner);
        let function = key.to_string();
        tokio::spawn(async move {
            let t = Instant::now();
            match inner.start(slot).await {
                Ok(kind) => inner.metrics.start(&function, kind, t.elapsed()),
                Err(e) => {
                    tracing::warn!(function, error = %e, "a provisioned instance failed to start")
                }
            }
        });
    }
}

/// Every so often: stops instances idle longer than the idle timeout (beyond the provisioned
/// ones) and tops provisioned functions back up.
pub(super) async fn reap(weak: Weak<Inner>) {
    let tick = weak
        .upgrade()
        .map(|i| i.cfg.idle_timeout / 4)
        .unwrap_or_default()
        .clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(tick).await;
        let Some(inner) = weak.upgrade() else {
            return;
        };
        let keys: Vec<FunctionKey> = {
            let mut st = inner.lock();
            let now = Instant::now();
            let mut expired: Vec<(FunctionKey, String)> = Vec::new();
            for (key, f) in &st.functions {
                let mut keep = f.version.spec.provisioned_concurrency as usize;
                let mut idle: Vec<&Entry> = f
                    .entries
                    .iter()
                    .filter(|e| e.phase == Phase::Ready && e.in_flight == 0)
                    .collect();
                // The most recently used are the ones kept.
                idle.sort_by_key(|e| std::cmp::Reverse(e.last_used));
                for e in idle {
                    let current = e.slot.version.version == f.version.version;
                    if current && keep > 0 {
                        keep -= 1;
                        continue;
                    }
                    if !current || now.duration_since(e.last_used) >= inner.cfg.idle_timeout {
                        expired.push((key.clone(), e.slot.id.clone()));
                    }
                }
            }
            for (key, id) in &expired {
                tracing::debug!(function = %key, instance = %id, "stopping an idle instance");
                inner.retire(&mut st, key, id);
            }
            if !expired.is_empty() {
                inner.publish(&st);
            }
            st.functions
                .iter()
                .filter(|(_, f)| f.version.spec.provisioned_concurrency > 0)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in keys {
            top_up_provisioned(&inner, &key);
        }
    }
}
