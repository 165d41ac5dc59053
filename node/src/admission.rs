//! Which connections a node admits, as a plain counting struct with no I/O
//! (see `docs/security.md`, "Connection fairness").
//!
//! Without a reserve, anyone who can open sockets can fill
//! `smtp.max_connections` with idle connections and lock out the
//! applications the relay is for. So connections come in three classes:
//!
//! - **trusted**: the client address is in `smtp.relay_networks` (known at
//!   accept). Not subject to `max_connections_per_ip` (an application
//!   server's connection pool is one address), never evicted.
//! - **anonymous**: any other client until it authenticates. Together they
//!   hold at most `max_anonymous` slots (`smtp.anonymous_connection_share`
//!   of `max_connections`), at most `max_per_ip` from one address.
//! - **authenticated**: an anonymous client after a successful AUTH; it no
//!   longer counts against the anonymous share and is never evicted.
//!
//! When a newcomer finds no room (the node is full, or it is anonymous and
//! the anonymous share is full), the anonymous session that has made no
//! progress for longest (no command completed, not receiving a message) is
//! evicted with `421` to make room. Only when no anonymous session can be
//! evicted is the newcomer refused. A client that connects to authenticate
//! is the newest anonymous session, so a flood of idle or trickling
//! connections evicts its own members first, and once authenticated the
//! client is safe.

use std::collections::HashMap;
use std::net::IpAddr;

/// Why a connection was turned away or closed early.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// No slot, and no anonymous session to evict.
    NodeFull,
    /// `max_connections_per_ip` reached.
    AddressFull,
    /// The client talked before the greeting (answered `554 5.5.0`).
    EarlyTalker,
    /// An idle anonymous session closed to make room.
    Evicted,
}

impl Refusal {
    /// The name in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NodeFull => "node_full",
            Refusal::AddressFull => "address_full",
            Refusal::EarlyTalker => "early_talker",
            Refusal::Evicted => "evicted",
        }
    }
}

/// The limits (`[smtp]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    pub max_total: usize,
    pub max_per_ip: usize,
    pub max_anonymous: usize,
}

impl Policy {
    /// `share` of `max_total` (at least one slot) for anonymous clients.
    pub fn new(max_total: usize, max_per_ip: usize, anonymous_share: f64) -> Policy {
        let max_anonymous = ((max_total as f64) * anonymous_share).floor() as usize;
        Policy {
            max_total,
            max_per_ip,
            max_anonymous: max_anonymous.clamp(1, max_total.max(1)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    Trusted,
    Anonymous,
    Authenticated,
}

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    class: Class,
    /// Chosen for eviction: it no longer holds a slot, only its address.
    evicting: bool,
}

/// A session let in; `evict` names the session to close to make room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub id: u64,
    pub evict: Option<u64>,
}

/// The node's sessions by class and address.
#[derive(Debug)]
pub struct Admission {
    policy: Policy,
    /// Slots held: every session not being evicted.
    total: usize,
    anonymous: usize,
    per_ip: HashMap<IpAddr, usize>,
    sessions: HashMap<u64, Entry>,
    next_id: u64,
}

impl Admission {
    pub fn new(policy: Policy) -> Admission {
        Admission {
            policy,
            total: 0,
            anonymous: 0,
            per_ip: HashMap::new(),
            sessions: HashMap::new(),
            next_id: 1,
        }
    }

    /// Admits a connection from `ip` (`trusted`: in `relay_networks`), or
    /// says why not. `idle_since(id)` tells, for an open session, since when
    /// it has made no progress (any monotonic count, smaller is older), or
    /// `None` while it must not be evicted (it is receiving a message).
    pub fn admit(
        &mut self,
        ip: IpAddr,
        trusted: bool,
        idle_since: impl Fn(u64) -> Option<u64>,
    ) -> Result<Admitted, Refusal> {
        let from_ip = self.per_ip.get(&ip).copied().unwrap_or(0);
        if !trusted && from_ip >= self.policy.max_per_ip {
            return Err(Refusal::AddressFull);
        }
        let no_room = self.total >= self.policy.max_total
            || (!trusted && self.anonymous >= self.policy.max_anonymous);
        let evict = if no_room {
            let victim = self
                .sessions
                .iter()
                .filter(|(_, e)| e.class == Class::Anonymous && !e.evicting)
                .filter_map(|(id, _)| idle_since(*id).map(|since| (since, *id)))
                .min()
                .map(|(_, id)| id)
                .ok_or(Refusal::NodeFull)?;
            if let Some(entry) = self.sessions.get_mut(&victim) {
                entry.evicting = true;
            }
            self.total -= 1;
            self.anonymous -= 1;
            Some(victim)
        } else {
            None
        };
        let id = self.next_id;
        self.next_id += 1;
        let class = if trusted {
            Class::Trusted
        } else {
            self.anonymous += 1;
            Class::Anonymous
        };
        self.total += 1;
        *self.per_ip.entry(ip).or_insert(0) += 1;
        self.sessions.insert(
            id,
            Entry {
                ip,
                class,
                evicting: false,
            },
        );
        Ok(Admitted { id, evict })
    }

    /// The session logged in: it leaves the anonymous share.
    pub fn authenticated(&mut self, id: u64) {
        if let Some(entry) = self.sessions.get_mut(&id) {
            if entry.class == Class::Anonymous {
                entry.class = Class::Authenticated;
                if !entry.evicting {
                    self.anonymous -= 1;
                }
            }
        }
    }

    /// The session ended.
    pub fn release(&mut self, id: u64) {
        let Some(entry) = self.sessions.remove(&id) else {
            return;
        };
        if let Some(count) = self.per_ip.get_mut(&entry.ip) {
            *count -= 1;
            if *count == 0 {
                self.per_ip.remove(&entry.ip);
            }
        }
        if !entry.evicting {
            self.total -= 1;
            if entry.class == Class::Anonymous {
                self.anonymous -= 1;
            }
        }
    }

    /// Sessions still open, those being evicted included.
    pub fn open(&self) -> usize {
        self.sessions.len()
    }

    /// Anonymous sessions holding a slot.
    pub fn anonymous(&self) -> usize {
        self.anonymous
    }
}

/// Refusals counted between two log lines, so that a flood of refused
/// connections costs one log line per interval instead of one each.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RefusalCounts {
    pub node_full: u64,
    pub address_full: u64,
    pub early_talker: u64,
    pub evicted: u64,
}

impl RefusalCounts {
    pub fn add(&mut self, refusal: Refusal) {
        match refusal {
            Refusal::NodeFull => self.node_full += 1,
            Refusal::AddressFull => self.address_full += 1,
            Refusal::EarlyTalker => self.early_talker += 1,
            Refusal::Evicted => self.evicted += 1,
        }
    }

    /// The counts so far, if any, leaving zero.
    pub fn take(&mut self) -> Option<RefusalCounts> {
        (*self != RefusalCounts::default()).then(|| std::mem::take(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    /// Every session idle since its id: the oldest is evicted first.
    fn by_age(id: u64) -> Option<u64> {
        Some(id)
    }

    fn never(_: u64) -> Option<u64> {
        None
    }

    #[test]
    fn the_share_is_at_least_one_slot() {
        assert_eq!(Policy::new(1000, 20, 0.8).max_anonymous, 800);
        assert_eq!(Policy::new(3, 20, 0.1).max_anonymous, 1);
        assert_eq!(Policy::new(10, 20, 1.0).max_anonymous, 10);
    }

    #[test]
    fn per_address_limit_spares_trusted_networks() {
        let mut a = Admission::new(Policy::new(10, 2, 1.0));
        assert!(a.admit(ip(2), false, never).is_ok());
        assert!(a.admit(ip(2), false, never).is_ok());
        assert_eq!(a.admit(ip(2), false, never), Err(Refusal::AddressFull));
        for _ in 0..5 {
            assert!(a.admit(ip(1), true, never).is_ok());
        }
        assert_eq!(a.open(), 7);
    }

    #[test]
    fn a_full_node_evicts_the_longest_idle_anonymous_session() {
        // (step, admit from, trusted, expected: Ok(evicted id) or refusal)
        let mut a = Admission::new(Policy::new(4, 10, 0.5));
        type Step<'a> = (&'a str, u8, bool, Result<Option<u64>, Refusal>);
        let steps: &[Step] = &[
            ("anonymous 1", 2, false, Ok(None)),
            ("anonymous 2", 3, false, Ok(None)),
            ("share full: evicts 1", 4, false, Ok(Some(1))),
            ("trusted 4", 1, true, Ok(None)),
            ("trusted 5", 1, true, Ok(None)),
            ("node full: trusted evicts 2", 1, true, Ok(Some(2))),
            ("node full: anonymous evicts 3", 5, false, Ok(Some(3))),
        ];
        for (step, from, trusted, expected) in steps {
            let got = a.admit(ip(*from), *trusted, by_age).map(|ok| ok.evict);
            assert_eq!(got, *expected, "{step}");
        }
        assert_eq!(a.anonymous(), 1);
        // Trusted sessions are never evicted: with the one anonymous
        // session busy, a newcomer is refused.
        assert_eq!(a.admit(ip(1), true, never), Err(Refusal::NodeFull));
        assert_eq!(a.admit(ip(6), false, never), Err(Refusal::NodeFull));
    }

    #[test]
    fn authenticated_sessions_leave_the_share_and_are_never_evicted() {
        let mut a = Admission::new(Policy::new(3, 10, 0.5));
        let first = a.admit(ip(2), false, by_age).unwrap();
        assert_eq!(first.evict, None);
        a.authenticated(first.id);
        assert_eq!(a.anonymous(), 0);
        let second = a.admit(ip(3), false, by_age).unwrap();
        assert_eq!(second.evict, None);
        // The share (1) is full: the next anonymous client evicts the
        // second, never the authenticated first.
        let third = a.admit(ip(4), false, by_age).unwrap();
        assert_eq!(third.evict, Some(second.id));
        a.release(second.id);
        a.authenticated(third.id);
        let fourth = a.admit(ip(5), false, by_age).unwrap();
        assert_eq!(fourth.evict, None);
        assert_eq!(
            a.admit(ip(6), false, |id| (id != fourth.id).then_some(id)),
            Err(Refusal::NodeFull),
            "the only anonymous session is busy"
        );
    }

    #[test]
    fn evicting_sessions_hold_no_slot_until_they_end() {
        let mut a = Admission::new(Policy::new(1, 10, 1.0));
        let first = a.admit(ip(2), false, by_age).unwrap();
        let second = a.admit(ip(2), false, by_age).unwrap();
        assert_eq!(second.evict, Some(first.id));
        assert_eq!(a.open(), 2);
        // The first is being closed: it is not chosen again.
        let third = a.admit(ip(3), false, |id| {
            (id == first.id).then_some(0).or(Some(id))
        });
        assert_eq!(third.unwrap().evict, Some(second.id));
        a.release(first.id);
        a.release(second.id);
        assert_eq!((a.open(), a.anonymous()), (1, 1));
        a.release(99);
        assert_eq!(a.open(), 1);
    }

    #[test]
    fn refusals_are_counted_until_taken() {
        let mut counts = RefusalCounts::default();
        assert_eq!(counts.take(), None);
        for r in [Refusal::NodeFull, Refusal::NodeFull, Refusal::EarlyTalker] {
            counts.add(r);
        }
        let taken = counts.take().unwrap();
        assert_eq!((taken.node_full, taken.early_talker), (2, 1));
        assert_eq!(counts.take(), None);
    }
}
