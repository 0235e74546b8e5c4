//! The function table's routes: list, get, create or update (a background deploy: Pending →
//! Active | Failed, with the request's registry access) and delete.

use std::sync::Arc;

use base64::Engine as _;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::reply::{err, internal, json_response, read_body, ApiError};
use super::{
    lock, Body, Entry, Service, INSECURE_REGISTRY_HEADER, MAX_SPEC_BYTES, REGISTRY_AUTH_HEADER,
    REGISTRY_CA_HEADER,
};
use crate::service::deploy::{self, PullAccess};
use crate::service::model::{
    now_rfc3339, FunctionKey, FunctionRecord, FunctionSpec, FunctionState,
};
use crate::service::spec_check::{self, SpecError};

impl Service {
    pub(super) fn list(&self, ns: &str) -> Response<Body> {
        let functions: Vec<_> = lock(&self.functions)
            .values()
            .filter(|e| e.record.key.namespace == ns)
            .map(|e| self.view(&e.record))
            .collect();
        json_response(StatusCode::OK, &json!({ "functions": functions }))
    }

    pub(super) fn get(&self, key: &FunctionKey) -> Result<Response<Body>, ApiError> {
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

    pub(super) async fn put(
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
                .unwrap_or_else(|e| Err(e.into()));
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
                Err(e) => {
                    let reason = e.to_string();
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

    pub(super) fn delete(&self, key: &FunctionKey) -> Result<Response<Body>, ApiError> {
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
}

fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
