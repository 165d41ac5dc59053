//! The Coordinator actor against a real redis-server: it leads, reports the
//! membership, survives Redis going away and recovers when it is back.

use std::time::{Duration, Instant};

use actix::prelude::*;
use smarthost_coordinator::redis::{Redis, RedisOptions};
use smarthost_coordinator::{
    Coordinator, CoordinatorOptions, GetStatus, LeaderTick, Shutdown, Status,
};
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

/// A lazily connecting client of `server`.
fn connect(server: &RedisServer) -> Redis {
    Redis::connect_lazy(
        &server.url(),
        RedisOptions {
            response_timeout: Duration::from_millis(300),
            ..RedisOptions::default()
        },
    )
    .unwrap()
}

fn start(server: &RedisServer, node: &str) -> Addr<Coordinator> {
    Coordinator::new(connect(server), options(node)).start()
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

/// Collects the leader ticks a coordinator sends.
struct Jobs(std::sync::Arc<std::sync::Mutex<Vec<LeaderTick>>>);

impl Actor for Jobs {
    type Context = Context<Self>;
}

impl Handler<LeaderTick> for Jobs {
    type Result = ();
    fn handle(&mut self, tick: LeaderTick, _: &mut Context<Self>) {
        self.0.lock().unwrap().push(tick);
    }
}

fn start_with_jobs(
    server: &RedisServer,
    node: &str,
) -> (
    Addr<Coordinator>,
    std::sync::Arc<std::sync::Mutex<Vec<LeaderTick>>>,
) {
    let ticks = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let jobs = Jobs(ticks.clone()).start();
    let options = CoordinatorOptions {
        job_interval: Duration::from_millis(100),
        ..options(node)
    };
    let addr = Coordinator::new(connect(server), options)
        .with_jobs(jobs.recipient())
        .start();
    (addr, ticks)
}

#[actix::test]
async fn only_the_leader_runs_the_jobs_and_hears_of_stopped_nodes() {
    let server = RedisServer::start();
    let (one, one_ticks) = start_with_jobs(&server, "n1");
    let (two, two_ticks) = start_with_jobs(&server, "n2");
    let options = CoordinatorOptions {
        lead: false,
        ..options("n3")
    };
    let n3_instance = options.info.instance.clone();
    let node = Coordinator::new(connect(&server), options).start();
    let all = |s: &Status| s.live == ["n1", "n2", "n3"];
    until(&one, Duration::from_secs(5), all).await;
    until(&two, Duration::from_secs(5), all).await;
    let one_leads = one.send(GetStatus).await.unwrap().leader;
    assert_ne!(one_leads, two.send(GetStatus).await.unwrap().leader);
    let leader_id = if one_leads { "n1" } else { "n2" };
    for coordinator in [&one, &two] {
        until(coordinator, Duration::from_secs(5), |s| {
            s.leader_node.as_deref() == Some(leader_id)
        })
        .await;
    }
    until(&node, Duration::from_secs(5), |s| {
        !s.leader && s.leader_node.as_deref() == Some(leader_id)
    })
    .await;
    one_ticks.lock().unwrap().clear();
    two_ticks.lock().unwrap().clear();
    actix::clock::sleep(Duration::from_millis(500)).await;
    let (leader_ticks, follower_ticks) = if one_leads {
        (&one_ticks, &two_ticks)
    } else {
        (&two_ticks, &one_ticks)
    };
    assert!(
        follower_ticks.lock().unwrap().is_empty(),
        "the follower ran jobs"
    );
    {
        let ticks = leader_ticks.lock().unwrap();
        assert!(ticks.len() >= 3, "{} ticks in 500 ms", ticks.len());
        assert!(ticks.iter().all(|t| t.dead.is_empty()));
        assert!(ticks.windows(2).all(|w| w[0].token == w[1].token));
    }

    // A node that shuts down is dead at once, not after the ttl.
    node.send(Shutdown).await.unwrap();
    let stopped_at = Instant::now();
    let deadline = stopped_at + Duration::from_secs(5);
    loop {
        if leader_ticks
            .lock()
            .unwrap()
            .last()
            .is_some_and(|t| t.dead == ["n3"] && t.is_valid())
        {
            break;
        }
        assert!(Instant::now() < deadline, "the stopped node was never dead");
        actix::clock::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        stopped_at.elapsed() < Duration::from_millis(600),
        "seen dead after {:?}, the ttl is 600 ms",
        stopped_at.elapsed()
    );
    // What may be reclaimed: the leases of that very process.
    let last = leader_ticks.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        last.dead_holders,
        [
            "n3".to_string(),
            smarthost_coordinator::membership::lease_holder("n3", &n3_instance)
        ]
    );
}
