//! The node's delivery connection slots (`delivery.max_connections`): a
//! first-come, first-served semaphore that also tells how the capacity is
//! used. How long a domain with work waited in line for a slot says the
//! node is short of connections; how long a slot stood free before a
//! connection carried mail on it says work did not find the capacity.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, TryAcquireError};

pub struct NodeSlots {
    semaphore: Arc<Semaphore>,
    /// When each free slot became free, oldest first: a slot taken for a
    /// connection ends the oldest wait.
    free_since: Mutex<VecDeque<Instant>>,
}

/// One slot, held from before the take of work until the connection
/// closes; dropping it frees the slot.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    slots: Arc<NodeSlots>,
    /// Free since then, until [`Slot::carries_mail`]; `None` after.
    free_since: Option<Instant>,
}

impl NodeSlots {
    pub fn new(count: usize) -> Arc<NodeSlots> {
        let now = Instant::now();
        Arc::new(NodeSlots {
            semaphore: Arc::new(Semaphore::new(count)),
            free_since: Mutex::new(std::iter::repeat_n(now, count).collect()),
        })
    }

    /// Whether a slot is free now: nobody waits in line for one.
    pub fn has_free(&self) -> bool {
        self.semaphore.available_permits() > 0
    }

    /// A slot if one is free now.
    pub fn try_take(self: &Arc<Self>) -> Result<Slot, TryAcquireError> {
        let permit = self.semaphore.clone().try_acquire_owned()?;
        Ok(self.slot(permit))
    }

    /// Waits in line for a slot; counts the wait.
    pub async fn take(self: Arc<Self>) -> Result<Slot, AcquireError> {
        let started = Instant::now();
        let permit = self.semaphore.clone().acquire_owned().await?;
        crate::metrics::slot_waited(started.elapsed());
        Ok(self.slot(permit))
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit) -> Slot {
        let free_since = self.lock().pop_front();
        Slot {
            _permit: permit,
            slots: self.clone(),
            free_since,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.free_since.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Slot {
    /// The slot got work: counts how long it stood free before.
    pub fn carries_mail(&mut self) {
        if let Some(since) = self.free_since.take() {
            crate::metrics::slot_stood_free(since.elapsed());
        }
    }

    /// How long the slot has stood free, if it carries no mail yet.
    #[cfg(test)]
    fn free_for(&self) -> Option<std::time::Duration> {
        self.free_since.map(|since| since.elapsed())
    }
}

impl Drop for Slot {
    /// A slot given back unused (the take found no work) stays free since
    /// when it was free before; one that carried mail is free from now.
    fn drop(&mut self) {
        let since = self.free_since.unwrap_or_else(Instant::now);
        let mut free = self.slots.lock();
        // Kept oldest first, so that the next slot taken ends the longest wait.
        let at = free.partition_point(|t| *t <= since);
        free.insert(at, since);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_slot_counts_as_free_until_it_carries_mail() {
        let slots = NodeSlots::new(1);
        tokio::time::sleep(Duration::from_millis(30)).await;
        let slot = slots.try_take().unwrap();
        assert!(slot.free_for().unwrap() >= Duration::from_millis(30));
        assert!(slots.try_take().is_err(), "one slot only");
        // Given back without work: it has stood free all along.
        drop(slot);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut slot = slots.try_take().unwrap();
        assert!(slot.free_for().unwrap() >= Duration::from_millis(50));
        slot.carries_mail();
        assert_eq!(slot.free_for(), None);
        drop(slot);
        // Free again from the moment it was dropped.
        let slot = slots.try_take().unwrap();
        assert!(slot.free_for().unwrap() < Duration::from_millis(30));
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_that_is_freed() {
        let slots = NodeSlots::new(1);
        let held = slots.try_take().unwrap();
        let waiter = tokio::spawn(slots.clone().take());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no slot is free");
        drop(held);
        let slot = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the freed slot goes to the waiter")
            .unwrap()
            .unwrap();
        assert!(slots.try_take().is_err());
        drop(slot);
        assert!(slots.try_take().is_ok());
    }
}
