//! How far an instance's clock is from the host's, so the agent's log stamps can be placed on
//! the host's time line, where the requests they belong to were timed.
//!
//! A process sandbox shares the host's clock. A VM's clock is set from the host's when it
//! boots or is restored, and then runs on its own: the host's NTP slews the host clock and
//! not the guest's (tens of ppm: a few ms after minutes), and a restore sets it one message's
//! latency late. Either is more than the time between a request's start and its first line.
//!
//! So the host pings the agent now and then (NTP's way): sent at `h1`, the guest's clock `g`
//! when answered, back at `h2`; the guest was ahead by `g - (h1 + h2) / 2`, give or take half
//! the round trip. Of the recent samples, the one with the shortest round trip wins: a Pong
//! queued behind a burst of log lines comes back late and would skew the estimate.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Samples kept: at one ping every [`PING_INTERVAL`], a window short enough for drift not to
/// matter and long enough to hold a quick round trip.
const SAMPLES: usize = 4;
/// Pings not answered beyond this many are forgotten (the stream was replaced or lost).
const MAX_PENDING: usize = 16;
/// How often the host measures (after a few quick first pings).
pub const PING_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// The host's wall clock in microseconds.
pub fn host_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    round_trip_us: u64,
    /// Guest minus host.
    offset_us: i64,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    /// Pings sent and not answered yet: (seq, host time sent).
    pending: VecDeque<(u64, u64)>,
    samples: VecDeque<Sample>,
    offset_us: i64,
}

/// One instance's clock, as seen from the host. Until the first answer, it is taken to agree
/// with the host's.
#[derive(Debug, Default)]
pub struct GuestClock {
    state: Mutex<State>,
}

impl GuestClock {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ping is about to be sent at host time `now_us`: its sequence number.
    pub fn ping_sent(&self, now_us: u64) -> u64 {
        let mut st = self.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        if st.pending.len() == MAX_PENDING {
            st.pending.pop_front();
        }
        st.pending.push_back((seq, now_us));
        seq
    }

    /// The agent answered ping `seq` with its clock at `guest_us`; it arrived at `now_us`.
    /// An answer to no ping of this clock is ignored.
    pub fn pong(&self, seq: u64, guest_us: u64, now_us: u64) {
        let mut st = self.lock();
        let Some(i) = st.pending.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        let (_, sent_us) = st.pending.remove(i).expect("the position just found");
        // Older pings were lost or overtaken: they will not be answered on this stream.
        st.pending.drain(..i);
        let Some(round_trip_us) = now_us.checked_sub(sent_us) else {
            return; // the host's clock stepped back meanwhile: no measurement
        };
        let midpoint = sent_us + round_trip_us / 2;
        let offset_us = guest_us as i64 - midpoint as i64;
        if st.samples.len() == SAMPLES {
            st.samples.pop_front();
        }
        st.samples.push_back(Sample {
            round_trip_us,
            offset_us,
        });
        st.offset_us = st
            .samples
            .iter()
            .min_by_key(|s| s.round_trip_us)
            .map_or(0, |s| s.offset_us);
    }

    /// Guest minus host, in microseconds, as last measured (0 before any answer).
    pub fn offset_us(&self) -> i64 {
        self.lock().offset_us
    }

    /// A guest stamp on the host's time line.
    pub fn to_host_us(&self, guest_us: u64) -> u64 {
        (guest_us as i64).saturating_sub(self.offset_us()).max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_clock_ahead_or_behind_is_measured_and_its_stamps_placed_on_the_host_line() {
        let clock = GuestClock::new();
        // No measurement yet: stamps are taken as they are.
        assert_eq!(clock.to_host_us(5_000_000), 5_000_000);
        // Guest 250 ms ahead, 200 µs round trip.
        let seq = clock.ping_sent(1_000_000);
        clock.pong(seq, 1_250_100, 1_000_200);
        assert_eq!(clock.offset_us(), 250_000);
        assert_eq!(clock.to_host_us(2_250_000), 2_000_000);
        // Now 3 ms behind (a drifting clock), measured again.
        let seq = clock.ping_sent(3_000_000);
        clock.pong(seq, 2_997_050, 3_000_100);
        // The quicker round trip of the two wins: 100 µs against 200 µs.
        assert_eq!(clock.offset_us(), -3_000);
        assert_eq!(clock.to_host_us(2_997_000), 3_000_000);
    }

    #[test]
    fn a_slow_answer_does_not_override_a_quick_one_and_strays_are_ignored() {
        let clock = GuestClock::new();
        let quick = clock.ping_sent(1_000);
        clock.pong(quick, 11_050, 1_100); // offset 10 000, 100 µs
                                          // Queued behind a burst of log lines: answered late, stamped early.
        let slow = clock.ping_sent(2_000);
        clock.pong(slow, 12_010, 42_000); // 40 ms round trip
        assert_eq!(clock.offset_us(), 10_000);
        // An answer to a ping never sent, and one answered twice, change nothing.
        clock.pong(999, 0, 50_000);
        clock.pong(quick, 0, 50_000);
        assert_eq!(clock.offset_us(), 10_000);
        // Pings left unanswered before an answered one are dropped, not kept for ever.
        let lost = clock.ping_sent(60_000);
        let kept = clock.ping_sent(60_010);
        clock.pong(kept, 70_060, 60_110);
        clock.pong(lost, 70_000, 60_120);
        assert_eq!(clock.lock().pending.len(), 0);
        // Older samples age out: after SAMPLES more, the first quick one no longer counts.
        for i in 0..SAMPLES as u64 {
            let seq = clock.ping_sent(100_000 + i * 1000);
            clock.pong(
                seq,
                100_000 + i * 1000 + 150 + 20_000,
                100_000 + i * 1000 + 300,
            );
        }
        assert_eq!(clock.offset_us(), 20_000);
    }
}
