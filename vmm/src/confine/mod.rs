//! How `fnvm-vmm` confines itself before the guest runs, so that a guest that takes over a
//! device model (the VMM code a guest drives) gains little: its jail ([`jail`]), an
//! unprivileged uid and gid if given, every capability dropped (and the bounding set emptied,
//! so nothing can regain one), `no_new_privs`, and a seccomp allow-list
//! per thread kind ([`filters`]), installed by each thread itself as the VM starts. A call
//! outside its thread's list stops the VMM with one line naming the thread and the call
//! ([`violation`]), and exit code [`crate::exit::code::SECCOMP_VIOLATION`].
//!
//! Why the VMM does it to itself rather than only a jailer around it: seccomp filters and
//! capabilities are per thread, and only the VMM knows its threads. The process around it
//! (namespaces, cgroup) is fnvm's job when it spawns the VMM.
//!
//! The filters are compiled once, before any thread runs guest code: installing one is then
//! one `seccomp(2)` call with no allocation.

pub mod filters;
pub mod jail;
pub mod violation;

use std::io;

use seccompiler::{BpfProgram, SeccompFilter};

pub use filters::ThreadKind;
pub use jail::Jail;

/// Why the VMM could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// A filter's rules do not compile (a bug in the allow-lists).
    #[error("cannot build the seccomp filter: {0}")]
    Filter(seccompiler::BackendError),
    /// A compiled filter could not be turned into BPF.
    #[error("cannot compile the seccomp filter: {0}")]
    Compile(seccompiler::BackendError),
    /// The kernel refused a filter.
    #[error("cannot install the seccomp filter of a {kind:?} thread: {source}")]
    Install {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
    /// The capabilities could not be dropped.
    #[error("cannot drop the VMM's capabilities: {0}")]
    Capabilities(io::Error),
    /// The VMM could not switch to its unprivileged uid and gid (`--uid`).
    #[error("cannot become uid {uid} gid {gid}: {source}")]
    Identity {
        uid: u32,
        gid: u32,
        source: io::Error,
    },
    /// The SIGSYS handler that reports violations could not be installed.
    #[error("cannot install the seccomp violation handler: {0}")]
    Handler(io::Error),
    /// A directory asked for in the jail cannot be one.
    #[error("jail directory {}: {why}", dir.display())]
    JailDir {
        dir: std::path::PathBuf,
        why: String,
    },
    /// A step of entering the jail failed.
    #[error("cannot enter the jail: {step}: {source}")]
    Jail { step: String, source: io::Error },
}

/// The compiled filters of a VMM's threads, and its jail if it has one.
pub struct Confinement {
    vmm: BpfProgram,
    clone3: BpfProgram,
    vcpu: BpfProgram,
    jail: Option<Jail>,
    /// The uid and gid to become (None: stay uid 0, without capabilities).
    identity: Option<(u32, u32)>,
}

impl Confinement {
    /// Compiles every thread's filter for this process.
    pub fn new() -> Result<Confinement, ConfineError> {
        let pid = std::process::id();
        let compile = |f: SeccompFilter| BpfProgram::try_from(f).map_err(ConfineError::Compile);
        Ok(Confinement {
            vmm: compile(filters::filter(ThreadKind::Vmm, pid)?)?,
            clone3: compile(filters::clone3_filter()?)?,
            vcpu: compile(filters::filter(ThreadKind::Vcpu, pid)?)?,
            jail: None,
            identity: None,
        })
    }

    /// Also moves the process into `jail` as the VM starts (before anything else here).
    pub fn with_jail(mut self, jail: Jail) -> Confinement {
        self.jail = Some(jail);
        self
    }

    /// Also becomes `uid`:`gid` (no supplementary groups) as capabilities are dropped.
    pub fn with_identity(mut self, uid: u32, gid: u32) -> Confinement {
        self.identity = Some((uid, gid));
        self
    }

    /// Enters the jail, if there is one: on the main thread before any other thread exists.
    pub fn enter_jail(&self) -> Result<(), ConfineError> {
        match &self.jail {
            Some(jail) => jail.enter(),
            None => Ok(()),
        }
    }

    /// Drops every capability of the calling thread and of the threads it starts afterwards:
    /// called on the main thread before any other thread exists.
    pub fn drop_capabilities(&self) -> Result<(), ConfineError> {
        drop_capabilities(self.identity)
    }

    /// Confines the calling thread as a `kind` thread named `name` (in violation reports):
    /// `no_new_privs` and its filter. Irreversible for the thread and the threads it starts.
    pub fn enter(&self, kind: ThreadKind, name: &str) -> Result<(), ConfineError> {
        violation::install_handler().map_err(ConfineError::Handler)?;
        violation::name_thread(name);
        let install = |prog: &BpfProgram| {
            seccompiler::apply_filter(prog).map_err(|source| ConfineError::Install { kind, source })
        };
        match kind {
            ThreadKind::Vmm => {
                install(&self.clone3)?;
                install(&self.vmm)
            }
            ThreadKind::Vcpu => install(&self.vcpu),
        }
    }
}

/// Empties the bounding and ambient sets (while CAP_SETPCAP is still there), becomes
/// `identity` (while CAP_SETUID/SETGID are; the switch away from uid 0 clears the permitted and
/// effective sets itself), then empties the effective, permitted and inheritable sets.
///
/// The switch is made with raw system calls, not glibc's wrappers: those signal every thread to
/// switch too (POSIX semantics), and here only this thread exists yet; the vCPU threads it
/// starts afterwards inherit its credentials.
fn drop_capabilities(identity: Option<(u32, u32)>) -> Result<(), ConfineError> {
    for cap in 0..64 {
        // SAFETY: prctl with integer arguments only.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc != 0 {
            match io::Error::last_os_error().raw_os_error() {
                // Past the kernel's last capability.
                Some(libc::EINVAL) => break,
                // Not privileged (run by hand as a user): there is nothing to drop.
                Some(libc::EPERM) => break,
                _ => return Err(ConfineError::Capabilities(io::Error::last_os_error())),
            }
        }
    }
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if let Some((uid, gid)) = identity {
        // SAFETY: setgroups with an empty list (a null pointer is allowed for size 0), then
        // setresgid/setresuid with integer arguments; the return values are checked.
        unsafe {
            if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return Err(ConfineError::Identity {
                    uid,
                    gid,
                    source: io::Error::last_os_error(),
                });
            }
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data::default(); 2];
    // SAFETY: capset reads a v3 header and two data structs, all on the stack.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if rc != 0 {
        return Err(ConfineError::Capabilities(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_field(field: &str) -> String {
        let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn every_filter_compiles() {
        Confinement::new().unwrap();
    }

    /// On a thread of its own (filters and capabilities are per thread): the thread shows
    /// as filtered with no capabilities, ordinary calls still work, and the forbidden ones
    /// the filters narrow by argument are refused... by a trap, which would end the test
    /// process; so only allowed calls are made here (fnvm-vmm's tests trigger violations).
    #[test]
    fn a_confined_thread_is_filtered_without_capabilities_and_still_works() {
        let confinement = Confinement::new().unwrap();
        std::thread::spawn(move || {
            confinement.drop_capabilities().unwrap();
            confinement.enter(ThreadKind::Vmm, "test").unwrap();
            assert_eq!(status_field("Seccomp:"), "2");
            assert_eq!(status_field("NoNewPrivs:"), "1");
            assert_eq!(status_field("CapEff:"), "0000000000000000");
            assert_eq!(status_field("CapBnd:"), "0000000000000000");
            // Threads may still be started (clone with CLONE_THREAD, after clone3's ENOSYS).
            let t = std::thread::spawn(|| 7).join().unwrap();
            assert_eq!(t, 7);
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("f"), b"x").unwrap();
        })
        .join()
        .unwrap();
    }
}
