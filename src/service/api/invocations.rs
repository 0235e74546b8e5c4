//! The invocation routes: an event function's `POST .../invocations` and a web function's
//! `.../web/PATH`, each handed to the pool once the function is known to be invocable that way.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};

use super::reply::{err, invoke_error, read_body, ApiError};
use super::{lock, Body, Service, MAX_EVENT_BYTES};
use crate::invoke::{set_request_id, FunctionType};
use crate::service::model::{FunctionKey, FunctionState};

impl Service {
    fn check_invocable(&self, key: &FunctionKey, web: bool) -> Result<(), ApiError> {
        let functions = lock(&self.functions);
        let e = functions.get(key).ok_or_else(|| Self::unknown(key))?;
        let Some(v) = &e.record.version else {
            let why = match &e.record.state {
                FunctionState::Failed { reason } => format!("its deploy failed: {reason}"),
                _ => "its image is still being pulled (state pending)".to_string(),
            };
            return Err(err(
                StatusCode::CONFLICT,
                "FunctionNotActive",
                format!("function {key} cannot be invoked yet: {why}"),
            ));
        };
        let is_web = v.spec.r#type == FunctionType::Web;
        if web != is_web {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "WrongFunctionType",
                if web {
                    format!(
                        "function {key} is an event function: POST to .../functions/{}/invocations",
                        key.name
                    )
                } else {
                    format!(
                        "function {key} is a web function: call .../functions/{}/web/PATH",
                        key.name
                    )
                },
            ));
        }
        Ok(())
    }

    pub(super) async fn invoke_event(
        &self,
        key: &FunctionKey,
        req: Request<Incoming>,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        self.check_invocable(key, false)?;
        let body = read_body(req.into_body(), MAX_EVENT_BYTES, "event").await?;
        let mut resp = self
            .pool
            .invoke_event(key, request_id, body, false)
            .await
            .map_err(invoke_error)?;
        set_request_id(&mut resp, request_id);
        Ok(resp)
    }

    pub(super) async fn invoke_web(
        &self,
        key: &FunctionKey,
        mut req: Request<Incoming>,
        rest: &str,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        self.check_invocable(key, true)?;
        let path = if rest.is_empty() { "/" } else { rest };
        let uri = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        *req.uri_mut() = uri.parse().map_err(|e| {
            err(
                StatusCode::BAD_REQUEST,
                "InvalidPath",
                format!("{uri:?}: {e}"),
            )
        })?;
        let mut resp = self
            .pool
            .invoke_web(key, request_id, req)
            .await
            .map_err(invoke_error)?;
        set_request_id(&mut resp, request_id);
        Ok(resp)
    }
}
