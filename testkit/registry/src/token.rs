//! A minimal token service for the registry's `auth: token` mode (ES256 JWTs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;

use crate::*;

pub const TOKEN_SERVICE: &str = "fnvm-test-registry";
pub const TOKEN_ISSUER: &str = "fnvm-test-issuer";

/// A minimal token service for the registry's `auth: token` mode: checks Basic
/// credentials and returns an ES256 JWT granting the requested repository scope, signed by
/// a key whose self-signed certificate is the registry's `rootcertbundle`.
pub struct TokenServer {
    pub port: u16,
    pub bundle: PathBuf,
    key_pem: String,
    cert_der: Vec<u8>,
    /// Every query string the token endpoint was asked with.
    pub requests: Arc<std::sync::Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TokenServer {
    pub(crate) fn start(dir: &Path) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["token-signer".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fnvm token signer");
        let cert = params.self_signed(&key).unwrap();
        let bundle = dir.join("token-bundle.pem");
        std::fs::write(&bundle, cert.pem()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let key_pem = key.serialize_pem();
        let cert_der = cert.der().to_vec();
        let (stop2, req2, pem2, der2) = (
            stop.clone(),
            requests.clone(),
            key_pem.clone(),
            cert_der.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        serve_token(conn, &pem2, &der2, &req2);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self {
            port,
            bundle,
            key_pem,
            cert_der,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    /// A token with push and pull on `repo` (for the test's own pusher).
    pub(crate) fn mint_push(&self, repo: &str) -> String {
        mint_token(
            &self.key_pem,
            &self.cert_der,
            &[format!("repository:{repo}:pull,push")],
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_token(
    mut conn: TcpStream,
    key_pem: &str,
    cert_der: &[u8],
    requests: &std::sync::Mutex<Vec<String>>,
) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
    let query = target
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    requests.lock().unwrap().push(query.clone());
    let expected = format!(
        "authorization: basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"))
    )
    .to_ascii_lowercase();
    let authorized = head
        .lines()
        .any(|l| l.trim().to_ascii_lowercase() == expected);
    let response = if authorized {
        let scopes: Vec<String> = query
            .split('&')
            .filter_map(|kv| kv.strip_prefix("scope="))
            .map(percent_decode)
            .collect();
        let body = serde_json::json!({
            "token": mint_token(key_pem, cert_der, &scopes),
            "expires_in": 300,
        })
        .to_string();
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
    };
    let _ = conn.write_all(response.as_bytes());
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An ES256 JWT in distribution's format: `x5c` names the signing certificate, `access`
/// lists the granted repository actions.
fn mint_token(key_pem: &str, cert_der: &[u8], scopes: &[String]) -> String {
    use rcgen::SigningKey as _;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let std_b64 = base64::engine::general_purpose::STANDARD;
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let mut parts = s.splitn(3, ':');
            let (t, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(serde_json::json!({
                "type": t, "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header =
        serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [std_b64.encode(cert_der)]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE,
        "exp": now + 300, "nbf": now - 10, "iat": now - 10,
        "jti": format!("{now}-{}", noise(4, now)[0]),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = rcgen::KeyPair::from_pem(key_pem).unwrap();
    let der_sig = key.sign(signing_input.as_bytes()).unwrap();
    format!("{signing_input}.{}", b64(&ecdsa_der_to_raw(&der_sig)))
}

/// ASN.1 `SEQUENCE { INTEGER r, INTEGER s }` → 64-byte `r || s` (what JWS ES256 uses).
fn ecdsa_der_to_raw(der: &[u8]) -> Vec<u8> {
    assert_eq!(der[0], 0x30);
    let mut i = 2;
    if der[1] & 0x80 != 0 {
        i += (der[1] & 0x7f) as usize;
    }
    let mut out = Vec::with_capacity(64);
    for _ in 0..2 {
        assert_eq!(der[i], 0x02);
        let len = der[i + 1] as usize;
        let mut int = &der[i + 2..i + 2 + len];
        while int.len() > 32 && int[0] == 0 {
            int = &int[1..];
        }
        out.extend(std::iter::repeat_n(0u8, 32 - int.len()));
        out.extend_from_slice(int);
        i += 2 + len;
    }
    out
}
