//! `fnvm demo`: the embedded default. Builds the bundled example function's image
//! (examples/hello, packed into an OCI layout under the home), runs it with the machinery of
//! `fnvm run` in the default sandbox, invokes it as an event twice (the first invocation after
//! the start, then a warm one), and stops it. In the vm sandbox that first start also writes
//! the example's snapshot, and a second instance is started from it and invoked. Prints the
//! replies, the function's log lines and the boot / snapshot / warm timings.

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
use crate::invoke::FunctionType;
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
    let hello = crate::agent_binary::static_binary(
        "fnvm-hello",
        "FNVM_HELLO_BIN",
        example_image::HELLO_BUILD_COMMAND,
    )?;
    let reference = example_image::ensure_example_image(&home.dir("examples")?, &hello)
        .context("cannot build the example image")?;
    let pulled = run::pull_image(home, &reference, &RegistryArgs::default())?;

    // Log lines are printed as they come and kept, so the demo can wait for the function's
    // line about each invocation before it stops.
    let logs: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
    let sink = Arc::clone(&logs);
    let on_log: Arc<dyn Fn(LogLine) + Send + Sync> = Arc::new(move |line: LogLine| {
        run::print_log_line(&line);
        let (lines, changed) = &*sink;
        lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line.line);
        changed.notify_all();
    });
    eprintln!("fnvm demo: starting it in the {kind} sandbox");
    // In a VM the first start boots and writes the example's snapshot (unless an earlier demo
    // did), and a second instance then starts from that snapshot.
    let snapshots = kind == SandboxKind::Vm;
    let options = |on_log| LaunchOptions {
        kind,
        settings: FunctionSettings::local("hello"),
        function_type: FunctionType::Event,
        listen: "127.0.0.1:0".parse().expect("a valid address"),
        on_log,
        on_invocation: None,
        snapshot: snapshots,
        connections: crate::http_server::ConnectionLimits::default(),
        sandbox: None,
        network: Default::default(),
    };
    let session = match run::launch(home, &pulled, options(on_log.clone())) {
        Ok(s) => s,
        Err(e) => return run::report_launch_error(e),
    };
    let first_start = Started::of(&session, kind);
    eprintln!(
        "fnvm demo: started in {:.1} ms ({}, {kind} sandbox); invoking it on http://{}",
        ms(first_start.time),
        first_start.label,
        session.addr
    );
    if let Some(note) = &first_start.note {
        eprintln!("fnvm demo: {note}");
    }
    let outcome = invoke_twice(session.addr, &logs);
    let stopped = session.stop();
    let (first, warm) = outcome?;
    stopped?;

    let second = if snapshots {
        eprintln!("fnvm demo: starting a second instance from the snapshot");
        let session = match run::launch(home, &pulled, options(on_log)) {
            Ok(s) => s,
            Err(e) => return run::report_launch_error(e),
        };
        let started = Started::of(&session, kind);
        if let Some(note) = &started.note {
            eprintln!("fnvm demo: {note}");
        }
        let reply = invoke(session.addr, EVENT).and_then(|r| {
            if r.status != 200 {
                bail!(
                    "the restored function answered {}: {}",
                    r.status,
                    r.body.trim_end()
                );
            }
            wait_for_log(&logs, &r.request_id, Duration::from_secs(2));
            Ok(r)
        });
        let restore = session.instance.restore_report();
        let stopped = session.stop();
        let reply = reply?;
        stopped?;
        Some((started, reply, restore))
    } else {
        None
    };

    println!();
    println!("reply ({} {}):", first.status, first.request_id);
    println!("  {}", first.body.trim_end());
    println!();
    println!("timings ({kind} sandbox)");
    let row = |label: &str, value: String| println!("  {:<34} {value}", format!("{label}:"));
    row(
        first_start.label,
        format!("{:>9.1} ms", ms(first_start.time)),
    );
    row(
        "  first invocation",
        format!("{:>9.2} ms", ms(first.elapsed)),
    );
    row("  warm invocation", format!("{:>9.2} ms", ms(warm.elapsed)));
    match &second {
        Some((started, reply, restore)) => {
            row(started.label, format!("{:>9.1} ms", ms(started.time)));
            row(
                "  first invocation",
                format!("{:>9.2} ms", ms(reply.elapsed)),
            );
            if let Some(r) = restore {
                row(
                    "  VMM start → guest resumed",
                    format!("{:>9.2} ms", r.resume_ms),
                );
                row(
                    "  guest pages faulted in",
                    format!("{:>9} before the first reply", r.pages_faulted),
                );
            }
        }
        None => row(
            "snapshot start",
            "n/a (the process sandbox has no snapshots)".into(),
        ),
    }
    println!();
    println!("stopped; the instances and their writable layers are removed");
    Ok(ExitCode::SUCCESS)
}

/// How a demo instance started.
struct Started {
    label: &'static str,
    time: Duration,
    note: Option<String>,
}

impl Started {
    fn of(session: &run::Session, kind: SandboxKind) -> Self {
        let info = session.instance.start_info();
        Started {
            label: run::start_kind_label(kind, &info),
            time: session.start_time,
            note: info.note,
        }
    }
}

pub(super) struct Reply {
    pub status: u16,
    pub request_id: String,
    pub body: String,
    pub elapsed: Duration,
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
    call(addr, "POST", event)
}

/// One request to the front over TCP (a new connection, closed after the reply), timed from
/// connecting to the reply's last byte.
pub(super) fn call(addr: SocketAddr, method: &str, body: &str) -> Result<Reply> {
    let started = Instant::now();
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
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
