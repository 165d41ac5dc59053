//! Two nodes on a Redis Cluster: the real binary twice (`smarthost run`,
//! `queue.redis_cluster = true`), a real Redis Cluster of three primaries
//! with an fsync per write, and one aiosmtpd sink as the smart host of
//! three domains.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smarthost_testkit::redis::RedisCluster;
use smarthost_tests::scenario::{
    delivered_per_node, dot_stuff, message, route, start_with_env, Setup,
};
use smarthost_tests::sink::{Sink, SinkOptions};
use smarthost_tests::smtp::{queued_id, Client};

const DOMAINS: [&str; 3] = ["a.test", "b.test", "c.test"];
const MESSAGES: usize = 100;

/// A node on the cluster seeded by `seeds`, with the smart host of all
/// three domains at `sink`.
fn node(seeds: &str, sink: &Sink, id: &str) -> Setup {
    let routes: String = DOMAINS.iter().map(|d| route(d, sink)).collect();
    start_with_env(
        tempfile::tempdir().unwrap(),
        "",
        &routes,
        &[
            ("SMARTHOST__QUEUE__BACKEND", "redis"),
            ("SMARTHOST__QUEUE__REDIS_CLUSTER", "true"),
            ("SMARTHOST__QUEUE__REDIS_URL", seeds),
            ("SMARTHOST__QUEUE__REDIS_RESPONSE_TIMEOUT", "2s"),
            ("SMARTHOST__QUEUE__RETRY_INTERVALS", "1s"),
            ("SMARTHOST__NODE__ID", id),
        ],
    )
}

/// Submits one message to `to`; panics unless it is accepted.
fn submit(addr: SocketAddr, subject: &str, to: &str, node: &Setup) {
    let (mut c, greeting) = Client::connect(addr);
    assert_eq!(greeting.code, 220);
    c.expect("EHLO app.example", 250);
    let text = message(to, subject, "Hello.\r\n");
    let reply = c.send_message("app@sender.test", &[to], &dot_stuff(&text));
    assert_eq!(
        reply.code,
        250,
        "{subject}: {reply:?}\n{}",
        node.relay.log()
    );
    queued_id(&reply);
    let _ = c.cmd("QUIT");
}

#[test]
fn two_nodes_on_a_redis_cluster_deliver_every_message_exactly_once() {
    let cluster = RedisCluster::start();
    let sink = Sink::start(SinkOptions::default());
    // One node knows every primary as a seed, the other only one of them.
    let nodes = [
        node(&cluster.urls(), &sink, "node-a"),
        node(&cluster.url(), &sink, "node-b"),
    ];
    let subjects: Vec<String> = (0..MESSAGES).map(|n| format!("cluster {n}")).collect();
    for (n, subject) in subjects.iter().enumerate() {
        let to = format!("user{n}@{}", DOMAINS[n % DOMAINS.len()]);
        let node = &nodes[n % nodes.len()];
        submit(node.relay.smtp, subject, &to, node);
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.messages().len() < MESSAGES && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // A delivery done twice would show up within a few retry ticks.
    std::thread::sleep(Duration::from_secs(3));
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for m in sink.messages() {
        *got.entry(m.header("Subject").unwrap_or_default())
            .or_default() += 1;
    }
    let want: BTreeMap<String, usize> = subjects.iter().map(|s| (s.clone(), 1)).collect();
    if got != want {
        for setup in &nodes {
            eprintln!("--- node log ---\n{}", setup.relay.log());
        }
    }
    assert_eq!(got, want, "every message exactly once");

    // The data was on every primary: the messages, spread by their hash
    // tags, were written to all three (and are gone now, bodies too).
    for setup in &nodes {
        let log = setup.relay.log();
        assert!(!log.contains("hash slots"), "{log}");
    }
    let writes = cluster.writes_per_node();
    assert!(
        writes.iter().all(|&n| n > 0),
        "writes per primary: {writes:?}"
    );
    let delivered = delivered_per_node(&nodes);
    eprintln!("delivered per node: {delivered:?}, writes per primary: {writes:?}");
    assert_eq!(delivered.iter().sum::<usize>(), MESSAGES);
}
