//! fnvm-agent: PID 1 of a function instance, a static binary.
//!
//! - In a VM (no arguments) it brings the guest up (/proc, /sys, /dev), prints
//!   `fnvm-agent: up after <uptime> s`, and reads the kernel command line: with
//!   `fnvm.rootfs=DEV fnvm.writable=DEV` it runs a function instance; without them it runs the
//!   `fnvm.test=` actions of fnvm's Linux-guest tests. Either way the VM then ends (sync, reboot).
//! - In the process sandbox (`--sandbox process --socket-dir DIR`, the disks on standard input)
//!   it is PID 1 of fresh namespaces on the host and runs a function instance, then exits.
//!
//! A function instance: the agent's private root with the overlay of the two disks, listeners
//! on the control and function ports, the function started on the host's Start, and the
//! instance ended when the function ends (or on Stop).
//!
//! PID 1 must never panic or, in a VM, exit (the kernel would panic in turn): every error is
//! printed and the instance ended in order.

mod bridge;
mod cmdline;
mod config;
mod console;
mod guest_root;
mod launch;
mod lines;
mod link;
mod mounts;
mod net;
mod output_drain;
mod refresh;
mod request_head;
mod shutdown;
mod supervisor;
mod test_actions;
mod threads;
mod transport;
mod user;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use fnvm_agent::protocol::{CONTROL_PORT, FUNCTION_PORT};

use config::{Config, ConfigError, Sandbox};
use guest_root::GuestRootError;
use mounts::MountError;
use net::NetError;
use test_actions::TestActionError;
use transport::Transport;

/// Why the agent cannot bring the guest up or run its instance (printed, then the instance
/// ends). One enum over the modules' own errors: the agent is a static PID 1 with no other
/// dependencies, and every message here is what the console shows.
#[derive(Debug, thiserror::Error)]
enum AgentError {
    /// The kernel file systems (or a test action's disk) cannot be mounted.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// The kernel command line names no instance to run.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A test action cannot be parsed or did not run.
    #[error(transparent)]
    TestAction(#[from] TestActionError),
    /// The agent's root or the function's cannot be set up.
    #[error(transparent)]
    GuestRoot(#[from] GuestRootError),
    /// Loopback cannot be brought up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A /proc file the boot reads cannot be read.
    #[error("cannot read {path}: {cause}")]
    ReadProc {
        path: &'static str,
        cause: io::Error,
    },
    /// /proc/uptime does not start with a number.
    #[error("/proc/uptime is malformed: {0:?}")]
    Uptime(String),
    /// A port the host connects to cannot be listened on.
    #[error("cannot listen on the {name} port {port}: {cause}")]
    Listen {
        name: &'static str,
        port: u32,
        cause: io::Error,
    },
    /// The directory for the agent's private root cannot be made.
    #[error("cannot create {}: {cause}", path.display())]
    CreateDir { path: PathBuf, cause: io::Error },
    /// A thread of the agent cannot be started.
    #[error("cannot start the {name} thread: {cause}")]
    Thread { name: String, cause: io::Error },
}

/// Where the agent's private root is mounted in the process sandbox: a directory every host
/// has (its content is hidden in the agent's mount namespace only).
const PROCESS_ROOT_AT: &str = "/tmp";

/// Whether this agent runs in a VM (a panic reboots) or the process sandbox (a panic exits).
static IN_VM: AtomicBool = AtomicBool::new(true);

fn main() {
    // Mounting over /proc, pivoting and rebooting are only right for the init of a guest or of
    // a fresh PID namespace; anywhere else (say, run by hand on a host as root) they would hit
    // the host.
    if std::process::id() != 1 {
        eprintln!(
            "{}error: not PID 1; the agent runs only as a guest's init",
            console::PREFIX
        );
        std::process::exit(2);
    }
    // A Rust panic here would kill PID 1; turn it into a printed error and a clean end.
    std::panic::set_hook(Box::new(|info| {
        console::line(&format!("error: internal panic: {info}"));
        end_instance(1);
    }));

    let args: Vec<String> = std::env::args().skip(1).collect();
    let args = match cmdline::invocation(&args) {
        cmdline::Invocation::Vm { ignored } => vm_main(ignored),
        cmdline::Invocation::Host(args) => args,
    };
    IN_VM.store(false, Ordering::SeqCst);
    match config::from_args(args) {
        Ok(config) => {
            let code = match run_instance(&config) {
                Ok(()) => 0,
                Err(e) => {
                    console::line(&format!("error: {e}"));
                    1
                }
            };
            end_instance(code)
        }
        Err(e) => {
            eprintln!("{}error: {e}\n{}", console::PREFIX, config::USAGE);
            std::process::exit(2);
        }
    }
}

/// Ends this instance: in a VM, sync and reset; in the process sandbox, unmount and exit
/// (the namespaces die with their init).
fn end_instance(code: i32) -> ! {
    if IN_VM.load(Ordering::SeqCst) {
        shutdown::reboot();
    }
    for e in guest_root::unmount_all() {
        console::line(&format!("error: {e}"));
    }
    std::process::exit(code)
}

/// PID 1 of a VM; `ignored` are the command-line words the kernel passed on to init.
fn vm_main(ignored: &[String]) -> ! {
    if let Err(err) = vm_boot(ignored) {
        console::line(&format!("error: {err}"));
    }
    shutdown::reboot();
}

fn vm_boot(ignored: &[String]) -> Result<(), AgentError> {
    mounts::mount_kernel_filesystems()?;
    console::attach();
    console::line(&format!("up after {} s", read_uptime()?));
    if !ignored.is_empty() {
        console::line(&format!(
            "warning: ignoring the command-line words the kernel passed to init: {}",
            ignored.join(" ")
        ));
    }

    let cmdline =
        std::fs::read_to_string("/proc/cmdline").map_err(|cause| AgentError::ReadProc {
            path: "/proc/cmdline",
            cause,
        })?;
    match config::from_cmdline(&cmdline) {
        Some(config) => run_instance(&config?),
        None => {
            for action in cmdline::test_actions(&cmdline) {
                let action = test_actions::Action::parse(action)?;
                test_actions::run(&action)?;
            }
            Ok(())
        }
    }
}

/// Runs one function instance to its end. Errors before the listeners exist end the instance
/// at once (the host sees the agent end); later set-up errors are kept and reported to the
/// host as the Start's failure.
fn run_instance(config: &Config) -> Result<(), AgentError> {
    raise_fd_limit();
    let transport = match &config.sandbox {
        Sandbox::Vm => Transport::Vsock,
        Sandbox::Process { socket_dir, .. } => {
            // What the host passed (the control socket; a standby's socket directory, named as
            // /proc/self/fd/N) is the agent's alone: nothing it execs inherits it.
            // SAFETY: close_range with CLOSE_RANGE_CLOEXEC marks descriptors; no memory involved.
            unsafe {
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
                );
            }
            guest_root::make_mounts_private()?;
            Transport::Unix {
                dir: socket_dir.clone(),
            }
        }
    };
    let listen = |name, port| {
        transport
            .listen(port)
            .map_err(|cause| AgentError::Listen { name, port, cause })
    };
    let control = match &config.sandbox {
        Sandbox::Process {
            socket_dir,
            control_fd: Some(fd),
            ..
        } => transport::UnixSocketListener::inherit(*fd, socket_dir, CONTROL_PORT)
            .map(|l| Box::new(l) as Box<dyn transport::Listener>)
            .map_err(|cause| AgentError::Listen {
                name: "control",
                port: CONTROL_PORT,
                cause,
            })?,
        _ => listen("control", CONTROL_PORT)?,
    };
    let function = listen("function", FUNCTION_PORT)?;
    // The process sandbox's disks come once the ports listen: the host picks them while the
    // agent starts, or keeps the agent as a standby until a function needs it.
    // Any existing directory works for the private root in the process sandbox: the tmpfs
    // over it is seen only in this mount namespace. Not the socket directory: a standby's is
    // renamed when it is taken and reached through a descriptor of the host's mount
    // namespace, which nothing can be mounted on here.
    let (disks, private_root_at, prepared) = match (&config.disks, &config.sandbox) {
        (Some(disks), _) => (disks.clone(), PathBuf::from("/fnvm"), false),
        (None, Sandbox::Process { writable, .. }) => {
            let at = PathBuf::from(PROCESS_ROOT_AT);
            // A standby: the half of the root that needs no function is made while it waits.
            if let Some(writable) = writable {
                guest_root::prepare(&at, writable)?;
            }
            let disks = config::read_placement(&mut io::stdin().lock(), writable.as_deref())?;
            (disks, at, writable.is_some())
        }
        (None, Sandbox::Vm) => return Err(ConfigError::PartialDisks.into()),
    };

    let setup = (|| -> Result<(), AgentError> {
        if config.sandbox == Sandbox::Vm {
            std::fs::create_dir_all(&private_root_at).map_err(|cause| AgentError::CreateDir {
                path: private_root_at.clone(),
                cause,
            })?;
        }
        if prepared {
            guest_root::finish(&private_root_at, &disks.rootfs)?;
        } else {
            guest_root::enter(&private_root_at, &disks.rootfs, &disks.writable)?;
        }
        net::bring_up_loopback()?;
        net::prefer_handshake_retries_to_syn_cookies()?;
        net::allow_unprivileged_ping()?;
        Ok(())
    })();
    if let Err(e) = &setup {
        console::line(&format!("error: {e}"));
    }

    let outbox = link::outbox::Outbox::new();
    let supervisor = supervisor::Supervisor::new(
        outbox.clone(),
        PathBuf::from(guest_root::FUNCTION_ROOT),
        setup.err().map(|e| e.to_string()),
        config.sandbox == Sandbox::Vm,
    );
    spawn("outbox", {
        let outbox = outbox.clone();
        move || outbox.run_sender()
    })?;
    spawn("control-accept", {
        let (s, o) = (supervisor.clone(), outbox.clone());
        move || link::serve(control, s, o)
    })?;
    spawn("bridge-accept", move || bridge::serve(function, outbox))?;
    console::line(&format!(
        "listening for the host on ports {CONTROL_PORT} (control) and {FUNCTION_PORT} (function)"
    ));
    supervisor.run();
    Ok(())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), AgentError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(|_| ())
        .map_err(|cause| AgentError::Thread {
            name: name.into(),
            cause,
        })
}

/// Each bridged stream holds two sockets and two pipes; the kernel's default soft limit of
/// 1024 descriptors would cap concurrent requests near 170.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit on this frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The guest's uptime as the kernel reports it (first field of /proc/uptime, e.g. "0.42").
fn read_uptime() -> Result<String, AgentError> {
    let text = std::fs::read_to_string("/proc/uptime").map_err(|cause| AgentError::ReadProc {
        path: "/proc/uptime",
        cause,
    })?;
    text.split_whitespace()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| AgentError::Uptime(text.clone()))
}
