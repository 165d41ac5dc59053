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
//! A thread's event loop is busy from the moment it wakes until it waits
//! again; [`runtime`] counts that time with the runtime's park hooks, and
//! [`Fill`] turns the counts into the thread to fill ([`Target`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// How often the threads' busy time is sampled.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(25);

/// The moment the counts of every thread are measured from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since [`EPOCH`].
pub fn now_ns() -> u64 {
    EPOCH.elapsed().as_nanos() as u64
}

/// One thread's busy time, written by its own event loop and read by the
/// sampler on another thread.
#[derive(Debug, Default)]
pub struct ThreadLoad {
    /// Busy nanoseconds up to the thread's last wait.
    busy_ns: AtomicU64,
    /// When the thread woke, in [`now_ns`] plus one; 0 while it waits.
    awake_since: AtomicU64,
}

impl ThreadLoad {
    fn woke(&self) {
        self.awake_since.store(now_ns() + 1, Ordering::Relaxed);
    }

    fn waits(&self) {
        let since = self.awake_since.swap(0, Ordering::Relaxed);
        if since > 0 {
            let busy = now_ns().saturating_sub(since - 1);
            self.busy_ns.fetch_add(busy, Ordering::Relaxed);
        }
    }

    /// Busy nanoseconds until `now` (a [`now_ns`]), the current spell
    /// included: a thread that never waits is busy all the time.
    pub fn busy_ns(&self, now: u64) -> u64 {
        let since = self.awake_since.load(Ordering::Relaxed);
        let current = if since > 0 {
            now.saturating_sub(since - 1)
        } else {
            0
        };
        self.busy_ns.load(Ordering::Relaxed) + current
    }
}

/// A single-threaded runtime, as actix builds one, that counts its busy
/// time in `load`.
pub fn runtime(load: Arc<ThreadLoad>) -> tokio::runtime::Runtime {
    // Built on the thread it runs on, which works from now until it first
    // waits.
    load.woke();
    let waking = load.clone();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_unpark(move || waking.woke())
        .on_thread_park(move || load.waits())
        .build()
        // As actix's own runtime: a node cannot run without one.
        .expect("cannot build a tokio runtime")
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
    fn a_runtime_counts_the_time_its_thread_works() {
        let load = Arc::new(ThreadLoad::default());
        let rt = runtime(load.clone());
        let start = now_ns();
        rt.block_on(async {
            // Wait 30 ms, work 40 ms, and wait 60 ms.
            tokio::time::sleep(Duration::from_millis(30)).await;
            let until = Instant::now() + Duration::from_millis(40);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            tokio::time::sleep(Duration::from_millis(60)).await;
        });
        let elapsed = now_ns() - start;
        let busy = load.busy_ns(now_ns());
        assert!(elapsed >= 130 * MS, "{elapsed}");
        assert!(
            (40 * MS..70 * MS).contains(&busy),
            "busy {} ms of {} ms",
            busy / MS,
            elapsed / MS
        );
    }
}
