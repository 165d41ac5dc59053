//! The queue at scale: fills a spool and its schedule with many queued
//! messages over many domains (bulk, straight through the `Spool` and
//! `Schedule` APIs, small bodies) and measures what each queue operation
//! costs at several queue sizes, so that a cost that grows with the queue
//! shows. `scripts/scale.sh` drives it; see `docs/benchmarks.md`.
//!
//! ```text
//! scale_bench fill local DIR N DOMAINS [CHECKPOINTS]
//! scale_bench fill redis URL N DOMAINS [CHECKPOINTS]
//! scale_bench start local DIR
//! scale_bench start redis URL
//! scale_bench compact DIR N
//! ```
//!
//! `fill` stores and schedules N messages, one recipient each, over DOMAINS
//! domains: half due now, half deferred by a day. At each checkpoint (a
//! queue size, default `10000,100000,N`) it times, over a sample of
//! [`SAMPLE`] operations each: `store` (one message per call), `insert`
//! (one message per call), `take` (one delivery), `complete` (delivered:
//! the message is removed), `promote` (with nothing due, and moving
//! [`SAMPLE`] due retries), an expiry sweep page (up to 1000 messages past
//! their lifetime, and a sweep that finds none), a rescan page (1000
//! records listed from the middle of the spool and inserted again), and
//! the operator's listing: pages of [`LIST_PAGE`] messages of the whole
//! queue and of the first domain, from cursors spread over the queue, as
//! `GET /api/v1/messages` reads them (ids, then the current records); and
//! an operator's retry and delete of that domain, a page at a time (the
//! page's ids, then its deferred deliveries made due, or each message's
//! delivery there taken and failed as `DELETE /api/v1/messages?domain=`
//! does). The probes leave the queue size as it was, but for the
//! [`DELETE_PAGES`] pages deleted. With DOMAINS = 1 the first domain holds
//! the whole queue.
//!
//! `start` measures, in a fresh process, what a node does at start-up with
//! that queue: the local spool opened (its log replayed) and every message
//! scheduled in memory, or on Redis the spool and schedule opened and the
//! due domains read; then, on Redis, the leader's first full rescan. It
//! prints the time and the resident memory of the process.
//!
//! `compact` measures the local spool's compaction next to a large queue:
//! it stores N messages, removes four of every five of the older half (so
//! their segments become sparse), then stores one message per call for
//! [`COMPACT_PROBE`] while the housekeeping thread compacts those segments,
//! and prints how long the stores took, the slowest first.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix::Actor;
use smarthost_node::delivery::{MessageOutcome, RcptResult};
use smarthost_node::queue::{Queue, Recover};
use smarthost_node::schedule::{MemorySchedule, RedisSchedule, Schedule};
use smarthost_node::scheduler::RetryPolicy;
use smarthost_node::spool::{
    Change, ListCursor, LocalSpool, LocalSpoolOptions, NewMessage, RedisSpool, RedisSpoolOptions,
    Spool,
};
use smarthost_proto::address::Mailbox;
use smarthost_proto::envelope::{ClientInfo, Envelope, MessageId, MessageRecord, Recipient};

type Error = Box<dyn std::error::Error>;

/// Operations timed per kind at each checkpoint.
const SAMPLE: u64 = 200;
/// Messages per bulk store while filling.
const FILL_BATCH: u64 = 1000;
/// The page of an expiry sweep and of a rescan.
const PAGE: u64 = 1000;
/// The page of an operator's listing (the API's default), and how many
/// pages are timed per row.
const LIST_PAGE: usize = 100;
const LIST_PAGES: u64 = 20;
/// Pages of a domain deleted per row (they leave the queue).
const DELETE_PAGES: u64 = 3;
const HOLDER: &str = "bench";
const LEASE: Duration = Duration::from_secs(15 * 60);
const DAY_MS: u64 = 86_400_000;
/// How long `compact` stores while the housekeeping thread works: past
/// `compact_after` and a housekeeping tick, with room for the work.
const COMPACT_PROBE: Duration = Duration::from_secs(12);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn domain(n: u64, domains: u64) -> String {
    format!("d{}.example", n % domains)
}

/// Message `n` to one recipient at `domain`, received at `received_ms`,
/// first attempt at `next_ms`.
fn message(n: u64, domain: String, received_ms: u64, next_ms: u64) -> NewMessage {
    let envelope = Envelope {
        sender: Some(Mailbox {
            local_part: "app".into(),
            domain: "sender.example".into(),
        }),
        recipients: vec![Recipient {
            address: Mailbox {
                local_part: format!("u{n}"),
                domain,
            },
            notify: None,
            orcpt: None,
        }],
        ..Envelope::default()
    };
    let client = ClientInfo {
        ip: "192.0.2.1".parse().expect("literal address"),
        helo: "app.sender.example".into(),
        auth_user: None,
        tls: false,
    };
    let body = format!("Subject: {n}\r\n\r\nscale test message {n}\r\n").into_bytes();
    let mut record = MessageRecord::new(
        MessageId::new(received_ms, n),
        received_ms,
        body.len() as u64,
        client,
        envelope,
    );
    for delivery in &mut record.deliveries {
        delivery.next_attempt_ms = next_ms;
    }
    NewMessage {
        record,
        body: body.into(),
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        intervals: vec![Duration::from_secs(900)],
        max_lifetime: Duration::from_secs(2 * 86_400),
        delay_notification: Duration::from_secs(12 * 3600),
    }
}

/// Resident memory of this process (`VmRSS`, `VmHWM`) in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Mean and 99th percentile of `samples`, in µs.
fn summary(samples: &mut [Duration]) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort();
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64;
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    (mean * 1e6, p99.as_secs_f64() * 1e6)
}

fn row(size: u64, op: &str, samples: &mut [Duration]) {
    let (mean, p99) = summary(samples);
    println!(
        "{size:>9} | {op:<28} | {:>5} | {mean:>11.0} | {p99:>11.0}",
        samples.len()
    );
}

/// The spool and schedule of one backend, and how a finished message
/// leaves the spool (the Redis schedule writes records itself).
struct Backend {
    spool: Arc<dyn Spool>,
    schedule: Arc<dyn Schedule>,
    redis: Option<redis::Client>,
}

impl Backend {
    async fn open(kind: &str, place: &str) -> Result<Backend, Error> {
        match kind {
            "local" => {
                let path = std::path::PathBuf::from(place);
                let spool = tokio::task::spawn_blocking(move || {
                    LocalSpool::open(&path, LocalSpoolOptions::default())
                })
                .await??;
                Ok(Backend {
                    spool: Arc::new(spool),
                    schedule: Arc::new(MemorySchedule::default()),
                    redis: None,
                })
            }
            "redis" => {
                let options = RedisSpoolOptions {
                    response_timeout: Duration::from_secs(60),
                    ..RedisSpoolOptions::default()
                };
                let spool = RedisSpool::open_with(place, options).await?;
                let schedule = RedisSchedule::new(&spool).await?;
                Ok(Backend {
                    spool: Arc::new(spool),
                    schedule: Arc::new(schedule),
                    redis: Some(redis::Client::open(place)?),
                })
            }
            other => Err(format!("unknown backend {other:?}; expected local or redis").into()),
        }
    }

    /// Persists what `complete` or `expire` left to the caller: the
    /// memory schedule's finished messages leave the spool.
    async fn persist(&self, records: impl IntoIterator<Item = Arc<MessageRecord>>) {
        if self.schedule.writes_records() {
            return;
        }
        let changes: Vec<Change> = records
            .into_iter()
            .map(|r| {
                if r.deliveries.is_empty() {
                    Change::Remove(r.id.clone())
                } else {
                    Change::Update(r)
                }
            })
            .collect();
        for (id, error) in self.spool.apply(changes).await {
            eprintln!("persisting {id}: {error}");
        }
    }

    async fn redis_used_memory(&self) -> Option<u64> {
        let client = self.redis.as_ref()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
    }
}

/// Where the fill is and what the probes use.
struct Fill {
    domains: u64,
    base_ms: u64,
    now_ms: u64,
    filled: u64,
    /// Numbers above every filled message, for probe messages.
    next_probe: u64,
    /// The oldest messages already expired by earlier sweep probes.
    expired: u64,
}

impl Fill {
    /// An empty fill over `domains` domains, from now.
    fn new(domains: u64) -> Fill {
        let now = now_ms();
        Fill {
            domains,
            // Old enough to expire in the sweep probes, young enough for
            // nothing else to: every message is an hour old.
            base_ms: now - 3_600_000,
            now_ms: now,
            filled: 0,
            next_probe: 1 << 40,
            expired: 0,
        }
    }

    /// Message `n` of the fill: received `n` ms after the base; even ones
    /// due now, odd ones deferred by a day.
    fn message(&self, n: u64) -> NewMessage {
        let received = self.base_ms + n;
        let next = if n.is_multiple_of(2) {
            received
        } else {
            self.now_ms + DAY_MS
        };
        message(n, domain(n, self.domains), received, next)
    }

    fn probe(&mut self, next_ms: u64) -> NewMessage {
        let n = self.next_probe;
        self.next_probe += 1;
        // Received after every filled message: no sweep page reaches it.
        let received = self.now_ms + n % 1000;
        message(n, domain(n * 7919, self.domains), received, next_ms)
    }

    async fn fill_to(&mut self, backend: &Backend, target: u64) -> Result<(), Error> {
        let started = Instant::now();
        let from = self.filled;
        while self.filled < target {
            let end = (self.filled + FILL_BATCH).min(target);
            let batch: Vec<NewMessage> = (self.filled..end).map(|n| self.message(n)).collect();
            let records: Vec<MessageRecord> = batch.iter().map(|m| m.record.clone()).collect();
            backend.spool.store(batch).await?;
            backend.schedule.insert(records, self.now_ms).await?;
            self.filled = end;
        }
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "filled {} messages in {secs:.1} s ({:.0}/s), queue now {}",
            target - from,
            (target - from) as f64 / secs.max(1e-9),
            self.filled
        );
        Ok(())
    }
}

async fn probe_ops(backend: &Backend, fill: &mut Fill) -> Result<(), Error> {
    let size = fill.filled;
    let policy = policy();

    // store and insert, one message per call.
    let probes: Vec<NewMessage> = (0..SAMPLE).map(|_| fill.probe(fill.now_ms)).collect();
    let mut store = Vec::new();
    for m in &probes {
        let started = Instant::now();
        backend.spool.store(vec![m.clone()]).await?;
        store.push(started.elapsed());
    }
    row(size, "store (1 message)", &mut store);
    let mut insert = Vec::new();
    for m in &probes {
        let started = Instant::now();
        backend
            .schedule
            .insert(vec![m.record.clone()], fill.now_ms)
            .await?;
        insert.push(started.elapsed());
    }
    row(size, "insert (1 message)", &mut insert);

    // take and complete one delivery of each probe's domain (the oldest
    // due there: a filled message, so the queue keeps its size).
    let mut take = Vec::new();
    let mut jobs = Vec::new();
    for m in &probes {
        let domain = m.record.deliveries[0].domain.clone();
        let started = Instant::now();
        let taken = backend.schedule.take(&domain, 1, HOLDER, LEASE).await?;
        take.push(started.elapsed());
        jobs.extend(taken);
    }
    row(size, "take (1 delivery)", &mut take);
    let mut complete = Vec::new();
    for (record, delivery) in &jobs {
        let domain = record.deliveries[*delivery].domain.clone();
        let outcome = MessageOutcome::all_of(
            record,
            *delivery,
            RcptResult::Delivered,
            "250 ok",
            Duration::ZERO,
        );
        let started = Instant::now();
        let done = backend
            .schedule
            .complete(&record.id, &domain, &outcome, now_ms(), &policy, 0.0, None)
            .await?;
        backend.persist(done.map(|c| c.record)).await;
        complete.push(started.elapsed());
    }
    row(size, "complete (delivered)", &mut complete);

    // promote: nothing due, then SAMPLE retries due at `due`.
    let mut idle = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        backend.schedule.promote(fill.now_ms).await?;
        idle.push(started.elapsed());
    }
    row(size, "promote (nothing due)", &mut idle);
    let due = fill.now_ms + 3_600_000;
    let retries: Vec<NewMessage> = (0..SAMPLE).map(|_| fill.probe(due)).collect();
    let records: Vec<MessageRecord> = retries.iter().map(|m| m.record.clone()).collect();
    backend.spool.store(retries).await?;
    backend
        .schedule
        .insert(records.clone(), fill.now_ms)
        .await?;
    let started = Instant::now();
    let promoted = backend.schedule.promote(due).await?;
    let mut once = vec![started.elapsed()];
    row(
        size,
        &format!("promote ({} domains due)", promoted.len()),
        &mut once,
    );
    // Those retries leave again (untimed).
    for record in &records {
        let domain = record.deliveries[0].domain.clone();
        for (record, delivery) in backend.schedule.take(&domain, 1, HOLDER, LEASE).await? {
            let outcome = MessageOutcome::all_of(
                &record,
                delivery,
                RcptResult::Delivered,
                "250 ok",
                Duration::ZERO,
            );
            let done = backend
                .schedule
                .complete(&record.id, &domain, &outcome, now_ms(), &policy, 0.0, None)
                .await?;
            backend.persist(done.map(|c| c.record)).await;
        }
    }

    // Expiry: a sweep with nothing past its lifetime, then a page of the
    // oldest PAGE messages past it (they leave the queue).
    let lifetime_ms = policy.max_lifetime.as_millis() as u64;
    let mut nothing = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let expired = backend
            .schedule
            .expire(fill.base_ms + fill.expired + lifetime_ms - 1, &policy, None)
            .await?;
        nothing.push(started.elapsed());
        if !expired.is_empty() {
            eprintln!("an idle sweep expired {}", expired.len());
        }
    }
    row(size, "expire sweep (none due)", &mut nothing);
    let upto = fill.expired + PAGE;
    let started = Instant::now();
    let expired = backend
        .schedule
        .expire(fill.base_ms + upto + lifetime_ms - 1, &policy, None)
        .await?;
    let count = expired.len();
    backend.persist(expired.into_iter().map(|c| c.record)).await;
    let mut page = vec![started.elapsed()];
    row(size, &format!("expire sweep page ({count})"), &mut page);
    fill.expired = upto;

    // A rescan page from the middle of the spool.
    let middle = ListCursor {
        received_ms: fill.base_ms + size / 2,
        id: MessageId::new(fill.base_ms + size / 2, size / 2),
    };
    let started = Instant::now();
    let (records, _) = backend
        .spool
        .list_page(Some(&middle), PAGE as usize)
        .await?;
    let listed = records.len();
    backend.schedule.insert(records, fill.now_ms).await?;
    let mut rescan = vec![started.elapsed()];
    row(size, &format!("rescan page ({listed})"), &mut rescan);

    // The operator's listing, from cursors spread over the queue.
    let cursor = |i: u64| {
        let n = fill.expired + i * (size - fill.expired) / LIST_PAGES;
        ListCursor {
            received_ms: fill.base_ms + n,
            id: MessageId::new(fill.base_ms + n, n),
        }
    };
    let mut whole = Vec::new();
    let mut listed = 0;
    for i in 0..LIST_PAGES {
        let started = Instant::now();
        let (page, _) = backend.spool.list_page(Some(&cursor(i)), LIST_PAGE).await?;
        let ids: Vec<MessageId> = page.into_iter().map(|r| r.id).collect();
        listed += backend.schedule.records(&ids).await?.len();
        whole.push(started.elapsed());
    }
    let per_page = listed as u64 / LIST_PAGES;
    row(
        size,
        &format!("list page ({per_page}, whole queue)"),
        &mut whole,
    );
    let first = domain(0, fill.domains);
    let mut one = Vec::new();
    listed = 0;
    for i in 0..LIST_PAGES {
        let started = Instant::now();
        let ids = backend
            .schedule
            .domain_messages(&first, Some(&cursor(i).id), LIST_PAGE)
            .await?;
        listed += backend.schedule.records(&ids).await?.len();
        one.push(started.elapsed());
    }
    let per_page = listed as u64 / LIST_PAGES;
    row(
        size,
        &format!("list page ({per_page}, one domain)"),
        &mut one,
    );

    // An operator's retry of the domain, a page at a time.
    let mut retry = Vec::new();
    let mut made_due = 0;
    for i in 0..LIST_PAGES {
        let started = Instant::now();
        let ids = backend
            .schedule
            .domain_messages(&first, Some(&cursor(i).id), LIST_PAGE)
            .await?;
        made_due += backend.schedule.retry_in(&first, &ids, fill.now_ms).await?;
        retry.push(started.elapsed());
    }
    row(
        size,
        &format!("retry page ({LIST_PAGE}, one domain; {made_due} made due)"),
        &mut retry,
    );

    // And a delete of the domain: each message's delivery there taken and
    // failed, as the admin API does.
    let mut delete = Vec::new();
    let mut deleted = 0;
    for i in 0..DELETE_PAGES {
        let started = Instant::now();
        let ids = backend
            .schedule
            .domain_messages(
                &first,
                Some(&cursor(i * LIST_PAGES / DELETE_PAGES).id),
                LIST_PAGE,
            )
            .await?;
        for id in &ids {
            let Some(taken) = backend
                .schedule
                .take_message(id, Some(&first), HOLDER, LEASE)
                .await?
            else {
                continue;
            };
            for domain in &taken.domains {
                let Some(index) = taken
                    .record
                    .deliveries
                    .iter()
                    .position(|d| &d.domain == domain)
                else {
                    continue;
                };
                let outcome = MessageOutcome::all_of(
                    &taken.record,
                    index,
                    RcptResult::Failed,
                    "deleted",
                    Duration::ZERO,
                );
                let done = backend
                    .schedule
                    .complete(id, domain, &outcome, now_ms(), &policy, 0.0, None)
                    .await?;
                backend.persist(done.map(|c| c.record)).await;
                deleted += 1;
            }
        }
        delete.push(started.elapsed());
    }
    row(
        size,
        &format!("delete page ({LIST_PAGE}, one domain; {deleted} deleted)"),
        &mut delete,
    );
    Ok(())
}

async fn fill(kind: &str, place: &str, args: &[String]) -> Result<(), Error> {
    let total: u64 = args.first().ok_or("N missing")?.parse()?;
    let domains: u64 = args.get(1).ok_or("DOMAINS missing")?.parse()?;
    let mut checkpoints: Vec<u64> = match args.get(2) {
        Some(list) => list.split(',').map(str::parse).collect::<Result<_, _>>()?,
        None => vec![10_000, 100_000, total],
    };
    checkpoints.retain(|&c| c <= total);
    checkpoints.sort();
    checkpoints.dedup();

    let backend = Backend::open(kind, place).await?;
    let used_before = backend.redis_used_memory().await;
    let mut fill = Fill::new(domains);
    println!(
        "backend {kind}, {total} messages over {domains} domains, {SAMPLE} operations per row"
    );
    println!("   queued | operation                    | calls |   mean (µs) |    p99 (µs)");
    for &checkpoint in &checkpoints {
        fill.fill_to(&backend, checkpoint).await?;
        probe_ops(&backend, &mut fill).await?;
    }
    let (rss, hwm) = memory_mib();
    println!("fill process: VmRSS {rss:.0} MiB, VmHWM {hwm:.0} MiB");
    let counts = backend.schedule.counts().await?;
    let queued = (counts.ready + counts.deferred + counts.in_flight) as u64;
    println!(
        "queued at the end: {queued} deliveries ({} ready, {} deferred, {} in flight)",
        counts.ready, counts.deferred, counts.in_flight
    );
    if let (Some(before), Some(after)) = (used_before, backend.redis_used_memory().await) {
        println!(
            "redis used_memory: {:.1} MiB before, {:.1} MiB after, {:.0} bytes per queued message ({queued})",
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            after.saturating_sub(before) as f64 / queued.max(1) as f64
        );
    }
    Ok(())
}

async fn start(kind: &str, place: &str) -> Result<(), Error> {
    let (rss0, _) = memory_mib();
    let started = Instant::now();
    let backend = Backend::open(kind, place).await?;
    let opened = started.elapsed();
    let (rss_opened, _) = memory_mib();
    let mut queue = Queue::new(backend.spool.clone());
    if kind == "redis" {
        queue = queue
            .with_schedule(backend.schedule.clone(), HOLDER, LEASE)
            .led_by_coordinator();
    }
    let queue = queue.start();
    let recovered = queue.send(Recover).await??;
    let ready = started.elapsed();
    let (rss, hwm) = memory_mib();
    eprintln!();
    println!(
        "start {kind}: spool opened in {:.2} s (VmRSS {rss_opened:.0} MiB), ready (recovered {} messages) in {:.2} s; VmRSS {rss:.0} MiB (was {rss0:.0}), VmHWM {hwm:.0} MiB",
        opened.as_secs_f64(),
        recovered.len(),
        ready.as_secs_f64()
    );
    if kind == "redis" {
        // The leader's rescan: the whole spool, page by page, inserted
        // again (what `queue.rescan_interval` runs).
        let started = Instant::now();
        let mut cursor = None;
        let mut listed = 0;
        loop {
            let (records, next) = backend
                .spool
                .list_page(cursor.as_ref(), PAGE as usize)
                .await?;
            listed += records.len();
            backend.schedule.insert(records, now_ms()).await?;
            match next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        let (rss, hwm) = memory_mib();
        println!(
            "full rescan: {listed} messages in {:.1} s; VmRSS {rss:.0} MiB, VmHWM {hwm:.0} MiB",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

async fn compact(place: &str, args: &[String]) -> Result<(), Error> {
    let total: u64 = args.first().ok_or("N missing")?.parse()?;
    let backend = Backend::open("local", place).await?;
    let mut fill = Fill::new(50_000);
    fill.fill_to(&backend, total).await?;
    let started = Instant::now();
    // Newest first: the oldest segment turns sparse at the end, so its
    // compaction starts as the timed stores do (within a housekeeping tick).
    let removed: Vec<u64> = (0..total / 2).rev().filter(|n| n % 5 != 0).collect();
    for page in removed.chunks(FILL_BATCH as usize) {
        let changes = page
            .iter()
            .map(|&n| Change::Remove(fill.message(n).record.id))
            .collect();
        if let Some((id, error)) = backend.spool.apply(changes).await.into_iter().next() {
            return Err(format!("removing {id}: {error}").into());
        }
    }
    eprintln!(
        "removed {} messages in {:.1} s",
        removed.len(),
        started.elapsed().as_secs_f64()
    );
    // This store's fsync makes the removals durable; it is not timed.
    backend.spool.store(vec![fill.probe(fill.now_ms)]).await?;
    let mut stores = Vec::new();
    let mut slowest = Vec::new();
    let started = Instant::now();
    while started.elapsed() < COMPACT_PROBE {
        let probe = fill.probe(fill.now_ms);
        let at = Instant::now();
        backend.spool.store(vec![probe]).await?;
        stores.push(at.elapsed());
        slowest.push((at.elapsed(), at - started));
    }
    slowest.sort_unstable_by(|a, b| b.cmp(a));
    let slowest: Vec<String> = slowest
        .iter()
        .take(5)
        .map(|(took, at)| {
            format!(
                "{:.1} ms at {:.2} s",
                took.as_secs_f64() * 1e3,
                at.as_secs_f64()
            )
        })
        .collect();
    let over = |ms: u64| {
        stores
            .iter()
            .filter(|d| **d > Duration::from_millis(ms))
            .count()
    };
    let (over_10, over_50) = (over(10), over(50));
    let (mean, p99) = summary(&mut stores);
    println!(
        "compact at {total} queued: {} stores in {COMPACT_PROBE:?}, mean {mean:.0} µs, \
         p99 {p99:.0} µs, over 10 ms {over_10}, over 50 ms {over_50}, slowest {}",
        stores.len(),
        slowest.join(", ")
    );
    Ok(())
}

#[actix::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: scale_bench fill local|redis DIR|URL N DOMAINS [CHECKPOINTS] \
                 | start local|redis DIR|URL | compact DIR N";
    if let [mode, dir, rest @ ..] = args.as_slice() {
        if mode == "compact" {
            tracing_subscriber::fmt()
                .with_writer(std::io::stderr)
                .init();
            return compact(dir, rest).await;
        }
    }
    let (mode, kind, place) = match args.as_slice() {
        [mode, kind, place, ..] => (mode.as_str(), kind.as_str(), place.as_str()),
        _ => return Err(usage.into()),
    };
    match mode {
        "fill" => fill(kind, place, &args[3..]).await,
        "start" => start(kind, place).await,
        _ => Err(usage.into()),
    }
}
