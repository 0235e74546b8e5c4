//! `fnvm serve` when things around it go wrong, end to end with the real binary: a second serve
//! on the same home, a serve killed with SIGKILL mid-way, a registry that accepts connections
//! and never answers. Instances would run in the process sandbox; needs root.

use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use fnvm_testkit::registry::SilentRegistry;
use fnvm_testkit::Serve;
use fnvm_testkit::{fnvm_command, serial};

use fnvm_testkit::Here;

const HERE: Here = fnvm_testkit::here!();
/// The registry read deadline every serve of this file gets (seconds).
const READ_DEADLINE_S: &str = "2";

/// Every test starts here: serialised, and the registry deadline set before any child exists.
fn setup() -> std::sync::MutexGuard<'static, ()> {
    let guard = serial();
    static ENV: Once = Once::new();
    ENV.call_once(|| std::env::set_var("FNVM_REGISTRY_READ_TIMEOUT_S", READ_DEADLINE_S));
    guard
}

fn is_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED (needs root for the process sandbox)");
    false
}

/// Runs `cmd` to its end, killing it (and failing) after `limit`.
fn output_within(
    mut cmd: Command,
    limit: Duration,
) -> (std::process::ExitStatus, String, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            return (status, text, started.elapsed());
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still ran after {limit:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pid no process has (one that just ended and was reaped).
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn one_serve_per_home_and_a_killed_serves_leftovers_are_cleaned_at_the_next_start() {
    let _serial = setup();
    if !is_root() {
        return;
    }
    let home = HERE.fresh_home("service-resilience-lock");
    let mut first = Serve::start(HERE.fnvm(), &home, HERE.agent(), &[]);
    let first_pid = first.child.id();

    // A second serve on the same home refuses at once and names the first.
    let mut second = fnvm_command(HERE.fnvm(), &home, HERE.agent());
    second.args(["serve", "--listen", "127.0.0.1:0", "--sandbox", "process"]);
    let (status, text, _) = output_within(second, Duration::from_secs(60));
    assert!(!status.success(), "{text}");
    assert!(
        text.contains(&format!("another fnvm serve (pid {first_pid})"))
            && text.contains(&home.canonicalize().unwrap().display().to_string()),
        "{text}"
    );

    // The first dies hard, as in a crash: no lock is left held, and what an interrupted pull
    // of it would have left goes when the next serve starts.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let dead = dead_pid();
    let staging = home.join(format!("rootfs/.staging-{}.{dead}.0", "a".repeat(64)));
    std::fs::create_dir_all(staging.join("tree/usr")).unwrap();
    std::fs::write(staging.join("rootfs.img"), vec![0u8; 1 << 20]).unwrap();
    let partial_blob = home.join(format!("blobs/sha256/.ingest-{}.{dead}.0", "b".repeat(64)));
    std::fs::create_dir_all(partial_blob.parent().unwrap()).unwrap();
    std::fs::write(&partial_blob, b"half a layer").unwrap();
    let mut next = Serve::start(HERE.fnvm(), &home, HERE.agent(), &[]);
    assert!(!staging.exists(), "{} is left", staging.display());
    assert!(!partial_blob.exists(), "{} is left", partial_blob.display());
    next.stop();
}

#[test]
fn a_deploy_from_a_silent_registry_fails_at_the_read_deadline_with_a_clear_message() {
    let _serial = setup();
    if !is_root() {
        return;
    }
    let registry = SilentRegistry::start();
    let host = registry.host.clone();
    let home = HERE.fresh_home("service-resilience-silent");
    let mut serve = Serve::start(HERE.fnvm(), &home, HERE.agent(), &[]);
    let mut deploy = Command::new(HERE.fnvm);
    deploy
        .args([
            "deploy",
            "quiet",
            "--image",
            &format!("{host}/fn/quiet:latest"),
        ])
        .args(["--insecure-registry", &host, "--server", &serve.url("")])
        .env_remove("FNVM_API_TOKEN");
    // Four attempts at two seconds each, short back-offs; minutes of slack for a loaded box.
    let (status, text, _took) = output_within(deploy, Duration::from_secs(180));
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("the deploy of quiet failed")
            && text.contains(&format!("registry {host} did not answer in time"))
            && text.contains(&format!("read deadline of {READ_DEADLINE_S} s"))
            && text.contains("FNVM_REGISTRY_READ_TIMEOUT_S"),
        "{text}"
    );
    assert!(registry.connections() >= 1, "the registry was reached");
    serve.stop();
}
