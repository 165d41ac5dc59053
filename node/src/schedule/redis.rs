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
//! | `smarthost:{d:<domain>}:line` | sorted set | id → place in line: due deliveries, lowest first |
//! | `smarthost:{d:<domain>}:deferred` | sorted set | id → next attempt (ms) |
//! | `smarthost:{d:<domain>}:leases` | sorted set | id → lease expiry (ms, Redis clock) |
//! | `smarthost:{d:<domain>}:holders` | hash | id → holder of the lease |
//! | `smarthost:{d:<domain>}:suspended` | string | present while the domain is suspended |
//! | `smarthost:{d:<domain>}:messages` | sorted set | id → 0: every id queued in the domain (ready, deferred or leased), for listing in id order (`ZRANGE BYLEX`) |
//! | `smarthost:{domains}:active` | set | domains that hold work (ready, deferred or leased) |
//! | `smarthost:{domains}:ready` | set | domains that may have ready work |
//! | `smarthost:{domains}:timers` | sorted set | domain → when it next needs a look (ms): its earliest deferred attempt or lease expiry |
//! | `smarthost:{domains}:suspended` | set | suspended domains, for listing |
//!
//! Ready work is a sorted set (`line`; earlier releases kept a list under
//! `ready`, which their nodes drain during a rolling upgrade while the
//! leader's rescan files every stored message into the set, and a lease
//! held under either is respected by both) rather than a list so that every script is
//! O(log N) in what it touches, never a scan of the line: membership is a
//! `ZSCORE`, removal a `ZREM`. The score is the place in line: work goes to
//! the back at one more than the highest score, work handed back goes to
//! the front at one less than the lowest, `take` pops the lowest (FIFO, and
//! handed-back work first, as with a list).
//!
//! The records are the Redis spool's (`smarthost:{m:<id>}:record`, see
//! [`crate::spool::redis`]); the schedule reads them and, on `complete` and
//! `expire`, writes them. A record that cannot be read is set aside
//! ([`crate::spool::redis::quarantine`]) and the work goes on without it.
//!
//! # Scripts
//!
//! Every change inside one domain slot is one Lua script (`scripts/*.lua`,
//! each with its keys, arguments and complexity): `take` pops up to `max`
//! ids from ready and leases them; `file` checks the lease holder, drops the
//! lease and files the id in deferred (or nowhere when the delivery is
//! done), `file_many` for many ids of a domain at once; `release` puts a
//! held id back at the front of ready; `promote` moves due ids from
//! deferred to ready; `reclaim` moves ids whose lease ran out back to the
//! front of ready; `insert` files new ids unless they are
//! already queued; `claim` leases ids for an expiry sweep. Lease times come
//! from the server's `TIME` inside the scripts: they are written by one
//! node and judged by another, so no node's clock is compared with
//! another's. Next-attempt times are the node's (they come out of
//! [`apply_outcome`]): a skewed clock moves a retry by the skew, it never
//! hands one delivery out twice.
//!
//! `insert`, `promote`, `reclaim` and `release` also publish the domain
//! when its line was empty before, so that the other nodes hear of the work
//! at once ([`super::news`]); not on a Cluster, where a `PUBLISH` goes to
//! every shard.
//!
//! # The domain sets
//!
//! The sets in `{domains}` say where to look, so that the work of a tick is
//! in proportion to the domains that need it, not to every domain ever
//! seen: `ready_domains` reads the ready set (about 2,000 domains a
//! call at most, the next ones at the next call), `promote` and
//! `reclaim_expired_leases` take the due domains out of the timers. They
//! live in another slot than the domains, so they cannot change in the same
//! script; two rules keep them from hiding work:
//!
//! - A writer that gives a domain work (or an earlier timer) adds the domain
//!   *after* its domain script (`SADD`, `ZADD LT`): `insert` also adds it
//!   before, so that a node that dies in between leaves a domain that is
//!   looked at for nothing rather than work nobody looks at. Inside the
//!   transaction of a store on one server nothing comes between them, so
//!   there the sets go once, after ([`InsertPlan::in_one_transaction`]);
//!   on one server `take` sets the timer of its leases inside its script,
//!   which may touch the timers there (they are in another slot only on a
//!   Cluster).
//! - Whoever takes a domain out does so *before* it looks at the domain, and
//!   adds it back if it finds work: `promote` and `reclaim_expired_leases`
//!   pop the due timers, run the domain scripts and add back the timers
//!   they answer; `ready_domains` drops a domain whose ready work is empty,
//!   then looks again; a completion that leaves a domain with no work at
//!   all drops it from the active set, then looks again.
//!
//! Whatever the interleaving, a writer's add then comes after the removal,
//! or the look after the removal sees the writer's work. A node that dies
//! between a removal and its look leaves a domain out until the next
//! insert into it, or the leader's rescan, which inserts every stored
//! message again and so adds its domains back.
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
//! would find it again. On one server both steps are one script
//! (`complete.lua`, which does what `write_record.lua` and then, unless
//! the record changed, `file.lua` do), so nothing lies between them; the
//! completions that finish while one such call is under way go together
//! in the next ([`Together`]), each domain's filed with one command
//! per set. On a Cluster each record is written by a call of its own
//! (each is in a slot of its own), the calls that wait going together in
//! one request, and the filings that follow go together the same way
//! (`file_many.lua`, a call per domain).
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
//! `take` is two (the script, which on one server also sets the domain's
//! timer, then every record in one pipeline, with the timer on a
//! Cluster); `complete` is one on one server (the script, then the
//! timer), shared with the completions that go with it, two on a
//! Cluster (the record, then the domain scripts with the index entries,
//! shared with the filings that go with it, and the timers after them),
//! plus two when it leaves the domain without work (the
//! active set, then a look); `insert` is one, plus one
//! when it finds ids already deferred or leased (a rescan: their domains'
//! timers are put back); `has_ready`, `release`, `suspend`, `resume` and
//! `records` are one; `promote` and `reclaim_expired_leases` are one when
//! no domain is due, else three (the timers, the domain scripts, the
//! timers and ready set back);
//! `ready_domains` is two (the ready set, then the size of each listed
//! domain), plus one per further page of a set over about 1,000 domains,
//! plus two when it drops a domain. [`RedisSchedule::round_trips`]
//! counts them. On Redis Cluster a pipeline over several slots is split by
//! the connection into requests sent at once (still one round trip, see
//! [`smarthost_coordinator::redis`]), so its commands are not ordered
//! across slots: where a domain set must change after a domain script, it
//! is its own request (`insert` three, four on a rescan, `release` two, a
//! `complete` that defers three).

use crate::now_ms;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::aio::ConnectionLike as _;
use redis::{Cmd, ErrorKind, FromRedisValue, Pipeline, Script, ServerErrorKind, Value};
use serde::{Deserialize, Serialize};
use smarthost_coordinator::redis::Connection;
use smarthost_proto::envelope::{self, MessageId, MessageRecord};

use super::news::{self, ReadyNews};
use super::{dedup, Job, ReportHook, Schedule};
use crate::delivery::MessageOutcome;
use crate::metrics::RedisFailure;
use crate::scheduler::{
    apply_outcome, expire_delivery, Completion, RetryPolicy, SchedulerCounts, TakenMessage,
};
use crate::spool::local::body_bytes;
use crate::spool::redis::{self as spool_redis, body_key, record_key, INDEX_KEY};
use crate::spool::{ListCursor, NewMessage, RedisSpool, SpoolError};

/// Domains that hold work.
pub const ACTIVE_KEY: &str = "smarthost:{domains}:active";
/// Domains that may have ready work.
pub const READY_KEY: &str = "smarthost:{domains}:ready";
/// Domains by when they next need a look (a deferred attempt or a lease
/// expiry).
pub const TIMERS_KEY: &str = "smarthost:{domains}:timers";
/// Suspended domains, for listing; scripts read the per-domain flag.
pub const SUSPENDED_KEY: &str = "smarthost:{domains}:suspended";

/// Reports written with the outcome that calls for them and not queued
/// yet: `<message id>:<report id>` by when they were written (or last
/// taken to be queued); see [`Schedule::send_pending_reports`].
pub const PENDING_REPORTS_KEY: &str = "smarthost:{index}:reports";

/// The reports kept with the record of `id`, in its slot.
pub fn report_key(id: &MessageId, report: &MessageId) -> String {
    format!("smarthost:{{m:{id}}}:report:{report}")
}

/// The most messages whose pending reports one call queues.
const PENDING_BATCH: usize = 100;

/// The most batches of [`PENDING_BATCH`] one pass takes.
const PENDING_BATCHES: usize = 10;

/// How many messages' reports are queued at once.
const REPORTS_AT_ONCE: usize = 32;

/// How long `complete` keeps trying to record an outcome Redis does not
/// take (a restart, a cut link) before it gives the delivery up to be
/// attempted again; well within any lease (at least a second, 15 minutes by
/// default) as long as the renewals get through.
const COMPLETE_PATIENCE: Duration = Duration::from_secs(30);

/// The first wait before an outcome is tried again; it doubles up to
/// [`COMPLETE_RETRY_MAX`].
const COMPLETE_RETRY: Duration = Duration::from_millis(250);
const COMPLETE_RETRY_MAX: Duration = Duration::from_secs(4);

/// How often `complete` recomputes an outcome on a record another node
/// changed meanwhile before it gives up (the lease then runs out and the
/// delivery is attempted again).
const MAX_RECORD_RACES: usize = 8;

/// The most messages one expiry sweep handles; the oldest go first and the
/// next sweep goes on.
pub const EXPIRY_BATCH: usize = 1000;

/// The most index entries one expiry sweep reads while it looks for
/// [`EXPIRY_BATCH`] messages past orphaned entries (whose record is gone).
const EXPIRY_SCAN: usize = 10 * EXPIRY_BATCH;

/// How long an expiry sweep holds what it claimed; a sweep that dies
/// leaves the claims to be reclaimed after this. A sweep that lives
/// renews them every third of this while it queues reports, and starts
/// a message's reports only while at least half of it is left.
const EXPIRY_CLAIM: Duration = Duration::from_secs(60);

/// The most due domains one `promote` or reclaim looks at; the rest stay
/// due for the next call.
const DUE_DOMAINS: usize = 1000;

/// The most deliveries one domain script promotes or reclaims per call.
const DUE_PER_DOMAIN: usize = 1000;

/// About the most domains one `ready_domains` looks at (`SSCAN` pages of
/// [`READY_PAGE`]); the next call goes on from there. A node can serve
/// only so many domains at once, and each looked at costs a command.
const READY_LOOK: usize = 2000;
const READY_PAGE: usize = 1000;

/// Active domains that one lease renewal looks at for orphaned leases of
/// its holder besides the domains it holds leases in (`SSCAN COUNT`): the
/// whole set is covered over successive renewals.
const ORPHAN_SCAN: usize = 200;

/// The keys of one domain.
struct DomainKeys {
    ready: String,
    deferred: String,
    leases: String,
    holders: String,
    suspended: String,
    messages: String,
}

/// The pending messages of a sender (`Envelope::sender_key`), by id: a
/// sorted set of ids, all scored 0, read in lexical (so receive) order.
/// Added to when the messages are inserted, trimmed when they are done;
/// an id whose message is gone another way is dropped when a listing
/// finds it.
pub fn sender_messages_key(sender: &str) -> String {
    format!("smarthost:{{s:{sender}}}:messages")
}

/// A `ZREM` of a done message from its sender's listing.
fn sender_zrem(record: &MessageRecord) -> Cmd {
    let mut zrem = redis::cmd("ZREM");
    zrem.arg(sender_messages_key(&record.envelope.sender_key()))
        .arg(record.id.as_str());
    zrem
}

fn domain_keys(domain: &str) -> DomainKeys {
    let key = |what: &str| format!("smarthost:{{d:{domain}}}:{what}");
    DomainKeys {
        // Not `ready`, the list of earlier releases: during a rolling
        // upgrade their nodes drain that list while these use this set,
        // which the leader's rescan fills with every stored message.
        ready: key("line"),
        deferred: key("deferred"),
        leases: key("leases"),
        holders: key("holders"),
        suspended: key("suspended"),
        messages: key("messages"),
    }
}

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
    state: Script,
    pop_timers: Script,
    pending_reports: Script,
    file_many: Script,
    complete: Script,
}

impl Scripts {
    /// The code of every script, for `SCRIPT LOAD`.
    const CODE: [&'static str; 14] = [
        include_str!("scripts/take.lua"),
        include_str!("scripts/file.lua"),
        include_str!("scripts/release.lua"),
        include_str!("scripts/promote.lua"),
        include_str!("scripts/reclaim.lua"),
        include_str!("scripts/insert.lua"),
        include_str!("scripts/write_record.lua"),
        include_str!("scripts/renew.lua"),
        include_str!("scripts/reclaim_holders.lua"),
        include_str!("scripts/claim.lua"),
        include_str!("scripts/state.lua"),
        include_str!("scripts/pop_timers.lua"),
        include_str!("scripts/pending_reports.lua"),
        include_str!("scripts/file_many.lua"),
    ];

    fn new() -> Scripts {
        let [take, file, release, promote, reclaim, insert, write_record, renew, reclaim_holders, claim, state, pop_timers, pending_reports, file_many] =
            Scripts::CODE.map(Script::new);
        Scripts {
            take,
            file,
            release,
            promote,
            reclaim,
            insert,
            write_record,
            renew,
            reclaim_holders,
            claim,
            state,
            pop_timers,
            pending_reports,
            file_many,
            complete: Script::new(&Scripts::complete_code()),
        }
    }

    /// `complete.lua` behind `file_many.lua`, wrapped as a local function
    /// of its own keys and arguments.
    fn complete_code() -> String {
        format!(
            "local function file_many(KEYS, ARGV)\n{}\nend\n{}",
            include_str!("scripts/file_many.lua"),
            include_str!("scripts/complete.lua"),
        )
    }
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

/// One delivery an insert files: the message id, its next attempt and
/// whether that is due now.
type Filing = (String, u64, bool);

/// Whether the messages of an insert may be queued already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fresh {
    /// Stored by this node just now: an id its domain's messages do not
    /// list yet is queued nowhere, so its place is not asked
    /// (`insert.lua`).
    JustStored,
    /// Anything else, a rescan above all, which can meet ids an earlier
    /// release queued without listing them: every place is asked.
    MaybeQueued,
}

/// The commands of one [`Schedule::insert`] and what reading their replies
/// needs: on one server they can run inside the transaction that stores
/// the messages ([`crate::spool::Spool::store_scheduled`]).
pub(crate) struct InsertPlan {
    /// Run in order: the domain sets and the senders' listings, one
    /// script per domain, the domain sets again.
    pub(crate) steps: Vec<Vec<Cmd>>,
    /// How many commands the first two steps have.
    sizes: (usize, usize),
    /// How many of the first step's commands are the domain sets (they
    /// come first in it).
    sets: usize,
    /// Each script's domain, and whether any of its work is due now.
    domains: Vec<(String, bool)>,
}

impl InsertPlan {
    /// The plan for one transaction: nothing runs between its commands,
    /// so the domain sets need adding only once, after the scripts (see
    /// "The domain sets" in the module doc); the copy before them goes.
    pub(crate) fn in_one_transaction(mut self) -> Self {
        self.steps[0].drain(..self.sets);
        self.sizes.0 -= self.sets;
        self.sets = 0;
        self
    }

    /// The replies of the scripts, out of the replies of every command
    /// of the plan in order.
    pub(crate) fn script_replies(&self, mut replies: Vec<Value>) -> Vec<Value> {
        let (first, scripts) = self.sizes;
        replies.truncate(first + scripts);
        replies.split_off(first.min(replies.len()))
    }
}

/// The most attempts one `complete.lua` call carries.
const COMPLETIONS_PER_CALL: usize = 100;

/// One attempt's keys and arguments in a `complete.lua` call, the entry of
/// its kept reports and its domain's retry timer.
struct Attempt {
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    pending: Option<String>,
    timer: Option<(String, u64)>,
}

/// Calls that wait while one of their kind is under way, to go together
/// in the next (up to [`COMPLETIONS_PER_CALL`]): many deliveries finishing
/// at once cost one call, not a call each. Completions on one server
/// (`complete.lua`); on a Cluster, record writes (a `write_record.lua`
/// call each, in one request) and filings (`file_many.lua`).
struct Together<T, R> {
    waiting: Mutex<Vec<(T, Answer<R>)>>,
    /// Held by the caller whose call is under way.
    turn: tokio::sync::Mutex<()>,
}

/// Where one item's part of a reply goes.
type Answer<R> = tokio::sync::oneshot::Sender<Result<R, SpoolError>>;

impl<T, R> Default for Together<T, R> {
    fn default() -> Self {
        Together {
            waiting: Mutex::new(Vec::new()),
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T, R> Together<T, R> {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Vec<(T, Answer<R>)>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `item` through `call` with the others that wait meanwhile and
    /// answers its part of the reply; `call` answers each item, in order.
    async fn send<F, Fut>(&self, what: &str, item: T, call: F) -> Result<R, SpoolError>
    where
        F: Fn(Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<R>, SpoolError>>,
    {
        let (answer, mut reply) = tokio::sync::oneshot::channel();
        self.waiting().push((item, answer));
        loop {
            let _turn = self.turn.lock().await;
            match reply.try_recv() {
                Ok(reply) => return reply,
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    return Err(SpoolError::Unavailable(format!(
                        "redis {what}: the call carrying it was dropped"
                    )))
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            let batch: Vec<_> = {
                let mut waiting = self.waiting();
                let n = waiting.len().min(COMPLETIONS_PER_CALL);
                waiting.drain(..n).collect()
            };
            let (items, answers): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
            let count = items.len();
            let replies = call(items).await.and_then(|replies| {
                if replies.len() == count {
                    Ok(replies)
                } else {
                    Err(SpoolError::Unavailable(format!(
                        "redis {what}: {} replies for {count} calls",
                        replies.len()
                    )))
                }
            });
            match replies {
                Ok(replies) => {
                    for (answer, reply) in answers.into_iter().zip(replies) {
                        let _ = answer.send(Ok(reply));
                    }
                }
                Err(error) => {
                    for answer in answers {
                        let _ = answer.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}

/// One completion's record write on a Cluster: the entry of its kept
/// reports, if any (in a request before, see [`RedisSchedule::pending_cmd`]),
/// and its `write_record.lua` call.
struct RecordWriteCall {
    pending: Option<String>,
    write: Cmd,
}

/// One delivery's filing on a Cluster, after its record is written: its
/// domain, holder and next attempt, and the listings in other slots that
/// it leaves (the index, the sender's).
struct DomainFiling {
    id: MessageId,
    domain: String,
    holder: String,
    next: Option<u64>,
    forget: Vec<String>,
}

/// The Redis implementation of [`Schedule`].
pub struct RedisSchedule {
    conn: Connection,
    /// The spool it was made for ([`RedisSpool::instance`]): only that
    /// spool runs its inserts in its own transactions.
    spool: u64,
    timeout: Duration,
    scripts: Scripts,
    round_trips: AtomicU64,
    /// Commands sent (a script call is one), for tests and benchmarks.
    commands: AtomicU64,
    held: Mutex<HashMap<(MessageId, String), Held>>,
    completions: Together<Attempt, Value>,
    record_writes: Together<RecordWriteCall, Value>,
    filings: Together<DomainFiling, (bool, bool)>,
    /// Holds the deliveries an expiry sweep of this instance has claimed.
    expiry_holder: String,
    expiry_claim: Duration,
    /// How old reports kept with a record must be before
    /// [`Schedule::send_pending_reports`] queues them: the writer queues
    /// them itself meanwhile.
    report_grace: Duration,
    /// Where the next lease renewal goes on looking for orphaned leases in
    /// the active set (`SSCAN` cursor).
    orphan_cursor: Mutex<u64>,
    /// Where the next `ready_domains` goes on in the ready set (`SSCAN`).
    ready_cursor: Mutex<u64>,
    /// Where the scripts publish ready news ([`news`]); `None` on a
    /// Cluster, where the nodes look at the ready set alone.
    news: Option<NewsChannel>,
}

/// The ready news of one schedule: where it goes, who sends it, and where
/// this node listens (set by [`RedisSchedule::with_ready_news`]).
struct NewsChannel {
    channel: String,
    origin: String,
    client: Option<redis::Client>,
}

impl RedisSchedule {
    /// A schedule on the server of `spool`, whose records it shares.
    /// Loads the scripts (one round trip).
    pub async fn new(spool: &RedisSpool) -> Result<RedisSchedule, SpoolError> {
        let schedule = RedisSchedule {
            conn: spool.connection(),
            spool: spool.instance(),
            timeout: spool.options().response_timeout,
            scripts: Scripts::new(),
            round_trips: AtomicU64::new(0),
            commands: AtomicU64::new(0),
            held: Mutex::new(HashMap::new()),
            completions: Together::default(),
            record_writes: Together::default(),
            filings: Together::default(),
            expiry_holder: format!("expiry/{:016x}", rand::random::<u64>()),
            expiry_claim: EXPIRY_CLAIM,
            report_grace: spool_redis::dangling_grace(spool.options().response_timeout),
            orphan_cursor: Mutex::new(0),
            ready_cursor: Mutex::new(0),
            news: (!spool.connection().is_cluster()).then(|| NewsChannel {
                channel: news::channel(spool.connection().get_db()),
                origin: format!("{:016x}", rand::random::<u64>()),
                client: None,
            }),
        };
        schedule.load_scripts().await?;
        Ok(schedule)
    }

    /// Claims of expiry sweeps last `claim` instead of a minute (tests).
    pub fn with_expiry_claim(mut self, claim: Duration) -> Self {
        self.expiry_claim = claim;
        self
    }

    /// Listens for ready news on the server of `url` (the spool's) when
    /// the queue asks ([`Schedule::ready_news`]); a Cluster has none. The
    /// news only hurries the nodes, so a URL it cannot use is a warning:
    /// the looks at the ready set find the work all the same.
    pub fn with_ready_news(mut self, url: &str) -> Self {
        if let Some(news) = &mut self.news {
            let client = smarthost_coordinator::redis::seeds(url, false).and_then(|seeds| {
                redis::Client::open(seeds[0].as_str()).map_err(|e| e.to_string())
            });
            match client {
                Ok(client) => news.client = Some(client),
                Err(error) => {
                    tracing::warn!(%error, "no ready news: the looks at the ready set alone find other nodes' work")
                }
            }
        }
        self
    }

    /// Adds the two arguments the scripts publish ready news of `domain`
    /// with: the channel (empty: none) and the news.
    fn news_args(&self, cmd: &mut Cmd, domain: &str) {
        match &self.news {
            Some(n) => cmd.arg(&n.channel).arg(news::news(&n.origin, domain)),
            None => cmd.arg("").arg(""),
        };
    }

    /// The commands that insert `records` (see [`Schedule::insert`]), in
    /// three steps to be run in order; `None` when there is nothing to
    /// insert. [`RedisSchedule::inserted`] reads the replies.
    pub(crate) fn insert_plan<'r>(
        &self,
        records: impl Iterator<Item = &'r MessageRecord> + Clone,
        now_ms: u64,
        fresh: Fresh,
    ) -> Option<InsertPlan> {
        // Per domain, in order of first appearance: (id, next, due).
        let mut by_domain: Vec<(String, Vec<Filing>)> = Vec::new();
        for record in records.clone() {
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
            return None;
        }
        // The domain sets before and after the scripts (see "The domain
        // sets" in the module doc): the domains, those with due work, and
        // the earliest attempt of the work that goes to deferred. Work
        // filed in ready needs no timer: a timer that is already due
        // would only make the next `promote` look at the domain for
        // nothing, and with new mail in many domains that is a script
        // per domain per tick. An id that is already deferred or leased
        // stays where it is (a rescan after a lost timer): the script
        // answers the domain's timer and it is put back below.
        let domains: Vec<&str> = by_domain.iter().map(|(d, _)| d.as_str()).collect();
        let due: Vec<String> = by_domain
            .iter()
            .filter(|(_, entries)| entries.iter().any(|(_, _, due)| *due))
            .map(|(d, _)| d.clone())
            .collect();
        let timers: Vec<(String, u64)> = by_domain
            .iter()
            .filter_map(|(d, entries)| {
                let earliest = entries.iter().filter(|e| !e.2).map(|e| e.1).min()?;
                Some((d.clone(), earliest))
            })
            .collect();
        let sets = || {
            let mut cmds = vec![{
                let mut cmd = redis::cmd("SADD");
                cmd.arg(ACTIVE_KEY).arg(&domains);
                cmd
            }];
            cmds.extend(Self::mark_cmds(&due, &timers));
            cmds
        };
        // The senders' listings, before the messages are filed: a message
        // that can be taken is always listed.
        let mut by_sender: Vec<(String, Vec<&str>)> = Vec::new();
        for record in records.clone() {
            let sender = record.envelope.sender_key();
            match by_sender.iter_mut().find(|(s, _)| *s == sender) {
                Some((_, ids)) => ids.push(record.id.as_str()),
                None => by_sender.push((sender, vec![record.id.as_str()])),
            }
        }
        let mut first = sets();
        let set_commands = first.len();
        for (sender, ids) in &by_sender {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg(sender_messages_key(sender));
            for id in ids {
                zadd.arg(0).arg(*id);
            }
            first.push(zadd);
        }
        let mut scripts = Vec::with_capacity(by_domain.len());
        for (domain, entries) in &by_domain {
            let k = domain_keys(domain);
            let mut cmd = evalsha(
                &self.scripts.insert,
                &[&k.ready, &k.deferred, &k.leases, &k.suspended, &k.messages],
            );
            self.news_args(&mut cmd, domain);
            cmd.arg(match fresh {
                Fresh::JustStored => "1",
                Fresh::MaybeQueued => "0",
            });
            for (id, next, due) in entries {
                cmd.arg(id).arg(*next).arg(if *due { "1" } else { "0" });
            }
            scripts.push(cmd);
        }
        let sizes = (first.len(), scripts.len());
        let steps = vec![first, scripts, sets()];
        let domains = by_domain
            .into_iter()
            .map(|(domain, entries)| {
                let due = entries.iter().any(|(_, _, due)| *due);
                (domain, due)
            })
            .collect();
        Some(InsertPlan {
            steps,
            sizes,
            sets: set_commands,
            domains,
        })
    }

    /// Whether `spool` is the one this schedule was made for (whose
    /// server and database it shares).
    pub(crate) fn shares(&self, spool: &RedisSpool) -> bool {
        self.spool == spool.instance()
    }

    /// The domains with due work after an [`InsertPlan`] ran, from the
    /// replies of its scripts (its second step); puts back the timers of
    /// work that was already deferred or leased.
    pub(crate) async fn inserted(
        &self,
        plan: InsertPlan,
        replies: Vec<Value>,
    ) -> Result<Vec<String>, SpoolError> {
        let mut ready = Vec::new();
        let mut restored = Vec::new();
        for ((domain, due), reply) in plan.domains.into_iter().zip(replies) {
            let (suspended, timer): (i64, i64) = parse("insert", reply)?;
            if timer >= 0 {
                restored.push((domain.clone(), timer as u64));
            }
            if suspended == 0 && due {
                ready.push(domain);
            }
        }
        if !restored.is_empty() {
            let mut pipe = redis::pipe();
            for cmd in Self::mark_cmds(&[], &restored) {
                pipe.add_command(cmd).ignore();
            }
            self.run("insert: timers", &pipe).await?;
        }
        Ok(dedup(ready))
    }

    /// Pending reports are queued by [`Schedule::send_pending_reports`]
    /// once `grace` old instead of the orphan grace (tests).
    pub fn with_report_grace(mut self, grace: Duration) -> Self {
        self.report_grace = grace;
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

    /// Commands sent to Redis since `new`: a script call counts one,
    /// whatever it runs.
    pub fn commands(&self) -> u64 {
        self.commands.load(Ordering::Relaxed)
    }

    fn count(&self, pipe: &Pipeline) {
        let commands = pipe.cmd_iter().count();
        self.round_trips.fetch_add(1, Ordering::Relaxed);
        self.commands.fetch_add(commands as u64, Ordering::Relaxed);
        crate::metrics::redis_commands("schedule", commands);
    }

    /// Loads the scripts again (the server lost them: a restart).
    pub(crate) async fn load_scripts(&self) -> Result<(), SpoolError> {
        let mut pipe = redis::pipe();
        for code in Scripts::CODE {
            pipe.cmd("SCRIPT").arg("LOAD").arg(code).ignore();
        }
        pipe.cmd("SCRIPT")
            .arg("LOAD")
            .arg(Scripts::complete_code())
            .ignore();
        self.once("SCRIPT LOAD", &pipe).await.map(|_: Value| ())
    }

    async fn once<T: FromRedisValue>(&self, what: &str, pipe: &Pipeline) -> Result<T, SpoolError> {
        self.count(pipe);
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
        self.count(pipe);
        let mut conn = self.conn.clone();
        let started = std::time::Instant::now();
        let first =
            tokio::time::timeout(self.timeout, pipe.query_async::<Vec<Value>>(&mut conn)).await;
        let failure = match &first {
            Ok(Ok(_)) => None,
            Ok(Err(e)) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => None,
            Ok(Err(_)) => Some(RedisFailure::Error),
            Err(_) => Some(RedisFailure::Timeout),
        };
        crate::metrics::redis_request("schedule", started.elapsed(), failure);
        let first = first.map_err(|_| {
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

    /// Every domain that holds work.
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

    /// Runs `steps` in order and answers the replies of each: on one
    /// server as one pipeline (one round trip, in order), on Redis Cluster
    /// one request per step, each after the one before (the commands of a
    /// step are sent at once, in no order across slots). Empty steps are
    /// skipped.
    /// Up to `limit` ids of the sorted set `key` (all scored 0) after
    /// `after`, in lexical (so receive) order: a page of a listing.
    async fn lex_page(
        &self,
        what: &str,
        key: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let from = after.map_or("-".to_string(), |id| format!("({id}"));
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(key)
            .arg(from)
            .arg("+")
            .arg("BYLEX")
            .arg("LIMIT")
            .arg(0)
            .arg(limit);
        let mut values = self.run(what, &pipe).await?;
        let ids: Vec<String> = parse(what, values.pop().unwrap_or(Value::Nil))?;
        Ok(ids.into_iter().map(MessageId).collect())
    }

    async fn ordered(
        &self,
        what: &str,
        steps: Vec<Vec<Cmd>>,
    ) -> Result<Vec<Vec<Value>>, SpoolError> {
        if self.conn.is_cluster() {
            let mut replies = Vec::with_capacity(steps.len());
            for step in steps {
                if step.is_empty() {
                    replies.push(Vec::new());
                    continue;
                }
                let mut pipe = redis::pipe();
                for cmd in step {
                    pipe.add_command(cmd);
                }
                replies.push(self.run(what, &pipe).await?);
            }
            return Ok(replies);
        }
        let sizes: Vec<usize> = steps.iter().map(Vec::len).collect();
        let mut pipe = redis::pipe();
        for cmd in steps.into_iter().flatten() {
            pipe.add_command(cmd);
        }
        let mut values = if pipe.is_empty() {
            Vec::new()
        } else {
            self.run(what, &pipe).await?
        }
        .into_iter();
        Ok(sizes
            .into_iter()
            .map(|n| values.by_ref().take(n).collect())
            .collect())
    }

    /// Sets an unreadable record aside (see [`spool_redis::quarantine`]).
    async fn quarantine(
        &self,
        id: &MessageId,
        bytes: &[u8],
        error: &SpoolError,
    ) -> Result<(), SpoolError> {
        spool_redis::quarantine(&self.conn, self.timeout, id, bytes, &error.to_string()).await
    }

    /// Decodes a record read from Redis; one that cannot be read is set
    /// aside and is `None`, like a record that is gone, so that it stalls
    /// nothing.
    async fn decode_or_quarantine(
        &self,
        id: &MessageId,
        bytes: &[u8],
    ) -> Result<Option<MessageRecord>, SpoolError> {
        match decode(id, bytes) {
            Ok(record) => Ok(Some(record)),
            Err(error) => {
                self.quarantine(id, bytes, &error).await?;
                Ok(None)
            }
        }
    }

    /// Drops `domains`, which a script found without work, from the domain
    /// sets, then looks at each again and adds back what got work
    /// meanwhile (see "The domain sets" in the module doc).
    async fn drop_if_empty(&self, domains: Vec<String>) -> Result<(), SpoolError> {
        if domains.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SREM").arg(ACTIVE_KEY).arg(&domains).ignore();
        pipe.cmd("SREM").arg(READY_KEY).arg(&domains).ignore();
        pipe.cmd("ZREM").arg(TIMERS_KEY).arg(&domains).ignore();
        self.run("drop empty domains", &pipe).await?;
        let states = self
            .per_domain("drop empty domains", &domains, |domain| {
                let k = domain_keys(domain);
                evalsha(&self.scripts.state, &[&k.ready, &k.deferred, &k.leases])
            })
            .await?;
        let (mut busy, mut ready, mut timers) = (Vec::new(), Vec::new(), Vec::new());
        for (domain, state) in domains.into_iter().zip(states) {
            let (all, in_ready, next): (i64, i64, i64) = parse("domain state", state)?;
            if in_ready > 0 {
                ready.push(domain.clone());
            }
            if next >= 0 {
                timers.push((domain.clone(), next as u64));
            }
            if all > 0 {
                busy.push(domain);
            }
        }
        if !busy.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("SADD").arg(ACTIVE_KEY).arg(&busy).ignore();
            for cmd in Self::mark_cmds(&ready, &timers) {
                pipe.add_command(cmd).ignore();
            }
            self.run("drop empty domains", &pipe).await?;
        }
        Ok(())
    }

    /// The domain sets after domain scripts put work back to ready
    /// (`ready`) or gave domains earlier timers (`timers`, ms).
    fn mark_cmds(ready: &[String], timers: &[(String, u64)]) -> Vec<Cmd> {
        let mut cmds = Vec::new();
        if !ready.is_empty() {
            let mut cmd = redis::cmd("SADD");
            cmd.arg(READY_KEY).arg(ready);
            cmds.push(cmd);
        }
        if !timers.is_empty() {
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(TIMERS_KEY).arg("LT");
            for (domain, at) in timers {
                cmd.arg(*at).arg(domain);
            }
            cmds.push(cmd);
        }
        cmds
    }

    /// Takes the domains whose timer is due by `now` out of the timers
    /// (see "The domain sets"), runs `script` on each and adds them back
    /// with the timers the script answers and, when it put work in ready,
    /// to the ready set. `script` answers `{moved, …, next timer or -1}`;
    /// returns `(domain, script reply)` of every domain looked at.
    async fn service_due(
        &self,
        what: &str,
        now: u64,
        script: impl Fn(&str) -> Cmd,
    ) -> Result<Vec<(String, Vec<i64>)>, SpoolError> {
        let mut pipe = redis::pipe();
        pipe.add_command(evalsha(&self.scripts.pop_timers, &[TIMERS_KEY]))
            .arg(now)
            .arg(DUE_DOMAINS);
        let reply = self.run(what, &pipe).await?;
        let due: Vec<(String, f64)> = parse(what, reply.into_iter().next().unwrap_or(Value::Nil))?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        let domains: Vec<String> = due.iter().map(|(d, _)| d.clone()).collect();
        let replies = match self.per_domain(what, &domains, &script).await {
            Ok(replies) => replies,
            Err(error) => {
                // The timers go back as they were, for the next call.
                let timers: Vec<(String, u64)> =
                    due.iter().map(|(d, at)| (d.clone(), *at as u64)).collect();
                let mut pipe = redis::pipe();
                for cmd in Self::mark_cmds(&[], &timers) {
                    pipe.add_command(cmd).ignore();
                }
                let _ = self.run(what, &pipe).await;
                return Err(error);
            }
        };
        let mut looked = Vec::with_capacity(domains.len());
        let (mut ready, mut timers) = (Vec::new(), Vec::new());
        for (domain, reply) in domains.into_iter().zip(replies) {
            let reply: Vec<i64> = parse(what, reply)?;
            if reply.first().copied().unwrap_or(0) > 0 {
                ready.push(domain.clone());
            }
            if let Some(&next) = reply.last().filter(|&&n| n >= 0) {
                timers.push((domain.clone(), next as u64));
            }
            looked.push((domain, reply));
        }
        let marks = Self::mark_cmds(&ready, &timers);
        if !marks.is_empty() {
            let mut pipe = redis::pipe();
            for cmd in marks {
                pipe.add_command(cmd).ignore();
            }
            self.run(what, &pipe).await?;
        }
        Ok(looked)
    }

    /// The compare-and-set of a record, with the reports of the change.
    fn write_record_cmd(
        &self,
        id: &MessageId,
        expected: &[u8],
        new: Option<&[u8]>,
        reports: Option<&KeptReports>,
    ) -> Cmd {
        let (keys, args) = Self::write_record_parts(id, expected, new, reports);
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let mut cmd = evalsha(&self.scripts.write_record, &keys);
        cmd.arg(args);
        cmd
    }

    /// The keys and arguments of `write_record.lua`; the records are
    /// borrowed, not copied.
    fn write_record_parts<'a>(
        id: &MessageId,
        expected: &'a [u8],
        new: Option<&'a [u8]>,
        reports: Option<&KeptReports>,
    ) -> (Vec<String>, Vec<Cow<'a, [u8]>>) {
        let mut keys = vec![record_key(id), body_key(id)];
        keys.extend(reports.map(|r| r.key.clone()));
        let mut args = vec![
            Cow::Borrowed(expected),
            Cow::Borrowed(new.unwrap_or_default()),
        ];
        args.extend(reports.map(|r| Cow::Owned(r.encode())));
        (keys, args)
    }

    /// One attempt's part of a `complete.lua` call: what
    /// [`Self::write_record_cmd`] and then, unless the record changed
    /// meanwhile, [`Self::file_and_forget_cmd`] would do, in one script
    /// with other attempts: only on one server, where the records and the
    /// domains can change in one call. The message leaves `done` when the
    /// write finishes it, the index when its record is gone.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        id: &MessageId,
        expected: &[u8],
        new: Option<&[u8]>,
        reports: Option<&KeptReports>,
        domain: &str,
        holder: &str,
        next: Option<u64>,
        done: &[&str],
    ) -> Attempt {
        let (write_keys, write_args) = Self::write_record_parts(id, expected, new, reports);
        let (file_keys, file_args) = Self::file_parts(id, domain, holder, next);
        let gone = [INDEX_KEY];
        let counts = [write_keys.len(), write_args.len(), done.len(), gone.len()];
        let mut keys = write_keys;
        keys.extend(file_keys);
        keys.extend(done.iter().chain(&gone).map(|k| k.to_string()));
        let mut args = counts.map(|n| n.to_string().into_bytes()).to_vec();
        args.extend(write_args.into_iter().map(Cow::into_owned));
        args.extend(file_args.into_iter().map(String::into_bytes));
        Attempt {
            keys,
            args,
            pending: reports.map(|r| r.entry.clone()),
            timer: next.map(|n| (domain.to_string(), n)),
        }
    }

    /// Sends `attempt` with the others that wait meanwhile, in one call of
    /// `complete.lua`, and answers its part of the reply.
    async fn complete_together(&self, attempt: Attempt) -> Result<Value, SpoolError> {
        self.completions
            .send("complete", attempt, |attempts| async move {
                self.complete_attempts(&attempts).await
            })
            .await
    }

    /// One round trip: the entries of the attempts' reports, one call of
    /// `complete.lua`, the timers of their retries (after the script, as
    /// a writer adds them: see "The domain sets"; one for a record that
    /// changed meanwhile only makes a look for nothing). Answers each
    /// attempt's reply, in order.
    async fn complete_attempts(&self, attempts: &[Attempt]) -> Result<Vec<Value>, SpoolError> {
        let pending = Self::pending_cmd(attempts.iter().filter_map(|a| a.pending.as_deref()));
        let keys: Vec<&str> = attempts
            .iter()
            .flat_map(|a| a.keys.iter().map(String::as_str))
            .collect();
        let mut script = evalsha(&self.scripts.complete, &keys);
        script.arg(attempts.len());
        for attempt in attempts {
            script.arg(&attempt.args);
        }
        let timers: Vec<(String, u64)> = attempts.iter().filter_map(|a| a.timer.clone()).collect();
        let steps = vec![pending, vec![script], Self::mark_cmds(&[], &timers)];
        let reply = self.ordered("complete", steps).await?;
        let reply = reply.into_iter().nth(1).and_then(|r| r.into_iter().next());
        parse("complete", reply.unwrap_or(Value::Nil))
    }

    /// The reply of `complete.lua`: the record write and, unless the
    /// record changed, whether the delivery was filed and whether its
    /// domain holds no work now.
    fn parse_complete(value: Value) -> Result<(RecordWrite, Option<(bool, bool)>), SpoolError> {
        let reply: Vec<Value> = parse("complete", value)?;
        let mut reply = reply.into_iter();
        let mut next = |what: &str| parse::<i64>(what, reply.next().unwrap_or(Value::Nil));
        let write = match next("complete")? {
            1 => {
                let current = parse("complete", reply.next().unwrap_or(Value::Nil))?;
                return Ok((RecordWrite::Changed(current), None));
            }
            0 => RecordWrite::Gone,
            _ => RecordWrite::Written,
        };
        let (filed, empty) = (next("complete")?, next("complete")?);
        Ok((write, Some((filed == 1, empty == 1))))
    }

    /// The entries of kept reports, before their records are written: a
    /// crash in between leaves an entry without reports, which is dropped.
    fn pending_cmd<'e>(entries: impl IntoIterator<Item = &'e str>) -> Vec<Cmd> {
        let entries: Vec<&str> = entries.into_iter().collect();
        if entries.is_empty() {
            return Vec::new();
        }
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(PENDING_REPORTS_KEY);
        for entry in entries {
            zadd.arg(now_ms()).arg(entry);
        }
        vec![zadd]
    }

    /// Forgets the entries of reports whose record write lost a race or
    /// found the record gone: their reports were never written, and left
    /// in place each would take a pass's room. One that stays (this
    /// fails) is dropped by a pass.
    async fn forget_unwritten(&self, entries: Vec<String>) {
        if entries.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZREM")
            .arg(PENDING_REPORTS_KEY)
            .arg(entries)
            .ignore();
        if let Err(error) = self.run("pending reports: forget unwritten", &pipe).await {
            tracing::debug!(%error, "entries of unwritten reports wait for a pass");
        }
    }

    /// Queues reports written with their records, several messages at
    /// once, and forgets those queued; the others stay for
    /// [`Schedule::send_pending_reports`]. Returns how many were queued.
    async fn queue_kept(&self, reporter: &ReportHook, kept: Vec<KeptReports>) -> usize {
        use futures_util::stream::{self, StreamExt};

        let queued: Vec<KeptReports> = stream::iter(kept)
            .map(|kept| async move {
                match reporter.queue(kept.reports.clone()).await {
                    Ok(()) => Some(kept),
                    Err(error) => {
                        tracing::warn!(message_id = %kept.message, %error,
                            "cannot queue the delivery reports of a recorded outcome; they are kept and queued later");
                        None
                    }
                }
            })
            .buffer_unordered(REPORTS_AT_ONCE)
            .filter_map(std::future::ready)
            .collect()
            .await;
        let count = queued.len();
        if count == 0 {
            return 0;
        }
        // The reports, then their entries: never an entry gone before its
        // reports.
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(PENDING_REPORTS_KEY);
        let mut dels = Vec::with_capacity(count);
        for kept in &queued {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(&kept.key);
            dels.push(cmd);
            zrem.arg(&kept.entry);
        }
        if let Err(error) = self.ordered("reports queued", vec![dels, vec![zrem]]).await {
            tracing::warn!(%error,
                "cannot forget delivery reports that were queued; they may be queued again");
        }
        count
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
        self.file_and_forget_cmd(id, domain, holder, next, &[])
    }

    /// [`Self::file_cmd`], and the message leaves the listings `forget`
    /// (the index, the sender's) in the same call. Only on one server: on
    /// a Cluster they are in other slots than the domain's.
    fn file_and_forget_cmd(
        &self,
        id: &MessageId,
        domain: &str,
        holder: &str,
        next: Option<u64>,
        forget: &[&str],
    ) -> Cmd {
        let (keys, args) = Self::file_parts(id, domain, holder, next);
        let mut keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        keys.extend_from_slice(forget);
        let mut cmd = evalsha(&self.scripts.file, &keys);
        cmd.arg(args);
        cmd
    }

    /// Writes the records of completions on a Cluster: the entries of
    /// their kept reports, then every `write_record.lua` call in one
    /// request (split by the connection over the primaries, sent at once).
    /// Answers each call's reply, in order.
    async fn write_records_together(
        &self,
        writes: Vec<RecordWriteCall>,
    ) -> Result<Vec<Value>, SpoolError> {
        let pending = Self::pending_cmd(writes.iter().filter_map(|w| w.pending.as_deref()));
        let calls = writes.into_iter().map(|w| w.write).collect();
        let replies = self
            .ordered("complete: record", vec![pending, calls])
            .await?;
        Ok(replies.into_iter().last().unwrap_or_default())
    }

    /// Files deliveries on a Cluster after their records are written: one
    /// `file_many.lua` call per domain (a delivery that comes twice goes
    /// in a later call of its own), one `ZREM` per listing they leave, then
    /// the timers of their retries (after the scripts: see "The domain
    /// sets"). Answers each filing whether it was filed and whether its
    /// domain holds no work now, in order.
    async fn file_together(
        &self,
        filings: Vec<DomainFiling>,
    ) -> Result<Vec<(bool, bool)>, SpoolError> {
        // The calls, each one domain's, with the filings each carries.
        let mut calls: Vec<(&str, Vec<usize>)> = Vec::new();
        for (i, filing) in filings.iter().enumerate() {
            let free = calls.iter_mut().find(|(domain, carried)| {
                *domain == filing.domain && carried.iter().all(|&j| filings[j].id != filing.id)
            });
            match free {
                Some((_, carried)) => carried.push(i),
                None => calls.push((&filing.domain, vec![i])),
            }
        }
        let mut step = Vec::with_capacity(calls.len() + 2);
        for (domain, carried) in &calls {
            let k = domain_keys(domain);
            let keys = [&k.ready, &k.deferred, &k.leases, &k.holders, &k.messages];
            let keys: Vec<&str> = keys.into_iter().map(String::as_str).collect();
            let mut call = evalsha(&self.scripts.file_many, &keys);
            for &i in carried {
                let f = &filings[i];
                call.arg(f.id.as_str())
                    .arg(&f.holder)
                    .arg(f.next.map(|n| n.to_string()).unwrap_or_default());
            }
            step.push(call);
        }
        let mut forget: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for f in &filings {
            for key in &f.forget {
                forget.entry(key).or_default().push(f.id.as_str());
            }
        }
        for (key, ids) in forget {
            let mut zrem = redis::cmd("ZREM");
            zrem.arg(key).arg(ids);
            step.push(zrem);
        }
        let timers: Vec<(String, u64)> = filings
            .iter()
            .filter_map(|f| f.next.map(|n| (f.domain.clone(), n)))
            .collect();
        let after = Self::mark_cmds(&[], &timers);
        let replies = self.ordered("complete: domain", vec![step, after]).await?;
        let mut replies = replies.into_iter().next().unwrap_or_default().into_iter();
        let mut answers = vec![(false, false); filings.len()];
        for (_, carried) in &calls {
            let filed: Vec<(i64, i64)> = parse("file_many", replies.next().unwrap_or(Value::Nil))?;
            if filed.len() != carried.len() {
                return Err(SpoolError::Unavailable(format!(
                    "redis file_many: {} replies for {} deliveries",
                    filed.len(),
                    carried.len()
                )));
            }
            for (&i, (filed, empty)) in carried.iter().zip(filed) {
                answers[i] = (filed == 1, empty == 1);
            }
        }
        Ok(answers)
    }

    /// The domain keys and the arguments of `file.lua`.
    fn file_parts(
        id: &MessageId,
        domain: &str,
        holder: &str,
        next: Option<u64>,
    ) -> (Vec<String>, Vec<String>) {
        let k = domain_keys(domain);
        let keys = vec![k.ready, k.deferred, k.leases, k.holders, k.messages];
        let args = vec![
            id.as_str().to_string(),
            holder.to_string(),
            next.map(|n| n.to_string()).unwrap_or_default(),
        ];
        (keys, args)
    }

    /// Reads the records of `ids` in one pipeline: the bytes, if present.
    async fn fetch(&self, ids: &[MessageId]) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        self.read_records(&mut pipe, ids);
        let values = self.run("GET records", &pipe).await?;
        self.records_read(values)
    }

    /// Adds the reads of the records of `ids` to `pipe`: one `MGET` on
    /// one server, a `GET` each on a Cluster (every record in its own
    /// slot). [`Self::records_read`] takes their replies apart.
    fn read_records(&self, pipe: &mut Pipeline, ids: &[MessageId]) {
        if self.conn.is_cluster() {
            for id in ids {
                pipe.cmd("GET").arg(record_key(id));
            }
        } else {
            let get = pipe.cmd("MGET");
            for id in ids {
                get.arg(record_key(id));
            }
        }
    }

    /// The records [`Self::read_records`] asked for, in order: the bytes,
    /// if present. `values` are the pipeline's replies to those reads.
    fn records_read(&self, values: Vec<Value>) -> Result<Vec<Option<Vec<u8>>>, SpoolError> {
        if !self.conn.is_cluster() {
            let values = values.into_iter().next().unwrap_or(Value::Nil);
            return parse("MGET records", values);
        }
        values
            .into_iter()
            .map(|v| parse::<Option<Vec<u8>>>("GET record", v))
            .collect()
    }
}

/// Reports built for an outcome and written with its record (see
/// [`Reporter`](super::Reporter)) until they are queued.
struct KeptReports {
    message: MessageId,
    /// `<message id>:<first report id>` in [`PENDING_REPORTS_KEY`].
    entry: String,
    key: String,
    reports: Vec<NewMessage>,
}

/// A report as it is kept: its record and its body.
#[derive(Serialize)]
struct ReportOut<'a> {
    record: &'a MessageRecord,
    #[serde(serialize_with = "body_bytes::serialize")]
    body: &'a [u8],
}

#[derive(Deserialize)]
struct ReportIn {
    record: MessageRecord,
    #[serde(deserialize_with = "body_bytes::deserialize")]
    body: Vec<u8>,
}

impl KeptReports {
    /// `None` when there is nothing to report.
    fn new(message: &MessageId, reports: Vec<NewMessage>) -> Option<KeptReports> {
        let first = reports.first()?.record.id.clone();
        Some(KeptReports {
            message: message.clone(),
            entry: format!("{message}:{first}"),
            key: report_key(message, &first),
            reports,
        })
    }

    fn encode(&self) -> Vec<u8> {
        let out: Vec<ReportOut> = self
            .reports
            .iter()
            .map(|r| ReportOut {
                record: &r.record,
                // Reports are built in memory, never spilled.
                body: r.body.head(),
            })
            .collect();
        envelope::encode(&out)
    }

    /// The message and first report id named by a pending `entry`.
    fn parse_entry(entry: &str) -> Option<(MessageId, MessageId)> {
        let (message, first) = entry.split_once(':')?;
        Some((MessageId(message.to_string()), MessageId(first.to_string())))
    }

    /// The reports kept under `entry`, as read back from `bytes`.
    fn decode(entry: &str, bytes: &[u8]) -> Result<KeptReports, SpoolError> {
        let (message, first) = Self::parse_entry(entry)
            .ok_or_else(|| SpoolError::Corrupt(format!("pending report entry {entry:?}")))?;
        let reports: Vec<ReportIn> = envelope::decode(bytes)
            .map_err(|e| SpoolError::Corrupt(format!("reports of {message}: {e}")))?;
        Ok(KeptReports {
            key: report_key(&message, &first),
            message,
            entry: entry.to_string(),
            reports: reports
                .into_iter()
                .map(|r| NewMessage {
                    record: r.record,
                    body: r.body.into(),
                })
                .collect(),
        })
    }
}

/// The reply of `file.lua`: whether the delivery was filed, and whether
/// its domain holds no work now.
fn parse_filed(value: Value) -> Result<(bool, bool), SpoolError> {
    let (filed, empty): (i64, i64) = parse("file", value)?;
    Ok((filed == 1, empty == 1))
}

impl RedisSchedule {
    /// `complete`, with the reports of the outcome built through `report`,
    /// written with the record and queued once it is written.
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
        let key = (id.clone(), domain.to_string());
        let mut kept = None;
        let (holder, mut expected) = match self.held().get(&key) {
            Some(held) => (held.holder.clone(), Some(held.record.clone())),
            None => (String::new(), None),
        };
        let mut races = 0;
        // Entries of reports whose record write lost: forgotten below.
        let mut unwritten = Vec::new();
        // The record is gone: the message is done (a completion whose domain
        // step failed, or another node's), so its index entry goes too.
        let mut gone = false;
        // What the filing answered when it ran with the record's write.
        let mut filed_with_record = None;
        let completion = loop {
            let bytes = match expected.take() {
                Some(bytes) => bytes,
                None => match self.fetch(std::slice::from_ref(id)).await?.pop().flatten() {
                    Some(bytes) => bytes,
                    None => {
                        gone = true;
                        break None;
                    }
                },
            };
            let Some(record) = self.decode_or_quarantine(id, &bytes).await? else {
                // Set aside: the lease goes below, nothing is recorded.
                break None;
            };
            if !record.deliveries.iter().any(|d| d.domain == domain) {
                // Finished meanwhile (expired, or done by a node that
                // lost its lease): nothing to record.
                break None;
            }
            let completion = apply_outcome(&record, domain, outcome, now_ms, policy, jitter);
            // An error leaves the record and the lease: the delivery is
            // attempted again once the lease runs out.
            if let Some(report) = report {
                report
                    .record_events(std::slice::from_ref(&completion))
                    .await?;
            }
            let reports = match report {
                Some(report) if report.needs(&completion) => {
                    KeptReports::new(id, report.build(std::slice::from_ref(&completion)).await?)
                }
                _ => None,
            };
            let new = (!completion.message_done()).then(|| envelope::encode(&*completion.record));
            let (write, filing) = if self.conn.is_cluster() {
                let write = RecordWriteCall {
                    pending: reports.as_ref().map(|k| k.entry.clone()),
                    write: self.write_record_cmd(id, &bytes, new.as_deref(), reports.as_ref()),
                };
                let reply = self
                    .record_writes
                    .send("complete: record", write, |writes| async move {
                        self.write_records_together(writes).await
                    })
                    .await?;
                (Self::parse_record_write(reply)?, None)
            } else {
                // One server: the record and the domain in one script.
                let sender = sender_messages_key(&completion.record.envelope.sender_key());
                let done: Vec<&str> = match completion.message_done() {
                    true => vec![INDEX_KEY, &sender],
                    false => Vec::new(),
                };
                let attempt = Self::attempt(
                    id,
                    &bytes,
                    new.as_deref(),
                    reports.as_ref(),
                    domain,
                    &holder,
                    completion.next_attempt_ms,
                    &done,
                );
                Self::parse_complete(self.complete_together(attempt).await?)?
            };
            if !matches!(write, RecordWrite::Written) {
                unwritten.extend(reports.as_ref().map(|r| r.entry.clone()));
            }
            match write {
                RecordWrite::Written => {
                    kept = reports;
                    filed_with_record = filing;
                    break Some(completion);
                }
                RecordWrite::Gone => {
                    gone = true;
                    filed_with_record = filing;
                    break None;
                }
                RecordWrite::Changed(current) => {
                    races += 1;
                    if races == MAX_RECORD_RACES {
                        self.forget_unwritten(unwritten).await;
                        return Err(SpoolError::Unavailable(format!(
                            "record of {id} keeps changing under complete"
                        )));
                    }
                    expected = Some(current);
                }
            }
        };
        self.forget_unwritten(unwritten).await;
        if let Some((filed, empty)) = filed_with_record {
            self.held().remove(&key);
            if let (Some(kept), Some(report)) = (kept, report) {
                self.queue_kept(report, vec![kept]).await;
            }
            self.after_filing(id, domain, filed, empty).await;
            return Ok(completion);
        }
        // Then the domain: the lease goes, the delivery is filed, and a
        // retry gives the domain its timer (after the script: see "The
        // domain sets" in the module doc).
        let next = completion.as_ref().and_then(|c| c.next_attempt_ms);
        let mut forget = Vec::new();
        if gone || completion.as_ref().is_some_and(Completion::message_done) {
            forget.push(INDEX_KEY.to_string());
        }
        if let Some(done) = completion.as_ref().filter(|c| c.message_done()) {
            forget.push(sender_messages_key(&done.record.envelope.sender_key()));
        }
        let domain_step = if self.conn.is_cluster() {
            let filing = DomainFiling {
                id: id.clone(),
                domain: domain.to_string(),
                holder: holder.clone(),
                next,
                forget,
            };
            self.filings
                .send("complete: domain", filing, |filings| async move {
                    self.file_together(filings).await
                })
                .await
        } else {
            let forget: Vec<&str> = forget.iter().map(String::as_str).collect();
            let step = vec![self.file_and_forget_cmd(id, domain, &holder, next, &forget)];
            let timer = next.map(|n| (domain.to_string(), n));
            let after = Self::mark_cmds(&[], timer.as_slice());
            self.ordered("complete: domain", vec![step, after])
                .await
                .and_then(|replies| {
                    let first = replies
                        .into_iter()
                        .next()
                        .and_then(|r| r.into_iter().next());
                    parse_filed(first.unwrap_or(Value::Nil))
                })
        };
        if let (Some(kept), Some(report)) = (kept, report) {
            self.queue_kept(report, vec![kept]).await;
        }
        self.held().remove(&key);
        let (filed, empty) = match domain_step {
            Ok(filed) => filed,
            Err(error) => {
                let Some(completion) = completion else {
                    return Err(error);
                };
                // The outcome is durable: answered as recorded, so that it
                // is logged now; the retry of this attempt (once the lease
                // runs out) finds the delivery finished, logs nothing and
                // files it, which repairs the domain.
                tracing::warn!(message_id = %id, %domain, %error,
                    "the outcome is recorded, the domain is left for the lease to run out");
                return Ok(Some(completion));
            }
        };
        self.after_filing(id, domain, filed, empty).await;
        Ok(completion)
    }

    /// What follows the filing of a completed delivery: a word when the
    /// lease was another node's, and a domain left without work leaves
    /// the active set.
    async fn after_filing(&self, id: &MessageId, domain: &str, filed: bool, empty: bool) {
        if !filed {
            tracing::warn!(message_id = %id, %domain,
                "the lease of this delivery was lost to another holder; its outcome is recorded, the lease is left to its holder");
        }
        if empty {
            if let Err(error) = self.drop_if_empty(vec![domain.to_string()]).await {
                tracing::warn!(%domain, %error, "cannot drop a domain without work from the active set");
            }
        }
    }

    /// One batch of [`Schedule::send_pending_reports`]: how many entries
    /// it took, and how many messages' reports it queued.
    async fn pending_batch(&self, reporter: &ReportHook) -> Result<(usize, usize), SpoolError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(self.report_grace.as_millis() as u64);
        let mut take = evalsha(&self.scripts.pending_reports, &[PENDING_REPORTS_KEY]);
        take.arg(cutoff).arg(now).arg(PENDING_BATCH);
        let mut pipe = redis::pipe();
        pipe.add_command(take);
        let reply = self.run("pending reports", &pipe).await?;
        let entries: Vec<String> = parse(
            "pending reports",
            reply.into_iter().next().unwrap_or(Value::Nil),
        )?;
        if entries.is_empty() {
            return Ok((0, 0));
        }
        let taken = entries.len();
        let result = self.queue_pending(entries.clone(), reporter).await;
        if result.is_err() {
            // Taken entries wait a grace before another pass takes them;
            // a pass that failed puts them back for the next one instead,
            // so that a run of faults delays a report by passes, not by
            // graces.
            let mut put_back = redis::cmd("ZADD");
            put_back.arg(PENDING_REPORTS_KEY).arg("XX");
            for entry in &entries {
                put_back.arg(cutoff).arg(entry);
            }
            let mut pipe = redis::pipe();
            pipe.add_command(put_back).ignore();
            if let Err(error) = self.run("pending reports: put back", &pipe).await {
                tracing::debug!(%error, "pending reports wait for their grace");
            }
        }
        result.map(|queued| (taken, queued))
    }

    /// Reads the kept reports of `entries` (taken by a pass) and queues
    /// them; entries whose reports are gone are dropped.
    async fn queue_pending(
        &self,
        entries: Vec<String>,
        reporter: &ReportHook,
    ) -> Result<usize, SpoolError> {
        let keys: Vec<Option<String>> = entries
            .iter()
            .map(|e| KeptReports::parse_entry(e).map(|(m, first)| report_key(&m, &first)))
            .collect();
        let mut pipe = redis::pipe();
        for key in keys.iter().flatten() {
            pipe.cmd("GET").arg(key);
        }
        let mut values = self.run("pending reports: read", &pipe).await?.into_iter();
        let (mut found, mut dropped) = (Vec::new(), Vec::new());
        for (entry, key) in entries.into_iter().zip(keys) {
            let bytes: Option<Vec<u8>> = match key {
                Some(_) => parse("GET reports", values.next().unwrap_or(Value::Nil))?,
                None => None,
            };
            match bytes.map(|b| KeptReports::decode(&entry, &b)) {
                Some(Ok(kept)) => found.push(kept),
                // Taken again after a grace; an operator can read it.
                Some(Err(error)) => {
                    tracing::error!(%entry, %error, "cannot read delivery reports kept with a record")
                }
                // Its record was never written, or the reports were queued.
                None => dropped.push(entry),
            }
        }
        if !dropped.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM")
                .arg(PENDING_REPORTS_KEY)
                .arg(dropped)
                .ignore();
            self.run("pending reports: drop", &pipe).await?;
        }
        let messages = found.len();
        let queued = self.queue_kept(reporter, found).await;
        if queued > 0 {
            tracing::info!(
                messages = queued,
                "queued delivery reports kept with their records"
            );
        }
        if queued < messages {
            return Err(SpoolError::Unavailable(format!(
                "{} of {messages} messages' pending reports could not be queued",
                messages - queued
            )));
        }
        Ok(queued)
    }

    /// The oldest index entries received by `cutoff` whose records can be
    /// read, at most [`EXPIRY_BATCH`] of them, with their records. Entries
    /// whose record is gone are deleted once older than the grace
    /// ([`spool_redis::dangling`]) and the sweep reads on past them (at
    /// most [`EXPIRY_SCAN`] entries), so that orphans never hide expired
    /// mail; an unreadable record is set aside.
    async fn expiry_candidates(
        &self,
        cutoff: u64,
    ) -> Result<Vec<(MessageId, MessageRecord)>, SpoolError> {
        let mut found = Vec::new();
        let (mut offset, mut scanned) = (0usize, 0usize);
        while found.len() < EXPIRY_BATCH && scanned < EXPIRY_SCAN {
            let orphan_cutoff = spool_redis::dangling_cutoff(self.timeout);
            let mut pipe = redis::pipe();
            pipe.cmd("ZRANGEBYSCORE")
                .arg(INDEX_KEY)
                .arg("-inf")
                .arg(cutoff)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(offset)
                .arg(EXPIRY_BATCH);
            let reply = self.run("expire: index", &pipe).await?;
            let entries: Vec<(String, f64)> =
                parse("expire", reply.into_iter().next().unwrap_or(Value::Nil))?;
            let page = entries.len();
            let entries: Vec<ListCursor> = entries
                .into_iter()
                .map(|(id, at)| ListCursor {
                    received_ms: at as u64,
                    id: MessageId(id),
                })
                .collect();
            scanned += page;
            let ids: Vec<MessageId> = entries.iter().map(|e| e.id.clone()).collect();
            let mut missing = Vec::new();
            let mut removed = 0;
            for (entry, bytes) in entries.iter().zip(self.fetch(&ids).await?) {
                let Some(bytes) = bytes else {
                    missing.push(entry);
                    continue;
                };
                match self.decode_or_quarantine(&entry.id, &bytes).await? {
                    Some(record) if found.len() < EXPIRY_BATCH => {
                        found.push((entry.id.clone(), record))
                    }
                    Some(_) => {}
                    None => removed += 1,
                }
            }
            let orphans = spool_redis::dangling(orphan_cutoff, missing.into_iter());
            if !orphans.is_empty() {
                let mut pipe = redis::pipe();
                pipe.cmd("ZREM")
                    .arg(INDEX_KEY)
                    .arg(orphans.iter().map(MessageId::as_str).collect::<Vec<_>>())
                    .ignore();
                self.run("expire: orphaned index entries", &pipe).await?;
                tracing::info!(
                    entries = orphans.len(),
                    "deleted index entries of messages that are gone"
                );
                removed += orphans.len();
            }
            if page < EXPIRY_BATCH {
                break;
            }
            offset += page - removed;
        }
        Ok(found)
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
        let mut by_domain: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, record) in self.expiry_candidates(cutoff).await? {
            for delivery in record.deliveries {
                by_domain
                    .entry(delivery.domain)
                    .or_default()
                    .push(id.as_str().to_string());
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
                &[&k.ready, &k.deferred, &k.leases, &k.holders, &k.messages],
            );
            cmd.arg(holder)
                .arg(self.expiry_claim.as_millis() as u64)
                .arg(ids);
            pipe.add_command(cmd);
        }
        let mut claimed: BTreeMap<MessageId, Vec<String>> = BTreeMap::new();
        let mut timers = Vec::new();
        for (domain, value) in by_domain
            .keys()
            .zip(self.run("expire: claim", &pipe).await?)
        {
            let (expiry, ids): (u64, Vec<String>) = parse("expire: claim", value)?;
            if !ids.is_empty() {
                // A sweep that dies leaves its claims to the reclaim.
                timers.push((domain.clone(), expiry));
            }
            for id in ids {
                claimed
                    .entry(MessageId(id))
                    .or_default()
                    .push(domain.clone());
            }
        }
        if claimed.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for cmd in Self::mark_cmds(&[], &timers) {
            pipe.add_command(cmd).ignore();
        }
        self.run("expire: timers", &pipe).await?;

        // Per message, the claimed deliveries fail together in one record
        // write, with the reports they call for; a record another domain's
        // completion changed meanwhile is read again and the expiry applied
        // on top (its reports built again: none was queued).
        let mut pending: Vec<(MessageId, Option<Vec<u8>>)> =
            claimed.keys().map(|id| (id.clone(), None)).collect();
        let mut expired: BTreeMap<MessageId, Vec<Completion>> = BTreeMap::new();
        let mut kept: Vec<KeptReports> = Vec::new();
        let mut unwritten = Vec::new();
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
                let Some(record) = self.decode_or_quarantine(&id, &bytes).await? else {
                    continue; // set aside: its claims are dropped below
                };
                let mut current = Arc::new(record);
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
                let left = held_until.saturating_duration_since(Instant::now());
                if left < self.expiry_claim / 2 {
                    // Too close to the end of the claims to be sure of
                    // them when the record is written: the next sweep.
                    put_back.push(id);
                    continue;
                }
                let mut reports = None;
                if let Some(report) = report {
                    let events = report.record_events(&completions);
                    if let Err(error) = self.while_renewing(&claimed, &mut held_until, events).await
                    {
                        tracing::warn!(message_id = %id, %error,
                            "cannot record the webhook events of an expired message; it stays for the next sweep");
                        put_back.push(id);
                        continue;
                    }
                    if completions.iter().any(|c| report.needs(c)) {
                        let built = report.build(&completions);
                        match self.while_renewing(&claimed, &mut held_until, built).await {
                            Ok(built) => reports = KeptReports::new(&id, built),
                            Err(error) => {
                                tracing::warn!(message_id = %id, %error,
                                    "cannot build the report of an expired message; it stays for the next sweep");
                                put_back.push(id);
                                continue;
                            }
                        }
                    }
                }
                planned.push((id, bytes, completions, reports));
            }
            if planned.is_empty() {
                break;
            }
            let pending_entries = Self::pending_cmd(
                planned
                    .iter()
                    .filter_map(|p| p.3.as_ref())
                    .map(|k| k.entry.as_str()),
            );
            let writes = planned
                .iter()
                .map(|(id, bytes, completions, reports)| {
                    let last = completions.last().expect("not empty");
                    let new = (!last.message_done()).then(|| envelope::encode(&*last.record));
                    self.write_record_cmd(id, bytes, new.as_deref(), reports.as_ref())
                })
                .collect();
            let replies = self
                .ordered("expire: records", vec![pending_entries, writes])
                .await?;
            let writes = replies.into_iter().last().unwrap_or_default();
            for ((id, _, completions, reports), write) in planned.into_iter().zip(writes) {
                match Self::parse_record_write(write)? {
                    RecordWrite::Written => {
                        expired.insert(id, completions);
                        kept.extend(reports);
                    }
                    RecordWrite::Gone => unwritten.extend(reports.map(|r| r.entry)),
                    RecordWrite::Changed(current) => {
                        unwritten.extend(reports.map(|r| r.entry));
                        pending.push((id, Some(current)));
                    }
                }
            }
        }
        self.forget_unwritten(unwritten).await;
        if let Some(report) = report {
            self.queue_kept(report, kept).await;
        }
        // Still racing: given back, like those whose report failed to build.
        put_back.extend(pending.into_iter().map(|(id, _)| id));

        // The claims go: expired deliveries are dropped, the rest are due
        // again (the next sweep or an attempt fails them).
        let mut step = Vec::new();
        let mut filed_in = Vec::new();
        let mut ready = Vec::new();
        for (id, domains) in &claimed {
            for domain in domains {
                if put_back.contains(id) {
                    let k = domain_keys(domain);
                    let mut cmd =
                        evalsha(&self.scripts.release, &[&k.ready, &k.leases, &k.holders]);
                    cmd.arg(id.as_str()).arg(holder);
                    self.news_args(&mut cmd, domain);
                    step.push(cmd);
                    filed_in.push(None);
                    ready.push(domain.clone());
                } else {
                    step.push(self.file_cmd(id, domain, holder, None));
                    filed_in.push(Some(domain.clone()));
                }
            }
            if let Some(done) = expired
                .get(id)
                .and_then(|c| c.last())
                .filter(|c| c.message_done())
            {
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(INDEX_KEY).arg(id.as_str());
                step.push(zrem);
                filed_in.push(None);
                step.push(sender_zrem(&done.record));
                filed_in.push(None);
            }
        }
        let ready = dedup(ready);
        let replies = self
            .ordered("expire: domains", vec![step, Self::mark_cmds(&ready, &[])])
            .await?;
        let mut emptied = Vec::new();
        for (domain, reply) in filed_in.into_iter().zip(replies.into_iter().flatten()) {
            if let Some(domain) = domain {
                if parse_filed(reply)?.1 {
                    emptied.push(domain);
                }
            }
        }
        if let Err(error) = self.drop_if_empty(dedup(emptied)).await {
            tracing::warn!(%error, "cannot drop domains without work from the active set");
        }
        Ok(expired.into_values().flatten().collect())
    }
}

#[async_trait]
impl Schedule for RedisSchedule {
    fn ready_news(&self) -> Option<tokio::sync::mpsc::Receiver<ReadyNews>> {
        let n = self.news.as_ref()?;
        let client = n.client.clone()?;
        Some(news::listen(
            client,
            n.channel.clone(),
            n.origin.clone(),
            self.timeout,
        ))
    }

    async fn insert(
        &self,
        records: Vec<MessageRecord>,
        now_ms: u64,
    ) -> Result<Vec<String>, SpoolError> {
        let Some(mut plan) = self.insert_plan(records.iter(), now_ms, Fresh::MaybeQueued) else {
            return Ok(Vec::new());
        };
        let replies = self
            .ordered("insert", std::mem::take(&mut plan.steps))
            .await?;
        let replies = replies.into_iter().nth(1).unwrap_or_default();
        self.inserted(plan, replies).await
    }

    fn redis(&self) -> Option<&RedisSchedule> {
        Some(self)
    }

    /// Looks only at the domains whose timer is due (see "The domain
    /// sets" in the module doc).
    async fn promote(&self, now_ms: u64) -> Result<Vec<String>, SpoolError> {
        let looked = self
            .service_due("promote", now_ms, |domain| {
                let k = domain_keys(domain);
                let mut cmd = evalsha(
                    &self.scripts.promote,
                    &[&k.deferred, &k.ready, &k.suspended, &k.leases],
                );
                cmd.arg(now_ms).arg(DUE_PER_DOMAIN);
                self.news_args(&mut cmd, domain);
                cmd
            })
            .await?;
        Ok(looked
            .into_iter()
            .filter(|(_, reply)| reply.first() > Some(&0) && reply.get(1) == Some(&0))
            .map(|(domain, _)| domain)
            .collect())
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
        // The lease's timer: on one server the script sets it with the
        // leases; on a Cluster, where it is another slot, before (for a
        // node that dies after the take) and after the script (see "The
        // domain sets" in the module doc).
        let one_server = !self.conn.is_cluster();
        if !one_server {
            pipe.cmd("ZADD")
                .arg(TIMERS_KEY)
                .arg("LT")
                .arg(now_ms().saturating_add(lease.as_millis() as u64))
                .arg(domain)
                .ignore();
        }
        let mut keys = vec![&*k.ready, &k.leases, &k.holders, &k.suspended];
        if one_server {
            keys.push(TIMERS_KEY);
        }
        let mut cmd = evalsha(&self.scripts.take, &keys);
        cmd.arg(max).arg(holder).arg(lease.as_millis() as u64);
        if one_server {
            cmd.arg(domain);
        }
        pipe.add_command(cmd);
        let mut reply = self.run("take", &pipe).await?;
        let reply: Vec<Value> = parse("take", reply.pop().unwrap_or(Value::Nil))?;
        let mut reply = reply.into_iter();
        let (Some(expiry), Some(ids)) = (reply.next(), reply.next()) else {
            return Ok(Vec::new()); // suspended
        };
        let expiry: u64 = parse("take", expiry)?;
        let ids: Vec<String> = parse("take", ids)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<MessageId> = ids.into_iter().map(MessageId).collect();
        // The records, all in one round trip with the timer.
        let mut pipe = redis::pipe();
        self.read_records(&mut pipe, &ids);
        if !one_server {
            pipe.cmd("ZADD")
                .arg(TIMERS_KEY)
                .arg("LT")
                .arg(expiry)
                .arg(domain)
                .ignore();
        }
        let records = self.records_read(self.run("take: records", &pipe).await?)?;
        let mut jobs = Vec::with_capacity(ids.len());
        let mut stale = Vec::new();
        for (id, bytes) in ids.into_iter().zip(records) {
            let found = match &bytes {
                Some(bytes) => self
                    .decode_or_quarantine(&id, bytes)
                    .await?
                    .and_then(|record| {
                        let index = record.deliveries.iter().position(|d| d.domain == domain)?;
                        Some((record, index))
                    }),
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
                // Finished or expired meanwhile (see the module doc), or
                // set aside as unreadable: the id was left behind in the
                // domain's keys.
                _ => stale.push(id),
            }
        }
        if !stale.is_empty() {
            let mut pipe = redis::pipe();
            for id in &stale {
                pipe.add_command(self.file_cmd(id, domain, holder, None));
            }
            let replies = self.run("take: drop finished", &pipe).await?;
            let mut empty = false;
            for reply in replies {
                empty |= parse_filed(reply)?.1;
            }
            if empty {
                if let Err(error) = self.drop_if_empty(vec![domain.to_string()]).await {
                    tracing::warn!(%domain, %error, "cannot drop a domain without work from the active set");
                }
            }
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
        self.news_args(&mut cmd, domain);
        let ready = [domain.to_string()];
        self.ordered("release", vec![vec![cmd], Self::mark_cmds(&ready, &[])])
            .await?;
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
        // The attempt is over, maybe delivered: its outcome is tried again
        // for a while, the lease still held here (and renewed), so that a
        // Redis restart or a cut link does not make it an orphan that is
        // delivered again.
        let deadline = Instant::now() + COMPLETE_PATIENCE;
        let mut wait = COMPLETE_RETRY;
        loop {
            let result = self
                .complete_with(id, domain, outcome, now_ms, policy, jitter, report)
                .await;
            match &result {
                Err(SpoolError::Unavailable(error)) if Instant::now() + wait < deadline => {
                    tracing::warn!(message_id = %id, %domain, %error,
                        "the delivery outcome is not recorded yet; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(COMPLETE_RETRY_MAX);
                }
                Err(_) => {
                    // No longer running here: the lease lapses (or is put
                    // back as an orphan) and the delivery is attempted again.
                    self.held().remove(&(id.clone(), domain.to_string()));
                    return result;
                }
                Ok(_) => return result,
            }
        }
    }

    async fn expire(
        &self,
        now_ms: u64,
        policy: &RetryPolicy,
        report: Option<&ReportHook>,
    ) -> Result<Vec<Completion>, SpoolError> {
        self.expire_with(now_ms, policy, report).await
    }

    async fn send_pending_reports(&self, reporter: &ReportHook) -> Result<usize, SpoolError> {
        // A backlog (entries left by faults) drains by several batches a
        // pass, so that a report behind it waits passes, not minutes.
        let mut queued = 0;
        for _ in 0..PENDING_BATCHES {
            let (taken, sent) = self.pending_batch(reporter).await?;
            queued += sent;
            if taken < PENDING_BATCH {
                break;
            }
        }
        Ok(queued)
    }

    /// Renews in the domains where this instance holds leases, and looks
    /// for orphaned leases of `holder` there and in the next
    /// `ORPHAN_SCAN` active domains (`SSCAN`: the whole set over
    /// successive calls), so that a renewal costs the same however many
    /// domains hold work.
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
        let cursor = *self.orphan_cursor.lock().unwrap_or_else(|e| e.into_inner());
        let mut pipe = redis::pipe();
        pipe.cmd("SSCAN")
            .arg(ACTIVE_KEY)
            .arg(cursor)
            .arg("COUNT")
            .arg(ORPHAN_SCAN);
        let reply = self.run("renew leases: active domains", &pipe).await?;
        let (next, scanned): (u64, Vec<String>) =
            parse("SSCAN", reply.into_iter().next().unwrap_or(Value::Nil))?;
        *self.orphan_cursor.lock().unwrap_or_else(|e| e.into_inner()) = next;
        for domain in scanned {
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
        let mut ready = Vec::new();
        for (domain, value) in by_domain.keys().zip(reply) {
            let counts: Vec<i64> = parse("renew leases", value)?;
            renewed += counts.first().copied().unwrap_or(0) as usize;
            let orphans = counts.get(1).copied().unwrap_or(0);
            if orphans > 0 {
                tracing::info!(%domain, deliveries = orphans,
                    "put back deliveries leased to this node but not running here");
                ready.push(domain.clone());
            }
        }
        if !ready.is_empty() {
            let mut pipe = redis::pipe();
            for cmd in Self::mark_cmds(&ready, &[]) {
                pipe.add_command(cmd).ignore();
            }
            self.run("renew leases: ready domains", &pipe).await?;
        }
        Ok(renewed)
    }

    /// The next page of the ready set (all of it when it holds up to
    /// about [`READY_LOOK`] domains) without the suspended domains, each
    /// checked for ready work; a domain listed without any is dropped from
    /// the set, then looked at again (see "The domain sets" in the module
    /// doc).
    async fn ready_domains(&self) -> Result<Vec<String>, SpoolError> {
        let mut cursor = *self.ready_cursor.lock().unwrap_or_else(|e| e.into_inner());
        let sscan = |cursor: u64| {
            let mut cmd = redis::cmd("SSCAN");
            cmd.arg(READY_KEY).arg(cursor).arg("COUNT").arg(READY_PAGE);
            cmd
        };
        // The suspended domains with the first page, in one round trip.
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(SUSPENDED_KEY);
        pipe.add_command(sscan(cursor));
        let mut reply = self.run("ready domains", &pipe).await?.into_iter();
        let suspended: Vec<String> = parse("SMEMBERS", reply.next().unwrap_or(Value::Nil))?;
        let mut page = reply.next().unwrap_or(Value::Nil);
        let mut listed = BTreeSet::new();
        loop {
            let (next, domains): (u64, Vec<String>) = parse("SSCAN", page)?;
            listed.extend(domains);
            cursor = next;
            if cursor == 0 || listed.len() >= READY_LOOK {
                break;
            }
            let mut pipe = redis::pipe();
            pipe.add_command(sscan(cursor));
            page = self
                .run("ready domains", &pipe)
                .await?
                .into_iter()
                .next()
                .unwrap_or(Value::Nil);
        }
        *self.ready_cursor.lock().unwrap_or_else(|e| e.into_inner()) = cursor;
        let mut listed: Vec<String> = listed.into_iter().collect();
        listed.retain(|d| !suspended.contains(d));
        let (mut ready, idle) = self.split_by_ready(listed).await?;
        if !idle.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("SREM").arg(READY_KEY).arg(&idle).ignore();
            self.run("ready domains: drop", &pipe).await?;
            let (busy, _) = self.split_by_ready(idle).await?;
            if !busy.is_empty() {
                let mut pipe = redis::pipe();
                for cmd in Self::mark_cmds(&busy, &[]) {
                    pipe.add_command(cmd).ignore();
                }
                self.run("ready domains: keep", &pipe).await?;
                ready.extend(busy);
                ready.sort();
            }
        }
        Ok(ready)
    }

    async fn has_ready(&self, domain: &str) -> Result<bool, SpoolError> {
        let k = domain_keys(domain);
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(&k.suspended);
        pipe.cmd("ZCARD").arg(&k.ready);
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
        // Listed whether or not it has ready work: `ready_domains` drops
        // it again if not.
        pipe.cmd("SADD").arg(READY_KEY).arg(domain).ignore();
        pipe.cmd("ZCARD").arg(&k.ready);
        let reply = self.run("resume", &pipe).await?;
        let len: i64 = parse("resume", reply.into_iter().next().unwrap_or(Value::Nil))?;
        Ok(len > 0)
    }

    async fn counts(&self) -> Result<SchedulerCounts, SpoolError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(ACTIVE_KEY);
        pipe.cmd("ZCARD").arg(INDEX_KEY);
        pipe.cmd("SMEMBERS").arg(SUSPENDED_KEY);
        pipe.cmd("ZCARD").arg(PENDING_REPORTS_KEY);
        let reply = self.run("counts", &pipe).await?;
        let mut reply = reply.into_iter();
        let mut domains: Vec<String> = parse("counts", reply.next().unwrap_or(Value::Nil))?;
        domains.sort();
        let messages: i64 = parse("counts", reply.next().unwrap_or(Value::Nil))?;
        let suspended: Vec<String> = parse("counts", reply.next().unwrap_or(Value::Nil))?;
        let pending: i64 = parse("counts", reply.next().unwrap_or(Value::Nil))?;
        let mut counts = SchedulerCounts {
            messages: messages as usize,
            suspended: suspended.into_iter().collect(),
            pending_reports: pending as usize,
            ..SchedulerCounts::default()
        };
        if domains.is_empty() {
            counts.in_flight_by_holder = Some(BTreeMap::new());
            return Ok(counts);
        }
        let mut pipe = redis::pipe();
        for domain in &domains {
            let k = domain_keys(domain);
            pipe.cmd("ZCARD").arg(&k.ready);
            pipe.cmd("ZCARD").arg(&k.deferred);
            pipe.cmd("ZCARD").arg(&k.leases);
            // The oldest message listed for the domain: ids start with
            // the receive time.
            pipe.cmd("ZRANGE").arg(&k.messages).arg(0).arg(0);
            // Who holds its leases: as many as are in flight, a few.
            pipe.cmd("HVALS").arg(&k.holders);
        }
        let values = self.run("counts", &pipe).await?;
        let mut by_domain = BTreeMap::new();
        let mut by_holder = BTreeMap::new();
        for (domain, n) in domains.into_iter().zip(values.chunks(5)) {
            let count = |i: usize| parse::<i64>("counts", n[i].clone()).map(|v| v as usize);
            let (ready, deferred, leased) = (count(0)?, count(1)?, count(2)?);
            counts.ready += ready;
            counts.deferred += deferred;
            counts.in_flight += leased;
            for holder in parse::<Vec<String>>("counts", n[4].clone())? {
                *by_holder.entry(holder).or_insert(0) += 1;
            }
            if ready + deferred + leased > 0 {
                let oldest: Vec<String> = parse("counts", n[3].clone())?;
                if let Some(ms) = oldest
                    .first()
                    .and_then(|id| MessageId(id.clone()).received_ms())
                {
                    counts.oldest_by_domain.insert(domain.clone(), ms);
                }
                by_domain.insert(domain, ready + deferred + leased);
            }
        }
        counts.deliveries_by_domain = by_domain;
        counts.in_flight_by_holder = Some(by_holder);
        Ok(counts)
    }

    /// Claims the message in each of its domains (the expiry's claim
    /// script: wherever it waits, unless leased) under `holder`'s lease,
    /// held here like a take so that `complete` files it and the lease is
    /// renewed meanwhile; a node that dies leaves it to the reclaim.
    async fn take_message(
        &self,
        id: &MessageId,
        only: Option<&str>,
        holder: &str,
        lease: Duration,
    ) -> Result<Option<TakenMessage>, SpoolError> {
        let Some(bytes) = self.fetch(std::slice::from_ref(id)).await?.pop().flatten() else {
            return Ok(None);
        };
        let Some(record) = self.decode_or_quarantine(id, &bytes).await? else {
            return Ok(None);
        };
        let domains: Vec<String> = record
            .deliveries
            .iter()
            .map(|d| d.domain.clone())
            .filter(|domain| only.is_none_or(|only| only == domain))
            .collect();
        let mut pipe = redis::pipe();
        // The leases' timers first, for a node that dies after the claim.
        let until = now_ms().saturating_add(lease.as_millis() as u64);
        let timers: Vec<(String, u64)> = domains.iter().map(|d| (d.clone(), until)).collect();
        for cmd in Self::mark_cmds(&[], &timers) {
            pipe.add_command(cmd).ignore();
        }
        for domain in &domains {
            let k = domain_keys(domain);
            let mut cmd = evalsha(
                &self.scripts.claim,
                &[&k.ready, &k.deferred, &k.leases, &k.holders, &k.messages],
            );
            cmd.arg(holder)
                .arg(lease.as_millis() as u64)
                .arg(id.as_str());
            pipe.add_command(cmd);
        }
        let replies = self.run("take message", &pipe).await?;
        let mut taken = TakenMessage {
            record: Arc::new(record),
            domains: Vec::new(),
            in_flight: 0,
        };
        for (domain, value) in domains.into_iter().zip(replies) {
            let (_, ids): (u64, Vec<String>) = parse("take message", value)?;
            if ids.is_empty() {
                taken.in_flight += 1;
                continue;
            }
            self.held().insert(
                (id.clone(), domain.clone()),
                Held {
                    holder: holder.to_string(),
                    record: bytes.clone(),
                },
            );
            taken.domains.push(domain);
        }
        Ok(Some(taken))
    }

    /// Lowers the message's entries in its domains' deferred sets to now
    /// (`ZADD XX LT`: an entry in flight or ready is not touched) and the
    /// domains' timers with them, so the next promote moves them.
    async fn retry(&self, id: &MessageId, now_ms: u64) -> Result<Option<usize>, SpoolError> {
        let Some(record) = self
            .records(std::slice::from_ref(id))
            .await?
            .pop()
            .flatten()
        else {
            return Ok(None);
        };
        let domains: BTreeSet<&str> = record
            .deliveries
            .iter()
            .map(|d| d.domain.as_str())
            .collect();
        if domains.is_empty() {
            return Ok(Some(0));
        }
        let mut pipe = redis::pipe();
        for domain in &domains {
            pipe.cmd("ZADD")
                .arg(domain_keys(domain).deferred)
                .arg("XX")
                .arg("LT")
                .arg("CH")
                .arg(now_ms)
                .arg(id.as_str());
        }
        let timers: Vec<(String, u64)> = domains.iter().map(|d| (d.to_string(), now_ms)).collect();
        for cmd in Self::mark_cmds(&[], &timers) {
            pipe.add_command(cmd).ignore();
        }
        let changed = self.run("retry", &pipe).await?;
        let mut made_due = 0;
        for value in changed {
            let n: i64 = parse("retry", value)?;
            made_due += n as usize;
        }
        Ok(Some(made_due))
    }

    /// As `retry`, for a page of one domain: one `ZADD XX LT CH` of every
    /// id, and the domain's timer.
    async fn retry_in(
        &self,
        domain: &str,
        ids: &[MessageId],
        now_ms: u64,
    ) -> Result<usize, SpoolError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(domain_keys(domain).deferred)
            .arg("XX")
            .arg("LT")
            .arg("CH");
        for id in ids {
            zadd.arg(now_ms).arg(id.as_str());
        }
        let mut pipe = redis::pipe();
        pipe.add_command(zadd);
        for cmd in Self::mark_cmds(&[], &[(domain.to_string(), now_ms)]) {
            pipe.add_command(cmd).ignore();
        }
        let changed = self.run("retry a domain", &pipe).await?;
        let made_due: i64 = parse(
            "retry a domain",
            changed.into_iter().next().unwrap_or(Value::Nil),
        )?;
        Ok(made_due as usize)
    }

    async fn suspended(&self) -> Result<BTreeSet<String>, SpoolError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SMEMBERS").arg(SUSPENDED_KEY);
        let reply = self.run("suspended", &pipe).await?;
        let domains: Vec<String> =
            parse("suspended", reply.into_iter().next().unwrap_or(Value::Nil))?;
        Ok(domains.into_iter().collect())
    }

    async fn domain_messages(
        &self,
        domain: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError> {
        self.lex_page(
            "domain messages",
            &domain_keys(domain).messages,
            after,
            limit,
        )
        .await
    }

    /// The ids of the sender's sorted set after `after`; those whose
    /// record is gone (done, or deleted some way that left the entry) are
    /// dropped from it on the way, but still returned, so that the page's
    /// last id stays the cursor.
    async fn sender_messages(
        &self,
        sender: &str,
        after: Option<&MessageId>,
        limit: usize,
    ) -> Result<Vec<MessageId>, SpoolError> {
        let key = sender_messages_key(sender);
        let ids = self.lex_page("sender messages", &key, after, limit).await?;
        let gone: Vec<&str> = ids
            .iter()
            .zip(self.fetch(&ids).await?)
            .filter(|(_, record)| record.is_none())
            .map(|(id, _)| id.as_str())
            .collect();
        if !gone.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(&key).arg(&gone).ignore();
            self.run("sender messages: gone", &pipe).await?;
        }
        Ok(ids)
    }

    async fn records(
        &self,
        ids: &[MessageId],
    ) -> Result<Vec<Option<Arc<MessageRecord>>>, SpoolError> {
        let fetched = self.fetch(ids).await?;
        let mut records = Vec::with_capacity(ids.len());
        for (id, bytes) in ids.iter().zip(fetched) {
            records.push(match bytes {
                Some(bytes) => self.decode_or_quarantine(id, &bytes).await?.map(Arc::new),
                None => None,
            });
        }
        Ok(records)
    }

    async fn reclaim_holders(&self, holders: &[String]) -> Result<usize, SpoolError> {
        if holders.is_empty() {
            return Ok(0);
        }
        // Rare (a node died): every domain with work is looked at.
        let what = "reclaimed the deliveries of dead nodes";
        let domains = self.active().await?;
        let replies = self
            .per_domain(what, &domains, |domain| {
                let k = domain_keys(domain);
                let mut cmd = evalsha(
                    &self.scripts.reclaim_holders,
                    &[&k.ready, &k.leases, &k.holders],
                );
                cmd.arg(holders);
                cmd
            })
            .await?;
        let mut total = 0;
        let mut ready = Vec::new();
        for (domain, reply) in domains.iter().zip(replies) {
            let n: i64 = parse(what, reply)?;
            if n > 0 {
                tracing::info!(%domain, deliveries = n, holders = %holders.join(","), "{what}");
                ready.push(domain.clone());
            }
            total += n as usize;
        }
        if !ready.is_empty() {
            let mut pipe = redis::pipe();
            for cmd in Self::mark_cmds(&ready, &[]) {
                pipe.add_command(cmd).ignore();
            }
            self.run(what, &pipe).await?;
        }
        Ok(total)
    }

    /// Looks only at the domains whose timer is due by this node's clock
    /// (see "The domain sets" in the module doc); the leases themselves
    /// are judged by the Redis clock.
    async fn reclaim_expired_leases(&self) -> Result<usize, SpoolError> {
        let what = "reclaimed deliveries whose lease ran out";
        let looked = self
            .service_due(what, now_ms(), |domain| {
                let k = domain_keys(domain);
                let mut cmd = evalsha(
                    &self.scripts.reclaim,
                    &[&k.ready, &k.leases, &k.holders, &k.deferred],
                );
                cmd.arg(DUE_PER_DOMAIN);
                self.news_args(&mut cmd, domain);
                cmd
            })
            .await?;
        let mut total = 0;
        for (domain, reply) in looked {
            let n = reply.first().copied().unwrap_or(0);
            if n > 0 {
                tracing::info!(%domain, deliveries = n, "{what}");
            }
            total += n.max(0) as usize;
        }
        Ok(total)
    }
}

impl RedisSchedule {
    /// Splits `domains` into those with ready work and those without
    /// (one round trip).
    async fn split_by_ready(
        &self,
        domains: Vec<String>,
    ) -> Result<(Vec<String>, Vec<String>), SpoolError> {
        if domains.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let mut pipe = redis::pipe();
        for domain in &domains {
            pipe.cmd("ZCARD").arg(domain_keys(domain).ready);
        }
        let lengths = self.run("ready domains", &pipe).await?;
        let (mut ready, mut idle) = (Vec::new(), Vec::new());
        for (domain, len) in domains.into_iter().zip(lengths) {
            if parse::<i64>("ZCARD", len)? > 0 {
                ready.push(domain);
            } else {
                idle.push(domain);
            }
        }
        Ok((ready, idle))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::delivery::RcptResult;
    use crate::schedule::suite::{self, complete, outcome, policy, Fixture, Recorder};
    use crate::spool::suite::{id, message};
    use crate::spool::Spool;
    use smarthost_testkit::redis::RedisServer;

    /// What an empty shared schedule counts: nothing, and no holder.
    fn empty_counts() -> SchedulerCounts {
        SchedulerCounts {
            in_flight_by_holder: Some(BTreeMap::new()),
            ..SchedulerCounts::default()
        }
    }

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
        node_at(&server.url()).await
    }

    async fn node_at(url: &str) -> (Arc<RedisSpool>, Arc<RedisSchedule>) {
        let spool = Arc::new(RedisSpool::open(url).await.expect("open"));
        let schedule = Arc::new(RedisSchedule::new(&spool).await.expect("schedule"));
        (spool, schedule)
    }

    /// Stores `batch` and schedules it at `now`, a thousand at a time.
    async fn store_and_insert(
        spool: &RedisSpool,
        schedule: &RedisSchedule,
        batch: &[NewMessage],
        now: u64,
    ) {
        for chunk in batch.chunks(1000) {
            let records = chunk.iter().map(|m| m.record.clone()).collect();
            spool.store(chunk.to_vec()).await.unwrap();
            schedule.insert(records, now).await.unwrap();
        }
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
            let mut recorder = Recorder::new(reports.clone());
            recorder.slow = slow;
            recorder.hook()
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

    /// Redis dies while a sweep reports: whatever was reported is failed
    /// in its record (never a report for a delivery that stays queued and
    /// may still be delivered), and after the restart every delivery is
    /// reported exactly once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_dying_during_an_expiry_sweep_never_reports_a_live_delivery() {
        use std::sync::Mutex;

        let server = Arc::new(Mutex::new(RedisServer::start()));
        let url = server.lock().unwrap().url();
        let (spool, schedule) = node_at(&url).await;
        let claim = Duration::from_millis(500);
        let schedule = Arc::new(
            Arc::into_inner(schedule)
                .unwrap()
                .with_expiry_claim(claim)
                .with_report_grace(Duration::ZERO),
        );
        // Four messages, eight deliveries.
        queue(&spool, &schedule, 0..4).await;

        let reports = Arc::new(Mutex::new(Vec::<(MessageId, String)>::new()));
        let dying = {
            let server = server.clone();
            let mut recorder = Recorder::new(reports.clone());
            recorder.first = Box::new(move || server.lock().unwrap().kill());
            recorder.hook()
        };
        let late = u64::MAX / 2;
        let failed = schedule.expire(late, &policy(), Some(&dying)).await;
        assert!(
            failed.is_err(),
            "the sweep went on without Redis: {failed:?}"
        );
        server.lock().unwrap().restart();

        let live = |records: Vec<Option<Arc<MessageRecord>>>, ids: &[MessageId]| {
            ids.iter()
                .zip(records)
                .filter_map(|(id, r)| r.map(|r| (id.clone(), r)))
                .flat_map(|(id, r)| {
                    r.deliveries
                        .iter()
                        .map(|d| (id.clone(), d.domain.clone()))
                        .collect::<Vec<_>>()
                })
                .collect::<HashSet<_>>()
        };
        let ids: Vec<MessageId> = (0..4).map(crate::spool::suite::id).collect();
        let queued = live(schedule.records(&ids).await.unwrap(), &ids);
        for reported in reports.lock().unwrap().iter() {
            assert!(
                !queued.contains(reported),
                "{reported:?} was reported and is still queued"
            );
        }

        // Once the claims lapse, sweeps finish the job.
        let fine = Recorder::new(reports.clone()).hook();
        for _ in 0..20 {
            tokio::time::sleep(claim).await;
            schedule.reclaim_expired_leases().await.unwrap();
            schedule.expire(late, &policy(), Some(&fine)).await.unwrap();
            schedule.send_pending_reports(&fine).await.unwrap();
            if schedule.counts().await.unwrap().messages == 0 {
                break;
            }
        }
        let reported = reports.lock().unwrap().clone();
        let unique: HashSet<_> = reported.iter().cloned().collect();
        assert_eq!(unique.len(), reported.len(), "reported twice: {reported:?}");
        assert_eq!(unique.len(), 8, "every delivery reported: {reported:?}");
    }

    type Reported = Arc<std::sync::Mutex<Vec<(MessageId, String)>>>;

    /// Message 0 fails at example.org; its report is recorded with the
    /// outcome but cannot be queued then (the reporter refuses once).
    async fn a_failure_whose_report_waits(
        schedule: &RedisSchedule,
        reports: &Reported,
    ) -> (Arc<MessageRecord>, Completion) {
        let refusing = Recorder::new(reports.clone());
        refusing.failures.store(1, Ordering::SeqCst);
        let (record, _) = schedule
            .take("example.org", 1, "node-a", Duration::from_secs(60))
            .await
            .unwrap()
            .pop()
            .expect("a delivery");
        let failed = outcome(&[(0, RcptResult::Failed), (1, RcptResult::Failed)]);
        let completion = schedule
            .complete(
                &record.id,
                "example.org",
                &failed,
                now_ms(),
                &policy(),
                0.0,
                Some(&refusing.hook()),
            )
            .await
            .expect("the outcome is recorded though its report waits")
            .expect("a completion");
        (record, completion)
    }

    /// A failure is recorded with its report; when the report cannot be
    /// queued then, it is queued later, once past the grace, and once.
    #[tokio::test]
    async fn a_report_not_queued_with_its_outcome_is_queued_later_once() {
        let server = RedisServer::start();
        let (spool, schedule) = node(&server).await;
        queue(&spool, &schedule, 0..1).await;
        let reports: Reported = Default::default();
        let (record, completion) = a_failure_whose_report_waits(&schedule, &reports).await;
        assert_eq!(completion.failed().count(), 1);
        let left = schedule
            .records(std::slice::from_ref(&record.id))
            .await
            .unwrap();
        let left = left[0].as_ref().expect("the other domain is still due");
        assert!(left.deliveries.iter().all(|d| d.domain != "example.org"));
        assert!(reports.lock().unwrap().is_empty());

        // Within the grace the writer may still be queueing it.
        let fine = Recorder::new(reports.clone()).hook();
        assert_eq!(schedule.send_pending_reports(&fine).await.unwrap(), 0);
        let schedule = Arc::into_inner(schedule)
            .unwrap()
            .with_report_grace(Duration::ZERO);
        assert_eq!(schedule.send_pending_reports(&fine).await.unwrap(), 1);
        assert_eq!(schedule.send_pending_reports(&fine).await.unwrap(), 0);
        assert_eq!(
            *reports.lock().unwrap(),
            vec![(record.id.clone(), "example.org".to_string())]
        );
        let mut conn = raw(&server).await;
        let entries: u64 = redis::cmd("ZCARD")
            .arg(PENDING_REPORTS_KEY)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(entries, 0, "nothing is left pending");
    }

    /// The one pending-report entry, with a connection to move it.
    async fn the_pending_entry(
        server: &RedisServer,
    ) -> (redis::aio::MultiplexedConnection, String) {
        let mut conn = raw(server).await;
        let mut entries: Vec<String> = redis::cmd("ZRANGE")
            .arg(PENDING_REPORTS_KEY)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(entries.len(), 1);
        (conn, entries.pop().unwrap())
    }

    /// A pass queues the report that waits for `record`'s example.org
    /// failure, once, and leaves no entry pending.
    async fn queued_once_by_the_next_pass(
        schedule: &RedisSchedule,
        reports: &Reported,
        record: &MessageRecord,
    ) {
        let fine = Recorder::new(reports.clone()).hook();
        assert_eq!(schedule.send_pending_reports(&fine).await.unwrap(), 1);
        assert_eq!(
            *reports.lock().unwrap(),
            vec![(record.id.clone(), "example.org".to_string())]
        );
        assert_eq!(schedule.counts().await.unwrap().pending_reports, 0);
    }

    /// A pass over the pending reports that cannot queue them puts them
    /// back for the next pass, rather than a whole grace later.
    #[tokio::test]
    async fn a_pending_report_pass_that_fails_leaves_it_to_the_next_pass() {
        let server = RedisServer::start();
        let (spool, schedule) = node(&server).await;
        queue(&spool, &schedule, 0..1).await;
        let reports: Reported = Default::default();
        let (record, _) = a_failure_whose_report_waits(&schedule, &reports).await;
        // Kept long ago: past the grace.
        let (mut conn, entry) = the_pending_entry(&server).await;
        let _: () = redis::cmd("ZADD")
            .arg(PENDING_REPORTS_KEY)
            .arg(1)
            .arg(&entry)
            .query_async(&mut conn)
            .await
            .unwrap();

        assert_eq!(schedule.counts().await.unwrap().pending_reports, 1);
        let failing = Recorder::new(reports.clone());
        failing.failures.store(1, Ordering::SeqCst);
        assert!(schedule
            .send_pending_reports(&failing.hook())
            .await
            .is_err());
        queued_once_by_the_next_pass(&schedule, &reports, &record).await;
    }

    /// A backlog of entries left by faults (reports already queued, record
    /// writes that lost) is older than a report still waiting: one pass
    /// drains it by several batches and queues the report behind it.
    #[tokio::test]
    async fn a_backlog_of_stale_entries_does_not_hold_back_a_waiting_report() {
        let server = RedisServer::start();
        let (spool, schedule) = node(&server).await;
        queue(&spool, &schedule, 0..1).await;
        let reports: Reported = Default::default();
        let (record, _) = a_failure_whose_report_waits(&schedule, &reports).await;
        let (mut conn, entry) = the_pending_entry(&server).await;
        let stale = 3 * PENDING_BATCH + 50;
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(PENDING_REPORTS_KEY);
        for n in 0..stale {
            zadd.arg(n + 1)
                .arg(format!("{}:{}", id(9000 + n as u64), id(n as u64)));
        }
        zadd.arg(stale + 10).arg(&entry);
        let _: () = zadd.query_async(&mut conn).await.unwrap();
        assert_eq!(schedule.counts().await.unwrap().pending_reports, stale + 1);

        queued_once_by_the_next_pass(&schedule, &reports, &record).await;
    }

    /// A failure recorded after its record changed under it (another
    /// domain's outcome first): the write that lost takes its report's
    /// entry with it, so nothing is left for a pass to drop.
    #[tokio::test]
    async fn a_record_write_that_loses_a_race_leaves_no_pending_entry() {
        let server = RedisServer::start();
        let (spool, schedule) = node(&server).await;
        queue(&spool, &schedule, 0..1).await;
        let lease = Duration::from_secs(60);
        let mut taken = Vec::new();
        for domain in ["example.org", "example.net"] {
            let (record, _) = schedule
                .take(domain, 1, "node-a", lease)
                .await
                .unwrap()
                .pop()
                .expect("a delivery");
            taken.push(record);
        }
        let delivered = outcome(&[(1, RcptResult::Delivered)]);
        let reports: Reported = Default::default();
        let hook = Recorder::new(reports.clone()).hook();
        let run = |domain: &'static str, outcome: MessageOutcome| {
            let (schedule, id, hook) = (schedule.clone(), taken[0].id.clone(), hook.clone());
            async move {
                schedule
                    .complete(&id, domain, &outcome, now_ms(), &policy(), 0.0, Some(&hook))
                    .await
                    .unwrap()
                    .expect("a completion")
            }
        };
        run("example.net", delivered).await;
        let failed = run("example.org", outcome(&[(0, RcptResult::Failed)])).await;
        assert!(failed.message_done());
        assert_eq!(
            *reports.lock().unwrap(),
            vec![(taken[0].id.clone(), "example.org".to_string())]
        );
        assert_eq!(schedule.counts().await.unwrap().pending_reports, 0);
    }

    /// Redis restarting between a delivery and its outcome: the outcome is
    /// recorded once Redis is back, and nothing is put back to be
    /// delivered again meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outcome_waits_for_redis_to_come_back() {
        let mut server = RedisServer::start();
        let (spool, schedule) = node(&server).await;
        queue(&spool, &schedule, 0..1).await;
        let lease = Duration::from_secs(60);
        let (record, _) = schedule
            .take("example.org", 1, "node-a", lease)
            .await
            .unwrap()
            .pop()
            .expect("a delivery");

        server.kill();
        let completing = {
            let (schedule, id) = (schedule.clone(), record.id.clone());
            tokio::spawn(async move {
                let delivered = outcome(&[(0, RcptResult::Delivered), (1, RcptResult::Delivered)]);
                schedule
                    .complete(
                        &id,
                        "example.org",
                        &delivered,
                        now_ms(),
                        &policy(),
                        0.0,
                        None,
                    )
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let _server = tokio::task::spawn_blocking(move || {
            server.restart();
            server
        })
        .await
        .unwrap();
        let done = completing
            .await
            .unwrap()
            .expect("recorded once Redis is back")
            .expect("a completion");
        assert_eq!(done.notes.len(), 1);
        let left = schedule
            .records(std::slice::from_ref(&record.id))
            .await
            .unwrap();
        let left = left[0].as_ref().expect("the other domain is still due");
        assert!(left.deliveries.iter().all(|d| d.domain != "example.org"));
        assert!(
            schedule
                .take("example.org", 1, "node-b", lease)
                .await
                .unwrap()
                .is_empty(),
            "the delivery was given out again"
        );
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

    /// Everything `news` delivers up to a marker published now: one
    /// server delivers in order, so nothing published before is missed.
    async fn heard_so_far(
        news: &mut tokio::sync::mpsc::Receiver<ReadyNews>,
        server: &RedisServer,
    ) -> Vec<String> {
        let mut conn = raw(server).await;
        redis::cmd("PUBLISH")
            .arg(news::channel(0))
            .arg(news::news("marker", "end.invalid"))
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
        let mut heard = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), news.recv()).await;
            match next.expect("the marker within 10 s").expect("news goes on") {
                ReadyNews::Ready(domain) if domain == "end.invalid" => return heard,
                ReadyNews::Ready(domain) => heard.push(domain),
                other => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn other_nodes_hear_of_a_domain_when_its_line_gets_work() {
        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let spool_b = RedisSpool::open(&server.url()).await.unwrap();
        let b = RedisSchedule::new(&spool_b)
            .await
            .unwrap()
            .with_ready_news(&server.url());
        let mut news = b.ready_news().expect("one server has news");
        let first = tokio::time::timeout(Duration::from_secs(10), news.recv()).await;
        assert_eq!(first.unwrap(), Some(ReadyNews::Listening));
        let lease = Duration::from_secs(60);

        // Message n goes to domains n % 3 and n + 1 % 3 of org, net, com.
        queue(&spool, &a, 0..1).await;
        let mut heard = heard_so_far(&mut news, &server).await;
        heard.sort();
        assert_eq!(heard, ["example.net", "example.org"], "new lines");
        queue(&spool, &a, 1..2).await;
        assert_eq!(
            heard_so_far(&mut news, &server).await,
            ["example.com"],
            "net had work already"
        );

        // Its own news a node does not hear.
        let mine = a.take("example.org", 10, "node-a", lease).await.unwrap();
        assert_eq!(mine.len(), 1);
        queue(&spool_b, &b, 2..3).await;
        assert_eq!(heard_so_far(&mut news, &server).await, [] as [&str; 0]);

        // Work handed back to an empty line.
        let theirs = b.take("example.org", 10, "node-b", lease).await.unwrap();
        assert_eq!(theirs.len(), 1);
        a.release(&mine[0].0.id, "example.org").await.unwrap();
        assert_eq!(heard_so_far(&mut news, &server).await, ["example.org"]);

        // Retries due again, into an empty line and a busy one.
        let mine = a.take("example.org", 10, "node-a", lease).await.unwrap();
        assert_eq!(mine.len(), 1);
        let later = message(3, 100);
        let mut record = later.record.clone();
        for delivery in &mut record.deliveries {
            delivery.next_attempt_ms = 1_000;
        }
        spool.store(vec![later]).await.unwrap();
        a.insert(vec![record], 0).await.unwrap();
        assert_eq!(heard_so_far(&mut news, &server).await, [] as [&str; 0]);
        a.promote(2_000).await.unwrap();
        assert_eq!(
            heard_so_far(&mut news, &server).await,
            ["example.org"],
            "net had work already"
        );

        // A suspended domain is no news.
        assert_eq!(
            a.take("example.com", 10, "node-a", lease)
                .await
                .unwrap()
                .len(),
            2
        );
        a.suspend("example.com").await.unwrap();
        queue(&spool, &a, 4..5).await;
        assert_eq!(heard_so_far(&mut news, &server).await, [] as [&str; 0]);
    }

    #[tokio::test]
    async fn a_user_refused_the_news_channel_still_files_and_takes_work() {
        let server = RedisServer::start();
        let mut conn = raw(&server).await;
        redis::cmd("ACL")
            .arg(&[
                "SETUSER",
                "limited",
                "on",
                ">secret",
                "~*",
                "resetchannels",
                "+@all",
            ])
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        let url = format!("redis://limited:secret@127.0.0.1:{}/", server.port());
        let (spool, s) = node_at(&url).await;
        let lease = Duration::from_secs(60);
        queue(&spool, &s, 0..1).await;
        let jobs = s.take("example.org", 10, "node-a", lease).await.unwrap();
        assert_eq!(jobs.len(), 1, "inserted although PUBLISH was refused");
        s.release(&jobs[0].0.id, "example.org").await.unwrap();
        let again = s.take("example.org", 10, "node-a", lease).await.unwrap();
        assert_eq!(again.len(), 1, "released although PUBLISH was refused");
        let refused: redis::RedisResult<i64> = redis::cmd("PUBLISH")
            .arg(news::channel(0))
            .arg("x")
            .query_async(
                &mut redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            )
            .await;
        assert!(refused.is_err(), "the user may publish: {refused:?}");
    }

    #[tokio::test]
    async fn a_look_at_very_many_ready_domains_is_bounded_and_all_come_in_turn() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let domains = 3 * READY_LOOK;
        let batch: Vec<_> = (0..domains as u64)
            .map(|n| message_to(n, &format!("d{n}.example")))
            .collect();
        store_and_insert(&spool, &s, &batch, u64::MAX / 2).await;
        let mut seen = HashSet::new();
        let mut looks = 0;
        while seen.len() < domains {
            looks += 1;
            assert!(looks <= 6, "{} of {domains} domains in 6 looks", seen.len());
            let look = s.ready_domains().await.unwrap();
            assert!(
                look.len() < 2 * READY_LOOK,
                "look {looks}: {} domains",
                look.len()
            );
            seen.extend(look);
        }
        assert!(looks >= 2, "one look read all {domains} domains");
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
        let late = complete(&*a, &id, "example.org", &deferred, t0)
            .await
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
        let done = complete(&*b, &id, "example.org", &delivered, t0)
            .await
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
        let done = complete(&*b, &id, "example.net", &net, t0)
            .await
            .expect("done");
        assert!(done.message_done());
        assert!(complete(&*a, &id, "example.net", &net, t0).await.is_none());
        assert_eq!(b.counts().await.unwrap(), empty_counts());
        // The body goes with the record: nothing of the message is left.
        assert!(matches!(
            spool.read_body(&id).await,
            Err(SpoolError::NotFound(_))
        ));
        assert!(spool.list().await.unwrap().is_empty());
    }

    /// The Redis spool stores a batch and files it in the schedule made
    /// for it in one transaction: one round trip, no schedule call of its
    /// own, and taken at once.
    #[tokio::test]
    async fn a_store_and_its_insert_are_one_round_trip() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut spool_trips = smarthost_testkit::since_last(|| spool.round_trips());
        let mut trips = smarthost_testkit::since_last(|| s.round_trips());
        let batch: Vec<_> = (0..6).map(|n| message(n, 100)).collect();
        let mut conn = raw(&server).await;
        reset_stats(&mut conn).await;
        let stored = spool
            .store_scheduled(batch.clone(), &*s, u64::MAX / 2)
            .await
            .unwrap();
        let calls = commands_run(&mut conn).await;
        assert_eq!(
            calls.get("zmscore"),
            None,
            "just stored, listed by none: no place asked: {calls:?}"
        );
        let mut domains = stored.scheduled.unwrap();
        domains.sort();
        assert_eq!(domains, ["example.com", "example.net", "example.org"]);
        assert_eq!(stored.records.len(), 6);
        assert_eq!(spool_trips(), 1, "the store and the insert together");
        assert_eq!(trips(), 0, "nothing sent by the schedule itself");
        // The domain sets, added once in the transaction, after the scripts.
        for key in [ACTIVE_KEY, READY_KEY] {
            let mut members: Vec<String> = redis::cmd("SMEMBERS")
                .arg(key)
                .query_async(&mut conn)
                .await
                .unwrap();
            members.sort();
            assert_eq!(
                members,
                ["example.com", "example.net", "example.org"],
                "{key}"
            );
        }
        let jobs = s
            .take("example.org", 10, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(jobs.len(), 4, "messages 0, 2, 3 and 5 go to example.org");
        assert_eq!(spool.list().await.unwrap().len(), 6);

        // Stored again (as after a reply lost to a timeout): the ids are
        // listed already, so their places are asked and none is queued
        // twice.
        let before = s.counts().await.unwrap();
        reset_stats(&mut conn).await;
        spool
            .store_scheduled(batch, &*s, u64::MAX / 2)
            .await
            .unwrap();
        let calls = commands_run(&mut conn).await;
        assert_eq!(calls.get("zmscore"), Some(&9), "three domains: {calls:?}");
        let after = s.counts().await.unwrap();
        assert_eq!(
            (after.ready, after.in_flight),
            (before.ready, before.in_flight)
        );
        assert!(s
            .take("example.org", 10, "node-b", Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty());
    }

    /// Within one transaction an insert adds the domain sets once, after
    /// its scripts, and the scripts' replies are still found among those
    /// of the transaction.
    #[tokio::test]
    async fn in_one_transaction_the_domain_sets_are_added_once() {
        let server = RedisServer::start();
        let (_spool, s) = node(&server).await;
        let records: Vec<MessageRecord> = (0..3).map(|n| message(n, 100).record).collect();
        let names = |plan: &InsertPlan| -> Vec<Vec<String>> {
            plan.steps
                .iter()
                .map(|step| {
                    step.iter()
                        .map(|cmd| match cmd.args_iter().next() {
                            Some(redis::Arg::Simple(name)) => {
                                String::from_utf8_lossy(name).into_owned()
                            }
                            _ => String::new(),
                        })
                        .collect()
                })
                .collect()
        };
        let apart = s
            .insert_plan(records.iter(), u64::MAX / 2, Fresh::MaybeQueued)
            .unwrap();
        let together = s
            .insert_plan(records.iter(), u64::MAX / 2, Fresh::MaybeQueued)
            .unwrap()
            .in_one_transaction();
        let (apart_steps, together_steps) = (names(&apart), names(&together));
        assert_eq!(apart_steps[0][..2], ["SADD", "SADD"], "{apart_steps:?}");
        assert_eq!(apart_steps[2], ["SADD", "SADD"], "{apart_steps:?}");
        assert!(
            !together_steps[0].iter().any(|n| n == "SADD"),
            "{together_steps:?}"
        );
        assert_eq!(together_steps[1], apart_steps[1], "the scripts");
        assert_eq!(together_steps[2], apart_steps[2], "the sets after them");
        // Every command's reply, numbered in order: the scripts' are
        // those right after the first step.
        let replies = |steps: &[Vec<String>]| -> Vec<Value> {
            (0..steps.iter().map(Vec::len).sum::<usize>())
                .map(|n| Value::Int(n as i64))
                .collect()
        };
        let first = together_steps[0].len() as i64;
        let scripts = together_steps[1].len() as i64;
        assert_eq!(
            together.script_replies(replies(&together_steps)),
            (first..first + scripts).map(Value::Int).collect::<Vec<_>>()
        );
        let first = apart_steps[0].len() as i64;
        assert_eq!(
            apart.script_replies(replies(&apart_steps)),
            (first..first + scripts).map(Value::Int).collect::<Vec<_>>()
        );
    }

    /// A server that lost the scripts (a restart) still stores and
    /// schedules: the insert is sent again after the scripts are loaded.
    #[tokio::test]
    async fn a_store_with_its_insert_loads_lost_scripts() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut admin = raw(&server).await;
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async::<()>(&mut admin)
            .await
            .unwrap();
        let stored = spool
            .store_scheduled(vec![message(0, 100)], &*s, u64::MAX / 2)
            .await
            .unwrap();
        assert_eq!(
            stored.scheduled.unwrap(),
            ["example.org", "example.net"],
            "message 0's domains"
        );
        let jobs = s
            .take("example.net", 10, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(jobs.len(), 1);
    }

    /// A schedule made for another spool (another server or database) is
    /// not written in this spool's transaction: store, then insert.
    #[tokio::test]
    async fn a_schedule_of_another_spool_inserts_on_its_own() {
        let server = RedisServer::start();
        let (spool, _) = node(&server).await;
        let (_, other) = node(&server).await;
        let mut trips = smarthost_testkit::since_last(|| other.round_trips());
        let stored = spool
            .store_scheduled(vec![message(0, 100)], &*other, u64::MAX / 2)
            .await
            .unwrap();
        assert_eq!(stored.scheduled.unwrap().len(), 2);
        assert_eq!(trips(), 1, "the insert, by the schedule");
    }

    /// A store the server refuses (out of memory) files nothing either:
    /// no schedule entry without its message.
    #[tokio::test]
    async fn a_refused_store_inserts_nothing() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut admin = raw(&server).await;
        let config = |value: &'static str| {
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("SET").arg("maxmemory").arg(value);
            cmd
        };
        config("1").query_async::<()>(&mut admin).await.unwrap();
        let refused = spool
            .store_scheduled(vec![message(0, 100)], &*s, u64::MAX / 2)
            .await;
        config("0").query_async::<()>(&mut admin).await.unwrap();
        let error = refused.expect_err("out of memory");
        assert!(
            error.to_string().contains("OOM") || error.to_string().contains("EXECABORT"),
            "{error}"
        );
        assert!(spool.list().await.unwrap().is_empty());
        assert!(s.ready_domains().await.unwrap().is_empty());
        assert_eq!(s.counts().await.unwrap(), empty_counts());
    }

    #[tokio::test]
    async fn round_trips_per_operation() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut trips = smarthost_testkit::since_last(|| s.round_trips());
        let mut sent = smarthost_testkit::since_last(|| s.commands());
        let batch: Vec<_> = (0..30).map(|n| message(n * 3, 100)).collect();
        let records = batch.iter().map(|m| m.record.clone()).collect();
        spool.store(batch).await.unwrap();
        s.insert(records, u64::MAX / 2).await.unwrap();
        assert_eq!(trips(), 1, "insert of 30 messages");
        assert_eq!(
            sent(),
            7,
            "commands of an insert of 30: per batch, not per message"
        );
        let jobs = s
            .take("example.org", 20, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(jobs.len(), 20);
        assert_eq!(trips(), 2, "take of 20: the script, then the records");
        assert_eq!(
            sent(),
            2,
            "commands of a take of 20: the script (which sets the timer), one MGET of the records"
        );
        let t0 = jobs[0].0.received_ms;
        let deferred = outcome(&[(0, RcptResult::Deferred)]);
        complete(&*s, &jobs[0].0.id, "example.org", &deferred, t0)
            .await
            .unwrap();
        assert_eq!(
            trips(),
            1,
            "complete: the record and the domain in one script"
        );
        assert_eq!(
            sent(),
            2,
            "commands of a complete that defers: the script, the timer"
        );
        let delivered = outcome(&[(0, RcptResult::Delivered), (1, RcptResult::Delivered)]);
        complete(&*s, &jobs[1].0.id, "example.org", &delivered, t0)
            .await
            .unwrap();
        assert_eq!(trips(), 1, "complete with its index entry");
        assert_eq!(sent(), 1, "commands of a complete that finishes the message: one script for the record, the domain, the index and sender entries");
        s.release(&jobs[2].0.id, "example.org").await.unwrap();
        assert_eq!(trips(), 1, "release");
        assert_eq!(sent(), 2, "commands of a release");
        // Work filed in ready gives no timer; the retry is not due yet.
        s.promote(t0).await.unwrap();
        assert_eq!(trips(), 1, "promote with no domain due: the timers");
        // The retry is due by this node's clock: its domain is looked at.
        s.reclaim_expired_leases().await.unwrap();
        assert_eq!(
            trips(),
            3,
            "reclaim: the timers, the domain, the timer back"
        );
        assert_eq!(s.promote(t0 + 1000).await.unwrap(), ["example.org"]);
        assert_eq!(
            trips(),
            3,
            "promote: the timers, the domain, the timers back"
        );
        s.promote(t0 + 1000).await.unwrap();
        assert_eq!(trips(), 1, "promote with no domain due: the timers");
        // A rescan: the records are queued (leased) already.
        let records = jobs[3..].iter().map(|(r, _)| (**r).clone()).collect();
        s.insert(records, t0).await.unwrap();
        assert_eq!(trips(), 2, "insert of queued work: the scripts, the timers");
        s.has_ready("example.org").await.unwrap();
        assert_eq!(trips(), 1, "has_ready");
    }

    /// Message `n` with one recipient, at `domain`.
    fn message_to(n: u64, domain: &str) -> crate::spool::NewMessage {
        let mut m = message(n, 50);
        m.record.envelope.recipients.truncate(1);
        m.record.envelope.recipients[0].address.domain = domain.into();
        m.record.deliveries = envelope::split_deliveries(&m.record.envelope, m.record.received_ms);
        m
    }

    /// A plain connection, patient with a busy machine.
    async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        conn.set_response_timeout(Duration::from_secs(30));
        conn
    }

    async fn config_set(conn: &mut redis::aio::MultiplexedConnection, name: &str, value: i64) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(name)
            .arg(value)
            .query_async::<()>(conn)
            .await
            .unwrap();
    }

    /// The shortest server-side duration (µs, Redis's own `SLOWLOG`) of
    /// the calls of `script` since the last `SLOWLOG RESET`, and how many.
    async fn fastest_call(
        conn: &mut redis::aio::MultiplexedConnection,
        script: &Script,
    ) -> (i64, usize) {
        let log: Vec<(i64, i64, i64, Vec<Vec<u8>>)> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(-1)
            .query_async::<Vec<Value>>(conn)
            .await
            .unwrap()
            .into_iter()
            .map(|entry| {
                let Value::Array(fields) = entry else {
                    panic!("{entry:?}")
                };
                let mut fields = fields.into_iter();
                (
                    redis::from_redis_value(fields.next().unwrap()).unwrap(),
                    redis::from_redis_value(fields.next().unwrap()).unwrap(),
                    redis::from_redis_value(fields.next().unwrap()).unwrap(),
                    redis::from_redis_value(fields.next().unwrap()).unwrap(),
                )
            })
            .collect();
        let calls: Vec<i64> = log
            .into_iter()
            .filter(|(_, _, _, args)| {
                args.len() > 1 && args[0] == b"EVALSHA" && args[1] == script.get_hash().as_bytes()
            })
            .map(|(_, _, micros, _)| micros)
            .collect();
        (calls.iter().copied().min().unwrap_or(i64::MAX), calls.len())
    }

    /// The schedule scripts touch only what they change: with 20 000
    /// deliveries ready in one domain, an insert of 200 new ids, a claim
    /// of 200 ids out of the middle of the line (an expiry sweep) and a
    /// completion (`file`) each cost what they cost on a short line. The
    /// cost is Redis's own server-side time per call (`SLOWLOG` with no
    /// threshold), and the fastest of several calls is compared, so a
    /// busy machine that pre-empts Redis now and then does not move it. A
    /// script that scans the line per id (`LPOS`, `LREM`) is three orders
    /// of magnitude slower at this length (about 60 ns per entry and id:
    /// 240 ms for the insert and the claim, 1.2 ms per completion), the
    /// bounds below leave ten times the indexed cost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scripts_do_not_scan_a_long_ready_line() {
        let server = RedisServer::start();
        let (_spool, s) = node(&server).await;
        let mut conn = raw(&server).await;
        let domain = "long.example";
        let k = domain_keys(domain);
        // Ids only: the schedule does not read records to file them.
        let ids = |from: u64, n: u64| {
            (from..from + n)
                .map(|i| message_to(1_000_000 + i, domain).record)
                .collect::<Vec<_>>()
        };
        for batch in 0..10 {
            s.insert(ids(batch * 2000, 2000), u64::MAX / 2)
                .await
                .unwrap();
        }
        assert_eq!(s.counts().await.unwrap().ready, 20_000);
        config_set(&mut conn, "slowlog-log-slower-than", 0).await;
        config_set(&mut conn, "slowlog-max-len", 10_000).await;
        let reset = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("SLOWLOG")
                    .arg("RESET")
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap()
            }
        };

        reset(&mut conn).await;
        for round in 0..5 {
            s.insert(ids(100_000 + round * 200, 200), u64::MAX / 2)
                .await
                .unwrap();
        }
        let (micros, calls) = fastest_call(&mut conn, &s.scripts.insert).await;
        assert_eq!(calls, 5);
        eprintln!("insert of 200 ids: {micros} µs");
        assert!(micros < 20_000, "insert of 200 ids: {micros} µs");

        // Claimed out of the middle of the line, as an expiry sweep does.
        reset(&mut conn).await;
        for round in 0..5u64 {
            let claimed: Vec<String> = ids(5000 + round * 200, 200)
                .into_iter()
                .map(|r| r.id.0)
                .collect();
            let mut cmd = evalsha(
                &s.scripts.claim,
                &[&k.ready, &k.deferred, &k.leases, &k.holders, &k.messages],
            );
            cmd.arg("sweep").arg(60_000).arg(&claimed);
            cmd.query_async::<Value>(&mut conn).await.unwrap();
        }
        let (micros, calls) = fastest_call(&mut conn, &s.scripts.claim).await;
        assert_eq!(calls, 5);
        eprintln!("claim of 200 ids: {micros} µs");
        assert!(micros < 20_000, "claim of 200 ids: {micros} µs");

        // Each claimed delivery filed as done, one completion per call.
        reset(&mut conn).await;
        let mut pipe = redis::pipe();
        for record in ids(5000, 200) {
            pipe.add_command(s.file_cmd(&record.id, domain, "sweep", None));
        }
        pipe.query_async::<Value>(&mut conn).await.unwrap();
        let (micros, calls) = fastest_call(&mut conn, &s.scripts.file).await;
        assert_eq!(calls, 200);
        eprintln!("one completion: {micros} µs");
        assert!(micros < 500, "one completion: {micros} µs");
        let counts = s.counts().await.unwrap();
        assert_eq!(
            (counts.ready, counts.in_flight),
            (20_000 + 1000 - 1000, 800)
        );
    }

    /// Every command Redis has run since the last `CONFIG RESETSTAT`, by
    /// name (`INFO commandstats`, the commands scripts run included).
    async fn commands_run(conn: &mut redis::aio::MultiplexedConnection) -> HashMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(conn)
            .await
            .unwrap();
        info.lines()
            .filter_map(|line| line.strip_prefix("cmdstat_")?.split_once(':'))
            .map(|(name, _)| {
                let calls = smarthost_testkit::redis::command_calls(&info, name);
                (name.to_string(), calls)
            })
            .collect()
    }

    async fn reset_stats(conn: &mut redis::aio::MultiplexedConnection) {
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async::<()>(conn)
            .await
            .unwrap();
    }

    /// An insert and a take run their commands a chunk of ids at a time,
    /// not one per id: 2,500 deliveries of one domain go in and come out
    /// with a few commands per chunk of 1,000, in the order they went in,
    /// each leased once; inserted again, none is queued twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_ids_cost_a_few_commands_per_chunk() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut conn = raw(&server).await;
        let domain = "many.example";
        let batch: Vec<_> = (0..2500).map(|n| message_to(n, domain)).collect();
        for chunk in batch.chunks(1000) {
            spool.store(chunk.to_vec()).await.unwrap();
        }
        let records: Vec<_> = batch.iter().map(|m| m.record.clone()).collect();
        let run = |name: &str, calls: &HashMap<String, u64>| calls.get(name).copied().unwrap_or(0);

        reset_stats(&mut conn).await;
        s.insert(records.clone(), u64::MAX / 2).await.unwrap();
        let calls = commands_run(&mut conn).await;
        assert_eq!(run("zscore", &calls), 0, "{calls:?}");
        assert_eq!(
            run("zmscore", &calls),
            9,
            "three sets, three chunks: {calls:?}"
        );
        // The sender's listing, then the domain's messages and its line
        // per chunk.
        assert_eq!(run("zadd", &calls), 7, "{calls:?}");
        assert_eq!(s.counts().await.unwrap().ready, 2500);

        s.insert(records, u64::MAX / 2).await.unwrap();
        assert_eq!(s.counts().await.unwrap().ready, 2500, "inserted again");

        // Suspended, a take hands out nothing and leaves the line as it
        // was, a chunk at a time.
        let lease = Duration::from_secs(60);
        s.suspend(domain).await.unwrap();
        assert!(s
            .take(domain, 2500, "node-a", lease)
            .await
            .unwrap()
            .is_empty());
        s.resume(domain).await.unwrap();
        assert_eq!(s.counts().await.unwrap().ready, 2500, "put back");

        reset_stats(&mut conn).await;
        let jobs = s.take(domain, 2500, "node-a", lease).await.unwrap();
        let calls = commands_run(&mut conn).await;
        assert_eq!(run("zmscore", &calls), 3, "{calls:?}");
        assert_eq!(run("hset", &calls), 3, "{calls:?}");
        // The leases per chunk, the domain's timer with them.
        assert_eq!(run("zadd", &calls), 4, "{calls:?}");
        let taken: Vec<_> = jobs.iter().map(|(r, _)| r.id.clone()).collect();
        let sent: Vec<_> = batch.iter().map(|m| m.record.id.clone()).collect();
        assert_eq!(taken, sent, "in the order they went in");
        let counts = s.counts().await.unwrap();
        assert_eq!((counts.ready, counts.in_flight), (0, 2500));
        reset_stats(&mut conn).await;
        let none = s.take(domain, 10, "node-b", lease).await.unwrap();
        assert!(none.is_empty());
        let calls = commands_run(&mut conn).await;
        assert_eq!(
            (run("evalsha", &calls), run("zpopmin", &calls), calls.len()),
            (1, 1, 3),
            "a take from an empty line is one command: {calls:?}"
        );
    }

    /// Deliveries that finish at once are completed together: 120
    /// deliveries of 60 messages (each in two domains, so both halves of a
    /// message race in one call and the second is applied to the record
    /// the first wrote) take a few calls of `complete.lua`, not 120, and
    /// end as they would one by one: every fifth message keeps a retry,
    /// the others are gone from the records, the index and the sender's
    /// listing, and nothing is left in flight.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completions_at_once_share_a_call() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut conn = raw(&server).await;
        queue(&spool, &s, 0..60).await;
        let taken = suite::take_all_of_sixty(&*s).await;
        reset_stats(&mut conn).await;
        let s: Arc<dyn Schedule> = s;
        let done = suite::complete_all_at_once(&s, &taken).await;
        let calls = commands_run(&mut conn).await;
        let evalsha = calls.get("evalsha").copied().unwrap_or(0);
        // The first call goes alone, the next takes all that waited
        // meanwhile (up to 100), the rest, and a retry each for the
        // halves that lost their record's race.
        eprintln!("{evalsha} calls for 120 completions: {calls:?}");
        assert!(
            evalsha <= 6,
            "{evalsha} calls for 120 completions: {calls:?}"
        );
        assert!(done.iter().all(|&d| d), "every delivery recorded");
        let kept = suite::only_the_retries_are_left(&*s, &taken).await;
        let indexed: Vec<String> = redis::cmd("ZRANGE")
            .arg(INDEX_KEY)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let kept_names: Vec<String> = kept.iter().map(|id| id.0.clone()).collect();
        assert_eq!(indexed, kept_names, "the index holds the retries only");
    }

    /// A delivery that comes twice in one call is filed as it would be
    /// one call after the other: the first files it, the second finds the
    /// lease gone and files nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_twice_in_one_call_is_filed_once() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        queue(&spool, &s, 0..1).await;
        let lease = Duration::from_secs(60);
        let (record, _) = s
            .take("example.org", 1, "node-a", lease)
            .await
            .unwrap()
            .remove(0);
        let bytes = envelope::encode(&*record);
        let attempt = || {
            RedisSchedule::attempt(
                &record.id,
                &bytes,
                Some(&bytes),
                None,
                "example.org",
                "node-a",
                Some(record.received_ms + 60_000),
                &[],
            )
        };
        let replies = s.complete_attempts(&[attempt(), attempt()]).await.unwrap();
        let replies: Vec<Vec<i64>> = replies
            .into_iter()
            .map(|r| parse("test", r).unwrap())
            .collect();
        assert_eq!(replies, [vec![2, 1, 0], vec![2, 0, 0]]);
        let counts = s.counts().await.unwrap();
        assert_eq!((counts.in_flight, counts.deferred), (0, 1));
    }

    /// On a Cluster, a delivery that comes twice in one batch of filings
    /// is filed as one after the other: the first files it, the second
    /// finds its lease gone and files nothing. Another delivery of the
    /// domain, finished in the same batch, goes in the first call with it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_delivery_twice_in_one_batch_of_filings_is_filed_once_on_a_cluster() {
        crate::spool::suite::receiving_now(async {
            let cluster = smarthost_testkit::redis::RedisCluster::start();
            let (spool, s) = crate::redis_cluster_tests::node(&cluster).await;
            queue(&spool, &s, 0..3).await;
            let lease = Duration::from_secs(60);
            let taken = s.take("example.org", 10, "node-a", lease).await.unwrap();
            let ids: Vec<MessageId> = taken.iter().map(|(r, _)| r.id.clone()).collect();
            assert_eq!(ids.len(), 2, "messages 0 and 2 have a recipient there");
            let filing = |id: &MessageId, next: Option<u64>| DomainFiling {
                id: id.clone(),
                domain: "example.org".into(),
                holder: "node-a".into(),
                next,
                forget: Vec::new(),
            };
            let retry = Some(taken[0].0.received_ms + 60_000);
            let filings = vec![
                filing(&ids[0], retry),
                filing(&ids[0], retry),
                filing(&ids[1], None),
            ];
            let answers = s.file_together(filings).await.unwrap();
            assert_eq!(answers, [(true, false), (false, false), (true, false)]);
            let counts = s.counts().await.unwrap();
            assert_eq!((counts.in_flight, counts.deferred), (0, 1));
        })
        .await
    }

    /// Everything in the database, for comparing two: each key with its
    /// type and contents; the leases and timers as sets of members, their
    /// scores being Redis clock times of the setup.
    async fn keyspace(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, String> {
        let keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(conn).await.unwrap();
        let mut all = BTreeMap::new();
        for key in keys {
            let kind: String = redis::cmd("TYPE")
                .arg(&key)
                .query_async(conn)
                .await
                .unwrap();
            let value = match kind.as_str() {
                "zset" if key.ends_with(":leases") || key == TIMERS_KEY => {
                    let members: BTreeSet<String> = redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .query_async(conn)
                        .await
                        .unwrap();
                    format!("{members:?}")
                }
                "zset" => {
                    let members: Vec<(String, String)> = redis::cmd("ZRANGE")
                        .arg(&key)
                        .arg(0)
                        .arg(-1)
                        .arg("WITHSCORES")
                        .query_async(conn)
                        .await
                        .unwrap();
                    format!("{members:?}")
                }
                "hash" => {
                    let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
                        .arg(&key)
                        .query_async(conn)
                        .await
                        .unwrap();
                    format!("{fields:?}")
                }
                "set" => {
                    let members: BTreeSet<String> = redis::cmd("SMEMBERS")
                        .arg(&key)
                        .query_async(conn)
                        .await
                        .unwrap();
                    format!("{members:?}")
                }
                "string" => {
                    let bytes: Vec<u8> =
                        redis::cmd("GET").arg(&key).query_async(conn).await.unwrap();
                    format!("{bytes:?}")
                }
                other => other.to_string(),
            };
            all.insert(key, value);
        }
        all
    }

    /// Completions in one call of `complete.lua` end as the same
    /// completions one call each, in order, whatever they are (only which
    /// of them says that a domain was left without work may differ):
    /// seeded
    /// random attempts on the deliveries of three messages (two domains
    /// each, two deliveries a domain, so that a call often empties one),
    /// some to the same message, some the same delivery twice,
    /// with records current, stale or written by an attempt before,
    /// finishing the message or not, by the holder, by nobody or by
    /// another. The replies and the whole database are compared; a
    /// domain the call left without work must be said so by one of its
    /// attempts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completions_together_end_as_one_by_one() {
        use rand::{Rng, SeedableRng};

        let server = RedisServer::start();
        let (spool_a, a) = node_at(&format!("{}1", server.url())).await;
        let (spool_b, b) = node_at(&format!("{}2", server.url())).await;
        let mut conn_a = redis::Client::open(format!("{}1", server.url()))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let mut conn_b = redis::Client::open(format!("{}2", server.url()))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let lease = Duration::from_secs(60);
        let mut changed = 0;
        for seed in 0..100u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for (spool, s, conn) in [(&spool_a, &a, &mut conn_a), (&spool_b, &b, &mut conn_b)] {
                redis::cmd("FLUSHDB").query_async::<()>(conn).await.unwrap();
                queue(spool, s, 0..3).await;
                // example.com is left in the line: nobody holds it.
                for domain in ["example.org", "example.net"] {
                    s.take(domain, 10, "node-a", lease).await.unwrap();
                }
            }
            let records: Vec<MessageRecord> = (0..3).map(|n| message(n, 100).record).collect();
            let mut written: HashMap<MessageId, Vec<u8>> = HashMap::new();
            let mut specs = Vec::new();
            for i in 0..rng.random_range(1..=12) {
                let record = &records[rng.random_range(0..records.len())];
                let domain = record.deliveries[rng.random_range(0..2)].domain.clone();
                let stored = envelope::encode(record);
                let expected = match rng.random_range(0..10) {
                    0 => b"stale".to_vec(),
                    1..=3 => written.get(&record.id).cloned().unwrap_or(stored),
                    _ => stored,
                };
                let new = (rng.random_range(0..3) > 0).then(|| format!("record {i}").into_bytes());
                if let Some(new) = &new {
                    written.insert(record.id.clone(), new.clone());
                }
                let holder = ["node-a", "node-a", "node-a", "", "node-b"][rng.random_range(0..5)];
                let next = rng
                    .random_bool(0.5)
                    .then(|| record.received_ms + 60_000 + i);
                specs.push((
                    record.id.clone(),
                    expected,
                    new,
                    domain,
                    holder,
                    next,
                    record.envelope.sender_key(),
                ));
            }
            let attempts = || {
                specs
                    .iter()
                    .map(|(id, expected, new, domain, holder, next, sender)| {
                        let sender = sender_messages_key(sender);
                        let done = match new {
                            None => vec![INDEX_KEY, sender.as_str()],
                            Some(_) => Vec::new(),
                        };
                        RedisSchedule::attempt(
                            id,
                            expected,
                            new.as_deref(),
                            None,
                            domain,
                            holder,
                            *next,
                            &done,
                        )
                    })
                    .collect::<Vec<_>>()
            };
            let together = a.complete_attempts(&attempts()).await.unwrap();
            let mut one_by_one = Vec::new();
            for attempt in attempts() {
                one_by_one.extend(b.complete_attempts(&[attempt]).await.unwrap());
            }
            let replies = |replies: Vec<Value>| -> Vec<Vec<Value>> {
                replies
                    .into_iter()
                    .map(|r| parse::<Vec<Value>>("test", r).unwrap())
                    .collect()
            };
            let (mut together, mut one_by_one) = (replies(together), replies(one_by_one));
            changed += together.iter().filter(|r| r[0] == Value::Int(1)).count();
            // Which attempt says that its domain was left without work
            // may differ (a delivery that came twice is filed last), so
            // the flags are compared apart: a domain the call left
            // without work is said so by one of its attempts.
            let mut flagged = BTreeSet::new();
            for (reply, spec) in together.iter_mut().zip(&specs) {
                if reply.len() == 3
                    && std::mem::replace(&mut reply[2], Value::Int(0)) == Value::Int(1)
                {
                    flagged.insert(spec.3.clone());
                }
            }
            for reply in one_by_one.iter_mut().filter(|r| r.len() == 3) {
                reply[2] = Value::Int(0);
            }
            assert_eq!(together, one_by_one, "seed {seed}: {specs:?}");
            let after = keyspace(&mut conn_a).await;
            assert_eq!(after, keyspace(&mut conn_b).await, "seed {seed}: {specs:?}");
            for (reply, spec) in together.iter().zip(&specs) {
                let domain = &spec.3;
                let k = domain_keys(domain);
                let empty = [&k.ready, &k.deferred, &k.leases]
                    .iter()
                    .all(|key| !after.contains_key(key.as_str()));
                let finished = reply.len() == 3 && reply[1] == Value::Int(1) && spec.5.is_none();
                if empty && finished {
                    assert!(
                        flagged.contains(domain),
                        "seed {seed}: {domain} left empty unsaid: {specs:?}"
                    );
                }
            }
        }
        assert!(changed > 0, "some attempts lost their record's race");
    }

    /// Domains leave the active set when their last work goes, so that
    /// nothing keeps looking at domains that once had mail; one with a
    /// retry pending stays, and the per-tick calls cost the same with
    /// 5 000 such domains behind them as with none.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn domains_without_work_leave_the_active_set() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut conn = raw(&server).await;
        let batch: Vec<_> = (0..5000)
            .map(|n| message_to(n, &format!("d{n}.example")))
            .collect();
        store_and_insert(&spool, &s, &batch, u64::MAX / 2).await;
        let scard = |conn: &mut redis::aio::MultiplexedConnection, key: &'static str| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("SCARD")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .unwrap()
            }
        };
        assert_eq!(scard(&mut conn, ACTIVE_KEY).await, 5000);

        // One domain finishes by delivery.
        let t0 = message_to(0, "d0.example").record.received_ms;
        let done = outcome(&[(0, RcptResult::Delivered)]);
        let (job, _) = s
            .take("d0.example", 1, "node-a", Duration::from_secs(60))
            .await
            .unwrap()
            .pop()
            .unwrap();
        complete(&*s, &job.id, "d0.example", &done, t0)
            .await
            .unwrap();
        // One keeps a retry for later.
        let kept = message_to(9_999_999, "kept.example");
        spool.store(vec![kept.clone()]).await.unwrap();
        s.insert(vec![kept.record.clone()], u64::MAX / 2)
            .await
            .unwrap();
        let (job, _) = s
            .take("kept.example", 1, "node-a", Duration::from_secs(60))
            .await
            .unwrap()
            .pop()
            .unwrap();
        let deferred = outcome(&[(0, RcptResult::Deferred)]);
        let later = kept.record.received_ms;
        complete(&*s, &job.id, "kept.example", &deferred, later)
            .await
            .unwrap();
        // The rest expire (the kept message is younger than its lifetime).
        let policy = policy();
        let now = later + policy.max_lifetime.as_millis() as u64 - 1;
        for _ in 0..10 {
            if s.expire(now, &policy, None).await.unwrap().is_empty() {
                break;
            }
        }
        let active: Vec<String> = redis::cmd("SMEMBERS")
            .arg(ACTIVE_KEY)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(active, ["kept.example"]);
        let counts = s.counts().await.unwrap();
        assert_eq!((counts.messages, counts.deferred), (1, 1));

        // The per-tick calls: the ready set is emptied of stale domains
        // once, then each is one round trip.
        assert!(s.ready_domains().await.unwrap().is_empty());
        assert_eq!(scard(&mut conn, READY_KEY).await, 0);
        let mut trips = smarthost_testkit::since_last(|| s.round_trips());
        assert!(s.ready_domains().await.unwrap().is_empty());
        assert_eq!(trips(), 1, "ready_domains");
        assert!(s.promote(t0).await.unwrap().is_empty());
        assert_eq!(trips(), 1, "promote");
        assert_eq!(s.reclaim_expired_leases().await.unwrap(), 0);
        let timers: Vec<String> = redis::cmd("ZRANGE")
            .arg(TIMERS_KEY)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(timers, ["kept.example"]);
        // And the retry still comes due.
        let next = later + policy.intervals[0].as_millis() as u64;
        assert_eq!(s.promote(next).await.unwrap(), ["kept.example"]);
    }

    /// A `promote` with nothing due is one round trip that runs no domain
    /// script, however many domains got mail since the last one. New mail
    /// is filed in ready and gives its domain no timer; a timer that is
    /// due already would bring each of those domains to the next
    /// `promote`, a script per domain (up to a thousand per call), which
    /// at 50 000 domains made every leader tick cost 50–140 ms with
    /// nothing to promote. Here 3 000 domains get due mail, 1 500 of them
    /// also a retry for tomorrow.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn promote_with_nothing_due_runs_no_domain_script() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut conn = raw(&server).await;
        let now = now_ms();
        let tomorrow = now + 86_400_000;
        let batch: Vec<_> = (0..4500u64)
            .map(|n| {
                let mut m = message_to(n, &format!("d{}.example", n % 3000));
                if n >= 3000 {
                    m.record.deliveries[0].next_attempt_ms = tomorrow;
                }
                m
            })
            .collect();
        store_and_insert(&spool, &s, &batch, now).await;
        let counts = s.counts().await.unwrap();
        assert_eq!((counts.ready, counts.deferred), (3000, 1500));
        // Scripts run since the last call (`INFO commandstats`).
        let scripts_run = |conn: &mut redis::aio::MultiplexedConnection| {
            let mut conn = conn.clone();
            async move {
                let info: String = redis::cmd("INFO")
                    .arg("commandstats")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                redis::cmd("CONFIG")
                    .arg("RESETSTAT")
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
                smarthost_testkit::redis::command_calls(&info, "evalsha")
            }
        };
        scripts_run(&mut conn).await;

        let mut trips = smarthost_testkit::since_last(|| s.round_trips());
        for _ in 0..3 {
            assert!(s.promote(now).await.unwrap().is_empty());
            assert_eq!(trips(), 1, "promote with nothing due: the timers only");
        }
        assert_eq!(
            scripts_run(&mut conn).await,
            3,
            "scripts run by three promotes with nothing due (the timers' only)"
        );
        let due: i64 = redis::cmd("ZCOUNT")
            .arg(TIMERS_KEY)
            .arg("-inf")
            .arg(now)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(due, 0, "domains due by now in the timers");

        // The retries still come due, and only their domains are looked at.
        let mut promoted = s.promote(tomorrow).await.unwrap();
        promoted.extend(s.promote(tomorrow).await.unwrap());
        assert!(s.promote(tomorrow).await.unwrap().is_empty());
        promoted.sort();
        promoted.dedup();
        assert_eq!(promoted.len(), 1500);
        assert_eq!(
            scripts_run(&mut conn).await,
            3 + 1500,
            "the timers' scripts and one per domain with a retry"
        );
        assert_eq!(s.counts().await.unwrap().ready, 4500);
    }

    /// A domain whose timer was lost (a node died between taking it out
    /// of the timers and adding it back) gets it back from the leader's
    /// rescan, which inserts every stored message again: the retry comes
    /// due and the lease that ran out is reclaimed.
    #[tokio::test]
    async fn a_rescan_puts_back_a_lost_timer() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut conn = raw(&server).await;
        let retry = message_to(1, "retry.example");
        let leased = message_to(2, "leased.example");
        spool
            .store(vec![retry.clone(), leased.clone()])
            .await
            .unwrap();
        s.insert(vec![retry.record.clone(), leased.record.clone()], now_ms())
            .await
            .unwrap();
        let t0 = retry.record.received_ms;
        let (job, _) = s
            .take("retry.example", 1, "node-a", Duration::from_secs(60))
            .await
            .unwrap()
            .pop()
            .unwrap();
        let deferred = outcome(&[(0, RcptResult::Deferred)]);
        let c = complete(&*s, &job.id, "retry.example", &deferred, t0)
            .await
            .unwrap();
        let next = c.next_attempt_ms.unwrap();
        let taken = s
            .take("leased.example", 1, "node-a", Duration::from_millis(1))
            .await
            .unwrap();
        assert_eq!(taken.len(), 1);
        redis::cmd("DEL")
            .arg(TIMERS_KEY)
            .query_async::<()>(&mut conn)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(s.promote(next).await.unwrap().is_empty(), "timer lost");
        assert_eq!(s.reclaim_expired_leases().await.unwrap(), 0, "timer lost");

        let records = spool.list().await.unwrap();
        assert_eq!(records.len(), 2);
        s.insert(records, now_ms()).await.unwrap();
        assert_eq!(s.promote(next).await.unwrap(), ["retry.example"]);
        assert_eq!(s.reclaim_expired_leases().await.unwrap(), 1);
        let counts = s.counts().await.unwrap();
        assert_eq!((counts.ready, counts.deferred, counts.in_flight), (2, 0, 0));
    }

    /// A domain that empties while another node inserts into it is never
    /// left with work outside the domain sets: the completion drops the
    /// domain first and looks again, the insert adds it after its script.
    /// Two nodes race on one domain, one inserting, one delivering
    /// everything it can take; whatever is left at the end is listed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_domain_emptied_during_an_insert_stays_listed() {
        let server = RedisServer::start();
        let (spool, a) = node(&server).await;
        let (_, b) = node(&server).await;
        let mut conn = raw(&server).await;
        let domain = "race.example";
        for round in 0..5u64 {
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let inserter = {
                let (spool, a, done) = (spool.clone(), a.clone(), done.clone());
                tokio::spawn(async move {
                    for i in 0..60 {
                        let m = message_to(round * 1000 + i, domain);
                        spool.store(vec![m.clone()]).await.unwrap();
                        a.insert(vec![m.record], u64::MAX / 2).await.unwrap();
                    }
                    done.store(true, Ordering::SeqCst);
                })
            };
            let deliverer = {
                let (b, done) = (b.clone(), done.clone());
                tokio::spawn(async move {
                    let delivered = outcome(&[(0, RcptResult::Delivered)]);
                    while !done.load(Ordering::SeqCst) {
                        let jobs = b
                            .take(domain, 3, "node-b", Duration::from_secs(60))
                            .await
                            .unwrap();
                        for (record, _) in jobs {
                            let t0 = record.received_ms;
                            complete(&*b, &record.id, domain, &delivered, t0).await;
                        }
                    }
                })
            };
            inserter.await.unwrap();
            deliverer.await.unwrap();
            let counts = a.counts().await.unwrap();
            let active: bool = redis::cmd("SISMEMBER")
                .arg(ACTIVE_KEY)
                .arg(domain)
                .query_async(&mut conn)
                .await
                .unwrap();
            let in_ready: i64 = redis::cmd("ZCARD")
                .arg(domain_keys(domain).ready)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(
                active,
                counts.ready + counts.in_flight + counts.deferred > 0,
                "round {round}: {counts:?}"
            );
            if in_ready > 0 {
                assert_eq!(a.ready_domains().await.unwrap(), [domain], "round {round}");
            }
            // Drain for the next round.
            loop {
                let jobs = b
                    .take(domain, 100, "node-b", Duration::from_secs(60))
                    .await
                    .unwrap();
                if jobs.is_empty() {
                    break;
                }
                let delivered = outcome(&[(0, RcptResult::Delivered)]);
                for (record, _) in jobs {
                    let t0 = record.received_ms;
                    complete(&*b, &record.id, domain, &delivered, t0).await;
                }
            }
            let active: bool = redis::cmd("SISMEMBER")
                .arg(ACTIVE_KEY)
                .arg(domain)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(!active, "round {round}: empty, so no longer listed");
        }
    }

    /// An index entry without a record (a `complete` that died between its
    /// steps) never hides expired mail from the sweep: 1 500 such entries,
    /// older than anything else, are cleaned on the way to the message.
    #[tokio::test]
    async fn orphaned_index_entries_do_not_stop_expiry() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let mut conn = raw(&server).await;
        let t0 = message(1, 100).record.received_ms;
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(INDEX_KEY);
        for n in 0..1500u64 {
            zadd.arg(t0 - 10_000 + n)
                .arg(MessageId::new(t0 - 10_000 + n, n).as_str());
        }
        zadd.query_async::<()>(&mut conn).await.unwrap();
        queue(&spool, &s, 1..2).await;

        let policy = policy();
        let now = now_ms();
        let expired = s.expire(now, &policy, None).await.unwrap();
        let ids: HashSet<_> = expired.iter().map(|c| c.record.id.clone()).collect();
        assert_eq!(ids, HashSet::from([message(1, 100).record.id]));
        assert!(expired.last().unwrap().message_done());
        let left: i64 = redis::cmd("ZCARD")
            .arg(INDEX_KEY)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(left, 0, "the orphans are cleaned, the message is done");
    }

    /// A record this release cannot read (here: a newer record version)
    /// is set aside once and skipped; the rescan, the domain and the
    /// expiry sweep go on with the others.
    #[tokio::test]
    async fn an_unreadable_record_is_set_aside_and_the_rest_goes_on() {
        let server = RedisServer::start();
        let (spool, s) = node(&server).await;
        let conn = raw(&server).await;
        let batch: Vec<_> = (0..8).map(|n| message(n, 100)).collect();
        spool.store(batch.clone()).await.unwrap();
        let corrupt = |n: u64| {
            let mut conn = conn.clone();
            async move {
                redis::cmd("SETRANGE")
                    .arg(record_key(&crate::spool::suite::id(n)))
                    .arg(0)
                    .arg(&[99u8][..])
                    .query_async::<()>(&mut conn)
                    .await
                    .unwrap();
            }
        };
        corrupt(3).await;
        // The rescan.
        let (page, next) = spool.list_page(None, 100).await.unwrap();
        let ids: Vec<u64> = (0..8).filter(|n| *n != 3).collect();
        assert_eq!(
            page.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
            ids.iter()
                .map(|&n| crate::spool::suite::id(n))
                .collect::<Vec<_>>()
        );
        assert_eq!(next, None);
        // A domain: example.org holds messages 0, 2, 5 and 6.
        corrupt(5).await;
        s.insert(
            batch.iter().map(|m| m.record.clone()).collect(),
            u64::MAX / 2,
        )
        .await
        .unwrap();
        let jobs = s
            .take("example.org", 10, "node-a", Duration::from_secs(60))
            .await
            .unwrap();
        let taken: Vec<_> = jobs.iter().map(|(r, _)| r.id.clone()).collect();
        assert_eq!(
            taken,
            [0, 2, 6].map(crate::spool::suite::id).to_vec(),
            "3 is gone from the index, 5 is set aside"
        );
        for (record, _) in &jobs {
            s.release(&record.id, "example.org").await.unwrap();
        }
        // The expiry sweep.
        corrupt(7).await;
        let policy = policy();
        let expired = s.expire(now_ms(), &policy, None).await.unwrap();
        let ids: HashSet<_> = expired.iter().map(|c| c.record.id.clone()).collect();
        let want: HashSet<_> = [0, 1, 2, 4, 6]
            .map(crate::spool::suite::id)
            .into_iter()
            .collect();
        assert_eq!(ids, want);
        // What is left of 3, 5 and 7 in other domains goes when taken.
        for domain in ["example.net", "example.com"] {
            assert!(s
                .take(domain, 10, "node-a", Duration::from_secs(60))
                .await
                .unwrap()
                .is_empty());
        }
        // Listed for operators, oldest first, with the reason.
        let listed = spool.quarantined(100).await.unwrap();
        let at: Vec<_> = listed.iter().map(|q| q.location.clone()).collect();
        assert_eq!(at, [3, 5, 7].map(|n| crate::spool::suite::id(n).0).to_vec());
        for q in &listed {
            assert!(q.reason.contains("version 99"), "{q:?}");
            assert!(q.bytes > 100, "record and body: {q:?}");
        }
        assert_eq!(s.counts().await.unwrap(), empty_counts());
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

    /// An attempt whose record is written is in the delivery log even when
    /// the domain step after the record write fails: the retry finds the
    /// delivery finished and logs nothing, so the first call must.
    #[actix::test]
    async fn an_outcome_the_server_refuses_for_a_while_is_recorded_and_logged_once() {
        use crate::delivery::MessageOutcome;
        use crate::delivery_log::DeliveryLog;
        use crate::queue::{DeliverySettings, Enqueue, Queue, Report, Take};
        use actix::Actor;

        let server = RedisServer::start();
        let (spool, schedule) = node(&server).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.log");
        let mut settings = DeliverySettings::default();
        // The test messages were received in 2023.
        settings.retry.max_lifetime = Duration::from_secs(100 * 365 * 86400);
        settings.log = Some(DeliveryLog::open(&path).unwrap());
        let queue = Queue::new(spool.clone())
            .with_settings(settings)
            .with_schedule(schedule, "node-a", Duration::from_secs(60))
            .start();
        let new = message(0, 100);
        let id = new.record.id.clone();
        let domain = new.record.deliveries[0].domain.clone();
        queue.send(Enqueue(new)).await.unwrap().unwrap();
        let jobs = queue
            .send(Take {
                domain: domain.clone(),
                max: 10,
            })
            .await
            .unwrap();
        let (record, delivery) = jobs.into_iter().next().expect("the delivery is due");

        // For a second the server refuses every key but the message's. On
        // one server the record and the domain change in one script, so
        // nothing is written until both can be: the completion is tried
        // again meanwhile, and its outcome recorded and logged once.
        let url = server.url();
        let acl = move |keys: &'static str| {
            let url = url.clone();
            async move {
                let mut conn = redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let mut cmd = redis::cmd("ACL");
                cmd.arg("SETUSER").arg("default");
                match keys {
                    "all" => cmd.arg("allkeys"),
                    some => cmd.arg("resetkeys").arg(some),
                };
                cmd.query_async::<()>(&mut conn).await.unwrap();
            }
        };
        acl("~smarthost:{m:*").await;
        let restore = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            acl("all").await;
        });
        let outcome = MessageOutcome::all_of(
            &record,
            delivery,
            RcptResult::Delivered,
            "250 2.0.0 queued",
            Duration::ZERO,
        );
        queue
            .send(Report {
                id: id.clone(),
                domain: domain.clone(),
                outcome,
            })
            .await
            .unwrap();
        restore.await.unwrap();

        let stored = spool.list().await.unwrap();
        assert!(
            stored
                .iter()
                .all(|r| r.id != id || r.deliveries.iter().all(|d| d.domain != domain)),
            "the outcome is recorded: {stored:#?}"
        );
        let log = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(id.as_str())).collect();
        assert_eq!(
            lines.len(),
            record.deliveries[delivery].recipients.len(),
            "one line per recipient of the attempt: {log}"
        );
    }
}
