//! Snapshots of a paused VM and their restore in a fresh VMM process.
//!
//! A snapshot is a directory:
//! - `snapshot` — versioned header + the VM state as JSON ([`format`]);
//! - `memory` — guest RAM, sparse, mapped back privately on restore ([`memory`]);
//! - `disk-N.img` — a copy (reflink or sparse) of every writable disk at the moment of the
//!   snapshot: the guest's page cache in `memory` matches it, so it belongs to the snapshot.
//!   Each restored instance must run on its own copy (`fnvm-vmm --restore DIR --disk COPY`).
//!
//! The directory is written under a temporary name and renamed into place, so a snapshot is
//! either complete or absent.

pub mod format;
pub mod kvm_hex;
pub mod memory;

use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use serde::{Deserialize, Serialize};

use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDeviceState;
use crate::devices::virtio::mmio::MmioTransportState;
use crate::devices::virtio::VirtioDeviceState;
use crate::vstate::vcpu::state::VcpuState;
use format::{FileStamp, FormatError, Header, HostIdentity, MemoryInfo};
use memory::RegionLayout;

pub const STATE_FILE: &str = "snapshot";
pub const MEMORY_FILE: &str = "memory";
/// Written after a full check of a memory file whose stamp no longer matches the header's
/// (e.g. the snapshot was copied) or that another boot wrote: later restores in this boot trust
/// this stamp instead of re-reading.
pub const VERIFIED_FILE: &str = "memory.verified";

/// Why a snapshot could not be written or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file of the snapshot cannot be read or written.
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The snapshot's state file was refused.
    #[error("snapshot {path}: {source}")]
    Format { path: PathBuf, source: FormatError },
    /// The snapshot's state does not parse.
    #[error("snapshot {path}: the state does not parse: {reason}")]
    State { path: PathBuf, reason: String },
    /// The snapshot's memory file has a different size than the snapshot says.
    #[error(
        "snapshot {path}: the memory file is {actual} bytes, the snapshot says {expected} \
         (truncated or replaced)"
    )]
    MemorySize {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    /// The snapshot's memory file is corrupted.
    #[error("snapshot {path}: the memory file is corrupted (sha256 of its pages differs)")]
    MemoryChecksum { path: PathBuf },
    /// A snapshot already exists at the path (snapshots are never overwritten).
    #[error("snapshot {0} already exists (snapshots are never overwritten)")]
    Exists(PathBuf),
    /// This host's identity (its CPU and kernel release) cannot be read.
    #[error("cannot identify this host: {0}")]
    Host(String),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One virtio-mmio device: where it sat, its transport (queues included) and its model.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioSlotState {
    pub base: u64,
    pub irq: u32,
    pub transport: MmioTransportState,
    pub device: VirtioDeviceState,
    /// For a writable disk: its copy inside the snapshot directory.
    pub disk_copy: Option<String>,
}

/// Everything a restore needs besides guest memory. Plain data.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub memory_mib: u64,
    pub regions: Vec<RegionLayout>,
    pub irqchip: bool,
    pub vcpus: Vec<VcpuState>,
    #[serde(with = "kvm_hex::option")]
    pub pic_master: Option<kvm_irqchip>,
    #[serde(with = "kvm_hex::option")]
    pub pic_slave: Option<kvm_irqchip>,
    #[serde(with = "kvm_hex::option")]
    pub ioapic: Option<kvm_irqchip>,
    #[serde(with = "kvm_hex::option")]
    pub pit: Option<kvm_pit_state2>,
    #[serde(with = "kvm_hex::option")]
    pub clock: Option<kvm_clock_data>,
    pub serial: SerialDeviceState,
    pub i8042: I8042State,
    pub virtio: Vec<VirtioSlotState>,
}

/// This host as the snapshot header describes hosts.
/// This host's identity, found once per process (it opens /dev/kvm: a jailed VMM finds it
/// before its root is swapped, see [`crate::confine::jail`]).
pub fn this_host() -> Result<HostIdentity, SnapshotError> {
    static HOST: std::sync::OnceLock<HostIdentity> = std::sync::OnceLock::new();
    if let Some(host) = HOST.get() {
        return Ok(host.clone());
    }
    let kvm = kvm_ioctls::Kvm::new()
        .map_err(|e| SnapshotError::Host(format!("cannot open /dev/kvm: {e}")))?;
    let host = host_identity(&kvm)?;
    Ok(HOST.get_or_init(|| host).clone())
}

pub fn host_identity(kvm: &kvm_ioctls::Kvm) -> Result<HostIdentity, SnapshotError> {
    use std::arch::x86_64::__cpuid;
    let (leaf0, leaf1) = (__cpuid(0), __cpuid(1));
    let mut vendor = Vec::with_capacity(12);
    for r in [leaf0.ebx, leaf0.edx, leaf0.ecx] {
        vendor.extend_from_slice(&r.to_le_bytes());
    }
    let base_family = (leaf1.eax >> 8) & 0xf;
    let base_model = (leaf1.eax >> 4) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((leaf1.eax >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        base_model | (((leaf1.eax >> 16) & 0xf) << 4)
    } else {
        base_model
    };
    // SAFETY: uname writes into the zeroed struct we own.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(SnapshotError::Host(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    // SAFETY: uname NUL-terminates release.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok(HostIdentity {
        cpu_vendor: String::from_utf8_lossy(&vendor).into_owned(),
        cpu_family: family,
        cpu_model: model,
        cpu_stepping: leaf1.eax & 0xf,
        kvm_api_version: kvm.get_api_version(),
        kernel_release: release,
    })
}

/// A writable disk a snapshot copies: its virtio slot, its backing file's path and, where the
/// device has it open, that file (copied from rather than reopening the path).
pub struct WritableDisk {
    pub index: usize,
    pub path: PathBuf,
    pub file: Option<std::fs::File>,
}

/// Writes a snapshot directory `dir` (which must not exist) from a paused VM's parts.
/// `writable_disks` are the writable disks' current backing files.
pub fn write(
    dir: &Path,
    host: HostIdentity,
    mut state: VmState,
    mem: &crate::memory::GuestMemory,
    writable_disks: &[WritableDisk],
) -> Result<(), SnapshotError> {
    if dir.exists() {
        return Err(SnapshotError::Exists(dir.to_path_buf()));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| SnapshotError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::other("not a directory name"),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
    let result = (|| {
        let mem_path = tmp.join(MEMORY_FILE);
        let (size, sha256) = memory::write(mem, &mem_path).map_err(io_at(&mem_path))?;
        let stamp = FileStamp::of(&std::fs::metadata(&mem_path).map_err(io_at(&mem_path))?);
        for WritableDisk { index, path, file } in writable_disks {
            let name = format!("disk-{index}.img");
            let to = tmp.join(&name);
            match file {
                Some(f) => crate::sparse_copy::copy_sparse_from(f, &to),
                None => crate::sparse_copy::copy_sparse(path, &to),
            }
            .map_err(io_at(path))?;
            if let Some(slot) = state.virtio.get_mut(*index) {
                slot.disk_copy = Some(name);
            }
        }
        let json = serde_json::to_vec(&state).map_err(|e| SnapshotError::State {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let header = Header {
            vmm_version: format::VMM_VERSION.to_string(),
            host,
            memory: MemoryInfo {
                size,
                sha256,
                stamp,
                boot_id: format::current_boot_id(),
            },
            state_len: 0,
            state_sha256: String::new(),
        };
        let state_path = tmp.join(STATE_FILE);
        let bytes = format::encode(header, &json);
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&state_path).map_err(io_at(&state_path))?;
            f.write_all(&bytes).map_err(io_at(&state_path))?;
            f.sync_all().map_err(io_at(&state_path))?;
        }
        std::fs::rename(&tmp, dir).map_err(io_at(dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// A snapshot read back and checked: state parsed, memory file verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub header: Header,
    pub state: VmState,
}

impl Loaded {
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

/// Reads and checks a snapshot: format, version and host first, then state checksum, then the
/// memory file's size and (unless its stamp shows it unchanged since it was hashed) its hash.
pub fn load(dir: &Path, here: &HostIdentity) -> Result<Loaded, SnapshotError> {
    let state_path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&state_path).map_err(io_at(&state_path))?;
    let fmt = |source| SnapshotError::Format {
        path: dir.to_path_buf(),
        source,
    };
    let (header, state_bytes) = format::decode(&bytes).map_err(fmt)?;
    format::check_compatible(&header, here).map_err(fmt)?;
    let state: VmState = serde_json::from_slice(state_bytes).map_err(|e| SnapshotError::State {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let expected: u64 = state.regions.iter().map(|r| r.len).sum();
    if expected != header.memory.size {
        return Err(SnapshotError::State {
            path: dir.to_path_buf(),
            reason: format!(
                "memory regions add up to {expected} bytes, the header says {}",
                header.memory.size
            ),
        });
    }
    let mem_path = dir.join(MEMORY_FILE);
    let meta = std::fs::metadata(&mem_path).map_err(io_at(&mem_path))?;
    if meta.len() != header.memory.size {
        return Err(SnapshotError::MemorySize {
            path: dir.to_path_buf(),
            expected: header.memory.size,
            actual: meta.len(),
        });
    }
    let stamp = FileStamp::of(&meta);
    let verified_path = dir.join(VERIFIED_FILE);
    // The memory file is not fsynced: its stamp vouches for its content only within the boot
    // that wrote it (a crash can leave a file whose stamp matches and whose data does not).
    let boot = format::current_boot_id();
    let written_this_boot = !boot.is_empty() && header.memory.boot_id == boot;
    let known_good = (stamp == header.memory.stamp && written_this_boot)
        || std::fs::read(&verified_path)
            .ok()
            .and_then(|b| serde_json::from_slice::<(FileStamp, String, String)>(&b).ok())
            .is_some_and(|(s, sum, b)| {
                s == stamp && sum == header.memory.sha256 && !boot.is_empty() && b == boot
            });
    if !known_good {
        let sum = memory::hash_file(&mem_path).map_err(io_at(&mem_path))?;
        if sum != header.memory.sha256 {
            return Err(SnapshotError::MemoryChecksum {
                path: dir.to_path_buf(),
            });
        }
        // Remember the check (best effort: a read-only snapshot directory just re-checks).
        let tmp = dir.join(format!(".{VERIFIED_FILE}.{}", std::process::id()));
        if let Ok(json) = serde_json::to_vec(&(stamp, sum, &boot)) {
            if std::fs::write(&tmp, json).is_ok() && std::fs::rename(&tmp, &verified_path).is_err()
            {
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
    Ok(Loaded {
        dir: dir.to_path_buf(),
        header,
        state,
    })
}
