//! How far an instance's clock is from the host's, so the agent's log stamps can be placed on
//! the host's time line, next to the requests the host timed. (Which request a line belongs to
//! does not depend on this: the agent says in order, see `AgentMessage::Request`.)
//!
//! A process sandbox shares the host's clock. A VM's clock is set from the host's when it
//! boots or is restored, and then runs on its own: the host's NTP slews the host clock and
//! not the guest's (tens of ppm: a few ms after minutes), and a restore sets it one message's
//! latency late. Either is more than the time between two requests.
//!
//! So the host pings the agent now and then: sent at `h1`, the guest's clock read `g` when it
//! answered, back at `h2`. The guest read its clock between `h1` and `h2`, so its offset
//! (guest minus host) lies in `[g - h2, g - h1]`. The estimate is the point nearest zero in
//! the intersection of the recent samples' intervals: exactly zero for a clock that agrees
//! with the host's (a process sandbox: every interval holds zero), and otherwise no further
//! from the truth than the narrowest round trip. A Pong queued behind a burst of log lines
//! only widens its own interval. Samples that no longer overlap the newest (the guest clock
//! drifted or was stepped) are dropped.
//!
//! Which point of that intersection is taken depends on whose clock the agent reads
//! ([`ClockSource`]). A process sandbox reads the host's: zero is exact. A VM's clock is off by
//! something unknown, typically negative after a restore (set one message late), and that
//! lateness is about one host-to-guest latency, so the intersection usually holds zero too:
//! choosing zero there reproduced the whole error, and under emulation put the first lines of a
//! request on the previous one. For a VM the estimate is the middle of the intersection, off by
//! at most half the difference of the quickest latencies each way.

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

/// What one ping showed: the guest's offset (guest minus host, µs) lies in `lo..=hi`.
#[derive(Debug, Clone, Copy)]
struct Sample {
    lo: i64,
    hi: i64,
}

#[derive(Debug, Default)]
struct State {
    next_seq: u64,
    /// Pings sent and not answered yet: (seq, host time sent).
    pending: VecDeque<(u64, u64)>,
    /// Newest last.
    samples: VecDeque<Sample>,
    offset_us: i64,
}

/// Whose clock an agent stamps its log lines with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClockSource {
    /// The host's own (a process sandbox): the offset is zero by construction.
    #[default]
    Host,
    /// One of its own (a VM): set from the host's at boot or restore, then free-running.
    Own,
}

impl State {
    /// The offset the newest overlapping samples allow: zero for the host's clock, else the
    /// middle of their intersection.
    fn estimate(&self, source: ClockSource) -> i64 {
        let mut newest_first = self.samples.iter().rev();
        let Some(first) = newest_first.next() else {
            return 0;
        };
        let (mut lo, mut hi) = (first.lo, first.hi);
        for s in newest_first {
            let (l, h) = (lo.max(s.lo), hi.min(s.hi));
            if l > h {
                break; // older than a drift or a step of the guest clock
            }
            (lo, hi) = (l, h);
        }
        match source {
            ClockSource::Host => 0,
            ClockSource::Own => lo.saturating_add(hi.saturating_sub(lo) / 2),
        }
    }
}

/// One instance's clock, as seen from the host. Until the first answer, it is taken to agree
/// with the host's.
#[derive(Debug, Default)]
pub struct GuestClock {
    source: ClockSource,
    state: Mutex<State>,
}

impl GuestClock {
    pub fn new(source: ClockSource) -> Self {
        Self {
            source,
            ..Self::default()
        }
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
        if now_us < sent_us {
            return; // the host's clock stepped back meanwhile: no measurement
        }
        // The guest's number is hostile (any u64): clamped and subtracted without wrapping,
        // a nonsense clock gives a nonsense but bounded offset, never an overflow.
        let g = as_i64(guest_us);
        let sample = Sample {
            lo: g.saturating_sub(as_i64(now_us)),
            hi: g.saturating_sub(as_i64(sent_us)),
        };
        if st.samples.len() == SAMPLES {
            st.samples.pop_front();
        }
        st.samples.push_back(sample);
        st.offset_us = st.estimate(self.source);
    }

    /// Guest minus host, in microseconds, as last measured (0 before any answer).
    pub fn offset_us(&self) -> i64 {
        self.lock().offset_us
    }

    /// A guest stamp on the host's time line, for a line that reached the host at `arrived_us`:
    /// never later than that (a line cannot be printed after it arrived, whatever the estimate).
    pub fn to_host_us(&self, guest_us: u64, arrived_us: u64) -> u64 {
        (as_i64(guest_us).saturating_sub(self.offset_us()).max(0) as u64).min(arrived_us)
    }
}

/// A microsecond count as a signed one; past `i64::MAX` (292,000 years) it is `i64::MAX`.
fn as_i64(us: u64) -> i64 {
    i64::try_from(us).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pings at `h1`, the guest answers reading `g`, back at `h2`.
    fn sample(clock: &GuestClock, h1: u64, g: u64, h2: u64) {
        let seq = clock.ping_sent(h1);
        clock.pong(seq, g, h2);
    }

    #[test]
    fn a_clock_that_agrees_with_the_hosts_is_corrected_by_exactly_nothing() {
        // A process sandbox on a loaded machine: slow, lopsided round trips, the same clock.
        let clock = GuestClock::new(ClockSource::Host);
        sample(&clock, 1_000, 1_050, 9_000);
        sample(&clock, 20_000, 27_990, 28_000);
        sample(&clock, 40_000, 40_001, 40_100);
        assert_eq!(clock.offset_us(), 0);
        assert_eq!(clock.to_host_us(123_456, u64::MAX), 123_456);
    }

    #[test]
    fn a_guest_clock_ahead_or_behind_is_placed_within_its_quickest_round_trip() {
        let clock = GuestClock::new(ClockSource::Own);
        // No measurement yet: stamps are taken as they are.
        assert_eq!(clock.to_host_us(5_000_000, u64::MAX), 5_000_000);
        // ... but never later than they arrived.
        assert_eq!(clock.to_host_us(5_000_000, 4_000_000), 4_000_000);
        // Guest 250 ms ahead (read mid-way), 200 µs round trip: offset in [249 900, 250 100].
        sample(&clock, 1_000_000, 1_250_100, 1_000_200);
        assert!((249_900..=250_100).contains(&clock.offset_us()));
        // A 40 µs round trip narrows it: [250 080, 250 100] (intersected with the first).
        sample(&clock, 2_000_000, 2_250_100, 2_000_020);
        assert!((250_080..=250_100).contains(&clock.offset_us()));
        let host = clock.to_host_us(3_250_090, u64::MAX);
        assert!((2_999_990..=3_000_010).contains(&host), "{host}");
        // A sample queued behind a burst of log lines (40 ms round trip) keeps it there.
        sample(&clock, 4_000_000, 4_250_090, 4_040_000);
        assert!((250_080..=250_100).contains(&clock.offset_us()));
    }

    #[test]
    fn a_restored_clock_set_one_message_late_is_not_taken_for_the_hosts() {
        // Restored: the clock was set to the host's time 2 ms before the agent applied it, so
        // it is 2 ms behind. Pings take 2 ms each way: each interval holds zero, and taking
        // zero would place every line 2 ms early, on the request before.
        let clock = GuestClock::new(ClockSource::Own);
        sample(&clock, 10_000, 10_000, 14_000);
        sample(&clock, 20_000, 20_000, 24_000);
        assert_eq!(clock.offset_us(), -2_000);
        assert_eq!(clock.to_host_us(30_000, u64::MAX), 32_000);
        // The same samples from a process sandbox: its clock is the host's.
        let host = GuestClock::new(ClockSource::Host);
        sample(&host, 10_000, 10_000, 14_000);
        assert_eq!(host.offset_us(), 0);
    }

    #[test]
    fn a_drifted_or_stepped_guest_clock_replaces_the_samples_it_contradicts() {
        let clock = GuestClock::new(ClockSource::Own);
        sample(&clock, 1_000, 11_050, 1_100); // +10 ms
        sample(&clock, 2_000, 12_050, 2_100);
        // Now 3 ms behind: the old samples no longer overlap and are ignored.
        sample(&clock, 3_000, 50, 3_100);
        assert!((-3_050..=-2_950).contains(&clock.offset_us()));
        assert!(clock.offset_us() <= 0);
    }

    #[test]
    fn a_hostile_guest_clock_past_i64_gives_a_bounded_offset_not_an_overflow() {
        // Found by fuzz/fuzz_targets/host_link.rs: a Pong of 2^63 µs overflowed `g - now`.
        for guest in [1 << 63, u64::MAX, (1 << 63) + 12_345] {
            let clock = GuestClock::new(ClockSource::Own);
            sample(&clock, 1_000, guest, 1_100);
            assert_eq!(clock.offset_us(), i64::MAX - 1_050);
            // Its own stamps map back onto the host's line, never past their arrival.
            assert_eq!(clock.to_host_us(guest, 5_000), 1_050);
            assert_eq!(clock.to_host_us(guest, 900), 900);
            // A sane answer after it replaces the nonsense it contradicts.
            sample(&clock, 2_000, 0, 2_100);
            assert_eq!(clock.offset_us(), -2_050);
        }
    }

    #[test]
    fn stray_answers_are_ignored_and_unanswered_pings_do_not_pile_up() {
        let clock = GuestClock::new(ClockSource::Own);
        let quick = clock.ping_sent(1_000);
        clock.pong(quick, 11_050, 1_100);
        let offset = clock.offset_us();
        // An answer to a ping never sent, and one answered twice, change nothing.
        clock.pong(999, 0, 50_000);
        clock.pong(quick, 0, 50_000);
        assert_eq!(clock.offset_us(), offset);
        // Pings left unanswered before an answered one are dropped, not kept for ever.
        let lost = clock.ping_sent(60_000);
        let kept = clock.ping_sent(60_010);
        clock.pong(kept, 70_060, 60_110);
        clock.pong(lost, 70_000, 60_120);
        assert_eq!(clock.lock().pending.len(), 0);
    }
}
