//! A node-wide bound on password and token checks: at most `checks` run at
//! once, each in one of as many reusable argon2 memory areas; up to `queue`
//! more wait at most `wait` for a slot, and the rest are refused at once.
//!
//! The bound makes the memory that checks need `checks × m` (the largest
//! `m` of the configured hashes) however many clients try at once, and
//! reusing the areas keeps the allocator from growing a heap per thread of
//! the blocking pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::GuardStats;
use crate::auth::Memory;

/// The check was not run: no slot came free in time, or the queue was full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy;

pub struct PasswordChecks {
    slots: Arc<Semaphore>,
    /// One area per slot at most: taken after a permit, given back before it.
    areas: Arc<Mutex<Vec<Memory>>>,
    waiting: AtomicUsize,
    queue: usize,
    wait: Duration,
    stats: Arc<GuardStats>,
}

impl std::fmt::Debug for PasswordChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasswordChecks")
            .field("free_slots", &self.slots.available_permits())
            .field("waiting", &self.waiting.load(Ordering::Relaxed))
            .field("queue", &self.queue)
            .field("wait", &self.wait)
            .finish()
    }
}

/// Counts a waiting check until it stops waiting, also when the waiting
/// future is dropped (the client went away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl PasswordChecks {
    pub fn new(checks: usize, queue: usize, wait: Duration, stats: Arc<GuardStats>) -> Self {
        PasswordChecks {
            slots: Arc::new(Semaphore::new(checks.max(1))),
            areas: Arc::new(Mutex::new(Vec::new())),
            waiting: AtomicUsize::new(0),
            queue,
            wait,
            stats,
        }
    }

    /// A slot for one check, or [`Busy`]. [`Slot::waited`] says whether it
    /// had to wait in the queue (the caller may then look again whether the
    /// check should still run).
    pub async fn slot(&self) -> Result<Slot, Busy> {
        let (permit, waited) = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => (permit, false),
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue {
                    self.waiting.fetch_sub(1, Ordering::SeqCst);
                    GuardStats::bump(&self.stats.checks_refused_busy);
                    return Err(Busy);
                }
                let waiting = Waiting(&self.waiting);
                let acquired =
                    tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await;
                drop(waiting);
                match acquired {
                    Ok(Ok(permit)) => (permit, true),
                    _ => {
                        GuardStats::bump(&self.stats.checks_refused_busy);
                        return Err(Busy);
                    }
                }
            }
        };
        Ok(Slot {
            permit,
            waited,
            areas: self.areas.clone(),
            stats: self.stats.clone(),
        })
    }

    /// [`PasswordChecks::slot`] then [`Slot::run`].
    pub async fn run<T, F>(&self, check: F) -> Result<T, Busy>
    where
        T: Send + 'static,
        F: FnOnce(&mut Memory) -> T + Send + 'static,
    {
        self.slot().await?.run(check).await
    }

    /// Bytes held by the memory areas not in use (all of them when idle).
    pub fn idle_memory(&self) -> usize {
        self.areas
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(Memory::bytes)
            .sum()
    }
}

/// The right to run one check now.
pub struct Slot {
    permit: OwnedSemaphorePermit,
    waited: bool,
    areas: Arc<Mutex<Vec<Memory>>>,
    stats: Arc<GuardStats>,
}

impl Slot {
    /// The slot came free only after a wait in the queue.
    pub fn waited(&self) -> bool {
        self.waited
    }

    /// Runs `check` on the blocking pool with a reused memory area. The
    /// slot is held until the check ends, even when the caller stops
    /// waiting for it, so no more than `checks` ever run.
    pub async fn run<T, F>(self, check: F) -> Result<T, Busy>
    where
        T: Send + 'static,
        F: FnOnce(&mut Memory) -> T + Send + 'static,
    {
        GuardStats::bump(&self.stats.checks_run);
        let Slot { permit, areas, .. } = self;
        let task = tokio::task::spawn_blocking(move || {
            let mut memory = areas
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_default();
            let result = check(&mut memory);
            areas.lock().unwrap_or_else(|e| e.into_inner()).push(memory);
            drop(permit);
            result
        });
        task.await.map_err(|error| {
            tracing::error!(%error, "a password check failed");
            Busy
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use super::*;
    use crate::auth::{cheap_hash, verify_password_in};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_checks_run_at_once_and_the_queue_is_bounded() {
        let stats = Arc::new(GuardStats::default());
        let checks = Arc::new(PasswordChecks::new(
            2,
            3,
            Duration::from_secs(5),
            stats.clone(),
        ));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (checks, running, most) = (checks.clone(), running.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                checks
                    .run(move |_| {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::sleep(Duration::from_millis(400));
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
            }));
            // In order, well within one check: the first two run, three
            // wait, five are refused.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut ran = 0;
        for task in tasks {
            if task.await.unwrap().is_ok() {
                ran += 1;
            }
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert_eq!(ran, 5, "two slots and three places in the queue");
        assert_eq!(stats.snapshot().checks_refused_busy, 5);
        assert_eq!(stats.snapshot().checks_run, 5);
    }

    #[tokio::test]
    async fn a_check_waits_no_longer_than_the_wait() {
        let stats = Arc::new(GuardStats::default());
        let checks = Arc::new(PasswordChecks::new(
            1,
            10,
            Duration::from_millis(100),
            stats,
        ));
        let slow = {
            let checks = checks.clone();
            tokio::spawn(async move {
                checks
                    .run(|_| std::thread::sleep(Duration::from_millis(600)))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = Instant::now();
        assert_eq!(checks.run(|_| ()).await, Err(Busy));
        assert!(started.elapsed() < Duration::from_millis(400));
        slow.await.unwrap().unwrap();
        assert_eq!(checks.run(|_| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn the_memory_areas_are_reused() {
        let checks = PasswordChecks::new(2, 0, Duration::ZERO, Default::default());
        let phc = cheap_hash("pw");
        for _ in 0..20 {
            let phc = phc.clone();
            assert!(checks
                .run(move |memory| verify_password_in(&phc, "pw", memory))
                .await
                .unwrap());
        }
        // One check at a time: one area, of the hash's 8 KiB.
        assert_eq!(checks.idle_memory(), 8 * 1024);
    }
}
