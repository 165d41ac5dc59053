//! Which deliveries are due, domain by domain, and what the outcome of an
//! attempt does to a message. Plain data and pure functions: the Queue
//! actor owns one [`Scheduler`] and carries out the spool writes and the
//! reports it asks for.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
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
                format!("{EXPIRED} after {attempt} attempts; last error: {reply}"),
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

/// How the reply of a recipient failed by the lifetime begins.
pub const EXPIRED: &str = "delivery time expired";

/// Fails every recipient of the delivery of `domain` without an attempt:
/// the message has been queued longer than it may be.
pub fn expire_delivery(record: &MessageRecord, domain: &str) -> Completion {
    let mut record = record.clone();
    let (notes, attempt) = match record.deliveries.iter().position(|d| d.domain == domain) {
        Some(position) => {
            let delivery = record.deliveries.remove(position);
            let last = delivery.last_error.as_deref().unwrap_or("never attempted");
            let reply = format!(
                "{EXPIRED} after {} attempts; last error: {last}",
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

/// Where a pending delivery waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// In its domain's ready list, at this position.
    Ready(i64),
    /// In the deferred set, due at this time (ms).
    Deferred(u64),
    InFlight,
}

/// The in-memory index of every pending delivery.
///
/// Every operation touches only what it hands out, files or finds due:
/// each delivery's place is known (`places`), the ready lists and the
/// deferred set are ordered maps, and the expiry sweep walks messages by
/// age from the oldest and stops at the first that is young enough. None
/// of them walks the whole queue, which holds a million deliveries and
/// runs on the Queue actor's thread.
#[derive(Debug, Default)]
pub struct Scheduler {
    records: HashMap<MessageId, Arc<MessageRecord>>,
    places: HashMap<Key, Place>,
    /// Due deliveries per domain by position, oldest first; a domain with
    /// none has no entry.
    ready: HashMap<String, BTreeMap<i64, MessageId>>,
    /// Positions for the back of the ready lists (counting up) and for
    /// deliveries put back at the front (counting down).
    next_back: i64,
    next_front: i64,
    /// Deliveries waiting for their next attempt, by time.
    deferred: BTreeSet<(u64, MessageId, String)>,
    /// Pending messages by receive time, for the expiry sweep.
    by_age: BTreeSet<(u64, MessageId)>,
    suspended: HashSet<String>,
    ready_len: usize,
    in_flight_len: usize,
    /// The messages with a delivery pending in each domain, by id (which
    /// starts with the receive time): the domain's count, and its listing.
    by_domain: HashMap<String, BTreeSet<MessageId>>,
    /// The pending messages of each sender (`Envelope::sender_key`), by
    /// id: the sender's listing.
    by_sender: HashMap<String, BTreeSet<MessageId>>,
}

/// Up to `limit` of `ids` after `after`, in order: a page of a listing.
fn page_after(
    ids: Option<&BTreeSet<MessageId>>,
    after: Option<&MessageId>,
    limit: usize,
) -> Vec<MessageId> {
    use std::ops::Bound::{Excluded, Unbounded};
    let Some(ids) = ids else {
        return Vec::new();
    };
    let from = after.map_or(Unbounded, Excluded);
    ids.range((from, Unbounded)).take(limit).cloned().collect()
}

/// The deliveries of one message an operator took ([`Scheduler::take_message`]).
#[derive(Clone, Debug)]
pub struct TakenMessage {
    pub record: Arc<MessageRecord>,
    /// The domains taken: in flight now, to be completed by the taker.
    pub domains: Vec<String>,
    /// Deliveries left to the attempts under way.
    pub in_flight: usize,
}

/// Counts for the operator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerCounts {
    pub messages: usize,
    pub ready: usize,
    pub deferred: usize,
    pub in_flight: usize,
    pub deliveries_by_domain: BTreeMap<String, usize>,
    /// When the oldest message with a delivery pending in each domain was
    /// received (ms since the epoch): how long the domain's mail waits.
    pub oldest_by_domain: BTreeMap<String, u64>,
    /// Domains an operator suspended, whether or not mail waits for them.
    pub suspended: BTreeSet<String>,
    /// Deliveries in flight by the holder of their lease, for a schedule
    /// shared by processes; `None` for one that belongs to one process
    /// (every lease is its own).
    pub in_flight_by_holder: Option<BTreeMap<String, usize>>,
    /// Entries of delivery reports recorded with an outcome but not known
    /// to be queued (a shared schedule queues or drops them on a later pass).
    pub pending_reports: usize,
}

impl Scheduler {
    /// Takes a stored message in; returns the domains it made ready. A
    /// message already pending is left as it is (a rescan may list it
    /// again).
    pub fn insert(&mut self, record: MessageRecord, now_ms: u64) -> Vec<String> {
        self.insert_shared(Arc::new(record), now_ms)
    }

    /// [`Scheduler::insert`] of a record shared with the spool, which
    /// keeps it as it is rather than a copy of it.
    pub fn insert_shared(&mut self, record: Arc<MessageRecord>, now_ms: u64) -> Vec<String> {
        let mut ready = Vec::new();
        if self.records.contains_key(&record.id) {
            return ready;
        }
        for delivery in &record.deliveries {
            let key = (record.id.clone(), delivery.domain.clone());
            if self.places.contains_key(&key) {
                // A record naming one domain twice: one delivery.
                continue;
            }
            self.by_domain
                .entry(delivery.domain.clone())
                .or_default()
                .insert(record.id.clone());
            if delivery.next_attempt_ms <= now_ms {
                self.push_ready(key, false);
                if !self.suspended.contains(&delivery.domain) {
                    ready.push(delivery.domain.clone());
                }
            } else {
                self.defer(key, delivery.next_attempt_ms);
            }
        }
        self.by_age.insert((record.received_ms, record.id.clone()));
        self.by_sender
            .entry(record.envelope.sender_key())
            .or_default()
            .insert(record.id.clone());
        self.records.insert(record.id.clone(), record);
        ready
    }

    /// Files a delivery in its domain's ready list, at the back or (put
    /// back untried) at the front.
    fn push_ready(&mut self, key: Key, front: bool) {
        let position = if front {
            self.next_front -= 1;
            self.next_front
        } else {
            self.next_back += 1;
            self.next_back
        };
        match self.ready.get_mut(&key.1) {
            Some(queue) => {
                queue.insert(position, key.0.clone());
            }
            None => {
                self.ready
                    .insert(key.1.clone(), BTreeMap::from([(position, key.0.clone())]));
            }
        }
        self.ready_len += 1;
        self.places.insert(key, Place::Ready(position));
    }

    fn defer(&mut self, key: Key, due: u64) {
        self.deferred.insert((due, key.0.clone(), key.1.clone()));
        self.places.insert(key, Place::Deferred(due));
    }

    /// Takes a delivery out of wherever it waits; returns where that was.
    fn unfile(&mut self, key: &Key) -> Option<Place> {
        let place = self.places.remove(key)?;
        match place {
            Place::Ready(position) => {
                if let Some(queue) = self.ready.get_mut(&key.1) {
                    if queue.remove(&position).is_some() {
                        self.ready_len -= 1;
                    }
                    if queue.is_empty() {
                        self.ready.remove(&key.1);
                    }
                }
            }
            Place::Deferred(due) => {
                self.deferred.remove(&(due, key.0.clone(), key.1.clone()));
            }
            Place::InFlight => self.in_flight_len -= 1,
        }
        Some(place)
    }

    /// Moves deliveries whose time has come to their domain's ready list;
    /// returns the domains that got work.
    pub fn promote(&mut self, now_ms: u64) -> Vec<String> {
        let mut domains = Vec::new();
        let mut seen = HashSet::new();
        while let Some((due, _, _)) = self.deferred.first() {
            if *due > now_ms {
                break;
            }
            let (_, id, domain) = self.deferred.pop_first().expect("first exists");
            if !self.suspended.contains(&domain) && seen.insert(domain.clone()) {
                domains.push(domain.clone());
            }
            self.push_ready((id, domain), false);
        }
        domains
    }

    /// Makes the deferred deliveries of a message due at `now_ms` (an
    /// operator's retry); the next promote hands them out. Returns how
    /// many; `None` when the message is not queued. Work in flight, ready
    /// or suspended is left as it is.
    pub fn retry(&mut self, id: &MessageId, now_ms: u64) -> Option<usize> {
        let record = self.records.get(id)?.clone();
        let made_due = record
            .deliveries
            .iter()
            .filter(|d| self.make_due((id.clone(), d.domain.clone()), now_ms))
            .count();
        Some(made_due)
    }

    /// Makes the deferred deliveries of these messages in `domain` due at
    /// `now_ms` (an operator's retry of a domain, a page at a time).
    /// Returns how many; messages without such a delivery are skipped.
    pub fn retry_in(&mut self, domain: &str, ids: &[MessageId], now_ms: u64) -> usize {
        ids.iter()
            .filter(|id| self.make_due(((*id).clone(), domain.to_string()), now_ms))
            .count()
    }

    /// Files a deferred delivery as due at `now_ms`; `false` when it is
    /// not deferred past then.
    fn make_due(&mut self, key: (MessageId, String), now_ms: u64) -> bool {
        match self.places.get(&key) {
            Some(&Place::Deferred(due)) if due > now_ms => {
                self.unfile(&key);
                self.defer(key, now_ms);
                true
            }
            _ => false,
        }
    }

    /// Takes every delivery of a message that is not in flight (ready,
    /// deferred, or held by a suspension) into flight, or only its
    /// delivery to `only`, for an operator's delete that completes them.
    /// `None` when the message is not queued.
    pub fn take_message(&mut self, id: &MessageId, only: Option<&str>) -> Option<TakenMessage> {
        let record = self.records.get(id)?.clone();
        let mut taken = TakenMessage {
            record: record.clone(),
            domains: Vec::new(),
            in_flight: 0,
        };
        for delivery in &record.deliveries {
            if only.is_some_and(|only| only != delivery.domain) {
                continue;
            }
            let key = (id.clone(), delivery.domain.clone());
            match self.places.get(&key) {
                Some(Place::InFlight) => taken.in_flight += 1,
                Some(_) => {
                    self.unfile(&key);
                    self.places.insert(key, Place::InFlight);
                    self.in_flight_len += 1;
                    taken.domains.push(delivery.domain.clone());
                }
                None => {}
            }
        }
        Some(taken)
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
        let mut taken = Vec::new();
        while taken.len() < max {
            let Some((_, id)) = queue.pop_first() else {
                break;
            };
            taken.push(id);
        }
        if queue.is_empty() {
            self.ready.remove(domain);
        }
        self.ready_len -= taken.len();
        for id in taken {
            let key = (id, domain.to_string());
            let job = self.records.get(&key.0).and_then(|record| {
                let index = record.deliveries.iter().position(|d| d.domain == domain)?;
                Some((record.clone(), index))
            });
            match job {
                Some(job) => {
                    jobs.push(job);
                    self.places.insert(key, Place::InFlight);
                    self.in_flight_len += 1;
                }
                // Never filed without its record; forget it rather than panic.
                None => {
                    self.places.remove(&key);
                    self.leave_domain(&key);
                }
            }
        }
        jobs
    }

    /// Every domain with due work that `take` would hand out.
    pub fn ready_domains(&self) -> Vec<String> {
        self.ready
            .keys()
            .filter(|domain| !self.suspended.contains(*domain))
            .cloned()
            .collect()
    }

    /// Whether `domain` has due work that `take` would hand out.
    pub fn has_ready(&self, domain: &str) -> bool {
        !self.suspended.contains(domain) && self.ready.contains_key(domain)
    }

    /// Hands an in-flight delivery back untried (its connection never got
    /// to it): it is due again at once.
    pub fn release(&mut self, id: &MessageId, domain: &str) {
        let key = (id.clone(), domain.to_string());
        if self.places.get(&key) == Some(&Place::InFlight) {
            self.unfile(&key);
            self.push_ready(key, true);
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
        let record = self.records.get(id)?;
        let completion = apply_outcome(record, domain, outcome, now_ms, policy, jitter);
        self.store(&completion);
        Some(completion)
    }

    /// Fails every delivery older than `max_lifetime` that is not in
    /// flight, whatever its state (due, deferred or suspended). Walks the
    /// messages from the oldest and stops at the first young enough, so
    /// a sweep costs what it expires (plus old messages still in flight).
    pub fn expire(&mut self, now_ms: u64, policy: &RetryPolicy) -> Vec<Completion> {
        let max = policy.max_lifetime.as_millis() as u64;
        let mut expired: Vec<Key> = Vec::new();
        for (received_ms, id) in &self.by_age {
            if now_ms.saturating_sub(*received_ms) < max {
                break;
            }
            let Some(record) = self.records.get(id) else {
                continue;
            };
            for delivery in &record.deliveries {
                let key = (id.clone(), delivery.domain.clone());
                if self.places.get(&key) != Some(&Place::InFlight) {
                    expired.push(key);
                }
            }
        }
        let mut completions = Vec::with_capacity(expired.len());
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
        let key = (id.clone(), completion.domain.clone());
        let was_filed = self.unfile(&key).is_some();
        match completion.next_attempt_ms {
            Some(next) if !completion.message_done() => self.defer(key, next),
            // The delivery is over.
            _ if was_filed => self.leave_domain(&key),
            _ => {}
        }
        if completion.message_done() {
            if let Some(old) = self.records.remove(id) {
                self.by_age.remove(&(old.received_ms, id.clone()));
                let sender = old.envelope.sender_key();
                if let Some(ids) = self.by_sender.get_mut(&sender) {
                    ids.remove(id);
                    if ids.is_empty() {
                        self.by_sender.remove(&sender);
                    }
                }
            }
            return;
        }
        self.records.insert(id.clone(), completion.record.clone());
    }

    /// A delivery is over: its message leaves the domain's listing.
    fn leave_domain(&mut self, (id, domain): &Key) {
        if let Some(ids) = self.by_domain.get_mut(domain) {
            ids.remove(id);
            if ids.is_empty() {
                self.by_domain.remove(domain);
            }
        }
    }

    /// Up to `limit` messages with a delivery pending in `domain`, in id
    /// (so receive) order, after `after`: a page of the domain's listing.
    pub fn domain_messages(
        &self,
        domain: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Vec<MessageId> {
        page_after(self.by_domain.get(domain), after, limit)
    }

    /// Up to `limit` pending messages of `sender` (`Envelope::sender_key`)
    /// in id (so receive) order, after `after`: a page of its listing.
    pub fn sender_messages(
        &self,
        sender: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Vec<MessageId> {
        page_after(self.by_sender.get(sender), after, limit)
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

    /// Kept up to date by every operation; only the per-domain map is
    /// copied (one entry per domain with pending work).
    /// The domains an operator suspended.
    pub fn suspended(&self) -> BTreeSet<String> {
        self.suspended.iter().cloned().collect()
    }

    pub fn counts(&self) -> SchedulerCounts {
        SchedulerCounts {
            messages: self.records.len(),
            ready: self.ready_len,
            deferred: self.deferred.len(),
            in_flight: self.in_flight_len,
            deliveries_by_domain: self
                .by_domain
                .iter()
                .map(|(domain, ids)| (domain.clone(), ids.len()))
                .collect(),
            oldest_by_domain: self
                .by_domain
                .iter()
                .filter_map(|(domain, ids)| Some((domain.clone(), ids.first()?.received_ms()?)))
                .collect(),
            suspended: self.suspended.iter().cloned().collect(),
            in_flight_by_holder: None,
            // Reports are queued with their outcome here (`follow_up`).
            pending_reports: 0,
        }
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

    #[test]
    fn inserting_a_pending_message_again_changes_nothing() {
        let mut s = Scheduler::default();
        let r = record(0);
        let now = r.received_ms;
        assert_eq!(s.insert(r.clone(), now).len(), 2);
        let jobs = s.take(&r.deliveries[0].domain, 10);
        assert_eq!(jobs.len(), 1);
        // A rescan or a second recovery lists it again.
        assert!(s.insert(r.clone(), now).is_empty());
        let counts = s.counts();
        assert_eq!((counts.ready, counts.in_flight), (1, 1));
        assert!(s.take(&r.deliveries[0].domain, 10).is_empty());
        s.release(&r.id, &r.deliveries[0].domain);
        assert_eq!(s.take(&r.deliveries[0].domain, 10).len(), 1);
    }

    /// Every operation costs the same whatever the queue length: 10 000
    /// completions and 1 000 expiry sweeps among 600 000 deferred
    /// deliveries. Each costs microseconds here; a scan of the deferred
    /// deliveries per completion or per sweep (tens of milliseconds each
    /// in a debug build) blows the generous budget long before the end,
    /// so the test stops there instead of running for the better part of
    /// an hour.
    #[test]
    fn operations_do_not_scan_600k_deferred_deliveries() {
        const DEFERRED_MESSAGES: u64 = 300_000; // two deliveries each
        const DUE_MESSAGES: u64 = 5_000;
        let budget = Duration::from_secs(5);
        let p = RetryPolicy {
            max_lifetime: Duration::from_secs(86_400),
            ..policy()
        };
        let mut s = Scheduler::default();
        let t0 = record(0).received_ms;
        for n in 0..DEFERRED_MESSAGES {
            let mut r = record(n);
            for d in &mut r.deliveries {
                d.next_attempt_ms = t0 + 3_600 * SECOND;
            }
            s.insert(r, t0);
        }
        for n in DEFERRED_MESSAGES..DEFERRED_MESSAGES + DUE_MESSAGES {
            s.insert(record(n), t0 + DEFERRED_MESSAGES + DUE_MESSAGES);
        }
        assert_eq!(s.counts().deferred, 2 * DEFERRED_MESSAGES as usize);

        let now = t0 + DEFERRED_MESSAGES + DUE_MESSAGES;
        let delivered = outcome(&[(0, RcptResult::Delivered), (1, RcptResult::Delivered)]);
        let started = std::time::Instant::now();
        let mut completions = 0;
        for domain in ["example.org", "example.net", "example.com"] {
            loop {
                let jobs = s.take(domain, 20);
                if jobs.is_empty() {
                    break;
                }
                for (r, _) in jobs {
                    assert!(s
                        .complete(&r.id, domain, &delivered, now, &p, 0.0)
                        .is_some());
                    completions += 1;
                    assert!(
                        started.elapsed() < budget,
                        "only {completions} completions in {budget:?}"
                    );
                }
            }
        }
        assert_eq!(completions, 2 * DUE_MESSAGES);
        for sweep in 0..1_000 {
            assert!(s.expire(now, &p).is_empty());
            assert!(
                started.elapsed() < budget,
                "only {sweep} expiry sweeps in {budget:?}"
            );
        }
        let counts = s.counts();
        assert_eq!(counts.messages, DEFERRED_MESSAGES as usize);
        assert_eq!(counts.deferred, 2 * DEFERRED_MESSAGES as usize);
        assert_eq!((counts.ready, counts.in_flight), (0, 0));
    }
}
