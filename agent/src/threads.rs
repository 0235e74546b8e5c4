//! Parked threads for the bridge: each stream's two pumps run on threads that already exist
//! when some are free, and a new one is made only when none is.
//!
//! Why: making a thread (clone, its stack mapped with a guard page, its TLS) costs ~40 µs on
//! these hosts, against ~15 µs to wake a parked one, and a stream needs two. A function that
//! closes its connection after every answer (`Connection: close`, HTTP/1.0) gets a new stream
//! per call, so it paid for two new threads on every call. A thread left parked longer than
//! its `keep` exits, so a burst of streams does not hold its threads forever.

use std::io;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Work for a thread.
pub type Job = Box<dyn FnOnce() + Send>;

/// A set of parked threads of one name and stack size.
pub struct Threads {
    name: &'static str,
    stack: usize,
    keep: Duration,
    /// The parked threads, most recently parked last, each by its number and its hand-off.
    idle: Mutex<Vec<(u64, SyncSender<Job>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl Threads {
    pub fn new(name: &'static str, stack: usize, keep: Duration) -> Arc<Self> {
        Arc::new(Threads {
            name,
            stack,
            keep,
            idle: Mutex::new(Vec::new()),
            next: Default::default(),
        })
    }

    /// Runs `job` on a parked thread, or on a new one if none is parked.
    pub fn run(self: &Arc<Self>, mut job: Job) -> io::Result<()> {
        loop {
            let parked = self.lock().pop();
            let Some((_, hand_off)) = parked else { break };
            match hand_off.send(job) {
                Ok(()) => return Ok(()),
                // That thread gave up waiting just now: try the next.
                Err(returned) => job = returned.0,
            }
        }
        let threads = Arc::clone(self);
        std::thread::Builder::new()
            .name(self.name.into())
            .stack_size(self.stack)
            .spawn(move || threads.work(job))
            .map(drop)
    }

    /// How many threads are parked now.
    #[cfg(test)]
    pub fn parked(&self) -> usize {
        self.lock().len()
    }

    fn work(self: Arc<Self>, mut job: Job) {
        loop {
            job();
            let number = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (hand_off, jobs) = sync_channel(1);
            self.lock().push((number, hand_off));
            job = match jobs.recv_timeout(self.keep) {
                Ok(next) => next,
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    let mut idle = self.lock();
                    if let Some(at) = idle.iter().position(|(n, _)| *n == number) {
                        idle.remove(at);
                        return;
                    }
                    drop(idle);
                    // Taken off the list by `run` just as the wait ended: its job is on the way.
                    match jobs.recv() {
                        Ok(next) => next,
                        Err(_) => return,
                    }
                }
            };
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(u64, SyncSender<Job>)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Instant;

    fn thread_id_of(threads: &Arc<Threads>) -> std::thread::ThreadId {
        let (tx, rx) = channel();
        threads
            .run(Box::new(move || {
                tx.send(std::thread::current().id()).unwrap()
            }))
            .unwrap();
        rx.recv().unwrap()
    }

    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_finished_thread_runs_the_next_job() {
        let threads = Threads::new("test", 64 * 1024, Duration::from_secs(30));
        let first = thread_id_of(&threads);
        eventually("the thread is parked", || threads.parked() == 1);
        assert_eq!(thread_id_of(&threads), first);
    }

    #[test]
    fn busy_threads_are_not_waited_for_and_idle_ones_exit() {
        let threads = Threads::new("test", 64 * 1024, Duration::from_millis(50));
        // Two jobs that hold their threads until both run: a second thread was made.
        let barrier = Arc::new(std::sync::Barrier::new(3));
        for _ in 0..2 {
            let barrier = Arc::clone(&barrier);
            threads
                .run(Box::new(move || {
                    barrier.wait();
                }))
                .unwrap();
        }
        barrier.wait();
        eventually("both threads are parked", || threads.parked() == 2);
        eventually("idle threads exit", || threads.parked() == 0);
        // And new work still runs.
        thread_id_of(&threads);
    }

    #[test]
    fn no_job_is_lost_when_threads_give_up_waiting_meanwhile() {
        // Keep so short that hand-offs race with the threads' timeouts.
        let threads = Threads::new("test", 64 * 1024, Duration::from_micros(50));
        let (tx, rx) = channel();
        for n in 0..2000 {
            let tx = tx.clone();
            threads.run(Box::new(move || tx.send(n).unwrap())).unwrap();
            if n % 7 == 0 {
                std::thread::sleep(Duration::from_micros(60));
            }
        }
        drop(tx);
        let mut got: Vec<i32> = rx.iter().collect();
        got.sort();
        assert_eq!(got, (0..2000).collect::<Vec<_>>());
    }
}
