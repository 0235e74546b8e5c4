//! One vCPU: its boot configuration, the `KVM_RUN` loop on its own thread, and how each kind of
//! exit is handled. Port I/O and MMIO go to the buses; every exit that ends the VM is reported
//! once through [`ExitSlot`] and the thread returns.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
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
    #[error("vCPU {id}: KVM refused saved MSR {index:#x} ({set} of {total} restored)")]
    RestoreMsrs {
        id: u8,
        index: u32,
        set: usize,
        total: usize,
    },
    #[error("vCPU {id}: saved state is invalid: {what}")]
    InvalidState { id: u8, what: String },
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
    /// Legacy FPU/SSE state (KVM_GET_FPU) as raw bytes of `kvm_fpu`; `xsave` supersedes it
    /// and is restored after it.
    #[serde(default)]
    pub fpu: Vec<u8>,
    /// FPU/SSE/AVX state (XSAVE area; a superset of KVM_GET_FPU).
    pub xsave: kvm_xsave,
    #[serde(default)]
    pub xcrs: Option<kvm_xcrs>,
    #[serde(default)]
    pub debug_regs: Option<kvm_debugregs>,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub vcpu_events: kvm_vcpu_events,
    /// `(index, value)` of every MSR KVM lists (KVM_GET_MSR_INDEX_LIST) that it would read
    /// for this vCPU, TSC and kvm-clock included.
    pub msrs: Vec<(u32, u64)>,
    /// The CPUID the vCPU ran with (KVM_GET_CPUID2).
    #[serde(default)]
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest TSC frequency, where KVM reports it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSlot>,
    pub stop: Arc<AtomicBool>,
    /// Pause/park/save requests from the VMM's control side.
    pub control: Arc<VcpuControl>,
    /// Set on restored VMs: records the guest's first I/O exit after resuming.
    pub first_io: Option<Arc<FirstIo>>,
}

/// Page faults of this process so far: (minor, major), from getrusage (KVM's faults on guest
/// memory are the vCPU threads' own and count here).
pub fn page_faults() -> (u64, u64) {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    (usage.ru_minflt as u64, usage.ru_majflt as u64)
}

/// When a restored guest first did I/O, and what it had faulted in until then.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct FirstIoRecord {
    /// Since [`FirstIo::new`]'s reference instant (the VMM process start).
    pub at_us: u64,
    pub minor_faults: u64,
    pub major_faults: u64,
}

/// Records the first I/O exit of a restored VM (once; later exits cost one atomic load).
pub struct FirstIo {
    since: Instant,
    baseline: Mutex<(u64, u64)>,
    done: AtomicBool,
    record: OnceLock<FirstIoRecord>,
}

impl FirstIo {
    pub fn new(since: Instant) -> Self {
        Self {
            since,
            baseline: Mutex::new(page_faults()),
            done: AtomicBool::new(false),
            record: OnceLock::new(),
        }
    }

    /// Counts faults from now on (call when the vCPUs are about to run).
    pub fn rebase(&self) {
        *lock(&self.baseline) = page_faults();
    }

    fn hit(&self) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let (minor, major) = page_faults();
        let (min0, maj0) = *lock(&self.baseline);
        let _ = self.record.set(FirstIoRecord {
            at_us: self.since.elapsed().as_micros() as u64,
            minor_faults: minor.saturating_sub(min0),
            major_faults: major.saturating_sub(maj0),
        });
    }

    pub fn get(&self) -> Option<FirstIoRecord> {
        self.record.get().copied()
    }
}

thread_local! {
    /// This thread's kvm_run, so the kick signal can set `immediate_exit` (race-free kicks: a
    /// signal that lands just before KVM_RUN still makes it return at once).
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// A vCPU thread while it runs: its kvm_run is where the kick handler finds it, and its
/// VM's [`VcpuControl`] counts it. Dropping it (at the end or while a panic unwinds) undoes
/// both, before the vCPU's fd and its kvm_run mapping go.
struct RunningThread<'a> {
    control: &'a VcpuControl,
}

impl<'a> RunningThread<'a> {
    fn register(run: *mut kvm_bindings::kvm_run, control: &'a VcpuControl) -> Self {
        KVM_RUN.with(|r| r.set(run));
        control.thread_started();
        Self { control }
    }
}

impl Drop for RunningThread<'_> {
    fn drop(&mut self) {
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
        self.control.thread_ended();
    }
}

/// The kick signal's handler: makes the current (or next) KVM_RUN of this thread return EINTR.
pub(crate) extern "C" fn kick_handler(
    _: libc::c_int,
    _: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    let run = KVM_RUN.with(|r| r.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping (cleared before it is
        // unmapped); a byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Pause, park and save requests to the vCPU threads of one VM.
///
/// Pausing sets a flag and kicks every thread out of KVM_RUN; each thread first completes any
/// pending port/MMIO exit (KVM_RUN with `immediate_exit`, as KVM requires before its state is
/// read), then parks on a condition variable. Parked threads save their own state on request.
#[derive(Default)]
pub struct VcpuControl {
    pause: AtomicBool,
    inner: Mutex<ControlInner>,
    cond: Condvar,
}

#[derive(Default)]
struct ControlInner {
    threads: Vec<libc::pthread_t>,
    alive: usize,
    parked: usize,
    save_round: u64,
    saved: Vec<Result<VcpuState, String>>,
}

/// How long a pause or save may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VcpuControl {
    pub fn new() -> Self {
        Self::default()
    }

    fn thread_started(&self) {
        let mut c = lock(&self.inner);
        // SAFETY: pthread_self has no preconditions.
        c.threads.push(unsafe { libc::pthread_self() });
        c.alive += 1;
        self.cond.notify_all();
    }

    fn thread_ended(&self) {
        let mut c = lock(&self.inner);
        // SAFETY: as above.
        let me = unsafe { libc::pthread_self() };
        c.threads.retain(|&t| t != me);
        c.alive -= 1;
        self.cond.notify_all();
    }

    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Wakes parked threads so they see a stop request.
    pub fn wake_all(&self) {
        self.cond.notify_all();
    }

    fn kick_all(&self, c: &ControlInner) {
        for &t in &c.threads {
            // SAFETY: the thread is alive (removed from the list under the lock before it ends).
            unsafe { libc::pthread_kill(t, crate::vmm::kick_signal()) };
        }
    }

    /// Stops all `expected` vCPUs and waits until each is parked.
    pub fn pause(&self, expected: usize) -> Result<(), String> {
        self.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut c = lock(&self.inner);
        // Threads may still be starting: wait for all of them, kicking until each is parked
        // (a thread re-checks the flag after every exit, so one kick is normally enough).
        loop {
            if c.alive == expected && c.parked == expected {
                return Ok(());
            }
            let now = Instant::now();
            if now > deadline {
                break;
            }
            self.kick_all(&c);
            c = self
                .cond
                .wait_timeout(c, Duration::from_millis(10).min(deadline - now))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let (alive, parked) = (c.alive, c.parked);
        drop(c);
        self.resume();
        Err(format!(
            "only {parked} of {expected} vCPUs paused within {PAUSE_TIMEOUT:?} ({alive} running)"
        ))
    }

    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _g = lock(&self.inner);
        self.cond.notify_all();
    }

    /// Has every parked vCPU save its state; sorted by vCPU id.
    pub fn save_all(&self) -> Result<Vec<VcpuState>, String> {
        if !self.is_paused() {
            return Err("the VM is not paused".into());
        }
        let mut c = lock(&self.inner);
        c.save_round += 1;
        c.saved.clear();
        self.cond.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while c.saved.len() < c.parked {
            let now = Instant::now();
            if now > deadline {
                return Err("vCPUs did not save their state in time".into());
            }
            c = self
                .cond
                .wait_timeout(c, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let mut states = std::mem::take(&mut c.saved)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    /// Parks the calling vCPU thread until resumed or stopped, saving state when asked.
    fn park(&self, stop: &AtomicBool, mut save: impl FnMut() -> Result<VcpuState, String>) {
        let mut c = lock(&self.inner);
        let mut round = c.save_round;
        c.parked += 1;
        self.cond.notify_all();
        while self.is_paused() && !stop.load(Ordering::Acquire) {
            if c.save_round != round {
                round = c.save_round;
                let state = save();
                c.saved.push(state);
                self.cond.notify_all();
                continue;
            }
            c = self.cond.wait(c).unwrap_or_else(|e| e.into_inner());
        }
        c.parked -= 1;
    }
}

/// The MSRs KVM lists as saveable (KVM_GET_MSR_INDEX_LIST), read once per process.
fn msr_index_list() -> &'static [u32] {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    LIST.get_or_init(|| {
        kvm_ioctls::Kvm::new()
            .and_then(|k| k.get_msr_index_list())
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_else(|_| msr::boot_msr_values().into_iter().map(|(i, _)| i).collect())
    })
}

/// x2APIC MSRs live in the LAPIC state; TSC_DEADLINE must follow TSC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

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

    /// Reads every listed MSR KVM will read for this vCPU: a batch read stops at the first
    /// MSR it refuses (e.g. one the guest's CPUID does not offer), which is dropped.
    fn read_msrs(&self) -> Result<Vec<(u32, u64)>, VcpuError> {
        let mut pending: Vec<u32> = msr_index_list().to_vec();
        let mut out = Vec::with_capacity(pending.len());
        while !pending.is_empty() {
            let chunk: Vec<kvm_msr_entry> = pending
                .iter()
                .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&chunk).map_err(|_| VcpuError::InvalidState {
                id: self.id,
                what: "MSR list too long".into(),
            })?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(self.kvm("KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // Skip the refused one (if any) and go on after it.
            let skip = if n < chunk.len() { n + 1 } else { n };
            pending.drain(..skip);
        }
        // TSC first, TSC_DEADLINE last: KVM interprets the deadline against the TSC.
        out.sort_by_key(|&(i, _)| match i {
            msr::MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        Ok(out)
    }

    /// Captures the vCPU's state. The vCPU must not be running (and any port/MMIO exit must
    /// have been completed by re-entering KVM_RUN, as the pause does).
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let fpu = self.fd.get_fpu().map_err(self.kvm("KVM_GET_FPU"))?;
        // SAFETY: kvm_fpu is plain old data; the slice covers exactly its bytes.
        let fpu_bytes = unsafe {
            std::slice::from_raw_parts(
                &fpu as *const kvm_fpu as *const u8,
                std::mem::size_of::<kvm_fpu>(),
            )
        }
        .to_vec();
        Ok(VcpuState {
            id: self.id,
            regs: self.fd.get_regs().map_err(self.kvm("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.kvm("KVM_GET_SREGS"))?,
            fpu: fpu_bytes,
            xsave: self.fd.get_xsave().map_err(self.kvm("KVM_GET_XSAVE"))?,
            xcrs: self.fd.get_xcrs().ok().filter(holds_xcrs),
            debug_regs: self.fd.get_debug_regs().ok(),
            lapic: self.fd.get_lapic().map_err(self.kvm("KVM_GET_LAPIC"))?,
            mp_state: self
                .fd
                .get_mp_state()
                .map_err(self.kvm("KVM_GET_MP_STATE"))?,
            vcpu_events: self
                .fd
                .get_vcpu_events()
                .map_err(self.kvm("KVM_GET_VCPU_EVENTS"))?,
            msrs: self.read_msrs()?,
            cpuid: self
                .fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(self.kvm("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            tsc_khz: self.fd.get_tsc_khz().ok(),
        })
    }

    /// Puts a saved state back, in the order KVM needs: CPUID, special registers before
    /// general ones, FPU then XSAVE, XCRs, debug registers, LAPIC, MSRs (TSC first), pending
    /// events, then the MP state.
    pub fn restore_state(&self, state: &VcpuState, irqchip: bool) -> Result<(), VcpuError> {
        let invalid = |what: &str| VcpuError::InvalidState {
            id: self.id,
            what: what.into(),
        };
        if state.id != self.id {
            return Err(invalid("state belongs to another vCPU"));
        }
        if !state.cpuid.is_empty() {
            let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| invalid("CPUID too long"))?;
            self.fd
                .set_cpuid2(&cpuid)
                .map_err(self.kvm("KVM_SET_CPUID2"))?;
        }
        if let Some(khz) = state.tsc_khz {
            if self.fd.get_tsc_khz().ok() != Some(khz) {
                self.fd
                    .set_tsc_khz(khz)
                    .map_err(self.kvm("KVM_SET_TSC_KHZ (the host TSC frequency differs)"))?;
            }
        }
        self.fd
            .set_sregs(&state.sregs)
            .map_err(self.kvm("KVM_SET_SREGS"))?;
        self.fd
            .set_regs(&state.regs)
            .map_err(self.kvm("KVM_SET_REGS"))?;
        if state.fpu.len() == std::mem::size_of::<kvm_fpu>() {
            // SAFETY: kvm_fpu is plain old data and the byte count matches exactly.
            let fpu: kvm_fpu = unsafe { std::ptr::read_unaligned(state.fpu.as_ptr().cast()) };
            self.fd.set_fpu(&fpu).map_err(self.kvm("KVM_SET_FPU"))?;
        } else if !state.fpu.is_empty() {
            return Err(invalid("FPU state has the wrong size"));
        }
        // SAFETY: the XSAVE area came from KVM_GET_XSAVE of the same CPU model (the snapshot
        // header's host check) and is as large as the kernel's copy.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(self.kvm("KVM_SET_XSAVE"))?;
        if let Some(xcrs) = state.xcrs.as_ref().filter(|x| holds_xcrs(x)) {
            self.fd.set_xcrs(xcrs).map_err(self.kvm("KVM_SET_XCRS"))?;
        }
        if let Some(debug) = &state.debug_regs {
            self.fd
                .set_debug_regs(debug)
                .map_err(self.kvm("KVM_SET_DEBUGREGS"))?;
        }
        if irqchip {
            self.fd
                .set_lapic(&state.lapic)
                .map_err(self.kvm("KVM_SET_LAPIC"))?;
        }
        for chunk in state.msrs.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| invalid("MSR list too long"))?;
            let set = self.fd.set_msrs(&msrs).map_err(self.kvm("KVM_SET_MSRS"))?;
            if set != entries.len() {
                return Err(VcpuError::RestoreMsrs {
                    id: self.id,
                    index: entries[set].index,
                    set,
                    total: entries.len(),
                });
            }
        }
        self.fd
            .set_vcpu_events(&state.vcpu_events)
            .map_err(self.kvm("KVM_SET_VCPU_EVENTS"))?;
        if irqchip {
            self.fd
                .set_mp_state(state.mp_state)
                .map_err(self.kvm("KVM_SET_MP_STATE"))?;
        }
        Ok(())
    }

    /// One KVM_RUN and the handling of its exit.
    fn step(&mut self, shared: &VcpuShared) -> Step {
        let id = self.id;
        let outcome = match self.fd.run() {
            Ok(exit) => handle_exit(id, exit, shared),
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
            Outcome::PortIo => self.handle_port_io(shared),
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
                return Step::Ended;
            }
            Outcome::Exit(exit) => {
                shared.exit.report(exit);
                return Step::Ended;
            }
        }
        Step::Continue
    }

    /// Lets KVM finish a port/MMIO exit the VMM has handled (KVM_RUN with `immediate_exit`
    /// completes it, then returns EINTR) so registers and memory are consistent. False if the
    /// VM ended meanwhile.
    fn complete_pending_exit(&mut self, shared: &VcpuShared) -> bool {
        loop {
            self.fd.set_kvm_immediate_exit(1);
            match self.step(shared) {
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

    /// Runs the vCPU until something ends the VM or `shared.stop` is set; parks it while the
    /// VM is paused.
    pub fn run(mut self, shared: VcpuShared) {
        // Dropped before `self` (locals go before parameters), also when a device model
        // panics on this thread: the kick handler must never see kvm_run once it is unmapped.
        let _registered = RunningThread::register(self.fd.get_kvm_run(), &shared.control);
        loop {
            if shared.stop.load(Ordering::Acquire) {
                break;
            }
            if shared.control.is_paused() {
                if !self.complete_pending_exit(&shared) {
                    break;
                }
                let vcpu = &self;
                shared.control.park(&shared.stop, || {
                    vcpu.save_state().map_err(|e| e.to_string())
                });
                continue;
            }
            match self.step(&shared) {
                Step::Continue => {}
                Step::Interrupted => self.fd.set_kvm_immediate_exit(0),
                Step::Ended => break,
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
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) => {
            if let Some(first) = &shared.first_io {
                first.hit();
            }
            Outcome::PortIo
        }
        VcpuExit::MmioRead(addr, data) => {
            if let Some(first) = &shared.first_io {
                first.hit();
            }
            if !shared.mmio.read(addr, data, UNMAPPED_READ) {
                tracing::debug!(addr, "unmapped MMIO read");
            }
            Outcome::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if let Some(first) = &shared.first_io {
                first.hit();
            }
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

/// Whether KVM_GET_XCRS gave any register. On a host CPU without XSAVE it succeeds with none,
/// and KVM_SET_XCRS then refuses even that empty list (EINVAL): such a vCPU has no XCRs to
/// save or restore.
fn holds_xcrs(xcrs: &kvm_xcrs) -> bool {
    xcrs.nr_xcrs > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kick handler must never write to a kvm_run that is gone: a device model that panics
    /// on a vCPU thread unwinds past the end of `run` and drops the vCPU's fd (unmapping its
    /// kvm_run) while the VM is still kicking that thread to stop it.
    #[test]
    fn a_panic_on_a_vcpu_thread_unregisters_its_kvm_run_before_it_is_unmapped() {
        let control = VcpuControl::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut fake_run: kvm_bindings::kvm_run = Default::default();
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _registered = RunningThread::register(&mut fake_run, &control);
                    assert_eq!(lock(&control.inner).alive, 1);
                    kick_handler(0, std::ptr::null_mut(), std::ptr::null_mut());
                    assert_eq!(fake_run.immediate_exit, 1, "a kick reaches a running vCPU");
                    panic!("device model bug");
                }));
                assert!(caught.is_err());
                assert!(KVM_RUN.with(|r| r.get()).is_null());
                // A late kick, as stop_vcpus sends them, now touches nothing.
                fake_run.immediate_exit = 0;
                kick_handler(0, std::ptr::null_mut(), std::ptr::null_mut());
                assert_eq!(fake_run.immediate_exit, 0);
            });
        });
        assert_eq!(lock(&control.inner).alive, 0, "the thread was counted out");
    }

    #[test]
    fn an_empty_xcr_list_from_a_cpu_without_xsave_is_neither_saved_nor_restored() {
        let mut xcrs = kvm_xcrs::default();
        assert!(!holds_xcrs(&xcrs), "KVM_SET_XCRS would fail with EINVAL");
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].value = 0x7; // XCR0: x87, SSE, AVX
        assert!(holds_xcrs(&xcrs));
    }
}
