//! The test body every [`Schedule`] implementation must pass.
//!
//! [`run`] takes a factory that returns a fresh, empty schedule for each
//! case, with the spool its records live in when the implementation reads
//! them from there (the Redis schedule does; the memory one keeps them).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use smarthost_proto::envelope::{DeliveryState, MessageId, MessageRecord};

use super::Schedule;
use crate::delivery::{MessageOutcome, RcptOutcome, RcptResult};
use crate::scheduler::{Completion, RetryPolicy};
use crate::spool::suite::message;
use crate::spool::Spool;

pub const SECOND: u64 = 1000;
const LEASE: Duration = Duration::from_secs(300);

/// A schedule under test and, if it reads records from one, its spool.
pub struct Fixture {
    pub schedule: Arc<dyn Schedule>,
    pub spool: Option<Arc<dyn Spool>>,
}

pub fn policy() -> RetryPolicy {
    RetryPolicy {
        intervals: vec![
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(4),
        ],
        max_lifetime: Duration::from_secs(60),
        delay_notification: Duration::from_secs(5),
    }
}

/// Test message `n`: recipient 0 at one domain, recipient 1 at another.
pub fn record(n: u64) -> MessageRecord {
    message(n, 100).record
}

pub fn outcome(results: &[(u32, RcptResult)]) -> MessageOutcome {
    MessageOutcome {
        recipients: results
            .iter()
            .map(|&(recipient, result)| RcptOutcome {
                recipient,
                result,
                reply: format!("{result:?}"),
            })
            .collect(),
        remote: None,
        latency: Duration::ZERO,
    }
}

/// Stores test messages (if the schedule reads them from a spool) and
/// inserts them.
pub async fn insert(f: &Fixture, numbers: &[u64], now_ms: u64) -> Vec<String> {
    if let Some(spool) = &f.spool {
        let batch = numbers.iter().map(|&n| message(n, 100)).collect();
        spool.store(batch).await.expect("store");
    }
    let records = numbers.iter().map(|&n| record(n)).collect();
    f.schedule.insert(records, now_ms).await.expect("insert")
}

/// Records `outcome` for a delivery in flight, with the test policy, no
/// jitter and no report hook.
pub async fn complete(
    s: &dyn Schedule,
    id: &MessageId,
    domain: &str,
    outcome: &MessageOutcome,
    now_ms: u64,
) -> Option<Completion> {
    s.complete(id, domain, outcome, now_ms, &policy(), 0.0, None)
        .await
        .expect("complete")
}

async fn take(s: &dyn Schedule, domain: &str, max: usize) -> Vec<super::Job> {
    s.take(domain, max, "node-a", LEASE).await.expect("take")
}

pub async fn run<F, Fut>(make: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Fixture>,
{
    take_hands_out_due_work_once_and_release_puts_it_back(make().await).await;
    take_respects_the_maximum_and_keeps_order(make().await).await;
    a_deferred_delivery_comes_back_after_its_interval(make().await).await;
    a_retry_makes_deferred_work_due_now_and_leaves_the_rest(make().await).await;
    taking_a_message_leaves_work_in_flight_to_its_holder(make().await).await;
    the_message_is_done_when_every_delivery_is(make().await).await;
    expiry_reaches_due_deferred_and_suspended_work_but_not_work_in_flight(make().await).await;
    a_suspended_domain_keeps_its_work_until_resumed(make().await).await;
    counts_follow_the_deliveries(make().await).await;
    a_domain_is_listed_in_pages_of_what_it_holds(make().await).await;
    a_domain_retry_and_take_touch_that_domain_only(make().await).await;
    a_sender_is_listed_in_pages_of_its_pending_messages(make().await).await;
}

/// Every page of `sender`'s listing, `limit` at a time, without the
/// messages that are done.
async fn list_sender(s: &dyn Schedule, sender: &str, limit: usize) -> Vec<MessageId> {
    let mut listed = Vec::new();
    let mut after: Option<MessageId> = None;
    for _ in 0..100 {
        let page = s
            .sender_messages(sender, after.as_ref(), limit)
            .await
            .expect("sender messages");
        assert!(page.len() <= limit);
        let Some(last) = page.last().cloned() else {
            break;
        };
        let records = s.records(&page).await.expect("records");
        listed.extend(
            page.into_iter()
                .zip(records)
                .filter(|(_, r)| r.is_some())
                .map(|(id, _)| id),
        );
        after = Some(last);
    }
    listed
}

async fn a_sender_is_listed_in_pages_of_its_pending_messages(f: Fixture) {
    let s = &*f.schedule;
    // Messages 20..29 from s0 (even) and s1 (odd), 29 from <>.
    let sender = |n: u64| match n {
        29 => None,
        n => Some(smarthost_proto::address::Mailbox {
            local_part: format!("s{}", n % 2),
            domain: "sender.example".into(),
        }),
    };
    let messages: Vec<_> = (20..30)
        .map(|n| {
            let mut m = message(n, 100);
            m.record.envelope.sender = sender(n);
            m
        })
        .collect();
    if let Some(spool) = &f.spool {
        spool.store(messages.clone()).await.expect("store");
    }
    let t0 = record(20).received_ms;
    let records = messages.iter().map(|m| m.record.clone()).collect();
    s.insert(records, t0).await.expect("insert");
    let ids = |numbers: &[u64]| numbers.iter().map(|&n| record(n).id).collect::<Vec<_>>();
    assert_eq!(
        list_sender(s, "s0@sender.example", 2).await,
        ids(&[20, 22, 24, 26, 28])
    );
    assert_eq!(
        list_sender(s, "s1@sender.example", 100).await,
        ids(&[21, 23, 25, 27])
    );
    assert_eq!(list_sender(s, "<>", 3).await, ids(&[29]));
    assert!(list_sender(s, "nobody@sender.example", 3).await.is_empty());

    // Message 22 fails for good in both its domains: it leaves the
    // listing; 24, failed in one of two, stays.
    let domains = ["example.org", "example.net", "example.com"];
    for (n, recipients) in [(22u64, &[0u32, 1][..]), (24, &[0][..])] {
        let taken = s
            .take_message(&record(n).id, None, "node-a", LEASE)
            .await
            .expect("take a message")
            .expect("queued");
        for &recipient in recipients {
            let domain = domains[((n + u64::from(recipient)) % 3) as usize];
            assert!(taken.domains.iter().any(|d| d == domain), "{domain}");
            let failed = outcome(&[(recipient, RcptResult::Failed)]);
            complete(s, &record(n).id, domain, &failed, t0).await;
        }
    }
    assert_eq!(
        list_sender(s, "s0@sender.example", 2).await,
        ids(&[20, 24, 26, 28])
    );
}

/// Every page of `domain`'s listing, `limit` at a time.
async fn list_domain(s: &dyn Schedule, domain: &str, limit: usize) -> Vec<Vec<MessageId>> {
    let mut pages = Vec::new();
    let mut after: Option<MessageId> = None;
    for _ in 0..100 {
        let page = s
            .domain_messages(domain, after.as_ref(), limit)
            .await
            .expect("domain messages");
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        pages.push(page);
    }
    pages
}

async fn a_domain_is_listed_in_pages_of_what_it_holds(f: Fixture) {
    let s = &*f.schedule;
    let t0 = record(0).received_ms;
    // Messages 0..12, all due; example.org holds those with n % 3 of 0
    // or 2.
    insert(&f, &(0..12).collect::<Vec<_>>(), t0 + 60 * SECOND).await;
    let ids = |numbers: &[u64]| numbers.iter().map(|&n| record(n).id).collect::<Vec<_>>();
    assert_eq!(
        list_domain(s, "example.org", 3).await,
        [ids(&[0, 2, 3]), ids(&[5, 6, 8]), ids(&[9, 11])]
    );
    assert!(list_domain(s, "nowhere.example", 3).await.is_empty());

    // Delivered to example.org: gone from its listing, still in
    // example.net's. Deferred, in flight or taken by an operator: listed.
    let taken = take(s, "example.org", 3).await;
    assert_eq!(taken.len(), 3);
    let delivered = outcome(&[(0, RcptResult::Delivered)]);
    complete(s, &record(0).id, "example.org", &delivered, t0)
        .await
        .unwrap();
    let deferred = outcome(&[(1, RcptResult::Deferred)]);
    complete(s, &record(2).id, "example.org", &deferred, t0)
        .await
        .unwrap();
    s.take_message(&record(5).id, None, "node-a", LEASE)
        .await
        .unwrap()
        .expect("queued");
    let org: Vec<MessageId> = list_domain(s, "example.org", 4)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(org, ids(&[2, 3, 5, 6, 8, 9, 11]));
    assert_eq!(
        list_domain(s, "example.net", 100).await,
        [ids(&[0, 1, 3, 4, 6, 7, 9, 10])]
    );
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.deliveries_by_domain["example.org"], org.len());

    // Failed for good (the operator's delete of message 5): gone.
    let failed = outcome(&[(1, RcptResult::Failed)]);
    complete(s, &record(5).id, "example.org", &failed, t0)
        .await
        .unwrap();
    let org: Vec<MessageId> = list_domain(s, "example.org", 100)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(org, ids(&[2, 3, 6, 8, 9, 11]));
}

async fn take_hands_out_due_work_once_and_release_puts_it_back(f: Fixture) {
    let s = &*f.schedule;
    let r = record(0);
    let domains = insert(&f, &[0], r.received_ms).await;
    assert_eq!(domains, ["example.org", "example.net"]);
    assert_eq!(take(s, "example.org", 10).await.len(), 1);
    assert!(
        take(s, "example.org", 10).await.is_empty(),
        "already in flight"
    );
    assert!(!s.has_ready("example.org").await.unwrap());
    s.release(&r.id, "example.org").await.unwrap();
    assert!(s.has_ready("example.org").await.unwrap());
    let again = take(s, "example.org", 10).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].1, 0);
    assert_eq!(*again[0].0, r);
    assert_eq!(s.counts().await.unwrap().in_flight, 1);
    assert_eq!(s.ready_domains().await.unwrap(), ["example.net"]);
}

async fn take_respects_the_maximum_and_keeps_order(f: Fixture) {
    let s = &*f.schedule;
    let numbers: Vec<u64> = (0..6).map(|n| n * 3).collect();
    insert(&f, &numbers, u64::MAX / 2).await;
    let first: Vec<_> = take(s, "example.org", 4)
        .await
        .iter()
        .map(|(r, _)| r.id.clone())
        .collect();
    assert_eq!(
        first,
        numbers[..4]
            .iter()
            .map(|&n| record(n).id)
            .collect::<Vec<_>>()
    );
    assert_eq!(take(s, "example.org", 4).await.len(), 2);
    assert!(take(s, "example.org", 4).await.is_empty());
}

async fn a_deferred_delivery_comes_back_after_its_interval(f: Fixture) {
    let s = &*f.schedule;
    let r = record(0);
    let t0 = r.received_ms;
    insert(&f, &[0], t0).await;
    take(s, "example.org", 1).await;
    let deferred = outcome(&[(0, RcptResult::Deferred)]);
    let c = complete(s, &r.id, "example.org", &deferred, t0)
        .await
        .unwrap();
    assert_eq!(c.attempt, 1);
    assert_eq!(c.next_attempt_ms, Some(t0 + SECOND));
    assert!(!c.message_done());
    assert_eq!(c.record.deliveries[0].state, DeliveryState::Deferred);
    assert_eq!(
        c.record.deliveries[0].last_error.as_deref(),
        Some("Deferred")
    );
    let stored = s.records(std::slice::from_ref(&r.id)).await.unwrap();
    assert_eq!(stored[0].as_deref(), Some(&*c.record));
    assert!(s.promote(t0 + SECOND - 1).await.unwrap().is_empty());
    assert!(take(s, "example.org", 1).await.is_empty());
    assert_eq!(s.promote(t0 + SECOND).await.unwrap(), ["example.org"]);
    let (again, _) = take(s, "example.org", 1).await.pop().unwrap();
    assert_eq!(again.deliveries[0].attempts, 1);
    let c = complete(s, &r.id, "example.org", &deferred, t0 + SECOND)
        .await
        .unwrap();
    assert_eq!(c.attempt, 2);
    assert_eq!(c.next_attempt_ms, Some(t0 + 3 * SECOND));
}

async fn a_retry_makes_deferred_work_due_now_and_leaves_the_rest(f: Fixture) {
    let s = &*f.schedule;
    let r = record(0);
    let t0 = r.received_ms;
    insert(&f, &[0], t0).await;
    // example.org deferred until t0 + 1 s; example.net in flight.
    take(s, "example.org", 1).await;
    take(s, "example.net", 1).await;
    let deferred = outcome(&[(0, RcptResult::Deferred)]);
    complete(s, &r.id, "example.org", &deferred, t0)
        .await
        .unwrap();
    assert!(s.promote(t0 + 10).await.unwrap().is_empty());

    assert_eq!(s.retry(&r.id, t0 + 10).await.unwrap(), Some(1));
    assert_eq!(s.promote(t0 + 10).await.unwrap(), ["example.org"]);
    let (again, _) = take(s, "example.org", 1).await.pop().unwrap();
    assert_eq!(again.id, r.id);
    // Nothing deferred is left: in flight both, a retry changes nothing.
    assert_eq!(s.retry(&r.id, t0 + 20).await.unwrap(), Some(0));
    assert_eq!(s.counts().await.unwrap().in_flight, 2);
    let unknown = record(7).id;
    assert_eq!(s.retry(&unknown, t0 + 20).await.unwrap(), None);
}

/// An operator's retry of a domain makes due the deferred work of the
/// messages named there and nowhere else; a take of one message's
/// delivery to a domain leaves its other domains waiting.
async fn a_domain_retry_and_take_touch_that_domain_only(f: Fixture) {
    let s = &*f.schedule;
    // The last one received: every message is due.
    let t0 = record(3).received_ms;
    // 0 and 3 go to example.org and example.net, 1 to example.net and
    // example.com: every delivery deferred.
    insert(&f, &[0, 1, 3], t0).await;
    for (domain, n) in [("example.org", 2), ("example.net", 3), ("example.com", 1)] {
        for (record, _) in take(s, domain, n).await {
            let index = record
                .deliveries
                .iter()
                .position(|d| d.domain == domain)
                .unwrap();
            let rcpt = record.deliveries[index].recipients[0];
            let deferred = outcome(&[(rcpt, RcptResult::Deferred)]);
            complete(s, &record.id, domain, &deferred, t0)
                .await
                .unwrap();
        }
    }
    assert_eq!(s.counts().await.unwrap().deferred, 6);
    let early = s.promote(t0 + 10).await.unwrap();
    assert!(early.is_empty(), "{early:?}");

    let named = [record(0).id, record(1).id, record(3).id, record(9).id];
    assert_eq!(s.retry_in("example.org", &named, t0 + 10).await.unwrap(), 2);
    assert_eq!(s.promote(t0 + 10).await.unwrap(), ["example.org"]);
    assert_eq!(s.retry_in("example.org", &named, t0 + 10).await.unwrap(), 0);
    let mut handed: Vec<MessageId> = take(s, "example.org", 10)
        .await
        .into_iter()
        .map(|(record, _)| record.id.clone())
        .collect();
    handed.sort();
    assert_eq!(handed, [record(0).id, record(3).id]);
    assert_eq!(s.counts().await.unwrap().deferred, 4);

    let taken = s
        .take_message(&record(1).id, Some("example.com"), "node-a", LEASE)
        .await
        .unwrap()
        .expect("queued");
    assert_eq!(taken.domains, ["example.com"]);
    assert_eq!(taken.in_flight, 0);
    assert_eq!(
        s.counts().await.unwrap().deferred,
        3,
        "example.net waits on"
    );
}

async fn taking_a_message_leaves_work_in_flight_to_its_holder(f: Fixture) {
    let s = &*f.schedule;
    let (r, other) = (record(0), record(3));
    let t0 = r.received_ms;
    insert(&f, &[0, 3], t0).await;
    // Message 0: example.org in flight, example.net deferred; message 3
    // (the same domains) stays as it is.
    take(s, "example.org", 1).await;
    take(s, "example.net", 2).await;
    let deferred = outcome(&[(1, RcptResult::Deferred)]);
    complete(s, &r.id, "example.net", &deferred, t0)
        .await
        .unwrap();
    s.release(&other.id, "example.net").await.unwrap();

    let taken = s
        .take_message(&r.id, None, "node-a", LEASE)
        .await
        .unwrap()
        .expect("queued");
    assert_eq!(taken.record.id, r.id);
    assert_eq!(taken.domains, ["example.net"]);
    assert_eq!(taken.in_flight, 1);
    // Taken: no longer handed out or promoted, and completed like an attempt.
    s.promote(t0 + 60 * SECOND).await.unwrap();
    let handed: Vec<MessageId> = take(s, "example.net", 10)
        .await
        .into_iter()
        .map(|(record, _)| record.id.clone())
        .collect();
    assert_eq!(handed, std::slice::from_ref(&other.id));
    let failed = outcome(&[(1, RcptResult::Failed)]);
    let c = complete(s, &r.id, "example.net", &failed, t0 + 1)
        .await
        .unwrap();
    assert_eq!(c.failed().count(), 1);
    assert_eq!(
        c.record.deliveries.len(),
        1,
        "example.org is left in flight"
    );
    assert_eq!(
        s.take_message(&r.id, None, "node-a", LEASE)
            .await
            .unwrap()
            .unwrap()
            .domains,
        Vec::<String>::new()
    );
    assert!(s
        .take_message(&record(9).id, None, "node-a", LEASE)
        .await
        .unwrap()
        .is_none());
}

async fn the_message_is_done_when_every_delivery_is(f: Fixture) {
    let s = &*f.schedule;
    let r = record(0);
    let t0 = r.received_ms;
    insert(&f, &[0], t0).await;
    take(s, "example.org", 1).await;
    take(s, "example.net", 1).await;
    let c = complete(
        s,
        &r.id,
        "example.org",
        &outcome(&[(0, RcptResult::Delivered)]),
        t0,
    )
    .await
    .unwrap();
    assert!(!c.message_done());
    assert_eq!(c.record.deliveries.len(), 1);
    let c = complete(
        s,
        &r.id,
        "example.net",
        &outcome(&[(1, RcptResult::Failed)]),
        t0,
    )
    .await
    .unwrap();
    assert!(c.message_done());
    assert_eq!(c.failed().map(|n| n.recipient).collect::<Vec<_>>(), [1]);
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.messages, 0);
    assert_eq!(counts.in_flight, 0);
    assert!(s.records(std::slice::from_ref(&r.id)).await.unwrap()[0].is_none());
}

async fn expiry_reaches_due_deferred_and_suspended_work_but_not_work_in_flight(f: Fixture) {
    let s = &*f.schedule;
    let (a, b) = (record(0), record(1));
    let t0 = a.received_ms;
    insert(&f, &[0, 1, 2], t0 + 10).await;
    // a: in flight to example.org; b: deferred; c: suspended domain.
    take(s, "example.org", 1).await;
    take(s, "example.net", 3).await;
    complete(
        s,
        &b.id,
        "example.net",
        &outcome(&[(0, RcptResult::Deferred)]),
        t0 + 10,
    )
    .await;
    s.suspend("example.com").await.unwrap();
    let expired = s
        .expire(t0 + 60 * SECOND + 10, &policy(), None)
        .await
        .unwrap();
    let keys: Vec<_> = expired
        .iter()
        .map(|c| (c.record.id.clone(), c.domain.clone()))
        .collect();
    assert!(
        !keys.contains(&(a.id.clone(), "example.org".to_string())),
        "in flight stays"
    );
    assert!(
        keys.contains(&(b.id.clone(), "example.net".to_string())),
        "deferred expires"
    );
    assert!(
        keys.iter().any(|(_, d)| d == "example.com"),
        "suspended expires"
    );
    assert!(expired
        .iter()
        .all(|c| c.notes.iter().all(|n| n.result == RcptResult::Failed)));
    let b_done = expired
        .iter()
        .find(|c| c.record.id == b.id && c.domain == "example.net")
        .unwrap();
    assert!(
        b_done.notes[0]
            .reply
            .contains("after 1 attempts; last error: Deferred"),
        "{}",
        b_done.notes[0].reply
    );
    // What expired is no longer queued anywhere.
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.deferred, 0, "{counts:?}");
    assert_eq!(counts.ready, 0, "{counts:?}");
    assert_eq!(counts.in_flight, 2, "{counts:?}");
}

async fn a_suspended_domain_keeps_its_work_until_resumed(f: Fixture) {
    let s = &*f.schedule;
    let r = record(0);
    s.suspend("example.org").await.unwrap();
    assert_eq!(insert(&f, &[0], r.received_ms).await, ["example.net"]);
    assert!(take(s, "example.org", 5).await.is_empty());
    assert!(!s.has_ready("example.org").await.unwrap());
    assert_eq!(s.ready_domains().await.unwrap(), ["example.net"]);
    // Listed as suspended, and a domain without mail too.
    s.suspend("idle.example").await.unwrap();
    let suspended = s.counts().await.unwrap().suspended;
    assert_eq!(
        suspended.into_iter().collect::<Vec<_>>(),
        ["example.org", "idle.example"]
    );
    assert_eq!(
        s.suspended().await.unwrap(),
        s.counts().await.unwrap().suspended
    );
    assert!(s.resume("example.org").await.unwrap());
    assert_eq!(take(s, "example.org", 5).await.len(), 1);
    s.resume("idle.example").await.unwrap();
    assert!(s.counts().await.unwrap().suspended.is_empty());
    assert!(s.suspended().await.unwrap().is_empty());
}

async fn counts_follow_the_deliveries(f: Fixture) {
    let s = &*f.schedule;
    let t0 = record(0).received_ms;
    insert(&f, &[0, 1, 2], t0 + 10).await;
    take(s, "example.org", 1).await;
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.messages, 3);
    assert_eq!(counts.ready, 5);
    assert_eq!(counts.in_flight, 1);
    assert_eq!(counts.deferred, 0);
    // A schedule shared through a store names who holds the work; one in
    // memory belongs to one process, which holds it all.
    let holders = counts
        .in_flight_by_holder
        .clone()
        .map(|by_holder| by_holder.into_iter().collect::<Vec<_>>());
    if f.spool.is_some() {
        assert_eq!(holders, Some(vec![("node-a".to_string(), 1)]));
    } else {
        assert_eq!(holders, None);
    }
    assert_eq!(
        counts.deliveries_by_domain.into_iter().collect::<Vec<_>>(),
        [
            ("example.com".to_string(), 2),
            ("example.net".to_string(), 2),
            ("example.org".to_string(), 2)
        ]
    );
    // Ids start with the receive time: message 0 is the oldest in
    // example.org and example.net, 1 in example.com.
    let received = |n: u64| record(n).id.received_ms().expect("an id with a time");
    assert_eq!(
        counts.oldest_by_domain.into_iter().collect::<Vec<_>>(),
        [
            ("example.com".to_string(), received(1)),
            ("example.net".to_string(), received(0)),
            ("example.org".to_string(), received(0))
        ]
    );
    assert_eq!(s.reclaim_expired_leases().await.unwrap(), 0, "none ran out");
}

/// For a schedule shared by nodes (`a` and `b` on one store, `spool`
/// holding the records): the leases of a holder found dead go back at
/// once, and only those.
pub async fn dead_holders_are_reclaimed(
    spool: Arc<dyn Spool>,
    a: Arc<dyn Schedule>,
    b: Arc<dyn Schedule>,
) {
    let batch: Vec<_> = (0..30).map(|n| message(n, 100)).collect();
    let records = batch.iter().map(|m| m.record.clone()).collect();
    spool.store(batch).await.unwrap();
    a.insert(records, u64::MAX / 2).await.unwrap(); // 20 to example.org
    let long = Duration::from_secs(600);
    assert_eq!(
        a.take("example.org", 5, "node-a", long)
            .await
            .unwrap()
            .len(),
        5
    );
    assert_eq!(
        b.take("example.org", 3, "node-b", long)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(b.reclaim_holders(&[]).await.unwrap(), 0);
    assert_eq!(b.reclaim_holders(&["node-c".into()]).await.unwrap(), 0);
    assert_eq!(b.reclaim_holders(&["node-a".into()]).await.unwrap(), 5);
    assert_eq!(
        b.counts().await.unwrap().in_flight,
        3,
        "node-b keeps its own"
    );
    let again = b.take("example.org", 20, "node-b", long).await.unwrap();
    assert_eq!(again.len(), 12 + 5, "the dead node's five are due again");
}

/// For a schedule shared by nodes: two expiry sweeps at once (two
/// coordinators) fail and report every old delivery exactly once, in every
/// state (ready, deferred, suspended).
pub async fn two_sweeps_at_once_report_each_delivery_once(
    spool: Arc<dyn Spool>,
    a: Arc<dyn Schedule>,
    b: Arc<dyn Schedule>,
) {
    use std::sync::Mutex;

    use smarthost_proto::envelope::MessageId;

    // 60 messages, 120 deliveries over three domains; one suspended, some
    // deferred, the rest ready.
    let batch: Vec<_> = (0..60).map(|n| message(n, 100)).collect();
    let records = batch.iter().map(|m| m.record.clone()).collect();
    spool.store(batch).await.unwrap();
    a.insert(records, u64::MAX / 2).await.unwrap();
    a.suspend("example.com").await.unwrap();
    let taken = a
        .take("example.org", 10, "node-a", Duration::from_secs(600))
        .await
        .unwrap();
    for (record, _) in &taken {
        let deferred = outcome(&[(0, RcptResult::Deferred), (1, RcptResult::Deferred)]);
        complete(
            &*a,
            &record.id,
            "example.org",
            &deferred,
            record.received_ms,
        )
        .await;
    }
    let reports = Arc::new(Mutex::new(Vec::<(MessageId, String)>::new()));
    let late = u64::MAX / 2;
    let sweep = |s: Arc<dyn Schedule>| {
        let hook = Recorder::new(reports.clone()).hook();
        tokio::spawn(async move { s.expire(late, &policy(), Some(&hook)).await.unwrap() })
    };
    let (one, two) = (sweep(a.clone()), sweep(b.clone()));
    let (one, two) = (one.await.unwrap(), two.await.unwrap());
    let reported = reports.lock().unwrap().clone();
    let unique: std::collections::HashSet<_> = reported.iter().cloned().collect();
    assert_eq!(unique.len(), reported.len(), "a delivery reported twice");
    assert_eq!(reported.len(), 120);
    assert_eq!(one.len() + two.len(), 120);
    assert!(
        spool.list().await.unwrap().is_empty(),
        "every message expired"
    );
    let counts = a.counts().await.unwrap();
    assert_eq!(
        (counts.ready, counts.deferred, counts.in_flight),
        (0, 0, 0),
        "{counts:?}"
    );
}

/// A reporter for tests: one report per completion, its body naming the
/// message and domain; records what it queues.
pub struct Recorder {
    pub queued: Arc<std::sync::Mutex<Vec<(MessageId, String)>>>,
    /// Waited in each build.
    pub slow: Duration,
    /// Called once, at the first build.
    pub first: Box<dyn Fn() + Send + Sync>,
    once: std::sync::Once,
    /// How many calls of `queue` fail before they succeed.
    pub failures: std::sync::atomic::AtomicUsize,
}

impl Recorder {
    pub fn new(queued: Arc<std::sync::Mutex<Vec<(MessageId, String)>>>) -> Recorder {
        Recorder {
            queued,
            slow: Duration::ZERO,
            first: Box::new(|| {}),
            once: std::sync::Once::new(),
            failures: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn hook(self) -> super::ReportHook {
        Arc::new(self)
    }
}

#[async_trait::async_trait]
impl super::Reporter for Recorder {
    fn needs(&self, completion: &Completion) -> bool {
        crate::bounce::needs_report(completion, &crate::bounce::ReportSettings::default())
    }

    async fn build(
        &self,
        completions: &[Completion],
    ) -> Result<Vec<crate::spool::NewMessage>, crate::spool::SpoolError> {
        self.once.call_once(|| (self.first)());
        tokio::time::sleep(self.slow).await;
        Ok(completions
            .iter()
            .map(|c| {
                let mut report = message(0, 0);
                report.record.id = MessageId::new(0, rand::random());
                report.body = format!("{} {}", c.record.id, c.domain).into_bytes().into();
                report
            })
            .collect())
    }

    async fn queue(
        &self,
        reports: Vec<crate::spool::NewMessage>,
    ) -> Result<(), crate::spool::SpoolError> {
        use std::sync::atomic::Ordering;

        let failing = self
            .failures
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(crate::spool::SpoolError::Unavailable(
                "the queue refuses reports".into(),
            ));
        }
        let mut queued = self.queued.lock().unwrap();
        for report in reports {
            let body = String::from_utf8(report.body.into_head()).unwrap();
            let (id, domain) = body.split_once(' ').unwrap();
            queued.push((MessageId(id.to_string()), domain.to_string()));
        }
        Ok(())
    }
}

/// Takes every delivery of messages `0..60` (queued, due), each under
/// the domain it was taken from: 120, two a message.
pub async fn take_all_of_sixty(s: &dyn Schedule) -> Vec<(Arc<MessageRecord>, &'static str)> {
    let mut taken = Vec::new();
    for domain in ["example.org", "example.net", "example.com"] {
        for (record, _) in take(s, domain, 100).await {
            taken.push((record, domain));
        }
    }
    assert_eq!(taken.len(), 120);
    taken
}

/// Completes every delivery of `taken` at once: each message's second
/// recipient is deferred when the message's number is a multiple of five,
/// every other delivery is delivered. Answers whether each was recorded.
pub async fn complete_all_at_once(
    s: &Arc<dyn Schedule>,
    taken: &[(Arc<MessageRecord>, &'static str)],
) -> Vec<bool> {
    let t0 = taken[0].0.received_ms;
    let completions = taken.iter().map(|(record, domain)| {
        let recipient = record
            .envelope
            .recipients
            .iter()
            .position(|r| r.address.domain == *domain)
            .expect("a recipient in the domain it was taken from") as u32;
        let result = match recipient == 1 && record.received_ms % 5 == 0 {
            true => RcptResult::Deferred,
            false => RcptResult::Delivered,
        };
        let (s, id) = (s.clone(), record.id.clone());
        async move {
            complete(&*s, &id, domain, &outcome(&[(recipient, result)]), t0)
                .await
                .is_some()
        }
    });
    futures_util::future::join_all(completions).await
}

/// After [`complete_all_at_once`]: the deferred deliveries are all that
/// is left, each the only delivery of its record and in its sender's
/// listing; the other messages are gone and nothing is in flight.
/// Answers the ids kept, sorted.
pub async fn only_the_retries_are_left(
    s: &dyn Schedule,
    taken: &[(Arc<MessageRecord>, &'static str)],
) -> Vec<MessageId> {
    let counts = s.counts().await.expect("counts");
    assert_eq!((counts.in_flight, counts.ready), (0, 0));
    let mut kept: Vec<MessageId> = taken
        .iter()
        .filter(|(r, d)| r.received_ms % 5 == 0 && r.envelope.recipients[1].address.domain == *d)
        .map(|(r, _)| r.id.clone())
        .collect();
    kept.sort();
    assert_eq!(kept.len(), 12);
    assert_eq!(counts.deferred, 12);
    let ids: Vec<_> = taken.iter().map(|(r, _)| r.id.clone()).collect();
    let records = s.records(&ids).await.expect("records");
    for (id, record) in ids.iter().zip(records) {
        match record {
            Some(record) => {
                assert!(kept.contains(id), "{id} should be done");
                assert_eq!(record.deliveries.len(), 1, "{id}: the retry alone is left");
            }
            None => assert!(!kept.contains(id), "{id} kept its retry"),
        }
    }
    let sender = taken[0].0.envelope.sender_key();
    let listed = s
        .sender_messages(&sender, None, 1000)
        .await
        .expect("listing");
    assert_eq!(listed, kept, "the sender's listing holds the retries only");
    kept
}
