//! `fnvm bench IMAGE`: the cold starts of one function measured as a user meets them, each
//! kind of start with its phases, as a table of p50/p90/p99 (or `--json` for dashboards).
//!
//! Kinds: a *pull* into an empty store each run (resolve, fetch, unpack, rootfs image), a *boot*
//! start (start → ready and where the sandbox says it went — the sandbox or VMM up to the agent's
//! answer, the guest's boot to the agent, the function's start to listening — then the first
//! reply), a *snapshot* start (vm sandbox: start → ready, the
//! VMM's resume, the first reply; the snapshot is written by one untimed boot first), a
//! *standby* start (process sandbox: a boot start placed into a standby sandbox, as `fnvm
//! serve` makes its cold starts) and a *warm* call (the second request on a running instance). Every start is a whole `fnvm run`
//! launch with its front, stopped and cleaned up after its calls. A kind that cannot run here
//! is listed with the reason, never left out silently; a start that fails ends the bench with
//! its error, so no partial table passes for a whole one.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use fnvm_rootfs_builder::pipeline::{self, HomeDirs, Progress, PulledImage};

use super::demo::{self, Reply};
use super::run::{self, LaunchOptions, RegistryArgs};
use crate::function::FunctionSettings;
use crate::home::Home;
use crate::invoke::FunctionType;
use crate::sandbox::{self, LogLine, SandboxKind};

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The image: REGISTRY/REPO@sha256:HEX, REGISTRY/REPO:TAG, oci:PATH[:TAG] or
    /// docker-archive:PATH.
    pub image: String,
    /// Where the starts run (default: vm where the host has VMX/SVM, else process).
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxKind>,
    /// Runs of each kind (1..=1000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// event: calls are POSTs delivered as /event-invoke; web: GET / passes through.
    #[arg(long = "type", value_enum, default_value_t = FunctionType::Event)]
    pub function_type: FunctionType,
    /// Print the figures as one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// The event each call sends (an event function gets it as its body).
const EVENT: &str = r#"{"bench":"fnvm"}"#;

/// Phase name → one duration per run, in the order the phases happen.
type Phases = Vec<(&'static str, Vec<Duration>)>;

/// What one kind of start measured, or why it did not run.
enum Kind {
    Measured(Phases),
    NotRun(String),
}

pub fn run(home: &Home, args: BenchArgs) -> Result<ExitCode> {
    let kind = args.sandbox.unwrap_or_else(sandbox::default_kind);
    let runs = args.runs as usize;
    let mut kinds: Vec<(&'static str, Kind)> = Vec::new();
    kinds.push(("pull", Kind::Measured(pulls(home, &args, runs)?)));
    let pulled = run::pull_image(home, &args.image, &args.registry)?;

    // start → ready, then where the sandbox says that time went, then the first reply.
    let (mut ready, mut within, mut first_reply): (Vec<Duration>, Phases, Vec<Duration>) =
        Default::default();
    let mut warm: Phases = vec![("reply", vec![])];
    for _ in 0..runs {
        let started = start_and_call(home, &pulled, kind, &args, false)?;
        ready.push(started.start);
        for (name, d) in started.phases {
            match within.iter_mut().find(|(n, _)| *n == name) {
                Some((_, samples)) => samples.push(d),
                None => within.push((name, vec![d])),
            }
        }
        first_reply.push(started.first);
        warm[0].1.push(started.second);
    }
    if let Some((name, samples)) = within.iter().find(|(_, s)| s.len() != runs) {
        bail!(
            "the sandbox reported its phase {name:?} for {} of {runs} starts",
            samples.len()
        );
    }
    let mut boot: Phases = vec![("start → ready", ready)];
    boot.extend(within);
    boot.push(("first reply", first_reply));
    kinds.push(("boot", Kind::Measured(boot)));
    let snapshot = if kind == SandboxKind::Vm {
        // One untimed boot writes the snapshot (unless one is there); every timed run restores.
        start_and_call(home, &pulled, kind, &args, true)?;
        let mut phases: Phases = vec![
            ("start → ready", vec![]),
            ("VMM start → guest resumed", vec![]),
            ("first reply", vec![]),
        ];
        for _ in 0..runs {
            let (start, first, resume) = restore_and_call(home, &pulled, &args)?;
            phases[0].1.push(start);
            phases[1].1.push(resume);
            phases[2].1.push(first);
        }
        Kind::Measured(phases)
    } else {
        Kind::NotRun(format!("the {kind} sandbox has no snapshots (vm only)"))
    };
    kinds.push(("snapshot", snapshot));
    kinds.push(("standby", standby_starts(home, &pulled, kind, &args, runs)?));
    kinds.push(("warm", Kind::Measured(warm)));

    let header = Header::new(&args, &pulled, kind, runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&json(&header, &kinds))?);
    } else {
        print_table(&header, &kinds);
    }
    Ok(ExitCode::SUCCESS)
}

/// Pulls into an empty store `runs` times, timing each phase by the pipeline's progress.
fn pulls(home: &Home, args: &BenchArgs, runs: usize) -> Result<Phases> {
    let (reference, options) = run::pull_options(&args.image, &args.registry)?;
    let mut phases: Phases = ["resolve", "fetch", "unpack", "rootfs image", "total"]
        .into_iter()
        .map(|p| (p, Vec::new()))
        .collect();
    let scratch = home.dir("bench")?;
    for i in 0..runs {
        let store = scratch.join(format!("store-{}-{i}", std::process::id()));
        let _ = std::fs::remove_dir_all(&store);
        let started = Instant::now();
        // When each phase ended: resolve at Resolved, fetch at the first layer's unpack,
        // unpack at the image build.
        let mut marks: [Option<Instant>; 3] = [None; 3];
        let mut progress = |p: Progress| {
            let at = match p {
                Progress::Resolved { .. } => 0,
                Progress::Unpack { .. } => 1,
                Progress::BuildImage => 2,
                _ => return,
            };
            marks[at].get_or_insert_with(Instant::now);
        };
        let pulled = pipeline::pull(
            &reference,
            &HomeDirs::under(&store),
            &options,
            &mut progress,
        )
        .with_context(|| format!("cannot pull {}", args.image));
        let ended = Instant::now();
        let _ = std::fs::remove_dir_all(&store);
        let pulled = pulled?;
        if pulled.cache_hit {
            bail!("a pull into an empty store was a cache hit: the bench cannot time its phases");
        }
        let [Some(resolved), Some(fetched), Some(unpacked)] = marks else {
            bail!("the image pipeline did not report every phase of the pull: {marks:?}");
        };
        for (slot, (from, to)) in [
            (started, resolved),
            (resolved, fetched),
            (fetched, unpacked),
            (unpacked, ended),
            (started, ended),
        ]
        .into_iter()
        .enumerate()
        {
            phases[slot].1.push(to.saturating_duration_since(from));
        }
    }
    Ok(phases)
}

/// Process sandbox: `runs` boot starts in one sandbox made as `fnvm serve` makes it, each
/// placed into a standby sandbox prepared while the previous one ran.
fn standby_starts(
    home: &Home,
    pulled: &PulledImage,
    kind: SandboxKind,
    args: &BenchArgs,
    runs: usize,
) -> Result<Kind> {
    if kind != SandboxKind::Process {
        return Ok(Kind::NotRun(format!(
            "the {kind} sandbox's standbys are VMMs for snapshot starts (fnvm serve)"
        )));
    }
    let service: Arc<dyn sandbox::Sandbox> = Arc::from(
        sandbox::create_for_service(kind, home, &Default::default())
            .context("cannot make the service's sandbox")?,
    );
    let (mut ready, mut within, mut first_reply): (Vec<Duration>, Phases, Vec<Duration>) =
        Default::default();
    for _ in 0..runs {
        // The standby taken by the last start is back (it takes ~15 ms on a quiet host).
        let deadline = std::time::Instant::now() + STANDBY_REFILL;
        while service.standbys_ready() == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut opts = options(kind, args, false);
        opts.sandbox = Some(Arc::clone(&service));
        let session = launch(home, pulled, opts)?;
        let info = session.instance.start_info();
        let start = session.start_time;
        let first = call(&session, args);
        session.stop()?;
        if info.note.as_deref() != Some(sandbox::process::FROM_STANDBY_NOTE) {
            bail!(
                "a start found no standby sandbox ready; its note: {:?}",
                info.note
            );
        }
        ready.push(start);
        for (name, d) in info.phases {
            match within.iter_mut().find(|(n, _)| *n == name) {
                Some((_, samples)) => samples.push(d),
                None => within.push((name, vec![d])),
            }
        }
        first_reply.push(first?);
    }
    let mut phases: Phases = vec![("start → ready", ready)];
    phases.extend(within);
    phases.push(("first reply", first_reply));
    Ok(Kind::Measured(phases))
}

/// How long a standby start waits at most for the previous start's replacement standby.
const STANDBY_REFILL: Duration = Duration::from_secs(10);

fn options(kind: SandboxKind, args: &BenchArgs, snapshot: bool) -> LaunchOptions {
    LaunchOptions {
        kind,
        settings: FunctionSettings::local("bench"),
        function_type: args.function_type,
        listen: "127.0.0.1:0".parse().expect("a valid address"),
        // The function's output is not part of the figures.
        on_log: Arc::new(|_: LogLine| {}),
        on_invocation: None,
        snapshot,
        connections: crate::http_server::ConnectionLimits::default(),
        sandbox: None,
        network: Default::default(),
    }
}

fn launch(home: &Home, pulled: &PulledImage, opts: LaunchOptions) -> Result<run::Session> {
    run::launch(home, pulled, opts).map_err(|e| match e {
        run::LaunchError::Sandbox(e) => anyhow::Error::new(e).context("the function did not start"),
        run::LaunchError::Other(e) => e.context("the function did not start"),
    })
}

/// One launch as [`start_and_call`] measured it.
struct Started {
    /// Asking the sandbox to start → the function listening.
    start: Duration,
    /// Where the sandbox says that time went.
    phases: Vec<(&'static str, Duration)>,
    first: Duration,
    second: Duration,
}

/// One launch: its start time and phases, then two calls' times; stopped afterwards.
fn start_and_call(
    home: &Home,
    pulled: &PulledImage,
    kind: SandboxKind,
    args: &BenchArgs,
    snapshot: bool,
) -> Result<Started> {
    let session = launch(home, pulled, options(kind, args, snapshot))?;
    let start = session.start_time;
    let phases = session.instance.start_info().phases;
    let calls = call(&session, args).and_then(|first| Ok((first, call(&session, args)?)));
    session.stop()?;
    let (first, second) = calls?;
    Ok(Started {
        start,
        phases,
        first,
        second,
    })
}

/// One snapshot start: start time, first call, and the VMM's resume as the instance measured it.
fn restore_and_call(
    home: &Home,
    pulled: &PulledImage,
    args: &BenchArgs,
) -> Result<(Duration, Duration, Duration)> {
    let session = launch(home, pulled, options(SandboxKind::Vm, args, true))?;
    let info = session.instance.start_info();
    let start = session.start_time;
    let first = call(&session, args);
    let restore = session.instance.restore_report();
    session.stop()?;
    let first = first?;
    if info.kind != sandbox::ColdStart::Snapshot {
        bail!(
            "a snapshot start booted instead{}",
            info.note.map(|n| format!(": {n}")).unwrap_or_default()
        );
    }
    let resume = restore.context("the restored instance reported no restore figures")?;
    Ok((
        start,
        first,
        Duration::from_secs_f64(resume.resume_ms / 1000.0),
    ))
}

/// One call as a client makes it; anything but a 2xx reply ends the bench with it.
fn call(session: &run::Session, args: &BenchArgs) -> Result<Duration> {
    let (method, body) = match args.function_type {
        FunctionType::Event => ("POST", EVENT),
        FunctionType::Web => ("GET", ""),
    };
    let Reply {
        status,
        body,
        elapsed,
        ..
    } = demo::call(session.addr, method, body)?;
    if !(200..300).contains(&status) {
        bail!("the function answered {status}: {}", body.trim_end());
    }
    Ok(elapsed)
}

/// Nearest-rank quantile `q` (0.99 for p99) of `samples`.
fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len().max(1));
    s.get(rank - 1).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the figures were measured on.
struct Header {
    image: String,
    digest: String,
    sandbox: SandboxKind,
    function_type: FunctionType,
    runs: usize,
    machine: BTreeMap<&'static str, String>,
}

impl Header {
    fn new(args: &BenchArgs, pulled: &PulledImage, sandbox: SandboxKind, runs: usize) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| {
                c.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_else(|_| "unknown".into());
        let machine = BTreeMap::from([
            ("cpu", cpu),
            ("cpus", cpus.to_string()),
            ("kernel", kernel),
            ("fnvm", env!("CARGO_PKG_VERSION").to_string()),
            (
                "hardware_virtualization",
                fnvm_vmm::host::HostCapabilities::probe()
                    .hardware_virtualization
                    .to_string(),
            ),
        ]);
        Header {
            image: args.image.clone(),
            digest: pulled.image.digest.to_string(),
            sandbox,
            function_type: args.function_type,
            runs,
            machine,
        }
    }
}

fn json(header: &Header, kinds: &[(&'static str, Kind)]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (name, kind) in kinds {
        let value = match kind {
            // Phases in the order they happen (a list: JSON objects have no order).
            Kind::Measured(phases) => {
                let p: Vec<serde_json::Value> = phases
                    .iter()
                    .map(|(phase, samples)| {
                        serde_json::json!({
                            "phase": phase,
                            "p50_ms": ms(quantile(samples, 0.5)),
                            "p90_ms": ms(quantile(samples, 0.9)),
                            "p99_ms": ms(quantile(samples, 0.99)),
                            "samples_ms": samples.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                serde_json::json!({ "phases": p })
            }
            Kind::NotRun(why) => serde_json::json!({ "not_run": why }),
        };
        out.insert((*name).into(), value);
    }
    serde_json::json!({
        "image": header.image,
        "digest": header.digest,
        "sandbox": header.sandbox.to_string(),
        "type": header.function_type.to_string(),
        "runs": header.runs,
        "machine": header.machine,
        "kinds": out,
    })
}

fn print_table(header: &Header, kinds: &[(&'static str, Kind)]) {
    println!(
        "fnvm bench: {} ({}), {} function, {} sandbox, {} runs of each kind",
        header.image, header.digest, header.function_type, header.sandbox, header.runs
    );
    let m = &header.machine;
    println!(
        "machine: {}, {} CPUs, Linux {}, hardware virtualization {}; fnvm {}",
        m["cpu"], m["cpus"], m["kernel"], m["hardware_virtualization"], m["fnvm"]
    );
    println!();
    println!(
        "{:<10} {:<34} {:>11} {:>11} {:>11}",
        "kind", "phase", "p50", "p90", "p99"
    );
    for (name, kind) in kinds {
        match kind {
            Kind::Measured(phases) => {
                for (phase, samples) in phases {
                    let cell = |q| format!("{:.2} ms", ms(quantile(samples, q)));
                    println!(
                        "{name:<10} {phase:<34} {:>11} {:>11} {:>11}",
                        cell(0.5),
                        cell(0.9),
                        cell(0.99)
                    );
                }
            }
            Kind::NotRun(why) => println!("{name:<10} not run: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let d = |n| Duration::from_millis(n);
        let s: Vec<Duration> = (1..=10).map(d).collect();
        assert_eq!(quantile(&s, 0.5), d(5));
        assert_eq!(quantile(&s, 0.9), d(9));
        assert_eq!(quantile(&s, 0.99), d(10));
        assert_eq!(quantile(&[d(7)], 0.99), d(7));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
