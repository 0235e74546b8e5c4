//! The bundled example function's image (`fnvm demo`): the static `fnvm-hello` binary in a
//! one-layer OCI layout, written once per binary content into the home's cache.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::oci_layout::{base_dirs, ensure_layout, Entry, Layer, LayoutError, RunConfigSpec};

/// Why the example image could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ExampleImageError {
    /// The example function's binary could not be read.
    #[error("cannot read the example function's binary {}", path.display())]
    ReadBinary {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The example function's binary is not an ELF executable.
    #[error("{} is not an ELF executable", path.display())]
    NotElf { path: PathBuf },
    /// Its OCI layout could not be written.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// The command that builds the example function's static binary.
pub const HELLO_BUILD_COMMAND: &str = "RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p fnvm-hello --target x86_64-unknown-linux-gnu";

/// Bumped whenever the example image's recipe below changes.
const EXAMPLE_RECIPE: &str = "fnvm-hello image v1";

/// Builds (once per binary content) the example function's OCI layout under `cache_dir` from
/// the static `fnvm-hello` at `binary_path` and returns the reference to pull it by.
pub fn ensure_example_image(
    cache_dir: &Path,
    binary_path: &Path,
) -> Result<String, ExampleImageError> {
    let binary = fs::read(binary_path).map_err(|source| ExampleImageError::ReadBinary {
        path: binary_path.to_path_buf(),
        source,
    })?;
    if binary.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ExampleImageError::NotElf {
            path: binary_path.to_path_buf(),
        });
    }
    let mut key = Sha256::new();
    key.update(EXAMPLE_RECIPE.as_bytes());
    key.update(&binary);
    let key = hex::encode(key.finalize());
    let mut entries = base_dirs();
    entries.extend([
        Entry::Dir {
            path: "usr".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "usr/local".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "usr/local/bin".into(),
            mode: 0o755,
        },
        Entry::File {
            path: "usr/local/bin/fnvm-hello".into(),
            mode: 0o755,
            data: binary,
        },
    ]);
    let config = RunConfigSpec {
        entrypoint: vec!["/usr/local/bin/fnvm-hello".into()],
        cmd: vec![],
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        working_dir: Some("/var/user".into()),
        user: None,
    };
    Ok(ensure_layout(
        &cache_dir.join(format!("hello-{}", &key[..16])),
        &[Layer::Entries(entries)],
        &config,
    )?)
}
