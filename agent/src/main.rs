//! fnvm-agent: the guest's PID 1, a static binary.
//!
//! This first version brings the guest up (mounts /proc, /sys, /dev), reports on the console how
//! long the guest took to reach it, runs the test actions named on the kernel command line
//! (`fnvm.test=...`, used by fnvm's Linux-guest tests), and ends the VM cleanly. Running the
//! user's function over vsock comes later and slots in between "up" and "shutdown".
//!
//! PID 1 must never exit or panic (the kernel would panic in turn): every error is printed and
//! the VM is rebooted, which the VMM sees as the guest ending itself.

mod cmdline;
mod console;
mod mounts;
mod shutdown;
mod test_actions;

fn main() {
    // Mounting over /proc and rebooting are only right for the init of a guest or of a fresh PID
    // namespace; anywhere else (say, run by hand on a host as root) they would hit the host.
    if std::process::id() != 1 {
        eprintln!(
            "{}error: not PID 1; the agent runs only as a guest's init",
            console::PREFIX
        );
        std::process::exit(2);
    }
    // A Rust panic here would kill PID 1; turn it into a printed error and a clean reboot.
    std::panic::set_hook(Box::new(|info| {
        console::line(&format!("error: internal panic: {info}"));
        shutdown::reboot();
    }));

    if let Err(err) = run() {
        console::line(&format!("error: {err}"));
    }
    shutdown::reboot();
}

/// Everything PID 1 does before the VM ends; any error ends it early.
fn run() -> Result<(), String> {
    mounts::mount_kernel_filesystems()?;
    console::attach();
    console::line(&format!("up after {} s", read_uptime()?));

    let cmdline = std::fs::read_to_string("/proc/cmdline")
        .map_err(|e| format!("cannot read /proc/cmdline: {e}"))?;
    for action in cmdline::test_actions(&cmdline) {
        let action = test_actions::Action::parse(action)?;
        test_actions::run(&action)?;
    }
    Ok(())
}

/// The guest's uptime as the kernel reports it (first field of /proc/uptime, e.g. "0.42").
fn read_uptime() -> Result<String, String> {
    let text = std::fs::read_to_string("/proc/uptime")
        .map_err(|e| format!("cannot read /proc/uptime: {e}"))?;
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| format!("/proc/uptime is malformed: {text:?}"))
}
