//! A micro-VM: KVM VM with in-kernel irqchip and PIT, guest memory, vCPUs, the legacy devices
//! (COM1 console, i8042 reset, sinks for probed ports), virtio-mmio devices, and the event
//! loop that runs them until the guest ends.
//!
//! Use: [`Vm::new`] → optional [`Vm::add_disk`] / [`Vm::add_virtio_device`] → one of
//! [`Vm::load_kernel`] or [`Vm::load_program`] → [`Vm::run`].

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::collections::HashMap;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::api::{ControlChannel, ControlCore, RestoreMetrics, VmController};
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialDeviceState;
use crate::snapshot::{self, SnapshotError};
use crate::state::Persist;
use crate::vstate::vcpu::{FirstIo, VcpuControl};
use vmm_sys_util::timerfd::TimerFd;

use crate::arch::x86_64::boot::{self, BootError, KernelConfig};
use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::arch::x86_64::regs::{BootEntry, EntryMode};
use crate::devices::bus::{lock, Bus, BusError, SharedDevice};
use crate::devices::i8042::{LegacySink, I8042, I8042_PORT, I8042_PORT_LEN};
use crate::devices::serial::{
    ConsoleWatch, ConsoleWriter, SerialArgs, SerialDevice, COM1_IRQ, COM1_PORT, COM1_PORT_LEN,
};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioDevice;
use crate::devices::InterruptTrigger;
use crate::event_loop::{EventLoop, Flow, Token};
use crate::exit::VmExit;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::vcpu::{ExitSlot, Vcpu, VcpuError, VcpuShared};

/// The kernel command line for fnvm guests: serial console, i8042 reset on reboot (the VM
/// ends cleanly), reboot one second after a panic (the VMM reports the panic), and an i8042
/// driver that does not wait for a keyboard or mouse. Nothing a kernel might not know without
/// a dot in it: a kernel hands such words (`nomodule` to a kernel without modules) to init as
/// arguments.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// How long a panicking guest gets to reset itself (Linux `panic=1` waits one second) before
/// the VMM ends it anyway.
pub const PANIC_GRACE: Duration = Duration::from_secs(3);
/// virtio-mmio QueueNotify register offset (virtio 1.x spec, 4.2.2).
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("a VM needs at least 1 vCPU, got 0")]
    NoVcpus,
    #[error("{requested} vCPUs requested but this host has only {host} CPUs")]
    TooManyVcpus { requested: u8, host: usize },
    #[error("{0} vCPUs requested; fnvm supports at most {MAX_VCPUS}")]
    AboveVcpuLimit(u8),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("cannot open /dev/kvm: {0} (is KVM available and accessible to this user?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("guest program of {len} bytes does not fit at {addr:#x}: {source}")]
    Program {
        addr: u64,
        len: usize,
        source: vm_memory::GuestMemoryError,
    },
    #[error("no room for another virtio-mmio device (IRQs {VIRTIO_IRQ_START}-{VIRTIO_IRQ_END} are taken)")]
    TooManyVirtioDevices,
    #[error("virtio device: {0}")]
    Virtio(String),
    #[error("nothing to run: load a kernel or a program first")]
    NothingLoaded,
    #[error("devices must be added before the kernel is loaded (the command line is final)")]
    AlreadyLoaded,
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
}

/// How to bring a snapshot back (see [`Vm::restore`]).
pub struct RestoreConfig {
    /// The snapshot directory.
    pub dir: PathBuf,
    pub console: Box<dyn Write + Send>,
    pub console_input: Option<RawFd>,
    /// Replacement backing files by virtio slot index (disks) — every writable disk needs one:
    /// each restored instance writes to its own copy of the snapshot's `disk-N.img`.
    pub disks: HashMap<usize, PathBuf>,
    /// A new Unix socket path for the vsock device (the saved one belongs to the original VM).
    pub vsock: Option<PathBuf>,
    /// The instant restore metrics are measured from (the VMM process start).
    pub since: Instant,
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// What the VM is made of.
pub struct VmConfig {
    /// Guest RAM in MiB (1..=host MemTotal).
    pub memory_mib: u64,
    /// vCPUs (1..=host CPUs, at most 32).
    pub vcpus: u8,
    /// Where the serial console's output goes.
    pub console: Box<dyn Write + Send>,
    /// A readable fd whose bytes are fed to the serial console (stdin). Borrowed: it must stay
    /// open while the VM runs. Regular files and /dev/null are ignored (epoll refuses them).
    pub console_input: Option<RawFd>,
    /// In-kernel LAPIC/IOAPIC/PIC and PIT. Always on for real guests; off only lets tests see
    /// a HLT exit (`VmExit::Halted`).
    pub irqchip: bool,
}

impl VmConfig {
    /// `memory_mib` and `vcpus` with the console on stdout, no input, in-kernel irqchip.
    pub fn new(memory_mib: u64, vcpus: u8) -> Self {
        Self {
            memory_mib,
            vcpus,
            console: Box::new(io::stdout()),
            console_input: None,
            irqchip: true,
        }
    }
}

impl std::fmt::Debug for VmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmConfig")
            .field("memory_mib", &self.memory_mib)
            .field("vcpus", &self.vcpus)
            .field("console_input", &self.console_input)
            .field("irqchip", &self.irqchip)
            .finish()
    }
}

/// Stops a running VM from another thread (its run returns [`VmExit::Stopped`]).
#[derive(Clone)]
pub struct StopHandle(Arc<EventFd>);

impl StopHandle {
    pub fn stop(&self) {
        let _ = self.0.write(1);
    }
}

/// Where a virtio-mmio device was placed.
#[derive(Clone)]
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Checks a vCPU count against the host, before anything is created.
pub fn validate_vcpus(vcpus: u8) -> Result<(), VmError> {
    if vcpus == 0 {
        return Err(VmError::NoVcpus);
    }
    if vcpus > MAX_VCPUS {
        return Err(VmError::AboveVcpuLimit(vcpus));
    }
    // sysconf is one syscall; available_parallelism also walks cgroup files (slower start-up).
    // SAFETY: sysconf has no memory-safety preconditions.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let host = if online > 0 { online as usize } else { 1 };
    if vcpus as usize > host {
        return Err(VmError::TooManyVcpus {
            requested: vcpus,
            host,
        });
    }
    Ok(())
}

/// The host-kernel half of a VM: the KVM VM with guest memory registered, TSS, in-kernel
/// irqchip and PIT, and its vCPUs. It holds every step of a VM set-up that can wait on the
/// host kernel, which is why a standby VMM ([`crate::standby`]) creates it ahead of demand.
pub(crate) struct KvmVm {
    pub(crate) kvm: Kvm,
    fd: VmFd,
    vcpus: Vec<Vcpu>,
}

impl KvmVm {
    /// Creates the VM for guest RAM `mem` (which must outlive it) with `vcpus` vCPUs.
    pub(crate) fn create(
        kvm: Kvm,
        mem: &GuestMemory,
        irqchip: bool,
        vcpus: u8,
    ) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        // Memory slots go in first, before anything else touches the VM's SRCU: each slot
        // change waits for an SRCU grace period, which is immediate on a fresh VM but, once
        // KVM_CREATE_IRQCHIP has queued its own (non-expedited, one-jiffy-delayed) grace
        // period, waits for that one too: 4-8 ms at HZ=250, measured. The TSS address (a
        // private memory slot on VMX) likewise.
        register_memory(&fd, mem)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        if irqchip {
            fd.create_irq_chip()
                .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
            let pit = kvm_pit_config {
                flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        }
        let mut vcpu_list = Vec::with_capacity(vcpus as usize);
        for id in 0..vcpus {
            let vcpu_fd = fd
                .create_vcpu(id as u64)
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu_list.push(Vcpu::new(id, vcpu_fd));
        }
        Ok(Self {
            kvm,
            fd,
            vcpus: vcpu_list,
        })
    }
}

pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory_mib: u64,
    mem: GuestMemory,
    vcpus: Vec<Vcpu>,
    vcpu_count: u8,
    irqchip: bool,
    /// What KVM can offer the guest, asked only when vCPUs are configured for a boot (a
    /// restore sets the snapshot's CPUID instead, so it skips the 0.4 ms ioctl).
    supported_cpuid: Option<CpuId>,
    pio: Bus,
    mmio: Bus,
    event_loop: EventLoop,
    exit: Arc<ExitSlot>,
    stop_evt: Arc<EventFd>,
    console_watch: Arc<ConsoleWatch>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<VirtioSlot>,
    /// Interrupt lines kept alive for the VM's lifetime.
    irq_lines: Vec<Arc<EventFd>>,
    loaded: Option<(BootEntry, bool)>,
    /// Event sources silenced while the VM is paused.
    device_tokens: Vec<Token>,
    control: Option<ControlChannel>,
    api: Option<UnixListener>,
    /// Set by [`Vm::restore`]: the VM runs from restored state, no program needed.
    restored: Option<(Instant, Arc<FirstIo>)>,
    restore_metrics: Option<Arc<Mutex<ControlCore>>>,
    /// A standby VM's own anonymous RAM mapping, now overlaid by the snapshot's memory file
    /// (`mem` is a non-owning view of the same addresses): it unmaps them when the Vm is
    /// dropped, so it is the last field.
    backing: Option<GuestMemory>,
}

/// The serial port's interrupt line, pulsed with KVM_IRQ_LINE by the thread that raises it.
/// The port raises it while the vCPU's own exit is handled (a byte written, the transmitter
/// empty again), so the interrupt is pending in that vCPU's LAPIC before it re-enters: no hop
/// through KVM's irqfd worker thread and no IPI kicking the vCPU out of guest mode, for every
/// console line. (QEMU raises its serial interrupt from the vCPU thread the same way.)
struct PulsedLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl InterruptTrigger for PulsedLine {
    fn trigger(&self) -> io::Result<()> {
        // Edge-triggered IOAPIC pin: a rising edge, then low again (what an irqfd does).
        self.vm
            .set_irq_line(self.gsi, true)
            .and_then(|()| self.vm.set_irq_line(self.gsi, false))
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

impl Vm {
    /// Validates the configuration and creates the VM, its memory, vCPUs and legacy devices.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        validate_vcpus(config.vcpus)?;
        let mem = memory::create_guest_memory(config.memory_mib)?;
        Self::build(config, mem, None)
    }

    fn build(
        config: VmConfig,
        mem: GuestMemory,
        legacy: Option<(&SerialDeviceState, &I8042State)>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let kvm_vm = KvmVm::create(kvm, &mem, config.irqchip, config.vcpus)?;
        Self::build_with(kvm_vm, config, mem, legacy)
    }

    /// The VM around an existing [`KvmVm`] whose memory slots describe `mem`.
    pub(crate) fn build_with(
        kvm_vm: KvmVm,
        config: VmConfig,
        mem: GuestMemory,
        legacy: Option<(&SerialDeviceState, &I8042State)>,
    ) -> Result<Self, VmError> {
        let KvmVm { kvm, fd, vcpus } = kvm_vm;
        let fd = Arc::new(fd);
        let exit = Arc::new(ExitSlot::new().map_err(io_err("exit eventfd"))?);
        let stop_evt = Arc::new(new_eventfd("stop eventfd")?);
        let console_watch = Arc::new(ConsoleWatch::new().map_err(io_err("console watch eventfd"))?);
        let serial_ready = Arc::new(new_eventfd("serial input eventfd")?);
        let reset_evt = Arc::new(new_eventfd("reset eventfd")?);

        // Without an irqchip there is no line to raise (tiny guests poll).
        let serial_irq: Arc<dyn InterruptTrigger> = if config.irqchip {
            Arc::new(PulsedLine {
                vm: fd.clone(),
                gsi: COM1_IRQ,
            })
        } else {
            Arc::new(new_eventfd("serial irq eventfd")?)
        };
        let serial_args = SerialArgs {
            interrupt: serial_irq,
            input_ready: serial_ready.clone(),
            output: ConsoleWriter::new(config.console, console_watch.clone()),
        };
        let (serial, i8042) = match legacy {
            None => (
                SerialDevice::new(serial_args),
                I8042::new(reset_evt.clone()),
            ),
            Some((serial_state, i8042_state)) => (
                SerialDevice::restore(serial_args, serial_state)
                    .map_err(|e| VmError::Restore(e.to_string()))?,
                I8042::restore(reset_evt.clone(), i8042_state)
                    .map_err(|_| VmError::Restore("invalid i8042 state".into()))?,
            ),
        };
        let serial = Arc::new(Mutex::new(serial));
        let i8042 = Arc::new(Mutex::new(i8042));

        let mut pio = Bus::new();
        pio.insert(COM1_PORT, COM1_PORT_LEN, serial.clone())?;
        pio.insert(I8042_PORT, I8042_PORT_LEN, i8042.clone())?;
        // Ports Linux probes: CMOS/RTC reads 0 (no update in progress), the POST port, the
        // other COM ports and PCI configuration read as absent.
        let sinks: [(u64, u64, u8); 6] = [
            (0x70, 2, 0x00),
            (0x80, 1, 0x00),
            (0x2e8, 8, 0xff),
            (0x2f8, 8, 0xff),
            (0x3e8, 8, 0xff),
            (0xcf8, 8, 0xff),
        ];
        for (base, len, fill) in sinks {
            let sink: SharedDevice = Arc::new(Mutex::new(LegacySink::new(fill)));
            pio.insert(base, len, sink)?;
        }

        let mut event_loop = EventLoop::new().map_err(io_err("epoll"))?;
        let add = |el: &mut EventLoop, fd: RawFd, h| el.add(fd, h).map_err(io_err("epoll_ctl"));
        {
            let exit = exit.clone();
            add(
                &mut event_loop,
                exit.event().as_raw_fd(),
                Box::new(move |_, _| {
                    let _ = exit.event().read();
                    match exit.peek() {
                        Some(e) => Flow::Exit(e),
                        None => Flow::Continue,
                    }
                }),
            )?;
        }
        {
            let stop = stop_evt.clone();
            add(
                &mut event_loop,
                stop_evt.as_raw_fd(),
                Box::new(move |_, _| {
                    let _ = stop.read();
                    Flow::Exit(VmExit::Stopped)
                }),
            )?;
        }
        {
            let reset = reset_evt.clone();
            add(
                &mut event_loop,
                reset_evt.as_raw_fd(),
                Box::new(move |_, _| {
                    let _ = reset.read();
                    Flow::Exit(VmExit::GuestReset)
                }),
            )?;
        }
        {
            // A panic banner arms a timer: the guest normally resets within `panic=` seconds;
            // if it does not (panic=0), the VMM ends it when the timer fires.
            let mut timer = TimerFd::new().map_err(timer_err)?;
            let timer_fd = timer.as_raw_fd();
            let watch = console_watch.clone();
            let watch_fd = console_watch.panic_event().as_raw_fd();
            let mut armed = false;
            add(
                &mut event_loop,
                watch_fd,
                Box::new(move |_, _| {
                    let _ = watch.panic_event().read();
                    if !armed {
                        armed = true;
                        if let Err(e) = timer.reset(PANIC_GRACE, None) {
                            tracing::warn!("cannot arm the panic timer: {e}");
                        }
                    }
                    Flow::Continue
                }),
            )?;
            let watch = console_watch.clone();
            add(
                &mut event_loop,
                timer_fd,
                Box::new(move |_, _| {
                    Flow::Exit(VmExit::GuestPanic {
                        message: watch.message().unwrap_or_default(),
                    })
                }),
            )?;
        }
        {
            // "reboot: Power down" / "System halted": the guest is done and about to halt
            // forever with interrupts off; end the VM as a clean shutdown.
            let watch = console_watch.clone();
            add(
                &mut event_loop,
                console_watch.halt_event().as_raw_fd(),
                Box::new(move |_, _| {
                    let _ = watch.halt_event().read();
                    Flow::Exit(VmExit::GuestShutdown)
                }),
            )?;
        }
        let mut device_tokens = Vec::new();
        if let Some(input) = config.console_input {
            device_tokens.extend(add_console_input(
                &mut event_loop,
                input,
                serial.clone(),
                serial_ready,
            )?);
        }

        Ok(Self {
            kvm,
            fd,
            memory_mib: config.memory_mib,
            mem,
            vcpus,
            vcpu_count: config.vcpus,
            irqchip: config.irqchip,
            supported_cpuid: None,
            pio,
            mmio: Bus::new(),
            event_loop,
            exit,
            stop_evt,
            console_watch,
            serial,
            i8042,
            virtio: Vec::new(),
            irq_lines: Vec::new(),
            loaded: None,
            device_tokens,
            control: Some(ControlChannel::new().map_err(io_err("control eventfd"))?),
            api: None,
            restored: None,
            restore_metrics: None,
            backing: None,
        })
    }

    /// A handle to pause, resume and snapshot this VM from another thread while it runs.
    pub fn controller(&self) -> Option<VmController> {
        self.control.as_ref().map(ControlChannel::controller)
    }

    /// Serves the JSON-lines control API (see [`crate::api`]) on a Unix socket at `path`,
    /// created now (it must not exist) so clients may connect before the VM runs.
    pub fn serve_api(&mut self, path: &Path) -> Result<(), VmError> {
        let listener = UnixListener::bind(path).map_err(|source| VmError::Io {
            what: "binding the API socket",
            source,
        })?;
        self.api = Some(listener);
        Ok(())
    }

    /// Serves the control API on an already bound listener (a standby VMM's, which keeps its
    /// socket across the restore).
    pub fn serve_api_listener(&mut self, listener: UnixListener) {
        self.api = Some(listener);
    }

    /// How the restore went so far (None unless this VM was restored and has run).
    pub fn restore_metrics(&self) -> Option<RestoreMetrics> {
        self.restore_metrics
            .as_ref()
            .and_then(|core| lock(core).metrics())
    }

    /// Rebuilds a VM from a snapshot directory: memory mapped privately from its memory file,
    /// vCPU, irqchip, PIT and clock state, the legacy devices and every virtio device (on
    /// their saved windows and IRQs). [`Vm::run`] then continues the guest where it stopped.
    pub fn restore(config: RestoreConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let here = snapshot::host_identity(&kvm)?;
        let loaded = snapshot::load(&config.dir, &here)?;
        let vcpus = snapshot_vcpus(&loaded.state)?;
        let mem = snapshot::memory::map_private(&loaded.memory_path(), &loaded.state.regions)
            .map_err(io_err("mapping the snapshot memory file"))?;
        let kvm_vm = KvmVm::create(kvm, &mem, loaded.state.irqchip, vcpus)?;
        Self::finish_restore(kvm_vm, mem, None, &loaded, config)
    }

    /// The rest of a restore once the KVM VM exists and `mem` holds the snapshot's memory:
    /// devices, vCPU and irqchip state. `backing` is a standby VM's own RAM mapping that
    /// `mem` overlays (kept until the Vm is dropped).
    pub(crate) fn finish_restore(
        kvm_vm: KvmVm,
        mem: GuestMemory,
        backing: Option<GuestMemory>,
        loaded: &snapshot::Loaded,
        config: RestoreConfig,
    ) -> Result<Self, VmError> {
        let state = &loaded.state;
        let vm_config = VmConfig {
            memory_mib: state.memory_mib,
            vcpus: kvm_vm.vcpus.len() as u8,
            console: config.console,
            console_input: config.console_input,
            irqchip: state.irqchip,
        };
        let mut vm = Self::build_with(kvm_vm, vm_config, mem, Some((&state.serial, &state.i8042)))?;
        vm.backing = backing;
        let backing = virtio_backing(state, &config.dir, &config.disks, config.vsock.as_ref())?;
        for ((index, slot), path) in state.virtio.iter().enumerate().zip(backing) {
            vm.restore_virtio_slot(index, slot, path)?;
        }
        for (vcpu, saved) in vm.vcpus.iter().zip(&state.vcpus) {
            vcpu.restore_state(saved, state.irqchip)?;
        }
        if state.irqchip {
            for chip in [&state.pic_master, &state.pic_slave, &state.ioapic]
                .into_iter()
                .flatten()
            {
                vm.fd
                    .set_irqchip(chip)
                    .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
            }
            if let Some(pit) = &state.pit {
                vm.fd.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?;
            }
        }
        if let Some(clock) = &state.clock {
            // Continue the guest clock from its saved value (no REALTIME catch-up: the agent
            // steps guest time itself after a restore).
            let mut clock = *clock;
            clock.flags = 0;
            vm.fd.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        }
        // Requests the guest queued just before the snapshot never reached the old process's
        // device (its queue notification was pending): look at every queue once. A restored
        // vsock posts its TRANSPORT_RESET event here too.
        for slot in &vm.virtio {
            let mut t = lock(&slot.transport);
            if t.is_running() {
                for q in 0..t.device().queue_max_sizes().len() as u16 {
                    t.notify_queue(q);
                }
                t.process_host_events();
            }
        }
        vm.restored = Some((config.since, Arc::new(FirstIo::new(config.since))));
        Ok(vm)
    }

    fn restore_virtio_slot(
        &mut self,
        index: usize,
        slot: &snapshot::VirtioSlotState,
        path: Option<PathBuf>,
    ) -> Result<(), VmError> {
        let (base, irq, interrupt) = self.next_virtio_slot()?;
        if (base, irq) != (slot.base, slot.irq) {
            return Err(VmError::Restore(format!(
                "virtio device {index} was at {:#x} IRQ {}, the layout puts it at {base:#x} IRQ {irq}",
                slot.base, slot.irq
            )));
        }
        let device = crate::devices::virtio::restore_device(&slot.device, path)
            .map_err(|e| VmError::Restore(e.to_string()))?;
        let transport = MmioTransport::restore(
            crate::devices::virtio::mmio::MmioTransportArgs {
                device,
                mem: self.mem.clone(),
                interrupt: interrupt as Arc<dyn InterruptTrigger>,
            },
            &slot.transport,
        )
        .map_err(|e| VmError::Restore(format!("virtio device {index}: {e}")))?;
        self.attach_transport(transport, base, irq)?;
        Ok(())
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.serial
    }

    pub fn i8042(&self) -> &Arc<Mutex<I8042>> {
        &self.i8042
    }

    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.virtio
    }

    /// The raw stop eventfd, for a signal handler (writing 8 bytes of 1 stops the VM). Valid
    /// until [`Vm::run`] returns.
    pub fn stop_handle_fd(&self) -> RawFd {
        self.stop_evt.as_raw_fd()
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop_evt.clone())
    }

    /// Maps a device on the port-I/O bus.
    pub fn add_pio_device(
        &mut self,
        base: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), VmError> {
        Ok(self.pio.insert(base, len, dev)?)
    }

    /// Maps a device on the MMIO bus.
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), VmError> {
        Ok(self.mmio.insert(base, len, dev)?)
    }

    /// An interrupt line to the guest: an eventfd registered as KVM irqfd for `gsi`.
    pub fn irq_line(&mut self, gsi: u32) -> Result<Arc<EventFd>, VmError> {
        let evt = Arc::new(new_eventfd("irq eventfd")?);
        self.fd
            .register_irqfd(&evt, gsi)
            .map_err(kvm_err("KVM_IRQFD"))?;
        self.irq_lines.push(evt.clone());
        Ok(evt)
    }

    /// Calls `handler` in the event loop whenever the guest writes to `addr` (with a 4-byte
    /// value equal to `datamatch`, if given). KVM completes such writes in the kernel: the
    /// vCPU does not exit to the VMM.
    pub fn add_ioevent(
        &mut self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        mut handler: Box<dyn FnMut() + Send>,
    ) -> Result<(), VmError> {
        let evt = new_eventfd("ioeventfd")?;
        match datamatch {
            Some(value) => self.fd.register_ioevent(&evt, &addr, value),
            None => self
                .fd
                .register_ioevent(&evt, &addr, kvm_ioctls::NoDatamatch),
        }
        .map_err(kvm_err("KVM_IOEVENTFD"))?;
        let raw = evt.as_raw_fd();
        let token = self
            .event_loop
            .add(
                raw,
                Box::new(move |_, _| {
                    if evt.read().is_ok() {
                        handler();
                    }
                    Flow::Continue
                }),
            )
            .map_err(io_err("epoll_ctl"))?;
        self.device_tokens.push(token);
        Ok(())
    }

    /// Puts a virtio device on the next virtio-mmio window with its own IRQ, wires its queue
    /// notifications (ioeventfds) and host events into the event loop, and adds its
    /// `virtio_mmio.device=` entry to the kernel command line.
    pub fn add_virtio_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioSlot, VmError> {
        if self.loaded.is_some() {
            return Err(VmError::AlreadyLoaded);
        }
        let (base, irq, interrupt) = self.next_virtio_slot()?;
        let transport = MmioTransport::new(
            device,
            self.mem.clone(),
            interrupt as Arc<dyn InterruptTrigger>,
        )
        .map_err(|e| VmError::Virtio(e.to_string()))?;
        self.attach_transport(transport, base, irq)
    }

    /// The next virtio-mmio window, its IRQ and that IRQ's line (an irqfd).
    fn next_virtio_slot(&mut self) -> Result<(u64, u32, Arc<EventFd>), VmError> {
        let index = self.virtio.len() as u32;
        let irq = VIRTIO_IRQ_START + index;
        if irq > VIRTIO_IRQ_END {
            return Err(VmError::TooManyVirtioDevices);
        }
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let interrupt = Arc::new(new_eventfd("virtio irq eventfd")?);
        if self.irqchip {
            self.fd
                .register_irqfd(&interrupt, irq)
                .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
        }
        self.irq_lines.push(interrupt.clone());
        Ok((base, irq, interrupt))
    }

    /// Maps a transport on its window and wires its queue notifications (ioeventfds) and
    /// host events into the event loop.
    fn attach_transport(
        &mut self,
        transport: MmioTransport,
        base: u64,
        irq: u32,
    ) -> Result<VirtioSlot, VmError> {
        let queues = transport.device().queue_max_sizes().len();
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(base, VIRTIO_MMIO_SIZE, transport.clone())?;
        for queue in 0..queues as u16 {
            let t = transport.clone();
            self.add_ioevent(
                IoEventAddress::Mmio(base + VIRTIO_MMIO_QUEUE_NOTIFY),
                Some(queue as u32),
                Box::new(move || lock(&t).notify_queue(queue)),
            )?;
        }
        if let Some(host_fd) = lock(&transport).host_event_fd() {
            let t = transport.clone();
            let token = self
                .event_loop
                .add(
                    host_fd,
                    Box::new(move |_, _| {
                        lock(&t).process_host_events();
                        Flow::Continue
                    }),
                )
                .map_err(io_err("epoll_ctl"))?;
            self.device_tokens.push(token);
        }
        let slot = VirtioSlot {
            base,
            irq,
            transport,
        };
        self.virtio.push(slot.clone());
        Ok(slot)
    }

    /// Attaches a disk image as a virtio-blk device (the first one is /dev/vda in the guest).
    pub fn add_disk(&mut self, path: &Path, read_only: bool) -> Result<VirtioSlot, VmError> {
        let block = Block::new(path, read_only)
            .map_err(|e| VmError::Virtio(format!("disk {}: {e}", path.display())))?;
        self.add_virtio_device(Box::new(block))
    }

    /// Attaches a virtio-vsock device for guest CID `guest_cid` (3 or more). Host programs
    /// reach guest port P by connecting to the Unix socket `uds_path` and sending
    /// `CONNECT P\n`; guest connections to host port P go to `<uds_path>_P`. The socket is
    /// created now and removed when the VM is dropped.
    pub fn add_vsock(&mut self, guest_cid: u64, uds_path: &Path) -> Result<VirtioSlot, VmError> {
        let vsock = crate::devices::virtio::vsock::Vsock::new(guest_cid, uds_path)
            .map_err(|e| VmError::Virtio(format!("vsock {}: {e}", uds_path.display())))?;
        self.add_virtio_device(Box::new(vsock))
    }

    /// The `virtio_mmio.device=` command-line entries of the devices added so far.
    pub fn virtio_cmdline(&self) -> String {
        self.virtio
            .iter()
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq))
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn configure_vcpus(&mut self, entry: &BootEntry, all_at_entry: bool) -> Result<(), VmError> {
        let supported = match self.supported_cpuid.take() {
            Some(cpuid) => cpuid,
            None => {
                let mut cpuid = self
                    .kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
                // KVM never reports the TSC-deadline timer there: it exists only with the
                // in-kernel LAPIC, and KVM_CHECK_EXTENSION says whether it does.
                if self.irqchip && self.kvm.check_extension(Cap::TscDeadlineTimer) {
                    cpuid::offer_tsc_deadline(&mut cpuid);
                }
                cpuid
            }
        };
        let supported = &*self.supported_cpuid.insert(supported);
        for vcpu in &self.vcpus {
            vcpu.configure_common(supported, self.vcpu_count, self.irqchip)?;
            if vcpu.id() == 0 || all_at_entry {
                vcpu.configure_entry(&self.mem, entry)?;
            }
            if vcpu.id() != 0 && all_at_entry {
                vcpu.make_runnable()?;
            }
        }
        Ok(())
    }

    /// Loads a kernel (bzImage, vmlinux or PVH ELF) with the virtio devices' command-line
    /// entries appended, and sets the vCPUs up for its entry. Secondary vCPUs wait for the
    /// guest's INIT/SIPI as on real hardware.
    pub fn load_kernel(&mut self, config: &KernelConfig) -> Result<BootEntry, VmError> {
        let mut config = config.clone();
        let extra = self.virtio_cmdline();
        if !extra.is_empty() {
            config.cmdline = format!("{} {}", config.cmdline, extra);
        }
        let entry = boot::load_kernel(&self.mem, &config, self.vcpu_count)?;
        self.configure_vcpus(&entry, false)?;
        self.loaded = Some((entry, false));
        Ok(entry)
    }

    /// Copies a raw guest program to `load_addr` and starts vCPU 0 (or, with `all_vcpus`,
    /// every vCPU) at its first byte in `mode`. For tests and non-OS guests.
    pub fn load_program(
        &mut self,
        code: &[u8],
        load_addr: u64,
        mode: EntryMode,
        all_vcpus: bool,
    ) -> Result<BootEntry, VmError> {
        self.mem
            .write_slice(code, GuestAddress(load_addr))
            .map_err(|source| VmError::Program {
                addr: load_addr,
                len: code.len(),
                source,
            })?;
        let entry = BootEntry {
            mode,
            entry: load_addr,
            boot_info: 0,
        };
        self.configure_vcpus(&entry, all_vcpus)?;
        self.loaded = Some((entry, all_vcpus));
        Ok(entry)
    }

    /// Ends the VM with [`VmExit::Stopped`] after `after` unless it ended before.
    pub fn stop_after(&mut self, after: Duration) -> Result<(), VmError> {
        let mut timer = TimerFd::new().map_err(timer_err)?;
        timer.reset(after, None).map_err(timer_err)?;
        let raw = timer.as_raw_fd();
        self.event_loop
            .add(
                raw,
                Box::new(move |_, _| {
                    let _ = timer.wait();
                    Flow::Exit(VmExit::Stopped)
                }),
            )
            .map_err(io_err("epoll_ctl"))?;
        Ok(())
    }

    /// Runs the guest until it ends, then stops every vCPU thread and says how it ended.
    /// A VM runs once: afterwards `run` returns [`VmError::NothingLoaded`]. Dropping the `Vm`
    /// releases the KVM VM, which the host kernel tears down synchronously (milliseconds), so
    /// callers that report timings should do so before the drop.
    pub fn run(&mut self) -> Result<VmExit, VmError> {
        let restored = self.restored.take();
        if self.loaded.take().is_none() && restored.is_none() {
            return Err(VmError::NothingLoaded);
        }
        install_kick_handler();
        let shared_pio = Arc::new(std::mem::take(&mut self.pio));
        let shared_mmio = Arc::new(std::mem::take(&mut self.mmio));
        let stop = Arc::new(AtomicBool::new(false));
        let vcpu_control = Arc::new(VcpuControl::new());
        let first_io = restored.as_ref().map(|(_, f)| f.clone());
        let core = Arc::new(Mutex::new(ControlCore {
            vcpus: vcpu_control.clone(),
            vcpu_count: self.vcpus.len(),
            vm_fd: self.fd.clone(),
            irqchip: self.irqchip,
            memory_mib: self.memory_mib,
            mem: self.mem.clone(),
            serial: self.serial.clone(),
            i8042: self.i8042.clone(),
            virtio: self.virtio.clone(),
            device_tokens: self.device_tokens.clone(),
            restore: restored
                .as_ref()
                .map(|(since, f)| (since.elapsed().as_micros() as u64, f.clone())),
        }));
        self.restore_metrics = restored.as_ref().map(|_| core.clone());
        if let Some(channel) = self.control.take() {
            crate::api::serve_channel(&mut self.event_loop, channel, core.clone())
                .map_err(io_err("epoll_ctl (control)"))?;
        }
        if let Some(listener) = self.api.take() {
            crate::api::serve_socket(&mut self.event_loop, listener, core.clone())
                .map_err(io_err("epoll_ctl (API socket)"))?;
        }
        if let Some(f) = &first_io {
            f.rebase();
        }
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for vcpu in std::mem::take(&mut self.vcpus) {
            let shared = VcpuShared {
                pio: shared_pio.clone(),
                mmio: shared_mmio.clone(),
                exit: self.exit.clone(),
                stop: stop.clone(),
                control: vcpu_control.clone(),
                first_io: first_io.clone(),
            };
            let exit = self.exit.clone();
            let id = vcpu.id();
            match std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A bug in a device model must end the VM with a status, not leave the
                    // event loop waiting for a vCPU that is gone.
                    let ran =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run(shared)));
                    if let Err(panic) = ran {
                        exit.report(VmExit::VcpuError {
                            vcpu: id,
                            error: format!("vCPU thread panicked: {}", panic_message(&panic)),
                        });
                    }
                }) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        let outcome = match spawn_error {
            Some(e) => Err(VmError::Io {
                what: "spawning a vCPU thread",
                source: e,
            }),
            // A panicking handler (a device-model bug on the event-loop side) must still let
            // the vCPU threads be stopped below.
            None => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.event_loop.run()
            })) {
                Ok(result) => result.map_err(io_err("event loop")),
                Err(panic) => Err(VmError::Io {
                    what: "event loop",
                    source: io::Error::other(format!(
                        "a handler panicked: {}",
                        panic_message(&panic)
                    )),
                }),
            },
        };
        stop_vcpus(&stop, &vcpu_control, threads);
        let exit = outcome?;
        // A guest that printed the panic banner and then reset (panic=N) or faulted ended
        // because of the panic: say so.
        Ok(match (self.console_watch.message(), exit) {
            (Some(message), VmExit::GuestReset | VmExit::GuestShutdown)
            | (Some(message), VmExit::TripleFault { .. })
            | (Some(message), VmExit::Stopped) => VmExit::GuestPanic { message },
            (_, exit) => exit,
        })
    }
}

/// What each of the snapshot's virtio devices runs on in the restored VM: the given disk
/// backing file by slot index (a read-only disk may keep its saved path), the vsock's new
/// socket path. A writable disk without its own copy is an error.
pub(crate) fn virtio_backing(
    state: &snapshot::VmState,
    dir: &Path,
    disks: &HashMap<usize, PathBuf>,
    vsock: Option<&PathBuf>,
) -> Result<Vec<Option<PathBuf>>, VmError> {
    use crate::devices::virtio::VirtioDeviceState;
    let mut out = Vec::with_capacity(state.virtio.len());
    for (index, slot) in state.virtio.iter().enumerate() {
        out.push(match &slot.device {
            VirtioDeviceState::Block(b) => match disks.get(&index) {
                Some(p) => Some(p.clone()),
                None if b.read_only => None,
                None => {
                    return Err(VmError::Restore(format!(
                        "disk {index} is writable: give it its own copy of {} \
                         (e.g. --disk COPY in slot order)",
                        dir.join(slot.disk_copy.as_deref().unwrap_or("disk-N.img"))
                            .display()
                    )))
                }
            },
            VirtioDeviceState::Vsock(_) => vsock.cloned(),
        });
    }
    Ok(out)
}

/// The snapshot's vCPU count, checked against this host.
pub(crate) fn snapshot_vcpus(state: &snapshot::VmState) -> Result<u8, VmError> {
    let vcpus = u8::try_from(state.vcpus.len())
        .map_err(|_| VmError::Restore("too many vCPUs in the snapshot".into()))?;
    validate_vcpus(vcpus)?;
    Ok(vcpus)
}

/// Registers every guest memory region as a KVM memory slot.
fn register_memory(fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmError::Io {
                what: "guest memory host address",
                source: io::Error::other(e.to_string()),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which the Vm keeps for as long as
        // the VM (and so the memory slot) exists.
        unsafe { fd.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn timer_err(e: vmm_sys_util::errno::Error) -> VmError {
    VmError::Io {
        what: "timerfd",
        source: io::Error::from_raw_os_error(e.errno()),
    }
}

fn new_eventfd(what: &'static str) -> Result<EventFd, VmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(io_err(what))
}

/// Feeds `input` to the serial console. Reads never take more than the receive FIFO has room
/// for (only the guest drains it, so the room cannot shrink between the check and the queueing);
/// with the FIFO full the fd is paused until the guest empties it (`ready` fires), so nothing
/// spins and nothing is held back.
fn add_console_input(
    event_loop: &mut EventLoop,
    input: RawFd,
    serial: Arc<Mutex<SerialDevice>>,
    ready: Arc<EventFd>,
) -> Result<Vec<Token>, VmError> {
    let handler = Box::new(move |ctl: &mut crate::event_loop::Control<'_>, token| {
        let room = lock(&serial).input_capacity();
        if room == 0 {
            let _ = ctl.pause(token);
            return Flow::Continue;
        }
        let mut buf = [0u8; 256];
        let want = room.min(buf.len());
        // SAFETY: the caller promised `input` stays open while the VM runs; ManuallyDrop
        // keeps this borrowed File from closing it.
        let mut file = std::mem::ManuallyDrop::new(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(input)
        });
        match file.read(&mut buf[..want]) {
            Ok(0) => {
                let _ = ctl.remove(token);
            }
            Ok(n) => {
                let taken = lock(&serial).queue_input(&buf[..n]);
                if taken < n {
                    tracing::warn!("serial input: {} bytes dropped", n - taken);
                }
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("console input closed: {e}");
                let _ = ctl.remove(token);
            }
        }
        Flow::Continue
    });
    let token = match event_loop.add(input, handler) {
        Ok(t) => t,
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
            tracing::debug!("console input is not pollable (regular file or /dev/null): ignored");
            return Ok(Vec::new());
        }
        Err(e) => {
            return Err(VmError::Io {
                what: "epoll_ctl (console input)",
                source: e,
            })
        }
    };
    let ready_fd = ready.as_raw_fd();
    let ready_token = event_loop
        .add(
            ready_fd,
            Box::new(move |ctl, _| {
                let _ = ready.read();
                let _ = ctl.resume(token);
                Flow::Continue
            }),
        )
        .map_err(io_err("epoll_ctl"))?;
    Ok(vec![token, ready_token])
}

/// The signal that interrupts a vCPU's KVM_RUN so its thread sees the stop or pause flag.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), crate::vstate::vcpu::kick_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Sets the stop flag and kicks every vCPU thread out of KVM_RUN until it has returned.
/// Signals are resent every millisecond because one can land just before a thread enters
/// KVM_RUN; threads still running after 2 s are left behind (reported, never waited on).
fn stop_vcpus(stop: &AtomicBool, control: &VcpuControl, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    control.wake_all();
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut pending = threads;
    while !pending.is_empty() {
        let (done, running): (Vec<_>, Vec<_>) = pending.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        pending = running;
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            tracing::error!("{} vCPU thread(s) did not stop", pending.len());
            break;
        }
        control.wake_all();
        for t in &pending {
            let _ = t.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}
