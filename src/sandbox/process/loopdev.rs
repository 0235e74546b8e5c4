//! Loop devices for the process sandbox: the rootfs image (read-only) and the writable layer
//! become block devices the agent mounts, exactly as it mounts virtio-blk disks in a VM.
//!
//! Every device is attached with LOOP_CONFIGURE (one atomic ioctl: backing file, flags) and
//! LO_FLAGS_AUTOCLEAR, so the kernel detaches it when its last user goes: our fd and the
//! sandbox's mount. We hold the fd for the instance's life (closing it before the agent mounts
//! would detach the device at once); if fnvm crashes the fd closes with it, so once the sandbox
//! is killed nothing stays attached.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sandbox::SandboxError;

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` of <linux/loop.h> (LOOP_CONFIGURE, Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How long a released device may take to be detached by the kernel before we clear it.
const DETACH_WAIT: Duration = Duration::from_secs(2);

/// One attached loop device, held open by us.
#[derive(Debug)]
pub struct LoopDevice {
    number: u32,
    path: PathBuf,
    backing: PathBuf,
    device: Option<File>,
}

impl LoopDevice {
    /// Attaches `backing` to a free loop device (read-only if asked), with autoclear.
    pub fn attach(backing: &Path, read_only: bool) -> Result<Self, SandboxError> {
        let what = || format!("cannot attach {} to a loop device", backing.display());
        let backing_file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(backing)
            .map_err(|e| SandboxError::setup(what(), e))?;
        let control = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")
            .map_err(|e| {
                SandboxError::setup(format!("{} (is the loop module loaded?)", what()), e)
            })?;
        // Another process may take the same free device between GET_FREE and CONFIGURE: retry.
        let mut last_err = None;
        for _ in 0..32 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if number < 0 {
                return Err(SandboxError::setup(what(), io::Error::last_os_error()));
            }
            let number = number as u32;
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let device = match OpenOptions::new().read(true).write(!read_only).open(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    last_err = Some(e);
                    std::thread::sleep(Duration::from_millis(5)); // udev/devtmpfs catching up
                    continue;
                }
                Err(e) => return Err(SandboxError::setup(what(), e)),
            };
            let mut config = LoopConfig {
                fd: backing_file.as_raw_fd() as u32,
                block_size: 0,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: LO_FLAGS_AUTOCLEAR | if read_only { LO_FLAGS_READ_ONLY } else { 0 },
                    lo_file_name: [0; LO_NAME_SIZE],
                    lo_crypt_name: [0; LO_NAME_SIZE],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            let name = backing.as_os_str().as_encoded_bytes();
            let n = name.len().min(LO_NAME_SIZE - 1);
            config.info.lo_file_name[..n].copy_from_slice(&name[..n]);
            // SAFETY: LOOP_CONFIGURE reads a `struct loop_config` we own for the whole call.
            let r = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) };
            if r == 0 {
                return Ok(LoopDevice {
                    number,
                    path,
                    backing: backing.to_path_buf(),
                    device: Some(device),
                });
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EBUSY) {
                return Err(SandboxError::setup(
                    format!("{} (LOOP_CONFIGURE on {})", what(), path.display()),
                    err,
                ));
            }
            last_err = Some(err);
        }
        Err(SandboxError::setup(
            format!("{}: no free loop device after 32 tries", what()),
            last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EBUSY)),
        ))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn number(&self) -> u32 {
        self.number
    }

    /// Lets go of the device: closes our fd (autoclear detaches it once the sandbox's mount is
    /// gone too) and waits for the kernel to do so; clears it ourselves if it does not. Returns
    /// an error if it is still attached to our file afterwards.
    pub fn release(&mut self) -> Result<(), SandboxError> {
        if self.device.take().is_none() {
            return Ok(());
        }
        let deadline = Instant::now() + DETACH_WAIT;
        while Instant::now() < deadline {
            if !attached_to(self.number, &self.backing) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        detach(self.number);
        if attached_to(self.number, &self.backing) {
            return Err(SandboxError::setup(
                format!(
                    "{} is still attached to {}",
                    self.path.display(),
                    self.backing.display()
                ),
                "something still uses the device",
            ));
        }
        Ok(())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::warn!("{e}");
        }
    }
}

/// Whether loop device `number` is attached to `backing` now.
fn attached_to(number: u32, backing: &Path) -> bool {
    backing_file(number).is_some_and(|b| same_backing(&b, backing))
}

/// The kernel's idea of loopN's backing file (" (deleted)" stripped), if it is attached.
pub fn backing_file(number: u32) -> Option<PathBuf> {
    let text =
        std::fs::read_to_string(format!("/sys/block/loop{number}/loop/backing_file")).ok()?;
    let text = text.trim_end_matches('\n');
    Some(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(text),
    ))
}

fn same_backing(kernel: &Path, ours: &Path) -> bool {
    kernel == ours || std::fs::canonicalize(ours).is_ok_and(|c| c == kernel)
}

/// Every attached loop device and its backing file.
pub fn attached() -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_prefix("loop"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(backing) = backing_file(number) {
            out.push((number, backing));
        }
    }
    out.sort();
    out
}

/// LOOP_CLR_FD on loopN: detaches it now if nobody uses it, else marks it for autoclear (the
/// kernel then detaches it when its last user goes). Errors are ignored: this is a best effort
/// after the normal path (autoclear) did not happen.
pub fn detach(number: u32) {
    if let Ok(device) = File::open(format!("/dev/loop{number}")) {
        // SAFETY: LOOP_CLR_FD takes no argument.
        unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CLR_FD) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        eprintln!("SKIP: loop device tests need root");
        false
    }

    #[test]
    fn attach_is_read_only_when_asked_and_release_detaches() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("disk.img");
        std::fs::write(&backing, vec![7u8; 1 << 20]).unwrap();
        let mut ro = LoopDevice::attach(&backing, true).unwrap();
        let mut rw = LoopDevice::attach(&backing, false).unwrap();
        assert_ne!(ro.number(), rw.number());
        let listed = attached();
        assert!(
            listed.contains(&(ro.number(), backing.clone())),
            "{listed:?}"
        );
        let ro_flag = |n: u32| std::fs::read_to_string(format!("/sys/block/loop{n}/ro")).unwrap();
        assert_eq!(ro_flag(ro.number()).trim(), "1");
        assert_eq!(ro_flag(rw.number()).trim(), "0");
        let mut first = [0u8; 4];
        use std::io::Read;
        File::open(rw.path())
            .unwrap()
            .read_exact(&mut first)
            .unwrap();
        assert_eq!(first, [7; 4]);
        let (ro_n, rw_n) = (ro.number(), rw.number());
        ro.release().unwrap();
        rw.release().unwrap();
        assert!(!attached_to(ro_n, &backing));
        assert!(!attached_to(rw_n, &backing));
    }

    #[test]
    fn a_missing_backing_file_is_named() {
        let err = LoopDevice::attach(Path::new("/nonexistent/fnvm.img"), true).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/fnvm.img"), "{err}");
    }
}
