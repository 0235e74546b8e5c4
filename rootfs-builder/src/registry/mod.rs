//! A blocking client for the OCI distribution API, scoped to one repository.
//!
//! Built on ureq 3 (rustls): small, synchronous (the pull pipeline is a sequential
//! stream-to-disk job, so an async runtime buys nothing), well maintained, and it lets us
//! switch off what would undermine verification: no transparent gzip decoding (blob bytes
//! must reach the hasher exactly as stored) and no automatic redirects (we follow them
//! ourselves so `Authorization` never leaves the registry's origin).
//!
//! Trust: every manifest and blob is hashed locally; `Docker-Content-Digest` is never used.

pub mod auth;
mod authorization;
mod blob;
pub mod deadlines;
mod error;
mod transport;

use std::io::Read;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ureq::http::Response;
use ureq::Body;

use crate::credentials::Credentials;
use crate::digest::Digest;
use crate::manifest::{MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use crate::reference::RegistryReference;
use crate::source::{BlobSink, ImageSource, ManifestRef, RawManifest};
use auth::BearerToken;
use blob::Attempt;
use deadlines::{DeadlineKind, RegistryDeadlines};
pub use error::RegistryError;
use transport::tls_config;

/// How a registry client connects and authenticates.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    pub credentials: Option<Credentials>,
    /// Hosts (`host` or `host:port`) that may be spoken to over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// A PEM file of extra CA certificates (a private registry's CA).
    pub ca_file: Option<PathBuf>,
    /// Attempts per request on 5xx, 429 and connection failures.
    pub attempts: u32,
    /// First retry delay; doubled each time.
    pub backoff: Duration,
    /// Connect, read and whole-pull deadlines (the environment may override them).
    pub deadlines: RegistryDeadlines,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            credentials: None,
            insecure_registries: Vec::new(),
            ca_file: None,
            attempts: 4,
            backoff: Duration::from_millis(200),
            deadlines: RegistryDeadlines::default(),
        }
    }
}

/// The scheme and `host:port` requests go to, e.g. `https` + `reg.example:5000`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    scheme: String,
    authority: String,
}

impl Origin {
    fn of_url(url: &str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let authority = rest.split(['/', '?', '#']).next()?;
        if authority.is_empty() || authority.contains('@') {
            return None;
        }
        Some(Self {
            scheme: scheme.to_ascii_lowercase(),
            authority: authority.to_ascii_lowercase(),
        })
    }
}

#[derive(Debug, Clone)]
enum AuthState {
    /// No challenge seen yet (or anonymous access works).
    Anonymous,
    Basic,
    Bearer {
        token: BearerToken,
        /// Where to get a fresh one when it lapses.
        realm: String,
        service: Option<String>,
    },
}

/// One registry repository, with its auth state. Cheap to share by reference.
pub struct RegistryClient {
    agent: ureq::Agent,
    base: String,
    origin: Origin,
    registry: String,
    repository: String,
    credentials: Option<Credentials>,
    insecure: Vec<String>,
    attempts: u32,
    backoff: Duration,
    deadlines: RegistryDeadlines,
    /// When the whole pull must be over (the client is made for one pull).
    pull_ends: Instant,
    auth: Mutex<AuthState>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .field("repository", &self.repository)
            .field("credentials", &self.credentials)
            .finish()
    }
}

impl RegistryClient {
    /// A client for `reference`'s repository. Plain HTTP only if the host is listed as
    /// insecure. Does no I/O; the first request discovers the auth scheme.
    pub fn new(
        reference: &RegistryReference,
        options: &RegistryOptions,
    ) -> Result<Self, RegistryError> {
        let host = reference.api_host().to_owned();
        let insecure = options
            .insecure_registries
            .iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .collect::<Vec<_>>();
        let scheme = if host_is_insecure(&insecure, &host) {
            "http"
        } else {
            "https"
        };
        let tls = tls_config(options.ca_file.as_deref())?;
        let deadlines = options.deadlines.with_env_overrides()?;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .https_only(false)
            .tls_config(tls)
            .user_agent(concat!("fnvm/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(deadlines.connect))
            .timeout_send_request(Some(deadlines.read))
            .timeout_recv_response(Some(deadlines.read))
            .timeout_per_read(Some(deadlines.read))
            .timeout_per_write(Some(deadlines.read))
            .build()
            .new_agent();
        let base = format!("{scheme}://{host}");
        Ok(Self {
            agent,
            origin: Origin::of_url(&base).expect("base URL is well formed"),
            base,
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            credentials: options.credentials.clone(),
            insecure,
            attempts: options.attempts.max(1),
            backoff: options.backoff,
            deadlines,
            pull_ends: Instant::now() + deadlines.pull,
            auth: Mutex::new(AuthState::Anonymous),
        })
    }

    /// `registry/repository`.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// `GET /v2/`: confirms this is a registry and, if it challenges, authenticates now so
    /// wrong credentials fail before anything else is attempted.
    pub fn ping(&self) -> Result<(), RegistryError> {
        let url = format!("{}/v2/", self.base);
        let resp = match self.send_authenticated("GET", &url, &[]) {
            Err(RegistryError::Transport { source, .. })
                if self.origin.scheme == "https"
                    && source.to_string().contains("InvalidContentType") =>
            {
                return Err(RegistryError::PlainHttpServer {
                    registry: self.registry.clone(),
                    source,
                })
            }
            other => other?,
        };
        let status = resp.status().as_u16();
        if status == 200 {
            Ok(())
        } else {
            Err(RegistryError::NotARegistry {
                registry: self.registry.clone(),
                status,
            })
        }
    }

    /// `HEAD` of a manifest by digest: proves the caller's credentials may read it. Used
    /// before handing out a cached rootfs, so knowing a digest is not enough to use it.
    pub fn check_manifest_access(&self, digest: &Digest) -> Result<(), RegistryError> {
        let url = format!("{}/v2/{}/manifests/{digest}", self.base, self.repository);
        let resp =
            self.send_authenticated("HEAD", &url, &[("Accept", MANIFEST_ACCEPT.to_owned())])?;
        match resp.status().as_u16() {
            200 => Ok(()),
            _ => Err(self.status_error(&url, resp, &format!("manifest {digest}"))),
        }
    }

    fn manifest_url(&self, reference: &ManifestRef) -> (String, String) {
        let what = match reference {
            ManifestRef::Tag(t) => t.clone(),
            ManifestRef::Digest(d) => d.to_string(),
        };
        (
            format!("{}/v2/{}/manifests/{what}", self.base, self.repository),
            what,
        )
    }

    /// Maps a non-success response to the error a user should see.
    fn status_error(&self, url: &str, resp: Response<Body>, what: &str) -> RegistryError {
        let status = resp.status().as_u16();
        match status {
            401 => self.unauthorized("the registry refused the request"),
            403 => RegistryError::Denied {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
            },
            404 => RegistryError::NotFound {
                registry: self.registry.clone(),
                repository: self.repository.clone(),
                what: what.to_owned(),
            },
            _ => {
                let mut body = String::new();
                let _ = resp
                    .into_body()
                    .into_with_config()
                    .limit(2048)
                    .reader()
                    .take(512)
                    .read_to_string(&mut body);
                RegistryError::Status {
                    url: url.to_owned(),
                    status,
                    body: body.trim().chars().take(300).collect(),
                }
            }
        }
    }
}

impl ImageSource for RegistryClient {
    type Error = RegistryError;

    fn describe(&self) -> String {
        self.name()
    }

    fn manifest(&self, reference: &ManifestRef) -> Result<RawManifest, RegistryError> {
        let (url, what) = self.manifest_url(reference);
        let resp = self.get_following_redirects(&url, &[("Accept", MANIFEST_ACCEPT.to_owned())])?;
        if resp.status().as_u16() != 200 {
            return Err(self.status_error(&url, resp, &format!("manifest {what}")));
        }
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = resp
            .into_body()
            .into_with_config()
            .limit(MAX_MANIFEST_BYTES)
            .read_to_vec()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => RegistryError::ManifestTooLarge {
                    registry: self.registry.clone(),
                    what: what.clone(),
                },
                source => self.transport_error(&url, source, 1),
            })?;
        let digest = Digest::of(&bytes);
        if let ManifestRef::Digest(expected) = reference {
            if *expected != digest {
                return Err(RegistryError::ManifestDigestMismatch {
                    registry: self.registry.clone(),
                    expected: expected.clone(),
                    actual: digest,
                });
            }
        }
        Ok(RawManifest {
            media_type,
            bytes,
            digest,
        })
    }

    fn blob(
        &self,
        digest: &Digest,
        size: u64,
        sink: &mut dyn BlobSink,
    ) -> Result<(), RegistryError> {
        let mut failures = 0;
        let mut delay = self.backoff;
        loop {
            if sink.bytes_written() == size && size > 0 {
                return Ok(());
            }
            let before = sink.bytes_written();
            match self.blob_attempt(digest, size, sink) {
                Attempt::Done => return Ok(()),
                Attempt::Fatal(e) => return Err(e),
                Attempt::Retry(reason) => {
                    // Progress resets the budget: a slow but moving download is not failing.
                    if sink.bytes_written() > before {
                        failures = 0;
                        delay = self.backoff;
                    }
                    failures += 1;
                    if failures >= self.attempts {
                        return Err(RegistryError::BlobIncomplete {
                            registry: self.registry.clone(),
                            digest: digest.clone(),
                            attempts: failures,
                            offset: sink.bytes_written(),
                            size,
                            last: reason,
                        });
                    }
                    let Some(left) = self.pull_left() else {
                        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
                        return Err(self.deadline_error(&url, DeadlineKind::Pull, failures));
                    };
                    tracing::warn!(%digest, offset = sink.bytes_written(), size, %reason, "blob download interrupted; resuming");
                    std::thread::sleep(delay.min(left));
                    delay = delay.saturating_mul(2);
                }
            }
        }
    }
}

/// `host:port` or bare `host` in the insecure list matches.
fn host_is_insecure(list: &[String], authority: &str) -> bool {
    let authority = authority.to_ascii_lowercase();
    let host = authority
        .rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(authority.as_str(), |(h, _)| h);
    list.iter().any(|h| *h == authority || *h == host)
}

/// `bytes 100-199/200` → 100.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

/// Absolute URLs are taken as they are; `/path` is relative to the current origin.
fn resolve_location(current: &str, location: &str) -> Option<String> {
    if location.starts_with("https://") || location.starts_with("http://") {
        return Some(location.to_owned());
    }
    if location.starts_with('/') && !location.starts_with("//") {
        let o = Origin::of_url(current)?;
        return Some(format!("{}://{}{location}", o.scheme, o.authority));
    }
    None
}

fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        let list = vec!["127.0.0.1".to_owned(), "reg:5000".to_owned()];
        assert!(host_is_insecure(&list, "127.0.0.1:5000"));
        assert!(host_is_insecure(&list, "reg:5000"));
        assert!(!host_is_insecure(&list, "reg:5001"));
        assert!(!host_is_insecure(&list, "example.com"));
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("items 1-2"), None);
        assert_eq!(
            resolve_location("https://r.example/v2/x", "/blobs/1").as_deref(),
            Some("https://r.example/blobs/1")
        );
        assert_eq!(
            resolve_location("https://r.example/v2/x", "https://s3.example/b?sig=1").as_deref(),
            Some("https://s3.example/b?sig=1")
        );
        assert_eq!(resolve_location("https://r/v2", "relative"), None);
        assert_eq!(
            query_escape("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
        assert_eq!(
            Origin::of_url("https://User@r.example/x"),
            None,
            "userinfo in URLs is refused"
        );
        assert_eq!(
            Origin::of_url("HTTPS://R.example:443/x"),
            Some(Origin {
                scheme: "https".into(),
                authority: "r.example:443".into()
            })
        );
    }
}
