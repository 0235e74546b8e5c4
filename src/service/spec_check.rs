//! Checks a function spec before anything is pulled (design "Limits"): every count and size a
//! client sends has an upper bound, and a refusal names the field and its limit, so a spec of
//! 4,000,000,000 instances or a megabyte of environment is a 400, not a resource the service
//! tries to honour.

use std::ops::RangeInclusive;

use fnvm_rootfs_builder::reference;

use super::deploy::settings_of;
use super::model::{FunctionKey, FunctionSpec, FunctionType};
use super::store::check_key;
use crate::function;

/// Memory per function, MiB.
pub const MEMORY_MB: RangeInclusive<u64> = 64..=3072;
/// Seconds an invocation may take.
pub const TIMEOUT_S: RangeInclusive<u64> = 1..=900;
/// Instances one function may have at once.
pub const MAX_INSTANCES: RangeInclusive<u64> = 1..=1000;
/// Instances kept started (at most `max_instances`).
pub const PROVISIONED_CONCURRENCY: RangeInclusive<u64> = 0..=1000;
/// Requests one web instance serves at once.
pub const CONCURRENCY: RangeInclusive<u64> = 1..=1000;
/// Longest image reference, bytes.
pub const MAX_IMAGE_BYTES: usize = 1024;
/// Longest command, bytes.
pub const MAX_COMMAND_BYTES: usize = 4096;
/// Most arguments, and their total size in bytes.
pub const MAX_ARGS: usize = 256;
pub const MAX_ARGS_BYTES: usize = 64 << 10;
/// Most environment variables, and their total size (names and values) in bytes.
pub const MAX_ENV_VARS: usize = 256;
pub const MAX_ENV_BYTES: usize = 64 << 10;
/// Most schedules, and the longest cron expression in bytes.
pub const MAX_SCHEDULES: usize = 16;
pub const MAX_SCHEDULE_BYTES: usize = 256;

/// The numeric fields of a spec and their ranges (checked on the raw JSON as well, where a
/// number too large for the field's type would otherwise be refused without naming it).
const NUMBERS: [(&str, RangeInclusive<u64>); 5] = [
    ("memory_mb", MEMORY_MB),
    ("timeout_s", TIMEOUT_S),
    ("max_instances", MAX_INSTANCES),
    ("provisioned_concurrency", PROVISIONED_CONCURRENCY),
    ("concurrency", CONCURRENCY),
];

/// Why a spec is refused: the field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct SpecError {
    pub field: &'static str,
    pub problem: String,
}

fn refuse(field: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError {
        field,
        problem: problem.into(),
    }
}

fn in_range(field: &'static str, value: u64, range: &RangeInclusive<u64>) -> Result<(), SpecError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(refuse(
            field,
            format!(
                "{value} is out of range (allowed {}..={})",
                range.start(),
                range.end()
            ),
        ))
    }
}

fn at_most(field: &'static str, what: &str, value: usize, limit: usize) -> Result<(), SpecError> {
    if value <= limit {
        Ok(())
    } else {
        Err(refuse(
            field,
            format!("{value} {what} is more than the limit of {limit}"),
        ))
    }
}

/// Checks the numeric fields of a spec as the client sent them, before they are typed: any
/// value that is not an integer in its field's range is refused naming the field.
pub fn check_raw_numbers(raw: &serde_json::Value) -> Result<(), SpecError> {
    for (field, range) in &NUMBERS {
        let Some(v) = raw.get(field) else { continue };
        match v.as_u64() {
            Some(n) => in_range(field, n, range)?,
            None => {
                return Err(refuse(
                    field,
                    format!(
                        "{v} is not an integer in {}..={}",
                        range.start(),
                        range.end()
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// Checks a spec before anything is pulled; the error names the bad field and its limit.
pub fn check_spec(key: &FunctionKey, spec: &FunctionSpec) -> Result<(), SpecError> {
    check_key(key).map_err(|e| refuse("name", e.to_string()))?;
    at_most("image", "bytes", spec.image.len(), MAX_IMAGE_BYTES)?;
    reference::parse(&spec.image).map_err(|e| {
        refuse(
            "image",
            format!("{:?} is not an image reference: {e}", spec.image),
        )
    })?;
    in_range("memory_mb", spec.memory_mb.into(), &MEMORY_MB)?;
    in_range("timeout_s", spec.timeout_s.into(), &TIMEOUT_S)?;
    in_range("max_instances", spec.max_instances.into(), &MAX_INSTANCES)?;
    in_range(
        "provisioned_concurrency",
        spec.provisioned_concurrency.into(),
        &PROVISIONED_CONCURRENCY,
    )?;
    if spec.provisioned_concurrency > spec.max_instances {
        return Err(refuse(
            "provisioned_concurrency",
            format!(
                "{} is more than max_instances ({})",
                spec.provisioned_concurrency, spec.max_instances
            ),
        ));
    }
    in_range("concurrency", spec.concurrency.into(), &CONCURRENCY)?;
    if spec.r#type == FunctionType::Event && spec.concurrency != 1 {
        return Err(refuse(
            "concurrency",
            "event functions take one request per instance (1)",
        ));
    }
    if let Some(c) = &spec.command {
        at_most("command", "bytes", c.len(), MAX_COMMAND_BYTES)?;
        if c.is_empty() || c.contains('\0') {
            return Err(refuse(
                "command",
                "must be a non-empty string without NUL bytes",
            ));
        }
    }
    at_most("args", "arguments", spec.args.len(), MAX_ARGS)?;
    let args_bytes: usize = spec.args.iter().map(String::len).sum();
    at_most("args", "bytes", args_bytes, MAX_ARGS_BYTES)?;
    if spec.args.iter().any(|a| a.contains('\0')) {
        return Err(refuse("args", "an argument contains a NUL byte"));
    }
    at_most("env", "variables", spec.env.len(), MAX_ENV_VARS)?;
    let env_bytes: usize = spec.env.iter().map(|(k, v)| k.len() + v.len()).sum();
    at_most("env", "bytes", env_bytes, MAX_ENV_BYTES)?;
    for (k, v) in &spec.env {
        function::parse_env_assignment(&format!("{k}={v}"))
            .map_err(|e| refuse("env", e.to_string()))?;
    }
    at_most(
        "schedules",
        "schedules",
        spec.schedules.len(),
        MAX_SCHEDULES,
    )?;
    if let Some(long) = spec.schedules.iter().find(|s| s.len() > MAX_SCHEDULE_BYTES) {
        return Err(refuse(
            "schedules",
            format!(
                "a schedule of {} bytes is longer than the limit of {MAX_SCHEDULE_BYTES}",
                long.len()
            ),
        ));
    }
    spec.network_policy()
        .map_err(|e| refuse("network", e.to_string()))?;
    super::timers::validate_schedules(&spec.schedules)
        .map_err(|e| refuse("schedules", e.to_string()))?;
    function::validate(&settings_of(key, spec)).map_err(|e| refuse("settings", e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> FunctionSpec {
        serde_json::from_str(json).unwrap()
    }

    const IMAGE: &str = r#""image":"127.0.0.1:5000/x:1""#;

    fn check(extra: &str) -> Result<(), SpecError> {
        let json = format!("{{{IMAGE}{extra}}}");
        let raw: serde_json::Value = serde_json::from_str(&json).unwrap();
        check_raw_numbers(&raw)?;
        check_spec(&FunctionKey::new("default", "f"), &spec(&json))
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert_eq!(check(""), Ok(()));
        assert!(check(r#","memory_mb":32"#)
            .unwrap_err()
            .to_string()
            .starts_with("memory_mb: 32 is out of range"));
        let e = check_spec(
            &FunctionKey::new("default", "f"),
            &spec(r#"{"image":"UPPER CASE"}"#),
        );
        assert_eq!(e.unwrap_err().field, "image");
        assert_eq!(check(r#","env":{"1BAD":"x"}"#).unwrap_err().field, "env");
        let e = check_spec(
            &FunctionKey::new("default", "../etc"),
            &spec(&format!("{{{IMAGE}}}")),
        );
        assert!(e.unwrap_err().to_string().contains("function name"));
    }

    #[test]
    fn every_count_and_size_has_a_limit_that_the_refusal_names() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                r#","max_instances":4000000000"#.into(),
                "max_instances",
                "1..=1000",
            ),
            (
                r#","max_instances":1000,"provisioned_concurrency":4000000000"#.into(),
                "provisioned_concurrency",
                "0..=1000",
            ),
            (
                r#","max_instances":99999999999"#.into(),
                "max_instances",
                "1..=1000",
            ),
            (r#","memory_mb":-1"#.into(), "memory_mb", "64..=3072"),
            (r#","timeout_s":1.5"#.into(), "timeout_s", "1..=900"),
            (
                r#","type":"web","concurrency":5000"#.into(),
                "concurrency",
                "1..=1000",
            ),
            (
                r#","max_instances":2,"provisioned_concurrency":3"#.into(),
                "provisioned_concurrency",
                "max_instances (2)",
            ),
            (
                format!(r#","args":[{}]"#, vec!["\"a\""; 257].join(",")),
                "args",
                "limit of 256",
            ),
            (
                format!(r#","args":["{}"]"#, "a".repeat(70_000)),
                "args",
                "limit of 65536",
            ),
            (
                format!(
                    r#","env":{{{}}}"#,
                    (0..257)
                        .map(|i| format!("\"V{i}\":\"x\""))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                "env",
                "limit of 256",
            ),
            (
                format!(r#","env":{{"BIG":"{}"}}"#, "x".repeat(70_000)),
                "env",
                "limit of 65536",
            ),
            (
                format!(
                    r#","schedules":[{}]"#,
                    vec!["\"* * * * * *\""; 17].join(",")
                ),
                "schedules",
                "limit of 16",
            ),
            (
                format!(r#","command":"{}""#, "c".repeat(5000)),
                "command",
                "limit of 4096",
            ),
        ];
        for (extra, field, limit) in cases {
            let e = check(&extra).expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(e.to_string().contains(limit), "{e} should name {limit}");
        }
        let long_image = format!(r#"{{"image":"127.0.0.1:5000/{}:1"}}"#, "a".repeat(2000));
        let e = check_spec(&FunctionKey::new("default", "f"), &spec(&long_image)).unwrap_err();
        assert!(e.to_string().contains("limit of 1024"), "{e}");
    }
}
