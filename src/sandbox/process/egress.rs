//! A process sandbox's way out: pasta on its network namespace, and the namespace's rules
//! for the function's policy (see [`crate::network`]). A standby sandbox gets both with the
//! default policy before its function is known; placing a function changes the rules if its
//! policy differs, or takes the network away for `--network none` (stopping pasta removes its
//! `eth0`).

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use super::cgroup::Cgroup;
use crate::network::filter::{host_addresses, load_in, namespace_ruleset};
use crate::network::pasta::Pasta;
use crate::network::{HostNetwork, NetworkError, NetworkPolicy};
use crate::sandbox::SandboxError;

/// A sandbox's egress: its namespace, the rules loaded there and the pasta serving it.
pub(super) struct Egress {
    netns: OwnedFd,
    loaded: NetworkPolicy,
    pasta: Option<Pasta>,
    /// What this start spent on the network (a phase): the set-up, or changing a standby's
    /// policy; None for a standby whose default policy was the function's.
    pub took: Option<std::time::Duration>,
}

impl Egress {
    /// Egress for the network namespace of process `pid` (the agent), under `policy`: the
    /// rules first, so the function never has a moment without them, then pasta.
    pub fn attach(
        pid: i32,
        host: &HostNetwork,
        policy: &NetworkPolicy,
        cgroup: Option<&Cgroup>,
        dir: &Path,
    ) -> Result<Egress, SandboxError> {
        let path = format!("/proc/{pid}/ns/net");
        let began = std::time::Instant::now();
        let netns: OwnedFd = std::fs::File::open(&path)
            .map_err(|cause| failed(NetworkError::Namespace { path, cause }))?
            .into();
        let mut egress = Egress {
            netns,
            loaded: policy.clone(),
            pasta: None,
            took: Default::default(),
        };
        egress.load(policy)?;
        let join = cgroup.map(Cgroup::helper_join_files).unwrap_or_default();
        egress.pasta = Some(Pasta::attach(egress.netns.as_fd(), host, &join, dir).map_err(failed)?);
        egress.took = Some(began.elapsed());
        Ok(egress)
    }

    /// Puts `policy` in force: new rules if they differ, or no network at all for `none`.
    pub fn apply(&mut self, policy: &NetworkPolicy) -> Result<(), SandboxError> {
        let began = std::time::Instant::now();
        if !policy.has_egress() {
            self.stop();
        } else if *policy != self.loaded {
            self.load(policy)?;
        } else {
            return Ok(());
        }
        self.took = Some(began.elapsed());
        Ok(())
    }

    /// Stops pasta: the namespace is left with loopback only.
    pub fn stop(&mut self) {
        if let Some(mut pasta) = self.pasta.take() {
            pasta.stop();
        }
    }

    fn load(&mut self, policy: &NetworkPolicy) -> Result<(), SandboxError> {
        let host = host_addresses().map_err(failed)?;
        load_in(self.netns.as_fd(), &namespace_ruleset(policy, &host)).map_err(failed)?;
        self.loaded = policy.clone();
        Ok(())
    }
}

fn failed(e: NetworkError) -> SandboxError {
    SandboxError::setup("cannot give the function its network", e)
}
