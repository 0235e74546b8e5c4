//! A network policy as nftables rules, and loading them where they are enforced.
//!
//! A process sandbox's rules live in its own network namespace, on the output hook, so they go
//! with the namespace and nothing is left on the host. Its function has no `CAP_NET_ADMIN` to
//! change them and no `CAP_NET_RAW` to write frames past them (see `docs/design.md`,
//! "Network"). A denied connection is refused at once (TCP reset, ICMP port unreachable for the
//! rest), so the function sees `ECONNREFUSED`, not a timeout.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};

use ipnet::IpNet;

use super::policy::{never_reachable, NetworkPolicy};
use super::{NetworkError, DNS, GATEWAY, NFT};

/// The nftables table fnvm owns in a sandbox's network namespace.
pub const TABLE: &str = "fnvm";

/// The ruleset of a fresh process-sandbox network namespace (`nft -f` input, one atomic
/// transaction). `host` are the host's own addresses: reachable through the user-mode network
/// stack like any destination, so refused here.
///
/// What no function reaches is in chain `output`, the function's own ranges in chain `ranges`,
/// which it jumps to. A standby gets the default policy (an empty `ranges`) before its
/// function is known; placing a function with ranges of its own then only adds rules
/// ([`policy_additions`]): about 3 ms, where replacing or flushing rules in a namespace costs
/// ~15 ms more (the kernel waits for an RCU grace period before freeing them).
pub fn namespace_ruleset(policy: &NetworkPolicy, host: &[IpAddr]) -> String {
    let mut refused: Vec<IpNet> = never_reachable().map(|(net, _)| net).collect();
    refused.extend(host.iter().copied().map(IpNet::from));
    // The gateway is the user-mode stack itself; only its DNS forwarder answers there.
    refused.extend([
        IpNet::from(IpAddr::V4(GATEWAY)),
        IpNet::from(IpAddr::V4(DNS)),
    ]);

    let mut rules = vec![
        "type filter hook output priority filter; policy accept;".to_string(),
        // The function's own server and the agent's bridge meet on loopback.
        "oifname \"lo\" accept".to_string(),
        format!("ip daddr {DNS} udp dport 53 accept"),
    ];
    rules.extend(destination_rules(&refused, "goto refuse"));
    rules.push("jump ranges".to_string());
    let mut text = format!("table inet {TABLE} {{\n  chain output {{\n");
    for rule in rules {
        text.push_str(&format!("    {rule}\n"));
    }
    text.push_str("  }\n  chain ranges {\n");
    for rule in policy_rules(policy) {
        text.push_str(&format!("    {rule}\n"));
    }
    text.push_str("  }\n  chain refuse {\n");
    text.push_str("    meta l4proto tcp reject with tcp reset\n    reject\n  }\n}\n");
    text
}

/// `nft -f` input that replaces a namespace's table with one for `policy` (the slow way, see
/// [`namespace_ruleset`]).
pub fn replacement_ruleset(policy: &NetworkPolicy, host: &[IpAddr]) -> String {
    format!(
        "delete table inet {TABLE}\n{}",
        namespace_ruleset(policy, host)
    )
}

/// `nft -f` input that adds `policy`'s rules to a namespace loaded with the default policy.
pub fn policy_additions(policy: &NetworkPolicy) -> String {
    policy_rules(policy)
        .into_iter()
        .map(|rule| format!("add rule inet {TABLE} ranges {rule}\n"))
        .collect()
}

/// The function's own ranges: denied ones refused, then, with an allow-list, only those.
fn policy_rules(policy: &NetworkPolicy) -> Vec<String> {
    let mut rules = destination_rules(&policy.deny, "goto refuse");
    if !policy.allow.is_empty() {
        rules.extend(destination_rules(&policy.allow, "accept"));
        rules.push("goto refuse".to_string());
    }
    rules
}

/// `ip daddr { … } VERDICT` and `ip6 daddr { … } VERDICT` for the ranges (merged, because an
/// nftables set refuses overlapping intervals), or nothing for a family without any.
pub(super) fn destination_rules(ranges: &[IpNet], verdict: &str) -> Vec<String> {
    let merged = IpNet::aggregate(&ranges.to_vec());
    let mut rules = Vec::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        let set: Vec<String> = merged
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == v4)
            .map(|n| match n.prefix_len() == n.max_prefix_len() {
                true => n.addr().to_string(),
                false => n.to_string(),
            })
            .collect();
        if !set.is_empty() {
            rules.push(format!("{family} daddr {{ {} }} {verdict}", set.join(", ")));
        }
    }
    rules
}

/// The host's own addresses (this process's network namespace), which a function must not
/// reach through the user-mode stack: its services listen on them.
pub fn host_addresses() -> Result<Vec<IpAddr>, NetworkError> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| NetworkError::HostAddresses(e.into()))?;
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|s| {
            if let Some(v4) = s.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Loads `ruleset` with `nft -f -` inside the network namespace `netns`.
pub fn load_in(netns: BorrowedFd<'_>, ruleset: &str) -> Result<(), NetworkError> {
    Loading::start(netns, ruleset)?.wait()
}

/// An `nft -f -` under way (see [`load_in`]); killed if dropped unwaited.
pub struct Loading {
    child: Option<std::process::Child>,
    written: std::io::Result<()>,
}

impl Loading {
    /// Starts loading `ruleset` in `netns`; [`Self::wait`] says whether it took.
    pub fn start(netns: BorrowedFd<'_>, ruleset: &str) -> Result<Loading, NetworkError> {
        let fd = netns.as_raw_fd();
        let mut cmd = Command::new(NFT);
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec the closure makes one raw syscall on a descriptor that
        // stays open in this process for the whole call, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| NetworkError::Spawn {
            program: NFT,
            cause: e,
        })?;
        // A ruleset is a few hundred bytes: it fits the pipe, so this does not wait for nft.
        let written = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(ruleset.as_bytes());
        Ok(Loading {
            child: Some(child),
            written,
        })
    }

    /// Waits for nft: Ok once the rules are in force.
    pub fn wait(mut self) -> Result<(), NetworkError> {
        let child = self.child.take().expect("waited once");
        let out = child.wait_with_output().map_err(|e| NetworkError::Spawn {
            program: NFT,
            cause: e,
        })?;
        if !out.status.success() || self.written.is_err() {
            return Err(NetworkError::Rules {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

impl Drop for Loading {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::tests::policy;

    #[test]
    fn the_default_ruleset_refuses_link_local_loopback_the_gateway_and_the_host() {
        let host: Vec<IpAddr> = vec!["192.0.2.2".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let text = namespace_ruleset(&NetworkPolicy::default(), &host);
        assert!(
            text.contains(
                "ip daddr { 10.0.2.2/31, 127.0.0.0/8, 169.254.0.0/16, 192.0.2.2 } goto refuse"
            ),
            "{text}"
        );
        assert!(
            text.contains("ip6 daddr { ::1, fe80::/10 } goto refuse"),
            "{text}"
        );
        assert!(
            text.contains("ip daddr 10.0.2.3 udp dport 53 accept"),
            "{text}"
        );
        assert!(
            !text.contains("accept\n    goto refuse"),
            "no allow-list: {text}"
        );
    }

    #[test]
    fn deny_comes_before_allow_and_an_allow_list_refuses_the_rest() {
        let text = namespace_ruleset(&policy(&["10.1.0.0/16"], &["10.0.0.0/8"]), &[]);
        let deny = text
            .find("ip daddr { 10.1.0.0/16 } goto refuse")
            .expect(&text);
        let allow = text.find("ip daddr { 10.0.0.0/8 } accept").expect(&text);
        assert!(deny < allow, "{text}");
        assert!(text.contains("accept\n    goto refuse\n  }"), "{text}");
    }

    #[test]
    fn nft_accepts_the_rulesets_in_a_scratch_namespace() {
        if !nix::unistd::geteuid().is_root() || Command::new(NFT).arg("--version").output().is_err()
        {
            eprintln!("skipped: needs root and nft");
            return;
        }
        let custom = policy(
            &["10.1.0.0/16", "10.1.2.0/24", "2001:db8::/32"],
            &["10.0.0.0/8", "0.0.0.0/0"],
        );
        let host = host_addresses().unwrap();
        let listed = |ns: &crate::network::tests::ScratchNetns| {
            let out = Command::new("nsenter")
                .args([
                    "-t",
                    &ns.pid().to_string(),
                    "-n",
                    NFT,
                    "list",
                    "chain",
                    "inet",
                    TABLE,
                ])
                .arg("ranges")
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        // A function's own ranges, loaded at once or added to a standby's default.
        let at_once = crate::network::tests::ScratchNetns::new();
        let text = namespace_ruleset(&custom, &host);
        load_in(at_once.fd(), &text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let ns = crate::network::tests::ScratchNetns::new();
        load_in(
            ns.fd(),
            &namespace_ruleset(&NetworkPolicy::default(), &host),
        )
        .unwrap();
        load_in(ns.fd(), &policy_additions(&custom)).unwrap();
        assert_eq!(listed(&ns), listed(&at_once));
        assert!(
            listed(&ns).contains("ip daddr 10.1.0.0/16 goto refuse"),
            "{}",
            listed(&ns)
        );
        // Replaced whole, the table holds one policy, not two.
        load_in(
            ns.fd(),
            &replacement_ruleset(&policy(&["192.0.2.0/24"], &[]), &host),
        )
        .unwrap();
        assert!(!listed(&ns).contains("10.1.0.0/16"), "{}", listed(&ns));
        assert!(listed(&ns).contains("192.0.2.0/24"), "{}", listed(&ns));
        let err = load_in(ns.fd(), "table inet fnvm { chain c { nonsense } }").unwrap_err();
        assert!(err.to_string().contains("nft refused the rules"), "{err}");
    }
}
