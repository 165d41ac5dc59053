//! The DomainThrottle actor: how many connections one destination domain
//! gets, how fast messages go to it, and how many messages share a
//! connection. It pulls due deliveries from the queue only when it may open
//! a connection, so work waits in the queue, never in a mailbox.
//!
//! The limits themselves live behind [`DomainLimits`] (in-process or
//! cluster-wide); the throttle opens a connection only under a lease and
//! with a node-wide permit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::OwnedSemaphorePermit;

use crate::delivery::connection::{Delivery, DeliveryEnv};
use crate::delivery::DomainPolicy;
use crate::dispatcher::{Dispatcher, ThrottleIdle};
use crate::limits::{ConnectionLease, LimitError};
use crate::queue::Take;

/// There may be due work for this domain.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Wake;

/// A delivery connection of this domain has closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ConnectionDone;

/// Answers when the next message to this domain may be sent, or with the
/// error that kept the rate from being read (then the message waits).
#[derive(Message)]
#[rtype(result = "Result<(), LimitError>")]
pub struct RatePermit;

/// A throttle with no connection for this long stops.
const IDLE_STOP: Duration = Duration::from_secs(30);

/// When the node-wide connection limit is reached, look again after this.
const NODE_FULL_RETRY: Duration = Duration::from_millis(200);

/// When the domain's connection cap is reached by other nodes (whose
/// connections end without telling this one), look again after this.
const CAP_FULL_RETRY: Duration = Duration::from_millis(500);

/// When the limits cannot be read, open nothing and look again after this.
const LIMITS_RETRY: Duration = Duration::from_secs(2);

pub struct DomainThrottle {
    policy: Arc<DomainPolicy>,
    env: Arc<DeliveryEnv>,
    dispatcher: Addr<Dispatcher>,
    /// Open connections of this domain on this node.
    active: usize,
    /// A lease or a `Take` is on its way.
    taking: bool,
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
            env,
            dispatcher,
            active: 0,
            taking: false,
            last_busy: Instant::now(),
        }
    }

    /// Opens connections while the limits allow and the queue has work:
    /// a node-wide permit, then a lease on one of the domain's slots, then
    /// work from the queue.
    fn fill(&mut self, ctx: &mut Context<Self>) {
        if self.taking || self.active >= self.policy.max_connections {
            return;
        }
        let Ok(permit) = self.env.node_slots.clone().try_acquire_owned() else {
            ctx.run_later(NODE_FULL_RETRY, |throttle, ctx| throttle.fill(ctx));
            return;
        };
        self.taking = true;
        let limits = self.env.limits.clone();
        let domain = self.policy.domain.clone();
        let cap = self.policy.max_connections;
        let acquire = async move { limits.acquire_connection(&domain, cap).await };
        ctx.spawn(
            acquire
                .into_actor(self)
                .map(move |lease, throttle, ctx| match lease {
                    Ok(Some(lease)) => throttle.take(lease, permit, ctx),
                    Ok(None) => {
                        throttle.taking = false;
                        drop(permit);
                        ctx.run_later(CAP_FULL_RETRY, |throttle, ctx| throttle.fill(ctx));
                    }
                    Err(error) => {
                        throttle.taking = false;
                        drop(permit);
                        tracing::warn!(domain = %throttle.policy.domain, %error,
                            "no connection lease, opening no connection");
                        ctx.run_later(LIMITS_RETRY, |throttle, ctx| throttle.fill(ctx));
                    }
                }),
        );
    }

    /// Takes work for a connection under `lease`; starts the connection
    /// if there is some, else gives the lease back.
    fn take(
        &mut self,
        lease: ConnectionLease,
        permit: OwnedSemaphorePermit,
        ctx: &mut Context<Self>,
    ) {
        let take = self.env.queue.send(Take {
            domain: self.policy.domain.clone(),
            max: self.policy.max_messages_per_connection,
        });
        ctx.spawn(take.into_actor(self).map(move |jobs, throttle, ctx| {
            throttle.taking = false;
            let jobs = jobs.unwrap_or_default();
            crate::metrics::delivery_take(jobs.len());
            if jobs.is_empty() {
                let limits = throttle.env.limits.clone();
                let release = async move {
                    if let Err(error) = limits.release(lease).await {
                        tracing::warn!(%error, "cannot release a connection lease");
                    }
                };
                ctx.spawn(release.into_actor(throttle));
                drop(permit);
                throttle.idle_check(ctx);
                return;
            }
            throttle.active += 1;
            throttle.last_busy = Instant::now();
            let (policy, env, me) = (throttle.policy.clone(), throttle.env.clone(), ctx.address());
            throttle
                .env
                .workers
                .start_actor(move |_| Delivery::new(policy, jobs, env, me, permit, lease));
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
    type Result = ResponseFuture<Result<(), LimitError>>;

    /// Reserves a slot under the domain's rate and answers when it comes.
    fn handle(&mut self, _: RatePermit, _: &mut Context<Self>) -> Self::Result {
        let Some((count, per)) = self.policy.rate else {
            return Box::pin(async { Ok(()) });
        };
        let limits = self.env.limits.clone();
        let domain = self.policy.domain.clone();
        Box::pin(async move {
            let wait = limits.reserve_rate(&domain, count, per).await?;
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            Ok(())
        })
    }
}
