//! A VM's network policy, enforced on the host: the guest kernel is the function's to command,
//! so no rule inside it counts. A VM's traffic leaves through its passt, which makes ordinary
//! sockets on the host as the instance's own uid ([`super::uid`]); one host table sorts every
//! such socket's packets by that uid:
//!
//! ```text
//! table inet fnvm_egress {
//!   map egress { type uid : verdict; }              # <uid> : goto i<uid>, one per instance
//!   chain output { type filter hook output priority filter; policy accept;
//!     meta skuid vmap @egress                       # an instance's uid: its chain decides
//!     meta skuid 0x2f000000-0x2f00ffff goto refuse  # a range uid without a chain: nothing
//!   }
//!   chain refuse { meta l4proto tcp reject with tcp reset; reject }
//!   chain i<uid> { <resolvers> port 53 accept; fib daddr type local goto refuse;
//!                  <never reachable> goto refuse; <deny> goto refuse; [<allow> accept; goto refuse] }
//! }
//! ```
//!
//! The resolvers come first because passt forwards the guest's DNS (10.0.2.3) to the host's
//! resolvers, which may be on the host's own loopback (127.0.0.53). `fib daddr type local`
//! refuses every address of the host, whatever it has now, loopback included. The rest is the
//! process sandbox's list ([`super::filter`]): link-local and metadata addresses, loopback, the
//! user-mode stack's own gateway and DNS addresses, then the function's deny and allow ranges.
//! A refused connection gets a TCP reset (ICMP port unreachable otherwise) from the host
//! kernel, so passt's connect fails at once. The guest does not see `ECONNREFUSED` though:
//! this passt (0.0~git20230309) answers its SYN with a RST without ACK, which a Linux guest in
//! SYN-SENT drops (RFC 793), so its connect times out. Nothing gets through either way.
//!
//! Other processes (uids outside the range) are not touched. The table and its two fixed
//! chains are declared idempotently by every install (the fixed chains are flushed and
//! refilled in the same transaction, so other instances' chains and elements stay); an
//! instance's chain and element go in with them, atomically, and are removed at its stop,
//! element first. The table itself stays on the host, empty but for the fixed chains, when the
//! last instance is gone: removing it could race with another fnvm's install.

use std::net::IpAddr;
use std::process::Command;

use ipnet::IpNet;

use super::filter::destination_rules;
use super::policy::{never_reachable, NetworkPolicy};
use super::uid::{self, UID_BASE, UID_SLOTS};
use super::{HostNetwork, NetworkError, DNS, GATEWAY, NFT};

/// The host table fnvm owns.
pub const TABLE: &str = "fnvm_egress";

/// The name of the chain of instance uid `uid`.
pub fn chain_name(uid: u32) -> String {
    format!("i{uid}")
}

/// The table and its fixed chains, declared so that loading them again changes nothing else
/// (`nft -f` input).
pub fn table_declaration() -> String {
    let last = UID_BASE + UID_SLOTS - 1;
    format!(
        "table inet {TABLE} {{\n  map egress {{ type uid : verdict; }}\n  chain refuse {{ }}\n  \
         chain output {{ type filter hook output priority filter; policy accept; }}\n}}\n\
         flush chain inet {TABLE} refuse\nflush chain inet {TABLE} output\n\
         table inet {TABLE} {{\n  chain refuse {{\n    meta l4proto tcp reject with tcp reset\n    \
         reject\n  }}\n  chain output {{\n    meta skuid vmap @egress\n    \
         meta skuid {UID_BASE}-{last} goto refuse\n  }}\n}}\n"
    )
}

/// The chain of instance uid `uid` for `policy`, with `resolvers` the addresses passt forwards
/// DNS to (`nft -f` input: it replaces a chain of that name, e.g. a crashed fnvm's).
pub fn host_chain(uid: u32, policy: &NetworkPolicy, resolvers: &[IpAddr]) -> String {
    let chain = chain_name(uid);
    let mut rules = Vec::new();
    for (family, v4) in [("ip", true), ("ip6", false)] {
        let set: Vec<String> = resolvers
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .map(ToString::to_string)
            .collect();
        if !set.is_empty() {
            rules.push(format!(
                "{family} daddr {{ {} }} meta l4proto {{ tcp, udp }} th dport 53 accept",
                set.join(", ")
            ));
        }
    }
    rules.push("fib daddr type local goto refuse".to_string());
    let mut refused: Vec<IpNet> = never_reachable().map(|(net, _)| net).collect();
    refused.extend([
        IpNet::from(IpAddr::V4(GATEWAY)),
        IpNet::from(IpAddr::V4(DNS)),
    ]);
    rules.extend(destination_rules(&refused, "goto refuse"));
    rules.extend(destination_rules(&policy.deny, "goto refuse"));
    if !policy.allow.is_empty() {
        rules.extend(destination_rules(&policy.allow, "accept"));
        rules.push("goto refuse".to_string());
    }
    let mut text = format!(
        "add chain inet {TABLE} {chain}\nflush chain inet {TABLE} {chain}\n\
         table inet {TABLE} {{\n  chain {chain} {{\n"
    );
    for rule in rules {
        text.push_str(&format!("    {rule}\n"));
    }
    text.push_str("  }\n}\n");
    text.push_str(&format!(
        "add element inet {TABLE} egress {{ {uid} : goto {chain} }}\n"
    ));
    text
}

/// The resolvers passt forwards DNS to: the host network's, else the nameservers of the
/// host's `/etc/resolv.conf` (what passt reads itself).
pub fn resolvers(host: &HostNetwork) -> Vec<IpAddr> {
    if !host.dns.is_empty() {
        return host.dns.clone();
    }
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse().ok())
        })
        .collect()
}

/// Puts instance uid `uid`'s rules in force (with the table, if it is not there yet), in one
/// transaction.
pub fn install(uid: u32, policy: &NetworkPolicy, resolvers: &[IpAddr]) -> Result<(), NetworkError> {
    let text = table_declaration() + &host_chain(uid, policy, resolvers);
    load(&text)?;
    tracing::debug!(uid, "egress rules installed in table inet {TABLE}");
    Ok(())
}

/// Removes instance uid `uid`'s element and chain (whichever exist), element first; passt must
/// be gone by then (the range rule would refuse it anyway).
pub fn remove(uid: u32) -> Result<(), NetworkError> {
    let (elements, chains) = installed()?;
    let mut text = String::new();
    if elements.contains(&uid) {
        text.push_str(&format!("delete element inet {TABLE} egress {{ {uid} }}\n"));
    }
    if chains.contains(&uid) {
        text.push_str(&format!("delete chain inet {TABLE} {}\n", chain_name(uid)));
    }
    if !text.is_empty() {
        load(&text)?;
    }
    Ok(())
}

/// The uids with a map element and those with a chain in the table now (both empty without the
/// table).
pub fn installed() -> Result<(Vec<u32>, Vec<u32>), NetworkError> {
    let out = Command::new(NFT)
        .args(["list", "table", "inet", TABLE])
        .output()
        .map_err(|cause| NetworkError::Spawn {
            program: NFT,
            cause,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok((Vec::new(), Vec::new()));
        }
        return Err(NetworkError::Rules {
            status: out.status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    Ok(parse_listing(&String::from_utf8_lossy(&out.stdout)))
}

/// `nft list table` text → (uids with an element, uids with a chain).
fn parse_listing(text: &str) -> (Vec<u32>, Vec<u32>) {
    let mut elements = Vec::new();
    let mut chains = Vec::new();
    for (i, _) in text.match_indices(": goto i") {
        let before = text[..i].trim_end();
        let digits: String = before
            .chars()
            .rev()
            .take_while(char::is_ascii_digit)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        if let Ok(uid) = digits.parse() {
            elements.push(uid);
        }
    }
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line
            .strip_prefix("chain i")
            .and_then(|r| r.strip_suffix(" {"))
        {
            if let Ok(uid) = name.parse() {
                chains.push(uid);
            }
        }
    }
    (elements, chains)
}

/// Removes what crashed fnvm processes left of their VMs' egress: every slot whose lock is
/// free but that still has rules or a directory is claimed, the processes still running as its
/// uid (a passt whose VMM outlived fnvm) are killed, then its element, chain and directory go.
/// Held slots (live instances of any fnvm on this host) are left alone. Returns how many
/// slots were cleared.
pub fn remove_stale() -> Result<usize, NetworkError> {
    if !std::path::Path::new(uid::LOCK_DIR).is_dir() {
        // No VM had egress since the host booted (rules do not survive a reboot either).
        return Ok(0);
    }
    let (elements, chains) = installed()?;
    let mut slots: Vec<u32> = elements
        .iter()
        .chain(&chains)
        .filter_map(|u| uid::slot_of(*u))
        .chain(uid::slots_on_disk())
        .collect();
    slots.sort_unstable();
    slots.dedup();
    let mut cleared = 0;
    for n in slots {
        let lock = match uid::claim_if_free(n) {
            Ok(Some(lock)) => lock,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!("cannot check egress uid slot {n}: {e}");
                continue;
            }
        };
        let id = UID_BASE + n;
        kill_processes_of(id);
        let result = remove(id);
        uid::release_claimed(n, lock);
        result?;
        cleared += 1;
    }
    Ok(cleared)
}

/// SIGKILLs every process whose real uid is `uid` and waits (up to 5 s) until none is left.
fn kill_processes_of(uid: u32) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = processes_of(uid);
        if pids.is_empty() || std::time::Instant::now() > deadline {
            return;
        }
        for pid in pids {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The live (not zombie) processes whose real uid is `uid`.
pub fn processes_of(uid: u32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or("")
                .to_string()
        };
        let zombie = field("State:").starts_with('Z');
        let real = field("Uid:").split_whitespace().next().map(str::to_string);
        if !zombie && real.as_deref() == Some(uid.to_string().as_str()) {
            found.push(pid);
        }
    }
    found
}

/// Loads `text` with `nft -f -` in this process's network namespace (the host's).
fn load(text: &str) -> Result<(), NetworkError> {
    let own =
        std::fs::File::open("/proc/self/ns/net").map_err(|cause| NetworkError::Namespace {
            path: "/proc/self/ns/net".into(),
            cause,
        })?;
    super::filter::load_in(std::os::fd::AsFd::as_fd(&own), text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::tests::policy;

    #[test]
    fn the_chain_lets_dns_through_then_refuses_the_host_metadata_and_denied_ranges() {
        let resolvers: Vec<IpAddr> = vec!["127.0.0.53".parse().unwrap(), "::1".parse().unwrap()];
        let text = host_chain(
            UID_BASE + 7,
            &policy(&["10.1.0.0/16"], &["10.0.0.0/8"]),
            &resolvers,
        );
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle}:\n{text}"))
        };
        let dns = at("ip daddr { 127.0.0.53 } meta l4proto { tcp, udp } th dport 53 accept");
        at("ip6 daddr { ::1 } meta l4proto { tcp, udp } th dport 53 accept");
        let local = at("fib daddr type local goto refuse");
        let never = at("ip daddr { 10.0.2.2/31, 127.0.0.0/8, 169.254.0.0/16 } goto refuse");
        let deny = at("ip daddr { 10.1.0.0/16 } goto refuse");
        let allow = at("ip daddr { 10.0.0.0/8 } accept\n    goto refuse\n");
        assert!(
            dns < local && local < never && never < deny && deny < allow,
            "{text}"
        );
        assert!(text.contains("chain i788529159 {"), "{text}");
        assert!(
            text.ends_with("add element inet fnvm_egress egress { 788529159 : goto i788529159 }\n"),
            "{text}"
        );
    }

    #[test]
    fn without_an_allow_list_the_rest_is_accepted() {
        let text = host_chain(UID_BASE, &NetworkPolicy::default(), &[]);
        assert!(!text.contains("accept\n    goto refuse"), "{text}");
        assert!(
            !text.contains("dport 53"),
            "no resolvers, no DNS rule: {text}"
        );
    }

    #[test]
    fn a_listing_names_the_instances_with_elements_and_chains() {
        let listing = "table inet fnvm_egress {\n\tmap egress {\n\t\ttype uid : verdict\n\t\t\
            elements = { 788529153 : goto i788529153,\n\t\t\t     788529160 : goto i788529160 }\n\
            \t}\n\tchain refuse {\n\t}\n\tchain i788529153 {\n\t\tfib daddr type local goto refuse\n\
            \t}\n\tchain i42 {\n\t}\n}\n";
        let (elements, chains) = parse_listing(listing);
        assert_eq!(elements, vec![788529153, 788529160]);
        assert_eq!(chains, vec![788529153, 42]);
    }

    fn nft_runs_here() -> bool {
        if nix::unistd::geteuid().is_root() && Command::new(NFT).arg("--version").output().is_ok() {
            return true;
        }
        eprintln!("skipped: needs root and nft");
        false
    }

    /// Connects to `addr` as `uid`: "ok", "refused" or another error's text, and how long.
    fn connect_as(uid: u32, addr: &str) -> (String, std::time::Duration) {
        let script = format!(
            "import socket\ntry:\n socket.create_connection(({:?}, {}), timeout=3)\n print('ok')\n\
             except ConnectionRefusedError:\n print('refused')\nexcept Exception as e:\n print(e)",
            addr.rsplit_once(':').unwrap().0,
            addr.rsplit_once(':').unwrap().1
        );
        let began = std::time::Instant::now();
        let out = std::os::unix::process::CommandExt::gid(
            std::os::unix::process::CommandExt::uid(&mut Command::new("/usr/bin/python3"), uid),
            uid,
        )
        .args(["-c", &script])
        .output()
        .expect("python3");
        (
            String::from_utf8_lossy(&out.stdout).trim().to_string()
                + String::from_utf8_lossy(&out.stderr).trim(),
            began.elapsed(),
        )
    }

    #[test]
    fn an_instances_uid_is_refused_the_host_and_its_denied_ranges_and_its_rules_go_at_once() {
        if !nft_runs_here() {
            return;
        }
        let slot = crate::network::uid::EgressUid::take().unwrap();
        let id = slot.uid();
        // A server of the host's, on its loopback: root reaches it, the instance's uid not.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        install(id, &policy(&["192.0.2.0/24"], &[]), &[]).unwrap();
        for addr in [
            format!("127.0.0.1:{port}"),
            "169.254.169.254:80".to_string(),
            "192.0.2.1:80".to_string(),
        ] {
            let (outcome, took) = connect_as(id, &addr);
            assert_eq!(outcome, "refused", "{addr}");
            assert!(took < std::time::Duration::from_secs(2), "{addr}: {took:?}");
        }
        let (elements, chains) = installed().unwrap();
        assert!(elements.contains(&id) && chains.contains(&id));
        // Installing again (a crashed holder's leftovers) replaces the chain, not adds to it.
        install(id, &NetworkPolicy::default(), &[]).unwrap();
        let listing = Command::new(NFT)
            .args(["list", "chain", "inet", TABLE, &chain_name(id)])
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert_eq!(
            listing.matches("fib daddr type local").count(),
            1,
            "{listing}"
        );
        assert!(!listing.contains("192.0.2.0/24"), "{listing}");
        remove(id).unwrap();
        let (elements, chains) = installed().unwrap();
        assert!(!elements.contains(&id) && !chains.contains(&id));
        // Without its chain, a uid of the range reaches nothing at all.
        let (outcome, _) = connect_as(id, &format!("127.0.0.1:{port}"));
        assert_eq!(outcome, "refused");
        assert_eq!(connect_as(0, &format!("127.0.0.1:{port}")).0, "ok");
    }

    #[test]
    fn a_crashed_holders_rules_and_processes_are_removed_and_live_ones_kept() {
        if !nft_runs_here() {
            return;
        }
        let live = crate::network::uid::EgressUid::take().unwrap();
        install(live.uid(), &NetworkPolicy::default(), &[]).unwrap();
        let crashed = crate::network::uid::EgressUid::take().unwrap();
        let id = crashed.uid();
        install(id, &NetworkPolicy::default(), &[]).unwrap();
        let mut stray = std::os::unix::process::CommandExt::uid(&mut Command::new("sleep"), id)
            .arg("60")
            .spawn()
            .unwrap();
        // Its holder gone without a word: the slot's lock is free, its rules are not.
        drop(crashed);
        assert!(remove_stale().unwrap() >= 1);
        let (elements, chains) = installed().unwrap();
        assert!(!elements.contains(&id) && !chains.contains(&id));
        assert!(elements.contains(&live.uid()) && chains.contains(&live.uid()));
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(stray.wait().unwrap().signal(), Some(libc::SIGKILL));
        remove(live.uid()).unwrap();
    }

    #[test]
    fn resolvers_are_the_host_networks_when_given() {
        let host = HostNetwork {
            dns: vec!["192.0.2.53".parse().unwrap()],
        };
        assert_eq!(resolvers(&host), host.dns);
    }
}
