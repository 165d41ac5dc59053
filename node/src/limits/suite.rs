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
/// have passed, there is no burst credit.
pub async fn rate_spaces_reservations(limits: &dyn DomainLimits) {
    let domain = "rate.example";
    let second = Duration::from_secs(1);
    let mut waits = Vec::new();
    for _ in 0..4 {
        waits.push(limits.reserve_rate(domain, 20, second).await.unwrap());
    }
    // 50 ms apart; the calls themselves take a little of that time.
    assert!(waits[0] <= Duration::from_millis(5), "{waits:?}");
    for (i, wait) in waits.iter().enumerate() {
        let expected = Duration::from_millis(50 * i as u64);
        assert!(
            *wait <= expected && expected - *wait < Duration::from_millis(30),
            "{waits:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(limits.reserve_rate(domain, 20, second).await.unwrap() <= Duration::from_millis(5));
    let next = limits.reserve_rate(domain, 20, second).await.unwrap();
    assert!(
        next > Duration::from_millis(20) && next <= Duration::from_millis(50),
        "{next:?}"
    );
}
