//! The layer unpacker (`unpack::unpack_layer`: tar, PAX records, whiteouts and opaque
//! directories, links, the size cap) on hostile layers, against a scratch tree made fresh
//! for every run. Two layers per run, so whiteouts and links of the second meet what the
//! first left.
//!
//! Invariant: nothing is ever written outside the tree. Beside the tree lies a sentinel
//! directory; after the run the scratch directory must hold only the tree, its side table
//! and the untouched sentinel.
//!
//! Input: 3 control bytes (the first: compression of the layers, 0 none, 1 gzip, 2 zstd
//! (mod 3); the next two, little-endian: the first layer's length), then the layers.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use fnvm_fuzz::split_control;
use fnvm_rootfs_builder::unpack::{unpack_layer, Compression, Ownership, UnpackOptions};
use libfuzzer_sys::fuzz_target;

/// The fuzzer process's base directory; each run gets a fresh `run/` in it.
fn base() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        tempfile::Builder::new()
            .prefix("fnvm-fuzz-unpack")
            .tempdir()
            .expect("scratch directory")
            .keep()
    })
}

const SENTINEL: &[u8] = b"outside the tree";

fuzz_target!(|data: &[u8]| {
    let ([kind, len_lo, len_hi], layers) = split_control::<3>(data);
    let compression = match kind % 3 {
        0 => Compression::None,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let first_len = usize::from(u16::from_le_bytes([len_lo, len_hi])).min(layers.len());
    let (first, second) = layers.split_at(first_len);

    let run = base().join("run");
    let _ = std::fs::remove_dir_all(&run);
    let root = run.join("root");
    let outside = run.join("outside");
    std::fs::create_dir_all(&root).expect("scratch tree");
    std::fs::create_dir_all(&outside).expect("sentinel directory");
    std::fs::write(outside.join("keep"), SENTINEL).expect("sentinel");

    let opts = UnpackOptions {
        // Small, so decompression bombs end fast (and the cap itself is exercised).
        max_total_bytes: 8 << 20,
        ownership: Ownership::Record,
    };
    if unpack_layer(&root, first, compression, &opts).is_ok() {
        let _ = unpack_layer(&root, second, compression, &opts);
    }

    let mut names: Vec<String> = std::fs::read_dir(&run)
        .expect("scratch directory")
        .map(|e| {
            e.expect("scratch entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert!(
        names
            .iter()
            .all(|n| n == "root" || n == "outside" || n == ".root.fnvm-unpack.json"),
        "written beside the tree: {names:?}"
    );
    let kept: Vec<_> = std::fs::read_dir(&outside)
        .expect("sentinel directory")
        .map(|e| e.expect("sentinel entry").file_name())
        .collect();
    assert_eq!(kept.len(), 1, "the sentinel directory changed: {kept:?}");
    assert_eq!(
        std::fs::read(outside.join("keep")).expect("sentinel"),
        SENTINEL
    );
    let _ = std::fs::remove_dir_all(&run);
});
