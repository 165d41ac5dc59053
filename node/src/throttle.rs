//! The DomainThrottle actor: how many connections one destination domain
//! gets, how fast messages go to it, and how many messages share a
//! connection. It pulls due deliveries from the queue only when it may open
//! a connection, so work waits in the queue, never in a mailbox.
//!
//! The limits themselves live behind [`DomainLimits`] (in-process or
//! cluster-wide); the throttle opens a connection only under a lease and
//! with one of the node's slots.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{oneshot, TryAcquireError};

use crate::delivery::connection::{Delivery, DeliveryEnv};
use crate::delivery::slots::Slot;
use crate::delivery::DomainPolicy;
use crate::dispatcher::{Dispatcher, ThrottleIdle};
use crate::limits::ConnectionLease;
use crate::queue::Take;

/// There may be due work for this domain.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake;

/// A delivery connection of this domain has closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionDone;

/// A throttle with no connection for this long stops.
const IDLE_STOP: Duration = Duration::from_secs(30);

/// When the domain's connection cap is reached by other nodes (whose
/// connections end without telling this one), look again after this.
const CAP_FULL_RETRY: Duration = Duration::from_millis(500);

/// When the limits cannot be read, open nothing and look again after this.
const LIMITS_RETRY: Duration = Duration::from_secs(2);

/// The most connections of one domain being opened at once (a slot, a
/// lease and a take each, in turn). Opening one at a time, a backlog on
/// the `redis` backend got about six new connections a second: each
/// opening waits for three round trips, and each round trip for Redis's
/// fsync behind the bodies being stored.
const PARALLEL_OPENINGS: usize = 8;

/// The longest the messages a connection holds, beyond the one it is
/// sending, should take to send. Work held longer waits on one connection
/// while free slots (here or on other nodes) could send it.
const HOLD: Duration = Duration::from_millis(100);

/// How long a message to this domain takes on one connection, as its last
/// connections measured it. It sizes each take: a slow receiver gets one
/// message per take, so a domain's messages spread over every connection
/// that may serve it and none waits behind another; a fast one gets
/// `max_messages_per_connection` at once, one take per connection.
#[derive(Debug, Default)]
pub struct Pace {
    /// Microseconds, a moving average; 0 until a message was sent.
    micros: AtomicU64,
}

impl Pace {
    /// Adds one message's send time to the average.
    pub fn record(&self, took: Duration) {
        let took = took.as_micros().clamp(1, u64::MAX as u128) as u64;
        let old = self.micros.load(Ordering::Relaxed);
        let new = if old == 0 { took } else { (old * 3 + took) / 4 };
        self.micros.store(new.max(1), Ordering::Relaxed);
    }

    /// The receiver could not be reached (no route, no connection): each
    /// connection then fails all it holds at once, so the next takes give
    /// it as much as it may carry instead of one connection per message.
    /// Its first message sent brings the pace back.
    pub fn unreachable(&self) {
        self.micros.store(1, Ordering::Relaxed);
    }

    /// How many messages a take should give a connection that may carry
    /// `room` more: as many as fit in [`HOLD`], at least one, and one
    /// while the pace is unknown (the first message measures it).
    pub fn batch(&self, room: usize) -> usize {
        let micros = self.micros.load(Ordering::Relaxed);
        let fits = match micros {
            0 => 1,
            _ => (HOLD.as_micros() as u64 / micros).max(1) as usize,
        };
        fits.min(room)
    }
}

/// [`DomainThrottle::at_once`] after `full_takes` full takes in a row.
fn openings_at_once(full_takes: u32) -> usize {
    match full_takes {
        0 | 1 => 1,
        n => 1usize
            .checked_shl(n - 1)
            .unwrap_or(usize::MAX)
            .min(PARALLEL_OPENINGS),
    }
}

/// Open connections of the domain that found no more work and wait a
/// little for some before they close ([`IDLE_WAIT`]): mail that keeps
/// coming a few messages at a time then goes over one connection instead
/// of a new one for each few (a connection, its greeting, `EHLO` and
/// `QUIT` on both sides).
#[derive(Debug, Default)]
pub struct IdleConnections {
    waiting: Mutex<VecDeque<oneshot::Sender<()>>>,
}

impl IdleConnections {
    /// Waits up to `wait` to be handed new work by [`Wake`]; answers
    /// whether it was.
    pub async fn wait(&self, wait: Duration) -> bool {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut waiting = self.lock();
            waiting.retain(|tx| !tx.is_closed());
            waiting.push_back(tx);
        }
        match tokio::time::timeout(wait, &mut rx).await {
            Ok(woken) => woken.is_ok(),
            // Closed first, so that a wake is either taken here or not
            // given at all (the throttle then opens a connection).
            Err(_) => {
                rx.close();
                rx.try_recv().is_ok()
            }
        }
    }

    /// Hands new work to the connection that has waited longest; answers
    /// whether one took it.
    fn wake_one(&self) -> bool {
        let mut waiting = self.lock();
        while let Some(tx) = waiting.pop_front() {
            if tx.send(()).is_ok() {
                return true;
            }
        }
        false
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a connection with nothing more to send waits for new work of
/// its domain before it says `QUIT`. Only while the node has a free slot,
/// so that no other domain waits for the one it holds.
pub const IDLE_WAIT: Duration = Duration::from_millis(100);

/// What a domain's throttle shares with its connections.
#[derive(Debug, Default)]
pub struct DomainShared {
    pub pace: Pace,
    pub idle: IdleConnections,
}

pub struct DomainThrottle {
    policy: Arc<DomainPolicy>,
    shared: Arc<DomainShared>,
    env: Arc<DeliveryEnv>,
    dispatcher: Addr<Dispatcher>,
    /// Open connections of this domain on this node.
    active: usize,
    /// Connections being opened: a node slot, a lease or a `Take` is on
    /// its way for each.
    opening: usize,
    /// Takes in a row that gave all they asked for
    /// ([`DomainThrottle::at_once`]).
    full_takes: u32,
    /// One opening waits in line for a node slot.
    waiting_for_slot: bool,
    /// A [`DomainThrottle::retry`] is pending.
    retrying: bool,
    /// An [`DomainThrottle::idle_check`] is pending.
    idle_timer: bool,
    last_busy: Instant,
}

impl DomainThrottle {
    pub fn new(
        policy: Arc<DomainPolicy>,
        env: Arc<DeliveryEnv>,
        dispatcher: Addr<Dispatcher>,
    ) -> Self {
        DomainThrottle {
            policy,
            shared: Arc::default(),
            env,
            dispatcher,
            active: 0,
            opening: 0,
            full_takes: 0,
            waiting_for_slot: false,
            retrying: false,
            idle_timer: false,
            last_busy: Instant::now(),
        }
    }

    /// How many connections may be opened at once: one, doubled by each
    /// take that gives all it asked for from the second such take in a row
    /// (there is likely more work) up to [`PARALLEL_OPENINGS`], one again
    /// after a take that gives less. At the end of a backlog as many takes
    /// find nothing as were under way; a message alone costs one, as it
    /// would one at a time (a take of one is all a throttle asks for while
    /// the pace is unknown, so one full take is no sign of more).
    fn at_once(&self) -> usize {
        openings_at_once(self.full_takes)
    }

    /// Opens connections while the limits allow and the queue has work:
    /// a node-wide slot, then a lease on one of the domain's slots, then
    /// work from the queue; several at once while the takes come back
    /// full ([`DomainThrottle::at_once`]). When the node's slots are all in
    /// use, one opening waits in line for one: a connection that ends hands
    /// its slot to the domain that has waited longest, at once.
    fn fill(&mut self, ctx: &mut Context<Self>) {
        while self.opening < self.at_once()
            && self.active + self.opening < self.policy.max_connections
            && !self.waiting_for_slot
        {
            let slots = self.env.node_slots.clone();
            match slots.try_take() {
                Ok(slot) => {
                    self.opening += 1;
                    self.lease(slot, ctx);
                }
                Err(TryAcquireError::NoPermits) => {
                    self.opening += 1;
                    self.waiting_for_slot = true;
                    let wait = slots.take();
                    ctx.spawn(wait.into_actor(self).map(|slot, throttle, ctx| {
                        throttle.waiting_for_slot = false;
                        match slot {
                            Ok(slot) => throttle.lease(slot, ctx),
                            // Closed: the node is stopping.
                            Err(_) => throttle.opening -= 1,
                        }
                    }));
                }
                Err(TryAcquireError::Closed) => break,
            }
        }
    }

    /// Asks for a lease on one of the domain's slots, holding the node's
    /// `slot`.
    fn lease(&mut self, slot: Slot, ctx: &mut Context<Self>) {
        let limits = self.env.limits.clone();
        let domain = self.policy.domain.clone();
        let cap = self.policy.max_connections;
        let acquire = async move { limits.acquire_connection(&domain, cap).await };
        ctx.spawn(
            acquire
                .into_actor(self)
                .map(move |lease, throttle, ctx| match lease {
                    Ok(Some(lease)) => throttle.take(lease, slot, ctx),
                    Ok(None) => {
                        throttle.opening -= 1;
                        drop(slot);
                        throttle.retry(CAP_FULL_RETRY, ctx);
                    }
                    Err(error) => {
                        throttle.opening -= 1;
                        drop(slot);
                        tracing::warn!(domain = %throttle.policy.domain, %error,
                            "no connection lease, opening no connection");
                        throttle.retry(LIMITS_RETRY, ctx);
                    }
                }),
        );
    }

    /// Fills again after `after`, unless a retry is already pending: wakes
    /// that come meanwhile must not pile up timers.
    fn retry(&mut self, after: Duration, ctx: &mut Context<Self>) {
        if self.retrying {
            return;
        }
        self.retrying = true;
        ctx.run_later(after, |throttle, ctx| {
            throttle.retrying = false;
            throttle.fill(ctx);
        });
    }

    /// Takes work for a connection under `lease`; starts the connection
    /// if there is some, else gives the lease back.
    fn take(&mut self, lease: ConnectionLease, mut slot: Slot, ctx: &mut Context<Self>) {
        let max = self
            .shared
            .pace
            .batch(self.policy.max_messages_per_connection);
        let take = self.env.queue.send(Take {
            domain: self.policy.domain.clone(),
            max,
        });
        ctx.spawn(take.into_actor(self).map(move |jobs, throttle, ctx| {
            throttle.opening -= 1;
            let jobs = jobs.unwrap_or_default();
            throttle.full_takes = match jobs.len() >= max {
                true => throttle.full_takes.saturating_add(1),
                false => 0,
            };
            crate::metrics::delivery_take(jobs.len());
            if jobs.is_empty() {
                let limits = throttle.env.limits.clone();
                let release = async move {
                    if let Err(error) = limits.release(lease).await {
                        tracing::warn!(%error, "cannot release a connection lease");
                    }
                };
                ctx.spawn(release.into_actor(throttle));
                drop(slot);
                throttle.idle_check(ctx);
                return;
            }
            throttle.active += 1;
            throttle.last_busy = Instant::now();
            slot.carries_mail();
            let (policy, env, me) = (throttle.policy.clone(), throttle.env.clone(), ctx.address());
            let shared = throttle.shared.clone();
            throttle
                .env
                .workers
                .start_actor(move |_| Delivery::new(policy, jobs, env, me, slot, lease, shared));
            throttle.fill(ctx);
        }));
    }

    /// Stops the throttle once it has had no connection and nothing to do
    /// for [`IDLE_STOP`]; one timer at a time, however many takes come
    /// back empty.
    fn idle_check(&mut self, ctx: &mut Context<Self>) {
        if self.active > 0 || self.idle_timer {
            return;
        }
        self.idle_timer = true;
        let wait = IDLE_STOP.saturating_sub(self.last_busy.elapsed());
        ctx.run_later(wait, |throttle, ctx| {
            throttle.idle_timer = false;
            if throttle.active > 0 || throttle.opening > 0 {
                return;
            }
            if throttle.last_busy.elapsed() < IDLE_STOP {
                throttle.idle_check(ctx);
                return;
            }
            throttle.dispatcher.do_send(ThrottleIdle {
                domain: throttle.policy.domain.clone(),
                throttle: ctx.address(),
            });
            ctx.stop();
        });
    }
}

impl Actor for DomainThrottle {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Wakes beyond a few are redundant: one fill sees all the work.
        ctx.set_mailbox_capacity(16);
    }
}

impl Handler<Wake> for DomainThrottle {
    type Result = ();

    /// Hands the work to a connection that waits for some, else opens
    /// connections for it.
    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.last_busy = Instant::now();
        if self.shared.idle.wake_one() {
            return;
        }
        self.fill(ctx);
    }
}

impl Handler<ConnectionDone> for DomainThrottle {
    type Result = ();

    /// A slot is free: take more work if there is some.
    fn handle(&mut self, _: ConnectionDone, ctx: &mut Context<Self>) {
        self.active -= 1;
        self.last_busy = Instant::now();
        self.fill(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_connection_is_handed_the_wake() {
        let idle = Arc::new(IdleConnections::default());
        assert!(!idle.wake_one(), "nobody waits");
        let waiter = {
            let idle = idle.clone();
            tokio::spawn(async move { idle.wait(Duration::from_secs(30)).await })
        };
        while idle.lock().is_empty() {
            tokio::task::yield_now().await;
        }
        assert!(idle.wake_one());
        assert!(waiter.await.unwrap(), "woken, long before the wait ends");
        assert!(!idle.wake_one(), "the wake went to the one waiter");
    }

    #[tokio::test]
    async fn a_connection_whose_wait_ended_takes_no_wake() {
        let idle = IdleConnections::default();
        assert!(!idle.wait(Duration::from_millis(1)).await);
        assert!(!idle.wake_one(), "the throttle opens a connection instead");
    }

    #[test]
    fn a_take_holds_what_the_receiver_sends_within_the_hold_time() {
        let cases: &[(Option<u64>, usize, usize)] = &[
            // (ms per message, room left on the connection, batch)
            (None, 20, 1),
            (None, 0, 0),
            (Some(200), 20, 1),
            (Some(100), 20, 1),
            (Some(40), 20, 2),
            (Some(10), 20, 10),
            (Some(1), 20, 20),
            (Some(1), 7, 7),
            (Some(200), 0, 0),
        ];
        for &(ms, room, want) in cases {
            let pace = Pace::default();
            if let Some(ms) = ms {
                pace.record(Duration::from_millis(ms));
            }
            assert_eq!(pace.batch(room), want, "{ms:?} ms a message, room {room}");
        }
    }

    #[test]
    fn openings_double_from_the_second_full_take_in_a_row_up_to_eight() {
        let table = [(0, 1), (1, 1), (2, 2), (3, 4), (4, 8), (5, 8), (70, 8)];
        for (full_takes, at_once) in table {
            assert_eq!(openings_at_once(full_takes), at_once, "{full_takes}");
        }
    }

    #[test]
    fn the_pace_follows_the_receiver_as_it_slows_down() {
        let pace = Pace::default();
        pace.record(Duration::from_millis(2));
        assert_eq!(pace.batch(20), 20);
        for _ in 0..10 {
            pace.record(Duration::from_millis(300));
        }
        assert_eq!(pace.batch(20), 1);
        // A receiver that cannot be reached gets whole takes, and a slow
        // one that comes back is paced again within a few messages.
        pace.unreachable();
        assert_eq!(pace.batch(20), 20);
        for _ in 0..3 {
            pace.record(Duration::from_millis(300));
        }
        assert_eq!(pace.batch(20), 1);
        // A zero-length measurement is not "unknown".
        let pace = Pace::default();
        pace.record(Duration::ZERO);
        assert_eq!(pace.batch(20), 20);
    }
}
