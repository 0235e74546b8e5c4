//! A `docker save` tarball (`docker-archive:PATH`): members found by their normalized names
//! and read by offset from the archive file, links between members resolved inside the
//! archive only; both the Docker 25+ form (an OCI layout inside) and the legacy
//! `manifest.json` form, for which an OCI manifest is made.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::{
    copy_blob, malformed, parse_digest, select, verified_manifest, Index, LayoutError,
    MAX_ARCHIVE_MEMBERS, MAX_JSON_BYTES, OCI_CONFIG, OCI_MANIFEST,
};
use crate::digest::Digest;
use crate::source::{BlobSink, ImageSource, ManifestRef, RawManifest};
use crate::unpack::Compression;

/// A member of a `docker save` archive.
#[derive(Debug, Clone)]
enum Member {
    File(FileMember),
    Symlink(String),
    Hardlink(String),
}

/// A regular-file member: where its bytes are in the archive and what they hash to.
#[derive(Debug, Clone)]
struct FileMember {
    offset: u64,
    size: u64,
    digest: Digest,
    /// The first bytes, to tell a compressed layer from a plain tar.
    head: [u8; 4],
}

/// Why a member name leads to no regular file of the archive.
#[derive(Debug, thiserror::Error)]
enum BadMember {
    /// The name itself has a `..` component.
    #[error("a name with `..`")]
    DotDotName,
    /// A hard link on the way has a `..` component.
    #[error("a hard link with `..`")]
    DotDotHardlink,
    /// A symlink on the way climbs above the archive's root.
    #[error("a symlink leading out of the archive")]
    SymlinkOutside,
    /// The name (after links) is not in the archive.
    #[error("no member {0:?}")]
    Missing(String),
    /// Links lead to links more than 16 times.
    #[error("too many links")]
    TooManyLinks,
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
                    Member::File(FileMember {
                        offset,
                        size,
                        digest: Digest::from_hasher(hasher),
                        head,
                    })
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
    fn resolve(&self, name: &str) -> Result<&FileMember, BadMember> {
        let mut name = member_name(name.as_bytes()).ok_or(BadMember::DotDotName)?;
        for _ in 0..16 {
            match self.members.get(&name) {
                Some(Member::File(file)) => return Ok(file),
                Some(Member::Hardlink(target)) => {
                    name = member_name(target.as_bytes()).ok_or(BadMember::DotDotHardlink)?;
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
                                parts.pop().ok_or(BadMember::SymlinkOutside)?;
                            }
                            c => parts.push(c),
                        }
                    }
                    name = parts.join("/");
                }
                None => return Err(BadMember::Missing(name)),
            }
        }
        Err(BadMember::TooManyLinks)
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>, LayoutError> {
        let source_name = self.describe();
        let FileMember { offset, size, .. } = *self
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
            let FileMember {
                size, digest, head, ..
            } = self
                .resolve(name)
                .map_err(|r| malformed(&source_name, name, r))?
                .clone();
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
        let FileMember {
            offset,
            size: actual,
            digest: member_digest,
            ..
        } = self
            .resolve(&member)
            .map_err(|r| blob_err(io::Error::new(io::ErrorKind::NotFound, r)))?
            .clone();
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
