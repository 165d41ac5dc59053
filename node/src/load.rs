//! How busy each connection thread is, and which of them takes new work.
//!
//! Work spread evenly over the threads crosses between them: a session on
//! one thread and the Queue on another exchange messages for every mail,
//! and each exchange wakes a thread. On two cores shared with the load
//! tools one thread needs 0.21 s of CPU per 1,000 messages where two need
//! 0.28 ([benchmarks](../../docs/benchmarks.md)). So new connections and
//! deliveries go to the first thread that is not busy, the system thread
//! first, and over all threads only when every one of them is busy.
//!
//! A thread is as busy as the share of time it runs on a core: its CPU
//! time, read from the thread's CPU clock ([`ThreadClock`]) by a sampler
//! on the system thread, and turned by [`Fill`] into the thread to fill
//! ([`Target`]). Time a thread waits for a core while other processes run
//! does not count: on a machine that is full anyway, another thread would
//! not run sooner.

use std::io;

/// How often the threads' CPU time is sampled.
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(25);

/// A thread's CPU clock, readable from any thread.
#[derive(Clone, Copy, Debug)]
pub struct ThreadClock(libc::clockid_t);

impl ThreadClock {
    /// The calling thread's clock.
    pub fn current() -> io::Result<ThreadClock> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `pthread_self` is the calling thread, alive for the call;
        // the call writes only `clock`.
        let result = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
        if result != 0 {
            return Err(io::Error::from_raw_os_error(result));
        }
        Ok(ThreadClock(clock))
    }

    /// The nanoseconds the thread has run; 0 once it has ended.
    pub fn cpu_ns(&self) -> u64 {
        let mut time = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the call writes only `time`; the clock of a thread that
        // has ended is an error, not a fault.
        if unsafe { libc::clock_gettime(self.0, &mut time) } != 0 {
            return 0;
        }
        time.tv_sec as u64 * 1_000_000_000 + time.tv_nsec as u64
    }
}

/// Which thread takes new connections and deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// This one: the first that is not busy.
    Thread(usize),
    /// All in turn: every thread is busy, or the work is spread evenly.
    All,
}

/// Chooses the [`Target`] from samples of the threads' busy time. A
/// thread is busy when its share of busy time, averaged over the last
/// samples, reaches `busy_percent`.
#[derive(Debug)]
pub struct Fill {
    busy_at: f64,
    /// Each thread's busy share, smoothed over the samples.
    shares: Vec<f64>,
    /// The last sample: its time and each thread's busy total.
    last: Option<(u64, Vec<u64>)>,
}

impl Fill {
    pub fn new(threads: usize, busy_percent: u8) -> Fill {
        Fill {
            busy_at: f64::from(busy_percent.min(100)) / 100.0,
            shares: vec![0.0; threads],
            last: None,
        }
    }

    /// Each thread's smoothed busy share, 0 to 1.
    pub fn shares(&self) -> &[f64] {
        &self.shares
    }

    /// A sample at `now` of each thread's busy total (both in
    /// nanoseconds): the thread to fill from now on.
    pub fn sample(&mut self, now: u64, busy: &[u64]) -> Target {
        if let Some((then, before)) = &self.last {
            let elapsed = now.saturating_sub(*then);
            if elapsed > 0 {
                for ((share, total), earlier) in self.shares.iter_mut().zip(busy).zip(before) {
                    let recent = (total.saturating_sub(*earlier) as f64 / elapsed as f64).min(1.0);
                    // Half the last sample, half what came before it: a
                    // short spell moves the choice, a single slow poll
                    // does not keep it there.
                    *share = (*share + recent) / 2.0;
                }
            }
        }
        self.last = Some((now, busy.to_vec()));
        self.target()
    }

    fn target(&self) -> Target {
        if self.busy_at <= 0.0 {
            return Target::All;
        }
        self.shares
            .iter()
            .position(|share| *share < self.busy_at)
            .map_or(Target::All, Target::Thread)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Samples 25 ms apart in which each thread was busy the given
    /// milliseconds; the target after each.
    fn run(threads: usize, busy_percent: u8, samples: &[&[u64]]) -> Vec<Target> {
        let mut fill = Fill::new(threads, busy_percent);
        let mut totals = vec![0; threads];
        let mut targets = vec![fill.sample(0, &totals)];
        for (i, busy) in samples.iter().enumerate() {
            for (total, ms) in totals.iter_mut().zip(busy.iter()) {
                *total += ms * MS;
            }
            targets.push(fill.sample((i as u64 + 1) * 25 * MS, &totals));
        }
        targets
    }

    /// A name, the threads, the busy mark, each sample's busy ms per
    /// thread, and the targets expected before and after each sample.
    type Case = (
        &'static str,
        usize,
        u8,
        &'static [&'static [u64]],
        &'static [Target],
    );

    #[test]
    fn the_first_thread_that_is_not_busy_takes_the_work() {
        use Target::*;
        let cases: &[Case] = &[
            (
                "idle: the first",
                3,
                80,
                &[&[0, 0, 0], &[1, 0, 0]],
                &[Thread(0), Thread(0), Thread(0)],
            ),
            (
                // Shares 0.48, then 0.72, then 0.84: busy on the third.
                "a thread fills, then the next takes over",
                3,
                80,
                &[&[24, 0, 0], &[24, 0, 0], &[24, 0, 0]],
                &[Thread(0), Thread(0), Thread(0), Thread(1)],
            ),
            (
                "all busy: all in turn",
                2,
                80,
                &[&[25, 25], &[25, 25], &[25, 25]],
                &[Thread(0), Thread(0), Thread(0), All],
            ),
            (
                // 0.5, 0.75, 0.875, 0.94, then idle: 0.47, below the mark.
                "a busy thread that frees up takes work again",
                2,
                60,
                &[&[25, 0], &[25, 0], &[25, 0], &[25, 0], &[0, 0], &[0, 0]],
                &[
                    Thread(0),
                    Thread(0),
                    Thread(1),
                    Thread(1),
                    Thread(1),
                    Thread(0),
                    Thread(0),
                ],
            ),
            ("0 %: always all", 2, 0, &[&[0, 0]], &[All, All]),
            (
                "100 %: never busy",
                1,
                100,
                &[&[25], &[25], &[25]],
                &[Thread(0), Thread(0), Thread(0), Thread(0)],
            ),
        ];
        for (name, threads, percent, samples, expected) in cases {
            assert_eq!(&run(*threads, *percent, samples), expected, "{name}");
        }
    }

    #[test]
    fn a_share_never_exceeds_the_whole_and_time_standing_still_changes_nothing() {
        let mut fill = Fill::new(1, 80);
        fill.sample(0, &[0]);
        // A busy total that ran ahead of the clock (counted from a spell
        // that began before the last sample) counts as fully busy.
        fill.sample(10 * MS, &[30 * MS]);
        assert_eq!(fill.shares(), &[0.5]);
        fill.sample(10 * MS, &[40 * MS]);
        assert_eq!(fill.shares(), &[0.5]);
    }

    #[test]
    fn a_threads_clock_counts_its_work_not_its_waits() {
        use std::time::{Duration, Instant};
        let clock = ThreadClock::current().unwrap();
        let started = Instant::now();
        let before = clock.cpu_ns();
        // Work until the clock says 40 ms (or 5 s have passed), then wait.
        while clock.cpu_ns() - before < 40 * MS && started.elapsed() < Duration::from_secs(5) {
            std::hint::spin_loop();
        }
        std::thread::sleep(Duration::from_millis(60));
        let ran = clock.cpu_ns() - before;
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!((40 * MS..55 * MS).contains(&ran), "ran {} ms", ran / MS);
        // The clock of a thread that has ended reads nothing.
        let ended = std::thread::spawn(|| ThreadClock::current().unwrap())
            .join()
            .unwrap();
        assert_eq!(ended.cpu_ns(), 0);
    }
}
