//! `WWW-Authenticate` challenges and the bearer-token response of the distribution auth
//! flow (<https://distribution.github.io/distribution/spec/auth/token/>).

use std::time::{Duration, Instant};

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic {
        realm: Option<String>,
    },
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
    /// A scheme we do not speak (kept so the error can name it).
    Other(String),
}

/// Why a challenge header could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChallengeError {
    /// The registry's `WWW-Authenticate` header does not parse.
    #[error("WWW-Authenticate header {0:?} is malformed: {1}")]
    Malformed(String, &'static str),
    /// The registry's Bearer challenge does not say where to get a token (no realm).
    #[error("WWW-Authenticate Bearer challenge {0:?} has no realm")]
    BearerWithoutRealm(String),
}

/// Parses a `WWW-Authenticate` value: one or more `Scheme k="v", k=v` challenges,
/// separated by commas (RFC 7235). Quoted strings may contain commas and `\"` escapes.
pub fn parse_www_authenticate(header: &str) -> Result<Vec<Challenge>, ChallengeError> {
    let mut out = Vec::new();
    let mut p = Parser {
        s: header.as_bytes(),
        i: 0,
    };
    let malformed = |why| ChallengeError::Malformed(header.to_owned(), why);
    loop {
        p.skip_ws_and_commas();
        if p.done() {
            break;
        }
        let scheme = p
            .token()
            .ok_or_else(|| malformed("expected a scheme name"))?;
        let mut params: Vec<(String, String)> = Vec::new();
        loop {
            p.skip_ws();
            // A parameter is `token = value`; a bare token instead starts the next challenge.
            let save = p.i;
            let Some(name) = p.token() else { break };
            p.skip_ws();
            if !p.eat(b'=') {
                p.i = save;
                break;
            }
            p.skip_ws();
            let value = if p.peek() == Some(b'"') {
                p.quoted()
                    .ok_or_else(|| malformed("unterminated quoted string"))?
            } else {
                p.token()
                    .ok_or_else(|| malformed("expected a parameter value"))?
            };
            params.push((name.to_ascii_lowercase(), value));
            p.skip_ws();
            if !p.eat(b',') {
                break;
            }
        }
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let challenge = match scheme.to_ascii_lowercase().as_str() {
            "basic" => Challenge::Basic {
                realm: get("realm"),
            },
            "bearer" => Challenge::Bearer {
                // An empty realm names no token endpoint either.
                realm: get("realm")
                    .filter(|realm| !realm.is_empty())
                    .ok_or_else(|| ChallengeError::BearerWithoutRealm(header.to_owned()))?,
                service: get("service"),
                scope: get("scope"),
            },
            _ => Challenge::Other(scheme),
        };
        out.push(challenge);
    }
    if out.is_empty() {
        return Err(malformed("no challenge"));
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }
    fn skip_ws_and_commas(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.i += 1;
        }
    }
    /// An RFC 7230 token (plus `/` and `:` which appear unquoted in real-world scopes).
    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while let Some(b) = self.peek() {
            let ok = b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/:".contains(&b);
            if !ok {
                break;
            }
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    fn quoted(&mut self) -> Option<String> {
        if !self.eat(b'"') {
            return None;
        }
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(String::from_utf8_lossy(&out).into_owned());
                }
                b'\\' => {
                    self.i += 1;
                    out.push(self.peek()?);
                    self.i += 1;
                }
                b => {
                    out.push(b);
                    self.i += 1;
                }
            }
        }
    }
}

/// A token endpoint's reply. Either field name is allowed by the spec.
#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
pub struct BearerToken {
    pub token: String,
    pub expires_at: Instant,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BearerToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl TokenResponse {
    /// The token, valid for `expires_in` seconds (60 when absent, per the spec), less a
    /// margin so a request never starts with a token about to lapse.
    pub fn into_token(self, now: Instant) -> Option<BearerToken> {
        let token = self
            .token
            .filter(|t| !t.is_empty())
            .or(self.access_token.filter(|t| !t.is_empty()))?;
        let lifetime = self.expires_in.unwrap_or(60).clamp(1, 24 * 3600);
        let margin = (lifetime / 10).min(30);
        Some(BearerToken {
            token,
            expires_at: now + Duration::from_secs(lifetime - margin),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_with_quoted_scope_containing_commas() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:team/app:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            vec![Challenge::Bearer {
                realm: "https://auth.example.com/token".into(),
                service: Some("registry.example.com".into()),
                scope: Some("repository:team/app:pull,push".into()),
            }]
        );
    }

    #[test]
    fn basic_and_multiple_challenges() {
        assert_eq!(
            parse_www_authenticate(r#"Basic realm="fnvm-test""#).unwrap(),
            vec![Challenge::Basic {
                realm: Some("fnvm-test".into())
            }]
        );
        let c = parse_www_authenticate(
            r#"Negotiate, Basic realm="a \"quoted\" realm", Bearer realm=https://x/token"#,
        )
        .unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], Challenge::Other("Negotiate".into()));
        assert_eq!(
            c[1],
            Challenge::Basic {
                realm: Some("a \"quoted\" realm".into())
            }
        );
        assert!(matches!(&c[2], Challenge::Bearer { realm, .. } if realm == "https://x/token"));
        assert_eq!(
            parse_www_authenticate("BASIC").unwrap(),
            vec![Challenge::Basic { realm: None }]
        );
    }

    #[test]
    fn malformed_challenges_are_errors() {
        assert!(matches!(
            parse_www_authenticate("Bearer service=\"x\""),
            Err(ChallengeError::BearerWithoutRealm(_))
        ));
        // Found by fuzz/fuzz_targets/registry_auth.rs: an empty realm was taken for a token
        // endpoint (the parameter name matches in any case).
        for empty in ["Bearer realm=\"\"", "Bearer Realm=\"\",scope=x"] {
            assert!(matches!(
                parse_www_authenticate(empty),
                Err(ChallengeError::BearerWithoutRealm(_))
            ));
        }
        assert!(parse_www_authenticate("Bearer realm=\"unterminated").is_err());
        assert!(parse_www_authenticate("").is_err());
        assert!(parse_www_authenticate("=oops").is_err());
    }

    #[test]
    fn token_lifetime() {
        let now = Instant::now();
        let t = TokenResponse {
            token: None,
            access_token: Some("abc".into()),
            expires_in: Some(300),
        }
        .into_token(now)
        .unwrap();
        assert_eq!(t.token, "abc");
        assert_eq!(t.expires_at, now + Duration::from_secs(270));
        assert!(!format!("{t:?}").contains("abc"));
        let t = TokenResponse {
            token: Some("x".into()),
            access_token: None,
            expires_in: None,
        }
        .into_token(now)
        .unwrap();
        assert_eq!(t.expires_at, now + Duration::from_secs(54));
        assert!(TokenResponse {
            token: Some(String::new()),
            access_token: None,
            expires_in: None
        }
        .into_token(now)
        .is_none());
    }
}
