//! Standby sandboxes for the service's cold starts.
//!
//! Most of a process-sandbox start does not depend on the function: the instance directory
//! and its writable layer with its loop device, the cgroup, the control socket, the agent
//! spawned in its namespaces with its ports bound and its writable layer mounted. A standby has
//! done all that before the request comes; the start only allows and hands over the rootfs and
//! sets the memory limit ([`super::ProcessSandbox::place`]). A long-running service keeps
//! [`DEFAULT_STANDBYS`] of them and prepares a replacement after each start it serves from one.
//!
//! A standby lives in its own directory under the instances root with an instance record, so a
//! crashed service's standbys are cleaned up like its instances
//! ([`crate::sandbox::cleanup_orphans`]); its agent waits on its standard input, which ends
//! with the service, and then exits. Taken, the directory is renamed to its instance's; its
//! agent reaches the socket directory through a descriptor, so the rename may come at any
//! moment of its set-up.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Prepared, Setup};
use crate::sandbox::instance::record::new_instance_id;
use crate::sandbox::SandboxError;

/// The environment variable that sets how many standby sandboxes a service keeps.
pub const STANDBYS_ENV: &str = "FNVM_STANDBY_SANDBOXES";
/// How many a service keeps unless [`STANDBYS_ENV`] says otherwise (0: none).
pub const DEFAULT_STANDBYS: usize = 1;
/// After a standby failed to come up, no new one is prepared for this long: a host that cannot
/// make them is not asked again at every start.
const FAILURE_BACKOFF: Duration = Duration::from_secs(30);
/// A standby's cgroup limit until it is taken: the smallest a function may have.
const STANDBY_MEMORY_MIB: u32 = *crate::sandbox::MEMORY_MIB_RANGE.start();

/// How many standby sandboxes [`STANDBYS_ENV`] asks for; a bad value is an error naming it.
pub fn standby_count_from_env() -> Result<usize, SandboxError> {
    crate::sandbox::standby_count(STANDBYS_ENV, "standby sandboxes", DEFAULT_STANDBYS)
}

/// How long dropping the standbys waits for those being prepared.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The note of a start placed into a standby ([`crate::sandbox::StartInfo::note`]).
pub const FROM_STANDBY_NOTE: &str = "from a standby sandbox";

/// The standby sandboxes of one service.
pub(super) struct Standbys {
    shared: Arc<Shared>,
}

struct Shared {
    setup: Arc<Setup>,
    /// The instances root: standby directories sit beside instance directories.
    root: std::path::PathBuf,
    count: usize,
    state: Mutex<State>,
    /// Signalled when a preparation has finished (and, once closed, released its standby).
    done: std::sync::Condvar,
}

#[derive(Default)]
struct State {
    ready: Vec<Prepared>,
    preparing: usize,
    no_prepare_until: Option<Instant>,
    closed: bool,
}

impl Standbys {
    pub fn new(setup: Arc<Setup>, root: std::path::PathBuf, count: usize) -> Self {
        Standbys {
            shared: Arc::new(Shared {
                setup,
                root,
                count,
                state: Mutex::new(State::default()),
                done: std::sync::Condvar::new(),
            }),
        }
    }

    /// A ready standby, if there is one. Its replacement comes with the next [`Self::want`]:
    /// the caller asks once its start is done, so the two do not compete.
    pub fn take(&self) -> Option<Prepared> {
        let mut stale = Vec::new();
        let taken = {
            let mut st = self.shared.lock();
            loop {
                match st.ready.pop() {
                    Some(standby) if standby.is_waiting() => break Some(standby),
                    Some(standby) => {
                        tracing::warn!(
                            dir = %standby.parts.dir.display(),
                            "a standby sandbox's agent ended while waiting"
                        );
                        stale.push(standby);
                    }
                    None => break None,
                }
            }
        };
        // Torn down outside the lock (dropping their parts releases them).
        drop(stale);
        taken
    }

    /// Prepares, in the background, the standbys that are missing.
    pub fn want(&self) {
        let mut st = self.shared.lock();
        if st.closed || st.no_prepare_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        while st.ready.len() + st.preparing < self.shared.count {
            st.preparing += 1;
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("standby-sandbox".into())
                .spawn(move || shared.prepare_one());
            if let Err(e) = spawned {
                st.preparing -= 1;
                tracing::warn!("cannot start a thread for a standby sandbox: {e}");
                break;
            }
        }
    }

    /// How many standbys are ready now.
    pub fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }
}

impl Drop for Standbys {
    /// Releases every ready standby, and waits (a while) for those being prepared, which
    /// release themselves: a service that exits right after dropping its sandbox must not
    /// leave one half made (its agent and pasta running, its cgroup and directory left).
    fn drop(&mut self) {
        let ready = {
            let mut st = self.shared.lock();
            st.closed = true;
            std::mem::take(&mut st.ready)
        };
        drop(ready);
        let st = self.shared.lock();
        let _ = self
            .shared
            .done
            .wait_timeout_while(st, CLOSE_WAIT, |st| st.preparing > 0);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn prepare_one(&self) {
        let id = format!("standby-{}", new_instance_id());
        let result = self
            .setup
            .prepare(self.root.join(&id), &id, STANDBY_MEMORY_MIB, true, None)
            .map(|mut standby| {
                self.setup.offer_egress(&mut standby);
                standby
            });
        let mut st = self.lock();
        match result {
            Ok(standby) if !st.closed => st.ready.push(standby),
            Ok(standby) => {
                // The service is going: released before it counts as done (see `Drop`).
                drop(st);
                drop(standby);
                st = self.lock();
            }
            Err(e) => {
                st.no_prepare_until = Some(Instant::now() + FAILURE_BACKOFF);
                tracing::warn!("cannot prepare a standby sandbox: {e}");
            }
        }
        st.preparing -= 1;
        drop(st);
        self.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standby_count_is_a_small_number() {
        let parse = |text: &str| {
            crate::sandbox::parse_standby_count(STANDBYS_ENV, "standby sandboxes", text, 16)
        };
        assert_eq!(parse("0").unwrap(), 0);
        assert_eq!(parse(" 2 ").unwrap(), 2);
        for bad in ["17", "-1", "two", ""] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(STANDBYS_ENV) && err.contains("0 to 16"),
                "{err}"
            );
        }
    }
}
