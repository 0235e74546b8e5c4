//! `fnvm serve`'s API side end to end: the real binary, a real docker-registry with htpasswd
//! auth on loopback, images built here, real HTTP clients and the `fnvm` CLI clients.
//!
//! The deploy-to-restart test runs in each sandbox the level runs (the vm sandbox at the nested
//! level, scripts/test.sh); the rest use the process sandbox: the API and pool paths they test are
//! the same in both. Needs root.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use base64::Engine as _;
use fnvm_testkit::registry::{Registry, PASSWORD, USER};
use fnvm_testkit::Serve;
use fnvm_testkit::{http, python_image, sandboxes, serial, Echo};

use fnvm_testkit::Here;

const HERE: Here = fnvm_testkit::here!();

/// Runs a CLI client of `serve`.
fn cli(serve: &Serve, args: &[&str]) -> Output {
    std::process::Command::new(HERE.fnvm)
        .args(args)
        .args(["--server", &serve.url("")])
        .env_remove("FNVM_API_TOKEN")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn get_json(url: &str) -> (u16, serde_json::Value) {
    let mut r = http().get(url).call().unwrap();
    let status = r.status().as_u16();
    let body = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}")),
    )
}

/// Waits until the function leaves `pending`; returns its JSON.
fn wait_settled(serve: &Serve, name: &str, token: Option<&str>) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut req = http().get(serve.url(&format!("/v1/namespaces/default/functions/{name}")));
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut r = req.call().unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap();
        if v["state"] != "pending" {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} still pending: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn logs_of(serve: &Serve, name: &str, request_id: &str) -> Vec<serde_json::Value> {
    let (status, v) = get_json(&serve.url(&format!(
        "/v1/namespaces/default/functions/{name}/logs?request_id={request_id}"
    )));
    assert_eq!(status, 200, "{v}");
    v["logs"].as_array().unwrap().clone()
}

#[test]
fn deploy_by_digest_with_credentials_invoke_web_logs_and_restart() {
    for sandbox in sandboxes("serve: deploy, invoke, logs, restart") {
        deploy_invoke_and_restart_in(sandbox);
    }
}

fn deploy_invoke_and_restart_in(sandbox: &str) {
    let _serial = serial();
    let registry = Registry::start_with_auth();
    let digest = registry.push_layout("fn/python", &python_image(&HERE.layouts()));
    let image = format!("{}/fn/python@{digest}", registry.host());
    let home = HERE.fresh_home(&format!("service-api-home-{sandbox}"));
    let mut serve = Serve::start_in(sandbox, HERE.fnvm(), &home, HERE.agent(), &[]);

    // Deploy by digest with credentials, through the CLI (it waits until active).
    let out = cli(
        &serve,
        &[
            "deploy",
            "echo",
            "--image",
            &image,
            "--registry-user",
            USER,
            "--registry-password",
            PASSWORD,
            "--insecure-registry",
            &registry.host(),
            "--env",
            "GREETING=hi",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("echo is active"), "{}", text(&out));
    let out = cli(
        &serve,
        &[
            "deploy",
            "web",
            "--type",
            "web",
            "--image",
            &image,
            "--registry-user",
            USER,
            "--registry-password",
            PASSWORD,
            "--insecure-registry",
            &registry.host(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    // The function as the API shows it: active, pinned, and nothing of the credentials.
    let (status, f) = get_json(&serve.url("/v1/namespaces/default/functions/echo"));
    assert_eq!(status, 200);
    assert_eq!(f["state"], "active", "{f}");
    assert_eq!(f["image_digest"], digest.to_string());
    assert_eq!(f["spec"]["env"]["GREETING"], "hi");

    // An event invocation echoes the body and carries the X-Scf-* headers.
    let mut r = http()
        .post(serve.url("/v1/namespaces/default/functions/echo/invocations"))
        .send(&br#"{"key":"value"}"#[..])
        .unwrap();
    if r.status().as_u16() != 200 {
        panic!(
            "{sandbox}: the first event invocation answered {}: {}\nserve's stderr:\n{}",
            r.status(),
            r.body_mut().read_to_string().unwrap_or_default(),
            serve.stderr()
        );
    }
    let request_id = r.headers()["x-scf-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        uuid::Uuid::parse_str(&request_id)
            .unwrap()
            .get_version_num(),
        4
    );
    let e = Echo::parse(&serde_json::from_str(&r.body_mut().read_to_string().unwrap()).unwrap());
    assert_eq!(
        (e.method.as_str(), e.path.as_str()),
        ("POST", "/event-invoke")
    );
    assert_eq!(e.body, br#"{"key":"value"}"#);
    assert_eq!(e.header("x-scf-request-id"), Some(request_id.as_str()));
    assert_eq!(e.header("x-scf-name"), Some("echo"));
    assert_eq!(e.header("x-scf-namespace"), Some("default"));
    assert_eq!(e.header("x-scf-memory"), Some("128"));

    // Web passthrough: method, path, query and body.
    let mut r = http()
        .put(serve.url("/v1/namespaces/default/functions/web/web/some/path?x=1&y=two"))
        .header("X-Custom", "kept")
        .send(&b"the body"[..])
        .unwrap();
    let body = r.body_mut().read_to_string().unwrap();
    assert_eq!(
        r.status().as_u16(),
        200,
        "{sandbox}: {body}\nserve's stderr:\n{}",
        serve.stderr()
    );
    assert!(r.headers().contains_key("x-scf-request-id"));
    let e = Echo::parse(&serde_json::from_str(&body).unwrap());
    assert_eq!(e.method, "PUT");
    assert_eq!(e.path, "/some/path?x=1&y=two");
    assert_eq!(e.body, b"the body");
    assert_eq!(e.header("x-custom"), Some("kept"));

    // The logs of one request id hold exactly that request's lines.
    let call_log = |n: usize| {
        let r = http()
            .get(serve.url(&format!(
                "/v1/namespaces/default/functions/web/web/log?n={n}&rate=100000"
            )))
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        r.headers()["x-scf-request-id"]
            .to_str()
            .unwrap()
            .to_string()
    };
    let first = call_log(3);
    let second = call_log(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    let (a, b) = loop {
        let (a, b) = (
            logs_of(&serve, "web", &first),
            logs_of(&serve, "web", &second),
        );
        if (a.len(), b.len()) == (6, 4) || Instant::now() > deadline {
            break (a, b);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut lines: Vec<&str> = a.iter().map(|l| l["line"].as_str().unwrap()).collect();
    lines.sort();
    assert_eq!(
        lines,
        ["err-0", "err-1", "err-2", "out-0", "out-1", "out-2"],
        "{sandbox}: the lines of request {first}; all of web's: {}",
        get_json(&serve.url("/v1/namespaces/default/functions/web/logs")).1
    );
    assert!(a.iter().all(|l| l["request_id"] == first.as_str()));
    assert_eq!(b.len(), 4, "{b:?}");
    let out = cli(&serve, &["logs", "web", "--request-id", &second]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 4, "{stdout}");
    assert!(
        stdout.contains("out-1") && !stdout.contains("out-2"),
        "{stdout}"
    );

    // `fnvm logs --follow` prints new lines as they come.
    let mut follow = std::process::Command::new(HERE.fnvm)
        .args([
            "logs",
            "web",
            "--follow",
            "--tail",
            "0",
            "--server",
            &serve.url(""),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let follow_out = follow.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(follow_out).lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = || line_rx.recv_timeout(Duration::from_secs(20)).ok();
    // Give the follower time to connect; with --tail 0 it shows only lines printed from now on.
    std::thread::sleep(Duration::from_secs(2));
    let third = call_log(1);
    let new: Vec<String> = (0..2).filter_map(|_| next_line()).collect();
    let _ = follow.kill();
    let follow_err = follow.wait_with_output().unwrap().stderr;
    assert!(
        new.len() == 2 && new.iter().all(|l| l.contains(&third)),
        "{new:?}; fnvm logs stderr: {}",
        String::from_utf8_lossy(&follow_err)
    );
    let mut new_lines: Vec<&str> = new.iter().map(|l| l.rsplit(' ').next().unwrap()).collect();
    new_lines.sort();
    assert_eq!(new_lines, ["err-0", "out-0"]);

    // The CLI clients: invoke and ls.
    let out = cli(&serve, &["invoke", "echo", "--data", r#"{"from":"cli"}"#]);
    assert!(out.status.success(), "{}", text(&out));
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(Echo::parse(&reply).body, br#"{"from":"cli"}"#);
    assert!(String::from_utf8_lossy(&out.stderr).contains("fnvm: request id "));
    let out = cli(&serve, &["ls"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("echo") && stdout.contains("web") && stdout.contains("active"),
        "{stdout}"
    );

    // A restarted service still has every function, and they still answer (no credentials
    // needed: the version is rebuilt from the rootfs cache).
    serve.stop();
    let serve = Serve::start_in(sandbox, HERE.fnvm(), &home, HERE.agent(), &[]);
    let (_, list) = get_json(&serve.url("/v1/namespaces/default/functions"));
    let names: Vec<&str> = list["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["echo", "web"]);
    assert!(
        list["functions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["state"] == "active"),
        "{list}"
    );
    let r = http()
        .post(serve.url("/v1/namespaces/default/functions/echo/invocations"))
        .send(&b"again"[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // rm removes it for good.
    let out = cli(&serve, &["rm", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let (status, v) = get_json(&serve.url("/v1/namespaces/default/functions/web"));
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("FunctionNotFound"))
    );

    // The credentials were never logged, stored or returned.
    let mut seen = serve.stderr();
    for entry in walk(&home.join("service")) {
        seen.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    seen.push_str(&list.to_string());
    assert!(!seen.contains(PASSWORD), "the registry password leaked");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    assert!(!seen.contains(&basic), "the registry credentials leaked");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn put(
    serve: &Serve,
    name: &str,
    body: &str,
    headers: &[(&str, String)],
) -> (u16, serde_json::Value) {
    let mut req = http().put(serve.url(&format!("/v1/namespaces/default/functions/{name}")));
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let mut r = req.send(body.as_bytes()).unwrap();
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")),
    )
}

#[test]
fn bad_requests_are_clear_4xx_and_failed_deploys_say_why() {
    let _serial = serial();
    let registry = Registry::start_with_auth();
    let home = HERE.fresh_home("service-api-errors-home");
    let serve = Serve::start(HERE.fnvm(), &home, HERE.agent(), &[]);
    let host = registry.host();

    // Bad JSON, unknown fields, memory out of range, an unknown function.
    let (s, v) = put(&serve, "f", "{not json", &[]);
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("InvalidJson")),
        "{v}"
    );
    let (s, v) = put(
        &serve,
        "f",
        r#"{"image":"127.0.0.1:5000/a/b:1","memroy_mb":256}"#,
        &[],
    );
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("InvalidSpec")),
        "{v}"
    );
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memroy_mb"),
        "{v}"
    );
    let (s, v) = put(
        &serve,
        "f",
        r#"{"image":"127.0.0.1:5000/a/b:1","memory_mb":4096}"#,
        &[],
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("memory_mb: 4096 is out of range"),
        "{v}"
    );
    assert!(v["error"]["request_id"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    let (s, v) = get_json(&serve.url("/v1/namespaces/default/functions/nope"));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("FunctionNotFound")),
        "{v}"
    );
    let r = http()
        .post(serve.url("/v1/namespaces/default/functions/nope/invocations"))
        .send(&b"{}"[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // Failed deploys say why.
    let auth = |user: &str, pass: &str| {
        vec![
            (
                "X-Fnvm-Registry-Auth",
                fnvm_rootfs_builder::credentials::Credentials::new(user, pass).basic_header(),
            ),
            ("X-Fnvm-Insecure-Registry", host.clone()),
        ]
    };
    let good = registry.push_small("fn/small", "amd64", None);
    let arm = registry.push_small("fn/arm", "arm64", None);
    let huge = registry.push_small("fn/huge", "amd64", Some(1 << 30));
    let cases = [
        (
            "badcreds",
            format!("{host}/fn/small@{good}"),
            auth(USER, "wrong"),
            "authentication failed",
        ),
        (
            "arm",
            format!("{host}/fn/arm@{arm}"),
            auth(USER, PASSWORD),
            "arm64",
        ),
        (
            "huge",
            format!("{host}/fn/huge@{huge}"),
            auth(USER, PASSWORD),
            "too large",
        ),
        (
            "unreachable",
            format!(
                "127.0.0.1:{}/fn/small@{good}",
                fnvm_testkit::registry::free_port()
            ),
            auth(USER, PASSWORD),
            "failed",
        ),
    ];
    for (name, image, headers, _) in &cases {
        let (s, v) = put(&serve, name, &format!(r#"{{"image":"{image}"}}"#), headers);
        assert_eq!(s, 202, "{v}");
        assert_eq!(v["state"], "pending", "{v}");
    }
    for (name, _, _, why) in &cases {
        let v = wait_settled(&serve, name, None);
        assert_eq!(v["state"], "failed", "{name}: {v}");
        let reason = v["reason"].as_str().unwrap();
        assert!(
            reason.contains(why),
            "{name}: {reason:?} should say {why:?}"
        );
        assert!(
            !reason.contains("wrong") && !reason.contains(PASSWORD),
            "{reason}"
        );
        let r = http()
            .post(serve.url(&format!(
                "/v1/namespaces/default/functions/{name}/invocations"
            )))
            .send(&b"{}"[..])
            .unwrap();
        assert_eq!(r.status().as_u16(), 409, "{name}");
    }
    // The CLI shows the reason and fails.
    let out = cli(
        &serve,
        &[
            "deploy",
            "arm2",
            "--image",
            &cases[1].1,
            "--registry-user",
            USER,
            "--registry-password",
            PASSWORD,
            "--insecure-registry",
            &host,
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("the deploy of arm2 failed") && text(&out).contains("arm64"),
        "{}",
        text(&out)
    );
}

#[test]
fn with_a_token_calls_without_it_get_401() {
    let _serial = serial();
    let home = HERE.fresh_home("service-api-token-home");
    let serve = Serve::start(
        HERE.fnvm(),
        &home,
        HERE.agent(),
        &["--api-token", "tok-123"],
    );
    let (s, v) = get_json(&serve.url("/v1/namespaces/default/functions"));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("Unauthorized")),
        "{v}"
    );
    for bad in ["Bearer tok-12", "Bearer tok-1234", "Basic tok-123", ""] {
        let mut r = http()
            .get(serve.url("/v1/namespaces/default/functions"))
            .header("Authorization", bad)
            .call()
            .unwrap();
        assert_eq!(r.status().as_u16(), 401, "{bad:?}");
        let _ = r.body_mut().read_to_string();
    }
    let (s, _) = get_json(
        &serve
            .url("/metrics")
            .replace("/metrics", "/v1/namespaces/default/functions/x"),
    );
    assert_eq!(s, 401);
    let mut r = http()
        .get(serve.url("/v1/namespaces/default/functions"))
        .header("Authorization", "Bearer tok-123")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.body_mut()
            .read_to_string()
            .unwrap()
            .trim()
            .replace([' ', '\n'], ""),
        r#"{"functions":[]}"#
    );
    // The CLI takes the token from its flag or FNVM_API_TOKEN.
    let out = cli(&serve, &["ls"]);
    assert!(
        !out.status.success() && text(&out).contains("401"),
        "{}",
        text(&out)
    );
    let out = cli(&serve, &["ls", "--api-token", "tok-123"]);
    assert!(out.status.success(), "{}", text(&out));
    // Health checks need no token.
    let r = http().get(serve.url("/healthz")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
}
