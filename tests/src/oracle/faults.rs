//! The fault schedule: seeded times at which a fault starts, how long it
//! holds, and what it is. The run carries them out (see `super::run`).

use std::fmt;
use std::time::Duration;

use super::rng::Rng;

/// A kind of fault a run may inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// SIGKILL a node that takes mail, start it again after the hold.
    KillNode,
    /// SIGKILL the `smarthost coordinator`, start it again.
    KillCoordinator,
    /// SIGKILL Redis (or one primary of the cluster) and start it again
    /// from its append-only file.
    RestartRedis,
    /// Cut one relay process's link to Redis, or to every primary of the
    /// Redis Cluster (TCP proxies), restore it.
    CutRedis,
    /// Cut the links from the relay to a third of the receivers.
    CutReceivers,
    /// Fill the disk of the local spool, free it again.
    DiskFull,
}

/// One fault of the schedule.
#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub at: Duration,
    pub hold: Duration,
    pub kind: FaultKind,
    /// Which node (or primary) it hits, modulo their number.
    pub target: usize,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}({}) at {:.1}s for {:.1}s",
            self.kind,
            self.target,
            self.at.as_secs_f64(),
            self.hold.as_secs_f64()
        )
    }
}

impl FaultKind {
    /// Whether the fault kills a relay process (a delivery done just
    /// before may then be repeated, or miss its delivery log line).
    pub fn kills(self) -> bool {
        matches!(self, FaultKind::KillNode | FaultKind::KillCoordinator)
    }
}

/// `count` faults of `kinds` spread over `window`, in time order; none
/// overlaps the next (each starts after the one before has ended). The
/// kinds come in rounds of one each, every round in a seeded order, so a
/// run of at least as many faults as kinds has each kind.
pub fn schedule(seed: u64, kinds: &[FaultKind], window: Duration, count: usize) -> Vec<Fault> {
    if kinds.is_empty() || count == 0 {
        return Vec::new();
    }
    let mut rng = Rng::new(seed).fork(0xFA17);
    // Rounds of every kind, each round in its own seeded order.
    let mut order = Vec::with_capacity(count + kinds.len());
    while order.len() < count {
        let mut round = kinds.to_vec();
        for i in (1..round.len()).rev() {
            round.swap(i, rng.range(0, i as u64 + 1) as usize);
        }
        order.extend(round);
    }
    let slot = window.as_millis() as u64 / count as u64;
    (0..count as u64)
        .filter(|_| slot >= 1_000)
        .map(|i| {
            let hold = rng.range(300, 2_500.min(slot / 2).max(301));
            let at = i * slot + rng.range(0, slot - hold);
            Fault {
                at: Duration::from_millis(at),
                hold: Duration::from_millis(hold),
                kind: order[i as usize],
                target: rng.range(0, 1 << 16) as usize,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_fall_in_the_window_one_after_another() {
        let kinds = [FaultKind::KillNode, FaultKind::CutReceivers];
        let faults = schedule(5, &kinds, Duration::from_secs(20), 4);
        assert_eq!(faults.len(), 4);
        assert!(kinds.iter().all(|k| faults.iter().any(|f| f.kind == *k)));
        for pair in faults.windows(2) {
            assert!(pair[0].at + pair[0].hold <= pair[1].at, "{faults:?}");
        }
        let last = faults.last().unwrap();
        assert!(last.at + last.hold <= Duration::from_secs(20));
        assert_eq!(
            format!("{faults:?}"),
            format!("{:?}", schedule(5, &kinds, Duration::from_secs(20), 4))
        );
    }
}
