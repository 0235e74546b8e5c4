//! The system calls each kind of `fnvm-vmm` thread may make: allow-lists, nothing else.
//!
//! Where the lists come from: what the code on each thread calls (std, glibc and the rust-vmm
//! crates underneath), checked by running every test of this crate and the Linux-guest tests
//! under the filters (a call that is missing stops the VMM with a line naming its number, see
//! [`super::violation`]). Arguments are narrowed where that is cheap and closes a door:
//! `ioctl` only with KVM's and the terminal's request types (and FICLONE on the VMM thread),
//! `clone` only for threads (never
//! a new process, namespace or fs context), `socket` only `AF_UNIX`, `tgkill` only in this
//! process, `mprotect`/`mmap` never executable. `clone3` fails with ENOSYS so glibc falls back
//! to `clone`, whose flags a filter can see (Docker's profile does the same).
//!
//! The vCPU threads run device models too (MMIO and port accesses are handled on the exiting
//! vCPU), so their list has the device I/O calls, but nothing that opens, creates, binds,
//! accepts or connects: those happen on the VMM thread (the event loop, the API, snapshots).

use std::collections::BTreeMap;

use seccompiler::{
    SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::ConfineError;

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once the VM runs: the event loop, the devices' host side, the API
    /// server, snapshots (and the short-lived threads it starts, which inherit its filter).
    Vmm,
    /// A vCPU thread: KVM_RUN and the device models' guest side.
    Vcpu,
}

/// Calls every thread needs: memory, locks, time, signals, thread exit, plain fd I/O.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    // Device models' sockets: vsock streams and the passt stream, already connected.
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    // The host's view of the process, for metrics (rusage, resident pages of guest memory).
    libc::SYS_getrusage,
    libc::SYS_mincore,
];

/// What only the VMM thread does: files (snapshots, sockets' paths), listening and
/// connecting Unix sockets, eventfds, and starting threads.
const VMM_ONLY: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdirat,
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_unlinkat,
    libc::SYS_unlink,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_rename,
    libc::SYS_getdents64,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_copy_file_range,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_socketpair,
    libc::SYS_eventfd2,
    // Timers on the event loop: `--stop-after`, and the grace after a guest's panic banner.
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_epoll_create1,
    libc::SYS_pipe2,
    libc::SYS_dup,
    libc::SYS_fchmod,
    libc::SYS_umask,
    libc::SYS_sysinfo,
    libc::SYS_uname,
    libc::SYS_prctl,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prlimit64,
    // Allowed here only to be answered ENOSYS by [`clone3_filter`] (a trap would win).
    libc::SYS_clone3,
];

/// `_IOC_TYPE` of KVM's ioctls (`KVMIO`) and of the terminal's (`'T'`: TCGETS, TCSETS,
/// TIOCGWINSZ, FIONBIO, ...).
const KVMIO: u64 = 0xae;
const TERMINAL: u64 = 0x54;
/// `FICLONE` (`_IOW(0x94, 9, int)`): a reflink copy of a whole file.
const FICLONE: u64 = 0x4004_9409;

/// The allow-list of `kind`'s threads as a seccompiler filter; calls outside it trap
/// (SIGSYS, reported by [`super::violation`]). `pid` is this process (tgkill's target).
pub fn filter(kind: ThreadKind, pid: u32) -> Result<SeccompFilter, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let lists: &[&[i64]] = match kind {
        ThreadKind::Vmm => &[COMMON, VMM_ONLY],
        ThreadKind::Vcpu => &[COMMON],
    };
    for nr in lists.iter().flat_map(|l| l.iter()) {
        rules.insert(*nr, Vec::new());
    }
    let cond = |arg: u8, len: Len, op: Op, value: u64| {
        Cond::new(arg, len, op, value).map_err(ConfineError::Filter)
    };
    let rule = |conds: Vec<Cond>| SeccompRule::new(conds).map_err(ConfineError::Filter);
    // ioctl(fd, request): KVM's and the terminal's request types only.
    let ioctl_type = |t: u64| -> Result<SeccompRule, ConfineError> {
        rule(vec![cond(1, Len::Dword, Op::MaskedEq(0xff00), t << 8)?])
    };
    let mut ioctls = vec![ioctl_type(KVMIO)?, ioctl_type(TERMINAL)?];
    if kind == ThreadKind::Vmm {
        // A snapshot's copy of a writable disk is a reflink where the filesystem can.
        ioctls.push(rule(vec![cond(1, Len::Dword, Op::Eq, FICLONE)?])?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    // tgkill(tgid, tid, sig): the kick of a vCPU thread, only inside this process.
    rules.insert(
        libc::SYS_tgkill,
        vec![rule(vec![cond(0, Len::Dword, Op::Eq, u64::from(pid))?])?],
    );
    // Memory is mapped and protected, never made executable in the VMM.
    let not_exec = |arg: u8| -> Result<Vec<SeccompRule>, ConfineError> {
        Ok(vec![rule(vec![cond(
            arg,
            Len::Dword,
            Op::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    rules.insert(libc::SYS_mmap, not_exec(2)?);
    rules.insert(libc::SYS_mprotect, not_exec(2)?);
    if kind == ThreadKind::Vmm {
        // clone(flags, ...): threads only (CLONE_THREAD), never new namespaces.
        let namespaces = (libc::CLONE_NEWNS
            | libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
            | libc::CLONE_NEWCGROUP) as u64;
        rules.insert(
            libc::SYS_clone,
            vec![rule(vec![
                cond(
                    0,
                    Len::Qword,
                    Op::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )?,
                cond(0, Len::Qword, Op::MaskedEq(namespaces), 0)?,
            ])?],
        );
        // socket(domain, ...): Unix sockets only (vsock connections to host programs).
        rules.insert(
            libc::SYS_socket,
            vec![rule(vec![cond(
                0,
                Len::Dword,
                Op::Eq,
                libc::AF_UNIX as u64,
            )?])?],
        );
    }
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(ConfineError::Filter)
}

/// The VMM thread's second filter: clone3 fails with ENOSYS, everything else is left to the
/// allow-list. (seccompiler gives a filter one match action; stacked filters give the
/// strictest answer of all, and ENOSYS beats the allow-list's "allow" for clone3.)
pub fn clone3_filter() -> Result<SeccompFilter, ConfineError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(ConfineError::Filter)
}
