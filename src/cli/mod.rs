//! One module per command group.

pub mod bench;
pub mod client;
pub mod demo;
pub mod image;
pub mod run;
pub mod serve;
pub mod vm;

use clap::Args;

use crate::network::{NetworkMode, NetworkPolicy};

/// A function's network flags (`fnvm run`, `fnvm deploy`).
#[derive(Debug, Args)]
pub struct NetworkArgs {
    /// egress: outbound connections through the host (the host's own addresses, loopback and
    /// link-local/metadata addresses are never reachable); none: loopback only.
    #[arg(long, value_enum, default_value_t = NetworkMode::Egress)]
    pub network: NetworkMode,
    /// A destination range the function never reaches: CIDR or address (repeatable).
    #[arg(long = "egress-deny", value_name = "CIDR")]
    pub egress_deny: Vec<String>,
    /// Reach only these destination ranges (repeatable); --egress-deny still wins.
    #[arg(long = "egress-allow", value_name = "CIDR")]
    pub egress_allow: Vec<String>,
}

impl NetworkArgs {
    /// The flags as a checked policy.
    pub fn policy(&self) -> Result<NetworkPolicy, crate::network::PolicyError> {
        NetworkPolicy::new(self.network, &self.egress_deny, &self.egress_allow)
    }
}
