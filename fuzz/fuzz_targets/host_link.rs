//! The host's side of the host ↔ agent protocol (`sandbox::link`), on hostile bytes: the
//! agent runs inside the guest, next to the user's code, so everything it says is hostile.
//! The greeting (`greeting::greet`: Hello both ways, the version check) and then the reader
//! thread's loop (`reader::read_loop`: log lines, request ids, start outcomes, exits, and
//! clock answers into `clock::GuestClock`), over a real Unix stream pair.
//!
//! Invariant: a log line is never stamped later than it arrived on the host.
//!
//! Input: 1 control byte (bit 0: the guest keeps its own clock, as a VM does), then what the
//! agent sends. Pings 0..4 are outstanding, so `pong` answers can land.
#![no_main]

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc};

use fnvm::sandbox::exit::ExitState;
use fnvm::sandbox::link::clock::{host_now_us, ClockSource, GuestClock};
use fnvm::sandbox::link::greeting::greet;
use fnvm::sandbox::link::reader::read_loop;
use fnvm::sandbox::LogLine;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let Ok((host, mut agent)) = UnixStream::pair() else {
        return;
    };
    // The whole stream is queued before the host reads (a fuzz input is < 1 MiB, well under
    // what a socket buffer takes here; the rest is cut).
    let _ = agent.set_nonblocking(true);
    let _ = agent.write_all(bytes);
    let _ = agent.shutdown(Shutdown::Write);
    let Ok(greeted) = greet(&host) else {
        return;
    };
    let source = if which & 1 != 0 {
        ClockSource::Own
    } else {
        ClockSource::Host
    };
    let clock = Arc::new(GuestClock::new(source));
    for _ in 0..4 {
        clock.ping_sent(host_now_us());
    }
    let exit = ExitState::new(|| None);
    let on_log = Arc::new(|line: LogLine| {
        assert!(
            line.unix_time_us <= host_now_us(),
            "a line stamped after it arrived"
        );
    });
    let (tx, rx) = mpsc::sync_channel(1);
    read_loop(greeted.reader, on_log, exit, clock.clone(), tx);
    let _ = rx.try_recv();
    let _ = clock.offset_us();
    drop(agent);
});
