//! Layer unpacking and rootfs images with real layers built here by the tar crate (plain,
//! gzip, zstd): whiteouts and opaque directories across layers, links, modes and ownership,
//! every escape attempt, size caps, corrupt input, and the built image loop-mounted.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use fnvm_rootfs_builder::rootfs::{
    build_rootfs_image, build_rootfs_image_with, RootfsFormat, RootfsOptions,
};
use fnvm_rootfs_builder::unpack::{
    forget_tree_state, unpack_layer, Compression, Ownership, UnpackError, UnpackOptions,
};

/// A layer under construction. Names are written raw into the header so hostile names
/// (`..`, absolute) can be expressed.
struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    fn new() -> Self {
        Self {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(kind: tar::EntryType, path: &str, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(1_600_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let name = &mut h.as_old_mut().name;
        name.fill(0);
        name[..path.len()].copy_from_slice(path.as_bytes());
        h
    }

    fn push(&mut self, mut h: tar::Header, data: &[u8]) -> &mut Self {
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.push(Self::header(tar::EntryType::Directory, path, mode, 0), b"")
    }

    fn file(&mut self, path: &str, content: &str) -> &mut Self {
        self.file_owned(path, content, 0o644, 0, 0)
    }

    fn file_owned(
        &mut self,
        path: &str,
        content: &str,
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        let mut h = Self::header(tar::EntryType::Regular, path, mode, content.len() as u64);
        h.set_uid(uid);
        h.set_gid(gid);
        self.push(h, content.as_bytes())
    }

    fn link(&mut self, kind: tar::EntryType, path: &str, target: &str) -> &mut Self {
        let mut h = Self::header(kind, path, 0o777, 0);
        let link = &mut h.as_old_mut().linkname;
        link.fill(0);
        link[..target.len()].copy_from_slice(target.as_bytes());
        self.push(h, b"")
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(tar::EntryType::Symlink, path, target)
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.link(tar::EntryType::Link, path, target)
    }

    fn device(
        &mut self,
        kind: tar::EntryType,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> &mut Self {
        let mut h = Self::header(kind, path, mode, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.push(h, b"")
    }

    fn whiteout(&mut self, path: &str) -> &mut Self {
        self.push(Self::header(tar::EntryType::Regular, path, 0o600, 0), b"")
    }

    fn finish(&mut self, compression: Compression) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        let tar = builder.into_inner().unwrap();
        compress(&tar, compression)
    }
}

fn compress(tar: &[u8], compression: Compression) -> Vec<u8> {
    match compression {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(tar).unwrap();
            gz.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

/// A destination with a sentinel directory beside it that no layer may change.
struct Scratch {
    _tmp: tempfile::TempDir,
    dest: PathBuf,
    sentinel: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("rootfs");
        let sentinel = tmp.path().join("sentinel");
        fs::create_dir(&dest).unwrap();
        fs::create_dir(&sentinel).unwrap();
        fs::write(sentinel.join("file"), "untouched").unwrap();
        Self {
            _tmp: tmp,
            dest,
            sentinel,
        }
    }

    fn apply(&self, layer: &[u8], compression: Compression) -> Result<(), UnpackError> {
        self.apply_with(layer, compression, &UnpackOptions::default())
    }

    fn apply_with(
        &self,
        layer: &[u8],
        compression: Compression,
        opts: &UnpackOptions,
    ) -> Result<(), UnpackError> {
        unpack_layer(&self.dest, layer, compression, opts).map(drop)
    }

    fn assert_sentinel_untouched(&self) {
        assert_eq!(
            listing(&self.sentinel),
            BTreeMap::from([("/file".to_owned(), "file 644 untouched".to_owned())])
        );
        assert_eq!(fs::metadata(self.sentinel.join("file")).unwrap().nlink(), 1);
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Every path below `root` with its type, permission bits and content or link target.
fn listing(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, false);
    out
}

/// As `listing`, with uid:gid too.
fn listing_owned(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, true);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>, owners: bool) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = format!("/{}", path.strip_prefix(root).unwrap().display());
        if rel == "/lost+found" {
            continue;
        }
        let meta = fs::symlink_metadata(&path).unwrap();
        let ft = meta.file_type();
        let perm = meta.permissions().mode() & 0o7777;
        let owner = if owners {
            format!(" {}:{}", meta.uid(), meta.gid())
        } else {
            String::new()
        };
        let desc = if ft.is_dir() {
            walk(root, &path, out, owners);
            format!("dir {perm:o}{owner}")
        } else if ft.is_symlink() {
            format!(
                "symlink -> {}{owner}",
                fs::read_link(&path).unwrap().display()
            )
        } else if ft.is_file() {
            let content = fs::read_to_string(&path).unwrap_or_else(|_| "<binary>".into());
            format!("file {perm:o}{owner} {content}")
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() { "char" } else { "block" };
            let rdev = meta.rdev();
            format!(
                "{kind} {perm:o}{owner} {}:{}",
                libc::major(rdev),
                libc::minor(rdev)
            )
        } else if ft.is_fifo() {
            format!("fifo {perm:o}{owner}")
        } else {
            format!("other {perm:o}{owner}")
        };
        out.insert(rel, desc);
    }
}

fn expect(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Three layers (gzip, zstd, plain): whiteouts remove what lower layers put there; an
/// opaque directory hides lower children but keeps its own layer's, wherever its marker sits.
#[test]
fn whiteouts_and_opaque_directories_across_three_layers() {
    let s = Scratch::new();
    let l1 = Layer::new()
        .dir("etc", 0o755)
        .file("etc/hostname", "one")
        .file("etc/gone", "lower")
        .dir("etc/gone.d", 0o755)
        .file("etc/gone.d/inner", "lower")
        .dir("opt", 0o755)
        .file("opt/lower", "lower")
        .dir("opt/sub", 0o755)
        .file("opt/sub/deep", "lower")
        .dir("var", 0o755)
        .file("var/log", "lower")
        .finish(Compression::Gzip);
    s.apply(&l1, Compression::Gzip).unwrap();
    let l2 = Layer::new()
        .whiteout("etc/.wh.gone")
        .whiteout("etc/.wh.gone.d")
        .file("etc/hostname", "two")
        .dir("opt", 0o750)
        .file("opt/mine", "layer2")
        .file("opt/sub/new", "layer2")
        // Opaque marker after some of this layer's own entries: they stay.
        .whiteout("opt/.wh..wh..opq")
        .file("opt/after", "layer2")
        .whiteout("var/.wh.log")
        .whiteout("nothing/.wh.there")
        .finish(Compression::Zstd);
    s.apply(&l2, Compression::Zstd).unwrap();
    let l3 = Layer::new()
        .file("etc/gone", "back")
        .whiteout("opt/.wh.mine")
        .whiteout(".wh.var")
        .finish(Compression::None);
    s.apply(&l3, Compression::None).unwrap();
    assert_eq!(
        listing(&s.dest),
        expect(&[
            ("/etc", "dir 755"),
            ("/etc/hostname", "file 644 two"),
            ("/etc/gone", "file 644 back"),
            ("/opt", "dir 750"),
            ("/opt/sub", "dir 755"),
            ("/opt/sub/new", "file 644 layer2"),
            ("/opt/after", "file 644 layer2"),
        ])
    );
    // Directories keep the mtimes their layers gave them, though later layers changed
    // their contents without naming them.
    for dir in ["etc", "opt/sub"] {
        let mtime = fs::metadata(s.dest.join(dir)).unwrap().mtime();
        assert_eq!(mtime, 1_600_000_000, "{dir}");
    }
    s.assert_sentinel_untouched();
}

#[test]
fn hardlinks_and_symlink_chains() {
    let s = Scratch::new();
    let l1 = Layer::new()
        .dir("bin", 0o755)
        .file_owned("bin/busybox", "bb", 0o755, 0, 0)
        .hardlink("bin/sh", "bin/busybox")
        .symlink("bin/c", "b")
        .symlink("bin/b", "/bin/a")
        .symlink("bin/a", "busybox")
        .finish(Compression::Gzip);
    s.apply(&l1, Compression::Gzip).unwrap();
    // A later layer links to a file of a lower one, and replaces a symlink with a file.
    let l2 = Layer::new()
        .hardlink("usr/bin/ls", "/bin/busybox")
        .file("bin/c", "now a file")
        .finish(Compression::None);
    s.apply(&l2, Compression::None).unwrap();
    let ino = |p: &str| fs::symlink_metadata(s.dest.join(p)).unwrap().ino();
    assert_eq!(ino("bin/busybox"), ino("bin/sh"));
    assert_eq!(ino("bin/busybox"), ino("usr/bin/ls"));
    assert_eq!(fs::metadata(s.dest.join("bin/busybox")).unwrap().nlink(), 3);
    assert_eq!(
        listing(&s.dest),
        expect(&[
            ("/bin", "dir 755"),
            ("/bin/busybox", "file 755 bb"),
            ("/bin/sh", "file 755 bb"),
            ("/bin/a", "symlink -> busybox"),
            ("/bin/b", "symlink -> /bin/a"),
            ("/bin/c", "file 644 now a file"),
            ("/usr", "dir 755"),
            ("/usr/bin", "dir 755"),
            ("/usr/bin/ls", "file 755 bb"),
        ])
    );
    // A hard link to something no layer made is an error naming the entry.
    let bad = Layer::new()
        .hardlink("bin/x", "bin/missing")
        .finish(Compression::None);
    let err = s.apply(&bad, Compression::None).unwrap_err().to_string();
    assert!(
        err.contains("bin/x") && err.contains("does not exist"),
        "{err}"
    );
}

fn special_layer() -> Vec<u8> {
    Layer::new()
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file_owned("usr/bin/passwd", "suid", 0o4755, 0, 0)
        .file_owned("usr/bin/wall", "sgid", 0o2755, 0, 5)
        .dir("tmp", 0o1777)
        .dir("home", 0o755)
        .dir("home/app", 0o700)
        .file_owned("home/app/data", "mine", 0o600, 1000, 2000)
        .file_owned("home/app/big-ids", "ids", 0o640, 100_000, 70_000)
        .file_owned("home/app/we\"ird name", "q", 0o604, 7, 8)
        .dir("dev", 0o755)
        .device(tar::EntryType::Char, "dev/null", 0o666, 1, 3)
        .device(tar::EntryType::Block, "dev/loop9", 0o660, 7, 9)
        .device(tar::EntryType::Fifo, "dev/fifo", 0o620, 0, 0)
        .symlink("usr/bin/pw", "passwd")
        .hardlink("usr/bin/passwd2", "usr/bin/passwd")
        .finish(Compression::Gzip)
}

fn special_expected() -> BTreeMap<String, String> {
    expect(&[
        ("/usr", "dir 755 0:0"),
        ("/usr/bin", "dir 755 0:0"),
        ("/usr/bin/passwd", "file 4755 0:0 suid"),
        ("/usr/bin/passwd2", "file 4755 0:0 suid"),
        ("/usr/bin/pw", "symlink -> passwd 0:0"),
        ("/usr/bin/wall", "file 2755 0:5 sgid"),
        ("/tmp", "dir 1777 0:0"),
        ("/home", "dir 755 0:0"),
        ("/home/app", "dir 700 0:0"),
        ("/home/app/data", "file 600 1000:2000 mine"),
        ("/home/app/big-ids", "file 640 100000:70000 ids"),
        ("/home/app/we\"ird name", "file 604 7:8 q"),
        ("/dev", "dir 755 0:0"),
        ("/dev/null", "char 666 0:0 1:3"),
        ("/dev/loop9", "block 660 0:0 7:9"),
        ("/dev/fifo", "fifo 620 0:0"),
    ])
}

/// As root, setuid/setgid/sticky, uid/gid and device nodes land on disk.
#[test]
fn modes_owners_and_devices_applied_as_root() {
    if !is_root() {
        eprintln!("SKIP modes_owners_and_devices_applied_as_root: needs root (chown, mknod)");
        return;
    }
    let s = Scratch::new();
    s.apply(&special_layer(), Compression::Gzip).unwrap();
    assert_eq!(listing_owned(&s.dest), special_expected());
    // mtimes come from the layer, also for directories that got children later.
    assert_eq!(
        fs::metadata(s.dest.join("usr/bin")).unwrap().mtime(),
        1_600_000_000
    );
    assert_eq!(
        fs::symlink_metadata(s.dest.join("usr/bin/pw"))
            .unwrap()
            .mtime(),
        1_600_000_000
    );
}

/// Without applying ownership (as an unprivileged builder would), the tree stays owned by the
/// builder and the image still gets the true owners, modes and device nodes.
#[test]
fn recorded_ownership_lands_in_the_image() {
    let s = Scratch::new();
    let opts = UnpackOptions {
        ownership: Ownership::Record,
        ..Default::default()
    };
    s.apply_with(&special_layer(), Compression::Gzip, &opts)
        .unwrap();
    let me = nix::unistd::geteuid().as_raw();
    let data = fs::metadata(s.dest.join("home/app/data")).unwrap();
    assert_eq!(data.uid(), me, "recorded, not applied");
    assert!(
        fs::metadata(s.dest.join("dev/null")).unwrap().is_file(),
        "device placeholder"
    );
    let image = s.dest.with_file_name("rootfs.img");
    build_rootfs_image(&s.dest, &image).unwrap();
    // Read back through debugfs (works without root).
    let stat = |p: &str| debugfs(&image, &format!("stat {p}"));
    let passwd = stat("/usr/bin/passwd");
    assert!(
        passwd.contains("Mode:  04755") && passwd.contains("User:     0"),
        "{passwd}"
    );
    let data = stat("/home/app/data");
    assert!(
        data.contains("User:  1000")
            && data.contains("Group:  2000")
            && data.contains("Mode:  0600"),
        "{data}"
    );
    let big = stat("/home/app/big-ids");
    assert!(
        big.contains("User: 100000") && big.contains("Group: 70000"),
        "{big}"
    );
    let null = stat("/dev/null");
    assert!(
        null.contains("Type: character special")
            && null.contains("Device major/minor number: 01:03"),
        "{null}"
    );
    let tmp = stat("/tmp");
    assert!(
        tmp.contains("Mode:  01777") && tmp.contains("Type: directory"),
        "{tmp}"
    );
    if is_root() {
        let mounted = Mount::new(&image);
        assert_eq!(listing_owned(mounted.path()), special_expected());
    } else {
        eprintln!("SKIP loop-mount half of recorded_ownership_lands_in_the_image: needs root");
    }
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A read-only loop mount, unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    fn new(image: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-o", "ro,loop"])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// The image of a multi-layer tree, loop-mounted read-only with the kernel's driver, shows
/// exactly the tree: contents, owners, modes, symlinks, hard links, setuid bits. Both formats.
#[test]
fn built_image_mounts_with_the_right_tree() {
    if !is_root() {
        eprintln!("SKIP built_image_mounts_with_the_right_tree: loop-mounting needs root");
        return;
    }
    let s = Scratch::new();
    s.apply(&special_layer(), Compression::Gzip).unwrap();
    let l2 = Layer::new()
        .whiteout("home/app/.wh.big-ids")
        .file_owned("etc/shadow", "secret", 0o640, 0, 42)
        .finish(Compression::Zstd);
    s.apply(&l2, Compression::Zstd).unwrap();
    let tree = listing_owned(&s.dest);
    assert!(tree.contains_key("/etc/shadow") && !tree.contains_key("/home/app/big-ids"));
    for format in [RootfsFormat::Ext4, RootfsFormat::Erofs] {
        let image = s.dest.with_file_name(format!("rootfs-{format:?}.img"));
        let info = build_rootfs_image_with(
            &s.dest,
            &image,
            &RootfsOptions {
                format,
                compress: false,
            },
        )
        .unwrap();
        assert_eq!(info.format, format);
        assert!(info.size_bytes > 0 && image.exists());
        let mounted = Mount::new(&image);
        assert_eq!(listing_owned(mounted.path()), tree, "{format:?} image");
        let ino = |p: &str| fs::metadata(mounted.path().join(p)).unwrap().ino();
        assert_eq!(
            ino("usr/bin/passwd"),
            ino("usr/bin/passwd2"),
            "{format:?}: hard link kept"
        );
        // Read-only: writes fail.
        assert!(fs::write(mounted.path().join("new"), "x").is_err());
    }
    // Deterministic: the same tree gives the same ext4 bytes.
    let a = s.dest.with_file_name("a.img");
    let b = s.dest.with_file_name("b.img");
    build_rootfs_image(&s.dest, &a).unwrap();
    build_rootfs_image(&s.dest, &b).unwrap();
    assert!(
        fs::read(&a).unwrap() == fs::read(&b).unwrap(),
        "ext4 image not reproducible"
    );
}

fn assert_refused(s: &Scratch, layer: Vec<u8>, entry: &str) {
    let err = s.apply(&layer, Compression::None).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(entry), "error should name {entry:?}: {msg}");
    s.assert_sentinel_untouched();
}

#[test]
fn dot_dot_paths_are_refused() {
    let s = Scratch::new();
    assert_refused(
        &s,
        Layer::new()
            .file("../sentinel/file", "pwned")
            .finish(Compression::None),
        "../sentinel/file",
    );
    assert_refused(
        &s,
        Layer::new()
            .file("a/../../sentinel/evil", "x")
            .finish(Compression::None),
        "a/../../sentinel/evil",
    );
    assert!(listing(&s.dest).is_empty());
}

#[test]
fn absolute_paths_are_confined() {
    let s = Scratch::new();
    let abs = format!("{}/evil", s.sentinel.display());
    s.apply(
        &Layer::new()
            .file(&abs, "confined")
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.assert_sentinel_untouched();
    let inside = s.dest.join(abs.trim_start_matches('/'));
    assert_eq!(fs::read_to_string(inside).unwrap(), "confined");
}

/// Layer 1 plants `etc -> /etc` (and friends); layer 2 writes through it.
#[test]
fn symlinks_planted_by_an_earlier_layer_never_lead_out() {
    let sentinel_abs = |s: &Scratch| s.sentinel.display().to_string();
    // Absolute symlink to a host directory that does not exist inside the rootfs.
    let s = Scratch::new();
    s.apply(
        &Layer::new()
            .symlink("etc", &sentinel_abs(&s))
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    assert_refused(
        &s,
        Layer::new()
            .file("etc/file", "pwned")
            .finish(Compression::None),
        "etc/file",
    );
    // `etc -> /etc`: resolves to itself inside the root.
    let s = Scratch::new();
    s.apply(
        &Layer::new()
            .symlink("etc", "/etc")
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    assert_refused(
        &s,
        Layer::new()
            .file("etc/passwd", "pwned")
            .finish(Compression::None),
        "etc/passwd",
    );
    assert_ne!(
        fs::read_to_string("/etc/passwd").unwrap_or_default(),
        "pwned"
    );
    // Relative escape `up -> ../..`: clamped to the root, so the write lands inside.
    let s = Scratch::new();
    s.apply(
        &Layer::new()
            .symlink("up", "../../../..")
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.apply(
        &Layer::new()
            .file("up/sentinel/file", "inside")
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.assert_sentinel_untouched();
    assert_eq!(
        fs::read_to_string(s.dest.join("sentinel/file")).unwrap(),
        "inside"
    );
    // Same layer: `root -> /` then `root/x`: confined too.
    let s = Scratch::new();
    s.apply(
        &Layer::new()
            .symlink("root", "/")
            .file("root/x", "inside")
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    assert_eq!(fs::read_to_string(s.dest.join("x")).unwrap(), "inside");
    s.assert_sentinel_untouched();
    // A file replacing a symlink to outside replaces the link, never writes through it.
    let s = Scratch::new();
    let target = format!("{}/file", sentinel_abs(&s));
    s.apply(
        &Layer::new().symlink("f", &target).finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.apply(
        &Layer::new().file("f", "replaced").finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.assert_sentinel_untouched();
    assert_eq!(fs::read_to_string(s.dest.join("f")).unwrap(), "replaced");
    // A directory entry over a symlink to outside: the link is replaced by a directory.
    let s = Scratch::new();
    s.apply(
        &Layer::new()
            .symlink("d", &sentinel_abs(&s))
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.apply(
        &Layer::new().dir("d", 0o700).finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    assert!(fs::symlink_metadata(s.dest.join("d")).unwrap().is_dir());
    s.assert_sentinel_untouched();
}

#[test]
fn hardlinks_to_outside_are_refused() {
    let s = Scratch::new();
    let outside = format!("{}/file", s.sentinel.display());
    assert_refused(
        &s,
        Layer::new()
            .hardlink("h1", "../sentinel/file")
            .finish(Compression::None),
        "h1",
    );
    // Absolute: looked up inside the rootfs, where it does not exist.
    assert_refused(
        &s,
        Layer::new()
            .hardlink("h2", &outside)
            .finish(Compression::None),
        "h2",
    );
    // Through a symlink planted to the outside.
    s.apply(
        &Layer::new()
            .symlink("s", &s.sentinel.display().to_string())
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    assert_refused(
        &s,
        Layer::new()
            .hardlink("h3", "s/file")
            .finish(Compression::None),
        "h3",
    );
    assert_refused(
        &s,
        Layer::new().hardlink("h4", "/").finish(Compression::None),
        "h4",
    );
}

#[test]
fn whiteouts_naming_dot_dotdot_or_the_root_are_refused() {
    let s = Scratch::new();
    s.apply(
        &Layer::new()
            .dir("a", 0o755)
            .file("a/f", "x")
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    assert_refused(
        &s,
        Layer::new().whiteout("a/.wh..").finish(Compression::None),
        "a/.wh..",
    );
    assert_refused(
        &s,
        Layer::new().whiteout("a/.wh...").finish(Compression::None),
        "a/.wh...",
    );
    assert_refused(
        &s,
        Layer::new().whiteout(".wh.").finish(Compression::None),
        ".wh.",
    );
    assert_refused(
        &s,
        Layer::new()
            .whiteout("../.wh.sentinel")
            .finish(Compression::None),
        "../.wh.sentinel",
    );
    // Through a symlink to the outside: resolved inside the rootfs, where nothing matches.
    s.apply(
        &Layer::new()
            .symlink("s", &s.sentinel.display().to_string())
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.apply(
        &Layer::new()
            .whiteout("s/.wh.file")
            .finish(Compression::None),
        Compression::None,
    )
    .unwrap();
    s.assert_sentinel_untouched();
    assert_eq!(fs::read_to_string(s.dest.join("a/f")).unwrap(), "x");
}

#[test]
fn decompression_bomb_stops_at_the_cap() {
    let s = Scratch::new();
    let zeros = "\0".repeat(32 << 20);
    let bomb = Layer::new().file("zeros", &zeros).finish(Compression::Gzip);
    assert!(
        bomb.len() < 1 << 20,
        "a real bomb: {} compressed bytes",
        bomb.len()
    );
    let opts = UnpackOptions {
        max_total_bytes: 8 << 20,
        ..Default::default()
    };
    let err = s.apply_with(&bomb, Compression::Gzip, &opts).unwrap_err();
    assert!(
        matches!(err, UnpackError::TooLarge { limit } if limit == 8 << 20),
        "{err}"
    );
    assert!(fs::metadata(s.dest.join("zeros"))
        .map(|m| m.len() <= 8 << 20)
        .unwrap_or(true));
    // The cap covers all layers of an image: two 5 MiB layers pass 8 MiB together.
    let s = Scratch::new();
    let five = "\0".repeat(5 << 20);
    s.apply_with(
        &Layer::new().file("one", &five).finish(Compression::Zstd),
        Compression::Zstd,
        &opts,
    )
    .unwrap();
    let err = s
        .apply_with(
            &Layer::new().file("two", &five).finish(Compression::Zstd),
            Compression::Zstd,
            &opts,
        )
        .unwrap_err();
    assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
}

#[test]
fn truncated_or_corrupt_gzip_is_a_clear_error() {
    let layer = Layer::new()
        .file("a", &"data ".repeat(100_000))
        .file("b", "tail")
        .finish(Compression::Gzip);
    let s = Scratch::new();
    let err = s
        .apply(&layer[..layer.len() / 2], Compression::Gzip)
        .unwrap_err();
    assert!(matches!(err, UnpackError::Read(_)), "{err}");
    assert!(err.to_string().contains("corrupt or truncated"), "{err}");
    let mut corrupt = layer.clone();
    let mid = corrupt.len() / 2;
    for b in &mut corrupt[mid..mid + 64] {
        *b ^= 0x5a;
    }
    let s = Scratch::new();
    assert!(matches!(
        s.apply(&corrupt, Compression::Gzip).unwrap_err(),
        UnpackError::Read(_)
    ));
    // Not gzip at all.
    let s = Scratch::new();
    let plain = Layer::new().file("a", "x").finish(Compression::None);
    assert!(matches!(
        s.apply(&plain, Compression::Gzip).unwrap_err(),
        UnpackError::Read(_)
    ));
    // A trailer whose CRC does not match (only noticed after the tar's end).
    let mut bad_crc = layer.clone();
    let n = bad_crc.len();
    bad_crc[n - 8] ^= 0xff;
    let s = Scratch::new();
    assert!(matches!(
        s.apply(&bad_crc, Compression::Gzip).unwrap_err(),
        UnpackError::Read(_)
    ));
}

/// A layer with PAX xattrs: applied on disk as root, else recorded; in the image either way.
#[test]
fn xattrs_reach_the_image() {
    for ownership in [Ownership::Auto, Ownership::Record] {
        let s = Scratch::new();
        let mut layer = Layer::new();
        layer
            .builder
            .append_pax_extensions([("SCHILY.xattr.user.fnvm", &b"hello"[..])])
            .unwrap();
        let data = layer.file("tagged", "x").finish(Compression::None);
        let opts = UnpackOptions {
            ownership,
            ..Default::default()
        };
        s.apply_with(&data, Compression::None, &opts).unwrap();
        let image = s.dest.with_file_name("rootfs.img");
        build_rootfs_image(&s.dest, &image).unwrap();
        let got = debugfs(&image, "ea_get /tagged user.fnvm");
        assert!(got.contains("hello"), "{ownership:?}: {got}");
        // The side table goes away with the tree.
        forget_tree_state(&s.dest).unwrap();
        let sidecar = s.dest.with_file_name(".rootfs.fnvm-unpack.json");
        assert!(!sidecar.exists());
    }
}
