//! `oci:` layouts and `docker-archive:` tarballs built here: manifests and blobs come back
//! verified, tags select the right image, hostile layouts and archives are refused, and the
//! layers read from them unpack into the expected tree.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use fnvm_rootfs_builder::digest::Digest;
use fnvm_rootfs_builder::layout::{DockerArchive, LayoutError, OciLayout};
use fnvm_rootfs_builder::manifest::{self, Parsed};
use fnvm_rootfs_builder::source::{BlobSink, ImageSource, ManifestRef};
use fnvm_rootfs_builder::unpack::{unpack_layer, Compression, UnpackOptions};

/// A blob sink that keeps the bytes (and can start part-way, as a resumed download).
#[derive(Default)]
struct VecSink(Vec<u8>);

impl Write for VecSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BlobSink for VecSink {
    fn bytes_written(&self) -> u64 {
        self.0.len() as u64
    }
}

fn fetch<S: ImageSource>(source: &S, digest: &Digest, size: u64) -> Vec<u8> {
    let mut sink = VecSink::default();
    source.blob(digest, size, &mut sink).unwrap();
    assert_eq!(&Digest::of(&sink.0), digest, "blob verifies");
    sink.0
}

/// A one-file layer tar.
fn layer_tar(name: &str, content: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, content.as_bytes()).unwrap();
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

const CONFIG: &str = r#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/hello"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;

struct Blob {
    digest: Digest,
    size: u64,
}

fn put_blob(layout: &Path, bytes: &[u8]) -> Blob {
    let digest = Digest::of(bytes);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(digest.hex()), bytes).unwrap();
    Blob {
        digest,
        size: bytes.len() as u64,
    }
}

fn manifest_json(config: &Blob, layers: &[(&Blob, &str)]) -> Vec<u8> {
    let layers: Vec<serde_json::Value> = layers
        .iter()
        .map(|(b, mt)| serde_json::json!({"mediaType": mt, "digest": b.digest.to_string(), "size": b.size}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest.to_string(), "size": config.size},
        "layers": layers,
    }))
    .unwrap()
}

/// An OCI layout holding two images: `latest` (two gzip layers) and `v1` (one plain layer).
fn build_layout(dir: &Path) -> (Blob, Blob) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let config = put_blob(dir, CONFIG.as_bytes());
    let l1 = put_blob(dir, &gzip(&layer_tar("hello", "from layer one")));
    let l2 = put_blob(dir, &gzip(&layer_tar("etc/motd", "two")));
    let l3 = put_blob(dir, &layer_tar("v1", "plain"));
    let gz = "application/vnd.oci.image.layer.v1.tar+gzip";
    let latest = put_blob(dir, &manifest_json(&config, &[(&l1, gz), (&l2, gz)]));
    let v1 = put_blob(
        dir,
        &manifest_json(&config, &[(&l3, "application/vnd.oci.image.layer.v1.tar")]),
    );
    let entry = |b: &Blob, tag: &str| serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": b.digest.to_string(), "size": b.size, "annotations": {"org.opencontainers.image.ref.name": tag}});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [entry(&v1, "v1"), entry(&latest, "latest")]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    (latest, v1)
}

/// Reads every layer of the image `reference` names from `source` and unpacks them in order.
fn unpack_image<S: ImageSource>(source: &S, reference: &ManifestRef, dest: &Path) -> Digest {
    let raw = source.manifest(reference).unwrap();
    let Parsed::Image(m) = manifest::parse(&raw).unwrap() else {
        panic!("expected an image manifest");
    };
    let config = m.config();
    let config_bytes = fetch(
        source,
        &config.digest().to_string().parse().unwrap(),
        config.size(),
    );
    assert!(String::from_utf8_lossy(&config_bytes).contains("amd64"));
    fs::create_dir_all(dest).unwrap();
    for layer in m.layers() {
        let digest: Digest = layer.digest().to_string().parse().unwrap();
        let bytes = fetch(source, &digest, layer.size());
        let compression = Compression::from_media_type(layer.media_type().as_ref()).unwrap();
        unpack_layer(
            dest,
            bytes.as_slice(),
            compression,
            &UnpackOptions::default(),
        )
        .unwrap();
    }
    raw.digest
}

#[test]
fn oci_layout_selects_by_tag_and_serves_verified_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let (latest, v1) = build_layout(&dir);
    let layout = OciLayout::open(&dir).unwrap();
    assert!(layout.describe().starts_with("oci:"));

    // Default: "latest".
    let tree = tmp.path().join("latest");
    let got = unpack_image(&layout, &ManifestRef::Tag(String::new()), &tree);
    assert_eq!(got, latest.digest);
    assert_eq!(
        fs::read_to_string(tree.join("hello")).unwrap(),
        "from layer one"
    );
    assert_eq!(fs::read_to_string(tree.join("etc/motd")).unwrap(), "two");

    let tree = tmp.path().join("v1");
    assert_eq!(
        unpack_image(&layout, &ManifestRef::Tag("v1".into()), &tree),
        v1.digest
    );
    assert_eq!(fs::read_to_string(tree.join("v1")).unwrap(), "plain");

    // By digest.
    let raw = layout
        .manifest(&ManifestRef::Digest(v1.digest.clone()))
        .unwrap();
    assert_eq!(raw.digest, v1.digest);

    // Unknown tag: the error names it and lists what there is.
    let err = layout
        .manifest(&ManifestRef::Tag("nope".into()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("nope") && err.contains("v1") && err.contains("latest"),
        "{err}"
    );

    // A resumed fetch gets the rest only.
    let config = fs::read(
        dir.join("blobs/sha256")
            .join(Digest::of(CONFIG.as_bytes()).hex()),
    )
    .unwrap();
    let mut sink = VecSink(config[..10].to_vec());
    layout
        .blob(
            &Digest::of(CONFIG.as_bytes()),
            config.len() as u64,
            &mut sink,
        )
        .unwrap();
    assert_eq!(sink.0, config);
}

#[test]
fn oci_layout_refuses_tampering_and_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let (latest, v1) = build_layout(&dir);
    // A manifest whose bytes no longer match its digest.
    let path = dir.join("blobs/sha256").join(v1.digest.hex());
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] = b' ';
    fs::write(&path, &bytes).unwrap();
    let layout = OciLayout::open(&dir).unwrap();
    let err = layout.manifest(&ManifestRef::Tag("v1".into())).unwrap_err();
    assert!(matches!(err, LayoutError::DigestMismatch { .. }), "{err}");
    // A blob replaced by a symlink to a file outside the layout.
    let outside = tmp.path().join("outside");
    fs::write(&outside, CONFIG).unwrap();
    let config = Digest::of(CONFIG.as_bytes());
    let blob = dir.join("blobs/sha256").join(config.hex());
    fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink(&outside, &blob).unwrap();
    let mut sink = VecSink::default();
    let err = layout
        .blob(&config, CONFIG.len() as u64, &mut sink)
        .unwrap_err();
    assert!(matches!(err, LayoutError::Blob { .. }), "{err}");
    assert!(sink.0.is_empty());
    // A blob whose size differs from its descriptor.
    let raw = layout
        .manifest(&ManifestRef::Digest(latest.digest.clone()))
        .unwrap();
    let Parsed::Image(m) = manifest::parse(&raw).unwrap() else {
        panic!()
    };
    let layer = &m.layers()[0];
    let digest: Digest = layer.digest().to_string().parse().unwrap();
    let err = layout
        .blob(&digest, layer.size() + 1, &mut VecSink::default())
        .unwrap_err();
    assert!(matches!(err, LayoutError::SizeMismatch { .. }), "{err}");
    // Not a layout at all.
    let err = OciLayout::open(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("oci-layout"), "{err}");
}

/// Appends a member to an archive under construction.
fn member(b: &mut tar::Builder<Vec<u8>>, name: &str, bytes: &[u8]) {
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, bytes).unwrap();
}

fn symlink_member(b: &mut tar::Builder<Vec<u8>>, name: &str, target: &str) {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    let link = &mut h.as_old_mut().linkname;
    link[..target.len()].copy_from_slice(target.as_bytes());
    b.append_data(&mut h, name, io::empty()).unwrap();
}

/// The legacy `docker save` form: manifest.json, `<id>.json`, `<id>/layer.tar`; a repeated
/// layer is a symlink to the first copy, as docker writes it.
#[test]
fn legacy_docker_archive_gets_a_synthesized_verified_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let l1 = layer_tar("hello", "legacy one");
    let l2 = layer_tar("etc/motd", "legacy two");
    let mut b = tar::Builder::new(Vec::new());
    member(&mut b, "aaaa/layer.tar", &l1);
    member(&mut b, "bbbb/layer.tar", &l2);
    symlink_member(&mut b, "cccc/layer.tar", "../aaaa/layer.tar");
    member(&mut b, "deadbeef.json", CONFIG.as_bytes());
    member(
        &mut b,
        "manifest.json",
        br#"[{"Config":"deadbeef.json","RepoTags":["hello:latest"],"Layers":["aaaa/layer.tar","bbbb/layer.tar","cccc/layer.tar"]}]"#,
    );
    let path = tmp.path().join("image.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();

    let archive = DockerArchive::open(&path).unwrap();
    assert!(archive.describe().starts_with("docker-archive:"));
    let raw = archive.manifest(&ManifestRef::Tag(String::new())).unwrap();
    assert_eq!(raw.digest, Digest::of(&raw.bytes));
    let Parsed::Image(m) = manifest::parse(&raw).unwrap() else {
        panic!()
    };
    let digests: Vec<String> = m.layers().iter().map(|l| l.digest().to_string()).collect();
    assert_eq!(
        digests,
        vec![
            Digest::of(&l1).to_string(),
            Digest::of(&l2).to_string(),
            Digest::of(&l1).to_string()
        ]
    );
    assert_eq!(
        m.config().digest().to_string(),
        Digest::of(CONFIG.as_bytes()).to_string()
    );
    // The synthesized manifest is also served by its digest.
    assert_eq!(
        archive
            .manifest(&ManifestRef::Digest(raw.digest.clone()))
            .unwrap()
            .bytes,
        raw.bytes
    );
    let tree = tmp.path().join("tree");
    unpack_image(&archive, &ManifestRef::Tag(String::new()), &tree);
    assert_eq!(
        fs::read_to_string(tree.join("hello")).unwrap(),
        "legacy one"
    );
    assert_eq!(
        fs::read_to_string(tree.join("etc/motd")).unwrap(),
        "legacy two"
    );
    // A blob that is not in the archive.
    let err = archive
        .blob(&Digest::of(b"other"), 5, &mut VecSink::default())
        .unwrap_err();
    assert!(err.to_string().contains("not in this archive"), "{err}");
}

/// The newer `docker save` form: an OCI layout inside the tarball.
#[test]
fn oci_form_docker_archive_reads_its_inner_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layout");
    let (latest, _) = build_layout(&dir);
    // Keep one image so the archive is unambiguous without a tag.
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let only: Vec<_> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "latest")
        .cloned()
        .collect();
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": only})).unwrap(),
    )
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", &dir).unwrap();
    let path = tmp.path().join("image.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();
    let archive = DockerArchive::open(&path).unwrap();
    let tree = tmp.path().join("tree");
    assert_eq!(
        unpack_image(&archive, &ManifestRef::Tag(String::new()), &tree),
        latest.digest
    );
    assert_eq!(
        fs::read_to_string(tree.join("hello")).unwrap(),
        "from layer one"
    );
}

#[test]
fn hostile_docker_archives_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // A member escaping with `..`.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(1);
    h.set_entry_type(tar::EntryType::Regular);
    let name = b"../evil";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let path = tmp.path().join("dotdot.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();
    let err = DockerArchive::open(&path).unwrap_err().to_string();
    assert!(err.contains("../evil"), "{err}");
    // A layer that is a symlink out of the archive.
    let mut b = tar::Builder::new(Vec::new());
    symlink_member(&mut b, "aaaa/layer.tar", "../../etc/passwd");
    member(&mut b, "c.json", CONFIG.as_bytes());
    member(
        &mut b,
        "manifest.json",
        br#"[{"Config":"c.json","Layers":["aaaa/layer.tar"]}]"#,
    );
    let path = tmp.path().join("symlink.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();
    let err = DockerArchive::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("aaaa/layer.tar") && err.contains("out of the archive"),
        "{err}"
    );
    // Two images and no way to choose.
    let mut b = tar::Builder::new(Vec::new());
    member(&mut b, "c.json", CONFIG.as_bytes());
    member(&mut b, "l.tar", &layer_tar("a", "b"));
    member(
        &mut b,
        "manifest.json",
        br#"[{"Config":"c.json","RepoTags":["a:1"],"Layers":["l.tar"]},{"Config":"c.json","RepoTags":["b:2"],"Layers":["l.tar"]}]"#,
    );
    let path = tmp.path().join("two.tar");
    fs::write(&path, b.into_inner().unwrap()).unwrap();
    let err = DockerArchive::open(&path).unwrap_err().to_string();
    assert!(err.contains("a:1") && err.contains("b:2"), "{err}");
    // Not a tar at all.
    let path = tmp.path().join("junk.tar");
    fs::write(&path, vec![0xffu8; 4096]).unwrap();
    assert!(DockerArchive::open(&path).is_err());
}
