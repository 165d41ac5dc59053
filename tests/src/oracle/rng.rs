//! A small deterministic PRNG (SplitMix64): the same seed gives the same
//! workload on every machine and every release of every crate, which a
//! seeded registry generator would not promise.

#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// An independent stream for one purpose (`salt`), so that adding a
    /// draw to one part of the workload does not shift the others.
    pub fn fork(&self, salt: u64) -> Rng {
        let mut forked = Rng(self.0 ^ salt.wrapping_mul(0xA076_1D64_78BD_642F));
        forked.next_u64();
        forked
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..high` (`high > low`).
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(high > low, "empty range {low}..{high}");
        low + self.next_u64() % (high - low)
    }

    /// `true` with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.range(0, 100) < percent
    }

    /// One of `items`, by weight: `(weight, item)`.
    pub fn weighted<T: Copy>(&mut self, items: &[(u64, T)]) -> T {
        let total: u64 = items.iter().map(|(w, _)| w).sum();
        let mut pick = self.range(0, total);
        for &(weight, item) in items {
            if pick < weight {
                return item;
            }
            pick -= weight;
        }
        unreachable!("pick < total")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_stream_and_forks_differ() {
        let a: Vec<u64> = (0..5).map(|_| Rng::new(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut one = Rng::new(7);
        let mut two = Rng::new(7);
        assert_eq!(one.next_u64(), two.next_u64());
        let mut f1 = Rng::new(7).fork(1);
        let mut f2 = Rng::new(7).fork(2);
        assert_ne!(f1.next_u64(), f2.next_u64());
        let mut r = Rng::new(3);
        for _ in 0..1000 {
            assert!((5..9).contains(&r.range(5, 9)));
        }
    }
}
