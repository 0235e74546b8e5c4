//! The pool's capacity policy against a fake [`Sandbox`]: no root, no processes. Each fake
//! instance is a tiny HTTP/1.1 responder on a Unix socket of the test's directory, reached
//! through [`Instance::connect`] as the agent's bridge would be; the sandbox counts its starts
//! and lets a test crash an instance or fail the next start.
//!
//! The responder reads the event body as a command: `sleep MS` waits before answering, `crash`
//! ends the instance mid-request (exit report, streams cut), `malformed`, `twice` and
//! `never-ends` answer badly (not HTTP; a second answer nobody asked for; 10 of 100 bytes, then
//! silence); it prints a line naming the request id (as the agent reports a function's line)
//! and answers `ok <request id>`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::StatusCode;

use crate::sandbox::{
    ColdStart, ExitReport, Instance, InstanceSpec, LogLine, LogStream, RestoreReport, Sandbox,
    SandboxError, SandboxKind, StartInfo,
};
use crate::service::logs::LogQuery;
use crate::service::model::{FunctionKey, FunctionVersion};
use crate::service::pool::{InvokeError, Limit, Pool, PoolConfig};

use super::{world_on, World};

/// What a fake instance and its sandbox share.
struct Shared {
    id: String,
    exit: Mutex<Option<ExitReport>>,
    exited: Condvar,
    /// Streams open to the responder, cut when the instance ends.
    streams: Mutex<Vec<UnixStream>>,
    stopped_by_pool: AtomicBool,
}

impl Shared {
    /// Ends the instance with `reason` (once) and cuts its streams.
    fn end(&self, reason: &str, last_lines: Vec<String>) {
        let mut exit = self.exit.lock().unwrap();
        if exit.is_none() {
            *exit = Some(ExitReport {
                code: None,
                signal: Some(9),
                last_lines,
                reason: reason.to_string(),
            });
        }
        drop(exit);
        self.exited.notify_all();
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn is_over(&self) -> bool {
        self.exit.lock().unwrap().is_some()
    }
}

/// The fake sandbox: instances are threads answering on Unix sockets.
#[derive(Default)]
struct FakeSandbox {
    dir: PathBuf,
    starts: AtomicUsize,
    /// The next start fails with [`SandboxError::StartFailed`].
    fail_next: AtomicBool,
    instances: Mutex<HashMap<String, Arc<Shared>>>,
}

impl FakeSandbox {
    fn new(dir: PathBuf) -> Arc<Self> {
        Arc::new(Self {
            dir,
            ..Default::default()
        })
    }

    fn starts(&self) -> usize {
        self.starts.load(Ordering::SeqCst)
    }

    fn instance(&self, id: &str) -> Arc<Shared> {
        Arc::clone(&self.instances.lock().unwrap()[id])
    }

    /// Instances not ended yet.
    fn live(&self) -> usize {
        let all = self.instances.lock().unwrap();
        all.values().filter(|s| !s.is_over()).count()
    }
}

impl Sandbox for FakeSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Process
    }

    fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, SandboxError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(SandboxError::StartFailed {
                message: "the fake refused to start".into(),
                last_lines: vec!["fake: no luck".into()],
            });
        }
        self.starts.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("{}.sock", spec.id));
        let listener = UnixListener::bind(&path).expect("a socket in the test's directory");
        let shared = Arc::new(Shared {
            id: spec.id.clone(),
            exit: Mutex::new(None),
            exited: Condvar::new(),
            streams: Mutex::new(Vec::new()),
            stopped_by_pool: AtomicBool::new(false),
        });
        self.instances
            .lock()
            .unwrap()
            .insert(spec.id.clone(), Arc::clone(&shared));
        let serving = Arc::clone(&shared);
        let on_log = Arc::clone(&spec.on_log);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                if serving.is_over() {
                    return;
                }
                if let Ok(clone) = conn.try_clone() {
                    serving.streams.lock().unwrap().push(clone);
                }
                let serving = Arc::clone(&serving);
                let on_log = Arc::clone(&on_log);
                std::thread::spawn(move || respond(conn, &serving, &*on_log));
            }
        });
        Ok(Box::new(FakeInstance { shared, path }))
    }
}

/// Answers requests on one stream, keep-alive, until it closes or the instance ends.
fn respond(conn: UnixStream, instance: &Shared, on_log: &(dyn Fn(LogLine) + Send + Sync)) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut len = 0usize;
        let mut rid = String::new();
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if first {
                first = false;
                continue;
            }
            let lower = line.trim_end().to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            } else if let Some(v) = lower.strip_prefix("x-scf-request-id:") {
                rid = v.trim().to_string();
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        on_log(LogLine {
            stream: LogStream::Stderr,
            unix_time_us: crate::sandbox::link::clock::host_now_us(),
            line: format!("handling {rid}"),
            after_request: Some(Arc::from(rid.as_str())),
        });
        if let Some(ms) = body.strip_prefix("sleep ") {
            std::thread::sleep(Duration::from_millis(ms.trim().parse().unwrap()));
        }
        if body == "crash" {
            instance.end("killed by signal 9", vec![format!("dying in {rid}")]);
            return;
        }
        // Bad answers of a live function (the instance does not end).
        let bad: Option<&[u8]> = match body.as_str() {
            "malformed" => Some(b"HTTP/1.1 abc garbage\r\n\r\n"),
            "never-ends" => Some(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"),
            "twice" => Some(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst\
                  HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond",
            ),
            _ => None,
        };
        if let Some(bytes) = bad {
            if conn.write_all(bytes).is_err() {
                return;
            }
            if body == "never-ends" {
                // Keeps the stream open, silent, until the pool gives up on it.
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest);
                return;
            }
            continue;
        }
        let out = format!("ok {rid}");
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{out}",
            out.len()
        );
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

struct FakeInstance {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl Instance for FakeInstance {
    fn id(&self) -> &str {
        &self.shared.id
    }

    fn connect(&self) -> std::io::Result<UnixStream> {
        if let Some(report) = self.exited() {
            return Err(std::io::Error::other(report.reason));
        }
        UnixStream::connect(&self.path)
    }

    fn wait_exit(&self) -> ExitReport {
        let mut exit = self.shared.exit.lock().unwrap();
        loop {
            if let Some(report) = exit.as_ref() {
                return report.clone();
            }
            exit = self.shared.exited.wait(exit).unwrap();
        }
    }

    fn exited(&self) -> Option<ExitReport> {
        self.shared.exit.lock().unwrap().clone()
    }

    fn stop(&self) -> Result<(), SandboxError> {
        self.shared.stopped_by_pool.store(true, Ordering::SeqCst);
        self.shared.end("stopped", Vec::new());
        // Wakes the accept loop so it sees the end.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
        Ok(())
    }

    fn start_info(&self) -> StartInfo {
        StartInfo {
            kind: ColdStart::Boot,
            note: None,
            phases: Vec::new(),
        }
    }

    fn restore_report(&self) -> Option<RestoreReport> {
        None
    }
}

/// A pool on a fake sandbox.
type FakeWorld = World<FakeSandbox>;

fn fake_world(cfg: PoolConfig) -> FakeWorld {
    world_on(cfg, |_, scratch| FakeSandbox::new(scratch.to_path_buf()))
}

/// A function version for the fake (its image and start spec are never looked at).
fn fake_version(name: &str, spec_json: serde_json::Value) -> Arc<FunctionVersion> {
    super::version_on(name, spec_json, PathBuf::from("/nonexistent/fake.img"))
}

fn config(budget_mib: u64, queue_ms: u64) -> PoolConfig {
    PoolConfig {
        memory_budget_mib: budget_mib,
        idle_timeout: Duration::from_secs(300),
        queue_timeout: Duration::from_millis(queue_ms),
    }
}

async fn call(pool: &Pool, key: &FunctionKey, body: &str) -> Result<String, InvokeError> {
    let rid = uuid::Uuid::new_v4().to_string();
    let resp = pool
        .invoke_event(key, &rid, Bytes::from(body.to_string()), false)
        .await?;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, format!("ok {rid}"));
    Ok(rid)
}

/// `n` invocations with `body` at once, as tasks.
fn at_once(
    pool: &Arc<Pool>,
    key: &FunctionKey,
    n: usize,
    body: &'static str,
) -> Vec<tokio::task::JoinHandle<Result<String, InvokeError>>> {
    (0..n)
        .map(|_| {
            let pool = Arc::clone(pool);
            let key = key.clone();
            tokio::spawn(async move { call(&pool, &key, body).await })
        })
        .collect()
}

/// Waits for every task of [`at_once`]; each must succeed.
async fn all_ok(calls: Vec<tokio::task::JoinHandle<Result<String, InvokeError>>>) {
    for c in calls {
        c.await.unwrap().unwrap();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Polls `cond` every 10 ms for up to 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn concurrent_invocations_scale_out_to_max_instances_and_no_further() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version("wide", serde_json::json!({"max_instances": 3}));
        let key = v.key.clone();
        w.pool.activate(v);
        let calls = at_once(&w.pool, &key, 9, "sleep 150");
        let mut peak = 0;
        while !calls.iter().all(|c| c.is_finished()) {
            peak = peak.max(w.pool.instances(&key).len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        all_ok(calls).await;
        assert_eq!(w.sandbox.starts(), 3, "one instance per slot up to the cap");
        assert!(peak <= 3, "{peak} instances");
        assert_eq!(w.pool.committed_mib(), 3 * 64);
        w.pool.shutdown().await;
        assert_eq!(w.sandbox.live(), 0);
        assert_eq!(w.pool.committed_mib(), 0);
    });
}

#[test]
fn requests_waiting_for_a_busy_function_are_served_in_the_order_they_came() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 10_000));
        let v = fake_version("single", serde_json::json!({"max_instances": 1}));
        let key = v.key.clone();
        w.pool.activate(v);
        let busy = at_once(&w.pool, &key, 1, "sleep 300");
        eventually("the instance is busy", || {
            w.pool.instances(&key).iter().any(|i| i.in_flight == 1)
        })
        .await;
        // Eight callers queue up one after the other while the instance is busy.
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut waiting = Vec::new();
        for n in 0..8 {
            let (pool, key, served) = (Arc::clone(&w.pool), key.clone(), Arc::clone(&served));
            waiting.push(tokio::spawn(async move {
                call(&pool, &key, "sleep 5").await.unwrap();
                served.lock().unwrap().push(n);
            }));
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        all_ok(busy).await;
        for t in waiting {
            t.await.unwrap();
        }
        assert_eq!(*served.lock().unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(w.sandbox.starts(), 1);
        w.pool.shutdown().await;
    });
}

#[test]
fn a_warm_idle_instance_is_reused_rather_than_a_new_one_started() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version("warm", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        for _ in 0..5 {
            call(&w.pool, &key, "hi").await.unwrap();
        }
        assert_eq!(w.sandbox.starts(), 1);
        let info = w.pool.instances(&key);
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].state, "idle");
        w.pool.shutdown().await;
    });
}

#[test]
fn the_memory_budget_caps_instances_and_the_rest_queue_until_a_slot_frees() {
    runtime().block_on(async {
        // Room for two 64 MiB instances though the function may have ten.
        let w = fake_world(config(128, 5000));
        let v = fake_version("tight", serde_json::json!({"max_instances": 10}));
        let key = v.key.clone();
        w.pool.activate(v);
        let calls = at_once(&w.pool, &key, 5, "sleep 100");
        let mut peak = 0;
        while !calls.iter().all(|c| c.is_finished()) {
            peak = peak.max(w.pool.committed_mib());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        all_ok(calls).await;
        assert!(peak <= 128, "committed {peak} MiB of a 128 MiB budget");
        assert_eq!(w.sandbox.starts(), 2);
        w.pool.shutdown().await;
    });
}

#[test]
fn a_request_that_finds_no_capacity_gets_overloaded_after_the_queue_timeout() {
    runtime().block_on(async {
        let w = fake_world(config(64, 300));
        let one = fake_version("one", serde_json::json!({"max_instances": 1}));
        let other = fake_version("other", serde_json::json!({}));
        let (key, other_key) = (one.key.clone(), other.key.clone());
        w.pool.activate(one);
        w.pool.activate(other);
        let busy = {
            let pool = Arc::clone(&w.pool);
            let key = key.clone();
            tokio::spawn(async move { call(&pool, &key, "sleep 1500").await })
        };
        eventually("the first request holds the only instance", || {
            w.pool.instances(&key).iter().any(|i| i.state == "busy")
        })
        .await;
        // Its own cap.
        let asked = Instant::now();
        let err = call(&w.pool, &key, "hi").await.unwrap_err();
        let waited = asked.elapsed();
        assert!(
            matches!(
                &err,
                InvokeError::Overloaded {
                    limit: Limit::MaxInstances(1),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_millis(1400), "{waited:?}");
        assert_eq!(err.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(err.code(), "TooManyRequests");
        assert_eq!(err.retry_after_secs(), Some(1));
        // The budget: the busy instance holds all of it and cannot be reclaimed.
        let err = call(&w.pool, &other_key, "hi").await.unwrap_err();
        assert!(
            matches!(
                &err,
                InvokeError::Overloaded {
                    limit: Limit::MemoryBudget {
                        budget_mib: 64,
                        needed_mib: 64
                    },
                    ..
                }
            ),
            "{err:?}"
        );
        busy.await.unwrap().unwrap();
        // Queued within the timeout: served once the instance is free.
        let pool = Arc::clone(&w.pool);
        let k = key.clone();
        let first = tokio::spawn(async move { call(&pool, &k, "sleep 100").await });
        eventually("busy again", || {
            w.pool.instances(&key).iter().any(|i| i.state == "busy")
        })
        .await;
        call(&w.pool, &key, "hi").await.unwrap();
        first.await.unwrap().unwrap();
        assert_eq!(w.sandbox.starts(), 1);
        w.pool.shutdown().await;
    });
}

#[test]
fn an_idle_instance_of_another_function_is_reclaimed_to_make_room() {
    runtime().block_on(async {
        let w = fake_world(config(128, 5000));
        let a = fake_version("a", serde_json::json!({}));
        let b = fake_version("b", serde_json::json!({}));
        let (ka, kb) = (a.key.clone(), b.key.clone());
        w.pool.activate(a);
        w.pool.activate(b);
        // a fills the budget with two instances, then both go idle.
        let two = at_once(&w.pool, &ka, 2, "sleep 100");
        all_ok(two).await;
        let a_ids: Vec<String> = w.pool.instances(&ka).into_iter().map(|i| i.id).collect();
        assert_eq!(a_ids.len(), 2);
        // Use the second one last: the first is the least recently used.
        call(&w.pool, &ka, "hi").await.unwrap();
        // b needs 64 MiB: a's least recently used idle instance goes for it.
        call(&w.pool, &kb, "hi").await.unwrap();
        let a_left = w.pool.instances(&ka);
        assert_eq!(a_left.len(), 1, "{a_left:?}");
        assert_eq!(w.pool.instances(&kb).len(), 1);
        let gone = a_ids.iter().find(|id| **id != a_left[0].id).unwrap();
        assert!(w
            .sandbox
            .instance(gone)
            .stopped_by_pool
            .load(Ordering::SeqCst));
        assert!(w.pool.committed_mib() <= 128);
        w.pool.shutdown().await;
    });
}

#[test]
fn provisioned_instances_are_not_reclaimed_for_others() {
    runtime().block_on(async {
        let w = fake_world(config(64, 300));
        let kept = fake_version("kept", serde_json::json!({"provisioned_concurrency": 1}));
        let other = fake_version("other", serde_json::json!({}));
        let (kk, ko) = (kept.key.clone(), other.key.clone());
        w.pool.activate(kept);
        w.pool.activate(other);
        eventually("the provisioned instance is up", || {
            w.pool.instances(&kk).iter().any(|i| i.state == "idle")
        })
        .await;
        let err = call(&w.pool, &ko, "hi").await.unwrap_err();
        assert!(
            matches!(
                &err,
                InvokeError::Overloaded {
                    limit: Limit::MemoryBudget { .. },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(w.pool.instances(&kk).len(), 1);
        w.pool.shutdown().await;
    });
}

#[test]
fn a_busy_function_over_its_fair_share_gives_an_instance_back_to_a_waiting_one() {
    runtime().block_on(async {
        let w = fake_world(config(128, 5000));
        let busy = fake_version("busy", serde_json::json!({}));
        let waiting = fake_version("waiting", serde_json::json!({}));
        let (kb, kw) = (busy.key.clone(), waiting.key.clone());
        w.pool.activate(busy);
        w.pool.activate(waiting);
        // busy holds the whole budget with two requests in flight.
        let hogs = at_once(&w.pool, &kb, 2, "sleep 400");
        eventually("two busy instances", || {
            w.pool
                .instances(&kb)
                .iter()
                .filter(|i| i.state == "busy")
                .count()
                == 2
        })
        .await;
        // waiting queues for memory; as busy's requests end, busy (over its half) gives an
        // instance back instead of keeping it idle.
        let asked = Instant::now();
        call(&w.pool, &kw, "hi").await.unwrap();
        assert!(asked.elapsed() < Duration::from_secs(3));
        all_ok(hogs).await;
        assert_eq!(w.pool.instances(&kw).len(), 1);
        eventually("busy is down to its share", || {
            w.pool.instances(&kb).len() <= 1
        })
        .await;
        assert!(w.pool.committed_mib() <= 128);
        w.pool.shutdown().await;
    });
}

#[test]
fn idle_instances_beyond_the_provisioned_ones_are_stopped_after_the_idle_timeout() {
    runtime().block_on(async {
        let mut cfg = config(4096, 5000);
        cfg.idle_timeout = Duration::from_millis(200);
        let w = fake_world(cfg);
        let plain = fake_version("plain", serde_json::json!({}));
        let kept = fake_version("kept", serde_json::json!({"provisioned_concurrency": 1}));
        let (kp, kk) = (plain.key.clone(), kept.key.clone());
        w.pool.activate(plain);
        w.pool.activate(kept);
        // Two instances of each (two requests at once).
        for key in [&kp, &kk] {
            all_ok(at_once(&w.pool, key, 2, "sleep 100")).await;
        }
        eventually("the idle ones are reaped", || {
            w.pool.instances(&kp).is_empty() && w.pool.instances(&kk).len() == 1
        })
        .await;
        // The provisioned one stays well past the timeout.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(w.pool.instances(&kk).len(), 1);
        eventually("reaped memory is released", || w.pool.committed_mib() == 64).await;
        w.pool.shutdown().await;
    });
}

#[test]
fn an_instance_crashing_mid_request_is_a_crash_error_and_is_replaced() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version("fragile", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        call(&w.pool, &key, "hi").await.unwrap();
        let victim = w.pool.instances(&key)[0].id.clone();
        let err = call(&w.pool, &key, "crash").await.unwrap_err();
        match &err {
            InvokeError::Crashed { detail } => {
                assert!(detail.contains(&victim), "{detail}");
                assert!(detail.contains("killed by signal 9"), "{detail}");
                assert!(detail.contains("dying in"), "{detail}");
            }
            other => panic!("expected a crash, got {other:?}"),
        }
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(err.code(), "FunctionCrashed");
        call(&w.pool, &key, "hi").await.unwrap();
        let now = w.pool.instances(&key);
        assert_eq!(now.len(), 1);
        assert_ne!(now[0].id, victim);
        assert_eq!(w.sandbox.starts(), 2);
        w.pool.shutdown().await;
    });
}

#[test]
fn an_instance_that_ends_while_idle_is_retired_and_its_memory_released() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version("quitter", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        call(&w.pool, &key, "hi").await.unwrap();
        let id = w.pool.instances(&key)[0].id.clone();
        w.sandbox
            .instance(&id)
            .end("exited with code 1", Vec::new());
        eventually("the watcher retires it", || {
            w.pool.instances(&key).is_empty()
        })
        .await;
        eventually("its memory is released", || w.pool.committed_mib() == 0).await;
        call(&w.pool, &key, "hi").await.unwrap();
        assert_eq!(w.sandbox.starts(), 2);
        w.pool.shutdown().await;
    });
}

#[test]
fn a_failed_start_says_why_with_the_last_lines_and_releases_its_memory() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version("broken", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        w.sandbox.fail_next.store(true, Ordering::SeqCst);
        let err = call(&w.pool, &key, "hi").await.unwrap_err();
        assert_eq!(err.code(), "FunctionStartFailed");
        assert_eq!(err.status(), StatusCode::BAD_GATEWAY);
        let message = err.to_string();
        assert!(message.contains("the fake refused to start"), "{message}");
        assert!(message.contains("fake: no luck"), "{message}");
        assert_eq!(w.pool.committed_mib(), 0);
        assert!(w.pool.instances(&key).is_empty());
        call(&w.pool, &key, "hi").await.unwrap();
        w.pool.shutdown().await;
    });
}

#[test]
fn a_timed_out_request_destroys_its_instance() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version("slow", serde_json::json!({"timeout_s": 1}));
        let key = v.key.clone();
        w.pool.activate(v);
        let err = call(&w.pool, &key, "sleep 1500").await.unwrap_err();
        assert!(matches!(err, InvokeError::Timeout { secs: 1 }), "{err:?}");
        assert_eq!(err.status(), StatusCode::GATEWAY_TIMEOUT);
        eventually("the timed-out instance is gone", || {
            w.pool.instances(&key).is_empty() && w.sandbox.live() == 0
        })
        .await;
        call(&w.pool, &key, "hi").await.unwrap();
        w.pool.shutdown().await;
    });
}

/// Bad answers of a live function fail their own caller with the design's error, and never
/// the other callers (busy on another instance meanwhile) or the next one.
#[test]
fn a_bad_answer_fails_only_its_own_caller() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version(
            "sloppy",
            serde_json::json!({"max_instances": 2, "timeout_s": 1}),
        );
        let key = v.key.clone();
        w.pool.activate(v);
        for (what, status) in [
            ("malformed", StatusCode::BAD_GATEWAY),
            ("never-ends", StatusCode::GATEWAY_TIMEOUT),
        ] {
            // Another caller, served meanwhile on the other instance.
            let other = at_once(&w.pool, &key, 1, "sleep 300");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let started = Instant::now();
            let err = call(&w.pool, &key, what).await.unwrap_err();
            assert_eq!(err.status(), status, "{what}: {err:?}");
            assert!(started.elapsed() < Duration::from_secs(5), "{what}");
            all_ok(other).await;
            call(&w.pool, &key, "hi").await.unwrap();
        }
        // The answer nobody asked for never reaches the next caller of that instance.
        let rid = uuid::Uuid::new_v4().to_string();
        let resp = w
            .pool
            .invoke_event(&key, &rid, Bytes::from_static(b"twice"), false)
            .await
            .unwrap();
        let text = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, "first");
        for _ in 0..4 {
            call(&w.pool, &key, "hi").await.unwrap();
        }
        w.pool.shutdown().await;
    });
}

#[test]
fn each_request_gets_the_log_lines_printed_while_it_ran() {
    runtime().block_on(async {
        let w = fake_world(config(4096, 5000));
        let v = fake_version("chatty", serde_json::json!({}));
        let key = v.key.clone();
        w.pool.activate(v);
        let mut rids = Vec::new();
        for _ in 0..4 {
            rids.push(call(&w.pool, &key, "hi").await.unwrap());
        }
        for rid in &rids {
            let lines = w.logs.query(
                &key,
                LogQuery {
                    request_id: Some(rid.clone()),
                    ..LogQuery::default()
                },
            );
            assert_eq!(lines.len(), 1, "{rid}: {lines:?}");
            assert_eq!(lines[0].line, format!("handling {rid}"));
        }
        w.pool.shutdown().await;
    });
}
