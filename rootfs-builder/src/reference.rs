//! Image references as users write them: `REGISTRY/REPO@sha256:HEX`, `REGISTRY/REPO:TAG`
//! (both may be given; the digest wins), `oci:PATH[:TAG]` and `docker-archive:PATH`.
//!
//! The registry host is always explicit: fnvm never guesses a default registry, so a
//! reference means the same thing on every machine.

use std::fmt;
use std::path::PathBuf;

use crate::digest::{Digest, DigestError};
use crate::source::ManifestRef;

/// Why an image reference was refused. Each message names the offending part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    /// The image reference is empty.
    #[error("empty image reference")]
    Empty,
    /// The image reference does not start with a registry host.
    #[error(
        "image reference {0:?} has no registry host; write REGISTRY/REPO:TAG or \
         REGISTRY/REPO@sha256:HEX (e.g. registry.example.com/team/app:1.0)"
    )]
    MissingRegistry(String),
    /// The registry part of the image reference is not a valid host[:port].
    #[error("image reference {reference:?}: registry {registry:?} is not a valid host[:port]")]
    BadRegistry { reference: String, registry: String },
    /// A component of the repository name has characters or separators that are not allowed.
    #[error(
        "image reference {reference:?}: repository component {component:?} is invalid \
         (lowercase letters, digits and single '.', '_', '__' or '-' separators only)"
    )]
    BadRepository {
        reference: String,
        component: String,
    },
    /// The repository name is longer than 255 characters.
    #[error("image reference {reference:?}: repository name is longer than 255 characters")]
    RepositoryTooLong { reference: String },
    /// The tag is too long or has characters that are not allowed.
    #[error(
        "image reference {reference:?}: tag {tag:?} is invalid (1-128 characters of letters, \
         digits, '_', '.', '-', not starting with '.' or '-')"
    )]
    BadTag { reference: String, tag: String },
    /// The digest in the image reference is not a valid digest.
    #[error("image reference {reference:?} has a bad digest")]
    BadDigest {
        reference: String,
        #[source]
        source: DigestError,
    },
    /// An `oci:` or `docker-archive:` reference has no path after its colon.
    #[error("image reference {0:?}: {1} needs a path after the colon")]
    MissingPath(String, &'static str),
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageReference {
    /// An image in an OCI distribution registry.
    Registry(RegistryReference),
    /// An OCI image layout directory, optionally naming a tag from its index.
    OciLayout { path: PathBuf, tag: Option<String> },
    /// A `docker save` tarball.
    DockerArchive { path: PathBuf },
}

/// `REGISTRY/REPO[:TAG][@DIGEST]`; at least one of tag and digest is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryReference {
    /// `host[:port]` as written.
    pub registry: String,
    /// The repository path inside the registry, e.g. `team/app`.
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl RegistryReference {
    /// What to ask the registry for: the digest when pinned, else the tag.
    pub fn manifest_ref(&self) -> ManifestRef {
        match (&self.digest, &self.tag) {
            (Some(d), _) => ManifestRef::Digest(d.clone()),
            (None, Some(t)) => ManifestRef::Tag(t.clone()),
            (None, None) => ManifestRef::Tag("latest".to_owned()),
        }
    }

    /// The host the distribution API is served from (`docker.io` is an alias).
    pub fn api_host(&self) -> &str {
        match self.registry.as_str() {
            "docker.io" | "index.docker.io" => "registry-1.docker.io",
            other => other,
        }
    }

    /// `registry/repository`, for messages.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

impl fmt::Display for RegistryReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageReference::Registry(r) => r.fmt(f),
            ImageReference::OciLayout { path, tag: None } => write!(f, "oci:{}", path.display()),
            ImageReference::OciLayout { path, tag: Some(t) } => {
                write!(f, "oci:{}:{t}", path.display())
            }
            ImageReference::DockerArchive { path } => {
                write!(f, "docker-archive:{}", path.display())
            }
        }
    }
}

impl std::str::FromStr for ImageReference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse(s)
    }
}

/// Parses any supported reference form.
pub fn parse(input: &str) -> Result<ImageReference, ReferenceError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(ReferenceError::Empty);
    }
    if let Some(rest) = s.strip_prefix("oci:") {
        return parse_oci(input, rest);
    }
    if let Some(rest) = s.strip_prefix("docker-archive:") {
        if rest.is_empty() {
            return Err(ReferenceError::MissingPath(
                input.to_owned(),
                "docker-archive:",
            ));
        }
        return Ok(ImageReference::DockerArchive {
            path: PathBuf::from(rest),
        });
    }
    parse_registry(s).map(ImageReference::Registry)
}

/// `oci:PATH[:TAG]`: the last `:` starts a tag only if what follows is a valid tag without
/// a `/`, so `oci:/a/b:c` is path `/a/b` with tag `c`.
fn parse_oci(input: &str, rest: &str) -> Result<ImageReference, ReferenceError> {
    if rest.is_empty() {
        return Err(ReferenceError::MissingPath(input.to_owned(), "oci:"));
    }
    if let Some((path, tag)) = rest.rsplit_once(':') {
        if !tag.contains('/') && is_valid_tag(tag) && !path.is_empty() {
            return Ok(ImageReference::OciLayout {
                path: PathBuf::from(path),
                tag: Some(tag.to_owned()),
            });
        }
    }
    Ok(ImageReference::OciLayout {
        path: PathBuf::from(rest),
        tag: None,
    })
}

fn parse_registry(s: &str) -> Result<RegistryReference, ReferenceError> {
    let err_ref = || s.to_owned();
    let (name_and_tag, digest) = match s.rsplit_once('@') {
        Some((n, d)) => {
            let digest = d
                .parse::<Digest>()
                .map_err(|source| ReferenceError::BadDigest {
                    reference: err_ref(),
                    source,
                })?;
            (n, Some(digest))
        }
        None => (s, None),
    };
    // A tag's ':' comes after the last '/', so a registry port is never mistaken for one.
    let last_slash = name_and_tag.rfind('/');
    let (name, tag) = match name_and_tag.rfind(':') {
        Some(colon) if last_slash.is_none_or(|sl| colon > sl) => (
            &name_and_tag[..colon],
            Some(name_and_tag[colon + 1..].to_owned()),
        ),
        _ => (name_and_tag, None),
    };
    let Some((registry, repository)) = name.split_once('/') else {
        return Err(ReferenceError::MissingRegistry(err_ref()));
    };
    if !looks_like_host(registry) {
        return Err(ReferenceError::MissingRegistry(err_ref()));
    }
    if !is_valid_host_port(registry) {
        return Err(ReferenceError::BadRegistry {
            reference: err_ref(),
            registry: registry.to_owned(),
        });
    }
    if repository.len() > 255 {
        return Err(ReferenceError::RepositoryTooLong {
            reference: err_ref(),
        });
    }
    for component in repository.split('/') {
        if !is_valid_path_component(component) {
            return Err(ReferenceError::BadRepository {
                reference: err_ref(),
                component: component.to_owned(),
            });
        }
    }
    if let Some(t) = &tag {
        if !is_valid_tag(t) {
            return Err(ReferenceError::BadTag {
                reference: err_ref(),
                tag: t.clone(),
            });
        }
    }
    let tag = if tag.is_none() && digest.is_none() {
        Some("latest".to_owned())
    } else {
        tag
    };
    Ok(RegistryReference {
        registry: registry.to_owned(),
        repository: repository.to_owned(),
        tag,
        digest,
    })
}

/// The first component is a registry when it has a dot, a port, or is `localhost`
/// (the same rule docker uses to tell `host/repo` from `user/repo`).
fn looks_like_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

fn is_valid_host_port(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        if p.parse::<u32>().map_or(true, |n| n == 0 || n > 65535) {
            return false;
        }
    }
    !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*` per the distribution reference grammar.
fn is_valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum_lower(b[0]) || !is_alnum_lower(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum_lower(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !is_alnum_lower(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum_lower(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn is_valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn reg(s: &str) -> RegistryReference {
        match parse(s).unwrap() {
            ImageReference::Registry(r) => r,
            other => panic!("{s} parsed as {other:?}"),
        }
    }

    #[test]
    fn registry_forms() {
        let r = reg(&format!("127.0.0.1:5000/team/app@sha256:{HEX}"));
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_ref().unwrap().hex(), HEX);
        assert!(matches!(r.manifest_ref(), ManifestRef::Digest(_)));

        let r = reg("registry.example.com/app:1.0-rc.1");
        assert_eq!(r.registry, "registry.example.com");
        assert_eq!(r.repository, "app");
        assert_eq!(r.tag.as_deref(), Some("1.0-rc.1"));
        assert_eq!(r.manifest_ref(), ManifestRef::Tag("1.0-rc.1".into()));

        let r = reg(&format!("localhost:5000/a/b/c:v2@sha256:{HEX}"));
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert!(r.digest.is_some());
        assert!(matches!(r.manifest_ref(), ManifestRef::Digest(_)));
        assert_eq!(
            r.to_string(),
            format!("localhost:5000/a/b/c:v2@sha256:{HEX}")
        );

        let r = reg("localhost/app");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(
            reg("docker.io/library/alpine:3").api_host(),
            "registry-1.docker.io"
        );
    }

    #[test]
    fn layout_forms() {
        assert_eq!(
            parse("oci:/tmp/layout").unwrap(),
            ImageReference::OciLayout {
                path: "/tmp/layout".into(),
                tag: None
            }
        );
        assert_eq!(
            parse("oci:/tmp/layout:v1").unwrap(),
            ImageReference::OciLayout {
                path: "/tmp/layout".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            parse("oci:./rel/dir").unwrap(),
            ImageReference::OciLayout {
                path: "./rel/dir".into(),
                tag: None
            }
        );
        assert_eq!(
            parse("docker-archive:/tmp/img.tar").unwrap(),
            ImageReference::DockerArchive {
                path: "/tmp/img.tar".into()
            }
        );
        assert!(matches!(
            parse("oci:"),
            Err(ReferenceError::MissingPath(..))
        ));
        assert!(matches!(
            parse("docker-archive:"),
            Err(ReferenceError::MissingPath(..))
        ));
    }

    #[test]
    fn refusals_name_the_problem() {
        assert_eq!(parse("  "), Err(ReferenceError::Empty));
        let e = parse("alpine:3").unwrap_err();
        assert!(matches!(e, ReferenceError::MissingRegistry(_)));
        assert!(e.to_string().contains("no registry host"));
        assert!(matches!(
            parse("library/alpine:3"),
            Err(ReferenceError::MissingRegistry(_))
        ));
        let e = parse("example.com/App:1").unwrap_err();
        assert!(
            matches!(e, ReferenceError::BadRepository { ref component, .. } if component == "App")
        );
        assert!(matches!(
            parse("example.com/a//b:1"),
            Err(ReferenceError::BadRepository { .. })
        ));
        assert!(matches!(
            parse("example.com/app:-bad"),
            Err(ReferenceError::BadTag { .. })
        ));
        assert!(matches!(
            parse("example.com:99999/app:1"),
            Err(ReferenceError::BadRegistry { .. })
        ));
        let e = parse("example.com/app@sha256:abc").unwrap_err();
        assert!(matches!(e, ReferenceError::BadDigest { .. }));
        assert!(std::error::Error::source(&e)
            .unwrap()
            .to_string()
            .contains("64 lowercase hex"));
        assert!(matches!(
            parse(&format!("example.com/app@md5:{HEX}")),
            Err(ReferenceError::BadDigest { .. })
        ));
        let long = format!("example.com/{}:1", "a".repeat(300));
        assert!(matches!(
            parse(&long),
            Err(ReferenceError::RepositoryTooLong { .. })
        ));
    }
}
