//! `fnvm image ...`: the image pipeline on its own.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::home::Home;

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Pull an image, verify it and build its rootfs.
    Pull,
    /// Show an image's digest, platform, layers and run config.
    Inspect,
}

pub fn run(_home: &Home, cmd: ImageCommand) -> Result<ExitCode> {
    match cmd {
        ImageCommand::Pull | ImageCommand::Inspect => bail!("fnvm image is not built yet"),
    }
}
