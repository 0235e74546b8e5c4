//! `fnvm run IMAGE`: one function in the foreground, like a local emulator.
//!
//! Pull (or find cached) the image → merge its config with the function's settings → start an
//! instance in a sandbox → serve invocations on a host address through [`crate::invoke::front`],
//! streaming the function's stdout/stderr to the terminal → on Ctrl-C (or SIGTERM) or when the
//! function exits, stop the instance, which removes every trace of it (writable layer included).
//!
//! Output: the function's log lines go to stdout (timestamped, with their stream name); fnvm's
//! own messages go to stderr, each starting with `fnvm: `.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use fnvm_rootfs_builder::pipeline::{self, HomeDirs, Progress, PullOptions, PulledImage};
use fnvm_rootfs_builder::reference::{self, ImageReference};
use fnvm_rootfs_builder::registry::RegistryOptions;

use crate::function::{self, FunctionSettings};
use crate::home::Home;
use crate::invoke::front::{self, Front, InvocationHook, InvocationRecord};
use crate::invoke::FunctionType;
use crate::network::HostNetwork;
use crate::sandbox::{self, Instance, InstanceSpec, LogLine, LogStream, SandboxError, SandboxKind};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The image: REGISTRY/REPO@sha256:HEX, REGISTRY/REPO:TAG, oci:PATH[:TAG] or
    /// docker-archive:PATH.
    pub image: String,
    /// Where the instance runs (default: vm where the host has VMX/SVM, else process).
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxKind>,
    /// Replaces the image's Entrypoint (and drops its Cmd).
    #[arg(long)]
    pub command: Option<String>,
    /// An argument (repeatable); replaces the image's Cmd.
    #[arg(long = "arg", allow_hyphen_values = true, value_name = "ARG")]
    pub args: Vec<String>,
    /// An environment variable NAME=VALUE (repeatable); wins over the image's and the built-ins.
    #[arg(long = "env", value_parser = function::parse_env_assignment, value_name = "NAME=VALUE")]
    pub env: Vec<(String, String)>,
    /// The function's memory in MiB (the VM's memory / the process sandbox's cgroup limit).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(64..=3072))]
    pub memory: u32,
    /// event: a POST to the address is delivered as POST /event-invoke with X-Scf-* headers;
    /// web: requests pass through unchanged.
    #[arg(long = "type", value_enum, default_value_t = FunctionType::Event)]
    pub function_type: FunctionType,
    /// The host address to serve invocations on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,
    /// Seconds an invocation may take until the function answers (1..=900).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=900))]
    pub timeout: u32,
    /// The function's name (SCF_FUNCTIONNAME, X-Scf-Name).
    #[arg(long, default_value = "fnvm-run")]
    pub name: String,
    /// Snapshot start (vm sandbox): restore this function version's snapshot if there is one,
    /// else boot and snapshot the instance once its server listens, for the next run.
    #[arg(long)]
    pub snapshot: bool,
    #[command(flatten)]
    pub network: super::NetworkArgs,
    /// A resolver for the function's DNS queries (repeatable; default: the host's
    /// /etc/resolv.conf).
    #[arg(long = "dns", value_name = "ADDR")]
    pub dns: Vec<std::net::IpAddr>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    #[command(flatten)]
    pub connections: crate::http_server::ConnectionLimits,
}

/// How to reach a registry, as for `fnvm image pull`.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryArgs {
    /// Registry user (else FNVM_REGISTRY_USER, else the docker auth file).
    #[arg(long)]
    pub registry_user: Option<String>,
    /// Registry password (else FNVM_REGISTRY_PASSWORD, else the docker auth file).
    #[arg(long)]
    pub registry_password: Option<String>,
    /// A registry host[:port] that may be spoken to over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// A PEM file of CA certificates to trust for the registry.
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
}

/// Pulls `image` through the image pipeline (a cache hit costs a manifest read), printing
/// progress to stderr.
pub fn pull_image(home: &Home, image: &str, registry: &RegistryArgs) -> Result<PulledImage> {
    let (reference, options) = pull_options(image, registry)?;
    let started = Instant::now();
    let mut progress = |p: Progress| match p {
        Progress::Unpack { index, count, .. } => {
            eprintln!("fnvm: unpacking layer {index}/{count}")
        }
        Progress::BuildImage => eprintln!("fnvm: building the rootfs image"),
        _ => {}
    };
    let pulled = pipeline::pull(
        &reference,
        &HomeDirs::under(home.root()),
        &options,
        &mut progress,
    )
    .with_context(|| format!("cannot pull {image}"))?;
    eprintln!(
        "fnvm: image {} ({}){}",
        image,
        pulled.image.digest,
        if pulled.cache_hit {
            " cached".to_string()
        } else {
            format!(" pulled in {} ms", started.elapsed().as_millis())
        }
    );
    Ok(pulled)
}

/// The parsed reference of `image` and how to pull it (credentials, plain-HTTP registries, CA).
pub fn pull_options(image: &str, registry: &RegistryArgs) -> Result<(ImageReference, PullOptions)> {
    let reference =
        reference::parse(image).with_context(|| format!("{image:?} is not an image reference"))?;
    let mut options = PullOptions::default();
    if let ImageReference::Registry(r) = &reference {
        options.registry = RegistryOptions {
            credentials: fnvm_rootfs_builder::credentials::resolve(
                registry.registry_user.as_deref(),
                registry.registry_password.as_deref(),
                &r.registry,
            )?,
            insecure_registries: registry.insecure_registries.clone(),
            ca_file: registry.registry_ca.clone(),
            ..RegistryOptions::default()
        };
    } else if registry.registry_user.is_some() || registry.registry_password.is_some() {
        bail!("--registry-user/--registry-password only apply to registry images, not {image}");
    }
    Ok((reference, options))
}

/// A started function and its front, until [`Session::stop`].
pub struct Session {
    pub instance: Arc<dyn Instance>,
    pub kind: SandboxKind,
    /// Where the front listens.
    pub addr: SocketAddr,
    /// From asking the sandbox to start to the function listening on port 9000.
    pub start_time: Duration,
    runtime: tokio::runtime::Runtime,
    /// Resolves when SIGINT or SIGTERM arrives.
    interrupted: tokio::sync::watch::Receiver<bool>,
}

/// How a session ended.
pub enum Ended {
    Interrupted,
    Exited(sandbox::ExitReport),
}

/// What to start and how to serve it.
pub struct LaunchOptions {
    pub kind: SandboxKind,
    pub settings: FunctionSettings,
    pub function_type: FunctionType,
    pub listen: SocketAddr,
    pub on_log: Arc<dyn Fn(LogLine) + Send + Sync>,
    pub on_invocation: Option<InvocationHook>,
    /// Use (and write) the function version's snapshot: vm sandbox only.
    pub snapshot: bool,
    /// The front's timeouts and connection cap.
    pub connections: crate::http_server::ConnectionLimits,
    /// Start in this sandbox (say one with standbys, as `fnvm serve` makes it) instead of a
    /// new one of `kind`.
    pub sandbox: Option<Arc<dyn sandbox::Sandbox>>,
    /// How the function's traffic leaves the host (its resolvers).
    pub network: HostNetwork,
}

/// Why a launch failed: the sandbox's own error (with the function's last lines), or anything
/// else on the way.
pub enum LaunchError {
    Sandbox(SandboxError),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for LaunchError {
    fn from(e: anyhow::Error) -> Self {
        LaunchError::Other(e)
    }
}

/// Starts `image` in a sandbox and serves it. Ctrl-C during the start is remembered and ends
/// the session right after the start returns (the start cannot be cut short safely).
pub fn launch(
    home: &Home,
    image: &PulledImage,
    opts: LaunchOptions,
) -> Result<Session, LaunchError> {
    let start = function::start_spec(&image.image.config, &opts.settings)
        .context("the function cannot be started as configured")?;
    // Bind first: a busy port should fail before a slow start, not after.
    let listener =
        front::bind(opts.listen).with_context(|| format!("cannot listen on {}", opts.listen))?;
    let addr = listener.local_addr().context("the front's address")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fnvm-front")
        .build()
        .context("cannot start the async runtime")?;
    let interrupted = runtime
        .block_on(watch_signals())
        .context("cannot handle signals")?;

    let sandbox: Arc<dyn sandbox::Sandbox> = match opts.sandbox {
        Some(sandbox) => sandbox,
        None => Arc::from(
            sandbox::create(opts.kind, home, &opts.network).map_err(LaunchError::Sandbox)?,
        ),
    };
    let id = sandbox::new_instance_id();
    // Absolute: the agent is handed paths inside it and runs from another directory.
    let instance_dir = std::path::absolute(
        sandbox::instances_root(home)
            .context("the instances directory")?
            .join(&id),
    )
    .context("the instance directory")?;
    let spec = InstanceSpec {
        id,
        rootfs_image: image.rootfs_image.clone(),
        start,
        memory_mib: opts.settings.memory_mib,
        instance_dir,
        snapshot: opts.snapshot,
        network: opts.settings.network.clone(),
        on_log: opts.on_log,
    };
    // The sandbox's start cannot be cut short: say so if Ctrl-C comes while it runs.
    let starting = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let starting = Arc::clone(&starting);
        let mut interrupted = interrupted.clone();
        runtime.spawn(async move {
            if interrupted.wait_for(|v| *v).await.is_ok()
                && starting.load(std::sync::atomic::Ordering::SeqCst)
            {
                eprintln!(
                    "fnvm: interrupted; stopping as soon as the start returns (at most {} s)",
                    fnvm_agent::protocol::READY_TIMEOUT_MS / 1000
                );
            }
        })
    };
    let started = Instant::now();
    let result = sandbox.start(spec);
    starting.store(false, std::sync::atomic::Ordering::SeqCst);
    watcher.abort();
    let instance: Arc<dyn Instance> = Arc::from(result.map_err(LaunchError::Sandbox)?);
    let start_time = started.elapsed();

    let mut front = Front::new(Arc::clone(&instance), opts.settings, opts.function_type);
    if let Some(f) = opts.on_invocation {
        front = front.on_invocation(f);
    }
    let front = Arc::new(front);
    let _guard = runtime.enter();
    let listener = tokio::net::TcpListener::from_std(listener).context("the front's listener")?;
    let mut connections = opts.connections;
    crate::http_server::raise_nofile(&mut connections, 0);
    runtime.spawn(front.serve(listener, connections));
    Ok(Session {
        instance,
        kind: opts.kind,
        addr,
        start_time,
        runtime,
        interrupted,
    })
}

/// A watch that turns true on the first SIGINT or SIGTERM.
async fn watch_signals() -> std::io::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

impl Session {
    /// Blocks until Ctrl-C/SIGTERM or the function's exit.
    pub fn wait(&self) -> Ended {
        let instance = Arc::clone(&self.instance);
        let mut interrupted = self.interrupted.clone();
        self.runtime.block_on(async move {
            let exit = tokio::task::spawn_blocking(move || instance.wait_exit());
            tokio::select! {
                _ = interrupted.wait_for(|v| *v) => Ended::Interrupted,
                report = exit => match report {
                    Ok(r) => Ended::Exited(r),
                    // The waiting thread panicked: treat it as the end of the function.
                    Err(e) => Ended::Exited(sandbox::ExitReport {
                        code: None,
                        signal: None,
                        last_lines: Vec::new(),
                        reason: format!("lost track of the function: {e}"),
                    }),
                },
            }
        })
    }

    /// True once Ctrl-C or SIGTERM has arrived.
    pub fn interrupted(&self) -> bool {
        *self.interrupted.borrow()
    }

    /// Stops the instance (removing every trace of it) and the front.
    pub fn stop(self) -> Result<()> {
        let result = self.instance.stop().context("stopping the instance");
        // The exit waiter returns once the instance is stopped; don't hang on anything else.
        self.runtime.shutdown_timeout(Duration::from_secs(2));
        result
    }
}

/// Prints one function log line to stdout: `2026-01-02T03:04:05.678Z stdout  the line`.
pub fn print_log_line(line: &LogLine) {
    let when = UNIX_EPOCH + Duration::from_micros(line.unix_time_us);
    let stream = match line.stream {
        LogStream::Stdout => "stdout",
        LogStream::Stderr => "stderr",
    };
    let mut out = std::io::stdout().lock();
    // A closed stdout must not take the function down with it.
    let _ = writeln!(
        out,
        "{} {stream} {}",
        humantime::format_rfc3339_millis(when),
        line.line
    );
}

/// Prints why the function ended and its last lines (stderr).
pub fn print_exit(report: &sandbox::ExitReport) {
    eprintln!("fnvm: the function {}", report.reason);
    if !report.last_lines.is_empty() {
        eprintln!("fnvm: its last lines:");
        for line in &report.last_lines {
            eprintln!("fnvm: | {line}");
        }
    }
}

/// The process exit code for a function that ended on its own.
pub fn exit_code_for(report: &sandbox::ExitReport) -> ExitCode {
    match (report.code, report.signal) {
        (Some(0), _) => ExitCode::SUCCESS,
        (Some(code), _) => ExitCode::from(u8::try_from(code.clamp(1, 255)).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(u8::try_from((128 + sig).clamp(129, 255)).unwrap_or(1)),
        (None, None) => ExitCode::FAILURE,
    }
}

/// Reports a failed launch on stderr and gives the exit code.
pub fn report_launch_error(err: LaunchError) -> Result<ExitCode> {
    match err {
        LaunchError::Other(e) => Err(e),
        LaunchError::Sandbox(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("fnvm: error: the function did not start: {text}");
            let lines = e.last_lines();
            if !lines.is_empty() {
                eprintln!("fnvm: its last lines:");
                for line in lines {
                    eprintln!("fnvm: | {line}");
                }
            }
            Ok(match &e {
                SandboxError::Exited(report) if report.code.is_some_and(|c| c != 0) => {
                    exit_code_for(report)
                }
                _ => ExitCode::FAILURE,
            })
        }
    }
}

/// How an instance's start is called: in a VM a boot or a snapshot start; the process sandbox
/// only has one kind of cold start.
pub fn start_kind_label(kind: SandboxKind, start: &sandbox::StartInfo) -> &'static str {
    match (kind, start.kind) {
        (SandboxKind::Vm, sandbox::ColdStart::Snapshot) => "snapshot start",
        (SandboxKind::Vm, sandbox::ColdStart::Boot) => "boot start",
        (SandboxKind::Process, _) => "cold start",
    }
}

/// Refuses `--snapshot` where it cannot work, naming why.
pub fn check_snapshot_option(kind: SandboxKind, snapshot: bool) -> Result<()> {
    if snapshot && kind != SandboxKind::Vm {
        bail!(
            "--snapshot needs the vm sandbox (snapshots are of micro-VMs); this run uses the \
             {kind} sandbox{}",
            if sandbox::default_kind() == SandboxKind::Process {
                " because this host has no hardware virtualization (VMX/SVM)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Prints how a restore went (the first invocation of a snapshot start).
pub fn print_restore(report: &sandbox::RestoreReport) {
    eprintln!("fnvm: snapshot start: {report}");
}

pub fn run(home: &Home, args: RunArgs) -> Result<ExitCode> {
    let kind = args.sandbox.unwrap_or_else(sandbox::default_kind);
    let mut settings = FunctionSettings::local(&args.name);
    settings.memory_mib = args.memory;
    settings.timeout_s = args.timeout;
    settings.command = args.command;
    settings.args = args.args;
    settings.env = args.env;
    settings.network = args.network.policy()?;
    // Bad settings fail before anything is pulled.
    function::validate(&settings)?;
    check_snapshot_option(kind, args.snapshot)?;
    // Instances left by an fnvm that crashed or was killed (processes, mounts, loop devices,
    // cgroups, files); live instances of other fnvm processes are left alone.
    let report = sandbox::cleanup_orphans(home).context("cannot clean up orphaned instances")?;
    tracing::info!(?report, "orphans cleaned up");
    let pulled = pull_image(home, &args.image, &args.registry)?;
    let on_invocation: Option<InvocationHook> = match args.function_type {
        FunctionType::Event => Some(Arc::new(|r: &InvocationRecord| {
            eprintln!(
                "fnvm: invocation {} ({} {}) -> {} in {:.2} ms",
                r.request_id,
                r.method,
                r.path,
                r.status.as_u16(),
                r.duration.as_secs_f64() * 1000.0
            );
            if let Some(restore) = &r.restore {
                print_restore(restore);
            }
        })),
        FunctionType::Web => Some(Arc::new(|r: &InvocationRecord| {
            if let Some(restore) = &r.restore {
                print_restore(restore);
            }
        })),
    };
    eprintln!("fnvm: starting {} in the {kind} sandbox", args.image);
    let session = match launch(
        home,
        &pulled,
        LaunchOptions {
            kind,
            settings,
            function_type: args.function_type,
            listen: args.listen,
            on_log: Arc::new(|l: LogLine| print_log_line(&l)),
            on_invocation,
            snapshot: args.snapshot,
            connections: args.connections.clone(),
            sandbox: None,
            network: HostNetwork { dns: args.dns },
        },
    ) {
        Ok(s) => s,
        Err(e) => return report_launch_error(e),
    };
    let start = session.instance.start_info();
    eprintln!(
        "fnvm: started in {} ms ({}, {} sandbox), instance {}",
        session.start_time.as_millis(),
        start_kind_label(session.kind, &start),
        session.kind,
        session.instance.id()
    );
    if let Some(note) = &start.note {
        eprintln!("fnvm: {note}");
    }
    let how = match args.function_type {
        FunctionType::Event => "POST invokes the function",
        FunctionType::Web => "requests pass through to the function",
    };
    eprintln!(
        "fnvm: serving the {} function on http://{} ({how}; Ctrl-C stops)",
        args.function_type, session.addr
    );
    let ended = if session.interrupted() {
        Ended::Interrupted
    } else {
        session.wait()
    };
    match ended {
        Ended::Interrupted => {
            eprintln!("fnvm: stopping");
            session.stop()?;
            eprintln!("fnvm: stopped; the instance and its writable layer are removed");
            Ok(ExitCode::SUCCESS)
        }
        Ended::Exited(report) => {
            print_exit(&report);
            session.stop()?;
            eprintln!("fnvm: stopped; the instance and its writable layer are removed");
            Ok(exit_code_for(&report))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(code: Option<i32>, signal: Option<i32>) -> sandbox::ExitReport {
        sandbox::ExitReport {
            code,
            signal,
            last_lines: vec![],
            reason: String::new(),
        }
    }

    #[test]
    fn exit_codes_follow_the_function() {
        assert_eq!(exit_code_for(&report(Some(0), None)), ExitCode::SUCCESS);
        assert_eq!(exit_code_for(&report(Some(3), None)), ExitCode::from(3));
        assert_eq!(exit_code_for(&report(Some(300), None)), ExitCode::from(255));
        assert_eq!(exit_code_for(&report(None, Some(11))), ExitCode::from(139));
        assert_eq!(exit_code_for(&report(None, None)), ExitCode::FAILURE);
    }
}
