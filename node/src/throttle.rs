//! The DomainThrottle actor: how many connections one destination domain
//! gets, how fast messages go to it, and how many messages share a
//! connection. It pulls due deliveries from the queue only when it may open
//! a connection, so work waits in the queue, never in a mailbox.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::delivery::connection::{Delivery, DeliveryEnv};
use crate::delivery::DomainPolicy;
use crate::dispatcher::{Dispatcher, ThrottleIdle};
use crate::queue::Take;

/// There may be due work for this domain.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake;

/// A delivery connection of this domain has closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionDone;

/// Answers when the next message to this domain may be sent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RatePermit;

/// A throttle with no connection for this long stops.
const IDLE_STOP: Duration = Duration::from_secs(30);

/// When the node-wide connection limit is reached, look again after this.
const NODE_FULL_RETRY: Duration = Duration::from_millis(200);

/// Spaces messages evenly: at most `count` per `per`, no bursts (GCRA with
/// no burst tolerance). Each caller reserves the next free slot.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next_free: Option<Instant>,
}

impl RateLimiter {
    pub fn new(count: u32, per: Duration) -> Self {
        RateLimiter {
            interval: per / count.max(1),
            next_free: None,
        }
    }

    /// Reserves the next slot; returns how long to wait before using it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let slot = self.next_free.map_or(now, |free| free.max(now));
        self.next_free = Some(slot + self.interval);
        slot - now
    }
}

pub struct DomainThrottle {
    policy: Arc<DomainPolicy>,
    env: Arc<DeliveryEnv>,
    dispatcher: Addr<Dispatcher>,
    /// Open connections of this domain on this node.
    active: usize,
    /// A `Take` is on its way to the queue.
    taking: bool,
    rate: Option<RateLimiter>,
    last_busy: Instant,
}

impl DomainThrottle {
    pub fn new(
        policy: Arc<DomainPolicy>,
        env: Arc<DeliveryEnv>,
        dispatcher: Addr<Dispatcher>,
    ) -> Self {
        let rate = policy.rate.map(|(count, per)| RateLimiter::new(count, per));
        DomainThrottle {
            policy,
            env,
            dispatcher,
            active: 0,
            taking: false,
            rate,
            last_busy: Instant::now(),
        }
    }

    /// Opens connections while the limits allow and the queue has work.
    fn fill(&mut self, ctx: &mut Context<Self>) {
        if self.taking || self.active >= self.policy.max_connections {
            return;
        }
        let Ok(permit) = self.env.node_slots.clone().try_acquire_owned() else {
            ctx.run_later(NODE_FULL_RETRY, |throttle, ctx| throttle.fill(ctx));
            return;
        };
        self.taking = true;
        let take = self.env.queue.send(Take {
            domain: self.policy.domain.clone(),
            max: self.policy.max_messages_per_connection,
        });
        ctx.spawn(take.into_actor(self).map(move |jobs, throttle, ctx| {
            throttle.taking = false;
            let jobs = jobs.unwrap_or_default();
            if jobs.is_empty() {
                drop(permit);
                throttle.idle_check(ctx);
                return;
            }
            throttle.active += 1;
            throttle.last_busy = Instant::now();
            Delivery::new(
                throttle.policy.clone(),
                jobs,
                throttle.env.clone(),
                ctx.address(),
                permit,
            )
            .start();
            throttle.fill(ctx);
        }));
    }

    fn idle_check(&mut self, ctx: &mut Context<Self>) {
        if self.active > 0 {
            return;
        }
        ctx.run_later(IDLE_STOP, |throttle, ctx| {
            if throttle.active == 0 && !throttle.taking && throttle.last_busy.elapsed() >= IDLE_STOP
            {
                throttle.dispatcher.do_send(ThrottleIdle {
                    domain: throttle.policy.domain.clone(),
                    throttle: ctx.address(),
                });
                ctx.stop();
            }
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

    fn handle(&mut self, _: Wake, ctx: &mut Context<Self>) {
        self.last_busy = Instant::now();
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

impl Handler<RatePermit> for DomainThrottle {
    type Result = ResponseFuture<()>;

    /// Reserves a slot under the domain's rate and answers when it comes.
    fn handle(&mut self, _: RatePermit, _: &mut Context<Self>) -> Self::Result {
        let wait = self
            .rate
            .as_mut()
            .map_or(Duration::ZERO, |rate| rate.reserve(Instant::now()));
        Box::pin(async move {
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_spaces_messages_evenly() {
        let mut rate = RateLimiter::new(50, Duration::from_secs(1));
        let t0 = Instant::now();
        let waits: Vec<u128> = (0..4).map(|_| rate.reserve(t0).as_millis()).collect();
        assert_eq!(waits, [0, 20, 40, 60]);
        // Later callers wait only for what is still reserved.
        assert_eq!(rate.reserve(t0 + Duration::from_millis(50)).as_millis(), 30);
        // After a pause there is no burst credit: the next slot is now.
        assert_eq!(rate.reserve(t0 + Duration::from_secs(10)), Duration::ZERO);
        assert_eq!(
            rate.reserve(t0 + Duration::from_secs(10)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn hourly_rates_work_too() {
        let mut rate = RateLimiter::new(1000, Duration::from_secs(3600));
        let t0 = Instant::now();
        rate.reserve(t0);
        assert_eq!(rate.reserve(t0), Duration::from_millis(3600));
    }
}
