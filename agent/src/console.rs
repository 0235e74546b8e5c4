//! The console: the agent's only channel to the host until vsock exists.
//!
//! The kernel normally hands PID 1 `/dev/console` as stdin/stdout/stderr. If the root file system
//! had no /dev/console when the kernel looked, the descriptors are closed; `attach` then opens the
//! console from the devtmpfs the agent just mounted.

use std::io::Write;
use std::os::fd::AsRawFd;

/// Every line the agent prints starts with this, so the host can tell it from kernel messages.
pub const PREFIX: &str = "fnvm-agent: ";

/// Makes sure fds 0, 1 and 2 are the console.
pub fn attach() {
    // SAFETY: F_GETFD only queries the descriptor table; no memory is involved.
    let stdout_open = unsafe { libc::fcntl(1, libc::F_GETFD) } != -1;
    if stdout_open {
        return;
    }
    let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    else {
        return; // Nothing to print to; keep going, the VMM still sees how the guest ends.
    };
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard descriptors, which this process owns and nothing else
        // uses yet (the agent is single-threaded at this point).
        unsafe { libc::dup2(console.as_raw_fd(), fd) };
    }
}

/// Prints one agent line (`fnvm-agent: <text>`) and flushes it. Errors are ignored on purpose:
/// PID 1 must go on even with no console.
pub fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{PREFIX}{text}");
    let _ = out.flush();
}
