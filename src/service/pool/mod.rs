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
//! read them (see [`Attribution`]): the agent's bridge finds each request's `X-Scf-Request-Id`
//! in its head and says so on the control stream, in order with the lines, before the function
//! sees the request. Lines read between requests go to the one before. That is exact for one
//! request at a time, on any guest clock; for a web instance serving several requests at once
//! the lines printed meanwhile have no request id.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::logs::{LogEntry, LogStore};
use super::metrics::{InstanceCounts, Metrics, StartKind};
use super::model::{FunctionKey, FunctionType, FunctionVersion};
use crate::function::set_scf_headers;
use crate::home::Home;
use crate::invoke::front::{error_chain, strip_hop_by_hop, InstanceConnector};
use crate::sandbox::guest_clock::host_now_us;
use crate::sandbox::{
    instances_root, new_instance_id, Instance, InstanceSpec, LogStream, Sandbox, SandboxError,
};

/// The body of every response the pool hands back.
pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// The body the pool sends to instances.
type OutBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// The path event invocations are delivered to.
pub const EVENT_PATH: &str = "/event-invoke";

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
    #[error("the function has no active version (not deployed, still pending, or failed)")]
    NotActive,
    #[error(
        "no instance became free within the queue timeout of {}: {limit}; retry later",
        humantime::format_duration(*queue_timeout)
    )]
    Overloaded {
        /// What kept the request waiting.
        limit: Limit,
        queue_timeout: Duration,
    },
    #[error(
        "the function did not answer within its timeout of {secs} s; its instance was destroyed \
         and the next invocation starts a new one"
    )]
    Timeout { secs: u32 },
    #[error("the function's instance crashed during the invocation and was replaced: {detail}")]
    Crashed { detail: String },
    #[error(
        "the function's instance could not start: {}",
        with_last_lines(message, last_lines)
    )]
    StartFailed {
        message: String,
        last_lines: Vec<String>,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The limit that kept a request from getting an instance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limit {
    #[error("the function is at its max_instances ({0}) and every instance is busy")]
    MaxInstances(u32),
    #[error(
        "the host's memory budget ({budget_mib} MiB, serve --memory-budget) has no room for \
         another {needed_mib} MiB instance"
    )]
    MemoryBudget { budget_mib: u64, needed_mib: u64 },
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
    /// Woken whenever capacity may have freed (a lease ended, an instance stopped or started).
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
    replied: std::sync::atomic::AtomicBool,
}

struct Running {
    instance: Arc<dyn Instance>,
    /// Keep-alive HTTP/1.1 streams to the instance's port 9000.
    client: Client<InstanceConnector, OutBody>,
}

/// Which request a log line belongs to: the invocations of one instance with the host's times
/// (µs) they were sent and answered. The agent names the request each line was read under
/// ([`LogLine::after_request`](crate::sandbox::LogLine)); that name counts only if it is one of
/// these (the head it came from may hold a caller's bytes) and the request did not overlap
/// another on this instance (then the function may have printed for either).
#[derive(Default)]
struct Attribution {
    requests: std::collections::VecDeque<Invocation>,
}

struct Invocation {
    request_id: String,
    sent_us: u64,
    answered_us: Option<u64>,
}

/// Invocations remembered per instance for attributing late lines.
const ATTRIBUTION_HISTORY: usize = 256;

impl Attribution {
    fn begin(&mut self, request_id: &str) {
        if self.requests.len() >= ATTRIBUTION_HISTORY {
            if let Some(i) = self.requests.iter().position(|r| r.answered_us.is_some()) {
                self.requests.remove(i);
            }
        }
        self.requests.push_back(Invocation {
            request_id: request_id.to_string(),
            sent_us: host_now_us(),
            answered_us: None,
        });
    }

    /// The request's response is complete (a second call changes nothing).
    fn end(&mut self, request_id: &str) {
        let now = host_now_us();
        if let Some(r) = self
            .requests
            .iter_mut()
            .rev()
            .find(|r| r.request_id == request_id && r.answered_us.is_none())
        {
            r.answered_us = Some(now);
        }
    }

    /// The request a line belongs to, given the request the agent says it was read under.
    fn owner(&self, after_request: Option<&str>) -> Option<String> {
        let id = after_request?;
        let r = self.requests.iter().rev().find(|r| r.request_id == id)?;
        let end = r.answered_us.unwrap_or(u64::MAX);
        let overlapped = self.requests.iter().any(|o| {
            !std::ptr::eq(o, r) && o.sent_us < end && o.answered_us.is_none_or(|a| a > r.sent_us)
        });
        (!overlapped).then(|| r.request_id.clone())
    }
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
    ) -> Result<Response<BoxBody>, InvokeError> {
        let function = key.to_string();
        self.inner.metrics.invocation(&function);
        let result = self.invoke_event_inner(key, request_id, body, timer).await;
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
    ) -> Result<Response<BoxBody>, InvokeError> {
        // A warm instance that died since it was picked (before the watcher retired it) is
        // unreachable before any byte of the event is sent: that one is retried once on
        // another instance, the event being replayable.
        let mut attempts_left = 2;
        loop {
            attempts_left -= 1;
            let lease = self.inner.acquire(key, request_id).await?;
            let version = Arc::clone(&lease.settings_from);
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(format!("http://{POOL_AUTHORITY}{EVENT_PATH}"))
                .header(hyper::header::HOST, "127.0.0.1:9000")
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .header(hyper::header::CONTENT_LENGTH, body.len())
                .body(
                    Full::new(body.clone())
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .map_err(|e| InvokeError::Internal(format!("building the event request: {e}")))?;
            let headers = req.headers_mut();
            set_scf_headers(headers, &version.settings, request_id);
            if timer {
                headers.insert("x-scf-trigger-src", HeaderValue::from_static("Timer"));
            }
            let secs = version.settings.timeout_s.max(1);
            let client = lease.client().clone();
            let exchange = async {
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| (e.is_connect(), error_chain(&e)))?;
                let (mut parts, body) = resp.into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map_err(|e| (false, error_chain(&e)))?
                    .to_bytes();
                strip_hop_by_hop(&mut parts.headers);
                Ok::<_, (bool, String)>(Response::from_parts(
                    parts,
                    Full::new(bytes).map_err(|never| match never {}).boxed(),
                ))
            };
            return match tokio::time::timeout(Duration::from_secs(u64::from(secs)), exchange).await
            {
                Ok(Ok(resp)) => {
                    lease.replied();
                    Ok(resp)
                }
                Ok(Err((true, error))) if attempts_left > 0 => {
                    tracing::warn!(function = %key, instance = %lease.slot.id, error, "an instance was unreachable; retrying on another");
                    lease.destroy();
                    continue;
                }
                Ok(Err((_, error))) => Err(lease.crashed(error).await),
                Err(_) => {
                    lease.destroy();
                    Err(InvokeError::Timeout { secs })
                }
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
    ) -> Result<Response<BoxBody>, InvokeError> {
        let function = key.to_string();
        self.inner.metrics.invocation(&function);
        let result = self.invoke_web_inner(key, request_id, req).await;
        if let Err(e) = &result {
            self.inner.metrics.error(&function, e.code());
        }
        result
    }

    async fn invoke_web_inner(
        &self,
        key: &FunctionKey,
        request_id: &str,
        req: Request<Incoming>,
    ) -> Result<Response<BoxBody>, InvokeError> {
        let lease = self.inner.acquire(key, request_id).await?;
        let secs = lease.settings_from.settings.timeout_s.max(1);
        if is_upgrade(req.headers()) {
            return tunnel(lease, req, secs).await;
        }
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        set_scf_headers(
            &mut parts.headers,
            &lease.settings_from.settings,
            request_id,
        );
        parts.version = hyper::Version::HTTP_11;
        let mut uri = hyper::Uri::builder()
            .scheme("http")
            .authority(POOL_AUTHORITY);
        if let Some(pq) = parts.uri.path_and_query() {
            uri = uri.path_and_query(pq.clone());
        }
        parts.uri = uri
            .build()
            .map_err(|e| InvokeError::Internal(format!("request target: {e}")))?;
        let req = Request::from_parts(parts, body.boxed());
        let client = lease.client().clone();
        let resp =
            match tokio::time::timeout(Duration::from_secs(u64::from(secs)), client.request(req))
                .await
            {
                Ok(Ok(resp)) => {
                    lease.replied();
                    resp
                }
                Ok(Err(e)) => return Err(lease.crashed(error_chain(&e)).await),
                Err(_) => {
                    lease.destroy();
                    return Err(InvokeError::Timeout { secs });
                }
            };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = LeasedBody::new(body, lease)
            .map_err(std::io::Error::other)
            .boxed();
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

/// A web response's body on its way to the caller, holding the instance's slot (a [`Lease`])
/// until the instance has sent its last byte. Then the lease goes: the slot is free however
/// slowly the caller reads, and the request counts as answered before the caller sees that
/// byte, so a caller's next request cannot seem to overlap this one in the log attribution.
struct LeasedBody<B, L = Lease> {
    body: B,
    lease: Option<L>,
}

impl<B: hyper::body::Body + Unpin, L> LeasedBody<B, L> {
    fn new(body: B, lease: L) -> Self {
        // An empty body may never be polled: its response is complete with the head.
        let lease = (!body.is_end_stream()).then_some(lease);
        Self { body, lease }
    }
}

impl<B: hyper::body::Body + Unpin, L: Unpin> hyper::body::Body for LeasedBody<B, L> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            // The last frame of a body of known length: the server may not poll again.
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.lease = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A request's hold on one slot of an instance. Dropping it frees the slot; [`Lease::destroy`]
/// stops the instance instead.
struct Lease {
    inner: Arc<Inner>,
    slot: Arc<Slot>,
    /// The function's active version when the lease was taken: its settings (timeout,
    /// headers) apply, also on an instance started under an earlier record of the same
    /// version (a changed timeout or scaling knob keeps the version id).
    settings_from: Arc<FunctionVersion>,
    request_id: String,
    destroy: bool,
}

impl Lease {
    fn client(&self) -> &Client<InstanceConnector, OutBody> {
        &self
            .slot
            .running
            .get()
            .expect("a leased instance is running")
            .client
    }

    fn destroy(mut self) {
        self.destroy = true;
    }

    /// The instance's reply head arrived. The first reply of a snapshot start measures its
    /// restore (in the background: it reads /proc and asks the VMM).
    fn replied(&self) {
        if self
            .slot
            .replied
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let Some(running) = self.slot.running.get() else {
            return;
        };
        if running.instance.start_info().kind != crate::sandbox::ColdStart::Snapshot {
            return;
        }
        let instance = Arc::clone(&running.instance);
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            if let Some(report) = instance.restore_report() {
                inner.metrics.restore(&report);
            }
        });
    }

    /// The instance failed mid-request: says how, and destroys it.
    async fn crashed(self, error: String) -> InvokeError {
        let instance = Arc::clone(&self.slot.running.get().expect("running").instance);
        // The stream breaks a moment before the sandbox notices its agent or function died.
        let mut report = instance.exited();
        for _ in 0..20 {
            if report.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            report = instance.exited();
        }
        let detail = match report {
            Some(r) => format!(
                "instance {} {}",
                self.slot.id,
                with_last_lines(&r.reason, &r.last_lines)
            ),
            None => format!(
                "instance {}: the function closed the connection without a complete answer: \
                 {error}",
                self.slot.id
            ),
        };
        self.destroy();
        InvokeError::Crashed { detail }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut a = self
                .slot
                .attribution
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            a.end(&self.request_id);
        }
        let mut st = self.inner.lock();
        let key = &self.slot.key;
        let current = st.functions.get(key).map(|f| f.version.version.clone());
        let mut retire = self.destroy || st.shutting_down;
        if let Some(e) = st
            .functions
            .get_mut(key)
            .and_then(|f| f.entries.iter_mut().find(|e| e.slot.id == self.slot.id))
        {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.last_used = Instant::now();
            if e.in_flight == 0 && current.as_deref() != Some(&self.slot.version.version) {
                retire = true;
            }
        }
        let idle_now = st
            .functions
            .get(key)
            .and_then(|f| f.entries.iter().find(|e| e.slot.id == self.slot.id))
            .is_some_and(|e| e.in_flight == 0);
        if idle_now && !retire && self.inner.over_fair_share(&st, key, 0) {
            tracing::debug!(function = %key, instance = %self.slot.id, "giving an instance back: other functions wait for memory");
            retire = true;
        }
        if retire {
            self.inner.retire(&mut st, key, &self.slot.id);
        }
        self.inner.publish(&st);
        drop(st);
        self.inner.changed.notify_waiters();
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A free slot on a warm instance, or a newly started instance, or Overloaded after the
    /// queue timeout.
    async fn acquire(
        self: &Arc<Self>,
        key: &FunctionKey,
        request_id: &str,
    ) -> Result<Lease, InvokeError> {
        let deadline = tokio::time::Instant::now() + self.cfg.queue_timeout;
        let function = key.to_string();
        let asked = Instant::now();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
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
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
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
    fn over_fair_share(&self, st: &State, key: &FunctionKey, extra: u64) -> bool {
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

    fn lease(
        self: &Arc<Self>,
        slot: Arc<Slot>,
        settings_from: Arc<FunctionVersion>,
        request_id: &str,
    ) -> Lease {
        slot.attribution
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin(request_id);
        Lease {
            inner: Arc::clone(self),
            slot,
            settings_from,
            request_id: request_id.to_string(),
            destroy: false,
        }
    }

    /// True if `memory` MiB fit in the budget, after reclaiming idle instances of other
    /// functions (and drained versions) if needed. Reclaimed memory counts as committed until
    /// those instances are stopped, so this may still say no: the caller waits to be woken.
    fn make_room(self: &Arc<Self>, st: &mut State, key: &FunctionKey, memory: u64) -> bool {
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

    /// Adds a Starting instance (memory committed) with `in_flight` slots already taken.
    fn new_slot(
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
            replied: Default::default(),
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
    fn discard_snapshot(&self, version: &FunctionVersion) {
        self.sandbox.discard_snapshot(
            &version.rootfs_image,
            &version.start,
            version.spec.memory_mb,
        );
    }

    /// Starts the slot's instance (its memory is already committed) and says how it started.
    /// On failure the slot is gone and its memory released.
    async fn start(self: &Arc<Self>, slot: Arc<Slot>) -> Result<StartKind, InvokeError> {
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
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .build(InstanceConnector {
                instance: Arc::clone(&instance),
            });
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
    fn forget_start(&self, slot: &Slot) {
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
    fn retire(self: &Arc<Self>, st: &mut State, key: &FunctionKey, id: &str) {
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
    fn stop_in_background(self: &Arc<Self>, memory_mib: u64, instance: Arc<dyn Instance>) {
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

/// `reason`, then the function's last lines once each: a line the reason already quotes (a
/// sandbox child's "it said:" tail holds the function's output too) is not repeated.
fn with_last_lines(reason: &str, last_lines: &[String]) -> String {
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

/// Starts provisioned instances of the function's active version until it has its
/// `provisioned_concurrency` (as far as the budget allows).
fn top_up_provisioned(inner: &Arc<Inner>, key: &FunctionKey) {
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
async fn reap(weak: Weak<Inner>) {
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

/// True for a request asking to switch protocols (`Connection: upgrade` + `Upgrade`), such as a
/// WebSocket handshake.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// An upgrade request (WebSocket or any other protocol) to a web function: sent on a stream of
/// its own; if the function answers 101, the client's and the function's upgraded connections
/// are joined byte for byte until either side closes. The tunnel holds the instance slot it
/// came in on; the function's timeout covers the handshake only.
async fn tunnel(
    lease: Lease,
    mut req: Request<Incoming>,
    secs: u32,
) -> Result<Response<BoxBody>, InvokeError> {
    let client_side = hyper::upgrade::on(&mut req);
    let upgrade = req.headers().get(hyper::header::UPGRADE).cloned();
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    set_scf_headers(
        &mut parts.headers,
        &lease.settings_from.settings,
        &lease.request_id,
    );
    if let Some(upgrade) = upgrade {
        parts.headers.insert(hyper::header::UPGRADE, upgrade);
        parts.headers.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    parts.version = hyper::Version::HTTP_11;
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()
        .map_err(|e| InvokeError::Internal(format!("request target: {e}")))?;
    let outbound = Request::from_parts(parts, body);
    let instance = Arc::clone(&lease.slot.running.get().expect("running").instance);
    let exchange = async move {
        let stream = tokio::task::spawn_blocking(move || instance.connect())
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot reach the function's port 9000: {e}"))?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| error_chain(&e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "an upgrade connection to a function ended");
            }
        });
        sender
            .send_request(outbound)
            .await
            .map_err(|e| error_chain(&e))
    };
    let mut resp = match tokio::time::timeout(Duration::from_secs(u64::from(secs)), exchange).await
    {
        Ok(Ok(resp)) => {
            lease.replied();
            resp
        }
        Ok(Err(e)) => return Err(lease.crashed(e).await),
        Err(_) => {
            lease.destroy();
            return Err(InvokeError::Timeout { secs });
        }
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // The function declined: an ordinary response, the slot held until it is read.
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let mut lease = Some(lease);
        let body = body
            .map_frame(move |frame| {
                let _ = &mut lease;
                frame
            })
            .map_err(std::io::Error::other)
            .boxed();
        return Ok(Response::from_parts(parts, body));
    }
    let function_side = hyper::upgrade::on(&mut resp);
    tokio::spawn(async move {
        let lease = lease;
        match (client_side.await, function_side.await) {
            (Ok(client), Ok(function)) => {
                let mut client = TokioIo::new(client);
                let mut function = TokioIo::new(function);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut function).await {
                    tracing::debug!(instance = %lease.slot.id, error = %e, "an upgraded connection ended with an error");
                }
            }
            (client, function) => tracing::debug!(
                instance = %lease.slot.id,
                client_ok = client.is_ok(),
                function_ok = function.is_ok(),
                "an upgrade did not complete"
            ),
        }
    });
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(
        parts,
        http_body_util::Empty::<Bytes>::new()
            .map_err(|never| match never {})
            .boxed(),
    ))
}

/// The pool key of every stream to an instance (each instance has a client of its own).
const POOL_AUTHORITY: &str = "function";

#[cfg(test)]
mod tests;
