//! What the python test server ([`PYTHON_SERVER`](crate::PYTHON_SERVER)) answers to any path it
//! has no route for: the request as it reached the function (method, path, headers, body as
//! base64), read back here the one way every test reads it.

use std::collections::HashMap;

use base64::Engine as _;

/// The python server's view of a request.
#[derive(Debug)]
pub struct Echo {
    pub method: String,
    /// The path with its query, as the function got it.
    pub path: String,
    /// Every header in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Echo {
    /// Reads the server's JSON reply (panics, naming it, when it is not an echo).
    pub fn parse(v: &serde_json::Value) -> Echo {
        Echo {
            method: v["method"].as_str().expect("an echo has a method").into(),
            path: v["path"].as_str().expect("an echo has a path").into(),
            headers: echoed_headers(v),
            body: base64::engine::general_purpose::STANDARD
                .decode(v["body_b64"].as_str().expect("an echo has a body"))
                .expect("the echoed body is base64"),
        }
    }

    /// The first header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The headers by name (lower-case; the last of repeated ones).
    pub fn header_map(&self) -> HashMap<String, String> {
        self.headers.iter().cloned().collect()
    }
}

/// The headers of an echo, in order, names lower-cased.
pub fn echoed_headers(v: &serde_json::Value) -> Vec<(String, String)> {
    v["headers"]
        .as_array()
        .expect("an echo has headers")
        .iter()
        .map(|h| {
            (
                h[0].as_str().unwrap().to_ascii_lowercase(),
                h[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}
