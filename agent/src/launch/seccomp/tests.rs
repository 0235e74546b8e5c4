use std::collections::HashSet;

use super::*;
use crate::launch::capabilities::KEPT_CAPABILITIES;

const EPERM: Verdict = Verdict::Errno(libc::EPERM as u32);
const ENOSYS: Verdict = Verdict::Errno(libc::ENOSYS as u32);

fn function_profile() -> Profile {
    Profile::docker_default(KEPT_CAPABILITIES).unwrap()
}

fn nr(name: &'static str) -> i64 {
    Numbers::new().get(name).unwrap().unwrap()
}

/// The verdict on `name` with its first argument `arg0` (the others 0).
fn on(p: &Profile, name: &'static str, arg0: u64) -> Verdict {
    p.verdict(nr(name), [arg0, 0, 0, 0, 0, 0])
}

fn every_listed_name() -> Vec<&'static str> {
    let mut names: Vec<&str> = [
        profile::ALLOWED,
        profile::ALLOWED_SINCE_4_8,
        profile::ALLOWED_ON_AMD64,
    ]
    .concat();
    for (_, group) in profile::BY_CAPABILITY {
        names.extend_from_slice(group);
    }
    names.extend(["socket", "personality", "clone", "clone3"]);
    names
}

#[test]
fn the_filters_compile_within_the_kernels_limit() {
    let filters = Filters::for_function().unwrap();
    let lengths = filters.lengths();
    assert_eq!(lengths.len(), 2, "the profile and clone3's ENOSYS");
    assert!(lengths.iter().all(|&n| n > 0 && n < 4096), "{lengths:?}");
    // With CAP_SYS_ADMIN clone3 is allowed outright: one filter.
    let admin = [KEPT_CAPABILITIES, &[profile::CAP_SYS_ADMIN]].concat();
    let filters = Profile::docker_default(&admin).unwrap().compile().unwrap();
    assert_eq!(filters.lengths().len(), 1);
}

#[test]
fn every_name_resolves_on_x86_64_or_is_known_to_be_missing_there() {
    for name in every_listed_name() {
        let in_table = x86_64::SYSCALLS.iter().any(|(n, _)| *n == name);
        let missing = profile::NOT_ON_X86_64.contains(&name);
        assert!(
            in_table != missing,
            "{name}: in the table {in_table}, missing {missing}"
        );
    }
    // Every name said to be missing is one upstream lists (no stale entries).
    let listed: HashSet<&str> = every_listed_name().into_iter().collect();
    for name in profile::NOT_ON_X86_64 {
        assert!(listed.contains(name), "{name} is listed nowhere");
    }
    let names: HashSet<&str> = x86_64::SYSCALLS.iter().map(|(n, _)| *n).collect();
    let numbers: HashSet<i64> = x86_64::SYSCALLS.iter().map(|(_, n)| *n).collect();
    assert_eq!(names.len(), x86_64::SYSCALLS.len(), "a name twice");
    assert_eq!(numbers.len(), x86_64::SYSCALLS.len(), "a number twice");
    // Upstream's group sizes, to catch a name lost in transcription.
    assert_eq!(profile::ALLOWED.len(), 361);
    let sizes: Vec<usize> = profile::BY_CAPABILITY
        .iter()
        .map(|(_, g)| g.len())
        .collect();
    assert_eq!(sizes, [1, 26, 1, 1, 3, 1, 6, 2, 4, 1, 4, 1, 1, 1]);
}

#[test]
fn the_numbers_are_the_kernels() {
    for (name, libc_nr) in [
        ("read", libc::SYS_read),
        ("clone", libc::SYS_clone),
        ("clone3", libc::SYS_clone3),
        ("socket", libc::SYS_socket),
        ("personality", libc::SYS_personality),
        ("keyctl", libc::SYS_keyctl),
        ("unshare", libc::SYS_unshare),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("memfd_secret", libc::SYS_memfd_secret),
        ("futex_waitv", libc::SYS_futex_waitv),
        ("set_mempolicy_home_node", libc::SYS_set_mempolicy_home_node),
        ("fchmodat2", libc::SYS_fchmodat2),
        ("mseal", libc::SYS_mseal),
    ] {
        assert_eq!(nr(name), libc_nr, "{name}");
    }
    let header = [
        "/usr/include/x86_64-linux-gnu/asm/unistd_64.h",
        "/usr/include/asm/unistd_64.h",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok());
    let Some(header) = header else {
        eprintln!("SKIPPED (no kernel headers): the_numbers_are_the_kernels against unistd_64.h");
        return;
    };
    let mut checked = 0;
    for line in header.lines() {
        let mut words = line.split_whitespace();
        let (Some("#define"), Some(name), Some(value)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let (Some(name), Ok(value)) = (name.strip_prefix("__NR_"), value.parse::<i64>()) else {
            continue;
        };
        let ours = x86_64::SYSCALLS.iter().find(|(n, _)| *n == name);
        assert_eq!(ours.map(|(_, v)| *v), Some(value), "{name}");
        checked += 1;
    }
    assert!(checked > 300, "only {checked} numbers in the header");
}

#[test]
fn calls_docker_refuses_are_refused_though_no_capability_is_needed_for_them() {
    let p = function_profile();
    for name in [
        "add_key",
        "keyctl",
        "request_key",
        "userfaultfd",
        "io_uring_setup",
        "perf_event_open",
        "bpf",
        "unshare",
        "setns",
        "mount",
        "umount2",
        "pivot_root",
        "sethostname",
        "reboot",
        "kexec_load",
        "init_module",
        "swapon",
        "open_by_handle_at",
        "clock_settime",
        "vhangup",
        "mbind",
        "syslog",
        "acct",
        "iopl",
        "kcmp",
        "lookup_dcookie",
    ] {
        assert_eq!(on(&p, name, 0), EPERM, "{name}");
    }
    // Every x86-64 call the profile never names is refused.
    let listed: HashSet<&str> = every_listed_name().into_iter().collect();
    for (name, number) in x86_64::SYSCALLS {
        if !listed.contains(name) {
            assert_eq!(p.verdict(*number, [0; 6]), EPERM, "{name}");
        }
    }
}

#[test]
fn ordinary_programs_have_what_they_need() {
    let p = function_profile();
    for name in [
        "read",
        "write",
        "openat",
        "mmap",
        "futex",
        "epoll_wait",
        "accept4",
        "bind",
        "listen",
        "getrandom",
        "rseq",
        "execve",
        "fork",
        "vfork",
        "wait4",
        "ptrace",
        "arch_prctl",
        "mknod",
        "setuid",
        "chown",
        "close_range",
        "statx",
        "memfd_create",
        "landlock_create_ruleset",
    ] {
        assert_eq!(on(&p, name, 0), Verdict::Allow, "{name}");
    }
    // CAP_SYS_CHROOT is kept, so chroot is allowed; none of the other capability groups is.
    assert_eq!(on(&p, "chroot", 0), Verdict::Allow);
}

#[test]
fn clone_may_not_make_namespaces_and_clone3_says_enosys() {
    let p = function_profile();
    // glibc's fork and pthread_create.
    let fork = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
    let thread = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM
        | libc::CLONE_SETTLS
        | libc::CLONE_PARENT_SETTID
        | libc::CLONE_CHILD_CLEARTID) as u64;
    assert_eq!(on(&p, "clone", fork), Verdict::Allow);
    assert_eq!(on(&p, "clone", thread), Verdict::Allow);
    for flag in [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWCGROUP,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
    ] {
        assert_eq!(on(&p, "clone", fork | flag as u64), EPERM, "{flag:#x}");
    }
    assert_eq!(on(&p, "clone3", 0), ENOSYS);
    // With CAP_SYS_ADMIN (which no function keeps) both would be allowed, as in Docker.
    let admin = [KEPT_CAPABILITIES, &[profile::CAP_SYS_ADMIN]].concat();
    let admin = Profile::docker_default(&admin).unwrap();
    assert_eq!(
        on(&admin, "clone", libc::CLONE_NEWUSER as u64),
        Verdict::Allow
    );
    assert_eq!(on(&admin, "clone3", 0), Verdict::Allow);
    assert_eq!(on(&admin, "mount", 0), Verdict::Allow);
}

#[test]
fn personality_takes_only_dockers_values() {
    let p = function_profile();
    for persona in [0, 8, 0x2_0000, 0x2_0008, 0xffff_ffff] {
        assert_eq!(
            on(&p, "personality", persona),
            Verdict::Allow,
            "{persona:#x}"
        );
    }
    // ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC: refused.
    for persona in [0x4_0000, 0x40_0000] {
        assert_eq!(on(&p, "personality", persona), EPERM, "{persona:#x}");
    }
}

#[test]
fn sockets_of_every_family_but_alg_and_vsock() {
    let p = function_profile();
    for family in [
        libc::AF_UNIX,
        libc::AF_INET,
        libc::AF_INET6,
        libc::AF_NETLINK,
        39,
        41,
        45,
    ] {
        assert_eq!(on(&p, "socket", family as u64), Verdict::Allow, "{family}");
    }
    for family in [
        libc::AF_ALG as u64,
        libc::AF_VSOCK as u64,
        0x1_0000_0028,
        0x1_0000_0026,
    ] {
        assert_eq!(on(&p, "socket", family), EPERM, "{family:#x}");
    }
}

#[test]
fn what_the_child_does_after_the_filter_is_allowed() {
    let p = function_profile();
    for name in [
        "capget",
        "capset",
        "prctl",
        "setgroups",
        "setgid",
        "setuid",
        "umask",
        "open",
        "openat",
        "dup2",
        "close",
        "rt_sigaction",
        "rt_sigprocmask",
        "close_range",
        "execve",
        "write",
        "exit_group",
        "seccomp",
    ] {
        assert_eq!(on(&p, name, 0), Verdict::Allow, "{name}");
    }
}

/// The compiled filters in a real kernel, in a forked child (with `no_new_privs`, so that the
/// test needs no privilege): each call answers as the profile says.
#[test]
fn the_kernel_applies_the_compiled_filters() {
    let filters = Filters::for_function().unwrap();
    let calls: [(libc::c_long, [u64; 3], i32); 9] = [
        (libc::SYS_getpid, [0; 3], 0),
        (libc::SYS_keyctl, [0, 0, 0], libc::EPERM),
        (
            libc::SYS_unshare,
            [libc::CLONE_NEWUSER as u64, 0, 0],
            libc::EPERM,
        ),
        (libc::SYS_clone3, [0, 0, 0], libc::ENOSYS),
        (
            libc::SYS_socket,
            [libc::AF_VSOCK as u64, libc::SOCK_STREAM as u64, 0],
            libc::EPERM,
        ),
        (
            libc::SYS_socket,
            [0x1_0000_0028, libc::SOCK_STREAM as u64, 0],
            libc::EPERM,
        ),
        (libc::SYS_personality, [0xffff_ffff, 0, 0], 0),
        (libc::SYS_personality, [0x40_0000, 0, 0], libc::EPERM),
        (libc::SYS_userfaultfd, [0, 0, 0], libc::EPERM),
    ];
    // SAFETY: the child of fork() only makes raw system calls on data prepared before it and
    // leaves with _exit, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: prctl with integer arguments, raw system calls with integer arguments (the
        // pointers among them are NULL or refused before the kernel reads them), then _exit.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || filters.install().is_err()
            {
                libc::_exit(100);
            }
            for (i, (call, [a, b, c], want)) in calls.iter().enumerate() {
                let rc = libc::syscall(*call, *a, *b, *c);
                let got = if rc < 0 { *libc::__errno_location() } else { 0 };
                if got != *want {
                    libc::_exit(1 + i as i32);
                }
            }
            libc::_exit(0)
        }
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "status {status:#x}");
    let code = libc::WEXITSTATUS(status);
    assert!(code != 100, "the filter could not be installed");
    assert_eq!(
        code,
        0,
        "call {:?} answered otherwise",
        calls.get(code as usize - 1)
    );
}

/// An i386 system call (`int 0x80`) kills the process instead of reaching x86-64's rules.
#[test]
fn a_32_bit_system_call_kills_the_process() {
    let filters = Filters::for_function().unwrap();
    // SAFETY: as above; the child's int 0x80 asks for i386's getpid (20), which takes no
    // arguments and touches no memory.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || filters.install().is_err()
            {
                libc::_exit(100);
            }
            std::arch::asm!("int 0x80", inout("eax") 20 => _, options(nostack));
            libc::_exit(0)
        }
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child, writing into a local.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
        "status {status:#x}"
    );
}
