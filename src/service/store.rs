//! The persistent function store: one JSON file per function under
//! `<home>/service/functions/<namespace>/<name>.json`, each replaced atomically (temp file, fsync,
//! rename, fsync of the directory), so a crash leaves the old record or the new one, never half.
//!
//! Files rather than an embedded database (redb, SQLite): records are few and small, each is
//! written on its own (no cross-record transactions needed), the format is inspectable with
//! `cat`, and it costs no dependency. Namespace and name are validated to `[A-Za-z0-9_-]` before
//! they become path components.
//!
//! What is stored: the spec last asked for, the deploy state, and the deployed version's spec and
//! pinned image digest. Never credentials: they are not part of any of these types.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::model::{FunctionKey, FunctionSpec, FunctionState};

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file of the function store cannot be read or written.
    #[error("function store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record in the function store does not parse.
    #[error("function store {path}: not a valid record: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A namespace or function name has characters, or a length, that are not allowed.
    #[error("{what} {value:?}: use 1-60 letters, digits, '-' or '_', starting with a letter")]
    BadName { what: &'static str, value: String },
}

/// The deployed version as stored: enough to rebuild it from the rootfs cache after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployedVersion {
    pub version: String,
    /// The manifest digest the rootfs cache is keyed by.
    pub image_digest: String,
    pub spec: FunctionSpec,
}

/// One function as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFunction {
    pub key: FunctionKey,
    pub spec: FunctionSpec,
    #[serde(flatten)]
    pub state: FunctionState,
    #[serde(default)]
    pub deployed: Option<DeployedVersion>,
    pub created_at: String,
    pub updated_at: String,
}

/// The store directory of one home.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// True for names that are safe as path components and HTTP header values.
pub fn valid_name(s: &str) -> bool {
    (1..=60).contains(&s.len())
        && s.as_bytes()[0].is_ascii_alphabetic()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks both parts of a key.
pub fn check_key(key: &FunctionKey) -> Result<(), StoreError> {
    for (what, value) in [("namespace", &key.namespace), ("function name", &key.name)] {
        if !valid_name(value) {
            return Err(StoreError::BadName {
                what,
                value: value.clone(),
            });
        }
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Store {
    /// Opens (creating) `<home>/service/functions`.
    pub fn open(home: &Path) -> Result<Self, StoreError> {
        let root = home.join("service").join("functions");
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        Ok(Self { root })
    }

    fn path_of(&self, key: &FunctionKey) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self
            .root
            .join(&key.namespace)
            .join(format!("{}.json", key.name)))
    }

    /// Every stored function. Leftover temp files of an interrupted write are removed.
    pub fn load_all(&self) -> Result<Vec<StoredFunction>, StoreError> {
        let mut out = Vec::new();
        for ns in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let ns = ns.map_err(io_err(&self.root))?.path();
            if !ns.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&ns).map_err(io_err(&ns))? {
                let path = entry.map_err(io_err(&ns))?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.starts_with(".tmp-") {
                    let _ = fs::remove_file(&path);
                    continue;
                }
                if !name.ends_with(".json") {
                    continue;
                }
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                let record: StoredFunction =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: path.clone(),
                        source,
                    })?;
                out.push(record);
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Writes `record` atomically: temp file in the same directory, fsync, rename, fsync dir.
    pub fn put(&self, record: &StoredFunction) -> Result<(), StoreError> {
        let path = self.path_of(&record.key)?;
        let dir = path
            .parent()
            .expect("records live in a namespace directory");
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = dir.join(format!(".tmp-{}-{}", record.key.name, std::process::id()));
        let bytes = serde_json::to_vec_pretty(record).expect("records serialize");
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            io_err(&path)(e)
        })
    }

    /// Removes a function's record (absent is fine).
    pub fn delete(&self, key: &FunctionKey) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(&path)(e)),
        }
        let dir = path
            .parent()
            .expect("records live in a namespace directory");
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> StoredFunction {
        StoredFunction {
            key: FunctionKey::new("default", name),
            spec: serde_json::from_str(r#"{"image":"r/x@sha256:00"}"#).unwrap(),
            state: FunctionState::Failed {
                reason: "boom".into(),
            },
            deployed: Some(DeployedVersion {
                version: "v1".into(),
                image_digest: "sha256:00".into(),
                spec: serde_json::from_str(r#"{"image":"r/x@sha256:00"}"#).unwrap(),
            }),
            created_at: "t0".into(),
            updated_at: "t1".into(),
        }
    }

    #[test]
    fn records_round_trip_are_replaced_and_deleted() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        store.put(&record("a")).unwrap();
        let mut b = record("b");
        store.put(&b).unwrap();
        b.state = FunctionState::Active;
        store.put(&b).unwrap();
        // A torn temp file from a crash is ignored and cleaned up.
        fs::write(home.path().join("service/functions/default/.tmp-c-1"), b"{").unwrap();
        let reopened = Store::open(home.path()).unwrap();
        assert_eq!(reopened.load_all().unwrap(), vec![record("a"), b.clone()]);
        reopened.delete(&b.key).unwrap();
        reopened.delete(&b.key).unwrap();
        assert_eq!(reopened.load_all().unwrap(), vec![record("a")]);
        assert!(!home
            .path()
            .join("service/functions/default/.tmp-c-1")
            .exists());
    }

    #[test]
    fn names_that_could_escape_the_directory_are_refused() {
        let home = tempfile::tempdir().unwrap();
        let store = Store::open(home.path()).unwrap();
        let mut r = record("a");
        r.key.namespace = "../x".into();
        assert!(matches!(store.put(&r), Err(StoreError::BadName { .. })));
    }
}
