//! The leader lease and its fencing tokens against a real redis-server.

use std::time::{Duration, Instant};

use smarthost_coordinator::leader::{Leader, Lease, LEADER_KEY};
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

/// One step of a contender: renew what it holds (or, every fifth round,
/// release it), else try to acquire. Returns whether it released.
async fn step(leader: &Leader, lease: &mut Option<Lease>, round: usize) -> bool {
    match lease.take() {
        Some(held) if round.is_multiple_of(5) => {
            leader.release(held).await.unwrap();
            true
        }
        Some(held) => {
            *lease = Some(leader.renew(&held).await.unwrap());
            false
        }
        None => {
            *lease = leader.try_acquire().await.unwrap();
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_contender_holds_the_lock_at_a_time() {
    let server = RedisServer::start();
    let redis = connect(&server).await;
    let ttl = Duration::from_secs(5);
    let a = Leader::new(redis.clone(), "a", ttl);
    let b = Leader::new(redis.clone(), "b", ttl);
    let (mut lease_a, mut lease_b) = (None, None);
    let mut tokens = Vec::new();
    let mut holders = Vec::new();

    for round in 1..=40 {
        let (released_a, released_b) =
            tokio::join!(step(&a, &mut lease_a, round), step(&b, &mut lease_b, round));
        let held: Vec<(&str, &Lease)> = [("a", &lease_a), ("b", &lease_b)]
            .into_iter()
            .filter_map(|(name, lease)| lease.as_ref().map(|l| (name, l)))
            .collect();
        assert!(held.len() <= 1, "round {round}: both hold the lock");
        if !(released_a || released_b) {
            assert_eq!(held.len(), 1, "round {round}: nobody holds the lock");
        }
        for (name, lease) in held {
            assert!(a.is_current(lease.token).await.unwrap(), "round {round}");
            if tokens.last() != Some(&lease.token) {
                tokens.push(lease.token);
                holders.push(name);
            }
        }
    }
    assert!(
        tokens.windows(2).all(|w| w[0] < w[1]),
        "tokens grow: {tokens:?}"
    );
    assert!(tokens.len() >= 5, "the lock changed hands: {holders:?}");
}

#[tokio::test]
async fn an_expired_holder_loses_to_a_higher_token() {
    let server = RedisServer::start();
    let redis = connect(&server).await;
    let ttl = Duration::from_millis(300);
    let a = Leader::new(redis.clone(), "a", ttl);
    let b = Leader::new(redis.clone(), "b", ttl);

    let old = a.try_acquire().await.unwrap().expect("a leads");
    assert_eq!(b.try_acquire().await.unwrap(), None, "a holds the lock");
    assert!(a.is_current(old.token).await.unwrap());

    // a stops renewing, as if paused.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert!(!old.is_valid(Instant::now()), "a's own clock says so too");
    let new = b.try_acquire().await.unwrap().expect("b takes over");
    assert!(new.token > old.token);

    // a wakes up: its authority is stale everywhere.
    assert_eq!(
        a.renew(&old).await,
        Err(CoordError::LeaseLost { token: old.token })
    );
    assert_eq!(
        a.release(old.clone()).await,
        Err(CoordError::LeaseLost { token: old.token })
    );
    assert!(!a.is_current(old.token).await.unwrap());
    assert!(b.is_current(new.token).await.unwrap());
    assert_eq!(a.try_acquire().await.unwrap(), None, "b still holds it");

    // b releases: no token is current, and the next holder gets a higher one.
    b.release(new.clone()).await.unwrap();
    assert!(!b.is_current(new.token).await.unwrap());
    let next = a.try_acquire().await.unwrap().expect("a leads again");
    assert!(next.token > new.token);
    // b cannot renew a lease it released, even though a holds one.
    assert!(b.renew(&new).await.is_err());
}

#[tokio::test]
async fn a_holder_whose_reply_was_lost_gets_its_lease_back() {
    let server = RedisServer::start();
    let redis = connect(&server).await;
    let a = Leader::new(redis.clone(), "a", Duration::from_secs(5));
    let first = a.try_acquire().await.unwrap().unwrap();
    // As if that reply never arrived: a tries again.
    let again = a.try_acquire().await.unwrap().unwrap();
    assert_eq!(again.token, first.token);
    a.renew(&again).await.unwrap();

    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let holder: String = redis::cmd("GET")
        .arg(LEADER_KEY)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(holder, "a");
}

#[tokio::test]
async fn a_dead_redis_is_an_error_not_a_panic() {
    let mut server = RedisServer::start();
    let redis = connect(&server).await;
    let a = Leader::new(redis, "a", Duration::from_secs(5));
    let lease = a.try_acquire().await.unwrap().unwrap();
    server.kill();
    assert!(matches!(
        a.renew(&lease).await,
        Err(CoordError::Unavailable(_))
    ));
    assert!(matches!(
        a.try_acquire().await,
        Err(CoordError::Unavailable(_))
    ));
    assert!(matches!(
        a.is_current(lease.token).await,
        Err(CoordError::Unavailable(_))
    ));
}
