//! Registry credentials: flags, then `FNVM_REGISTRY_USER`/`FNVM_REGISTRY_PASSWORD`, then a
//! docker-style auth file (`REGISTRY_AUTH_FILE`, then `~/.docker/config.json`).
//!
//! Credentials are temporary and belong to the caller: they live only in memory, their
//! `Debug` form is redacted, and nothing here ever writes them anywhere.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;

/// A username and password (or token) for one registry. `Debug` never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    password: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            username: username.into(),
            password: password.into(),
        }
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// The value of an `Authorization: Basic ...` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Why credentials could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    /// A registry user was given without a password, or a password without a user.
    #[error("{0} given without {1}: pass both or neither")]
    Incomplete(&'static str, &'static str),
    /// The registry auth file cannot be read.
    #[error("cannot read registry auth file {path}")]
    ReadAuthFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The registry auth file is not valid JSON.
    #[error("registry auth file {path} is not valid JSON")]
    ParseAuthFile {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A registry's entry in the auth file has an `auth` value that is not base64 `user:password`.
    #[error(
        "registry auth file {path}: entry for {registry:?} has an \"auth\" value that is not \
         base64 of user:password"
    )]
    BadAuthEntry { path: PathBuf, registry: String },
}

/// Where the environment is read from; a function so tests need not touch process state.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Resolves the credentials for `registry` (`host[:port]`), in the documented order:
/// explicit flags, environment, auth file. `None` means anonymous access.
pub fn resolve(
    flag_user: Option<&str>,
    flag_password: Option<&str>,
    registry: &str,
) -> Result<Option<Credentials>, CredentialsError> {
    resolve_with(flag_user, flag_password, registry, &|k| {
        std::env::var(k).ok()
    })
}

/// [`resolve`] with an explicit environment.
pub fn resolve_with(
    flag_user: Option<&str>,
    flag_password: Option<&str>,
    registry: &str,
    env: EnvLookup<'_>,
) -> Result<Option<Credentials>, CredentialsError> {
    match (flag_user, flag_password) {
        (Some(u), Some(p)) => return Ok(Some(Credentials::new(u, p))),
        (Some(_), None) => {
            return Err(CredentialsError::Incomplete(
                "--registry-user",
                "--registry-password",
            ))
        }
        (None, Some(_)) => {
            return Err(CredentialsError::Incomplete(
                "--registry-password",
                "--registry-user",
            ))
        }
        (None, None) => {}
    }
    let env_nonempty = |k: &str| env(k).filter(|v| !v.is_empty());
    match (
        env_nonempty("FNVM_REGISTRY_USER"),
        env_nonempty("FNVM_REGISTRY_PASSWORD"),
    ) {
        (Some(u), Some(p)) => return Ok(Some(Credentials::new(u, p))),
        (Some(_), None) => {
            return Err(CredentialsError::Incomplete(
                "FNVM_REGISTRY_USER",
                "FNVM_REGISTRY_PASSWORD",
            ))
        }
        (None, Some(_)) => {
            return Err(CredentialsError::Incomplete(
                "FNVM_REGISTRY_PASSWORD",
                "FNVM_REGISTRY_USER",
            ))
        }
        (None, None) => {}
    }
    for path in auth_file_candidates(env) {
        match std::fs::read(&path) {
            Ok(bytes) => return from_auth_file(&path, &bytes, registry),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(CredentialsError::ReadAuthFile { path, source }),
        }
    }
    Ok(None)
}

/// `REGISTRY_AUTH_FILE`, else `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
/// An explicitly named `REGISTRY_AUTH_FILE` is the only file consulted when set.
fn auth_file_candidates(env: EnvLookup<'_>) -> Vec<PathBuf> {
    if let Some(p) = env("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut out = Vec::new();
    if let Some(dir) = env("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        out.push(Path::new(&dir).join("config.json"));
    }
    if let Some(home) = env("HOME").filter(|v| !v.is_empty()) {
        out.push(Path::new(&home).join(".docker/config.json"));
    }
    out
}

#[derive(serde::Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Looks `registry` up in a docker-style `config.json`. Keys may be written as `host`,
/// `https://host` or `https://host/v1/`; all name the same registry.
pub fn from_auth_file(
    path: &Path,
    bytes: &[u8],
    registry: &str,
) -> Result<Option<Credentials>, CredentialsError> {
    let file: AuthFile =
        serde_json::from_slice(bytes).map_err(|source| CredentialsError::ParseAuthFile {
            path: path.to_owned(),
            source,
        })?;
    let wanted = normalize_registry_key(registry);
    let Some((key, entry)) = file
        .auths
        .iter()
        .find(|(k, _)| normalize_registry_key(k) == wanted)
    else {
        return Ok(None);
    };
    let bad = || CredentialsError::BadAuthEntry {
        path: path.to_owned(),
        registry: key.clone(),
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(decoded).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials::new(user, pass)));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials::new(u.clone(), p.clone()))),
        _ => Ok(None),
    }
}

/// `https://host:port/v1/` → `host:port`; docker.io's historical names collapse to one.
fn normalize_registry_key(key: &str) -> String {
    let k = key
        .trim()
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_owned(),
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn debug_never_shows_the_password() {
        let c = Credentials::new("alice", "hunter2");
        let shown = format!("{c:?} {:?}", Some(c.clone()));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("alice"));
        assert_eq!(c.basic_header(), "Basic YWxpY2U6aHVudGVyMg==");
    }

    #[test]
    fn flags_then_env_then_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(
            &file,
            r#"{"auths":{"https://reg.example:5000/v1/":{"auth":"ZmlsZXVzZXI6ZmlsZXBhc3M="}}}"#,
        )
        .unwrap();
        let f = file.to_str().unwrap();
        let env = env_of(&[
            ("FNVM_REGISTRY_USER", "envuser"),
            ("FNVM_REGISTRY_PASSWORD", "envpass"),
            ("REGISTRY_AUTH_FILE", f),
        ]);
        let c = resolve_with(Some("u"), Some("p"), "reg.example:5000", &env)
            .unwrap()
            .unwrap();
        assert_eq!((c.username(), c.password()), ("u", "p"));
        let c = resolve_with(None, None, "reg.example:5000", &env)
            .unwrap()
            .unwrap();
        assert_eq!((c.username(), c.password()), ("envuser", "envpass"));
        let env = env_of(&[("REGISTRY_AUTH_FILE", f)]);
        let c = resolve_with(None, None, "reg.example:5000", &env)
            .unwrap()
            .unwrap();
        assert_eq!((c.username(), c.password()), ("fileuser", "filepass"));
        assert!(resolve_with(None, None, "other.example", &env)
            .unwrap()
            .is_none());
    }

    #[test]
    fn docker_config_in_home_and_half_given_pairs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".docker")).unwrap();
        std::fs::write(
            dir.path().join(".docker/config.json"),
            r#"{"auths":{"localhost:5000":{"username":"a","password":"b"}},"credsStore":"x"}"#,
        )
        .unwrap();
        let env = env_of(&[("HOME", dir.path().to_str().unwrap())]);
        let c = resolve_with(None, None, "localhost:5000", &env)
            .unwrap()
            .unwrap();
        assert_eq!((c.username(), c.password()), ("a", "b"));
        assert!(matches!(
            resolve_with(Some("u"), None, "x", &env),
            Err(CredentialsError::Incomplete("--registry-user", _))
        ));
        let env = env_of(&[("FNVM_REGISTRY_PASSWORD", "p")]);
        assert!(matches!(
            resolve_with(None, None, "x", &env),
            Err(CredentialsError::Incomplete("FNVM_REGISTRY_PASSWORD", _))
        ));
        assert!(resolve_with(None, None, "x", &env_of(&[]))
            .unwrap()
            .is_none());
    }

    #[test]
    fn malformed_auth_files_are_errors_naming_the_file() {
        let p = Path::new("/x/auth.json");
        let e = from_auth_file(p, b"{not json", "r").unwrap_err();
        assert!(e.to_string().contains("/x/auth.json"));
        let e = from_auth_file(p, br#"{"auths":{"r":{"auth":"bm9jb2xvbg=="}}}"#, "r").unwrap_err();
        assert!(matches!(e, CredentialsError::BadAuthEntry { .. }), "{e}");
        let e = from_auth_file(p, br#"{"auths":{"r":{"auth":"!!!"}}}"#, "r").unwrap_err();
        assert!(matches!(e, CredentialsError::BadAuthEntry { .. }));
        // docker.io's many spellings are one registry.
        let c = from_auth_file(
            p,
            br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dTpwOnE="}}}"#,
            "docker.io",
        )
        .unwrap()
        .unwrap();
        assert_eq!((c.username(), c.password()), ("u", "p:q"));
    }
}
