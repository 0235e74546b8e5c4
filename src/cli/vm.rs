//! `fnvm vm ...`: boot micro-VMs directly.
//!
//! `fnvm vm boot` checks everything it can before starting anything (paths, kernel format,
//! memory, vCPUs, whether this host can run the kernel at all), then runs the `fnvm-vmm`
//! binary that sits next to `fnvm`, forwards its console, and reports how the VM ended.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fnvm_vmm::arch::x86_64::boot::{detect_kernel_format, KernelFormat};
use fnvm_vmm::exit::code;
use fnvm_vmm::host::HostCapabilities;
use fnvm_vmm::vmm::DEFAULT_CMDLINE;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a guest kernel in a micro-VM, show its console and report how it ended.
    Boot(BootArgs),
    /// Print the path of fnvm's guest kernel, building it first if this machine has none
    /// (minutes, once per machine and kernel config): prebuilds it for every home.
    Kernel,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Guest kernel: a Linux bzImage or vmlinux, or an x86 ELF (a PVH ELF boots in 32-bit PVH
    /// mode). Default: fnvm's own guest kernel, built once per machine and cached.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Root filesystem image: attached first, read-only, as /dev/vda with `root=/dev/vda ro`.
    #[arg(long)]
    pub rootfs: Option<PathBuf>,
    /// Extra virtio-blk disk, read-only with a `:ro` suffix (repeatable).
    #[arg(long = "disk", value_name = "PATH[:ro]")]
    pub disks: Vec<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Extra kernel command-line arguments, appended to fnvm's defaults.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
}

pub fn run(cmd: VmCommand) -> Result<ExitCode> {
    match cmd {
        VmCommand::Boot(mut args) => {
            if args.kernel.is_none() {
                // fnvm's kernel is Linux: refuse a host that cannot run it before spending
                // minutes building it.
                HostCapabilities::probe().check_can_boot(KernelFormat::BzImage)?;
                args.kernel = Some(crate::kernel::default_kernel()?);
            }
            boot(&args)
        }
        VmCommand::Kernel => {
            println!("{}", crate::kernel::default_kernel()?.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `PATH[:ro]` → (path, read_only).
fn parse_disk(spec: &str) -> Result<(PathBuf, bool)> {
    let (path, ro) = match spec.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (spec, false),
    };
    if path.is_empty() {
        bail!("--disk {spec:?} has no path");
    }
    Ok((PathBuf::from(path), ro))
}

fn require_file(path: &Path, what: &str) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{what} {} not found", path.display()))?;
    if !meta.is_file() {
        bail!("{what} {} is not a regular file", path.display());
    }
    Ok(())
}

/// Everything `fnvm-vmm` needs, checked.
#[derive(Debug, PartialEq, Eq)]
struct VmmInvocation {
    args: Vec<String>,
}

fn plan(args: &BootArgs, caps: HostCapabilities) -> Result<VmmInvocation> {
    let kernel = args
        .kernel
        .as_deref()
        .context("no kernel: pass --kernel PATH")?;
    require_file(kernel, "kernel")?;
    let format = detect_kernel_format(kernel)?;
    fnvm_vmm::vmm::validate_vcpus(args.vcpus)?;
    fnvm_vmm::memory::validate_size(args.memory)?;
    caps.check_can_boot(format)?;

    let mut disks = Vec::new();
    if let Some(rootfs) = &args.rootfs {
        require_file(rootfs, "rootfs")?;
        disks.push((rootfs.clone(), true));
    }
    for spec in &args.disks {
        let (path, ro) = parse_disk(spec)?;
        require_file(&path, "disk")?;
        disks.push((path, ro));
    }
    if let Some(initrd) = &args.initrd {
        require_file(initrd, "initrd")?;
    }

    let mut cmdline = DEFAULT_CMDLINE.to_string();
    if args.rootfs.is_some() {
        cmdline.push_str(" root=/dev/vda ro");
    }
    if let Some(extra) = args.cmdline.as_deref().filter(|c| !c.trim().is_empty()) {
        cmdline.push(' ');
        cmdline.push_str(extra.trim());
    }

    let mut v = vec![
        "--kernel".to_string(),
        kernel.display().to_string(),
        "--memory".into(),
        args.memory.to_string(),
        "--vcpus".into(),
        args.vcpus.to_string(),
        "--cmdline".into(),
        cmdline,
    ];
    if let Some(initrd) = &args.initrd {
        v.push("--initrd".into());
        v.push(initrd.display().to_string());
    }
    for (path, ro) in disks {
        v.push("--disk".into());
        v.push(format!("{}{}", path.display(), if ro { ":ro" } else { "" }));
    }
    Ok(VmmInvocation { args: v })
}

/// The `fnvm-vmm` binary installed next to this executable.
fn vmm_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running fnvm executable")?;
    let dir = exe
        .parent()
        .context("the fnvm executable has no parent directory")?;
    let vmm = dir.join("fnvm-vmm");
    if !vmm.is_file() {
        bail!(
            "fnvm-vmm not found at {} (it is installed next to fnvm; build it with \
             `cargo build -p fnvm-vmm`)",
            vmm.display()
        );
    }
    Ok(vmm)
}

/// A sentence for each `fnvm-vmm` exit code.
fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status.code() {
        Some(c) => match c as u8 {
            code::CLEAN => "the guest shut down cleanly".into(),
            code::VMM_ERROR => "the VMM failed (see its message above)".into(),
            code::BAD_INPUT => "the VMM refused its input (see its message above)".into(),
            code::GUEST_PANIC => "the guest kernel panicked".into(),
            code::TRIPLE_FAULT => "the guest triple-faulted".into(),
            code::INTERNAL_ERROR => "KVM hit an internal error running the guest".into(),
            code::FAIL_ENTRY => "the CPU refused to enter the guest".into(),
            code::HALTED => "the guest halted for good".into(),
            code::STOPPED => "the VM was stopped".into(),
            other => format!("fnvm-vmm exited with unknown code {other}"),
        },
        None => format!(
            "fnvm-vmm was killed by signal {}",
            status.signal().unwrap_or_default()
        ),
    }
}

fn boot(args: &BootArgs) -> Result<ExitCode> {
    let invocation = plan(args, HostCapabilities::probe())?;
    let vmm = vmm_binary()?;
    let mut child = Command::new(&vmm)
        .args(&invocation.args)
        .spawn()
        .with_context(|| format!("cannot start {}", vmm.display()))?;
    // Ctrl-C reaches fnvm-vmm too (same process group); fnvm stays to report the ending.
    // SAFETY: SIG_IGN for SIGINT touches no Rust state.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait().context("cannot wait for fnvm-vmm")?;
    eprintln!("fnvm: {}", describe_exit(status));
    Ok(match status.code() {
        Some(c) => ExitCode::from(c as u8),
        None => ExitCode::FAILURE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn args(kernel: Option<PathBuf>) -> BootArgs {
        BootArgs {
            kernel,
            rootfs: None,
            disks: vec![],
            memory: 64,
            vcpus: 1,
            cmdline: None,
            initrd: None,
        }
    }

    const HW: HostCapabilities = HostCapabilities {
        kvm: true,
        hardware_virtualization: true,
    };
    const PVM: HostCapabilities = HostCapabilities {
        kvm: true,
        hardware_virtualization: false,
    };

    fn bzimage(dir: &Path) -> PathBuf {
        let mut image = vec![0u8; 0x400];
        image[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        image[0x202..0x206].copy_from_slice(b"HdrS");
        let path = dir.join("bzImage");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&image)
            .unwrap();
        path
    }

    #[test]
    fn disk_specs() {
        assert_eq!(
            parse_disk("/a.img:ro").unwrap(),
            (PathBuf::from("/a.img"), true)
        );
        assert_eq!(
            parse_disk("/b.img").unwrap(),
            (PathBuf::from("/b.img"), false)
        );
        assert!(parse_disk(":ro").is_err());
    }

    #[test]
    fn rootfs_comes_first_read_only_with_root_on_the_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = bzimage(dir.path());
        let rootfs = dir.path().join("rootfs.img");
        let data = dir.path().join("data.img");
        std::fs::write(&rootfs, [0u8; 512]).unwrap();
        std::fs::write(&data, [0u8; 512]).unwrap();
        let mut a = args(Some(kernel));
        a.rootfs = Some(rootfs.clone());
        a.disks = vec![data.display().to_string()];
        a.cmdline = Some("init=/agent".into());
        let plan = plan(&a, HW).unwrap();
        let cmdline_at = plan.args.iter().position(|x| x == "--cmdline").unwrap();
        let cmdline = &plan.args[cmdline_at + 1];
        assert!(cmdline.starts_with(DEFAULT_CMDLINE));
        assert!(
            cmdline.ends_with("root=/dev/vda ro init=/agent"),
            "{cmdline}"
        );
        let disks: Vec<&String> = plan
            .args
            .iter()
            .zip(plan.args.iter().skip(1))
            .filter(|(k, _)| *k == "--disk")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            disks,
            vec![
                &format!("{}:ro", rootfs.display()),
                &data.display().to_string()
            ]
        );
    }

    #[test]
    fn linux_kernel_on_a_host_without_vmx_or_svm_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let err = plan(&args(Some(bzimage(dir.path()))), PVM).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("no hardware virtualization"), "{msg}");
        assert!(msg.contains("process sandbox"), "{msg}");
    }

    #[test]
    fn bad_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = plan(&args(Some(dir.path().join("nope"))), HW).unwrap_err();
        assert!(format!("{missing:#}").contains("nope"), "{missing:#}");
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello").unwrap();
        let not_kernel = plan(&args(Some(text)), HW).unwrap_err();
        assert!(format!("{not_kernel:#}").contains("not a kernel"));
        let kernel = bzimage(dir.path());
        let mut a = args(Some(kernel.clone()));
        a.memory = 0;
        assert!(format!("{:#}", plan(&a, HW).unwrap_err()).contains("at least 1 MiB"));
        let mut a = args(Some(kernel.clone()));
        a.vcpus = 0;
        assert!(format!("{:#}", plan(&a, HW).unwrap_err()).contains("at least 1 vCPU"));
        let mut a = args(Some(kernel));
        a.disks = vec![dir.path().join("absent.img").display().to_string()];
        assert!(format!("{:#}", plan(&a, HW).unwrap_err()).contains("absent.img"));
        let no_kernel = plan(&args(None), HW).unwrap_err();
        assert!(format!("{no_kernel:#}").contains("--kernel"));
    }

    #[test]
    fn exit_codes_are_described() {
        use std::os::unix::process::ExitStatusExt;
        let s = |c: i32| describe_exit(std::process::ExitStatus::from_raw(c << 8));
        assert_eq!(s(0), "the guest shut down cleanly");
        assert!(s(3).contains("panicked"));
        assert!(s(4).contains("triple"));
    }
}
