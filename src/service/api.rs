//! The HTTP API of `fnvm serve` (design "HTTP API"): routes, the bearer token, JSON errors, the
//! function table with its persistent store, and background deploys (Pending → Active | Failed).
//!
//! Every error is `{"error":{"code","message","request_id"}}` with a fitting status. Registry
//! credentials arrive in request headers of a PUT (`X-Fnvm-Registry-Auth: Basic ...`), are
//! handed to the pull and dropped with it: never logged, stored or returned.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::deploy::{self, PullAccess};
use super::logs::{LogCursor, LogQuery, LogStore};
use super::metrics::Metrics;
use super::model::{now_rfc3339, FunctionKey, FunctionRecord, FunctionSpec, FunctionState};
use super::pool::Pool;
use super::spec_check::{self, SpecError};
use super::store::{DeployedVersion, Store, StoredFunction};
use crate::home::Home;
use crate::http_server::Admission;

/// The response body type shared with the pool.
pub type Body = super::pool::BoxBody;

/// Header carrying the deploy's registry credentials (`Basic base64(user:password)`).
pub const REGISTRY_AUTH_HEADER: &str = "x-fnvm-registry-auth";
/// Header naming registries the deploy may reach over plain HTTP (comma-separated).
pub const INSECURE_REGISTRY_HEADER: &str = "x-fnvm-insecure-registry";
/// Header carrying a PEM CA bundle for the registry, base64-encoded.
pub const REGISTRY_CA_HEADER: &str = "x-fnvm-registry-ca";
/// The response header with the invocation's request id.
pub const REQUEST_ID_HEADER: &str = "x-scf-request-id";

/// Largest function spec accepted.
const MAX_SPEC_BYTES: usize = 1 << 20;
/// Largest event body (a synchronous cloud function invocation takes up to 6 MB).
const MAX_EVENT_BYTES: usize = 6 << 20;

/// Settings of the API that are not per request.
pub struct ApiConfig {
    /// When set, every route but `/healthz` needs `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// The service's own registry settings, merged with each deploy's.
    pub insecure_registries: Vec<String>,
    pub registry_ca: Option<PathBuf>,
    /// The server's connection limits (named when a reserved connection refuses an invocation).
    pub connections: crate::http_server::ConnectionLimits,
}

/// One function in the table.
struct Entry {
    record: FunctionRecord,
    /// Bumped by every PUT and DELETE: a deploy only lands if it is still the latest.
    deploy_seq: u64,
}

/// The service: function table, store, pool, logs, metrics.
pub struct Service {
    home: Home,
    store: Store,
    functions: Mutex<BTreeMap<FunctionKey, Entry>>,
    pool: Arc<Pool>,
    logs: Arc<LogStore>,
    metrics: Arc<Metrics>,
    /// sha256 of the token: compared in constant time, and its length is not leaked either.
    token_hash: Option<[u8; 32]>,
    config: ApiConfig,
    /// Called with each function's schedules whenever its active version changes (timers).
    on_schedules: Mutex<Option<ScheduleHook>>,
}

/// Told `(key, schedules)` when a function's active version changes or it is removed (empty).
pub type ScheduleHook = Box<dyn Fn(&FunctionKey, &[String]) + Send + Sync>;

#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Seconds the client should wait before it retries (`Retry-After`).
    retry_after: Option<u32>,
}

impl ApiError {
    fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
        retry_after: None,
    }
}

/// The API's error for a failed invocation.
fn invoke_error(e: super::pool::InvokeError) -> ApiError {
    let api = err(e.status(), e.code(), e.to_string());
    match e.retry_after_secs() {
        Some(secs) => api.retry_after(secs),
        None => api,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Compares two digests without an early exit (xor fold), so timing does not reveal how much
/// of the token matched.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn hash_token(t: &[u8]) -> [u8; 32] {
    Sha256::digest(t).into()
}

impl Service {
    /// Loads the store; functions that were Active get their version rebuilt from the rootfs
    /// cache and activated in the background (`restore`).
    pub fn new(
        home: Home,
        pool: Arc<Pool>,
        logs: Arc<LogStore>,
        metrics: Arc<Metrics>,
        config: ApiConfig,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context as _;
        let store = Store::open(home.root()).context("cannot open the function store")?;
        let stored = store.load_all().context("cannot load the function store")?;
        let mut functions = BTreeMap::new();
        for s in stored {
            let state = match s.state {
                // The deploy died with the previous service, and its credentials with it.
                FunctionState::Pending => FunctionState::Failed {
                    reason: "the service restarted while this deploy was running; deploy again"
                        .into(),
                },
                other => other,
            };
            let record = FunctionRecord {
                key: s.key.clone(),
                spec: s.spec,
                state,
                version: None,
                created_at: s.created_at,
                updated_at: s.updated_at,
            };
            let mut entry = Entry {
                record,
                deploy_seq: 0,
            };
            if let Some(deployed) = &s.deployed {
                match deploy::cached_version(home.root(), &s.key, deployed) {
                    Ok(v) => entry.record.version = Some(Arc::new(v)),
                    Err(reason) => {
                        tracing::warn!(function = %s.key, %reason, "cannot restore the deployed version");
                        entry.record.state = FunctionState::Failed { reason };
                    }
                }
            }
            functions.insert(s.key, entry);
        }
        let token_hash = config
            .api_token
            .as_deref()
            .map(|t| hash_token(t.as_bytes()));
        Ok(Arc::new(Self {
            home,
            store,
            functions: Mutex::new(functions),
            pool,
            logs,
            metrics,
            token_hash,
            config,
            on_schedules: Mutex::new(None),
        }))
    }

    /// Registers the timer hook and tells it every restored function's schedules.
    pub fn set_schedule_hook(&self, hook: ScheduleHook) {
        for (key, e) in lock(&self.functions).iter() {
            if let Some(v) = &e.record.version {
                hook(key, &v.spec.schedules);
            }
        }
        *lock(&self.on_schedules) = Some(hook);
    }

    /// Activates every restored version in the pool (provisioned instances start).
    pub fn activate_restored(&self) {
        let versions: Vec<_> = lock(&self.functions)
            .values()
            .filter_map(|e| e.record.version.clone())
            .collect();
        for v in versions {
            tracing::info!(function = %v.key, version = %v.version, "restored");
            self.pool.activate(v);
        }
    }

    fn persist(&self, e: &Entry) {
        let r = &e.record;
        let stored = StoredFunction {
            key: r.key.clone(),
            spec: r.spec.clone(),
            state: r.state.clone(),
            deployed: r.version.as_ref().map(|v| DeployedVersion {
                version: v.version.clone(),
                image_digest: v.image_digest.clone(),
                spec: v.spec.clone(),
            }),
            created_at: r.created_at.clone(),
            updated_at: r.updated_at.clone(),
        };
        if let Err(e) = self.store.put(&stored) {
            tracing::error!(function = %r.key, error = %e, "cannot persist the function");
        }
    }

    /// Serves one request (hyper service function) on a connection admitted as `admission`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        admission: Admission,
    ) -> Result<Response<Body>, Infallible> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let result = self.route(req, admission, &request_id).await;
        Ok(result.unwrap_or_else(|e| error_response(&e, &request_id)))
    }

    /// True if `value` (an `Authorization` header) is the admin bearer token.
    fn is_admin_token(&self, value: Option<&HeaderValue>) -> bool {
        let Some(expected) = &self.token_hash else {
            return false;
        };
        let given = value
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .unwrap_or(b"");
        // Hashing first makes the comparison length-independent.
        !given.is_empty() && constant_time_eq(&hash_token(given), expected)
    }

    /// Management, event invocations, logs and metrics need the token when one is set.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        self.token_hash.is_none() || self.is_admin_token(req.headers().get(AUTHORIZATION))
    }

    async fn route(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        admission: Admission,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        let path = req.uri().path().to_string();
        if path == "/healthz" {
            return Ok(text(StatusCode::OK, "ok\n"));
        }
        let web = is_web_route(&path);
        if admission == Admission::Reserved && (web || is_invocation_route(&path)) {
            return Err(err(
                StatusCode::SERVICE_UNAVAILABLE,
                "TooManyConnections",
                crate::http_server::connection_limit_message(&self.config.connections),
            )
            .retry_after(crate::http_server::RETRY_AFTER_SECS));
        }
        if web {
            // Web routes are public, like a cloud function's HTTP trigger: the client's own
            // Authorization reaches the function. The admin token never does, even if a client
            // sends it here (it is dropped, and the request goes on unauthenticated).
            if self.is_admin_token(req.headers().get(AUTHORIZATION)) {
                req.headers_mut().remove(AUTHORIZATION);
            }
        } else if !self.authorized(&req) {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "this API needs a bearer token: Authorization: Bearer <token> (fnvm: --api-token or FNVM_API_TOKEN)",
            ));
        }
        if path == "/metrics" {
            require(&req, &[Method::GET])?;
            let mut r = text(StatusCode::OK, self.metrics.render());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            return Ok(r);
        }
        let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let not_found = || {
            err(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no such route: {path}"),
            )
        };
        if segs.len() < 4 || segs[0] != "v1" || segs[1] != "namespaces" || segs[3] != "functions" {
            return Err(not_found());
        }
        let ns = segs[2].to_string();
        if segs.len() == 4 {
            require(&req, &[Method::GET])?;
            return Ok(self.list(&ns));
        }
        let key = FunctionKey::new(ns, segs[4]);
        match segs.get(5).copied() {
            None => match *req.method() {
                Method::GET => self.get(&key),
                Method::PUT => self.put(key, req).await,
                Method::DELETE => self.delete(&key),
                _ => Err(method_not_allowed(&[
                    Method::GET,
                    Method::PUT,
                    Method::DELETE,
                ])),
            },
            Some("invocations") if segs.len() == 6 => {
                require(&req, &[Method::POST])?;
                self.invoke_event(&key, req, request_id).await
            }
            Some("logs") if segs.len() == 6 => {
                require(&req, &[Method::GET])?;
                self.logs(&key, &req)
            }
            Some("web") => {
                let prefix = format!(
                    "/v1/namespaces/{}/functions/{}/web",
                    key.namespace, key.name
                );
                let rest = path.strip_prefix(&prefix).unwrap_or("");
                self.invoke_web(&key, req, rest, request_id).await
            }
            _ => Err(not_found()),
        }
    }

    fn unknown(key: &FunctionKey) -> ApiError {
        err(
            StatusCode::NOT_FOUND,
            "FunctionNotFound",
            format!(
                "no function {key}: deploy it first (fnvm deploy {})",
                key.name
            ),
        )
    }

    fn list(&self, ns: &str) -> Response<Body> {
        let functions: Vec<_> = lock(&self.functions)
            .values()
            .filter(|e| e.record.key.namespace == ns)
            .map(|e| self.view(&e.record))
            .collect();
        json_response(StatusCode::OK, &json!({ "functions": functions }))
    }

    fn get(&self, key: &FunctionKey) -> Result<Response<Body>, ApiError> {
        let functions = lock(&self.functions);
        let e = functions.get(key).ok_or_else(|| Self::unknown(key))?;
        Ok(json_response(StatusCode::OK, &self.view(&e.record)))
    }

    /// What the API shows of a function (never credentials: the record has none).
    fn view(&self, r: &FunctionRecord) -> serde_json::Value {
        let mut v = json!({
            "namespace": r.key.namespace,
            "name": r.key.name,
            "spec": r.spec,
            "created_at": r.created_at,
            "updated_at": r.updated_at,
        });
        let state = serde_json::to_value(&r.state).expect("state serializes");
        if let serde_json::Value::Object(m) = state {
            for (k, val) in m {
                v[k] = val;
            }
        }
        if let Some(ver) = &r.version {
            v["version"] = json!(ver.version);
            v["image_digest"] = json!(ver.image_digest);
            v["instances"] = serde_json::to_value(self.pool.instances(&r.key)).unwrap_or_default();
        }
        v
    }

    async fn put(
        self: &Arc<Self>,
        key: FunctionKey,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let access = self.pull_access(&req)?;
        let body = read_body(req.into_body(), MAX_SPEC_BYTES, "function spec").await?;
        let raw: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                "InvalidJson",
                format!("the request body is not valid JSON: {e}"),
            )
        })?;
        let invalid = |e: SpecError| err(StatusCode::BAD_REQUEST, "InvalidSpec", e.to_string());
        spec_check::check_raw_numbers(&raw).map_err(invalid)?;
        let spec: FunctionSpec = serde_json::from_value(raw).map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                "InvalidSpec",
                format!("invalid function spec: {e}"),
            )
        })?;
        spec_check::check_spec(&key, &spec).map_err(invalid)?;

        let now = now_rfc3339();
        let (seq, view) = {
            let mut functions = lock(&self.functions);
            let entry = functions.entry(key.clone()).or_insert_with(|| Entry {
                record: FunctionRecord {
                    key: key.clone(),
                    spec: spec.clone(),
                    state: FunctionState::Pending,
                    version: None,
                    created_at: now.clone(),
                    updated_at: now.clone(),
                },
                deploy_seq: 0,
            });
            entry.deploy_seq += 1;
            entry.record.spec = spec.clone();
            entry.record.state = FunctionState::Pending;
            entry.record.updated_at = now;
            self.persist(entry);
            (entry.deploy_seq, self.view(&entry.record))
        };
        tracing::info!(function = %key, image = %spec.image, "deploy started");
        let svc = Arc::clone(self);
        tokio::spawn(async move { svc.run_deploy(key, spec, access, seq).await });
        Ok(json_response(StatusCode::ACCEPTED, &view))
    }

    /// The registry access of a deploy: its headers plus the service's own settings.
    fn pull_access(&self, req: &Request<Incoming>) -> Result<PullAccess, ApiError> {
        let bad = |m: &str| err(StatusCode::BAD_REQUEST, "InvalidCredentials", m.to_string());
        let mut access = PullAccess {
            credentials: None,
            insecure_registries: self.config.insecure_registries.clone(),
            ca_file: self.config.registry_ca.clone(),
        };
        if let Some(v) = req.headers().get(REGISTRY_AUTH_HEADER) {
            let raw = v
                .as_bytes()
                .strip_prefix(b"Basic ")
                .ok_or_else(|| bad("X-Fnvm-Registry-Auth must be `Basic base64(user:password)`"))?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(raw)
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| bad("X-Fnvm-Registry-Auth is not valid base64 of UTF-8"))?;
            let (user, password) = decoded
                .split_once(':')
                .ok_or_else(|| bad("X-Fnvm-Registry-Auth must encode user:password"))?;
            access.credentials = Some(fnvm_rootfs_builder::credentials::Credentials::new(
                user, password,
            ));
        }
        for v in req.headers().get_all(INSECURE_REGISTRY_HEADER) {
            let s = v
                .to_str()
                .map_err(|_| bad("X-Fnvm-Insecure-Registry is not text"))?;
            access.insecure_registries.extend(
                s.split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(String::from),
            );
        }
        if let Some(v) = req.headers().get(REGISTRY_CA_HEADER) {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(v.as_bytes())
                .map_err(|_| bad("X-Fnvm-Registry-Ca is not valid base64"))?;
            // A CA is public data; it goes to a file because the registry client reads one.
            let dir = self
                .home
                .dir("service/ca")
                .map_err(|e| internal(format!("{e:#}")))?;
            let path = dir.join(format!("{}.pem", hex::encode(&Sha256::digest(&pem)[..8])));
            write_atomically(&path, &pem).map_err(|e| internal(format!("{e}")))?;
            access.ca_file = Some(path);
        }
        Ok(access)
    }

    async fn run_deploy(
        self: Arc<Self>,
        key: FunctionKey,
        spec: FunctionSpec,
        access: PullAccess,
        seq: u64,
    ) {
        let home = self.home.root().to_path_buf();
        let (k, s) = (key.clone(), spec.clone());
        let result =
            tokio::task::spawn_blocking(move || deploy::pull_version(&home, &k, &s, &access))
                .await
                .unwrap_or_else(|e| Err(format!("the deploy task failed: {e}")));
        let activated = {
            let mut functions = lock(&self.functions);
            let Some(entry) = functions.get_mut(&key).filter(|e| e.deploy_seq == seq) else {
                tracing::info!(function = %key, "a newer deploy or a delete superseded this one");
                return;
            };
            entry.record.updated_at = now_rfc3339();
            let activated = match result {
                Ok(version) => {
                    let version = Arc::new(version);
                    entry.record.state = FunctionState::Active;
                    entry.record.version = Some(Arc::clone(&version));
                    tracing::info!(function = %key, version = %version.version, "deploy active");
                    Some(version)
                }
                Err(reason) => {
                    tracing::warn!(function = %key, %reason, "deploy failed");
                    entry.record.state = FunctionState::Failed { reason };
                    None
                }
            };
            self.persist(entry);
            activated
        };
        if let Some(version) = activated {
            if let Some(hook) = lock(&self.on_schedules).as_ref() {
                hook(&key, &version.spec.schedules);
            }
            self.pool.activate(version);
        }
    }

    fn delete(&self, key: &FunctionKey) -> Result<Response<Body>, ApiError> {
        let removed = lock(&self.functions).remove(key);
        if removed.is_none() {
            return Err(Self::unknown(key));
        }
        if let Err(e) = self.store.delete(key) {
            tracing::error!(function = %key, error = %e, "cannot delete the function's record");
        }
        if let Some(hook) = lock(&self.on_schedules).as_ref() {
            hook(key, &[]);
        }
        self.pool.remove(key);
        self.logs.remove(key);
        tracing::info!(function = %key, "deleted");
        Ok(json_response(
            StatusCode::OK,
            &json!({ "deleted": key.to_string() }),
        ))
    }

    /// Fails unless the function exists and has an active version.
    fn check_invocable(&self, key: &FunctionKey, web: bool) -> Result<(), ApiError> {
        let functions = lock(&self.functions);
        let e = functions.get(key).ok_or_else(|| Self::unknown(key))?;
        let Some(v) = &e.record.version else {
            let why = match &e.record.state {
                FunctionState::Failed { reason } => format!("its deploy failed: {reason}"),
                _ => "its image is still being pulled (state pending)".to_string(),
            };
            return Err(err(
                StatusCode::CONFLICT,
                "FunctionNotActive",
                format!("function {key} cannot be invoked yet: {why}"),
            ));
        };
        let is_web = v.spec.r#type == super::model::FunctionType::Web;
        if web != is_web {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "WrongFunctionType",
                if web {
                    format!(
                        "function {key} is an event function: POST to .../functions/{}/invocations",
                        key.name
                    )
                } else {
                    format!(
                        "function {key} is a web function: call .../functions/{}/web/PATH",
                        key.name
                    )
                },
            ));
        }
        Ok(())
    }

    async fn invoke_event(
        &self,
        key: &FunctionKey,
        req: Request<Incoming>,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        self.check_invocable(key, false)?;
        let body = read_body(req.into_body(), MAX_EVENT_BYTES, "event").await?;
        let mut resp = self
            .pool
            .invoke_event(key, request_id, body, false)
            .await
            .map_err(invoke_error)?;
        set_request_id(&mut resp, request_id);
        Ok(resp)
    }

    async fn invoke_web(
        &self,
        key: &FunctionKey,
        mut req: Request<Incoming>,
        rest: &str,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        self.check_invocable(key, true)?;
        let path = if rest.is_empty() { "/" } else { rest };
        let uri = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        *req.uri_mut() = uri.parse().map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                "InvalidPath",
                format!("{uri:?}: {e}"),
            )
        })?;
        let mut resp = self
            .pool
            .invoke_web(key, request_id, req)
            .await
            .map_err(invoke_error)?;
        set_request_id(&mut resp, request_id);
        Ok(resp)
    }

    /// `GET …/logs`: streamed from a [`LogCursor`] batch by batch, so a reader costs a batch
    /// of memory whatever the log's size. Plain reads answer `{"logs": [...]}`; `follow` answers
    /// newline-delimited JSON, the stored lines first, then new ones as they are stored.
    fn logs(&self, key: &FunctionKey, req: &Request<Incoming>) -> Result<Response<Body>, ApiError> {
        if !lock(&self.functions).contains_key(key) {
            return Err(Self::unknown(key));
        }
        let mut query = LogQuery::default();
        let mut follow = false;
        let bad = |m: String| err(StatusCode::BAD_REQUEST, "InvalidArgument", m);
        let number = |name: &str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| bad(format!("{name}: {v:?} is not a number")))
        };
        for (k, v) in query_pairs(req.uri().query().unwrap_or("")) {
            match k.as_str() {
                "request_id" => query.request_id = Some(v),
                "tail" => query.tail = Some(number("tail", &v)?),
                "limit" => query.limit = Some(number("limit", &v)?),
                "since" => query.since_ms = Some(parse_since(&v).map_err(bad)?),
                "follow" => follow = matches!(v.as_str(), "" | "1" | "true"),
                other => {
                    return Err(bad(format!(
                        "unknown query parameter {other:?} (request_id, tail, limit, since, follow)"
                    )))
                }
            }
        }
        let cursor = self.logs.cursor(key, query);
        let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(LOG_CHUNKS_IN_FLIGHT);
        tokio::spawn(stream_logs(cursor, follow, tx));
        let mut r = Response::new(BodyExt::boxed(ChannelBody(body_rx)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(if follow {
                "application/x-ndjson"
            } else {
                "application/json"
            }),
        );
        Ok(r)
    }
}

/// Lines per chunk of a log response.
const LOG_CHUNK_LINES: usize = 256;
/// Chunks a log response may have ready before the client reads them (backpressure).
const LOG_CHUNKS_IN_FLIGHT: usize = 2;

/// `since=`: RFC 3339 (`2026-12-01T22:00:00Z`) or milliseconds since the Unix epoch.
fn parse_since(v: &str) -> Result<u64, String> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(v).map_err(|e| {
        format!("since: {v:?} is neither an RFC 3339 time nor milliseconds since the epoch: {e}")
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64))
}

/// Writes the cursor's lines into `tx` in chunks until the end (or, following, until the
/// client leaves or the function is removed).
async fn stream_logs(mut cursor: LogCursor, follow: bool, tx: tokio::sync::mpsc::Sender<Bytes>) {
    let mut first = true;
    let mut missed = 0;
    if !follow
        && tx
            .send(Bytes::from_static(b"{\"logs\": [\n"))
            .await
            .is_err()
    {
        return;
    }
    loop {
        let batch = cursor.next_batch(LOG_CHUNK_LINES);
        let mut chunk = Vec::with_capacity(batch.entries.len() * 160);
        if follow && batch.missed > 0 {
            chunk.extend_from_slice(json!({"missed_lines": batch.missed}).to_string().as_bytes());
            chunk.push(b'\n');
        }
        missed += batch.missed;
        for e in &batch.entries {
            if !follow && !std::mem::take(&mut first) {
                chunk.extend_from_slice(b",\n");
            }
            serde_json::to_writer(&mut chunk, e).expect("a log entry serializes");
            if follow {
                chunk.push(b'\n');
            }
        }
        if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
            return;
        }
        if !batch.at_end {
            continue;
        }
        if !follow {
            let end = if missed > 0 {
                format!("\n], \"missed_lines\": {missed}}}\n")
            } else {
                "\n]}\n".to_string()
            };
            let _ = tx.send(Bytes::from(end)).await;
            return;
        }
        tokio::select! {
            more = cursor.wait() => if !more { return },
            _ = tx.closed() => return,
        }
    }
}

/// The sixth segment of `/v1/namespaces/{ns}/functions/{name}/{route}[/...]`, if the path has
/// that shape, and whether more follows.
fn function_route(path: &str) -> Option<(&str, bool)> {
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(7, '/').collect();
    (segs.len() >= 6 && segs[0] == "v1" && segs[1] == "namespaces" && segs[3] == "functions")
        .then(|| (segs[5], segs.len() > 6))
}

/// `/v1/namespaces/{ns}/functions/{name}/web[/...]`: a web function's public routes.
fn is_web_route(path: &str) -> bool {
    function_route(path).is_some_and(|(route, _)| route == "web")
}

/// `/v1/namespaces/{ns}/functions/{name}/invocations`.
fn is_invocation_route(path: &str) -> bool {
    function_route(path) == Some(("invocations", false))
}

/// A body fed by a channel (log follow).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn set_request_id(resp: &mut Response<Body>, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
}

fn internal(message: String) -> ApiError {
    err(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
}

fn require(req: &Request<Incoming>, allowed: &[Method]) -> Result<(), ApiError> {
    if allowed.contains(req.method()) {
        Ok(())
    } else {
        Err(method_not_allowed(allowed))
    }
}

fn method_not_allowed(allowed: &[Method]) -> ApiError {
    let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    err(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("this route takes {}", names.join(", ")),
    )
}

async fn read_body(body: Incoming, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("the {what} is larger than {limit} bytes"),
        )),
        Err(e) => Err(err(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("cannot read the {what}: {e}"),
        )),
    }
}

/// `k=v&k2=v2`, percent-decoded.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex_val(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn full(bytes: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

fn text(status: StatusCode, s: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(full(s.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("JSON values serialize");
    bytes.push(b'\n');
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError, request_id: &str) -> Response<Body> {
    let mut r = json_response(
        e.status,
        &json!({"error": {"code": e.code, "message": e.message, "request_id": request_id}}),
    );
    set_request_id(&mut r, request_id);
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_is_exact() {
        let a = hash_token(b"secret");
        assert!(constant_time_eq(&a, &hash_token(b"secret")));
        assert!(!constant_time_eq(&a, &hash_token(b"secreT")));
        assert!(!constant_time_eq(&a, &hash_token(b"")));
    }

    #[test]
    fn query_pairs_are_percent_decoded() {
        assert_eq!(
            query_pairs("request_id=a%2Db&tail=5&follow"),
            vec![
                ("request_id".into(), "a-b".into()),
                ("tail".into(), "5".into()),
                ("follow".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
