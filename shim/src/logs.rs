//! The function's stdout and stderr, line by line, into the fifos containerd gave the task
//! (`ctr run` reads them; the kubelet's CRI logs too). Each stream has its own writer thread
//! behind a bounded queue: a reader that stops reading costs lines (counted, said once), never
//! the function's progress, which the sandbox's log callback must not block.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use fnvm::sandbox::{LogLine, LogStream};

/// Lines queued per stream before new ones are dropped.
const QUEUE_LINES: usize = 4096;

/// Where the function's lines go.
#[derive(Clone)]
pub struct Logs {
    stdout: Option<SyncSender<String>>,
    stderr: Option<SyncSender<String>>,
}

impl Logs {
    /// Opens the fifos at `stdout` and `stderr` (empty: that stream is discarded; a `file://`
    /// URI: appended to that file). Fifos are opened read-write, so the open never waits for a
    /// reader and a reader that comes and goes does not end the stream.
    pub fn open(stdout: &str, stderr: &str) -> std::io::Result<Self> {
        Ok(Logs {
            stdout: writer(stdout, "stdout")?,
            stderr: writer(stderr, "stderr")?,
        })
    }

    /// The sandbox's log callback.
    pub fn sink(&self) -> Arc<dyn Fn(LogLine) + Send + Sync> {
        let logs = self.clone();
        Arc::new(move |line: LogLine| {
            let queue = match line.stream {
                LogStream::Stdout => &logs.stdout,
                LogStream::Stderr => &logs.stderr,
            };
            if let Some(queue) = queue {
                let mut text = line.line;
                text.push('\n');
                if let Err(TrySendError::Full(_)) = queue.try_send(text) {
                    tracing::debug!("a log reader is behind: a line was dropped");
                }
            }
        })
    }
}

fn writer(path: &str, name: &'static str) -> std::io::Result<Option<SyncSender<String>>> {
    if path.is_empty() {
        return Ok(None);
    }
    let mut options = std::fs::OpenOptions::new();
    let path = match path.split_once("://") {
        // `ctr run --log-uri file:///path`: both streams appended to one file.
        Some(("file", file)) => {
            options.append(true).create(true);
            file
        }
        Some(("fifo", fifo)) => {
            options.read(true).write(true);
            fifo
        }
        Some((scheme, _)) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "the {name} log URI {path} ({scheme}://) is not supported by fnvm: only \
                     fifos and file:// are"
                ),
            ))
        }
        None => {
            options.read(true).write(true);
            path
        }
    };
    let mut file = options
        .custom_flags(libc::O_CLOEXEC)
        .open(Path::new(path))
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot open the {name} log {path}: {e}"))
        })?;
    let (tx, rx) = sync_channel::<String>(QUEUE_LINES);
    std::thread::Builder::new()
        .name(format!("log-{name}"))
        .spawn(move || {
            for line in rx {
                if file.write_all(line.as_bytes()).is_err() {
                    break;
                }
            }
        })?;
    Ok(Some(tx))
}
