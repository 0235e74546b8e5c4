//! The HTTP API of `fnvm serve` (design "HTTP API"): routes, the bearer token, JSON errors, the
//! function table with its persistent store, and background deploys (Pending → Active | Failed).
//!
//! Every error is `{"error":{"code","message","request_id"}}` with a fitting status. Registry
//! credentials arrive in request headers of a PUT (`X-Fnvm-Registry-Auth: Basic ...`), are
//! handed to the pull and dropped with it: never logged, stored or returned.
//!
//! The parts: [`functions`] (the function table's routes and deploys), [`invocations`] (handing
//! invocations to the pool), [`logs`] (reading and following a function's lines), [`reply`]
//! (the error and body shapes every route answers with).

mod functions;
mod invocations;
mod logs;
mod reply;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use sha2::{Digest as _, Sha256};

use self::reply::{err, error_response, method_not_allowed, require, text, ApiError};
use super::deploy;
use super::logs::LogStore;
use super::metrics::Metrics;
use super::model::{FunctionKey, FunctionRecord, FunctionState};
use super::pool::Pool;
use super::store::{DeployedVersion, Store, StoreError, StoredFunction};
use crate::home::Home;
use crate::http_server::Admission;

/// The response body shared with the pool.
pub use crate::invoke::Body;

/// Header carrying the deploy's registry credentials (`Basic base64(user:password)`).
pub const REGISTRY_AUTH_HEADER: &str = "x-fnvm-registry-auth";
/// Header naming registries the deploy may reach over plain HTTP (comma-separated).
pub const INSECURE_REGISTRY_HEADER: &str = "x-fnvm-insecure-registry";
/// Header carrying a PEM CA bundle for the registry, base64-encoded.
pub const REGISTRY_CA_HEADER: &str = "x-fnvm-registry-ca";

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
    ) -> Result<Arc<Self>, StoreError> {
        // A StoreError names the store's path and what failed there.
        let store = Store::open(home.root())?;
        let stored = store.load_all()?;
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
                    Err(e) => {
                        let reason = e.to_string();
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
        let request_id = crate::invoke::new_request_id();
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
}
