//! The helpers every whole-system test of `fnvm` wrote for itself: the binary under test and
//! the static agent it runs, fresh homes and the image cache in cargo's scratch directory, the
//! lock that serializes tests sharing the host, and an HTTP client that reports every status.
//!
//! Only the test crate knows the `fnvm` binary and cargo's scratch directory (`env!` at its
//! compile time), so it names them once with [`here!`](crate::here) and the helpers take them
//! from the [`Here`] it gets.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::build::static_binary;

/// What a whole-system test runs and where it may write: the `fnvm` binary cargo built for it
/// and cargo's scratch directory for tests (`CARGO_TARGET_TMPDIR`).
#[derive(Debug, Clone, Copy)]
pub struct Here {
    /// `CARGO_BIN_EXE_fnvm` of the test crate.
    pub fnvm: &'static str,
    /// `CARGO_TARGET_TMPDIR` of the test crate.
    pub tmp: &'static str,
}

/// The [`Here`] of the calling test crate: `const HERE: Here = fnvm_testkit::here!();`.
#[macro_export]
macro_rules! here {
    () => {
        $crate::Here {
            fnvm: env!("CARGO_BIN_EXE_fnvm"),
            tmp: env!("CARGO_TARGET_TMPDIR"),
        }
    };
}

impl Here {
    /// The `fnvm` binary under test.
    pub fn fnvm(&self) -> &'static Path {
        Path::new(self.fnvm)
    }

    /// The static agent every sandbox runs as PID 1: `$FNVM_AGENT_BIN`, else built once per test
    /// binary in the profile of `fnvm`.
    pub fn agent(&self) -> &'static Path {
        static AGENT: OnceLock<PathBuf> = OnceLock::new();
        AGENT.get_or_init(|| static_binary(self.fnvm(), "fnvm-agent", "FNVM_AGENT_BIN"))
    }

    /// Cargo's scratch directory for tests.
    pub fn tmp(&self) -> PathBuf {
        PathBuf::from(self.tmp)
    }

    /// Where the run and service tests keep the image layouts they build (shared by them, so
    /// each image is written and its rootfs built once per target directory).
    pub fn layouts(&self) -> PathBuf {
        self.tmp().join("run-tests-images")
    }

    /// An empty directory `name` in the scratch directory (what was there is removed first): a
    /// home of its own for one test.
    pub fn fresh_home(&self, name: &str) -> PathBuf {
        let home = self.tmp().join(name);
        let _ = std::fs::remove_dir_all(&home);
        std::fs::create_dir_all(&home).unwrap();
        home
    }
}

/// Serializes tests that share the test home and check for leftovers.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// An HTTP client that reports every status instead of erroring on 4xx/5xx.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .allow_non_standard_methods(true)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}
