//! How an instance's `fnvm-vmm` is launched: where the binary is, the guest kernel's command
//! line, the vCPUs for its memory, the disks and vsock in the slot order a snapshot records,
//! and whether an attempt boots or restores.

use std::path::{Path, PathBuf};

use fnvm_vmm::vmm::DEFAULT_CMDLINE;

use super::snapshots::Writing;
use super::standby::{StandbyVmm, VmShape};
use crate::sandbox::{InstanceSpec, SandboxError};

/// The kernel command line: fnvm's defaults plus where the agent finds its disks.
pub fn guest_cmdline() -> String {
    format!("{DEFAULT_CMDLINE} fnvm.rootfs=/dev/vda fnvm.writable=/dev/vdb")
}

/// One vCPU, two from 1536 MiB up (more memory buys more CPU, as in the cloud).
pub fn vcpus_for(memory_mib: u32) -> u8 {
    if memory_mib >= 1536 {
        2
    } else {
        1
    }
}

/// The shape of an instance's VM: what a standby VMM must match to restore its snapshot.
pub(super) fn shape_of(spec: &InstanceSpec) -> VmShape {
    VmShape {
        memory_mib: spec.memory_mib,
        vcpus: vcpus_for(spec.memory_mib),
    }
}

/// How one attempt starts its VM.
pub(super) enum Launch<'a> {
    /// Boot the kernel; snapshot the instance once ready when `write` holds the claim.
    Boot { write: Option<Writing> },
    /// Restore the snapshot in this `fnvm-vmm` snapshot directory, into `standby` if given
    /// (else, or if the standby cannot take it, in a new VMM).
    Restore {
        snapshot: &'a Path,
        standby: Option<StandbyVmm>,
    },
}

/// The disks and vsock, in the slot order a snapshot records: rootfs, writable layer, vsock.
pub(super) fn disk_args(spec: &InstanceSpec, writable: &Path, vsock: &Path) -> Vec<String> {
    vec![
        "--disk".into(),
        format!("{}:ro", spec.rootfs_image.display()),
        "--disk".into(),
        writable.display().to_string(),
        "--vsock".into(),
        vsock.display().to_string(),
    ]
}

/// The snapshot's copy of the writable layer (virtio slot 1, see [`disk_args`]).
pub(super) fn snapshot_layer(snapshot: &Path) -> PathBuf {
    snapshot.join("disk-1.img")
}

/// `fnvm-vmm` next to the running executable (or next to `target/<profile>/` for test binaries
/// in `target/<profile>/deps/`).
pub(super) fn vmm_binary() -> Result<PathBuf, SandboxError> {
    let exe = std::env::current_exe()
        .map_err(|e| SandboxError::setup("cannot find the running fnvm executable", e))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let mut candidates = vec![dir.join("fnvm-vmm")];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(profile) = dir.parent() {
            candidates.push(profile.join("fnvm-vmm"));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            SandboxError::setup(
                format!("fnvm-vmm not found at {}", candidates[0].display()),
                "it is installed next to fnvm; build it with `cargo build -p fnvm-vmm`",
            )
        })
}
