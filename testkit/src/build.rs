//! Where the whole-system tests find what they run: the workspace, cargo's target directory,
//! statically built workspace binaries (the agent, the example function) and the user's cache
//! for test inputs that are slow to make.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (this crate sits in its `testkit/`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ sits in the workspace root")
        .to_path_buf()
}

/// Cargo's target directory (the parent of the profile directory holding `fnvm`).
pub fn target_dir(fnvm: &Path) -> PathBuf {
    fnvm.parent()
        .and_then(Path::parent)
        .expect("fnvm lives in target/<profile>/")
        .to_path_buf()
}

/// Builds a workspace binary statically (like scripts/setup.sh builds the agent) unless
/// `env_override` names one; returns its path.
pub fn static_binary(fnvm: &Path, package: &str, env_override: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(env_override) {
        return PathBuf::from(bin);
    }
    let release = fnvm.parent().and_then(Path::file_name) == Some("release".as_ref());
    let mut cargo = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cargo
        .args([
            "build",
            "-p",
            package,
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .current_dir(workspace());
    if release {
        cargo.arg("--release");
    }
    let status = cargo.status().expect("cannot run cargo");
    assert!(status.success(), "building the static {package} failed");
    target_dir(fnvm)
        .join("x86_64-unknown-linux-gnu")
        .join(if release { "release" } else { "debug" })
        .join(package)
}

/// The user's cache for test inputs that are slow to make (`~/.cache/fnvm/test-images`).
pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    let dir = base.join("fnvm/test-images");
    std::fs::create_dir_all(&dir).expect("cannot create the test image cache");
    dir
}
