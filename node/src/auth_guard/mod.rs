//! Bounded cost of password checks and throttling of credential guessing,
//! for SMTP AUTH and for admin API tokens (`docs/security.md`).
//!
//! - [`checks`]: [`PasswordChecks`], the node-wide bound on argon2 checks
//!   running at once, with reusable memory and a bounded queue.
//! - [`throttle`]: the pure record of failures of one subject: a growing
//!   delay, then a temporary block.
//! - [`ledger`]: where the records live, in the process or in Redis.
//! - [`AuthGuard`]: the steps of a login around a check: refuse a blocked
//!   address or user name before any check runs, count a failure, trust an
//!   address that logged in as a user.
//!
//! The subjects are the client's address (IPv4, or the /64 of an IPv6
//! address) and, for SMTP, the user name tried (known or not, so a block
//! tells nothing about which names exist). A user name's block does not
//! apply to an address that logged in as that user within the trust
//! duration: guessing from many addresses does not lock the real user out
//! of the addresses it uses.

pub mod checks;
pub mod ledger;
pub mod throttle;

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use checks::{Busy, PasswordChecks};
pub use ledger::{Ledger, LocalLedger, RedisLedger, Subject};
pub use throttle::{failure_delay, Policy, Standing};

use ledger::Look;

/// Counters of the checks and the throttles, for the metrics.
#[derive(Debug, Default)]
pub struct GuardStats {
    /// Checks that ran.
    pub checks_run: AtomicU64,
    /// Checks refused because every slot was taken (`454` / `503`).
    pub checks_refused_busy: AtomicU64,
    /// Checks that ran and did not match.
    pub failures: AtomicU64,
    /// Attempts refused without a check because the address was blocked.
    pub refused_address_blocked: AtomicU64,
    /// Attempts refused without a check because the user name was blocked.
    pub refused_user_blocked: AtomicU64,
    /// Blocks of an address that began.
    pub address_blocks: AtomicU64,
    /// Blocks of a user name that began.
    pub user_blocks: AtomicU64,
    /// Ledger operations that Redis failed (the node's own records served).
    pub ledger_errors: AtomicU64,
}

/// A copy of [`GuardStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardCounts {
    pub checks_run: u64,
    pub checks_refused_busy: u64,
    pub failures: u64,
    pub refused_address_blocked: u64,
    pub refused_user_blocked: u64,
    pub address_blocks: u64,
    pub user_blocks: u64,
    pub ledger_errors: u64,
}

impl GuardStats {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> GuardCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        GuardCounts {
            checks_run: get(&self.checks_run),
            checks_refused_busy: get(&self.checks_refused_busy),
            failures: get(&self.failures),
            refused_address_blocked: get(&self.refused_address_blocked),
            refused_user_blocked: get(&self.refused_user_blocked),
            address_blocks: get(&self.address_blocks),
            user_blocks: get(&self.user_blocks),
            ledger_errors: get(&self.ledger_errors),
        }
    }
}

/// How an [`AuthGuard`] throttles.
#[derive(Clone, Debug)]
pub struct GuardSettings {
    /// `smtp` or `admin`: keeps the two apart in the ledger and the log.
    pub scope: &'static str,
    pub address: Policy,
    /// `None`: no per-user throttle (admin tokens name no user).
    pub user: Option<Policy>,
    /// How long a login as a user makes the address exempt from that
    /// user name's block.
    pub trust_for: Duration,
    /// The delay after the first failure in the window; it doubles.
    pub failure_delay: Duration,
}

/// Whether a check may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Run the check; `trusted`: the address logged in as the user lately.
    Check {
        trusted: bool,
    },
    AddressBlocked {
        for_ms: u64,
    },
    UserBlocked {
        for_ms: u64,
    },
}

/// Why [`AuthGuard::check`] ran no check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No check slot came free in time.
    Busy,
    AddressBlocked {
        for_ms: u64,
    },
    UserBlocked {
        for_ms: u64,
    },
}

/// The steps of a login around a check, on one ledger.
pub struct AuthGuard {
    settings: GuardSettings,
    ledger: Arc<dyn Ledger>,
    /// Serves when the ledger (Redis) fails: throttling goes on per node.
    fallback: LocalLedger,
    stats: Arc<GuardStats>,
    last_warning: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for AuthGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGuard")
            .field("settings", &self.settings)
            .finish()
    }
}

/// The address as a subject: IPv4 as it is, IPv6 by its /64, which one
/// client usually holds whole.
pub fn address_key(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

impl AuthGuard {
    pub fn new(settings: GuardSettings, ledger: Arc<dyn Ledger>, stats: Arc<GuardStats>) -> Self {
        AuthGuard {
            settings,
            ledger,
            fallback: LocalLedger::default(),
            stats,
            last_warning: Mutex::new(None),
        }
    }

    /// A guard whose records are this process's.
    pub fn local(settings: GuardSettings, stats: Arc<GuardStats>) -> Self {
        Self::new(settings, Arc::new(LocalLedger::default()), stats)
    }

    pub fn stats(&self) -> &Arc<GuardStats> {
        &self.stats
    }

    fn subjects(&self, ip: IpAddr, user: Option<&str>, with_user: bool) -> Vec<Subject> {
        let scope = self.settings.scope;
        let mut subjects = vec![Subject {
            key: format!("{scope}:a:{}", address_key(ip)),
            policy: self.settings.address,
        }];
        if let (Some(user), Some(policy), true) = (user, self.settings.user, with_user) {
            subjects.push(Subject {
                key: format!("{scope}:u:{user}"),
                policy,
            });
        }
        subjects
    }

    fn trust_key(&self, ip: IpAddr, user: Option<&str>) -> Option<String> {
        self.settings.user?;
        Some(format!(
            "{}:t:{}:{}",
            self.settings.scope,
            address_key(ip),
            user?
        ))
    }

    fn ledger_failed(&self, error: &str) {
        GuardStats::bump(&self.stats.ledger_errors);
        let mut last = self.last_warning.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            *last = Some(Instant::now());
            tracing::warn!(scope = self.settings.scope, %error,
                "login throttle: the shared records are unavailable, this node's own serve (warned once a minute)");
        }
    }

    /// Whether a check may run for `user` from `ip`. Refusals are counted,
    /// never logged one by one (the block was logged when it began).
    pub async fn admit(&self, ip: IpAddr, user: Option<&str>) -> Admission {
        let subjects = self.subjects(ip, user, true);
        let trust = self.trust_key(ip, user);
        let look = match self.ledger.look(&subjects, trust.as_deref()).await {
            Ok(look) => look,
            Err(error) => {
                self.ledger_failed(&error);
                self.fallback.look_now(&subjects, trust.as_deref())
            }
        };
        let Look { standings, trusted } = look;
        if let Some(Standing::Blocked { for_ms }) = standings.first() {
            GuardStats::bump(&self.stats.refused_address_blocked);
            return Admission::AddressBlocked { for_ms: *for_ms };
        }
        match standings.get(1) {
            Some(Standing::Blocked { for_ms }) if !trusted => {
                GuardStats::bump(&self.stats.refused_user_blocked);
                Admission::UserBlocked { for_ms: *for_ms }
            }
            _ => Admission::Check { trusted },
        }
    }

    /// The steps before a check and the check itself: refuses a blocked
    /// address or user name, takes a check slot (looking again after a wait
    /// in the queue, for a block that began meanwhile), runs `check` in it.
    /// Answers its result and whether the address is trusted for the user.
    pub async fn check<T, F>(
        &self,
        checks: &PasswordChecks,
        ip: IpAddr,
        user: Option<&str>,
        check: F,
    ) -> Result<(T, bool), Refusal>
    where
        T: Send + 'static,
        F: FnOnce(&mut crate::auth::Memory) -> T + Send + 'static,
    {
        let mut trusted = self.admitted(ip, user).await?;
        let slot = checks.slot().await.map_err(|Busy| Refusal::Busy)?;
        if slot.waited() {
            trusted = self.admitted(ip, user).await?;
        }
        let result = slot.run(check).await.map_err(|Busy| Refusal::Busy)?;
        Ok((result, trusted))
    }

    async fn admitted(&self, ip: IpAddr, user: Option<&str>) -> Result<bool, Refusal> {
        match self.admit(ip, user).await {
            Admission::Check { trusted } => Ok(trusted),
            Admission::AddressBlocked { for_ms } => Err(Refusal::AddressBlocked { for_ms }),
            Admission::UserBlocked { for_ms } => Err(Refusal::UserBlocked { for_ms }),
        }
    }

    /// Counts a failed check; answers how long to wait before replying. A
    /// block that this failure begins is logged here, once.
    pub async fn failed(&self, ip: IpAddr, user: Option<&str>, trusted: bool) -> Duration {
        GuardStats::bump(&self.stats.failures);
        // A failure from an address trusted for the user (a client with an
        // old password) does not count against the user name.
        let subjects = self.subjects(ip, user, !trusted);
        let failed = match self.ledger.fail(&subjects).await {
            Ok(failed) => failed,
            Err(error) => {
                self.ledger_failed(&error);
                self.fallback.fail_now(&subjects)
            }
        };
        let mut most = 0;
        // The address comes first, then the user name, if any.
        for (index, (subject, failed)) in subjects.iter().zip(&failed).enumerate() {
            most = most.max(match failed.standing {
                Standing::Open { failures } => failures,
                Standing::Blocked { .. } => subject.policy.max_failures,
            });
            if failed.newly_blocked {
                let seconds = subject.policy.block_for.as_secs();
                if index == 0 {
                    GuardStats::bump(&self.stats.address_blocks);
                    tracing::warn!(scope = self.settings.scope, address = %address_key(ip),
                        failures = subject.policy.max_failures, block_seconds = seconds,
                        "login throttle: address blocked after failed logins");
                } else {
                    GuardStats::bump(&self.stats.user_blocks);
                    tracing::warn!(scope = self.settings.scope, user = ?user.unwrap_or_default(),
                        failures = subject.policy.max_failures, block_seconds = seconds,
                        "login throttle: user name blocked after failed logins (except from addresses it logged in from)");
                }
            }
        }
        failure_delay(self.settings.failure_delay, most)
    }

    /// A login as `user` from `ip` succeeded: the address is trusted for
    /// the user name. Failures already counted stay counted.
    pub async fn succeeded(&self, ip: IpAddr, user: Option<&str>) {
        let Some(trust) = self.trust_key(ip, user) else {
            return;
        };
        if let Err(error) = self.ledger.trust(&trust, self.settings.trust_for).await {
            self.ledger_failed(&error);
            self.fallback.trust_now(&trust, self.settings.trust_for);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard() -> AuthGuard {
        let policy = |max_failures| Policy {
            max_failures,
            window: Duration::from_secs(60),
            block_for: Duration::from_secs(60),
        };
        AuthGuard::local(
            GuardSettings {
                scope: "smtp",
                address: policy(4),
                user: Some(policy(3)),
                trust_for: Duration::from_secs(60),
                failure_delay: Duration::from_millis(10),
            },
            Arc::default(),
        )
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[tokio::test]
    async fn an_address_that_fails_is_blocked_and_others_are_not() {
        let guard = guard();
        let delays: Vec<u128> = {
            let mut out = Vec::new();
            for user in ["a", "b", "c", "d"] {
                assert!(matches!(
                    guard.admit(ip(1), Some(user)).await,
                    Admission::Check { trusted: false }
                ));
                out.push(guard.failed(ip(1), Some(user), false).await.as_millis());
            }
            out
        };
        // The fourth failure blocks: the delay then is the longest.
        assert_eq!(delays, [10, 20, 40, 80]);
        assert!(matches!(
            guard.admit(ip(1), Some("e")).await,
            Admission::AddressBlocked { .. }
        ));
        assert!(matches!(
            guard.admit(ip(2), Some("e")).await,
            Admission::Check { .. }
        ));
        let counts = guard.stats().snapshot();
        assert_eq!(counts.address_blocks, 1);
        assert_eq!(counts.refused_address_blocked, 1);
        assert_eq!(counts.failures, 4);
    }

    #[tokio::test]
    async fn a_user_blocked_by_guessing_elsewhere_still_logs_in_from_its_address() {
        let guard = guard();
        // The real client logged in from .10.
        guard.succeeded(ip(10), Some("app")).await;
        // Three attackers, one guess each.
        for last in 1..=3 {
            guard.failed(ip(last), Some("app"), false).await;
        }
        assert_eq!(guard.stats().snapshot().user_blocks, 1);
        assert!(matches!(
            guard.admit(ip(4), Some("app")).await,
            Admission::UserBlocked { .. }
        ));
        assert_eq!(
            guard.admit(ip(10), Some("app")).await,
            Admission::Check { trusted: true }
        );
        // Other users are not affected.
        assert_eq!(
            guard.admit(ip(4), Some("other")).await,
            Admission::Check { trusted: false }
        );
        // A failure from the trusted address does not count for the user.
        guard.failed(ip(10), Some("app2"), false).await;
        guard.succeeded(ip(10), Some("app2")).await;
        guard.failed(ip(10), Some("app2"), true).await;
        guard.failed(ip(10), Some("app2"), true).await;
        assert_eq!(
            guard.admit(ip(5), Some("app2")).await,
            Admission::Check { trusted: false }
        );
    }

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        assert_eq!(address_key("192.0.2.7".parse().unwrap()), "192.0.2.7");
        assert_eq!(
            address_key("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7"
        );
        assert_eq!(
            address_key("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            address_key("2001:db8:1:2:ffff::1".parse().unwrap())
        );
        assert_ne!(
            address_key("2001:db8:1:2::1".parse().unwrap()),
            address_key("2001:db8:1:3::1".parse().unwrap())
        );
    }
}
