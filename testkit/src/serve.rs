//! `fnvm serve` as a child process, as the service tests drive it: started on a free port of
//! loopback, its stderr in a file the test reads, stopped with SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::registry::free_port;
use crate::run::fnvm_command;

/// `fnvm serve` as a child process; its stderr goes to a file the test reads.
pub struct Serve {
    pub child: Child,
    pub stderr_path: PathBuf,
    pub addr: SocketAddr,
}

impl Serve {
    /// Starts `fnvm serve --listen 127.0.0.1:0 --sandbox process ARGS` and waits for it to serve.
    pub fn start(fnvm: &Path, home: &Path, agent: &Path, args: &[&str]) -> Serve {
        Self::start_in("process", fnvm, home, agent, args)
    }

    /// Starts `fnvm serve --listen 127.0.0.1:0 --sandbox SANDBOX ARGS` and waits for it to serve.
    pub fn start_in(sandbox: &str, fnvm: &Path, home: &Path, agent: &Path, args: &[&str]) -> Serve {
        let stderr_path = home.join(format!("serve-stderr-{}.log", free_port()));
        let err = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = fnvm_command(fnvm, home, agent);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--sandbox", sandbox])
            .args(args)
            .env("FNVM_LOG", "fnvm=info")
            .stdout(Stdio::null())
            .stderr(err);
        let mut child = cmd.spawn().expect("cannot start fnvm serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("fnvm: serving the API on"))
            {
                break line
                    .split("http://")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .unwrap()
                    .parse()
                    .unwrap();
            }
            if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("fnvm serve did not serve; stderr:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Serve {
            child,
            stderr_path,
            addr,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("fnvm serve did not stop within 30 s of SIGTERM");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
