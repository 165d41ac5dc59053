//! The tests every [`DomainLimits`] implementation passes.

use std::time::Duration;

use super::DomainLimits;

/// At most `cap` leases at once per domain; a released slot is free again;
/// other domains are not affected.
pub async fn cap_and_release(limits: &dyn DomainLimits) {
    let domain = "cap.example";
    let mut held = Vec::new();
    for _ in 0..3 {
        let lease = limits.acquire_connection(domain, 3).await.unwrap();
        held.push(lease.expect("a free slot"));
    }
    assert!(limits
        .acquire_connection(domain, 3)
        .await
        .unwrap()
        .is_none());
    assert!(
        limits
            .acquire_connection("other.example", 1)
            .await
            .unwrap()
            .is_some(),
        "another domain has its own slots"
    );
    // A larger cap admits more.
    let fourth = limits.acquire_connection(domain, 4).await.unwrap();
    assert!(fourth.is_some());
    assert!(limits
        .acquire_connection(domain, 4)
        .await
        .unwrap()
        .is_none());

    for lease in &held {
        limits.renew(lease).await.unwrap();
    }
    let first = held.remove(0);
    limits.release(first).await.unwrap();
    let again = limits.acquire_connection(domain, 3).await.unwrap();
    assert!(
        again.is_none(),
        "three held (two of the first and the fourth) at cap 3"
    );
    limits.release(fourth.unwrap()).await.unwrap();
    let again = limits.acquire_connection(domain, 3).await.unwrap();
    assert!(again.is_some(), "a released slot is free again");
}

/// Reservations made at once are spaced by the interval; after the slots
/// have passed, there is no burst credit. Judged on when each reserved
/// slot falls (the call's start and end plus the wait it answered), so
/// that slow calls on a loaded machine do not look like a limiter fault.
pub async fn rate_spaces_reservations(limits: &dyn DomainLimits) {
    let domain = "rate.example";
    let second = Duration::from_secs(1);
    let interval = Duration::from_millis(50);
    // A little for the clocks of the test and of the store.
    let slack = Duration::from_millis(2);
    let mut slots = Vec::new();
    for _ in 0..4 {
        slots.push(reserve(limits, domain, 20, second).await);
    }
    let quick = slots.iter().all(|s| s.called < Duration::from_millis(10));
    for pair in slots.windows(2) {
        let (earlier, later) = (&pair[0], &pair[1]);
        // Never closer than the interval...
        assert!(
            later.latest - earlier.earliest + slack >= interval,
            "{slots:?}"
        );
        // ...and, asked at once, not further apart either.
        if quick {
            assert!(
                later.earliest - earlier.latest <= interval + slack,
                "{slots:?}"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let fresh = reserve(limits, domain, 20, second).await;
    assert!(
        fresh.wait <= Duration::from_millis(5),
        "no backlog: {fresh:?}"
    );
    let next = reserve(limits, domain, 20, second).await;
    assert!(
        next.latest - fresh.earliest + slack >= interval,
        "no burst: {fresh:?} {next:?}"
    );
}

/// When a reserved rate slot falls: between the call's start and its end,
/// each plus the wait it answered.
#[derive(Debug)]
struct Slot {
    earliest: std::time::Instant,
    latest: std::time::Instant,
    wait: Duration,
    called: Duration,
}

async fn reserve(limits: &dyn DomainLimits, domain: &str, rate: u32, per: Duration) -> Slot {
    let before = std::time::Instant::now();
    let wait = limits.reserve_rate(domain, rate, per).await.unwrap();
    let after = std::time::Instant::now();
    Slot {
        earliest: before + wait,
        latest: after + wait,
        wait,
        called: after - before,
    }
}
