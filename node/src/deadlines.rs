//! How long an SMTP client may take: the deadlines of one session, as a
//! pure clock with the time passed in, so the rules are table-tested
//! without sleeping.
//!
//! A per-read timeout alone lets a client hold a connection for ever by
//! sending one byte just before it runs out (slowloris). So three limits
//! apply together (see `docs/security.md`, "Slow clients"):
//!
//! - **idle**: no byte for `idle` (`smtp.connection_timeout`), counted from
//!   the last byte or from the moment the server began to wait;
//! - **command**: a command line, or an AUTH response line, must be complete
//!   within `command` (`smtp.command_timeout`) of the moment the server
//!   began to wait for it, however its bytes trickle;
//! - **data**: the message after `354` must end within `data`
//!   (`smtp.data_timeout`) and must keep a minimum average rate: it starts
//!   with `idle` of credit and every byte received buys `1 / min_data_rate`
//!   seconds more (Postfix's `smtpd_min_data_rate` model). `min_data_rate`
//!   0 leaves only the idle and the overall limit.

use std::time::{Duration, Instant};

/// The configured limits (`[smtp]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub idle: Duration,
    pub command: Duration,
    pub data: Duration,
    /// Bytes per second; 0: no minimum.
    pub min_data_rate: u64,
}

/// Which limit ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    Idle,
    Command,
    Data,
    DataRate,
}

impl Expired {
    /// The text of the `421 4.4.2` reply after the host name.
    pub fn reply_text(self) -> &'static str {
        match self {
            Expired::Idle => "Error: timeout exceeded",
            Expired::Command => "Error: command not completed in time",
            Expired::Data => "Error: message transfer took too long",
            Expired::DataRate => "Error: message transfer too slow",
        }
    }

    /// The name used in logs.
    pub fn name(self) -> &'static str {
        match self {
            Expired::Idle => "idle",
            Expired::Command => "command",
            Expired::Data => "data",
            Expired::DataRate => "data_rate",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Command,
    Data,
}

/// The deadlines of one session.
#[derive(Clone, Debug)]
pub struct Deadlines {
    limits: Limits,
    phase: Phase,
    /// When the server began to wait for this command line or this message.
    started: Instant,
    /// The last byte received, or `started` when later.
    last_input: Instant,
    /// Bytes received in this phase.
    bytes: u64,
}

impl Deadlines {
    /// A session that has just sent its greeting and waits for a command.
    pub fn new(limits: Limits, now: Instant) -> Deadlines {
        Deadlines {
            limits,
            phase: Phase::Command,
            started: now,
            last_input: now,
            bytes: 0,
        }
    }

    /// The server has answered and now waits for the next command line.
    pub fn command(&mut self, now: Instant) {
        self.start(Phase::Command, now);
    }

    /// The server sent `354` and now receives the message.
    pub fn data(&mut self, now: Instant) {
        self.start(Phase::Data, now);
    }

    fn start(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.started = now;
        self.last_input = now;
        self.bytes = 0;
    }

    pub fn in_data(&self) -> bool {
        self.phase == Phase::Data
    }

    /// `n` bytes arrived at `now`.
    pub fn received(&mut self, n: usize, now: Instant) {
        self.bytes = self.bytes.saturating_add(n as u64);
        self.last_input = self.last_input.max(now);
    }

    /// The earliest moment at which a limit runs out if nothing more
    /// arrives, and which limit that is.
    pub fn deadline(&self) -> (Instant, Expired) {
        let mut earliest = (self.last_input + self.limits.idle, Expired::Idle);
        let mut consider = |at: Instant, why: Expired| {
            if at < earliest.0 {
                earliest = (at, why);
            }
        };
        match self.phase {
            Phase::Command => consider(self.started + self.limits.command, Expired::Command),
            Phase::Data => {
                consider(self.started + self.limits.data, Expired::Data);
                if self.limits.min_data_rate > 0 {
                    let earned = u128::from(self.bytes) * 1_000_000_000
                        / u128::from(self.limits.min_data_rate);
                    let earned = Duration::from_nanos(u64::try_from(earned).unwrap_or(u64::MAX));
                    consider(self.started + self.limits.idle + earned, Expired::DataRate);
                }
            }
        }
        earliest
    }

    /// The limit that has run out at `now`, if any.
    pub fn expired(&self, now: Instant) -> Option<Expired> {
        let (at, why) = self.deadline();
        (now >= at).then_some(why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        idle: Duration::from_secs(10),
        command: Duration::from_secs(30),
        data: Duration::from_secs(600),
        min_data_rate: 100,
    };

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Feeds `(at seconds, bytes)` and returns what has expired at `check`.
    fn run(data: bool, arrivals: &[(f64, usize)], check: f64) -> Option<Expired> {
        let t0 = Instant::now();
        let mut d = Deadlines::new(LIMITS, t0);
        if data {
            d.data(t0);
        }
        for &(at, n) in arrivals {
            let now = t0 + secs(at);
            if let Some(why) = d.expired(now) {
                return Some(why);
            }
            d.received(n, now);
        }
        d.expired(t0 + secs(check))
    }

    #[test]
    fn limits_in_each_phase() {
        use Expired::*;
        // (case, in DATA, arrivals, checked at, expected)
        let trickle: Vec<(f64, usize)> = (1..=40).map(|i| (i as f64 * 2.0, 1)).collect();
        type Case<'a> = (&'a str, bool, &'a [(f64, usize)], f64, Option<Expired>);
        let cases: &[Case] = &[
            ("quiet before the idle limit", false, &[], 9.9, None),
            ("silent client", false, &[], 10.0, Some(Idle)),
            (
                "a byte resets the idle limit",
                false,
                &[(8.0, 1)],
                17.9,
                None,
            ),
            ("silent after a byte", false, &[(8.0, 1)], 18.0, Some(Idle)),
            (
                "trickled command line",
                false,
                &trickle,
                100.0,
                Some(Command),
            ),
            (
                "trickle still inside the command limit",
                false,
                &trickle[..14],
                29.0,
                None,
            ),
            ("silent after 354", true, &[], 10.0, Some(Idle)),
            ("fast message", true, &[(1.0, 100_000)], 100.0, Some(Idle)),
            (
                "fast message within the idle limit",
                true,
                &[(1.0, 100_000), (9.0, 10)],
                18.9,
                None,
            ),
            // 1 byte every 2 s: the 10 s of credit plus 1/100 s per byte
            // run out long before the idle limit does.
            ("trickled message", true, &trickle, 100.0, Some(DataRate)),
        ];
        for (name, data, arrivals, check, expected) in cases {
            assert_eq!(run(*data, arrivals, *check), *expected, "{name}");
        }
        let steady: Vec<(f64, usize)> = (1..=660).map(|i| (i as f64, 200)).collect();
        assert_eq!(run(true, &steady, 661.0), Some(Data), "the overall cap");
        assert_eq!(
            run(true, &steady[..590], 590.5),
            None,
            "the cap not yet reached"
        );
    }

    #[test]
    fn the_rate_deadline_grows_by_one_over_the_rate_per_byte() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(LIMITS, t0);
        d.data(t0);
        d.received(250, t0 + secs(1.0));
        // Idle credit 10 s + 250 bytes at 100 bytes/s = 12.5 s.
        assert_eq!(d.deadline(), (t0 + secs(11.0), Expired::Idle));
        d.received(1, t0 + secs(10.0));
        assert_eq!(d.deadline(), (t0 + secs(12.51), Expired::DataRate));
    }

    #[test]
    fn a_new_command_starts_fresh_limits() {
        let t0 = Instant::now();
        let mut d = Deadlines::new(LIMITS, t0);
        d.received(5, t0 + secs(25.0));
        assert_eq!(d.deadline(), (t0 + secs(30.0), Expired::Command));
        d.command(t0 + secs(26.0));
        assert_eq!(d.deadline(), (t0 + secs(36.0), Expired::Idle));
        assert!(!d.in_data());
        d.data(t0 + secs(27.0));
        assert!(d.in_data());
    }

    #[test]
    fn no_minimum_rate_leaves_idle_and_overall_limits() {
        let t0 = Instant::now();
        let limits = Limits {
            min_data_rate: 0,
            ..LIMITS
        };
        let mut d = Deadlines::new(limits, t0);
        d.data(t0);
        for i in 1..=100 {
            d.received(1, t0 + secs(i as f64 * 5.0));
        }
        assert_eq!(d.expired(t0 + secs(509.0)), None);
        assert_eq!(d.deadline(), (t0 + secs(510.0), Expired::Idle));
    }
}
