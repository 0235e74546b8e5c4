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

use std::io::Write;
use std::os::unix::fs::FileExt;

use crate::{console, mounts};

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
    pub fn parse(spec: &'a str) -> Result<Self, String> {
        let (verb, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let args: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            // TEXT, the last argument of write-file, may itself hold colons.
            rest.splitn(3, ':').collect()
        };
        let bad = || format!("malformed test action {spec:?}");
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
            _ => Err(format!("unknown test action {spec:?}")),
        }
    }
}

/// A plain file name: no path tricks on the mounted disk.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

pub fn run(action: &Action) -> Result<(), String> {
    match action {
        Action::Cpus => {
            let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
                .map_err(|e| format!("cannot read /sys/devices/system/cpu/online: {e}"))?;
            let count =
                count_cpu_list(&online).ok_or_else(|| format!("malformed CPU list {online:?}"))?;
            console::line(&format!("cpus online: {count}"));
        }
        Action::Write { device } => {
            let outcome = write_block(device);
            console::line(&format!("write {device}: {}", describe(outcome)));
        }
        Action::WriteFile { device, name, text } => {
            let outcome = with_mounted(device, false, |dir| {
                let path = format!("{dir}/{name}");
                let mut file = std::fs::File::create(&path)
                    .map_err(|e| format!("cannot create {path}: {e}"))?;
                file.write_all(text.as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| format!("cannot write {path}: {e}"))
            });
            console::line(&format!(
                "write-file {device} {name}: {}",
                describe(outcome)
            ));
        }
        Action::ReadFile { device, name } => {
            let outcome = with_mounted(device, true, |dir| {
                let path = format!("{dir}/{name}");
                std::fs::read_to_string(&path).map_err(|e| format!("cannot read {path}: {e}"))
            });
            match outcome {
                Ok(text) => console::line(&format!("read-file {device} {name}: {text}")),
                Err(why) => console::line(&format!("read-file {device} {name}: failed: {why}")),
            }
        }
        Action::Panic => {
            console::line("panicking the kernel on request");
            std::fs::write("/proc/sysrq-trigger", b"c")
                .map_err(|e| format!("cannot write /proc/sysrq-trigger: {e}"))?;
            return Err("the kernel survived a sysrq crash".into());
        }
    }
    Ok(())
}

fn describe(outcome: Result<(), String>) -> String {
    match outcome {
        Ok(()) => "ok".into(),
        Err(why) => format!("failed: {why}"),
    }
}

/// Overwrites the first block of `device` and flushes it to the disk.
fn write_block(device: &str) -> Result<(), String> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .map_err(|e| format!("cannot open {device} for writing: {e}"))?;
    let mut block = [0u8; 512];
    let marker = b"fnvm-agent test write\n";
    block[..marker.len()].copy_from_slice(marker);
    file.write_all_at(&block, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {device}: {e}"))
}

/// Mounts `device` (ext4) on the test mount point, runs `f` on it, and unmounts it again.
fn with_mounted<T>(
    device: &str,
    read_only: bool,
    f: impl FnOnce(&str) -> Result<T, String>,
) -> Result<T, String> {
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
        assert_eq!(Action::parse("cpus"), Ok(Action::Cpus));
        assert_eq!(Action::parse("panic"), Ok(Action::Panic));
        assert_eq!(
            Action::parse("write:/dev/vdb"),
            Ok(Action::Write { device: "/dev/vdb" })
        );
        assert_eq!(
            Action::parse("write-file:/dev/vdb:note:a:b"),
            Ok(Action::WriteFile {
                device: "/dev/vdb",
                name: "note",
                text: "a:b"
            })
        );
        assert_eq!(
            Action::parse("read-file:/dev/vdb:note"),
            Ok(Action::ReadFile {
                device: "/dev/vdb",
                name: "note"
            })
        );
    }

    #[test]
    fn refuses_malformed_and_unknown_actions_by_name() {
        assert!(Action::parse("write").unwrap_err().contains("malformed"));
        assert!(Action::parse("cpus:2").unwrap_err().contains("malformed"));
        assert!(Action::parse("read-file:/dev/vdb:../etc/passwd")
            .unwrap_err()
            .contains("malformed"));
        let err = Action::parse("reboot-twice").unwrap_err();
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
