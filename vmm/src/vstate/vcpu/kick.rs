//! The kick: a real-time signal sent to a vCPU thread to make its `KVM_RUN` return, so the
//! thread sees a pause or stop request. The handler sets `immediate_exit` in the thread's own
//! `kvm_run`, which makes kicks race-free: a signal that lands just before `KVM_RUN` still
//! makes it return at once.

use std::cell::Cell;
use std::sync::Once;

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// This thread's kvm_run while its vCPU runs (null otherwise), where the kick handler
    /// finds it.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal that interrupts a vCPU's KVM_RUN so its thread sees the stop or pause flag.
pub(crate) fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler for the process (once; later calls do nothing).
pub(crate) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), kick_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Makes `run` (this thread's live kvm_run mapping, or null) the one kicks reach. It must be
/// set back to null before the mapping goes.
pub(super) fn set_thread_kvm_run(run: *mut kvm_bindings::kvm_run) {
    KVM_RUN.with(|r| r.set(run));
}

/// The kvm_run kicks on this thread reach (null when none).
#[cfg(test)]
pub(super) fn thread_kvm_run() -> *mut kvm_bindings::kvm_run {
    KVM_RUN.with(|r| r.get())
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
