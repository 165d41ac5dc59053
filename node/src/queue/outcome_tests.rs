//! How outcomes reach the spool: two completions of one message, reports
//! written with the record they are about, announcements of many domains.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use smarthost_proto::envelope::split_deliveries;

use super::*;
use crate::delivery::RcptResult;
use crate::scheduler::SchedulerCounts;
use crate::spool::suite::{id, message};
use crate::spool::Body;
use crate::spool::{LocalSpool, LocalSpoolOptions};

/// A local spool that can be made to fail: `fail_new` fails every call
/// that stores new messages, `fail_writes` every record write; and to be
/// slow: `slow_bodies` makes every body read take a second.
struct FlakySpool {
    inner: LocalSpool,
    fail_new: AtomicBool,
    fail_writes: AtomicBool,
    slow_bodies: AtomicBool,
}

impl FlakySpool {
    fn new(dir: &std::path::Path) -> Arc<FlakySpool> {
        Arc::new(FlakySpool {
            inner: LocalSpool::open(dir, LocalSpoolOptions::default()).unwrap(),
            fail_new: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            slow_bodies: AtomicBool::new(false),
        })
    }

    fn check(&self, new: bool, writes: bool) -> Result<(), SpoolError> {
        if (new && self.fail_new.load(Ordering::SeqCst))
            || (writes && self.fail_writes.load(Ordering::SeqCst))
        {
            return Err(SpoolError::Unavailable("disk full".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Spool for FlakySpool {
    async fn store(&self, batch: Vec<NewMessage>) -> Result<(), SpoolError> {
        self.check(true, false)?;
        self.inner.store(batch).await
    }
    async fn update(&self, record: MessageRecord) -> Result<(), SpoolError> {
        self.check(false, true)?;
        self.inner.update(record).await
    }
    async fn remove(&self, id: &MessageId) -> Result<(), SpoolError> {
        self.check(false, true)?;
        self.inner.remove(id).await
    }
    async fn list(&self) -> Result<Vec<MessageRecord>, SpoolError> {
        self.inner.list().await
    }
    async fn read_body(&self, id: &MessageId) -> Result<Body, SpoolError> {
        if self.slow_bodies.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        self.inner.read_body(id).await
    }
    async fn apply(&self, changes: Vec<Change>) -> Vec<(MessageId, SpoolError)> {
        if let Err(error) = self.check(false, true) {
            return changes
                .iter()
                .map(|c| (c.id().clone(), error.clone()))
                .collect();
        }
        self.inner.apply(changes).await
    }
    async fn store_and_apply(
        &self,
        batch: Vec<NewMessage>,
        changes: Vec<Change>,
    ) -> Result<Vec<(MessageId, SpoolError)>, SpoolError> {
        self.check(!batch.is_empty(), true)?;
        self.inner.store_and_apply(batch, changes).await
    }
}

/// The in-memory schedule, with `records` (what the record writer reads)
/// held back for a while on every call, and `insert` failing while
/// `fail_inserts` is set.
#[derive(Default)]
struct SlowRecords {
    inner: MemorySchedule,
    delay: Duration,
    fail_inserts: AtomicBool,
}

#[async_trait]
impl Schedule for SlowRecords {
    async fn insert(
        &self,
        records: Vec<MessageRecord>,
        now: u64,
    ) -> Result<Vec<String>, SpoolError> {
        if self.fail_inserts.load(Ordering::SeqCst) {
            return Err(SpoolError::Unavailable("insert: timed out".into()));
        }
        self.inner.insert(records, now).await
    }
    async fn promote(&self, now: u64) -> Result<Vec<String>, SpoolError> {
        self.inner.promote(now).await
    }
    async fn take(
        &self,
        domain: &str,
        max: usize,
        holder: &str,
        lease: Duration,
    ) -> Result<Vec<crate::schedule::Job>, SpoolError> {
        self.inner.take(domain, max, holder, lease).await
    }
    async fn release(&self, id: &MessageId, domain: &str) -> Result<(), SpoolError> {
        self.inner.release(id, domain).await
    }
    async fn complete(
        &self,
        id: &MessageId,
        domain: &str,
        outcome: &MessageOutcome,
        now: u64,
        policy: &RetryPolicy,
        jitter: f64,
        report: Option<&ReportHook>,
    ) -> Result<Option<Completion>, SpoolError> {
        self.inner
            .complete(id, domain, outcome, now, policy, jitter, report)
            .await
    }
    async fn expire(
        &self,
        now: u64,
        policy: &RetryPolicy,
        report: Option<&ReportHook>,
    ) -> Result<Vec<Completion>, SpoolError> {
        self.inner.expire(now, policy, report).await
    }
    async fn send_pending_reports(&self, reporter: &ReportHook) -> Result<usize, SpoolError> {
        self.inner.send_pending_reports(reporter).await
    }
    async fn ready_domains(&self) -> Result<Vec<String>, SpoolError> {
        self.inner.ready_domains().await
    }
    async fn has_ready(&self, domain: &str) -> Result<bool, SpoolError> {
        self.inner.has_ready(domain).await
    }
    async fn suspend(&self, domain: &str) -> Result<(), SpoolError> {
        self.inner.suspend(domain).await
    }
    async fn resume(&self, domain: &str) -> Result<bool, SpoolError> {
        self.inner.resume(domain).await
    }
    async fn counts(&self) -> Result<SchedulerCounts, SpoolError> {
        self.inner.counts().await
    }
    async fn suspended(&self) -> Result<std::collections::BTreeSet<String>, SpoolError> {
        self.inner.suspended().await
    }
    async fn take_message(
        &self,
        id: &smarthost_proto::envelope::MessageId,
        only: Option<&str>,
        holder: &str,
        lease: std::time::Duration,
    ) -> Result<Option<crate::scheduler::TakenMessage>, SpoolError> {
        self.inner.take_message(id, only, holder, lease).await
    }
    async fn retry_in(
        &self,
        domain: &str,
        ids: &[MessageId],
        now_ms: u64,
    ) -> Result<usize, SpoolError> {
        self.inner.retry_in(domain, ids, now_ms).await
    }
    async fn retry(
        &self,
        id: &smarthost_proto::envelope::MessageId,
        now_ms: u64,
    ) -> Result<Option<usize>, SpoolError> {
        self.inner.retry(id, now_ms).await
    }
    async fn domain_messages(
        &self,
        domain: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError> {
        self.inner.domain_messages(domain, after, limit).await
    }
    async fn sender_messages(
        &self,
        sender: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError> {
        self.inner.sender_messages(sender, after, limit).await
    }
    async fn records(
        &self,
        ids: &[MessageId],
    ) -> Result<Vec<Option<Arc<MessageRecord>>>, SpoolError> {
        tokio::time::sleep(self.delay).await;
        self.inner.records(ids).await
    }
    async fn reclaim_expired_leases(&self) -> Result<usize, SpoolError> {
        self.inner.reclaim_expired_leases().await
    }
}

/// Settings under which the test messages (received in 2023) are not yet
/// past their lifetime.
fn long_lived() -> DeliverySettings {
    let mut settings = DeliverySettings::default();
    settings.retry.max_lifetime = Duration::from_secs(100 * 365 * 86400);
    settings
}

/// Takes the delivery of `domain` of message `n` and reports `result`
/// for all its recipients; answers when the queue answers.
async fn take_and_report(queue: &Addr<Queue>, n: u64, domain: &str, result: RcptResult) {
    let jobs = queue
        .send(Take {
            domain: domain.to_string(),
            max: 100,
        })
        .await
        .unwrap();
    let (record, delivery) = jobs
        .into_iter()
        .find(|(r, _)| r.id == id(n))
        .unwrap_or_else(|| panic!("message {n} is not due at {domain}"));
    let outcome =
        MessageOutcome::all_of(&record, delivery, result, "550 5.1.1 test", Duration::ZERO);
    queue
        .send(Report {
            id: record.id.clone(),
            domain: domain.to_string(),
            outcome,
        })
        .await
        .unwrap();
}

/// Starts `queue` with settings under which nothing expires and queues
/// message 0; returns the queue and that message's domains.
async fn start_with_message(queue: Queue) -> (Addr<Queue>, Vec<String>) {
    let queue = queue.with_settings(long_lived()).start();
    queue.send(Enqueue(message(0, 100))).await.unwrap().unwrap();
    (queue, domains_of(0))
}

/// [`take_and_report`] for message 0, in the background.
fn report_in_background(
    queue: &Addr<Queue>,
    domain: &str,
    result: RcptResult,
) -> tokio::task::JoinHandle<()> {
    let (queue, domain) = (queue.clone(), domain.to_string());
    actix::spawn(async move { take_and_report(&queue, 0, &domain, result).await })
}

fn domains_of(n: u64) -> Vec<String> {
    message(n, 10)
        .record
        .deliveries
        .iter()
        .map(|d| d.domain.clone())
        .collect()
}

/// Waits (at most `limit`) until `done` holds for the spool's listing.
async fn until_listed(spool: &dyn Spool, limit: Duration, done: impl Fn(&[MessageRecord]) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let listed = spool.list().await.unwrap();
        if done(&listed) {
            return;
        }
        assert!(Instant::now() < deadline, "never came true: {listed:#?}");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
}

fn is_report(record: &MessageRecord) -> bool {
    record.envelope.sender.is_none()
}

#[actix::test]
async fn two_completions_of_one_message_in_one_write_are_both_answered() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FlakySpool::new(dir.path());
    // The writer reads the records late: by then both domains of the
    // message completed, so two writes in a row remove it.
    let schedule = Arc::new(SlowRecords {
        delay: Duration::from_millis(300),
        ..SlowRecords::default()
    });
    let queue = Queue::new(spool.clone()).with_schedule(schedule, "local", DEFAULT_LEASE);
    let (queue, domains) = start_with_message(queue).await;
    assert_eq!(domains.len(), 2);

    let first = take_and_report(&queue, 0, &domains[0], RcptResult::Delivered);
    let second = take_and_report(&queue, 0, &domains[1], RcptResult::Delivered);
    let both = async { futures_util::join!(first, second) };
    tokio::time::timeout(Duration::from_secs(10), both)
        .await
        .expect("both reports are answered");
    assert!(
        spool.list().await.unwrap().is_empty(),
        "the message is gone"
    );
    let stats = queue.send(Stats).await.unwrap();
    assert_eq!((stats.messages, stats.in_flight), (0, 0));
}

#[actix::test]
async fn a_report_that_cannot_be_stored_keeps_the_outcome_open_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FlakySpool::new(dir.path());
    let (queue, domains) = start_with_message(Queue::new(spool.clone())).await;
    // The other domain is done: the failure finishes the message.
    take_and_report(&queue, 0, &domains[1], RcptResult::Delivered).await;

    // New messages cannot be stored for a while: the report must wait,
    // and so must the record that says the delivery is over.
    spool.fail_new.store(true, Ordering::SeqCst);
    let failing = report_in_background(&queue, &domains[0], RcptResult::Failed);
    actix::clock::sleep(Duration::from_millis(1500)).await;
    let listed = spool.list().await.unwrap();
    assert!(
        listed.iter().any(|r| r.id == id(0) && !r.deliveries.is_empty()),
        "the failed delivery stays open in the spool while its report cannot be stored: {listed:#?}"
    );
    let recovered = now_ms();
    spool.fail_new.store(false, Ordering::SeqCst);

    until_listed(&*spool, Duration::from_secs(10), |listed| {
        listed.len() == 1 && is_report(&listed[0])
    })
    .await;
    // Received when it was stored, not when it was built: a Redis Cluster
    // spool refuses a message received longer ago than its store window,
    // so an old stamp would be refused after every longer outage.
    let report = &spool.list().await.unwrap()[0];
    assert!(
        report.received_ms >= recovered,
        "the report was stored with its receive time of {} ms before the store",
        recovered - report.received_ms
    );
    tokio::time::timeout(Duration::from_secs(10), failing)
        .await
        .expect("the report is answered")
        .unwrap();
}

#[actix::test]
async fn a_report_and_the_record_it_is_about_are_written_together() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FlakySpool::new(dir.path());
    let (queue, domains) = start_with_message(Queue::new(spool.clone())).await;

    // Record writes fail: what is on disk is what a crash now would leave.
    spool.fail_writes.store(true, Ordering::SeqCst);
    report_in_background(&queue, &domains[0], RcptResult::Failed);
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let listed = spool.list().await.unwrap();
        let reported = listed.iter().any(is_report);
        let still_open = listed
            .iter()
            .any(|r| r.id == id(0) && r.deliveries.iter().any(|d| d.domain == domains[0]));
        assert!(
            !(reported && still_open),
            "a report is queued while the record still holds the delivery it reports \
             (a restart would report it again): {listed:#?}"
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    spool.fail_writes.store(false, Ordering::SeqCst);
    until_listed(&*spool, Duration::from_secs(10), |listed| {
        listed.iter().filter(|r| is_report(r)).count() == 1
            && listed
                .iter()
                .any(|r| r.id == id(0) && r.deliveries.iter().all(|d| d.domain != domains[0]))
    })
    .await;
}

#[actix::test]
async fn a_record_is_never_written_ahead_of_the_report_it_calls_for() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FlakySpool::new(dir.path());
    // No delay notices: a deferral calls for no report.
    let mut settings = long_lived();
    settings.retry.delay_notification = settings.retry.max_lifetime;
    let queue = Queue::new(spool.clone()).with_settings(settings).start();
    for n in 0..2 {
        queue.send(Enqueue(message(n, 100))).await.unwrap().unwrap();
    }
    let domains = domains_of(0);
    let other = domains_of(1)
        .into_iter()
        .find(|d| !domains.contains(d))
        .expect("message 1 has a domain of its own");

    // The report of a failure at the first domain takes a while to build.
    spool.slow_bodies.store(true, Ordering::SeqCst);
    let failing = report_in_background(&queue, &domains[0], RcptResult::Failed);
    actix::clock::sleep(Duration::from_millis(200)).await;
    // Meanwhile the message's other domain and another message complete,
    // and their records are written.
    let deferred = report_in_background(&queue, &domains[1], RcptResult::Deferred);
    let elsewhere = {
        let queue = queue.clone();
        actix::spawn(async move { take_and_report(&queue, 1, &other, RcptResult::Deferred).await })
    };
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        let listed = spool.list().await.unwrap();
        let reported = listed.iter().any(is_report);
        let closed = listed
            .iter()
            .any(|r| r.id == id(0) && r.deliveries.iter().all(|d| d.domain != domains[0]));
        assert!(
            reported || !closed,
            "the failed delivery is gone from the spool while its report is not \
             stored (a crash now would never report it): {listed:#?}"
        );
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    let all = async { futures_util::join!(failing, deferred, elsewhere) };
    let (failing, deferred, elsewhere) = tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("every report is answered");
    failing.unwrap();
    deferred.unwrap();
    elsewhere.unwrap();
    let listed = spool.list().await.unwrap();
    assert_eq!(
        listed.iter().filter(|r| is_report(r)).count(),
        1,
        "{listed:#?}"
    );
}

/// Records the domains the queue announces.
struct Recorder(Arc<Mutex<HashSet<String>>>);

impl Actor for Recorder {
    type Context = Context<Self>;
}

impl Handler<DomainReady> for Recorder {
    type Result = ();

    fn handle(&mut self, DomainReady(domain): DomainReady, _: &mut Context<Self>) {
        self.0.lock().unwrap().insert(domain);
    }
}

#[actix::test]
async fn every_domain_with_due_work_is_announced_however_many() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FlakySpool::new(dir.path());
    let queue = Queue::new(spool.clone())
        .with_settings(long_lived())
        .start();
    let heard = Arc::new(Mutex::new(HashSet::new()));
    // Its mailbox holds the default 16.
    let recorder = Recorder(heard.clone()).start();
    queue.send(Attach(recorder.recipient())).await.unwrap();

    // 300 messages, each to a domain of its own, in one store batch.
    let domains: Vec<String> = (0..300).map(|n| format!("d{n}.example")).collect();
    let enqueues: Vec<_> = domains
        .iter()
        .enumerate()
        .map(|(n, domain)| {
            let mut new = message(n as u64, 100);
            for rcpt in &mut new.record.envelope.recipients {
                rcpt.address.domain = domain.clone();
            }
            new.record.deliveries = split_deliveries(&new.record.envelope, new.record.received_ms);
            queue.send(Enqueue(new))
        })
        .collect();
    for enqueue in futures_util::future::join_all(enqueues).await {
        enqueue.unwrap().unwrap();
    }
    // Nobody takes the work; a few ticks pass.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let missing = domains
            .iter()
            .filter(|d| !heard.lock().unwrap().contains(*d))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} of {} domains with due work were never announced",
            domains.len()
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
}

/// A message stored but not scheduled (the insert failed after the store)
/// is inserted again on the next ticks: it does not wait for a rescan.
#[actix::test]
async fn a_message_whose_insert_failed_is_scheduled_on_the_next_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let spool = FlakySpool::new(dir.path());
    let schedule = Arc::new(SlowRecords::default());
    schedule.fail_inserts.store(true, Ordering::SeqCst);
    let queue = Queue::new(spool.clone()).with_schedule(schedule.clone(), "local", DEFAULT_LEASE);
    let (queue, domains) = start_with_message(queue).await;
    assert_eq!(spool.list().await.unwrap().len(), 1, "stored");
    let counts = queue.send(Stats).await.unwrap();
    assert_eq!(counts.messages, 0, "not scheduled: {counts:?}");

    schedule.fail_inserts.store(false, Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while queue.send(Stats).await.unwrap().messages == 0 {
        assert!(std::time::Instant::now() < deadline, "never scheduled");
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
    take_and_report(&queue, 0, &domains[0], RcptResult::Delivered).await;
}
