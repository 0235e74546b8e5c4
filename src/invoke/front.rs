//! The host-side HTTP front of one running function (`fnvm run`, `fnvm demo`).
//!
//! Every request a client sends to the front's address is one HTTP/1.1 exchange on a stream to
//! the function's port 9000 ([`Instance::connect`]); idle keep-alive streams are reused, a new
//! one is opened whenever none is free:
//! - **event** functions: any POST is delivered as `POST /event-invoke` with the client's body
//!   and the `X-Scf-*` headers of the contract (a fresh request id each time, returned to the
//!   caller as `X-Scf-Request-Id`);
//! - **web** functions: method, path, query, headers and body pass through unchanged (only the
//!   hop-by-hop headers of RFC 9110 §7.6.1 are dropped, as any proxy must).
//!
//! Bodies are streamed both ways with hyper's backpressure, so a response of any size passes
//! in bounded memory.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::function::{set_scf_headers, FunctionSettings};
use crate::http_server::ConnectionLimits;
use crate::sandbox::Instance;

/// How the function is invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FunctionType {
    /// POSTs become `POST /event-invoke` with the `X-Scf-*` headers.
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

type Body = BoxBody<Bytes, hyper::Error>;

/// Called after each invocation.
pub type InvocationHook = Arc<dyn Fn(&InvocationRecord) + Send + Sync>;

/// One invocation, reported after the function answered (or failed to).
#[derive(Debug, Clone)]
pub struct InvocationRecord {
    pub request_id: String,
    pub method: Method,
    pub path: String,
    /// The function's status, or the front's error status.
    pub status: StatusCode,
    /// Until the response head arrived.
    pub duration: Duration,
    /// The first invocation of a snapshot-started instance: how its restore went.
    pub restore: Option<crate::sandbox::RestoreReport>,
}

/// The front of one function instance.
pub struct Front {
    instance: Arc<dyn Instance>,
    /// Keep-alive HTTP/1.1 streams to the function, reused while idle (a new stream is opened
    /// whenever none is free), so a warm request costs no stream set-up in the agent's bridge
    /// nor a new connection in the function's server.
    client: Client<InstanceConnector, Incoming>,
    settings: FunctionSettings,
    function_type: FunctionType,
    on_invocation: Option<InvocationHook>,
    /// Set by the first reply: the restore is measured once, at that point.
    first_reply_seen: std::sync::atomic::AtomicBool,
}

impl Front {
    pub fn new(
        instance: Arc<dyn Instance>,
        settings: FunctionSettings,
        function_type: FunctionType,
    ) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(InstanceConnector {
                instance: Arc::clone(&instance),
            });
        Self {
            instance,
            client,
            settings,
            function_type,
            on_invocation: None,
            first_reply_seen: Default::default(),
        }
    }

    /// Calls `f` after each invocation (the CLI prints a line per event invocation).
    pub fn on_invocation(mut self, f: InvocationHook) -> Self {
        self.on_invocation = Some(f);
        self
    }

    /// Accepts connections on `listener` until the task is dropped or aborted, within `limits`
    /// (header-read and keep-alive timeouts, connection cap: see [`crate::http_server`]). Each
    /// connection is served on its own task (HTTP/1.1 keep-alive from the client's side).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        limits: ConnectionLimits,
    ) {
        let make_service = |_: crate::http_server::Admission| {
            let front = Arc::clone(&self);
            hyper::service::service_fn(move |req| {
                let front = Arc::clone(&front);
                async move { Ok::<_, Infallible>(front.handle(req).await) }
            })
        };
        // Every request of the front is an invocation: no reserve for other routes.
        crate::http_server::serve(listener, limits, 0, make_service, std::future::pending()).await;
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let request_id = uuid::Uuid::new_v4().to_string();
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let outbound = match self.function_type {
            FunctionType::Event => self.event_request(req, &request_id),
            FunctionType::Web => Ok(self.web_request(req, &request_id)),
        };
        let mut response = match outbound {
            Ok(outbound) => match self.forward(outbound).await {
                Ok(resp) => resp,
                Err((status, code, message)) => error_response(status, code, &message, &request_id),
            },
            Err(resp) => *resp,
        };
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        let duration = started.elapsed();
        let restore = if self
            .first_reply_seen
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            None
        } else {
            // Reads /proc and asks the VMM: off the async workers. Logged by the instance.
            let instance = Arc::clone(&self.instance);
            tokio::task::spawn_blocking(move || instance.restore_report())
                .await
                .ok()
                .flatten()
        };
        if let Some(report) = &self.on_invocation {
            report(&InvocationRecord {
                request_id,
                method,
                path,
                status: response.status(),
                duration,
                restore,
            });
        }
        response
    }

    /// The client's POST as the contract's event invocation.
    fn event_request(
        &self,
        req: Request<Incoming>,
        request_id: &str,
    ) -> Result<Request<Incoming>, Box<Response<Body>>> {
        if req.method() != Method::POST {
            let mut resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &format!(
                    "an event function is invoked with POST, not {}",
                    req.method()
                ),
                request_id,
            );
            resp.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static("POST"));
            return Err(Box::new(resp));
        }
        let (parts, body) = req.into_parts();
        let mut out = Request::builder()
            .method(Method::POST)
            .uri(EVENT_PATH)
            .body(body)
            .expect("a static method and path make a valid request");
        let headers = out.headers_mut();
        headers.insert(
            hyper::header::HOST,
            HeaderValue::from_static("127.0.0.1:9000"),
        );
        let content_type = parts
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from_static("application/json"));
        headers.insert(hyper::header::CONTENT_TYPE, content_type);
        if let Some(len) = parts.headers.get(hyper::header::CONTENT_LENGTH) {
            headers.insert(hyper::header::CONTENT_LENGTH, len.clone());
        }
        // Values were validated when the settings were made; a bad one is skipped, not sent.
        set_scf_headers(headers, &self.settings, request_id);
        Ok(out)
    }

    /// The client's request as it is, but for its hop-by-hop headers, with the invocation's
    /// `X-Scf-*` headers.
    fn web_request(&self, req: Request<Incoming>, request_id: &str) -> Request<Incoming> {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        set_scf_headers(&mut parts.headers, &self.settings, request_id);
        // The client spoke to the front over HTTP/1.x; the stream to the function is HTTP/1.1.
        parts.version = hyper::Version::HTTP_11;
        Request::from_parts(parts, body)
    }

    /// Sends `req` over a fresh stream to the function and hands back its response, whose body
    /// keeps streaming from the function as the client reads it.
    async fn forward(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, (StatusCode, &'static str, String)> {
        let unavailable = |what: String| (StatusCode::BAD_GATEWAY, "FunctionUnavailable", what);
        if let Some(report) = self.instance.exited() {
            return Err(unavailable(format!(
                "the function is not running: {}",
                report.reason
            )));
        }
        let timeout = Duration::from_secs(u64::from(self.settings.timeout_s.max(1)));
        let (mut parts, body) = req.into_parts();
        let mut uri = hyper::Uri::builder()
            .scheme("http")
            .authority(POOL_AUTHORITY);
        if let Some(pq) = parts.uri.path_and_query() {
            uri = uri.path_and_query(pq.clone());
        }
        parts.uri = uri
            .build()
            .map_err(|e| unavailable(format!("request target: {e}")))?;
        let req = Request::from_parts(parts, body);
        let response = match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => {
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    "FunctionTimeout",
                    format!(
                        "the function did not answer within its timeout of {} s",
                        self.settings.timeout_s
                    ),
                ))
            }
            Ok(Err(e)) if e.is_connect() => {
                return Err(unavailable(format!(
                    "cannot reach the function's port 9000: {}",
                    error_chain(&e)
                )))
            }
            Ok(Err(e)) => {
                return Err(unavailable(format!(
                    "the function closed the connection without a complete answer: {}",
                    error_chain(&e)
                )))
            }
            Ok(Ok(resp)) => resp,
        };
        let (mut parts, body) = response.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body.boxed()))
    }
}

/// Removes the headers that describe one connection, not the message (RFC 9110 §7.6.1): each
/// hop frames bodies and manages connections itself.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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

/// The pool key of every stream to the function (the streams all lead to the same port 9000).
const POOL_AUTHORITY: &str = "function";
/// Idle streams to the function are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many idle streams are kept.
const POOL_MAX_IDLE: usize = 64;

/// Opens streams to the function's port 9000 for a pooled hyper client (`fnvm run` here, one
/// client per instance in the service's pool).
#[derive(Clone)]
pub(crate) struct InstanceConnector {
    pub(crate) instance: Arc<dyn Instance>,
}

impl tower_service::Service<hyper::Uri> for InstanceConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper::Uri) -> Self::Future {
        let instance = Arc::clone(&self.instance);
        Box::pin(async move {
            // A Unix connect (process sandbox) or a connect plus the vsock `CONNECT` exchange
            // with the local VMM (vm): short, but blocking, so off the async workers.
            let stream = tokio::task::spawn_blocking(move || instance.connect())
                .await
                .map_err(std::io::Error::other)??;
            stream.set_nonblocking(true)?;
            Ok(TokioIo::new(tokio::net::UnixStream::from_std(stream)?))
        })
    }
}

/// An error and its causes, one level each.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The design's error body: `{"error": {"code", "message", "request_id"}}`.
fn error_response(
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
        .body(
            Full::new(Bytes::from(bytes))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("a valid status and header make a valid response")
}

/// Binds the front's address; `127.0.0.1:0` picks a free port (see [`std::net::TcpListener::local_addr`]).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
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

    #[test]
    fn errors_have_the_designs_json_shape() {
        let resp = error_response(StatusCode::BAD_GATEWAY, "FunctionUnavailable", "gone", "r1");
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        let body = futures_body(resp);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "FunctionUnavailable");
        assert_eq!(v["error"]["message"], "gone");
        assert_eq!(v["error"]["request_id"], "r1");
    }

    /// Stands in for a sandbox: streams to a real HTTP/1.1 server on a Unix socket, as the
    /// agent's bridge delivers them. The server echoes what it received.
    struct UnixInstance {
        path: std::path::PathBuf,
    }

    impl Instance for UnixInstance {
        fn id(&self) -> &str {
            "unix-test"
        }
        fn connect(&self) -> std::io::Result<std::os::unix::net::UnixStream> {
            std::os::unix::net::UnixStream::connect(&self.path)
        }
        fn wait_exit(&self) -> crate::sandbox::ExitReport {
            unreachable!("not used by the front")
        }
        fn exited(&self) -> Option<crate::sandbox::ExitReport> {
            None
        }
        fn stop(&self) -> Result<(), crate::sandbox::SandboxError> {
            Ok(())
        }
        fn start_info(&self) -> crate::sandbox::StartInfo {
            crate::sandbox::StartInfo {
                kind: crate::sandbox::ColdStart::Boot,
                note: None,
                phases: Vec::new(),
            }
        }
        fn restore_report(&self) -> Option<crate::sandbox::RestoreReport> {
            None
        }
    }

    fn echo_server(listener: std::os::unix::net::UnixListener) {
        use std::io::{BufRead, BufReader, Read, Write};
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = Vec::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    head.push(line.trim_end().to_string());
                }
                let len = head
                    .iter()
                    .find_map(|h| {
                        h.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
                if head[0].starts_with("GET /big ") {
                    let mut conn = conn;
                    write!(
                        conn,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                        64u64 << 20
                    )
                    .unwrap();
                    let chunk = vec![b'z'; 1 << 20];
                    for _ in 0..64 {
                        conn.write_all(&chunk).unwrap();
                    }
                    return;
                }
                let reply =
                    serde_json::json!({"head": head, "body": String::from_utf8_lossy(&body)});
                let reply = serde_json::to_vec(&reply).unwrap();
                let mut conn = conn;
                write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", reply.len()).unwrap();
                conn.write_all(&reply).unwrap();
            });
        }
    }

    /// A front for `function_type` on a free port, backed by [`echo_server`].
    fn front(
        function_type: FunctionType,
    ) -> (SocketAddr, tokio::runtime::Runtime, tempfile::TempDir) {
        front_with(function_type, ConnectionLimits::default())
    }

    fn front_with(
        function_type: FunctionType,
        limits: ConnectionLimits,
    ) -> (SocketAddr, tokio::runtime::Runtime, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("9000.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || echo_server(listener));
        let mut settings = FunctionSettings::local("front-test");
        settings.memory_mib = 192;
        let front = Arc::new(Front::new(
            Arc::new(UnixInstance { path }),
            settings,
            function_type,
        ));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
        runtime.spawn(front.serve(listener, limits));
        (addr, runtime, dir)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into()
    }

    #[test]
    fn an_event_post_becomes_event_invoke_with_the_scf_headers() {
        let (addr, _rt, _dir) = front(FunctionType::Event);
        let mut resp = agent()
            .post(format!("http://{addr}/whatever?x=1"))
            .header("X-Scf-Name", "spoofed")
            .send("{\"a\":1}")
            .unwrap();
        assert_eq!(resp.status(), 200);
        let rid = resp.headers()["x-scf-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let echo: serde_json::Value =
            serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
        let head: Vec<String> = echo["head"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_ascii_lowercase())
            .collect();
        assert_eq!(head[0], "post /event-invoke http/1.1");
        assert!(
            head.contains(&format!("x-scf-request-id: {rid}")),
            "{head:?}"
        );
        assert!(
            head.contains(&"x-scf-name: front-test".to_string()),
            "{head:?}"
        );
        assert!(head.contains(&"x-scf-memory: 192".to_string()), "{head:?}");
        assert_eq!(
            head.iter().filter(|h| h.starts_with("x-scf-")).count(),
            12,
            "{head:?}"
        );
        assert_eq!(echo["body"], "{\"a\":1}");
        let resp = agent().get(format!("http://{addr}/")).call().unwrap();
        assert_eq!(resp.status(), 405);
    }

    #[test]
    fn web_requests_pass_through_and_large_bodies_stream() {
        let (addr, _rt, _dir) = front(FunctionType::Web);
        let mut resp = agent()
            .put(format!("http://{addr}/a/b%20c?q=1&q=2"))
            .header("X-Custom", "v")
            // A caller posing as the platform.
            .header("X-Scf-Request-Id", "forged")
            .header("X-Scf-Secret-Key", "forged")
            .header("X-Scf-Trigger-Src", "Timer")
            .send("payload")
            .unwrap();
        let rid = resp.headers()["x-scf-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let echo: serde_json::Value =
            serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
        let head: Vec<&str> = echo["head"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(head[0], "PUT /a/b%20c?q=1&q=2 HTTP/1.1");
        assert!(
            head.iter().any(|h| h.eq_ignore_ascii_case("x-custom: v")),
            "{head:?}"
        );
        // The contract's headers, as for an event function, and none of the caller's.
        assert!(
            head.contains(&format!("x-scf-request-id: {rid}").as_str()),
            "{head:?}"
        );
        assert!(head.contains(&"x-scf-name: front-test"), "{head:?}");
        let scf: Vec<&&str> = head
            .iter()
            .filter(|h| h.to_ascii_lowercase().starts_with("x-scf-"))
            .collect();
        assert_eq!(scf.len(), 12, "{scf:?}");
        assert!(
            !scf.iter()
                .any(|h| h.contains("forged") || h.contains("Timer")),
            "{scf:?}"
        );
        assert_eq!(echo["body"], "payload");
        let resp = agent().get(format!("http://{addr}/big")).call().unwrap();
        let mut total = 0u64;
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = std::io::Read::read(&mut reader, &mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        assert_eq!(total, 64 << 20);
    }

    #[test]
    fn an_unreachable_function_is_a_502_with_the_request_id() {
        let (addr, _rt, dir) = front(FunctionType::Web);
        std::fs::remove_file(dir.path().join("9000.sock")).unwrap();
        let mut resp = agent().get(format!("http://{addr}/")).call().unwrap();
        assert_eq!(resp.status(), 502);
        let rid = resp.headers()["x-scf-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let v: serde_json::Value =
            serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
        assert_eq!(v["error"]["code"], "FunctionUnavailable");
        assert_eq!(v["error"]["request_id"], rid.as_str());
    }

    /// Ok once the peer closed `s` (EOF or reset); Err with what it sent, or "still open".
    fn closed_within(s: &mut std::net::TcpStream, wait: Duration) -> Result<(), String> {
        use std::io::Read;
        s.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 1024];
        match s.read(&mut buf) {
            Ok(0) => Ok(()),
            Ok(n) => Err(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err("still open".into()),
            Err(_) => Ok(()),
        }
    }

    #[test]
    fn slow_clients_are_closed_after_the_header_timeout_and_surplus_ones_refused() {
        use std::io::{Read, Write};
        let limits = ConnectionLimits {
            header_timeout: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(600),
            max_connections: 2,
        };
        let (addr, _rt, _dir) = front_with(FunctionType::Web, limits);
        let opened = Instant::now();
        let mut slow = std::net::TcpStream::connect(addr).unwrap();
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        slow.write_all(b"G").unwrap();
        // Both places are taken: a third client gets a 503 naming the limit, then EOF.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut third = std::net::TcpStream::connect(addr).unwrap();
            third
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            third
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let mut reply = String::new();
            let _ = third.read_to_string(&mut reply);
            if reply.starts_with("HTTP/1.1 503") {
                assert!(
                    reply.contains("max_connections 2") && reply.contains("Retry-After: 1"),
                    "{reply}"
                );
                break;
            }
            // The front may not have taken both connections yet.
            assert!(Instant::now() < deadline, "no refusal: {reply}");
        }
        // The slowloris client trickles a byte every 200 ms and never finishes its head.
        let head = b"ET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        let closed = head.iter().cycle().take(300).any(|b| {
            slow.write_all(&[*b]).is_err()
                || closed_within(&mut slow, Duration::from_millis(200)).is_ok()
        });
        assert!(closed, "the slow client was never closed");
        assert!(
            opened.elapsed() >= Duration::from_secs(2),
            "closed before its header timeout"
        );
        assert_eq!(closed_within(&mut idle, Duration::from_secs(30)), Ok(()));
        // With the places free again, a request is served.
        let resp = agent().get(format!("http://{addr}/after")).call().unwrap();
        assert_eq!(resp.status(), 200);
    }

    #[test]
    fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() {
        use std::io::{Read, Write};
        let limits = ConnectionLimits {
            header_timeout: Duration::from_secs(600),
            keepalive_timeout: Duration::from_secs(1),
            max_connections: 8,
        };
        let (addr, _rt, _dir) = front_with(FunctionType::Web, limits);
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut reply = [0u8; 4096];
        let n = conn.read(&mut reply).unwrap();
        assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
        // Far sooner than the 600 s header timeout: the keep-alive timeout closed it.
        let mut closed = Err(String::new());
        for _ in 0..60 {
            closed = closed_within(&mut conn, Duration::from_secs(1));
            if closed.is_ok() {
                break;
            }
        }
        assert_eq!(closed, Ok(()), "the idle keep-alive connection stayed open");
    }

    fn futures_body(resp: Response<Body>) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { resp.into_body().collect().await.unwrap().to_bytes() })
    }
}
