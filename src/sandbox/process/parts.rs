//! What a process-sandbox instance holds on the host — its directory, writable layer, loop
//! devices, cgroup, agent and link — and the one teardown that releases them, whether the
//! instance stops, its start fails, or a standby sandbox is given back untaken.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::egress::Egress;
use super::loopdev::LoopDevice;
use crate::sandbox::cgroup::{AgentDisk, Cgroup};
use crate::sandbox::exit::ExitState;
use crate::sandbox::instance::child::SandboxChild;
use crate::sandbox::instance::writable_layer::WritableLayer;
use crate::sandbox::instance::{create_instance_dir, Teardown};
use crate::sandbox::link::Link;
use crate::sandbox::SandboxError;

/// One read-only loop device per rootfs image for all its running instances. Instances that
/// mount the same block device share one ext4 superblock, so the second and later instances of
/// a function find its files in the dentry, inode and page caches the first one filled: a
/// python3 start read 194 blocks through a fresh loop device and 31 through a shared one.
///
/// A service also keeps the devices of its most recent images attached after their last
/// instance ([`SharedRootfs::keeping`]): attaching one (`LOOP_CONFIGURE`) took 0.2–2.4 ms of a
/// cold start, and its block cache goes with it.
#[derive(Default)]
pub(super) struct SharedRootfs {
    devices: Mutex<HashMap<(u64, u64), Weak<LoopDevice>>>,
    /// The service's kept devices, most recently used first, and how many to keep.
    kept: Option<(Mutex<VecDeque<Kept>>, usize)>,
}

/// A rootfs device kept attached, and when a start last asked for it.
struct Kept {
    used: Instant,
    device: Arc<LoopDevice>,
}

/// How long a kept rootfs device outlives its last use.
const KEEP_FOR: Duration = Duration::from_secs(10 * 60);

impl SharedRootfs {
    /// Devices that stay attached after their last instance: the `count` most recently used,
    /// each for [`KEEP_FOR`] after its last start (released when the sandbox goes).
    pub(super) fn keeping(count: usize) -> Self {
        SharedRootfs {
            devices: Mutex::default(),
            kept: (count > 0).then(|| (Mutex::default(), count)),
        }
    }

    /// The loop device of `image` (told by its device and inode: a file replaced at the same
    /// path gets a device of its own), attached if no running instance has it.
    pub(super) fn device(&self, image: &Path) -> Result<Arc<LoopDevice>, SandboxError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(image).map_err(|e| {
            SandboxError::setup(
                format!("cannot read the rootfs image {}", image.display()),
                e,
            )
        })?;
        let key = (meta.dev(), meta.ino());
        let device = {
            let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
            devices.retain(|_, device| device.strong_count() > 0);
            match devices.get(&key).and_then(Weak::upgrade) {
                Some(device) => device,
                None => {
                    let device = Arc::new(LoopDevice::attach(image, true)?);
                    devices.insert(key, Arc::downgrade(&device));
                    device
                }
            }
        };
        // Released outside the lock: a detach can take a while.
        let _released = self.keep(&device);
        Ok(device)
    }

    /// Marks `device` used now; returns the kept devices that are let go.
    fn keep(&self, device: &Arc<LoopDevice>) -> Vec<Kept> {
        let Some((kept, count)) = &self.kept else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut kept = kept.lock().unwrap_or_else(|p| p.into_inner());
        kept.retain(|k| !Arc::ptr_eq(&k.device, device));
        kept.push_front(Kept {
            used: now,
            device: Arc::clone(device),
        });
        let keep = (*count).min(kept.len());
        let mut released: Vec<Kept> = kept.drain(keep..).collect();
        while kept
            .back()
            .is_some_and(|k| now.duration_since(k.used) > KEEP_FOR)
        {
            released.extend(kept.pop_back());
        }
        released
    }

    /// How many devices are kept beyond their instances now.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.kept.as_ref().map_or(0, |(k, _)| {
            k.lock().unwrap_or_else(|p| p.into_inner()).len()
        })
    }
}

/// Everything an instance holds, released in reverse order by [`Parts::teardown`].
pub(super) struct Parts {
    pub dir: PathBuf,
    pub layer: Option<WritableLayer>,
    /// The rootfs image's read-only loop device, shared with the other instances of the image.
    pub rootfs: Option<Arc<LoopDevice>>,
    pub loops: Vec<LoopDevice>,
    pub cgroup: Option<Cgroup>,
    pub child: Option<SandboxChild>,
    /// pasta and the namespace's rules, for a function with egress.
    pub egress: Option<Egress>,
    pub link: Option<Link>,
    pub exit: Option<Arc<ExitState>>,
    torn_down: bool,
}

impl Parts {
    pub fn new(dir: PathBuf) -> Result<Self, SandboxError> {
        create_instance_dir(&dir)?;
        Ok(Parts {
            dir,
            layer: None,
            rootfs: None,
            loops: Vec::new(),
            cgroup: None,
            child: None,
            egress: None,
            link: None,
            exit: None,
            torn_down: false,
        })
    }
}

impl Teardown for Parts {
    fn is_torn_down(&self) -> bool {
        self.torn_down
    }

    fn sandbox_pid(&self) -> Option<i32> {
        self.child
            .as_ref()
            .filter(|c| c.status().is_none())
            .map(|c| c.pid())
    }

    /// Kills the sandbox and removes every trace; the first error is returned after trying all.
    fn teardown(&mut self) -> Result<(), SandboxError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        let mut first_err = None;
        if let Some(link) = self.link.take() {
            link.close();
        }
        if let Some(mut egress) = self.egress.take() {
            egress.stop();
        }
        if let Some(child) = self.child.take() {
            // SIGKILL to the pid namespace's init kills every process in it; the kernel reaps
            // them all before init's own exit is reported.
            child.kill_and_reap();
        }
        if let Some(mut cgroup) = self.cgroup.take() {
            if let Err(e) = cgroup.kill_and_remove() {
                first_err.get_or_insert(e);
            }
        }
        for mut device in self.loops.drain(..).rev() {
            if let Err(e) = device.release() {
                first_err.get_or_insert(e);
            }
        }
        // Detached (warned about if that fails) when the last instance of its image lets go.
        self.rootfs.take();
        self.layer.take();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                first_err.get_or_insert(SandboxError::setup(
                    format!("cannot remove {}", self.dir.display()),
                    e,
                ));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Parts {
    /// Whatever was not handed on is released: a failed start or an untaken standby leaves
    /// nothing mounted, attached or running.
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("releasing {}: {e}", self.dir.display());
        }
    }
}

/// The block device at `path` with `access`, for the devices allow-list.
pub(super) fn device_numbers(path: &Path, access: &'static str) -> Result<AgentDisk, SandboxError> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path)
        .map_err(|e| SandboxError::setup(format!("cannot stat {}", path.display()), e))?
        .rdev();
    Ok(AgentDisk {
        major: nix::sys::stat::major(rdev) as u32,
        minor: nix::sys::stat::minor(rdev) as u32,
        access,
    })
}
