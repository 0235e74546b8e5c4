//! `GET .../logs`: a function's lines by request id, tail, limit or time, read or followed,
//! streamed batch by batch so a reader costs a batch of memory whatever the log's size.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::json;

use super::reply::{err, query_pairs, ApiError};
use super::{lock, Body, Service};
use crate::service::logs::{LogCursor, LogQuery};
use crate::service::model::FunctionKey;

impl Service {
    /// `GET …/logs`: streamed from a [`LogCursor`] batch by batch, so a reader costs a batch
    /// of memory whatever the log's size. Plain reads answer `{"logs": [...]}`; `follow` answers
    /// newline-delimited JSON, the stored lines first, then new ones as they are stored.
    pub(super) fn logs(
        &self,
        key: &FunctionKey,
        req: &Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        if !lock(&self.functions).contains_key(key) {
            return Err(Self::unknown(key));
        }
        let mut query = LogQuery::default();
        let mut follow = false;
        let bad = |m: String| err(StatusCode::BAD_REQUEST, "InvalidArgument", m);
        let number = |name: &str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| bad(format!("{name}: {v:?} is not a number")))
        };
        for (k, v) in query_pairs(req.uri().query().unwrap_or("")) {
            match k.as_str() {
                "request_id" => query.request_id = Some(v),
                "tail" => query.tail = Some(number("tail", &v)?),
                "limit" => query.limit = Some(number("limit", &v)?),
                "since" => query.since_ms = Some(parse_since(&v).map_err(|e| bad(e.to_string()))?),
                "follow" => follow = matches!(v.as_str(), "" | "1" | "true"),
                other => {
                    return Err(bad(format!(
                        "unknown query parameter {other:?} (request_id, tail, limit, since, follow)"
                    )))
                }
            }
        }
        let cursor = self.logs.cursor(key, query);
        let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(LOG_CHUNKS_IN_FLIGHT);
        tokio::spawn(stream_logs(cursor, follow, tx));
        let mut r = Response::new(BodyExt::boxed(ChannelBody(body_rx)));
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static(if follow {
                "application/x-ndjson"
            } else {
                "application/json"
            }),
        );
        Ok(r)
    }
}

/// Lines per chunk of a log response.
const LOG_CHUNK_LINES: usize = 256;
/// Chunks a log response may have ready before the client reads them (backpressure).
const LOG_CHUNKS_IN_FLIGHT: usize = 2;

/// A `since=` the API cannot read.
#[derive(Debug, thiserror::Error)]
#[error("since: {value:?} is neither an RFC 3339 time nor milliseconds since the epoch: {source}")]
pub(super) struct BadSince {
    value: String,
    source: humantime::TimestampError,
}

/// `since=`: RFC 3339 (`2026-12-01T22:00:00Z`) or milliseconds since the Unix epoch.
fn parse_since(v: &str) -> Result<u64, BadSince> {
    if let Ok(ms) = v.parse::<u64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(v).map_err(|source| BadSince {
        value: v.to_string(),
        source,
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64))
}

/// Writes the cursor's lines into `tx` in chunks until the end (or, following, until the
/// client leaves or the function is removed).
async fn stream_logs(mut cursor: LogCursor, follow: bool, tx: tokio::sync::mpsc::Sender<Bytes>) {
    let mut first = true;
    let mut missed = 0;
    if !follow
        && tx
            .send(Bytes::from_static(b"{\"logs\": [\n"))
            .await
            .is_err()
    {
        return;
    }
    loop {
        let batch = cursor.next_batch(LOG_CHUNK_LINES);
        let mut chunk = Vec::with_capacity(batch.entries.len() * 160);
        if follow && batch.missed > 0 {
            chunk.extend_from_slice(json!({"missed_lines": batch.missed}).to_string().as_bytes());
            chunk.push(b'\n');
        }
        missed += batch.missed;
        for e in &batch.entries {
            if !follow && !std::mem::take(&mut first) {
                chunk.extend_from_slice(b",\n");
            }
            serde_json::to_writer(&mut chunk, e).expect("a log entry serializes");
            if follow {
                chunk.push(b'\n');
            }
        }
        if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
            return;
        }
        if !batch.at_end {
            continue;
        }
        if !follow {
            let end = if missed > 0 {
                format!("\n], \"missed_lines\": {missed}}}\n")
            } else {
                "\n]}\n".to_string()
            };
            let _ = tx.send(Bytes::from(end)).await;
            return;
        }
        tokio::select! {
            more = cursor.wait() => if !more { return },
            _ = tx.closed() => return,
        }
    }
}

/// A body fed by a channel (log follow).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}
