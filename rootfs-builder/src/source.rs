//! Where images come from: a registry, an OCI image layout directory or a `docker save`
//! tarball. The pipeline is written once against [`ImageSource`].

use std::io::Write;

use crate::digest::Digest;

/// A manifest or index as fetched, before it is parsed.
#[derive(Debug, Clone)]
pub struct RawManifest {
    /// The media type the source declared (Content-Type, the index descriptor, ...).
    pub media_type: String,
    /// The exact bytes, whose sha256 is the manifest digest.
    pub bytes: Vec<u8>,
    /// sha256 of `bytes`, computed locally, never taken from a server header.
    pub digest: Digest,
}

/// Where a blob's bytes go while they are fetched. Implemented by the blob store's ingest
/// writer, which hashes and counts as it writes.
pub trait BlobSink: Write {
    /// Bytes accepted so far: a resumed download asks the source for the rest from here.
    fn bytes_written(&self) -> u64;
}
