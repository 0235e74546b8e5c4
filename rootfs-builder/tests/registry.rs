//! The pull pipeline against a real registry (Debian's docker-registry on 127.0.0.1) with
//! images the tests build and push themselves (fixture: `fnvm-testkit-registry`).

use std::path::Path;

use fnvm_rootfs_builder::credentials::Credentials;
use fnvm_rootfs_builder::digest::Digest;
use fnvm_rootfs_builder::pipeline::{
    pull, HomeDirs, Progress, PullError, PullOptions, PulledImage,
};
use fnvm_rootfs_builder::reference::{self, ImageReference};
use fnvm_rootfs_builder::registry::RegistryOptions;
use fnvm_testkit_registry::*;

fn options(reg_host: &str, creds: Option<(&str, &str)>) -> PullOptions {
    PullOptions {
        registry: RegistryOptions {
            credentials: creds.map(|(u, p)| Credentials::new(u, p)),
            insecure_registries: vec![reg_host.to_owned()],
            backoff: std::time::Duration::from_millis(20),
            ..RegistryOptions::default()
        },
        ..PullOptions::default()
    }
}

fn good(reg_host: &str) -> PullOptions {
    options(reg_host, Some((USER, PASSWORD)))
}

/// The error and its causes, as the CLI prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn r(s: &str) -> ImageReference {
    reference::parse(s).unwrap()
}

fn pull_quiet(reference: &str, home: &Path, opts: &PullOptions) -> Result<PulledImage, PullError> {
    pull(&r(reference), &HomeDirs::under(home), opts, &mut |_| {})
}

/// A two-layer image: the second layer overrides a file of the first.
fn hello_image() -> TestImage {
    let l1 = layer(&[
        file("bin/app", b"#!/bin/sh\necho v1\n"),
        file("etc/motd", b"layer one\n"),
    ]);
    let l2 = layer(&[
        file("etc/motd", b"layer two\n"),
        file("srv/data.bin", &noise(4096, 7)),
    ]);
    TestImage::new("amd64", vec![l1, l2])
}

fn blobs_in_store(home: &Path) -> Vec<String> {
    std::fs::read_dir(home.join("blobs/sha256"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn pull_by_tag_then_by_digest_is_a_cache_hit_with_no_blob_requests() {
    let reg = Registry::start_with_auth();
    let img = hello_image();
    reg.push_image("team/hello", "v1", &img);
    let home = tempfile::tempdir().unwrap();
    let opts = good(&reg.host());

    let mut events = Vec::new();
    let first = pull(
        &r(&format!("{}/team/hello:v1", reg.host())),
        &HomeDirs::under(home.path()),
        &opts,
        &mut |p| events.push(p),
    )
    .unwrap();
    assert!(!first.cache_hit);
    assert_eq!(first.image.digest, img.digest());
    assert_eq!(first.image.manifest_digest, img.digest());
    assert_eq!(first.image.config.cmd, ["--port", "9000"]);
    assert_eq!(first.image.config.entrypoint, ["/bin/app"]);
    assert_eq!(first.image.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(first.image.layers.len(), 2);
    assert!(first.rootfs_image.is_file());
    assert_eq!(
        first.rootfs_image,
        home.path()
            .join("rootfs")
            .join(img.digest().hex())
            .join("rootfs.img")
    );
    assert!(events.contains(&Progress::Resolved {
        digest: img.digest()
    }));
    assert!(events.iter().any(|e| matches!(
        e,
        Progress::Unpack {
            index: 2,
            count: 2,
            ..
        }
    )));
    // config + 2 layers fetched, each exactly once, all verified into the store.
    assert_eq!(reg.blob_gets("team/hello"), 3);
    assert_eq!(blobs_in_store(home.path()).len(), 3);
    assert!(temp_files(home.path()).is_empty());

    // By digest: a cache hit, after the registry accepted the credentials.
    let by_digest = format!("{}/team/hello@{}", reg.host(), img.digest());
    let second = pull_quiet(&by_digest, home.path(), &opts).unwrap();
    assert!(second.cache_hit);
    assert_eq!(second.rootfs_image, first.rootfs_image);
    assert_eq!(second.image, first.image);
    // By tag again: also a hit.
    let third = pull_quiet(&format!("{}/team/hello:v1", reg.host()), home.path(), &opts).unwrap();
    assert!(third.cache_hit);
    assert_eq!(
        reg.blob_gets("team/hello"),
        3,
        "a cache hit must not fetch blobs"
    );

    // The same digest with wrong or no credentials is refused although it is cached.
    let bad = options(&reg.host(), Some((USER, "wrong")));
    let e = pull_quiet(&by_digest, home.path(), &bad).unwrap_err();
    assert!(e.registry_error().is_some_and(|e| e.is_auth()), "{e}");
    let e = pull_quiet(&by_digest, home.path(), &options(&reg.host(), None)).unwrap_err();
    assert!(e.registry_error().is_some_and(|e| e.is_auth()), "{e}");
    assert!(chain(&e).contains("no credentials were given"), "{e}");
}

#[test]
fn wrong_password_is_a_clear_authentication_error() {
    let reg = Registry::start_with_auth();
    reg.push_image("private/app", "latest", &hello_image());
    let home = tempfile::tempdir().unwrap();
    let e = pull_quiet(
        &format!("{}/private/app:latest", reg.host()),
        home.path(),
        &options(&reg.host(), Some((USER, "not-the-password"))),
    )
    .unwrap_err();
    let msg = chain(&e);
    assert!(msg.contains("authentication failed"), "{msg}");
    assert!(msg.contains(&reg.host()), "{msg}");
    assert!(msg.contains("private/app"), "{msg}");
    assert!(msg.contains("\"alice\""), "{msg}");
    assert!(!msg.contains("not-the-password"), "{msg}");
    assert!(blobs_in_store(home.path()).is_empty());
}

#[test]
fn index_with_amd64_and_arm64_picks_amd64_and_arm64_only_is_refused() {
    let reg = Registry::start_with_auth();
    let amd = hello_image();
    let arm = TestImage::new("arm64", vec![layer(&[file("bin/app", b"arm")])]);
    for img in [&amd, &arm] {
        reg.push_blob("multi", &img.config);
        for l in &img.layers {
            reg.push_blob("multi", l);
        }
        reg.push_manifest(
            "multi",
            &img.digest().to_string(),
            OCI_MANIFEST,
            &img.manifest,
        );
    }
    let both = index_json(&[(&arm.manifest, "arm64"), (&amd.manifest, "amd64")]);
    reg.push_manifest("multi", "both", OCI_INDEX, &both);
    let arm_only = index_json(&[(&arm.manifest, "arm64")]);
    reg.push_manifest("multi", "arm", OCI_INDEX, &arm_only);

    let home = tempfile::tempdir().unwrap();
    let opts = good(&reg.host());
    let got = pull_quiet(&format!("{}/multi:both", reg.host()), home.path(), &opts).unwrap();
    assert_eq!(
        got.image.digest,
        Digest::of(&both),
        "the pinned digest is the index's"
    );
    assert_eq!(got.image.manifest_digest, amd.digest());
    assert_eq!(got.image.platform, "linux/amd64");
    // Pinning the index digest finds the same cache entry.
    let again = pull_quiet(
        &format!("{}/multi@{}", reg.host(), Digest::of(&both)),
        home.path(),
        &opts,
    )
    .unwrap();
    assert!(again.cache_hit);
    assert_eq!(again.rootfs_image, got.rootfs_image);

    let gets_before = reg.blob_gets("multi");
    let e = pull_quiet(&format!("{}/multi:arm", reg.host()), home.path(), &opts).unwrap_err();
    assert_eq!(
        chain(&e),
        "image is linux/arm64 only; fnvm runs x86-64 (linux/amd64) images"
    );
    assert_eq!(
        reg.blob_gets("multi"),
        gets_before,
        "refused before any blob fetch"
    );

    // A bare arm64 manifest is caught by its config.
    let e = pull_quiet(
        &format!("{}/multi@{}", reg.host(), arm.digest()),
        home.path(),
        &opts,
    )
    .unwrap_err();
    assert!(chain(&e).contains("linux/arm64"), "{e}");
}

#[test]
fn image_over_one_gib_is_refused_before_any_blob_fetch() {
    let reg = Registry::start_with_auth();
    let img = hello_image();
    reg.push_blob("big", &img.config);
    let small = layer(&[file("x", b"x")]);
    let d = reg.push_blob("big", &small);
    // The registry checks that the blob exists, not its declared size.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &img.config),
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": d.to_string(), "size": 1u64 << 30}],
    }))
    .unwrap();
    reg.push_manifest("big", "huge", OCI_MANIFEST, &manifest);
    let home = tempfile::tempdir().unwrap();
    let e = pull_quiet(
        &format!("{}/big:huge", reg.host()),
        home.path(),
        &good(&reg.host()),
    )
    .unwrap_err();
    assert!(chain(&e).contains("image is too large"), "{e}");
    assert_eq!(reg.blob_gets("big"), 0);
    assert!(blobs_in_store(home.path()).is_empty());
}

#[test]
fn blob_whose_bytes_do_not_match_its_digest_is_refused_and_not_stored() {
    let reg = Registry::start_with_auth();
    let img = hello_image();
    reg.push_image("tampered", "v1", &img);
    let victim = Digest::of(&img.layers[1]);
    let mut evil = img.layers[1].clone();
    let mid = evil.len() / 2;
    evil[mid] ^= 0xff;
    std::fs::write(reg.blob_data_path(&victim), &evil).unwrap();

    let home = tempfile::tempdir().unwrap();
    let e = pull_quiet(
        &format!("{}/tampered:v1", reg.host()),
        home.path(),
        &good(&reg.host()),
    )
    .unwrap_err();
    let msg = chain(&e);
    assert!(msg.contains("failed verification"), "{msg}");
    assert!(msg.contains(&victim.to_string()), "{msg}");
    assert!(msg.contains(&Digest::of(&evil).to_string()), "{msg}");
    assert!(!blobs_in_store(home.path()).contains(&victim.hex().to_owned()));
    assert!(temp_files(home.path()).is_empty());
    assert!(!home.path().join("rootfs").join(img.digest().hex()).exists());
}

#[test]
fn interrupted_download_resumes_and_never_leaves_a_corrupt_blob() {
    let reg = Registry::start_with_auth();
    // A 300 KiB incompressible layer: the proxy cuts connections after 100 KiB.
    let big = layer(&[file("srv/blob.bin", &noise(300 * 1024, 3))]);
    let img = TestImage::new("amd64", vec![big.clone()]);
    reg.push_image("flaky", "v1", &img);
    let reference = |port: u16| format!("127.0.0.1:{port}/flaky:v1");

    // With a single attempt allowed, a cut connection fails the pull and leaves nothing
    // behind: no blob, no temp file, no rootfs.
    let home = tempfile::tempdir().unwrap();
    {
        let proxy = CuttingProxy::start(reg.port, 100 * 1024, usize::MAX);
        let mut opts = good(&proxy.host());
        opts.registry.attempts = 1;
        let e = pull_quiet(&reference(proxy.port), home.path(), &opts).unwrap_err();
        assert!(chain(&e).contains("download failed"), "{e}");
        assert!(!blobs_in_store(home.path()).contains(&Digest::of(&big).hex().to_owned()));
        assert!(
            temp_files(home.path()).is_empty(),
            "{:?}",
            temp_files(home.path())
        );
    }
    // Cuts on every connection but progress each time: the download resumes with Range
    // requests (a moving download is not a failing one) and the pull succeeds.
    let proxy = CuttingProxy::start(reg.port, 100 * 1024, usize::MAX);
    let got = pull_quiet(&reference(proxy.port), home.path(), &good(&proxy.host())).unwrap();
    assert!(proxy.cut_count.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    assert!(
        reg.partial_blob_responses("flaky") >= 2,
        "resume used Range"
    );
    assert!(got.rootfs_image.is_file());
    std::fs::remove_dir_all(home.path()).unwrap();

    // One cut, the next pull (in a fresh home) succeeds as well.
    let proxy = CuttingProxy::start(reg.port, 100 * 1024, 1);
    let got = pull_quiet(&reference(proxy.port), home.path(), &good(&proxy.host())).unwrap();
    assert_eq!(proxy.cut_count.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        reg.partial_blob_responses("flaky") >= 1,
        "resume used Range"
    );
    let stored = std::fs::read(
        home.path()
            .join("blobs/sha256")
            .join(Digest::of(&big).hex()),
    )
    .unwrap();
    assert_eq!(stored, big);
    assert!(got.rootfs_image.is_file());
    assert!(temp_files(home.path()).is_empty());
}

#[test]
fn tls_registry_with_private_ca() {
    let reg = Registry::start(RegistryConfig {
        auth: true,
        tls: true,
        token: false,
    });
    let img = hello_image();
    reg.push_image("secure/app", "v1", &img);
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/secure/app:v1", reg.host());
    let mut opts = options("none", Some((USER, PASSWORD)));
    // Without the CA the certificate is not trusted.
    let e = pull_quiet(&reference, home.path(), &opts).unwrap_err();
    assert!(!e.registry_error().is_some_and(|e| e.is_auth()), "{e}");
    opts.registry.ca_file = Some(reg.tls.as_ref().unwrap().ca_file.clone());
    let got = pull_quiet(&reference, home.path(), &opts).unwrap();
    assert_eq!(got.image.manifest_digest, img.digest());
    // Plain HTTP to a host not listed as insecure is never attempted.
    let http_only = Registry::start_with_auth();
    http_only.push_image("x", "v1", &img);
    let e = pull_quiet(
        &format!("{}/x:v1", http_only.host()),
        home.path(),
        &options("none", Some((USER, PASSWORD))),
    )
    .unwrap_err();
    assert!(e.registry_error().is_some(), "{e}");
}

#[test]
fn bearer_token_flow_against_a_token_auth_registry() {
    let reg = Registry::start(RegistryConfig {
        auth: false,
        tls: false,
        token: true,
    });
    let img = hello_image();
    reg.push_image("tok/app", "v1", &img);
    let home = tempfile::tempdir().unwrap();
    let reference = format!("{}/tok/app:v1", reg.host());
    // The token realm is another loopback port: allow plain HTTP to the host.
    let mut opts = good(&reg.host());
    opts.registry
        .insecure_registries
        .push("127.0.0.1".to_owned());
    let got = pull_quiet(&reference, home.path(), &opts).unwrap();
    assert_eq!(got.image.manifest_digest, img.digest());
    let asked = reg.token.as_ref().unwrap().requests.lock().unwrap().clone();
    assert!(
        asked
            .iter()
            .any(|q| q.contains("scope=repository%3Atok%2Fapp%3Apull")
                && q.contains("service=fnvm-test-registry")),
        "{asked:?}"
    );
    // A cache hit by digest still needs a token the registry accepts.
    let by_digest = format!("{}/tok/app@{}", reg.host(), img.digest());
    assert!(
        pull_quiet(&by_digest, home.path(), &opts)
            .unwrap()
            .cache_hit
    );
    let mut bad = options(&reg.host(), Some((USER, "wrong")));
    bad.registry
        .insecure_registries
        .push("127.0.0.1".to_owned());
    let e = pull_quiet(&by_digest, home.path(), &bad).unwrap_err();
    assert!(e.registry_error().is_some_and(|e| e.is_auth()), "{e}");
    assert!(chain(&e).contains("tok/app"), "{e}");
    // Without the realm's host allowed for HTTP, credentials are not sent in clear text.
    let e = pull_quiet(&reference, home.path(), &good(&reg.host())).unwrap_err();
    assert!(chain(&e).contains("refusing plain HTTP"), "{e}");
}

#[test]
fn concurrent_pulls_of_one_image_share_blobs_and_cache_safely() {
    let reg = Registry::start_with_auth();
    let img = hello_image();
    reg.push_image("shared/app", "v1", &img);
    // A second image that shares the first layer: stored once.
    let other = TestImage::new(
        "amd64",
        vec![
            img.layers[0].clone(),
            layer(&[file("etc/other", b"other\n")]),
        ],
    );
    reg.push_image("shared/app", "v2", &other);
    let home = tempfile::tempdir().unwrap();
    let opts = good(&reg.host());
    let results: Vec<PulledImage> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    pull_quiet(&format!("{}/shared/app:v1", reg.host()), home.path(), &opts)
                        .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.rootfs_image, results[0].rootfs_image);
        assert!(r.rootfs_image.is_file());
    }
    let v2 = pull_quiet(&format!("{}/shared/app:v2", reg.host()), home.path(), &opts).unwrap();
    assert_ne!(v2.rootfs_image, results[0].rootfs_image);
    // One config (identical), the shared layer once, and each image's own second layer.
    assert_eq!(blobs_in_store(home.path()).len(), 4);
    assert!(temp_files(home.path()).is_empty());
}

#[test]
fn oci_layout_and_docker_archive_give_the_same_tree_as_the_registry() {
    let reg = Registry::start_with_auth();
    let img = hello_image();
    reg.push_image("same/app", "v1", &img);
    let work = tempfile::tempdir().unwrap();
    let from_registry = pull_quiet(
        &format!("{}/same/app:v1", reg.host()),
        &work.path().join("home-registry"),
        &good(&reg.host()),
    )
    .unwrap();
    let layout = work.path().join("layout");
    write_oci_layout(&layout, &img, "v1");
    let from_oci = pull_quiet(
        &format!("oci:{}:v1", layout.display()),
        &work.path().join("home-oci"),
        &PullOptions::default(),
    )
    .unwrap();
    assert_eq!(from_oci.image.manifest_digest, img.digest());
    let archive = work.path().join("image.tar");
    write_docker_archive(&archive, &img, "same/app:v1");
    let from_archive = pull_quiet(
        &format!("docker-archive:{}", archive.display()),
        &work.path().join("home-archive"),
        &PullOptions::default(),
    )
    .unwrap();
    assert_eq!(from_archive.image.config, from_registry.image.config);

    let listing = |p: &PulledImage, name: &str| {
        let dest = work.path().join(name);
        extract_rootfs_image(&p.rootfs_image, &dest);
        tree_listing(&dest)
    };
    let reference = listing(&from_registry, "tree-registry");
    assert!(
        reference.iter().any(|(p, _)| p == "etc/motd"),
        "{reference:?}"
    );
    assert_eq!(
        std::fs::read(work.path().join("tree-registry/etc/motd")).unwrap(),
        b"layer two\n",
        "the upper layer wins"
    );
    assert_eq!(listing(&from_oci, "tree-oci"), reference);
    assert_eq!(listing(&from_archive, "tree-archive"), reference);
}

#[test]
fn blob_longer_than_its_descriptor_is_cut_off() {
    let reg = Registry::start_with_auth();
    let img = hello_image();
    reg.push_blob("liar", &img.config);
    let real = layer(&[file("srv/data", &noise(64 * 1024, 9))]);
    let d = reg.push_blob("liar", &real);
    // The manifest understates the layer by 100 bytes; the registry does not check sizes.
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &img.config),
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": d.to_string(), "size": real.len() - 100}],
    }))
    .unwrap();
    reg.push_manifest("liar", "v1", OCI_MANIFEST, &manifest);
    let home = tempfile::tempdir().unwrap();
    let e = pull_quiet(
        &format!("{}/liar:v1", reg.host()),
        home.path(),
        &good(&reg.host()),
    )
    .unwrap_err();
    assert!(
        chain(&e).contains("larger than its declared"),
        "{}",
        chain(&e)
    );
    assert!(!blobs_in_store(home.path()).contains(&d.hex().to_owned()));
    assert!(temp_files(home.path()).is_empty());
}

/// Registries backed by object storage answer blob reads with a redirect. The real
/// registry's filesystem driver never does, so a small HTTP server plays the registry
/// here: Authorization must reach the registry but never the storage host.
#[test]
fn blob_redirects_are_followed_without_leaking_authorization() {
    let img = hello_image();
    let blobs: std::collections::HashMap<String, Vec<u8>> = std::iter::once(&img.config)
        .chain(img.layers.iter())
        .map(|b| (format!("/blob/{}", Digest::of(b).hex()), b.clone()))
        .collect();
    let storage = TinyHttp::start(move |req| match blobs.get(&req.path) {
        Some(b) => (200, vec![], b.clone()),
        None => (404, vec![], vec![]),
    });
    let storage_port = storage.port;
    let manifest = img.manifest.clone();
    let basic = Credentials::new(USER, PASSWORD).basic_header();
    let registry = TinyHttp::start(move |req| {
        if req.header("authorization") != Some(basic.as_str()) {
            let challenge = ("WWW-Authenticate".into(), "Basic realm=\"fake\"".into());
            return (401, vec![challenge], vec![]);
        }
        if req.path == "/v2/" {
            return (200, vec![], b"{}".to_vec());
        }
        if req.path.starts_with("/v2/redir/manifests/") {
            let ct = ("Content-Type".into(), OCI_MANIFEST.into());
            return (200, vec![ct], manifest.clone());
        }
        if let Some(d) = req.path.strip_prefix("/v2/redir/blobs/sha256:") {
            let to = format!("http://localhost:{storage_port}/blob/{d}");
            return (307, vec![("Location".into(), to)], vec![]);
        }
        (404, vec![], vec![])
    });
    let home = tempfile::tempdir().unwrap();
    let mut opts = good(&format!("127.0.0.1:{}", registry.port));
    opts.registry.insecure_registries.push("localhost".into());
    let got = pull_quiet(
        &format!("127.0.0.1:{}/redir:v1", registry.port),
        home.path(),
        &opts,
    )
    .unwrap();
    assert_eq!(got.image.manifest_digest, img.digest());
    let seen = storage.seen.lock().unwrap();
    assert_eq!(
        seen.len(),
        3,
        "config and two layers came from the storage host"
    );
    assert!(seen.iter().all(|r| r.header("authorization").is_none()));
    drop(seen);

    // A redirect to a plain-HTTP host that was not allowed is refused.
    let home = tempfile::tempdir().unwrap();
    let opts = good(&format!("127.0.0.1:{}", registry.port));
    let e = pull_quiet(
        &format!("127.0.0.1:{}/redir:v1", registry.port),
        home.path(),
        &opts,
    )
    .unwrap_err();
    assert!(chain(&e).contains("refusing plain HTTP"), "{}", chain(&e));
}

/// Overloaded registries answer 503 now and then; the client backs off and retries.
#[test]
fn server_errors_are_retried_with_backoff() {
    let img = hello_image();
    let failures_left = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(2));
    let left = failures_left.clone();
    let blobs: std::collections::HashMap<String, Vec<u8>> = std::iter::once(&img.config)
        .chain(img.layers.iter())
        .map(|b| (format!("/v2/busy/blobs/{}", Digest::of(b)), b.clone()))
        .collect();
    let manifest = img.manifest.clone();
    let server = TinyHttp::start(move |req| {
        use std::sync::atomic::Ordering::SeqCst;
        if req.path.contains("/blobs/")
            && left
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return (503, vec![], b"busy".to_vec());
        }
        match req.path.as_str() {
            "/v2/" => (200, vec![], b"{}".to_vec()),
            p if p.starts_with("/v2/busy/manifests/") => (
                200,
                vec![("Content-Type".into(), OCI_MANIFEST.into())],
                manifest.clone(),
            ),
            p => match blobs.get(p) {
                Some(b) => (200, vec![], b.clone()),
                None => (404, vec![], vec![]),
            },
        }
    });
    let home = tempfile::tempdir().unwrap();
    let host = format!("127.0.0.1:{}", server.port);
    let got = pull_quiet(
        &format!("{host}/busy:v1"),
        home.path(),
        &options(&host, None),
    )
    .unwrap();
    assert_eq!(got.image.manifest_digest, img.digest());
    assert_eq!(failures_left.load(std::sync::atomic::Ordering::SeqCst), 0);
    let blob_requests = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.path.contains("/blobs/"))
        .count();
    assert_eq!(blob_requests, 3 + 2, "three blobs plus two retried 503s");
}
