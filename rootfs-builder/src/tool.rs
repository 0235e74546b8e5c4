//! External tools (mkfs.ext4, debugfs, mkfs.erofs, e2fsck, cpio) run so that they die with
//! fnvm: a `fnvm serve` that crashes or is killed must not leave a mkfs running on its own.
//!
//! The kernel's parent-death signal (PR_SET_PDEATHSIG) is tied to the *thread* that forked the
//! child, not to the process: it fires when that thread exits, even if the rest of fnvm lives
//! on. Every caller here therefore spawns and waits on the same thread (`output`, `status`,
//! `wait_with_output`), so the forking thread outlives the tool; never hand such a child to
//! another thread or spawn it from a short-lived one.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Makes `command`'s child get SIGKILL when the thread that spawns it ends (see the module
/// docs: spawn and wait on one thread). A parent already gone by the time the child is set up
/// (a race with the fork) makes the child kill itself before it execs.
pub fn die_with_parent(command: &mut Command) -> &mut Command {
    // The pid as the child will see it from getppid(): the process, i.e. the thread group.
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and makes only async-signal-safe
    // system calls (prctl, getppid, raise) on values copied before the fork; it allocates
    // nothing and takes no lock.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Whether `pid` still runs (a zombie or a vanished pid does not).
    fn running(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => {
                let state = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .unwrap_or("X");
                state != "Z" && state != "X"
            }
            Err(_) => false,
        }
    }

    #[test]
    fn a_tool_dies_when_the_thread_that_started_it_ends() {
        // The spawning thread ends at once while the tool would sleep for a minute; the tool is
        // reaped by this process (its parent), so poll its state instead of waiting on it.
        let child = std::thread::spawn(|| {
            die_with_parent(Command::new("sleep").arg("60"))
                .spawn()
                .expect("sleep runs")
        })
        .join()
        .unwrap();
        let pid = child.id();
        let mut child = child;
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        use std::os::unix::process::ExitStatusExt;
        let status = status.unwrap_or_else(|| {
            let _ = child.kill();
            panic!("the tool {pid} outlived its parent thread by 30 s");
        });
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        assert!(!running(pid));
    }

    #[test]
    fn a_tool_waited_on_by_its_thread_runs_to_its_end() {
        let out = die_with_parent(Command::new("sh").args(["-c", "echo done"]))
            .output()
            .expect("sh runs");
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "done");
    }
}
