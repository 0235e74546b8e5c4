//! Splitting the function's output into log lines: at each newline, and every
//! [`MAX_LINE_BYTES`] for a line that never ends, so one runaway line can neither grow the
//! agent's memory nor exceed a control message.

/// The longest line sent as one log message; longer lines arrive as several.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Turns a byte stream into lines (without their `\n`), invalid UTF-8 replaced.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new() -> Self {
        LineSplitter {
            pending: Vec::with_capacity(4096),
        }
    }

    /// Feeds `data`; calls `emit` for every line it completes, in order.
    pub fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(String)) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.append(&data[..end], emit);
                    emit(take_line(&mut self.pending));
                    data = &data[end + 1..];
                }
                None => {
                    self.append(data, emit);
                    data = &[];
                }
            }
        }
    }

    /// The end of the stream: a last line without its newline is still a line.
    pub fn finish(&mut self, emit: &mut impl FnMut(String)) {
        if !self.pending.is_empty() {
            emit(take_line(&mut self.pending));
        }
    }

    /// Adds bytes of an unfinished line, emitting full chunks as they fill up.
    fn append(&mut self, mut data: &[u8], emit: &mut impl FnMut(String)) {
        while self.pending.len() + data.len() > MAX_LINE_BYTES {
            let room = MAX_LINE_BYTES - self.pending.len();
            self.pending.extend_from_slice(&data[..room]);
            data = &data[room..];
            // Cut at a character boundary: keep a split UTF-8 sequence for the next chunk.
            let keep = incomplete_utf8_tail(&self.pending);
            let carry = self.pending.split_off(self.pending.len() - keep);
            emit(take_line(&mut self.pending));
            self.pending = carry;
        }
        self.pending.extend_from_slice(data);
    }
}

fn take_line(buf: &mut Vec<u8>) -> String {
    let line = String::from_utf8_lossy(buf).into_owned();
    buf.clear();
    line
}

/// How many trailing bytes of `buf` form the start of a UTF-8 sequence that is cut off.
fn incomplete_utf8_tail(buf: &[u8]) -> usize {
    // A sequence is at most 4 bytes: look at the last 3 for a lead byte whose sequence does
    // not fit in what follows it.
    for back in 1..=3.min(buf.len()) {
        let b = buf[buf.len() - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: keep looking for its lead byte
        }
        let needed = match b {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0, // ASCII or invalid: nothing to carry
        };
        return if needed > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        let mut splitter = LineSplitter::new();
        for chunk in chunks {
            splitter.push(chunk, &mut |l| out.push(l));
        }
        splitter.finish(&mut |l| out.push(l));
        out
    }

    #[test]
    fn lines_split_at_newlines_across_reads() {
        assert_eq!(
            split(&[b"hel", b"lo\nwor", b"ld\n\nlast"]),
            ["hello", "world", "", "last"]
        );
        assert_eq!(split(&[b"a\n"]), ["a"]);
        assert!(split(&[b""]).is_empty());
    }

    #[test]
    fn a_long_line_is_chunked_and_nothing_is_lost() {
        let long = vec![b'x'; MAX_LINE_BYTES * 2 + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        let lines = split(&[&input[..100], &input[100..]]);
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES);
        assert_eq!(lines[1].len(), MAX_LINE_BYTES);
        assert_eq!(lines[2].len(), 10);
        assert_eq!(lines[3], "next");
    }

    #[test]
    fn chunks_never_split_a_character() {
        // 'é' is two bytes; an odd offset puts one across the chunk boundary.
        let mut input = vec![b'a'];
        while input.len() < MAX_LINE_BYTES + 100 {
            input.extend_from_slice("é".as_bytes());
        }
        let lines = split(&[&input]);
        assert!(
            lines.iter().all(|l| !l.contains('\u{FFFD}')),
            "a character was cut"
        );
        assert_eq!(lines.concat().as_bytes(), &input[..]);
        assert!(lines[0].len() <= MAX_LINE_BYTES);
    }

    #[test]
    fn invalid_utf8_is_replaced_not_dropped() {
        assert_eq!(split(&[b"a\xffb\n"]), ["a\u{FFFD}b"]);
    }
}
