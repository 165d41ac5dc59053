//! Which deliveries are due, domain by domain, and what the outcome of an
//! attempt does to a message. Plain data and pure functions: the Queue
//! actor owns one [`Scheduler`] and carries out the spool writes and the
//! reports it asks for.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use smarthost_proto::envelope::{DeliveryState, MessageId, MessageRecord};

use crate::delivery::{MessageOutcome, RcptResult};

/// When to try again, and when to give up.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// The waits after the first, second, … failed attempt; the last repeats.
    pub intervals: Vec<Duration>,
    pub max_lifetime: Duration,
    /// After this long still undelivered, the sender hears once that the
    /// message is delayed.
    pub delay_notification: Duration,
}

impl RetryPolicy {
    /// The wait after `attempts` failed attempts (1 = the first failed),
    /// spread by `jitter` (a fraction in −0.1..=0.1) so retries of many
    /// messages do not arrive together.
    pub fn backoff(&self, attempts: u32, jitter: f64) -> Duration {
        let index = (attempts.max(1) as usize - 1).min(self.intervals.len().saturating_sub(1));
        let base = self
            .intervals
            .get(index)
            .copied()
            .unwrap_or(Duration::from_secs(900));
        base.mul_f64(1.0 + jitter.clamp(-0.1, 0.1))
    }
}

/// What happened to one recipient, for the log and the reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientNote {
    pub recipient: u32,
    pub result: RcptResult,
    pub reply: String,
}

/// The effect of one attempt (or of expiry) on a message.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The record as it is now; `deliveries` is empty when the message is done.
    pub record: Arc<MessageRecord>,
    pub domain: String,
    /// The attempt number this outcome belongs to (1 = first).
    pub attempt: u32,
    /// Every recipient of the attempt, with what became of it.
    pub notes: Vec<RecipientNote>,
    /// Recipients to report to the sender as delayed (once per delivery).
    pub delayed: Vec<u32>,
    /// When the delivery is tried next, if it is still pending.
    pub next_attempt_ms: Option<u64>,
    /// The server that answered, if one did.
    pub remote_host: Option<String>,
}

impl Completion {
    pub fn failed(&self) -> impl Iterator<Item = &RecipientNote> {
        self.notes.iter().filter(|n| n.result == RcptResult::Failed)
    }

    pub fn message_done(&self) -> bool {
        self.record.deliveries.is_empty()
    }
}

/// Applies an attempt's outcome to the delivery of `domain` in `record`.
///
/// Delivered and failed recipients leave the delivery; deferred ones stay,
/// and the delivery waits for its next attempt — unless the message is older
/// than `max_lifetime`, in which case they fail now. A recipient the outcome
/// does not mention counts as deferred.
pub fn apply_outcome(
    record: &MessageRecord,
    domain: &str,
    outcome: &MessageOutcome,
    now_ms: u64,
    policy: &RetryPolicy,
    jitter: f64,
) -> Completion {
    let mut record = record.clone();
    let Some(position) = record.deliveries.iter().position(|d| d.domain == domain) else {
        return Completion {
            record: Arc::new(record),
            domain: domain.to_string(),
            attempt: 0,
            notes: Vec::new(),
            delayed: Vec::new(),
            next_attempt_ms: None,
            remote_host: None,
        };
    };
    let delivery = &mut record.deliveries[position];
    delivery.attempts += 1;
    let attempt = delivery.attempts;
    let age = Duration::from_millis(now_ms.saturating_sub(record.received_ms));
    let expired = age >= policy.max_lifetime;

    let mut notes = Vec::with_capacity(delivery.recipients.len());
    let mut still_pending = Vec::new();
    for &recipient in &delivery.recipients {
        let (result, reply) = outcome
            .recipients
            .iter()
            .find(|o| o.recipient == recipient)
            .map(|o| (o.result, o.reply.clone()))
            .unwrap_or((
                RcptResult::Deferred,
                "no result for this recipient".to_string(),
            ));
        let (result, reply) = match result {
            RcptResult::Deferred if expired => (
                RcptResult::Failed,
                format!("delivery time expired after {attempt} attempts; last error: {reply}"),
            ),
            other => (other, reply),
        };
        if result == RcptResult::Deferred {
            still_pending.push(recipient);
        }
        notes.push(RecipientNote {
            recipient,
            result,
            reply,
        });
    }

    let mut delayed = Vec::new();
    let next_attempt_ms = if still_pending.is_empty() {
        record.deliveries.remove(position);
        None
    } else {
        let next = now_ms + policy.backoff(attempt, jitter).as_millis() as u64;
        delivery.recipients = still_pending;
        delivery.state = DeliveryState::Deferred;
        delivery.next_attempt_ms = next;
        delivery.last_error = notes
            .iter()
            .find(|n| n.result == RcptResult::Deferred)
            .map(|n| n.reply.clone());
        if !delivery.delay_notified && age >= policy.delay_notification {
            delivery.delay_notified = true;
            delayed = delivery.recipients.clone();
        }
        Some(next)
    };
    Completion {
        record: Arc::new(record),
        domain: domain.to_string(),
        attempt,
        notes,
        delayed,
        next_attempt_ms,
        remote_host: outcome.remote.as_ref().map(|r| r.host.clone()),
    }
}

/// Fails every recipient of the delivery of `domain` without an attempt:
/// the message has been queued longer than it may be.
pub fn expire_delivery(record: &MessageRecord, domain: &str) -> Completion {
    let mut record = record.clone();
    let (notes, attempt) = match record.deliveries.iter().position(|d| d.domain == domain) {
        Some(position) => {
            let delivery = record.deliveries.remove(position);
            let last = delivery.last_error.as_deref().unwrap_or("never attempted");
            let reply = format!(
                "delivery time expired after {} attempts; last error: {last}",
                delivery.attempts
            );
            let notes = delivery
                .recipients
                .iter()
                .map(|&recipient| RecipientNote {
                    recipient,
                    result: RcptResult::Failed,
                    reply: reply.clone(),
                })
                .collect();
            (notes, delivery.attempts)
        }
        None => (Vec::new(), 0),
    };
    Completion {
        record: Arc::new(record),
        domain: domain.to_string(),
        attempt,
        notes,
        delayed: Vec::new(),
        next_attempt_ms: None,
        remote_host: None,
    }
}

/// A delivery: one message to one domain.
type Key = (MessageId, String);

/// The in-memory index of every pending delivery.
#[derive(Debug, Default)]
pub struct Scheduler {
    records: HashMap<MessageId, Arc<MessageRecord>>,
    /// Due deliveries per domain, oldest first.
    ready: HashMap<String, VecDeque<MessageId>>,
    /// Deliveries waiting for their next attempt, by time.
    deferred: BTreeSet<(u64, MessageId, String)>,
    in_flight: HashSet<Key>,
    suspended: HashSet<String>,
}

/// Counts for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerCounts {
    pub messages: usize,
    pub ready: usize,
    pub deferred: usize,
    pub in_flight: usize,
    pub deliveries_by_domain: std::collections::BTreeMap<String, usize>,
}

impl Scheduler {
    /// Takes a stored message in; returns the domains it made ready.
    pub fn insert(&mut self, record: MessageRecord, now_ms: u64) -> Vec<String> {
        let mut ready = Vec::new();
        for delivery in &record.deliveries {
            if delivery.next_attempt_ms <= now_ms {
                self.ready
                    .entry(delivery.domain.clone())
                    .or_default()
                    .push_back(record.id.clone());
                if !self.suspended.contains(&delivery.domain) {
                    ready.push(delivery.domain.clone());
                }
            } else {
                self.deferred.insert((
                    delivery.next_attempt_ms,
                    record.id.clone(),
                    delivery.domain.clone(),
                ));
            }
        }
        self.records.insert(record.id.clone(), Arc::new(record));
        ready
    }

    /// Moves deliveries whose time has come to their domain's ready list;
    /// returns the domains that got work.
    pub fn promote(&mut self, now_ms: u64) -> Vec<String> {
        let mut domains = Vec::new();
        while let Some((due, _, _)) = self.deferred.first() {
            if *due > now_ms {
                break;
            }
            let (_, id, domain) = self.deferred.pop_first().expect("first exists");
            self.ready.entry(domain.clone()).or_default().push_back(id);
            if !self.suspended.contains(&domain) && !domains.contains(&domain) {
                domains.push(domain);
            }
        }
        domains
    }

    /// When the next deferred delivery comes due.
    pub fn next_due(&self) -> Option<u64> {
        self.deferred.first().map(|(due, _, _)| *due)
    }

    /// Up to `max` due deliveries of `domain`, now in flight.
    pub fn take(&mut self, domain: &str, max: usize) -> Vec<(Arc<MessageRecord>, usize)> {
        let mut jobs = Vec::new();
        if self.suspended.contains(domain) {
            return jobs;
        }
        let Some(queue) = self.ready.get_mut(domain) else {
            return jobs;
        };
        while jobs.len() < max {
            let Some(id) = queue.pop_front() else { break };
            let Some(record) = self.records.get(&id) else {
                continue;
            };
            let Some(index) = record.deliveries.iter().position(|d| d.domain == domain) else {
                continue;
            };
            if self.in_flight.insert((id, domain.to_string())) {
                jobs.push((record.clone(), index));
            }
        }
        if queue.is_empty() {
            self.ready.remove(domain);
        }
        jobs
    }

    /// Every domain with due work that `take` would hand out.
    pub fn ready_domains(&self) -> Vec<String> {
        self.ready
            .iter()
            .filter(|(domain, queue)| !queue.is_empty() && !self.suspended.contains(*domain))
            .map(|(domain, _)| domain.clone())
            .collect()
    }

    /// Whether `domain` has due work that `take` would hand out.
    pub fn has_ready(&self, domain: &str) -> bool {
        !self.suspended.contains(domain) && self.ready.get(domain).is_some_and(|q| !q.is_empty())
    }

    /// Hands an in-flight delivery back untried (its connection never got
    /// to it): it is due again at once.
    pub fn release(&mut self, id: &MessageId, domain: &str) {
        if self.in_flight.remove(&(id.clone(), domain.to_string())) {
            self.ready
                .entry(domain.to_string())
                .or_default()
                .push_front(id.clone());
        }
    }

    /// Records the outcome of an in-flight delivery.
    pub fn complete(
        &mut self,
        id: &MessageId,
        domain: &str,
        outcome: &MessageOutcome,
        now_ms: u64,
        policy: &RetryPolicy,
        jitter: f64,
    ) -> Option<Completion> {
        self.in_flight.remove(&(id.clone(), domain.to_string()));
        let record = self.records.get(id)?;
        let completion = apply_outcome(record, domain, outcome, now_ms, policy, jitter);
        self.store(&completion);
        Some(completion)
    }

    /// Fails every delivery older than `max_lifetime` that is not in
    /// flight, whatever its state (due, deferred or suspended).
    pub fn expire(&mut self, now_ms: u64, policy: &RetryPolicy) -> Vec<Completion> {
        let max = policy.max_lifetime.as_millis() as u64;
        let expired: Vec<Key> = self
            .records
            .values()
            .filter(|r| now_ms.saturating_sub(r.received_ms) >= max)
            .flat_map(|r| {
                r.deliveries
                    .iter()
                    .map(|d| (r.id.clone(), d.domain.clone()))
            })
            .filter(|key| !self.in_flight.contains(key))
            .collect();
        let mut completions = Vec::new();
        for (id, domain) in expired {
            let record = self.records.get(&id).expect("listed above");
            let completion = expire_delivery(record, &domain);
            self.store(&completion);
            completions.push(completion);
        }
        completions
    }

    /// Keeps the new record and re-files its delivery.
    fn store(&mut self, completion: &Completion) {
        let id = &completion.record.id;
        self.deferred
            .retain(|(_, other, domain)| !(other == id && domain == &completion.domain));
        if let Some(queue) = self.ready.get_mut(&completion.domain) {
            queue.retain(|other| other != id);
        }
        if completion.message_done() {
            self.records.remove(id);
            return;
        }
        if let Some(next) = completion.next_attempt_ms {
            self.deferred
                .insert((next, id.clone(), completion.domain.clone()));
        }
        self.records.insert(id.clone(), completion.record.clone());
    }

    /// The current record of a message still pending.
    pub fn record(&self, id: &MessageId) -> Option<&Arc<MessageRecord>> {
        self.records.get(id)
    }

    /// Stops handing out `domain`'s deliveries; they stay queued.
    pub fn suspend(&mut self, domain: &str) {
        self.suspended.insert(domain.to_string());
    }

    /// Hands out `domain`'s deliveries again; `true` if some are due.
    pub fn resume(&mut self, domain: &str) -> bool {
        self.suspended.remove(domain);
        self.has_ready(domain)
    }

    pub fn counts(&self) -> SchedulerCounts {
        let mut counts = SchedulerCounts {
            messages: self.records.len(),
            ready: self.ready.values().map(VecDeque::len).sum(),
            deferred: self.deferred.len(),
            in_flight: self.in_flight.len(),
            ..SchedulerCounts::default()
        };
        for record in self.records.values() {
            for delivery in &record.deliveries {
                *counts
                    .deliveries_by_domain
                    .entry(delivery.domain.clone())
                    .or_default() += 1;
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    //! The pure functions; the [`Scheduler`] itself passes the shared
    //! schedule suite (`crate::schedule::suite`) as `MemorySchedule`.
    use super::*;
    use crate::schedule::suite::{outcome, policy, record, SECOND};

    #[test]
    fn backoff_walks_the_intervals_and_repeats_the_last() {
        let p = policy();
        let secs: Vec<u64> = (1..=5).map(|a| p.backoff(a, 0.0).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 4, 4]);
        assert_eq!(p.backoff(1, 0.1), Duration::from_millis(1100));
        assert_eq!(
            p.backoff(1, 5.0),
            Duration::from_millis(1100),
            "jitter is clamped"
        );
        assert_eq!(p.backoff(1, -0.1), Duration::from_millis(900));
    }

    #[test]
    fn unmentioned_recipients_count_as_deferred() {
        let r = record(0);
        let c = apply_outcome(
            &r,
            "example.org",
            &outcome(&[]),
            r.received_ms,
            &policy(),
            0.0,
        );
        assert_eq!(c.notes[0].result, RcptResult::Deferred);
        assert!(c.next_attempt_ms.is_some());
    }

    #[test]
    fn past_the_lifetime_a_deferral_is_a_failure() {
        let r = record(0);
        let late = r.received_ms + 60 * SECOND;
        let c = apply_outcome(
            &r,
            "example.org",
            &outcome(&[(0, RcptResult::Deferred)]),
            late,
            &policy(),
            0.0,
        );
        assert_eq!(c.notes[0].result, RcptResult::Failed);
        assert!(c.notes[0].reply.contains("expired"), "{}", c.notes[0].reply);
        assert_eq!(c.next_attempt_ms, None);
    }

    #[test]
    fn the_delay_report_is_asked_for_once() {
        let r = record(0);
        let later = r.received_ms + 5 * SECOND;
        let deferred = outcome(&[(0, RcptResult::Deferred)]);
        let early = apply_outcome(&r, "example.org", &deferred, r.received_ms, &policy(), 0.0);
        assert!(early.delayed.is_empty());
        let c = apply_outcome(
            &early.record,
            "example.org",
            &deferred,
            later,
            &policy(),
            0.0,
        );
        assert_eq!(c.delayed, [0]);
        let c = apply_outcome(
            &c.record,
            "example.org",
            &deferred,
            later + SECOND,
            &policy(),
            0.0,
        );
        assert!(c.delayed.is_empty());
    }
}
