//! Sending quotas of application keys and SMTP users: at most so many
//! messages a minute and a day, for the whole cluster on the Redis
//! backend, so that a leaked credential cannot send without limit.
//!
//! Each quota is a GCRA, the same rule as the per-domain rates but with a
//! burst: a bucket of `count` messages that refills evenly over `period`.
//! A message passes when it passes every quota of its sender; one that a
//! quota refuses takes nothing from the others, and is told when the first
//! quota that refused it has room again.
//!
//! [`take`] is the rule, pure; [`LocalQuotas`] keeps the arrival times in
//! this process, [`RedisQuotas`] in Redis, with the same rule in one script
//! that reads the server's clock.
//!
//! # Redis keys
//!
//! | key | value | expires |
//! | --- | --- | --- |
//! | `smarthost:{q:<holder>}:<period in s>` | the theoretical arrival time (Redis time, µs) | when it is past |
//!
//! `<holder>` is `key:<name>` for an application key, `user:<name>` for an
//! SMTP user; the hash tag keeps a holder's quotas in one slot.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::Script;
use smarthost_coordinator::redis::Connection;

/// `count` messages per `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub count: u32,
    pub period: Duration,
}

impl Quota {
    pub const MINUTE: Duration = Duration::from_secs(60);
    pub const DAY: Duration = Duration::from_secs(86_400);

    /// The quotas of a key or user from its `messages_per_minute` and
    /// `messages_per_day` (absent or 0: no such quota).
    pub fn list(per_minute: Option<u32>, per_day: Option<u32>) -> Vec<Quota> {
        [(per_minute, Quota::MINUTE), (per_day, Quota::DAY)]
            .into_iter()
            .filter_map(|(count, period)| {
                count
                    .filter(|&c| c > 0)
                    .map(|count| Quota { count, period })
            })
            .collect()
    }

    /// The spacing of messages at the steady rate, in µs.
    fn interval_us(&self) -> u64 {
        (self.period.as_micros() as u64 / u64::from(self.count)).max(1)
    }

    fn period_us(&self) -> u64 {
        self.period.as_micros() as u64
    }
}

/// Whether one more message passes `quotas`, whose theoretical arrival
/// times are `tats` (µs, `0`: never used), at `now_us`: the new arrival
/// times, or how long until it would pass.
pub fn take(quotas: &[Quota], tats: &[u64], now_us: u64) -> Result<Vec<u64>, Duration> {
    let mut wait = 0;
    let next: Vec<u64> = quotas
        .iter()
        .zip(tats)
        .map(|(quota, &tat)| {
            let next = tat.max(now_us) + quota.interval_us();
            wait = wait.max((next - now_us).saturating_sub(quota.period_us()));
            next
        })
        .collect();
    if wait > 0 {
        Err(Duration::from_micros(wait))
    } else {
        Ok(next)
    }
}

/// A refusal's wait in whole seconds, rounded up, for `Retry-After` and
/// the SMTP reply.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_micros().div_ceil(1_000_000).max(1) as u64
}

#[async_trait]
pub trait Quotas: Send + Sync + 'static {
    /// Takes one message from every quota of `holder`; `Ok(Err(wait))`
    /// when one is spent. `Err`: the quotas cannot be read now.
    async fn take(&self, holder: &str, quotas: &[Quota]) -> Result<Result<(), Duration>, String>;
}

/// The quotas of this node alone (the local backend).
#[derive(Default)]
pub struct LocalQuotas {
    /// By holder and period; as many as configured keys and users.
    tats: Mutex<HashMap<(String, Duration), u64>>,
}

#[async_trait]
impl Quotas for LocalQuotas {
    async fn take(&self, holder: &str, quotas: &[Quota]) -> Result<Result<(), Duration>, String> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let mut all = self.tats.lock().expect("not poisoned");
        let tats: Vec<u64> = quotas
            .iter()
            .map(|q| {
                all.get(&(holder.to_string(), q.period))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        Ok(take(quotas, &tats, now_us).map(|next| {
            for (quota, tat) in quotas.iter().zip(next) {
                all.insert((holder.to_string(), quota.period), tat);
            }
        }))
    }
}

/// KEYS one per quota; ARGV: per key its interval and period in µs. The
/// rule of [`take`]. Returns the wait in µs, 0 when the message passed.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local nexts = {}
local wait = 0
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[2 * i - 1])
  local period = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local next = tat + interval
  if next - now > period and next - now - period > wait then
    wait = next - now - period
  end
  nexts[i] = next
end
if wait > 0 then
  return wait
end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, string.format('%.0f', nexts[i]))
  redis.call('PEXPIREAT', key, string.format('%.0f', math.ceil(nexts[i] / 1000)))
end
return 0
";

/// The quotas of the whole cluster, in Redis.
pub struct RedisQuotas {
    conn: Connection,
    timeout: Duration,
    script: Script,
}

impl RedisQuotas {
    /// The store on `conn`, a connection the node's other shared stores
    /// use too.
    pub fn new(conn: Connection, timeout: Duration) -> RedisQuotas {
        RedisQuotas {
            conn,
            timeout,
            script: Script::new(TAKE),
        }
    }

    pub fn key(holder: &str, quota: &Quota) -> String {
        format!("smarthost:{{q:{holder}}}:{}", quota.period.as_secs())
    }
}

#[async_trait]
impl Quotas for RedisQuotas {
    async fn take(&self, holder: &str, quotas: &[Quota]) -> Result<Result<(), Duration>, String> {
        if quotas.is_empty() {
            return Ok(Ok(()));
        }
        let mut invocation = self.script.prepare_invoke();
        for quota in quotas {
            invocation
                .key(RedisQuotas::key(holder, quota))
                .arg(quota.interval_us())
                .arg(quota.period_us());
        }
        let mut conn = self.conn.clone();
        let wait: u64 =
            crate::spool::redis::bounded(self.timeout, "quota", invocation.invoke_async(&mut conn))
                .await?;
        Ok(match wait {
            0 => Ok(()),
            wait => Err(Duration::from_micros(wait)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smarthost_testkit::redis::RedisServer;

    const S: u64 = 1_000_000;

    fn per_minute(count: u32) -> Quota {
        Quota {
            count,
            period: Quota::MINUTE,
        }
    }

    #[test]
    fn a_quota_lets_a_burst_of_its_count_then_refills_evenly() {
        let quotas = [per_minute(3)];
        let mut tats = vec![0];
        let now = 1_000 * S;
        for _ in 0..3 {
            tats = take(&quotas, &tats, now).unwrap();
        }
        // Spent: the next one passes when a third of the minute is past.
        assert_eq!(take(&quotas, &tats, now), Err(Duration::from_secs(20)));
        assert_eq!(
            take(&quotas, &tats, now + 15 * S),
            Err(Duration::from_secs(5))
        );
        tats = take(&quotas, &tats, now + 20 * S).unwrap();
        assert!(take(&quotas, &tats, now + 20 * S).is_err());
        // A quiet hour fills the bucket again, and no more than it holds.
        let later = now + 3_600 * S;
        for _ in 0..3 {
            tats = take(&quotas, &tats, later).unwrap();
        }
        assert!(take(&quotas, &tats, later).is_err());
    }

    #[test]
    fn a_refusal_takes_nothing_and_names_the_longest_wait() {
        let quotas = [
            per_minute(10),
            Quota {
                count: 2,
                period: Quota::DAY,
            },
        ];
        let now = 5_000 * S;
        let mut tats = vec![0, 0];
        for _ in 0..2 {
            tats = take(&quotas, &tats, now).unwrap();
        }
        let refused = take(&quotas, &tats, now).unwrap_err();
        assert_eq!(refused, Duration::from_secs(43_200));
        assert_eq!(
            take(&quotas, &tats, now + 43_200 * S).map(|t| t.len()),
            Ok(2)
        );
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(20_001)), 21);
    }

    #[test]
    fn quotas_come_from_the_configured_counts() {
        assert_eq!(Quota::list(None, Some(0)), vec![]);
        assert_eq!(
            Quota::list(Some(5), Some(100)),
            vec![
                per_minute(5),
                Quota {
                    count: 100,
                    period: Quota::DAY
                }
            ]
        );
    }

    async fn spend(quotas: &dyn Quotas, holder: &str, quota: &[Quota]) -> (u32, Duration) {
        for passed in 0..1_000 {
            if let Err(wait) = quotas.take(holder, quota).await.unwrap() {
                return (passed, wait);
            }
        }
        panic!("the quota never ran out");
    }

    async fn suite(quotas: &dyn Quotas) {
        let quota = [per_minute(5)];
        let (passed, wait) = spend(quotas, "key:shop", &quota).await;
        assert_eq!(passed, 5);
        assert!(wait > Duration::from_secs(11) && wait <= Duration::from_secs(12));
        // Another holder has a quota of its own.
        assert_eq!(spend(quotas, "user:app", &quota).await.0, 5);
        // No quota: no limit, and no trip to the store.
        assert_eq!(quotas.take("key:free", &[]).await.unwrap(), Ok(()));
    }

    #[tokio::test]
    async fn local_quotas_follow_the_rule() {
        suite(&LocalQuotas::default()).await;
    }

    #[tokio::test]
    async fn redis_quotas_follow_the_rule_and_are_shared_by_nodes() {
        let server = RedisServer::start();
        let url = server.url();
        let timeout = Duration::from_secs(2);
        let open = || async {
            let conn = crate::spool::redis::connect(&url, false, timeout).await;
            RedisQuotas::new(conn.unwrap(), timeout)
        };
        let (n1, n2) = (open().await, open().await);
        suite(&n1).await;
        // Two nodes draw from one bucket: 10 messages, 5 through each.
        let quota = [per_minute(10)];
        for _ in 0..5 {
            assert_eq!(n1.take("key:both", &quota).await.unwrap(), Ok(()));
            assert_eq!(n2.take("key:both", &quota).await.unwrap(), Ok(()));
        }
        assert!(n1.take("key:both", &quota).await.unwrap().is_err());
        assert!(n2.take("key:both", &quota).await.unwrap().is_err());
        // The arrival time expires once it is past.
        let mut conn = n1.conn.clone();
        let pttl: i64 = redis::cmd("PTTL")
            .arg(RedisQuotas::key("key:both", &quota[0]))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(pttl > 59_000 && pttl <= 60_001, "{pttl}");
    }

    #[tokio::test]
    async fn an_unreachable_redis_is_an_error_not_a_pass() {
        let server = RedisServer::start();
        let timeout = Duration::from_millis(500);
        let conn = crate::spool::redis::connect(&server.url(), false, timeout)
            .await
            .unwrap();
        let quotas = RedisQuotas::new(conn, timeout);
        drop(server);
        assert!(quotas.take("key:shop", &[per_minute(5)]).await.is_err());
    }
}
