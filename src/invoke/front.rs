//! The host-side HTTP front of one running function (`fnvm run`, `fnvm demo`).
//!
//! Every request a client sends to the front's address is one HTTP/1.1 exchange on a stream to
//! the function's port 9000 ([`Instance::connect`]); idle keep-alive streams are reused, a new
//! one is opened whenever none is free. The request is built and forwarded by the same steps
//! as in the service's pool ([`super::request`], [`super::proxy`]):
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

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};

use super::connector::{self, InstanceClient};
use super::idle::IdleLimit;
use super::proxy::{self, error_response, FirstReply, ForwardError};
use super::request::{event_request, web_request, EventHead};
use super::{new_request_id, set_request_id, Body, FunctionType, OutBody};
use crate::function::FunctionSettings;
use crate::http_server::ConnectionLimits;
use crate::sandbox::Instance;

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
    /// Keep-alive HTTP/1.1 streams to the function, reused while idle.
    client: InstanceClient,
    settings: FunctionSettings,
    function_type: FunctionType,
    on_invocation: Option<InvocationHook>,
    /// Set by the first reply: the restore is measured once, at that point.
    first_reply: FirstReply,
}

/// A reply the front makes itself instead of the function's: status, error code, message.
struct FrontError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl From<ForwardError> for FrontError {
    fn from(e: ForwardError) -> Self {
        let (status, code) = match e {
            ForwardError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "FunctionTimeout"),
            _ => (StatusCode::BAD_GATEWAY, "FunctionUnavailable"),
        };
        FrontError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

impl Front {
    pub fn new(
        instance: Arc<dyn Instance>,
        settings: FunctionSettings,
        function_type: FunctionType,
    ) -> Self {
        let client = connector::client(Arc::clone(&instance));
        Self {
            instance,
            client,
            settings,
            function_type,
            on_invocation: None,
            first_reply: FirstReply::default(),
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
        let request_id = new_request_id();
        let method = req.method().clone();
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let mut response = match self.invoke(req, &request_id).await {
            Ok(resp) => resp,
            Err(e) => {
                let mut resp = error_response(e.status, e.code, &e.message, &request_id);
                if e.status == StatusCode::METHOD_NOT_ALLOWED {
                    resp.headers_mut()
                        .insert(hyper::header::ALLOW, HeaderValue::from_static("POST"));
                }
                resp
            }
        };
        set_request_id(&mut response, &request_id);
        let duration = started.elapsed();
        let restore = match self.first_reply.probe(&self.instance) {
            // Logged by the instance.
            Some(probe) => probe.await.ok().flatten(),
            None => None,
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

    /// The client's request as the function's invocation, sent to the instance.
    async fn invoke(
        &self,
        req: Request<Incoming>,
        request_id: &str,
    ) -> Result<Response<Body>, FrontError> {
        let outbound: Request<OutBody> = match self.function_type {
            FunctionType::Event => {
                if req.method() != Method::POST {
                    return Err(FrontError {
                        status: StatusCode::METHOD_NOT_ALLOWED,
                        code: "MethodNotAllowed",
                        message: format!(
                            "an event function is invoked with POST, not {}",
                            req.method()
                        ),
                    });
                }
                let (parts, body) = req.into_parts();
                let head = EventHead {
                    content_type: parts.headers.get(hyper::header::CONTENT_TYPE).cloned(),
                    content_length: parts.headers.get(hyper::header::CONTENT_LENGTH).cloned(),
                    timer: false,
                };
                event_request(body.boxed(), head, &self.settings, request_id)
            }
            FunctionType::Web => web_request(req, &self.settings, request_id).map(BodyExt::boxed),
        };
        if let Some(report) = self.instance.exited() {
            return Err(FrontError {
                status: StatusCode::BAD_GATEWAY,
                code: "FunctionUnavailable",
                message: format!("the function is not running: {}", report.reason),
            });
        }
        let timeout_s = self.settings.timeout_s;
        match self.function_type {
            // As in the service: an event's answer is complete, within the timeout, before it
            // is handed on (a body that never ends is a 504, not a hung caller).
            FunctionType::Event => {
                Ok(proxy::forward_whole(&self.client, outbound, timeout_s).await?)
            }
            FunctionType::Web => {
                let response = proxy::forward(&self.client, outbound, timeout_s).await?;
                Ok(response.map(|body| IdleLimit::new(body, timeout_s).boxed()))
            }
        }
    }
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

    /// One request from `reader`: its head lines as sent and its `Content-Length` body; None
    /// once the stream ends, also mid-request (the caller went away).
    fn read_request(reader: &mut impl std::io::BufRead) -> Option<(Vec<String>, Vec<u8>)> {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return None;
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
        reader.read_exact(&mut body).ok()?;
        Some((head, body))
    }

    fn echo_server(listener: std::os::unix::net::UnixListener) {
        use std::io::{BufReader, Write};
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let Some((head, body)) = read_request(&mut reader) else {
                    return;
                };
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
        front_on(function_type, limits, 3, echo_server)
    }

    /// A front for `function_type` with a timeout of `timeout_s`, backed by `server`.
    fn front_on(
        function_type: FunctionType,
        limits: ConnectionLimits,
        timeout_s: u32,
        server: fn(std::os::unix::net::UnixListener),
    ) -> (SocketAddr, tokio::runtime::Runtime, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("9000.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || server(listener));
        let mut settings = FunctionSettings::local("front-test");
        settings.memory_mib = 192;
        settings.timeout_s = timeout_s;
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
            head.contains(&format!("X-Scf-Request-Id: {rid}").as_str()),
            "{head:?}"
        );
        assert!(head.contains(&"X-Scf-Name: front-test"), "{head:?}");
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

    /// The function sees the contract's spelling of every `X-Scf-*` name and the client's own
    /// spelling of its headers; the client sees the function's spelling of the response's.
    #[test]
    fn header_names_keep_the_clients_and_the_contracts_spelling() {
        use std::io::{Read, Write};
        for function_type in [FunctionType::Web, FunctionType::Event] {
            let (addr, _rt, _dir) = front(function_type);
            let mut conn = std::net::TcpStream::connect(addr).unwrap();
            conn.write_all(
                b"POST /path HTTP/1.1\r\nHost: front\r\nx-MiXeD-case: one\r\n\
                  CONTENT-type: text/plain\r\ncontent-length: 2\r\nConnection: close\r\n\r\nhi",
            )
            .unwrap();
            let mut reply = String::new();
            conn.read_to_string(&mut reply).unwrap();
            let (head, body) = reply.split_once("\r\n\r\n").unwrap();
            // The echo server's spelling of its own response headers, and fnvm's.
            assert!(
                head.contains("\r\nContent-Type: application/json\r\n"),
                "{head}"
            );
            assert!(head.contains("\r\nX-Scf-Request-Id: "), "{head}");
            let echo: serde_json::Value = serde_json::from_str(body).unwrap();
            let seen: Vec<&str> = echo["head"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            for name in [
                "X-Scf-Request-Id",
                "X-Scf-Memory",
                "X-Scf-Timeout",
                "X-Scf-Version",
                "X-Scf-Name",
                "X-Scf-Namespace",
                "X-Scf-Region",
                "X-Scf-Appid",
                "X-Scf-Uin",
                "X-Scf-Session-Token",
                "X-Scf-Secret-Id",
                "X-Scf-Secret-Key",
            ] {
                assert!(
                    seen.iter().any(|h| h.starts_with(&format!("{name}:"))),
                    "{function_type:?}: {name} not spelled so: {seen:?}"
                );
            }
            match function_type {
                FunctionType::Web => {
                    assert!(seen.contains(&"x-MiXeD-case: one"), "{seen:?}");
                    assert!(seen.contains(&"CONTENT-type: text/plain"), "{seen:?}");
                }
                // An event invocation is a request of fnvm's own making.
                FunctionType::Event => {
                    assert!(seen.contains(&"Content-Type: text/plain"), "{seen:?}");
                }
            }
        }
    }

    /// A function that misbehaves as the request's path (web) or body (event) asks, on
    /// keep-alive connections: `malformed` (not HTTP), `twice` (a second answer nobody asked
    /// for), `never-ends` (10 of 100 bytes, then silence), `slow-big` (1 MiB pieces for a while);
    /// anything else is answered `ok` with the number of the request.
    fn misbehaving_server(listener: std::os::unix::net::UnixListener) {
        use std::io::{BufReader, Write};
        use std::sync::atomic::{AtomicUsize, Ordering};
        static SERVED: AtomicUsize = AtomicUsize::new(0);
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut out = conn;
                // Until the stream ends, or the caller goes away mid-request.
                while let Some((head, body)) = read_request(&mut reader) {
                    let path = head[0].split(' ').nth(1).unwrap_or("/").to_string();
                    let what = if path == "/event-invoke" {
                        String::from_utf8_lossy(&body).into_owned()
                    } else {
                        path.trim_start_matches('/').to_string()
                    };
                    let ok = |out: &mut std::os::unix::net::UnixStream, text: &str| {
                        write!(
                            out,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                            text.len()
                        )
                    };
                    let written = match what.as_str() {
                        "malformed" => out.write_all(b"HTTP/1.1 abc garbage\r\n\r\n"),
                        // Both answers in one write: what fnvm can guarantee. A second
                        // answer sent later, after the next request went out on the stream,
                        // is that request's answer to any HTTP/1.1 client (nginx's too).
                        "twice" => out.write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst\
                              HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
                        ),
                        "never-ends" => {
                            let _ = out.write_all(
                                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                            );
                            std::thread::sleep(Duration::from_secs(30));
                            return;
                        }
                        "slow-big" => {
                            let _ = write!(
                                out,
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                64 << 20
                            );
                            let chunk = vec![b'z'; 1 << 20];
                            for _ in 0..64 {
                                if out.write_all(&chunk).is_err() {
                                    return;
                                }
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            Ok(())
                        }
                        _ => {
                            let n = SERVED.fetch_add(1, Ordering::SeqCst);
                            ok(&mut out, &format!("ok {n}"))
                        }
                    };
                    if written.is_err() {
                        return;
                    }
                }
            });
        }
    }

    /// One call of what the misbehaving function is asked for: status and body (or the read
    /// error's kind, when the answer broke off).
    fn call(addr: SocketAddr, function_type: FunctionType, what: &str) -> (u16, String) {
        let url = match function_type {
            FunctionType::Web => format!("http://{addr}/{what}"),
            FunctionType::Event => format!("http://{addr}/"),
        };
        let mut resp = agent().post(url).send(what).unwrap();
        let status = resp.status().as_u16();
        let body = match resp.body_mut().read_to_string() {
            Ok(text) => text,
            Err(e) => format!("broken: {e}"),
        };
        (status, body)
    }

    /// Bad answers are the caller's clear error, never the next caller's problem.
    #[test]
    fn a_misbehaving_function_gets_its_caller_a_clear_error_and_the_next_call_is_served() {
        use std::io::{Read, Write};
        for function_type in [FunctionType::Event, FunctionType::Web] {
            let (addr, _rt, _dir) = front_on(
                function_type,
                ConnectionLimits::default(),
                1,
                misbehaving_server,
            );
            let served = |(status, body): (u16, String)| {
                assert_eq!(status, 200, "{function_type:?}: {body}");
                assert!(body.starts_with("ok "), "{function_type:?}: {body}");
            };
            served(call(addr, function_type, "hello"));

            // Not HTTP: a 502 in the design's shape.
            let (status, body) = call(addr, function_type, "malformed");
            assert_eq!(status, 502, "{function_type:?}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["error"]["code"], "FunctionUnavailable", "{v}");
            served(call(addr, function_type, "hello"));

            // A second answer nobody asked for never reaches the next caller.
            assert_eq!(call(addr, function_type, "twice"), (200, "first".into()));
            for _ in 0..3 {
                served(call(addr, function_type, "hello"));
            }

            // A body that never ends: an event's caller gets a 504 at the timeout; a web
            // caller, who already has the head, sees its answer cut after the timeout's gap.
            let started = Instant::now();
            let (status, body) = call(addr, function_type, "never-ends");
            match function_type {
                FunctionType::Event => {
                    assert_eq!(status, 504, "{body}");
                    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                    assert_eq!(v["error"]["code"], "FunctionTimeout", "{v}");
                }
                FunctionType::Web => {
                    assert_eq!(status, 200);
                    assert!(body.starts_with("broken"), "{body}");
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "{:?}",
                started.elapsed()
            );
            served(call(addr, function_type, "hello"));

            // A caller that goes away mid-request, and one that goes away mid-answer.
            let mut gone = std::net::TcpStream::connect(addr).unwrap();
            gone.write_all(b"POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123")
                .unwrap();
            drop(gone);
            served(call(addr, function_type, "hello"));
            if function_type == FunctionType::Web {
                let mut reader = std::net::TcpStream::connect(addr).unwrap();
                reader
                    .write_all(b"GET /slow-big HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                let mut some = [0u8; 4096];
                reader.read_exact(&mut some).unwrap();
                drop(reader);
                served(call(addr, function_type, "hello"));
            }
        }
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
}
