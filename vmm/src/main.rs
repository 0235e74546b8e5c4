//! `fnvm-vmm`: the per-instance VMM process. One process runs one micro-VM: console on stdout
//! (input from stdin), one final status line on stderr, and an exit code per way the VM ended.
//!
//! Start-up is kept minimal (no async runtime, no logging set-up unless FNVM_LOG is set)
//! because the time from process start to the guest's first serial byte is benchmarked.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Instant;

use fnvm_vmm::arch::x86_64::boot::KernelConfig;
use fnvm_vmm::devices::virtio::net::{MacAddr, DEFAULT_MAC};
use fnvm_vmm::exit::{code, VmExit};
use fnvm_vmm::persist::RestoreConfig;
use fnvm_vmm::vmm::{Vm, VmConfig, DEFAULT_CMDLINE};

const USAGE: &str = "\
fnvm-vmm: runs one KVM micro-VM and exits when the guest ends

usage: fnvm-vmm --kernel PATH [--initrd PATH] [--cmdline STR] [--memory MiB]
                [--vcpus N] [--disk PATH[:ro]]... [--vsock PATH [--vsock-cid N]]
                [--net PATH[,mac=MAC]] [--api-sock PATH]
       fnvm-vmm --restore DIR [--disk PATH[:ro]]... [--vsock PATH] [--net PATH]
                [--api-sock PATH]
       fnvm-vmm --standby [--memory MiB] [--vcpus N] --api-sock PATH

  --kernel PATH      Linux bzImage or vmlinux (64-bit Linux boot protocol); any other
                     ELF64 or ELF32 with a Xen PVH note: 32-bit PVH entry, EBX =
                     hvm_start_info (ELF32 without one: its entry, same mode; ELF64
                     without one: its entry in 64-bit mode). Segments load at >= 1 MiB.
  --initrd PATH      initial ramdisk
  --cmdline STR      the whole kernel command line (virtio_mmio.device= entries are
                     appended); default:
                     console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux
                     i8042.nopnp i8042.dumbkbd
  --memory MiB       guest RAM (default 128; at most the host's MemTotal)
  --vcpus N          vCPUs (default 1; at most the host's CPU count)
  --disk PATH[:ro]   a virtio-blk disk, read-only with :ro (first is /dev/vda); repeatable
  --vsock PATH       a virtio-vsock device: host programs connect to the Unix socket PATH
                     and send `CONNECT <port>\\n`; guest connections to host port P go to
                     PATH_P. PATH must not exist; it is removed on exit
  --vsock-cid N      the guest's vsock CID (default 3)
  --net PATH[,mac=MAC]
                     a virtio-net device (eth0 in the guest) connected to passt listening
                     on the Unix socket PATH (`passt --socket PATH`: QEMU's stream protocol,
                     each frame after its 32-bit big-endian length); PATH must exist. The
                     guest sees an MTU of 65520 and a link that is up; its address comes from
                     the command line (ip=ADDR::GW:MASK::eth0:off) or DHCP. MAC defaults to
                     02:66:6e:76:6d:00. If passt goes away the guest keeps running without
                     network (its frames are dropped)
  --jail DIR         as the VM starts, move into mount, network, ipc and uts namespaces
                     of the VMM's own whose root holds only DIR (repeatable; same paths,
                     read-write, nosuid,nodev,noexec): e.g. the directory of the --vsock
                     socket and of snapshots it will write. Everything else was opened
                     before. Needs root (CAP_SYS_ADMIN). A standby takes its jail from the
                     restore request's \"jail\":[\"DIR\",...] (as well)
  --uid UID:GID      as the VM starts (after the jail, before the seccomp filters), become
                     UID:GID (no supplementary groups; every capability goes with root):
                     files the VMM writes then (snapshots) are UID's, and the directories
                     it writes into must be writable by it. Not 0; needs root to switch
  --no-confinement   run unconfined (for debugging): by default, once the VM is set up,
                     the VMM enters its jail (if any), drops every capability, sets
                     no_new_privs and puts each thread under a seccomp allow-list (vCPU
                     threads, the VMM thread); a call outside it stops the VMM with exit
                     code 9 and a line naming the thread and the call
  --api-sock PATH    serve the control API on the Unix socket PATH (must not exist; removed
                     on exit): one JSON request per line, one JSON reply per line:
                     {\"op\":\"pause\"}, {\"op\":\"resume\"}, {\"op\":\"snapshot\",\"dir\":\"DIR\"} (DIR must
                     not exist; a running VM is paused for it and resumed after),
                     {\"op\":\"metrics\"}; replies {\"ok\":true,...} or {\"ok\":false,\"error\":\"...\"}
  --restore DIR      continue the VM saved in snapshot DIR instead of booting; memory is
                     mapped copy-on-write from DIR/memory. With --restore, --disk gives the
                     backing files of the snapshot's disks in order (required for writable
                     disks: each instance needs its own copy, e.g. a reflink or sparse copy
                     of DIR/disk-N.img); --vsock gives the vsock device a new socket path;
                     --net PATH connects the network device to a new passt (the guest keeps
                     its MAC; frames in flight at the snapshot are lost, TCP retransmits).
                     A snapshot from another fnvm-vmm version, CPU or kernel, or a corrupted
                     or truncated one, is refused (exit code 2). On exit, a second stderr
                     line reports the restore: `fnvm-vmm: restored, resumed at X ms; first
                     guest I/O at Y ms after N minor + M major page faults`
  --standby          create the VM (guest RAM, vCPUs, irqchip) now and wait on the API
                     socket for {\"op\":\"restore\",\"dir\":\"DIR\",\"disks\":[\"PATH\",...],
                     \"vsock\":\"PATH\",\"net\":\"PATH\"} (disks, vsock and net as --disk,
                     --vsock and --net of --restore);
                     the snapshot's memory file is then mapped over the standby's RAM and
                     the guest continues. The snapshot must have --memory MiB of RAM and
                     --vcpus vCPUs; one that does not fit is refused ({\"ok\":false,...}) and
                     the VMM keeps waiting. The reply {\"ok\":true,\"restore_ms\":X} comes
                     just before the vCPUs run and that connection closes; later requests
                     (pause, snapshot, metrics) use new connections. Restore times in the
                     exit report and metrics count from the request, not process start

The console is on stdout; stdin (when it is a pipe or terminal) feeds the guest's serial
input; a terminal is put in raw mode (Ctrl-C still stops the VM) and restored on exit.
On exit one line goes to stderr: `fnvm-vmm: <status> after <N> ms`, N counted from
process start.

exit codes:
  0  the guest shut down or rebooted itself (clean)
  1  VMM error at run time
  2  bad input (arguments, kernel, memory, vCPUs, disk, vsock, net); no VM was run
  3  guest kernel panic
  4  triple fault
  5  KVM internal error, unhandled exit or KVM_RUN failure
  6  VM entry failed (KVM_EXIT_FAIL_ENTRY)
  7  vCPU halted with nothing to wake it
  8  stopped by SIGTERM/SIGINT
  9  a VMM thread made a system call outside its seccomp allow-list
";

struct Args {
    restore: Option<PathBuf>,
    standby: bool,
    api_sock: Option<PathBuf>,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    memory_mib: u64,
    vcpus: u8,
    disks: Vec<(PathBuf, bool)>,
    vsock: Option<PathBuf>,
    vsock_cid: u64,
    /// `--net PATH[,mac=MAC]`: the passt socket and the MAC if one was given.
    net: Option<(PathBuf, Option<MacAddr>)>,
    /// `--no-confinement`: no jail, no seccomp filters, capabilities kept.
    no_confinement: bool,
    /// `--jail DIR`...: the directories the jail holds.
    jail: Vec<PathBuf>,
    /// `--uid UID:GID`: who the VMM becomes as its VM starts.
    identity: Option<(u32, u32)>,
}

/// Parses `PATH[,mac=MAC]`.
fn parse_net(v: &str) -> Result<(PathBuf, Option<MacAddr>), String> {
    let (path, mac) = match v.rsplit_once(",mac=") {
        Some((path, mac)) => (
            path,
            Some(mac.parse::<MacAddr>().map_err(|e| e.to_string())?),
        ),
        None => (v, None),
    };
    if path.is_empty() {
        return Err("--net needs a passt socket path".into());
    }
    Ok((PathBuf::from(path), mac))
}

fn parse_args(mut argv: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = DEFAULT_CMDLINE.to_string();
    let mut memory_mib = 128u64;
    let mut vcpus = 1u8;
    let mut disks = Vec::new();
    let mut vsock = None;
    let mut vsock_cid = 3u64;
    let mut net = None;
    let mut restore = None;
    let mut standby = false;
    let mut no_confinement = false;
    let mut jail = Vec::new();
    let mut identity = None;
    let mut api_sock = None;
    let mut boot_only = Vec::new();
    while let Some(arg) = argv.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if flag == "--help" || flag == "-h" {
            return Ok(None);
        }
        if flag == "--standby" {
            standby = true;
            continue;
        }
        if flag == "--no-confinement" {
            no_confinement = true;
            continue;
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| argv.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        if matches!(
            flag.as_str(),
            "--kernel" | "--initrd" | "--cmdline" | "--memory" | "--vcpus" | "--vsock-cid"
        ) {
            boot_only.push(flag.clone());
        }
        match flag.as_str() {
            "--restore" => restore = Some(PathBuf::from(value()?)),
            "--api-sock" => api_sock = Some(PathBuf::from(value()?)),
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = value()?,
            "--memory" => {
                let v = value()?;
                memory_mib = v
                    .parse()
                    .map_err(|_| format!("--memory {v:?} is not a number of MiB"))?;
            }
            "--vcpus" => {
                let v = value()?;
                vcpus = v
                    .parse()
                    .map_err(|_| format!("--vcpus {v:?} is not a vCPU count (0-255)"))?;
            }
            "--disk" => {
                let v = value()?;
                let (path, ro) = match v.strip_suffix(":ro") {
                    Some(p) => (p.to_string(), true),
                    None => (v.clone(), false),
                };
                if path.is_empty() {
                    return Err("--disk needs a path".into());
                }
                disks.push((PathBuf::from(path), ro));
            }
            "--vsock" => vsock = Some(PathBuf::from(value()?)),
            "--jail" => jail.push(PathBuf::from(value()?)),
            "--uid" => identity = Some(parse_identity(&value()?)?),
            "--net" => {
                if net.is_some() {
                    return Err("--net can be given once (one network device)".into());
                }
                net = Some(parse_net(&value()?)?);
            }
            "--vsock-cid" => {
                let v = value()?;
                vsock_cid = v
                    .parse()
                    .map_err(|_| format!("--vsock-cid {v:?} is not a CID"))?;
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    if restore.is_some() {
        if let Some(flag) = boot_only.first() {
            return Err(format!(
                "{flag} cannot be used with --restore (the snapshot defines the VM)"
            ));
        }
        if matches!(net, Some((_, Some(_)))) {
            return Err(
                "--net ...,mac= cannot be used with --restore (the guest keeps its MAC)".into(),
            );
        }
    }
    if standby {
        let not_with_standby = ["--restore", "--kernel", "--initrd", "--cmdline"];
        let given = [
            restore.is_some(),
            kernel.is_some(),
            initrd.is_some(),
            cmdline != DEFAULT_CMDLINE,
        ];
        if let Some((flag, _)) = not_with_standby.iter().zip(given).find(|(_, g)| *g) {
            return Err(format!(
                "{flag} cannot be used with --standby (the restore request names the snapshot)"
            ));
        }
        if !disks.is_empty()
            || vsock.is_some()
            || net.is_some()
            || boot_only.iter().any(|f| f == "--vsock-cid")
        {
            return Err(
                "--disk, --vsock, --vsock-cid and --net cannot be used with --standby (the \
                 restore request gives disks, vsock and net)"
                    .into(),
            );
        }
        if api_sock.is_none() {
            return Err("--standby needs --api-sock PATH (restore requests come there)".into());
        }
    }
    let kernel = match (&restore, kernel) {
        (Some(_), _) => PathBuf::new(),
        (None, _) if standby => PathBuf::new(),
        (None, k) => k.ok_or("--kernel PATH is required (see --help)")?,
    };
    Ok(Some(Args {
        restore,
        standby,
        api_sock,
        kernel,
        initrd,
        cmdline,
        memory_mib,
        vcpus,
        disks,
        vsock,
        vsock_cid,
        net,
        no_confinement,
        jail,
        identity,
    }))
}

/// `UID:GID`, both non-zero whole numbers (root is what the VMM is leaving).
fn parse_identity(text: &str) -> Result<(u32, u32), String> {
    let bad = || format!("--uid {text:?}: expected UID:GID, two non-zero whole numbers");
    let (uid, gid) = text.split_once(':').ok_or_else(bad)?;
    let uid: u32 = uid.parse().map_err(|_| bad())?;
    let gid: u32 = gid.parse().map_err(|_| bad())?;
    if uid == 0 || gid == 0 || uid == u32::MAX || gid == u32::MAX {
        return Err(bad());
    }
    Ok((uid, gid))
}

/// The stop eventfd, for the SIGTERM/SIGINT handler (write(2) is async-signal-safe).
static STOP_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_terminate(_: libc::c_int) {
    let fd = STOP_FD.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local to an eventfd; async-signal-safe.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

fn install_terminate_handlers(fd: i32) {
    STOP_FD.store(fd, Ordering::Relaxed);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: installs a handler that only calls write(2); no Rust state is touched.
        unsafe { libc::signal(sig, on_terminate as *const () as libc::sighandler_t) };
    }
}

fn finish(start: Instant, status: &str, code: u8) -> ExitCode {
    eprintln!(
        "fnvm-vmm: {status} after {} ms",
        start.elapsed().as_millis()
    );
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let start = Instant::now();
    if std::env::var_os("FNVM_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("FNVM_LOG"))
            .with_writer(std::io::stderr)
            .init();
    }
    if std::env::var_os("FNVM_VMM_TEST_TRIGGERS").is_some_and(|v| v == "1") {
        fnvm_vmm::confine::violation::enable_test_trigger();
    }
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(Some(a)) => a,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => return finish(start, &format!("bad input: {e}"), code::BAD_INPUT),
    };
    if !args.jail.is_empty() {
        if let Err(e) = fnvm_vmm::confine::Jail::new(&args.jail) {
            return finish(start, &format!("bad input: {e}"), code::BAD_INPUT);
        }
    }
    let mut vm = None;
    let result = match &args.restore {
        Some(dir) => restore(&args, dir, start, &mut vm),
        None if args.standby => standby(&args, &mut vm),
        None => run(&args, &mut vm),
    };
    let code = match result {
        Ok(exit) => finish(start, &exit.to_string(), exit.exit_code()),
        Err((status, c)) => finish(start, &status, c),
    };
    if let Some(metrics) = vm.as_ref().and_then(Vm::restore_metrics) {
        eprintln!("fnvm-vmm: {metrics}");
    }
    if let Some(path) = &args.api_sock {
        let _ = std::fs::remove_file(path);
    }
    // The VM is released after the status line: its teardown in the host kernel takes a few
    // milliseconds that belong to no guest.
    drop(vm);
    code
}

fn run(args: &Args, slot: &mut Option<Vm>) -> Result<VmExit, (String, u8)> {
    let bad = |e: &dyn std::fmt::Display| (format!("bad input: {e}"), code::BAD_INPUT);
    // Decide what the kernel is before creating anything: a wrong file costs no VM.
    fnvm_vmm::arch::x86_64::boot::detect_kernel_format(&args.kernel).map_err(|e| bad(&e))?;
    let mut config = VmConfig::new(args.memory_mib, args.vcpus);
    config.console_input = Some(libc::STDIN_FILENO);
    let vm = slot.insert(Vm::new(config).map_err(|e| bad(&e))?);
    for (path, ro) in &args.disks {
        vm.add_disk(path, *ro).map_err(|e| bad(&e))?;
    }
    if let Some(path) = &args.vsock {
        vm.add_vsock(args.vsock_cid, path).map_err(|e| bad(&e))?;
    }
    if let Some((path, mac)) = &args.net {
        vm.add_net(path, mac.unwrap_or(DEFAULT_MAC))
            .map_err(|e| bad(&e))?;
    }
    vm.load_kernel(&KernelConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
    })
    .map_err(|e| bad(&e))?;
    if let Some(path) = &args.api_sock {
        vm.serve_api(path).map_err(|e| bad(&e))?;
    }
    run_vm(vm, args)
}

/// `--restore DIR`: the snapshot's VM with this invocation's disks, vsock path, passt socket
/// and console.
fn restore(
    args: &Args,
    dir: &std::path::Path,
    start: Instant,
    slot: &mut Option<Vm>,
) -> Result<VmExit, (String, u8)> {
    let bad = |e: &dyn std::fmt::Display| (format!("bad input: {e}"), code::BAD_INPUT);
    // --disk PATH in order replaces the snapshot's disks (virtio slots in order, skipping
    // the vsock and the network device, which the snapshot places after the disks).
    let disks = args
        .disks
        .iter()
        .enumerate()
        .map(|(i, (path, _))| (i, path.clone()))
        .collect();
    let vm = slot.insert(
        Vm::restore(RestoreConfig {
            dir: dir.to_path_buf(),
            console: Box::new(std::io::stdout()),
            console_input: Some(libc::STDIN_FILENO),
            disks,
            vsock: args.vsock.clone(),
            net: args.net.as_ref().map(|(path, _)| path.clone()),
            since: start,
        })
        .map_err(|e| bad(&e))?,
    );
    if let Some(path) = &args.api_sock {
        vm.serve_api(path).map_err(|e| bad(&e))?;
    }
    run_vm(vm, args)
}

/// `--standby`: the VM now, the snapshot when a restore request names it.
fn standby(args: &Args, slot: &mut Option<Vm>) -> Result<VmExit, (String, u8)> {
    let bad = |e: &dyn std::fmt::Display| (format!("bad input: {e}"), code::BAD_INPUT);
    let standby =
        fnvm_vmm::standby::Standby::new(args.memory_mib, args.vcpus).map_err(|e| bad(&e))?;
    let path = args
        .api_sock
        .as_deref()
        .ok_or_else(|| bad(&"--standby needs --api-sock"))?;
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(|e| {
        bad(&format!(
            "cannot bind the API socket {}: {e}",
            path.display()
        ))
    })?;
    let console = fnvm_vmm::standby::Console {
        output: Box::new(std::io::stdout()),
        input: Some(libc::STDIN_FILENO),
    };
    let vm =
        fnvm_vmm::standby::serve_until_restore(standby, &listener, console).map_err(|e| bad(&e))?;
    let vm = slot.insert(vm);
    vm.serve_api_listener(listener);
    run_vm(vm, args)
}

/// Runs the VM, confined (jail, capabilities, seccomp per thread) unless `--no-confinement`.
fn run_vm(vm: &mut Vm, args: &Args) -> Result<VmExit, (String, u8)> {
    if !args.no_confinement {
        let error = |e: &dyn std::fmt::Display| (format!("VMM error: {e}"), code::VMM_ERROR);
        let mut confinement = fnvm_vmm::confine::Confinement::new().map_err(|e| error(&e))?;
        let dirs: Vec<PathBuf> = args.jail.iter().chain(vm.jail_dirs()).cloned().collect();
        if !dirs.is_empty() {
            let jail = fnvm_vmm::confine::Jail::new(&dirs)
                .map_err(|e| (format!("bad input: {e}"), code::BAD_INPUT))?;
            confinement = confinement.with_jail(jail);
        }
        if let Some((uid, gid)) = args.identity {
            confinement = confinement.with_identity(uid, gid);
        }
        vm.confine(confinement);
    }
    install_terminate_handlers(vm.stop_handle_fd());
    let raw_terminal = fnvm_vmm::terminal::RawTerminal::enable(libc::STDIN_FILENO);
    let result = vm.run();
    drop(raw_terminal);
    STOP_FD.store(-1, Ordering::Relaxed);
    result.map_err(|e| (format!("VMM error: {e}"), code::VMM_ERROR))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare word on a kernel command line that the kernel does not know is handed to init as
    /// an argument (`nomodule` killed the agent as PID 1): every default word names a kernel
    /// parameter (`key=value`) or a built-in driver's (`driver.key`), and the help shows it.
    #[test]
    fn the_default_command_line_hands_init_nothing_and_the_help_shows_it() {
        let help: Vec<&str> = USAGE.split_whitespace().collect();
        for word in DEFAULT_CMDLINE.split_whitespace() {
            assert!(
                word.contains('=') || word.contains('.'),
                "{word:?} would reach init as an argument"
            );
            assert!(help.contains(&word), "the help does not show {word:?}");
        }
    }

    fn args(list: &[&str]) -> Result<Option<Args>, String> {
        parse_args(list.iter().map(|s| s.to_string()))
    }

    #[test]
    fn net_takes_a_socket_and_an_optional_mac() {
        let a = args(&["--kernel", "k", "--net", "/run/p.sock"])
            .unwrap()
            .unwrap();
        assert_eq!(a.net, Some((PathBuf::from("/run/p.sock"), None)));
        let a = args(&["--kernel", "k", "--net=/run/p,x.sock,mac=02:00:00:00:00:07"])
            .unwrap()
            .unwrap();
        let (path, mac) = a.net.unwrap();
        assert_eq!(path, PathBuf::from("/run/p,x.sock"));
        assert_eq!(mac.unwrap().to_string(), "02:00:00:00:00:07");
        for bad in [
            &["--kernel", "k", "--net", "/p,mac=02:00"][..],
            &["--kernel", "k", "--net", ",mac=02:00:00:00:00:07"],
            &["--kernel", "k", "--net", "/a", "--net", "/b"],
            &["--restore", "d", "--net", "/p,mac=02:00:00:00:00:07"],
            &["--standby", "--api-sock", "/a", "--net", "/p"],
        ] {
            assert!(args(bad).is_err(), "{bad:?} accepted");
        }
        let a = args(&["--restore", "d", "--net", "/p"]).unwrap().unwrap();
        assert_eq!(a.net, Some((PathBuf::from("/p"), None)));
    }
}
