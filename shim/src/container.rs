//! One container of containerd's, as one fnvm instance: created (bundle read, rootfs image
//! built, log fifos open), running (the function in its sandbox, its front on port 9000 of the
//! pod's network namespace), stopped (its exit status kept until containerd deletes it), and
//! deleted (nothing left: instance, image, mounts).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::SystemTime;

use fnvm::function::FunctionSettings;
use fnvm::home::Home;
use fnvm::invoke::front::Front;
use fnvm::network::{HostNetwork, NetworkPolicy};
use fnvm::sandbox::cgroup::watch::OUT_OF_MEMORY;
use fnvm::sandbox::{self, Instance, InstanceSpec, SandboxKind};
use fnvm_rootfs_builder::rootfs::build_rootfs_image;

use crate::bundle::{BundleError, Function};
use crate::logs::Logs;
use crate::mounts::{unmount, Mount};

/// How long a call may take at the function's front: a pod's requests are its own to time
/// (Knative's queue-proxy and the kubelet have theirs); this only bounds a stuck one.
const INVOCATION_TIMEOUT_S: u32 = 900;

/// What a function gets between SIGTERM and SIGKILL when containerd sends any other signal
/// than SIGKILL: Kubernetes' default termination grace (the kubelet sends SIGKILL itself when
/// its own grace is over, and that kills at once).
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a container operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// the bundle cannot run as an fnvm function
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// mounting the rootfs failed
    #[error("cannot mount the rootfs: {0}")]
    Mount(#[from] crate::mounts::MountError),
    /// building the rootfs image failed
    #[error("cannot build the rootfs image {image} from {rootfs}: {source}")]
    Image {
        image: PathBuf,
        rootfs: PathBuf,
        source: Box<fnvm_rootfs_builder::rootfs::RootfsError>,
    },
    /// fnvm's home cannot be used
    #[error("fnvm's home: {0}")]
    Home(#[from] fnvm::home::HomeError),
    /// the function did not start
    #[error("the function did not start: {0}")]
    Start(Box<sandbox::SandboxError>),
    /// an I/O step failed
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// the operation does not fit the container's state
    #[error("container {id} is {state}: cannot {action}")]
    State {
        id: String,
        state: &'static str,
        action: &'static str,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
    let what = what.into();
    move |source| ContainerError::Io { what, source }
}

impl From<sandbox::SandboxError> for ContainerError {
    fn from(e: sandbox::SandboxError) -> Self {
        ContainerError::Start(Box::new(e))
    }
}

/// How a container ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// The function's exit code, or 128 + the signal that ended it.
    pub status: u32,
    pub at: SystemTime,
    /// Its memory limit's OOM killer ended it.
    pub oom: bool,
}

/// What runs once a container has ended (the shim publishes its exit event).
pub type OnExit = Box<dyn FnOnce(&Container, Exit) + Send>;

/// Where a container is in its life.
pub enum Phase {
    Created,
    /// A pod's sandbox container, started: nothing runs, it ends when it is killed.
    Holding {
        on_exit: OnExit,
    },
    Running {
        instance: Arc<dyn Instance>,
        /// The front's async runtime (dropped with the instance).
        runtime: tokio::runtime::Runtime,
    },
    Stopped(Exit),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Created => "created",
            Phase::Running { .. } | Phase::Holding { .. } => "running",
            Phase::Stopped(_) => "stopped",
        }
    }
}

/// What [`Container::state`] reports.
pub struct Snapshot {
    pub phase: &'static str,
    pub pid: u32,
    pub exit: Option<Exit>,
}

/// One container.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub stdout: String,
    pub stderr: String,
    function: Function,
    logs: Logs,
    home: Home,
    /// The read-only rootfs image made from containerd's rootfs.
    image: PathBuf,
    /// The host pid of the sandbox's process while it ran (0 before).
    pid: Mutex<u32>,
    /// The signal a kill asked for: the exit status when the function left none of its own.
    killed_with: Mutex<Option<i32>>,
    phase: Mutex<Phase>,
    changed: Condvar,
    /// Held open and never read: a client that writes stdin is not blocked on its open.
    _stdin: Option<std::fs::File>,
}

impl Container {
    /// Reads the bundle, mounts containerd's `rootfs` mounts, checks the command, builds the
    /// rootfs image (then unmounts: the image holds it all) and opens the log fifos.
    pub fn create(
        id: &str,
        bundle: &Path,
        rootfs: &[(String, String, Vec<String>)],
        terminal: bool,
        stdio: [&str; 3],
    ) -> Result<Self, ContainerError> {
        if terminal {
            return Err(BundleError::Terminal.into());
        }
        let function = Function::from_bundle(bundle)?;
        let home = home()?;
        let dir = home.dir("containerd")?;
        let image = dir.join(format!("{}.img", sandbox::new_instance_id()));
        // containerd's mounts go on the bundle's rootfs; without mounts (`ctr run --rootfs`)
        // the spec's root is the rootfs.
        let root = match rootfs.is_empty() {
            true => function.root.clone(),
            false => bundle.join("rootfs"),
        };
        let mounted = match function.pod_sandbox {
            false => mount_all(rootfs, &root)?,
            true => false,
        };
        let built = (|| {
            if function.pod_sandbox {
                return Ok(());
            }
            if !root.is_dir() {
                return Err(BundleError::NoRootfs(root.clone()).into());
            }
            function.check_command(&root)?;
            build_rootfs_image(&root, &image)
                .map(|_| ())
                .map_err(|source| ContainerError::Image {
                    image: image.clone(),
                    rootfs: root.clone(),
                    source: Box::new(source),
                })
        })();
        if mounted {
            unmount(&root);
        }
        if let Err(e) = built {
            let _ = std::fs::remove_file(&image);
            return Err(e);
        }
        let [stdin, stdout, stderr] = stdio;
        let opened = Logs::open(stdout, stderr)
            .map_err(io("the task's log fifos"))
            .and_then(|logs| Ok((logs, open_stdin(stdin)?)));
        let (logs, stdin) = match opened {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_file(&image);
                return Err(e);
            }
        };
        tracing::info!(container = id, image = %image.display(), "created");
        Ok(Container {
            id: id.to_string(),
            bundle: bundle.to_path_buf(),
            stdout: stdout.to_string(),
            stderr: stderr.to_string(),
            function,
            logs,
            home,
            image,
            pid: Mutex::new(0),
            killed_with: Mutex::new(None),
            phase: Mutex::new(Phase::Created),
            changed: Condvar::new(),
            _stdin: stdin,
        })
    }

    /// Starts the function (returns once it listens on port 9000, as fnvm's starts do) and its
    /// front on port 9000 of the pod's network namespace; `on_exit` runs once it has ended.
    /// The pid is the sandbox's process.
    pub fn start(
        self: &Arc<Self>,
        on_exit: impl FnOnce(&Container, Exit) + Send + 'static,
    ) -> Result<u32, ContainerError> {
        let mut phase = self.lock();
        if !matches!(*phase, Phase::Created) {
            return Err(self.wrong_state(&phase, "start"));
        }
        if self.function.pod_sandbox {
            // The pod's placeholder: its pid is the shim's, which holds it.
            let pid = std::process::id();
            *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = pid;
            *phase = Phase::Holding {
                on_exit: Box::new(on_exit),
            };
            return Ok(pid);
        }
        // Bind first: a port that is taken fails before a slow start, not after.
        let listener = crate::port::listen(&self.function.network).map_err(io(
            "cannot listen on port 9000 in the pod's network namespace",
        ))?;
        let sandbox = sandbox::create(sandbox_kind(), &self.home, &HostNetwork::default())?;
        let id = sandbox::new_instance_id();
        let spec = InstanceSpec {
            instance_dir: sandbox::instances_root(&self.home)?.join(&id),
            id,
            rootfs_image: self.image.clone(),
            start: self.function.start.clone(),
            memory_mib: self.function.memory_mib,
            snapshot: false,
            network: NetworkPolicy::none(),
            on_log: self.logs.sink(),
        };
        let instance: Arc<dyn Instance> = Arc::from(sandbox.start(spec)?);
        let pid = instance.sandbox_pid().unwrap_or(0) as u32;
        *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = pid;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("fnvm-front")
            .build()
            .map_err(io("cannot start the front's async runtime"))?;
        let mut settings = FunctionSettings::local(self.id.clone());
        settings.memory_mib = self.function.memory_mib;
        settings.timeout_s = INVOCATION_TIMEOUT_S;
        let front = Arc::new(Front::new(
            Arc::clone(&instance),
            settings,
            self.function.function_type,
        ));
        {
            let _guard = runtime.enter();
            let listener =
                tokio::net::TcpListener::from_std(listener).map_err(io("the front's listener"))?;
            runtime.spawn(front.serve(listener, Default::default()));
        }
        *phase = Phase::Running {
            instance: Arc::clone(&instance),
            runtime,
        };
        drop(phase);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("exit".into())
            .spawn(move || {
                let report = instance.wait_exit();
                let killed = *me.killed_with.lock().unwrap_or_else(|p| p.into_inner());
                let status = match (report.code, report.signal, killed) {
                    (Some(code), _, _) => code as u32,
                    (None, Some(sig), _) | (None, None, Some(sig)) => 128 + sig as u32,
                    (None, None, None) => 255,
                };
                tracing::info!(
                    container = %me.id,
                    "the function ended: {} (code {:?}, signal {:?}; status {status})",
                    report.reason,
                    report.code,
                    report.signal
                );
                if let Err(e) = instance.stop() {
                    tracing::warn!(container = %me.id, "stopping the instance: {e}");
                }
                let exit = Exit {
                    status,
                    at: SystemTime::now(),
                    oom: report.reason.contains(OUT_OF_MEMORY),
                };
                let old = std::mem::replace(&mut *me.lock(), Phase::Stopped(exit));
                if let Phase::Running { runtime, .. } = old {
                    runtime.shutdown_background();
                }
                me.changed.notify_all();
                on_exit(&me, exit);
            })
            .map_err(io("cannot start the exit watcher"))?;
        Ok(pid)
    }

    /// Ends the function: SIGKILL kills its sandbox at once; any other signal is fnvm's stop
    /// (SIGTERM to the function, SIGKILL after [`STOP_GRACE`]), which also tears the sandbox
    /// down. Returns at once; [`Self::wait`] sees the end.
    /// A container that never started is stopped with 128 + `signal`.
    pub fn kill(self: &Arc<Self>, signal: u32) -> Result<(), ContainerError> {
        let mut phase = self.lock();
        tracing::info!(container = %self.id, "kill with signal {signal}");
        *self.killed_with.lock().unwrap_or_else(|p| p.into_inner()) = Some(signal as i32);
        match &*phase {
            Phase::Created => {
                *phase = Phase::Stopped(Exit {
                    status: 128 + signal,
                    at: SystemTime::now(),
                    oom: false,
                });
                self.changed.notify_all();
                Ok(())
            }
            Phase::Running { instance, .. } => {
                if signal == libc::SIGKILL as u32 {
                    instance.kill();
                    return Ok(());
                }
                let instance = Arc::clone(instance);
                let id = self.id.clone();
                std::thread::spawn(move || {
                    if let Err(e) = instance.stop_within(STOP_GRACE) {
                        tracing::warn!(container = %id, "stopping the instance: {e}");
                    }
                });
                Ok(())
            }
            Phase::Holding { .. } => {
                // As `pause`: SIGTERM and SIGINT end it with 0, anything else as that signal.
                let status = match signal as i32 {
                    libc::SIGTERM | libc::SIGINT => 0,
                    _ => 128 + signal,
                };
                let exit = Exit {
                    status,
                    at: SystemTime::now(),
                    oom: false,
                };
                let held = std::mem::replace(&mut *phase, Phase::Stopped(exit));
                self.changed.notify_all();
                drop(phase);
                if let Phase::Holding { on_exit } = held {
                    on_exit(self, exit);
                }
                Ok(())
            }
            // Already over: as runc's shim, a late kill (containerd's delete sends one) is fine.
            Phase::Stopped(_) => Ok(()),
        }
    }

    /// Blocks until the container has stopped.
    pub fn wait(&self) -> Exit {
        let mut phase = self.lock();
        loop {
            if let Phase::Stopped(exit) = &*phase {
                return *exit;
            }
            phase = self.changed.wait(phase).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Where it is, its pid and its exit.
    pub fn state(&self) -> Snapshot {
        let phase = self.lock();
        Snapshot {
            phase: phase.name(),
            pid: *self.pid.lock().unwrap_or_else(|p| p.into_inner()),
            exit: match &*phase {
                Phase::Stopped(exit) => Some(*exit),
                _ => None,
            },
        }
    }

    /// Removes everything: stops a function that runs (or never ran) first and waits for
    /// its end, then removes the image and anything still mounted.
    pub fn delete(self: &Arc<Self>) -> Exit {
        if !matches!(*self.lock(), Phase::Stopped(_)) {
            let _ = self.kill(libc::SIGKILL as u32);
        }
        let exit = self.wait();
        if let Err(e) = std::fs::remove_file(&self.image) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(container = %self.id, "cannot remove {}: {e}", self.image.display());
            }
        }
        unmount(&self.bundle.join("rootfs"));
        tracing::info!(container = %self.id, "deleted");
        exit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wrong_state(&self, phase: &Phase, action: &'static str) -> ContainerError {
        ContainerError::State {
            id: self.id.clone(),
            state: phase.name(),
            action,
        }
    }
}

/// fnvm's home: `FNVM_HOME` as fnvm's own commands take it (containerd passes its environment
/// to its shims), else fnvm's default.
pub fn home() -> Result<Home, fnvm::home::HomeError> {
    Home::resolve(std::env::var_os("FNVM_HOME").map(PathBuf::from))
}

/// `FNVM_SANDBOX=vm|process` if set (containerd passes its environment to shims), else the VM
/// sandbox where the host has VMX/SVM and the process sandbox elsewhere.
fn sandbox_kind() -> SandboxKind {
    match std::env::var("FNVM_SANDBOX").as_deref() {
        Ok("vm") => SandboxKind::Vm,
        Ok("process") => SandboxKind::Process,
        _ => sandbox::default_kind(),
    }
}

/// Mounts containerd's rootfs mounts (type, source, options) at `target`; true if anything
/// was mounted.
fn mount_all(
    mounts: &[(String, String, Vec<String>)],
    target: &Path,
) -> Result<bool, ContainerError> {
    if mounts.is_empty() {
        return Ok(false);
    }
    std::fs::create_dir_all(target).map_err(io(format!("cannot create {}", target.display())))?;
    let mounts: Vec<Mount<'_>> = mounts
        .iter()
        .map(|(fs_type, source, options)| Mount {
            fs_type,
            source,
            options,
        })
        .collect();
    crate::mounts::mount_all(&mounts, target)?;
    Ok(true)
}

fn open_stdin(path: &str) -> Result<Option<std::fs::File>, ContainerError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if path.is_empty() {
        return Ok(None);
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map(Some)
        .map_err(io(format!("cannot open the stdin fifo {path}")))
}
