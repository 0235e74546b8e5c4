//! The agent's side of the host ↔ agent protocol, on hostile bytes: the control stream's JSON
//! lines as the agent reads them (`protocol::read_message` of `HostMessage`s; the host is
//! trusted, but a line is still bounded and never a panic), and the request-head scanner
//! (`request_head::RequestHead`) that reads the heads of web requests passing through the
//! bridge, which are the caller's bytes.
//!
//! Invariants: every message read writes (`write_message`) as a line that reads back to
//! the same message; a request id found is 1..=ID_LIMIT bytes of `[A-Za-z0-9._-]`.
//!
//! Input: 1 control byte (even: a control stream; odd: request-head turns cut every
//! `byte / 2 + 1` bytes), then the bytes.
#![no_main]

use std::io::Cursor;

use fnvm_agent::protocol::{self, HostMessage, ProtocolError};
use libfuzzer_sys::fuzz_target;

/// The agent binary's own module (it is not part of the agent's library): the same source
/// file, compiled here.
#[path = "../../agent/src/request_head.rs"]
#[allow(dead_code)]
mod request_head;

use request_head::{RequestHead, ID_LIMIT};

fn control_stream(bytes: &[u8]) {
    let mut input = Cursor::new(bytes);
    loop {
        match protocol::read_message::<_, HostMessage>(&mut input) {
            Ok(Some(message)) => {
                if let HostMessage::Hello { version } = &message {
                    let _ = protocol::check_version(*version);
                }
                let mut line = Vec::new();
                protocol::write_message(&mut line, &message).expect("a message writes");
                let back = protocol::read_message::<_, HostMessage>(&mut Cursor::new(&line))
                    .expect("a written message reads")
                    .expect("a written message is there");
                assert_eq!(back, message);
            }
            Ok(None) | Err(ProtocolError::Io(_)) | Err(ProtocolError::TooLong) => return,
            // A malformed line ends the stream for the agent; the rest is not looked at.
            Err(_) => return,
        }
    }
}

fn request_heads(cut: usize, bytes: &[u8]) {
    let mut head = RequestHead::new();
    for chunk in bytes.chunks(cut) {
        if !head.scanning() {
            head.next_turn();
        }
        if let Some(id) = head.feed(chunk) {
            assert!(!id.is_empty() && id.len() <= ID_LIMIT, "{id:?}");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        control_stream(bytes);
    } else {
        request_heads(usize::from(which >> 1) + 1, bytes);
    }
});
