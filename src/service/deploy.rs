//! Deploys: pull an image (with the deploy request's credentials, held in memory only) and turn
//! a spec into an immutable [`FunctionVersion`]; after a restart, rebuild the deployed version
//! from the rootfs cache without contacting the registry (the pull was authorized at deploy
//! time and the service keeps no credentials).

use std::path::{Path, PathBuf};

use fnvm_rootfs_builder::credentials::Credentials;
use fnvm_rootfs_builder::pipeline::{self, HomeDirs, ImageRecord, PullOptions};
use fnvm_rootfs_builder::reference::{self, ImageReference};
use fnvm_rootfs_builder::registry::RegistryOptions;

use super::model::{version_id, FunctionKey, FunctionSpec, FunctionVersion};
use super::store::DeployedVersion;
use crate::function::{self, FunctionSettings};

/// How to reach the registry for one deploy. Lives only as long as the deploy.
#[derive(Debug, Clone, Default)]
pub struct PullAccess {
    /// `Debug` of [`Credentials`] redacts the password.
    pub credentials: Option<Credentials>,
    pub insecure_registries: Vec<String>,
    pub ca_file: Option<PathBuf>,
}

/// Why a deploy (or a restart's rebuild of a deployed version) has no version to run. The
/// message is the reason shown as `Failed { reason }`: it names the registry and repository
/// but never the credentials.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The image's config and the function's settings make no start spec.
    #[error("the function cannot be started as configured: {0}")]
    NotStartable(#[source] function::FunctionError),
    /// The spec's `image` does not parse as an image reference.
    #[error("{image:?} is not an image reference: {source}")]
    BadReference {
        image: String,
        source: fnvm_rootfs_builder::reference::ReferenceError,
    },
    /// Credentials came with an image that is not pulled from a registry.
    #[error("registry credentials only apply to registry images, not {image}")]
    CredentialsWithoutRegistry { image: String },
    /// The pull failed; `reason` is its whole error chain.
    #[error("cannot pull {image}: {reason}")]
    Pull { image: String, reason: String },
    /// The store holds a digest that is not `sha256:<64 hex digits>`.
    #[error("stored image digest {digest:?} is malformed")]
    MalformedDigest { digest: String },
    /// The deployed version's image record is gone from the rootfs cache.
    #[error(
        "the rootfs of {digest} is no longer cached ({}: {source}); deploy the function again",
        path.display()
    )]
    NotCached {
        digest: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The cached image record does not parse.
    #[error("{}: not a valid image record: {source}", path.display())]
    BadRecord {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The cached rootfs image is gone while its record stayed.
    #[error("{} is missing; deploy the function again", path.display())]
    MissingRootfs { path: PathBuf },
    /// The blocking task running the pull ended without a result (it panicked or was cancelled).
    #[error("the deploy task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The function's settings as the guest sees them.
pub fn settings_of(key: &FunctionKey, spec: &FunctionSpec) -> FunctionSettings {
    let mut s = FunctionSettings::local(key.name.clone());
    s.namespace = key.namespace.clone();
    s.memory_mib = spec.memory_mb;
    s.timeout_s = spec.timeout_s;
    s.command = spec.command.clone();
    s.args = spec.args.clone();
    s.env = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // A spec is checked before it is stored; one that fails here anyway gets no network.
    s.network = spec
        .network_policy()
        .unwrap_or_else(|_| crate::network::NetworkPolicy::none());
    s
}

fn version_of(
    key: &FunctionKey,
    spec: &FunctionSpec,
    image: &ImageRecord,
    rootfs_image: PathBuf,
) -> Result<FunctionVersion, DeployError> {
    let settings = settings_of(key, spec);
    let start =
        function::start_spec(&image.config, &settings).map_err(DeployError::NotStartable)?;
    let image_digest = image.manifest_digest.to_string();
    Ok(FunctionVersion {
        key: key.clone(),
        version: version_id(&image_digest, spec),
        spec: spec.clone(),
        image_digest,
        rootfs_image,
        settings,
        start,
    })
}

/// Pulls the image (blocking; run it off the async threads) and builds the version. The error
/// is the reason shown as `Failed { reason }`: the whole error chain, which names the registry
/// and repository but never the credentials.
pub fn pull_version(
    home: &Path,
    key: &FunctionKey,
    spec: &FunctionSpec,
    access: &PullAccess,
) -> Result<FunctionVersion, DeployError> {
    let reference = reference::parse(&spec.image).map_err(|source| DeployError::BadReference {
        image: spec.image.clone(),
        source,
    })?;
    let mut options = PullOptions::default();
    if let ImageReference::Registry(_) = &reference {
        options.registry = RegistryOptions {
            credentials: access.credentials.clone(),
            insecure_registries: access.insecure_registries.clone(),
            ca_file: access.ca_file.clone(),
            ..RegistryOptions::default()
        };
    } else if access.credentials.is_some() {
        return Err(DeployError::CredentialsWithoutRegistry {
            image: spec.image.clone(),
        });
    }
    let pulled = pipeline::pull(&reference, &HomeDirs::under(home), &options, &mut |_| {})
        .map_err(|e| DeployError::Pull {
            image: spec.image.clone(),
            reason: error_chain(&e),
        })?;
    tracing::info!(function = %key, digest = %pulled.image.manifest_digest, cache_hit = pulled.cache_hit, "image ready");
    version_of(key, spec, &pulled.image, pulled.rootfs_image)
}

/// Rebuilds a deployed version from the rootfs cache (`<home>/rootfs/<hex>/`), for a restart.
pub fn cached_version(
    home: &Path,
    key: &FunctionKey,
    deployed: &DeployedVersion,
) -> Result<FunctionVersion, DeployError> {
    let hex = deployed
        .image_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| DeployError::MalformedDigest {
            digest: deployed.image_digest.clone(),
        })?;
    let dir = HomeDirs::under(home).rootfs.join(hex);
    let record_path = dir.join("image.json");
    let bytes = std::fs::read(&record_path).map_err(|source| DeployError::NotCached {
        digest: deployed.image_digest.clone(),
        path: record_path.clone(),
        source,
    })?;
    let record: ImageRecord =
        serde_json::from_slice(&bytes).map_err(|source| DeployError::BadRecord {
            path: record_path.clone(),
            source,
        })?;
    let rootfs = dir.join("rootfs.img");
    if !rootfs.is_file() {
        return Err(DeployError::MissingRootfs { path: rootfs });
    }
    version_of(key, &deployed.spec, &record, rootfs)
}

/// `outer: inner: innermost`, for reasons users read.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}
