//! What a VM instance holds for its life (its directory, writable layer, VMM process and its
//! cgroup, link and egress) and removes, in order, when it stops.

use std::path::PathBuf;

use crate::sandbox::instance::child::SandboxChild;
use crate::sandbox::instance::writable_layer::WritableLayer;
use crate::sandbox::instance::Teardown;
use crate::sandbox::link::Link;
use crate::sandbox::SandboxError;

use super::egress::VmEgress;
use super::limits::VmmCgroup;

pub(super) struct VmParts {
    pub(super) dir: PathBuf,
    pub(super) layer: Option<WritableLayer>,
    pub(super) child: Option<SandboxChild>,
    /// The VMM's cgroup (after the VMM; dropped, it kills anything left in it).
    pub(super) cgroup: Option<VmmCgroup>,
    pub(super) link: Option<Link>,
    /// passt, the host rules and the uid (after the VMM: its device is passt's only client).
    pub(super) egress: Option<VmEgress>,
    pub(super) torn_down: bool,
}

impl Teardown for VmParts {
    fn is_torn_down(&self) -> bool {
        self.torn_down
    }

    fn sandbox_pid(&self) -> Option<i32> {
        self.child
            .as_ref()
            .filter(|c| c.status().is_none())
            .map(|c| c.pid())
    }

    fn teardown(&mut self) -> Result<(), SandboxError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(link) = self.link.take() {
            link.close();
        }
        if let Some(child) = self.child.take() {
            child.kill_and_reap();
        }
        self.cgroup.take();
        if let Some(mut egress) = self.egress.take() {
            egress.stop();
        }
        self.layer.take();
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SandboxError::setup(
                format!("cannot remove {}", self.dir.display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}
