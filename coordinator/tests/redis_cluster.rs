//! Membership, the leader lease and the Coordinator actor on a real Redis
//! Cluster of three primaries (`redis-cli --cluster create`).

use std::time::{Duration, Instant};

use actix::prelude::*;
use smarthost_coordinator::leader::Leader;
use smarthost_coordinator::membership::{node_key, Membership, NODES_KEY};
use smarthost_coordinator::redis::{Redis, RedisOptions};
use smarthost_coordinator::{Coordinator, CoordinatorOptions, GetStatus, Status};
use smarthost_testkit::redis::RedisCluster;

fn options() -> RedisOptions {
    RedisOptions {
        response_timeout: Duration::from_secs(2),
        cluster: true,
    }
}

#[tokio::test]
async fn membership_and_the_leader_lease_work_on_a_cluster() {
    let cluster = RedisCluster::start();
    // One seed is enough: the client learns the other primaries from it.
    let redis = Redis::connect(&cluster.url(), options()).await.unwrap();
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
    let live: Vec<&str> = members.live.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(live, ["n1", "n2", "n3"]);
    assert!(nodes[0].info("n2").await.unwrap().is_some());

    // n3 stops; the others go on for longer than the ttl.
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        nodes[0].heartbeat().await.unwrap();
        nodes[1].heartbeat().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = nodes[0].dead_nodes().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, "n3");
    assert!(!nodes[0].forget("n1").await.unwrap(), "n1 is alive");
    assert!(nodes[0].forget("n3").await.unwrap());
    assert_eq!(nodes[0].info("n3").await.unwrap(), None);

    // The cluster keys share one slot, so one primary holds them all.
    let holder = cluster.node_of(NODES_KEY);
    assert_eq!(cluster.node_of(&node_key("n1")), holder);
    let keys = cluster.keys_per_node();
    assert_eq!(keys.iter().sum::<u64>(), keys[holder], "{keys:?}");

    // The lease: one holder, tokens that grow, release hands it over.
    let a = Leader::new(redis.clone(), "a", Duration::from_secs(5));
    let b = Leader::new(redis.clone(), "b", Duration::from_secs(5));
    let first = a.try_acquire().await.unwrap().expect("a leads");
    assert_eq!(b.try_acquire().await.unwrap(), None);
    let renewed = a.renew(&first).await.unwrap();
    assert!(a.is_current(renewed.token).await.unwrap());
    a.release(renewed).await.unwrap();
    let second = b.try_acquire().await.unwrap().expect("b leads");
    assert!(second.token > first.token);
    assert!(!a.is_current(first.token).await.unwrap());
}

#[actix::test]
async fn one_of_two_coordinators_leads_on_a_cluster_seeded_by_every_node() {
    let cluster = RedisCluster::start();
    let start = |node: &str| {
        let redis = Redis::connect_lazy(&cluster.urls(), options()).unwrap();
        let options = CoordinatorOptions {
            heartbeat_interval: Duration::from_millis(100),
            node_ttl: Duration::from_millis(600),
            leader_ttl: Duration::from_millis(600),
            tick_interval: Duration::from_millis(100),
            ..CoordinatorOptions::new(node)
        };
        Coordinator::new(redis, options).start()
    };
    let (one, two) = (start("n1"), start("n2"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let (s1, s2): (Status, Status) = loop {
        let s1 = one.send(GetStatus).await.unwrap();
        let s2 = two.send(GetStatus).await.unwrap();
        let both = |s: &Status| s.live == ["n1", "n2"] && s.last_error.is_none();
        if both(&s1) && both(&s2) && s1.leader != s2.leader {
            break (s1, s2);
        }
        assert!(Instant::now() < deadline, "{s1:?} {s2:?}");
        actix::clock::sleep(Duration::from_millis(50)).await;
    };
    assert!(s1.token.or(s2.token).is_some());
}
