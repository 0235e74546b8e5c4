//! `fnvm serve` attacked as a hostile client and tenant would (issue 10): the admin token and
//! web functions, idle and slowloris connections, the connection cap, log reads of a huge log,
//! unbounded counts, and the error replies (429, 502) and `fnvm ls` a user reads.
//!
//! The real binary, a real docker-registry on loopback, real images, real HTTP clients and raw
//! TCP sockets (127.0.0.1 only, bounded in count and time). Needs root (process sandbox).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use fnvm_testkit::registry::{Registry, PASSWORD, USER};
use fnvm_testkit::Serve;
use fnvm_testkit::{busybox_image, echoed_headers, http, python_image, serial};

use fnvm_testkit::Here;

const HERE: Here = fnvm_testkit::here!();
const TOKEN: &str = "admin-tok-9f3c1e";

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A request with optional headers; returns status, headers and body.
fn call(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, ureq::http::HeaderMap, String) {
    let mut req = ureq::http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut resp = match body {
        Some(b) => http().run(req.body(b.to_string()).unwrap()),
        None => http().run(req.body(()).unwrap()),
    }
    .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (
        status,
        headers,
        resp.body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .unwrap(),
    )
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// PUTs a spec with the registry headers (and the admin token); waits until it settles.
fn deploy(
    serve: &Serve,
    registry: &Registry,
    name: &str,
    spec: serde_json::Value,
) -> serde_json::Value {
    let auth = fnvm_rootfs_builder::credentials::Credentials::new(USER, PASSWORD).basic_header();
    let host = registry.host();
    let url = serve.url(&format!("/v1/namespaces/default/functions/{name}"));
    let token = bearer(TOKEN);
    let (s, _, body) = call(
        "PUT",
        &url,
        &[
            ("Authorization", &token),
            ("X-Fnvm-Registry-Auth", &auth),
            ("X-Fnvm-Insecure-Registry", &host),
        ],
        Some(&spec.to_string()),
    );
    assert_eq!(s, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (_, _, body) = call("GET", &url, &[("Authorization", &token)], None);
        let v = json(&body);
        if v["state"] != "pending" {
            return v;
        }
        assert!(Instant::now() < deadline, "{name} still pending: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn cli(serve: &Serve, args: &[&str]) -> std::process::Output {
    std::process::Command::new(HERE.fnvm)
        .args(args)
        .args(["--server", &serve.url(""), "--api-token", TOKEN])
        .env_remove("FNVM_API_TOKEN")
        .output()
        .unwrap()
}

#[test]
fn with_a_token_web_functions_never_see_it_and_errors_say_what_happened() {
    let _serial = serial();
    let registry = Registry::start_with_auth();
    let digest = registry.push_layout("fn/python", &python_image(&HERE.layouts()));
    let image = format!("{}/fn/python@{digest}", registry.host());
    let home = HERE.fresh_home("service-hardening-token-home");
    let serve = Serve::start(
        HERE.fnvm(),
        &home,
        HERE.agent(),
        &["--api-token", TOKEN, "--queue-timeout", "1"],
    );
    let v = deploy(
        &serve,
        &registry,
        "web",
        serde_json::json!({"image": image, "type": "web", "max_instances": 1, "timeout_s": 30}),
    );
    assert_eq!(v["state"], "active", "{v}");
    let web = |path: &str| serve.url(&format!("/v1/namespaces/default/functions/web/web{path}"));

    // Public web route: the user's own Authorization and Cookie reach the function unchanged.
    let (s, _, body) = call(
        "GET",
        &web("/me"),
        &[
            ("Authorization", "Bearer user-xyz"),
            ("Cookie", "session=abc; theme=dark"),
            ("X-Forwarded-User", "alice"),
        ],
        None,
    );
    assert_eq!(s, 200, "{body}");
    let seen = echoed_headers(&json(&body));
    let header = |name: &str| {
        seen.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(header("authorization"), Some("Bearer user-xyz"), "{seen:?}");
    assert_eq!(
        header("cookie"),
        Some("session=abc; theme=dark"),
        "{seen:?}"
    );
    assert_eq!(header("x-forwarded-user"), Some("alice"), "{seen:?}");
    // Without any Authorization it answers too; with the admin token, the token is removed.
    let (s, _, body) = call("GET", &web("/anon"), &[], None);
    assert_eq!(s, 200, "{body}");
    let token = bearer(TOKEN);
    let (s, _, body) = call(
        "POST",
        &web("/sneaky"),
        &[("Authorization", &token)],
        Some("x"),
    );
    assert_eq!(s, 200, "{body}");
    assert!(
        !body.contains(TOKEN),
        "the function saw the admin token: {body}"
    );
    assert_eq!(
        echoed_headers(&json(&body))
            .iter()
            .filter(|(k, _)| k == "authorization")
            .count(),
        0,
        "{body}"
    );
    // Its environment does not hold the token either.
    let (_, _, env) = call("GET", &web("/env"), &[], None);
    assert!(!env.contains(TOKEN), "{env}");

    // Management, event invocations, logs and metrics stay behind the token.
    let base = serve.url("/v1/namespaces/default/functions");
    for (method, url) in [
        ("GET", base.clone()),
        ("GET", format!("{base}/web")),
        ("DELETE", format!("{base}/web")),
        ("PUT", format!("{base}/other")),
        ("POST", format!("{base}/web/invocations")),
        ("GET", format!("{base}/web/logs")),
        ("GET", serve.url("/metrics")),
    ] {
        for auth in [
            None,
            Some("Bearer user-xyz"),
            Some("Bearer admin-tok-9f3c1"),
        ] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let (s, h, body) = call(method, &url, &headers, Some("{}"));
            assert_eq!(s, 401, "{method} {url} with {auth:?}: {body}");
            assert_eq!(h["www-authenticate"], "Bearer");
        }
    }
    let (s, _, _) = call(
        "GET",
        &format!("{base}/web"),
        &[("Authorization", &token)],
        None,
    );
    assert_eq!(s, 200);

    // 429 at the queue timeout names the limit and says when to retry: one instance at most,
    // busy with a slow request.
    let slow = {
        let url = web("/log?n=400&rate=100");
        std::thread::spawn(move || call("GET", &url, &[], None).0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, _, body) = call(
            "GET",
            &format!("{base}/web"),
            &[("Authorization", &token)],
            None,
        );
        let v = json(&body);
        if v["instances"]
            .as_array()
            .is_some_and(|i| i.iter().any(|i| i["in_flight"] == 1))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the slow request never got in flight: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (s, h, body) = call("GET", &web("/quick"), &[], None);
    assert_eq!(s, 429, "{body}");
    assert_eq!(h["retry-after"], "1", "{h:?}");
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("max_instances (1)") && message.contains("queue timeout of 1s"),
        "{message}"
    );
    assert_eq!(slow.join().unwrap(), 200);

    // A crash reply shows the function's last lines once each.
    let (s, _, body) = call("GET", &web("/exit?code=3"), &[], None);
    assert_eq!(s, 502, "{body}");
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    for line in ["about to exit with code 3", "last words on stderr"] {
        assert_eq!(message.matches(line).count(), 1, "{line:?} in {message}");
    }
    let (s, _, body) = call("GET", &web("/crash"), &[], None);
    assert_eq!(s, 502, "{body}");
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(message.matches("about to crash").count(), 1, "{message}");
    // So does the reply of a function that dies while it starts.
    let v = deploy(
        &serve,
        &registry,
        "dies",
        serde_json::json!({"image": image, "type": "web", "command": "/bin/sh",
                           "args": ["-c", "echo first words; echo second words >&2; exit 4"]}),
    );
    assert_eq!(v["state"], "active", "{v}");
    let (s, _, body) = call(
        "GET",
        &serve.url("/v1/namespaces/default/functions/dies/web/"),
        &[],
        None,
    );
    assert_eq!(s, 502, "{body}");
    let message = json(&body)["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    for line in ["first words", "second words"] {
        assert_eq!(message.matches(line).count(), 1, "{line:?} in {message}");
    }

    // Unbounded counts are refused naming the field and its limit.
    for (spec, field, limit) in [
        (
            serde_json::json!({"image": image, "max_instances": 4_000_000_000u64}),
            "max_instances",
            "1..=1000",
        ),
        (
            serde_json::json!({"image": image, "provisioned_concurrency": 4_000_000_000u64, "max_instances": 1000}),
            "provisioned_concurrency",
            "0..=1000",
        ),
        (
            serde_json::json!({"image": image, "memory_mb": 1u64 << 40}),
            "memory_mb",
            "64..=3072",
        ),
        (
            serde_json::json!({"image": image, "env": (0..300).map(|i| (format!("V{i}"), serde_json::json!("x"))).collect::<serde_json::Map<_, _>>()}),
            "env",
            "256",
        ),
    ] {
        let (s, _, body) = call(
            "PUT",
            &format!("{base}/big"),
            &[("Authorization", &token)],
            Some(&spec.to_string()),
        );
        assert_eq!(s, 400, "{body}");
        let m = json(&body)["error"]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            m.starts_with(&format!("{field}: ")) && m.contains(limit),
            "{m}"
        );
    }

    // `fnvm ls` stays a table with a long failure reason; `fnvm ls NAME` shows it whole.
    let unreachable = format!(
        "127.0.0.1:{}/fn/nothing-listens-here/{}end@{digest}",
        fnvm_testkit::registry::free_port(),
        "deep/".repeat(12)
    );
    let v = deploy(
        &serve,
        &registry,
        "broken",
        serde_json::json!({"image": unreachable}),
    );
    assert_eq!(v["state"], "failed", "{v}");
    let reason = v["reason"].as_str().unwrap().to_string();
    assert!(reason.len() > 80, "a long reason makes the point: {reason}");
    let out = cli(&serve, &["ls"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(
        rows.len(),
        4,
        "a header and one line per function:\n{table}"
    );
    let state_col = rows[0].find("STATE").unwrap();
    let type_col = rows[0].find("TYPE").unwrap();
    for row in &rows[1..] {
        let state = row[state_col..type_col].trim();
        assert!(["active", "failed"].contains(&state), "{row:?}\n{table}");
    }
    let broken = rows.iter().find(|r| r.starts_with("broken ")).unwrap();
    assert!(
        broken.contains("(fnvm ls broken)") && !broken.contains(&reason),
        "{broken}"
    );
    let out = cli(&serve, &["ls", "broken"]);
    assert!(out.status.success(), "{out:?}");
    let detail = String::from_utf8(out.stdout).unwrap();
    for line in reason.lines() {
        assert!(detail.contains(line), "{line:?} missing in\n{detail}");
    }
}

/// Raises this process's descriptor limit for the many test sockets.
fn raise_own_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).unwrap();
    }
}

/// True once the server closed `s` (EOF or reset); false if it is still open after `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Whether the server answered this silent connection already (its refusal) or closed it.
fn was_refused(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let answered =
        !matches!(s.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    answered
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

#[test]
fn idle_and_slowloris_connections_starve_nothing_and_are_closed_after_their_timeouts() {
    let _serial = serial();
    const IDLE: usize = 2000;
    const SLOW: usize = 500;
    raise_own_nofile(8192);
    let registry = Registry::start_with_auth();
    let digest = registry.push_layout("fn/busybox", &busybox_image(&HERE.layouts()));
    let home = HERE.fresh_home("service-hardening-conns-home");
    let serve = Serve::start(
        HERE.fnvm(),
        &home,
        HERE.agent(),
        &[
            "--api-token",
            TOKEN,
            "--header-timeout",
            "6s",
            "--keepalive-timeout",
            "4s",
        ],
    );
    let image = format!("{}/fn/busybox@{digest}", registry.host());
    let v = deploy(
        &serve,
        &registry,
        "www",
        serde_json::json!({"image": image, "type": "web"}),
    );
    assert_eq!(v["state"], "active", "{v}");
    let page = serve.url("/v1/namespaces/default/functions/www/web/index.html");
    let (s, _, body) = call("GET", &page, &[], None);
    assert_eq!(
        (s, body.contains("busybox says hello")),
        (200, true),
        "{body}"
    );

    // Thousands of connections that send nothing, and slowloris ones that trickle a request
    // head a byte a second.
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..IDLE).map(|_| connect(serve.addr)).collect();
    let mut slow: Vec<TcpStream> = (0..SLOW).map(|_| connect(serve.addr)).collect();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let trickle = std::thread::spawn(move || {
        // One byte a second on each; returns when the server has closed them all.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut open: Vec<bool> = vec![true; slow.len()];
        let mut closed_at = Vec::new();
        for i in 0.. {
            let byte = [head[i % head.len()]];
            for (s, o) in slow.iter_mut().zip(open.iter_mut()) {
                if *o && s.write_all(&byte).is_err() {
                    *o = false;
                    closed_at.push(Instant::now());
                }
            }
            for (s, o) in slow.iter_mut().zip(open.iter_mut()) {
                if *o && closed_within(s, Duration::from_millis(1)) {
                    *o = false;
                    closed_at.push(Instant::now());
                }
            }
            if open.iter().all(|o| !o) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        (open.iter().filter(|o| **o).count(), closed_at)
    });

    // Health checks and invocations still answer while they are open.
    let (s, _, body) = call("GET", &serve.url("/healthz"), &[], None);
    assert_eq!((s, body.as_str()), (200, "ok\n"));
    let (s, _, body) = call("GET", &page, &[], None);
    assert_eq!(
        (s, body.contains("busybox says hello")),
        (200, true),
        "{body}"
    );

    // A keep-alive connection that finished a request and went quiet is closed too.
    let mut kept = connect(serve.addr);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    kept.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = [0u8; 256];
    let n = kept.read(&mut reply).unwrap();
    assert!(
        reply[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&reply[..n])
    );
    assert!(
        closed_within(&mut kept, Duration::from_secs(60)),
        "an idle keep-alive connection stayed open"
    );

    // The idle ones are closed after the keep-alive timeout, the slow ones after the header
    // timeout (not before: they kept sending).
    let still_idle = idle
        .iter_mut()
        .filter_map(|s| (!closed_within(s, Duration::from_secs(60))).then_some(()))
        .count();
    assert_eq!(still_idle, 0, "idle connections left open");
    let (still_slow, closed_at) = trickle.join().unwrap();
    assert_eq!(still_slow, 0, "slowloris connections left open");
    assert!(
        closed_at
            .iter()
            .all(|t| t.duration_since(opened) >= Duration::from_secs(5)),
        "a slowloris connection was closed before its header timeout"
    );
    let (s, _, _) = call("GET", &serve.url("/healthz"), &[], None);
    assert_eq!(s, 200);
    let stderr = serve.stderr();
    assert!(!stderr.contains("Too many open files"), "{stderr}");
}

#[test]
fn past_the_connection_cap_health_and_management_keep_a_reserve_and_the_rest_get_503() {
    let _serial = serial();
    const CAP: usize = 100;
    const RESERVE: usize = 4;
    raise_own_nofile(4096);
    let home = HERE.fresh_home("service-hardening-cap-home");
    let serve = Serve::start(
        HERE.fnvm(),
        &home,
        HERE.agent(),
        &[
            "--max-connections",
            &CAP.to_string(),
            "--reserved-connections",
            &RESERVE.to_string(),
            "--header-timeout",
            "120s",
            "--keepalive-timeout",
            "120s",
        ],
    );
    // Fill the cap with connections that hold their places (each one served a request, so the
    // server has certainly taken it).
    let mut held: Vec<TcpStream> = (0..CAP)
        .map(|_| {
            let mut s = connect(serve.addr);
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            s
        })
        .collect();
    // Health and management are answered from the reserve; invocations there are refused.
    let (s, _, body) = call("GET", &serve.url("/healthz"), &[], None);
    assert_eq!((s, body.as_str()), (200, "ok\n"));
    let (s, _, body) = call(
        "GET",
        &serve.url("/v1/namespaces/default/functions"),
        &[],
        None,
    );
    assert_eq!(s, 200, "{body}");
    let (s, h, body) = call(
        "POST",
        &serve.url("/v1/namespaces/default/functions/f/invocations"),
        &[],
        Some("{}"),
    );
    assert_eq!(s, 503, "{body}");
    assert_eq!(h["retry-after"], "1");
    let e = &json(&body)["error"];
    assert_eq!(e["code"], "TooManyConnections", "{body}");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains(&format!("max_connections {CAP}")),
        "{body}"
    );
    // With the reserve taken too, a new connection gets a complete 503 and is closed. A reserve
    // place is given back when the server has closed the connection of the exchange before, in
    // its own time: a reserve connection that came earlier was refused, and is replaced.
    let mut reserve: Vec<TcpStream> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        reserve.retain(|s| !was_refused(s));
        while reserve.len() < RESERVE {
            reserve.push(connect(serve.addr));
        }
        let (s, h, body) = call("GET", &serve.url("/healthz"), &[], None);
        if s == 503 {
            assert_eq!(h["retry-after"], "1");
            assert_eq!(json(&body)["error"]["code"], "TooManyConnections", "{body}");
            break;
        }
        // The server may not have taken every reserve connection yet.
        assert_eq!(s, 200, "{body}");
        assert!(Instant::now() < deadline, "the refusal never came");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Places come back as clients leave.
    drop(reserve);
    held.truncate(CAP - 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, _, _) = call(
            "POST",
            &serve.url("/v1/namespaces/default/functions/f/invocations"),
            &[],
            Some("{}"),
        );
        if s == 404 {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(held);
}

/// One stored log line as the log store writes it (JSON lines).
fn log_line(i: usize) -> String {
    serde_json::json!({
        "time_ms": 1_700_000_000_000u64 + i as u64,
        "stream": if i % 2 == 0 { "stdout" } else { "stderr" },
        "instance": "i-chatty",
        "request_id": format!("req-{}", i / 1000),
        "line": format!("line {i:06} of a very chatty function"),
    })
    .to_string()
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

#[test]
fn a_huge_log_is_streamed_to_many_readers_in_flat_memory() {
    let _serial = serial();
    const LINES: usize = 300_000;
    const READERS: usize = 16;
    let registry = Registry::start_with_auth();
    let digest = registry.push_small("fn/small", "amd64", None);
    let home = HERE.fresh_home("service-hardening-logs-home");
    let args = ["--api-token", TOKEN, "--log-retention-bytes", "268435456"];
    let mut serve = Serve::start(HERE.fnvm(), &home, HERE.agent(), &args);
    let image = format!("{}/fn/small@{digest}", registry.host());
    let v = deploy(
        &serve,
        &registry,
        "chatty",
        serde_json::json!({"image": image}),
    );
    assert_eq!(v["state"], "active", "{v}");
    serve.stop();
    // The store's file, as if the function had printed 300,000 lines.
    let dir = home.join("service/logs/default");
    std::fs::create_dir_all(&dir).unwrap();
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("chatty.log")).unwrap());
    for i in 0..LINES {
        writeln!(file, "{}", log_line(i)).unwrap();
    }
    file.into_inner().unwrap().sync_all().unwrap();
    let serve = Serve::start(HERE.fnvm(), &home, HERE.agent(), &args);
    let pid = serve.child.id();
    let url = serve.url("/v1/namespaces/default/functions/chatty/logs");
    let token = bearer(TOKEN);
    let read_all = |url: &str| -> serde_json::Value {
        let (s, _, body) = call("GET", url, &[("Authorization", &token)], None);
        assert_eq!(s, 200, "{}", &body[..body.len().min(500)]);
        json(&body)
    };
    // The first read loads the store from disk; what it then holds is the baseline.
    let v = read_all(&url);
    assert_eq!(v["logs"].as_array().unwrap().len(), LINES);
    let (rss_before, peak_before) = (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"));

    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let url = url.clone();
            let token = token.clone();
            std::thread::spawn(move || {
                let resp = http()
                    .get(&url)
                    .header("Authorization", &token)
                    .call()
                    .unwrap();
                assert_eq!(resp.status().as_u16(), 200);
                // Read slowly-ish in small pieces, as a real client over a network would.
                let mut reader = resp.into_body().into_reader();
                let mut body = Vec::new();
                let mut buf = [0u8; 16 << 10];
                loop {
                    let n = reader.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    body.extend_from_slice(&buf[..n]);
                }
                body
            })
        })
        .collect();
    let mut peak_during = peak_before;
    let bodies: Vec<Vec<u8>> = readers
        .into_iter()
        .map(|r| {
            peak_during = peak_during.max(rss_kib(pid, "VmHWM:"));
            r.join().unwrap()
        })
        .collect();
    let (rss_after, peak_after) = (rss_kib(pid, "VmRSS:"), rss_kib(pid, "VmHWM:"));
    eprintln!(
        "serve RSS {rss_before} KiB (peak {peak_before} KiB) before {READERS} readers of \
         {} bytes each; after: RSS {rss_after} KiB, peak {peak_after} KiB",
        bodies[0].len()
    );
    // Each body is complete and correct.
    for body in &bodies {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let logs = v["logs"].as_array().unwrap();
        assert_eq!(logs.len(), LINES);
        for i in [0, 1, 4242, LINES - 1] {
            assert_eq!(
                logs[i]["line"],
                format!("line {i:06} of a very chatty function")
            );
        }
    }
    // Sixteen whole copies would be ~16 x 30 MB; streaming costs a few chunks per reader.
    let grew_mib = peak_after.saturating_sub(peak_before) / 1024;
    assert!(
        grew_mib < 64,
        "serve's peak RSS grew by {grew_mib} MiB for {READERS} readers"
    );

    // tail, limit and since on the big log.
    let tail = read_all(&format!("{url}?tail=3"));
    let lines: Vec<&str> = tail["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        [299_997, 299_998, 299_999].map(|i| format!("line {i:06} of a very chatty function"))
    );
    let since = read_all(&format!(
        "{url}?since={}&limit=2",
        1_700_000_000_000u64 + 150_000
    ));
    let lines: Vec<&str> = since["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            "line 150000 of a very chatty function",
            "line 150001 of a very chatty function"
        ]
    );
    let one = read_all(&format!("{url}?request_id=req-42&tail=2"));
    let lines: Vec<&str> = one["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            "line 042998 of a very chatty function",
            "line 042999 of a very chatty function"
        ]
    );
}
