//! Where the cgroups go: the hierarchy with a usable memory controller (v2, or v1 on a hybrid
//! host) and, on v1, the pids, devices and cpu hierarchies, each with fnvm's parent cgroup made
//! ready for instances.

use std::io;
use std::path::{Path, PathBuf};

/// Why this host has no cgroup hierarchy fnvm can limit memory in (the process sandbox then
/// runs without a memory limit and warns once).
#[derive(Debug, thiserror::Error)]
pub enum HierarchyError {
    /// fnvm's parent cgroup could not be made.
    #[error("cannot create {}", path.display())]
    CreateParent {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The memory controller could not be delegated to fnvm's cgroups (cgroup v2).
    #[error("cannot enable the memory controller in {}", control.display())]
    EnableMemory {
        control: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Neither cgroup v2 nor v1 has a memory controller on this host.
    #[error("no cgroup memory controller found under /sys/fs/cgroup")]
    NoMemoryController,
}

impl HierarchyError {
    /// The error and its cause on one line, for the warning.
    pub fn sentence(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            text.push_str(&format!(": {e}"));
            cause = e.source();
        }
        text
    }
}

/// The directory under a hierarchy's root that holds every fnvm instance cgroup.
pub const PARENT: &str = "fnvm";

/// A cgroup hierarchy with a usable memory controller, and fnvm's parent cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2; `parent` is `<mount>/fnvm` with +memory in its subtree_control.
    V2 { parent: PathBuf },
    /// cgroup v1 memory controller; `parent` is `<mount>/fnvm`.
    V1Memory { parent: PathBuf },
}

impl Hierarchy {
    /// Finds the memory controller and prepares fnvm's parent cgroup; Err says why there is
    /// none.
    pub fn probe() -> Result<Self, HierarchyError> {
        let pure = Path::new("/sys/fs/cgroup");
        let unified = Path::new("/sys/fs/cgroup/unified");
        for root in [pure, unified] {
            let controllers = root.join("cgroup.controllers");
            if let Ok(list) = std::fs::read_to_string(&controllers) {
                if list.split_whitespace().any(|c| c == "memory") {
                    return prepare_v2(root).map(|parent| Hierarchy::V2 { parent });
                }
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.limit_in_bytes").is_file() {
            let parent = v1.join(PARENT);
            return match std::fs::create_dir_all(&parent) {
                Ok(()) => Ok(Hierarchy::V1Memory { parent }),
                Err(source) => Err(HierarchyError::CreateParent {
                    path: parent,
                    source,
                }),
            };
        }
        Err(HierarchyError::NoMemoryController)
    }

    pub fn parent(&self) -> &Path {
        match self {
            Hierarchy::V2 { parent } | Hierarchy::V1Memory { parent } => parent,
        }
    }
}

/// Creates `<root>/fnvm` and delegates the memory controller to its children.
fn prepare_v2(root: &Path) -> Result<PathBuf, HierarchyError> {
    let parent = root.join(PARENT);
    if let Err(source) = std::fs::create_dir_all(&parent) {
        return Err(HierarchyError::CreateParent {
            path: parent,
            source,
        });
    }
    for dir in [root, parent.as_path()] {
        let control = dir.join("cgroup.subtree_control");
        let enabled = std::fs::read_to_string(&control).unwrap_or_default();
        if enabled.split_whitespace().any(|c| c == "memory") {
            continue;
        }
        if let Err(source) = std::fs::write(&control, "+memory") {
            return Err(HierarchyError::EnableMemory { control, source });
        }
    }
    // Process limits and CPU scheduling per instance (see [`V1Extras::cpu`]) where the kernel
    // has those controllers (best effort: the memory limit is the one that must hold, and its
    // absence is reported by the caller).
    let available = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    for controller in ["pids", "cpu"] {
        if !available.split_whitespace().any(|c| c == controller) {
            continue;
        }
        for dir in [root, parent.as_path()] {
            let control = dir.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == controller) {
                let _ = std::fs::write(&control, format!("+{controller}"));
            }
        }
    }
    Ok(parent)
}

/// The v1 hierarchies of the other controllers fnvm uses, where the memory controller is on v1
/// too (hybrid layout); on v2 the pids and cpu controllers sit in the memory cgroup itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct V1Extras {
    /// `<pids mount>/fnvm`.
    pub pids: Option<PathBuf>,
    /// `<devices mount>/fnvm`.
    pub devices: Option<PathBuf>,
    /// `<cpu mount>/fnvm`: each instance is scheduled as one group under it. Without it every
    /// instance is its own session, so its own autogroup (`sched_autogroup_enabled`, on by
    /// default), and on a saturated host the kernel left woken sandbox threads waiting
    /// 100–600 ms (measured: `invoke` bench, 8 instances busy on 2 cores, p99 110–520 ms; in
    /// cpu cgroups 1.6 ms). A task in a cpu cgroup other than the root has no autogroup.
    pub cpu: Option<PathBuf>,
}

impl V1Extras {
    /// The pids and devices v1 hierarchies' fnvm parents that can be made here; each missing one
    /// comes with a line saying why (for the warning).
    pub fn probe() -> (Self, Vec<String>) {
        let mut why = Vec::new();
        let mut parent_of = |controller: &str, probe_file: &str| {
            let mount = Path::new("/sys/fs/cgroup").join(controller);
            if !mount.join(probe_file).is_file() && !mount.join("cgroup.procs").is_file() {
                why.push(format!(
                    "no cgroup v1 {controller} controller at {}",
                    mount.display()
                ));
                return None;
            }
            let parent = mount.join(PARENT);
            match std::fs::create_dir_all(&parent) {
                Ok(()) if parent.join(probe_file).is_file() => Some(parent),
                Ok(()) => {
                    why.push(format!("{} has no {probe_file}", parent.display()));
                    None
                }
                Err(e) => {
                    why.push(format!("cannot create {}: {e}", parent.display()));
                    None
                }
            }
        };
        let extras = V1Extras {
            pids: parent_of("pids", "pids.max"),
            devices: parent_of("devices", "devices.allow"),
            cpu: parent_of("cpu", "cpu.shares"),
        };
        (extras, why)
    }

    /// Every parent present, for clean-up.
    pub fn parents(&self) -> impl Iterator<Item = &Path> {
        self.pids
            .iter()
            .chain(self.devices.iter())
            .chain(self.cpu.iter())
            .map(PathBuf::as_path)
    }
}
