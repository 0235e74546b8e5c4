//! Shared helpers for fnvm's benchmarks: each benchmark is a binary in `src/bin/` that prints a
//! table of medians and ratios against a peer measured in the same run.

pub mod nginx;

use std::process::{Command, Stdio};
use std::time::Duration;

/// Why a peer cannot run here.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer's program is not installed or cannot be started.
    #[error("cannot run {program} ({source}; Debian package {package})")]
    Missing {
        program: String,
        package: String,
        #[source]
        source: std::io::Error,
    },
    /// The peer's check command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// Whether a peer's command can run here (`program args…` exits 0), or why not: a bench whose
/// peer cannot run says so and still measures fnvm.
pub fn peer_runs(program: &str, args: &[&str], package: &str) -> Result<(), PeerError> {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(PeerError::Failed {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
        Err(source) => Err(PeerError::Missing {
            program: program.to_string(),
            package: package.to_string(),
            source,
        }),
    }
}

/// The mark after a figure that misses its target ("" when it is met).
pub fn missed(met: bool) -> &'static str {
    if met {
        ""
    } else {
        "  MISSED"
    }
}

/// Stops a server the bench started: SIGTERM, so it can stop what it runs itself, then
/// SIGKILL if it has not exited within `grace`.
pub fn stop(child: &mut std::process::Child, grace: Duration) {
    // SAFETY: kill(2) on our own child's pid; no memory involved.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// The median of `samples` (the mean of the middle two for an even count).
pub fn median(samples: &[Duration]) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    match s.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2,
    }
}

/// The nearest-rank `q` quantile (0.99 for p99) of `samples`.
pub fn quantile(samples: &[Duration], q: f64) -> Duration {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Milliseconds with one decimal.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `value / base` as `1.23x`, or `-` without a base.
pub fn ratio(value: Duration, base: Option<Duration>) -> String {
    match base {
        Some(b) if !b.is_zero() => format!("{:.2}x", value.as_secs_f64() / b.as_secs_f64()),
        _ => "-".to_owned(),
    }
}

/// A plain text table: a header row, then rows, columns padded to fit.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text; the first column left-aligned, the others right-aligned.
    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |row: &[String]| {
            let mut out = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map(String::as_str).unwrap_or("");
                let pad = width - cell.chars().count();
                if i == 0 {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str("  ");
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
            }
            out.trim_end().to_owned() + "\n"
        };
        let mut out = line(&self.header);
        out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * columns.saturating_sub(1)));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
        }
        out
    }

    pub fn print(&self) {
        print!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_quantiles_and_tables() {
        let d = |n| Duration::from_millis(n);
        assert_eq!(median(&[d(3), d(1), d(2)]), d(2));
        assert_eq!(
            median(&[d(4), d(1), d(2), d(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(quantile(&(1..=100).map(d).collect::<Vec<_>>(), 0.99), d(99));
        assert_eq!(ratio(d(3), Some(d(2))), "1.50x");
        let mut t = Table::new(&["what", "median"]);
        t.row(vec!["a".into(), ms(d(5))]);
        assert_eq!(t.render(), "what  median\n------------\na     5.0 ms\n");
    }

    #[test]
    fn a_peer_that_cannot_run_says_why() {
        peer_runs("true", &[], "coreutils").unwrap();
        let missing = peer_runs("fnvm-no-such-peer", &["--version"], "nothing")
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("cannot run fnvm-no-such-peer"),
            "{missing}"
        );
        assert!(missing.contains("Debian package nothing"), "{missing}");
        let failing = peer_runs("sh", &["-c", "echo broken >&2; exit 3"], "dash")
            .unwrap_err()
            .to_string();
        assert!(failing.contains("broken"), "{failing}");
    }
}
