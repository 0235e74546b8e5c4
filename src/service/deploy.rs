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
    s
}

fn version_of(
    key: &FunctionKey,
    spec: &FunctionSpec,
    image: &ImageRecord,
    rootfs_image: PathBuf,
) -> Result<FunctionVersion, String> {
    let settings = settings_of(key, spec);
    let start = function::start_spec(&image.config, &settings)
        .map_err(|e| format!("the function cannot be started as configured: {e}"))?;
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
) -> Result<FunctionVersion, String> {
    let reference = reference::parse(&spec.image)
        .map_err(|e| format!("{:?} is not an image reference: {e}", spec.image))?;
    let mut options = PullOptions::default();
    if let ImageReference::Registry(_) = &reference {
        options.registry = RegistryOptions {
            credentials: access.credentials.clone(),
            insecure_registries: access.insecure_registries.clone(),
            ca_file: access.ca_file.clone(),
            ..RegistryOptions::default()
        };
    } else if access.credentials.is_some() {
        return Err(format!(
            "registry credentials only apply to registry images, not {}",
            spec.image
        ));
    }
    let pulled = pipeline::pull(&reference, &HomeDirs::under(home), &options, &mut |_| {})
        .map_err(|e| format!("cannot pull {}: {}", spec.image, error_chain(&e)))?;
    tracing::info!(function = %key, digest = %pulled.image.manifest_digest, cache_hit = pulled.cache_hit, "image ready");
    version_of(key, spec, &pulled.image, pulled.rootfs_image)
}

/// Rebuilds a deployed version from the rootfs cache (`<home>/rootfs/<hex>/`), for a restart.
pub fn cached_version(
    home: &Path,
    key: &FunctionKey,
    deployed: &DeployedVersion,
) -> Result<FunctionVersion, String> {
    let hex = deployed
        .image_digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| {
            format!(
                "stored image digest {:?} is malformed",
                deployed.image_digest
            )
        })?;
    let dir = HomeDirs::under(home).rootfs.join(hex);
    let record_path = dir.join("image.json");
    let bytes = std::fs::read(&record_path).map_err(|e| {
        format!(
            "the rootfs of {} is no longer cached ({}: {e}); deploy the function again",
            deployed.image_digest,
            record_path.display()
        )
    })?;
    let record: ImageRecord = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{}: not a valid image record: {e}", record_path.display()))?;
    let rootfs = dir.join("rootfs.img");
    if !rootfs.is_file() {
        return Err(format!(
            "{} is missing; deploy the function again",
            rootfs.display()
        ));
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
