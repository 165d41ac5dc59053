//! Membership against a real redis-server.

use std::time::{Duration, Instant};

use smarthost_coordinator::membership::{Membership, NodeInfo};
use smarthost_coordinator::redis::{Redis, RedisOptions};
use smarthost_coordinator::CoordError;
use smarthost_testkit::redis::RedisServer;

async fn connect(server: &RedisServer) -> Redis {
    let options = RedisOptions {
        response_timeout: Duration::from_millis(500),
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
    let ttl = Duration::from_millis(400);
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
