//! What this agent is asked to do, from how it was started:
//!
//! - VM: no arguments; the kernel command line names the disks (`fnvm.rootfs=DEV`,
//!   `fnvm.writable=DEV`). Without `fnvm.rootfs=` the boot is a test boot (`fnvm.test=`
//!   actions only), as fnvm's Linux-guest tests use it.
//! - Process sandbox: `--sandbox process --socket-dir DIR [--control-fd N]`, and the disks
//!   on standard input ([`fnvm_agent::protocol::Placement`]), so the host can start the agent
//!   before it has chosen them. With `--control-fd` the host has bound the control port's
//!   socket itself and passes it listening (socket activation): its connection is queued from
//!   the first instant instead of being retried until the agent has bound one.

use std::path::PathBuf;

use fnvm_agent::protocol::{read_message, Placement};

use crate::cmdline;

/// Where the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sandbox {
    /// PID 1 of a micro-VM; streams over vsock.
    Vm,
    /// PID 1 of fresh namespaces on the host; streams over Unix sockets in `socket_dir`, the
    /// control port's already listening on `control_fd` when the host bound it.
    Process {
        socket_dir: PathBuf,
        control_fd: Option<i32>,
        /// The writable layer's device when the command line names it (a standby sandbox's
        /// agent mounts it before the rootfs is known); else it comes with the placement.
        writable: Option<String>,
    },
}

/// A function instance's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub sandbox: Sandbox,
    /// The disks; in the process sandbox they come on standard input once the ports listen.
    pub disks: Option<Disks>,
}

/// A function instance's two disks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disks {
    /// The read-only rootfs image's block device (ext4 or erofs).
    pub rootfs: String,
    /// The writable layer's block device (ext4).
    pub writable: String,
}

/// Why the agent's arguments or the kernel command line name no instance to run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An argument the agent does not take.
    #[error("unknown argument {0:?}")]
    UnknownArgument(String),
    /// A flag at the end, or with an empty value.
    #[error("{0} needs a value")]
    NeedsValue(String),
    /// A flag repeated.
    #[error("{0} given twice")]
    GivenTwice(String),
    /// A sandbox kind other than the process sandbox.
    #[error(
        "--sandbox {0:?} is not supported on the command line (only \"process\"; in a VM the \
         agent takes no arguments)"
    )]
    UnsupportedSandbox(String),
    /// A required flag is missing.
    #[error("{0} is required")]
    Missing(&'static str),
    /// The socket directory must not depend on the working directory.
    #[error("--socket-dir {} must be an absolute path", .0.display())]
    RelativeSocketDir(PathBuf),
    /// An inherited descriptor that cannot be one the host passed (0–2 are stdio).
    #[error("--control-fd {0:?} is not a descriptor number above 2")]
    BadControlFd(String),
    /// A VM's command line names one disk without the other.
    #[error("the kernel command line needs both fnvm.rootfs=DEV and fnvm.writable=DEV")]
    PartialDisks,
    /// Standard input ended before the host placed the instance (it gave the sandbox up).
    #[error("standard input ended before the host named the disks")]
    NoPlacement,
    /// The host's placement line cannot be read or parsed.
    #[error("the disks on standard input cannot be read: {0}")]
    BadPlacement(String),
}

/// The usage line printed with argument errors.
pub const USAGE: &str =
    "usage: fnvm-agent --sandbox process --socket-dir DIR [--control-fd N] [--writable DEV] (the \
     disks then come on standard input: one JSON line {\"rootfs\":DEV,\"writable\":DEV}, \
     without writable if given here; no arguments: VM mode, disks from fnvm.rootfs= and \
     fnvm.writable= on the kernel command line)";

/// Parses the process sandbox's arguments (program name excluded).
pub fn from_args(args: &[String]) -> Result<Config, ConfigError> {
    let mut sandbox = None;
    let mut socket_dir = None;
    let mut control_fd = None;
    let mut writable = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--sandbox" => &mut sandbox,
            "--socket-dir" => &mut socket_dir,
            "--control-fd" => &mut control_fd,
            "--writable" => &mut writable,
            other => return Err(ConfigError::UnknownArgument(other.into())),
        };
        let value = it
            .next()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ConfigError::NeedsValue(flag.clone()))?;
        if slot.replace(value.clone()).is_some() {
            return Err(ConfigError::GivenTwice(flag.clone()));
        }
    }
    match sandbox.as_deref() {
        Some("process") => {}
        Some(other) => return Err(ConfigError::UnsupportedSandbox(other.into())),
        None => return Err(ConfigError::Missing("--sandbox process")),
    }
    let socket_dir = PathBuf::from(socket_dir.ok_or(ConfigError::Missing("--socket-dir"))?);
    if !socket_dir.is_absolute() {
        return Err(ConfigError::RelativeSocketDir(socket_dir));
    }
    let control_fd = control_fd
        .map(|n| match n.parse::<i32>() {
            Ok(fd) if fd > 2 => Ok(fd),
            _ => Err(ConfigError::BadControlFd(n)),
        })
        .transpose()?;
    Ok(Config {
        sandbox: Sandbox::Process {
            socket_dir,
            control_fd,
            writable,
        },
        disks: None,
    })
}

/// Reads the host's [`Placement`] line from `input` (the agent's standard input). The writable
/// layer is named either on the command line (`writable`) or in the placement, not both.
pub fn read_placement(
    input: &mut impl std::io::BufRead,
    writable: Option<&str>,
) -> Result<Disks, ConfigError> {
    let placement: Placement = match read_message(input) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(ConfigError::NoPlacement),
        Err(e) => return Err(ConfigError::BadPlacement(e.to_string())),
    };
    let writable = match (writable, placement.writable) {
        (Some(given), None) => given.to_string(),
        (None, Some(placed)) => placed,
        (Some(_), Some(_)) => {
            return Err(ConfigError::BadPlacement(
                "the writable layer is named on the command line already".into(),
            ))
        }
        (None, None) => {
            return Err(ConfigError::BadPlacement(
                "it names no writable layer".into(),
            ))
        }
    };
    if placement.rootfs.is_empty() || writable.is_empty() {
        return Err(ConfigError::BadPlacement("a disk is named \"\"".into()));
    }
    Ok(Disks {
        rootfs: placement.rootfs,
        writable,
    })
}

/// The VM's configuration from the kernel command line: None for a test boot (no
/// `fnvm.rootfs=`), an error when the disks are named only in part.
pub fn from_cmdline(cmdline: &str) -> Option<Result<Config, ConfigError>> {
    let rootfs = cmdline::value(cmdline, "fnvm.rootfs")?;
    Some(match cmdline::value(cmdline, "fnvm.writable") {
        Some(writable) if !rootfs.is_empty() && !writable.is_empty() => Ok(Config {
            sandbox: Sandbox::Vm,
            disks: Some(Disks {
                rootfs: rootfs.to_string(),
                writable: writable.to_string(),
            }),
        }),
        _ => Err(ConfigError::PartialDisks),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn process_sandbox_arguments() {
        let config = from_args(&args(&[
            "--sandbox",
            "process",
            "--socket-dir",
            "/run/i/sock",
            "--control-fd",
            "3",
        ]))
        .unwrap();
        assert_eq!(
            config,
            Config {
                sandbox: Sandbox::Process {
                    socket_dir: "/run/i/sock".into(),
                    control_fd: Some(3),
                    writable: None,
                },
                disks: None,
            }
        );
    }

    #[test]
    fn bad_arguments_say_what_is_wrong() {
        let err = |list: &[&str]| from_args(&args(list)).unwrap_err().to_string();
        assert!(err(&["--sandbox", "vm"]).contains("\"vm\""));
        assert!(err(&["--socket-dir"]).contains("--socket-dir needs a value"));
        assert!(err(&["--rootfs", "/dev/loop0"]).contains("unknown argument \"--rootfs\""));
        assert!(err(&["--bogus", "x"]).contains("\"--bogus\""));
        assert!(err(&["--sandbox", "process", "--sandbox", "process"]).contains("twice"));
        assert!(err(&["--sandbox", "process"]).contains("--socket-dir is required"));
        assert!(err(&["--sandbox", "process", "--socket-dir", "rel"]).contains("absolute"));
        let with_fd = |fd: &str| {
            err(&[
                "--sandbox",
                "process",
                "--socket-dir",
                "/s",
                "--control-fd",
                fd,
            ])
        };
        assert!(with_fd("1").contains("--control-fd \"1\" is not a descriptor number above 2"));
        assert!(with_fd("x").contains("\"x\""));
    }

    #[test]
    fn the_placement_on_standard_input_names_the_disks() {
        let mut line: &[u8] = b"{\"rootfs\":\"/dev/loop3\",\"writable\":\"/dev/loop4\"}\n";
        assert_eq!(
            read_placement(&mut line, None).unwrap(),
            Disks {
                rootfs: "/dev/loop3".into(),
                writable: "/dev/loop4".into(),
            }
        );
        let err = |text: &str| {
            read_placement(&mut text.as_bytes(), None)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(""),
            "standard input ended before the host named the disks"
        );
        assert!(err("{\"writable\":\"/dev/loop3\"}\n").contains("cannot be read"));
        assert!(err("{\"rootfs\":\"\",\"writable\":\"b\"}\n").contains("named \"\""));
        assert!(err("{\"rootfs\":\"a\",\"extra\":1}\n").contains("cannot be read"));
        assert!(err("not json\n").contains("cannot be read"));
        assert!(err("{\"rootfs\":\"a\"}\n").contains("no writable layer"));

        // A standby's writable layer came on the command line; the placement names the rootfs.
        let mut line: &[u8] = b"{\"rootfs\":\"/dev/loop3\"}\n";
        let disks = read_placement(&mut line, Some("/dev/loop9")).unwrap();
        assert_eq!(disks.writable, "/dev/loop9");
        let mut line: &[u8] = b"{\"rootfs\":\"a\",\"writable\":\"b\"}\n";
        let twice = read_placement(&mut line, Some("/dev/loop9")).unwrap_err();
        assert!(
            twice.to_string().contains("command line already"),
            "{twice}"
        );
    }

    #[test]
    fn vm_configuration_from_the_kernel_command_line() {
        let cmdline =
            "console=ttyS0 reboot=k panic=1 fnvm.rootfs=/dev/vda fnvm.writable=/dev/vdb\n";
        assert_eq!(
            from_cmdline(cmdline),
            Some(Ok(Config {
                sandbox: Sandbox::Vm,
                disks: Some(Disks {
                    rootfs: "/dev/vda".into(),
                    writable: "/dev/vdb".into(),
                }),
            }))
        );
        assert_eq!(from_cmdline("console=ttyS0 fnvm.test=cpus"), None);
        assert!(from_cmdline("fnvm.rootfs=/dev/vda").unwrap().is_err());
    }
}
