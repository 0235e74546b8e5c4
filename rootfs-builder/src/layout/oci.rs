//! An OCI image layout directory (`oci:PATH[:TAG]`), every file opened with
//! `openat2(RESOLVE_BENEATH)` on the layout's directory fd.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    copy_blob, malformed, parse_digest, select, verified_manifest, Index, LayoutError,
    MAX_JSON_BYTES,
};
use crate::digest::Digest;
use crate::source::{BlobSink, ImageSource, ManifestRef, RawManifest};
use crate::unpack::{open_beneath, open_dir};

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
