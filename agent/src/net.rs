//! The guest's network: only loopback, which a fresh network namespace (and a VM's kernel)
//! starts with down. The function's server and the agent's bridge meet on 127.0.0.1:9000.

use std::os::fd::AsRawFd;

/// Brings `lo` up (idempotent).
pub fn bring_up_loopback() -> Result<(), String> {
    // SAFETY: socket() takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "cannot open a socket to configure lo: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd is new and owned by nothing else.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq that lives on this frame.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(format!(
                "cannot read lo's flags: {}",
                std::io::Error::last_os_error()
            ));
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(format!(
                "cannot bring lo up: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}
