//! The vCPU threads of one VM: counted as they start and end, kicked out of `KVM_RUN`,
//! paused, parked, asked to save their state, and stopped.
//!
//! Pausing sets a flag and kicks every thread out of KVM_RUN; each thread first completes any
//! pending port/MMIO exit (KVM_RUN with `immediate_exit`, as KVM requires before its state is
//! read), then parks on a condition variable. Parked threads save their own state on request.
//! Stopping sets another flag and kicks until every thread has returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use super::kick::{kick_signal, set_thread_kvm_run};
use super::state::VcpuState;
use super::VcpuError;
use crate::devices::bus::lock;

/// How long a pause or save may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the vCPUs could not be paused or could not save their state.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// Some vCPU did not park in time (the others were resumed).
    #[error("only {parked} of {expected} vCPUs paused within {PAUSE_TIMEOUT:?} ({alive} running)")]
    Timeout {
        parked: usize,
        expected: usize,
        alive: usize,
    },
    /// A save needs every vCPU parked first.
    #[error("the VM is not paused")]
    NotPaused,
    /// Some parked vCPU did not answer the save request in time.
    #[error("vCPUs did not save their state in time")]
    SaveTimeout,
    /// A vCPU could not read its own state.
    #[error("saving a vCPU's state: {0}")]
    Save(#[from] VcpuError),
}

/// Pause, park, save and stop requests to the vCPU threads of one VM.
#[derive(Default)]
pub struct VcpuThreads {
    stop: AtomicBool,
    pause: AtomicBool,
    book: Mutex<Book>,
    cond: Condvar,
}

/// What the threads report under the lock.
#[derive(Default)]
struct Book {
    threads: Vec<libc::pthread_t>,
    alive: usize,
    parked: usize,
    save_round: u64,
    saved: Vec<Result<VcpuState, VcpuError>>,
}

impl VcpuThreads {
    pub fn new() -> Self {
        Self::default()
    }

    fn thread_started(&self) {
        let mut c = lock(&self.book);
        // SAFETY: pthread_self has no preconditions.
        c.threads.push(unsafe { libc::pthread_self() });
        c.alive += 1;
        self.cond.notify_all();
    }

    fn thread_ended(&self) {
        let mut c = lock(&self.book);
        // SAFETY: as above.
        let me = unsafe { libc::pthread_self() };
        c.threads.retain(|&t| t != me);
        c.alive -= 1;
        self.cond.notify_all();
    }

    /// Whether the threads were told to stop for good.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn is_paused(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    fn kick_all(&self, c: &Book) {
        for &t in &c.threads {
            // SAFETY: the thread is alive (removed from the list under the lock before it ends).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Stops all `expected` vCPUs and waits until each is parked.
    pub fn pause(&self, expected: usize) -> Result<(), PauseError> {
        self.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut c = lock(&self.book);
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
        Err(PauseError::Timeout {
            parked,
            expected,
            alive,
        })
    }

    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _g = lock(&self.book);
        self.cond.notify_all();
    }

    /// Has every parked vCPU save its state; sorted by vCPU id.
    pub fn save_all(&self) -> Result<Vec<VcpuState>, PauseError> {
        if !self.is_paused() {
            return Err(PauseError::NotPaused);
        }
        let mut c = lock(&self.book);
        c.save_round += 1;
        c.saved.clear();
        self.cond.notify_all();
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        while c.saved.len() < c.parked {
            let now = Instant::now();
            if now > deadline {
                return Err(PauseError::SaveTimeout);
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
    pub(super) fn park(&self, mut save: impl FnMut() -> Result<VcpuState, VcpuError>) {
        let mut c = lock(&self.book);
        let mut round = c.save_round;
        c.parked += 1;
        self.cond.notify_all();
        while self.is_paused() && !self.is_stopped() {
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

    /// Sets the stop flag and kicks every vCPU thread out of KVM_RUN until it has returned.
    /// Signals are resent every millisecond because one can land just before a thread enters
    /// KVM_RUN; threads still running after 2 s are left behind (reported, never waited on).
    pub fn stop_all(&self, threads: Vec<JoinHandle<()>>) {
        self.stop.store(true, Ordering::Release);
        self.cond.notify_all();
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut pending = threads;
        while !pending.is_empty() {
            let (done, running): (Vec<_>, Vec<_>) =
                pending.into_iter().partition(|t| t.is_finished());
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
            self.cond.notify_all();
            for t in &pending {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// A vCPU thread while it runs: its kvm_run is where the kick handler finds it, and its
/// VM's [`VcpuThreads`] counts it. Dropping it (at the end or while a panic unwinds) undoes
/// both, before the vCPU's fd and its kvm_run mapping go.
pub(super) struct RunningThread<'a> {
    threads: &'a VcpuThreads,
}

impl<'a> RunningThread<'a> {
    pub(super) fn register(run: *mut kvm_bindings::kvm_run, threads: &'a VcpuThreads) -> Self {
        set_thread_kvm_run(run);
        threads.thread_started();
        Self { threads }
    }
}

impl Drop for RunningThread<'_> {
    fn drop(&mut self) {
        set_thread_kvm_run(std::ptr::null_mut());
        self.threads.thread_ended();
    }
}

#[cfg(test)]
mod tests {
    use super::super::kick::{kick_handler, thread_kvm_run};
    use super::*;

    /// The kick handler must never write to a kvm_run that is gone: a device model that panics
    /// on a vCPU thread unwinds past the end of `run` and drops the vCPU's fd (unmapping its
    /// kvm_run) while the VM is still kicking that thread to stop it.
    #[test]
    fn a_panic_on_a_vcpu_thread_unregisters_its_kvm_run_before_it_is_unmapped() {
        let threads = VcpuThreads::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut fake_run: kvm_bindings::kvm_run = Default::default();
                let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _registered = RunningThread::register(&mut fake_run, &threads);
                    assert_eq!(lock(&threads.book).alive, 1);
                    kick_handler(0, std::ptr::null_mut(), std::ptr::null_mut());
                    assert_eq!(fake_run.immediate_exit, 1, "a kick reaches a running vCPU");
                    panic!("device model bug");
                }));
                assert!(caught.is_err());
                assert!(thread_kvm_run().is_null());
                // A late kick, as stop_all sends them, now touches nothing.
                fake_run.immediate_exit = 0;
                kick_handler(0, std::ptr::null_mut(), std::ptr::null_mut());
                assert_eq!(fake_run.immediate_exit, 0);
            });
        });
        assert_eq!(lock(&threads.book).alive, 0, "the thread was counted out");
    }
}
