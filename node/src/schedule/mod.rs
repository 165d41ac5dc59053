//! The scheduling state of the queue behind one interface.
//!
//! [`Schedule`] is what the Queue actor asks: which deliveries are due, hand
//! some out under a lease, put one back, record an outcome, expire what is
//! too old. Two implementations pass the same test body (`suite`, in tests):
//!
//! - [`MemorySchedule`]: the in-process [`Scheduler`] of one node, for the
//!   local spool. A node's in-flight work dies with the node, so leases are
//!   never reclaimed.
//! - [`RedisSchedule`]: the shared queue in Redis; any node may take any
//!   delivery, and the work of a node that stops is reclaimed by another
//!   once its leases expire.
//!
//! Every method may fail only for the Redis backend ([`SpoolError`]: the
//! same errors the spool reports, so callers branch on one type).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use smarthost_proto::envelope::{MessageId, MessageRecord};

use crate::delivery::MessageOutcome;
use crate::scheduler::{Completion, RetryPolicy, Scheduler, SchedulerCounts, TakenMessage};
use crate::spool::{NewMessage, SpoolError};

pub mod news;
pub mod redis;
#[cfg(test)]
pub mod suite;

pub use self::news::ReadyNews;
pub use self::redis::RedisSchedule;

/// A due delivery handed out: the message's record and the index of the
/// delivery in `record.deliveries`.
pub type Job = (Arc<MessageRecord>, usize);

/// Builds and queues delivery reports for a schedule that writes records
/// itself ([`Schedule::writes_records`]). It builds the reports an outcome
/// calls for first, writes them with the record of that outcome (in one
/// atomic write), and queues them only then: so a report never goes out
/// for an outcome that was not recorded (whose delivery may still be
/// made), and reports kept with a record are queued later if queueing
/// them fails ([`Schedule::send_pending_reports`]).
#[async_trait]
pub trait Reporter: Send + Sync {
    /// Whether a completion calls for any report at all.
    fn needs(&self, completion: &Completion) -> bool;

    /// The report messages that these completions of one message call for
    /// (none, one or several); an error leaves the outcome unrecorded.
    async fn build(&self, completions: &[Completion]) -> Result<Vec<NewMessage>, SpoolError>;

    /// Queues reports made by [`Reporter::build`] like any mail. The same
    /// report may come again after a crash (same message id).
    async fn queue(&self, reports: Vec<NewMessage>) -> Result<(), SpoolError>;

    /// Writes the webhook events of these completions, before their
    /// record is written; an error leaves the outcome unrecorded. The
    /// same events may come again (a lost race, a crash): they are the
    /// same events, with the same ids.
    async fn record_events(&self, _completions: &[Completion]) -> Result<(), SpoolError> {
        Ok(())
    }
}

pub type ReportHook = Arc<dyn Reporter>;

#[async_trait]
pub trait Schedule: Send + Sync + 'static {
    /// Whether `complete` and `expire` write the message records to the
    /// spool themselves (the Redis schedule, whose records are the spool's),
    /// with the reports of the outcome ([`Reporter`]). Otherwise
    /// the caller reports and persists the records it gets back.
    fn writes_records(&self) -> bool {
        false
    }

    /// Starts listening for domains that other nodes gave ready work
    /// ([`news`]); `None` where the queue hears of all of them itself.
    fn ready_news(&self) -> Option<tokio::sync::mpsc::Receiver<ReadyNews>> {
        None
    }

    /// Extends to `lease` from now every lease `holder` holds through this
    /// schedule; returns how many. A schedule whose work dies with the node
    /// has none.
    async fn renew_leases(&self, _holder: &str, _lease: Duration) -> Result<usize, SpoolError> {
        Ok(0)
    }

    /// Files the deliveries of stored messages; returns the domains (first
    /// appearance order, no repeats) that got due work and are not
    /// suspended.
    async fn insert(
        &self,
        records: Vec<MessageRecord>,
        now_ms: u64,
    ) -> Result<Vec<String>, SpoolError>;

    /// [`Schedule::insert`] of records shared with the spool: a schedule
    /// that keeps records in memory keeps these, not copies of them. This
    /// default copies them for `insert`.
    /// This schedule as a [`RedisSchedule`], so that a spool on its
    /// server can insert in the transaction that stores
    /// ([`crate::spool::Spool::store_scheduled`]).
    fn redis(&self) -> Option<&RedisSchedule> {
        None
    }

    async fn insert_shared(
        &self,
        records: Vec<Arc<MessageRecord>>,
        now_ms: u64,
    ) -> Result<Vec<String>, SpoolError> {
        let records = records.into_iter().map(Arc::unwrap_or_clone).collect();
        self.insert(records, now_ms).await
    }

    /// Moves deliveries due by `now_ms` to their domain's ready work;
    /// returns the domains that got work and are not suspended.
    async fn promote(&self, now_ms: u64) -> Result<Vec<String>, SpoolError>;

    /// Up to `max` due deliveries of `domain`, oldest first, now in flight
    /// under a lease of `holder` that runs out after `lease` unless the
    /// delivery is completed or released first.
    async fn take(
        &self,
        domain: &str,
        max: usize,
        holder: &str,
        lease: Duration,
    ) -> Result<Vec<Job>, SpoolError>;

    /// Hands an in-flight delivery back untried: due again at once.
    async fn release(&self, id: &MessageId, domain: &str) -> Result<(), SpoolError>;

    /// Records the outcome of an in-flight delivery ([`crate::scheduler::apply_outcome`]);
    /// `None` when there is nothing to record it on. A schedule that
    /// writes records itself builds the reports through `report` (when
    /// given), writes them with the record and then queues them
    /// ([`Reporter`]); one that does not ignores it, and the caller reports
    /// and persists.
    #[allow(clippy::too_many_arguments)]
    async fn complete(
        &self,
        id: &MessageId,
        domain: &str,
        outcome: &MessageOutcome,
        now_ms: u64,
        policy: &RetryPolicy,
        jitter: f64,
        report: Option<&ReportHook>,
    ) -> Result<Option<Completion>, SpoolError>;

    /// Fails every delivery older than the policy's lifetime that is not
    /// in flight, whatever its state; `report` as for
    /// [`Schedule::complete`], per message.
    async fn expire(
        &self,
        now_ms: u64,
        policy: &RetryPolicy,
        report: Option<&ReportHook>,
    ) -> Result<Vec<Completion>, SpoolError>;

    /// Queues reports that were recorded with an outcome but not queued
    /// since (the queueing failed, or the node stopped in between) once
    /// they are older than a grace; returns how many messages' reports.
    /// Only a schedule that writes records keeps such reports.
    async fn send_pending_reports(&self, _reporter: &ReportHook) -> Result<usize, SpoolError> {
        Ok(0)
    }

    /// Domains with due work that `take` would hand out: every one, or on
    /// a shared schedule with very many, the next of them in turn.
    async fn ready_domains(&self) -> Result<Vec<String>, SpoolError>;

    /// Whether `domain` has due work that `take` would hand out.
    async fn has_ready(&self, domain: &str) -> Result<bool, SpoolError>;

    /// Stops handing out `domain`'s deliveries; they stay queued.
    async fn suspend(&self, domain: &str) -> Result<(), SpoolError>;

    /// Hands out `domain`'s deliveries again; `true` if some are due.
    async fn resume(&self, domain: &str) -> Result<bool, SpoolError>;

    async fn counts(&self) -> Result<SchedulerCounts, SpoolError>;

    /// Takes the deliveries of a message that are not in flight (ready,
    /// deferred or suspended), or only its delivery to `only`, under
    /// `holder`'s lease, for an operator's delete, which completes each
    /// like an attempt. `None` when the message is not queued.
    async fn take_message(
        &self,
        id: &MessageId,
        only: Option<&str>,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<TakenMessage>, SpoolError>;

    /// Makes the deferred deliveries of a message due now (an operator's
    /// retry): the next promote hands them out. Returns how many; `None`
    /// when the message is not queued.
    async fn retry(&self, id: &MessageId, now_ms: u64) -> Result<Option<usize>, SpoolError>;

    /// Makes the deferred deliveries of `ids` in `domain` due now (an
    /// operator's retry of a domain, one page of its listing at a time):
    /// the next promote hands them out. Returns how many; deliveries in
    /// flight, ready or suspended, and messages not queued there, are
    /// left as they are.
    async fn retry_in(
        &self,
        domain: &str,
        ids: &[MessageId],
        now_ms: u64,
    ) -> Result<usize, SpoolError>;

    /// The domains an operator suspended (few: one per operator action).
    async fn suspended(&self) -> Result<BTreeSet<String>, SpoolError>;

    /// Up to `limit` messages with a delivery pending in `domain`, in id
    /// (so receive) order after `after`: one page of the domain's listing,
    /// whose cost is the page, not the domain's queue.
    async fn domain_messages(
        &self,
        domain: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError>;

    /// Up to `limit` pending messages of `sender` (as
    /// [`smarthost_proto::envelope::Envelope::sender_key`] gives it), in id
    /// order after `after`: one page of the sender's listing. The ids may
    /// include messages done meanwhile; their records are gone.
    async fn sender_messages(
        &self,
        sender: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError>;

    /// The current records of these messages (`None`: no longer pending),
    /// for the writer that persists them.
    async fn records(
        &self,
        ids: &[MessageId],
    ) -> Result<Vec<Option<Arc<MessageRecord>>>, SpoolError>;

    /// Puts every in-flight delivery leased to one of `holders` (nodes
    /// found dead) back to ready work at once, without waiting for the
    /// leases to run out; returns how many.
    async fn reclaim_holders(&self, _holders: &[String]) -> Result<usize, SpoolError> {
        // In-flight work of this node lives and dies with this node.
        Ok(0)
    }

    /// Puts in-flight deliveries whose lease ran out back to ready work;
    /// returns how many. Leases are judged by the clock of the shared
    /// store, not by a node's, so this takes no time argument.
    async fn reclaim_expired_leases(&self) -> Result<usize, SpoolError>;
}

/// The scheduling state of one node, in memory.
#[derive(Debug, Default)]
pub struct MemorySchedule {
    // Never held across an await: every method is synchronous inside.
    inner: Mutex<Scheduler>,
}

impl MemorySchedule {
    fn lock(&self) -> MutexGuard<'_, Scheduler> {
        // A panic elsewhere leaves plain data behind; keep using it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Keeps the first appearance of each domain (a set, not a scan of the
/// output: recovery inserts a whole spool over many domains at once).
pub(crate) fn dedup(domains: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    domains
        .into_iter()
        .filter(|domain| seen.insert(domain.clone()))
        .collect()
}

#[async_trait]
impl Schedule for MemorySchedule {
    async fn insert(
        &self,
        records: Vec<MessageRecord>,
        now_ms: u64,
    ) -> Result<Vec<String>, SpoolError> {
        let shared = records.into_iter().map(Arc::new).collect();
        self.insert_shared(shared, now_ms).await
    }

    async fn insert_shared(
        &self,
        records: Vec<Arc<MessageRecord>>,
        now_ms: u64,
    ) -> Result<Vec<String>, SpoolError> {
        let mut scheduler = self.lock();
        Ok(dedup(
            records
                .into_iter()
                .flat_map(|r| scheduler.insert_shared(r, now_ms))
                .collect::<Vec<_>>(),
        ))
    }

    async fn promote(&self, now_ms: u64) -> Result<Vec<String>, SpoolError> {
        Ok(self.lock().promote(now_ms))
    }

    async fn take(
        &self,
        domain: &str,
        max: usize,
        _holder: &str,
        _lease: Duration,
    ) -> Result<Vec<Job>, SpoolError> {
        Ok(self.lock().take(domain, max))
    }

    async fn release(&self, id: &MessageId, domain: &str) -> Result<(), SpoolError> {
        self.lock().release(id, domain);
        Ok(())
    }

    async fn complete(
        &self,
        id: &MessageId,
        domain: &str,
        outcome: &MessageOutcome,
        now_ms: u64,
        policy: &RetryPolicy,
        jitter: f64,
        _report: Option<&ReportHook>,
    ) -> Result<Option<Completion>, SpoolError> {
        Ok(self
            .lock()
            .complete(id, domain, outcome, now_ms, policy, jitter))
    }

    async fn expire(
        &self,
        now_ms: u64,
        policy: &RetryPolicy,
        _report: Option<&ReportHook>,
    ) -> Result<Vec<Completion>, SpoolError> {
        Ok(self.lock().expire(now_ms, policy))
    }

    async fn ready_domains(&self) -> Result<Vec<String>, SpoolError> {
        Ok(self.lock().ready_domains())
    }

    async fn has_ready(&self, domain: &str) -> Result<bool, SpoolError> {
        Ok(self.lock().has_ready(domain))
    }

    async fn suspend(&self, domain: &str) -> Result<(), SpoolError> {
        self.lock().suspend(domain);
        Ok(())
    }

    async fn resume(&self, domain: &str) -> Result<bool, SpoolError> {
        Ok(self.lock().resume(domain))
    }

    async fn counts(&self) -> Result<SchedulerCounts, SpoolError> {
        Ok(self.lock().counts())
    }

    async fn suspended(&self) -> Result<BTreeSet<String>, SpoolError> {
        Ok(self.lock().suspended())
    }

    async fn retry(&self, id: &MessageId, now_ms: u64) -> Result<Option<usize>, SpoolError> {
        Ok(self.lock().retry(id, now_ms))
    }

    async fn take_message(
        &self,
        id: &MessageId,
        only: Option<&str>,
        _holder: &str,
        _lease: Duration,
    ) -> Result<Option<TakenMessage>, SpoolError> {
        Ok(self.lock().take_message(id, only))
    }

    async fn retry_in(
        &self,
        domain: &str,
        ids: &[MessageId],
        now_ms: u64,
    ) -> Result<usize, SpoolError> {
        Ok(self.lock().retry_in(domain, ids, now_ms))
    }

    async fn domain_messages(
        &self,
        domain: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError> {
        Ok(self.lock().domain_messages(domain, after, limit))
    }

    async fn sender_messages(
        &self,
        sender: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError> {
        Ok(self.lock().sender_messages(sender, after, limit))
    }

    async fn records(
        &self,
        ids: &[MessageId],
    ) -> Result<Vec<Option<Arc<MessageRecord>>>, SpoolError> {
        let scheduler = self.lock();
        Ok(ids.iter().map(|id| scheduler.record(id).cloned()).collect())
    }

    async fn reclaim_expired_leases(&self) -> Result<usize, SpoolError> {
        // In-flight work of this node lives and dies with this node.
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_passes_the_schedule_suite() {
        suite::run(|| async {
            suite::Fixture {
                schedule: Arc::new(MemorySchedule::default()) as Arc<dyn Schedule>,
                spool: None,
            }
        })
        .await;
    }
}
