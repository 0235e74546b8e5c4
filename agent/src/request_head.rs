//! Which request the function is about to serve: the `X-Scf-Request-Id` in the head of each
//! request the bridge passes to it.
//!
//! The host names every invocation in that header. The bridge shows this scanner the bytes of
//! each *turn* — the first bytes from the host on a stream, and the first after the function
//! answered — until the request head is complete, so the agent can tell the host which request
//! comes next, in order with the function's log lines, before the function sees it. That
//! attributes lines without comparing two clocks (a restored or emulated guest's clock is off
//! by more than the gap between two requests).
//!
//! The bytes come from the host's pool, but what it passes through of a web request is the
//! caller's: a turn that is really the rest of a body (after a `100 Continue`) may hold a
//! forged head. The host trusts an id only if it names one of its own requests to this
//! instance; here the input is only bounded and never trusted to be HTTP.

/// A head longer than this is not scanned further (hyper's own default limit is larger, but
/// the pool's heads are a few hundred bytes; a body is never worth copying).
pub const HEAD_LIMIT: usize = 16 * 1024;
/// An id longer than this, or with other bytes than `[A-Za-z0-9._-]`, is ignored.
pub const ID_LIMIT: usize = 128;
/// Headers parsed per head (hyper's client and server default).
const MAX_HEADERS: usize = 100;
const HEADER: &str = "x-scf-request-id";

/// The scanner of one stream's host-to-function direction.
#[derive(Debug, Default)]
pub struct RequestHead {
    head: Vec<u8>,
    scanning: bool,
}

impl RequestHead {
    /// A new stream: its first bytes are a request head.
    pub fn new() -> Self {
        RequestHead {
            head: Vec::new(),
            scanning: true,
        }
    }

    /// The function answered: the host's next bytes start a new turn.
    pub fn next_turn(&mut self) {
        self.head.clear();
        self.scanning = true;
    }

    /// Whether the next bytes from the host must be shown to [`RequestHead::feed`].
    pub fn scanning(&self) -> bool {
        self.scanning
    }

    /// Takes the next bytes of the turn; the request id once the head is complete and names
    /// one. After a complete head, a malformed one or [`HEAD_LIMIT`] bytes, scanning stops
    /// until [`RequestHead::next_turn`].
    pub fn feed(&mut self, bytes: &[u8]) -> Option<String> {
        if !self.scanning {
            return None;
        }
        let room = HEAD_LIMIT - self.head.len();
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&self.head) {
            Ok(httparse::Status::Partial) if self.head.len() < HEAD_LIMIT => None,
            Ok(httparse::Status::Complete(_)) => {
                let id = request
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(HEADER))
                    .and_then(|h| valid_id(h.value));
                self.stop();
                id
            }
            // Too long, too many headers, or not HTTP: nothing to learn from this turn.
            _ => {
                self.stop();
                None
            }
        }
    }

    fn stop(&mut self) {
        self.scanning = false;
        self.head = Vec::new();
    }
}

fn valid_id(value: &[u8]) -> Option<String> {
    let ok = !value.is_empty()
        && value.len() <= ID_LIMIT
        && value
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &[u8] = b"POST /event-invoke HTTP/1.1\r\nhost: 127.0.0.1:9000\r\n\
        X-Scf-Request-Id: 1b4e28ba-2fa1-11d2-883f-0016d3cca427\r\ncontent-length: 2\r\n\r\n{}";

    #[test]
    fn the_id_is_found_in_a_head_however_it_is_cut() {
        for cut in 0..EVENT.len() {
            let mut head = RequestHead::new();
            let first = head.feed(&EVENT[..cut]);
            let second = head.feed(&EVENT[cut..]);
            let found = first.or(second);
            assert_eq!(
                found.as_deref(),
                Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427"),
                "cut at {cut}"
            );
            assert!(!head.scanning());
        }
    }

    #[test]
    fn each_turn_is_scanned_once_and_a_body_never() {
        let mut head = RequestHead::new();
        assert!(head.feed(EVENT).is_some());
        // More bytes in the same turn (a body that names an id) are not looked at.
        assert_eq!(
            head.feed(b"GET / HTTP/1.1\r\nx-scf-request-id: forged\r\n\r\n"),
            None
        );
        head.next_turn();
        let next = b"GET /x HTTP/1.1\r\nx-scf-request-id: second\r\n\r\n";
        assert_eq!(head.feed(next).as_deref(), Some("second"));
    }

    #[test]
    fn heads_without_a_usable_id_teach_nothing() {
        for input in [
            &b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nx-scf-request-id: a b\r\n\r\n",
            b"GET / HTTP/1.1\r\nx-scf-request-id: \xff\xfe\r\n\r\n",
            b"\x16\x03\x01 not http at all\r\n\r\n",
            b"{\"the rest\": \"of a body\"}",
        ] {
            let mut head = RequestHead::new();
            let found = head.feed(input);
            assert_eq!(found, None, "{:?}", String::from_utf8_lossy(input));
        }
        let long = format!(
            "GET / HTTP/1.1\r\nx-scf-request-id: {}\r\n\r\n",
            "a".repeat(ID_LIMIT + 1)
        );
        assert_eq!(RequestHead::new().feed(long.as_bytes()), None);
    }

    #[test]
    fn an_endless_head_is_given_up_at_the_limit() {
        let mut head = RequestHead::new();
        assert_eq!(head.feed(b"GET / HTTP/1.1\r\n"), None);
        let filler = b"x-filler: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy\r\n";
        let mut fed = 0;
        while head.scanning() {
            assert_eq!(head.feed(filler), None);
            fed += filler.len();
            assert!(fed <= HEAD_LIMIT + filler.len(), "scanning never stopped");
        }
        assert!(head.head.capacity() == 0, "the head's memory is given back");
    }
}
