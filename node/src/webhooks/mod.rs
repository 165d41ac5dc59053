//! Delivery webhooks: what became of each recipient, posted as JSON to
//! the applications' endpoints (`[[webhooks.endpoints]]`).
//!
//! An event is written to a durable outbox ([`outbox`]) before the outcome
//! it reports is: `accepted` before the `250`/`200` is given, the outcome
//! of an attempt or an expiry before the message's record says it. A node
//! that dies in between repeats the step, and the event comes again with
//! the same `id`; none is lost. The [`sender`] posts what the outbox holds,
//! in batches per endpoint, signed, and tries again with a growing wait
//! until the endpoint takes them or they are older than `max_age`.
//!
//! Mail the relay makes itself (delivery reports, from `<>`) has no events.

pub mod outbox;
pub mod sender;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use serde::{Deserialize, Serialize};
use smarthost_proto::envelope::MessageRecord;

use crate::config::{WebhookEndpoint, WebhooksConfig};
use crate::delivery::RcptResult;
use crate::scheduler::{Completion, RecipientNote, EXPIRED};
use outbox::{Entry, Outbox};

/// What happened to a recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The relay took the message (`250` to SMTP, `200` to the send API).
    Accepted,
    Delivered,
    /// A temporary failure: the delivery is tried again.
    Deferred,
    /// A permanent failure: the sender gets a bounce.
    Bounced,
    /// The message was queued longer than `queue.max_lifetime`.
    Expired,
    /// The recipient is on the suppression list: not attempted.
    Suppressed,
}

impl EventKind {
    pub const ALL: [EventKind; 6] = [
        EventKind::Accepted,
        EventKind::Delivered,
        EventKind::Deferred,
        EventKind::Bounced,
        EventKind::Expired,
        EventKind::Suppressed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Accepted => "accepted",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Bounced => "bounced",
            EventKind::Expired => "expired",
            EventKind::Suppressed => "suppressed",
        }
    }
}

/// One event as posted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// The same for the same step of the same recipient, however often it
    /// is posted: receivers drop what they have seen.
    pub id: String,
    pub event: EventKind,
    /// RFC 3339, when the event was made.
    pub time: String,
    pub message_id: String,
    pub sender: String,
    pub recipient: String,
    /// The application key or SMTP user that sent the message.
    pub account: Option<String>,
    /// The reply that decided it (none for `accepted`).
    pub reply: Option<String>,
    /// Which attempt (0 for `accepted`, and for an expiry before any).
    pub attempt: u32,
    /// The server that answered, if one did.
    pub remote_host: Option<String>,
}

/// The events of a message that was just accepted, one per recipient;
/// none for mail from `<>`.
pub fn accepted(record: &MessageRecord, time: SystemTime) -> Vec<Event> {
    let Some(sender) = &record.envelope.sender else {
        return Vec::new();
    };
    let time = rfc3339(time);
    (0..record.envelope.recipients.len() as u32)
        .map(|recipient| Event {
            id: event_id(record, recipient, EventKind::Accepted, 0),
            event: EventKind::Accepted,
            time: time.clone(),
            message_id: record.id.to_string(),
            sender: sender.to_string(),
            recipient: record.envelope.recipients[recipient as usize]
                .address
                .to_string(),
            account: record.client.auth_user.clone(),
            reply: None,
            attempt: 0,
            remote_host: None,
        })
        .collect()
}

/// The events of an attempt's (or an expiry's) outcome, one per
/// recipient it decided or deferred.
pub fn outcome(completion: &Completion, time: SystemTime) -> Vec<Event> {
    let record = &completion.record;
    let Some(sender) = &record.envelope.sender else {
        return Vec::new();
    };
    let time = rfc3339(time);
    completion
        .notes
        .iter()
        .filter_map(|note| {
            let address = &record
                .envelope
                .recipients
                .get(note.recipient as usize)?
                .address;
            let kind = kind_of(note, &crate::suppression::address_key(address));
            Some(Event {
                id: event_id(record, note.recipient, kind, completion.attempt),
                event: kind,
                time: time.clone(),
                message_id: record.id.to_string(),
                sender: sender.to_string(),
                recipient: address.to_string(),
                account: record.client.auth_user.clone(),
                reply: Some(note.reply.clone()),
                attempt: completion.attempt,
                remote_host: completion.remote_host.clone(),
            })
        })
        .collect()
}

/// Which event a recipient's note is. The relay's own replies for a
/// lifetime run out and for a suppressed recipient say which they are.
fn kind_of(note: &RecipientNote, address_key: &str) -> EventKind {
    match note.result {
        RcptResult::Delivered => EventKind::Delivered,
        RcptResult::Deferred => EventKind::Deferred,
        RcptResult::Failed if note.reply.starts_with(EXPIRED) => EventKind::Expired,
        RcptResult::Failed if note.reply == crate::suppression::refusal(address_key) => {
            EventKind::Suppressed
        }
        RcptResult::Failed => EventKind::Bounced,
    }
}

fn event_id(record: &MessageRecord, recipient: u32, kind: EventKind, attempt: u32) -> String {
    format!("{}.{recipient}.{}.{attempt}", record.id, kind.as_str())
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// The headers that sign a post: `Smarthost-Timestamp` (Unix seconds)
/// and `Smarthost-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut context = hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    let tag = context.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("v1={hex}")
}

/// The wait before the next post of an event after `failures` failed
/// posts: 1 s, doubling, at most `max`, give or take a tenth.
pub fn backoff(failures: u32, max: Duration, jitter: f64) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1 << failures.saturating_sub(1).min(20));
    base.min(max).mul_f64(1.0 + jitter.clamp(-0.1, 0.1))
}

/// Whether `endpoint` wants events of `kind` about mail of `account`.
fn wants(endpoint: &WebhookEndpoint, account: Option<&str>, kind: EventKind) -> bool {
    (endpoint.events.is_empty() || endpoint.events.contains(&kind))
        && (endpoint.accounts.is_empty()
            || account.is_some_and(|a| endpoint.accounts.iter().any(|e| e == a)))
}

/// The webhooks of this process: the endpoints and the outbox. Cloned
/// into whatever makes events.
#[derive(Clone)]
pub struct Webhooks {
    inner: Arc<Inner>,
}

struct Inner {
    config: WebhooksConfig,
    outbox: Arc<dyn Outbox>,
    /// Wakes the sender when events were added.
    added: tokio::sync::Notify,
    /// Entries in the outbox when the sender last counted them (every
    /// pass): against `max_waiting` without a count per event.
    waiting: std::sync::atomic::AtomicU64,
}

impl Webhooks {
    pub fn new(config: WebhooksConfig, outbox: Arc<dyn Outbox>) -> Webhooks {
        Webhooks {
            inner: Arc::new(Inner {
                config,
                outbox,
                added: tokio::sync::Notify::new(),
                waiting: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    pub fn config(&self) -> &WebhooksConfig {
        &self.inner.config
    }

    pub fn outbox(&self) -> &Arc<dyn Outbox> {
        &self.inner.outbox
    }

    pub fn enabled(&self) -> bool {
        !self.inner.config.endpoints.is_empty()
    }

    /// Whether any endpoint wants events about mail of `account`: if not,
    /// none are made.
    pub fn wanted(&self, account: Option<&str>) -> bool {
        self.inner
            .config
            .endpoints
            .iter()
            .any(|e| EventKind::ALL.iter().any(|k| wants(e, account, *k)))
    }

    /// Writes `events` to the outbox, one entry per endpoint that wants
    /// each; durable when it returns.
    pub async fn record(&self, events: Vec<Event>) -> Result<(), String> {
        let now = crate::now_ms();
        let entries: Vec<Entry> = events
            .into_iter()
            .flat_map(|event| {
                self.inner
                    .config
                    .endpoints
                    .iter()
                    .filter(|e| wants(e, event.account.as_deref(), event.event))
                    .map(|e| Entry::new(&e.name, event.clone(), now))
                    .collect::<Vec<_>>()
            })
            .collect();
        if entries.is_empty() {
            return Ok(());
        }
        let count = entries.len();
        let waiting = self.inner.waiting.load(Ordering::Relaxed);
        if waiting >= self.inner.config.max_waiting {
            tracing::warn!(
                waiting,
                events = count,
                "webhook events dropped: the outbox holds webhooks.max_waiting"
            );
            for entry in &entries {
                crate::metrics::webhook_events_dropped(&entry.endpoint, "full", 1);
            }
            return Ok(());
        }
        self.inner
            .waiting
            .fetch_add(count as u64, Ordering::Relaxed);
        self.inner.outbox.add(entries).await?;
        crate::metrics::webhook_events_recorded(count);
        self.inner.added.notify_one();
        Ok(())
    }

    /// The `accepted` events of a stored message, if any endpoint wants
    /// them. A failure is logged and counted: the message is stored and
    /// is answered as such.
    pub async fn record_accepted(&self, record: &MessageRecord) {
        if !self.wanted(record.client.auth_user.as_deref()) {
            return;
        }
        let events = accepted(record, SystemTime::now());
        self.record_or_count(events).await;
    }

    /// The events of outcomes, before the records that say them are
    /// written. An error leaves the outcomes unwritten.
    pub async fn record_outcomes(&self, completions: &[Completion]) -> Result<(), String> {
        let now = SystemTime::now();
        let events: Vec<Event> = completions
            .iter()
            .filter(|c| self.wanted(c.record.client.auth_user.as_deref()))
            .flat_map(|c| outcome(c, now))
            .collect();
        if events.is_empty() {
            return Ok(());
        }
        self.record(events).await
    }

    /// Records `events`, or logs and counts them as lost when the outbox
    /// cannot take them: for a step that cannot be undone.
    pub async fn record_or_count(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        let count = events.len();
        if let Err(error) = self.record(events).await {
            tracing::error!(%error, events = count, "webhook events not recorded");
            crate::metrics::webhook_events_lost(count);
        }
    }

    /// What the sender counted in the outbox.
    pub fn set_waiting(&self, waiting: u64) {
        self.inner.waiting.store(waiting, Ordering::Relaxed);
        crate::metrics::webhook_outbox(waiting);
    }

    /// Waits until events were added (or a moment passed).
    pub async fn added(&self, at_most: Duration) {
        let _ = tokio::time::timeout(at_most, self.inner.added.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::delivery::{MessageOutcome, RcptOutcome};
    use crate::scheduler::{apply_outcome, RetryPolicy};
    use crate::spool::suite::message;

    fn endpoint(name: &str, accounts: &[&str], events: &[EventKind]) -> WebhookEndpoint {
        WebhookEndpoint {
            name: name.into(),
            url: "http://127.0.0.1:9/".into(),
            secret: "s".into(),
            accounts: accounts.iter().map(|a| a.to_string()).collect(),
            events: events.to_vec(),
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2 ("what do ya want for nothing?"), split as
        // "<timestamp>.<body>" would be.
        let sig = signature(b"Jefe", 0, b"");
        assert!(sig.starts_with("v1="));
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"Jefe");
        let tag = hmac::sign(&key, b"0.");
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sig, format!("v1={hex}"));
        let whole = hmac::sign(&key, b"what do ya want for nothing?");
        assert_eq!(
            whole.as_ref()[..4],
            [0x5b, 0xdc, 0xc1, 0x46],
            "aws-lc's HMAC is the RFC's"
        );
        assert_ne!(signature(b"Jefe", 1, b""), sig);
        assert_ne!(signature(b"Jefe", 0, b"x"), sig);
    }

    #[test]
    fn backoff_doubles_from_a_second_up_to_the_most() {
        let max = Duration::from_secs(60);
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n, max, 0.0).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(backoff(200, max, 0.0), max);
        assert!(backoff(3, max, 0.5) <= Duration::from_millis(4400));
    }

    #[test]
    fn endpoints_choose_accounts_and_kinds() {
        let all = endpoint("all", &[], &[]);
        let shop = endpoint("shop", &["shop"], &[EventKind::Bounced]);
        assert!(wants(&all, None, EventKind::Accepted));
        assert!(wants(&all, Some("x"), EventKind::Expired));
        assert!(wants(&shop, Some("shop"), EventKind::Bounced));
        assert!(!wants(&shop, Some("shop"), EventKind::Delivered));
        assert!(!wants(&shop, Some("other"), EventKind::Bounced));
        assert!(!wants(&shop, None, EventKind::Bounced));
    }

    #[test]
    fn each_note_becomes_the_event_it_is() {
        let mut record = message(0, 10).record;
        record.client.auth_user = Some("shop".into());
        let recipients = record.envelope.recipients.len() as u32;
        assert!(recipients >= 1);
        let address = crate::suppression::address_key(&record.envelope.recipients[0].address);
        let table = [
            (
                RcptResult::Delivered,
                "250 ok".to_string(),
                EventKind::Delivered,
            ),
            (
                RcptResult::Deferred,
                "451 later".to_string(),
                EventKind::Deferred,
            ),
            (
                RcptResult::Failed,
                "550 5.1.1 no such user".to_string(),
                EventKind::Bounced,
            ),
            (
                RcptResult::Failed,
                format!("{EXPIRED} after 3 attempts"),
                EventKind::Expired,
            ),
            (
                RcptResult::Failed,
                crate::suppression::refusal(&address),
                EventKind::Suppressed,
            ),
        ];
        for (result, reply, kind) in table {
            let note = RecipientNote {
                recipient: 0,
                result,
                reply: reply.clone(),
            };
            assert_eq!(kind_of(&note, &address), kind, "{reply}");
        }
        // A forged suppression reply for another address is a bounce.
        let note = RecipientNote {
            recipient: 0,
            result: RcptResult::Failed,
            reply: crate::suppression::refusal("else@example.org"),
        };
        assert_eq!(kind_of(&note, &address), EventKind::Bounced);
    }

    #[test]
    fn an_outcome_gives_one_event_per_recipient_with_a_stable_id() {
        let mut record = message(0, 10).record;
        record.client.auth_user = Some("shop".into());
        let domain = record.deliveries[0].domain.clone();
        let outcome = MessageOutcome {
            recipients: vec![RcptOutcome {
                recipient: record.deliveries[0].recipients[0],
                result: RcptResult::Delivered,
                reply: "250 2.0.0 ok".into(),
            }],
            remote: None,
            latency: Duration::ZERO,
        };
        let policy = RetryPolicy {
            intervals: vec![Duration::from_secs(1)],
            max_lifetime: Duration::from_secs(60),
            delay_notification: Duration::from_secs(30),
        };
        let completion =
            apply_outcome(&record, &domain, &outcome, record.received_ms, &policy, 0.0);
        let events = super::outcome(&completion, SystemTime::now());
        assert_eq!(events.len(), record.deliveries[0].recipients.len());
        let first = &events[0];
        assert_eq!(first.event, EventKind::Delivered);
        assert_eq!(first.account.as_deref(), Some("shop"));
        assert_eq!(first.attempt, 1);
        assert_eq!(first.reply.as_deref(), Some("250 2.0.0 ok"));
        let again = super::outcome(&completion, SystemTime::now());
        assert_eq!(again[0].id, first.id, "the same step has the same id");
        let accepted = super::accepted(&record, SystemTime::now());
        assert_eq!(accepted.len(), record.envelope.recipients.len());
        assert!(accepted
            .iter()
            .all(|e| e.event == EventKind::Accepted && e.reply.is_none()));
        assert_ne!(accepted[0].id, first.id);

        let mut report = record.clone();
        report.envelope.sender = None;
        assert!(super::accepted(&report, SystemTime::now()).is_empty());
    }

    #[tokio::test]
    async fn record_writes_one_entry_per_endpoint_that_wants_the_event() {
        let outbox = Arc::new(outbox::LocalOutbox::in_memory());
        let config = WebhooksConfig {
            endpoints: vec![
                endpoint("all", &[], &[]),
                endpoint("shop", &["shop"], &[EventKind::Accepted]),
                endpoint("other", &["other"], &[]),
            ],
            ..WebhooksConfig::default()
        };
        let hooks = Webhooks::new(config, outbox.clone());
        let mut record = message(0, 10).record;
        record.client.auth_user = Some("shop".into());
        hooks.record_accepted(&record).await;
        let n = record.envelope.recipients.len();
        assert_eq!(outbox.count().await.unwrap(), 2 * n as u64);

        let config = WebhooksConfig {
            endpoints: vec![endpoint("shop", &["shop"], &[])],
            ..WebhooksConfig::default()
        };
        let hooks = Webhooks::new(config, outbox.clone());
        assert!(hooks.wanted(Some("shop")));
        // A full outbox takes no more.
        let full = Webhooks::new(
            WebhooksConfig {
                endpoints: vec![endpoint("all", &[], &[])],
                max_waiting: 2 * n as u64 + 1,
                ..WebhooksConfig::default()
            },
            outbox.clone(),
        );
        full.set_waiting(outbox.count().await.unwrap());
        let second = message(1, 10).record;
        full.record_accepted(&second).await;
        let held = 2 * n + second.envelope.recipients.len();
        assert_eq!(outbox.count().await.unwrap(), held as u64, "below the most");
        full.record_accepted(&message(2, 10).record).await;
        assert_eq!(outbox.count().await.unwrap(), held as u64, "full");
        assert!(!hooks.wanted(Some("other")));
        assert!(!hooks.wanted(None));
    }
}
