//! A hostile function against its sandbox's device isolation, through `fnvm run`, in each
//! sandbox the level runs (the vm sandbox at the nested level): its image carries block and
//! character device nodes (other functions' loop disks, the guest's own virtio disks, the
//! host's disks, /dev/mem, /dev/kmsg) and it mknods more at run time. None of them opens; the
//! standard devices (null, zero, urandom, a pty) work; a victim's marker is found nowhere. In a
//! VM guest the agent is the one that sets this up (nodev mounts, no CAP_MKNOD, devices cgroup).
//! Needs root.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fnvm::oci_layout::Layer;
use fnvm_testkit::{
    assert_nothing_left, busybox_image_with, rootfs_image_of, sandboxes, serial, FnvmRun,
};

use fnvm_testkit::Here;

const HERE: Here = fnvm_testkit::here!();
/// Generous: a vm start at the nested level is emulated.
const START_LIMIT: Duration = Duration::from_secs(120);
/// Written by the victim into its writable layer; the attacker must never read it.
const VICTIM_MARKER: &str = "fnvm-victim-marker-93d2a7";
/// Written by the attacker into its own writable layer: raw access to its own disk would find it.
const OWN_MARKER: &str = "fnvm-attacker-own-marker-41c6e8";

/// The device nodes the attacker's image carries in /disk: (name, block?, major, minor).
fn nodes() -> Vec<(String, bool, u32, u32)> {
    let mut nodes: Vec<(String, bool, u32, u32)> = vec![
        // The guest's virtio disks (rootfs, writable layer), wherever the kernel numbered them.
        ("vda".into(), true, 254, 0),
        ("vdb".into(), true, 254, 16),
        ("vda253".into(), true, 253, 0),
        ("vdb253".into(), true, 253, 16),
        ("vda252".into(), true, 252, 0),
        // The host's usual disks.
        ("sda".into(), true, 8, 0),
        ("nvme".into(), true, 259, 0),
        ("mem".into(), false, 1, 1),
        ("kmem".into(), false, 1, 2),
        ("port".into(), false, 1, 4),
        ("kmsg".into(), false, 1, 11),
    ];
    // Every function's writable layer and rootfs in the process sandbox is a loop disk.
    nodes.extend((0..32).map(|n| (format!("loop{n}"), true, 7, n)));
    nodes
}

/// An uncompressed tar layer holding the nodes under /disk (made by the image, not at run time).
fn nodes_layer() -> PathBuf {
    let path = HERE.tmp().join("isolation-nodes-layer.tar");
    let mut tar = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    dir.set_mtime(1_700_000_000);
    tar.append_data(&mut dir, "disk/", std::io::empty())
        .unwrap();
    for (name, block, major, minor) in nodes() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(if block {
            tar::EntryType::Block
        } else {
            tar::EntryType::Char
        });
        h.set_mode(0o666);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        tar.append_data(&mut h, format!("disk/{name}"), std::io::empty())
            .unwrap();
    }
    let bytes = tar.into_inner().unwrap();
    let staging = HERE
        .tmp()
        .join(format!("isolation-nodes-layer.{}.tar", std::process::id()));
    std::fs::write(&staging, bytes).unwrap();
    std::fs::rename(&staging, &path).unwrap();
    path
}

/// The attacker's script: every node in /disk, mknod at run time, the standard devices; then it
/// serves, so the test knows it got this far.
fn attack_script() -> String {
    format!(
        r#"echo {OWN_MARKER} > /tmp/own-marker.txt; sync
        for d in /disk/*; do
            if dd if=$d of=/dev/null bs=4096 count=1 2>/dev/null; then echo "OPENED $d"; else echo "refused $d"; fi
            if dd if=/dev/zero of=$d bs=512 count=1 conv=notrunc 2>/dev/null; then echo "WROTE $d"; fi
        done
        grep -l -e {VICTIM_MARKER} -e {OWN_MARKER} /disk/* 2>/dev/null && echo "MARKER FOUND"
        for at in /tmp/made /dev/made /made; do
            if mknod $at b 254 16 2>/dev/null; then echo "MADE $at"; else echo "no mknod at $at"; fi
        done
        n=$(head -c 16 /dev/urandom | wc -c); echo "urandom=$((n))"
        n=$(head -c 8 /dev/zero | wc -c); echo "zero=$((n))"
        echo gone > /dev/null && echo "null ok"
        (exec 3<>/dev/ptmx && echo "ptmx ok")
        echo "attack done"
        exec httpd -f -p 0.0.0.0:9000 -h /www"#
    )
}

fn image(name: &str, extra: &[Layer], script: &str) -> String {
    busybox_image_with(
        &HERE.layouts(),
        name,
        extra,
        Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
    )
}

fn stop_and_check(mut run: FnvmRun, home: &Path) {
    let id = run.instance_id.clone().expect("an instance id");
    let rootfs = rootfs_image_of(&run);
    let status = run.interrupt(Duration::from_secs(30));
    assert!(status.success(), "fnvm run exited with {status}");
    assert_nothing_left(home, &id, rootfs.as_deref());
}

#[test]
fn a_function_opens_no_disk_and_no_kernel_device_whatever_it_mknods_but_has_the_standard_ones() {
    let victim_image = image(
        "isolation-victim",
        &[],
        &format!(
            "echo {VICTIM_MARKER} > /tmp/marker.txt; sync; exec httpd -f -p 0.0.0.0:9000 -h /www"
        ),
    );
    let attacker_image = image(
        "isolation-attacker",
        &[Layer::TarFile(nodes_layer())],
        &attack_script(),
    );
    for sandbox in sandboxes("device isolation") {
        let _serial = serial();
        let home = HERE.tmp().join(format!("isolation-home-{sandbox}"));
        std::fs::create_dir_all(&home).unwrap();
        let args = ["--sandbox", sandbox, "--type", "web"];
        let victim = FnvmRun::start(
            HERE.fnvm(),
            &home,
            HERE.agent(),
            &victim_image,
            &args,
            START_LIMIT,
        );
        victim.expect_serving();
        let attacker = FnvmRun::start(
            HERE.fnvm(),
            &home,
            HERE.agent(),
            &attacker_image,
            &args,
            START_LIMIT,
        );
        attacker.expect_serving();
        attacker
            .stdout
            .wait_for(Duration::from_secs(60), |l| l.ends_with("attack done"));
        let said: Vec<String> = attacker
            .log_lines()
            .into_iter()
            .filter(|(stream, _)| stream == "stdout")
            .map(|(_, line)| line)
            .collect();
        let text = said.join("\n");
        assert!(said.iter().any(|l| l == "attack done"), "{sandbox}: {text}");
        for (name, ..) in nodes() {
            assert!(
                said.contains(&format!("refused /disk/{name}")),
                "{sandbox}: /disk/{name} opened:\n{text}"
            );
        }
        for bad in ["OPENED", "WROTE", "MARKER FOUND", "MADE"] {
            assert!(!text.contains(bad), "{sandbox}: {bad}:\n{text}");
        }
        for at in ["/tmp/made", "/dev/made", "/made"] {
            assert!(
                said.contains(&format!("no mknod at {at}")),
                "{sandbox}: {text}"
            );
        }
        for standard in ["urandom=16", "zero=8", "null ok", "ptmx ok"] {
            assert!(
                said.contains(&standard.to_string()),
                "{sandbox}: {standard} missing:\n{text}"
            );
        }
        // Both still serve: the attempts cost neither of them anything.
        for run in [&attacker, &victim] {
            let body = fnvm_testkit::http()
                .get(run.url("/index.html"))
                .call()
                .unwrap()
                .body_mut()
                .read_to_string()
                .unwrap();
            assert!(body.contains("busybox says hello"), "{sandbox}: {body}");
        }
        stop_and_check(attacker, &home);
        stop_and_check(victim, &home);
    }
}
