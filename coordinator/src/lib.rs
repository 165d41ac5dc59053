//! The smarthost control plane: node membership, reclaiming the work of dead
//! nodes, promoting due retries and the cluster-wide admin API. It is built
//! with the Redis queue; a single node runs without it.
//!
//! Every node runs a [`Coordinator`]; one of them at a time leads and runs
//! the cluster-wide jobs.
//!
//! - [`membership`]: nodes record heartbeats in Redis (Redis's clock, one
//!   round trip); [`membership::is_alive`] is the pure rule that splits the
//!   known nodes into live and dead.
//! - [`leader`]: the leader lease (`SET NX PX`, compare-and-renew,
//!   compare-and-release) and its fencing tokens, which keep a coordinator
//!   that was paused past its lease from acting on stale authority.
//! - [`redis`]: the connection (reconnecting, every request bounded by the
//!   response timeout, every failure a [`CoordError`]).
//! - This file: the [`Coordinator`] actor, a thin shell that runs the plain
//!   structs above on timers and answers [`GetStatus`]. While it leads it
//!   sends a [`LeaderTick`] every `job_interval` to whoever runs the
//!   cluster-wide jobs (the node's queue: reclaiming the work of dead nodes
//!   and expired leases, promoting due retries, expiring old deliveries,
//!   rescanning the spool), so those run on one node at a time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;

pub mod leader;
pub mod membership;
pub mod redis;

use leader::{Leader, Lease};
use membership::{Members, Membership, NodeInfo};

/// Asks a [`Coordinator`] what it knows.
#[derive(Message, Debug)]
#[rtype(result = "Status")]
pub struct GetStatus;

/// Gives up leadership (releasing the lease, so that another coordinator
/// takes over at once) and stops the actor.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Shutdown;

/// Sent while this coordinator leads, every `job_interval`: run the
/// cluster-wide jobs now. The receiver checks `valid_until` before each
/// step, so a coordinator paused past its lease does not act on it.
#[derive(Message, Clone, Debug)]
#[rtype(result = "()")]
pub struct LeaderTick {
    /// The fencing token of the lease.
    pub token: u64,
    /// Until when the lease may be relied on (local clock).
    pub valid_until: Instant,
    /// Nodes whose heartbeat is older than the node TTL (or that stopped):
    /// their in-flight work may be reclaimed at once.
    pub dead: Vec<String>,
    /// The lease holders of those nodes' dead processes
    /// ([`Members::dead_holders`]): what may be reclaimed. A process that
    /// restarted under a dead node's id holds its leases under another
    /// holder, so a tick that is seconds old leaves them alone.
    pub dead_holders: Vec<String>,
}

impl LeaderTick {
    /// Whether the lease behind this tick still holds.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// Why a coordinator operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    /// Redis cannot be reached, answered with an error or too late. The
    /// operation may be tried again; nothing was assumed.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The leader lease with this token is no longer ours (it expired or
    /// another coordinator took over): stop acting as leader.
    #[error("the leader lease with token {token} is lost")]
    LeaseLost { token: u64 },
    /// Redis answered with something this release cannot read.
    #[error("unexpected data in redis: {0}")]
    Corrupt(String),
}

/// A coordinator's view, for the admin API and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub node_id: String,
    /// Whether this coordinator holds a valid leader lease.
    pub leader: bool,
    /// The node whose coordinator leads, as last seen (`None`: nobody).
    pub leader_node: Option<String>,
    /// The fencing token of that lease.
    pub token: Option<u64>,
    /// Live and dead node ids as last read from Redis.
    pub live: Vec<String>,
    pub dead: Vec<String>,
    /// The last Redis failure, until an operation succeeds again.
    pub last_error: Option<String>,
}

/// Timers and TTLs of a [`Coordinator`].
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub node_id: String,
    pub info: NodeInfo,
    /// How often this node heartbeats.
    pub heartbeat_interval: Duration,
    /// A node silent for longer is dead.
    pub node_ttl: Duration,
    /// How long a leader lease lasts; it is renewed every third of it.
    pub leader_ttl: Duration,
    /// How often the leader runs its jobs (and every coordinator reads the
    /// membership).
    pub tick_interval: Duration,
    /// Whether this coordinator contends for leadership. A data-plane-only
    /// process (`smarthost node`) heartbeats but never leads.
    pub lead: bool,
    /// How often the leader sends its [`LeaderTick`].
    pub job_interval: Duration,
    /// A node dead for longer is dropped from the membership by the
    /// leader (its work was reclaimed long before).
    pub forget_after: Duration,
}

impl CoordinatorOptions {
    pub fn new(node_id: impl Into<String>) -> CoordinatorOptions {
        let node_id = node_id.into();
        CoordinatorOptions {
            info: NodeInfo::new(node_id.clone()),
            node_id,
            heartbeat_interval: Duration::from_secs(5),
            node_ttl: Duration::from_secs(30),
            leader_ttl: Duration::from_secs(15),
            tick_interval: Duration::from_secs(5),
            lead: true,
            job_interval: Duration::from_secs(1),
            forget_after: Duration::from_secs(60 * 60),
        }
    }
}

/// Runs membership and leadership for one node. Each step is one future at
/// a time: a step whose previous run is still waiting on Redis is skipped.
pub struct Coordinator {
    options: CoordinatorOptions,
    membership: Arc<Membership>,
    leader: Arc<Leader>,
    lease: Option<Lease>,
    members: Members,
    last_error: Option<String>,
    jobs: Option<Recipient<LeaderTick>>,
    /// Dead nodes already logged as such.
    reported_dead: std::collections::HashSet<String>,
    /// The node that led at the last membership read, when not this one.
    other_leader: Option<String>,
    /// Consecutive membership reads that found no leader at all.
    leaderless_ticks: u32,
    heartbeat_busy: bool,
    leadership_busy: bool,
    tick_busy: bool,
}

impl Coordinator {
    /// A coordinator for `options.node_id` using `redis`; its leader holder
    /// id is the node id and a random suffix, so a restarted process never
    /// mistakes an old lease for its own.
    pub fn new(redis: redis::Redis, options: CoordinatorOptions) -> Coordinator {
        let membership = Membership::new(redis.clone(), &options.node_id, options.node_ttl)
            .with_info(options.info.clone());
        let holder = format!("{}/{:016x}", options.node_id, rand::random::<u64>());
        let leader = Leader::new(redis, holder, options.leader_ttl);
        Coordinator {
            options,
            membership: Arc::new(membership),
            leader: Arc::new(leader),
            lease: None,
            members: Members::default(),
            last_error: None,
            jobs: None,
            reported_dead: Default::default(),
            other_leader: None,
            leaderless_ticks: 0,
            heartbeat_busy: false,
            leadership_busy: false,
            tick_busy: false,
        }
    }

    /// Sends [`LeaderTick`]s to `jobs` while this coordinator leads.
    pub fn with_jobs(mut self, jobs: Recipient<LeaderTick>) -> Coordinator {
        self.jobs = Some(jobs);
        self
    }

    /// This coordinator's membership, e.g. to [`Membership::join`] before
    /// the actor starts.
    pub fn membership(&self) -> Arc<Membership> {
        self.membership.clone()
    }

    fn valid_lease(&self) -> Option<&Lease> {
        self.lease.as_ref().filter(|l| l.is_valid(Instant::now()))
    }

    fn failed(&mut self, what: &str, error: CoordError) {
        tracing::warn!(node = %self.options.node_id, error = %error, "coordinator: {what} failed");
        self.last_error = Some(error.to_string());
    }

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        if self.heartbeat_busy {
            return;
        }
        self.heartbeat_busy = true;
        let membership = self.membership.clone();
        let step = async move { membership.heartbeat().await }
            .into_actor(self)
            .map(|result, act, _ctx| {
                act.heartbeat_busy = false;
                match result {
                    Ok(_) => act.last_error = None,
                    Err(e) => act.failed("heartbeat", e),
                }
            });
        ctx.spawn(step);
    }

    /// Renews the lease it holds, or tries to take one.
    fn leadership(&mut self, ctx: &mut Context<Self>) {
        if self.leadership_busy {
            return;
        }
        self.leadership_busy = true;
        let leader = self.leader.clone();
        let held = self.lease.clone();
        let step = async move {
            match held {
                Some(lease) => leader.renew(&lease).await.map(Some),
                None => leader.try_acquire().await,
            }
        }
        .into_actor(self)
        .map(|result, act, _ctx| {
            act.leadership_busy = false;
            let node = act.options.node_id.clone();
            match result {
                Ok(Some(lease)) => {
                    if act.lease.is_none() {
                        tracing::info!(node = %node, token = lease.token, "coordinator: leading");
                    }
                    act.lease = Some(lease);
                }
                Ok(None) => {}
                Err(CoordError::LeaseLost { token }) => {
                    tracing::warn!(node = %node, token, "coordinator: leadership lost");
                    act.lease = None;
                }
                Err(e) => {
                    act.failed("leadership", e);
                    // Without a renewal the lease runs out here too.
                    if act.valid_lease().is_none() && act.lease.take().is_some() {
                        tracing::warn!(node = %node, "coordinator: leadership lapsed");
                    }
                }
            }
        });
        ctx.spawn(step);
    }

    /// Reads the membership (and, when not leading, who leads); the leader
    /// then acts on it.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.tick_busy {
            return;
        }
        self.tick_busy = true;
        let membership = self.membership.clone();
        let leader = self.leader.clone();
        let leading = self.valid_lease().is_some();
        let step = async move {
            let members = membership.members().await?;
            let holder = match leading {
                true => None,
                false => leader.current_holder().await?,
            };
            Ok::<_, CoordError>((members, leading, holder))
        }
        .into_actor(self)
        .map(|result, act, ctx| {
            act.tick_busy = false;
            match result {
                Ok((members, leading, holder)) => {
                    act.members = members;
                    act.watch_leadership(leading || holder.is_some());
                    // A holder is `<node id>/<random>`.
                    act.other_leader = holder.map(|h| {
                        h.rsplit_once('/')
                            .map_or(h.clone(), |(node, _)| node.to_string())
                    });
                    if let Some(lease) = act.valid_lease() {
                        act.lead(lease.token, ctx);
                    }
                }
                Err(e) => act.failed("membership", e),
            }
        });
        ctx.spawn(step);
    }

    /// Warns when the cluster has had no leader for a while: nothing then
    /// promotes retries or reclaims the work of dead nodes.
    fn watch_leadership(&mut self, led: bool) {
        if led {
            self.leaderless_ticks = 0;
            return;
        }
        self.leaderless_ticks += 1;
        if self.leaderless_ticks % 6 == 3 {
            tracing::warn!(node = %self.options.node_id,
                "coordinator: no coordinator leads the cluster; retries are not promoted and dead nodes' work is not reclaimed until `smarthost coordinator` or `smarthost run` runs");
        }
    }

    /// Sends the queue its [`LeaderTick`] while the lease holds.
    fn send_jobs(&mut self, _: &mut Context<Self>) {
        let (Some(jobs), Some(lease)) = (&self.jobs, self.valid_lease()) else {
            return;
        };
        let tick = LeaderTick {
            token: lease.token,
            valid_until: lease.valid_until,
            dead: self.members.dead.iter().map(|n| n.id.clone()).collect(),
            dead_holders: self.members.dead_holders(),
        };
        if jobs.try_send(tick).is_err() {
            tracing::debug!("coordinator: the jobs are still busy, tick skipped");
        }
    }

    /// The leader's view of the membership: logs it and forgets nodes dead
    /// for longer than `forget_after` (their work was reclaimed by then).
    fn lead(&mut self, token: u64, ctx: &mut Context<Self>) {
        let ids = |nodes: &[membership::NodeSeen]| {
            nodes
                .iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let live: Vec<&String> = self.members.live.iter().map(|n| &n.id).collect();
        self.reported_dead.retain(|id| !live.contains(&id));
        tracing::debug!(
            node = %self.options.node_id,
            token,
            live = %ids(&self.members.live),
            dead = %ids(&self.members.dead),
            "coordinator: cluster members"
        );
        let forget_after = self.options.forget_after.as_millis() as u64;
        for dead in &self.members.dead {
            let silent_ms = self.members.now_ms.saturating_sub(dead.last_seen_ms);
            if silent_ms <= forget_after {
                if self.reported_dead.insert(dead.id.clone()) {
                    tracing::warn!(node = %dead.id, silent_ms,
                        "coordinator: node is dead; its work is reclaimed");
                }
                continue;
            }
            self.reported_dead.remove(&dead.id);
            let membership = self.membership.clone();
            let id = dead.id.clone();
            ctx.spawn(
                async move { (membership.forget(&id).await, id) }
                    .into_actor(self)
                    .map(|(result, id), act, _| match result {
                        Ok(true) => tracing::info!(node = %id, "coordinator: dead node forgotten"),
                        Ok(false) => {}
                        Err(e) => act.failed("forgetting a dead node", e),
                    }),
            );
        }
    }
}

impl Actor for Coordinator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(node = %self.options.node_id, holder = %self.leader.holder(),
            "coordinator: started");
        self.heartbeat(ctx);
        ctx.run_interval(self.options.heartbeat_interval, |act, ctx| {
            act.heartbeat(ctx)
        });
        if self.options.lead {
            self.leadership(ctx);
            ctx.run_interval(self.options.leader_ttl / 3, |act, ctx| act.leadership(ctx));
        }
        // The first membership read once the first heartbeat is in.
        ctx.run_later(
            self.options.tick_interval.min(Duration::from_secs(1)),
            |act, ctx| act.tick(ctx),
        );
        ctx.run_interval(self.options.tick_interval, |act, ctx| act.tick(ctx));
        if self.options.lead && self.jobs.is_some() {
            ctx.run_interval(self.options.job_interval, |act, ctx| act.send_jobs(ctx));
        }
    }
}

impl Handler<GetStatus> for Coordinator {
    type Result = MessageResult<GetStatus>;

    /// What this coordinator knows now; no Redis request.
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        let lease = self.valid_lease();
        let ids = |nodes: &[membership::NodeSeen]| nodes.iter().map(|n| n.id.clone()).collect();
        MessageResult(Status {
            node_id: self.options.node_id.clone(),
            leader: lease.is_some(),
            leader_node: match lease {
                Some(_) => Some(self.options.node_id.clone()),
                None => self.other_leader.clone(),
            },
            token: lease.map(|l| l.token),
            live: ids(&self.members.live),
            dead: ids(&self.members.dead),
            last_error: self.last_error.clone(),
        })
    }
}

impl Handler<Shutdown> for Coordinator {
    type Result = ResponseActFuture<Self, ()>;

    /// Releases a held lease and marks the node stopped (best effort: both
    /// expire anyway), then stops.
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let leader = self.leader.clone();
        let membership = self.membership.clone();
        let lease = self.lease.take();
        Box::pin(
            async move {
                let released = match lease {
                    Some(lease) => leader.release(lease).await,
                    None => Ok(()),
                };
                membership.stop().await?;
                released
            }
            .into_actor(self)
            .map(|result, act, ctx| {
                if let Err(e) = result {
                    act.failed("releasing the leadership", e);
                }
                ctx.stop();
            }),
        )
    }
}
