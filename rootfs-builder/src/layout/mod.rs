//! Local image sources: an OCI image layout directory (`oci:PATH[:TAG]`) and a
//! `docker save` tarball (`docker-archive:PATH`), both behind [`ImageSource`].
//!
//! Both are hostile input. Layout files are opened with `openat2(RESOLVE_BENEATH)` on the
//! layout's directory fd, so no symlink or `..` leads out of it; archive members are found
//! by their normalized names (members with `..` are refused) and read by offset from the
//! archive file, with symlinks between members resolved inside the archive only. Every
//! size is checked against its descriptor and every manifest against its digest; blob
//! digests are verified by the pipeline's sink.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;

use crate::digest::Digest;
use crate::source::{BlobSink, RawManifest};

mod docker_archive;
mod oci;

pub use docker_archive::DockerArchive;
pub use oci::OciLayout;

/// Largest index.json / manifest.json / manifest / config read into memory.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// Most members a `docker save` archive may have.
const MAX_ARCHIVE_MEMBERS: usize = 1 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// Why a local image source cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// The layout or archive cannot be opened or read.
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A file of the layout or archive is not what the OCI or Docker format says.
    #[error("{source_name}: {what}: {reason}")]
    Malformed {
        source_name: String,
        what: String,
        reason: String,
    },
    /// No image carries the tag asked for.
    #[error("{source_name}: no image tagged {tag:?} (available: {available})")]
    NoSuchTag {
        source_name: String,
        tag: String,
        available: String,
    },
    /// Several images and no tag to choose one.
    #[error("{source_name}: holds {count} images ({available}); name one with oci:PATH:TAG")]
    Ambiguous {
        source_name: String,
        count: usize,
        available: String,
    },
    /// A blob cannot be read.
    #[error("{source_name}: blob {digest}: {source}")]
    Blob {
        source_name: String,
        digest: Digest,
        #[source]
        source: io::Error,
    },
    /// A blob's size is not its descriptor's.
    #[error("{source_name}: blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        source_name: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    /// A manifest or member does not hash to its digest.
    #[error("{source_name}: {what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        source_name: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
    /// A JSON file larger than any real one.
    #[error("{source_name}: {what} is larger than {limit} bytes")]
    TooLarge {
        source_name: String,
        what: String,
        limit: u64,
    },
}

/// A descriptor in an index (only the fields we use; unknown fields are ignored).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: Option<String>,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Debug, serde::Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

fn malformed(source_name: &str, what: &str, reason: impl ToString) -> LayoutError {
    LayoutError::Malformed {
        source_name: source_name.to_owned(),
        what: what.to_owned(),
        reason: reason.to_string(),
    }
}

/// Picks the manifest for `tag` from an index: by the ref.name annotation; an empty tag
/// means "latest", or the only manifest there is.
fn select<'a>(
    index: &'a Index,
    tag: &str,
    source_name: &str,
) -> Result<&'a Descriptor, LayoutError> {
    let named = |t: &str| {
        index
            .manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME).is_some_and(|n| n == t))
    };
    let available = || {
        let names: Vec<&str> = index
            .manifests
            .iter()
            .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
            .collect();
        if names.is_empty() {
            "no tagged images".to_owned()
        } else {
            names.join(", ")
        }
    };
    if !tag.is_empty() {
        return named(tag).ok_or_else(|| LayoutError::NoSuchTag {
            source_name: source_name.to_owned(),
            tag: tag.to_owned(),
            available: available(),
        });
    }
    if let Some(d) = named("latest") {
        return Ok(d);
    }
    match index.manifests.as_slice() {
        [only] => Ok(only),
        [] => Err(malformed(source_name, "index.json", "lists no manifests")),
        many => Err(LayoutError::Ambiguous {
            source_name: source_name.to_owned(),
            count: many.len(),
            available: available(),
        }),
    }
}

fn parse_digest(s: &str, source_name: &str) -> Result<Digest, LayoutError> {
    s.parse()
        .map_err(|e| malformed(source_name, "descriptor digest", e))
}

/// Checks `bytes` against a digest and returns them as a manifest.
fn verified_manifest(
    bytes: Vec<u8>,
    expected: &Digest,
    expected_size: Option<u64>,
    media_type: Option<String>,
    source_name: &str,
) -> Result<RawManifest, LayoutError> {
    if let Some(size) = expected_size.filter(|s| *s != bytes.len() as u64) {
        return Err(LayoutError::SizeMismatch {
            source_name: source_name.to_owned(),
            digest: expected.clone(),
            expected: size,
            actual: bytes.len() as u64,
        });
    }
    let actual = Digest::of(&bytes);
    if &actual != expected {
        return Err(LayoutError::DigestMismatch {
            source_name: source_name.to_owned(),
            what: "manifest".into(),
            expected: expected.clone(),
            actual,
        });
    }
    Ok(RawManifest {
        media_type: media_type.unwrap_or_default(),
        bytes,
        digest: actual,
    })
}

/// Copies `size` bytes of a blob, from `sink.bytes_written()` on, via positioned reads.
fn copy_blob(
    read_at: &dyn Fn(&mut [u8], u64) -> io::Result<usize>,
    size: u64,
    sink: &mut dyn BlobSink,
) -> io::Result<()> {
    let mut pos = sink.bytes_written();
    if pos > size {
        return Err(io::Error::other(format!(
            "resuming at byte {pos} of a {size}-byte blob"
        )));
    }
    let mut buf = vec![0u8; 1 << 20];
    while pos < size {
        let want = buf.len().min((size - pos) as usize);
        let n = read_at(&mut buf[..want], pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob ends early",
            ));
        }
        sink.write_all(&buf[..n])?;
        pos += n as u64;
    }
    Ok(())
}
