//! The in-process limits: they hold for this node alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{ConnectionLease, DomainLimits, LimitError};

/// Spaces messages evenly: at most `count` per `per`, no bursts (GCRA with
/// no burst tolerance). Each caller reserves the next free slot.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next_free: Option<Instant>,
}

impl RateLimiter {
    pub fn new(count: u32, per: Duration) -> Self {
        RateLimiter {
            interval: RateLimiter::interval(count, per),
            next_free: None,
        }
    }

    /// The spacing between two messages under `count` per `per`; the
    /// cluster-wide limiter spaces its reservations the same way.
    pub fn interval(count: u32, per: Duration) -> Duration {
        per / count.max(1)
    }

    /// Reserves the next slot; returns how long to wait before using it.
    pub fn reserve(&mut self, now: Instant) -> Duration {
        let slot = self.next_free.map_or(now, |free| free.max(now));
        self.next_free = Some(slot + self.interval);
        slot - now
    }
}

/// Open connections per domain and one [`RateLimiter`] per domain and rate.
#[derive(Debug, Default)]
pub struct LocalLimits {
    connections: Mutex<HashMap<String, usize>>,
    rates: Mutex<HashMap<String, (u32, Duration, RateLimiter)>>,
    next_lease: AtomicU64,
}

impl LocalLimits {
    pub fn new() -> LocalLimits {
        LocalLimits::default()
    }

    /// Connections of `domain` open now.
    pub fn connections(&self, domain: &str) -> usize {
        let connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        connections.get(domain).copied().unwrap_or(0)
    }

    fn reserve_at(&self, domain: &str, count: u32, per: Duration, now: Instant) -> Duration {
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let entry = rates
            .entry(domain.to_string())
            .or_insert_with(|| (count, per, RateLimiter::new(count, per)));
        if (entry.0, entry.1) != (count, per) {
            *entry = (count, per, RateLimiter::new(count, per));
        }
        entry.2.reserve(now)
    }
}

#[async_trait]
impl DomainLimits for LocalLimits {
    async fn acquire_connection(
        &self,
        domain: &str,
        cap: usize,
    ) -> Result<Option<ConnectionLease>, LimitError> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        let open = connections.entry(domain.to_string()).or_insert(0);
        if *open >= cap {
            return Ok(None);
        }
        *open += 1;
        let n = self.next_lease.fetch_add(1, Ordering::Relaxed);
        Ok(Some(ConnectionLease {
            domain: domain.to_string(),
            id: format!("local:{n}"),
            ttl: None,
            renew_every: None,
            requested: Instant::now(),
        }))
    }

    async fn renew(&self, _: &ConnectionLease) -> Result<(), LimitError> {
        Ok(())
    }

    async fn release(&self, lease: ConnectionLease) -> Result<(), LimitError> {
        let mut connections = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = connections.get_mut(&lease.domain) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                connections.remove(&lease.domain);
            }
        }
        Ok(())
    }

    async fn reserve_rate(
        &self,
        domain: &str,
        count: u32,
        per: Duration,
    ) -> Result<Duration, LimitError> {
        Ok(self.reserve_at(domain, count, per, Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::suite;

    #[test]
    fn the_rate_spaces_messages_evenly() {
        let mut rate = RateLimiter::new(50, Duration::from_secs(1));
        let t0 = Instant::now();
        let waits: Vec<u128> = (0..4).map(|_| rate.reserve(t0).as_millis()).collect();
        assert_eq!(waits, [0, 20, 40, 60]);
        // Later callers wait only for what is still reserved.
        assert_eq!(rate.reserve(t0 + Duration::from_millis(50)).as_millis(), 30);
        // After a pause there is no burst credit: the next slot is now.
        assert_eq!(rate.reserve(t0 + Duration::from_secs(10)), Duration::ZERO);
        assert_eq!(
            rate.reserve(t0 + Duration::from_secs(10)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn hourly_rates_work_too() {
        let mut rate = RateLimiter::new(1000, Duration::from_secs(3600));
        let t0 = Instant::now();
        rate.reserve(t0);
        assert_eq!(rate.reserve(t0), Duration::from_millis(3600));
    }

    #[test]
    fn each_domain_has_its_own_rate() {
        let limits = LocalLimits::new();
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        assert_eq!(
            limits.reserve_at("a.example", 10, second, t0),
            Duration::ZERO
        );
        assert_eq!(
            limits.reserve_at("b.example", 10, second, t0),
            Duration::ZERO
        );
        assert_eq!(
            limits.reserve_at("a.example", 10, second, t0),
            Duration::from_millis(100)
        );
        // A changed rate starts afresh.
        assert_eq!(
            limits.reserve_at("a.example", 5, second, t0),
            Duration::ZERO
        );
        assert_eq!(
            limits.reserve_at("a.example", 5, second, t0),
            Duration::from_millis(200)
        );
    }

    #[tokio::test]
    async fn the_cap_counts_open_connections_per_domain() {
        let limits = LocalLimits::new();
        let a = limits.acquire_connection("a.example", 2).await.unwrap();
        let b = limits.acquire_connection("a.example", 2).await.unwrap();
        assert!(a.is_some() && b.is_some());
        assert_ne!(a, b);
        assert_eq!(limits.connections("a.example"), 2);
        assert_eq!(a.as_ref().unwrap().ttl, None, "local leases never expire");
        limits.renew(a.as_ref().unwrap()).await.unwrap();
        limits.release(a.unwrap()).await.unwrap();
        assert_eq!(limits.connections("a.example"), 1);
        limits.release(b.unwrap()).await.unwrap();
        assert_eq!(limits.connections("a.example"), 0);
    }

    #[tokio::test]
    async fn shared_suite_cap_and_release() {
        suite::cap_and_release(&LocalLimits::new()).await;
    }

    #[tokio::test]
    async fn shared_suite_rate() {
        suite::rate_spaces_reservations(&LocalLimits::new()).await;
    }
}
