//! Membership against a real redis-server.

use std::time::{Duration, Instant};

use smarthost_coordinator::membership::{Join, Membership, NodeInfo};
use smarthost_coordinator::redis::{Redis, RedisOptions};
use smarthost_coordinator::CoordError;
use smarthost_testkit::redis::RedisServer;

async fn connect(server: &RedisServer) -> Redis {
    // A loaded machine can stall a request for longer than the
    // production-like 500 ms; a killed server still fails at once.
    let options = RedisOptions {
        response_timeout: Duration::from_secs(5),
        ..RedisOptions::default()
    };
    Redis::connect(&server.url(), options).await.unwrap()
}

fn ids(nodes: &[smarthost_coordinator::membership::NodeSeen]) -> Vec<&str> {
    nodes.iter().map(|n| n.id.as_str()).collect()
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_is_dead_after_the_ttl() {
    let server = RedisServer::start();
    let redis = connect(&server).await;
    // Long enough that a loaded machine's stall between the last
    // heartbeat and the check below does not outlast it.
    let ttl = Duration::from_millis(1500);
    let nodes: Vec<Membership> = ["n1", "n2", "n3"]
        .into_iter()
        .map(|id| Membership::new(redis.clone(), id, ttl))
        .collect();

    for node in &nodes {
        let before = redis.requests();
        node.heartbeat().await.unwrap();
        assert_eq!(redis.requests() - before, 1, "a heartbeat is one request");
    }
    let members = nodes[0].members().await.unwrap();
    assert_eq!(ids(&members.live), ["n1", "n2", "n3"]);
    assert!(members.dead.is_empty());

    // n3 stops; the others go on for longer than the ttl.
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        nodes[0].heartbeat().await.unwrap();
        nodes[1].heartbeat().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nodes[0].heartbeat().await.unwrap();
    nodes[1].heartbeat().await.unwrap();
    let live = nodes[0].live_nodes().await.unwrap();
    let dead = nodes[0].dead_nodes().await.unwrap();
    assert_eq!(ids(&live), ["n1", "n2"]);
    assert_eq!(ids(&dead), ["n3"]);
    assert!(dead[0].last_seen_ms + ttl.as_millis() as u64 <= live[0].last_seen_ms);

    // Forgetting keeps a live node and drops the dead one with its info.
    assert!(nodes[0].info("n3").await.unwrap().is_some());
    assert!(!nodes[0].forget("n1").await.unwrap(), "n1 is alive");
    assert!(nodes[0].forget("n3").await.unwrap());
    assert_eq!(nodes[0].info("n3").await.unwrap(), None);
    let members = nodes[0].members().await.unwrap();
    assert_eq!(ids(&members.live), ["n1", "n2"]);
    assert!(members.dead.is_empty());

    // A node that comes back is simply alive again.
    nodes[2].heartbeat().await.unwrap();
    assert_eq!(
        ids(&nodes[0].live_nodes().await.unwrap()),
        ["n1", "n2", "n3"]
    );
}

#[tokio::test]
async fn the_heartbeat_carries_the_node_info() {
    let server = RedisServer::start();
    let redis = connect(&server).await;
    let info = NodeInfo {
        host: "relay-0.example".into(),
        smtp: "10.0.0.7:25".into(),
        started_ms: 1_700_000_000_000,
        version: "9.9.9".into(),
        instance: "00000000000000aa".into(),
    };
    let node = Membership::new(redis, "relay-0", Duration::from_secs(10)).with_info(info.clone());
    assert_eq!(node.info("relay-0").await.unwrap(), None);
    let seen = node.heartbeat().await.unwrap();
    assert_eq!(node.info("relay-0").await.unwrap(), Some(info));
    let live = node.live_nodes().await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].last_seen_ms, seen);
}

#[tokio::test]
async fn a_dead_redis_is_an_error_and_a_restarted_one_is_used_again() {
    let mut server = RedisServer::start();
    let redis = connect(&server).await;
    let node = Membership::new(redis, "n1", Duration::from_secs(10));
    node.heartbeat().await.unwrap();

    server.kill();
    let started = Instant::now();
    assert!(matches!(
        node.heartbeat().await,
        Err(CoordError::Unavailable(_))
    ));
    assert!(matches!(
        node.members().await,
        Err(CoordError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(3));

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match node.heartbeat().await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no heartbeat after the restart: {e}"),
        }
    }
    assert_eq!(ids(&node.live_nodes().await.unwrap()), ["n1"]);
}

#[tokio::test]
async fn a_node_id_is_one_process_at_a_time() {
    let server = RedisServer::start();
    let redis = connect(&server).await;
    let ttl = Duration::from_millis(600);
    let first = Membership::new(redis.clone(), "relay-0", ttl);
    let second =
        Membership::new(redis.clone(), "relay-0", ttl).with_info(NodeInfo::new("other-host"));
    assert_eq!(first.join().await.unwrap(), Join::Joined);
    assert_eq!(
        first.join().await.unwrap(),
        Join::Joined,
        "the same process may join again"
    );

    // A second process with the same id is refused while the first lives.
    match second.join().await.unwrap() {
        Join::InUse { host, silent_ms } => {
            assert_eq!(host, "relay-0");
            assert!(silent_ms <= ttl.as_millis() as u64, "{silent_ms}");
        }
        Join::Joined => panic!("two live processes under one node id"),
    }
    // Another instance cannot mark the first as stopped.
    assert!(!second.stop().await.unwrap());
    assert_eq!(ids(&first.live_nodes().await.unwrap()), ["relay-0"]);

    // Once the first stops, it is dead at once and the id is free.
    assert!(first.stop().await.unwrap());
    assert_eq!(ids(&first.dead_nodes().await.unwrap()), ["relay-0"]);
    assert_eq!(second.join().await.unwrap(), Join::Joined);
    assert_eq!(ids(&second.live_nodes().await.unwrap()), ["relay-0"]);
    assert_eq!(
        second.info("relay-0").await.unwrap().unwrap().host,
        "other-host"
    );

    // A process that died without stopping frees the id after the ttl.
    let third = Membership::new(redis, "relay-0", ttl);
    assert!(matches!(third.join().await.unwrap(), Join::InUse { .. }));
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(third.join().await.unwrap(), Join::Joined);
}
