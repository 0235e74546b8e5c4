//! Standby sandboxes: a service's cold start placed into a sandbox prepared before the
//! request, with the function's own directory, memory limit and disks; and nothing of a
//! standby left once the sandbox is gone.

use std::time::{Duration, Instant};

use super::super::ProcessSandbox;
use super::{agent, cgroup, http_get, is_root, loopdev, World};
use crate::sandbox::{instances_root, Sandbox};

/// Waits until `sandbox` has `n` standbys ready.
fn wait_ready(sandbox: &ProcessSandbox, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sandbox.standbys_ready() < n {
        assert!(Instant::now() < deadline, "no standby sandbox came up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The cgroups of `home`'s standbys (named after their directories).
fn standby_cgroups(home: &crate::home::Home) -> Vec<std::path::PathBuf> {
    let Ok(h) = cgroup::Hierarchy::probe() else {
        return Vec::new();
    };
    let prefix = format!("{}-standby-", cgroup::cgroup_prefix(home));
    std::fs::read_dir(h.parent())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect()
}

/// A world whose sandbox keeps one standby, once it is ready: the world, the instances root,
/// the standby's directory and its agent's pid.
fn world_with_a_standby() -> (World, std::path::PathBuf, std::path::PathBuf, i32) {
    let mut world = World::new();
    world.sandbox = ProcessSandbox::with_agent(&world.home, agent())
        .unwrap()
        .with_standby_sandboxes(1)
        .unwrap();
    wait_ready(&world.sandbox, 1);
    let root = instances_root(&world.home).unwrap();
    let standby_dir = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("standby-")
        })
        .expect("the standby has its directory under the instances root");
    let record = crate::sandbox::instance::record::InstanceRecord::load(&standby_dir).unwrap();
    let pid = record.sandbox.expect("the standby names its agent").pid;
    (world, root, standby_dir, pid)
}

#[test]
fn a_start_from_a_standby_serves_with_its_own_directory_and_memory_limit_and_a_new_standby_follows()
{
    if !is_root() {
        return;
    }
    let (mut world, root, standby_dir, agent_pid) = world_with_a_standby();
    let before = standby_cgroups(&world.home);
    // While it waits, its agent has mounted the writable layer (not yet any rootfs).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mounts = loop {
        let mounts = std::fs::read_to_string(format!("/proc/{agent_pid}/mountinfo")).unwrap();
        if mounts.contains("/mnt/writable ") || Instant::now() > deadline {
            break mounts;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(mounts.contains("/mnt/writable "), "{mounts}");
    assert!(!mounts.contains("/mnt/rootfs "), "{mounts}");

    let (spec, logs) = world.spec(
        "placed",
        "echo pid=$$; exec httpd -f -p 9000 -h /www",
        30_000,
    );
    let instance = world
        .sandbox
        .start(spec.clone())
        .expect("the instance starts");
    let info = instance.start_info();
    assert_eq!(
        info.note.as_deref(),
        Some("from a standby sandbox"),
        "{info:?}"
    );
    assert!(
        info.phases
            .iter()
            .any(|(name, _)| name.starts_with("standby placed")),
        "{info:?}"
    );
    let reply = http_get(instance.as_ref(), "/index.html");
    assert!(reply.ends_with("hello from busybox\n"), "{reply}");
    assert!(
        logs.lines(crate::sandbox::LogStream::Stdout)
            .iter()
            .any(|l| l == "pid=1"),
        "the function is PID 1 of its own namespace: {:?}",
        logs.lines(crate::sandbox::LogStream::Stdout)
    );
    // The standby's directory became the instance's.
    assert!(!standby_dir.exists(), "{} is left", standby_dir.display());
    assert!(spec.instance_dir.join("sock/9000.sock").exists());
    // Its cgroup now has the function's limit (256 MiB), not the standby's.
    for dir in &before {
        let limit = ["memory.max", "memory.limit_in_bytes"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok());
        if let Some(limit) = limit {
            assert_eq!(
                limit.trim(),
                (256u64 << 20).to_string(),
                "{}",
                dir.display()
            );
        }
    }
    // A replacement is prepared after the start.
    wait_ready(&world.sandbox, 1);

    instance.stop().unwrap();
    instance.wait_exit();
    assert!(!spec.instance_dir.exists());
    for dir in &before {
        assert!(
            !dir.exists(),
            "the taken standby's cgroup {} is left",
            dir.display()
        );
    }

    // Dropping the sandbox releases the waiting standby: directory, cgroup, loop device, agent.
    let home = world.home.root().to_path_buf();
    let waiting = standby_cgroups(&world.home);
    drop(std::mem::replace(
        &mut world.sandbox,
        ProcessSandbox::with_agent(&world.home, agent()).unwrap(),
    ));
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left under the instances root: {left:?}");
    for dir in &waiting {
        assert!(
            !dir.exists(),
            "the standby's cgroup {} is left",
            dir.display()
        );
    }
    let loops: Vec<_> = loopdev::attached()
        .into_iter()
        .filter(|(_, backing)| backing.starts_with(&home))
        .collect();
    assert!(loops.is_empty(), "loop devices left: {loops:?}");
    let needle = home.to_string_lossy().into_owned();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(!cmdline.contains(&needle), "process left: {cmdline}");
    }
}

/// A standby whose agent died while waiting is not used: the start prepares a sandbox of its
/// own and succeeds.
#[test]
fn a_standby_whose_agent_died_is_passed_over() {
    if !is_root() {
        return;
    }
    let (world, _root, standby_dir, pid) = world_with_a_standby();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}/stat")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "the agent did not die");
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(50));

    let (spec, _) = world.spec("fallback", "exec httpd -f -p 9000 -h /www", 30_000);
    let instance = world
        .sandbox
        .start(spec.clone())
        .expect("the instance starts");
    assert_eq!(
        instance.start_info().note,
        None,
        "not from the dead standby"
    );
    let reply = http_get(instance.as_ref(), "/index.html");
    assert!(reply.ends_with("hello from busybox\n"), "{reply}");
    assert!(!standby_dir.exists(), "the dead standby was released");
    instance.stop().unwrap();
    world.assert_nothing_left(&spec);
}

/// A service's sandbox keeps an image's rootfs device after its last instance, and the next
/// instance of the image uses the same one; dropping the sandbox detaches it.
#[test]
fn a_service_keeps_the_rootfs_device_for_the_next_instance() {
    if !is_root() {
        return;
    }
    let mut world = World::new();
    world.sandbox = ProcessSandbox::with_agent(&world.home, agent())
        .unwrap()
        .keeping_rootfs_devices(2);
    let rootfs_loops = |world: &World| {
        loopdev::attached()
            .into_iter()
            .filter(|(_, backing)| backing == &world.rootfs)
            .map(|(device, _)| device)
            .collect::<Vec<_>>()
    };
    let mut seen = Vec::new();
    for id in ["kept-1", "kept-2"] {
        let (spec, _) = world.spec(id, "exec httpd -f -p 9000 -h /www", 30_000);
        let instance = world
            .sandbox
            .start(spec.clone())
            .expect("the instance starts");
        let reply = http_get(instance.as_ref(), "/index.html");
        assert!(reply.ends_with("hello from busybox\n"), "{reply}");
        instance.stop().unwrap();
        instance.wait_exit();
        assert!(!spec.instance_dir.exists());
        seen.push(rootfs_loops(&world));
    }
    assert_eq!(seen[0].len(), 1, "kept after the first instance: {seen:?}");
    assert_eq!(seen[0], seen[1], "the second instance used the same device");
    assert_eq!(world.sandbox.rootfs.kept(), 1);
    drop(std::mem::replace(
        &mut world.sandbox,
        ProcessSandbox::with_agent(&world.home, agent()).unwrap(),
    ));
    assert!(rootfs_loops(&world).is_empty(), "detached with the sandbox");
}

/// A standby taken the moment it is ready — its agent may still be binding its ports and
/// mounting its writable layer while its directory is renamed — serves all the same.
#[test]
fn a_standby_taken_while_its_agent_comes_up_serves() {
    if !is_root() {
        return;
    }
    let mut world = World::new();
    world.sandbox = ProcessSandbox::with_agent(&world.home, agent())
        .unwrap()
        .with_standby_sandboxes(1)
        .unwrap();
    for round in 0..5 {
        wait_ready(&world.sandbox, 1);
        let (spec, _) = world.spec(
            &format!("early-{round}"),
            "exec httpd -f -p 9000 -h /www",
            30_000,
        );
        let instance = world
            .sandbox
            .start(spec.clone())
            .expect("the instance starts");
        assert_eq!(
            instance.start_info().note.as_deref(),
            Some("from a standby sandbox")
        );
        let reply = http_get(instance.as_ref(), "/index.html");
        assert!(reply.ends_with("hello from busybox\n"), "{reply}");
        instance.stop().unwrap();
        instance.wait_exit();
        world.assert_nothing_left(&spec);
    }
}

/// A standby of a service that died is an orphan like its instances: the next start's
/// clean-up kills its agent and removes its cgroup and directory.
#[test]
fn the_standby_of_a_dead_service_is_cleaned_up_like_an_instance() {
    use crate::sandbox::instance::record::{InstanceRecord, ProcessId};
    if !is_root() {
        return;
    }
    let (world, _root, standby_dir, _pid) = world_with_a_standby();
    let cgroups = standby_cgroups(&world.home);
    let mut record = InstanceRecord::load(&standby_dir).unwrap();
    let agent = record.sandbox.unwrap();
    // Its owner is now a process that has ended.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let gone_id = ProcessId::of(gone.id() as i32);
    gone.wait().unwrap();
    record.owner = gone_id.or(Some(ProcessId {
        pid: i32::MAX,
        start_time: 0,
    }));
    record.save(&standby_dir).unwrap();
    let report = crate::sandbox::cleanup_orphans(&world.home).unwrap();
    assert_eq!((report.instances, report.processes), (1, 1), "{report:?}");
    assert!(!agent.is_alive());
    assert!(!standby_dir.exists());
    for dir in &cgroups {
        assert!(
            !dir.exists(),
            "the standby's cgroup {} is left",
            dir.display()
        );
    }
}
