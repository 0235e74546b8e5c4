//! containerd's OCI bundle (`config.json` + the rootfs its snapshotter prepared) read as an
//! fnvm function: the process's args, env, cwd and user become the agent's start spec, the
//! memory limit the VM's (or the process sandbox's) memory, the network namespace the place
//! where port 9000 is served. Everything the bundle says that fnvm cannot honour is refused
//! here with a sentence naming it, before anything is started.

use std::collections::HashMap;
use std::io::Read as _;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};

use fnvm::invoke::FunctionType;
use fnvm::sandbox::MEMORY_MIB_RANGE;
use fnvm_agent::protocol::{StartSpec, READY_TIMEOUT_MS};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

/// Annotation choosing how requests reach the function: `web` (default: every request passed
/// through, as a pod's port is used) or `event` (`POST /event-invoke`).
pub const FUNCTION_TYPE_ANNOTATION: &str = "fnvm.io/function-type";
/// The CRI plugin's annotation saying what a container is to the pod: `sandbox` (the pod's
/// placeholder, runc's `pause`) or `container` (one of its containers).
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// Memory when the spec sets no limit (fnvm's default function memory).
pub const DEFAULT_MEMORY_MIB: u32 = 128;
/// The search path of a command named without a slash when the spec's env has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a bundle cannot run as an fnvm function.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// cannot read the bundle's config.json ({path}): {source}
    #[error("cannot read the bundle's config.json ({path}): {source}")]
    Spec {
        path: PathBuf,
        source: oci_spec::OciSpecError,
    },
    /// the bundle's config.json has no process to run
    #[error("the bundle's config.json has no process (or no process args) to run")]
    NoProcess,
    /// the rootfs is missing
    #[error("the bundle has no rootfs: {0} does not exist and containerd passed no rootfs mounts")]
    NoRootfs(PathBuf),
    /// a terminal was asked for
    #[error("a terminal (ctr run -t, kubectl run -t) is not supported by fnvm: a function's output goes to containerd's log fifos")]
    Terminal,
    /// memory out of range
    #[error(
        "the memory limit {mib} MiB is outside what an fnvm function may have ({min}..={max} MiB)"
    )]
    Memory { mib: u64, min: u32, max: u32 },
    /// unknown function type
    #[error("the annotation {FUNCTION_TYPE_ANNOTATION}={0:?} is neither \"web\" nor \"event\"")]
    FunctionType(String),
    /// the command cannot be found
    #[error("the command {command:?} is not in the rootfs (searched {searched})")]
    CommandMissing { command: String, searched: String },
    /// the command is not an x86-64 program
    #[error(
        "the command {command:?} ({path}) is {machine} program; fnvm runs x86-64 programs only"
    )]
    Architecture {
        command: String,
        path: String,
        machine: &'static str,
    },
}

/// The function a bundle describes.
#[derive(Debug, Clone)]
pub struct Function {
    pub start: StartSpec,
    pub memory_mib: u32,
    /// Where port 9000 is served: the pod's network namespace (`None` with a path: a new one,
    /// as runc makes; no network namespace in the spec at all: the host's).
    pub network: PodNetwork,
    pub function_type: FunctionType,
    /// The spec's root (the bundle's `rootfs` unless it says otherwise).
    pub root: PathBuf,
    /// A pod's sandbox container (Kubernetes' `pause`): it runs nothing in fnvm (the pod's
    /// network namespace is the CRI plugin's), it only lasts until it is killed.
    pub pod_sandbox: bool,
}

/// The network namespace the spec puts the container in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetwork {
    /// `/var/run/netns/…`, `/proc/PID/ns/net`: the pod's (Kubernetes, `ctr run --with-ns`).
    Join(PathBuf),
    /// A network namespace without a path: a new, empty one of the container's own.
    New,
    /// No network namespace in the spec: the host's.
    Host,
}

impl Function {
    /// Reads `bundle/config.json`.
    pub fn from_bundle(bundle: &Path) -> Result<Self, BundleError> {
        let path = bundle.join("config.json");
        let spec = Spec::load(&path).map_err(|source| BundleError::Spec { path, source })?;
        let mut function = Self::from_spec(&spec)?;
        function.root = bundle.join(&function.root);
        Ok(function)
    }

    /// The function of an OCI runtime spec.
    pub fn from_spec(spec: &Spec) -> Result<Self, BundleError> {
        let process = spec.process().as_ref().ok_or(BundleError::NoProcess)?;
        let argv = process.args().clone().unwrap_or_default();
        if argv.is_empty() {
            return Err(BundleError::NoProcess);
        }
        if process.terminal().unwrap_or(false) {
            return Err(BundleError::Terminal);
        }
        let user = process.user();
        let linux = spec.linux().as_ref();
        let limit = linux
            .and_then(|l| l.resources().as_ref())
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit())
            .filter(|l| *l > 0);
        let memory_mib = match limit {
            None => DEFAULT_MEMORY_MIB,
            Some(bytes) => {
                let mib = (bytes as u64).div_ceil(1 << 20);
                u32::try_from(mib)
                    .ok()
                    .filter(|m| MEMORY_MIB_RANGE.contains(m))
                    .ok_or(BundleError::Memory {
                        mib,
                        min: *MEMORY_MIB_RANGE.start(),
                        max: *MEMORY_MIB_RANGE.end(),
                    })?
            }
        };
        let network = match linux
            .and_then(|l| l.namespaces().as_ref())
            .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network))
        {
            Some(ns) => match ns.path() {
                Some(path) => PodNetwork::Join(path.clone()),
                None => PodNetwork::New,
            },
            None => PodNetwork::Host,
        };
        let empty = HashMap::new();
        let annotations = spec.annotations().as_ref().unwrap_or(&empty);
        let function_type = match annotations
            .get(FUNCTION_TYPE_ANNOTATION)
            .map(String::as_str)
        {
            None | Some("web") => FunctionType::Web,
            Some("event") => FunctionType::Event,
            Some(other) => return Err(BundleError::FunctionType(other.to_string())),
        };
        let cwd = process.cwd().display().to_string();
        Ok(Function {
            start: StartSpec {
                argv,
                env: process.env().clone().unwrap_or_default(),
                working_dir: if cwd.is_empty() { "/".into() } else { cwd },
                user: Some(format!("{}:{}", user.uid(), user.gid())),
                ready_timeout_ms: READY_TIMEOUT_MS,
                resolv_conf: None,
            },
            memory_mib,
            network,
            function_type,
            root: spec
                .root()
                .as_ref()
                .map_or_else(|| PathBuf::from("rootfs"), |r| r.path().clone()),
            pod_sandbox: annotations
                .get(CONTAINER_TYPE_ANNOTATION)
                .map(String::as_str)
                == Some("sandbox"),
        })
    }

    /// Checks that the command exists in `rootfs` and is an x86-64 program (or a script),
    /// resolving every path inside the rootfs (`RESOLVE_IN_ROOT`: a hostile image's symlinks
    /// cannot lead to host files).
    pub fn check_command(&self, rootfs: &Path) -> Result<(), BundleError> {
        let command = &self.start.argv[0];
        let candidates: Vec<String> = if command.contains('/') {
            vec![if command.starts_with('/') {
                command.clone()
            } else {
                format!("{}/{command}", self.start.working_dir)
            }]
        } else {
            let path = self
                .start
                .env
                .iter()
                .find_map(|kv| kv.strip_prefix("PATH="))
                .unwrap_or(DEFAULT_PATH);
            path.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| format!("{d}/{command}"))
                .collect()
        };
        let Ok(root) = std::fs::File::open(rootfs) else {
            return Err(BundleError::NoRootfs(rootfs.to_path_buf()));
        };
        for candidate in &candidates {
            let Some(mut file) = open_in_root(&root, candidate) else {
                continue;
            };
            let mut head = [0u8; 20];
            let got = file.read(&mut head).unwrap_or(0);
            return match elf_machine(&head[..got]) {
                Some(machine) if machine != X86_64 => Err(BundleError::Architecture {
                    command: command.clone(),
                    path: candidate.clone(),
                    machine: machine_name(machine),
                }),
                _ => Ok(()),
            };
        }
        Err(BundleError::CommandMissing {
            command: command.clone(),
            searched: candidates.join(", "),
        })
    }
}

/// `path` opened read-only with every component resolved inside `root`, if it is a file.
fn open_in_root(root: &std::fs::File, path: &str) -> Option<std::fs::File> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = nix::fcntl::openat2(root.as_fd(), path, how).ok()?;
    let file = std::fs::File::from(fd);
    file.metadata().ok()?.is_file().then_some(file)
}

const X86_64: u16 = 0x3e;

/// The ELF `e_machine` of a file starting with `head`; None for anything that is not ELF.
fn elf_machine(head: &[u8]) -> Option<u16> {
    if head.len() < 20 || &head[..4] != b"\x7fELF" {
        return None;
    }
    Some(match head[5] {
        2 => u16::from_be_bytes([head[18], head[19]]),
        _ => u16::from_le_bytes([head[18], head[19]]),
    })
}

/// "an arm64" and the like, for the error message.
fn machine_name(machine: u16) -> &'static str {
    match machine {
        0x03 => "a 32-bit x86",
        0x28 => "a 32-bit ARM",
        0xb7 => "an arm64 (aarch64)",
        0xf3 => "a RISC-V",
        0x14 | 0x15 => "a PowerPC",
        0x16 => "an s390x",
        _ => "a non-x86-64",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).expect("a valid spec")
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "args": ["/bin/server", "--port", "9000"],
                "env": ["PATH=/bin", "GREETING=hi"],
                "cwd": "/srv",
                "user": {"uid": 1000, "gid": 100}
            },
            "root": {"path": "rootfs"},
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/pod"}],
                "resources": {"memory": {"limit": 268435456}}
            }
        })
    }

    #[test]
    fn the_process_memory_and_pod_network_become_the_function() {
        let f = Function::from_spec(&spec(base())).unwrap();
        assert_eq!(f.start.argv, ["/bin/server", "--port", "9000"]);
        assert_eq!(f.start.env, ["PATH=/bin", "GREETING=hi"]);
        assert_eq!(f.start.working_dir, "/srv");
        assert_eq!(f.start.user.as_deref(), Some("1000:100"));
        assert_eq!(f.memory_mib, 256);
        assert_eq!(
            f.network,
            PodNetwork::Join(PathBuf::from("/var/run/netns/pod"))
        );
        assert_eq!(f.function_type, FunctionType::Web);
    }

    #[test]
    fn what_fnvm_cannot_honour_is_refused_with_its_name() {
        let mut v = base();
        v["linux"]["resources"]["memory"]["limit"] = serde_json::json!(8_i64 << 30);
        let e = Function::from_spec(&spec(v)).unwrap_err().to_string();
        assert!(e.contains("8192 MiB"), "{e}");
        let mut v = base();
        v["process"]["terminal"] = serde_json::json!(true);
        let e = Function::from_spec(&spec(v)).unwrap_err().to_string();
        assert!(e.contains("terminal"), "{e}");
        let mut v = base();
        v["process"]["args"] = serde_json::json!([]);
        assert!(matches!(
            Function::from_spec(&spec(v)),
            Err(BundleError::NoProcess)
        ));
        let mut v = base();
        v["annotations"] = serde_json::json!({FUNCTION_TYPE_ANNOTATION: "batch"});
        let e = Function::from_spec(&spec(v)).unwrap_err().to_string();
        assert!(e.contains("\"batch\""), "{e}");
    }

    #[test]
    fn the_cri_plugins_sandbox_container_is_a_pod_sandbox() {
        assert!(!Function::from_spec(&spec(base())).unwrap().pod_sandbox);
        let mut v = base();
        v["annotations"] = serde_json::json!({CONTAINER_TYPE_ANNOTATION: "sandbox"});
        assert!(Function::from_spec(&spec(v)).unwrap().pod_sandbox);
    }

    #[test]
    fn no_network_namespace_is_the_hosts_and_one_without_a_path_is_new() {
        let mut v = base();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "network"}]);
        assert_eq!(
            Function::from_spec(&spec(v)).unwrap().network,
            PodNetwork::New
        );
        let mut v = base();
        v["linux"]["namespaces"] = serde_json::json!([]);
        assert_eq!(
            Function::from_spec(&spec(v)).unwrap().network,
            PodNetwork::Host
        );
    }

    fn elf(machine: u16) -> Vec<u8> {
        let mut head = b"\x7fELF\x02\x01\x01".to_vec();
        head.resize(18, 0);
        head.extend_from_slice(&machine.to_le_bytes());
        head.resize(64, 0);
        head
    }

    #[test]
    fn the_command_is_found_through_path_and_symlinks_inside_the_rootfs_and_must_be_x86_64() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        std::fs::write(bin.join("busybox"), elf(X86_64)).unwrap();
        // An absolute link resolves inside the rootfs, not on the host.
        std::os::unix::fs::symlink("/bin/busybox", bin.join("sh")).unwrap();
        std::fs::write(bin.join("armprog"), elf(0xb7)).unwrap();
        std::fs::write(bin.join("script"), "#!/bin/sh\n").unwrap();
        let mut f = Function::from_spec(&spec(base())).unwrap();
        for ok in ["sh", "/bin/sh", "script"] {
            f.start.argv = vec![ok.into()];
            assert!(f.check_command(root.path()).is_ok(), "{ok}");
        }
        f.start.argv = vec!["armprog".into()];
        let e = f.check_command(root.path()).unwrap_err().to_string();
        assert!(
            e.contains("arm64") && e.contains("x86-64 programs only"),
            "{e}"
        );
        f.start.argv = vec!["missing".into()];
        let e = f.check_command(root.path()).unwrap_err().to_string();
        assert!(e.contains("\"missing\" is not in the rootfs"), "{e}");
        // A link out of the rootfs stays in it: /etc/hostname of the host is not found.
        std::os::unix::fs::symlink("../../../../etc/hostname", bin.join("escape")).unwrap();
        f.start.argv = vec!["escape".into()];
        assert!(f.check_command(root.path()).is_err());
    }
}
