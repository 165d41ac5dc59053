//! The `Queue` actor: hears of the messages the storers take into the spool
//! ([`crate::storer`]), hands due deliveries to the throttles and records
//! what became of them.
//!
//! Record changes after delivery attempts are written with one write in
//! flight, the next one taking every message changed meanwhile (group
//! commit, like the storers' stores). The scheduling lives behind the
//! [`Schedule`] trait (in memory, or shared in Redis); the actor only moves
//! messages between it, the spool and its peers.
//!
//! # Ordering
//!
//! Schedule calls are asynchronous (a Redis round trip). The actor awaits
//! each one inside an actor future and changes its own state (announcing
//! domains, marking a message for the record writer) only in the
//! continuation, after the call has resolved; it never waits with the
//! mailbox closed (`ctx.wait`), which would hold every enqueue behind a
//! round trip. Continuations of different messages may therefore run in
//! any order, and the writer is built so that this does not matter: it
//! keeps *ids*, not records, and reads each message's current record from
//! the schedule ([`Schedule::records`]) when it writes. A `complete` is
//! applied before its id is marked dirty, so every write started after
//! the mark carries that outcome (or a later one); two outcomes of one
//! message that resolve in either order both end in a write of the newest
//! record, never of a stale one.

use crate::now_ms;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use rand::seq::SliceRandom;
use smarthost_coordinator::membership::holder_node;
use smarthost_coordinator::LeaderTick;
use smarthost_proto::envelope::{MessageId, MessageRecord};
use tokio::sync::oneshot;

use crate::body_cache::BodyCache;
use crate::bounce::{self, ReportSettings};
use crate::delivery::{MessageOutcome, RcptResult};
use crate::delivery_log::DeliveryLog;
use crate::dispatcher::DomainReady;
use crate::schedule::{MemorySchedule, ReadyNews, ReportHook, Reporter, Schedule};
use crate::scheduler::{Completion, RetryPolicy};
use crate::spool::{Change, ListCursor, NewMessage, Spool, SpoolError};
pub use crate::storer::BatchLimits;
use crate::storer::{StoreCounts, Stored, Storer, StorerEnv};
use crate::webhooks::Webhooks;

/// Stores a new message; answers once it is durable.
#[derive(Message)]
#[rtype(result = "Result<(), SpoolError>")]
pub struct Enqueue(pub NewMessage);

/// Reads what the spool holds (at startup) and schedules it: every record,
/// oldest first (shared with the spool and the schedule, not copied).
#[derive(Message)]
#[rtype(result = "Result<Vec<Arc<MessageRecord>>, SpoolError>")]
pub struct Recover;

/// Current counts of the queue.
#[derive(Message)]
#[rtype(result = "QueueStats")]
pub struct Stats;

/// One queued message, for the operator; `None`: it is not (or no longer)
/// queued.
#[derive(Message)]
#[rtype(result = "Result<Option<MessageView>, SpoolError>")]
pub struct ShowMessage(pub MessageId);

/// One page of the queue's messages, for the operator. Each page costs
/// what it lists, whatever the length of the queue: the whole queue is
/// paged through the spool's receive-order index, a domain through the
/// schedule's per-domain listing.
#[derive(Message)]
#[rtype(result = "Result<MessagePage, SpoolError>")]
pub struct ListMessages {
    pub listing: Listing,
    pub limit: usize,
}

/// Deletes a message from the queue: its deliveries not in flight fail at
/// once with [`DELETED`], reported to the sender when `notify`; those in
/// flight finish their attempt. `None`: the message is not queued.
#[derive(Message)]
#[rtype(result = "Result<Option<Deleted>, SpoolError>")]
pub struct DeleteMessage {
    pub id: MessageId,
    pub notify: bool,
    /// Only the message's delivery to this domain (a delete by domain).
    pub only: Option<String>,
}

/// What a delete did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deleted {
    pub id: String,
    /// Recipients failed now.
    pub recipients: usize,
    /// Deliveries (one per destination domain) left to the attempt under way.
    pub in_flight: usize,
    /// Whether the sender gets a report of the deleted recipients.
    pub notified: bool,
}

/// The failure of a deleted recipient, in the delivery log and the report.
pub const DELETED: &str = "deleted from the queue by an operator";

/// Makes a message's deferred deliveries due now; answers how many
/// (`None`: the message is not queued).
#[derive(Message)]
#[rtype(result = "Result<Option<usize>, SpoolError>")]
pub struct RetryMessage(pub MessageId);

/// An index of the schedule that lists messages by id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Index {
    /// The messages with a delivery pending in a domain
    /// ([`Schedule::domain_messages`]).
    Domain(String),
    /// The pending messages of a sender ([`Schedule::sender_messages`]).
    Sender(String),
}

/// Up to `limit` messages of `index`, in id order after `after`: one page
/// of its listing, ids only.
#[derive(Message)]
#[rtype(result = "Result<Vec<MessageId>, SpoolError>")]
pub struct IndexedMessages {
    pub index: Index,
    pub after: Option<MessageId>,
    pub limit: usize,
}

/// Makes the deferred deliveries of `ids` in `domain` due now (a page of
/// an operator's retry of a domain); answers how many.
#[derive(Message)]
#[rtype(result = "Result<usize, SpoolError>")]
pub struct RetryIn {
    pub domain: String,
    pub ids: Vec<MessageId>,
}

/// Takes back a message the spool set aside ([`Spool::replay_quarantined`])
/// and schedules its deliveries; `None`: nothing is set aside there.
#[derive(Message)]
#[rtype(result = "Result<Option<Replayed>, SpoolError>")]
pub struct ReplayQuarantined(pub String);

/// What a replay took back.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Replayed {
    pub location: String,
    /// The queue id of the message taken back.
    pub id: String,
    /// Its deliveries (one per destination domain) scheduled again.
    pub deliveries: usize,
}

/// Opens the delivery log file again, for log rotation (SIGHUP).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReopenLog;

/// Tells the queue where to announce domains with due work.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach(pub Recipient<DomainReady>);

/// Up to `max` due deliveries of `domain`; they are in flight until
/// reported or released.
#[derive(Message)]
#[rtype(result = "Vec<(Arc<MessageRecord>, usize)>")]
pub struct Take {
    pub domain: String,
    pub max: usize,
}

/// The outcome of an attempt; answered once it is in the spool (with the
/// reports it calls for), or after [`WRITE_PATIENCE`] of failed writes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Report {
    pub id: MessageId,
    pub domain: String,
    pub outcome: MessageOutcome,
}

/// An in-flight delivery handed back untried.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release {
    pub id: MessageId,
    pub domain: String,
}

/// Stops handing out deliveries; `done` hears once every delivery handed
/// out so far is reported or released (its outcome in the spool), so that
/// a node that stops leaves nothing to be sent again.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain(pub oneshot::Sender<()>);

/// Holds (or, with `false`, releases) a domain's deliveries.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Suspend {
    pub domain: String,
    pub suspended: bool,
}

/// The reports a completion of this message calls for are built (its
/// body may go): they are written with the message's next record write,
/// and `done` hears when both are in the spool.
#[derive(Message)]
#[rtype(result = "()")]
struct Reported {
    id: MessageId,
    reports: Vec<NewMessage>,
    done: oneshot::Sender<()>,
}

/// What [`Stats`] answers (and the admin API's `GET /api/v1/queue`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    /// Messages with deliveries left.
    pub messages: usize,
    /// Deliveries (message × destination domain) left, by domain.
    pub deliveries_by_domain: BTreeMap<String, usize>,
    /// How long the oldest message with a delivery pending in each domain
    /// has waited, in seconds (absent from older nodes' answers).
    #[serde(default)]
    pub oldest_age_by_domain: BTreeMap<String, u64>,
    pub ready: usize,
    pub deferred: usize,
    pub in_flight: usize,
    /// Deliveries in flight by the node delivering them. The queue itself
    /// belongs to no node on Redis: any node takes any ready delivery
    /// (absent from older nodes' answers).
    #[serde(default)]
    pub in_flight_by_node: BTreeMap<String, usize>,
    /// Enqueues waiting for a store call.
    pub waiting: usize,
    /// Store calls made so far.
    pub store_calls: u64,
    /// Domains an operator suspended (absent from older nodes' answers).
    #[serde(default)]
    pub suspended: BTreeSet<String>,
    /// Entries of delivery reports recorded but not known to be queued
    /// (Redis backend); the leader's next passes queue or drop them.
    #[serde(default)]
    pub pending_reports: usize,
}

/// Messages whose record changed and must be written, one write in flight.
#[derive(Debug, Default)]
struct RecordWriter {
    dirty: BTreeSet<MessageId>,
    /// Who waits for each message's write, since when.
    waiters: HashMap<MessageId, Vec<(Instant, oneshot::Sender<()>)>>,
    /// Messages a report being built still needs: not written until
    /// unpinned (their body must stay, and their record must not go to
    /// the spool before the report). Shared with the write under way,
    /// which looks at them when it reads the records.
    pins: Pins,
    /// Delivery reports that go into the spool in the same write as the
    /// record of the message they are about: the outcome is not final
    /// until its report is durable, and a crash cannot keep one without
    /// the other.
    reports: HashMap<MessageId, Vec<NewMessage>>,
    in_flight: bool,
    /// Writes failed in a row, for the backoff.
    failures: u32,
}

/// The first wait after a failed record write; it doubles up to
/// [`WRITE_RETRY_MAX`].
const WRITE_RETRY: Duration = Duration::from_millis(500);
const WRITE_RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a [`Report`] waits for a record write that keeps failing
/// before it is answered anyway (the writer keeps trying): a delivery
/// actor must not hold its connection slot for as long as a disk is full.
const WRITE_PATIENCE: Duration = Duration::from_secs(30);

/// The most stored messages kept in memory to be scheduled again after a
/// failed insert; beyond that a rescan finds them.
const UNSCHEDULED_LIMIT: usize = 10_000;

/// How many reports being built need each message.
#[derive(Clone, Debug, Default)]
struct Pins(Arc<std::sync::Mutex<HashMap<MessageId, usize>>>);

impl Pins {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MessageId, usize>> {
        // Never held across an await; a panic elsewhere leaves plain data.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pin(&self, id: &MessageId) {
        *self.lock().entry(id.clone()).or_default() += 1;
    }

    fn unpin(&self, id: &MessageId) {
        let mut pins = self.lock();
        if let Some(count) = pins.get_mut(id) {
            *count -= 1;
            if *count == 0 {
                pins.remove(id);
            }
        }
    }

    fn contains(&self, id: &MessageId) -> bool {
        self.lock().contains_key(id)
    }
}

/// Senders block on a full mailbox (`send().await`) instead of piling up.
const MAILBOX_CAPACITY: usize = 1024;

/// How often due retries are promoted and domains with work re-announced:
/// a throttle that missed an announcement hears again within a tick, and
/// so does a node whose throttle went idle while other nodes kept the
/// domain's line busy (ready news comes only when a line was empty).
const TICK: Duration = Duration::from_millis(500);

/// How often every pending delivery is checked against `max_lifetime`.
const EXPIRY_SWEEP: Duration = Duration::from_secs(30);

/// How long a delivery handed out by [`Take`] stays this node's before a
/// shared schedule gives it to another node.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(15 * 60);

/// The longest between two renewals of this node's leases.
const LEASE_CHECK: Duration = Duration::from_secs(5);

/// Messages a rescan lists per step (one step per leader tick).
const RESCAN_PAGE: usize = 2000;

/// What happens after delivery: retries, reports and the delivery log.
pub struct DeliverySettings {
    pub retry: RetryPolicy,
    pub reports: ReportSettings,
    pub log: Option<DeliveryLog>,
    /// Written before the outcomes they report ([`crate::webhooks`]).
    pub webhooks: Option<Webhooks>,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        let queue = crate::config::QueueConfig::default();
        DeliverySettings {
            retry: RetryPolicy {
                intervals: queue.retry_intervals,
                max_lifetime: queue.max_lifetime,
                delay_notification: queue.delay_notification,
            },
            reports: ReportSettings::default(),
            log: None,
            webhooks: None,
        }
    }
}

pub struct Queue {
    spool: Arc<dyn Spool>,
    /// The most one store call takes, for the storers.
    limits: BatchLimits,
    /// Counted by every storer of the node.
    store_counts: Arc<StoreCounts>,
    /// Stores what is enqueued here (off the connection threads).
    storer: Option<Addr<Storer>>,
    schedule: Arc<dyn Schedule>,
    /// Who holds the leases of what this queue takes.
    holder: String,
    lease: Duration,
    /// How often stored messages are scheduled again (idempotent) in case
    /// a store was not followed by its schedule insert; `None`: never.
    rescan: Option<Duration>,
    /// A tick is running (a slow backend must not pile them up).
    ticking: bool,
    /// Whether the cluster-wide jobs (reclaim, promote, expire, rescan)
    /// run when the coordinator says this node leads ([`LeaderTick`])
    /// rather than on this queue's own timers.
    led: bool,
    /// The leader's jobs are running.
    leading_busy: bool,
    last_sweep: Option<Instant>,
    /// An expiry sweep is running: never two at once.
    sweeping: bool,
    /// When the last rescan finished.
    last_rescan: Option<Instant>,
    /// Where the rescan under way goes on.
    rescan_cursor: Option<ListCursor>,
    rescanning: bool,
    writer: RecordWriter,
    settings: DeliverySettings,
    dispatcher: Option<Recipient<DomainReady>>,
    /// Domains to announce to the dispatcher, oldest first, each once.
    announcements: Announcements,
    /// Deliveries handed out and not yet reported or released.
    in_flight: usize,
    /// Stored messages whose schedule insert failed, inserted again on the
    /// next ticks.
    unscheduled: Vec<Arc<MessageRecord>>,
    /// An insert of `unscheduled` is under way.
    inserting: bool,
    /// Set by [`Drain`]: nothing more is handed out, and these hear when
    /// `in_flight` is down to zero.
    draining: Option<Vec<oneshot::Sender<()>>>,
    /// Where stored bodies wait for their first delivery.
    bodies: Arc<BodyCache>,
}

/// Domains with due work that the dispatcher has not heard of yet. Each
/// domain waits here at most once however often it is announced, and one
/// announcement at a time goes to the dispatcher (`send().await`): a busy
/// dispatcher makes this set grow, bounded by the number of domains, and
/// nothing is dropped.
#[derive(Debug, Default)]
struct Announcements {
    order: VecDeque<String>,
    waiting: HashSet<String>,
    sending: bool,
}

impl Announcements {
    fn push(&mut self, domain: String) {
        if self.waiting.insert(domain.clone()) {
            self.order.push_back(domain);
        }
    }

    /// The next domain to send, unless one is on its way.
    fn next(&mut self) -> Option<String> {
        if self.sending {
            return None;
        }
        let domain = self.order.pop_front()?;
        self.waiting.remove(&domain);
        self.sending = true;
        Some(domain)
    }
}

impl Queue {
    pub fn new(spool: Arc<dyn Spool>) -> Self {
        Queue::with_limits(spool, BatchLimits::default())
    }

    pub fn with_limits(spool: Arc<dyn Spool>, limits: BatchLimits) -> Self {
        Queue {
            spool,
            limits,
            store_counts: Arc::default(),
            storer: None,
            schedule: Arc::new(MemorySchedule::default()),
            holder: "local".to_string(),
            lease: DEFAULT_LEASE,
            rescan: None,
            ticking: false,
            led: false,
            leading_busy: false,
            last_sweep: None,
            sweeping: false,
            last_rescan: None,
            rescan_cursor: None,
            rescanning: false,
            writer: RecordWriter::default(),
            settings: DeliverySettings::default(),
            dispatcher: None,
            announcements: Announcements::default(),
            in_flight: 0,
            unscheduled: Vec::new(),
            inserting: false,
            draining: None,
            bodies: Arc::new(BodyCache::new(0)),
        }
    }

    /// What the storers of this queue share; they tell `queue` of what
    /// they store.
    fn storer_env(&self, queue: Recipient<Stored>) -> StorerEnv {
        StorerEnv {
            spool: self.spool.clone(),
            schedule: self.schedule.clone(),
            bodies: self.bodies.clone(),
            limits: self.limits,
            counts: self.store_counts.clone(),
            queue,
        }
    }

    /// Starts the queue, and answers what the storers of the connection
    /// threads need ([`crate::storer::Stores::start`]).
    pub fn start_with_storer_env(self) -> (Addr<Queue>, StorerEnv) {
        let mut env = None;
        let queue = Queue::create(|ctx| {
            env = Some(self.storer_env(ctx.address().recipient()));
            self
        });
        (queue, env.expect("set when the queue is created"))
    }

    /// Keeps the bodies it stores in `bodies` (shared, not copied), for the
    /// deliveries that read them there.
    pub fn with_body_cache(mut self, bodies: Arc<BodyCache>) -> Self {
        self.bodies = bodies;
        self
    }

    pub fn with_settings(mut self, settings: DeliverySettings) -> Self {
        self.settings = settings;
        self
    }

    /// Names the node in the leases it takes and in the queue's counts
    /// (`with_schedule` names it for a shared schedule).
    pub fn with_holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self
    }

    /// Schedules with `schedule` (the default: in memory), taking
    /// deliveries under leases of `holder` that last `lease`.
    pub fn with_schedule(
        mut self,
        schedule: Arc<dyn Schedule>,
        holder: impl Into<String>,
        lease: Duration,
    ) -> Self {
        self.schedule = schedule;
        self.holder = holder.into();
        self.lease = lease;
        self
    }

    /// Every `every`, lists the spool and schedules what it holds again
    /// (`Schedule::insert` skips what is already queued or in flight), so
    /// that a message stored but not scheduled (the insert failed, or the
    /// node stopped in between) is delivered all the same.
    pub fn with_rescan(mut self, every: Duration) -> Self {
        self.rescan = Some(every);
        self
    }

    /// Leaves the cluster-wide jobs to the coordinator: they run on
    /// [`LeaderTick`]s, on the one node that leads, instead of on every
    /// node's timers.
    pub fn led_by_coordinator(mut self) -> Self {
        self.led = true;
        self
    }

    /// Tells the dispatcher which domains have due work: queued (once per
    /// domain) and sent one at a time, each send waiting for room in the
    /// dispatcher's mailbox, so no announcement is lost.
    fn announce(&mut self, domains: Vec<String>, ctx: &mut Context<Self>) {
        if self.dispatcher.is_none() {
            return;
        }
        for domain in domains {
            self.announcements.push(domain);
        }
        self.send_announcement(ctx);
    }

    fn send_announcement(&mut self, ctx: &mut Context<Self>) {
        let Some(dispatcher) = self.dispatcher.clone() else {
            return;
        };
        let Some(domain) = self.announcements.next() else {
            return;
        };
        let send = async move { dispatcher.send(DomainReady(domain)).await };
        ctx.spawn(send.into_actor(self).map(|sent, queue, ctx| {
            queue.announcements.sending = false;
            if let Err(error) = sent {
                // The dispatcher stopped (the node is stopping).
                tracing::warn!(%error, "cannot announce domains to the dispatcher");
                queue.announcements.order.clear();
                queue.announcements.waiting.clear();
            }
            queue.send_announcement(ctx);
        }));
    }

    /// Announces every domain with due work; unless the coordinator runs
    /// them, first takes back work whose lease ran out and promotes due
    /// retries.
    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.insert_unscheduled(ctx);
        if self.ticking || (self.led && self.dispatcher.is_none()) {
            // Nothing to announce to (`smarthost coordinator`).
            return;
        }
        self.ticking = true;
        let schedule = self.schedule.clone();
        let housekeeping = !self.led;
        let work = async move {
            if housekeeping {
                schedule.reclaim_expired_leases().await?;
                schedule.promote(now_ms()).await?;
            }
            schedule.ready_domains().await
        };
        ctx.spawn(work.into_actor(self).map(|due, queue, ctx| {
            queue.ticking = false;
            match due {
                Ok(mut due) => {
                    // Each node in its own order: domains wait in line for
                    // the node's connection slots in the order they are
                    // announced, and nodes that all went down one list
                    // would all serve its first domains first.
                    due.shuffle(&mut rand::rng());
                    queue.announce(due, ctx)
                }
                Err(error) => tracing::warn!(%error, "cannot promote due deliveries"),
            }
        }));
    }

    /// Keeps stored messages whose schedule insert failed for the next
    /// ticks, up to [`UNSCHEDULED_LIMIT`]; past that they wait for a rescan.
    fn keep_unscheduled(&mut self, records: Vec<Arc<MessageRecord>>) {
        let room = UNSCHEDULED_LIMIT.saturating_sub(self.unscheduled.len());
        if records.len() > room {
            tracing::warn!(
                messages = records.len() - room,
                "too many stored messages wait to be scheduled; the rest wait for a rescan"
            );
        }
        self.unscheduled.extend(records.into_iter().take(room));
    }

    /// Inserts again what was stored but could not be scheduled (an insert
    /// is idempotent): a message the client was told is queued does not
    /// wait for the leader's rescan, which may be minutes away.
    fn insert_unscheduled(&mut self, ctx: &mut Context<Self>) {
        if self.inserting || self.unscheduled.is_empty() {
            return;
        }
        self.inserting = true;
        let records = std::mem::take(&mut self.unscheduled);
        let schedule = self.schedule.clone();
        let insert = async move {
            let result = schedule.insert_shared(records.clone(), now_ms()).await;
            (records, result)
        };
        ctx.spawn(
            insert
                .into_actor(self)
                .map(|(records, result), queue, ctx| {
                    queue.inserting = false;
                    match result {
                        Ok(domains) => {
                            tracing::info!(messages = records.len(), "stored messages scheduled");
                            queue.announce(domains, ctx);
                        }
                        Err(error) => {
                            tracing::debug!(%error, "cannot schedule stored messages yet");
                            queue.keep_unscheduled(records);
                        }
                    }
                }),
        );
    }

    /// Extends the leases of the deliveries this node is running.
    fn renew_leases(&mut self, _: &mut Context<Self>) {
        let schedule = self.schedule.clone();
        let (holder, lease) = (self.holder.clone(), self.lease);
        actix::spawn(async move {
            if let Err(error) = schedule.renew_leases(&holder, lease).await {
                tracing::warn!(%error, "cannot renew the leases of running deliveries");
            }
        });
    }

    /// Schedules the next page of stored messages again (see
    /// [`Queue::with_rescan`]); a rescan is one page per call, from the
    /// oldest message to the newest, so a large queue is never listed at
    /// once. A failed page is tried again on the next call.
    fn rescan(&mut self, ctx: &mut Context<Self>) {
        if self.rescanning {
            return;
        }
        self.rescanning = true;
        let spool = self.spool.clone();
        let schedule = self.schedule.clone();
        let after = self.rescan_cursor.clone();
        let work = async move {
            let (records, next) = spool.list_page(after.as_ref(), RESCAN_PAGE).await?;
            let domains = schedule.insert(records, now_ms()).await?;
            Ok::<_, SpoolError>((domains, next))
        };
        ctx.spawn(work.into_actor(self).map(|result, queue, ctx| {
            queue.rescanning = false;
            match result {
                Ok((domains, next)) => {
                    queue.announce(domains, ctx);
                    queue.rescan_cursor = next;
                    if queue.rescan_cursor.is_none() {
                        queue.last_rescan = Some(Instant::now());
                    } else if !queue.led {
                        // On its own timer, a rescan runs to the end.
                        queue.rescan(ctx);
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot check the spool for unscheduled messages")
                }
            }
        }));
    }

    /// `n` deliveries handed out are over (or were never handed out);
    /// answers a drain once none is left.
    fn finished(&mut self, n: usize) {
        self.in_flight = self.in_flight.saturating_sub(n);
        if self.in_flight == 0 {
            for done in self
                .draining
                .iter_mut()
                .flat_map(|waiting| waiting.drain(..))
            {
                let _ = done.send(());
            }
        }
    }

    /// Builds and queues reports for a schedule that writes records itself.
    fn report_hook(&self, ctx: &Context<Self>) -> ReportHook {
        Arc::new(QueueReporter {
            spool: self.spool.clone(),
            settings: self.settings.reports.clone(),
            queue: ctx.address(),
            webhooks: self.settings.webhooks.clone(),
        })
    }

    /// Queues reports kept with records and not queued yet, then fails
    /// deliveries past their lifetime. A schedule that writes records
    /// writes the reports with them ([`Reporter`]); otherwise the reports
    /// and the records follow here.
    fn sweep_expired(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        self.sweeping = true;
        let schedule = self.schedule.clone();
        let policy = self.settings.retry.clone();
        let hook = schedule.writes_records().then(|| self.report_hook(ctx));
        let expire = async move {
            if let Some(hook) = &hook {
                if let Err(error) = schedule.send_pending_reports(hook).await {
                    tracing::warn!(%error, "cannot queue pending delivery reports");
                }
            }
            schedule.expire(now_ms(), &policy, hook.as_ref()).await
        };
        ctx.spawn(expire.into_actor(self).map(|expired, queue, ctx| {
            queue.sweeping = false;
            match expired {
                Ok(expired) => queue.expired(expired, ctx),
                Err(error) => tracing::warn!(%error, "cannot expire old deliveries"),
            }
        }));
    }

    fn expired(&mut self, expired: Vec<Completion>, ctx: &mut Context<Self>) {
        if expired.len() >= crate::schedule::redis::EXPIRY_BATCH {
            // More may be waiting: the next leader tick sweeps again.
            self.last_sweep = None;
        }
        for completion in &expired {
            tracing::info!(
                message_id = %completion.record.id,
                domain = %completion.domain,
                "delivery expired"
            );
            self.log(completion, None);
        }
        if self.schedule.writes_records() {
            return;
        }
        let events = self.record_events(&expired);
        let follow = events.into_actor(self).map(|(), queue, ctx| {
            for completion in merge_by_message(expired) {
                let done = queue.follow_up(completion, true, ctx);
                ctx.spawn(done.into_actor(queue));
            }
        });
        ctx.spawn(follow);
    }

    /// Writes the webhook events of outcomes that this queue writes itself
    /// (not through a [`Reporter`]), before it writes them. An outbox that
    /// fails is tried again for a while; past that the outcomes are
    /// written all the same, the events counted as lost: a delivery made
    /// is not undone, and not made again.
    fn record_events(
        &self,
        completions: &[Completion],
    ) -> impl std::future::Future<Output = ()> + 'static {
        let webhooks = self.settings.webhooks.clone();
        let completions = webhooks
            .as_ref()
            .map(|_| completions.to_vec())
            .unwrap_or_default();
        async move {
            let Some(webhooks) = webhooks else {
                return;
            };
            let mut wait = WRITE_RETRY;
            let deadline = Instant::now() + WRITE_PATIENCE;
            loop {
                match webhooks.record_outcomes(&completions).await {
                    Ok(()) => return,
                    Err(error) if Instant::now() + wait < deadline => {
                        tracing::warn!(%error, "webhook events not recorded yet; trying again");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(WRITE_RETRY_MAX);
                    }
                    Err(error) => {
                        let events: usize = completions.iter().map(|c| c.notes.len()).sum();
                        tracing::error!(%error, events, "webhook events not recorded");
                        crate::metrics::webhook_events_lost(events);
                        return;
                    }
                }
            }
        }
    }

    /// Counts and logs a recorded outcome: once per completion.
    fn log(&mut self, completion: &Completion, outcome: Option<&MessageOutcome>) {
        crate::metrics::outcomes(completion, outcome, now_ms());
        if let Some(log) = &mut self.settings.log {
            if let Err(error) = log.write(completion, outcome) {
                tracing::warn!(%error, "cannot write the delivery log");
            }
        }
    }

    /// After a record write: answers those who waited for it, keeps what
    /// must be written again and starts the next write (at once, or after
    /// a backoff if this one failed).
    fn written(&mut self, outcome: WriteOutcome, ctx: &mut Context<Self>) {
        self.writer.in_flight = false;
        self.announce(outcome.domains, ctx);
        self.writer.dirty.extend(outcome.later);
        for (id, reports) in outcome.reports {
            self.writer.reports.entry(id).or_default().extend(reports);
        }
        let mut retry = false;
        for (id, error) in outcome.failed {
            if let SpoolError::NotFound(_) = error {
                // Gone from the spool already: removed by the write of an
                // earlier completion of the same message, or deleted by an
                // operator. Nothing is left to write.
                tracing::debug!(message_id = %id, "message already gone from the spool");
                continue;
            }
            // The spool keeps the previous state: after a restart the
            // attempt is repeated (at-least-once). Try again after a while.
            tracing::error!(message_id = %id, %error, "cannot record a delivery outcome");
            self.writer.dirty.insert(id);
            retry = true;
        }
        for id in outcome.written {
            if self.writer.dirty.contains(&id) {
                continue;
            }
            for (_, waiter) in self.writer.waiters.remove(&id).unwrap_or_default() {
                let _ = waiter.send(());
            }
        }
        if !retry {
            self.writer.failures = 0;
            self.write_next(ctx);
            return;
        }
        // Those who waited too long hear now; the writer keeps trying.
        let now = Instant::now();
        for waiters in self.writer.waiters.values_mut() {
            waiters.retain_mut(|(since, _)| now.duration_since(*since) < WRITE_PATIENCE);
        }
        self.writer.waiters.retain(|_, waiters| !waiters.is_empty());
        let wait = WRITE_RETRY
            .saturating_mul(1 << self.writer.failures.min(6))
            .min(WRITE_RETRY_MAX);
        self.writer.failures += 1;
        ctx.run_later(wait, |queue, ctx| queue.write_next(ctx));
    }

    /// Builds the reports a completion calls for, then writes them and the
    /// message's new state in one spool write; the future ends when that
    /// is durable (or the write kept failing for [`WRITE_PATIENCE`]).
    /// `reports: false` (an operator's silent delete) writes the state
    /// alone.
    fn follow_up(
        &mut self,
        completion: Completion,
        reports: bool,
        ctx: &mut Context<Self>,
    ) -> impl std::future::Future<Output = ()> + 'static {
        let id = completion.record.id.clone();
        let (done, is_done) = oneshot::channel();
        let addr = ctx.address();
        if reports && bounce::needs_report(&completion, &self.settings.reports) {
            self.writer.pins.pin(&id);
            let spool = self.spool.clone();
            let settings = self.settings.reports.clone();
            ctx.spawn(
                async move {
                    // The original may already be gone if another delivery
                    // finished it; the report then carries no copy.
                    let body = read_whole_body(&*spool, &id).await.unwrap_or_default();
                    let reports = bounce::reports(&completion, &body, &settings, now_ms());
                    keep_unreported(&completion, body, &settings).await;
                    let _ = addr.send(Reported { id, reports, done }).await;
                }
                .into_actor(self),
            );
        } else {
            self.persist(id, done, ctx);
        }
        async move {
            let _ = is_done.await;
        }
    }

    /// Marks a message for the record writer; `done` hears when its
    /// current state is in the spool.
    fn persist(&mut self, id: MessageId, done: oneshot::Sender<()>, ctx: &mut Context<Self>) {
        self.writer
            .waiters
            .entry(id.clone())
            .or_default()
            .push((Instant::now(), done));
        self.writer.dirty.insert(id);
        self.write_next(ctx);
    }

    /// Writes every changed message, with the reports about it, in one go
    /// if no write is in flight.
    fn write_next(&mut self, ctx: &mut Context<Self>) {
        if self.writer.in_flight || self.writer.dirty.is_empty() {
            return;
        }
        if self
            .writer
            .dirty
            .iter()
            .all(|id| self.writer.pins.contains(id))
        {
            // Unpinning asks again.
            return;
        }
        let ids: Vec<MessageId> = std::mem::take(&mut self.writer.dirty).into_iter().collect();
        let pins = self.writer.pins.clone();
        let mut reports: HashMap<MessageId, Vec<NewMessage>> = ids
            .iter()
            .filter_map(|id| Some((id.clone(), self.writer.reports.remove(id)?)))
            .collect();
        self.writer.in_flight = true;
        let spool = self.spool.clone();
        let schedule = self.schedule.clone();
        // The records as they are now: see "Ordering" above.
        let write = async move {
            let mut outcome = WriteOutcome::default();
            let records = match schedule.records(&ids).await {
                Ok(records) => records,
                Err(error) => {
                    outcome.failed = ids.into_iter().map(|id| (id, error.clone())).collect();
                    outcome.reports = reports;
                    return outcome;
                }
            };
            let mut changes = Vec::new();
            let mut with_reports = Vec::new();
            for (id, record) in ids.into_iter().zip(records) {
                // A report about this message is being built: its record
                // (read just now, in the same step) may already say the
                // delivery is over, and its body is still needed. Written
                // later, with the report.
                if pins.contains(&id) {
                    if let Some(kept) = reports.remove(&id) {
                        outcome.reports.insert(id.clone(), kept);
                    }
                    outcome.later.push(id);
                    continue;
                }
                match record {
                    Some(record) => changes.push(Change::Update(record)),
                    None => changes.push(Change::Remove(id.clone())),
                }
                if let Some(built) = reports.remove(&id) {
                    with_reports.push((id.clone(), built));
                }
                outcome.written.push(id);
            }
            if changes.is_empty() {
                return outcome;
            }
            let received = now_ms();
            let new: Vec<NewMessage> = with_reports
                .iter()
                .flat_map(|(_, built)| built.iter().cloned())
                .map(|m| received_now(m, received))
                .collect();
            let records: Vec<MessageRecord> = new.iter().map(|m| m.record.clone()).collect();
            // One call: the local spool makes the lot, reports included,
            // durable with one fsync.
            match spool.store_and_apply(new, changes).await {
                Ok(failed) => outcome.failed = failed,
                Err(error) => {
                    // Nothing written: the reports go with the next try.
                    outcome.failed = outcome
                        .written
                        .iter()
                        .map(|id| (id.clone(), error.clone()))
                        .collect();
                    outcome.reports.extend(with_reports);
                    return outcome;
                }
            }
            if !records.is_empty() {
                match schedule.insert(records, now_ms()).await {
                    Ok(domains) => outcome.domains = domains,
                    // Durable all the same; the next recovery schedules them.
                    Err(error) => tracing::error!(%error, "cannot schedule delivery reports"),
                }
            }
            outcome
        };
        ctx.spawn(write.into_actor(self).map(move |outcome, queue, ctx| {
            queue.written(outcome, ctx);
        }));
    }
}

/// What a record write did: see [`Queue::written`].
#[derive(Default)]
struct WriteOutcome {
    /// Messages written (or found gone), with the reports about them.
    written: Vec<MessageId>,
    /// Messages whose write failed; their reports are in `reports`.
    failed: Vec<(MessageId, SpoolError)>,
    /// Messages a report being built still needs: written later.
    later: Vec<MessageId>,
    /// Reports not written, to go with the next write of their message.
    reports: HashMap<MessageId, Vec<NewMessage>>,
    /// Domains the written reports made ready.
    domains: Vec<String>,
}

/// One completion per message, however many of its domains completed: the
/// notes of all of them and the latest record.
fn merge_by_message(completions: Vec<Completion>) -> Vec<Completion> {
    let mut by_message: Vec<Completion> = Vec::new();
    for completion in completions {
        match by_message
            .iter_mut()
            .find(|c| c.record.id == completion.record.id)
        {
            Some(merged) => {
                merged.notes.extend(completion.notes);
                merged.delayed.extend(completion.delayed);
                // The later record has every completion of this message applied.
                merged.record = completion.record;
            }
            None => by_message.push(completion),
        }
    }
    by_message
}

impl Actor for Queue {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        let storer = Storer::new(self.storer_env(ctx.address().recipient()));
        self.storer = Some(storer.start());
        ctx.run_interval(TICK, |queue, ctx| queue.tick(ctx));
        if self.led {
            // Sweeps and rescans run on `LeaderTick`s.
            if self.schedule.writes_records() {
                let every = (self.lease / 3).min(LEASE_CHECK);
                ctx.run_interval(every, |queue, ctx| queue.renew_leases(ctx));
            }
            return;
        }
        ctx.run_interval(EXPIRY_SWEEP, |queue, ctx| queue.sweep_expired(ctx));
        if self.schedule.writes_records() {
            // Running deliveries keep their leases; see `Schedule::renew_leases`.
            // Also puts back leases of this node that nothing here runs.
            let every = (self.lease / 3).min(LEASE_CHECK);
            ctx.run_interval(every, |queue, ctx| queue.renew_leases(ctx));
        }
        if let Some(every) = self.rescan {
            ctx.run_interval(every, |queue, ctx| queue.rescan(ctx));
        }
    }
}

/// A report stamped as received at `now` when it is stored: it may wait
/// long after it was built (across failed writes, or kept with its record),
/// and a Redis Cluster spool refuses a message received longer ago than its
/// store window (see `spool::redis`).
fn received_now(mut report: NewMessage, now: u64) -> NewMessage {
    report.record.received_ms = now;
    report
}

/// The whole body of a stored message in memory, for a report that
/// quotes it or a copy kept in badmail.
async fn read_whole_body(spool: &dyn Spool, id: &MessageId) -> Result<Vec<u8>, SpoolError> {
    let body = spool.read_body(id).await?;
    if body.rest().is_none() {
        return Ok(body.into_head());
    }
    tokio::task::spawn_blocking(move || body.to_vec())
        .await
        .map_err(|e| SpoolError::Unavailable(e.to_string()))?
}

/// Keeps in badmail the failures of a completion that no report covers
/// ([`bounce::unreported`]), before its outcome is written: a crash in
/// between keeps the same entry again, under the same name.
async fn keep_unreported(completion: &Completion, body: Vec<u8>, settings: &ReportSettings) {
    let Some(badmail) = settings.badmail.clone() else {
        return;
    };
    let Some((name, note)) = bounce::badmail_entry(completion, settings) else {
        return;
    };
    let id = completion.record.id.clone();
    match tokio::task::spawn_blocking(move || badmail.keep_once(&name, &body, note)).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => tracing::error!(message_id = %id, %error,
            "a failure no report covers could not be kept in badmail; it is only logged"),
        Err(_) => {}
    }
}

/// Builds reports from the spool's copy of the original and queues them
/// through the Queue actor, like any mail.
struct QueueReporter {
    spool: Arc<dyn Spool>,
    settings: ReportSettings,
    queue: Addr<Queue>,
    webhooks: Option<Webhooks>,
}

#[async_trait::async_trait]
impl Reporter for QueueReporter {
    async fn record_events(&self, completions: &[Completion]) -> Result<(), SpoolError> {
        match &self.webhooks {
            Some(webhooks) => webhooks
                .record_outcomes(completions)
                .await
                .map_err(SpoolError::Unavailable),
            None => Ok(()),
        }
    }

    fn needs(&self, completion: &Completion) -> bool {
        bounce::needs_report(completion, &self.settings)
    }

    async fn build(&self, completions: &[Completion]) -> Result<Vec<NewMessage>, SpoolError> {
        let mut reports = Vec::new();
        for completion in merge_by_message(completions.to_vec()) {
            if !self.needs(&completion) {
                continue;
            }
            let id = &completion.record.id;
            let body = match read_whole_body(&*self.spool, id).await {
                Ok(body) => body,
                Err(error @ SpoolError::Unavailable(_)) => return Err(error),
                // Gone or unreadable: the report goes out without it.
                Err(error) => {
                    tracing::warn!(message_id = %id, %error,
                        "the report of this message cannot quote it");
                    Vec::new()
                }
            };
            for report in bounce::reports(&completion, &body, &self.settings, now_ms()) {
                tracing::info!(message_id = %id, report_id = %report.record.id,
                    "delivery report built");
                reports.push(report);
            }
            keep_unreported(&completion, body, &self.settings).await;
        }
        Ok(reports)
    }

    async fn queue(&self, reports: Vec<NewMessage>) -> Result<(), SpoolError> {
        for report in reports {
            let report = received_now(report, now_ms());
            let report_id = report.record.id.clone();
            match self.queue.send(Enqueue(report)).await {
                Ok(Ok(())) => tracing::info!(report_id = %report_id, "delivery report queued"),
                Ok(Err(error)) => return Err(error),
                Err(_) => return Err(SpoolError::Unavailable("the queue stopped".into())),
            }
        }
        Ok(())
    }
}

/// Passes the message to the Queue's own storer: the send API's, the
/// pickup directory's, and on Redis every session's ([`crate::storer`]).
impl Handler<Enqueue> for Queue {
    type Result = ResponseFuture<Result<(), SpoolError>>;

    fn handle(&mut self, msg: Enqueue, _: &mut Context<Self>) -> Self::Result {
        let storer = self.storer.clone();
        Box::pin(async move {
            let stopped = || {
                SpoolError::Unavailable("the queue stopped before the message was stored".into())
            };
            match storer {
                Some(storer) => storer.send(msg).await.unwrap_or_else(|_| Err(stopped())),
                None => Err(stopped()),
            }
        })
    }
}

/// Schedules again what a storer could not, and announces the domains
/// with new work.
impl Handler<Stored> for Queue {
    type Result = ();

    fn handle(&mut self, msg: Stored, ctx: &mut Context<Self>) {
        self.keep_unscheduled(msg.unscheduled);
        self.announce(msg.domains, ctx);
    }
}

/// Lists the spool and schedules what it holds.
impl Handler<Recover> for Queue {
    type Result = ResponseActFuture<Self, Result<Vec<Arc<MessageRecord>>, SpoolError>>;

    fn handle(&mut self, _: Recover, _: &mut Context<Self>) -> Self::Result {
        let spool = self.spool.clone();
        let schedule = self.schedule.clone();
        if self.led {
            // A shared queue: the leader rescans it; this node only looks
            // for due work.
            let ready = async move { schedule.ready_domains().await };
            return Box::pin(ready.into_actor(self).map(|ready, queue, ctx| {
                queue.announce(ready?, ctx);
                Ok(Vec::new())
            }));
        }
        let recover = async move {
            let records = spool.list_shared().await?;
            let domains = schedule.insert_shared(records.clone(), now_ms()).await?;
            Ok((records, domains))
        };
        Box::pin(recover.into_actor(self).map(|result, queue, ctx| {
            let (records, domains) = result?;
            queue.announce(domains, ctx);
            queue.sweep_expired(ctx);
            Ok(records)
        }))
    }
}

/// The cluster-wide jobs, on the node whose coordinator leads: the work of
/// dead nodes and expired leases back to ready, due retries promoted, then
/// (at their own intervals) the expiry sweep and the rescan. Each step
/// starts only while the lease behind the tick holds.
impl Handler<LeaderTick> for Queue {
    type Result = ();

    fn handle(&mut self, tick: LeaderTick, ctx: &mut Context<Self>) {
        if !self.led || self.leading_busy || !tick.is_valid() {
            return;
        }
        self.leading_busy = true;
        let schedule = self.schedule.clone();
        let check = tick.clone();
        let work = async move {
            schedule.reclaim_holders(&check.dead_holders).await?;
            if !check.is_valid() {
                return Ok(Vec::new());
            }
            schedule.reclaim_expired_leases().await?;
            if !check.is_valid() {
                return Ok(Vec::new());
            }
            schedule.promote(now_ms()).await
        };
        ctx.spawn(work.into_actor(self).map(move |promoted, queue, ctx| {
            queue.leading_busy = false;
            match promoted {
                Ok(domains) => queue.announce(domains, ctx),
                Err(error) => tracing::warn!(%error, "cannot reclaim or promote deliveries"),
            }
            if !tick.is_valid() {
                return;
            }
            let due = |last: Option<Instant>, every: Duration| {
                last.is_none_or(|at| at.elapsed() >= every)
            };
            if due(queue.last_sweep, EXPIRY_SWEEP) {
                queue.last_sweep = Some(Instant::now());
                queue.sweep_expired(ctx);
            }
            if let Some(every) = queue.rescan {
                // A rescan under way goes on by one page per tick.
                if queue.rescan_cursor.is_some() || due(queue.last_rescan, every) {
                    queue.rescan(ctx);
                }
            }
        }));
    }
}

/// Answers the current counts.
impl Handler<ShowMessage> for Queue {
    type Result = ResponseFuture<Result<Option<MessageView>, SpoolError>>;

    fn handle(&mut self, msg: ShowMessage, _: &mut Context<Self>) -> Self::Result {
        let schedule = self.schedule.clone();
        Box::pin(async move {
            let found = schedule.records(std::slice::from_ref(&msg.0)).await?;
            let Some(record) = found.into_iter().next().flatten() else {
                return Ok(None);
            };
            let suspended = schedule.suspended().await?;
            Ok(Some(MessageView::of(&record, &suspended)))
        })
    }
}

impl Handler<ListMessages> for Queue {
    type Result = ResponseFuture<Result<MessagePage, SpoolError>>;

    fn handle(&mut self, msg: ListMessages, _: &mut Context<Self>) -> Self::Result {
        let (schedule, spool) = (self.schedule.clone(), self.spool.clone());
        Box::pin(async move {
            let ListMessages { listing, limit } = msg;
            let (ids, next) = match (listing.index(), &listing.after) {
                (Some(index), after) => {
                    let after = match after {
                        Some(PageCursor::Indexed(id)) => Some(id),
                        _ => None,
                    };
                    let ids = match &index {
                        Index::Domain(domain) => {
                            schedule.domain_messages(domain, after, limit).await?
                        }
                        Index::Sender(sender) => {
                            schedule.sender_messages(sender, after, limit).await?
                        }
                    };
                    let next = (ids.len() == limit)
                        .then(|| ids.last().cloned().map(PageCursor::Indexed))
                        .flatten();
                    (ids, next)
                }
                (None, after) => {
                    let after = match after {
                        Some(PageCursor::Queue(cursor)) => Some(cursor),
                        _ => None,
                    };
                    let (records, next) = spool.list_page(after, limit).await?;
                    let ids = records.into_iter().map(|r| r.id).collect();
                    (ids, next.map(PageCursor::Queue))
                }
            };
            // The schedule's records are the current ones; a message done
            // since it was listed is left out.
            let records = schedule.records(&ids).await?;
            let suspended = schedule.suspended().await?;
            let messages = records
                .into_iter()
                .flatten()
                .filter(|record| listing.wants(record, &suspended))
                .map(|record| MessageView::of(&record, &suspended))
                .collect();
            Ok(MessagePage {
                messages,
                next_cursor: next.map(|cursor| cursor.token()),
            })
        })
    }
}

impl Handler<DeleteMessage> for Queue {
    type Result = ResponseActFuture<Self, Result<Option<Deleted>, SpoolError>>;

    /// Takes the message's deliveries not in flight, then completes each
    /// as failed like an attempt would: the same record writes, reports
    /// and delivery log lines.
    fn handle(&mut self, msg: DeleteMessage, ctx: &mut Context<Self>) -> Self::Result {
        let schedule = self.schedule.clone();
        let policy = self.settings.retry.clone();
        let (holder, lease) = (self.holder.clone(), self.lease);
        let writes = schedule.writes_records();
        let hook = (writes && msg.notify).then(|| self.report_hook(ctx));
        let notify = msg.notify;
        let work = async move {
            let Some(taken) = schedule
                .take_message(&msg.id, msg.only.as_deref(), &holder, lease)
                .await?
            else {
                return Ok(None);
            };
            let mut done = Vec::new();
            // The first failure to record; the domains after it are put
            // back untouched rather than left in flight.
            let mut failed = None;
            for domain in &taken.domains {
                let index = taken
                    .record
                    .deliveries
                    .iter()
                    .position(|d| &d.domain == domain);
                let (Some(index), None) = (index, &failed) else {
                    if let Err(error) = schedule.release(&msg.id, domain).await {
                        tracing::warn!(message_id = %msg.id, %domain, %error,
                            "cannot put back a delivery a delete left; its lease runs out");
                    }
                    continue;
                };
                let outcome = MessageOutcome::all_of(
                    &taken.record,
                    index,
                    RcptResult::Failed,
                    DELETED,
                    Duration::ZERO,
                );
                let completion = schedule
                    .complete(
                        &msg.id,
                        domain,
                        &outcome,
                        now_ms(),
                        &policy,
                        0.0,
                        hook.as_ref(),
                    )
                    .await;
                match completion {
                    Ok(Some(completion)) => done.push((completion, outcome)),
                    Ok(None) => {}
                    Err(error) => failed = Some(error),
                }
            }
            Ok(Some((msg.id, done, taken.in_flight, failed)))
        };
        Box::pin(work.into_actor(self).then(move |result, queue, _| {
            let mut to_write = Vec::new();
            let mut failed = None;
            let answer = result.map(|taken| {
                taken.map(|(id, done, in_flight, error)| {
                    // What was recorded is logged and written even when a
                    // later domain failed.
                    failed = error;
                    let mut recipients = 0;
                    for (completion, outcome) in done {
                        recipients += completion.failed().count();
                        queue.log(&completion, Some(&outcome));
                        if !writes {
                            to_write.push(completion);
                        }
                    }
                    tracing::info!(message_id = %id, recipients, in_flight, notified = notify,
                        "message deleted from the queue by an operator");
                    Deleted {
                        id: id.to_string(),
                        recipients,
                        in_flight,
                        notified: notify,
                    }
                })
            });
            // Written here: the events of a notified delete first (as a
            // schedule that writes records does through its reporter).
            let events = notify.then(|| queue.record_events(&to_write));
            async move {
                if let Some(events) = events {
                    events.await;
                }
            }
            .into_actor(queue)
            .then(move |(), queue, ctx| {
                let follow_ups: Vec<_> = to_write
                    .into_iter()
                    .map(|completion| queue.follow_up(completion, notify, ctx))
                    .collect();
                async move {
                    for done in follow_ups {
                        done.await;
                    }
                    match failed {
                        Some(error) => Err(error),
                        None => answer,
                    }
                }
                .into_actor(queue)
            })
        }))
    }
}

/// The deliveries made due go out at the next promote: this node's tick,
/// or the leader's on a cluster (both every 500 ms).
impl Handler<RetryMessage> for Queue {
    type Result = ResponseFuture<Result<Option<usize>, SpoolError>>;

    fn handle(&mut self, msg: RetryMessage, _: &mut Context<Self>) -> Self::Result {
        let schedule = self.schedule.clone();
        Box::pin(async move { schedule.retry(&msg.0, now_ms()).await })
    }
}

impl Handler<ReplayQuarantined> for Queue {
    type Result = ResponseActFuture<Self, Result<Option<Replayed>, SpoolError>>;

    fn handle(&mut self, msg: ReplayQuarantined, _: &mut Context<Self>) -> Self::Result {
        let (spool, schedule) = (self.spool.clone(), self.schedule.clone());
        let work = async move {
            let Some(record) = spool.replay_quarantined(&msg.0).await? else {
                return Ok(None);
            };
            let replayed = Replayed {
                location: msg.0,
                id: record.id.to_string(),
                deliveries: record.deliveries.len(),
            };
            let domains = schedule.insert(vec![record], now_ms()).await?;
            Ok(Some((replayed, domains)))
        };
        Box::pin(work.into_actor(self).map(|result, queue, ctx| {
            result.map(|taken| {
                taken.map(|(replayed, domains)| {
                    tracing::info!(location = %replayed.location, message_id = %replayed.id,
                        deliveries = replayed.deliveries,
                        "a quarantined message was taken back into the queue");
                    queue.announce(domains, ctx);
                    replayed
                })
            })
        }))
    }
}

impl Handler<IndexedMessages> for Queue {
    type Result = ResponseFuture<Result<Vec<MessageId>, SpoolError>>;

    fn handle(&mut self, msg: IndexedMessages, _: &mut Context<Self>) -> Self::Result {
        let schedule = self.schedule.clone();
        Box::pin(async move {
            let after = msg.after.as_ref();
            match &msg.index {
                Index::Domain(domain) => schedule.domain_messages(domain, after, msg.limit).await,
                Index::Sender(sender) => schedule.sender_messages(sender, after, msg.limit).await,
            }
        })
    }
}

impl Handler<RetryIn> for Queue {
    type Result = ResponseFuture<Result<usize, SpoolError>>;

    fn handle(&mut self, msg: RetryIn, _: &mut Context<Self>) -> Self::Result {
        let schedule = self.schedule.clone();
        Box::pin(async move { schedule.retry_in(&msg.domain, &msg.ids, now_ms()).await })
    }
}

/// Deliveries in flight by node: from the holders of a shared schedule's
/// leases, or all of them this process's (`own`) when the schedule is its
/// alone (`by_holder` is `None`).
fn by_node(
    by_holder: Option<BTreeMap<String, usize>>,
    in_flight: usize,
    own: &str,
) -> BTreeMap<String, usize> {
    let by_holder = by_holder.unwrap_or_else(|| {
        (in_flight > 0)
            .then(|| (own.to_string(), in_flight))
            .into_iter()
            .collect()
    });
    let mut by_node = BTreeMap::new();
    for (holder, n) in by_holder {
        *by_node.entry(holder_node(&holder).to_string()).or_insert(0) += n;
    }
    by_node
}

/// Seconds since each receive time, at `now_ms`.
fn ages(received: &BTreeMap<String, u64>, now_ms: u64) -> BTreeMap<String, u64> {
    received
        .iter()
        .map(|(domain, ms)| (domain.clone(), now_ms.saturating_sub(*ms) / 1000))
        .collect()
}

impl Handler<Stats> for Queue {
    type Result = ResponseActFuture<Self, QueueStats>;

    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        let schedule = self.schedule.clone();
        Box::pin(
            async move { schedule.counts().await }
                .into_actor(self)
                .map(|counts, queue, _| {
                    let counts = counts.unwrap_or_else(|error| {
                        tracing::warn!(%error, "cannot count the queue");
                        Default::default()
                    });
                    QueueStats {
                        messages: counts.messages,
                        deliveries_by_domain: counts.deliveries_by_domain,
                        oldest_age_by_domain: ages(&counts.oldest_by_domain, now_ms()),
                        ready: counts.ready,
                        deferred: counts.deferred,
                        in_flight: counts.in_flight,
                        in_flight_by_node: by_node(
                            counts.in_flight_by_holder,
                            counts.in_flight,
                            &queue.holder,
                        ),
                        waiting: queue.store_counts.waiting(),
                        store_calls: queue.store_counts.calls(),
                        suspended: counts.suspended,
                        pending_reports: counts.pending_reports,
                    }
                }),
        )
    }
}

impl Handler<ReopenLog> for Queue {
    type Result = ();

    fn handle(&mut self, _: ReopenLog, _: &mut Context<Self>) {
        if let Some(log) = &mut self.settings.log {
            match log.reopen() {
                Ok(()) => tracing::info!(path = %log.path().display(), "delivery log reopened"),
                Err(error) => tracing::error!(path = %log.path().display(), %error,
                    "cannot reopen the delivery log; writing on to the old file"),
            }
        }
    }
}

impl Handler<Attach> for Queue {
    type Result = ();

    /// From now on, domains with due work are announced to the dispatcher,
    /// those other nodes give work too when the schedule says.
    fn handle(&mut self, msg: Attach, ctx: &mut Context<Self>) {
        let first = self.dispatcher.is_none();
        self.dispatcher = Some(msg.0);
        if first {
            if let Some(news) = self.schedule.ready_news() {
                crate::metrics::ready_news_subscribed(false);
                let news = futures_util::stream::unfold(news, |mut news| async move {
                    news.recv().await.map(|heard| (heard, news))
                });
                ctx.add_stream(news);
            }
        }
        self.tick(ctx);
    }
}

impl StreamHandler<ReadyNews> for Queue {
    fn handle(&mut self, news: ReadyNews, ctx: &mut Context<Self>) {
        match news {
            ReadyNews::Ready(domain) => {
                crate::metrics::ready_news_heard();
                self.announce(vec![domain], ctx)
            }
            ReadyNews::Listening => {
                crate::metrics::ready_news_subscribed(true);
                // What was published while nobody listened: look now.
                self.tick(ctx)
            }
            // The ticks look meanwhile.
            ReadyNews::Deaf => crate::metrics::ready_news_subscribed(false),
        }
    }

    /// The schedule stopped its news (it never does while the queue runs):
    /// the ticks go on looking, and the queue must not stop with it.
    fn finished(&mut self, _: &mut Context<Self>) {}
}

impl Handler<Take> for Queue {
    type Result = ResponseActFuture<Self, Vec<(Arc<MessageRecord>, usize)>>;

    fn handle(&mut self, msg: Take, _: &mut Context<Self>) -> Self::Result {
        if self.draining.is_some() {
            return Box::pin(actix::fut::ready(Vec::new()));
        }
        let schedule = self.schedule.clone();
        let (holder, lease) = (self.holder.clone(), self.lease);
        // Counted from the call: a drain that starts meanwhile waits for
        // what it hands out.
        self.in_flight += msg.max;
        let max = msg.max;
        let take = async move {
            schedule
                .take(&msg.domain, msg.max, &holder, lease)
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(domain = %msg.domain, %error, "cannot take deliveries");
                    Vec::new()
                })
        };
        Box::pin(take.into_actor(self).map(move |jobs, queue, _| {
            queue.finished(max - jobs.len());
            jobs
        }))
    }
}

impl Handler<Report> for Queue {
    type Result = ResponseActFuture<Self, ()>;

    /// Applies the outcome, logs it, sends the reports it calls for and
    /// answers once the new state of the message is in the spool.
    fn handle(&mut self, msg: Report, ctx: &mut Context<Self>) -> Self::Result {
        let jitter = rand::random_range(-0.1..=0.1);
        let schedule = self.schedule.clone();
        let policy = self.settings.retry.clone();
        // A schedule that writes records queues the reports through the
        // hook, then writes the record: when `complete` returns, the
        // outcome is durable. Otherwise it is applied first, and only then
        // logged and marked for the writer.
        let writes = schedule.writes_records();
        let hook = writes.then(|| self.report_hook(ctx));
        let complete = async move {
            let completion = schedule
                .complete(
                    &msg.id,
                    &msg.domain,
                    &msg.outcome,
                    now_ms(),
                    &policy,
                    jitter,
                    hook.as_ref(),
                )
                .await;
            (msg, completion)
        };
        Box::pin(
            complete
                .into_actor(self)
                .then(move |(msg, completion), queue, _| {
                    let completion = match completion {
                        Ok(Some(completion)) => {
                            queue.log(&completion, Some(&msg.outcome));
                            (!writes).then_some(completion)
                        }
                        Ok(None) => None,
                        Err(error) => {
                            // The delivery stays in flight; a shared
                            // schedule hands it out again when its lease
                            // runs out (at-least-once).
                            tracing::error!(message_id = %msg.id, domain = %msg.domain,
                                %error, "cannot record a delivery outcome");
                            None
                        }
                    };
                    // Written here: its events first, then the record.
                    let events = completion
                        .as_ref()
                        .map(|completion| queue.record_events(std::slice::from_ref(completion)));
                    async move {
                        if let Some(events) = events {
                            events.await;
                        }
                    }
                    .into_actor(queue)
                    .then(move |(), queue, ctx| {
                        let follow_up =
                            completion.map(|completion| queue.follow_up(completion, true, ctx));
                        async move {
                            if let Some(done) = follow_up {
                                done.await;
                            }
                        }
                        .into_actor(queue)
                    })
                    .map(|(), queue, _| queue.finished(1))
                }),
        )
    }
}

impl Handler<Release> for Queue {
    type Result = ();

    fn handle(&mut self, msg: Release, ctx: &mut Context<Self>) {
        let schedule = self.schedule.clone();
        let release = async move {
            schedule.release(&msg.id, &msg.domain).await?;
            let due = schedule.has_ready(&msg.domain).await?;
            Ok::<_, SpoolError>((msg.domain, due))
        };
        ctx.spawn(release.into_actor(self).map(|result, queue, ctx| {
            queue.finished(1);
            match result {
                Ok((domain, true)) => queue.announce(vec![domain], ctx),
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot release a delivery"),
            }
        }));
    }
}

impl Handler<Drain> for Queue {
    type Result = ();

    fn handle(&mut self, Drain(done): Drain, _: &mut Context<Self>) {
        tracing::info!(
            deliveries = self.in_flight,
            "handing out no more deliveries; waiting for those under way"
        );
        self.draining.get_or_insert_with(Vec::new).push(done);
        self.finished(0);
    }
}

impl Handler<Suspend> for Queue {
    type Result = ();

    fn handle(&mut self, msg: Suspend, ctx: &mut Context<Self>) {
        let schedule = self.schedule.clone();
        let change = async move {
            let due = if msg.suspended {
                schedule.suspend(&msg.domain).await?;
                false
            } else {
                schedule.resume(&msg.domain).await?
            };
            Ok::<_, SpoolError>((msg, due))
        };
        ctx.spawn(
            change
                .into_actor(self)
                .map(|result, queue, ctx| match result {
                    Ok((msg, due)) => {
                        let what = if msg.suspended {
                            "domain suspended"
                        } else {
                            "domain resumed"
                        };
                        tracing::info!(domain = %msg.domain, "{what}");
                        if due {
                            queue.announce(vec![msg.domain], ctx);
                        }
                    }
                    Err(error) => tracing::warn!(%error, "cannot suspend or resume a domain"),
                }),
        );
    }
}

impl Handler<Reported> for Queue {
    type Result = ();

    /// Unpins the message and marks it, with its reports, for the writer.
    fn handle(&mut self, msg: Reported, ctx: &mut Context<Self>) {
        self.writer.pins.unpin(&msg.id);
        if !msg.reports.is_empty() {
            self.writer
                .reports
                .entry(msg.id.clone())
                .or_default()
                .extend(msg.reports);
        }
        self.persist(msg.id, msg.done, ctx);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;

    use super::*;
    use crate::spool::suite::{id, message};
    use crate::spool::{Body, LocalSpool, LocalSpoolOptions};

    #[test]
    fn work_in_flight_is_counted_by_node() {
        let holders = |pairs: &[(&str, usize)]| -> BTreeMap<String, usize> {
            pairs.iter().map(|&(h, n)| (h.to_string(), n)).collect()
        };
        // A shared schedule: two processes of node-a (one restarted, its
        // leases not yet reclaimed) and one of node-b.
        let shared = by_node(
            Some(holders(&[
                ("node-a@1", 2),
                ("node-a@2", 3),
                ("node-b@1", 4),
            ])),
            9,
            "node-b@1",
        );
        assert_eq!(shared, holders(&[("node-a", 5), ("node-b", 4)]));
        // Leases counted, then gone before their holders were read: none
        // is this process's for it.
        assert!(by_node(Some(BTreeMap::new()), 2, "coord@1").is_empty());
        // A schedule of this process alone.
        assert_eq!(by_node(None, 7, "node-a@1"), holders(&[("node-a", 7)]));
        assert!(by_node(None, 0, "node-a@1").is_empty());
    }

    /// A local spool that counts store calls and can be made to fail.
    struct TestSpool {
        inner: LocalSpool,
        stores: AtomicUsize,
        fail: AtomicBool,
    }

    impl TestSpool {
        fn new(dir: &std::path::Path) -> Arc<TestSpool> {
            Arc::new(TestSpool {
                inner: LocalSpool::open(dir, LocalSpoolOptions::default()).unwrap(),
                stores: AtomicUsize::new(0),
                fail: AtomicBool::new(false),
            })
        }
    }

    #[async_trait]
    impl Spool for TestSpool {
        async fn store(&self, batch: Vec<NewMessage>) -> Result<(), SpoolError> {
            self.stores.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Err(SpoolError::Unavailable("disk full".into()));
            }
            self.inner.store(batch).await
        }
        async fn update(&self, record: MessageRecord) -> Result<(), SpoolError> {
            self.inner.update(record).await
        }
        async fn remove(&self, id: &MessageId) -> Result<(), SpoolError> {
            self.inner.remove(id).await
        }
        async fn list(&self) -> Result<Vec<MessageRecord>, SpoolError> {
            self.inner.list().await
        }
        async fn read_body(&self, id: &MessageId) -> Result<Body, SpoolError> {
            self.inner.read_body(id).await
        }
    }

    async fn enqueue_all(
        queue: &Addr<Queue>,
        numbers: std::ops::Range<u64>,
    ) -> Vec<Result<(), SpoolError>> {
        let tasks: Vec<_> = numbers
            .map(|n| {
                let queue = queue.clone();
                tokio::spawn(async move { queue.send(Enqueue(message(n, 2048))).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap().expect("queue is running"));
        }
        results
    }

    #[actix::test]
    async fn concurrent_enqueues_share_store_calls() {
        let dir = tempfile::tempdir().unwrap();
        let spool = TestSpool::new(dir.path());
        let queue = Queue::new(spool.clone()).start();

        let results = enqueue_all(&queue, 0..200).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        let stores = spool.stores.load(Ordering::SeqCst);
        assert!(stores <= 20, "{stores} store calls for 200 messages");

        let stored = spool.list().await.unwrap();
        assert_eq!(stored.len(), 200);
        assert_eq!(
            spool.read_body(&id(123)).await.unwrap(),
            message(123, 2048).body
        );
        let stats = queue.send(Stats).await.unwrap();
        assert_eq!(stats.messages, 200);
        assert_eq!(stats.store_calls, stores as u64);
        assert_eq!(stats.waiting, 0);
        assert_eq!(stats.deliveries_by_domain.values().sum::<usize>(), 400);
    }

    #[actix::test]
    async fn a_failed_store_reaches_every_waiter_and_the_queue_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let spool = TestSpool::new(dir.path());
        let queue = Queue::new(spool.clone()).start();

        spool.fail.store(true, Ordering::SeqCst);
        let results = enqueue_all(&queue, 0..100).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(SpoolError::Unavailable(why)) if why == "disk full")),
            "{results:?}"
        );
        assert!(spool.stores.load(Ordering::SeqCst) < 100);
        assert_eq!(queue.send(Stats).await.unwrap().messages, 0);

        spool.fail.store(false, Ordering::SeqCst);
        queue
            .send(Enqueue(message(500, 100)))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            spool
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>(),
            vec![id(500)]
        );
    }

    #[actix::test]
    async fn recover_lists_the_spool_and_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = TestSpool::new(dir.path());
        spool
            .store(vec![message(2, 10), message(0, 10), message(1, 10)])
            .await
            .unwrap();
        let queue = Queue::new(spool.clone())
            .with_settings(long_lived())
            .start();

        let records = queue.send(Recover).await.unwrap().unwrap();
        let ids: Vec<_> = records.iter().map(|r| r.id.clone()).collect();
        assert_eq!(ids, vec![id(0), id(1), id(2)]);
        let stats = queue.send(Stats).await.unwrap();
        assert_eq!(stats.messages, 3);
        assert_eq!(stats.deliveries_by_domain["example.net"], 2);
        assert_eq!(stats.ready, 6, "every delivery is due at once");
    }

    /// Settings under which the test messages (received in 2023) are not
    /// yet past their lifetime.
    fn long_lived() -> DeliverySettings {
        let mut settings = DeliverySettings::default();
        settings.retry.max_lifetime = Duration::from_secs(100 * 365 * 86400);
        settings
    }

    #[actix::test]
    async fn recovery_fails_what_outlived_its_lifetime_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = TestSpool::new(dir.path());
        spool.store(vec![message(0, 10)]).await.unwrap();
        // Default settings: two days, and the message is from 2023. Its
        // sender gets a report, which is queued in its place.
        let queue = Queue::new(spool.clone()).start();
        queue.send(Recover).await.unwrap().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let listed = spool.list().await.unwrap();
            if listed.iter().all(|r| r.id != id(0)) {
                assert_eq!(listed.len(), 1, "one report: {listed:?}");
                assert_eq!(listed[0].envelope.sender, None);
                let to = &listed[0].envelope.recipients[0].address;
                assert_eq!(to.to_string(), "app@sender.example");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never removed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod outcome_tests;
mod view;

pub use view::{
    ClientView, Listing, MessagePage, MessageView, PageCursor, RecipientView, LISTED_STATES,
};

#[cfg(test)]
mod leader_tests {
    use std::time::{Duration, Instant};

    use smarthost_testkit::redis::RedisServer;

    use super::*;
    use crate::schedule::RedisSchedule;
    use crate::spool::suite::message;
    use crate::spool::RedisSpool;

    fn tick(valid_for: Duration) -> LeaderTick {
        LeaderTick {
            token: 1,
            valid_until: Instant::now() + valid_for,
            dead: Vec::new(),
            dead_holders: Vec::new(),
        }
    }

    /// Waits (at most 10 s) until the schedule holds `ready` due deliveries.
    async fn until_ready(schedule: &RedisSchedule, ready: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts = schedule.counts().await.unwrap();
            if counts.ready == ready {
                return;
            }
            assert!(Instant::now() < deadline, "{counts:?}, want {ready} ready");
            actix::clock::sleep(Duration::from_millis(20)).await;
        }
    }

    #[actix::test]
    async fn only_a_leader_tick_rescans_and_one_page_at_a_time() {
        let server = RedisServer::start();
        let spool = Arc::new(RedisSpool::open(&server.url()).await.unwrap());
        let schedule = Arc::new(RedisSchedule::new(&spool).await.unwrap());
        // Stored but in no schedule key, as after a node stopped between the
        // two writes: 4500 messages, two deliveries each.
        let numbers: Vec<u64> = (0..4500).collect();
        for chunk in numbers.chunks(500) {
            let batch = chunk.iter().map(|&n| message(n, 10)).collect();
            spool.store(batch).await.unwrap();
        }
        // The test messages are from 2023: no expiry here.
        let mut settings = DeliverySettings::default();
        settings.retry.max_lifetime = Duration::from_secs(100 * 365 * 86400);
        let queue = Queue::new(spool.clone())
            .with_settings(settings)
            .with_schedule(schedule.clone(), "node-a", Duration::from_secs(60))
            .with_rescan(Duration::from_secs(3600))
            .led_by_coordinator()
            .start();

        // No leader, or a lapsed lease: nothing happens.
        queue.send(tick(Duration::ZERO)).await.unwrap();
        actix::clock::sleep(Duration::from_millis(700)).await;
        assert_eq!(schedule.counts().await.unwrap().ready, 0);

        // One page of 2000 messages per tick, until the end.
        for (ticks, ready) in [(1, 4000), (2, 8000), (3, 9000)] {
            queue.send(tick(Duration::from_secs(30))).await.unwrap();
            until_ready(&schedule, ready).await;
            actix::clock::sleep(Duration::from_millis(300)).await;
            assert_eq!(
                schedule.counts().await.unwrap().ready,
                ready,
                "after {ticks} ticks"
            );
        }
        // Done: the next rescan waits for the interval.
        let before = schedule.round_trips();
        queue.send(tick(Duration::from_secs(30))).await.unwrap();
        actix::clock::sleep(Duration::from_millis(300)).await;
        assert_eq!(schedule.counts().await.unwrap().ready, 9000);
        assert!(
            schedule.round_trips() > before,
            "the tick still reclaims and promotes"
        );
    }
}
