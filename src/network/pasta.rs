//! pasta (Debian package passt): the user-mode network stack of a process sandbox. It puts a
//! tap device `eth0` into the sandbox's network namespace and turns the function's connections
//! into ordinary sockets of its own on the host, so the host needs no bridge, veth or NAT rule.
//!
//! It is started as root, in the instance's cgroup: it needs `CAP_SYS_ADMIN` and
//! `CAP_NET_ADMIN` for a namespace owned by the host's user namespace (with another uid it
//! drops every capability and cannot join it), and keeps only those, under its own seccomp
//! filter. Being in the cgroup, it is killed with the instance, after a crash too, and its
//! memory counts as the function's.
//!
//! No port is forwarded either way (`-t none -u none -T none -U none`): the function's port 9000
//! is reached through the agent's bridge, and the host's loopback services stay out of reach
//! (`--no-map-gw`).

use std::ffi::CString;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{HostNetwork, NetworkError, DNS, GATEWAY, GUEST_ADDR, INTERFACE, PREFIX_LEN};

/// The program.
const PASTA: &str = "pasta";
/// How long pasta may take to set the namespace up.
const READY_TIMEOUT: Duration = Duration::from_secs(5);
/// pasta's MTU (its default): large segments without segmentation offload.
const MTU: &str = "65520";
/// The namespace descriptor's number in pasta, named to it as `/proc/self/fd/3`: pasta could
/// not open `/proc/<agent>/ns/net` itself (it has fewer capabilities than the agent, so the
/// kernel's ptrace check refuses it).
const NETNS_FD: i32 = 3;

/// A running pasta, killed when dropped.
#[derive(Debug)]
pub struct Pasta {
    child: Option<Child>,
    pid_file: PathBuf,
    err_file: PathBuf,
    /// `eth0` is up in the namespace.
    ready: bool,
}

impl Pasta {
    /// Starts pasta for the network namespace `netns` and returns once `eth0` is up in it.
    /// `join` are the `cgroup.procs` files it moves itself into first; `dir` a scratch
    /// directory for its pid file and its messages.
    pub fn attach(
        netns: BorrowedFd<'_>,
        host: &HostNetwork,
        join: &[PathBuf],
        dir: &Path,
    ) -> Result<Pasta, NetworkError> {
        let mut pasta = Self::spawn(netns, host, join, dir)?;
        pasta.wait_ready()?;
        Ok(pasta)
    }

    /// Starts pasta as [`Self::attach`] does, without waiting for it: its set-up (~5 ms on a
    /// quiet host, mostly its own) overlaps the caller's until [`Self::wait_ready`].
    pub fn spawn(
        netns: BorrowedFd<'_>,
        host: &HostNetwork,
        join: &[PathBuf],
        dir: &Path,
    ) -> Result<Pasta, NetworkError> {
        let pid_file = dir.join("pasta.pid");
        let err_file = dir.join("pasta.err");
        let _ = std::fs::remove_file(&pid_file);
        let stderr = std::fs::File::create(&err_file).map_err(|e| NetworkError::Spawn {
            program: PASTA,
            cause: e,
        })?;
        let mut cmd = Command::new(PASTA);
        cmd.args([
            "--quiet",
            "--foreground",
            "--runas",
            "0",
            "--config-net",
            "--ipv4-only",
        ])
        .args(["--address", &GUEST_ADDR.to_string()])
        .args(["--netmask", &PREFIX_LEN.to_string()])
        .args(["--gateway", &GATEWAY.to_string()])
        .args(["--dns-forward", &DNS.to_string()])
        .args(["--ns-ifname", INTERFACE, "--mtu", MTU])
        .args([
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--no-map-gw",
        ])
        .arg("--pid")
        .arg(&pid_file);
        let resolvers = host
            .resolv_conf_in(dir)?
            .map(|p| CString::new(p.as_os_str().as_bytes()).expect("a path without NUL"));
        cmd.args(["--netns", &format!("/proc/self/fd/{NETNS_FD}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let join: Vec<CString> = join
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()).expect("a path without NUL"))
            .collect();
        let fd = netns.as_raw_fd();
        // SAFETY: between fork and exec the closure makes only raw syscalls (unshare, mount,
        // open, write, close, dup2, fcntl) on C strings and descriptors made before the fork,
        // and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(file) = &resolvers {
                    super::bind_resolv_conf(file)?;
                }
                for file in &join {
                    let f = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if f < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let ok = libc::write(f, b"0".as_ptr().cast(), 1) == 1;
                    libc::close(f);
                    if !ok {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if fd == NETNS_FD {
                    // dup2 onto itself would keep close-on-exec.
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, NETNS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| NetworkError::Spawn {
            program: PASTA,
            cause: e,
        })?;
        Ok(Pasta {
            child: Some(child),
            pid_file,
            err_file,
            ready: false,
        })
    }

    /// Returns once `eth0` is up in the namespace (pasta writes its pid file then), or fails
    /// with pasta's own words; pasta is stopped then.
    pub fn wait_ready(&mut self) -> Result<(), NetworkError> {
        let began = Instant::now();
        let mut pause = Duration::from_micros(100);
        loop {
            if self.ready || std::fs::metadata(&self.pid_file).is_ok_and(|m| m.len() > 0) {
                self.ready = true;
                return Ok(());
            }
            let Some(child) = self.child.as_mut() else {
                return Err(NetworkError::Pasta {
                    why: "it was stopped".into(),
                    stderr: String::new(),
                });
            };
            let why = match child.try_wait() {
                Ok(Some(status)) => Some(format!("it exited: {status}")),
                Ok(None) if began.elapsed() > READY_TIMEOUT => {
                    Some(format!("not ready after {READY_TIMEOUT:?}"))
                }
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait for it: {e}")),
            };
            if let Some(why) = why {
                self.stop();
                let stderr = std::fs::read_to_string(&self.err_file).unwrap_or_default();
                return Err(NetworkError::Pasta {
                    why,
                    stderr: super::helper_messages(&stderr),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it and waits for it: the namespace's `eth0` goes with it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Pasta {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::tests::ScratchNetns;

    fn in_netns(ns: &ScratchNetns, script: &str) -> String {
        let out = Command::new("nsenter")
            .args(["-t", &ns.pid().to_string(), "-n", "sh", "-c", script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    }

    #[test]
    fn pasta_gives_a_namespace_eth0_and_takes_it_away_when_stopped() {
        if !nix::unistd::geteuid().is_root()
            || Command::new(PASTA).arg("--version").output().is_err()
        {
            eprintln!("skipped: needs root and pasta");
            return;
        }
        let ns = ScratchNetns::new();
        let dir = tempfile::tempdir().unwrap();
        let mut pasta = Pasta::attach(ns.fd(), &HostNetwork::default(), &[], dir.path()).unwrap();
        let addrs = in_netns(&ns, "ip -br -4 addr show dev eth0; ip route show default");
        assert!(addrs.contains("10.0.2.15/24"), "{addrs}");
        assert!(addrs.contains("default via 10.0.2.2"), "{addrs}");
        let pid = pasta.pid().unwrap();
        pasta.stop();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pasta is gone"
        );
        let after = in_netns(&ns, "ip -br link");
        assert!(!after.contains("eth0"), "{after}");
    }

    #[test]
    fn a_pasta_that_cannot_start_says_why() {
        if !nix::unistd::geteuid().is_root()
            || Command::new(PASTA).arg("--version").output().is_err()
        {
            eprintln!("skipped: needs root and pasta");
            return;
        }
        // Not a network namespace: pasta refuses it.
        let not_ns = std::fs::File::open("/dev/null").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = Pasta::attach(
            std::os::fd::AsFd::as_fd(&not_ns),
            &HostNetwork::default(),
            &[],
            dir.path(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("pasta did not set up the function's network (it exited"),
            "{text}"
        );
    }
}
