//! Attacks on the process sandbox's isolation, as a hostile function would try them: device
//! nodes for other instances' disks and the host's, a fork bomb, an allocation past the memory
//! limit. Real agent, real loop devices and cgroups; needs root (skipped loudly otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{busybox_rootfs, is_root, World};
use crate::sandbox::process::loopdev;
use crate::sandbox::{Instance, LogStream, Sandbox, SandboxError};

/// Written by the victim into its writable layer; the attacker must never read it.
const MARKER: &str = "fnvm-victim-marker-5b1e0c";

/// A copy of the busybox image with device nodes in `/disk`: (name, 'b' or 'c', major, minor).
fn image_with_nodes(dir: &Path, nodes: &[(String, char, u32, u32)]) -> PathBuf {
    let image = dir.join("attacker.ext4");
    std::fs::copy(busybox_rootfs(), &image).unwrap();
    let mut script = String::from("mkdir /disk\ncd /disk\n");
    for (name, kind, major, minor) in nodes {
        script.push_str(&format!("mknod {name} {kind} {major} {minor}\n"));
        let mode = if *kind == 'b' { "060666" } else { "020666" };
        script.push_str(&format!("sif /disk/{name} mode {mode}\n"));
    }
    let commands = dir.join("debugfs.cmds");
    std::fs::write(&commands, script).unwrap();
    let out = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&commands)
        .arg(&image)
        .output()
        .expect("debugfs (e2fsprogs) is installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.lines().any(|l| !l.starts_with("debugfs ")),
        "{stderr}"
    );
    image
}

/// (major, minor) of the loop device whose backing file is `backing`.
fn loop_numbers_of(backing: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let (number, _) = loopdev::attached()
        .into_iter()
        .find(|(_, b)| b == backing)
        .unwrap_or_else(|| panic!("no loop device backs {}", backing.display()));
    let rdev = std::fs::metadata(format!("/dev/loop{number}"))
        .unwrap()
        .rdev();
    (
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    )
}

/// Whether the host can read `needle` on the block device `major:minor` (root, on the host).
fn host_finds(major: u32, minor: u32, needle: &[u8]) -> bool {
    use std::io::Read;
    let path = format!("/sys/dev/block/{major}:{minor}");
    let name = std::fs::read_link(&path).unwrap();
    let dev = Path::new("/dev").join(name.file_name().unwrap());
    let mut file = std::fs::File::open(&dev).unwrap();
    let mut buf = vec![0u8; 4 << 20];
    let mut carry = Vec::new();
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            return false;
        }
        carry.extend_from_slice(&buf[..n]);
        if carry.windows(needle.len()).any(|w| w == needle) {
            return true;
        }
        let keep = carry.len().saturating_sub(needle.len());
        carry.drain(..keep);
    }
}

#[test]
fn a_function_opens_no_disk_of_another_function_or_the_host_but_has_the_standard_devices() {
    if !is_root() {
        return;
    }
    let world = World::new();
    let (victim_spec, _victim_logs) = world.spec(
        "victim",
        &format!("echo {MARKER} > /marker.txt; sync; exec httpd -f -p 9000 -h /www"),
        30_000,
    );
    let victim = world
        .sandbox
        .start(victim_spec.clone())
        .expect("the victim starts");
    let (major, minor) = loop_numbers_of(&victim_spec.instance_dir.join("writable.ext4"));
    assert!(
        host_finds(major, minor, MARKER.as_bytes()),
        "the marker is on the victim's disk, where an attacker would look"
    );

    let mut nodes = vec![
        ("victim".to_string(), 'b', major, minor),
        ("sda".to_string(), 'b', 8, 0),
        ("dm0".to_string(), 'b', 253, 0),
        ("vda".to_string(), 'b', 254, 0),
        ("mem".to_string(), 'c', 1, 1),
        ("kmsg".to_string(), 'c', 1, 11),
    ];
    nodes.extend((0..8).map(|n| (format!("loop{n}"), 'b', 7, n)));
    let image = image_with_nodes(world._tmp.path(), &nodes);
    let script = format!(
        r#"for d in /disk/*; do
            if dd if=$d of=/dev/null bs=4096 count=1 2>/dev/null; then echo "OPENED $d"; else echo "refused $d"; fi
        done
        grep -l {MARKER} /disk/* 2>/dev/null && echo "MARKER FOUND"
        for at in /tmp/victim /dev/victim /victim; do
            if mknod $at b {major} {minor} 2>/dev/null; then echo "MADE $at"; else echo "no mknod at $at"; fi
        done
        n=$(head -c 16 /dev/urandom | wc -c); echo "urandom=$((n))"
        n=$(head -c 8 /dev/zero | wc -c); echo "zero=$((n))"
        echo gone > /dev/null && echo "null ok"
        (exec 3<>/dev/ptmx && echo "ptmx ok" && ls /dev/pts)
        exec httpd -f -p 9000 -h /www"#
    );
    let (mut spec, logs) = world.spec("attacker", &script, 30_000);
    spec.rootfs_image = image;
    let attacker = world
        .sandbox
        .start(spec.clone())
        .expect("the attacker starts");
    let said = logs.lines(LogStream::Stdout);
    let text = said.join("\n");
    for (name, ..) in &nodes {
        assert!(
            said.contains(&format!("refused /disk/{name}")),
            "/disk/{name} opened:\n{text}"
        );
    }
    assert!(!text.contains("OPENED") && !text.contains(MARKER), "{text}");
    for at in ["/tmp/victim", "/dev/victim", "/victim"] {
        assert!(said.contains(&format!("no mknod at {at}")), "{text}");
    }
    for standard in ["urandom=16", "zero=8", "null ok", "ptmx ok"] {
        assert!(said.contains(&standard.to_string()), "{standard}:\n{text}");
    }
    // The pty it opened is in its own devpts.
    let ptmx = said.iter().position(|l| l == "ptmx ok").unwrap();
    assert!(
        said[ptmx + 1..]
            .iter()
            .any(|l| l == "0" || l.contains("ptmx")),
        "{text}"
    );

    assert!(serves(&*attacker) && serves(&*victim));

    attacker.stop().unwrap();
    victim.stop().unwrap();
    world.assert_nothing_left(&spec);
    world.assert_nothing_left(&victim_spec);
}

#[test]
fn a_fork_bomb_is_held_at_the_pids_limit_and_the_error_names_it() {
    if !is_root() {
        return;
    }
    let world = World::new();
    // The bomb fills the instance up to its limit; the function's own next fork then fails
    // and it exits before ever listening.
    let (spec, _logs) = world.spec(
        "forkbomb",
        "bomb() { bomb | bomb & }; bomb; while sleep 0.1; do :; done; echo the shell could not fork; exit 3",
        60_000,
    );
    let err = match world.sandbox.start(spec.clone()) {
        Ok(_) => panic!("a fork bomb must not start as a function"),
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        text.contains("reached its process limit (1024 processes")
            && text.contains("FNVM_PIDS_MAX")
            && text.contains("fork(s) refused"),
        "{text}"
    );
    // The host is fine: it still forks, and nothing of the bomb is left.
    let status = Command::new("true").status().expect("the host can fork");
    assert!(status.success());
    world.assert_nothing_left(&spec);
}

#[test]
fn a_function_allocating_past_its_memory_is_reported_as_out_of_memory() {
    if !is_root() {
        return;
    }
    let world = World::new();
    // busybox dd allocates its block: 400 MiB in a 128 MiB instance.
    let (mut spec, _logs) = world.spec(
        "oom",
        "echo allocating; exec dd if=/dev/zero of=/dev/null bs=400M count=1",
        30_000,
    );
    spec.memory_mib = 128;
    let err = match world.sandbox.start(spec.clone()) {
        Ok(instance) => {
            let report = instance.wait_exit();
            instance.stop().unwrap();
            panic!("an allocation past the limit must fail the start, it ended: {report}")
        }
        Err(e) => e,
    };
    let text = err.to_string();
    assert!(
        text.contains("ran out of memory (limit 128 MiB)") && text.contains("OOM killer"),
        "{text}"
    );
    assert!(matches!(err, SandboxError::Exited(_)), "{err:?}");
    world.assert_nothing_left(&spec);
}

/// The instance answers HTTP: it really ran its whole script.
fn serves(instance: &dyn Instance) -> bool {
    super::http_get(instance, "/").contains("hello from busybox")
}
