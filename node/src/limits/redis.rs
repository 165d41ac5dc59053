//! The cluster-wide limits, kept in Redis.
//!
//! # Keys
//!
//! Both keys of a domain share the hash tag `{d:<domain>}`, so on Redis
//! Cluster they live in one slot with the domain's queue keys:
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `smarthost:{d:<domain>}:conns` | sorted set | member a lease id `<node>:<random hex>`, score its expiry (Redis time, ms) |
//! | `smarthost:{d:<domain>}:gcra` | string | the theoretical arrival time of the next message (Redis time, µs) |
//!
//! Each key expires by itself once nothing in it matters any more (the last
//! lease has run out, the last reserved slot has passed).
//!
//! # Semantics
//!
//! Every operation is one script run, atomic on the server, and reads the
//! time with `TIME` on the server, never the node's clock:
//!
//! - acquire: drop the expired leases, then add the new one with expiry
//!   `now + ttl` if fewer than `cap` remain;
//! - renew: set the expiry to `now + ttl` if the lease is still there and
//!   has not expired, else fail (an expired one is dropped);
//! - release: remove the lease;
//! - reserve: the slot is `max(tat, now)`, the new `tat` is
//!   `slot + per / count`, the wait is `slot - now`: the same reservations
//!   as [`super::RateLimiter`], shared by every node.
//!
//! # Failures
//!
//! A Redis error, a refused or lost connection and a reply that does not
//! come within the response timeout are [`LimitError::Unavailable`]. The
//! connection reconnects by itself (and reloads the scripts if the server
//! lost them).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Script;
use smarthost_coordinator::redis::Connection;

use super::{ConnectionLease, DomainLimits, LimitError};

pub fn conns_key(domain: &str) -> String {
    format!("smarthost:{{d:{domain}}}:conns")
}

pub fn gcra_key(domain: &str) -> String {
    format!("smarthost:{{d:{domain}}}:gcra")
}

/// KEYS[1] the leases; ARGV: cap, lease id, ttl in ms. Returns 1 if the
/// lease was added, 0 at the cap.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[3])), ARGV[2])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
";

/// KEYS[1] the leases; ARGV: lease id, ttl in ms. Returns 1 if renewed, 0
/// if the lease had expired or was gone.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry then
  return 0
end
if tonumber(expiry) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
return 1
";

/// KEYS[1] the theoretical arrival time; ARGV: the interval in µs.
/// Returns the wait in µs.
const RESERVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local slot = math.max(tat, now)
local next_tat = slot + tonumber(ARGV[1])
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.ceil((next_tat - now) / 1000) + 1)
return slot - now
";

/// How [`RedisLimits`] talks to its server and how long leases live.
#[derive(Clone, Debug)]
pub struct RedisLimitsOptions {
    /// The longest wait for a connection or for the reply to one
    /// operation (reconnecting included) before it is `Unavailable`.
    pub response_timeout: Duration,
    /// A lease not renewed for this long expires and frees its slot.
    pub lease_ttl: Duration,
    /// How often the holder of a lease renews it.
    pub renew_every: Duration,
    /// The URL lists seed nodes of a Redis Cluster, not one server.
    pub cluster: bool,
}

impl Default for RedisLimitsOptions {
    fn default() -> Self {
        RedisLimitsOptions {
            response_timeout: Duration::from_secs(5),
            lease_ttl: Duration::from_secs(30),
            renew_every: Duration::from_secs(10),
            cluster: false,
        }
    }
}

/// The Redis implementation of [`DomainLimits`].
pub struct RedisLimits {
    conn: Connection,
    node: String,
    options: RedisLimitsOptions,
    acquire: Script,
    renew: Script,
    reserve: Script,
}

impl std::fmt::Debug for RedisLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimits")
            .field("node", &self.node)
            .field("options", &self.options)
            .finish()
    }
}

impl RedisLimits {
    /// Connects to the server at `url`; lease ids start with `node`.
    pub async fn open(
        url: &str,
        node: &str,
        options: RedisLimitsOptions,
    ) -> Result<RedisLimits, LimitError> {
        let conn = crate::spool::redis::connect(url, options.cluster, options.response_timeout)
            .await
            .map_err(LimitError::Unavailable)?;
        Ok(RedisLimits {
            conn,
            node: node.to_string(),
            options,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            reserve: Script::new(RESERVE),
        })
    }

    /// The deadline of one round trip, reconnecting included.
    async fn bounded<T>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, LimitError> {
        crate::spool::redis::bounded(self.options.response_timeout, what, request)
            .await
            .map_err(LimitError::Unavailable)
    }

    fn new_lease_id(&self) -> String {
        format!("{}:{:032x}", self.node, rand::random::<u128>())
    }
}

fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

#[async_trait]
impl DomainLimits for RedisLimits {
    async fn acquire_connection(
        &self,
        domain: &str,
        cap: usize,
    ) -> Result<Option<ConnectionLease>, LimitError> {
        let id = self.new_lease_id();
        let mut conn = self.conn.clone();
        // Before the request: its TTL starts on the server no earlier.
        let requested = Instant::now();
        let added: i64 = self
            .bounded(
                "acquire",
                self.acquire
                    .key(conns_key(domain))
                    .arg(cap)
                    .arg(&id)
                    .arg(millis(self.options.lease_ttl))
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok((added == 1).then(|| ConnectionLease {
            domain: domain.to_string(),
            id,
            ttl: Some(self.options.lease_ttl),
            renew_every: Some(self.options.renew_every),
            requested,
        }))
    }

    async fn renew(&self, lease: &ConnectionLease) -> Result<(), LimitError> {
        let mut conn = self.conn.clone();
        let ttl = lease.ttl.unwrap_or(self.options.lease_ttl);
        let renewed: i64 = self
            .bounded(
                "renew",
                self.renew
                    .key(conns_key(&lease.domain))
                    .arg(&lease.id)
                    .arg(millis(ttl))
                    .invoke_async(&mut conn),
            )
            .await?;
        if renewed == 1 {
            Ok(())
        } else {
            Err(LimitError::LeaseLost(lease.id.clone()))
        }
    }

    async fn release(&self, lease: ConnectionLease) -> Result<(), LimitError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .bounded(
                "release",
                redis::cmd("ZREM")
                    .arg(conns_key(&lease.domain))
                    .arg(&lease.id)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }

    async fn reserve_rate(
        &self,
        domain: &str,
        count: u32,
        per: Duration,
    ) -> Result<Duration, LimitError> {
        let interval = super::RateLimiter::interval(count, per);
        let mut conn = self.conn.clone();
        let wait: i64 = self
            .bounded(
                "reserve",
                self.reserve
                    .key(gcra_key(domain))
                    .arg(interval.as_micros() as u64)
                    .invoke_async(&mut conn),
            )
            .await?;
        Ok(Duration::from_micros(wait.max(0) as u64))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::limits::suite;
    use smarthost_testkit::redis::RedisServer;

    async fn limits(server: &RedisServer, node: &str, options: RedisLimitsOptions) -> RedisLimits {
        RedisLimits::open(&server.url(), node, options)
            .await
            .unwrap()
    }

    fn short_ttl(ttl_ms: u64) -> RedisLimitsOptions {
        RedisLimitsOptions {
            lease_ttl: Duration::from_millis(ttl_ms),
            renew_every: Duration::from_millis(ttl_ms / 3),
            ..RedisLimitsOptions::default()
        }
    }

    #[tokio::test]
    async fn shared_suite_cap_and_release() {
        let server = RedisServer::start();
        suite::cap_and_release(&limits(&server, "n1", RedisLimitsOptions::default()).await).await;
    }

    #[tokio::test]
    async fn shared_suite_rate() {
        let server = RedisServer::start();
        suite::rate_spaces_reservations(
            &limits(&server, "n1", RedisLimitsOptions::default()).await,
        )
        .await;
    }

    #[tokio::test]
    async fn two_nodes_never_hold_more_than_the_cap() {
        let server = RedisServer::start();
        let nodes = [
            Arc::new(limits(&server, "n1", RedisLimitsOptions::default()).await),
            Arc::new(limits(&server, "n2", RedisLimitsOptions::default()).await),
        ];
        let cap = 3;
        let held = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..20 {
            let limits = nodes[i % 2].clone();
            let (held, most) = (held.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..3 {
                    let lease = loop {
                        match limits.acquire_connection("cap.example", cap).await.unwrap() {
                            Some(lease) => break lease,
                            None => tokio::time::sleep(Duration::from_millis(5)).await,
                        }
                    };
                    assert!(lease.id.starts_with(if i % 2 == 0 { "n1:" } else { "n2:" }));
                    let now = held.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(15)).await;
                    held.fetch_sub(1, Ordering::SeqCst);
                    limits.release(lease).await.unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!(most <= cap, "{most} leases held at once, cap {cap}");
        assert_eq!(most, cap, "the slots were all used");
        let left: i64 = redis::cmd("ZCARD")
            .arg(conns_key("cap.example"))
            .query_async(&mut nodes[0].conn.clone())
            .await
            .unwrap();
        assert_eq!(left, 0, "every lease was released");
    }

    #[tokio::test]
    async fn a_lease_not_renewed_expires_and_frees_its_slot() {
        let server = RedisServer::start();
        let n1 = limits(&server, "n1", short_ttl(300)).await;
        let n2 = limits(&server, "n2", short_ttl(300)).await;
        let lease = n1
            .acquire_connection("ttl.example", 1)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(lease.ttl, Some(Duration::from_millis(300)));
        assert_eq!(lease.renew_every, Some(Duration::from_millis(100)));

        // Renewed, it outlives its first TTL.
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            n1.renew(&lease).await.unwrap();
            assert!(n2
                .acquire_connection("ttl.example", 1)
                .await
                .unwrap()
                .is_none());
        }

        // Not renewed, it expires and the slot is someone else's.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let taken = n2.acquire_connection("ttl.example", 1).await.unwrap();
        assert!(taken.is_some(), "the expired lease freed its slot");
        assert!(matches!(
            n1.renew(&lease).await,
            Err(LimitError::LeaseLost(id)) if id == lease.id
        ));
        // Releasing a lost lease does no harm to the new holder.
        n1.release(lease).await.unwrap();
        assert!(n1
            .acquire_connection("ttl.example", 1)
            .await
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn renewing_an_expired_lease_fails_even_if_nobody_took_the_slot() {
        let server = RedisServer::start();
        let n1 = limits(&server, "n1", short_ttl(200)).await;
        let lease = n1
            .acquire_connection("late.example", 1)
            .await
            .unwrap()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(matches!(
            n1.renew(&lease).await,
            Err(LimitError::LeaseLost(_))
        ));
        assert!(n1
            .acquire_connection("late.example", 1)
            .await
            .unwrap()
            .is_some());
    }

    #[tokio::test]
    async fn keys_expire_when_nothing_in_them_matters() {
        let server = RedisServer::start();
        let n1 = limits(&server, "n1", short_ttl(200)).await;
        n1.acquire_connection("gone.example", 1)
            .await
            .unwrap()
            .unwrap();
        n1.reserve_rate("gone.example", 10, Duration::from_secs(1))
            .await
            .unwrap();
        let mut conn = n1.conn.clone();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(conns_key("gone.example"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pttl > 0 && pttl <= 200, "{pttl}");
        let pttl: i64 = redis::cmd("PTTL")
            .arg(gcra_key("gone.example"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pttl > 0 && pttl <= 101, "{pttl}");
    }

    #[tokio::test]
    async fn the_rate_is_shared_by_two_nodes() {
        let server = RedisServer::start();
        let nodes = [
            Arc::new(limits(&server, "n1", RedisLimitsOptions::default()).await),
            Arc::new(limits(&server, "n2", RedisLimitsOptions::default()).await),
        ];
        let mut tasks = Vec::new();
        for i in 0..10 {
            let limits = nodes[i % 2].clone();
            tasks.push(tokio::spawn(async move {
                let before = Instant::now();
                let wait = limits
                    .reserve_rate("rate.example", 5, Duration::from_secs(1))
                    .await
                    .unwrap();
                // The slot by this process's clock: somewhere between the
                // call's start and its end, plus the wait.
                (before + wait, Instant::now() + wait)
            }));
        }
        let mut slots = Vec::new();
        for task in tasks {
            slots.push(task.await.unwrap());
        }
        // Ten slots at least 200 ms apart span at least 1.8 s; a burst
        // (slots not spaced across the two nodes) would span the calls.
        let first = slots.iter().map(|s| s.0).min().unwrap();
        let last = slots.iter().map(|s| s.1).max().unwrap();
        let slack = Duration::from_millis(2);
        assert!(
            last - first + slack >= Duration::from_millis(1800),
            "{slots:?}"
        );
    }

    #[tokio::test]
    async fn a_dead_redis_is_unavailable_quickly_and_then_works_again() {
        let mut server = RedisServer::start();
        let timeout = Duration::from_secs(1);
        let n1 = limits(
            &server,
            "n1",
            RedisLimitsOptions {
                response_timeout: timeout,
                ..RedisLimitsOptions::default()
            },
        )
        .await;
        let lease = n1
            .acquire_connection("dead.example", 2)
            .await
            .unwrap()
            .unwrap();
        server.kill();

        let bound = timeout + Duration::from_secs(1);
        let started = Instant::now();
        let acquired = n1.acquire_connection("dead.example", 2).await;
        assert!(
            matches!(acquired, Err(LimitError::Unavailable(_))),
            "{acquired:?}"
        );
        assert!(started.elapsed() < bound, "{:?}", started.elapsed());
        let started = Instant::now();
        let renewed = n1.renew(&lease).await;
        assert!(
            matches!(renewed, Err(LimitError::Unavailable(_))),
            "{renewed:?}"
        );
        assert!(started.elapsed() < bound, "{:?}", started.elapsed());
        let started = Instant::now();
        let reserved = n1
            .reserve_rate("dead.example", 5, Duration::from_secs(1))
            .await;
        assert!(
            matches!(reserved, Err(LimitError::Unavailable(_))),
            "{reserved:?}"
        );
        assert!(started.elapsed() < bound, "{:?}", started.elapsed());

        // Back (with its AOF, without its script cache): works again.
        server.restart();
        let deadline = Instant::now() + Duration::from_secs(10);
        let lease = loop {
            match n1.acquire_connection("dead.example", 2).await {
                Ok(lease) => break lease.expect("a free slot"),
                Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        n1.renew(&lease).await.unwrap();
        n1.reserve_rate("dead.example", 5, Duration::from_secs(1))
            .await
            .unwrap();
        n1.release(lease).await.unwrap();
    }
}
