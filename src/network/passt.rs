//! passt (Debian package passt): the user-mode network stack of a VM. `fnvm-vmm --net SOCKET`
//! connects the guest's virtio-net device to it; passt turns the guest's connections into
//! ordinary sockets of its own on the host, so the host needs no tap, bridge or NAT rule.
//!
//! One passt per instance, as the instance's own uid ([`super::uid`]): that uid is what the
//! host's rules ([`super::host_filter`]) know the instance's traffic by. passt drops to it
//! before it binds its socket (and, a quirk of this version, says "bound" even when the bind
//! failed), so the socket lives in the uid's own directory, not in the instance directory.
//! `--one-off`: it quits when the VMM's connection ends, so a VMM that dies takes its passt
//! with it; the instance still kills (and reaps) it at stop, and records its process for the
//! orphan clean-up after a crash.
//!
//! The guest's network is fixed (10.0.2.15/24, gateway 10.0.2.2, DNS 10.0.2.3 forwarded to the
//! host's resolvers), IPv4 only. Resolvers given to fnvm (`--dns`) are not passed as passt's
//! `--dns`: this passt (0.0~git20230309) then forwards the guest's queries to 0.0.0.0 (it takes
//! the forwarding target only from `/etc/resolv.conf`). passt is started instead in a mount
//! namespace of its own where a file listing them is bind-mounted over `/etc/resolv.conf`
//! ([`HostNetwork::resolv_conf_in`], as for pasta).
//!
//! No port is forwarded either way (`-t none -u none`): the function's port 9000 is reached
//! over vsock, and the host's loopback stays out of reach (`--no-map-gw`).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::uid::EgressUid;
use super::{HostNetwork, DNS, GATEWAY, GUEST_ADDR, PREFIX_LEN};

/// The program.
const PASST: &str = "passt";
/// How long passt may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// passt's MTU (its default, and what the VMM's device offers): large segments without
/// segmentation offload.
const MTU: &str = "65520";
/// The socket's name in the uid's directory.
pub const SOCKET: &str = "passt.sock";
/// The pid file's name there: passt writes it once it is set up (after the socket).
const PID_FILE: &str = "passt.pid";

/// Why passt could not serve a VM.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// The program is missing or could not be started.
    #[error("cannot run passt (Debian package passt): {0}")]
    Spawn(std::io::Error),
    /// Its stderr file cannot be written.
    #[error("cannot write {path} for passt: {cause}")]
    Messages {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The file naming its resolvers cannot be written.
    #[error("passt's resolvers: {0}")]
    Resolvers(super::NetworkError),
    /// It did not come up.
    #[error("passt did not start ({why}){}", tail(stderr))]
    NotReady { why: String, stderr: String },
}

fn tail(stderr: &str) -> String {
    match stderr.trim() {
        "" => String::new(),
        text => format!(": {text}"),
    }
}

/// A running passt, killed (and reaped) when stopped or dropped.
#[derive(Debug)]
pub struct Passt {
    child: Option<Child>,
    socket: PathBuf,
}

impl Passt {
    /// Starts passt as `uid` and returns once it listens on its socket in `uid`'s directory.
    /// `dir` (the instance's) gets its messages (`passt.err`) and the resolver list it reads
    /// when the host network names resolvers.
    pub fn start(uid: &EgressUid, host: &HostNetwork, dir: &Path) -> Result<Passt, PasstError> {
        let socket = uid.dir().join(SOCKET);
        let pid_file = uid.dir().join(PID_FILE);
        let messages = dir.join("passt.err");
        let stderr = std::fs::File::create(&messages).map_err(|cause| PasstError::Messages {
            path: messages.clone(),
            cause,
        })?;
        let resolv = host
            .resolv_conf_in(dir)
            .map_err(PasstError::Resolvers)?
            .map(|path| CString::new(path.as_os_str().as_bytes()).expect("a path without NUL"));
        let mut cmd = Command::new(PASST);
        cmd.args(["--foreground", "--quiet", "--one-off", "--ipv4-only"])
            .arg("--socket")
            .arg(&socket)
            .arg("--pid")
            .arg(&pid_file)
            .args(["--address", &GUEST_ADDR.to_string()])
            .args(["--netmask", &PREFIX_LEN.to_string()])
            .args(["--gateway", &GATEWAY.to_string()])
            .args(["--dns-forward", &DNS.to_string()])
            .args(["--mtu", MTU, "-t", "none", "-u", "none", "--no-map-gw"])
            .args(["--runas", &format!("{0}:{0}", uid.uid())]);
        if let Some(resolv) = resolv {
            // SAFETY: between fork and exec the closure only makes the raw syscalls of
            // bind_resolv_conf on a C string made before the fork, and allocates nothing.
            unsafe {
                cmd.pre_exec(move || super::bind_resolv_conf(&resolv));
            }
        }
        cmd.env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().map_err(PasstError::Spawn)?;
        let mut passt = Passt {
            child: Some(child),
            socket,
        };
        let began = Instant::now();
        let mut pause = Duration::from_micros(200);
        loop {
            let written = std::fs::metadata(&pid_file).is_ok_and(|m| m.len() > 0);
            let child = passt.child.as_mut().expect("not stopped yet");
            let why = match child.try_wait() {
                Ok(Some(status)) => Some(format!("it exited: {status}")),
                Ok(None) if written && passt.socket.exists() => return Ok(passt),
                Ok(None) if written => Some(format!(
                    "it did not bind {} (its directory must be its uid's)",
                    passt.socket.display()
                )),
                Ok(None) if began.elapsed() > READY_TIMEOUT => {
                    Some(format!("not listening after {READY_TIMEOUT:?}"))
                }
                Ok(None) => None,
                Err(e) => Some(format!("cannot wait for it: {e}")),
            };
            if let Some(why) = why {
                passt.stop();
                let stderr = std::fs::read_to_string(&messages).unwrap_or_default();
                return Err(PasstError::NotReady {
                    why,
                    stderr: super::helper_messages(&stderr),
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// The socket `fnvm-vmm --net` connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills it and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs_here() -> bool {
        if nix::unistd::geteuid().is_root() && Command::new(PASST).arg("--version").output().is_ok()
        {
            return true;
        }
        eprintln!("skipped: needs root and passt");
        false
    }

    /// Whether the host has a default IPv4 route (passt needs one to pick its interface).
    fn default_route() -> bool {
        std::fs::read_to_string("/proc/net/route")
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
    }

    #[test]
    fn passt_listens_as_the_instances_uid_and_is_gone_when_stopped() {
        if !runs_here() || !default_route() {
            eprintln!("skipped: needs root, passt and a default route");
            return;
        }
        let uid = EgressUid::take().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut passt = Passt::start(&uid, &HostNetwork::default(), dir.path()).unwrap();
        let pid = passt.pid().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(line.contains(&uid.uid().to_string()), "{line}");
        assert!(passt.socket().starts_with(uid.dir()));
        // A client is served (and, --one-off, its hang-up ends passt).
        let client = std::os::unix::net::UnixStream::connect(passt.socket()).unwrap();
        drop(client);
        passt.stop();
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "passt is gone"
        );
    }

    /// An Ethernet frame from the guest: a UDP DNS query for example.com to 10.0.2.3:53.
    fn dns_query_frame() -> Vec<u8> {
        let query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07example\x03com\x00\x00\x01\x00\x01";
        let mut udp = Vec::new();
        udp.extend(40000u16.to_be_bytes());
        udp.extend(53u16.to_be_bytes());
        udp.extend(((8 + query.len()) as u16).to_be_bytes());
        udp.extend([0, 0]);
        udp.extend(query);
        let mut ip = vec![0x45, 0];
        ip.extend(((20 + udp.len()) as u16).to_be_bytes());
        ip.extend([0, 1, 0, 0, 64, 17, 0, 0]);
        ip.extend(GUEST_ADDR.octets());
        ip.extend(DNS.octets());
        let sum: u32 = ip
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let sum = (sum & 0xffff) + (sum >> 16);
        ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
        let mut frame = vec![0xff; 6];
        frame.extend([0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
        frame.extend(ip);
        frame.extend(udp);
        frame
    }

    #[test]
    fn the_guests_dns_queries_go_to_the_resolvers_fnvm_was_given() {
        if !runs_here() || !default_route() {
            eprintln!("skipped: needs root, passt, nft and a default route");
            return;
        }
        use std::io::Write as _;
        // A resolver of the host's own, on its loopback (as systemd-resolved's 127.0.0.53).
        let resolver: std::net::Ipv4Addr = "127.0.0.77".parse().unwrap();
        let server = std::net::UdpSocket::bind((resolver, 53)).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let uid = EgressUid::take().unwrap();
        let policy = crate::network::NetworkPolicy::default();
        crate::network::host_filter::install(uid.uid(), &policy, &[resolver.into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let host = HostNetwork {
            dns: vec![resolver.into()],
        };
        let mut passt = Passt::start(&uid, &host, dir.path()).unwrap();
        let mut guest = std::os::unix::net::UnixStream::connect(passt.socket()).unwrap();
        let frame = dns_query_frame();
        guest
            .write_all(&(frame.len() as u32).to_be_bytes())
            .unwrap();
        guest.write_all(&frame).unwrap();
        let mut buf = [0u8; 512];
        let got = server.recv_from(&mut buf);
        passt.stop();
        crate::network::host_filter::remove(uid.uid()).unwrap();
        let (n, from) = got.expect("passt forwards the query to the given resolver");
        assert!(
            buf[..n].windows(7).any(|w| w == b"example"),
            "{:?}",
            &buf[..n]
        );
        assert!(from.ip().is_loopback(), "{from}");
        // The host's own resolv.conf is untouched by passt's private copy.
        let hosts = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        assert!(!hosts.contains("127.0.0.77"), "{hosts}");
    }

    #[test]
    fn a_passt_that_cannot_start_says_why() {
        if !runs_here() {
            return;
        }
        let uid = EgressUid::take().unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Its directory taken away: it cannot bind.
        std::fs::remove_dir(uid.dir()).unwrap();
        let err = Passt::start(&uid, &HostNetwork::default(), dir.path()).unwrap_err();
        assert!(
            err.to_string().starts_with("passt did not start ("),
            "{err}"
        );
    }
}
