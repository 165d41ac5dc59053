//! The Redis spool: accepted mail kept in a Redis server that every node of a
//! cluster can reach.
//!
//! # Key schema
//!
//! Every key of one message shares the hash tag `{m:<id>}`, so on Redis
//! Cluster a message lives in one slot and a transaction or script may
//! touch all of its keys:
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `smarthost:{m:<id>}:record` | string | [`envelope::encode`] of the [`MessageRecord`] |
//! | `smarthost:{m:<id>}:body` | string | [`envelope::encode`] of the body, as one byte string |
//! | `smarthost:{index}:messages` | sorted set | member `<id>`, score the receive time in ms |
//! | `smarthost:{m:<id>}:quarantined` | hash | a record set aside: `record`, `body`, `reason`, `at` (ms) |
//! | `smarthost:{index}:quarantine` | sorted set | member `<id>`, score when it was set aside (ms) |
//!
//! Both values start with the record version byte, so a node of a newer
//! release reads what an older one wrote, and a value of a version this
//! release does not know is [`SpoolError::Corrupt`], never a panic. A
//! record that cannot be read is set aside ([`quarantine`]) wherever it is
//! met (a listing, a page of the rescan, the schedule's take, completion
//! and expiry sweep), so that it stalls nothing and is never read again;
//! [`Spool::quarantined`] lists it for operators. The
//! index orders [`Spool::list`] by receive time, ties by id (ids are hex
//! strings of equal length, so Redis's member order is the id order).
//!
//! The scheduling keys of the shared queue (ready work per domain, deferred
//! work by next attempt, leases; see [`crate::schedule::redis`]) use
//! `{d:<domain>}` tags and refer to messages by id; they do not change the
//! keys above. That schedule also writes records (through the key helpers
//! here) when a delivery completes or expires.
//!
//! # Consistency
//!
//! On one Redis server `store` and `remove` are each one `MULTI`/`EXEC`
//! transaction: no reader sees half of one, and a server that dies in the
//! middle of one drops the unfinished transaction when it replays its AOF.
//! A `store` there is the index `ZADD` and one `MSET` of every record and
//! body of the batch: four commands however many messages it holds.
//! [`Spool::store_scheduled`] adds the schedule's insert of the batch to
//! the same transaction, so that both cost one round trip and one AOF
//! fsync turn of the server.
//!
//! On Redis Cluster (`queue.redis_cluster`) the index lives in its own
//! slot, so no transaction can span a message and its index entry. The
//! order of the writes is chosen so that an interrupted `store` or `remove`
//! leaves at worst an index entry without a message, never a message
//! without an index entry (which nothing would ever find, deliver or
//! bounce):
//!
//! - `store` adds the index entries of the batch first (one request), then
//!   writes the message keys: one `MSET` of record and body per message,
//!   in its slot, atomic by itself (a body staged from disk is placed by
//!   a script instead), all sent at once;
//! - `remove` deletes the message keys first (one `DEL` in the message
//!   slot), then the index entry.
//!
//! [`Spool::list`] and [`Spool::list_page`] (and the schedule's expiry
//! sweep) skip an index entry whose record is missing and delete it once
//! the message's receive time is [`dangling_grace`] in the past (read
//! before the records are): a younger entry may belong to a `store` whose
//! message keys are still on their way. A `store` that failed was never
//! acknowledged, so its client sends the message again; a `remove` that
//! failed removed a message that was done anyway.
//!
//! The grace is [`STORE_TIMEOUTS`] response timeouts plus [`CLOCK_SKEW`]
//! (60 s with the default 5 s timeout). A cluster `store` keeps within it
//! by construction, however long its batch waited behind others (an
//! overloaded node, slow replies): its message writes are sent only while
//! a whole response timeout is left before the *store deadline*, the
//! earliest receive time (index score) of the batch plus [`STORE_TIMEOUTS`]
//! timeouts (node clock), and their replies are waited for one response
//! timeout. So an acknowledged `store` had every `EXEC` run before its
//! deadline; a `store` past its window is refused with
//! [`SpoolError::Unavailable`] before it sends any message write (the
//! client hears `451` and sends the message again; the index entries it
//! wrote are orphans that a reader cleans). A reader that deletes an entry
//! read its record after `received + grace` on its own clock, at most
//! [`CLOCK_SKEW`] ahead, so after the deadline and so after that `EXEC`,
//! and found the record. An entry of a message answered `250` is thus
//! never taken for an orphan. (The clocks count: a node clock stepped
//! back or forth counts against [`CLOCK_SKEW`].)
//!
//! A message write whose reply did not come in time (the store was
//! refused) may still run later: it was sent. Nothing schedules that
//! message (the queue schedules a message only once its `store` was
//! acknowledged), and the client sends it again under a new id. Then
//! either
//!
//! - its index entry is still there: the message is complete but not
//!   scheduled, and the leader's rescan schedules it, so it is delivered
//!   as well as the resend. This is the duplicate of a write whose reply
//!   was lost (at-least-once around a fault), the same as a timed-out
//!   transaction on one server; never more often, since the writes always
//!   get a whole response timeout, like every other request; or
//! - a reader deleted its index entry first (only once past the grace):
//!   the keys are left without an index entry and without a schedule
//!   entry. Nothing lists, delivers or bounces them: a harmless leftover
//!   that takes memory until an operator deletes it
//!   (`smarthost:{m:<id>}:*` keys of an id absent from the index).
//!
//! On one server `store` writes the index entries and the message keys in
//! one `MULTI`/`EXEC`, so no reader ever sees one without the other; no
//! deadline applies there.

//! # Round trips
//!
//! `store` of a whole batch, `update`, `remove` and `read_body` are one
//! round trip each; `list` and `list_page` are two (the index, then all
//! records in one pipeline), plus one when they clean dangling index
//! entries and three per record set aside; `quarantined` is two.
//! [`RedisSpool::round_trips`] counts them. On Redis Cluster `store` and
//! `remove` are two (the ordered steps above); requests sent at once to
//! several primaries (the messages of a batch, the records of `list`)
//! count as one, as they wait for one another's replies only once.
//!
//! # Durability
//!
//! `open` reads the server's persistence settings (`appendonly` from
//! `INFO persistence`, `appendfsync` with `CONFIG GET`) and whether it has
//! `WAITAOF` (Redis 7.2), and logs what an acknowledged write means
//! ([`Durability`]):
//!
//! - `appendonly yes` with `appendfsync always`: Redis fsyncs the AOF before
//!   it replies, so a reply is a write on disk.
//! - `appendonly yes` and `WAITAOF` present: every write is followed, in the
//!   same round trip, by `WAITAOF 1 0 <timeout>`, and fails unless the local
//!   AOF was fsynced in time.
//! - Otherwise (AOF off, `appendfsync everysec`/`no` without `WAITAOF`, or
//!   `CONFIG` disabled so `appendfsync` cannot be read): a reply means the
//!   write is in the server's memory. A server crash loses up to about a
//!   second of acknowledged mail with `everysec`, and everything since the
//!   last snapshot without an AOF. `open` warns about it.
//!
//! `WAIT` for replicas is not issued: it says nothing about the primary's
//! disk, and with no replica configured `WAIT 0` returns at once.
//! On Redis Cluster every primary is asked, and the spool takes the
//! weakest answer: a write is only as durable as the primary it lands on.
//!
//! # Guarded all the time
//!
//! Settings change under a running node: `CONFIG SET`, a restart from
//! another configuration file, a failover to a replica configured
//! otherwise. So the settings are read again every
//! [`RedisSpoolOptions::check_interval`] (5 s) by a task of the spool, on
//! every primary, and before the next `store` after any request of the
//! spool failed (the connection reconnects then, maybe to another server).
//! [`Spool::store`], new mail, is refused ([`SpoolError::Unavailable`], the
//! client gets `451 4.3.0`) while:
//!
//! - a primary's `maxmemory-policy` is not `noeviction`: Redis would
//!   evict queued mail, silently, once full (`open` fails outright);
//! - the persistence ([`Persistence`]) is weaker than it was at `open`, or
//!   than `queue.redis_require_fsync` asks for (then `open` fails too).
//!
//! A server still loading its data after a restart answers `INFO` with
//! `aof_enabled:0`; that is no verdict: the check fails as unavailable
//! (so does every write meanwhile) and runs again before the next store.
//!
//! Each change of that verdict is logged once: at error level when mail is
//! refused, at info level when it is accepted again. Updates and removals
//! of stored mail go on meanwhile, so what is queued is still delivered.
//! Between two checks a changed server is not yet noticed: up to one
//! interval of mail is acknowledged under the weaker settings.
//!
//! # Failures
//!
//! Every Redis error, a refused or lost connection and a reply that does
//! not come within the response timeout are [`SpoolError::Unavailable`].
//! The connection reconnects by itself (on a cluster, to the node that
//! came back, following the slot map): once the server is back, the next
//! operations succeed without reopening the spool.

use crate::now_ms;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::try_join_all;
use redis::{
    Cmd, ErrorKind, FromRedisValue, Pipeline, RedisWrite, ServerErrorKind, ToRedisArgs, Value,
};
use serde::{Deserialize, Serialize};
use smarthost_coordinator::redis::Connection;
use smarthost_proto::envelope::{self, MessageId, MessageRecord};

use super::{
    Body, ListCursor, NewMessage, Quarantined, Spool, SpoolError, Stored, READ_WHOLE_UP_TO,
};
use crate::metrics::RedisFailure;
use crate::schedule::redis::Fresh;
use crate::schedule::Schedule;

/// The sorted set of all stored messages by receive time.
pub const INDEX_KEY: &str = "smarthost:{index}:messages";

/// The sorted set of messages set aside as unreadable, by the time they
/// were set aside (ms).
pub const QUARANTINE_KEY: &str = "smarthost:{index}:quarantine";

/// See `scripts/quarantine.lua`.
const QUARANTINE: &str = include_str!("scripts/quarantine.lua");
const RESTORE: &str = include_str!("scripts/restore.lua");
const PLACE_BODY: &str = include_str!("scripts/place_body.lua");

/// How much of a body on disk goes to Redis per request while it is
/// staged: ten round trips for a 10 MB message.
const STAGING_CHUNK: usize = 1 << 20;

/// How long a body written in parts waits under its staging key for the
/// store that puts it in place; past it, a node that died half way has
/// left nothing behind.
const STAGING_TTL_SECS: u64 = 3600;

/// How many response timeouts (`queue.redis_response_timeout`) after the
/// receive time a cluster `store` may get its last reply: its wait behind
/// other batches and its own two requests. A store that cannot finish by
/// then is refused before it sends its message writes (see "Consistency"
/// in the module doc).
pub const STORE_TIMEOUTS: u32 = 6;

/// How far the clocks of two nodes may differ: receive times are taken on
/// the receiving node's clock, the age of an index entry on the reader's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// How old (by receive time) an index entry without a record must be
/// before a reader deletes it: [`STORE_TIMEOUTS`] response timeouts plus
/// [`CLOCK_SKEW`]. A younger entry may belong to a store in flight.
pub fn dangling_grace(response_timeout: Duration) -> Duration {
    response_timeout * STORE_TIMEOUTS + CLOCK_SKEW
}

/// Whether the message writes of a cluster `store` of a batch whose
/// earliest receive time is `received_ms` may still be sent at `now_ms`:
/// waited for one `response_timeout`, their replies must come by the store
/// deadline, `received_ms` plus [`STORE_TIMEOUTS`] response timeouts, so
/// that no reader has taken their index entries for orphans meanwhile.
pub(crate) fn store_window_open(received_ms: u64, now_ms: u64, response_timeout: Duration) -> bool {
    let timeout = u64::try_from(response_timeout.as_millis()).unwrap_or(u64::MAX);
    let deadline = received_ms.saturating_add(timeout.saturating_mul(u64::from(STORE_TIMEOUTS)));
    now_ms.saturating_add(timeout) <= deadline
}

/// The receive time before which an index entry without a record is an
/// orphan; taken before the records are read, so that a record written
/// after this moment is seen by the read.
pub(crate) fn dangling_cutoff(response_timeout: Duration) -> u64 {
    now_ms().saturating_sub(dangling_grace(response_timeout).as_millis() as u64)
}

pub fn record_key(id: &MessageId) -> String {
    format!("smarthost:{{m:{id}}}:record")
}

pub fn body_key(id: &MessageId) -> String {
    format!("smarthost:{{m:{id}}}:body")
}

/// Where a large body is written in parts before its store (see
/// `scripts/place_body.lua`).
pub fn staging_key(id: &MessageId) -> String {
    format!("smarthost:{{m:{id}}}:body-parts")
}

/// The record, body, reason and time of a message set aside as unreadable.
pub fn quarantined_key(id: &MessageId) -> String {
    format!("smarthost:{{m:{id}}}:quarantined")
}

/// Sets the message `id` aside because its record `bytes` cannot be read
/// (`reason`): its keys move into its quarantine hash, its index entry into
/// the quarantine index, so that no sweep, rescan or domain reads it again
/// and the work around it goes on. Logs the error once, when it moves.
/// Three ordered requests: the quarantine index entry first (listing skips
/// an entry without its hash), the move in the message slot, then the
/// message index entry goes. Rare, so the requests are not counted as
/// round trips of the caller.
pub async fn quarantine(
    conn: &Connection,
    timeout: Duration,
    id: &MessageId,
    bytes: &[u8],
    reason: &str,
) -> Result<(), SpoolError> {
    let at = now_ms();
    let request = |pipe: redis::Pipeline| {
        let mut conn = conn.clone();
        async move {
            match tokio::time::timeout(timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(e)) => Err(SpoolError::Unavailable(format!("redis quarantine: {e}"))),
                Err(_) => Err(SpoolError::Unavailable(format!(
                    "redis quarantine: no reply within {timeout:?}"
                ))),
            }
        }
    };
    let mut pipe = redis::pipe();
    pipe.cmd("ZADD")
        .arg(QUARANTINE_KEY)
        .arg("NX")
        .arg(at)
        .arg(id.as_str());
    request(pipe).await?;
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL")
        .arg(QUARANTINE)
        .arg(3)
        .arg(record_key(id))
        .arg(body_key(id))
        .arg(quarantined_key(id))
        .arg(bytes)
        .arg(reason)
        .arg(at);
    let moved = request(pipe).await?.first().map(as_int).unwrap_or(0);
    if moved == 0 {
        // Written again meanwhile (or gone): whoever reads it next judges it.
        return Ok(());
    }
    let mut pipe = redis::pipe();
    pipe.cmd("ZREM").arg(INDEX_KEY).arg(id.as_str());
    request(pipe).await?;
    if moved == 1 {
        tracing::error!(message_id = %id, %reason, key = %quarantined_key(id),
            "redis spool: an unreadable message was set aside; its deliveries stop \
             (smarthost queue quarantine lists it)");
    }
    Ok(())
}

/// How a [`RedisSpool`] talks to its server.
#[derive(Clone, Debug)]
pub struct RedisSpoolOptions {
    /// The longest wait for a connection or for the reply to one
    /// operation (reconnecting included) before it is `Unavailable`.
    pub response_timeout: Duration,
    /// The URL lists seed nodes of a Redis Cluster, not one server.
    pub cluster: bool,
    /// Every write waits (`WAIT`) until this many replicas have it, and
    /// fails otherwise: an acknowledged message then survives the failover
    /// to a replica. 0: no wait.
    pub min_replicas: u32,
    /// Refuse to open, and refuse new mail, unless every primary fsyncs
    /// each write before acknowledging it ([`Persistence::Fsynced`]).
    pub require_fsync: bool,
    /// How often the server's settings are read again (see "Guarded all
    /// the time" in the module doc).
    pub check_interval: Duration,
    /// Where a body larger than [`READ_WHOLE_UP_TO`] is copied, in a
    /// nameless file, while it is delivered.
    pub body_dir: std::path::PathBuf,
}

impl Default for RedisSpoolOptions {
    fn default() -> Self {
        RedisSpoolOptions {
            response_timeout: Duration::from_secs(5),
            cluster: false,
            min_replicas: 0,
            require_fsync: false,
            check_interval: Duration::from_secs(5),
            body_dir: std::env::temp_dir(),
        }
    }
}

/// What an acknowledged write means on the server `open` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// `appendonly yes`, `appendfsync always`: fsynced before the reply.
    AofFsyncAlways,
    /// `appendonly yes` and `WAITAOF`: each write waits for the fsync.
    WaitAof,
    /// In the server's memory only; a server crash may lose it.
    Memory,
}

/// How much of an acknowledged write survives a crash of the Redis server,
/// weakest first: the spool refuses new mail when it drops below what it
/// was at `open`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Persistence {
    /// No append-only file: at best the last snapshot.
    NoAof,
    /// An append-only file that the OS writes out when it likes
    /// (`appendfsync no`, or a setting that cannot be read).
    AofNoFsync,
    /// An append-only file fsynced every second.
    AofEverySec,
    /// Every write is on disk before it is acknowledged (`appendfsync
    /// always`, or a `WAITAOF` after each write).
    Fsynced,
}

impl std::fmt::Display for Persistence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Persistence::NoAof => "no append-only file",
            Persistence::AofNoFsync => "an append-only file without fsync",
            Persistence::AofEverySec => "an append-only file fsynced every second",
            Persistence::Fsynced => "every write fsynced before the reply",
        })
    }
}

/// What one check read from the servers (every primary of a cluster).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Settings {
    /// The append-only file is on (on every primary).
    aof: bool,
    /// The weakest `appendfsync`; `None` when `CONFIG` cannot be read.
    appendfsync: Option<String>,
    /// A `maxmemory-policy` other than `noeviction`, if a primary has one.
    eviction: Option<String>,
    /// The primaries' run ids: new ones mean a restart or a failover.
    run_ids: Vec<String>,
}

impl Settings {
    /// The persistence, given how the spool writes: with `WAITAOF` after
    /// each write, an AOF is as good as `appendfsync always`.
    fn persistence(&self, durability: Durability) -> Persistence {
        if !self.aof {
            return Persistence::NoAof;
        }
        if durability == Durability::WaitAof {
            return Persistence::Fsynced;
        }
        match self.appendfsync.as_deref() {
            Some("always") => Persistence::Fsynced,
            Some("everysec") => Persistence::AofEverySec,
            _ => Persistence::AofNoFsync,
        }
    }

    /// Why new mail must be refused with these settings, if it must: an
    /// eviction policy, or persistence below `floor`.
    fn refusal(&self, durability: Durability, floor: Persistence) -> Option<String> {
        if let Some(policy) = &self.eviction {
            return Some(format!(
                "maxmemory-policy is {policy}: Redis may evict queued mail when it is full; \
                 set maxmemory-policy noeviction"
            ));
        }
        let persistence = self.persistence(durability);
        if persistence < floor {
            return Some(format!(
                "the persistence weakened to {persistence} (appendonly {}, appendfsync {}), \
                 below {floor}; restore appendonly yes and appendfsync always",
                if self.aof { "yes" } else { "no" },
                self.appendfsync.as_deref().unwrap_or("unknown"),
            ));
        }
        None
    }
}

/// A body in memory as a command argument: one byte string behind the
/// version byte, as [`Spool::read_body`] reads it, written straight into the
/// command rather than into a buffer of its own first.
struct StoredBody<'a>(&'a [u8]);

impl StoredBody<'_> {
    /// The length of the argument it writes.
    fn encoded_len(&self) -> usize {
        encode_body_head(self.0.len() as u64).len() + self.0.len()
    }
}

impl ToRedisArgs for StoredBody<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        let mut arg = out.writer_for_next_arg();
        // Writes into the command's own buffer, which cannot fail.
        let _ = arg.write_all(&encode_body_head(self.0.len() as u64));
        let _ = arg.write_all(self.0);
    }
}

/// What [`StoredBody`] puts before a body of `len` bytes: the body is
/// then stored in parts, with these bytes in front of the first.
#[derive(Serialize, Deserialize)]
struct BodyHead {
    len: u64,
}

fn encode_body_head(len: u64) -> Vec<u8> {
    envelope::encode(&BodyHead { len })
}

/// An entry of the index as `ZRANGE … WITHSCORES` answers it.
fn index_entry((id, score): (String, f64)) -> ListCursor {
    ListCursor {
        received_ms: score as u64,
        id: MessageId(id),
    }
}

fn decode_record(id: &MessageId, bytes: &[u8]) -> Result<MessageRecord, SpoolError> {
    envelope::decode(bytes).map_err(|e| SpoolError::Corrupt(format!("record of {id}: {e}")))
}

/// A whole stored body as [`StoredBody`] wrote it.
#[cfg(test)]
fn decode_body(id: &MessageId, bytes: &[u8]) -> Result<Vec<u8>, SpoolError> {
    let corrupt = |why: String| SpoolError::Corrupt(format!("body of {id}: {why}"));
    let (BodyHead { len }, used) =
        envelope::decode_prefix(bytes).map_err(|e| corrupt(e.to_string()))?;
    if (bytes.len() - used) as u64 != len {
        return Err(corrupt(format!("{} bytes for {len}", bytes.len() - used)));
    }
    Ok(bytes[used..].to_vec())
}

/// The ids of the index entries among `missing` (their record is gone)
/// received before `cutoff` ([`dangling_cutoff`], taken before the records
/// were read): a younger one may belong to a `store` whose message keys
/// are still on their way.
pub(crate) fn dangling<'e>(
    cutoff: u64,
    missing: impl Iterator<Item = &'e ListCursor>,
) -> Vec<MessageId> {
    missing
        .filter(|entry| entry.received_ms < cutoff)
        .map(|entry| entry.id.clone())
        .collect()
}

/// The URL (or seed list) without passwords, for logs and messages.
pub(crate) fn redact(url: &str) -> String {
    smarthost_coordinator::redis::redact(url)
}

/// The replies of the commands of a transaction, from its `EXEC` reply;
/// each may be an error.
fn exec_replies_of(what: &str, reply: Value) -> Result<Vec<Value>, SpoolError> {
    match reply {
        Value::Array(items) => Ok(items),
        Value::Nil => Err(SpoolError::Unavailable(format!(
            "redis {what}: transaction aborted"
        ))),
        other => Err(SpoolError::Unavailable(format!(
            "redis {what}: unexpected EXEC reply {other:?}"
        ))),
    }
}

/// The first error among `replies`.
fn server_error(replies: &[Value]) -> Option<&redis::ServerError> {
    replies.iter().find_map(|v| match v {
        Value::ServerError(e) => Some(e),
        _ => None,
    })
}

/// The `WAITAOF` reply `[local, replicas]`: fine if the local AOF is synced.
fn check_waitaof(what: &str, reply: &[i64]) -> Result<(), SpoolError> {
    match reply.first() {
        Some(&local) if local >= 1 => Ok(()),
        _ => Err(SpoolError::Unavailable(format!(
            "redis {what}: the write was not fsynced to the AOF in time ({reply:?})"
        ))),
    }
}

/// `WAIT` answered how many replicas have the write; fewer than asked
/// means a failover now could lose it.
fn check_replicas(what: &str, acknowledged: i64, wanted: u32) -> Result<(), SpoolError> {
    if acknowledged >= i64::from(wanted) {
        return Ok(());
    }
    Err(SpoolError::Unavailable(format!(
        "redis {what}: {acknowledged} of {wanted} replicas acknowledged the write in time"
    )))
}

/// The write of a new message's keys (one slot), one command and atomic
/// by itself. A body partly on disk was staged by
/// [`RedisSpool::stage_body`] and is put in place with the record by one
/// script; any other is one `MSET` of record and body.
fn message_write(m: &NewMessage) -> Cmd {
    let id = &m.record.id;
    if m.body.rest().is_some() {
        let staged = encode_body_head(m.body.len()).len() as u64 + m.body.len();
        let mut place = redis::cmd("EVAL");
        place
            .arg(PLACE_BODY)
            .arg(3)
            .arg(staging_key(id))
            .arg(body_key(id))
            .arg(record_key(id))
            .arg(staged)
            .arg(envelope::encode(&m.record));
        return place;
    }
    message_set(&[m])
}

/// The index entries of `batch`, written first: see "Consistency" in the
/// module doc.
fn index_add(batch: &[NewMessage]) -> Cmd {
    let mut zadd = redis::cmd("ZADD");
    zadd.arg(INDEX_KEY);
    for m in batch {
        zadd.arg(m.record.received_ms).arg(m.record.id.as_str());
    }
    zadd
}

/// The commands that store `batch` on one server, for a transaction:
/// every message in memory in one `MSET`, whatever its slot; a spilled
/// body is placed by its own script.
fn store_commands(batch: &[NewMessage]) -> Vec<Cmd> {
    let mut commands = vec![index_add(batch)];
    let (spilled, in_memory): (Vec<&NewMessage>, Vec<&NewMessage>) =
        batch.iter().partition(|m| m.body.rest().is_some());
    commands.extend(spilled.into_iter().map(message_write));
    if !in_memory.is_empty() {
        commands.push(message_set(&in_memory));
    }
    commands
}

/// One `MSET` of the record and body keys of `messages`, all in memory.
/// Its buffer is sized once: grown by doubling, a batch of 100 KB bodies
/// was copied again at every step, each time into fresh pages.
fn message_set(messages: &[&NewMessage]) -> Cmd {
    let args: Vec<_> = messages
        .iter()
        .map(|m| {
            let id = &m.record.id;
            (record_key(id), envelope::encode(&m.record), body_key(id))
        })
        .collect();
    let size: usize = messages
        .iter()
        .zip(&args)
        .map(|(m, (record_key, record, body_key))| {
            record_key.len()
                + record.len()
                + body_key.len()
                + StoredBody(m.body.head()).encoded_len()
        })
        .sum();
    let mut set = Cmd::with_capacity(1 + 4 * messages.len(), "MSET".len() + size);
    set.arg("MSET");
    for (m, (record_key, record, body_key)) in messages.iter().zip(args) {
        set.arg(record_key)
            .arg(record)
            .arg(body_key)
            .arg(StoredBody(m.body.head()));
    }
    set
}

fn parse_value<T: FromRedisValue>(value: Value) -> Result<T, String> {
    redis::from_redis_value(value).map_err(|e| format!("unexpected reply: {e}"))
}

/// The weakest of the values of a persistence setting on several primaries
/// (for `appendonly`: `no` if any says `no`; for `appendfsync`: `no`, then
/// `everysec`, then `always`): a write is only as safe as the node it
/// lands on.
fn weakest(name: &str, values: Vec<String>) -> Result<String, SpoolError> {
    let rank = |v: &str| match v {
        "always" | "yes" => 2,
        "everysec" => 1,
        _ => 0,
    };
    values
        .into_iter()
        .min_by_key(|v| rank(v))
        .ok_or_else(|| SpoolError::Unavailable(format!("redis CONFIG GET {name}: no reply")))
}

fn as_int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        _ => 0,
    }
}

/// A self-reconnecting connection to the server at `url` (or, with
/// `cluster`, to the Redis Cluster of the seed nodes listed in `url`)
/// whose every reply (reconnecting included) comes within `timeout` or is
/// an error. The error names the server without its password.
pub(crate) async fn connect(
    url: &str,
    cluster: bool,
    timeout: Duration,
) -> Result<Connection, String> {
    Connection::connect(url, cluster, timeout).await
}

/// One round trip within `timeout`, reconnecting included: an error or no
/// reply in time is a sentence naming `what`.
pub(crate) async fn bounded<T>(
    timeout: Duration,
    what: &str,
    request: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("redis {what}: {e}")),
        Err(_) => Err(format!("redis {what}: no reply within {timeout:?}")),
    }
}

/// The Redis implementation of [`Spool`].
pub struct RedisSpool {
    conn: Connection,
    options: RedisSpoolOptions,
    durability: Durability,
    round_trips: AtomicU64,
    /// Re-reads the server's settings and says whether new mail may come.
    guard: Arc<Guard>,
    /// Tells this spool from others, for the schedule made for it
    /// ([`RedisSpool::instance`]).
    instance: u64,
}

/// Keeps the spool's verdict on the server's settings current: checked by
/// a task every `check_interval`, and by `store` after a failed request.
struct Guard {
    conn: Connection,
    shown: String,
    timeout: Duration,
    durability: Durability,
    /// The weakest persistence that new mail is accepted on.
    floor: Persistence,
    /// A request of the spool failed since the last check.
    stale: AtomicBool,
    /// Why new mail is refused (`None`: accepted) and the run ids, as the
    /// last check found them.
    state: Mutex<(Option<String>, Vec<String>)>,
    /// One check at a time; a store that needs one waits for it.
    checking: tokio::sync::Mutex<()>,
}

impl Guard {
    /// Reads the settings and updates the verdict, logging a change once.
    async fn check(&self) -> Result<(), SpoolError> {
        let _one = self.checking.lock().await;
        let settings = read_settings(&self.conn, self.timeout).await?;
        let refusal = settings.refusal(self.durability, self.floor);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.1 != settings.run_ids && !state.1.is_empty() {
            tracing::warn!(redis = %self.shown, persistence = %settings.persistence(self.durability),
                "redis spool: the server restarted or failed over; its settings were checked again");
        }
        if state.0 != refusal {
            match &refusal {
                Some(why) => tracing::error!(redis = %self.shown, reason = %why,
                    "redis spool: refusing new mail (451) until the Redis settings are safe again"),
                None => tracing::info!(redis = %self.shown,
                    persistence = %settings.persistence(self.durability),
                    "redis spool: the Redis settings are safe again; accepting new mail"),
            }
        }
        *state = (refusal, settings.run_ids);
        self.stale.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Whether new mail may be stored now: checks first after a failed
    /// request.
    async fn admit(&self) -> Result<(), SpoolError> {
        if self.stale.load(Ordering::SeqCst) {
            self.check().await?;
        }
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &state.0 {
            Some(why) => Err(SpoolError::Unavailable(format!("redis: {why}"))),
            None => Ok(()),
        }
    }

    /// Checks every `every` while the spool lives.
    fn watch(guard: Weak<Guard>, every: Duration) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(guard) = guard.upgrade() else { return };
                if let Err(error) = guard.check().await {
                    tracing::debug!(%error, "redis spool: cannot check the settings now");
                    guard.stale.store(true, Ordering::SeqCst);
                }
            }
        });
    }
}

/// Whether every primary has `WAITAOF` (Redis 7.2) for the spool to rely on.
async fn has_waitaof(conn: &Connection, timeout: Duration) -> bool {
    let mut cmd = redis::cmd("COMMAND");
    cmd.arg("INFO").arg("WAITAOF");
    on_every_primary(conn, timeout, "COMMAND INFO", &cmd)
        .await
        .ok()
        .filter(|replies| !replies.is_empty())
        .is_some_and(|replies| {
            replies.iter().all(|reply| {
                parse_value::<Vec<Value>>(reply.clone())
                    .ok()
                    .and_then(|info| info.into_iter().next())
                    .is_some_and(|v| v != Value::Nil)
            })
        })
}

/// Says at open what an acknowledged write means.
fn log_durability(shown: &str, settings: &Settings, durability: Durability) {
    let aof = if settings.aof { "yes" } else { "no" };
    match (settings.appendfsync.as_deref(), durability) {
        (_, Durability::AofFsyncAlways) => tracing::info!(redis = %shown,
            "redis spool: appendfsync always, an acknowledged write is on disk"),
        (fsync, Durability::WaitAof) => tracing::info!(redis = %shown,
            appendfsync = fsync.unwrap_or("unknown"),
            "redis spool: every write waits for WAITAOF, an acknowledged write is on disk"),
        (Some(fsync), Durability::Memory) => tracing::warn!(redis = %shown, appendonly = aof,
            appendfsync = %fsync, "redis spool: an acknowledged write is only in the server's memory; \
             a Redis crash can lose accepted mail (set appendonly yes, appendfsync always)"),
        (None, Durability::Memory) => tracing::warn!(redis = %shown, appendonly = aof,
            "redis spool: cannot read appendfsync (CONFIG disabled?); \
             assuming an acknowledged write is only in the server's memory"),
    }
}

/// `cmd` on the server, or on every primary of a cluster, within `timeout`.
async fn on_every_primary(
    conn: &Connection,
    timeout: Duration,
    what: &str,
    cmd: &Cmd,
) -> Result<Vec<Value>, SpoolError> {
    let mut conn = conn.clone();
    match tokio::time::timeout(timeout, conn.on_every_primary(cmd)).await {
        Ok(Ok(replies)) => Ok(replies),
        Ok(Err(e)) => Err(SpoolError::Unavailable(format!("redis {what}: {e}"))),
        Err(_) => Err(SpoolError::Unavailable(format!(
            "redis {what}: no reply within {timeout:?}"
        ))),
    }
}

/// The field `name` of an `INFO` reply.
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

/// Reads the settings of every primary: `INFO` (works where `CONFIG` is
/// disabled) and `CONFIG GET appendfsync`; two requests sent at once.
async fn read_settings(conn: &Connection, timeout: Duration) -> Result<Settings, SpoolError> {
    let info = redis::cmd("INFO");
    let mut fsync = redis::cmd("CONFIG");
    fsync.arg("GET").arg("appendfsync");
    let (infos, fsyncs) = tokio::join!(
        on_every_primary(conn, timeout, "INFO", &info),
        on_every_primary(conn, timeout, "CONFIG GET", &fsync),
    );
    let mut settings = Settings {
        aof: true,
        appendfsync: None,
        eviction: None,
        run_ids: Vec::new(),
    };
    for reply in infos? {
        let text: String =
            parse_value(reply).map_err(|e| SpoolError::Unavailable(format!("redis INFO: {e}")))?;
        // While a restarted server loads its data it reports
        // `aof_enabled:0`: not a weaker server, one not ready yet.
        if info_field(&text, "loading") == Some("1") {
            return Err(SpoolError::Unavailable(
                "redis is loading its data set".into(),
            ));
        }
        settings.aof &= info_field(&text, "aof_enabled") == Some("1");
        match info_field(&text, "maxmemory_policy") {
            Some("noeviction") => {}
            Some(policy) => settings.eviction = Some(policy.to_string()),
            None => {
                return Err(SpoolError::Unavailable(
                    "redis INFO: no maxmemory_policy".into(),
                ))
            }
        }
        settings
            .run_ids
            .push(info_field(&text, "run_id").unwrap_or_default().to_string());
    }
    settings.run_ids.sort();
    // CONFIG may be renamed away (managed services): then unknown.
    if let Ok(replies) = fsyncs {
        let mut values = Vec::with_capacity(replies.len());
        for reply in replies {
            let pairs: Vec<(String, String)> = parse_value(reply).unwrap_or_default();
            match pairs.into_iter().find(|(k, _)| k == "appendfsync") {
                Some((_, v)) => values.push(v.to_ascii_lowercase()),
                None => {
                    values.clear();
                    break;
                }
            }
        }
        settings.appendfsync = weakest("appendfsync", values).ok();
    }
    Ok(settings)
}

impl std::fmt::Debug for RedisSpool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSpool")
            .field("durability", &self.durability)
            .field("round_trips", &self.round_trips())
            .finish()
    }
}

impl RedisSpool {
    /// Connects to the server at `url` with the default options.
    pub async fn open(url: &str) -> Result<RedisSpool, SpoolError> {
        RedisSpool::open_with(url, RedisSpoolOptions::default()).await
    }

    /// Connects, reads the server's settings, logs what an acknowledged
    /// write will mean and starts re-checking them. Fails when Redis may
    /// evict keys (`maxmemory-policy` other than `noeviction`) and, with
    /// `require_fsync`, when a write is not on disk before its reply.
    pub async fn open_with(
        url: &str,
        options: RedisSpoolOptions,
    ) -> Result<RedisSpool, SpoolError> {
        let shown = redact(url);
        let conn = connect(url, options.cluster, options.response_timeout)
            .await
            .map_err(SpoolError::Unavailable)?;
        let has_waitaof = has_waitaof(&conn, options.response_timeout).await;
        let settings = read_settings(&conn, options.response_timeout).await?;
        let durability = match (&settings.aof, settings.appendfsync.as_deref()) {
            (true, Some("always")) => Durability::AofFsyncAlways,
            (true, _) if has_waitaof => Durability::WaitAof,
            _ => Durability::Memory,
        };
        let persistence = settings.persistence(durability);
        log_durability(&shown, &settings, durability);
        if let Some(why) = settings.refusal(durability, Persistence::NoAof) {
            return Err(SpoolError::Unavailable(format!("redis at {shown}: {why}")));
        }
        if options.require_fsync && persistence < Persistence::Fsynced {
            return Err(SpoolError::Unavailable(format!(
                "redis at {shown}: queue.redis_require_fsync is set, but the server keeps {persistence} \
                 (appendonly {}, appendfsync {}); set appendonly yes and appendfsync always",
                if settings.aof { "yes" } else { "no" },
                settings.appendfsync.as_deref().unwrap_or("unknown (CONFIG disabled)"),
            )));
        }
        let guard = Arc::new(Guard {
            conn: conn.clone(),
            shown: shown.clone(),
            timeout: options.response_timeout,
            durability,
            floor: persistence,
            stale: AtomicBool::new(false),
            state: Mutex::new((None, settings.run_ids)),
            checking: tokio::sync::Mutex::new(()),
        });
        Guard::watch(Arc::downgrade(&guard), options.check_interval);
        let spool = RedisSpool {
            conn,
            options,
            durability,
            round_trips: AtomicU64::new(2),
            guard,
            instance: rand::random(),
        };
        if spool.options.min_replicas > 0 {
            spool.probe_replicas(&shown).await;
        }
        Ok(spool)
    }

    /// What an acknowledged write means on this server.
    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// A handle on the spool's connection, for the schedule that shares
    /// its server (the connection multiplexes and reconnects).
    pub(crate) fn connection(&self) -> Connection {
        self.conn.clone()
    }

    /// Names this spool among others in the process: a schedule made for
    /// it ([`crate::schedule::RedisSchedule::new`]) shares its server and
    /// database.
    pub(crate) fn instance(&self) -> u64 {
        self.instance
    }

    pub(crate) fn options(&self) -> &RedisSpoolOptions {
        &self.options
    }

    /// Round trips to Redis since `open` (the settings probe included,
    /// the periodic checks not).
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Says at open whether every primary has the replicas that writes will
    /// wait for; with fewer, mail is refused for now until they come.
    async fn probe_replicas(&self, shown: &str) {
        let wanted = self.options.min_replicas;
        let fewest = self
            .on_every_primary("INFO", redis::cmd("INFO").arg("replication"))
            .await
            .ok()
            .and_then(|replies| {
                replies
                    .into_iter()
                    .map(|reply| {
                        let text: String = parse_value(reply).ok()?;
                        text.lines()
                            .find_map(|l| l.strip_prefix("connected_slaves:"))
                            .and_then(|n| n.trim().parse::<u32>().ok())
                    })
                    .collect::<Option<Vec<u32>>>()
            })
            .and_then(|counts| counts.into_iter().min());
        match fewest {
            Some(n) if n >= wanted => tracing::info!(redis = %shown, replicas = n,
                min_replicas = wanted, "redis spool: every write waits until {wanted} replicas have it"),
            Some(n) => tracing::warn!(redis = %shown, replicas = n, min_replicas = wanted,
                "redis spool: fewer replicas than queue.redis_min_replicas; mail is refused for now until they are back"),
            None => tracing::warn!(redis = %shown, min_replicas = wanted,
                "redis spool: cannot read the replication state; every write waits for the replicas"),
        }
    }

    /// `cmd` on the server, or on every primary of a cluster: one round
    /// trip.
    async fn on_every_primary(&self, what: &str, cmd: &Cmd) -> Result<Vec<Value>, SpoolError> {
        let mut conn = self.conn.clone();
        self.bounded(what, 1, async move { conn.on_every_primary(cmd).await })
            .await
    }

    /// The deadline of one round trip of `commands`, reconnecting
    /// included.
    async fn bounded<T>(
        &self,
        what: &str,
        commands: usize,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SpoolError> {
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        crate::metrics::redis_commands("spool", commands);
        let timeout = self.options.response_timeout;
        let started = std::time::Instant::now();
        let reply = tokio::time::timeout(timeout, request).await;
        let failure = match &reply {
            Ok(Ok(_)) => None,
            Ok(Err(_)) => Some(RedisFailure::Error),
            Err(_) => Some(RedisFailure::Timeout),
        };
        crate::metrics::redis_request("spool", started.elapsed(), failure);
        let result = match reply {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => Err(SpoolError::Unavailable(format!("redis {what}: {e}"))),
            Err(_) => Err(SpoolError::Unavailable(format!(
                "redis {what}: no reply within {timeout:?}"
            ))),
        };
        // The connection may come back to another server (a restart, a
        // failover): its settings are checked before the next store.
        self.guard.stale.store(true, Ordering::SeqCst);
        result
    }

    async fn query_cmd<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> Result<T, SpoolError> {
        let mut conn = self.conn.clone();
        self.bounded(what, 1, cmd.query_async(&mut conn)).await
    }

    async fn query_pipe<T: FromRedisValue>(
        &self,
        what: &str,
        pipe: &Pipeline,
    ) -> Result<T, SpoolError> {
        let mut conn = self.conn.clone();
        self.bounded(what, pipe.cmd_iter().count(), pipe.query_async(&mut conn))
            .await
    }

    /// [`RedisSpool::query_pipe`] of a pipeline that calls scripts:
    /// `None` when the server does not have them (`NOSCRIPT`).
    async fn query_pipe_scripted(
        &self,
        what: &str,
        pipe: &Pipeline,
    ) -> Result<Option<Vec<Value>>, SpoolError> {
        let mut conn = self.conn.clone();
        let request = async move {
            match pipe.query_async(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => Ok(None),
                reply => reply.map(Some),
            }
        };
        self.bounded(what, pipe.cmd_iter().count(), request).await
    }

    /// Sends `pipes` all at once (on a cluster, each to its slot's
    /// primary) and waits for every reply: one round trip.
    async fn query_pipes(
        &self,
        what: &str,
        pipes: &[Pipeline],
    ) -> Result<Vec<Vec<Value>>, SpoolError> {
        let requests = pipes.iter().map(|pipe| {
            let mut conn = self.conn.clone();
            async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
        });
        let commands = pipes.iter().map(|p| p.cmd_iter().count()).sum();
        self.bounded(what, commands, try_join_all(requests)).await
    }

    /// How long the server may wait for a durability wait: half the
    /// response timeout, so that its answer arrives before the node gives
    /// up on the request.
    fn wait_ms(&self) -> u64 {
        (self.options.response_timeout.as_millis() as u64 / 2).max(1)
    }

    /// How many durability waits follow each write ([`RedisSpool::add_wait`]).
    fn waits(&self) -> usize {
        usize::from(self.durability == Durability::WaitAof)
            + usize::from(self.options.min_replicas > 0)
    }

    /// Adds the durability waits to a write pipeline: `WAITAOF` where the
    /// server needs it for its own disk, `WAIT` for `min_replicas`. They go
    /// on the connection of the write, so they wait for it.
    fn add_wait(&self, pipe: &mut Pipeline) {
        if self.durability == Durability::WaitAof {
            pipe.cmd("WAITAOF").arg(1).arg(0).arg(self.wait_ms());
        }
        if self.options.min_replicas > 0 {
            pipe.cmd("WAIT")
                .arg(self.options.min_replicas)
                .arg(self.wait_ms());
        }
    }

    /// Checks the replies of the durability waits, the last of `replies`.
    fn check_wait(&self, what: &str, replies: &[Value]) -> Result<(), SpoolError> {
        let mut waits = replies[replies.len().saturating_sub(self.waits())..].iter();
        if self.durability == Durability::WaitAof {
            let counts: Vec<i64> = match waits.next() {
                Some(Value::Array(items)) => items.iter().map(as_int).collect(),
                _ => Vec::new(),
            };
            check_waitaof(what, &counts)?;
        }
        if self.options.min_replicas > 0 {
            let acknowledged = waits.next().map(as_int).unwrap_or(0);
            check_replicas(what, acknowledged, self.options.min_replicas)?;
        }
        Ok(())
    }

    /// Runs `MULTI`, `commands`, `EXEC` and the durability wait as one
    /// round trip and returns the replies of `commands`.
    async fn transaction(&self, what: &str, commands: Vec<Cmd>) -> Result<Vec<Value>, SpoolError> {
        let replies: Vec<Value> = self
            .query_pipe(what, &self.transaction_pipe(commands))
            .await?;
        self.transaction_replies(what, replies)
    }

    /// `MULTI`, `commands`, `EXEC` and the durability wait, as a pipeline.
    fn transaction_pipe(&self, commands: Vec<Cmd>) -> Pipeline {
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        for cmd in commands {
            pipe.add_command(cmd).ignore();
        }
        pipe.cmd("EXEC");
        self.add_wait(&mut pipe);
        pipe
    }

    /// The replies of the commands of a [`RedisSpool::transaction_pipe`].
    fn transaction_replies(
        &self,
        what: &str,
        replies: Vec<Value>,
    ) -> Result<Vec<Value>, SpoolError> {
        let items = self.exec_items(what, replies)?;
        match server_error(&items) {
            Some(e) => Err(SpoolError::Unavailable(format!("redis {what}: {e:?}"))),
            None => Ok(items),
        }
    }

    /// The durability waits checked, the replies of the commands of a
    /// [`RedisSpool::transaction_pipe`], each of which may be an error.
    fn exec_items(&self, what: &str, mut replies: Vec<Value>) -> Result<Vec<Value>, SpoolError> {
        self.check_wait(what, &replies)?;
        replies.truncate(replies.len().saturating_sub(self.waits()));
        exec_replies_of(what, replies.pop().unwrap_or(Value::Nil))
    }

    /// A write of one command and the durability wait; its reply.
    async fn write(&self, what: &str, cmd: Cmd) -> Result<Value, SpoolError> {
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        self.add_wait(&mut pipe);
        let replies: Vec<Value> = self.query_pipe(what, &pipe).await?;
        self.check_wait(what, &replies)?;
        Ok(replies.into_iter().next().unwrap_or(Value::Nil))
    }

    /// The rest of a large body of `len` bytes after its `head`, which
    /// ends at `start` in the stored value, copied into a nameless file in
    /// [`RedisSpoolOptions::body_dir`] a chunk per request, so that a
    /// delivery never holds it whole ([`Spool::read_body`]).
    async fn read_body_rest(
        &self,
        id: &MessageId,
        key: &str,
        (head, start): (Vec<u8>, u64),
        len: u64,
    ) -> Result<Body, SpoolError> {
        let unavailable = |e: std::io::Error| {
            SpoolError::Unavailable(format!("copying the body of {id} to disk: {e}"))
        };
        let dir = self.options.body_dir.clone();
        let file = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).and_then(|()| tempfile::tempfile_in(dir))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|file| file)
        .map_err(unavailable)?;
        let file = Arc::new(file);
        let rest_len = len - head.len() as u64;
        let mut copied = 0u64;
        while copied < rest_len {
            let from = start + copied;
            let to = from + (STAGING_CHUNK as u64).min(rest_len - copied) - 1;
            let chunk: Vec<u8> = self
                .query_cmd(
                    "read_body",
                    redis::cmd("GETRANGE").arg(key).arg(from).arg(to),
                )
                .await?;
            if chunk.is_empty() {
                // Removed while it was read.
                return Err(SpoolError::NotFound(id.clone()));
            }
            let n = chunk.len() as u64;
            if n < to + 1 - from {
                return Err(SpoolError::Corrupt(format!(
                    "body of {id}: {} of {len} bytes",
                    head.len() as u64 + copied + n
                )));
            }
            let (part, at) = (file.clone(), copied);
            tokio::task::spawn_blocking(move || part.write_all_at(&chunk, at))
                .await
                .map_err(std::io::Error::other)
                .and_then(|written| written)
                .map_err(unavailable)?;
            copied += n;
        }
        Ok(Body::stored(head, file, 0, rest_len))
    }

    /// Writes a body that is partly on disk to its staging key, a chunk
    /// per request, so that it is never held whole; nothing for a body in
    /// memory. No durability wait here: the store's own wait, later on the
    /// same connection, covers these writes too.
    async fn stage_body(&self, m: &NewMessage) -> Result<(), SpoolError> {
        let Some(rest) = m.body.rest() else {
            return Ok(());
        };
        let key = staging_key(&m.record.id);
        let mut first = encode_body_head(m.body.len());
        first.extend_from_slice(m.body.head());
        let mut set = redis::cmd("SET");
        set.arg(&key).arg(first).arg("EX").arg(STAGING_TTL_SECS);
        self.query_cmd::<Value>("store: body", &set).await?;
        let mut at = 0;
        while at < rest.len() {
            let part = rest.clone();
            let chunk = tokio::task::spawn_blocking(move || part.chunk_at(at, STAGING_CHUNK))
                .await
                .map_err(|e| SpoolError::Unavailable(format!("reading a body: {e}")))??;
            at += chunk.len() as u64;
            let mut append = redis::cmd("APPEND");
            append.arg(&key).arg(chunk);
            self.query_cmd::<Value>("store: body", &append).await?;
        }
        Ok(())
    }

    /// `store` on Redis Cluster: the index entries, then every message in
    /// its own slot, both while the batch is within its window (see
    /// "Consistency" in the module doc).
    async fn store_on_cluster(&self, zadd: Cmd, batch: &[NewMessage]) -> Result<(), SpoolError> {
        self.within_store_window(batch)?;
        self.write("store: index", zadd).await?;
        // Checked again after the index write, which took up to a timeout:
        // the message writes must still get a whole one.
        self.within_store_window(batch)?;
        // One command per message (its own slot), atomic by itself; the
        // transaction only carries a script's error back as a reply.
        let pipes: Vec<Pipeline> = batch
            .iter()
            .map(|m| {
                if m.body.rest().is_some() {
                    return self.transaction_pipe(vec![message_write(m)]);
                }
                let mut pipe = redis::pipe();
                pipe.add_command(message_write(m));
                self.add_wait(&mut pipe);
                pipe
            })
            .collect();
        let replies = self.query_pipes("store", &pipes).await?;
        for (m, replies) in batch.iter().zip(replies) {
            if m.body.rest().is_some() {
                self.transaction_replies("store", replies)?;
            } else {
                self.check_wait("store", &replies)?;
            }
        }
        Ok(())
    }

    /// Refuses a cluster `store` whose message writes could no longer be
    /// done by the store deadline of its batch ([`store_window_open`]).
    fn within_store_window(&self, batch: &[NewMessage]) -> Result<(), SpoolError> {
        let received = batch.iter().map(|m| m.record.received_ms).min();
        let timeout = self.options.response_timeout;
        match received {
            Some(received) if !store_window_open(received, now_ms(), timeout) => {
                let age = now_ms().saturating_sub(received);
                Err(SpoolError::Unavailable(format!(
                    "redis store: a message received {age} ms ago can no longer be stored \
                     within {STORE_TIMEOUTS} response timeouts of {timeout:?} (overloaded?)"
                )))
            }
            _ => Ok(()),
        }
    }

    /// `remove` on Redis Cluster: the message keys, then the index entry.
    async fn remove_on_cluster(&self, id: &MessageId) -> Result<(), SpoolError> {
        let mut del = redis::cmd("DEL");
        del.arg(record_key(id)).arg(body_key(id));
        let deleted = as_int(&self.write("remove", del).await?);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(INDEX_KEY).arg(id.as_str());
        self.write("remove: index", zrem).await?;
        if deleted == 0 {
            return Err(SpoolError::NotFound(id.clone()));
        }
        Ok(())
    }

    /// The records of the index `entries`, in order, in one pipeline; and
    /// the entries whose record is gone.
    async fn records_at<'e>(
        &self,
        what: &str,
        entries: &'e [ListCursor],
    ) -> Result<(Vec<MessageRecord>, Vec<&'e ListCursor>), SpoolError> {
        if entries.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            pipe.cmd("GET").arg(record_key(&entry.id));
        }
        let values: Vec<Option<Vec<u8>>> = self.query_pipe(what, &pipe).await?;
        let mut records = Vec::with_capacity(entries.len());
        let mut missing = Vec::new();
        for (entry, value) in entries.iter().zip(values) {
            match value.map(|bytes| (decode_record(&entry.id, &bytes), bytes)) {
                Some((Ok(record), _)) => records.push(record),
                Some((Err(error), bytes)) => {
                    // One unreadable record must not stop the listing of
                    // every other: it is set aside and skipped.
                    quarantine(
                        &self.conn,
                        self.options.response_timeout,
                        &entry.id,
                        &bytes,
                        &error.to_string(),
                    )
                    .await?;
                }
                None => missing.push(entry),
            }
        }
        Ok((records, missing))
    }

    /// Deletes the index entries among `missing` (entries whose record is
    /// gone) received before `cutoff` (see the module doc).
    async fn clean_dangling(&self, cutoff: u64, missing: Vec<&ListCursor>) {
        let ids = dangling(cutoff, missing.into_iter());
        if ids.is_empty() {
            return;
        }
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(INDEX_KEY);
        for id in &ids {
            zrem.arg(id.as_str());
        }
        match self.query_cmd::<i64>("ZREM", &zrem).await {
            Ok(n) => tracing::info!(
                entries = n,
                "redis spool: deleted index entries of messages that are gone"
            ),
            Err(e) => tracing::warn!(error = %e, "redis spool: cleaning the index failed"),
        }
    }
}

#[async_trait]
impl Spool for RedisSpool {
    async fn store(&self, batch: Vec<NewMessage>) -> Result<(), SpoolError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.guard.admit().await?;
        // Bodies on disk first, side by side (each in order, chunk after
        // chunk).
        try_join_all(batch.iter().map(|m| self.stage_body(m))).await?;
        if self.conn.is_cluster() {
            return self.store_on_cluster(index_add(&batch), &batch).await;
        }
        self.transaction("store", store_commands(&batch)).await?;
        Ok(())
    }

    async fn store_scheduled(
        &self,
        batch: Vec<NewMessage>,
        schedule: &dyn Schedule,
        now_ms: u64,
    ) -> Result<Stored, SpoolError> {
        let records: Vec<Arc<MessageRecord>> =
            batch.iter().map(|m| Arc::new(m.record.clone())).collect();
        let on_this_server = schedule
            .redis()
            .filter(|s| !self.conn.is_cluster() && s.shares(self));
        let plan = on_this_server.and_then(|s| {
            let plan = s.insert_plan(records.iter().map(|r| &**r), now_ms, Fresh::JustStored)?;
            Some((s, plan.in_one_transaction()))
        });
        let Some((schedule, mut plan)) = plan else {
            self.store(batch).await?;
            let scheduled = match on_this_server {
                Some(_) => Ok(Vec::new()),
                None => schedule.insert_shared(records.clone(), now_ms).await,
            };
            return Ok(Stored { records, scheduled });
        };
        self.guard.admit().await?;
        try_join_all(batch.iter().map(|m| self.stage_body(m))).await?;
        // The store and the insert in one transaction: one round trip and,
        // with `appendfsync always`, one fsync for both.
        let mut commands = store_commands(&batch);
        let stored = commands.len();
        commands.extend(std::mem::take(&mut plan.steps).into_iter().flatten());
        let pipe = self.transaction_pipe(commands);
        let replies = match self.query_pipe_scripted("store", &pipe).await? {
            Some(replies) => replies,
            // The server lost the scripts (a restart) and refused the whole
            // transaction: sent again once they are loaded.
            None => {
                schedule.load_scripts().await?;
                self.query_pipe("store", &pipe).await?
            }
        };
        let mut items = self.exec_items("store", replies)?;
        let insert_replies = items.split_off(stored.min(items.len()));
        if let Some(e) = server_error(&items) {
            return Err(SpoolError::Unavailable(format!("redis store: {e:?}")));
        }
        let scheduled = match server_error(&insert_replies) {
            // The scripts went between the queueing and the EXEC: the
            // insert is done again, which loads them.
            Some(e) if e.kind() == Some(ServerErrorKind::NoScript) => {
                schedule.insert_shared(records.clone(), now_ms).await
            }
            Some(e) => Err(SpoolError::Unavailable(format!("redis insert: {e:?}"))),
            None => {
                let scripts = plan.script_replies(insert_replies);
                schedule.inserted(plan, scripts).await
            }
        };
        Ok(Stored { records, scheduled })
    }

    async fn update(&self, record: MessageRecord) -> Result<(), SpoolError> {
        let mut pipe = redis::pipe();
        // XX: only a record that exists is replaced.
        pipe.cmd("SET")
            .arg(record_key(&record.id))
            .arg(envelope::encode(&record))
            .arg("XX");
        self.add_wait(&mut pipe);
        let replies: Vec<Value> = self.query_pipe("update", &pipe).await?;
        self.check_wait("update", &replies)?;
        match replies.first() {
            Some(Value::Nil) => Err(SpoolError::NotFound(record.id)),
            _ => Ok(()),
        }
    }

    async fn remove(&self, id: &MessageId) -> Result<(), SpoolError> {
        if self.conn.is_cluster() {
            return self.remove_on_cluster(id).await;
        }
        // The message keys first, the index entry last.
        let mut del = redis::cmd("DEL");
        del.arg(record_key(id)).arg(body_key(id));
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(INDEX_KEY).arg(id.as_str());
        let replies = self.transaction("remove", vec![del, zrem]).await?;
        if replies.first().map(as_int).unwrap_or(0) == 0 {
            return Err(SpoolError::NotFound(id.clone()));
        }
        Ok(())
    }

    async fn list(&self) -> Result<Vec<MessageRecord>, SpoolError> {
        let cutoff = dangling_cutoff(self.options.response_timeout);
        let entries: Vec<(String, f64)> = self
            .query_cmd(
                "list",
                redis::cmd("ZRANGE")
                    .arg(INDEX_KEY)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES"),
            )
            .await?;
        let entries: Vec<ListCursor> = entries.into_iter().map(index_entry).collect();
        let (records, missing) = self.records_at("list", &entries).await?;
        self.clean_dangling(cutoff, missing).await;
        Ok(records)
    }

    /// Reads the index from the cursor's receive time on (`ZRANGE …
    /// BYSCORE LIMIT`), skipping the entries of that millisecond up to the
    /// cursor's id, then the records of the page in one pipeline: two round
    /// trips for a page, whatever the size of the queue. The next cursor is
    /// taken from the index, so a page of entries whose records are gone
    /// does not end the listing early.
    async fn list_page(
        &self,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> Result<(Vec<MessageRecord>, Option<ListCursor>), SpoolError> {
        if limit == 0 {
            return Ok((Vec::new(), None));
        }
        let cutoff = dangling_cutoff(self.options.response_timeout);
        let want = limit.saturating_add(1);
        let min = after.map_or("-inf".to_string(), |a| a.received_ms.to_string());
        let mut entries: Vec<ListCursor> = Vec::with_capacity(want);
        let mut offset = 0;
        loop {
            let raw: Vec<(String, f64)> = self
                .query_cmd(
                    "list page",
                    redis::cmd("ZRANGE")
                        .arg(INDEX_KEY)
                        .arg(&min)
                        .arg("+inf")
                        .arg("BYSCORE")
                        .arg("LIMIT")
                        .arg(offset)
                        .arg(want)
                        .arg("WITHSCORES"),
                )
                .await?;
            let full = raw.len() == want;
            entries.extend(
                raw.into_iter()
                    .map(index_entry)
                    .filter(|entry| after.is_none_or(|a| entry > a)),
            );
            // Only entries of the cursor's millisecond are skipped, and they
            // come first: past them every entry counts.
            if entries.len() >= want || !full {
                break;
            }
            offset += want;
        }
        let next = (entries.len() > limit).then(|| entries[limit - 1].clone());
        entries.truncate(limit);
        if entries.is_empty() {
            return Ok((Vec::new(), next));
        }
        let (records, missing) = self.records_at("list page", &entries).await?;
        // A rescan pages through the whole index: it cleans what it meets.
        self.clean_dangling(cutoff, missing).await;
        Ok((records, next))
    }

    /// The quarantine index from the oldest entry, then the reason, time
    /// and sizes of each in one pipeline: two round trips. An entry whose
    /// hash is missing (a quarantine that did not happen) is skipped.
    async fn quarantined(&self, limit: usize) -> Result<Vec<Quarantined>, SpoolError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = self
            .query_cmd(
                "quarantined",
                redis::cmd("ZRANGE")
                    .arg(QUARANTINE_KEY)
                    .arg(0)
                    .arg(limit.saturating_sub(1)),
            )
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            let key = quarantined_key(&MessageId(id.clone()));
            pipe.cmd("HMGET").arg(&key).arg("reason").arg("at");
            pipe.cmd("HSTRLEN").arg(&key).arg("record");
            pipe.cmd("HSTRLEN").arg(&key).arg("body");
        }
        let values: Vec<Value> = self.query_pipe("quarantined", &pipe).await?;
        let mut listed = Vec::with_capacity(ids.len());
        for (id, reply) in ids.into_iter().zip(values.chunks(3)) {
            let (reason, at): (Option<String>, Option<u64>) = parse_value(reply[0].clone())
                .map_err(|e| SpoolError::Unavailable(format!("redis quarantined: {e}")))?;
            let (Some(reason), Some(at_ms)) = (reason, at) else {
                continue;
            };
            listed.push(Quarantined {
                location: id,
                reason,
                at_ms,
                bytes: (as_int(&reply[1]) + as_int(&reply[2])) as u64,
            });
        }
        Ok(listed)
    }

    /// Reads the record in the message's quarantine hash; when it decodes,
    /// the index entry goes back first (see "Consistency"), then the
    /// record and body move back to their keys, then the quarantine
    /// index entry goes.
    async fn replay_quarantined(
        &self,
        location: &str,
    ) -> Result<Option<MessageRecord>, SpoolError> {
        let Some(id) = MessageId::parse(location) else {
            return Ok(None);
        };
        let key = quarantined_key(&id);
        let bytes: Option<Vec<u8>> = self
            .query_cmd("replay", redis::cmd("HGET").arg(&key).arg("record"))
            .await?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let record = decode_record(&id, &bytes)?;
        let _: i64 = self
            .query_cmd(
                "replay",
                redis::cmd("ZADD")
                    .arg(INDEX_KEY)
                    .arg("NX")
                    .arg(record.received_ms)
                    .arg(id.as_str()),
            )
            .await?;
        let restored: i64 = self
            .query_cmd(
                "replay",
                redis::cmd("EVAL")
                    .arg(RESTORE)
                    .arg(3)
                    .arg(record_key(&id))
                    .arg(body_key(&id))
                    .arg(&key)
                    .arg(&bytes),
            )
            .await?;
        match restored {
            1 => {}
            2 => {
                return Err(SpoolError::Corrupt(format!(
                    "message {id} is queued already; its quarantined copy stays (delete it)"
                )))
            }
            // Taken back or deleted meanwhile.
            _ => return Ok(None),
        }
        let _: i64 = self
            .query_cmd(
                "replay",
                redis::cmd("ZREM").arg(QUARANTINE_KEY).arg(id.as_str()),
            )
            .await?;
        Ok(Some(record))
    }

    async fn delete_quarantined(&self, location: &str) -> Result<bool, SpoolError> {
        let Some(id) = MessageId::parse(location) else {
            return Ok(false);
        };
        let deleted: i64 = self
            .query_cmd(
                "delete quarantined",
                redis::cmd("DEL").arg(quarantined_key(&id)),
            )
            .await?;
        let _: i64 = self
            .query_cmd(
                "delete quarantined",
                redis::cmd("ZREM").arg(QUARANTINE_KEY).arg(id.as_str()),
            )
            .await?;
        Ok(deleted == 1)
    }

    async fn read_body(&self, id: &MessageId) -> Result<Body, SpoolError> {
        let key = body_key(id);
        // Room for the length in front: a body up to READ_WHOLE_UP_TO
        // comes whole, in one round trip.
        let first_end = READ_WHOLE_UP_TO + 15;
        let mut first: Vec<u8> = self
            .query_cmd(
                "read_body",
                redis::cmd("GETRANGE").arg(&key).arg(0).arg(first_end),
            )
            .await?;
        // A missing key reads as an empty string.
        if first.is_empty() {
            return Err(SpoolError::NotFound(id.clone()));
        }
        let corrupt = |why: String| SpoolError::Corrupt(format!("body of {id}: {why}"));
        let (BodyHead { len }, used) =
            envelope::decode_prefix(&first).map_err(|e| corrupt(e.to_string()))?;
        let held = (first.len() - used) as u64;
        if held >= len {
            if held > len {
                return Err(corrupt(format!("{} trailing bytes", held - len)));
            }
            first.drain(..used);
            return Ok(Body::from(first));
        }
        if (first.len() as u64) < first_end + 1 {
            return Err(corrupt(format!("{held} of {len} bytes")));
        }
        let start = first.len() as u64;
        self.read_body_rest(id, &key, (first.split_off(used), start), len)
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use smarthost_proto::envelope::RECORD_VERSION;

    use super::*;
    use crate::spool::suite::{self, id, message, receive_from_now};
    use smarthost_testkit::redis::RedisServer;

    async fn open(server: &RedisServer) -> RedisSpool {
        RedisSpool::open(&server.url()).await.expect("open")
    }

    /// A plain connection to look at and damage what the spool wrote.
    async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    async fn get(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<u8> {
        redis::cmd("GET").arg(key).query_async(conn).await.unwrap()
    }

    async fn set(conn: &mut redis::aio::MultiplexedConnection, key: &str, value: &[u8]) {
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(conn)
            .await
            .unwrap();
    }

    fn ids(records: &[MessageRecord]) -> Vec<MessageId> {
        records.iter().map(|r| r.id.clone()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_spool_suite() {
        let server = RedisServer::start();
        let url = server.url();
        suite::run(|| {
            let url = url.clone();
            async move { Arc::new(RedisSpool::open(&url).await.expect("open")) as Arc<dyn Spool> }
        })
        .await;
    }

    #[tokio::test]
    async fn passes_the_spool_suite_waiting_for_a_replica() {
        let primary = RedisServer::start();
        let _replica = primary.start_replica();
        let url = primary.url();
        suite::run(|| {
            let url = url.clone();
            async move {
                let options = RedisSpoolOptions {
                    min_replicas: 1,
                    ..RedisSpoolOptions::default()
                };
                Arc::new(RedisSpool::open_with(&url, options).await.expect("open"))
                    as Arc<dyn Spool>
            }
        })
        .await;
    }

    #[tokio::test]
    async fn records_and_bodies_are_stored_behind_the_version_byte() {
        let server = RedisServer::start();
        let spool = open(&server).await;
        let m = message(7, 1000);
        spool.store(vec![m.clone()]).await.unwrap();

        let mut conn = raw(&server).await;
        let record = get(&mut conn, &record_key(&id(7))).await;
        assert_eq!(record[0], RECORD_VERSION);
        assert_eq!(
            envelope::decode::<MessageRecord>(&record).unwrap(),
            m.record
        );
        let body = get(&mut conn, &body_key(&id(7))).await;
        assert_eq!(body[0], RECORD_VERSION);
        assert_eq!(decode_body(&id(7), &body).unwrap(), m.body);
        // The body is one byte string, not a byte per element.
        assert!(body.len() < m.body.head().len() + 8, "{} bytes", body.len());
        let score: f64 = redis::cmd("ZSCORE")
            .arg(INDEX_KEY)
            .arg(id(7).as_str())
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(score as u64, m.record.received_ms);
    }

    /// A body as it is stored, encoded whole: what the parts must add up to.
    #[derive(Serialize)]
    struct BodyOut<'a> {
        #[serde(serialize_with = "crate::spool::local::body_bytes::serialize")]
        bytes: &'a [u8],
    }

    fn encode_body(body: &[u8]) -> Vec<u8> {
        envelope::encode(&BodyOut { bytes: body })
    }

    #[test]
    fn a_body_head_and_its_body_encode_as_the_whole_value() {
        for len in [0, 1, 250, 251, 252, 65_535, 65_536, 65_537, 300_000] {
            let body = vec![b'x'; len];
            let mut head = encode_body_head(len as u64);
            head.extend_from_slice(&body);
            assert!(head == encode_body(&body), "a body of {len} bytes");
            let mut cmd = redis::cmd("SET");
            cmd.arg(StoredBody(&body));
            let arg = cmd.args_iter().nth(1).map(|a| match a {
                redis::Arg::Simple(bytes) => bytes.to_vec(),
                _ => Vec::new(),
            });
            assert!(arg == Some(head.clone()), "as an argument, {len} bytes");
        }
    }

    /// A body staged in parts whose staging key is gone by the time of the
    /// store (it expired, or the server lost it) fails the store, and no
    /// record is left without its body.
    #[tokio::test]
    async fn a_large_body_is_read_into_a_file_and_a_cut_one_is_refused() {
        let server = RedisServer::start();
        let body_dir = tempfile::tempdir().unwrap();
        let spool = RedisSpool::open_with(
            &server.url(),
            RedisSpoolOptions {
                body_dir: body_dir.path().join("bodies"),
                ..RedisSpoolOptions::default()
            },
        )
        .await
        .unwrap();
        receive_from_now();
        let len = 3 * STAGING_CHUNK + 5;
        let m = message(1, len);
        spool.store(vec![m.clone()]).await.unwrap();
        let body = spool.read_body(&id(1)).await.unwrap();
        assert!(body.rest().is_some(), "not held whole");
        assert!(body.head().len() as u64 <= READ_WHOLE_UP_TO + 16);
        assert_eq!(body, m.body);
        // The copy has no name: nothing is left behind.
        drop(body);
        assert_eq!(fs_entries(&body_dir.path().join("bodies")), 0);

        // Cut short within its first read and past it.
        let mut conn = raw(&server).await;
        let stored = get(&mut conn, &body_key(&id(1))).await;
        for keep in [1000, 2 * STAGING_CHUNK] {
            set(&mut conn, &body_key(&id(1)), &stored[..keep]).await;
            match spool.read_body(&id(1)).await {
                Err(SpoolError::Corrupt(why)) => {
                    assert!(why.contains(&format!("of {len} bytes")), "{why}")
                }
                other => panic!("{keep}: expected Corrupt, got {other:?}"),
            }
        }
    }

    fn fs_entries(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| entries.count())
    }

    #[tokio::test]
    async fn a_staged_body_that_is_not_whole_stores_nothing() {
        let server = RedisServer::start();
        let spool = open(&server).await;
        let m = suite::spilled(1, 2 * crate::spool::BODY_CHUNK);
        spool.stage_body(&m).await.unwrap();
        let mut conn = raw(&server).await;
        let staged = get(&mut conn, &staging_key(&id(1))).await;
        assert_eq!(
            decode_body(&id(1), &staged).unwrap(),
            m.body.to_vec().unwrap()
        );
        let ttl: i64 = redis::cmd("TTL")
            .arg(staging_key(&id(1)))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= STAGING_TTL_SECS as i64, "{ttl}");
        // Cut short, as if a part had been lost.
        set(&mut conn, &staging_key(&id(1)), &staged[..staged.len() - 1]).await;
        let place = vec![message_write(&m)];
        let error = spool.transaction("store", place).await.unwrap_err();
        assert!(error.to_string().contains("INCOMPLETE"), "{error}");
        let exists: i64 = redis::cmd("EXISTS")
            .arg(record_key(&id(1)))
            .arg(body_key(&id(1)))
            .arg(staging_key(&id(1)))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 0, "neither record nor body, and no staged parts");

        // Whole, it is put in place with no expiry left on the body.
        spool.store(vec![m.clone()]).await.unwrap();
        assert_eq!(
            spool.read_body(&id(1)).await.unwrap(),
            m.body.to_vec().unwrap()
        );
        let ttl: i64 = redis::cmd("TTL")
            .arg(body_key(&id(1)))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(ttl, -1, "the body does not expire");
        assert_eq!(spool.list().await.unwrap(), vec![m.record]);
    }

    #[tokio::test]
    async fn an_unknown_version_is_corrupt_not_a_panic() {
        let server = RedisServer::start();
        let spool = open(&server).await;
        spool
            .store(vec![message(1, 100), message(2, 100)])
            .await
            .unwrap();
        let mut conn = raw(&server).await;

        let mut body = get(&mut conn, &body_key(&id(2))).await;
        body[0] = 99;
        set(&mut conn, &body_key(&id(2)), &body).await;
        match spool.read_body(&id(2)).await {
            Err(SpoolError::Corrupt(why)) => assert!(why.contains("version 99"), "{why}"),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(spool.read_body(&id(1)).await.unwrap(), message(1, 100).body);
    }

    /// One record that cannot be read (a newer version, damage) does not
    /// stop the listing of the others: it is set aside with its body,
    /// listed for operators, and never read again.
    #[tokio::test]
    async fn unreadable_records_are_set_aside_and_listed() {
        let server = RedisServer::start();
        let spool = open(&server).await;
        let batch: Vec<NewMessage> = (1..=5).map(|n| message(n, 100)).collect();
        spool.store(batch).await.unwrap();
        let mut conn = raw(&server).await;
        let mut record = get(&mut conn, &record_key(&id(2))).await;
        record[0] = 99;
        set(&mut conn, &record_key(&id(2)), &record).await;
        set(&mut conn, &record_key(&id(3)), &[RECORD_VERSION, 0xff]).await;
        set(&mut conn, &record_key(&id(4)), &[]).await;

        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(1), id(5)]);
        let listed = spool.quarantined(10).await.unwrap();
        assert_eq!(
            listed
                .iter()
                .map(|q| q.location.clone())
                .collect::<Vec<_>>(),
            vec![id(2).0, id(3).0, id(4).0]
        );
        assert!(listed[0].reason.contains("version 99"), "{listed:?}");
        assert!(listed.iter().all(|q| q.at_ms > 0 && !q.reason.is_empty()));
        // Record and body are kept aside, out of the message's keys.
        let kept: Vec<u8> = redis::cmd("HGET")
            .arg(quarantined_key(&id(2)))
            .arg("record")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept, record);
        assert!(matches!(
            spool.read_body(&id(2)).await,
            Err(SpoolError::NotFound(_))
        ));
        // Never read again: the next listing and a page see the others.
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(1), id(5)]);
        let (page, next) = spool.list_page(None, 10).await.unwrap();
        assert_eq!((ids(&page), next), (vec![id(1), id(5)], None));
        assert_eq!(spool.quarantined(10).await.unwrap(), listed);
        assert_eq!(spool.quarantined(1).await.unwrap(), listed[..1]);
    }

    #[tokio::test]
    async fn round_trips_per_operation() {
        let server = RedisServer::start();
        let spool = open(&server).await;
        let mut trips = smarthost_testkit::since_last(|| spool.round_trips());

        let batch: Vec<NewMessage> = (0..100).map(|n| message(n, 2048)).collect();
        spool.store(batch).await.unwrap();
        assert_eq!(trips(), 1, "a store of 100 messages");
        // And few commands: the index, then every record and body at once.
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut raw(&server).await)
            .await
            .unwrap();
        let calls = |name| smarthost_testkit::redis::command_calls(&stats, name);
        assert_eq!(
            (calls("zadd"), calls("mset"), calls("set")),
            (1, 1, 0),
            "{stats}"
        );
        assert_eq!(spool.list().await.unwrap().len(), 100);
        assert_eq!(trips(), 2, "list");
        let (page, next) = spool.list_page(None, 40).await.unwrap();
        assert_eq!((page.len(), trips()), (40, 2), "a page");
        let (page, last) = spool.list_page(next.as_ref(), 80).await.unwrap();
        assert_eq!((page.len(), trips(), last), (60, 2, None), "the last page");
        spool.read_body(&id(5)).await.unwrap();
        assert_eq!(trips(), 1, "read_body");
        let mut record = message(5, 2048).record;
        record.deliveries[0].attempts = 1;
        spool.update(record).await.unwrap();
        assert_eq!(trips(), 1, "update");
        spool.remove(&id(5)).await.unwrap();
        assert_eq!(trips(), 1, "remove");
        spool.store(Vec::new()).await.unwrap();
        assert_eq!(trips(), 0, "an empty store");
    }

    #[tokio::test]
    async fn a_dangling_index_entry_is_skipped_and_cleaned() {
        let server = RedisServer::start();
        let spool = open(&server).await;
        spool
            .store(vec![message(1, 10), message(3, 10)])
            .await
            .unwrap();
        let mut conn = raw(&server).await;
        // What a store interrupted after its index entry leaves behind: an
        // old one and one of a message received just now.
        let young = MessageId::new(now_ms(), 1);
        redis::cmd("ZADD")
            .arg(INDEX_KEY)
            .arg(message(2, 10).record.received_ms)
            .arg(id(2).as_str())
            .arg(now_ms())
            .arg(young.as_str())
            .query_async::<()>(&mut conn)
            .await
            .unwrap();

        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(1), id(3)]);
        let left: Vec<String> = redis::cmd("ZRANGE")
            .arg(INDEX_KEY)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            left,
            vec![id(1).0, id(3).0, young.0.clone()],
            "the old entry is cleaned, the young one may still get its message"
        );
        assert!(matches!(
            spool.remove(&id(2)).await,
            Err(SpoolError::NotFound(_))
        ));

        // A page (the rescan) cleans what it meets too.
        redis::cmd("ZADD")
            .arg(INDEX_KEY)
            .arg(message(2, 10).record.received_ms)
            .arg(id(2).as_str())
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let (page, _) = spool.list_page(None, 10).await.unwrap();
        assert_eq!(ids(&page), vec![id(1), id(3)]);
        let left: Vec<String> = redis::cmd("ZRANGE")
            .arg(INDEX_KEY)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, vec![id(1).0, id(3).0, young.0]);
    }

    /// An orphan left by a `remove` cut short (on a cluster: the message
    /// keys deleted, the index entry not) is cleaned once past a grace of a
    /// few response timeouts, not minutes: until then the queue counts it.
    #[tokio::test]
    async fn an_orphan_is_cleaned_once_past_a_grace_derived_from_the_response_timeout() {
        let server = RedisServer::start();
        let spool = open(&server).await;
        let mut conn = raw(&server).await;
        let (past, fresh) = (MessageId::new(now_ms(), 1), MessageId::new(now_ms(), 2));
        // 90 s: past the grace of the default 5 s response timeout (60 s).
        let past_ms = now_ms() - 90_000;
        redis::cmd("ZADD")
            .arg(INDEX_KEY)
            .arg(past_ms)
            .arg(past.as_str())
            .arg(now_ms() - 1000)
            .arg(fresh.as_str())
            .query_async::<()>(&mut conn)
            .await
            .unwrap();

        let (page, _) = spool.list_page(None, 10).await.unwrap();
        assert!(page.is_empty());
        let left: Vec<String> = redis::cmd("ZRANGE")
            .arg(INDEX_KEY)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, vec![fresh.0], "the entry past the grace is cleaned");
        assert_eq!(
            dangling_grace(RedisSpoolOptions::default().response_timeout),
            Duration::from_secs(60)
        );
    }

    #[tokio::test]
    async fn with_min_replicas_a_write_is_acknowledged_only_once_a_replica_has_it() {
        let primary = RedisServer::start();
        let replica = primary.start_replica();
        let timeout = Duration::from_secs(2);
        let spool = RedisSpool::open_with(
            &primary.url(),
            RedisSpoolOptions {
                response_timeout: timeout,
                min_replicas: 1,
                ..RedisSpoolOptions::default()
            },
        )
        .await
        .unwrap();
        let before = spool.round_trips();
        spool.store(vec![message(1, 100)]).await.unwrap();
        assert_eq!(spool.round_trips() - before, 1, "the wait rides along");
        // The replica has it the moment the primary acknowledged it.
        let mut on_replica = raw(&replica).await;
        assert!(!get(&mut on_replica, &record_key(&id(1))).await.is_empty());
        assert!(!get(&mut on_replica, &body_key(&id(1))).await.is_empty());
        let mut record = message(1, 100).record;
        record.deliveries[0].attempts = 1;
        spool.update(record).await.unwrap();
        spool.remove(&id(1)).await.unwrap();

        // Without the replica a write fails within the timeout, never
        // acknowledged: the client hears 451 and sends it again.
        replica.pause();
        let started = Instant::now();
        match spool.store(vec![message(2, 100)]).await {
            Err(SpoolError::Unavailable(why)) => {
                assert!(why.contains("0 of 1 replicas"), "{why}")
            }
            other => panic!("acknowledged without a replica: {other:?}"),
        }
        assert!(started.elapsed() < timeout, "{:?}", started.elapsed());

        // The replica back: writes are acknowledged again.
        replica.resume();
        let deadline = Instant::now() + Duration::from_secs(10);
        while spool.store(vec![message(3, 100)]).await.is_err() {
            assert!(Instant::now() < deadline, "never acknowledged again");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            get(&mut on_replica, &record_key(&id(3))).await,
            envelope::encode(&message(3, 100).record)
        );
    }

    /// A cluster store sends its message writes only while a whole
    /// response timeout is left before the deadline (receive time plus
    /// six timeouts): their replies then come before any reader may take
    /// its index entries for orphans.
    #[test]
    fn the_store_window_ends_one_timeout_before_the_store_deadline() {
        let timeout = Duration::from_secs(5);
        let received = 1_000_000;
        assert!(store_window_open(received, received, timeout));
        assert!(store_window_open(received, received + 25_000, timeout));
        assert!(!store_window_open(received, received + 25_001, timeout));
        assert!(
            store_window_open(received + 3_000, received, timeout),
            "a clock behind"
        );
        let deadline = received + 30_000;
        assert!(
            deadline + CLOCK_SKEW.as_millis() as u64
                <= received + dangling_grace(timeout).as_millis() as u64,
            "the grace covers the deadline on a clock ahead by the skew"
        );
        assert!(
            store_window_open(u64::MAX - 10, u64::MAX - 5, timeout),
            "no overflow"
        );
    }

    #[test]
    fn too_few_replicas_is_a_temporary_failure() {
        assert!(check_replicas("store", 1, 1).is_ok());
        assert!(check_replicas("store", 2, 1).is_ok());
        assert!(matches!(
            check_replicas("store", 0, 1),
            Err(SpoolError::Unavailable(_))
        ));
        assert!(check_replicas("store", 1, 2).is_err());
    }

    #[tokio::test]
    async fn a_dead_redis_is_unavailable_within_the_timeout() {
        let mut server = RedisServer::start();
        let timeout = Duration::from_secs(2);
        let spool = RedisSpool::open_with(
            &server.url(),
            RedisSpoolOptions {
                response_timeout: timeout,
                ..RedisSpoolOptions::default()
            },
        )
        .await
        .unwrap();
        spool.store(vec![message(1, 100)]).await.unwrap();
        server.kill();

        for attempt in 0..3 {
            let started = Instant::now();
            let result = spool.store(vec![message(10 + attempt, 100)]).await;
            assert!(
                matches!(result, Err(SpoolError::Unavailable(_))),
                "{result:?}"
            );
            assert!(
                started.elapsed() < timeout + Duration::from_secs(1),
                "attempt {attempt} took {:?}",
                started.elapsed()
            );
        }
        let started = Instant::now();
        assert!(matches!(
            spool.list().await,
            Err(SpoolError::Unavailable(_))
        ));
        assert!(started.elapsed() < timeout + Duration::from_secs(1));

        // Nobody listening at all: open fails, it does not hang.
        let started = Instant::now();
        let opened = RedisSpool::open_with(
            &server.url(),
            RedisSpoolOptions {
                response_timeout: timeout,
                ..RedisSpoolOptions::default()
            },
        )
        .await;
        assert!(matches!(opened, Err(SpoolError::Unavailable(_))));
        assert!(started.elapsed() < timeout + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_hung_redis_is_unavailable_within_the_timeout() {
        let server = RedisServer::start();
        let timeout = Duration::from_secs(1);
        let spool = RedisSpool::open_with(
            &server.url(),
            RedisSpoolOptions {
                response_timeout: timeout,
                ..RedisSpoolOptions::default()
            },
        )
        .await
        .unwrap();
        spool.store(vec![message(1, 100)]).await.unwrap();

        server.pause();
        let started = Instant::now();
        let result = spool.store(vec![message(2, 100)]).await;
        assert!(
            matches!(result, Err(SpoolError::Unavailable(_))),
            "{result:?}"
        );
        assert!(started.elapsed() < timeout + Duration::from_secs(1));
        server.resume();

        // The store that timed out may still have been applied; either
        // way the spool works again.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = spool.store(vec![message(3, 100)]).await {
            assert!(Instant::now() < deadline, "no recovery: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let listed = ids(&spool.list().await.unwrap());
        assert!(
            listed.contains(&id(1)) && listed.contains(&id(3)),
            "{listed:?}"
        );
    }

    #[tokio::test]
    async fn a_restarted_redis_has_everything_and_the_spool_carries_on() {
        let mut server = RedisServer::start();
        let spool = RedisSpool::open_with(
            &server.url(),
            RedisSpoolOptions {
                response_timeout: Duration::from_secs(2),
                ..RedisSpoolOptions::default()
            },
        )
        .await
        .unwrap();
        let batch: Vec<NewMessage> = (0..50).map(|n| message(n, 3000)).collect();
        spool.store(batch).await.unwrap();
        for n in 50..60 {
            spool.store(vec![message(n, 500)]).await.unwrap();
        }
        spool.remove(&id(0)).await.unwrap();
        let before = spool.list().await.unwrap();
        assert_eq!(before.len(), 59);

        // A crash: SIGKILL, then a start from the same AOF.
        server.kill();
        assert!(spool.store(vec![message(100, 10)]).await.is_err());
        server.restart();

        // The same spool, not reopened: the connection comes back by
        // itself, at worst after an operation that still saw the old one.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut failures = 0;
        while let Err(e) = spool.store(vec![message(200, 10)]).await {
            failures += 1;
            assert!(Instant::now() < deadline, "no reconnect: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(failures <= 2, "{failures} failures after the restart");

        let after = spool.list().await.unwrap();
        assert_eq!(&after[..59], &before[..]);
        assert_eq!(ids(&after[59..]), vec![id(200)]);
        for n in 1..60 {
            let len = if n < 50 { 3000 } else { 500 };
            assert_eq!(spool.read_body(&id(n)).await.unwrap(), message(n, len).body);
        }
        assert!(matches!(
            spool.read_body(&id(100)).await,
            Err(SpoolError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn the_persistence_settings_are_read_at_open() {
        let server = RedisServer::start();
        assert_eq!(open(&server).await.durability(), Durability::AofFsyncAlways);

        // Redis 7.0 has no WAITAOF, so everysec means memory only.
        let server = RedisServer::start_with(&["--appendfsync", "everysec"]);
        let spool = open(&server).await;
        assert_eq!(spool.durability(), Durability::Memory);
        spool.store(vec![message(1, 10)]).await.unwrap();

        // CONFIG renamed away: the spool still opens and works.
        let server = RedisServer::start_with(&["--rename-command", "CONFIG", ""]);
        let spool = open(&server).await;
        assert_eq!(spool.durability(), Durability::Memory);
        spool.store(vec![message(1, 10)]).await.unwrap();
        assert_eq!(ids(&spool.list().await.unwrap()), vec![id(1)]);
    }

    async fn open_checking(server: &RedisServer, every: Duration, fsync: bool) -> RedisSpool {
        RedisSpool::open_with(
            &server.url(),
            RedisSpoolOptions {
                check_interval: every,
                require_fsync: fsync,
                ..RedisSpoolOptions::default()
            },
        )
        .await
        .expect("open")
    }

    async fn config_set(server: &RedisServer, name: &str, value: &str) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async::<()>(&mut raw(server).await)
            .await
            .unwrap();
    }

    /// Stores new messages until one is refused for a reason that
    /// contains `why` (`Some`) or is stored (`None`); bounded.
    async fn store_until(spool: &RedisSpool, n: &mut u64, why: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            *n += 1;
            let result = spool.store(vec![message(*n, 10)]).await;
            match (&result, why) {
                (Ok(()), None) => return,
                (Err(SpoolError::Unavailable(e)), Some(why)) if e.contains(why) => return,
                _ => {}
            }
            assert!(Instant::now() < deadline, "still {result:?}, want {why:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The spool would not open, as unavailable, for a reason naming `why`.
    fn refused_at_open(opened: Result<RedisSpool, SpoolError>, why: &str) {
        match opened {
            Err(SpoolError::Unavailable(reason)) => assert!(reason.contains(why), "{reason}"),
            other => panic!("opened though {why}: {:?}", other.map(|_| "a spool")),
        }
    }

    #[tokio::test]
    async fn an_eviction_policy_is_refused_at_open_and_whenever_it_is_set() {
        let lru = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
        refused_at_open(
            RedisSpool::open(&lru.url()).await,
            "maxmemory-policy is allkeys-lru",
        );

        let server = RedisServer::start();
        let spool = open_checking(&server, Duration::from_millis(200), false).await;
        let mut n = 0;
        store_until(&spool, &mut n, None).await;
        config_set(&server, "maxmemory-policy", "volatile-lru").await;
        store_until(&spool, &mut n, Some("maxmemory-policy is volatile-lru")).await;
        // What is stored still moves: updates and removals go on.
        spool.remove(&id(1)).await.unwrap();
        config_set(&server, "maxmemory-policy", "noeviction").await;
        store_until(&spool, &mut n, None).await;
    }

    #[tokio::test]
    async fn persistence_weaker_than_at_open_refuses_new_mail_until_restored() {
        let server = RedisServer::start();
        let spool = open_checking(&server, Duration::from_millis(200), false).await;
        let mut n = 0;
        store_until(&spool, &mut n, None).await;
        config_set(&server, "appendfsync", "everysec").await;
        store_until(&spool, &mut n, Some("weakened")).await;
        config_set(&server, "appendfsync", "always").await;
        store_until(&spool, &mut n, None).await;
        config_set(&server, "appendonly", "no").await;
        store_until(&spool, &mut n, Some("no append-only file")).await;
        config_set(&server, "appendonly", "yes").await;
        store_until(&spool, &mut n, None).await;

        // A server that keeps less from the start is accepted as it is
        // (the open warns), and guarded against getting weaker still.
        let weak = RedisServer::start_with(&["--appendfsync", "everysec"]);
        let spool = open_checking(&weak, Duration::from_millis(200), false).await;
        store_until(&spool, &mut n, None).await;
        config_set(&weak, "appendfsync", "always").await;
        store_until(&spool, &mut n, None).await;
        config_set(&weak, "appendfsync", "no").await;
        store_until(&spool, &mut n, Some("weakened")).await;
    }

    #[tokio::test]
    async fn requiring_fsync_refuses_a_server_that_does_not() {
        let weak = RedisServer::start_with(&["--appendfsync", "everysec"]);
        let opened = RedisSpool::open_with(
            &weak.url(),
            RedisSpoolOptions {
                require_fsync: true,
                ..RedisSpoolOptions::default()
            },
        )
        .await;
        refused_at_open(opened, "queue.redis_require_fsync");
        let server = RedisServer::start();
        let spool = open_checking(&server, Duration::from_millis(200), true).await;
        let mut n = 0;
        store_until(&spool, &mut n, None).await;
        config_set(&server, "appendfsync", "everysec").await;
        store_until(&spool, &mut n, Some("weakened")).await;
    }

    #[tokio::test]
    async fn after_a_failed_request_the_next_store_checks_the_settings_first() {
        let server = RedisServer::start();
        // No periodic check within the test: only the check after the
        // lost connection can see the change.
        let spool = open_checking(&server, Duration::from_secs(3600), false).await;
        let mut n = 0;
        store_until(&spool, &mut n, None).await;
        config_set(&server, "maxmemory-policy", "allkeys-lru").await;
        store_until(&spool, &mut n, None).await;
        // Every client's connection drops (as in a restart or failover).
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query_async::<()>(&mut raw(&server).await)
            .await
            .unwrap();
        store_until(&spool, &mut n, Some("maxmemory-policy is allkeys-lru")).await;
    }

    /// A server still loading its AOF after a restart reports
    /// `aof_enabled:0`: that is not a weaker server, and mail is accepted
    /// as soon as it has loaded, not one check interval later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_loading_its_data_is_not_taken_for_a_weaker_one() {
        // 2 ms per key loaded: 5 000 keys keep the restart loading for
        // several seconds.
        let mut server = RedisServer::start_with(&["--key-load-delay", "2000"]);
        let port = server.port();
        // Only the check after a failed request may run in this test.
        let spool = open_checking(&server, Duration::from_secs(3600), false).await;
        let mut n = 0;
        store_until(&spool, &mut n, None).await;
        let mut fill = redis::pipe();
        for k in 0..5000 {
            fill.cmd("SET").arg(format!("filler:{k}")).arg("x").ignore();
        }
        fill.query_async::<()>(&mut raw(&server).await)
            .await
            .unwrap();

        // A store while the server is down fails: the next one checks the
        // settings first.
        server.kill();
        n += 1;
        assert!(spool.store(vec![message(n, 10)]).await.is_err());
        let restarted = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        });
        let loading = |port| {
            // Replies are slow while it loads.
            let slow = Duration::from_secs(5);
            smarthost_testkit::redis::command_within(port, &["INFO", "persistence"], slow)
                .is_some_and(|info| info.contains("loading:1"))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !loading(port) {
            assert!(
                Instant::now() < deadline,
                "the server never reported loading"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // That check runs while the server loads.
        n += 1;
        let refused = spool.store(vec![message(n, 10)]).await;
        assert!(
            matches!(refused, Err(SpoolError::Unavailable(_))),
            "{refused:?}"
        );
        assert!(loading(port), "loaded before the stores were tried");
        let _server = restarted.await.unwrap();
        n += 1;
        spool
            .store(vec![message(n, 10)])
            .await
            .expect("stored once the server has loaded");
    }

    #[test]
    fn waitaof_replies_are_checked() {
        assert!(check_waitaof("store", &[1, 0]).is_ok());
        assert!(matches!(
            check_waitaof("store", &[0, 0]),
            Err(SpoolError::Unavailable(_))
        ));
        assert!(check_waitaof("store", &[]).is_err());
    }

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(
            redact("redis://user:secret@redis.example:6379/0"),
            "redis://***@redis.example:6379/0"
        );
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
