//! The Coordinator actor against a real redis-server: it leads, reports the
//! membership, survives Redis going away and recovers when it is back.

use std::time::{Duration, Instant};

use actix::prelude::*;
use smarthost_coordinator::redis::{Redis, RedisOptions};
use smarthost_coordinator::{Coordinator, CoordinatorOptions, GetStatus, Shutdown, Status};
use smarthost_testkit::redis::RedisServer;

fn options(node: &str) -> CoordinatorOptions {
    CoordinatorOptions {
        heartbeat_interval: Duration::from_millis(100),
        node_ttl: Duration::from_millis(600),
        leader_ttl: Duration::from_millis(600),
        tick_interval: Duration::from_millis(100),
        ..CoordinatorOptions::new(node)
    }
}

fn start(server: &RedisServer, node: &str) -> Addr<Coordinator> {
    let redis = Redis::connect_lazy(
        &server.url(),
        RedisOptions {
            response_timeout: Duration::from_millis(300),
            ..RedisOptions::default()
        },
    )
    .unwrap();
    Coordinator::new(redis, options(node)).start()
}

/// Polls the status until `done` holds, for at most `within`.
async fn until(
    addr: &Addr<Coordinator>,
    within: Duration,
    done: impl Fn(&Status) -> bool,
) -> Status {
    let deadline = Instant::now() + within;
    loop {
        let status = addr.send(GetStatus).await.expect("the actor answers");
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting; last {status:?}"
        );
        actix::clock::sleep(Duration::from_millis(50)).await;
    }
}

#[actix::test]
async fn one_of_two_coordinators_leads_and_sees_both_nodes() {
    let server = RedisServer::start();
    let one = start(&server, "n1");
    let two = start(&server, "n2");
    let both = |s: &Status| s.live == ["n1", "n2"];
    let s1 = until(&one, Duration::from_secs(5), both).await;
    let s2 = until(&two, Duration::from_secs(5), both).await;
    assert!(s1.leader != s2.leader, "exactly one leads: {s1:?} {s2:?}");

    // The leader steps down: the other takes over with a higher token, and
    // the node that stopped heartbeating is dead after the ttl.
    let (leader, follower, old) = if s1.leader {
        (one, two, s1.token.unwrap())
    } else {
        (two, one, s2.token.unwrap())
    };
    let gone = if s1.leader { "n1" } else { "n2" };
    leader.send(Shutdown).await.unwrap();
    let status = until(&follower, Duration::from_secs(5), |s| {
        s.leader && s.dead == [gone]
    })
    .await;
    assert!(status.token.unwrap() > old, "{status:?}");
}

#[actix::test]
async fn the_actor_outlives_a_dead_redis_and_leads_again_after_a_restart() {
    let mut server = RedisServer::start();
    let addr = start(&server, "n1");
    let leading = until(&addr, Duration::from_secs(5), |s| {
        s.leader && s.live == ["n1"]
    })
    .await;

    server.kill();
    let down = until(&addr, Duration::from_secs(5), |s| {
        !s.leader && s.last_error.is_some()
    })
    .await;
    assert_eq!(down.token, None);
    assert!(addr.connected());

    server.restart();
    let back = until(&addr, Duration::from_secs(10), |s| {
        s.leader && s.last_error.is_none() && s.live == ["n1"]
    })
    .await;
    assert!(back.token.unwrap() > leading.token.unwrap(), "{back:?}");
}
