//! The image formats side by side: ext4, EROFS and lz4hc EROFS built from one tree, on build
//! time, size and the time to read every file from a cold page cache.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use fnvm_benches::{median, ms, Table};
use fnvm_rootfs_builder::rootfs::RootfsFormat;
use fnvm_rootfs_builder::unpack::Ownership;

use super::image::LayerBlob;
use super::{build, fnvm_unpack, remove, sh, timed};

/// Builds ext4, EROFS and lz4hc EROFS from one tree: build time, size, cold read time.
pub(crate) fn formats(runs: usize, layers: &[LayerBlob], scratch: &Path, root: bool) -> Result<()> {
    let tree = scratch.join("fmt-tree");
    fnvm_unpack(layers, &tree, Ownership::Auto)?;
    let tree_bytes = du(&tree)?;
    let mut t = Table::new(&[
        "image format",
        "build median",
        "image size",
        "allocated",
        "cold read all files",
    ]);
    for (name, format, compress) in [
        ("ext4 (mkfs.ext4 -d)", RootfsFormat::Ext4, false),
        ("EROFS uncompressed", RootfsFormat::Erofs, false),
        ("EROFS lz4hc", RootfsFormat::Erofs, true),
    ] {
        let image = scratch.join("fmt.img");
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..runs {
            remove(&image);
            let (d, s) = timed(|| build(&tree, &image, format, compress))?;
            times.push(d);
            size = s;
        }
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&image)?.blocks() * 512
        };
        let read = if root {
            cold_read(&image, scratch)?
        } else {
            "- (needs root)".to_owned()
        };
        t.row(vec![
            name.to_owned(),
            ms(median(&times)),
            format!("{:.1} MB", size as f64 / 1e6),
            format!("{:.1} MB", allocated as f64 / 1e6),
            read,
        ]);
        remove(&image);
    }
    remove(&tree);
    println!(
        "\nrootfs image formats, same tree ({:.1} MB of files), {runs} builds each\n",
        tree_bytes as f64 / 1e6
    );
    t.print();
    Ok(())
}

/// Loop-mounts `image` read-only, drops the page cache and reads every file.
pub(crate) fn cold_read(image: &Path, scratch: &Path) -> Result<String> {
    let mnt = scratch.join("mnt");
    fs::create_dir_all(&mnt)?;
    sh(
        Command::new("mount")
            .args(["-o", "ro,loop"])
            .arg(image)
            .arg(&mnt),
        "mount",
    )?;
    let result = (|| {
        let _ = Command::new("sync").status();
        fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")?;
        let (d, bytes) = timed(|| read_all(&mnt))?;
        Ok(format!(
            "{} ({:.0} MB/s)",
            ms(d),
            bytes as f64 / 1e6 / d.as_secs_f64()
        ))
    })();
    let _ = Command::new("umount").arg(&mnt).status();
    result
}

pub(crate) fn read_all(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            total += read_all(&entry.path())?;
        } else if ft.is_file() {
            let mut f = File::open(entry.path())?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
    }
    Ok(total)
}

pub(crate) fn du(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        if meta.is_dir() {
            total += du(&entry.path())?;
        } else if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}
