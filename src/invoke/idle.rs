//! A streamed answer that stalls: a web function's answer may stream for as long as it likes,
//! but a gap of more than its timeout between two pieces ends it — as a reverse proxy's read
//! timeout does (nginx's `proxy_read_timeout`). Without it, a function that sends a head and
//! never ends its body would hold its caller, and in the service an instance's slot, forever.
//!
//! At the limit the body ends with an error: hyper then aborts the caller's response (its
//! connection closes mid-body, the only signal left once a status went out) and drops the
//! stream to the function, so the next request gets a fresh one.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};

/// `body`, ended with an error once no frame came for `limit`.
pub struct IdleLimit<B> {
    body: B,
    limit: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<B> IdleLimit<B> {
    /// Limits the gaps of `body` to the function's timeout (`timeout_s`, at least a second).
    pub fn new(body: B, timeout_s: u32) -> Self {
        let limit = Duration::from_secs(u64::from(timeout_s.max(1)));
        Self {
            body,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
        }
    }
}

impl<B> Body for IdleLimit<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = tokio::time::Instant::now() + this.limit;
                this.timer.as_mut().reset(next);
                Poll::Ready(frame.map(|f| f.map_err(std::io::Error::other)))
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the function sent nothing of its answer for {} s (its timeout)",
                        this.limit.as_secs()
                    ),
                )))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    /// A body that yields one frame, then nothing ever again.
    struct Stalls(bool);

    impl Body for Stalls {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Pending
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"first")))))
            }
        }
    }

    #[tokio::test]
    async fn a_body_that_stalls_for_the_timeout_ends_with_an_error_a_busy_one_does_not() {
        let mut body = IdleLimit::new(Stalls(false), 1);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        let started = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("for 1 s"), "{err}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
            "{waited:?}"
        );

        // A long answer whose pieces come more often than the limit passes whole.
        let ticks = Ticks {
            left: 5,
            timer: Box::pin(tokio::time::sleep(Duration::from_millis(500))),
        };
        let whole = IdleLimit::new(ticks, 1).collect().await.unwrap().to_bytes();
        assert_eq!(whole, "xxxxx");
    }

    /// A body of `left` frames, one every 500 ms.
    struct Ticks {
        left: u32,
        timer: Pin<Box<tokio::time::Sleep>>,
    }

    impl Body for Ticks {
        type Data = Bytes;
        type Error = std::io::Error;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(()) => {
                    self.left -= 1;
                    let next = tokio::time::Instant::now() + Duration::from_millis(500);
                    self.timer.as_mut().reset(next);
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
                }
            }
        }
    }
}
