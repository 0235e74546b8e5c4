//! The function's seccomp filter: Docker's default profile, so that a function meets the same
//! kernel surface it would in a Docker container, and not the whole of it. Capabilities decide
//! what root may do; the filter decides which system calls anyone in the function may make at
//! all: keyrings (`add_key`, `keyctl`), new namespaces (`unshare`, clone with CLONE_NEW*), BPF,
//! perf events, userfaultfd, io_uring, kernel modules, ... fail with EPERM even where no
//! capability would be needed. [`profile`] holds the lists as upstream writes them (and pins the
//! version); this module resolves them for the capabilities the function keeps and compiles
//! them with `seccompiler`.
//!
//! **Both sandboxes.** The agent launches the function the same way in a VM guest and in the
//! process sandbox, and so does the filter: in the process sandbox it narrows the host kernel a
//! function can reach (the one boundary there); in a VM it narrows the guest kernel, the first of
//! two boundaries, and a function behaves the same in both. It applies to the function and
//! everything it starts (filters are inherited and cannot be removed); the agent itself and its
//! threads are not filtered: it installs the filter only in the child it clones for the function.
//!
//! **How it is resolved.** As Docker does for a container's capability set: a group with
//! `includes.caps` counts only if the function keeps that capability, one with
//! `excludes.caps` only if it does not. With fnvm's set (Docker's without MKNOD and NET_RAW,
//! see [`super::capabilities`]) that leaves chroot (CAP_SYS_CHROOT) and nothing else of the
//! capability groups; clone only without namespace flags; clone3 failing with ENOSYS.
//! Arguments are compared as the kernel reads them: socket's family and personality's persona
//! are 32-bit, and clone uses the low 32 bits of its flags, so the filter compares those 32 bits
//! (libseccomp, as Docker uses it, compares all 64, which lets `socket(0x1_0000_0028, ..)` —
//! AF_VSOCK to the kernel — past the `family > 40` rule; here it is refused).
//!
//! **Two filters.** seccompiler gives a filter one action for a match and one for the rest,
//! and the profile has three outcomes (allow, EPERM, clone3's ENOSYS). The function gets two
//! stacked filters: the profile (EPERM for the rest; clone3 allowed there) and one that returns
//! ENOSYS for clone3. The kernel runs both and takes the stricter answer, so clone3 gets
//! ENOSYS, and `/proc/PID/status` shows `Seccomp: 2` and `Seccomp_filters: 2`.
//!
//! **x86-64 only.** The filter checks the architecture first and kills the process for any
//! other: a 32-bit program, or `int 0x80` from a 64-bit one (i386 system call numbers would
//! otherwise reach x86-64 rules). Docker also builds i386 and x32 variants of its lists;
//! seccompiler builds one architecture per filter, and fnvm runs x86-64 images only. x32 calls
//! (numbers with bit 30 set) match no rule and fail with EPERM.
//!
//! **When it is installed.** In the clone(2)d child after its file systems, root and hostname
//! are set up (mount, pivot_root and sethostname are not in the profile) and *before* the
//! capabilities are dropped and the user is set, without `no_new_privs`: the order runc uses
//! for Docker. Installing a filter without `no_new_privs` needs CAP_SYS_ADMIN, which the child
//! still has then; and without `no_new_privs` setuid and file-capability programs in the image
//! (su, sudo, ping on older images) keep working for a non-root user, as they do under Docker.
//! (The filter cannot be used to fool a setuid program: nothing the function execs can shed it,
//! and it only ever refuses calls.) Everything the child does after it — capget/capset, prctl,
//! setgroups, setgid, setuid, open, dup2, signals, close_range, execve, and the report's write
//! and exit — is in the profile (a unit test checks).

mod profile;
mod x86_64;

use std::collections::{BTreeMap, HashMap};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::sys::check_syscall;

/// Why the filter could not be built (a fault of the agent's, never of the function's).
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The profile names a system call that is neither in the x86-64 table nor known to be
    /// missing from it.
    #[error("the seccomp profile names {0:?}, which is no x86-64 system call the agent knows")]
    UnknownSyscall(&'static str),
    /// seccompiler refused the rules.
    #[error("cannot compile the seccomp filter: {0}")]
    Compile(#[from] seccompiler::BackendError),
}

/// One comparison of an argument's low 32 bits (as the kernel reads the arguments compared).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Check {
    Eq(u64),
    Lt(u64),
    Gt(u64),
    /// None of these bits set.
    NoneOf(u64),
}

impl Check {
    #[cfg(test)]
    fn holds(self, arg: u64) -> bool {
        let arg = arg & 0xffff_ffff;
        match self {
            Check::Eq(v) => arg == v,
            Check::Lt(v) => arg < v,
            Check::Gt(v) => arg > v,
            Check::NoneOf(mask) => arg & mask == 0,
        }
    }

    fn condition(self, index: u8) -> Result<SeccompCondition, SeccompError> {
        let (op, value) = match self {
            Check::Eq(v) => (SeccompCmpOp::Eq, v),
            Check::Lt(v) => (SeccompCmpOp::Lt, v),
            Check::Gt(v) => (SeccompCmpOp::Gt, v),
            Check::NoneOf(mask) => (SeccompCmpOp::MaskedEq(mask), 0),
        };
        Ok(SeccompCondition::new(
            index,
            SeccompCmpArgLen::Dword,
            op,
            value,
        )?)
    }
}

/// When one system call is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Rule {
    Always,
    /// When any of these (argument index, check) holds.
    AnyOf(Vec<(u8, Check)>),
}

/// What the function's filters answer to one call.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    Allow,
    Errno(u32),
}

/// Docker's profile resolved for one capability set: what is allowed, by system call number.
#[derive(Debug, Default)]
pub(super) struct Profile {
    allowed: BTreeMap<i64, Rule>,
    /// Calls that fail with ENOSYS (clone3 without CAP_SYS_ADMIN).
    enosys: Vec<i64>,
}

impl Profile {
    /// Docker's default profile for a function that keeps the capabilities `kept` (numbers).
    pub(super) fn docker_default(kept: &[u32]) -> Result<Profile, SeccompError> {
        let keeps = |cap: u32| kept.contains(&cap);
        let mut p = Resolving {
            numbers: Numbers::new(),
            profile: Profile::default(),
        };
        let unconditional = [
            profile::ALLOWED,
            profile::ALLOWED_SINCE_4_8,
            profile::ALLOWED_ON_AMD64,
        ];
        for name in unconditional.into_iter().flatten() {
            p.always(name)?;
        }
        for (cap, names) in profile::BY_CAPABILITY {
            if keeps(*cap) {
                for name in *names {
                    p.always(name)?;
                }
            }
        }
        let (below, between, above) = profile::SOCKET_FAMILIES;
        p.when("socket", 0, Check::Lt(below))?;
        p.when("socket", 0, Check::Eq(between))?;
        p.when("socket", 0, Check::Gt(above))?;
        for persona in profile::PERSONALITIES {
            p.when("personality", 0, Check::Eq(*persona))?;
        }
        if !keeps(profile::CAP_SYS_ADMIN) {
            p.when("clone", 0, Check::NoneOf(profile::CLONE_NAMESPACE_FLAGS))?;
            if let Some(nr) = p.numbers.get("clone3")? {
                p.profile.enosys.push(nr);
            }
        }
        Ok(p.profile)
    }

    /// What the filters answer to system call `nr` with `args`, read from the rules (the
    /// tests check the compiled filters against it in the kernel).
    #[cfg(test)]
    pub(super) fn verdict(&self, nr: i64, args: [u64; 6]) -> Verdict {
        if self.enosys.contains(&nr) {
            return Verdict::Errno(profile::CLONE3_ERRNO);
        }
        let allowed = match self.allowed.get(&nr) {
            Some(Rule::Always) => true,
            Some(Rule::AnyOf(checks)) => checks
                .iter()
                .any(|(index, check)| check.holds(args[usize::from(*index)])),
            None => false,
        };
        if allowed {
            Verdict::Allow
        } else {
            Verdict::Errno(profile::DEFAULT_ERRNO)
        }
    }

    /// The BPF programs, in the order they are installed.
    pub(super) fn compile(&self) -> Result<Filters, SeccompError> {
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (nr, rule) in &self.allowed {
            let chain = match rule {
                Rule::Always => Vec::new(),
                Rule::AnyOf(checks) => checks
                    .iter()
                    .map(|(index, check)| Ok(SeccompRule::new(vec![check.condition(*index)?])?))
                    .collect::<Result<_, SeccompError>>()?,
            };
            rules.insert(*nr, chain);
        }
        // The second filter decides these; the first lets them through to it.
        for nr in &self.enosys {
            rules.insert(*nr, Vec::new());
        }
        let mut programs = vec![program(
            rules,
            SeccompAction::Errno(profile::DEFAULT_ERRNO),
            SeccompAction::Allow,
        )?];
        if !self.enosys.is_empty() {
            let enosys = self.enosys.iter().map(|nr| (*nr, Vec::new())).collect();
            programs.push(program(
                enosys,
                SeccompAction::Allow,
                SeccompAction::Errno(profile::CLONE3_ERRNO),
            )?);
        }
        Ok(Filters { programs })
    }
}

/// A profile being resolved from names.
struct Resolving {
    numbers: Numbers,
    profile: Profile,
}

impl Resolving {
    fn always(&mut self, name: &'static str) -> Result<(), SeccompError> {
        if let Some(nr) = self.numbers.get(name)? {
            self.profile.allowed.insert(nr, Rule::Always);
        }
        Ok(())
    }

    /// Allows `name` when `check` holds for argument `index`, unless it is allowed always.
    fn when(&mut self, name: &'static str, index: u8, check: Check) -> Result<(), SeccompError> {
        if let Some(nr) = self.numbers.get(name)? {
            let rule = self
                .profile
                .allowed
                .entry(nr)
                .or_insert_with(|| Rule::AnyOf(Vec::new()));
            if let Rule::AnyOf(checks) = rule {
                checks.push((index, check));
            }
        }
        Ok(())
    }
}

/// The x86-64 numbers by name (a map: some 400 names are looked up per start).
pub(super) struct Numbers(HashMap<&'static str, i64>);

impl Numbers {
    pub(super) fn new() -> Numbers {
        Numbers(x86_64::SYSCALLS.iter().copied().collect())
    }

    /// The number of system call `name` on x86-64; None for a name upstream lists that
    /// x86-64 does not have.
    pub(super) fn get(&self, name: &'static str) -> Result<Option<i64>, SeccompError> {
        if let Some(nr) = self.0.get(name) {
            return Ok(Some(*nr));
        }
        if profile::NOT_ON_X86_64.contains(&name) {
            return Ok(None);
        }
        Err(SeccompError::UnknownSyscall(name))
    }
}

fn program(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    rest: SeccompAction,
    matched: SeccompAction,
) -> Result<Vec<libc::sock_filter>, SeccompError> {
    let filter = SeccompFilter::new(rules, rest, matched, TargetArch::x86_64)?;
    let bpf: BpfProgram = filter.try_into()?;
    Ok(bpf
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect())
}

/// The compiled filters, made before clone(2) so that the child only hands them to the kernel.
pub(super) struct Filters {
    programs: Vec<Vec<libc::sock_filter>>,
}

impl Filters {
    /// Docker's default profile for the capabilities a function keeps, compiled.
    pub(super) fn for_function() -> Result<Filters, SeccompError> {
        Profile::docker_default(super::capabilities::KEPT_CAPABILITIES)?.compile()
    }

    /// The programs' lengths in instructions (each at most the kernel's 4096).
    #[cfg(test)]
    pub(super) fn lengths(&self) -> Vec<usize> {
        self.programs.iter().map(Vec::len).collect()
    }

    /// Installs every filter on the calling thread, without `no_new_privs` (the caller needs
    /// CAP_SYS_ADMIN, see the module's notes). Runs in the clone(2)d child: system calls on
    /// memory prepared before the clone only; Err is the errno.
    pub(super) fn install(&self) -> Result<(), i32> {
        for program in &self.programs {
            let fprog = libc::sock_fprog {
                // At most 4096 instructions: seccompiler refuses longer programs.
                len: program.len() as u16,
                filter: program.as_ptr().cast_mut(),
            };
            // SAFETY: seccomp(2) reads `len` instructions from `filter`, which points into a
            // live Vec of exactly that length, and copies them; it writes nothing of ours.
            check_syscall(unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &fprog as *const libc::sock_fprog,
                )
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
