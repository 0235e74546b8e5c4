//! The runner of one micro-VM: it builds the [`Machine`] (KVM VM with in-kernel irqchip and
//! PIT, guest memory, the legacy and virtio devices), loads what the guest runs, spawns the
//! vCPU threads and runs the event loop with the machine until the guest ends.
//!
//! Use: [`Vm::new`] → optional [`Vm::add_disk`] / [`Vm::add_vsock`] / [`Vm::add_net`] /
//! [`Vm::add_virtio_device`] → one of
//! [`Vm::load_kernel`] or [`Vm::load_program`] → [`Vm::run`]. [`Vm::restore`]
//! ([`crate::persist`]) builds a VM from a snapshot instead.

use crate::confine::{Confinement, ThreadKind};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::handle::{ApiChannel, ApiHandle};
use crate::api::server::{serve_channel, serve_socket};
use crate::api::RestoreMetrics;
use crate::arch::x86_64::boot::{self, KernelConfig};
use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::arch::x86_64::regs::{BootEntry, EntryMode};
use crate::device_manager::legacy::LegacyState;
use crate::device_manager::virtio::VirtioSlot;
use crate::device_manager::DeviceManager;
use crate::devices::bus::SharedDevice;
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleWatch, ConsoleWriter, SerialDevice};
use crate::devices::virtio::net::MacAddr;
use crate::devices::virtio::VirtioDevice;
use crate::ending;
use crate::error::{io_err, timer_err, VmError};
use crate::event_loop::{EventLoop, Flow};
use crate::exit::{panic_message, ExitSlot, VmExit};
use crate::machine::Machine;
use crate::memory::{self, GuestMemory};
use crate::vstate::vcpu::kick::install_kick_handler;
use crate::vstate::vcpu::run::RunContext;
use crate::vstate::vcpu::threads::VcpuThreads;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::KvmVm;

/// The kernel command line for fnvm guests: serial console, i8042 reset on reboot (the VM
/// ends cleanly), reboot one second after a panic (the VMM reports the panic), and an i8042
/// driver that does not wait for a keyboard or mouse. Nothing a kernel might not know without
/// a dot in it: a kernel hands such words (`nomodule` to a kernel without modules) to init as
/// arguments.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

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

/// What [`Vm::run`] starts the guest from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// A kernel or program was loaded and the vCPUs set up for its entry.
    Boot,
    /// The vCPUs hold a snapshot's state.
    Restore,
}

/// One micro-VM and what runs it.
pub struct Vm {
    pub(crate) kvm: Kvm,
    pub(crate) machine: Machine,
    /// The vCPUs until they run on their threads.
    pub(crate) vcpus: Vec<Vcpu>,
    /// What KVM can offer the guest, asked only when vCPUs are configured for a boot (a
    /// restore sets the snapshot's CPUID instead, so it skips the 0.4 ms ioctl).
    supported_cpuid: Option<CpuId>,
    pub(crate) event_loop: EventLoop<Machine>,
    exit: Arc<ExitSlot>,
    stop_evt: Arc<EventFd>,
    console_watch: Arc<ConsoleWatch>,
    pub(crate) start: Option<Start>,
    /// The in-process API channel, served once the VM runs.
    api_channel: Option<ApiChannel>,
    /// The API socket, served once the VM runs.
    api_listener: Option<UnixListener>,
    /// What the threads do to themselves as the VM starts ([`Vm::confine`]); None: nothing.
    confinement: Option<Arc<Confinement>>,
    /// The directories a standby's restore request asked the jail to hold ([`Vm::jail_dirs`]).
    pub(crate) jail_dirs: Vec<std::path::PathBuf>,
    /// A standby VM's own anonymous RAM mapping, now overlaid by the snapshot's memory file
    /// (`machine.mem` is a non-owning view of the same addresses): it unmaps them when the Vm
    /// is dropped, so it is the last field.
    pub(crate) backing: Option<GuestMemory>,
}

impl Vm {
    /// Validates the configuration and creates the VM, its memory, vCPUs and legacy devices.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        validate_vcpus(config.vcpus)?;
        let mem = memory::create_guest_memory(config.memory_mib)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let kvm_vm = KvmVm::create(kvm, &mem, config.irqchip, config.vcpus)?;
        Self::build_with(kvm_vm, config, mem, None)
    }

    /// The VM around an existing [`KvmVm`] whose memory slots describe `mem`, with its legacy
    /// devices fresh or from `legacy`.
    pub(crate) fn build_with(
        kvm_vm: KvmVm,
        config: VmConfig,
        mem: GuestMemory,
        legacy: Option<LegacyState<'_>>,
    ) -> Result<Self, VmError> {
        let KvmVm { kvm, fd, vcpus } = kvm_vm;
        let fd = Arc::new(fd);
        let exit = Arc::new(ExitSlot::new().map_err(io_err("exit eventfd"))?);
        let stop_evt = Arc::new(new_eventfd("stop eventfd")?);
        let console_watch = Arc::new(ConsoleWatch::new().map_err(io_err("console watch eventfd"))?);
        let console = ConsoleWriter::new(config.console, console_watch.clone());
        let (mut devices, events) = DeviceManager::new(&fd, config.irqchip, console, legacy)?;

        let mut event_loop = EventLoop::new().map_err(io_err("epoll"))?;
        ending::add_ending_events(
            &mut event_loop,
            &exit,
            &stop_evt,
            &events.reset,
            &console_watch,
        )?;
        if let Some(input) = config.console_input {
            devices.add_console_input(&mut event_loop, input, events.serial_ready)?;
        }
        let machine = Machine {
            fd,
            irqchip: config.irqchip,
            memory_mib: config.memory_mib,
            mem,
            devices,
            threads: Arc::new(VcpuThreads::new()),
            vcpu_count: vcpus.len(),
            restored: None,
        };
        Ok(Self {
            kvm,
            machine,
            vcpus,
            supported_cpuid: None,
            event_loop,
            exit,
            stop_evt,
            console_watch,
            start: None,
            api_channel: Some(ApiChannel::new().map_err(io_err("API channel eventfd"))?),
            api_listener: None,
            confinement: None,
            jail_dirs: Vec::new(),
            backing: None,
        })
    }

    /// A handle to pause, resume and snapshot this VM from another thread while it runs.
    pub fn api_handle(&self) -> Option<ApiHandle> {
        self.api_channel.as_ref().map(ApiChannel::handle)
    }

    /// Serves the JSON-lines API (see [`crate::api`]) on a Unix socket at `path`, created now
    /// (it must not exist) so clients may connect before the VM runs.
    pub fn serve_api(&mut self, path: &Path) -> Result<(), VmError> {
        let listener = UnixListener::bind(path).map_err(io_err("binding the API socket"))?;
        self.api_listener = Some(listener);
        Ok(())
    }

    /// Serves the API on an already bound listener (a standby VMM's, which keeps its socket
    /// across the restore).
    pub fn serve_api_listener(&mut self, listener: UnixListener) {
        self.api_listener = Some(listener);
    }

    /// How the restore went so far (None unless this VM was restored and has run).
    pub fn restore_metrics(&self) -> Option<RestoreMetrics> {
        self.machine.restore_metrics()
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.machine.mem
    }

    pub fn vm_fd(&self) -> &VmFd {
        &self.machine.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn vcpus(&self) -> &[Vcpu] {
        &self.vcpus
    }

    pub fn serial(&self) -> &Arc<Mutex<SerialDevice>> {
        &self.machine.devices.serial
    }

    pub fn i8042(&self) -> &Arc<Mutex<I8042>> {
        &self.machine.devices.i8042
    }

    pub fn virtio_devices(&self) -> &[VirtioSlot] {
        &self.machine.devices.virtio
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
        Ok(self.machine.devices.add_pio_device(base, len, dev)?)
    }

    /// Maps a device on the MMIO bus.
    pub fn add_mmio_device(
        &mut self,
        base: u64,
        len: u64,
        dev: SharedDevice,
    ) -> Result<(), VmError> {
        Ok(self.machine.devices.add_mmio_device(base, len, dev)?)
    }

    /// An interrupt line to the guest: an eventfd registered as KVM irqfd for `gsi`.
    pub fn irq_line(&mut self, gsi: u32) -> Result<Arc<EventFd>, VmError> {
        Ok(self.machine.devices.irq_line(&self.machine.fd, gsi)?)
    }

    /// Calls `handler` in the event loop whenever the guest writes to `addr` (with a 4-byte
    /// value equal to `datamatch`, if given). KVM completes such writes in the kernel: the
    /// vCPU does not exit to the VMM.
    pub fn add_ioevent(
        &mut self,
        addr: IoEventAddress,
        datamatch: Option<u32>,
        handler: Box<dyn FnMut() + Send>,
    ) -> Result<(), VmError> {
        let m = &mut self.machine;
        Ok(m.devices
            .add_ioevent(&m.fd, &mut self.event_loop, addr, datamatch, handler)?)
    }

    /// Puts a virtio device on the next virtio-mmio window with its own IRQ, wires its queue
    /// notifications (ioeventfds) and host events into the event loop, and adds its
    /// `virtio_mmio.device=` entry to the kernel command line.
    pub fn add_virtio_device(
        &mut self,
        device: Box<dyn VirtioDevice>,
    ) -> Result<VirtioSlot, VmError> {
        self.check_not_loaded()?;
        let m = &mut self.machine;
        Ok(m.devices
            .add_virtio_device(&m.fd, m.irqchip, &m.mem, &mut self.event_loop, device)?)
    }

    /// Attaches a disk image as a virtio-blk device (the first one is /dev/vda in the guest).
    pub fn add_disk(&mut self, path: &Path, read_only: bool) -> Result<VirtioSlot, VmError> {
        self.check_not_loaded()?;
        let m = &mut self.machine;
        Ok(m.devices.add_disk(
            &m.fd,
            m.irqchip,
            &m.mem,
            &mut self.event_loop,
            path,
            read_only,
        )?)
    }

    /// Attaches a virtio-vsock device for guest CID `guest_cid` (3 or more). Host programs
    /// reach guest port P by connecting to the Unix socket `uds_path` and sending
    /// `CONNECT P\n`; guest connections to host port P go to `<uds_path>_P`. The socket is
    /// created now and removed when the VM is dropped.
    pub fn add_vsock(&mut self, guest_cid: u64, uds_path: &Path) -> Result<VirtioSlot, VmError> {
        self.check_not_loaded()?;
        let m = &mut self.machine;
        Ok(m.devices.add_vsock(
            &m.fd,
            m.irqchip,
            &m.mem,
            &mut self.event_loop,
            guest_cid,
            uds_path,
        )?)
    }

    /// Attaches a virtio-net device (eth0 in the guest) with MAC `mac`, connected to a passt
    /// already listening on the Unix socket `socket` (`passt --socket PATH`; QEMU's stream
    /// protocol). The guest sees a 65520-byte MTU and an always-up link; its address comes
    /// from the kernel command line (`ip=`) or a DHCP client.
    pub fn add_net(&mut self, socket: &Path, mac: MacAddr) -> Result<VirtioSlot, VmError> {
        self.check_not_loaded()?;
        let m = &mut self.machine;
        Ok(m.devices
            .add_net(&m.fd, m.irqchip, &m.mem, &mut self.event_loop, socket, mac)?)
    }

    fn check_not_loaded(&self) -> Result<(), VmError> {
        match self.start {
            Some(Start::Boot) => Err(VmError::AlreadyLoaded),
            _ => Ok(()),
        }
    }

    /// The `virtio_mmio.device=` command-line entries of the devices added so far.
    pub fn virtio_cmdline(&self) -> String {
        self.machine.devices.virtio_cmdline()
    }

    fn configure_vcpus(&mut self, entry: &BootEntry, all_at_entry: bool) -> Result<(), VmError> {
        let irqchip = self.machine.irqchip;
        let supported = match self.supported_cpuid.take() {
            Some(cpuid) => cpuid,
            None => {
                let mut cpuid = self
                    .kvm
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|source| VmError::Kvm {
                        what: "KVM_GET_SUPPORTED_CPUID",
                        source,
                    })?;
                // KVM never reports the TSC-deadline timer there: it exists only with the
                // in-kernel LAPIC, and KVM_CHECK_EXTENSION says whether it does.
                if irqchip && self.kvm.check_extension(Cap::TscDeadlineTimer) {
                    cpuid::offer_tsc_deadline(&mut cpuid);
                }
                cpuid
            }
        };
        let supported = &*self.supported_cpuid.insert(supported);
        let count = self.machine.vcpu_count as u8;
        for vcpu in &self.vcpus {
            vcpu.configure_common(supported, count, irqchip)?;
            if vcpu.id() == 0 || all_at_entry {
                vcpu.configure_entry(&self.machine.mem, entry)?;
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
        let count = self.machine.vcpu_count as u8;
        let entry = boot::load_kernel(&self.machine.mem, &config, count)?;
        self.configure_vcpus(&entry, false)?;
        self.start = Some(Start::Boot);
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
        self.machine
            .mem
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
        self.start = Some(Start::Boot);
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
                Box::new(move |_, _, _| {
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
    /// Makes [`Vm::run`] confine the process: capabilities dropped before the vCPU threads
    /// start, each vCPU thread under its seccomp filter before it first enters the guest, and
    /// the calling thread under its own once they run. For a process that runs only this VM
    /// (`fnvm-vmm`): the calling thread stays confined after `run` returns.
    pub fn confine(&mut self, confinement: Confinement) {
        self.confinement = Some(Arc::new(confinement));
    }

    /// The directories a standby's restore request asked the jail to hold (the caller of a
    /// restored standby builds its [`Confinement`] with them).
    pub fn jail_dirs(&self) -> &[std::path::PathBuf] {
        &self.jail_dirs
    }

    pub fn run(&mut self) -> Result<VmExit, VmError> {
        if self.start.take().is_none() {
            return Err(VmError::NothingLoaded);
        }
        install_kick_handler();
        if let Some(c) = &self.confinement {
            // What a vCPU thread would otherwise open later (a snapshot's MSR list).
            crate::vstate::vcpu::state::msr_index_list();
            c.enter_jail()?;
            c.drop_capabilities()?;
        }
        let devices = &mut self.machine.devices;
        let pio = Arc::new(std::mem::take(&mut devices.pio));
        let mmio = Arc::new(std::mem::take(&mut devices.mmio));
        let first_io = self.machine.restored.as_mut().map(|r| {
            r.resumed_us = Some(r.since.elapsed().as_micros() as u64);
            r.first_io.clone()
        });
        if let Some(channel) = self.api_channel.take() {
            serve_channel(&mut self.event_loop, channel)
                .map_err(io_err("epoll_ctl (API channel)"))?;
        }
        if let Some(listener) = self.api_listener.take() {
            serve_socket(&mut self.event_loop, listener)
                .map_err(io_err("epoll_ctl (API socket)"))?;
        }
        if let Some(f) = &first_io {
            f.rebase();
        }
        let threads = self.machine.threads.clone();
        let mut handles: Vec<JoinHandle<()>> = Vec::new();
        let mut spawn_error = None;
        for vcpu in std::mem::take(&mut self.vcpus) {
            let ctx = RunContext {
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: self.exit.clone(),
                threads: threads.clone(),
                first_io: first_io.clone(),
                confinement: self.confinement.clone(),
            };
            match vcpu.spawn(ctx) {
                Ok(t) => handles.push(t),
                Err(e) => {
                    spawn_error = Some(e);
                    break;
                }
            }
        }
        let confined = match (&spawn_error, &self.confinement) {
            (None, Some(c)) => c.enter(ThreadKind::Vmm, "fnvm-vmm").map_err(VmError::from),
            _ => Ok(()),
        };
        let outcome = match (spawn_error, confined) {
            (Some(e), _) => Err(VmError::Io {
                what: "spawning a vCPU thread",
                source: e,
            }),
            (None, Err(e)) => Err(e),
            // A panicking handler (a device-model bug on the event-loop side) must still let
            // the vCPU threads be stopped below.
            (None, Ok(())) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.event_loop.run(&mut self.machine)
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
        threads.stop_all(handles);
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

fn new_eventfd(what: &'static str) -> Result<EventFd, VmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(io_err(what))
}
