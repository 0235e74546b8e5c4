//! Snapshot starts end to end: `fnvm run --snapshot` with the Debian python3 image in the VM
//! sandbox. The first run boots and snapshots the instance once its server listens; later runs
//! restore that snapshot. Checked as a user would: the restored function answers its first
//! request, files written before the snapshot are there, writes after the restore stay in their
//! own instance, two restored instances read different random bytes, and a snapshot that cannot
//! be restored is replaced by a boot start (and a new snapshot).
//!
//! Linux guests need hardware virtualization: where /proc/cpuinfo shows no vmx/svm (KVM-PVM)
//! each VM test prints one loud SKIPPED line and returns. What runs everywhere: `--snapshot`
//! outside the VM sandbox is refused with a clear message. Needs root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fnvm_testkit::*;

const HERE: Here = fnvm_testkit::here!();
const START_LIMIT: Duration = Duration::from_secs(120);

/// A home of its own per test: snapshots of one test never serve another.
fn fresh_home(name: &str) -> PathBuf {
    HERE.fresh_home(&format!("snapshot-{name}"))
}

fn skip_without_vmx_or_svm(test: &str) -> bool {
    !linux_guests_run_here(&format!("snapshot starts of Linux guests: {test}"))
}

fn run_python(home: &Path, image: &str) -> FnvmRun {
    FnvmRun::start(
        HERE.fnvm(),
        home,
        HERE.agent(),
        image,
        &["--sandbox", "vm", "--snapshot", "--type", "web"],
        START_LIMIT,
    )
}

fn get_json(run: &FnvmRun, path: &str) -> (u16, serde_json::Value) {
    let mut resp = http().get(&run.url(path)).call().unwrap();
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
    )
}

fn stderr_has(run: &FnvmRun, needle: &str) -> bool {
    run.stderr
        .wait_for(Duration::from_secs(5), |l| l.contains(needle))
        .is_some()
}

fn stop(mut run: FnvmRun, home: &Path) {
    let id = run.instance_id.clone().expect("an instance id");
    let rootfs = rootfs_image_of(&run);
    let status = run.interrupt(Duration::from_secs(30));
    assert!(
        status.success(),
        "fnvm run exited with {status}:\n{}",
        run.stderr.snapshot().join("\n")
    );
    assert_nothing_left(home, &id, rootfs.as_deref());
}

/// Boots the first instance (which writes the snapshot) and returns the boot token it wrote
/// before listening.
fn boot_and_snapshot(home: &Path, image: &str) -> String {
    let run = run_python(home, image);
    run.expect_serving();
    assert!(
        stderr_has(&run, "(boot start, vm sandbox)"),
        "{}",
        run.stderr.snapshot().join("\n")
    );
    assert!(
        stderr_has(&run, "snapshot written for later starts"),
        "{}",
        run.stderr.snapshot().join("\n")
    );
    let (status, token) = get_json(&run, "/file?path=/tmp/boot-token");
    assert_eq!(status, 200);
    let token = token["data"].as_str().unwrap().to_string();
    stop(run, home);
    token
}

#[test]
fn restored_python_functions_answer_keep_their_files_apart_and_draw_their_own_randomness() {
    let test =
        "restored_python_functions_answer_keep_their_files_apart_and_draw_their_own_randomness";
    if skip_without_vmx_or_svm(test) {
        return;
    }
    let home = fresh_home("restore");
    let image = python_image(&HERE.layouts());
    let token = boot_and_snapshot(&home, &image);

    let a = run_python(&home, &image);
    let b = run_python(&home, &image);
    for run in [&a, &b] {
        run.expect_serving();
        assert!(
            stderr_has(run, "(snapshot start, vm sandbox)"),
            "{}",
            run.stderr.snapshot().join("\n")
        );
    }
    // The first request of a restored instance is answered correctly.
    let mut resp = http()
        .post(&a.url("/echo?x=1"))
        .send("first after restore")
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let echo: serde_json::Value =
        serde_json::from_str(&resp.body_mut().read_to_string().unwrap()).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo?x=1");
    assert!(
        stderr_has(&a, "fnvm: snapshot start: resumed"),
        "{}",
        a.stderr.snapshot().join("\n")
    );

    // Files written before the snapshot are in both restored instances.
    for run in [&a, &b] {
        let (status, file) = get_json(run, "/file?path=/tmp/boot-token");
        assert_eq!(status, 200);
        assert_eq!(file["data"], token.as_str());
    }
    // Writes after the restore stay in their instance.
    let put = http()
        .put(&a.url("/file?path=/tmp/mine"))
        .send("written in a")
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    assert_eq!(
        get_json(&a, "/file?path=/tmp/mine").1["data"],
        "written in a"
    );
    assert_eq!(get_json(&b, "/file?path=/tmp/mine").0, 404);

    // Two instances restored from one snapshot do not share their RNG, and their clocks were
    // stepped to the host's time.
    let (ra, rb) = (get_json(&a, "/random").1, get_json(&b, "/random").1);
    assert_ne!(ra["hex"], rb["hex"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for r in [&ra, &rb] {
        let guest = r["time"].as_f64().unwrap();
        assert!((guest - now).abs() < 5.0, "guest time {guest}, host {now}");
    }
    stop(a, &home);
    stop(b, &home);
}

#[test]
fn a_snapshot_that_cannot_be_restored_is_replaced_by_a_boot_start() {
    let test = "a_snapshot_that_cannot_be_restored_is_replaced_by_a_boot_start";
    if skip_without_vmx_or_svm(test) {
        return;
    }
    let home = fresh_home("corrupt");
    let image = python_image(&HERE.layouts());
    boot_and_snapshot(&home, &image);
    // Flip one byte of guest memory in the snapshot.
    let entries: Vec<PathBuf> = std::fs::read_dir(home.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("vm/memory").is_file())
        .collect();
    assert_eq!(entries.len(), 1, "one snapshot: {entries:?}");
    let memory = entries[0].join("vm/memory");
    let mut bytes = std::fs::read(&memory).unwrap();
    let at = bytes.iter().position(|&b| b != 0).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(&memory, &bytes).unwrap();

    let run = run_python(&home, &image);
    run.expect_serving();
    assert!(
        stderr_has(&run, "(boot start, vm sandbox)"),
        "{}",
        run.stderr.snapshot().join("\n")
    );
    assert!(
        stderr_has(&run, "could not be restored"),
        "{}",
        run.stderr.snapshot().join("\n")
    );
    assert!(
        stderr_has(&run, "snapshot written for later starts"),
        "{}",
        run.stderr.snapshot().join("\n")
    );
    assert_eq!(get_json(&run, "/file?path=/tmp/boot-token").0, 200);
    stop(run, &home);
    // The replacement restores.
    let again = run_python(&home, &image);
    again.expect_serving();
    assert!(
        stderr_has(&again, "(snapshot start, vm sandbox)"),
        "{}",
        again.stderr.snapshot().join("\n")
    );
    stop(again, &home);
}

/// Everywhere: `--snapshot` in the process sandbox is refused before anything is pulled.
#[test]
fn snapshot_starts_outside_the_vm_sandbox_are_refused_with_the_reason() {
    let home = fresh_home("process");
    let out = fnvm_command(HERE.fnvm(), &home, HERE.agent())
        .args([
            "run",
            "oci:/nonexistent-image",
            "--sandbox",
            "process",
            "--snapshot",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--snapshot needs the vm sandbox"),
        "{stderr}"
    );
    // Refused before the image was looked at.
    assert!(!stderr.contains("nonexistent-image"), "{stderr}");
}
