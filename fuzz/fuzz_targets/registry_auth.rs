//! What a registry or the user's files say about authentication, all hostile to the puller:
//! the docker-style auth file (`credentials::from_auth_file`, base64 `auth` entries), the
//! registry's `WWW-Authenticate` challenges (`registry::auth::parse_www_authenticate`) and
//! its token endpoint's JSON reply (`TokenResponse::into_token`).
//!
//! Input: 1 control byte (which parser; for the auth file, which registry is looked up),
//! then the bytes.
#![no_main]

use std::path::Path;
use std::time::Instant;

use fnvm_rootfs_builder::credentials;
use fnvm_rootfs_builder::registry::auth::{parse_www_authenticate, Challenge, TokenResponse};
use libfuzzer_sys::fuzz_target;

const REGISTRIES: &[&str] = &[
    "docker.io",
    "registry.example.com:5000",
    "localhost",
    "ghcr.io",
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let registry = REGISTRIES[usize::from(which / 3) % REGISTRIES.len()];
            if let Ok(Some(c)) =
                credentials::from_auth_file(Path::new("/fuzz/config.json"), bytes, registry)
            {
                let _ = c.basic_header();
            }
        }
        1 => {
            let Ok(header) = std::str::from_utf8(bytes) else {
                return;
            };
            if let Ok(challenges) = parse_www_authenticate(header) {
                for c in challenges {
                    // A Bearer challenge must say where its token comes from.
                    if let Challenge::Bearer { realm, .. } = c {
                        assert!(!realm.is_empty(), "an empty realm accepted: {header:?}");
                    }
                }
            }
        }
        _ => {
            if let Ok(reply) = serde_json::from_slice::<TokenResponse>(bytes) {
                let now = Instant::now();
                if let Some(token) = reply.into_token(now) {
                    assert!(!token.token.is_empty());
                    assert!(token.expires_at > now);
                }
            }
        }
    }
});
