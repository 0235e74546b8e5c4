//! The service's log store: every stdout/stderr line of every instance, per function, with its
//! time, stream, instance and the request id of the invocation it was printed during.
//!
//! Each function keeps its lines in memory (for queries) and in a JSON-lines file under
//! `<home>/service/logs/<namespace>/<name>.log` (so they outlive a restart). Retention is bounded
//! by size: when a function's file passes `retention_bytes` it is rotated to `.log.1` (the older
//! one dropped) and the in-memory copy is trimmed to the same budget, so a function never holds
//! more than twice its budget on disk nor more than its budget in memory.
//! Followers (`fnvm logs --follow`) subscribe to a broadcast channel per function.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::model::FunctionKey;

/// One stored line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    /// Milliseconds since the Unix epoch, when the line was read from the function.
    pub time_ms: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The instance that printed it.
    pub instance: String,
    /// The invocation in flight on that instance when the line was printed (None between
    /// invocations, e.g. while the server starts).
    pub request_id: Option<String>,
    pub line: String,
}

impl LogEntry {
    /// What the line costs against the retention budget.
    fn cost(&self) -> u64 {
        (self.line.len()
            + self.instance.len()
            + self.request_id.as_ref().map_or(0, String::len)
            + 64) as u64
    }
}

/// Why the log store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create the log directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// How many lines a follower may lag behind before it misses some.
const FOLLOW_BUFFER: usize = 1024;

/// The log store of one service.
pub struct LogStore {
    dir: PathBuf,
    retention_bytes: u64,
    functions: Mutex<HashMap<FunctionKey, Arc<Mutex<FunctionLog>>>>,
}

/// One function's lines.
struct FunctionLog {
    lines: VecDeque<LogEntry>,
    bytes_in_memory: u64,
    file: Option<File>,
    path: PathBuf,
    bytes_in_file: u64,
    followers: broadcast::Sender<LogEntry>,
}

impl LogStore {
    /// Opens (creating) the store at `dir`, typically `<home>/service/logs`.
    pub fn open(dir: impl Into<PathBuf>, retention_bytes: u64) -> Result<Arc<Self>, LogError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| LogError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(Arc::new(Self {
            dir,
            retention_bytes: retention_bytes.max(4096),
            functions: Mutex::new(HashMap::new()),
        }))
    }

    /// Stores one line and hands it to the followers. A disk error is logged, never fatal: the
    /// line is still kept in memory and followed.
    pub fn append(&self, key: &FunctionKey, entry: LogEntry) {
        let log = self.function(key);
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        let _ = log.followers.send(entry.clone());
        let mut json = serde_json::to_vec(&entry).expect("a log entry serializes");
        json.push(b'\n');
        if log.bytes_in_file + json.len() as u64 > self.retention_bytes {
            log.rotate();
        }
        if log.file.is_none() {
            log.file = open_append(&log.path);
        }
        if let Some(file) = log.file.as_mut() {
            match file.write_all(&json) {
                Ok(()) => log.bytes_in_file += json.len() as u64,
                Err(e) => {
                    tracing::warn!(function = %key, error = %e, "cannot write a log line to disk");
                    log.file = None;
                }
            }
        }
        log.bytes_in_memory += entry.cost();
        log.lines.push_back(entry);
        while log.bytes_in_memory > self.retention_bytes {
            match log.lines.pop_front() {
                Some(old) => log.bytes_in_memory -= old.cost(),
                None => break,
            }
        }
    }

    /// The function's stored lines, oldest first: only those of `request_id` if given, then the
    /// last `tail` of them if given.
    pub fn query(
        &self,
        key: &FunctionKey,
        request_id: Option<&str>,
        tail: Option<usize>,
    ) -> Vec<LogEntry> {
        let log = self.function(key);
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<LogEntry> = log
            .lines
            .iter()
            .filter(|e| request_id.is_none() || e.request_id.as_deref() == request_id)
            .cloned()
            .collect();
        if let Some(n) = tail {
            let skip = out.len().saturating_sub(n);
            out.drain(..skip);
        }
        out
    }

    /// New lines of the function as they are stored.
    pub fn subscribe(&self, key: &FunctionKey) -> broadcast::Receiver<LogEntry> {
        let log = self.function(key);
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.followers.subscribe()
    }

    /// Forgets a removed function's lines (memory and disk).
    pub fn remove(&self, key: &FunctionKey) {
        let removed = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        let path = removed
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).path.clone())
            .unwrap_or_else(|| self.path_of(key));
        let _ = std::fs::remove_file(rotated(&path));
        let _ = std::fs::remove_file(&path);
    }

    fn path_of(&self, key: &FunctionKey) -> PathBuf {
        // Names and namespaces are validated by the API ([A-Za-z0-9_-]); never trust that here.
        let safe = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        self.dir
            .join(safe(&key.namespace))
            .join(format!("{}.log", safe(&key.name)))
    }

    /// The function's log, loaded from disk on first use.
    fn function(&self, key: &FunctionKey) -> Arc<Mutex<FunctionLog>> {
        let mut functions = self.functions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = functions.get(key) {
            return Arc::clone(log);
        }
        let path = self.path_of(key);
        if let Some(parent) = path.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let mut lines = VecDeque::new();
        let mut bytes_in_memory = 0;
        for file in [rotated(&path), path.clone()] {
            for entry in read_entries(&file) {
                bytes_in_memory += entry.cost();
                lines.push_back(entry);
            }
        }
        while bytes_in_memory > self.retention_bytes {
            match lines.pop_front() {
                Some(old) => bytes_in_memory -= old.cost(),
                None => break,
            }
        }
        let bytes_in_file = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let log = Arc::new(Mutex::new(FunctionLog {
            lines,
            bytes_in_memory,
            file: None,
            path,
            bytes_in_file,
            followers: broadcast::channel(FOLLOW_BUFFER).0,
        }));
        functions.insert(key.clone(), Arc::clone(&log));
        log
    }
}

impl FunctionLog {
    /// The current file becomes `.log.1` (replacing the older one); a new file starts.
    fn rotate(&mut self) {
        self.file = None;
        if let Err(e) = std::fs::rename(&self.path, rotated(&self.path)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate a log file");
                let _ = std::fs::remove_file(&self.path);
            }
        }
        self.bytes_in_file = 0;
    }
}

fn rotated(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

fn open_append(path: &Path) -> Option<File> {
    match OpenOptions::new().create(true).append(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open a log file");
            None
        }
    }
}

/// The entries of a JSON-lines file; a torn last line (crash mid-write) is skipped.
fn read_entries(path: &Path) -> Vec<LogEntry> {
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str(&l).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(rid: Option<&str>, line: &str) -> LogEntry {
        LogEntry {
            time_ms: 1,
            stream: "stdout".into(),
            instance: "i1".into(),
            request_id: rid.map(String::from),
            line: line.into(),
        }
    }

    #[test]
    fn lines_are_queried_by_request_id_and_tail_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = FunctionKey::new("default", "f");
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        let mut follower = store.subscribe(&key);
        store.append(&key, entry(None, "starting"));
        store.append(&key, entry(Some("a"), "a1"));
        store.append(&key, entry(Some("b"), "b1"));
        store.append(&key, entry(Some("a"), "a2"));
        assert_eq!(follower.try_recv().unwrap().line, "starting");
        let lines = |v: Vec<LogEntry>| v.into_iter().map(|e| e.line).collect::<Vec<_>>();
        assert_eq!(lines(store.query(&key, Some("a"), None)), ["a1", "a2"]);
        assert_eq!(lines(store.query(&key, None, Some(2))), ["b1", "a2"]);
        assert!(store
            .query(&FunctionKey::new("default", "g"), None, None)
            .is_empty());
        drop(store);
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(lines(store.query(&key, Some("b"), None)), ["b1"]);
        store.remove(&key);
        assert!(store.query(&key, None, None).is_empty());
    }

    #[test]
    fn retention_is_bounded_by_size_in_memory_and_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let key = FunctionKey::new("default", "chatty");
        let store = LogStore::open(dir.path(), 8192).unwrap();
        for i in 0..2000 {
            store.append(
                &key,
                entry(Some("r"), &format!("line {i:04} {}", "x".repeat(40))),
            );
        }
        let kept = store.query(&key, None, None);
        assert!(kept.len() < 200, "{} lines kept", kept.len());
        assert_eq!(kept.last().unwrap().line.split(' ').nth(1), Some("1999"));
        let on_disk: u64 = std::fs::read_dir(dir.path().join("default"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 2 * 8192, "{on_disk} bytes on disk");
    }
}
