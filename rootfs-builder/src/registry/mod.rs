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
pub mod deadlines;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ureq::http::{Response, StatusCode};
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::Body;

use crate::credentials::Credentials;
use crate::digest::Digest;
use crate::manifest::{MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use crate::reference::RegistryReference;
use crate::source::{BlobSink, ImageSource, ManifestRef, RawManifest};
use auth::{BearerToken, Challenge, TokenResponse};
use deadlines::{BadDeadline, DeadlineKind, RegistryDeadlines};

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

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read registry CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("authentication failed for registry {registry}, repository {repository}: {detail}")]
    Unauthorized {
        registry: String,
        repository: String,
        detail: String,
    },
    #[error("registry {registry} denied access to repository {repository} (HTTP 403)")]
    Denied {
        registry: String,
        repository: String,
    },
    #[error("registry {registry}: {what} not found in repository {repository}")]
    NotFound {
        registry: String,
        repository: String,
        what: String,
    },
    #[error("request to {url} failed")]
    Transport {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{url}: HTTP {status}{}", if .body.is_empty() { String::new() } else { format!(": {}", .body) })]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error(
        "TLS handshake with registry {registry} failed: it seems to speak plain HTTP; \
         pass --insecure-registry {registry} if plain HTTP is intended"
    )]
    PlainHttpServer {
        registry: String,
        #[source]
        source: ureq::Error,
    },
    #[error("{registry} does not look like an OCI registry: GET /v2/ answered HTTP {status}")]
    NotARegistry { registry: String, status: u16 },
    #[error(
        "refusing plain HTTP to {url}: only hosts given with --insecure-registry may use HTTP"
    )]
    InsecureRefused { url: String },
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
    #[error(transparent)]
    BadDeadline(#[from] BadDeadline),
    #[error("{url}: bad redirect: {reason}")]
    BadRedirect { url: String, reason: String },
    #[error("registry {registry}: token endpoint {realm}: {reason}")]
    Token {
        registry: String,
        realm: String,
        reason: String,
    },
    #[error("manifest {what} from {registry} is larger than {MAX_MANIFEST_BYTES} bytes")]
    ManifestTooLarge { registry: String, what: String },
    #[error("manifest from {registry} hashes to {actual}, not the requested {expected}")]
    ManifestDigestMismatch {
        registry: String,
        expected: Digest,
        actual: Digest,
    },
    #[error(
        "blob {digest} from {registry} is larger than its declared {size} bytes; download cut off"
    )]
    BlobTooLarge {
        registry: String,
        digest: Digest,
        size: u64,
    },
    #[error("blob {digest}: {reason}")]
    BlobProtocol { digest: Digest, reason: String },
    #[error("blob {digest} from {registry}: download failed after {attempts} attempts at byte {offset} of {size}: {last}")]
    BlobIncomplete {
        registry: String,
        digest: Digest,
        attempts: u32,
        offset: u64,
        size: u64,
        last: String,
    },
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

/// Result of one attempt at streaming a blob.
enum Attempt {
    Done,
    Retry(String),
    Fatal(RegistryError),
}

const BLOB_BUF: usize = 256 * 1024;
const MAX_REDIRECTS: usize = 5;

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

    fn unauthorized(&self, detail: &str) -> RegistryError {
        let detail = match &self.credentials {
            Some(c) => format!(
                "{detail} (user {:?}; check --registry-user/--registry-password, \
                 FNVM_REGISTRY_USER/FNVM_REGISTRY_PASSWORD or the auth file)",
                c.username()
            ),
            None => format!(
                "{detail} (no credentials were given: pass --registry-user/--registry-password, \
                 set FNVM_REGISTRY_USER/FNVM_REGISTRY_PASSWORD or use an auth file)"
            ),
        };
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            detail,
        }
    }

    /// The `Authorization` value for the registry's own origin, if any; refreshes a lapsed
    /// bearer token.
    fn authorization(&self) -> Result<Option<String>, RegistryError> {
        let state = self.auth.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match state {
            AuthState::Anonymous => Ok(None),
            AuthState::Basic => Ok(self.credentials.as_ref().map(|c| c.basic_header())),
            AuthState::Bearer {
                token,
                realm,
                service,
            } => {
                if Instant::now() < token.expires_at {
                    return Ok(Some(format!("Bearer {}", token.token)));
                }
                let fresh = self.fetch_token(&realm, service.as_deref())?;
                let header = format!("Bearer {}", fresh.token);
                *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = AuthState::Bearer {
                    token: fresh,
                    realm,
                    service,
                };
                Ok(Some(header))
            }
        }
    }

    /// Sends a request to the registry origin, answering one auth challenge. A second 401
    /// after authenticating means the credentials were refused.
    fn send_authenticated(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
    ) -> Result<Response<Body>, RegistryError> {
        for round in 0..2 {
            let authz = self.authorization()?;
            let resp = self.send_with_retry(method, url, headers, authz.as_deref())?;
            if resp.status() != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            if round == 1 {
                return Err(self.unauthorized("the registry rejected the credentials"));
            }
            let challenges: Vec<Challenge> = resp
                .headers()
                .get_all("www-authenticate")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .filter_map(|v| auth::parse_www_authenticate(v).ok())
                .flatten()
                .collect();
            self.answer_challenge(&challenges)?;
        }
        unreachable!("the loop returns in its second round")
    }

    fn answer_challenge(&self, challenges: &[Challenge]) -> Result<(), RegistryError> {
        let bearer = challenges.iter().find_map(|c| match c {
            Challenge::Bearer { realm, service, .. } => Some((realm.clone(), service.clone())),
            _ => None,
        });
        let new_state = if let Some((realm, service)) = bearer {
            let token = self.fetch_token(&realm, service.as_deref())?;
            AuthState::Bearer {
                token,
                realm,
                service,
            }
        } else if challenges
            .iter()
            .any(|c| matches!(c, Challenge::Basic { .. }))
        {
            if self.credentials.is_none() {
                return Err(self.unauthorized("the registry requires authentication"));
            }
            if self.origin.scheme != "https"
                && !host_is_insecure(&self.insecure, &self.origin.authority)
            {
                return Err(RegistryError::InsecureRefused {
                    url: self.base.clone(),
                });
            }
            AuthState::Basic
        } else {
            let offered: Vec<String> = challenges
                .iter()
                .map(|c| match c {
                    Challenge::Other(s) => s.clone(),
                    _ => String::new(),
                })
                .collect();
            return Err(self.unauthorized(&format!(
                "the registry asked for an authentication scheme fnvm does not support ({})",
                if offered.is_empty() {
                    "no WWW-Authenticate challenge".to_owned()
                } else {
                    offered.join(", ")
                }
            )));
        };
        *self.auth.lock().unwrap_or_else(|e| e.into_inner()) = new_state;
        Ok(())
    }

    /// The bearer flow: `GET realm?service=..&scope=repository:REPO:pull`, with Basic
    /// credentials when we have them (anonymous tokens otherwise).
    fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
    ) -> Result<BearerToken, RegistryError> {
        let token_err = |reason: String| RegistryError::Token {
            registry: self.registry.clone(),
            realm: realm.to_owned(),
            reason,
        };
        let origin = Origin::of_url(realm)
            .ok_or_else(|| token_err("realm is not an absolute http(s) URL".into()))?;
        match origin.scheme.as_str() {
            "https" => {}
            "http" if host_is_insecure(&self.insecure, &origin.authority) => {}
            "http" => {
                return Err(RegistryError::InsecureRefused {
                    url: realm.to_owned(),
                })
            }
            _ => return Err(token_err("realm is not an http(s) URL".into())),
        }
        let mut url = realm.to_owned();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        if let Some(s) = service {
            url.push_str(&format!("{sep}service={}", query_escape(s)));
            sep = '&';
        }
        url.push_str(&format!(
            "{sep}scope={}",
            query_escape(&format!("repository:{}:pull", self.repository))
        ));
        let authz = self.credentials.as_ref().map(|c| c.basic_header());
        let resp = self.send_with_retry("GET", &url, &[], authz.as_deref())?;
        match resp.status().as_u16() {
            200 => {}
            401 | 403 => {
                return Err(self.unauthorized("the token service rejected the credentials"))
            }
            s => return Err(token_err(format!("HTTP {s}"))),
        }
        let body = resp
            .into_body()
            .into_with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| token_err(format!("unreadable token response: {e}")))?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| token_err(format!("token response is not JSON: {e}")))?;
        parsed
            .into_token(Instant::now())
            .ok_or_else(|| token_err("response has no token".into()))
    }

    /// One logical request with retries on connection failures, 5xx and 429.
    fn send_with_retry(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        authorization: Option<&str>,
    ) -> Result<Response<Body>, RegistryError> {
        let mut delay = self.backoff;
        let mut attempt = 1;
        loop {
            let result = self.send_once(method, url, headers, authorization);
            let retry_reason = match &result {
                Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                    format!("HTTP {}", r.status().as_u16())
                }
                Ok(_) => return Ok(result.expect("matched Ok")),
                Err(e) if is_transient(e) && self.pull_left().is_some() => e.to_string(),
                Err(_) => {
                    return result.map_err(|source| self.transport_error(url, source, attempt))
                }
            };
            if attempt >= self.attempts {
                return match result {
                    Ok(resp) => Err(self.status_error(url, resp, url)),
                    Err(source) => Err(self.transport_error(url, source, attempt)),
                };
            }
            tracing::warn!(url, attempt, reason = %retry_reason, "registry request failed; retrying");
            std::thread::sleep(delay.min(self.pull_left().unwrap_or_default()));
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
    }

    fn send_once(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        authorization: Option<&str>,
    ) -> Result<Response<Body>, ureq::Error> {
        tracing::debug!(method, url, "registry request");
        // The whole pull's deadline bounds every request, its body included.
        let left = self
            .pull_left()
            .ok_or(ureq::Error::Timeout(ureq::Timeout::Global))?;
        macro_rules! with_headers {
            ($builder:expr) => {{
                let mut b = $builder.config().timeout_global(Some(left)).build();
                for (k, v) in headers {
                    b = b.header(*k, v.as_str());
                }
                if let Some(a) = authorization {
                    b = b.header("Authorization", a);
                }
                b.call()
            }};
        }
        match method {
            "HEAD" => with_headers!(self.agent.head(url)),
            _ => with_headers!(self.agent.get(url)),
        }
    }

    /// Time left of the whole pull, None once it is over.
    fn pull_left(&self) -> Option<Duration> {
        Some(self.pull_ends.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }

    /// A failed request as an error: a timeout names the deadline that ran out.
    fn transport_error(&self, url: &str, source: ureq::Error, attempts: u32) -> RegistryError {
        match timeout_of(&source) {
            Some(kind) => self.deadline_error(url, kind, attempts),
            None => RegistryError::Transport {
                url: url.to_owned(),
                source,
            },
        }
    }

    fn deadline_error(&self, url: &str, kind: DeadlineKind, attempts: u32) -> RegistryError {
        RegistryError::Deadline {
            registry: self.registry.clone(),
            url: url.to_owned(),
            kind,
            limit: self.deadlines.get(kind),
            attempts,
        }
    }

    /// GET with manual redirects: `Authorization` goes only to the registry's own origin,
    /// and a redirect may not downgrade to plain HTTP unless that host is insecure-listed.
    fn get_following_redirects(
        &self,
        url: &str,
        headers: &[(&str, String)],
    ) -> Result<Response<Body>, RegistryError> {
        let mut resp = self.send_authenticated("GET", url, headers)?;
        let mut current = url.to_owned();
        for _ in 0..MAX_REDIRECTS {
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| RegistryError::BadRedirect {
                    url: current.clone(),
                    reason: format!("HTTP {} without a Location header", resp.status().as_u16()),
                })?;
            let next =
                resolve_location(&current, location).ok_or_else(|| RegistryError::BadRedirect {
                    url: current.clone(),
                    reason: format!("unusable Location {location:?}"),
                })?;
            let origin = Origin::of_url(&next).ok_or_else(|| RegistryError::BadRedirect {
                url: current.clone(),
                reason: format!("unusable Location {location:?}"),
            })?;
            if origin.scheme == "http" && !host_is_insecure(&self.insecure, &origin.authority) {
                return Err(RegistryError::InsecureRefused { url: next });
            }
            if origin.scheme != "http" && origin.scheme != "https" {
                return Err(RegistryError::BadRedirect {
                    url: current,
                    reason: format!("scheme {} is not http(s)", origin.scheme),
                });
            }
            tracing::debug!(from = %current, to = %next, "following redirect");
            resp = if origin == self.origin {
                self.send_authenticated("GET", &next, headers)?
            } else {
                self.send_with_retry("GET", &next, headers, None)?
            };
            current = next;
        }
        Err(RegistryError::BadRedirect {
            url: url.to_owned(),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// One try at streaming the rest of a blob into `sink`.
    fn blob_attempt(&self, digest: &Digest, size: u64, sink: &mut dyn BlobSink) -> Attempt {
        let offset = sink.bytes_written();
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push(("Range", format!("bytes={offset}-")));
        }
        let resp = match self.get_following_redirects(&url, &headers) {
            Ok(r) => r,
            Err(RegistryError::Transport { source, .. }) if is_transient(&source) => {
                return Attempt::Retry(source.to_string())
            }
            Err(RegistryError::Deadline {
                kind: DeadlineKind::Read | DeadlineKind::Connect,
                ..
            }) if self.pull_left().is_some() => {
                return Attempt::Retry(format!(
                    "no answer within the read deadline of {} s",
                    self.deadlines.read.as_secs()
                ))
            }
            Err(RegistryError::Status { status, .. }) if status >= 500 || status == 429 => {
                return Attempt::Retry(format!("HTTP {status}"))
            }
            Err(e) => return Attempt::Fatal(e),
        };
        // How many leading bytes of this body we already have.
        let skip = match resp.status().as_u16() {
            200 => offset,
            206 => {
                let start = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    return Attempt::Fatal(RegistryError::BlobProtocol {
                        digest: digest.clone(),
                        reason: format!(
                            "asked for bytes from {offset}, the server sent Content-Range {:?}",
                            resp.headers().get("content-range")
                        ),
                    });
                }
                0
            }
            _ => return Attempt::Fatal(self.status_error(&url, resp, &format!("blob {digest}"))),
        };
        if skip > 0 {
            tracing::info!(%digest, skip, "server ignored Range; re-reading from the start");
        }
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; BLOB_BUF];
        let mut to_skip = skip;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => match io_timeout_of(&e) {
                    Some(DeadlineKind::Pull) => {
                        return Attempt::Fatal(self.deadline_error(&url, DeadlineKind::Pull, 1))
                    }
                    Some(kind) => {
                        return Attempt::Retry(format!(
                            "no data within the {kind} deadline of {} s",
                            self.deadlines.get(kind).as_secs()
                        ))
                    }
                    None => return Attempt::Retry(e.to_string()),
                },
            };
            let mut chunk = &buf[..n];
            if to_skip > 0 {
                let s = (to_skip as usize).min(chunk.len());
                chunk = &chunk[s..];
                to_skip -= s as u64;
            }
            if chunk.is_empty() {
                continue;
            }
            if sink.bytes_written() + chunk.len() as u64 > size {
                return Attempt::Fatal(RegistryError::BlobTooLarge {
                    registry: self.registry.clone(),
                    digest: digest.clone(),
                    size,
                });
            }
            if let Err(source) = sink.write_all(chunk) {
                return Attempt::Fatal(RegistryError::Sink {
                    digest: digest.clone(),
                    source,
                });
            }
        }
        let have = sink.bytes_written();
        if have < size {
            return Attempt::Retry(format!("connection ended after byte {have} of {size}"));
        }
        Attempt::Done
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

/// Connection resets, timeouts and truncated responses are worth another try; TLS
/// certificate failures, bad URLs and protocol violations are not.
fn is_transient(e: &ureq::Error) -> bool {
    match e {
        ureq::Error::Io(io) => !matches!(
            io.kind(),
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
        ),
        ureq::Error::Timeout(_) | ureq::Error::ConnectionFailed => true,
        ureq::Error::Protocol(_) => true,
        _ => false,
    }
}

/// The deadline a ureq error says ran out, if it is a timeout.
fn timeout_of(e: &ureq::Error) -> Option<DeadlineKind> {
    match e {
        ureq::Error::Timeout(t) => Some(deadlines::kind_of(*t)),
        ureq::Error::Io(io) => io_timeout_of(io),
        _ => None,
    }
}

/// The deadline behind a body read's io::Error (ureq wraps its own error in it).
fn io_timeout_of(e: &std::io::Error) -> Option<DeadlineKind> {
    match e.get_ref()?.downcast_ref::<ureq::Error>()? {
        ureq::Error::Timeout(t) => Some(deadlines::kind_of(*t)),
        _ => None,
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

/// System roots by default; with `--registry-ca`, that CA plus the system bundle (so a
/// redirect to public blob storage still verifies).
fn tls_config(ca_file: Option<&Path>) -> Result<TlsConfig, RegistryError> {
    let Some(path) = ca_file else {
        return Ok(TlsConfig::builder()
            .root_certs(RootCerts::PlatformVerifier)
            .build());
    };
    let ca_err = |reason: String| RegistryError::CaFile {
        path: path.to_owned(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    let mut certs: Vec<Certificate<'static>> = pem_certs(&pem).map_err(ca_err)?;
    if certs.is_empty() {
        return Err(ca_err("no PEM certificates in it".into()));
    }
    let system = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
    if let Ok(bundle) = std::fs::read(&system) {
        certs.extend(pem_certs(&bundle).unwrap_or_default());
    }
    Ok(TlsConfig::builder()
        .root_certs(RootCerts::Specific(Arc::new(certs)))
        .build())
}

fn pem_certs(pem: &[u8]) -> Result<Vec<Certificate<'static>>, String> {
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item.map_err(|e| e.to_string())? {
            PemItem::Certificate(c) => out.push(c.to_owned()),
            _ => continue,
        }
    }
    Ok(out)
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
