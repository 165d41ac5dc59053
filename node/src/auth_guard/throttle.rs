//! The throttle of failed logins for one subject (an address or a user
//! name), without I/O: the time is passed in, so every step is a table test.
//!
//! A subject collects failures; failures are forgotten `window` after the
//! last one. The failure that makes `max_failures` blocks the subject for
//! `block_for`; while blocked no check is run for it. The Redis ledger
//! (`scripts/fail.lua`, `scripts/look.lua`) keeps the same record with
//! expiring keys and must agree with this one.

use std::time::Duration;

/// When failures block a subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The failure that makes this many blocks the subject; 0: never.
    pub max_failures: u32,
    /// Failures are forgotten this long after the last one.
    pub window: Duration,
    /// How long a block lasts.
    pub block_for: Duration,
}

/// Where a subject stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// Checks run; `failures` in the current window.
    Open { failures: u32 },
    /// No check runs for this long (ms).
    Blocked { for_ms: u64 },
}

/// The answer to a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failed {
    pub standing: Standing,
    /// This failure started the block: the one moment to log it.
    pub newly_blocked: bool,
}

/// The record of one subject; times are milliseconds on one clock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Record {
    failures: u32,
    last_failure_ms: u64,
    blocked_until_ms: u64,
}

impl Record {
    pub fn standing(&self, now_ms: u64, policy: &Policy) -> Standing {
        if self.blocked_until_ms > now_ms {
            return Standing::Blocked {
                for_ms: self.blocked_until_ms - now_ms,
            };
        }
        Standing::Open {
            failures: if self.window_over(now_ms, policy) {
                0
            } else {
                self.failures
            },
        }
    }

    /// Counts one failure (a check that ran and did not match).
    pub fn fail(&mut self, now_ms: u64, policy: &Policy) -> Failed {
        if let blocked @ Standing::Blocked { .. } = self.standing(now_ms, policy) {
            // A check that was under way when the block began.
            return Failed {
                standing: blocked,
                newly_blocked: false,
            };
        }
        let failures = match self.standing(now_ms, policy) {
            Standing::Open { failures } => failures + 1,
            Standing::Blocked { .. } => unreachable!("handled above"),
        };
        self.last_failure_ms = now_ms;
        if policy.max_failures > 0 && failures >= policy.max_failures {
            let for_ms = millis(policy.block_for);
            self.failures = 0;
            self.blocked_until_ms = now_ms + for_ms;
            return Failed {
                standing: Standing::Blocked { for_ms },
                newly_blocked: true,
            };
        }
        self.failures = failures;
        Failed {
            standing: Standing::Open { failures },
            newly_blocked: false,
        }
    }

    /// Nothing in the record matters any more: it may be dropped.
    pub fn is_spent(&self, now_ms: u64, policy: &Policy) -> bool {
        self.standing(now_ms, policy) == Standing::Open { failures: 0 }
    }

    fn window_over(&self, now_ms: u64, policy: &Policy) -> bool {
        now_ms.saturating_sub(self.last_failure_ms) >= millis(policy.window)
    }
}

/// How long a failed login waits before its reply: `base` after the first
/// failure in the window, doubling with each further one, at most 16 ×
/// `base`. It slows a client that guesses in one connection; the block is
/// what stops one guessing in many.
pub fn failure_delay(base: Duration, failures: u32) -> Duration {
    base * (1u32 << failures.clamp(1, 5).saturating_sub(1))
}

pub(crate) fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        max_failures: 3,
        window: Duration::from_secs(10),
        block_for: Duration::from_secs(60),
    };

    fn open(failures: u32) -> Standing {
        Standing::Open { failures }
    }

    fn blocked(for_ms: u64) -> Standing {
        Standing::Blocked { for_ms }
    }

    /// (time in ms, a failure at that time?, the standing after it, newly blocked)
    fn run(policy: &Policy, steps: &[(u64, bool, Standing, bool)]) {
        let mut record = Record::default();
        for (i, &(now, fail, expected, newly)) in steps.iter().enumerate() {
            if fail {
                let failed = record.fail(now, policy);
                assert_eq!(failed.standing, expected, "step {i} at {now} ms");
                assert_eq!(failed.newly_blocked, newly, "step {i} at {now} ms");
            }
            assert_eq!(
                record.standing(now, policy),
                expected,
                "step {i} at {now} ms"
            );
        }
    }

    #[test]
    fn the_third_failure_in_the_window_blocks_and_the_block_ends() {
        run(
            &POLICY,
            &[
                (0, false, open(0), false),
                (1_000, true, open(1), false),
                (2_000, true, open(2), false),
                (3_000, true, blocked(60_000), true),
                (3_001, false, blocked(59_999), false),
                // A check under way when the block began: no new block.
                (4_000, true, blocked(59_000), false),
                (62_999, false, blocked(1), false),
                // Over: the count starts afresh.
                (63_000, false, open(0), false),
                (63_500, true, open(1), false),
            ],
        );
    }

    #[test]
    fn failures_are_forgotten_a_window_after_the_last_one() {
        run(
            &POLICY,
            &[
                (0, true, open(1), false),
                (9_000, true, open(2), false),
                // 10 s after the second failure: both forgotten.
                (19_000, false, open(0), false),
                (19_000, true, open(1), false),
                // Each failure starts the window again: slow guessing adds up.
                (28_000, true, open(2), false),
                (37_000, true, blocked(60_000), true),
            ],
        );
    }

    #[test]
    fn zero_max_failures_never_blocks() {
        let policy = Policy {
            max_failures: 0,
            ..POLICY
        };
        let steps: Vec<_> = (1..=50u32)
            .map(|i| (u64::from(i) * 10, true, open(i), false))
            .collect();
        run(&policy, &steps);
    }

    #[test]
    fn a_spent_record_can_be_dropped() {
        let mut record = Record::default();
        assert!(record.is_spent(0, &POLICY));
        record.fail(0, &POLICY);
        assert!(!record.is_spent(9_999, &POLICY));
        assert!(record.is_spent(10_000, &POLICY));
        for t in [1, 2, 3] {
            record.fail(20_000 + t, &POLICY);
        }
        assert!(!record.is_spent(80_002, &POLICY), "blocked until 80 003");
        assert!(record.is_spent(80_003, &POLICY));
    }

    #[test]
    fn the_delay_doubles_up_to_sixteen_times_the_base() {
        let base = Duration::from_millis(100);
        let table = [
            (0, 100),
            (1, 100),
            (2, 200),
            (3, 400),
            (4, 800),
            (5, 1_600),
            (6, 1_600),
            (1_000, 1_600),
        ];
        for (failures, ms) in table {
            assert_eq!(
                failure_delay(base, failures),
                Duration::from_millis(ms),
                "{failures}"
            );
        }
        assert_eq!(failure_delay(Duration::ZERO, 9), Duration::ZERO);
    }
}
