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

/// What a manifest request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestRef {
    /// A tag: resolved once, then the pipeline pins the digest it got.
    Tag(String),
    /// A digest: the source must return bytes whose sha256 is exactly this.
    Digest(Digest),
}

/// A place images are read from. Implemented by the registry client, the OCI image layout
/// reader and the `docker save` archive reader; the pull pipeline is generic over it.
pub trait ImageSource {
    /// Each source's own error enum; the pipeline wraps it with the step that failed.
    type Error: std::error::Error + Send + Sync + 'static;

    /// A short human name for messages and progress, e.g. `127.0.0.1:5000/hello` or
    /// `oci:/path/layout`. Never contains credentials.
    fn describe(&self) -> String;

    /// Fetches the manifest or image index that `reference` names. For
    /// [`ManifestRef::Digest`] the returned bytes must hash to that digest.
    fn manifest(&self, reference: &ManifestRef) -> Result<RawManifest, Self::Error>;

    /// Streams blob `digest` (of `size` bytes per its descriptor) into `sink`, starting at
    /// `sink.bytes_written()` so an interrupted download can resume. The sink hashes and
    /// verifies; the source must never write more than `size` bytes in total.
    fn blob(&self, digest: &Digest, size: u64, sink: &mut dyn BlobSink) -> Result<(), Self::Error>;
}
