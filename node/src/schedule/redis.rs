//! The shared schedule: every node of a cluster takes due deliveries from
//! the same Redis server, and the work of a node that stops comes back to
//! the others when its leases run out.
//!
//! # Key schema
//!
//! A domain's keys share the hash tag `{d:<domain>}`, so on Redis Cluster
//! they live in one slot and one script changes them together. Deliveries
//! are named by message id (a delivery is a message id in a domain's keys):
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `smarthost:{d:<domain>}:ready` | list | ids of due deliveries, oldest first |
//! | `smarthost:{d:<domain>}:deferred` | sorted set | id → next attempt (ms) |
//! | `smarthost:{d:<domain>}:leases` | sorted set | id → lease expiry (ms, Redis clock) |
//! | `smarthost:{d:<domain>}:holders` | hash | id → holder of the lease |
//! | `smarthost:{d:<domain>}:suspended` | string | present while the domain is suspended |
//! | `smarthost:{domains}:active` | set | every domain that has had work |
//! | `smarthost:{domains}:suspended` | set | suspended domains, for listing |
//!
//! The records are the Redis spool's (`smarthost:{m:<id>}:record`, see
//! [`crate::spool::redis`]); the schedule reads them and, on `complete` and
//! `expire`, writes them.
//!
//! # Scripts
//!
//! Every change inside one domain slot is one Lua script: `take` pops up to
//! `max` ids from ready and leases them; `complete` checks the lease holder,
//! drops the lease and files the id in deferred (or nowhere when the
//! delivery is done); `release` puts a held id back at the front of ready;
//! `promote` moves due ids from deferred to ready; `reclaim` moves ids whose
//! lease ran out back to the front of ready; `insert` files new ids unless
//! they are already queued. Lease times come from the server's `TIME`
//! inside the scripts: they are written by one node and judged by another,
//! so no node's clock is compared with another's. Next-attempt times are
//! the node's (they come out of [`apply_outcome`]): a skewed clock moves a
//! retry by the skew, it never hands one delivery out twice.
//!
//! # Ordering and crashes
//!
//! A record and its domain's keys are in different slots, so a change to
//! both is two steps, in this order:
//!
//! 1. the record, by a compare-and-set script in the message slot: it is
//!    written only if it is still the record the outcome was computed from;
//!    otherwise the newer record comes back and the outcome is applied to
//!    it again (two domains of one message completing at once on two nodes);
//! 2. the domain script (and, for a finished message, the index entry).
//!
//! A crash between the two leaves the lease in place: it runs out, the
//! delivery is reclaimed to ready and attempted again with the new record
//! (at-least-once), never lost. The opposite order could drop a delivery
//! from every domain key while its record still lists it, where nothing
//! would find it again.
//!
//! # A node that lost its lease
//!
//! If a node completes a delivery after its lease ran out and another node
//! took it, the completion is made harmless rather than refused: the
//! attempt did happen, so its outcome goes into the record (by
//! compare-and-set, on top of whatever is newer), but the domain script
//! refuses it because the holder differs, so the other node's lease stays.
//! The other node's attempt is a duplicate (at-least-once); its own
//! outcome is then applied on top of the record, and a delivery that the
//! first node already finished is no longer in the record, so the second
//! completion only drops its lease.
//!
//! # Round trips
//!
//! `take` is two (the script, then every record in one pipeline);
//! `complete` is two (the record, then the domain script with the index
//! entry); `insert`, `has_ready`, `release`, `suspend`, `resume` and
//! `records` are one; `promote`, `reclaim_expired_leases`, `ready_domains`
//! and `counts` are two (the active domains, then one pipeline over them).
//! [`RedisSchedule::round_trips`] counts them. On Redis Cluster a pipeline
//! over several slots is split by the connection into requests sent at
//! once (still one round trip, see [`smarthost_coordinator::redis`]), so
//! its commands are not ordered across slots; `insert` therefore writes
//! the active-domains set as its own request first (two round trips).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::{Cmd, ErrorKind, FromRedisValue, Pipeline, Script, ServerErrorKind, Value};
use smarthost_coordinator::redis::Connection;
use smarthost_proto::envelope::{self, MessageId, MessageRecord};

use super::{dedup, Job, ReportHook, Schedule};
use crate::bounce;
use crate::delivery::MessageOutcome;
use crate::scheduler::{apply_outcome, expire_delivery, Completion, RetryPolicy, SchedulerCounts};
use crate::spool::redis::{body_key, record_key, INDEX_KEY};
use crate::spool::{RedisSpool, SpoolError};

/// Every domain that has had work.
pub const ACTIVE_KEY: &str = "smarthost:{domains}:active";
/// Suspended domains, for listing; scripts read the per-domain flag.
pub const SUSPENDED_KEY: &str = "smarthost:{domains}:suspended";

/// How long the body of a finished message stays, so that a report being
/// built for it can still quote it.
pub const BODY_GRACE: Duration = Duration::from_secs(60 * 60);

/// How often `complete` recomputes an outcome on a record another node
/// changed meanwhile before it gives up (the lease then runs out and the
/// delivery is attempted again).
const MAX_RECORD_RACES: usize = 8;

/// The most messages one expiry sweep handles; the oldest go first and the
/// next sweep goes on.
pub const EXPIRY_BATCH: usize = 1000;

/// How long an expiry sweep holds what it claimed; a sweep that dies
/// leaves the claims to be reclaimed after this. A sweep that lives
/// renews them every third of this while it queues reports, and starts
/// a message's reports only while at least half of it is left.
const EXPIRY_CLAIM: Duration = Duration::from_secs(60);

/// The keys of one domain.
struct DomainKeys {
    ready: String,
    deferred: String,
    leases: String,
    holders: String,
    suspended: String,
}

fn domain_keys(domain: &str) -> DomainKeys {
    let key = |what: &str| format!("smarthost:{{d:{domain}}}:{what}");
    DomainKeys {
        ready: key("ready"),
        deferred: key("deferred"),
        leases: key("leases"),
        holders: key("holders"),
        suspended: key("suspended"),
    }
}

/// KEYS: ready, leases, holders, suspended. ARGV: max, holder, lease ms.
const TAKE: &str = r"
if redis.call('EXISTS', KEYS[4]) == 1 then return {} end
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[3])
local taken = {}
while #taken < tonumber(ARGV[1]) do
  local id = redis.call('LPOP', KEYS[1])
  if not id then break end
  if not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], expiry, id)
    redis.call('HSET', KEYS[3], id, ARGV[2])
    taken[#taken + 1] = id
  end
end
return taken
";

/// KEYS: ready, deferred, leases, holders. ARGV: id, holder ('' = nobody
/// may hold it), next attempt ms ('' = the delivery is done).
const FILE: &str = r"
local holder = redis.call('HGET', KEYS[4], ARGV[1])
if ARGV[2] == '' then
  if holder then return 0 end
elseif holder ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
return 1
";

/// KEYS: ready, leases, holders. ARGV: id, holder.
const RELEASE: &str = r"
if redis.call('HGET', KEYS[3], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
";

/// KEYS: deferred, ready, suspended. ARGV: now ms.
const PROMOTE: &str = r"
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('RPUSH', KEYS[2], id)
end
return {#due, redis.call('EXISTS', KEYS[3])}
";

/// KEYS: ready, leases, holders.
const RECLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = #expired, 1, -1 do
  redis.call('ZREM', KEYS[2], expired[i])
  redis.call('HDEL', KEYS[3], expired[i])
  redis.call('LPUSH', KEYS[1], expired[i])
end
return #expired
";

/// KEYS: ready, leases, holders. ARGV: holder, lease ms, grace ms, ids…
/// Extends the leases of `holder` among `ids`; a lease of `holder` not
/// among them that was taken more than `grace` ago is an orphan (a take
/// whose reply was lost, a completion that failed half-way, an earlier
/// process of the same node) and goes back to the front of ready. Returns
/// {renewed, orphans}.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
local held = {}
local renewed = 0
for i = 4, #ARGV do
  held[ARGV[i]] = true
  if redis.call('HGET', KEYS[3], ARGV[i]) == ARGV[1] then
    redis.call('ZADD', KEYS[2], 'XX', now + lease, ARGV[i])
    renewed = renewed + 1
  end
end
local orphans = 0
local all = redis.call('HGETALL', KEYS[3])
for i = 1, #all, 2 do
  local id = all[i]
  if all[i + 1] == ARGV[1] and not held[id] then
    local expiry = tonumber(redis.call('ZSCORE', KEYS[2], id) or '0')
    if expiry - lease < now - tonumber(ARGV[3]) then
      redis.call('ZREM', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      redis.call('LPUSH', KEYS[1], id)
      orphans = orphans + 1
    end
  end
end
return {renewed, orphans}
";

/// KEYS: ready, leases, holders. ARGV: holders… Every lease of these
/// holders (nodes found dead) goes back to the front of ready. Returns how
/// many.
const RECLAIM_HOLDERS: &str = r"
local dead = {}
for i = 1, #ARGV do dead[ARGV[i]] = true end
local all = redis.call('HGETALL', KEYS[3])
local n = 0
for i = 1, #all, 2 do
  if dead[all[i + 1]] then
    redis.call('ZREM', KEYS[2], all[i])
    redis.call('HDEL', KEYS[3], all[i])
    redis.call('LPUSH', KEYS[1], all[i])
    n = n + 1
  end
end
return n
";

/// KEYS: ready, deferred, leases, holders. ARGV: holder, lease ms, ids…
/// Leases each id that is not leased already, wherever it waits (ready,
/// deferred, suspended or in no list at all), so that one sweep alone
/// expires it. Returns the ids claimed.
const CLAIM: &str = r"
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[2])
local claimed = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[3], id) then
    redis.call('LREM', KEYS[1], 0, id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[3], expiry, id)
    redis.call('HSET', KEYS[4], id, ARGV[1])
    claimed[#claimed + 1] = id
  end
end
return claimed
";

/// KEYS: ready, deferred, leases, suspended. ARGV: (id, next ms, due 1/0)…
const INSERT: &str = r"
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  if not redis.call('ZSCORE', KEYS[3], id) and not redis.call('ZSCORE', KEYS[2], id)
      and not redis.call('LPOS', KEYS[1], id) then
    if ARGV[i + 2] == '1' then
      redis.call('RPUSH', KEYS[1], id)
    else
      redis.call('ZADD', KEYS[2], ARGV[i + 1], id)
    end
  end
end
return redis.call('EXISTS', KEYS[4])
";

/// KEYS: record, body. ARGV: expected record, new record ('' = the message
/// is done), body grace ms. Returns {0} no record, {1, current} changed
/// meanwhile, {2} written.
const WRITE_RECORD: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return {0} end
if current ~= ARGV[1] then return {1, current} end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return {2}
";

struct Scripts {
    take: Script,
    file: Script,
    release: Script,
    promote: Script,
    reclaim: Script,
    insert: Script,
    write_record: Script,
    renew: Script,
    reclaim_holders: Script,
    claim: Script,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts {
            take: Script::new(TAKE),
            file: Script::new(FILE),
            release: Script::new(RELEASE),
            promote: Script::new(PROMOTE),
            reclaim: Script::new(RECLAIM),
            insert: Script::new(INSERT),
            write_record: Script::new(WRITE_RECORD),
            renew: Script::new(RENEW),
            reclaim_holders: Script::new(RECLAIM_HOLDERS),
            claim: Script::new(CLAIM),
        }
    }

    /// The code of every script, for `SCRIPT LOAD`.
    const CODE: [&'static str; 10] = [
        TAKE,
        FILE,
        RELEASE,
        PROMOTE,
        RECLAIM,
        INSERT,
        WRITE_RECORD,
        RENEW,
        RECLAIM_HOLDERS,
        CLAIM,
    ];
}

/// `EVALSHA` of `script` with `keys`; the caller adds the arguments.
fn evalsha(script: &Script, keys: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
    cmd
}

fn decode(id: &MessageId, bytes: &[u8]) -> Result<MessageRecord, SpoolError> {
    envelope::decode(bytes).map_err(|e| SpoolError::Corrupt(format!("record of {id}: {e}")))
}

fn parse<T: FromRedisValue>(what: &str, value: Value) -> Result<T, SpoolError> {
    redis::from_redis_value(value)
        .map_err(|e| SpoolError::Unavailable(format!("redis {what}: unexpected reply: {e}")))
}

/// A delivery this instance holds: its holder and the record bytes it was
/// handed out with (the expected value of the first compare-and-set).
struct Held {
    holder: String,
    record: Vec<u8>,
}

/// What the record script answered.
enum RecordWrite {
    Written,
    Gone,
    Changed(Vec<u8>),
}

/// The Redis implementation of [`Schedule`].
pub struct RedisSchedule {
    conn: Connection,
    timeout: Duration,
    scripts: Scripts,
    round_trips: AtomicU64,
    held: Mutex<HashMap<(MessageId, String), Held>>,
    /// Holds the deliveries an expiry sweep of this instance has claimed.
    expiry_holder: String,
    expiry_claim: Duration,
}

impl RedisSchedule {
    /// A schedule on the server of `spool`, whose records it shares.
    /// Loads the scripts (one round trip).
    pub async fn new(spool: &RedisSpool) -> Result<RedisSchedule, SpoolError> {
        let schedule = RedisSchedule {
            conn: spool.connection(),
            timeout: spool.options().response_timeout,
            scripts: Scripts::new(),
            round_trips: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            expiry_holder: format!("expiry/{:016x}", rand::random::<u64>()),
            expiry_claim: EXPIRY_CLAIM,
        };
        schedule.load_scripts().await?;
        Ok(schedule)
    }

    /// Claims of expiry sweeps last `claim` instead of a minute (tests).
    pub fn with_expiry_claim(mut self, claim: Duration) -> Self {
        self.expiry_claim = claim;
        self
    }

    /// Extends the claims of the sweep under way to `expiry_claim` from now.
    async fn renew_claims(
        &self,
        claimed: &BTreeMap<MessageId, Vec<String>>,
    ) -> Result<(), SpoolError> {
        let mut by_domain: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (id, domains) in claimed {
            for domain in domains {
                by_domain.entry(domain).or_default().push(id.as_str());
            }
        }
        // A grace no claim reaches: the script puts back no "orphan".
        let never = Duration::from_secs(10 * 365 * 86400);
        let mut pipe = redis::pipe();
        for (domain, ids) in by_domain {
            let k = domain_keys(domain);
            let mut cmd = evalsha(&self.scripts.renew, &[&k.ready, &k.leases, &k.holders]);
            cmd.arg(&self.expiry_holder)
                .arg(self.expiry_claim.as_millis() as u64)
                .arg(never.as_millis() as u64)
                .arg(ids);
            pipe.add_command(cmd).ignore();
        }
        self.run("expire: renew claims", &pipe).await.map(drop)
    }

    /// Runs `work` (queueing a message's reports) while renewing the
    /// sweep's claims every third of their length; `held_until` is when
    /// they surely last until.
    async fn while_renewing<T>(
        &self,
        claimed: &BTreeMap<MessageId, Vec<String>>,
        held_until: &mut Instant,
        work: impl std::future::Future<Output = T>,
    ) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                () = tokio::time::sleep(self.expiry_claim / 3) => {
                    let sent = Instant::now();
                    match self.renew_claims(claimed).await {
                        Ok(()) => *held_until = sent + self.expiry_claim,
                        Err(error) => {
                            tracing::warn!(%error, "cannot renew the claims of an expiry sweep")
                        }
                    }
                }
            }
        }
    }

    /// Round trips to Redis since `new` (the script load included).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    async fn load_scripts(&self) -> Result<(), SpoolError> {
        let mut pipe = redis::pipe();
        for code in Scripts::CODE {
            pipe.cmd("SCRIPT").arg("LOAD").arg(code).ignore();
        }
        self.once("SCRIPT LOAD", &pipe).await.map(|_: Value| ())
    }

    async fn once<T: FromRedisValue>(&self, what: &str, pipe: &Pipeline) -> Result<T, SpoolError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, pipe.query_async(&mut conn)).await {
            Ok(result) => result.map_err(|e| SpoolError::Unavailable(format!("redis {what}: {e}"))),
            Err(_) => Err(SpoolError::Unavailable(format!(
                "redis {what}: no reply within {:?}",
                self.timeout
            ))),
        }
    }

    /// One pipeline, one round trip; a server that lost the scripts (it
    /// restarted) gets them again and the pipeline is sent once more. Every
    /// script is safe to repeat after `NOSCRIPT`: a script that is not
    /// loaded did not run.
    async fn run(&self, what: &str, pipe: &Pipeline) -> Result<Vec<Value>, SpoolError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        let mut conn = self.conn.clone();
        let first = tokio::time::timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut conn))
            .await
            .map_err(|_| {
                SpoolError::Unavailable(format!("redis {what}: no reply within {:?}", self.timeout))
            })?;
        match first {
            Ok(values) => Ok(values),
            Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                self.load_scripts().await?;
                self.once(what, pipe).await
            }
            Err(e) => Err(SpoolError::Unavailable(format!("redis {what}: {e}"))),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<(MessageId, String), Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every domain that has had work.
    async fn active(&self) -> Result<Vec<String>, SpoolError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(ACTIVE_KEY);
        let mut values = self.run("SMEMBERS", &pipe).await?;
        let mut domains: Vec<String> = parse("SMEMBERS", values.pop().unwrap_or(Value::Nil))?;
        domains.sort();
        Ok(domains)
    }

    /// Runs one `EVALSHA` per domain in one pipeline.
    async fn per_domain(
        &self,
        what: &str,
        domains: &[String],
        cmd: impl Fn(&str) -> Cmd,
    ) -> Result<Vec<Value>, SpoolError> {
        if domains.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for domain in domains {
            pipe.add_command(cmd(domain));
        }
        self.run(what, &pipe).await
    }

    fn write_record_cmd(&self, id: &MessageId, expected: &[u8], new: Option<&[u8]>) -> Cmd {
        let mut cmd = evalsha(
            &self.scripts.write_record,
            &[&record_key(id), &body_key(id)],
        );
        cmd.arg(expected)
            .arg(new.unwrap_or_default())
            .arg(BODY_GRACE.as_millis() as u64);
        cmd
    }

    fn parse_record_write(value: Value) -> Result<RecordWrite, SpoolError> {
        let reply: Vec<Value> = parse("record write", value)?;
        let mut reply = reply.into_iter();
        let code: i64 = parse("record write", reply.next().unwrap_or(Value::Nil))?;
        Ok(match code {
            0 => RecordWrite::Gone,
            1 => RecordWrite::Changed(parse("record write", reply.next().unwrap_or(Value::Nil))?),
            _ => RecordWrite::Written,
        })
    }

    /// The domain script that files (or drops, `next` = `None`) a delivery.
    fn file_cmd(&self, id: &MessageId, domain: &str, holder: &str, next: Option<u64>) -> Cmd {
        let k = domain_keys(domain);
        let mut cmd = evalsha(
            &self.scripts.file,
            &[&k.ready, &k.deferred, &k.leases, &k.holders],
        );
        cmd.arg(id.as_str())
            .arg(holder)
            .arg(next.map(|n| n.to_string()).unwrap_or_default());
        cmd
    }

    /// Reads the records of `ids` in one pipeline: the bytes, if present.
    async fn fetch(&self, ids: &[MessageId]) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("GET").arg(record_key(id));
        }
        let values = self.run("GET records", &pipe).await?;
        values
            .into_iter()
            .map(|v| parse::<Option<Vec<u8>>>("GET record", v))
            .collect()
    }
}

impl RedisSchedule {
    /// `complete`, with reports queued through `report` before the record
    /// is written (once, on the first outcome computed: a record changed
    /// meanwhile by another domain does not repeat the report).
    #[allow(clippy::too_many_arguments)]
    async fn complete_with(
        &self,
        id: &MessageId,
        domain: &str,
        outcome: &MessageOutcome,
        now_ms: u64,
        policy: &RetryPolicy,
        jitter: f64,
        report: Option<&ReportHook>,
    ) -> Result<Option<Completion>, SpoolError> {
        let mut reported = false;
        let key = (id.clone(), domain.to_string());
        let (holder, mut expected) = match self.held().get(&key) {
            Some(held) => (held.holder.clone(), Some(held.record.clone())),
            None => (String::new(), None),
        };
        let mut races = 0;
        let completion = loop {
            let bytes = match expected.take() {
                Some(bytes) => bytes,
                None => match self.fetch(std::slice::from_ref(id)).await?.pop().flatten() {
                    Some(bytes) => bytes,
                    None => break None,
                },
            };
            let record = decode(id, &bytes)?;
            if !record.deliveries.iter().any(|d| d.domain == domain) {
                // Finished meanwhile (expired, or done by a node that
                // lost its lease): nothing to record.
                break None;
            }
            let completion = apply_outcome(&record, domain, outcome, now_ms, policy, jitter);
            if let Some(report) = report {
                if !reported && bounce::needs_report(&completion) {
                    // An error leaves the record and the lease: the
                    // delivery is attempted again once the lease runs out.
                    report(vec![completion.clone()]).await?;
                    reported = true;
                }
            }
            let new = (!completion.message_done()).then(|| envelope::encode(&*completion.record));
            let mut pipe = redis::pipe();
            pipe.add_command(self.write_record_cmd(id, &bytes, new.as_deref()));
            let reply = self.run("complete: record", &pipe).await?;
            match Self::parse_record_write(reply.into_iter().next().unwrap_or(Value::Nil))? {
                RecordWrite::Written => break Some(completion),
                RecordWrite::Gone => break None,
                RecordWrite::Changed(current) => {
                    races += 1;
                    if races == MAX_RECORD_RACES {
                        return Err(SpoolError::Unavailable(format!(
                            "record of {id} keeps changing under complete"
                        )));
                    }
                    expected = Some(current);
                }
            }
        };
        // Then the domain: the lease goes, the delivery is filed.
        let mut pipe = redis::pipe();
        let next = completion.as_ref().and_then(|c| c.next_attempt_ms);
        pipe.add_command(self.file_cmd(id, domain, &holder, next));
        if completion.as_ref().is_some_and(Completion::message_done) {
            pipe.cmd("ZREM").arg(INDEX_KEY).arg(id.as_str()).ignore();
        }
        let reply = self.run("complete: domain", &pipe).await?;
        self.held().remove(&key);
        let filed: i64 = parse("complete", reply.into_iter().next().unwrap_or(Value::Nil))?;
        if filed == 0 {
            tracing::warn!(message_id = %id, %domain,
                "the lease of this delivery was lost to another holder; its outcome is recorded, the lease is left to its holder");
        }
        Ok(completion)
    }

    /// `expire`, with each message's reports queued through `report`
    /// before its record is written; a message whose reports cannot be
    /// queued is put back for the next sweep.
    ///
    /// A sweep first claims the deliveries it expires under a lease of its
    /// own, so two sweeps at once (two coordinators) never expire — and
    /// report — the same delivery twice; work in flight is left to its
    /// holder, whose completion applies the lifetime itself. At most
    /// [`EXPIRY_BATCH`] messages per call, oldest first.
    async fn expire_with(
        &self,
        now_ms: u64,
        policy: &RetryPolicy,
        report: Option<&ReportHook>,
    ) -> Result<Vec<Completion>, SpoolError> {
        let cutoff = now_ms.saturating_sub(policy.max_lifetime.as_millis() as u64);
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(INDEX_KEY)
            .arg("-inf")
            .arg(cutoff)
            .arg("LIMIT")
            .arg(0)
            .arg(EXPIRY_BATCH);
        let reply = self.run("expire: index", &pipe).await?;
        let ids: Vec<String> = parse("expire", reply.into_iter().next().unwrap_or(Value::Nil))?;
        let ids: Vec<MessageId> = ids.into_iter().map(MessageId).collect();
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, bytes) in ids.iter().zip(self.fetch(&ids).await?) {
            if let Some(bytes) = bytes {
                for delivery in decode(id, &bytes)?.deliveries {
                    by_domain
                        .entry(delivery.domain)
                        .or_default()
                        .push(id.as_str().to_string());
                }
            }
        }
        if by_domain.is_empty() {
            return Ok(Vec::new());
        }
        let holder = self.expiry_holder.as_str();
        let mut held_until = Instant::now() + self.expiry_claim;
        let mut pipe = redis::pipe();
        for (domain, ids) in &by_domain {
            let k = domain_keys(domain);
            let mut cmd = evalsha(
                &self.scripts.claim,
                &[&k.ready, &k.deferred, &k.leases, &k.holders],
            );
            cmd.arg(holder)
                .arg(self.expiry_claim.as_millis() as u64)
                .arg(ids);
            pipe.add_command(cmd);
        }
        let mut claimed: BTreeMap<MessageId, Vec<String>> = BTreeMap::new();
        for (domain, value) in by_domain
            .keys()
            .zip(self.run("expire: claim", &pipe).await?)
        {
            for id in parse::<Vec<String>>("expire: claim", value)? {
                claimed
                    .entry(MessageId(id))
                    .or_default()
                    .push(domain.clone());
            }
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }

        // Per message, the claimed deliveries fail together in one record
        // write; a record another domain's completion changed meanwhile is
        // read again and the expiry applied on top (reported only once).
        let mut pending: Vec<(MessageId, Option<Vec<u8>>)> =
            claimed.keys().map(|id| (id.clone(), None)).collect();
        let mut reported: HashSet<MessageId> = HashSet::new();
        let mut expired: BTreeMap<MessageId, Vec<Completion>> = BTreeMap::new();
        let mut put_back: Vec<MessageId> = Vec::new();
        for _ in 0..MAX_RECORD_RACES {
            if pending.is_empty() {
                break;
            }
            let missing: Vec<MessageId> = pending
                .iter()
                .filter(|(_, bytes)| bytes.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            let mut fetched = missing.iter().cloned().zip(self.fetch(&missing).await?);
            let mut planned = Vec::new();
            for (id, bytes) in pending.drain(..) {
                let bytes = match bytes {
                    Some(bytes) => bytes,
                    None => match fetched.find(|(f, _)| *f == id).and_then(|(_, b)| b) {
                        Some(bytes) => bytes,
                        None => continue, // finished meanwhile
                    },
                };
                let mut current = Arc::new(decode(&id, &bytes)?);
                let mut completions = Vec::new();
                for domain in &claimed[&id] {
                    if current.deliveries.iter().any(|d| &d.domain == domain) {
                        let completion = expire_delivery(&current, domain);
                        current = completion.record.clone();
                        completions.push(completion);
                    }
                }
                if completions.is_empty() {
                    continue;
                }
                if let Some(report) = report {
                    let left = held_until.saturating_duration_since(Instant::now());
                    if left < self.expiry_claim / 2 && !reported.contains(&id) {
                        // Too close to the end of the claims to be sure of
                        // them until the reports are queued: the next sweep.
                        put_back.push(id);
                        continue;
                    }
                    if reported.insert(id.clone()) {
                        let queued = report(completions.clone());
                        let queued = self.while_renewing(&claimed, &mut held_until, queued);
                        if let Err(error) = queued.await {
                            tracing::warn!(message_id = %id, %error,
                                "cannot queue the report of an expired message; it stays for the next sweep");
                            put_back.push(id);
                            continue;
                        }
                    }
                }
                planned.push((id, bytes, completions));
            }
            if planned.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for (id, bytes, completions) in &planned {
                let last = completions.last().expect("not empty");
                let new = (!last.message_done()).then(|| envelope::encode(&*last.record));
                pipe.add_command(self.write_record_cmd(id, bytes, new.as_deref()));
            }
            let writes = self.run("expire: records", &pipe).await?;
            for ((id, _, completions), write) in planned.into_iter().zip(writes) {
                match Self::parse_record_write(write)? {
                    RecordWrite::Written => {
                        expired.insert(id, completions);
                    }
                    RecordWrite::Gone => {}
                    RecordWrite::Changed(current) => pending.push((id, Some(current))),
                }
            }
        }
        // Still racing: given back, like those whose report failed.
        put_back.extend(pending.into_iter().map(|(id, _)| id));

        // The claims go: expired deliveries are dropped, the rest are due
        // again (the next sweep or an attempt fails them).
        let mut pipe = redis::pipe();
        for (id, domains) in &claimed {
            for domain in domains {
                if put_back.contains(id) {
                    let k = domain_keys(domain);
                    let mut cmd =
                        evalsha(&self.scripts.release, &[&k.ready, &k.leases, &k.holders]);
                    cmd.arg(id.as_str()).arg(holder);
                    pipe.add_command(cmd).ignore();
                } else {
                    pipe.add_command(self.file_cmd(id, domain, holder, None))
                        .ignore();
                }
            }
            if expired
                .get(id)
                .and_then(|c| c.last())
                .is_some_and(Completion::message_done)
            {
                pipe.cmd("ZREM").arg(INDEX_KEY).arg(id.as_str()).ignore();
            }
        }
        self.run("expire: domains", &pipe).await?;
        Ok(expired.into_values().flatten().collect())
    }
}

#[async_trait]
impl Schedule for RedisSchedule {
    async fn insert(
        &self,
        records: Vec<MessageRecord>,
        now_ms: u64,
    ) -> Result<Vec<String>, SpoolError> {
        // Per domain, in order of first appearance: (id, next, due).
        let mut by_domain: Vec<(String, Vec<(String, u64, bool)>)> = Vec::new();
        for record in &records {
            for delivery in &record.deliveries {
                let entry = (
                    record.id.0.clone(),
                    delivery.next_attempt_ms,
                    delivery.next_attempt_ms <= now_ms,
                );
                match by_domain.iter_mut().find(|(d, _)| *d == delivery.domain) {
                    Some((_, entries)) => entries.push(entry),
                    None => by_domain.push((delivery.domain.clone(), vec![entry])),
                }
            }
        }
        if by_domain.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        // The domain is listed before it gets work, so that no work is in
        // a domain nobody looks at. On Redis Cluster the list is in another
        // slot than the domains, so it is its own request first.
        pipe.cmd("SADD")
            .arg(ACTIVE_KEY)
            .arg(
                by_domain
                    .iter()
                    .map(|(d, _)| d.as_str())
                    .collect::<Vec<_>>(),
            )
            .ignore();
        if self.conn.is_cluster() {
            self.run("insert: domains", &pipe).await?;
            pipe = redis::pipe();
        }
        for (domain, entries) in &by_domain {
            let k = domain_keys(domain);
            let mut cmd = evalsha(
                &self.scripts.insert,
                &[&k.ready, &k.deferred, &k.leases, &k.suspended],
            );
            for (id, next, due) in entries {
                cmd.arg(id).arg(*next).arg(if *due { "1" } else { "0" });
            }
            pipe.add_command(cmd);
        }
        let suspended = self.run("insert", &pipe).await?;
        let mut ready = Vec::new();
        for ((domain, entries), suspended) in by_domain.into_iter().zip(suspended) {
            let suspended: i64 = parse("insert", suspended)?;
            if suspended == 0 && entries.iter().any(|(_, _, due)| *due) {
                ready.push(domain);
            }
        }
        Ok(dedup(ready))
    }

    async fn promote(&self, now_ms: u64) -> Result<Vec<String>, SpoolError> {
        let domains = self.active().await?;
        let replies = self
            .per_domain("promote", &domains, |domain| {
                let k = domain_keys(domain);
                let mut cmd = evalsha(
                    &self.scripts.promote,
                    &[&k.deferred, &k.ready, &k.suspended],
                );
                cmd.arg(now_ms);
                cmd
            })
            .await?;
        let mut promoted = Vec::new();
        for (domain, reply) in domains.into_iter().zip(replies) {
            let (moved, suspended): (i64, i64) = parse("promote", reply)?;
            if moved > 0 && suspended == 0 {
                promoted.push(domain);
            }
        }
        Ok(promoted)
    }

    async fn take(
        &self,
        domain: &str,
        max: usize,
        holder: &str,
        lease: Duration,
    ) -> Result<Vec<Job>, SpoolError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let k = domain_keys(domain);
        let mut pipe = redis::pipe();
        let mut cmd = evalsha(
            &self.scripts.take,
            &[&k.ready, &k.leases, &k.holders, &k.suspended],
        );
        cmd.arg(max).arg(holder).arg(lease.as_millis() as u64);
        pipe.add_command(cmd);
        let mut reply = self.run("take", &pipe).await?;
        let ids: Vec<String> = parse("take", reply.pop().unwrap_or(Value::Nil))?;
        let ids: Vec<MessageId> = ids.into_iter().map(MessageId).collect();
        // The records, all in one round trip.
        let records = self.fetch(&ids).await?;
        let mut jobs = Vec::with_capacity(ids.len());
        let mut stale = Vec::new();
        for (id, bytes) in ids.into_iter().zip(records) {
            let found = match &bytes {
                Some(bytes) => {
                    let record = decode(&id, bytes)?;
                    record
                        .deliveries
                        .iter()
                        .position(|d| d.domain == domain)
                        .map(|index| (record, index))
                }
                None => None,
            };
            match (found, bytes) {
                (Some((record, index)), Some(bytes)) => {
                    self.held().insert(
                        (id, domain.to_string()),
                        Held {
                            holder: holder.to_string(),
                            record: bytes,
                        },
                    );
                    jobs.push((Arc::new(record), index));
                }
                // Finished or expired meanwhile (see the module doc): the
                // id was left behind in the domain's keys.
                _ => stale.push(id),
            }
        }
        if !stale.is_empty() {
            let mut pipe = redis::pipe();
            for id in &stale {
                pipe.add_command(self.file_cmd(id, domain, holder, None));
            }
            self.run("take: drop finished", &pipe).await?;
        }
        Ok(jobs)
    }

    async fn release(&self, id: &MessageId, domain: &str) -> Result<(), SpoolError> {
        let Some(held) = self.held().remove(&(id.clone(), domain.to_string())) else {
            return Ok(());
        };
        let k = domain_keys(domain);
        let mut cmd = evalsha(&self.scripts.release, &[&k.ready, &k.leases, &k.holders]);
        cmd.arg(id.as_str()).arg(&held.holder);
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        self.run("release", &pipe).await?;
        Ok(())
    }

    fn writes_records(&self) -> bool {
        true
    }

    async fn complete(
        &self,
        id: &MessageId,
        domain: &str,
        outcome: &MessageOutcome,
        now_ms: u64,
        policy: &RetryPolicy,
        jitter: f64,
        report: Option<&ReportHook>,
    ) -> Result<Option<Completion>, SpoolError> {
        let result = self
            .complete_with(id, domain, outcome, now_ms, policy, jitter, report)
            .await;
        if result.is_err() {
            // No longer running here: the lease lapses (or is put back as
            // an orphan) and the delivery is attempted again.
            self.held().remove(&(id.clone(), domain.to_string()));
        }
        result
    }

    async fn expire(
        &self,
        now_ms: u64,
        policy: &RetryPolicy,
        report: Option<&ReportHook>,
    ) -> Result<Vec<Completion>, SpoolError> {
        self.expire_with(now_ms, policy, report).await
    }

    async fn renew_leases(&self, holder: &str, lease: Duration) -> Result<usize, SpoolError> {
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ((id, domain), held) in self.held().iter() {
            if held.holder == holder {
                by_domain
                    .entry(domain.clone())
                    .or_default()
                    .push(id.as_str().to_string());
            }
        }
        // Every domain, for orphaned leases of this holder.
        for domain in self.active().await? {
            by_domain.entry(domain).or_default();
        }
        if by_domain.is_empty() {
            return Ok(0);
        }
        // A take answers within two replies: one taken longer ago and not
        // held is no longer on its way to this node.
        let grace = self.timeout * 2 + Duration::from_secs(1);
        let mut pipe = redis::pipe();
        for (domain, ids) in &by_domain {
            let k = domain_keys(domain);
            let mut cmd = evalsha(&self.scripts.renew, &[&k.ready, &k.leases, &k.holders]);
            cmd.arg(holder)
                .arg(lease.as_millis() as u64)
                .arg(grace.as_millis() as u64)
                .arg(ids);
            pipe.add_command(cmd);
        }
        let reply = self.run("renew leases", &pipe).await?;
        let mut renewed = 0;
        for (domain, value) in by_domain.keys().zip(reply) {
            let counts: Vec<i64> = parse("renew leases", value)?;
            renewed += counts.first().copied().unwrap_or(0) as usize;
            let orphans = counts.get(1).copied().unwrap_or(0);
            if orphans > 0 {
                tracing::info!(%domain, deliveries = orphans,
                    "put back deliveries leased to this node but not running here");
            }
        }
        Ok(renewed)
    }

    async fn ready_domains(&self) -> Result<Vec<String>, SpoolError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(ACTIVE_KEY);
        pipe.cmd("SMEMBERS").arg(SUSPENDED_KEY);
        let reply = self.run("ready domains", &pipe).await?;
        let mut reply = reply.into_iter();
        let mut active: Vec<String> = parse("SMEMBERS", reply.next().unwrap_or(Value::Nil))?;
        let suspended: Vec<String> = parse("SMEMBERS", reply.next().unwrap_or(Value::Nil))?;
        active.retain(|d| !suspended.contains(d));
        active.sort();
        if active.is_empty() {
            return Ok(active);
        }
        let mut pipe = redis::pipe();
        for domain in &active {
            pipe.cmd("LLEN").arg(domain_keys(domain).ready);
        }
        let lengths = self.run("ready domains", &pipe).await?;
        let mut ready = Vec::new();
        for (domain, len) in active.into_iter().zip(lengths) {
            if parse::<i64>("LLEN", len)? > 0 {
                ready.push(domain);
            }
        }
        Ok(ready)
    }

    async fn has_ready(&self, domain: &str) -> Result<bool, SpoolError> {
        let k = domain_keys(domain);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(&k.suspended);
        pipe.cmd("LLEN").arg(&k.ready);
        let (suspended, len): (i64, i64) = parse(
            "has_ready",
            Value::Array(self.run("has_ready", &pipe).await?),
        )?;
        Ok(suspended == 0 && len > 0)
    }

    async fn suspend(&self, domain: &str) -> Result<(), SpoolError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(domain_keys(domain).suspended)
            .arg(1)
            .ignore();
        pipe.cmd("SADD").arg(SUSPENDED_KEY).arg(domain).ignore();
        self.run("suspend", &pipe).await?;
        Ok(())
    }

    async fn resume(&self, domain: &str) -> Result<bool, SpoolError> {
        let k = domain_keys(domain);
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&k.suspended).ignore();
        pipe.cmd("SREM").arg(SUSPENDED_KEY).arg(domain).ignore();
        pipe.cmd("LLEN").arg(&k.ready);
        let reply = self.run("resume", &pipe).await?;
        let len: i64 = parse("resume", reply.into_iter().next().unwrap_or(Value::Nil))?;
        Ok(len > 0)
    }

    async fn counts(&self) -> Result<SchedulerCounts, SpoolError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(ACTIVE_KEY);
        pipe.cmd("ZCARD").arg(INDEX_KEY);
        let reply = self.run("counts", &pipe).await?;
        let mut reply = reply.into_iter();
        let mut domains: Vec<String> = parse("counts", reply.next().unwrap_or(Value::Nil))?;
        domains.sort();
        let messages: i64 = parse("counts", reply.next().unwrap_or(Value::Nil))?;
        let mut counts = SchedulerCounts {
            messages: messages as usize,
            ..SchedulerCounts::default()
        };
        if domains.is_empty() {
            return Ok(counts);
        }
        let mut pipe = redis::pipe();
        for domain in &domains {
            let k = domain_keys(domain);
            pipe.cmd("LLEN").arg(&k.ready);
            pipe.cmd("ZCARD").arg(&k.deferred);
            pipe.cmd("ZCARD").arg(&k.leases);
        }
        let values = self.run("counts", &pipe).await?;
        let values: Vec<i64> = values
            .into_iter()
            .map(|v| parse("counts", v))
            .collect::<Result<_, _>>()?;
        let mut by_domain = BTreeMap::new();
        for (domain, n) in domains.into_iter().zip(values.chunks(3)) {
            let (ready, deferred, leased) = (n[0] as usize, n[1] as usize, n[2] as usize);
            counts.ready += ready;
            counts.deferred += deferred;
            counts.in_flight += leased;
            if ready + deferred + leased > 0 {
                by_domain.insert(domain, ready + deferred + leased);
            }
        }
        counts.deliveries_by_domain = by_domain;
        Ok(counts)
    }

    async fn records(
        &self,
        ids: &[MessageId],
    ) -> Result<Vec<Option<Arc<MessageRecord>>>, SpoolError> {
        let fetched = self.fetch(ids).await?;
        ids.iter()
            .zip(fetched)
            .map(|(id, bytes)| bytes.map(|b| decode(id, &b).map(Arc::new)).transpose())
            .collect()
    }

    async fn reclaim_holders(&self, holders: &[String]) -> Result<usize, SpoolError> {
        if holders.is_empty() {
            return Ok(0);
        }
        self.put_back(
            "reclaimed the deliveries of dead nodes",
            &self.scripts.reclaim_holders,
            holders,
        )
        .await
    }

    async fn reclaim_expired_leases(&self) -> Result<usize, SpoolError> {
        self.put_back(
            "reclaimed deliveries whose lease ran out",
            &self.scripts.reclaim,
            &[],
        )
        .await
    }
}

impl RedisSchedule {
    /// Runs a script that puts leased deliveries back to ready work
    /// (KEYS: ready, leases, holders; `args`) on every active domain in one
    /// pipeline; logs `what` per domain that had some and returns how many.
    async fn put_back(
        &self,
        what: &str,
        script: &Script,
        args: &[String],
    ) -> Result<usize, SpoolError> {
        let domains = self.active().await?;
        let replies = self
            .per_domain(what, &domains, |domain| {
                let k = domain_keys(domain);
                let mut cmd = evalsha(script, &[&k.ready, &k.leases, &k.holders]);
                cmd.arg(args);
                cmd
            })
            .await?;
        let mut total = 0;
        for (domain, reply) in domains.iter().zip(replies) {
            let n: i64 = parse(what, reply)?;
            if n > 0 {
                tracing::info!(%domain, deliveries = n, holders = %args.join(","), "{what}");
            }
            total += n as usize;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::delivery::RcptResult;
    use crate::schedule::suite::{self, outcome, policy, Fixture};
    use crate::spool::suite::message;
    use crate::spool::Spool;
    use smarthost_testkit::redis::RedisServer;

    async fn flush(server: &RedisServer) {
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
    }

    /// A node: a spool and a schedule on the shared server.
    async fn node(server: &RedisServer) -> (Arc<RedisSpool>, Arc<RedisSchedule>) {
        let spool = Arc::new(RedisSpool::open(&server.url()).await.expect("open"));
        let schedule = Arc::new(RedisSchedule::new(&spool).await.expect("schedule"));
        (spool, schedule)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_schedule_suite() {
        let server = RedisServer::start();
        suite::run(|| async {
            flush(&server).await;
            let (spool, schedule) = node(&server).await;
            Fixture {
                schedule: schedule as Arc<dyn Schedule>,
                spool: Some(spool as Arc<dyn Spool>),
            }
        })
        .await;
    }

    /// Stores messages `numbers` (all due) and schedules them.
    async fn queue(spool: &RedisSpool, schedule: &RedisSchedule, numbers: std::ops::Range<u64>) {
        let batch: Vec<_> = numbers.map(|n| message(n, 100)).collect();
        let records = batch.iter().map(|m| m.record.clone()).collect();
        spool.store(batch).await.unwrap();
        schedule.insert(records, u64::MAX / 2).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_taking_at_once_never_get_the_same_delivery() {
        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let (_, b) = node(&server).await;
        // 300 messages: 200 deliveries to example.org.
        queue(&spool, &a, 0..300).await;
        let lease = Duration::from_secs(60);
        let run = |s: Arc<RedisSchedule>, holder: &'static str| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let jobs = s.take("example.org", 7, holder, lease).await.unwrap();
                    if jobs.is_empty() {
                        return got;
                    }
                    got.extend(jobs.into_iter().map(|(r, _)| r.id.clone()));
                }
            })
        };
        let (from_a, from_b) = (run(a.clone(), "node-a"), run(b.clone(), "node-b"));
        let (from_a, from_b) = (from_a.await.unwrap(), from_b.await.unwrap());
        assert!(!from_a.is_empty() && !from_b.is_empty(), "both took some");
        let all: HashSet<_> = from_a.iter().chain(&from_b).cloned().collect();
        assert_eq!(all.len(), from_a.len() + from_b.len(), "no delivery twice");
        assert_eq!(all.len(), 200);
        assert_eq!(a.counts().await.unwrap().in_flight, 200);
    }

    #[tokio::test]
    async fn a_dead_nodes_leases_are_reclaimed_at_once_and_only_its() {
        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let (_, b) = node(&server).await;
        suite::dead_holders_are_reclaimed(spool, a, b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_expiry_sweeps_at_once_report_each_delivery_once() {
        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let (_, b) = node(&server).await;
        suite::two_sweeps_at_once_report_each_delivery_once(spool, a, b).await;
    }

    /// A sweep whose reports take longer than its claims last keeps them:
    /// another sweep, after the lapsed leases are reclaimed, finds nothing
    /// to expire and reports nothing twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_sweep_keeps_its_claims_and_nothing_is_reported_twice() {
        use std::sync::Mutex;

        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let (_, b) = node(&server).await;
        let claim = Duration::from_millis(900);
        let a = Arc::new(Arc::into_inner(a).unwrap().with_expiry_claim(claim));
        let b = Arc::new(Arc::into_inner(b).unwrap().with_expiry_claim(claim));
        // Four messages, eight deliveries.
        queue(&spool, &a, 0..4).await;

        let reports = Arc::new(Mutex::new(Vec::<(MessageId, String)>::new()));
        let hook = |slow: Duration| -> ReportHook {
            let reports = reports.clone();
            Arc::new(move |completions: Vec<Completion>| {
                let reports = reports.clone();
                Box::pin(async move {
                    tokio::time::sleep(slow).await;
                    let mut reports = reports.lock().unwrap();
                    for c in completions {
                        reports.push((c.record.id.clone(), c.domain.clone()));
                    }
                    Ok(())
                })
            })
        };
        let late = u64::MAX / 2;
        // A's reports take 0.6 s per message: 2.4 s for the four, well past
        // its 0.9 s claims.
        let slow = {
            let (a, hook) = (a.clone(), hook(Duration::from_millis(600)));
            tokio::spawn(async move { a.expire(late, &policy(), Some(&hook)).await.unwrap() })
        };
        // Meanwhile the leader's ticks reclaim lapsed leases and B sweeps.
        let fast = hook(Duration::ZERO);
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            b.reclaim_expired_leases().await.unwrap();
            b.expire(late, &policy(), Some(&fast)).await.unwrap();
        }
        slow.await.unwrap();
        // Whatever A gave back (too late for its claims), B finishes.
        for _ in 0..10 {
            b.reclaim_expired_leases().await.unwrap();
            b.expire(late, &policy(), Some(&fast)).await.unwrap();
            if b.counts().await.unwrap().messages == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let reported = reports.lock().unwrap().clone();
        let unique: HashSet<_> = reported.iter().cloned().collect();
        assert_eq!(unique.len(), reported.len(), "reported twice: {reported:?}");
        assert_eq!(unique.len(), 8, "every delivery reported: {reported:?}");
    }

    #[tokio::test]
    async fn an_expired_lease_is_reclaimed_and_taken_by_the_other_node() {
        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let (_, b) = node(&server).await;
        queue(&spool, &a, 0..1).await;
        let short = Duration::from_millis(100);
        assert_eq!(
            a.take("example.org", 5, "node-a", short)
                .await
                .unwrap()
                .len(),
            1
        );
        assert!(b
            .take("example.org", 5, "node-b", short)
            .await
            .unwrap()
            .is_empty());
        assert_eq!(b.reclaim_expired_leases().await.unwrap(), 0, "not yet");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(b.reclaim_expired_leases().await.unwrap(), 1);
        assert_eq!(
            b.ready_domains().await.unwrap(),
            ["example.net", "example.org"]
        );
        let jobs = b
            .take("example.org", 5, "node-b", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].0.id, message(0, 100).record.id);
    }

    #[tokio::test]
    async fn a_completion_after_the_lease_was_lost_is_harmless() {
        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let (_, b) = node(&server).await;
        queue(&spool, &a, 0..1).await;
        let id = message(0, 100).record.id;
        let t0 = message(0, 100).record.received_ms;
        a.take("example.org", 1, "node-a", Duration::from_millis(50))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(b.reclaim_expired_leases().await.unwrap(), 1);
        b.take("example.org", 1, "node-b", Duration::from_secs(60))
            .await
            .unwrap();

        // A's attempt did happen: deferred. Its outcome goes into the
        // record, but B's lease stays and nothing is filed for A.
        let deferred = outcome(&[(0, RcptResult::Deferred)]);
        let late = a
            .complete(&id, "example.org", &deferred, t0, &policy(), 0.0, None)
            .await
            .unwrap()
            .expect("recorded");
        assert_eq!(late.attempt, 1);
        let counts = b.counts().await.unwrap();
        assert_eq!((counts.in_flight, counts.deferred, counts.ready), (1, 0, 1));
        let holders: HashMap<String, String> = {
            let mut conn = redis::Client::open(server.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            redis::cmd("HGETALL")
                .arg(domain_keys("example.org").holders)
                .query_async(&mut conn)
                .await
                .unwrap()
        };
        assert_eq!(holders[id.as_str()], "node-b");

        // B delivers (a duplicate, at-least-once): its outcome lands on top
        // of A's record, which B's stale copy did not have.
        let delivered = outcome(&[(0, RcptResult::Delivered)]);
        let done = b
            .complete(&id, "example.org", &delivered, t0, &policy(), 0.0, None)
            .await
            .unwrap()
            .expect("recorded");
        assert_eq!(done.attempt, 2, "applied to the record A wrote");
        assert_eq!(done.record.deliveries.len(), 1, "example.net is left");
        let counts = b.counts().await.unwrap();
        assert_eq!((counts.in_flight, counts.deferred), (0, 0));

        // A finished delivery completed late by its old holder: nothing.
        b.take("example.net", 1, "node-b", Duration::from_secs(60))
            .await
            .unwrap();
        let net = outcome(&[(1, RcptResult::Delivered)]);
        let done = b
            .complete(&id, "example.net", &net, t0, &policy(), 0.0, None)
            .await
            .unwrap()
            .expect("done");
        assert!(done.message_done());
        assert!(a
            .complete(&id, "example.net", &net, t0, &policy(), 0.0, None)
            .await
            .unwrap()
            .is_none());
        assert_eq!(b.counts().await.unwrap(), SchedulerCounts::default());
        // The body stays a while for a report, then Redis drops it.
        assert!(spool.read_body(&id).await.is_ok());
        assert!(spool.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn round_trips_per_operation() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut trips = smarthost_testkit::since_last(|| s.round_trips());
        let batch: Vec<_> = (0..30).map(|n| message(n * 3, 100)).collect();
        let records = batch.iter().map(|m| m.record.clone()).collect();
        spool.store(batch).await.unwrap();
        s.insert(records, u64::MAX / 2).await.unwrap();
        assert_eq!(trips(), 1, "insert of 30 messages");
        let jobs = s
            .take("example.org", 20, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(jobs.len(), 20);
        assert_eq!(trips(), 2, "take of 20: the script, then the records");
        let t0 = jobs[0].0.received_ms;
        let deferred = outcome(&[(0, RcptResult::Deferred)]);
        s.complete(
            &jobs[0].0.id,
            "example.org",
            &deferred,
            t0,
            &policy(),
            0.0,
            None,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(trips(), 2, "complete: the record, then the domain");
        let delivered = outcome(&[(0, RcptResult::Delivered), (1, RcptResult::Delivered)]);
        s.complete(
            &jobs[1].0.id,
            "example.org",
            &delivered,
            t0,
            &policy(),
            0.0,
            None,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(trips(), 2, "complete with its index entry");
        s.release(&jobs[2].0.id, "example.org").await.unwrap();
        assert_eq!(trips(), 1, "release");
        s.promote(t0).await.unwrap();
        assert_eq!(trips(), 2, "promote");
        s.reclaim_expired_leases().await.unwrap();
        assert_eq!(trips(), 2, "reclaim");
        s.has_ready("example.org").await.unwrap();
        assert_eq!(trips(), 1, "has_ready");
    }

    #[tokio::test]
    async fn scripts_lost_in_a_restart_are_loaded_again() {
        let mut server = RedisServer::start();
        let (spool, s) = node(&server).await;
        queue(&spool, &s, 0..2).await;
        server.restart();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let jobs = loop {
            match s
                .take("example.org", 5, "node-a", Duration::from_secs(60))
                .await
            {
                Ok(jobs) => break jobs,
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(jobs.len(), 1, "message 0's example.org delivery");
    }
}
