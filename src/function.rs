//! A function's settings and what they become for the guest: the agent's [`StartSpec`] (image
//! config merged with the function's command, args and env, plus the platform's built-in
//! variables) and the `X-Scf-*` headers every invocation carries.
//!
//! The rules are the cloud function contract (docs/design "What the function sees"):
//! - the function's `command` replaces the image's Entrypoint and drops its Cmd; `args` replace
//!   Cmd (so args alone run the Entrypoint with new arguments);
//! - WorkingDir and User come from the image;
//! - the environment is the image's Env, then the built-in variables, then the function's env,
//!   the last definition of a name winning.

use fnvm_agent::protocol::{StartSpec, READY_TIMEOUT_MS};
use fnvm_rootfs_builder::manifest::RunConfig;

use crate::network::NetworkPolicy;

/// Everything about a function that is not its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionSettings {
    pub name: String,
    pub namespace: String,
    /// `$LATEST` unless a published version is run.
    pub version: String,
    pub region: String,
    pub appid: String,
    pub uin: String,
    /// 64..=3072.
    pub memory_mib: u32,
    /// Seconds an invocation may take until the function answers.
    pub timeout_s: u32,
    pub command: Option<String>,
    pub args: Vec<String>,
    /// `(NAME, VALUE)` in the order given; later ones win.
    pub env: Vec<(String, String)>,
    /// Temporary credentials handed to the function per invocation (empty when none).
    pub session_token: String,
    pub secret_id: String,
    pub secret_key: String,
    /// Loopback only, or egress with what it may not reach.
    pub network: NetworkPolicy,
}

impl FunctionSettings {
    /// Settings with the local emulator's defaults for everything but the name.
    pub fn local(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: "default".into(),
            version: "$LATEST".into(),
            region: DEFAULT_REGION.into(),
            appid: DEFAULT_APPID.into(),
            uin: DEFAULT_UIN.into(),
            memory_mib: 128,
            timeout_s: 3,
            command: None,
            args: Vec::new(),
            env: Vec::new(),
            session_token: String::new(),
            secret_id: String::new(),
            secret_key: String::new(),
            network: NetworkPolicy::default(),
        }
    }
}

/// Where a locally run function pretends to be (the emulator has no real account).
pub const DEFAULT_REGION: &str = "ap-guangzhou";
pub const DEFAULT_APPID: &str = "1250000000";
pub const DEFAULT_UIN: &str = "100000000001";

/// Why a function cannot be started as configured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FunctionError {
    /// Neither the image nor the function says what to run.
    #[error("nothing to run: the image has no Entrypoint or Cmd and no --command was given")]
    NoCommand,
    /// The name cannot be a function's name (it ends up in headers and the environment).
    #[error("function name {0:?}: use 1-60 letters, digits, '-' or '_', starting with a letter")]
    BadName(String),
    /// A setting that travels in an `X-Scf-*` header is not a valid header value.
    #[error("{what} {value:?} cannot be sent as an HTTP header value")]
    BadHeaderValue { what: &'static str, value: String },
}

/// Why a `NAME=VALUE` assignment is refused (`--env`, a spec's `env`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    /// There is no `=` between a name and a value.
    #[error("{0:?} is not NAME=VALUE")]
    NotAnAssignment(String),
    /// The name is not a portable environment variable name.
    #[error(
        "{0:?} is not a valid environment variable name (letters, digits and '_', not \
         starting with a digit)"
    )]
    BadName(String),
    /// The value holds a NUL byte, which no environment can carry.
    #[error("the value of {0} contains a NUL byte")]
    NulInValue(String),
}

/// Parses `NAME=VALUE` (for `--env`). The name must be a portable environment variable name.
pub fn parse_env_assignment(s: &str) -> Result<(String, String), EnvError> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| EnvError::NotAnAssignment(s.to_string()))?;
    let valid = !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if !valid {
        return Err(EnvError::BadName(name.to_string()));
    }
    if value.contains('\0') {
        return Err(EnvError::NulInValue(name.to_string()));
    }
    Ok((name.to_string(), value.to_string()))
}

/// Checks the settings that end up in headers and the environment.
pub fn validate(settings: &FunctionSettings) -> Result<(), FunctionError> {
    let name = &settings.name;
    let name_ok = (1..=60).contains(&name.len())
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(FunctionError::BadName(name.clone()));
    }
    for (what, value) in [
        ("namespace", &settings.namespace),
        ("version", &settings.version),
        ("region", &settings.region),
        ("appid", &settings.appid),
        ("uin", &settings.uin),
        ("session token", &settings.session_token),
        ("secret id", &settings.secret_id),
        ("secret key", &settings.secret_key),
    ] {
        if hyper::header::HeaderValue::from_str(value).is_err() {
            return Err(FunctionError::BadHeaderValue {
                what,
                value: value.clone(),
            });
        }
    }
    Ok(())
}

/// The platform's variables, in the contract's order.
pub fn builtin_env(settings: &FunctionSettings) -> Vec<(String, String)> {
    [
        ("TENCENTCLOUD_RUNENV", "SCF"),
        ("USER_CODE_ROOT", "/var/user/"),
        ("USER", "qcloud"),
        ("SCF_FUNCTIONNAME", settings.name.as_str()),
        ("SCF_FUNCTIONVERSION", settings.version.as_str()),
        ("TENCENTCLOUD_REGION", settings.region.as_str()),
        ("TENCENTCLOUD_APPID", settings.appid.as_str()),
        ("TENCENTCLOUD_UIN", settings.uin.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// What the agent starts: the image config merged with the function's settings.
pub fn start_spec(
    config: &RunConfig,
    settings: &FunctionSettings,
) -> Result<StartSpec, FunctionError> {
    validate(settings)?;
    let argv: Vec<String> = match (&settings.command, settings.args.is_empty()) {
        (Some(command), _) => std::iter::once(command.clone())
            .chain(settings.args.iter().cloned())
            .collect(),
        (None, false) => config
            .entrypoint
            .iter()
            .chain(settings.args.iter())
            .cloned()
            .collect(),
        (None, true) => config
            .entrypoint
            .iter()
            .chain(config.cmd.iter())
            .cloned()
            .collect(),
    };
    if argv.is_empty() {
        return Err(FunctionError::NoCommand);
    }
    let image_env = config.env.iter().filter_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv.as_str(), ""));
        (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
    });
    let env = merge_env(
        image_env
            .chain(builtin_env(settings))
            .chain(settings.env.iter().cloned()),
    );
    let working_dir = config
        .working_dir
        .clone()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/".to_string());
    Ok(StartSpec {
        argv,
        env,
        working_dir,
        user: config.user.clone().filter(|u| !u.is_empty()),
        ready_timeout_ms: READY_TIMEOUT_MS,
        resolv_conf: settings
            .network
            .has_egress()
            .then(crate::network::resolv_conf),
    })
}

/// `NAME=VALUE` strings in first-definition order, each name once with its last value.
fn merge_env(vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in vars {
        match out.iter_mut().find(|(name, _)| *name == k) {
            Some(slot) => slot.1 = v,
            None => out.push((k, v)),
        }
    }
    out.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The `X-Scf-*` headers of one invocation, in the contract's order.
pub fn scf_headers(settings: &FunctionSettings, request_id: &str) -> Vec<(&'static str, String)> {
    vec![
        ("x-scf-request-id", request_id.to_string()),
        ("x-scf-memory", settings.memory_mib.to_string()),
        ("x-scf-timeout", settings.timeout_s.to_string()),
        ("x-scf-version", settings.version.clone()),
        ("x-scf-name", settings.name.clone()),
        ("x-scf-namespace", settings.namespace.clone()),
        ("x-scf-region", settings.region.clone()),
        ("x-scf-appid", settings.appid.clone()),
        ("x-scf-uin", settings.uin.clone()),
        ("x-scf-session-token", settings.session_token.clone()),
        ("x-scf-secret-id", settings.secret_id.clone()),
        ("x-scf-secret-key", settings.secret_key.clone()),
    ]
}

/// Puts one invocation's `X-Scf-*` headers on a request to the function, after removing every
/// `X-Scf-*` header the caller sent: a web caller cannot pose as the platform (a forged request
/// id, trigger or credentials). A value that is not a valid header value is left out.
pub fn set_scf_headers(
    headers: &mut hyper::HeaderMap,
    settings: &FunctionSettings,
    request_id: &str,
) {
    let callers: Vec<hyper::header::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("x-scf-"))
        .cloned()
        .collect();
    for name in callers {
        headers.remove(name);
    }
    for (name, value) in scf_headers(settings, request_id) {
        if let Ok(v) = hyper::header::HeaderValue::from_str(&value) {
            headers.insert(hyper::header::HeaderName::from_static(name), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(entrypoint: &[&str], cmd: &[&str]) -> RunConfig {
        RunConfig {
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            env: vec![
                "PATH=/usr/bin:/bin".into(),
                "USER=root".into(),
                "A=image".into(),
            ],
            working_dir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            ..RunConfig::default()
        }
    }

    #[test]
    fn command_replaces_entrypoint_and_cmd_args_replace_cmd() {
        let cfg = image(&["/bin/server"], &["--port", "9000"]);
        let mut f = FunctionSettings::local("f");
        assert_eq!(
            start_spec(&cfg, &f).unwrap().argv,
            ["/bin/server", "--port", "9000"]
        );
        f.args = vec!["--debug".into()];
        assert_eq!(
            start_spec(&cfg, &f).unwrap().argv,
            ["/bin/server", "--debug"]
        );
        f.command = Some("/bin/sh".into());
        f.args = vec![];
        assert_eq!(start_spec(&cfg, &f).unwrap().argv, ["/bin/sh"]);
        f.args = vec!["-c".into(), "echo hi".into()];
        assert_eq!(
            start_spec(&cfg, &f).unwrap().argv,
            ["/bin/sh", "-c", "echo hi"]
        );
        let empty = RunConfig::default();
        let f = FunctionSettings::local("f");
        assert_eq!(
            start_spec(&empty, &f).unwrap_err(),
            FunctionError::NoCommand
        );
    }

    #[test]
    fn env_is_image_then_builtins_then_function_last_wins() {
        let cfg = image(&["/bin/server"], &[]);
        let mut f = FunctionSettings::local("hello");
        f.env = vec![("A".into(), "fn".into()), ("B".into(), "1".into())];
        let spec = start_spec(&cfg, &f).unwrap();
        assert_eq!(
            spec.env,
            [
                "PATH=/usr/bin:/bin",
                "USER=qcloud",
                "A=fn",
                "TENCENTCLOUD_RUNENV=SCF",
                "USER_CODE_ROOT=/var/user/",
                "SCF_FUNCTIONNAME=hello",
                "SCF_FUNCTIONVERSION=$LATEST",
                "TENCENTCLOUD_REGION=ap-guangzhou",
                "TENCENTCLOUD_APPID=1250000000",
                "TENCENTCLOUD_UIN=100000000001",
                "B=1",
            ]
        );
        assert_eq!(spec.working_dir, "/srv");
        assert_eq!(spec.user.as_deref(), Some("1000:1000"));
        assert_eq!(spec.ready_timeout_ms, READY_TIMEOUT_MS);
        let bare = RunConfig {
            cmd: vec!["x".into()],
            ..RunConfig::default()
        };
        let spec = start_spec(&bare, &f).unwrap();
        assert_eq!(spec.working_dir, "/");
        assert_eq!(spec.user, None);
    }

    #[test]
    fn env_assignments_and_names_are_checked() {
        assert_eq!(
            parse_env_assignment("A_1=x=y").unwrap(),
            ("A_1".to_string(), "x=y".to_string())
        );
        assert_eq!(parse_env_assignment("E=").unwrap().1, "");
        assert!(parse_env_assignment("noequals").is_err());
        assert!(parse_env_assignment("1A=x").is_err());
        assert!(parse_env_assignment("A-B=x").is_err());
        assert!(parse_env_assignment("=x").is_err());
        let cfg = image(&["/x"], &[]);
        for bad in ["", "1abc", "a b", "ab/c", &"a".repeat(61)] {
            let f = FunctionSettings::local(bad);
            assert!(
                matches!(start_spec(&cfg, &f), Err(FunctionError::BadName(_))),
                "{bad:?}"
            );
        }
        let mut f = FunctionSettings::local("ok");
        f.secret_key = "line\nbreak".into();
        assert!(matches!(
            start_spec(&cfg, &f),
            Err(FunctionError::BadHeaderValue {
                what: "secret key",
                ..
            })
        ));
    }

    #[test]
    fn every_invocation_header_of_the_contract_is_present() {
        let mut f = FunctionSettings::local("hello");
        f.memory_mib = 256;
        f.timeout_s = 7;
        let headers = scf_headers(&f, "rid-1");
        let names: Vec<&str> = headers.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "x-scf-request-id",
                "x-scf-memory",
                "x-scf-timeout",
                "x-scf-version",
                "x-scf-name",
                "x-scf-namespace",
                "x-scf-region",
                "x-scf-appid",
                "x-scf-uin",
                "x-scf-session-token",
                "x-scf-secret-id",
                "x-scf-secret-key",
            ]
        );
        let get = |k: &str| headers.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(get("x-scf-request-id"), "rid-1");
        assert_eq!(get("x-scf-memory"), "256");
        assert_eq!(get("x-scf-timeout"), "7");
        assert_eq!(get("x-scf-version"), "$LATEST");
        assert_eq!(get("x-scf-namespace"), "default");
    }
}
