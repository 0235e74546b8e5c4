//! How fnvm's two HTTP servers (`fnvm serve`'s API and `fnvm run`'s front) take connections, so
//! that idle, slow or too many clients cannot take them down:
//! - **header-read timeout** — hyper's own (`http1::Builder::header_read_timeout` on a
//!   [`TokioTimer`]): a request head must be complete within it, counted from when the server
//!   starts waiting for it (a new connection, or the end of the previous response), so a
//!   slowloris client that trickles a byte a second is closed;
//! - **keep-alive timeout** — a connection with no request in flight and no byte moving either
//!   way for this long is shut down gracefully (hyper closes it at once when idle and lets a
//!   response in progress finish); hyper has no idle timer of its own for HTTP/1 servers;
//! - **connection cap** — a [`Semaphore`] of `max_connections` places; past it, a small reserve
//!   serves only the routes the server marks as priority (health and management: see
//!   [`Admission`]), one request per connection; past that a connection is answered `503` with
//!   `Retry-After` and closed, without reading it;
//! - **file descriptors** — [`raise_nofile`] raises `RLIMIT_NOFILE` to what the cap needs, or
//!   lowers the cap to what the limit allows, at start;
//! - **accept errors** — a failing `accept` (EMFILE, ENOBUFS, ...) backs off exponentially and
//!   is logged at most once a second with a count, instead of spinning.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Incoming};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The connection limits of one server, with the command-line flags that set them.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionLimits {
    /// How long a client has to send a complete request head, from its connection or the end
    /// of its previous response; slower clients are closed (e.g. 10s, 500ms).
    #[arg(long, env = "FNVM_HEADER_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,
    /// A connection with no request in flight and no bytes moving is closed after this long.
    #[arg(long, env = "FNVM_KEEPALIVE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,
    /// The most client connections served at once; more are answered 503 and closed.
    #[arg(long, env = "FNVM_MAX_CONNECTIONS", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
            max_connections: 4096,
        }
    }
}

/// Where a connection got its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Within `max_connections`: every route.
    Regular,
    /// From the reserve past the cap: the server answers only its priority routes (health,
    /// management) and refuses the rest with [`connection_limit_message`].
    Reserved,
}

/// What a server says when it refuses a request for lack of connection places.
pub fn connection_limit_message(limits: &ConnectionLimits) -> String {
    format!(
        "the server is at its connection limit (max_connections {}); retry later",
        limits.max_connections
    )
}

/// Seconds a refused client is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u32 = 1;

/// Refusals written at once; past that a connection over the limit is just closed.
const MAX_REFUSALS: usize = 64;
/// Descriptors kept for everything but client connections (instances, logs, stores, ...).
const BASE_FDS: u64 = 1024;

/// Raises the soft (and, if it must and may, the hard) `RLIMIT_NOFILE` to what `limits` plus
/// `reserved` connections need: each connection may hold a second descriptor (its stream to
/// an instance). If the limit cannot go that high, `max_connections` is lowered to fit and a
/// warning says so. Returns the limit in force.
pub fn raise_nofile(limits: &mut ConnectionLimits, reserved: u32) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let needed = |max: u64| 2 * (max + u64::from(reserved)) + MAX_REFUSALS as u64 + BASE_FDS;
    let want = needed(u64::from(limits.max_connections));
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let mut have = soft;
    if soft < want {
        // Root may raise the hard limit too; anyone may raise the soft one up to the hard one.
        let raised = setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok()
            || setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).is_ok();
        if raised {
            have = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
        }
    }
    if have < want {
        let fit = (have.saturating_sub(BASE_FDS + MAX_REFUSALS as u64) / 2)
            .saturating_sub(u64::from(reserved))
            .max(1);
        eprintln!(
            "fnvm: warning: RLIMIT_NOFILE is {have}, {want} are needed for {} connections; \
             serving at most {fit}",
            limits.max_connections
        );
        limits.max_connections = u32::try_from(fit).unwrap_or(u32::MAX);
    }
    have
}

/// Serves HTTP/1.1 on `listener` until `shutdown` resolves. `make_service` builds the service
/// of each admitted connection, told how it was admitted.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    limits: ConnectionLimits,
    reserved: u32,
    make_service: M,
    shutdown: impl Future<Output = ()>,
) where
    M: Fn(Admission) -> S,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let regular = Arc::new(Semaphore::new(limits.max_connections as usize));
    let reserve = Arc::new(Semaphore::new(reserved as usize));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    let refusal = Arc::new(refusal_response(&limits));
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff.succeeded();
                    conn
                }
                Err(e) => {
                    backoff.failed(&e).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        let admitted = match Arc::clone(&regular).try_acquire_owned() {
            Ok(p) => Some((Admission::Regular, p)),
            Err(_) => Arc::clone(&reserve)
                .try_acquire_owned()
                .ok()
                .map(|p| (Admission::Reserved, p)),
        };
        let Some((admission, permit)) = admitted else {
            if let Ok(permit) = Arc::clone(&refusals).try_acquire_owned() {
                tokio::spawn(refuse(stream, Arc::clone(&refusal), permit));
            }
            continue;
        };
        let service = make_service(admission);
        tokio::spawn(serve_connection(
            stream,
            permit,
            admission,
            limits.clone(),
            service,
        ));
    }
}

async fn serve_connection<S, B>(
    stream: tokio::net::TcpStream,
    permit: OwnedSemaphorePermit,
    admission: Admission,
    limits: ConnectionLimits,
    service: S,
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::new());
    let io = Tracked {
        io: TokioIo::new(stream),
        activity: Arc::clone(&activity),
        _permit: permit,
    };
    let service = Arc::new(service);
    let svc = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |req| {
            let service = Arc::clone(&service);
            let in_flight = InFlight::enter(&activity);
            async move {
                let _in_flight = in_flight;
                service.call(req).await
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        // Each request's header spelling is recorded (the proxies pass it on to the function)
        // and responses keep the function's; fnvm's own headers go out in Title-Case.
        .preserve_header_case(true)
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A reserved place is given back after one exchange.
        .keep_alive(admission == Admission::Regular);
    let conn = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(conn);
    let keepalive = limits.keepalive_timeout;
    let mut shutting_down = false;
    loop {
        // While a request is handled the connection is not idle: look again a period later.
        let wake = if activity.in_flight.load(Ordering::SeqCst) > 0 {
            tokio::time::Instant::now() + keepalive
        } else {
            tokio::time::Instant::from_std(activity.last_io() + keepalive)
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake), if !shutting_down => {
                if activity.idle_for(keepalive) {
                    tracing::debug!("closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
        }
    }
}

/// When a connection last moved a byte, and how many of its requests are being handled.
struct Activity {
    started: Instant,
    /// Milliseconds after `started`.
    last_io_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    fn last_io(&self) -> Instant {
        self.started + Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed))
    }

    /// No request in flight and no byte moved for `limit`.
    fn idle_for(&self, limit: Duration) -> bool {
        self.in_flight.load(Ordering::SeqCst) == 0 && self.last_io().elapsed() >= limit
    }
}

/// A request being handled (until the service answered its head); counts against idleness.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.touch();
    }
}

/// The client's stream, noting each byte moved; holds the connection's place until it is
/// dropped (also after an upgrade hands the stream to a tunnel).
struct Tracked<T> {
    io: T,
    activity: Arc<Activity>,
    _permit: OwnedSemaphorePermit,
}

impl<T: Read + Unpin> Read for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_ready() {
            self.activity.touch();
        }
        r
    }
}

impl<T: Write + Unpin> Write for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
}

/// The whole 503 a connection past every limit gets, in the design's error shape.
fn refusal_response(limits: &ConnectionLimits) -> Vec<u8> {
    let body = serde_json::json!({"error": {
        "code": "TooManyConnections",
        "message": connection_limit_message(limits),
        "request_id": "",
    }})
    .to_string()
        + "\n";
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nRetry-After: {RETRY_AFTER_SECS}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Writes the refusal and closes. What the client sent is read (for a moment, and thrown
/// away) before the close, so the kernel does not answer it with a reset that loses the 503.
async fn refuse(
    mut stream: tokio::net::TcpStream,
    response: Arc<Vec<u8>>,
    _p: OwnedSemaphorePermit,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(&response).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// Exponential back-off of a failing `accept`, logged at most once a second.
#[derive(Default)]
struct AcceptBackoff {
    delay: Duration,
    failures: u64,
    last_log: Option<Instant>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }

    async fn failed(&mut self, e: &std::io::Error) {
        // The peer gave up before it was accepted: nothing is wrong with the server.
        if matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionAborted | std::io::ErrorKind::ConnectionReset
        ) {
            return;
        }
        self.failures += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(error = %e, failures = self.failures, "accepting connections fails; backing off");
            self.last_log = Some(Instant::now());
            self.failures = 0;
        }
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        tokio::time::sleep(self.delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_a_complete_503_naming_the_limit() {
        let limits = ConnectionLimits {
            max_connections: 7,
            ..Default::default()
        };
        let text = String::from_utf8(refusal_response(&limits)).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        assert!(head.contains("\r\nRetry-After: 1"), "{head}");
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "TooManyConnections");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_connections 7"));
    }
}
