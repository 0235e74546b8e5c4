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
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::source::{BlobSink, ImageSource, ManifestRef, RawManifest};
use crate::unpack::{open_beneath, open_dir, Compression};

/// Largest index.json / manifest.json / manifest / config read into memory.
const MAX_JSON_BYTES: u64 = 4 << 20;
/// Most members a `docker save` archive may have.
const MAX_ARCHIVE_MEMBERS: usize = 1 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{source_name}: {what}: {reason}")]
    Malformed {
        source_name: String,
        what: String,
        reason: String,
    },
    #[error("{source_name}: no image tagged {tag:?} (available: {available})")]
    NoSuchTag {
        source_name: String,
        tag: String,
        available: String,
    },
    #[error("{source_name}: holds {count} images ({available}); name one with oci:PATH:TAG")]
    Ambiguous {
        source_name: String,
        count: usize,
        available: String,
    },
    #[error("{source_name}: blob {digest}: {source}")]
    Blob {
        source_name: String,
        digest: Digest,
        #[source]
        source: io::Error,
    },
    #[error("{source_name}: blob {digest} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        source_name: String,
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("{source_name}: {what} has digest {actual}, expected {expected}")]
    DigestMismatch {
        source_name: String,
        what: String,
        expected: Digest,
        actual: Digest,
    },
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

/// An OCI image layout directory.
#[derive(Debug)]
pub struct OciLayout {
    path: PathBuf,
    dir: OwnedFd,
    index: Index,
}

impl OciLayout {
    /// Opens the layout at `path` and reads its `oci-layout` and `index.json`.
    pub fn open(path: &Path) -> Result<Self, LayoutError> {
        let dir = open_dir(path).map_err(|source| LayoutError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut layout = Self {
            path: path.to_owned(),
            dir,
            index: Index { manifests: vec![] },
        };
        let marker = layout.read_small("oci-layout")?;
        let marker: serde_json::Value = serde_json::from_slice(&marker)
            .map_err(|e| malformed(&layout.describe(), "oci-layout", e))?;
        if marker
            .get("imageLayoutVersion")
            .and_then(|v| v.as_str())
            .is_none()
        {
            return Err(malformed(
                &layout.describe(),
                "oci-layout",
                "no imageLayoutVersion: not an OCI image layout",
            ));
        }
        let index = layout.read_small("index.json")?;
        layout.index = serde_json::from_slice(&index)
            .map_err(|e| malformed(&layout.describe(), "index.json", e))?;
        Ok(layout)
    }

    fn open_file(&self, rel: &str) -> io::Result<File> {
        let fd = open_beneath(self.dir.as_raw_fd(), rel.as_bytes(), libc::O_RDONLY)?;
        let file = File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        Ok(file)
    }

    fn read_small(&self, rel: &str) -> Result<Vec<u8>, LayoutError> {
        let open_err = |source| LayoutError::Open {
            path: self.path.join(rel),
            source,
        };
        let file = self.open_file(rel).map_err(open_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(open_err)?;
        if bytes.len() as u64 > MAX_JSON_BYTES {
            return Err(LayoutError::TooLarge {
                source_name: self.describe(),
                what: rel.to_owned(),
                limit: MAX_JSON_BYTES,
            });
        }
        Ok(bytes)
    }

    fn blob_path(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }
}

impl ImageSource for OciLayout {
    type Error = LayoutError;

    fn describe(&self) -> String {
        format!("oci:{}", self.path.display())
    }

    fn manifest(&self, reference: &ManifestRef) -> Result<RawManifest, LayoutError> {
        let name = self.describe();
        let (digest, size, media_type) = match reference {
            ManifestRef::Tag(tag) => {
                let d = select(&self.index, tag, &name)?;
                (
                    parse_digest(&d.digest, &name)?,
                    Some(d.size),
                    d.media_type.clone(),
                )
            }
            ManifestRef::Digest(d) => {
                let listed = self
                    .index
                    .manifests
                    .iter()
                    .find(|m| m.digest == d.to_string());
                (
                    d.clone(),
                    listed.map(|m| m.size),
                    listed.and_then(|m| m.media_type.clone()),
                )
            }
        };
        let bytes = self.read_small(&Self::blob_path(&digest))?;
        verified_manifest(bytes, &digest, size, media_type, &name)
    }

    fn blob(&self, digest: &Digest, size: u64, sink: &mut dyn BlobSink) -> Result<(), LayoutError> {
        let blob_err = |source| LayoutError::Blob {
            source_name: self.describe(),
            digest: digest.clone(),
            source,
        };
        let file = self.open_file(&Self::blob_path(digest)).map_err(blob_err)?;
        let actual = file.metadata().map_err(blob_err)?.len();
        if actual != size {
            return Err(LayoutError::SizeMismatch {
                source_name: self.describe(),
                digest: digest.clone(),
                expected: size,
                actual,
            });
        }
        copy_blob(&|buf, pos| file.read_at(buf, pos), size, sink).map_err(blob_err)
    }
}

/// A member of a `docker save` archive.
#[derive(Debug, Clone)]
enum Member {
    File {
        offset: u64,
        size: u64,
        digest: Digest,
        /// The first bytes, to tell a compressed layer from a plain tar.
        head: [u8; 4],
    },
    Symlink(String),
    Hardlink(String),
}

/// What the archive's image is made of.
#[derive(Debug)]
enum ArchiveKind {
    /// Docker 25+: an OCI layout inside the tarball.
    Oci(Index),
    /// The legacy `manifest.json` form, with an OCI manifest made from it.
    Legacy {
        manifest: Vec<u8>,
        digest: Digest,
        /// Blob digest → member name.
        blobs: HashMap<Digest, String>,
    },
}

/// A `docker save` tarball.
#[derive(Debug)]
pub struct DockerArchive {
    path: PathBuf,
    file: File,
    members: HashMap<String, Member>,
    kind: ArchiveKind,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct LegacyImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OutDescriptor {
    media_type: &'static str,
    digest: String,
    size: u64,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct OutManifest {
    schema_version: u32,
    media_type: &'static str,
    config: OutDescriptor,
    layers: Vec<OutDescriptor>,
}

/// Member names: `./` and empty components dropped; `..` refused.
fn member_name(raw: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(raw).ok()?;
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

impl DockerArchive {
    /// Reads the archive's member list (hashing each member once) and its manifests.
    pub fn open(path: &Path) -> Result<Self, LayoutError> {
        let open_err = |source| LayoutError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        if !file.metadata().map_err(open_err)?.is_file() {
            return Err(open_err(io::Error::other("not a regular file")));
        }
        let source_name = format!("docker-archive:{}", path.display());
        let members = Self::scan(&file, &source_name).map_err(open_err)?;
        let mut archive = Self {
            path: path.to_owned(),
            file,
            members,
            kind: ArchiveKind::Oci(Index { manifests: vec![] }),
        };
        archive.kind = if archive.members.contains_key("index.json")
            && archive.members.contains_key("oci-layout")
        {
            let index = archive.read_small("index.json")?;
            ArchiveKind::Oci(
                serde_json::from_slice(&index)
                    .map_err(|e| malformed(&source_name, "index.json", e))?,
            )
        } else {
            archive.legacy()?
        };
        Ok(archive)
    }

    fn scan(file: &File, source_name: &str) -> io::Result<HashMap<String, Member>> {
        let mut members = HashMap::new();
        let mut tar = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
        let mut buf = vec![0u8; 1 << 20];
        for entry in tar.entries()? {
            let mut entry = entry?;
            if members.len() >= MAX_ARCHIVE_MEMBERS {
                return Err(io::Error::other(format!(
                    "{source_name}: more than {MAX_ARCHIVE_MEMBERS} members"
                )));
            }
            let Some(name) = member_name(&entry.path_bytes()) else {
                return Err(io::Error::other(format!(
                    "{source_name}: member {:?} has a `..` component or is not UTF-8",
                    String::from_utf8_lossy(&entry.path_bytes())
                )));
            };
            let link = || {
                entry
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default()
            };
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let offset = entry.raw_file_position();
                    let size = entry.size();
                    let mut hasher = Sha256::new();
                    let mut head = [0u8; 4];
                    let mut seen = 0usize;
                    loop {
                        let n = entry.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        if seen < 4 {
                            let take = (4 - seen).min(n);
                            head[seen..seen + take].copy_from_slice(&buf[..take]);
                            seen += take;
                        }
                        hasher.update(&buf[..n]);
                    }
                    Member::File {
                        offset,
                        size,
                        digest: Digest::from_hasher(hasher),
                        head,
                    }
                }
                tar::EntryType::Symlink => Member::Symlink(link()),
                tar::EntryType::Link => Member::Hardlink(link()),
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(members)
    }

    /// The regular-file member `name` refers to, following links inside the archive only.
    fn resolve(&self, name: &str) -> Result<(u64, u64, Digest, [u8; 4]), String> {
        let mut name = member_name(name.as_bytes()).ok_or("a name with `..`")?;
        for _ in 0..16 {
            match self.members.get(&name) {
                Some(Member::File {
                    offset,
                    size,
                    digest,
                    head,
                }) => return Ok((*offset, *size, digest.clone(), *head)),
                Some(Member::Hardlink(target)) => {
                    name = member_name(target.as_bytes()).ok_or("a hard link with `..`")?;
                }
                Some(Member::Symlink(target)) => {
                    // Relative to the link's directory, never above the archive root.
                    let base = name.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                    let joined = if target.starts_with('/') {
                        target.clone()
                    } else {
                        format!("{base}/{target}")
                    };
                    let mut parts: Vec<&str> = Vec::new();
                    for c in joined.split('/') {
                        match c {
                            "" | "." => {}
                            ".." => {
                                parts.pop().ok_or("a symlink leading out of the archive")?;
                            }
                            c => parts.push(c),
                        }
                    }
                    name = parts.join("/");
                }
                None => return Err(format!("no member {name:?}")),
            }
        }
        Err("too many links".into())
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, LayoutError> {
        let source_name = self.describe();
        let (offset, size, _, _) = self
            .resolve(name)
            .map_err(|r| malformed(&source_name, name, r))?;
        if size > MAX_JSON_BYTES {
            return Err(LayoutError::TooLarge {
                source_name,
                what: name.to_owned(),
                limit: MAX_JSON_BYTES,
            });
        }
        let mut bytes = vec![0u8; size as usize];
        self.file
            .read_exact_at(&mut bytes, offset)
            .map_err(|source| LayoutError::Open {
                path: self.path.clone(),
                source,
            })?;
        Ok(bytes)
    }

    /// Builds an OCI manifest from the legacy `manifest.json`: config and layer digests are
    /// the sha256 of those members.
    fn legacy(&self) -> Result<ArchiveKind, LayoutError> {
        let source_name = self.describe();
        let json = self.read_small("manifest.json")?;
        let images: Vec<LegacyImage> = serde_json::from_slice(&json)
            .map_err(|e| malformed(&source_name, "manifest.json", e))?;
        let image = match images.as_slice() {
            [only] => only,
            [] => return Err(malformed(&source_name, "manifest.json", "lists no images")),
            many => {
                let tags: Vec<String> = many
                    .iter()
                    .flat_map(|i| i.repo_tags.clone().unwrap_or_default())
                    .collect();
                return Err(LayoutError::Ambiguous {
                    source_name,
                    count: many.len(),
                    available: tags.join(", "),
                });
            }
        };
        let mut blobs = HashMap::new();
        let mut describe = |name: &str, media_type: Option<&'static str>| {
            let (_, size, digest, head) = self
                .resolve(name)
                .map_err(|r| malformed(&source_name, name, r))?;
            blobs.insert(digest.clone(), name.to_owned());
            Ok::<_, LayoutError>(OutDescriptor {
                media_type: media_type
                    .unwrap_or_else(|| Compression::sniff(&head).oci_media_type()),
                digest: digest.to_string(),
                size,
            })
        };
        let config = describe(&image.config, Some(OCI_CONFIG))?;
        let layers = image
            .layers
            .iter()
            .map(|l| describe(l, None))
            .collect::<Result<Vec<_>, _>>()?;
        let manifest = serde_json::to_vec(&OutManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST,
            config,
            layers,
        })
        .map_err(|e| malformed(&self.describe(), "synthesized manifest", e))?;
        Ok(ArchiveKind::Legacy {
            digest: Digest::of(&manifest),
            manifest,
            blobs,
        })
    }

    /// The member holding blob `digest`.
    fn blob_member(&self, digest: &Digest) -> Option<String> {
        match &self.kind {
            ArchiveKind::Oci(_) => Some(format!("blobs/sha256/{}", digest.hex())),
            ArchiveKind::Legacy { blobs, .. } => blobs.get(digest).cloned(),
        }
    }
}

impl ImageSource for DockerArchive {
    type Error = LayoutError;

    fn describe(&self) -> String {
        format!("docker-archive:{}", self.path.display())
    }

    fn manifest(&self, reference: &ManifestRef) -> Result<RawManifest, LayoutError> {
        let name = self.describe();
        match (&self.kind, reference) {
            (
                ArchiveKind::Legacy {
                    manifest, digest, ..
                },
                ManifestRef::Tag(_),
            ) => Ok(RawManifest {
                media_type: OCI_MANIFEST.to_owned(),
                bytes: manifest.clone(),
                digest: digest.clone(),
            }),
            (
                ArchiveKind::Legacy {
                    manifest, digest, ..
                },
                ManifestRef::Digest(d),
            ) => {
                if d != digest {
                    return Err(malformed(
                        &name,
                        &format!("manifest {d}"),
                        "not in this archive",
                    ));
                }
                Ok(RawManifest {
                    media_type: OCI_MANIFEST.to_owned(),
                    bytes: manifest.clone(),
                    digest: digest.clone(),
                })
            }
            (ArchiveKind::Oci(index), reference) => {
                let (digest, size, media_type) = match reference {
                    ManifestRef::Tag(tag) => {
                        let d = select(index, tag, &name)?;
                        (
                            parse_digest(&d.digest, &name)?,
                            Some(d.size),
                            d.media_type.clone(),
                        )
                    }
                    ManifestRef::Digest(d) => (d.clone(), None, None),
                };
                let member = format!("blobs/sha256/{}", digest.hex());
                let bytes = self.read_small(&member)?;
                verified_manifest(bytes, &digest, size, media_type, &name)
            }
        }
    }

    fn blob(&self, digest: &Digest, size: u64, sink: &mut dyn BlobSink) -> Result<(), LayoutError> {
        let blob_err = |source| LayoutError::Blob {
            source_name: self.describe(),
            digest: digest.clone(),
            source,
        };
        let member = self.blob_member(digest).ok_or_else(|| {
            blob_err(io::Error::new(
                io::ErrorKind::NotFound,
                "not in this archive",
            ))
        })?;
        let (offset, actual, member_digest, _) = self
            .resolve(&member)
            .map_err(|r| blob_err(io::Error::new(io::ErrorKind::NotFound, r)))?;
        if actual != size {
            return Err(LayoutError::SizeMismatch {
                source_name: self.describe(),
                digest: digest.clone(),
                expected: size,
                actual,
            });
        }
        if &member_digest != digest {
            return Err(LayoutError::DigestMismatch {
                source_name: self.describe(),
                what: format!("member {member}"),
                expected: digest.clone(),
                actual: member_digest,
            });
        }
        copy_blob(&|buf, pos| self.file.read_at(buf, offset + pos), size, sink).map_err(blob_err)
    }
}
