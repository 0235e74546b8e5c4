//! `start`: from launching `fnvm run IMAGE` to the first successful HTTP reply, for a busybox
//! httpd image and a Debian minbase + python3 image (the images of the run tests), median of
//! 10, process sandbox (VM with `--sandbox vm` where the host has VMX/SVM) against the floor: a
//! plain `unshare --pid --mount --uts --ipc --fork chroot` of the same rootfs (the same rootfs
//! image, loop-mounted read-only), running the same server.
//!
//! Then the service's cold starts: `fnvm serve` in the same sandbox, a freshly deployed
//! function's first request through the API (request → reply, the instance started on the
//! request path), with the service's standby sandbox (`FNVM_STANDBY_SANDBOXES=1`, the default:
//! namespaces, cgroup, writable layer and agent prepared before the request) and without one
//! (`=0`), against the same floor.
//!
//! Where the host has VMX/SVM it also compares, in the VM sandbox, a boot start, a snapshot
//! start (`fnvm run --snapshot` once the snapshot exists) and a warm request.
//!
//! Needs root and a release build: `cargo build --release -p fnvm && cargo run --release -p
//! fnvm-benches --bin start`.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use fnvm_benches::{median, ms, ratio, Table};

const RUNS: usize = 10;

struct Case {
    name: &'static str,
    image: String,
    /// A path that answers 200.
    probe: &'static str,
    /// The server's argv inside the rootfs, listening on `{port}`.
    floor_argv: fn(u16) -> Vec<String>,
    floor_env: Vec<String>,
}

fn main() -> Result<()> {
    let sandbox = std::env::args()
        .skip_while(|a| a != "--sandbox")
        .nth(1)
        .unwrap_or_else(|| "process".into());
    let fnvm = fnvm_testkit::workspace().join("target/release/fnvm");
    if !fnvm.is_file() {
        bail!(
            "{} is missing: run `cargo build --release -p fnvm` first",
            fnvm.display()
        );
    }
    let agent = fnvm_testkit::static_binary(&fnvm, "fnvm-agent", "FNVM_AGENT_BIN");
    let work = fnvm_testkit::target_dir(&fnvm).join("bench-start");
    let layouts = work.join("images");
    let home = work.join("home");
    std::fs::create_dir_all(&home)?;
    let cases = [
        Case {
            name: "busybox httpd",
            image: fnvm_testkit::busybox_image(&layouts),
            probe: "/index.html",
            floor_argv: |port| {
                [
                    "/bin/httpd",
                    "-f",
                    "-p",
                    &format!("127.0.0.1:{port}"),
                    "-h",
                    "/www",
                ]
                .map(String::from)
                .to_vec()
            },
            floor_env: vec!["PATH=/bin".into()],
        },
        Case {
            name: "python3 (Debian minbase)",
            image: fnvm_testkit::python_image(&layouts),
            probe: "/env",
            floor_argv: |_| {
                ["python3", "-u", "/srv/server.py"]
                    .map(String::from)
                    .to_vec()
            },
            floor_env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        },
    ];

    let mut table = Table::new(&[
        "image",
        &format!("fnvm run ({sandbox}) p50"),
        "of which sandbox start",
        "unshare+chroot p50",
        "ratio",
    ]);
    let mut floor_missing = Vec::new();
    let mut served = Table::new(&[
        "image",
        &format!("fnvm serve ({sandbox}), standby p50"),
        "no standby p50",
        "unshare+chroot p50",
        "ratio (standby)",
    ]);
    for case in &cases {
        // One untimed run pulls and builds the rootfs (cached afterwards).
        let first = start_once(&fnvm, &home, &agent, &sandbox, case)?;
        let rootfs = first.2.context("fnvm did not name the rootfs image")?;
        let mut fnvm_times = Vec::new();
        let mut sandbox_times = Vec::new();
        for _ in 0..RUNS {
            let (total, sandbox_start, _) = start_once(&fnvm, &home, &agent, &sandbox, case)?;
            fnvm_times.push(total);
            sandbox_times.push(sandbox_start);
        }
        // The floor is the yardstick, but one that cannot run here costs only its cells.
        let floor_times = floor(&rootfs, case)
            .map_err(|e| floor_missing.push(format!("{}: {e:#}", case.name)))
            .ok();
        let f = median(&fnvm_times);
        let b = floor_times.as_deref().map(median);
        table.row(vec![
            case.name.into(),
            ms(f),
            ms(median(&sandbox_times)),
            b.map_or_else(|| "not run".to_owned(), ms),
            ratio(f, b),
        ]);
        eprintln!(
            "{}: fnvm {:?}  floor {:?}",
            case.name, fnvm_times, floor_times
        );
        let standby = serve_first_requests(&fnvm, &work, &agent, &sandbox, case, 1)?;
        let plain = serve_first_requests(&fnvm, &work, &agent, &sandbox, case, 0)?;
        let s = median(&standby);
        served.row(vec![
            case.name.into(),
            ms(s),
            ms(median(&plain)),
            b.map_or_else(|| "not run".to_owned(), ms),
            ratio(s, b),
        ]);
        eprintln!(
            "{}: serve first request, standby {standby:?}  none {plain:?}",
            case.name
        );
    }
    println!("start → first successful reply, median of {RUNS}");
    println!("{}", table.render());
    println!(
        "\na fresh function's first request through fnvm serve (request → reply, a cold start \
         on the request path), median of {RUNS}"
    );
    println!("{}", served.render());
    for why in &floor_missing {
        println!("the unshare+chroot floor could not run for {why}");
    }
    vm_start_kinds(&fnvm, &home, &agent, &cases)
}

/// `fnvm serve` with `standbys` standby sandboxes: RUNS times, a function deployed afresh and
/// its first request timed (request → reply), then removed.
fn serve_first_requests(
    fnvm: &Path,
    work: &Path,
    agent: &Path,
    sandbox: &str,
    case: &Case,
    standbys: usize,
) -> Result<Vec<Duration>> {
    let home = work.join(format!("home-serve-{standbys}"));
    std::fs::create_dir_all(&home)?;
    std::env::set_var("FNVM_STANDBY_SANDBOXES", standbys.to_string());
    let mut serve = fnvm_testkit::Serve::start_in(sandbox, fnvm, &home, agent, &[]);
    let result = (|| {
        let mut times = Vec::new();
        // One untimed round pulls the image and builds its rootfs in this home.
        for round in 0..=RUNS {
            let name = format!("first-{round}");
            let url = serve.url(&format!("/v1/namespaces/default/functions/{name}"));
            let spec = serde_json::json!({"image": case.image, "type": "web", "memory_mb": 128});
            ureq::put(&url)
                .header("Content-Type", "application/json")
                .send(serde_json::to_vec(&spec)?)
                .with_context(|| format!("PUT {url}"))?;
            let deadline = Instant::now() + Duration::from_secs(300);
            loop {
                let v: serde_json::Value =
                    serde_json::from_str(&ureq::get(&url).call()?.body_mut().read_to_string()?)?;
                match v["state"].as_str() {
                    Some("active") => break,
                    Some("failed") => bail!("the deploy of {} failed: {v}", case.image),
                    _ if Instant::now() > deadline => bail!("{} is not active: {v}", case.image),
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            // The standby taken by the last start is back by now.
            std::thread::sleep(Duration::from_millis(300));
            let web = format!("{url}/web{}", case.probe);
            let t = Instant::now();
            let mut reply = ureq::get(&web)
                .call()
                .with_context(|| format!("GET {web}"))?;
            let _ = reply.body_mut().read_to_string()?;
            if round > 0 {
                times.push(t.elapsed());
            }
            ureq::delete(&url)
                .call()
                .with_context(|| format!("DELETE {url}"))?;
        }
        Ok(times)
    })();
    serve.stop();
    result
}

/// Where the host has VMX/SVM: first-reply latency of a boot start, a snapshot start and a
/// warm request, per image (the goal: snapshot start ≥ 10× faster than boot start).
fn vm_start_kinds(fnvm: &Path, home: &Path, agent: &Path, cases: &[Case]) -> Result<()> {
    if !fnvm_testkit::host_has_vmx_or_svm() {
        println!(
            "\nboot vs snapshot vs warm start (vm sandbox): SKIPPED, this host has no VMX/SVM \
             (Linux guests cannot run on it)"
        );
        return Ok(());
    }
    let mut table = Table::new(&[
        "image (vm sandbox)",
        "boot start p50",
        "snapshot start p50",
        "warm request p50",
        "boot / snapshot",
    ]);
    for case in cases {
        let plain = ["--sandbox", "vm", "--type", "web"];
        let snap = ["--sandbox", "vm", "--type", "web", "--snapshot"];
        // Untimed: pulls the image and writes the snapshot.
        start_with(fnvm, home, agent, case, &snap)?;
        let (mut boot, mut restore, mut warm) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            boot.push(start_with(fnvm, home, agent, case, &plain)?.0);
            let (t, w) = start_with(fnvm, home, agent, case, &snap)?;
            restore.push(t);
            warm.push(w);
        }
        let (b, r) = (median(&boot), median(&restore));
        table.row(vec![
            case.name.into(),
            ms(b),
            ms(r),
            ms(median(&warm)),
            ratio(b, Some(r)),
        ]);
    }
    println!(
        "\nfnvm run spawn → first successful reply, median of {RUNS}; warm = a second request"
    );
    println!("{}", table.render());
    Ok(())
}

/// One `fnvm run ARGS`: spawn → first 200, then the time of one more (warm) request.
fn start_with(
    fnvm: &Path,
    home: &Path,
    agent: &Path,
    case: &Case,
    args: &[&str],
) -> Result<(Duration, Duration)> {
    let t = Instant::now();
    let mut run = fnvm_testkit::FnvmRun::start(
        fnvm,
        home,
        agent,
        &case.image,
        args,
        Duration::from_secs(300),
    );
    let addr = run.expect_serving();
    first_ok(addr, case.probe, Duration::from_secs(60))?;
    let first = t.elapsed();
    let t = Instant::now();
    first_ok(addr, case.probe, Duration::from_secs(60))?;
    let warm = t.elapsed();
    let status = run.interrupt(Duration::from_secs(30));
    if !status.success() {
        bail!("fnvm run exited with {status} after Ctrl-C");
    }
    Ok((first, warm))
}

/// One `fnvm run` from spawn to the first 200 (then Ctrl-C); returns the time and the rootfs.
fn start_once(
    fnvm: &Path,
    home: &Path,
    agent: &Path,
    sandbox: &str,
    case: &Case,
) -> Result<(Duration, Duration, Option<PathBuf>)> {
    let t = Instant::now();
    let mut run = fnvm_testkit::FnvmRun::start(
        fnvm,
        home,
        agent,
        &case.image,
        &["--sandbox", sandbox, "--type", "web"],
        Duration::from_secs(300),
    );
    let addr = run.expect_serving();
    first_ok(addr, case.probe, Duration::from_secs(60))?;
    let elapsed = t.elapsed();
    let rootfs = fnvm_testkit::rootfs_image_of(&run);
    let reported = run
        .stderr
        .snapshot()
        .iter()
        .find_map(|l| {
            l.strip_prefix("fnvm: started in ")?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .map(Duration::from_millis)
        .unwrap_or_default();
    let status = run.interrupt(Duration::from_secs(30));
    if !status.success() {
        bail!("fnvm run exited with {status} after Ctrl-C");
    }
    Ok((elapsed, reported, rootfs))
}

/// Polls `GET path` until it answers 200.
fn first_ok(addr: SocketAddr, path: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let _ = write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut buf = [0u8; 12];
            if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                return Ok(());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("no 200 from {addr}{path} within {limit:?}")
}

/// The floor: the same rootfs loop-mounted read-only, `unshare … chroot` of the same server.
fn floor(rootfs_image: &Path, case: &Case) -> Result<Vec<Duration>> {
    let mnt = tempfile::tempdir()?;
    let status = Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(rootfs_image)
        .arg(mnt.path())
        .status()?;
    if !status.success() {
        bail!("mounting {} failed", rootfs_image.display());
    }
    let result = (|| {
        let mut times = Vec::new();
        for _ in 0..RUNS {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let t = Instant::now();
            let mut child = Command::new("/usr/bin/unshare")
                .args([
                    "--pid",
                    "--mount",
                    "--uts",
                    "--ipc",
                    "--fork",
                    "--kill-child",
                ])
                .arg("/usr/sbin/chroot")
                .arg(mnt.path())
                .args((case.floor_argv)(port))
                .env_clear()
                .envs(case.floor_env.iter().filter_map(|kv| kv.split_once('=')))
                .env("PORT", port.to_string())
                .stdout(Stdio::null())
                .spawn()
                .context("unshare")?;
            let ok = first_ok(addr, case.probe, Duration::from_secs(60));
            times.push(t.elapsed());
            let _ = child.kill();
            let _ = child.wait();
            ok?;
        }
        Ok(times)
    })();
    let _ = Command::new("umount").arg(mnt.path()).status();
    result
}
