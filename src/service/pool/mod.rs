//! The instance pool of `fnvm serve`: which instance serves an invocation, and invoking it.
//!
//! Per function the pool keeps the instances of its active version (and, while they drain, of
//! the previous one). An invocation takes a *lease* on an instance with a free slot — one
//! request at a time for event functions, `concurrency` at a time for web functions — reusing a
//! warm idle instance when there is one (the most recently used, so the others age out), else
//! cold-starting a new one if the function is below `max_instances` and the host-wide memory
//! budget has room. Idle instances of *other* functions are reclaimed first when only the budget
//! is in the way, so one busy function cannot keep memory others need. A request that finds no
//! capacity waits (woken whenever capacity frees) up to `queue_timeout`, then gets
//! [`InvokeError::Overloaded`].
//!
//! Guest memory is committed when a start is decided and released only once the instance is
//! fully stopped, so the sum of guest memory of all instances never exceeds the budget.
//!
//! A request that exceeds the function's timeout, or whose instance dies under it, destroys the
//! instance (the next request starts a fresh one; provisioned instances are topped up by the
//! reaper). Idle instances beyond `provisioned_concurrency` are stopped after `idle_timeout`.
//!
//! Web invocations stream both ways; an upgrade request (WebSocket or any protocol) answered
//! with 101 becomes a byte tunnel between client and function that holds its instance slot
//! until either side closes.
//!
//! Log lines are attributed to the request the agent last said reached the function before it
//! read them (see [`Attribution`](super::logs::Attribution)): the agent's bridge finds each
//! request's `X-Scf-Request-Id` in its head and says so on the control stream, in order with the lines, before the function
//! sees the request. Lines read between requests go to the one before. That is exact for one
//! request at a time, on any guest clock; for a web instance serving several requests at once
//! the lines printed meanwhile have no request id.
//!
//! The parts: [`capacity`] (the policy: limits, fair share, reclaiming room, idle reap,
//! provisioned top-up), [`lifecycle`] (an instance's start, watch, retire and stop), [`lease`]
//! (a request's hold on an instance slot); the request itself goes the way every invocation
//! goes ([`crate::invoke`]).

mod capacity;
mod lease;
mod lifecycle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};

use self::capacity::{reap, top_up_provisioned};
use self::lease::LeasedBody;
use self::lifecycle::with_last_lines;
use super::logs::{Attribution, LogStore};
use super::metrics::{InstanceCounts, Metrics};
use super::model::{FunctionKey, FunctionVersion};
use crate::home::Home;
use crate::invoke::connector::InstanceClient;
use crate::invoke::idle::IdleLimit;
use crate::invoke::proxy::{self, FirstReply, ForwardError};
use crate::invoke::request::{event_request, is_upgrade, web_request, EventHead};
use crate::invoke::{tunnel, Body};
use crate::sandbox::{Instance, Sandbox};

/// The pool's limits.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Host-wide sum of guest memory of all instances (starting, running or stopping), MiB.
    pub memory_budget_mib: u64,
    /// An idle instance beyond the provisioned ones is stopped after this long.
    pub idle_timeout: Duration,
    /// How long a request waits for capacity before it gets [`InvokeError::Overloaded`].
    pub queue_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            memory_budget_mib: 4096,
            idle_timeout: Duration::from_secs(300),
            queue_timeout: Duration::from_secs(10),
        }
    }
}

/// Why an invocation failed. [`InvokeError::code`] and [`InvokeError::status`] make the API's
/// error body; the message says which of the cases happened.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// The function is not (or no longer) in the pool with a version to run.
    #[error("the function has no active version (not deployed, still pending, or failed)")]
    NotActive,
    /// Every way to an instance stayed blocked for the whole queue timeout.
    #[error(
        "no instance became free within the queue timeout of {}: {limit}; retry later",
        humantime::format_duration(*queue_timeout)
    )]
    Overloaded {
        /// What kept the request waiting.
        limit: Limit,
        queue_timeout: Duration,
    },
    /// The function's timeout passed before its answer (the instance is destroyed).
    #[error(
        "the function did not answer within its timeout of {secs} s; its instance was destroyed \
         and the next invocation starts a new one"
    )]
    Timeout {
        /// The function's timeout.
        secs: u32,
    },
    /// The instance died or broke the stream mid-request (it is replaced).
    #[error("the function's instance crashed during the invocation and was replaced: {detail}")]
    Crashed {
        /// Which instance, how it ended and its last lines.
        detail: String,
    },
    /// No instance could be started for the request.
    #[error(
        "the function's instance could not start: {}",
        with_last_lines(message, last_lines)
    )]
    StartFailed {
        message: String,
        last_lines: Vec<String>,
    },
    /// Anything else on the pool's side (the message says what).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The limit that kept a request from getting an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    /// The function has all the instances it may have, each busy.
    #[error("the function is at its max_instances ({0}) and every instance is busy")]
    MaxInstances(u32),
    /// Starting another instance would pass the host's memory budget.
    #[error(
        "the host's memory budget ({budget_mib} MiB, serve --memory-budget) has no room for \
         another {needed_mib} MiB instance"
    )]
    MemoryBudget { budget_mib: u64, needed_mib: u64 },
    /// Other functions wait for memory and this one holds its share.
    #[error(
        "other functions wait for the host's memory budget ({budget_mib} MiB) and this one \
         holds its fair share of it"
    )]
    FairShare { budget_mib: u64 },
}

impl InvokeError {
    /// Seconds a client should wait before retrying, for the errors a retry can cure.
    pub fn retry_after_secs(&self) -> Option<u32> {
        matches!(self, InvokeError::Overloaded { .. }).then_some(1)
    }

    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::NotActive => "FunctionNotActive",
            InvokeError::Overloaded { .. } => "TooManyRequests",
            InvokeError::Timeout { .. } => "FunctionTimeout",
            InvokeError::Crashed { .. } => "FunctionCrashed",
            InvokeError::StartFailed { .. } => "FunctionStartFailed",
            InvokeError::Internal(_) => "InternalError",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            InvokeError::NotActive => StatusCode::CONFLICT,
            InvokeError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            InvokeError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            InvokeError::Crashed { .. } | InvokeError::StartFailed { .. } => {
                StatusCode::BAD_GATEWAY
            }
            InvokeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// One instance as `instances()` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceInfo {
    pub id: String,
    /// `starting`, `idle` or `busy`.
    pub state: &'static str,
    /// The function version it runs.
    pub version: String,
    /// RFC 3339.
    pub started_at: String,
    /// Requests in flight on it.
    pub in_flight: u32,
}

/// The instance pool. Create with [`Pool::new`] inside a tokio runtime.
pub struct Pool {
    inner: Arc<Inner>,
    reaper: tokio::task::JoinHandle<()>,
}

struct Inner {
    sandbox: Arc<dyn Sandbox>,
    home: Home,
    cfg: PoolConfig,
    logs: Arc<LogStore>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// Woken whenever capacity may have freed for anyone (an instance stopped or started, an
    /// idle one became reclaimable for a request waiting for memory, a version changed). A
    /// lease that ends wakes one waiter of its own function instead ([`Function::freed`]).
    changed: tokio::sync::Notify,
    /// Starts run one at a time until one has succeeded: the sandbox makes per-home caches
    /// (the writable-layer template) on its first start, and concurrent first starts in a fresh
    /// home race on them.
    first_start: tokio::sync::Mutex<bool>,
}

#[derive(Default)]
struct State {
    functions: HashMap<FunctionKey, Function>,
    /// Requests per function waiting for room in the memory budget (below their own cap).
    memory_waiters: HashMap<FunctionKey, usize>,
    /// Guest memory of every instance from the decision to start it until it is stopped.
    committed_mib: u64,
    shutting_down: bool,
}

struct Function {
    version: Arc<FunctionVersion>,
    entries: Vec<Entry>,
    /// A slot of one of its instances is free again: wakes one waiting request, the one that
    /// has waited longest (tokio's `notify_one` is first in, first out, and a woken request
    /// that goes away passes the wake-up on). Waking every waiter of every function on each
    /// reply instead cost a wake-up per waiter per reply and served them in no order
    /// (measured: 64 connections on 8 instances, p99 49 ms against a 7 ms mean).
    freed: Arc<tokio::sync::Notify>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
}

/// The pool's bookkeeping of one instance (under the pool lock).
struct Entry {
    slot: Arc<Slot>,
    phase: Phase,
    in_flight: u32,
    last_used: Instant,
}

/// One instance: what requests and the log sink share.
struct Slot {
    id: String,
    key: FunctionKey,
    version: Arc<FunctionVersion>,
    memory_mib: u64,
    started_at: SystemTime,
    running: std::sync::OnceLock<Running>,
    attribution: Arc<Mutex<Attribution>>,
    /// Set by the instance's first reply, when a snapshot start's restore is measured.
    first_reply: FirstReply,
}

struct Running {
    instance: Arc<dyn Instance>,
    /// Keep-alive HTTP/1.1 streams to the instance's port 9000.
    client: InstanceClient,
}

impl Pool {
    pub fn new(
        sandbox: Arc<dyn Sandbox>,
        home: Home,
        cfg: PoolConfig,
        logs: Arc<LogStore>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let inner = Arc::new(Inner {
            sandbox,
            home,
            cfg,
            logs,
            metrics,
            state: Mutex::new(State::default()),
            changed: tokio::sync::Notify::new(),
            first_start: tokio::sync::Mutex::new(false),
        });
        inner.publish(&inner.lock());
        let reaper = tokio::spawn(reap(Arc::downgrade(&inner)));
        Arc::new(Self { inner, reaper })
    }

    /// Makes `version` the one new requests of its function get; instances of the previous
    /// version drain (idle ones stop now, busy ones when their requests end). Provisioned
    /// instances start in the background.
    pub fn activate(&self, version: Arc<FunctionVersion>) {
        let key = version.key.clone();
        {
            let mut st = self.inner.lock();
            if st.shutting_down {
                return;
            }
            let f = st.functions.entry(key.clone()).or_insert_with(|| Function {
                version: Arc::clone(&version),
                entries: Vec::new(),
                freed: Arc::default(),
            });
            let replaced = std::mem::replace(&mut f.version, Arc::clone(&version));
            if replaced.version != version.version {
                self.inner.discard_snapshot(&replaced);
            }
            let stale: Vec<String> = f
                .entries
                .iter()
                .filter(|e| {
                    e.slot.version.version != version.version
                        && e.phase == Phase::Ready
                        && e.in_flight == 0
                })
                .map(|e| e.slot.id.clone())
                .collect();
            for id in stale {
                self.inner.retire(&mut st, &key, &id);
            }
            self.inner.publish(&st);
        }
        self.inner.changed.notify_waiters();
        top_up_provisioned(&self.inner, &key);
    }

    /// Forgets the function and stops all its instances (requests in flight on them fail).
    pub fn remove(&self, key: &FunctionKey) {
        let mut st = self.inner.lock();
        if let Some(f) = st.functions.get(key) {
            let ids: Vec<String> = f.entries.iter().map(|e| e.slot.id.clone()).collect();
            for id in ids {
                self.inner.retire(&mut st, key, &id);
            }
        }
        if let Some(f) = st.functions.remove(key) {
            self.inner.discard_snapshot(&f.version);
        }
        self.inner.publish(&st);
        drop(st);
        self.inner.changed.notify_waiters();
    }

    /// The function's instances (all versions).
    pub fn instances(&self, key: &FunctionKey) -> Vec<InstanceInfo> {
        let st = self.inner.lock();
        let Some(f) = st.functions.get(key) else {
            return Vec::new();
        };
        f.entries
            .iter()
            .map(|e| InstanceInfo {
                id: e.slot.id.clone(),
                state: match (e.phase, e.in_flight) {
                    (Phase::Starting, _) => "starting",
                    (Phase::Ready, 0) => "idle",
                    (Phase::Ready, _) => "busy",
                },
                version: e.slot.version.version.clone(),
                started_at: humantime::format_rfc3339_seconds(e.slot.started_at).to_string(),
                in_flight: e.in_flight,
            })
            .collect()
    }

    /// Guest memory committed right now, MiB (also exported as a metric).
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn committed_mib(&self) -> u64 {
        self.inner.lock().committed_mib
    }

    /// An event invocation: `POST /event-invoke` with `body` and the `X-Scf-*` headers (plus
    /// `X-Scf-Trigger-Src: Timer` for timer firings). The whole response is read within the
    /// function's timeout.
    pub async fn invoke_event(
        &self,
        key: &FunctionKey,
        request_id: &str,
        body: Bytes,
        timer: bool,
    ) -> Result<Response<Body>, InvokeError> {
        self.counted(key, self.invoke_event_inner(key, request_id, body, timer))
            .await
    }

    /// Counts the invocation and, if it fails, its error kind.
    async fn counted(
        &self,
        key: &FunctionKey,
        invocation: impl std::future::Future<Output = Result<Response<Body>, InvokeError>>,
    ) -> Result<Response<Body>, InvokeError> {
        let function = key.to_string();
        self.inner.metrics.invocation(&function);
        let result = invocation.await;
        if let Err(e) = &result {
            self.inner.metrics.error(&function, e.code());
        }
        result
    }

    async fn invoke_event_inner(
        &self,
        key: &FunctionKey,
        request_id: &str,
        body: Bytes,
        timer: bool,
    ) -> Result<Response<Body>, InvokeError> {
        // A warm instance that died since it was picked (before the watcher retired it) is
        // unreachable before any byte of the event is sent: that one is retried once on
        // another instance, the event being replayable.
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            let lease = self.inner.acquire(key, request_id).await?;
            let settings = &lease.settings_from.settings;
            let head = EventHead {
                content_type: None,
                content_length: Some(HeaderValue::from(body.len())),
                timer,
            };
            let body = Full::new(body.clone())
                .map_err(|never| match never {})
                .boxed();
            let req = event_request(body, head, settings, request_id);
            let secs = settings.timeout_s.max(1);
            return match proxy::forward_whole(lease.client(), req, secs).await {
                Ok(resp) => {
                    lease.replied();
                    Ok(resp)
                }
                Err(ForwardError::Unreachable(error)) if attempts_left > 0 => {
                    tracing::warn!(function = %key, instance = %lease.slot.id, error, "an instance was unreachable; retrying on another");
                    lease.destroy();
                    continue;
                }
                Err(e) => Err(lease.failed(e).await),
            };
        }
    }

    /// A web invocation: `req` (already carrying the function-relative path and query) passes
    /// through with its hop-by-hop headers dropped; the response streams back, and the instance
    /// slot is held until the response body is finished or dropped. The timeout covers the
    /// time until the response head arrives.
    pub async fn invoke_web(
        &self,
        key: &FunctionKey,
        request_id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, InvokeError> {
        self.counted(key, self.invoke_web_inner(key, request_id, req))
            .await
    }

    async fn invoke_web_inner(
        &self,
        key: &FunctionKey,
        request_id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, InvokeError> {
        let lease = self.inner.acquire(key, request_id).await?;
        let settings = &lease.settings_from.settings;
        let secs = settings.timeout_s.max(1);
        if is_upgrade(req.headers()) {
            let instance = Arc::clone(lease.instance());
            return match tunnel::handshake(instance, req, settings, request_id, secs).await {
                Ok(handshake) => {
                    lease.replied();
                    let id = lease.slot.id.clone();
                    Ok(handshake.join(lease, &id))
                }
                // The tunnel's own words for an instance it cannot reach.
                Err(e @ ForwardError::Unreachable(_)) => Err(lease.crashed(e.to_string()).await),
                Err(e) => Err(lease.failed(e).await),
            };
        }
        let req = web_request(req, settings, request_id).map(BodyExt::boxed);
        let resp = match proxy::forward(lease.client(), req, secs).await {
            Ok(resp) => {
                lease.replied();
                resp
            }
            Err(e) => return Err(lease.failed(e).await),
        };
        let (parts, body) = resp.into_parts();
        // A web answer streams as long as it likes, but one that stalls for the function's
        // timeout is cut and its slot freed (see invoke::idle).
        let body = LeasedBody::new(IdleLimit::new(body, secs), lease).boxed();
        Ok(Response::from_parts(parts, body))
    }

    /// Stops every instance and waits until they are gone.
    pub async fn shutdown(&self) {
        self.reaper.abort();
        {
            let mut st = self.inner.lock();
            st.shutting_down = true;
            let all: Vec<(FunctionKey, String)> = st
                .functions
                .iter()
                .flat_map(|(k, f)| f.entries.iter().map(|e| (k.clone(), e.slot.id.clone())))
                .collect();
            for (key, id) in all {
                self.inner.retire(&mut st, &key, &id);
            }
            st.functions.clear();
            self.inner.publish(&st);
        }
        self.inner.changed.notify_waiters();
        // Instances stop on their own threads; starts in progress see `shutting_down` and stop
        // their instance themselves.
        for _ in 0..600 {
            if self.inner.lock().committed_mib == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Pool {
    /// A pool dropped without [`Pool::shutdown`] (an error path, a panic) still stops its
    /// instances: they run in their own sessions and would outlive the service otherwise.
    fn drop(&mut self) {
        self.reaper.abort();
        let instances: Vec<Arc<dyn Instance>> = {
            let mut st = self.inner.lock();
            st.shutting_down = true;
            st.functions
                .drain()
                .flat_map(|(_, f)| f.entries)
                .filter_map(|e| e.slot.running.get().map(|r| Arc::clone(&r.instance)))
                .collect()
        };
        let stops: Vec<_> = instances
            .into_iter()
            .map(|instance| {
                std::thread::spawn(move || {
                    if let Err(e) = instance.stop() {
                        tracing::warn!(instance = instance.id(), error = %e, "stopping an instance failed");
                    }
                })
            })
            .collect();
        for stop in stops {
            let _ = stop.join();
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pushes instance counts and committed memory to the metrics.
    fn publish(&self, st: &State) {
        let mut counts = InstanceCounts::default();
        for f in st.functions.values() {
            for e in &f.entries {
                match (e.phase, e.in_flight) {
                    (Phase::Starting, _) => counts.starting += 1,
                    (Phase::Ready, 0) => counts.idle += 1,
                    (Phase::Ready, _) => counts.busy += 1,
                }
            }
        }
        self.metrics.set_instances(
            counts,
            st.committed_mib << 20,
            self.cfg.memory_budget_mib << 20,
        );
    }
}

#[cfg(test)]
mod tests;
