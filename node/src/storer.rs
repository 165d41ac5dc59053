//! The `Storer` actor: takes accepted messages into the spool and answers
//! each sender once its message is durable.
//!
//! Group commit: at most [`STORES_IN_FLIGHT`] `Spool::store_scheduled`
//! calls are under way at once. Enqueues that arrive meanwhile wait in a
//! [`Batcher`]; when a call returns they all go into the next single call,
//! so many concurrent SMTP sessions share one fsync (one `MULTI`/`EXEC`
//! on Redis).
//!
//! On the local spool one storer runs on each connection thread
//! ([`Stores`]): a session's message is stored, and its `250` written,
//! without leaving the session's thread. The Queue hears of each stored
//! batch afterwards ([`Stored`]), once per batch instead of twice per
//! message. On Redis the sessions share the Queue's storer: every round
//! trip goes through the connection's task on the system thread anyway,
//! and a storer per thread would only split the batches (more `MULTI`,
//! `MSET`, `EXEC` and set updates per message). Each
//! stored message is in the schedule before its sender hears, so a
//! message the client was told is queued is also counted and handed out;
//! the Queue's announcement to the dispatcher only makes that sooner
//! (its ticks find due domains all the same).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use smarthost_proto::envelope::{MessageId, MessageRecord};
use tokio::sync::oneshot;

use crate::body_cache::BodyCache;
use crate::now_ms;
use crate::queue::Enqueue;
use crate::schedule::Schedule;
use crate::spool::{NewMessage, Spool, SpoolError};
use crate::workers::Workers;

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

/// Store calls under way at once: a batch formed while one waits for its
/// fsync or its Redis reply goes out at once instead of after it.
const STORES_IN_FLIGHT: usize = 2;

/// Messages waiting for a store call, each with whoever waits for it, and
/// how many calls are in flight.
#[derive(Debug)]
pub struct Batcher<W> {
    pending: VecDeque<(NewMessage, W)>,
    in_flight: usize,
    limits: BatchLimits,
}

impl<W> Batcher<W> {
    pub fn new(limits: BatchLimits) -> Self {
        Batcher {
            pending: VecDeque::new(),
            in_flight: 0,
            limits,
        }
    }

    pub fn push(&mut self, message: NewMessage, waiter: W) {
        self.pending.push_back((message, waiter));
    }

    /// The next batch to store, oldest first, if fewer than
    /// [`STORES_IN_FLIGHT`] calls are in flight; the batch is then in
    /// flight until [`Batcher::finished`].
    pub fn next_batch(&mut self) -> Option<Vec<(NewMessage, W)>> {
        if self.in_flight >= STORES_IN_FLIGHT || self.pending.is_empty() {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some((message, _)) = self.pending.front() {
            let size = usize::try_from(message.body.len()).unwrap_or(usize::MAX);
            if !batch.is_empty()
                && (batch.len() == self.limits.max_messages || bytes + size > self.limits.max_bytes)
            {
                break;
            }
            bytes += size;
            batch.push(self.pending.pop_front().expect("front exists"));
        }
        self.in_flight += 1;
        Some(batch)
    }

    /// The call in flight has answered.
    pub fn finished(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    pub fn waiting(&self) -> usize {
        self.pending.len()
    }
}

/// A stored batch, for the Queue: the domains that now have due work, and
/// the messages whose schedule insert failed (durable all the same; the
/// Queue inserts them again on its next ticks).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stored {
    pub domains: Vec<String>,
    pub unscheduled: Vec<Arc<MessageRecord>>,
}

/// Counts kept by all of a node's storers together, for the queue's stats.
#[derive(Debug, Default)]
pub struct StoreCounts {
    waiting: AtomicUsize,
    calls: AtomicU64,
}

impl StoreCounts {
    /// Enqueues waiting for a store call.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Store calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

/// What every storer of a node shares.
#[derive(Clone)]
pub struct StorerEnv {
    pub spool: Arc<dyn Spool>,
    pub schedule: Arc<dyn Schedule>,
    /// Where stored bodies wait for their first delivery.
    pub bodies: Arc<BodyCache>,
    pub limits: BatchLimits,
    pub counts: Arc<StoreCounts>,
    /// The Queue, told of every stored batch.
    pub queue: Recipient<Stored>,
}

type Waiter = oneshot::Sender<Result<(), SpoolError>>;

pub struct Storer {
    env: StorerEnv,
    batcher: Batcher<Waiter>,
}

impl Storer {
    pub fn new(env: StorerEnv) -> Self {
        Storer {
            batcher: Batcher::new(env.limits),
            env,
        }
    }

    /// Starts the next store call if fewer than [`STORES_IN_FLIGHT`] are
    /// under way; when it returns, tells the Queue, answers its waiters and
    /// starts the one after.
    fn store_next(&mut self, ctx: &mut Context<Self>) {
        let Some(batch) = self.batcher.next_batch() else {
            return;
        };
        let (messages, waiters): (Vec<NewMessage>, Vec<Waiter>) = batch.into_iter().unzip();
        let StorerEnv {
            spool,
            schedule,
            bodies,
            counts,
            ..
        } = self.env.clone();
        counts.waiting.fetch_sub(messages.len(), Ordering::Relaxed);
        counts.calls.fetch_add(1, Ordering::Relaxed);
        let store = async move {
            let count = messages.len();
            let kept: Vec<_> = messages
                .iter()
                .filter_map(|m| Some((m.record.id.clone(), bodies.share(&m.body)?)))
                .collect();
            let ids: Vec<MessageId> = kept.iter().map(|(id, _)| id.clone()).collect();
            // Kept before the store: a delivery at work on the domain, on
            // another thread, takes a message the moment the store
            // schedules it, and must find its body. Nothing takes it
            // before; a failed store drops it again.
            bodies.keep(kept);
            // Records shared by the spool and the schedule, not copied.
            let started = std::time::Instant::now();
            let stored = match spool
                .store_scheduled(messages, schedule.as_ref(), now_ms())
                .await
            {
                Ok(stored) => stored,
                Err(error) => {
                    bodies.discard(&ids);
                    return Err(error);
                }
            };
            crate::metrics::spool_store(started.elapsed());
            Ok(match stored.scheduled {
                Ok(domains) => Stored {
                    domains,
                    unscheduled: Vec::new(),
                },
                Err(error) => {
                    tracing::error!(%error, messages = count,
                        "cannot schedule stored messages yet; trying again");
                    Stored {
                        domains: Vec::new(),
                        unscheduled: stored.records,
                    }
                }
            })
        };
        ctx.spawn(store.into_actor(self).map(move |result, storer, ctx| {
            storer.batcher.finished();
            let result = match result {
                Ok(stored) => {
                    if !stored.domains.is_empty() || !stored.unscheduled.is_empty() {
                        // A stopped Queue (the node is stopping) loses
                        // nothing: the messages are durable and scheduled
                        // again at start.
                        storer.env.queue.do_send(stored);
                    }
                    Ok(())
                }
                Err(error) => {
                    tracing::warn!(%error, "storing a batch failed");
                    Err(error)
                }
            };
            for waiter in waiters {
                // A waiter that went away (client disconnected) is fine.
                let _ = waiter.send(result.clone());
            }
            storer.store_next(ctx);
        }));
    }
}

impl Actor for Storer {
    type Context = Context<Self>;
}

/// Adds the message to the next batch; the answer comes when that batch
/// is durable (or failed).
impl Handler<Enqueue> for Storer {
    type Result = ResponseFuture<Result<(), SpoolError>>;

    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.batcher.push(msg.0, tx);
        self.env.counts.waiting.fetch_add(1, Ordering::Relaxed);
        self.store_next(ctx);
        Box::pin(async move {
            rx.await.unwrap_or_else(|_| {
                Err(SpoolError::Unavailable(
                    "the node stopped before the message was stored".into(),
                ))
            })
        })
    }
}

/// Where a connection thread hands its messages: the storer running on
/// that thread, or `elsewhere` (the Queue, which passes them to its own)
/// from any other thread.
#[derive(Clone)]
pub struct Stores {
    workers: Workers,
    each: Arc<[Recipient<Enqueue>]>,
    elsewhere: Recipient<Enqueue>,
}

impl Stores {
    /// Starts a storer on each of `workers`' threads.
    pub fn start(workers: &Workers, env: StorerEnv, elsewhere: Recipient<Enqueue>) -> Stores {
        let each = workers
            .start_on_each(move || Storer::new(env.clone()))
            .into_iter()
            .map(Addr::recipient)
            .collect();
        Stores {
            workers: workers.clone(),
            each,
            elsewhere,
        }
    }

    /// Every message goes to `queue` (and so to the Queue's own storer).
    pub fn only(queue: Recipient<Enqueue>) -> Stores {
        Stores {
            workers: Workers::inline(),
            each: Arc::new([]),
            elsewhere: queue,
        }
    }

    /// The storer for a message handed over on the calling thread.
    pub fn here(&self) -> &Recipient<Enqueue> {
        self.workers
            .here()
            .and_then(|thread| self.each.get(thread))
            .unwrap_or(&self.elsewhere)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Queue, Stats};
    use crate::spool::suite::message;
    use crate::spool::{LocalSpool, LocalSpoolOptions};

    fn waiters(batch: &[(NewMessage, u64)]) -> Vec<u64> {
        batch.iter().map(|(_, w)| *w).collect()
    }

    #[test]
    fn two_batches_in_flight_and_the_rest_wait_for_the_next() {
        let mut batcher = Batcher::new(BatchLimits::default());
        assert!(batcher.next_batch().is_none());
        batcher.push(message(0, 10), 0);
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![0]);
        batcher.push(message(1, 10), 1);
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![1]);
        for n in 2..6 {
            batcher.push(message(n, 10), n);
        }
        assert!(batcher.next_batch().is_none(), "two calls are in flight");
        assert_eq!(batcher.waiting(), 4);
        batcher.finished();
        assert_eq!(waiters(&batcher.next_batch().unwrap()), vec![2, 3, 4, 5]);
        batcher.finished();
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

    /// Collects the domains the Queue announces.
    struct Announced(tokio::sync::mpsc::UnboundedSender<String>);

    impl Actor for Announced {
        type Context = Context<Self>;
    }

    impl Handler<crate::dispatcher::DomainReady> for Announced {
        type Result = ();

        fn handle(&mut self, msg: crate::dispatcher::DomainReady, _: &mut Context<Self>) {
            let _ = self.0.send(msg.0);
        }
    }

    /// The Queue announces the domains of a stored batch at once, not on
    /// its next tick (whose look at the empty schedule finds nothing).
    #[actix::test]
    async fn the_queue_announces_what_a_storer_stored() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(LocalSpool::open(dir.path(), LocalSpoolOptions::default()).unwrap());
        let queue = Queue::new(spool).start();
        let (tell, mut told) = tokio::sync::mpsc::unbounded_channel();
        let announced = Announced(tell).start().recipient();
        queue.send(crate::queue::Attach(announced)).await.unwrap();
        let domains = vec!["a.example".to_string(), "b.example".to_string()];
        queue
            .send(Stored {
                domains: domains.clone(),
                unscheduled: Vec::new(),
            })
            .await
            .unwrap();
        let mut heard = Vec::new();
        for _ in 0..2 {
            let wait = std::time::Duration::from_millis(300);
            let domain = tokio::time::timeout(wait, told.recv()).await;
            heard.push(domain.expect("announced at once").unwrap());
        }
        assert_eq!(heard, domains);
    }

    /// Each thread's messages go to the storer on that thread; every one
    /// is stored, and counted and handed out by the Queue.
    #[actix::test]
    async fn each_thread_stores_through_its_own_storer() {
        let dir = tempfile::tempdir().unwrap();
        let spool: Arc<dyn Spool> =
            Arc::new(LocalSpool::open(dir.path(), LocalSpoolOptions::default()).unwrap());
        let workers = Workers::start(2);
        let (queue, env) = Queue::new(spool.clone()).start_with_storer_env();
        let stores = Stores::start(&workers, env, queue.clone().recipient());
        assert_eq!(stores.each.len(), 2);
        // Off the connection threads (here: a plain thread), the Queue.
        let off = stores.clone();
        let elsewhere = std::thread::spawn(move || off.here() == &off.elsewhere)
            .join()
            .unwrap();
        assert!(elsewhere);

        let (done, mut finished) = tokio::sync::mpsc::unbounded_channel();
        for thread in 0..2 {
            let (stores, done) = (stores.clone(), done.clone());
            workers.run_on(thread, move || async move {
                let own = stores.here() == &stores.each[thread];
                let mut results = Vec::new();
                for n in 0..20 {
                    let n = thread as u64 * 100 + n;
                    results.push(stores.here().send(Enqueue(message(n, 512))));
                }
                let mut stored = 0;
                for result in results {
                    stored += usize::from(matches!(result.await, Ok(Ok(()))));
                }
                let _ = done.send((own, stored));
            });
        }
        for _ in 0..2 {
            let (own, stored) = finished.recv().await.unwrap();
            assert!(own, "a thread's messages go to its own storer");
            assert_eq!(stored, 20);
        }
        let stats = queue.send(Stats).await.unwrap();
        assert_eq!(stats.messages, 40);
        assert_eq!(stats.waiting, 0);
        assert!(stats.store_calls >= 2, "{} store calls", stats.store_calls);
        assert_eq!(stats.deliveries_by_domain.values().sum::<usize>(), 80);
        assert_eq!(spool.list().await.unwrap().len(), 40);
        workers.stop();
    }
}
