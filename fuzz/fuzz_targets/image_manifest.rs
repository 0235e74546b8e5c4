//! Manifests, indexes and image configs from a registry or an image file (`manifest::parse`
//! by declared media type or sniffed, `select_amd64`, `image_blobs`, `parse_config`), all
//! hostile JSON.
//!
//! Invariant: a document that parses re-serialises to one that parses to the same thing.
//! (The seed `seed-annotations-order` is the input that showed the annotations' key order
//! varies: a harness error, not fnvm's.)
//!
//! Input: 1 control byte (which media type the source declared), then the document.
#![no_main]

use fnvm_rootfs_builder::digest::Digest;
use fnvm_rootfs_builder::manifest::{self, Parsed};
use fnvm_rootfs_builder::source::RawManifest;
use libfuzzer_sys::fuzz_target;

const MEDIA_TYPES: &[&str] = &[
    manifest::OCI_INDEX,
    manifest::OCI_MANIFEST,
    manifest::DOCKER_LIST,
    manifest::DOCKER_MANIFEST,
    "",
    "application/json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
];

fn serialised(p: &Parsed) -> Vec<u8> {
    match p {
        Parsed::Index(i) => serde_json::to_vec(i),
        Parsed::Image(m) => serde_json::to_vec(m),
    }
    .expect("a parsed manifest serialises")
}

fn follow(owner: &Digest, p: &Parsed) {
    match p {
        Parsed::Index(index) => {
            let _ = manifest::select_amd64(owner, index);
        }
        Parsed::Image(m) => {
            if let Ok(blobs) = manifest::image_blobs(owner, m) {
                assert!(blobs.total_size < manifest::MAX_IMAGE_BYTES);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let media_type = MEDIA_TYPES[usize::from(which) % MEDIA_TYPES.len()].to_owned();
    let digest = Digest::of(bytes);
    let raw = RawManifest {
        media_type: media_type.clone(),
        bytes: bytes.to_vec(),
        digest: digest.clone(),
    };
    if let Ok(parsed) = manifest::parse(&raw) {
        follow(&digest, &parsed);
        let again_bytes = serialised(&parsed);
        let again = RawManifest {
            media_type,
            digest: Digest::of(&again_bytes),
            bytes: again_bytes.clone(),
        };
        let reparsed = manifest::parse(&again).expect("a re-serialised manifest parses");
        // Compared as JSON values: oci-spec keeps annotations in a HashMap, so the order of
        // their keys differs from one serialisation to the next.
        let value = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).expect("JSON");
        assert_eq!(value(&serialised(&reparsed)), value(&again_bytes));
    }
    // The same bytes as an image config.
    if let Ok(config) = manifest::parse_config(&digest, bytes) {
        let json = serde_json::to_vec(&config).expect("a run config serialises");
        let back: manifest::RunConfig = serde_json::from_slice(&json).expect("and parses");
        assert_eq!(back, config);
    }
});
