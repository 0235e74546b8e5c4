//! A function's network policy: `none` (loopback only) or `egress` through the host, minus the
//! destinations it may not reach. Pure data and rules; [`super::filter`] turns a policy into
//! nftables rules.
//!
//! A destination is reachable when it is in no denied range and, if the function names allowed
//! ranges, in one of them. Deny wins over allow, so a policy reads the same in any order. Some
//! ranges are never reachable whatever the flags ([`NEVER_REACHABLE`], plus the host's own
//! addresses): naming one of them in `--egress-allow` is an error, not a silent no-op.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The most ranges a function may deny or allow (each side), so its rules stay small.
pub const MAX_RANGES: usize = 64;

/// Ranges no function reaches, whatever its flags: link-local addresses, which is where cloud
/// metadata services answer (169.254.169.254), and the host's loopback.
pub const NEVER_REACHABLE: &[(&str, &str)] = &[
    ("169.254.0.0/16", "link-local and cloud metadata addresses"),
    ("fe80::/10", "IPv6 link-local addresses"),
    ("127.0.0.0/8", "the host's loopback"),
    ("::1/128", "the host's loopback"),
];

/// Whether a function has a network beyond loopback.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Loopback only.
    None,
    /// Outbound connections through the host, as the policy allows.
    #[default]
    Egress,
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NetworkMode::None => "none",
            NetworkMode::Egress => "egress",
        })
    }
}

impl std::str::FromStr for NetworkMode {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        match s {
            "none" => Ok(NetworkMode::None),
            "egress" => Ok(NetworkMode::Egress),
            other => Err(PolicyError::BadMode(other.to_string())),
        }
    }
}

/// A function's network, as deployed: checked by [`NetworkPolicy::new`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub mode: NetworkMode,
    /// Never reachable (deny wins over allow).
    pub deny: Vec<IpNet>,
    /// When not empty, only these ranges are reachable.
    pub allow: Vec<IpNet>,
}

/// Why a network policy is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The mode is neither `none` nor `egress`.
    #[error("network {0:?}: use none or egress")]
    BadMode(String),
    /// A range does not parse.
    #[error("{flag} {text:?}: not an address or a CIDR range (e.g. 10.0.0.0/8, 2001:db8::/32)")]
    BadRange { flag: &'static str, text: String },
    /// A range has bits set past its prefix, which usually means a typo.
    #[error("{flag} {text}: bits are set past the /{prefix} prefix; did you mean {suggestion}?")]
    HostBits {
        flag: &'static str,
        text: String,
        prefix: u8,
        suggestion: IpNet,
    },
    /// Egress ranges were given to a function without egress.
    #[error(
        "--egress-deny and --egress-allow need --network egress (this function has --network none)"
    )]
    RangesWithoutEgress,
    /// An allowed range lies in one that no function reaches.
    #[error("--egress-allow {range}: it lies in {never} ({why}), which functions never reach")]
    AllowNeverReachable {
        range: IpNet,
        never: IpNet,
        why: &'static str,
    },
    /// Too many ranges.
    #[error("{flag}: {count} ranges; at most {MAX_RANGES} are allowed")]
    TooMany { flag: &'static str, count: usize },
}

impl NetworkPolicy {
    /// Loopback only.
    pub fn none() -> Self {
        NetworkPolicy {
            mode: NetworkMode::None,
            ..Default::default()
        }
    }

    /// A checked policy from the flags' text (`--network`, `--egress-deny`, `--egress-allow`).
    pub fn new(mode: NetworkMode, deny: &[String], allow: &[String]) -> Result<Self, PolicyError> {
        let deny = parse_ranges("--egress-deny", deny)?;
        let allow = parse_ranges("--egress-allow", allow)?;
        NetworkPolicy { mode, deny, allow }.checked()
    }

    /// This policy if it holds together (a stored or API-given one is checked again).
    pub fn checked(self) -> Result<Self, PolicyError> {
        if self.mode == NetworkMode::None && !(self.deny.is_empty() && self.allow.is_empty()) {
            return Err(PolicyError::RangesWithoutEgress);
        }
        for (flag, list) in [
            ("--egress-deny", &self.deny),
            ("--egress-allow", &self.allow),
        ] {
            if list.len() > MAX_RANGES {
                return Err(PolicyError::TooMany {
                    flag,
                    count: list.len(),
                });
            }
        }
        for range in &self.allow {
            if let Some((never, why)) = never_reachable().find(|(n, _)| n.contains(range)) {
                return Err(PolicyError::AllowNeverReachable {
                    range: *range,
                    never,
                    why,
                });
            }
        }
        Ok(self)
    }

    pub fn has_egress(&self) -> bool {
        self.mode == NetworkMode::Egress
    }

    /// Whether `addr` is reachable under this policy, leaving aside the host's own addresses
    /// (which the filter adds where it runs): what the rules enforce, for tests and messages.
    pub fn reaches(&self, addr: IpAddr) -> bool {
        self.has_egress()
            && !never_reachable().any(|(n, _)| n.contains(&addr))
            && !self.deny.iter().any(|n| n.contains(&addr))
            && (self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&addr)))
    }
}

/// [`NEVER_REACHABLE`], parsed.
pub fn never_reachable() -> impl Iterator<Item = (IpNet, &'static str)> {
    NEVER_REACHABLE
        .iter()
        .map(|(net, why)| (net.parse().expect("a valid built-in range"), *why))
}

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128).
fn parse_ranges(flag: &'static str, texts: &[String]) -> Result<Vec<IpNet>, PolicyError> {
    texts
        .iter()
        .map(|text| {
            let text = text.trim();
            let net =
                match text.parse::<IpNet>() {
                    Ok(net) => net,
                    Err(_) => text.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
                        PolicyError::BadRange {
                            flag,
                            text: text.to_string(),
                        }
                    })?,
                };
            if net.trunc() != net {
                return Err(PolicyError::HostBits {
                    flag,
                    text: text.to_string(),
                    prefix: net.prefix_len(),
                    suggestion: net.trunc(),
                });
            }
            Ok(net)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn policy(deny: &[&str], allow: &[&str]) -> NetworkPolicy {
        NetworkPolicy::new(NetworkMode::Egress, &strings(deny), &strings(allow)).unwrap()
    }

    #[test]
    fn by_default_a_function_reaches_everything_but_link_local_and_loopback() {
        let p = NetworkPolicy::default();
        assert!(
            p.reaches("10.1.2.3".parse().unwrap()),
            "private ranges are allowed"
        );
        assert!(p.reaches("192.168.0.10".parse().unwrap()));
        assert!(p.reaches("8.8.8.8".parse().unwrap()));
        assert!(p.reaches("2001:db8::1".parse().unwrap()));
        for never in ["169.254.169.254", "127.0.0.1", "::1", "fe80::1"] {
            assert!(!p.reaches(never.parse().unwrap()), "{never}");
        }
        assert!(!NetworkPolicy::none().reaches("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn deny_wins_over_allow_and_allow_limits_the_rest() {
        let p = policy(&["10.1.0.0/16"], &["10.0.0.0/8"]);
        assert!(p.reaches("10.2.0.1".parse().unwrap()));
        assert!(
            !p.reaches("10.1.0.1".parse().unwrap()),
            "denied inside allowed"
        );
        assert!(!p.reaches("8.8.8.8".parse().unwrap()), "not allowed");
        let p = policy(&["10.0.0.0/8", "192.0.2.7"], &[]);
        assert!(!p.reaches("10.9.9.9".parse().unwrap()));
        assert!(
            !p.reaches("192.0.2.7".parse().unwrap()),
            "a bare address is a /32"
        );
        assert!(p.reaches("192.0.2.8".parse().unwrap()));
    }

    #[test]
    fn bad_ranges_are_refused_naming_the_flag_and_the_text() {
        let err =
            NetworkPolicy::new(NetworkMode::Egress, &strings(&["10.0.0/8"]), &[]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--egress-deny \"10.0.0/8\": not an address or a CIDR range (e.g. 10.0.0.0/8, 2001:db8::/32)"
        );
        let err =
            NetworkPolicy::new(NetworkMode::Egress, &[], &strings(&["10.1.2.3/8"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--egress-allow 10.1.2.3/8: bits are set past the /8 prefix; did you mean 10.0.0.0/8?"
        );
        let err =
            NetworkPolicy::new(NetworkMode::None, &strings(&["10.0.0.0/8"]), &[]).unwrap_err();
        assert_eq!(err, PolicyError::RangesWithoutEgress);
        let many: Vec<String> = (0..=MAX_RANGES).map(|i| format!("10.0.{i}.0/24")).collect();
        let err = NetworkPolicy::new(NetworkMode::Egress, &many, &[]).unwrap_err();
        assert!(err.to_string().contains("65 ranges; at most 64"), "{err}");
        assert_eq!(
            "bridge".parse::<NetworkMode>().unwrap_err().to_string(),
            "network \"bridge\": use none or egress"
        );
    }

    #[test]
    fn allowing_a_never_reachable_range_is_an_error_not_a_hole() {
        let err = NetworkPolicy::new(NetworkMode::Egress, &[], &strings(&["169.254.169.254"]))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--egress-allow 169.254.169.254/32: it lies in 169.254.0.0/16 (link-local and cloud \
             metadata addresses), which functions never reach"
        );
        // A wider range that contains one is fine: the never-reachable part stays unreachable.
        let p = policy(&[], &["0.0.0.0/0"]);
        assert!(!p.reaches("169.254.169.254".parse().unwrap()));
        assert!(p.reaches("1.1.1.1".parse().unwrap()));
    }

    #[test]
    fn a_policy_round_trips_through_json() {
        let p = policy(&["10.1.0.0/16"], &["10.0.0.0/8", "2001:db8::/32"]);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"mode":"egress","deny":["10.1.0.0/16"],"allow":["10.0.0.0/8","2001:db8::/32"]}"#
        );
        assert_eq!(serde_json::from_str::<NetworkPolicy>(&json).unwrap(), p);
    }
}
