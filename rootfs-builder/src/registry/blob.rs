//! Streaming a blob into its sink, resumably: each attempt asks for the bytes after those the
//! sink already has (`Range`), so a dropped connection costs only a retry.

use std::io::Read;

use super::deadlines::DeadlineKind;
use super::transport::{io_timeout_of, is_transient};
use super::{content_range_start, RegistryClient, RegistryError};
use crate::digest::Digest;
use crate::source::BlobSink;

impl RegistryClient {
    /// One try at streaming the rest of a blob into `sink`.
    pub(super) fn blob_attempt(
        &self,
        digest: &Digest,
        size: u64,
        sink: &mut dyn BlobSink,
    ) -> Attempt {
        let offset = sink.bytes_written();
        let url = format!("{}/v2/{}/blobs/{digest}", self.base, self.repository);
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push(("Range", format!("bytes={offset}-")));
        }
        let resp = match self.get_following_redirects(&url, &headers) {
            Ok(r) => r,
            Err(RegistryError::Transport { source, .. }) if is_transient(&source) => {
                return Attempt::Retry(source.to_string())
            }
            Err(RegistryError::Deadline {
                kind: DeadlineKind::Read | DeadlineKind::Connect,
                ..
            }) if self.pull_left().is_some() => {
                return Attempt::Retry(format!(
                    "no answer within the read deadline of {} s",
                    self.deadlines.read.as_secs()
                ))
            }
            Err(RegistryError::Status { status, .. }) if status >= 500 || status == 429 => {
                return Attempt::Retry(format!("HTTP {status}"))
            }
            Err(e) => return Attempt::Fatal(e),
        };
        // How many leading bytes of this body we already have.
        let skip = match resp.status().as_u16() {
            200 => offset,
            206 => {
                let start = resp
                    .headers()
                    .get("content-range")
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    return Attempt::Fatal(RegistryError::BlobProtocol {
                        digest: digest.clone(),
                        reason: format!(
                            "asked for bytes from {offset}, the server sent Content-Range {:?}",
                            resp.headers().get("content-range")
                        ),
                    });
                }
                0
            }
            _ => return Attempt::Fatal(self.status_error(&url, resp, &format!("blob {digest}"))),
        };
        if skip > 0 {
            tracing::info!(%digest, skip, "server ignored Range; re-reading from the start");
        }
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; BLOB_BUF];
        let mut to_skip = skip;
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => match io_timeout_of(&e) {
                    Some(DeadlineKind::Pull) => {
                        return Attempt::Fatal(self.deadline_error(&url, DeadlineKind::Pull, 1))
                    }
                    Some(kind) => {
                        return Attempt::Retry(format!(
                            "no data within the {kind} deadline of {} s",
                            self.deadlines.get(kind).as_secs()
                        ))
                    }
                    None => return Attempt::Retry(e.to_string()),
                },
            };
            let mut chunk = &buf[..n];
            if to_skip > 0 {
                let s = (to_skip as usize).min(chunk.len());
                chunk = &chunk[s..];
                to_skip -= s as u64;
            }
            if chunk.is_empty() {
                continue;
            }
            if sink.bytes_written() + chunk.len() as u64 > size {
                return Attempt::Fatal(RegistryError::BlobTooLarge {
                    registry: self.registry.clone(),
                    digest: digest.clone(),
                    size,
                });
            }
            if let Err(source) = sink.write_all(chunk) {
                return Attempt::Fatal(RegistryError::Sink {
                    digest: digest.clone(),
                    source,
                });
            }
        }
        let have = sink.bytes_written();
        if have < size {
            return Attempt::Retry(format!("connection ended after byte {have} of {size}"));
        }
        Attempt::Done
    }
}

/// Result of one attempt at streaming a blob.
pub(super) enum Attempt {
    Done,
    Retry(String),
    Fatal(RegistryError),
}

pub(super) const BLOB_BUF: usize = 256 * 1024;
