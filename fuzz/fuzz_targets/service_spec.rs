//! The service's deploy request body (`PUT /v1/namespaces/NS/functions/NAME`), as
//! `service::api`'s `put` reads it: JSON, the raw numbers checked before typing
//! (`spec_check::check_raw_numbers`), typed into a `FunctionSpec`, then the whole spec
//! checked (`spec_check::check_spec`: the key, the image reference, ranges, env, cron
//! schedules, the network policy, the function settings). The client is hostile.
//!
//! Invariant: an accepted spec serialises to a body that is accepted again as the same spec,
//! with the same version id.
//!
//! Input: `NAMESPACE/NAME` up to the first newline (the route's key), then the body.
#![no_main]

use fnvm::service::deploy::settings_of;
use fnvm::service::model::{version_id, FunctionKey, FunctionSpec};
use fnvm::service::spec_check::{check_raw_numbers, check_spec};
use libfuzzer_sys::fuzz_target;

/// What `put` accepts, step by step as it does.
fn accept(key: &FunctionKey, body: &[u8]) -> Option<FunctionSpec> {
    let raw: serde_json::Value = serde_json::from_slice(body).ok()?;
    check_raw_numbers(&raw).ok()?;
    let spec: FunctionSpec = serde_json::from_value(raw).ok()?;
    check_spec(key, &spec).ok()?;
    Some(spec)
}

fuzz_target!(|data: &[u8]| {
    let (route, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"default/fn"[..], data),
    };
    let route = String::from_utf8_lossy(route);
    let (namespace, name) = route.split_once('/').unwrap_or(("default", &route));
    let key = FunctionKey::new(namespace, name);
    let Some(spec) = accept(&key, body) else {
        return;
    };
    let _ = settings_of(&key, &spec);
    let digest = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let id = version_id(digest, &spec);
    let again = serde_json::to_vec(&spec).expect("a spec serialises");
    let back = accept(&key, &again).unwrap_or_else(|| {
        panic!(
            "the accepted spec's own serialisation is refused: {}",
            String::from_utf8_lossy(&again)
        )
    });
    assert_eq!(back, spec);
    assert_eq!(version_id(digest, &back), id);
});
