//! The VMM's cgroup: every `fnvm-vmm` (booted, restored or a standby) runs in a cgroup of its
//! own, joined before it executes, so all it ever allocates is held to its VM's memory plus a
//! fixed allowance, a few dozen threads and its vCPUs' worth of CPU (plus one for the device
//! thread). A hostile guest that finds a way to make the VMM allocate, spawn or spin (or code
//! that escaped into the VMM) meets the kernel's limits, not the host's. The cgroup is named
//! after the home like the process sandbox's (`<prefix>-vmm-<id>`) and written into the
//! instance record before it exists, so a later fnvm's orphan sweep removes it and a live one
//! is never swept.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Command;

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
        let join = cgroup
            .join_files()
            .into_iter()
            .map(|path| {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| SandboxError::setup(format!("cannot open {}", path.display()), e))
            })
            .collect::<Result<Vec<File>, _>>()?;
        Ok(VmmCgroup { cgroup, join })
    }
}

/// One VMM's cgroup; dropped, it kills whatever is still in it and goes.
#[derive(Debug)]
pub struct VmmCgroup {
    cgroup: Cgroup,
    /// The control files the VMM writes itself into between fork and exec.
    join: Vec<File>,
}

impl VmmCgroup {
    /// Makes `command`'s process join this cgroup before it executes the VMM (a join that
    /// fails fails the spawn).
    pub fn place(&self, command: &mut Command) {
        let fds: Vec<i32> = self.join.iter().map(|f| f.as_raw_fd()).collect();
        // SAFETY: the closure runs in the forked child before exec and only calls write(2),
        // which is async-signal-safe, on descriptors this VmmCgroup keeps open for as long as
        // the command can be spawned (the caller spawns while holding it); it allocates nothing.
        unsafe {
            command.pre_exec(move || {
                for &fd in &fds {
                    // SAFETY: a valid descriptor (above) and a one-byte buffer that outlives the call.
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }

    /// The memory cgroup (on v2, the only one).
    pub fn path(&self) -> PathBuf {
        self.cgroup.path().to_path_buf()
    }
}
