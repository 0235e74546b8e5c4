//! `fnvm demo` end to end: builds the example function's image from examples/hello (a static
//! build), runs it in the default sandbox, invokes it and prints the reply, its log lines and
//! the start timing, then leaves nothing behind, in each sandbox the level runs. Needs root.

use std::process::Command;

use fnvm_testkit::Here;

const HERE: Here = fnvm_testkit::here!();

#[test]
fn the_demo_invokes_the_example_function_and_shows_reply_logs_and_timings() {
    for sandbox in fnvm_testkit::sandboxes("the demo") {
        demo_in(sandbox);
    }
}

fn demo_in(sandbox: &str) {
    let fnvm = HERE.fnvm();
    let agent = fnvm_testkit::static_binary(fnvm, "fnvm-agent", "FNVM_AGENT_BIN");
    let hello = fnvm_testkit::static_binary(fnvm, "fnvm-hello", "FNVM_HELLO_BIN");
    let home = tempfile::Builder::new()
        .prefix("fnvm-demo-")
        .tempdir_in(HERE.tmp)
        .unwrap();
    let out = Command::new(fnvm)
        .env("FNVM_AGENT_BIN", &agent)
        .env("FNVM_HELLO_BIN", &hello)
        .arg("--home")
        .arg(home.path())
        .args(["demo", "--sandbox", sandbox])
        .output()
        .expect("cannot run fnvm demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fnvm demo failed in the {sandbox} sandbox:\n{stderr}\n{stdout}"
    );
    assert!(
        stdout.contains(&format!("timings ({sandbox} sandbox)")),
        "the demo did not run in the {sandbox} sandbox:\n{stdout}"
    );
    // The reply, with the request id the function saw.
    let reply_line = stdout
        .lines()
        .find(|l| l.contains("\"message\":\"Hello from fnvm!\""))
        .unwrap_or_else(|| panic!("no reply in:\n{stdout}"));
    let reply: serde_json::Value = serde_json::from_str(reply_line.trim()).unwrap();
    let request_id = reply["request_id"].as_str().unwrap();
    assert_eq!(request_id.len(), 36, "a UUID request id: {reply}");
    assert_eq!(reply["function"], "hello");
    assert!(reply["event"]
        .as_str()
        .unwrap()
        .contains("hello from fnvm demo"));
    // The function's log lines, timestamped with their stream.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(" stdout fnvm-hello: function hello listening")),
        "no start log line:\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(" stdout fnvm-hello: event ") && l.contains(request_id)),
        "no log line for the invocation:\n{stdout}"
    );
    // The timings.
    for label in ["start:", "first invocation:", "warm invocation:"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains(label) && l.trim_end().ends_with("ms")),
            "no {label} timing:\n{stdout}"
        );
    }
    // Nothing of the instance is left.
    let instances = home.path().join("instances");
    let left: Vec<_> = std::fs::read_dir(&instances)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "instances left behind: {left:?}");
}
