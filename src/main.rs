//! `fnvm`: the command line of the function platform. It parses the command and hands it to
//! `cli/`; everything the commands run lives in the library (`src/lib.rs`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

// The library's modules under their old names at the binary's root, so `cli/` keeps naming
// them `crate::home`, `crate::sandbox`, ... as it did before the library existed.
use fnvm::{
    agent_binary, example_image, function, home, http_server, invoke, kernel, network, sandbox,
    service,
};

/// Runs OCI container images as serverless functions, each in its own KVM micro-VM.
#[derive(Debug, Parser)]
#[command(name = "fnvm", version, about)]
struct Cli {
    /// The one directory holding the blob store, rootfs images, snapshots and state
    /// (default: /var/lib/fnvm for root, else $XDG_DATA_HOME/fnvm).
    #[arg(long, env = "FNVM_HOME", global = true)]
    home: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot and inspect micro-VMs directly.
    #[command(subcommand)]
    Vm(cli::vm::VmCommand),
    /// The image pipeline on its own: pull, verify, unpack and build the rootfs.
    #[command(subcommand)]
    Image(cli::image::ImageCommand),
    /// Run one function in the foreground, like a local emulator: invocations on an address,
    /// logs streamed, Ctrl-C stops and cleans up.
    Run(cli::run::RunArgs),
    /// Build the bundled example function, run it, invoke it and show its reply, logs and timings.
    Demo(cli::demo::DemoArgs),
    /// Measure a function's cold starts: pull, boot start, snapshot start and warm call, each
    /// phase as p50/p90/p99 (a table, or --json).
    Bench(cli::bench::BenchArgs),
    /// The host service: the HTTP API, function store, instance pool, logs, timers, metrics.
    Serve(cli::serve::ServeArgs),
    /// Create or update a function on `fnvm serve` (waits until it is active or failed).
    Deploy(cli::client::DeployArgs),
    /// Invoke an event function synchronously and print its reply.
    Invoke(cli::client::InvokeArgs),
    /// Print a function's log lines (by request id, the last N, or following).
    Logs(cli::client::LogsArgs),
    /// List the functions of a namespace.
    Ls(cli::client::LsArgs),
    /// Remove a function (its instances stop).
    Rm(cli::client::RmArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FNVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let result = home::Home::resolve(cli.home)
        .map_err(anyhow::Error::from)
        .and_then(|home| match cli.command {
            Command::Vm(cmd) => cli::vm::run(cmd),
            Command::Image(cmd) => cli::image::run(&home, cmd),
            Command::Run(args) => cli::run::run(&home, args),
            Command::Demo(args) => cli::demo::run(&home, args),
            Command::Bench(args) => cli::bench::run(&home, args),
            Command::Serve(args) => cli::serve::run(&home, args),
            Command::Deploy(args) => cli::client::deploy(args),
            Command::Invoke(args) => cli::client::invoke(args),
            Command::Logs(args) => cli::client::logs(args),
            Command::Ls(args) => cli::client::ls(args),
            Command::Rm(args) => cli::client::rm(args),
        });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fnvm: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
