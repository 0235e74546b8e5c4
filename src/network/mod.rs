//! How a function reaches the network: its policy ([`policy`]), the rules that enforce it
//! ([`filter`]) and the user-mode network stack that carries its traffic out through the host's
//! own sockets ([`pasta`] for a process sandbox's network namespace; passt for a VM). No tap on
//! the host, no bridge, no NAT rule: the host sees ordinary connections made by a process.
//!
//! Every sandbox sees the same network, whatever the host's: [`GUEST_ADDR`]/24 on `eth0`,
//! gateway [`GATEWAY`], resolver [`DNS`] (forwarded to the host's resolvers). A snapshot taken
//! on one host therefore restores on another.

pub mod filter;
pub mod host_filter;
pub mod passt;
pub mod pasta;
pub mod policy;
pub mod uid;

use std::net::{IpAddr, Ipv4Addr};

pub use policy::{NetworkMode, NetworkPolicy, PolicyError};

/// The function's address.
pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The prefix length of [`GUEST_ADDR`]'s network.
pub const PREFIX_LEN: u8 = 24;
/// The user-mode stack's side of the link.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Where the function's DNS queries go; the user-mode stack forwards them to the host's
/// resolvers (or those given with `--dns`).
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The function's interface.
pub const INTERFACE: &str = "eth0";

/// Debian's nftables command line (package nftables).
pub(crate) const NFT: &str = "nft";

/// A helper's messages on stderr, one line, without the user-mode stack's complaints about a
/// missing system logger and its hints for people starting QEMU by hand.
pub(crate) fn helper_messages(stderr: &str) -> String {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("to syslog") && !l.contains("qemu"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// `/etc/resolv.conf` of a function with egress.
pub fn resolv_conf() -> String {
    format!("# written by fnvm: queries go to the host's resolvers\nnameserver {DNS}\n")
}

/// How the host gives functions their network: the resolvers DNS queries are forwarded to
/// (empty: the host's `/etc/resolv.conf`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNetwork {
    pub dns: Vec<IpAddr>,
}

impl HostNetwork {
    /// The resolv.conf a user-mode stack should read instead of the host's, written into `dir`
    /// (None: the host's own). passt/pasta 0.0~git20230309 (Debian 12) forward DNS to 0.0.0.0
    /// when given `--dns`, so the resolvers reach them the way they read the host's: as
    /// `/etc/resolv.conf`, bind-mounted over it in a mount namespace of their own
    /// ([`bind_resolv_conf`]).
    pub fn resolv_conf_in(
        &self,
        dir: &std::path::Path,
    ) -> Result<Option<std::path::PathBuf>, NetworkError> {
        if self.dns.is_empty() {
            return Ok(None);
        }
        let text: String = self
            .dns
            .iter()
            .map(|a| format!("nameserver {a}\n"))
            .collect();
        let path = dir.join("upstream-resolv.conf");
        std::fs::write(&path, text).map_err(|cause| NetworkError::Spawn {
            program: "the resolvers' file",
            cause,
        })?;
        Ok(Some(path))
    }
}

/// In a child between fork and exec: a mount namespace of its own with `file` over
/// /etc/resolv.conf (see [`HostNetwork::resolv_conf_in`]).
///
/// # Safety
/// Only for a `pre_exec` closure: it makes raw syscalls and allocates nothing.
pub(crate) unsafe fn bind_resolv_conf(file: &std::ffi::CStr) -> std::io::Result<()> {
    // SAFETY: unshare and mount take flags and NUL-terminated strings that outlive the calls.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            || libc::mount(
                file.as_ptr(),
                c"/etc/resolv.conf".as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why a function's network could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A helper program is missing or failed to start.
    #[error("cannot run {program} (Debian packages passt and nftables): {cause}")]
    Spawn {
        program: &'static str,
        cause: std::io::Error,
    },
    /// The user-mode network stack did not come up.
    #[error("pasta did not set up the function's network ({why}){}", tail(stderr))]
    Pasta { why: String, stderr: String },
    /// nft refused the rules fnvm made.
    #[error("nft refused the rules ({status}): {stderr}")]
    Rules { status: String, stderr: String },
    /// The host's addresses cannot be listed.
    #[error("cannot list the host's addresses: {0}")]
    HostAddresses(std::io::Error),
    /// The sandbox's network namespace cannot be opened.
    #[error("cannot open the sandbox's network namespace {path}: {cause}")]
    Namespace { path: String, cause: std::io::Error },
}

fn tail(stderr: &str) -> String {
    match stderr.trim() {
        "" => String::new(),
        text => format!(": {text}"),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

    use super::{NetworkMode, NetworkPolicy};

    /// An egress policy of these ranges.
    pub fn policy(deny: &[&str], allow: &[&str]) -> NetworkPolicy {
        let s = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        NetworkPolicy::new(NetworkMode::Egress, &s(deny), &s(allow)).unwrap()
    }

    /// A network namespace of a test's own, held by a sleeping child (killed on drop).
    pub struct ScratchNetns {
        child: std::process::Child,
        fd: OwnedFd,
    }

    impl ScratchNetns {
        pub fn new() -> Self {
            let child = std::process::Command::new("unshare")
                .args(["--net", "sleep", "600"])
                .spawn()
                .expect("unshare (util-linux)");
            let path = format!("/proc/{}/ns/net", child.id());
            // unshare execs sleep after it has made the namespace: wait until it differs.
            let own = std::fs::read_link("/proc/self/ns/net").unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::fs::read_link(&path).ok().as_ref() == Some(&own)
                || std::fs::read_link(&path).is_err()
            {
                assert!(
                    std::time::Instant::now() < deadline,
                    "unshare made no namespace"
                );
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let fd = std::fs::File::open(&path).unwrap().into();
            ScratchNetns { child, fd }
        }

        pub fn fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }

        pub fn pid(&self) -> u32 {
            self.child.id()
        }
    }

    impl Drop for ScratchNetns {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    #[test]
    fn the_resolver_is_the_forwarding_address() {
        assert!(super::resolv_conf().ends_with("nameserver 10.0.2.3\n"));
    }
}
