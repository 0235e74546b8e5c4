//! `containerd`: fnvm as containerd's runtime against containerd's own runc, in the same run,
//! the way a node starts a pod's container: a real containerd (Debian's, the tests' fixture)
//! with the busybox test image, `ctr run -d --runtime R --with-ns network:NS` until port 9000
//! answers a real HTTP request inside that network namespace (the cold start a user of a
//! RuntimeClass meets), then SIGKILL until containerd sees the task stopped, and delete. Also
//! the host memory of a running container: the resident set of its shim and every process of
//! its task. Median of 10 per runtime, and fnvm's ratio to runc.
//!
//! fnvm runs in the sandbox the host has (the process sandbox without VMX/SVM, the VM sandbox
//! with it; `FNVM_SANDBOX=vm|process` forces one). Needs root and a release build:
//! `cargo build --release && cargo run --release -p fnvm-benches --bin containerd`.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fnvm_benches::{median, ms, ratio, Table};
use fnvm_testkit::nethost::TestHost;
use fnvm_testkit::{busybox_oci_archive, http, Containerd, FNVM_RUNTIME, RUNC_RUNTIME};

const RUNS: usize = 10;

/// One runtime's samples.
#[derive(Default)]
struct Samples {
    start: Vec<Duration>,
    kill: Vec<Duration>,
    delete: Vec<Duration>,
    rss_kib: Vec<u64>,
}

fn main() -> Result<()> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the containerd bench needs root (containerd, mounts, network namespaces)");
    }
    let release = fnvm_testkit::workspace().join("target/release");
    let shim = release.join("containerd-shim-fnvm-v2");
    let fnvm = release.join("fnvm");
    if !shim.is_file() || !fnvm.is_file() {
        bail!(
            "{} or {} is missing: run `cargo build --release` first",
            shim.display(),
            fnvm.display()
        );
    }
    let agent = fnvm_testkit::static_binary(&fnvm, "fnvm-agent", "FNVM_AGENT_BIN");
    let work = fnvm_testkit::target_dir(&fnvm).join("bench-containerd");
    let home = work.join("home");
    std::fs::create_dir_all(&home)?;
    let archive = busybox_oci_archive(&work.join("images"));
    let host = TestHost::new();
    let containerd = Containerd::builder(&work)
        .shim_dir(&release)
        .env("FNVM_HOME", &home)
        .env("FNVM_AGENT_BIN", &agent)
        .start();
    let image = containerd.import(&archive);
    let netns = format!("network:{}", host.netns_path().display());
    let url = format!("http://{}:9000/", host.addr());

    let mut results = Vec::new();
    for runtime in [RUNC_RUNTIME, FNVM_RUNTIME] {
        match measure(&containerd, &host, &image, &netns, &url, runtime) {
            Ok(samples) => results.push((runtime, samples)),
            // The peer that cannot run here says why; fnvm's rows still come.
            Err(e) if runtime == RUNC_RUNTIME => {
                println!("peer {runtime} cannot run here, its rows are left out: {e:#}")
            }
            Err(e) => return Err(e),
        }
    }
    let footprint = containerd.footprint();
    containerd.stop();
    footprint.assert_nothing_left();

    let sandbox =
        std::env::var("FNVM_SANDBOX").unwrap_or_else(|_| fnvm::sandbox::default_kind().to_string());
    println!(
        "containerd runtimes, busybox httpd, median of {RUNS} (fnvm in its {sandbox} sandbox; \
         peer: runc, measured in the same run)"
    );
    let runc = results
        .iter()
        .find(|(r, _)| *r == RUNC_RUNTIME)
        .map(|(_, s)| s);
    let mut table = Table::new(&[
        "runtime",
        "run → first reply",
        "ratio",
        "SIGKILL → stopped",
        "ratio",
        "delete",
        "ratio",
        "resident",
        "ratio",
    ]);
    for (runtime, s) in &results {
        let rss = median_u64(&s.rss_kib);
        table.row(vec![
            runtime.to_string(),
            ms(median(&s.start)),
            ratio(median(&s.start), runc.map(|r| median(&r.start))),
            ms(median(&s.kill)),
            ratio(median(&s.kill), runc.map(|r| median(&r.kill))),
            ms(median(&s.delete)),
            ratio(median(&s.delete), runc.map(|r| median(&r.delete))),
            format!("{:.1} MiB", rss as f64 / 1024.0),
            runc.map_or("-".into(), |r| {
                format!("{:.2}x", rss as f64 / median_u64(&r.rss_kib).max(1) as f64)
            }),
        ]);
    }
    table.print();
    Ok(())
}

/// One runtime's rounds: an unmeasured one first (the image's first unpack, page cache), then
/// [`RUNS`] measured.
fn measure(
    containerd: &Containerd,
    host: &TestHost,
    image: &str,
    netns: &str,
    url: &str,
    runtime: &str,
) -> Result<Samples> {
    let mut samples = Samples::default();
    for round in 0..=RUNS {
        let id = format!(
            "bench-{}-{round}",
            runtime.rsplit('.').nth(1).unwrap_or("x")
        );
        let began = Instant::now();
        let out = containerd.run(
            &["-d", "--runtime", runtime, "--with-ns", netns],
            image,
            &id,
            &[],
        );
        if !out.status.success() {
            bail!(
                "{runtime}: ctr run failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        first_reply(host, url, Duration::from_secs(30))?;
        let start = began.elapsed();
        let task = containerd.wait_for_task(&id, "RUNNING", Duration::from_secs(5));
        let rss = resident_kib(containerd, &id, task.pid);
        let began = Instant::now();
        containerd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &id]);
        wait_stopped(containerd, &id)?;
        let kill = began.elapsed();
        let began = Instant::now();
        containerd.ctr_ok(&["task", "delete", &id]);
        containerd.ctr_ok(&["container", "delete", &id]);
        let delete = began.elapsed();
        if round > 0 {
            samples.start.push(start);
            samples.kill.push(kill);
            samples.delete.push(delete);
            samples.rss_kib.push(rss);
        }
    }
    Ok(samples)
}

/// Polls `url` from inside `host`'s namespace until it answers 200.
fn first_reply(host: &TestHost, url: &str, limit: Duration) -> Result<()> {
    host.enter(|| {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(response) = http().get(url).call() {
                if response.status() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{url} did not answer within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

fn wait_stopped(containerd: &Containerd, id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while containerd.task(id).is_some_and(|t| t.status != "STOPPED") {
        if Instant::now() > deadline {
            bail!("task {id} did not stop");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// The resident set of container `id`'s shim (the process whose command line names it) and
/// of its task's process `pid` with all its descendants, in KiB.
fn resident_kib(containerd: &Containerd, id: &str, pid: u32) -> u64 {
    let socket = containerd.address().display().to_string();
    let mut total = 0;
    let mut procs: Vec<(u32, u32, String)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        procs.push((
            p,
            ppid,
            String::from_utf8_lossy(&cmdline).replace('\0', " "),
        ));
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            procs
                .iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    for (p, _, cmdline) in &procs {
        let shim = cmdline.contains("containerd-shim")
            && cmdline.contains(&socket)
            && cmdline.contains(&format!("-id {id} "));
        if shim || tree.contains(p) {
            total += rss_kib(*p);
        }
    }
    total
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn median_u64(samples: &[u64]) -> u64 {
    let mut s = samples.to_vec();
    s.sort_unstable();
    s.get(s.len() / 2).copied().unwrap_or(0)
}
