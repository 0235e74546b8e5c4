//! Ending the VM: sync, then reboot. fnvm boots Linux with `reboot=k`, so the reboot is an i8042
//! reset, which the VMM reports as the guest ending itself cleanly.

use nix::sys::reboot::{reboot as sys_reboot, RebootMode};

/// Writes back all file systems and resets the machine. Never returns: if the reboot call itself
/// fails, PID 1 prints why and sleeps forever (exiting would panic the kernel).
pub fn reboot() -> ! {
    nix::unistd::sync();
    let err = sys_reboot(RebootMode::RB_AUTOBOOT).unwrap_err();
    crate::console::line(&format!("error: reboot failed: {err}"));
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
