//! One invocation path for `fnvm run` and `fnvm serve`: every per-request step between a
//! client's request and a function instance's port 9000 lives here once, so a header, timeout or
//! error fix is made in one place.
//!
//! - [`request`]: the event and web requests built from a client's request (the `X-Scf-*`
//!   headers of the contract, hop-by-hop headers dropped);
//! - [`proxy`]: sending one to an instance within the function's timeout, the first-reply probe
//!   and the design's JSON error shape;
//! - [`tunnel`]: upgrades (WebSocket or any protocol) joined byte for byte;
//! - [`connector`]: streams to an instance for a pooled hyper client;
//! - [`idle`]: the limit on a streamed answer's gaps (a body that stalls is cut).
//!
//! What picks the instance differs (one instance for `fnvm run`, the service's pool for
//! `fnvm serve`); what happens to the request does not.

pub mod connector;
pub mod front;
pub mod idle;
pub mod proxy;
pub mod request;
pub mod tunnel;

use bytes::Bytes;

/// How the function is invoked (the CLI's `--type` and the service's `type` field).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum FunctionType {
    /// POSTs become `POST /event-invoke` with the `X-Scf-*` headers.
    #[default]
    Event,
    /// HTTP requests pass through unchanged.
    Web,
}

impl std::fmt::Display for FunctionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FunctionType::Event => "event",
            FunctionType::Web => "web",
        })
    }
}

/// The path event invocations are delivered to.
pub const EVENT_PATH: &str = "/event-invoke";
/// The response header carrying the invocation's request id.
pub const REQUEST_ID_HEADER: &str = "x-scf-request-id";

/// The body of every response handed back to a client.
pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
/// The body of every request sent to an instance.
pub type OutBody = http_body_util::combinators::BoxBody<Bytes, hyper::Error>;

/// A fresh request id (a UUID), as the platform gives each invocation.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Puts the invocation's request id on its response (`X-Scf-Request-Id`).
pub fn set_request_id<B>(response: &mut hyper::Response<B>, request_id: &str) {
    if let Ok(v) = hyper::header::HeaderValue::from_str(request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
}

/// An error and its causes, one level each.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
