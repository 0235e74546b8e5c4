//! Requests on the wire: retries with backoff on transient failures, the deadlines of each
//! request and of the whole pull, redirects followed by hand (so `Authorization` never leaves
//! the registry's origin), and the TLS roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ureq::http::Response;
use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};
use ureq::Body;

use super::deadlines::DeadlineKind;
use super::{deadlines, host_is_insecure, resolve_location, Origin, RegistryClient, RegistryError};

impl RegistryClient {
    /// One logical request with retries on connection failures, 5xx and 429.
    pub(super) fn send_with_retry(
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

    pub(super) fn send_once(
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
    pub(super) fn pull_left(&self) -> Option<Duration> {
        Some(self.pull_ends.saturating_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }

    /// A failed request as an error: a timeout names the deadline that ran out.
    pub(super) fn transport_error(
        &self,
        url: &str,
        source: ureq::Error,
        attempts: u32,
    ) -> RegistryError {
        match timeout_of(&source) {
            Some(kind) => self.deadline_error(url, kind, attempts),
            None => RegistryError::Transport {
                url: url.to_owned(),
                source,
            },
        }
    }

    pub(super) fn deadline_error(
        &self,
        url: &str,
        kind: DeadlineKind,
        attempts: u32,
    ) -> RegistryError {
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
    pub(super) fn get_following_redirects(
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
}

pub(super) const MAX_REDIRECTS: usize = 5;
/// Connection resets, timeouts and truncated responses are worth another try; TLS
/// certificate failures, bad URLs and protocol violations are not.
pub(super) fn is_transient(e: &ureq::Error) -> bool {
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
pub(super) fn timeout_of(e: &ureq::Error) -> Option<DeadlineKind> {
    match e {
        ureq::Error::Timeout(t) => Some(deadlines::kind_of(*t)),
        ureq::Error::Io(io) => io_timeout_of(io),
        _ => None,
    }
}

/// The deadline behind a body read's io::Error (ureq wraps its own error in it).
pub(super) fn io_timeout_of(e: &std::io::Error) -> Option<DeadlineKind> {
    match e.get_ref()?.downcast_ref::<ureq::Error>()? {
        ureq::Error::Timeout(t) => Some(deadlines::kind_of(*t)),
        _ => None,
    }
}

/// System roots by default; with `--registry-ca`, that CA plus the system bundle (so a
/// redirect to public blob storage still verifies).
pub(super) fn tls_config(ca_file: Option<&Path>) -> Result<TlsConfig, RegistryError> {
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
    let mut certs: Vec<Certificate<'static>> =
        pem_certs(&pem).map_err(|e| ca_err(e.to_string()))?;
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

/// The certificates of a PEM bundle (other items skipped).
fn pem_certs(pem: &[u8]) -> Result<Vec<Certificate<'static>>, ureq::Error> {
    let mut out = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        match item? {
            PemItem::Certificate(c) => out.push(c.to_owned()),
            _ => continue,
        }
    }
    Ok(out)
}
