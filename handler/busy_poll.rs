//! How long the event loop busy-polls before it sleeps (docs/DESIGN.md "Busy poll"):
//! as long as a wake-up of the loop thread costs, within `[daemon] busy_poll_us` and
//! `busy_poll_max_us`.
//!
//! Spinning for a command that arrives after `t` costs `t` of CPU; sleeping costs a
//! wake-up, `W`. Spinning up to `W` and then sleeping never costs more than twice the
//! better of the two in hindsight (the ski-rental rule), whatever the gaps between
//! commands are, so the window is the measured wake-up latency. `W` is a few
//! microseconds on a real machine (the window stays at the floor) and hundreds under a
//! CPU-emulated guest, where a longer spin is what pays.
//!
//! `W` is measured on the one wake-up whose cause is timed: an I/O worker that queues
//! a result while the loop sleeps marks the time ([`WakeClock::mark`]) before it
//! signals the loop's waker; the loop, back from `epoll_wait`, takes the time since.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Wake-up latencies the window is the median of.
const SAMPLES: usize = 15;

/// When a worker last asked to wake the loop; shared with the workers' notify.
pub struct WakeClock {
    base: Instant,
    /// Nanoseconds after `base` plus one; 0 = no mark since the loop took the last.
    marked: AtomicU64,
}

impl WakeClock {
    /// A clock with no mark.
    pub fn new() -> WakeClock {
        WakeClock {
            base: Instant::now(),
            marked: AtomicU64::new(0),
        }
    }

    fn since_base(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos() as u64 + 1
    }

    /// A wake-up is requested now (called just before the waker is signalled).
    pub fn mark(&self) {
        self.marked
            .store(self.since_base(Instant::now()), Ordering::Release);
    }

    /// The latency of a wake-up the loop has just returned from, if a mark was set
    /// after it went to sleep at `slept` (an older mark woke nothing: `epoll_wait`
    /// returned at once). Takes the mark.
    pub fn take_latency(&self, slept: Instant, now: Instant) -> Option<Duration> {
        let m = self.marked.swap(0, Ordering::AcqRel);
        let slept = self.since_base(slept);
        let now = self.since_base(now);
        (m != 0 && m >= slept && now >= m).then(|| Duration::from_nanos(now - m))
    }
}

impl Default for WakeClock {
    fn default() -> Self {
        WakeClock::new()
    }
}

/// The busy-poll window: the median of the last [`SAMPLES`] wake-up latencies, kept
/// within `[floor, ceiling]`; the floor until a wake-up was measured. A floor of zero
/// turns the busy poll off.
#[derive(Clone, Debug)]
pub struct PollWindow {
    floor: Duration,
    ceiling: Duration,
    /// Latencies in microseconds, a ring.
    samples: [u32; SAMPLES],
    n: usize,
    next: usize,
    window: Duration,
    median: Option<Duration>,
}

impl PollWindow {
    /// A window between `floor` and `ceiling` (a ceiling below the floor is the floor:
    /// a fixed window).
    pub fn new(floor: Duration, ceiling: Duration) -> PollWindow {
        PollWindow {
            floor,
            ceiling: ceiling.max(floor),
            samples: [0; SAMPLES],
            n: 0,
            next: 0,
            window: floor,
            median: None,
        }
    }

    /// A measured wake-up latency.
    pub fn record(&mut self, latency: Duration) {
        if self.floor.is_zero() {
            return;
        }
        self.samples[self.next] = latency.as_micros().min(u32::MAX as u128) as u32;
        self.next = (self.next + 1) % SAMPLES;
        self.n = (self.n + 1).min(SAMPLES);
        let mut s = self.samples;
        let s = &mut s[..self.n];
        let mid = s.len() / 2;
        let m = Duration::from_micros(*s.select_nth_unstable(mid).1 as u64);
        self.median = Some(m);
        self.window = m.clamp(self.floor, self.ceiling);
    }

    /// How long to keep polling after the last work.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The median of the measured wake-up latencies, if any were measured.
    pub fn wake_latency(&self) -> Option<Duration> {
        self.median
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: fn(u64) -> Duration = Duration::from_micros;

    #[test]
    fn the_window_follows_the_median_wake_up_within_its_bounds() {
        let mut w = PollWindow::new(US(50), US(1000));
        assert_eq!(w.window(), US(50));
        assert_eq!(w.wake_latency(), None);
        // Fast wake-ups (a real machine): the floor.
        for _ in 0..SAMPLES {
            w.record(US(8));
        }
        assert_eq!(w.window(), US(50));
        assert_eq!(w.wake_latency(), Some(US(8)));
        // Slow ones (an emulated guest): the median of the last samples, one outlier
        // of either kind changes nothing.
        for i in 0..SAMPLES as u64 {
            w.record(US(400 + i));
        }
        w.record(US(90_000));
        w.record(US(1));
        assert_eq!(w.window(), US(408));
        // Slower than the ceiling: the ceiling.
        for _ in 0..SAMPLES {
            w.record(US(5000));
        }
        assert_eq!(w.window(), US(1000));
        assert_eq!(w.wake_latency(), Some(US(5000)));
    }

    #[test]
    fn a_zero_floor_never_polls_and_a_low_ceiling_fixes_the_window() {
        let mut off = PollWindow::new(Duration::ZERO, US(1000));
        off.record(US(500));
        assert_eq!(off.window(), Duration::ZERO);
        let mut fixed = PollWindow::new(US(50), US(10));
        fixed.record(US(500));
        assert_eq!(fixed.window(), US(50));
    }

    #[test]
    fn only_a_mark_set_during_the_sleep_is_a_wake_up_latency() {
        let c = WakeClock::new();
        let before = Instant::now();
        c.mark();
        let slept = Instant::now();
        // Marked before the sleep: epoll_wait returned at once, nothing to measure.
        assert_eq!(c.take_latency(slept, Instant::now()), None);
        c.mark();
        std::thread::sleep(US(2000));
        let now = Instant::now();
        let l = c.take_latency(slept, now).expect("a mark during the sleep");
        assert!(l >= US(2000) && l <= now - before, "{l:?}");
        // Taken: the next wake-up without a mark measures nothing.
        assert_eq!(c.take_latency(slept, Instant::now()), None);
    }
}
