//! Ready news: the nodes of a cluster hear at once of a domain whose ready
//! line was empty and now has work, instead of at their next look at the
//! ready set.
//!
//! The scripts that put work into a domain's ready line (`insert`,
//! `promote`, `reclaim`, `release`) publish `<origin> <domain>` on one
//! channel when the line was empty before (a busy domain is being served
//! already, so it costs nothing more per message). Each node keeps one
//! subscription ([`listen`]) and hands what it hears to its queue, which
//! announces the domain as it announces its own inserts. A node skips its
//! own news: it announced what it inserted itself.
//!
//! The news is edge-triggered and pub/sub delivers nothing while the
//! subscription is down, so it comes on top of the queue's look at the
//! ready set every tick, never instead: that look finds a domain whose
//! news was lost, and a domain whose line stayed busy while this node's
//! throttle went idle. The queue also looks at once when the subscription
//! (re)starts ([`ReadyNews::Listening`]).

use std::time::Duration;

use futures_util::StreamExt as _;
use tokio::sync::mpsc;

/// What the queue hears from the subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyNews {
    /// Subscribed: news from now on arrives, what came before did not.
    Listening,
    /// The subscription is down: nothing arrives until `Listening`.
    Deaf,
    /// Another node gave the domain ready work.
    Ready(String),
}

/// News queued for the queue before the subscriber waits (the queue's
/// announcements dedup them; Redis drops a subscriber that falls far
/// behind, and the subscription then starts again).
const NEWS_BUFFER: usize = 1024;

/// Between two attempts to subscribe: doubled after each failure up to
/// [`RESUBSCRIBE_MAX`] (a server that refuses the channel to this user
/// refuses it every time).
const RESUBSCRIBE: Duration = Duration::from_secs(1);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(60);

/// The channel of the scripts' news: per database, like the keys.
pub fn channel(db: i64) -> String {
    format!("smarthost:db{db}:ready-news")
}

/// What a script publishes for `domain`.
pub fn news(origin: &str, domain: &str) -> String {
    format!("{origin} {domain}")
}

/// The domain of `payload`, unless it is `own` news or malformed.
pub fn heard<'a>(payload: &'a [u8], own: &str) -> Option<&'a str> {
    let text = std::str::from_utf8(payload).ok()?;
    let (origin, domain) = text.split_once(' ')?;
    (origin != own && !domain.is_empty()).then_some(domain)
}

/// Subscribes to `channel` and sends what is heard, until the receiver
/// is dropped; subscribes again a second after the connection is lost,
/// later after each failure to.
pub fn listen(
    client: redis::Client,
    channel: String,
    own: String,
    timeout: Duration,
) -> mpsc::Receiver<ReadyNews> {
    let (tx, rx) = mpsc::channel(NEWS_BUFFER);
    tokio::spawn(async move {
        let mut pause = RESUBSCRIBE;
        loop {
            let subscribed = tokio::time::timeout(timeout, async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            })
            .await;
            let failed = match subscribed {
                Ok(Ok(pubsub)) => {
                    tracing::info!(%channel, "listening for ready news");
                    pause = RESUBSCRIBE;
                    if tx.send(ReadyNews::Listening).await.is_err() {
                        return;
                    }
                    let mut messages = pubsub.into_on_message();
                    while let Some(message) = messages.next().await {
                        let Some(domain) = heard(message.get_payload_bytes(), &own) else {
                            continue;
                        };
                        if tx.send(ReadyNews::Ready(domain.to_string())).await.is_err() {
                            return;
                        }
                    }
                    tracing::warn!(%channel, "lost the subscription to ready news; subscribing again");
                    if tx.send(ReadyNews::Deaf).await.is_err() {
                        return;
                    }
                    false
                }
                Ok(Err(error)) => {
                    tracing::warn!(%channel, %error, retry_in = ?pause,
                        "cannot subscribe to ready news; other nodes' work is found by the ticks alone");
                    true
                }
                Err(_) => {
                    tracing::warn!(%channel, ?timeout, retry_in = ?pause,
                        "cannot subscribe to ready news: no reply in time; other nodes' work is found by the ticks alone");
                    true
                }
            };
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(pause).await;
            if failed {
                pause = (pause * 2).min(RESUBSCRIBE_MAX);
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_hears_the_domains_of_the_others_only() {
        let idn = news("c3", "xn--bcher-kva.example");
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"b7 example.com", Some("example.com")),
            (b"a1 example.com", None),
            (b"b7 ", None),
            (b"b7", None),
            (b"", None),
            (b"\xff\xfe x", None),
            (idn.as_bytes(), Some("xn--bcher-kva.example")),
        ];
        for (payload, domain) in cases {
            assert_eq!(heard(payload, "a1"), *domain, "{payload:?}");
        }
    }

    async fn next(news: &mut mpsc::Receiver<ReadyNews>) -> ReadyNews {
        let heard = tokio::time::timeout(Duration::from_secs(20), news.recv()).await;
        heard.expect("news within 20 s").expect("news goes on")
    }

    #[tokio::test]
    async fn the_subscription_comes_back_after_redis_restarts() {
        let mut server = smarthost_testkit::redis::RedisServer::start();
        let client = redis::Client::open(server.url()).unwrap();
        let own = "a1".to_string();
        let mut news = listen(client.clone(), channel(0), own, Duration::from_secs(2));
        assert_eq!(next(&mut news).await, ReadyNews::Listening);
        server.restart();
        assert_eq!(next(&mut news).await, ReadyNews::Deaf);
        assert_eq!(next(&mut news).await, ReadyNews::Listening);
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("PUBLISH")
            .arg(channel(0))
            .arg(self::news("b2", "example.org"))
            .query_async::<i64>(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            next(&mut news).await,
            ReadyNews::Ready("example.org".into())
        );
    }
}
