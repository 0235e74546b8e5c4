//! A vCPU's `KVM_RUN` loop on its own thread and how each kind of exit is handled. Port I/O
//! and MMIO go to the buses; every exit that ends the VM is reported once through
//! [`ExitSlot`] and the thread returns. Between exits the thread looks at its VM's
//! [`VcpuThreads`] for a pause or stop request.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::VcpuExit;

use super::first_io::FirstIo;
use super::threads::{RunningThread, VcpuThreads};
use super::Vcpu;
use crate::devices::bus::Bus;
use crate::exit::{panic_message, ExitSlot, VmExit};

/// What one vCPU thread runs with (each thread has its own; the parts are the VM's).
pub struct RunContext {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSlot>,
    /// Pause, save and stop requests.
    pub threads: Arc<VcpuThreads>,
    /// Set on restored VMs until this thread's first I/O exit, which it records; then None,
    /// so later exits cost one branch on a local.
    pub first_io: Option<Arc<FirstIo>>,
    /// The seccomp filter this thread installs before it first enters the guest.
    pub confinement: Option<Arc<crate::confine::Confinement>>,
}

impl RunContext {
    /// Records this thread's first I/O exit (the probe keeps the VM's first).
    #[inline]
    fn io_exit(&mut self) {
        if let Some(first) = self.first_io.take() {
            first.hit();
        }
    }
}

/// What one step of the run loop ended with.
enum Step {
    Continue,
    /// KVM_RUN returned EINTR/EAGAIN (a kick, or `immediate_exit`).
    Interrupted,
    /// The VM ended (already reported).
    Ended,
}

/// Unmapped reads see a floating bus, as on real hardware.
const UNMAPPED_READ: u8 = 0xff;
impl Vcpu {
    /// One KVM_RUN and the handling of its exit.
    fn step(&mut self, ctx: &mut RunContext) -> Step {
        let id = self.id;
        let outcome = match self.fd.run() {
            Ok(exit) => handle_exit(id, exit, ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Step::Interrupted
            }
            Err(e) => Outcome::Exit(VmExit::VcpuError {
                vcpu: id,
                error: format!("KVM_RUN failed: {e}"),
            }),
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::PortIo => self.handle_port_io(ctx),
            Outcome::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the exit union for
                // KVM_EXIT_INTERNAL_ERROR, which is the exit being handled.
                let (suberror, ndata, data) = unsafe {
                    let internal = run.__bindgen_anon_1.internal;
                    (internal.suberror, internal.ndata, internal.data)
                };
                let n = (ndata as usize).min(data.len());
                ctx.exit.report(VmExit::InternalError {
                    vcpu: id,
                    suberror,
                    data: data[..n].to_vec(),
                });
                return Step::Ended;
            }
            Outcome::Exit(exit) => {
                ctx.exit.report(exit);
                return Step::Ended;
            }
        }
        Step::Continue
    }

    /// Lets KVM finish a port/MMIO exit the VMM has handled (KVM_RUN with `immediate_exit`
    /// completes it, then returns EINTR) so registers and memory are consistent. False if the
    /// VM ended meanwhile.
    fn complete_pending_exit(&mut self, ctx: &mut RunContext) -> bool {
        loop {
            self.fd.set_kvm_immediate_exit(1);
            match self.step(ctx) {
                Step::Interrupted => {
                    self.fd.set_kvm_immediate_exit(0);
                    return true;
                }
                Step::Ended => return false,
                // A string I/O instruction may exit again for its next element.
                Step::Continue => {}
            }
        }
    }

    /// Runs the vCPU until something ends the VM or its threads are stopped; parks it while
    /// the VM is paused.
    pub fn run(mut self, mut ctx: RunContext) {
        let threads = ctx.threads.clone();
        // Dropped before `self` (locals go before parameters), also when a device model
        // panics on this thread: the kick handler must never see kvm_run once it is unmapped.
        let _registered = RunningThread::register(self.fd.get_kvm_run(), &threads);
        loop {
            if threads.is_stopped() {
                break;
            }
            if threads.is_paused() {
                if !self.complete_pending_exit(&mut ctx) {
                    break;
                }
                let vcpu = &self;
                threads.park(|| vcpu.save_state());
                continue;
            }
            match self.step(&mut ctx) {
                Step::Continue => {}
                Step::Interrupted => self.fd.set_kvm_immediate_exit(0),
                Step::Ended => break,
            }
        }
    }

    /// Runs the vCPU on a thread of its own named `vcpuN`. A panic on it (a bug in a device
    /// model) ends the VM with a status instead of leaving the event loop waiting for a vCPU
    /// that is gone.
    pub fn spawn(self, ctx: RunContext) -> std::io::Result<JoinHandle<()>> {
        let id = self.id;
        let exit = ctx.exit.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                if let Some(c) = &ctx.confinement {
                    if let Err(e) = c.enter(crate::confine::ThreadKind::Vcpu, &format!("vcpu{id}"))
                    {
                        exit.report(VmExit::VcpuError {
                            vcpu: id,
                            error: e.to_string(),
                        });
                        return;
                    }
                }
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(ctx)));
                if let Err(panic) = ran {
                    exit.report(VmExit::VcpuError {
                        vcpu: id,
                        error: format!("vCPU thread panicked: {}", panic_message(&panic)),
                    });
                }
            })
    }

    /// Port I/O, element by element: a string instruction (`rep outsb`, `rep insw`) exits once
    /// with `count` elements of `size` bytes, and devices expect one access per element.
    fn handle_port_io(&mut self, ctx: &mut RunContext) {
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
                ctx.pio.read(port, element, UNMAPPED_READ)
            } else {
                ctx.pio.write(port, element)
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
fn handle_exit(id: u8, exit: VcpuExit<'_>, ctx: &mut RunContext) -> Outcome {
    let ends = |exit| Outcome::Exit(exit);
    match exit {
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => {
            ctx.io_exit();
            Outcome::PortIo
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.io_exit();
            if !ctx.mmio.read(addr, data, UNMAPPED_READ) {
                tracing::debug!(addr, "unmapped MMIO read");
            }
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.io_exit();
            if !ctx.mmio.write(addr, data) {
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
