//! The errors of building, running and restoring a VM ([`VmError`]) and of fitting a snapshot
//! to one ([`RestoreError`]). Every part's own error type ends up here with its context.

use std::io;
use std::path::PathBuf;

use crate::arch::x86_64::boot::BootError;
use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::device_manager::DeviceError;
use crate::memory::MemoryError;
use crate::snapshot::memory::LayoutMismatch;
use crate::snapshot::SnapshotError;
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::KvmVmError;

/// Why a VM could not be built, loaded, run or restored.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A VM needs a vCPU.
    #[error("a VM needs at least 1 vCPU, got 0")]
    NoVcpus,
    /// More vCPUs than the host has CPUs.
    #[error("{requested} vCPUs requested but this host has only {host} CPUs")]
    TooManyVcpus { requested: u8, host: usize },
    /// More vCPUs than the MP table describes.
    #[error("{0} vCPUs requested; fnvm supports at most {MAX_VCPUS}")]
    AboveVcpuLimit(u8),
    /// Guest RAM could not be sized or mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    OpenKvm(kvm_ioctls::Error),
    /// A KVM system ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    /// The KVM VM could not be created or its state not be read or put back.
    #[error(transparent)]
    KvmVm(#[from] KvmVmError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A vCPU could not be configured or restored.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VMM could not confine itself (seccomp, capabilities).
    #[error(transparent)]
    Confine(#[from] crate::confine::ConfineError),
    /// A device could not be created, placed or wired.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A host resource of the VM itself (eventfd, epoll, thread) failed.
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// A raw guest program does not fit in guest RAM where it was asked to go.
    #[error("guest program of {len} bytes does not fit at {addr:#x}: {source}")]
    Program {
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
    /// `run` was called before a kernel or program was loaded (or a second time).
    #[error("nothing to run: load a kernel or a program first")]
    NothingLoaded,
    /// A device was added after the command line was written.
    #[error("devices must be added before the kernel is loaded (the command line is final)")]
    AlreadyLoaded,
    /// The snapshot could not be read or checked.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The snapshot does not fit this VM or this invocation.
    #[error("cannot restore the snapshot: {0}")]
    Restore(#[from] RestoreError),
}

/// Why a snapshot that loaded cannot become this VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Each restored instance must write to its own copy of a writable disk.
    #[error(
        "disk {index} is writable: give it its own copy of {} (e.g. --disk COPY in slot order)",
        .copy.display()
    )]
    WritableDiskWithoutCopy { index: usize, copy: PathBuf },
    /// The snapshot lists more vCPUs than a VM can have.
    #[error("too many vCPUs in the snapshot")]
    TooManyVcpus,
    /// The snapshot's virtio device sat elsewhere than this VMM's layout puts it.
    #[error(
        "virtio device {index} was at {saved_base:#x} IRQ {saved_irq}, the layout puts it at \
         {base:#x} IRQ {irq}"
    )]
    VirtioPlacement {
        index: usize,
        saved_base: u64,
        saved_irq: u32,
        base: u64,
        irq: u32,
    },
    /// A standby VM always has an in-kernel irqchip.
    #[error("the snapshot's VM has no in-kernel irqchip; a standby VM always has one")]
    NoIrqchip,
    /// A standby VM has as many vCPUs as it was created with.
    #[error("the snapshot has {snapshot} vCPUs, this standby VM {standby}")]
    VcpuCount { snapshot: usize, standby: u8 },
    /// A standby VM's guest RAM is laid out as it was created.
    #[error(transparent)]
    Layout(#[from] LayoutMismatch),
    /// A disk given for the restore is not there.
    #[error("disk {}: {source}", .path.display())]
    Disk { path: PathBuf, source: io::Error },
    /// The passt socket given for the restore is not there.
    #[error("passt socket {}: {source}", .path.display())]
    NetSocket { path: PathBuf, source: io::Error },
    /// A standby VMM has one console to give, to its one restored VM.
    #[error("the console was already given away")]
    ConsoleTaken,
}

pub(crate) fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

pub(crate) fn timer_err(e: vmm_sys_util::errno::Error) -> VmError {
    VmError::Io {
        what: "timerfd",
        source: io::Error::from_raw_os_error(e.errno()),
    }
}
