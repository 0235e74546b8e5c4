//! The VMM's jail: as its VM starts, `fnvm-vmm` moves into mount, network, ipc and uts
//! namespaces of its own whose root is an empty read-only tmpfs holding only the directories it
//! was given (bind mounts at their own paths, `nosuid,nodev,noexec`): an instance's directory
//! (its vsock and API sockets, where guest connections to host ports go) and, for a VMM that
//! writes a snapshot, the snapshot's directory. Everything else it needs (kernel, initramfs,
//! disks, /dev/kvm, the passt socket, a snapshot's memory file) it opened before; the host
//! facts it needs later (the boot id, the host's identity for snapshots) are read first too.
//!
//! So a guest that took over the VMM finds no host file system, no host network (a network
//! namespace with nothing in it; its sockets are Unix sockets in its own directory) and no host
//! Unix sockets to connect to beyond its own directory's. Paths stay the same inside, so
//! nothing else in the VMM changes.
//!
//! Why /dev is where the new root is mounted: `pivot_root` needs a mount point that is not
//! above any jailed directory, and /dev exists everywhere and never holds one (a directory
//! under /dev is refused). The host's /dev is only hidden in the VMM's own namespace.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::ConfineError;

/// Where the new root is assembled (see the module header).
const ASSEMBLY: &str = "/dev";

/// What a jail holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Jail {
    /// The directories bound in, at their own paths (absolute, without `.` or `..`).
    dirs: Vec<PathBuf>,
}

impl Jail {
    /// A jail holding `dirs` (read-write), each an existing directory given by an absolute
    /// path without `.` or `..`, not under /dev. Each is bound at the path given (a path
    /// through a symlink included: the VMM finds its files by the paths it was given).
    pub fn new(dirs: &[PathBuf]) -> Result<Jail, ConfineError> {
        let mut checked = Vec::new();
        for dir in dirs {
            let bad = |why: &str| ConfineError::JailDir {
                dir: dir.clone(),
                why: why.to_string(),
            };
            if !dir.is_absolute() {
                return Err(bad("not an absolute path"));
            }
            if dir
                .components()
                .any(|c| matches!(c, Component::CurDir | Component::ParentDir))
            {
                return Err(bad("has . or .. in it"));
            }
            let real = dir
                .canonicalize()
                .map_err(|e| bad(&format!("cannot be resolved: {e}")))?;
            if !real.is_dir() {
                return Err(bad("is not a directory"));
            }
            let under_dev = |p: &Path| p.starts_with(ASSEMBLY);
            if dir == Path::new("/") || real == Path::new("/") || under_dev(dir) || under_dev(&real)
            {
                return Err(bad("is / or lies under /dev"));
            }
            checked.push(dir.clone());
        }
        Ok(Jail { dirs: checked })
    }

    /// The directories the jail holds.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves the calling process into the jail. It must be single-threaded (a thread that
    /// shares its file system context cannot take a new mount namespace) and privileged
    /// (CAP_SYS_ADMIN); irreversible.
    pub fn enter(&self) -> Result<(), ConfineError> {
        // Read what a snapshot needs from the host now: it is out of reach afterwards.
        crate::snapshot::format::current_boot_id();
        crate::snapshot::this_host().map_err(|e| {
            step(
                "reading the host's identity",
                io::Error::other(e.to_string()),
            )
        })?;

        // SAFETY: unshare with namespace flags only.
        check("unshare", unsafe {
            libc::unshare(
                libc::CLONE_NEWNS | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS,
            )
        })?;
        mount(None, "/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
        mount(
            Some("fnvm-vmm"),
            ASSEMBLY,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            Some("size=64k,mode=0755"),
        )?;
        let hidden = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        for dir in &self.dirs {
            let target = Path::new(ASSEMBLY).join(dir.strip_prefix("/").unwrap_or(dir));
            std::fs::create_dir_all(&target)
                .map_err(|e| step(&format!("creating {}", target.display()), e))?;
            let (src, dst) = (path_str(dir)?, path_str(&target)?);
            mount(Some(&src), &dst, None, libc::MS_BIND | libc::MS_REC, None)?;
            mount(
                None,
                &dst,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | hidden,
                None,
            )?;
        }
        let old = format!("{ASSEMBLY}/.old");
        std::fs::create_dir(&old).map_err(|e| step("creating the old root's mount point", e))?;
        let (new_c, old_c) = (cstring(ASSEMBLY)?, cstring(&old)?);
        // SAFETY: pivot_root with two NUL-terminated paths.
        check("pivot_root", unsafe {
            libc::syscall(libc::SYS_pivot_root, new_c.as_ptr(), old_c.as_ptr()) as libc::c_int
        })?;
        // SAFETY: chdir, umount2 and rmdir with static NUL-terminated paths.
        unsafe {
            check("chdir /", libc::chdir(c"/".as_ptr()))?;
            check(
                "unmounting the old root",
                libc::umount2(c"/.old".as_ptr(), libc::MNT_DETACH),
            )?;
            check(
                "removing the old root's mount point",
                libc::rmdir(c"/.old".as_ptr()),
            )?;
        }
        mount(
            None,
            "/",
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | hidden,
            None,
        )?;
        let name = b"fnvm-vmm";
        // SAFETY: sethostname reads `name.len()` bytes of a static buffer.
        check("sethostname", unsafe {
            libc::sethostname(name.as_ptr().cast(), name.len())
        })?;
        Ok(())
    }
}

fn step(what: &str, source: io::Error) -> ConfineError {
    ConfineError::Jail {
        step: what.to_string(),
        source,
    }
}

fn check(what: &str, rc: libc::c_int) -> Result<(), ConfineError> {
    if rc < 0 {
        return Err(step(what, io::Error::last_os_error()));
    }
    Ok(())
}

fn cstring(s: &str) -> Result<CString, ConfineError> {
    CString::new(s).map_err(|_| {
        step(
            "building a path",
            io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"),
        )
    })
}

fn path_str(p: &Path) -> Result<String, ConfineError> {
    std::str::from_utf8(p.as_os_str().as_bytes())
        .map(str::to_string)
        .map_err(|_| {
            step(
                &format!("binding {}", p.display()),
                io::Error::new(io::ErrorKind::InvalidInput, "not UTF-8"),
            )
        })
}

/// mount(2) with optional source, type and data.
fn mount(
    source: Option<&str>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), ConfineError> {
    let what = format!("mounting {target}");
    let source = source.map(cstring).transpose()?;
    let target_c = cstring(target)?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.map(cstring).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: mount with NUL-terminated strings (or null) that live across the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    check(&what, rc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jail_directories_must_be_plain_existing_absolute_directories() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        assert_eq!(
            Jail::new(std::slice::from_ref(&real)).unwrap().dirs(),
            std::slice::from_ref(&real)
        );
        let file = real.join("f");
        std::fs::write(&file, b"").unwrap();
        // A path through a symlink is kept as given (the VMM's other paths use it too).
        let link = real.join("l");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert_eq!(
            Jail::new(std::slice::from_ref(&link)).unwrap().dirs(),
            &[link]
        );
        for (bad, why) in [
            (PathBuf::from("relative"), "absolute"),
            (real.join("..").join("x"), ".."),
            (real.join("missing"), "resolved"),
            (file, "not a directory"),
            (PathBuf::from("/dev/shm"), "/dev"),
            (PathBuf::from("/"), "/dev"),
        ] {
            let err = Jail::new(std::slice::from_ref(&bad))
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{}: {err}", bad.display());
            assert!(
                err.contains(&bad.display().to_string()),
                "names the directory: {err}"
            );
        }
    }
}
