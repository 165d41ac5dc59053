//! The `Queue` actor: takes accepted messages into the spool and answers
//! each sender once its message is durable.
//!
//! Group commit: at most one `Spool::store` call is in flight. Enqueues that
//! arrive meanwhile wait in a [`Batcher`]; when the call returns they all go
//! into the next single call, so many concurrent SMTP sessions share one
//! fsync. The batching and the counts live in plain structs; the actor only
//! moves messages between them and the spool.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use actix::prelude::*;
use smarthost_proto::envelope::{MessageId, MessageRecord};
use tokio::sync::oneshot;

use crate::spool::{NewMessage, Spool, SpoolError};

/// Stores a new message; answers once it is durable.
#[derive(Message)]
#[rtype(result = "Result<(), SpoolError>")]
pub struct Enqueue(pub NewMessage);

/// Reads what the spool holds (at startup): every record, oldest first.
#[derive(Message)]
#[rtype(result = "Result<Vec<MessageRecord>, SpoolError>")]
pub struct Recover;

/// Current counts of the queue.
#[derive(Message)]
#[rtype(result = "QueueStats")]
pub struct Stats;

/// What [`Stats`] answers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages known to be in the spool.
    pub messages: usize,
    /// Deliveries (message × destination domain) left, by domain.
    pub deliveries_by_domain: BTreeMap<String, usize>,
    /// Enqueues waiting for a store call.
    pub waiting: usize,
    /// Store calls made so far.
    pub store_calls: u64,
}

/// The most one store call takes.
#[derive(Clone, Copy, Debug)]
pub struct BatchLimits {
    pub max_messages: usize,
    /// Body bytes; a single larger message still goes alone.
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_messages: 512,
            max_bytes: 32 * 1024 * 1024,
        }
    }
}

/// Messages waiting for a store call, each with whoever waits for it, and
/// whether a call is in flight.
#[derive(Debug)]
pub struct Batcher<W> {
    pending: VecDeque<(NewMessage, W)>,
    in_flight: bool,
    limits: BatchLimits,
}

impl<W> Batcher<W> {
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            pending: VecDeque::new(),
            in_flight: false,
            limits,
        }
    }

    pub fn push(&mut self, message: NewMessage, waiter: W) {
        self.pending.push_back((message, waiter));
    }

    /// The next batch to store, oldest first, if no call is in flight;
    /// the batch is then in flight until [`Batcher::finished`].
    pub fn next_batch(&mut self) -> Option<Vec<(NewMessage, W)>> {
        if self.in_flight || self.pending.is_empty() {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((message, _)) = self.pending.front() {
            let size = message.body.len();
            if !batch.is_empty()
                && (batch.len() == self.limits.max_messages || bytes + size > self.limits.max_bytes)
            {
                break;
            }
            bytes += size;
            batch.push(self.pending.pop_front().expect("front exists"));
        }
        self.in_flight = true;
        Some(batch)
    }

    /// The call in flight has answered.
    pub fn finished(&mut self) {
        self.in_flight = false;
    }

    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

/// Messages in the spool and their deliveries by domain.
#[derive(Debug, Default)]
struct Tally {
    domains_of: HashMap<MessageId, Vec<String>>,
    by_domain: BTreeMap<String, usize>,
}

impl Tally {
    /// Counts a stored message once, however often it is reported.
    fn add(&mut self, record: &MessageRecord) {
        if self.domains_of.contains_key(&record.id) {
            return;
        }
        let domains: Vec<String> = record.deliveries.iter().map(|d| d.domain.clone()).collect();
        for domain in &domains {
            *self.by_domain.entry(domain.clone()).or_default() += 1;
        }
        self.domains_of.insert(record.id.clone(), domains);
    }
}

/// The answer for one waiter of a batch.
fn copy_result(result: &Result<(), SpoolError>) -> Result<(), SpoolError> {
    match result {
        Ok(()) => Ok(()),
        Err(SpoolError::Unavailable(why)) => Err(SpoolError::Unavailable(why.clone())),
        Err(SpoolError::NotFound(id)) => Err(SpoolError::NotFound(id.clone())),
        Err(SpoolError::Corrupt(why)) => Err(SpoolError::Corrupt(why.clone())),
    }
}

type Waiter = oneshot::Sender<Result<(), SpoolError>>;

/// Senders block on a full mailbox (`send().await`) instead of piling up.
const MAILBOX_CAPACITY: usize = 1024;

pub struct Queue {
    spool: Arc<dyn Spool>,
    batcher: Batcher<Waiter>,
    tally: Tally,
    store_calls: u64,
}

impl Queue {
    pub fn new(spool: Arc<dyn Spool>) -> Self {
        Queue::with_limits(spool, BatchLimits::default())
    }

    pub fn with_limits(spool: Arc<dyn Spool>, limits: BatchLimits) -> Self {
        Queue {
            spool,
            batcher: Batcher::new(limits),
            tally: Tally::default(),
            store_calls: 0,
        }
    }

    /// Starts the next store call if none is in flight; when it returns,
    /// answers its waiters and starts the one after.
    fn store_next(&mut self, ctx: &mut Context<Self>) {
        let Some(batch) = self.batcher.next_batch() else {
            return;
        };
        let (messages, waiters): (Vec<NewMessage>, Vec<Waiter>) = batch.into_iter().unzip();
        let records: Vec<MessageRecord> = messages.iter().map(|m| m.record.clone()).collect();
        let spool = self.spool.clone();
        self.store_calls += 1;
        let store = async move { spool.store(messages).await };
        ctx.spawn(store.into_actor(self).map(move |result, queue, ctx| {
            queue.batcher.finished();
            match &result {
                Ok(()) => records.iter().for_each(|r| queue.tally.add(r)),
                Err(err) => {
                    tracing::warn!(error = %err, messages = records.len(), "storing a batch failed")
                }
            }
            for waiter in waiters {
                // A waiter that went away (client disconnected) is fine.
                let _ = waiter.send(copy_result(&result));
            }
            queue.store_next(ctx);
        }));
    }
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

/// Adds the message to the next batch; the answer comes when that batch
/// is durable (or failed).
impl Handler<Enqueue> for Queue {
    type Result = ResponseFuture<Result<(), SpoolError>>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.batcher.push(msg.0, tx);
        self.store_next(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(SpoolError::Unavailable(
                    "the queue stopped before the message was stored".into(),
                ))
            })
        })
    }
}

/// Lists the spool and counts what it holds.
impl Handler<Recover> for Queue {
    type Result = ResponseActFuture<Self, Result<Vec<MessageRecord>, SpoolError>>;

    fn handle(&mut self, _: Recover, _: &mut Context<Self>) -> Self::Result {
        let spool = self.spool.clone();
        Box::pin(
            async move { spool.list().await }
                .into_actor(self)
                .map(|result, queue, _| {
                    if let Ok(records) = &result {
                        records.iter().for_each(|r| queue.tally.add(r));
                    }
                    result
                }),
        )
    }
}

/// Answers the current counts.
impl Handler<Stats> for Queue {
    type Result = MessageResult<Stats>;

    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(QueueStats {
            messages: self.tally.domains_of.len(),
            deliveries_by_domain: self.tally.by_domain.clone(),
            waiting: self.batcher.waiting(),
            store_calls: self.store_calls,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::spool::suite::{id, message};
    use crate::spool::{LocalSpool, LocalSpoolOptions};

    fn waiters(batch: &[(NewMessage, u64)]) -> Vec<u64> {
        batch.iter().map(|(_, w)| *w).collect()
    }

    #[test]
    fn one_batch_in_flight_and_the_rest_wait_for_the_next() {
        let mut batcher = Batcher::new(BatchLimits::default());
        assert!(batcher.next_batch().is_none());
        batcher.push(message(0, 10), 0);
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![0]);
        for n in 1..5 {
            batcher.push(message(n, 10), n);
        }
        assert!(batcher.next_batch().is_none(), "a call is in flight");
        assert_eq!(batcher.waiting(), 4);
        batcher.finished();
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![1, 2, 3, 4]);
        batcher.finished();
        assert!(batcher.next_batch().is_none());
    }

    #[test]
    fn batches_are_capped_by_count_and_bytes() {
        let limits = BatchLimits {
            max_messages: 3,
            max_bytes: 2500,
        };
        let mut batcher = Batcher::new(limits);
        for n in 0..5 {
            batcher.push(message(n, 100), n);
        }
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![0, 1, 2]);
        batcher.finished();
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![3, 4]);
        batcher.finished();

        // By bytes; a message over the limit goes alone.
        batcher.push(message(10, 1000), 10);
        batcher.push(message(11, 1000), 11);
        batcher.push(message(12, 1000), 12);
        batcher.push(message(13, 9000), 13);
        batcher.push(message(14, 10), 14);
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![10, 11]);
        batcher.finished();
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![12]);
        batcher.finished();
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![13]);
        batcher.finished();
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![14]);
    }

    #[test]
    fn the_tally_counts_each_message_once() {
        let mut tally = Tally::default();
        let a = message(0, 10).record; // example.org, example.net
        let b = message(1, 10).record; // example.net, example.com
        tally.add(&a);
        tally.add(&b);
        tally.add(&a);
        assert_eq!(tally.domains_of.len(), 2);
        let counts: Vec<_> = tally
            .by_domain
            .iter()
            .map(|(d, n)| (d.as_str(), *n))
            .collect();
        assert_eq!(
            counts,
            vec![("example.com", 1), ("example.net", 2), ("example.org", 1)]
        );
    }

    /// A local spool that counts store calls and can be made to fail.
    struct TestSpool {
        inner: LocalSpool,
        stores: AtomicUsize,
        fail: AtomicBool,
    }

    impl TestSpool {
        fn new(dir: &std::path::Path) -> Arc<TestSpool> {
            Arc::new(TestSpool {
                inner: LocalSpool::open(dir, LocalSpoolOptions::default()).unwrap(),
                stores: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
            })
        }
    }

    #[async_trait]
    impl Spool for TestSpool {
        async fn store(&self, batch: Vec<NewMessage>) -> Result<(), SpoolError> {
            self.stores.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Err(SpoolError::Unavailable("disk full".into()));
            }
            self.inner.store(batch).await
        }
        async fn update(&self, record: MessageRecord) -> Result<(), SpoolError> {
            self.inner.update(record).await
        }
        async fn remove(&self, id: &MessageId) -> Result<(), SpoolError> {
            self.inner.remove(id).await
        }
        async fn list(&self) -> Result<Vec<MessageRecord>, SpoolError> {
            self.inner.list().await
        }
        async fn read_body(&self, id: &MessageId) -> Result<Vec<u8>, SpoolError> {
            self.inner.read_body(id).await
        }
    }

    async fn enqueue_all(
        queue: &Addr<Queue>,
        numbers: std::ops::Range<u64>,
    ) -> Vec<Result<(), SpoolError>> {
        let tasks: Vec<_> = numbers
            .map(|n| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.send(Enqueue(message(n, 2048))).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap().expect("queue is running"));
        }
        results
    }

    #[actix::test]
    async fn concurrent_enqueues_share_store_calls() {
        let dir = tempfile::tempdir().unwrap();
        let spool = TestSpool::new(dir.path());
        let queue = Queue::new(spool.clone()).start();

        let results = enqueue_all(&queue, 0..200).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let stores = spool.stores.load(Ordering::SeqCst);
        assert!(stores <= 20, "{stores} store calls for 200 messages");

        let stored = spool.list().await.unwrap();
        assert_eq!(stored.len(), 200);
        assert_eq!(
            spool.read_body(&id(123)).await.unwrap(),
            message(123, 2048).body
        );
        let stats = queue.send(Stats).await.unwrap();
        assert_eq!(stats.messages, 200);
        assert_eq!(stats.store_calls, stores as u64);
        assert_eq!(stats.waiting, 0);
        assert_eq!(stats.deliveries_by_domain.values().sum::<usize>(), 400);
    }

    #[actix::test]
    async fn a_failed_store_reaches_every_waiter_and_the_queue_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let spool = TestSpool::new(dir.path());
        let queue = Queue::new(spool.clone()).start();

        spool.fail.store(true, Ordering::SeqCst);
        let results = enqueue_all(&queue, 0..100).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(SpoolError::Unavailable(why)) if why == "disk full")),
            "{results:?}"
        );
        assert!(spool.stores.load(Ordering::SeqCst) < 100);
        assert_eq!(queue.send(Stats).await.unwrap().messages, 0);

        spool.fail.store(false, Ordering::SeqCst);
        queue
            .send(Enqueue(message(500, 100)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            spool
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>(),
            vec![id(500)]
        );
    }

    #[actix::test]
    async fn recover_lists_the_spool_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = TestSpool::new(dir.path());
        spool
            .store(vec![message(2, 10), message(0, 10), message(1, 10)])
            .await
            .unwrap();
        let queue = Queue::new(spool.clone()).start();

        let records = queue.send(Recover).await.unwrap().unwrap();
        let ids: Vec<_> = records.into_iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![id(0), id(1), id(2)]);
        let stats = queue.send(Stats).await.unwrap();
        assert_eq!(stats.messages, 3);
        assert_eq!(stats.deliveries_by_domain["example.net"], 2);
    }
}
