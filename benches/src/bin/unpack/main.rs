//! `unpack`: how fast an OCI image becomes a rootfs — fnvm's unpacker plus its rootfs image
//! build against `umoci unpack` on the same layout, with `tar -xzf` of the same layers as the
//! floor, side by side in one run; then the image formats (ext4 vs EROFS) compared on build
//! time, size and cold read time.
//!
//! The image: Debian bookworm minbase + python3 (`mmdebstrap`, cached as a tarball under
//! `~/.cache/fnvm/bench/`), split into three gzip layers (directories and most files;
//! `/usr/share` and the Python library; hard links plus a whiteout of `/usr/share/doc`) and
//! written as an OCI layout there too.
//!
//! The trees are written to a fresh ext4 made for the run (see [`scratch`]).
//!
//! Usage: `cargo run --release -p fnvm-benches --bin unpack [-- --runs N]` (default 5).
//! Needs mmdebstrap (first run only, Debian mirror access), umoci, tar, e2fsprogs,
//! erofs-utils; the cold-read comparison needs root (loop mounts, dropping the page cache).

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fnvm_benches::{median, ms, ratio, Table};
use fnvm_rootfs_builder::pipeline::{pull, HomeDirs, PullOptions};
use fnvm_rootfs_builder::reference;
use fnvm_rootfs_builder::rootfs::{build_rootfs_image_with, RootfsFormat, RootfsOptions};
use fnvm_rootfs_builder::unpack::{unpack_layer, Compression, Ownership, UnpackOptions};

use self::formats::formats;
use self::image::{cache_dir, ensure_base_tar, ensure_layout, LayerBlob};
use self::parity::{compare, listing};
use self::scratch::Scratch;

mod formats;
mod image;
mod parity;
mod scratch;

const DEFAULT_RUNS: usize = 5;
/// The unprivileged user the non-root build path runs as.
const NOBODY: u32 = 65534;
const BASE_TAR: &str = "bookworm-minbase-python3.tar";
const LAYOUT: &str = "bookworm-minbase-python3-oci";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--record-child") {
        // The unprivileged builder's path, run by the parent under setpriv as nobody.
        args.next();
        let out = PathBuf::from(args.next().context("--record-child DIR LAYER...")?);
        let layers: Vec<LayerBlob> = args.map(|p| LayerBlob { path: p.into() }).collect();
        let tree = out.join("tree");
        fnvm_unpack(&layers, &tree, Ownership::Auto)?;
        build(&tree, &out.join("rootfs.img"), RootfsFormat::Ext4, false)?;
        return Ok(());
    }
    if args.peek().map(String::as_str) == Some("--unpack-only") {
        // Just fnvm's unpacker, for profiling it: `--unpack-only N`.
        args.next();
        let n: usize = args.next().context("--unpack-only N")?.parse()?;
        let cache = cache_dir()?;
        let layers = ensure_layout(&ensure_base_tar(&cache)?, &cache.join(LAYOUT))?;
        let tree = std::env::temp_dir().join(format!("fnvm-unpack-only-{}", std::process::id()));
        let mut times = Vec::new();
        for _ in 0..n {
            let (d, ()) = timed(|| fnvm_unpack(&layers, &tree, Ownership::Auto))?;
            times.push(d);
            remove(&tree);
        }
        let min = times.iter().min().copied().unwrap_or_default();
        println!("fnvm unpack: median {} min {}", ms(median(&times)), ms(min));
        return Ok(());
    }
    let runs = parse_args()?;
    let cache = cache_dir()?;
    let base = ensure_base_tar(&cache)?;
    let layout = cache.join(LAYOUT);
    let layers = ensure_layout(&base, &layout)?;
    let scratch = Scratch::new(nix_is_root())?;
    println!("{}", scratch.about);
    run(runs, &layout, &layers, scratch.path())
}

fn parse_args() -> Result<usize> {
    let mut args = std::env::args().skip(1);
    let mut runs = DEFAULT_RUNS;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => {
                let v = args.next().context("--runs needs a number")?;
                runs = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .with_context(|| format!("--runs: {v:?} is not a positive number"))?;
            }
            other => bail!("unknown argument {other:?} (usage: unpack [--runs N])"),
        }
    }
    Ok(runs)
}

fn remove(path: &Path) {
    if path.is_dir() {
        let _ = fs::remove_dir_all(path);
    } else {
        let _ = fs::remove_file(path);
    }
    let _ = fs::remove_file(sidecar(path));
}

/// The unpacker's side table beside a tree (see fnvm_rootfs_builder::unpack::state).
fn sidecar(tree: &Path) -> PathBuf {
    let name = tree
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tree.with_file_name(format!(".{name}.fnvm-unpack.json"))
}

/// Times `f`, after flushing dirty pages so one contender's writeback does not land in the
/// next one's time.
fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    // SAFETY: sync has no failure mode and takes no arguments.
    unsafe { libc::sync() };
    let start = Instant::now();
    let v = f()?;
    Ok((start.elapsed(), v))
}

fn fnvm_unpack(layers: &[LayerBlob], tree: &Path, ownership: Ownership) -> Result<()> {
    fs::create_dir(tree)?;
    let opts = UnpackOptions {
        ownership,
        ..Default::default()
    };
    for layer in layers {
        let file = BufReader::with_capacity(256 * 1024, File::open(&layer.path)?);
        unpack_layer(tree, file, Compression::Gzip, &opts)
            .with_context(|| format!("unpacking {}", layer.path.display()))?;
    }
    Ok(())
}

fn build(tree: &Path, image: &Path, format: RootfsFormat, compress: bool) -> Result<u64> {
    let info = build_rootfs_image_with(tree, image, &RootfsOptions { format, compress })?;
    Ok(info.size_bytes)
}

fn sh(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[derive(Default)]
struct Samples {
    fnvm_unpack: Vec<Duration>,
    fnvm_build: Vec<Duration>,
    fnvm_total: Vec<Duration>,
    fnvm_record_total: Vec<Duration>,
    umoci_rootless: Vec<Duration>,
    umoci_root: Vec<Duration>,
    tar: Vec<Duration>,
    pull_cold: Vec<Duration>,
    pull_cached: Vec<Duration>,
}

fn run(runs: usize, layout: &Path, layers: &[LayerBlob], scratch: &Path) -> Result<()> {
    let root = nix_is_root();
    let umoci = fnvm_benches::peer_runs("umoci", &["--version"], "umoci");
    let compressed: u64 = layers
        .iter()
        .map(|l| fs::metadata(&l.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "image: Debian bookworm minbase + python3, {} gzip layers, {:.1} MB compressed ({})",
        layers.len(),
        compressed as f64 / 1e6,
        layout.display()
    );
    // Warm the page cache with the layers, so the first contender does not pay for it.
    for l in layers {
        io::copy(&mut File::open(&l.path)?, &mut io::sink())?;
    }
    let mut s = Samples::default();
    let mut parity: Option<Result<usize>> = None;
    // Copies of the layers that nobody can read, for the unprivileged runs.
    let unprivileged = if root {
        let dir = scratch.join("unprivileged");
        fs::create_dir(&dir)?;
        for l in layers {
            fs::copy(&l.path, dir.join(l.path.file_name().unwrap_or_default()))?;
        }
        Some(dir)
    } else {
        None
    };
    let image_ref = format!("oci:{}:latest", layout.display());
    let reference = reference::parse(&image_ref).map_err(|e| anyhow::anyhow!("{e}"))?;
    for i in 0..runs {
        eprintln!("run {}/{runs}", i + 1);
        // fnvm: unpack (ownership applied on disk as root) + ext4 image.
        let tree = scratch.join("fnvm-tree");
        let image = scratch.join("fnvm.img");
        let (t_total, t_unpack) = timed(|| {
            let start = Instant::now();
            fnvm_unpack(layers, &tree, Ownership::Auto)?;
            let unpacked = start.elapsed();
            build(&tree, &image, RootfsFormat::Ext4, false)?;
            Ok(unpacked)
        })?;
        s.fnvm_unpack.push(t_unpack);
        s.fnvm_build.push(t_total - t_unpack);
        s.fnvm_total.push(t_total);
        if i > 0 || !root {
            remove(&tree);
        }
        remove(&image);
        // fnvm as an unprivileged builder (nobody): ownership recorded, applied by debugfs.
        if let Some(unprivileged) = &unprivileged {
            let out = unprivileged.join("out");
            fs::create_dir(&out)?;
            std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY))?;
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(std::env::current_exe()?)
                .arg("--record-child")
                .arg(&out);
            for l in layers {
                cmd.arg(unprivileged.join(l.path.file_name().unwrap_or_default()));
            }
            let (t, ()) = timed(|| sh(&mut cmd, "the bench as nobody (setpriv)"))?;
            s.fnvm_record_total.push(t);
            if i > 0 {
                remove(&out);
            }
        }
        // umoci, rootless and (as root) not.
        let bundle = scratch.join("umoci-bundle");
        if umoci.is_ok() {
            let (t, ()) = timed(|| {
                sh(
                    Command::new("umoci")
                        .args(["unpack", "--rootless", "--image"])
                        .arg(format!("{}:latest", layout.display()))
                        .arg(&bundle),
                    "umoci unpack --rootless (Debian package umoci)",
                )
            })?;
            s.umoci_rootless.push(t);
            remove(&bundle);
            if root {
                let (t, ()) = timed(|| {
                    sh(
                        Command::new("umoci")
                            .args(["unpack", "--image"])
                            .arg(format!("{}:latest", layout.display()))
                            .arg(&bundle),
                        "umoci unpack",
                    )
                })?;
                s.umoci_root.push(t);
                if i == 0 {
                    // Same tree as umoci's? Types, modes, owners, sizes, link targets, mtimes.
                    let ours = listing(&tree)?;
                    let theirs = listing(&bundle.join("rootfs"))?;
                    parity = Some(compare(&ours, &theirs));
                    // The image built as nobody (owners applied by debugfs), loop-mounted.
                    if let (Some(Ok(_)), Some(unprivileged)) = (&parity, &unprivileged) {
                        let out = unprivileged.join("out");
                        let mnt = scratch.join("parity-mnt");
                        fs::create_dir_all(&mnt)?;
                        sh(
                            Command::new("mount")
                                .args(["-o", "ro,loop"])
                                .arg(out.join("rootfs.img"))
                                .arg(&mnt),
                            "mount",
                        )?;
                        let listed = listing(&mnt);
                        let _ = Command::new("umount").arg(&mnt).status();
                        let mut image = listed?;
                        image.remove("lost+found");
                        parity = Some(compare(&image, &theirs).context("image built as nobody"));
                        remove(&out);
                    }
                    remove(&tree);
                }
                remove(&bundle);
            }
        }
        // tar -xzf of the same layers: the floor (no whiteouts, no safety checks).
        let dir = scratch.join("tar-tree");
        fs::create_dir(&dir)?;
        let (t, ()) = timed(|| {
            for layer in layers {
                sh(
                    Command::new("tar")
                        .arg("-xzf")
                        .arg(&layer.path)
                        .arg("-C")
                        .arg(&dir),
                    "tar -xzf",
                )?;
            }
            Ok(())
        })?;
        s.tar.push(t);
        remove(&dir);
        // The whole pipeline from the oci: layout into a fresh home, then again (cache hit).
        let home = scratch.join("home");
        let dirs = HomeDirs::under(&home);
        let (t, _) = timed(|| {
            Ok(pull(
                &reference,
                &dirs,
                &PullOptions::default(),
                &mut |_| {},
            )?)
        })?;
        s.pull_cold.push(t);
        let (t, pulled) = timed(|| {
            Ok(pull(
                &reference,
                &dirs,
                &PullOptions::default(),
                &mut |_| {},
            )?)
        })?;
        anyhow::ensure!(pulled.cache_hit, "second pull was not a cache hit");
        s.pull_cached.push(t);
        remove(&home);
    }

    match (parity, &umoci) {
        (Some(Ok(n)), _) => println!("parity: fnvm's tree (as root) and its ext4 image built as nobody both equal umoci's rootfs ({n} entries: type, mode, owner, size, link target, mtime)"),
        (Some(Err(diff)), _) => bail!("fnvm's tree differs from umoci's rootfs:\n{diff:#}"),
        (None, Err(why)) => println!("umoci (the peer) could not run, so its rows and the parity check are missing: {why}"),
        (None, Ok(())) => println!("parity with umoci not checked (needs root)"),
    }
    // Ratios against umoci, or against the tar floor when umoci could not run.
    let (base, against) = if s.umoci_rootless.is_empty() {
        (Some(median(&s.tar)), "vs tar -xzf")
    } else {
        (Some(median(&s.umoci_rootless)), "vs umoci --rootless")
    };
    let mut t = Table::new(&["unpack to a rootfs", "median", "min", "max", against]);
    let mut row = |name: &str, v: &[Duration]| {
        if v.is_empty() {
            return;
        }
        let min = v.iter().min().copied().unwrap_or_default();
        let max = v.iter().max().copied().unwrap_or_default();
        t.row(vec![
            name.to_owned(),
            ms(median(v)),
            ms(min),
            ms(max),
            ratio(median(v), base),
        ]);
    };
    row("fnvm unpack + ext4 image", &s.fnvm_total);
    row("  of which unpack", &s.fnvm_unpack);
    row("  of which ext4 image build", &s.fnvm_build);
    row(
        "fnvm unpack + ext4 image as nobody (owners via debugfs)",
        &s.fnvm_record_total,
    );
    row(
        "fnvm pull oci: (blobs into store + unpack + image)",
        &s.pull_cold,
    );
    row("fnvm pull oci:, cached", &s.pull_cached);
    row("umoci unpack --rootless", &s.umoci_rootless);
    row("umoci unpack (as root)", &s.umoci_root);
    row("tar -xzf (floor)", &s.tar);
    println!("\n{runs} runs each, interleaved\n");
    t.print();

    formats(runs.min(3), layers, scratch, root)
}

pub(crate) fn nix_is_root() -> bool {
    // SAFETY: geteuid has no failure mode.
    unsafe { libc::geteuid() == 0 }
}
