//! The capabilities a root function keeps, and the child's step that drops all the others.

use libc::c_ulong;

use super::sys::errno;

/// The capabilities a root function keeps: Docker's default set without MKNOD (Docker keeps
/// it because its devices cgroup makes nodes harmless; a VM guest has no devices cgroup, and a
/// function has no business making device nodes) and without NET_RAW, as Podman's default set
/// is: raw and packet sockets would let a function write frames past the egress rules of its
/// network namespace. (ping still works: the sandbox allows ICMP datagram sockets to every
/// group.) All others leave the bounding set, so nothing it execs can regain them.
pub(super) const KEPT_CAPABILITIES: &[u32] = &[
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    18, // SYS_CHROOT
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// Leaves only [`KEPT_CAPABILITIES`] in the bounding set and clears the inheritable and
/// ambient sets, so neither root nor a setuid/file-capability program gets more. Runs in the
/// clone(2)d child: async-signal-safe calls only; Err is the errno.
pub(super) fn drop_capabilities() -> Result<(), i32> {
    let mut keep: u64 = 0;
    for cap in KEPT_CAPABILITIES {
        keep |= 1 << cap;
    }
    for cap in 0..64u64 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as c_ulong, 0, 0, 0) } < 0
            && errno() != libc::EINVAL
        {
            return Err(errno()); // EINVAL: past the kernel's last capability
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as c_ulong,
            0,
            0,
            0,
        )
    };
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget/capset read and write exactly a v3 header and two data structs, which
    // live on this stack frame.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) < 0 {
            return Err(errno());
        }
        for (i, d) in data.iter_mut().enumerate() {
            let mask = (keep >> (32 * i)) as u32;
            d.effective &= mask;
            d.permitted &= mask;
            d.inheritable = 0;
        }
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) < 0 {
            return Err(errno());
        }
    }
    Ok(())
}
