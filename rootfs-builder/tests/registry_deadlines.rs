//! A registry that accepts connections and never answers (a real TCP listener on 127.0.0.1
//! that holds every connection open, silent): the pull fails in bounded time with a message
//! naming the registry and the deadline that ran out.

use std::time::{Duration, Instant};

use fnvm_rootfs_builder::pipeline::{pull, HomeDirs, PullOptions};
use fnvm_rootfs_builder::reference;
use fnvm_rootfs_builder::registry::deadlines::{RegistryDeadlines, PULL_ENV, READ_ENV};
use fnvm_rootfs_builder::registry::RegistryOptions;
use fnvm_testkit_registry::SilentRegistry;

fn options(host: &str, deadlines: RegistryDeadlines) -> PullOptions {
    PullOptions {
        registry: RegistryOptions {
            insecure_registries: vec![host.to_owned()],
            backoff: Duration::from_millis(20),
            deadlines,
            ..RegistryOptions::default()
        },
        ..PullOptions::default()
    }
}

/// The error and its causes, as the CLI prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Pulls `host/silent:latest`, returning the error text and how long the pull took.
fn pull_from(host: &str, deadlines: RegistryDeadlines) -> (String, Duration) {
    let home = tempfile::tempdir().unwrap();
    let reference = reference::parse(&format!("{host}/silent:latest")).unwrap();
    let started = Instant::now();
    let result = pull(
        &reference,
        &HomeDirs::under(home.path()),
        &options(host, deadlines),
        &mut |_| {},
    );
    let took = started.elapsed();
    match result {
        Ok(_) => panic!("a silent registry cannot produce an image"),
        Err(e) => (chain(&e), took),
    }
}

#[test]
fn a_silent_registry_fails_the_pull_at_the_read_deadline_naming_it() {
    let registry = SilentRegistry::start();
    let deadlines = RegistryDeadlines {
        read: Duration::from_secs(1),
        ..RegistryDeadlines::default()
    };
    let (message, took) = pull_from(&registry.host, deadlines);
    assert!(message.contains(&registry.host), "{message}");
    assert!(
        message.contains("did not answer in time")
            && message.contains("read deadline of 1 s")
            && message.contains(READ_ENV),
        "{message}"
    );
    // Four attempts of one second each and short back-offs; generous for a loaded machine,
    // far below the minutes a pull hung before.
    assert!(took < Duration::from_secs(60), "took {took:?}: {message}");
    assert!(registry.connections() >= 1, "the registry was reached");
}

#[test]
fn the_whole_pull_deadline_bounds_every_retry_together() {
    let registry = SilentRegistry::start();
    let deadlines = RegistryDeadlines {
        read: Duration::from_secs(600),
        pull: Duration::from_secs(2),
        ..RegistryDeadlines::default()
    };
    let (message, took) = pull_from(&registry.host, deadlines);
    assert!(message.contains(&registry.host), "{message}");
    assert!(
        message.contains("whole-pull deadline of 2 s") && message.contains(PULL_ENV),
        "{message}"
    );
    assert!(took < Duration::from_secs(60), "took {took:?}: {message}");
}
