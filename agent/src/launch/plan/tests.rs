use super::*;
use crate::launch::capabilities::KEPT_CAPABILITIES;
use crate::launch::env::DEFAULT_PATH;
use crate::launch::filesystems::DEVICES;

fn user() -> ResolvedUser {
    ResolvedUser {
        uid: 1000,
        gid: 1000,
        groups: vec![4],
        home: "/home/app".into(),
    }
}

fn plan(argv: &[&str], env: &[&str], working_dir: &str) -> Result<Plan, LaunchError> {
    let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
    let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
    let user = user();
    Plan::new(&Command {
        root: Path::new("/mnt/root"),
        argv: &argv,
        env: &env,
        working_dir,
        user: &user,
        stdout: 10,
        stderr: 11,
    })
}

/// The C string of a step target.
fn targets(plan: &Plan) -> Vec<&std::ffi::CStr> {
    plan.steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Mount { target, .. } => Some(target.as_c_str()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_bare_command_is_looked_up_in_the_functions_path() {
    let p = plan(&["httpd", "-f"], &["PATH=/usr/bin:/bin/"], "/").unwrap();
    assert_eq!(
        p.exec.candidates,
        [c"/usr/bin/httpd".to_owned(), c"/bin/httpd".to_owned()]
    );
    let p = plan(&["httpd"], &[], "/").unwrap();
    assert_eq!(p.exec.candidates.len(), DEFAULT_PATH.split(':').count());
    let p = plan(&["./run.sh"], &["PATH=/x"], "/").unwrap();
    assert_eq!(p.exec.candidates, [c"./run.sh".to_owned()]);
}

#[test]
fn mounts_target_the_new_root_and_nothing_of_the_agent() {
    let p = plan(&["/bin/sh"], &[], "/srv/app").unwrap();
    let targets = targets(&p);
    assert!(targets.contains(&c"/mnt/root/proc"));
    assert!(targets.contains(&c"/mnt/root/dev/null"));
    assert!(targets.contains(&c"/mnt/root/sys"));
    assert!(
        targets
            .iter()
            .all(|t| t.to_bytes().starts_with(b"/mnt/root/")),
        "{targets:?}"
    );
    // The working directory is created one component at a time after pivot_root.
    let pivot = p
        .steps
        .iter()
        .position(|s| matches!(s.op, Op::PivotRoot { .. }))
        .unwrap();
    let mkdirs: Vec<_> = p.steps[pivot..]
        .iter()
        .filter_map(|s| match &s.op {
            Op::Mkdir { path, .. } => Some(path.to_str().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(mkdirs, ["/tmp", "/srv", "/srv/app"]);
}

#[test]
fn no_file_system_the_function_gets_honours_device_nodes_but_devpts_and_it_cannot_make_any() {
    let p = plan(&["/bin/sh"], &[], "/").unwrap();
    let mut fresh = Vec::new();
    for step in &p.steps {
        if let Op::Mount {
            fstype: Some(fstype),
            flags,
            target,
            ..
        } = &step.op
        {
            // New file systems (not binds or remounts): only devpts serves device nodes,
            // its own ptys, and devpts has no mknod.
            if fstype.to_bytes() != b"devpts" {
                assert!(
                    flags & libc::MS_NODEV != 0,
                    "{target:?} ({fstype:?}) lacks nodev"
                );
            }
            fresh.push(target.to_str().unwrap().to_string());
        }
    }
    assert!(fresh.contains(&"/mnt/root/dev".to_string()), "{fresh:?}");
    // The bound nodes are exactly the standard ones.
    let binds: Vec<_> = p
        .steps
        .iter()
        .filter_map(|s| match &s.op {
            Op::Mount {
                source: Some(source),
                fstype: None,
                ..
            } if source.to_bytes().starts_with(b"/dev/") => Some(source.to_str().unwrap()),
            _ => None,
        })
        .collect();
    for bind in &binds {
        let name = bind.trim_start_matches("/dev/");
        assert!(
            DEVICES.contains(&name),
            "{bind} is bound into the function's /dev"
        );
    }
    const CAP_MKNOD: u32 = 27;
    assert!(!KEPT_CAPABILITIES.contains(&CAP_MKNOD));
    const CAP_NET_RAW: u32 = 13;
    assert!(!KEPT_CAPABILITIES.contains(&CAP_NET_RAW));
}

#[test]
fn bad_commands_are_refused_before_clone() {
    let err = |argv: &[&str], dir| plan(argv, &[], dir).err().unwrap().to_string();
    assert!(err(&[], "/").contains("empty"));
    assert!(plan(&[""], &[], "/").is_err());
    assert!(err(&["a\0b"], "/").contains("NUL"));
    assert!(err(&["sh"], "relative").contains("absolute"));
}

#[test]
fn exec_failures_read_like_an_oci_runtimes() {
    let none = |_: &str| false;
    let all = |_: &str| true;
    let m = exec_failure("httpd", Some("/bin"), libc::ENOENT, none).to_string();
    assert!(m.contains("\"httpd\" not found in $PATH (/bin)"), "{m}");
    let m = exec_failure("/app/run", None, libc::ENOENT, all).to_string();
    assert!(m.contains("interpreter"), "{m}");
    let m = exec_failure("/app/run", None, libc::ENOENT, none).to_string();
    assert!(m.contains("does not exist"), "{m}");
    let m = exec_failure("/app/run", None, libc::EACCES, none).to_string();
    assert!(m.contains("Permission denied"), "{m}");
}

#[test]
fn the_seccomp_filter_goes_on_while_privileged_after_the_root_is_set_up() {
    let p = plan(&["/bin/sh"], &[], "/srv/app").unwrap();
    let at = |want: fn(&Op) -> bool| p.steps.iter().position(|s| want(&s.op)).unwrap();
    let seccomp = at(|op| matches!(op, Op::Seccomp(_)));
    // mount, pivot_root and sethostname are not in Docker's profile: all before it.
    let last_mount = p
        .steps
        .iter()
        .rposition(|s| matches!(s.op, Op::Mount { .. }))
        .unwrap();
    assert!(last_mount < seccomp);
    assert!(at(|op| matches!(op, Op::PivotRoot { .. })) < seccomp);
    assert!(at(|op| matches!(op, Op::SetHostname { .. })) < seccomp);
    // Without no_new_privs it needs CAP_SYS_ADMIN: before the capabilities and the user go.
    assert_eq!(seccomp + 1, at(|op| matches!(op, Op::DropCapabilities)));
    assert!(seccomp < at(|op| matches!(op, Op::SetUid(_))));
    assert_eq!(
        p.steps
            .iter()
            .filter(|s| matches!(s.op, Op::Seccomp(_)))
            .count(),
        1
    );
}
