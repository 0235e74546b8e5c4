//! `bridge`: warm request latency and throughput through `fnvm run`'s path
//! (client → fnvm's HTTP front → one stream per request → agent bridge → 127.0.0.1:9000 in the
//! sandbox → the example function), side by side with the same server binary reached directly
//! over host loopback TCP. Process sandbox here (VM where the host has VMX/SVM: pass
//! `--sandbox vm`).
//!
//! Latency: one keep-alive client connection, sequential `GET /` requests, p50/p99 of each
//! round trip. Throughput: wrk (Debian package `wrk`), 2 threads, 16 connections, 5 s.
//! Targets: added p50 < 100 µs; fnvm throughput ≥ 70 % of loopback. The peer proxy: nginx
//! (Debian's, see [`fnvm_benches::nginx`]) in front of the same server on loopback, one
//! layer-7 hop like fnvm's, so the table also says what any good proxy costs.
//!
//! Then the same for a Python `http.server` (the test image's server: HTTP/1.1, head and body
//! written in two `write`s, Nagle on, as most users' servers are), run by the host's python3
//! on loopback and through `fnvm run`: a new client connection per call (as curl makes) and
//! keep-alive calls, p50/p99, and wrk; then the same server's other answering habits (chunked,
//! `Connection: close`, HTTP/1.0 close-delimited). Target: a warm call adds < 0.5 ms at p50.
//!
//! Needs root and a release build: `cargo build --release -p fnvm && cargo run --release -p
//! fnvm-benches --bin bridge`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fnvm_benches::{missed, quantile, Table};

const WARMUP: usize = 500;
const SAMPLES: usize = 5000;
/// How the python server answers, by path: what users' servers do (`/` is the keep-alive,
/// Content-Length answer of the main rows), and whether the connection then stays open.
const HABITS: &[(&str, &str, bool)] = &[
    ("Content-Length, kept alive", "/", true),
    ("chunked", "/habit/chunked", true),
    ("Connection: close", "/habit/close", false),
    ("HTTP/1.0, close-delimited", "/habit/http10", false),
];
/// Python answers in ~1 ms: fewer samples keep its rows to seconds.
const PYTHON_WARMUP: usize = 20;
const PYTHON_SAMPLES: usize = 300;

fn main() -> Result<()> {
    let sandbox = std::env::args()
        .skip_while(|a| a != "--sandbox")
        .nth(1)
        .unwrap_or_else(|| "process".into());
    let fnvm = fnvm_binary()?;
    let agent = fnvm_testkit::static_binary(&fnvm, "fnvm-agent", "FNVM_AGENT_BIN");
    let hello = fnvm_testkit::static_binary(&fnvm, "fnvm-hello", "FNVM_HELLO_BIN");
    std::env::set_var("FNVM_HELLO_BIN", &hello);
    let work = fnvm_testkit::target_dir(&fnvm).join("bench-bridge");
    std::fs::create_dir_all(&work)?;
    let image = fnvm::example_image::ensure_example_image(&work.join("images"), &hello)?;
    let home = work.join("home");

    // The same server binary on host loopback.
    let port = free_port()?;
    let loopback_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let direct = Server(
        Command::new(&hello)
            .arg(loopback_addr.to_string())
            .stdout(Stdio::null())
            .spawn()
            .context("starting fnvm-hello on loopback")?,
    );
    wait_ready(loopback_addr)?;

    let run = fnvm_testkit::FnvmRun::start(
        &fnvm,
        &home,
        &agent,
        &image,
        &["--sandbox", &sandbox, "--type", "web"],
        Duration::from_secs(60),
    );
    let fnvm_addr = run.expect_serving();
    let nginx_addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let nginx =
        match fnvm_benches::nginx::Nginx::start(&work.join("nginx"), nginx_addr, loopback_addr) {
            Ok(n) => Some(n),
            Err(e) => {
                println!("the nginx peer cannot run: {e}; its row is missing");
                None
            }
        };
    let nginx_lat = match nginx {
        Some(_) => Some(latencies(nginx_addr, WARMUP, SAMPLES)?),
        None => None,
    };
    let nginx_rps = nginx.as_ref().and_then(|_| wrk(nginx_addr));
    drop(nginx);

    let loop_lat = latencies(loopback_addr, WARMUP, SAMPLES)?;
    let fnvm_lat = latencies(fnvm_addr, WARMUP, SAMPLES)?;
    let loop_rps = wrk(loopback_addr);
    // Where the CPU goes on the fnvm path: fnvm itself, and the agent (the sandbox's PID 1).
    let fnvm_pid = run.child.id() as i32;
    let agent_process = run.instance_id.as_deref().and_then(agent_pid);
    let cpu_before = (cpu_ticks(fnvm_pid), agent_process.map(cpu_ticks));
    let wrk_started = Instant::now();
    let fnvm_rps = wrk(fnvm_addr);
    let wrk_secs = wrk_started.elapsed().as_secs_f64();
    let cpu_after = (cpu_ticks(fnvm_pid), agent_process.map(cpu_ticks));
    drop(direct);
    drop(run);

    let us = |d: Duration| format!("{:.1} µs", d.as_secs_f64() * 1e6);
    let rps = |r: Option<f64>| r.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "-".into());
    let mut table = Table::new(&["path", "p50", "p99", "throughput (wrk -t2 -c16)"]);
    table.row(vec![
        "loopback TCP → fnvm-hello".into(),
        us(quantile(&loop_lat, 0.5)),
        us(quantile(&loop_lat, 0.99)),
        rps(loop_rps),
    ]);
    if let Some(lat) = &nginx_lat {
        table.row(vec![
            "nginx (proxy on loopback) → fnvm-hello".into(),
            us(quantile(lat, 0.5)),
            us(quantile(lat, 0.99)),
            rps(nginx_rps),
        ]);
    }
    table.row(vec![
        format!("fnvm run ({sandbox} sandbox) → fnvm-hello"),
        us(quantile(&fnvm_lat, 0.5)),
        us(quantile(&fnvm_lat, 0.99)),
        rps(fnvm_rps),
    ]);
    println!("{}", table.render());
    if let Some(rps) = fnvm_rps {
        let requests = rps * wrk_secs;
        let per_request = |before: u64, after: u64| {
            (after.saturating_sub(before)) as f64 / ticks_per_second() / requests * 1e6
        };
        println!(
            "CPU per request on the fnvm path: fnvm {:.1} µs, agent {}",
            per_request(cpu_before.0, cpu_after.0),
            match (cpu_before.1, cpu_after.1) {
                (Some(b), Some(a)) => format!("{:.1} µs", per_request(b, a)),
                _ => "-".into(),
            }
        );
    }
    let added = quantile(&fnvm_lat, 0.5).saturating_sub(quantile(&loop_lat, 0.5));
    println!(
        "added p50: {} (target < 100 µs){}",
        us(added),
        missed(added < Duration::from_micros(100))
    );
    if let (Some(f), Some(l)) = (fnvm_rps, loop_rps) {
        let ratio = f / l;
        println!(
            "throughput: {:.0} % of loopback (target ≥ 70 %){}",
            ratio * 100.0,
            missed(ratio >= 0.7)
        );
    }
    if let (Some(f), Some(n), Some(l)) = (fnvm_rps, nginx_rps, loop_rps) {
        println!(
            "the peer proxy: nginx {:.0} % of loopback; fnvm {:.0} % of nginx",
            n / l * 100.0,
            f / n * 100.0
        );
    }
    python_rows(&fnvm, &work, &agent, &sandbox)
}

/// A server the bench started, killed (and reaped) however the bench ends: a child left
/// running would keep the bench's output pipe open.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Python server reached directly and through `fnvm run`.
fn python_rows(
    fnvm: &std::path::Path,
    work: &std::path::Path,
    agent: &std::path::Path,
    sandbox: &str,
) -> Result<()> {
    let image = fnvm_testkit::python_image(&work.join("images"));
    let port = free_port()?;
    let direct_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let direct = Command::new("python3")
        .arg("-c")
        .arg(fnvm_testkit::PYTHON_SERVER)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        // Tracebacks of connections wrk drops at its end are no news.
        .stderr(Stdio::null())
        .spawn();
    let mut direct = match direct {
        Ok(child) => Some(Server(child)),
        Err(e) => {
            println!("\nthe host's python3 cannot run ({e}): the direct rows are missing");
            None
        }
    };
    // The peer is a peer: one that does not come up is said, and fnvm's rows still run.
    if direct.is_some() {
        if let Err(e) = wait_ready(direct_addr) {
            println!(
                "\nthe host's python3 server did not come up ({e}): the direct rows are missing"
            );
            direct = None;
        }
    }
    let run = fnvm_testkit::FnvmRun::start(
        fnvm,
        &work.join("home"),
        agent,
        &image,
        &["--sandbox", sandbox, "--type", "web"],
        Duration::from_secs(60),
    );
    let fnvm_addr = run.expect_serving();
    let mut rows = Vec::new();
    for (name, addr, through) in [
        (
            "python3 on loopback",
            direct.as_ref().map(|_| direct_addr),
            false,
        ),
        ("fnvm run → python3", Some(fnvm_addr), true),
    ] {
        let Some(addr) = addr else { continue };
        let fresh = new_connection_latencies(addr, "/", PYTHON_WARMUP, PYTHON_SAMPLES)?;
        let kept = latencies(addr, PYTHON_WARMUP, PYTHON_SAMPLES)?;
        rows.push((name, fresh, kept, wrk(addr), through));
    }
    let mut habits = Table::new(&[
        "the function's habit (python, Nagle on)",
        "new conn: direct",
        "through fnvm",
        "added",
        "kept alive: direct",
        "through fnvm",
        "added",
    ]);
    for (habit, path, keeps_alive) in HABITS {
        let p50 =
            |addr: Option<SocketAddr>, through: bool, kept: bool| -> Result<Option<Duration>> {
                let Some(addr) = addr.filter(|_| !kept || *keeps_alive) else {
                    return Ok(None);
                };
                if *path == "/" {
                    // Measured for the table above: the same samples, not a second run.
                    let row = rows.iter().find(|r| r.4 == through);
                    return Ok(row.map(|r| quantile(if kept { &r.2 } else { &r.1 }, 0.5)));
                }
                let samples = if kept {
                    latencies_of(addr, path, PYTHON_WARMUP, PYTHON_SAMPLES)?
                } else {
                    new_connection_latencies(addr, path, PYTHON_WARMUP, PYTHON_SAMPLES)?
                };
                Ok(Some(quantile(&samples, 0.5)))
            };
        let direct_addr = direct.as_ref().map(|_| direct_addr);
        let mut row = vec![(*habit).to_string()];
        for kept in [false, true] {
            let (d, f) = (
                p50(direct_addr, false, kept)?,
                p50(Some(fnvm_addr), true, kept)?,
            );
            let show = |v: Option<Duration>| {
                v.map_or("-".into(), |v| format!("{:.2} ms", v.as_secs_f64() * 1e3))
            };
            let added = match (d, f) {
                (Some(d), Some(f)) => {
                    let added = f.saturating_sub(d);
                    format!(
                        "{:.2} ms{}",
                        added.as_secs_f64() * 1e3,
                        missed(added < Duration::from_micros(500))
                    )
                }
                _ => "-".into(),
            };
            row.extend([show(d), show(f), added]);
        }
        habits.row(row);
    }
    drop(direct);
    drop(run);

    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    let rps = |r: Option<f64>| r.map(|r| format!("{r:.0}/s")).unwrap_or_else(|| "-".into());
    let mut table = Table::new(&[
        "python http.server (Nagle on)",
        "new conn p50",
        "new conn p99",
        "keep-alive p50",
        "keep-alive p99",
        "wrk -t2 -c16",
    ]);
    for (name, fresh, kept, r, _) in &rows {
        table.row(vec![
            (*name).into(),
            ms(quantile(fresh, 0.5)),
            ms(quantile(fresh, 0.99)),
            ms(quantile(kept, 0.5)),
            ms(quantile(kept, 0.99)),
            rps(*r),
        ]);
    }
    println!("\n{}", table.render());
    println!(
        "\np50 per call (target: fnvm adds < 0.5 ms whatever the habit)\n{}",
        habits.render()
    );
    if let [direct, through] = &rows[..] {
        for (how, d, t) in [
            ("new connection", &direct.1, &through.1),
            ("keep-alive", &direct.2, &through.2),
        ] {
            let added = quantile(t, 0.5).saturating_sub(quantile(d, 0.5));
            println!(
                "python, {how}: fnvm adds {} at p50 (target < 0.5 ms){}",
                ms(added),
                missed(added < Duration::from_micros(500))
            );
        }
    }
    Ok(())
}

/// `GET /` on a new connection each (`Connection: close`), until the reply has ended.
fn new_connection_latencies(
    addr: SocketAddr,
    path: &str,
    warmup: usize,
    samples: usize,
) -> Result<Vec<Duration>> {
    use std::io::Read;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut out = Vec::with_capacity(samples);
    let mut reply = Vec::new();
    for i in 0..warmup + samples {
        let t = Instant::now();
        let mut stream = TcpStream::connect(addr)?;
        stream.write_all(request.as_bytes())?;
        reply.clear();
        stream.read_to_end(&mut reply)?;
        if !(reply.starts_with(b"HTTP/1.") && reply.get(8..13) == Some(b" 200 ")) {
            bail!(
                "unexpected response from {addr}: {:?}",
                String::from_utf8_lossy(&reply[..reply.len().min(80)])
            );
        }
        if i >= warmup {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// `target/release/fnvm` (benchmarks measure release builds).
fn fnvm_binary() -> Result<PathBuf> {
    let path = fnvm_testkit::workspace().join("target/release/fnvm");
    if !path.is_file() {
        bail!(
            "{} is missing: run `cargo build --release -p fnvm` first",
            path.display()
        );
    }
    Ok(path)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_ready(addr: SocketAddr) -> Result<()> {
    // Generous: under the nested level's emulation python3 takes seconds to start.
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    bail!("nothing listens on {addr}")
}

/// Round trips of `GET /` on one keep-alive connection.
fn latencies(addr: SocketAddr, warmup: usize, samples: usize) -> Result<Vec<Duration>> {
    latencies_of(addr, "/", warmup, samples)
}

/// Sequential `GET path` round trips on one kept-alive connection.
fn latencies_of(
    addr: SocketAddr,
    path: &str,
    warmup: usize,
    samples: usize,
) -> Result<Vec<Duration>> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut out = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let t = Instant::now();
        writer.write_all(request.as_bytes())?;
        read_response(&mut reader)?;
        if i >= warmup {
            out.push(t.elapsed());
        }
    }
    Ok(out)
}

/// Reads one response with a Content-Length body.
fn read_response(reader: &mut impl BufRead) -> Result<()> {
    let mut len = None;
    let mut chunked = false;
    let mut status = String::new();
    reader.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        bail!("unexpected response {status:?}");
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            bail!("connection closed mid-response");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = Some(v.trim().parse::<usize>()?);
            }
            if k.eq_ignore_ascii_case("transfer-encoding") && v.trim() == "chunked" {
                chunked = true;
            }
        }
    }
    if chunked {
        // Sizes and data up to the last (empty) chunk; no trailers from these servers.
        loop {
            let mut size = String::new();
            reader.read_line(&mut size)?;
            let size = usize::from_str_radix(size.trim(), 16)
                .with_context(|| format!("bad chunk size {size:?}"))?;
            let mut data = vec![0; size + 2];
            reader.read_exact(&mut data)?;
            if size == 0 {
                return Ok(());
            }
        }
    }
    let mut body = vec![0; len.context("no Content-Length")?];
    reader.read_exact(&mut body)?;
    Ok(())
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The pid of the agent of instance `id` (its command line names the instance's directory).
fn agent_pid(id: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let program = cmdline.split_whitespace().next()?;
        (program.ends_with("fnvm-agent") && cmdline.contains(id)).then_some(pid)
    })
}

/// Requests per second measured by wrk, or None (with a note) when wrk is unavailable.
fn wrk(addr: SocketAddr) -> Option<f64> {
    let out = Command::new("wrk")
        .args(["-t2", "-c16", "-d5s"])
        .arg(format!("http://{addr}/"))
        .output();
    let out = match out {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!("wrk failed: {}", String::from_utf8_lossy(&o.stderr));
            return None;
        }
        Err(e) => {
            eprintln!("wrk is not available ({e}); throughput not measured");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("wrk against {addr}: {e}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}
