//! `fnvm`: the command line of the function platform.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod agent_binary;
mod cli;
mod example_image;
mod function;
mod home;
mod http_front;
mod kernel;
mod sandbox;

/// Runs OCI container images as serverless functions, each in its own KVM micro-VM.
#[derive(Debug, Parser)]
#[command(name = "fnvm", version, about)]
struct Cli {
    /// The one directory holding the blob store, rootfs images, kernels, snapshots and state
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

    let result = home::Home::resolve(cli.home).and_then(|home| match cli.command {
        Command::Vm(cmd) => cli::vm::run(&home, cmd),
        Command::Image(cmd) => cli::image::run(&home, cmd),
        Command::Run(args) => cli::run::run(&home, args),
        Command::Demo(args) => cli::demo::run(&home, args),
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("fnvm: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
