//! `fnvm serve`: the host service. Cleans up what a crashed service left behind, loads the
//! function store, restores active functions into the pool, and serves the HTTP API until
//! SIGINT/SIGTERM, then stops every instance.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use crate::home::Home;
use crate::http_server::{self, Admission, ConnectionLimits};
use crate::network::HostNetwork;
use crate::sandbox::{self, SandboxKind};
use crate::service::api::{ApiConfig, Service};
use crate::service::logs::LogStore;
use crate::service::metrics::Metrics;
use crate::service::pool::{Pool, PoolConfig};
use anyhow::{Context, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The API's address.
    #[arg(long, default_value = "127.0.0.1:9900")]
    pub listen: SocketAddr,
    /// Where instances run (default: vm where the host has VMX/SVM, else process).
    #[arg(long, value_enum)]
    pub sandbox: Option<SandboxKind>,
    /// A bearer token every API call but /healthz must carry.
    #[arg(long, env = "FNVM_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Host-wide budget for the sum of guest memory, MiB.
    #[arg(long, default_value_t = 4096)]
    pub memory_budget: u64,
    /// Seconds an idle instance is kept before it is stopped.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout: u64,
    /// Seconds a request waits for capacity before it gets 429.
    #[arg(long, default_value_t = 10)]
    pub queue_timeout: u64,
    /// Log bytes kept per function.
    #[arg(long, default_value_t = 16 << 20)]
    pub log_retention_bytes: u64,
    /// A registry host[:port] every deploy may reach over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// A PEM file of CA certificates to trust for registries.
    #[arg(long, value_name = "FILE")]
    pub registry_ca: Option<PathBuf>,
    #[command(flatten)]
    pub connections: ConnectionLimits,
    /// Connections kept past --max-connections for /healthz, /metrics and management calls
    /// (one request each; invocations there are refused with 503).
    #[arg(long, env = "FNVM_RESERVED_CONNECTIONS", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub reserved_connections: u32,
    /// A resolver for functions' DNS queries (repeatable; default: the host's
    /// /etc/resolv.conf).
    #[arg(long = "dns", value_name = "ADDR")]
    pub dns: Vec<std::net::IpAddr>,
}

pub fn run(home: &Home, args: ServeArgs) -> Result<ExitCode> {
    if args.api_token.as_deref() == Some("") {
        anyhow::bail!("--api-token/FNVM_API_TOKEN is empty; give a token or leave it unset");
    }
    let _one_serve_per_home = home.lock_for_service()?;
    fnvm_rootfs_builder::pipeline::remove_stale_temporaries(
        &fnvm_rootfs_builder::pipeline::HomeDirs::under(home.root()),
    )
    .context("cannot clean up what crashed pulls left")?;
    let kind = args.sandbox.unwrap_or_else(sandbox::default_kind);
    let report = sandbox::cleanup_orphans(home).context("cannot clean up orphaned instances")?;
    tracing::info!(?report, "orphans cleaned up");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fnvm-serve")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(home, kind, args))?;
    // Instances are stopped; don't wait on stray connections.
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

async fn serve(home: &Home, kind: SandboxKind, mut args: ServeArgs) -> Result<()> {
    http_server::raise_nofile(&mut args.connections, args.reserved_connections);
    let sandbox: Arc<dyn sandbox::Sandbox> = Arc::from(
        sandbox::create_for_service(
            kind,
            home,
            &HostNetwork {
                dns: args.dns.clone(),
            },
        )
        .with_context(|| format!("cannot set up the {kind} sandbox"))?,
    );
    let logs = LogStore::open(home.root().join("service/logs"), args.log_retention_bytes)
        .context("cannot open the log store")?;
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(
        sandbox,
        home.clone(),
        PoolConfig {
            memory_budget_mib: args.memory_budget,
            idle_timeout: Duration::from_secs(args.idle_timeout),
            queue_timeout: Duration::from_secs(args.queue_timeout),
        },
        Arc::clone(&logs),
        Arc::clone(&metrics),
    );
    let service = Service::new(
        home.clone(),
        Arc::clone(&pool),
        Arc::clone(&logs),
        Arc::clone(&metrics),
        ApiConfig {
            api_token: args.api_token,
            insecure_registries: args.insecure_registries,
            registry_ca: args.registry_ca,
            connections: args.connections.clone(),
        },
    )?;
    let timers = crate::service::timers::Timers::start(Arc::clone(&pool));
    {
        let timers = Arc::clone(&timers);
        service.set_schedule_hook(Box::new(move |key, schedules| {
            if schedules.is_empty() {
                timers.remove(key);
            } else if let Err(e) = timers.set(key, schedules) {
                tracing::warn!(function = %key, error = %e, "cannot set the timer schedules");
            }
        }));
    }
    service.activate_restored();

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr().context("the API's address")?;
    // Tests and scripts wait for this line.
    eprintln!("fnvm: serving the API on http://{addr} ({kind} sandbox)");

    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    };
    let make_service = |admission: Admission| {
        let service = Arc::clone(&service);
        hyper::service::service_fn(move |req| Arc::clone(&service).handle(req, admission))
    };
    http_server::serve(
        listener,
        args.connections.clone(),
        args.reserved_connections,
        make_service,
        stop,
    )
    .await;
    eprintln!("fnvm: stopping: every instance is being stopped");
    timers.shutdown();
    pool.shutdown().await;
    Ok(())
}
