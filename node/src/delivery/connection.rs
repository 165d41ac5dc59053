//! The Delivery actor: one outbound connection (or one pass over a local
//! drop directory) carrying up to `max_messages_per_connection` messages of
//! one domain. It reports each message's outcome to the queue and waits
//! until that is durable before it sends the next one. It starts with the
//! throttle's take and takes more from the queue as it runs out, sized by
//! the domain's [`Pace`], so that it never holds more than a free slot
//! elsewhere could be sending.
//!
//! It holds a lease on one of the domain's connection slots, renews it on
//! a timer while it lives (if the lease expires) and gives it back when it
//! is done. A lease that was lost or could not be renewed in time ends the
//! connection after the message in hand; the rest goes back to the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use std::collections::{HashMap, VecDeque};

use smarthost_proto::envelope::{MessageId, MessageRecord};

use crate::config::Config;
use crate::delivery::outbound::{Outbound, OutboundSettings, TlsClients};
use crate::delivery::route::{RouteError, Router};
use crate::delivery::slots::{NodeSlots, Slot};
use crate::delivery::{maildir, DomainPolicy, Job, MessageOutcome, RcptOutcome, RcptResult, Route};
use crate::limits::{first_renewal, ConnectionLease, DomainLimits, LeaseHealth, LimitError};
use crate::queue::{Queue, Release, Report, Take};
use crate::spool::{Body, Spool, SpoolError};
use crate::suppression::{address_key, is_hard_bounce, Entry, Scope, Source, Suppressions};
use crate::throttle::{ConnectionDone, DomainShared, DomainThrottle, Pace, IDLE_WAIT};

/// What every delivery of a node shares.
pub struct DeliveryEnv {
    pub config: Arc<Config>,
    pub spool: Arc<dyn Spool>,
    pub queue: Addr<Queue>,
    pub router: Router,
    pub tls: TlsClients,
    /// `delivery.max_connections`: one slot per open outbound connection.
    pub node_slots: Arc<NodeSlots>,
    /// Per-domain connection caps and rates (this node's or the cluster's).
    pub limits: Arc<dyn DomainLimits>,
    /// Addresses not to send to.
    pub suppressions: Arc<dyn Suppressions>,
    /// Set when the node stops: a connection finishes the message it is
    /// sending and hands back the rest untried.
    pub stopping: Arc<AtomicBool>,
    /// The threads the connections run on.
    pub workers: crate::workers::Workers,
    /// Copies of the bodies this node just stored, read before the spool.
    pub bodies: Arc<crate::body_cache::BodyCache>,
}

pub struct Delivery {
    work: Option<Work>,
    lease: Arc<HeldLease>,
}

/// The connection's lease and what is known about it, shared by the
/// renewal timer and the delivery loop.
struct HeldLease {
    lease: ConnectionLease,
    health: Mutex<LeaseHealth>,
    /// Being given back: a renewal that races with it finds it gone.
    released: AtomicBool,
}

impl HeldLease {
    /// Validity counts from when the lease was requested: the backend's
    /// TTL may have started then, well before the queue handed out work.
    fn new(lease: ConnectionLease) -> HeldLease {
        HeldLease {
            health: Mutex::new(LeaseHealth::of(&lease)),
            released: AtomicBool::new(false),
            lease,
        }
    }

    fn usable(&self) -> bool {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .usable(Instant::now())
    }
}

struct Work {
    policy: Arc<DomainPolicy>,
    jobs: Vec<(Arc<MessageRecord>, usize)>,
    env: Arc<DeliveryEnv>,
    throttle: Addr<DomainThrottle>,
    slot: Slot,
    lease: Arc<HeldLease>,
    shared: Arc<DomainShared>,
}

impl Delivery {
    pub fn new(
        policy: Arc<DomainPolicy>,
        jobs: Vec<(Arc<MessageRecord>, usize)>,
        env: Arc<DeliveryEnv>,
        throttle: Addr<DomainThrottle>,
        slot: Slot,
        lease: ConnectionLease,
        shared: Arc<DomainShared>,
    ) -> Self {
        let lease = Arc::new(HeldLease::new(lease));
        Delivery {
            work: Some(Work {
                policy,
                jobs,
                env,
                throttle,
                slot,
                lease: lease.clone(),
                shared,
            }),
            lease,
        }
    }

    /// Renews the lease; a lost lease ends the connection after the
    /// message in hand, an unreachable backend leaves the old expiry.
    fn renew(&self, limits: Arc<dyn DomainLimits>, ctx: &mut Context<Self>) {
        let held = self.lease.clone();
        let renew = async move {
            if held.released.load(Ordering::SeqCst) {
                return;
            }
            let sent = Instant::now();
            let result = limits.renew(&held.lease).await;
            let mut health = held.health.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(()) => health.renewed(sent),
                Err(LimitError::LeaseLost(_)) if held.released.load(Ordering::SeqCst) => {}
                Err(error @ LimitError::LeaseLost(_)) => {
                    tracing::warn!(domain = %held.lease.domain, %error,
                        "connection lease lost, closing after the current message");
                    health.lost();
                }
                Err(error) => {
                    tracing::warn!(domain = %held.lease.domain, %error,
                        "cannot renew the connection lease");
                }
            }
        };
        ctx.spawn(renew.into_actor(self));
    }
}

impl Actor for Delivery {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(work) = self.work.take() else {
            ctx.stop();
            return;
        };
        // The first renewal is due a period after the lease was requested
        // (at once if the acquire and the take took that long), then
        // every period.
        let lease = &self.lease.lease;
        if let (Some(first), Some(every)) =
            (first_renewal(lease, Instant::now()), lease.renew_every)
        {
            let limits = work.env.limits.clone();
            ctx.run_later(first, move |delivery, ctx| {
                delivery.renew(limits.clone(), ctx);
                ctx.run_interval(every, move |delivery, ctx| {
                    delivery.renew(limits.clone(), ctx)
                });
            });
        }
        ctx.spawn(run(work).into_actor(self).map(|(), _, ctx| ctx.stop()));
    }
}

async fn run(work: Work) {
    let Work {
        policy,
        jobs,
        env,
        throttle,
        slot,
        lease,
        shared,
    } = work;
    let carried = match &policy.route {
        Route::Local(dir) => deliver_local(dir, jobs, &env, &lease, &shared.pace).await,
        _ => deliver_remote(&policy, jobs, &env, &lease, &shared).await,
    };
    crate::metrics::connection_carried(carried);
    lease.released.store(true, Ordering::SeqCst);
    if let Err(error) = env.limits.release(lease.lease.clone()).await {
        tracing::warn!(domain = %policy.domain, %error, "cannot release the connection lease");
    }
    drop(slot);
    throttle.do_send(ConnectionDone);
}

async fn report(
    env: &DeliveryEnv,
    held: &HeldBack,
    record: &MessageRecord,
    delivery: usize,
    mut outcome: MessageOutcome,
) {
    if let Some(suppressed) = held.get(&record.id) {
        outcome.recipients.extend(suppressed.iter().cloned());
    }
    let domain = record.deliveries[delivery].domain.clone();
    let _ = env
        .queue
        .send(Report {
            id: record.id.clone(),
            domain,
            outcome,
        })
        .await;
}

/// Gives every job the same outcome (no route, no connection).
async fn report_all(
    env: &DeliveryEnv,
    held: &HeldBack,
    jobs: &[(Arc<MessageRecord>, usize)],
    result: RcptResult,
    text: &str,
    started: Instant,
) {
    for (record, delivery) in jobs {
        let outcome = MessageOutcome::all_of(record, *delivery, result, text, started.elapsed());
        report(env, held, record, *delivery, outcome).await;
    }
}

/// The body of a job's message, or `None` after reporting the job when it
/// cannot be read: deferred with the usual backoff if the spool cannot
/// read it now, failed (and so bounced, without a copy) if it is corrupt
/// or gone. Never handed back untried, which would make it due again at
/// once and open a connection per attempt.
async fn body_or_report(
    env: &DeliveryEnv,
    held: &HeldBack,
    record: &MessageRecord,
    delivery: usize,
    started: Instant,
) -> Option<Body> {
    if let Some(body) = env.bodies.take(&record.id) {
        return Some(body);
    }
    let error = match env.spool.read_body(&record.id).await {
        Ok(body) => return Some(body),
        Err(error) => error,
    };
    tracing::warn!(message_id = %record.id, %error, "cannot read a message body");
    let (result, text) = match error {
        SpoolError::Unavailable(_) => (
            RcptResult::Deferred,
            format!("451 4.3.0 cannot read the message from the spool: {error}"),
        ),
        SpoolError::NotFound(_) | SpoolError::Corrupt(_) => (
            RcptResult::Failed,
            format!("554 5.3.0 the message cannot be read from the spool: {error}"),
        ),
    };
    let outcome = MessageOutcome::all_of(record, delivery, result, &text, started.elapsed());
    report(env, held, record, delivery, outcome).await;
    None
}

fn release(env: &DeliveryEnv, record: &MessageRecord, delivery: usize) {
    env.queue.do_send(Release {
        id: record.id.clone(),
        domain: record.deliveries[delivery].domain.clone(),
    });
}

/// Sends the jobs over one connection, taking more of the domain's work
/// as they run out; answers how many messages the connection was given.
async fn deliver_remote(
    policy: &DomainPolicy,
    jobs: Vec<(Arc<MessageRecord>, usize)>,
    env: &DeliveryEnv,
    lease: &HeldLease,
    shared: &DomainShared,
) -> usize {
    let pace = &shared.pace;
    let started = Instant::now();
    let mut carried = jobs.len();
    let (jobs, mut held) = screen(env, jobs).await;
    // The first readable body before any connection: messages that cannot
    // be read cost none.
    let mut jobs = VecDeque::from(jobs);
    let mut first = None;
    while let Some((record, delivery)) = jobs.pop_front() {
        if let Some(body) = body_or_report(env, &held, &record, delivery, started).await {
            first = Some((record, delivery, body));
            break;
        }
    }
    let Some(first) = first else {
        return carried;
    };
    let all = |jobs: &VecDeque<(Arc<MessageRecord>, usize)>| {
        let mut all = vec![(first.0.clone(), first.1)];
        all.extend(jobs.iter().cloned());
        all
    };
    let hops = match env.router.next_hops(policy).await {
        Ok(hops) => hops,
        Err(RouteError::Permanent(why)) => {
            pace.unreachable();
            report_all(env, &held, &all(&jobs), RcptResult::Failed, &why, started).await;
            return carried;
        }
        Err(RouteError::Temporary(why)) => {
            pace.unreachable();
            report_all(env, &held, &all(&jobs), RcptResult::Deferred, &why, started).await;
            return carried;
        }
    };
    let settings = OutboundSettings::with_tls(&env.config, policy, &env.tls);
    let mut connection = match Outbound::connect(&hops, &settings).await {
        Ok(connection) => connection,
        Err(error) => {
            pace.unreachable();
            tracing::info!(domain = %policy.domain, %error, "no connection");
            let text = error.to_string();
            report_all(env, &held, &all(&jobs), error.result(), &text, started).await;
            return carried;
        }
    };
    let (record, delivery, body) = first;
    let mut next = Some((record, delivery, Some(body)));
    // Waited for work since the last take that found some.
    let mut idled = false;
    loop {
        let usable =
            connection.is_usable() && lease.usable() && !env.stopping.load(Ordering::SeqCst);
        let (record, delivery, body) = match next.take() {
            Some(job) => job,
            None => match jobs.pop_front() {
                Some((record, delivery)) => (record, delivery, None),
                None => {
                    let room = policy.max_messages_per_connection.saturating_sub(carried);
                    if !usable || room == 0 {
                        break;
                    }
                    let more = take_more(env, policy, pace.batch(room)).await;
                    if more.is_empty() {
                        // Waits a little for more, once per lull.
                        if idled || !env.node_slots.has_free() {
                            break;
                        }
                        idled = true;
                        if shared.idle.wait(IDLE_WAIT).await {
                            continue;
                        }
                        break;
                    }
                    idled = false;
                    carried += add_work(env, more, &mut jobs, &mut held).await;
                    continue;
                }
            },
        };
        if !usable {
            release(env, &record, delivery);
            continue;
        }
        let body = match body {
            Some(body) => body,
            None => match body_or_report(env, &held, &record, delivery, Instant::now()).await {
                Some(body) => body,
                None => continue,
            },
        };
        if let Err(error) = rate_permit(env, policy).await {
            tracing::warn!(domain = %policy.domain, %error, "no rate slot");
            release(env, &record, delivery);
            continue;
        }
        let job = Job {
            record: record.clone(),
            delivery,
            body: Arc::new(body),
        };
        // The next work is taken while this message goes out, so that the
        // connection does not wait for the queue between messages.
        let room = policy.max_messages_per_connection.saturating_sub(carried);
        let ahead = jobs.is_empty() && room > 0;
        let more = async {
            match ahead {
                true => take_more(env, policy, pace.batch(room)).await,
                false => Vec::new(),
            }
        };
        let (outcome, more) = tokio::join!(connection.send(&job), more);
        carried += add_work(env, more, &mut jobs, &mut held).await;
        pace.record(outcome.latency);
        learn_hard_bounces(env, &record, &outcome).await;
        report(env, &held, &record, delivery, outcome).await;
    }
    connection.quit().await;
    carried
}

/// Waits for a slot under the domain's rate (`rate` of its
/// `delivery.domains` entry), which the limits count across the cluster.
/// Here, not in the throttle: it needs none of the throttle's state, and
/// a message to the throttle and back for each message would wake its
/// thread twice.
async fn rate_permit(env: &DeliveryEnv, policy: &DomainPolicy) -> Result<(), LimitError> {
    let Some((count, per)) = policy.rate else {
        return Ok(());
    };
    let wait = env.limits.reserve_rate(&policy.domain, count, per).await?;
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    Ok(())
}

/// Up to `max` more due deliveries of the connection's domain; in flight
/// from now on, like the first.
async fn take_more(
    env: &DeliveryEnv,
    policy: &DomainPolicy,
    max: usize,
) -> Vec<(Arc<MessageRecord>, usize)> {
    let take = Take {
        domain: policy.domain.clone(),
        max,
    };
    env.queue.send(take).await.unwrap_or_default()
}

/// Screens work taken for a running connection and queues it behind what
/// it holds; answers how many messages it was given.
async fn add_work(
    env: &DeliveryEnv,
    more: Vec<(Arc<MessageRecord>, usize)>,
    jobs: &mut VecDeque<(Arc<MessageRecord>, usize)>,
    held: &mut HeldBack,
) -> usize {
    let given = more.len();
    if given > 0 {
        let (more, more_held) = screen(env, more).await;
        held.extend(more_held);
        jobs.extend(more);
    }
    given
}

/// Writes each message into the domain's drop directory.
async fn deliver_local(
    dir: &std::path::Path,
    jobs: Vec<(Arc<MessageRecord>, usize)>,
    env: &DeliveryEnv,
    lease: &HeldLease,
    pace: &Pace,
) -> usize {
    let carried = jobs.len();
    let (jobs, held) = screen(env, jobs).await;
    for (record, delivery) in jobs {
        if !lease.usable() {
            release(env, &record, delivery);
            continue;
        }
        let started = Instant::now();
        let Some(body) = body_or_report(env, &held, &record, delivery, started).await else {
            continue;
        };
        let dir = dir.to_path_buf();
        let job = Job {
            record: record.clone(),
            delivery,
            body: Arc::new(body),
        };
        let written = tokio::task::spawn_blocking(move || {
            let recipients: Vec<_> = job.recipients().map(|(_, r)| &r.address).collect();
            maildir::deliver(&dir, &job.record.id, &recipients, &job.body)
        })
        .await;
        let (result, text) = match written {
            Ok(Ok(path)) => (
                RcptResult::Delivered,
                format!("250 2.0.0 written to {}", path.display()),
            ),
            Ok(Err(error)) => (
                RcptResult::Deferred,
                format!("451 4.3.0 cannot write to the drop directory: {error}"),
            ),
            Err(error) => (
                RcptResult::Deferred,
                format!("451 4.3.0 local delivery failed: {error}"),
            ),
        };
        let outcome = MessageOutcome::all_of(&record, delivery, result, &text, started.elapsed());
        pace.record(outcome.latency);
        report(env, &held, &record, delivery, outcome).await;
    }
    carried
}

/// The outcomes of recipients the suppression list held back, by
/// message: reported with the rest of the message's outcome.
type HeldBack = HashMap<MessageId, Vec<RcptOutcome>>;

/// Takes the suppressed recipients out of `jobs`, with one lookup per
/// sending account: a job left with none is reported failed at once,
/// without a connection; one left with some goes on with a copy of its
/// record that names only those. When the list cannot be read, mail goes
/// out as if nothing were suppressed.
async fn screen(
    env: &DeliveryEnv,
    jobs: Vec<(Arc<MessageRecord>, usize)>,
) -> (Vec<(Arc<MessageRecord>, usize)>, HeldBack) {
    let mut by_account: HashMap<Option<&str>, Vec<(usize, u32, String)>> = HashMap::new();
    for (i, (record, delivery)) in jobs.iter().enumerate() {
        let account = record.client.auth_user.as_deref();
        for &recipient in &record.deliveries[*delivery].recipients {
            let address = &record.envelope.recipients[recipient as usize].address;
            by_account
                .entry(account)
                .or_default()
                .push((i, recipient, address_key(address)));
        }
    }
    let mut suppressed: HashMap<usize, Vec<RcptOutcome>> = HashMap::new();
    for (account, asked) in &by_account {
        let addresses: Vec<String> = asked.iter().map(|(_, _, a)| a.clone()).collect();
        match env.suppressions.find(*account, &addresses).await {
            Ok(found) => {
                for ((job, recipient, address), _) in
                    asked.iter().zip(found).filter(|(_, hit)| *hit)
                {
                    crate::metrics::recipient_suppressed("delivery");
                    suppressed.entry(*job).or_default().push(RcptOutcome {
                        recipient: *recipient,
                        result: RcptResult::Failed,
                        reply: crate::suppression::refusal(address),
                    });
                }
            }
            Err(error) => tracing::warn!(%error, "suppression list not read; sending anyway"),
        }
    }
    if suppressed.is_empty() {
        return (jobs, HeldBack::new());
    }
    let mut held = HeldBack::new();
    let mut left = Vec::with_capacity(jobs.len());
    for (i, (record, delivery)) in jobs.into_iter().enumerate() {
        let Some(outcomes) = suppressed.remove(&i) else {
            left.push((record, delivery));
            continue;
        };
        let remaining: Vec<u32> = record.deliveries[delivery]
            .recipients
            .iter()
            .copied()
            .filter(|r| !outcomes.iter().any(|o| o.recipient == *r))
            .collect();
        if remaining.is_empty() {
            let outcome = MessageOutcome {
                recipients: outcomes,
                remote: None,
                latency: std::time::Duration::ZERO,
            };
            report(env, &held, &record, delivery, outcome).await;
            continue;
        }
        let mut copy = (*record).clone();
        copy.deliveries[delivery].recipients = remaining;
        held.insert(record.id.clone(), outcomes);
        left.push((Arc::new(copy), delivery));
    }
    (left, held)
}

/// Adds the recipients the server said do not exist (`5.1.x`) to the
/// suppression list of the message's account (the global one for mail
/// from no account).
async fn learn_hard_bounces(env: &DeliveryEnv, record: &MessageRecord, outcome: &MessageOutcome) {
    if !env.config.suppression.learn_from_bounces {
        return;
    }
    let at_ms = crate::now_ms();
    let entries: Vec<Entry> = outcome
        .recipients
        .iter()
        .filter(|o| o.result == RcptResult::Failed && is_hard_bounce(&o.reply))
        .filter_map(|o| {
            let recipient = record.envelope.recipients.get(o.recipient as usize)?;
            Some(Entry {
                address: address_key(&recipient.address),
                reason: o.reply.clone(),
                source: Source::Bounce,
                at_ms,
            })
        })
        .collect();
    if entries.is_empty() {
        return;
    }
    let scope = Scope::of(record.client.auth_user.as_deref());
    let count = entries.len();
    match env.suppressions.add(&scope, entries).await {
        Ok(_) => crate::metrics::suppressions_added("bounce", count),
        Err(error) => tracing::warn!(%error, "hard bounces not added to the suppression list"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use smarthost_testkit::redis::RedisServer;

    use super::*;
    use crate::limits::{RedisLimits, RedisLimitsOptions};

    /// A lease whose acquire and take were slow: the holder must not
    /// believe it valid past the moment Redis lets another node have the
    /// slot.
    #[tokio::test]
    async fn a_lease_delayed_before_its_connection_is_not_trusted_past_its_redis_expiry() {
        let server = RedisServer::start();
        let options = RedisLimitsOptions {
            lease_ttl: Duration::from_millis(1500),
            renew_every: Duration::from_millis(500),
            ..RedisLimitsOptions::default()
        };
        let a = RedisLimits::open(&server.url(), "node-a", options.clone())
            .await
            .unwrap();
        let b = RedisLimits::open(&server.url(), "node-b", options)
            .await
            .unwrap();
        let lease = a
            .acquire_connection("example.org", 1)
            .await
            .unwrap()
            .expect("a slot");
        // The take of work for the connection takes a while.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let held = HeldLease::new(lease.clone());
        assert!(held.usable());
        assert_eq!(
            first_renewal(&lease, Instant::now()),
            Some(Duration::ZERO),
            "the connection renews at once: a renewal period has passed"
        );

        // Not renewed: once Redis gives the slot to node b, node a's
        // connection must no longer count on its lease.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(other) = b.acquire_connection("example.org", 1).await.unwrap() {
                assert!(
                    !held.usable(),
                    "two connections under a cap of one: {other:?} and {lease:?}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "the lease never expired");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
