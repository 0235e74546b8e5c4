//! `fnvm vm ...`: boot micro-VMs directly.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;

use crate::home::Home;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a guest kernel in a micro-VM, show its console and report how it ended.
    Boot,
}

pub fn run(_home: &Home, cmd: VmCommand) -> Result<ExitCode> {
    match cmd {
        VmCommand::Boot => bail!("fnvm vm boot is not built yet"),
    }
}
