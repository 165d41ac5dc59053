//! Posts the outbox's events to their endpoints: a pass takes what is due
//! (leased to this node), posts it in batches per endpoint, removes what
//! an endpoint took (`2xx`) and puts the rest back with a growing wait.
//! Passes follow each other while events are due, wake when events are
//! added and otherwise run every [`IDLE_PASS`] (other nodes add too, and
//! leases of dead nodes run out).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use futures_util::stream::{self, StreamExt};
use rustls::ClientConfig;

use super::outbox::Entry;
use super::{backoff, signature, Webhooks};
use crate::config::WebhookEndpoint;

/// The longest a pass waits for another when nothing woke it.
pub const IDLE_PASS: Duration = Duration::from_secs(1);
/// Posts under way at once.
const CONCURRENT_POSTS: usize = 8;

pub struct Sender {
    webhooks: Webhooks,
    http: awc::Client,
    stopped: bool,
}

/// Stops taking events (at shutdown); entries taken stay leased until
/// their lease runs out.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopSending;

impl Sender {
    /// `tls` verifies the endpoints' certificates (the delivery's roots).
    pub fn new(webhooks: Webhooks, tls: Arc<ClientConfig>) -> Sender {
        let timeout = webhooks.config().timeout;
        let connector = awc::Connector::new().rustls_0_23(tls).timeout(timeout);
        let http = awc::Client::builder()
            .connector(connector)
            .timeout(timeout)
            .add_default_header((
                awc::http::header::USER_AGENT,
                concat!("smarthost/", env!("CARGO_PKG_VERSION")),
            ))
            .finish();
        Sender {
            webhooks,
            http,
            stopped: false,
        }
    }

    /// Runs a pass, then the next: at once if the pass was full, else once
    /// events are added or [`IDLE_PASS`] went by.
    fn pass(&mut self, ctx: &mut Context<Self>) {
        if self.stopped {
            return;
        }
        let webhooks = self.webhooks.clone();
        let http = self.http.clone();
        let pass = async move {
            match one_pass(&webhooks, &http).await {
                Ok(taken) if taken >= pass_size(&webhooks) => {}
                Ok(_) => webhooks.added(IDLE_PASS).await,
                Err(error) => {
                    tracing::warn!(%error, "webhook outbox not read");
                    tokio::time::sleep(IDLE_PASS).await;
                }
            }
        };
        ctx.spawn(
            pass.into_actor(self)
                .map(|(), sender, ctx| sender.pass(ctx)),
        );
    }
}

impl Actor for Sender {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.pass(ctx);
    }
}

impl Handler<StopSending> for Sender {
    type Result = ();

    fn handle(&mut self, _: StopSending, _: &mut Context<Self>) {
        self.stopped = true;
    }
}

/// Entries one pass takes: a full batch for each post under way at once.
fn pass_size(webhooks: &Webhooks) -> usize {
    CONCURRENT_POSTS * webhooks.config().batch_size
}

/// Takes what is due and posts it; returns how many entries it took.
async fn one_pass(webhooks: &Webhooks, http: &awc::Client) -> Result<usize, String> {
    let config = webhooks.config();
    let outbox = webhooks.outbox();
    let now = crate::now_ms();
    // Long enough for every post of the pass to end or time out: the
    // entries fill at most a batch per post under way, plus a part-filled
    // one per endpoint.
    let batches = CONCURRENT_POSTS + config.endpoints.len();
    let rounds = batches.div_ceil(CONCURRENT_POSTS) + 1;
    let lease = config.timeout * rounds as u32;
    let taken = outbox.take(now, pass_size(webhooks), lease).await?;
    let count = taken.len();
    webhooks.set_waiting(outbox.count().await?);
    if taken.is_empty() {
        return Ok(0);
    }
    let max_age = config.max_age.as_millis() as u64;
    let mut by_endpoint: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    let mut dropped = Vec::new();
    let mut unknown = Vec::new();
    for entry in taken {
        if now.saturating_sub(entry.created_ms) > max_age {
            tracing::warn!(endpoint = %entry.endpoint, event = %entry.event.id,
                "webhook event dropped: older than webhooks.max_age");
            crate::metrics::webhook_events_dropped(&entry.endpoint, "max_age", 1);
            dropped.push(entry.name());
        } else if config.endpoints.iter().any(|e| e.name == entry.endpoint) {
            by_endpoint
                .entry(entry.endpoint.clone())
                .or_default()
                .push(entry);
        } else {
            // Another node may know the endpoint (a configuration being
            // rolled out): left for it, or for max_age.
            unknown.push(entry);
        }
    }
    outbox.done(&dropped).await?;
    let later = now + config.max_retry_interval.as_millis() as u64;
    outbox.retry(&unknown, later).await?;
    let batches: Vec<(&WebhookEndpoint, Vec<Entry>)> = by_endpoint
        .into_iter()
        .flat_map(|(name, entries)| {
            let endpoint = config.endpoints.iter().find(|e| e.name == name);
            let chunks: Vec<Vec<Entry>> = entries
                .chunks(config.batch_size)
                .map(<[Entry]>::to_vec)
                .collect();
            chunks.into_iter().filter_map(move |c| Some((endpoint?, c)))
        })
        .collect();
    let results: Vec<Result<(), String>> = stream::iter(batches)
        .map(|(endpoint, entries)| async move {
            let posted = post(http, endpoint, &entries).await;
            crate::metrics::webhook_post(&endpoint.name, posted.is_ok());
            settle(webhooks, endpoint, entries, posted).await
        })
        .buffer_unordered(CONCURRENT_POSTS)
        .collect()
        .await;
    results.into_iter().collect::<Result<(), String>>()?;
    Ok(count)
}

/// Removes the entries an endpoint took, or puts them back for later.
async fn settle(
    webhooks: &Webhooks,
    endpoint: &WebhookEndpoint,
    entries: Vec<Entry>,
    posted: Result<(), String>,
) -> Result<(), String> {
    let outbox = webhooks.outbox();
    match posted {
        Ok(()) => {
            let names: Vec<String> = entries.iter().map(Entry::name).collect();
            outbox.done(&names).await
        }
        Err(error) => {
            let failures = entries.iter().map(|e| e.failures).max().unwrap_or(0) + 1;
            let wait = backoff(
                failures,
                webhooks.config().max_retry_interval,
                rand::random_range(-0.1..=0.1),
            );
            tracing::warn!(endpoint = %endpoint.name, events = entries.len(), %error,
                retry_in = ?wait, "webhook post failed");
            let due = crate::now_ms() + wait.as_millis() as u64;
            let entries: Vec<Entry> = entries
                .into_iter()
                .map(|entry| Entry { failures, ..entry })
                .collect();
            outbox.retry(&entries, due).await
        }
    }
}

/// Posts one batch: `{"events": [...]}`, signed.
async fn post(
    http: &awc::Client,
    endpoint: &WebhookEndpoint,
    entries: &[Entry],
) -> Result<(), String> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        events: Vec<&'a super::Event>,
    }
    let body = serde_json::to_vec(&Body {
        events: entries.iter().map(|e| &e.event).collect(),
    })
    .map_err(|e| e.to_string())?;
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let signed = signature(endpoint.secret.as_bytes(), timestamp, &body);
    let response = http
        .post(&endpoint.url)
        .insert_header(("Content-Type", "application/json"))
        .insert_header(("Smarthost-Timestamp", timestamp.to_string()))
        .insert_header(("Smarthost-Signature", signed))
        .send_body(body)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("answered {status}"))
    }
}
