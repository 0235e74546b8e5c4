//! `fnvm image ...`: the image pipeline on its own.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use fnvm_rootfs_builder::credentials;
use fnvm_rootfs_builder::pipeline::{self, HomeDirs, Progress, PullOptions};
use fnvm_rootfs_builder::reference::{self, ImageReference};
use fnvm_rootfs_builder::registry::RegistryOptions;

use crate::home::Home;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image, verify it and build its rootfs; prints the pinned digest and the
    /// rootfs image path.
    Pull(ImageArgs),
    /// Show an image's digest, platform, layers and run config as JSON (downloads only
    /// manifests and the config).
    Inspect(ImageArgs),
}

#[derive(Debug, Args)]
pub struct ImageArgs {
    /// REGISTRY/REPO@sha256:HEX, REGISTRY/REPO:TAG, oci:PATH[:TAG] or docker-archive:PATH.
    #[arg(value_name = "REF")]
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
}

/// Registry access. Credentials may also come from FNVM_REGISTRY_USER /
/// FNVM_REGISTRY_PASSWORD (preferred: flags are visible in the process list) or a
/// docker-style auth file (REGISTRY_AUTH_FILE, then ~/.docker/config.json).
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Registry user name.
    #[arg(long, value_name = "USER")]
    registry_user: Option<String>,
    /// Registry password or token (FNVM_REGISTRY_PASSWORD keeps it out of the process list).
    #[arg(long, value_name = "PASSWORD")]
    registry_password: Option<String>,
    /// Allow plain HTTP to this registry host (host or host:port); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registry: Vec<String>,
    /// PEM file with the CA certificate(s) of a private registry.
    #[arg(long, value_name = "FILE")]
    registry_ca: Option<PathBuf>,
}

pub fn run(home: &Home, cmd: ImageCommand) -> Result<ExitCode> {
    match cmd {
        ImageCommand::Pull(args) => pull(home, args),
        ImageCommand::Inspect(args) => inspect(home, args),
    }
}

fn prepare(home: &Home, args: &ImageArgs) -> Result<(ImageReference, HomeDirs, PullOptions)> {
    let reference = reference::parse(&args.reference)
        .with_context(|| format!("bad image reference {:?}", args.reference))?;
    let credentials = match &reference {
        ImageReference::Registry(r) => credentials::resolve(
            args.registry.registry_user.as_deref(),
            args.registry.registry_password.as_deref(),
            &r.registry,
        )
        .with_context(|| format!("registry credentials for {}", r.registry))?,
        _ => None,
    };
    let dirs = HomeDirs {
        blobs: home.dir("blobs")?,
        rootfs: home.dir("rootfs")?,
    };
    let options = PullOptions {
        registry: RegistryOptions {
            credentials,
            insecure_registries: args.registry.insecure_registry.clone(),
            ca_file: args.registry.registry_ca.clone(),
            ..RegistryOptions::default()
        },
        ..PullOptions::default()
    };
    Ok((reference, dirs, options))
}

fn pull(home: &Home, args: ImageArgs) -> Result<ExitCode> {
    let (reference, dirs, options) = prepare(home, &args)?;
    let mut printer = ProgressPrinter::new();
    let pulled = pipeline::pull(&reference, &dirs, &options, &mut |p| printer.show(&p))
        .with_context(|| format!("pulling {reference}"))?;
    printer.finish();
    let mut out = std::io::stdout().lock();
    writeln!(out, "digest: {}", pulled.image.digest)?;
    if pulled.image.manifest_digest != pulled.image.digest {
        writeln!(
            out,
            "manifest: {} ({})",
            pulled.image.manifest_digest, pulled.image.platform
        )?;
    }
    writeln!(out, "rootfs: {}", pulled.rootfs_image.display())?;
    Ok(ExitCode::SUCCESS)
}

fn inspect(home: &Home, args: ImageArgs) -> Result<ExitCode> {
    let (reference, dirs, options) = prepare(home, &args)?;
    let record = pipeline::inspect(&reference, &dirs, &options)
        .with_context(|| format!("inspecting {reference}"))?;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &record).context("writing JSON")?;
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// Progress on stderr: live byte counts on a terminal, one line per blob otherwise.
struct ProgressPrinter {
    live: bool,
    mid_line: bool,
}

impl ProgressPrinter {
    fn new() -> Self {
        Self {
            live: std::io::stderr().is_terminal(),
            mid_line: false,
        }
    }

    fn line(&mut self, text: &str) {
        let mut err = std::io::stderr().lock();
        if self.mid_line {
            let _ = writeln!(err);
            self.mid_line = false;
        }
        let _ = writeln!(err, "{text}");
    }

    fn show(&mut self, p: &Progress) {
        match p {
            Progress::Resolved { digest } => self.line(&format!("resolved {digest}")),
            Progress::CacheHit { manifest_digest } => {
                self.line(&format!("cached rootfs for {manifest_digest}"))
            }
            Progress::Blob {
                index,
                count,
                digest,
                done,
                total,
                already_present,
            } => {
                let what = if *index == 0 { "config" } else { "layer" };
                let short = &digest.hex()[..12];
                if *already_present {
                    self.line(&format!("[{index}/{}] {what} {short}: present", count - 1));
                } else if done == total {
                    self.line(&format!(
                        "[{index}/{}] {what} {short}: {} verified",
                        count - 1,
                        human(*total)
                    ));
                } else if self.live {
                    let mut err = std::io::stderr().lock();
                    let _ = write!(
                        err,
                        "\r[{index}/{}] {what} {short}: {} / {}",
                        count - 1,
                        human(*done),
                        human(*total)
                    );
                    self.mid_line = true;
                }
            }
            Progress::Unpack {
                index,
                count,
                digest,
            } => self.line(&format!(
                "unpacking layer {index}/{count} {}",
                &digest.hex()[..12]
            )),
            Progress::BuildImage => self.line("building rootfs image"),
        }
    }

    fn finish(&mut self) {
        if self.mid_line {
            let _ = writeln!(std::io::stderr());
        }
    }
}

fn human(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}
