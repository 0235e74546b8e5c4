//! Whole-pool tests on the real process sandbox: the static agent as PID 1 of fresh namespaces,
//! a busybox rootfs image made here whose function is a tiny shell HTTP server (`nc -ll -e`),
//! real streams to port 9000. They need root (skipped loudly otherwise).
//!
//! The test function reads the event body as a command: `sleep S` sleeps before answering,
//! `log N` prints N lines to stderr naming the request id first; it answers `ok <request id>`.
//! An `Upgrade` request is switched (101) to an echo of every byte sent.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use fnvm_agent::protocol::{StartSpec, READY_TIMEOUT_MS};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use super::*;
use crate::function::FunctionSettings;
use crate::sandbox::process::ProcessSandbox;
use crate::service::logs::LogQuery;
use crate::service::model::FunctionSpec;

mod fake;

const HANDLER: &str = r#"#!/bin/sh
read -r request_line
len=0
rid=none
while read -r h; do
  h=$(printf '%s' "$h" | tr -d '\r')
  [ -z "$h" ] && break
  case "$h" in
    [Cc]ontent-[Ll]ength:*) len=${h#*: } ;;
    [Xx]-[Ss]cf-[Rr]equest-[Ii]d:*) rid=${h#*: } ;;
    [Xx]-[Ss]cf-[Tt]rigger-[Ss]rc:*) echo "trigger ${h#*: } $rid" >&2 ;;
    [Uu]pgrade:*) upgrade=${h#*: } ;;
  esac
done
if [ -n "$upgrade" ]; then
  printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: Upgrade\r\n\r\n' "$upgrade"
  exec cat
fi
body=$(head -c "$len")
case "$body" in
  sleep*) sleep ${body#sleep } ;;
  log*) n=${body#log }; i=1; while [ $i -le $n ]; do echo "line $i of $rid" >&2; i=$((i+1)); done ;;
esac
out="ok $rid"
printf 'HTTP/1.1 200 OK\r\nContent-Length: %s\r\nConnection: close\r\n\r\n%s' "${#out}" "$out"
"#;

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!(
        "SKIPPED: pool tests need root (the process sandbox: namespaces, loop devices, cgroups)"
    );
    false
}

use crate::sandbox::process::tests::{agent, workspace};

/// The busybox rootfs with the handler, built once per test run (ext4 via mkfs.ext4 -d).
fn rootfs() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            use std::os::unix::fs::PermissionsExt;
            let scratch = workspace().join("target/pool-tests");
            std::fs::create_dir_all(&scratch).unwrap();
            let tree = tempfile::tempdir_in(&scratch).unwrap();
            let root = tree.path();
            for dir in ["bin", "etc", "tmp", "proc", "sys", "dev", "root"] {
                std::fs::create_dir_all(root.join(dir)).unwrap();
            }
            std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
                .unwrap();
            std::fs::copy("/bin/busybox", root.join("bin/busybox"))
                .expect("busybox-static is installed (/bin/busybox)");
            for applet in ["sh", "nc", "sleep", "head", "tr", "printf", "echo", "cat"] {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
            std::fs::write(root.join("handler"), HANDLER).unwrap();
            std::fs::set_permissions(root.join("handler"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
            let image = scratch.join(format!("handler-{}.ext4", std::process::id()));
            let out = Command::new("mkfs.ext4")
                .args(["-q", "-F", "-b", "4096", "-d"])
                .arg(root)
                .arg(&image)
                .arg("16M")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            image
        })
        .clone()
}

/// Tests share two cores: one pool at a time keeps their timings meaningful.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A pool on a sandbox made for a fresh temporary home. Fields drop in order: the pool
/// (stopping its instances) before the temporary home goes.
struct World<S = ProcessSandbox> {
    pool: Arc<Pool>,
    sandbox: Arc<S>,
    logs: Arc<LogStore>,
    metrics: Arc<Metrics>,
    home: Home,
    _tmp: tempfile::TempDir,
}

/// A pool on the sandbox `make` builds for the new home (and a scratch directory beside it).
fn world_on<S: Sandbox + 'static>(
    cfg: PoolConfig,
    make: impl FnOnce(&Home, &std::path::Path) -> Arc<S>,
) -> World<S> {
    let tmp = tempfile::tempdir().unwrap();
    let home = Home::resolve(Some(tmp.path().join("home"))).unwrap();
    let sandbox = make(&home, tmp.path());
    let logs = LogStore::open(tmp.path().join("logs"), 1 << 20).unwrap();
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(
        Arc::clone(&sandbox) as Arc<dyn Sandbox>,
        home.clone(),
        cfg,
        Arc::clone(&logs),
        Arc::clone(&metrics),
    );
    World {
        pool,
        sandbox,
        logs,
        metrics,
        home,
        _tmp: tmp,
    }
}

/// A pool on the real process sandbox running the freshly built agent.
fn world(cfg: PoolConfig) -> World {
    world_on(cfg, |home, _| {
        Arc::new(ProcessSandbox::with_agent(home, agent()).unwrap())
    })
}

/// A version of the handler function with `spec_json` merged into the defaults.
fn version(name: &str, spec_json: serde_json::Value) -> Arc<FunctionVersion> {
    version_on(name, spec_json, rootfs())
}

/// As [`version`], on the rootfs image `rootfs_image`.
fn version_on(
    name: &str,
    spec_json: serde_json::Value,
    rootfs_image: PathBuf,
) -> Arc<FunctionVersion> {
    let mut spec = serde_json::json!({"image": "test/handler@sha256:00", "memory_mb": 64});
    spec.as_object_mut()
        .unwrap()
        .extend(spec_json.as_object().unwrap().clone());
    let spec: FunctionSpec = serde_json::from_value(spec).unwrap();
    let mut settings = FunctionSettings::local(name);
    settings.memory_mib = spec.memory_mb;
    settings.timeout_s = spec.timeout_s;
    Arc::new(FunctionVersion {
        key: FunctionKey::new("default", name),
        version: "v1".into(),
        image_digest: "sha256:00".into(),
        rootfs_image,
        settings,
        start: StartSpec {
            argv: ["/bin/nc", "-ll", "-p", "9000", "-e", "/handler"]
                .map(String::from)
                .to_vec(),
            env: vec!["PATH=/bin".into()],
            working_dir: "/".into(),
            user: None,
            ready_timeout_ms: READY_TIMEOUT_MS,
            resolv_conf: None,
        },
        spec,
    })
}

async fn invoke(
    pool: &Pool,
    key: &FunctionKey,
    body: &str,
) -> Result<(String, String), InvokeError> {
    let rid = uuid::Uuid::new_v4().to_string();
    let resp = pool
        .invoke_event(key, &rid, Bytes::from(body.to_string()), false)
        .await?;
    assert_eq!(resp.status(), 200);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    Ok((rid, String::from_utf8_lossy(&text).into_owned()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn metric(metrics: &Metrics, series: &str) -> u64 {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

#[test]
fn thirty_two_concurrent_invocations_scale_out_within_the_budget_and_all_succeed() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        // The budget (4 × 64 MiB) is tighter than max_instances (8): it is what caps.
        let w = world(PoolConfig {
            memory_budget_mib: 256,
            idle_timeout: Duration::from_secs(60),
            queue_timeout: Duration::from_secs(60),
        });
        let v = version("burst", serde_json::json!({"max_instances": 8}));
        let key = v.key.clone();
        w.pool.activate(v);
        let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let sampler = {
            let pool = Arc::clone(&w.pool);
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                loop {
                    peak.fetch_max(pool.committed_mib(), std::sync::atomic::Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let pool = Arc::clone(&w.pool);
                let key = key.clone();
                tokio::spawn(async move { invoke(&pool, &key, "sleep 0.3").await })
            })
            .collect();
        for call in calls {
            let (rid, body) = call.await.unwrap().expect("every invocation succeeds");
            assert_eq!(body, format!("ok {rid}"));
        }
        sampler.abort();
        let boots = metric(
            &w.metrics,
            "fnvm_instance_starts_total{function=\"default/burst\",start_kind=\"boot\"}",
        );
        let warm = metric(
            &w.metrics,
            "fnvm_instance_starts_total{function=\"default/burst\",start_kind=\"warm\"}",
        );
        assert!((2..=4).contains(&boots), "{boots} instances booted");
        assert_eq!(boots + warm, 32);
        assert!(
            peak.load(std::sync::atomic::Ordering::Relaxed) <= 256,
            "the memory budget was exceeded"
        );
        assert!(w.pool.instances(&key).len() <= 4);
        w.pool.shutdown().await;
        assert_eq!(w.pool.committed_mib(), 0);
    });
}

#[test]
fn idle_instances_go_away_but_provisioned_ones_stay() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig {
            memory_budget_mib: 1024,
            idle_timeout: Duration::from_millis(300),
            queue_timeout: Duration::from_secs(30),
        });
        let idle = version("idle", serde_json::json!({}));
        let kept = version("kept", serde_json::json!({"provisioned_concurrency": 1}));
        let (idle_key, kept_key) = (idle.key.clone(), kept.key.clone());
        w.pool.activate(idle);
        w.pool.activate(kept);
        invoke(&w.pool, &idle_key, "hello").await.unwrap();
        assert_eq!(w.pool.instances(&idle_key).len(), 1);
        let instances = crate::sandbox::instances_root(&w.home).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !w.pool.instances(&idle_key).is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            w.pool.instances(&idle_key).is_empty(),
            "the idle instance is still there"
        );
        // The provisioned one is ready without any invocation and outlives the idle time.
        let kept_instances = w.pool.instances(&kept_key);
        assert_eq!(kept_instances.len(), 1, "{kept_instances:?}");
        assert_eq!(kept_instances[0].state, "idle");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(w.pool.instances(&kept_key)[0].id, kept_instances[0].id);
        // The reclaimed instance's memory is released once it is stopped, its files gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.pool.committed_mib() != 64 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(w.pool.committed_mib(), 64);
        let left: Vec<_> = std::fs::read_dir(&instances).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        w.pool.shutdown().await;
    });
}

#[test]
fn a_function_past_its_timeout_gets_the_timeout_error_and_the_next_call_works() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v = version("slow", serde_json::json!({"timeout_s": 1}));
        let key = v.key.clone();
        w.pool.activate(v);
        invoke(&w.pool, &key, "hello").await.unwrap();
        let first = w.pool.instances(&key)[0].id.clone();
        let started = std::time::Instant::now();
        let err = invoke(&w.pool, &key, "sleep 10").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, InvokeError::Timeout { secs: 1 }), "{err:?}");
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(err.to_string().contains("destroyed"), "{err}");
        let (rid, body) = invoke(&w.pool, &key, "hello").await.unwrap();
        assert_eq!(body, format!("ok {rid}"));
        let now: Vec<String> = w.pool.instances(&key).into_iter().map(|i| i.id).collect();
        assert!(
            !now.contains(&first),
            "the timed-out instance was reused: {now:?}"
        );
        assert_eq!(
            metric(
                &w.metrics,
                "fnvm_invocation_errors_total{function=\"default/slow\",kind=\"FunctionTimeout\"}"
            ),
            1
        );
        w.pool.shutdown().await;
    });
}

/// SIGKILLs the agent (PID 1 of the sandbox, so everything in it dies) of `instance_id`.
fn kill_sandbox(instance_id: &str) {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("--socket-dir") && cmdline.contains(instance_id) {
            let pid: i32 = entry.file_name().to_string_lossy().parse().unwrap();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "the agent of {instance_id} was not found");
}

#[test]
fn a_sandbox_killed_mid_request_is_a_crash_error_and_the_next_call_works() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v = version("victim", serde_json::json!({"timeout_s": 20}));
        let key = v.key.clone();
        w.pool.activate(v);
        invoke(&w.pool, &key, "hello").await.unwrap();
        let call = {
            let pool = Arc::clone(&w.pool);
            let key = key.clone();
            tokio::spawn(async move { invoke(&pool, &key, "sleep 10").await })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let victim = loop {
            let busy: Vec<_> = w
                .pool
                .instances(&key)
                .into_iter()
                .filter(|i| i.state == "busy")
                .collect();
            if let Some(i) = busy.first() {
                break i.id.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no busy instance");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        kill_sandbox(&victim);
        let err = call.await.unwrap().unwrap_err();
        match &err {
            InvokeError::Crashed { detail } => {
                assert!(detail.contains(&victim), "{detail}");
            }
            other => panic!("expected a crash, got {other:?}"),
        }
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        let (rid, body) = invoke(&w.pool, &key, "hello").await.unwrap();
        assert_eq!(body, format!("ok {rid}"));
        assert!(w.pool.instances(&key).iter().all(|i| i.id != victim));
        w.pool.shutdown().await;
    });
}

#[test]
fn the_logs_of_one_request_hold_exactly_its_lines() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v = version("chatty", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        // Back to back on one warm instance: each request's lines are read by the agent while
        // the next request may already be on its way.
        let mut rids = Vec::new();
        for _ in 0..8 {
            rids.push(invoke(&w.pool, &key, "log 3").await.unwrap().0);
        }
        assert_each_request_has_exactly_its_lines(&w, &key, &rids).await;
        let tail = w.logs.query(
            &key,
            LogQuery {
                tail: Some(2),
                ..LogQuery::default()
            },
        );
        assert_eq!(tail.len(), 2);
        w.pool.shutdown().await;
    });
}

/// The same with both cores kept busy by other work, and silent requests between the chatty
/// ones (the agent announces a request only once it prints): scheduling delays of the agent's
/// or the host's reader threads must not move a line to another request.
#[test]
fn under_full_cpu_load_each_request_still_holds_exactly_its_lines() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            })
        })
        .collect();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v = version("loaded", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        let mut rids = Vec::new();
        for i in 0..24 {
            rids.push(invoke(&w.pool, &key, "log 3").await.unwrap().0);
            if i % 3 == 0 {
                invoke(&w.pool, &key, "quiet").await.unwrap();
            }
        }
        assert_each_request_has_exactly_its_lines(&w, &key, &rids).await;
        w.pool.shutdown().await;
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        h.join().unwrap();
    }
}

#[test]
fn requests_beyond_the_limits_wait_then_get_overloaded() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig {
            memory_budget_mib: 1024,
            idle_timeout: Duration::from_secs(60),
            queue_timeout: Duration::from_millis(300),
        });
        let v = version("single", serde_json::json!({"max_instances": 1}));
        let key = v.key.clone();
        w.pool.activate(v);
        invoke(&w.pool, &key, "hello").await.unwrap();
        let busy = {
            let pool = Arc::clone(&w.pool);
            let key = key.clone();
            tokio::spawn(async move { invoke(&pool, &key, "sleep 1.5").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let err = invoke(&w.pool, &key, "hello").await.unwrap_err();
        assert!(
            matches!(
                err,
                InvokeError::Overloaded {
                    limit: Limit::MaxInstances(1),
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.retry_after_secs(), Some(1));
        let message = err.to_string();
        assert!(
            message.contains("max_instances (1)") && message.contains("300ms"),
            "{message}"
        );
        busy.await.unwrap().unwrap();
        invoke(&w.pool, &key, "hello").await.unwrap();
        let missing = FunctionKey::new("default", "missing");
        assert!(matches!(
            invoke(&w.pool, &missing, "x").await.unwrap_err(),
            InvokeError::NotActive
        ));
        w.pool.shutdown().await;
    });
}

#[test]
fn a_timer_schedule_fires_event_invocations_marked_as_timer() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v = version("ticker", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        let timers = crate::service::timers::Timers::start(Arc::clone(&w.pool));
        let mut follow = w.logs.cursor(
            &key,
            LogQuery {
                tail: Some(0),
                ..LogQuery::default()
            },
        );
        timers.set(&key, &["* * * * * *".to_string()]).unwrap();
        let fired = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let batch = follow.next_batch(64);
                if let Some(e) = batch
                    .entries
                    .into_iter()
                    .find(|e| e.line.starts_with("trigger "))
                {
                    return e;
                }
                if batch.at_end {
                    assert!(follow.wait().await, "the log ended");
                }
            }
        })
        .await
        .expect("the every-second schedule fired within 10 s");
        let rid = fired.line.split(' ').nth(2).unwrap().to_string();
        assert_eq!(fired.line, format!("trigger Timer {rid}"));
        assert_eq!(fired.request_id.as_deref(), Some(rid.as_str()));
        timers.remove(&key);
        w.pool.shutdown().await;
    });
}

#[test]
fn a_failure_shows_each_last_line_once() {
    let lines = vec!["about to exit".to_string(), "last words".to_string()];
    let plain = with_last_lines("the function exited with code 3", &lines);
    assert_eq!(
        plain,
        "the function exited with code 3; last lines:\nabout to exit\nlast words"
    );
    // A reason that already quotes the lines (a child's "it said:" tail) does not get them again.
    let quoted = with_last_lines(
        "the sandbox ended: its agent exited with code 1; it said:\nabout to exit\nlast words",
        &lines,
    );
    assert_eq!(quoted.matches("about to exit").count(), 1, "{quoted}");
    assert_eq!(quoted.matches("last words").count(), 1, "{quoted}");
    let e = InvokeError::StartFailed {
        message: "the function exited (exit code 4) before it listened on port 9000".into(),
        last_lines: lines,
    };
    assert!(
        e.to_string()
            .ends_with("last lines:\nabout to exit\nlast words"),
        "{e}"
    );
}

/// A minimal front like the API's on 127.0.0.1: every request goes to `invoke_web` with a new
/// request id, also passed to the function as `X-Scf-Request-Id`.
async fn web_front(
    pool: &Arc<Pool>,
    key: &FunctionKey,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (pool, key) = (Arc::clone(pool), key.clone());
    let front = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let pool = Arc::clone(&pool);
            let key = key.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let pool = Arc::clone(&pool);
                    let key = key.clone();
                    async move {
                        let rid = uuid::Uuid::new_v4().to_string();
                        req.headers_mut()
                            .insert("x-scf-request-id", HeaderValue::from_str(&rid).unwrap());
                        let resp = match pool.invoke_web(&key, &rid, req).await {
                            Ok(resp) => resp,
                            Err(e) => Response::builder()
                                .status(e.status())
                                .body(
                                    http_body_util::Full::new(Bytes::from(e.to_string()))
                                        .map_err(|never| match never {})
                                        .boxed(),
                                )
                                .unwrap(),
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, front)
}

/// Each request id has exactly its three lines (`log 3`) as the log store attributed them, or
/// a panic listing every line. Lines trail responses by a moment (another stream): first all
/// of them must have arrived, however loaded the machine.
async fn assert_each_request_has_exactly_its_lines(w: &World, key: &FunctionKey, rids: &[String]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while w.logs.query(key, LogQuery::default()).len() < 3 * rids.len()
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for rid in rids {
        let lines: Vec<String> = w
            .logs
            .query(
                key,
                LogQuery {
                    request_id: Some(rid.clone()),
                    ..LogQuery::default()
                },
            )
            .into_iter()
            .map(|e| {
                assert_eq!(e.stream, "stderr");
                e.line
            })
            .collect();
        let want: Vec<String> = (1..=3).map(|i| format!("line {i} of {rid}")).collect();
        if lines != want {
            let all: Vec<String> = w
                .logs
                .query(key, LogQuery::default())
                .iter()
                .map(|e| format!("{} {} {:?} {}", e.time_ms, e.instance, e.request_id, e.line))
                .collect();
            panic!("{rid}: {lines:?}\nall lines:\n{}", all.join("\n"));
        }
    }
}

#[test]
fn a_web_callers_next_request_on_one_connection_does_not_take_the_last_ones_lines() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v = version("web-chatty", serde_json::json!({"type": "web"}));
        let key = v.key.clone();
        w.pool.activate(v);
        let (addr, front) = web_front(&w.pool, &key).await;
        // One keep-alive connection: each request goes out the moment the last byte of the
        // previous response arrived, and its lines are printed at once.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut rids = Vec::new();
        for _ in 0..24 {
            sender.ready().await.unwrap();
            let resp = sender
                .send_request(
                    Request::post("/")
                        .header(hyper::header::HOST, "fn")
                        .body(Full::new(Bytes::from_static(b"log 3")))
                        .unwrap(),
                )
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            let body = String::from_utf8_lossy(&body).into_owned();
            rids.push(
                body.strip_prefix("ok ")
                    .expect("ok <request id>")
                    .to_string(),
            );
        }
        assert_each_request_has_exactly_its_lines(&w, &key, &rids).await;
        front.abort();
        w.pool.shutdown().await;
    });
}

/// Records when it is dropped: stands in for a lease.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A body of unknown length (like a chunked response): its end shows only when polled.
struct Chunked(Vec<&'static str>);

impl hyper::body::Body for Chunked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        std::task::Poll::Ready(
            self.0
                .pop()
                .map(|c| Ok(hyper::body::Frame::data(Bytes::from_static(c.as_bytes())))),
        )
    }
}

fn drop_flag() -> (DropFlag, Arc<std::sync::atomic::AtomicBool>) {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    (DropFlag(Arc::clone(&flag)), flag)
}

#[test]
fn a_web_response_frees_its_lease_with_its_last_byte_not_when_the_caller_is_done() {
    use std::sync::atomic::Ordering::SeqCst;
    runtime().block_on(async {
        // Known length: the last (here only) frame ends it, before anyone polls again.
        let (lease, freed) = drop_flag();
        let mut body = LeasedBody::new(Full::new(Bytes::from_static(b"whole")), lease);
        assert!(!freed.load(SeqCst));
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "whole");
        assert!(freed.load(SeqCst), "held after the last byte");

        // Unknown length (chunked): held until the stream says it ended.
        let (lease, freed) = drop_flag();
        let mut body = LeasedBody::new(Chunked(vec!["b", "a"]), lease);
        body.frame().await.unwrap().unwrap();
        body.frame().await.unwrap().unwrap();
        assert!(!freed.load(SeqCst), "freed before the end was known");
        assert!(body.frame().await.is_none());
        assert!(freed.load(SeqCst));

        // Empty: complete with the head, maybe never polled.
        let (lease, freed) = drop_flag();
        let body = LeasedBody::new(http_body_util::Empty::<Bytes>::new(), lease);
        assert!(freed.load(SeqCst));
        drop(body);
    });
}

#[test]
fn an_upgrade_to_a_web_function_is_tunnelled_both_ways() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let w = world(PoolConfig::default());
        let v = version("ws", serde_json::json!({"type": "web"}));
        let key = v.key.clone();
        w.pool.activate(v);
        let (addr, front) = web_front(&w.pool, &key).await;
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        client
            .write_all(
                b"GET /chat HTTP/1.1\r\nHost: fn\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            assert_eq!(client.read(&mut byte).await.unwrap(), 1, "{head:?}");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: echo"), "{head}");
        for message in ["ping\n", "a longer second message\n"] {
            client.write_all(message.as_bytes()).await.unwrap();
            let mut echoed = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut echoed))
                .await
                .expect("the echo came back")
                .unwrap();
            assert_eq!(echoed, message.as_bytes());
        }
        // The tunnel holds its instance while open and frees it when closed.
        assert_eq!(w.pool.instances(&key)[0].state, "busy");
        drop(client);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while w.pool.instances(&key)[0].state != "idle" {
            assert!(
                std::time::Instant::now() < deadline,
                "the tunnel's slot was not freed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        front.abort();
        w.pool.shutdown().await;
    });
}

#[test]
fn a_busy_function_gives_memory_back_to_a_waiting_one() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        // Room for two instances; `hog` may have both and has a long backlog.
        let w = world(PoolConfig {
            memory_budget_mib: 128,
            idle_timeout: Duration::from_secs(60),
            queue_timeout: Duration::from_secs(30),
        });
        let hog = version("hog", serde_json::json!({"max_instances": 4}));
        let other = version("other", serde_json::json!({}));
        let (hog_key, other_key) = (hog.key.clone(), other.key.clone());
        w.pool.activate(hog);
        w.pool.activate(other);
        let backlog: Vec<_> = (0..16)
            .map(|_| {
                let pool = Arc::clone(&w.pool);
                let key = hog_key.clone();
                tokio::spawn(async move { invoke(&pool, &key, "sleep 0.4").await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(w.pool.instances(&hog_key).len(), 2);
        // The backlog takes ~3 s on two instances; the other function gets one much sooner.
        let started = std::time::Instant::now();
        let (rid, body) = invoke(&w.pool, &other_key, "hello").await.unwrap();
        let waited = started.elapsed();
        assert_eq!(body, format!("ok {rid}"));
        let still_queued = backlog.iter().filter(|t| !t.is_finished()).count();
        assert!(
            still_queued > 0,
            "the backlog was done before the other function got memory ({waited:?})"
        );
        for call in backlog {
            call.await
                .unwrap()
                .expect("the busy function's requests all succeed too");
        }
        w.pool.shutdown().await;
    });
}

#[test]
fn a_new_version_drains_the_old_one_and_remove_stops_everything() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v1 = version("versions", serde_json::json!({"timeout_s": 10}));
        let key = v1.key.clone();
        w.pool.activate(Arc::clone(&v1));
        invoke(&w.pool, &key, "hello").await.unwrap();
        // A request in flight on v1 when v2 arrives finishes on v1; then v1's instance goes.
        let busy = {
            let pool = Arc::clone(&w.pool);
            let key = key.clone();
            tokio::spawn(async move { invoke(&pool, &key, "sleep 0.5").await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut v2 = (*v1).clone();
        v2.version = "v2".into();
        w.pool.activate(Arc::new(v2));
        let (rid, body) = invoke(&w.pool, &key, "hello").await.unwrap();
        assert_eq!(body, format!("ok {rid}"));
        busy.await
            .unwrap()
            .expect("the request on the old version completes");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let versions: Vec<String> = w
                .pool
                .instances(&key)
                .into_iter()
                .map(|i| i.version)
                .collect();
            if versions == ["v2"] {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{versions:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.pool.remove(&key);
        assert!(w.pool.instances(&key).is_empty());
        assert!(matches!(
            invoke(&w.pool, &key, "hello").await.unwrap_err(),
            InvokeError::NotActive
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while w.pool.committed_mib() != 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "memory still committed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        w.pool.shutdown().await;
    });
}

#[test]
fn an_unreachable_warm_instance_is_replaced_and_the_event_still_delivered() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    runtime().block_on(async {
        let w = world(PoolConfig::default());
        let v = version("unreachable", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        invoke(&w.pool, &key, "hello").await.unwrap();
        let broken = w.pool.instances(&key)[0].id.clone();
        // Its port 9000 can no longer be reached, though its processes live on.
        let socket = crate::sandbox::instances_root(&w.home)
            .unwrap()
            .join(&broken)
            .join("sock/9000.sock");
        std::fs::remove_file(&socket).unwrap();
        let (rid, body) = invoke(&w.pool, &key, "hello").await.unwrap();
        assert_eq!(body, format!("ok {rid}"));
        let now: Vec<String> = w.pool.instances(&key).into_iter().map(|i| i.id).collect();
        assert_eq!(now.len(), 1);
        assert_ne!(now[0], broken);
        w.pool.shutdown().await;
    });
}

#[test]
fn a_pool_dropped_without_shutdown_still_stops_its_instances() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let rt = runtime();
    let w = rt.block_on(async {
        let w = world(PoolConfig::default());
        let v = version("dropped", serde_json::json!({"max_instances": 2}));
        let key = v.key.clone();
        w.pool.activate(v);
        let (a, b) = tokio::join!(
            invoke(&w.pool, &key, "sleep 0.2"),
            invoke(&w.pool, &key, "sleep 0.2")
        );
        a.unwrap();
        b.unwrap();
        assert_eq!(w.pool.instances(&key).len(), 2);
        w
    });
    let instances_dir = crate::sandbox::instances_root(&w.home).unwrap();
    let World { pool, _tmp, .. } = w;
    drop(pool);
    let left: Vec<_> = std::fs::read_dir(&instances_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "instances left: {left:?}");
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(
            !cmdline.contains(&*instances_dir.to_string_lossy()),
            "process left: {cmdline}"
        );
    }
}
