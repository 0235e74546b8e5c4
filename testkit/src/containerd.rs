//! A containerd of the test's own: Debian's containerd 1.6 (`/usr/bin/containerd`, which
//! `scripts/setup.sh tests` installs) as a child process, driven with `ctr` the way a node
//! drives it. The whole-system tests of fnvm's containerd shim v2 (`containerd-shim-fnvm-v2`,
//! runtime [`FNVM_RUNTIME`]) run containers through it, and the harness itself is proven with
//! containerd's own runc runtime ([`RUNC_RUNTIME`], tests/containerd_harness.rs).
//!
//! Everything of a [`Containerd`] is in one directory of its own, `<base>/ctrd-XXXXXX`: its
//! config, root, state (where the shims' bundles and the containers' rootfs mounts are), the
//! gRPC and ttrpc sockets, runc's state and the FIFOs of [`Containerd::run`]; its log is beside
//! it, `<base>/ctrd-XXXXXX.log`. The containers [`Containerd::run`] starts get cgroups under a
//! parent named after the directory (`/fnvm-ctrd-XXXXXX/<id>` in every hierarchy). Drop (or
//! [`Containerd::stop`]) removes its containers, stops containerd, kills what is left in those
//! cgroups and every shim of this containerd, unmounts what is mounted under the directory and
//! removes it: nothing is left running or mounted. [`Footprint::assert_nothing_left`] checks.
//!
//! What containerd 1.6 keeps outside the directory whatever its config says: the shims' sockets
//! in `/run/containerd/s/` (named by a hash of the socket, namespace and container id, removed
//! by the shims as they exit; the footprint checks them), and `ctr`'s FIFOs in
//! `/run/containerd/fifo` unless `--fifo-dir` is given (as [`Containerd::run`] does).
//!
//! The shim v2 of a runtime `io.containerd.NAME.v2` is the binary `containerd-shim-NAME-v2`,
//! which containerd looks up on its PATH when a container of that runtime starts (with the CRI
//! plugin disabled there is no other runtime registry): [`ContainerdBuilder::shim_dir`] puts
//! the directory holding it first there. The shims inherit containerd's environment, so
//! [`ContainerdBuilder::env`] reaches them too (e.g. `FNVM_HOME`).

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::level::loud;

/// The containerd namespace every `ctr` command of the fixture works in.
pub const NAMESPACE: &str = "fnvm-test";
/// fnvm's runtime: containerd runs the shim binary `containerd-shim-fnvm-v2` for it.
pub const FNVM_RUNTIME: &str = "io.containerd.fnvm.v2";
/// containerd's own runc runtime (Debian's `containerd-shim-runc-v2`, with `/usr/sbin/runc`).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";

/// Debian's containerd.
const CONTAINERD: &str = "/usr/bin/containerd";
/// Debian's containerd client, found on PATH.
const CTR: &str = "ctr";
/// How long containerd gets to answer on its socket after it was started.
const START_LIMIT: Duration = Duration::from_secs(20);
/// How long containerd gets to exit after SIGTERM, and the processes left after SIGKILL to die.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// The `--timeout` of the `ctr` commands of the teardown (a wedged containerd must not hang it).
const TEARDOWN_CTR_TIMEOUT: &str = "20s";
/// Plugins a test's containerd does without: the CRI plugin (a kubelet's API, which would want
/// CNI), snapshotters needing their own filesystems or devices, and tracing exporters.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
];
/// Where containerd 1.6 puts the shims' sockets whatever its state directory.
const SHIM_SOCKETS: &str = "/run/containerd/s";
/// The longest path a unix socket may have (sun_path holds 108 bytes with the NUL).
const SOCKET_PATH_MAX: usize = 107;

/// How to start a [`Containerd`]: [`Containerd::builder`], then [`start`](Self::start).
#[derive(Debug, Clone)]
pub struct ContainerdBuilder {
    base: PathBuf,
    shim_dirs: Vec<PathBuf>,
    env: Vec<(OsString, OsString)>,
    log_level: String,
}

impl ContainerdBuilder {
    /// Puts `dir`, which must hold a shim binary (`containerd-shim-*-v2`), first on
    /// containerd's PATH, so runtimes of that name resolve to it (e.g. the directory of
    /// `containerd-shim-fnvm-v2` for [`FNVM_RUNTIME`]). May be given more than once.
    pub fn shim_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.shim_dirs.push(dir.into());
        self
    }

    /// Sets `key=value` in containerd's environment, which the shims it starts inherit.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// containerd's log level (`info` unless set; `debug` logs every request).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Starts containerd and waits until its socket answers (`ctr version`). Panics, saying
    /// what failed and with containerd's log tail, where it cannot (not root, containerd not
    /// installed, no answer within 20 s).
    pub fn start(self) -> Containerd {
        Containerd::start_with(self)
    }
}

/// A running containerd of the test's own, stopped and removed (with everything it ran) on
/// drop. See the module's documentation for where its files are.
#[derive(Debug)]
pub struct Containerd {
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    snapshotter: &'static str,
    /// The ids [`run`](Self::run) started containers as (for the shim sockets the footprint
    /// checks).
    ids: Mutex<Vec<String>>,
    stopped: bool,
}

/// A task as `ctr task ls` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    pub id: String,
    /// The task's init process on the host (0 once it is gone).
    pub pid: u32,
    /// `CREATED`, `RUNNING`, `STOPPED`, `PAUSED`, …
    pub status: String,
}

/// What a [`Containerd`] could leave on the host: taken with [`Containerd::footprint`] before it
/// is stopped, checked with [`assert_nothing_left`](Self::assert_nothing_left) after.
#[derive(Debug, Clone)]
pub struct Footprint {
    dir: PathBuf,
    cgroup_parent: String,
    shim_sockets: Vec<PathBuf>,
}

impl Containerd {
    /// A containerd with its directory (and log) in `base`, e.g. cargo's scratch directory for
    /// tests (`Here::tmp`). The directory's path must be short enough for a unix socket.
    pub fn builder(base: impl Into<PathBuf>) -> ContainerdBuilder {
        ContainerdBuilder {
            base: base.into(),
            shim_dirs: Vec::new(),
            env: Vec::new(),
            log_level: "info".into(),
        }
    }

    fn start_with(b: ContainerdBuilder) -> Containerd {
        assert!(
            nix::unistd::geteuid().is_root(),
            "a containerd of the test's own needs root (mounts, namespaces, cgroups)"
        );
        assert!(
            Path::new(CONTAINERD).is_file(),
            "{CONTAINERD} is missing: Debian's containerd package is needed (scripts/setup.sh \
             tests installs it)"
        );
        for dir in &b.shim_dirs {
            let has_shim = std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("cannot read the shim directory {}: {e}", dir.display()))
                .flatten()
                .any(|e| {
                    let name = e.file_name().to_string_lossy().to_string();
                    name.starts_with("containerd-shim-") && name.ends_with("-v2")
                });
            assert!(
                has_shim,
                "the shim directory {} holds no containerd-shim-*-v2 binary",
                dir.display()
            );
        }
        std::fs::create_dir_all(&b.base)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", b.base.display()));
        let template = b.base.join("ctrd-XXXXXX");
        let dir = nix::unistd::mkdtemp(&template)
            .unwrap_or_else(|e| panic!("cannot make a directory {}: {e}", template.display()));
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let log = b.base.join(format!("{name}.log"));
        let mut containerd = Containerd {
            dir,
            log,
            child: None,
            snapshotter: "overlayfs",
            ids: Mutex::new(Vec::new()),
            stopped: false,
        };
        // From here on a failure still removes the directory: the drop does.
        let ttrpc = containerd.ttrpc_address();
        assert!(
            ttrpc.as_os_str().len() <= SOCKET_PATH_MAX,
            "containerd's socket {} is longer than a unix socket's {SOCKET_PATH_MAX} bytes: \
             give Containerd::builder a shorter base directory",
            ttrpc.display()
        );
        for sub in ["root", "state", "fifo", "runc"] {
            let path = containerd.dir.join(sub);
            std::fs::create_dir(&path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        }
        let config = containerd.dir.join("config.toml");
        std::fs::write(&config, containerd.config(&b.log_level))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let log = File::create(&containerd.log)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", containerd.log.display()));
        let log_too = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup {}: {e}", containerd.log.display()));
        let mut path = std::env::join_paths(&b.shim_dirs)
            .unwrap_or_else(|e| panic!("a shim directory cannot go on PATH: {e}"));
        if !path.is_empty() {
            path.push(":");
        }
        path.push(std::env::var_os("PATH").unwrap_or_default());
        // Debian's runc is /usr/sbin/runc, and containerd-shim-runc-v2 looks it up on PATH.
        path.push(":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
        let mut cmd = Command::new(CONTAINERD);
        cmd.arg("--config")
            .arg(&config)
            .env("PATH", path)
            .envs(b.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too);
        // SAFETY: runs in the forked child before exec and only makes the prctl(2) system call.
        // containerd gets SIGTERM when the thread that started it ends (a test that died without
        // unwinding must not leave it running); its shims are not its children, the drop or a
        // later leak check deals with them.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CONTAINERD}: {e}"));
        containerd.child = Some(child);
        containerd.wait_until_answering();
        containerd.snapshotter = containerd.pick_snapshotter();
        containerd
    }

    /// containerd's config: `version = 2`, everything under the fixture's directory.
    fn config(&self, log_level: &str) -> String {
        let q = |p: &Path| toml_string(&p.to_string_lossy());
        let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| toml_string(p)).collect();
        format!(
            "version = 2\n\
             root = {root}\n\
             state = {state}\n\
             disabled_plugins = [{disabled}]\n\
             \n\
             [grpc]\n  address = {grpc}\n\
             \n\
             [ttrpc]\n  address = {ttrpc}\n\
             \n\
             [debug]\n  level = {level}\n\
             \n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt}\n",
            root = q(&self.dir.join("root")),
            state = q(&self.dir.join("state")),
            disabled = disabled.join(", "),
            grpc = q(&self.address()),
            ttrpc = q(&self.ttrpc_address()),
            level = toml_string(log_level),
            opt = q(&self.dir.join("root/opt")),
        )
    }

    /// Polls `ctr version` until containerd answers; panics with its log tail if it exits first
    /// or does not answer within [`START_LIMIT`].
    fn wait_until_answering(&mut self) {
        let deadline = Instant::now() + START_LIMIT;
        loop {
            let child = self.child.as_mut().expect("containerd was started");
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "containerd exited ({status}) before its socket answered; its log {}:\n{}",
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            let out = self.ctr_global(&["version"]);
            if out.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "containerd did not answer on {} within {START_LIMIT:?} (`ctr version`: {}); \
                     its log {}:\n{}",
                    self.address().display(),
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log.display(),
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// overlayfs where its plugin loaded (its init mounts a test overlay in the root, so `ok`
    /// means overlay mounts work there), else native (plain copies: slower, works anywhere).
    fn pick_snapshotter(&self) -> &'static str {
        let plugins = self.ctr_ok(&["plugins", "ls"]);
        let overlay_ok = plugins.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&"io.containerd.snapshotter.v1")
                && f.get(1) == Some(&"overlayfs")
                && f.last() == Some(&"ok")
        });
        if overlay_ok {
            return "overlayfs";
        }
        loud(&format!(
            "containerd {}: the overlayfs snapshotter did not load here (`ctr plugins ls -d` \
             says why), using native",
            self.dir.display()
        ));
        "native"
    }

    /// The fixture's directory (config, root, state, sockets).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's gRPC socket (what `ctr --address` takes).
    pub fn address(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// containerd's ttrpc socket (where shims publish their events).
    pub fn ttrpc_address(&self) -> PathBuf {
        self.dir.join("containerd.sock.ttrpc")
    }

    /// containerd's log (its stdout and stderr, the shims' logs included): beside the
    /// directory, kept after a failed test, removed after a clean stop.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of containerd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The snapshotter the fixture's `ctr` commands use: `overlayfs` or `native`.
    pub fn snapshotter(&self) -> &'static str {
        self.snapshotter
    }

    /// The cgroup parent of the containers [`run`](Self::run) starts: `/fnvm-ctrd-XXXXXX`.
    pub fn cgroup_parent(&self) -> String {
        format!("/fnvm-{}", self.dir.file_name().unwrap().to_string_lossy())
    }

    /// `ctr --address SOCK --namespace fnvm-test ARGS…` with the fixture's snapshotter
    /// (`CONTAINERD_SNAPSHOTTER`), run to completion. Panics only where ctr cannot be run.
    pub fn ctr<S: AsRef<OsStr>>(&self, args: &[S]) -> Output {
        let mut cmd = Command::new(CTR);
        cmd.arg("--address")
            .arg(self.address())
            .arg("--namespace")
            .arg(NAMESPACE)
            .env("CONTAINERD_SNAPSHOTTER", self.snapshotter)
            .args(args)
            .stdin(Stdio::null());
        cmd.output().unwrap_or_else(|e| {
            panic!("cannot run {CTR} (Debian's containerd package, scripts/setup.sh tests): {e}")
        })
    }

    /// [`ctr`](Self::ctr) that must succeed: its stdout, or a panic with its stderr and
    /// containerd's log tail.
    pub fn ctr_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> String {
        let out = self.ctr(args);
        if !out.status.success() {
            let shown: Vec<String> = args
                .iter()
                .map(|a| a.as_ref().to_string_lossy().to_string())
                .collect();
            panic!(
                "`ctr {}` failed ({}): {}\n{}\ncontainerd's log {}:\n{}",
                shown.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim(),
                self.log.display(),
                self.log_tail(30)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr` without a namespace (e.g. `version`), never panicking.
    fn ctr_global(&self, args: &[&str]) -> Output {
        Command::new(CTR)
            .arg("--address")
            .arg(self.address())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {CTR} (Debian's containerd package, scripts/setup.sh tests): {e}"
                )
            })
    }

    /// Imports an OCI (or docker) image archive (`ctr image import`, unpacked for the
    /// fixture's snapshotter); returns the image's name (the first one when it holds several).
    pub fn import(&self, archive: &Path) -> String {
        let out = self.ctr_ok(&[
            OsStr::new("images"),
            OsStr::new("import"),
            archive.as_os_str(),
        ]);
        // `unpacking NAME (sha256:…)...done`, one line per image.
        out.lines()
            .find_map(|l| l.strip_prefix("unpacking ")?.split(" (").next())
            .map(str::to_string)
            .unwrap_or_else(|| {
                panic!(
                    "`ctr images import {}` named no image: {out}",
                    archive.display()
                )
            })
    }

    /// `ctr run OPTS… IMAGE ID ARGS…` with the fixture's FIFO directory, cgroup
    /// (`<cgroup_parent>/ID`) and, for the runc runtime (ctr's default), runc's state directory
    /// in front of `opts`, e.g. `&["--rm", "--runtime", FNVM_RUNTIME, "--with-ns",
    /// "network:/run/netns/NAME"]`, or `-d` for a container left running. Empty `args` run the
    /// image's command.
    pub fn run(&self, opts: &[&str], image: &str, id: &str, args: &[&str]) -> Output {
        self.ids.lock().unwrap().push(id.to_string());
        let mut all: Vec<OsString> = vec![
            "run".into(),
            "--fifo-dir".into(),
            self.dir.join("fifo").into(),
            "--cgroup".into(),
            format!("{}/{id}", self.cgroup_parent()).into(),
        ];
        let runtime = opts
            .windows(2)
            .find(|w| w[0] == "--runtime")
            .map(|w| w[1])
            .or_else(|| opts.iter().find_map(|o| o.strip_prefix("--runtime=")))
            .unwrap_or(RUNC_RUNTIME);
        if runtime == RUNC_RUNTIME {
            all.extend(["--runc-root".into(), self.dir.join("runc").into()]);
        }
        all.extend(opts.iter().map(OsString::from));
        all.push(image.into());
        all.push(id.into());
        all.extend(args.iter().map(OsString::from));
        self.ctr(&all)
    }

    /// The tasks `ctr task ls` lists.
    pub fn tasks(&self) -> Vec<Task> {
        self.ctr_ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some(Task {
                    id: f.first()?.to_string(),
                    pid: f.get(1)?.parse().ok()?,
                    status: f.get(2)?.to_string(),
                })
            })
            .collect()
    }

    /// The task `id`, if `ctr task ls` lists it.
    pub fn task(&self, id: &str) -> Option<Task> {
        self.tasks().into_iter().find(|t| t.id == id)
    }

    /// Waits until the task `id` has `status` (e.g. `RUNNING`, `STOPPED`); panics after `limit`
    /// saying what it had.
    pub fn wait_for_task(&self, id: &str, status: &str, limit: Duration) -> Task {
        let deadline = Instant::now() + limit;
        loop {
            let task = self.task(id);
            match task {
                Some(t) if t.status == status => return t,
                _ if Instant::now() > deadline => panic!(
                    "task {id} is not {status} after {limit:?}: {task:?}; containerd's log {}:\n{}",
                    self.log.display(),
                    self.log_tail(30)
                ),
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The ids of the containers `ctr container ls -q` lists.
    pub fn containers(&self) -> Vec<String> {
        self.ctr_ok(&["container", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    /// What to check once the fixture is stopped.
    pub fn footprint(&self) -> Footprint {
        let address = self.address();
        let shim_sockets = self
            .ids
            .lock()
            .unwrap()
            .iter()
            .map(|id| shim_socket(&address, id))
            .collect();
        Footprint {
            dir: self.dir.clone(),
            cgroup_parent: self.cgroup_parent(),
            shim_sockets,
        }
    }

    /// Stops containerd and removes everything of it (as the drop does), panicking if anything
    /// could not be removed.
    pub fn stop(mut self) {
        self.stopped = true;
        if let Err(e) = self.teardown() {
            panic!("containerd {}: {e}", self.dir.display());
        }
    }

    /// Removes the tasks and containers (best effort, through ctr), stops containerd (SIGTERM,
    /// then SIGKILL), kills its shims and what is left in its containers' cgroups, unmounts
    /// what is mounted under the directory, removes the cgroups and the directory.
    fn teardown(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        let running = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if running {
            self.remove_containers();
        }
        if let Some(mut child) = self.child.take() {
            if let Err(e) = stop_child(&mut child) {
                errors.push(e);
            }
        }
        let address = self.address().to_string_lossy().into_owned();
        let parent = self.cgroup_parent();
        if let Err(e) = kill_until_gone(|| {
            let mut pids = processes_mentioning(&address);
            pids.extend(processes_in_cgroups(&parent));
            pids
        }) {
            errors.push(e);
        }
        if let Err(e) = unmount_under(&self.dir) {
            errors.push(e);
        }
        if let Err(e) = remove_cgroups(&parent) {
            errors.push(e);
        }
        // Where `ctr run` was called without --cgroup: /fnvm-test/ID. Removed once empty (a
        // concurrent fixture's containers keep it).
        for hierarchy in cgroup_hierarchies() {
            let _ = std::fs::remove_dir(hierarchy.join(NAMESPACE));
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                errors.push(format!("cannot remove {}: {e}", self.dir.display()));
            }
        }
        if errors.is_empty() && !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            loud(&format!(
                "containerd {}: its log is kept in {}",
                self.dir.display(),
                self.log.display()
            ));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Force-deletes every task (`ctr task delete -f` kills it first) and deletes every
    /// container with its snapshot. Failures are only reported: what they leave, the rest of
    /// the teardown removes.
    fn remove_containers(&self) {
        let ctr = |args: &[&str]| {
            let mut all = vec!["--timeout", TEARDOWN_CTR_TIMEOUT];
            all.extend_from_slice(args);
            self.ctr(&all)
        };
        let list = |what: &str| -> Vec<String> {
            let out = ctr(&[what, "ls", "-q"]);
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_string)
                .filter(|l| !l.is_empty())
                .collect()
        };
        for id in list("task") {
            let out = ctr(&["task", "delete", "-f", &id]);
            if !out.status.success() {
                loud(&format!(
                    "containerd {}: `ctr task delete -f {id}` failed: {}",
                    self.dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        for id in list("container") {
            let out = ctr(&["container", "delete", &id]);
            if !out.status.success() {
                loud(&format!(
                    "containerd {}: `ctr container delete {id}` failed: {}",
                    self.dir.display(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
}

impl Drop for Containerd {
    /// [`stop`](Containerd::stop) unless it was called: a failure panics (or, when already
    /// panicking, says so on stderr).
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        if let Err(e) = self.teardown() {
            if std::thread::panicking() {
                loud(&format!("containerd {}: {e}", self.dir.display()));
            } else {
                panic!("containerd {}: {e}", self.dir.display());
            }
        }
    }
}

impl Footprint {
    /// Asserts nothing of the stopped containerd is left: no process naming its directory (in
    /// its command line or as its working directory: containerd, shims), no mount under it, no
    /// cgroup of its containers, no shim socket of the containers [`Containerd::run`] started,
    /// no directory.
    pub fn assert_nothing_left(&self) {
        let dir = self.dir.to_string_lossy().into_owned();
        for (pid, cmdline) in all_processes() {
            assert!(
                !cmdline.contains(&dir),
                "process {pid} of containerd {dir} is left behind: {cmdline}"
            );
            if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
                assert!(
                    !cwd.starts_with(&self.dir),
                    "process {pid} ({cmdline}) is left behind in {}",
                    cwd.display()
                );
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .expect("cannot read /proc/self/mountinfo");
        for line in mountinfo.lines() {
            assert!(!line.contains(&dir), "a mount is left behind: {line}");
        }
        for hierarchy in cgroup_hierarchies() {
            let cgroup = hierarchy.join(self.cgroup_parent.trim_start_matches('/'));
            assert!(
                !cgroup.exists(),
                "the cgroup {} is left behind",
                cgroup.display()
            );
        }
        for socket in &self.shim_sockets {
            assert!(
                !socket.exists(),
                "a shim's socket {} is left behind",
                socket.display()
            );
        }
        assert!(!self.dir.exists(), "{dir} is left behind");
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The socket containerd 1.6's shims listen on for the container `id` of the namespace
/// [`NAMESPACE`]: `/run/containerd/s/<sha256 of "ADDRESS/NAMESPACE/ID">`.
fn shim_socket(address: &Path, id: &str) -> PathBuf {
    use sha2::Digest as _;
    let path = address.join(NAMESPACE).join(id);
    let hash = sha2::Sha256::digest(path.to_string_lossy().as_bytes());
    Path::new(SHIM_SOCKETS).join(hex::encode(hash))
}

/// SIGTERM, up to [`STOP_LIMIT`] to exit, then SIGKILL; reaps it.
fn stop_child(child: &mut Child) -> Result<(), String> {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_LIMIT;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(_)) => return Ok(()),
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for containerd: {e}")),
        }
    }
    loud(&format!(
        "containerd {pid} did not exit {STOP_LIMIT:?} after SIGTERM: SIGKILL"
    ));
    let _ = child.kill();
    child
        .wait()
        .map(|_| ())
        .map_err(|e| format!("cannot wait for containerd: {e}"))
}

/// SIGKILLs what `find` finds until it finds nothing (new processes included).
fn kill_until_gone(find: impl Fn() -> Vec<(Pid, String)>) -> Result<(), String> {
    let deadline = Instant::now() + STOP_LIMIT;
    loop {
        let left = find();
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let described: Vec<String> = left.iter().map(|(p, c)| format!("{p} ({c})")).collect();
            return Err(format!(
                "processes still there {STOP_LIMIT:?} after SIGKILL: {}",
                described.join(", ")
            ));
        }
        for (pid, _) in left {
            // ESRCH: it died between the scan and now, which is what we want.
            let _ = kill(pid, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every process but this one, with its command line (zombies have none and are left out).
fn all_processes() -> Vec<(Pid, String)> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .expect("cannot read /proc")
        .flatten()
    {
        let pid = entry.file_name().to_string_lossy().to_string();
        if pid == me || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.is_empty() {
            continue;
        }
        let cmdline = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim()
            .to_string();
        found.push((
            Pid::from_raw(pid.parse().expect("a numeric /proc entry")),
            cmdline,
        ));
    }
    found
}

/// The processes (but this one) whose command line contains `what` (a shim's names
/// containerd's socket; a sandbox's names its fnvm home).
pub fn processes_mentioning(what: &str) -> Vec<(Pid, String)> {
    all_processes()
        .into_iter()
        .filter(|(_, c)| c.contains(what))
        .collect()
}

/// The cgroup hierarchies: /sys/fs/cgroup where it is cgroup v2, else its v1 hierarchies (and
/// the hybrid layout's `unified`).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("cgroup.procs").exists())
        .map(|e| e.path())
        .collect()
}

/// The cgroups at and below `dir`, children before parents.
fn cgroups_below(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                found.extend(cgroups_below(&e.path()));
            }
        }
    }
    if dir.is_dir() {
        found.push(dir.to_path_buf());
    }
    found
}

/// The processes in the cgroup `parent` (e.g. `/fnvm-ctrd-XXXXXX`) or below, in any hierarchy.
fn processes_in_cgroups(parent: &str) -> Vec<(Pid, String)> {
    let mut found = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        for cgroup in cgroups_below(&hierarchy.join(parent.trim_start_matches('/'))) {
            let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                    .unwrap_or_default();
                if !found.iter().any(|(p, _)| *p == Pid::from_raw(pid)) {
                    found.push((Pid::from_raw(pid), cmdline));
                }
            }
        }
    }
    found
}

/// Removes the cgroup `parent` and the cgroups below it in every hierarchy (they must be
/// empty of processes by now).
fn remove_cgroups(parent: &str) -> Result<(), String> {
    let mut errors = Vec::new();
    for hierarchy in cgroup_hierarchies() {
        for cgroup in cgroups_below(&hierarchy.join(parent.trim_start_matches('/'))) {
            if let Err(e) = std::fs::remove_dir(&cgroup) {
                errors.push(format!(
                    "cannot remove the cgroup {}: {e}",
                    cgroup.display()
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// The mount points under `dir` in /proc/self/mountinfo, last mounted first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.reverse();
    found
}

/// A mountinfo path with its octal escapes (`\040` for a space, …) decoded.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(digits)) = (bytes[i], octal) {
            let value = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
            out.push(value as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything mounted under `dir` (what a shim or containerd left): a plain unmount,
/// else a lazy one.
fn unmount_under(dir: &Path) -> Result<(), String> {
    use nix::mount::{umount2, MntFlags};
    for mount in mounts_under(dir) {
        if umount2(&mount, MntFlags::empty()).is_err() {
            if let Err(e) = umount2(&mount, MntFlags::MNT_DETACH) {
                return Err(format!("cannot unmount {}: {e}", mount.display()));
            }
            loud(&format!(
                "containerd {}: {} was busy, unmounted lazily",
                dir.display(),
                mount.display()
            ));
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("still mounted: {left:?}"))
    }
}
