//! The VMM's cgroup: every `fnvm-vmm` (booted, restored or a standby) runs in a cgroup of its
//! own, born in it, so all it ever allocates is held to its VM's memory plus a
//! fixed allowance, a few dozen threads and its vCPUs' worth of CPU (plus one for the device
//! thread). A hostile guest that finds a way to make the VMM allocate, spawn or spin (or code
//! that escaped into the VMM) meets the kernel's limits, not the host's. The cgroup is named
//! after the home like the process sandbox's (`<prefix>-vmm-<id>`) and written into the
//! instance record before it exists, so a later fnvm's orphan sweep removes it and a live one
//! is never swept.

use std::path::PathBuf;

use crate::home::Home;
use crate::sandbox::cgroup::{cgroup_prefix, Cgroup, Hierarchy, Limits, V1Extras};
use crate::sandbox::instance::record::InstanceRecord;
use crate::sandbox::SandboxError;

/// What a VMM may use beyond its guest's memory: its own heap, thread stacks, device buffers
/// and the page cache of its disk and snapshot I/O (reclaimable, but charged).
pub const MEMORY_ALLOWANCE_MIB: u32 = 128;
/// Threads (and processes) a VMM may have: its vCPUs, the VMM thread, the API's and a
/// snapshot's helpers, with room to spare; a fork bomb is not among them.
pub const PIDS_MAX: u32 = 64;

/// The hierarchy VMM cgroups go in, probed once per sandbox.
#[derive(Debug)]
pub struct VmmCgroups {
    hierarchy: Hierarchy,
    /// cgroup v1: the pids and cpu hierarchies (never the devices one: the VMM opens /dev/kvm).
    extras: V1Extras,
    prefix: String,
}

impl VmmCgroups {
    /// The hierarchy for `home`'s VMMs; None (after one warning) where cgroups cannot be
    /// written, so VMMs run unlimited rather than not at all.
    pub fn probe(home: &Home) -> Option<Self> {
        let hierarchy = match Hierarchy::probe() {
            Ok(h) => h,
            Err(why) => {
                eprintln!(
                    "fnvm: warning: VMMs run without memory, pids and CPU limits: cgroups are not writable here ({})",
                    why.sentence()
                );
                return None;
            }
        };
        let extras = match hierarchy {
            Hierarchy::V2 { .. } => V1Extras::default(),
            Hierarchy::V1Memory { .. } => V1Extras {
                devices: None,
                ..V1Extras::probe().0
            },
        };
        Some(VmmCgroups {
            hierarchy,
            extras,
            prefix: cgroup_prefix(home),
        })
    }

    /// The limits of a VMM whose VM has `memory_mib` of RAM and `vcpus` vCPUs.
    pub fn limits(memory_mib: u32, vcpus: u8) -> Limits {
        Limits {
            memory_mib: memory_mib.saturating_add(MEMORY_ALLOWANCE_MIB),
            pids_max: PIDS_MAX,
            agent_disks: Vec::new(),
            cpus: Some(u32::from(vcpus) + 1),
        }
    }

    /// Names the cgroup of the VMM `id` in `record` (saved by the caller before
    /// [`Self::create`], see the module's header), and returns that name.
    pub fn reserve(&self, id: &str, record: &mut InstanceRecord) -> String {
        let name = format!("{}-vmm-{id}", self.prefix);
        record.cgroup = Some(self.hierarchy.parent().join(&name));
        record.cgroup_v2 = matches!(self.hierarchy, Hierarchy::V2 { .. });
        record.v1_cgroups = self.extras.parents().map(|p| p.join(&name)).collect();
        name
    }

    /// Creates the cgroup `name` (from [`Self::reserve`]) with the limits of a VMM whose VM has
    /// `memory_mib` of RAM and `vcpus` vCPUs.
    pub fn create(
        &self,
        name: &str,
        memory_mib: u32,
        vcpus: u8,
    ) -> Result<VmmCgroup, SandboxError> {
        let limits = Self::limits(memory_mib, vcpus);
        let cgroup = Cgroup::create(&self.hierarchy, &self.extras, name, &limits)?;
        Ok(VmmCgroup { cgroup })
    }
}

/// One VMM's cgroup, which the VMM is born in (see [`crate::sandbox::spawn`]); dropped, it
/// kills whatever is still in it and goes.
#[derive(Debug)]
pub struct VmmCgroup {
    cgroup: Cgroup,
}

impl VmmCgroup {
    /// The cgroup itself, to spawn the VMM in.
    pub fn cgroup(&self) -> &Cgroup {
        &self.cgroup
    }

    /// The memory cgroup (on v2, the only one).
    pub fn path(&self) -> PathBuf {
        self.cgroup.path().to_path_buf()
    }
}
