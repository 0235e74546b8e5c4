//! How requests get their `Authorization`: anonymous first, then Basic or a Bearer token as
//! the registry's challenge asks, tokens fetched (and fetched again when they lapse) from the
//! realm it names.

use std::time::Instant;

use ureq::http::{Response, StatusCode};
use ureq::Body;

use super::auth::{BearerToken, Challenge, TokenResponse};
use super::{host_is_insecure, query_escape, AuthState, Origin, RegistryClient, RegistryError};

impl RegistryClient {
    pub(super) fn unauthorized(&self, detail: &str) -> RegistryError {
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
    pub(super) fn authorization(&self) -> Result<Option<String>, RegistryError> {
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
    pub(super) fn send_authenticated(
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
                .filter_map(|v| super::auth::parse_www_authenticate(v).ok())
                .flatten()
                .collect();
            self.answer_challenge(&challenges)?;
        }
        unreachable!("the loop returns in its second round")
    }

    pub(super) fn answer_challenge(&self, challenges: &[Challenge]) -> Result<(), RegistryError> {
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
    pub(super) fn fetch_token(
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
}
