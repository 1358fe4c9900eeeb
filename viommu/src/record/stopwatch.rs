//! [`Stopwatch`]: what recording costs, measured without making it cost much more.
//!
//! The unit reads guest memory about eight times a submission, and comparing one read against
//! the recorder's copy costs less than the pair of TSC reads that would time it. So the
//! recorder's calls are timed while handling one event in [`SAMPLE`], chosen pseudo-randomly, and
//! count [`SAMPLE`] times; the rare costly work (the first sight of a page, a `write(2)` of the
//! buffer, starting and finishing) is timed every time and counts once. Each timed section is
//! charged less the timer's own cost. The total is an estimate whose relative error shrinks with
//! the number of events.

use std::time::Instant;

/// One event in this many has its recorder calls timed.
pub(super) const SAMPLE: u64 = 32;

/// The sampler's seed. Fixed, so that every recording of the same stream times the same events
/// and two replays' costs compare event by event; xorshift's sequence has no period a guest's
/// traffic could fall in step with.
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// A cheap timestamp: the TSC where there is one. Reading the system clock twice per
/// guest-memory read cost more than the recording itself in the nested testbed (its L1 has no
/// usable vDSO clock under TCG); ticks are turned into ns with the rate measured over the whole
/// recording.
pub(super) fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC reads a counter; it has no memory effects and every x86_64 CPU has it.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        use std::sync::OnceLock;
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        u64::try_from(EPOCH.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// The recorder's own time.
pub(super) struct Stopwatch {
    /// When it was made, by the clock and in ticks, to convert ticks into ns.
    born: (Instant, u64),
    /// What timing a section adds to it: the least of a few back-to-back tick reads.
    overhead: u64,
    /// Ticks of the sections timed every time.
    always: u64,
    /// Ticks of the sampled sections.
    sampled: u64,
    /// Ticks of sections timed every time within the sampled section under way, which count
    /// once, not [`SAMPLE`] times.
    within: u64,
    /// xorshift64 state, never zero.
    rng: u64,
}

impl Stopwatch {
    pub(super) fn new() -> Self {
        let overhead = (0..16)
            .map(|_| {
                let t = ticks();
                ticks().wrapping_sub(t)
            })
            .min()
            .unwrap_or(0);
        Stopwatch {
            born: (Instant::now(), ticks()),
            overhead,
            always: 0,
            sampled: 0,
            within: 0,
            rng: SEED,
        }
    }

    /// An event starts: whether the calls made while handling it are to be timed (sampled).
    pub(super) fn next_event(&mut self) -> bool {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x.is_multiple_of(SAMPLE)
    }

    /// Starts a sampled section: its start, for [`Self::end_sampled`].
    #[inline]
    pub(super) fn begin_sampled(&mut self) -> u64 {
        self.within = 0;
        ticks()
    }

    /// Ends the sampled section that started at `start`.
    #[inline]
    pub(super) fn end_sampled(&mut self, start: u64) {
        let d = ticks()
            .wrapping_sub(start)
            .saturating_sub(self.within.saturating_add(self.overhead));
        self.sampled = self.sampled.saturating_add(d);
    }

    /// Ends a section timed every time, which started at `start` (a [`ticks`] reading).
    pub(super) fn end_always(&mut self, start: u64) {
        let d = ticks().wrapping_sub(start);
        self.always = self.always.saturating_add(d.saturating_sub(self.overhead));
        self.within = self.within.saturating_add(d);
    }

    /// The time measured so far, in ns.
    pub(super) fn ns(&self) -> u64 {
        let busy = u128::from(self.always) + u128::from(self.sampled) * u128::from(SAMPLE);
        let elapsed_ns = self.born.0.elapsed().as_nanos();
        let elapsed_ticks = u128::from(ticks().wrapping_sub(self.born.1));
        let ns = (busy * elapsed_ns).checked_div(elapsed_ticks).unwrap_or(0);
        u64::try_from(ns).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn about_one_event_in_sample_is_timed() {
        let mut w = Stopwatch::new();
        let n = 64 * SAMPLE;
        let timed = (0..n).filter(|_| w.next_event()).count() as u64;
        assert!(
            (n / SAMPLE / 2..=n / SAMPLE * 2).contains(&timed),
            "{timed} of {n} events timed"
        );
    }

    #[test]
    fn sections_timed_always_count_once_even_within_a_sampled_one() {
        let mut w = Stopwatch::new();
        let outer = w.begin_sampled();
        let inner = ticks();
        std::thread::sleep(std::time::Duration::from_millis(20));
        w.end_always(inner);
        w.end_sampled(outer);
        // The 20 ms counted once: a sampled section would count SAMPLE times.
        let ns = w.ns();
        assert!(
            (20_000_000..SAMPLE * 20_000_000 / 2).contains(&ns),
            "{ns} ns"
        );
    }
}
