//! Who a VMM is once its VM runs: not root. Every `fnvm-vmm` the sandbox starts is given
//! `--uid` [`VMM_UID`]:[`VMM_GID`], which it switches to after entering its jail and before its
//! seccomp filters (so it holds no capability and cannot regain one, and nothing it creates is
//! root's). Everything it needs was opened as root before; what it writes afterwards is a
//! snapshot, into the entry directory lent to the uid for that write ([`lend`]) whose
//! directories go back to root as soon as the VMM is done ([`reclaim`]): no VMM can add,
//! remove or rename anything in a snapshot, and none has a snapshot another instance restores
//! from in its jail. The files stay the uid's (mode 0644): changing their owner would change
//! their ctime, which the snapshot's stamp of its memory file records (a restore would then
//! take the file for changed and refuse it).
//!
//! One fixed identity rather than one per instance: a VMM's jail already shows it only its own
//! directories, its filters allow no signal, trace or /proc access to another process, and a
//! process that left root is not dumpable, so another VMM of the same uid cannot attach to it.
//! The uid sits just below the egress uids' range ([`crate::network::uid::UID_BASE`]), in the
//! part of the uid space no distribution hands out.

use std::path::Path;

use crate::sandbox::SandboxError;

/// The uid every VMM runs as once its VM starts.
pub const VMM_UID: u32 = crate::network::uid::UID_BASE - 1;
/// Its gid.
pub const VMM_GID: u32 = VMM_UID;

/// The `fnvm-vmm` arguments that make it leave root for [`VMM_UID`].
pub fn vmm_args() -> [String; 2] {
    ["--uid".to_string(), format!("{VMM_UID}:{VMM_GID}")]
}

/// Lends `dir` (a snapshot entry a booting VMM writes into) to the VMM's uid.
pub fn lend(dir: &Path) -> Result<(), SandboxError> {
    std::os::unix::fs::chown(dir, Some(VMM_UID), Some(VMM_GID)).map_err(|e| {
        SandboxError::setup(
            format!("cannot lend {} to the VMM's uid {VMM_UID}", dir.display()),
            e,
        )
    })
}

/// Gives `dir` and every directory under it back to root (files keep their owner, see the
/// module's header). Symlinks are never followed.
pub fn reclaim(dir: &Path) -> Result<(), SandboxError> {
    let failed = |path: &Path, e: std::io::Error| {
        SandboxError::setup(format!("cannot give {} back to root", path.display()), e)
    };
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path).map_err(|e| failed(&path, e))?;
        if meta.is_dir() {
            std::os::unix::fs::lchown(&path, Some(0), Some(0)).map_err(|e| failed(&path, e))?;
            for entry in std::fs::read_dir(&path).map_err(|e| failed(&path, e))? {
                pending.push(entry.map_err(|e| failed(&path, e))?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_lent_directory_comes_back_to_root_and_its_files_keep_their_stamp() {
        if !is_root() {
            eprintln!("SKIPPED: chown needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("entry");
        std::fs::create_dir(&dir).unwrap();
        lend(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().uid(), VMM_UID);
        // What the VMM would write: a directory with a file, and a symlink out.
        std::fs::create_dir(dir.join("vm")).unwrap();
        std::fs::write(dir.join("vm/memory"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("vm/link")).unwrap();
        for p in ["vm", "vm/memory", "vm/link"] {
            std::os::unix::fs::lchown(dir.join(p), Some(VMM_UID), Some(VMM_GID)).unwrap();
        }
        let passwd = std::fs::metadata("/etc/passwd").unwrap();
        let memory = std::fs::metadata(dir.join("vm/memory")).unwrap();
        reclaim(&dir).unwrap();
        for p in ["", "vm"] {
            let m = std::fs::symlink_metadata(dir.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 0), "{p}");
        }
        // The memory file is untouched: its ctime (in the snapshot's stamp) is as written.
        let after = std::fs::metadata(dir.join("vm/memory")).unwrap();
        assert_eq!(
            (after.ctime(), after.ctime_nsec(), after.uid()),
            (memory.ctime(), memory.ctime_nsec(), VMM_UID)
        );
        let after = std::fs::metadata("/etc/passwd").unwrap();
        assert_eq!((after.uid(), after.gid()), (passwd.uid(), passwd.gid()));
    }

    #[test]
    fn the_uid_is_outside_the_egress_range_and_not_root() {
        assert!(crate::network::uid::slot_of(VMM_UID).is_none());
        assert_ne!(VMM_UID, 0);
        assert_eq!(vmm_args()[1], format!("{VMM_UID}:{VMM_UID}"));
    }
}
