//! The node-wide budget for message bodies held in memory.
//!
//! A body is kept in memory from `DATA` until the spool has it, up to
//! `smtp.body_spill_threshold` (past it, it goes to disk:
//! [`crate::spill`]). A thousand connections sending at once would together
//! need a thousand times that. Every session therefore takes the bytes it receives in
//! DATA from one shared budget (`smtp.max_body_memory`) and gives them
//! back when its message is stored or refused.
//!
//! Nobody ever waits while holding part of the budget, so the budget
//! cannot deadlock: a new DATA waits a short while for its first bytes
//! (then `452 4.3.1`); a message under way only ever *tries* to take more,
//! and when that fails it is read to its end without being kept and
//! refused with `452 4.3.1`, giving back what it held at once. A client
//! that declared its size (`MAIL FROM:<…> SIZE=n`) gets the whole of it at
//! DATA, and then never fails half way. Validation keeps the budget at
//! least `max_message_size`, so one message alone always fits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// Reservations grow in steps of this much, so a body taking a 16 KiB
/// read at a time touches the shared counter once per step, not per read.
pub const STEP: u64 = 256 * 1024;

/// The budget shared by every session of a node.
#[derive(Debug)]
pub struct BodyMemory {
    limit: u64,
    used: AtomicU64,
    freed: Notify,
}

impl BodyMemory {
    pub fn new(limit: u64) -> Arc<BodyMemory> {
        Arc::new(BodyMemory {
            limit,
            used: AtomicU64::new(0),
            freed: Notify::new(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes reserved by all sessions now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Takes `bytes` if they are free now; never waits.
    fn try_take(&self, bytes: u64) -> bool {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.limit)
            })
            .is_ok();
        if taken {
            crate::malloc::follow(self);
        }
        taken
    }

    fn give_back(&self, bytes: u64) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
            crate::malloc::follow(self);
            self.freed.notify_waiters();
        }
    }

    /// A reservation of `bytes` (at least one [`STEP`]), taken at once or
    /// within `wait` as other sessions give theirs back; `None` when the
    /// budget stays spent that long, or when `bytes` can never fit.
    pub async fn reserve(self: &Arc<Self>, bytes: u64, wait: Duration) -> Option<Reservation> {
        let bytes = bytes.max(STEP).min(self.limit);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before the attempt, so a release between a failed
            // attempt and the wait is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.try_take(bytes) {
                return Some(Reservation {
                    budget: self.clone(),
                    bytes,
                });
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return None;
            }
        }
    }
}

/// Part of the budget held by one message; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<BodyMemory>,
    bytes: u64,
}

impl Reservation {
    /// Makes the reservation cover `total` bytes, taking what is missing
    /// (rounded up to a [`STEP`]) without waiting. `false`: the budget is
    /// spent; the reservation is unchanged.
    pub fn grow_to(&mut self, total: u64) -> bool {
        if total <= self.bytes {
            return true;
        }
        let missing = (total - self.bytes).div_ceil(STEP) * STEP;
        let missing = missing.min(self.budget.limit.saturating_sub(self.bytes));
        if self.bytes + missing < total || !self.budget.try_take(missing) {
            return false;
        }
        self.bytes += missing;
        true
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    #[tokio::test]
    async fn reservations_never_pass_the_limit_and_come_back_on_drop() {
        let budget = BodyMemory::new(4 * MB);
        let wait = Duration::ZERO;
        let mut a = budget.reserve(0, wait).await.unwrap();
        assert_eq!(a.bytes(), STEP, "at least a step");
        assert!(a.grow_to(STEP), "already covered");
        assert!(a.grow_to(STEP + 1));
        assert_eq!(a.bytes(), 2 * STEP, "rounded up to a step");
        let b = budget.reserve(3 * MB, wait).await.unwrap();
        assert_eq!(budget.used(), 3 * MB + 2 * STEP);
        // 512 KiB left: a grows to it exactly, then no further.
        assert!(a.grow_to(4 * STEP));
        assert!(!a.grow_to(4 * STEP + 1));
        assert_eq!(a.bytes(), 4 * STEP, "a failed grow takes nothing");
        assert!(budget.reserve(1, wait).await.is_none());
        drop(b);
        assert_eq!(budget.used(), MB);
        assert!(a.grow_to(4 * MB));
        assert_eq!(budget.used(), 4 * MB);
        drop(a);
        assert_eq!(budget.used(), 0);
        // More than the whole budget is capped to it, and fits when alone.
        let all = budget.reserve(100 * MB, wait).await.unwrap();
        assert_eq!(all.bytes(), 4 * MB);
    }

    #[tokio::test]
    async fn a_new_reservation_waits_for_a_release_then_gives_up() {
        let budget = BodyMemory::new(MB);
        let held = budget.reserve(MB, Duration::ZERO).await.unwrap();
        let started = std::time::Instant::now();
        assert!(budget
            .reserve(1, Duration::from_millis(200))
            .await
            .is_none());
        assert!(started.elapsed() >= Duration::from_millis(200));

        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.reserve(STEP, Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let released = std::time::Instant::now();
        drop(held);
        let got = waiter.await.unwrap().expect("taken once released");
        assert_eq!(got.bytes(), STEP);
        assert!(
            released.elapsed() < Duration::from_secs(5),
            "woken by the release"
        );
    }

    #[test]
    fn concurrent_growth_never_overshoots() {
        let budget = BodyMemory::new(64 * STEP);
        let all_grown = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                let all_grown = all_grown.clone();
                std::thread::spawn(move || {
                    let mut r = Reservation {
                        budget: budget.clone(),
                        bytes: 0,
                    };
                    for _ in 0..32 {
                        let _ = r.grow_to(r.bytes() + STEP);
                        assert!(budget.used() <= budget.limit());
                    }
                    // Everyone holds what they got until all are done.
                    all_grown.wait();
                    r.bytes()
                })
            })
            .collect();
        let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(
            total,
            64 * STEP,
            "the whole budget and no more was handed out"
        );
        assert_eq!(budget.used(), 0, "all given back");
    }
}
