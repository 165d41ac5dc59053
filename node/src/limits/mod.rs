//! Per-domain delivery limits: how many connections a destination domain
//! may have open at once and how fast messages may go to it.
//!
//! One trait, [`DomainLimits`], with one implementation per queue backend:
//!
//! - [`LocalLimits`]: in-process counters and a [`RateLimiter`] per domain;
//!   the limits hold for this node alone.
//! - [`RedisLimits`]: the limits hold for the whole cluster. The connection
//!   cap is a lease semaphore (a sorted set of expiring leases that their
//!   holders renew), the rate a GCRA limiter; both are Lua scripts that read
//!   the Redis server's clock, so nodes with skewed clocks agree.
//!
//! A connection is opened only under a lease. A lease that could not be
//! renewed before it expired may have been given to someone else: its
//! holder finishes the message in hand and closes the connection.

use std::time::{Duration, Instant};

use async_trait::async_trait;

pub mod local;
pub mod redis;
#[cfg(test)]
pub(crate) mod suite;

pub use self::redis::{RedisLimits, RedisLimitsOptions};
pub use local::{LocalLimits, RateLimiter};

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The limits cannot be read or changed right now (backend
    /// unreachable, slow or failing). No new connection is opened.
    #[error("limits unavailable: {0}")]
    Unavailable(String),
    /// The lease expired before it was renewed; its slot may be someone
    /// else's now.
    #[error("connection lease {0} expired")]
    LeaseLost(String),
}

/// The right to keep one connection to `domain` open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionLease {
    pub domain: String,
    /// Unique in the cluster: `<node>:<random hex>`.
    pub id: String,
    /// How long the lease lives unless renewed; `None`: until released.
    pub ttl: Option<Duration>,
    /// How often its holder renews it; `None`: never.
    pub renew_every: Option<Duration>,
    /// When the request that acquired it was sent: the earliest moment its
    /// TTL can have started on the backend, so the holder counts validity
    /// and renewals from here, not from when the lease reached it.
    pub requested: Instant,
}

#[async_trait]
pub trait DomainLimits: Send + Sync + 'static {
    /// Takes one of `cap` connection slots of `domain`; `None` when all
    /// are taken.
    async fn acquire_connection(
        &self,
        domain: &str,
        cap: usize,
    ) -> Result<Option<ConnectionLease>, LimitError>;

    /// Extends the lease by its TTL. [`LimitError::LeaseLost`] if it had
    /// already expired.
    async fn renew(&self, lease: &ConnectionLease) -> Result<(), LimitError>;

    /// Gives the slot back.
    async fn release(&self, lease: ConnectionLease) -> Result<(), LimitError>;

    /// Reserves the next slot under a rate of `count` messages per `per`
    /// (evenly spaced, no bursts) and returns how long to wait before
    /// using it.
    async fn reserve_rate(
        &self,
        domain: &str,
        count: u32,
        per: Duration,
    ) -> Result<Duration, LimitError>;
}

/// How long after `now` the first renewal of `lease` is due: a renewal
/// period after the lease was requested (at once if that is past). `None`
/// for a lease that is never renewed.
pub fn first_renewal(lease: &ConnectionLease, now: Instant) -> Option<Duration> {
    let every = lease.renew_every?;
    Some((lease.requested + every).saturating_duration_since(now))
}

/// What the holder of a lease knows about it: until when it is surely
/// valid (by this node's monotonic clock) and whether it was lost.
#[derive(Debug)]
pub struct LeaseHealth {
    ttl: Option<Duration>,
    valid_until: Option<Instant>,
    lost: bool,
}

impl LeaseHealth {
    /// A lease, valid for its TTL from when it was requested.
    pub fn of(lease: &ConnectionLease) -> LeaseHealth {
        LeaseHealth::new(lease, lease.requested)
    }

    /// A lease acquired (or renewed) no later than `acquired`.
    pub fn new(lease: &ConnectionLease, acquired: Instant) -> LeaseHealth {
        LeaseHealth {
            ttl: lease.ttl,
            valid_until: lease.ttl.map(|ttl| acquired + ttl),
            lost: false,
        }
    }

    /// A renewal that was sent at `sent` succeeded.
    pub fn renewed(&mut self, sent: Instant) {
        if let Some(ttl) = self.ttl {
            let until = sent + ttl;
            self.valid_until = Some(self.valid_until.map_or(until, |v| v.max(until)));
        }
    }

    /// The lease expired before it was renewed.
    pub fn lost(&mut self) {
        self.lost = true;
    }

    /// Whether the connection may start another message at `now`: the
    /// lease was not lost and has not run out (a renewal that failed
    /// because the backend was unreachable leaves the old expiry).
    pub fn usable(&self, now: Instant) -> bool {
        !self.lost && self.valid_until.is_none_or(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(ttl: Option<Duration>) -> ConnectionLease {
        ConnectionLease {
            domain: "example.org".into(),
            id: "n1:1".into(),
            ttl,
            renew_every: ttl.map(|t| t / 3),
            requested: Instant::now(),
        }
    }

    #[test]
    fn a_lease_is_valid_from_when_it_was_requested_not_when_it_arrived() {
        let mut lease = lease(Some(Duration::from_secs(30)));
        let t0 = Instant::now();
        lease.requested = t0;
        // The acquire and the take took 20 s before the holder got it.
        let health = LeaseHealth::of(&lease);
        assert!(health.usable(t0 + Duration::from_secs(29)));
        assert!(!health.usable(t0 + Duration::from_secs(30)));
        assert_eq!(
            first_renewal(&lease, t0 + Duration::from_secs(20)),
            Some(Duration::ZERO),
            "a third of the TTL is past: renew at once"
        );
        assert_eq!(
            first_renewal(&lease, t0 + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
    }

    #[test]
    fn a_local_lease_is_usable_until_released() {
        let t0 = Instant::now();
        let health = LeaseHealth::new(&lease(None), t0);
        assert!(health.usable(t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn an_expiring_lease_is_usable_while_renewed() {
        let t0 = Instant::now();
        let mut health = LeaseHealth::new(&lease(Some(Duration::from_secs(30))), t0);
        assert!(health.usable(t0 + Duration::from_secs(29)));
        assert!(!health.usable(t0 + Duration::from_secs(30)));
        health.renewed(t0 + Duration::from_secs(10));
        assert!(health.usable(t0 + Duration::from_secs(39)));
        assert!(!health.usable(t0 + Duration::from_secs(40)));
        // A late answer to an older renewal does not shorten it.
        health.renewed(t0 + Duration::from_secs(5));
        assert!(health.usable(t0 + Duration::from_secs(39)));
        health.lost();
        assert!(!health.usable(t0 + Duration::from_secs(11)));
    }
}
