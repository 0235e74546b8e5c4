//! The service's log store: every stdout/stderr line of every instance, per function, with its
//! time, stream, instance and the request id of the invocation it was printed during.
//!
//! Each function keeps its lines in memory (for queries) and in a JSON-lines file under
//! `<home>/service/logs/<namespace>/<name>.log` (so they outlive a restart). Retention is bounded
//! by size: when a function's file passes `retention_bytes` it is rotated to `.log.1` (the older
//! one dropped) and the in-memory copy is trimmed to the same budget, so a function never holds
//! more than twice its budget on disk nor more than its budget in memory.
//!
//! Reads go through a [`LogCursor`]: a position in the function's lines (a sequence number that
//! keeps counting across retention trims) from which batches of a few hundred lines are copied
//! under the lock, so a reader holds one batch, never the whole log, and `tail`, `since` and
//! `limit` find their start without copying anything. Followers wait on a `watch` of the end
//! position and read on from where they were; a follower too slow for retention is told how
//! many lines it missed.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::service::model::FunctionKey;

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
    /// The log directory cannot be created.
    #[error("cannot create the log directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The log store of one service.
pub struct LogStore {
    dir: PathBuf,
    retention_bytes: u64,
    functions: Mutex<HashMap<FunctionKey, Arc<Mutex<FunctionLog>>>>,
}

/// One function's lines.
struct FunctionLog {
    lines: VecDeque<LogEntry>,
    /// The sequence number of `lines[0]`: lines trimmed by retention keep counting.
    first_seq: u64,
    bytes_in_memory: u64,
    file: Option<File>,
    path: PathBuf,
    bytes_in_file: u64,
    /// The sequence number after the last line, for followers to wait on.
    end: watch::Sender<u64>,
    /// The function was removed: cursors end.
    removed: bool,
}

/// Which stored lines a read wants. Filters apply in this order: `request_id` and `since`
/// select lines, `tail` keeps the last of those, `limit` caps how many are read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogQuery {
    pub request_id: Option<String>,
    /// Only lines read at or after this time, ms since the Unix epoch.
    pub since_ms: Option<u64>,
    pub tail: Option<usize>,
    pub limit: Option<usize>,
}

impl LogQuery {
    fn matches(&self, e: &LogEntry) -> bool {
        self.request_id
            .as_deref()
            .is_none_or(|r| e.request_id.as_deref() == Some(r))
            && self.since_ms.is_none_or(|t| e.time_ms >= t)
    }
}

/// Lines examined per lock hold: bounds how long a reader keeps appenders waiting.
const SCAN_PER_BATCH: usize = 4096;

/// A reader's position in one function's log.
pub struct LogCursor {
    log: Arc<Mutex<FunctionLog>>,
    next: u64,
    query: LogQuery,
    /// What `limit` still allows.
    remaining: Option<usize>,
    end: watch::Receiver<u64>,
}

/// One batch of a cursor.
#[derive(Debug, Default)]
pub struct LogBatch {
    pub entries: Vec<LogEntry>,
    /// Lines retention dropped before this reader got to them.
    pub missed: u64,
    /// Nothing more is stored now (or the limit is reached, or the function was removed).
    pub at_end: bool,
}

impl LogCursor {
    /// Up to `max` matching lines from the cursor on.
    pub fn next_batch(&mut self, max: usize) -> LogBatch {
        let mut batch = LogBatch::default();
        // Marks the current end as seen: `wait` returns once lines are stored after this.
        self.end.borrow_and_update();
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if self.next < log.first_seq {
            batch.missed = log.first_seq - self.next;
            self.next = log.first_seq;
        }
        let want = max.min(self.remaining.unwrap_or(usize::MAX));
        let skip = (self.next - log.first_seq) as usize;
        let mut scanned = 0;
        for e in log.lines.iter().skip(skip) {
            if batch.entries.len() >= want || scanned >= SCAN_PER_BATCH {
                break;
            }
            scanned += 1;
            if self.query.matches(e) {
                batch.entries.push(e.clone());
            }
        }
        self.next += scanned as u64;
        if let Some(r) = &mut self.remaining {
            *r -= batch.entries.len();
        }
        batch.at_end = log.removed || self.next >= log.end_seq() || self.remaining == Some(0);
        batch
    }

    /// True once `limit` lines were read: following ends there too.
    pub fn exhausted(&self) -> bool {
        self.remaining == Some(0)
    }

    /// Waits until lines are stored after the last batch, or the function is removed.
    /// Returns false if nothing more will ever come.
    pub async fn wait(&mut self) -> bool {
        if self.exhausted() || self.log.lock().unwrap_or_else(|e| e.into_inner()).removed {
            return false;
        }
        self.end.changed().await.is_ok()
    }
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
                Some(old) => {
                    log.bytes_in_memory -= old.cost();
                    log.first_seq += 1;
                }
                None => break,
            }
        }
        let end = log.end_seq();
        log.end.send_replace(end);
    }

    /// A cursor at the first line `query` wants. Finding it copies nothing: `since` is a binary
    /// search (times are in arrival order), `tail` a backward count.
    pub fn cursor(&self, key: &FunctionKey, query: LogQuery) -> LogCursor {
        let log = self.function(key);
        let (next, end) = {
            let l = log.lock().unwrap_or_else(|e| e.into_inner());
            let mut start = match query.since_ms {
                Some(t) => l.lines.partition_point(|e| e.time_ms < t),
                None => 0,
            };
            if let Some(n) = query.tail {
                let mut found = 0;
                let mut at = l.lines.len();
                while at > start && found < n {
                    at -= 1;
                    if query.matches(&l.lines[at]) {
                        found += 1;
                    }
                }
                start = at;
            }
            (l.first_seq + start as u64, l.end.subscribe())
        };
        LogCursor {
            log,
            next,
            remaining: query.limit,
            query,
            end,
        }
    }

    /// Every stored line `query` wants, oldest first, collected (the API streams a
    /// [`LogCursor`] instead).
    #[cfg(test)]
    pub fn query(&self, key: &FunctionKey, query: LogQuery) -> Vec<LogEntry> {
        let mut cursor = self.cursor(key, query);
        let mut out = Vec::new();
        loop {
            let batch = cursor.next_batch(SCAN_PER_BATCH);
            out.extend(batch.entries);
            if batch.at_end {
                return out;
            }
        }
    }

    /// Forgets a removed function's lines (memory and disk).
    pub fn remove(&self, key: &FunctionKey) {
        let removed = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        let path = match removed {
            Some(l) => {
                let mut l = l.lock().unwrap_or_else(|e| e.into_inner());
                l.removed = true;
                // Wakes the followers, which see `removed` and end.
                let end = l.end_seq();
                l.end.send_replace(end);
                l.path.clone()
            }
            None => self.path_of(key),
        };
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
        let end = lines.len() as u64;
        let log = Arc::new(Mutex::new(FunctionLog {
            lines,
            first_seq: 0,
            bytes_in_memory,
            file: None,
            path,
            bytes_in_file,
            end: watch::Sender::new(end),
            removed: false,
        }));
        functions.insert(key.clone(), Arc::clone(&log));
        log
    }
}

impl FunctionLog {
    fn end_seq(&self) -> u64 {
        self.first_seq + self.lines.len() as u64
    }

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

    fn lines(v: Vec<LogEntry>) -> Vec<String> {
        v.into_iter().map(|e| e.line).collect()
    }

    fn q(request_id: Option<&str>, tail: Option<usize>) -> LogQuery {
        LogQuery {
            request_id: request_id.map(String::from),
            tail,
            ..LogQuery::default()
        }
    }

    #[test]
    fn lines_are_queried_by_request_id_and_tail_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = FunctionKey::new("default", "f");
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        store.append(&key, entry(None, "starting"));
        store.append(&key, entry(Some("a"), "a1"));
        store.append(&key, entry(Some("b"), "b1"));
        store.append(&key, entry(Some("a"), "a2"));
        assert_eq!(lines(store.query(&key, q(Some("a"), None))), ["a1", "a2"]);
        assert_eq!(lines(store.query(&key, q(None, Some(2)))), ["b1", "a2"]);
        assert_eq!(lines(store.query(&key, q(Some("a"), Some(1)))), ["a2"]);
        assert_eq!(
            lines(store.query(&key, q(None, Some(0)))),
            Vec::<String>::new()
        );
        assert!(store
            .query(&FunctionKey::new("default", "g"), LogQuery::default())
            .is_empty());
        drop(store);
        let store = LogStore::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(lines(store.query(&key, q(Some("b"), None))), ["b1"]);
        store.remove(&key);
        assert!(store.query(&key, LogQuery::default()).is_empty());
    }

    #[test]
    fn since_tail_and_limit_combine_and_batches_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let key = FunctionKey::new("default", "many");
        let store = LogStore::open(dir.path(), 64 << 20).unwrap();
        for i in 0..20_000u64 {
            let rid = if i % 2 == 0 { "even" } else { "odd" };
            let mut e = entry(Some(rid), &format!("{i}"));
            e.time_ms = 1000 + i;
            store.append(&key, e);
        }
        let numbers = |v: Vec<LogEntry>| -> Vec<u64> {
            v.into_iter().map(|e| e.line.parse().unwrap()).collect()
        };
        let since = LogQuery {
            since_ms: Some(1000 + 19_990),
            ..LogQuery::default()
        };
        assert_eq!(
            numbers(store.query(&key, since.clone())),
            (19_990..20_000).collect::<Vec<_>>()
        );
        let since_tail = LogQuery {
            tail: Some(3),
            request_id: Some("odd".into()),
            ..since
        };
        assert_eq!(
            numbers(store.query(&key, since_tail)),
            [19_995, 19_997, 19_999]
        );
        let limited = LogQuery {
            limit: Some(5),
            since_ms: Some(1100),
            ..LogQuery::default()
        };
        assert_eq!(
            numbers(store.query(&key, limited)),
            [100, 101, 102, 103, 104]
        );
        // A cursor hands out bounded batches that add up to everything, in order.
        let mut cursor = store.cursor(&key, LogQuery::default());
        let (mut seen, mut batches) = (Vec::new(), 0);
        loop {
            let b = cursor.next_batch(256);
            assert!(b.entries.len() <= 256);
            batches += 1;
            seen.extend(numbers(b.entries));
            if b.at_end {
                break;
            }
        }
        assert_eq!(seen, (0..20_000).collect::<Vec<_>>());
        assert!(batches >= 20_000 / 256, "{batches} batches");
    }

    #[test]
    fn a_follower_wakes_for_new_lines_learns_what_it_missed_and_ends_on_remove() {
        let dir = tempfile::tempdir().unwrap();
        let key = FunctionKey::new("default", "follow");
        let store = LogStore::open(dir.path(), 8192).unwrap();
        store.append(&key, entry(None, "old"));
        let mut cursor = store.cursor(&key, q(None, Some(0)));
        let first = cursor.next_batch(10);
        assert!(first.entries.is_empty() && first.at_end);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        store.append(&key, entry(None, "new"));
        assert!(rt.block_on(cursor.wait()));
        assert_eq!(lines(cursor.next_batch(10).entries), ["new"]);
        // Retention drops lines the follower has not read yet: it is told how many.
        for i in 0..1000 {
            store.append(
                &key,
                entry(None, &format!("burst {i:04} {}", "x".repeat(40))),
            );
        }
        let b = cursor.next_batch(10);
        assert!(b.missed > 0, "{b:?}");
        assert_eq!(b.entries.len(), 10);
        store.remove(&key);
        let mut ended = false;
        for _ in 0..1000 {
            if cursor.next_batch(1000).at_end && !rt.block_on(cursor.wait()) {
                ended = true;
                break;
            }
        }
        assert!(ended, "the follower ends once the function is removed");
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
        let kept = store.query(&key, LogQuery::default());
        assert!(kept.len() < 200, "{} lines kept", kept.len());
        assert_eq!(kept.last().unwrap().line.split(' ').nth(1), Some("1999"));
        let on_disk: u64 = std::fs::read_dir(dir.path().join("default"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(on_disk <= 2 * 8192, "{on_disk} bytes on disk");
    }
}
