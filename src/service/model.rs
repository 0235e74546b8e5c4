//! The service's data model: what a function is (its spec, as the API accepts it), which state
//! its deploy is in, and the immutable versions that instances run.
//!
//! Registry credentials never appear here: they travel with a deploy request only, in memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::function::FunctionSettings;
use crate::network::{NetworkMode, NetworkPolicy, PolicyError};

/// A function's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FunctionKey {
    pub namespace: String,
    pub name: String,
}

impl FunctionKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub use crate::invoke::FunctionType;

fn default_memory() -> u32 {
    128
}
fn default_timeout() -> u32 {
    3
}
fn default_concurrency() -> u32 {
    1
}
fn default_max_instances() -> u32 {
    10
}

/// What `PUT /v1/namespaces/{ns}/functions/{name}` accepts. Unknown fields are refused so a
/// misspelt setting is an error, not silently ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionSpec {
    pub image: String,
    #[serde(default)]
    pub r#type: FunctionType,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
    #[serde(default = "default_timeout")]
    pub timeout_s: u32,
    #[serde(default)]
    pub provisioned_concurrency: u32,
    /// Requests one instance serves at once (web functions only; event functions take one).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// The most instances this function may have at once.
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Cron expressions: each firing is an event invocation with `X-Scf-Trigger-Src: Timer`.
    #[serde(default)]
    pub schedules: Vec<String>,
    /// `egress` (the default): outbound connections through the host; `none`: loopback only.
    #[serde(default)]
    pub network: NetworkMode,
    /// Destination ranges (CIDR or address) the function never reaches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_deny: Vec<String>,
    /// When given, the only destination ranges the function reaches (`egress_deny` still wins).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allow: Vec<String>,
}

impl FunctionSpec {
    /// The spec's network policy, checked.
    pub fn network_policy(&self) -> Result<NetworkPolicy, PolicyError> {
        NetworkPolicy::new(self.network, &self.egress_deny, &self.egress_allow)
    }
}

/// Where a function's deploy stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum FunctionState {
    /// The image is being pulled and its rootfs built.
    Pending,
    /// A version is deployed and can be invoked.
    Active,
    /// The deploy failed; `reason` says why.
    Failed { reason: String },
}

/// An immutable deployed version: what instances run. A new image or config is a new version.
#[derive(Debug, Clone)]
pub struct FunctionVersion {
    pub key: FunctionKey,
    /// Hash of image digest + command + args + env + memory (see [`version_id`]).
    pub version: String,
    pub spec: FunctionSpec,
    /// The pinned manifest digest the image resolved to.
    pub image_digest: String,
    pub rootfs_image: PathBuf,
    pub settings: FunctionSettings,
    pub start: fnvm_agent::protocol::StartSpec,
}

/// A function as the store keeps it and the API shows it.
#[derive(Debug, Clone)]
pub struct FunctionRecord {
    pub key: FunctionKey,
    pub spec: FunctionSpec,
    pub state: FunctionState,
    /// The active version (None while the first deploy is pending or after it failed).
    pub version: Option<Arc<FunctionVersion>>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// The function version id: what a snapshot belongs to (design "Words"). Everything that changes
/// what runs in the guest goes in; schedules, timeouts and scaling knobs do not.
pub fn version_id(image_digest: &str, spec: &FunctionSpec) -> String {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        // Length-prefixed so that no two different field lists hash alike.
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(image_digest.as_bytes());
    field(spec.command.as_deref().unwrap_or("\0none").as_bytes());
    field(&(spec.args.len() as u64).to_le_bytes());
    for a in &spec.args {
        field(a.as_bytes());
    }
    for (k, v) in &spec.env {
        field(k.as_bytes());
        field(v.as_bytes());
    }
    field(&spec.memory_mb.to_le_bytes());
    // A VM's snapshot has its network device or not. (Only `none` is hashed, so the versions
    // of functions deployed before networks existed keep their ids and snapshots. The egress
    // ranges are enforced on the host and change nothing in the guest.)
    if spec.network == NetworkMode::None {
        field(b"network none");
    }
    hex::encode(&h.finalize()[..8])
}

/// Now as RFC 3339 (seconds).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> FunctionSpec {
        serde_json::from_str(r#"{"image":"r/x@sha256:00"}"#).unwrap()
    }

    #[test]
    fn defaults_fill_missing_fields_and_unknown_fields_are_refused() {
        let s = spec();
        assert_eq!(s.r#type, FunctionType::Event);
        assert_eq!((s.memory_mb, s.timeout_s, s.concurrency), (128, 3, 1));
        let err = serde_json::from_str::<FunctionSpec>(r#"{"image":"x","memroy_mb":1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `memroy_mb`"), "{err}");
    }

    #[test]
    fn version_changes_with_what_runs_and_not_with_schedules() {
        let a = spec();
        let mut b = a.clone();
        b.schedules.push("* * * * * *".into());
        assert_eq!(version_id("d1", &a), version_id("d1", &b));
        assert_ne!(version_id("d1", &a), version_id("d2", &a));
        b.env.insert("K".into(), "V".into());
        assert_ne!(version_id("d1", &a), version_id("d1", &b));
    }
}
