//! The API's replies: its error (`{"error":{"code","message","request_id"}}` with a fitting
//! status and, where a retry can help, `Retry-After`), JSON and text bodies, and the small
//! request helpers every route uses (allowed methods, bounded bodies, query pairs).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::Body;
use crate::invoke::set_request_id;

#[derive(Debug)]
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: &'static str,
    pub(super) message: String,
    /// Seconds the client should wait before it retries (`Retry-After`).
    retry_after: Option<u32>,
}

impl ApiError {
    pub(super) fn retry_after(mut self, secs: u32) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

pub(super) fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
        retry_after: None,
    }
}

/// The API's error for a failed invocation.
pub(super) fn invoke_error(e: crate::service::pool::InvokeError) -> ApiError {
    let api = err(e.status(), e.code(), e.to_string());
    match e.retry_after_secs() {
        Some(secs) => api.retry_after(secs),
        None => api,
    }
}

pub(super) fn internal(message: String) -> ApiError {
    err(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", message)
}

pub(super) fn require(req: &Request<Incoming>, allowed: &[Method]) -> Result<(), ApiError> {
    if allowed.contains(req.method()) {
        Ok(())
    } else {
        Err(method_not_allowed(allowed))
    }
}

pub(super) fn method_not_allowed(allowed: &[Method]) -> ApiError {
    let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    err(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        format!("this route takes {}", names.join(", ")),
    )
}

pub(super) async fn read_body(body: Incoming, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(err(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
            format!("the {what} is larger than {limit} bytes"),
        )),
        Err(e) => Err(err(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("cannot read the {what}: {e}"),
        )),
    }
}

/// `k=v&k2=v2`, percent-decoded.
pub(super) fn query_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

pub(super) fn percent_decode(s: &str) -> String {
    fn hex_val(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn full(bytes: impl Into<Bytes>) -> Body {
    BodyExt::boxed(Full::new(bytes.into()).map_err(|never| match never {}))
}

pub(super) fn text(status: StatusCode, s: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(full(s.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub(super) fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut bytes = serde_json::to_vec_pretty(v).expect("JSON values serialize");
    bytes.push(b'\n');
    let mut r = Response::new(full(bytes));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

pub(super) fn error_response(e: &ApiError, request_id: &str) -> Response<Body> {
    let mut r = json_response(
        e.status,
        &json!({"error": {"code": e.code, "message": e.message, "request_id": request_id}}),
    );
    set_request_id(&mut r, request_id);
    if e.status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("Bearer"));
    }
    if let Some(secs) = e.retry_after {
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_are_percent_decoded() {
        assert_eq!(
            query_pairs("request_id=a%2Db&tail=5&follow"),
            vec![
                ("request_id".into(), "a-b".into()),
                ("tail".into(), "5".into()),
                ("follow".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
