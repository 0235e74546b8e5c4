//! `invoke`: warm event invocations through `fnvm serve` (client → API → pool → instance) side
//! by side, in the same run, with the same guest server reached through `fnvm run` (client →
//! run's front → the one instance). The function is the bundled example (`fnvm-hello`), a
//! trivial event function; process sandbox here (`--sandbox vm` where the host has VMX/SVM).
//!
//! Load: wrk (Debian package `wrk`) POSTing a small JSON event, 2 threads, 4, 8 and then 64
//! connections, 5 s each after a 2 s warm-up; requests/s and latency percentiles from wrk's
//! `--latency` report. The served function has `max_instances` = `provisioned_concurrency` = 8
//! (one in-flight request per event instance, so 8 connections keep 8 warm instances busy);
//! `fnvm run` has one instance taking every request at once. A last row serves 8 connections
//! with 4 instances, so requests wait in the pool for a free instance (on 2 cores, 8 busy
//! instances' processes make the scheduler the tail; 4 show the pool's own queueing).
//! Then a function's first call, on a provisioned instance and on demand (its cold start on the
//! request path), five fresh functions each.
//! Targets on 2 cores: ≥ 5,000 req/s through serve, p99 < 5 ms, serve adding < 20 % to run.
//!
//! Needs root and a release build: `cargo build --release -p fnvm && cargo run --release -p
//! fnvm-benches --bin invoke`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fnvm_benches::Table;

/// Instances of the served function.
const CONNECTIONS: usize = 8;
/// The connection counts measured (64: requests queue for the 8 instances).
const LOADS: [usize; 3] = [4, 8, 64];
const EVENT: &str = r#"{"hello":"bench"}"#;
/// Fresh functions whose first call is timed, provisioned and on demand.
const FIRST_CALL_ROUNDS: usize = 5;

fn main() -> Result<()> {
    let sandbox = std::env::args()
        .skip_while(|a| a != "--sandbox")
        .nth(1)
        .unwrap_or_else(|| "process".into());
    let fnvm = fnvm_binary()?;
    let agent = fnvm_testkit::static_binary(&fnvm, "fnvm-agent", "FNVM_AGENT_BIN");
    let hello = fnvm_testkit::static_binary(&fnvm, "fnvm-hello", "FNVM_HELLO_BIN");
    std::env::set_var("FNVM_HELLO_BIN", &hello);
    let work = fnvm_testkit::target_dir(&fnvm).join("bench-invoke");
    std::fs::create_dir_all(&work)?;
    let image = fnvm::example_image::ensure_example_image(&work.join("images"), &hello)?;
    let script = work.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{EVENT}'\nwrk.headers[\"Content-Type\"] = \
             \"application/json\"\n"
        ),
    )?;

    // fnvm run: one instance, its front on a free port.
    let run = fnvm_testkit::FnvmRun::start(
        &fnvm,
        &work.join("home-run"),
        &agent,
        &image,
        &["--sandbox", &sandbox, "--type", "event"],
        Duration::from_secs(60),
    );
    let run_addr = run.expect_serving();
    let run_url = format!("http://{run_addr}/");
    let mut run_results = Vec::new();
    for c in LOADS {
        wrk(&script, &run_url, c, Duration::from_secs(2))?;
        run_results.push(wrk(&script, &run_url, c, Duration::from_secs(5))?);
    }
    drop(run);

    // fnvm serve: the same image deployed as a function with warm provisioned instances.
    let serve = Serve::start(&fnvm, &work.join("home-serve"), &agent, &sandbox)?;
    let function_url = serve.deploy(&image, "bench", CONNECTIONS)?;
    let invoke_url = format!("{function_url}/invocations");
    let mut serve_results = Vec::new();
    for c in LOADS {
        wrk(&script, &invoke_url, c, Duration::from_secs(2))?;
        serve_results.push(wrk(&script, &invoke_url, c, Duration::from_secs(5))?);
    }
    serve.remove("bench")?;
    // Fewer instances than connections: requests queue in the pool for a free instance.
    let half = CONNECTIONS / 2;
    let queued_url = format!("{}/invocations", serve.deploy(&image, "bench-half", half)?);
    wrk(&script, &queued_url, CONNECTIONS, Duration::from_secs(2))?;
    let queued = wrk(&script, &queued_url, CONNECTIONS, Duration::from_secs(5))?;
    serve.remove("bench-half")?;
    // A function's first call: on a provisioned instance, and on demand (a cold start on the
    // request path), a fresh function each round.
    let (mut provisioned, mut on_demand) = (Vec::new(), Vec::new());
    for round in 0..FIRST_CALL_ROUNDS {
        for (name, keep, times) in [
            (format!("first-provisioned-{round}"), 1, &mut provisioned),
            (format!("first-on-demand-{round}"), 0, &mut on_demand),
        ] {
            let url = format!("{}/invocations", serve.deploy_with(&image, &name, 1, keep)?);
            let t = Instant::now();
            let mut resp = ureq::post(&url)
                .send(EVENT)
                .with_context(|| format!("POST {url}"))?;
            let _ = resp.body_mut().read_to_string()?;
            times.push(t.elapsed());
            serve.remove(&name)?;
        }
    }
    drop(serve);

    let us = |d: Duration| format!("{:.0} µs", d.as_secs_f64() * 1e6);
    let mut table = Table::new(&["path", "connections", "requests/s", "p50", "p99", "errors"]);
    for (i, c) in LOADS.iter().enumerate() {
        for (name, r) in [
            (format!("fnvm run ({sandbox}, 1 instance)"), &run_results[i]),
            (
                format!("fnvm serve ({sandbox}, {CONNECTIONS} warm instances)"),
                &serve_results[i],
            ),
        ] {
            table.row(vec![
                name,
                c.to_string(),
                format!("{:.0}", r.rps),
                us(r.p50),
                us(r.p99),
                r.errors.clone().unwrap_or_else(|| "0".into()),
            ]);
        }
    }
    table.row(vec![
        format!("fnvm serve ({sandbox}, {half} warm instances, queueing)"),
        CONNECTIONS.to_string(),
        format!("{:.0}", queued.rps),
        us(queued.p50),
        us(queued.p99),
        queued.errors.clone().unwrap_or_else(|| "0".into()),
    ]);
    println!(
        "wrk -t2 -d5s POST of a {}-byte event to fnvm-hello\n{}",
        EVENT.len(),
        table.render()
    );
    let mut first = Table::new(&[
        "a function's first call",
        "p50",
        "min",
        "max",
        "vs provisioned",
    ]);
    let base = Some(fnvm_benches::median(&provisioned));
    for (name, v) in [
        (format!("provisioned instance ({sandbox})"), &provisioned),
        (
            format!("on demand: a cold start on the request path ({sandbox})"),
            &on_demand,
        ),
    ] {
        first.row(vec![
            name,
            fnvm_benches::ms(fnvm_benches::median(v)),
            fnvm_benches::ms(v.iter().min().copied().unwrap_or_default()),
            fnvm_benches::ms(v.iter().max().copied().unwrap_or_default()),
            fnvm_benches::ratio(fnvm_benches::median(v), base),
        ]);
    }
    println!(
        "{FIRST_CALL_ROUNDS} fresh functions each\n{}",
        first.render()
    );
    let miss = fnvm_benches::missed;
    for (i, c) in LOADS.iter().enumerate() {
        let (serve, run) = (&serve_results[i], &run_results[i]);
        let ratio = serve.rps / run.rps;
        // Little's law: with `c` requests always in flight, the mean latency is c / rate; no
        // percentile above the median can be below it.
        let floor = Duration::from_secs_f64(*c as f64 / serve.rps.max(1.0));
        println!(
            "{c} connections: serve {:.0} req/s (target ≥ 5000){}; p99 {} (target < 5 ms){}; \
             {:.0} % of run's throughput (target ≥ 80 %){}; p50 added {}; mean latency at \
             this rate is at least {c}/rate = {}",
            serve.rps,
            miss(serve.rps >= 5000.0),
            us(serve.p99),
            miss(serve.p99 < Duration::from_millis(5)),
            ratio * 100.0,
            miss(ratio >= 0.8),
            us(serve.p50.saturating_sub(run.p50)),
            us(floor),
        );
    }
    Ok(())
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

/// What wrk measured.
struct WrkResult {
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// wrk's "Non-2xx" / "Socket errors" line, if any.
    errors: Option<String>,
}

fn wrk(script: &Path, url: &str, connections: usize, duration: Duration) -> Result<WrkResult> {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), "--latency"])
        .arg(format!("-d{}s", duration.as_secs()))
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .context("wrk (Debian package wrk) is needed")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let percentile = |p: &str| -> Result<Duration> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(p))
            .with_context(|| format!("no {p} line in wrk's output:\n{text}"))?;
        parse_wrk_duration(line.split_whitespace().nth(1).unwrap_or(""))
            .with_context(|| format!("cannot read {line:?}"))
    };
    Ok(WrkResult {
        rps: text
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?,
        p50: percentile("50%")?,
        p99: percentile("99%")?,
        errors: text
            .lines()
            .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"))
            .map(|l| l.trim().to_string()),
    })
}

/// wrk's `123.45us`, `1.20ms`, `2.00s`.
fn parse_wrk_duration(s: &str) -> Option<Duration> {
    let (number, scale) = if let Some(v) = s.strip_suffix("us") {
        (v, 1e-6)
    } else if let Some(v) = s.strip_suffix("ms") {
        (v, 1e-3)
    } else if let Some(v) = s.strip_suffix('s') {
        (v, 1.0)
    } else {
        return None;
    };
    Some(Duration::from_secs_f64(number.parse::<f64>().ok()? * scale))
}

/// A `fnvm serve` child on a free port, killed on drop.
struct Serve {
    child: Child,
    base: String,
}

impl Serve {
    fn start(fnvm: &Path, home: &Path, agent: &Path, sandbox: &str) -> Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let child = Command::new(fnvm)
            .arg("--home")
            .arg(home)
            .args(["serve", "--listen", &addr.to_string(), "--sandbox", sandbox])
            .args(["--idle-timeout", "600"])
            .env("FNVM_AGENT_BIN", agent)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting fnvm serve")?;
        let mut serve = Serve {
            child,
            base: format!("http://{addr}"),
        };
        let stderr = serve.child.stderr.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !line.contains("warning: the process sandbox") {
                    eprintln!("fnvm serve: {line}");
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while ureq::get(&format!("{}/healthz", serve.base))
            .call()
            .is_err()
        {
            if Instant::now() > deadline {
                bail!("fnvm serve did not answer /healthz within 20 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(serve)
    }

    /// Deploys `image` as event function `name` with `instances` provisioned (and at most) and
    /// waits until they are idle; returns the function's URL.
    fn deploy(&self, image: &str, name: &str, instances: usize) -> Result<String> {
        self.deploy_with(image, name, instances, instances)
    }

    /// As [`Serve::deploy`], with `provisioned` of `instances` kept ready (0: started on demand).
    fn deploy_with(
        &self,
        image: &str,
        name: &str,
        instances: usize,
        provisioned: usize,
    ) -> Result<String> {
        let url = format!("{}/v1/namespaces/default/functions/{name}", self.base);
        let spec = serde_json::json!({
            "image": image,
            "type": "event",
            "memory_mb": 64,
            "max_instances": instances,
            "provisioned_concurrency": provisioned,
        });
        ureq::put(&url)
            .header("Content-Type", "application/json")
            .send(serde_json::to_vec(&spec)?)
            .with_context(|| format!("PUT {url}"))?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v: serde_json::Value =
                serde_json::from_str(&ureq::get(&url).call()?.body_mut().read_to_string()?)?;
            let idle = v["instances"]
                .as_array()
                .map_or(0, |a| a.iter().filter(|i| i["state"] == "idle").count());
            if v["state"] == "failed" {
                bail!("the deploy failed: {v}");
            }
            if v["state"] == "active" && idle >= provisioned {
                return Ok(url);
            }
            if Instant::now() > deadline {
                bail!("the function is not ready with {provisioned} idle instances: {v}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Serve {
    fn remove(&self, name: &str) -> Result<()> {
        let url = format!("{}/v1/namespaces/default/functions/{name}", self.base);
        ureq::delete(&url)
            .call()
            .with_context(|| format!("DELETE {url}"))?;
        Ok(())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // SIGTERM lets serve stop its instances.
        fnvm_benches::stop(&mut self.child, Duration::from_secs(15));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn wrk_durations_parse() {
        use std::time::Duration;
        assert_eq!(
            super::parse_wrk_duration("250.00us"),
            Some(Duration::from_micros(250))
        );
        assert_eq!(
            super::parse_wrk_duration("1.50ms"),
            Some(Duration::from_micros(1500))
        );
        assert_eq!(
            super::parse_wrk_duration("2s"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(super::parse_wrk_duration("x"), None);
    }
}
