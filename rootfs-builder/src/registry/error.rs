//! What can go wrong talking to a registry, each variant with the registry, repository or URL
//! it concerns.

use std::path::PathBuf;
use std::time::Duration;

use super::deadlines::{BadDeadline, DeadlineKind};
use crate::digest::Digest;
use crate::manifest::MAX_MANIFEST_BYTES;

/// Why a registry request failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The `--registry-ca` file cannot be read or holds no certificate.
    #[error("cannot read registry CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    /// The registry refused our credentials (or asked for some we do not have).
    #[error("authentication failed for registry {registry}, repository {repository}: {detail}")]
    Unauthorized {
        registry: String,
        repository: String,
        detail: String,
    },
    /// The credentials were accepted but give no access to this repository.
    #[error("registry {registry} denied access to repository {repository} (HTTP 403)")]
    Denied {
        registry: String,
        repository: String,
    },
    /// The manifest or blob is not in the repository.
    #[error("registry {registry}: {what} not found in repository {repository}")]
    NotFound {
        registry: String,
        repository: String,
        what: String,
    },
    /// The request did not get an answer (connection, TLS or protocol failure).
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: ureq::Error,
    },
    /// The registry answered with an unexpected HTTP status.
    #[error("{url}: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// TLS was refused by a registry that speaks plain HTTP.
    #[error(
        "TLS handshake with registry {registry} failed: it seems to speak plain HTTP; \
         pass --insecure-registry {registry} if plain HTTP is intended"
    )]
    PlainHttpServer {
        registry: String,
        #[source]
        source: ureq::Error,
    },
    /// The host answers HTTP but is no OCI distribution registry.
    #[error("{registry} does not look like an OCI registry: GET /v2/ answered HTTP {status}")]
    NotARegistry { registry: String, status: u16 },
    /// A plain HTTP URL for a host not listed as insecure.
    #[error(
        "refusing plain HTTP to {url}: only hosts given with --insecure-registry may use HTTP"
    )]
    InsecureRefused { url: String },
    /// A deadline of the pull ran out.
    #[error(
        "registry {registry} did not answer in time: the {kind} deadline of {} s ran out \
         ({url}, {attempts} attempt(s)); set {} to change it",
        .limit.as_secs(), .kind.env()
    )]
    Deadline {
        registry: String,
        url: String,
        kind: DeadlineKind,
        limit: Duration,
        attempts: u32,
    },
    /// A deadline from the environment is not a number of seconds.
    #[error(transparent)]
    BadDeadline(#[from] BadDeadline),
    /// A redirect without a usable `Location`, or too many of them.
    #[error("{url}: bad redirect: {reason}")]
    BadRedirect { url: String, reason: String },
    /// The token endpoint refused us or answered nonsense.
    #[error("registry {registry}: token endpoint {realm}: {reason}")]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
    /// A manifest larger than any real one.
    #[error("manifest {what} from {registry} is larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge { registry: String, what: String },
    /// The manifest's bytes do not hash to the digest asked for.
    #[error("manifest from {registry} hashes to {actual}, not the requested {expected}")]
    ManifestDigestMismatch {
        registry: String,
        expected: Digest,
        actual: Digest,
    },
    /// A blob larger than its descriptor says.
    #[error(
        "blob {digest} from {registry} is larger than its declared {size} bytes; download cut off"
    )]
    BlobTooLarge {
        registry: String,
        digest: Digest,
        size: u64,
    },
    /// A blob answer that breaks the protocol (a bad `Content-Range`, say).
    #[error("blob {digest}: {reason}")]
    BlobProtocol { digest: Digest, reason: String },
    /// A blob download that kept failing until the attempts ran out.
    #[error("blob {digest} from {registry}: download failed after {attempts} attempts at byte {offset} of {size}: {last}")]
    BlobIncomplete {
        registry: String,
        digest: Digest,
        attempts: u32,
        offset: u64,
        size: u64,
        last: String,
    },
    /// The store could not take the blob's bytes.
    #[error("blob {digest}: writing to the store failed")]
    Sink {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    /// True when the registry refused who we are (wrong, missing or insufficient credentials).
    pub fn is_auth(&self) -> bool {
        matches!(self, Self::Unauthorized { .. } | Self::Denied { .. })
    }
}
