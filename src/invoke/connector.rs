//! Streams to an instance's port 9000 for a pooled hyper client: the one client both `fnvm run`
//! and every instance of the service's pool talk to a function with. Idle keep-alive streams are
//! reused, so a warm request costs no stream set-up in the agent's bridge nor a new connection
//! in the function's server.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::OutBody;
use crate::sandbox::Instance;

/// The pool key of every stream to an instance (each instance has a client of its own, and its
/// streams all lead to the same port 9000).
pub const POOL_AUTHORITY: &str = "function";
/// Idle streams to the function are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many idle streams are kept.
const POOL_MAX_IDLE: usize = 64;

/// A client of the instance's port 9000 whose streams are reused while idle (a new stream is
/// opened whenever none is free).
pub type InstanceClient = Client<InstanceConnector, OutBody>;

/// The pooled client of `instance`.
///
/// Header names go out as the client spelled them ([`crate::http_server`] records each
/// request's spelling) and, where nobody spelled them, in Title-Case: the contract's
/// `X-Scf-Request-Id`, not `x-scf-request-id`. HTTP names are case-insensitive, but user code
/// that compares raw names must see them as documented. The function's own spelling of its
/// response headers is kept the same way on the way back.
pub fn client(instance: Arc<dyn Instance>) -> InstanceClient {
    Client::builder(TokioExecutor::new())
        .http1_title_case_headers(true)
        .http1_preserve_header_case(true)
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_MAX_IDLE)
        .build(InstanceConnector { instance })
}

/// The HTTP/1.1 connection settings of a single stream to a function (upgrades), spelling
/// header names as [`client`] does.
pub fn http1_to_function() -> hyper::client::conn::http1::Builder {
    let mut builder = hyper::client::conn::http1::Builder::new();
    builder.title_case_headers(true).preserve_header_case(true);
    builder
}

/// A fresh non-blocking stream to the instance's port 9000.
pub async fn connect(instance: Arc<dyn Instance>) -> std::io::Result<tokio::net::UnixStream> {
    if let Some(path) = instance.port_socket() {
        return tokio::net::UnixStream::connect(&path).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot connect to the function's port at {}: {e}",
                    path.display()
                ),
            )
        });
    }
    // A connect plus the vsock `CONNECT` exchange with the local VMM (vm): short, but
    // blocking, so off the async workers.
    let stream = tokio::task::spawn_blocking(move || instance.connect())
        .await
        .map_err(std::io::Error::other)??;
    stream.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(stream)
}

/// Opens streams to the function's port 9000 for a pooled hyper client.
#[derive(Clone)]
pub struct InstanceConnector {
    instance: Arc<dyn Instance>,
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
        Box::pin(async move { Ok(TokioIo::new(connect(instance).await?)) })
    }
}
