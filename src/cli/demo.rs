//! `fnvm demo`: the embedded default. Builds the bundled example function's image
//! (examples/hello, packed into an OCI layout under the home), runs it with the machinery of
//! `fnvm run` in the default sandbox, invokes it as an event twice (the first invocation after
//! the start, then a warm one), prints the replies, the function's log lines and the timings,
//! and stops cleanly.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::run::{self, LaunchOptions, RegistryArgs};
use crate::example_image;
use crate::function::FunctionSettings;
use crate::home::Home;
use crate::http_front::FunctionType;
use crate::sandbox::{self, LogLine, SandboxKind};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where the example runs (default: vm where the host has VMX/SVM, else process).
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxKind>,
}

/// The event the demo sends.
const EVENT: &str = r#"{"greeting":"hello from fnvm demo","n":1}"#;

pub fn run(home: &Home, args: DemoArgs) -> Result<ExitCode> {
    let kind = args.sandbox.unwrap_or_else(sandbox::default_kind);
    eprintln!("fnvm demo: building the example function's image (examples/hello)");
    let reference = example_image::ensure_example_image(&home.dir("examples")?)
        .context("cannot build the example image")?;
    let pulled = run::pull_image(home, &reference, &RegistryArgs::default())?;

    // Log lines are printed as they come and kept, so the demo can wait for the function's
    // line about each invocation before it stops.
    let logs: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
    let sink = Arc::clone(&logs);
    let on_log = Arc::new(move |line: LogLine| {
        run::print_log_line(&line);
        let (lines, changed) = &*sink;
        lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.line);
        changed.notify_all();
    });
    eprintln!("fnvm demo: starting it in the {kind} sandbox");
    let session = match run::launch(
        home,
        &pulled,
        LaunchOptions {
            kind,
            settings: FunctionSettings::local("hello"),
            function_type: FunctionType::Event,
            listen: "127.0.0.1:0".parse().expect("a valid address"),
            on_log,
            on_invocation: None,
        },
    ) {
        Ok(s) => s,
        Err(e) => return run::report_launch_error(e),
    };
    eprintln!(
        "fnvm demo: started in {} ms ({}, {kind} sandbox); invoking it on http://{}",
        session.start_time.as_millis(),
        run::start_kind_label(kind),
        session.addr
    );

    let start_time = session.start_time;
    let outcome = invoke_twice(session.addr, &logs);
    let stopped = session.stop();
    let (first, warm) = outcome?;
    stopped?;

    println!();
    println!("reply ({} {}):", first.status, first.request_id);
    println!("  {}", first.body.trim_end());
    println!();
    println!("timings ({kind} sandbox)");
    println!(
        "  {:<28} {:>9.1} ms",
        format!("{}:", run::start_kind_label(kind)),
        ms(start_time)
    );
    println!(
        "  {:<28} {}",
        "snapshot start:",
        match kind {
            SandboxKind::Vm => "not measured (snapshots are not wired into run yet)",
            SandboxKind::Process => "n/a (the process sandbox has no snapshots)",
        }
    );
    println!(
        "  {:<28} {:>9.2} ms",
        "first invocation:",
        ms(first.elapsed)
    );
    println!("  {:<28} {:>9.2} ms", "warm invocation:", ms(warm.elapsed));
    println!();
    println!("stopped; the instance and its writable layer are removed");
    Ok(ExitCode::SUCCESS)
}

struct Reply {
    status: u16,
    request_id: String,
    body: String,
    elapsed: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn invoke_twice(
    addr: SocketAddr,
    logs: &Arc<(Mutex<Vec<String>>, Condvar)>,
) -> Result<(Reply, Reply)> {
    let first = invoke(addr, EVENT)?;
    let warm = invoke(addr, EVENT)?;
    for reply in [&first, &warm] {
        if reply.status != 200 {
            bail!(
                "the example function answered {}: {}",
                reply.status,
                reply.body.trim_end()
            );
        }
        wait_for_log(logs, &reply.request_id, Duration::from_secs(2));
    }
    Ok((first, warm))
}

/// Waits (bounded) until the function has logged a line naming `request_id`.
fn wait_for_log(logs: &Arc<(Mutex<Vec<String>>, Condvar)>, request_id: &str, limit: Duration) {
    let (lines, changed) = &**logs;
    let deadline = Instant::now() + limit;
    let mut guard = lines.lock().unwrap_or_else(|e| e.into_inner());
    while !guard.iter().any(|l| l.contains(request_id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        guard = changed
            .wait_timeout(guard, left)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// One event invocation through the front over TCP, as any client would send it.
fn invoke(addr: SocketAddr, event: &str) -> Result<Reply> {
    let started = Instant::now();
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{event}",
        event.len()
    )?;
    let mut raw = Vec::new();
    stream
        .read_to_end(&mut raw)
        .context("reading the function's reply")?;
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the reply has no HTTP head")?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("the reply has no status line")?;
    let request_id = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("x-scf-request-id"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    Ok(Reply {
        status,
        request_id,
        body: body.to_string(),
        elapsed,
    })
}
