//! The guest's network: only loopback, which a fresh network namespace (and a VM's kernel)
//! starts with down. The function's server and the agent's bridge meet on 127.0.0.1:9000.

use std::io;
use std::os::fd::AsRawFd;

/// Why the guest's loopback network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No socket to configure `lo` through.
    #[error("cannot open a socket to configure lo: {0}")]
    Socket(io::Error),
    /// `lo`'s flags cannot be read.
    #[error("cannot read lo's flags: {0}")]
    ReadFlags(io::Error),
    /// `lo` cannot be brought up.
    #[error("cannot bring lo up: {0}")]
    BringUp(io::Error),
    /// The SYN cookie sysctl cannot be written.
    #[error("cannot turn SYN cookies off: {0}")]
    SynCookies(io::Error),
    /// The ICMP datagram sockets' group range cannot be written.
    #[error("cannot allow unprivileged ping: {0}")]
    PingRange(io::Error),
    /// The namespace's interfaces cannot be listed.
    #[error("cannot list network interfaces: {0}")]
    ListInterfaces(io::Error),
}

/// Brings `lo` up (idempotent).
pub fn bring_up_loopback() -> Result<(), NetError> {
    // SAFETY: socket() takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Socket(io::Error::last_os_error()));
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
            return Err(NetError::ReadFlags(io::Error::last_os_error()));
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(NetError::BringUp(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Turns SYN cookies off in the sandbox's own network namespace. The function's only client is
/// the bridge, so there is no SYN flood to defend against; but with cookies on, a burst of
/// connections beyond the server's listen backlog (busybox httpd listens with 9, Python's
/// http.server with 5) gets connections reset, while without them the kernel just retries
/// the handshake. Skipped (false) when the namespace has interfaces besides `lo`: then it is
/// not a sandbox's own and not the agent's to tune.
pub fn prefer_handshake_retries_to_syn_cookies() -> Result<bool, NetError> {
    // eth0 is the sandbox's own egress interface (nothing listens for connections from it: no
    // port is forwarded to the function).
    if interfaces()?
        .iter()
        .any(|name| name != "lo" && name != "eth0")
    {
        return Ok(false);
    }
    std::fs::write("/proc/sys/net/ipv4/tcp_syncookies", "0").map_err(NetError::SynCookies)?;
    Ok(true)
}

/// Lets every group open ICMP datagram sockets, so `ping` works in a function that has no
/// CAP_NET_RAW (the kernel's default range is empty).
pub fn allow_unprivileged_ping() -> Result<(), NetError> {
    std::fs::write("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")
        .map_err(NetError::PingRange)
}

/// The names of this network namespace's interfaces.
fn interfaces() -> Result<Vec<String>, NetError> {
    // SAFETY: if_nameindex allocates a list that we read up to its zero entry and free.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(NetError::ListInterfaces(io::Error::last_os_error()));
        }
        let mut names = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.push(
                std::ffi::CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_hosts_interfaces_include_loopback() {
        let names = super::interfaces().unwrap();
        assert!(names.iter().any(|n| n == "lo"), "{names:?}");
    }
}
