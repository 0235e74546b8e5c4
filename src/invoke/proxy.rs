//! Sending an invocation to an instance and handing back its answer, the same for `fnvm run`
//! and `fnvm serve`: the request goes over the instance's pooled client within the function's
//! timeout, the answer loses its hop-by-hop headers, the first reply of an instance measures a
//! snapshot start's restore, and a failure has the design's JSON error shape.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::connector::{InstanceClient, POOL_AUTHORITY};
use super::request::strip_hop_by_hop;
use super::{error_chain, Body, OutBody};
use crate::sandbox::{ColdStart, Instance, RestoreReport};

/// Why an instance gave no (complete) answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// The function did not answer within its timeout.
    #[error("the function did not answer within its timeout of {secs} s")]
    Timeout {
        /// The function's timeout, as its settings give it.
        secs: u32,
    },
    /// No stream to the function's port could be opened (the cause follows).
    #[error("cannot reach the function's port 9000: {0}")]
    Unreachable(String),
    /// The stream broke before a complete answer (the cause follows).
    #[error("the function closed the connection without a complete answer: {0}")]
    Broken(String),
    /// The request's path and query cannot be sent as a request target.
    #[error("request target: {0}")]
    Target(String),
}

impl ForwardError {
    fn of_client(e: &hyper_util::client::legacy::Error) -> Self {
        if e.is_connect() {
            ForwardError::Unreachable(error_chain(e))
        } else {
            ForwardError::Broken(error_chain(e))
        }
    }
}

/// The request as the pooled client sends it: its path and query on the client's authority.
pub fn to_instance<B>(req: Request<B>) -> Result<Request<B>, ForwardError> {
    let (mut parts, body) = req.into_parts();
    let mut uri = hyper::Uri::builder()
        .scheme("http")
        .authority(POOL_AUTHORITY);
    if let Some(pq) = parts.uri.path_and_query() {
        uri = uri.path_and_query(pq.clone());
    }
    parts.uri = uri
        .build()
        .map_err(|e| ForwardError::Target(e.to_string()))?;
    Ok(Request::from_parts(parts, body))
}

/// The function's timeout as a duration (at least a second).
fn deadline(timeout_s: u32) -> Duration {
    Duration::from_secs(u64::from(timeout_s.max(1)))
}

/// Sends `req` to the instance and hands back its response once the head arrived within the
/// function's timeout (`timeout_s`); the body keeps streaming from the function as the client
/// reads it.
pub async fn forward(
    client: &InstanceClient,
    req: Request<OutBody>,
    timeout_s: u32,
) -> Result<Response<Incoming>, ForwardError> {
    let req = to_instance(req)?;
    let response = match tokio::time::timeout(deadline(timeout_s), client.request(req)).await {
        Err(_) => return Err(ForwardError::Timeout { secs: timeout_s }),
        Ok(Err(e)) => return Err(ForwardError::of_client(&e)),
        Ok(Ok(resp)) => resp,
    };
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, body))
}

/// As [`forward`], but the whole response is read within the timeout (an event invocation's
/// answer is complete before it is handed on).
pub async fn forward_whole(
    client: &InstanceClient,
    req: Request<OutBody>,
    timeout_s: u32,
) -> Result<Response<Body>, ForwardError> {
    let req = to_instance(req)?;
    let exchange = async {
        let resp = client
            .request(req)
            .await
            .map_err(|e| ForwardError::of_client(&e))?;
        let (mut parts, body) = resp.into_parts();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ForwardError::Broken(error_chain(&e)))?
            .to_bytes();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, full(bytes)))
    };
    match tokio::time::timeout(deadline(timeout_s), exchange).await {
        Ok(result) => result,
        Err(_) => Err(ForwardError::Timeout { secs: timeout_s }),
    }
}

/// A streamed answer as a client's response body.
pub fn streamed(response: Response<Incoming>) -> Response<Body> {
    response.map(|body| body.map_err(std::io::Error::other).boxed())
}

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// Set by an instance's first reply: a snapshot start's restore is measured once, at that
/// point (the guest has then touched what a request needs).
#[derive(Debug, Default)]
pub struct FirstReply(AtomicBool);

impl FirstReply {
    /// The first call (for an instance started from a snapshot) measures its restore, off the
    /// async workers (it reads /proc and asks the VMM); later calls and boot starts get `None`.
    pub fn probe(
        &self,
        instance: &Arc<dyn Instance>,
    ) -> Option<tokio::task::JoinHandle<Option<RestoreReport>>> {
        if self.0.swap(true, Ordering::SeqCst) {
            return None;
        }
        if instance.start_info().kind != ColdStart::Snapshot {
            return None;
        }
        let instance = Arc::clone(instance);
        Some(tokio::task::spawn_blocking(move || {
            instance.restore_report()
        }))
    }
}

/// The design's error body: `{"error": {"code", "message", "request_id"}}`.
pub fn error_response(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    let body = serde_json::json!({
        "error": { "code": code, "message": message, "request_id": request_id }
    });
    let mut bytes = serde_json::to_vec(&body).expect("a JSON value serializes");
    bytes.push(b'\n');
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(bytes))
        .expect("a valid status and header make a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_have_the_designs_json_shape() {
        let resp = error_response(StatusCode::BAD_GATEWAY, "FunctionUnavailable", "gone", "r1");
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { resp.into_body().collect().await.unwrap().to_bytes() });
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "FunctionUnavailable");
        assert_eq!(v["error"]["message"], "gone");
        assert_eq!(v["error"]["request_id"], "r1");
    }
}
