//! The Linux guest for the boot timing: the static agent as /sbin/init on an ext4 image.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// fnvm's guest kernel from guest-kernel/build.sh and its default cache (minutes the first
/// time on a machine, then instant).
pub fn kernel(workspace: &Path) -> Result<PathBuf> {
    let out = Command::new("bash")
        .arg(workspace.join("guest-kernel/build.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run guest-kernel/build.sh")?;
    if !out.status.success() {
        bail!("the guest kernel build failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    Ok(PathBuf::from(
        stdout.lines().last().context("build.sh printed no path")?,
    ))
}

pub fn static_agent(workspace: &Path, cargo: &std::ffi::OsStr) -> Result<PathBuf> {
    if let Some(explicit) = std::env::var_os("FNVM_AGENT_BIN") {
        return Ok(PathBuf::from(explicit));
    }
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "fnvm-agent",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace)
        .status()?;
    if !status.success() {
        bail!("building the static agent failed ({status})");
    }
    Ok(workspace.join("target/x86_64-unknown-linux-gnu/release/fnvm-agent"))
}

pub fn rootfs_image(scratch: &Path, agent: &Path) -> Result<PathBuf> {
    let root = scratch.join("root");
    for dir in ["sbin", "proc", "sys", "dev", "mnt/fnvm-test", "tmp"] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::copy(agent, root.join("sbin/init"))?;
    let image = scratch.join("rootfs.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("64M")
        .output()
        .context("cannot run mkfs.ext4 (Debian: e2fsprogs)")?;
    if !out.status.success() {
        bail!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(image)
}
