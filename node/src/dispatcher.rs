//! The Dispatcher actor: one [`DomainThrottle`] per destination domain with
//! work, created when the queue announces the domain and dropped when the
//! throttle has been idle for a while.

use std::collections::HashMap;
use std::sync::Arc;

use actix::prelude::*;

use crate::delivery::connection::DeliveryEnv;
use crate::delivery::DomainPolicy;
use crate::throttle::{DomainThrottle, Wake};

/// The queue has due deliveries for this domain.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DomainReady(pub String);

/// A throttle stopped after being idle.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ThrottleIdle {
    pub domain: String,
    pub throttle: Addr<DomainThrottle>,
}

pub struct Dispatcher {
    env: Arc<DeliveryEnv>,
    throttles: HashMap<String, Addr<DomainThrottle>>,
}

impl Dispatcher {
    pub fn new(env: Arc<DeliveryEnv>) -> Self {
        Dispatcher {
            env,
            throttles: HashMap::new(),
        }
    }
}

impl Actor for Dispatcher {
    type Context = Context<Self>;
}

impl Handler<DomainReady> for Dispatcher {
    type Result = ();

    /// Wakes the domain's throttle, starting one with the domain's policy
    /// if there is none.
    fn handle(&mut self, DomainReady(domain): DomainReady, ctx: &mut Context<Self>) {
        let throttle = match self.throttles.get(&domain) {
            Some(throttle) if throttle.connected() => throttle.clone(),
            _ => {
                let policy = DomainPolicy::for_domain(&self.env.config, &domain);
                tracing::debug!(%domain, ?policy.route, "starting a throttle");
                let throttle =
                    DomainThrottle::new(Arc::new(policy), self.env.clone(), ctx.address()).start();
                self.throttles.insert(domain, throttle.clone());
                throttle
            }
        };
        // A full mailbox means a wake is already pending.
        let _ = throttle.try_send(Wake);
    }
}

impl Handler<ThrottleIdle> for Dispatcher {
    type Result = ();

    fn handle(&mut self, msg: ThrottleIdle, _: &mut Context<Self>) {
        if self.throttles.get(&msg.domain) == Some(&msg.throttle) {
            self.throttles.remove(&msg.domain);
        }
    }
}
