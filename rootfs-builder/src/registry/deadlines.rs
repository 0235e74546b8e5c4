//! How long a registry may take: to accept a connection, to answer (each read), and for the
//! whole pull. A registry that accepts and then says nothing must fail the pull in bounded
//! time with a message naming it and the deadline, not leave a deploy pending forever.
//!
//! Each deadline has an environment override (whole seconds), read when a client is made, so
//! every entry point (`fnvm run`, `fnvm image pull`, `fnvm serve`'s deploys) honours it.

use std::time::Duration;

/// The environment variables that override [`RegistryDeadlines`], in seconds.
pub const CONNECT_ENV: &str = "FNVM_REGISTRY_CONNECT_TIMEOUT_S";
pub const READ_ENV: &str = "FNVM_REGISTRY_READ_TIMEOUT_S";
pub const PULL_ENV: &str = "FNVM_REGISTRY_PULL_TIMEOUT_S";

/// The longest deadline accepted from the environment (a day): anything longer is a typo.
const MAX_SECONDS: u64 = 86_400;

/// Which deadline ran out; names the limit and its override in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadlineKind {
    /// Connection set-up (DNS, TCP, TLS).
    Connect,
    /// Waiting for the response headers, or for any single read of a body.
    Read,
    /// The whole pull: every request, retry and blob together.
    Pull,
}

impl DeadlineKind {
    pub fn env(self) -> &'static str {
        match self {
            DeadlineKind::Connect => CONNECT_ENV,
            DeadlineKind::Read => READ_ENV,
            DeadlineKind::Pull => PULL_ENV,
        }
    }
}

impl std::fmt::Display for DeadlineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeadlineKind::Connect => "connect",
            DeadlineKind::Read => "read",
            DeadlineKind::Pull => "whole-pull",
        })
    }
}

/// The deadlines of one pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryDeadlines {
    pub connect: Duration,
    /// A registry silent this long (no headers, or no body bytes) has stopped answering.
    pub read: Duration,
    /// Large images on slow links take minutes; an hour means something is stuck.
    pub pull: Duration,
}

impl Default for RegistryDeadlines {
    fn default() -> Self {
        RegistryDeadlines {
            connect: Duration::from_secs(15),
            read: Duration::from_secs(30),
            pull: Duration::from_secs(3600),
        }
    }
}

/// A deadline override in the environment that is not a whole number of seconds in range.
#[derive(Debug, thiserror::Error)]
#[error("{var}={value:?} is not a deadline: give whole seconds from 1 to {MAX_SECONDS}")]
pub struct BadDeadline {
    pub var: &'static str,
    pub value: String,
}

impl RegistryDeadlines {
    pub fn get(&self, kind: DeadlineKind) -> Duration {
        match kind {
            DeadlineKind::Connect => self.connect,
            DeadlineKind::Read => self.read,
            DeadlineKind::Pull => self.pull,
        }
    }

    /// These deadlines with any set in the environment replacing them.
    pub fn with_env_overrides(self) -> Result<Self, BadDeadline> {
        self.with_overrides(|var| std::env::var(var).ok())
    }

    fn with_overrides(
        mut self,
        lookup: impl Fn(&'static str) -> Option<String>,
    ) -> Result<Self, BadDeadline> {
        for (kind, slot) in [
            (DeadlineKind::Connect, &mut self.connect),
            (DeadlineKind::Read, &mut self.read),
            (DeadlineKind::Pull, &mut self.pull),
        ] {
            let var = kind.env();
            let Some(value) = lookup(var) else { continue };
            let seconds = value
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|s| (1..=MAX_SECONDS).contains(s))
                .ok_or_else(|| BadDeadline {
                    var,
                    value: value.clone(),
                })?;
            *slot = Duration::from_secs(seconds);
        }
        Ok(self)
    }
}

/// Which deadline a ureq timeout is.
pub fn kind_of(timeout: ureq::Timeout) -> DeadlineKind {
    match timeout {
        ureq::Timeout::Connect | ureq::Timeout::Resolve => DeadlineKind::Connect,
        ureq::Timeout::Global => DeadlineKind::Pull,
        _ => DeadlineKind::Read,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_overrides_each_deadline_and_bad_values_are_named() {
        let base = RegistryDeadlines::default();
        let set = |pairs: &'static [(&'static str, &'static str)]| {
            move |var: &'static str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == var)
                    .map(|(_, v)| v.to_string())
            }
        };
        let d = base.with_overrides(set(&[(READ_ENV, "2")])).unwrap();
        assert_eq!(d.read, Duration::from_secs(2));
        assert_eq!(d.connect, base.connect);
        assert_eq!(d.pull, base.pull);
        let d = base
            .with_overrides(set(&[(CONNECT_ENV, " 3 "), (PULL_ENV, "40")]))
            .unwrap();
        assert_eq!(
            (d.connect, d.pull),
            (Duration::from_secs(3), Duration::from_secs(40))
        );
        for bad in ["0", "-1", "1.5", "soon", "86401"] {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(vec![(PULL_ENV, bad)].into_boxed_slice());
            let err = base.with_overrides(set(pairs)).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(PULL_ENV) && text.contains(bad), "{text}");
        }
    }
}
