//! `fnvm-hello`: the example function of `fnvm demo`.
//!
//! A deliberately small HTTP/1.1 server using only the standard library, so it builds as one
//! static binary (like the agent) and its image holds nothing else. It speaks the function
//! contract: it listens on 0.0.0.0:9000 (or the address given as the only argument), answers
//! `POST /event-invoke` with a JSON greeting that echoes the event and the `X-Scf-Request-Id`,
//! and answers any other request (a web function call) with a short greeting. Connections are
//! kept alive; each one gets a thread (requests are short, the platform bounds concurrency).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

/// The largest request body we accept; an event is small, a bigger body is refused with 413.
const MAX_BODY: usize = 6 << 20;
/// The largest request head (request line plus headers).
const MAX_HEAD: usize = 64 << 10;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0.0.0.0:9000".to_string());
    let listener = match TcpListener::bind(&addr) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fnvm-hello: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    let name = std::env::var("SCF_FUNCTIONNAME").unwrap_or_else(|_| "hello".into());
    println!("fnvm-hello: function {name} listening on {addr}");
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve_connection(stream) {
                        // A client going away mid-connection is normal, not worth a line.
                        let normal = matches!(
                            e.kind(),
                            io::ErrorKind::UnexpectedEof
                                | io::ErrorKind::ConnectionReset
                                | io::ErrorKind::BrokenPipe
                        );
                        if !normal {
                            eprintln!("fnvm-hello: connection error: {e}");
                        }
                    }
                });
            }
            Err(e) => eprintln!("fnvm-hello: accept failed: {e}"),
        }
    }
}

struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn serve_connection(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let request = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                respond(
                    &mut writer,
                    400,
                    "text/plain",
                    e.to_string().as_bytes(),
                    false,
                )?;
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let keep_alive = request.keep_alive;
        let (status, content_type, body) = handle(&request);
        respond(&mut writer, status, content_type, &body, keep_alive)?;
        if !keep_alive {
            return Ok(());
        }
    }
}

/// The function itself.
fn handle(req: &Request) -> (u16, &'static str, Vec<u8>) {
    let path = req.target.split('?').next().unwrap_or("");
    if path == "/event-invoke" {
        if req.method != "POST" {
            return (405, "text/plain", b"event invocations are POSTs\n".to_vec());
        }
        let request_id = req.header("x-scf-request-id").unwrap_or("");
        let event = String::from_utf8_lossy(&req.body);
        println!("fnvm-hello: event {request_id}: {} bytes", req.body.len());
        let body = format!(
            "{{\"message\":\"Hello from fnvm!\",\"request_id\":{},\"function\":{},\"event\":{}}}\n",
            json_string(request_id),
            json_string(req.header("x-scf-name").unwrap_or("")),
            json_string(&event),
        );
        return (200, "application/json", body.into_bytes());
    }
    let body = format!(
        "Hello from fnvm! You asked for {} {}\n",
        req.method, req.target
    );
    (200, "text/plain; charset=utf-8", body.into_bytes())
}

/// Reads one request; `Ok(None)` when the peer closed the connection between requests.
fn read_request(reader: &mut impl BufRead) -> io::Result<Option<Request>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut head_bytes = 0usize;
    let mut line = String::new();
    if read_line(reader, &mut line, &mut head_bytes)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("malformed request line"));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut keep_alive = version == "HTTP/1.1";
    let mut headers = Vec::new();
    loop {
        line.clear();
        if read_line(reader, &mut line, &mut head_bytes)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').ok_or_else(|| bad("malformed header"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let mut req = Request {
        method,
        target,
        headers,
        body: Vec::new(),
        keep_alive,
    };
    if let Some(c) = req.header("connection") {
        if c.eq_ignore_ascii_case("close") {
            keep_alive = false;
        } else if c.eq_ignore_ascii_case("keep-alive") {
            keep_alive = true;
        }
    }
    req.keep_alive = keep_alive;
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        req.body = read_chunked(reader)?;
    } else if let Some(len) = req.header("content-length") {
        let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if len > MAX_BODY {
            return Err(bad("request body too large"));
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        req.body = body;
    }
    Ok(Some(req))
}

fn read_line(reader: &mut impl BufRead, line: &mut String, total: &mut usize) -> io::Result<usize> {
    let n = reader
        .take((MAX_HEAD - *total) as u64 + 1)
        .read_line(line)?;
    *total += n;
    if *total > MAX_HEAD {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "request head too large",
        ));
    }
    Ok(n)
}

fn read_chunked(reader: &mut impl BufRead) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    let mut head = 0usize;
    loop {
        let mut size_line = String::new();
        read_line(reader, &mut size_line, &mut head)?;
        let hex = size_line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let mut t = String::new();
                if read_line(reader, &mut t, &mut head)? == 0 || t.trim().is_empty() {
                    return Ok(body);
                }
            }
        }
        if body.len() + size > MAX_BODY {
            return Err(bad("request body too large"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
}

fn respond(
    out: &mut impl Write,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut msg = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    msg.extend_from_slice(body);
    out.write_all(&msg)?;
    out.flush()
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> io::Result<Option<Request>> {
        read_request(&mut BufReader::new(raw))
    }

    #[test]
    fn an_event_is_echoed_with_its_request_id() {
        let raw = b"POST /event-invoke HTTP/1.1\r\nX-Scf-Request-Id: r-1\r\nContent-Length: 9\r\n\r\n{\"a\":\"b\"}";
        let req = parse(raw).unwrap().unwrap();
        let (status, _, body) = handle(&req);
        assert_eq!(status, 200);
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("\"request_id\":\"r-1\""), "{body}");
        assert!(body.contains(r#""event":"{\"a\":\"b\"}""#), "{body}");
    }

    #[test]
    fn chunked_bodies_and_keep_alive_are_understood() {
        let raw = b"POST /event-invoke HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let req = parse(raw).unwrap().unwrap();
        assert_eq!(req.body, b"abcde");
        assert!(req.keep_alive);
        let req = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!req.keep_alive);
        assert!(parse(b"").unwrap().is_none());
    }

    #[test]
    fn hostile_requests_are_errors_not_panics() {
        assert!(parse(b"GARBAGE\r\n\r\n").is_err());
        assert!(parse(b"POST / HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n").is_err());
        assert!(parse(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err());
        let long = [
            b"GET / HTTP/1.1\r\nX: ".as_slice(),
            &vec![b'a'; MAX_HEAD + 10],
        ]
        .concat();
        assert!(parse(&long).is_err());
    }

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\\n\u{1}"), "\"a\\\"b\\\\\\n\\u0001\"");
    }
}
