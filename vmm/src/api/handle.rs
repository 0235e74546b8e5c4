//! The API's in-process front end: [`ApiHandle`] sends requests to a VM from another thread
//! (tests, embedding programs) over a channel that the VM's event loop serves like the socket.

use std::io;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::{Request, Response};

/// How long a library call waits for the event loop (a snapshot of a large VM takes a while).
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request through an [`ApiHandle`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The VM refused the request or failed it; the text is its reply's error.
    #[error("{0}")]
    Refused(String),
}

/// A request and where its reply goes.
pub(crate) struct Envelope {
    pub(crate) request: Request,
    pub(crate) reply: mpsc::Sender<Response>,
}

/// A handle to a VM's API from another thread. Requests are served once
/// [`crate::vmm::Vm::run`] runs; each call waits for the reply.
#[derive(Clone)]
pub struct ApiHandle {
    tx: mpsc::Sender<Envelope>,
    wake: Arc<EventFd>,
}

impl ApiHandle {
    pub fn request(&self, request: Request) -> Response {
        let (reply, rx) = mpsc::channel();
        if self.tx.send(Envelope { request, reply }).is_err() || self.wake.write(1).is_err() {
            return Response::err("the VM is not running");
        }
        rx.recv_timeout(REPLY_TIMEOUT)
            .unwrap_or_else(|_| Response::err("the VM did not answer (not running?)"))
    }

    fn check(r: Response) -> Result<Response, ApiError> {
        if r.ok {
            Ok(r)
        } else {
            Err(ApiError::Refused(r.error.unwrap_or_default()))
        }
    }

    pub fn pause(&self) -> Result<(), ApiError> {
        Self::check(self.request(Request::Pause)).map(drop)
    }
    pub fn resume(&self) -> Result<(), ApiError> {
        Self::check(self.request(Request::Resume)).map(drop)
    }
    pub fn snapshot(&self, dir: impl Into<PathBuf>) -> Result<(), ApiError> {
        Self::check(self.request(Request::Snapshot { dir: dir.into() })).map(drop)
    }
    pub fn metrics(&self) -> Result<Response, ApiError> {
        Self::check(self.request(Request::Metrics))
    }
}

/// The receiving end, kept by the VM until it runs.
pub struct ApiChannel {
    pub(crate) rx: mpsc::Receiver<Envelope>,
    pub(crate) wake: Arc<EventFd>,
    handle: ApiHandle,
}

impl ApiChannel {
    pub fn new() -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        Ok(Self {
            rx,
            handle: ApiHandle {
                tx,
                wake: wake.clone(),
            },
            wake,
        })
    }

    pub fn handle(&self) -> ApiHandle {
        self.handle.clone()
    }
}
