//! The leak check every whole-system test ends with: nothing of a stopped instance may be left
//! on the host (directory, processes, mounts, loop devices, cgroups).

use std::path::{Path, PathBuf};

use crate::run::FnvmRun;

/// Asserts nothing of an instance is left: its directory, processes naming it, mounts naming
/// it, loop devices backed by files in it (or by `rootfs_image`), cgroups named after it.
pub fn assert_nothing_left(home: &Path, instance_id: &str, rootfs_image: Option<&Path>) {
    let instances = home.join("instances");
    if let Ok(entries) = std::fs::read_dir(&instances) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            assert!(
                !name.contains(instance_id),
                "the instance directory {} is left behind",
                e.path().display()
            );
        }
    }
    for proc_entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = proc_entry.file_name().to_string_lossy().to_string();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(proc_entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(instance_id),
            "process {pid} of the instance is left behind: {cmdline}"
        );
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mountinfo.lines() {
        assert!(
            !line.contains(instance_id),
            "a mount is left behind: {line}"
        );
    }
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim();
        assert!(
            !backing.contains(instance_id),
            "loop device {name} is left attached to {backing}"
        );
        if let Some(image) = rootfs_image {
            assert!(
                Path::new(backing) != image,
                "loop device {name} is left attached to the rootfs image {backing}"
            );
        }
    }
    let mut stack = vec![(PathBuf::from("/sys/fs/cgroup"), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            assert!(
                !name.contains(instance_id),
                "the cgroup {} is left behind",
                e.path().display()
            );
            if depth < 4 {
                stack.push((e.path(), depth + 1));
            }
        }
    }
}

/// The rootfs image the pipeline built for the image fnvm reported (`fnvm: image REF (DIGEST)`).
pub fn rootfs_image_of(run: &FnvmRun) -> Option<PathBuf> {
    let line = run
        .stderr
        .snapshot()
        .into_iter()
        .find(|l| l.starts_with("fnvm: image "))?;
    let digest = line
        .split("(sha256:")
        .nth(1)?
        .split(')')
        .next()?
        .to_string();
    std::fs::canonicalize(run.home.join("rootfs").join(digest).join("rootfs.img")).ok()
}
