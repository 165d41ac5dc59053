//! One leader among the coordinators, with fencing tokens.
//!
//! Every node runs a coordinator, but the jobs that change shared state
//! (reclaiming a dead node's work, promoting due retries) must run once.
//! The leader holds a lease: the key [`LEADER_KEY`], set with
//! `SET … NX PX <ttl>` to its holder id and renewed well before it expires.
//!
//! # Why a fencing token
//!
//! A lease alone is not enough. A coordinator can stop for longer than the
//! TTL at any moment (a long GC-like pause, `SIGSTOP`, a VM migration, a
//! network partition) between checking that it leads and acting on it. Its
//! lease expires, another coordinator takes over, and the first one wakes up
//! still believing it leads: two leaders reclaim the same work. No local
//! clock check closes that gap, because the pause can fall right after the
//! check.
//!
//! So every acquisition takes the next number from `INCR` on [`FENCE_KEY`]
//! and returns it with the [`Lease`]. Tokens only grow; the current leader's
//! token is the current value of the fence. Work that matters carries its
//! token, and Redis checks it in the same script that does the work (the
//! fence still equals the token and the lease key exists); stale authority
//! is then refused by Redis rather than trusted by the stale coordinator.
//! [`Leader::is_current`] is that check on its own.
//!
//! # Keys
//!
//! | key | type | value |
//! | --- | --- | --- |
//! | `smarthost:{cluster}:leader` | string with a TTL | the holder id of the current lease |
//! | `smarthost:{cluster}:fence` | integer | the token of the latest acquisition |
//!
//! Renewing and releasing are compare-and-set scripts: they act only if the
//! lease key still holds this holder *and* the fence still holds this
//! lease's token, so a coordinator can never extend or delete a lease that
//! is not its own, nor one of its own earlier, expired leases.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use redis::Script;

use crate::redis::Redis;
use crate::CoordError;

/// The leader lease: the holder id, with a TTL.
pub const LEADER_KEY: &str = "smarthost:{cluster}:leader";

/// The fencing token of the latest acquisition.
pub const FENCE_KEY: &str = "smarthost:{cluster}:fence";

/// A held leadership, as this coordinator believes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The fencing token of this acquisition.
    pub token: u64,
    /// Until when this coordinator may believe it leads: the TTL counted
    /// from when the request was sent, less an allowance for clock drift.
    pub valid_until: Instant,
}

impl Lease {
    /// Whether the lease may still be relied on at `now` (a local check;
    /// see the module doc for why work is fenced as well).
    pub fn is_valid(&self, now: Instant) -> bool {
        now < self.valid_until
    }
}

/// Takes the lease if nobody holds it, and returns the new token. A holder
/// that already holds it (the reply to its acquisition was lost) gets its
/// lease extended and its token again. Nil if someone else holds it.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  local token = redis.call('GET', KEYS[2])
  if token then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(token)
  end
end
return false
",
    )
});

/// Extends the lease if it is still this holder's, with this token.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 0
",
    )
});

/// Deletes the lease if it is still this holder's, with this token.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Whether a lease is held and `token` is its token.
static IS_CURRENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('GET', KEYS[2]) == ARGV[1] then
  return 1
end
return 0
",
    )
});

/// One contender for leadership.
#[derive(Debug)]
pub struct Leader {
    redis: Redis,
    holder: String,
    ttl: Duration,
}

impl Leader {
    /// A contender named `holder`, which must be unique per running
    /// coordinator (not only per node: a restarted process is a new
    /// holder). Leases last `ttl` unless renewed.
    pub fn new(redis: Redis, holder: impl Into<String>, ttl: Duration) -> Leader {
        Leader {
            redis,
            holder: holder.into(),
            ttl,
        }
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn ttl_ms(&self) -> u64 {
        (self.ttl.as_millis() as u64).max(1)
    }

    /// Until when a lease granted by a request sent at `sent` may be
    /// relied on: the TTL less 1% and 2 ms for the clocks' drift.
    fn valid_until(&self, sent: Instant) -> Instant {
        let drift = self.ttl / 100 + Duration::from_millis(2);
        sent + self.ttl.saturating_sub(drift)
    }

    /// Becomes the leader if nobody is: `Some` lease with a new fencing
    /// token, or `None` while another holder's lease lasts.
    pub async fn try_acquire(&self) -> Result<Option<Lease>, CoordError> {
        let sent = Instant::now();
        let mut call = ACQUIRE.prepare_invoke();
        call.key(LEADER_KEY)
            .key(FENCE_KEY)
            .arg(&self.holder)
            .arg(self.ttl_ms());
        let token: Option<u64> = self.redis.invoke("leader acquire", &call).await?;
        Ok(token.map(|token| Lease {
            token,
            valid_until: self.valid_until(sent),
        }))
    }

    /// Extends `lease` by the TTL. [`CoordError::LeaseLost`] if it expired
    /// or another holder took over: stop acting as leader at once.
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, CoordError> {
        let sent = Instant::now();
        let mut call = RENEW.prepare_invoke();
        call.key(LEADER_KEY)
            .key(FENCE_KEY)
            .arg(&self.holder)
            .arg(lease.token)
            .arg(self.ttl_ms());
        let renewed: i64 = self.redis.invoke("leader renew", &call).await?;
        if renewed != 1 {
            return Err(CoordError::LeaseLost { token: lease.token });
        }
        Ok(Lease {
            token: lease.token,
            valid_until: self.valid_until(sent),
        })
    }

    /// Gives the lease up so that another coordinator need not wait for it
    /// to expire. [`CoordError::LeaseLost`] if it was no longer held.
    pub async fn release(&self, lease: Lease) -> Result<(), CoordError> {
        let mut call = RELEASE.prepare_invoke();
        call.key(LEADER_KEY)
            .key(FENCE_KEY)
            .arg(&self.holder)
            .arg(lease.token);
        let released: i64 = self.redis.invoke("leader release", &call).await?;
        if released != 1 {
            return Err(CoordError::LeaseLost { token: lease.token });
        }
        Ok(())
    }

    /// The holder that leads now, by anyone's lease; `None` when nobody
    /// does.
    pub async fn current_holder(&self) -> Result<Option<String>, CoordError> {
        self.redis
            .query("leader holder", redis::cmd("GET").arg(LEADER_KEY))
            .await
    }

    /// Whether `token` belongs to the lease held now, by anyone.
    pub async fn is_current(&self, token: u64) -> Result<bool, CoordError> {
        let mut call = IS_CURRENT.prepare_invoke();
        call.key(LEADER_KEY).key(FENCE_KEY).arg(token);
        let current: i64 = self.redis.invoke("leader is_current", &call).await?;
        Ok(current == 1)
    }
}
