//! `egress`: what a function's outbound network costs (issue 15). One netprobe function
//! (`fnvm_testkit::netprobe_image`: python3 + iperf3) runs in the process sandbox, whose `eth0`
//! is pasta's (a user-mode stack turning the function's connections into host sockets), and
//! reaches a test host: a network namespace on a veth /30 with an iperf3 server and a TCP
//! listener. The peer is the host itself reaching the same servers from the init namespace:
//! the host's iperf3 client, and a `TcpStream::connect` loop in Rust. Each round measures both,
//! interleaved (the order alternating), so the machine's noise falls on both alike.
//!
//! Rows: TCP throughput function → test host (iperf3) and back (`iperf3 -R`), the bits the
//! receiver got; TCP connect latency (connect + close, the median of each round's connects).
//! The function's connect loop is Python's, so one more row puts the same Python loop on the
//! host (the netprobe server run by the host's python3): what pasta adds, without Python's own
//! cost in the ratio. Medians over the rounds; ratios are fnvm / host. An iperf3 test the
//! server refuses (it was still closing the last one) is tried again, and said so.
//!
//! The VM sandbox's rows run only where Linux guests do (VMX/SVM), and there only as
//! emulation: functional, not performance.
//!
//! Needs root and a release build: `cargo build --release -p fnvm && cargo run --release -p
//! fnvm-benches --bin egress -- [--runs N] [--seconds S]`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fnvm_benches::{median, peer_runs, Table};
use fnvm_testkit::{FnvmRun, Iperf3, TcpListen, TestHost};
use serde_json::{json, Value};

/// Rounds, each one iperf3 test per direction and one connect loop on both sides.
const RUNS: usize = 5;
/// The length of each iperf3 test.
const SECONDS: u32 = 3;
/// Connects per round per side.
const CONNECTS: usize = 100;

fn main() -> Result<()> {
    let runs: usize = flag("--runs")?.unwrap_or(RUNS).max(1);
    let seconds: u32 = flag("--seconds")?.unwrap_or(SECONDS).max(1);
    if !is_root() {
        bail!(
            "egress needs root: the test host is a network namespace, and the sandbox's network \
             is set up with pasta and nft"
        );
    }
    let fnvm = fnvm_binary()?;
    let agent = fnvm_testkit::static_binary(&fnvm, "fnvm-agent", "FNVM_AGENT_BIN");
    let work = fnvm_testkit::target_dir(&fnvm).join("bench-egress");
    let home = work.join("home");
    std::fs::create_dir_all(&home)?;
    let image = fnvm_testkit::netprobe_image(&work.join("images"));

    // What cannot run here costs only its own cells.
    let sandbox_net = peer_runs("pasta", &["--version"], "passt")
        .and_then(|()| peer_runs("nft", &["--version"], "nftables"))
        .map_err(|e| format!("the sandbox's egress cannot run: {e}"));
    let iperf3 = peer_runs("iperf3", &["--version"], "iperf3")
        .map_err(|e| format!("no iperf3 server for the test host: {e}"));

    let host = TestHost::new();
    let server = iperf3.as_ref().ok().map(|()| Iperf3::start(&host));
    let listen = TcpListen::start(&host, 0);
    let targets = Targets {
        iperf3: server
            .as_ref()
            .map(|s| SocketAddrV4::new(s.addr(), s.port())),
        listen: SocketAddrV4::new(listen.addr(), listen.port()),
        seconds,
    };
    println!(
        "egress: {runs} rounds of iperf3 -t {seconds} each way and {CONNECTS} connects; test host \
         {} (namespace {}, veth {})",
        host.addr(),
        host.name(),
        host.subnet()
    );

    let python = HostPython::start();
    let run = match &sandbox_net {
        Ok(()) => Some(start_function(
            &fnvm, &home, &agent, &image, "process", seconds,
        )?),
        Err(_) => None,
    };
    let function = run
        .as_ref()
        .map(|r| Probe::of(r, "fnvm (process sandbox)"))
        .transpose()?;

    let mut fnvm_s = Samples::default();
    let mut host_s = Samples::default();
    let mut python_lat = Vec::new();
    let mut host_errors: Vec<String> = Vec::new();
    let mut python_error = python.as_ref().err().cloned();
    // Untimed: the first connections of each side (ARP, pasta's first flow, Python's imports).
    if let Some(f) = &function {
        f.connect_latency(targets.listen, 10)?;
    }
    let _ = host_connect_latency(targets.listen, 10);
    for round in 0..runs {
        // The order alternates, so neither side always runs on a cooler machine.
        for fnvm_turn in [round % 2 == 0, round % 2 == 1] {
            if fnvm_turn {
                if let Some(f) = &function {
                    fnvm_s.push(
                        &targets,
                        |t, reverse| f.iperf3(t, seconds, reverse),
                        |t| f.connect_latency(t, CONNECTS),
                    )?;
                }
            } else {
                let r = host_s.push(
                    &targets,
                    |t, reverse| host_iperf3(t, seconds, reverse),
                    |t| host_connect_latency(t, CONNECTS),
                );
                if let Err(e) = r {
                    host_errors.push(format!("round {round}: {e:#}"));
                }
                if let Ok(p) = &python {
                    match p.probe.connect_latency(targets.listen, CONNECTS) {
                        Ok(d) => python_lat.push(d),
                        Err(e) => python_error = Some(format!("{e:#}")),
                    }
                }
            }
        }
    }
    eprintln!("fnvm (process): {fnvm_s:?}");
    eprintln!("host: {host_s:?}");
    eprintln!("host python3 connect loop: {python_lat:?}");

    let fnvm_why = sandbox_net.as_ref().err().cloned();
    let mut table = Table::new(&[
        "path",
        "measure",
        "fnvm process sandbox (median)",
        "host directly (median)",
        "ratio",
    ]);
    table.row(throughput_row(
        "TCP throughput to a test host, function → host (upload)",
        &fnvm_s.up,
        &host_s.up,
    ));
    table.row(throughput_row(
        "TCP throughput, host → function (download, iperf3 -R)",
        &fnvm_s.down,
        &host_s.down,
    ));
    table.row(latency_row(
        "TCP connect latency to a test host",
        &fnvm_s.connect,
        &host_s.connect,
    ));
    table.row(latency_row(
        "  the same, the host running the function's Python loop",
        &fnvm_s.connect,
        &python_lat,
    ));
    println!("{}", table.render());
    println!("ratio: fnvm / host (throughput: below 1x is slower; latency: above 1x is slower)");
    // A median hides how far the rounds spread, and pasta's upload spreads far.
    let rounds = |v: &[f64]| match v {
        [] => "not run".to_string(),
        v => v.iter().map(|b| gbits(*b)).collect::<Vec<_>>().join(" "),
    };
    for (what, fnvm, host) in [
        ("upload", &fnvm_s.up, &host_s.up),
        ("download", &fnvm_s.down, &host_s.down),
    ] {
        if !fnvm.is_empty() || !host.is_empty() {
            println!(
                "{what} by round, Gbit/s: fnvm {}; host {}",
                rounds(fnvm),
                rounds(host)
            );
        }
    }
    for why in [fnvm_why.as_ref(), iperf3.as_ref().err()]
        .into_iter()
        .flatten()
    {
        println!("not run: {why}");
    }
    if let Some(why) = &python_error {
        println!("not run: the host's Python connect loop ({why})");
    }
    for retried in RETRIED.lock().unwrap().iter() {
        println!("an iperf3 test was refused and tried again: {retried}");
    }
    for why in &host_errors {
        println!("the host peer failed in {why}");
    }
    drop(python);
    if let Some(mut run) = run {
        let status = run.interrupt(Duration::from_secs(30));
        if !status.success() {
            bail!("fnvm run exited with {status} after Ctrl-C");
        }
    }

    vm_rows(&fnvm, &home, &agent, &image, &targets, runs)
}

/// The test host's servers, as the function and the host reach them.
struct Targets {
    /// None when iperf3 cannot run here.
    iperf3: Option<SocketAddrV4>,
    listen: SocketAddrV4,
    seconds: u32,
}

/// One side's figures: bits/s received per round, each way, and each round's median connect.
#[derive(Debug, Default)]
struct Samples {
    up: Vec<f64>,
    down: Vec<f64>,
    connect: Vec<Duration>,
}

impl Samples {
    /// One round: upload, download (where iperf3 runs), then the connect loop.
    fn push(
        &mut self,
        targets: &Targets,
        iperf3: impl Fn(SocketAddrV4, bool) -> Result<f64>,
        connect: impl Fn(SocketAddrV4) -> Result<Duration>,
    ) -> Result<()> {
        if let Some(t) = targets.iperf3 {
            self.up.push(iperf3(t, false).context("iperf3 upload")?);
            self.down
                .push(iperf3(t, true).context("iperf3 -R download")?);
        }
        self.connect
            .push(connect(targets.listen).context("the connect loop")?);
        Ok(())
    }
}

/// The netprobe server's ops over HTTP: the function's (an event invocation) or the host's
/// python3 running the same server.
struct Probe {
    url: String,
    http: ureq::Agent,
    /// Whose probe it is, for the report of retried tests.
    side: String,
}

impl Probe {
    fn of(run: &FnvmRun, side: &str) -> Result<Probe> {
        let addr = run.addr.context("fnvm run does not serve")?;
        Ok(Probe::at(addr, side))
    }

    fn at(addr: SocketAddr, side: &str) -> Probe {
        Probe {
            side: side.into(),
            url: format!("http://{addr}/"),
            http: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(120)))
                .build()
                .into(),
        }
    }

    /// Runs one op; an answer without `"ok": true` is an error saying what the probe saw.
    fn op(&self, op: Value) -> Result<Value> {
        let mut resp = self
            .http
            .post(&self.url)
            .send(op.to_string().as_bytes())
            .with_context(|| format!("POST {} {op}", self.url))?;
        let status = resp.status();
        let text = resp.body_mut().read_to_string()?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("the probe's answer ({status}) {text:?}"))?;
        if v["ok"] != true {
            bail!("{op} answered ({status}) {v}");
        }
        Ok(v)
    }

    /// iperf3 from inside: the bits per second the receiving end got.
    fn iperf3(&self, to: SocketAddrV4, seconds: u32, reverse: bool) -> Result<f64> {
        iperf3_test(&self.side, || {
            let v = self.op(
                json!({"op": "iperf3", "host": to.ip().to_string(), "port": to.port(),
                "seconds": seconds, "reverse": reverse}),
            )?;
            v["received_bps"]
                .as_f64()
                .with_context(|| format!("no received_bps in {v}"))
        })
    }

    /// The median of `count` connect + close, in the probe's own loop.
    fn connect_latency(&self, to: SocketAddrV4, count: usize) -> Result<Duration> {
        let v = self.op(json!({"op": "connect_latency", "host": to.ip().to_string(),
            "port": to.port(), "count": count}))?;
        let ms = v["median_ms"]
            .as_f64()
            .with_context(|| format!("no median_ms in {v}"))?;
        Ok(Duration::from_secs_f64(ms / 1e3))
    }
}

/// The iperf3 tests that were refused and tried again, by side, with the refusal.
static RETRIED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// One iperf3 test of `side`. The server takes one test at a time and may still be closing the
/// last one: each test starts after a pause, and a refusal ("busy", or a reset when the server
/// closes on the new client's unread hello) is retried a few times, and reported.
fn iperf3_test(side: &str, f: impl Fn() -> Result<f64>) -> Result<f64> {
    let mut tries = 0;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        match f() {
            Err(e) if tries < 3 && refused(&format!("{e:#}")) => {
                tries += 1;
                RETRIED.lock().unwrap().push(format!("{side}: {e:#}"));
            }
            other => return other,
        }
    }
}

fn refused(error: &str) -> bool {
    error.contains("busy") || error.contains("reset by peer")
}

/// The host's own iperf3 client, from the init namespace.
fn host_iperf3(to: SocketAddrV4, seconds: u32, reverse: bool) -> Result<f64> {
    iperf3_test("host", || {
        let mut cmd = Command::new("iperf3");
        cmd.args(["-c", &to.ip().to_string(), "-p", &to.port().to_string()])
            .args(["-t", &seconds.to_string(), "-J"]);
        if reverse {
            cmd.arg("-R");
        }
        let out = cmd.stdin(Stdio::null()).output().context("iperf3 -c")?;
        let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "iperf3 printed no report ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if let Some(e) = report.get("error") {
            bail!("iperf3: {e}");
        }
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .context("no end.sum_received.bits_per_second in iperf3's report")
    })
}

/// The median of `count` connect + close from the init namespace (as the probe's loop times
/// them: the close included).
fn host_connect_latency(to: SocketAddrV4, count: usize) -> Result<Duration> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        drop(TcpStream::connect(to).with_context(|| format!("connect {to}"))?);
        samples.push(t.elapsed());
    }
    Ok(median(&samples))
}

/// The netprobe server run by the host's python3, on loopback: the function's Python connect
/// loop without the sandbox.
struct HostPython {
    child: std::process::Child,
    probe: Probe,
}

impl HostPython {
    fn start() -> std::result::Result<HostPython, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let child = Command::new("python3")
            .arg("-c")
            .arg(fnvm_testkit::NETPROBE_SERVER)
            .env("NETPROBE_PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run the host's python3: {e}"))?;
        let mut host = HostPython {
            child,
            probe: Probe::at(
                SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                "host python3",
            ),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Ok(Some(status)) = host.child.try_wait() {
                return Err(format!("the host's python3 netprobe exited: {status}"));
            }
            if Instant::now() > deadline {
                return Err("the host's python3 netprobe did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(host)
    }
}

impl Drop for HostPython {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `fnvm run` of the netprobe with egress, or why it did not serve.
fn start_function(
    fnvm: &Path,
    home: &Path,
    agent: &Path,
    image: &str,
    sandbox: &str,
    seconds: u32,
) -> Result<FnvmRun> {
    // An invocation holds one whole iperf3 test.
    let timeout = (seconds + 30).to_string();
    let run = FnvmRun::start(
        fnvm,
        home,
        agent,
        image,
        &[
            "--sandbox",
            sandbox,
            "--network",
            "egress",
            "--timeout",
            &timeout,
        ],
        Duration::from_secs(300),
    );
    if run.addr.is_none() {
        bail!(
            "fnvm run --sandbox {sandbox} did not serve:\n{}",
            run.stderr.snapshot().join("\n")
        );
    }
    Ok(run)
}

/// Where Linux guests run, the same fnvm rows in the VM sandbox; they run under emulation
/// there (the nested level), so they say whether egress works, not how fast it is.
fn vm_rows(
    fnvm: &Path,
    home: &Path,
    agent: &Path,
    image: &str,
    targets: &Targets,
    runs: usize,
) -> Result<()> {
    if !fnvm_testkit::host_has_vmx_or_svm() {
        let pvm = Path::new("/sys/module/kvm_pvm").exists();
        println!(
            "\nvm sandbox: not run here: this host has no VMX/SVM (/proc/cpuinfo){}, so Linux \
             guests cannot run; at the nested level (scripts/nested.sh) this bench runs the fnvm \
             rows with --sandbox vm, as emulation (functional, not performance)",
            if pvm {
                " and its /dev/kvm is KVM-PVM"
            } else {
                ""
            }
        );
        return Ok(());
    }
    let measured = (|| {
        let mut run = start_function(fnvm, home, agent, image, "vm", targets.seconds)?;
        let probe = Probe::of(&run, "fnvm (vm sandbox)")?;
        let mut s = Samples::default();
        for _ in 0..runs {
            s.push(
                targets,
                |t, reverse| probe.iperf3(t, targets.seconds, reverse),
                |t| probe.connect_latency(t, CONNECTS),
            )?;
        }
        run.interrupt(Duration::from_secs(30));
        anyhow::Ok(s)
    })();
    let mut table = Table::new(&[
        "path (vm sandbox: emulation, functional, not performance)",
        "measure",
        "fnvm vm sandbox (median)",
    ]);
    match measured {
        Ok(s) => {
            eprintln!("fnvm (vm): {s:?}");
            let gbit = |v: &[f64]| median_f64(v).map_or("not run".into(), gbits);
            table.row(vec![
                "TCP throughput, function → host".into(),
                "Gbit/s".into(),
                gbit(&s.up),
            ]);
            table.row(vec![
                "TCP throughput, host → function".into(),
                "Gbit/s".into(),
                gbit(&s.down),
            ]);
            table.row(vec![
                "TCP connect latency".into(),
                "ms".into(),
                millis(median(&s.connect)),
            ]);
            println!("\n{}", table.render());
        }
        // Emulation's rows are functional checks: a failure is reported, not fatal.
        Err(e) => println!("\nvm sandbox egress failed: {e:#}"),
    }
    Ok(())
}

fn throughput_row(path: &str, fnvm: &[f64], host: &[f64]) -> Vec<String> {
    let (f, h) = (median_f64(fnvm), median_f64(host));
    vec![
        path.into(),
        "Gbit/s".into(),
        f.map_or("not run".into(), gbits),
        h.map_or("not run".into(), gbits),
        match (f, h) {
            (Some(f), Some(h)) if h > 0.0 => format!("{:.2}x", f / h),
            _ => "-".into(),
        },
    ]
}

fn latency_row(path: &str, fnvm: &[Duration], host: &[Duration]) -> Vec<String> {
    let (f, h) = (
        (!fnvm.is_empty()).then(|| median(fnvm)),
        (!host.is_empty()).then(|| median(host)),
    );
    vec![
        path.into(),
        "ms".into(),
        f.map_or("not run".into(), millis),
        h.map_or("not run".into(), millis),
        match (f, h) {
            (Some(f), Some(h)) => fnvm_benches::ratio(f, Some(h)),
            _ => "-".into(),
        },
    ]
}

fn gbits(bps: f64) -> String {
    format!("{:.2}", bps / 1e9)
}

/// Connect latencies are tens of microseconds: three decimals.
fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// The median (the mean of the middle two for an even count); None without samples.
fn median_f64(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => None,
        n if n % 2 == 1 => Some(s[n / 2]),
        n => Some((s[n / 2 - 1] + s[n / 2]) / 2.0),
    }
}

/// `--name VALUE` of the command line, parsed.
fn flag<T: std::str::FromStr>(name: &str) -> Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    let mut args = std::env::args().skip_while(|a| a != name);
    if args.next().is_none() {
        return Ok(None);
    }
    let value = args
        .next()
        .with_context(|| format!("{name} needs a value"))?;
    value
        .parse()
        .map(Some)
        .map_err(|e| anyhow::anyhow!("{name} {value:?}: {e}"))
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no memory effects.
    unsafe { libc::geteuid() == 0 }
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
