//! The pull pipeline: reference → pinned digest → size limit → verified blobs in the store
//! → layers unpacked in order → read-only rootfs image, cached by manifest digest.
//!
//! Cache layout: `<home>/rootfs/<manifest-hex>/{rootfs.img,image.json}`, published by
//! renaming a complete temp directory, so a cache entry is either whole or absent. When a
//! reference resolves through an index, `<home>/rootfs/<index-hex>` is a symlink to the
//! platform manifest's entry, so pinning either digest finds it.
//!
//! A cache hit for a registry image is only handed out after the registry has accepted the
//! caller's credentials for that repository and digest: knowing a digest is not access.

mod cache;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::layout::{DockerArchive, OciLayout};
use crate::manifest::{self, BlobRef, ImageBlobs, ManifestError, Parsed, RunConfig};
use crate::reference::ImageReference;
use crate::registry::{RegistryClient, RegistryError, RegistryOptions};
use crate::rootfs::{build_rootfs_image, RootfsError};
use crate::source::{BlobSink, ImageSource, ManifestRef, RawManifest};
use crate::store::{BlobStore, StoreError};
use crate::unpack::{unpack_layer, Compression, UnpackError, UnpackOptions};
use cache::{remove_tree, write_synced, RootfsCache, IMAGE_JSON, ROOTFS_IMAGE};

/// Where in a home the pipeline keeps things.
#[derive(Debug, Clone)]
pub struct HomeDirs {
    /// The blob store root (`<home>/blobs`).
    pub blobs: PathBuf,
    /// Built rootfs images (`<home>/rootfs`).
    pub rootfs: PathBuf,
}

impl HomeDirs {
    /// The standard layout under a home directory.
    pub fn under(home: &Path) -> Self {
        Self {
            blobs: home.join("blobs"),
            rootfs: home.join("rootfs"),
        }
    }
}

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// Credentials, insecure hosts, CA file (registry references only).
    pub registry: RegistryOptions,
    /// Limits for layer unpacking (uncompressed size cap and so on).
    pub unpack: UnpackOptions,
}

/// What the pipeline reports as it goes. The CLI prints these to stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The reference was resolved to this digest (pin it).
    Resolved { digest: Digest },
    /// The rootfs was already built; nothing is downloaded or unpacked.
    CacheHit { manifest_digest: Digest },
    /// Blob `index` of `count` (the config is index 0): `done` of `total` bytes.
    Blob {
        index: usize,
        count: usize,
        digest: Digest,
        done: u64,
        total: u64,
        already_present: bool,
    },
    /// Unpacking layer `index` (1-based) of `count`.
    Unpack {
        index: usize,
        count: usize,
        digest: Digest,
    },
    /// Building the filesystem image.
    BuildImage,
}

/// What an image is, as recorded in `image.json` next to its rootfs image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    /// The reference the image was first pulled as (never contains credentials).
    pub reference: String,
    /// What the reference resolved to: pin this (an index or a manifest digest).
    pub digest: Digest,
    /// The linux/amd64 image manifest; the cache key.
    pub manifest_digest: Digest,
    pub platform: String,
    pub config_digest: Digest,
    pub layers: Vec<BlobRef>,
    /// Declared compressed bytes of config plus layers.
    pub total_size: u64,
    pub config: RunConfig,
}

/// A pulled image: its record and the path of its read-only rootfs image.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub image: ImageRecord,
    pub rootfs_image: PathBuf,
    /// True when nothing had to be downloaded or built.
    pub cache_hit: bool,
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A local image source (OCI layout, docker archive) failed at a step.
    #[error("{source_name}: {step}")]
    Source {
        source_name: String,
        step: String,
        #[source]
        source: BoxError,
    },
    /// The manifest or config is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The blob store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A layer cannot be unpacked.
    #[error("unpacking layer {index} of {count} ({digest})")]
    Unpack {
        index: usize,
        count: usize,
        digest: Digest,
        #[source]
        source: UnpackError,
    },
    /// The rootfs image cannot be built from the tree.
    #[error("building the rootfs image")]
    Rootfs(#[source] RootfsError),
    /// The rootfs cache cannot be read or written.
    #[error("rootfs cache {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An index that points at indexes, deeper than any real image.
    #[error("{0}: an image index nests more than {1} levels deep")]
    IndexTooDeep(Digest, usize),
}

impl PullError {
    /// The registry error underneath, if any (e.g. to tell an auth failure apart).
    pub fn registry_error(&self) -> Option<&RegistryError> {
        match self {
            PullError::Registry(e) => Some(e),
            PullError::Source { source, .. } => source.downcast_ref::<RegistryError>(),
            _ => None,
        }
    }
}

fn cache_err(path: &Path) -> impl FnOnce(io::Error) -> PullError + '_ {
    move |source| PullError::Cache {
        path: path.to_owned(),
        source,
    }
}

/// Pulls `reference` into the home's store and rootfs cache.
pub fn pull(
    reference: &ImageReference,
    dirs: &HomeDirs,
    options: &PullOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<PulledImage, PullError> {
    run(reference, dirs, options, progress, Goal::Rootfs)
}

/// Resolves `reference` and reads its config (fetching only manifests and the config
/// blob), for `fnvm image inspect`.
pub fn inspect(
    reference: &ImageReference,
    dirs: &HomeDirs,
    options: &PullOptions,
) -> Result<ImageRecord, PullError> {
    run(reference, dirs, options, &mut |_| {}, Goal::Inspect).map(|p| p.image)
}

/// Removes what pulls of dead processes left in the home: rootfs staging directories (a
/// half-built tree and image can be hundreds of MB) and partial blob downloads. Anything of a
/// live process stays, so this is safe beside a running `fnvm run` or pull. `fnvm serve` and
/// `fnvm run` call it as they start, rather than leaving it to the next pull.
pub fn remove_stale_temporaries(dirs: &HomeDirs) -> Result<(), PullError> {
    RootfsCache::open(&dirs.rootfs)?;
    BlobStore::open(&dirs.blobs)?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Goal {
    Rootfs,
    Inspect,
}

fn run(
    reference: &ImageReference,
    dirs: &HomeDirs,
    options: &PullOptions,
    progress: &mut dyn FnMut(Progress),
    goal: Goal,
) -> Result<PulledImage, PullError> {
    let cache = RootfsCache::open(&dirs.rootfs)?;
    let store = BlobStore::open(&dirs.blobs)?;
    let shown = reference.to_string();
    match reference {
        ImageReference::Registry(r) => {
            let client = RegistryClient::new(r, &options.registry)?;
            // Authenticate first, so wrong credentials fail fast and clearly.
            client.ping()?;
            if let ManifestRef::Digest(d) = r.manifest_ref() {
                if let Some(hit) = cache.lookup(&d)? {
                    client.check_manifest_access(&d)?;
                    progress(Progress::Resolved { digest: d });
                    progress(Progress::CacheHit {
                        manifest_digest: hit.image.manifest_digest.clone(),
                    });
                    return Ok(hit);
                }
            }
            // A tag resolves with the caller's credentials, which also authorizes a hit.
            let top = client.manifest(&r.manifest_ref())?;
            Pipeline::new(&client, &store, &cache, options, &shown).run(top, progress, goal)
        }
        ImageReference::OciLayout { path, tag } => {
            let source = OciLayout::open(path).map_err(|e| source_err(&shown, "open", e))?;
            let mref = ManifestRef::Tag(tag.clone().unwrap_or_default());
            let top = source
                .manifest(&mref)
                .map_err(|e| source_err(&shown, "read the manifest", e))?;
            Pipeline::new(&source, &store, &cache, options, &shown).run(top, progress, goal)
        }
        ImageReference::DockerArchive { path } => {
            let source = DockerArchive::open(path).map_err(|e| source_err(&shown, "open", e))?;
            let top = source
                .manifest(&ManifestRef::Tag(String::new()))
                .map_err(|e| source_err(&shown, "read the manifest", e))?;
            Pipeline::new(&source, &store, &cache, options, &shown).run(top, progress, goal)
        }
    }
}

fn source_err(
    name: &str,
    step: &str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> PullError {
    PullError::Source {
        source_name: name.to_owned(),
        step: step.to_owned(),
        source: Box::new(e),
    }
}

/// One pull from one source.
struct Pipeline<'a, S: ImageSource> {
    source: &'a S,
    store: &'a BlobStore,
    cache: &'a RootfsCache,
    options: &'a PullOptions,
    reference: &'a str,
}

/// How deep an index may point to further indexes.
const MAX_INDEX_DEPTH: usize = 2;

impl<'a, S: ImageSource> Pipeline<'a, S> {
    fn new(
        source: &'a S,
        store: &'a BlobStore,
        cache: &'a RootfsCache,
        options: &'a PullOptions,
        reference: &'a str,
    ) -> Self {
        Self {
            source,
            store,
            cache,
            options,
            reference,
        }
    }

    fn err(&self, step: String) -> impl FnOnce(S::Error) -> PullError + '_ {
        move |e| PullError::Source {
            source_name: self.source.describe(),
            step,
            source: Box::new(e),
        }
    }

    fn run(
        &self,
        top: RawManifest,
        progress: &mut dyn FnMut(Progress),
        goal: Goal,
    ) -> Result<PulledImage, PullError> {
        let pinned = top.digest.clone();
        progress(Progress::Resolved {
            digest: pinned.clone(),
        });
        if let Some(hit) = self.cache.lookup(&pinned)? {
            progress(Progress::CacheHit {
                manifest_digest: hit.image.manifest_digest.clone(),
            });
            return Ok(hit);
        }
        // Walk index → linux/amd64 manifest.
        let mut raw = top;
        let mut depth = 0;
        let image_manifest = loop {
            match manifest::parse(&raw)? {
                Parsed::Image(m) => break m,
                Parsed::Index(index) => {
                    depth += 1;
                    if depth > MAX_INDEX_DEPTH {
                        return Err(PullError::IndexTooDeep(pinned, MAX_INDEX_DEPTH));
                    }
                    let chosen = manifest::select_amd64(&raw.digest, &index)?;
                    raw = self
                        .source
                        .manifest(&ManifestRef::Digest(chosen.digest.clone()))
                        .map_err(self.err(format!("manifest {}", chosen.digest)))?;
                }
            }
        };
        let manifest_digest = raw.digest.clone();
        if let Some(hit) = self.cache.lookup(&manifest_digest)? {
            self.cache.alias(&pinned, &manifest_digest)?;
            progress(Progress::CacheHit {
                manifest_digest: manifest_digest.clone(),
            });
            return Ok(hit);
        }
        // The size limit is applied from declared sizes, before any blob is fetched.
        let blobs = manifest::image_blobs(&manifest_digest, &image_manifest)?;
        let count = blobs.layers.len() + 1;
        self.fetch(0, count, &blobs.config, progress)?;
        let config_bytes = self
            .store
            .read_small(&blobs.config.digest, manifest::MAX_CONFIG_BYTES)?;
        let config = manifest::parse_config(&blobs.config.digest, &config_bytes)?;
        let record = ImageRecord {
            reference: self.reference.to_owned(),
            digest: pinned.clone(),
            manifest_digest: manifest_digest.clone(),
            platform: "linux/amd64".to_owned(),
            config_digest: blobs.config.digest.clone(),
            layers: blobs.layers.clone(),
            total_size: blobs.total_size,
            config,
        };
        if goal == Goal::Inspect {
            return Ok(PulledImage {
                image: record,
                rootfs_image: PathBuf::new(),
                cache_hit: false,
            });
        }
        for (i, layer) in blobs.layers.iter().enumerate() {
            self.fetch(i + 1, count, layer, progress)?;
        }
        let pulled = self.build(record, &blobs, progress)?;
        if pinned != manifest_digest {
            self.cache.alias(&pinned, &manifest_digest)?;
        }
        Ok(pulled)
    }

    /// Fetches one blob into the store unless it is already there.
    fn fetch(
        &self,
        index: usize,
        count: usize,
        blob: &BlobRef,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<(), PullError> {
        let report = |done: u64, present: bool| Progress::Blob {
            index,
            count,
            digest: blob.digest.clone(),
            done,
            total: blob.size,
            already_present: present,
        };
        if self.store.contains(&blob.digest, blob.size) {
            progress(report(blob.size, true));
            return Ok(());
        }
        let mut ingest = self.store.ingest(&blob.digest, blob.size)?;
        {
            let mut sink = ProgressSink {
                inner: &mut ingest,
                on_bytes: &mut |done| progress(report(done, false)),
                last_reported: 0,
            };
            self.source
                .blob(&blob.digest, blob.size, &mut sink)
                .map_err(self.err(format!("blob {}", blob.digest)))?;
        }
        ingest.commit()?;
        progress(report(blob.size, false));
        Ok(())
    }

    /// Unpacks the layers in order and builds the image in a temp dir, then publishes it.
    fn build(
        &self,
        record: ImageRecord,
        blobs: &ImageBlobs,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<PulledImage, PullError> {
        let staging = self.cache.staging(&record.manifest_digest)?;
        let tree = staging.path.join("tree");
        fs::create_dir(&tree).map_err(cache_err(&tree))?;
        let count = blobs.layers.len();
        for (i, layer) in blobs.layers.iter().enumerate() {
            progress(Progress::Unpack {
                index: i + 1,
                count,
                digest: layer.digest.clone(),
            });
            let wrap = |source| PullError::Unpack {
                index: i + 1,
                count,
                digest: layer.digest.clone(),
                source,
            };
            let compression = Compression::from_media_type(&layer.media_type).map_err(wrap)?;
            let file = self.store.open_blob(&layer.digest)?;
            unpack_layer(
                &tree,
                io::BufReader::with_capacity(256 * 1024, file),
                compression,
                &self.options.unpack,
            )
            .map_err(wrap)?;
        }
        progress(Progress::BuildImage);
        let image = staging.path.join(ROOTFS_IMAGE);
        build_rootfs_image(&tree, &image).map_err(PullError::Rootfs)?;
        // The unpacker's side table lives beside the tree; it is not part of the entry.
        if let Ok(side_table) = crate::unpack::state::state_path(&tree) {
            let _ = fs::remove_file(side_table);
        }
        remove_tree(&tree).map_err(cache_err(&tree))?;
        let json = serde_json::to_vec_pretty(&record).map_err(|e| PullError::Cache {
            path: staging.path.join(IMAGE_JSON),
            source: io::Error::other(e),
        })?;
        write_synced(&staging.path.join(IMAGE_JSON), &json)?;
        self.cache.publish(staging, &record.manifest_digest)?;
        let hit = self
            .cache
            .lookup(&record.manifest_digest)?
            .ok_or_else(|| PullError::Cache {
                path: self.cache.dir.join(record.manifest_digest.hex()),
                source: io::Error::other("cache entry vanished right after it was published"),
            })?;
        Ok(PulledImage {
            cache_hit: false,
            ..hit
        })
    }
}

/// Reports bytes as they reach the store, at most every 1 MiB.
struct ProgressSink<'a> {
    inner: &'a mut dyn BlobSink,
    on_bytes: &'a mut dyn FnMut(u64),
    last_reported: u64,
}

impl Write for ProgressSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        let done = self.inner.bytes_written();
        if done - self.last_reported >= 1 << 20 {
            self.last_reported = done;
            (self.on_bytes)(done);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl BlobSink for ProgressSink<'_> {
    fn bytes_written(&self) -> u64 {
        self.inner.bytes_written()
    }
}
