//! Where the failure records live: in this process ([`LocalLedger`], the
//! local backend) or in Redis ([`RedisLedger`], shared by every node of the
//! cluster, one script run per login step).
//!
//! # Redis keys
//!
//! Every key has the hash tag `{auth}`, so a script's keys share one slot
//! on Redis Cluster. `<scope>` is `smtp` or `admin`.
//!
//! | key | value | expires |
//! | --- | --- | --- |
//! | `smarthost:{auth}:<scope>:a:<address>:n` | failures from the address | a window after the last failure |
//! | `smarthost:{auth}:<scope>:a:<address>:b` | `1` while the address is blocked | when the block ends |
//! | `smarthost:{auth}:<scope>:u:<user>:n`, `…:b` | the same for a user name | the same |
//! | `smarthost:{auth}:<scope>:t:<address>:<user>` | `1`: the address logged in as the user | `auth_trust_duration` after the last login |

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::Script;
use smarthost_coordinator::redis::Connection;

use super::throttle::{millis, Failed, Policy, Record, Standing};

/// A subject of a login (an address or a user name) and its policy.
#[derive(Clone, Debug)]
pub struct Subject {
    /// `<scope>:a:<address>` or `<scope>:u:<user>`.
    pub key: String,
    pub policy: Policy,
}

/// What [`Ledger::look`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Look {
    /// One per subject, in order.
    pub standings: Vec<Standing>,
    /// The trust key exists.
    pub trusted: bool,
}

#[async_trait]
pub trait Ledger: Send + Sync {
    /// Where the subjects stand and whether `trust` (a key) is set.
    async fn look(&self, subjects: &[Subject], trust: Option<&str>) -> Result<Look, String>;
    /// Counts one failure against every subject.
    async fn fail(&self, subjects: &[Subject]) -> Result<Vec<Failed>, String>;
    /// Sets `trust` for `duration`.
    async fn trust(&self, trust: &str, duration: Duration) -> Result<(), String>;
}

/// Records kept at most, each of failures and of trusts; past it spent
/// records are dropped, and if none is spent new subjects are not tracked
/// (their failures still wait the delay).
pub const LOCAL_CAPACITY: usize = 100_000;

/// The records in this process.
pub struct LocalLedger {
    start: Instant,
    inner: Mutex<LocalRecords>,
}

#[derive(Default)]
struct LocalRecords {
    records: HashMap<String, (Record, Policy)>,
    /// Trust key → until (ms).
    trusts: HashMap<String, u64>,
}

impl Default for LocalLedger {
    fn default() -> Self {
        LocalLedger {
            start: Instant::now(),
            inner: Mutex::default(),
        }
    }
}

impl LocalLedger {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LocalRecords> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn look_now(&self, subjects: &[Subject], trust: Option<&str>) -> Look {
        let now = self.now_ms();
        let records = self.lock();
        Look {
            standings: subjects
                .iter()
                .map(|s| {
                    records
                        .records
                        .get(&s.key)
                        .map_or(Standing::Open { failures: 0 }, |(r, _)| {
                            r.standing(now, &s.policy)
                        })
                })
                .collect(),
            trusted: trust.is_some_and(|t| records.trusts.get(t).is_some_and(|&u| u > now)),
        }
    }

    pub fn fail_now(&self, subjects: &[Subject]) -> Vec<Failed> {
        let now = self.now_ms();
        let mut records = self.lock();
        subjects
            .iter()
            .map(|s| {
                if !records.records.contains_key(&s.key) && records.records.len() >= LOCAL_CAPACITY
                {
                    records.records.retain(|_, (r, p)| !r.is_spent(now, p));
                }
                if let Some((record, _)) = records.records.get_mut(&s.key) {
                    return record.fail(now, &s.policy);
                }
                let mut record = Record::default();
                let failed = record.fail(now, &s.policy);
                if records.records.len() < LOCAL_CAPACITY {
                    records.records.insert(s.key.clone(), (record, s.policy));
                }
                failed
            })
            .collect()
    }

    pub fn trust_now(&self, trust: &str, duration: Duration) {
        let now = self.now_ms();
        let mut records = self.lock();
        if !records.trusts.contains_key(trust) && records.trusts.len() >= LOCAL_CAPACITY {
            records.trusts.retain(|_, until| *until > now);
        }
        if records.trusts.len() < LOCAL_CAPACITY || records.trusts.contains_key(trust) {
            records
                .trusts
                .insert(trust.to_string(), now + millis(duration));
        }
    }
}

#[async_trait]
impl Ledger for LocalLedger {
    async fn look(&self, subjects: &[Subject], trust: Option<&str>) -> Result<Look, String> {
        Ok(self.look_now(subjects, trust))
    }

    async fn fail(&self, subjects: &[Subject]) -> Result<Vec<Failed>, String> {
        Ok(self.fail_now(subjects))
    }

    async fn trust(&self, trust: &str, duration: Duration) -> Result<(), String> {
        self.trust_now(trust, duration);
        Ok(())
    }
}

/// The records in Redis, shared by every node that uses the server.
pub struct RedisLedger {
    conn: Connection,
    timeout: Duration,
    look: Script,
    fail: Script,
}

fn redis_key(key: &str) -> String {
    format!("smarthost:{{auth}}:{key}")
}

impl RedisLedger {
    /// The store on `conn`, a connection the node's other shared stores
    /// use too.
    pub fn new(conn: Connection, timeout: Duration) -> RedisLedger {
        RedisLedger {
            conn,
            timeout,
            look: Script::new(include_str!("scripts/look.lua")),
            fail: Script::new(include_str!("scripts/fail.lua")),
        }
    }

    async fn bounded<T>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, String> {
        crate::spool::redis::bounded(self.timeout, what, request).await
    }
}

#[async_trait]
impl Ledger for RedisLedger {
    async fn look(&self, subjects: &[Subject], trust: Option<&str>) -> Result<Look, String> {
        let mut invocation = self.look.prepare_invoke();
        for subject in subjects {
            invocation
                .key(redis_key(&format!("{}:n", subject.key)))
                .key(redis_key(&format!("{}:b", subject.key)));
        }
        if let Some(trust) = trust {
            invocation.key(redis_key(trust));
        }
        invocation.arg(subjects.len());
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self
            .bounded("auth look", invocation.invoke_async(&mut conn))
            .await?;
        if reply.len() != subjects.len() * 2 + 1 {
            return Err(format!("redis auth look: unexpected reply {reply:?}"));
        }
        let standings = reply
            .chunks(2)
            .take(subjects.len())
            .map(|pair| match pair[1] {
                left if left > 0 => Standing::Blocked {
                    for_ms: left as u64,
                },
                _ => Standing::Open {
                    failures: pair[0].max(0) as u32,
                },
            })
            .collect();
        Ok(Look {
            standings,
            trusted: reply[reply.len() - 1] == 1,
        })
    }

    async fn fail(&self, subjects: &[Subject]) -> Result<Vec<Failed>, String> {
        let mut invocation = self.fail.prepare_invoke();
        for subject in subjects {
            invocation
                .key(redis_key(&format!("{}:n", subject.key)))
                .key(redis_key(&format!("{}:b", subject.key)))
                .arg(subject.policy.max_failures)
                .arg(millis(subject.policy.window))
                .arg(millis(subject.policy.block_for));
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> = self
            .bounded("auth fail", invocation.invoke_async(&mut conn))
            .await?;
        if reply.len() != subjects.len() * 3 {
            return Err(format!("redis auth fail: unexpected reply {reply:?}"));
        }
        Ok(reply
            .chunks(3)
            .map(|t| Failed {
                standing: if t[1] > 0 {
                    Standing::Blocked {
                        for_ms: t[1] as u64,
                    }
                } else {
                    Standing::Open {
                        failures: t[0].max(0) as u32,
                    }
                },
                newly_blocked: t[2] == 1,
            })
            .collect())
    }

    async fn trust(&self, trust: &str, duration: Duration) -> Result<(), String> {
        let mut conn = self.conn.clone();
        let _: () = self
            .bounded(
                "auth trust",
                redis::cmd("SET")
                    .arg(redis_key(trust))
                    .arg(1)
                    .arg("PX")
                    .arg(millis(duration))
                    .query_async(&mut conn),
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smarthost_testkit::redis::RedisServer;

    fn subjects(max_failures: u32) -> Vec<Subject> {
        let policy = Policy {
            max_failures,
            window: Duration::from_secs(30),
            block_for: Duration::from_millis(400),
        };
        vec![
            Subject {
                key: "smtp:a:192.0.2.1".into(),
                policy,
            },
            Subject {
                key: "smtp:u:app".into(),
                policy: Policy {
                    max_failures: max_failures * 2,
                    ..policy
                },
            },
        ]
    }

    /// The same steps on both ledgers give the same answers.
    async fn suite(ledger: &dyn Ledger) {
        let s = subjects(3);
        let open = |failures| Standing::Open { failures };
        let look = ledger.look(&s, Some("smtp:t:192.0.2.1:app")).await.unwrap();
        assert_eq!(look.standings, [open(0), open(0)]);
        assert!(!look.trusted);
        for n in 1..=2 {
            let failed = ledger.fail(&s).await.unwrap();
            assert_eq!(failed[0].standing, open(n));
            assert_eq!(failed[1].standing, open(n));
        }
        let failed = ledger.fail(&s).await.unwrap();
        assert!(failed[0].newly_blocked);
        assert!(matches!(failed[0].standing, Standing::Blocked { for_ms } if for_ms <= 400));
        assert_eq!(failed[1].standing, open(3));
        // Blocked: no new block, and the block shows.
        let failed = ledger.fail(&s[..1]).await.unwrap();
        assert!(!failed[0].newly_blocked);
        let look = ledger.look(&s, None).await.unwrap();
        assert!(matches!(look.standings[0], Standing::Blocked { .. }));
        assert_eq!(look.standings[1], open(3));
        // The block ends by itself.
        tokio::time::sleep(Duration::from_millis(450)).await;
        let look = ledger.look(&s, None).await.unwrap();
        assert_eq!(look.standings[0], open(0));
        // Trust expires too.
        ledger
            .trust("smtp:t:192.0.2.1:app", Duration::from_millis(200))
            .await
            .unwrap();
        assert!(
            ledger
                .look(&s, Some("smtp:t:192.0.2.1:app"))
                .await
                .unwrap()
                .trusted
        );
        assert!(
            !ledger
                .look(&s, Some("smtp:t:192.0.2.2:app"))
                .await
                .unwrap()
                .trusted
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            !ledger
                .look(&s, Some("smtp:t:192.0.2.1:app"))
                .await
                .unwrap()
                .trusted
        );
    }

    #[tokio::test]
    async fn local_ledger_suite() {
        suite(&LocalLedger::default()).await;
    }

    #[tokio::test]
    async fn redis_ledger_suite_and_no_key_left_behind() {
        let server = RedisServer::start();
        let ledger = RedisLedger::new(
            crate::spool::redis::connect(&server.url(), false, Duration::from_secs(5))
                .await
                .unwrap(),
            Duration::from_secs(5),
        );
        suite(&ledger).await;
        // Two nodes share the records.
        let other = RedisLedger::new(
            crate::spool::redis::connect(&server.url(), false, Duration::from_secs(5))
                .await
                .unwrap(),
            Duration::from_secs(5),
        );
        let s = subjects(2);
        ledger.fail(&s[..1]).await.unwrap();
        let failed = other.fail(&s[..1]).await.unwrap();
        assert!(failed[0].newly_blocked);
        assert!(matches!(
            ledger.look(&s[..1], None).await.unwrap().standings[0],
            Standing::Blocked { .. }
        ));
        // Every key expires: the window is 30 s, the block 400 ms.
        let mut conn = ledger.conn.clone();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("smarthost:{auth}:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        for key in keys {
            let ttl: i64 = redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(ttl > 0, "{key} has no expiry");
        }
    }
}
