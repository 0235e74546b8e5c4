//! Manifests, indexes and configs (OCI v1 and Docker schema2), platform selection and the
//! image size limit.
//!
//! Docker's manifest list and schema2 manifest have the same shape as the OCI index and
//! manifest, so both are read through oci-spec's types; only the media types differ.
//! Everything here is hostile input: sizes are added with overflow checks and nothing
//! panics on a strange document.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use crate::digest::{Digest, DigestError};
use crate::source::RawManifest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1";

/// The `Accept` header for manifest requests: every kind we can read.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
     application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json, \
     application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; anything bigger is refused before parsing (distribution uses 4 MiB).
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Image configs are read whole into memory, so they get their own cap.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// Images must be smaller than this (compressed layers + config), per the platform limits.
pub const MAX_IMAGE_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest is not valid JSON of the kind its media type says.
    #[error("manifest {digest} ({media_type}) is not valid JSON of its kind: {reason}")]
    Malformed {
        digest: Digest,
        media_type: String,
        reason: String,
    },
    /// The manifest is a deprecated Docker schema1 manifest, which fnvm does not support.
    #[error(
        "manifest {digest} is a Docker schema1 manifest; these are deprecated and not supported \
         (re-push the image with a current docker/buildah/skopeo)"
    )]
    Schema1 { digest: Digest },
    /// The manifest has a media type fnvm does not support.
    #[error("manifest {digest} has unsupported media type {media_type:?}")]
    UnsupportedMediaType { digest: Digest, media_type: String },
    /// The manifest refers to a blob or manifest by a digest that is not valid.
    #[error("manifest {digest}: bad descriptor digest {value:?}")]
    BadDescriptorDigest {
        digest: Digest,
        value: String,
        #[source]
        source: DigestError,
    },
    /// The image has no linux/amd64 variant, the only platform fnvm runs.
    #[error("{}", no_amd64_message(.platforms))]
    NoAmd64 { platforms: Vec<String> },
    /// The image config says the image is for a platform other than linux/amd64.
    #[error(
        "image config says {os}/{architecture}{}; fnvm runs x86-64 (linux/amd64) images",
        .variant.as_deref().map(|v| format!("/{v}")).unwrap_or_default()
    )]
    WrongConfigPlatform {
        os: String,
        architecture: String,
        variant: Option<String>,
    },
    /// The image's layers and config together are larger than the 1 GiB limit.
    #[error(
        "image is too large: its layers and config declare {total} bytes ({:.1} MiB); images \
         must be smaller than {limit} bytes (1 GiB)",
        *.total as f64 / 1048576.0
    )]
    TooLarge { total: u64, limit: u64 },
    /// The image config is too large or is not valid JSON.
    #[error("image config {digest} is not valid JSON: {reason}")]
    BadConfig { digest: Digest, reason: String },
}

fn no_amd64_message(platforms: &[String]) -> String {
    match platforms {
        [] => "image index lists no platforms; fnvm runs x86-64 (linux/amd64) images".to_owned(),
        [one] => format!("image is {one} only; fnvm runs x86-64 (linux/amd64) images"),
        many => format!(
            "image has no linux/amd64 variant (it has {}); fnvm runs x86-64 (linux/amd64) images",
            many.join(", ")
        ),
    }
}

/// A manifest document of either kind.
#[derive(Debug, Clone)]
pub enum Parsed {
    Index(Box<ImageIndex>),
    Image(Box<ImageManifest>),
}

/// What a descriptor says about a blob, with the digest already validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
}

/// Parses a manifest or index by its declared media type, sniffing the JSON when the
/// source gave none (or a generic one).
pub fn parse(raw: &RawManifest) -> Result<Parsed, ManifestError> {
    let declared = raw
        .media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_owned();
    let media_type = match declared.as_str() {
        OCI_INDEX | OCI_MANIFEST | DOCKER_LIST | DOCKER_MANIFEST => declared,
        t if t.starts_with(DOCKER_SCHEMA1) => {
            return Err(ManifestError::Schema1 {
                digest: raw.digest.clone(),
            })
        }
        "" | "application/json" | "application/octet-stream" | "text/plain" => sniff(raw)?,
        other => {
            return Err(ManifestError::UnsupportedMediaType {
                digest: raw.digest.clone(),
                media_type: other.to_owned(),
            })
        }
    };
    let malformed = |e: serde_json::Error| ManifestError::Malformed {
        digest: raw.digest.clone(),
        media_type: media_type.clone(),
        reason: e.to_string(),
    };
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => Ok(Parsed::Index(Box::new(
            serde_json::from_slice(&raw.bytes).map_err(malformed)?,
        ))),
        _ => Ok(Parsed::Image(Box::new(
            serde_json::from_slice(&raw.bytes).map_err(malformed)?,
        ))),
    }
}

fn sniff(raw: &RawManifest) -> Result<String, ManifestError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        media_type: Option<String>,
        schema_version: Option<i64>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let probe: Probe =
        serde_json::from_slice(&raw.bytes).map_err(|e| ManifestError::Malformed {
            digest: raw.digest.clone(),
            media_type: raw.media_type.clone(),
            reason: e.to_string(),
        })?;
    if probe.schema_version == Some(1) {
        return Err(ManifestError::Schema1 {
            digest: raw.digest.clone(),
        });
    }
    match (probe.media_type.as_deref(), &probe.manifests, &probe.layers) {
        (Some(t @ (OCI_INDEX | OCI_MANIFEST | DOCKER_LIST | DOCKER_MANIFEST)), _, _) => {
            Ok(t.to_owned())
        }
        (None, Some(_), None) => Ok(OCI_INDEX.to_owned()),
        (None, None, Some(_)) => Ok(OCI_MANIFEST.to_owned()),
        (t, _, _) => Err(ManifestError::UnsupportedMediaType {
            digest: raw.digest.clone(),
            media_type: t.unwrap_or("(none)").to_owned(),
        }),
    }
}

/// True for media types that name an index rather than an image manifest.
pub fn is_index_media_type(t: &str) -> bool {
    matches!(t, OCI_INDEX | DOCKER_LIST)
}

/// Converts a descriptor into a validated [`BlobRef`].
pub fn blob_ref(owner: &Digest, d: &Descriptor) -> Result<BlobRef, ManifestError> {
    let value = d.digest().to_string();
    let digest = value
        .parse::<Digest>()
        .map_err(|source| ManifestError::BadDescriptorDigest {
            digest: owner.clone(),
            value: value.clone(),
            source,
        })?;
    Ok(BlobRef {
        digest,
        size: d.size(),
        media_type: d.media_type().to_string(),
    })
}

/// Picks the linux/amd64 manifest from an index. Variant-less entries are preferred, then
/// v1..v4 in that order: a lower microarchitecture level runs on more guest CPUs.
/// Entries without a platform (attestations, artifacts) are skipped.
pub fn select_amd64(owner: &Digest, index: &ImageIndex) -> Result<BlobRef, ManifestError> {
    let mut best: Option<(u8, &Descriptor)> = None;
    let mut platforms = Vec::new();
    for d in index.manifests() {
        let Some(p) = d.platform() else { continue };
        let os = p.os().to_string();
        let arch = p.architecture().to_string();
        if os == "unknown" || arch == "unknown" {
            continue;
        }
        let variant = p.variant().as_deref();
        let name = match variant {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        };
        if !platforms.contains(&name) {
            platforms.push(name);
        }
        if os != "linux" || arch != "amd64" {
            continue;
        }
        let rank = match variant {
            None => 0,
            Some("v1") => 1,
            Some("v2") => 2,
            Some("v3") => 3,
            Some("v4") => 4,
            Some(_) => continue,
        };
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, d));
        }
    }
    match best {
        Some((_, d)) => blob_ref(owner, d),
        None => Err(ManifestError::NoAmd64 { platforms }),
    }
}

/// The config and layers of an image manifest, validated, with the size limit applied
/// from the declared sizes before anything is downloaded.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ImageBlobs {
    pub config: BlobRef,
    pub layers: Vec<BlobRef>,
    /// Declared bytes of config plus layers.
    pub total_size: u64,
}

pub fn image_blobs(owner: &Digest, m: &ImageManifest) -> Result<ImageBlobs, ManifestError> {
    let config = blob_ref(owner, m.config())?;
    let layers = m
        .layers()
        .iter()
        .map(|l| blob_ref(owner, l))
        .collect::<Result<Vec<_>, _>>()?;
    let mut total = config.size;
    for l in &layers {
        total = total.saturating_add(l.size);
    }
    if total >= MAX_IMAGE_BYTES {
        return Err(ManifestError::TooLarge {
            total,
            limit: MAX_IMAGE_BYTES,
        });
    }
    if config.size > MAX_CONFIG_BYTES {
        return Err(ManifestError::BadConfig {
            digest: config.digest.clone(),
            reason: format!(
                "config declares {} bytes; configs over {MAX_CONFIG_BYTES} bytes are refused",
                config.size
            ),
        });
    }
    Ok(ImageBlobs {
        config,
        layers,
        total_size: total,
    })
}

/// What the function's process is started with, from the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
    pub labels: std::collections::BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

/// Parses an image config and refuses anything but linux/amd64.
pub fn parse_config(digest: &Digest, bytes: &[u8]) -> Result<RunConfig, ManifestError> {
    let cfg: ImageConfiguration =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::BadConfig {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
    let os = cfg.os().to_string();
    let architecture = cfg.architecture().to_string();
    if os != "linux" || architecture != "amd64" {
        return Err(ManifestError::WrongConfigPlatform {
            os,
            architecture,
            variant: cfg.variant().clone(),
        });
    }
    let Some(c) = cfg.config() else {
        return Ok(RunConfig::default());
    };
    Ok(RunConfig {
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().filter(|w| !w.is_empty()),
        user: c.user().clone().filter(|u| !u.is_empty()),
        exposed_ports: c.exposed_ports().clone().unwrap_or_default(),
        labels: c.labels().clone().unwrap_or_default().into_iter().collect(),
        stop_signal: c.stop_signal().clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(media_type: &str, json: &str) -> RawManifest {
        RawManifest {
            media_type: media_type.to_owned(),
            bytes: json.as_bytes().to_vec(),
            digest: Digest::of(json.as_bytes()),
        }
    }

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn index(entries: &[(&str, &str, Option<&str>)]) -> String {
        let ms: Vec<String> = entries
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| {
                let v = variant
                    .map(|v| format!(r#","variant":"{v}""#))
                    .unwrap_or_default();
                format!(
                    r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":100,"platform":{{"os":"{os}","architecture":"{arch}"{v}}}}}"#,
                    d(i as u8 + 1)
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
            ms.join(",")
        )
    }

    fn select(entries: &[(&str, &str, Option<&str>)]) -> Result<BlobRef, ManifestError> {
        let r = raw(OCI_INDEX, &index(entries));
        let Parsed::Index(i) = parse(&r).unwrap() else {
            panic!("not an index")
        };
        select_amd64(&r.digest, &i)
    }

    #[test]
    fn picks_amd64_from_a_multi_platform_index() {
        let b = select(&[
            ("linux", "arm64", Some("v8")),
            ("linux", "amd64", Some("v3")),
            ("linux", "amd64", None),
            ("unknown", "unknown", None),
        ])
        .unwrap();
        assert_eq!(b.digest.to_string(), d(3));
        let b = select(&[
            ("linux", "amd64", Some("v3")),
            ("linux", "amd64", Some("v2")),
        ])
        .unwrap();
        assert_eq!(b.digest.to_string(), d(2));
        assert!(select(&[("windows", "amd64", None)]).is_err());
    }

    #[test]
    fn arm64_only_is_refused_naming_the_platforms() {
        let e = select(&[("linux", "arm64", None)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image is linux/arm64 only; fnvm runs x86-64 (linux/amd64) images"
        );
        let e = select(&[("linux", "arm64", Some("v8")), ("linux", "s390x", None)]).unwrap_err();
        assert!(e.to_string().contains("linux/arm64/v8, linux/s390x"), "{e}");
    }

    #[test]
    fn docker_media_types_and_sniffing() {
        let list = index(&[("linux", "amd64", None)]).replace(OCI_INDEX, DOCKER_LIST);
        assert!(matches!(
            parse(&raw(DOCKER_LIST, &list)).unwrap(),
            Parsed::Index(_)
        ));
        assert!(matches!(parse(&raw("", &list)).unwrap(), Parsed::Index(_)));
        let m = manifest_json(10, &[20, 30]);
        assert!(matches!(
            parse(&raw("application/json", &m)).unwrap(),
            Parsed::Image(_)
        ));
        assert!(matches!(
            parse(&raw(
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                "{}"
            )),
            Err(ManifestError::Schema1 { .. })
        ));
        assert!(matches!(
            parse(&raw(OCI_MANIFEST, "{\"layers\": 5}")),
            Err(ManifestError::Malformed { .. })
        ));
    }

    fn manifest_json(config: u64, layers: &[u64]) -> String {
        let ls: Vec<String> = layers
            .iter()
            .enumerate()
            .map(|(i, s)| {
                format!(
                    r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{}","size":{s}}}"#,
                    d(i as u8 + 10)
                )
            })
            .collect();
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{}","size":{config}}},"layers":[{}]}}"#,
            d(9),
            ls.join(",")
        )
    }

    fn blobs(config: u64, layers: &[u64]) -> Result<ImageBlobs, ManifestError> {
        let r = raw(DOCKER_MANIFEST, &manifest_json(config, layers));
        let Parsed::Image(m) = parse(&r).unwrap() else {
            panic!()
        };
        image_blobs(&r.digest, &m)
    }

    #[test]
    fn size_limit_from_declared_sizes() {
        let ok = blobs(1000, &[(1 << 30) - 2000]).unwrap();
        assert_eq!(ok.total_size, (1 << 30) - 1000);
        assert_eq!(ok.layers.len(), 1);
        let e = blobs(1000, &[(1 << 30) - 1000]).unwrap_err();
        assert!(matches!(e, ManifestError::TooLarge { .. }), "{e}");
        assert!(e.to_string().contains("1 GiB"));
        let e = blobs(1, &[u64::MAX, u64::MAX]).unwrap_err();
        assert!(matches!(e, ManifestError::TooLarge { .. }));
    }

    #[test]
    fn config_platform_and_run_config() {
        let cfg = br#"{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/bin/app"],"Cmd":["--port","9000"],"Env":["A=1"],"WorkingDir":"/srv","User":"1000","ExposedPorts":{"9000/tcp":{}}},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let rc = parse_config(&Digest::of(cfg), cfg).unwrap();
        assert_eq!(rc.entrypoint, ["/bin/app"]);
        assert_eq!(rc.cmd, ["--port", "9000"]);
        assert_eq!(rc.env, ["A=1"]);
        assert_eq!(rc.working_dir.as_deref(), Some("/srv"));
        assert_eq!(rc.user.as_deref(), Some("1000"));
        assert_eq!(rc.exposed_ports, ["9000/tcp"]);
        let arm = br#"{"architecture":"arm64","os":"linux","variant":"v8","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let e = parse_config(&Digest::of(arm), arm).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image config says linux/arm64/v8; fnvm runs x86-64 (linux/amd64) images"
        );
        assert!(matches!(
            parse_config(&Digest::of(b"[]"), b"[]"),
            Err(ManifestError::BadConfig { .. })
        ));
    }
}
