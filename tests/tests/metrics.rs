//! `/metrics` against the real relay, scraped while mail flows and after:
//! its counters agree with what the clients were told and what the sinks
//! received.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::scenario::{message, route, start, start_with_env, submit};
use smarthost_tests::sink::{Sink, SinkOptions};

fn scrape(admin: SocketAddr) -> BTreeMap<String, f64> {
    let page = http::get(admin, "/metrics", None);
    assert_eq!(page.status, 200, "{page:?}");
    assert!(
        page.header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{page:?}"
    );
    page.samples()
}

fn value(samples: &BTreeMap<String, f64>, key: &str) -> f64 {
    samples.get(key).copied().unwrap_or(0.0)
}

const DELIVERED: &str = "smarthost_recipient_outcomes_total{outcome=\"delivered\"}";
const DEFERRED: &str = "smarthost_recipient_outcomes_total{outcome=\"deferred\"}";
const FAILED: &str = "smarthost_recipient_outcomes_total{outcome=\"failed\"}";
const EXPIRED: &str = "smarthost_recipient_outcomes_total{outcome=\"expired\"}";

#[test]
fn the_counters_agree_with_the_clients_and_the_sinks() {
    let sink = Sink::start(SinkOptions::default().script(json!({
        "rcpt": {"fail@dest.test": 550, "later@dest.test": [451, 250]}
    })));
    let bounces = Sink::start(SinkOptions::default());
    let setup = start(
        &format!("smart_host = \"{}\"", sink.smart_host()),
        &route("sender.test", &bounces),
        Some("1s"),
    );
    let admin = setup.relay.admin_addr();
    let before = scrape(admin);
    assert_eq!(value(&before, "smarthost_queue_messages"), 0.0);
    assert_eq!(value(&before, "smarthost_messages_received_total"), 0.0);

    // Twelve messages: one with a recipient the sink refuses, one with a
    // recipient it takes on the second try, ten to two domains each.
    let mut recipients = 0;
    for n in 0..12 {
        let to: Vec<String> = match n {
            0 => vec!["fail@dest.test".into(), "first@dest.test".into()],
            1 => vec!["later@dest.test".into()],
            n => vec![format!("user{n}@dest.test"), format!("user{n}@other.test")],
        };
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        submit(
            &setup.relay,
            "app@sender.test",
            &to,
            &message(to[0], &format!("message {n}"), "Counted.\r\n"),
        );
        recipients += to.len();
    }
    // Everything but the refused recipient, and one report to the sender.
    let delivered_wanted = (recipients - 1 + 1) as f64;

    // Scraped as the queue drains: counters only grow.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = scrape(admin);
    let end = loop {
        let now = scrape(admin);
        for (key, old) in &last {
            if key.contains("_total") && !key.contains("le=") {
                let new = value(&now, key);
                assert!(new >= *old, "{key} went from {old} to {new}");
            }
        }
        // Connections are counted when they close, which an idle one
        // does up to 100 ms after its last message.
        let drained = value(&now, "smarthost_queue_messages") == 0.0
            && value(&now, DELIVERED) >= delivered_wanted
            && value(&now, "smarthost_smtp_sessions") == 0.0
            && value(&now, "smarthost_delivery_messages_per_connection_sum") >= 24.0;
        if drained {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the queue did not drain within 30 s: {now:#?}"
        );
        last = now;
        std::thread::sleep(Duration::from_millis(200));
    };

    // What the clients were told.
    assert_eq!(value(&end, "smarthost_messages_received_total"), 12.0);
    assert_eq!(
        value(&end, "smarthost_recipients_received_total"),
        recipients as f64
    );
    assert_eq!(value(&end, "smarthost_message_accept_seconds_count"), 12.0);
    assert_eq!(value(&end, "smarthost_messages_not_stored_total"), 0.0);
    assert!(value(&end, "smarthost_smtp_connections_total") >= 12.0);
    assert!(value(&end, "smarthost_spool_store_seconds_count") >= 1.0);

    // What the sinks received, recipient by recipient.
    let taken: usize = sink
        .messages()
        .iter()
        .chain(bounces.messages().iter())
        .map(|m| m.rcpt_tos.len())
        .sum();
    assert_eq!(value(&end, DELIVERED), taken as f64, "{end:#?}");
    assert_eq!(value(&end, DELIVERED), delivered_wanted);
    assert_eq!(value(&end, FAILED), 1.0);
    assert_eq!(value(&end, DEFERRED), 1.0);
    assert_eq!(value(&end, EXPIRED), 0.0);
    assert_eq!(
        value(&end, "smarthost_delivery_delay_seconds_count"),
        delivered_wanted
    );
    assert!(value(&end, "smarthost_delivery_attempt_seconds_count") >= 2.0);
    // Every delivery taken once per attempt, by takes for new connections:
    // two domains of ten messages, one of the other two, the refused
    // recipient's retry and the report.
    let takes = value(&end, "smarthost_delivery_takes_total{result=\"work\"}");
    assert!(takes >= 3.0, "{end:#?}");
    assert_eq!(
        value(&end, "smarthost_delivery_messages_per_connection_count"),
        takes
    );
    assert_eq!(
        value(&end, "smarthost_delivery_messages_per_connection_sum"),
        24.0,
        "{end:#?}"
    );
    for state in ["ready", "deferred", "in_flight"] {
        let key = format!("smarthost_queue_deliveries{{state=\"{state}\"}}");
        assert_eq!(value(&end, &key), 0.0, "{key}");
    }
    // The local backend has no coordinator, and nothing from Redis.
    assert!(!end.contains_key("smarthost_coordinator_leader"));
    assert!(!end.keys().any(|k| k.starts_with("smarthost_redis_errors")));
    assert_eq!(
        value(&end, "smarthost_login_failures_total{scope=\"smtp\"}"),
        0.0
    );
}

/// With `admin.metrics_listen` the probes and `/metrics` answer on an
/// address of their own, which serves nothing of the operator API; they
/// still answer on `admin.listen`.
#[test]
fn the_metrics_and_probes_can_listen_apart_from_the_api() {
    let port = smarthost_tests::relay::free_port();
    let open: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let relay = smarthost_tests::relay::Relay::start_with_env(
        "",
        "",
        &[(
            "SMARTHOST__ADMIN__METRICS_LISTEN",
            open.to_string().as_str(),
        )],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while http::get(open, "/readyz", None).status != 200 {
        assert!(Instant::now() < deadline, "never ready on {open}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http::get(open, "/healthz", None).status, 200);
    let samples = scrape(open);
    assert!(
        samples.keys().any(|k| k.starts_with("smarthost_")),
        "{samples:?}"
    );
    for path in ["/api/v1/queue", "/api/v1/sessions", "/api/queue"] {
        assert_eq!(http::get(open, path, None).status, 404, "{path} on {open}");
    }
    let admin = relay.admin_addr();
    assert_eq!(http::get(admin, "/api/v1/queue", None).status, 200);
    assert!(!scrape(admin).is_empty());
}

/// A body just stored goes to its first delivery from the body cache; the
/// message's other delivery reads the spool; both send the same bytes.
/// With `delivery.body_cache = 0` every delivery reads the spool.
#[test]
fn the_first_delivery_of_a_body_comes_from_the_cache() {
    const HIT: &str = "smarthost_body_cache_reads_total{result=\"hit\"}";
    const MISS: &str = "smarthost_body_cache_reads_total{result=\"miss\"}";
    for (cache, hits, misses) in [("", 1.0, 1.0), ("body_cache = 0", 0.0, 0.0)] {
        let sink = Sink::start(SinkOptions::default());
        let setup = start(
            &format!("smart_host = \"{}\"\n{cache}", sink.smart_host()),
            "",
            None,
        );
        let to = ["first@dest.test", "second@other.test"];
        let text = message(to[0], "cached", &"A line of the body.\r\n".repeat(200));
        submit(&setup.relay, "app@sender.test", &to, &text);
        let arrived = sink.wait_for(2, Duration::from_secs(30));
        assert_eq!(arrived.len(), 2);
        assert_eq!(arrived[0].body, arrived[1].body, "{cache:?}");
        assert!(
            arrived[0].text().contains("A line of the body."),
            "{cache:?}"
        );
        let samples = scrape(setup.relay.admin_addr());
        assert_eq!(
            (value(&samples, HIT), value(&samples, MISS)),
            (hits, misses),
            "{cache:?}"
        );
        // The copy taken, nothing is kept.
        assert_eq!(value(&samples, "smarthost_body_cache_bytes"), 0.0);
    }
}

/// Under load a delivery at work on a domain takes each new message the
/// moment it is scheduled, before the store has returned to the Queue:
/// the body must already be in the cache then, or every such delivery
/// reads it back from the spool (on Redis, a round trip with the body).
#[test]
fn bodies_stored_under_load_are_delivered_from_the_cache() {
    const HIT: &str = "smarthost_body_cache_reads_total{result=\"hit\"}";
    const MISS: &str = "smarthost_body_cache_reads_total{result=\"miss\"}";
    const SESSIONS: usize = 8;
    const EACH: usize = 15;
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let backends: [&[(&str, &str)]; 2] = [
        &[],
        &[
            ("SMARTHOST__QUEUE__BACKEND", "redis"),
            ("SMARTHOST__QUEUE__REDIS_URL", &redis_url),
        ],
    ];
    for env in backends {
        let sink = Sink::start(SinkOptions::default());
        let setup = start_with_env(
            tempfile::tempdir().unwrap(),
            &format!("smart_host = \"{}\"", sink.smart_host()),
            "",
            env,
        );
        let text = message(
            "user@dest.test",
            "under load",
            &"A line of a longer body.\r\n".repeat(2000),
        );
        std::thread::scope(|scope| {
            for _ in 0..SESSIONS {
                scope.spawn(|| {
                    for _ in 0..EACH {
                        submit(&setup.relay, "app@sender.test", &["user@dest.test"], &text);
                    }
                });
            }
        });
        let total = SESSIONS * EACH;
        assert_eq!(sink.wait_for(total, Duration::from_secs(60)).len(), total);
        let samples = scrape(setup.relay.admin_addr());
        assert_eq!(
            (value(&samples, HIT), value(&samples, MISS)),
            (total as f64, 0.0),
            "{env:?}"
        );
    }
}

/// With two connection threads, each thread's busy share is on the page
/// while the node fills the first free thread; a node that spreads its
/// work evenly (`node.thread_busy_percent = 0`) samples nothing.
#[test]
fn each_connection_threads_busy_share_is_on_the_page() {
    for (percent, sampled) in [("80", true), ("0", false)] {
        let sink = Sink::start(SinkOptions::default());
        let setup = start_with_env(
            tempfile::tempdir().unwrap(),
            &format!("smart_host = \"{}\"", sink.smart_host()),
            "",
            &[
                ("SMARTHOST__NODE__THREADS", "2"),
                ("SMARTHOST__NODE__THREAD_BUSY_PERCENT", percent),
            ],
        );
        let text = message("user@dest.test", "threads", "Counted.\r\n");
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..5 {
                        submit(&setup.relay, "app@sender.test", &["user@dest.test"], &text);
                    }
                });
            }
        });
        assert_eq!(sink.wait_for(20, Duration::from_secs(30)).len(), 20);
        let samples = scrape(setup.relay.admin_addr());
        for thread in 0..2 {
            let key = format!("smarthost_thread_busy_ratio{{thread=\"{thread}\"}}");
            match samples.get(&key) {
                Some(share) => assert!(sampled && (0.0..=1.0).contains(share), "{key} {share}"),
                None => assert!(!sampled, "{key} missing at {percent} %"),
            }
        }
    }
}
