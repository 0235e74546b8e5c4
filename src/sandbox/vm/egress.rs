//! A VM instance's way out: an egress uid of its own, the host rules for its policy under that
//! uid, and a passt running as it (see [`crate::network::passt`] and
//! [`crate::network::host_filter`]). The rules go in before passt starts, so no packet of the
//! instance ever leaves unfiltered; at stop passt goes first (killed and reaped), then the
//! rules (element, then chain), then the uid. A function with `--network none` gets none of
//! this, and its VM no network device.
//!
//! A snapshot start gets a new uid, new rules and a new passt, and the restored device connects
//! to it (`fnvm-vmm --restore --net`, or the standby's restore request). The guest keeps
//! 10.0.2.15 and its routes, so nothing changes inside; TCP flows open at the snapshot are
//! gone (the new passt never knew them: they end by reset or timeout).

use std::path::{Path, PathBuf};

use crate::network::host_filter;
use crate::network::passt::Passt;
use crate::network::uid::EgressUid;
use crate::network::{HostNetwork, NetworkPolicy, GATEWAY, GUEST_ADDR, INTERFACE, PREFIX_LEN};
use crate::sandbox::instance::record::{InstanceRecord, ProcessId};
use crate::sandbox::SandboxError;

/// The kernel's `ip=` argument for the guest's fixed address (configured before /init runs).
pub fn ip_argument() -> String {
    let mask = std::net::Ipv4Addr::from(u32::MAX << (32 - u32::from(PREFIX_LEN)));
    format!("ip={GUEST_ADDR}::{GATEWAY}:{mask}::{INTERFACE}:off")
}

/// A running instance's egress, stopped when dropped.
pub(super) struct VmEgress {
    passt: Option<Passt>,
    rules: Option<u32>,
    uid: Option<EgressUid>,
}

impl VmEgress {
    /// Takes a uid, installs `policy`'s rules for it and starts passt; the record names both
    /// before passt runs, so a crash at any point leaves nothing the orphan clean-up cannot
    /// find. On error whatever was made is removed again.
    pub fn start(
        host: &HostNetwork,
        policy: &NetworkPolicy,
        dir: &Path,
        record: &mut InstanceRecord,
    ) -> Result<VmEgress, SandboxError> {
        let uid = EgressUid::take().map_err(failed)?;
        let mut egress = VmEgress {
            passt: None,
            rules: None,
            uid: None,
        };
        let id = uid.uid();
        egress.uid = Some(uid);
        record.egress_uid = Some(id);
        record.save(dir)?;
        host_filter::install(id, policy, &host_filter::resolvers(host)).map_err(failed)?;
        egress.rules = Some(id);
        let passt =
            Passt::start(egress.uid.as_ref().expect("just set"), host, dir).map_err(failed)?;
        record.egress_helper = passt.pid().and_then(|p| ProcessId::of(p as i32));
        egress.passt = Some(passt);
        record.save(dir)?;
        tracing::debug!(uid = id, "VM egress through passt");
        Ok(egress)
    }

    /// The passt socket for `fnvm-vmm --net`.
    pub fn socket(&self) -> PathBuf {
        self.passt
            .as_ref()
            .map(|p| p.socket().to_path_buf())
            .unwrap_or_default()
    }

    /// Stops passt, removes the rules and frees the uid (idempotent). A rule that cannot be
    /// removed is logged: the uid's slot is freed all the same, and the next holder of the
    /// slot replaces its chain.
    pub fn stop(&mut self) {
        if let Some(mut passt) = self.passt.take() {
            passt.stop();
        }
        if let Some(uid) = self.rules.take() {
            if let Err(e) = host_filter::remove(uid) {
                tracing::warn!(uid, "cannot remove the egress rules of a stopped VM: {e}");
            }
        }
        self.uid.take();
    }
}

impl Drop for VmEgress {
    fn drop(&mut self) {
        self.stop();
    }
}

fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> SandboxError {
    SandboxError::setup("cannot give the VM its network", e)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_configures_the_sandboxes_fixed_address_on_eth0() {
        assert_eq!(
            super::ip_argument(),
            "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"
        );
    }
}
