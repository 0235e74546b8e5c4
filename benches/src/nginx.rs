//! nginx as a reverse proxy: the peer of fnvm's layer-7 path. Every request crosses one HTTP
//! proxy hop on either path, so "fnvm's throughput against nginx's, in front of the same
//! server, in the same run" says what fnvm's hop costs beyond what any good proxy pays.
//!
//! The binary comes from Debian's `nginx` package, extracted by `scripts/setup.sh bench` into
//! `/var/cache/fnvm/bench/nginx-<version>/` (installing the package would start a system nginx
//! on port 80), or from `$FNVM_NGINX`, or `nginx` on the PATH.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why the nginx peer cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum NginxError {
    /// No nginx binary in any of the places looked at.
    #[error("no nginx binary: run `scripts/setup.sh bench` (it extracts Debian's nginx into {cache}), or set FNVM_NGINX")]
    Missing { cache: String },
    /// Its working directory or configuration could not be written.
    #[error("cannot prepare nginx's directory {}", dir.display())]
    Prepare {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The binary did not start.
    #[error("cannot start {}", binary.display())]
    Start {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// It started but never accepted connections on its port.
    #[error("nginx did not listen on {addr} within 5 s: {stderr}")]
    NotListening { addr: String, stderr: String },
}

/// Where `scripts/setup.sh bench` extracts nginx.
const CACHE: &str = "/var/cache/fnvm/bench";

/// A running nginx proxying `listen` to `upstream` with kept-alive upstream connections,
/// stopped on drop.
pub struct Nginx {
    child: Child,
}

impl Nginx {
    /// Starts nginx in `dir` (its config, pid and temp files), two worker processes (as many as
    /// fnvm's front has threads on these machines), access log off, connections kept alive for
    /// as many requests as a bench sends (nginx's default closes them after 1000).
    pub fn start(
        dir: &Path,
        listen: std::net::SocketAddr,
        upstream: std::net::SocketAddr,
    ) -> Result<Self, NginxError> {
        let binary = binary()?;
        let prepare = |source| NginxError::Prepare {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir.join("tmp")).map_err(prepare)?;
        let config = format!(
            "worker_processes 2;\npid nginx.pid;\nerror_log stderr warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 10000000;\n  client_body_temp_path tmp; proxy_temp_path tmp;\n  \
             fastcgi_temp_path tmp; uwsgi_temp_path tmp; scgi_temp_path tmp;\n  \
             upstream function {{ server {upstream}; keepalive 64; keepalive_requests 10000000; }}\n  \
             server {{\n    listen {listen};\n    location / {{\n      \
             proxy_pass http://function;\n      proxy_http_version 1.1;\n      \
             proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), config).map_err(prepare)?;
        let log = dir.join("error.log");
        let stderr = std::fs::File::create(&log).map_err(prepare)?;
        let child = Command::new(&binary)
            .arg("-p")
            .arg(dir)
            .args(["-c", "nginx.conf", "-e", "stderr", "-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| NginxError::Start { binary, source })?;
        let mut nginx = Nginx { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(listen).is_err() {
            if Instant::now() > deadline || matches!(nginx.child.try_wait(), Ok(Some(_))) {
                let _ = nginx.child.kill();
                let _ = nginx.child.wait();
                return Err(NginxError::NotListening {
                    addr: listen.to_string(),
                    stderr: std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .trim()
                        .to_string(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers ("fast shutdown") and exits.
        crate::stop(&mut self.child, Duration::from_secs(5));
    }
}

/// `$FNVM_NGINX`, the newest extracted one in the cache, or `nginx` on the PATH.
fn binary() -> Result<PathBuf, NginxError> {
    if let Some(path) = std::env::var_os("FNVM_NGINX") {
        return Ok(PathBuf::from(path));
    }
    let mut extracted: Vec<PathBuf> = std::fs::read_dir(CACHE)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("nginx-"))
        .map(|e| e.path().join("usr/sbin/nginx"))
        .filter(|p| p.is_file())
        .collect();
    extracted.sort();
    if let Some(path) = extracted.pop() {
        return Ok(path);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|dir| dir.join("nginx"))
        .find(|p| p.is_file())
        .ok_or_else(|| NginxError::Missing {
            cache: CACHE.to_string(),
        })
}
