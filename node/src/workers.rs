//! The threads that carry the node's connections: SMTP sessions and
//! outbound deliveries, the work that grows with the traffic (socket I/O,
//! TLS, parsing). The Queue, the throttles and the other actors stay on
//! the system thread and are reached by messages, so their state never
//! needs a lock.
//!
//! Each worker is an actix [`Arbiter`]: a thread with its own event loop.
//! The system thread is one of the threads, the first: what it runs costs
//! no hand-over, and with one thread nothing is handed over at all. Every
//! thread accepts SMTP connections itself ([`crate::listener`]) and serves
//! them there. New connections and outbound deliveries go to the first
//! thread that is not busy, and round all threads in turn when every one is
//! ([`crate::load`]); or, with `node.thread_busy_percent = 0`, always round
//! all of them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix::Arbiter;
use tokio::sync::watch;

use crate::load::{self, Fill, Target, ThreadClock};

/// The worker threads, shared by the listener and the throttles.
#[derive(Clone)]
pub struct Workers {
    inner: Arc<Inner>,
}

struct Inner {
    /// The threads in turn, the caller's first; empty: everything runs
    /// on the arbiter that asks.
    arbiters: Vec<ArbiterHandle>,
    /// The threads of `arbiters`, in the same order.
    ids: Vec<std::thread::ThreadId>,
    /// The threads, to stop and join when the node stops.
    threads: std::sync::Mutex<Vec<Arbiter>>,
    /// The thread that started the workers, first in turn.
    home: std::thread::ThreadId,
    next: AtomicUsize,
    /// The thread that takes new work.
    target: watch::Sender<Target>,
}

impl Workers {
    /// Connections on `count` threads: the arbiter that calls this (the
    /// system thread) is one of them, and `count - 1` more are started.
    /// New work goes round all of them in turn. The calling thread's share
    /// skips the hand-over between threads, and one thread (`count` ≤ 1)
    /// runs everything there.
    pub fn start(count: usize) -> Workers {
        Workers::start_filling(count, 0)
    }

    /// As [`Workers::start`], but new work goes to the first thread that
    /// runs less than `busy_percent` of the time, and round all of them
    /// only when every one is busy. A `busy_percent` of 0 goes round all
    /// threads always.
    pub fn start_filling(count: usize, busy_percent: u8) -> Workers {
        let threads: Vec<Arbiter> = (1..count).map(|_| Arbiter::new()).collect();
        let home = std::thread::current().id();
        let mut arbiters = Vec::new();
        let mut ids = Vec::new();
        let mut clocks = vec![ThreadClock::current()];
        if !threads.is_empty() {
            arbiters.push(Arbiter::current());
            arbiters.extend(threads.iter().map(Arbiter::handle));
            ids.push(home);
            ids.extend(threads.iter().map(|thread| {
                let (tell, told) = std::sync::mpsc::channel();
                thread.spawn_fn(move || {
                    let _ = tell.send((std::thread::current().id(), ThreadClock::current()));
                });
                // A thread that cannot answer runs nothing. It stands in as
                // the first thread, which `here` finds before it.
                let (id, clock) = told.recv().unwrap_or((home, ThreadClock::current()));
                clocks.push(clock);
                id
            }));
        }
        let first = if busy_percent > 0 {
            Target::Thread(0)
        } else {
            Target::All
        };
        let workers = Workers {
            inner: Arc::new(Inner {
                arbiters,
                ids,
                threads: std::sync::Mutex::new(threads),
                home,
                next: AtomicUsize::new(0),
                target: watch::Sender::new(first),
            }),
        };
        if busy_percent > 0 && count > 1 {
            match clocks.into_iter().collect::<std::io::Result<Vec<_>>>() {
                Ok(clocks) => {
                    actix::spawn(fill(Arc::downgrade(&workers.inner), clocks, busy_percent));
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the threads' CPU time; new work goes round all threads");
                    workers.inner.target.send_replace(Target::All);
                }
            }
        }
        workers
    }

    /// One thread: connections run where they are started.
    pub fn inline() -> Workers {
        Workers::start(1)
    }

    /// The number of threads for `node.threads`: 0 means one per core.
    pub fn count_for(configured: usize) -> usize {
        if configured > 0 {
            return configured;
        }
        std::thread::available_parallelism().map_or(1, usize::from)
    }

    /// The number of threads that run connections.
    pub fn threads(&self) -> usize {
        self.inner.arbiters.len().max(1)
    }

    /// Which of the threads is the calling one, if any.
    pub fn here(&self) -> Option<usize> {
        let me = std::thread::current().id();
        if self.inner.ids.is_empty() {
            return (me == self.inner.home).then_some(0);
        }
        self.inner.ids.iter().position(|id| *id == me)
    }

    /// Starts an actor that `make` builds on each thread, in the order of
    /// [`Workers::here`]. Called from the first thread.
    pub fn start_on_each<A, F>(&self, make: F) -> Vec<Addr<A>>
    where
        A: Actor<Context = Context<A>>,
        F: Fn() -> A + Send + Clone + 'static,
    {
        if self.inner.arbiters.is_empty() {
            return vec![make().start()];
        }
        self.inner
            .arbiters
            .iter()
            .map(|arbiter| {
                let make = make.clone();
                A::start_in_arbiter(arbiter, move |_| make())
            })
            .collect()
    }

    /// The thread that takes new work, and each change to it.
    pub fn target(&self) -> watch::Receiver<Target> {
        self.inner.target.subscribe()
    }

    /// The thread for new work: `None` for the calling thread itself.
    fn next(&self) -> Option<ArbiterHandle> {
        let arbiters = &self.inner.arbiters;
        if arbiters.is_empty() {
            return None;
        }
        let turn = match *self.inner.target.borrow() {
            Target::Thread(thread) => thread.min(arbiters.len() - 1),
            Target::All => self.inner.next.fetch_add(1, Ordering::Relaxed) % arbiters.len(),
        };
        if turn == 0 && std::thread::current().id() == self.inner.home {
            return None;
        }
        Some(arbiters[turn].clone())
    }

    /// Runs the future that `make` builds on thread `thread` (0: the
    /// thread that started the workers; below [`Workers::threads`]).
    /// Called from that first thread.
    pub fn run_on<F, Fut>(&self, thread: usize, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        let Some(arbiter) = self.inner.arbiters.get(thread) else {
            actix::spawn(make());
            return;
        };
        if !arbiter.spawn_fn(move || {
            actix::spawn(make());
        }) {
            tracing::warn!(thread, "a worker thread has stopped");
        }
    }

    /// Starts the actor that `make` builds on the next thread.
    pub fn start_actor<A, F>(&self, make: F) -> Addr<A>
    where
        A: Actor<Context = Context<A>>,
        F: FnOnce(&mut Context<A>) -> A + Send + 'static,
    {
        match self.next() {
            Some(worker) => A::start_in_arbiter(&worker, make),
            None => A::create(make),
        }
    }

    /// Stops the worker threads once what runs on them has finished, and
    /// waits for them.
    pub fn stop(&self) {
        let threads =
            std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for thread in &threads {
            thread.stop();
        }
        for thread in threads {
            let _ = thread.join();
        }
    }
}

/// Samples the threads' CPU time and publishes the thread to fill, until
/// the workers are gone. Runs on the system thread.
async fn fill(workers: std::sync::Weak<Inner>, clocks: Vec<ThreadClock>, busy_percent: u8) {
    let mut fill = Fill::new(clocks.len(), busy_percent);
    let started = std::time::Instant::now();
    let gauges: Vec<_> = (0..clocks.len()).map(crate::metrics::thread_busy).collect();
    let mut tick = tokio::time::interval(load::SAMPLE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(workers) = workers.upgrade() else {
            return;
        };
        let now = started.elapsed().as_nanos() as u64;
        let busy: Vec<u64> = clocks.iter().map(ThreadClock::cpu_ns).collect();
        let target = fill.sample(now, &busy);
        for (gauge, share) in gauges.iter().zip(fill.shares()) {
            gauge.set(*share);
        }
        workers.target.send_if_modified(|current| {
            let changed = *current != target;
            *current = target;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread that runs what `run_on(thread, …)` is given.
    async fn thread_running(workers: &Workers, thread: usize) -> std::thread::ThreadId {
        let (tell, told) = tokio::sync::oneshot::channel();
        workers.run_on(thread, move || async move {
            let _ = tell.send(std::thread::current().id());
        });
        told.await.unwrap()
    }

    #[test]
    fn each_thread_runs_what_it_is_given_the_callers_first() {
        actix::System::new().block_on(async {
            let workers = Workers::start(2);
            assert_eq!(workers.threads(), 2);
            let main = std::thread::current().id();
            assert_eq!(thread_running(&workers, 0).await, main);
            let other = thread_running(&workers, 1).await;
            assert_ne!(other, main);
            assert_eq!(thread_running(&workers, 1).await, other);
            workers.stop();
        });
    }

    /// An actor that answers the thread it runs on.
    struct Where;

    impl Actor for Where {
        type Context = Context<Self>;
    }

    #[derive(Message)]
    #[rtype(result = "std::thread::ThreadId")]
    struct Which;

    impl Handler<Which> for Where {
        type Result = MessageResult<Which>;
        fn handle(&mut self, _: Which, _: &mut Context<Self>) -> Self::Result {
            MessageResult(std::thread::current().id())
        }
    }

    #[test]
    fn actors_go_round_the_threads_the_callers_first() {
        actix::System::new().block_on(async {
            let workers = Workers::start(2);
            let mut threads = Vec::new();
            for _ in 0..4 {
                let actor = workers.start_actor(|_| Where);
                threads.push(actor.send(Which).await.unwrap());
            }
            let main = std::thread::current().id();
            assert_eq!(threads[0], main, "{threads:?}");
            assert_ne!(threads[1], main);
            assert_eq!(threads[2], threads[0]);
            assert_eq!(threads[3], threads[1]);
            workers.stop();
        });
    }

    /// Keeps the calling thread's event loop working for `spell`, handing
    /// control back every few milliseconds without waiting.
    async fn work_for(spell: std::time::Duration) {
        let until = std::time::Instant::now() + spell;
        while std::time::Instant::now() < until {
            let step = std::time::Instant::now() + std::time::Duration::from_millis(2);
            while std::time::Instant::now() < step {
                std::hint::spin_loop();
            }
            tokio::task::yield_now().await;
        }
    }

    /// With the system thread counted, new actors go there while it is
    /// free, to the next thread while it works without a pause, and back
    /// once it is free again; the thread to fill is published.
    #[test]
    fn new_work_fills_the_first_thread_that_is_not_busy() {
        actix::System::new().block_on(async move {
            // A low mark: on a machine busy with other tests the working
            // thread may run well under a whole core.
            let workers = Workers::start_filling(2, 10);
            let main = std::thread::current().id();
            let mut target = workers.target();
            assert_eq!(*target.borrow_and_update(), Target::Thread(0));
            let actor = workers.start_actor(|_| Where);
            assert_eq!(actor.send(Which).await.unwrap(), main);

            work_for(std::time::Duration::from_millis(300)).await;
            assert_eq!(*target.borrow_and_update(), Target::Thread(1));
            let actor = workers.start_actor(|_| Where);
            assert_ne!(actor.send(Which).await.unwrap(), main);

            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            assert_eq!(*target.borrow_and_update(), Target::Thread(0));
            let actor = workers.start_actor(|_| Where);
            assert_eq!(actor.send(Which).await.unwrap(), main);
            workers.stop();
        });
    }

    /// `start_on_each` puts one actor on each thread, in the order that
    /// `here` numbers the threads; a thread that is not a worker is none.
    #[test]
    fn each_thread_gets_its_own_actor_and_knows_its_number() {
        actix::System::new().block_on(async {
            for count in [1, 3] {
                let workers = Workers::start(count);
                let actors = workers.start_on_each(|| Where);
                assert_eq!(actors.len(), count);
                for (thread, actor) in actors.iter().enumerate() {
                    let (tell, told) = tokio::sync::oneshot::channel();
                    let mine = workers.clone();
                    workers.run_on(thread, move || async move {
                        let _ = tell.send((mine.here(), std::thread::current().id()));
                    });
                    let (here, id) = told.await.unwrap();
                    assert_eq!(here, Some(thread), "{count} threads");
                    assert_eq!(actor.send(Which).await.unwrap(), id, "{count} threads");
                }
                let elsewhere = workers.clone();
                let outside = std::thread::spawn(move || elsewhere.here()).join().unwrap();
                assert_eq!(outside, None);
                workers.stop();
            }
        });
    }

    #[test]
    fn one_thread_runs_everything_where_it_is_asked() {
        actix::System::new().block_on(async {
            let workers = Workers::inline();
            assert_eq!(workers.threads(), 1);
            assert!(workers.next().is_none());
            assert!(workers.next().is_none());
        });
    }

    #[test]
    fn count_zero_means_one_per_core() {
        assert!(Workers::count_for(0) >= 1);
        assert_eq!(Workers::count_for(3), 3);
    }
}
