//! A request's hold on one slot of an instance ([`Lease`]): taken by the capacity policy,
//! released when the request ends (or, for a streamed web response, with the instance's last
//! byte: [`LeasedBody`]), or turned into the instance's destruction when it timed out or
//! crashed. Its end frees the slot, records the request as answered for log attribution and
//! applies what the policy decides then (retire a drained version's or a fair-share surplus
//! instance).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lifecycle::with_last_lines;
use super::{Inner, InvokeError, Running, Slot};
use crate::invoke::connector::InstanceClient;
use crate::invoke::proxy::ForwardError;
use crate::sandbox::Instance;
use crate::service::model::FunctionVersion;

/// A web response's body on its way to the caller, holding the instance's slot (a [`Lease`])
/// until the instance has sent its last byte. Then the lease goes: the slot is free however
/// slowly the caller reads, and the request counts as answered before the caller sees that
/// byte, so a caller's next request cannot seem to overlap this one in the log attribution.
pub(super) struct LeasedBody<B, L = Lease> {
    body: B,
    lease: Option<L>,
}

impl<B: hyper::body::Body + Unpin, L> LeasedBody<B, L> {
    pub(super) fn new(body: B, lease: L) -> Self {
        // An empty body may never be polled: its response is complete with the head.
        let lease = (!body.is_end_stream()).then_some(lease);
        Self { body, lease }
    }
}

impl<B: hyper::body::Body + Unpin, L: Unpin> hyper::body::Body for LeasedBody<B, L> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            // The last frame of a body of known length: the server may not poll again.
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            this.lease = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// A request's hold on one slot of an instance. Dropping it frees the slot; [`Lease::destroy`]
/// stops the instance instead.
pub(super) struct Lease {
    inner: Arc<Inner>,
    pub(super) slot: Arc<Slot>,
    /// The function's active version when the lease was taken: its settings (timeout,
    /// headers) apply, also on an instance started under an earlier record of the same
    /// version (a changed timeout or scaling knob keeps the version id).
    pub(super) settings_from: Arc<FunctionVersion>,
    request_id: String,
    destroy: bool,
}

impl Lease {
    fn running(&self) -> &Running {
        self.slot
            .running
            .get()
            .expect("a leased instance is running")
    }

    /// The pooled client of the leased instance.
    pub(super) fn client(&self) -> &InstanceClient {
        &self.running().client
    }

    /// The leased instance.
    pub(super) fn instance(&self) -> &Arc<dyn Instance> {
        &self.running().instance
    }

    /// Ends the lease by stopping the instance instead of freeing its slot.
    pub(super) fn destroy(mut self) {
        self.destroy = true;
    }

    /// The instance's reply head arrived. The first reply of a snapshot start measures its
    /// restore (in the background: it reads /proc and asks the VMM).
    pub(super) fn replied(&self) {
        let Some(running) = self.slot.running.get() else {
            return;
        };
        if let Some(probe) = self.slot.first_reply.probe(&running.instance) {
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move {
                if let Ok(Some(report)) = probe.await {
                    inner.metrics.restore(&report);
                }
            });
        }
    }

    /// The request got no complete answer: a timeout destroys the instance, a broken or
    /// unreachable one is a crash (see [`Lease::crashed`]), a request that cannot be sent only
    /// ends the lease.
    pub(super) async fn failed(self, e: ForwardError) -> InvokeError {
        match e {
            ForwardError::Timeout { secs } => {
                self.destroy();
                InvokeError::Timeout { secs }
            }
            ForwardError::Target(_) => InvokeError::Internal(e.to_string()),
            ForwardError::Unreachable(cause) | ForwardError::Broken(cause) => {
                self.crashed(cause).await
            }
        }
    }

    /// The instance failed mid-request: says how, and destroys it.
    pub(super) async fn crashed(self, error: String) -> InvokeError {
        let instance = Arc::clone(self.instance());
        // The stream breaks a moment before the sandbox notices its agent or function died.
        let mut report = instance.exited();
        for _ in 0..20 {
            if report.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            report = instance.exited();
        }
        let detail = match report {
            Some(r) => format!(
                "instance {} {}",
                self.slot.id,
                with_last_lines(&r.reason, &r.last_lines)
            ),
            None => format!(
                "instance {}: the function closed the connection without a complete answer: \
                 {error}",
                self.slot.id
            ),
        };
        self.destroy();
        InvokeError::Crashed { detail }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut a = self
                .slot
                .attribution
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            a.end(&self.request_id);
        }
        let mut st = self.inner.lock();
        let key = &self.slot.key;
        let current = st.functions.get(key).map(|f| f.version.version.clone());
        let mut retire = self.destroy || st.shutting_down;
        if let Some(e) = st
            .functions
            .get_mut(key)
            .and_then(|f| f.entries.iter_mut().find(|e| e.slot.id == self.slot.id))
        {
            e.in_flight = e.in_flight.saturating_sub(1);
            e.last_used = Instant::now();
            if e.in_flight == 0 && current.as_deref() != Some(&self.slot.version.version) {
                retire = true;
            }
        }
        let idle_now = st
            .functions
            .get(key)
            .and_then(|f| f.entries.iter().find(|e| e.slot.id == self.slot.id))
            .is_some_and(|e| e.in_flight == 0);
        if idle_now && !retire && self.inner.over_fair_share(&st, key, 0) {
            tracing::debug!(function = %key, instance = %self.slot.id, "giving an instance back: other functions wait for memory");
            retire = true;
        }
        if retire {
            self.inner.retire(&mut st, key, &self.slot.id);
        }
        self.inner.publish(&st);
        // A freed slot is for the next request of this function; only a retired instance, or
        // an idle one that a request waiting for memory could reclaim, concerns the others.
        let everyone = retire || (idle_now && !st.memory_waiters.is_empty());
        let freed = st.functions.get(key).map(|f| Arc::clone(&f.freed));
        drop(st);
        match freed {
            Some(freed) if !everyone => freed.notify_one(),
            _ => self.inner.changed.notify_waiters(),
        }
    }
}

impl Inner {
    /// A lease on `slot` for `request_id` (its log lines now count as the request's).
    pub(super) fn lease(
        self: &Arc<Self>,
        slot: Arc<Slot>,
        settings_from: Arc<FunctionVersion>,
        request_id: &str,
    ) -> Lease {
        slot.attribution
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin(request_id);
        Lease {
            inner: Arc::clone(self),
            slot,
            settings_from,
            request_id: request_id.to_string(),
            destroy: false,
        }
    }
}
