//! Upgrades (a WebSocket handshake or any other protocol) to a web function: the request goes
//! on a stream of its own; if the function answers 101, the client's and the function's
//! upgraded connections are joined byte for byte until either side closes. Whatever holds the
//! instance for the request (the service's lease) is held by the tunnel until then; the
//! function's timeout covers the handshake only.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::proxy::ForwardError;
use super::request::{strip_hop_by_hop, web_request};
use super::{connector, error_chain, Body};
use crate::function::FunctionSettings;
use crate::sandbox::Instance;

/// The function's answer to an upgrade request, with the client's side of the upgrade.
pub struct Handshake {
    response: Response<Incoming>,
    client_side: OnUpgrade,
}

/// Sends the upgrade request `req` (a web request with `Upgrade`) to `instance` and waits for
/// the function's answer within its timeout (`timeout_s`).
pub async fn handshake(
    instance: Arc<dyn Instance>,
    mut req: Request<Incoming>,
    settings: &FunctionSettings,
    request_id: &str,
    timeout_s: u32,
) -> Result<Handshake, ForwardError> {
    let client_side = hyper::upgrade::on(&mut req);
    let upgrade = req.headers().get(hyper::header::UPGRADE).cloned();
    let (mut parts, body) = web_request(req, settings, request_id).into_parts();
    if let Some(upgrade) = upgrade {
        parts.headers.insert(hyper::header::UPGRADE, upgrade);
        parts.headers.insert(
            hyper::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| ForwardError::Target(e.to_string()))?;
    let outbound = Request::from_parts(parts, body);
    let exchange = async move {
        let stream = connector::connect(instance)
            .await
            .map_err(|e| ForwardError::Unreachable(e.to_string()))?;
        let (mut sender, conn) = connector::http1_to_function()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ForwardError::Broken(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "an upgrade connection to a function ended");
            }
        });
        sender
            .send_request(outbound)
            .await
            .map_err(|e| ForwardError::Broken(error_chain(&e)))
    };
    let timeout = Duration::from_secs(u64::from(timeout_s.max(1)));
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(response)) => Ok(Handshake {
            response,
            client_side,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ForwardError::Timeout { secs: timeout_s }),
    }
}

impl Handshake {
    /// The client's response. If the function switched protocols, a task joins the two
    /// upgraded connections, holding `hold` until either side closes; if it declined, its
    /// ordinary response is handed on, holding `hold` until the body is read or dropped.
    pub fn join<H: Send + Sync + 'static>(self, hold: H, instance_id: &str) -> Response<Body> {
        let Handshake {
            mut response,
            client_side,
        } = self;
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            let mut hold = Some(hold);
            let body = body
                .map_frame(move |frame| {
                    let _ = &mut hold;
                    frame
                })
                .map_err(std::io::Error::other)
                .boxed();
            return Response::from_parts(parts, body);
        }
        let function_side = hyper::upgrade::on(&mut response);
        let instance = instance_id.to_string();
        tokio::spawn(async move {
            let _hold = hold;
            match (client_side.await, function_side.await) {
                (Ok(client), Ok(function)) => {
                    let mut client = TokioIo::new(client);
                    let mut function = TokioIo::new(function);
                    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut function).await
                    {
                        tracing::debug!(instance, error = %e, "an upgraded connection ended with an error");
                    }
                }
                (client, function) => tracing::debug!(
                    instance,
                    client_ok = client.is_ok(),
                    function_ok = function.is_ok(),
                    "an upgrade did not complete"
                ),
            }
        });
        let (parts, _) = response.into_parts();
        Response::from_parts(
            parts,
            http_body_util::Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
    }
}
