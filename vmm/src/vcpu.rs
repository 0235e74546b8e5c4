//! One vCPU: its boot configuration, the `KVM_RUN` loop on its own thread, and how each kind of
//! exit is handled. Port I/O and MMIO go to the buses; every exit that ends the VM is reported
//! once through [`ExitSlot`] and the thread returns.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xsave,
    CpuId, Msrs, KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::{cpuid, interrupts, msr, regs};
use crate::devices::bus::{lock, Bus};
use crate::exit::VmExit;
use crate::memory::GuestMemory;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what} failed: {source}")]
    Kvm {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: KVM accepted only {set} of {total} boot MSRs (first refused: {first:#x})")]
    Msrs {
        id: u8,
        set: usize,
        total: usize,
        first: u32,
    },
    #[error("vCPU {id}: {source}")]
    Regs { id: u8, source: regs::RegsError },
}

/// Where a VM-ending exit is reported: the first report wins, later ones (other vCPUs being
/// stopped) are ignored, and the event loop is woken through `event`.
pub struct ExitSlot {
    status: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitSlot {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: Mutex::new(None),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    pub fn report(&self, exit: VmExit) {
        let mut status = lock(&self.status);
        if status.is_none() {
            tracing::debug!("VM exit reported: {exit}");
            *status = Some(exit);
            let _ = self.event.write(1);
        }
    }

    pub fn take(&self) -> Option<VmExit> {
        lock(&self.status).take()
    }

    pub fn peek(&self) -> Option<VmExit> {
        lock(&self.status).clone()
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

/// A vCPU's architectural state as plain data (for snapshots).
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state (XSAVE area; a superset of KVM_GET_FPU).
    pub xsave: kvm_xsave,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// `(index, value)` of the boot MSR set.
    pub msrs: Vec<(u32, u64)>,
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSlot>,
    pub stop: Arc<AtomicBool>,
}

/// Unmapped reads see a floating bus, as on real hardware.
const UNMAPPED_READ: u8 = 0xff;

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(id: u8, fd: VcpuFd) -> Self {
        Self { id, fd }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn kvm(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// CPUID, boot MSRs, FPU and (with an irqchip) LAPIC virtual-wire set-up for any vCPU.
    pub fn configure_common(
        &self,
        supported_cpuid: &CpuId,
        vcpu_count: u8,
        irqchip: bool,
    ) -> Result<(), VcpuError> {
        let cpuid = cpuid::vcpu_cpuid(supported_cpuid, self.id, vcpu_count);
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.kvm("KVM_SET_CPUID2"))?;
        let msrs = msr::boot_msrs();
        let set = self.fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
        let total = msrs.as_slice().len();
        if set != total {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                total,
                first: msrs.as_slice()[set].index,
            });
        }
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(self.kvm("KVM_SET_FPU"))?;
        if irqchip {
            let mut lapic = self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?;
            interrupts::set_lint(&mut lapic);
            self.fd
                .set_lapic(&lapic)
                .map_err(self.kvm("KVM_SET_LAPIC"))?;
        }
        Ok(())
    }

    /// Registers for entering the guest at `entry`.
    pub fn configure_entry(
        &self,
        mem: &GuestMemory,
        entry: &regs::BootEntry,
    ) -> Result<(), VcpuError> {
        let regs_err = |source| VcpuError::Regs {
            id: self.id,
            source,
        };
        let mut sregs = self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?;
        regs::setup_sregs(mem, entry.mode, &mut sregs).map_err(regs_err)?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.kvm("KVM_SET_SREGS"))?;
        let r = regs::boot_regs(entry).map_err(regs_err)?;
        self.fd.set_regs(&r).map_err(self.kvm("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Makes a secondary vCPU start at its registers right away instead of waiting for the
    /// boot vCPU's INIT/SIPI (used by guests that are not an OS, e.g. tests).
    pub fn make_runnable(&self) -> Result<(), VcpuError> {
        self.fd
            .set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(self.kvm("KVM_SET_MP_STATE"))
    }

    /// Captures the vCPU's state. The vCPU must not be running.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let mut msrs = Msrs::from_entries(
            &msr::boot_msr_values()
                .into_iter()
                .map(|(index, _)| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .expect("boot MSR list fits in a kvm_msrs");
        let n = self
            .fd
            .get_msrs(&mut msrs)
            .map_err(self.kvm("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            id: self.id,
            regs: self.fd.get_regs().map_err(self.kvm("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?,
            xsave: self.fd.get_xsave().map_err(self.kvm("KVM_GET_XSAVE"))?,
            lapic: self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.kvm("KVM_GET_MP_STATE"))?,
            vcpu_events: self
                .fd
                .get_vcpu_events()
                .map_err(self.kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs: msrs.as_slice()[..n]
                .iter()
                .map(|e| (e.index, e.data))
                .collect(),
        })
    }

    /// Runs the vCPU until something ends the VM or `shared.stop` is set.
    pub fn run(mut self, shared: VcpuShared) {
        let id = self.id;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let outcome = match self.fd.run() {
                Ok(exit) => handle_exit(id, exit, &shared),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    Outcome::Continue
                }
                Err(e) => Outcome::Exit(VmExit::VcpuError {
                    vcpu: id,
                    error: format!("KVM_RUN failed: {e}"),
                }),
            };
            match outcome {
                Outcome::Continue => {}
                Outcome::PortIo => self.handle_port_io(&shared),
                Outcome::InternalError => {
                    let run = self.fd.get_kvm_run();
                    // SAFETY: KVM filled the `internal` member of the exit union for
                    // KVM_EXIT_INTERNAL_ERROR, which is the exit being handled.
                    let (suberror, ndata, data) = unsafe {
                        let internal = run.__bindgen_anon_1.internal;
                        (internal.suberror, internal.ndata, internal.data)
                    };
                    let n = (ndata as usize).min(data.len());
                    shared.exit.report(VmExit::InternalError {
                        vcpu: id,
                        suberror,
                        data: data[..n].to_vec(),
                    });
                    return;
                }
                Outcome::Exit(exit) => {
                    shared.exit.report(exit);
                    return;
                }
            }
        }
    }

    /// Port I/O, element by element: a string instruction (`rep outsb`, `rep insw`) exits once
    /// with `count` elements of `size` bytes, and devices expect one access per element.
    fn handle_port_io(&mut self, shared: &VcpuShared) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit being handled is KVM_EXIT_IO, so `io` is the valid union member.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = io.size as usize;
        let len = size * io.count as usize;
        let offset = io.data_offset as usize;
        // KVM puts the data in the PIO page right after kvm_run; refuse anything else.
        if !matches!(size, 1 | 2 | 4)
            || offset < std::mem::size_of::<kvm_bindings::kvm_run>()
            || offset + len > PIO_DATA_LIMIT
        {
            tracing::error!(size, len, offset, "malformed KVM_EXIT_IO ignored");
            return;
        }
        let base = run as *mut kvm_bindings::kvm_run as *mut u8;
        // SAFETY: kvm_run is the start of the vCPU's mmap (3 pages on x86); the range was
        // checked to lie inside it, and nothing else references those bytes during the exit.
        let data = unsafe { std::slice::from_raw_parts_mut(base.add(offset), len) };
        let port = io.port as u64;
        for element in data.chunks_mut(size) {
            let mapped = if u32::from(io.direction) == kvm_bindings::KVM_EXIT_IO_IN {
                shared.pio.read(port, element, UNMAPPED_READ)
            } else {
                shared.pio.write(port, element)
            };
            if !mapped {
                tracing::trace!(port, "unmapped port access");
            }
        }
    }
}

/// What the run loop does after an exit.
enum Outcome {
    Continue,
    /// KVM_EXIT_IO: handled from `kvm_run` by [`Vcpu::handle_port_io`].
    PortIo,
    /// KVM_EXIT_INTERNAL_ERROR: reported with the details from `kvm_run`.
    InternalError,
    Exit(VmExit),
}

/// The vCPU mmap on x86: kvm_run, the PIO data page, the coalesced-MMIO ring.
const PIO_DATA_LIMIT: usize = 2 * 4096;

/// Handles one exit.
fn handle_exit(id: u8, exit: VcpuExit<'_>, shared: &VcpuShared) -> Outcome {
    let ends = |exit| Outcome::Exit(exit);
    match exit {
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => Outcome::PortIo,
        VcpuExit::MmioRead(addr, data) => {
            if !shared.mmio.read(addr, data, UNMAPPED_READ) {
                tracing::debug!(addr, "unmapped MMIO read");
            }
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !shared.mmio.write(addr, data) {
                tracing::debug!(addr, "unmapped MMIO write");
            }
            Outcome::Continue
        }
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => Outcome::Continue,
        VcpuExit::Hlt => ends(VmExit::Halted { vcpu: id }),
        VcpuExit::Shutdown => ends(VmExit::TripleFault { vcpu: id }),
        VcpuExit::SystemEvent(kind, _) => ends(match kind {
            KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::GuestShutdown,
            KVM_SYSTEM_EVENT_RESET => VmExit::GuestReset,
            KVM_SYSTEM_EVENT_CRASH => VmExit::GuestPanic {
                message: "KVM reported a guest crash system event".into(),
            },
            other => VmExit::VcpuError {
                vcpu: id,
                error: format!("unknown KVM system event {other}"),
            },
        }),
        VcpuExit::FailEntry(reason, cpu) => ends(VmExit::FailEntry {
            vcpu: id,
            reason,
            host_cpu: cpu,
        }),
        VcpuExit::InternalError => Outcome::InternalError,
        other => ends(VmExit::VcpuError {
            vcpu: id,
            error: format!("unhandled exit {other:?}"),
        }),
    }
}
