//! The host's client of one `fnvm-vmm`'s API socket (`--api-sock`): JSON lines, one request and
//! one reply per connection ([`fnvm_vmm::api`] defines both). The VM sandbox uses it to
//! snapshot a ready instance, to restore a snapshot into a standby VMM and to read how a
//! restore went.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fnvm_vmm::api::{Request, Response};

use crate::sandbox::SandboxError;

/// Snapshots write guest memory: allow for a large, mostly touched VM on a slow disk.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// A standby's restore reads the snapshot's small state file and maps its memory: quick, but a
/// cold page cache on a busy disk can take a while.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(10);
/// The socket appears as the VMM starts; a restored VM binds it before it resumes.
const BIND_TIMEOUT: Duration = Duration::from_secs(5);

/// One VMM's API socket.
#[derive(Debug, Clone)]
pub struct VmmApi {
    path: PathBuf,
}

impl VmmApi {
    pub fn new(path: &Path) -> Self {
        VmmApi {
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Snapshots the running VM into `dir` (which must not exist); the VM is paused for the
    /// copy and runs on afterwards. Returns the VMM's own figure for it, in ms.
    pub fn snapshot(&self, dir: &Path) -> Result<f64, SandboxError> {
        let reply = self.request(
            &Request::Snapshot {
                dir: dir.to_path_buf(),
            },
            SNAPSHOT_TIMEOUT,
        )?;
        Ok(reply.snapshot_ms.unwrap_or_default())
    }

    /// Makes a standby VMM (`--standby`) the VM of the snapshot in `dir`, with `disks` in slot
    /// order, its vsock device on `vsock` and its network device (if it has one) on the passt
    /// socket `net`. Returns the VMM's own figure for it, in ms.
    pub fn restore(
        &self,
        dir: &Path,
        disks: &[PathBuf],
        vsock: &Path,
        net: Option<&Path>,
    ) -> Result<f64, SandboxError> {
        let reply = self.request(
            &Request::Restore {
                dir: dir.to_path_buf(),
                disks: disks.to_vec(),
                vsock: Some(vsock.to_path_buf()),
                net: net.map(Path::to_path_buf),
                // Its jail holds the instance's directory, where its vsock socket is.
                jail: vsock.parent().map(Path::to_path_buf).into_iter().collect(),
            },
            RESTORE_TIMEOUT,
        )?;
        Ok(reply.restore_ms.unwrap_or_default())
    }

    /// The VMM's metrics: for a restored VM, when it resumed and its first I/O.
    pub fn metrics(&self) -> Result<Response, SandboxError> {
        self.request(&Request::Metrics, QUERY_TIMEOUT)
    }

    fn request(&self, request: &Request, timeout: Duration) -> Result<Response, SandboxError> {
        let what = |e: &dyn std::fmt::Display| {
            SandboxError::Agent(format!("the VMM's API socket {}: {e}", self.path.display()))
        };
        let stream = connect_retrying(&self.path).map_err(|e| what(&e))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| what(&e))?;
        let mut line = serde_json::to_string(request).map_err(|e| what(&e))?;
        line.push('\n');
        (&stream).write_all(line.as_bytes()).map_err(|e| what(&e))?;
        let mut reply = String::new();
        BufReader::new(&stream)
            .take(1 << 20)
            .read_line(&mut reply)
            .map_err(|e| what(&e))?;
        let response: Response = serde_json::from_str(reply.trim_end())
            .map_err(|e| what(&format!("a reply that does not parse ({e}): {reply:?}")))?;
        if !response.ok {
            return Err(what(
                &response
                    .error
                    .clone()
                    .unwrap_or_else(|| "the request failed".into()),
            ));
        }
        Ok(response)
    }
}

fn connect_retrying(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + BIND_TIMEOUT;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}
