//! The VM sandbox: one `fnvm-vmm` process per instance, booting fnvm's guest kernel with the
//! agent as /init of a tiny initramfs, the rootfs image as read-only /dev/vda and the writable
//! layer as /dev/vdb, and talking to the agent over virtio-vsock (`<instance_dir>/vsock.sock`).
//! The control flow above the transport is the process sandbox's ([`super::control`]).

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fnvm_vmm::arch::x86_64::boot::KernelFormat;
use fnvm_vmm::host::HostCapabilities;
use fnvm_vmm::vm::DEFAULT_CMDLINE;

use super::child::{ended_reason, SandboxChild};
use super::cleanup::ProcessId;
use super::control::{self, Control, ExitState};
use super::instance::{prepare_instance_dir, AgentInstance, Teardown};
use super::transport::HostTransport;
use super::writable_layer::WritableLayer;
use super::{validate_spec, Instance, InstanceSpec, Sandbox, SandboxError, SandboxKind};
use crate::home::Home;

/// How long the guest may take to boot and answer on its control port.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// The kernel command line: fnvm's defaults plus where the agent finds its disks.
pub fn guest_cmdline() -> String {
    format!("{DEFAULT_CMDLINE} fnvm.rootfs=/dev/vda fnvm.writable=/dev/vdb")
}

/// One vCPU, two from 1536 MiB up (more memory buys more CPU, as in the cloud).
pub fn vcpus_for(memory_mib: u32) -> u8 {
    if memory_mib >= 1536 {
        2
    } else {
        1
    }
}

pub struct VmSandbox {
    home: Home,
    vmm: PathBuf,
    kernel: PathBuf,
    initramfs: PathBuf,
}

impl VmSandbox {
    /// Checks the host (VMX/SVM) before anything else, then finds `fnvm-vmm`, the guest kernel
    /// (built on first use) and the agent's initramfs.
    pub fn new(home: &Home) -> Result<Self, SandboxError> {
        HostCapabilities::probe().check_can_boot(KernelFormat::BzImage)?;
        let vmm = vmm_binary()?;
        let kernel = crate::kernel::default_kernel(home)
            .map_err(|e| SandboxError::setup("cannot get the guest kernel", e))?;
        let agent = crate::agent_binary::agent_binary()
            .map_err(|e| SandboxError::setup("cannot find the agent", e))?;
        let initramfs = super::initramfs::cached(home, &agent)?;
        Ok(VmSandbox {
            home: home.clone(),
            vmm,
            kernel,
            initramfs,
        })
    }

    /// The `fnvm-vmm` arguments for one instance.
    pub fn vmm_args(&self, spec: &InstanceSpec, writable: &Path, vsock: &Path) -> Vec<String> {
        let mut args = vec![
            "--kernel".to_string(),
            self.kernel.display().to_string(),
            "--initrd".into(),
            self.initramfs.display().to_string(),
            "--cmdline".into(),
            guest_cmdline(),
            "--memory".into(),
            spec.memory_mib.to_string(),
            "--vcpus".into(),
            vcpus_for(spec.memory_mib).to_string(),
            "--disk".into(),
            format!("{}:ro", spec.rootfs_image.display()),
            "--disk".into(),
            writable.display().to_string(),
        ];
        args.extend(["--vsock".to_string(), vsock.display().to_string()]);
        args
    }
}

/// `fnvm-vmm` next to the running executable (or next to `target/<profile>/` for test binaries
/// in `target/<profile>/deps/`).
fn vmm_binary() -> Result<PathBuf, SandboxError> {
    let exe = std::env::current_exe()
        .map_err(|e| SandboxError::setup("cannot find the running fnvm executable", e))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    let mut candidates = vec![dir.join("fnvm-vmm")];
    if dir.file_name().is_some_and(|n| n == "deps") {
        if let Some(profile) = dir.parent() {
            candidates.push(profile.join("fnvm-vmm"));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            SandboxError::setup(
                format!("fnvm-vmm not found at {}", candidates[0].display()),
                "it is installed next to fnvm; build it with `cargo build -p fnvm-vmm`",
            )
        })
}

impl Sandbox for VmSandbox {
    fn kind(&self) -> SandboxKind {
        SandboxKind::Vm
    }

    fn start(&self, spec: InstanceSpec) -> Result<Box<dyn Instance>, SandboxError> {
        validate_spec(&spec)?;
        let dir = spec.instance_dir.clone();
        let vsock = dir.join("vsock.sock");
        if vsock.as_os_str().len() + 6 >= 108 {
            return Err(SandboxError::BadSpec(format!(
                "the instance directory {} is too long for a Unix socket path (108 bytes)",
                dir.display()
            )));
        }
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(|e| {
                SandboxError::setup(format!("cannot create {}", parent.display()), e)
            })?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| {
                SandboxError::setup(
                    format!("cannot create the instance directory {}", dir.display()),
                    e,
                )
            })?;
        let mut parts = VmParts {
            dir,
            layer: None,
            child: None,
            control: None,
            torn_down: false,
        };
        match self.start_in(&spec, &vsock, &mut parts) {
            Ok(exit) => {
                let control = parts.control.take();
                Ok(Box::new(AgentInstance {
                    id: spec.id,
                    transport: HostTransport::Vsock { uds: vsock },
                    exit,
                    control,
                    parts: Mutex::new(parts),
                }))
            }
            Err(err) => {
                let _ = parts.teardown();
                Err(err)
            }
        }
    }
}

impl VmSandbox {
    fn start_in(
        &self,
        spec: &InstanceSpec,
        vsock: &Path,
        parts: &mut VmParts,
    ) -> Result<Arc<ExitState>, SandboxError> {
        let dir = &spec.instance_dir;
        let (mut record, layer) = prepare_instance_dir(&self.home, dir)?;
        let layer = parts.layer.insert(layer);
        let args = self.vmm_args(spec, layer.path(), vsock);

        let exit = ExitState::new(|| None);
        let child = Command::new(&self.vmm)
            .args(&args)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a Ctrl-C at fnvm's terminal is fnvm's to handle.
            .process_group(0)
            .spawn()
            .map_err(|e| SandboxError::setup(format!("cannot start {}", self.vmm.display()), e))?;
        let exit_for_child = exit.clone();
        let child = parts.child.insert(
            SandboxChild::adopt("vm", child, move |status, tail| {
                exit_for_child.record(
                    None,
                    None,
                    ended_reason("the VM ended: fnvm-vmm", status, &tail),
                );
            })
            .map_err(|e| SandboxError::setup("cannot watch the VMM process", e))?,
        );
        record.sandbox = ProcessId::of(child.pid());
        record.save(dir)?;

        let child_ref: &SandboxChild = child;
        // The waiter records the ending (with the process's last words) before the status is
        // visible, so the control flow finds that record first.
        let dead = || {
            child_ref.status().map(|s| {
                (
                    None,
                    None,
                    ended_reason("the VM ended: fnvm-vmm", s, &child_ref.tail()),
                )
            })
        };
        let transport = HostTransport::Vsock {
            uds: vsock.to_path_buf(),
        };
        let control = control::start(
            &transport,
            &spec.start,
            spec.on_log.clone(),
            exit.clone(),
            &dead,
            BOOT_TIMEOUT,
        )?;
        parts.control = Some(control);
        Ok(exit)
    }
}

struct VmParts {
    dir: PathBuf,
    layer: Option<WritableLayer>,
    child: Option<SandboxChild>,
    control: Option<Control>,
    torn_down: bool,
}

impl Teardown for VmParts {
    fn is_torn_down(&self) -> bool {
        self.torn_down
    }

    fn teardown(&mut self) -> Result<(), SandboxError> {
        if self.torn_down {
            return Ok(());
        }
        self.torn_down = true;
        if let Some(control) = self.control.take() {
            control.close();
        }
        if let Some(child) = self.child.take() {
            child.kill_and_reap();
        }
        self.layer.take();
        match std::fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SandboxError::setup(
                format!("cannot remove {}", self.dir.display()),
                e,
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_finds_its_disks_on_the_command_line() {
        let cmdline = guest_cmdline();
        assert!(cmdline.starts_with(DEFAULT_CMDLINE));
        assert!(cmdline.ends_with(" fnvm.rootfs=/dev/vda fnvm.writable=/dev/vdb"));
        assert_eq!(vcpus_for(128), 1);
        assert_eq!(vcpus_for(3072), 2);
    }

    #[test]
    fn without_vmx_or_svm_the_vm_sandbox_is_refused_with_the_hosts_message() {
        let host = HostCapabilities::probe();
        if host.kvm && host.hardware_virtualization {
            eprintln!("SKIP: this host has VMX/SVM; the refusal cannot be observed here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let home = Home::resolve(Some(dir.path().to_path_buf())).unwrap();
        let err = super::super::create(SandboxKind::Vm, &home)
            .err()
            .expect("refused");
        assert!(matches!(err, SandboxError::Host(_)), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("--sandbox process") || text.contains("/dev/kvm"),
            "{text}"
        );
        // Nothing was built or cached for a refused sandbox.
        assert!(!dir.path().join("kernels").exists());
    }
}
