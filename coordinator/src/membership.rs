//! Which nodes of the cluster are alive, by heartbeat.
//!
//! Every node records itself every few seconds ([`Membership::heartbeat`]):
//! its score in the sorted set [`NODES_KEY`] becomes the current time of the
//! Redis server, and its hash [`node_key`] holds what an operator wants to
//! see (host name, SMTP address, start time, version). Only Redis's clock is
//! used, so the clocks of the nodes may disagree without harm.
//!
//! A node whose last heartbeat is more than the TTL old is dead
//! ([`is_alive`]); its work is taken over by another node and then the
//! leader [`forget`](Membership::forget)s it.
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `smarthost:{cluster}:nodes` | sorted set | member the node id, score its last heartbeat in ms (Redis `TIME`) |
//! | `smarthost:{cluster}:node:<id>` | hash | `host`, `smtp`, `started_ms`, `version`, `instance`, `last_seen_ms` |
//!
//! A node id names one running process at a time: leases of deliveries are
//! held under it, and a node puts back leases under its id that it does not
//! run. [`Membership::join`] therefore refuses an id that another process
//! (another `instance`) heartbeats under, and [`Membership::stop`] marks a
//! node that shuts down as dead at once, so that its successor starts
//! without waiting and the leader reclaims what it left.
//!
//! A process holds its deliveries' leases as [`lease_holder`]: the node id
//! and the process's `instance`. The leader reclaims the leases of a dead
//! node by the instance that was dead when it looked
//! ([`Members::dead_holders`]), so a list that is a few seconds old never
//! matches the leases of a process that restarted under the same id
//! meanwhile.
//!
//! All keys share the `{cluster}` hash tag, so on Redis Cluster one script
//! may touch them together.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;

use crate::redis::{time_ms, Redis};
use crate::CoordError;

/// The sorted set of all known nodes by last heartbeat.
pub const NODES_KEY: &str = "smarthost:{cluster}:nodes";

/// The hash with what a node said about itself.
pub fn node_key(node: &str) -> String {
    format!("smarthost:{{cluster}}:node:{node}")
}

/// A fresh random `instance` for this process.
pub fn new_instance() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Whom the deliveries taken by process `instance` of `node` are leased to:
/// each process holds its own leases, so one that restarted under the same
/// id is never mistaken for the one that died.
pub fn lease_holder(node: &str, instance: &str) -> String {
    format!("{node}@{instance}")
}

/// The node of a [`lease_holder`]; a holder without an instance is a node
/// id already. The instance has no `@`; a node id may.
pub fn holder_node(holder: &str) -> &str {
    holder.rsplit_once('@').map_or(holder, |(node, _)| node)
}

/// Whether a node last seen at `last_seen_ms` is alive at `now_ms`: its
/// heartbeat is at most `ttl` old. A heartbeat from the future (the Redis
/// clock stepped back) counts as fresh.
pub fn is_alive(last_seen_ms: u64, now_ms: u64, ttl: Duration) -> bool {
    now_ms.saturating_sub(last_seen_ms) <= ttl.as_millis() as u64
}

/// What a node says about itself in its heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// The host (or pod) name the node runs on.
    pub host: String,
    /// The address its SMTP listener is bound to, `ip:port`.
    pub smtp: String,
    /// When the node started, ms since the Unix epoch (its own clock).
    pub started_ms: u64,
    /// The smarthost release it runs.
    pub version: String,
    /// Random per process: tells a second process with the same node id
    /// from a restart of this one.
    pub instance: String,
}

impl NodeInfo {
    /// Info for a node that says nothing more than its host name.
    pub fn new(host: impl Into<String>) -> NodeInfo {
        NodeInfo {
            host: host.into(),
            smtp: String::new(),
            started_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            version: env!("CARGO_PKG_VERSION").to_string(),
            instance: new_instance(),
        }
    }
}

/// What [`Membership::join`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Join {
    /// The id is this process's now (its first heartbeat is recorded).
    Joined,
    /// Another process heartbeats under this id; it was last seen
    /// `silent_ms` ago from `host`.
    InUse { host: String, silent_ms: u64 },
}

/// A node and its last heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSeen {
    pub id: String,
    pub last_seen_ms: u64,
    /// The process that heartbeated last, read together with its
    /// heartbeat (for a dead node; empty when not read).
    pub instance: String,
}

/// Every known node, split by [`is_alive`] at `now_ms` (Redis time), in id
/// order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub now_ms: u64,
    pub live: Vec<NodeSeen>,
    pub dead: Vec<NodeSeen>,
}

impl Members {
    /// Splits `nodes` (id, last heartbeat) by liveness at `now_ms`, each
    /// list in id order.
    pub fn classify(now_ms: u64, ttl: Duration, mut nodes: Vec<(String, u64)>) -> Members {
        nodes.sort();
        let mut members = Members {
            now_ms,
            ..Members::default()
        };
        for (id, last_seen_ms) in nodes {
            let seen = NodeSeen {
                id,
                last_seen_ms,
                instance: String::new(),
            };
            if is_alive(last_seen_ms, now_ms, ttl) {
                members.live.push(seen);
            } else {
                members.dead.push(seen);
            }
        }
        members
    }

    /// The lease holders whose deliveries may be reclaimed now: each dead
    /// node's process as it was when found dead (and the bare node id,
    /// which releases before per-process holders held leases under).
    pub fn dead_holders(&self) -> Vec<String> {
        let mut holders = Vec::new();
        for node in &self.dead {
            holders.push(node.id.clone());
            if !node.instance.is_empty() {
                holders.push(lease_holder(&node.id, &node.instance));
            }
        }
        holders
    }
}

/// Records the heartbeat in one round trip: the score and the hash take the
/// same Redis time. Returns that time.
static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'host', ARGV[2], 'smtp', ARGV[3], 'started_ms', ARGV[4],
  'version', ARGV[5], 'instance', ARGV[6], 'last_seen_ms', now)
return now
",
    )
});

/// KEYS: nodes, node hash. ARGV: id, instance, ttl ms. Returns {1} when no
/// other live instance holds the id, else {0, silent ms, host}.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
local other = redis.call('HGET', KEYS[2], 'instance')
if seen and other and other ~= ARGV[2] then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local silent = now - tonumber(seen)
  if silent <= tonumber(ARGV[3]) then
    return {0, math.max(silent, 0), redis.call('HGET', KEYS[2], 'host') or ''}
  end
end
return {1}
",
    )
});

/// KEYS: nodes, node hash. ARGV: id, instance. A node that stops scores 0:
/// dead at once. Only its own instance may do so. 1 if marked.
static STOP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HGET', KEYS[2], 'instance') ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[1], 'XX', 0, ARGV[1])
return 1
",
    )
});

/// Removes a node only if it is still dead by Redis time: a node that
/// heartbeated again since the caller looked is kept. 1 if it is gone.
static FORGET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if now - tonumber(seen) <= tonumber(ARGV[2]) then
    return 0
  end
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('DEL', KEYS[2])
return 1
",
    )
});

/// One node's view of the cluster's membership.
#[derive(Debug)]
pub struct Membership {
    redis: Redis,
    node_id: String,
    info: NodeInfo,
    ttl: Duration,
}

impl Membership {
    /// Membership for `node_id`; a node whose last heartbeat is more than
    /// `ttl` old is dead. Its info is its id as host name until
    /// [`Membership::with_info`].
    pub fn new(redis: Redis, node_id: impl Into<String>, ttl: Duration) -> Membership {
        let node_id = node_id.into();
        Membership {
            redis,
            info: NodeInfo::new(node_id.clone()),
            node_id,
            ttl,
        }
    }

    /// What this node's heartbeat says about it.
    pub fn with_info(mut self, info: NodeInfo) -> Membership {
        self.info = info;
        self
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Records this node as alive now (Redis time) with its info; one
    /// round trip. Returns the time recorded, ms since the epoch.
    pub async fn heartbeat(&self) -> Result<u64, CoordError> {
        let mut call = HEARTBEAT.prepare_invoke();
        call.key(NODES_KEY)
            .key(node_key(&self.node_id))
            .arg(&self.node_id)
            .arg(&self.info.host)
            .arg(&self.info.smtp)
            .arg(self.info.started_ms)
            .arg(&self.info.version)
            .arg(&self.info.instance);
        self.redis.invoke("heartbeat", &call).await
    }

    /// Claims the node id for this process: refuses while another instance
    /// heartbeated under it within the TTL, else records the first
    /// heartbeat. Two round trips.
    pub async fn join(&self) -> Result<Join, CoordError> {
        let mut call = JOIN.prepare_invoke();
        call.key(NODES_KEY)
            .key(node_key(&self.node_id))
            .arg(&self.node_id)
            .arg(&self.info.instance)
            .arg(self.ttl.as_millis() as u64);
        let reply: Vec<redis::Value> = self.redis.invoke("join", &call).await?;
        match reply.as_slice() {
            [redis::Value::Int(1)] => {
                self.heartbeat().await?;
                Ok(Join::Joined)
            }
            [redis::Value::Int(0), redis::Value::Int(silent), host] => Ok(Join::InUse {
                host: match host {
                    redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                    _ => String::new(),
                },
                silent_ms: (*silent).max(0) as u64,
            }),
            other => Err(CoordError::Corrupt(format!("join: {other:?}"))),
        }
    }

    /// Marks this node as stopped (dead at once) if its id is still this
    /// process's; one round trip. The leader then reclaims its work.
    pub async fn stop(&self) -> Result<bool, CoordError> {
        let mut call = STOP.prepare_invoke();
        call.key(NODES_KEY)
            .key(node_key(&self.node_id))
            .arg(&self.node_id)
            .arg(&self.info.instance);
        let stopped: i64 = self.redis.invoke("stop", &call).await?;
        Ok(stopped == 1)
    }

    /// Every known node, live and dead, at the current Redis time; one
    /// round trip, and a second one when some are dead: their heartbeats
    /// and instances are read again in one transaction, so that a dead
    /// node's instance is the one that was dead (a node that restarted
    /// meanwhile counts as live).
    pub async fn members(&self) -> Result<Members, CoordError> {
        let members = self.read_members().await?;
        if members.dead.is_empty() {
            return Ok(members);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for node in &members.dead {
            pipe.cmd("ZSCORE").arg(NODES_KEY).arg(&node.id);
            pipe.cmd("HGET").arg(node_key(&node.id)).arg("instance");
        }
        pipe.cmd("TIME");
        let mut replies: Vec<redis::Value> = self.redis.query_pipe("members", &pipe).await?;
        let time: Vec<String> = replies
            .pop()
            .map(redis::from_redis_value)
            .transpose()
            .map_err(|e| CoordError::Corrupt(format!("members: TIME {e}")))?
            .unwrap_or_default();
        let now_ms = time_ms(&time)?;
        let mut again = Members {
            now_ms,
            live: members.live,
            dead: Vec::new(),
        };
        for (node, pair) in members.dead.into_iter().zip(replies.chunks(2)) {
            let score: Option<f64> = redis::from_redis_value(pair[0].clone())
                .map_err(|e| CoordError::Corrupt(format!("members: ZSCORE {e}")))?;
            let instance: Option<String> = redis::from_redis_value(pair[1].clone())
                .map_err(|e| CoordError::Corrupt(format!("members: HGET {e}")))?;
            let Some(score) = score else { continue };
            let seen = NodeSeen {
                id: node.id,
                last_seen_ms: score as u64,
                instance: instance.unwrap_or_default(),
            };
            if is_alive(seen.last_seen_ms, now_ms, self.ttl) {
                again.live.push(seen);
            } else {
                again.dead.push(seen);
            }
        }
        again.live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(again)
    }

    /// [`Membership::members`] without reading the dead nodes' instances.
    async fn read_members(&self) -> Result<Members, CoordError> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME")
            .cmd("ZRANGE")
            .arg(NODES_KEY)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES");
        let (time, nodes): (Vec<String>, Vec<(String, f64)>) =
            self.redis.query_pipe("members", &pipe).await?;
        let now_ms = time_ms(&time)?;
        let nodes = nodes
            .into_iter()
            .map(|(id, score)| (id, score as u64))
            .collect();
        Ok(Members::classify(now_ms, self.ttl, nodes))
    }

    /// The nodes that heartbeated within the TTL.
    pub async fn live_nodes(&self) -> Result<Vec<NodeSeen>, CoordError> {
        Ok(self.members().await?.live)
    }

    /// The nodes whose last heartbeat is older than the TTL.
    pub async fn dead_nodes(&self) -> Result<Vec<NodeSeen>, CoordError> {
        Ok(self.members().await?.dead)
    }

    /// What `node` said about itself in its last heartbeat, if it is known.
    pub async fn info(&self, node: &str) -> Result<Option<NodeInfo>, CoordError> {
        let fields: std::collections::HashMap<String, String> = self
            .redis
            .query("node info", redis::cmd("HGETALL").arg(node_key(node)))
            .await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| fields.get(name).cloned().unwrap_or_default();
        let started_ms = field("started_ms").parse().map_err(|_| {
            CoordError::Corrupt(format!(
                "node {node}: started_ms {:?}",
                fields.get("started_ms")
            ))
        })?;
        Ok(Some(NodeInfo {
            host: field("host"),
            smtp: field("smtp"),
            started_ms,
            version: field("version"),
            instance: field("instance"),
        }))
    }

    /// Drops a dead node whose work has been reclaimed. Returns `false`,
    /// and keeps the node, if it heartbeated within the TTL after all.
    pub async fn forget(&self, node: &str) -> Result<bool, CoordError> {
        let mut call = FORGET.prepare_invoke();
        call.key(NODES_KEY)
            .key(node_key(node))
            .arg(node)
            .arg(self.ttl.as_millis() as u64);
        let forgotten: i64 = self.redis.invoke("forget", &call).await?;
        Ok(forgotten == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_names_its_node() {
        let instance = new_instance();
        assert!(!instance.contains('@'));
        for node in ["smarthost-0", "a@b", ""] {
            assert_eq!(holder_node(&lease_holder(node, &instance)), node);
        }
        assert_eq!(holder_node("node-a"), "node-a", "a bare node id");
    }

    #[test]
    fn alive_or_dead() {
        let ttl = Duration::from_secs(10);
        #[rustfmt::skip]
        let cases: &[(u64, u64, bool, &str)] = &[
            // last_seen, now, alive
            (1_000, 1_000, true, "just seen"),
            (1_000, 5_000, true, "within the ttl"),
            (1_000, 11_000, true, "exactly the ttl old"),
            (1_000, 11_001, false, "one ms past the ttl"),
            (1_000, 60_000, false, "long gone"),
            (9_000, 1_000, true, "seen in the future: the clock stepped back"),
            (0, 0, true, "the epoch"),
            (0, u64::MAX, false, "no overflow"),
        ];
        for &(last_seen, now, alive, why) in cases {
            assert_eq!(is_alive(last_seen, now, ttl), alive, "{why}");
        }
        assert!(!is_alive(1_000, 1_001, Duration::ZERO), "a zero ttl");
        assert!(
            is_alive(1_000, 1_000, Duration::ZERO),
            "a zero ttl, same ms"
        );
    }

    #[test]
    fn members_are_split_by_liveness() {
        let members = Members::classify(
            20_000,
            Duration::from_secs(10),
            vec![
                ("old".into(), 1_000),
                ("n2".into(), 10_000),
                ("n1".into(), 15_000),
            ],
        );
        let ids = |v: &[NodeSeen]| v.iter().map(|n| n.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&members.live), ["n1", "n2"]);
        assert_eq!(ids(&members.dead), ["old"]);
        assert_eq!(members.now_ms, 20_000);
    }

    #[test]
    fn keys_share_the_cluster_tag() {
        assert_eq!(node_key("n-1"), "smarthost:{cluster}:node:n-1");
        assert!(NODES_KEY.contains("{cluster}"));
    }
}
