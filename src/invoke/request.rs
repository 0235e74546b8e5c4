//! The request an instance receives for a client's request, the same for `fnvm run` and
//! `fnvm serve`: an event invocation becomes `POST /event-invoke` with the client's body, a web
//! request passes through; both carry the contract's `X-Scf-*` headers (the caller's own
//! `X-Scf-*` headers dropped) and lose the hop-by-hop headers of RFC 9110 §7.6.1.

use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request};

use super::EVENT_PATH;
use crate::function::{set_scf_headers, FunctionSettings};

/// The `Host` an event invocation names: the function's own port, as on the platform.
const EVENT_HOST: &str = "127.0.0.1:9000";

/// What an event invocation keeps of the client's request head.
#[derive(Debug, Clone, Default)]
pub struct EventHead {
    /// The client's `Content-Type` (`application/json` when it sent none).
    pub content_type: Option<HeaderValue>,
    /// The body's length, when known before it is sent.
    pub content_length: Option<HeaderValue>,
    /// A timer's firing rather than a client's call: `X-Scf-Trigger-Src: Timer`.
    pub timer: bool,
}

/// The contract's event invocation: `POST /event-invoke` with `body` and the `X-Scf-*`
/// headers of `settings` for `request_id`.
pub fn event_request<B>(
    body: B,
    head: EventHead,
    settings: &FunctionSettings,
    request_id: &str,
) -> Request<B> {
    let mut out = Request::builder()
        .method(Method::POST)
        .uri(EVENT_PATH)
        .body(body)
        .expect("a static method and path make a valid request");
    let headers = out.headers_mut();
    headers.insert(hyper::header::HOST, HeaderValue::from_static(EVENT_HOST));
    let content_type = head
        .content_type
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    headers.insert(hyper::header::CONTENT_TYPE, content_type);
    if let Some(len) = head.content_length {
        headers.insert(hyper::header::CONTENT_LENGTH, len);
    }
    // Values were validated when the settings were made; a bad one is skipped, not sent.
    set_scf_headers(headers, settings, request_id);
    if head.timer {
        headers.insert("x-scf-trigger-src", HeaderValue::from_static("Timer"));
    }
    out
}

/// The client's request as it is, but for its hop-by-hop headers, with the invocation's
/// `X-Scf-*` headers.
pub fn web_request<B>(
    req: Request<B>,
    settings: &FunctionSettings,
    request_id: &str,
) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    // hyper keeps the client's spelling of each header name in the request's extensions and
    // would write the platform's values under a forged header's spelling; a request that
    // forges `X-Scf-*` headers loses its spellings (all names then go out in Title-Case). The
    // extensions hold nothing else the function needs (an upgrade is taken out before).
    if parts
        .headers
        .keys()
        .any(|name| name.as_str().starts_with("x-scf-"))
    {
        parts.extensions.clear();
    }
    set_scf_headers(&mut parts.headers, settings, request_id);
    // The client spoke HTTP/1.x; the stream to the function is HTTP/1.1.
    parts.version = hyper::Version::HTTP_11;
    Request::from_parts(parts, body)
}

/// True for a request asking to switch protocols (`Connection: upgrade` + `Upgrade`), such as a
/// WebSocket handshake.
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(hyper::header::UPGRADE)
        && headers
            .get_all(hyper::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1): each
/// hop frames bodies and manages connections itself.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("x-custom", HeaderValue::from_static("kept"));
        h.insert("content-length", HeaderValue::from_static("3"));
        h.insert("host", HeaderValue::from_static("example"));
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["content-length", "host", "x-custom"]);
    }
}
