//! `fnvm run` as a child process, as the run tests and benchmarks drive it: its output lines
//! read by threads, its serving address and instance id, Ctrl-C and exit.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Lines a child printed, shared with the thread that reads them.
#[derive(Default)]
pub struct Lines {
    lines: Mutex<Vec<String>>,
    changed: Condvar,
    closed: Mutex<bool>,
}

impl Lines {
    pub fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits until some line satisfies `f`; returns it.
    pub fn wait_for(&self, limit: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + limit;
        let mut guard = self.lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| f(l)) {
                return Some(l.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            guard = self.changed.wait_timeout(guard, left).unwrap().0;
        }
    }
}

fn pump(stream: impl std::io::Read + Send + 'static, lines: Arc<Lines>) {
    std::thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            lines.lines.lock().unwrap().push(line);
            lines.changed.notify_all();
        }
        *lines.closed.lock().unwrap() = true;
        lines.changed.notify_all();
    });
}

/// A running `fnvm run`.
pub struct FnvmRun {
    pub child: Child,
    pub stdout: Arc<Lines>,
    pub stderr: Arc<Lines>,
    pub addr: Option<SocketAddr>,
    pub instance_id: Option<String>,
    pub home: PathBuf,
}

/// Environment for every fnvm child: the static agent.
pub fn fnvm_command(fnvm: &Path, home: &Path, agent: &Path) -> Command {
    let mut cmd = Command::new(fnvm);
    cmd.env("FNVM_AGENT_BIN", agent)
        .arg("--home")
        .arg(home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl FnvmRun {
    /// Starts `fnvm run IMAGE --listen 127.0.0.1:0 ARGS...` and waits until it serves (or
    /// ends, or `limit` passes).
    pub fn start(
        fnvm: &Path,
        home: &Path,
        agent: &Path,
        image: &str,
        args: &[&str],
        limit: Duration,
    ) -> FnvmRun {
        let mut cmd = fnvm_command(fnvm, home, agent);
        cmd.arg("run")
            .arg(image)
            .args(["--listen", "127.0.0.1:0"])
            .args(args);
        let mut child = cmd.spawn().expect("cannot start fnvm");
        let stdout = Arc::new(Lines::default());
        let stderr = Arc::new(Lines::default());
        pump(child.stdout.take().unwrap(), Arc::clone(&stdout));
        pump(child.stderr.take().unwrap(), Arc::clone(&stderr));
        let mut run = FnvmRun {
            child,
            stdout,
            stderr,
            addr: None,
            instance_id: None,
            home: home.to_path_buf(),
        };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(line) = run.stderr.wait_for(Duration::from_millis(100), |l| {
                l.contains("fnvm: serving the")
            }) {
                let url = line
                    .split("http://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .expect("the serving line names the address");
                run.addr = Some(url.parse().expect("a socket address"));
                let started = run
                    .stderr
                    .wait_for(Duration::from_secs(1), |l| l.contains("fnvm: started in"))
                    .expect("a started line comes before the serving line");
                run.instance_id = started
                    .split("instance ")
                    .nth(1)
                    .map(|s| s.trim().to_string());
                break;
            }
            if run.child.try_wait().unwrap().is_some() {
                // Let the readers drain.
                std::thread::sleep(Duration::from_millis(200));
                break;
            }
        }
        run
    }

    /// Panics with everything fnvm printed unless it serves.
    pub fn expect_serving(&self) -> SocketAddr {
        self.addr.unwrap_or_else(|| {
            panic!(
                "fnvm run did not serve.\nstderr:\n{}\nstdout:\n{}",
                self.stderr.snapshot().join("\n"),
                self.stdout.snapshot().join("\n")
            )
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.expect_serving())
    }

    /// Sends SIGINT (like Ctrl-C) and waits for the exit.
    pub fn interrupt(&mut self, limit: Duration) -> ExitStatus {
        // SAFETY: kill(2) with a pid we own (our child, not yet reaped) has no memory effects.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        self.wait(limit)
    }

    /// Waits for fnvm to exit (killing it after `limit`).
    pub fn wait(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "fnvm did not exit within {limit:?}.\nstderr:\n{}",
                    self.stderr.snapshot().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// fnvm's own peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc/PID/status")
    }

    /// `(stream, line)` of every function log line fnvm printed (`<time> <stream> <line>`).
    pub fn log_lines(&self) -> Vec<(String, String)> {
        self.stdout
            .snapshot()
            .iter()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ' ');
                let _time = parts.next()?;
                let stream = parts.next()?;
                let line = parts.next().unwrap_or("");
                Some((stream.to_string(), line.to_string()))
            })
            .collect()
    }
}

impl Drop for FnvmRun {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: as in `interrupt`.
            unsafe {
                libc::kill(self.child.id() as i32, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if self.child.try_wait().ok().flatten().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
