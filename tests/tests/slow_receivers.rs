//! Delivery to a receiver that takes its time over each message: the real
//! relay and the aiosmtpd sink with a pause before each end-of-data reply.
//! A domain's messages are queued while it is suspended, then released at
//! once, so that the queue holds them all when delivery starts. One test
//! runs the relay on a real Redis behind a link that slows every round
//! trip.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use smarthost_testkit::redis::RedisServer;
use smarthost_tests::http;
use smarthost_tests::proxy::Proxy;
use smarthost_tests::relay::Relay;
use smarthost_tests::scenario::{
    message, route, start, start_with_env, submit, wait_for_log, Setup,
};
use smarthost_tests::sink::{Sink, SinkOptions};

const DOMAIN: &str = "slow.test";

fn scrape(admin: SocketAddr) -> BTreeMap<String, f64> {
    http::get(admin, "/metrics", None).samples()
}

fn queue(relay: &Relay, verb: &str) {
    let output = relay.cli(&["queue", verb, DOMAIN], &[]);
    assert!(output.status.success(), "queue {verb}: {output:?}");
}

/// A relay with `delivery` in its `[delivery]` section and `routes` after
/// it, given `count` messages by [`queue_then_release`].
fn queued_then_released(delivery: &str, routes: &str, count: usize) -> Setup {
    let setup = start(delivery, routes, None);
    queue_then_release(&setup, count);
    setup
}

/// Queues `count` messages to [`DOMAIN`] while the domain is suspended,
/// then resumes it.
fn queue_then_release(setup: &Setup, count: usize) {
    queue(&setup.relay, "suspend");
    for n in 0..count {
        let to = format!("user{n}@{DOMAIN}");
        submit(
            &setup.relay,
            "app@sender.test",
            &[&to],
            &message(&to, &format!("slow {n}"), "Take your time.\r\n"),
        );
    }
    queue(&setup.relay, "resume");
}

#[test]
fn a_slow_receivers_mail_spreads_over_every_connection_the_node_may_open() {
    const MESSAGES: usize = 12;
    let sink = Sink::start(SinkOptions::default().data_delay(Duration::from_millis(300)));
    let setup = queued_then_released(
        "max_connections = 4\nmax_messages_per_connection = 20",
        &route(DOMAIN, &sink),
        MESSAGES,
    );
    sink.assert_each_subject_once(MESSAGES, Duration::from_secs(60));

    // Twelve messages fit one connection's limit, but a take gives a
    // connection one at a time while the pace is unknown or slow: the
    // node opens all four of its connections, and each goes back to the
    // queue for more instead of closing after one message.
    let stats = sink.stats();
    assert_eq!(
        stats.peak_concurrent_by_domain.get(DOMAIN).copied(),
        Some(4),
        "{stats:?}"
    );
    let metrics = scrape(setup.relay.admin_addr());
    let count = metrics["smarthost_delivery_messages_per_connection_count"];
    assert_eq!(
        metrics["smarthost_delivery_messages_per_connection_sum"], MESSAGES as f64,
        "{metrics:#?}"
    );
    assert_eq!(count, stats.connections_total as f64, "{stats:?}");
    assert!(
        count < MESSAGES as f64,
        "connections carried more than their first take: {count} connections"
    );
}

#[test]
fn a_connection_takes_more_work_up_to_its_message_limit() {
    const MESSAGES: usize = 12;
    let sink = Sink::start(SinkOptions::default().data_delay(Duration::from_millis(100)));
    let setup = queued_then_released(
        "max_connections = 1\nmax_messages_per_connection = 3",
        &route(DOMAIN, &sink),
        MESSAGES,
    );
    sink.assert_each_subject_once(MESSAGES, Duration::from_secs(60));

    // One connection at a time, each given its messages a few takes at a
    // time and closed after the third.
    let stats = sink.stats();
    assert_eq!(stats.peak_concurrent, 1, "{stats:?}");
    assert_eq!(stats.connections_total, 4, "{stats:?}");
    let metrics = scrape(setup.relay.admin_addr());
    assert_eq!(
        metrics["smarthost_delivery_messages_per_connection_bucket{le=\"3\"}"], 4.0,
        "{metrics:#?}"
    );
    assert_eq!(
        metrics["smarthost_delivery_messages_per_connection_bucket{le=\"2\"}"], 0.0,
        "{metrics:#?}"
    );
    // Each connection's slot stood free a while before it carried mail,
    // and the domain waited in line for the one slot while a connection
    // held it: once behind each of the four connections.
    assert_eq!(
        metrics["smarthost_delivery_slot_free_seconds_count"], 4.0,
        "{metrics:#?}"
    );
    let waits = metrics["smarthost_delivery_slot_wait_seconds_count"];
    assert!((3.0..=4.0).contains(&waits), "{metrics:#?}");
}

#[test]
fn a_receiver_that_cannot_be_reached_gets_whole_takes() {
    const MESSAGES: usize = 10;
    // Nothing listens there: every connection fails at once.
    let dead = format!(
        "[[domains]]\nname = \"{DOMAIN}\"\nsmart_host = \"[127.0.0.1]:{}\"\n",
        smarthost_testkit::free_port()
    );
    let setup = queued_then_released(
        "max_connections = 1\nmax_messages_per_connection = 20",
        &dead,
        MESSAGES,
    );
    wait_for_log(&setup.log_file, Duration::from_secs(30), |lines| {
        lines.iter().filter(|l| l["outcome"] == "deferred").count() == MESSAGES
    });

    // The pace is unknown at first, so the first connection is given one
    // message; once it fails, the next is given the other nine, not one
    // connection per message.
    let metrics = scrape(setup.relay.admin_addr());
    assert_eq!(
        metrics["smarthost_delivery_messages_per_connection_count"], 2.0,
        "{metrics:#?}"
    );
    assert_eq!(
        metrics["smarthost_delivery_messages_per_connection_sum"], MESSAGES as f64,
        "{metrics:#?}"
    );
}

#[test]
fn a_backlog_opens_its_connections_several_at_once_over_a_slow_redis() {
    // Every round trip to Redis takes 200 ms. Opening a connection costs
    // three (a lease, then a take of two): one at a time, sixteen
    // connections would take about ten seconds; several at once, a few.
    const MESSAGES: usize = 16;
    const HOLD: Duration = Duration::from_secs(8);
    let redis = RedisServer::start();
    let link = Proxy::with_latency(
        ([127, 0, 0, 1], redis.port()).into(),
        Duration::from_millis(100),
    );
    let url = format!("redis://{}/", link.addr());
    // Each connection carries one message and holds it for HOLD, so every
    // connection opened before the first one ends is open at once.
    let sink = Sink::start(SinkOptions::default().data_delay(HOLD));
    let setup = start_with_env(
        tempfile::tempdir().unwrap(),
        &format!("max_connections_per_domain = {MESSAGES}\nmax_messages_per_connection = 1"),
        &route(DOMAIN, &sink),
        &[
            ("SMARTHOST__QUEUE__BACKEND", "redis"),
            ("SMARTHOST__QUEUE__REDIS_URL", url.as_str()),
        ],
    );
    queue_then_release(&setup, MESSAGES);
    sink.assert_each_subject_once(MESSAGES, Duration::from_secs(90));

    let stats = sink.stats();
    assert_eq!(stats.connections_total, MESSAGES as u64, "{stats:?}");
    assert_eq!(
        stats.peak_concurrent_by_domain.get(DOMAIN).copied(),
        Some(MESSAGES as u64),
        "every connection should have been open before the first one ended: {stats:?}\n{}",
        setup.relay.log()
    );
}
