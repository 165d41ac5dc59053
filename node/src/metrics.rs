//! Prometheus metrics, served by the admin server at `/metrics`.
//!
//! Events (a connection, a message stored, a recipient's outcome, a Redis
//! request) are counted where they happen, through the `metrics` crate's
//! process-wide recorder ([`install`]). What is a state rather than an
//! event (the queue, the leader, the login counters) is read when the
//! page is scraped and written by [`Scrape`], so a domain that left the
//! queue leaves the page too.
//!
//! The names are the constants below; `docs/metrics.md` lists them all.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::auth_guard::GuardCounts;
use crate::delivery::{MessageOutcome, RcptResult};
use crate::queue::QueueStats;
use crate::scheduler::{Completion, EXPIRED};

/// SMTP connections admitted.
pub const SMTP_CONNECTIONS: &str = "smarthost_smtp_connections_total";
/// SMTP connections refused or closed by the admission policy, by `reason`.
pub const SMTP_REFUSED: &str = "smarthost_smtp_connections_refused_total";
/// SMTP sessions open now.
pub const SMTP_SESSIONS: &str = "smarthost_smtp_sessions";
/// Messages answered `250` after DATA.
pub const MESSAGES_RECEIVED: &str = "smarthost_messages_received_total";
/// Recipients of those messages.
pub const RECIPIENTS_RECEIVED: &str = "smarthost_recipients_received_total";
/// Message bytes of those messages (with the `Received:` header added).
pub const BYTES_RECEIVED: &str = "smarthost_received_bytes_total";
/// Messages whose store failed after DATA (answered `451`).
pub const MESSAGES_NOT_STORED: &str = "smarthost_messages_not_stored_total";
pub const QUOTA_REFUSALS: &str = "smarthost_quota_refusals_total";
pub const RECIPIENTS_SUPPRESSED: &str = "smarthost_recipients_suppressed_total";
pub const SUPPRESSIONS_ADDED: &str = "smarthost_suppressions_added_total";
/// Message bytes written to disk while they arrived
/// (`smtp.body_spill_threshold`).
pub const BYTES_SPILLED: &str = "smarthost_spilled_bytes_total";
/// From the final dot to the message being durable: what a client waits
/// for its `250`.
pub const ACCEPT_SECONDS: &str = "smarthost_message_accept_seconds";
/// Recipients' outcomes, by `outcome`: `delivered`, `deferred`, `failed`
/// (a permanent reply) and `expired` (failed by the lifetime).
pub const RECIPIENT_OUTCOMES: &str = "smarthost_recipient_outcomes_total";
/// One delivery attempt (connection, transaction) to a destination.
pub const ATTEMPT_SECONDS: &str = "smarthost_delivery_attempt_seconds";
/// From reception to delivery, per delivered recipient.
pub const DELIVERY_DELAY_SECONDS: &str = "smarthost_delivery_delay_seconds";
/// Outgoing SMTP connections open now.
pub const OUTBOUND_CONNECTIONS: &str = "smarthost_outbound_connections";
/// Takes of work for a new connection, by `result`: `work`, or `empty`
/// when the domain had none left (another connection or node took it).
pub const DELIVERY_TAKES: &str = "smarthost_delivery_takes_total";
/// Messages one delivery connection was given in all, recorded when it
/// closes: few means the domain's work is spread thin over many
/// connections.
pub const MESSAGES_PER_CONNECTION: &str = "smarthost_delivery_messages_per_connection";
/// How long a domain with work waited in line for one of the node's
/// connection slots (`delivery.max_connections`), when none was free.
pub const SLOT_WAIT_SECONDS: &str = "smarthost_delivery_slot_wait_seconds";
/// How long a node connection slot stood free before a connection
/// carried mail on it.
pub const SLOT_FREE_SECONDS: &str = "smarthost_delivery_slot_free_seconds";
/// Whether the node hears the shared queue's ready news (1) or finds other
/// nodes' work by its looks alone (0); absent where there is no news.
pub const READY_NEWS_SUBSCRIBED: &str = "smarthost_ready_news_subscribed";
/// Domains other nodes gave work that this node heard of at once.
pub const READY_NEWS: &str = "smarthost_ready_news_total";
/// One store call of the spool (a batch of messages, fsync or Redis
/// acknowledgement included).
pub const SPOOL_STORE_SECONDS: &str = "smarthost_spool_store_seconds";
pub const BODY_CACHE_BYTES: &str = "smarthost_body_cache_bytes";
pub const BODY_CACHE_READS: &str = "smarthost_body_cache_reads_total";
/// One Redis request (a round trip) by `component`: `spool`, `schedule`.
pub const REDIS_REQUEST_SECONDS: &str = "smarthost_redis_request_seconds";
/// Redis requests that failed, by `component` and `kind` (`error`,
/// `timeout`).
pub const REDIS_ERRORS: &str = "smarthost_redis_errors_total";
/// Commands the queue sent to Redis, by `component`: a script call is one.
pub const REDIS_COMMANDS: &str = "smarthost_redis_commands_total";

/// Messages kept in badmail, by `source`: `pickup`, `report`.
pub const BADMAIL_KEPT: &str = "smarthost_badmail_total";
/// Entries in this node's badmail directory now.
pub const BADMAIL_ENTRIES: &str = "smarthost_badmail_entries";
/// The share of time a connection thread ran (its CPU time), by `thread`
/// (0 is the system thread), smoothed over the last 50 ms or so; sampled
/// when there is more than one thread and `node.thread_busy_percent` is
/// not 0.
pub const THREAD_BUSY: &str = "smarthost_thread_busy_ratio";
/// Webhook events written to the outbox (one per endpoint that wants it).
pub const WEBHOOK_EVENTS: &str = "smarthost_webhook_events_total";
/// Webhook events that could not be written to the outbox.
pub const WEBHOOK_EVENTS_LOST: &str = "smarthost_webhook_events_lost_total";
/// Webhook posts, by `endpoint` and `result`: `ok`, `failed`.
pub const WEBHOOK_POSTS: &str = "smarthost_webhook_posts_total";
/// Webhook events dropped, by `endpoint` and `reason`: `max_age` (not
/// posted in time), `full` (the outbox held `webhooks.max_waiting`).
pub const WEBHOOK_EVENTS_DROPPED: &str = "smarthost_webhook_events_dropped_total";
/// Webhook events waiting in the outbox (the cluster's, on Redis).
pub const WEBHOOK_OUTBOX: &str = "smarthost_webhook_outbox_events";

/// Buckets for waits a client or an operator feels: 1 ms to 2 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Buckets for the time mail spends queued: 1 s to 2 days.
const DELAY_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0, 172800.0,
];

/// How many domains the queue gauges name, the longest queues first; the
/// rest are summed under `domain="(other)"`, so the page stays small with
/// 50 k domains queued.
pub const TOP_DOMAINS: usize = 50;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle; later
/// calls (a test starting several servers in one process) get the same.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was installed already; /metrics stays empty");
            }
            describe();
            handle
        })
        .clone()
}

fn builder() -> PrometheusBuilder {
    let delay = metrics_exporter_prometheus::Matcher::Full(DELIVERY_DELAY_SECONDS.to_string());
    let per_connection =
        metrics_exporter_prometheus::Matcher::Full(MESSAGES_PER_CONNECTION.to_string());
    PrometheusBuilder::new()
        .set_buckets(LATENCY_BUCKETS)
        .expect("the buckets are not empty")
        .set_buckets_for_metric(delay, DELAY_BUCKETS)
        .expect("the buckets are not empty")
        .set_buckets_for_metric(per_connection, COUNT_BUCKETS)
        .expect("the buckets are not empty")
}

/// Buckets of a count of messages.
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0];

/// Counts a take of work for a new connection: `messages` given, none
/// when the domain had nothing left.
pub fn delivery_take(messages: usize) {
    let result = if messages == 0 { "empty" } else { "work" };
    metrics::counter!(DELIVERY_TAKES, "result" => result).increment(1);
}

/// A domain waited `took` in line for a node connection slot.
pub fn slot_waited(took: Duration) {
    metrics::histogram!(SLOT_WAIT_SECONDS).record(took);
}

/// A node connection slot stood free for `took` before it carried mail.
pub fn slot_stood_free(took: Duration) {
    metrics::histogram!(SLOT_FREE_SECONDS).record(took);
}

/// The subscription to ready news stands (or not).
pub fn ready_news_subscribed(subscribed: bool) {
    metrics::gauge!(READY_NEWS_SUBSCRIBED).set(if subscribed { 1.0 } else { 0.0 });
}

/// A domain was heard of in the ready news.
pub fn ready_news_heard() {
    metrics::counter!(READY_NEWS).increment(1);
}

/// The gauge of connection thread `thread`'s busy share.
pub fn thread_busy(thread: usize) -> metrics::Gauge {
    metrics::gauge!(THREAD_BUSY, "thread" => thread.to_string())
}

/// A delivery connection that carried `messages` has ended.
pub fn connection_carried(messages: usize) {
    metrics::histogram!(MESSAGES_PER_CONNECTION).record(messages as f64);
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SMTP_CONNECTIONS, "SMTP connections admitted");
    describe_counter!(
        SMTP_REFUSED,
        "SMTP connections refused or evicted by the admission policy"
    );
    describe_gauge!(SMTP_SESSIONS, "SMTP sessions open");
    describe_counter!(MESSAGES_RECEIVED, "messages answered 250 after DATA");
    describe_counter!(RECIPIENTS_RECEIVED, "recipients of the messages received");
    describe_counter!(
        BYTES_RECEIVED,
        Unit::Bytes,
        "bytes of the messages received"
    );
    describe_counter!(
        MESSAGES_NOT_STORED,
        "messages whose store failed after DATA"
    );
    describe_counter!(
        QUOTA_REFUSALS,
        "messages refused because their key or user had sent its quota"
    );
    describe_counter!(
        RECIPIENTS_SUPPRESSED,
        "recipients not sent to because they are on the suppression list"
    );
    describe_counter!(
        SUPPRESSIONS_ADDED,
        "addresses added to the suppression list"
    );
    describe_counter!(
        BYTES_SPILLED,
        Unit::Bytes,
        "message bytes written to disk while they arrived"
    );
    describe_histogram!(
        ACCEPT_SECONDS,
        Unit::Seconds,
        "from the final dot to the message being durable"
    );
    describe_counter!(
        RECIPIENT_OUTCOMES,
        "recipient outcomes recorded, by outcome"
    );
    describe_histogram!(ATTEMPT_SECONDS, Unit::Seconds, "one delivery attempt");
    describe_histogram!(
        DELIVERY_DELAY_SECONDS,
        Unit::Seconds,
        "from reception to delivery, per recipient"
    );
    describe_gauge!(OUTBOUND_CONNECTIONS, "outgoing SMTP connections open");
    describe_counter!(
        DELIVERY_TAKES,
        "takes of work for a new connection, by result (work, empty)"
    );
    describe_histogram!(
        MESSAGES_PER_CONNECTION,
        "messages one delivery connection was given in all"
    );
    describe_histogram!(
        SLOT_WAIT_SECONDS,
        Unit::Seconds,
        "a domain's wait in line for a node connection slot"
    );
    describe_histogram!(
        SLOT_FREE_SECONDS,
        Unit::Seconds,
        "how long a node connection slot stood free before it carried mail"
    );
    describe_gauge!(
        READY_NEWS_SUBSCRIBED,
        "whether the node hears the shared queue's ready news (1) or not (0)"
    );
    describe_counter!(
        READY_NEWS,
        "domains other nodes gave work, heard of in the ready news"
    );
    describe_histogram!(SPOOL_STORE_SECONDS, Unit::Seconds, "one spool store call");
    describe_gauge!(
        BODY_CACHE_BYTES,
        Unit::Bytes,
        "copies of bodies just stored, kept for their first delivery"
    );
    describe_counter!(
        BODY_CACHE_READS,
        "bodies asked for at delivery, by whether a copy was kept (hit) or the spool was read (miss)"
    );
    describe_histogram!(REDIS_REQUEST_SECONDS, Unit::Seconds, "one Redis round trip");
    describe_counter!(REDIS_ERRORS, "Redis requests that failed or timed out");
    describe_counter!(
        REDIS_COMMANDS,
        "commands the queue sent to Redis (a script call counts once)"
    );
    describe_counter!(
        BADMAIL_KEPT,
        "messages kept in badmail (neither deliverable nor reportable), by source"
    );
    describe_gauge!(BADMAIL_ENTRIES, "entries in the badmail directory");
    describe_gauge!(
        THREAD_BUSY,
        "share of time a connection thread ran (its CPU time)"
    );
    describe_counter!(WEBHOOK_EVENTS, "webhook events written to the outbox");
    describe_counter!(
        WEBHOOK_EVENTS_LOST,
        "webhook events the outbox could not take"
    );
    describe_counter!(WEBHOOK_POSTS, "webhook posts, by endpoint and result");
    describe_counter!(
        WEBHOOK_EVENTS_DROPPED,
        "webhook events dropped, by endpoint and reason"
    );
    describe_gauge!(WEBHOOK_OUTBOX, "webhook events waiting in the outbox");
}

/// Counts an SMTP connection admitted, with the sessions now open.
pub fn connection_admitted(open: usize) {
    metrics::counter!(SMTP_CONNECTIONS).increment(1);
    sessions_open(open);
}

/// Counts a connection the admission policy refused or evicted.
pub fn connection_refused(reason: &'static str) {
    metrics::counter!(SMTP_REFUSED, "reason" => reason).increment(1);
}

/// Sets how many SMTP sessions are open.
pub fn sessions_open(open: usize) {
    metrics::gauge!(SMTP_SESSIONS).set(open as f64);
}

/// Counts a message answered `250` after DATA, `took` after its final dot.
pub fn message_received(recipients: usize, bytes: u64, took: Duration) {
    metrics::counter!(MESSAGES_RECEIVED).increment(1);
    metrics::counter!(RECIPIENTS_RECEIVED).increment(recipients as u64);
    metrics::counter!(BYTES_RECEIVED).increment(bytes);
    metrics::histogram!(ACCEPT_SECONDS).record(took);
}

/// Counts message bytes written to disk while they arrived.
pub fn body_spilled(bytes: usize) {
    metrics::counter!(BYTES_SPILLED).increment(bytes as u64);
}

/// Counts a message whose store failed after DATA.
pub fn message_not_stored() {
    metrics::counter!(MESSAGES_NOT_STORED).increment(1);
}

/// Counts a message refused by a quota; `via` is `api` or `smtp`.
pub fn quota_refused(via: &'static str) {
    metrics::counter!(QUOTA_REFUSALS, "via" => via).increment(1);
}

/// Counts a recipient held back by the suppression list; `via` is `api`
/// (left out of a send) or `delivery` (failed without a connection).
pub fn recipient_suppressed(via: &'static str) {
    metrics::counter!(RECIPIENTS_SUPPRESSED, "via" => via).increment(1);
}

/// Counts addresses added to the suppression list; `source` is `bounce`
/// or `api`.
pub fn suppressions_added(source: &'static str, count: usize) {
    metrics::counter!(SUPPRESSIONS_ADDED, "source" => source).increment(count as u64);
}

/// Counts a message kept in badmail, with the entries now there.
pub fn badmail_kept(source: crate::badmail::Source, entries: i64) {
    metrics::counter!(BADMAIL_KEPT, "source" => source.name()).increment(1);
    badmail_entries(entries);
}

/// Sets how many entries badmail holds.
pub fn badmail_entries(entries: i64) {
    metrics::gauge!(BADMAIL_ENTRIES).set(entries as f64);
}

/// Counts webhook events written to the outbox.
pub fn webhook_events_recorded(count: usize) {
    metrics::counter!(WEBHOOK_EVENTS).increment(count as u64);
}

/// Counts webhook events the outbox could not take.
pub fn webhook_events_lost(count: usize) {
    metrics::counter!(WEBHOOK_EVENTS_LOST).increment(count as u64);
}

/// Counts one post of `events` webhook events to `endpoint`.
pub fn webhook_post(endpoint: &str, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    metrics::counter!(WEBHOOK_POSTS, "endpoint" => endpoint.to_string(), "result" => result)
        .increment(1);
}

/// Counts webhook events dropped; `reason` is `max_age` or `full`.
pub fn webhook_events_dropped(endpoint: &str, reason: &'static str, count: usize) {
    metrics::counter!(WEBHOOK_EVENTS_DROPPED, "endpoint" => endpoint.to_string(), "reason" => reason)
        .increment(count as u64);
}

/// Sets how many webhook events wait in the outbox.
pub fn webhook_outbox(events: u64) {
    metrics::gauge!(WEBHOOK_OUTBOX).set(events as f64);
}

/// Counts one store call of the spool.
pub fn spool_store(took: Duration) {
    metrics::histogram!(SPOOL_STORE_SECONDS).record(took);
}

pub fn body_cache(bytes: u64) {
    metrics::gauge!(BODY_CACHE_BYTES).set(bytes as f64);
}

pub fn body_cache_read(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    metrics::counter!(BODY_CACHE_READS, "result" => result).increment(1);
}

/// Counts the outcomes of one recorded completion: an attempt's
/// (`attempt` set) or an expiry sweep's.
pub fn outcomes(completion: &Completion, attempt: Option<&MessageOutcome>, now_ms: u64) {
    if let Some(attempt) = attempt {
        metrics::histogram!(ATTEMPT_SECONDS).record(attempt.latency);
    }
    let delay = Duration::from_millis(now_ms.saturating_sub(completion.record.received_ms));
    for note in &completion.notes {
        let outcome = match note.result {
            RcptResult::Delivered => {
                metrics::histogram!(DELIVERY_DELAY_SECONDS).record(delay);
                "delivered"
            }
            RcptResult::Deferred => "deferred",
            RcptResult::Failed if note.reply.starts_with(EXPIRED) => "expired",
            RcptResult::Failed => "failed",
        };
        metrics::counter!(RECIPIENT_OUTCOMES, "outcome" => outcome).increment(1);
    }
}

/// Counts one Redis round trip of `component` that took `took`.
pub fn redis_request(component: &'static str, took: Duration, failed: Option<RedisFailure>) {
    metrics::histogram!(REDIS_REQUEST_SECONDS, "component" => component).record(took);
    if let Some(failure) = failed {
        let kind = match failure {
            RedisFailure::Error => "error",
            RedisFailure::Timeout => "timeout",
        };
        metrics::counter!(REDIS_ERRORS, "component" => component, "kind" => kind).increment(1);
    }
}

/// `commands` sent to Redis in one request of `component`, counted
/// whatever the answer.
pub fn redis_commands(component: &'static str, commands: usize) {
    metrics::counter!(REDIS_COMMANDS, "component" => component).increment(commands as u64);
}

/// How a Redis request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedisFailure {
    Error,
    Timeout,
}

/// Counts one open outgoing connection while it lives.
#[derive(Debug)]
pub struct OutboundOpen(());

impl OutboundOpen {
    pub fn new() -> Self {
        metrics::gauge!(OUTBOUND_CONNECTIONS).increment(1.0);
        OutboundOpen(())
    }
}

impl Default for OutboundOpen {
    fn default() -> Self {
        OutboundOpen::new()
    }
}

impl Drop for OutboundOpen {
    fn drop(&mut self) {
        metrics::gauge!(OUTBOUND_CONNECTIONS).decrement(1.0);
    }
}

/// What is read when the page is scraped.
#[derive(Debug, Default)]
pub struct Scrape {
    /// The queue, when this process answers for it: on the local backend
    /// always, on Redis only on the leader, so that a sum over the pods
    /// counts the shared queue once.
    pub queue: Option<QueueStats>,
    /// Whether this process's coordinator leads; `None` without one.
    pub leader: Option<bool>,
    /// The login counters by scope (`smtp`, `admin`).
    pub logins: Vec<(&'static str, GuardCounts)>,
}

impl Scrape {
    /// The page: these states, then every recorded event.
    pub fn render(&self, handle: &PrometheusHandle) -> String {
        handle.run_upkeep();
        let mut page = self.states();
        page.push_str(&handle.render());
        page
    }

    /// The states in the Prometheus text format.
    pub fn states(&self) -> String {
        let mut out = String::new();
        if let Some(leader) = self.leader {
            family(
                &mut out,
                "smarthost_coordinator_leader",
                "gauge",
                "1 while this process's coordinator leads the cluster",
            );
            let _ = writeln!(out, "smarthost_coordinator_leader {}", u8::from(leader));
        }
        if let Some(queue) = &self.queue {
            queue_states(&mut out, queue);
        }
        if !self.logins.is_empty() {
            login_counters(&mut out, &self.logins);
        }
        out
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn queue_states(out: &mut String, queue: &QueueStats) {
    family(
        out,
        "smarthost_queue_messages",
        "gauge",
        "messages with deliveries left (cluster-wide on Redis)",
    );
    let _ = writeln!(out, "smarthost_queue_messages {}", queue.messages);
    family(
        out,
        "smarthost_queue_deliveries",
        "gauge",
        "deliveries (message x domain) left, by state",
    );
    for (state, n) in [
        ("ready", queue.ready),
        ("deferred", queue.deferred),
        ("in_flight", queue.in_flight),
    ] {
        let _ = writeln!(out, "smarthost_queue_deliveries{{state=\"{state}\"}} {n}");
    }
    family(
        out,
        "smarthost_queue_domain_deliveries",
        "gauge",
        "deliveries left for the domains with the longest queues",
    );
    let mut domains: Vec<(&String, &usize)> = queue.deliveries_by_domain.iter().collect();
    domains.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
    for (domain, n) in domains.iter().take(TOP_DOMAINS) {
        let _ = writeln!(
            out,
            "smarthost_queue_domain_deliveries{{domain=\"{}\"}} {n}",
            label_value(domain)
        );
    }
    let rest: usize = domains.iter().skip(TOP_DOMAINS).map(|(_, n)| **n).sum();
    if domains.len() > TOP_DOMAINS {
        let _ = writeln!(
            out,
            "smarthost_queue_domain_deliveries{{domain=\"(other)\"}} {rest}"
        );
    }
    family(
        out,
        "smarthost_queue_waiting_stores",
        "gauge",
        "received messages waiting for a store call on this node",
    );
    let _ = writeln!(out, "smarthost_queue_waiting_stores {}", queue.waiting);
    family(
        out,
        "smarthost_queue_pending_reports",
        "gauge",
        "delivery reports recorded with an outcome and not queued yet",
    );
    let _ = writeln!(
        out,
        "smarthost_queue_pending_reports {}",
        queue.pending_reports
    );
}

/// A login counter: its name, its help and how to read it.
type LoginCounter = (&'static str, &'static str, fn(&GuardCounts) -> u64);

fn login_counters(out: &mut String, logins: &[(&'static str, GuardCounts)]) {
    let counters: [LoginCounter; 5] = [
        (
            "smarthost_login_checks_total",
            "password or token checks run",
            |c| c.checks_run,
        ),
        (
            "smarthost_login_failures_total",
            "checks that did not match",
            |c| c.failures,
        ),
        (
            "smarthost_login_busy_total",
            "attempts refused because every check slot was taken",
            |c| c.checks_refused_busy,
        ),
        (
            "smarthost_login_blocked_total",
            "attempts refused unchecked from a blocked address or user",
            |c| c.refused_address_blocked + c.refused_user_blocked,
        ),
        (
            "smarthost_login_blocks_total",
            "blocks of an address or user that began",
            |c| c.address_blocks + c.user_blocks,
        ),
    ];
    for (name, help, value) in counters {
        family(out, name, "counter", help);
        for (scope, counts) in logins {
            let _ = writeln!(out, "{name}{{scope=\"{scope}\"}} {}", value(counts));
        }
    }
}

/// A label value with `\`, `"` and line feeds escaped, as the text format
/// asks.
fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The samples of a page, `name{labels}` → value.
    fn samples(page: &str) -> BTreeMap<String, f64> {
        page.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (key, value) = l.rsplit_once(' ').expect("name value");
                (key.to_string(), value.parse().expect("a number"))
            })
            .collect()
    }

    #[test]
    fn queue_gauges_name_the_longest_queues_and_sum_the_rest() {
        let mut by_domain = BTreeMap::new();
        for n in 0..(TOP_DOMAINS + 10) {
            by_domain.insert(format!("d{n:03}.test"), n + 1);
        }
        let scrape = Scrape {
            queue: Some(QueueStats {
                messages: 7,
                deliveries_by_domain: by_domain,
                ready: 1,
                deferred: 2,
                in_flight: 3,
                ..QueueStats::default()
            }),
            leader: Some(true),
            logins: Vec::new(),
        };
        let page = scrape.states();
        let s = samples(&page);
        assert_eq!(s["smarthost_queue_messages"], 7.0);
        assert_eq!(s["smarthost_queue_deliveries{state=\"deferred\"}"], 2.0);
        assert_eq!(s["smarthost_coordinator_leader"], 1.0);
        let named: Vec<_> = s
            .keys()
            .filter(|k| k.starts_with("smarthost_queue_domain_deliveries{domain=\"d"))
            .collect();
        assert_eq!(named.len(), TOP_DOMAINS);
        assert!(s.contains_key("smarthost_queue_domain_deliveries{domain=\"d059.test\"}"));
        assert!(!s.contains_key("smarthost_queue_domain_deliveries{domain=\"d000.test\"}"));
        // The ten shortest: 1 + 2 + … + 10.
        assert_eq!(
            s["smarthost_queue_domain_deliveries{domain=\"(other)\"}"],
            55.0
        );
    }

    #[test]
    fn a_node_that_does_not_lead_shows_no_queue() {
        let scrape = Scrape {
            queue: None,
            leader: Some(false),
            logins: vec![("smtp", GuardCounts::default())],
        };
        let s = samples(&scrape.states());
        assert_eq!(s["smarthost_coordinator_leader"], 0.0);
        assert!(!s.keys().any(|k| k.starts_with("smarthost_queue")));
        assert_eq!(s["smarthost_login_failures_total{scope=\"smtp\"}"], 0.0);
    }

    #[test]
    fn every_metric_is_documented() {
        let docs = include_str!("../../docs/metrics.md");
        let source = include_str!("metrics.rs");
        let names: std::collections::BTreeSet<&str> = source
            .match_indices("smarthost_")
            .map(|(at, _)| {
                let rest = &source[at..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(rest.len());
                let name = &rest[..end];
                ["_bucket", "_count", "_sum"]
                    .iter()
                    .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n))
            })
            // A prefix a test looks for is not a name.
            .filter(|name| name.split('_').count() >= 3)
            .collect();
        assert!(names.len() > 20, "{names:?}");
        for name in names {
            assert!(
                docs.contains(&format!("`{name}`")),
                "{name} is not in docs/metrics.md"
            );
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn recorded_events_are_rendered_with_their_labels() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        // One connection closed, one still open when the page is rendered.
        let _open = metrics::with_local_recorder(&recorder, || {
            describe();
            metrics::counter!(RECIPIENT_OUTCOMES, "outcome" => "delivered").increment(3);
            redis_request(
                "spool",
                Duration::from_millis(3),
                Some(RedisFailure::Timeout),
            );
            let open = OutboundOpen::new();
            metrics::histogram!(ACCEPT_SECONDS).record(0.02);
            drop(open);
            OutboundOpen::new()
        });
        let page = Scrape::default().render(&handle);
        let s = samples(&page);
        assert_eq!(
            s["smarthost_recipient_outcomes_total{outcome=\"delivered\"}"],
            3.0
        );
        assert_eq!(
            s["smarthost_redis_errors_total{component=\"spool\",kind=\"timeout\"}"],
            1.0
        );
        assert_eq!(s["smarthost_outbound_connections"], 1.0);
        assert_eq!(s["smarthost_message_accept_seconds_count"], 1.0);
        assert_eq!(
            s["smarthost_message_accept_seconds_bucket{le=\"0.025\"}"],
            1.0
        );
        assert_eq!(
            s["smarthost_message_accept_seconds_bucket{le=\"0.01\"}"],
            0.0
        );
        assert!(page.contains("# TYPE smarthost_message_accept_seconds histogram"));
    }
}
