//! The clients of `fnvm serve`: `deploy`, `invoke`, `logs`, `ls`, `rm`. Plain HTTP/1.1 to the
//! API (`--server`, default http://127.0.0.1:9900), the bearer token from `--api-token` or
//! `FNVM_API_TOKEN`. Registry credentials for a deploy are resolved here (flags, environment,
//! auth file) and sent with that one request only.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use fnvm_rootfs_builder::reference::{self, ImageReference};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};

use crate::cli::run::RegistryArgs;
use crate::function;
use crate::service::api::{INSECURE_REGISTRY_HEADER, REGISTRY_AUTH_HEADER, REGISTRY_CA_HEADER};

/// How to reach `fnvm serve`.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The service's URL.
    #[arg(long, env = "FNVM_SERVER", default_value = "http://127.0.0.1:9900")]
    pub server: String,
    /// The API's bearer token.
    #[arg(long, env = "FNVM_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// The function's namespace.
    #[arg(long, default_value = "default")]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TypeArg {
    Event,
    Web,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    pub name: String,
    /// The image (REGISTRY/REPO@sha256:HEX preferred; a tag is resolved once and pinned).
    #[arg(long)]
    pub image: String,
    #[arg(long = "type", value_enum, default_value = "event")]
    pub function_type: TypeArg,
    /// Replaces the image's Entrypoint (and drops its Cmd).
    #[arg(long)]
    pub command: Option<String>,
    /// An argument (repeatable); replaces the image's Cmd.
    #[arg(long = "arg", allow_hyphen_values = true, value_name = "ARG")]
    pub args: Vec<String>,
    /// NAME=VALUE (repeatable).
    #[arg(long = "env", value_parser = function::parse_env_assignment, value_name = "NAME=VALUE")]
    pub env: Vec<(String, String)>,
    /// MiB (64..=3072).
    #[arg(long, default_value_t = 128)]
    pub memory: u32,
    /// Seconds an invocation may take.
    #[arg(long, default_value_t = 3)]
    pub timeout: u32,
    /// Instances started ahead and kept.
    #[arg(long, default_value_t = 0)]
    pub provisioned: u32,
    /// Requests one instance serves at once (web functions).
    #[arg(long, default_value_t = 1)]
    pub concurrency: u32,
    /// The most instances at once.
    #[arg(long, default_value_t = 10)]
    pub max_instances: u32,
    /// A cron schedule for timer invocations (repeatable).
    #[arg(long = "schedule", value_name = "CRON")]
    pub schedules: Vec<String>,
    /// Return once the deploy is accepted instead of waiting until it is active or failed.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub network: super::NetworkArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct InvokeArgs {
    pub name: String,
    /// The event: JSON text, or @FILE.
    #[arg(long, default_value = "{}")]
    pub data: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    pub name: String,
    /// Only the lines of this invocation.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Only the last N lines.
    #[arg(long)]
    pub tail: Option<usize>,
    /// At most N lines.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only lines since this time (RFC 3339, e.g. 2026-12-01T22:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    /// Keep printing new lines as they come.
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Show this one function in full (its whole failure reason, instances, ...).
    pub name: Option<String>,
    #[command(flatten)]
    pub server: ServerArgs,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    pub name: String,
    #[command(flatten)]
    pub server: ServerArgs,
}

/// One answer of the API.
struct Reply {
    status: StatusCode,
    request_id: Option<String>,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("the service's answer is not JSON")
    }

    /// Turns an error reply into an error naming the service's message.
    fn ok(self) -> Result<Self> {
        if self.status.is_success() {
            return Ok(self);
        }
        let detail = serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| {
                let e = &v["error"];
                Some(format!(
                    "{} ({})",
                    e["message"].as_str()?,
                    e["code"].as_str()?
                ))
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        bail!("the service answered {}: {detail}", self.status)
    }
}

/// Where a streamed answer's chunks go.
type ChunkSink<'a> = &'a mut dyn FnMut(&[u8]);

struct Client {
    base: String,
    authority: String,
    token: Option<String>,
    runtime: tokio::runtime::Runtime,
}

impl Client {
    fn new(server: &ServerArgs) -> Result<Self> {
        let uri: hyper::Uri = server
            .server
            .parse()
            .with_context(|| format!("--server {:?} is not a URL", server.server))?;
        if uri.scheme_str() != Some("http") {
            bail!(
                "--server {:?}: only http:// is supported (put TLS in front of fnvm serve, or tunnel)",
                server.server
            );
        }
        let authority = uri
            .authority()
            .with_context(|| format!("--server {:?} has no host", server.server))?
            .to_string();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        Ok(Self {
            base: format!("/v1/namespaces/{}/functions", server.namespace),
            authority,
            token: server.api_token.clone().filter(|t| !t.is_empty()),
            runtime,
        })
    }

    /// Sends one request; with `on_chunk`, hands the body over as it arrives (follow).
    fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
        on_chunk: Option<ChunkSink<'_>>,
    ) -> Result<Reply> {
        self.runtime.block_on(async {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .with_context(|| {
                    format!(
                        "cannot reach fnvm serve at http://{} (is it running? --server)",
                        self.authority
                    )
                })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .context("HTTP handshake with the service")?;
            tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header("host", &self.authority)
                .header("content-type", "application/json");
            if let Some(t) = &self.token {
                req = req.header("authorization", format!("Bearer {t}"));
            }
            for (k, v) in headers {
                req = req.header(*k, v);
            }
            let req = req.body(Full::new(body)).context("building the request")?;
            let resp = sender
                .send_request(req)
                .await
                .context("the request to the service failed")?;
            let status = resp.status();
            let request_id = resp
                .headers()
                .get("x-scf-request-id")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let mut body = resp.into_body();
            let mut all = Vec::new();
            let mut on_chunk = on_chunk.filter(|_| status.is_success());
            while let Some(frame) = body.frame().await {
                let frame = frame.context("reading the service's answer")?;
                if let Some(data) = frame.data_ref() {
                    match on_chunk.as_mut() {
                        Some(f) => f(data),
                        None => all.extend_from_slice(data),
                    }
                }
            }
            Ok(Reply {
                status,
                request_id,
                body: all.into(),
            })
        })
    }

    fn get(&self, path: &str) -> Result<Reply> {
        self.send(Method::GET, path, &[], Bytes::new(), None)
    }
}

pub fn deploy(args: DeployArgs) -> Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let mut headers: Vec<(&str, String)> = Vec::new();
    let parsed = reference::parse(&args.image)
        .with_context(|| format!("--image {:?} is not an image reference", args.image))?;
    if let ImageReference::Registry(r) = &parsed {
        let creds = fnvm_rootfs_builder::credentials::resolve(
            args.registry.registry_user.as_deref(),
            args.registry.registry_password.as_deref(),
            &r.registry,
        )?;
        if let Some(c) = creds {
            headers.push((REGISTRY_AUTH_HEADER, c.basic_header()));
        }
    } else if args.registry.registry_user.is_some() || args.registry.registry_password.is_some() {
        bail!("--registry-user/--registry-password only apply to registry images");
    }
    if !args.registry.insecure_registries.is_empty() {
        headers.push((
            INSECURE_REGISTRY_HEADER,
            args.registry.insecure_registries.join(","),
        ));
    }
    if let Some(ca) = &args.registry.registry_ca {
        let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
        headers.push((
            REGISTRY_CA_HEADER,
            base64::engine::general_purpose::STANDARD.encode(pem),
        ));
    }
    let spec = serde_json::json!({
        "image": args.image,
        "type": match args.function_type { TypeArg::Event => "event", TypeArg::Web => "web" },
        "command": args.command,
        "args": args.args,
        "env": args.env.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        "memory_mb": args.memory,
        "timeout_s": args.timeout,
        "provisioned_concurrency": args.provisioned,
        "concurrency": args.concurrency,
        "max_instances": args.max_instances,
        "schedules": args.schedules,
        "network": args.network.network.to_string(),
        "egress_deny": args.network.egress_deny,
        "egress_allow": args.network.egress_allow,
    });
    let path = format!("{}/{}", client.base, args.name);
    client
        .send(
            Method::PUT,
            &path,
            &headers,
            Bytes::from(spec.to_string()),
            None,
        )?
        .ok()?;
    drop(headers);
    eprintln!("fnvm: deploying {} ({})", args.name, args.image);
    if args.no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + Duration::from_secs(30 * 60);
    loop {
        let v = client.get(&path)?.ok()?.json()?;
        match v["state"].as_str() {
            Some("active") => {
                eprintln!(
                    "fnvm: {} is active (version {}, image {})",
                    args.name,
                    v["version"].as_str().unwrap_or("?"),
                    v["image_digest"].as_str().unwrap_or("?")
                );
                return Ok(ExitCode::SUCCESS);
            }
            Some("failed") => {
                bail!(
                    "the deploy of {} failed: {}",
                    args.name,
                    v["reason"].as_str().unwrap_or("(no reason given)")
                )
            }
            _ if Instant::now() > deadline => {
                bail!("{} is still pending after 30 minutes", args.name)
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
}

pub fn invoke(args: InvokeArgs) -> Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let data: Vec<u8> = match args.data.strip_prefix('@') {
        Some(file) => {
            std::fs::read(PathBuf::from(file)).with_context(|| format!("cannot read {file}"))?
        }
        None => args.data.into_bytes(),
    };
    let reply = client.send(
        Method::POST,
        &format!("{}/{}/invocations", client.base, args.name),
        &[],
        data.into(),
        None,
    )?;
    if let Some(id) = &reply.request_id {
        eprintln!("fnvm: request id {id}");
    }
    let reply = reply.ok()?;
    let mut out = std::io::stdout().lock();
    out.write_all(&reply.body)?;
    if !reply.body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_entry(v: &serde_json::Value) {
    if let Some(n) = v["missed_lines"].as_u64() {
        eprintln!("fnvm: {n} lines were missed (the follower fell behind)");
        return;
    }
    let when = UNIX_EPOCH + Duration::from_millis(v["time_ms"].as_u64().unwrap_or(0));
    let rid = v["request_id"].as_str().unwrap_or("-");
    let _ = writeln!(
        std::io::stdout().lock(),
        "{} {} {} {} {}",
        humantime::format_rfc3339_millis(when),
        v["stream"].as_str().unwrap_or("?"),
        v["instance"].as_str().unwrap_or("?"),
        rid,
        v["line"].as_str().unwrap_or("")
    );
}

pub fn logs(args: LogsArgs) -> Result<ExitCode> {
    let client = Client::new(&args.server)?;
    let mut query = Vec::new();
    if let Some(r) = &args.request_id {
        query.push(format!("request_id={r}"));
    }
    if let Some(t) = args.tail {
        query.push(format!("tail={t}"));
    }
    if let Some(l) = args.limit {
        query.push(format!("limit={l}"));
    }
    if let Some(s) = &args.since {
        query.push(format!("since={}", s.replace('+', "%2B")));
    }
    if args.follow {
        query.push("follow=true".into());
    }
    let path = format!("{}/{}/logs?{}", client.base, args.name, query.join("&"));
    if args.follow {
        let mut pending = Vec::new();
        let mut on_chunk = |chunk: &[u8]| {
            pending.extend_from_slice(chunk);
            while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=nl).collect();
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) {
                    print_entry(&v);
                }
            }
        };
        client
            .send(Method::GET, &path, &[], Bytes::new(), Some(&mut on_chunk))?
            .ok()?;
        return Ok(ExitCode::SUCCESS);
    }
    let v = client.get(&path)?.ok()?.json()?;
    for e in v["logs"].as_array().into_iter().flatten() {
        print_entry(e);
    }
    Ok(ExitCode::SUCCESS)
}

/// Widest failure reason `fnvm ls` shows in its table; `fnvm ls NAME` shows all of it.
const LS_REASON_CHARS: usize = 60;

pub fn ls(args: LsArgs) -> Result<ExitCode> {
    let client = Client::new(&args.server)?;
    if let Some(name) = &args.name {
        let f = client
            .get(&format!("{}/{name}", client.base))?
            .ok()?
            .json()?;
        print!("{}", describe_function(&f));
        return Ok(ExitCode::SUCCESS);
    }
    let v = client.get(&client.base)?.ok()?.json()?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<24} {:<8} {:<6} {:<17} {:<40} REASON",
        "NAME", "STATE", "TYPE", "VERSION", "IMAGE"
    )?;
    for f in v["functions"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or("?");
        let reason = f["reason"]
            .as_str()
            .map(|r| format!("{} (fnvm ls {name})", one_line(r, LS_REASON_CHARS)))
            .unwrap_or_default();
        let line = format!(
            "{:<24} {:<8} {:<6} {:<17} {:<40} {reason}",
            name,
            f["state"].as_str().unwrap_or("?"),
            f["spec"]["type"].as_str().unwrap_or("?"),
            f["version"].as_str().unwrap_or("-"),
            f["spec"]["image"].as_str().unwrap_or("?"),
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` on one line of at most `max` characters (an ellipsis marks a cut).
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    format!("{}…", cut.trim_end())
}

/// One function in full, `key: value` per line; the failure reason whole, indented.
fn describe_function(f: &serde_json::Value) -> String {
    let field = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = String::new();
    for (label, v) in [
        ("name", &f["name"]),
        ("namespace", &f["namespace"]),
        ("state", &f["state"]),
        ("type", &f["spec"]["type"]),
        ("image", &f["spec"]["image"]),
        ("image digest", &f["image_digest"]),
        ("version", &f["version"]),
        ("memory_mb", &f["spec"]["memory_mb"]),
        ("timeout_s", &f["spec"]["timeout_s"]),
        ("max_instances", &f["spec"]["max_instances"]),
        ("provisioned", &f["spec"]["provisioned_concurrency"]),
        ("created", &f["created_at"]),
        ("updated", &f["updated_at"]),
    ] {
        out.push_str(&format!("{label:<14} {}\n", field(v)));
    }
    if let Some(instances) = f["instances"].as_array() {
        out.push_str(&format!("{:<14} {}\n", "instances", instances.len()));
    }
    if let Some(r) = f["reason"].as_str() {
        out.push_str("reason:\n");
        for line in r.lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
    out
}

pub fn rm(args: RmArgs) -> Result<ExitCode> {
    let client = Client::new(&args.server)?;
    client
        .send(
            Method::DELETE,
            &format!("{}/{}", client.base, args.name),
            &[],
            Bytes::new(),
            None,
        )?
        .ok()?;
    eprintln!("fnvm: removed {}", args.name);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_reason_is_one_short_line_in_the_table_and_whole_in_the_detail() {
        let reason = format!(
            "cannot pull x: {}\nsecond line",
            "very long words ".repeat(20)
        );
        let short = one_line(&reason, LS_REASON_CHARS);
        assert_eq!(short.chars().count(), LS_REASON_CHARS);
        assert!(short.ends_with('…') && !short.contains('\n'), "{short}");
        assert_eq!(one_line("short\nreason", 60), "short reason");
        let f = serde_json::json!({"name": "f", "state": "failed", "reason": reason, "spec": {}});
        let detail = describe_function(&f);
        assert!(detail.contains("  second line\n"), "{detail}");
        assert!(detail.contains(&"very long words ".repeat(20).trim_end().to_string()));
    }
}
