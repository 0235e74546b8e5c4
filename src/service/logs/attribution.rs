//! Which request a log line of an instance belongs to. The agent's bridge finds each request's
//! `X-Scf-Request-Id` in its head and says so on the control stream, in order with the lines,
//! before the function sees the request; the pool records when it sent and got the answer to
//! each request. A line goes to the request it was read under if that request is one the host
//! sent and did not overlap another on the instance: exact for one request at a time, on any
//! guest clock; lines printed while a web instance serves several requests have no owner.

use crate::sandbox::link::clock::host_now_us;

/// Which request a log line belongs to: the invocations of one instance with the host's times
/// (µs) they were sent and answered. The agent names the request each line was read under
/// ([`LogLine::after_request`](crate::sandbox::LogLine)); that name counts only if it is one of
/// these (the head it came from may hold a caller's bytes) and the request did not overlap
/// another on this instance (then the function may have printed for either).
#[derive(Default)]
pub struct Attribution {
    requests: std::collections::VecDeque<Invocation>,
}

struct Invocation {
    request_id: String,
    sent_us: u64,
    answered_us: Option<u64>,
}

/// Invocations remembered per instance for attributing late lines.
const ATTRIBUTION_HISTORY: usize = 256;

impl Attribution {
    /// The request was sent to the instance now.
    pub fn begin(&mut self, request_id: &str) {
        if self.requests.len() >= ATTRIBUTION_HISTORY {
            if let Some(i) = self.requests.iter().position(|r| r.answered_us.is_some()) {
                self.requests.remove(i);
            }
        }
        self.requests.push_back(Invocation {
            request_id: request_id.to_string(),
            sent_us: host_now_us(),
            answered_us: None,
        });
    }

    /// The request's response is complete (a second call changes nothing).
    pub fn end(&mut self, request_id: &str) {
        let now = host_now_us();
        if let Some(r) = self
            .requests
            .iter_mut()
            .rev()
            .find(|r| r.request_id == request_id && r.answered_us.is_none())
        {
            r.answered_us = Some(now);
        }
    }

    /// The request a line belongs to, given the request the agent says it was read under.
    pub fn owner(&self, after_request: Option<&str>) -> Option<String> {
        let id = after_request?;
        let r = self.requests.iter().rev().find(|r| r.request_id == id)?;
        let end = r.answered_us.unwrap_or(u64::MAX);
        let overlapped = self.requests.iter().any(|o| {
            !std::ptr::eq(o, r) && o.sent_us < end && o.answered_us.is_none_or(|a| a > r.sent_us)
        });
        (!overlapped).then(|| r.request_id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(request_id: &str, sent_us: u64, answered_us: Option<u64>) -> Invocation {
        Invocation {
            request_id: request_id.into(),
            sent_us,
            answered_us,
        }
    }

    #[test]
    fn a_line_belongs_to_the_request_the_agent_read_it_under() {
        let mut a = Attribution::default();
        a.requests.push_back(invocation("a", 100, Some(110)));
        a.requests.push_back(invocation("b", 110, None));
        // Before any request, or under a name the host never sent (a forged head): nobody's.
        assert_eq!(a.owner(None), None);
        assert_eq!(a.owner(Some("forged")), None);
        // One at a time, back to back within a microsecond: each its own, whatever the clocks.
        assert_eq!(a.owner(Some("a")).as_deref(), Some("a"));
        assert_eq!(a.owner(Some("b")).as_deref(), Some("b"));
        // Read after b was answered, before the next request reached the function: b's.
        a.requests[1].answered_us = Some(112);
        assert_eq!(a.owner(Some("b")).as_deref(), Some("b"));
    }

    #[test]
    fn lines_of_requests_served_together_have_no_owner() {
        // A web instance's concurrency: c was sent while b was in flight; the function may have
        // printed a line for either after c's head went by.
        let mut a = Attribution::default();
        a.requests.push_back(invocation("a", 100, Some(110)));
        a.requests.push_back(invocation("b", 120, None));
        a.requests.push_back(invocation("c", 125, Some(130)));
        assert_eq!(a.owner(Some("b")), None);
        assert_eq!(a.owner(Some("c")), None);
        assert_eq!(a.owner(Some("a")).as_deref(), Some("a"));
    }
}
