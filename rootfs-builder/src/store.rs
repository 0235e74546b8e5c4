//! The content-addressed blob store, `<home>/blobs/sha256/<hex>`.
//!
//! A blob becomes visible under its digest only after its bytes were hashed, counted,
//! fsynced and found equal to what was asked for; the final step is an atomic rename of a
//! uniquely named temp file in the same directory. So a reader never sees a partial or
//! wrong blob, concurrent pulls of the same blob are safe (the last rename wins with
//! identical bytes), and a blob shared by many images is stored once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::source::BlobSink;

/// Prefix of in-progress files; never a valid digest, so never mistaken for a blob.
const TEMP_PREFIX: &str = ".ingest-";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or directory of the blob store cannot be read or written.
    #[error("blob store: cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A blob's bytes do not hash to its digest.
    #[error("blob {expected} failed verification: its bytes hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    /// A blob's size differs from the size its descriptor says.
    #[error("blob {digest} is {actual} bytes, but its descriptor says {expected}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
}

/// The error a sink's `write` returns when a source sends more than the descriptor size.
#[derive(Debug, thiserror::Error)]
#[error(
    "blob {digest} is larger than the {expected} bytes its descriptor declares; download cut off"
)]
pub struct BlobTooLarge {
    pub digest: Digest,
    pub expected: u64,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A blob store rooted at a directory (normally `<home>/blobs`).
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    /// Opens (creating) `<root>/sha256` and removes temp files left by dead processes.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let dir = root.join("sha256");
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let store = Self { dir };
        store.remove_stale_temps();
        Ok(store)
    }

    /// Where blob `digest` lives (whether or not it is present).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// True if the blob is present with the expected size. Blobs only ever appear here
    /// after verification, so presence plus size is trusted without rehashing.
    pub fn contains(&self, digest: &Digest, size: u64) -> bool {
        fs::metadata(self.path(digest)).is_ok_and(|m| m.is_file() && m.len() == size)
    }

    /// Opens a present blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File, StoreError> {
        let path = self.path(digest);
        File::open(&path).map_err(io_err("open", &path))
    }

    /// Reads a present blob whole, refusing anything over `limit` bytes (configs, manifests).
    pub fn read_small(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest);
        let len = fs::metadata(&path).map_err(io_err("stat", &path))?.len();
        if len > limit {
            return Err(StoreError::SizeMismatch {
                digest: digest.clone(),
                expected: limit,
                actual: len,
            });
        }
        fs::read(&path).map_err(io_err("read", &path))
    }

    /// Starts writing blob `digest` of `size` bytes. Nothing is visible until
    /// [`Ingest::commit`]; dropping the ingest removes its temp file.
    pub fn ingest(&self, digest: &Digest, size: u64) -> Result<Ingest, StoreError> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(
            "{TEMP_PREFIX}{}.{}.{n}",
            digest.hex(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        Ok(Ingest {
            file,
            tmp_path: tmp,
            final_path: self.path(digest),
            dir: self.dir.clone(),
            hasher: Sha256::new(),
            written: 0,
            expected: digest.clone(),
            size,
            done: false,
        })
    }

    /// Temp files whose owning process is gone are leftovers of a killed pull.
    fn remove_stale_temps(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(pid) = temp_owner_pid(name) {
                if !process_alive(pid) {
                    tracing::debug!(file = name, "removing a stale blob ingest file");
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// `.ingest-<hex>.<pid>.<n>` → pid.
fn temp_owner_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix(TEMP_PREFIX)?;
    let mut parts = rest.split('.');
    let _hex = parts.next()?;
    parts.next()?.parse().ok()
}

/// True if a process with this pid exists (possibly a reused pid: then the file just
/// stays until a later sweep, which is harmless).
pub(crate) fn process_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(_) => true,
    }
}

/// An in-progress blob: hashes and counts every byte it is given, refuses bytes beyond the
/// declared size, and publishes the blob only once it verifies.
pub struct Ingest {
    file: File,
    tmp_path: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
    hasher: Sha256,
    written: u64,
    expected: Digest,
    size: u64,
    done: bool,
}

impl Ingest {
    /// The digest this ingest must produce.
    pub fn expected_digest(&self) -> &Digest {
        &self.expected
    }

    /// Flushes and fsyncs, verifies size and sha256, then renames into place. On a
    /// mismatch the temp file is deleted and the error names expected and actual.
    pub fn commit(mut self) -> Result<PathBuf, StoreError> {
        self.done = true;
        let result = self.finish();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp_path);
        }
        result
    }

    fn finish(&mut self) -> Result<PathBuf, StoreError> {
        if self.written != self.size {
            return Err(StoreError::SizeMismatch {
                digest: self.expected.clone(),
                expected: self.size,
                actual: self.written,
            });
        }
        let actual = Digest::from_hasher(std::mem::take(&mut self.hasher));
        if actual != self.expected {
            return Err(StoreError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            });
        }
        self.file
            .flush()
            .and_then(|()| self.file.sync_all())
            .map_err(io_err("fsync", &self.tmp_path))?;
        fs::rename(&self.tmp_path, &self.final_path).map_err(io_err("rename", &self.final_path))?;
        // The rename is durable only once the directory entry is.
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", &self.dir))?;
        Ok(self.final_path.clone())
    }
}

impl Write for Ingest {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self.size - self.written;
        if buf.len() as u64 > room {
            return Err(io::Error::other(BlobTooLarge {
                digest: self.expected.clone(),
                expected: self.size,
            }));
        }
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl BlobSink for Ingest {
    fn bytes_written(&self) -> u64 {
        self.written
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.tmp_path);
        }
    }
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest")
            .field("expected", &self.expected)
            .field("size", &self.size)
            .field("written", &self.written)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temps(dir: &Path) -> Vec<String> {
        fs::read_dir(dir.join("sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.starts_with(TEMP_PREFIX))
            .collect()
    }

    #[test]
    fn verified_blob_is_published_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let data = b"hello blob";
        let d = Digest::of(data);
        assert!(!store.contains(&d, data.len() as u64));
        let mut a = store.ingest(&d, data.len() as u64).unwrap();
        let mut b = store.ingest(&d, data.len() as u64).unwrap();
        a.write_all(&data[..4]).unwrap();
        b.write_all(data).unwrap();
        a.write_all(&data[4..]).unwrap();
        assert_eq!(a.bytes_written(), data.len() as u64);
        let p1 = b.commit().unwrap();
        let p2 = a.commit().unwrap();
        assert_eq!(p1, p2);
        assert_eq!(fs::read(&p1).unwrap(), data);
        assert!(store.contains(&d, data.len() as u64));
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn mismatch_deletes_temp_and_names_both_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let want = Digest::of(b"good bytes");
        let mut ing = store.ingest(&want, 9).unwrap();
        ing.write_all(b"bad bytes").unwrap();
        let err = ing.commit().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&want.to_string()), "{msg}");
        assert!(msg.contains(&Digest::of(b"bad bytes").to_string()), "{msg}");
        assert!(!store.path(&want).exists());
        assert!(temps(dir.path()).is_empty());
    }

    #[test]
    fn oversized_and_short_blobs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let d = Digest::of(b"abcd");
        let mut ing = store.ingest(&d, 4).unwrap();
        let err = ing.write_all(b"abcde").unwrap_err();
        assert!(err.to_string().contains("larger than the 4 bytes"), "{err}");
        drop(ing);
        let mut ing = store.ingest(&d, 4).unwrap();
        ing.write_all(b"abc").unwrap();
        assert!(matches!(
            ing.commit(),
            Err(StoreError::SizeMismatch { actual: 3, .. })
        ));
        assert!(temps(dir.path()).is_empty());
        assert!(!store.path(&d).exists());
    }

    #[test]
    fn leftovers_of_dead_processes_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let sha = dir.path().join("sha256");
        fs::create_dir_all(&sha).unwrap();
        // pid 0x7fff_fff0 does not exist; our own pid does.
        let dead = sha.join(format!("{TEMP_PREFIX}{}.2147483632.0", "a".repeat(64)));
        let live = sha.join(format!(
            "{TEMP_PREFIX}{}.{}.0",
            "b".repeat(64),
            std::process::id()
        ));
        fs::write(&dead, b"partial").unwrap();
        fs::write(&live, b"in progress").unwrap();
        BlobStore::open(dir.path()).unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
    }
}
