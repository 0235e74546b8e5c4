//! A process sandbox's way out: pasta on its network namespace, and the namespace's rules
//! for the function's policy (see [`crate::network`]). A standby sandbox gets both with the
//! default policy before its function is known; placing a function changes the rules if its
//! policy differs, or takes the network away for `--network none` (stopping pasta removes its
//! `eth0`).
//!
//! A start without a standby begins both (nft and pasta are processes of their own, and run
//! side by side) as soon as the agent exists, and waits for them only before the function is
//! started, so they overlap the rest of the set-up. Until pasta is up the namespace has
//! loopback only, and only the agent runs there.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::network::filter::{
    host_addresses, load_in, namespace_ruleset, policy_additions, replacement_ruleset, Loading,
};
use crate::network::pasta::Pasta;
use crate::network::{HostNetwork, NetworkError, NetworkPolicy};
use crate::sandbox::cgroup::Cgroup;
use crate::sandbox::SandboxError;

/// A sandbox's egress: its namespace, the rules loaded there and the pasta serving it.
pub(super) struct Egress {
    netns: OwnedFd,
    loaded: NetworkPolicy,
    pasta: Option<Pasta>,
    /// The rules being loaded, until [`Egress::ready`].
    loading: Option<Loading>,
    /// What this start waited for the network (a phase): its set-up, or changing a standby's
    /// policy; None for a standby whose default policy was the function's.
    pub took: Option<Duration>,
}

impl Egress {
    /// Begins egress for the network namespace of process `pid` (the agent) under `policy`:
    /// nft and pasta are started, [`Self::ready`] waits for both.
    pub fn begin(
        pid: i32,
        host: &HostNetwork,
        policy: &NetworkPolicy,
        cgroup: Option<&Cgroup>,
        dir: &Path,
    ) -> Result<Egress, SandboxError> {
        let began = Instant::now();
        let path = format!("/proc/{pid}/ns/net");
        let netns: OwnedFd = std::fs::File::open(&path)
            .map_err(|cause| failed(NetworkError::Namespace { path, cause }))?
            .into();
        let ruleset = namespace_ruleset(policy, &host_addresses().map_err(failed)?);
        let loading = Loading::start(netns.as_fd(), &ruleset).map_err(failed)?;
        let join = cgroup.map(Cgroup::helper_join_files).unwrap_or_default();
        let pasta = Pasta::spawn(netns.as_fd(), host, &join, dir).map_err(failed)?;
        Ok(Egress {
            netns,
            loaded: policy.clone(),
            pasta: Some(pasta),
            loading: Some(loading),
            took: Some(began.elapsed()),
        })
    }

    /// [`Self::begin`], then [`Self::ready`].
    pub fn attach(
        pid: i32,
        host: &HostNetwork,
        policy: &NetworkPolicy,
        cgroup: Option<&Cgroup>,
        dir: &Path,
    ) -> Result<Egress, SandboxError> {
        let mut egress = Self::begin(pid, host, policy, cgroup, dir)?;
        egress.ready()?;
        Ok(egress)
    }

    /// Waits until the rules are in force and `eth0` is up (at once when they are).
    pub fn ready(&mut self) -> Result<(), SandboxError> {
        let began = Instant::now();
        if let Some(loading) = self.loading.take() {
            loading.wait().map_err(failed)?;
        }
        if let Some(pasta) = self.pasta.as_mut() {
            pasta.wait_ready().map_err(failed)?;
        }
        if let Some(took) = self.took.as_mut() {
            *took += began.elapsed();
        }
        Ok(())
    }

    /// Puts `policy` in force: new rules if they differ, or no network at all for `none`.
    pub fn apply(&mut self, policy: &NetworkPolicy) -> Result<(), SandboxError> {
        let began = Instant::now();
        if !policy.has_egress() {
            self.stop();
        } else if *policy != self.loaded {
            // A standby's default policy has no ranges: the function's are only added.
            let text = if self.loaded == NetworkPolicy::default() {
                policy_additions(policy)
            } else {
                replacement_ruleset(policy, &host_addresses().map_err(failed)?)
            };
            load_in(self.netns.as_fd(), &text).map_err(failed)?;
            self.loaded = policy.clone();
        } else {
            return Ok(());
        }
        self.took = Some(self.took.unwrap_or_default() + began.elapsed());
        Ok(())
    }

    /// Stops pasta: the namespace is left with loopback only.
    pub fn stop(&mut self) {
        self.loading.take();
        if let Some(mut pasta) = self.pasta.take() {
            pasta.stop();
        }
    }
}

fn failed(e: NetworkError) -> SandboxError {
    SandboxError::setup("cannot give the function its network", e)
}
