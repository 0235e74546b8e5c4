//! `fnvm bench` end to end: the real binary measuring real images built here from Debian
//! packages (busybox-static's httpd as a web function, Debian minbase + python3 as an event
//! function), every kind and phase present in its JSON, and bad input (an image that cannot be
//! pulled, one that never listens, a sandbox that cannot run here) refused by name.
//! Needs root (the process sandbox).

use std::path::{Path, PathBuf};
use std::process::Output;

use fnvm_testkit::*;

const HERE: Here = fnvm_testkit::here!();

fn layouts() -> PathBuf {
    HERE.tmp().join("bench-tests-images")
}

fn bench(home: &Path, args: &[&str]) -> Output {
    fnvm_command(HERE.fnvm(), home, HERE.agent())
        .arg("bench")
        .args(args)
        .output()
        .expect("fnvm runs")
}

/// The phases of `kind` in a bench's JSON, in order, each checked to hold `runs` samples.
fn phases(report: &serde_json::Value, kind: &str, runs: usize) -> Vec<String> {
    let phases = report["kinds"][kind]["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("{kind} has no phases: {report}"));
    for p in phases {
        let name = p["phase"].as_str().unwrap();
        let samples = p["samples_ms"].as_array().unwrap();
        assert_eq!(samples.len(), runs, "{kind}/{name}: {p}");
        assert!(
            samples.iter().all(|s| s.as_f64().unwrap() >= 0.0),
            "{kind}/{name}: {p}"
        );
        for q in ["p50_ms", "p90_ms", "p99_ms"] {
            assert!(p[q].as_f64().is_some(), "{kind}/{name} has no {q}: {p}");
        }
        assert!(
            p["p50_ms"].as_f64() <= p["p99_ms"].as_f64(),
            "{kind}/{name}: {p}"
        );
    }
    phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_short_bench_of_busybox_and_python3_reports_every_kind_and_phase_as_json() {
    let images = [
        (busybox_image(&layouts()), "web"),
        (python_image(&layouts()), "event"),
    ];
    for sandbox in sandboxes("fnvm bench") {
        let _serial = serial();
        for (image, function_type) in &images {
            let home = HERE.fresh_home(&format!("bench-home-{sandbox}"));
            let out = bench(
                &home,
                &[
                    image,
                    "--sandbox",
                    sandbox,
                    "--type",
                    function_type,
                    "--runs",
                    "2",
                    "--json",
                ],
            );
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{image}: {stderr}");
            let report: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
            assert_eq!(report["sandbox"], *sandbox);
            assert_eq!(report["type"], *function_type);
            assert_eq!(report["runs"], 2);
            assert!(report["digest"].as_str().unwrap().starts_with("sha256:"));
            for key in ["cpu", "cpus", "kernel", "fnvm", "hardware_virtualization"] {
                assert!(report["machine"][key].is_string(), "{key}: {report}");
            }
            assert_eq!(
                phases(&report, "pull", 2),
                ["resolve", "fetch", "unpack", "rootfs image", "total"]
            );
            // In order: the whole start, where the sandbox says it went, the first reply.
            let boot = phases(&report, "boot", 2);
            let within: &[&str] = if sandbox == "vm" {
                &[
                    "VMM start → agent answered",
                    "of which VMM set-up → guest clock start",
                    "of which guest boot → agent",
                ]
            } else {
                &[
                    "sandbox set-up → agent answered",
                    "of which network (nft, pasta)",
                ]
            };
            let mut want = vec!["start → ready"];
            want.extend_from_slice(within);
            want.extend(["agent → function listening", "first reply"]);
            assert_eq!(boot, want, "{report}");
            assert_eq!(phases(&report, "warm", 2), ["reply"]);
            if sandbox == "vm" {
                assert_eq!(
                    phases(&report, "snapshot", 2),
                    ["start → ready", "VMM start → guest resumed", "first reply"]
                );
            } else {
                let why = report["kinds"]["snapshot"]["not_run"].as_str().unwrap();
                assert!(why.contains("no snapshots"), "{report}");
            }
            if sandbox == "process" {
                assert_eq!(
                    phases(&report, "standby", 2),
                    [
                        "start → ready",
                        "standby placed → agent answered",
                        "agent → function listening",
                        "first reply"
                    ]
                );
            } else {
                let why = report["kinds"]["standby"]["not_run"].as_str().unwrap();
                assert!(why.contains("snapshot starts"), "{report}");
            }
            // A start that booted and answered takes longer than a warm call.
            let p50 = |kind: &str, phase: &str| {
                report["kinds"][kind]["phases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["phase"] == phase)
                    .and_then(|p| p["p50_ms"].as_f64())
                    .unwrap_or_else(|| panic!("{kind}/{phase}: {report}"))
            };
            assert!(
                p50("boot", "start → ready") > p50("warm", "reply"),
                "{report}"
            );
            // The pulls went into stores of their own, all removed.
            let left: Vec<_> = std::fs::read_dir(home.join("bench"))
                .map(|d| d.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "pull stores left: {left:?}");
        }
    }
}

#[test]
fn bad_input_is_refused_with_a_message_naming_what_was_wrong() {
    let home = HERE.fresh_home("bench-home-bad");
    let out = bench(&home, &["oci:/nonexistent/layout:latest", "--runs", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot pull oci:/nonexistent/layout:latest"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no partial table: {:?}", out.stdout);

    let out = bench(&home, &["oci:/x:latest", "--runs", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--runs"), "{stderr}");

    if !host_has_vmx_or_svm() {
        // A sandbox that cannot run here: the reason, and no table.
        let image = busybox_image(&layouts());
        let out = bench(
            &home,
            &[&image, "--sandbox", "vm", "--type", "web", "--runs", "1"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains("VMX") || stderr.contains("SVM"), "{stderr}");
        assert!(out.stdout.is_empty(), "no partial table: {:?}", out.stdout);
    }
}

#[test]
fn an_image_that_never_listens_ends_the_bench_with_the_contracts_message_and_no_table() {
    // busybox whose entrypoint only sleeps: nothing ever listens on port 9000.
    let image = busybox_image_with(
        &layouts(),
        "busybox-never-listens",
        &[],
        Some(vec!["/bin/busybox".into(), "sleep".into(), "3600".into()]),
    );
    for sandbox in sandboxes("fnvm bench of an image that never listens") {
        let _serial = serial();
        let home = HERE.fresh_home(&format!("bench-home-silent-{sandbox}"));
        let out = bench(
            &home,
            &[&image, "--sandbox", sandbox, "--runs", "1", "--json"],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sandbox}: {stderr}");
        assert!(
            stderr.contains(fnvm_agent::protocol::NOT_LISTENING_MESSAGE),
            "{sandbox}: the bench's error does not say the server never listened:\n{stderr}"
        );
        assert!(
            out.stdout.is_empty(),
            "{sandbox}: no partial report: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
