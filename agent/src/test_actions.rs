//! Test actions: small, observable things the agent does when the kernel command line asks
//! (`fnvm.test=ACTION`), so fnvm's Linux-guest tests can check the VM from the inside. Each prints
//! one `fnvm-agent: ...` line with its outcome; a failed action is an outcome, not an agent error.
//!
//! - `cpus` — `cpus online: N`
//! - `write:DEV` — write a block to the start of block device DEV: `write DEV: ok|failed: why`
//! - `write-file:DEV:NAME:TEXT` — mount DEV (ext4) read-write, write TEXT to file NAME, unmount:
//!   `write-file DEV NAME: ok|failed: why`
//! - `read-file:DEV:NAME` — mount DEV (ext4) read-only and print the file:
//!   `read-file DEV NAME: TEXT` or `read-file DEV NAME: failed: why`
//! - `panic` — crash the kernel through /proc/sysrq-trigger

use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use crate::console;
use crate::mounts::{self, MountError};

/// Why a test action could not be parsed or did not do what it says.
#[derive(Debug, thiserror::Error)]
pub enum TestActionError {
    /// A known action with the wrong arguments.
    #[error("malformed test action {0:?}")]
    Malformed(String),
    /// An action the agent does not know.
    #[error("unknown test action {0:?}")]
    Unknown(String),
    /// The online CPU list cannot be read.
    #[error("cannot read /sys/devices/system/cpu/online: {0}")]
    ReadCpus(io::Error),
    /// The online CPU list is not a kernel CPU list.
    #[error("malformed CPU list {0:?}")]
    BadCpuList(String),
    /// A disk cannot be opened for writing.
    #[error("cannot open {device} for writing: {cause}")]
    OpenDevice { device: String, cause: io::Error },
    /// Writing a disk's first block failed.
    #[error("cannot write {device}: {cause}")]
    WriteDevice { device: String, cause: io::Error },
    /// A file on the mounted disk cannot be created.
    #[error("cannot create {path}: {cause}")]
    CreateFile { path: String, cause: io::Error },
    /// A file on the mounted disk cannot be written.
    #[error("cannot write {path}: {cause}")]
    WriteFile { path: String, cause: io::Error },
    /// A file on the mounted disk cannot be read.
    #[error("cannot read {path}: {cause}")]
    ReadFile { path: String, cause: io::Error },
    /// The disk cannot be mounted or unmounted.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The sysrq trigger cannot be written.
    #[error("cannot write /proc/sysrq-trigger: {0}")]
    Sysrq(io::Error),
    /// A crash was asked for and did not happen.
    #[error("the kernel survived a sysrq crash")]
    SurvivedSysrq,
}

/// Where test actions mount disks.
const MOUNT_POINT: &str = "/mnt/fnvm-test";

#[derive(Debug, PartialEq, Eq)]
pub enum Action<'a> {
    Cpus,
    Write {
        device: &'a str,
    },
    WriteFile {
        device: &'a str,
        name: &'a str,
        text: &'a str,
    },
    ReadFile {
        device: &'a str,
        name: &'a str,
    },
    Panic,
}

impl<'a> Action<'a> {
    pub fn parse(spec: &'a str) -> Result<Self, TestActionError> {
        let (verb, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let args: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            // TEXT, the last argument of write-file, may itself hold colons.
            rest.splitn(3, ':').collect()
        };
        let bad = || TestActionError::Malformed(spec.into());
        match (verb, args.as_slice()) {
            ("cpus", []) => Ok(Action::Cpus),
            ("panic", []) => Ok(Action::Panic),
            ("write", [device]) if !device.is_empty() => Ok(Action::Write { device }),
            ("write-file", [device, name, text]) if valid_name(name) => {
                Ok(Action::WriteFile { device, name, text })
            }
            ("read-file", [device, name]) if valid_name(name) => {
                Ok(Action::ReadFile { device, name })
            }
            ("cpus" | "panic" | "write" | "write-file" | "read-file", _) => Err(bad()),
            _ => Err(TestActionError::Unknown(spec.into())),
        }
    }
}

/// A plain file name: no path tricks on the mounted disk.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

pub fn run(action: &Action) -> Result<(), TestActionError> {
    match action {
        Action::Cpus => {
            let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
                .map_err(TestActionError::ReadCpus)?;
            let count = count_cpu_list(&online)
                .ok_or_else(|| TestActionError::BadCpuList(online.clone()))?;
            console::line(&format!("cpus online: {count}"));
        }
        Action::Write { device } => {
            let outcome = write_block(device);
            console::line(&format!("write {device}: {}", describe(outcome)));
        }
        Action::WriteFile { device, name, text } => {
            let outcome = with_mounted(device, false, |dir| {
                let path = format!("{dir}/{name}");
                let mut file =
                    std::fs::File::create(&path).map_err(|cause| TestActionError::CreateFile {
                        path: path.clone(),
                        cause,
                    })?;
                file.write_all(text.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|cause| TestActionError::WriteFile { path, cause })
            });
            console::line(&format!(
                "write-file {device} {name}: {}",
                describe(outcome)
            ));
        }
        Action::ReadFile { device, name } => {
            let outcome = with_mounted(device, true, |dir| {
                let path = format!("{dir}/{name}");
                std::fs::read_to_string(&path)
                    .map_err(|cause| TestActionError::ReadFile { path, cause })
            });
            match outcome {
                Ok(text) => console::line(&format!("read-file {device} {name}: {text}")),
                Err(why) => console::line(&format!("read-file {device} {name}: failed: {why}")),
            }
        }
        Action::Panic => {
            console::line("panicking the kernel on request");
            std::fs::write("/proc/sysrq-trigger", b"c").map_err(TestActionError::Sysrq)?;
            return Err(TestActionError::SurvivedSysrq);
        }
    }
    Ok(())
}

fn describe(outcome: Result<(), TestActionError>) -> String {
    match outcome {
        Ok(()) => "ok".into(),
        Err(why) => format!("failed: {why}"),
    }
}

/// Overwrites the first block of `device` and flushes it to the disk.
fn write_block(device: &str) -> Result<(), TestActionError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(|cause| TestActionError::OpenDevice {
            device: device.into(),
            cause,
        })?;
    let mut block = [0u8; 512];
    let marker = b"fnvm-agent test write\n";
    block[..marker.len()].copy_from_slice(marker);
    file.write_all_at(&block, 0)
        .and_then(|()| file.sync_all())
        .map_err(|cause| TestActionError::WriteDevice {
            device: device.into(),
            cause,
        })
}

/// Mounts `device` (ext4) on the test mount point, runs `f` on it, and unmounts it again.
fn with_mounted<T>(
    device: &str,
    read_only: bool,
    f: impl FnOnce(&str) -> Result<T, TestActionError>,
) -> Result<T, TestActionError> {
    mounts::mount_device(device, MOUNT_POINT, "ext4", read_only)?;
    let result = f(MOUNT_POINT);
    let unmounted = mounts::unmount(MOUNT_POINT);
    let value = result?;
    unmounted?;
    Ok(value)
}

/// Counts the CPUs in a kernel CPU list such as "0-3,5\n".
fn count_cpu_list(list: &str) -> Option<usize> {
    let mut count = 0usize;
    for part in list.trim().split(',') {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        count = count.checked_add(last.checked_sub(first)?.checked_add(1)?)?;
    }
    Some(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_action() {
        assert_eq!(Action::parse("cpus").ok(), Some(Action::Cpus));
        assert_eq!(Action::parse("panic").ok(), Some(Action::Panic));
        assert_eq!(
            Action::parse("write:/dev/vdb").ok(),
            Some(Action::Write { device: "/dev/vdb" })
        );
        assert_eq!(
            Action::parse("write-file:/dev/vdb:note:a:b").ok(),
            Some(Action::WriteFile {
                device: "/dev/vdb",
                name: "note",
                text: "a:b"
            })
        );
        assert_eq!(
            Action::parse("read-file:/dev/vdb:note").ok(),
            Some(Action::ReadFile {
                device: "/dev/vdb",
                name: "note"
            })
        );
    }

    #[test]
    fn refuses_malformed_and_unknown_actions_by_name() {
        assert!(Action::parse("write")
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        assert!(Action::parse("cpus:2")
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        assert!(Action::parse("read-file:/dev/vdb:../etc/passwd")
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        let err = Action::parse("reboot-twice").unwrap_err().to_string();
        assert!(
            err.contains("unknown test action \"reboot-twice\""),
            "{err}"
        );
    }

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,5,7-8"), Some(7));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }
}
