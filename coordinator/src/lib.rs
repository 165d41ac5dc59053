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
//!   structs above on timers and answers [`GetStatus`]. The jobs that reclaim
//!   dead nodes' work and promote due retries plug into its leader tick once
//!   the queue lives in Redis.

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
            heartbeat_busy: false,
            leadership_busy: false,
            tick_busy: false,
        }
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

    /// Reads the membership; the leader then acts on it.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.tick_busy {
            return;
        }
        self.tick_busy = true;
        let membership = self.membership.clone();
        let step = async move { membership.members().await }
            .into_actor(self)
            .map(|result, act, _ctx| {
                act.tick_busy = false;
                match result {
                    Ok(members) => {
                        act.members = members;
                        if let Some(lease) = act.valid_lease() {
                            act.lead(lease.token);
                        }
                    }
                    Err(e) => act.failed("membership", e),
                }
            });
        ctx.spawn(step);
    }

    /// The leader's periodic work. For now it reports the membership; the
    /// reaper (reclaim and then forget dead nodes' work, fenced with
    /// `token`) and the retry promoter run here once the queue is in Redis.
    fn lead(&self, token: u64) {
        let ids = |nodes: &[membership::NodeSeen]| {
            nodes
                .iter()
                .map(|n| n.id.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        tracing::info!(
            node = %self.options.node_id,
            token,
            live = %ids(&self.members.live),
            dead = %ids(&self.members.dead),
            "coordinator: cluster members"
        );
        for dead in &self.members.dead {
            tracing::warn!(
                node = %dead.id,
                silent_ms = self.members.now_ms.saturating_sub(dead.last_seen_ms),
                "coordinator: node is dead"
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
        ctx.run_interval(self.options.tick_interval, |act, ctx| act.tick(ctx));
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
            token: lease.map(|l| l.token),
            live: ids(&self.members.live),
            dead: ids(&self.members.dead),
            last_error: self.last_error.clone(),
        })
    }
}

impl Handler<Shutdown> for Coordinator {
    type Result = ResponseActFuture<Self, ()>;

    /// Releases a held lease (best effort: it expires anyway), then stops.
    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> Self::Result {
        let leader = self.leader.clone();
        let lease = self.lease.take();
        Box::pin(
            async move {
                match lease {
                    Some(lease) => leader.release(lease).await,
                    None => Ok(()),
                }
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
